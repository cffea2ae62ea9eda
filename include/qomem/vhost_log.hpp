// qomem/vhost_log.hpp — the dirty log shared with a vhost-user back-end: the
// shared memory a front-end hands over with VHOST_USER_SET_LOG_BASE, the
// listener that brings the back-end's marks into the regions' bitmaps, and
// the message that carries it.
//
//     qomem::vhost_log log = qomem::vhost_log::for_address_space(as); // a memfd
//     qomem::vhost_log_listener pull(log);
//     as.add_listener(pull);
//     channel.send(qomem::vhost_user::encode_set_log_base(log), std::array{log.fd()});
//     ...                                   // the back-end marks what it writes
//     sys.global_dirty_log_sync();          // pull: log_sync -> set_dirty
//     ram->snapshot_and_clear_dirty(...);   // or reset_dirty / get_dirty
//
// Layout (docs/interop/vhost-user.rst, "Migration"): one bit per
// VHOST_LOG_PAGE (0x1000) bytes of guest physical address space, from
// address 0; the bit of page p is bit (p % 8) of byte (p / 8), set and
// cleared atomically because both sides use the log at once. The log is
// sized in 64-bit chunks (QEMU's vhost_get_log_size), enough to cover every
// RAM range of the address space. SET_LOG_BASE (request 6) carries
// {u64 mmap_size; u64 mmap_offset} and the log's fd (with
// VHOST_USER_PROTOCOL_F_LOG_SHMFD, protocol feature 1).
//
// The other direction, `store_dirty`, copies a region's dirty bits into the
// log at the guest addresses of its sections: the bitmap exported in the
// layout a vhost-user back-end (or any process given the fd) reads.
#pragma once

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include <fmt/core.h>

#include <qomem/address_space.hpp>
#include <qomem/dirty_log.hpp>
#include <qomem/flat_view.hpp>
#include <qomem/memory_listener.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/types.hpp>
#include <qomem/vhost_user/channel.hpp>
#include <qomem/vhost_user/wire.hpp>

namespace qomem {

/// A dirty log in vhost-user's layout, in shared memory (a memfd the
/// front-end makes, or an fd a back-end was given). Move-only; unmaps and
/// closes its fd when destroyed. mark / take / test are safe from any
/// thread and any process sharing the memory.
class vhost_log {
public:
    /// VHOST_LOG_PAGE: the bytes of guest memory one bit covers.
    static constexpr hwaddr page_size = 0x1000;
    /// The log is sized in chunks of this many bytes (a u64 of bits).
    static constexpr std::uint64_t chunk_bytes = 8;

    /// A new, clear log covering guest physical addresses [0, `covered`)
    /// (at least one chunk), in a memfd.
    /// Throws: std::system_error when the memfd cannot be made or mapped.
    explicit vhost_log(u128 covered) {
        const u128 chunk_span = u128(page_size) * 8 * chunk_bytes;
        const u128 chunks = std::max<u128>(1, (covered + chunk_span - 1) / chunk_span);
        if (chunks * chunk_bytes > (u128(1) << 40))
            throw std::system_error(
                EINVAL, std::generic_category(),
                fmt::format("vhost log for {} bytes of guest memory is too large",
                            detail::hex(covered)));
        size_ = static_cast<std::uint64_t>(chunks * chunk_bytes);
        fd_ = vhost_user::unique_fd(::memfd_create("qomem-vhost-log", MFD_CLOEXEC));
        if (!fd_)
            throw std::system_error(errno, std::generic_category(),
                                    "memfd_create for the vhost log");
        if (::ftruncate(fd_.get(), static_cast<off_t>(size_)) != 0)
            throw std::system_error(errno, std::generic_category(), "ftruncate of the vhost log");
        map(0);
    }

