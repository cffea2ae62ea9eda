// tests/dma_test.cpp — DMA through an address space: map/unmap of RAM (direct
// host pointers, region references, extension only within one region), bounce
// buffers for everything else (pre-read, written back, a per-address-space
// budget, map clients), dirty tracking, and find / memory_region_find
// (QEMU behaviour rows 21, 23, 24 and 29).
//
// Every scenario starts with a qomem_test::leak_check, so it ends by requiring
// that no qomem object is left alive. Regions are owned by a device (so the
// references taken on them count) unless a test is about ownerless regions;
// address spaces are declared after the regions they render.

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <qomem/address_space.hpp>
#include <qomem/device.hpp>
#include <qomem/memory_ops.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/object.hpp>

#include "test_support.hpp"

namespace {

using qomem::hwaddr;
using qomem::u128;
using strings = std::vector<std::string>;

constexpr hwaddr max_addr = ~hwaddr{0};

using qomem_test::board;
using qomem_test::live_count;

/// MMIO whose byte at offset k is (k & 0xff) and which records every call
/// (little-endian, 1 to 4 bytes per call).
struct pattern_regs : qomem_test::mmio_calls {
    static constexpr qomem::endianness endian = qomem::endianness::little;
    std::size_t bytes_read = 0;
    std::size_t bytes_written = 0;

    std::uint64_t read(hwaddr offset, unsigned size) {
        bytes_read += size;
        return qomem_test::offset_bytes(offset, size);
    }
    void write(hwaddr offset, std::uint64_t value, unsigned size) {
        bytes_written += size;
        note_write(offset, value, size);
    }
};

/// Deletes an ownerless `sub` from `container` when the scenario ends (before
/// the handle of `sub` goes, which would otherwise be misuse).
class detach_at_exit {
public:
    detach_at_exit(qomem::memory_region& container, qomem::memory_region& sub)
        : container_(container), sub_(sub) {}
    ~detach_at_exit() {
        if (sub_.container() == &container_) container_.del_subregion(sub_);
    }
    detach_at_exit(const detach_at_exit&) = delete;
    detach_at_exit& operator=(const detach_at_exit&) = delete;

private:
    qomem::memory_region& container_;
    qomem::memory_region& sub_;
};

} // namespace

// ---- RAM ------------------------------------------------------------------

TEST_CASE("map of RAM returns a direct host pointer and holds a reference to the region "
          "until unmap",
          "[dma][map][ram]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    board b;
    auto ram = qomem::make_ram(*b.dev, "ram", 0x4000);
    b.sys->add_subregion(0x100000, *ram);
    qomem::address_space as(*b.sys, "memory");

    const auto refs = ram->ref_count();
    auto m = as.map(0x101010, 0x100, true);
    REQUIRE(m);
    CHECK(m.data() == ram->host_ptr() + 0x1010);
    CHECK(m.size() == 0x100);
    CHECK_FALSE(m.bounced());
    CHECK(m.region() == ram.get());
    CHECK(ram->ref_count() == refs + 1);

    // The pointer is the guest's memory.
    std::memset(m.data(), 0x5a, 4);
    std::uint32_t v = 0;
    REQUIRE(as.read(0x101010, &v, 4) == qomem::memtx_ok);
    CHECK(v == 0x5a5a5a5a);

    as.unmap(m, 4);
    CHECK_FALSE(m);
    CHECK(m.size() == 0);
    CHECK(ram->ref_count() == refs);

    SECTION("a read mapping too") {
        auto r = as.map(0x100000, 0x4000, false);
        REQUIRE(r);
        CHECK(r.data() == ram->host_ptr());
        CHECK(r.size() == 0x4000);
        CHECK(ram->ref_count() == refs + 1);
        as.unmap(r, 0);
        CHECK(ram->ref_count() == refs);
    }
}

TEST_CASE("map of an ownerless RAM region takes no counted reference", "[dma][map][ram]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    board b;
    auto loose = qomem::make_ram(nullptr, "loose", 0x1000);
    detach_at_exit detach(*b.sys, *loose);
    b.sys->add_subregion(0x0, *loose);
    qomem::address_space as(*b.sys, "memory");

    REQUIRE_FALSE(loose->counted());
    const auto refs = loose->ref_count();
    auto m = as.map(0x0, 0x1000, true);
    REQUIRE(m);
    CHECK(m.data() == loose->host_ptr());
    CHECK(loose->ref_count() == refs);
    as.unmap(m, 0);
    CHECK(loose->ref_count() == refs);
}

