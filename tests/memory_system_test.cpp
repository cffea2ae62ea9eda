// tests/memory_system_test.cpp — memory systems: several machines in one
// process, each changed and read by its own threads; regions belong to one
// system for life and cannot be connected across two; the writer role and
// who finalizes a region released on another thread; ownerless regions freed
// while a reader may still see them.
//
// Also run under ThreadSanitizer by `make test-tsan`. Threads other than the
// test's own record what they saw and the test checks it after joining them
// (Catch2 v2 assertions are not thread-safe).
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/core.h>

#include <qomem/address_space.hpp>
#include <qomem/assert.hpp>
#include <qomem/device.hpp>
#include <qomem/fixture.hpp>
#include <qomem/machine.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/memory_system.hpp>
#include <qomem/object.hpp>
#include <qomem/rcu.hpp>

#include "test_support.hpp"

using qomem::hwaddr;
using namespace std::chrono_literals;

namespace {

#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
constexpr int rounds = 300;
#else
constexpr int rounds = 2000;
#endif

std::filesystem::path fixture_path(const char* machine) {
    return std::filesystem::path(QOMEM_TEST_DATA_DIR) / "conformance" / "qemu-7.2" / machine /
           "fixture.json";
}

qomem::address_space& space_named(const qomem::fixture_machine& m, std::string_view name) {
    const qomem::address_space* found = nullptr;
    for (const qomem::address_space* as : m.spaces())
        if (as->name() == name) found = as;
    REQUIRE(found);
    return const_cast<qomem::address_space&>(*found);
}

/// What a thread other than the test's saw go wrong (first message kept).
struct failures {
    std::mutex mutex;
    std::vector<std::string> messages;
    void add(std::string m) {
        std::lock_guard g(mutex);
        if (messages.size() < 5) messages.push_back(std::move(m));
    }
};

/// A guest address where `as` shows nothing (checked, not assumed).
hwaddr hole_of(qomem::address_space& as) {
    const auto v = as.view();
    for (hwaddr a = hwaddr(1) << 48; a < hwaddr(1) << 56; a += hwaddr(1) << 48)
        if (!v->lookup(a) && !v->lookup(a + 0x1fff)) return a;
    FAIL("no hole in " << as.name());
    return 0;
}

/// A RAM address of `as` (its first plain RAM range).
hwaddr ram_of(qomem::address_space& as) {
    for (const qomem::flat_range& r : as.view()->ranges())
        if (r.mr->is_plain_ram() && !r.readonly && r.size >= 0x2000) return r.start;
    FAIL("no RAM in " << as.name());
    return 0;
}

/// One machine's workload: a writer thread adding, moving, disabling and
/// removing a probe region in its own system; a reader thread reading,
/// writing, mapping and finding through the same machine at the same time.
struct machine_load {
    qomem::fixture_machine& m;
    qomem::address_space& as;
    qomem::ref_ptr<qomem::device> owner = qomem::make<qomem::device>();
    qomem::ref_ptr<qomem::memory_region> probe;
    hwaddr hole;
    hwaddr ram;
    std::uint8_t tag;
    failures& fails;
    std::atomic<bool> writer_done{false};

    machine_load(qomem::fixture_machine& machine, std::string_view space, std::uint8_t t, failures& f)
        : m(machine), as(space_named(machine, space)),
          hole(hole_of(as)), ram(ram_of(as)), tag(t), fails(f) {
        probe = qomem::make_ram(*owner, "probe", 0x2000);
        std::memset(probe->host_ptr(), tag, 0x2000);
    }

    void writer() {
        qomem::memory_region& root = as.root();
        for (int i = 0; i < rounds; ++i) {
            root.add_subregion(hole, *probe, 100);
            if (i % 3 == 0) probe->set_address(hole + 0x1000 * hwaddr(i % 2));
            if (i % 5 == 0) {
                probe->set_enabled(false);
                probe->set_enabled(true);
            }
            {
                qomem::memory_transaction tx(m.memory()); // two changes, one commit
                probe->set_address(hole);
                probe->set_enabled(true);
            }
            root.del_subregion(*probe);
        }
        writer_done.store(true);
    }

