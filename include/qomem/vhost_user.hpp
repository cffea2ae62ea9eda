// qomem/vhost_user.hpp — the vhost-user messages for VIRTIO Shared Memory
// Regions (SHMEM_MAP / SHMEM_UNMAP), the memory-access fallback (MEM_READ /
// MEM_WRITE) and GET_SHMEM_CONFIG, with a hostile-input decoder, a Unix
// socket channel passing fds, and the front-end's handler.
//
//     auto [front, back] = qomem::vhost_user::channel::socketpair();
//     qomem::vhost_user::frontend fe(*dev, dma_as);     // dev: virtio_shmem_device
//     while (auto msg = front.receive(fe.max_payload()))
//         if (auto reply = fe.handle(std::move(*msg))) front.send(*reply);
//
// Wire format (the vhost-user specification): a 12-byte header — request
// (u32), flags (u32: version 0x1 in bits 0-1, reply 0x4, need-reply 0x8),
// payload size (u32) — then the payload, all little-endian, no padding holes.
// Back-end requests: SHMEM_MAP = 9 and SHMEM_UNMAP = 10 carry VhostUserMMap
// {u8 shmid; u8 padding[7]; u64 fd_offset; u64 shm_offset; u64 len; u64 flags}
// (flags bit 0 read, bit 1 write), MAP with exactly one fd; MEM_READ = 11 and
// MEM_WRITE = 12 carry {u64 guest_address; u32 size; u8 data[size]} (MEM_READ
// without the data), `size` at most frontend_limits::max_mem_access (4096 by
// default). With need-reply set the front-end answers with a u64 (0 =
// success, else an errno value); MEM_READ is always answered, with the data
// or with a u64 error. Front-end request GET_SHMEM_CONFIG = 44 is answered
// with {u32 nregions; u32 padding; u64 memory_sizes[8]}; protocol feature
// bit VHOST_USER_PROTOCOL_F_SHMEM = 20.
//
// Every byte from the peer is hostile: a truncated header, a size field that
// disagrees with the bytes received, an unknown request, a bad version or
// flag, a missing or extra fd (extra fds are closed, never leaked), an
// oversized MEM_READ/WRITE: decode() throws protocol_error naming the values,
// and the handler turns it into an error reply or a clean refusal.
#pragma once

#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include <fmt/core.h>

#include <qomem/address_space.hpp>
#include <qomem/error.hpp>
#include <qomem/shmem.hpp>

