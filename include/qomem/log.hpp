// qomem/log.hpp — where the library's diagnostic lines go.
//
// A few events are worth a line but not an error: a blocked re-entrant MMIO
// access (logged once per region; QEMU logs it once per process) and, when
// guest-error logging is on, accesses that a region's access rules refuse
// (QEMU's -d guest_errors). They go to a replaceable sink, stderr by default.
// A sink is a plain function (no captures), called from any thread:
//
//     std::vector<std::string> lines;   // static storage, guarded by a mutex
//     std::mutex lines_mutex;
//     qomem::set_log_sink([](std::string_view l) {
//         std::lock_guard g(lines_mutex);
//         lines.emplace_back(l);
//     });
#pragma once

#include <atomic>
#include <cstdio>
#include <string_view>

namespace qomem {

enum class log_category : unsigned {
    reentrancy = 1u << 0,   ///< blocked re-entrant MMIO (on by default)
    guest_errors = 1u << 1, ///< refused accesses (off by default)
    lifetime = 1u << 2,     ///< lifetime trouble found at run time: reference cycles, a
                            ///< region its owner's failed construction could not unmap (on)
};

using log_sink = void (*)(std::string_view line);

namespace detail {
inline void stderr_sink(std::string_view line) {
    std::fprintf(stderr, "%.*s\n", static_cast<int>(line.size()), line.data());
}
inline std::atomic<log_sink>& log_sink_slot() noexcept {
    static std::atomic<log_sink> slot{&stderr_sink};
    return slot;
}
inline std::atomic<unsigned>& log_mask() noexcept {
    static std::atomic<unsigned> mask{static_cast<unsigned>(log_category::reentrancy) |
                                      static_cast<unsigned>(log_category::lifetime)};
    return mask;
}
} // namespace detail

/// Installs `sink` (null: stderr) and returns the previous one. Thread-safe.
inline log_sink set_log_sink(log_sink sink) noexcept {
    return detail::log_sink_slot().exchange(sink ? sink : &detail::stderr_sink);
}

/// Turns a category on or off.
inline void set_log_enabled(log_category c, bool on) noexcept {
    if (on)
        detail::log_mask().fetch_or(static_cast<unsigned>(c));
    else
        detail::log_mask().fetch_and(~static_cast<unsigned>(c));
}

inline bool log_enabled(log_category c) noexcept {
    return (detail::log_mask().load(std::memory_order_relaxed) & static_cast<unsigned>(c)) != 0;
}

/// Sends one line to the sink if its category is on.
inline void log_line(log_category c, std::string_view line) {
    if (log_enabled(c)) detail::log_sink_slot().load(std::memory_order_acquire)(line);
}

} // namespace qomem