    /// The log a back-end received: `fd` (taken), `size` bytes from
    /// `offset` (the SET_LOG_BASE payload).
    /// Throws: vhost_user::protocol_error (bad_payload) naming the values
    /// when they do not describe a mappable log: a size of 0, an offset not
    /// a multiple of the page size, a file smaller than offset + size, a
    /// failing mmap. The fd is closed then.
    static vhost_log attach(vhost_user::unique_fd fd, std::uint64_t size, std::uint64_t offset) {
        using vhost_user::protocol_error;
        auto refuse = [&](const std::string& why) {
            return protocol_error(protocol_error::reason::bad_payload,
                                  fmt::format("SET_LOG_BASE (size {:#x}, offset {:#x}, fd {}): {}",
                                              size, offset, fd.get(), why));
        };
        if (size == 0) throw refuse("an empty log");
        if (offset % static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE)))
            throw refuse("the offset is not a multiple of the page size");
        if (offset + size < offset) throw refuse("offset + size overflows");
        struct stat st;
        if (::fstat(fd.get(), &st) != 0)
            throw refuse(fmt::format("fstat: {}", std::strerror(errno)));
        if (S_ISREG(st.st_mode) && static_cast<std::uint64_t>(st.st_size) < offset + size)
            throw refuse(fmt::format("the file has only {:#x} bytes",
                                     static_cast<std::uint64_t>(st.st_size)));
        vhost_log l;
        l.fd_ = std::move(fd);
        l.size_ = size;
        l.offset_ = offset;
        try {
            l.map(offset);
        } catch (const std::system_error& e) {
            throw refuse(e.what());
        }
        return l;
    }

    /// A log covering every RAM range of `as`'s current view (QEMU's
    /// vhost_get_log_size over the memory table).
    static vhost_log for_address_space(const address_space& as) {
        u128 end = 0;
        const ref_ptr<flat_view> v = as.view();
        for (const flat_range& r : v->ranges())
            if (r.mr->is_ram()) end = std::max(end, r.end());
        return vhost_log(end);
    }

    vhost_log(vhost_log&& o) noexcept
        : fd_(std::move(o.fd_)), base_(std::exchange(o.base_, nullptr)), size_(o.size_),
          offset_(o.offset_), map_len_(o.map_len_) {}
    vhost_log& operator=(vhost_log&& o) noexcept {
        if (this != &o) {
            unmap();
            fd_ = std::move(o.fd_);
            base_ = std::exchange(o.base_, nullptr);
            size_ = o.size_;
            offset_ = o.offset_;
            map_len_ = o.map_len_;
        }
        return *this;
    }
    ~vhost_log() { unmap(); }

    /// The shared memory's fd (send it with SET_LOG_BASE).
    int fd() const noexcept { return fd_.get(); }
    /// The SET_LOG_BASE payload: the log's size in bytes, and where it
    /// starts in fd().
    std::uint64_t mmap_size() const noexcept { return size_; }
    std::uint64_t mmap_offset() const noexcept { return offset_; }
    /// The guest physical addresses the log covers: [0, covered()).
    u128 covered() const noexcept { return u128(size_) * 8 * page_size; }

    /// Marks the pages of [gpa, gpa + len) dirty (what a back-end does when
    /// it writes guest memory). The part beyond covered() is ignored.
    void mark(hwaddr gpa, hwaddr len) noexcept {
        for_each_page(gpa, len, [&](std::uint64_t page) {
            byte(page).fetch_or(static_cast<std::uint8_t>(1u << (page % 8)),
                                std::memory_order_relaxed);
        });
    }
    /// True if a page of [gpa, gpa + len) is marked; changes nothing.
    bool test(hwaddr gpa, hwaddr len) const noexcept {
        bool dirty = false;
        for_each_page(gpa, len, [&](std::uint64_t page) {
            dirty |= (byte(page).load(std::memory_order_relaxed) >> (page % 8) & 1) != 0;
        });
        return dirty;
    }
    /// Clears the marked pages of [gpa, gpa + len) one by one, calling
    /// f(page address) for each page that was marked.
    template <class F>
    void take(hwaddr gpa, u128 len, F&& f) {
        const u128 end = std::min(u128(gpa) + len, covered());
        if (u128(gpa) >= end) return;
        for (std::uint64_t page = gpa / page_size; u128(page) * page_size < end; ++page) {
            const auto bit = static_cast<std::uint8_t>(1u << (page % 8));
            if ((byte(page).load(std::memory_order_relaxed) & bit) &&
                (byte(page).fetch_and(static_cast<std::uint8_t>(~bit), std::memory_order_relaxed) &
                 bit))
                f(static_cast<hwaddr>(page * page_size));
        }
    }
    /// Copies the dirty bits `client` has for the region behind `s` into the
    /// log, at the section's guest addresses (the bitmap exported in
    /// vhost-user's layout); nothing is cleared. Any thread.
    void store_dirty(const memory_section& s, dirty_client client) noexcept {
        const u128 end = std::min(u128(s.offset_within_address_space) + s.size, covered());
        for (u128 a = u128(s.offset_within_address_space / page_size) * page_size; a < end;
             a += page_size) {
            const u128 lo = std::max<u128>(a, s.offset_within_address_space);
            const u128 hi = std::min<u128>(a + page_size, end);
            const hwaddr in_region =
                static_cast<hwaddr>(s.offset_within_region + (lo - s.offset_within_address_space));
            if (s.mr->get_dirty(in_region, static_cast<hwaddr>(hi - lo), client))
                mark(static_cast<hwaddr>(lo), static_cast<hwaddr>(hi - lo));
        }
    }
    /// store_dirty for every range of `as`'s current view whose region logs.
    void store_dirty(const address_space& as, dirty_client client) {
        const ref_ptr<flat_view> v = as.view();
        for (const flat_range& r : v->ranges())
            if (r.mr->logs_dirty()) store_dirty(detail::section_of(r), client);
    }

