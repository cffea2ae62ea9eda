// Tests for qomem/vhost_user/wire.hpp, channel.hpp and backend_requests.hpp:
// the wire layouts of the shared-memory messages (as upstream), encode/decode
// round trips, a decoder that treats every byte as hostile (each refusal with
// its precise reason, every fd closed, requests without their protocol
// feature refused), the back-end request handler's replies (0 or an errno
// when need-reply is set; MEM_READ always answered), GET_SHMEM_CONFIG with its
// 256 slots, and a real second process as the back-end: it
// maps a memfd into the guest over a Unix socket, reads and writes guest
// memory (including another device's shared memory region, the fallback
// path), unmaps, then sends hostile messages over the real socket.
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/core.h>

#include <qomem/address_space.hpp>
#include <qomem/device.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/object.hpp>
#include <qomem/shmem.hpp>
#include <qomem/vhost_user/backend_requests.hpp>
#include <qomem/vhost_user/channel.hpp>
#include <qomem/vhost_user/wire.hpp>

#include "test_support.hpp"

namespace vu = qomem::vhost_user;
using preason = vu::protocol_error::reason;
using bytes_t = std::vector<std::byte>;
using qomem_test::bytes_of;
using qomem_test::count_open_fds;
using qomem_test::fd_is_open;
using qomem_test::leak_check;
using qomem_test::memfd_with;
using qomem_test::pread_bytes;
using qomem_test::throwing_assertions;

namespace Catch {
template <>
struct StringMaker<qomem::vhost_user::protocol_error::reason> {
    static std::string convert(qomem::vhost_user::protocol_error::reason r) {
        return std::string(qomem::vhost_user::protocol_error::name(r));
    }
};
template <>
struct StringMaker<qomem::memtx_result> {
    static std::string convert(qomem::memtx_result r) {
        return fmt::format("memtx_result 0x{:x}", static_cast<unsigned>(r));
    }
};
} // namespace Catch

namespace {

const std::uint64_t P = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
constexpr qomem::hwaddr bar_a = 0xfe000000; // device A's shared memory region (the one we serve)
constexpr qomem::hwaddr bar_b = 0xfd000000; // device B's: the back-end cannot translate these

constexpr auto rw = qomem::shmem_flags::read_write;
constexpr auto ro = qomem::shmem_flags::read_only;
constexpr auto req_map = static_cast<std::uint32_t>(vu::backend_request::shmem_map);
constexpr auto req_unmap = static_cast<std::uint32_t>(vu::backend_request::shmem_unmap);
constexpr auto req_read = static_cast<std::uint32_t>(vu::backend_request::mem_read);
constexpr auto req_write = static_cast<std::uint32_t>(vu::backend_request::mem_write);

// ---- bytes and fds -------------------------------------------------------------------

bytes_t pattern(unsigned seed, std::uint64_t n) { return qomem_test::pattern(seed, 0, n); }

/// `base` with `patch` written at `at`.
bytes_t patched(bytes_t base, std::size_t at, const bytes_t& patch) {
    std::copy(patch.begin(), patch.end(), base.begin() + static_cast<std::ptrdiff_t>(at));
    return base;
}

void put_u32(bytes_t& b, std::size_t at, std::uint32_t v) {
    for (std::size_t i = 0; i < 4; ++i) b[at + i] = static_cast<std::byte>(v >> (8 * i));
}
std::uint64_t get_u64(const bytes_t& b, std::size_t at) {
    std::uint64_t v = 0;
    for (std::size_t i = 0; i < 8; ++i)
        v |= std::uint64_t(std::to_integer<std::uint8_t>(b[at + i])) << (8 * i);
    return v;
}
std::uint32_t get_u32(const bytes_t& b, std::size_t at) {
    std::uint32_t v = 0;
    for (std::size_t i = 0; i < 4; ++i)
        v |= static_cast<std::uint32_t>(std::to_integer<std::uint8_t>(b[at + i])) << (8 * i);
    return v;
}

/// A header alone, with whatever fields a test wants.
bytes_t header(std::uint32_t req, std::uint32_t flags, std::uint32_t size) {
    bytes_t b(12);
    put_u32(b, 0, req);
    put_u32(b, 4, flags);
    put_u32(b, 8, size);
    return b;
}

/// A pipe's read end (a cheap fd to attach).
vu::unique_fd some_fd() {
    int p[2];
    REQUIRE(::pipe2(p, O_CLOEXEC) == 0);
    ::close(p[1]);
    return vu::unique_fd(p[0]);
}

vu::raw_message raw(bytes_t bytes, std::vector<vu::unique_fd> fds = {}) {
    return vu::raw_message{std::move(bytes), std::move(fds)};
}
vu::raw_message raw(bytes_t bytes, vu::unique_fd fd) {
    std::vector<vu::unique_fd> fds;
    fds.push_back(std::move(fd));
    return raw(std::move(bytes), std::move(fds));
}

/// Decodes `bytes` with `nfds` fresh fds attached, requires a protocol_error
/// for `why` whose message contains each needle, and requires every fd to
/// have been closed.
void require_refused(const bytes_t& bytes, std::size_t nfds, preason why,
                     const std::vector<std::string>& needles, vu::backend_channel_options options = {}) {
    std::vector<vu::unique_fd> fds;
    std::vector<int> numbers;
    for (std::size_t i = 0; i < nfds; ++i) {
        fds.push_back(some_fd());
        numbers.push_back(fds.back().get());
    }
    try {
        (void)vu::decode_backend_message(bytes, std::move(fds), options);
        FAIL("decoded");
    } catch (const vu::protocol_error& e) {
        INFO("message: " << e.what());
        CHECK(e.why() == why);
        for (const std::string& n : needles) CHECK_THAT(e.what(), Catch::Matchers::Contains(n));
    }
    for (int fd : numbers) {
        INFO("fd " << fd);
        CHECK(!fd_is_open(fd));
    }
}

/// The u64 of a reply to `req` (0 = success, else an errno).
std::uint64_t u64_reply(const std::optional<bytes_t>& reply, std::uint32_t req) {
    REQUIRE(reply.has_value());
    const vu::msg_header h = vu::decode_header(*reply);
    CHECK(h.request == req);
    CHECK(h.flags == (vu::version | vu::flag_reply));
    REQUIRE(h.size == 8);
    return get_u64(*reply, 12);
}

/// The data of a MEM_READ reply for `addr`.
bytes_t read_reply_data(const std::optional<bytes_t>& reply, std::uint64_t addr) {
    REQUIRE(reply.has_value());
    const vu::msg_header h = vu::decode_header(*reply);
    CHECK(h.request == req_read);
    CHECK(h.flags == (vu::version | vu::flag_reply));
    REQUIRE(h.size >= vu::mem_access_header_size);
    CHECK(get_u64(*reply, 12) == addr);
    CHECK(get_u32(*reply, 20) == h.size - vu::mem_access_header_size);
    return bytes_t(reply->begin() + 24, reply->end());
}

// ---- the machine -------------------------------------------------------------------------

/// RAM at 0, device A's shared memory region 0 (16 pages) in a BAR at
/// bar_a, device B's region 0 (8 pages) in a BAR at bar_b, one address space;
/// the handler serves device A and does its DMA through that address space.
struct rig : qomem_test::shmem_rig {
    qomem_test::shmem_test_device* a = nullptr;
    qomem_test::shmem_test_device* b = nullptr;

