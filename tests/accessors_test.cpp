// Typed accessors (ld/st{ub,uw,l,q}{,_le,_be}), the target's byte order, and
// the rest of QEMU's address-space API: translate, access_valid, set, and
// memory_region_dispatch_read/write with a MemOp.
//
// Byte order is checked as a table: target byte order x device byte order
// (native, little, big) x access size, each expectation computed here from
// the rule (a register's value travels as bytes in the device's order, the
// target's for `native`; a typed access reads those bytes in the order it
// names), byte by byte, never by the library's own swapping.
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <qomem/address_space.hpp>
#include <qomem/device.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/memory_system.hpp>
#include <qomem/region_dispatch.hpp>

#include "test_support.hpp"

namespace {

using qomem::endianness;
using qomem::hwaddr;
using qomem::memtx_result;
using strings = std::vector<std::string>;

constexpr qomem::access_limits any8{.min_access_size = 1, .max_access_size = 8};

/// The `size` bytes of `v` in order `big` (true: most significant first).
std::vector<std::uint8_t> to_bytes(std::uint64_t v, unsigned size, bool big) {
    std::vector<std::uint8_t> out(size);
    for (unsigned i = 0; i < size; ++i) {
        const unsigned shift = 8 * (big ? size - 1 - i : i);
        out[i] = static_cast<std::uint8_t>(v >> shift);
    }
    return out;
}
/// The value of `bytes` read in order `big`.
std::uint64_t from_bytes(const std::vector<std::uint8_t>& bytes, bool big) {
    std::uint64_t v = 0;
    const auto n = static_cast<unsigned>(bytes.size());
    for (unsigned i = 0; i < n; ++i) v |= std::uint64_t(bytes[i]) << (8 * (big ? n - 1 - i : i));
    return v;
}
std::uint64_t mask(unsigned size) { return size == 8 ? ~std::uint64_t(0) : (std::uint64_t(1) << (8 * size)) - 1; }
bool is_big(endianness e, bool target_big) { return e == endianness::big || (e == endianness::native && target_big); }
const char* name_of(endianness e) {
    return e == endianness::native ? "native" : e == endianness::little ? "little" : "big";
}

/// A typed load/store of `size` bytes in `order` through `as`.
template <endianness Order>
memtx_result typed_load(qomem::address_space& as, hwaddr a, unsigned size, std::uint64_t& out) {
    memtx_result r = qomem::memtx_ok;
    switch (size) {
    case 1: { std::uint8_t v = 0; r = as.load<std::uint8_t, Order>(a, v); out = v; break; }
    case 2: { std::uint16_t v = 0; r = as.load<std::uint16_t, Order>(a, v); out = v; break; }
    case 4: { std::uint32_t v = 0; r = as.load<std::uint32_t, Order>(a, v); out = v; break; }
    default: { std::uint64_t v = 0; r = as.load<std::uint64_t, Order>(a, v); out = v; break; }
    }
    return r;
}
template <endianness Order>
memtx_result typed_store(qomem::address_space& as, hwaddr a, unsigned size, std::uint64_t v) {
    switch (size) {
    case 1: return as.store<std::uint8_t, Order>(a, static_cast<std::uint8_t>(v));
    case 2: return as.store<std::uint16_t, Order>(a, static_cast<std::uint16_t>(v));
    case 4: return as.store<std::uint32_t, Order>(a, static_cast<std::uint32_t>(v));
    default: return as.store<std::uint64_t, Order>(a, v);
    }
}

template <endianness Device>
void check_device_order(std::endian target) {
    const bool target_big = target == std::endian::big;
    auto sys = qomem::memory_system::make(target);
    CHECK(sys->target_endianness() == target);
    qomem_test::recording_regs<any8, any8, Device> ops;
    constexpr std::uint64_t reg = 0x8877665544332211;
    ops.reader = [](hwaddr, unsigned size) { return reg & mask(size); };
    auto dev = qomem::make<qomem::device>();
    auto root = qomem::make_container(nullptr, "root", qomem::u128_2_64);
    auto io = qomem::make_io(*dev, "io", 0x100, ops);
    root->add_subregion(0x1000, *io);
    {
        qomem::address_space as(*sys, *root, "memory");
        const bool dev_big = is_big(Device, target_big);
        for (unsigned size : {1u, 2u, 4u, 8u}) {
            INFO(fmt::format("target {}, device {}, size {}", target_big ? "big" : "little",
                             name_of(Device), size));
            // The bus bytes of the register, and the bytes a write puts there.
            const std::vector<std::uint8_t> bus = to_bytes(reg & mask(size), size, dev_big);
            std::vector<std::uint8_t> got(size);
            CHECK(as.read(0x1000, got.data(), size) == qomem::memtx_ok);
            CHECK(got == bus);
            for (endianness order : {endianness::native, endianness::little, endianness::big}) {
                INFO(fmt::format("access order {}", name_of(order)));
                const bool ob = is_big(order, target_big);
                const std::uint64_t want = from_bytes(bus, ob);
                std::uint64_t v = 0;
                memtx_result r = order == endianness::native   ? typed_load<endianness::native>(as, 0x1000, size, v)
                                 : order == endianness::little ? typed_load<endianness::little>(as, 0x1000, size, v)
                                                               : typed_load<endianness::big>(as, 0x1000, size, v);
                CHECK(r == qomem::memtx_ok);
                CHECK(v == want);
                std::uint64_t d = 0;
                CHECK(qomem::memory_region_dispatch_read(*io, 0, d, {size, order}) == qomem::memtx_ok);
                CHECK(d == want);

                // A typed store of x puts x's bytes (in the access's order)
                // on the bus; the device reads them in its own.
                const std::uint64_t x = 0x0102030405060708 & mask(size);
                const std::uint64_t dev_value = from_bytes(to_bytes(x, size, ob), dev_big);
                ops.calls.clear();
                r = order == endianness::native   ? typed_store<endianness::native>(as, 0x1000, size, x)
                    : order == endianness::little ? typed_store<endianness::little>(as, 0x1000, size, x)
                                                  : typed_store<endianness::big>(as, 0x1000, size, x);
                CHECK(r == qomem::memtx_ok);
                CHECK(qomem::memory_region_dispatch_write(*io, 0, x, {size, order}) == qomem::memtx_ok);
                const std::string w = fmt::format("w 0x0/{}={:#x}", size, dev_value);
                CHECK(ops.calls == strings{w, w});
            }
            // A byte write: the device reads the bytes in its order.
            const std::vector<std::uint8_t> raw = to_bytes(0x1122334455667788 & mask(size), size, false);
            ops.calls.clear();
            CHECK(as.write(0x1000, raw.data(), size) == qomem::memtx_ok);
            CHECK(ops.calls == strings{fmt::format("w 0x0/{}={:#x}", size, from_bytes(raw, dev_big))});
        }
    }
    root->del_subregion(*io);
}

/// A board in its own memory system of the given target order.
struct sys_board {
    explicit sys_board(std::endian target = std::endian::native) : sys(qomem::memory_system::make(target)) {}
    qomem::ref_ptr<qomem::memory_system> sys;
    qomem::ref_ptr<qomem::device> dev = qomem::make<qomem::device>();
    qomem::ref_ptr<qomem::memory_region> root = qomem::make_container(nullptr, "system", qomem::u128_2_64);
};

} // namespace

