// qomem/memory_region.hpp — memory regions: the nodes of a machine's memory
// map, with their own reference counts.
//
// A region is a QOM object. It is a child "name[*]" of its owner (a device,
// usually), or ownerless; ownerless regions may be given a home in the tree
// (a machine's /machine/unattached) or stay orphans held by their handle.
//
//     auto sys = qomem::make_container(nullptr, "system", qomem::u128_2_64);
//     auto ram = qomem::make_ram(dev, "ram", 128 << 20);   // owned by *dev
//     sys->add_subregion(0, *ram);                         // sys holds ram
//     qomem::address_space as(*sys, "memory");             // as holds sys
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
//  * Freeing an ownerless region that is still a subregion, an alias target
//    or an address-space root is misuse (asserted): nothing counts those uses.
//
// Topology changes (add/delete a subregion, enable, move, ...) commit at once
// unless a transaction is open (`memory_transaction`); the outermost commit
// re-renders the flat views of the address spaces. Changes are made by one
// thread at a time, as under QEMU's big lock.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <string_view>
#include <unordered_set>
#include <utility>
#include <vector>

#include <boost/intrusive/list.hpp>

#include <qomem/detail/int128.hpp>
#include <qomem/device.hpp>
#include <qomem/error.hpp>
#include <qomem/memory_ops.hpp>
#include <qomem/object.hpp>
#include <qomem/rcu.hpp>

namespace qomem {

class memory_region;

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

namespace detail {

/// A part of the map that changed: [lo, hi) in the local coordinates of
/// region `in` (offsets from its origin, where its subregions are placed).
struct change_window {
    const memory_region* in;
    i128 lo;
    i128 hi;
};

/// Transaction depth and commit machinery shared by every region and
/// address space (QEMU's globals). One writer at a time.
struct memory_core {
    unsigned depth = 0;
    bool pending = false;
    bool committing = false;
    /// The changes since the last commit; `full` when there were too many to
    /// track (every view is then rendered anew).
    std::vector<change_window> windows;
    bool full = false;
    static constexpr std::size_t max_windows = 1024;
    /// When set (tests), every incrementally updated view is checked against
    /// a full render, and a difference is reported as a failed assertion.
    bool verify_incremental = false;
    /// Re-renders what changed; installed by the first address space.
    void (*render_all)() = nullptr;
    /// Ownerless regions removed inside a transaction: nothing counts the
    /// published view's use of them, so they are kept (one object reference
    /// each) until the commit has replaced that view.
    std::vector<object*> held_until_commit;

    static memory_core& get() noexcept {
        static memory_core c;
        return c;
    }
    /// Records a change of [lo, hi) in `in`'s coordinates, and commits it
    /// unless a transaction is open.
    void changed(const memory_region* in, i128 lo, i128 hi);

