// qomem/virtio_transport.hpp — what every VIRTIO transport shares: the bus
// its device plugs into, and the window of guest memory where the transport
// places the device's shared memory regions for the driver to find.
//
// A VIRTIO device (virtio_shmem_device) knows its shared memory regions by
// shmid and size only (declared by its model, or enumerated from a vhost-user
// back-end with GET_SHMEM_CONFIG). A transport — virtio-mmio
// (virtio_mmio.hpp) or virtio-pci (virtio_pci.hpp) — has a window (a
// container region it owns: a window of the system address space, a BAR),
// lays the device's regions out in it without the device naming them, and
// reports each region's place to the driver (registers, PCI capabilities):
//
//     qomem::shmem_layout l = qomem::layout_shmem(dev);       // shmid order, back to back
//     qomem::place_shmem(window, dev, l);                      // window refs each region
//     for (const qomem::shmem_placement& p : qomem::placed_shmem(window)) ...
//
// What a transport reports is read from the window itself, never from a copy:
// a region leaves the window when its device is unplugged (the region's own
// unparent hook takes it out of whatever container holds it), so it leaves
// the driver's view at the same moment it leaves the guest's memory map.
#pragma once

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <fmt/core.h>

#include <qomem/assert.hpp>
#include <qomem/device.hpp>
#include <qomem/error.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/memory_system.hpp>
#include <qomem/shmem.hpp>
#include <qomem/types.hpp>

namespace qomem {

/// A transport refused a device's shared memory regions: they do not fit
/// its window, its BAR or its capability list. The regions come from the
/// device (or its back-end), so this is bad input; nothing changed.
class transport_error : public error {
public:
    using error::error;
};

/// The bus between a transport and its one VIRTIO device (QEMU's
/// VirtioBusState). The bus holds a strong reference to the device plugged
/// into it (device::plug_into).
class virtio_bus : public bus {
    QOMEM_OBJECT(virtio_bus, "virtio-bus", bus)
public:
    virtio_bus() = default;

    /// The device plugged in, or null.
    virtio_shmem_device* device() const noexcept {
        virtio_shmem_device* found = nullptr;
        for_each_link([&](std::string_view, object* target, link_strength) {
            if (!found) found = dynamic_cast_to<virtio_shmem_device>(target);
        });
        return found;
    }

