// qomem/memory_system.hpp — one machine's memory system: its address spaces,
// its transactions and commits, its writer role, and the finalization of the
// regions it shows. The commit engine lives here, in one place.
//
//     auto sys = qomem::memory_system::make();                  // or machine.memory()
//     auto root = qomem::make_container(nullptr, "system", qomem::u128_2_64);
//     qomem::address_space as(*sys, *root, "memory");           // root joins *sys
//     {
//         qomem::memory_transaction tx(*sys);                   // writer role held
//         root->add_subregion(0, *ram);                         // recorded
//         root->add_subregion(0x1000'0000, *mmio);              // recorded
//     }                                                         // one commit
//     sys->synchronize();                                       // e.g. before teardown
//
// Several systems in one process are fully independent: each has its own
// writer role, transactions, pending changes, address spaces, flat-view
// groups and listeners; a region belongs to at most one (memory_region.hpp).
// What they share is process-wide by nature: the RCU domain (rcu.hpp) and the
// live-object accounting. The short API (address_space(root, name),
// memory_transaction tx;, memory_synchronize()) uses the default system.
//
// The writer role (QEMU's big lock, one per system). Topology changes,
// transactions, address-space creation and destruction and listener
// registration are made by the thread holding it. `memory_system` is
// Lockable: hold it explicitly (std::lock_guard, std::unique_lock) to make
// several changes, or to keep other threads' last references from being
// finalized in the middle of your work; a change made without it takes it for
// its own duration. It is recursive. While a thread holds it, a region whose
// last reference another thread drops (a vCPU ending a DMA mapping of an
// unplugged device) is handed to the holder and finalized when it gives the
// role back; when nobody holds it, the dropping thread takes it and finalizes
// at once. So finalization (which changes topology state) always runs under
// the writer role, and readers never lock.
//
// Commits. A change records the window of the map it touched; the outermost
// commit maps every window up to the flat-view roots, renders those windows
// again, splices them into the previous views (flat_view::splice), tells the
// listeners what changed, and publishes the new views (RCU). Readers on an
// old view keep it until they leave their read section. Finalizing a region
// may change the topology again: the commit loops until it settles.
//
// I/O hooks. A region's ioeventfds and coalesced ranges (ioeventfd.hpp,
// coalesced_mmio.hpp) act on its guest writes as soon as they are set; each
// address space keeps their images in guest addresses (QEMU's
// AddressSpace ioeventfds), which a commit recomputes and diffs for the
// listeners (memory_listener.hpp) when a hook changed, or when a view
// changed in a system one of whose regions has ever had hooks — a walk of
// every range of that view, as QEMU's address_space_update_ioeventfds; a
// system that never used hooks pays nothing. The system also owns the ring
// of pending coalesced writes (flush_coalesced).
//
// Lifetime. A system lives as long as anything uses it: its handles
// (ref_ptr<memory_system>, a machine), its address spaces and every region
// that belongs to it.
#pragma once

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <boost/intrusive/list.hpp>
#include <boost/intrusive_ptr.hpp>
#include <fmt/core.h>

#include <qomem/assert.hpp>
#include <qomem/detail/dispatch.hpp>
#include <qomem/detail/io_update.hpp>
#include <qomem/detail/topology_log.hpp>
#include <qomem/detail/view_update.hpp>
#include <qomem/dirty_log.hpp>
#include <qomem/flat_view.hpp>
#include <qomem/flatten.hpp>
#include <qomem/fwd.hpp>
#include <qomem/memory_listener.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/rcu.hpp>
#include <qomem/types.hpp>

namespace qomem {

namespace detail {

/// A cache on the readers' side (a CPU TLB) that must drop what it holds
/// whenever the view of its address space is replaced (every commit that
/// changes it, dirty logging switched included: the view records it). The
/// writer calls invalidate() after publishing the new view and before
/// retiring the old one, on its own thread, while the cache's owner may be
/// using it: invalidate must only make the owner's next access miss (one
/// atomic store the owner's accesses read anyway).
class reader_cache {
public:
    virtual void invalidate() noexcept = 0;

    /// Links the cache into its address space's slot (view_slot::caches).
    boost::intrusive::list_member_hook<boost::intrusive::link_mode<boost::intrusive::normal_link>>
        cache_hook;

protected:
    reader_cache() = default;
    ~reader_cache() = default;
};

/// What the engine keeps of one address space: its root, its current view
/// (published for readers) and its listeners. A member of address_space.
struct view_slot {
    boost::intrusive::list_member_hook<boost::intrusive::link_mode<boost::intrusive::normal_link>>
        hook;
    address_space* owner = nullptr;
    const std::string* name = nullptr;
    memory_region* root = nullptr;
    /// Holds one reference. Written by the writer, read by any thread inside
    /// an RCU read section (see memory_system::publish).
    std::atomic<flat_view*> current{nullptr};
    memory_listener::list_type listeners;
    /// The CPU TLBs over this address space, invalidated at each publish.
    /// Registered and removed on their own threads (hence the mutex; the
    /// writer holds it only to walk the list).
    std::mutex caches_mutex;
    boost::intrusive::list<reader_cache, boost::intrusive::member_hook<
                                             reader_cache, decltype(reader_cache::cache_hook),
                                             &reader_cache::cache_hook>>
        caches;
    /// What the listeners were last told of the I/O hooks this address
    /// space shows (QEMU's AddressSpace ioeventfds). Writer only.
    detail::io_images io;
};

using slot_list = boost::intrusive::list<
    view_slot,
    boost::intrusive::member_hook<view_slot, decltype(view_slot::hook), &view_slot::hook>>;

} // namespace detail

class memory_system final : private detail::topology_log {
public:
    /// A new, independent memory system (held by the returned handle).
    /// Counted by live_objects() as a "memory-system" while it lives.
    /// `target` is the guest's byte order: what `endianness::native` means
    /// for the devices of this system (QEMU's DEVICE_NATIVE_ENDIAN).
    static ref_ptr<memory_system> make(std::endian target = std::endian::native) {
        auto* s = new memory_system;
        detail::live_registry::get().add("memory-system");
        s->counted_live_ = true;
        s->target_big_ = target == std::endian::big;
        return ref_ptr<memory_system>(s);
    }

