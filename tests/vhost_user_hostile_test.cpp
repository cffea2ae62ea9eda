// A hostile vhost-user back-end must not be able to crash or exhaust the
// front-end:
//  * it maps a memfd (SHMEM_MAP, answered 0), then truncates it: MEM_READ and
//    MEM_WRITE of the lost pages are answered EFAULT, guest reads and writes
//    there fail with memtx_error, and the process survives (a back-end in a
//    process of its own, over a real socket);
//  * the SIGBUS guard chains to a handler the program installed before it,
//    and keeps the default action (death) for faults that are not its own
//    (each in a fresh process: this test binary, running a hidden test);
//  * it maps page after page into 8 shared memory regions: the process-wide
//    limit stops it with ENOSPC, state unchanged, with kernel mappings to
//    spare for the rest of the program.
// Malformed messages over a real socket: vhost_user_test.cpp (a real second
// process) and vhost_user_fuzz_test.cpp; misbehaving front-end-side replies:
// vhost_user_frontend_test.cpp.
#include <signal.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/core.h>

#include <qomem/vhost_user/backend_requests.hpp>
#include <qomem/vhost_user/channel.hpp>
#include <qomem/vhost_user/wire.hpp>

#include "test_support.hpp"

extern char** environ;

namespace vu = qomem::vhost_user;
using qomem_test::bytes;

