// tests/test_support.hpp — helpers shared by the qomem tests.
//
// Every test scenario ends by checking that it left no live object behind and
// runs with a throwing assertion handler, so that misuse checks can be
// asserted with REQUIRE_THROWS_AS:
//
//     TEST_CASE("an object cannot become a child of its own child") {
//         qomem_test::leak_check leaks;           // first: checked last
//         qomem_test::throwing_assertions asserts;
//         qomem_test::event_recorder events;      // optional: lifetime order
//         auto a = qomem::make<qomem::container>();
//         auto b = qomem::make<qomem::container>();
//         a->add_child("b", *b);
//         events.label(*a, "a");
//         REQUIRE_THROWS_AS(b->add_child("a", *a), qomem::assertion_failure);
//     }   // b, then a released here, then leak_check requires zero live objects
//
// These come from <qomem/testing.hpp> (through its Catch2 adapter); the rest
// of this file is the rigs the tests share.
//
// Declare leak_check before any ref_ptr of the scenario: locals are destroyed
// in reverse order, so the check runs after every handle has been dropped.
#pragma once

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/core.h>

#include <qomem/address_space.hpp>
#include <qomem/assert.hpp>
#include <qomem/device.hpp>
#include <qomem/log.hpp>
#include <qomem/machine.hpp>
#include <qomem/memory_ops.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/memory_system.hpp>
#include <qomem/mtree.hpp>
#include <qomem/object.hpp>
#include <qomem/pci.hpp>
#include <qomem/shmem.hpp>
#include <qomem/testing_catch2.hpp>
#include <qomem/virtio_mmio.hpp>
#include <qomem/vhost_user/unique_fd.hpp>

extern char** environ;

namespace qomem_test {

/// qomem/testing.hpp's leak check, reporting through Catch2, that also
/// requires zero live objects at the start (unless an earlier test leaked:
/// that test has already failed, and this one is not blamed for it).
/// Declare it first in a scenario so that it is checked last.
class leak_check : public qomem::testing::catch2::leak_check {
public:
    leak_check() { CHECK(start() == 0); }
    /// The live objects by type, e.g. "container=1 memory-region=2", or "none".
    static std::string describe_live() { return qomem::testing::describe_live_objects(); }
};

using qomem::testing::event_log;
using qomem::testing::event_recorder;
using qomem::testing::only;
using qomem::testing::throwing_assertions;

// ---- memory-map rigs --------------------------------------------------------

/// How many live objects of type `type` ("memory-region", ...) exist now.
inline std::size_t live_count(std::string_view type) {
    const auto all = qomem::live_objects();
    const auto it = all.find(type);
    return it == all.end() ? 0 : it->second;
}

/// "11 22 33 44": bytes as the guest sees them in a buffer.
inline std::string hex_bytes(const void* p, std::size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    std::string out;
    for (std::size_t i = 0; i < n; ++i) {
        if (i) out += ' ';
        out += fmt::format("{:02x}", b[i]);
    }
    return out;
}

/// A register file whose byte at offset k is (k & 0xff), in little-endian
/// order: whatever the access size, the guest's buffer shows the bytes of
/// the offsets it covers.
inline std::uint64_t offset_bytes(qomem::hwaddr offset, unsigned size) {
    std::uint64_t v = 0;
    for (unsigned k = 0; k < size; ++k) v |= ((offset + k) & 0xff) << (8 * k);
    return v;
}

/// The calls an MMIO model received, as "r 0x10/4" and "w 0x10/4=0x1234".
struct mmio_calls {
    std::vector<std::string> calls;
    void note_read(qomem::hwaddr offset, unsigned size) {
        calls.push_back(fmt::format("r {:#x}/{}", offset, size));
    }
    void note_write(qomem::hwaddr offset, std::uint64_t value, unsigned size) {
        calls.push_back(fmt::format("w {:#x}/{}={:#x}", offset, size, value));
    }
};

/// MMIO callbacks that record every call (mmio_calls) and answer reads with
/// `reader` (zero by default). Access rules and byte order are template
/// parameters, because QEMU's (and qomem's) are static.
template <qomem::access_limits Valid = qomem::access_limits{},
          qomem::access_limits Impl = qomem::access_limits{},
          qomem::endianness Endian = qomem::endianness::little>
struct recording_regs : mmio_calls {
    static constexpr qomem::access_limits valid = Valid;
    static constexpr qomem::access_limits impl = Impl;
    static constexpr qomem::endianness endian = Endian;

