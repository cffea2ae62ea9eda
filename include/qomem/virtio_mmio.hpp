// qomem/virtio_mmio.hpp — the virtio-mmio transport (VIRTIO 1.2, 4.2), as far
// as a driver needs it to identify the device and find its shared memory
// regions: the register block with SHMSel / SHMLen / SHMBase (4.2.2), and a
// window of guest memory where the transport places the regions.
//
//     auto t = qomem::make<qomem::virtio_mmio>(0x100000000, 1 << 30);   // window base, size
//     m.peripheral().add_child("virtio-mmio0", *t);
//     t->map(*sys, 0x0a000000);             // registers there, window at 0x100000000
//     t->realize();
//     t->plug(*dev);                        // dev realized, its regions placed in the window
//     // The driver: write id to SHMSel (0x0ac); SHMLenLow/High (0x0b0/0x0b4)
//     // read all ones for an id with no region, else its length; SHMBaseLow/
//     // High (0x0b8/0x0bc) its guest-physical address.
//
// The regions are laid out as layout_shmem says (shmid order, back to back)
// from the window's start; the device never names where. What the registers
// report is read from the window (placed_shmem): a region leaves the
// driver's view when it leaves the window, i.e. when its device is unplugged.
//
// Registers modelled: MagicValue ("virt"), Version (2), DeviceID (the
// device's virtio_id(), 0 with no device, as QEMU's virtio-mmio without a
// back-end), VendorID ("QEMU", as QEMU), SHMSel, SHMLenLow/High,
// SHMBaseLow/High. For an id with no region both the length and the base
// read all ones (the specification says so for both; Linux's vm_get_shm_region
// checks the length). Registers are 32 bits wide: another access size reads 0
// and a write of it is ignored, logged as a guest error (QEMU's virtio-mmio
// does the same); writes to read-only registers and reads of SHMSel are
// ignored / read 0 and are logged. Left out: features, queues, status,
// interrupts, the configuration generation and the device configuration
// space (0x100-0x1ff), which read 0 and ignore writes; no legacy (version 1)
// interface.
//
// References. The transport's bus holds a strong reference to the device;
// its window holds a memory_region_ref on each region it holds (dropped by
// remove_shmem at unrealize, or by the region itself when its device goes);
// the registers and the window are regions owned by the transport.
//
// Threads: register accesses take the writer role of the registers' memory
// system (QEMU runs them under its big lock), so SHMSel and the reads after
// it see one consistent window.
#pragma once

#include <cstdint>
#include <mutex>
#include <optional>
#include <string>

#include <fmt/core.h>

#include <qomem/assert.hpp>
#include <qomem/device.hpp>
#include <qomem/log.hpp>
#include <qomem/memory_ops.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/memory_system.hpp>
#include <qomem/shmem.hpp>
#include <qomem/types.hpp>
#include <qomem/virtio_transport.hpp>

namespace qomem {

/// Register offsets of the virtio-mmio block (VIRTIO 1.2, 4.2.2).
namespace virtio_mmio_reg {
inline constexpr hwaddr magic_value = 0x000;
inline constexpr hwaddr version = 0x004;
inline constexpr hwaddr device_id = 0x008;
inline constexpr hwaddr vendor_id = 0x00c;
inline constexpr hwaddr shm_sel = 0x0ac;
inline constexpr hwaddr shm_len_low = 0x0b0;
inline constexpr hwaddr shm_len_high = 0x0b4;
inline constexpr hwaddr shm_base_low = 0x0b8;
inline constexpr hwaddr shm_base_high = 0x0bc;
inline constexpr hwaddr config = 0x100;
} // namespace virtio_mmio_reg

class virtio_mmio : public device {
    QOMEM_OBJECT(virtio_mmio, "virtio-mmio", device)
public:
    static constexpr std::uint32_t magic = 0x74726976; ///< "virt", little-endian
    static constexpr std::uint32_t version = 2;
    static constexpr std::uint32_t vendor = 0x554d4551; ///< "QEMU", as QEMU's virtio-mmio
    static constexpr hwaddr register_size = 0x200;

