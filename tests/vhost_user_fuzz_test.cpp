// Fuzz-style tests of the vhost-user message handling (qomem/vhost_user/):
// random and mutated messages — starting from valid encodings of every
// request, with bytes, lengths and attached fds changed — fed to
// decode_backend_message (with random sets of negotiated protocol features),
// to backend_request_handler::handle with a real device and address space,
// and through a real socket to channel::receive.
//
// The only acceptable outcomes are a decoded message or a protocol_error
// (the decoder), a well-formed reply or none (the front-end), and no fd ever
// leaked: every attached fd is closed afterwards (a mapping holds the pages,
// not the fd). The decoder is also checked against a reference model of the
// wire rules written independently here: same verdict, same reason, and a
// decoded message re-encodes to exactly the bytes received.
//
// Deterministic: a fixed seed, printed with any failure; QOMEM_FUZZ_SEED=n
// replays another one (QOMEM_FUZZ_ITERATIONS=n scales the run).
#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <random>
#include <string>
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
using qomem_test::count_open_fds;
using qomem_test::fd_is_open;
using qomem_test::leak_check;
using qomem_test::throwing_assertions;

namespace {

const std::uint64_t P = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
constexpr qomem::hwaddr bar_a = 0xfe000000;
constexpr qomem::hwaddr bar_b = 0xfd000000;

std::uint64_t env_u64(const char* name, std::uint64_t fallback) {
    const char* v = std::getenv(name);
    return v && *v ? std::strtoull(v, nullptr, 0) : fallback;
}

std::uint64_t fuzz_seed() { return env_u64("QOMEM_FUZZ_SEED", 0x5eedf00dcafe2024); }
/// Iterations scaled by QOMEM_FUZZ_ITERATIONS (percent of the default).
std::size_t scaled(std::size_t n) {
    return static_cast<std::size_t>(n * env_u64("QOMEM_FUZZ_ITERATIONS", 100) / 100);
}

std::string hex_dump(const bytes_t& b) {
    std::string out;
    for (std::size_t i = 0; i < b.size() && i < 128; ++i)
        out += fmt::format("{:02x}{}", std::to_integer<unsigned>(b[i]), i % 4 == 3 ? " " : "");
    if (b.size() > 128) out += fmt::format("... ({} bytes)", b.size());
    return out;
}

std::uint32_t get_u32(const bytes_t& b, std::size_t at) {
    std::uint32_t v = 0;
    for (std::size_t i = 0; i < 4; ++i)
        v |= static_cast<std::uint32_t>(std::to_integer<std::uint8_t>(b[at + i])) << (8 * i);
    return v;
}
void put_u32(bytes_t& b, std::size_t at, std::uint32_t v) {
    for (std::size_t i = 0; i < 4; ++i) b[at + i] = static_cast<std::byte>(v >> (8 * i));
}
void put_u64(bytes_t& b, std::size_t at, std::uint64_t v) {
    for (std::size_t i = 0; i < 8; ++i) b[at + i] = static_cast<std::byte>(v >> (8 * i));
}

/// Deterministic on every standard library (no std distributions).
class rng {
public:
    explicit rng(std::uint64_t seed) : g_(seed) {}
    std::uint64_t next() { return g_(); }
    std::uint64_t below(std::uint64_t n) { return n ? g_() % n : 0; }
    bool one_in(std::uint64_t n) { return below(n) == 0; }
    template <class T, std::size_t N>
    T pick(const std::array<T, N>& a) {
        return a[below(N)];
    }
    bytes_t bytes(std::size_t n) {
        bytes_t out(n);
        for (std::byte& b : out) b = static_cast<std::byte>(g_());
        return out;
    }

private:
    std::mt19937_64 g_;
};

// ---- the reference model of the wire rules ----------------------------------------------

/// The verdict the vhost-user rules give a back-end message: nullopt when it
/// is valid, else the reason to refuse it. The rules are checked in this
/// order: header (length, version, flag bits, size field), then the reply
/// flag, then per request: its protocol feature (SHMEM for 9 and 10, qomem's
/// MEM access for 11 and 12), payload size, fds, MEM size bounds.
std::optional<preason> model_verdict(const bytes_t& b, std::size_t nfds, std::uint32_t max_access,
                                     bool shmem = true, bool mem_access = true) {
    if (b.size() < 12) return preason::truncated_header;
    const std::uint32_t req = get_u32(b, 0), flags = get_u32(b, 4), size = get_u32(b, 8);
    if ((flags & 0x3) != 0x1) return preason::bad_version;
    if (flags & ~0xfu) return preason::bad_flags;
    if (size != b.size() - 12) return preason::size_mismatch;
    if (flags & 0x4) return preason::bad_flags;
    const auto fds = [&](std::size_t want) -> std::optional<preason> {
        if (nfds < want) return preason::missing_fd;
        if (nfds > want) return preason::extra_fds;
        return std::nullopt;
    };
    switch (req) {
    case 9:
        if (!shmem) return preason::not_negotiated;
        if (size != 40) return preason::bad_payload;
        return fds(1);
    case 10:
        if (!shmem) return preason::not_negotiated;
        if (size != 40) return preason::bad_payload;
        return fds(0);
    case 11: {
        if (!mem_access) return preason::not_negotiated;
        if (size != 12) return preason::bad_payload;
        if (auto f = fds(0)) return f;
        const std::uint32_t n = get_u32(b, 20);
        if (n == 0 || n > max_access) return preason::oversized;
        return std::nullopt;
    }
    case 12: {
        if (!mem_access) return preason::not_negotiated;
        if (size < 12) return preason::bad_payload;
        if (auto f = fds(0)) return f;
        const std::uint32_t n = get_u32(b, 20);
        if (n == 0 || n > max_access) return preason::oversized;
        if (size != 12 + std::uint64_t(n)) return preason::bad_payload;
        return std::nullopt;
    }
    default: return preason::unknown_request;
    }
}

std::string_view reason_name(preason r) { return vu::protocol_error::name(r); }

/// The bytes a decoded message encodes back to.
bytes_t reencode(const vu::backend_message& m) {
    const bool nr = m.need_reply();
    if (auto* map = std::get_if<vu::shmem_map_request>(&m.body)) return vu::encode_shmem_map(map->map, nr);
    if (auto* unmap = std::get_if<vu::shmem_unmap_request>(&m.body))
        return vu::encode_shmem_unmap(unmap->map, nr);
    if (auto* rd = std::get_if<vu::mem_read_request>(&m.body))
        return vu::encode_mem_read(rd->guest_address, rd->size, nr);
    const auto& wr = std::get<vu::mem_write_request>(m.body);
    return vu::encode_mem_write(wr.guest_address, wr.data, nr);
}

// ---- inputs ------------------------------------------------------------------------------


/// A valid encoding of a random request, aimed at the fuzz rig: shmids 0-2,
/// page-aligned offsets around the regions, addresses in and around the
/// shared memory regions and RAM.
bytes_t valid_message(rng& r) {
    const bool nr = r.one_in(2);
    // 0 read-only, 1 read-write; 2 and 3 carry an invalid bit (refused by the device).
    const std::array<std::uint64_t, 4> flag_values{0, 1, 1, 3};
    const std::array<qomem::hwaddr, 4> bases{bar_a, bar_b, 0, bar_a + 16 * P};
    switch (r.below(5)) {
    case 0:
    case 1: // maps are what change state: make them common
        return vu::encode_shmem_map(vu::make_mmap_payload(static_cast<std::uint8_t>(r.below(3)), P * r.below(3),
                                                          P * r.below(36), P * (1 + r.below(4)),
                                                          static_cast<qomem::shmem_flags>(r.pick(flag_values))),
                                    nr);
    case 2:
        return vu::encode_shmem_unmap(
            vu::make_mmap_payload(static_cast<std::uint8_t>(r.below(2)), 0, P * r.below(36), P * (1 + r.below(4)),
                                  qomem::shmem_flags::read_only),
            nr);
    case 3: {
        const std::uint32_t size = r.one_in(8) ? static_cast<std::uint32_t>(1 + r.below(4096))
                                               : static_cast<std::uint32_t>(1 + r.below(64));
        return vu::encode_mem_read(r.pick(bases) + r.below(36 * P), size, nr);
    }
    default: {
        const std::size_t size = r.one_in(8) ? 1 + r.below(4096) : 1 + r.below(64);
        return vu::encode_mem_write(r.pick(bases) + r.below(36 * P), r.bytes(size), nr);
    }
    }
}

/// Other valid encodings the decoder must refuse: front-end messages.
bytes_t other_message(rng& r) {
    vu::shmem_config_payload c{};
    c.nregions = static_cast<std::uint32_t>(r.below(9));
    switch (r.below(4)) {
    case 0: return vu::encode_get_shmem_config();
    case 1: return vu::encode_shmem_config_reply(c);
    case 2: return vu::encode_u64_reply(static_cast<std::uint32_t>(9 + r.below(4)), r.below(2));
    default: return vu::encode_mem_read_reply(r.next(), r.bytes(r.below(32)));
    }
}

/// Changes a few things about a message: bits, bytes, its length, header
/// fields and payload fields set to boundary values.
void mutate(rng& r, bytes_t& b) {
    static constexpr std::array<std::uint32_t, 18> u32s{
        0, 1, 2, 4, 8, 9, 10, 11, 12, 13, 40, 44, 4095, 4096, 4097, 0x7fffffff, 0x80000000, 0xffffffff};
    const std::array<std::uint64_t, 8> u64s{
        0, 1, P, P - 1, 0xfffffffffffff000, 0x7ffffffffffff000, 1ull << 63, 0xffffffffffffffff};
    const std::size_t edits = 1 + r.below(4);
    for (std::size_t k = 0; k < edits; ++k) {
        switch (r.below(9)) {
        case 0:
            if (!b.empty()) b[r.below(b.size())] ^= static_cast<std::byte>(1u << r.below(8));
            break;
        case 1:
            if (!b.empty()) b[r.below(b.size())] = static_cast<std::byte>(r.next());
            break;
        case 2: b.resize(r.below(b.size() + 1)); break;
        case 3: {
            const bytes_t more = r.bytes(r.one_in(8) ? r.below(5000) : r.below(16));
            b.insert(b.end(), more.begin(), more.end());
            break;
        }
        case 4: // a header field to a boundary value
            if (b.size() >= 12) put_u32(b, 4 * r.below(3), r.pick(u32s));
            break;
        case 5: // the flags: a valid version with random reply / need-reply / unknown bits
            if (b.size() >= 12)
                put_u32(b, 4,
                        1u | (static_cast<std::uint32_t>(r.below(4)) << 2) |
                            (r.one_in(8) ? static_cast<std::uint32_t>(r.next()) & ~0xfu : 0));
            break;
        case 6: // a payload u64 to a boundary value
            if (b.size() >= 20) put_u64(b, 12 + 8 * r.below((b.size() - 12) / 8), r.pick(u64s));
            break;
        case 7: // the MEM size field, with the message resized to agree
            if (b.size() >= 24) {
                const std::uint32_t n =
                    r.one_in(2) ? r.pick(u32s) : static_cast<std::uint32_t>(r.below(5000));
                put_u32(b, 20, n);
                if (n <= 8192 && r.one_in(2)) {
                    b.resize(24 + n);
                    put_u32(b, 8, 12 + n);
                }
            }
            break;
        default: // make the size field agree with the bytes again
            if (b.size() >= 12) put_u32(b, 8, static_cast<std::uint32_t>(b.size() - 12));
            break;
        }
    }
}

/// A random input: a mutated valid message most of the time, sometimes
/// unchanged, sometimes pure noise (with a plausible header half the time).
bytes_t random_input(rng& r) {
    const std::uint64_t kind = r.below(10);
    if (kind < 2) return valid_message(r);
    if (kind < 7) {
        bytes_t b = valid_message(r);
        mutate(r, b);
        return b;
    }
    if (kind < 8) {
        bytes_t b = other_message(r);
        if (r.one_in(2)) mutate(r, b);
        return b;
    }
    bytes_t b = r.bytes(r.one_in(16) ? r.below(5000) : r.below(64));
    if (b.size() >= 12 && r.one_in(2)) {
        put_u32(b, 0, static_cast<std::uint32_t>(9 + r.below(4)));
        put_u32(b, 4, 1u | (static_cast<std::uint32_t>(r.below(4)) << 2));
        put_u32(b, 8, static_cast<std::uint32_t>(b.size() - 12));
    }
    return b;
}

/// Sources of fds to attach: dups of a memfd (mappable) and of a pipe (not).
struct fd_source {
    vu::unique_fd memfd;
    vu::unique_fd pipe_r;
    vu::unique_fd pipe_w;

