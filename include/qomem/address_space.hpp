// qomem/address_space.hpp — address spaces: a name, a root region, the
// current flat view, and the accesses made through it.
//
//     auto sys = qomem::make_container(nullptr, "system", qomem::u128_2_64);
//     qomem::address_space memory(*sys, "memory");
//     qomem::address_space dma(*sys, "dma");          // shares memory's flat view
//     std::uint64_t v;
//     memory.read(0x1000, &v, 8);                      // -> qomem::memtx_result
//     auto m = dma.map(0x2000, 4096, true);            // host pointer + length
//     std::memset(m.data(), 0, m.size());
//     dma.unmap(m, m.size());
//
// References. An address space holds memory_region_ref on its root and one
// reference on its current flat view, which holds the regions it points into.
// Address spaces whose roots reduce to the same flat-view root
// (flat_view_root) share one flat view object; all address spaces with no
// flat-view root share one empty view.
//
// Threads. Any thread may read, write, map and unmap at any time without
// taking a lock: the flat view is read inside an RCU read section
// (rcu.hpp), and a commit publishes a new view and retires the old one, which
// is freed only once no reader can still hold it. Topology changes, listener
// registration and the creation and destruction of address spaces are made by
// one thread at a time (the writer, QEMU's big-lock holder).
//
// Destroy an address space before (or while) the device using it leaves the
// tree — typically in its unrealize step — when the root belongs to that same
// device: the address space's reference on the root would otherwise keep the
// region, and through it the device, alive.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <functional>
#include <mutex>
#include <new>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <boost/intrusive/list.hpp>

#include <qomem/detail/dispatch.hpp>
#include <qomem/flat_view.hpp>
#include <qomem/memory_listener.hpp>
#include <qomem/memory_ops.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/rcu.hpp>

namespace qomem {

class address_space;

namespace detail {
inline void render_all_address_spaces();
struct view_diff;
inline void tell_listeners(address_space& as, const view_diff& d);
/// A flat range as listeners and find() see it.
inline memory_section section_of(const flat_range& r) noexcept {
    return {r.mr, r.start, r.size, r.offset_in_region, r.readonly, r.nonvolatile};
}
} // namespace detail

/// A DMA mapping (QEMU's address_space_map): a host pointer to `size()`
/// bytes of guest memory, holding a reference to the region it points into.
/// Move-only. Release it with address_space::unmap; a mapping destroyed while
/// still mapped is unmapped as if all of it had been accessed.
class dma_mapping {
public:
    dma_mapping() noexcept = default;
    dma_mapping(dma_mapping&& o) noexcept { *this = std::move(o); }
    dma_mapping& operator=(dma_mapping&& o) noexcept;
    ~dma_mapping();

    std::byte* data() const noexcept { return ptr_; }
    /// The number of bytes mapped: may be less than asked; 0 when refused.
    hwaddr size() const noexcept { return len_; }
    explicit operator bool() const noexcept { return ptr_ != nullptr; }
    /// The region the mapping points into (referenced until unmapped).
    memory_region* region() const noexcept { return mr_; }
    /// True when the data goes through a bounce buffer (MMIO).
    bool bounced() const noexcept { return bounce_; }

private:
    friend class address_space;
    void end_direct(hwaddr access_len) noexcept;
    address_space* as_ = nullptr;
    std::byte* ptr_ = nullptr;
    hwaddr len_ = 0;
    memory_region* mr_ = nullptr;
    hwaddr offset_ = 0; // in mr_, for dirty marking
    hwaddr addr_ = 0;   // guest address, for the bounce write-back
    mem_attrs attrs_{};
    bool is_write_ = false;
    bool bounce_ = false;
};

/// What find() returns: the part of one flat range that overlaps the request,
/// holding a reference to its region (dropped with the section).
struct found_section {
    region_ref mr;
    hwaddr offset_within_region = 0;
    hwaddr offset_within_address_space = 0;
    u128 size = 0;
    bool readonly = false;
    bool nonvolatile = false;
    explicit operator bool() const noexcept { return bool(mr); }
};

class address_space {
public:
    /// Creates an address space rooted at `root` and renders its view (at the
    /// outermost commit when a transaction is open).
    /// Effects: memory_region_ref on `root`; registers the address space.
    address_space(memory_region& root, std::string name);

