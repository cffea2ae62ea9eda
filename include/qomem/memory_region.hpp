// qomem/memory_region.hpp — memory regions: the nodes of a machine's memory
// map, with their own reference counts, and the factories that make them.
//
// A region is a QOM object. It is a child "name[*]" of its owner (a device,
// usually), or ownerless; ownerless regions may be given a home in the tree
// (a machine's /machine/unattached) or stay orphans held by their handle.
//
//     auto sys = qomem::make_container(nullptr, "system", qomem::u128_2_64);
//     auto ram = qomem::make_ram(*dev, "ram", 128 << 20);  // owned by *dev
//     sys->add_subregion(0, *ram);                         // sys holds ram
//     qomem::address_space as(*sys, "memory");             // sys joins a system
//
// (`sys` is ownerless: nothing counts the uses of it — not the address space,
// not its flat views — so its handle must outlive them.)
//
// Lifetime, without piggybacking on the owner:
//  * `memory_region_ref(mr)` (what containers, address spaces, flat views and
//    DMA do) refs the region itself, never its owner. A region without an
//    owner is not counted at all: the check is one branch.
//  * While the owner is in the tree, the owner's child property holds the
//    region. A device's unparent hook unparents its regions; from then on
//    each unparented region holds a reference to its owner, dropped after the
//    region is freed. An owner is therefore always finalized after its
//    regions, and a region that is still referenced (mapped for DMA, a
//    subregion of a live container) keeps working after its device is gone.
//  * Freeing an ownerless region that is still a subregion, an alias target,
//    an address-space root or DMA-mapped is misuse (asserted): nothing counts
//    those uses.
//
// Memory systems. A region belongs to at most one memory system
// (memory_system.hpp), for life: it joins one when it is first placed in it —
// made the root of an address space of that system, added to a container
// that belongs to it, or connected (as a container, subregion, alias or alias
// target) to a region that does. Regions connected to each other always
// belong to the same system; connecting regions of two systems is misuse
// (asserted before anything changes, naming both). A region that belongs to
// no system yet is shown by no address space, so changing it commits nothing.
//
// Topology changes (add/delete a subregion, enable, move, ...) are made by the
// thread holding the system's writer role (memory_system::lock; a change made
// without it takes it for its own duration) and commit at once unless a
// transaction is open (`memory_transaction`).
#pragma once

#include <sys/mman.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/core.h>

#include <qomem/assert.hpp>
#include <qomem/detail/subregion_index.hpp>
#include <qomem/detail/topology_log.hpp>
#include <qomem/error.hpp>
#include <qomem/fwd.hpp>
#include <qomem/memory_ops.hpp>
#include <qomem/object.hpp>
#include <qomem/rcu.hpp>
#include <qomem/types.hpp>

namespace qomem {

/// What a region is. `rom` is RAM that starts read-only; `reservation` is
/// MMIO without ops: it claims its range and every access to it fails.
enum class region_kind : std::uint8_t {
    container,
    ram,
    rom,
    rom_device,
    io,
    ram_device,
    alias,
    reservation,
};

/// Where a new region lives. Converts from an owner object (the region is the
/// owner's child and is reference-counted) or from nullptr (ownerless orphan);
/// `ownerless_in(home)` makes an ownerless region that is a child of `home`,
/// e.g. `machine.unattached()`.
class region_owner {
public:
    region_owner(object& owner) noexcept : owner_(&owner), home_(&owner) {}
    region_owner(object* owner) noexcept : owner_(owner), home_(owner) {}
    region_owner(std::nullptr_t) noexcept {}
    static region_owner ownerless_in(object& home) noexcept {
        region_owner r(nullptr);
        r.home_ = &home;
        return r;
    }
    object* owner() const noexcept { return owner_; }
    object* home() const noexcept { return home_; }

private:
    object* owner_ = nullptr;
    object* home_ = nullptr;
};

/// The MMIO callbacks of a region: a type-erased MemoryRegionOps and the
/// object it is called on (which must outlive the region).
struct region_callbacks {
    const region_ops* ops = nullptr;
    void* opaque = nullptr;

    /// The callbacks of `ops`.
    template <MemoryRegionOps Ops>
    static region_callbacks of(Ops& ops) noexcept {
        return {region_ops::of<Ops>(), &ops};
    }
};

/// A node of the memory map. Create with the make_* functions below.
class memory_region : public object {
    QOMEM_OBJECT(memory_region, "memory-region", object)
public:
    /// Everything a region is made of; filled by the make_* functions (or by
    /// hand, for make_region).
    struct init_args {
        region_owner where = nullptr;
        std::string name;
        region_kind kind = region_kind::container;
        u128 size = 0;
        memory_region* alias = nullptr;
        hwaddr alias_offset = 0;
        region_callbacks callbacks{}; ///< MMIO (io, ROM device)
        void* host = nullptr;       ///< caller's memory (ram from ptr, ram device)
        int fd = -1;                ///< ram from fd
        std::uint64_t fd_offset = 0;
        bool shared = true; ///< MAP_SHARED for fd-backed RAM
        /// Priority of a region that is never added to a container (a root
        /// may carry one; it shows in the flat view). add_subregion sets it.
        std::int32_t priority = 0;
    };