    rig() {
        a = &add_device("fs", bar_a, 16 * P);
        add_region(*a, 0, 16 * P);
        b = &add_device("gpu", bar_b, 8 * P);
        add_region(*b, 0, 8 * P);
    }
    qomem::virtio_shmem& shm_a() const { return *a->shmem(0); }
    qomem::virtio_shmem& shm_b() const { return *b->shmem(0); }
};

template <class F>
void require_io_refusal(F&& f, preason why, const std::vector<std::string>& needles) {
    try {
        f();
        FAIL("accepted");
    } catch (const vu::protocol_error& e) {
        INFO("message: " << e.what());
        CHECK(e.why() == why);
        for (const std::string& n : needles) CHECK_THAT(e.what(), Catch::Matchers::Contains(n));
    }
}

} // namespace

// ---- layouts and round trips ------------------------------------------------------------

TEST_CASE("wire layouts are pinned as upstream: 12-byte header, 40-byte VhostUserMMap with flags 0 "
          "read-only / 1 read-write, 2,056-byte shmem config, SHMEM protocol bit 22",
          "[vhost-user]") {
    static_assert(sizeof(vu::msg_header) == 12);
    static_assert(sizeof(vu::mmap_payload) == 40);
    static_assert(sizeof(vu::shmem_config_payload) == 2056);
    static_assert(sizeof(vu::mem_region_payload) == 32 && sizeof(vu::vring_addr_payload) == 40);
    static_assert(static_cast<std::uint64_t>(qomem::shmem_flags::read_only) == 0);
    static_assert(static_cast<std::uint64_t>(qomem::shmem_flags::read_write) == 1);
    static_assert(offsetof(vu::mmap_payload, fd_offset) == 8);
    static_assert(offsetof(vu::mmap_payload, shm_offset) == 16);
    static_assert(offsetof(vu::mmap_payload, len) == 24);
    static_assert(offsetof(vu::mmap_payload, flags) == 32);
    static_assert(offsetof(vu::shmem_config_payload, memory_sizes) == 8);
    static_assert(vu::header_size == 12 && vu::mem_access_header_size == 12);
    static_assert(vu::version == 0x1 && vu::flag_reply == 0x4 && vu::flag_need_reply == 0x8);
    static_assert(vu::mask(vu::protocol_feature::shmem) == 0x400000 && vu::max_shmem_regions == 256);
    static_assert(vu::mask(vu::protocol_feature::get_vring_base_inflight) == 0x100000); // not SHMEM
    static_assert(vu::mask(vu::protocol_feature::gpa_addresses) == 0x200000);           // not SHMEM
    static_assert(vu::mask(vu::protocol_feature::configure_mem_slots) == 0x8000);
    static_assert(req_map == 9 && req_unmap == 10 && req_read == 11 && req_write == 12);
    static_assert(static_cast<std::uint32_t>(vu::frontend_request::get_shmem_config) == 44);
    static_assert(static_cast<std::uint32_t>(vu::frontend_request::add_mem_reg) == 37);
    static_assert(static_cast<std::uint32_t>(vu::frontend_request::rem_mem_reg) == 38);

    // Every byte of an encoded SHMEM_MAP, little-endian, no holes.
    vu::mmap_payload m = vu::make_mmap_payload(3, 0x1122334455667788, 0x0102030405060708, 0xa0b0c0d0e0f00010, rw);
    const bytes_t b = vu::encode_shmem_map(m, true);
    // clang-format off
    const std::array<std::uint8_t, 52> expected{
        9,    0,    0,    0,    0x09, 0,    0,    0,    40,   0,    0,    0,    // header
        3,    0,    0,    0,    0,    0,    0,    0,                            // shmid, padding
        0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11,                         // fd_offset
        0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01,                         // shm_offset
        0x10, 0x00, 0xf0, 0xe0, 0xd0, 0xc0, 0xb0, 0xa0,                         // len
        1,    0,    0,    0,    0,    0,    0,    0};                           // flags: read-write
    // clang-format on
    REQUIRE(b.size() == expected.size());
    for (std::size_t i = 0; i < b.size(); ++i) {
        INFO("byte " << i);
        CHECK(std::to_integer<std::uint8_t>(b[i]) == expected[i]);
    }
    // UNMAP differs only in the request id; MEM_READ is header + 12.
    const bytes_t u = vu::encode_shmem_unmap(m, false);
    CHECK(get_u32(u, 0) == 10);
    CHECK(get_u32(u, 4) == vu::version);
    CHECK(bytes_t(u.begin() + 8, u.end()) == bytes_t(b.begin() + 8, b.end()));
    const bytes_t r = vu::encode_mem_read(0x8877665544332211, 0x100, false);
    CHECK(r.size() == 24);
    CHECK(bytes_t(r.begin(), r.begin() + 12) == header(11, vu::version, 12));
    CHECK(get_u64(r, 12) == 0x8877665544332211);
    CHECK(get_u32(r, 20) == 0x100);
    // GET_SHMEM_CONFIG: a bare header; its reply 12 + 2,056 bytes, by shmid.
    CHECK(vu::encode_get_shmem_config() == header(44, vu::version, 0));
    vu::shmem_config_payload c{};
    c.nregions = 3;
    c.memory_sizes[0] = 0x1000;
    c.memory_sizes[1] = 0x0102030405060708;
    c.memory_sizes[255] = 0x2000;
    const bytes_t cr = vu::encode_shmem_config_reply(c);
    REQUIRE(cr.size() == 12 + 2056);
    CHECK(bytes_t(cr.begin(), cr.begin() + 12) == header(44, vu::version | vu::flag_reply, 2056));
    CHECK(get_u32(cr, 12) == 3);
    CHECK(get_u32(cr, 16) == 0);
    CHECK(get_u64(cr, 20) == 0x1000);
    CHECK(get_u64(cr, 28) == 0x0102030405060708);
    CHECK(get_u64(cr, 36) == 0);
    CHECK(get_u64(cr, 20 + 8 * 255) == 0x2000);
    // The front-end side's requests: SET_MEM_TABLE entries and ADD_MEM_REG.
    const vu::mem_region_payload reg{0x100000, 0x200000, 0x7f0000001000, 0x3000};
    const bytes_t add = vu::encode_mem_reg(vu::frontend_request::add_mem_reg, reg, true);
    REQUIRE(add.size() == 12 + 40);
    CHECK(bytes_t(add.begin(), add.begin() + 12) == header(37, vu::version | vu::flag_need_reply, 40));
    CHECK(get_u64(add, 12) == 0); // padding
    CHECK(get_u64(add, 20) == 0x100000);
    CHECK(get_u64(add, 28) == 0x200000);
    CHECK(get_u64(add, 36) == 0x7f0000001000);
    CHECK(get_u64(add, 44) == 0x3000);
    const std::array<vu::mem_region_payload, 2> two{reg, vu::mem_region_payload{1, 2, 3, 4}};
    const bytes_t table = vu::encode_mem_table(two);
    REQUIRE(table.size() == 12 + 8 + 64);
    CHECK(bytes_t(table.begin(), table.begin() + 12) == header(5, vu::version, 72));
    CHECK(get_u32(table, 12) == 2);
    CHECK(get_u64(table, 20 + 32) == 1);
    CHECK(get_u64(table, 20 + 56) == 4);
    const bytes_t addr = vu::encode_vring_addr({1, 0, 0xa000, 0xc000, 0xb000, 0});
    REQUIRE(addr.size() == 12 + 40);
    CHECK(get_u32(addr, 12) == 1);
    CHECK(get_u64(addr, 20) == 0xa000); // desc, used, avail: upstream's order
    CHECK(get_u64(addr, 28) == 0xc000);
    CHECK(get_u64(addr, 36) == 0xb000);
}

