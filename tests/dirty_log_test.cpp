// tests/dirty_log_test.cpp — dirty logging as QEMU has it (dirty_log.hpp,
// memory_region.hpp): one bitmap per client, set_log counted per client,
// the mask (set_log clients plus migration while the system tracks
// globally), set_dirty / reset_dirty, snapshot_and_clear_dirty and its
// 64-page words, listeners' log_sync feeding the bitmap before a snapshot,
// and marks from several threads at once. The listener side of it (which
// callbacks, in which order) is in listener_test.cpp.
#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include <qomem/address_space.hpp>
#include <qomem/device.hpp>
#include <qomem/dirty_log.hpp>
#include <qomem/memory_listener.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/memory_system.hpp>

#include "test_support.hpp"

namespace {

using qomem::dirty_client;
using qomem::hwaddr;
using qomem_test::board;
using qomem_test::null_regs;
constexpr hwaddr page = qomem::dirty_page_size;

/// Which of the pages [0, n) of `mr` are dirty for `c`.
std::vector<hwaddr> dirty_pages(const qomem::memory_region& mr, hwaddr n, dirty_client c) {
    std::vector<hwaddr> out;
    for (hwaddr p = 0; p < n; ++p)
        if (mr.get_dirty(p * page, page, c)) out.push_back(p);
    return out;
}
using pages = std::vector<hwaddr>;

} // namespace

TEST_CASE("each client has its own bitmap: a guest write marks every client the region logs for, "
          "and one client's reset leaves the others' bits",
          "[dirty]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    board b;
    auto ram = qomem::make_ram(*b.dev, "ram", 0x10000);
    b.sys->add_subregion(0x100000, *ram);
    qomem::address_space as(*b.sys, "memory");
    ram->set_log(true, dirty_client::vga);
    ram->set_log(true, dirty_client::code);
    CHECK(ram->dirty_log_mask() == (qomem::dirty_mask_of(dirty_client::vga) | qomem::dirty_mask_of(dirty_client::code)));

    const std::array<std::uint8_t, 8> v{1, 2, 3, 4, 5, 6, 7, 8};
    REQUIRE(as.write(0x101ffc, v.data(), 8) == qomem::memtx_ok); // pages 1 and 2
    REQUIRE(as.write(0x10f000, v.data(), 1) == qomem::memtx_ok); // page 15
    CHECK(dirty_pages(*ram, 16, dirty_client::vga) == pages{1, 2, 15});
    CHECK(dirty_pages(*ram, 16, dirty_client::code) == pages{1, 2, 15});
    CHECK(dirty_pages(*ram, 16, dirty_client::migration).empty()); // not logged

    ram->reset_dirty(0x1000, 0x2000, dirty_client::vga);
    CHECK(dirty_pages(*ram, 16, dirty_client::vga) == pages{15});
    CHECK(dirty_pages(*ram, 16, dirty_client::code) == pages{1, 2, 15});
    CHECK(ram->test_and_clear_dirty(0xf000, 1, dirty_client::code));
    CHECK_FALSE(ram->test_and_clear_dirty(0xf000, 1, dirty_client::code));
    CHECK(ram->get_dirty(0xf000, 1, dirty_client::vga));

    SECTION("turning a client off stops recording but keeps its bits until they are reset") {
        ram->set_log(false, dirty_client::vga);
        REQUIRE(as.write(0x104000, v.data(), 8) == qomem::memtx_ok);
        CHECK(dirty_pages(*ram, 16, dirty_client::vga) == pages{15});     // old bit kept, no new one
        CHECK(dirty_pages(*ram, 16, dirty_client::code) == pages{1, 2, 4}); // still logging
        ram->set_log(true, dirty_client::vga);
    }
    SECTION("a DMA write mapping marks every logging client at unmap, access_len bytes only") {
        auto m = as.map(0x108000, 0x3000, true);
        REQUIRE(m.size() == 0x3000);
        std::memset(m.data(), 0xee, 0x1001);
        as.unmap(m, 0x1001);
        CHECK(dirty_pages(*ram, 16, dirty_client::vga) == pages{8, 9, 15});
        CHECK(dirty_pages(*ram, 16, dirty_client::code) == pages{1, 2, 8, 9});
    }
    ram->set_log(false, dirty_client::vga);
    ram->set_log(false, dirty_client::code);
}

