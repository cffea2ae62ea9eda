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
//  * The same on every other path (object::last_reference_dropped): when any
//    owner's last reference goes — a device never added to the tree, a plain
//    object (a GPU's host-memory blob), an owner finalized by its parent —
//    each of its regions still held beyond the owner (held_beyond_owner) is
//    unparented first and holds the owner; the owner is finalized when the
//    last of them is freed. Regions held only by the owner and its own other
//    regions are freed with it. An owner whose constructor throws after
//    placing a region has the region taken out of its container and no
//    longer named as its owner (object::owner_destroyed_unfinalized).
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
// RAM comes anonymous (reserved on first use), from the caller's memory, from
// a file or an fd (mapped at creation, with QEMU's options), or resizeable up
// to a maximum; RAM, ROM and ROM devices log writes for dirty-log clients
// (dirty_log.hpp), lock-free.
//
// Topology changes (add/delete a subregion, enable, move, ...) are made by the
// thread holding the system's writer role (memory_system::lock; a change made
// without it takes it for its own duration) and commit at once unless a
// transaction is open (`memory_transaction`).
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <atomic>
#include <bit>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <new>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <boost/intrusive/list_hook.hpp>
#include <fmt/core.h>

#include <qomem/assert.hpp>
#include <qomem/coalesced_mmio.hpp>
#include <qomem/detail/region_io.hpp>
#include <qomem/detail/region_refcount.hpp>
#include <qomem/detail/subregion_index.hpp>
#include <qomem/detail/topology_log.hpp>
#include <qomem/dirty_log.hpp>
#include <qomem/error.hpp>
#include <qomem/fwd.hpp>
#include <qomem/ioeventfd.hpp>
#include <qomem/log.hpp>
#include <qomem/memory_ops.hpp>
#include <qomem/object.hpp>
#include <qomem/rcu.hpp>
#include <qomem/types.hpp>

namespace qomem {

/// What a region is. `rom` is RAM that starts read-only; `reservation` is
/// MMIO without ops: it claims its range and every access to it fails;
/// `iommu` is an iommu_memory_region (iommu.hpp): a leaf of the flat view
/// whose accesses a device translates into another address space.
enum class region_kind : std::uint8_t {
    container,
    ram,
    rom,
    rom_device,
    io,
    ram_device,
    alias,
    reservation,
    iommu,
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
        /// Host memory: the caller's (ram from ptr, ram device), or a mapping
        /// the region owns (`owns_host`: file and fd RAM).
        void* host = nullptr;
        /// `host` is a mapping of `backing` bytes that the region unmaps
        /// when it is freed.
        bool owns_host = false;
        /// Bytes of host memory behind the region (0: `size`). Resizeable RAM
        /// reserves its maximum; file RAM its size rounded up to the file's
        /// page size.
        u128 backing = 0;
        /// The fd the RAM was mapped from; the region owns it (closes it when
        /// freed). -1 for anything else.
        int fd = -1;
        std::uint64_t fd_offset = 0;
        /// Starts read-only (ROM, RAM mapped read-only).
        bool readonly = false;
        /// False when `host` is mapped without write permission.
        bool host_writable = true;
        /// Resizeable RAM (QEMU's memory_region_init_resizeable_ram): the
        /// most `size` may grow to (0: not resizeable), and what to call when
        /// ram_resize changes the used size.
        u128 max_size = 0;
        std::function<void(memory_region&, std::uint64_t size, void* host)> resized = {};
        /// Priority of a region that is never added to a container (a root
        /// may carry one; it shows in the flat view). add_subregion sets it.
        std::int32_t priority = 0;
        /// RAM whose file another process can shrink (a vhost-user back-end's
        /// SHMEM_MAP): accesses copy under a SIGBUS guard (detail/fault_guard.hpp).
        bool backing_may_shrink = false;
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
    /// True while the region, unparented from its owner, holds one reference
    /// to it (dropped after the region is freed; see the header overview).
    /// Read-only, for tools that show who holds whom (reference_graph.hpp).
    bool holds_owner() const noexcept { return holds_owner_; }
    /// True while memory_region_ref/unref count in per-thread counters (an
    /// owned region that is still its owner's child: README, "Region
    /// reference counting").
    bool counted_per_thread() const noexcept {
        return percpu_word_.load(std::memory_order_relaxed) != 0;
    }
    /// The memory system this region belongs to, or null before it is placed
    /// in one (see the header overview).
    memory_system* system() const noexcept { return log_ ? &log_->system() : nullptr; }
    u128 size() const noexcept { return size_; }
    hwaddr addr() const noexcept { return addr_; }
    std::int32_t priority() const noexcept { return priority_; }
    bool enabled() const noexcept { return enabled_; }
    bool readonly() const noexcept { return readonly_.load(std::memory_order_relaxed); }
    bool nonvolatile() const noexcept { return nonvolatile_; }
    /// True when the ranges rendered through this region never merge with
    /// their neighbours (see set_unmergeable).
    bool unmergeable() const noexcept { return unmergeable_; }
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
    /// An iommu_memory_region (QEMU's memory_region_is_iommu).
    bool is_iommu() const noexcept { return kind_ == region_kind::iommu; }
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

    // ---- dirty logging (dirty_log.hpp) ----------------------------------------
    //
    // Regions with RAM behind them (RAM, ROM, ROM devices: logs_dirty()) log
    // writes for the clients in their dirty-log mask: one bitmap per client,
    // one bit per dirty_page_size bytes, kept for the region's life (turning
    // a client off stops the recording, it does not forget the bits).
    // Guest writes through an address space and DMA write mappings (at
    // unmap) mark them. The marking and reading functions may run on any
    // thread, lock-free; the bits are set and cleared atomically.

