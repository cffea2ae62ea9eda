// examples/nic_unplug_scenario.hpp — the machine and the steps of the NIC
// hot-unplug story, shared by examples/nic_unplug.cpp (which narrates them)
// and tests/nic_unplug_test.cpp (which pins what they do), so both run one
// copy of the scenario.
//
// The machine (address space "memory", root region "system", ownerless, a
// child of /machine/unattached):
//
//     0x0000_0000  ram       64 KiB   RAM, ownerless
//     0xfe00_0000  nic-bar   8 KiB    the NIC's container, placed by map_region:
//                  +0x0000   nic-mmio   MMIO: ID, DOORBELL, PACKETS
//                  +0x1000   nic-ring   RAM: the descriptor ring
//
// /machine/peripheral/nic0 (a demo-nic) owns those three regions and two
// more: nic-dma-root, the root of an address space of its own ("nic-dma",
// QEMU's bus-master address space in miniature), with nic-ring-alias showing
// its ring at address 0 in it. Through that address space it maps its own
// descriptor ring for as long as it is realized (self-DMA).
// /machine/peripheral/disk0 (a demo-disk-ctrl) reads a packet out of the
// NIC's ring by DMA (peer to peer) and keeps that mapping in flight across
// the NIC's hot-unplug. The machine is the hotplug handler of both devices,
// without a guest handshake: device_del completes at once.
#pragma once

#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/core.h>

#include <qomem/address_space.hpp>
#include <qomem/device.hpp>
#include <qomem/hotplug.hpp>
#include <qomem/machine.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/object.hpp>
#include <qomem/rcu.hpp>
#include <qomem/reference_graph.hpp>

namespace nic_demo {

using qomem::hwaddr;

constexpr hwaddr ram_base = 0x0000'0000;
constexpr hwaddr nic_base = 0xfe00'0000;
constexpr hwaddr ring_offset = 0x1000; // in nic-bar
constexpr hwaddr ring_size = 0x1000;

/// The NIC's registers (a qomem::MemoryRegionOps type).
struct nic_registers {
    static constexpr hwaddr id = 0x0;       ///< read: nic_id
    static constexpr hwaddr doorbell = 0x4; ///< write: a descriptor is ready at the ring's start
    static constexpr hwaddr packets = 0x8;  ///< read: packets sent so far
    static constexpr std::uint32_t nic_id = 0x4e494330; // "NIC0"

    static constexpr qomem::access_limits valid{.min_access_size = 4, .max_access_size = 4};
    static constexpr qomem::access_limits impl{.min_access_size = 4, .max_access_size = 4};
    static constexpr qomem::endianness endian = qomem::endianness::little;

    std::function<void()> on_doorbell; ///< the NIC's transmit step
    std::uint32_t sent = 0;

    std::uint64_t read(hwaddr offset, unsigned /*size*/) {
        if (offset == id) return nic_id;
        if (offset == packets) return sent;
        return 0;
    }
    void write(hwaddr offset, std::uint64_t /*value*/, unsigned /*size*/) {
        if (offset == doorbell && on_doorbell) on_doorbell();
    }
};

/// The NIC. Its regions are its children; it keeps plain pointers to them
/// (a ref_ptr member would be a reference to its own region: a cycle, since
/// an unparented region holds its owner). The registers' callbacks live in
/// the NIC: regions are always finalized before their owner, so they stay
/// valid for as long as any region can call them.
class nic : public qomem::device {
    QOMEM_OBJECT(nic, "demo-nic", qomem::device)
public:
    /// `system` is where the NIC's BAR is placed; it must outlive the NIC's
    /// realized life.
    explicit nic(qomem::memory_region& system) : system_(&system) {
        regs_.on_doorbell = [this] { transmit(); };
    }