    std::function<std::uint64_t(qomem::hwaddr, unsigned)> reader = [](qomem::hwaddr, unsigned) {
        return std::uint64_t{0};
    };
    std::uint64_t read(qomem::hwaddr offset, unsigned size) {
        note_read(offset, size);
        return reader(offset, size);
    }
    void write(qomem::hwaddr offset, std::uint64_t value, unsigned size) {
        note_write(offset, value, size);
    }
};

/// MMIO that answers zero and ignores writes.
struct null_regs {
    std::uint64_t read(qomem::hwaddr, unsigned) { return 0; }
    void write(qomem::hwaddr, std::uint64_t, unsigned) {}
};

/// A machine: a device owning every region, and an ownerless root container.
/// The root handle is dropped before the device, which then frees its regions.
struct board {
    qomem::ref_ptr<qomem::device> dev = qomem::make<qomem::device>();
    qomem::ref_ptr<qomem::memory_region> sys =
        qomem::make_container(nullptr, "system", qomem::u128_2_64);
};

/// The lines the library logged while a log_capture lived.
inline std::vector<std::string>& captured_log_lines() {
    static std::vector<std::string> lines;
    return lines;
}

/// Sends the library's log lines to captured_log_lines() for its lifetime,
/// and restores the previous sink afterwards. Single-threaded tests only.
class log_capture {
public:
    log_capture() : previous_(qomem::set_log_sink(&capture)) { captured_log_lines().clear(); }
    ~log_capture() {
        qomem::set_log_sink(previous_);
        captured_log_lines().clear();
    }
    log_capture(const log_capture&) = delete;
    log_capture& operator=(const log_capture&) = delete;
    const std::vector<std::string>& lines() const { return captured_log_lines(); }

private:
    static void capture(std::string_view line) { captured_log_lines().emplace_back(line); }
    qomem::log_sink previous_;
};

/// Turns a log category on or off for its lifetime.
class scoped_log_category {
public:
    scoped_log_category(qomem::log_category c, bool on) : c_(c), was_(qomem::log_enabled(c)) {
        qomem::set_log_enabled(c, on);
    }
    ~scoped_log_category() { qomem::set_log_enabled(c_, was_); }
    scoped_log_category(const scoped_log_category&) = delete;
    scoped_log_category& operator=(const scoped_log_category&) = delete;

private:
    qomem::log_category c_;
    bool was_;
};

/// Turns on memory_system::set_verify_incremental (every incremental commit
/// checked against a full render) for its lifetime, and restores it after,
/// also when a check fails.
class verify_incremental {
public:
    explicit verify_incremental(qomem::memory_system& sys = qomem::memory_system::default_system())
        : sys_(sys), previous_(sys.verify_incremental()) {
        sys_.set_verify_incremental(true);
    }
    ~verify_incremental() { sys_.set_verify_incremental(previous_); }
    verify_incremental(const verify_incremental&) = delete;
    verify_incremental& operator=(const verify_incremental&) = delete;

private:
    qomem::memory_system& sys_;
    bool previous_;
};

} // namespace qomem_test

// ---- shared memory regions, vhost-user and real back-ends -------------------
//
// fd counting, memfds with patterns, the machine the shmem and vhost-user
// tests share (shmem_rig), and programs started by a test (backend_process):
//
//     qomem_test::shmem_rig r;                                  // RAM at 0, space "memory"
//     auto& dev = r.add_device("fs", 0xfe000000, 0x100000);     // a BAR at 0xfe000000
//     qomem::virtio_shmem& shm = r.add_region(dev, 0, 16 * page);
//     qomem::vhost_user::unique_fd f = qomem_test::pattern_memfd(2 * page, 7);
//     shm.map(f.get(), 0, 0, 2 * page, qomem::shmem_flags::read_write);