    /// Unregisters, drops the reference to the root and retires the flat
    /// view (freed, with the region references it holds, once no reader uses
    /// it). Requires (asserted): no listener registered, no bounce mapping
    /// live (a direct mapping of RAM may outlive the address space: it holds
    /// its region, and its unmap touches nothing else).
    ~address_space();

    address_space(const address_space&) = delete;
    address_space& operator=(const address_space&) = delete;

    const std::string& name() const noexcept { return name_; }
    memory_region& root() const noexcept { return *root_; }

    /// The current flat view, with a reference (shared with every address
    /// space that has the same flat-view root).
    ref_ptr<flat_view> view() const {
        rcu::read_guard g;
        return ref_ptr<flat_view>(current_.load(std::memory_order_seq_cst));
    }
    /// The current flat view without a reference: valid only inside an RCU
    /// read section (rcu::read_guard) on this thread.
    /// (Acquire would do: it makes the view's contents, written before it
    /// was published, visible. Its ordering after the section's start comes
    /// from rcu::read_lock — its acquire load of the epoch, and its fence or
    /// the writer's membarrier(2), rcu.hpp "Orderings" (A) and (B) — not from
    /// this load. On ARMv8 a seq_cst load is an LDAR, not a plain load.)
    const flat_view* current() const noexcept { return current_.load(std::memory_order_seq_cst); }

    // ---- access (any thread, lock-free) ----------------------------------

    /// Reads or writes `len` bytes at `addr`: split at flat-range boundaries;
    /// RAM by memcpy (guest writes to ROM are ignored unless attrs.debug);
    /// MMIO through the region's ops with its access rules; holes read as
    /// zero. Returns the OR of every piece's result (memtx_ok = 0).
    memtx_result rw(hwaddr addr, void* buf, std::size_t len, bool is_write, mem_attrs attrs = {}) {
        rcu::read_guard g;
        return detail::access_view(*current(), addr, static_cast<std::byte*>(buf), len, is_write,
                                   attrs);
    }
    /// Kept short: everything but a read within one RAM range goes out of line.
    memtx_result read(hwaddr addr, void* buf, std::size_t len,
                      mem_attrs attrs = {}) {
        rcu::read_guard g;
        const flat_view& v = *current();
        // The common case: all of it in one directly readable RAM range
        // (64-bit arithmetic only).
        if (const flat_range* fr = v.lookup_cached(addr);
            fr && fr->host_base && len != 0 && len - 1 <= fr->last() - addr && !attrs.memory) [[likely]] {
            std::memcpy(buf, fr->host_base + addr, len);
            return memtx_ok;
        }
        return read_slow(v, addr, buf, len, attrs);
    }
    memtx_result write(hwaddr addr, const void* buf, std::size_t len, mem_attrs attrs = {}) {
        return rw(addr, const_cast<void*>(buf), len, true, attrs);
    }
    /// Writes even to ROM (QEMU's address_space_write_rom), for loaders.
    memtx_result write_rom(hwaddr addr, const void* buf, std::size_t len) {
        mem_attrs a;
        a.debug = true;
        return write(addr, buf, len, a);
    }

    // ---- DMA (any thread) --------------------------------------------------

    /// Maps up to `len` bytes at `addr` (QEMU's address_space_map). RAM gives
    /// a direct pointer, extended across contiguous ranges of the same
    /// region; anything else gives a bounce buffer from this address space's
    /// budget (pre-read unless `is_write`), truncated to what is left of it.
    /// Takes memory_region_ref on the region. An empty mapping (null, size 0)
    /// means nothing is mapped there, or the bounce budget is spent: see
    /// register_map_client.
    dma_mapping map(hwaddr addr, hwaddr len, bool is_write, mem_attrs attrs = {});

    /// Ends a mapping: a bounce buffer written to is written back
    /// (`access_len` bytes), RAM written to is marked dirty, and the region
    /// reference is dropped (which may finalize the region and its owner).
    /// Requires (asserted): `m` is a live mapping of this address space.
    void unmap(dma_mapping& m, hwaddr access_len);

    /// The bounce-buffer budget in bytes (default 4096).
    std::size_t max_bounce_buffer_size() const noexcept { return max_bounce_.load(); }
    void set_max_bounce_buffer_size(std::size_t bytes) noexcept { max_bounce_.store(bytes); }
    std::size_t bounce_buffer_in_use() const noexcept { return bounce_used_.load(); }

