// qomem/rcu.hpp — epoch-based reclamation for lock-free readers of flat views.
//
// Readers (vCPU threads reading, writing and mapping through an address
// space) never take a lock and never wait. A reader brackets its use of
// published data with a read section; the writer publishes a new version and
// retires the old one, which is reclaimed once every reader that could still
// hold it has left its read section.
//
//     {
//         qomem::rcu::read_guard g;              // nestable, wait-free
//         const flat_view* v = as.current();     // valid until g ends
//     }
//     qomem::rcu::retire(old, [](void* p) { ... });  // writer side
//     qomem::rcu::synchronize();                 // wait for a grace period
//
// How: a global epoch counter; each reader thread publishes the epoch it
// entered at (0 when outside). An object retired at epoch e may be reclaimed
// when no reader is inside a section that began at or before e. On Linux the
// reader's publication needs no hardware fence: the writer forces one on every
// running thread with membarrier(2) before it scans (the asymmetric-fence
// scheme); where membarrier is unavailable (or under ThreadSanitizer) readers
// publish their epoch with a seq_cst store instead.
//
// Reclamation runs on the writer: at each retire (whatever is already safe)
// and in synchronize(). Nothing is reclaimed on a reader's path, so a reader's
// cost is a thread-local increment and one store.
#pragma once

#include <sys/syscall.h>
#include <unistd.h>

#include <linux/membarrier.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstdint>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include <qomem/assert.hpp>

namespace qomem::rcu {

namespace detail {

struct reader_record {
    std::atomic<std::uint64_t> epoch{0}; // 0: quiescent
    unsigned nesting = 0;
    bool registered = false;
};

struct retired_entry {
    std::uint64_t stamp;
    void (*fn)(void*);
    void* p;
};

/// Global state, constant-initialised (no guard on the reader's path).
struct state {
    std::atomic<std::uint64_t> global_epoch{1};
    std::mutex readers_mutex;
    std::vector<reader_record*> readers;
    std::mutex retired_mutex;
    std::vector<retired_entry> retired;
    /// Set once, before the first reader registers: readers then need only
    /// a compiler barrier, the writer forcing the fence with membarrier(2).
    std::atomic<int> asymmetric{-1}; // -1: not yet probed

