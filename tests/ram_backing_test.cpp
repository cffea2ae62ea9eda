// tests/ram_backing_test.cpp — where RAM comes from: resizeable RAM (used
// and maximum length, ram_resize, the resized callback, QEMU's semantics),
// RAM mapped from a file path (created, existing, a directory, read-only,
// hugetlbfs when the machine has huge pages, else a tmpfs file) and from an
// fd (a read-only fd refused at creation when the mapping cannot be made).
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <qomem/address_space.hpp>
#include <qomem/device.hpp>
#include <qomem/dirty_log.hpp>
#include <qomem/memory_listener.hpp>
#include <qomem/memory_region.hpp>

#include "test_support.hpp"

namespace {

using qomem::dirty_client;
using qomem::hwaddr;
using qomem::u128;
using qomem_test::board;

/// A fresh directory on tmpfs (/dev/shm), removed with everything in it.
class scratch_dir {
public:
    scratch_dir() {
        std::string tmpl = "/dev/shm/qomem-ram-test.XXXXXX";
        if (!::mkdtemp(tmpl.data())) FAIL("mkdtemp: " << std::strerror(errno));
        path_ = tmpl;
    }
    ~scratch_dir() {
        std::error_code ec;
        std::filesystem::remove_all(path_, ec);
    }
    scratch_dir(const scratch_dir&) = delete;
    scratch_dir& operator=(const scratch_dir&) = delete;
    std::string file(const std::string& name) const { return path_ + "/" + name; }
    const std::string& path() const { return path_; }
    std::size_t entries() const {
        return static_cast<std::size_t>(std::distance(std::filesystem::directory_iterator(path_),
                                                      std::filesystem::directory_iterator{}));
    }

private:
    std::string path_;
};

/// Writes `n` bytes of `byte` to a new file at `path`.
void fill_file(const std::string& path, std::size_t n, char byte) {
    std::ofstream f(path, std::ios::binary);
    const std::string data(n, byte);
    f.write(data.data(), static_cast<std::streamsize>(n));
}

/// An fd, closed at the end of the scope.
struct fd_holder {
    int fd;
    explicit fd_holder(int f) : fd(f) { REQUIRE(fd >= 0); }
    ~fd_holder() { ::close(fd); }
    fd_holder(const fd_holder&) = delete;
    fd_holder& operator=(const fd_holder&) = delete;
};

/// A mounted hugetlbfs with free huge pages, if the machine has one.
std::optional<std::string> hugetlbfs_with_free_pages() {
    std::ifstream meminfo("/proc/meminfo");
    std::string line;
    long free_pages = 0;
    while (std::getline(meminfo, line))
        if (line.starts_with("HugePages_Free:")) free_pages = std::stol(line.substr(15));
    if (free_pages < 2) return std::nullopt;
    std::ifstream mounts("/proc/mounts");
    while (std::getline(mounts, line)) {
        std::istringstream in(line);
        std::string dev, dir, type;
        in >> dev >> dir >> type;
        if (type == "hugetlbfs" && ::access(dir.c_str(), W_OK) == 0) return dir;
    }
    return std::nullopt;
}

} // namespace

// ---- resizeable RAM ---------------------------------------------------------------