    /// Asks to be called once, on the thread that frees it, the next time
    /// bounce-buffer space is freed (a failed map may then succeed). Returns
    /// an id for unregister_map_client.
    std::uint64_t register_map_client(std::function<void()> retry);
    void unregister_map_client(std::uint64_t id);

    /// The lowest flat range overlapping [addr, addr + size), clipped to it,
    /// with a reference to its region (QEMU's memory_region_find on an
    /// address space). Empty when nothing overlaps.
    found_section find(hwaddr addr, u128 size) const;

    // ---- listeners (writer) ----------------------------------------------

    /// Registers `l`, replaying the current view to it as begin, region_add
    /// for each range, commit. Requires (asserted): `l` is not registered.
    void add_listener(memory_listener& l);
    /// Unregisters `l`, reporting every range of the current view as
    /// region_del (in address order) between begin and commit.
    void remove_listener(memory_listener& l);

    /// Calls f(address_space&) for every address space, oldest first.
    template <class F>
    static void for_each(F&& f);

private:
    friend void detail::render_all_address_spaces();
    friend void detail::tell_listeners(address_space&, const detail::view_diff&);
    friend class dma_mapping;

    using hook_t = boost::intrusive::list_member_hook<
        boost::intrusive::link_mode<boost::intrusive::safe_link>>;
    struct list_t;
    static list_t& registry() noexcept;
    static flat_view* empty_view();
    using listener_list = boost::intrusive::list<
        memory_listener,
        boost::intrusive::member_hook<memory_listener, decltype(memory_listener::hook_),
                                      &memory_listener::hook_>>;

    void publish(flat_view* v);
    [[gnu::noinline]] static memtx_result read_slow(const flat_view& v, hwaddr addr, void* buf,
                                                    std::size_t len, mem_attrs attrs) {
        return detail::access_view(v, addr, static_cast<std::byte*>(buf), len, false, attrs);
    }
    void notify_map_clients();

    hook_t hook_;
    std::string name_;
    memory_region* root_;
    std::atomic<flat_view*> current_{nullptr}; // holds one reference
    listener_list listeners_;
    std::atomic<std::size_t> max_bounce_{4096};
    std::atomic<std::size_t> bounce_used_{0};
    std::atomic<std::size_t> live_mappings_{0};
    std::mutex clients_mutex_;
    std::vector<std::pair<std::uint64_t, std::function<void()>>> clients_;
    std::uint64_t next_client_ = 1;
};

/// Commits what is pending (outside a transaction), waits until no reader
/// can hold a retired flat view (rcu::synchronize), then finalizes what
/// other threads released last (see
/// memory_region_unref), until nothing is left. Writer only; not inside a
/// read section. Call it before counting live objects in a test, or before
/// tearing down a machine that other threads used.
inline void memory_synchronize() {
    auto& core = detail::memory_core::get();
    core.note_writer();
    if (core.pending && core.depth == 0) core.commit(); // e.g. after a failed commit
    for (;;) {
        rcu::synchronize();
        {
            std::lock_guard lock(core.deferred_mutex);
            if (core.deferred.empty()) return;
        }
        core.release_deferred();
    }
}

/// QEMU's memory_region_find: `addr` is relative to `mr`; it is converted to
/// an absolute address through the container chain, whose top must be the
/// root of an address space (otherwise the result is empty), and looked up
/// in that address space's view.
found_section memory_region_find(memory_region& mr, hwaddr addr, u128 size);

// ---- implementation ---------------------------------------------------------

struct address_space::list_t
    : boost::intrusive::list<address_space, boost::intrusive::member_hook<
                                                address_space, address_space::hook_t,
                                                &address_space::hook_>> {};

inline address_space::list_t& address_space::registry() noexcept {
    static list_t list;
    return list;
}

inline flat_view* address_space::empty_view() {
    static const ref_ptr<flat_view> v(new flat_view(nullptr, std::vector<flat_range>{}));
    return v.get();
}

template <class F>
void address_space::for_each(F&& f) {
    for (address_space& as : registry()) f(as);
}

inline address_space::address_space(memory_region& root, std::string name)
    : name_(std::move(name)), root_(&root) {
    flat_view* e = empty_view();
    intrusive_ptr_add_ref(e);
    current_.store(e, std::memory_order_release);
    memory_region_ref(root);
    ++root.as_root_users_;
    registry().push_back(*this);
    auto& core = detail::memory_core::get();
    core.render_all = &detail::render_all_address_spaces;
    try {
        core.touch(); // renders the new space's view (or shares an existing one)
    } catch (...) {
        // No destructor will run: undo the registration.
        registry().erase(registry().iterator_to(*this));
        --root.as_root_users_;
        publish(nullptr);
        memory_region_unref(root);
        throw;
    }
}

inline address_space::~address_space() {
    QOMEM_ASSERT(listeners_.empty(), "address space '{}' destroyed with {} listener(s) registered",
                 name_, listeners_.size());
    QOMEM_ASSERT(live_mappings_.load() == 0, "address space '{}' destroyed with {} live bounce mapping(s)",
                 name_, live_mappings_.load());
    registry().erase(registry().iterator_to(*this));
    --root_->as_root_users_;
    publish(nullptr);
    memory_region_unref(*root_);
}

inline void address_space::publish(flat_view* v) {
    if (v) intrusive_ptr_add_ref(v);
    flat_view* old = current_.exchange(v, std::memory_order_seq_cst);
    if (old)
        rcu::retire(old, [](void* p) { intrusive_ptr_release(static_cast<flat_view*>(p)); });
}

namespace detail {

/// Ranges of an old and a new view, as listeners are told about them.
struct view_diff {
    std::vector<memory_section> dels;
    std::vector<std::pair<memory_section, bool>> adds; ///< (section, is_nop)