    void reader() {
        std::uint64_t seen = 0;
        const std::uint64_t mine = 0x0101010101010101ull * tag;
        while (!writer_done.load()) {
            // The probe's address shows the probe (this machine's tag) or nothing.
            std::uint64_t v = ~0ull;
            const qomem::memtx_result r = as.read(hole, &v, 8);
            if (!((r == qomem::memtx_ok && v == mine) || (r == qomem::memtx_decode_error && v == 0)))
                fails.add(fmt::format("machine {}: read at {:#x} gave {:#x} (result {})", tag, hole,
                                      v, static_cast<unsigned>(r)));
            // RAM keeps what this reader wrote (no other machine touches it).
            const std::uint64_t w = mine ^ ++seen;
            as.write(ram, &w, 8);
            std::uint64_t back = 0;
            as.read(ram, &back, 8);
            if (back != w) fails.add(fmt::format("machine {}: RAM gave {:#x}, wrote {:#x}", tag, back, w));
            // DMA and find hold what they found, whatever the writer does.
            if (qomem::dma_mapping d = as.map(hole, 8, false); d) {
                std::uint64_t x;
                std::memcpy(&x, d.data(), 8);
                if (x != mine) fails.add(fmt::format("machine {}: DMA read {:#x}", tag, x));
            }
            if (qomem::found_section s = as.find(hole, 8); s && s.mr != probe.get())
                fails.add(fmt::format("machine {}: find gave '{}'", tag, s.mr->region_name()));
        }
    }
};

} // namespace

TEST_CASE("memory systems: two machines loaded from two fixtures are changed and read by their "
          "own threads at the same time, each seeing only its own changes",
          "[memory_system][threads]") {
    qomem_test::leak_check leaks;
    failures fails;
    {
        auto pc = qomem::fixture_machine::load(fixture_path("pc"));
        auto arm = qomem::fixture_machine::load(fixture_path("virt-arm"));
        REQUIRE(&pc->memory() != &arm->memory());
        {
            machine_load a(*pc, "memory", 0xa1, fails);
            machine_load b(*arm, "memory", 0xb2, fails);
            {
                std::jthread wa([&] { a.writer(); });
                std::jthread ra([&] { a.reader(); });
                std::jthread wb([&] { b.writer(); });
                std::jthread rb([&] { b.reader(); });
            }
            // Each probe joined its machine's system when first placed, for life.
            CHECK(a.probe->system() == &pc->memory());
            CHECK(b.probe->system() == &arm->memory());
        }
        pc->memory().synchronize();
        arm->memory().synchronize();
    }
    std::lock_guard g(fails.mutex);
    CHECK(fails.messages == std::vector<std::string>{});
}

TEST_CASE("memory systems: connecting regions of two systems is misuse, reported naming both "
          "before anything changes",
          "[memory_system][misuse]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    auto a = qomem::memory_system::make();
    auto b = qomem::memory_system::make();
    qomem_test::board ba, bb;
    auto ram_b = qomem::make_ram(*bb.dev, "ram-b", 0x1000);
    bb.sys->add_subregion(0, *ram_b);
    {
        qomem::address_space as_a(*a, *ba.sys, "a");
        qomem::address_space as_b(*b, *bb.sys, "b");
        REQUIRE(ba.sys->system() == a.get());
        REQUIRE(ram_b->system() == b.get());
        const auto ram_b_refs = ram_b->ref_count();

        SECTION("a subregion of one system into a container of another") {
            auto loose = qomem::make_ram(*bb.dev, "loose", 0x1000);
            bb.sys->add_subregion(0x1000, *loose);
            bb.sys->del_subregion(*loose); // loose belongs to b for life
            REQUIRE(loose->system() == b.get());
            try {
                ba.sys->add_subregion(0x2000, *loose);
                FAIL("no assertion");
            } catch (const qomem::assertion_failure& e) {
                const std::string what = e.what();
                CHECK(what.find("'loose'") != std::string::npos);
                CHECK(what.find("'system'") != std::string::npos);
                CHECK(what.find(fmt::format("{}", static_cast<const void*>(a.get()))) != std::string::npos);
                CHECK(what.find(fmt::format("{}", static_cast<const void*>(b.get()))) != std::string::npos);
            }
            CHECK(loose->container() == nullptr);
            CHECK(ba.sys->subregion_count() == 0);
            CHECK(as_a.view()->ranges().empty());
        }
        SECTION("a region of one system as the root of another system's address space") {
            CHECK_THROWS_AS(qomem::address_space(*a, *bb.sys, "stray"), qomem::assertion_failure);
            CHECK(a->address_space_count() == 1);
            CHECK(ram_b->ref_count() == ram_b_refs);
        }
        SECTION("an alias of one system's region into another system") {
            auto alias = qomem::make_alias(*ba.dev, "alias-of-b", *ram_b, 0, 0x1000);
            CHECK(alias->system() == b.get()); // joined its target's system at once
            CHECK_THROWS_AS(ba.sys->add_subregion(0, *alias), qomem::assertion_failure);
            CHECK(alias->container() == nullptr);
            ba.dev->delete_property("alias-of-b[0]");
        }
        SECTION("an unplaced subtree joins the system of the container it is added to, whole") {
            auto box = qomem::make_container(*ba.dev, "box", 0x10000);
            auto inner = qomem::make_ram(*ba.dev, "inner", 0x1000);
            box->add_subregion(0, *inner);
            CHECK(box->system() == nullptr);
            CHECK(inner->system() == nullptr);
            ba.sys->add_subregion(0x10000, *box);
            CHECK(box->system() == a.get());
            CHECK(inner->system() == a.get());
            std::uint8_t x = 7;
            REQUIRE(as_a.write(0x10000, &x, 1) == qomem::memtx_ok);
            ba.sys->del_subregion(*box);
        }
        bb.sys->del_subregion(*ram_b);
    }
}