namespace {

const std::uint64_t P = qomem_test::host_page();
constexpr qomem::hwaddr bar = 0xfe000000;

std::uint64_t u64_of(const std::optional<std::vector<std::byte>>& reply, std::uint32_t req) {
    REQUIRE(reply);
    return vu::decode_u64_reply(*reply, req);
}

/// Runs the hidden test `name` of this binary in a fresh process (bounded:
/// killed after 20 s) and returns its wait status.
int run_in_child(const std::string& name) {
    std::string self = "/proc/self/exe";
    std::vector<std::string> args{self, name};
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_t pid = -1;
    REQUIRE(::posix_spawn(&pid, self.c_str(), nullptr, nullptr, argv.data(), environ) == 0);
    int status = 0;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (::waitpid(pid, &status, WNOHANG) == 0) {
        if (std::chrono::steady_clock::now() > deadline) {
            ::kill(pid, SIGKILL);
            ::waitpid(pid, &status, 0);
            FAIL("the child test did not end within 20 s");
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return status;
}

std::atomic<int> own_handler_calls{0};
void own_sigbus_handler(int) { own_handler_calls.fetch_add(1); }

} // namespace

TEST_CASE("a back-end that truncates its file after SHMEM_MAP: MEM_READ / MEM_WRITE answer EFAULT, guest "
          "accesses fail with memtx_error, the process survives",
          "[vhost-user][hostile]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    const std::size_t fds_before = qomem_test::count_open_fds();
    {
        qomem_test::shmem_rig r;
        auto& dev = r.add_device("fs", bar, 16 * P);
        qomem::virtio_shmem& shm = r.add_region(dev, 0, 16 * P);
        vu::backend_request_handler handler(&dev, *r.as);
        // Plain variables, not structured bindings: lambdas capture them (clang 14).
        std::pair<vu::channel, vu::channel> front_pair = vu::channel::socketpair();
        vu::channel& front = front_pair.first;
        vu::channel& back = front_pair.second;

        const bytes file = qomem_test::pattern(9, 0, 2 * P);
        std::fflush(nullptr);
        const pid_t pid = ::fork();
        REQUIRE(pid >= 0);
        if (pid == 0) {
            // The back-end: map two pages, cut the file to one, then ask the
            // front-end to read and write both pages. Exit status: the step
            // that went wrong, 0 when every answer was as expected.
            front.close();
            int status = 0;
            try {
                vu::unique_fd memfd(::memfd_create("hostile", MFD_CLOEXEC));
                if (::ftruncate(memfd.get(), static_cast<off_t>(2 * P)) != 0 ||
                    ::pwrite(memfd.get(), file.data(), file.size(), 0) != static_cast<ssize_t>(file.size()))
                    ::_exit(1);
                const auto expect_u64 = [&](std::uint32_t req, std::uint64_t want, int step) {
                    const auto m = back.receive(64, std::chrono::seconds(5));
                    if (!m || vu::decode_u64_reply(m->bytes, req) != want) ::_exit(step);
                };
                const std::array<int, 1> fd{memfd.get()};
                back.send(vu::encode_shmem_map(vu::make_mmap_payload(0, 0, 4 * P, 2 * P, qomem::shmem_flags::read_write),
                                               true),
                          fd);
                expect_u64(9, 0, 2);
                if (::ftruncate(memfd.get(), static_cast<off_t>(P)) != 0) ::_exit(3); // the attack
                back.send(vu::encode_mem_read(bar + 5 * P, 16));
                expect_u64(11, EFAULT, 4);
                back.send(vu::encode_mem_write(bar + 5 * P + 8, qomem_test::bytes_of("lost"), true));
                expect_u64(12, EFAULT, 5);
                // The page still inside the file reads fine.
                back.send(vu::encode_mem_read(bar + 4 * P, 16));
                const auto ok = back.receive(4096, std::chrono::seconds(5));
                if (!ok || ok->bytes.size() != 12 + 12 + 16 ||
                    std::memcmp(ok->bytes.data() + 24, file.data(), 16) != 0)
                    ::_exit(6);
                back.send(vu::encode_shmem_unmap(vu::make_mmap_payload(0, 0, 4 * P, 2 * P, qomem::shmem_flags::read_only),
                                                 true));
                expect_u64(10, 0, 7);
            } catch (...) {
                status = 8;
            }
            ::_exit(status);
        }
        back.close();

        // Serve the back-end; between its requests, the guest touches the window.
        std::size_t served = 0;
        bool guest_checked = false;
        while (std::optional<vu::raw_message> m = front.receive(handler.max_payload(), std::chrono::seconds(5))) {
            const auto req = vu::detail::get_le<std::uint32_t>(m->bytes.data());
            if (req == 11 && !guest_checked) {
                // The file was cut after the map was answered: the guest's
                // accesses to the lost page fail, the kept page works.
                bytes buf(32, std::byte{0x5a});
                CHECK(r.as->read(bar + 5 * P, buf.data(), buf.size()) == qomem::memtx_error);
                CHECK(buf == bytes(32, std::byte{0})); // a failed read returns zeros
                CHECK(r.as->write(bar + 5 * P, buf.data(), 8) == qomem::memtx_error);
                bytes straddle(32);
                CHECK(r.as->read(bar + 5 * P - 16, straddle.data(), 32) == qomem::memtx_error);
                bytes kept(16);
                CHECK(r.as->read(bar + 4 * P, kept.data(), 16) == qomem::memtx_ok);
                CHECK(kept == bytes(file.begin(), file.begin() + 16));
                guest_checked = true;
            }
            std::optional<std::vector<std::byte>> reply = handler.handle(std::move(*m));
            if (reply) front.send(*reply);
            ++served;
        }
        int status = 0;
        REQUIRE(::waitpid(pid, &status, 0) == pid);
        INFO("the back-end's exit status names the step that failed");
        CHECK(WIFEXITED(status));
        CHECK(WEXITSTATUS(status) == 0);
        CHECK(served == 5);
        CHECK(guest_checked);
        CHECK(shm.live_mappings() == 0);
    }
    CHECK(qomem_test::count_open_fds() == fds_before);
}

TEST_CASE("a read-only mapping whose file shrank: a bounce buffer's pre-read fails instead of faulting",
          "[vhost-user][hostile]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    qomem_test::shmem_rig r;
    auto& dev = r.add_device("fs", bar, 16 * P);
    qomem::virtio_shmem& shm = r.add_region(dev, 0, 16 * P);
    qomem_test::unique_fd f = qomem_test::pattern_memfd(2 * P, 4);
    shm.map(f.get(), 0, 0, 2 * P, qomem::shmem_flags::read_only);
    REQUIRE(::ftruncate(f.get(), 0) == 0);
    // DMA for writing into a read-only mapping bounces; the pre-read of the
    // bounce buffer goes through the guarded copy.
    qomem::dma_mapping d = r.as->map(bar, 64, true);
    REQUIRE(d);
    CHECK(d.bounced());
    r.as->unmap(d, 0);
    bytes buf(8);
    CHECK(r.as->read(bar, buf.data(), buf.size()) == qomem::memtx_error);
    // The guard survives many faults in a row (the signal stays unblocked).
    for (int i = 0; i < 100; ++i) CHECK(r.as->read(bar + P, buf.data(), buf.size()) == qomem::memtx_error);
}

TEST_CASE("the SIGBUS guard chains to a handler installed before it", "[vhost-user][hostile]") {
    const int status = run_in_child("sigbus guard child: chaining");
    INFO("wait status " << status);
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
}

TEST_CASE("a SIGBUS that is not the guard's own still ends the process", "[vhost-user][hostile]") {
    const int status = run_in_child("sigbus guard child: default action");
    INFO("wait status " << status);
    REQUIRE(WIFSIGNALED(status));
    // SIGBUS itself; under AddressSanitizer its own handler comes first and aborts.
    CHECK((WTERMSIG(status) == SIGBUS || WTERMSIG(status) == SIGABRT));
}

TEST_CASE("sigbus guard child: chaining", "[.sigbus-child]") {
    // In a fresh process: our handler first, then the guard's.
    struct sigaction sa {};
    sa.sa_handler = &own_sigbus_handler;
    sigemptyset(&sa.sa_mask);
    REQUIRE(::sigaction(SIGBUS, &sa, nullptr) == 0);
    {
        qomem_test::shmem_rig r;
        auto& dev = r.add_device("fs", bar, 4 * P);
        qomem::virtio_shmem& shm = r.add_region(dev, 0, 4 * P); // installs the guard
        ::raise(SIGBUS);                                         // not the guard's: chained to ours
        REQUIRE(own_handler_calls.load() == 1);
        qomem_test::unique_fd f = qomem_test::pattern_memfd(P, 1);
        shm.map(f.get(), 0, 0, P, qomem::shmem_flags::read_write);
        REQUIRE(::ftruncate(f.get(), 0) == 0);
        bytes buf(8);
        REQUIRE(r.as->read(bar, buf.data(), buf.size()) == qomem::memtx_error); // the guard's own
        REQUIRE(own_handler_calls.load() == 1);
    }
    std::fflush(nullptr);
    std::_Exit(0);
}

TEST_CASE("sigbus guard child: default action", "[.sigbus-child]") {
    {
        qomem_test::shmem_rig r;
        auto& dev = r.add_device("fs", bar, 4 * P);
        r.add_region(dev, 0, 4 * P); // installs the guard over the default action
        std::fflush(nullptr);
        ::raise(SIGBUS); // not the guard's: the process ends here
    }
    std::_Exit(0);
}

TEST_CASE("8 shared memory regions mapped page after page: the process-wide limit stops the back-end with "
          "ENOSPC, state unchanged, kernel mappings left for the rest of the program",
          "[vhost-user][hostile]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    REQUIRE(qomem::shmem_mappings_in_process() == 0);
    const std::size_t limit = qomem::shmem_mapping_limit();
    std::size_t max_map_count = 65530;
    {
        std::ifstream in("/proc/sys/vm/max_map_count");
        in >> max_map_count;
    }
    CHECK(limit == max_map_count / 6);
    const std::size_t pages = 4096; // each region: 2,048 alternate-page maps
    const std::size_t fds_before = qomem_test::count_open_fds();
    {
        qomem_test::shmem_rig r;
        auto& dev = r.add_device("gpu", 0x100000000, 8 * pages * P);
        for (std::uint8_t id = 0; id < 8; ++id) r.add_region(dev, id, pages * P, id * pages * P);
        vu::backend_request_handler handler(&dev, *r.as);
        qomem_test::unique_fd file = qomem_test::pattern_memfd(P, 5);
        const std::size_t maps_before = qomem_test::count_kernel_mappings();

        const auto map = [&](std::uint8_t id, std::uint64_t page) {
            std::vector<vu::unique_fd> fds;
            fds.emplace_back(::fcntl(file.get(), F_DUPFD_CLOEXEC, 0));
            return u64_of(handler.handle({vu::encode_shmem_map(vu::make_mmap_payload(id, 0, page * P, P,
                                                                                      qomem::shmem_flags::read_write),
                                                               true),
                                          std::move(fds)}),
                          9);
        };
        std::size_t accepted = 0;
        std::uint64_t refusal = 0;
        std::uint8_t refused_id = 0;
        std::uint64_t refused_page = 0;
        for (std::uint8_t id = 0; id < 8 && !refusal; ++id)
            for (std::uint64_t page = 0; page < pages && !refusal; page += 2) {
                if (const std::uint64_t s = map(id, page); s == 0) {
                    ++accepted;
                } else {
                    refusal = s;
                    refused_id = id;
                    refused_page = page;
                }
            }
        CHECK(accepted == limit);
        CHECK(refusal == ENOSPC);
        CHECK_THAT(handler.last_error(),
                   Catch::Matchers::Contains(fmt::format("the process already has {} shared-memory mappings", limit)));
        CHECK(qomem::shmem_mappings_in_process() == limit);

        // Refused again, and nothing changes: no mapping, no kernel mapping, no fd.
        const std::size_t maps_at_limit = qomem_test::count_kernel_mappings();
        const std::size_t active = dev.shmem(refused_id)->active_mappings();
        const std::size_t fds = qomem_test::count_open_fds();
        CHECK(map(refused_id, refused_page) == ENOSPC);
        CHECK(qomem_test::count_kernel_mappings() == maps_at_limit);
        CHECK(dev.shmem(refused_id)->active_mappings() == active);
        CHECK(qomem_test::count_open_fds() == fds);
        // Each mapping cost at most three kernel mappings, so about half of
        // vm.max_map_count is still there for the rest of the program (the
        // slack: what the allocator — or a sanitizer's — mapped meanwhile).
        constexpr std::size_t slack = 256;
        CHECK(maps_at_limit - maps_before <= 3 * limit + slack);
        CHECK(maps_at_limit <= max_map_count / 2 + maps_before + slack);
        void* big = std::malloc(1 << 20);
        CHECK(big != nullptr);
        if (big) std::memset(big, 1, 1 << 20);
        std::free(big);
        std::vector<void*> more;
        for (int i = 0; i < 1000; ++i) { // separate mappings: alternating protections never merge
            void* p = ::mmap(nullptr, P, i % 2 ? PROT_READ : PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                             -1, 0);
            CHECK(p != MAP_FAILED);
            if (p != MAP_FAILED) more.push_back(p);
        }
        for (void* p : more) ::munmap(p, P);

        // An unmap frees a unit: the next map succeeds, the one after is refused.
        CHECK(u64_of(handler.handle({vu::encode_shmem_unmap(
                                         vu::make_mmap_payload(0, 0, 0, P, qomem::shmem_flags::read_only), true),
                                     {}}),
                     10) == 0);
        CHECK(map(0, 0) == 0);
        CHECK(map(refused_id, refused_page) == ENOSPC);
    }
    CHECK(qomem::shmem_mappings_in_process() == 0);
    CHECK(qomem_test::count_open_fds() == fds_before);
}