namespace qomem_test {

using qomem::vhost_user::unique_fd;
using bytes = std::vector<std::byte>;

/// The host page size.
inline std::uint64_t host_page() {
    static const auto p = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
    return p;
}

/// Open fds of this process (the directory's own fd not counted).
inline std::size_t count_open_fds() {
    DIR* d = ::opendir("/proc/self/fd");
    REQUIRE(d != nullptr);
    const int self = ::dirfd(d);
    std::size_t n = 0;
    while (const dirent* e = ::readdir(d)) {
        if (e->d_name[0] == '.') continue;
        if (std::atoi(e->d_name) != self) ++n;
    }
    ::closedir(d);
    return n;
}

inline bool fd_is_open(int fd) { return ::fcntl(fd, F_GETFD) != -1; }

/// The kernel mappings of this process (lines of /proc/self/maps).
inline std::size_t count_kernel_mappings() {
    std::ifstream maps("/proc/self/maps");
    std::string line;
    std::size_t n = 0;
    while (std::getline(maps, line)) ++n;
    return n;
}

inline bytes bytes_of(std::string_view s) {
    bytes out(s.size());
    std::memcpy(out.data(), s.data(), s.size());
    return out;
}

/// The byte at offset `i` of a file filled with pattern `seed`.
inline std::byte pattern_byte(unsigned seed, std::uint64_t i) {
    return static_cast<std::byte>((i * 131 + seed * 17 + (i >> 12)) & 0xff);
}
/// Bytes [from, from + n) of pattern `seed`.
inline bytes pattern(unsigned seed, std::uint64_t from, std::uint64_t n) {
    bytes out(static_cast<std::size_t>(n));
    for (std::uint64_t i = 0; i < n; ++i) out[static_cast<std::size_t>(i)] = pattern_byte(seed, from + i);
    return out;
}

/// A memfd of `size` bytes holding `content` at its start (sealable when
/// `sealable`).
inline unique_fd memfd_with(std::uint64_t size, std::span<const std::byte> content = {}, bool sealable = false) {
    unique_fd fd(::memfd_create("qomem-test", MFD_CLOEXEC | (sealable ? MFD_ALLOW_SEALING : 0u)));
    REQUIRE(fd);
    REQUIRE(::ftruncate(fd.get(), static_cast<off_t>(size)) == 0);
    if (!content.empty())
        REQUIRE(::pwrite(fd.get(), content.data(), content.size(), 0) == static_cast<ssize_t>(content.size()));
    return fd;
}
/// A memfd of `size` bytes filled with pattern `seed`.
inline unique_fd pattern_memfd(std::uint64_t size, unsigned seed) {
    const bytes b = pattern(seed, 0, size);
    return memfd_with(size, b);
}

inline bytes pread_bytes(int fd, std::uint64_t offset, std::size_t n) {
    bytes out(n);
    REQUIRE(::pread(fd, out.data(), n, static_cast<off_t>(offset)) == static_cast<ssize_t>(n));
    return out;
}

/// The device type the shmem and vhost-user tests use.
class shmem_test_device : public qomem::virtio_shmem_device {
    QOMEM_OBJECT(shmem_test_device, "test-shm-device", qomem::virtio_shmem_device)
public:
    shmem_test_device() = default;
};

/// A machine: a "system" container (2^64) with RAM at 0 and the address
/// space "memory" over it; devices (children "name" of the root) whose shared
/// memory regions sit in BAR containers of their own, placed in the system
/// space as a PCI transport would. Devices still plugged are unplugged when
/// the rig goes.
class shmem_rig {
public:
    explicit shmem_rig(std::uint64_t ram_size = 0x10000)
        : ram(qomem::make_ram(nullptr, "ram", ram_size)) {
        sys->add_subregion(0, *ram);
        as.emplace(*sys, "memory");
    }
    shmem_rig(const shmem_rig&) = delete;
    shmem_rig& operator=(const shmem_rig&) = delete;
    ~shmem_rig() {
        while (!devices_.empty()) unplug(*devices_.front().dev);
        as.reset();
        sys.reset(); // detaches the BARs and RAM, which are ownerless
        bars_.clear();
    }

    /// Adds device `name` with an (ownerless) BAR container of `bar_size` at `bar_addr`.
    shmem_test_device& add_device(const std::string& name, qomem::hwaddr bar_addr, std::uint64_t bar_size) {
        auto d = qomem::make<shmem_test_device>();
        root->add_child(name, *d);
        auto bar = qomem::make_container(nullptr, name + "-bar", bar_size);
        sys->add_subregion(bar_addr, *bar);
        devices_.push_back({d.get(), bar.get()});
        bars_.push_back(std::move(bar));
        return *d;
    }
    /// Declares shared memory region `shmid` of `size` bytes on `dev` and
    /// places it at `offset` of the device's BAR.
    qomem::virtio_shmem& add_region(shmem_test_device& dev, std::uint8_t shmid, std::uint64_t size,
                                    std::uint64_t offset = 0) {
        qomem::virtio_shmem& s = dev.declare_shmem(shmid, size);
        bar(dev).add_subregion(offset, s.region());
        return s;
    }
    qomem::memory_region& bar(const shmem_test_device& dev) const {
        for (const auto& d : devices_)
            if (d.dev == &dev) return *d.bar;
        FAIL("no such device in the rig");
        throw std::logic_error("unreachable");
    }
    /// Hot-unplugs `dev` (unparent): it and its regions may be gone afterwards.
    void unplug(shmem_test_device& dev) {
        std::erase_if(devices_, [&](const plugged& d) { return d.dev == &dev; });
        qomem::unparent(dev);
    }