TEST_CASE("memory systems: a transaction of one system does not hold back another's commits",
          "[memory_system]") {
    qomem_test::leak_check leaks;
    auto a = qomem::memory_system::make();
    auto b = qomem::memory_system::make();
    qomem_test::board ba, bb;
    qomem::address_space as_a(*a, *ba.sys, "a");
    qomem::address_space as_b(*b, *bb.sys, "b");
    auto ram_a = qomem::make_ram(*ba.dev, "ram-a", 0x1000);
    auto ram_b = qomem::make_ram(*bb.dev, "ram-b", 0x1000);
    {
        qomem::memory_transaction tx(*a);
        ba.sys->add_subregion(0, *ram_a);
        bb.sys->add_subregion(0, *ram_b);
        CHECK(as_a.view()->ranges().empty());      // pending until the commit
        CHECK(as_b.view()->ranges().size() == 1);  // committed at once
        CHECK(a->transaction_depth() == 1);
        CHECK(b->transaction_depth() == 0);
    }
    CHECK(as_a.view()->ranges().size() == 1);
    ba.sys->del_subregion(*ram_a);
    bb.sys->del_subregion(*ram_b);
}

TEST_CASE("memory systems: a thousand systems made, used and destroyed leave nothing alive",
          "[memory_system]") {
    qomem_test::leak_check leaks;
    for (int i = 0; i < 1000; ++i) {
        auto sys = qomem::memory_system::make();
        qomem_test::board b;
        auto ram = qomem::make_ram(*b.dev, "ram", 0x1000);
        b.sys->add_subregion(0, *ram);
        qomem::address_space as(*sys, *b.sys, "memory");
        const std::uint32_t w = 0x1000u + static_cast<std::uint32_t>(i);
        std::uint32_t r = 0;
        REQUIRE(as.write(0x10, &w, 4) == qomem::memtx_ok);
        REQUIRE(as.read(0x10, &r, 4) == qomem::memtx_ok);
        REQUIRE(r == w);
        REQUIRE(sys->region_count() == 2);
        b.sys->del_subregion(*ram);
    }
    CHECK(qomem_test::live_count("memory-system") == 0);
}

TEST_CASE("memory systems: a system lives as long as a region of it does, after its last handle "
          "and its machine are gone",
          "[memory_system][lifetime]") {
    qomem_test::leak_check leaks;
    auto dev = qomem::make<qomem::device>();
    qomem::region_ref held;
    {
        auto sys = qomem::memory_system::make();
        auto root = qomem::make_container(*dev, "root", 0x10000);
        auto ram = qomem::make_ram(*dev, "ram", 0x1000);
        root->add_subregion(0, *ram);
        {
            qomem::address_space as(*sys, *root, "memory");
        }
        held = qomem::region_ref(*ram);
        root->del_subregion(*ram);
        dev->delete_property("root[0]");
    }
    // The handle is gone; the region still belongs to its system, which is alive.
    CHECK(qomem_test::live_count("memory-system") == 1);
    REQUIRE(held->system() != nullptr);
    held->set_enabled(false); // takes the writer role of a live system
    dev->delete_property("ram[0]"); // ram now holds dev
    dev.reset();
    CHECK(qomem_test::live_count("device") == 1);
    held.reset(); // ram, then dev, then the system
    CHECK(qomem_test::live_count("memory-system") == 0);
}

