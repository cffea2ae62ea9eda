// qomem/pci.hpp — a minimal conventional PCI bus, as far as a guest driver
// needs it to find a device's memory: functions with a 256-byte
// configuration space (a type 0 header, a capability list, memory BARs that
// the guest sizes and places), and a host bridge that exposes them through an
// ECAM window and puts their BARs in its PCI memory space.
//
//     auto host = qomem::make<qomem::pci_host_bridge>();           // bus "pci.0"
//     m.peripheral().add_child("pcie", *host);
//     sys->add_subregion(0x30000000, host->ecam());                // 1 MiB: bus 0
//     auto hole = qomem::make_alias(nullptr, "pci-hole", host->pci_memory(),
//                                   0x8000000000, 0x8000000000);
//     sys->add_subregion(0x8000000000, *hole);                     // BARs at their bus address
//     auto fn = qomem::make<my_function>();                        // a pci_device
//     fn->plug_into(host->bus());
//     m.peripheral().add_child("fn0", *fn);
//     host->realize(); fn->realize();                              // slot 0: 00:00.0
//     // The guest: ECAM reads find vendor/device and the capability list;
//     // writing all ones to a BAR and reading it back gives its size; writing
//     // an address and setting the command register's memory bit places it.
//
// What is modelled (QEMU's behaviour, from hw/pci/pci.c and pci_host.c):
//  * the read-only identity (vendor, device, revision, class, subsystem), a
//    header type 0, the interrupt pin 0;
//  * writable bits as QEMU's defaults: command (I/O, memory, bus master,
//    INTx disable), cache line size, interrupt line, and the address bits of
//    each registered BAR (a BAR reads back ~(size - 1) after all ones are
//    written; an unregistered BAR reads 0 whatever is written);
//  * memory BARs, 32- or 64-bit, prefetchable or not, mapped into the host
//    bridge's PCI memory (at priority 1, so BARs may overlap, as in QEMU)
//    while the command register's memory bit is set and the address is
//    valid: not 0, not wrapping, not ending at 2^64 - 1 (a BAR being sized),
//    a 32-bit BAR ending below 4 GiB;
//  * the capability list (status bit 4, pointer at 0x34), from 0x40;
//  * ECAM: bus << 20 | devfn << 12 | register, accesses of 1, 2 or 4
//    naturally aligned bytes (others answer a decode error); an absent
//    function, a register past 0xff and a bus without devices read all ones
//    and ignore writes.
// Left out: I/O BARs and the expansion ROM BAR, PCI-to-PCI bridges (one bus,
// number 0), a host bridge function at 00.0, the status register's
// write-1-to-clear bits, interrupts (INTx, MSI, MSI-X), the PCI Express
// extended configuration space (0x100-0xfff reads all ones), the legacy
// 0xcf8/0xcfc mechanism, the rule that hides functions 1-7 without function 0,
// and config-space access from the device's own side (bus mastering, DMA).
// A bus may sit behind an IOMMU (pci_bus::set_iommu): its functions then
// master DMA into the per-devfn address spaces the IOMMU model gives
// (pci_device_iommu_address_space; iommu.hpp).
//
// Threads: configuration accesses (the ECAM handler, config_read,
// config_write) take the writer role of the PCI memory's memory system, as
// QEMU's run under its big lock; realize and unrealize run where the caller
// runs them, like every topology change.
#pragma once

#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <fmt/core.h>

#include <qomem/assert.hpp>
#include <qomem/device.hpp>
#include <qomem/fwd.hpp>
#include <qomem/log.hpp>
#include <qomem/memory_ops.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/memory_system.hpp>
#include <qomem/object.hpp>
#include <qomem/types.hpp>

