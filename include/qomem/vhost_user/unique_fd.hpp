// qomem/vhost_user/unique_fd.hpp — an owned file descriptor, closed on
// destruction: what vhost-user messages carry in SCM_RIGHTS.
//
//     qomem::vhost_user::unique_fd fd(::memfd_create("ram", MFD_CLOEXEC));
//     if (!fd) throw ...;
//     ch.send(bytes, std::array{fd.get()});   // the peer gets a copy; ours closes with fd
#pragma once

#include <unistd.h>

#include <utility>

namespace qomem::vhost_user {

/// An owned file descriptor (or none, -1), closed on destruction.
class unique_fd {
public:
    unique_fd() noexcept = default;
    explicit unique_fd(int fd) noexcept : fd_(fd) {}
    unique_fd(unique_fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
    unique_fd& operator=(unique_fd&& o) noexcept {
        if (this != &o) reset(std::exchange(o.fd_, -1));
        return *this;
    }
    unique_fd(const unique_fd&) = delete;
    unique_fd& operator=(const unique_fd&) = delete;
    ~unique_fd() { reset(); }

    int get() const noexcept { return fd_; }
    /// Gives up ownership: the caller closes the fd.
    int release() noexcept { return std::exchange(fd_, -1); }
    /// Closes the fd held (if any) and takes `fd`.
    void reset(int fd = -1) noexcept {
        if (fd_ >= 0) ::close(fd_);
        fd_ = fd;
    }
    explicit operator bool() const noexcept { return fd_ >= 0; }

private:
    int fd_ = -1;
};

} // namespace qomem::vhost_user
