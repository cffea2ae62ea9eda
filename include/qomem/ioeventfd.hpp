// qomem/ioeventfd.hpp — ioeventfds: an eventfd that a matching guest write
// to a region signals instead of calling the region's ops (QEMU's
// MemoryRegionIoeventfd, memory_region_add_eventfd).
//
//     int fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);   // the caller's
//     mmio->add_eventfd(0x50, 2, true, 3, fd);  // a 2-byte write of 3 at 0x50
//     ...                                       // kicks fd, not the ops
//     mmio->del_eventfd(0x50, 2, true, 3, fd);
//     ::close(fd);                              // the library never closes it
//
// Matching (QEMU's memory_region_dispatch_write_eventfds): a guest write
// that reaches the region's ops (MMIO, or a ROM device's writes) and passed
// their access rules matches an ioeventfd when it is at `offset`, of `size`
// bytes (any size when `size` is 0: KVM's wildcard, which needs
// match_data false), and, when `match_data`, carries `data`: the value the
// ops would have been given (the device's register value, in its byte
// order). The first match in QEMU's order (below) is signalled by adding 1
// to its eventfd counter (::write of a uint64_t); the ops are not called and
// the write succeeds. Reads call the ops as usual; writes stored directly to
// RAM never look (as in QEMU without KVM).
//
// Listeners (memory_listener.hpp) hear eventfd_add / eventfd_del with the
// guest address at which each ioeventfd shows in their address space (see
// memory_system.hpp, "I/O hooks").
#pragma once

#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <tuple>

#include <qomem/types.hpp>

namespace qomem {

/// One ioeventfd of a region. The eventfd `fd` belongs to the caller: the
/// library writes to it and never closes it; it must stay open until the
/// ioeventfd is deleted (or the region is freed).
struct ioeventfd {
    hwaddr offset = 0; ///< in the region
    unsigned size = 0; ///< 0 (any size), 1, 2, 4 or 8
    bool match_data = false;
    std::uint64_t data = 0; ///< compared only when match_data
    int fd = -1;

    /// QEMU's ordering (memory_region_ioeventfd_before): offset, size,
    /// match_data, data (only when match_data), then the eventfd.
    friend bool operator<(const ioeventfd& a, const ioeventfd& b) noexcept {
        return key(a) < key(b);
    }
    /// The same ioeventfd (data compared only when match_data).
    friend bool operator==(const ioeventfd& a, const ioeventfd& b) noexcept {
        return key(a) == key(b);
    }

    /// True when a write of `len` bytes of value `value` at `at` (in the
    /// region) matches it (see the header overview).
    bool matches(hwaddr at, unsigned len, std::uint64_t value) const noexcept {
        return at == offset && (size == 0 || size == len) && (!match_data || value == data);
    }

private:
    static std::tuple<hwaddr, unsigned, bool, std::uint64_t, int> key(const ioeventfd& e) noexcept {
        return std::tuple(e.offset, e.size, e.match_data, e.match_data ? e.data : 0, e.fd);
    }
};

namespace detail {

/// Adds 1 to eventfd `fd`'s counter (QEMU's event_notifier_set). EAGAIN (a
/// counter at its maximum) already wakes the reader; other errors are
/// ignored, as QEMU does.
inline void signal_eventfd(int fd) noexcept {
    const std::uint64_t one = 1;
    ssize_t n;
    do {
        n = ::write(fd, &one, sizeof one);
    } while (n < 0 && errno == EINTR);
}

} // namespace detail
} // namespace qomem