TEST_CASE("map extends only within the same region: the length is truncated where the "
          "next range belongs to another region",
          "[dma][map][ram]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    pattern_regs ops;
    board b;
    auto ram1 = qomem::make_ram(*b.dev, "ram1", 0x1000);
    auto ram2 = qomem::make_ram(*b.dev, "ram2", 0x1000);
    auto big = qomem::make_ram(*b.dev, "big", 0x3000);
    auto overlay = qomem::make_io(*b.dev, "overlay", 0x100, ops);
    b.sys->add_subregion(0x0, *ram1);
    b.sys->add_subregion(0x1000, *ram2);
    b.sys->add_subregion(0x10000, *big);
    b.sys->add_subregion(0x11000, *overlay, 1);
    qomem::address_space as(*b.sys, "memory");

    SECTION("two adjacent RAM regions") {
        auto m = as.map(0x800, 0x1000, true);
        REQUIRE(m);
        CHECK(m.data() == ram1->host_ptr() + 0x800);
        CHECK(m.size() == 0x800);
        CHECK(m.region() == ram1.get());
    }
    SECTION("RAM interrupted by an MMIO overlay") {
        auto m = as.map(0x10800, 0x2000, false);
        REQUIRE(m);
        CHECK(m.data() == big->host_ptr() + 0x800);
        CHECK(m.size() == 0x800);
        // ... and past the overlay, the same region again from its own offset.
        auto tail = as.map(0x11100, 0x100000, false);
        REQUIRE(tail);
        CHECK(tail.data() == big->host_ptr() + 0x1100);
        CHECK(tail.size() == 0x1f00);
    }
    SECTION("nothing is mapped in a hole") {
        auto m = as.map(0x8000, 0x10, false);
        CHECK_FALSE(m);
        CHECK(m.data() == nullptr);
        CHECK(m.size() == 0);
        auto z = as.map(0x0, 0, false);
        CHECK_FALSE(z);
    }
}

TEST_CASE("map extends across adjacent ranges of the same region with contiguous offsets, "
          "but a write mapping stops at a readonly one",
          "[dma][map][ram]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    board b;
    auto big = qomem::make_ram(*b.dev, "big", 0x2000);
    auto lo = qomem::make_alias(*b.dev, "lo", *big, 0x0, 0x1000);
    auto hi = qomem::make_alias(*b.dev, "hi", *big, 0x1000, 0x1000);
    hi->set_readonly(true); // two ranges of `big` that cannot merge
    b.sys->add_subregion(0x10000, *lo);
    b.sys->add_subregion(0x11000, *hi);
    qomem::address_space as(*b.sys, "memory");
    REQUIRE(as.view()->ranges().size() == 2);

    auto r = as.map(0x10800, 0x1000, false);
    REQUIRE(r);
    CHECK(r.data() == big->host_ptr() + 0x800);
    CHECK(r.size() == 0x1000);

    auto w = as.map(0x10800, 0x1000, true);
    REQUIRE(w);
    CHECK_FALSE(w.bounced());
    CHECK(w.size() == 0x800);
}

// ---- bounce buffers ---------------------------------------------------------

TEST_CASE("map of MMIO gives a bounce buffer: pre-read for reads, written back on unmap "
          "for writes, exactly access_len bytes",
          "[dma][map][bounce]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    pattern_regs ops;
    board b;
    auto io = qomem::make_io(*b.dev, "fifo", 0x10000, ops);
    b.sys->add_subregion(0x40000, *io);
    qomem::address_space as(*b.sys, "memory");
    const auto refs = io->ref_count();

    SECTION("read") {
        auto m = as.map(0x40010, 0x20, false);
        REQUIRE(m);
        CHECK(m.bounced());
        CHECK(m.size() == 0x20);
        CHECK(m.region() == io.get());
        CHECK(io->ref_count() == refs + 1);
        CHECK(ops.bytes_read == 0x20);
        for (std::size_t i = 0; i < 0x20; ++i) {
            INFO("byte " << i);
            CHECK(std::to_integer<unsigned>(m.data()[i]) == 0x10 + i);
        }
        as.unmap(m, 0x20);
        CHECK(ops.calls.empty()); // nothing written back for a read mapping
    }
    SECTION("write") {
        auto m = as.map(0x40010, 0x20, true);
        REQUIRE(m);
        CHECK(m.bounced());
        CHECK(ops.bytes_read == 0); // not pre-read
        for (std::size_t i = 0; i < 0x20; ++i) m.data()[i] = static_cast<std::byte>(0xa0 + i);
        CHECK(ops.calls.empty()); // nothing reaches the device before unmap
        as.unmap(m, 6);
        CHECK(ops.bytes_written == 6);
        CHECK(ops.calls == strings{"w 0x10/4=0xa3a2a1a0", "w 0x14/2=0xa5a4"});
    }
    CHECK(io->ref_count() == refs);
    CHECK(as.bounce_buffer_in_use() == 0);
}

