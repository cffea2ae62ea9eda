// qomem: umbrella header. Includes every public header of the library except
// the optional ones with extra dependencies (fixture.hpp needs nlohmann-json).
#pragma once

#include <qomem/accessors.hpp>           // typed accessors: ldl_le, stq_be, ...
#include <qomem/address_space.hpp>       // address spaces: accesses, find, listeners
#include <qomem/assert.hpp>              // QOMEM_ASSERT and its handler
#include <qomem/coalesced_mmio.hpp>      // coalesced MMIO: ranges and the ring
#include <qomem/device.hpp>              // devices and buses (qdev)
#include <qomem/dirty_log.hpp>           // dirty-log clients and snapshots
#include <qomem/dma.hpp>                 // DMA mappings
#include <qomem/error.hpp>               // exceptions for bad input
#include <qomem/flat_view.hpp>           // rendered views
#include <qomem/flatten.hpp>             // QEMU's rendering rules
#include <qomem/fwd.hpp>                 // forward declarations
#include <qomem/hotplug.hpp>             // hotplug handlers, DEVICE_DELETED
#include <qomem/ioeventfd.hpp>           // ioeventfds: writes that signal an eventfd
#include <qomem/iommu.hpp>               // IOMMU regions, notifiers, replay
#include <qomem/log.hpp>                 // diagnostic lines
#include <qomem/machine.hpp>             // machines, each with its memory system
#include <qomem/memory_listener.hpp>     // following a flat view
#include <qomem/memory_ops.hpp>          // MMIO callbacks
#include <qomem/memory_region.hpp>       // regions, references, factories
#include <qomem/memory_region_cache.hpp> // cached translations (virtio rings)
#include <qomem/memory_system.hpp>       // commits, transactions, the writer role
#include <qomem/mtree.hpp>               // info mtree
#include <qomem/object.hpp>              // QOM objects
#include <qomem/pci.hpp>                 // a minimal PCI bus: config space, BARs, ECAM
#include <qomem/property.hpp>            // typed properties
#include <qomem/qom_tree.hpp>            // info qom-tree
#include <qomem/rcu.hpp>                 // read sections for lock-free readers
#include <qomem/reference_graph.hpp>     // who holds whom: DOT, replay under a rule
#include <qomem/region_dispatch.hpp>     // one access to one region (MemOp)
#include <qomem/shmem.hpp>               // VIRTIO shared memory regions
#include <qomem/tlb.hpp>                 // a CPU's TLB
#include <qomem/type.hpp>                // QOM types
#include <qomem/type_registry.hpp>       // types by name
#include <qomem/types.hpp>               // hwaddr, u128
#include <qomem/user_creatable.hpp>      // -object, /objects
#include <qomem/vhost_log.hpp>           // the dirty log shared with a vhost-user back-end
#include <qomem/vhost_user.hpp>          // vhost-user messages
#include <qomem/virtio_mmio.hpp>         // the virtio-mmio transport
#include <qomem/virtio_pci.hpp>          // the virtio-pci transport
#include <qomem/virtio_transport.hpp>    // a transport's bus and shared memory window