TEST_CASE("byte order: device endianness x target endianness x access size, through byte "
          "accesses, typed accessors and memory_region_dispatch, on a little- and a big-endian "
          "target",
          "[accessors][endianness]") {
    qomem_test::leak_check leaks;
    for (std::endian target : {std::endian::little, std::endian::big}) {
        check_device_order<endianness::native>(target);
        check_device_order<endianness::little>(target);
        check_device_order<endianness::big>(target);
    }
}

TEST_CASE("typed accessors on RAM read the bytes in the order they name, and no suffix is the "
          "target's order",
          "[accessors]") {
    qomem_test::leak_check leaks;
    for (std::endian target : {std::endian::little, std::endian::big}) {
        sys_board b(target);
        auto ram = qomem::make_ram(*b.dev, "ram", 0x1000);
        b.root->add_subregion(0, *ram);
        {
            qomem::address_space as(*b.sys, *b.root, "memory");
            const std::uint8_t bytes[8] = {0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88};
            CHECK(as.write(0x100, bytes, 8) == qomem::memtx_ok);
            std::uint8_t u8 = 0;
            std::uint16_t u16 = 0;
            std::uint32_t u32 = 0;
            std::uint64_t u64 = 0;
            CHECK(as.ldub(0x101, u8) == qomem::memtx_ok);
            CHECK(u8 == 0x22);
            CHECK(as.lduw_le(0x100, u16) == qomem::memtx_ok);
            CHECK(u16 == 0x2211);
            CHECK(as.lduw_be(0x100, u16) == qomem::memtx_ok);
            CHECK(u16 == 0x1122);
            CHECK(as.ldl_le(0x100, u32) == qomem::memtx_ok);
            CHECK(u32 == 0x44332211);
            CHECK(as.ldl_be(0x100, u32) == qomem::memtx_ok);
            CHECK(u32 == 0x11223344);
            CHECK(as.ldq_le(0x100, u64) == qomem::memtx_ok);
            CHECK(u64 == 0x8877665544332211);
            CHECK(as.ldq_be(0x100, u64) == qomem::memtx_ok);
            CHECK(u64 == 0x1122334455667788);
            CHECK(as.ldl(0x100, u32) == qomem::memtx_ok);
            CHECK(u32 == (target == std::endian::big ? 0x11223344u : 0x44332211u));
            // Unaligned and crossing a page: the same bytes.
            CHECK(as.stq_be(0xffc, 0x0102030405060708) == qomem::memtx_decode_error); // half past the RAM
            CHECK(as.stl_be(0xffc, 0xa1b2c3d4) == qomem::memtx_ok);
            CHECK(as.ldl_le(0xffc, u32) == qomem::memtx_ok);
            CHECK(u32 == 0xd4c3b2a1);
            CHECK(as.stw(0x201, 0xbeef) == qomem::memtx_ok);
            std::uint8_t two[2];
            CHECK(as.read(0x201, two, 2) == qomem::memtx_ok);
            CHECK(qomem_test::hex_bytes(two, 2) == (target == std::endian::big ? "be ef" : "ef be"));
        }
        b.root->del_subregion(*ram);
    }
}

