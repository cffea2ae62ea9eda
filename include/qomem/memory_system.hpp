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
// Lifetime. A system lives as long as anything uses it: its handles
// (ref_ptr<memory_system>, a machine), its address spaces and every region
// that belongs to it.
#pragma once

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

#include <qomem/assert.hpp>
#include <qomem/detail/topology_log.hpp>
#include <qomem/detail/view_update.hpp>
#include <qomem/flat_view.hpp>
#include <qomem/flatten.hpp>
#include <qomem/fwd.hpp>
#include <qomem/memory_listener.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/rcu.hpp>
#include <qomem/types.hpp>

namespace qomem {

namespace detail {

/// What the engine keeps of one address space: its root, its current view
/// (published for readers) and its listeners. A member of address_space.
struct view_slot {
    boost::intrusive::list_member_hook<boost::intrusive::link_mode<boost::intrusive::normal_link>> hook;
    address_space* owner = nullptr;
    const std::string* name = nullptr;
    memory_region* root = nullptr;
    /// Holds one reference. Written by the writer, read by any thread inside
    /// an RCU read section (see memory_system::publish).
    std::atomic<flat_view*> current{nullptr};
    memory_listener::list_type listeners;
};

using slot_list = boost::intrusive::list<
    view_slot, boost::intrusive::member_hook<view_slot, decltype(view_slot::hook), &view_slot::hook>>;

/// A cache on the readers' side (a CPU TLB) that must drop what it holds
/// whenever a view of its memory system is replaced or dirty logging is
/// switched. The writer calls invalidate() after publishing the new view and
/// before retiring the old one, on its own thread, while the cache's owner
/// may be using it: invalidate must only make the owner's next access miss
/// (one atomic store the owner's accesses read anyway).
class reader_cache {
public:
    virtual void invalidate() noexcept = 0;

protected:
    reader_cache() = default;
    ~reader_cache() = default;

private:
    friend class qomem::memory_system;
    boost::intrusive::list_member_hook<boost::intrusive::link_mode<boost::intrusive::normal_link>> cache_hook_;
};

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
        QOMEM_ASSERT(slots_.empty(), "memory system {}: the target byte order is set before its first "
                                     "address space ({} exist)",
                     static_cast<const void*>(this), slots_.size());
        target_big_ = target == std::endian::big;
    }
    bool target_big_endian() const noexcept { return target_big_; }

    // ---- what readers cache ------------------------------------------------

    /// A count that changes (grows) whenever something a reader-side cache
    /// may hold changes: a flat view of this system is replaced, or dirty
    /// logging of one of its regions is switched. Bumped after the new view
    /// is published and before the old one is retired, so a reader that
    /// still sees the old count inside its read section may still use what
    /// it cached from the old view. (CPU TLBs are told directly instead:
    /// see cpu_tlb.) Any thread.
    const std::atomic<std::uint64_t>& generation() const noexcept { return generation_; }

    // ---- the writer role (Lockable; recursive) ----------------------------

    /// Takes the writer role, waiting while another thread holds it.
    void lock() override;
    /// Takes it if it is free (or already this thread's); never waits.
    bool try_lock();
    /// Gives it back once per lock()/successful try_lock(). Giving it back
    /// for the last time finalizes the regions other threads handed over
    /// (which may commit). Requires (asserted): held by this thread.
    void unlock() override;
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
    friend class cpu_tlb;

    memory_system() = default;
    ~memory_system();

    // topology_log
    memory_system& system() noexcept override { return *this; }
    bool held_here() const noexcept override { return held_by_this_thread(); }
    void begin() override;
    void end() override;
    void changed(const memory_region& in, i128 lo, i128 hi) override;
    void changed_everything() override;
    void hold_until_commit(memory_region& mr) override;
    void forget(const memory_region& mr) noexcept override;
    void finalize_on_writer(memory_region& mr) override;
    void region_bound() noexcept override {
        refs_.fetch_add(1, std::memory_order_relaxed);
        regions_.fetch_add(1, std::memory_order_relaxed);
    }
    void region_unbound() noexcept override {
        regions_.fetch_sub(1, std::memory_order_relaxed);
        intrusive_ptr_release(this);
    }
    void access_changed() noexcept override {
        generation_.fetch_add(1, std::memory_order_seq_cst);
        std::lock_guard g(caches_mutex_);
        for (detail::reader_cache& c : caches_) c.invalidate();
    }
    /// `c` is invalidated from now on (until removed). Any thread.
    void add_reader_cache(detail::reader_cache& c) {
        std::lock_guard g(caches_mutex_);
        caches_.push_back(c);
    }
    void remove_reader_cache(detail::reader_cache& c) noexcept {
        std::lock_guard g(caches_mutex_);
        caches_.erase(caches_.iterator_to(c));
    }

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
    static void tell_listeners(detail::view_slot& slot, const detail::view_diff& d);
    /// Publishes `v` as the slot's view (taking a reference), bumps the
    /// generation and retires the old view (its reference dropped after a
    /// grace period).
    void publish(detail::view_slot& slot, flat_view* v);
    void drain_deferred();
    /// The view every address space with no flat-view root shares.
    flat_view* empty_view();

