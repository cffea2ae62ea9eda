// qomem/detail/rcu_state.hpp — the machinery under qomem/rcu.hpp: per-thread
// reader records, their registry, the global epoch, the fences (membarrier(2)
// or seq_cst), the futex the writers sleep on, and the fork and thread-exit
// hooks. Read qomem/rcu.hpp first: it states the protocol and argues its
// orderings; the comments here say what each atomic pairs with.
#pragma once

#include <linux/futex.h>
#include <linux/membarrier.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#include <qomem/assert.hpp>

// ThreadSanitizer does not model membarrier(2): a reader on the light path
// would look unsynchronised to it. Under TSan the readers always take the
// fenced path (README, "Threads").
#if defined(__SANITIZE_THREAD__)
#define QOMEM_RCU_MEMBARRIER 0
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define QOMEM_RCU_MEMBARRIER 0
#endif
#endif
#if !defined(QOMEM_RCU_MEMBARRIER)
#if defined(__NR_membarrier)
#define QOMEM_RCU_MEMBARRIER 1
#else
#define QOMEM_RCU_MEMBARRIER 0
#endif
#endif

namespace qomem::rcu::detail {

/// The read-side protocol in force (state::mode).
enum fence_mode : int {
    mode_unprobed = -1, ///< no reader registered yet: nobody takes the light path
    mode_fenced = 0,    ///< readers issue atomic_thread_fence(seq_cst)
    mode_light = 1,     ///< readers issue a compiler barrier; writers call membarrier(2)
};

/// One per thread that has entered a read section (thread_local, so it lives
/// as long as the thread; unlinked from the registry before the thread's
/// storage goes).
struct alignas(64) reader_record {
    /// The global epoch this thread's outermost read section began at; 0
    /// when outside. Written only by the owner; read by writers.
    std::atomic<std::uint64_t> epoch{0};
    /// Set (1) by a writer that sleeps until this reader leaves its section;
    /// the reader clears it and wakes the writers (rcu.hpp, "Sleeping").
    std::atomic<std::uint32_t> waiting{0};
    /// Set by the owner at its first fenced read_lock/read_unlock: from then
    /// on every section of this thread is fenced (state::mode only goes
    /// light -> fenced), so writers that can no longer force a fence can
    /// trust this record (rcu.hpp, "When membarrier fails").
    std::atomic<bool> acked{false};

    // ---- owner-only (never read by another thread) ----
    unsigned nesting = 0;
    bool registered = false;
    /// Registered for the current section only (the thread's exit hook has
    /// run, or could not be installed): unlinked again at the outermost
    /// read_unlock.
    bool transient = false;
    bool acked_local = false; ///< owner's copy of `acked`

    // ---- registry links: guarded by state::registry_mutex, or owned by
    //      the pushing thread until its push onto state::incoming succeeds.
    reader_record* next = nullptr;
};

struct retired_entry {
    std::uint64_t stamp; ///< global epoch before the retire's increment
    void (*fn)(void*);
    void* p;
};

/// The retired objects not yet reclaimed, oldest first: retire stamps and
/// appends under one lock, so the stamps increase from front to back, and
/// the entries a reclaimer may run (stamped below its limit) are always a
/// prefix. Reclaimers take them one at a time from the front, so callbacks
/// run in the order their objects were retired.
class retired_queue {
public:
    bool empty() const noexcept { return head_ == items_.size(); }

    /// Makes room for one append, so that push cannot allocate. Reuses the
    /// space of the taken entries when they are at least half of it
    /// (amortised O(1)); otherwise doubles the capacity.
    /// Throws: std::bad_alloc (nothing changed).
    void reserve_one() {
        if (items_.size() < items_.capacity()) return;
        if (head_ != 0 && head_ >= items_.size() / 2) {
            items_.erase(items_.begin(), items_.begin() + static_cast<std::ptrdiff_t>(head_));
            head_ = 0;
            return;
        }
        items_.reserve(std::max<std::size_t>(16, 2 * items_.capacity()));
    }
    /// Requires: reserve_one() since the last push; `e.stamp` above every
    /// stamp queued.
    void push(const retired_entry& e) noexcept { items_.push_back(e); }