    /// Constructs a region; prefer the make_* functions, which also attach it.
    /// Effects: an alias takes memory_region_ref on its target (and joins the
    /// target's memory system, if it has one).
    /// Throws: region_error for a size above 2^64 or an alias without target.
    explicit memory_region(const init_args& a);

    // ---- identity and state ------------------------------------------------
    const std::string& region_name() const noexcept { return name_; }
    region_kind kind() const noexcept { return kind_; }
    /// The owner, or null for an ownerless region (or once its owner is gone).
    object* owner() const noexcept { return owner_; }
    /// True when memory_region_ref counts (the region was made with an owner).
    bool counted() const noexcept { return counted_; }
    /// The memory system this region belongs to, or null before it is placed
    /// in one (see the header overview).
    memory_system* system() const noexcept { return log_ ? &log_->system() : nullptr; }
    u128 size() const noexcept { return size_; }
    hwaddr addr() const noexcept { return addr_; }
    std::int32_t priority() const noexcept { return priority_; }
    bool enabled() const noexcept { return enabled_; }
    bool readonly() const noexcept { return readonly_.load(std::memory_order_relaxed); }
    bool nonvolatile() const noexcept { return nonvolatile_; }
    bool romd_mode() const noexcept { return romd_mode_.load(std::memory_order_relaxed); }
    /// True for the kinds that fill the gaps their subregions leave.
    bool terminates() const noexcept {
        return kind_ != region_kind::container && kind_ != region_kind::alias;
    }
    /// RAM, ROM and RAM devices (QEMU's memory_region_is_ram).
    bool is_ram() const noexcept {
        return kind_ == region_kind::ram || kind_ == region_kind::rom || is_ram_device();
    }
    /// RAM or ROM whose bytes are plain host memory (never a RAM device).
    bool is_plain_ram() const noexcept {
        return kind_ == region_kind::ram || kind_ == region_kind::rom;
    }
    bool is_rom_device() const noexcept { return kind_ == region_kind::rom_device; }
    bool is_romd() const noexcept { return is_rom_device() && romd_mode(); }
    bool is_ram_device() const noexcept { return kind_ == region_kind::ram_device; }
    /// True for the kinds backed by host memory (RAM, ROM, ROM device, RAM device).
    bool has_host_memory() const noexcept { return is_ram() || is_rom_device(); }
    memory_region* container() const noexcept { return container_; }
    memory_region* alias() const noexcept { return alias_; }
    hwaddr alias_offset() const noexcept { return alias_offset_; }
    /// The MMIO callbacks (none for a reservation and for non-MMIO kinds).
    const region_callbacks& callbacks() const noexcept { return callbacks_; }

    /// The owner, when it is a device and the region is MMIO: the object
    /// whose re-entrancy guard covers this region; null otherwise.
    const object* guarded_device() const noexcept {
        return guard_enabled_ && !readonly() ? guard_device_ : nullptr;
    }
    /// Opts this region out of (or back into) the re-entrancy guard, for a
    /// device that legitimately accesses its own MMIO from its handlers.
    void set_reentrancy_guard(bool enabled) noexcept { guard_enabled_ = enabled && guard_device_; }
    /// True the first time it is called (the re-entrancy block is logged
    /// once per region). Thread-safe.
    bool first_reentrancy_report() const noexcept {
        return !reentrancy_logged_.exchange(true, std::memory_order_relaxed);
    }

    /// Dirty tracking of RAM, one bit per 4 KiB page: writes through an
    /// address space and DMA unmaps after a write set the bits while logging
    /// is on. Requires (asserted): a RAM region.
    void set_dirty_log(bool on);
    bool dirty_log() const noexcept { return dirty_.load(std::memory_order_acquire) != nullptr; }
    /// True if a page overlapping [offset, offset+len) is dirty; clears them.
    bool test_and_clear_dirty(hwaddr offset, hwaddr len);
    /// Marks [offset, offset+len) dirty if logging is on (cheap when off).
    void mark_dirty(hwaddr offset, hwaddr len) noexcept {
        rcu::read_guard g; // the bitmap is freed through RCU
        std::atomic<std::uint64_t>* bits = dirty_.load(std::memory_order_acquire);
        if (!bits || len == 0) return;
        mark_dirty_slow(bits, offset, len);
    }

    /// QEMU's type string for `info mtree`: "ramd", "romd", "rom", "ram" or
    /// "i/o" (containers and MMIO); an alias reports its target's type.
    const char* type_string() const noexcept;