    /// Plugs `dev` in and realizes it if it is not realized yet (its realize
    /// may declare its regions, e.g. from a back-end).
    /// Requires (asserted): no device on this bus; `dev` on no bus.
    /// Effects: the bus takes a strong reference to `dev`.
    /// Complexity: that of dev's realize. Throws: whatever dev's realize
    /// throws; `dev` is then unplugged again (the bus's reference dropped),
    /// as before the call.
    void plug(virtio_shmem_device& dev) {
        QOMEM_ASSERT(!device(), "{} '{}': already has a device ({} '{}')", type().name, name(),
                     device() ? device()->type().name : "", device() ? device()->name() : "");
        QOMEM_ASSERT(!dev.parent_bus(), "{} '{}': already plugged into a bus", dev.type().name,
                     dev.name());
        ref_ptr<virtio_shmem_device> keep(
            &dev); // the bus's reference may be the last one on a throw
        dev.plug_into(*this);
        if (!dev.realized()) {
            try {
                dev.realize();
            } catch (...) {
                dev.unplug_from_bus();
                throw;
            }
        }
    }

protected:
    ~virtio_bus() override = default;
};

/// Where a transport put one shared memory region, as the driver learns it:
/// `offset` within the transport's window (a virtio-mmio window, a BAR).
struct shmem_placement {
    std::uint8_t shmid;
    std::uint64_t offset;
    std::uint64_t size;
    friend bool operator==(const shmem_placement&, const shmem_placement&) = default;
};

/// A device's regions laid out for a window: back to back in shmid order
/// (each region is a whole number of host pages, so each offset is page
/// aligned), and where the last one ends.
struct shmem_layout {
    std::vector<shmem_placement> regions;
    u128 end = 0;
};

/// The layout of `dev`'s regions. Complexity: O(regions). Throws: nothing
/// but std::bad_alloc.
inline shmem_layout layout_shmem(const virtio_shmem_device& dev) {
    shmem_layout l;
    dev.for_each_shmem([&](const virtio_shmem& s) {
        // 256 regions of < 2^64 bytes each: the sum fits in 128 bits.
        l.regions.push_back({s.shmid(), static_cast<std::uint64_t>(l.end), s.size()});
        l.end += s.size();
    });
    return l;
}

/// The shared memory regions `window` holds, in shmid order: each
/// subregion that is a virtio_shmem's region, at its offset.
/// Complexity: O(subregions). Throws: nothing but std::bad_alloc.
inline std::vector<shmem_placement> placed_shmem(const memory_region& window) {
    std::vector<shmem_placement> out;
    window.for_each_subregion([&](const memory_region& r) {
        if (const auto* s = dynamic_cast_to<virtio_shmem>(r.owner()); s && &s->region() == &r)
            out.push_back({s->shmid(), r.addr(), s->size()});
    });
    std::sort(out.begin(), out.end(),
              [](const shmem_placement& a, const shmem_placement& b) { return a.shmid < b.shmid; });
    return out;
}

/// Region `shmid` in `window`, if it holds it (an id above 255 never matches).
inline std::optional<shmem_placement> placed_shmem(const memory_region& window,
                                                   std::uint64_t shmid) {
    for (const shmem_placement& p : placed_shmem(window))
        if (p.shmid == shmid) return p;
    return std::nullopt;
}

/// Places `dev`'s regions in `window` as `layout` says, in one transaction.
/// Requires (asserted): `layout` is layout_shmem(dev) and ends within the
/// window; no region is in a container yet (a device with a transport
/// leaves placing its regions to it).
/// Effects: `window` takes a memory_region_ref on each region (dropped when
/// the region leaves it: remove_shmem, or the region's device unplugged).
/// Complexity: O(regions × subregions) plus one commit. Throws: nothing else.
inline void place_shmem(memory_region& window, const virtio_shmem_device& dev,
                        const shmem_layout& layout) {
    QOMEM_ASSERT(layout.end <= window.size(),
                 "window '{}' ({:#x} bytes) is too small for a layout of {:#x} bytes",
                 window.region_name(), static_cast<std::uint64_t>(window.size()),
                 static_cast<std::uint64_t>(layout.end));
    for (const shmem_placement& p : layout.regions) {
        const virtio_shmem* s = dev.shmem(p.shmid);
        QOMEM_ASSERT(s && s->size() == p.size,
                     "{} '{}': the layout names shared memory region {} ({:#x} bytes), "
                     "which the device does not have",
                     dev.type().name, dev.name(), p.shmid, p.size);
        const memory_region* c = s->region().container();
        QOMEM_ASSERT(
            !c,
            "{} '{}': shared memory region {} is already placed in '{}'; a device on a transport "
            "leaves placing its regions to the transport",
            dev.type().name, dev.name(), p.shmid, c ? c->region_name() : "");
    }
    std::optional<memory_transaction> tx;
    if (memory_system* sys = window.system()) tx.emplace(*sys);
    for (const shmem_placement& p : layout.regions)
        window.add_subregion(p.offset, dev.shmem(p.shmid)->region());
}

/// Takes every shared memory region out of `window`, in one transaction.
/// Effects: drops the window's reference to each (which may finalize a
/// region whose device is already gone). Complexity: O(subregions) plus one
/// commit. Throws: nothing but std::bad_alloc.
inline void remove_shmem(memory_region& window) {
    std::vector<memory_region*> regions;
    window.for_each_subregion([&](memory_region& r) {
        if (const auto* s = dynamic_cast_to<virtio_shmem>(r.owner()); s && &s->region() == &r)
            regions.push_back(&r);
    });
    if (regions.empty()) return;
    std::optional<memory_transaction> tx;
    if (memory_system* sys = window.system()) tx.emplace(*sys);
    for (memory_region* r : regions) window.del_subregion(*r);
}

} // namespace qomem