    /// Takes the oldest entry if it is stamped below `limit`.
    bool pop_below(std::uint64_t limit, retired_entry& out) noexcept {
        if (empty() || items_[head_].stamp >= limit) return false;
        out = items_[head_++];
        if (empty()) {
            items_.clear();
            head_ = 0;
        }
        return true;
    }

private:
    std::vector<retired_entry> items_;
    std::size_t head_ = 0; ///< entries before it were taken
};

/// The process-wide state. Constant-initialised and trivially destructible:
/// readers and writers on other threads may still use it while static
/// destructors run at exit.
struct state {
    /// Starts at 1 (0 means "outside a section" in reader_record::epoch).
    /// Incremented (acq_rel) by retire and synchronize; loaded (acquire) by
    /// readers at the start of a section and by reclaim. See rcu.hpp,
    /// "Orderings", (A) and (D).
    std::atomic<std::uint64_t> global_epoch{1};

    /// fence_mode. Readers load it relaxed: the value only chooses which
    /// fence they issue, and a reader that still sees mode_light after a
    /// switch is covered by the acknowledgement rule. Writers load it
    /// acquire, pairing with probe()'s and degrade()'s release, so that a
    /// writer that sees mode_fenced after a failure also sees `degraded`.
    std::atomic<int> mode{mode_unprobed};
    /// True once membarrier(2) has failed after readers took the light path.
    /// Written before mode's release store, read after mode's acquire load.
    std::atomic<bool> degraded{false};

    /// Lock-free stack of records registered since a writer last drained
    /// it: a thread's first read section pushes here instead of taking a
    /// lock or allocating. Push: CAS acq_rel; drain: exchange acq_rel
    /// (rcu.hpp, "Orderings", (E)).
    std::atomic<reader_record*> incoming{nullptr};
    std::mutex registry_mutex;
    reader_record* readers = nullptr; ///< guarded by registry_mutex

    /// Futex word the writers sleep on: incremented (release) by a reader
    /// that leaves a section with `waiting` set, or by a record leaving the
    /// registry; loaded (acquire) by a writer before the scan after which it
    /// may sleep. A change since that load means "scan again".
    std::atomic<std::uint32_t> gp_seq{0};

    std::mutex retired_mutex;
    /// Guarded by retired_mutex. Allocated by the first retire, never freed
    /// (see above).
    retired_queue* retired = nullptr;

    /// Serialises the reclaim callbacks (one thread runs them at a time).
    std::mutex reclaim_mutex;

    /// Thread-exit hook: a pthread key whose destructor unregisters.
    pthread_key_t exit_key{};
    bool exit_key_ok = false;
    pthread_once_t hooks_once = PTHREAD_ONCE_INIT;

    /// Chooses the read-side protocol, once, before the first reader takes
    /// it (called at every registration; cheap after the first).
    int probe() noexcept;
    /// Called by a writer whose membarrier(2) failed: readers switch to
    /// fences, writers trust only acknowledged records from now on.
    void degrade() noexcept;
    /// The writer's half of the fence pairing (rcu.hpp, "Orderings"): a
    /// seq_cst fence on this thread, and, in mode_light, membarrier(2) so
    /// that every running thread of the process executes one too.
    /// `others` is false when no other thread is registered (no reader's
    /// store needs forcing out).
    void heavy_fence(bool others) noexcept;
};

inline constinit state global_state{};
static_assert(std::is_trivially_destructible_v<state>, "rcu state must survive static destruction");

inline thread_local constinit reader_record this_thread_reader{};
/// Set once the thread's exit hook has run: later read sections (in other
/// exit-time destructors) register for their own duration only.
inline thread_local constinit bool this_thread_exited = false;
/// Depth of reclaim_mutex ownership by this thread: non-zero while it runs
/// callbacks (0 or 1: callbacks never nest; kept as a count for fork).
inline thread_local constinit unsigned reclaim_depth = 0;
/// Objects retired by callbacks running on this thread (rcu.hpp, run_ready).
inline thread_local constinit std::uint64_t callback_retires = 0;

// ---- system calls -------------------------------------------------------------

static_assert(sizeof(std::atomic<std::uint32_t>) == sizeof(std::uint32_t) &&
                  std::atomic<std::uint32_t>::is_always_lock_free,
              "futex on std::atomic<uint32_t>");

inline std::uint32_t* futex_word(std::atomic<std::uint32_t>& a) noexcept {
    return reinterpret_cast<std::uint32_t*>(&a);
}

/// Sleeps while `a` holds `expected` (returns at once otherwise, or on a
/// wake-up, or on a signal: callers re-check).
inline void futex_wait(std::atomic<std::uint32_t>& a, std::uint32_t expected) noexcept {
    ::syscall(SYS_futex, futex_word(a), FUTEX_WAIT_PRIVATE, expected, nullptr, nullptr, 0);
}

inline void futex_wake_all(std::atomic<std::uint32_t>& a) noexcept {
    ::syscall(SYS_futex, futex_word(a), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
}

inline long membarrier(int cmd) noexcept {
#if defined(__NR_membarrier)
    return ::syscall(__NR_membarrier, cmd, 0, 0);
#else
    (void)cmd;
    return -1;
#endif
}

// ---- fences ---------------------------------------------------------------------

inline int state::probe() noexcept {
    int m = mode.load(std::memory_order_acquire);
    if (m != mode_unprobed) return m;
    int chosen = mode_fenced;
#if QOMEM_RCU_MEMBARRIER
    const long cmds = membarrier(MEMBARRIER_CMD_QUERY);
    if (cmds > 0 && (cmds & MEMBARRIER_CMD_PRIVATE_EXPEDITED) &&
        membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0)
        chosen = mode_light;
#endif
    // acq_rel: the first prober's choice is the one every thread uses (a
    // later prober's CAS fails and reads it). The registration it did, if
    // any, precedes any use of the light path (sequenced before the push
    // of the record, (E)).
    if (mode.compare_exchange_strong(m, chosen, std::memory_order_acq_rel,
                                     std::memory_order_acquire))
        return chosen;
    return m; // another thread probed first
}

inline void state::degrade() noexcept {
    // Relaxed, then published by mode's release store: a writer that
    // acquires mode_fenced sees degraded == true (unless mode was fenced
    // from the start, when no reader ever took the light path).
    degraded.store(true, std::memory_order_relaxed);
    mode.store(mode_fenced, std::memory_order_release);
}

inline void state::heavy_fence(bool others) noexcept {
#if QOMEM_RCU_MEMBARRIER
    if (others && mode.load(std::memory_order_acquire) == mode_light) {
        if (membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) != 0) {
            // Not registered (a kernel that lost the registration), or
            // refused (a seccomp filter installed since): try to register
            // once more, then give up on the light path.
            if (membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) != 0 ||
                membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) != 0)
                degrade();
        }
    }
