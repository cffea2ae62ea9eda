// qomem/types.hpp — the address and size types of the memory API.
//
// A region may cover all 2^64 bytes of an address space, so sizes and
// exclusive ends are held in 128-bit integers; addresses themselves stay
// 64-bit (`hwaddr`). Never add a size to a `hwaddr` in 64 bits.
//
//     qomem::u128 size = qomem::u128_2_64;          // a whole 64-bit space
//     qomem::hwaddr last = qomem::hwaddr(size - 1); // its last address
#pragma once

#include <cstdint>
#include <string>

#include <fmt/core.h>

namespace qomem {

/// A guest-physical (or bus) address.
using hwaddr = std::uint64_t;

__extension__ typedef unsigned __int128 u128; ///< a size or exclusive end (up to 2^64)
__extension__ typedef __int128 i128;          ///< a signed base during flattening

/// 2^64: the size of a whole 64-bit address space.
inline constexpr u128 u128_2_64 = u128(1) << 64;

namespace detail {

/// "0x..." for a value up to 2^128 (for messages).
inline std::string hex(u128 v) {
    if (v >> 64)
        return fmt::format("0x{:x}{:016x}", static_cast<std::uint64_t>(v >> 64),
                           static_cast<std::uint64_t>(v));
    return fmt::format("0x{:x}", static_cast<std::uint64_t>(v));
}

} // namespace detail
} // namespace qomem
