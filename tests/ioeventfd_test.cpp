// tests/ioeventfd_test.cpp — ioeventfds (issue 14, item 2): a guest write
// that matches one signals a real eventfd (read by another thread) instead
// of calling the ops; other writes and every read reach the ops; listeners
// hear eventfd_add / eventfd_del with the guest address each ioeventfd has
// in their own address space, when it is mapped, moved, disabled or
// unmapped, and only then; bad arguments are refused, naming them.

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <future>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/core.h>

#include <qomem/address_space.hpp>
#include <qomem/ioeventfd.hpp>
#include <qomem/memory_listener.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/memory_system.hpp>
#include <qomem/rcu.hpp>
#include <qomem/tlb.hpp>
#include <qomem/vhost_user/unique_fd.hpp>

#include "test_support.hpp"

namespace {

using qomem::hwaddr;
using strings = std::vector<std::string>;
using regs = qomem_test::recording_regs<>;

/// A fresh non-blocking eventfd, closed by the test (the library never does).
qomem::vhost_user::unique_fd make_eventfd() {
    const int fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    REQUIRE(fd >= 0);
    return qomem::vhost_user::unique_fd(fd);
}

/// The eventfd's counter, read (and reset) once it becomes readable within
/// `timeout`; 0 if it does not.
std::uint64_t wait_and_read(int fd, std::chrono::milliseconds timeout) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(timeout.count())) != 1) return 0;
    std::uint64_t v = 0;
    if (::read(fd, &v, sizeof v) != static_cast<ssize_t>(sizeof v)) return 0;
    return v;
}

/// True when the eventfd was signalled (reads it, so it is clear again).
bool signalled(int fd) { return wait_and_read(fd, std::chrono::milliseconds(0)) != 0; }

/// Records eventfd_add / eventfd_del as "efd+ 1010/4 io data=0x1234 fd" (data
/// "any" without match_data; the fd as the name the test gave it), and
/// begin / commit.
class efd_recorder : public qomem::memory_listener {
public:
    explicit efd_recorder(std::vector<std::pair<int, std::string>> names = {})
        : names_(std::move(names)) {}
    strings events;
    strings take() { return std::exchange(events, {}); }
    void begin() override { events.push_back("begin"); }
    void commit() override { events.push_back("commit"); }
    void eventfd_add(const qomem::memory_section& s, bool match, std::uint64_t data,
                     int fd) override {
        events.push_back("efd+ " + describe(s, match, data, fd));
    }
    void eventfd_del(const qomem::memory_section& s, bool match, std::uint64_t data,
                     int fd) override {
        events.push_back("efd- " + describe(s, match, data, fd));
    }

private:
    std::string describe(const qomem::memory_section& s, bool match, std::uint64_t data,
                         int fd) const {
        std::string name = std::to_string(fd);
        for (const auto& [f, n] : names_)
            if (f == fd) name = n;
        return fmt::format("{:x}/{} {}@{:x} {} {}", s.offset_within_address_space,
                           static_cast<unsigned>(s.size), s.mr->region_name(),
                           s.offset_within_region,
                           match ? fmt::format("data={:#x}", data) : std::string("any"), name);
    }
    std::vector<std::pair<int, std::string>> names_;
};

/// Registers a listener for its lifetime.
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