TEST_CASE("resizeable RAM: the used length follows ram_resize up to the maximum, the views "
          "change at the commit, and the resized callback gets the new size and the host memory",
          "[ram][resize]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    board b;
    std::vector<std::string> calls;
    std::byte* host = nullptr; // the RAM's memory, once reserved
    auto rom_blob = qomem::make_resizeable_ram(
        *b.dev, "etc/acpi/tables", 0x1800, 0x10000,
        [&](qomem::memory_region& mr, std::uint64_t size, void* h) {
            calls.push_back(fmt::format("{} {:#x} {}", mr.region_name(), size, h != nullptr && h == host));
        });
    b.sys->add_subregion(0x100000, *rom_blob);
    qomem::address_space as(*b.sys, "memory");
    CHECK(rom_blob->resizeable());
    CHECK(rom_blob->size() == 0x1800);
    CHECK(rom_blob->used_length() == 0x2000);
    CHECK(rom_blob->max_length() == 0x10000);
    CHECK(as.view()->ranges().back().size == 0x1800);

    // Contents written before a resize stay (one reservation of the maximum).
    const std::uint64_t marker = 0x0123456789abcdef;
    REQUIRE(as.write(0x100010, &marker, 8) == qomem::memtx_ok);
    host = rom_blob->host_ptr();

    rom_blob->ram_resize(0x9000);
    CHECK(rom_blob->size() == 0x9000);
    CHECK(rom_blob->used_length() == 0x9000);
    CHECK(rom_blob->host_ptr() == host);
    CHECK(calls == std::vector<std::string>{"etc/acpi/tables 0x9000 true"});
    CHECK(as.view()->ranges().back().size == 0x9000);
    std::uint64_t back = 0;
    REQUIRE(as.read(0x100010, &back, 8) == qomem::memtx_ok);
    CHECK(back == marker);
    REQUIRE(as.write(0x108ff8, &marker, 8) == qomem::memtx_ok); // the new end is RAM

    SECTION("within the same used length only the size changes, and the callback is called") {
        calls.clear();
        rom_blob->ram_resize(0x8801);
        CHECK(rom_blob->size() == 0x8801);
        CHECK(rom_blob->used_length() == 0x9000);
        CHECK(calls == std::vector<std::string>{"etc/acpi/tables 0x8801 true"});
        calls.clear();
        rom_blob->ram_resize(0x8801); // no change at all: no call
        CHECK(calls.empty());
    }
    SECTION("shrinking") {
        rom_blob->ram_resize(0x1000);
        CHECK(rom_blob->used_length() == 0x1000);
        CHECK(as.view()->ranges().back().size == 0x1000);
        std::uint64_t gone = 0;
        CHECK(as.read(0x108ff8, &gone, 8) == qomem::memtx_decode_error);
    }
    SECTION("past the maximum: refused with region_error, nothing changes") {
        calls.clear();
        CHECK_THROWS_AS(rom_blob->ram_resize(0x10001), qomem::region_error);
        CHECK(rom_blob->size() == 0x9000);
        CHECK(rom_blob->used_length() == 0x9000);
        CHECK(calls.empty());
    }
}

TEST_CASE("ram_resize marks the old used length clean and the new one dirty for every client (its "
          "contents must be sent again), as QEMU",
          "[ram][resize][dirty]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    board b;
    auto ram = qomem::make_resizeable_ram(*b.dev, "ram", 0x3000, 0x8000);
    ram->set_log(true, dirty_client::vga);
    ram->set_dirty(0x1000, 1);
    ram->ram_resize(0x5000);
    for (unsigned c = 0; c < qomem::dirty_client_count; ++c) {
        const auto client = static_cast<dirty_client>(c);
        INFO("client " << c);
        for (hwaddr p = 0; p < 5; ++p) CHECK(ram->get_dirty(p * 0x1000, 0x1000, client));
        CHECK_FALSE(ram->get_dirty(0x5000, 0x3000, client));
    }
    ram->ram_resize(0x2000);
    CHECK(ram->get_dirty(0, 0x2000, dirty_client::migration));
    CHECK_FALSE(ram->get_dirty(0x2000, 0x6000, dirty_client::migration));
    ram->set_log(false, dirty_client::vga);
}

