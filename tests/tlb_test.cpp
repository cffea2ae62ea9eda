// cpu_tlb (qomem/tlb.hpp): which pages a vCPU's TLB maps directly and with
// which permission, that everything else still follows the dispatch rules,
// and that every commit (and every switch of dirty logging) is seen by the
// next access. Threads: tests/concurrency_test.cpp.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include <unistd.h>

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <qomem/address_space.hpp>
#include <qomem/device.hpp>
#include <qomem/dirty_log.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/memory_region_cache.hpp>
#include <qomem/memory_system.hpp>
#include <qomem/rcu.hpp>
#include <qomem/shmem.hpp>
#include <qomem/tlb.hpp>

#include "test_support.hpp"

namespace {

using qomem::endianness;
using qomem::hwaddr;
using qomem::memtx_result;
using strings = std::vector<std::string>;
using qomem_test::board;

template <qomem::endianness Endian = qomem::endianness::little>
using regs = qomem_test::recording_regs<qomem::access_limits{.min_access_size = 1, .max_access_size = 8},
                                        qomem::access_limits{.min_access_size = 1, .max_access_size = 8},
                                        Endian>;

/// A machine with RAM at 0x1000 (two pages, filled with 0x10 + page), ROM
/// at 0x4000 (0xee), MMIO at 0x8000, and a readonly alias of the RAM's
/// second page at 0x9000.
struct machine {
    board b;
    regs<> ops;
    qomem::ref_ptr<qomem::memory_region> ram = qomem::make_ram(*b.dev, "ram", 0x2000);
    qomem::ref_ptr<qomem::memory_region> rom = qomem::make_rom(*b.dev, "rom", 0x1000);
    qomem::ref_ptr<qomem::memory_region> io = qomem::make_io(*b.dev, "io", 0x1000, ops);
    qomem::ref_ptr<qomem::memory_region> ro = qomem::make_alias(*b.dev, "ro", *ram, 0x1000, 0x1000);
    std::optional<qomem::address_space> as;

    machine() {
        std::memset(ram->host_ptr(), 0x10, 0x1000);
        std::memset(ram->host_ptr() + 0x1000, 0x11, 0x1000);
        std::memset(rom->host_ptr(), 0xee, 0x1000);
        ro->set_readonly(true);
        ops.reader = [](hwaddr off, unsigned size) { return qomem_test::offset_bytes(off, size); };
        qomem::memory_transaction tx;
        b.sys->add_subregion(0x1000, *ram);
        b.sys->add_subregion(0x4000, *rom);
        b.sys->add_subregion(0x8000, *io);
        b.sys->add_subregion(0x9000, *ro);
        as.emplace(*b.sys, "memory");
    }
    ~machine() {
        as.reset();
        for (auto* r : {ram.get(), rom.get(), io.get(), ro.get()})
            if (r->container()) b.sys->del_subregion(*r);
    }
};

} // namespace

TEST_CASE("tlb: a load misses once per page and then hits, and loads and stores reach the same RAM "
          "the address space sees",
          "[tlb]") {
    qomem_test::leak_check leaks;
    machine m;
    qomem::cpu_tlb tlb(*m.as);
    qomem::rcu::read_guard g;
    std::uint32_t v = 0;
    CHECK(tlb.ldl_le(0x1000, v) == qomem::memtx_ok);
    CHECK(v == 0x10101010);
    CHECK(tlb.fills() == 1);
    for (hwaddr a = 0x1000; a < 0x2000; a += 4) REQUIRE(tlb.ldl_le(a, v) == qomem::memtx_ok);
    CHECK(tlb.fills() == 1); // every other load of the page hit
    CHECK(tlb.stq_le(0x1008, 0x1122334455667788) == qomem::memtx_ok);
    CHECK(tlb.fills() == 1); // the store hit the same entry
    std::uint8_t buf[8];
    CHECK(m.as->read(0x1008, buf, 8) == qomem::memtx_ok);
    CHECK(qomem_test::hex_bytes(buf, 8) == "88 77 66 55 44 33 22 11");
    std::uint32_t be = 0;
    CHECK(tlb.ldl_be(0x1008, be) == qomem::memtx_ok);
    CHECK(be == 0x88776655);
    std::uint16_t w = 0;
    CHECK(tlb.lduw_le(0x100e, w) == qomem::memtx_ok);
    CHECK(w == 0x1122);
    CHECK(tlb.ldl_le(0x2000, v) == qomem::memtx_ok); // the RAM's second page: its own entry
    CHECK(v == 0x11111111);
    CHECK(tlb.fills() == 2);
}