    template <class OldRange, class NewRange>
    void add(const OldRange& old_r, const NewRange& new_r) {
        auto o = old_r.begin(), oe = old_r.end();
        auto n = new_r.begin(), ne = new_r.end();
        while (o != oe || n != ne) {
            if (o != oe && n != ne && *o == *n) {
                adds.emplace_back(section_of(*n), true);
                ++o;
                ++n;
            } else if (o != oe && (n == ne || o->start <= n->start)) {
                dels.push_back(section_of(*o));
                ++o;
            } else {
                adds.emplace_back(section_of(*n), false);
                ++n;
            }
        }
    }
    bool changes() const noexcept {
        return !dels.empty() ||
               std::any_of(adds.begin(), adds.end(), [](const auto& a) { return !a.second; });
    }
};

using window_map = std::unordered_map<const memory_region*, std::vector<std::pair<u128, u128>>>;

/// Maps a change of [lo, hi) in `x`'s coordinates to the windows it touches
/// in each flat-view root of `out`: up through containers (adding the
/// region's address) and through the aliases that show `x` (subtracting
/// their offset). False when there are too many to track.
/// The window is clipped to each region it passes through, except the one
/// it was recorded in: that region may just have shrunk, and its old extent
/// must be rendered again too.
inline bool map_change_up(const memory_region* x, i128 lo, i128 hi, window_map& out,
                          std::size_t& budget, bool recorded_here = false) {
    lo = std::max<i128>(lo, 0);
    hi = std::min<i128>(hi, recorded_here ? i128(u128_2_64) : i128(x->size()));
    if (lo >= hi) return true;
    if (budget == 0) return false;
    --budget;
    if (auto it = out.find(x); it != out.end()) {
        const i128 a = std::max<i128>(lo + i128(x->addr()), 0);
        const i128 b = std::min<i128>(hi + i128(x->addr()), i128(u128_2_64));
        if (a < b) it->second.emplace_back(u128(a), u128(b));
    }
    if (const memory_region* c = x->container())
        if (!map_change_up(c, lo + i128(x->addr()), hi + i128(x->addr()), out, budget)) return false;
    bool ok = true;
    x->for_each_alias_user([&](const memory_region& a) {
        if (ok) ok = map_change_up(&a, lo - i128(a.alias_offset()), hi - i128(a.alias_offset()), out, budget);
    });
    return ok;
}

} // namespace detail

inline void detail::render_all_address_spaces() {
    auto& core = detail::memory_core::get();
    const std::vector<change_window> changes = std::move(core.windows);
    const bool full = core.full;
    core.windows.clear();
    core.full = false;

    // Address spaces grouped by flat-view root: one view per group.
    struct group {
        memory_region* physmr;
        flat_view* base = nullptr; // a current view of a member, rendered from physmr
        ref_ptr<flat_view> next;
        view_diff diff; // base -> next
    };
    std::vector<group> groups;
    std::vector<std::pair<address_space*, std::size_t>> members;
    window_map windows;
    for (address_space& as : address_space::registry()) {
        memory_region* physmr = flat_view_root(as.root_);
        auto g = std::find_if(groups.begin(), groups.end(), [&](const group& x) { return x.physmr == physmr; });
        if (g == groups.end()) {
            groups.push_back(group{physmr, nullptr, {}, {}});
            g = groups.end() - 1;
            if (physmr) windows[physmr];
        }
        flat_view* cur = as.current_.load(std::memory_order_relaxed);
        if (!g->base && physmr && cur->root() == physmr && cur->root_addr() == physmr->addr())
            g->base = cur;
        members.emplace_back(&as, static_cast<std::size_t>(g - groups.begin()));
    }
    std::size_t budget = 4096;
    bool incremental = !full;
    for (const change_window& c : changes)
        if (incremental && !map_change_up(c.in, c.lo, c.hi, windows, budget, true)) incremental = false;

    for (group& g : groups) {
        if (!g.physmr) {
            g.next = address_space::empty_view();
            continue;
        }
        if (!incremental || !g.base) {
            g.next = render_flat_view(g.physmr);
            if (g.base && g.base->ranges() == g.next->ranges()) g.next = g.base;
            continue;
        }
        auto& w = windows[g.physmr];
        if (w.empty()) {
            g.next = g.base;
            continue;
        }
        std::sort(w.begin(), w.end());
        std::vector<std::pair<u128, u128>> merged;
        for (const auto& x : w) {
            if (!merged.empty() && x.first <= merged.back().second)
                merged.back().second = std::max(merged.back().second, x.second);
            else
                merged.push_back(x);
        }
        std::vector<flat_range> fresh;
        for (const auto& [lo, hi] : merged) {
            std::vector<flat_range> part = render_window(*g.physmr, lo, hi);
            fresh.insert(fresh.end(), part.begin(), part.end());
        }
        g.next = g.base->splice(merged, fresh, [&](const std::vector<flat_range>& o, const std::vector<flat_range>& n) {
            g.diff.add(o, n);
        });
        if (!g.diff.changes()) g.next = g.base; // same content: keep sharing the old view
        if (core.verify_incremental) {
            const ref_ptr<flat_view> want = render_flat_view(g.physmr);
            auto dump = [](const flat_view& v) {
                std::string out;
                for (const flat_range& r : v.ranges())
                    out += fmt::format("  {:016x}-{:016x} {} @{:x}{}{}\n", r.start, r.last(),
                                       r.mr->region_name(), r.offset_in_region,
                                       r.readonly ? " ro" : "", r.nonvolatile ? " nv" : "");
                return out;
            };
            std::string wins;
            for (const auto& [lo, hi] : merged) wins += fmt::format(" [{}, {})", detail::hex(lo), detail::hex(hi));
            QOMEM_ASSERT(want->ranges() == g.next->ranges(),
                         "incremental view of '{}' differs from a full render\nwindows:{}\nbefore:\n{}"
                         "incremental:\n{}full:\n{}",
                         g.physmr->region_name(), wins, dump(*g.base), dump(*g.next), dump(*want));
        }
    }

    for (auto& [as, gi] : members) {
        group& g = groups[gi];
        flat_view* cur = as->current_.load(std::memory_order_relaxed);
        if (cur == g.next.get()) continue;
        if (!as->listeners_.empty()) {
            if (incremental && cur == g.base) {
                tell_listeners(*as, g.diff);
            } else {
                view_diff d;
                d.add(cur->ranges(), g.next->ranges());
                tell_listeners(*as, d);
            }
        }
        as->publish(g.next.get());
    }
    // Retired views are freed by RCU. Freed regions may mark the topology
    // changed again: memory_core::commit loops until it settles.
}

inline void detail::tell_listeners(address_space& as, const view_diff& d) {
    if (!d.changes()) return;
    for (memory_listener& l : as.listeners_) l.begin();
    // Every deletion first, in descending priority; then additions and
    // unchanged ranges in address order, in ascending priority.
    // Section by section, each told to every listener (QEMU's order).
    for (const memory_section& s : d.dels)
        for (auto it = as.listeners_.rbegin(); it != as.listeners_.rend(); ++it) it->region_del(s);
    for (const auto& [s, nop] : d.adds)
        for (memory_listener& l : as.listeners_) {
            if (nop)
                l.region_nop(s);
            else
                l.region_add(s);
        }
    for (memory_listener& l : as.listeners_) l.commit();
}

inline void address_space::add_listener(memory_listener& l) {
    QOMEM_ASSERT(!l.as_, "listener already registered to address space '{}'",
                 l.as_ ? l.as_->name_ : std::string());
    auto it = listeners_.begin();
    while (it != listeners_.end() && it->priority_ <= l.priority_) ++it;
    listeners_.insert(it, l);
    l.as_ = this;
    l.begin();
    for (const flat_range& r : current_.load()->ranges()) l.region_add(detail::section_of(r));
    l.commit();
}

inline void address_space::remove_listener(memory_listener& l) {
    QOMEM_ASSERT(l.as_ == this, "listener is not registered to address space '{}'", name_);
    l.begin();
    for (const flat_range& r : current_.load()->ranges()) l.region_del(detail::section_of(r));
    l.commit();
    listeners_.erase(listeners_.iterator_to(l));
    l.as_ = nullptr;
}

inline dma_mapping address_space::map(hwaddr addr, hwaddr len, bool is_write, mem_attrs attrs) {
    dma_mapping m;
    if (len == 0) return m;
    rcu::read_guard g;
    const flat_view& v = *current();
    const flat_range* fr = v.lookup_cached(addr);
    if (!fr) return m;
    memory_region& mr = *fr->mr;
    const hwaddr xlat = addr - fr->start + fr->offset_in_region;
    const bool plain_ram = mr.is_ram() && !mr.is_ram_device();
    const bool direct = is_write ? plain_ram && !fr->readonly
                                 : plain_ram || (mr.is_rom_device() && fr->romd_mode);
    if (!direct && attrs.memory) return m; // only RAM may answer
    if (direct) {
        std::byte* host = fr->region_host();
        if (!host) {
            try {
                host = mr.host_ptr();
            } catch (const region_error&) {
                return m;
            }
        }
        // Extend across following ranges of the same region that continue it.
        u128 done = std::min<u128>(len, fr->end() - addr);
        while (done < len && u128(addr) + done < u128_2_64) {
            const flat_range* next = v.lookup(static_cast<hwaddr>(addr + done));
            if (!next || next->mr != &mr || next->offset_in_region != xlat + done ||
                (is_write && next->readonly))
                break;
            done += std::min<u128>(len - done, next->end() - next->start);
        }
        memory_region_ref(mr);
        m.ptr_ = host + xlat;
        m.len_ = static_cast<hwaddr>(done);
        m.mr_ = &mr;
        m.offset_ = xlat;
    } else {
        // Bounce: take what is left of the budget, up to `len` and to the end
        // of this range (QEMU clips it there too).
        len = static_cast<hwaddr>(std::min<u128>(len, fr->end() - addr));
        std::size_t used = bounce_used_.load(std::memory_order_relaxed);
        std::size_t take;
        for (;;) {
            const std::size_t max = max_bounce_.load(std::memory_order_relaxed);
            const std::size_t left = used < max ? max - used : 0;
            take = static_cast<std::size_t>(std::min<u128>(len, left));
            if (take == 0) return m;
            if (bounce_used_.compare_exchange_weak(used, used + take, std::memory_order_acq_rel))
                break;
        }
        m.ptr_ = static_cast<std::byte*>(::operator new(take));
        m.len_ = take;
        m.bounce_ = true;
        memory_region_ref(mr);
        m.mr_ = &mr;
        if (!is_write) detail::access_view(v, addr, m.ptr_, take, false, attrs);
    }
    m.as_ = this;
    m.addr_ = addr;
    m.attrs_ = attrs;
    m.is_write_ = is_write;
    // Only a bounce mapping uses this address space again at its unmap (the
    // budget, the write-back): only those must not outlive it.
    if (m.bounce_) live_mappings_.fetch_add(1, std::memory_order_relaxed);
    return m;
}

inline void address_space::unmap(dma_mapping& m, hwaddr access_len) {
    QOMEM_ASSERT(m.as_ == this && m.ptr_, "unmap of a mapping that is not a live mapping of '{}'",
                 name_);
    QOMEM_ASSERT(access_len <= m.len_, "unmap access_len {} exceeds the mapped length {}",
                 access_len, m.len_);
    if (!m.bounce_) {
        m.end_direct(access_len);
        return;
    }
    memory_region* mr = std::exchange(m.mr_, nullptr);
    std::byte* ptr = std::exchange(m.ptr_, nullptr);
    m.as_ = nullptr;
    live_mappings_.fetch_sub(1, std::memory_order_relaxed);
    if (m.is_write_ && access_len) rw(m.addr_, ptr, access_len, true, m.attrs_);
    ::operator delete(ptr);
    bounce_used_.fetch_sub(m.len_, std::memory_order_acq_rel);
    m.len_ = 0;
    notify_map_clients();
    memory_region_unref(*mr);
}

inline void dma_mapping::end_direct(hwaddr access_len) noexcept {
    memory_region* mr = std::exchange(mr_, nullptr);
    ptr_ = nullptr;
    as_ = nullptr;
    if (is_write_ && access_len) mr->mark_dirty(offset_, access_len);
    len_ = 0;
    memory_region_unref(*mr);
}

inline dma_mapping& dma_mapping::operator=(dma_mapping&& o) noexcept {
    if (this != &o) {
        if (ptr_) {
            if (bounce_)
                as_->unmap(*this, is_write_ ? len_ : 0);
            else
                end_direct(is_write_ ? len_ : 0);
        }
        as_ = std::exchange(o.as_, nullptr);
        ptr_ = std::exchange(o.ptr_, nullptr);
        len_ = std::exchange(o.len_, 0);
        mr_ = std::exchange(o.mr_, nullptr);
        offset_ = o.offset_;
        addr_ = o.addr_;
        attrs_ = o.attrs_;
        is_write_ = o.is_write_;
        bounce_ = o.bounce_;
    }
    return *this;
}

inline dma_mapping::~dma_mapping() {
    if (!ptr_) return;
    if (bounce_)
        as_->unmap(*this, is_write_ ? len_ : 0);
    else
        end_direct(is_write_ ? len_ : 0); // never touches the address space
}

inline std::uint64_t address_space::register_map_client(std::function<void()> retry) {
    std::lock_guard lock(clients_mutex_);
    const std::uint64_t id = next_client_++;
    clients_.emplace_back(id, std::move(retry));
    return id;
}

inline void address_space::unregister_map_client(std::uint64_t id) {
    std::lock_guard lock(clients_mutex_);
    std::erase_if(clients_, [&](const auto& c) { return c.first == id; });
}

inline void address_space::notify_map_clients() {
    std::vector<std::pair<std::uint64_t, std::function<void()>>> due;
    {
        std::lock_guard lock(clients_mutex_);
        due.swap(clients_);
    }
    for (auto& [id, fn] : due) fn();
}

inline found_section address_space::find(hwaddr addr, u128 size) const {
    found_section s;
    if (size == 0) return s;
    rcu::read_guard g;
    const flat_view& v = *current();
    const std::size_t i = v.first_ending_after(addr);
    if (i == v.ranges().size()) return s;
    const flat_range& r = v.ranges()[i];
    const u128 end = std::min<u128>(u128(addr) + size, u128_2_64);
    if (u128(r.start) >= end) return s;
    const hwaddr start = std::max(addr, r.start);
    s.mr = region_ref(*r.mr);
    s.offset_within_address_space = start;
    s.offset_within_region = r.offset_in_region + (start - r.start);
    s.size = std::min(end, r.end()) - start;
    s.readonly = r.readonly;
    s.nonvolatile = r.nonvolatile;
    return s;
}

inline found_section memory_region_find(memory_region& mr, hwaddr addr, u128 size) {
    u128 abs = u128(addr) + mr.addr();
    const memory_region* top = &mr;
    while (top->container()) {
        top = top->container();
        abs += top->addr();
    }
    if (abs >= u128_2_64) return {};
    const address_space* found = nullptr;
    address_space::for_each([&](const address_space& as) {
        if (!found && &as.root() == top) found = &as;
    });
    return found ? found->find(static_cast<hwaddr>(abs), size) : found_section{};
}

} // namespace qomem