TEST_CASE("a guest write matching an ioeventfd signals the eventfd, read by another thread, "
          "and the ops are not called",
          "[ioeventfd]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    qomem_test::board b;
    regs ops;
    auto io = qomem::make_io(*b.dev, "io", 0x100, ops);
    b.sys->add_subregion(0x1000, *io);
    qomem::address_space as(*b.sys, "memory");
    const auto fd = make_eventfd();
    io->add_eventfd(0x10, 4, true, 0x1234, fd.get());

    // The other thread blocks in poll until the write lands (bounded wait).
    auto reader = std::async(std::launch::async,
                             [&] { return wait_and_read(fd.get(), std::chrono::seconds(5)); });
    CHECK(as.stl_le(0x1010, 0x1234) == qomem::memtx_ok);
    CHECK(reader.get() == 1);
    CHECK(ops.calls.empty());

    // Several writes add up in the counter, still without the ops.
    for (int i = 0; i < 3; ++i) CHECK(as.stl_le(0x1010, 0x1234) == qomem::memtx_ok);
    CHECK(wait_and_read(fd.get(), std::chrono::seconds(5)) == 3);
    CHECK(ops.calls.empty());

    // A read of the same register calls the ops as usual.
    std::uint32_t v = 0;
    CHECK(as.ldl_le(0x1010, v) == qomem::memtx_ok);
    CHECK(ops.calls == strings{"r 0x10/4"});
    CHECK_FALSE(signalled(fd.get()));

    // Deleted: the write reaches the ops again.
    io->del_eventfd(0x10, 4, true, 0x1234, fd.get());
    ops.calls.clear();
    CHECK(as.stl_le(0x1010, 0x1234) == qomem::memtx_ok);
    CHECK(ops.calls == strings{"w 0x10/4=0x1234"});
    CHECK_FALSE(signalled(fd.get()));
    b.sys->del_subregion(*io);
}

TEST_CASE("a write with other data, another size or at another address calls the ops and "
          "leaves the eventfd alone",
          "[ioeventfd]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    qomem_test::board b;
    regs ops;
    auto io = qomem::make_io(*b.dev, "io", 0x100, ops);
    b.sys->add_subregion(0x1000, *io);
    qomem::address_space as(*b.sys, "memory");
    const auto fd = make_eventfd();
    io->add_eventfd(0x10, 2, true, 7, fd.get());

    CHECK(as.stw_le(0x1010, 8) == qomem::memtx_ok); // other data
    CHECK(as.stl_le(0x1010, 7) == qomem::memtx_ok); // other size
    CHECK(as.stw_le(0x1012, 7) == qomem::memtx_ok); // other address
    CHECK(ops.calls == strings{"w 0x10/2=0x8", "w 0x10/4=0x7", "w 0x12/2=0x7"});
    CHECK_FALSE(signalled(fd.get()));
    CHECK(as.stw_le(0x1010, 7) == qomem::memtx_ok);
    CHECK(signalled(fd.get()));
    CHECK(ops.calls.size() == 3);
    b.sys->del_subregion(*io);
}

TEST_CASE("without match_data an ioeventfd matches any data, and with size 0 any size",
          "[ioeventfd]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    qomem_test::board b;
    regs ops;
    auto io = qomem::make_io(*b.dev, "io", 0x100, ops);
    b.sys->add_subregion(0x1000, *io);
    qomem::address_space as(*b.sys, "memory");
    const auto any_data = make_eventfd();
    const auto any_size = make_eventfd();
    io->add_eventfd(0x20, 4, false, 0, any_data.get());
    io->add_eventfd(0x40, 0, false, 0, any_size.get());

    for (std::uint32_t d : {0u, 1u, 0xdeadbeefu}) {
        CHECK(as.stl_le(0x1020, d) == qomem::memtx_ok);
        CHECK(signalled(any_data.get()));
    }
    CHECK(as.stw_le(0x1020, 1) == qomem::memtx_ok); // still the size it names
    CHECK_FALSE(signalled(any_data.get()));

    CHECK(as.stb(0x1040, 1) == qomem::memtx_ok);
    CHECK(signalled(any_size.get()));
    CHECK(as.stq_le(0x1040, 1) == qomem::memtx_ok);
    CHECK(signalled(any_size.get()));
    CHECK(ops.calls == strings{"w 0x20/2=0x1"});
    b.sys->del_subregion(*io);
}

TEST_CASE("the data an ioeventfd matches is the value the ops would get, in the device's "
          "byte order",
          "[ioeventfd]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    qomem_test::board b;
    qomem_test::recording_regs<qomem::access_limits{}, qomem::access_limits{},
                               qomem::endianness::big>
        ops;
    auto io = qomem::make_io(*b.dev, "io", 0x100, ops);
    b.sys->add_subregion(0x1000, *io);
    qomem::address_space as(*b.sys, "memory");
    const auto fd = make_eventfd();
    io->add_eventfd(0x8, 4, true, 0x11223344, fd.get());

    CHECK(as.stl_le(0x1008, 0x11223344) == qomem::memtx_ok); // the device sees 0x44332211
    CHECK_FALSE(signalled(fd.get()));
    CHECK(ops.calls == strings{"w 0x8/4=0x44332211"});
    CHECK(as.stl_be(0x1008, 0x11223344) == qomem::memtx_ok);
    CHECK(signalled(fd.get()));
    CHECK(ops.calls.size() == 1);
    b.sys->del_subregion(*io);
}