    /// True for the kinds whose writes can be logged (RAM, ROM, ROM device;
    /// not RAM devices, which are dispatched like MMIO).
    bool logs_dirty() const noexcept { return is_plain_ram() || is_rom_device(); }
    /// The clients this region logs for (QEMU's get_dirty_log_mask): those
    /// turned on with set_log, plus `migration` while the region's memory
    /// system tracks dirty memory globally. Any thread.
    std::uint8_t dirty_log_mask() const noexcept {
        std::uint8_t m = log_mask_.load(std::memory_order_relaxed);
        if (logs_dirty())
            if (const detail::topology_log* l = system_log())
                m = static_cast<std::uint8_t>(m |
                                              l->global_log_mask.load(std::memory_order_relaxed));
        return m;
    }
    /// True if `client` is in dirty_log_mask() (QEMU's is_logging).
    bool is_logging(dirty_client client) const noexcept {
        return dirty_log_mask() & dirty_mask_of(client);
    }
    /// Turns logging for `client` on or off (QEMU's set_log; QEMU allows only
    /// the VGA client here, qomem any). Counted: each set_log(true) needs its
    /// set_log(false). Requires (asserted): logs_dirty(); not more offs than
    /// ons. Effects: when the client's count leaves or reaches zero, the
    /// mask changes and the region's extent is recorded as changed (if it is
    /// enabled): at the commit, listeners see its ranges as region_nop
    /// followed by log_start or log_stop. References: none. Complexity: O(1)
    /// plus the commit. Throws: what the commit throws.
    void set_log(bool log, dirty_client client);
    /// Marks [addr, addr + size) of the region dirty for every client in
    /// dirty_log_mask() (QEMU's set_dirty), after memory was written outside
    /// guest accesses (a device writing its RAM through host_ptr()).
    /// Requires (asserted): logs_dirty(). Any thread. Complexity: O(pages).
    void set_dirty(hwaddr addr, hwaddr size) {
        QOMEM_ASSERT(logs_dirty(), "set_dirty on '{}', which has no RAM to log", name_);
        mark_dirty(addr, size);
    }
    /// set_dirty without the check: what guest writes call. Cheap when
    /// nothing is logged (one load, and for RAM of a memory system one more).
    void mark_dirty(hwaddr offset, hwaddr len) noexcept {
        const std::uint8_t mask = dirty_log_mask();
        if (mask == 0 || len == 0) [[likely]]
            return;
        mark_dirty_slow(mask, offset, len);
    }
    /// Marks the pages of [addr, addr + size) clean for `client` (QEMU's
    /// reset_dirty). Any thread. Complexity: O(pages).
    void reset_dirty(hwaddr addr, hwaddr size, dirty_client client) {
        (void)test_and_clear_dirty(addr, size, client);
    }
    /// True if a page overlapping [addr, addr + size) is dirty for `client`;
    /// clears those pages (QEMU's test_and_clear_dirty). Any thread.
    /// Requires (asserted, also for the functions below): `client` is one
    /// of dirty_log.hpp's.
    bool test_and_clear_dirty(hwaddr addr, hwaddr size, dirty_client client);
    /// True if a page overlapping [addr, addr + size) is dirty for `client`;
    /// changes nothing. Any thread.
    bool get_dirty(hwaddr addr, hwaddr size, dirty_client client) const;
    /// Asks the listeners to bring their logs in (log_sync on this region's
    /// sections, log_sync_global), copies `client`'s bits for [addr, addr +
    /// size) widened to whole 64-page words and clears them, then tells the
    /// listeners log_global_after_sync (QEMU's snapshot_and_clear_dirty).
    /// Requires (asserted): logs_dirty(); the range inside the region.
    /// Effects: takes the writer role of the region's system (if any) while
    /// listeners run. Throws: what a listener throws (the bits are then left
    /// as they were).
    dirty_bitmap_snapshot snapshot_and_clear_dirty(hwaddr addr, hwaddr size, dirty_client client);
    /// QEMU's snapshot_get_dirty: `snap.get_dirty(addr, size)`.
    bool snapshot_get_dirty(const dirty_bitmap_snapshot& snap, hwaddr addr, hwaddr size) const {
        return snap.get_dirty(addr, size);
    }
    /// Asks the listeners to clear their own logs for [start, start + len)
    /// of this region (log_clear on the intersecting sections that log;
    /// QEMU's clear_dirty_bitmap), e.g. after migration read those pages.
    /// Effects: takes the writer role of the region's system while they run.
    void clear_dirty_bitmap(hwaddr start, hwaddr len);

    /// The short form of earlier versions: logging for the VGA client on or
    /// off (not counted), whether it is on, and test-and-clear for it.
    void set_dirty_log(bool on) {
        if (on !=
            ((log_mask_.load(std::memory_order_relaxed) & dirty_mask_of(dirty_client::vga)) != 0))
            set_log(on, dirty_client::vga);
    }
    bool dirty_log() const noexcept { return is_logging(dirty_client::vga); }
    bool test_and_clear_dirty(hwaddr offset, hwaddr len) {
        return test_and_clear_dirty(offset, len, dirty_client::vga);
    }

    // ---- RAM ---------------------------------------------------------------

    /// The RAM's used length: its size rounded up to the host page size
    /// (QEMU's used_length). 0 for regions without host memory.
    u128 used_length() const noexcept { return has_host_memory() ? used_length_ : 0; }
    /// The most host memory behind the region (QEMU's max_length): the
    /// maximum size of resizeable RAM, else the used length.
    u128 max_length() const noexcept {
        return !has_host_memory() ? 0 : resizeable_ ? backing_size_ : used_length_;
    }
    /// True for RAM made with make_resizeable_ram.
    bool resizeable() const noexcept { return resizeable_; }
    /// Changes the size of resizeable RAM (QEMU's memory_region_ram_resize).
    /// The used length becomes `new_size` rounded up to the host page size;
    /// when that changes, the old used length is marked clean and the new
    /// one dirty for every client (its contents must be sent again); the
    /// region takes `new_size` as its size (set_size: the views change at
    /// the commit) and the `resized` callback is called with it and the host
    /// memory. When only the unaligned size changes, just the size and the
    /// callback. Requires (asserted): RAM. Throws: region_error when the
    /// used length would change and the RAM is not resizeable, or when it
    /// would exceed max_length(); nothing changes then. Complexity:
    /// O(pages) plus the commit.
    void ram_resize(u128 new_size);
    /// The fd the RAM was mapped from (the region's own duplicate), or -1
    /// (QEMU's memory_region_get_fd; an alias answers for its target).
    int fd() const noexcept { return alias_ ? alias_->fd() : fd_; }
    /// Where in that fd the RAM starts.
    std::uint64_t fd_offset() const noexcept { return alias_ ? alias_->fd_offset() : fd_offset_; }
    /// The page size of the memory behind the RAM: the huge page size for
    /// hugetlbfs files, else the host's.
    std::size_t ram_page_size() const noexcept { return page_size_; }

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
    /// True for RAM whose backing file can shrink under the program: its
    /// bytes are copied under a SIGBUS guard and never read on the fast path.
    bool backing_may_shrink() const noexcept { return backing_may_shrink_; }

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
    /// writes. Requires (asserted): not making writable a region whose host
    /// memory is mapped read-only. Effects, references, complexity: as
    /// set_enabled.
    void set_readonly(bool readonly);
    /// Marks the region non-volatile (shown as "nv-" in `info mtree`).
    /// Effects, references, complexity: as set_enabled.
    void set_nonvolatile(bool nonvolatile);
    /// Marks the region unmergeable (QEMU's set_unmergeable): the flat
    /// ranges rendered through it (it, or everything inside it for a
    /// container or an alias) never merge with adjacent ranges, so
    /// listeners are never told of a section larger than one region — for
    /// several aliases of one RAM region side by side, each to be mapped and
    /// unmapped on its own. Effects, references, complexity: as set_enabled.
    void set_unmergeable(bool unmergeable);
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

    // ---- ioeventfds and coalesced MMIO (ioeventfd.hpp, coalesced_mmio.hpp) --
    //
    // The hooks apply to the region's guest writes at once (as in QEMU);
    // listeners hear the change at the commit (now, or when the open
    // transaction ends): eventfd_add / eventfd_del, coalesced_io_add /
    // coalesced_io_del for every place the region shows.

    /// Adds an ioeventfd (QEMU's memory_region_add_eventfd): a write of
    /// `size` bytes at `offset` (of `data`, when `match_data`) signals `fd`
    /// instead of calling the ops. `fd` stays the caller's (never closed).
    /// Requires (asserted, nothing changed): size 0, 1, 2, 4 or 8;
    /// [offset, offset + size) inside the region; no match_data with size 0;
    /// fd >= 0; not already added. Effects: kept in QEMU's order; the views'
    /// ioeventfds are updated at the commit. References: none. Complexity:
    /// O(ioeventfds of the region) plus the commit. Throws: what the commit
    /// throws.
    void add_eventfd(hwaddr offset, unsigned size, bool match_data, std::uint64_t data, int fd);
    /// Removes the ioeventfd added with the same arguments (QEMU's
    /// memory_region_del_eventfd; `data` ignored without match_data).
    /// Requires (asserted, nothing changed): it was added. Effects,
    /// references, complexity, throws: as add_eventfd.
    void del_eventfd(hwaddr offset, unsigned size, bool match_data, std::uint64_t data, int fd);
    /// The region's ioeventfds, in QEMU's order (a copy). Any thread.
    std::vector<ioeventfd> eventfds() const;