namespace qomem {

/// Offsets and bits of the type 0 configuration header that this model uses.
namespace pci_config {
inline constexpr std::uint32_t size = 256; ///< conventional configuration space
inline constexpr std::uint32_t vendor_id = 0x00;
inline constexpr std::uint32_t device_id = 0x02;
inline constexpr std::uint32_t command = 0x04;
inline constexpr std::uint32_t status = 0x06;
inline constexpr std::uint32_t revision_id = 0x08;
inline constexpr std::uint32_t class_prog = 0x09; ///< then subclass (0x0a), class (0x0b)
inline constexpr std::uint32_t cache_line_size = 0x0c;
inline constexpr std::uint32_t header_type = 0x0e;
inline constexpr std::uint32_t bar0 = 0x10; ///< BAR n at bar0 + 4 n
inline constexpr std::uint32_t subsystem_vendor_id = 0x2c;
inline constexpr std::uint32_t subsystem_id = 0x2e;
inline constexpr std::uint32_t capability_list = 0x34;
inline constexpr std::uint32_t interrupt_line = 0x3c;
inline constexpr std::uint32_t first_capability = 0x40; ///< where the list starts here

inline constexpr std::uint16_t command_io = 0x1;
inline constexpr std::uint16_t command_memory = 0x2;
inline constexpr std::uint16_t command_master = 0x4;
inline constexpr std::uint16_t command_intx_disable = 0x400;
inline constexpr std::uint16_t status_cap_list = 0x10;

inline constexpr std::uint32_t bar_mem_type_64 = 0x4;
inline constexpr std::uint32_t bar_mem_prefetch = 0x8;
inline constexpr std::uint32_t bar_type_mask = 0xf; ///< the low bits of a memory BAR

inline constexpr std::uint8_t cap_id_vendor = 0x09; ///< PCI_CAP_ID_VNDR
} // namespace pci_config

/// The identity of a PCI function: the read-only fields of its header.
struct pci_ids {
    std::uint16_t vendor = 0xffff;
    std::uint16_t device = 0xffff;
    std::uint8_t revision = 0;
    std::uint32_t class_code = 0xff0000; ///< class << 16 | subclass << 8 | prog-if
    std::uint16_t subsystem_vendor = 0;
    std::uint16_t subsystem = 0;
};

/// What a memory BAR is: its type bits (bits 0-3 of the BAR).
enum class pci_bar_type : std::uint8_t {
    mem32 = 0x0,
    mem64 = 0x4,
    mem32_prefetch = 0x8,
    mem64_prefetch = 0xc,
};

/// One capability: its ID and the bytes after its two-byte header (ID, next).
struct pci_capability {
    std::uint8_t id;
    std::vector<std::uint8_t> body;
};

class pci_device;

/// A PCI bus: the devices plugged into it, by devfn, and the PCI memory
/// space their BARs are mapped into (its host bridge's).
class pci_bus : public bus {
    QOMEM_OBJECT(pci_bus, "PCI", bus)
public:
    /// `memory` is where the BARs of the bus's devices go; it must outlive
    /// the bus (the host bridge owns both).
    explicit pci_bus(memory_region& memory) : memory_(&memory) {}

    memory_region& memory() const noexcept { return *memory_; }

    /// The realized function at `devfn`, or null.
    pci_device* find(std::uint8_t devfn) const noexcept;

    /// Gives the address space a function at `devfn` of `bus` masters DMA
    /// into: an IOMMU model's per-device address space (iommu.hpp).
    using iommu_fn = std::function<address_space&(pci_bus& bus, std::uint8_t devfn)>;
    /// Puts the bus behind an IOMMU (QEMU's pci_setup_iommu): from now on
    /// pci_device_iommu_address_space asks `fn`; an empty `fn` takes the
    /// bus from behind it. Requires: the spaces `fn` gives outlive their use
    /// (the IOMMU model owns them, as intel-iommu its per-devfn spaces).
    /// Effects: replaces the previous function; takes no references.
    /// Complexity: O(1). Throws: nothing.
    void set_iommu(iommu_fn fn) noexcept { iommu_ = std::move(fn); }
    bool has_iommu() const noexcept { return static_cast<bool>(iommu_); }
    /// `fn`'s space for `devfn`, or null when the bus has no IOMMU.
    address_space* iommu_address_space(std::uint8_t devfn) {
        return iommu_ ? &iommu_(*this, devfn) : nullptr;
    }

private:
    memory_region* memory_;
    iommu_fn iommu_;
};

/// A PCI function. Subclasses set their identity and register BARs and
/// capabilities (before or during realize); the guest reads and writes the
/// configuration space through its host bridge.
class pci_device : public device {
    QOMEM_OBJECT(pci_device, "pci-device", device)
public:
    static constexpr unsigned bar_count = 6;

    pci_device() noexcept { init_header(); }