    qomem::memory_region* bar() const noexcept { return bar_; }
    qomem::memory_region* mmio() const noexcept { return mmio_; }
    qomem::memory_region* ring() const noexcept { return ring_; }
    /// The NIC's own address space (while realized).
    const qomem::address_space* dma_space() const noexcept { return dma_as_ ? &*dma_as_ : nullptr; }
    /// Its mapping of its own descriptor ring (while realized).
    const qomem::dma_mapping& ring_mapping() const noexcept { return ring_map_; }
    /// The last descriptor it transmitted, as read through its self-DMA mapping.
    const std::string& last_sent() const noexcept { return last_sent_; }

protected:
    void do_realize() override {
        auto bar = qomem::make_container(*this, "nic-bar", 0x2000);
        auto mmio = qomem::make_io(*this, "nic-mmio", 0x100, regs_);
        auto ring = qomem::make_ram(*this, "nic-ring", ring_size);
        // A container and its subregions with the same owner: the container
        // holds the subregions themselves, never the NIC.
        bar->add_subregion(0, *mmio);
        bar->add_subregion(ring_offset, *ring);
        // In the guest's view until unrealize (QEMU: a PCI BAR's registration).
        map_region(*system_, nic_base, *bar);
        // The NIC's own view for its DMA engine (QEMU's bus-master address
        // space, in miniature): its ring at address 0, through an alias.
        auto dma_root = qomem::make_container(*this, "nic-dma-root", 0x10000);
        auto ring_alias = qomem::make_alias(*this, "nic-ring-alias", *ring, 0, ring_size);
        dma_root->add_subregion(0, *ring_alias);
        bar_ = bar.get();
        mmio_ = mmio.get();
        ring_ = ring.get();
        // An address space rooted in our own region holds that region; the
        // self-DMA mapping holds the ring. Both end in do_unrealize.
        dma_as_.emplace(*dma_root, "nic-dma");
        ring_map_ = dma_as_->map(0, ring_size, /*is_write=*/false);
    }
    void do_unrealize() noexcept override {
        // Once unparented, each of our regions holds us: a reference of ours
        // to one of them kept past this point would be a cycle (us → the
        // address space → nic-bar → us; us → the mapping → nic-ring → us).
        if (ring_map_) dma_as_->unmap(ring_map_, 0);
        dma_as_.reset();
    }

private:
    void transmit() {
        const std::byte* d = ring_map_.data();
        last_sent_.assign(reinterpret_cast<const char*>(d),
                          strnlen(reinterpret_cast<const char*>(d), 64));
        ++regs_.sent;
    }

    nic_registers regs_;
    qomem::memory_region* system_;
    qomem::memory_region* bar_ = nullptr;
    qomem::memory_region* mmio_ = nullptr;
    qomem::memory_region* ring_ = nullptr;
    std::optional<qomem::address_space> dma_as_;
    qomem::dma_mapping ring_map_;
    std::string last_sent_;
};

/// A disk controller that DMAs a packet out of another device's memory
/// (peer to peer) and holds the mapping until the transfer completes, or
/// until it is unrealized.
class disk_controller : public qomem::device {
    QOMEM_OBJECT(disk_controller, "demo-disk-ctrl", qomem::device)
public:
    disk_controller() = default;

    /// Maps [addr, addr + len) of `as` for reading. Returns false when
    /// nothing directly mappable is there.
    bool start_dma(qomem::address_space& as, hwaddr addr, hwaddr len) {
        as_ = &as;
        dma_ = as.map(addr, len, /*is_write=*/false);
        return static_cast<bool>(dma_);
    }
    const qomem::dma_mapping& in_flight() const noexcept { return dma_; }
    /// The transfer completes: returns the text it read, and unmaps (which
    /// may finalize the region mapped and, through it, its device).
    std::string complete_dma() {
        const auto* p = reinterpret_cast<const char*>(dma_.data());
        std::string got(p, strnlen(p, static_cast<std::size_t>(dma_.size())));
        as_->unmap(dma_, 0);
        return got;
    }

protected:
    void do_unrealize() noexcept override {
        if (dma_) as_->unmap(dma_, 0); // cancelled
    }

private:
    qomem::address_space* as_ = nullptr;
    qomem::dma_mapping dma_;
};

/// The machine: the hotplug handler of every device, without a guest
/// handshake (unplug_request returns false: device_del completes at once).
class demo_machine : public qomem::machine, public qomem::hotplug_handler {
    QOMEM_OBJECT(demo_machine, "demo-machine", qomem::machine, qomem::hotplug_handler)
public:
    demo_machine() = default;
    qomem::hotplug_handler* get_hotplug_handler(qomem::device&) override { return this; }
};

/// How the story names an object: a region by its name, a device by its id,
/// anything else by its property name ("/" for the root).
inline std::string label(const qomem::object& obj) {
    if (const auto* r = qomem::dynamic_cast_to<qomem::memory_region>(&obj)) return r->region_name();
    if (const auto* d = qomem::dynamic_cast_to<qomem::device>(&obj); d && !d->id().empty()) return d->id();
    if (obj.parent()) return std::string(obj.name());
    return std::string(obj.type().name) == "container" ? "/" : std::string(obj.type().name);
}

/// Records every finalization as it happens (and every unparent), and hands
/// each to a callback: the example prints them, the test checks their order.
/// Installed for its lifetime.
class event_trace final : public qomem::lifetime_observer {
public:
    struct event {
        bool finalizing = false; ///< false: unparenting
        std::string label;
        std::string type;
        std::string parent;      ///< unparenting: the parent's label
        std::string owner;       ///< finalizing a region: its owner's label ("" if none)
        const qomem::object* obj = nullptr; ///< valid during the callback only
    };