namespace qomem::vhost_user {

// ---- constants ----------------------------------------------------------------

inline constexpr std::uint32_t version = 0x1;
inline constexpr std::uint32_t version_mask = 0x3;
inline constexpr std::uint32_t flag_reply = 0x4;
inline constexpr std::uint32_t flag_need_reply = 0x8;
inline constexpr unsigned protocol_f_shmem = 20;
inline constexpr std::size_t header_size = 12;
inline constexpr std::size_t max_shmem_regions = 8;

enum class request : std::uint32_t {
    backend_shmem_map = 9,
    backend_shmem_unmap = 10,
    backend_mem_read = 11,
    backend_mem_write = 12,
    get_shmem_config = 44, ///< front-end to back-end
};

// ---- wire structures ---------------------------------------------------------

struct msg_header {
    std::uint32_t request;
    std::uint32_t flags;
    std::uint32_t size;
};
static_assert(sizeof(msg_header) == 12 && std::is_trivially_copyable_v<msg_header>);

/// VhostUserMMap.
struct mmap_payload {
    std::uint8_t shmid;
    std::uint8_t padding[7];
    std::uint64_t fd_offset;
    std::uint64_t shm_offset;
    std::uint64_t len;
    std::uint64_t flags;
};
static_assert(sizeof(mmap_payload) == 40 && offsetof(mmap_payload, fd_offset) == 8 &&
                  offsetof(mmap_payload, flags) == 32 && std::is_trivially_copyable_v<mmap_payload>,
              "VhostUserMMap must have no padding holes");

/// A VhostUserMMap with zero padding.
constexpr mmap_payload make_mmap_payload(std::uint8_t shmid, std::uint64_t fd_offset,
                                         std::uint64_t shm_offset, std::uint64_t len,
                                         std::uint64_t flags) noexcept {
    return mmap_payload{shmid, {}, fd_offset, shm_offset, len, flags};
}

/// The reply to GET_SHMEM_CONFIG.
struct shmem_config_payload {
    std::uint32_t nregions;
    std::uint32_t padding;
    std::uint64_t memory_sizes[max_shmem_regions];
};
static_assert(sizeof(shmem_config_payload) == 72 && offsetof(shmem_config_payload, memory_sizes) == 8,
              "the shmem config reply must have no padding holes");

/// The fixed part of a MEM_READ / MEM_WRITE payload on the wire (12 bytes:
/// u64 guest_address, u32 size), followed by the data for MEM_WRITE.
inline constexpr std::size_t mem_access_header_size = 12;

// ---- errors and fds ------------------------------------------------------------

/// A message refused by the decoder or the channel.
class protocol_error : public error {
public:
    enum class reason {
        truncated_header,
        size_mismatch,
        unknown_request,
        bad_version,
        bad_flags,
        missing_fd,
        extra_fds,
        oversized,
        bad_payload,
        io,
    };
    protocol_error(reason r, const std::string& what) : error(what), reason_(r) {}
    reason why() const noexcept { return reason_; }
    /// The reason's name ("truncated_header", ...), for messages and tests.
    static constexpr std::string_view name(reason r) noexcept {
        constexpr std::string_view names[] = {"truncated_header", "size_mismatch", "unknown_request",
                                              "bad_version",      "bad_flags",     "missing_fd",
                                              "extra_fds",        "oversized",     "bad_payload",
                                              "io"};
        const auto i = static_cast<std::size_t>(r);
        return i < std::size(names) ? names[i] : std::string_view("unknown reason");
    }

private:
    reason reason_;
};

/// An owned file descriptor, closed on destruction.
class unique_fd {
public:
    unique_fd() noexcept = default;
    explicit unique_fd(int fd) noexcept : fd_(fd) {}
    unique_fd(unique_fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
    unique_fd& operator=(unique_fd&& o) noexcept {
        if (this != &o) reset(std::exchange(o.fd_, -1));
        return *this;
    }
    ~unique_fd() { reset(); }
    int get() const noexcept { return fd_; }
    int release() noexcept { return std::exchange(fd_, -1); }
    void reset(int fd = -1) noexcept {
        if (fd_ >= 0) ::close(fd_);
        fd_ = fd;
    }
    explicit operator bool() const noexcept { return fd_ >= 0; }

private:
    int fd_ = -1;
};

/// Bytes and the fds that came with them.
struct raw_message {
    std::vector<std::byte> bytes;
    std::vector<unique_fd> fds;
};

// ---- decoded messages ------------------------------------------------------------

struct shmem_map_request {
    mmap_payload map;
    unique_fd fd;
};
struct shmem_unmap_request {
    mmap_payload map;
};
struct mem_read_request {
    std::uint64_t guest_address;
    std::uint32_t size;
};
struct mem_write_request {
    std::uint64_t guest_address;
    std::vector<std::byte> data;
};

/// A decoded back-end request.
struct backend_message {
    msg_header header;
    std::variant<shmem_map_request, shmem_unmap_request, mem_read_request, mem_write_request> body;
    bool need_reply() const noexcept { return header.flags & flag_need_reply; }
};

// ---- little-endian helpers --------------------------------------------------------

namespace detail {
template <class T>
T get_le(const std::byte* p) noexcept {
    T v = 0;
    for (std::size_t i = 0; i < sizeof(T); ++i)
        v = static_cast<T>(v | (static_cast<T>(static_cast<std::uint8_t>(p[i])) << (8 * i)));
    return v;
}
template <class T>
void put_le(std::vector<std::byte>& out, T v) {
    for (std::size_t i = 0; i < sizeof(T); ++i)
        out.push_back(static_cast<std::byte>(static_cast<std::uint64_t>(v) >> (8 * i)));
}
inline void put_header(std::vector<std::byte>& out, std::uint32_t req, std::uint32_t flags,
                       std::uint32_t size) {
    put_le(out, req);
    put_le(out, flags);
    put_le(out, size);
}
inline mmap_payload get_mmap(const std::byte* p) noexcept {
    mmap_payload m{};
    m.shmid = static_cast<std::uint8_t>(p[0]);
    for (int i = 0; i < 7; ++i) m.padding[i] = static_cast<std::uint8_t>(p[1 + i]);
    m.fd_offset = get_le<std::uint64_t>(p + 8);
    m.shm_offset = get_le<std::uint64_t>(p + 16);
    m.len = get_le<std::uint64_t>(p + 24);
    m.flags = get_le<std::uint64_t>(p + 32);
    return m;
}
} // namespace detail

// ---- encoding ------------------------------------------------------------------------

inline std::vector<std::byte> encode_shmem_map(const mmap_payload& m, bool need_reply = false) {
    std::vector<std::byte> out;
    detail::put_header(out, static_cast<std::uint32_t>(request::backend_shmem_map),
                       version | (need_reply ? flag_need_reply : 0), sizeof(mmap_payload));
    out.push_back(static_cast<std::byte>(m.shmid));
    for (std::uint8_t b : m.padding) out.push_back(static_cast<std::byte>(b));
    detail::put_le(out, m.fd_offset);
    detail::put_le(out, m.shm_offset);
    detail::put_le(out, m.len);
    detail::put_le(out, m.flags);
    return out;
}

inline std::vector<std::byte> encode_shmem_unmap(const mmap_payload& m, bool need_reply = false) {
    auto out = encode_shmem_map(m, need_reply);
    const auto req = static_cast<std::uint32_t>(request::backend_shmem_unmap);
    std::vector<std::byte> hdr;
    detail::put_le(hdr, req);
    std::copy(hdr.begin(), hdr.end(), out.begin());
    return out;
}

inline std::vector<std::byte> encode_mem_read(std::uint64_t guest_address, std::uint32_t size,
                                              bool need_reply = true) {
    std::vector<std::byte> out;
    detail::put_header(out, static_cast<std::uint32_t>(request::backend_mem_read),
                       version | (need_reply ? flag_need_reply : 0), mem_access_header_size);
    detail::put_le(out, guest_address);
    detail::put_le(out, size);
    return out;
}

inline std::vector<std::byte> encode_mem_write(std::uint64_t guest_address,
                                               std::span<const std::byte> data,
                                               bool need_reply = false) {
    std::vector<std::byte> out;
    detail::put_header(out, static_cast<std::uint32_t>(request::backend_mem_write),
                       version | (need_reply ? flag_need_reply : 0),
                       static_cast<std::uint32_t>(mem_access_header_size + data.size()));
    detail::put_le(out, guest_address);
    detail::put_le(out, static_cast<std::uint32_t>(data.size()));
    out.insert(out.end(), data.begin(), data.end());
    return out;
}

/// A reply carrying a u64 (0 = success, else an errno value).
inline std::vector<std::byte> encode_u64_reply(std::uint32_t req, std::uint64_t value) {
    std::vector<std::byte> out;
    detail::put_header(out, req, version | flag_reply, 8);
    detail::put_le(out, value);
    return out;
}

/// The reply to MEM_READ carrying the data read.
inline std::vector<std::byte> encode_mem_read_reply(std::uint64_t guest_address,
                                                    std::span<const std::byte> data) {
    std::vector<std::byte> out;
    detail::put_header(out, static_cast<std::uint32_t>(request::backend_mem_read), version | flag_reply,
                       static_cast<std::uint32_t>(mem_access_header_size + data.size()));
    detail::put_le(out, guest_address);
    detail::put_le(out, static_cast<std::uint32_t>(data.size()));
    out.insert(out.end(), data.begin(), data.end());
    return out;
}

inline std::vector<std::byte> encode_get_shmem_config() {
    std::vector<std::byte> out;
    detail::put_header(out, static_cast<std::uint32_t>(request::get_shmem_config), version, 0);
    return out;
}

inline std::vector<std::byte> encode_shmem_config_reply(const shmem_config_payload& c) {
    std::vector<std::byte> out;
    detail::put_header(out, static_cast<std::uint32_t>(request::get_shmem_config), version | flag_reply,
                       sizeof(shmem_config_payload));
    detail::put_le(out, c.nregions);
    detail::put_le(out, c.padding);
    for (std::uint64_t s : c.memory_sizes) detail::put_le(out, s);
    return out;
}

// ---- decoding ------------------------------------------------------------------------

/// Reads and checks a header. Throws: protocol_error.
inline msg_header decode_header(std::span<const std::byte> bytes) {
    using reason = protocol_error::reason;
    if (bytes.size() < header_size)
        throw protocol_error(reason::truncated_header,
                             fmt::format("truncated header: {} bytes, need {}", bytes.size(), header_size));
    msg_header h{detail::get_le<std::uint32_t>(bytes.data()), detail::get_le<std::uint32_t>(bytes.data() + 4),
                 detail::get_le<std::uint32_t>(bytes.data() + 8)};
    if ((h.flags & version_mask) != version)
        throw protocol_error(reason::bad_version,
                             fmt::format("request {}: version {} in flags 0x{:x}, expected {}", h.request,
                                         h.flags & version_mask, h.flags, version));
    if (h.flags & ~(version_mask | flag_reply | flag_need_reply))
        throw protocol_error(reason::bad_flags, fmt::format("request {}: unknown bits in flags 0x{:x}",
                                                            h.request, h.flags));
    if (h.size != bytes.size() - header_size)
        throw protocol_error(reason::size_mismatch,
                             fmt::format("request {}: header says {} payload bytes, {} received", h.request,
                                         h.size, bytes.size() - header_size));
    return h;
}

/// Decodes a back-end request, taking ownership of `fds` (closed if the
/// message is refused, and any the message does not use).
/// Throws: protocol_error naming the values.
inline backend_message decode_backend_message(std::span<const std::byte> bytes,
                                              std::vector<unique_fd> fds,
                                              std::uint32_t max_mem_access = 4096) {
    using reason = protocol_error::reason;
    const msg_header h = decode_header(bytes);
    const std::byte* p = bytes.data() + header_size;
    auto expect_fds = [&](std::size_t n) {
        if (fds.size() < n)
            throw protocol_error(reason::missing_fd, fmt::format("request {}: {} fd(s) attached, need {}",
                                                                 h.request, fds.size(), n));
        if (fds.size() > n)
            throw protocol_error(reason::extra_fds, fmt::format("request {}: {} fd(s) attached, need {} "
                                                                "(all closed)",
                                                                h.request, fds.size(), n));
    };
    auto expect_size = [&](std::size_t n) {
        if (h.size != n)
            throw protocol_error(reason::bad_payload,
                                 fmt::format("request {}: payload of {} bytes, expected {}", h.request, h.size, n));
    };
    if (h.flags & flag_reply)
        throw protocol_error(reason::bad_flags,
                             fmt::format("request {}: a back-end request must not carry the reply flag", h.request));
    backend_message m{h, mem_read_request{}};
    switch (static_cast<request>(h.request)) {
    case request::backend_shmem_map: {
        expect_size(sizeof(mmap_payload));
        expect_fds(1);
        m.body = shmem_map_request{detail::get_mmap(p), std::move(fds.front())};
        break;
    }
    case request::backend_shmem_unmap:
        expect_size(sizeof(mmap_payload));
        expect_fds(0);
        m.body = shmem_unmap_request{detail::get_mmap(p)};
        break;
    case request::backend_mem_read: {
        expect_size(mem_access_header_size);
        expect_fds(0);
        const auto size = detail::get_le<std::uint32_t>(p + 8);
        if (size == 0 || size > max_mem_access)
            throw protocol_error(reason::oversized, fmt::format("MEM_READ of {} bytes (allowed 1 to {})",
                                                                size, max_mem_access));
        m.body = mem_read_request{detail::get_le<std::uint64_t>(p), size};
        break;
    }
    case request::backend_mem_write: {
        if (h.size < mem_access_header_size)
            throw protocol_error(reason::bad_payload,
                                 fmt::format("MEM_WRITE payload of {} bytes, need at least {}", h.size,
                                             mem_access_header_size));
        expect_fds(0);
        const auto size = detail::get_le<std::uint32_t>(p + 8);
        if (size == 0 || size > max_mem_access)
            throw protocol_error(reason::oversized, fmt::format("MEM_WRITE of {} bytes (allowed 1 to {})",
                                                                size, max_mem_access));
        expect_size(mem_access_header_size + size);
        m.body = mem_write_request{detail::get_le<std::uint64_t>(p),
                                   std::vector<std::byte>(p + mem_access_header_size,
                                                          p + mem_access_header_size + size)};
        break;
    }
    default:
        throw protocol_error(reason::unknown_request,
                             fmt::format("unknown back-end request {} (flags 0x{:x}, {} payload bytes)",
                                         h.request, h.flags, h.size));
    }
    return m;
}

/// Decodes the back-end's reply to GET_SHMEM_CONFIG. Throws: protocol_error.
inline shmem_config_payload decode_shmem_config_reply(std::span<const std::byte> bytes) {
    using reason = protocol_error::reason;
    const msg_header h = decode_header(bytes);
    if (h.request != static_cast<std::uint32_t>(request::get_shmem_config) || !(h.flags & flag_reply))
        throw protocol_error(reason::bad_payload,
                             fmt::format("expected a GET_SHMEM_CONFIG reply, got request {} flags 0x{:x}",
                                         h.request, h.flags));
    if (h.size != sizeof(shmem_config_payload))
        throw protocol_error(reason::bad_payload, fmt::format("GET_SHMEM_CONFIG reply of {} bytes, expected {}",
                                                              h.size, sizeof(shmem_config_payload)));
    const std::byte* p = bytes.data() + header_size;
    shmem_config_payload c{};
    c.nregions = detail::get_le<std::uint32_t>(p);
    c.padding = detail::get_le<std::uint32_t>(p + 4);
    for (std::size_t i = 0; i < max_shmem_regions; ++i)
        c.memory_sizes[i] = detail::get_le<std::uint64_t>(p + 8 + 8 * i);
    if (c.nregions > max_shmem_regions)
        throw protocol_error(reason::bad_payload,
                             fmt::format("GET_SHMEM_CONFIG reply with {} regions (at most {})", c.nregions,
                                         max_shmem_regions));
    return c;
}

// ---- the channel ------------------------------------------------------------------------

/// One end of a vhost-user connection over a Unix stream socket, sending and
/// receiving messages with fds (SCM_RIGHTS).
class channel {
public:
    static constexpr std::size_t max_fds = 8;