    /// Calls f(memory_region&) for each subregion, highest priority first and,
    /// among equal priorities, the most recently added first (render order).
    template <class F>
    void for_each_subregion(F&& f) const {
        subregions_.for_each(f);
    }
    std::size_t subregion_count() const noexcept { return subregions_.size(); }
    /// Calls f(memory_region&) in render order until it returns true;
    /// returns whether it did.
    template <class F>
    bool any_subregion(F&& f) const {
        return subregions_.any(f);
    }
    /// Calls f(memory_region&) in render order for each subregion that may
    /// intersect [lo, hi) of this region's coordinates (a superset: callers
    /// still clip). A container with many subregions answers from an address
    /// index instead of walking them all.
    template <class F>
    void for_each_subregion_in(i128 lo, i128 hi, F&& f) const {
        subregions_.for_each_in(lo, hi, f);
    }
    /// Calls f(memory_region&) for each alias that targets this region.
    template <class F>
    void for_each_alias_user(F&& f) const {
        for (memory_region* a : alias_users_) f(*a);
    }

    /// Host memory of a region backed by it (RAM, ROM, ROM device, RAM
    /// device), reserving it on first use for anonymous RAM; null for other
    /// kinds. Thread-safe. Throws: region_error if the reservation fails.
    std::byte* host_ptr() const;
    /// The host memory if already reserved (null otherwise); never maps.
    std::byte* host_ptr_if_mapped() const noexcept { return host_.load(std::memory_order_acquire); }
    /// False for host memory mapped without write permission (a read-only
    /// shared-memory mapping): then not even a debug write may store to it.
    bool host_writable() const noexcept { return host_writable_; }
    void set_host_writable(bool writable) noexcept { host_writable_ = writable; }

    // ---- DMA accounting of ownerless regions --------------------------------

    /// What a DMA mapping takes: memory_region_ref on a counted region; on an
    /// ownerless one (not counted), a count of mappings that makes freeing it
    /// while mapped a reported misuse. Any thread.
    void dma_hold() noexcept;
    void dma_release() noexcept;

    // ---- topology (each commits unless a transaction is open) --------------

    /// Adds `sub` at `offset` with priority 0 (QEMU's add_subregion).
    /// Requires (asserted): this is not an alias; `sub` is in no container;
    /// the two do not belong to different memory systems.
    /// Effects: takes a reference to `sub` (counted when it has an owner);
    /// among equal priorities `sub` now wins (last added wins); if either
    /// belongs to a memory system, everything connected to the other joins it.
    /// Throws: region_error if adding `sub` would make the region graph cyclic
    /// (an alias cycle); nothing changes. Complexity: O(subregions) for the
    /// sorted insert, plus the cycle check over what `sub` reaches.
    void add_subregion(hwaddr offset, memory_region& sub) { add_subregion(offset, sub, 0); }
    /// The same with a signed priority (QEMU's add_subregion_overlap).
    void add_subregion(hwaddr offset, memory_region& sub, std::int32_t priority);

    /// Removes `sub` (QEMU's del_subregion), commits, then drops the
    /// reference this container held (which may finalize `sub` and, through
    /// it, its owner). Requires (asserted): `sub` is a subregion of this region.
    /// Complexity: O(log subregions) plus the commit.
    void del_subregion(memory_region& sub);

    /// Enables or disables the region (a disabled region and its subtree
    /// render nothing). Effects: records the region's extent as changed.
    /// References: none. Complexity: O(1) plus the commit.
    void set_enabled(bool enabled);
    /// Makes the region (and what renders through it) read-only for guest
    /// writes. Effects, references, complexity: as set_enabled.
    void set_readonly(bool readonly);
    /// Marks the region non-volatile (shown as "nv-" in `info mtree`).
    /// Effects, references, complexity: as set_enabled.
    void set_nonvolatile(bool nonvolatile);
    /// ROM device: reads direct (true) or through the ops (false).
    /// Requires (asserted): a ROM device. Effects: as set_enabled.
    void set_romd(bool romd);
    /// Moves the region within its container. Like QEMU it is removed and
    /// added again, so it becomes the most recently added of its priority.
    /// A region with no container (a root) is moved too: every view rendered
    /// from it is rendered anew. References: none. Complexity: O(subregions
    /// of the container) plus the commit.
    void set_address(hwaddr addr);
    /// Points an alias at another offset of its target. Requires (asserted):
    /// an alias. Effects: as set_enabled.
    void set_alias_offset(hwaddr offset);
    /// Resizes. Throws: region_error above 2^64, or for RAM-backed regions
    /// past the size they were made with (nothing changes). Effects: records
    /// the old and the new extent as changed. References: none.
    void set_size(u128 size);

protected:
    ~memory_region() override;
    void on_unparent() override;
    after_free_action after_free() noexcept override;
    void check_finalizable() const override;
    void last_reference_dropped() override;

public:
    bool follows_owner_out_of_tree() const noexcept override { return owner_ != nullptr; }

private:
    friend void memory_region_ref(memory_region& mr);
    friend void memory_region_unref(memory_region& mr);
    friend class memory_system;
    friend class address_space;
    template <class>
    friend class detail::subregion_index;