    /// A transport whose shared memory window is `shm_window_size` bytes at
    /// guest address `shm_base`.
    /// Requires (asserted): `shm_base` and `shm_window_size` multiples of the
    /// host page size; the window within the 64-bit address space.
    virtio_mmio(hwaddr shm_base, std::uint64_t shm_window_size);

    virtio_bus& bus() const noexcept { return *bus_; }
    /// The register block (0x200 bytes of MMIO, owned by the transport).
    memory_region& registers() const noexcept { return *regs_; }
    /// The window regions are placed in (a container owned by the transport).
    memory_region& shm_window() const noexcept { return *window_; }
    hwaddr shm_base() const noexcept { return shm_base_; }

    /// Places the registers at `regs_addr` and the window at shm_base() in
    /// `system`, the root of the guest's physical address space (SHMBase
    /// reports addresses in it).
    /// Requires (asserted): neither is placed yet.
    /// Effects: `system` takes a reference to each (dropped at unrealize).
    /// Complexity: two commits. Throws: nothing else.
    void map(memory_region& system, hwaddr regs_addr) {
        QOMEM_ASSERT(!regs_->container() && !window_->container(), "{} '{}': already mapped",
                     type().name, name());
        system.add_subregion(regs_addr, *regs_);
        system.add_subregion(shm_base_, *window_);
    }

    /// Plugs `dev` into the transport's bus (realizing it if it is not: its
    /// realize may declare regions from a back-end) and, if the transport
    /// is realized, places its regions in the window.
    /// Requires (asserted): no device plugged; `dev` on no bus; none of its
    /// regions placed anywhere.
    /// Effects: the bus takes a strong reference to `dev`; the window a
    /// memory_region_ref on each of its regions.
    /// Complexity: dev's realize, plus one commit.
    /// Throws: whatever dev's realize throws; transport_error when the
    /// regions do not fit the window (naming each). On a throw, `dev` is
    /// unplugged again (and unrealized if this call realized it): nothing changed.
    void plug(virtio_shmem_device& dev);

protected:
    ~virtio_mmio() override = default;
    /// Places the regions of a device plugged before realize.
    /// Throws: transport_error (nothing changes; the transport stays unrealized).
    void do_realize() override {
        if (virtio_shmem_device* dev = bus_->device()) place(*dev);
    }
    /// Takes the regions out of the window, and the registers and the window
    /// out of the system (unplug of the transport).
    void do_unrealize() noexcept override {
        remove_shmem(*window_);
        if (memory_region* c = regs_->container()) c->del_subregion(*regs_);
        if (memory_region* c = window_->container()) c->del_subregion(*window_);
    }

private:
    struct regs_ops {
        static constexpr access_limits valid{.min_access_size = 1, .max_access_size = 4};
        virtio_mmio* t;
        std::uint64_t read(hwaddr offset, unsigned size) { return t->read_register(offset, size); }
        void write(hwaddr offset, std::uint64_t value, unsigned size) {
            t->write_register(offset, value, size);
        }
    };

    void place(virtio_shmem_device& dev);
    std::uint64_t read_register(hwaddr offset, unsigned size);
    void write_register(hwaddr offset, std::uint64_t value, unsigned size);
    void guest_error(const char* what, hwaddr offset, unsigned size) const {
        if (log_enabled(log_category::guest_errors))
            log_line(log_category::guest_errors,
                     fmt::format("{} '{}': {} at {:#x}, size {}", type().name, name(), what, offset,
                                 size));
    }