    explicit channel(unique_fd sock) noexcept : sock_(std::move(sock)) {}

    /// A connected pair (AF_UNIX, SOCK_STREAM, close-on-exec).
    static std::pair<channel, channel> socketpair() {
        int sv[2];
        if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
            throw protocol_error(protocol_error::reason::io,
                                 fmt::format("socketpair failed: {}", std::strerror(errno)));
        return {channel(unique_fd(sv[0])), channel(unique_fd(sv[1]))};
    }

    int fd() const noexcept { return sock_.get(); }
    unique_fd release() noexcept { return std::move(sock_); }

    /// Sends one message with `fds` attached to its first byte.
    /// Throws: protocol_error (io) on a failed send.
    void send(std::span<const std::byte> bytes, std::span<const int> fds = {}) {
        if (fds.size() > max_fds)
            throw protocol_error(protocol_error::reason::extra_fds,
                                 fmt::format("cannot send {} fds (at most {})", fds.size(), max_fds));
        std::size_t sent = 0;
        bool with_fds = !fds.empty();
        while (sent < bytes.size() || with_fds) {
            iovec iov{const_cast<std::byte*>(bytes.data() + sent), bytes.size() - sent};
            msghdr msg{};
            msg.msg_iov = &iov;
            msg.msg_iovlen = 1;
            alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * max_fds)];
            if (with_fds) {
                msg.msg_control = control;
                msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
                cmsghdr* c = CMSG_FIRSTHDR(&msg);
                c->cmsg_level = SOL_SOCKET;
                c->cmsg_type = SCM_RIGHTS;
                c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
                std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
            }
            const ssize_t n = ::sendmsg(sock_.get(), &msg, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EINTR) continue;
                throw protocol_error(protocol_error::reason::io,
                                     fmt::format("sendmsg failed: {}", std::strerror(errno)));
            }
            sent += static_cast<std::size_t>(n);
            with_fds = false;
        }
    }

    /// Receives one message: the header (with any fds), then exactly the
    /// payload size it announces. Returns nullopt on an orderly close before
    /// a message starts.
    /// Throws: protocol_error for a payload above `max_payload` (the stream
    /// cannot be resynchronised: close it), a close in mid-message, more fds
    /// than max_fds, or an I/O error. Received fds are closed on every throw.
    std::optional<raw_message> receive(std::size_t max_payload) {
        raw_message m;
        m.bytes.resize(header_size);
        std::size_t got = 0;
        while (got < header_size) {
            const std::size_t n = recv_some(m.bytes.data() + got, header_size - got, &m.fds);
            if (n == 0) {
                if (got == 0) return std::nullopt;
                throw protocol_error(protocol_error::reason::truncated_header,
                                     fmt::format("connection closed after {} header bytes", got));
            }
            got += n;
        }
        const auto size = detail::get_le<std::uint32_t>(m.bytes.data() + 8);
        if (size > max_payload)
            throw protocol_error(protocol_error::reason::oversized,
                                 fmt::format("request {}: payload of {} bytes announced, at most {} accepted",
                                             detail::get_le<std::uint32_t>(m.bytes.data()), size, max_payload));
        m.bytes.resize(header_size + size);
        while (got < m.bytes.size()) {
            const std::size_t n = recv_some(m.bytes.data() + got, m.bytes.size() - got, &m.fds);
            if (n == 0)
                throw protocol_error(protocol_error::reason::size_mismatch,
                                     fmt::format("connection closed after {} of {} payload bytes",
                                                 got - header_size, size));
            got += n;
        }
        return m;
    }