    /// Throws region_error for a size above 2^64.
    static void check_size(std::string_view name, u128 size);
    bool reaches(const memory_region& target) const;
    void mark_dirty_slow(std::atomic<std::uint64_t>* bits, hwaddr offset, hwaddr len) const noexcept;
    std::size_t dirty_pages() const noexcept {
        return static_cast<std::size_t>((backing_size_ + 4095) / 4096);
    }
    void unmap_backing() noexcept;
    /// Makes `log` this region's system, and that of every region connected
    /// to it (none of which belongs to another: checked by the caller).
    void join(detail::topology_log& log);
    /// Asserts that `a` and `b` may be connected (not of two systems).
    static void check_same_system(const memory_region& a, const memory_region& b,
                                  std::string_view how);
    /// Records that [lo, hi) of this region's own coordinates changed.
    void changed_inside(i128 lo, i128 hi) const {
        if (log_) log_->changed(*this, lo, hi);
    }
    /// Records that this region's whole extent changed.
    void changed_whole() const { changed_inside(0, i128(size_)); }
    /// Finalizes a region whose last reference was dropped (memory_system
    /// calls it on the writer).
    void finalize_now() { finalize_dropped(); }

    detail::subregion_hook sub_hook_;
    std::uint64_t sub_seq_ = 0; // when added to its container (render order among equals)
    detail::subregion_index<memory_region> subregions_;

