// memory_region_cache (QEMU's MemoryRegionCache): a translation made once and
// used by offset, holding its region; direct over RAM, dispatched over MMIO.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include <qomem/address_space.hpp>
#include <qomem/device.hpp>
#include <qomem/machine.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/memory_region_cache.hpp>

#include "test_support.hpp"

namespace {

using qomem::hwaddr;
using strings = std::vector<std::string>;
using qomem_test::board;

} // namespace

TEST_CASE("region cache over RAM: reads and writes by offset through a host pointer, marks "
          "written pages dirty, and answers a decode error past what it cached",
          "[region_cache]") {
    qomem_test::leak_check leaks;
    board b;
    auto ram = qomem::make_ram(*b.dev, "ram", 0x4000);
    b.sys->add_subregion(0x10000, *ram);
    qomem::address_space as(*b.sys, "memory");
    ram->set_dirty_log(true);
    {
        qomem::memory_region_cache c;
        CHECK(c.init(as, 0x11000, 0x100, true) == 0x100);
        CHECK(c.region() == ram.get());
        CHECK(c.addr() == 0x11000);
        REQUIRE(c.data() == ram->host_ptr() + 0x1000);
        CHECK(c.stl_le(0x10, 0xcafef00d) == qomem::memtx_ok);
        CHECK(ram->test_and_clear_dirty(0x1000, 0x1000));
        std::uint32_t v = 0;
        CHECK(as.ldl_le(0x11010, v) == qomem::memtx_ok);
        CHECK(v == 0xcafef00d);
        std::uint16_t w = 0;
        CHECK(c.lduw_be(0x12, w) == qomem::memtx_ok);
        CHECK(w == 0xfeca);
        std::memset(c.data() + 0x20, 0x7e, 4); // a device writing through the pointer...
        CHECK_FALSE(ram->test_and_clear_dirty(0x1000, 0x1000));
        c.invalidate(0x20, 4); // ...says so
        CHECK(ram->test_and_clear_dirty(0x1000, 0x1000));
        std::uint64_t q = 9;
        CHECK(c.ldq_le(0xfc, q) == qomem::memtx_decode_error); // past the 0x100 cached
        CHECK(q == 0);
        CHECK(c.stb(0x100, 1) == qomem::memtx_decode_error);
        std::uint8_t buf[4];
        CHECK(c.read(0x20, buf, 4) == qomem::memtx_ok);
        CHECK(qomem_test::hex_bytes(buf, 4) == "7e 7e 7e 7e");
    }
    ram->set_dirty_log(false);
    b.sys->del_subregion(*ram);
}

TEST_CASE("region cache: init clips to the region (a direct cache extends over contiguous ranges "
          "of it), gives 0 over a hole, and a cache over MMIO never spans two ranges",
          "[region_cache]") {
    qomem_test::leak_check leaks;
    board b;
    qomem_test::null_regs ops;
    auto ram = qomem::make_ram(*b.dev, "ram", 0x3000);
    auto overlay = qomem::make_ram(*b.dev, "overlay", 0x10);
    auto io = qomem::make_io(*b.dev, "io", 0x20, ops);
    auto io2 = qomem::make_io(*b.dev, "io2", 0x20, ops);
    b.sys->add_subregion(0x0, *ram);
    b.sys->add_subregion(0x1000, *overlay, 1); // splits the RAM's ranges
    b.sys->add_subregion(0x8000, *io);
    b.sys->add_subregion(0x8020, *io2);
    qomem::address_space as(*b.sys, "memory");
    qomem::memory_region_cache c;
    CHECK(c.init(as, 0x800, 0x10000, false) == 0x800); // RAM up to the overlay
    CHECK(c.init(as, 0x1010, 0x10000, false) == 0x1ff0); // RAM after it, to its end
    CHECK(c.init(as, 0x4000, 0x10, false) == 0);         // a hole
    CHECK(c.region() == nullptr);
    std::uint8_t x = 1;
    CHECK(c.ldub(0, x) == qomem::memtx_decode_error);
    CHECK(c.init(as, 0x8010, 0x100, false) == 0x10); // MMIO: to the end of its range
    CHECK(c.region() == io.get());
    CHECK(c.data() == nullptr);
    for (auto* r : {ram.get(), overlay.get(), io.get(), io2.get()}) b.sys->del_subregion(*r);
}