private:
    std::size_t recv_some(std::byte* buf, std::size_t len, std::vector<unique_fd>* fds) {
        for (;;) {
            iovec iov{buf, len};
            msghdr msg{};
            msg.msg_iov = &iov;
            msg.msg_iovlen = 1;
            alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * max_fds)];
            msg.msg_control = control;
            msg.msg_controllen = sizeof(control);
            const ssize_t n = ::recvmsg(sock_.get(), &msg, MSG_CMSG_CLOEXEC);
            if (n < 0) {
                if (errno == EINTR) continue;
                throw protocol_error(protocol_error::reason::io,
                                     fmt::format("recvmsg failed: {}", std::strerror(errno)));
            }
            for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
                if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
                const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                for (std::size_t i = 0; i < count; ++i) {
                    int fd;
                    std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
                    fds->emplace_back(fd);
                }
            }
            if (msg.msg_flags & MSG_CTRUNC)
                throw protocol_error(protocol_error::reason::extra_fds,
                                     fmt::format("more than {} fds attached (all closed)", max_fds));
            return static_cast<std::size_t>(n);
        }
    }

    unique_fd sock_;
};

// ---- the front-end's side ----------------------------------------------------------------

struct frontend_limits {
    std::uint32_t max_mem_access = 4096; ///< largest MEM_READ / MEM_WRITE
};