    std::string name_;
    object* owner_ = nullptr;
    detail::topology_log* log_ = nullptr; // the memory system, once placed in one
    bool counted_ = false;
    bool holds_owner_ = false;
    region_kind kind_;
    std::atomic<bool> readonly_{false}; // read by readers (re-entrancy guard)
    bool nonvolatile_ = false;
    bool enabled_ = true;
    std::atomic<bool> romd_mode_{true};
    u128 size_ = 0;
    u128 backing_size_ = 0;
    hwaddr addr_ = 0;
    std::int32_t priority_ = 0;
    memory_region* container_ = nullptr;
    memory_region* alias_ = nullptr;
    hwaddr alias_offset_ = 0;
    std::vector<memory_region*> alias_users_; // aliases targeting this region
    std::uint32_t as_root_users_ = 0;         // address spaces rooted here
    std::atomic<std::uint32_t> dma_users_{0}; // DMA mappings of an ownerless region
    region_callbacks callbacks_;
    const object* guard_device_ = nullptr;
    bool guard_enabled_ = false;
    mutable std::atomic<bool> reentrancy_logged_{false};
    mutable std::atomic<std::byte*> host_{nullptr};
    std::atomic<std::atomic<std::uint64_t>*> dirty_{nullptr};
    bool owns_mapping_ = false;
    bool host_writable_ = true;
    int fd_ = -1;
    std::uint64_t fd_offset_ = 0;
    bool fd_shared_ = true;
};

/// Takes a reference to the region itself (never its owner). Ownerless
/// regions are not counted: one branch. Any thread.
inline void memory_region_ref(memory_region& mr) {
    if (mr.counted_) mr.ref();
}
/// Drops a reference taken by memory_region_ref; the last one finalizes the
/// region (and may finalize its owner) on the thread holding its memory
/// system's writer role: here if this thread holds it or can take it at
/// once, otherwise handed to the holder, which finalizes it when it gives the
/// role back. Any thread.
inline void memory_region_unref(memory_region& mr) {
    if (mr.counted_) mr.unref();
}

/// A move-only holder of one memory_region_ref.
class region_ref {
public:
    region_ref() noexcept = default;
    explicit region_ref(memory_region& mr) : mr_(&mr) { memory_region_ref(mr); }
    region_ref(region_ref&& o) noexcept : mr_(std::exchange(o.mr_, nullptr)) {}
    region_ref& operator=(region_ref&& o) noexcept {
        if (this != &o) {
            reset();
            mr_ = std::exchange(o.mr_, nullptr);
        }
        return *this;
    }
    ~region_ref() { reset(); }
    void reset() noexcept {
        if (auto* m = std::exchange(mr_, nullptr)) memory_region_unref(*m);
    }
    memory_region* get() const noexcept { return mr_; }
    memory_region* operator->() const noexcept { return mr_; }
    memory_region& operator*() const noexcept { return *mr_; }
    explicit operator bool() const noexcept { return mr_ != nullptr; }

private:
    memory_region* mr_ = nullptr;
};

// ---- factories --------------------------------------------------------------
//
// Each makes a region and, when `where` names an owner or a home, adds it as
// child "name[*]" there (that parent then holds a reference). The returned
// handle holds the creation reference; drop it to leave the parent as the
// only holder. Throws: region_error for a size above 2^64.

/// Makes a region from `a` (what every make_* function below does).
inline ref_ptr<memory_region> make_region(const memory_region::init_args& a) {
    auto mr = make<memory_region>(a);
    if (object* home = a.where.home()) {
        std::string name;
        for (char c : a.name) name += c == '/' ? std::string_view("\\x2f") : std::string_view(&c, 1);
        home->add_child(name + "[*]", *mr);
    }
    return mr;
}

/// A container: groups subregions; its gaps fall through to lower siblings.
inline ref_ptr<memory_region> make_container(region_owner where, std::string_view name, u128 size) {
    return make_region({where, std::string(name), region_kind::container, size});
}
/// RAM, reserved lazily with an anonymous MAP_NORESERVE mapping.
inline ref_ptr<memory_region> make_ram(region_owner where, std::string_view name, u128 size) {
    return make_region({where, std::string(name), region_kind::ram, size});
}
/// Read-only RAM (writes from the guest are ignored).
inline ref_ptr<memory_region> make_rom(region_owner where, std::string_view name, u128 size) {
    return make_region({where, std::string(name), region_kind::rom, size});
}
/// RAM mapped from `fd` at `offset` (MAP_SHARED unless `shared` is false),
/// mapped on first use. The caller keeps ownership of `fd` and must keep it
/// open until the region is first used.
inline ref_ptr<memory_region> make_ram_from_fd(region_owner where, std::string_view name,
                                               u128 size, int fd, std::uint64_t offset,
                                               bool shared = true) {
    memory_region::init_args a{where, std::string(name), region_kind::ram, size};
    a.fd = fd;
    a.fd_offset = offset;
    a.shared = shared;
    return make_region(a);
}
/// RAM in the caller's memory (`host` must stay valid for the region's life).
inline ref_ptr<memory_region> make_ram_from_ptr(region_owner where, std::string_view name,
                                                u128 size, void* host) {
    memory_region::init_args a{where, std::string(name), region_kind::ram, size};
    a.host = host;
    return make_region(a);
}
/// A RAM device: the caller's memory, always dispatched like MMIO.
inline ref_ptr<memory_region> make_ram_device(region_owner where, std::string_view name,
                                              u128 size, void* host) {
    memory_region::init_args a{where, std::string(name), region_kind::ram_device, size};
    a.host = host;
    return make_region(a);
}
/// A region dispatching to `ops` (which must outlive the region): MMIO
/// (region_kind::io) or a ROM device (region_kind::rom_device: reads come
/// from its RAM in ROMD mode, writes go to `ops`).
template <MemoryRegionOps Ops>
ref_ptr<memory_region> make_with_ops(region_kind kind, region_owner where, std::string_view name,
                                     u128 size, Ops& ops) {
    memory_region::init_args a{where, std::string(name), kind, size};
    a.callbacks = region_callbacks::of(ops);
    return make_region(a);
}
/// A ROM device (see make_with_ops).
template <MemoryRegionOps Ops>
ref_ptr<memory_region> make_rom_device(region_owner where, std::string_view name, u128 size,
                                       Ops& ops) {
    return make_with_ops(region_kind::rom_device, where, name, size, ops);
}
/// MMIO dispatched to `ops` (see make_with_ops).
template <MemoryRegionOps Ops>
ref_ptr<memory_region> make_io(region_owner where, std::string_view name, u128 size, Ops& ops) {
    return make_with_ops(region_kind::io, where, name, size, ops);
}
/// An alias: `size` bytes of `target` starting at `offset`. Takes a reference
/// to `target` (counted when it has an owner); joins the target's memory
/// system, if it has one.
inline ref_ptr<memory_region> make_alias(region_owner where, std::string_view name,
                                         memory_region& target, hwaddr offset, u128 size) {
    memory_region::init_args a{where, std::string(name), region_kind::alias, size};
    a.alias = &target;
    a.alias_offset = offset;
    return make_region(a);
}
/// A reservation: MMIO without ops; it claims its range, every access fails.
inline ref_ptr<memory_region> make_reservation(region_owner where, std::string_view name,
                                               u128 size) {
    return make_region({where, std::string(name), region_kind::reservation, size});
}

// ---- implementation ---------------------------------------------------------

namespace detail {
/// Holds the writer role of a region's system (if it has one) for a scope.
class writer_hold {
public:
    explicit writer_hold(detail::topology_log* log) : log_(log) {
        if (log_) log_->lock();
    }
    ~writer_hold() {
        if (log_) log_->unlock();
    }
    writer_hold(const writer_hold&) = delete;
    writer_hold& operator=(const writer_hold&) = delete;

private:
    detail::topology_log* log_;
};

/// A transaction on a region's system (nothing when it has none).
class region_transaction {
public:
    explicit region_transaction(detail::topology_log* log) : log_(log) {
        if (log_) log_->begin();
    }
    ~region_transaction() noexcept(false) {
        if (log_) log_->end();
    }
    region_transaction(const region_transaction&) = delete;
    region_transaction& operator=(const region_transaction&) = delete;

private:
    detail::topology_log* log_;
};

inline bool is_device_type(const type_info& t) noexcept {
    for (const type_info* p = &t; p; p = p->parent)
        if (p->name == "device") return true;
    return false;
}
} // namespace detail

inline void memory_region::check_size(std::string_view name, u128 size) {
    if (size > u128_2_64)
        throw region_error(fmt::format("region '{}': size {} is larger than 2^64", name, detail::hex(size)));
}

inline memory_region::memory_region(const init_args& a)
    : name_(a.name), owner_(a.where.owner()), counted_(a.where.owner() != nullptr), kind_(a.kind),
      size_(a.size), backing_size_(a.size), priority_(a.priority), callbacks_(a.callbacks),
      fd_(a.fd), fd_offset_(a.fd_offset), fd_shared_(a.shared) {
    check_size(a.name, a.size);
    if (kind_ == region_kind::rom) readonly_.store(true, std::memory_order_relaxed);
    if (kind_ == region_kind::alias) {
        if (!a.alias) throw region_error(fmt::format("alias region '{}' has no target", a.name));
        alias_ = a.alias;
        alias_offset_ = a.alias_offset;
    }
    if (a.host) host_.store(static_cast<std::byte*>(a.host), std::memory_order_relaxed);
    // QEMU guards MMIO of a device against re-entry, but never RAM, ROM, ROM
    // devices or RAM devices.
    if ((kind_ == region_kind::io || kind_ == region_kind::reservation) && owner_ &&
        detail::is_device_type(owner_->type())) {
        guard_device_ = owner_;
        guard_enabled_ = true;
    }
    if (alias_) {
        memory_region_ref(*alias_);
        alias_->alias_users_.push_back(this);
        // Nothing else is connected to a new region yet: it simply joins the
        // target's system. (Its creation changes no view: nothing shows it.)
        if (alias_->log_) {
            log_ = alias_->log_;
            log_->region_bound();
        }
    }
}

inline memory_region::~memory_region() {
    // Unreachable now (no container, not a root, no alias to it: all
    // checked), so detaching the subregions changes no flat view and needs no
    // commit. An ownerless region was finalized only after a grace period
    // (last_reference_dropped), so no reader still sees it either.
    if (log_) log_->forget(*this);
    enabled_ = false;
    subregions_.clear_and_dispose([](memory_region& sub) {
        sub.container_ = nullptr;
        memory_region_unref(sub);
    });
    if (alias_) {
        std::erase(alias_->alias_users_, this);
        memory_region_unref(*std::exchange(alias_, nullptr));
    }
    unmap_backing();
    delete[] dirty_.exchange(nullptr);
    if (log_) log_->region_unbound(); // may free the system: last
}

inline void memory_region::last_reference_dropped() {
    if (!log_) {
        // In no memory system: no view, no reader can see it.
        finalize_dropped();
    } else if (counted_) {
        // Every view showing it held a reference: none does any more.
        log_->finalize_on_writer(*this);
    } else {
        // Ownerless: the views showing it did not count it, and a reader may
        // still be inside one. Report misuse now, on this thread, then
        // finalize once no reader can hold such a view (never a wait here:
        // this may be a reader's thread, inside a read section).
        check_dropped();
        rcu::retire(this, [](void* p) {
            auto* mr = static_cast<memory_region*>(p);
            mr->log_->finalize_on_writer(*mr);
        });
    }
}

inline void memory_region::dma_hold() noexcept {
    if (counted_)
        ref();
    else
        dma_users_.fetch_add(1, std::memory_order_relaxed);
}

inline void memory_region::dma_release() noexcept {
    if (counted_)
        unref();
    else
        dma_users_.fetch_sub(1, std::memory_order_release); // pairs with check_finalizable's acquire
}

inline void memory_region::set_dirty_log(bool on) {
    QOMEM_ASSERT(is_plain_ram(), "dirty logging on '{}', which is not RAM", name_);
    if (on == dirty_log()) return;
    if (on) {
        auto* bits = new std::atomic<std::uint64_t>[(dirty_pages() + 63) / 64];
        for (std::size_t i = 0; i < (dirty_pages() + 63) / 64; ++i) bits[i].store(0);
        dirty_.store(bits, std::memory_order_release);
    } else {
        // Readers may still be marking: free the bits after they are gone.
        rcu::retire(dirty_.exchange(nullptr, std::memory_order_acq_rel),
                    [](void* p) { delete[] static_cast<std::atomic<std::uint64_t>*>(p); });
    }
    if (log_) log_->access_changed(); // CPU TLBs store to RAM directly only while logging is off
}

inline void memory_region::mark_dirty_slow(std::atomic<std::uint64_t>* bits, hwaddr offset,
                                           hwaddr len) const noexcept {
    const u128 end = std::min<u128>(u128(offset) + len, backing_size_);
    for (u128 page = offset / 4096; page * 4096 < end; ++page)
        bits[static_cast<std::size_t>(page / 64)].fetch_or(std::uint64_t(1) << (page % 64),
                                                           std::memory_order_relaxed);
}

inline bool memory_region::test_and_clear_dirty(hwaddr offset, hwaddr len) {
    rcu::read_guard g; // the bitmap is freed through RCU
    std::atomic<std::uint64_t>* bits = dirty_.load(std::memory_order_acquire);
    if (!bits || len == 0) return false;
    bool dirty = false;
    const u128 end = std::min<u128>(u128(offset) + len, backing_size_);
    for (u128 page = offset / 4096; page * 4096 < end; ++page) {
        const std::uint64_t bit = std::uint64_t(1) << (page % 64);
        if (bits[static_cast<std::size_t>(page / 64)].fetch_and(~bit) & bit) dirty = true;
    }
    return dirty;
}

inline void memory_region::unmap_backing() noexcept {
    std::byte* p = host_.exchange(nullptr, std::memory_order_acq_rel);
    if (p && owns_mapping_) ::munmap(p, static_cast<std::size_t>(backing_size_));
}

inline std::byte* memory_region::host_ptr() const {
    std::byte* p = host_.load(std::memory_order_acquire);
    if (p || !has_host_memory()) return p;
    if (backing_size_ == 0 || backing_size_ >= (u128(1) << 63))
        throw region_error(fmt::format("region '{}': cannot back {} bytes of RAM", name_,
                                       detail::hex(backing_size_)));
    const auto len = static_cast<std::size_t>(backing_size_);
    void* m;
    if (fd_ >= 0)
        m = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, fd_shared_ ? MAP_SHARED : MAP_PRIVATE, fd_,
                   static_cast<off_t>(fd_offset_));
    else
        m = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (m == MAP_FAILED)
        throw region_error(fmt::format("region '{}': mmap of {} bytes failed: {}", name_,
                                       detail::hex(backing_size_), std::strerror(errno)));
    std::byte* expected = nullptr;
    if (!host_.compare_exchange_strong(expected, static_cast<std::byte*>(m),
                                       std::memory_order_acq_rel)) {
        ::munmap(m, len); // another thread won the race
        return expected;
    }
    const_cast<memory_region*>(this)->owns_mapping_ = true;
    return static_cast<std::byte*>(m);
}