#else
    (void)others;
#endif
    // The writer's own seq_cst fence (membarrier(2) is a full barrier on the
    // calling thread as well, but this is the one the C++ argument names).
    std::atomic_thread_fence(std::memory_order_seq_cst);
}

// ---- registry (callers hold registry_mutex unless stated) -----------------------

/// Moves the records pushed since the last drain onto the registry list.
inline void drain_incoming(state& s) noexcept {
    // acq_rel: acquire pairs with the pushes' release (their `next` links
    // are visible); release pairs with the acquire of any later push, which
    // then happens after everything this writer did before (rcu.hpp, (E)).
    reader_record* r = s.incoming.exchange(nullptr, std::memory_order_acq_rel);
    while (r) {
        reader_record* n = r->next;
        r->next = s.readers;
        s.readers = r;
        r = n;
    }
}

/// Pushes `r` onto the incoming stack. Lock-free, allocates nothing: safe in
/// a thread's first read_lock (noexcept) and at any point of thread exit.
inline void push_incoming(state& s, reader_record& r) noexcept {
    reader_record* head = s.incoming.load(std::memory_order_relaxed);
    do {
        r.next = head;
        // acq_rel on success: release publishes r.next to the drainer;
        // acquire pairs with a drain's release (rcu.hpp, (E)).
    } while (!s.incoming.compare_exchange_weak(head, &r, std::memory_order_acq_rel,
                                               std::memory_order_relaxed));
}

/// Wakes every sleeping writer (they re-scan).
inline void wake_writers(state& s) noexcept {
    // Release: a writer whose acquire load of gp_seq sees this increment
    // also sees the store that made this reader quiescent (rcu.hpp, (C)).
    s.gp_seq.fetch_add(1, std::memory_order_release);
    futex_wake_all(s.gp_seq);
}

/// Removes `r` from the registry and wakes writers that may wait for it.
/// Takes registry_mutex.
inline void unlink_reader(state& s, reader_record& r) noexcept {
    {
        std::lock_guard lock(s.registry_mutex);
        drain_incoming(s);
        for (reader_record** p = &s.readers; *p; p = &(*p)->next) {
            if (*p == &r) {
                *p = r.next;
                break;
            }
        }
        r.next = nullptr;
        // Inside the lock: a writer that scanned `r` before this either read
        // gp_seq before this increment (its futex_wait returns) or after it
        // (the mutex orders its scan after the unlink).
        wake_writers(s);
    }
    r.registered = false;
    r.transient = false;
}

// ---- fork and thread exit -------------------------------------------------------