    std::atomic<std::size_t> refs_{0};
    std::atomic<std::size_t> regions_{0};
    bool counted_live_ = false; // in live_objects() (every system but the default one)
    bool target_big_ = std::endian::native == std::endian::big;
    std::atomic<std::uint64_t> generation_{1};
    // Reader-side caches told about every change (access_changed).
    std::mutex caches_mutex_;
    boost::intrusive::list<detail::reader_cache,
                           boost::intrusive::member_hook<detail::reader_cache,
                                                         decltype(detail::reader_cache::cache_hook_),
                                                         &detail::reader_cache::cache_hook_>>
        caches_;

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
    /// Ownerless regions removed inside a transaction (see hold_until_commit).
    std::vector<memory_region*> held_until_commit_;
    bool verify_incremental_ = false;
    detail::slot_list slots_;
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
inline void memory_region_transaction_begin() { memory_system::default_system().begin_transaction(); }
/// QEMU's memory_region_transaction_commit, on the default system.
/// Requires (asserted): a transaction of it is open on this thread.
inline void memory_region_transaction_commit() {
    memory_system::default_system().commit_transaction();
}
/// memory_system::synchronize on the default system.
inline void memory_synchronize() { memory_system::default_system().synchronize(); }

// ---- implementation ---------------------------------------------------------

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
    QOMEM_ASSERT(held_by_this_thread(), "memory system {}: unlock by a thread that does not hold "
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
    QOMEM_ASSERT(held_by_this_thread(), "memory system {}: region '{}' changed without the writer role",
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

inline void memory_system::hold_until_commit(memory_region& mr) {
    if (tx_depth_ == 0) return; // the commit follows at once
    mr.ref();
    held_until_commit_.push_back(&mr);
}

inline void memory_system::forget(const memory_region& mr) noexcept {
    std::erase_if(windows_, [&](const detail::change_window& w) { return w.in == &mr; });
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
        while (pending_ || !held_until_commit_.empty() || !window_refs_.empty()) {
            pending_ = false;
            render();
            // Releasing may free regions, which may change the topology
            // again: loop until it settles.
            for (memory_region* r : std::exchange(window_refs_, {})) memory_region_unref(*r);
            for (memory_region* r : std::exchange(held_until_commit_, {})) r->unref();
        }
    } catch (...) {
        // The failed render consumed the windows: views may now lag the
        // topology. Render everything at the next commit, and drop what the
        // windows held.
        committing_ = false;
        full_ = true;
        windows_.clear();
        pending_ = true;
        for (memory_region* r : std::exchange(window_refs_, {})) memory_region_unref(*r);
        for (memory_region* r : std::exchange(held_until_commit_, {})) r->unref();
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
        auto g = std::find_if(groups.begin(), groups.end(), [&](const group& x) { return x.physmr == physmr; });
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
            if (verify_incremental_) detail::verify_against_full_render(*g.base, *g.next, *g.physmr, merged);
        }
    }

    for (auto& [slot, gi] : members) {
        group& g = groups[gi];
        flat_view* cur = slot->current.load(std::memory_order_relaxed);
        if (cur == g.next.get()) continue;
        if (!slot->listeners.empty()) {
            if (incremental && cur == g.base) {
                tell_listeners(*slot, g.diff);
            } else {
                detail::view_diff d;
                d.add(cur->ranges(), g.next->ranges());
                tell_listeners(*slot, d);
            }
        }
        publish(*slot, g.next.get());
    }
}

inline void memory_system::tell_listeners(detail::view_slot& slot, const detail::view_diff& d) {
    if (!d.changes()) return;
    for (memory_listener& l : slot.listeners) l.begin();
    // Every deletion first, in descending priority; then additions and
    // unchanged ranges in address order, in ascending priority. Section by
    // section, each told to every listener (QEMU's order).
    for (const memory_section& s : d.dels)
        for (auto it = slot.listeners.rbegin(); it != slot.listeners.rend(); ++it) it->region_del(s);
    for (const auto& [s, nop] : d.adds)
        for (memory_listener& l : slot.listeners) {
            if (nop)
                l.region_nop(s);
            else
                l.region_add(s);
        }
    for (memory_listener& l : slot.listeners) l.commit();
}

inline void memory_system::publish(detail::view_slot& slot, flat_view* v) {
    if (v) intrusive_ptr_add_ref(v);
    // seq_cst: readers load the view with a seq_cst load inside their read
    // section (address_space::current); see rcu.hpp for why the reader's
    // epoch announcement is ordered before that load.
    flat_view* old = slot.current.exchange(v, std::memory_order_seq_cst);
    // After the exchange: a reader seeing the new count sees the new view;
    // before the retire: one still seeing the old count (or a CPU TLB not
    // yet invalidated) inside its read section began it before the old view
    // was retired.
    access_changed();
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