    /// Coalesces writes to the whole region (QEMU's set_coalescing):
    /// clear_coalescing, then add_coalescing(0, size()). Effects, throws: as
    /// those.
    void set_coalescing();
    /// Lets writes to [offset, offset + size) be coalesced (QEMU's
    /// add_coalescing) and sets flush_coalesced. Requires (asserted, nothing
    /// changed): size > 0 and the range inside the region. Effects:
    /// listeners hear coalesced_io_add at the commit. References: none.
    /// Complexity: O(coalesced ranges) plus the commit. Throws: what the
    /// commit throws.
    void add_coalescing(hwaddr offset, u128 size);
    /// Drops every coalesced range (QEMU's clear_coalescing): if it had
    /// any, the system's ring is drained first and flush_coalesced is
    /// cleared; listeners hear coalesced_io_del at the commit. References:
    /// none. Throws: what the ops a drain calls or the commit throw.
    void clear_coalescing();
    /// The coalesced ranges, in the order they were added (a copy). Any thread.
    std::vector<coalesced_range> coalesced_ranges() const;
    /// Makes every access to this region that is not itself coalesced
    /// drain the ring first (QEMU's set_flush_coalesced). Effects: no
    /// commit (listeners are not concerned). Complexity: O(hooks).
    void set_flush_coalesced();
    /// Drains the ring, then clears the flag unless the region still has
    /// coalesced ranges (QEMU's clear_flush_coalesced). Throws: what the
    /// ops a drain calls throw.
    void clear_flush_coalesced();
    /// True when non-coalesced accesses drain the ring first. Any thread.
    bool flush_coalesced() const;

protected:
    inline ~memory_region() override;
    inline void on_unparent() override;
    inline after_free_action after_free() noexcept override;
    inline void check_finalizable() const override;
    inline void last_reference_dropped() override;

    inline void owner_destroyed_unfinalized(const object& owner) noexcept override;

public:
    bool follows_owner_out_of_tree() const noexcept override { return owner_ != nullptr; }
    /// True while the region is referenced beyond its owner's child property
    /// and the owner's own regions still in its tree (their containers and
    /// aliases): by a container or alias of something else, an address space,
    /// a flat view, a DMA mapping, or a ref_ptr kept anywhere (the owner's
    /// own included: see the README on cycles).
    inline bool held_beyond_owner(const object& owner) const noexcept override;

protected:
    std::int64_t distributed_refs() const noexcept override {
        return detail::region_refcount::snapshot(percpu_word_);
    }

private:
    friend void memory_region_ref(memory_region& mr);
    friend void memory_region_unref(memory_region& mr);
    friend ref_ptr<memory_region> make_region(const init_args& a);
    friend class memory_system;
    friend class address_space;
    template <class>
    friend class detail::subregion_index;
    friend struct detail::region_io_access;

    /// Throws region_error for a size above 2^64.
    static void check_size(std::string_view name, u128 size);
    /// set_size without its checks.
    void apply_size(u128 size);
    bool reaches(const memory_region& target) const;
    /// The system's log, read by any thread (set once, when the region joins).
    const detail::topology_log* system_log() const noexcept {
        return std::atomic_ref<detail::topology_log*>(const_cast<detail::topology_log*&>(log_))
            .load(std::memory_order_acquire);
    }
    using dirty_word = std::atomic<std::uint64_t>;
    /// `client` as an index. Requires (asserted): a client dirty_log.hpp names.
    unsigned client_index(dirty_client client) const;
    std::size_t dirty_pages() const noexcept {
        return static_cast<std::size_t>((backing_size_ + dirty_page_size - 1) / dirty_page_size);
    }
    std::size_t dirty_words() const noexcept { return (dirty_pages() + 63) / 64; }
    /// `client`'s bitmap; made (zeroed) on first use when `make` (null if
    /// that allocation fails: the marks are then lost, never the process).
    dirty_word* dirty_bitmap(unsigned client, bool make) const noexcept;
    void mark_dirty_slow(std::uint8_t mask, hwaddr offset, hwaddr len) const noexcept;
    /// Calls f(word index, bit mask) for the bitmap words covering the pages
    /// that overlap [offset, offset + len), clipped to the backing.
    template <class F>
    void for_each_dirty_word(hwaddr offset, hwaddr len, F&& f) const;
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
    /// Unless `same`, runs `set` and records the whole extent as changed,
    /// under the writer role (topology state is the writer's).
    template <class Set>
    void change_whole(bool same, Set&& set);
    /// Finalizes a region whose last reference was dropped (memory_system
    /// calls it on the writer).
    void finalize_now() { finalize_dropped(); }
    /// Ownerless: finalizes the region on the writer once no reader can be
    /// inside a view showing it (an RCU grace period from now).
    void retire_ownerless();
    /// Replaces the I/O hooks by `edit` applied to a copy, under the writer
    /// role; `topology`: listeners are concerned (a commit follows).
    template <class Edit>
    void change_io(bool topology, Edit&& edit);
    /// Drains the ring of this region's system (if it has one).
    void drain_coalesced_ring() const {
        if (log_ && log_->coalesced_mmio.outstanding() != 0) log_->flush_coalesced();
    }
    /// Starts per-thread counting (detail/region_refcount.hpp): called once
    /// the region is its owner's child, before anything else can see it.
    inline void count_per_thread();
    /// Ends it: the per-thread parts are folded into the atomic count, which
    /// is exact from then on. Effects: waits for threads inside a ref/unref
    /// of this region (never longer). Throws: what the assertion handler
    /// throws if the sum shows more unrefs than refs (count unchanged).
    inline void count_atomically();

    // Non-zero while counted per thread (the region's id there; see
    // detail/region_refcount.hpp). Mutable: held_beyond_owner ends it.
    mutable std::atomic<std::uint32_t> percpu_word_{0};
    bool percpu_done_ = false; // counted per thread once already: never again

    detail::region_io_slot io_; // ioeventfds, coalesced ranges, flush_coalesced
    detail::subregion_hook sub_hook_;
    std::uint64_t sub_seq_ = 0; // when added to its container (render order among equals)
    detail::subregion_index<memory_region> subregions_;

    std::string name_;
    object* owner_ = nullptr;
    detail::topology_log* log_ = nullptr; // the memory system, once placed in one
    bool counted_ = false;
    bool holds_owner_ = false;
    // Ownerless, removed inside a transaction: the number of the commit
    // whose views no longer show it (memory_system::retire_after_commit).
    std::uint64_t shown_until_commit_ = 0;
    // The memory system's list of its regions (memory_system::stranded_regions).
    using member_hook = boost::intrusive::list_member_hook<
        boost::intrusive::link_mode<boost::intrusive::normal_link>>;
    member_hook system_member_;
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
    bool owns_mapping_ = false;
    bool host_writable_ = true;
    bool unmergeable_ = false;
    int fd_ = -1; // owned
    std::uint64_t fd_offset_ = 0;
    bool backing_may_shrink_ = false;
    std::size_t page_size_ = 0;

    // Dirty logging: the clients turned on by set_log (with their counts;
    // writer only) and one lazily made bitmap per client (any thread).
    std::atomic<std::uint8_t> log_mask_{0};
    std::uint32_t log_counts_[dirty_client_count] = {};
    mutable std::atomic<dirty_word*> dirty_[dirty_client_count] = {};

