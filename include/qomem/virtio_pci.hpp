// qomem/virtio_pci.hpp — the virtio-pci transport (VIRTIO 1.2, 4.1), as far
// as a driver needs it to identify the device and find its shared memory
// regions: a PCI function (pci.hpp) with one VIRTIO_PCI_CAP_SHARED_MEMORY_CFG
// capability per region (4.1.4.7, cfg_type 8, in its 64-bit form
// virtio_pci_cap64) and the regions in a 64-bit prefetchable memory BAR.
//
//     auto proxy = qomem::make<qomem::virtio_pci>();     // shared memory in BAR 2
//     proxy->plug(*dev);                                 // dev realized (may ask its back-end)
//     proxy->plug_into(host->bus());
//     m.peripheral().add_child("fs0", *proxy);
//     proxy->realize();                                  // BAR and capabilities built
//     // The driver: walk the capability list for vendor capabilities
//     // (ID 0x09) with cfg_type 8; each gives bar, id (= shmid), offset and
//     // length, 64 bits each with offset_hi / length_hi; the region is at
//     // the BAR's address + offset once firmware placed the BAR.
//
// At realize the transport lays the device's regions out (layout_shmem:
// shmid order, back to back), sizes the BAR to the next power of two of
// their total, places them in it and registers it (64-bit, prefetchable, as
// QEMU's vhost-user-fs-pci cache BAR; index options::shm_bar, 2 by
// default). The device never names where its regions go. The capability list
// is read from the BAR's contents (placed_shmem) at each configuration read:
// a region leaves the driver's view when it leaves the BAR, i.e. when its
// device is unplugged; unplugging the whole function (the usual PCI
// hot-unplug) takes it off the bus, where every configuration read then
// answers all ones.
//
// IDs: vendor 0x1af4, device 0x1040 + virtio_id(), revision 1 (a modern,
// VIRTIO 1.x device), subsystem 0x1af4:0x1100 (QEMU's), class from options.
// Left out: the common, notification, ISR, device-configuration and PCI
// configuration-access capabilities and the BAR that holds them, MSI-X, the
// legacy I/O BAR. Conventional configuration space holds at most 8 shared
// memory capabilities (24 bytes each from 0x40); a device with more regions,
// or with regions totalling more than 2^63 bytes, is refused at realize with
// transport_error.
//
// References. The transport's virtio bus holds a strong reference to the
// device; the BAR (a container owned by the transport, made at realize and
// unparented at unrealize) holds a memory_region_ref on each region in it;
// the PCI function holds one on the BAR while it is registered, and the host
// bridge's PCI memory one while the BAR is mapped.
#pragma once

#include <algorithm>
#include <bit>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include <fmt/core.h>

#include <qomem/assert.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/pci.hpp>
#include <qomem/shmem.hpp>
#include <qomem/types.hpp>
#include <qomem/virtio_transport.hpp>

namespace qomem {

/// The virtio-pci capability layout (struct virtio_pci_cap64).
namespace virtio_pci_cap {
inline constexpr std::uint8_t shared_memory_cfg = 8; ///< VIRTIO_PCI_CAP_SHARED_MEMORY_CFG
inline constexpr std::uint8_t cap64_length = 24;     ///< sizeof(struct virtio_pci_cap64)
// Offsets from the capability's start.
inline constexpr std::uint32_t cap_len = 2;
inline constexpr std::uint32_t cfg_type = 3;
inline constexpr std::uint32_t bar = 4;
inline constexpr std::uint32_t id = 5;
inline constexpr std::uint32_t offset = 8;
inline constexpr std::uint32_t length = 12;
inline constexpr std::uint32_t offset_hi = 16;
inline constexpr std::uint32_t length_hi = 20;
} // namespace virtio_pci_cap

class virtio_pci : public pci_device {
    QOMEM_OBJECT(virtio_pci, "virtio-pci", pci_device)
public:
    static constexpr std::uint16_t vendor = 0x1af4;
    static constexpr std::uint16_t device_id_base = 0x1040; ///< + the VIRTIO device ID
    static constexpr std::uint16_t subsystem = 0x1100;      ///< QEMU's subsystem ID

    struct options {
        unsigned shm_bar = 2;                ///< the BAR (and the one after it) for the regions
        std::uint32_t class_code = 0xff0000; ///< "unclassified", unless the model says better
    };

    virtio_pci() : virtio_pci(options{}) {}
    /// Requires (asserted): shm_bar < 5 (a 64-bit BAR takes two slots).
    explicit virtio_pci(options o);

    virtio_bus& bus() const noexcept { return *bus_; }
    /// The BAR holding the regions (null before realize, or when the device has none).
    memory_region* shm_bar() const noexcept { return bar_region(options_.shm_bar); }
    unsigned shm_bar_index() const noexcept { return options_.shm_bar; }

    /// Plugs `dev` into the transport's bus, realizing it if it is not (its
    /// realize may declare regions from a back-end). Its regions are placed
    /// when the transport is realized.
    /// Requires (asserted): the transport not realized (a PCI function's
    /// BARs and capabilities are fixed once the guest can see it); no device
    /// plugged; `dev` on no bus.
    /// Effects: the bus takes a strong reference to `dev`.
    /// Complexity: dev's realize. Throws: whatever dev's realize throws;
    /// `dev` is then unplugged again.
    void plug(virtio_shmem_device& dev) {
        QOMEM_ASSERT(
            !realized(),
            "{} '{}': plug after realize: a PCI function's BARs and capabilities are fixed "
            "once the guest can see it",
            type().name, name());
        bus_->plug(dev);
    }

protected:
    ~virtio_pci() override = default;