TEST_CASE("the bounce budget (4096 by default) refuses a second map with an empty mapping, and "
          "a map client is called once when it is freed, and a retry then succeeds",
          "[dma][map][bounce]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    pattern_regs ops;
    board b;
    auto io = qomem::make_io(*b.dev, "fifo", 0x10000, ops);
    b.sys->add_subregion(0x40000, *io);
    qomem::address_space as(*b.sys, "memory");

    CHECK(as.max_bounce_buffer_size() == 4096);
    auto first = as.map(0x40000, 0x10000, false);
    REQUIRE(first);
    CHECK(first.size() == 4096); // truncated to the budget
    CHECK(as.bounce_buffer_in_use() == 4096);

    auto second = as.map(0x41000, 0x10, false);
    CHECK_FALSE(second);
    CHECK(second.data() == nullptr);
    CHECK(second.size() == 0);

    int called = 0;
    int other_called = 0;
    as.register_map_client([&] { ++called; });
    const auto other = as.register_map_client([&] { ++other_called; });
    as.unregister_map_client(other);
    CHECK(called == 0);

    as.unmap(first, 0);
    CHECK(called == 1);
    CHECK(other_called == 0);
    CHECK(as.bounce_buffer_in_use() == 0);

    second = as.map(0x41000, 0x10, false);
    REQUIRE(second);
    CHECK(second.size() == 0x10);
    as.unmap(second, 0);
    CHECK(called == 1); // once only
}

TEST_CASE("a bounce map is truncated to what is left of the budget, which "
          "set_max_bounce_buffer_size changes",
          "[dma][map][bounce]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    pattern_regs ops;
    board b;
    auto io = qomem::make_io(*b.dev, "fifo", 0x10000, ops);
    b.sys->add_subregion(0x40000, *io);
    qomem::address_space as(*b.sys, "memory");

    auto a = as.map(0x40000, 3000, false);
    REQUIRE(a.size() == 3000);
    auto c = as.map(0x40000, 4096, true);
    REQUIRE(c);
    CHECK(c.size() == 4096 - 3000);
    CHECK(as.bounce_buffer_in_use() == 4096);
    as.unmap(a, 0);
    as.unmap(c, 0);
    CHECK(ops.calls.empty());

    as.set_max_bounce_buffer_size(8192);
    CHECK(as.max_bounce_buffer_size() == 8192);
    auto d = as.map(0x40000, 0x10000, false);
    CHECK(d.size() == 8192);
    CHECK(ops.bytes_read == 3000 + 8192);
    as.unmap(d, 0);

    as.set_max_bounce_buffer_size(0);
    auto e = as.map(0x40000, 1, false);
    CHECK_FALSE(e);
}

TEST_CASE("bounce budgets are per address space", "[dma][map][bounce]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    pattern_regs ops;
    board b;
    auto io = qomem::make_io(*b.dev, "fifo", 0x10000, ops);
    b.sys->add_subregion(0x40000, *io);
    qomem::address_space as(*b.sys, "memory");
    qomem::address_space dma(*b.sys, "dma");

    auto a = as.map(0x40000, 4096, false);
    auto c = dma.map(0x40000, 4096, false);
    CHECK(a.size() == 4096);
    CHECK(c.size() == 4096);
    CHECK_FALSE(as.map(0x40000, 1, false));
}

// ---- dirty tracking -----------------------------------------------------------

