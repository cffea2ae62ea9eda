// qomem/detail/dispatch.hpp — an access through a flat view: split at range
// boundaries; RAM by memcpy, MMIO through the region's ops with QEMU's access
// rules and the re-entrancy guard; holes answer a decode error.
//
// Byte order. An MMIO value travels as the bytes the device puts on the bus:
// its register value in the device's byte order, where `endianness::native`
// is the target's (the memory system's target endianness; QEMU's
// DEVICE_NATIVE_ENDIAN). Byte buffers hold those bytes; a typed access
// (ldl_le, ...) reads them in the order it names.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

#include <fmt/core.h>

#include <qomem/detail/fault_guard.hpp>
#include <qomem/detail/region_io.hpp>
#include <qomem/flat_view.hpp>
#include <qomem/log.hpp>
#include <qomem/memory_ops.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/rcu.hpp>

namespace qomem::detail {

inline constexpr bool host_is_big_endian = std::endian::native == std::endian::big;

/// True when values in order `e` are big-endian on a target of the given
/// order (`native` is the target's).
inline bool is_big_endian(endianness e, bool target_big) noexcept {
    return e == endianness::big || (e == endianness::native && target_big);
}

inline std::uint64_t bswap_n(std::uint64_t v, unsigned size) noexcept {
    switch (size) {
    case 2:
        return __builtin_bswap16(static_cast<std::uint16_t>(v));
    case 4:
        return __builtin_bswap32(static_cast<std::uint32_t>(v));
    case 8:
        return __builtin_bswap64(v);
    default:
        return v;
    }
}

/// Loads `size` bytes in host order (QEMU's ldn_he_p).
inline std::uint64_t load_host(const std::byte* p, unsigned size) noexcept {
    switch (size) {
    case 1: {
        std::uint8_t v;
        std::memcpy(&v, p, 1);
        return v;
    }
    case 2: {
        std::uint16_t v;
        std::memcpy(&v, p, 2);
        return v;
    }
    case 4: {
        std::uint32_t v;
        std::memcpy(&v, p, 4);
        return v;
    }
    default: {
        std::uint64_t v;
        std::memcpy(&v, p, 8);
        return v;
    }
    }
}

/// Stores `size` bytes in host order (QEMU's stn_he_p).
inline void store_host(std::byte* p, unsigned size, std::uint64_t v) noexcept {
    switch (size) {
    case 1: {
        auto x = static_cast<std::uint8_t>(v);
        std::memcpy(p, &x, 1);
        break;
    }
    case 2: {
        auto x = static_cast<std::uint16_t>(v);
        std::memcpy(p, &x, 2);
        break;
    }
    case 4: {
        auto x = static_cast<std::uint32_t>(v);
        std::memcpy(p, &x, 4);
        break;
    }
    default:
        std::memcpy(p, &v, 8);
        break;
    }
}

/// memcpy of `len` bytes, with the sizes of single values (1, 2, 4, 8)
/// copied inline: a call with a length the compiler cannot see would
/// otherwise go to the C library's memcpy on the hot paths of read and
/// write.
[[gnu::always_inline]] inline void copy_bytes(void* to, const void* from,
                                              std::size_t len) noexcept {
    switch (len) {
    case 1:
        std::memcpy(to, from, 1);
        break;
    case 2:
        std::memcpy(to, from, 2);
        break;
    case 4:
        std::memcpy(to, from, 4);
        break;
    case 8:
        std::memcpy(to, from, 8);
        break;
    default:
        std::memcpy(to, from, len);
        break;
    }
}

/// The value of the `size` bytes at `p` read in byte order big/little.
inline std::uint64_t load_ordered(const std::byte* p, unsigned size, bool big) noexcept {
    const std::uint64_t v = load_host(p, size);
    return big == host_is_big_endian ? v : bswap_n(v, size);
}
/// Stores `v` as `size` bytes at `p` in byte order big/little.
inline void store_ordered(std::byte* p, unsigned size, std::uint64_t v, bool big) noexcept {
    store_host(p, size, big == host_is_big_endian ? v : bswap_n(v, size));
}

/// The devices whose MMIO this thread is inside (re-entrancy guard). QEMU
/// keeps one flag per device under its big lock; qomem keeps the set per
/// thread, so two vCPUs using one device are not mistaken for re-entry.
inline std::vector<const object*>& engaged_devices() noexcept {
    thread_local std::vector<const object*> engaged;
    return engaged;
}

/// The largest access the ops accept at `offset` for `len` bytes (QEMU's
/// memory_access_size): the valid maximum (4 when unset), bounded by the
/// alignment unless the implementation takes unaligned accesses, rounded
/// down to a power of two.
inline unsigned mmio_access_size(const memory_region& mr, hwaddr offset, u128 len) noexcept {
    const region_ops* ops = mr.callbacks().ops;
    unsigned max = ops && ops->valid.max_access_size ? ops->valid.max_access_size : 4;
    if (!ops || !ops->impl.unaligned) {
        const hwaddr align = offset & (~offset + 1);
        if (align != 0 && align < max) max = static_cast<unsigned>(align);
    }
    const unsigned l = len < max ? static_cast<unsigned>(len) : max;
    return std::bit_floor(l);
}

inline void log_invalid(const memory_region& mr, hwaddr offset, unsigned size, bool is_write,
                        const char* why) {
    if (log_enabled(log_category::guest_errors))
        log_line(log_category::guest_errors,
                 fmt::format("Invalid {} at addr 0x{:X}, size {}, region '{}', reason: {}",
                             is_write ? "write" : "read", offset, size, mr.region_name(), why));
}

/// Why the ops of `mr` refuse an access of `size` bytes at `offset`, in
/// QEMU's memory_region_access_valid order; null when they accept it. A
/// reservation (no ops) refuses everything.
inline const char* mmio_refusal(const memory_region& mr, hwaddr offset, unsigned size,
                                bool is_write, mem_attrs attrs) {
    const region_ops* ops = mr.callbacks().ops;
    if (!ops) return "reservation";
    if (ops->accepts && !ops->accepts(mr.callbacks().opaque, offset, size, is_write, attrs))
        return "rejected";
    if (!ops->valid.unaligned && (offset & (size - 1))) return "unaligned";
    if (ops->valid.max_access_size != 0 &&
        (size < (ops->valid.min_access_size ? ops->valid.min_access_size : 1) ||
         size > ops->valid.max_access_size))
        return "invalid size";
    return nullptr;
}

inline void drain_coalesced(coalesced_ring& ring);

/// The region's I/O hooks (ioeventfd.hpp, coalesced_mmio.hpp) for an MMIO
/// access its ops accept: true when a write was taken by an ioeventfd
/// (signalled) or queued in the coalesced ring, so the ops are not called;
/// otherwise, for a region flagged flush_coalesced, the ring is drained
/// first (QEMU's memory_region_dispatch_write_eventfds and
/// prepare_mmio_access).
inline bool dispatch_io_hooks(const memory_region& mr, hwaddr offset, std::uint64_t value,
                              unsigned size, bool is_write, mem_attrs attrs, bool target_big) {
    const topology_log* log = region_io_access::log(mr);
    bool flush = false;
    {
        rcu::read_guard g; // the snapshot is retired through RCU
        const region_io* io = region_io_access::snapshot(mr);
        if (!io) return false;
        if (is_write) {
            // Compared with the value the ops would get: the device's order.
            const bool big = is_big_endian(mr.callbacks().ops->endian, target_big);
            const std::uint64_t reg = big != host_is_big_endian ? bswap_n(value, size) : value;
            if (const ioeventfd* e = io->match(offset, size, reg)) {
                signal_eventfd(e->fd);
                return true;
            }
            if (log && io->coalesces(offset, size)) {
                const coalesced_ring::entry e{&mr, offset, value, size, attrs, target_big};
                while (!log->coalesced_mmio.try_push(e)) drain_coalesced(log->coalesced_mmio);
                return true;
            }
        }
        flush = io->flush_coalesced;
    }
    if (flush && log && log->coalesced_mmio.outstanding() != 0)
        drain_coalesced(log->coalesced_mmio);
    return false;
}

/// One MMIO access of `size` (1, 2, 4 or 8) bytes at `offset` in `mr`;
/// `*value` holds the bus bytes loaded in host order (QEMU's
/// memory_region_dispatch_read/write with host-endian data). `hooks`: false
/// for a queued coalesced write being made (the ops are called).
inline memtx_result dispatch_mmio(const memory_region& mr, hwaddr offset, std::uint64_t* value,
                                  unsigned size, bool is_write, mem_attrs attrs, bool target_big,
                                  bool hooks = true) {
    const region_ops* ops = mr.callbacks().ops;
    void* const opaque = mr.callbacks().opaque;
    if (!is_write) *value = 0;
    // A reservation claims its range and answers nothing; other ops have
    // QEMU's access rules.
    if (const char* refused = mmio_refusal(mr, offset, size, is_write, attrs)) {
        log_invalid(mr, offset, size, is_write, refused);
        return memtx_decode_error;
    }
    if (hooks && region_io_access::maybe(mr)) [[unlikely]]
        if (dispatch_io_hooks(mr, offset, *value, size, is_write, attrs, target_big))
            return memtx_ok;

    const object* dev = mr.guarded_device();
    auto& engaged = engaged_devices();
    if (dev) {
        for (const object* d : engaged) {
            if (d == dev) {
                if (mr.first_reentrancy_report())
                    log_line(
                        log_category::reentrancy,
                        fmt::format("Blocked re-entrant IO on MemoryRegion: {} at addr: 0x{:X}",
                                    mr.region_name(), offset));
                return memtx_access_error;
            }
        }
        engaged.push_back(dev);
    }
    struct disengage {
        std::vector<const object*>* list;
        ~disengage() {
            if (list) list->pop_back();
        }
    } guard{dev ? &engaged : nullptr};

    const bool big = is_big_endian(ops->endian, target_big);
    std::uint64_t v = is_write ? *value : 0;
    if (is_write && big != host_is_big_endian) v = bswap_n(v, size);

    // QEMU's access_with_adjusted_size: split wide accesses, widen narrow ones.
    const unsigned impl_min = ops->impl.min_access_size ? ops->impl.min_access_size : 1;
    const unsigned impl_max = ops->impl.max_access_size ? ops->impl.max_access_size : 4;
    const unsigned access = std::max(std::min(size, impl_max), impl_min);
    const std::uint64_t mask =
        access >= 8 ? ~std::uint64_t(0) : (std::uint64_t(1) << (access * 8)) - 1;
    memtx_result r = memtx_ok;
    std::uint64_t combined = 0;
    for (unsigned i = 0; i < size; i += access) {
        const int shift = big ? (int(size) - int(access) - int(i)) * 8 : int(i) * 8;
        if (is_write) {
            const std::uint64_t part = (shift >= 0 ? v >> shift : v << -shift) & mask;
            r |= ops->write(opaque, offset + i, part, access, attrs);
        } else {
            std::uint64_t part = 0;
            r |= ops->read(opaque, offset + i, &part, access, attrs);
            part &= mask;
            combined |= shift >= 0 ? part << shift : part >> -shift;
        }
    }
    if (!is_write) {
        if (size < 8) combined &= (std::uint64_t(1) << (size * 8)) - 1;
        if (big != host_is_big_endian) combined = bswap_n(combined, size);
        *value = combined;
    }
    return r;
}

/// Makes every write queued in `ring`, oldest first, through its region's
/// ops (coalesced_mmio.hpp: the drain lock keeps drains in order).
inline void drain_coalesced(coalesced_ring& ring) {
    std::lock_guard d(ring.drain_lock());
    coalesced_ring::entry e;
    while (ring.pop(e)) {
        struct made {
            coalesced_ring& r;
            ~made() { r.done(); }
        } m{ring};
        std::uint64_t v = e.value;
        (void)dispatch_mmio(*e.mr, e.offset, &v, e.size, true, e.attrs, e.target_big, false);
    }
}

/// Reads or writes `len` bytes at `offset` of the region behind flat range
/// `fr` (the caller clipped `len` to the range). MMIO is cut into the
/// largest accesses its rules allow (QEMU's memory_access_size), unless
/// `one_access`: then the whole of `len` (1, 2, 4 or 8 bytes) is one access,
/// refused if the rules refuse it (QEMU's typed accessors and
/// memory_region_dispatch_read/write).
inline memtx_result access_range(const flat_range& fr, hwaddr offset, std::byte* buf, u128 len,
                                 bool is_write, mem_attrs attrs, bool target_big,
                                 bool one_access = false) {
    const memory_region& mr = *fr.mr;
    if (attrs.memory && !mr.is_ram()) { // RAM devices are RAM here, as in QEMU
        if (!is_write) std::memset(buf, 0, static_cast<std::size_t>(len));
        return memtx_access_error;
    }
    if (is_write ? fr.writes_direct(attrs) : fr.reads_direct()) {
        const auto n = static_cast<std::size_t>(len);
        std::byte* host = range_host(fr);
        if (!host) {
            if (!is_write) std::memset(buf, 0, n);
            return memtx_error;
        }
        // A file another process can shrink is copied under a SIGBUS guard.
        const auto copy = [&](void* to, const void* from) {
            if (mr.backing_may_shrink()) [[unlikely]]
                return guarded_copy(to, from, n);
            std::memcpy(to, from, n);
            return true;
        };
        if (!is_write) {
            if (!copy(buf, host + offset)) {
                std::memset(buf, 0, n);
                return memtx_error;
            }
        } else {
            if (!copy(host + offset, buf)) return memtx_error;
            const_cast<memory_region&>(mr).mark_dirty(offset, static_cast<hwaddr>(len));
        }
        return memtx_ok;
    }
    if (is_write && mr.is_plain_ram()) return memtx_ok; // a ROM ignores the guest's writes
    if (mr.is_ram_device()) {
        // Dispatched like MMIO (never a memcpy of the whole run): accesses of
        // the natural width, up to 8 bytes, unaligned allowed (QEMU's
        // ram_device ops).
        std::byte* host = mr.host_ptr();
        if (!host) {
            if (!is_write) std::memset(buf, 0, static_cast<std::size_t>(len));
            return memtx_decode_error;
        }
        while (len > 0) {
            const unsigned l = std::bit_floor(static_cast<unsigned>(std::min<u128>(len, 8)));
            if (is_write)
                store_host(host + offset, l, load_host(buf, l));
            else
                store_host(buf, l, load_host(host + offset, l));
            buf += l;
            offset += l;
            len -= l;
        }
        return memtx_ok;
    }
    memtx_result r = memtx_ok;
    while (len > 0) {
        const unsigned l =
            one_access ? static_cast<unsigned>(len) : mmio_access_size(mr, offset, len);
        std::uint64_t v = is_write ? load_host(buf, l) : 0;
        r |= dispatch_mmio(mr, offset, &v, l, is_write, attrs, target_big);
        if (!is_write) store_host(buf, l, v);
        buf += l;
        offset += l;
        len -= l;
    }
    return r;
}

/// The whole of QEMU's address_space_rw over one flat view: split at range
/// boundaries; holes read as zero and report a decode error.
inline memtx_result access_view(const flat_view& v, hwaddr addr, std::byte* buf, u128 len,
                                bool is_write, mem_attrs attrs, bool target_big) {
    memtx_result r = memtx_ok;
    u128 cursor = addr;
    while (len > 0) {
        if (cursor >= u128_2_64) { // past the end of the 64-bit space
            if (!is_write) std::memset(buf, 0, static_cast<std::size_t>(len));
            return r | memtx_decode_error;
        }
        const auto a = static_cast<hwaddr>(cursor);
        const flat_range* fr = v.lookup(a);
        if (!fr) {
            const flat_range* next = v.next_after(a);
            const u128 hole_end = next ? u128(next->start) : u128_2_64;
            const u128 n = std::min(len, hole_end - cursor);
            if (!is_write) std::memset(buf, 0, static_cast<std::size_t>(n));
            r |= memtx_decode_error;
            buf += static_cast<std::size_t>(n);
            cursor += n;
            len -= n;
            continue;
        }
        const u128 n = std::min(len, fr->end() - cursor);
        r |= access_range(*fr, a - fr->start + fr->offset_in_region, buf, n, is_write, attrs,
                          target_big);
        buf += static_cast<std::size_t>(n);
        cursor += n;
        len -= n;
    }
    return r;
}

/// One access of `size` bytes (1, 2, 4 or 8) at `addr` of `v`, as QEMU's
/// typed accessors make it: inside one range, MMIO is one access of that
/// size (refused if the ops refuse it, never split by their rules); an
/// access crossing ranges is made as the byte access (access_view) would.
/// `bytes` holds the bytes in memory order.
inline memtx_result access_view_sized(const flat_view& v, hwaddr addr, std::byte* bytes,
                                      unsigned size, bool is_write, mem_attrs attrs,
                                      bool target_big) {
    const flat_range* fr = v.lookup(addr);
    if (fr && size - 1 <= fr->last() - addr)
        return access_range(*fr, addr - fr->start + fr->offset_in_region, bytes, size, is_write,
                            attrs, target_big, true);
    return access_view(v, addr, bytes, size, is_write, attrs, target_big);
}

} // namespace qomem::detail