    explicit fd_source(std::uint64_t file_size) : memfd(::memfd_create("fuzz", MFD_CLOEXEC)) {
        REQUIRE(memfd);
        REQUIRE(::ftruncate(memfd.get(), static_cast<off_t>(file_size)) == 0);
        int p[2];
        REQUIRE(::pipe2(p, O_CLOEXEC) == 0);
        pipe_r.reset(p[0]);
        pipe_w.reset(p[1]);
    }
    /// How many fds to attach: mostly what the request wants, sometimes not.
    static std::size_t how_many(rng& r, const bytes_t& b) {
        if (r.one_in(5)) return r.below(4);
        return b.size() >= 4 && get_u32(b, 0) == 9 ? 1 : 0;
    }
    std::vector<vu::unique_fd> make(rng& r, std::size_t n, std::vector<int>& numbers) {
        std::vector<vu::unique_fd> fds;
        for (std::size_t i = 0; i < n; ++i) {
            const int src = r.one_in(6) ? pipe_r.get() : memfd.get();
            fds.emplace_back(::fcntl(src, F_DUPFD_CLOEXEC, 0));
            if (!fds.back()) FAIL("cannot dup an fd: " << std::strerror(errno));
            numbers.push_back(fds.back().get());
        }
        return fds;
    }
};

/// Fails the test with everything needed to replay the input.
#define FUZZ_FAIL(seed, iteration, input, nfds, what)                                                        \
    FAIL("seed 0x" << std::hex << (seed) << std::dec << " (QOMEM_FUZZ_SEED), iteration " << (iteration)      \
                   << ", " << (nfds) << " fd(s), input " << hex_dump(input) << ": " << what)

// ---- the machine ---------------------------------------------------------------------------

/// RAM at 0; device A with shared memory regions 0 (32 pages, at bar_a) and
/// 1 (8 pages, at bar_a + 32 pages) in its BAR; device B with region 0 (8
/// pages, at bar_b). The handler serves device A.
struct rig : qomem_test::shmem_rig {
    qomem_test::shmem_test_device* a = nullptr;
    qomem_test::shmem_test_device* b = nullptr;