    /// The system of the short API: address spaces made without naming a
    /// system, `memory_transaction tx;`, memory_synchronize(). Never freed.
    static memory_system& default_system() {
        static memory_system* const s = [] {
            auto* d = new memory_system;
            d->refs_.store(1, std::memory_order_relaxed); // held for the process
            return d;
        }();
        return *s;
    }

    memory_system(const memory_system&) = delete;
    memory_system& operator=(const memory_system&) = delete;

    // ---- the target ------------------------------------------------------

    /// The guest's byte order (the host's unless made or set otherwise).
    std::endian target_endianness() const noexcept {
        return target_big_ ? std::endian::big : std::endian::little;
    }
    /// Sets the guest's byte order. Requires (asserted): no address space
    /// of this system exists yet (accesses in flight read it).
    void set_target_endianness(std::endian target) {
        QOMEM_ASSERT(slots_.empty(),
                     "memory system {}: the target byte order is set before its first "
                     "address space ({} exist)",
                     static_cast<const void*>(this), slots_.size());
        target_big_ = target == std::endian::big;
    }
    bool target_big_endian() const noexcept { return target_big_; }

    // ---- the writer role (Lockable; recursive) ----------------------------

    /// Takes the writer role, waiting while another thread holds it.
    inline void lock() override;
    /// Takes it if it is free (or already this thread's); never waits.
    bool try_lock();
    /// Gives it back once per lock()/successful try_lock(). Giving it back
    /// for the last time finalizes the regions other threads handed over
    /// (which may commit). Requires (asserted): held by this thread.
    inline void unlock() override;
    /// True when this thread holds the writer role.
    bool held_by_this_thread() const noexcept {
        return owner_.load(std::memory_order_relaxed) == std::this_thread::get_id();
    }

    // ---- transactions ------------------------------------------------------

    /// Opens a transaction (nestable): changes made until the matching
    /// commit_transaction() take effect together, at the outermost commit.
    /// Effects: takes the writer role until the matching commit.
    void begin_transaction() { begin(); }
    /// Closes one; the outermost renders what changed, tells the listeners
    /// and publishes the views; it may finalize regions released meanwhile.
    /// Requires (asserted): a transaction of this system is open on this
    /// thread. Throws: what a listener or finalizer throws (the views are
    /// then rendered in full at the next commit).
    void commit_transaction() { end(); }
    /// The depth of open transactions (0: changes commit at once).
    unsigned transaction_depth() const noexcept { return tx_depth_; }

    /// Commits what is pending, waits until no reader can hold a retired
    /// flat view (rcu::synchronize), then finalizes what other threads
    /// released last, until nothing is left. Call it before counting live
    /// objects in a test, or before tearing down a machine other threads
    /// used. Requires (asserted): not inside an RCU read section, and the
    /// writer role not held by this thread (waiting for readers then could
    /// deadlock with a reader waiting for the role). Effects: takes the
    /// writer role to commit and to finalize, not while it waits.
    void synchronize();

    // ---- address spaces ----------------------------------------------------

    /// Calls f(address_space&) for each address space of this system, oldest
    /// first. Writer only (the list changes under the writer role).
    template <class F>
    void for_each_address_space(F&& f) const {
        for (const detail::view_slot& s : slots_) f(*s.owner);
    }
    std::size_t address_space_count() const noexcept { return slots_.size(); }
    /// How many regions belong to this system.
    std::size_t region_count() const noexcept { return regions_.load(std::memory_order_relaxed); }

    /// Regions that keep their owner alive while nothing in the memory map
    /// uses them: unparented (so holding their owner), owner out of the tree,
    /// in no container, no alias's target, no address space's root, no DMA
    /// mapping's (for ownerless accounting) — yet still referenced. What
    /// still holds such a region is outside the library's view: most often
    /// the owner itself, through a ref_ptr it keeps to its own region, which
    /// makes a cycle that never frees either (or an unfinished DMA, or a
    /// handle the program forgot). One line each, naming the region and its
    /// owner. A machine logs them (log_category::lifetime) when it is
    /// finalized. Any thread; a snapshot.
    std::vector<std::string> stranded_regions() const;

    // ---- dirty logging (dirty_log.hpp) -------------------------------------

    /// Starts tracking dirty memory globally for the reasons in `flags`
    /// (global_dirty::*; QEMU's memory_global_dirty_log_start). When no
    /// reason was active yet: every listener of the system is told
    /// log_global_start (in priority order), then every RAM region logs for
    /// the migration client, and the views are rendered anew (at the commit:
    /// now, or when the open transaction ends) so listeners hear log_start
    /// for every range that logs. Requires (asserted): `flags` nonzero and
    /// within global_dirty::all. Effects: takes the writer role. Throws: what
    /// a listener's log_global_start throws; the listeners started before it
    /// are told log_global_stop (in reverse) and nothing else changes.
    void global_dirty_log_start(unsigned flags);
    /// Stops tracking for the reasons in `flags` (QEMU's
    /// memory_global_dirty_log_stop, without its postponing while the VM is
    /// stopped: qomem has no run state). When none is left: the migration
    /// client is turned off, the views are rendered anew (listeners hear
    /// log_stop), then every listener is told log_global_stop in reverse
    /// priority order. Requires (asserted): every reason in `flags` is
    /// active. Effects: takes the writer role. Throws: what a listener throws.
    void global_dirty_log_stop(unsigned flags);
    /// The reasons global tracking is on for (0: off).
    unsigned global_dirty_tracking() const noexcept { return global_dirty_; }
    /// Asks every listener to bring its dirty log in (QEMU's
    /// memory_global_dirty_log_sync): log_sync for each section of its
    /// view whose region logs, or log_sync_global(last_stage).
    /// Effects: takes the writer role. Throws: what a listener throws.
    void global_dirty_log_sync(bool last_stage = false);
    /// Tells every listener log_global_after_sync (QEMU's
    /// memory_global_after_dirty_log_sync): call it after reading bitmaps
    /// that a sync filled, before reading the memory they mark.
    void global_after_dirty_log_sync();