    /// The thread making topology changes (QEMU's big-lock holder): the last
    /// one that changed or committed anything. Regions whose last reference
    /// is dropped on another thread are finalized by it (release_deferred).
    std::atomic<std::thread::id> writer{};
    void note_writer() noexcept { writer.store(std::this_thread::get_id(), std::memory_order_relaxed); }
    bool on_writer() const noexcept {
        const std::thread::id w = writer.load(std::memory_order_relaxed);
        return w == std::thread::id{} || w == std::this_thread::get_id();
    }
    std::mutex deferred_mutex;
    std::vector<object*> deferred; ///< dropped to zero (drop_ref), not yet finalized
    /// Finalizes what other threads released last. Writer only.
    void release_deferred() {
        for (;;) {
            std::vector<object*> batch;
            {
                std::lock_guard lock(deferred_mutex);
                batch.swap(deferred);
            }
            if (batch.empty()) return;
            for (object* o : batch) o->finalize_dropped();
        }
    }
    /// Counted regions named by pending windows, referenced until the commit
    /// has used the windows (so none is freed in between).
    std::vector<object*> window_refs;
    /// Asks for a commit without a change of its own (a new address space).
    void touch() {
        note_writer();
        pending = true;
        if (depth == 0) commit();
    }
    /// Forgets windows in a region that is being freed (it is unreachable;
    /// its removal from its container recorded a window there).
    void forget(const memory_region* mr) noexcept {
        std::erase_if(windows, [&](const change_window& w) { return w.in == mr; });
    }
    void commit() {
        if (committing) return; // the running commit loops again
        note_writer();
        committing = true;
        try {
            release_deferred();
            while (pending || !held_until_commit.empty() || !window_refs.empty()) {
                pending = false;
                if (render_all) render_all();
                else windows.clear();
                // Releasing may free regions, which may change the topology
                // again: loop until it settles.
                for (object* o : std::exchange(window_refs, {})) o->unref();
                for (object* o : std::exchange(held_until_commit, {})) o->unref();
            }
        } catch (...) {
            // The failed render consumed the windows: views may now lag the
            // topology. Render everything at the next commit.
            committing = false;
            full = true;
            windows.clear();
            pending = true;
            // The windows are gone, so are the reasons to hold their regions.
            for (object* o : std::exchange(window_refs, {})) o->unref();
            for (object* o : std::exchange(held_until_commit, {})) o->unref();
            throw;
        }
        committing = false;
    }
};

inline std::string escape_region_name(std::string_view name) {
    std::string out;
    for (char c : name) {
        if (c == '/')
            out += "\\x2f";
        else
            out += c;
    }
    return out;
}

} // namespace detail

/// Opens a topology transaction: changes made until the matching commit take
/// effect together. Nestable; the outermost commit renders.
inline void memory_region_transaction_begin() noexcept { ++detail::memory_core::get().depth; }

/// Closes a transaction. Requires (asserted): one is open.
inline void memory_region_transaction_commit() {
    auto& c = detail::memory_core::get();
    QOMEM_ASSERT(c.depth > 0, "memory_region_transaction_commit without a transaction");
    if (--c.depth == 0 && c.pending) c.commit();
}

/// RAII transaction.
class memory_transaction {
public:
    memory_transaction() noexcept { memory_region_transaction_begin(); }
    ~memory_transaction() noexcept(false) { memory_region_transaction_commit(); }
    memory_transaction(const memory_transaction&) = delete;
    memory_transaction& operator=(const memory_transaction&) = delete;
};

/// A node of the memory map. Create with the make_* functions below.
class memory_region : public object {
    QOMEM_OBJECT(memory_region, "memory-region", object)
public:
    /// Everything a region is made of; filled by the make_* functions.
    struct init_args {
        region_owner where = nullptr;
        std::string name;
        region_kind kind = region_kind::container;
        u128 size = 0;
        memory_region* alias = nullptr;
        hwaddr alias_offset = 0;
        const detail::ops_table* ops = nullptr; ///< MMIO callbacks (io, ROM device)
        void* opaque = nullptr;                 ///< the ops object
        void* host = nullptr; ///< caller's memory (ram from ptr, ram device)
        int fd = -1;          ///< ram from fd
        std::uint64_t fd_offset = 0;
        bool shared = true; ///< MAP_SHARED for fd-backed RAM
        /// Priority of a region that is never added to a container (a root
        /// may carry one; it shows in the flat view). add_subregion sets it.
        std::int32_t priority = 0;
        /// RAM whose file another process can shrink (a vhost-user back-end's
        /// SHMEM_MAP): accesses copy under a SIGBUS guard (detail/fault_guard.hpp).
        bool backing_may_shrink = false;
    };

    /// Constructs a region; prefer the make_* functions, which also attach it.
    /// Throws: region_error for a size above 2^64 or an alias without target.
    explicit memory_region(const init_args& a);