    explicit event_trace(std::function<void(const event&)> on_event = {})
        : on_event_(std::move(on_event)), previous_(qomem::set_lifetime_observer(this)) {}
    ~event_trace() { qomem::set_lifetime_observer(previous_); }
    event_trace(const event_trace&) = delete;
    event_trace& operator=(const event_trace&) = delete;

    void finalizing(const qomem::object& obj) noexcept override {
        event e;
        e.finalizing = true;
        e.obj = &obj;
        try {
            // Its name from when it was unparented, unless that entry is of
            // an earlier object at the same address, already finalized.
            auto it = names_.find(&obj);
            e.label = it != names_.end() && !it->second.dying ? it->second.label : label(obj);
            e.type = std::string(obj.type().name);
            // Kept while it releases its children: they name it as their parent.
            names_.insert_or_assign(&obj, name{e.label, true});
            if (const auto* r = qomem::dynamic_cast_to<qomem::memory_region>(&obj); r && r->owner())
                e.owner = name_of(*r->owner());
        } catch (...) {
        }
        emit(std::move(e));
    }
    void unparenting(const qomem::object& child, const qomem::object& parent) noexcept override {
        event e;
        e.obj = &child;
        try {
            // Named now, while its parent is still set.
            e.label = label(child);
            e.type = std::string(child.type().name);
            names_.insert_or_assign(&child, name{e.label, false});
            e.parent = name_of(parent);
        } catch (...) {
        }
        emit(std::move(e));
    }

    /// The labels of the objects finalized so far, in order.
    std::vector<std::string> finalized() const {
        std::vector<std::string> out;
        for (const event& e : events_)
            if (e.finalizing) out.push_back(e.label);
        return out;
    }
    const std::vector<event>& events() const noexcept { return events_; }
    /// The finalized labels recorded since the last call.
    std::vector<std::string> take_finalized() {
        std::vector<std::string> out;
        for (std::size_t i = taken_; i < events_.size(); ++i)
            if (events_[i].finalizing) out.push_back(events_[i].label);
        taken_ = events_.size();
        return out;
    }
    /// True when every region with an owner was finalized before that owner.
    bool regions_before_owners() const {
        for (std::size_t i = 0; i < events_.size(); ++i) {
            const event& r = events_[i];
            if (!r.finalizing || r.owner.empty()) continue;
            for (std::size_t j = 0; j < i; ++j)
                if (events_[j].finalizing && events_[j].label == r.owner) return false;
        }
        return true;
    }

private:
    /// An object's label from when it was still in the tree: once
    /// unparented, a container is no one's child (label() would call it "/").
    struct name {
        std::string label;
        bool dying = false; ///< its finalization began
    };
    std::string name_of(const qomem::object& obj) const {
        auto it = names_.find(&obj);
        return it != names_.end() ? it->second.label : label(obj);
    }
    void emit(event e) noexcept {
        try {
            events_.push_back(std::move(e));
            if (on_event_) on_event_(events_.back());
            events_.back().obj = nullptr; // not valid afterwards
        } catch (...) {
        }
    }

    std::function<void(const event&)> on_event_;
    qomem::lifetime_observer* previous_;
    std::map<const qomem::object*, name> names_;
    std::vector<event> events_;
    std::size_t taken_ = 0;
};

/// The machine and the steps of the story. Each step is a member function;
/// the example calls them in order between its narration, the test between
/// its checks.
class scenario {
public:
    /// Builds the machine: root, machine, system memory with RAM, the
    /// address space "memory", and nic0 and disk0 added with device_add
    /// (realized: the NIC makes and places its regions, its address space and
    /// its self-DMA mapping). main() keeps the root handle and the address
    /// space; the tree holds everything else.
    scenario() : root_(qomem::container::make_root()) {
        machine_ = &qomem::add_machine<demo_machine>(*root_);
        auto system = qomem::make_container(qomem::region_owner::ownerless_in(machine_->unattached()),
                                            "system", qomem::u128_2_64);
        auto ram = qomem::make_ram(qomem::region_owner::ownerless_in(machine_->unattached()), "ram",
                                   0x10000);
        system->add_subregion(ram_base, *ram);
        system_ = system.get();
        ram_ = ram.get();
        memory_.emplace(machine_->memory(), *system_, "memory");
        auto n = qomem::make<nic>(*system_);
        qomem::device_add(*machine_, *n, nullptr, "nic0");
        nic_ = n.get();
        auto d = qomem::make<disk_controller>();
        qomem::device_add(*machine_, *d, nullptr, "disk0");
        disk_ = d.get();
    }
    scenario(const scenario&) = delete;
    scenario& operator=(const scenario&) = delete;
    ~scenario() { shutdown(); }

