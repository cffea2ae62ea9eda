// tests/coalesced_mmio_test.cpp — coalesced MMIO (issue 14, item 3): writes
// to a coalesced range wait in the memory system's ring until a flush,
// which makes them in order; a non-coalesced access to a region flagged
// flush_coalesced drains the ring first; a full ring is drained, never
// grown; listeners hear coalesced_io_add / coalesced_io_del for the parts of
// the flat ranges that coalesce; clear_coalescing withdraws them.

#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/core.h>

#include <qomem/address_space.hpp>
#include <qomem/coalesced_mmio.hpp>
#include <qomem/device.hpp>
#include <qomem/memory_listener.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/memory_system.hpp>

#include "test_support.hpp"

namespace {

using qomem::hwaddr;
using strings = std::vector<std::string>;
using regs = qomem_test::recording_regs<>;

/// Records coalesced_io_add / _del as "co+ 1000-10ff fb 1000+10" (section, region,
/// then the coalesced address and length), and begin / commit.
class co_recorder : public qomem::memory_listener {
public:
    strings events;
    strings take() { return std::exchange(events, {}); }
    void begin() override { events.push_back("begin"); }
    void commit() override { events.push_back("commit"); }
    void region_add(const qomem::memory_section& s) override {
        events.push_back("add " + describe(s));
    }
    void region_del(const qomem::memory_section& s) override {
        events.push_back("del " + describe(s));
    }
    void coalesced_io_add(const qomem::memory_section& s, hwaddr addr, hwaddr len) override {
        events.push_back(fmt::format("co+ {} {:x}+{:x}", describe(s), addr, len));
    }
    void coalesced_io_del(const qomem::memory_section& s, hwaddr addr, hwaddr len) override {
        events.push_back(fmt::format("co- {} {:x}+{:x}", describe(s), addr, len));
    }

private:
    static std::string describe(const qomem::memory_section& s) {
        return fmt::format("{:x}-{:x} {}", s.offset_within_address_space,
                           s.offset_within_address_space + static_cast<hwaddr>(s.size) - 1,
                           s.mr->region_name());
    }
};

class listening {
public:
    listening(qomem::address_space& as, qomem::memory_listener& l) : as_(as), l_(l) {
        as_.add_listener(l_);
    }
    ~listening() {
        if (l_.registered_to() == &as_) as_.remove_listener(l_);
    }
    listening(const listening&) = delete;
    listening& operator=(const listening&) = delete;

private:
    qomem::address_space& as_;
    qomem::memory_listener& l_;
};

} // namespace

TEST_CASE("coalesced writes are held until flush_coalesced, which makes them in order",
          "[coalesced]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    qomem_test::board b;
    regs ops;
    auto fb = qomem::make_io(*b.dev, "fb", 0x100, ops);
    b.sys->add_subregion(0x1000, *fb);
    qomem::address_space as(*b.sys, "memory");
    qomem::memory_system& sys = *b.sys->system();
    fb->set_coalescing();
    CHECK(fb->flush_coalesced());
    CHECK(fb->coalesced_ranges() == std::vector<qomem::coalesced_range>{{0, 0x100}});

    CHECK(as.stl_le(0x1008, 3) == qomem::memtx_ok);
    CHECK(as.stl_le(0x1000, 1) == qomem::memtx_ok);
    CHECK(as.stw_le(0x1004, 2) == qomem::memtx_ok);
    CHECK(ops.calls.empty());
    CHECK(sys.coalesced_pending() == 3);

    sys.flush_coalesced();
    CHECK(ops.calls == strings{"w 0x8/4=0x3", "w 0x0/4=0x1", "w 0x4/2=0x2"});
    CHECK(sys.coalesced_pending() == 0);
    sys.flush_coalesced(); // nothing left
    CHECK(ops.calls.size() == 3);
    b.sys->del_subregion(*fb);
}