    // ---- identity and state ------------------------------------------------
    const std::string& region_name() const noexcept { return name_; }
    region_kind kind() const noexcept { return kind_; }
    /// The owner, or null for an ownerless region (or once its owner is gone).
    object* owner() const noexcept { return owner_; }
    /// True when memory_region_ref counts (the region was made with an owner).
    bool counted() const noexcept { return counted_; }
    u128 size() const noexcept { return size_; }
    hwaddr addr() const noexcept { return addr_; }
    std::int32_t priority() const noexcept { return priority_; }
    bool enabled() const noexcept { return enabled_; }
    bool readonly() const noexcept { return readonly_.load(std::memory_order_relaxed); }
    bool nonvolatile() const noexcept { return nonvolatile_; }
    bool romd_mode() const noexcept { return romd_mode_.load(std::memory_order_relaxed); }
    bool terminates() const noexcept { return terminates_; }
    bool is_ram() const noexcept { return ram_; }
    bool is_rom_device() const noexcept { return kind_ == region_kind::rom_device; }
    bool is_romd() const noexcept { return is_rom_device() && romd_mode(); }
    bool is_ram_device() const noexcept { return kind_ == region_kind::ram_device; }
    /// RAM-like regions whose bytes are read directly (RAM, ROM, ROMD reads).
    bool is_direct_read() const noexcept { return (ram_ && !is_ram_device()) || is_romd(); }
    memory_region* container() const noexcept { return container_; }
    memory_region* alias() const noexcept { return alias_; }
    hwaddr alias_offset() const noexcept { return alias_offset_; }
    /// The MMIO callbacks (null for a reservation and for non-MMIO kinds).
    const detail::ops_table* ops() const noexcept { return ops_; }
    void* opaque() const noexcept { return opaque_; }
    /// The device whose MMIO re-entrancy guard covers this region (the owner,
    /// when it is a device and the region is MMIO), or null.
    const device* guarded_device() const noexcept {
        return guard_enabled_ && !readonly() ? guard_device_ : nullptr;
    }
    /// Opts this region out of (or back into) the re-entrancy guard, for a
    /// device that legitimately accesses its own MMIO from its handlers.
    void set_reentrancy_guard(bool enabled) noexcept { guard_enabled_ = enabled && guard_device_; }

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
        for (const memory_region& s : subregions_) f(const_cast<memory_region&>(s));
    }
    std::size_t subregion_count() const noexcept { return subregions_.size(); }

    /// Calls f(memory_region&) in render order until it returns true;
    /// returns whether it did.
    template <class F>
    bool any_subregion(F&& f) const {
        for (const memory_region& s : subregions_)
            if (f(const_cast<memory_region&>(s))) return true;
        return false;
    }

    /// Calls f(memory_region&) in render order for each subregion that may
    /// intersect [lo, hi) of this region's coordinates (a superset: callers
    /// still clip). A container with many subregions answers from an address
    /// index instead of walking them all.
    template <class F>
    void for_each_subregion_in(i128 lo, i128 hi, F&& f) const;

    /// Calls f(memory_region&) for each alias that targets this region.
    template <class F>
    void for_each_alias_user(F&& f) const {
        for (memory_region* a : alias_users_) f(*a);
    }

    /// Host memory of a RAM-backed region (RAM, ROM, ROM device, RAM device),
    /// reserving it on first use for anonymous RAM; null for other kinds.
    /// Thread-safe. Throws: region_error if the reservation fails.
    std::byte* host_ptr() const;
    /// False for host memory mapped without write permission (a read-only
    /// shared-memory mapping): then not even a debug write may store to it.
    bool host_writable() const noexcept { return host_writable_; }
    void set_host_writable(bool writable) noexcept { host_writable_ = writable; }
    /// The host memory if already reserved (null otherwise); never maps.
    std::byte* host_ptr_if_mapped() const noexcept { return host_.load(std::memory_order_acquire); }
    // ---- vhost-user hooks (h-vhost) -------------------------------------------
    /// The fd RAM was made from (make_ram_from_fd) and its offset; -1 for
    /// other regions. Still the caller's fd: it must stay open while used.
    int fd() const noexcept { return fd_; }
    std::uint64_t fd_offset() const noexcept { return fd_offset_; }
    /// True for RAM whose backing file can shrink under the program: its
    /// bytes are copied under a SIGBUS guard and never read on the fast path.
    bool backing_may_shrink() const noexcept { return backing_may_shrink_; }
    // ---- end of vhost-user hooks ------------------------------------------------

    // ---- topology (each commits unless a transaction is open) --------------