/// Applies a back-end's requests to a device's shared memory regions and,
/// for MEM_READ / MEM_WRITE, to the device's DMA address space (the fallback
/// for addresses the back-end cannot translate, such as another device's
/// shared memory region).
class frontend {
public:
    frontend(virtio_shmem_device& dev, address_space& dma, frontend_limits limits = {}) noexcept
        : dev_(&dev), dma_(&dma), limits_(limits) {}

    /// The largest payload worth receiving.
    std::size_t max_payload() const noexcept {
        return std::max<std::size_t>(sizeof(mmap_payload), mem_access_header_size + limits_.max_mem_access);
    }

    /// Decodes and applies one message; returns the reply to send, if any.
    /// A message that does not decode is answered with an error (EINVAL) when
    /// its header asked for a reply, and otherwise refused silently; its fds
    /// are closed either way. `last_error()` tells what went wrong.
    std::optional<std::vector<std::byte>> handle(raw_message msg) {
        last_error_.clear();
        backend_message m;
        try {
            m = decode_backend_message(msg.bytes, std::move(msg.fds), limits_.max_mem_access);
        } catch (const protocol_error& e) {
            last_error_ = e.what();
            if (msg.bytes.size() >= header_size) {
                const auto req = detail::get_le<std::uint32_t>(msg.bytes.data());
                const auto flags = detail::get_le<std::uint32_t>(msg.bytes.data() + 4);
                if ((flags & flag_need_reply) ||
                    req == static_cast<std::uint32_t>(request::backend_mem_read))
                    return encode_u64_reply(req, EINVAL);
            }
            return std::nullopt;
        }
        return apply(m);
    }

