// qomem/detail/region_refcount.hpp — per-thread reference counts of memory
// regions while they are in the tree (Linux's percpu_ref, per thread).
//
// While an owned region is its owner's child, the child property holds it, so
// its count cannot reach zero and nobody needs its exact value on the hot
// path. memory_region_ref/unref then add +1/-1 to a counter owned by the
// calling thread — a relaxed load and a relaxed store of a word no other
// thread writes, no read-modify-write, no shared cache line — instead of the
// region's atomic count. A ref on thread A dropped on thread B leaves +1 and
// -1 in two counters: only the sum means anything.
//
// Layout. Each region in this mode has a small id (`region_slot`, held by
// the region: 4 bytes, no other per-region memory). Each thread that counts
// gets an array indexed by id (`slot_array`: max_ids 8-byte counters,
// reserved as address space with MAP_NORESERVE; a page is real memory only
// once a thread counted one of its 512 ids). An exiting thread gives its
// array back to the registry and a later thread reuses it, adding to the
// values left there: counts are never lost with a thread. Operations on a
// thread with no array (its exit destructors, or mmap failed) go to the
// registry's `orphan` array under the registry lock.
//
// Killing (kill_and_sum, when the region is unparented or its owner's last
// reference goes): mark the id word `killing`; a heavy fence; wait until no
// thread is inside an operation that may have read the id before the mark;
// then, under the registry lock, sum the id's counters over every array,
// zero them, free the id and set the word to 0 (atomic mode). From then on
// memory_region_ref/unref use the region's atomic count, with the library's
// lifetime rules unchanged. Operations that see `killing` take the registry
// lock, which the killer holds while folding the sum in, so the atomic count
// is exact whenever anyone can reach it.
//
// The grace period is this header's own, not the library's RCU: each thread
// record has a `busy` word set around the operation. Reader (an operation):
// store busy=1 (relaxed); fence L; load the id word (relaxed); update the
// counter; store busy=0 (release); fence L; load `waiting` (relaxed).
// Killer: store the mark (relaxed); fence H; load each busy (acquire). L is
// atomic_signal_fence(seq_cst) and H membarrier(2) plus a seq_cst fence: a
// region gets an id only once the process is registered for membarrier(2)
// (rcu::detail::state::probe, shared with the RCU; without it regions keep
// their atomic count). Under ThreadSanitizer, which does not model
// membarrier, both are seq_cst fences (compile time). As in
// rcu.hpp (B): H and L are ordered in the single total order S. If the
// reader's L comes first, the killer's load of busy cannot read a value older
// than the reader's busy=1: it sees 1 and waits, or the later 0, whose
// release store it acquires, so the counter store happens before the sum. If
// H comes first, the reader's id load cannot read a value older than the
// mark: it sees `killing` (or 0) and never touches its counter. A thread the
// killer saw at busy=0 and that starts a new operation has that operation's L
// after H (else the killer would not have read a 0 older than its busy=1), so
// it sees the mark. Waiting never spins: the killer sets `waiting` (relaxed),
// fences H, reloads busy, and sleeps on the busy word's futex; the reader's
// clearing store, L, and load of `waiting` see the flag whenever the killer
// can still see busy=1 (rcu.hpp (C) by the same pairing), and it wakes the
// futex. An operation never blocks while busy, and the killer holds only the
// registry lock, which no busy operation takes: no deadlock, from any thread
// (inside an RCU read section or not).
//
// Limitation: if membarrier(2) starts failing after the registration (a
// seccomp filter installed later), light readers can no longer be fenced and
// a kill cannot be made safe; the process is aborted with a message.
#pragma once

#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <vector>

#include <linux/futex.h>

#include <qomem/detail/rcu_state.hpp>