    /// Adds `sub` at `offset` with priority 0 (QEMU's add_subregion).
    /// Requires (asserted): this is not an alias; `sub` is in no container.
    /// Effects: takes a reference to `sub` (counted when it has an owner);
    /// among equal priorities `sub` now wins (last added wins).
    /// Throws: region_error if adding `sub` would make the region graph cyclic
    /// (an alias cycle); nothing changes. Complexity: O(subregions) for the
    /// sorted insert, plus the cycle check over what `sub` reaches.
    void add_subregion(hwaddr offset, memory_region& sub) { add_subregion(offset, sub, 0); }
    /// The same with a signed priority (QEMU's add_subregion_overlap).
    void add_subregion(hwaddr offset, memory_region& sub, std::int32_t priority);

    /// Removes `sub` (QEMU's del_subregion), commits, then drops the
    /// reference this container held (which may finalize `sub`).
    /// Requires (asserted): `sub` is a subregion of this region.
    void del_subregion(memory_region& sub);

    void set_enabled(bool enabled);
    void set_readonly(bool readonly);
    void set_nonvolatile(bool nonvolatile);
    /// ROM device: reads direct (true) or through the ops (false).
    /// Requires (asserted): a ROM device.
    void set_romd(bool romd);
    /// Moves the region within its container. Like QEMU it is removed and
    /// added again, so it becomes the most recently added of its priority.
    void set_address(hwaddr addr);
    /// Requires (asserted): an alias.
    void set_alias_offset(hwaddr offset);
    /// Resizes. Throws: region_error above 2^64 (nothing changes). RAM-backed
    /// regions cannot grow past the size they were made with (region_error).
    void set_size(u128 size);

protected:
    ~memory_region() override;
    void on_unparent() override;
    after_free_action after_free() noexcept override;
    void check_finalizable() const override;

public:
    bool follows_owner_out_of_tree() const noexcept override { return owner_ != nullptr; }

private:
    friend void memory_region_ref(memory_region& mr);
    friend void memory_region_unref(memory_region& mr);
    friend class address_space;

    bool reaches(const memory_region& target) const;
    void mark_dirty_slow(std::atomic<std::uint64_t>* bits, hwaddr offset, hwaddr len) const noexcept;
    std::size_t dirty_pages() const noexcept {
        return static_cast<std::size_t>((backing_size_ + 4095) / 4096);
    }
    void insert_sorted(memory_region& sub);
    void unmap_backing() noexcept;

    using sub_hook_t = boost::intrusive::list_member_hook<
        boost::intrusive::link_mode<boost::intrusive::safe_link>>;
    sub_hook_t sub_hook_;
    using sub_list = boost::intrusive::list<
        memory_region,
        boost::intrusive::member_hook<memory_region, sub_hook_t, &memory_region::sub_hook_>>;

    std::string name_;
    object* owner_ = nullptr;
    bool counted_ = false;
    bool holds_owner_ = false;
    region_kind kind_;
    bool terminates_ = false;
    bool ram_ = false;
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
    sub_list subregions_;
    std::vector<memory_region*> alias_users_; // aliases targeting this region
    std::uint64_t add_seq_ = 0;               // when added to its container
    // Address index of the subregions (kept for every container; used when
    // it has many): small ones by address, and the few huge ones apart.
    std::multimap<hwaddr, memory_region*> by_addr_;
    std::vector<memory_region*> huge_subregions_;
    u128 max_small_size_ = 0;
    static constexpr u128 huge_size = u128(1) << 32;
    static constexpr std::size_t index_threshold = 16;
    void index_insert(memory_region& sub);
    void index_erase(memory_region& sub);
    /// Records that [lo, hi) of this region's own coordinates changed.
    void changed_inside(i128 lo, i128 hi) const { detail::memory_core::get().changed(this, lo, hi); }
    /// Records that this region's whole extent changed.
    void changed_whole() const { changed_inside(0, i128(size_)); }
    std::uint32_t as_root_users_ = 0; // address spaces rooted here
    const detail::ops_table* ops_ = nullptr;
    void* opaque_ = nullptr;
    const device* guard_device_ = nullptr;
    bool guard_enabled_ = false;
    mutable std::atomic<std::byte*> host_{nullptr};
    std::atomic<std::atomic<std::uint64_t>*> dirty_{nullptr};

public:
    /// Set once the re-entrancy block has been logged for this region.
    mutable std::atomic<bool> reentrancy_logged{false};

private:
    bool owns_mapping_ = false;
    bool host_writable_ = true;
    int fd_ = -1;
    std::uint64_t fd_offset_ = 0;
    bool fd_shared_ = true;
    bool backing_may_shrink_ = false; // vhost-user hook (h-vhost)
};