    regs_ops ops_{this};
    hwaddr shm_base_;
    virtio_bus* bus_ = nullptr;
    memory_region* regs_ = nullptr;
    memory_region* window_ = nullptr;
    std::uint32_t shm_sel_ = 0;
};

// ---- implementation ---------------------------------------------------------------------

inline virtio_mmio::virtio_mmio(hwaddr shm_base, std::uint64_t shm_window_size)
    : shm_base_(shm_base) {
    const std::uint64_t page = detail::host_page_size();
    QOMEM_ASSERT(shm_base % page == 0 && shm_window_size % page == 0 &&
                     u128(shm_base) + shm_window_size <= u128_2_64,
                 "virtio-mmio: a shared memory window of {:#x} bytes at {:#x} must be page aligned "
                 "and end by 2^64",
                 shm_window_size, shm_base);
    regs_ = make_io(*this, "virtio-mmio", register_size, ops_).get(); // our children hold them
    window_ = make_container(*this, "virtio-mmio-shm", shm_window_size).get();
    auto b = make<virtio_bus>();
    add_child("virtio-bus", *b);
    bus_ = b.get();
}

inline void virtio_mmio::place(virtio_shmem_device& dev) {
    const shmem_layout l = layout_shmem(dev);
    if (l.end > window_->size()) {
        std::string regions;
        for (const shmem_placement& p : l.regions)
            regions += fmt::format("{}shmid {} ({:#x} bytes)", regions.empty() ? "" : ", ", p.shmid,
                                   p.size);
        throw transport_error(fmt::format(
            "{} '{}': the shared memory regions of {} '{}' need {:#x} bytes, the "
            "window at {:#x} has {:#x}: {}",
            type().name, name(), dev.type().name, dev.name(), static_cast<std::uint64_t>(l.end),
            shm_base_, static_cast<std::uint64_t>(window_->size()), regions));
    }
    place_shmem(*window_, dev, l);
}

inline void virtio_mmio::plug(virtio_shmem_device& dev) {
    const bool was_realized = dev.realized();
    bus_->plug(dev); // asserts and rolls back by itself
    if (!realized()) return;
    try {
        place(dev);
    } catch (...) {
        ref_ptr<virtio_shmem_device> keep(&dev);
        if (!was_realized) dev.unrealize();
        dev.unplug_from_bus();
        throw;
    }
}

inline std::uint64_t virtio_mmio::read_register(hwaddr offset, unsigned size) {
    namespace reg = virtio_mmio_reg;
    if (offset >= reg::config) return 0; // the device configuration space is not modelled
    if (size != 4) {
        guest_error("wrong register read size", offset, size);
        return 0;
    }
    std::unique_lock<memory_system> writer;
    if (memory_system* sys = regs_->system()) writer = std::unique_lock<memory_system>(*sys);
    constexpr std::uint64_t absent = 0xffffffff;
    switch (offset) {
    case reg::magic_value:
        return magic;
    case reg::version:
        return version;
    case reg::vendor_id:
        return vendor;
    case reg::device_id: {
        const virtio_shmem_device* dev = bus_->device();
        return dev ? dev->virtio_id() : 0;
    }
    case reg::shm_len_low:
    case reg::shm_len_high: {
        const std::optional<shmem_placement> p = placed_shmem(*window_, shm_sel_);
        if (!p) return absent;
        return offset == reg::shm_len_low ? p->size & 0xffffffff : p->size >> 32;
    }
    case reg::shm_base_low:
    case reg::shm_base_high: {
        const std::optional<shmem_placement> p = placed_shmem(*window_, shm_sel_);
        if (!p) return absent;
        const std::uint64_t base = shm_base_ + p->offset; // within the window: no overflow
        return offset == reg::shm_base_low ? base & 0xffffffff : base >> 32;
    }
    case reg::shm_sel:
        guest_error("read of the write-only register SHMSel", offset, size);
        return 0;
    default:
        return 0; // not modelled
    }
}

inline void virtio_mmio::write_register(hwaddr offset, std::uint64_t value, unsigned size) {
    namespace reg = virtio_mmio_reg;
    if (offset >= reg::config) return;
    if (size != 4) {
        guest_error("wrong register write size", offset, size);
        return;
    }
    std::unique_lock<memory_system> writer;
    if (memory_system* sys = regs_->system()) writer = std::unique_lock<memory_system>(*sys);
    switch (offset) {
    case reg::shm_sel:
        shm_sel_ = static_cast<std::uint32_t>(value);
        return;
    case reg::magic_value:
    case reg::version:
    case reg::device_id:
    case reg::vendor_id:
    case reg::shm_len_low:
    case reg::shm_len_high:
    case reg::shm_base_low:
    case reg::shm_base_high:
        guest_error("write to a read-only register", offset, size);
        return;
    default:
        return; // not modelled
    }
}

} // namespace qomem
