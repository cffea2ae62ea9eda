// qomem/assert.hpp — the library's misuse check, and its replaceable handler.
//
// Programmer errors (unparenting an orphan, unref of a dead object, adding a
// child that already has a parent, ...) are checked by QOMEM_ASSERT. The check
// is never compiled out: these are exactly the bugs this library exists to make
// visible, and they cost one predictable branch.
//
// When a check fails the installed handler is called with the failed condition,
// the place and a message naming the values involved. The default handler
// prints to stderr and aborts. Tests install a throwing handler:
//
//     qomem::scoped_assertion_handler guard{qomem::throwing_assertion_handler};
//     REQUIRE_THROWS_AS(qomem::unparent(orphan), qomem::assertion_failure);
//
// Every check happens before the state it protects is changed, so when a
// handler throws, the object graph is left exactly as it was.
#pragma once

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <utility>

#include <fmt/core.h>

namespace qomem {

/// What a failed QOMEM_ASSERT reports.
struct assertion_info {
    const char* condition;
    const char* file;
    int line;
    std::string message;
};

/// A handler may throw (tests do); if it returns, the program aborts.
using assertion_handler = void (*)(const assertion_info&);

/// Thrown by throwing_assertion_handler.
class assertion_failure : public std::logic_error {
public:
    explicit assertion_failure(const assertion_info& info)
        : std::logic_error(fmt::format("{}:{}: qomem assertion `{}` failed: {}", info.file,
                                       info.line, info.condition, info.message)) {}
};

inline void default_assertion_handler(const assertion_info& info) {
    std::fprintf(stderr, "%s:%d: qomem assertion `%s` failed: %s\n", info.file, info.line,
                 info.condition, info.message.c_str());
    std::fflush(stderr);
}

[[noreturn]] inline void throwing_assertion_handler(const assertion_info& info) {
    throw assertion_failure(info);
}

namespace detail {
inline std::atomic<assertion_handler>& assertion_handler_slot() noexcept {
    static std::atomic<assertion_handler> slot{&default_assertion_handler};
    return slot;
}

[[noreturn]] inline void assertion_failed(const char* condition, const char* file, int line,
                                          std::string message) {
    assertion_info info{condition, file, line, std::move(message)};
    assertion_handler_slot().load(std::memory_order_acquire)(info);
    std::abort();
}
} // namespace detail

/// Installs `handler` and returns the previous one. Thread-safe.
inline assertion_handler set_assertion_handler(assertion_handler handler) noexcept {
    return detail::assertion_handler_slot().exchange(handler ? handler : &default_assertion_handler,
                                                     std::memory_order_acq_rel);
}

/// Installs a handler for the lifetime of the guard (RAII for tests).
class scoped_assertion_handler {
public:
    explicit scoped_assertion_handler(assertion_handler handler) noexcept
        : previous_(set_assertion_handler(handler)) {}
    ~scoped_assertion_handler() { set_assertion_handler(previous_); }
    scoped_assertion_handler(const scoped_assertion_handler&) = delete;
    scoped_assertion_handler& operator=(const scoped_assertion_handler&) = delete;

private:
    assertion_handler previous_;
};

} // namespace qomem

/// QOMEM_ASSERT(condition, fmt-format, args...): a misuse check that is never
/// compiled out. The message is only formatted when the check fails.
#define QOMEM_ASSERT(cond, ...)                                                                    \
    (__builtin_expect(static_cast<bool>(cond), 1)                                                  \
         ? void(0)                                                                                 \
         : ::qomem::detail::assertion_failed(#cond, __FILE__, __LINE__,                            \
                                             ::fmt::format(__VA_ARGS__)))