TEST_CASE("memory systems: a last reference dropped on another thread while the writer role is "
          "held is finalized by the holder when it gives the role back, and with no holder at once "
          "by the dropping thread",
          "[memory_system][threads][lifetime]") {
    qomem_test::leak_check leaks;
    qomem_test::event_recorder rec;
    auto sys = qomem::memory_system::make();
    qomem_test::board b;
    auto ram = qomem::make_ram(*b.dev, "ram", 0x1000);
    rec.label(*ram, "ram");
    b.sys->add_subregion(0, *ram);
    qomem::address_space as(*sys, *b.sys, "memory");
    qomem::memory_region* r = ram.get();
    ram.reset();
    qomem::dma_mapping m = as.map(0, 0x1000, true);
    REQUIRE(m);
    b.sys->del_subregion(*r);
    b.dev->delete_property("ram[0]"); // unparented: the mapping is the last holder
    REQUIRE(r->ref_count() == 1);

    std::atomic<std::thread::id> finalized_on{};
    struct on_finalize : qomem::lifetime_observer {
        std::atomic<std::thread::id>* out;
        void finalizing(const qomem::object& o) noexcept override {
            if (o.type().name == "memory-region") out->store(std::this_thread::get_id());
        }
    } obs;
    obs.out = &finalized_on;
    qomem::lifetime_observer* previous = qomem::set_lifetime_observer(&obs);

    SECTION("the role is held: handed over") {
        {
            std::lock_guard writer(*sys);
            std::thread([&] { as.unmap(m, 0); }).join();
            CHECK(finalized_on.load() == std::thread::id{}); // not while we hold the role
            CHECK(qomem_test::live_count("memory-region") == 2);
        }
        CHECK(finalized_on.load() == std::this_thread::get_id());
    }
    SECTION("nobody holds it: the dropping thread finalizes") {
        std::thread::id dropper;
        std::thread([&] {
            dropper = std::this_thread::get_id();
            as.unmap(m, 0);
        }).join();
        CHECK(finalized_on.load() == dropper);
    }
    qomem::set_lifetime_observer(previous);
    CHECK(qomem_test::live_count("memory-region") == 1); // only b.sys
}

TEST_CASE("memory systems: an ownerless region freed while a reader is inside a read section "
          "showing it is finalized only after the reader left",
          "[memory_system][threads][lifetime]") {
    qomem_test::leak_check leaks;
    auto sys = qomem::memory_system::make();
    qomem_test::board b;
    auto orphan = qomem::make_ram(nullptr, "orphan", 0x1000);
    std::memset(orphan->host_ptr(), 0x3c, 0x1000);
    b.sys->add_subregion(0, *orphan);
    qomem::address_space as(*sys, *b.sys, "memory");

    std::atomic<int> stage{0};
    std::atomic<std::uint64_t> seen{0};
    std::jthread reader([&] {
        qomem::rcu::read_guard g;
        const qomem::flat_range* fr = as.current()->lookup(0x10);
        stage.store(1);
        while (stage.load() != 2) std::this_thread::sleep_for(1ms);
        // The region was removed and its handle dropped: the view this
        // section holds still shows it, and its memory is still there.
        std::uint64_t v = 0;
        std::memcpy(&v, fr->host_at(0x10), 8);
        seen.store(v);
    });
    while (stage.load() != 1) std::this_thread::sleep_for(1ms);
    b.sys->del_subregion(*orphan);
    orphan.reset(); // misuse checks pass; finalization waits for the reader
    CHECK(qomem_test::live_count("memory-region") == 2);
    stage.store(2);
    reader.join();
    CHECK(seen.load() == 0x3c3c3c3c3c3c3c3cull);
    sys->synchronize();
    CHECK(qomem_test::live_count("memory-region") == 1);
}

