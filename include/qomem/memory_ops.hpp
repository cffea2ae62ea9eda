// qomem/memory_ops.hpp — MMIO callbacks: the MemoryRegionOps concept.
//
// A device gives an MMIO region any object whose type meets MemoryRegionOps:
// `read` and `write`, each either plain or with attributes and a result.
// Access rules are optional static members, with QEMU's defaults:
//
//     struct uart_regs {
//         static constexpr qomem::access_limits valid{.min_access_size = 1,
//                                                     .max_access_size = 4};
//         static constexpr qomem::access_limits impl{.min_access_size = 1,
//                                                    .max_access_size = 1};
//         static constexpr qomem::endianness endian = qomem::endianness::little;
//         std::uint64_t read(qomem::hwaddr offset, unsigned size);
//         void write(qomem::hwaddr offset, std::uint64_t value, unsigned size);
//         // optional: bool accepts(qomem::hwaddr, unsigned size, bool is_write,
//         //                        qomem::mem_attrs);
//     };
//     uart_regs regs;                      // must outlive the region
//     auto mr = qomem::make_io(dev, "uart", 0x100, regs);
//
// The region keeps a pointer to one static table of function pointers per
// ops type and a pointer to the object: an access costs one indirect call,
// into a thunk that calls the member function directly.
#pragma once

#include <concepts>
#include <cstdint>

#include <qomem/types.hpp>

namespace qomem {

/// The result of an access, as QEMU's MemTxResult: flags that combine with |.
enum memtx_result : std::uint32_t {
    memtx_ok = 0,
    memtx_error = 1u << 0,        ///< the device reported an error
    memtx_decode_error = 1u << 1, ///< nothing there, or the access rules refuse it
    memtx_access_error = 1u << 2, ///< refused by policy (re-entrancy, attrs.memory)
};
constexpr memtx_result operator|(memtx_result a, memtx_result b) noexcept {
    return static_cast<memtx_result>(static_cast<std::uint32_t>(a) | static_cast<std::uint32_t>(b));
}
constexpr memtx_result& operator|=(memtx_result& a, memtx_result b) noexcept { return a = a | b; }

/// The security space of an access (QEMU's ARMSecuritySpace, the values of
/// mem_attrs::space). Note that 0 is `secure`, as in QEMU: code that does not
/// know about ARMv9 RME looks at mem_attrs::secure instead.
enum class security_space : std::uint8_t { secure = 0, non_secure = 1, root = 2, realm = 3 };

/// Transaction attributes: QEMU's MemTxAttrs, field for field. They travel
/// unchanged from the access to the device's ops (and, later, to IOMMUs).
/// A value-initialised `mem_attrs{}` has every attribute deliberately clear;
/// a bus master that does not say uses `mem_attrs_unspecified` (QEMU's
/// MEMTXATTRS_UNSPECIFIED), so a device can tell the two apart. Eight bytes
/// at most, as in QEMU: passed by value in one register.
struct mem_attrs {
    /// The bus master gave no attributes (see mem_attrs_unspecified).
    bool unspecified : 1 = false;
    /// ARM/AMBA: a TrustZone Secure access; x86: System Management Mode.
    bool secure : 1 = false;
    /// Usermode (unprivileged) access.
    bool user : 1 = false;
    /// Only "normal" memory may answer: RAM (and RAM devices); MMIO gives
    /// memtx_access_error.
    bool memory : 1 = false;
    /// A debugger's or loader's access: may write ROM.
    bool debug : 1 = false;
    /// ARM security space (partly overlaps `secure`; see security_space).
    security_space space = security_space::secure;
    /// Requester ID (a PCI BDF, or which CPU; MSI uses it).
    std::uint16_t requester_id = 0;
    /// Process identifier (PCI PASID), 8 bits as in QEMU.
    std::uint8_t pid = 0;