    /// Applies a decoded request.
    std::optional<std::vector<std::byte>> apply(backend_message& m) {
        const std::uint32_t req = m.header.request;
        std::uint64_t status = 0;
        if (auto* map = std::get_if<shmem_map_request>(&m.body)) {
            status = guarded([&] {
                dev_->shmem_map(map->map.shmid, map->fd.get(), map->map.fd_offset, map->map.shm_offset,
                                map->map.len, map->map.flags);
            });
            // The mapping holds the pages; the fd itself is ours to close.
        } else if (auto* unmap = std::get_if<shmem_unmap_request>(&m.body)) {
            status = guarded([&] { dev_->shmem_unmap(unmap->map.shmid, unmap->map.shm_offset, unmap->map.len); });
        } else if (auto* rd = std::get_if<mem_read_request>(&m.body)) {
            std::vector<std::byte> data(rd->size);
            const memtx_result r = dma_->read(rd->guest_address, data.data(), data.size());
            if (r != memtx_ok) {
                last_error_ = fmt::format("MEM_READ of {} bytes at 0x{:x} failed (result {})", rd->size,
                                          rd->guest_address, static_cast<unsigned>(r));
                return encode_u64_reply(req, EFAULT);
            }
            return encode_mem_read_reply(rd->guest_address, data);
        } else if (auto* wr = std::get_if<mem_write_request>(&m.body)) {
            const memtx_result r = dma_->write(wr->guest_address, wr->data.data(), wr->data.size());
            if (r != memtx_ok) {
                last_error_ = fmt::format("MEM_WRITE of {} bytes at 0x{:x} failed (result {})",
                                          wr->data.size(), wr->guest_address, static_cast<unsigned>(r));
                status = EFAULT;
            }
        }
        if (m.need_reply()) return encode_u64_reply(req, status);
        return std::nullopt;
    }

