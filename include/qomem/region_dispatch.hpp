// qomem/region_dispatch.hpp — one access of a value to one region (QEMU's
// memory_region_dispatch_read / memory_region_dispatch_write with a MemOp),
// for code that has already found its region and offset: a bus model, a
// translate() result, a device forwarding to another.
//
//     std::uint64_t v;
//     qomem::memtx_result r = qomem::memory_region_dispatch_read(
//         *uart.mmio, 0x14, v, {.size = 1, .order = qomem::endianness::little});
//     qomem::memory_region_dispatch_write(*timer, 0x8, 0x1234, {4, qomem::endianness::big});
//
// The value is the integer the bytes at `addr` hold in the byte order the
// memop names (`native`: the target's, from the region's memory system, or
// the host's for a region placed in none). An MMIO region gets one access of
// `op.size` bytes with its access rules (refused as a whole: never split by
// them), its register value swapped when the device's byte order differs
// from the memop's; RAM, ROM and a ROM device in ROMD mode are read from
// host memory; a guest write to ROM is ignored (memtx_ok); a write to a ROM
// device goes to its ops. The region's own flags apply (readonly, ROMD mode):
// no flat view is involved. Containers and aliases answer nothing
// (memtx_decode_error, as QEMU's unassigned ops), as does an access reaching
// past the region's end.
//
// Threads: any thread; the caller keeps the region alive (a reference, or a
// read section over a view showing it).
#pragma once

#include <cstdint>
#include <cstring>

#include <qomem/assert.hpp>
#include <qomem/detail/dispatch.hpp>
#include <qomem/flat_view.hpp>
#include <qomem/memory_ops.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/memory_system.hpp>
#include <qomem/types.hpp>

namespace qomem {

namespace detail {

/// One access of op.size bytes at `addr` of `mr` itself (see the header).
inline memtx_result dispatch_region(memory_region& mr, hwaddr addr, std::byte* bytes, memop op,
                                    bool is_write, mem_attrs attrs) {
    QOMEM_ASSERT(op.size == 1 || op.size == 2 || op.size == 4 || op.size == 8,
                 "memory_region_dispatch: access size {} is not 1, 2, 4 or 8", op.size);
    if (!mr.terminates() || u128(addr) + op.size > mr.size()) {
        if (!is_write) std::memset(bytes, 0, op.size);
        return memtx_decode_error;
    }
    flat_range whole;
    whole.start = 0;
    whole.size = mr.size();
    whole.mr = &mr;
    whole.readonly = mr.readonly();
    whole.nonvolatile = mr.nonvolatile();
    whole.romd_mode = mr.romd_mode();
    const bool target_big = mr.system() ? mr.system()->target_big_endian() : host_is_big_endian;
    return access_range(whole, addr, bytes, op.size, is_write, attrs, target_big, true);
}

inline bool memop_is_big(const memory_region& mr, endianness order) noexcept {
    return is_big_endian(order,
                         mr.system() ? mr.system()->target_big_endian() : host_is_big_endian);
}

} // namespace detail

/// Reads one value of op.size bytes at offset `addr` of `mr` into `value`
/// (zero-extended; 0 where the access fails). Requires (asserted): op.size
/// is 1, 2, 4 or 8.
inline memtx_result memory_region_dispatch_read(memory_region& mr, hwaddr addr,
                                                std::uint64_t& value, memop op,
                                                mem_attrs attrs = {}) {
    std::byte bytes[8];
    const memtx_result r = detail::dispatch_region(mr, addr, bytes, op, false, attrs);
    value = detail::load_ordered(bytes, op.size, detail::memop_is_big(mr, op.order));
    return r;
}

/// Writes the low op.size bytes of `value` at offset `addr` of `mr`.
/// Requires (asserted): op.size is 1, 2, 4 or 8.
inline memtx_result memory_region_dispatch_write(memory_region& mr, hwaddr addr,
                                                 std::uint64_t value, memop op,
                                                 mem_attrs attrs = {}) {
    std::byte bytes[8];
    detail::store_ordered(bytes, op.size, value, detail::memop_is_big(mr, op.order));
    return detail::dispatch_region(mr, addr, bytes, op, true, attrs);
}

} // namespace qomem