namespace qomem::detail::region_refcount {

/// Ids per thread array (the most regions counted this way at once; others
/// use their atomic count).
inline constexpr std::uint32_t max_ids = 1u << 20;
/// Set in a region's id word while it is being killed.
inline constexpr std::uint32_t killing = 1u << 31;

using counter = std::atomic<std::int64_t>;

/// One thread's record: the busy word of the grace period and its array.
struct thread_record {
    std::atomic<std::uint32_t> busy{0};
    std::atomic<std::uint32_t> waiting{0};
    counter* slots = nullptr; ///< this thread's array (null: none, use the slow path)
    bool registered = false;
    bool exited = false;
    thread_record* next = nullptr; ///< registry list (under its lock)
};

inline thread_local constinit thread_record this_thread{};

struct registry {
    std::mutex mutex;
    thread_record* threads = nullptr;  ///< live records
    std::vector<counter*> arrays;      ///< every array ever made (live and free)
    std::vector<counter*> free_arrays; ///< given back by exited threads
    counter* orphan = nullptr;         ///< operations with no array, under `mutex`
    std::vector<std::uint32_t> free_ids;
    std::uint32_t next_id = 1; ///< 0 means "not counted per thread"
    std::size_t ids_in_use = 0;
};

inline registry& the_registry() {
    static registry* r = new registry; // never destroyed: threads may exit after main
    return *r;
}

/// Counters reserved in one array (for the memory report).
inline std::size_t array_bytes() noexcept { return std::size_t(max_ids) * sizeof(counter); }

inline counter* map_array() noexcept {
    void* p = ::mmap(nullptr, array_bytes(), PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    // Zero-filled anonymous memory: every counter starts at 0 (an atomic
    // whose object representation is all zero bytes holds 0).
    return p == MAP_FAILED ? nullptr : static_cast<counter*>(p);
}

/// L. With membarrier(2) a compiler barrier: regions are counted per thread
/// only once the process is registered for it (allocate_id), and killers
/// then fence every thread with it. Without (ThreadSanitizer, which does not
/// model it, or a kernel without it) a seq_cst fence.
inline void light_fence() noexcept {
#if QOMEM_RCU_MEMBARRIER
    std::atomic_signal_fence(std::memory_order_seq_cst);
#else
    std::atomic_thread_fence(std::memory_order_seq_cst);
#endif
}

inline void futex_wake(std::atomic<std::uint32_t>& w) noexcept {
    ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&w), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr,
              nullptr, 0);
}

inline void futex_wait(std::atomic<std::uint32_t>& w, std::uint32_t expected) noexcept {
    ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&w), FUTEX_WAIT_PRIVATE, expected,
              nullptr, nullptr, 0);
}

/// Gives the thread's array back at thread exit (constructed on its first
/// counted operation, so destroyed after the thread_locals made later).
struct exit_hook {
    bool armed = false;
    ~exit_hook() {
        if (!armed) return;
        thread_record& t = this_thread;
        registry& r = the_registry();
        std::lock_guard lock(r.mutex);
        for (thread_record** p = &r.threads; *p; p = &(*p)->next)
            if (*p == &t) {
                *p = t.next;
                break;
            }
        // The array keeps its values; the next thread to register takes it
        // under this lock (the lock orders our last stores before its loads).
        if (t.slots) r.free_arrays.push_back(t.slots);
        t.slots = nullptr;
        t.exited = true; // later operations (other exit destructors) take the slow path
    }
};
inline thread_local exit_hook this_thread_exit{};

static_assert(std::atomic<std::uint32_t>::is_always_lock_free &&
                  sizeof(std::atomic<std::uint32_t>) == sizeof(std::uint32_t),
              "futex on std::atomic<uint32_t>");

/// Adds `d` to this thread's counter for the region whose id word is `word`.
/// Returns false when the region is not counted per thread (word 0, or
/// killed meanwhile): the caller uses the region's atomic count.
/// Any thread; wait-free except on the thread's first call, after its exit
/// began, and while a killer works on this region (it then waits for the
/// registry lock).
[[gnu::always_inline]] inline bool add(const std::atomic<std::uint32_t>& word, std::int64_t d);

/// Registers this thread (its first counted operation): takes a free array
/// or maps one. Without one (mmap failed), the thread counts in the orphan
/// array.
[[gnu::noinline]] inline void register_thread() {
    thread_record& t = this_thread;
    registry& r = the_registry();
    std::lock_guard lock(r.mutex);
    if (!r.free_arrays.empty()) {
        t.slots = r.free_arrays.back();
        r.free_arrays.pop_back();
    } else if (counter* a = map_array()) {
        try {
            r.arrays.push_back(a);
            t.slots = a;
        } catch (...) {
            ::munmap(a, array_bytes());
        }
    }
    t.next = r.threads;
    r.threads = &t;
    t.registered = true;
    this_thread_exit.armed = true;
}