TEST_CASE("every back-end request survives encode then decode", "[vhost-user]") {
    const std::size_t fds_before = count_open_fds();
    SECTION("SHMEM_MAP, with its fd, with and without need-reply") {
        for (bool need_reply : {false, true}) {
            vu::mmap_payload m = vu::make_mmap_payload(7, 0x3000, 0x7000, 0x2000, rw);
            m.padding[3] = 0x5a; // padding is carried as received
            vu::unique_fd fd = some_fd();
            const int number = fd.get();
            vu::backend_message d = vu::decode_backend_message(vu::encode_shmem_map(m, need_reply), [&] {
                std::vector<vu::unique_fd> v;
                v.push_back(std::move(fd));
                return v;
            }());
            CHECK(d.header.request == req_map);
            CHECK(d.need_reply() == need_reply);
            auto* body = std::get_if<vu::shmem_map_request>(&d.body);
            REQUIRE(body);
            CHECK(body->map.shmid == 7);
            CHECK(body->map.padding[3] == 0x5a);
            CHECK(body->map.fd_offset == 0x3000);
            CHECK(body->map.shm_offset == 0x7000);
            CHECK(body->map.len == 0x2000);
            CHECK(body->map.flags == 1); // read-write
            CHECK(body->fd.get() == number); // the very fd, owned by the message now
            CHECK(vu::encode_shmem_map(body->map, need_reply) == vu::encode_shmem_map(m, need_reply));
        }
    }
    SECTION("SHMEM_UNMAP") {
        const vu::mmap_payload m = vu::make_mmap_payload(1, 0, 0x10000, 0x1000, ro);
        vu::backend_message d = vu::decode_backend_message(vu::encode_shmem_unmap(m, true), {});
        auto* body = std::get_if<vu::shmem_unmap_request>(&d.body);
        REQUIRE(body);
        CHECK(d.header.request == req_unmap);
        CHECK(d.need_reply());
        CHECK(body->map.shmid == 1);
        CHECK(body->map.shm_offset == 0x10000);
        CHECK(body->map.len == 0x1000);
    }
    SECTION("MEM_READ, at both ends of the size range") {
        for (std::uint32_t size : {1u, 4096u}) {
            vu::backend_message d = vu::decode_backend_message(vu::encode_mem_read(0xfe001234, size), {});
            auto* body = std::get_if<vu::mem_read_request>(&d.body);
            REQUIRE(body);
            CHECK(d.header.request == req_read);
            CHECK(d.need_reply()); // the default
            CHECK(body->guest_address == 0xfe001234);
            CHECK(body->size == size);
        }
    }
    SECTION("MEM_WRITE, at both ends of the size range") {
        for (std::uint64_t size : {std::uint64_t(1), std::uint64_t(4096)}) {
            const bytes_t data = pattern(3, size);
            vu::backend_message d = vu::decode_backend_message(vu::encode_mem_write(0x42, data, false), {});
            auto* body = std::get_if<vu::mem_write_request>(&d.body);
            REQUIRE(body);
            CHECK(d.header.request == req_write);
            CHECK(!d.need_reply());
            CHECK(body->guest_address == 0x42);
            CHECK(body->data == data);
        }
    }
    SECTION("replies") {
        const bytes_t r = vu::encode_u64_reply(req_map, 0xdeadbeef);
        CHECK(u64_reply(r, req_map) == 0xdeadbeef);
        const bytes_t data = bytes_of("read back");
        CHECK(read_reply_data(vu::encode_mem_read_reply(0x99, data), 0x99) == data);
        // A reply is not a back-end request.
        require_refused(r, 0, preason::bad_flags, {"reply flag"});
    }
    CHECK(count_open_fds() == fds_before);
}

// ---- the hostile decoder -------------------------------------------------------------------