    /// devfn = slot << 3 | function: set, or assigned at realize; empty
    /// before realize unless set.
    std::optional<std::uint8_t> devfn() const noexcept { return devfn_; }
    /// Places the function at `devfn` (QEMU's `addr` property).
    /// Requires (asserted): not realized. Effects: none until realize.
    /// Complexity: O(1). Throws: nothing else.
    void set_devfn(std::uint8_t devfn) {
        QOMEM_ASSERT(!realized(), "{} '{}': set_devfn({:#x}) after realize", type().name, name(),
                     devfn);
        devfn_ = devfn;
        devfn_chosen_ = true;
    }

    /// The bus it is plugged into, if a PCI bus.
    pci_bus* pci_parent_bus() const noexcept { return dynamic_cast_to<pci_bus>(parent_bus()); }

    /// Reads `len` (1, 2 or 4) bytes of the configuration space at `addr`,
    /// little-endian. Requires (asserted): addr + len <= 256. Takes the
    /// writer role of the bus's memory system. Throws: nothing else.
    std::uint32_t config_read(std::uint32_t addr, unsigned len);

    /// Writes `len` (1, 2 or 4) bytes at `addr`: each bit lands only where
    /// the function makes it writable; a write touching the command register
    /// or a BAR maps, moves or unmaps BARs in the bus's PCI memory.
    /// Requires (asserted): addr + len <= 256, plugged into a pci_bus.
    /// Effects: a BAR mapped takes a reference to its region (held by the
    /// PCI memory container); one unmapped drops it.
    /// Complexity: O(BARs) plus a commit per BAR that moved.
    /// Throws: nothing else (takes the writer role of the bus's memory system).
    void config_write(std::uint32_t addr, std::uint32_t value, unsigned len);

    /// Where BAR `index` is mapped in the bus's PCI memory now, if it is.
    std::optional<hwaddr> bar_address(unsigned index) const noexcept {
        return index < bar_count ? bars_[index].mapped : std::nullopt;
    }
    /// The region of BAR `index`, or null if none is registered there.
    memory_region* bar_region(unsigned index) const noexcept {
        return index < bar_count ? bars_[index].hold.get() : nullptr;
    }

protected:
    ~pci_device() override = default;

    /// Sets the read-only identity. Requires (asserted): not realized.
    /// Effects: header bytes only. Complexity: O(1). Throws: nothing.
    void set_ids(const pci_ids& ids);

    /// Registers `mr` as memory BAR `index` (QEMU's pci_register_bar).
    /// Requires (asserted): not realized; index < 6 (< 5 for 64-bit, which
    /// also takes index + 1); those slots free; mr's size a power of two of
    /// at least 16 bytes (at most 2^31 for a 32-bit BAR, 2^63 for 64-bit).
    /// Effects: takes a memory_region_ref on `mr`, held until do_unrealize
    /// drops it; the BAR's address bits become writable. Nothing is mapped
    /// until the guest places the BAR and enables memory decoding.
    /// Complexity: O(1). Throws: nothing else.
    void register_bar(unsigned index, memory_region& mr, pci_bar_type type);

    /// Lays out the capability list: `caps` in order from 0x40, each at a
    /// dword boundary, the status bit and the pointer at 0x34 set (both
    /// cleared when `caps` is empty); bytes of the old list are zeroed.
    /// Requires (asserted): they fit below 0x100 (see capabilities_fit).
    /// Complexity: O(bytes). Throws: nothing else.
    void set_capabilities(std::span<const pci_capability> caps);
    /// Whether `caps` fit in the configuration space.
    static bool capabilities_fit(std::span<const pci_capability> caps) noexcept {
        return capability_end(caps) <= pci_config::size;
    }

    /// The function's own configuration reads and writes (QEMU's
    /// PCIDeviceClass::config_read / config_write); the defaults read the
    /// image and apply the writable masks, then remap BARs. Called with the
    /// writer role held and arguments checked.
    inline virtual std::uint32_t do_config_read(std::uint32_t addr, unsigned len);
    inline virtual void do_config_write(std::uint32_t addr, std::uint32_t value, unsigned len);

    /// Realize: requires (asserted) a pci_bus parent bus and a devfn free on
    /// it (the first free slot, function 0, when none was set). Subclasses
    /// that override it call it.
    inline void do_realize() override;
    /// Unrealize: unmaps every BAR, forgets the registrations (dropping their
    /// references, which may finalize their regions), clears the BARs and the
    /// command register. Subclasses that override it call it.
    inline void do_unrealize() noexcept override;

private:
    struct bar {
        region_ref hold; ///< the registered region
        pci_bar_type type = pci_bar_type::mem32;
        std::optional<hwaddr> mapped;
    };