    // Resizeable RAM.
    u128 used_length_ = 0;
    bool resizeable_ = false;
    std::function<void(memory_region&, std::uint64_t, void*)> resized_;
};

/// Takes a reference to the region itself (never its owner). Ownerless
/// regions are not counted: one branch. Any thread.
/// Requires: the caller holds a reference already, or reaches the region
/// through something that does (a view, its owner's tree).
/// Effects: while the region is its owner's child, +1 in a counter of this
/// thread's own (no atomic RMW: detail/region_refcount.hpp); otherwise +1 on
/// its atomic count. Complexity: O(1); wait-free but for a thread's first
/// call and while the region is switching to its atomic count. Throws:
/// nothing but through the assertion handler (a dead region).
[[gnu::always_inline]] inline void memory_region_ref(memory_region& mr) {
    if (!mr.counted_) return;
    if (!detail::region_refcount::add(mr.percpu_word_, 1)) mr.ref();
}
/// Drops a reference taken by memory_region_ref; the last one finalizes the
/// region (and may finalize its owner) on the thread holding its memory
/// system's writer role: here if this thread holds it or can take it at
/// once, otherwise handed to the holder, which finalizes it when it gives the
/// role back. Any thread.
/// Requires: a reference taken by memory_region_ref (on any thread).
/// Effects: while the region is its owner's child, -1 in this thread's
/// counter (it cannot be the last reference: the child property holds one;
/// an unbalanced unref is reported when the region leaves the tree);
/// otherwise -1 on its atomic count, as described above. Complexity and
/// Throws: as memory_region_ref, plus the finalization's.
[[gnu::always_inline]] inline void memory_region_unref(memory_region& mr) {
    if (!mr.counted_) return;
    if (!detail::region_refcount::add(mr.percpu_word_, -1)) mr.unref();
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
/// Adds `mr` as child "name[*]" of its home, if it has one.
inline void add_to_home(memory_region& mr, const memory_region::init_args& a) {
    if (object* home = a.where.home()) {
        std::string name;
        for (char c : a.name)
            name += c == '/' ? std::string_view("\\x2f") : std::string_view(&c, 1);
        home->add_child(name + "[*]", mr);
    }
}
} // namespace detail

/// Makes a region from `a` (what every make_* function below does).
inline ref_ptr<memory_region> make_region(const memory_region::init_args& a) {
    auto mr = make<memory_region>(a);
    detail::add_to_home(*mr, a);
    mr->count_per_thread();
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
/// Resizeable RAM (QEMU's memory_region_init_resizeable_ram): `size` bytes
/// used now, host memory reserved (MAP_NORESERVE, on first use) for up to
/// `max_size`; ram_resize changes the used size and calls `resized` (may be
/// empty) with the region, its new size and its host memory.
/// Throws: region_error for a size above 2^64 or above `max_size`.
inline ref_ptr<memory_region> make_resizeable_ram(
    region_owner where, std::string_view name, u128 size, u128 max_size,
    std::function<void(memory_region&, std::uint64_t size, void* host)> resized = {}) {
    if (max_size == 0)
        throw region_error(fmt::format("resizeable RAM '{}' needs a maximum size", name));
    memory_region::init_args a{where, std::string(name), region_kind::ram, size};
    a.max_size = max_size;
    a.resized = std::move(resized);
    return make_region(a);
}

/// How RAM is mapped from a file or an fd (QEMU's RAM_* flags for them).
struct ram_file_options {
    /// MAP_SHARED (QEMU's RAM_SHARED): writes reach the file and every other
    /// mapping of it. False: a private copy-on-write mapping.
    bool shared = true;
    /// Mapped without write permission (RAM_READONLY): the region is
    /// read-only, guest writes are ignored, not even a debug write stores.
    bool readonly = false;
    /// make_ram_from_file only: open the file read-only (RAM_READONLY_FD);
    /// it must exist and be large enough. With `shared` and not `readonly`
    /// the mapping cannot be made and creation fails.
    bool readonly_fd = false;
    /// Where in the file the RAM starts; a multiple of the file's page size.
    std::uint64_t offset = 0;
};

/// RAM mapped from `fd` now (QEMU's memory_region_init_ram_from_fd), `size`
/// bytes from `opts.offset`, rounded up to the file's page size (the huge
/// page size on hugetlbfs). An empty regular file opened for writing is
/// first extended to `offset + size`, as QEMU does. The region keeps its own
/// duplicate of `fd` (fd()); the caller may close theirs.
/// Throws: region_error, naming the values, when the mapping cannot be made
/// — a bad fd, a size of 0 or below the page size, an unaligned offset, a
/// regular file too small, a shared writable mapping of a read-only fd, a
/// failing mmap — and nothing is left behind. Never later, at first use.
ref_ptr<memory_region> make_ram_from_fd(region_owner where, std::string_view name, u128 size,
                                        int fd, const ram_file_options& opts);
/// The same with a shared (or, with `shared` false, private) writable mapping.
inline ref_ptr<memory_region> make_ram_from_fd(region_owner where, std::string_view name, u128 size,
                                               int fd, std::uint64_t offset, bool shared = true) {
    ram_file_options o;
    o.shared = shared;
    o.offset = offset;
    return make_ram_from_fd(where, name, size, fd, o);
}
/// RAM mapped from the file at `path` (QEMU's memory_region_init_ram_from_file):
/// opened for reading and writing (created if missing), or read-only with
/// `opts.readonly_fd`; when `path` is a directory (a hugetlbfs mount, say),
/// a new file in it that is unlinked at once, as QEMU does. Then as
/// make_ram_from_fd; the region owns the fd it opened.
/// Throws: region_error when the file cannot be opened or created, or the
/// mapping cannot be made (see make_ram_from_fd); a file this call created
/// is removed again.
ref_ptr<memory_region> make_ram_from_file(region_owner where, std::string_view name, u128 size,
                                          const std::string& path,
                                          const ram_file_options& opts = {});
/// RAM in the caller's memory (`host` must stay valid for the region's life).
inline ref_ptr<memory_region> make_ram_from_ptr(region_owner where, std::string_view name,
                                                u128 size, void* host) {
    memory_region::init_args a{where, std::string(name), region_kind::ram, size};
    a.host = host;
    return make_region(a);
}
/// A RAM device: the caller's memory, always dispatched like MMIO.
inline ref_ptr<memory_region> make_ram_device(region_owner where, std::string_view name, u128 size,
                                              void* host) {
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

/// The host's page size.
inline std::uint64_t host_page_size() noexcept {
    static const std::uint64_t size = [] {
        const long s = ::sysconf(_SC_PAGESIZE);
        return s > 0 ? static_cast<std::uint64_t>(s) : std::uint64_t{4096};
    }();
    return size;
}

/// The page size of the memory behind `fd`: the huge page size on
/// hugetlbfs (QEMU's qemu_fd_getpagesize), else the host's.
inline std::size_t fd_page_size(int fd) noexcept {
    constexpr long hugetlbfs_magic = 0x958458f6;
    struct statfs fs;
    if (fd >= 0 && ::fstatfs(fd, &fs) == 0 && static_cast<long>(fs.f_type) == hugetlbfs_magic &&
        fs.f_bsize > 0)
        return static_cast<std::size_t>(fs.f_bsize);
    return host_page_size();
}

/// `v` rounded up to a multiple of `align` (a power of two).
inline u128 align_up(u128 v, std::size_t align) noexcept { return (v + align - 1) / align * align; }

/// Maps `size` bytes of `fd` for make_ram_from_fd / make_ram_from_file and
/// makes the region; `owned_fd` is closed on failure (the caller's fd is
/// duplicated first). Every check happens before the mapping.
inline ref_ptr<memory_region> map_file_ram(region_owner where, std::string_view name, u128 size,
                                           int fd, bool fd_is_ours, const ram_file_options& opts,
                                           std::string_view what) {
    struct fd_guard {
        int fd;
        ~fd_guard() {
            if (fd >= 0) ::close(fd);
        }
    } guard{fd_is_ours ? fd : -1};
    auto refuse = [&](const std::string& why) {
        return region_error(fmt::format("RAM '{}' from {}: {}", name, what, why));
    };
    if (size > u128_2_64) throw refuse(fmt::format("size {} is larger than 2^64", hex(size)));
    const int fl = ::fcntl(fd, F_GETFL);
    if (fd < 0 || fl < 0) throw refuse(fmt::format("fd {} is not open", fd));
    const bool fd_writable = (fl & O_ACCMODE) != O_RDONLY;
    const std::size_t page = fd_page_size(fd);
    if (size == 0 || size < page)
        throw refuse(fmt::format("size {} is below the page size {:#x}", hex(size), page));
    if (opts.offset % page)
        throw refuse(fmt::format("offset {:#x} is not a multiple of the page size {:#x}",
                                 opts.offset, page));
    const u128 len = align_up(size, page);
    if (u128(opts.offset) + len > u128(std::numeric_limits<off_t>::max()) || len >= (u128(1) << 63))
        throw refuse(
            fmt::format("offset {:#x} + size {} is too large to map", opts.offset, hex(len)));
    if (opts.shared && !opts.readonly && !fd_writable)
        throw refuse(fmt::format("fd {} is open read-only: it cannot be mapped shared and writable "
                                 "(ask for readonly, or a private mapping)",
                                 fd));
    struct stat st;
    if (::fstat(fd, &st) != 0)
        throw refuse(fmt::format("fstat of fd {}: {}", fd, std::strerror(errno)));
    if (S_ISREG(st.st_mode)) {
        const u128 need = u128(opts.offset) + len;
        // An empty file is extended (QEMU does); any other size must be enough.
        if (st.st_size == 0 && fd_writable && ::ftruncate(fd, static_cast<off_t>(need)) == 0 &&
            ::fstat(fd, &st) != 0)
            throw refuse(fmt::format("fstat of fd {}: {}", fd, std::strerror(errno)));
        if (u128(static_cast<std::uint64_t>(st.st_size)) < need)
            throw refuse(fmt::format("the file is {:#x} bytes, {:#x} needed (offset {:#x} + {})",
                                     static_cast<std::uint64_t>(st.st_size),
                                     static_cast<std::uint64_t>(need), opts.offset, hex(len)));
    }
    void* host =
        ::mmap(nullptr, static_cast<std::size_t>(len), PROT_READ | (opts.readonly ? 0 : PROT_WRITE),
               opts.shared ? MAP_SHARED : MAP_PRIVATE, fd, static_cast<off_t>(opts.offset));
    if (host == MAP_FAILED)
        throw refuse(fmt::format("mmap of {} bytes at offset {:#x} ({}, {}) failed: {}", hex(len),
                                 opts.offset, opts.shared ? "shared" : "private",
                                 opts.readonly ? "read-only" : "writable", std::strerror(errno)));
    int own = fd;
    if (!fd_is_ours) {
        own = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
        if (own < 0) {
            const int err = errno;
            ::munmap(host, static_cast<std::size_t>(len));
            throw refuse(fmt::format("cannot duplicate fd {}: {}", fd, std::strerror(err)));
        }
    }
    guard.fd = -1;
    memory_region::init_args a{where, std::string(name), region_kind::ram, size};
    a.host = host;
    a.owns_host = true;
    a.backing = len;
    a.fd = own;
    a.fd_offset = opts.offset;
    a.readonly = opts.readonly;
    a.host_writable = !opts.readonly;
    ref_ptr<memory_region> mr;
    try {
        mr = make<memory_region>(a);
    } catch (...) {
        ::munmap(host, static_cast<std::size_t>(len));
        ::close(own);
        throw;
    }
    add_to_home(*mr, a); // on a throw, dropping `mr` unmaps and closes
    return mr;
}
} // namespace detail

inline ref_ptr<memory_region> make_ram_from_fd(region_owner where, std::string_view name, u128 size,
                                               int fd, const ram_file_options& opts) {
    return detail::map_file_ram(where, name, size, fd, false, opts, fmt::format("fd {}", fd));
}

inline ref_ptr<memory_region> make_ram_from_file(region_owner where, std::string_view name,
                                                 u128 size, const std::string& path,
                                                 const ram_file_options& opts) {
    auto refuse = [&](const std::string& why) {
        return region_error(fmt::format("RAM '{}' from '{}': {}", name, path, why));
    };
    std::string created; // a file this call made, removed again on failure
    int fd = ::open(path.c_str(), (opts.readonly_fd ? O_RDONLY : O_RDWR) | O_CLOEXEC);
    if (fd < 0 && errno == EISDIR) {
        if (opts.readonly_fd) throw refuse("a directory: no file to open read-only (readonly_fd)");
        // A fresh file in the directory, unlinked at once: nothing else sees it.
        std::string tmpl = path + "/qomem_back_mem.";
        for (char c : name) tmpl += (c == '/' ? '_' : c);
        tmpl += ".XXXXXX";
        fd = ::mkostemp(tmpl.data(), O_CLOEXEC);
        if (fd < 0)
            throw refuse(fmt::format("cannot create a file in it: {}", std::strerror(errno)));
        ::unlink(tmpl.c_str());
    } else if (fd < 0 && errno == ENOENT && !opts.readonly_fd) {
        fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (fd >= 0) created = path;
    }
    if (fd < 0)
        throw refuse(fmt::format("cannot open it{}: {}", opts.readonly_fd ? " read-only" : "",
                                 std::strerror(errno)));
    try {
        return detail::map_file_ram(where, name, size, fd, true, opts, fmt::format("'{}'", path));
    } catch (...) {
        if (!created.empty()) ::unlink(created.c_str());
        throw;
    }
}

inline void memory_region::check_size(std::string_view name, u128 size) {
    if (size > u128_2_64)
        throw region_error(
            fmt::format("region '{}': size {} is larger than 2^64", name, detail::hex(size)));
}

inline memory_region::memory_region(const init_args& a)
    : name_(a.name), owner_(a.where.owner()), counted_(a.where.owner() != nullptr), kind_(a.kind),
      size_(a.size), backing_size_(a.backing != 0 ? a.backing : a.size), priority_(a.priority),
      callbacks_(a.callbacks), host_writable_(a.host_writable), fd_(a.fd), fd_offset_(a.fd_offset),
      backing_may_shrink_(a.backing_may_shrink), page_size_(detail::host_page_size()) {
    check_size(a.name, a.size);
    if (kind_ == region_kind::rom || a.readonly) readonly_.store(true, std::memory_order_relaxed);
    if (kind_ == region_kind::alias) {
        if (!a.alias) throw region_error(fmt::format("alias region '{}' has no target", a.name));
        alias_ = a.alias;
        alias_offset_ = a.alias_offset;
    }
    if (a.max_size != 0) {
        if (a.max_size < a.size)
            throw region_error(
                fmt::format("resizeable RAM '{}': size {} is larger than its maximum {}", a.name,
                            detail::hex(a.size), detail::hex(a.max_size)));
        check_size(a.name, a.max_size);
        resizeable_ = true;
        resized_ = a.resized;
        backing_size_ = detail::align_up(a.max_size, page_size_);
    }
    if (a.owns_host) {
        page_size_ = detail::fd_page_size(a.fd);
        owns_mapping_ = true;
    }
    // Memory the region maps itself comes in whole pages; the caller's is
    // exactly `size` bytes.
    used_length_ = a.host && !a.owns_host ? size_ : detail::align_up(size_, page_size_);
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
            log_->region_bound(*this);
        }
    }
}

