// tests/vhost_log_test.cpp — the dirty log shared with a vhost-user back-end
// (vhost_log.hpp): the layout of docs/interop/vhost-user.rst checked by a real
// back-end process that marks pages with the specification's own formula,
// log_sync bringing those marks into the regions' bitmaps, the export of a
// region's bitmap into the log, the log's size, and SET_LOG_BASE decoded as
// hostile input.
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include <qomem/address_space.hpp>
#include <qomem/device.hpp>
#include <qomem/dirty_log.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/vhost_log.hpp>
#include <qomem/vhost_user.hpp>

#include "test_support.hpp"

namespace {

namespace vu = qomem::vhost_user;
using qomem::dirty_client;
using qomem::hwaddr;
using qomem_test::board;

/// A child process, killed and reaped if the test leaves early; wait() is
/// bounded in time.
class child_process {
public:
    explicit child_process(pid_t pid) noexcept : pid_(pid) {}
    child_process(const child_process&) = delete;
    child_process& operator=(const child_process&) = delete;
    ~child_process() {
        if (pid_ > 0) {
            ::kill(pid_, SIGKILL);
            int status;
            ::waitpid(pid_, &status, 0);
        }
    }
    /// Its exit status; -1 if it did not exit within `limit` (it is killed).
    int wait(std::chrono::milliseconds limit = std::chrono::seconds(10)) {
        const auto deadline = std::chrono::steady_clock::now() + limit;
        int status = 0;
        for (;;) {
            const pid_t r = ::waitpid(pid_, &status, WNOHANG);
            if (r == pid_) break;
            if (r < 0 && errno != EINTR) return -1;
            if (std::chrono::steady_clock::now() > deadline) return -1; // the destructor kills it
            std::this_thread::sleep_for(std::chrono::milliseconds(5));
        }
        pid_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    }

private:
    pid_t pid_;
};

/// Stops global tracking at the end of a scenario, whatever happened.
struct tracking {
    qomem::memory_system& sys;
    explicit tracking(qomem::memory_system& s) : sys(s) { sys.global_dirty_log_start(qomem::global_dirty::migration); }
    ~tracking() {
        if (sys.global_dirty_tracking()) sys.global_dirty_log_stop(sys.global_dirty_tracking());
    }
};

/// The guest addresses the back-end writes.
constexpr std::array<hwaddr, 4> backend_writes{0x1000, 0x12345, 0x40003ffc, 0x20010};

/// The back-end: receives SET_LOG_BASE, maps the log itself and marks the
/// pages of `backend_writes` with the specification's pseudo-code, answers,
/// exits. Its exit status names the step that failed.
[[noreturn]] void run_backend(vu::channel& back) {
    int status = 0;
    try {
        std::optional<vu::raw_message> msg = back.receive(64);
        if (!msg) ::_exit(2);
        vu::set_log_base_request req = vu::decode_set_log_base(msg->bytes, std::move(msg->fds));
        void* p = ::mmap(nullptr, req.mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, req.fd.get(),
                         static_cast<off_t>(req.mmap_offset));
        if (p == MAP_FAILED) ::_exit(3);
        auto* log = static_cast<std::uint8_t*>(p);
        for (hwaddr addr : backend_writes) {
            // docs/interop/vhost-user.rst: page = addr / VHOST_LOG_PAGE;
            // log[page / 8] |= 1 << page % 8, atomically.
            const std::uint64_t pg = addr / 0x1000;
            if (pg / 8 >= req.mmap_size) ::_exit(4);
            __atomic_fetch_or(&log[pg / 8], static_cast<std::uint8_t>(1u << (pg % 8)), __ATOMIC_SEQ_CST);
        }
        const auto reply = vu::encode_u64_reply(vu::request_set_log_base, 0);
        back.send(reply);
    } catch (...) {
        status = 5;
    }
    ::_exit(status);
}

/// Registers a listener for its scope.
struct listening {
    qomem::address_space& as;
    qomem::memory_listener& l;
    listening(qomem::address_space& a, qomem::memory_listener& x) : as(a), l(x) { as.add_listener(l); }
    ~listening() {
        if (l.registered_to()) as.remove_listener(l);
    }
};

void set_timeout(int fd, int seconds) {
    timeval tv{seconds, 0};
    REQUIRE(::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) == 0);
}

} // namespace