inline void reclaim_lock() {
    if (reclaim_depth == 0) global_state.reclaim_mutex.lock();
    ++reclaim_depth;
}
inline bool reclaim_try_lock() noexcept {
    if (reclaim_depth == 0 && !global_state.reclaim_mutex.try_lock()) return false;
    ++reclaim_depth;
    return true;
}
inline void reclaim_unlock() noexcept {
    if (--reclaim_depth == 0) global_state.reclaim_mutex.unlock();
}

/// fork(2): the registry and retired-list locks are taken before the fork
/// (they are only ever held briefly) so that the child gets them in a known
/// state; the child then forgets every reader thread but the forking one
/// (the others do not exist in it). The reclaim lock is not taken: a thread
/// running callbacks may wait (synchronize) for the forking thread's read
/// section. The child makes a fresh one instead, held again if the fork
/// was made from a callback. Objects retired in the parent and not yet
/// taken stay retired in the child (its own copies) and are reclaimed
/// there; callbacks the parent was running are not run again in the child.
inline void atfork_prepare() noexcept {
    state& s = global_state;
    // std::mutex::lock throws only on a system error (here: terminate).
    s.retired_mutex.lock();
    s.registry_mutex.lock();
}
inline void atfork_parent() noexcept {
    state& s = global_state;
    s.registry_mutex.unlock();
    s.retired_mutex.unlock();
}
inline void atfork_child() noexcept {
    state& s = global_state;
    drain_incoming(s);
    reader_record& self = this_thread_reader;
    s.readers = nullptr;
    if (self.registered) {
        self.next = nullptr;
        s.readers = &self;
    }
    self.waiting.store(0, std::memory_order_relaxed);
    // Linux keeps the membarrier(2) registration in the child (its memory
    // map is a copy); if its calls fail there, heavy_fence() degrades as in
    // any process.
    ::new (&s.reclaim_mutex) std::mutex; // its holder may not exist here
    if (reclaim_depth != 0) s.reclaim_mutex.lock();
    s.registry_mutex.unlock();
    s.retired_mutex.unlock();
}

inline void on_thread_exit(void*) noexcept;

inline void install_process_hooks() noexcept {
    state& s = global_state;
    s.exit_key_ok = ::pthread_key_create(&s.exit_key, &on_thread_exit) == 0;
    // ENOMEM is the only failure: fork safety is then lost, which nothing
    // here can report (the first read section is noexcept).
    (void)::pthread_atfork(&atfork_prepare, &atfork_parent, &atfork_child);
}

inline void ensure_process_hooks() noexcept {
    ::pthread_once(&global_state.hooks_once, &install_process_hooks);
}

/// Registers this thread's record: lock-free, no allocation (noexcept).
/// Installs the thread-exit hook; when it cannot be installed (no pthread
/// key, or pthread_setspecific out of memory), or the thread is exiting,
/// the registration lasts for the current section only.
[[gnu::noinline]] inline void register_reader(reader_record& r) noexcept {
    state& s = global_state;
    ensure_process_hooks();
    s.probe(); // before the push: a writer that drains r sees the final mode
    r.transient =
        this_thread_exited || !s.exit_key_ok || ::pthread_setspecific(s.exit_key, &r) != 0;
    r.registered = true;
    push_incoming(s, r);
}

[[noreturn, gnu::noinline]] inline void unbalanced_unlock() {
    QOMEM_ASSERT(false, "rcu::read_unlock without a read section on this thread");
    std::abort();
}

/// The pthread key destructor: runs at thread exit, after the C++
/// thread_local destructors (which may still use read sections).
inline void on_thread_exit(void*) noexcept {
    reader_record& r = this_thread_reader;
    this_thread_exited = true;
    if (!r.registered) return;
    if (r.nesting != 0) {
        // Misuse: the thread ends inside a read section. Reported first (the
        // default handler aborts); a throwing handler's exception cannot
        // leave a thread-exit destructor, so it is dropped after reporting,
        // and the section is closed so that it does not hold back
        // reclamation for ever.
        try {
            QOMEM_ASSERT(r.nesting == 0,
                         "thread exiting inside {} rcu read section(s) (read_lock without "
                         "read_unlock); the section is closed",
                         r.nesting);
        } catch (...) {
        }
        r.nesting = 0;
        // Release: what the thread did in its section happens before a
        // writer's acquire load of 0 (as in read_unlock).
        r.epoch.store(0, std::memory_order_release);
    }
    unlink_reader(global_state, r); // wakes any writer waiting for it
}

} // namespace qomem::rcu::detail