TEST_CASE("the decoder refuses each hostile input with its reason, closing every fd", "[vhost-user]") {
    const std::size_t fds_before = count_open_fds();
    const bytes_t map = vu::encode_shmem_map(vu::make_mmap_payload(0, 0, 0, 0x1000, rw), true);
    const bytes_t unmap = vu::encode_shmem_unmap(vu::make_mmap_payload(0, 0, 0, 0x1000, ro), true);
    const bytes_t read = vu::encode_mem_read(0x1000, 16);
    const bytes_t write = vu::encode_mem_write(0x1000, pattern(1, 16), true);

    SECTION("a truncated header") {
        require_refused({}, 1, preason::truncated_header, {"0 bytes", "need 12"});
        require_refused(bytes_t(map.begin(), map.begin() + 11), 1, preason::truncated_header, {"11 bytes"});
    }
    SECTION("a size field disagreeing with the bytes") {
        bytes_t more = map;
        more.push_back(std::byte{0});
        require_refused(more, 1, preason::size_mismatch, {"says 40", "41 received"});
        require_refused(bytes_t(map.begin(), map.end() - 1), 1, preason::size_mismatch, {"39 received"});
        bytes_t lying = map;
        put_u32(lying, 8, 0xffffffff);
        require_refused(lying, 1, preason::size_mismatch, {"4294967295"});
        require_refused(header(req_read, 0x9, 12), 0, preason::size_mismatch, {"says 12", "0 received"});
    }
    SECTION("an unknown request id") {
        for (std::uint32_t id : {0u, 1u, 8u, 13u, 44u, 0xffffffffu}) {
            bytes_t b = header(id, vu::version, 4);
            b.resize(16);
            require_refused(b, 1, preason::unknown_request, {fmt::format("request {}", id)});
        }
    }
    SECTION("a bad version") {
        for (std::uint32_t flags : {0x0u, 0x2u, 0x3u, 0x8u}) {
            bytes_t b = map;
            put_u32(b, 4, flags);
            require_refused(b, 1, preason::bad_version, {fmt::format("0x{:x}", flags)});
        }
    }
    SECTION("unknown flag bits") {
        for (std::uint32_t flags : {0x11u, 0x19u, 0x80000001u}) {
            bytes_t b = read;
            put_u32(b, 4, flags);
            require_refused(b, 0, preason::bad_flags, {fmt::format("0x{:x}", flags)});
        }
    }
    SECTION("the reply flag on a back-end request") {
        bytes_t b = map;
        put_u32(b, 4, vu::version | vu::flag_reply);
        require_refused(b, 1, preason::bad_flags, {"request 9", "reply flag"});
    }
    SECTION("SHMEM_MAP without its fd") {
        require_refused(map, 0, preason::missing_fd, {"0 fd(s) attached, need 1"});
    }
    SECTION("extra fds, all closed") {
        require_refused(map, 2, preason::extra_fds, {"2 fd(s) attached, need 1"});
        require_refused(map, 8, preason::extra_fds, {"8 fd(s)"});
        require_refused(unmap, 1, preason::extra_fds, {"need 0"});
        require_refused(read, 1, preason::extra_fds, {"need 0"});
        require_refused(write, 3, preason::extra_fds, {"3 fd(s)"});
    }
    SECTION("oversized MEM_READ / MEM_WRITE: above 4096, or above a configured limit") {
        require_refused(vu::encode_mem_read(0, 4097), 0, preason::oversized, {"4097", "4096"});
        require_refused(vu::encode_mem_read(0, 0xffffffff), 0, preason::oversized, {"4294967295"});
        require_refused(vu::encode_mem_write(0, pattern(2, 4097)), 0, preason::oversized, {"4097"});
        const vu::backend_channel_options small{.max_mem_access = 256};
        require_refused(vu::encode_mem_read(0, 257), 0, preason::oversized, {"257", "256"}, small);
        require_refused(vu::encode_mem_write(0, pattern(2, 257)), 0, preason::oversized, {"257"}, small);
        (void)vu::decode_backend_message(vu::encode_mem_read(0, 256), {}, small); // the limit itself is fine
    }
    SECTION("requests whose protocol feature was not negotiated") {
        const vu::backend_channel_options none{.protocol_features = 0};
        require_refused(map, 1, preason::not_negotiated, {"request 9 (SHMEM_MAP)", "bit 22"}, none);
        require_refused(unmap, 0, preason::not_negotiated, {"SHMEM_UNMAP"}, none);
        require_refused(read, 0, preason::not_negotiated, {"MEM_READ", "bit 63"}, none);
        require_refused(write, 0, preason::not_negotiated, {"MEM_WRITE"}, none);
        const vu::backend_channel_options shmem_only{.protocol_features = vu::mask(vu::protocol_feature::shmem)};
        (void)vu::decode_backend_message(unmap, {}, shmem_only);
        require_refused(read, 0, preason::not_negotiated, {"MEM_READ"}, shmem_only);
    }
    SECTION("a zero-size MEM_READ or MEM_WRITE") {
        // Refused as out of the allowed 1..max range (reason: oversized).
        require_refused(vu::encode_mem_read(0, 0), 0, preason::oversized, {"MEM_READ of 0 bytes"});
        bytes_t w = header(req_write, vu::version, 12);
        w.resize(24);
        require_refused(w, 0, preason::oversized, {"MEM_WRITE of 0 bytes"});
    }
    SECTION("a MEM_WRITE whose payload does not match its size field") {
        bytes_t w = write; // 16 data bytes; the size field now says 32
        put_u32(w, 20, 32);
        require_refused(w, 0, preason::bad_payload, {"28 bytes", "expected 44"});
        put_u32(w, 20, 8);
        require_refused(w, 0, preason::bad_payload, {"expected 20"});
        require_refused(header(req_write, vu::version, 0), 0, preason::bad_payload, {"need at least 12"});
        bytes_t short_write = header(req_write, vu::version, 11);
        short_write.resize(23);
        require_refused(short_write, 0, preason::bad_payload, {"11 bytes"});
    }
    SECTION("fixed-size payloads of the wrong size") {
        bytes_t short_map = header(req_map, vu::version, 39);
        short_map.resize(51);
        require_refused(short_map, 1, preason::bad_payload, {"39 bytes", "expected 40"});
        bytes_t long_unmap = header(req_unmap, vu::version, 48);
        long_unmap.resize(60);
        require_refused(long_unmap, 0, preason::bad_payload, {"48 bytes"});
        bytes_t long_read = header(req_read, vu::version, 16);
        long_read.resize(28);
        require_refused(long_read, 0, preason::bad_payload, {"16 bytes", "expected 12"});
    }
    CHECK(count_open_fds() == fds_before);
}

// ---- the front-end -----------------------------------------------------------------------