TEST_CASE("a back-end process given the log with SET_LOG_BASE marks pages with the "
          "specification's formula, and log_sync brings exactly those pages into the bitmaps of "
          "the regions the guest addresses belong to",
          "[vhost-log][process]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    qomem_test::null_regs ops;
    board b;
    auto sys = qomem::memory_system::make();
    auto low = qomem::make_ram(*b.dev, "low", 0x20000);
    auto io = qomem::make_io(*b.dev, "io", 0x1000, ops);
    auto high = qomem::make_ram(*b.dev, "high", 0x10000);
    b.sys->add_subregion(0x0, *low);
    b.sys->add_subregion(0x20000, *io);
    b.sys->add_subregion(0x40000000, *high);
    qomem::address_space as(*sys, *b.sys, "memory");
    low->set_log(true, dirty_client::vga);

    qomem::vhost_log log = qomem::vhost_log::for_address_space(as);
    CHECK(log.covered() >= 0x40010000);
    qomem::vhost_log_listener pull(log);
    listening registered(as, pull);
    CHECK_FALSE(pull.logging());
    tracking on(*sys);
    CHECK(pull.logging());

    auto [front, back] = vu::channel::socketpair();
    set_timeout(front.fd(), 10);
    std::fflush(nullptr);
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) run_backend(back);
    child_process child(pid);
    back.release().reset();

    const std::array<int, 1> fds{log.fd()};
    front.send(vu::encode_set_log_base(log), fds);
    std::optional<vu::raw_message> reply = front.receive(8);
    REQUIRE(reply.has_value());
    CHECK(vu::detail::get_le<std::uint64_t>(reply->bytes.data() + vu::header_size) == 0);
    REQUIRE(child.wait() == 0);

    // The same bits, read with the front-end's view of the layout.
    for (hwaddr a : backend_writes) CHECK(log.test(a, 1));
    CHECK_FALSE(log.test(0x2000, 0x10000));

    CHECK_FALSE(low->get_dirty(0, 0x20000, dirty_client::migration));
    sys->global_dirty_log_sync();
    CHECK(pull.pages_synced() == 3);
    auto dirty = [](const qomem::memory_region& mr, dirty_client c) {
        std::vector<hwaddr> out;
        for (hwaddr off = 0; off < mr.size(); off += 0x1000)
            if (mr.get_dirty(off, 0x1000, c)) out.push_back(off);
        return out;
    };
    CHECK(dirty(*low, dirty_client::migration) == std::vector<hwaddr>{0x1000, 0x12000});
    CHECK(dirty(*low, dirty_client::vga) == std::vector<hwaddr>{0x1000, 0x12000}); // every client it logs for
    CHECK(dirty(*high, dirty_client::migration) == std::vector<hwaddr>{0x3000});
    CHECK(dirty(*high, dirty_client::vga).empty());
    // Taken from the log; the MMIO page no logging section covers stays.
    CHECK_FALSE(log.test(0x0, 0x20000));
    CHECK_FALSE(log.test(0x40000000, 0x10000));
    CHECK(log.test(0x20010, 1));

    low->set_log(false, dirty_client::vga);
}

TEST_CASE("store_dirty exports a region's dirty bitmap into the log at the guest addresses of "
          "its sections (aliases included), in the specification's layout",
          "[vhost-log]") {
    qomem_test::leak_check leaks;
    board b;
    auto ram = qomem::make_ram(*b.dev, "ram", 0x8000);
    auto window = qomem::make_alias(*b.dev, "window", *ram, 0x4000, 0x2000);
    b.sys->add_subregion(0x100000, *ram);
    b.sys->add_subregion(0x300000, *window);
    qomem::address_space as(*b.sys, "memory");
    ram->set_log(true, dirty_client::migration);
    ram->set_dirty(0x2000, 1);
    ram->set_dirty(0x5000, 1);

    qomem::vhost_log log(0x400000);
    log.store_dirty(as, dirty_client::migration);
    // Another mapping of the same fd: what a back-end would read.
    void* p = ::mmap(nullptr, log.mmap_size(), PROT_READ, MAP_SHARED, log.fd(), 0);
    REQUIRE(p != MAP_FAILED);
    const auto* bytes = static_cast<const std::uint8_t*>(p);
    std::vector<std::uint64_t> marked;
    for (std::uint64_t pg = 0; pg < log.mmap_size() * 8; ++pg)
        if (bytes[pg / 8] >> (pg % 8) & 1) marked.push_back(pg * 0x1000);
    ::munmap(p, log.mmap_size());
    CHECK(marked == std::vector<std::uint64_t>{0x102000, 0x105000, 0x301000});
    CHECK(ram->get_dirty(0x2000, 1, dirty_client::migration)); // nothing cleared
    ram->set_log(false, dirty_client::migration);
}