TEST_CASE("a typed MMIO access is one access of its size, refused whole when the ops refuse that "
          "size, where a byte access of the same length is split",
          "[accessors][mmio]") {
    qomem_test::leak_check leaks;
    qomem_test::board b;
    qomem_test::recording_regs<qomem::access_limits{.min_access_size = 1, .max_access_size = 2}> ops;
    ops.reader = [](hwaddr off, unsigned size) { return qomem_test::offset_bytes(off, size); };
    auto io = qomem::make_io(*b.dev, "io", 0x100, ops);
    b.sys->add_subregion(0, *io);
    {
        qomem::address_space as(*b.sys, "memory");
        std::uint32_t v = 0xffff;
        CHECK(as.ldl_le(0x10, v) == qomem::memtx_decode_error);
        CHECK(v == 0);
        CHECK(ops.calls.empty());
        std::uint8_t buf[4];
        CHECK(as.read(0x10, buf, 4) == qomem::memtx_ok);
        CHECK(ops.calls == strings{"r 0x10/2", "r 0x12/2"});
        std::uint16_t w = 0;
        CHECK(as.lduw_le(0x10, w) == qomem::memtx_ok);
        CHECK(w == 0x1110);
    }
    b.sys->del_subregion(*io);
}

TEST_CASE("translate: RAM is clipped to its range, MMIO is not, a hole gives an empty section and "
          "its own length, and the section holds its region",
          "[accessors][translate]") {
    qomem_test::leak_check leaks;
    qomem_test::board b;
    qomem_test::null_regs ops;
    auto ram = qomem::make_ram(*b.dev, "ram", 0x1000);
    auto io = qomem::make_io(*b.dev, "io", 0x10, ops);
    b.sys->add_subregion(0x1000, *ram);
    b.sys->add_subregion(0x2000, *io);
    {
        qomem::address_space as(*b.sys, "memory");
        const auto refs = ram->ref_count();
        hwaddr len = 0x100;
        qomem::found_section s = as.translate(0x1f80, len, false);
        REQUIRE(s);
        CHECK(s.mr == ram.get());
        CHECK(s.offset_within_region == 0xf80);
        CHECK(s.offset_within_address_space == 0x1f80);
        CHECK(s.size == 0x80);
        CHECK(len == 0x80);
        CHECK(ram->ref_count() == refs + 1);
        s.reset();
        CHECK(ram->ref_count() == refs);

        len = 0x100;
        s = as.translate(0x2008, len, true);
        CHECK(s.mr == io.get());
        CHECK(s.offset_within_region == 8);
        CHECK(s.size == 8);
        CHECK(len == 0x100); // MMIO: as asked

        len = 0x2000;
        s = as.translate(0x10, len, false); // a hole up to the RAM
        CHECK_FALSE(s);
        CHECK(len == 0xff0);
        len = 0x100000;
        s = as.translate(0x3000, len, false); // a hole to the end of the space
        CHECK_FALSE(s);
        CHECK(len == 0x100000);
    }
    b.sys->del_subregion(*ram);
    b.sys->del_subregion(*io);
}