TEST_CASE("region cache over MMIO: every access reaches the cached region's ops, a typed one as "
          "one access of its size",
          "[region_cache][mmio]") {
    qomem_test::leak_check leaks;
    board b;
    qomem_test::recording_regs<qomem::access_limits{.min_access_size = 1, .max_access_size = 4}> ops;
    ops.reader = [](hwaddr off, unsigned size) { return qomem_test::offset_bytes(off, size); };
    auto io = qomem::make_io(*b.dev, "io", 0x100, ops);
    b.sys->add_subregion(0x8000, *io);
    qomem::address_space as(*b.sys, "memory");
    qomem::memory_region_cache c(as, 0x8040, 0x40, true);
    REQUIRE(c.size() == 0x40);
    std::uint32_t v = 0;
    CHECK(c.ldl_le(0x4, v) == qomem::memtx_ok);
    CHECK(v == 0x47464544);
    CHECK(c.stw_be(0x8, 0x1234) == qomem::memtx_ok);
    std::uint64_t q = 0;
    CHECK(c.ldq_le(0x10, q) == qomem::memtx_decode_error); // 8 bytes: above valid.max, refused whole
    std::uint8_t buf[8];
    CHECK(c.read(0x10, buf, 8) == qomem::memtx_ok); // a byte read is split
    CHECK(ops.calls == strings{"r 0x44/4", "w 0x48/2=0x3412", "r 0x50/4", "r 0x54/4"});
    c.destroy();
    b.sys->del_subregion(*io);
}

TEST_CASE("region cache: a cache over ROM initialised for writing reads directly and ignores "
          "writes",
          "[region_cache]") {
    qomem_test::leak_check leaks;
    board b;
    auto rom = qomem::make_rom(*b.dev, "rom", 0x1000);
    std::memset(rom->host_ptr(), 0x99, 0x1000);
    b.sys->add_subregion(0, *rom);
    qomem::address_space as(*b.sys, "memory");
    qomem::memory_region_cache c(as, 0, 0x1000, true);
    CHECK(c.size() == 0x1000);
    CHECK(c.stl_le(0, 0) == qomem::memtx_ok);
    std::uint32_t v = 0;
    CHECK(c.ldl_le(0, v) == qomem::memtx_ok);
    CHECK(v == 0x99999999);
    c.destroy();
    b.sys->del_subregion(*rom);
}

TEST_CASE("region cache: it holds its region: an unplugged device's RAM stays valid until the "
          "cache is destroyed, and then the device is finalized",
          "[region_cache][lifetime]") {
    qomem_test::leak_check leaks;
    qomem_test::event_recorder events;
    auto root = qomem::container::make_root();
    qomem::machine& m = qomem::add_machine(*root);
    auto sys = qomem::make_container(nullptr, "system", qomem::u128_2_64);
    auto dev = qomem::make<qomem::device>();
    m.peripheral().add_child("nic", *dev);
    events.label(*dev, "nic");
    auto ram = qomem::make_ram(*dev, "nic-ram", 0x1000);
    std::memset(ram->host_ptr(), 0x3c, 0x1000);
    sys->add_subregion(0x1000, *ram);
    std::optional<qomem::address_space> as;
    as.emplace(m.memory(), *sys, "memory");
    qomem::memory_region_cache c(*as, 0x1000, 0x1000, false);
    ram.reset();
    sys->del_subregion(*c.region());
    qomem::unparent(*dev);
    dev.reset();
    m.memory().synchronize();
    CHECK(qomem_test::only(events.take(), "finalizing ").empty()); // the cache holds it
    std::uint32_t v = 0;
    CHECK(c.ldl_le(0x10, v) == qomem::memtx_ok);
    CHECK(v == 0x3c3c3c3c);
    qomem::memory_region_cache moved = std::move(c);
    CHECK(c.region() == nullptr);
    CHECK(moved.ldl_le(0x20, v) == qomem::memtx_ok);
    moved.destroy();
    m.memory().synchronize();
    CHECK(qomem_test::only(events.take(), "finalizing ") == strings{"finalizing memory-region", "finalizing nic"});
    as.reset();
    sys.reset();
}

TEST_CASE("region cache: freeing an ownerless region while it is cached is reported",
          "[region_cache][misuse]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    auto sys = qomem::make_container(nullptr, "system", qomem::u128_2_64);
    auto ram = qomem::make_ram(nullptr, "ram", 0x1000);
    sys->add_subregion(0, *ram);
    {
        qomem::address_space as(*sys, "memory");
        qomem::memory_region_cache c(as, 0, 0x100, false);
        sys->del_subregion(*ram);
        // Dropped by hand: an assertion must never leave ref_ptr's destructor.
        qomem::memory_region* raw = ram.detach();
        CHECK_THROWS_AS(raw->unref(), qomem::assertion_failure);
        ram = qomem::ref_ptr<qomem::memory_region>(raw, /*add_ref=*/false); // still ours
        std::uint8_t b = 0;
        CHECK(c.ldub(0, b) == qomem::memtx_ok); // and still cached
        c.destroy();
    }
    ram.reset();
    qomem::memory_synchronize();
}