TEST_CASE("tlb: MMIO is never mapped: every load, store and fetch reaches the ops, one access of "
          "its size",
          "[tlb]") {
    qomem_test::leak_check leaks;
    machine m;
    qomem::cpu_tlb tlb(*m.as);
    qomem::rcu::read_guard g;
    std::uint32_t v = 0;
    for (int i = 0; i < 3; ++i) CHECK(tlb.ldl_le(0x8010, v) == qomem::memtx_ok);
    CHECK(v == 0x13121110);
    CHECK(tlb.stw_le(0x8020, 0xabcd) == qomem::memtx_ok);
    CHECK(tlb.fetch<std::uint32_t, endianness::little>(0x8004, v) == qomem::memtx_ok);
    CHECK(m.ops.calls == strings{"r 0x10/4", "r 0x10/4", "r 0x10/4", "w 0x20/2=0xabcd", "r 0x4/4"});
    CHECK(tlb.fills() == 0);
}

TEST_CASE("tlb: ROM and a readonly alias are read directly, but stores to them are never direct "
          "and are ignored with memtx_ok",
          "[tlb]") {
    qomem_test::leak_check leaks;
    machine m;
    qomem::cpu_tlb tlb(*m.as);
    qomem::rcu::read_guard g;
    std::uint32_t v = 0;
    for (hwaddr page : {hwaddr(0x4000), hwaddr(0x9000)}) {
        INFO(fmt::format("page {:#x}", page));
        CHECK(tlb.ldl_le(page, v) == qomem::memtx_ok);
        const std::uint32_t before = v;
        const auto fills = tlb.fills();
        CHECK(tlb.stl_le(page, 0xdeadbeef) == qomem::memtx_ok); // the dispatch ignores it
        CHECK(tlb.stl_le(page, 0xdeadbeef) == qomem::memtx_ok);
        CHECK(tlb.ldl_le(page, v) == qomem::memtx_ok);
        CHECK(v == before);
        CHECK(tlb.fills() == fills + 2); // each store missed (and refilled the entry)
    }
    CHECK(v == 0x11111111); // the alias shows the RAM's second page...
    CHECK(tlb.stl_le(0x2000, 0x01020304) == qomem::memtx_ok); // ...which is writable itself
    CHECK(tlb.ldl_le(0x9000, v) == qomem::memtx_ok);
    CHECK(v == 0x01020304);
}

TEST_CASE("tlb: a ROM device is read directly in ROMD mode, its writes go to the ops, and leaving "
          "ROMD mode sends reads to the ops from the next access",
          "[tlb]") {
    qomem_test::leak_check leaks;
    board b;
    regs<> ops;
    ops.reader = [](hwaddr, unsigned) { return std::uint64_t{0x5a5a5a5a}; };
    auto flash = qomem::make_rom_device(*b.dev, "flash", 0x1000, ops);
    std::memset(flash->host_ptr(), 0x77, 0x1000);
    b.sys->add_subregion(0, *flash);
    {
        qomem::address_space as(*b.sys, "memory");
        qomem::cpu_tlb tlb(as);
        qomem::rcu::read_guard g;
        std::uint32_t v = 0;
        CHECK(tlb.ldl_le(0x10, v) == qomem::memtx_ok);
        CHECK(v == 0x77777777);
        CHECK(tlb.stl_le(0x10, 0x1234) == qomem::memtx_ok);
        CHECK(ops.calls == strings{"w 0x10/4=0x1234"});
        flash->set_romd(false); // a commit: the next access sees it
        CHECK(tlb.ldl_le(0x10, v) == qomem::memtx_ok);
        CHECK(v == 0x5a5a5a5a);
        CHECK(ops.calls == strings{"w 0x10/4=0x1234", "r 0x10/4"});
        CHECK(tlb.flushes() >= 2); // the constructor's, and the one that commit caused
    }
    b.sys->del_subregion(*flash);
}

TEST_CASE("tlb: a commit by the writer is seen by the next access: a removed region answers a "
          "decode error, a moved one its new place",
          "[tlb]") {
    qomem_test::leak_check leaks;
    machine m;
    qomem::cpu_tlb tlb(*m.as);
    qomem::rcu::read_guard g;
    std::uint64_t v = 0;
    CHECK(tlb.ldq_le(0x1000, v) == qomem::memtx_ok);
    m.b.sys->del_subregion(*m.ram);
    v = 1;
    CHECK(tlb.ldq_le(0x1000, v) == qomem::memtx_decode_error);
    CHECK(v == 0);
    CHECK(tlb.stq_le(0x1000, 5) == qomem::memtx_decode_error);
    m.b.sys->add_subregion(0x20000, *m.ram);
    CHECK(tlb.ldq_le(0x20000, v) == qomem::memtx_ok);
    CHECK(v == 0x1010101010101010);
    CHECK(tlb.ldq_le(0x1000, v) == qomem::memtx_decode_error);
}