/// Counts in the orphan array, under the registry lock: a thread without an
/// array, or one that saw a region being killed (the killer holds the lock
/// until it has folded the sum in, so this then finds the word at 0).
/// Returns false when the region is no longer counted per thread.
[[gnu::noinline]] inline bool count_orphan(const std::atomic<std::uint32_t>& word, std::int64_t d) {
    registry& r = the_registry();
    std::lock_guard lock(r.mutex);
    // Relaxed: every store to the word after its id was published is made
    // under this lock.
    const std::uint32_t id = word.load(std::memory_order_relaxed);
    if (id == 0) return false;
    if (!r.orphan) {
        r.orphan = map_array();
        if (!r.orphan) {
            std::fputs("qomem: cannot map the orphan region counters\n", stderr);
            std::abort();
        }
        r.arrays.push_back(r.orphan);
    }
    counter& c = r.orphan[id];
    c.store(c.load(std::memory_order_relaxed) + d, std::memory_order_relaxed);
    return true;
}

/// add() for a thread with no array (its first call, or after its exit
/// began), and for a word that is not an id (0: the caller uses the atomic
/// count; `killing`: wait for the killer, through the lock).
[[gnu::noinline]] inline bool add_cold(const std::atomic<std::uint32_t>& word, std::int64_t d) {
    thread_record& t = this_thread;
    if (word.load(std::memory_order_relaxed) == 0) {
        // Acquire (fence): a 0 here is kill_and_sum's final release store
        // (the word goes 0 -> id once, on the thread that makes the region,
        // before it is published; then id -> killing -> 0 once): the fold
        // into the atomic count happens before the caller's RMW on it.
        std::atomic_thread_fence(std::memory_order_acquire);
        return false;
    }
    if (!t.slots && !t.registered && !t.exited) {
        register_thread();
        if (t.slots) return add(word, d);
    }
    return count_orphan(word, d);
}

[[gnu::noinline]] inline void wake_killer(thread_record& t) noexcept {
    // A killer sleeps on our busy word (C); it resets `waiting` itself.
    futex_wake(t.busy);
}

inline bool add(const std::atomic<std::uint32_t>& word, std::int64_t d) {
    thread_record& t = this_thread;
    counter* slots = t.slots;
    if (!slots) [[unlikely]]
        return add_cold(word, d);
    t.busy.store(1, std::memory_order_relaxed);
    light_fence(); // L: see the header comment
    const std::uint32_t id = word.load(std::memory_order_relaxed);
    const bool percpu = id - 1 < max_ids - 1; // 1 .. max_ids - 1: neither 0 nor killing
    if (percpu) [[likely]] {
        counter& c = slots[id];
        // Only this thread stores to c while the word holds its id, and a
        // killer reads it only after this operation's busy=0: a plain load
        // and store, no RMW.
        c.store(c.load(std::memory_order_relaxed) + d, std::memory_order_relaxed);
    }
    // Release: the counter store happens before the killer's acquire load
    // that reads this 0.
    t.busy.store(0, std::memory_order_release);
    light_fence(); // L (C): either the killer sees 0 or we see `waiting`
    if (t.waiting.load(std::memory_order_relaxed) != 0) [[unlikely]]
        wake_killer(t);
    if (percpu) [[likely]]
        return true;
    if (id == 0) [[unlikely]] {
        // Acquire (fence, only on this branch): a 0 is either from before
        // the region was published (the word goes 0 -> id on the thread
        // that makes it) or kill_and_sum's final release store (id ->
        // killing -> 0 once): the fold into the atomic count then happens
        // before the caller's RMW on it.
        std::atomic_thread_fence(std::memory_order_acquire);
        return false;
    }
    return add_cold(word, d); // killing: wait for the killer
}

/// Gives a region an id (per-thread counting from now on). Returns 0 when
/// none is left (the region keeps its atomic count).
inline std::uint32_t allocate_id() {
#if QOMEM_RCU_MEMBARRIER
    // Without membarrier(2) the compiler barrier of add() would not do:
    // such a process keeps every region on its atomic count. (probe() is
    // once per process, shared with the RCU.)
    if (rcu::detail::global_state.probe() != rcu::detail::mode_light) return 0;
#endif
    registry& r = the_registry();
    std::lock_guard lock(r.mutex);
    std::uint32_t id = 0;
    try {
        // kill_and_sum gives the id back without allocating.
        r.free_ids.reserve(r.next_id);
    } catch (...) {
        return 0;
    }
    if (!r.free_ids.empty()) {
        id = r.free_ids.back();
        r.free_ids.pop_back();
    } else if (r.next_id < max_ids) {
        id = r.next_id++;
    }
    if (id != 0) ++r.ids_in_use;
    return id;
}