TEST_CASE("a write through a CPU TLB is dispatched and signals the ioeventfd: the TLB never "
          "stores directly to the region",
          "[ioeventfd]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    qomem_test::board b;
    regs ops;
    auto io = qomem::make_io(*b.dev, "io", 0x1000, ops);
    b.sys->add_subregion(0x4000, *io);
    qomem::address_space as(*b.sys, "memory");
    const auto fd = make_eventfd();
    io->add_eventfd(0x4, 4, false, 0, fd.get());
    {
        qomem::cpu_tlb tlb(as);
        qomem::rcu::read_guard vcpu; // a vCPU runs inside a read section
        for (int i = 0; i < 3; ++i) CHECK(tlb.stl_le(0x4004, 5) == qomem::memtx_ok);
        CHECK(wait_and_read(fd.get(), std::chrono::seconds(5)) == 3);
        CHECK(tlb.stl_le(0x4008, 5) == qomem::memtx_ok);
    }
    CHECK(ops.calls == strings{"w 0x8/4=0x5"});
    b.sys->del_subregion(*io);
}

TEST_CASE("bad ioeventfd arguments are refused naming the values, and nothing changes",
          "[ioeventfd]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    qomem_test::board b;
    regs ops;
    auto io = qomem::make_io(*b.dev, "io", 0x100, ops);
    b.sys->add_subregion(0x1000, *io);
    qomem::address_space as(*b.sys, "memory");
    efd_recorder l;
    listening on(as, l);
    const auto fd = make_eventfd();
    io->add_eventfd(0x10, 4, true, 1, fd.get());
    l.take();
    const auto before = io->eventfds();

    auto refused = [&](auto&& call, const std::string& needle) {
        try {
            call();
            FAIL("not refused: " << needle);
        } catch (const qomem::assertion_failure& e) {
            CHECK_THAT(e.what(), Catch::Contains(needle));
        }
        CHECK(io->eventfds() == before);
        CHECK(l.events.empty());
    };
    refused([&] { io->add_eventfd(0x10, 3, true, 1, fd.get()); }, "size 3 is not 0, 1, 2, 4 or 8");
    refused([&] { io->add_eventfd(0xfe, 4, false, 0, fd.get()); },
            "[0xfe, +4) is past the region's end");
    refused([&] { io->add_eventfd(0x20, 0, true, 9, fd.get()); }, "cannot match data 0x9");
    refused([&] { io->add_eventfd(0x20, 4, false, 0, -1); }, "fd -1");
    refused([&] { io->add_eventfd(0x10, 4, true, 1, fd.get()); }, "was already added");
    refused([&] { io->del_eventfd(0x10, 4, true, 2, fd.get()); },
            "no ioeventfd at offset 0x10 size 4 match_data true data 0x2");
    refused([&] { io->del_eventfd(0x14, 4, true, 1, fd.get()); }, "offset 0x14");
    io->del_eventfd(0x10, 4, true, 1, fd.get());
    b.sys->del_subregion(*io);
}

TEST_CASE("ioeventfds are kept in QEMU's order: offset, size, match_data, data, eventfd",
          "[ioeventfd]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    qomem_test::board b;
    regs ops;
    auto io = qomem::make_io(*b.dev, "io", 0x100, ops);
    const auto f1 = make_eventfd();
    const auto f2 = make_eventfd();
    io->add_eventfd(0x20, 4, true, 5, f1.get());
    io->add_eventfd(0x10, 4, true, 5, f1.get());
    io->add_eventfd(0x10, 2, true, 5, f1.get());
    io->add_eventfd(0x10, 2, true, 3, f1.get());
    io->add_eventfd(0x10, 2, false, 0, f1.get());
    io->add_eventfd(0x10, 2, true, 3, f2.get());
    std::vector<std::string> got;
    for (const qomem::ioeventfd& e : io->eventfds())
        got.push_back(fmt::format("{:x}/{} {} {} {}", e.offset, e.size, e.match_data, e.data,
                                  e.fd == f1.get() ? "f1" : "f2"));
    const std::string second = f1.get() < f2.get() ? "f2" : "f1";
    CHECK(got == strings{"10/2 false 0 f1",
                         "10/2 true 3 " + std::string(f1.get() < f2.get() ? "f1" : "f2"),
                         "10/2 true 3 " + second, "10/2 true 5 f1", "10/4 true 5 f1",
                         "20/4 true 5 f1"});
}