    // ---- coalesced MMIO (coalesced_mmio.hpp) ----------------------------------

    /// Makes every queued coalesced write, oldest first, through its
    /// region's ops (QEMU's qemu_flush_coalesced_mmio_buffer). Any thread;
    /// returns once the ring is empty (after a drain in progress on another
    /// thread). Throws: what an ops callback throws (the writes before it
    /// are made, that one is dropped, the rest stay queued).
    void flush_coalesced() override { detail::drain_coalesced(coalesced_mmio); }
    /// How many writes the ring holds before a write drains it.
    static constexpr std::size_t coalesced_capacity = detail::coalesced_ring::capacity;
    /// Coalesced writes queued or being made now. Any thread.
    std::size_t coalesced_pending() const noexcept { return coalesced_mmio.outstanding(); }

    // ---- listeners ------------------------------------------------------------

    /// Calls f(memory_listener&) for every listener of the system, in
    /// priority order (equal priorities in registration order). Writer only.
    template <class F>
    void for_each_listener(F&& f) const {
        for (const memory_listener& l : listeners_) f(const_cast<memory_listener&>(l));
    }
    std::size_t listener_count() const noexcept { return listeners_.size(); }

    /// When on (tests), every incrementally updated view is checked against
    /// a full render, and a difference is reported as a failed QOMEM_ASSERT.
    void set_verify_incremental(bool on) noexcept { verify_incremental_ = on; }
    bool verify_incremental() const noexcept { return verify_incremental_; }