TEST_CASE("tlb: fetch and data have separate entries: a fetch does not fill a data entry, nor a "
          "load a fetch entry",
          "[tlb]") {
    qomem_test::leak_check leaks;
    machine m;
    qomem::cpu_tlb tlb(*m.as);
    qomem::rcu::read_guard g;
    std::uint32_t insn = 0, v = 0;
    CHECK(tlb.fetch<std::uint32_t, endianness::little>(0x1000, insn) == qomem::memtx_ok);
    CHECK(tlb.fetch<std::uint32_t, endianness::little>(0x1004, insn) == qomem::memtx_ok);
    CHECK(tlb.fills() == 1);
    CHECK(tlb.ldl_le(0x1000, v) == qomem::memtx_ok); // its own miss
    CHECK(tlb.fills() == 2);
    CHECK(tlb.fetch<std::uint32_t, endianness::little>(0x4000, insn) == qomem::memtx_ok); // ROM executes
    CHECK(insn == 0xeeeeeeee);
    CHECK(tlb.fills() == 3);
    // A hole: the fetch fails cleanly.
    CHECK(tlb.fetch<std::uint32_t, endianness::little>(0x30000, insn) == qomem::memtx_decode_error);
    CHECK(insn == 0);
}

TEST_CASE("tlb: stores to a dirty-logged region are never direct: switching logging on empties the "
          "TLB, and every store then marks its page",
          "[tlb][dirty]") {
    qomem_test::leak_check leaks;
    machine m;
    qomem::cpu_tlb tlb(*m.as);
    qomem::rcu::read_guard g;
    CHECK(tlb.stl_le(0x1000, 1) == qomem::memtx_ok); // fills a writable entry
    m.ram->set_dirty_log(true);
    CHECK(tlb.stl_le(0x1000, 2) == qomem::memtx_ok);
    CHECK(m.ram->test_and_clear_dirty(0, 0x1000));
    CHECK(tlb.stl_le(0x1004, 3) == qomem::memtx_ok); // still marked: not direct
    CHECK(m.ram->test_and_clear_dirty(0, 0x1000));
    CHECK_FALSE(m.ram->test_and_clear_dirty(0x1000, 0x1000));
    std::uint32_t v = 0;
    CHECK(tlb.ldl_le(0x1004, v) == qomem::memtx_ok); // loads stay direct
    CHECK(v == 3);
    m.ram->set_dirty_log(false);
}

TEST_CASE("tlb: an unaligned access, or one crossing a page into another region, is made by the "
          "dispatch and split there",
          "[tlb]") {
    qomem_test::leak_check leaks;
    machine m;
    qomem::cpu_tlb tlb(*m.as);
    qomem::rcu::read_guard g;
    CHECK(tlb.stq_le(0x1ffc, 0x8877665544332211) == qomem::memtx_ok); // two RAM pages
    std::uint8_t buf[8];
    CHECK(m.as->read(0x1ffc, buf, 8) == qomem::memtx_ok);
    CHECK(qomem_test::hex_bytes(buf, 8) == "11 22 33 44 55 66 77 88");
    std::uint64_t v = 0;
    CHECK(tlb.ldq_le(0x1ffd, v) == qomem::memtx_ok);
    CHECK(v == 0x1188776655443322);
    std::uint32_t w = 0;
    CHECK(tlb.ldl_le(0x2ffe, w) == qomem::memtx_decode_error); // half RAM, half hole
    CHECK(w == 0x00001111);
}

TEST_CASE("tlb: an access that misses outside an RCU read section is reported and changes nothing",
          "[tlb][misuse]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    machine m;
    qomem::cpu_tlb tlb(*m.as);
    std::uint32_t v = 7;
    CHECK_THROWS_AS(tlb.ldl_le(0x1000, v), qomem::assertion_failure);
    CHECK_THROWS_AS(tlb.stl_le(0x1000, 1), qomem::assertion_failure);
    CHECK(v == 7);
    CHECK(tlb.fills() == 0);
    qomem::rcu::read_guard g;
    CHECK(tlb.ldl_le(0x1000, v) == qomem::memtx_ok);
    CHECK(v == 0x10101010);
}