TEST_CASE("the back-end request handler applies requests and answers need-reply with 0 or an errno", "[vhost-user]") {
    leak_check leaks;
    throwing_assertions asserts;
    const std::size_t fds_before = count_open_fds();
    {
        rig r;
        vu::backend_request_handler fe(r.a, *r.as);
        CHECK(fe.max_payload() == 12 + 4096);
        const bytes_t file = pattern(5, 4 * P);
        vu::unique_fd memfd = memfd_with(4 * P, file);
        auto dup_fd = [&] { return vu::unique_fd(::dup(memfd.get())); };

        // SHMEM_MAP with need-reply: success 0, the fd closed, the guest sees the file.
        vu::unique_fd given = dup_fd();
        const int given_number = given.get();
        CHECK(u64_reply(fe.handle(raw(vu::encode_shmem_map(vu::make_mmap_payload(0, P, 2 * P, 2 * P, rw), true),
                                      std::move(given))),
                        req_map) == 0);
        CHECK(fe.last_error().empty());
        CHECK(!fd_is_open(given_number));
        CHECK(r.shm_a().active_mappings() == 1);
        bytes_t seen(2 * P);
        CHECK(r.as->read(bar_a + 2 * P, seen.data(), seen.size()) == qomem::memtx_ok);
        CHECK(seen == bytes_t(file.begin() + static_cast<std::ptrdiff_t>(P),
                              file.begin() + static_cast<std::ptrdiff_t>(3 * P)));

        // Without need-reply: applied, nothing to send.
        CHECK(!fe.handle(raw(vu::encode_shmem_map(vu::make_mmap_payload(0, 0, 8 * P, P, rw), false), dup_fd())));
        CHECK(r.shm_a().active_mappings() == 2);

        SECTION("refused requests: an errno for each kind of refusal, nothing changed") {
            const auto map_reply = [&](const vu::mmap_payload& m) {
                return u64_reply(fe.handle(raw(vu::encode_shmem_map(m, true), dup_fd())), req_map);
            };
            CHECK(map_reply(vu::make_mmap_payload(0, 0, 2 * P, P, rw)) == EEXIST);
            CHECK_THAT(fe.last_error(), Catch::Matchers::Contains("overlaps"));
            CHECK(map_reply(vu::make_mmap_payload(5, 0, 0, P, rw)) == ENOENT);
            CHECK_THAT(fe.last_error(), Catch::Matchers::Contains("shmid 5"));
            CHECK(map_reply(vu::make_mmap_payload(0, 0, 0x800, P, rw)) == EINVAL);
            vu::mmap_payload bad_flags = vu::make_mmap_payload(0, 0, 0, P, rw);
            bad_flags.flags = 0x3; // qomem's old read-write: bit 1 is not upstream's
            CHECK(map_reply(bad_flags) == EINVAL);
            CHECK_THAT(fe.last_error(), Catch::Matchers::Contains("unknown bits 0x2"));
            CHECK(map_reply(vu::make_mmap_payload(0, 0, 0, 0, rw)) == EINVAL);
            CHECK(map_reply(vu::make_mmap_payload(0, 0, 16 * P, P, rw)) == EINVAL);
            CHECK(map_reply(vu::make_mmap_payload(0, 4 * P, 0, P, rw)) == EINVAL); // past the end of the file
            r.shm_a().set_max_mappings(2);
            CHECK(map_reply(vu::make_mmap_payload(0, 0, 0, P, rw)) == ENOSPC);
            r.shm_a().set_max_mappings(4096);
            // A pipe cannot be mapped: the mmap fails, reported as ENOMEM.
            CHECK(u64_reply(fe.handle(raw(vu::encode_shmem_map(vu::make_mmap_payload(0, 0, 0, P, ro), true), some_fd())),
                            req_map) == ENOMEM);
            CHECK_THAT(fe.last_error(), Catch::Matchers::Contains("mmap"));
            // UNMAP of something that is not exactly one mapping.
            CHECK(u64_reply(fe.handle(raw(vu::encode_shmem_unmap(vu::make_mmap_payload(0, 0, 2 * P, P, ro), true))),
                            req_unmap) == EINVAL);
            CHECK(u64_reply(fe.handle(raw(vu::encode_shmem_unmap(vu::make_mmap_payload(3, 0, 2 * P, 2 * P, ro), true))),
                            req_unmap) == ENOENT);
            // Without need-reply a refusal is silent, but recorded.
            CHECK(!fe.handle(raw(vu::encode_shmem_map(vu::make_mmap_payload(0, 0, 2 * P, P, rw), false), dup_fd())));
            CHECK_THAT(fe.last_error(), Catch::Matchers::Contains("overlaps"));
            CHECK(r.shm_a().active_mappings() == 2);
            CHECK(r.shm_a().live_mappings() == 2);
        }
        SECTION("messages that do not decode: EINVAL when need-reply is set, else silence; fds closed") {
            // SHMEM_MAP with two fds and need-reply.
            std::vector<vu::unique_fd> two;
            two.push_back(dup_fd());
            two.push_back(some_fd());
            const int n0 = two[0].get(), n1 = two[1].get();
            CHECK(
                u64_reply(fe.handle(raw(vu::encode_shmem_map(vu::make_mmap_payload(0, 0, 0, P, rw), true), std::move(two))),
                          req_map) == EINVAL);
            CHECK_THAT(fe.last_error(), Catch::Matchers::Contains("2 fd(s)"));
            CHECK(!fd_is_open(n0));
            CHECK(!fd_is_open(n1));
            // SHMEM_MAP without its fd.
            CHECK(u64_reply(fe.handle(raw(vu::encode_shmem_map(vu::make_mmap_payload(0, 0, 0, P, rw), true))), req_map) ==
                  EINVAL);
            // The same without need-reply: no answer.
            CHECK(!fe.handle(raw(vu::encode_shmem_map(vu::make_mmap_payload(0, 0, 0, P, rw), false))));
            CHECK_THAT(fe.last_error(), Catch::Matchers::Contains("0 fd(s) attached"));
            // Need-reply on a message with a bad version is still answered.
            bytes_t bad = vu::encode_shmem_unmap(vu::make_mmap_payload(0, 0, 2 * P, 2 * P, ro), true);
            put_u32(bad, 4, 0x8 | 0x2);
            CHECK(u64_reply(fe.handle(raw(bad)), req_unmap) == EINVAL);
            // Unknown request with need-reply: answered under its own id.
            bytes_t unknown = header(77, 0x9, 0);
            CHECK(u64_reply(fe.handle(raw(unknown)), 77) == EINVAL);
            // A truncated header cannot be answered.
            vu::unique_fd lone = some_fd();
            const int lone_number = lone.get();
            CHECK(!fe.handle(raw(bytes_t(5), std::move(lone))));
            CHECK_THAT(fe.last_error(), Catch::Matchers::Contains("truncated header"));
            CHECK(!fd_is_open(lone_number));
            CHECK(r.shm_a().active_mappings() == 2); // nothing was unmapped
        }
        SECTION("MEM_READ is always answered: data, or an errno") {
            bytes_t expect(file.begin() + static_cast<std::ptrdiff_t>(P),
                           file.begin() + static_cast<std::ptrdiff_t>(P + 64));
            CHECK(read_reply_data(fe.handle(raw(vu::encode_mem_read(bar_a + 2 * P, 64, false))),
                                  bar_a + 2 * P) == expect);
            CHECK(read_reply_data(fe.handle(raw(vu::encode_mem_read(bar_a + 2 * P, 64, true))),
                                  bar_a + 2 * P) == expect);
            CHECK(read_reply_data(fe.handle(raw(vu::encode_mem_read(0x100, 4096, false))), 0x100).size() ==
                  4096);
            // Nothing mapped there (the reservation, then a hole of the system space).
            CHECK(u64_reply(fe.handle(raw(vu::encode_mem_read(bar_a, 16, false))), req_read) == EFAULT);
            CHECK_THAT(fe.last_error(), Catch::Matchers::Contains("MEM_READ of 16 bytes"));
            CHECK(u64_reply(fe.handle(raw(vu::encode_mem_read(0x80000000, 8, false))), req_read) == EFAULT);
            // Straddling the end of the mapping.
            CHECK(u64_reply(fe.handle(raw(vu::encode_mem_read(bar_a + 4 * P - 8, 16, false))), req_read) ==
                  EFAULT);
            // Not decodable, no need-reply: still answered.
            CHECK(u64_reply(fe.handle(raw(vu::encode_mem_read(bar_a + 2 * P, 0, false))), req_read) ==
                  EINVAL);
            CHECK(u64_reply(fe.handle(raw(vu::encode_mem_read(bar_a + 2 * P, 4097, false))), req_read) ==
                  EINVAL);
        }
        SECTION("MEM_WRITE: 0 or EFAULT with need-reply, silence without") {
            const bytes_t hello = bytes_of("hello through the front-end");
            CHECK(u64_reply(fe.handle(raw(vu::encode_mem_write(bar_a + 2 * P + 32, hello, true))),
                            req_write) == 0);
            CHECK(pread_bytes(memfd.get(), P + 32, hello.size()) == hello);
            const bytes_t again = bytes_of("quietly");
            CHECK(!fe.handle(raw(vu::encode_mem_write(bar_a + 2 * P, again, false))));
            CHECK(pread_bytes(memfd.get(), P, again.size()) == again);
            CHECK(u64_reply(fe.handle(raw(vu::encode_mem_write(bar_a + P, hello, true))), req_write) ==
                  EFAULT);
            CHECK(!fe.handle(raw(vu::encode_mem_write(bar_a + P, hello, false))));
            CHECK_THAT(fe.last_error(), Catch::Matchers::Contains("MEM_WRITE"));
            // RAM of the system space works too.
            CHECK(u64_reply(fe.handle(raw(vu::encode_mem_write(0x2000, hello, true))), req_write) == 0);
            bytes_t ram(hello.size());
            CHECK(r.as->read(0x2000, ram.data(), ram.size()) == qomem::memtx_ok);
            CHECK(ram == hello);
        }
        SECTION("the fallback: MEM_READ / MEM_WRITE into another device's shared memory region") {
            const bytes_t other = pattern(9, P);
            vu::unique_fd b_file = memfd_with(P, other);
            r.b->shmem_map(0, b_file.get(), 0, 3 * P, P, rw);
            const bytes_t msg = bytes_of("via the DMA address space");
            CHECK(u64_reply(fe.handle(raw(vu::encode_mem_write(bar_b + 3 * P + 100, msg, true))),
                            req_write) == 0);
            CHECK(pread_bytes(b_file.get(), 100, msg.size()) == msg);
            CHECK(read_reply_data(fe.handle(raw(vu::encode_mem_read(bar_b + 3 * P + 100,
                                                                    static_cast<std::uint32_t>(msg.size())))),
                                  bar_b + 3 * P + 100) == msg);
        }
        SECTION("SHMEM_UNMAP: success, then the guest no longer sees it") {
            CHECK(u64_reply(fe.handle(raw(vu::encode_shmem_unmap(vu::make_mmap_payload(0, 0, 2 * P, 2 * P, ro), true))),
                            req_unmap) == 0);
            CHECK(!fe.handle(raw(vu::encode_shmem_unmap(vu::make_mmap_payload(0, 0, 8 * P, P, ro), false))));
            CHECK(fe.last_error().empty());
            std::uint64_t v;
            CHECK(r.as->read(bar_a + 2 * P, &v, 8) == qomem::memtx_decode_error);
            CHECK(r.shm_a().live_mappings() == 0);
        }
        SECTION("SHMEM_UNMAP then SHMEM_MAP of the same range while guest DMA holds the old pages: both 0") {
            qomem::dma_mapping dma = r.as->map(bar_a + 2 * P, 2 * P, false);
            REQUIRE(dma);
            REQUIRE(!dma.bounced());
            CHECK(u64_reply(fe.handle(raw(vu::encode_shmem_unmap(vu::make_mmap_payload(0, 0, 2 * P, 2 * P, ro), true))),
                            req_unmap) == 0);
            const bytes_t other = pattern(8, 2 * P);
            vu::unique_fd next = memfd_with(2 * P, other);
            CHECK(u64_reply(fe.handle(raw(vu::encode_shmem_map(vu::make_mmap_payload(0, 0, 2 * P, 2 * P, rw), true),
                                          std::move(next))),
                            req_map) == 0);
            bytes_t now(2 * P);
            CHECK(r.as->read(bar_a + 2 * P, now.data(), now.size()) == qomem::memtx_ok);
            CHECK(now == other);
            CHECK(std::memcmp(dma.data(), file.data() + P, 2 * P) == 0); // the DMA: the old file
            r.as->unmap(dma, 0);
            CHECK(r.shm_a().live_mappings() == 2);
        }
        SECTION("a configured MEM_READ / MEM_WRITE limit") {
            vu::backend_request_handler small(r.a, *r.as, {.max_mem_access = 256});
            CHECK(small.max_payload() == 12 + 256);
            CHECK(u64_reply(small.handle(raw(vu::encode_mem_write(bar_a + 2 * P, pattern(1, 257), true))),
                            req_write) == EINVAL);
            CHECK_THAT(small.last_error(), Catch::Matchers::Contains("257"));
            CHECK(u64_reply(small.handle(raw(vu::encode_mem_write(bar_a + 2 * P, pattern(1, 256), true))),
                            req_write) == 0);
            CHECK(u64_reply(small.handle(raw(vu::encode_mem_read(bar_a + 2 * P, 257))), req_read) == EINVAL);
            CHECK(read_reply_data(small.handle(raw(vu::encode_mem_read(bar_a + 2 * P, 256))),
                                  bar_a + 2 * P) == pattern(1, 256));
        }
    }
    CHECK(count_open_fds() == fds_before);
}