    std::string flat() const {
        const std::array<const qomem::address_space*, 1> spaces{&*as};
        return qomem::info_mtree(spaces, {.flatview = true});
    }
    std::string tree() const {
        const std::array<const qomem::address_space*, 1> spaces{&*as};
        return qomem::info_mtree(spaces);
    }

    qomem::ref_ptr<qomem::container> root = qomem::container::make_root();
    qomem::ref_ptr<qomem::memory_region> sys = qomem::make_container(nullptr, "system", qomem::u128_2_64);
    qomem::ref_ptr<qomem::memory_region> ram;
    std::optional<qomem::address_space> as;

private:
    struct plugged {
        shmem_test_device* dev;
        qomem::memory_region* bar;
    };
    std::vector<plugged> devices_;
    std::vector<qomem::ref_ptr<qomem::memory_region>> bars_;
};

/// Restores the process-wide shared-memory mapping limit when it goes.
class scoped_shmem_mapping_limit {
public:
    explicit scoped_shmem_mapping_limit(std::size_t n) : old_(qomem::shmem_mapping_limit()) {
        qomem::set_shmem_mapping_limit(n);
    }
    ~scoped_shmem_mapping_limit() { qomem::set_shmem_mapping_limit(old_); }
    scoped_shmem_mapping_limit(const scoped_shmem_mapping_limit&) = delete;
    scoped_shmem_mapping_limit& operator=(const scoped_shmem_mapping_limit&) = delete;

private:
    std::size_t old_;
};

/// A directory of its own under $TMPDIR (or /tmp), removed with everything
/// in it when the object goes.
class temp_dir {
public:
    temp_dir() {
        const char* base = std::getenv("TMPDIR");
        std::string tmpl = std::string(base && *base ? base : "/tmp") + "/qomem-test-XXXXXX";
        REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
        path_ = tmpl;
    }
    ~temp_dir() {
        std::error_code ec;
        std::filesystem::remove_all(path_, ec);
    }
    temp_dir(const temp_dir&) = delete;
    temp_dir& operator=(const temp_dir&) = delete;
    const std::filesystem::path& path() const noexcept { return path_; }
    std::string operator/(const std::string& name) const { return (path_ / name).string(); }

private:
    std::filesystem::path path_;
};

/// A program a test starts, listening on a Unix socket the test made: the
/// listening socket is its fd 3 (write "{fd}" in the arguments for the
/// number); stdout and stderr go to `log_path`. Stopped by its pid — SIGTERM,
/// then SIGKILL after two seconds — when the object goes or stop() is called.
class backend_process {
public:
    backend_process(std::vector<std::string> argv, const std::string& socket_path, const std::string& log_path)
        : socket_path_(socket_path), log_path_(log_path) {
        unique_fd listener(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
        REQUIRE(listener);
        sockaddr_un addr{};
        addr.sun_family = AF_UNIX;
        REQUIRE(socket_path.size() < sizeof addr.sun_path);
        std::memcpy(addr.sun_path, socket_path.c_str(), socket_path.size() + 1);
        REQUIRE(::bind(listener.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0);
        REQUIRE(::listen(listener.get(), 1) == 0);
        // Far from 1-3, which the child's actions below set.
        listener = unique_fd(::fcntl(listener.get(), F_DUPFD_CLOEXEC, 100));
        REQUIRE(listener);
        for (std::string& a : argv)
            for (std::size_t at; (at = a.find("{fd}")) != std::string::npos;) a.replace(at, 4, "3");
        std::vector<char*> args;
        for (std::string& a : argv) args.push_back(a.data());
        args.push_back(nullptr);
        posix_spawn_file_actions_t actions;
        posix_spawn_file_actions_init(&actions);
        posix_spawn_file_actions_addopen(&actions, 1, log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
        posix_spawn_file_actions_adddup2(&actions, 1, 2);
        posix_spawn_file_actions_adddup2(&actions, listener.get(), 3); // dup2 clears close-on-exec
        const int r = ::posix_spawnp(&pid_, args[0], &actions, nullptr, args.data(), environ);
        posix_spawn_file_actions_destroy(&actions);
        INFO("starting " << argv[0]);
        REQUIRE(r == 0);
    }
    /// Stops it; when a failed REQUIRE is unwinding the test, prints what it logged.
    ~backend_process() {
        stop();
        if (std::uncaught_exceptions() > unwinding_)
            std::fprintf(stderr, "---- %s ----\n%s\n----\n", log_path_.c_str(), log().c_str());
    }
    backend_process(const backend_process&) = delete;
    backend_process& operator=(const backend_process&) = delete;

    pid_t pid() const noexcept { return pid_; }
    const std::string& socket_path() const noexcept { return socket_path_; }

    /// True while it has not exited (reaps it if it has).
    bool running() {
        if (pid_ <= 0) return false;
        int status = 0;
        if (::waitpid(pid_, &status, WNOHANG) == pid_) {
            status_ = status;
            pid_ = -1;
            return false;
        }
        return true;
    }
    /// Stops it (if still running) and returns its wait status.
    int stop() {
        if (running()) {
            ::kill(pid_, SIGTERM);
            const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
            while (running() && std::chrono::steady_clock::now() < deadline)
                std::this_thread::sleep_for(std::chrono::milliseconds(10));
            if (running()) {
                ::kill(pid_, SIGKILL);
                int status = 0;
                ::waitpid(pid_, &status, 0);
                status_ = status;
                pid_ = -1;
            }
        }
        return status_;
    }
    /// What it printed.
    std::string log() const {
        std::ifstream in(log_path_);
        std::stringstream s;
        s << in.rdbuf();
        return s.str();
    }

private:
    std::string socket_path_;
    std::string log_path_;
    pid_t pid_ = -1;
    int status_ = 0;
    int unwinding_ = std::uncaught_exceptions();
};

} // namespace qomem_test

namespace qomem_test {

/// A guest for the vhost-user front-end tests: RAM from a sealable memfd at
/// 0, a one-page MMIO hole over it at `hole` (a reservation, which splits
/// the RAM into two flat ranges), the address space "memory"; more RAM can be
/// hot-added, each from a memfd of its own. Every region is ownerless; the
/// memfds stay open as long as the guest (a vhost-user back-end maps them).
class vhost_guest {
public:
    explicit vhost_guest(std::uint64_t ram_size = 2 << 20, qomem::hwaddr hole = 0x100000) {
        ram0 = &add_ram(0, ram_size, "ram0");
        hole_ = qomem::make_reservation(nullptr, "mmio-hole", host_page());
        sys->add_subregion(hole, *hole_, 1);
        as.emplace(*sys, "memory");
    }
    ~vhost_guest() {
        as.reset();
        sys.reset();
    }
    vhost_guest(const vhost_guest&) = delete;
    vhost_guest& operator=(const vhost_guest&) = delete;

    /// Hot-adds `size` bytes of RAM (a new memfd) at `addr`.
    qomem::memory_region& add_ram(qomem::hwaddr addr, std::uint64_t size, const std::string& name = "ram") {
        ram r{memfd_with(size, {}, true), nullptr};
        r.region = qomem::make_ram_from_fd(nullptr, name, size, r.fd.get(), 0);
        sys->add_subregion(addr, *r.region);
        rams_.push_back(std::move(r));
        return *rams_.back().region;
    }
    /// Takes RAM added by add_ram out of the guest's memory map.
    void remove_ram(qomem::memory_region& mr) {
        sys->del_subregion(mr);
        std::erase_if(rams_, [&](const ram& r) { return r.region.get() == &mr; });
    }
    /// The memfd behind `mr`.
    int fd_of(const qomem::memory_region& mr) const {
        for (const ram& r : rams_)
            if (r.region.get() == &mr) return r.fd.get();
        FAIL("not RAM of this guest");
        return -1;
    }
    void write(qomem::hwaddr addr, std::span<const std::byte> b) {
        REQUIRE(as->write(addr, b.data(), b.size()) == qomem::memtx_ok);
    }
    bytes read(qomem::hwaddr addr, std::size_t n) {
        bytes out(n);
        REQUIRE(as->read(addr, out.data(), n) == qomem::memtx_ok);
        return out;
    }

    qomem::ref_ptr<qomem::memory_region> sys = qomem::make_container(nullptr, "system", qomem::u128_2_64);
    qomem::memory_region* ram0 = nullptr;
    std::optional<qomem::address_space> as;

private:
    struct ram {
        unique_fd fd;
        qomem::ref_ptr<qomem::memory_region> region;
    };
    std::vector<ram> rams_;
    qomem::ref_ptr<qomem::memory_region> hole_;
};

} // namespace qomem_test

// ---- guest drivers of the VIRTIO transports -----------------------------------------
//
// What a guest's firmware and drivers do to find a device's shared memory
// regions, through nothing but accesses to the machine's address space:
//
//     qomem_test::ecam_driver pci(*as, 0x30000000);            // ECAM window
//     const auto bar = pci.size_bar(devfn, 2);                  // firmware: all ones, read back
//     pci.place_bar(devfn, 2, 0x8000000000);                    // address, memory decoding on
//     auto shm = pci.get_shm_region(devfn, 0);                  // Linux's vp_get_shm_region
//     qomem_test::mmio_driver mmio(*as, 0x0a000000);
//     auto r = mmio.get_shm_region(0);                          // Linux's vm_get_shm_region

namespace qomem_test {

/// A shared memory region as a driver finds it (Linux's virtio_shm_region).
struct guest_shm_region {
    std::uint64_t addr;
    std::uint64_t len;
    friend bool operator==(const guest_shm_region&, const guest_shm_region&) = default;
};

/// 32-bit little-endian register accesses through an address space.
inline std::uint32_t guest_read32(qomem::address_space& as, qomem::hwaddr addr) {
    std::uint8_t b[4] = {};
    INFO("guest read of 4 bytes at 0x" << std::hex << addr);
    REQUIRE(as.read(addr, b, 4) == qomem::memtx_ok);
    return std::uint32_t(b[0]) | std::uint32_t(b[1]) << 8 | std::uint32_t(b[2]) << 16 | std::uint32_t(b[3]) << 24;
}
inline void guest_write32(qomem::address_space& as, qomem::hwaddr addr, std::uint32_t v) {
    const std::uint8_t b[4] = {static_cast<std::uint8_t>(v), static_cast<std::uint8_t>(v >> 8),
                               static_cast<std::uint8_t>(v >> 16), static_cast<std::uint8_t>(v >> 24)};
    INFO("guest write of 4 bytes at 0x" << std::hex << addr);
    REQUIRE(as.write(addr, b, 4) == qomem::memtx_ok);
}

/// A guest's PCI configuration accesses through an ECAM window, and what
/// firmware and Linux's virtio-pci driver do with them.
class ecam_driver {
public:
    ecam_driver(qomem::address_space& as, qomem::hwaddr ecam_base) : as_(&as), base_(ecam_base) {}

    qomem::hwaddr address(std::uint8_t devfn, std::uint32_t reg, std::uint8_t bus = 0) const {
        return base_ + (qomem::hwaddr(bus) << 20 | qomem::hwaddr(devfn) << 12 | reg);
    }
    /// `size` (1, 2 or 4) bytes; the access must succeed.
    std::uint32_t read(std::uint8_t devfn, std::uint32_t reg, unsigned size = 4, std::uint8_t bus = 0) {
        std::uint8_t b[4] = {};
        INFO("ECAM read of " << size << " bytes at devfn 0x" << std::hex << unsigned(devfn) << " reg 0x" << reg);
        REQUIRE(as_->read(address(devfn, reg, bus), b, size) == qomem::memtx_ok);
        std::uint32_t v = 0;
        for (unsigned i = 0; i < size; ++i) v |= std::uint32_t(b[i]) << (8 * i);
        return v;
    }
    void write(std::uint8_t devfn, std::uint32_t reg, std::uint32_t v, unsigned size = 4, std::uint8_t bus = 0) {
        std::uint8_t b[4] = {};
        for (unsigned i = 0; i < size; ++i) b[i] = static_cast<std::uint8_t>(v >> (8 * i));
        INFO("ECAM write of " << size << " bytes at devfn 0x" << std::hex << unsigned(devfn) << " reg 0x" << reg);
        REQUIRE(as_->write(address(devfn, reg, bus), b, size) == qomem::memtx_ok);
    }

    struct bar_info {
        std::uint64_t size = 0; ///< 0: not implemented
        bool is64 = false;
        bool prefetch = false;
    };
    /// Sizes BAR `index` as firmware does: memory decoding off, all ones
    /// written (to both halves of a 64-bit BAR), read back, old value restored.
    bar_info size_bar(std::uint8_t devfn, unsigned index) {
        const std::uint32_t at = qomem::pci_config::bar0 + 4 * index;
        const std::uint32_t cmd = read(devfn, qomem::pci_config::command, 2);
        write(devfn, qomem::pci_config::command, cmd & ~std::uint32_t(qomem::pci_config::command_memory), 2);
        const std::uint32_t old_low = read(devfn, at);
        bar_info info;
        info.is64 = (old_low & 0x6) == qomem::pci_config::bar_mem_type_64;
        info.prefetch = old_low & qomem::pci_config::bar_mem_prefetch;
        write(devfn, at, 0xffffffff);
        std::uint64_t mask = read(devfn, at) & ~std::uint32_t(qomem::pci_config::bar_type_mask);
        write(devfn, at, old_low);
        if (info.is64) {
            const std::uint32_t old_high = read(devfn, at + 4);
            write(devfn, at + 4, 0xffffffff);
            mask |= std::uint64_t(read(devfn, at + 4)) << 32;
            write(devfn, at + 4, old_high);
        } else if (mask) {
            mask |= 0xffffffff00000000; // a 32-bit BAR: the high half is not there
        }
        info.size = mask ? ~mask + 1 : 0;
        write(devfn, qomem::pci_config::command, cmd, 2);
        return info;
    }
    /// Writes BAR `index`'s address and turns memory decoding on.
    void place_bar(std::uint8_t devfn, unsigned index, qomem::hwaddr addr) {
        const std::uint32_t at = qomem::pci_config::bar0 + 4 * index;
        const std::uint32_t low = read(devfn, at);
        write(devfn, at, static_cast<std::uint32_t>(addr) | (low & qomem::pci_config::bar_type_mask));
        if ((low & 0x6) == qomem::pci_config::bar_mem_type_64) write(devfn, at + 4, static_cast<std::uint32_t>(addr >> 32));
        const std::uint32_t cmd = read(devfn, qomem::pci_config::command, 2);
        write(devfn, qomem::pci_config::command, cmd | qomem::pci_config::command_memory, 2);
    }
    /// The address programmed in BAR `index` (type bits cleared).
    std::uint64_t bar_address(std::uint8_t devfn, unsigned index) {
        const std::uint32_t at = qomem::pci_config::bar0 + 4 * index;
        const std::uint32_t low = read(devfn, at);
        std::uint64_t a = low & ~std::uint32_t(qomem::pci_config::bar_type_mask);
        if ((low & 0x6) == qomem::pci_config::bar_mem_type_64) a |= std::uint64_t(read(devfn, at + 4)) << 32;
        return a;
    }

    /// The offsets of the capabilities with ID `id`, walking the list as
    /// Linux's pci_find_capability does (at most 48 steps).
    std::vector<std::uint8_t> find_capabilities(std::uint8_t devfn, std::uint8_t id) {
        std::vector<std::uint8_t> out;
        if (!(read(devfn, qomem::pci_config::status, 2) & qomem::pci_config::status_cap_list)) return out;
        std::uint8_t pos = static_cast<std::uint8_t>(read(devfn, qomem::pci_config::capability_list, 1));
        for (int ttl = 48; pos >= 0x40 && ttl > 0; --ttl) {
            pos &= 0xfc;
            if (read(devfn, pos, 1) == id) out.push_back(pos);
            pos = static_cast<std::uint8_t>(read(devfn, pos + 1u, 1));
        }
        return out;
    }

    /// One VIRTIO_PCI_CAP_SHARED_MEMORY_CFG capability, as read.
    struct shm_cap {
        std::uint8_t pos, cap_len, bar, id;
        std::uint64_t offset, length;
    };
    /// Every shared memory capability (Linux's virtio_pci_find_shm_cap reads
    /// the same fields: cfg_type, cap_len, id, bar, the four dwords).
    std::vector<shm_cap> shm_caps(std::uint8_t devfn) {
        std::vector<shm_cap> out;
        for (std::uint8_t pos : find_capabilities(devfn, qomem::pci_config::cap_id_vendor)) {
            if (read(devfn, pos + 3u, 1) != 8) continue; // cfg_type
            shm_cap c{};
            c.pos = pos;
            c.cap_len = static_cast<std::uint8_t>(read(devfn, pos + 2u, 1));
            c.bar = static_cast<std::uint8_t>(read(devfn, pos + 4u, 1));
            c.id = static_cast<std::uint8_t>(read(devfn, pos + 5u, 1));
            c.offset = read(devfn, pos + 8u) | std::uint64_t(read(devfn, pos + 16u)) << 32;
            c.length = read(devfn, pos + 12u) | std::uint64_t(read(devfn, pos + 20u)) << 32;
            out.push_back(c);
        }
        return out;
    }
    /// Linux's vp_get_shm_region: the capability with this id (cap_len 24,
    /// bar < 6), the BAR's address + offset, checked against the BAR's size.
    std::optional<guest_shm_region> get_shm_region(std::uint8_t devfn, std::uint8_t id) {
        for (const shm_cap& c : shm_caps(devfn)) {
            if (c.cap_len != 24 || c.id != id || c.bar >= 6) continue;
            const std::uint64_t bar_len = size_bar(devfn, c.bar).size;
            if (c.offset + c.length < c.offset || c.offset + c.length > bar_len) return std::nullopt;
            return guest_shm_region{bar_address(devfn, c.bar) + c.offset, c.length};
        }
        return std::nullopt;
    }

private:
    qomem::address_space* as_;
    qomem::hwaddr base_;
};

/// A guest's virtio-mmio driver (Linux's virtio_mmio).
class mmio_driver {
public:
    mmio_driver(qomem::address_space& as, qomem::hwaddr base) : as_(&as), base_(base) {}
    std::uint32_t read(qomem::hwaddr reg) { return guest_read32(*as_, base_ + reg); }
    void write(qomem::hwaddr reg, std::uint32_t v) { guest_write32(*as_, base_ + reg, v); }
    /// Linux's vm_get_shm_region: select, read the length (all ones: none),
    /// then the base.
    std::optional<guest_shm_region> get_shm_region(std::uint32_t id) {
        write(qomem::virtio_mmio_reg::shm_sel, id);
        const std::uint64_t len = read(qomem::virtio_mmio_reg::shm_len_low) |
                                  std::uint64_t(read(qomem::virtio_mmio_reg::shm_len_high)) << 32;
        if (len == ~std::uint64_t(0)) return std::nullopt;
        const std::uint64_t addr = read(qomem::virtio_mmio_reg::shm_base_low) |
                                   std::uint64_t(read(qomem::virtio_mmio_reg::shm_base_high)) << 32;
        return guest_shm_region{addr, len};
    }

private:
    qomem::address_space* as_;
    qomem::hwaddr base_;
};

} // namespace qomem_test

namespace qomem_test {

/// A machine for the transport tests: 1 MiB of RAM at 0, a PCI host bridge
/// ("pcie", realized) with its ECAM window at ecam_base and its PCI memory
/// shown 1:1 in two windows, one below 4 GiB and one above (aliases, as
/// QEMU's virt machine has), the address space "memory" over "system" in
/// the machine's own memory system. Devices go under /machine/peripheral;
/// whatever is still there is unplugged when the rig goes, then its ownerless
/// regions leave "system" before their handles.
class virtio_machine {
public:
    static constexpr qomem::hwaddr ecam_base = 0x30000000;
    static constexpr qomem::hwaddr pci_window32 = 0x40000000; ///< 32-bit BARs
    static constexpr std::uint64_t pci_window32_size = 0x40000000;
    static constexpr qomem::hwaddr pci_window = 0x8000000000; ///< 64-bit BARs
    static constexpr std::uint64_t pci_window_size = 0x8000000000;

    explicit virtio_machine(unsigned ecam_buses = 1) {
        m = &qomem::add_machine(*root);
        sys = qomem::make_container(nullptr, "system", qomem::u128_2_64);
        ram = qomem::make_ram(nullptr, "ram", 0x100000);
        sys->add_subregion(0, *ram);
        auto h = qomem::make<qomem::pci_host_bridge>(ecam_buses);
        m->peripheral().add_child("pcie", *h);
        host = h.get();
        host->realize();
        sys->add_subregion(ecam_base, host->ecam());
        hole32 = qomem::make_alias(nullptr, "pci-hole32", host->pci_memory(), pci_window32, pci_window32_size);
        sys->add_subregion(pci_window32, *hole32);
        hole = qomem::make_alias(nullptr, "pci-hole", host->pci_memory(), pci_window, pci_window_size);
        sys->add_subregion(pci_window, *hole);
        as.emplace(m->memory(), *sys, "memory");
    }
    ~virtio_machine() {
        // The host bridge last: PCI functions unmap their BARs from its memory.
        // One at a time, looking again each time: unplugging a transport
        // unplugs the device on its bus, which may be one of these too.
        for (;;) {
            qomem::object* next = nullptr;
            m->peripheral().for_each_child([&](qomem::object& o) {
                if (!next && &o != host) next = &o;
            });
            if (!next) break;
            qomem::unparent(*next);
        }
        qomem::unparent(*host);
        as.reset();
        sys->del_subregion(*hole);
        sys->del_subregion(*hole32);
        sys->del_subregion(*ram);
        hole.reset();
        hole32.reset();
        ram.reset();
        sys.reset();
    }
    virtio_machine(const virtio_machine&) = delete;
    virtio_machine& operator=(const virtio_machine&) = delete;

    /// Adds `dev` as /machine/peripheral/`name`.
    template <class T>
    T& add(const std::string& name, const qomem::ref_ptr<T>& dev) {
        m->peripheral().add_child(name, *dev);
        return *dev;
    }

    std::string flat() const {
        const std::array<const qomem::address_space*, 1> spaces{&*as};
        return qomem::info_mtree(spaces, {.flatview = true});
    }

    qomem::ref_ptr<qomem::container> root = qomem::container::make_root();
    qomem::machine* m = nullptr;
    qomem::ref_ptr<qomem::memory_region> sys;
    qomem::ref_ptr<qomem::memory_region> ram;
    qomem::ref_ptr<qomem::memory_region> hole32;
    qomem::ref_ptr<qomem::memory_region> hole;
    qomem::pci_host_bridge* host = nullptr;
    std::optional<qomem::address_space> as;
};

} // namespace qomem_test