namespace detail {
/// Finalizes a region whose last reference was just dropped: here on the
/// writer's thread, else handed over to the writer.
[[gnu::noinline]] inline void release_last(memory_region& mr) {
    auto& core = memory_core::get();
    if (core.on_writer()) {
        mr.finalize_dropped();
    } else {
        std::lock_guard lock(core.deferred_mutex);
        core.deferred.push_back(&mr);
    }
}
} // namespace detail

/// Takes a reference to the region itself (never its owner). Ownerless
/// regions are not counted: one branch.
inline void memory_region_ref(memory_region& mr) {
    if (mr.counted_) mr.ref();
}
/// Drops a reference taken by memory_region_ref; may finalize the region.
/// Any thread: when the last reference is dropped on a thread other than the
/// writer (e.g. a vCPU ending a DMA mapping of an unplugged device's RAM),
/// the finalization is handed to the writer, which runs it at its next
/// commit or memory_synchronize(): finalizing changes topology state that
/// only the writer may touch.
inline void memory_region_unref(memory_region& mr) {
    if (!mr.counted_) return;
    if (mr.drop_ref()) [[unlikely]]
        detail::release_last(mr);
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

namespace detail {
inline ref_ptr<memory_region> make_region(const memory_region::init_args& a) {
    auto mr = make<memory_region>(a);
    if (object* home = a.where.home())
        home->add_child(escape_region_name(a.name) + "[*]", *mr);
    return mr;
}
} // namespace detail

/// A container: groups subregions; its gaps fall through to lower siblings.
inline ref_ptr<memory_region> make_container(region_owner where, std::string_view name, u128 size) {
    return detail::make_region({where, std::string(name), region_kind::container, size});
}
/// RAM, reserved lazily with an anonymous MAP_NORESERVE mapping.
inline ref_ptr<memory_region> make_ram(region_owner where, std::string_view name, u128 size) {
    return detail::make_region({where, std::string(name), region_kind::ram, size});
}
/// Read-only RAM (writes from the guest are ignored).
inline ref_ptr<memory_region> make_rom(region_owner where, std::string_view name, u128 size) {
    return detail::make_region({where, std::string(name), region_kind::rom, size});
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
    return detail::make_region(a);
}
/// RAM in the caller's memory (`host` must stay valid for the region's life).
inline ref_ptr<memory_region> make_ram_from_ptr(region_owner where, std::string_view name,
                                                u128 size, void* host) {
    memory_region::init_args a{where, std::string(name), region_kind::ram, size};
    a.host = host;
    return detail::make_region(a);
}
/// A ROM device: reads come from its RAM in ROMD mode, writes go to `ops`
/// (which must outlive the region).
template <MemoryRegionOps Ops>
ref_ptr<memory_region> make_rom_device(region_owner where, std::string_view name, u128 size,
                                       Ops& ops) {
    memory_region::init_args a{where, std::string(name), region_kind::rom_device, size};
    a.ops = &detail::ops_thunks<Ops>::table;
    a.opaque = &ops;
    return detail::make_region(a);
}
/// MMIO dispatched to `ops` (which must outlive the region).
template <MemoryRegionOps Ops>
ref_ptr<memory_region> make_io(region_owner where, std::string_view name, u128 size, Ops& ops) {
    memory_region::init_args a{where, std::string(name), region_kind::io, size};
    a.ops = &detail::ops_thunks<Ops>::table;
    a.opaque = &ops;
    return detail::make_region(a);
}
/// A RAM device: the caller's memory, always dispatched like MMIO.
inline ref_ptr<memory_region> make_ram_device(region_owner where, std::string_view name,
                                              u128 size, void* host) {
    memory_region::init_args a{where, std::string(name), region_kind::ram_device, size};
    a.host = host;
    return detail::make_region(a);
}
/// An alias: `size` bytes of `target` starting at `offset`. Takes a reference
/// to `target` (counted when it has an owner).
inline ref_ptr<memory_region> make_alias(region_owner where, std::string_view name,
                                         memory_region& target, hwaddr offset, u128 size) {
    memory_region::init_args a{where, std::string(name), region_kind::alias, size};
    a.alias = &target;
    a.alias_offset = offset;
    return detail::make_region(a);
}
/// A reservation: MMIO without ops; it claims its range, every access fails.
inline ref_ptr<memory_region> make_reservation(region_owner where, std::string_view name,
                                               u128 size) {
    return detail::make_region({where, std::string(name), region_kind::reservation, size});
}

// ---- implementation ---------------------------------------------------------

inline memory_region::memory_region(const init_args& a)
    : name_(a.name), owner_(a.where.owner()), counted_(a.where.owner() != nullptr),
      kind_(a.kind), size_(a.size), backing_size_(a.size), priority_(a.priority), ops_(a.ops),
      opaque_(a.opaque), fd_(a.fd),
      fd_offset_(a.fd_offset), fd_shared_(a.shared),
      backing_may_shrink_(a.backing_may_shrink) { // backing_may_shrink_: vhost-user hook (h-vhost)
    if (a.size > u128_2_64)
        throw region_error(fmt::format("region '{}': size {} is larger than 2^64", a.name,
                                       detail::hex(a.size)));
    switch (kind_) {
    case region_kind::container:
        break;
    case region_kind::rom:
        readonly_.store(true, std::memory_order_relaxed);
        [[fallthrough]];
    case region_kind::ram:
        ram_ = true;
        terminates_ = true;
        break;
    case region_kind::ram_device:
        ram_ = true;
        terminates_ = true;
        break;
    case region_kind::rom_device:
    case region_kind::io:
    case region_kind::reservation:
        terminates_ = true;
        break;
    case region_kind::alias:
        if (!a.alias)
            throw region_error(fmt::format("alias region '{}' has no target", a.name));
        alias_ = a.alias;
        alias_offset_ = a.alias_offset;
        break;
    }
    if (a.host) host_.store(static_cast<std::byte*>(a.host), std::memory_order_relaxed);
    // QEMU guards MMIO of a device against re-entry, but never RAM, ROM, ROM
    // devices or RAM devices.
    if (kind_ == region_kind::io || kind_ == region_kind::reservation) {
        guard_device_ = dynamic_cast_to<device>(owner_);
        guard_enabled_ = guard_device_ != nullptr;
    }
    if (alias_) {
        memory_region_ref(*alias_);
        alias_->alias_users_.push_back(this);
    }
}

inline memory_region::~memory_region() {
    // An ownerless region is not counted by the flat views or the change
    // windows that point to it; only the writer frees one. Forget its windows
    // and wait until no reader can still be using an old view showing it.
    if (!counted_) {
        detail::memory_core::get().forget(this);
        if (!rcu::in_read_section()) rcu::synchronize();
    }
    // Unreachable now (no container, not a root, no alias to it: all
    // checked), so detaching the subregions changes no flat view and needs no
    // commit.
    enabled_ = false;
    by_addr_.clear();
    huge_subregions_.clear();
    while (!subregions_.empty()) {
        memory_region& sub = subregions_.front();
        subregions_.pop_front();
        sub.container_ = nullptr;
        memory_region_unref(sub);
    }
    if (alias_) {
        std::erase(alias_->alias_users_, this);
        memory_region_unref(*std::exchange(alias_, nullptr));
    }
    unmap_backing();
    delete[] dirty_.exchange(nullptr);
}

inline void detail::memory_core::changed(const memory_region* in, i128 lo, i128 hi) {
    note_writer();
    if (!full) {
        if (windows.size() < max_windows) {
            windows.push_back({in, lo, hi});
            if (in->counted()) {
                memory_region_ref(*const_cast<memory_region*>(in));
                window_refs.push_back(const_cast<memory_region*>(in));
            }
        } else {
            full = true;
            windows.clear();
        }
    }
    pending = true;
    if (depth == 0) commit();
}

inline void memory_region::set_dirty_log(bool on) {
    QOMEM_ASSERT(ram_ && !is_ram_device(), "dirty logging on '{}', which is not RAM", name_);
    if (on == dirty_log()) return;
    if (on) {
        auto* bits = new std::atomic<std::uint64_t>[(dirty_pages() + 63) / 64];
        for (std::size_t i = 0; i < (dirty_pages() + 63) / 64; ++i) bits[i].store(0);
        dirty_.store(bits, std::memory_order_release);
    } else {
        // Readers may still be marking: free the bits after they are gone.
        rcu::retire(dirty_.exchange(nullptr, std::memory_order_acq_rel), [](void* p) {
            delete[] static_cast<std::atomic<std::uint64_t>*>(p);
        });
    }
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
    if (p || !(ram_ || kind_ == region_kind::rom_device)) return p;
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
    if (ram_ && readonly()) return "rom";
    if (ram_) return "ram";
    return "i/o";
}

inline bool memory_region::reaches(const memory_region& target) const {
    std::vector<const memory_region*> stack{this};
    std::unordered_set<const memory_region*> seen{this};
    while (!stack.empty()) {
        const memory_region* m = stack.back();
        stack.pop_back();
        if (m == &target) return true;
        auto push = [&](const memory_region* n) {
            if (seen.insert(n).second) stack.push_back(n);
        };
        if (m->alias_) push(m->alias_);
        for (const memory_region& s : m->subregions_) push(&s);
    }
    return false;
}

inline void memory_region::insert_sorted(memory_region& sub) {
    // Descending priority; a newcomer goes before the first sibling whose
    // priority it equals or beats, so among equals the last added wins.
    static std::uint64_t next_seq = 0;
    sub.add_seq_ = ++next_seq;
    auto it = subregions_.begin();
    while (it != subregions_.end() && it->priority_ > sub.priority_) ++it;
    subregions_.insert(it, sub);
    index_insert(sub);
}

inline void memory_region::index_insert(memory_region& sub) {
    if (sub.size_ > huge_size) {
        huge_subregions_.push_back(&sub);
    } else {
        by_addr_.emplace(sub.addr_, &sub);
        if (sub.size_ > max_small_size_) max_small_size_ = sub.size_;
    }
}

inline void memory_region::index_erase(memory_region& sub) {
    if (auto h = std::find(huge_subregions_.begin(), huge_subregions_.end(), &sub);
        h != huge_subregions_.end()) {
        huge_subregions_.erase(h);
        return;
    }
    auto [b, e] = by_addr_.equal_range(sub.addr_);
    for (auto it = b; it != e; ++it)
        if (it->second == &sub) {
            by_addr_.erase(it);
            return;
        }
}

template <class F>
void memory_region::for_each_subregion_in(i128 lo, i128 hi, F&& f) const {
    if (subregions_.size() <= index_threshold) {
        for (const memory_region& s : subregions_) f(const_cast<memory_region&>(s));
        return;
    }
    // Candidates from the index, then back into render order.
    std::vector<memory_region*> found(huge_subregions_.begin(), huge_subregions_.end());
    if (hi > 0 && lo < i128(u128_2_64)) {
        const i128 from = lo - i128(max_small_size_);
        auto it = from <= 0 ? by_addr_.begin() : by_addr_.lower_bound(static_cast<hwaddr>(from));
        for (; it != by_addr_.end() && i128(it->first) < hi; ++it)
            if (i128(it->first) + i128(it->second->size_) > lo) found.push_back(it->second);
    }
    std::sort(found.begin(), found.end(), [](const memory_region* a, const memory_region* b) {
        return a->priority_ != b->priority_ ? a->priority_ > b->priority_ : a->add_seq_ > b->add_seq_;
    });
    for (memory_region* s : found) f(*s);
}

inline void memory_region::add_subregion(hwaddr offset, memory_region& sub, std::int32_t priority) {
    QOMEM_ASSERT(!alias_, "cannot add subregion '{}' to alias '{}': aliases have no subregions",
                 sub.name_, name_);
    QOMEM_ASSERT(!sub.container_, "region '{}' is already a subregion of '{}'", sub.name_,
                 sub.container_ ? sub.container_->name_ : std::string());
    if (&sub == this || sub.reaches(*this))
        throw region_error(fmt::format(
            "adding '{}' as a subregion of '{}' would make a cycle: '{}' already leads back to "
            "'{}' through its subregions or alias targets",
            sub.name_, name_, sub.name_, name_));
    memory_region_ref(sub);
    sub.container_ = this;
    sub.addr_ = offset;
    sub.priority_ = priority;
    insert_sorted(sub);
    changed_inside(i128(offset), i128(offset) + i128(sub.size_));
}

inline void memory_region::del_subregion(memory_region& sub) {
    QOMEM_ASSERT(sub.container_ == this, "region '{}' is not a subregion of '{}'", sub.name_,
                 name_);
    subregions_.erase(subregions_.iterator_to(sub));
    index_erase(sub);
    sub.container_ = nullptr;
    auto& core = detail::memory_core::get();
    if (!sub.counted_ && core.depth > 0 && sub.ref_count() > 0) {
        sub.ref();
        core.held_until_commit.push_back(&sub);
    }
    try {
        changed_inside(i128(sub.addr_), i128(sub.addr_) + i128(sub.size_));
    } catch (...) {
        memory_region_unref(sub); // the container's reference: sub is out already
        throw;
    }
    memory_region_unref(sub);
}

inline void memory_region::set_enabled(bool enabled) {
    if (enabled == enabled_) return;
    enabled_ = enabled;
    changed_whole();
}

inline void memory_region::set_readonly(bool readonly) {
    if (readonly == readonly_.load(std::memory_order_relaxed)) return;
    readonly_.store(readonly, std::memory_order_relaxed);
    changed_whole();
}

inline void memory_region::set_nonvolatile(bool nonvolatile) {
    if (nonvolatile == nonvolatile_) return;
    nonvolatile_ = nonvolatile;
    changed_whole();
}

inline void memory_region::set_romd(bool romd) {
    QOMEM_ASSERT(is_rom_device(), "set_romd on '{}', which is not a ROM device", name_);
    if (romd == romd_mode_.load(std::memory_order_relaxed)) return;
    romd_mode_.store(romd, std::memory_order_relaxed);
    changed_whole();
}

inline void memory_region::set_address(hwaddr addr) {
    if (addr == addr_) return;
    if (!container_) {
        // A root moves everything it renders: render its views anew.
        addr_ = addr;
        auto& core = detail::memory_core::get();
        core.full = true;
        core.windows.clear();
        core.changed(this, 0, 0);
        return;
    }
    memory_region& c = *container_;
    const i128 old_lo = i128(addr_);
    c.subregions_.erase(c.subregions_.iterator_to(*this));
    c.index_erase(*this);
    addr_ = addr;
    c.insert_sorted(*this);
    memory_transaction tx;
    c.changed_inside(old_lo, old_lo + i128(size_));
    c.changed_inside(i128(addr), i128(addr) + i128(size_));
}

inline void memory_region::set_alias_offset(hwaddr offset) {
    QOMEM_ASSERT(alias_, "set_alias_offset on '{}', which is not an alias", name_);
    if (offset == alias_offset_) return;
    alias_offset_ = offset;
    changed_whole();
}

inline void memory_region::set_size(u128 size) {
    if (size > u128_2_64)
        throw region_error(fmt::format("region '{}': size {} is larger than 2^64", name_,
                                       detail::hex(size)));
    if ((ram_ || kind_ == region_kind::rom_device) && size > backing_size_)
        throw region_error(fmt::format("region '{}': cannot grow RAM from {} to {} bytes", name_,
                                       detail::hex(backing_size_), detail::hex(size)));
    if (size == size_) return;
    const u128 old = size_;
    if (container_) container_->index_erase(*this);
    size_ = size;
    if (container_) container_->index_insert(*this);
    // In its container's coordinates, which stay put if the region moves
    // before the commit; and in its own, which reach the views rendered
    // from it and the aliases showing it.
    memory_transaction tx;
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
}

} // namespace qomem