    rig() {
        a = &add_device("a", bar_a, 40 * P);
        add_region(*a, 0, 32 * P, 0);
        add_region(*a, 1, 8 * P, 32 * P);
        a->shmem(0)->set_max_mappings(6); // small, so the limit is reached
        b = &add_device("b", bar_b, 8 * P);
        add_region(*b, 0, 8 * P);
    }
};

/// (offset, length) of each active mapping of `shm`, in offset order.
std::vector<std::pair<std::uint64_t, std::uint64_t>> active_mappings(const qomem::virtio_shmem& shm) {
    std::vector<std::pair<std::uint64_t, std::uint64_t>> out;
    shm.region().for_each_child([&](qomem::object& o) {
        if (const auto* m = qomem::dynamic_cast_to<qomem::shmem_mapping>(&o); m && m->active())
            out.emplace_back(m->offset(), m->length());
    });
    std::sort(out.begin(), out.end());
    return out;
}

} // namespace

// ---- the decoder -----------------------------------------------------------------------------

TEST_CASE("fuzz: the decoder decodes or refuses with the model's reason, and closes every fd",
          "[vhost-user][fuzz]") {
    const std::uint64_t seed = fuzz_seed();
    INFO("seed 0x" << std::hex << seed << " (replay with QOMEM_FUZZ_SEED)");
    rng r(seed);
    const std::size_t fds_before = count_open_fds();
    {
        fd_source source(4 * P);
        const std::array<std::uint32_t, 5> limits{4096, 4096, 256, 1, 65536};
        // Negotiated features: mostly both, sometimes one or none.
        const std::array<unsigned, 6> feature_sets{3, 3, 3, 1, 2, 0};
        std::size_t decoded = 0, refused = 0;
        const std::size_t iterations = scaled(30000);
        for (std::size_t i = 0; i < iterations; ++i) {
            const bytes_t input = random_input(r);
            const std::size_t nfds = fd_source::how_many(r, input);
            const std::uint32_t limit = r.pick(limits);
            const unsigned features = r.pick(feature_sets);
            vu::backend_channel_options options{0, limit};
            if (features & 1) options.protocol_features |= vu::mask(vu::protocol_feature::shmem);
            if (features & 2) options.protocol_features |= vu::mask(vu::protocol_feature::qomem_mem_access);
            std::vector<int> numbers;
            std::vector<vu::unique_fd> fds = source.make(r, nfds, numbers);
            const std::optional<preason> expected = model_verdict(input, nfds, limit, features & 1, features & 2);
            try {
                vu::backend_message m = vu::decode_backend_message(input, std::move(fds), options);
                ++decoded;
                if (expected)
                    FUZZ_FAIL(seed, i, input, nfds,
                              "decoded, but the model refuses it (" << reason_name(*expected) << ")");
                if (reencode(m) != input)
                    FUZZ_FAIL(seed, i, input, nfds, "does not re-encode to the same bytes");
                if (auto* map = std::get_if<vu::shmem_map_request>(&m.body);
                    map && (numbers.size() != 1 || map->fd.get() != numbers[0]))
                    FUZZ_FAIL(seed, i, input, nfds, "SHMEM_MAP lost its fd");
            } catch (const vu::protocol_error& e) {
                ++refused;
                if (!expected)
                    FUZZ_FAIL(seed, i, input, nfds, "refused (" << e.what() << "), but the model accepts it");
                if (e.why() != *expected)
                    FUZZ_FAIL(seed, i, input, nfds,
                              "refused as " << reason_name(e.why()) << " (" << e.what()
                                            << "), the model says " << reason_name(*expected));
            }
            for (int fd : numbers)
                if (fd_is_open(fd)) FUZZ_FAIL(seed, i, input, nfds, "fd " << fd << " left open");
        }
        INFO(decoded << " decoded, " << refused << " refused");
        CHECK(decoded > iterations / 20); // the mutations keep enough inputs valid
        CHECK(refused > iterations / 2);
    }
    CHECK(count_open_fds() == fds_before);
}