    friend constexpr bool operator==(const mem_attrs&, const mem_attrs&) noexcept = default;
};
static_assert(sizeof(mem_attrs) <= 8, "mem_attrs must stay small enough to pass in a register");

/// The attributes of a bus master that specifies none (QEMU's
/// MEMTXATTRS_UNSPECIFIED): everything clear but `unspecified`.
inline constexpr mem_attrs mem_attrs_unspecified = [] {
    mem_attrs a;
    a.unspecified = true;
    return a;
}();

/// Access-size rules (QEMU's MemoryRegionOps.valid / .impl). A zero maximum
/// means "any size" for `valid` and 4 for `impl`; a zero minimum means 1.
struct access_limits {
    unsigned min_access_size = 0;
    unsigned max_access_size = 0;
    bool unaligned = false;
};

/// A byte order: of a device's registers (MemoryRegionOps::endian), or of a
/// value a typed access reads or writes. `native` is the target's order (the
/// memory system's target_endianness(), QEMU's DEVICE_NATIVE_ENDIAN and
/// MO_TE), not the host's.
enum class endianness : std::uint8_t { native, little, big };

/// One access of a value (QEMU's MemOp): `size` bytes (1, 2, 4 or 8) read or
/// written as an integer in byte order `order`.
struct memop {
    unsigned size = 4;
    endianness order = endianness::native;
};

namespace detail {

template <class T>
concept plain_read = requires(T& t, hwaddr a, unsigned s) {
    { t.read(a, s) } -> std::convertible_to<std::uint64_t>;
};
template <class T>
concept attrs_read = requires(T& t, hwaddr a, std::uint64_t* d, unsigned s, mem_attrs at) {
    { t.read(a, d, s, at) } -> std::same_as<memtx_result>;
};
template <class T>
concept plain_write = requires(T& t, hwaddr a, std::uint64_t v, unsigned s) {
    t.write(a, v, s);
};
template <class T>
concept attrs_write = requires(T& t, hwaddr a, std::uint64_t v, unsigned s, mem_attrs at) {
    { t.write(a, v, s, at) } -> std::same_as<memtx_result>;
};

} // namespace detail

/// A type usable as MMIO callbacks.
template <class T>
concept MemoryRegionOps = (detail::plain_read<T> ||
                           detail::attrs_read<T>)&&(detail::plain_write<T> ||
                                                    detail::attrs_write<T>);

/// A MemoryRegionOps type with its type erased: one static table per ops
/// type, which a region points to together with the ops object. Made by
/// `region_ops::of<Ops>()`; users never fill one in.
struct region_ops {
    memtx_result (*read)(void*, hwaddr, std::uint64_t*, unsigned, mem_attrs);
    memtx_result (*write)(void*, hwaddr, std::uint64_t, unsigned, mem_attrs);
    bool (*accepts)(void*, hwaddr, unsigned, bool, mem_attrs); ///< null: accept all
    access_limits valid;
    access_limits impl;
    endianness endian;

    /// The table of `Ops` (defined below).
    template <class Ops>
    static constexpr const region_ops* of() noexcept;
};

namespace detail {

template <class T>
constexpr access_limits valid_of() {
    if constexpr (requires { T::valid; })
        return T::valid;
    else
        return {};
}
template <class T>
constexpr access_limits impl_of() {
    if constexpr (requires { T::impl; })
        return T::impl;
    else
        return {};
}
template <class T>
constexpr endianness endian_of() {
    if constexpr (requires { T::endian; })
        return T::endian;
    else
        return endianness::native;
}

template <MemoryRegionOps T>
struct ops_thunks {
    static memtx_result read(void* o, hwaddr a, std::uint64_t* d, unsigned s, mem_attrs at) {
        if constexpr (attrs_read<T>) {
            return static_cast<T*>(o)->read(a, d, s, at);
        } else {
            *d = static_cast<std::uint64_t>(static_cast<T*>(o)->read(a, s));
            return memtx_ok;
        }
    }
    static memtx_result write(void* o, hwaddr a, std::uint64_t v, unsigned s, mem_attrs at) {
        if constexpr (attrs_write<T>) {
            return static_cast<T*>(o)->write(a, v, s, at);
        } else {
            static_cast<T*>(o)->write(a, v, s);
            return memtx_ok;
        }
    }
    static constexpr bool has_accepts =
        requires(T & t, hwaddr a, unsigned s, bool w, mem_attrs at) {
        { t.accepts(a, s, w, at) } -> std::convertible_to<bool>;
    };
    static bool accepts(void* o, hwaddr a, unsigned s, bool w, mem_attrs at) {
        if constexpr (has_accepts)
            return static_cast<T*>(o)->accepts(a, s, w, at);
        else
            return true;
    }
    static_assert(!(impl_of<T>().unaligned && !valid_of<T>().unaligned),
                  "MemoryRegionOps: impl.unaligned requires valid.unaligned (as in QEMU)");
    static constexpr region_ops table{&read,         &write,       has_accepts ? &accepts : nullptr,
                                      valid_of<T>(), impl_of<T>(), endian_of<T>()};
};

} // namespace detail

template <class Ops>
constexpr const region_ops* region_ops::of() noexcept {
    static_assert(MemoryRegionOps<Ops>,
                  "region_ops::of<Ops>: Ops must meet qomem::MemoryRegionOps");
    return &detail::ops_thunks<Ops>::table;
}

} // namespace qomem