TEST_CASE("RAM that is not resizeable cannot change its used length, resizeable RAM larger than "
          "its maximum cannot be made",
          "[ram][resize]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    board b;
    auto ram = qomem::make_ram(*b.dev, "ram", 0x1800);
    CHECK_FALSE(ram->resizeable());
    CHECK(ram->used_length() == 0x2000);
    CHECK(ram->max_length() == 0x2000);
    CHECK_THROWS_AS(ram->ram_resize(0x4000), qomem::region_error);
    CHECK(ram->size() == 0x1800);
    ram->ram_resize(0x1f00); // same used length: only the size (QEMU allows it)
    CHECK(ram->size() == 0x1f00);

    CHECK_THROWS_AS(qomem::make_resizeable_ram(*b.dev, "big", 0x3000, 0x2000), qomem::region_error);
    CHECK_THROWS_AS(qomem::make_resizeable_ram(*b.dev, "none", 0x3000, 0), qomem::region_error);
    qomem_test::null_regs ops;
    auto io = qomem::make_io(*b.dev, "io", 0x100, ops);
    CHECK_THROWS_AS(io->ram_resize(0x200), qomem::assertion_failure);
    CHECK(io->used_length() == 0);
}

// ---- RAM from a file -------------------------------------------------------------

TEST_CASE("RAM from a file path: a missing file is created and sized, a shared mapping reaches "
          "the file, a private one does not, and the region keeps its own fd",
          "[ram][file]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    scratch_dir dir;
    board b;
    const std::string path = dir.file("guest-ram");
    auto ram = qomem::make_ram_from_file(*b.dev, "ram", 0x4000, path);
    CHECK(std::filesystem::file_size(path) == 0x4000);
    CHECK(ram->fd() >= 0);
    CHECK(ram->ram_page_size() == static_cast<std::size_t>(::sysconf(_SC_PAGESIZE)));
    b.sys->add_subregion(0x40000000, *ram);
    qomem::address_space as(*b.sys, "memory");

    const char hello[] = "hello, file";
    REQUIRE(as.write(0x40001000, hello, sizeof hello) == qomem::memtx_ok);
    {
        std::ifstream f(path, std::ios::binary);
        f.seekg(0x1000);
        char got[sizeof hello] = {};
        f.read(got, sizeof got);
        CHECK(std::string(got) == hello);
    }

    SECTION("an existing file of the right size is used as it is") {
        auto again = qomem::make_ram_from_file(*b.dev, "again", 0x4000, path);
        char got[sizeof hello] = {};
        std::memcpy(got, again->host_ptr() + 0x1000, sizeof got);
        CHECK(std::string(got) == hello);
    }
    SECTION("a private mapping is copy-on-write: the file keeps its bytes") {
        qomem::ram_file_options o;
        o.shared = false;
        auto priv = qomem::make_ram_from_file(*b.dev, "private", 0x4000, path, o);
        std::memcpy(priv->host_ptr() + 0x1000, "HELLO", 5);
        CHECK(std::memcmp(ram->host_ptr() + 0x1000, "hello", 5) == 0);
    }
    SECTION("an existing file too small is refused, naming the sizes") {
        fill_file(dir.file("small"), 0x1000, 'x');
        try {
            (void)qomem::make_ram_from_file(*b.dev, "small", 0x4000, dir.file("small"));
            FAIL("a file too small was mapped");
        } catch (const qomem::region_error& e) {
            CHECK(std::string(e.what()).find("0x1000 bytes, 0x4000 needed") != std::string::npos);
        }
        CHECK(std::filesystem::file_size(dir.file("small")) == 0x1000);
    }
    SECTION("the offset must be page-aligned, and the RAM must fit behind it") {
        qomem::ram_file_options o;
        o.offset = 0x800;
        CHECK_THROWS_AS(qomem::make_ram_from_file(*b.dev, "odd", 0x1000, path, o), qomem::region_error);
        o.offset = 0x2000;
        CHECK_THROWS_AS(qomem::make_ram_from_file(*b.dev, "past", 0x4000, path, o), qomem::region_error);
        auto tail = qomem::make_ram_from_file(*b.dev, "tail", 0x2000, path, o);
        CHECK(tail->fd_offset() == 0x2000);
    }
    SECTION("a size below a page, or of zero, is refused") {
        CHECK_THROWS_AS(qomem::make_ram_from_file(*b.dev, "tiny", 0x10, dir.file("tiny")),
                        qomem::region_error);
        CHECK_THROWS_AS(qomem::make_ram_from_file(*b.dev, "zero", 0, dir.file("zero")), qomem::region_error);
        // A file it created for nothing is removed again.
        CHECK_FALSE(std::filesystem::exists(dir.file("tiny")));
    }
    b.sys->del_subregion(*ram);
}