TEST_CASE("memory systems: an MMIO handler that frees an ownerless RAM region in the middle of an "
          "access leaves the rest of that access reading live memory",
          "[memory_system][lifetime]") {
    qomem_test::leak_check leaks;
    auto sys = qomem::memory_system::make();
    qomem_test::board b;
    struct remover {
        qomem::memory_region* container = nullptr;
        qomem::ref_ptr<qomem::memory_region> victim;
        std::uint64_t read(hwaddr, unsigned) {
            if (victim) {
                // Inside the access's read section: remove and free it now.
                container->del_subregion(*victim);
                victim.reset();
            }
            return 0x11;
        }
        void write(hwaddr, std::uint64_t, unsigned) {}
    } regs;
    auto io = qomem::make_io(*b.dev, "remover", 0x8, regs);
    auto orphan = qomem::make_ram(nullptr, "orphan", 0x1000);
    std::memset(orphan->host_ptr(), 0x22, 0x1000);
    b.sys->add_subregion(0x0, *io);
    b.sys->add_subregion(0x8, *orphan);
    qomem::address_space as(*sys, *b.sys, "memory");
    regs.container = b.sys.get();
    regs.victim = std::move(orphan);

    // 8 bytes of MMIO (1 byte each, the default maximum being 4: 2 calls),
    // then 8 bytes of the RAM that the first call removed and freed.
    std::array<std::uint8_t, 16> buf{};
    as.read(0x0, buf.data(), buf.size());
    CHECK(qomem_test::hex_bytes(buf.data() + 8, 8) == "22 22 22 22 22 22 22 22");
    CHECK(qomem_test::live_count("memory-region") == 3); // sys, remover, and orphan until a grace period
    sys->synchronize();
    CHECK(qomem_test::live_count("memory-region") == 2);
    std::uint8_t after = 0xff;
    CHECK(as.read(0x8, &after, 1) == qomem::memtx_decode_error);
}

TEST_CASE("memory systems: an old view whose release drops an ownerless region's last handle "
          "finishes its release, and so does a later view showing that region, before the region "
          "is finalized",
          "[memory_system][lifetime]") {
    // Under ASan, what this pins shows as a heap-use-after-free: a view's
    // release unrefs each of its ranges' regions, the ownerless ones too.
    qomem_test::leak_check leaks;
    auto sys = qomem::memory_system::make();
    qomem_test::board b;
    auto counted = qomem::make_ram(*b.dev, "counted", 0x1000);
    auto orphan = qomem::make_ram(nullptr, "orphan", 0x1000);
    b.sys->add_subregion(0x0, *counted);
    b.sys->add_subregion(0x1000, *orphan);
    qomem::address_space as(*sys, *b.sys, "memory");

    // When 'counted' is finalized, the orphan's last handle goes with it (as
    // a device finalized after its region would drop an ownerless region it
    // kept). Records the order of finalizations.
    struct drop_on_finalize : qomem::lifetime_observer {
        const qomem::object* trigger = nullptr;
        qomem::ref_ptr<qomem::memory_region> held;
        std::vector<std::string> finalized;
        void finalizing(const qomem::object& o) noexcept override {
            if (o.type().name != "memory-region") return;
            finalized.push_back(static_cast<const qomem::memory_region&>(o).region_name());
            if (&o == trigger) held.reset();
        }
    } obs;
    obs.trigger = counted.get();

    {
        // Both old views wait for this section: the first shows 'counted'
        // and the orphan, the second the orphan alone.
        qomem::rcu::read_guard g;
        b.sys->del_subregion(*counted);
        b.dev->delete_property("counted[0]");
        counted.reset(); // its last reference is the first old view's
        b.sys->del_subregion(*orphan);
        obs.held = std::move(orphan); // the orphan's last handle
    }
    qomem::lifetime_observer* previous = qomem::set_lifetime_observer(&obs);
    sys->synchronize(); // releases both views, in order, then finalizes the orphan
    qomem::set_lifetime_observer(previous);
    CHECK(obs.finalized == std::vector<std::string>{"counted", "orphan"});
    CHECK(qomem_test::live_count("memory-region") == 1); // b.sys
}

TEST_CASE("memory systems: unlock without holding the writer role, and synchronize while holding "
          "it, are reported as misuse",
          "[memory_system][misuse]") {
    qomem_test::throwing_assertions asserts;
    auto sys = qomem::memory_system::make();
    CHECK_THROWS_AS(sys->unlock(), qomem::assertion_failure);
    CHECK_THROWS_AS(sys->commit_transaction(), qomem::assertion_failure);
    {
        std::lock_guard writer(*sys);
        CHECK(sys->held_by_this_thread());
        CHECK_THROWS_AS(sys->synchronize(), qomem::assertion_failure);
    }
    CHECK_FALSE(sys->held_by_this_thread());
}
