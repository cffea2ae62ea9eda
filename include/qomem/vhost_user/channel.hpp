// qomem/vhost_user/channel.hpp — one end of a vhost-user connection: a Unix
// stream socket sending and receiving whole messages with their fds
// (SCM_RIGHTS). Needs only the wire format.
//
//     auto [front, back] = qomem::vhost_user::channel::socketpair();
//     front.send(vu::encode_request(vu::frontend_request::get_features));
//     std::optional<vu::raw_message> m = back.receive(4096, std::chrono::seconds(5));
//
//     vu::channel ch = vu::channel::connect("/run/virtiofsd.sock");   // a listening back-end
//
// Every byte from the peer is hostile: a close in mid-message, a payload size
// above what the caller accepts, more fds than a message may carry are
// refused with protocol_error, and every fd received is closed on a refusal.
// A refused stream cannot be resynchronised: close it.
#pragma once

#include <poll.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <fmt/core.h>

#include <qomem/vhost_user/unique_fd.hpp>
#include <qomem/vhost_user/wire.hpp>

namespace qomem::vhost_user {

/// One end of a vhost-user connection over a Unix stream socket.
class channel {
public:
    static constexpr std::size_t max_fds = vhost_user::max_fds;
    using clock = std::chrono::steady_clock;

    explicit channel(unique_fd sock) noexcept : sock_(std::move(sock)) {}

    /// A connected pair (AF_UNIX, SOCK_STREAM, close-on-exec).
    /// Throws: protocol_error (io).
    static std::pair<channel, channel> socketpair() {
        int sv[2];
        if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
            throw protocol_error(protocol_reason::io,
                                 fmt::format("socketpair failed: {}", std::strerror(errno)));
        return {channel(unique_fd(sv[0])), channel(unique_fd(sv[1]))};
    }

    /// Connects to a back-end listening on the Unix socket at `path`.
    /// Throws: protocol_error (io) naming the path and the error.
    static channel connect(const std::string& path) {
        sockaddr_un addr{};
        addr.sun_family = AF_UNIX;
        if (path.size() >= sizeof(addr.sun_path))
            throw protocol_error(protocol_reason::io,
                                 fmt::format("socket path '{}' is longer than {} bytes", path,
                                             sizeof(addr.sun_path) - 1));
        std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
        unique_fd s(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
        if (!s)
            throw protocol_error(protocol_reason::io,
                                 fmt::format("socket failed: {}", std::strerror(errno)));
        int r;
        do r = ::connect(s.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr);
        while (r != 0 && errno == EINTR);
        if (r != 0)
            throw protocol_error(protocol_reason::io, fmt::format("connecting to '{}' failed: {}",
                                                                  path, std::strerror(errno)));
        return channel(std::move(s));
    }

    int fd() const noexcept { return sock_.get(); }
    explicit operator bool() const noexcept { return bool(sock_); }
    unique_fd release() noexcept { return std::move(sock_); }
    /// Closes the socket: the peer sees the connection end.
    void close() noexcept { sock_.reset(); }

    /// Sends one message with `fds` attached to its first byte.
    /// Throws: protocol_error (extra_fds above max_fds, io on a failed send).
    void send(std::span<const std::byte> bytes, std::span<const int> fds = {}) {
        if (fds.size() > max_fds)
            throw protocol_error(
                protocol_reason::extra_fds,
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
                throw protocol_error(protocol_reason::io,
                                     fmt::format("sendmsg failed: {}", std::strerror(errno)));
            }
            sent += static_cast<std::size_t>(n);
            with_fds = false;
        }
    }

    /// Receives one message: the header (with any fds), then exactly the
    /// payload size it announces. Returns nullopt on an orderly close before
    /// a message starts. Blocks (as the socket's SO_RCVTIMEO allows).
    /// Throws: protocol_error for a payload above `max_payload` (oversized), a
    /// close in mid-message, more fds than max_fds, or an I/O error. Received
    /// fds are closed on every throw.
    std::optional<raw_message> receive(std::size_t max_payload) {
        return receive_until(max_payload, std::nullopt);
    }

    /// The same, bounded: throws protocol_error (timeout) when the whole
    /// message has not arrived within `timeout`.
    std::optional<raw_message> receive(std::size_t max_payload, std::chrono::milliseconds timeout) {
        return receive_until(max_payload, clock::now() + timeout);
    }

    /// Waits until the socket is readable (a message, or the peer's close).
    /// False on timeout. Throws: protocol_error (io).
    bool wait_readable(std::chrono::milliseconds timeout) const {
        pollfd p{sock_.get(), POLLIN, 0};
        int r;
        do r = ::poll(&p, 1, static_cast<int>(timeout.count()));
        while (r < 0 && errno == EINTR);
        if (r < 0)
            throw protocol_error(protocol_reason::io,
                                 fmt::format("poll failed: {}", std::strerror(errno)));
        return r > 0;
    }

private:
    std::optional<raw_message> receive_until(std::size_t max_payload,
                                             std::optional<clock::time_point> deadline) {
        raw_message m;
        m.bytes.resize(header_size);
        std::size_t got = 0;
        while (got < header_size) {
            const std::size_t n =
                recv_some(m.bytes.data() + got, header_size - got, m.fds, deadline);
            if (n == 0) {
                if (got == 0) return std::nullopt;
                throw protocol_error(protocol_reason::truncated_header,
                                     fmt::format("connection closed after {} header bytes", got));
            }
            got += n;
        }
        const auto size = detail::get_le<std::uint32_t>(m.bytes.data() + 8);
        if (size > max_payload)
            throw protocol_error(
                protocol_reason::oversized,
                fmt::format("request {}: payload of {} bytes announced, at most {} accepted",
                            detail::get_le<std::uint32_t>(m.bytes.data()), size, max_payload));
        m.bytes.resize(header_size + size);
        while (got < m.bytes.size()) {
            const std::size_t n =
                recv_some(m.bytes.data() + got, m.bytes.size() - got, m.fds, deadline);
            if (n == 0)
                throw protocol_error(protocol_reason::size_mismatch,
                                     fmt::format("connection closed after {} of {} payload bytes",
                                                 got - header_size, size));
            got += n;
        }
        return m;
    }

    std::size_t recv_some(std::byte* buf, std::size_t len, std::vector<unique_fd>& fds,
                          std::optional<clock::time_point> deadline) {
        for (;;) {
            if (deadline) {
                const auto left =
                    std::chrono::ceil<std::chrono::milliseconds>(*deadline - clock::now());
                if (left.count() <= 0 || !wait_readable(left))
                    throw protocol_error(protocol_reason::timeout,
                                         "the peer sent no complete message in time");
            }
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
                throw protocol_error(protocol_reason::io,
                                     fmt::format("recvmsg failed: {}", std::strerror(errno)));
            }
            for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
                if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
                const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                for (std::size_t i = 0; i < count; ++i) {
                    int fd;
                    std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
                    fds.emplace_back(fd);
                }
            }
            if (msg.msg_flags & MSG_CTRUNC)
                throw protocol_error(
                    protocol_reason::extra_fds,
                    fmt::format("more than {} fds attached (all closed)", max_fds));
            return static_cast<std::size_t>(n);
        }
    }

    unique_fd sock_;
};

} // namespace qomem::vhost_user