TEST_CASE("a non-coalesced access to a region flagged flush_coalesced drains the ring first, "
          "an access to another region does not",
          "[coalesced]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    qomem_test::board b;
    std::vector<std::string> order; // both devices' calls, in the order made
    struct shared_regs {
        std::vector<std::string>* out;
        std::string name;
        std::uint64_t read(hwaddr o, unsigned s) {
            out->push_back(fmt::format("{} r {:#x}/{}", name, o, s));
            return 0;
        }
        void write(hwaddr o, std::uint64_t v, unsigned s) {
            out->push_back(fmt::format("{} w {:#x}/{}={:#x}", name, o, s, v));
        }
    } dev_ops{&order, "dev"}, other_ops{&order, "other"};
    auto dev = qomem::make_io(*b.dev, "dev", 0x100, dev_ops);
    auto other = qomem::make_io(*b.dev, "other", 0x100, other_ops);
    b.sys->add_subregion(0x1000, *dev);
    b.sys->add_subregion(0x2000, *other);
    qomem::address_space as(*b.sys, "memory");
    dev->add_coalescing(0, 0x10); // only its first 16 bytes coalesce

    CHECK(as.stl_le(0x1000, 1) == qomem::memtx_ok);
    CHECK(as.stl_le(0x1004, 2) == qomem::memtx_ok);
    std::uint32_t v = 0;
    CHECK(as.ldl_le(0x2000, v) == qomem::memtx_ok); // other region: not flagged
    CHECK(as.stl_le(0x2004, 9) == qomem::memtx_ok);
    CHECK(order == strings{"other r 0x0/4", "other w 0x4/4=0x9"});
    order.clear();

    CHECK(as.ldl_le(0x1020, v) == qomem::memtx_ok); // read of dev: drained first
    CHECK(order == strings{"dev w 0x0/4=0x1", "dev w 0x4/4=0x2", "dev r 0x20/4"});
    order.clear();

    CHECK(as.stl_le(0x1008, 3) == qomem::memtx_ok);
    CHECK(as.stl_le(0x1040, 4) == qomem::memtx_ok); // a write outside the range: drained first
    CHECK(order == strings{"dev w 0x8/4=0x3", "dev w 0x40/4=0x4"});
    order.clear();

    // The range's last bytes coalesce, the next ones do not.
    CHECK(as.stl_le(0x100c, 5) == qomem::memtx_ok);
    CHECK(order.empty());
    CHECK(as.stl_le(0x1010, 6) == qomem::memtx_ok);
    CHECK(order == strings{"dev w 0xc/4=0x5", "dev w 0x10/4=0x6"});
    order.clear();

    // set_flush_coalesced on the other region: its reads now drain the ring too.
    other->set_flush_coalesced();
    CHECK(as.stl_le(0x1000, 7) == qomem::memtx_ok);
    CHECK(as.ldl_le(0x2000, v) == qomem::memtx_ok);
    CHECK(order == strings{"dev w 0x0/4=0x7", "other r 0x0/4"});
    order.clear();
    // clear_flush_coalesced on dev keeps the flag while it has coalesced ranges.
    dev->clear_flush_coalesced();
    CHECK(dev->flush_coalesced());
    other->clear_flush_coalesced();
    CHECK_FALSE(other->flush_coalesced());
    CHECK(as.stl_le(0x1000, 8) == qomem::memtx_ok);
    CHECK(as.ldl_le(0x2000, v) == qomem::memtx_ok);
    CHECK(order == strings{"other r 0x0/4"});
    b.sys->system()->flush_coalesced();
    b.sys->del_subregion(*dev);
    b.sys->del_subregion(*other);
}