inline const char* memory_region::type_string() const noexcept {
    if (alias_) return alias_->type_string();
    if (is_ram_device()) return "ramd";
    if (is_romd()) return "romd";
    if (is_ram() && readonly()) return "rom";
    if (is_ram()) return "ram";
    return "i/o";
}

inline bool memory_region::reaches(const memory_region& target) const {
    std::vector<const memory_region*> stack{this};
    std::set<const memory_region*> seen{this}; // aliases make it a DAG, not a tree
    while (!stack.empty()) {
        const memory_region* m = stack.back();
        stack.pop_back();
        if (m == &target) return true;
        auto push = [&](const memory_region* n) {
            if (seen.insert(n).second) stack.push_back(n);
        };
        if (m->alias_) push(m->alias_);
        m->subregions_.for_each([&](const memory_region& s) { push(&s); });
    }
    return false;
}

inline void memory_region::check_same_system(const memory_region& a, const memory_region& b,
                                             std::string_view how) {
    QOMEM_ASSERT(!a.log_ || !b.log_ || a.log_ == b.log_,
                 "cannot {}: region '{}' belongs to memory system {} and region '{}' to memory "
                 "system {}",
                 how, a.name_, static_cast<const void*>(a.system()), b.name_,
                 static_cast<const void*>(b.system()));
}