TEST_CASE("GET_SHMEM_CONFIG: all 256 shmids, nregions the count of regions, the front-end counting "
          "non-zero sizes itself",
          "[vhost-user]") {
    leak_check leaks;
    throwing_assertions asserts;
    rig r;
    r.a->declare_shmem(2, 4 * P);   // a gap at shmid 1
    r.a->declare_shmem(9, P);       // past the 8 slots qomem used to carry
    r.a->declare_shmem(255, 2 * P); // the last slot
    vu::backend_request_handler fe(r.a, *r.as);
    const vu::shmem_config_payload c = fe.shmem_config();
    CHECK(c.nregions == 4);
    CHECK(c.count() == 4);
    CHECK(c.padding == 0);
    CHECK(c.memory_sizes[0] == 16 * P);
    CHECK(c.memory_sizes[1] == 0);
    CHECK(c.memory_sizes[2] == 4 * P);
    CHECK(c.memory_sizes[9] == P);
    CHECK(c.memory_sizes[255] == 2 * P);
    std::size_t zero = 0;
    for (std::uint64_t size : c.memory_sizes) zero += size == 0;
    CHECK(zero == 252);

    const bytes_t wire = vu::encode_shmem_config_reply(c);
    REQUIRE(wire.size() == 12 + 2056);
    const vu::shmem_config_payload d = vu::decode_shmem_config_reply(wire);
    CHECK(d.nregions == c.nregions);
    CHECK(std::equal(std::begin(d.memory_sizes), std::end(d.memory_sizes), std::begin(c.memory_sizes)));

    SECTION("a reply whose nregions disagrees: the count of non-zero sizes is what counts") {
        bytes_t prefix_style = wire;
        put_u32(prefix_style, 12, 256); // "256 slots", as a prefix length
        const vu::shmem_config_payload e = vu::decode_shmem_config_reply(prefix_style);
        CHECK(e.nregions == 256);
        CHECK(e.count() == 4);
    }
    SECTION("hostile replies are refused") {
        bytes_t not_reply = wire;
        put_u32(not_reply, 4, vu::version);
        require_io_refusal([&] { vu::decode_shmem_config_reply(not_reply); }, preason::bad_payload,
                           {"expected the reply to request 44"});
        bytes_t other = wire;
        put_u32(other, 0, 43);
        require_io_refusal([&] { vu::decode_shmem_config_reply(other); }, preason::bad_payload, {"request 43"});
        bytes_t too_many = wire;
        put_u32(too_many, 12, 257);
        require_io_refusal([&] { vu::decode_shmem_config_reply(too_many); }, preason::bad_payload,
                           {"257 regions"});
        // qomem's old 72-byte reply.
        bytes_t short_reply(wire.begin(), wire.begin() + 12 + 72);
        put_u32(short_reply, 8, 72);
        require_io_refusal([&] { vu::decode_shmem_config_reply(short_reply); }, preason::bad_payload,
                           {"72 bytes", "expected 2056"});
        require_io_refusal([&] { vu::decode_shmem_config_reply(bytes_t(wire.begin(), wire.end() - 1)); },
                           preason::size_mismatch, {"2055 received"});
        require_io_refusal([&] { vu::decode_shmem_config_reply(bytes_t(3)); }, preason::truncated_header, {});
    }
}

// ---- a real second process as the back-end ----------------------------------------------

namespace {

/// One step of the back-end's script: send `msg` with the back-end's memfd
/// attached `nfds` times, then, if `reply` is set, read one message and
/// require it to be exactly `*reply`.
struct backend_step {
    const bytes_t* msg;
    int nfds;
    const bytes_t* reply;
};

/// What the child process runs: only system calls on data prepared before
/// the fork, then _exit. The exit status names the step that went wrong.
struct backend_script {
    int sock = -1;                 // main channel
    int sock_oversized = -1;       // hostile: a header announcing 1 MiB
    int sock_midmessage = -1;      // hostile: closed in the middle of a payload
    int sock_midheader = -1;       // hostile: closed in the middle of a header
    int sock_nine_fds = -1;        // hostile: nine fds on one message
    const bytes_t* config_request; // what the front-end asks first
    const bytes_t* config_reply;   // and what the back-end answers
    const bytes_t* file;           // the memfd's content (2 pages)
    std::uint64_t check_offset;    // where MEM_WRITE must have landed in the memfd
    const bytes_t* check_bytes;    //   ...and what
    std::size_t check_after;       //   ...checked after this many steps
    std::vector<backend_step> steps;
    const bytes_t* map_msg; // for the hostile cases