TEST_CASE("set_dirty marks what a device wrote through host_ptr, for the clients the region logs "
          "for, dirty logging on MMIO or a RAM device is misuse",
          "[dirty]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    null_regs ops;
    board b;
    auto ram = qomem::make_ram(*b.dev, "ram", 0x4000);
    std::vector<std::byte> host(0x1000);
    auto ramd = qomem::make_ram_device(*b.dev, "ramd", 0x1000, host.data());
    auto io = qomem::make_io(*b.dev, "io", 0x100, ops);

    ram->set_dirty(0, 0x4000); // nothing logs: nothing recorded
    CHECK(dirty_pages(*ram, 4, dirty_client::vga).empty());
    ram->set_log(true, dirty_client::migration);
    std::memset(ram->host_ptr() + 0x2100, 1, 0x10);
    ram->set_dirty(0x2100, 0x10);
    CHECK(dirty_pages(*ram, 4, dirty_client::migration) == pages{2});
    CHECK(dirty_pages(*ram, 4, dirty_client::vga).empty());
    // Past the end: clipped, never out of bounds.
    ram->set_dirty(0x3fff, 0x10000);
    CHECK(dirty_pages(*ram, 4, dirty_client::migration) == pages{2, 3});
    ram->set_log(false, dirty_client::migration);

    CHECK_FALSE(io->logs_dirty());
    CHECK_FALSE(ramd->logs_dirty());
    CHECK_THROWS_AS(io->set_dirty(0, 1), qomem::assertion_failure);
    CHECK_THROWS_AS(ramd->set_log(true, dirty_client::vga), qomem::assertion_failure);
    CHECK_THROWS_AS(io->snapshot_and_clear_dirty(0, 1, dirty_client::vga), qomem::assertion_failure);
    CHECK(io->dirty_log_mask() == 0);
}

TEST_CASE("snapshot_and_clear_dirty copies and clears whole 64-page words around the range, as "
          "QEMU, the snapshot answers inside them, and asking outside is misuse",
          "[dirty]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    board b;
    auto fb = qomem::make_ram(*b.dev, "vram", 256 * page); // four words of bits
    fb->set_log(true, dirty_client::vga);
    for (hwaddr p : {1, 63, 64, 100, 127, 130, 200}) fb->set_dirty(p * page + 17, 1);

    const qomem::dirty_bitmap_snapshot snap = fb->snapshot_and_clear_dirty(65 * page, 10, dirty_client::vga);
    CHECK(snap.start() == 64 * page);
    CHECK(snap.end() == 128 * page);
    CHECK(snap.dirty_pages() == 3);
    CHECK(snap.get_dirty(64 * page, 1));
    CHECK_FALSE(fb->snapshot_get_dirty(snap, 65 * page, 0x1000));
    CHECK(fb->snapshot_get_dirty(snap, 99 * page + 0x800, 0x1000)); // scanline across 99..100
    CHECK(snap.get_dirty(127 * page + page - 1, 1));
    CHECK_THROWS_AS(snap.get_dirty(63 * page, 1), qomem::assertion_failure);
    CHECK_THROWS_AS(snap.get_dirty(127 * page, 2 * page), qomem::assertion_failure);
    // The whole word was cleared in the region; the others were not touched.
    CHECK(dirty_pages(*fb, 256, dirty_client::vga) == pages{1, 63, 130, 200});

    SECTION("a range at the end is cut at the region's end") {
        const auto tail = fb->snapshot_and_clear_dirty(250 * page, 6 * page, dirty_client::vga);
        CHECK(tail.start() == 192 * page);
        CHECK(tail.end() == 256 * page);
        CHECK(tail.get_dirty(200 * page, 1));
    }
    SECTION("another client's bits are not touched") {
        fb->set_log(true, dirty_client::migration);
        fb->set_dirty(64 * page, 1);
        (void)fb->snapshot_and_clear_dirty(64 * page, page, dirty_client::vga);
        CHECK(fb->get_dirty(64 * page, 1, dirty_client::migration));
        fb->set_log(false, dirty_client::migration);
    }
    SECTION("a range outside the region is misuse") {
        CHECK_THROWS_AS(fb->snapshot_and_clear_dirty(255 * page, 2 * page, dirty_client::vga),
                        qomem::assertion_failure);
    }
    fb->set_log(false, dirty_client::vga);
}

TEST_CASE("before a snapshot the listeners' log_sync brings their own log into the bitmap (a "
          "back-end's writes the guest-access path never saw)",
          "[dirty][listener]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    board b;
    auto ram = qomem::make_ram(*b.dev, "ram", 0x8000);
    b.sys->add_subregion(0x10000, *ram);
    qomem::address_space as(*b.sys, "memory");
    struct backend_log : qomem::memory_listener {
        std::vector<hwaddr> written; // guest addresses a back-end wrote
        int after = 0;
        void log_sync(const qomem::memory_section& s) override {
            for (hwaddr a : written)
                if (a >= s.offset_within_address_space && a - s.offset_within_address_space < s.size)
                    s.mr->set_dirty(s.offset_within_region + (a - s.offset_within_address_space), 1);
            written.clear();
        }
        void log_global_after_sync() override { ++after; }
    } l;
    as.add_listener(l);
    ram->set_log(true, dirty_client::vga);
    l.written = {0x12000, 0x15fff};
    CHECK_FALSE(ram->get_dirty(0, 0x8000, dirty_client::vga)); // not synced yet
    const auto snap = ram->snapshot_and_clear_dirty(0, 0x8000, dirty_client::vga);
    CHECK(snap.get_dirty(0x2000, 1));
    CHECK(snap.get_dirty(0x5000, 0x1000));
    CHECK(snap.dirty_pages() == 2);
    CHECK(l.after == 1);
    CHECK_FALSE(ram->get_dirty(0, 0x8000, dirty_client::vga)); // taken by the snapshot
    ram->set_log(false, dirty_client::vga);
    as.remove_listener(l);
}