// ---- the front-end with a real device ------------------------------------------------------

TEST_CASE("fuzz: the front-end answers every message correctly with a real device and address space",
          "[vhost-user][fuzz]") {
    const std::uint64_t seed = fuzz_seed() ^ 0x9e3779b97f4a7c15;
    INFO("seed 0x" << std::hex << seed << " (derived from QOMEM_FUZZ_SEED)");
    leak_check leaks;
    throwing_assertions asserts;
    rng r(seed);
    const std::size_t fds_before = count_open_fds();
    {
        fd_source source(4 * P);
        rig g;
        vu::backend_request_handler fe(g.a, *g.as);
        qomem::virtio_shmem& shm0 = *g.a->shmem(0);
        std::vector<qomem::dma_mapping> dma; // guest DMA keeping unmapped mappings alive
        std::size_t replies = 0, maps_ok = 0, peak_live = 0;
        const std::size_t iterations = scaled(20000);
        for (std::size_t i = 0; i < iterations; ++i) {
            const std::vector<std::pair<std::uint64_t, std::uint64_t>> active = active_mappings(shm0);
            // Exact unmaps of what is mapped keep the mappings coming and going.
            bytes_t input;
            if (!active.empty() && r.one_in(12)) {
                const auto& [offset, length] = active[r.below(active.size())];
                input = vu::encode_shmem_unmap(
                    vu::make_mmap_payload(0, 0, offset, length, qomem::shmem_flags::read_only), r.one_in(2));
            } else {
                input = r.one_in(3) ? valid_message(r) : random_input(r);
            }
            const std::size_t nfds = fd_source::how_many(r, input);
            std::vector<int> numbers;
            vu::raw_message msg{input, source.make(r, nfds, numbers)};
            const std::size_t active_before = shm0.active_mappings();

            std::optional<bytes_t> reply;
            try {
                reply = fe.handle(std::move(msg));
            } catch (const std::exception& e) {
                FUZZ_FAIL(seed, i, input, nfds, "handle threw: " << e.what());
            }
            for (int fd : numbers)
                if (fd_is_open(fd)) FUZZ_FAIL(seed, i, input, nfds, "fd " << fd << " left open");

            // A reply exactly when the header asks for one or the request is MEM_READ.
            const bool header_ok = input.size() >= 12;
            const std::uint32_t req = header_ok ? get_u32(input, 0) : 0;
            const bool want_reply = header_ok && ((get_u32(input, 4) & vu::flag_need_reply) || req == 11);
            if (reply.has_value() != want_reply)
                FUZZ_FAIL(seed, i, input, nfds, (reply ? "an unexpected reply" : "no reply"));
            if (reply) {
                ++replies;
                vu::msg_header h{};
                try {
                    h = vu::decode_header(*reply);
                } catch (const vu::protocol_error& e) {
                    FUZZ_FAIL(seed, i, input, nfds, "malformed reply: " << e.what());
                }
                const bool data = req == 11 && h.size != 8;
                if (h.request != req || h.flags != (vu::version | vu::flag_reply) ||
                    (data && h.size != 12 + get_u32(input, 20)))
                    FUZZ_FAIL(seed, i, input, nfds, "wrong reply header " << hex_dump(*reply));
            }
            if (shm0.active_mappings() > active_before) ++maps_ok;
            peak_live = std::max(peak_live, shm0.live_mappings());
            if (shm0.live_mappings() > shm0.max_mappings() || shm0.active_mappings() > shm0.live_mappings())
                FUZZ_FAIL(seed, i, input, nfds, "mapping counts out of bounds");

            // Guest DMA comes and goes, so that unmaps leave lingering mappings.
            if (r.one_in(40) && dma.size() < 3) {
                qomem::dma_mapping m = g.as->map(bar_a + P * r.below(32), P, r.one_in(2));
                if (m) dma.push_back(std::move(m));
            }
            if (!dma.empty() && r.one_in(25)) {
                const std::size_t k = r.below(dma.size());
                g.as->unmap(dma[k], 0);
                dma.erase(dma.begin() + static_cast<std::ptrdiff_t>(k));
            }
            // The guest sees exactly the active mappings: their pages read
            // fine, every other page of the region is a decode error (and
            // never a fault).
            if (i % 256 == 0) {
                const auto now = active_mappings(shm0);
                for (std::uint64_t page = 0; page < 32; ++page) {
                    const bool mapped = std::any_of(now.begin(), now.end(), [&](const auto& m) {
                        return page * P >= m.first && page * P < m.first + m.second;
                    });
                    std::uint8_t byte;
                    const qomem::memtx_result res = g.as->read(bar_a + page * P + P / 2, &byte, 1);
                    if (res != (mapped ? qomem::memtx_ok : qomem::memtx_decode_error))
                        FUZZ_FAIL(seed, i, input, nfds,
                                  "guest read of page " << page << " gave " << static_cast<unsigned>(res));
                }
            }
        }
        for (qomem::dma_mapping& m : dma) g.as->unmap(m, 0);
        dma.clear();
        INFO(replies << " replies, " << maps_ok << " successful maps, peak " << peak_live
                     << " live mappings");
        CHECK(maps_ok > 50);
        CHECK(peak_live >= 4);
    }
    CHECK(count_open_fds() == fds_before);
}

