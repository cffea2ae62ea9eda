// qomem/rcu.hpp — read-copy-update: lock-free readers of published data
// (flat views, dirty bitmaps) and deferred reclamation of what they read.
//
// Readers (vCPU threads reading, writing and mapping through an address
// space) never take a lock and never wait. A reader brackets its use of
// published data with a read section; an updater publishes a new version
// and retires the old one, which is reclaimed once every read section that
// could still hold it has ended.
//
//     {
//         qomem::rcu::read_guard g;              // nestable, wait-free
//         const flat_view* v = as.current();     // valid until g ends
//     }
//     qomem::rcu::retire(old, [](void* p) { ... });  // after unpublishing old
//     qomem::rcu::synchronize();                 // sleeps for a grace period
//
// Threads. Any thread may read at any time. retire, reclaim and synchronize
// may be called from any thread, several at once. Callbacks run on the thread
// that calls retire, reclaim or synchronize (never on a thread of this
// library: there is none), one thread at a time: a callback never runs
// concurrently with another callback, and never nests in one: retire,
// reclaim and synchronize called from a callback run no callback (the pass
// running it continues once it returns). Callbacks that are ready run in
// the order their objects were retired (FIFO). In qomem the callbacks
// release flat views and finalize ownerless regions: they run on the thread
// that changed the topology or called memory_synchronize, and a view retired
// before a region's finalization is released before that region goes (the
// view's release still touches the regions it shows), also when that
// release is what dropped the region's last handle.
//
// How. A 64-bit global epoch. A reader's outermost read_lock records the
// epoch it began at in its thread's record (0 when outside). retire(p)
// increments the epoch and stamps p with the value before the increment, s;
// p may be reclaimed once every reader is seen outside or at an epoch > s.
// synchronize() increments the epoch to s and waits, asleep on a futex,
// until every reader is seen outside or at an epoch > s: only the sections
// that began before it started (bounded), however many begin meanwhile.
//
// Fences. Seeing a reader's recorded epoch needs a store-load fence between
// that store and the reader's loads of published pointers. On Linux the
// reader pays only a compiler barrier and the writer forces the hardware
// fence on every running thread with membarrier(2) (the asymmetric-fence
// scheme of liburcu-memb, QEMU and P1202). Where membarrier is unavailable,
// and under ThreadSanitizer (which does not model it), readers issue
// atomic_thread_fence(seq_cst) instead. If membarrier starts failing later
// (a seccomp filter), readers switch to the fence; see "When membarrier
// fails" below for the cost.
//
// Orderings (C++ memory model, not x86). A light-path reader's
// atomic_signal_fence(seq_cst) keeps the compiler from moving its accesses
// across it, and membarrier(2) runs a full barrier on every thread of the
// process at some instruction boundary (the scheduler is one for threads not
// running): as in P1202's asymmetric fences, a writer's heavy fence H and a
// reader's light fence L then behave as two seq_cst fences, ordered one way
// or the other in the single total order S ([atomics.order]/4). The fenced
// path has real seq_cst fences on both sides. With that:
//  (A) Epoch versus pointer. The reader loads the epoch with acquire; every
//      increment is an acq_rel RMW, so all increments form one release
//      sequence. A reader that reads an epoch > s therefore synchronizes
//      with the increment that retired p, and the unpublishing of p (before
//      retire on its thread) happens before the reader's loads of the
//      pointer: they return the new pointer, never p. (Issue 11, item 1:
//      with a relaxed epoch load, an ARMv8 reader could record the new epoch
//      and still read the old pointer; QEMU gets the same effect by fencing
//      before it bumps its counter.)
//  (B) Reader versus scan. Reader: store epoch (relaxed); L; load pointers.
//      Writer: unpublish; ...; H; load each reader's epoch (acquire). If L
//      precedes H in S, the scan cannot read a value of the reader's epoch
//      older than that store ([atomics.order]/4.4 with X = H, Y = L): it
//      sees the section (or its end: the unlock's release store of 0 pairs
//      with the scan's acquire, so the section's reads happen before the
//      reclamation). If H precedes L, the pointer loads cannot read a value
//      older than the unpublishing (same rule, X = L, Y = H): they see the
//      new pointer. Either way an object is reclaimed only when no reader
//      that can hold it is inside.
//  (C) Sleeping. Writer: set the reader's `waiting` (relaxed); load gp_seq
//      (acquire); H; load its epoch. Reader leaving: store epoch 0
//      (release); L; load `waiting` (relaxed); if set, increment gp_seq
//      (release) and futex-wake. By the pairing of H and L, either the scan
//      sees 0 or the reader sees `waiting`; in the second case, if the
//      writer's gp_seq load already saw the increment, its acquire makes
//      the 0 visible to the scan; otherwise futex_wait finds gp_seq changed
//      or is woken. No wake-up is lost, and the writer uses no CPU while it
//      waits (issue 11, item 3).
//  (D) Concurrent reclaimers. reclaim() loads the epoch (acquire) as its
//      limit before H and the scan, and reclaims only entries stamped below
//      it: their increments precede that value in the epoch's modification
//      order, so by (A)'s release sequence their unpublishing happens before
//      H and (B) applies. An entry retired after the load waits for a later
//      pass. (Issue 11, item 2: the scan and the partition used to be
//      unrelated, so an entry retired in between was reclaimed under a
//      reader the scan had not seen.)
//  (E) Registration. A thread's first read_lock pushes its record on a
//      lock-free stack (CAS acq_rel) that writers drain (exchange acq_rel)
//      under the registry lock. A record pushed after a writer's drain reads
//      the drain's value or a later push's, so the drain synchronizes with
//      the push: the writer's unpublishing happens before that reader's
//      pointer loads, and the writer need not see it.
//
// When membarrier fails (issue 11, item 5). A reader that entered on the
// light path may have its epoch store still in its store buffer, and the
// writer can no longer force it out; it cannot tell such a reader from one
// outside. So the failing writer switches every reader to the fenced path
// (state::mode, read at each read_lock and read_unlock), and from then on a
// writer trusts a record only once its owner has acknowledged: at its first
// read_lock or read_unlock that takes the fenced path it stores `acked`
// (release) before that operation's seq_cst fence. The mode never returns
// to light, so every later section of that thread is fenced and (B) holds
// with real fences; every earlier section ended before the acknowledgement,
// which the writer reads with acquire. Until then the record counts as
// inside a section that began before anything was retired. Cost: a thread
// that entered a read section before the failure and then stays idle (no
// read_lock, no exit) holds back reclamation, and synchronize() sleeps until
// it reads again or exits. Safe, but not bounded for such a thread.
//
// fork (issue 11, item 4). pthread_atfork handlers take the locks before the
// fork; the child forgets every reader thread but the forking one.
//
// Thread exit. A pthread key destructor unlinks the thread's record (after
// the thread's C++ thread_local destructors, which may still read). A thread
// that exits inside a read section is misuse, reported through QOMEM_ASSERT;
// with a handler that throws, the exception is dropped (it cannot leave a
// thread-exit destructor) and the section is closed, so that it does not
// hold back reclamation.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <utility>
#include <vector>