TEST_CASE("global tracking: while a system tracks, writes to every RAM region of it mark the "
          "migration client (regions added meanwhile too), and nothing after it stops",
          "[dirty][global]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    board b;
    auto sys = qomem::memory_system::make();
    auto ram = qomem::make_ram(*b.dev, "ram", 0x4000);
    auto rom = qomem::make_rom(*b.dev, "rom", 0x1000);
    auto late = qomem::make_ram(*b.dev, "late", 0x1000);
    auto elsewhere = qomem::make_ram(*b.dev, "elsewhere", 0x1000); // in no system
    b.sys->add_subregion(0x0, *ram);
    b.sys->add_subregion(0x8000, *rom);
    qomem::address_space as(*sys, *b.sys, "memory");
    const std::uint32_t v = 0xdeadbeef;

    sys->global_dirty_log_start(qomem::global_dirty::migration);
    CHECK(ram->is_logging(dirty_client::migration));
    CHECK(rom->is_logging(dirty_client::migration));
    CHECK_FALSE(ram->is_logging(dirty_client::vga));
    CHECK_FALSE(elsewhere->is_logging(dirty_client::migration)); // belongs to no system
    REQUIRE(as.write(0x2004, &v, 4) == qomem::memtx_ok);
    CHECK(dirty_pages(*ram, 4, dirty_client::migration) == pages{2});
    CHECK(dirty_pages(*ram, 4, dirty_client::vga).empty());
    REQUIRE(as.write_rom(0x8000, &v, 4) == qomem::memtx_ok); // a loader writing ROM
    CHECK(rom->get_dirty(0, 4, dirty_client::migration));

    b.sys->add_subregion(0x10000, *late); // joins the system while it tracks
    CHECK(late->is_logging(dirty_client::migration));
    REQUIRE(as.write(0x10000, &v, 4) == qomem::memtx_ok);
    CHECK(late->get_dirty(0, 4, dirty_client::migration));

    sys->global_dirty_log_stop(qomem::global_dirty::migration);
    ram->reset_dirty(0, 0x4000, dirty_client::migration);
    REQUIRE(as.write(0x1000, &v, 4) == qomem::memtx_ok);
    CHECK(dirty_pages(*ram, 4, dirty_client::migration).empty());
}

TEST_CASE("marks from several threads at once lose no page, and a reset racing them loses "
          "only what it reports",
          "[dirty][threads]") {
    qomem_test::leak_check leaks;
    board b;
    auto ram = qomem::make_ram(*b.dev, "ram", 1024 * page);
    ram->set_log(true, dirty_client::migration);
    constexpr unsigned threads = 4;
    {
        std::vector<std::jthread> ts;
        for (unsigned t = 0; t < threads; ++t)
            ts.emplace_back([&, t] {
                // Interleaved pages: every 64-page word is shared by all threads.
                for (hwaddr p = t; p < 1024; p += threads) ram->mark_dirty(p * page, 1);
            });
    }
    CHECK(dirty_pages(*ram, 1024, dirty_client::migration).size() == 1024);

    // Now a reader takes bits while writers set them again: every page is
    // either reported taken or still dirty at the end, never lost.
    ram->reset_dirty(0, 1024 * page, dirty_client::migration);
    std::atomic<bool> done{false};
    std::vector<bool> taken(1024);
    {
        std::jthread reader([&] {
            while (!done.load())
                for (hwaddr p = 0; p < 1024; ++p)
                    if (ram->test_and_clear_dirty(p * page, 1, dirty_client::migration)) taken[p] = true;
        });
        std::vector<std::jthread> ts;
        for (unsigned t = 0; t < threads; ++t)
            ts.emplace_back([&, t] {
                for (hwaddr p = t; p < 1024; p += threads) ram->mark_dirty(p * page, 1);
            });
        ts.clear();
        done.store(true);
    }
    for (hwaddr p = 0; p < 1024; ++p) {
        INFO("page " << p);
        CHECK((taken[p] || ram->get_dirty(p * page, 1, dirty_client::migration)));
    }
    ram->set_log(false, dirty_client::migration);
}