    friend void intrusive_ptr_add_ref(memory_system* s) noexcept {
        s->refs_.fetch_add(1, std::memory_order_relaxed);
    }
    friend void intrusive_ptr_release(memory_system* s) noexcept {
        if (s->refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete s;
    }

private:
    friend class address_space;
    friend class memory_region;

    memory_system() = default;
    ~memory_system();

    // topology_log
    memory_system& system() noexcept override { return *this; }
    bool held_here() const noexcept override { return held_by_this_thread(); }
    inline void begin() override;
    inline void end() override;
    inline void changed(const memory_region& in, i128 lo, i128 hi) override;
    inline void changed_everything() override;
    inline void shown_until_commit(memory_region& mr) override;
    inline bool retire_after_commit(memory_region& mr) override;
    inline void forget(const memory_region& mr) noexcept override;
    inline void finalize_on_writer(memory_region& mr) override;
    void region_bound(memory_region& mr) noexcept override {
        if (detail::region_io_access::maybe(mr)) io_used_.store(true, std::memory_order_relaxed);
        refs_.fetch_add(1, std::memory_order_relaxed);
        regions_.fetch_add(1, std::memory_order_relaxed);
        std::lock_guard lock(members_mutex_);
        members_.push_back(mr);
    }
    void region_unbound(memory_region& mr) noexcept override {
        {
            std::lock_guard lock(members_mutex_);
            members_.erase(members_.iterator_to(mr));
        }
        regions_.fetch_sub(1, std::memory_order_relaxed);
        intrusive_ptr_release(this);
    }
    void sync_dirty_log(const memory_region& mr) override { sync_dirty(&mr, false); }
    inline void clear_dirty_log(const memory_region& mr, hwaddr start, hwaddr len) override;
    void after_dirty_log_sync() override { global_after_dirty_log_sync(); }
    inline void io_changed() override;

    /// The address space of `slot` joins (leaves) this system. Writer only.
    void add_space(detail::view_slot& slot);
    void remove_space(detail::view_slot& slot);
    /// Asks for a commit without a change of its own (a new address space).
    void touch();
    /// The commit loop.
    void commit();
    /// Renders every address space's view from the recorded windows and
    /// publishes it.
    void render();
    /// Registers `l` to the address space of `slot` and replays its view;
    /// unregisters it, reporting every range as gone (address_space's
    /// add_listener / remove_listener).
    void add_listener(detail::view_slot& slot, memory_listener& l);
    void remove_listener(detail::view_slot& slot, memory_listener& l);
    /// log_sync / log_sync_global for the sections of `mr` (all sections
    /// when null).
    void sync_dirty(const memory_region* mr, bool last_stage);
    /// One address space's part of a commit: what its listeners hear.
    struct slot_update {
        detail::view_slot* slot;
        flat_view* next;
        const detail::view_diff* diff =
            nullptr; ///< what changes_only listeners hear (null: nothing)
        const detail::view_diff* full = nullptr; ///< every range, for every_range listeners
        bool io_new = false;                     ///< the hooks it shows were walked again:
        detail::io_images io = {};               ///< what they are now
        detail::io_diff io_diff = {};            ///< and what changed in them
    };
    /// Tells the listeners one commit: begin to all that hear it, each
    /// address space's dels and adds (publishing its view after them), then
    /// commit to all.
    void tell_and_publish(std::vector<slot_update>& updates);
    static void tell_slot(const slot_update& u);
    /// The I/O-hook part of one address space's update, before (coalesced
    /// dels) or after (coalesced adds, then eventfd dels and adds) its ranges.
    static void tell_io(const slot_update& u, bool after_ranges);
    /// Publishes `v` as the slot's view (taking a reference), invalidates
    /// the slot's reader caches (CPU TLBs) and retires the old view (its
    /// reference dropped after a grace period).
    static void publish(detail::view_slot& slot, flat_view* v);
    void drain_deferred();
    /// The view every address space with no flat-view root shares.
    flat_view* empty_view();

    std::atomic<std::size_t> refs_{0};
    std::atomic<std::size_t> regions_{0};
    // Every region of this system (region_bound until region_unbound).
    mutable std::mutex members_mutex_;
    boost::intrusive::list<memory_region,
                           boost::intrusive::member_hook<memory_region, memory_region::member_hook,
                                                         &memory_region::system_member_>,
                           boost::intrusive::constant_time_size<false>>
        members_;
    bool counted_live_ = false; // in live_objects() (every system but the default one)
    bool target_big_ = std::endian::native == std::endian::big;

    // The writer role.
    std::mutex writer_mutex_;
    std::atomic<std::thread::id> owner_{};
    unsigned lock_depth_ = 0; // owner only

    // Commit state (writer only).
    unsigned tx_depth_ = 0;
    bool pending_ = false;
    bool committing_ = false;
    bool full_ = false; ///< too many windows: render every view anew
    static constexpr std::size_t max_windows = 1024;
    std::vector<detail::change_window> windows_;
    /// Counted regions named by pending windows, referenced until the commit
    /// has used the windows (so none is freed in between).
    std::vector<memory_region*> window_refs_;
    /// Ownerless regions removed inside a transaction and dropped before
    /// its commit (retire_after_commit), and the number of that commit:
    /// guarded by after_commit_mutex_, since the drop may be on any thread.
    std::mutex after_commit_mutex_;
    std::uint64_t commit_number_ = 1;
    std::vector<memory_region*> retire_after_commit_;
    bool verify_incremental_ = false;
    detail::slot_list slots_;
    memory_listener::system_list_type listeners_; // every listener, in priority order
    bool notifying_ = false;                      // listeners are being told something
    unsigned global_dirty_ = 0;                   // global_dirty::* reasons (writer only)
    // I/O hooks (ioeventfds, coalesced ranges): a region's changed since the
    // last commit; some region of the system has had hooks (from then on a
    // commit that changes a view walks it for them). Writer only, but
    // io_used_ is also set when a region joins, on any thread.
    bool io_pending_ = false;
    std::atomic<bool> io_used_{false};
    ref_ptr<flat_view> empty_;

    // Regions handed over by threads that could not take the writer role.
    std::mutex deferred_mutex_;
    std::vector<memory_region*> deferred_;
    std::atomic<bool> has_deferred_{false};
};

/// RAII transaction: the writer role is held and changes are committed
/// together when the outermost one ends.
class memory_transaction {
public:
    /// A transaction of the default system.
    memory_transaction() : memory_transaction(memory_system::default_system()) {}
    explicit memory_transaction(memory_system& sys) : sys_(&sys) { sys.begin_transaction(); }
    ~memory_transaction() noexcept(false) { sys_->commit_transaction(); }
    memory_transaction(const memory_transaction&) = delete;
    memory_transaction& operator=(const memory_transaction&) = delete;

private:
    memory_system* sys_;
};

/// QEMU's memory_region_transaction_begin, on the default system.
inline void memory_region_transaction_begin() {
    memory_system::default_system().begin_transaction();
}
/// QEMU's memory_region_transaction_commit, on the default system.
/// Requires (asserted): a transaction of it is open on this thread.
inline void memory_region_transaction_commit() {
    memory_system::default_system().commit_transaction();
}
/// memory_system::synchronize on the default system.
inline void memory_synchronize() { memory_system::default_system().synchronize(); }

// ---- implementation ---------------------------------------------------------

namespace detail {
/// Sets a flag for a scope, restoring its previous value afterwards.
struct flag_scope {
    bool& flag;
    bool old;
    explicit flag_scope(bool& f) noexcept : flag(f), old(f) { flag = true; }
    ~flag_scope() { flag = old; }
    flag_scope(const flag_scope&) = delete;
    flag_scope& operator=(const flag_scope&) = delete;
};

/// Inserts `l` into `list` after every listener of lower or equal priority
/// (QEMU's order: ties keep registration order).
template <class List>
void insert_by_priority(List& list, memory_listener& l) {
    auto it = list.begin();
    while (it != list.end() && it->priority() <= l.priority()) ++it;
    list.insert(it, l);
}
} // namespace detail

inline memory_system::~memory_system() {
    // Nothing uses the system any more: no address space, no region. What
    // is left to release is what a failed commit left behind.
    for (memory_region* r : std::exchange(window_refs_, {})) memory_region_unref(*r);
    if (counted_live_) detail::live_registry::get().remove("memory-system");
}

inline void memory_system::lock() {
    if (held_by_this_thread()) {
        ++lock_depth_;
        return;
    }
    writer_mutex_.lock();
    // owner_ is compared only with the reading thread's own id, which only
    // that thread stores: relaxed suffices (the mutex orders the rest).
    owner_.store(std::this_thread::get_id(), std::memory_order_relaxed);
    lock_depth_ = 1;
}

inline bool memory_system::try_lock() {
    if (held_by_this_thread()) {
        ++lock_depth_;
        return true;
    }
    if (!writer_mutex_.try_lock()) return false;
    owner_.store(std::this_thread::get_id(), std::memory_order_relaxed);
    lock_depth_ = 1;
    return true;
}

inline void memory_system::unlock() {
    QOMEM_ASSERT(held_by_this_thread(),
                 "memory system {}: unlock by a thread that does not hold "
                 "its writer role",
                 static_cast<const void*>(this));
    if (lock_depth_ > 1) {
        --lock_depth_;
        return;
    }
    // Giving the role back: first finalize what others handed over (this
    // may change the topology and commit; the role is still held).
    ref_ptr<memory_system> keep(this); // a finalized region may drop our last use
    try {
        drain_deferred();
    } catch (...) {
        lock_depth_ = 0;
        owner_.store(std::thread::id{}, std::memory_order_relaxed);
        writer_mutex_.unlock();
        throw;
    }
    lock_depth_ = 0;
    owner_.store(std::thread::id{}, std::memory_order_relaxed);
    writer_mutex_.unlock();
    // A region handed over after the drain, by a thread whose try_lock
    // failed while we still held the role, would wait for the next holder:
    // take the role again and finalize it. (The flag is set before that
    // thread's try_lock and read after our unlock: the mutex orders them.)
    if (has_deferred_.load(std::memory_order_acquire) && try_lock()) unlock();
}

inline void memory_system::drain_deferred() {
    while (has_deferred_.load(std::memory_order_acquire)) {
        std::vector<memory_region*> batch;
        {
            std::lock_guard g(deferred_mutex_);
            batch.swap(deferred_);
            has_deferred_.store(false, std::memory_order_release);
        }
        for (memory_region* mr : batch) mr->finalize_now();
    }
}

inline std::vector<std::string> memory_system::stranded_regions() const {
    std::vector<std::string> out;
    std::lock_guard lock(members_mutex_);
    for (const memory_region& r : members_) {
        const object* o = r.owner_;
        if (!r.holds_owner_ || !o || o->parent() || r.container_ || !r.alias_users_.empty() ||
            r.as_root_users_ != 0 || r.ref_count() == 0)
            continue;
        out.push_back(fmt::format(
            "region '{}' ({} reference(s)) holds its owner, a {} now out of the tree ({} "
            "reference(s)), "
            "yet no container, alias, address space or DMA mapping uses it: something outside the "
            "memory map holds it — if it is the owner's own ref_ptr to its region, the two form a "
            "reference cycle and are never freed (drop such references at unrealize)",
            r.name_, r.ref_count(), o->type().name, o->ref_count()));
    }
    return out;
}

inline void memory_system::finalize_on_writer(memory_region& mr) {
    if (try_lock()) { // held already, or free: this thread is the writer now
        ref_ptr<memory_system> keep(this);
        try {
            mr.finalize_now();
        } catch (...) {
            unlock();
            throw;
        }
        unlock();
        return;
    }
    {
        std::lock_guard g(deferred_mutex_);
        deferred_.push_back(&mr);
        has_deferred_.store(true, std::memory_order_release);
    }
    // The holder finalizes it when it gives the role back; if it gave it
    // back already, take it now.
    if (try_lock()) unlock();
}

inline void memory_system::begin() {
    lock();
    ++tx_depth_;
}

inline void memory_system::end() {
    QOMEM_ASSERT(held_by_this_thread() && tx_depth_ > 0,
                 "memory system {}: commit_transaction without an open transaction on this thread",
                 static_cast<const void*>(this));
    struct release {
        memory_system* s;
        ~release() { s->unlock(); }
    } r{this};
    if (--tx_depth_ == 0 && pending_) commit();
}

inline void memory_system::changed(const memory_region& in, i128 lo, i128 hi) {
    QOMEM_ASSERT(held_by_this_thread(),
                 "memory system {}: region '{}' changed without the writer role",
                 static_cast<const void*>(this), in.region_name());
    if (!full_) {
        if (windows_.size() < max_windows) {
            windows_.push_back({&in, lo, hi});
            if (in.counted()) {
                auto& r = const_cast<memory_region&>(in);
                memory_region_ref(r);
                window_refs_.push_back(&r);
            }
        } else {
            full_ = true;
            windows_.clear();
        }
    }
    pending_ = true;
    if (tx_depth_ == 0) commit();
}

inline void memory_system::changed_everything() {
    full_ = true;
    windows_.clear();
    pending_ = true;
    if (tx_depth_ == 0) commit();
}

inline void memory_system::shown_until_commit(memory_region& mr) {
    if (tx_depth_ == 0) return; // the commit follows at once
    std::lock_guard g(after_commit_mutex_);
    mr.shown_until_commit_ = commit_number_;
}

inline bool memory_system::retire_after_commit(memory_region& mr) {
    std::lock_guard g(after_commit_mutex_);
    if (mr.shown_until_commit_ != commit_number_) return false;
    retire_after_commit_.push_back(&mr);
    return true;
}

inline void memory_system::forget(const memory_region& mr) noexcept {
    std::erase_if(windows_, [&](const detail::change_window& w) { return w.in == &mr; });
    // Its queued coalesced writes go with it (coalesced_mmio.hpp). The
    // locks cannot fail in practice: a failure would terminate.
    coalesced_mmio.purge(mr);
}

inline void memory_system::io_changed() {
    QOMEM_ASSERT(held_by_this_thread(),
                 "memory system {}: I/O hooks changed without the writer role",
                 static_cast<const void*>(this));
    io_used_.store(true, std::memory_order_relaxed);
    io_pending_ = true;
    pending_ = true;
    if (tx_depth_ == 0) commit();
}

inline void memory_system::touch() {
    pending_ = true;
    if (tx_depth_ == 0) commit();
}

inline void memory_system::commit() {
    if (committing_) return; // the running commit loops again
    committing_ = true;
    ref_ptr<memory_system> keep(this);
    try {
        while (pending_ || !window_refs_.empty()) {
            pending_ = false;
            render();
            // The views published now show no region removed before: what
            // was dropped meanwhile starts its grace period.
            std::vector<memory_region*> retire;
            {
                std::lock_guard g(after_commit_mutex_);
                ++commit_number_;
                retire.swap(retire_after_commit_);
            }
            for (memory_region* r : retire) r->retire_ownerless();
            // Releasing may free regions, which may change the topology
            // again: loop until it settles.
            for (memory_region* r : std::exchange(window_refs_, {})) memory_region_unref(*r);
        }
    } catch (...) {
        // The failed render consumed the windows: views may now lag the
        // topology. Render everything at the next commit, and drop what the
        // windows held.
        committing_ = false;
        full_ = true;
        io_pending_ = true; // and the hooks they show walked again
        windows_.clear();
        pending_ = true;
        // Regions dropped since the last commit may still show in the views
        // the failed render did not replace: they wait for the next commit.
        for (memory_region* r : std::exchange(window_refs_, {})) memory_region_unref(*r);
        throw;
    }
    committing_ = false;
}

inline flat_view* memory_system::empty_view() {
    if (!empty_) empty_ = ref_ptr<flat_view>(new flat_view(nullptr, std::vector<flat_range>{}));
    return empty_.get();
}

inline void memory_system::render() {
    const std::vector<detail::change_window> changes = std::exchange(windows_, {});
    const bool full = std::exchange(full_, false);
    const bool io_pending = std::exchange(io_pending_, false);
    const bool io_used = io_used_.load(std::memory_order_relaxed);

    // Address spaces grouped by flat-view root: one view per group.
    struct group {
        memory_region* physmr;
        flat_view* base = nullptr; // a current view of a member, rendered from physmr
        ref_ptr<flat_view> next;
        detail::view_diff diff; // base -> next
    };
    std::vector<group> groups;
    std::vector<std::pair<detail::view_slot*, std::size_t>> members;
    detail::window_map windows;
    for (detail::view_slot& s : slots_) {
        memory_region* physmr = flat_view_root(s.root);
        auto g = std::find_if(groups.begin(), groups.end(),
                              [&](const group& x) { return x.physmr == physmr; });
        if (g == groups.end()) {
            groups.push_back(group{physmr, nullptr, {}, {}});
            g = groups.end() - 1;
            if (physmr) windows[physmr];
        }
        flat_view* cur = s.current.load(std::memory_order_relaxed);
        if (!g->base && physmr && cur->root() == physmr && cur->root_addr() == physmr->addr())
            g->base = cur;
        members.emplace_back(&s, static_cast<std::size_t>(g - groups.begin()));
    }
    std::size_t budget = 4096;
    bool incremental = !full;
    for (const detail::change_window& c : changes)
        if (incremental && !detail::map_change_up(c.in, c.lo, c.hi, windows, budget, true))
            incremental = false;

    for (group& g : groups) {
        if (!g.physmr) {
            g.next = empty_view();
        } else if (!incremental || !g.base) {
            g.next = render_flat_view(g.physmr);
            if (g.base && g.base->ranges() == g.next->ranges()) g.next = g.base;
        } else if (auto& w = windows[g.physmr]; w.empty()) {
            g.next = g.base;
        } else {
            const auto merged = detail::merge_windows(std::move(w));
            g.next = detail::update_view(*g.base, *g.physmr, merged, g.diff);
            if (!g.diff.changes()) g.next = g.base; // same content: keep sharing the old view
            if (verify_incremental_)
                detail::verify_against_full_render(*g.base, *g.next, *g.physmr, merged);
        }
    }

    // What each address space's listeners hear. A changes_only listener:
    // the incremental diff when the view changed (or a full one when it was
    // rendered in full); an every_range listener: a full diff, every commit.
    std::vector<detail::view_diff> diffs;
    diffs.reserve(2 * members.size()); // pointers into it stay valid
    std::vector<slot_update> updates;
    updates.reserve(members.size());
    for (auto& [slot, gi] : members) {
        group& g = groups[gi];
        flat_view* cur = slot->current.load(std::memory_order_relaxed);
        slot_update u{slot, g.next.get()};
        bool every = false;
        for (const memory_listener& l : slot->listeners)
            every |= l.nops() == memory_listener::nop_mode::every_range;
        if (cur != u.next && !slot->listeners.empty()) {
            if (incremental && cur == g.base) {
                u.diff = &g.diff;
            } else {
                diffs.emplace_back().add(cur->ranges(), u.next->ranges());
                u.diff = u.full = &diffs.back();
            }
        }
        if (every && !u.full) {
            diffs.emplace_back().add(cur->ranges(), u.next->ranges());
            u.full = &diffs.back();
        }
        // The hooks it shows, when they may have changed: a hook changed, or
        // the view did in a system that uses hooks.
        if (io_pending || (cur != u.next && (io_used || !slot->io.empty()))) {
            u.io_new = true;
            u.io = detail::io_images_of(*u.next);
            u.io_diff = detail::diff_io(slot->io, u.io);
        }
        updates.push_back(std::move(u));
    }
    tell_and_publish(updates);
}

inline void memory_system::tell_and_publish(std::vector<slot_update>& updates) {
    // Who hears this commit.
    bool anyone = false;
    for (slot_update& u : updates) {
        const bool changed = (u.diff && u.diff->changes()) || !u.io_diff.empty();
        for (memory_listener& l : u.slot->listeners) {
            l.told_ = changed || l.nops() == memory_listener::nop_mode::every_range;
            anyone |= l.told_;
        }
    }
    if (!anyone) {
        for (slot_update& u : updates) {
            if (u.io_new) u.slot->io = std::move(u.io);
            if (u.slot->current.load(std::memory_order_relaxed) != u.next) publish(*u.slot, u.next);
        }
        return;
    }
    detail::flag_scope t(notifying_);
    for (memory_listener& l : listeners_)
        if (l.told_) l.begin();
    for (slot_update& u : updates) {
        // The old view is still published while its hooks are told gone.
        tell_io(u, false);
        tell_slot(u);
        tell_io(u, true);
        if (u.io_new) u.slot->io = std::move(u.io);
        if (u.slot->current.load(std::memory_order_relaxed) != u.next) publish(*u.slot, u.next);
    }
    for (memory_listener& l : listeners_)
        if (std::exchange(l.told_, false)) l.commit();
}

inline void memory_system::tell_slot(const slot_update& u) {
    auto& ls = u.slot->listeners;
    const bool changed = u.diff && u.diff->changes();
    // The sequence told: the full diff if an every_range listener hears it,
    // else the one changes_only listeners hear.
    const detail::view_diff* seq = u.full ? u.full : (changed ? u.diff : nullptr);
    if (!seq) return;
    // A changes_only listener hears every del and add (the same in both
    // diffs), and the nops of its own diff only.
    std::vector<hwaddr> own_nops;
    if (changed && seq != u.diff)
        for (const auto& e : u.diff->adds)
            if (e.nop) own_nops.push_back(e.section.offset_within_address_space);
    auto hears = [&](const memory_listener& l, const detail::view_diff::entry* nop) {
        if (!l.told_) return false;
        if (l.nops() == memory_listener::nop_mode::every_range) return true;
        if (!changed) return false;
        if (!nop || seq == u.diff) return true;
        return std::binary_search(own_nops.begin(), own_nops.end(),
                                  nop->section.offset_within_address_space);
    };
    // Every deletion first, in descending priority; then additions and
    // nops in address order, in ascending priority (log_stop descending).
    // Section by section, each told to every listener (QEMU's order).
    for (const memory_section& s : seq->dels)
        for (auto it = ls.rbegin(); it != ls.rend(); ++it)
            if (hears(*it, nullptr)) it->region_del(s);
    for (const detail::view_diff::entry& e : seq->adds) {
        if (!e.nop) {
            for (memory_listener& l : ls)
                if (hears(l, nullptr)) l.region_add(e.section);
            continue;
        }
        for (memory_listener& l : ls)
            if (hears(l, &e)) l.region_nop(e.section);
        if (e.new_mask & ~e.old_mask)
            for (memory_listener& l : ls)
                if (hears(l, &e)) l.log_start(e.section, e.old_mask, e.new_mask);
        if (e.old_mask & ~e.new_mask)
            for (auto it = ls.rbegin(); it != ls.rend(); ++it)
                if (hears(*it, &e)) it->log_stop(e.section, e.old_mask, e.new_mask);
    }
}

inline void memory_system::tell_io(const slot_update& u, bool after_ranges) {
    auto& ls = u.slot->listeners;
    const detail::io_diff& d = u.io_diff;
    if (!after_ranges) {
        // QEMU: a range's coalesced parts are withdrawn before region_del,
        // in reverse priority order.
        for (const detail::as_coalesced& c : d.coalesced_dels)
            for (auto it = ls.rbegin(); it != ls.rend(); ++it)
                it->coalesced_io_del(c.section, c.addr, c.len);
        return;
    }
    for (const detail::as_coalesced& c : d.coalesced_adds)
        for (memory_listener& l : ls) l.coalesced_io_add(c.section, c.addr, c.len);
    // QEMU's address_space_update_ioeventfds, once the view is updated.
    for (const auto& [added, e] : d.eventfds)
        for (memory_listener& l : ls) {
            if (added)
                l.eventfd_add(e.section, e.match_data, e.data, e.fd);
            else
                l.eventfd_del(e.section, e.match_data, e.data, e.fd);
        }
}

inline void memory_system::add_listener(detail::view_slot& slot, memory_listener& l) {
    QOMEM_ASSERT(!l.as_, "listener '{}' is already registered to address space '{}'", l.name(),
                 l.slot_ ? *l.slot_->name : std::string());
    std::lock_guard w(*this);
    QOMEM_ASSERT(!notifying_, "listener '{}' registered from inside a listener callback", l.name());
    detail::insert_by_priority(slot.listeners, l);
    detail::insert_by_priority(listeners_, l);
    l.as_ = slot.owner;
    l.slot_ = &slot;
    detail::flag_scope t(notifying_);
    try {
        // QEMU's listener_add_address_space.
        l.begin();
        if (global_dirty_) l.log_global_start();
        auto co = slot.io.coalesced.begin(); // sorted by their range's start
        for (const flat_range& r : slot.current.load(std::memory_order_relaxed)->ranges()) {
            const memory_section s = detail::section_of(r);
            l.region_add(s);
            if (r.dirty_log_mask) l.log_start(s, 0, r.dirty_log_mask);
            for (; co != slot.io.coalesced.end() &&
                   co->section.offset_within_address_space <= r.start;
                 ++co)
                l.coalesced_io_add(co->section, co->addr, co->len);
        }
        for (const detail::as_ioeventfd& e : slot.io.eventfds)
            l.eventfd_add(e.section, e.match_data, e.data, e.fd);
        l.commit();
    } catch (...) {
        // Not registered after all: the listener is left as it was before.
        slot.listeners.erase(slot.listeners.iterator_to(l));
        listeners_.erase(listeners_.iterator_to(l));
        l.as_ = nullptr;
        l.slot_ = nullptr;
        throw;
    }
}

inline void memory_system::remove_listener(detail::view_slot& slot, memory_listener& l) {
    QOMEM_ASSERT(l.slot_ == &slot, "listener '{}' is not registered to address space '{}'",
                 l.name(), *slot.name);
    std::lock_guard w(*this);
    QOMEM_ASSERT(!notifying_, "listener '{}' unregistered from inside a listener callback",
                 l.name());
    struct unlink {
        memory_system& sys;
        detail::view_slot& slot;
        memory_listener& l;
        ~unlink() { // whatever the callbacks do, the listener is gone afterwards
            slot.listeners.erase(slot.listeners.iterator_to(l));
            sys.listeners_.erase(sys.listeners_.iterator_to(l));
            l.as_ = nullptr;
            l.slot_ = nullptr;
        }
    } u{*this, slot, l};
    detail::flag_scope t(notifying_);
    // QEMU's listener_del_address_space.
    l.begin();
    for (const detail::as_ioeventfd& e : slot.io.eventfds)
        l.eventfd_del(e.section, e.match_data, e.data, e.fd);
    auto co = slot.io.coalesced.begin(); // sorted by their range's start
    for (const flat_range& r : slot.current.load(std::memory_order_relaxed)->ranges()) {
        const memory_section s = detail::section_of(r);
        for (; co != slot.io.coalesced.end() && co->section.offset_within_address_space <= r.start;
             ++co)
            l.coalesced_io_del(co->section, co->addr, co->len);
        if (r.dirty_log_mask) l.log_stop(s, r.dirty_log_mask, 0);
        l.region_del(s);
    }
    l.commit();
}

inline void memory_system::sync_dirty(const memory_region* mr, bool last_stage) {
    std::lock_guard w(*this);
    ref_ptr<memory_system> keep(this);
    detail::flag_scope t(notifying_);
    for (memory_listener& l : listeners_) {
        if (l.sync() == memory_listener::sync_mode::global) {
            // Nothing finer to do, whatever region was asked for.
            l.log_sync_global(last_stage);
            continue;
        }
        const ref_ptr<flat_view> v(l.slot_->current.load(std::memory_order_relaxed));
        for (const flat_range& r : v->ranges())
            if (r.dirty_log_mask && (!mr || r.mr == mr)) l.log_sync(detail::section_of(r));
    }
}

inline void memory_system::global_dirty_log_sync(bool last_stage) {
    sync_dirty(nullptr, last_stage);
}

inline void memory_system::global_after_dirty_log_sync() {
    std::lock_guard w(*this);
    detail::flag_scope t(notifying_);
    for (memory_listener& l : listeners_) l.log_global_after_sync();
}

inline void memory_system::clear_dirty_log(const memory_region& mr, hwaddr start, hwaddr len) {
    std::lock_guard w(*this);
    detail::flag_scope t(notifying_);
    const u128 end = u128(start) + len;
    for (memory_listener& l : listeners_) {
        const ref_ptr<flat_view> v(l.slot_->current.load(std::memory_order_relaxed));
        for (const flat_range& r : v->ranges()) {
            if (!r.dirty_log_mask || r.mr != &mr) continue;
            // The part of the section inside [start, start + len) of the region.
            const u128 lo = std::max<u128>(r.offset_in_region, start);
            const u128 hi = std::min<u128>(u128(r.offset_in_region) + r.size, end);
            if (lo >= hi) continue;
            memory_section s = detail::section_of(r);
            s.offset_within_address_space =
                static_cast<hwaddr>(r.start + (lo - r.offset_in_region));
            s.offset_within_region = static_cast<hwaddr>(lo);
            s.size = hi - lo;
            l.log_clear(s);
        }
    }
}

inline void memory_system::global_dirty_log_start(unsigned flags) {
    std::lock_guard w(*this);
    QOMEM_ASSERT(flags != 0 && (flags & ~global_dirty::all) == 0,
                 "global_dirty_log_start: bad flags {:#x} (global_dirty::*)", flags);
    flags &= ~global_dirty_;
    if (!flags) return;
    const unsigned old = global_dirty_;
    global_dirty_ |= flags;
    if (old != 0) return;
    // As QEMU: tracking is on (writes log) before the listeners are told;
    // a listener refusing undoes it.
    global_log_mask.store(dirty_mask_of(dirty_client::migration), std::memory_order_relaxed);
    auto it = listeners_.begin();
    try {
        for (; it != listeners_.end(); ++it) it->log_global_start();
    } catch (...) {
        while (it != listeners_.begin()) (--it)->log_global_stop();
        global_dirty_ = old;
        global_log_mask.store(0, std::memory_order_relaxed);
        throw;
    }
    changed_everything(); // every range that logs: log_start
}

inline void memory_system::global_dirty_log_stop(unsigned flags) {
    std::lock_guard w(*this);
    QOMEM_ASSERT(
        flags != 0 && (flags & ~global_dirty::all) == 0 && (global_dirty_ & flags) == flags,
        "global_dirty_log_stop: flags {:#x}, but tracking is on for {:#x}", flags, global_dirty_);
    global_dirty_ &= ~flags;
    if (global_dirty_ != 0) return;
    global_log_mask.store(0, std::memory_order_relaxed);
    changed_everything(); // every range that logged: log_stop
    for (auto it = listeners_.rbegin(); it != listeners_.rend(); ++it) it->log_global_stop();
}

inline void memory_system::publish(detail::view_slot& slot, flat_view* v) {
    if (v) intrusive_ptr_add_ref(v);
    // seq_cst (release would do): pairs with address_space::current's load,
    // so a reader that gets `v` sees its contents. A reader that began its
    // section before the retire below may still get `old`; the retire's
    // acq_rel increment of the epoch makes one that began after it get `v`
    // or newer, and keeps `old` until the others have left (rcu.hpp,
    // "Orderings" (A) and (B)).
    flat_view* old = slot.current.exchange(v, std::memory_order_seq_cst);
    // After the exchange, before the retire: a TLB that has not yet seen
    // its invalidation is used only inside a read section that began
    // before the old view was retired (tlb.hpp argues it), so what its
    // entries point to outlives them.
    {
        std::lock_guard g(slot.caches_mutex);
        for (detail::reader_cache& c : slot.caches) c.invalidate();
    }
    if (old) rcu::retire(old, [](void* p) { intrusive_ptr_release(static_cast<flat_view*>(p)); });
}

inline void memory_system::add_space(detail::view_slot& slot) {
    memory_region& root = *slot.root;
    QOMEM_ASSERT(!root.log_ || root.log_ == static_cast<detail::topology_log*>(this),
                 "address space '{}' of memory system {} cannot be rooted at region '{}', which "
                 "belongs to memory system {}",
                 *slot.name, static_cast<const void*>(this), root.region_name(),
                 static_cast<const void*>(root.system()));
    std::lock_guard w(*this);
    flat_view* e = empty_view();
    intrusive_ptr_add_ref(e);
    slot.current.store(e, std::memory_order_release);
    if (!root.log_) root.join(*this);
    memory_region_ref(root);
    ++root.as_root_users_;
    slots_.push_back(slot);
    intrusive_ptr_add_ref(this);
    try {
        touch(); // renders the new space's view (or shares an existing one)
    } catch (...) {
        // No destructor will run: undo the registration.
        slots_.erase(slots_.iterator_to(slot));
        --root.as_root_users_;
        publish(slot, nullptr);
        memory_region_unref(root);
        intrusive_ptr_release(this); // not the last: the caller's handle or the root holds us
        throw;
    }
}

inline void memory_system::remove_space(detail::view_slot& slot) {
    std::lock_guard w(*this);
    ref_ptr<memory_system> keep(this);
    slots_.erase(slots_.iterator_to(slot));
    --slot.root->as_root_users_;
    publish(slot, nullptr);
    memory_region_unref(*slot.root);
    intrusive_ptr_release(this);
}

inline void memory_system::synchronize() {
    QOMEM_ASSERT(!rcu::in_read_section(),
                 "memory_system::synchronize inside an RCU read section would never end");
    // Waiting for readers while holding the writer role would deadlock with
    // a reader that waits for it inside its read section (an MMIO handler
    // taking the role): the grace period is waited for without it.
    QOMEM_ASSERT(!held_by_this_thread(),
                 "memory system {}: synchronize while this thread holds the writer role (or a "
                 "transaction) could deadlock with readers waiting for it",
                 static_cast<const void*>(this));
    {
        std::lock_guard w(*this);
        if (pending_ && tx_depth_ == 0) commit(); // e.g. after a failed commit
    }
    for (;;) {
        rcu::synchronize(); // runs retired callbacks: may hand regions over
        if (!has_deferred_.load(std::memory_order_acquire)) return;
        std::lock_guard w(*this); // giving it back finalizes them
    }
}

} // namespace qomem