#include <qomem/assert.hpp>
#include <qomem/detail/rcu_state.hpp>

namespace qomem::rcu {

namespace detail {

/// The fenced path of read_lock and read_unlock: acknowledges the switch
/// away from the light path (the first time), then fences. On unlock
/// (`leaving`) it also wakes writers waiting for this reader; on lock it
/// does so only when it acknowledged (a degraded writer waits for that).
[[gnu::noinline]] inline void fenced_point(reader_record& r, bool leaving) noexcept {
    bool check = leaving;
    if (!r.acked_local) [[unlikely]] {
        // Release: pairs with the writer's acquire load of `acked`: every
        // earlier section of this thread (light ones included) ended before.
        r.acked.store(true, std::memory_order_release);
        r.acked_local = true;
        check = true;
    }
    // Pairs with the writer's heavy fence: (B) for the epoch store before
    // it, (C) for the `waiting` load after it.
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (check && r.waiting.load(std::memory_order_relaxed)) [[unlikely]] {
        r.waiting.store(0, std::memory_order_relaxed); // any writer's wake is the gp_seq bump
        wake_writers(global_state);
    }
}

/// read_unlock below the outermost level, or without a section (misuse).
[[gnu::noinline]] inline void read_unlock_nested(reader_record& r) {
    if (r.nesting == 0) unbalanced_unlock();
    --r.nesting;
}

/// The rest of an outermost read_unlock on the light path, when a writer
/// waits for this reader or its registration was for this section only.
[[gnu::noinline]] inline void left_slow(reader_record& r) noexcept {
    if (r.waiting.load(std::memory_order_relaxed)) {
        r.waiting.store(0, std::memory_order_relaxed); // any writer's wake is the gp_seq bump
        wake_writers(global_state);
    }
    if (r.transient) unlink_reader(global_state, r);
}

/// True when `r` may be inside a section that began at or before `target`.
/// Called under registry_mutex, after the heavy fence.
inline bool may_hold(const reader_record& r, const reader_record* self, bool degraded,
                     std::uint64_t target) noexcept {
    if (&r == self) {
        // Our own record: program order, no fence needed.
        const std::uint64_t e = r.epoch.load(std::memory_order_relaxed);
        return e != 0 && e <= target;
    }
    // Acquire: pairs with the owner's release store of `acked` (see
    // "When membarrier fails").
    if (degraded && !r.acked.load(std::memory_order_acquire)) return true;
    // Acquire: pairs with read_unlock's release store of 0 (the section's
    // reads happen before what the writer does next); the section's start is
    // made visible by the fence pairing (B).
    const std::uint64_t e = r.epoch.load(std::memory_order_acquire);
    return e != 0 && e <= target;
}

/// Heavy fence over the current registry. Called under registry_mutex.
/// Returns whether writers must require acknowledgements (degraded).
inline bool fence_registry(state& s, reader_record* self) noexcept {
    drain_incoming(s);
    bool others = false;
    for (const reader_record* r = s.readers; r; r = r->next)
        if (r != self) {
            others = true;
            break;
        }
    s.heavy_fence(others);
    // Relaxed: ordered after heavy_fence's acquire load of `mode`, which
    // reads degrade()'s release store whenever `degraded` matters.
    const bool degraded = s.degraded.load(std::memory_order_relaxed);
    if (degraded && !self->acked_local && self->registered && self->nesting == 0) {
        // This thread is outside any section and has seen mode_fenced
        // (heavy_fence's acquire load): its later sections are fenced, its
        // earlier ones are over. Acknowledge, as read_lock would, so that a
        // writer thread that reads no more does not hold back the others.
        fenced_point(*self, true);
    }
    return degraded;
}

/// The oldest epoch a reader may be in (UINT64_MAX when none is).
inline std::uint64_t oldest_reader_epoch(state& s) {
    reader_record* self = &this_thread_reader;
    std::lock_guard lock(s.registry_mutex);
    const bool degraded = fence_registry(s, self);
    std::uint64_t oldest = UINT64_MAX;
    for (const reader_record* r = s.readers; r; r = r->next) {
        if (r != self && degraded && !r->acked.load(std::memory_order_acquire)) return 0;
        const std::uint64_t e =
            r->epoch.load(r == self ? std::memory_order_relaxed : std::memory_order_acquire);
        if (e != 0) oldest = std::min(oldest, e);
    }
    return oldest;
}

/// Sleeps until no reader may be inside a section that began at or before
/// `target` (a grace period). Never spins: one or two heavy fences per
/// wake-up, and a futex wait in between.
inline void wait_for_readers(std::uint64_t target) {
    state& s = global_state;
    reader_record* self = &this_thread_reader;
    for (;;) {
        std::uint32_t seq;
        {
            std::lock_guard lock(s.registry_mutex);
            bool degraded = fence_registry(s, self);
            bool busy = false;
            for (const reader_record* r = s.readers; r && !busy; r = r->next)
                busy = may_hold(*r, self, degraded, target);
            if (!busy) return;
            // Ask the busy readers to wake us (they clear the flag; a flag
            // left set on a reader that turns out to be outside costs it one
            // futex wake at its next read_unlock).
            for (reader_record* r = s.readers; r; r = r->next)
                if (r != self && may_hold(*r, self, degraded, target))
                    r->waiting.store(1,
                                     std::memory_order_relaxed); // ordered by the fence below (C)
            // Acquire: pairs with wake_writers' release increment (C).
            seq = s.gp_seq.load(std::memory_order_acquire);
            degraded = fence_registry(s, self);
            busy = false;
            for (const reader_record* r = s.readers; r && !busy; r = r->next)
                busy = may_hold(*r, self, degraded, target);
            if (!busy) return;
        }
        futex_wait(s.gp_seq, seq); // returns at once if a reader woke us since the load
    }
}

/// True while this thread runs callbacks (it holds the reclaim lock).
inline bool in_callback() noexcept { return reclaim_depth != 0; }

/// Runs the callbacks of the entries stamped below `limit`, oldest first,
/// taking them one at a time from the front of the queue, on this thread,
/// with the reclaim lock held. Callbacks never nest: retire, reclaim and
/// synchronize called from a callback run none (see run_ready), so each
/// callback has finished before the next one starts, in the order of
/// retirement. If a callback throws, the exception propagates and the
/// entries not yet taken stay retired, in order.
inline void run_entries_below(state& s, std::uint64_t limit) {
    for (;;) {
        retired_entry e;
        {
            std::lock_guard lock(s.retired_mutex);
            if (!s.retired || !s.retired->pop_below(limit, e)) return;
        }
        e.fn(e.p);
    }
}

/// With the reclaim lock held by this thread's pass: runs the entries
/// stamped below `limit`; then, for as long as those callbacks retired more
/// (a view's release dropping an ownerless region's last handle retires the
/// region's finalization), whatever of that is safe already, after a fresh
/// limit, fence and scan ((D), as in reclaim_pass). Bounded by the chain of
/// callbacks retiring from callbacks: entries other threads retire
/// meanwhile are left to later passes unless they come before those.
inline void run_ready(state& s, std::uint64_t limit) {
    for (;;) {
        const std::uint64_t before = callback_retires;
        run_entries_below(s, limit);
        if (callback_retires == before) return;
        const std::uint64_t fresh = s.global_epoch.load(std::memory_order_acquire);
        limit = std::min(fresh, oldest_reader_epoch(s));
    }
}

/// Releases the reclaim lock on every way out.
struct reclaim_lock_guard {
    ~reclaim_lock_guard() { reclaim_unlock(); }
};

/// One reclamation pass. With `wait`, waits for the callbacks running on
/// another thread, then runs what is ready; otherwise leaves the work to
/// that thread. Called from a callback, does nothing: the pass running on
/// this thread continues once the callback returns.
inline void reclaim_pass(bool wait) {
    state& s = global_state;
    if (in_callback()) return;
    {
        std::lock_guard lock(s.retired_mutex);
        if (!s.retired || s.retired->empty()) return;
    }
    if (wait)
        reclaim_lock();
    else if (!reclaim_try_lock())
        return; // another thread runs callbacks; a later pass takes what is left
    reclaim_lock_guard guard;
    // (D): the limit is read before the fence and the scan.
    const std::uint64_t limit = s.global_epoch.load(std::memory_order_acquire);
    const std::uint64_t oldest = oldest_reader_epoch(s);
    run_ready(s, std::min(limit, oldest));
}

} // namespace detail

/// Enters a read section (nestable). Wait-free after the thread's first
/// section; the first one registers the thread with a lock-free push (no
/// lock, no allocation).
inline void read_lock() noexcept {
    detail::reader_record& r = detail::this_thread_reader;
    if (r.nesting++ != 0) return;
    detail::state& s = detail::global_state;
    if (!r.registered) [[unlikely]]
        detail::register_reader(r);
    // (A): acquire pairs with the acq_rel increments of retire/synchronize.
    const std::uint64_t e = s.global_epoch.load(std::memory_order_acquire);
    // Relaxed: made visible to writers by the fence that follows (B).
    r.epoch.store(e, std::memory_order_relaxed);
    // Relaxed: the value only picks the fence (see "When membarrier fails").
    if (s.mode.load(std::memory_order_relaxed) == detail::mode_light) [[likely]]
        std::atomic_signal_fence(std::memory_order_seq_cst); // L; membarrier(2) supplies the rest
    else
        detail::fenced_point(r, false);
}

/// Leaves a read section. Requires (asserted): one is open on this thread.
/// Effects: at the outermost level, the thread is outside (writers waiting
/// for it are woken). Throws: what the assertion handler throws.
inline void read_unlock() {
    detail::reader_record& r = detail::this_thread_reader;
    if (r.nesting != 1) [[unlikely]] {
        detail::read_unlock_nested(r); // inner level, or misuse
        return;
    }
    r.nesting = 0;
    detail::state& s = detail::global_state;
    // Release: pairs with the writer's acquire scan; everything this section
    // read happens before the writer reclaims.
    r.epoch.store(0, std::memory_order_release);
    if (s.mode.load(std::memory_order_relaxed) == detail::mode_light) [[likely]] {
        std::atomic_signal_fence(std::memory_order_seq_cst); // L (C)
        // Relaxed: ordered after the store of 0 by L and the writer's
        // membarrier (C).
        if (r.waiting.load(std::memory_order_relaxed) != 0 || r.transient) [[unlikely]]
            detail::left_slow(r);
    } else {
        detail::fenced_point(r, true);
        if (r.transient) [[unlikely]]
            detail::unlink_reader(s, r);
    }
}

/// True inside a read section on this thread.
inline bool in_read_section() noexcept { return detail::this_thread_reader.nesting > 0; }

/// True while readers run on the light path: no hardware fence, the writers
/// forcing one with membarrier(2). False before the first read section, on
/// kernels without membarrier, under ThreadSanitizer, and after membarrier
/// has failed.
inline bool uses_membarrier() noexcept {
    return detail::global_state.mode.load(std::memory_order_acquire) == detail::mode_light;
}

/// RAII read section.
class read_guard {
public:
    read_guard() noexcept { read_lock(); }
    ~read_guard() { read_unlock(); }
    read_guard(const read_guard&) = delete;
    read_guard& operator=(const read_guard&) = delete;
};

/// Reclaims every retired object that no reader can still see, without
/// waiting for readers.
/// Effects: runs those objects' callbacks on this thread, one at a time,
/// in the order the objects were retired (after waiting for callbacks
/// running on another thread; inside a read section it does not wait, as
/// such a callback may be waiting for this section: it leaves the work to
/// that thread). They may finalize whatever they release. Called from a
/// callback, does nothing: the objects are reclaimed by the pass that runs
/// that callback, once it returns.
/// Complexity: one heavy fence (membarrier(2) when other threads read), a
/// scan of the reader threads, linear in the retired objects (one more
/// fence and scan for each round of objects that callbacks retire).
/// Throws: what a callback throws (the rest stay retired).
inline void reclaim() { detail::reclaim_pass(!in_read_section()); }

/// Retires `p`: `fn(p)` runs once no read section that might have seen `p`
/// is left.
/// Requires: `p` is no longer reachable by a reader that starts now (it was
/// unpublished before this call, on this thread or one that happens before
/// it); `fn` does not throw.
/// Effects: reclaims whatever is already safe, on this thread, unless
/// another thread is running callbacks (`p` itself only if no thread is
/// inside a read section that began before this call: usually not yet).
/// Called from a callback, only queues `p`: the pass running that callback
/// reclaims it after the callbacks before it, once it is safe.
/// Complexity: as reclaim(); amortised O(1) to queue `p`.
/// Throws: std::bad_alloc (nothing is retired then: `p` is still the
/// caller's), or what a callback throws (`p` stays retired).
inline void retire(void* p, void (*fn)(void*)) {
    detail::state& s = detail::global_state;
    detail::ensure_process_hooks();
    {
        std::lock_guard lock(s.retired_mutex);
        // The only throws (std::bad_alloc), before the stamp.
        if (!s.retired) s.retired = new detail::retired_queue;
        s.retired->reserve_one();
        // acq_rel, (A) and (D): release so that a reader or reclaimer that
        // reads this value or a later one sees the unpublishing of p;
        // acquire so that the increments before it are seen here as well.
        const std::uint64_t stamp = s.global_epoch.fetch_add(1, std::memory_order_acq_rel);
        s.retired->push({stamp, fn, p}); // under the lock: stamps increase along the queue
    }
    if (detail::in_callback()) {
        ++detail::callback_retires; // the pass under way on this thread runs it
        return;
    }
    detail::reclaim_pass(false);
}

/// Waits for a grace period, then reclaims.
/// Requires (asserted): not inside a read section on this thread (it would
/// wait for itself). No reader may wait, inside a read section, for this
/// thread (or for a lock this thread holds): that is a deadlock.
/// Effects: sleeps (futex; no CPU used) until every read section that began
/// before the call has ended — sections begun meanwhile are not waited for.
/// Then every object retired before the call has been reclaimed, in the
/// order retired, by this thread or by another that was running its
/// callback; so have the objects those callbacks retired, if no reader can
/// see them any more. Callbacks may finalize what they release. Called
/// from a callback, it only waits for the grace period: the objects are
/// reclaimed by the pass that runs that callback, once it returns
/// (callbacks never nest).
/// Complexity: a heavy fence and a registry scan per wake-up (a reader
/// leaving a section this call waits for wakes it), linear in the retired
/// objects.
/// Throws: what the assertion handler throws (nothing changed), what a
/// callback throws.
inline void synchronize() {
    QOMEM_ASSERT(!in_read_section(), "rcu::synchronize inside a read section would never end");
    detail::state& s = detail::global_state;
    detail::ensure_process_hooks();
    // acq_rel, as in retire: every entry retired before this call has a
    // stamp <= target and its unpublishing happens before the scans below.
    const std::uint64_t target = s.global_epoch.fetch_add(1, std::memory_order_acq_rel);
    detail::wait_for_readers(target);
    if (detail::in_callback()) return;
    detail::reclaim_lock();
    detail::reclaim_lock_guard guard;
    detail::run_ready(s, target + 1);
}

} // namespace qomem::rcu