TEST_CASE("dirty logging: writes through the address space and DMA write mappings mark "
          "pages dirty when unmapped, and reads and read mappings do not",
          "[dma][dirty]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    board b;
    auto ram = qomem::make_ram(*b.dev, "ram", 0x8000);
    b.sys->add_subregion(0x100000, *ram);
    qomem::address_space as(*b.sys, "memory");

    std::array<std::uint8_t, 8> buf{1, 2, 3, 4, 5, 6, 7, 8};

    // Off: nothing is recorded.
    CHECK_FALSE(ram->dirty_log());
    REQUIRE(as.write(0x100010, buf.data(), 4) == qomem::memtx_ok);
    ram->set_dirty_log(true);
    CHECK(ram->dirty_log());
    CHECK_FALSE(ram->test_and_clear_dirty(0, 0x8000));

    // Writes: the pages they touch (offsets in the region, not addresses).
    REQUIRE(as.write(0x101ffc, buf.data(), 8) == qomem::memtx_ok); // pages 1 and 2
    CHECK_FALSE(ram->test_and_clear_dirty(0x0, 0x1000));
    CHECK(ram->test_and_clear_dirty(0x1000, 1));
    CHECK(ram->test_and_clear_dirty(0x2fff, 1));
    CHECK_FALSE(ram->test_and_clear_dirty(0x1000, 0x2000)); // cleared

    // Reads: nothing.
    REQUIRE(as.read(0x103000, buf.data(), 8) == qomem::memtx_ok);
    CHECK_FALSE(ram->test_and_clear_dirty(0, 0x8000));

    SECTION("a write mapping dirties at unmap, only access_len bytes") {
        auto m = as.map(0x103ff0, 0x2000, true);
        REQUIRE(m.size() == 0x2000);
        std::memset(m.data(), 0xff, 0x20);
        CHECK_FALSE(ram->test_and_clear_dirty(0, 0x8000)); // not before unmap
        as.unmap(m, 0x20);
        CHECK(ram->test_and_clear_dirty(0x3000, 1));
        CHECK(ram->test_and_clear_dirty(0x4000, 1));
        CHECK_FALSE(ram->test_and_clear_dirty(0x5000, 0x1000)); // mapped, not written
    }
    SECTION("a read mapping does not dirty") {
        auto m = as.map(0x103000, 0x1000, false);
        REQUIRE(m);
        as.unmap(m, 0x1000);
        CHECK_FALSE(ram->test_and_clear_dirty(0, 0x8000));
    }
    SECTION("a write mapping dropped without unmap dirties all of it") {
        {
            auto m = as.map(0x106000, 0x1800, true);
            REQUIRE(m.size() == 0x1800);
        }
        CHECK(ram->test_and_clear_dirty(0x6000, 1));
        CHECK(ram->test_and_clear_dirty(0x7000, 1));
        CHECK_FALSE(ram->test_and_clear_dirty(0, 0x6000));
    }
    SECTION("turning logging off stops recording") {
        ram->set_dirty_log(false);
        REQUIRE(as.write(0x100000, buf.data(), 8) == qomem::memtx_ok);
        CHECK_FALSE(ram->test_and_clear_dirty(0, 0x8000));
    }
}

TEST_CASE("dirty logging is for RAM only (misuse otherwise)", "[dma][dirty]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    pattern_regs ops;
    board b;
    auto io = qomem::make_io(*b.dev, "io", 0x100, ops);
    CHECK_THROWS_AS(io->set_dirty_log(true), qomem::assertion_failure);
    CHECK_FALSE(io->dirty_log());
}

// ---- find ----------------------------------------------------------------------