TEST_CASE("the log is sized in 64-bit chunks to cover every RAM range of the address space, as "
          "QEMU's vhost_get_log_size",
          "[vhost-log]") {
    qomem_test::leak_check leaks;
    qomem_test::null_regs ops;
    board b;
    auto ram = qomem::make_ram(*b.dev, "ram", 0x1000);
    auto io = qomem::make_io(*b.dev, "io", 0x1000, ops);
    b.sys->add_subregion(0x40000000, *ram);
    b.sys->add_subregion(0x80000000, *io); // MMIO is not logged: not covered
    qomem::address_space as(*b.sys, "memory");
    const qomem::vhost_log log = qomem::vhost_log::for_address_space(as);
    // Pages up to 0x40001000: 0x40001 bits, 0x1001 chunks of 64.
    CHECK(log.mmap_size() == 0x1001 * 8);
    CHECK(log.mmap_offset() == 0);
    CHECK(qomem::vhost_log(0).mmap_size() == 8); // at least one chunk
}

TEST_CASE("SET_LOG_BASE: encoded as the specification says, a back-end decodes it as hostile "
          "input and refuses what does not describe a mappable log, closing the fd",
          "[vhost-log][hostile]") {
    qomem::vhost_log log(0x100000);
    const auto msg = vu::encode_set_log_base(log, true);
    REQUIRE(msg.size() == vu::header_size + 16);
    CHECK(vu::detail::get_le<std::uint32_t>(msg.data()) == 6);
    CHECK(vu::detail::get_le<std::uint32_t>(msg.data() + 4) == (vu::version | vu::flag_need_reply));
    CHECK(vu::detail::get_le<std::uint32_t>(msg.data() + 8) == 16);
    CHECK(vu::detail::get_le<std::uint64_t>(msg.data() + 12) == log.mmap_size());
    CHECK(vu::detail::get_le<std::uint64_t>(msg.data() + 20) == 0);

    auto dup_fd = [&] { return vu::unique_fd(::fcntl(log.fd(), F_DUPFD_CLOEXEC, 0)); };
    auto one_fd = [&] {
        std::vector<vu::unique_fd> v;
        v.push_back(dup_fd());
        return v;
    };
    auto reason_of = [](auto&& f) {
        try {
            f();
        } catch (const vu::protocol_error& e) {
            return e.why();
        }
        FAIL("accepted");
        return vu::protocol_error::reason::io;
    };
    using reason = vu::protocol_error::reason;

    const vu::set_log_base_request ok = vu::decode_set_log_base(msg, one_fd());
    CHECK(ok.mmap_size == log.mmap_size());
    CHECK(ok.need_reply);
    CHECK(reason_of([&] { vu::decode_set_log_base(msg, {}); }) == reason::missing_fd);
    auto wrong = msg;
    wrong[0] = std::byte{7};
    CHECK(reason_of([&] { vu::decode_set_log_base(wrong, one_fd()); }) == reason::unknown_request);
    auto short_msg = std::vector<std::byte>(msg.begin(), msg.end() - 8);
    short_msg[8] = std::byte{8};
    CHECK(reason_of([&] { vu::decode_set_log_base(short_msg, one_fd()); }) == reason::bad_payload);
    auto bad_version = msg;
    bad_version[4] = std::byte{2};
    CHECK(reason_of([&] { vu::decode_set_log_base(bad_version, one_fd()); }) == reason::bad_version);

    // attach: the back-end maps what it was given, or refuses it.
    qomem::vhost_log mapped = qomem::vhost_log::attach(dup_fd(), log.mmap_size(), 0);
    log.mark(0x5000, 1);
    CHECK(mapped.test(0x5000, 1)); // one memory, two mappings
    CHECK(reason_of([&] { qomem::vhost_log::attach(dup_fd(), 0, 0); }) == reason::bad_payload);
    CHECK(reason_of([&] { qomem::vhost_log::attach(dup_fd(), 8, 0x10); }) == reason::bad_payload);
    CHECK(reason_of([&] { qomem::vhost_log::attach(dup_fd(), log.mmap_size() + 1, 0); }) ==
          reason::bad_payload);
    CHECK(reason_of([&] { qomem::vhost_log::attach(dup_fd(), 8, ~std::uint64_t(0) - 4095); }) ==
          reason::bad_payload);
    CHECK(reason_of([&] { qomem::vhost_log::attach(vu::unique_fd(), 8, 0); }) == reason::bad_payload);
}