inline memory_region::~memory_region() {
    // Every way out of the owner's tree ends per-thread counting first; this
    // only gives back the id of a region destroyed some other way (misuse).
    detail::region_refcount::discard(percpu_word_);
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
    for (auto& bits : dirty_) delete[] bits.exchange(nullptr);
    if (fd_ >= 0) ::close(std::exchange(fd_, -1));
    if (log_) log_->region_unbound(*this); // may free the system: last
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
        // A region removed inside a transaction still shows in the published
        // views: its grace period starts once the commit replaced them.
        check_dropped();
        if (!log_->retire_after_commit(*this)) retire_ownerless();
    }
}

inline void memory_region::retire_ownerless() {
    rcu::retire(this, [](void* p) {
        auto* mr = static_cast<memory_region*>(p);
        mr->log_->finalize_on_writer(*mr);
    });
}

inline void memory_region::dma_hold() noexcept {
    if (counted_)
        memory_region_ref(*this);
    else
        dma_users_.fetch_add(1, std::memory_order_relaxed);
}

inline void memory_region::dma_release() noexcept {
    if (counted_)
        memory_region_unref(*this);
    else
        dma_users_.fetch_sub(1,
                             std::memory_order_release); // pairs with check_finalizable's acquire
}

inline void memory_region::set_log(bool log, dirty_client client) {
    const unsigned c = client_index(client);
    QOMEM_ASSERT(logs_dirty(), "dirty logging on '{}', which is not RAM", name_);
    QOMEM_ASSERT(log || log_counts_[c] > 0,
                 "set_log(false) on '{}' for client {} more often than set_log(true)", name_, c);
    detail::writer_hold w(log_);
    const std::uint32_t old = log_counts_[c];
    const std::uint32_t now = log ? old + 1 : old - 1;
    // The bitmap exists before the mask says the client logs (a failure
    // changes nothing).
    if (old == 0 && !dirty_bitmap(c, true)) throw std::bad_alloc();
    log_counts_[c] = now;
    if ((old != 0) == (now != 0)) return;
    const std::uint8_t bit = dirty_mask_of(client);
    const std::uint8_t mask = log_mask_.load(std::memory_order_relaxed);
    log_mask_.store(static_cast<std::uint8_t>(log ? mask | bit : mask & ~bit),
                    std::memory_order_relaxed);
    if (enabled_) changed_whole();
}