    void init_header() noexcept;
    /// Where BAR `index` should be now (QEMU's pci_bar_address rules).
    std::optional<hwaddr> wanted_address(unsigned index) const noexcept;
    void update_mappings();
    void unmap_bar(bar& b) noexcept;
    std::unique_lock<memory_system> hold_writer() const;
    static std::uint32_t capability_end(std::span<const pci_capability> caps) noexcept;
    std::uint16_t get16(std::uint32_t at) const noexcept {
        return static_cast<std::uint16_t>(config_[at] | config_[at + 1] << 8);
    }
    void put8(std::uint32_t at, std::uint8_t v) noexcept { config_[at] = v; }
    void put16(std::uint32_t at, std::uint16_t v) noexcept {
        config_[at] = static_cast<std::uint8_t>(v);
        config_[at + 1] = static_cast<std::uint8_t>(v >> 8);
    }
    void put32(std::uint32_t at, std::uint32_t v) noexcept {
        for (unsigned i = 0; i < 4; ++i) config_[at + i] = static_cast<std::uint8_t>(v >> (8 * i));
    }
    std::uint32_t get32(std::uint32_t at) const noexcept {
        std::uint32_t v = 0;
        for (unsigned i = 0; i < 4; ++i) v |= std::uint32_t(config_[at + i]) << (8 * i);
        return v;
    }

    std::array<std::uint8_t, pci_config::size> config_{};
    std::array<std::uint8_t, pci_config::size> wmask_{};
    std::array<bar, bar_count> bars_{};
    std::optional<std::uint8_t> devfn_;
    bool devfn_chosen_ = false; // set_devfn, not assigned at realize
    std::uint32_t caps_end_ = pci_config::first_capability;
};

/// A PCI host bridge with an ECAM window and a PCI memory space (QEMU's
/// generic "gpex" host, reduced to what is modelled here). Its child bus is
/// "pci.0"; its regions are "pcie-ecam" (1 MiB per bus) and "pci-memory"
/// (2^64, where BARs go: the board aliases windows of it into the system).
class pci_host_bridge : public device {
    QOMEM_OBJECT(pci_host_bridge, "pci-host-ecam", device)
public:
    /// `buses`: how many buses the ECAM window decodes (1 MiB each); only
    /// bus 0 has devices. Requires (asserted): 1 to 256.
    explicit pci_host_bridge(unsigned buses = 1);

    pci_bus& bus() const noexcept { return *bus_; }
    /// The ECAM window, for the board to place (an MMIO region owned by the bridge).
    memory_region& ecam() const noexcept { return *ecam_; }
    /// The PCI memory space (a container owned by the bridge).
    memory_region& pci_memory() const noexcept { return *memory_; }

protected:
    ~pci_host_bridge() override = default;
    /// Takes the ECAM window out of its container (unplug of the bridge).
    void do_unrealize() noexcept override {
        if (memory_region* c = ecam_->container()) c->del_subregion(*ecam_);
    }

private:
    struct ecam_ops {
        static constexpr access_limits valid{.min_access_size = 1, .max_access_size = 4};
        pci_host_bridge* host;
        std::uint64_t read(hwaddr offset, unsigned size);
        void write(hwaddr offset, std::uint64_t value, unsigned size);
    };
    /// The function an ECAM offset addresses, and its register; null when
    /// absent (all ones).
    pci_device* decode(hwaddr offset, std::uint32_t& reg) const noexcept;