    /// Lays the plugged device's regions out in a new BAR, registers it, and
    /// publishes the identity and the capabilities.
    /// Requires (asserted): a realized device plugged; see pci_device::do_realize.
    /// Effects: a BAR container (child of the transport) holding a reference
    /// to each region, registered as BAR shm_bar.
    /// Throws: transport_error when the capabilities would not fit (more
    /// than 8 regions) or the regions total more than 2^63 bytes; nothing
    /// changes and the transport stays unrealized.
    inline void do_realize() override;
    /// Takes the regions out of the BAR, unmaps and unregisters it (pci_device),
    /// unparents it, and clears the capabilities.
    inline void do_unrealize() noexcept override;
    /// The capabilities are refreshed from the BAR's contents first.
    std::uint32_t do_config_read(std::uint32_t addr, unsigned len) override {
        set_capabilities(capabilities(placed()));
        return pci_device::do_config_read(addr, len);
    }

private:
    std::vector<shmem_placement> placed() const {
        const memory_region* b = shm_bar();
        return b ? placed_shmem(*b) : std::vector<shmem_placement>{};
    }
    std::vector<pci_capability> capabilities(const std::vector<shmem_placement>& regions) const;

    options options_;
    virtio_bus* bus_ = nullptr;
    memory_region* bar_ = nullptr; // our child while realized with regions
};

// ---- implementation ---------------------------------------------------------------------

inline virtio_pci::virtio_pci(options o) : options_(o) {
    QOMEM_ASSERT(o.shm_bar + 1 < bar_count,
                 "virtio-pci: shared memory BAR {} cannot hold a 64-bit BAR (0 to 4)", o.shm_bar);
    auto b = make<virtio_bus>();
    add_child("virtio-bus", *b);
    bus_ = b.get();
}

inline std::vector<pci_capability>
virtio_pci::capabilities(const std::vector<shmem_placement>& regions) const {
    std::vector<pci_capability> caps;
    for (const shmem_placement& p : regions) {
        // struct virtio_pci_cap64 after its first two bytes (cap_vndr, cap_next).
        pci_capability c{pci_config::cap_id_vendor,
                         std::vector<std::uint8_t>(virtio_pci_cap::cap64_length - 2)};
        const auto put = [&](std::uint32_t at, std::uint8_t v) { c.body[at - 2] = v; };
        const auto put32 = [&](std::uint32_t at, std::uint32_t v) {
            for (unsigned i = 0; i < 4; ++i) put(at + i, static_cast<std::uint8_t>(v >> (8 * i)));
        };
        put(virtio_pci_cap::cap_len, virtio_pci_cap::cap64_length);
        put(virtio_pci_cap::cfg_type, virtio_pci_cap::shared_memory_cfg);
        put(virtio_pci_cap::bar, static_cast<std::uint8_t>(options_.shm_bar));
        put(virtio_pci_cap::id, p.shmid);
        put32(virtio_pci_cap::offset, static_cast<std::uint32_t>(p.offset));
        put32(virtio_pci_cap::length, static_cast<std::uint32_t>(p.size));
        put32(virtio_pci_cap::offset_hi, static_cast<std::uint32_t>(p.offset >> 32));
        put32(virtio_pci_cap::length_hi, static_cast<std::uint32_t>(p.size >> 32));
        caps.push_back(std::move(c));
    }
    return caps;
}

inline void virtio_pci::do_realize() {
    virtio_shmem_device* dev = bus_->device();
    QOMEM_ASSERT(dev && dev->realized(),
                 "{} '{}': realize needs a realized device plugged into its virtio bus",
                 type().name, name());
    // Every check first: the regions come from the device or its back-end.
    const shmem_layout l = layout_shmem(*dev);
    if (!capabilities_fit(capabilities(l.regions)))
        throw transport_error(fmt::format(
            "{} '{}': {} '{}' has {} shared memory regions; the configuration "
            "space holds {} capabilities of {} bytes",
            type().name, name(), dev->type().name, dev->name(), l.regions.size(),
            (pci_config::size - pci_config::first_capability) / virtio_pci_cap::cap64_length,
            virtio_pci_cap::cap64_length));
    if (l.end > u128(1) << 63)
        throw transport_error(fmt::format(
            "{} '{}': the shared memory regions of {} '{}' total {:#x}{:016x} "
            "bytes, more than a 64-bit BAR's 2^63",
            type().name, name(), dev->type().name, dev->name(),
            static_cast<std::uint64_t>(l.end >> 64), static_cast<std::uint64_t>(l.end)));
    pci_device::do_realize(); // the slot (asserted, no state changed on failure)
    set_ids({vendor, static_cast<std::uint16_t>(device_id_base + dev->virtio_id()), 1,
             options_.class_code, vendor, subsystem});
    if (!l.regions.empty()) {
        const auto size = std::bit_ceil(
            static_cast<std::uint64_t>(std::max<u128>(l.end, detail::host_page_size())));
        bar_ = make_container(*this, "virtio-pci-shm", size).get(); // our child holds it
        place_shmem(*bar_, *dev, l);
        register_bar(options_.shm_bar, *bar_, pci_bar_type::mem64_prefetch);
    }
    set_capabilities(capabilities(placed()));
}

inline void virtio_pci::do_unrealize() noexcept {
    if (bar_) remove_shmem(*bar_);
    pci_device::do_unrealize(); // unmaps the BAR, drops the registration's reference
    if (bar_) unparent(*std::exchange(bar_, nullptr)); // nothing else holds it: freed
    set_capabilities({});
}

} // namespace qomem
