// qomem/detail/fault_guard.hpp — copies that survive SIGBUS: memory whose
// file another process can shrink.
//
// A page of a MAP_SHARED file mapping that lies past the file's end raises
// SIGBUS when touched. A vhost-user back-end maps a file of its own into a
// shared memory region (SHMEM_MAP), then may truncate it: without a guard the
// next access the library makes there (a guest read, MEM_READ) would end the
// process. Regions whose backing can shrink (memory_region's
// backing_may_shrink) are therefore copied with guarded_copy:
//
//     if (!qomem::detail::guarded_copy(buf, host + offset, n))
//         return memtx_error;                   // the file shrank under us
//
// How: a thread-local recovery point (sigsetjmp) is armed around the memcpy;
// a SIGBUS handler, installed once per process, jumps back to it when the
// fault's address lies inside the bytes being copied on that thread. Any
// other SIGBUS goes to the handler that was installed before ours (or, with
// none, kills the process as the default action does). The handler runs with
// SA_NODEFER, so jumping out of it leaves SIGBUS unblocked without the cost
// of saving the signal mask at every copy.
//
// Limits: the guard covers the copies the library makes. A raw pointer handed
// out for such memory (a direct dma_mapping) is not guarded: touching pages
// past the file's end through it raises SIGBUS like any other access. A
// program that installs its own SIGBUS handler after the first guarded copy
// must chain to the one it replaces, or faults in guarded copies kill it.
#pragma once

#include <setjmp.h>
#include <signal.h>

#include <atomic>
#include <cstddef>
#include <cstring>

namespace qomem::detail {

/// One armed copy of this thread: where to jump back to, and the two byte
/// ranges whose faults it absorbs (source and destination).
struct fault_recovery {
    sigjmp_buf env;
    const std::byte* lo[2];
    const std::byte* hi[2];
    fault_recovery* outer; // an enclosing armed copy (never in practice)
};

/// This thread's armed copy, or null. Constant-initialised, so reading it in
/// the signal handler touches no lazily allocated state.
inline fault_recovery*& armed_fault_recovery() noexcept {
    thread_local fault_recovery* armed = nullptr;
    return armed;
}

/// The SIGBUS disposition found when ours was installed.
inline struct sigaction& previous_sigbus_action() noexcept {
    static struct sigaction previous {};
    return previous;
}

inline void on_sigbus(int sig, siginfo_t* info, void* context) {
    if (fault_recovery* r = armed_fault_recovery()) {
        const auto* at = static_cast<const std::byte*>(info->si_addr);
        for (int i = 0; i < 2; ++i)
            if (at >= r->lo[i] && at < r->hi[i]) siglongjmp(r->env, 1);
    }
    // Not ours: whoever was there before.
    const struct sigaction& prev = previous_sigbus_action();
    if (prev.sa_flags & SA_SIGINFO) {
        if (prev.sa_sigaction) {
            prev.sa_sigaction(sig, info, context);
            return;
        }
    } else if (prev.sa_handler != SIG_DFL && prev.sa_handler != SIG_IGN) {
        prev.sa_handler(sig);
        return;
    }
    // The default action: back to it; a fault then repeats on return and
    // ends the process as it would have without us, a sent signal is raised
    // again (SA_NODEFER: delivered at once).
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    ::sigaction(SIGBUS, &dfl, nullptr);
    if (info->si_code <= 0) ::raise(sig);
}

/// Installs the SIGBUS handler once per process (thread-safe).
inline void install_fault_guard() {
    static const bool installed = [] {
        struct sigaction sa {};
        sa.sa_sigaction = &on_sigbus;
        sigemptyset(&sa.sa_mask);
        sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
        return ::sigaction(SIGBUS, &sa, &previous_sigbus_action()) == 0;
    }();
    (void)installed;
}

/// Copies `n` bytes from `src` to `dst`; false when a SIGBUS hit either
/// range on the way (then `dst` holds an unspecified prefix of the bytes).
[[gnu::noinline]] inline bool guarded_copy(void* dst, const void* src, std::size_t n) noexcept {
    install_fault_guard();
    fault_recovery r;
    r.lo[0] = static_cast<const std::byte*>(src);
    r.hi[0] = r.lo[0] + n;
    r.lo[1] = static_cast<const std::byte*>(dst);
    r.hi[1] = r.lo[1] + n;
    fault_recovery*& armed = armed_fault_recovery();
    r.outer = armed;
    if (sigsetjmp(r.env, 0) != 0) {
        armed = r.outer;
        std::atomic_signal_fence(std::memory_order_seq_cst);
        return false;
    }
    armed = &r;
    std::atomic_signal_fence(std::memory_order_seq_cst); // armed before the first byte moves
    std::memcpy(dst, src, n);
    std::atomic_signal_fence(std::memory_order_seq_cst);
    armed = r.outer;
    return true;
}

} // namespace qomem::detail