// ---- through a real socket ---------------------------------------------------------------

TEST_CASE("fuzz: channel::receive over a real socket yields messages or protocol_error, no fd leaked",
          "[vhost-user][fuzz]") {
    const std::uint64_t seed = fuzz_seed() ^ 0x2545f4914f6cdd1d;
    INFO("seed 0x" << std::hex << seed << " (derived from QOMEM_FUZZ_SEED)");
    rng r(seed);
    const std::size_t fds_before = count_open_fds();
    {
        fd_source source(P);
        std::size_t messages = 0, refusals = 0;
        const std::size_t iterations = scaled(400);
        for (std::size_t i = 0; i < iterations; ++i) {
            auto [reader, writer] = vu::channel::socketpair();
            // A few chunks: messages (valid or mutated) or noise, each with 0-10 fds.
            bytes_t all;
            const std::size_t chunks = 1 + r.below(4);
            for (std::size_t c = 0; c < chunks; ++c) {
                const bytes_t chunk = random_input(r);
                all.insert(all.end(), chunk.begin(), chunk.end());
                const std::size_t nfds = r.one_in(3) ? r.below(11) : 0;
                std::vector<int> numbers;
                std::vector<vu::unique_fd> fds = source.make(r, nfds, numbers);
                if (chunk.empty()) continue;
                alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 10)];
                iovec iov{const_cast<std::byte*>(chunk.data()), chunk.size()};
                msghdr mh{};
                mh.msg_iov = &iov;
                mh.msg_iovlen = 1;
                if (nfds) {
                    mh.msg_control = control;
                    mh.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
                    cmsghdr* cm = CMSG_FIRSTHDR(&mh);
                    cm->cmsg_level = SOL_SOCKET;
                    cm->cmsg_type = SCM_RIGHTS;
                    cm->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
                    std::memcpy(CMSG_DATA(cm), numbers.data(), sizeof(int) * nfds);
                }
                REQUIRE(::sendmsg(writer.fd(), &mh, MSG_NOSIGNAL) == static_cast<ssize_t>(chunk.size()));
                // Our copies close here; the ones in flight belong to the socket.
            }
            writer.release().reset(); // end of stream
            const std::uint32_t limit = r.one_in(3) ? 256 : 4096;
            for (;;) {
                try {
                    std::optional<vu::raw_message> m = reader.receive(vu::mem_access_header_size + limit);
                    if (!m) break;
                    ++messages;
                    try {
                        (void)vu::decode_backend_message(m->bytes, std::move(m->fds), {.max_mem_access = limit});
                    } catch (const vu::protocol_error&) {
                    }
                } catch (const vu::protocol_error&) {
                    ++refusals; // the stream cannot be resynchronised: drop it
                    break;
                } catch (const std::exception& e) {
                    FUZZ_FAIL(seed, i, all, 0, "receive threw " << e.what());
                }
            }
            // reader closes here, releasing any fds still in flight
        }
        INFO(messages << " messages, " << refusals << " refused streams");
        CHECK(messages > 0);
        CHECK(refusals > 0);
    }
    CHECK(count_open_fds() == fds_before);
}