inline memory_region::dirty_word* memory_region::dirty_bitmap(unsigned client,
                                                              bool make) const noexcept {
    dirty_word* bits = dirty_[client].load(std::memory_order_acquire);
    if (bits || !make || !logs_dirty()) return bits;
    // Value-initialised: every word 0. Made on first use by whichever thread
    // marks first; the loser of a race frees its copy.
    auto* fresh = new (std::nothrow) dirty_word[dirty_words()]();
    if (!fresh) return nullptr;
    if (!dirty_[client].compare_exchange_strong(bits, fresh, std::memory_order_acq_rel)) {
        delete[] fresh;
        return bits;
    }
    return fresh;
}

template <class F>
void memory_region::for_each_dirty_word(hwaddr offset, hwaddr len, F&& f) const {
    const u128 end = std::min<u128>(u128(offset) + len, u128(dirty_pages()) * dirty_page_size);
    if (len == 0 || u128(offset) >= end) return;
    const u128 first = offset / dirty_page_size;
    const u128 last = (end - 1) / dirty_page_size; // inclusive
    for (u128 w = first / 64; w <= last / 64; ++w) {
        const unsigned lo = w == first / 64 ? static_cast<unsigned>(first % 64) : 0;
        const unsigned hi = w == last / 64 ? static_cast<unsigned>(last % 64) : 63;
        const std::uint64_t bits =
            (hi == 63 ? ~std::uint64_t(0) : (std::uint64_t(1) << (hi + 1)) - 1) &
            ~((std::uint64_t(1) << lo) - 1);
        f(static_cast<std::size_t>(w), bits);
    }
}

inline void memory_region::mark_dirty_slow(std::uint8_t mask, hwaddr offset,
                                           hwaddr len) const noexcept {
    for (unsigned c = 0; c < dirty_client_count; ++c) {
        if (!(mask >> c & 1)) continue;
        dirty_word* bits = dirty_bitmap(c, true);
        if (!bits) continue;
        for_each_dirty_word(offset, len, [&](std::size_t w, std::uint64_t m) {
            // A plain load first: a page written again and again stays one
            // read of a shared cache line, not a locked write per access.
            if ((bits[w].load(std::memory_order_relaxed) & m) != m)
                bits[w].fetch_or(m, std::memory_order_relaxed);
        });
    }
}

inline unsigned memory_region::client_index(dirty_client client) const {
    const auto c = static_cast<unsigned>(client);
    QOMEM_ASSERT(c < dirty_client_count, "region '{}': no dirty-log client {}", name_, c);
    return c;
}

inline bool memory_region::test_and_clear_dirty(hwaddr addr, hwaddr size, dirty_client client) {
    dirty_word* bits = dirty_bitmap(client_index(client), false);
    if (!bits) return false;
    bool dirty = false;
    for_each_dirty_word(addr, size, [&](std::size_t w, std::uint64_t m) {
        if (bits[w].load(std::memory_order_relaxed) & m)
            dirty |= (bits[w].fetch_and(~m, std::memory_order_relaxed) & m) != 0;
    });
    return dirty;
}

inline bool memory_region::get_dirty(hwaddr addr, hwaddr size, dirty_client client) const {
    const dirty_word* bits = dirty_bitmap(client_index(client), false);
    if (!bits) return false;
    bool dirty = false;
    for_each_dirty_word(addr, size, [&](std::size_t w, std::uint64_t m) {
        dirty |= (bits[w].load(std::memory_order_relaxed) & m) != 0;
    });
    return dirty;
}

inline dirty_bitmap_snapshot memory_region::snapshot_and_clear_dirty(hwaddr addr, hwaddr size,
                                                                     dirty_client client) {
    QOMEM_ASSERT(logs_dirty(), "snapshot_and_clear_dirty on '{}', which has no RAM to log", name_);
    const unsigned c = client_index(client);
    QOMEM_ASSERT(u128(addr) + size <= size_,
                 "snapshot_and_clear_dirty on '{}': [{:#x}, +{:#x}) is not inside its {} bytes",
                 name_, addr, size, detail::hex(size_));
    if (log_) log_->sync_dirty_log(*this);
    // Whole words, as QEMU: bits are copied 64 pages at a time.
    constexpr hwaddr word_span = 64 * dirty_page_size;
    const hwaddr start = addr / word_span * word_span;
    const u128 limit = u128(dirty_pages()) * dirty_page_size;
    const u128 want_end = (u128(addr) + size + word_span - 1) / word_span * word_span;
    const auto end = static_cast<hwaddr>(std::min(want_end, std::max<u128>(limit, start)));
    std::vector<std::uint64_t> words(
        static_cast<std::size_t>((end - start + word_span - 1) / word_span));
    if (dirty_word* bits = dirty_bitmap(c, false))
        for (std::size_t i = 0; i < words.size(); ++i)
            words[i] = bits[start / word_span + i].exchange(0, std::memory_order_relaxed);
    if (log_) log_->after_dirty_log_sync();
    return dirty_bitmap_snapshot(start, end, std::move(words));
}