TEST_CASE("listeners hear eventfd_add and eventfd_del at the guest address when a region with "
          "ioeventfds is mapped, moved, disabled and unmapped, and only then",
          "[ioeventfd][listener]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    qomem_test::board b;
    regs ops;
    auto io = qomem::make_io(*b.dev, "io", 0x100, ops);
    auto ram = qomem::make_ram(*b.dev, "ram", 0x1000);
    qomem::address_space as(*b.sys, "memory");
    const auto fd = make_eventfd();
    efd_recorder l({{fd.get(), "kick"}});
    listening on(as, l);
    l.take();

    io->add_eventfd(0x10, 2, true, 3, fd.get()); // not mapped: nobody hears
    CHECK(l.events.empty());

    b.sys->add_subregion(0x1000, *io);
    CHECK(l.take() == strings{"begin", "efd+ 1010/2 io@10 data=0x3 kick", "commit"});

    b.sys->add_subregion(0x8000, *ram); // elsewhere: nothing about the eventfd
    CHECK(l.take() == strings{"begin", "commit"});

    io->set_address(0x2000);
    CHECK(l.take() == strings{"begin", "efd- 1010/2 io@10 data=0x3 kick",
                              "efd+ 2010/2 io@10 data=0x3 kick", "commit"});

    io->set_enabled(false);
    CHECK(l.take() == strings{"begin", "efd- 2010/2 io@10 data=0x3 kick", "commit"});
    io->set_enabled(true);
    CHECK(l.take() == strings{"begin", "efd+ 2010/2 io@10 data=0x3 kick", "commit"});

    // A second one while mapped: only it is told.
    io->add_eventfd(0x20, 4, false, 0, fd.get());
    CHECK(l.take() == strings{"begin", "efd+ 2020/4 io@20 any kick", "commit"});

    // Inside a transaction: at the commit, once.
    {
        qomem::memory_transaction tx(*b.sys->system());
        io->del_eventfd(0x20, 4, false, 0, fd.get());
        io->set_address(0x3000);
        CHECK(l.events.empty());
    }
    CHECK(l.take() == strings{"begin", "efd- 2010/2 io@10 data=0x3 kick",
                              "efd- 2020/4 io@20 any kick", "efd+ 3010/2 io@10 data=0x3 kick",
                              "commit"});

    b.sys->del_subregion(*io);
    CHECK(l.take() == strings{"begin", "efd- 3010/2 io@10 data=0x3 kick", "commit"});
    io->del_eventfd(0x10, 2, true, 3, fd.get()); // unmapped: nobody hears
    CHECK(l.events.empty());
    b.sys->del_subregion(*ram);
}

TEST_CASE("an ioeventfd partly covered by a higher-priority region, or shown through an "
          "alias, is reported where it shows",
          "[ioeventfd][listener]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    qomem_test::board b;
    regs ops;
    auto io = qomem::make_io(*b.dev, "io", 0x100, ops);
    auto over = qomem::make_io(*b.dev, "over", 0x10, ops);
    auto alias = qomem::make_alias(*b.dev, "window", *io, 0x80, 0x80);
    const auto fd = make_eventfd();
    io->add_eventfd(0x90, 4, false, 0, fd.get());
    b.sys->add_subregion(0x1000, *io);
    qomem::address_space as(*b.sys, "memory");
    efd_recorder l({{fd.get(), "kick"}});
    listening on(as, l);
    CHECK(l.take() == strings{"begin", "efd+ 1090/4 io@90 any kick", "commit"});

    // Covered in the middle: still shown once (its first bytes are io's).
    b.sys->add_subregion(0x1092, *over, 1);
    CHECK(l.take() == strings{"begin", "commit"});
    b.sys->del_subregion(*over);
    l.take();

    b.sys->add_subregion(0x9000, *alias);
    CHECK(l.take() == strings{"begin", "efd+ 9010/4 io@90 any kick", "commit"});
    b.sys->del_subregion(*alias);
    CHECK(l.take() == strings{"begin", "efd- 9010/4 io@90 any kick", "commit"});

    // Unregistering tells it gone.
    as.remove_listener(l);
    CHECK(l.take() == strings{"begin", "efd- 1090/4 io@90 any kick", "commit"});
    b.sys->del_subregion(*io);
}