    /// What the last refused message or request was refused for ("" if none).
    const std::string& last_error() const noexcept { return last_error_; }

    /// GET_SHMEM_CONFIG's answer for this device, as a back-end would give it.
    shmem_config_payload shmem_config() const {
        shmem_config_payload c{};
        dev_->for_each_shmem([&](const virtio_shmem& s) {
            if (s.shmid() < max_shmem_regions) {
                c.memory_sizes[s.shmid()] = s.size();
                c.nregions = std::max<std::uint32_t>(c.nregions, s.shmid() + 1u);
            }
        });
        return c;
    }

private:
    template <class F>
    std::uint64_t guarded(F&& f) {
        try {
            f();
            return 0;
        } catch (const shmem_error& e) {
            last_error_ = e.what();
            switch (e.why()) {
            case shmem_error::reason::unknown_shmid: return ENOENT;
            case shmem_error::reason::bad_fd: return EBADF;
            case shmem_error::reason::too_many_mappings: return ENOSPC;
            case shmem_error::reason::overlap: return EEXIST;
            case shmem_error::reason::mmap_failed: return ENOMEM;
            default: return EINVAL;
            }
        } catch (const region_error& e) {
            last_error_ = e.what();
            return EINVAL;
        }
    }

    virtio_shmem_device* dev_;
    address_space* dma_;
    frontend_limits limits_;
    std::string last_error_;
};

} // namespace qomem::vhost_user