inline void memory_region::clear_dirty_bitmap(hwaddr start, hwaddr len) {
    if (log_) log_->clear_dirty_log(*this, start, len);
}

inline void memory_region::ram_resize(u128 new_size) {
    QOMEM_ASSERT(is_plain_ram(), "ram_resize on '{}', which is not RAM", name_);
    check_size(name_, new_size);
    const u128 used = detail::align_up(new_size, page_size_);
    detail::writer_hold w(log_);
    if (used == used_length_) {
        if (new_size != size_) {
            // Within the used length: host memory is there (mapped in whole
            // pages, or the caller's: then the used length is its size).
            apply_size(new_size);
            if (resized_)
                resized_(*this, static_cast<std::uint64_t>(new_size), host_ptr_if_mapped());
        }
        return;
    }
    if (!resizeable_)
        throw region_error(
            fmt::format("RAM '{}' is not resizeable: its used length {} cannot become {}", name_,
                        detail::hex(used_length_), detail::hex(used)));
    if (used > backing_size_)
        throw region_error(fmt::format("RAM '{}' cannot grow to {}: its maximum is {}", name_,
                                       detail::hex(used), detail::hex(backing_size_)));
    // Every client sees the whole new extent as written (QEMU: the contents
    // must be sent again); the bitmaps exist before anything changes.
    for (unsigned c = 0; c < dirty_client_count; ++c)
        if (!dirty_bitmap(c, true)) throw std::bad_alloc();
    for (unsigned c = 0; c < dirty_client_count; ++c)
        reset_dirty(0, static_cast<hwaddr>(std::min<u128>(used_length_, ~hwaddr(0))),
                    static_cast<dirty_client>(c));
    used_length_ = used;
    mark_dirty_slow(dirty_clients_all, 0, static_cast<hwaddr>(std::min<u128>(used, ~hwaddr(0))));
    apply_size(new_size);
    if (resized_) resized_(*this, static_cast<std::uint64_t>(new_size), host_ptr_if_mapped());
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
    void* m = ::mmap(nullptr, len, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
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
        // Release: a thread marking the region dirty reads it (system_log).
        std::atomic_ref<detail::topology_log*>(m->log_).store(&log, std::memory_order_release);
        log.region_bound(*m);
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
    // An ownerless region is not counted by the published view: if its last
    // handle goes before the commit replaced that view, its finalization
    // waits for the commit (misuse is still reported at the drop).
    if (!sub.counted_ && log_) log_->shown_until_commit(sub);
    try {
        changed_inside(i128(sub.addr_), i128(sub.addr_) + i128(sub.size_));
    } catch (...) {
        memory_region_unref(sub); // the container's reference: sub is out already
        throw;
    }
    memory_region_unref(sub);
}

template <class Set>
void memory_region::change_whole(bool same, Set&& set) {
    if (same) return;
    detail::writer_hold w(log_);
    set();
    changed_whole();
}

inline void memory_region::set_enabled(bool enabled) {
    change_whole(enabled == enabled_, [&] { enabled_ = enabled; });
}

inline void memory_region::set_readonly(bool readonly) {
    QOMEM_ASSERT(readonly || host_writable_,
                 "region '{}' cannot be made writable: its memory is mapped read-only", name_);
    change_whole(readonly == this->readonly(),
                 [&] { readonly_.store(readonly, std::memory_order_relaxed); });
}

inline void memory_region::set_nonvolatile(bool nonvolatile) {
    change_whole(nonvolatile == nonvolatile_, [&] { nonvolatile_ = nonvolatile; });
}

inline void memory_region::set_unmergeable(bool unmergeable) {
    detail::writer_hold w(log_);
    if (unmergeable == unmergeable_) return;
    unmergeable_ = unmergeable;
    changed_whole();
}

inline void memory_region::set_romd(bool romd) {
    QOMEM_ASSERT(is_rom_device(), "set_romd on '{}', which is not a ROM device", name_);
    change_whole(romd == romd_mode(), [&] { romd_mode_.store(romd, std::memory_order_relaxed); });
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
    change_whole(offset == alias_offset_, [&] { alias_offset_ = offset; });
}

inline void memory_region::set_size(u128 size) {
    check_size(name_, size);
    if (has_host_memory() && size > backing_size_)
        throw region_error(fmt::format("region '{}': cannot grow RAM from {} to {} bytes", name_,
                                       detail::hex(backing_size_), detail::hex(size)));
    apply_size(size);
}

inline void memory_region::apply_size(u128 size) {
    detail::writer_hold w(log_);
    if (size == size_) return;
    const u128 old = size_;
    size_ = size;
    if (container_) container_->subregions_.resized(*this, old);
    // In its container's coordinates, which stay put if the region moves
    // before the commit; and in its own, which reach the views rendered
    // from it and the aliases showing it.
    detail::region_transaction tx(log_);
    if (container_)
        container_->changed_inside(i128(addr_), i128(addr_) + i128(std::max(old, size)));
    changed_inside(0, i128(std::max(old, size)));
}

inline void memory_region::count_per_thread() {
    if (!counted_ || percpu_done_ || !owner_ || parent() != owner_) return;
    percpu_done_ = true;
    // Relaxed: the region is published to other threads after this, through
    // whatever gives them the handle (a happens-before edge).
    percpu_word_.store(detail::region_refcount::allocate_id(), std::memory_order_relaxed);
}

inline void memory_region::count_atomically() {
    detail::region_refcount::kill_and_sum(percpu_word_, [&](std::int64_t sum) {
        if (sum != 0) fold_refs(sum);
    });
}

inline void memory_region::on_unparent() {
    // From here the count matters: the owner's child property no longer
    // pins the region (README, "Region reference counting").
    count_atomically();
    if (owner_ && parent() == owner_ && !holds_owner_) {
        if (owner_->ref_count() == 0) {
            // The owner is being finalized and is releasing its children.
            // By the owners' rule (object::last_reference_dropped) nothing
            // beyond the owner holds this region now: it is freed with the
            // owner's other regions, and never reaches the owner again.
            owner_ = nullptr;
        } else {
            // From now on the region holds its owner, once, until it is freed
            // (added back as the owner's child and unparented again, it does
            // not take a second reference).
            owner_->ref();
            holds_owner_ = true;
        }
    }
    object::on_unparent();
}

inline bool memory_region::held_beyond_owner(const object& owner) const noexcept {
    if (!counted_ || owner_ != &owner) return false;
    // The owner is going: the region leaves the tree with it either way, and
    // the comparison below needs the exact count. A sum showing more unrefs
    // than refs goes to the assertion handler; one that throws is stopped
    // here (noexcept) and the region is treated as held (kept, not freed
    // under a holder the counts lost).
    try {
        const_cast<memory_region*>(this)->count_atomically();
    } catch (...) {
        return true;
    }
    auto own = [&](const memory_region* r) { return r->owner_ == &owner && r->parent() == &owner; };
    std::uint32_t internal = parent() == &owner ? 1 : 0; // the child property
    if (container_ && own(container_)) ++internal;
    for (const memory_region* a : alias_users_)
        if (own(a)) ++internal;
    return ref_count() > internal;
}

inline void memory_region::owner_destroyed_unfinalized(const object& owner) noexcept {
    // The child property is dropped next without an unparent hook: the count
    // must be exact before that unref. (A misuse report cannot leave here.)
    try {
        count_atomically();
    } catch (...) {
    }
    if (owner_ != &owner) return;
    // Out of the guest's view at the next commit (now, unless a transaction
    // is open), and no longer naming the owner (info mtree -o).
    if (container_ && container_->owner_ != &owner) {
        try {
            container_->del_subregion(*this);
        } catch (...) {
            log_line(log_category::lifetime,
                     fmt::format("qomem: region '{}' could not be removed from '{}' when its owner "
                                 "{} was destroyed by a throwing constructor",
                                 name_, container_ ? container_->name_ : std::string(),
                                 owner.type().name));
        }
    }
    owner_ = nullptr;
    holds_owner_ = false;
}

inline object::after_free_action memory_region::after_free() noexcept {
    if (!holds_owner_) return {};
    return unref_after_free(owner_);
}

inline void memory_region::check_finalizable() const {
    QOMEM_ASSERT(!container_, "region '{}' freed while still a subregion of '{}'", name_,
                 container_ ? container_->name_ : std::string());
    QOMEM_ASSERT(as_root_users_ == 0,
                 "region '{}' freed while still the root of {} address space(s)", name_,
                 as_root_users_);
    QOMEM_ASSERT(alias_users_.empty(), "region '{}' freed while {} alias(es) still point to it",
                 name_, alias_users_.size());
    const std::uint32_t dma = dma_users_.load(std::memory_order_acquire);
    QOMEM_ASSERT(dma == 0, "ownerless region '{}' freed while {} DMA mapping(s) still hold it",
                 name_, dma);
}

// ---- ioeventfds and coalesced MMIO -------------------------------------------

template <class Edit>
void memory_region::change_io(bool topology, Edit&& edit) {
    const detail::region_io* old = io_.ptr.load(std::memory_order_relaxed);
    auto next = std::make_unique<detail::region_io>(old ? *old : detail::region_io{});
    edit(*next);
    const detail::region_io* published = next->empty() ? nullptr : next.release();
    io_.ptr.store(published, std::memory_order_release);
    // Accesses load the hooks inside a read section: free the old ones
    // after a grace period.
    if (old)
        rcu::retire(const_cast<detail::region_io*>(old),
                    [](void* p) { delete static_cast<detail::region_io*>(p); });
    if (topology && log_) log_->io_changed();
}

inline void memory_region::add_eventfd(hwaddr offset, unsigned size, bool match_data,
                                       std::uint64_t data, int fd) {
    detail::writer_hold w(log_);
    QOMEM_ASSERT(size == 0 || size == 1 || size == 2 || size == 4 || size == 8,
                 "add_eventfd on '{}': size {} is not 0, 1, 2, 4 or 8 (offset {:#x}, fd {})", name_,
                 size, offset, fd);
    QOMEM_ASSERT(u128(offset) + std::max(size, 1u) <= size_,
                 "add_eventfd on '{}': [{:#x}, +{}) is past the region's end ({} bytes; fd {})",
                 name_, offset, size, detail::hex(size_), fd);
    QOMEM_ASSERT(size != 0 || !match_data,
                 "add_eventfd on '{}': size 0 (any size) at {:#x} cannot match data {:#x} (fd {})",
                 name_, offset, data, fd);
    QOMEM_ASSERT(fd >= 0, "add_eventfd on '{}': fd {} at {:#x} is not a file descriptor", name_, fd,
                 offset);
    const ioeventfd e{offset, size, match_data, match_data ? data : 0, fd};
    const detail::region_io* cur = io_.ptr.load(std::memory_order_relaxed);
    QOMEM_ASSERT(!cur || std::find(cur->eventfds.begin(), cur->eventfds.end(), e) ==
                             cur->eventfds.end(),
                 "add_eventfd on '{}': offset {:#x} size {} match_data {} data {:#x} fd {} was "
                 "already added",
                 name_, offset, size, match_data, data, fd);
    change_io(true, [&](detail::region_io& io) {
        io.eventfds.insert(std::upper_bound(io.eventfds.begin(), io.eventfds.end(), e), e);
    });
}

inline void memory_region::del_eventfd(hwaddr offset, unsigned size, bool match_data,
                                       std::uint64_t data, int fd) {
    detail::writer_hold w(log_);
    const ioeventfd e{offset, size, match_data, match_data ? data : 0, fd};
    const detail::region_io* cur = io_.ptr.load(std::memory_order_relaxed);
    QOMEM_ASSERT(cur && std::find(cur->eventfds.begin(), cur->eventfds.end(), e) !=
                            cur->eventfds.end(),
                 "del_eventfd on '{}': no ioeventfd at offset {:#x} size {} match_data {} data "
                 "{:#x} fd {} was added",
                 name_, offset, size, match_data, data, fd);
    change_io(true, [&](detail::region_io& io) {
        io.eventfds.erase(std::find(io.eventfds.begin(), io.eventfds.end(), e));
    });
}

inline std::vector<ioeventfd> memory_region::eventfds() const {
    rcu::read_guard g; // the snapshot is retired through RCU
    const detail::region_io* cur = io_.ptr.load(std::memory_order_acquire);
    return cur ? cur->eventfds : std::vector<ioeventfd>{};
}

inline void memory_region::set_coalescing() {
    detail::region_transaction tx(log_);
    clear_coalescing();
    add_coalescing(0, size_);
}

inline void memory_region::add_coalescing(hwaddr offset, u128 size) {
    detail::writer_hold w(log_);
    QOMEM_ASSERT(size > 0 && u128(offset) + size <= size_,
                 "add_coalescing on '{}': [{:#x}, +{}) is empty or past the region's end ({} "
                 "bytes)",
                 name_, offset, detail::hex(size), detail::hex(size_));
    change_io(true, [&](detail::region_io& io) {
        io.coalesced.push_back({offset, size});
        io.flush_coalesced = true;
    });
}

inline void memory_region::clear_coalescing() {
    detail::writer_hold w(log_);
    const detail::region_io* cur = io_.ptr.load(std::memory_order_relaxed);
    if (!cur || cur->coalesced.empty()) return;
    drain_coalesced_ring();
    change_io(true, [](detail::region_io& io) {
        io.coalesced.clear();
        io.flush_coalesced = false;
    });
}

inline std::vector<coalesced_range> memory_region::coalesced_ranges() const {
    rcu::read_guard g;
    const detail::region_io* cur = io_.ptr.load(std::memory_order_acquire);
    return cur ? cur->coalesced : std::vector<coalesced_range>{};
}

inline void memory_region::set_flush_coalesced() {
    detail::writer_hold w(log_);
    if (flush_coalesced()) return;
    change_io(false, [](detail::region_io& io) { io.flush_coalesced = true; });
}

inline void memory_region::clear_flush_coalesced() {
    detail::writer_hold w(log_);
    drain_coalesced_ring();
    const detail::region_io* cur = io_.ptr.load(std::memory_order_relaxed);
    if (!cur || !cur->flush_coalesced || !cur->coalesced.empty()) return;
    change_io(false, [](detail::region_io& io) { io.flush_coalesced = false; });
}

inline bool memory_region::flush_coalesced() const {
    rcu::read_guard g;
    const detail::region_io* cur = io_.ptr.load(std::memory_order_acquire);
    return cur && cur->flush_coalesced;
}

} // namespace qomem