    ecam_ops ops_{this};
    pci_bus* bus_ = nullptr;
    memory_region* ecam_ = nullptr;
    memory_region* memory_ = nullptr;
};

/// QEMU's pci_device_iommu_address_space: the address space function `d`
/// masters DMA into — its bus's IOMMU's per-device space for its devfn —
/// or null when the bus has no IOMMU (DMA then goes to the system memory,
/// whose address space the board names: QEMU's address_space_memory).
/// Requires (asserted): `d` is on a PCI bus and realized (has a devfn).
/// Throws: what the bus's iommu_fn throws.
inline address_space* pci_device_iommu_address_space(pci_device& d) {
    pci_bus* bus = d.pci_parent_bus();
    QOMEM_ASSERT(bus && d.devfn(),
                 "pci_device_iommu_address_space: {} '{}' is not on a PCI bus "
                 "with a devfn",
                 d.type().name, d.name());
    return bus->iommu_address_space(*d.devfn());
}

// ---- implementation ---------------------------------------------------------------------

inline pci_device* pci_bus::find(std::uint8_t devfn) const noexcept {
    pci_device* found = nullptr;
    for_each_link([&](std::string_view, object* target, link_strength) {
        if (auto* d = dynamic_cast_to<pci_device>(target);
            d && d->realized() && d->devfn() == devfn)
            found = d;
    });
    return found;
}

inline void pci_device::init_header() noexcept {
    set_ids(pci_ids{});
    // QEMU's default writable bits (pci_init_wmask).
    const std::uint16_t cmd = pci_config::command_io | pci_config::command_memory |
                              pci_config::command_master | pci_config::command_intx_disable;
    wmask_[pci_config::command] = static_cast<std::uint8_t>(cmd);
    wmask_[pci_config::command + 1] = static_cast<std::uint8_t>(cmd >> 8);
    wmask_[pci_config::cache_line_size] = 0xff;
    wmask_[pci_config::interrupt_line] = 0xff;
}

inline void pci_device::set_ids(const pci_ids& ids) {
    QOMEM_ASSERT(!realized(), "{} '{}': set_ids after realize", type().name, name());
    put16(pci_config::vendor_id, ids.vendor);
    put16(pci_config::device_id, ids.device);
    put8(pci_config::revision_id, ids.revision);
    put8(pci_config::class_prog, static_cast<std::uint8_t>(ids.class_code));
    put8(pci_config::class_prog + 1, static_cast<std::uint8_t>(ids.class_code >> 8));
    put8(pci_config::class_prog + 2, static_cast<std::uint8_t>(ids.class_code >> 16));
    put8(pci_config::header_type, 0);
    put16(pci_config::subsystem_vendor_id, ids.subsystem_vendor);
    put16(pci_config::subsystem_id, ids.subsystem);
}

inline void pci_device::register_bar(unsigned index, memory_region& mr, pci_bar_type type) {
    const bool is64 = static_cast<std::uint32_t>(type) & pci_config::bar_mem_type_64;
    const u128 size = mr.size();
    QOMEM_ASSERT(!realized(), "{} '{}': register_bar({}) after realize", this->type().name, name(),
                 index);
    QOMEM_ASSERT(index < bar_count && (!is64 || index + 1 < bar_count),
                 "{} '{}': BAR {} does not exist for a {}-bit BAR", this->type().name, name(),
                 index, is64 ? 64 : 32);
    QOMEM_ASSERT(
        !bars_[index].hold && (!is64 || !bars_[index + 1].hold) &&
            !(index > 0 && bars_[index - 1].hold &&
              (static_cast<std::uint32_t>(bars_[index - 1].type) & pci_config::bar_mem_type_64)),
        "{} '{}': BAR {} is already taken", this->type().name, name(), index);
    QOMEM_ASSERT(
        size >= 16 && (size & (size - 1)) == 0 && size <= (is64 ? u128(1) << 63 : u128(1) << 31),
        "{} '{}': BAR {} region '{}' has size {:#x}, not a power of two between 16 and 2^{}",
        this->type().name, name(), index, mr.region_name(), static_cast<std::uint64_t>(size),
        is64 ? 63 : 31);
    bar& b = bars_[index];
    b.hold = region_ref(mr);
    b.type = type;
    b.mapped.reset();
    const std::uint64_t addr_mask = ~(static_cast<std::uint64_t>(size) - 1);
    const std::uint32_t at = pci_config::bar0 + 4 * index;
    put32(at, static_cast<std::uint32_t>(type));
    const auto low = static_cast<std::uint32_t>(addr_mask) & ~pci_config::bar_type_mask;
    for (unsigned i = 0; i < 4; ++i) wmask_[at + i] = static_cast<std::uint8_t>(low >> (8 * i));
    if (is64) {
        put32(at + 4, 0);
        const auto high = static_cast<std::uint32_t>(addr_mask >> 32);
        for (unsigned i = 0; i < 4; ++i)
            wmask_[at + 4 + i] = static_cast<std::uint8_t>(high >> (8 * i));
    }
}

inline std::uint32_t pci_device::capability_end(std::span<const pci_capability> caps) noexcept {
    std::uint32_t at = pci_config::first_capability;
    for (const pci_capability& c : caps)
        at += (2 + static_cast<std::uint32_t>(c.body.size()) + 3) & ~3u;
    return at;
}

inline void pci_device::set_capabilities(std::span<const pci_capability> caps) {
    QOMEM_ASSERT(capabilities_fit(caps),
                 "{} '{}': {} capabilities need {:#x} bytes of configuration space, "
                 "past its end",
                 type().name, name(), caps.size(), capability_end(caps));
    for (std::uint32_t i = pci_config::first_capability; i < caps_end_; ++i) config_[i] = 0;
    std::uint32_t at = pci_config::first_capability;
    for (std::size_t k = 0; k < caps.size(); ++k) {
        const pci_capability& c = caps[k];
        const std::uint32_t next = (at + 2 + static_cast<std::uint32_t>(c.body.size()) + 3) & ~3u;
        config_[at] = c.id;
        config_[at + 1] = k + 1 < caps.size() ? static_cast<std::uint8_t>(next) : 0;
        for (std::size_t i = 0; i < c.body.size(); ++i) config_[at + 2 + i] = c.body[i];
        at = next;
    }
    caps_end_ = at;
    const std::uint16_t status = get16(pci_config::status);
    put16(pci_config::status, caps.empty() ? status & ~pci_config::status_cap_list
                                           : status | pci_config::status_cap_list);
    put8(pci_config::capability_list,
         caps.empty() ? 0 : static_cast<std::uint8_t>(pci_config::first_capability));
}

inline std::unique_lock<memory_system> pci_device::hold_writer() const {
    const pci_bus* b = pci_parent_bus();
    memory_system* sys = b ? b->memory().system() : nullptr;
    return sys ? std::unique_lock<memory_system>(*sys) : std::unique_lock<memory_system>();
}

inline std::uint32_t pci_device::config_read(std::uint32_t addr, unsigned len) {
    QOMEM_ASSERT(
        (len == 1 || len == 2 || len == 4) && addr < pci_config::size &&
            len <= pci_config::size - addr,
        "{} '{}': config read of {} bytes at {:#x}, outside the 256-byte configuration space",
        type().name, name(), len, addr);
    const auto writer = hold_writer();
    return do_config_read(addr, len);
}

inline void pci_device::config_write(std::uint32_t addr, std::uint32_t value, unsigned len) {
    QOMEM_ASSERT(
        (len == 1 || len == 2 || len == 4) && addr < pci_config::size &&
            len <= pci_config::size - addr,
        "{} '{}': config write of {} bytes at {:#x}, outside the 256-byte configuration space",
        type().name, name(), len, addr);
    QOMEM_ASSERT(pci_parent_bus(), "{} '{}': config write while not on a PCI bus", type().name,
                 name());
    const auto writer = hold_writer();
    do_config_write(addr, value, len);
}

inline std::uint32_t pci_device::do_config_read(std::uint32_t addr, unsigned len) {
    std::uint32_t v = 0;
    for (unsigned i = 0; i < len; ++i) v |= std::uint32_t(config_[addr + i]) << (8 * i);
    return v;
}

inline void pci_device::do_config_write(std::uint32_t addr, std::uint32_t value, unsigned len) {
    for (unsigned i = 0; i < len; ++i) {
        const std::uint32_t a = addr + i;
        const auto v = static_cast<std::uint8_t>(value >> (8 * i));
        config_[a] = static_cast<std::uint8_t>((config_[a] & ~wmask_[a]) | (v & wmask_[a]));
    }
    const auto touches = [&](std::uint32_t from, std::uint32_t n) {
        return addr < from + n && from < addr + len;
    };
    if (touches(pci_config::bar0, 4 * bar_count) || touches(pci_config::command, 1))
        update_mappings();
}

inline std::optional<hwaddr> pci_device::wanted_address(unsigned index) const noexcept {
    const bar& b = bars_[index];
    if (!b.hold || !(get16(pci_config::command) & pci_config::command_memory)) return std::nullopt;
    const bool is64 = static_cast<std::uint32_t>(b.type) & pci_config::bar_mem_type_64;
    const std::uint32_t at = pci_config::bar0 + 4 * index;
    std::uint64_t addr = get32(at);
    if (is64) addr |= std::uint64_t(get32(at + 4)) << 32;
    const auto size = static_cast<std::uint64_t>(b.hold->size());
    addr &= ~(size - 1);
    const std::uint64_t last = addr + (size - 1);
    // QEMU's rules: no wrap, not the all-ones address of a BAR being sized,
    // not address 0, and a 32-bit BAR wholly below 4 GiB - 1.
    if (last <= addr || last == ~std::uint64_t(0) || addr == 0) return std::nullopt;
    if (!is64 && last >= 0xffffffffu) return std::nullopt;
    return addr;
}

inline void pci_device::unmap_bar(bar& b) noexcept {
    if (!b.mapped) return;
    b.mapped.reset();
    if (memory_region* c = b.hold->container()) c->del_subregion(*b.hold);
}

inline void pci_device::update_mappings() {
    pci_bus* bus = pci_parent_bus();
    if (!bus || !realized()) return;
    for (unsigned i = 0; i < bar_count; ++i) {
        bar& b = bars_[i];
        if (!b.hold) continue;
        const std::optional<hwaddr> want = wanted_address(i);
        if (want == b.mapped) continue;
        unmap_bar(b);
        if (want) {
            bus->memory().add_subregion(*want, *b.hold, 1);
            b.mapped = want;
        }
    }
}

inline void pci_device::do_realize() {
    pci_bus* bus = pci_parent_bus();
    QOMEM_ASSERT(bus, "{} '{}': realize without a PCI bus (plug it into one first)", type().name,
                 name());
    if (devfn_chosen_) {
        const pci_device* other = bus->find(*devfn_);
        QOMEM_ASSERT(!other, "{} '{}': PCI slot {} function {} is already taken by {} '{}'",
                     type().name, name(), *devfn_ >> 3, *devfn_ & 7,
                     other ? other->type().name : "", other ? other->name() : "");
    } else {
        std::optional<std::uint8_t> free;
        for (unsigned slot = 0; slot < 32 && !free; ++slot)
            if (!bus->find(static_cast<std::uint8_t>(slot << 3)))
                free = static_cast<std::uint8_t>(slot << 3);
        QOMEM_ASSERT(free, "{} '{}': every slot of the PCI bus is taken", type().name, name());
        devfn_ = free;
    }
}

inline void pci_device::do_unrealize() noexcept {
    for (unsigned i = 0; i < bar_count; ++i) {
        bar& b = bars_[i];
        if (!b.hold) continue;
        unmap_bar(b);
        const std::uint32_t at = pci_config::bar0 + 4 * i;
        for (unsigned k = 0; k < 4; ++k) config_[at + k] = wmask_[at + k] = 0;
        b.hold.reset(); // may finalize the region
    }
    put16(pci_config::command, 0);
    if (!devfn_chosen_) devfn_.reset();
}

inline pci_host_bridge::pci_host_bridge(unsigned buses) {
    QOMEM_ASSERT(buses >= 1 && buses <= 256, "pci_host_bridge: {} buses (1 to 256)", buses);
    memory_ = make_container(*this, "pci-memory", u128_2_64).get(); // our child holds it
    ecam_ = make_io(*this, "pcie-ecam", u128(buses) << 20, ops_).get();
    auto b = make<pci_bus>(*memory_);
    add_child("pci.0", *b);
    bus_ = b.get();
}

inline pci_device* pci_host_bridge::decode(hwaddr offset, std::uint32_t& reg) const noexcept {
    const hwaddr bus_number = offset >> 20;
    reg = static_cast<std::uint32_t>(offset & 0xfff);
    if (bus_number != 0 || reg >= pci_config::size) return nullptr;
    return bus_->find(static_cast<std::uint8_t>((offset >> 12) & 0xff));
}

inline std::uint64_t pci_host_bridge::ecam_ops::read(hwaddr offset, unsigned size) {
    std::uint32_t reg = 0;
    // Looked up under the writer role: plugging and unplugging run under it.
    std::unique_lock<memory_system> writer;
    if (memory_system* sys = host->ecam_->system()) writer = std::unique_lock<memory_system>(*sys);
    if (pci_device* d = host->decode(offset, reg)) return d->config_read(reg, size);
    return ~std::uint64_t(0); // no function there: all ones, as QEMU
}

inline void pci_host_bridge::ecam_ops::write(hwaddr offset, std::uint64_t value, unsigned size) {
    std::uint32_t reg = 0;
    std::unique_lock<memory_system> writer;
    if (memory_system* sys = host->ecam_->system()) writer = std::unique_lock<memory_system>(*sys);
    if (pci_device* d = host->decode(offset, reg))
        d->config_write(reg, static_cast<std::uint32_t>(value), size);
}

} // namespace qomem