TEST_CASE("find returns the lowest range overlapping the request, clipped to it, with a "
          "reference to its region that the section drops",
          "[dma][find]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    pattern_regs ops;
    pattern_regs ops2;
    board b;
    auto ram1 = qomem::make_ram(*b.dev, "ram1", 0x1000);
    auto io = qomem::make_io(*b.dev, "io", 0x1000, ops);
    auto big = qomem::make_ram(*b.dev, "big", 0x4000);
    auto overlay = qomem::make_io(*b.dev, "overlay", 0x1000, ops2);
    auto ro = qomem::make_alias(*b.dev, "ro", *ram1, 0x0, 0x1000);
    ro->set_readonly(true);
    b.sys->add_subregion(0x1000, *ram1);
    b.sys->add_subregion(0x3000, *io);
    b.sys->add_subregion(0x10000, *big);
    b.sys->add_subregion(0x11000, *overlay, 1);
    b.sys->add_subregion(0x20000, *ro);
    qomem::address_space as(*b.sys, "memory");

    struct expect {
        const qomem::memory_region* mr;
        hwaddr oas, owr;
        u128 size;
    };
    auto check = [&](hwaddr addr, u128 size, expect e) {
        INFO(fmt::format("find({:#x}, {:#x})", addr, static_cast<std::uint64_t>(size)));
        const qomem::found_section s = as.find(addr, size);
        REQUIRE(s);
        CHECK(s.mr == e.mr);
        CHECK(s.offset_within_address_space == e.oas);
        CHECK(s.offset_within_region == e.owr);
        CHECK(s.size == e.size);
    };

    check(0x1800, 0x3000, {ram1.get(), 0x1800, 0x800, 0x800});
    check(0x0, 0x10000, {ram1.get(), 0x1000, 0x0, 0x1000});
    check(0x2000, 0x2000, {io.get(), 0x3000, 0x0, 0x1000});
    check(0x3ffc, 0x100, {io.get(), 0x3ffc, 0xffc, 0x4});
    check(0x10800, 0x2000, {big.get(), 0x10800, 0x800, 0x800});
    check(0x11800, 0x1000, {overlay.get(), 0x11800, 0x800, 0x800});
    check(0x12100, 0x100, {big.get(), 0x12100, 0x2100, 0x100});
    check(0x0, qomem::u128_2_64, {ram1.get(), 0x1000, 0x0, 0x1000});

    CHECK_FALSE(as.find(0x0, 0x1000));     // a hole
    CHECK_FALSE(as.find(0x1000, 0));       // nothing asked
    CHECK_FALSE(as.find(max_addr, 1));     // the top of the space
    CHECK_FALSE(as.find(0x30000, 0x1000)); // past every range

    // Flags of the range come along.
    const qomem::found_section s = as.find(0x20010, 4);
    REQUIRE(s);
    CHECK(s.mr == ram1.get());
    CHECK(s.offset_within_region == 0x10);
    CHECK(s.readonly);

    // The reference.
    const auto refs = big->ref_count();
    {
        qomem::found_section f = as.find(0x10000, 1);
        REQUIRE(f);
        CHECK(big->ref_count() == refs + 1);
        qomem::found_section moved = std::move(f);
        CHECK(big->ref_count() == refs + 1);
        moved.reset();
        CHECK(big->ref_count() == refs);
        f = as.find(0x10000, 1);
        CHECK(big->ref_count() == refs + 1);
    }
    CHECK(big->ref_count() == refs);
}

TEST_CASE("a found section keeps its region alive after it leaves the address space",
          "[dma][find]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    board b;
    auto ram = qomem::make_ram(*b.dev, "ram", 0x1000);
    b.sys->add_subregion(0x0, *ram);
    qomem::address_space as(*b.sys, "memory");

    qomem::found_section s = as.find(0x10, 4);
    REQUIRE(s);
    qomem::memory_region* raw = ram.get();
    b.sys->del_subregion(*ram);
    ram.reset();
    qomem::unparent(*raw); // the device's reference: now only the section holds it
    CHECK(raw->ref_count() == 1);
    CHECK(raw->region_name() == "ram");
    CHECK_FALSE(as.find(0x10, 4));
    s = {};
}

TEST_CASE("memory_region_find converts a region-relative address through the container "
          "chain and looks it up in the address space of the root, and it is empty for a "
          "region under no address-space root",
          "[dma][find]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    pattern_regs cover_ops;
    board b;
    auto pci = qomem::make_container(*b.dev, "pci", 0x10000000);
    auto vram = qomem::make_ram(*b.dev, "vram", 0x2000);
    pci->add_subregion(0x1000, *vram);
    b.sys->add_subregion(0x40000000, *pci);
    auto floating = qomem::make_container(*b.dev, "floating", 0x100000);
    auto lost = qomem::make_ram(*b.dev, "lost", 0x1000);
    floating->add_subregion(0x1000, *lost);
    qomem::address_space as(*b.sys, "memory");

    {
        const qomem::found_section s = qomem::memory_region_find(*vram, 0x10, 4);
        REQUIRE(s);
        CHECK(s.mr == vram.get());
        CHECK(s.offset_within_address_space == 0x40001010);
        CHECK(s.offset_within_region == 0x10);
        CHECK(s.size == 4);
    }
    {
        const auto refs = vram->ref_count();
        const qomem::found_section s = qomem::memory_region_find(*pci, 0x2ff0, 0x100);
        REQUIRE(s);
        CHECK(s.mr == vram.get());
        CHECK(s.offset_within_address_space == 0x40002ff0);
        CHECK(s.offset_within_region == 0x1ff0);
        CHECK(s.size == 0x10); // clipped at the end of vram
        CHECK(vram->ref_count() == refs + 1);
    }
    // The root itself: its own coordinates are the address space's.
    {
        const qomem::found_section s = qomem::memory_region_find(*b.sys, 0x40001000, 1);
        REQUIRE(s);
        CHECK(s.mr == vram.get());
    }
    // What the address space shows there, even if it is another region.
    {
        auto cover = qomem::make_io(*b.dev, "cover", 0x1000, cover_ops);
        b.sys->add_subregion(0x40001000, *cover, 1);
        {
            const qomem::found_section s = qomem::memory_region_find(*vram, 0x10, 4);
            REQUIRE(s);
            CHECK(s.mr == cover.get());
            CHECK(s.offset_within_region == 0x10);
        }
        b.sys->del_subregion(*cover);
    }

    CHECK_FALSE(qomem::memory_region_find(*lost, 0x0, 4));
    CHECK_FALSE(qomem::memory_region_find(*floating, 0x1000, 4));

    SECTION("a root whose address space is gone") {
        auto other_root = qomem::make_container(*b.dev, "other", qomem::u128_2_64);
        auto r = qomem::make_ram(*b.dev, "r", 0x1000);
        other_root->add_subregion(0x0, *r);
        {
            qomem::address_space other(*other_root, "other");
            CHECK(qomem::memory_region_find(*r, 0x0, 4));
        }
        CHECK_FALSE(qomem::memory_region_find(*r, 0x0, 4));
    }
}

