// qomem/accessors.hpp — QEMU's typed accessors (ldub, lduw_le, ..., stq_be)
// for any class that loads and stores one value of a given size and byte
// order: address spaces, region caches and CPU TLBs.
//
//     std::uint32_t v;
//     if (as.ldl_le(0x1000, v) != qomem::memtx_ok) { /* nothing there, or refused */ }
//     as.stq_be(0x2000, 0x1122334455667788);
//     cache.lduw_le(ring_offset, idx);            // memory_region_cache: offsets
//     tlb.ldl(addr, v);                           // no suffix: the target's order
//
// Loads write their value to their second argument and return the access's
// memtx_result (QEMU returns the value and writes the result; the result
// comes first here because ignoring it should be visible). A suffix names the
// byte order the bytes in memory are read in (`_le`, `_be`); no suffix means
// the target's (endianness::native, QEMU's MO_TE). For MMIO the device's
// value is swapped when its byte order differs from the access's, as QEMU's
// adjust_endianness does.
//
// A class derives from typed_accessors<itself> and provides
//     template <class T, endianness Order, class... Extra>
//     memtx_result load(hwaddr addr, T& value, Extra... extra);
//     template <class T, endianness Order, class... Extra>
//     memtx_result store(hwaddr addr, T value, Extra... extra);
// (extra arguments, such as mem_attrs, are passed through).
#pragma once

#include <cstdint>

#include <qomem/memory_ops.hpp>
#include <qomem/types.hpp>

namespace qomem {

template <class Derived>
class typed_accessors {
public:
    template <class... A>
    memtx_result ldub(hwaddr addr, std::uint8_t& v, A... extra) {
        return self().template load<std::uint8_t, endianness::native>(addr, v, extra...);
    }
    template <class... A>
    memtx_result lduw_le(hwaddr addr, std::uint16_t& v, A... extra) {
        return self().template load<std::uint16_t, endianness::little>(addr, v, extra...);
    }
    template <class... A>
    memtx_result lduw_be(hwaddr addr, std::uint16_t& v, A... extra) {
        return self().template load<std::uint16_t, endianness::big>(addr, v, extra...);
    }
    template <class... A>
    memtx_result lduw(hwaddr addr, std::uint16_t& v, A... extra) {
        return self().template load<std::uint16_t, endianness::native>(addr, v, extra...);
    }
    template <class... A>
    memtx_result ldl_le(hwaddr addr, std::uint32_t& v, A... extra) {
        return self().template load<std::uint32_t, endianness::little>(addr, v, extra...);
    }
    template <class... A>
    memtx_result ldl_be(hwaddr addr, std::uint32_t& v, A... extra) {
        return self().template load<std::uint32_t, endianness::big>(addr, v, extra...);
    }
    template <class... A>
    memtx_result ldl(hwaddr addr, std::uint32_t& v, A... extra) {
        return self().template load<std::uint32_t, endianness::native>(addr, v, extra...);
    }
    template <class... A>
    memtx_result ldq_le(hwaddr addr, std::uint64_t& v, A... extra) {
        return self().template load<std::uint64_t, endianness::little>(addr, v, extra...);
    }
    template <class... A>
    memtx_result ldq_be(hwaddr addr, std::uint64_t& v, A... extra) {
        return self().template load<std::uint64_t, endianness::big>(addr, v, extra...);
    }
    template <class... A>
    memtx_result ldq(hwaddr addr, std::uint64_t& v, A... extra) {
        return self().template load<std::uint64_t, endianness::native>(addr, v, extra...);
    }

    template <class... A>
    memtx_result stb(hwaddr addr, std::uint8_t v, A... extra) {
        return self().template store<std::uint8_t, endianness::native>(addr, v, extra...);
    }
    template <class... A>
    memtx_result stw_le(hwaddr addr, std::uint16_t v, A... extra) {
        return self().template store<std::uint16_t, endianness::little>(addr, v, extra...);
    }
    template <class... A>
    memtx_result stw_be(hwaddr addr, std::uint16_t v, A... extra) {
        return self().template store<std::uint16_t, endianness::big>(addr, v, extra...);
    }
    template <class... A>
    memtx_result stw(hwaddr addr, std::uint16_t v, A... extra) {
        return self().template store<std::uint16_t, endianness::native>(addr, v, extra...);
    }
    template <class... A>
    memtx_result stl_le(hwaddr addr, std::uint32_t v, A... extra) {
        return self().template store<std::uint32_t, endianness::little>(addr, v, extra...);
    }
    template <class... A>
    memtx_result stl_be(hwaddr addr, std::uint32_t v, A... extra) {
        return self().template store<std::uint32_t, endianness::big>(addr, v, extra...);
    }
    template <class... A>
    memtx_result stl(hwaddr addr, std::uint32_t v, A... extra) {
        return self().template store<std::uint32_t, endianness::native>(addr, v, extra...);
    }
    template <class... A>
    memtx_result stq_le(hwaddr addr, std::uint64_t v, A... extra) {
        return self().template store<std::uint64_t, endianness::little>(addr, v, extra...);
    }
    template <class... A>
    memtx_result stq_be(hwaddr addr, std::uint64_t v, A... extra) {
        return self().template store<std::uint64_t, endianness::big>(addr, v, extra...);
    }
    template <class... A>
    memtx_result stq(hwaddr addr, std::uint64_t v, A... extra) {
        return self().template store<std::uint64_t, endianness::native>(addr, v, extra...);
    }

protected:
    typed_accessors() = default;
    ~typed_accessors() = default;

private:
    Derived& self() noexcept { return static_cast<Derived&>(*this); }
};

} // namespace qomem