    bool probe_asymmetric() noexcept {
        int a = asymmetric.load(std::memory_order_acquire);
        if (a >= 0) return a != 0;
        a = 0;
#if defined(__NR_membarrier) && !defined(__SANITIZE_THREAD__)
        // (ThreadSanitizer does not model membarrier: it gets the plain
        // seq_cst protocol.)
        const long cmds = ::syscall(__NR_membarrier, MEMBARRIER_CMD_QUERY, 0, 0);
        if (cmds > 0 && (cmds & MEMBARRIER_CMD_PRIVATE_EXPEDITED) &&
            ::syscall(__NR_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) == 0)
            a = 1;
#endif
        int expected = -1;
        asymmetric.compare_exchange_strong(expected, a, std::memory_order_acq_rel);
        return asymmetric.load(std::memory_order_acquire) != 0;
    }
    /// Makes every reader's epoch store visible to this thread. Without
    /// membarrier the readers' stores and this thread's loads are seq_cst,
    /// which orders them already.
    void heavy_fence() noexcept {
#if defined(__NR_membarrier)
        if (asymmetric.load(std::memory_order_relaxed) == 1)
            ::syscall(__NR_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0);
#endif
    }
};

inline constinit state global_state{};
inline thread_local constinit reader_record this_thread_reader{};
/// Set once the thread's unregistration has run (thread exit): a read
/// section opened later (another thread_local's destructor) registers for
/// its own duration only.
inline thread_local constinit bool this_thread_exited = false;

inline void unregister_reader() {
    std::lock_guard lock(global_state.readers_mutex);
    std::erase(global_state.readers, &this_thread_reader);
    this_thread_reader.registered = false;
}

/// Unregisters the thread's record when the thread exits.
struct reader_registration {
    ~reader_registration() {
        unregister_reader();
        this_thread_exited = true;
    }
};

[[gnu::noinline]] inline void register_reader() {
    global_state.probe_asymmetric();
    if (!this_thread_exited) {
        thread_local reader_registration unregister_at_exit;
        (void)unregister_at_exit;
    }
    std::lock_guard lock(global_state.readers_mutex);
    global_state.readers.push_back(&this_thread_reader);
    this_thread_reader.registered = true;
}

inline reader_record& this_reader() noexcept {
    reader_record& r = this_thread_reader;
    if (!r.registered) [[unlikely]]
        register_reader();
    return r;
}

/// The oldest epoch a reader is in (UINT64_MAX when none is).
inline std::uint64_t oldest_active_epoch(state& s) {
    const reader_record* self = &this_reader();
    std::uint64_t oldest = UINT64_MAX;
    std::lock_guard lock(s.readers_mutex);
    // Only other threads' stores need the heavy fence; this thread sees its own.
    if (std::any_of(s.readers.begin(), s.readers.end(),
                    [&](const reader_record* r) { return r != self; }))
        s.heavy_fence();
    for (const reader_record* r : s.readers) {
        const std::uint64_t e = r->epoch.load(std::memory_order_seq_cst);
        if (e != 0) oldest = std::min(oldest, e);
    }
    return oldest;
}

[[noreturn, gnu::noinline]] inline void unbalanced_unlock() {
    QOMEM_ASSERT(false, "rcu::read_unlock without a read section on this thread");
    std::abort();
}

} // namespace detail

/// Enters a read section (nestable). Wait-free.
inline void read_lock() noexcept {
    detail::reader_record& r = detail::this_reader();
    if (r.nesting++ == 0) {
        const std::uint64_t e = detail::global_state.global_epoch.load(std::memory_order_relaxed);
        if (detail::global_state.asymmetric.load(std::memory_order_relaxed) == 1) {
            r.epoch.store(e, std::memory_order_relaxed);
            std::atomic_signal_fence(std::memory_order_seq_cst);
        } else {
            r.epoch.store(e, std::memory_order_seq_cst);
        }
    }
}

/// Leaves a read section. Requires (asserted): one is open on this thread.
inline void read_unlock() {
    detail::reader_record& r = detail::this_thread_reader;
    if (r.nesting == 0) [[unlikely]]
        detail::unbalanced_unlock();
    if (--r.nesting == 0) {
        r.epoch.store(0, std::memory_order_release);
        if (detail::this_thread_exited) [[unlikely]]
            detail::unregister_reader();
    }
}

/// True inside a read section on this thread.
inline bool in_read_section() noexcept { return detail::this_thread_reader.nesting > 0; }

/// RAII read section.
class read_guard {
public:
    read_guard() noexcept { read_lock(); }
    ~read_guard() { read_unlock(); }
    read_guard(const read_guard&) = delete;
    read_guard& operator=(const read_guard&) = delete;
};

/// Reclaims every retired object no reader can still see. Runs the reclaim
/// functions on this thread, outside any lock (they may retire more).
inline void reclaim() {
    detail::state& s = detail::global_state;
    std::vector<detail::retired_entry> ready;
    {
        std::lock_guard lock(s.retired_mutex);
        if (s.retired.empty()) return;
    }
    const std::uint64_t oldest = detail::oldest_active_epoch(s);
    {
        std::lock_guard lock(s.retired_mutex);
        auto keep = std::partition(s.retired.begin(), s.retired.end(),
                                   [&](const detail::retired_entry& e) { return e.stamp >= oldest; });
        ready.assign(keep, s.retired.end());
        s.retired.erase(keep, s.retired.end());
    }
    for (const auto& e : ready) e.fn(e.p);
}

/// Retires `p`: `fn(p)` runs once no reader that might have seen `p` is left.
/// Call after unpublishing `p`. Reclaims whatever is already safe.
inline void retire(void* p, void (*fn)(void*)) {
    detail::state& s = detail::global_state;
    const std::uint64_t stamp = s.global_epoch.fetch_add(1, std::memory_order_seq_cst);
    {
        std::lock_guard lock(s.retired_mutex);
        s.retired.push_back({stamp, fn, p});
    }
    reclaim();
}

/// Waits until every object retired so far has been reclaimed.
/// Requires (asserted): not inside a read section on this thread (it would
/// wait for itself).
inline void synchronize() {
    QOMEM_ASSERT(!in_read_section(), "rcu::synchronize inside a read section would never end");
    detail::state& s = detail::global_state;
    for (;;) {
        reclaim();
        {
            std::lock_guard lock(s.retired_mutex);
            if (s.retired.empty()) return;
        }
        std::this_thread::yield();
    }
}

} // namespace qomem::rcu