private:
    vhost_log() = default;

    using byte_ref = std::atomic_ref<std::uint8_t>;
    byte_ref byte(std::uint64_t page) const noexcept { return byte_ref(base_[page / 8]); }
    template <class F>
    void for_each_page(hwaddr gpa, hwaddr len, F&& f) const {
        const u128 end = std::min(u128(gpa) + len, covered());
        if (len == 0 || u128(gpa) >= end) return;
        for (std::uint64_t page = gpa / page_size; u128(page) * page_size < end; ++page) f(page);
    }
    void map(std::uint64_t offset) {
        // mmap wants a page-aligned offset (checked by attach); the log
        // starts exactly there.
        map_len_ = static_cast<std::size_t>(size_);
        void* p = ::mmap(nullptr, map_len_, PROT_READ | PROT_WRITE, MAP_SHARED, fd_.get(),
                         static_cast<off_t>(offset));
        if (p == MAP_FAILED)
            throw std::system_error(errno, std::generic_category(), "mmap of the vhost log");
        base_ = static_cast<std::uint8_t*>(p);
    }
    void unmap() noexcept {
        if (base_) ::munmap(std::exchange(base_, nullptr), map_len_);
    }

    vhost_user::unique_fd fd_;
    std::uint8_t* base_ = nullptr;
    std::uint64_t size_ = 0;
    std::uint64_t offset_ = 0;
    std::size_t map_len_ = 0;
};

/// The front-end's side of a vhost_log (QEMU's vhost memory listener, its
/// dirty-log part): on log_sync it takes the pages the back-end marked in
/// the section's guest addresses and marks them dirty in the section's
/// region (memory_region::set_dirty: for every client that region logs
/// for). Register it to the address space the back-end's memory table
/// comes from; `logging()` says whether the system tracks globally (when a
/// front-end turns VHOST_F_LOG_ALL on).
class vhost_log_listener : public memory_listener {
public:
    explicit vhost_log_listener(vhost_log& log)
        : memory_listener(options{.priority = priority_dev_backend, .name = "vhost-log"}),
          log_(&log) {}

    bool logging() const noexcept { return logging_; }
    /// How many pages log_sync brought in so far.
    std::uint64_t pages_synced() const noexcept { return synced_; }

    void log_global_start() override { logging_ = true; }
    void log_global_stop() override { logging_ = false; }
    void log_sync(const memory_section& s) override {
        const u128 end = u128(s.offset_within_address_space) + s.size;
        log_->take(s.offset_within_address_space, s.size, [&](hwaddr page) {
            // The part of the page inside the section, in region offsets.
            const hwaddr lo = std::max(page, s.offset_within_address_space);
            const u128 hi = std::min<u128>(u128(page) + vhost_log::page_size, end);
            s.mr->set_dirty(s.offset_within_region + (lo - s.offset_within_address_space),
                            static_cast<hwaddr>(hi - lo));
            ++synced_;
        });
    }

private:
    vhost_log* log_;
    bool logging_ = false;
    std::uint64_t synced_ = 0;
};

namespace vhost_user {

/// VHOST_USER_SET_LOG_BASE (frontend_request::set_log_base, negotiated by
/// protocol_feature::log_shmfd), as a number for encode_u64_reply.
inline constexpr std::uint32_t request_set_log_base =
    static_cast<std::uint32_t>(frontend_request::set_log_base);
/// VHOST_F_LOG_ALL: the device feature a back-end that logs offers.
inline constexpr unsigned f_log_all = 26;

/// The SET_LOG_BASE message for `log` (send it with log.fd() attached):
/// header, then {u64 mmap_size; u64 mmap_offset}.
inline std::vector<std::byte> encode_set_log_base(const vhost_log& log, bool need_reply = false) {
    std::vector<std::byte> out = detail::start(request_set_log_base, detail::flags_for(need_reply));
    detail::put_le(out, log.mmap_size());
    detail::put_le(out, log.mmap_offset());
    return detail::finish(std::move(out));
}

/// A decoded SET_LOG_BASE: the log's size and offset, and its fd.
struct set_log_base_request {
    std::uint64_t mmap_size = 0;
    std::uint64_t mmap_offset = 0;
    unique_fd fd;
    bool need_reply = false;
};

/// Decodes a SET_LOG_BASE a back-end received, taking ownership of `fds`
/// (closed when refused, and all but the one used).
/// Throws: protocol_error naming the values: a bad header, another request,
/// a payload that is not 16 bytes, no fd.
inline set_log_base_request decode_set_log_base(std::span<const std::byte> bytes,
                                                std::vector<unique_fd> fds) {
    using reason = protocol_error::reason;
    const msg_header h = decode_header(bytes);
    if (h.request != request_set_log_base)
        throw protocol_error(reason::unknown_request,
                             fmt::format("request {} where SET_LOG_BASE ({}) was expected",
                                         h.request, request_set_log_base));
    if (h.size != 16)
        throw protocol_error(reason::bad_payload,
                             fmt::format("SET_LOG_BASE: payload of {} bytes, expected 16", h.size));
    if (fds.empty()) throw protocol_error(reason::missing_fd, "SET_LOG_BASE without the log's fd");
    set_log_base_request r;
    r.mmap_size = detail::get_le<std::uint64_t>(bytes.data() + header_size);
    r.mmap_offset = detail::get_le<std::uint64_t>(bytes.data() + header_size + 8);
    r.fd = std::move(fds.front());
    r.need_reply = h.flags & flag_need_reply;
    return r;
}

} // namespace vhost_user

} // namespace qomem