TEST_CASE("two address spaces each hear the ioeventfds they show, at their own addresses",
          "[ioeventfd][listener]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    qomem_test::board b;
    regs ops;
    auto io = qomem::make_io(*b.dev, "io", 0x100, ops);
    auto pci = qomem::make_container(nullptr, "pci", qomem::u128_2_64);
    auto bar = qomem::make_alias(*b.dev, "bar", *io, 0, 0x100);
    b.sys->add_subregion(0x1000, *io);
    pci->add_subregion(0xfe000000, *bar);
    qomem::address_space mem(*b.sys, "memory");
    qomem::address_space dma(*pci, "pci");
    const auto fd = make_eventfd();
    efd_recorder lm({{fd.get(), "kick"}}), ld({{fd.get(), "kick"}});
    listening on_mem(mem, lm), on_dma(dma, ld);
    lm.take();
    ld.take();

    io->add_eventfd(0x40, 2, false, 0, fd.get());
    CHECK(lm.take() == strings{"begin", "efd+ 1040/2 io@40 any kick", "commit"});
    CHECK(ld.take() == strings{"begin", "efd+ fe000040/2 io@40 any kick", "commit"});

    pci->del_subregion(*bar);
    CHECK(lm.events.empty());
    CHECK(ld.take() == strings{"begin", "efd- fe000040/2 io@40 any kick", "commit"});

    // Writes through either space signal it.
    pci->add_subregion(0xfe000000, *bar);
    CHECK(mem.stw_le(0x1040, 1) == qomem::memtx_ok);
    CHECK(signalled(fd.get()));
    CHECK(dma.stw_le(0xfe000040, 1) == qomem::memtx_ok);
    CHECK(signalled(fd.get()));
    CHECK(ops.calls.empty());
    io->del_eventfd(0x40, 2, false, 0, fd.get());
    pci->del_subregion(*bar);
    b.sys->del_subregion(*io);
}

TEST_CASE("ioeventfds added and deleted while another thread writes: every write either "
          "signals the eventfd or reaches the ops, exactly once",
          "[ioeventfd][threads]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    qomem_test::board b;
    struct counting_regs {
        std::atomic<int> writes{0};
        std::uint64_t read(hwaddr, unsigned) { return 0; }
        void write(hwaddr, std::uint64_t, unsigned) { writes.fetch_add(1); }
    } ops;
    auto io = qomem::make_io(*b.dev, "io", 0x100, ops);
    b.sys->add_subregion(0x1000, *io);
    qomem::address_space as(*b.sys, "memory");
    const auto fd = make_eventfd();
    constexpr int total = 20000;
    std::atomic<bool> started{false};
    std::thread vcpu([&] {
        started.store(true);
        for (int i = 0; i < total; ++i) (void)as.stl_le(0x1010, 1);
    });
    while (!started.load()) std::this_thread::yield();
    for (int i = 0; i < 200; ++i) {
        io->add_eventfd(0x10, 4, false, 0, fd.get());
        io->del_eventfd(0x10, 4, false, 0, fd.get());
    }
    vcpu.join();
    std::uint64_t kicks = 0;
    (void)::read(fd.get(), &kicks, sizeof kicks); // non-blocking: 0 if never signalled
    CHECK(kicks + static_cast<std::uint64_t>(ops.writes.load()) == std::uint64_t(total));
    b.sys->del_subregion(*io);
}