    qomem::container& root() const { return *root_; }
    demo_machine& machine() const { return *machine_; }
    qomem::address_space& memory() { return *memory_; }
    /// Valid until the NIC is finalized (step disk_completes_dma).
    nic& nic0() const { return *nic_; }
    disk_controller& disk0() const { return *disk_; }

    /// A 32-bit guest read: the value, and the access's result.
    std::pair<std::uint32_t, qomem::memtx_result> guest_read32(hwaddr addr) {
        std::uint32_t v = 0;
        const qomem::memtx_result r = memory_->read(addr, &v, sizeof v);
        return {v, r};
    }

    /// Step 1: the guest reads the NIC's ID register, writes a descriptor
    /// into its ring and rings the doorbell; the NIC reads the descriptor
    /// through its self-DMA mapping. Returns the ID the guest read.
    std::uint32_t guest_sends(std::string_view packet) {
        const auto id = guest_read32(nic_base + nic_registers::id).first;
        memory_->write(nic_base + ring_offset, packet.data(), packet.size());
        const std::uint32_t one = 1;
        memory_->write(nic_base + nic_registers::doorbell, &one, sizeof one);
        return id;
    }

    /// Step 1, continued: disk0 maps the NIC's ring (through "memory", at
    /// the BAR's address) and keeps the mapping in flight.
    bool disk_starts_dma() { return disk_->start_dma(*memory_, nic_base + ring_offset, 0x100); }

    /// Who holds whom now. main()'s handles are outside holders; the
    /// references the library cannot attribute are named with their holder:
    /// "memory" (main's), the NIC's address space and self-DMA mapping
    /// (ended in its unrealize step; `nic_keeps_until_finalized` pretends it
    /// ended them only when finalized, to show why it must not), disk0's
    /// DMA mapping (cancelled in its unrealize step).
    qomem::reference_graph snapshot(bool nic_keeps_until_finalized = false) const {
        using qomem::held_until;
        using qomem::reference_graph;
        qomem::reference_graph g;
        if (root_) g.add_reference(reference_graph::outside("main(): root handle"), *root_, "handle");
        if (memory_) g.add_address_space(reference_graph::outside("main(): address space"), *memory_);
        if (nic_alive_ && nic_->realized()) {
            const held_until until = nic_keeps_until_finalized ? held_until::finalized : held_until::unrealized;
            g.add_address_space(*nic_, *nic_->dma_space(), until);
            g.add_dma_mapping(*nic_, nic_->ring_mapping(), "nic0's self-DMA of nic-ring", until);
        }
        if (disk_ && disk_->in_flight())
            g.add_dma_mapping(*disk_, disk_->in_flight(), "disk0's DMA from nic-ring",
                              disk_->realized() ? held_until::unrealized : held_until::finalized);
        return g;
    }

    /// Step 2: the hot-unplug of nic0, through the machine (device_del).
    void hot_unplug() {
        qomem::device_del(*machine_, "nic0");
        machine_->memory().synchronize(); // the flat views that showed nic0's regions are freed
    }

    /// Step 3: disk0's transfer completes; returns what it read.
    std::string disk_completes_dma() {
        std::string got = disk_->complete_dma(); // may finalize nic-ring, then nic0
        machine_->memory().synchronize();
        nic_alive_ = false;
        return got;
    }

    /// Step 4: main() takes the RAM out of the system memory (nothing counts
    /// the uses of an ownerless region, so it must not be freed while still
    /// placed), then lets go of its address space and of the root.
    void shutdown() {
        if (!root_) return;
        system_->del_subregion(*ram_);
        memory_.reset();
        root_.reset();
        qomem::rcu::synchronize(); // whatever was retired is freed
        disk_ = nullptr;
        nic_alive_ = false;
    }

    /// Call after the NIC was finalized by other means (tests).
    void nic_gone() noexcept { nic_alive_ = false; }

private:
    qomem::ref_ptr<qomem::container> root_;
    demo_machine* machine_ = nullptr;
    qomem::memory_region* system_ = nullptr;
    qomem::memory_region* ram_ = nullptr;
    std::optional<qomem::address_space> memory_;
    nic* nic_ = nullptr;
    bool nic_alive_ = true;
    disk_controller* disk_ = nullptr;
};

} // namespace nic_demo