TEST_CASE("RAM from a directory (a hugetlbfs mount, say): a new file in it, unlinked at once",
          "[ram][file]") {
    qomem_test::leak_check leaks;
    scratch_dir dir;
    board b;
    auto ram = qomem::make_ram_from_file(*b.dev, "ram", 0x3000, dir.path());
    CHECK(dir.entries() == 0);
    std::memset(ram->host_ptr(), 0x5a, 0x3000);
    CHECK(static_cast<unsigned char>(ram->host_ptr()[0x2fff]) == 0x5a);
    CHECK(ram->max_length() == 0x3000);
}

TEST_CASE("read-only RAM from a file: guest writes are ignored, even a debug write cannot store, "
          "and it cannot be made writable",
          "[ram][file]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    scratch_dir dir;
    fill_file(dir.file("firmware"), 0x2000, 'F');
    ::chmod(dir.file("firmware").c_str(), 0444);
    board b;
    qomem::ram_file_options o;
    o.readonly = true;
    o.readonly_fd = true;
    auto fw = qomem::make_ram_from_file(*b.dev, "fw", 0x2000, dir.file("firmware"), o);
    CHECK(fw->readonly());
    CHECK_FALSE(fw->host_writable());
    CHECK(std::string(fw->type_string()) == "rom");
    b.sys->add_subregion(0xfff00000, *fw);
    qomem::address_space as(*b.sys, "memory");

    char c = 0;
    REQUIRE(as.read(0xfff01234, &c, 1) == qomem::memtx_ok);
    CHECK(c == 'F');
    const char x = 'X';
    CHECK(as.write(0xfff01234, &x, 1) == qomem::memtx_ok); // ignored, as ROM
    CHECK(as.write_rom(0xfff01234, &x, 1) == qomem::memtx_ok); // not even a loader
    REQUIRE(as.read(0xfff01234, &c, 1) == qomem::memtx_ok);
    CHECK(c == 'F');
    CHECK_THROWS_AS(fw->set_readonly(false), qomem::assertion_failure);
    CHECK(fw->readonly());

    SECTION("readonly_fd with a writable shared mapping is refused at creation") {
        qomem::ram_file_options w;
        w.readonly_fd = true;
        try {
            (void)qomem::make_ram_from_file(*b.dev, "rw", 0x2000, dir.file("firmware"), w);
            FAIL("mapped");
        } catch (const qomem::region_error& e) {
            CHECK(std::string(e.what()).find("read-only") != std::string::npos);
        }
    }
    SECTION("readonly_fd with a private mapping: writable, copy-on-write") {
        qomem::ram_file_options p;
        p.readonly_fd = true;
        p.shared = false;
        auto cow = qomem::make_ram_from_file(*b.dev, "cow", 0x2000, dir.file("firmware"), p);
        cow->host_ptr()[0] = std::byte{'Z'};
        CHECK(static_cast<char>(fw->host_ptr()[0]) == 'F');
    }
    SECTION("readonly_fd on a missing file: nothing is created") {
        CHECK_THROWS_AS(qomem::make_ram_from_file(*b.dev, "none", 0x1000, dir.file("none"), o),
                        qomem::region_error);
        CHECK_FALSE(std::filesystem::exists(dir.file("none")));
    }
    b.sys->del_subregion(*fw);
}