TEST_CASE("a full ring is drained by the write that finds it full, never grown", "[coalesced]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    qomem_test::board b;
    regs ops;
    auto fb = qomem::make_io(*b.dev, "fb", 0x1000, ops);
    b.sys->add_subregion(0, *fb);
    qomem::address_space as(*b.sys, "memory");
    qomem::memory_system& sys = *b.sys->system();
    fb->set_coalescing();
    constexpr std::size_t cap = qomem::memory_system::coalesced_capacity;
    for (std::size_t i = 0; i < cap; ++i)
        CHECK(as.stl_le(4 * (i % 0x400), static_cast<std::uint32_t>(i)) == qomem::memtx_ok);
    CHECK(sys.coalesced_pending() == cap);
    CHECK(ops.calls.empty());
    CHECK(as.stl_le(0, 0xabc) == qomem::memtx_ok); // full: drains, then queues itself
    CHECK(ops.calls.size() == cap);
    CHECK(ops.calls.front() == "w 0x0/4=0x0");
    CHECK(ops.calls.back() == fmt::format("w {:#x}/4={:#x}", 4 * (cap - 1), cap - 1));
    CHECK(sys.coalesced_pending() == 1);
    sys.flush_coalesced();
    CHECK(ops.calls.back() == "w 0x0/4=0xabc");
    b.sys->del_subregion(*fb);
}

TEST_CASE("writes from several threads are queued and each thread's writes are made in its "
          "order, while another thread flushes",
          "[coalesced][threads]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    qomem_test::board b;
    struct locked_regs {
        std::mutex m;
        std::map<hwaddr, std::vector<std::uint64_t>> seen; // per register (= per thread)
        std::uint64_t read(hwaddr, unsigned) { return 0; }
        void write(hwaddr o, std::uint64_t v, unsigned) {
            std::lock_guard g(m);
            seen[o].push_back(v);
        }
    } ops;
    auto fb = qomem::make_io(*b.dev, "fb", 0x100, ops);
    b.sys->add_subregion(0, *fb);
    qomem::address_space as(*b.sys, "memory");
    qomem::memory_system& sys = *b.sys->system();
    fb->set_coalescing();
    constexpr int writers = 3, per_writer = 1000;
    std::atomic<int> done{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < writers; ++t)
        threads.emplace_back([&, t] {
            for (int i = 0; i < per_writer; ++i)
                (void)as.stl_le(static_cast<hwaddr>(4 * t), static_cast<std::uint32_t>(i));
            done.fetch_add(1);
        });
    std::thread flusher([&] {
        while (done.load() < writers) sys.flush_coalesced();
    });
    for (auto& th : threads) th.join();
    flusher.join();
    sys.flush_coalesced();
    CHECK(sys.coalesced_pending() == 0);
    for (int t = 0; t < writers; ++t) {
        const auto& got = ops.seen[static_cast<hwaddr>(4 * t)];
        REQUIRE(got.size() == per_writer);
        bool in_order = true;
        for (int i = 0; i < per_writer; ++i)
            in_order &= got[static_cast<std::size_t>(i)] == std::uint64_t(i);
        CHECK(in_order);
    }
    b.sys->del_subregion(*fb);
}