TEST_CASE("tlb: global dirty tracking (migration) is a commit: stores through a TLB filled before it go "
          "through the dispatch from the next access on and mark the migration bitmap, and direct again "
          "after it stops",
          "[tlb][dirty]") {
    qomem_test::leak_check leaks;
    machine m;
    qomem::cpu_tlb tlb(*m.as);
    qomem::rcu::read_guard g;
    using qomem::dirty_client;
    CHECK(tlb.stl_le(0x1000, 1) == qomem::memtx_ok); // a writable entry
    const auto fills = tlb.fills();
    CHECK(tlb.stl_le(0x1004, 1) == qomem::memtx_ok);
    CHECK(tlb.fills() == fills); // a hit: stored directly
    m.as->system().global_dirty_log_start(qomem::global_dirty::migration);
    CHECK(tlb.stl_le(0x1008, 2) == qomem::memtx_ok);
    CHECK(m.ram->test_and_clear_dirty(0, 0x1000, dirty_client::migration));
    CHECK(tlb.stl_le(0x1008, 3) == qomem::memtx_ok); // again: the entry was not made writable
    CHECK(m.ram->test_and_clear_dirty(0, 0x1000, dirty_client::migration));
    CHECK_FALSE(m.ram->get_dirty(0x1000, 0x1000, dirty_client::migration));
    // The address space's inline store obeys the same rule.
    CHECK(m.as->stl_le(0x2000, 4) == qomem::memtx_ok);
    CHECK(m.ram->test_and_clear_dirty(0x1000, 0x1000, dirty_client::migration));
    m.as->system().global_dirty_log_stop(qomem::global_dirty::migration);
    CHECK(tlb.stl_le(0x1008, 5) == qomem::memtx_ok);
    const auto after = tlb.fills();
    CHECK(tlb.stl_le(0x100c, 6) == qomem::memtx_ok);
    CHECK(tlb.fills() == after); // writable again: a hit
    std::uint32_t v = 0;
    CHECK(m.as->ldl_le(0x1008, v) == qomem::memtx_ok);
    CHECK(v == 5);
}

TEST_CASE("tlb: RAM over a file another process may shrink is never mapped: once the file is cut, loads, "
          "stores and fetches answer memtx_error instead of raising SIGBUS",
          "[tlb][shmem]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    const std::uint64_t page = qomem_test::host_page();
    constexpr hwaddr bar = 0xfe000000;
    qomem_test::shmem_rig r;
    auto& dev = r.add_device("fs", bar, 16 * page);
    qomem::virtio_shmem& shm = r.add_region(dev, 0, 16 * page);
    qomem_test::unique_fd f = qomem_test::pattern_memfd(2 * page, 4);
    shm.map(f.get(), 0, 0, 2 * page, qomem::shmem_flags::read_write);
    {
        qomem::cpu_tlb tlb(*r.as);
        qomem::rcu::read_guard g;
        std::uint64_t v = 0;
        CHECK(tlb.ldq_le(bar, v) == qomem::memtx_ok);
        CHECK(tlb.stq_le(bar + 8, 0x1234) == qomem::memtx_ok);
        CHECK(tlb.ldq_le(bar + 8, v) == qomem::memtx_ok);
        CHECK(v == 0x1234);
        CHECK(tlb.fills() == 0); // every access went through the guarded dispatch
        REQUIRE(::ftruncate(f.get(), 0) == 0);
        v = 7;
        CHECK(tlb.ldq_le(bar, v) == qomem::memtx_error);
        CHECK(v == 0);
        CHECK(tlb.stq_le(bar + page, 1) == qomem::memtx_error);
        std::uint32_t insn = 1;
        CHECK(tlb.fetch<std::uint32_t, endianness::little>(bar + 16, insn) == qomem::memtx_error);
        CHECK(insn == 0);
        CHECK(tlb.fills() == 0);
    }
    // The plain API and a region cache are guarded the same way.
    std::uint32_t w = 1;
    CHECK(r.as->ldl_le(bar, w) == qomem::memtx_error);
    qomem::memory_region_cache cache(*r.as, bar, 64, true);
    CHECK(cache.size() == 64);
    CHECK(cache.data() == nullptr); // no raw pointer into the file
    CHECK(cache.ldl_le(0, w) == qomem::memtx_error);
    CHECK(cache.stl_le(4, 9) == qomem::memtx_error);
}