TEST_CASE("RAM from hugetlbfs: the size is rounded up to the huge page, and the offset must be a "
          "multiple of it (run only where the machine has free huge pages)",
          "[ram][file][hugetlbfs]") {
    const auto mount = hugetlbfs_with_free_pages();
    if (!mount) {
        WARN("no hugetlbfs mount with free huge pages on this machine: not tested here");
        return;
    }
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    board b;
    auto ram = qomem::make_ram_from_file(*b.dev, "huge", 0x200000, *mount);
    const std::size_t huge = ram->ram_page_size();
    CHECK(huge >= 0x200000);
    CHECK(ram->used_length() == huge);
    std::memset(ram->host_ptr(), 1, 0x200000);
    qomem::ram_file_options o;
    o.offset = 0x1000;
    CHECK_THROWS_AS(qomem::make_ram_from_file(*b.dev, "odd", 0x200000, *mount, o), qomem::region_error);
}

// ---- RAM from an fd --------------------------------------------------------------

TEST_CASE("RAM from an fd is mapped at creation: the caller may close its fd at once, and a "
          "read-only fd is refused then — not at first use — unless the mapping is read-only or "
          "private",
          "[ram][fd]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    scratch_dir dir;
    fill_file(dir.file("blob"), 0x3000, 'b');
    board b;

    SECTION("a writable fd, shared, closed by the caller right away") {
        const int fd = ::open(dir.file("blob").c_str(), O_RDWR | O_CLOEXEC);
        REQUIRE(fd >= 0);
        auto ram = qomem::make_ram_from_fd(*b.dev, "ram", 0x3000, fd, 0);
        ::close(fd);
        CHECK(ram->fd() >= 0);
        CHECK(ram->fd() != fd);
        ram->host_ptr()[0x2000] = std::byte{'W'};
        std::ifstream f(dir.file("blob"), std::ios::binary);
        f.seekg(0x2000);
        CHECK(f.get() == 'W');
    }
    SECTION("a read-only fd: shared and writable is refused, naming the fd") {
        fd_holder ro(::open(dir.file("blob").c_str(), O_RDONLY | O_CLOEXEC));
        try {
            (void)qomem::make_ram_from_fd(*b.dev, "ram", 0x3000, ro.fd, 0);
            FAIL("mapped");
        } catch (const qomem::region_error& e) {
            CHECK(std::string(e.what()).find(fmt::format("fd {} is open read-only", ro.fd)) != std::string::npos);
        }
        CHECK(qomem_test::live_count("memory-region") == 1); // the board's root only
        qomem::ram_file_options o;
        o.readonly = true;
        auto rom = qomem::make_ram_from_fd(*b.dev, "rom", 0x3000, ro.fd, o);
        CHECK(static_cast<char>(rom->host_ptr()[5]) == 'b');
        o.readonly = false;
        o.shared = false;
        auto cow = qomem::make_ram_from_fd(*b.dev, "cow", 0x3000, ro.fd, o);
        cow->host_ptr()[5] = std::byte{'c'};
        CHECK(static_cast<char>(rom->host_ptr()[5]) == 'b');
    }
    SECTION("a read-only empty file cannot be extended: refused at creation") {
        fill_file(dir.file("empty"), 0, 0);
        fd_holder ro(::open(dir.file("empty").c_str(), O_RDONLY | O_CLOEXEC));
        qomem::ram_file_options o;
        o.readonly = true;
        CHECK_THROWS_AS(qomem::make_ram_from_fd(*b.dev, "ram", 0x1000, ro.fd, o), qomem::region_error);
    }
    SECTION("a memfd, empty: extended to the size") {
        fd_holder mfd(::memfd_create("qomem-test", MFD_CLOEXEC));
        auto ram = qomem::make_ram_from_fd(*b.dev, "ram", 0x2000, mfd.fd, 0);
        struct stat st;
        REQUIRE(::fstat(mfd.fd, &st) == 0);
        CHECK(st.st_size == 0x2000);
    }
    SECTION("a bad fd") {
        CHECK_THROWS_AS(qomem::make_ram_from_fd(*b.dev, "ram", 0x1000, -1, 0), qomem::region_error);
        CHECK_THROWS_AS(qomem::make_ram_from_fd(*b.dev, "ram", 0x1000, 999999, 0), qomem::region_error);
    }
}