/// The current sum of `id`'s counters. Requires: r.mutex held.
inline std::int64_t sum_locked(registry& r, std::uint32_t id) noexcept {
    std::int64_t s = 0;
    for (counter* a : r.arrays) s += a[id].load(std::memory_order_relaxed);
    return s;
}

/// A racy snapshot of the per-thread part of a count (exact when no other
/// thread counts meanwhile): for ref_count().
inline std::int64_t snapshot(const std::atomic<std::uint32_t>& word) {
    const std::uint32_t id = word.load(std::memory_order_acquire) & ~killing;
    if (id == 0) return 0;
    registry& r = the_registry();
    std::lock_guard lock(r.mutex);
    if ((word.load(std::memory_order_relaxed) & ~killing) != id) return 0; // folded meanwhile
    return sum_locked(r, id);
}

/// The heavy fence H. Requires: r.mutex held.
inline void heavy_fence(registry& r) noexcept {
#if QOMEM_RCU_MEMBARRIER
    bool others = false;
    for (const thread_record* t = r.threads; t; t = t->next)
        if (t != &this_thread) others = true;
    // Regions got ids only after the registration succeeded (allocate_id).
    if (others && rcu::detail::membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) != 0) {
        std::fputs("qomem: membarrier(2) failed: per-thread region counts cannot be "
                   "collected safely\n",
                   stderr);
        std::abort();
    }
#else
    (void)r;
#endif
    std::atomic_thread_fence(std::memory_order_seq_cst);
}

/// Switches the region whose id word is `word` to its atomic count: waits
/// until no thread is inside an operation that saw the id, then, with every
/// operation blocked on the registry lock, calls fold(sum) (the region adds
/// the sum to its atomic count), frees the id and stores 0. Does nothing if
/// the word is 0. Any thread; never inside add (no operation calls it).
/// Complexity: O(threads + arrays) plus one membarrier(2) and, if a thread is
/// caught inside an operation, a futex sleep until it leaves.
template <class Fold>
void kill_and_sum(std::atomic<std::uint32_t>& word, Fold&& fold) {
    registry& r = the_registry();
    std::lock_guard lock(r.mutex);
    const std::uint32_t id = word.load(std::memory_order_relaxed);
    if (id == 0) return;
    // Relaxed: ordered before the loads of busy by H.
    word.store(id | killing, std::memory_order_relaxed);
    heavy_fence(r);
    for (thread_record* t = r.threads; t; t = t->next) {
        if (t == &this_thread) continue; // not inside an operation: we are here
        // Acquire: pairs with the operation's release store of 0.
        if (t->busy.load(std::memory_order_acquire) == 0) continue;
        t->waiting.store(1, std::memory_order_relaxed); // ordered by the next H (C)
        heavy_fence(r);
        while (t->busy.load(std::memory_order_acquire) != 0) futex_wait(t->busy, 1);
        t->waiting.store(0, std::memory_order_relaxed); // only the lock holder writes it
    }
    // Every operation that saw the id has ended (happens before this point);
    // later ones see the mark and wait for the lock.
    const std::int64_t s = sum_locked(r, id);
    for (counter* a : r.arrays)
        if (a[id].load(std::memory_order_relaxed) != 0) a[id].store(0, std::memory_order_relaxed);
    // A fold that reports misuse (through a throwing assertion handler)
    // still leaves the region counted atomically: finish, then rethrow.
    std::exception_ptr failed;
    try {
        fold(s);
    } catch (...) {
        failed = std::current_exception();
    }
    r.free_ids.push_back(id); // reserved by allocate_id: never throws
    --r.ids_in_use;
    // Release: a thread that reads this 0 without the lock (add's pre-check)
    // then sees the folded atomic count. Under the lock, add reads it relaxed.
    word.store(0, std::memory_order_release);
    if (failed) std::rethrow_exception(failed);
}

/// Frees the id of a region destroyed while counted per thread (its owner's
/// constructor threw): its counters are reset, the sum is dropped.
inline void discard(std::atomic<std::uint32_t>& word) noexcept {
    if (word.load(std::memory_order_relaxed) == 0) return; // our own word, on the destroying thread
    try {
        kill_and_sum(word, [](std::int64_t) {});
    } catch (...) {
    }
}

/// Ids in use (regions counted per thread now) and arrays mapped.
struct usage {
    std::size_t ids_in_use = 0;
    std::size_t arrays = 0;
};
inline usage current_usage() {
    registry& r = the_registry();
    std::lock_guard lock(r.mutex);
    return {r.ids_in_use, r.arrays.size()};
}

} // namespace qomem::detail::region_refcount