inline void memory_region::join(detail::topology_log& log) {
    // Everything connected to this region belongs to no system yet (regions
    // connected to each other always share one): walk it once.
    std::vector<memory_region*> stack{this};
    while (!stack.empty()) {
        memory_region* m = stack.back();
        stack.pop_back();
        if (m->log_) continue;
        m->log_ = &log;
        log.region_bound();
        if (m->container_) stack.push_back(m->container_);
        if (m->alias_) stack.push_back(m->alias_);
        for (memory_region* a : m->alias_users_) stack.push_back(a);
        m->subregions_.for_each([&](memory_region& s) { stack.push_back(&s); });
    }
}

inline void memory_region::add_subregion(hwaddr offset, memory_region& sub, std::int32_t priority) {
    QOMEM_ASSERT(!alias_, "cannot add subregion '{}' to alias '{}': aliases have no subregions",
                 sub.name_, name_);
    QOMEM_ASSERT(!sub.container_, "region '{}' is already a subregion of '{}'", sub.name_,
                 sub.container_ ? sub.container_->name_ : std::string());
    check_same_system(*this, sub, fmt::format("add '{}' as a subregion of '{}'", sub.name_, name_));
    if (&sub == this || sub.reaches(*this))
        throw region_error(fmt::format(
            "adding '{}' as a subregion of '{}' would make a cycle: '{}' already leads back to "
            "'{}' through its subregions or alias targets",
            sub.name_, name_, sub.name_, name_));
    detail::topology_log* log = log_ ? log_ : sub.log_;
    detail::writer_hold w(log);
    if (log) {
        if (!log_) join(*log);
        if (!sub.log_) sub.join(*log);
    }
    memory_region_ref(sub);
    sub.container_ = this;
    sub.addr_ = offset;
    sub.priority_ = priority;
    subregions_.insert(sub);
    changed_inside(i128(offset), i128(offset) + i128(sub.size_));
}