    static bool send_with_fds(int s, const bytes_t& bytes, std::size_t n, int fd, int nfds) {
        iovec iov{const_cast<std::byte*>(bytes.data()), n};
        msghdr msg{};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 16)];
        if (nfds > 0) {
            int fds[16];
            for (int i = 0; i < nfds; ++i) fds[i] = fd;
            msg.msg_control = control;
            msg.msg_controllen = CMSG_SPACE(sizeof(int) * static_cast<std::size_t>(nfds));
            cmsghdr* c = CMSG_FIRSTHDR(&msg);
            c->cmsg_level = SOL_SOCKET;
            c->cmsg_type = SCM_RIGHTS;
            c->cmsg_len = CMSG_LEN(sizeof(int) * static_cast<std::size_t>(nfds));
            std::memcpy(CMSG_DATA(c), fds, sizeof(int) * static_cast<std::size_t>(nfds));
        }
        return ::sendmsg(s, &msg, MSG_NOSIGNAL) == static_cast<ssize_t>(n);
    }
    static bool recv_exact(int s, std::byte* buf, std::size_t n) {
        std::size_t got = 0;
        while (got < n) {
            const ssize_t r = ::recv(s, buf + got, n - got, 0);
            if (r <= 0) return false;
            got += static_cast<std::size_t>(r);
        }
        return true;
    }
    /// Reads one message (header, then the size it announces, at most 8 KiB)
    /// and compares it with `expected`.
    static bool expect_message(int s, const bytes_t& expected) {
        std::byte buf[12 + 8192];
        if (!recv_exact(s, buf, 12)) return false;
        std::uint32_t size = 0;
        std::memcpy(&size, buf + 8, 4); // x86-64 and every Linux host qomem targets: little-endian
        if (size > 8192 || !recv_exact(s, buf + 12, size)) return false;
        return 12 + size == expected.size() && std::memcmp(buf, expected.data(), expected.size()) == 0;
    }

    [[noreturn]] void run() const noexcept {
        timeval tv{10, 0};
        ::setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        // GET_SHMEM_CONFIG from the front-end.
        if (!expect_message(sock, *config_request)) ::_exit(2);
        if (!send_with_fds(sock, *config_reply, config_reply->size(), -1, 0)) ::_exit(3);
        // The file the back-end shares with the guest.
        const int memfd = ::memfd_create("backend-window", MFD_CLOEXEC);
        if (memfd < 0 || ::ftruncate(memfd, static_cast<off_t>(file->size())) != 0 ||
            ::pwrite(memfd, file->data(), file->size(), 0) != static_cast<ssize_t>(file->size()))
            ::_exit(4);
        for (std::size_t i = 0; i < steps.size(); ++i) {
            const backend_step& s = steps[i];
            if (!send_with_fds(sock, *s.msg, s.msg->size(), memfd, s.nfds)) ::_exit(static_cast<int>(10 + i));
            if (s.reply && !expect_message(sock, *s.reply)) ::_exit(static_cast<int>(40 + i));
            if (i + 1 == check_after) {
                // The front-end's MEM_WRITE reached our own pages.
                std::byte got[256];
                if (check_bytes->size() > sizeof got ||
                    ::pread(memfd, got, check_bytes->size(), static_cast<off_t>(check_offset)) !=
                        static_cast<ssize_t>(check_bytes->size()) ||
                    std::memcmp(got, check_bytes->data(), check_bytes->size()) != 0)
                    ::_exit(70);
            }
        }
        ::close(sock); // the front-end sees an orderly close

        // Hostile, each on a connection of its own (none can be resynchronised).
        std::byte big[12];
        const std::uint32_t fields[3] = {12, 1, 1u << 20}; // MEM_WRITE announcing 1 MiB
        std::memcpy(big, fields, sizeof fields);
        const bytes_t big_header(big, big + 12);
        if (!send_with_fds(sock_oversized, big_header, 12, -1, 0)) ::_exit(80);
        ::close(sock_oversized);
        if (!send_with_fds(sock_midmessage, *map_msg, 22, memfd, 1)) ::_exit(81);
        ::close(sock_midmessage);
        if (!send_with_fds(sock_midheader, *map_msg, 5, -1, 0)) ::_exit(82);
        ::close(sock_midheader);
        if (!send_with_fds(sock_nine_fds, *map_msg, map_msg->size(), memfd, 9)) ::_exit(83);
        ::close(sock_nine_fds);
        ::close(memfd);
        ::_exit(0);
    }
};

/// A forked child, killed and reaped if the test ends early.
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
    /// Waits for the child; its exit status, or -1 when it did not exit.
    int wait() {
        int status = 0;
        pid_t r;
        do r = ::waitpid(pid_, &status, 0);
        while (r < 0 && errno == EINTR);
        pid_ = -1;
        return r > 0 && WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    }

private:
    pid_t pid_;
};

void set_timeout(int fd, int seconds) {
    timeval tv{seconds, 0};
    REQUIRE(::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) == 0);
}

} // namespace