TEST_CASE("access_valid: holes, accesses past 2^64, MMIO refusing a piece and MMIO under "
          "attrs.memory are invalid, while RAM, ROM writes and MMIO pieces its rules accept are valid",
          "[accessors][access_valid]") {
    qomem_test::leak_check leaks;
    qomem_test::board b;
    qomem_test::recording_regs<qomem::access_limits{.min_access_size = 2, .max_access_size = 4}> ops;
    auto ram = qomem::make_ram(*b.dev, "ram", 0x1000);
    auto rom = qomem::make_rom(*b.dev, "rom", 0x1000);
    auto io = qomem::make_io(*b.dev, "io", 0x100, ops);
    auto top = qomem::make_ram(*b.dev, "top", 0x1000);
    b.sys->add_subregion(0x1000, *ram);
    b.sys->add_subregion(0x2000, *rom);
    b.sys->add_subregion(0x3000, *io);
    b.sys->add_subregion(~hwaddr(0) - 0xfff, *top);
    {
        qomem::address_space as(*b.sys, "memory");
        CHECK(as.access_valid(0x1000, 0x2000, false));       // RAM then ROM
        CHECK(as.access_valid(0x2000, 0x10, true));          // a ROM write: ignored, valid
        CHECK(as.access_valid(0x1800, 0x1000, false));       // RAM into ROM
        CHECK(as.access_valid(0x1800, 0x1000, true));
        CHECK(as.access_valid(0x2800, 0x900, false));        // ROM into MMIO, in pieces it takes
        CHECK_FALSE(as.access_valid(0x2800, 0x1000, false)); // ...and on into the hole after it
        CHECK(as.access_valid(0x3000, 0x8, false));          // MMIO in pieces of 4
        CHECK_FALSE(as.access_valid(0x3001, 0x1, false));    // one byte: below min_access_size
        CHECK_FALSE(as.access_valid(0x3000, 0x200, false));  // past the MMIO: a hole
        qomem::mem_attrs only_ram;
        only_ram.memory = true;
        CHECK(as.access_valid(0x1000, 0x10, false, only_ram));
        CHECK_FALSE(as.access_valid(0x3000, 0x4, false, only_ram));
        CHECK(as.access_valid(~hwaddr(0) - 0xf, 0x10, true)); // ends exactly at 2^64
        CHECK_FALSE(as.access_valid(~hwaddr(0) - 0xf, 0x11, true));
        CHECK(as.access_valid(0x5000, 0, true)); // nothing to check
        CHECK(ops.calls.empty());                // no access was made
    }
    for (auto* r : {ram.get(), rom.get(), io.get(), top.get()}) b.sys->del_subregion(*r);
}