TEST_CASE("listeners hear coalesced_io_add and coalesced_io_del for the parts of flat ranges "
          "that coalesce, on map, unmap, set and clear_coalescing",
          "[coalesced][listener]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    qomem_test::board b;
    regs ops;
    auto fb = qomem::make_io(*b.dev, "fb", 0x100, ops);
    auto over = qomem::make_io(*b.dev, "over", 0x20, ops);
    qomem::address_space as(*b.sys, "memory");
    co_recorder l;
    listening on(as, l);
    l.take();
    fb->add_coalescing(0x10, 0x20);
    fb->add_coalescing(0x80, 0x10);
    CHECK(l.events.empty()); // not mapped

    b.sys->add_subregion(0x1000, *fb);
    CHECK(l.take() == strings{"begin", "add 1000-10ff fb", "co+ 1000-10ff fb 1010+20",
                              "co+ 1000-10ff fb 1080+10", "commit"});

    // Covered in part: the flat ranges change, each coalescing its own part.
    b.sys->add_subregion(0x1020, *over, 1);
    CHECK(l.take() == strings{"begin", "co- 1000-10ff fb 1010+20", "co- 1000-10ff fb 1080+10",
                              "del 1000-10ff fb", "add 1000-101f fb", "add 1020-103f over",
                              "add 1040-10ff fb", "co+ 1000-101f fb 1010+10",
                              "co+ 1040-10ff fb 1080+10", "commit"});
    b.sys->del_subregion(*over);
    l.take();

    // clear_coalescing drains what was queued, then withdraws the ranges.
    CHECK(as.stl_le(0x1010, 1) == qomem::memtx_ok);
    CHECK(ops.calls.empty());
    fb->clear_coalescing();
    CHECK(ops.calls == strings{"w 0x10/4=0x1"});
    CHECK_FALSE(fb->flush_coalesced());
    CHECK(l.take() ==
          strings{"begin", "co- 1000-10ff fb 1010+20", "co- 1000-10ff fb 1080+10", "commit"});
    CHECK(as.stl_le(0x1010, 2) == qomem::memtx_ok); // no longer coalesced
    CHECK(ops.calls.size() == 2);

    fb->set_coalescing();
    CHECK(l.take() == strings{"begin", "co+ 1000-10ff fb 1000+100", "commit"});

    // A listener registered now is replayed the coalesced range; one
    // unregistered is told it gone before its range.
    co_recorder late;
    as.add_listener(late);
    CHECK(late.take() ==
          strings{"begin", "add 1000-10ff fb", "co+ 1000-10ff fb 1000+100", "commit"});
    as.remove_listener(late);
    CHECK(late.take() ==
          strings{"begin", "co- 1000-10ff fb 1000+100", "del 1000-10ff fb", "commit"});

    b.sys->del_subregion(*fb);
    CHECK(l.take() == strings{"begin", "co- 1000-10ff fb 1000+100", "del 1000-10ff fb", "commit"});
}

TEST_CASE("bad coalescing arguments are refused naming the values, and nothing changes",
          "[coalesced]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    qomem_test::board b;
    regs ops;
    auto fb = qomem::make_io(*b.dev, "fb", 0x100, ops);
    fb->add_coalescing(0, 0x10);
    try {
        fb->add_coalescing(0xf0, 0x20);
        FAIL("not refused");
    } catch (const qomem::assertion_failure& e) {
        CHECK_THAT(e.what(), Catch::Contains("[0xf0, +0x20) is empty or past the region's end"));
    }
    CHECK_THROWS_AS(fb->add_coalescing(0x10, 0), qomem::assertion_failure);
    CHECK(fb->coalesced_ranges() == std::vector<qomem::coalesced_range>{{0, 0x10}});
}

TEST_CASE("a region freed while writes to it are queued takes them with it", "[coalesced]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    qomem_test::board b;
    regs ops, kept_ops;
    auto dev2 = qomem::make<qomem::device>();
    auto gone = qomem::make_io(*dev2, "gone", 0x100, ops);
    auto kept = qomem::make_io(*b.dev, "kept", 0x100, kept_ops);
    b.sys->add_subregion(0x1000, *gone);
    b.sys->add_subregion(0x2000, *kept);
    qomem::address_space as(*b.sys, "memory");
    qomem::memory_system& sys = *b.sys->system();
    gone->set_coalescing();
    kept->set_coalescing();
    CHECK(as.stl_le(0x1000, 1) == qomem::memtx_ok);
    CHECK(as.stl_le(0x2000, 2) == qomem::memtx_ok);
    CHECK(as.stl_le(0x1004, 3) == qomem::memtx_ok);
    CHECK(sys.coalesced_pending() == 3);
    b.sys->del_subregion(*gone);
    gone.reset();
    dev2.reset(); // finalizes the device and its region
    sys.synchronize();
    CHECK(sys.coalesced_pending() == 1);
    sys.flush_coalesced();
    CHECK(ops.calls.empty());
    CHECK(kept_ops.calls == strings{"w 0x0/4=0x2"});
    b.sys->del_subregion(*kept);
}