TEST_CASE("a real back-end process maps a memfd, reads and writes guest memory, unmaps, and sends "
          "hostile messages",
          "[vhost-user][process]") {
    leak_check leaks;
    throwing_assertions asserts;
    const std::size_t fds_before = count_open_fds();
    {
        rig r;
        vu::backend_request_handler fe(r.a, *r.as);
        // Device B's region has a mapping of the front-end's own: the
        // back-end cannot translate addresses there and uses MEM_READ/WRITE.
        const bytes_t b_content = pattern(21, P);
        vu::unique_fd b_file = memfd_with(P, b_content);
        r.b->shmem_map(0, b_file.get(), 0, P, P, rw);

        // The script, prepared before the fork.
        const bytes_t file = pattern(17, 2 * P);
        const bytes_t hello = bytes_of("hello from the back-end");
        const bytes_t fallback = bytes_of("fallback path");
        bytes_t own_expect(file.begin(), file.begin() + 64);
        own_expect = patched(own_expect, 16, hello);
        bytes_t other_expect(b_content.begin(), b_content.begin() + 32);
        other_expect = patched(other_expect, 8, fallback);

        const bytes_t config_request = vu::encode_get_shmem_config();
        const bytes_t config_reply = vu::encode_shmem_config_reply(fe.shmem_config());
        const bytes_t map = vu::encode_shmem_map(vu::make_mmap_payload(0, 0, 2 * P, 2 * P, rw), true);
        const bytes_t write_own = vu::encode_mem_write(bar_a + 2 * P + 16, hello, true);
        const bytes_t read_own = vu::encode_mem_read(bar_a + 2 * P, 64, false);
        const bytes_t write_other = vu::encode_mem_write(bar_b + P + 8, fallback, true);
        const bytes_t read_other = vu::encode_mem_read(bar_b + P, 32, true);
        const bytes_t read_hole = vu::encode_mem_read(bar_a + 8 * P, 16, false);
        const bytes_t unmap = vu::encode_shmem_unmap(vu::make_mmap_payload(0, 0, 2 * P, 2 * P, ro), true);

        const bytes_t ok_map = vu::encode_u64_reply(req_map, 0);
        const bytes_t eexist_map = vu::encode_u64_reply(req_map, EEXIST);
        const bytes_t einval_map = vu::encode_u64_reply(req_map, EINVAL);
        const bytes_t ok_write = vu::encode_u64_reply(req_write, 0);
        const bytes_t ok_unmap = vu::encode_u64_reply(req_unmap, 0);
        const bytes_t efault_read = vu::encode_u64_reply(req_read, EFAULT);
        const bytes_t own_data = vu::encode_mem_read_reply(bar_a + 2 * P, own_expect);
        const bytes_t other_data = vu::encode_mem_read_reply(bar_b + P, other_expect);

        // Plain variables, not structured bindings: lambdas capture them (clang 14).
        std::pair<vu::channel, vu::channel> front_pair = vu::channel::socketpair();
        vu::channel& front = front_pair.first;
        vu::channel& back = front_pair.second;
        std::pair<vu::channel, vu::channel> h1_pair = vu::channel::socketpair();
        vu::channel& h1_front = h1_pair.first;
        vu::channel& h1_back = h1_pair.second;
        std::pair<vu::channel, vu::channel> h2_pair = vu::channel::socketpair();
        vu::channel& h2_front = h2_pair.first;
        vu::channel& h2_back = h2_pair.second;
        std::pair<vu::channel, vu::channel> h3_pair = vu::channel::socketpair();
        vu::channel& h3_front = h3_pair.first;
        vu::channel& h3_back = h3_pair.second;
        std::pair<vu::channel, vu::channel> h4_pair = vu::channel::socketpair();
        vu::channel& h4_front = h4_pair.first;
        vu::channel& h4_back = h4_pair.second;
        for (const vu::channel* c : {&front, &h1_front, &h2_front, &h3_front, &h4_front})
            set_timeout(c->fd(), 10);

        backend_script script;
        script.sock = back.fd();
        script.sock_oversized = h1_back.fd();
        script.sock_midmessage = h2_back.fd();
        script.sock_midheader = h3_back.fd();
        script.sock_nine_fds = h4_back.fd();
        script.config_request = &config_request;
        script.config_reply = &config_reply;
        script.file = &file;
        script.check_offset = 16;
        script.check_bytes = &hello;
        script.check_after = 3;
        script.map_msg = &map;
        // clang-format off
        script.steps = std::vector<backend_step>{
            {&map, 1, &ok_map},             // 0: map the window
            {&write_own, 0, &ok_write},     // 1: write into it through the front-end
            {&read_own, 0, &own_data},      // 2: read it back (MEM_READ always answered)
            {&write_other, 0, &ok_write},   // 3: fallback write, device B's region
            {&read_other, 0, &other_data},  // 4: fallback read
            {&read_hole, 0, &efault_read},  // 5: nothing mapped there
            {&map, 1, &eexist_map},         // 6: the same range again: refused
            {&map, 2, &einval_map},         // 7: two fds: does not decode
            {&unmap, 0, &ok_unmap},         // 8: unmap the window
        };
        // clang-format on

        std::fflush(nullptr);
        const pid_t pid = ::fork();
        REQUIRE(pid >= 0);
        if (pid == 0) script.run();
        child_process child(pid);
        // The parent keeps only its own ends.
        back.release().reset();
        h1_back.release().reset();
        h2_back.release().reset();
        h3_back.release().reset();
        h4_back.release().reset();

        // Serves one message; returns the fds it came with (closed by now).
        const auto serve = [&](std::size_t want_fds) {
            std::optional<vu::raw_message> msg = front.receive(fe.max_payload());
            if (!msg) FAIL("the back-end closed the connection early; its exit status: " << child.wait());
            CHECK(msg->fds.size() == want_fds);
            std::vector<int> numbers;
            for (const vu::unique_fd& f : msg->fds) numbers.push_back(f.get());
            std::optional<bytes_t> reply = fe.handle(std::move(*msg));
            REQUIRE(reply.has_value());
            for (int n : numbers) CHECK(!fd_is_open(n));
            front.send(*reply);
            return reply;
        };

        // GET_SHMEM_CONFIG, front-end to back-end.
        front.send(config_request);
        std::optional<vu::raw_message> cfg = front.receive(sizeof(vu::shmem_config_payload));
        REQUIRE(cfg.has_value());
        const vu::shmem_config_payload got = vu::decode_shmem_config_reply(cfg->bytes);
        CHECK(got.nregions == 1);
        CHECK(got.memory_sizes[0] == 16 * P);

        // 0: SHMEM_MAP: the guest reads the back-end's pattern.
        CHECK(u64_reply(serve(1), req_map) == 0);
        bytes_t seen(2 * P);
        CHECK(r.as->read(bar_a + 2 * P, seen.data(), seen.size()) == qomem::memtx_ok);
        CHECK(seen == file);
        CHECK(r.shm_a().active_mappings() == 1);
        // 1-2: MEM_WRITE then MEM_READ in the window.
        CHECK(u64_reply(serve(0), req_write) == 0);
        bytes_t hello_seen(hello.size());
        CHECK(r.as->read(bar_a + 2 * P + 16, hello_seen.data(), hello_seen.size()) == qomem::memtx_ok);
        CHECK(hello_seen == hello);
        CHECK(read_reply_data(serve(0), bar_a + 2 * P) == own_expect);
        // 3-4: the fallback, in device B's region.
        CHECK(u64_reply(serve(0), req_write) == 0);
        CHECK(pread_bytes(b_file.get(), 8, fallback.size()) == fallback);
        CHECK(read_reply_data(serve(0), bar_b + P) == other_expect);
        // 5: a hole.
        CHECK(u64_reply(serve(0), req_read) == EFAULT);
        // 6-7: refused maps, the window unchanged.
        CHECK(u64_reply(serve(1), req_map) == EEXIST);
        CHECK(u64_reply(serve(2), req_map) == EINVAL);
        CHECK(r.shm_a().live_mappings() == 1);
        // 8: SHMEM_UNMAP: gone from the guest.
        CHECK(u64_reply(serve(0), req_unmap) == 0);
        std::uint64_t v;
        CHECK(r.as->read(bar_a + 2 * P, &v, 8) == qomem::memtx_decode_error);
        CHECK(r.shm_a().live_mappings() == 0);
        // The back-end closed the main connection in an orderly way.
        CHECK(!front.receive(fe.max_payload()).has_value());

        // The hostile connections.
        require_io_refusal([&] { (void)h1_front.receive(fe.max_payload()); }, preason::oversized,
                           {"1048576", fmt::format("{}", fe.max_payload())});
        require_io_refusal([&] { (void)h2_front.receive(fe.max_payload()); }, preason::size_mismatch,
                           {"10 of 40 payload bytes"});
        require_io_refusal([&] { (void)h3_front.receive(fe.max_payload()); }, preason::truncated_header,
                           {"after 5 header bytes"});
        const std::size_t fds_mid = count_open_fds();
        require_io_refusal([&] { (void)h4_front.receive(fe.max_payload()); }, preason::extra_fds,
                           {"more than 8 fds"});
        CHECK(count_open_fds() == fds_mid); // the eight that arrived were closed, the ninth never did

        const int status = child.wait();
        INFO("the back-end's exit status names the step that failed (see backend_script::run)");
        CHECK(status == 0);
    }
    CHECK(count_open_fds() == fds_before);
}