TEST_CASE("set writes a byte value over RAM and MMIO, ignores ROM, and reports a hole",
          "[accessors][set]") {
    qomem_test::leak_check leaks;
    qomem_test::board b;
    qomem_test::recording_regs<qomem::access_limits{.min_access_size = 1, .max_access_size = 4}> ops;
    auto ram = qomem::make_ram(*b.dev, "ram", 0x1000);
    auto rom = qomem::make_rom(*b.dev, "rom", 0x1000);
    auto io = qomem::make_io(*b.dev, "io", 0x8, ops);
    b.sys->add_subregion(0x1000, *ram);
    b.sys->add_subregion(0x2000, *rom);
    b.sys->add_subregion(0x3000, *io);
    {
        qomem::address_space as(*b.sys, "memory");
        ram->set_dirty_log(true);
        CHECK(as.set(0x1ff0, 0xab, 0x20) == qomem::memtx_ok); // RAM, then ROM (ignored)
        std::uint8_t buf[0x20];
        CHECK(as.read(0x1ff0, buf, 0x20) == qomem::memtx_ok);
        CHECK(qomem_test::hex_bytes(buf + 0xe, 4) == "ab ab 00 00");
        CHECK(ram->test_and_clear_dirty(0xff0, 0x10));
        CHECK(as.set(0x3000, 0x5c, 8) == qomem::memtx_ok);
        CHECK(ops.calls == strings{"w 0x0/4=0x5c5c5c5c", "w 0x4/4=0x5c5c5c5c"});
        CHECK(as.set(0x3004, 0x01, 0x10) == qomem::memtx_decode_error); // runs into the hole
        ram->set_dirty_log(false);
    }
    for (auto* r : {ram.get(), rom.get(), io.get()}) b.sys->del_subregion(*r);
}

TEST_CASE("memory_region_dispatch_read/write: RAM, ROM and ROMD by memory, containers and aliases "
          "answer nothing, and an access past the region's end is refused",
          "[accessors][dispatch]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    qomem_test::board b;
    qomem_test::recording_regs<any8, any8> ops;
    auto ram = qomem::make_ram(*b.dev, "ram", 0x100);
    auto rom = qomem::make_rom(*b.dev, "rom", 0x100);
    auto flash = qomem::make_rom_device(*b.dev, "flash", 0x100, ops);
    auto alias = qomem::make_alias(*b.dev, "alias", *ram, 0, 0x100);
    std::memset(rom->host_ptr(), 0x42, 0x100);
    std::memset(flash->host_ptr(), 0x24, 0x100);
    std::uint64_t v = 0;
    CHECK(qomem::memory_region_dispatch_write(*ram, 0x10, 0x1122, {2, endianness::big}) == qomem::memtx_ok);
    CHECK(qomem::memory_region_dispatch_read(*ram, 0x10, v, {2, endianness::little}) == qomem::memtx_ok);
    CHECK(v == 0x2211);
    CHECK(qomem::memory_region_dispatch_write(*rom, 0, 1, {1}) == qomem::memtx_ok); // ignored
    CHECK(qomem::memory_region_dispatch_read(*rom, 0, v, {4}) == qomem::memtx_ok);
    CHECK(v == 0x42424242);
    CHECK(qomem::memory_region_dispatch_read(*flash, 8, v, {4}) == qomem::memtx_ok);
    CHECK(v == 0x24242424);
    CHECK(qomem::memory_region_dispatch_write(*flash, 8, 7, {4, endianness::little}) == qomem::memtx_ok);
    CHECK(ops.calls == strings{"w 0x8/4=0x7"});
    v = 5;
    CHECK(qomem::memory_region_dispatch_read(*b.sys, 0, v, {4}) == qomem::memtx_decode_error);
    CHECK(v == 0);
    CHECK(qomem::memory_region_dispatch_read(*alias, 0, v, {4}) == qomem::memtx_decode_error);
    CHECK(qomem::memory_region_dispatch_read(*ram, 0xfd, v, {4}) == qomem::memtx_decode_error);
    CHECK(qomem::memory_region_dispatch_read(*ram, 0xfc, v, {4}) == qomem::memtx_ok);
    CHECK_THROWS_AS(qomem::memory_region_dispatch_read(*ram, 0, v, {3}), qomem::assertion_failure);
}

TEST_CASE("the target byte order is set before the first address space, and refused after",
          "[accessors][endianness][misuse]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    sys_board b;
    b.sys->set_target_endianness(std::endian::big);
    CHECK(b.sys->target_endianness() == std::endian::big);
    {
        qomem::address_space as(*b.sys, *b.root, "memory");
        CHECK_THROWS_AS(b.sys->set_target_endianness(std::endian::little), qomem::assertion_failure);
        CHECK(b.sys->target_endianness() == std::endian::big);
    }
    CHECK(qomem::memory_system::default_system().target_endianness() == std::endian::native);
}