// ---- the mapping object ----------------------------------------------------

TEST_CASE("a dma_mapping unmaps when destroyed or assigned over: RAM references are "
          "dropped, bounce buffers written back and returned to the budget",
          "[dma][mapping]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    pattern_regs ops;
    board b;
    auto ram = qomem::make_ram(*b.dev, "ram", 0x4000);
    auto io = qomem::make_io(*b.dev, "fifo", 0x1000, ops);
    b.sys->add_subregion(0x0, *ram);
    b.sys->add_subregion(0x10000, *io);
    qomem::address_space as(*b.sys, "memory");
    const auto ram_refs = ram->ref_count();
    const auto io_refs = io->ref_count();

    {
        auto m = as.map(0x0, 0x100, false);
        REQUIRE(m);
        CHECK(ram->ref_count() == ram_refs + 1);
    }
    CHECK(ram->ref_count() == ram_refs);

    {
        auto w = as.map(0x10000, 8, true);
        REQUIRE(w.bounced());
        CHECK(io->ref_count() == io_refs + 1);
        std::memset(w.data(), 0x11, 8);
    }
    CHECK(io->ref_count() == io_refs);
    CHECK(as.bounce_buffer_in_use() == 0);
    CHECK(ops.calls == strings{"w 0x0/4=0x11111111", "w 0x4/4=0x11111111"});

    {
        auto r = as.map(0x10000, 8, false);
        REQUIRE(r.bounced());
    }
    CHECK(ops.calls.size() == 2); // a read mapping writes nothing back
    CHECK(as.bounce_buffer_in_use() == 0);

    {
        auto m = as.map(0x0, 0x100, true);
        auto n = std::move(m);
        CHECK_FALSE(m);
        CHECK(ram->ref_count() == ram_refs + 1);
        n = as.map(0x10000, 4096, false); // unmaps the RAM mapping
        CHECK(ram->ref_count() == ram_refs);
        CHECK(io->ref_count() == io_refs + 1);
        CHECK(as.bounce_buffer_in_use() == 4096);
    }
    CHECK(io->ref_count() == io_refs);
    CHECK(as.bounce_buffer_in_use() == 0);
}

TEST_CASE("a DMA mapping keeps its region, and through it the device, alive after the region "
          "leaves the address space and the device's last handle goes",
          "[dma][mapping]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    board b;
    auto nic = qomem::make<qomem::device>();
    auto ram = qomem::make_ram(*nic, "rx-ring", 0x1000);
    b.sys->add_subregion(0x0, *ram);
    qomem::address_space as(*b.sys, "memory");

    auto m = as.map(0x0, 0x1000, true);
    REQUIRE(m);
    qomem::memory_region* raw = ram.get();
    b.sys->del_subregion(*raw);
    ram.reset();
    nic.reset(); // the owners' rule: the DMA-held region leaves the tree and holds the nic
    REQUIRE(live_count("device") == 2); // b.dev and the nic
    CHECK(raw->parent() == nullptr);
    CHECK(raw->owner() != nullptr);
    CHECK(raw->ref_count() == 1);
    CHECK(raw->region_name() == "rx-ring");
    std::memset(m.data(), 0xab, 0x1000); // still valid memory
    as.unmap(m, 0x1000);                 // frees the region, then the nic
    CHECK(live_count("memory-region") == 1); // only b.sys
    CHECK(live_count("device") == 1);        // only b.dev
}