inline void memory_region::del_subregion(memory_region& sub) {
    QOMEM_ASSERT(sub.container_ == this, "region '{}' is not a subregion of '{}'", sub.name_,
                 name_);
    detail::writer_hold w(log_);
    subregions_.erase(sub);
    sub.container_ = nullptr;
    // An ownerless region is not counted by the published view: if its handle
    // goes before the commit replaced that view, keep it until then.
    if (!sub.counted_ && log_ && sub.ref_count() > 0) log_->hold_until_commit(sub);
    try {
        changed_inside(i128(sub.addr_), i128(sub.addr_) + i128(sub.size_));
    } catch (...) {
        memory_region_unref(sub); // the container's reference: sub is out already
        throw;
    }
    memory_region_unref(sub);
}

inline void memory_region::set_enabled(bool enabled) {
    detail::writer_hold w(log_);
    if (enabled == enabled_) return;
    enabled_ = enabled;
    changed_whole();
}

inline void memory_region::set_readonly(bool readonly) {
    detail::writer_hold w(log_);
    if (readonly == readonly_.load(std::memory_order_relaxed)) return;
    readonly_.store(readonly, std::memory_order_relaxed);
    changed_whole();
}

inline void memory_region::set_nonvolatile(bool nonvolatile) {
    detail::writer_hold w(log_);
    if (nonvolatile == nonvolatile_) return;
    nonvolatile_ = nonvolatile;
    changed_whole();
}

inline void memory_region::set_romd(bool romd) {
    QOMEM_ASSERT(is_rom_device(), "set_romd on '{}', which is not a ROM device", name_);
    detail::writer_hold w(log_);
    if (romd == romd_mode_.load(std::memory_order_relaxed)) return;
    romd_mode_.store(romd, std::memory_order_relaxed);
    changed_whole();
}

inline void memory_region::set_address(hwaddr addr) {
    detail::writer_hold w(log_);
    if (addr == addr_) return;
    if (!container_) {
        // A root moves everything it renders: render its views anew.
        addr_ = addr;
        if (log_) log_->changed_everything();
        return;
    }
    memory_region& c = *container_;
    const i128 old_lo = i128(addr_);
    c.subregions_.erase(*this);
    addr_ = addr;
    c.subregions_.insert(*this);
    detail::region_transaction tx(log_);
    c.changed_inside(old_lo, old_lo + i128(size_));
    c.changed_inside(i128(addr), i128(addr) + i128(size_));
}

inline void memory_region::set_alias_offset(hwaddr offset) {
    QOMEM_ASSERT(alias_, "set_alias_offset on '{}', which is not an alias", name_);
    detail::writer_hold w(log_);
    if (offset == alias_offset_) return;
    alias_offset_ = offset;
    changed_whole();
}

inline void memory_region::set_size(u128 size) {
    check_size(name_, size);
    if (has_host_memory() && size > backing_size_)
        throw region_error(fmt::format("region '{}': cannot grow RAM from {} to {} bytes", name_,
                                       detail::hex(backing_size_), detail::hex(size)));
    detail::writer_hold w(log_);
    if (size == size_) return;
    const u128 old = size_;
    size_ = size;
    if (container_) container_->subregions_.resized(*this, old);
    // In its container's coordinates, which stay put if the region moves
    // before the commit; and in its own, which reach the views rendered
    // from it and the aliases showing it.
    detail::region_transaction tx(log_);
    if (container_) container_->changed_inside(i128(addr_), i128(addr_) + i128(std::max(old, size)));
    changed_inside(0, i128(std::max(old, size)));
}

inline void memory_region::on_unparent() {
    if (owner_ && parent() == owner_) {
        if (owner_->ref_count() == 0) {
            // The owner is being finalized and is releasing its children: there
            // is no owner left to hold. The region goes on ownerless (still
            // counted) for as long as it is referenced.
            owner_ = nullptr;
        } else {
            owner_->ref();
            holds_owner_ = true;
        }
    }
    object::on_unparent();
}

inline object::after_free_action memory_region::after_free() noexcept {
    if (!holds_owner_) return {};
    return unref_after_free(owner_);
}

inline void memory_region::check_finalizable() const {
    QOMEM_ASSERT(!container_, "region '{}' freed while still a subregion of '{}'", name_,
                 container_ ? container_->name_ : std::string());
    QOMEM_ASSERT(as_root_users_ == 0, "region '{}' freed while still the root of {} address space(s)",
                 name_, as_root_users_);
    QOMEM_ASSERT(alias_users_.empty(), "region '{}' freed while {} alias(es) still point to it",
                 name_, alias_users_.size());
    const std::uint32_t dma = dma_users_.load(std::memory_order_acquire);
    QOMEM_ASSERT(dma == 0, "ownerless region '{}' freed while {} DMA mapping(s) still hold it",
                 name_, dma);
}

} // namespace qomem
