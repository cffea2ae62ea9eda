// qomem/vhost_user/frontend.hpp — a vhost-user front-end session: the
// handshake with a real back-end (virtiofsd, qemu-storage-daemon, ...), the
// back-end's memory table kept in step with an address space's RAM, split
// virtqueues, and the back-end's request channel.
//
//     auto ram = qomem::make_ram_from_fd(nullptr, "ram", 64 << 20, memfd, 0);  // RAM must be fd-backed
//     system->add_subregion(0, *ram);
//     qomem::address_space guest(*system, "memory");
//     vu::frontend fe(vu::channel::connect("/tmp/fs.sock"), guest);   // handshake + memory table
//     vu::split_virtqueue q(guest, 0x1000, 64);                          // virtqueue.hpp
//     fe.start_vring(1, q.layout());
//     q.add(chain); fe.kick(1); fe.wait_call(1, std::chrono::seconds(5)); q.take_used();
//
// The handshake (the constructor), in this order: GET_FEATURES; when the
// back-end offers VHOST_USER_F_PROTOCOL_FEATURES (bit 30),
// GET_PROTOCOL_FEATURES and SET_PROTOCOL_FEATURES with what both sides
// support; GET_QUEUE_NUM (MQ), GET_MAX_MEM_SLOTS (CONFIGURE_MEM_SLOTS),
// SET_BACKEND_REQ_FD with one end of a socketpair (BACKEND_REQ); SET_OWNER;
// SET_FEATURES with the device features both accept, plus bit 30 when offered.
// Then the session listens to the address space (memory_listener.hpp):
//  * the table is one entry per flat range of writable, fd-backed RAM
//    (make_ram_from_fd): {guest address, size, this process's address,
//    offset in the fd}, the fd attached; MMIO over RAM splits it into
//    several entries. RAM without an fd, ROM and RAM devices are left out,
//    as QEMU's vhost filter does: the back-end cannot map them.
//  * with CONFIGURE_MEM_SLOTS each change is sent as REM_MEM_REG (no fd, as
//    upstream recommends) then ADD_MEM_REG; without, as a new SET_MEM_TABLE
//    (at most 8 entries). With REPLY_ACK each update is acknowledged before
//    the commit returns; without, a GET_FEATURES round trip follows it (the
//    back-end answers in order), so either way the back-end has the new
//    table when the change that caused it is committed.
//  * memfds are sealed against shrinking (F_SEAL_SHRINK) before their first
//    use when they allow it (frontend_options::seal_ram): a back-end holding
//    the guest's RAM fd cannot truncate it under the guest (SIGBUS).
// A request is sent only when the back-end negotiated what it needs (the
// table in allowed()); NEED_REPLY only with REPLY_ACK. Asking for anything
// else throws protocol_error (not_negotiated) and sends nothing.
//
// Failures. Every wait for the back-end is bounded (frontend_options::timeout).
// A broken connection, a malformed or refused reply, or a timeout fails the
// session: the socket is closed, failure() says why, and every later call
// throws protocol_error (closed). A failure while the listener updates the
// table (inside a commit of the address space) does not throw into the
// commit: the guest's memory map changes as asked, the session fails.
//
// Threads: one at a time, the memory system's writer thread (listener
// registration and the table updates run in its commits). The address space
// must outlive the session.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <fmt/core.h>

#include <qomem/address_space.hpp>
#include <qomem/assert.hpp>
#include <qomem/memory_listener.hpp>
#include <qomem/shmem.hpp>
#include <qomem/vhost_user/backend_requests.hpp>
#include <qomem/vhost_user/channel.hpp>
#include <qomem/vhost_user/virtqueue.hpp>
#include <qomem/vhost_user/wire.hpp>

namespace qomem::vhost_user {

struct frontend_options {
    /// Device features the front-end (its driver) accepts; the session sets
    /// those the back-end offers, plus VHOST_USER_F_PROTOCOL_FEATURES.
    std::uint64_t features = std::uint64_t(1) << virtio_f_version_1;
    /// Protocol features the front-end accepts (within what the session
    /// supports, frontend::supported_protocol_features).
    std::uint64_t protocol_features = ~std::uint64_t(0);
    /// The longest wait for any answer of the back-end.
    std::chrono::milliseconds timeout{5000};
    /// The largest MEM_READ / MEM_WRITE accepted on the back-end channel.
    std::uint32_t max_mem_access = 4096;
    /// Seal fd-backed RAM against shrinking before sharing it (memfds that
    /// allow sealing; others are shared as they are).
    bool seal_ram = true;
};

/// One entry of the back-end's memory table.
struct mem_table_entry {
    mem_region_payload region;
    int fd = -1;                       ///< attached when sent (the RAM's own fd)
    const memory_region* mr = nullptr; ///< the RAM region it shows
    friend bool operator==(const mem_table_entry&, const mem_table_entry&) = default;
};

class frontend final : private memory_listener {
public:
    /// The protocol features this session knows how to use.
    static constexpr std::uint64_t supported_protocol_features =
        mask({protocol_feature::mq, protocol_feature::reply_ack, protocol_feature::backend_req,
              protocol_feature::config, protocol_feature::backend_send_fd,
              protocol_feature::configure_mem_slots, protocol_feature::shmem,
              protocol_feature::qomem_mem_access});

    /// Runs the handshake over `ch` and gives the back-end the memory table
    /// of `guest`'s RAM. `dev`, if given, is the device whose shared memory
    /// regions the back-end's SHMEM_MAP / SHMEM_UNMAP apply to (SHMEM is
    /// negotiated only then); MEM_READ / MEM_WRITE go through `guest`.
    /// Effects: registers as a listener of `guest` (priority 10, as QEMU's
    /// vhost listener); holds a memory_region_ref on each RAM region in the
    /// table. Throws: protocol_error (the back-end failed the handshake or
    /// the first table); then nothing stays registered.
    frontend(channel ch, address_space& guest, frontend_options opts = {},
             virtio_shmem_device* dev = nullptr);

    /// Unregisters from the address space (without telling the back-end
    /// anything), drops the table's region references, closes the sockets
    /// and eventfds: the back-end sees the connection end.
    ~frontend() {
        closing_ = true;
        if (registered_) guest_->remove_listener(*this);
    }

    frontend(const frontend&) = delete;
    frontend& operator=(const frontend&) = delete;

    // ---- what was negotiated ------------------------------------------------------
    std::uint64_t backend_features() const noexcept { return backend_features_; }
    /// The device features set with SET_FEATURES.
    std::uint64_t features() const noexcept { return features_; }
    std::uint64_t backend_protocol_features() const noexcept { return backend_protocol_features_; }
    /// The protocol features set with SET_PROTOCOL_FEATURES.
    std::uint64_t protocol_features() const noexcept { return protocol_features_; }
    bool has(protocol_feature f) const noexcept { return protocol_features_ & mask(f); }
    /// GET_QUEUE_NUM's answer (MQ only).
    std::optional<std::uint64_t> queue_num() const noexcept { return queue_num_; }
    /// The most table entries the back-end takes (GET_MAX_MEM_SLOTS, or 8).
    std::size_t max_mem_slots() const noexcept { return max_slots_; }
    /// Whether the session may send `r` now (see the header comment).
    bool allowed(frontend_request r) const noexcept;

    /// The table the back-end has, by guest address.
    std::vector<mem_table_entry> mem_table() const {
        std::vector<mem_table_entry> out;
        for (const slot& s : table_) out.push_back(s.entry);
        return out;
    }
    /// Every request sent, in order (the protocol trace).
    const std::vector<frontend_request>& requests_sent() const noexcept { return sent_; }

    /// Empty while the session works; else why it failed.
    const std::string& failure() const noexcept { return failure_; }
    bool failed() const noexcept { return !failure_.empty(); }

    // ---- requests -------------------------------------------------------------------

    /// `size` bytes of the device's configuration space from `offset` (CONFIG).
    /// Throws: protocol_error (not_negotiated, rejected for an empty answer,
    /// and the session's failures).
    std::vector<std::byte> get_config(std::uint32_t offset, std::uint32_t size);

    /// The back-end's shared memory regions (SHMEM). Throws: protocol_error.
    shmem_config_payload get_shmem_config();

    /// Declares the back-end's shared memory regions on the session's device,
    /// as QEMU's generic vhost-user device does at realize: GET_SHMEM_CONFIG,
    /// then one region per non-zero size, at its shmid. A transport then
    /// places them (virtio_transport.hpp) without the device model naming them.
    /// Requires (asserted): the session was given a device.
    /// Effects: a child "shm[N]" of the device per region; returns how many.
    /// Complexity: one round trip, plus a reservation (mmap) per region.
    /// Throws: protocol_error (SHMEM not negotiated, nothing sent; the
    /// session's failures); shmem_error for a size that is not a multiple of
    /// the page size (bad_size), a shmid the device already has
    /// (duplicate_shmid), or a reservation the kernel refuses (bad_size).
    /// Every check runs before the first region is declared, and a failed
    /// reservation undoes the ones made: the device is left as it was.
    std::size_t declare_shmem_regions();

    /// Starts virtqueue `index` on the rings at `layout` (guest addresses in
    /// the shared RAM): SET_VRING_NUM, SET_VRING_BASE (0), SET_VRING_ADDR
    /// (this process's addresses), SET_VRING_CALL and SET_VRING_KICK with new
    /// eventfds, and SET_VRING_ENABLE when bit 30 was negotiated.
    /// Requires (asserted): `index` below queue_num() when known, the queue
    /// not started. Throws: protocol_error (not_shared when a ring is outside
    /// the table; the session's failures).
    void start_vring(unsigned index, const vring_layout& layout);

    /// Stops virtqueue `index` (GET_VRING_BASE) and returns the back-end's
    /// next available index. Requires (asserted): started. Throws: protocol_error.
    std::uint32_t stop_vring(unsigned index);

    /// Tells the back-end that queue `index` has new buffers (its kick eventfd).
    /// Requires (asserted): started.
    void kick(unsigned index);

    /// Waits until the back-end signals queue `index` (its call eventfd),
    /// serving back-end requests meanwhile. False after `timeout`.
    /// Requires (asserted): started. Throws: protocol_error.
    bool wait_call(unsigned index, std::chrono::milliseconds timeout);

    /// Serves the back-end's requests (SHMEM_MAP, ...) until none arrives for
    /// `timeout`; returns how many. Throws: protocol_error (the session's failures).
    std::size_t serve_backend_requests(std::chrono::milliseconds timeout);

    /// What the last refused back-end request was refused for ("" if none).
    const std::string& last_backend_error() const noexcept { return last_backend_error_; }

private:
    struct slot {
        mem_table_entry entry;
        region_ref hold;
    };
    struct vring {
        std::uint16_t size = 0;
        unique_fd kick;
        unique_fd call;
    };

    // memory_listener
    inline void region_add(const memory_section& s) override;
    inline void region_del(const memory_section& s) override;
    inline void commit() override;

    void check_usable() const {
        if (!failure_.empty())
            throw protocol_error(protocol_reason::closed,
                                 fmt::format("the session failed earlier: {}", failure_));
    }
    [[noreturn]] void fail_with(protocol_reason r, const std::string& why) {
        fail(why);
        throw protocol_error(r, why);
    }
    void fail(const std::string& why) noexcept {
        if (failure_.empty()) failure_ = why;
        main_.close();
        backend_ch_.reset();
    }
    void send(frontend_request r, std::span<const std::byte> msg, std::span<const int> fds = {});
    raw_message await_reply(frontend_request r, std::size_t max_payload);
    std::uint64_t request_u64(frontend_request r);
    /// Sends what `make(need_reply)` builds; with REPLY_ACK, waits for a 0.
    template <class Make>
    void send_acked(frontend_request r, Make&& make, std::span<const int> fds = {});
    /// Without REPLY_ACK: a GET_FEATURES round trip, after which the
    /// back-end has processed everything sent before it.
    void barrier() {
        if (!has(protocol_feature::reply_ack)) (void)request_u64(frontend_request::get_features);
    }
    bool serve_one_backend_request();
    void sync_table();
    std::uint64_t user_address(hwaddr gpa, std::uint64_t len, const char* what) const;
    vring& started(unsigned index) {
        auto it = vrings_.find(index);
        QOMEM_ASSERT(it != vrings_.end(), "virtqueue {} is not started", index);
        return it->second;
    }

    channel main_;
    address_space* guest_;
    frontend_options options_;
    virtio_shmem_device* dev_;
    std::uint64_t backend_features_ = 0;
    std::uint64_t features_ = 0;
    std::uint64_t backend_protocol_features_ = 0;
    std::uint64_t protocol_features_ = 0;
    std::optional<std::uint64_t> queue_num_;
    std::size_t max_slots_ = max_mem_table_regions;
    std::optional<channel> backend_ch_;
    std::optional<backend_request_handler> handler_;
    std::map<hwaddr, slot> sections_; // the listener's view: eligible RAM ranges
    std::vector<slot> table_;         // what the back-end has
    std::map<unsigned, vring> vrings_;
    std::vector<frontend_request> sent_;
    std::string failure_;
    std::string last_backend_error_;
    bool registered_ = false;
    bool closing_ = false;
    bool in_listener_ = false;
    bool table_dirty_ = false;
};

// ---- implementation ---------------------------------------------------------------------

inline frontend::frontend(channel ch, address_space& guest, frontend_options opts,
                          virtio_shmem_device* dev)
    : memory_listener(10), main_(std::move(ch)), guest_(&guest), options_(opts), dev_(dev) {
    constexpr std::uint64_t protocol_bit = std::uint64_t(1) << vhost_user_f_protocol_features;
    backend_features_ = request_u64(frontend_request::get_features);
    if (backend_features_ & protocol_bit) {
        backend_protocol_features_ = request_u64(frontend_request::get_protocol_features);
        std::uint64_t want = options_.protocol_features & supported_protocol_features;
        if (!dev_) want &= ~mask(protocol_feature::shmem); // nothing to map into
        const std::uint64_t agreed = backend_protocol_features_ & want;
        send(frontend_request::set_protocol_features,
             encode_u64_request(frontend_request::set_protocol_features, agreed));
        protocol_features_ = agreed;
    }
    if (has(protocol_feature::mq)) queue_num_ = request_u64(frontend_request::get_queue_num);
    if (has(protocol_feature::configure_mem_slots))
        max_slots_ = static_cast<std::size_t>(
            std::min<std::uint64_t>(request_u64(frontend_request::get_max_mem_slots), 512));
    if (has(protocol_feature::backend_req)) {
        auto [ours, theirs] = channel::socketpair();
        const std::array<int, 1> fd{theirs.fd()};
        send_acked(
            frontend_request::set_backend_req_fd,
            [](bool nr) { return encode_request(frontend_request::set_backend_req_fd, nr); }, fd);
        backend_ch_.emplace(std::move(ours));
        handler_.emplace(
            dev_, guest,
            backend_channel_options{protocol_features_ & mask({protocol_feature::shmem,
                                                               protocol_feature::qomem_mem_access}),
                                    options_.max_mem_access});
    }
    send(frontend_request::set_owner, encode_request(frontend_request::set_owner));
    features_ = backend_features_ & (options_.features | protocol_bit);
    send(frontend_request::set_features,
         encode_u64_request(frontend_request::set_features, features_));
    guest.add_listener(*this); // replays the view: the first table
    registered_ = true;
    if (!failure_.empty()) {
        closing_ = true;
        guest.remove_listener(*this);
        registered_ = false;
        throw protocol_error(protocol_reason::closed, failure_);
    }
}

inline bool frontend::allowed(frontend_request r) const noexcept {
    constexpr std::uint64_t protocol_bit = std::uint64_t(1) << vhost_user_f_protocol_features;
    switch (r) {
    case frontend_request::get_features:
    case frontend_request::set_features:
    case frontend_request::set_owner:
    case frontend_request::set_mem_table:
    case frontend_request::set_vring_num:
    case frontend_request::set_vring_addr:
    case frontend_request::set_vring_base:
    case frontend_request::get_vring_base:
    case frontend_request::set_vring_kick:
    case frontend_request::set_vring_call:
        return true;
    case frontend_request::get_protocol_features:
    case frontend_request::set_protocol_features:
        return backend_features_ & protocol_bit;
    case frontend_request::set_vring_enable:
        return features_ & protocol_bit;
    case frontend_request::get_queue_num:
        return has(protocol_feature::mq);
    case frontend_request::set_backend_req_fd:
        return has(protocol_feature::backend_req);
    case frontend_request::get_config:
        return has(protocol_feature::config);
    case frontend_request::get_max_mem_slots:
    case frontend_request::add_mem_reg:
    case frontend_request::rem_mem_reg:
        return has(protocol_feature::configure_mem_slots);
    case frontend_request::get_shmem_config:
        return has(protocol_feature::shmem);
    case frontend_request::set_log_base:
        return has(protocol_feature::log_shmfd);
    }
    return false;
}

inline void frontend::send(frontend_request r, std::span<const std::byte> msg,
                           std::span<const int> fds) {
    check_usable();
    if (!allowed(r))
        throw protocol_error(
            protocol_reason::not_negotiated,
            fmt::format("{} needs a feature the back-end did not negotiate (protocol features "
                        "0x{:x}, device features 0x{:x}); nothing was sent",
                        vhost_user::name(r), protocol_features_, features_));
    try {
        main_.send(msg, fds);
    } catch (const protocol_error& e) {
        fail_with(e.why(), fmt::format("sending {}: {}", vhost_user::name(r), e.what()));
    }
    sent_.push_back(r);
}

inline raw_message frontend::await_reply(frontend_request r, std::size_t max_payload) {
    using clock = std::chrono::steady_clock;
    const auto deadline = clock::now() + options_.timeout;
    for (;;) {
        const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - clock::now());
        std::array<pollfd, 2> p{pollfd{main_.fd(), POLLIN, 0}, pollfd{-1, POLLIN, 0}};
        // Back-end requests are served while we wait (a back-end may need an
        // answer before it can answer us), but not inside a commit.
        if (backend_ch_ && !in_listener_) p[1].fd = backend_ch_->fd();
        int n = 0;
        if (left.count() > 0) {
            do n = ::poll(p.data(), p.size(), static_cast<int>(left.count()));
            while (n < 0 && errno == EINTR);
        }
        if (n <= 0)
            fail_with(protocol_reason::timeout,
                      fmt::format("no reply to {} within {} ms", vhost_user::name(r),
                                  options_.timeout.count()));
        if (p[1].revents) {
            serve_one_backend_request();
            if (!main_) check_usable();
            continue;
        }
        std::optional<raw_message> m;
        try {
            m = main_.receive(
                max_payload, std::chrono::ceil<std::chrono::milliseconds>(deadline - clock::now()));
        } catch (const protocol_error& e) {
            fail_with(e.why(), fmt::format("waiting for the reply to {}: {}", vhost_user::name(r),
                                           e.what()));
        }
        if (!m)
            fail_with(protocol_reason::closed,
                      fmt::format("the back-end closed the connection instead of "
                                  "answering {}",
                                  vhost_user::name(r)));
        if (!m->fds.empty())
            fail_with(protocol_reason::extra_fds, fmt::format("the reply to {} came with {} fd(s)",
                                                              vhost_user::name(r), m->fds.size()));
        try {
            (void)decode_reply(m->bytes, static_cast<std::uint32_t>(r));
        } catch (const protocol_error& e) {
            fail_with(e.why(), e.what());
        }
        return std::move(*m);
    }
}

inline std::uint64_t frontend::request_u64(frontend_request r) {
    send(r, encode_request(r));
    const raw_message m = await_reply(r, 8);
    try {
        return decode_u64_reply(m.bytes, static_cast<std::uint32_t>(r));
    } catch (const protocol_error& e) {
        fail_with(e.why(), e.what());
    }
}

template <class Make>
void frontend::send_acked(frontend_request r, Make&& make, std::span<const int> fds) {
    const bool ack = has(protocol_feature::reply_ack);
    send(r, make(ack), fds);
    if (!ack) return;
    const raw_message m = await_reply(r, 8);
    std::uint64_t status = 0;
    try {
        status = decode_u64_reply(m.bytes, static_cast<std::uint32_t>(r));
    } catch (const protocol_error& e) {
        fail_with(e.why(), e.what());
    }
    if (status != 0)
        fail_with(protocol_reason::rejected,
                  fmt::format("the back-end answered {} with {}", vhost_user::name(r), status));
}

inline bool frontend::serve_one_backend_request() {
    if (!backend_ch_) return false;
    try {
        std::optional<raw_message> m =
            backend_ch_->receive(handler_->max_payload(), options_.timeout);
        if (!m) { // the back-end closed its channel: it sends no more requests
            backend_ch_.reset();
            return false;
        }
        std::optional<std::vector<std::byte>> reply = handler_->handle(std::move(*m));
        if (!handler_->last_error().empty()) last_backend_error_ = handler_->last_error();
        if (reply) backend_ch_->send(*reply);
        return true;
    } catch (const protocol_error& e) {
        // A stream that cannot be resynchronised: close the back-end channel.
        last_backend_error_ = e.what();
        backend_ch_.reset();
        return false;
    }
}

inline std::size_t frontend::serve_backend_requests(std::chrono::milliseconds timeout) {
    check_usable();
    std::size_t n = 0;
    while (backend_ch_ && backend_ch_->wait_readable(timeout))
        if (serve_one_backend_request()) ++n;
    return n;
}

inline void frontend::region_add(const memory_section& s) {
    if (closing_) return;
    const memory_region& mr = *s.mr;
    // QEMU's vhost filter: writable RAM (no ROM, no RAM device) that the
    // back-end can map (an fd).
    if (!mr.is_ram() || mr.is_ram_device() || s.readonly || mr.fd() < 0) return;
    std::byte* host = nullptr;
    try {
        host = mr.host_ptr();
    } catch (const region_error& e) {
        fail(e.what());
        return;
    }
    if (!host) return;
    mem_table_entry e;
    e.region = {s.offset_within_address_space, static_cast<std::uint64_t>(s.size),
                reinterpret_cast<std::uintptr_t>(host) + s.offset_within_region,
                mr.fd_offset() + s.offset_within_region};
    e.fd = mr.fd();
    e.mr = &mr;
    sections_.insert_or_assign(s.offset_within_address_space, slot{e, region_ref(*s.mr)});
    table_dirty_ = true;
}

inline void frontend::region_del(const memory_section& s) {
    if (closing_) return;
    auto it = sections_.find(s.offset_within_address_space);
    if (it == sections_.end() || it->second.entry.mr != s.mr) return;
    sections_.erase(it);
    table_dirty_ = true;
}

inline void frontend::commit() {
    if (closing_ || !table_dirty_ || !failure_.empty()) return;
    table_dirty_ = false;
    in_listener_ = true;
    try {
        sync_table();
    } catch (const std::exception& e) {
        fail(e.what()); // never into the commit: the session alone fails
    }
    in_listener_ = false;
}

inline void frontend::sync_table() {
    const auto seal = [&](int fd) {
        if (options_.seal_ram)
            (void)::fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK); // refused by non-memfds: fine
    };
    const auto in = [](const std::vector<slot>& v, const mem_table_entry& e) {
        return std::any_of(v.begin(), v.end(), [&](const slot& s) { return s.entry == e; });
    };
    std::vector<const slot*> want;
    for (const auto& [gpa, s] : sections_) want.push_back(&s);

    if (has(protocol_feature::configure_mem_slots)) {
        std::vector<mem_table_entry> removed, added;
        for (const slot& s : table_)
            if (!std::any_of(want.begin(), want.end(),
                             [&](const slot* w) { return w->entry == s.entry; }))
                removed.push_back(s.entry);
        for (const slot* w : want)
            if (!in(table_, w->entry)) added.push_back(w->entry);
        if (removed.empty() && added.empty()) return;
        if (table_.size() - removed.size() + added.size() > max_slots_)
            fail_with(protocol_reason::rejected,
                      fmt::format("the memory table would have {} entries, the back-end takes {}",
                                  table_.size() - removed.size() + added.size(), max_slots_));
        for (const mem_table_entry& e : removed) {
            send_acked(frontend_request::rem_mem_reg, [&](bool nr) {
                return encode_mem_reg(frontend_request::rem_mem_reg, e.region, nr);
            });
            std::erase_if(table_, [&](const slot& s) { return s.entry == e; });
        }
        for (const mem_table_entry& e : added) {
            seal(e.fd);
            const std::array<int, 1> fd{e.fd};
            send_acked(
                frontend_request::add_mem_reg,
                [&](bool nr) {
                    return encode_mem_reg(frontend_request::add_mem_reg, e.region, nr);
                },
                fd);
            table_.push_back(slot{e, region_ref(*const_cast<memory_region*>(e.mr))});
        }
    } else {
        if (want.size() == table_.size() &&
            std::all_of(want.begin(), want.end(),
                        [&](const slot* w) { return in(table_, w->entry); }))
            return;
        if (want.size() > max_mem_table_regions)
            fail_with(
                protocol_reason::rejected,
                fmt::format(
                    "the memory table would have {} entries; SET_MEM_TABLE carries at most {} "
                    "(the back-end did not negotiate CONFIGURE_MEM_SLOTS)",
                    want.size(), max_mem_table_regions));
        std::vector<mem_region_payload> regions;
        std::vector<int> fds;
        for (const slot* w : want) {
            seal(w->entry.fd);
            regions.push_back(w->entry.region);
            fds.push_back(w->entry.fd);
        }
        send_acked(
            frontend_request::set_mem_table, [&](bool nr) { return encode_mem_table(regions, nr); },
            fds);
        std::vector<slot> next;
        next.reserve(want.size());
        for (const slot* w : want)
            next.push_back(slot{w->entry, region_ref(*const_cast<memory_region*>(w->entry.mr))});
        table_ = std::move(next);
    }
    barrier();
}

inline std::uint64_t frontend::user_address(hwaddr gpa, std::uint64_t len, const char* what) const {
    for (const slot& s : table_) {
        const mem_region_payload& r = s.entry.region;
        if (gpa >= r.guest_phys_addr && len <= r.memory_size &&
            gpa - r.guest_phys_addr <= r.memory_size - len)
            return r.userspace_addr + (gpa - r.guest_phys_addr);
    }
    throw protocol_error(
        protocol_reason::not_shared,
        fmt::format("{} at 0x{:x} (0x{:x} bytes) is not in RAM shared with the back-end", what, gpa,
                    len));
}

inline std::vector<std::byte> frontend::get_config(std::uint32_t offset, std::uint32_t size) {
    constexpr auto r = frontend_request::get_config;
    send(r, encode_get_config(offset, size));
    const raw_message m = await_reply(r, config_header_size + size);
    const std::span<const std::byte> p = decode_reply(m.bytes, static_cast<std::uint32_t>(r));
    if (p.size() != config_header_size + size)
        throw protocol_error(
            protocol_reason::rejected,
            fmt::format("GET_CONFIG of {} bytes at {}: the back-end answered {} payload bytes",
                        size, offset, p.size()));
    return std::vector<std::byte>(p.begin() + config_header_size, p.end());
}

inline shmem_config_payload frontend::get_shmem_config() {
    constexpr auto r = frontend_request::get_shmem_config;
    send(r, encode_get_shmem_config());
    const raw_message m = await_reply(r, sizeof(shmem_config_payload));
    try {
        return decode_shmem_config_reply(m.bytes);
    } catch (const protocol_error& e) {
        fail_with(e.why(), e.what());
    }
}

inline std::size_t frontend::declare_shmem_regions() {
    QOMEM_ASSERT(dev_,
                 "declare_shmem_regions: the session was made without a device to declare them on");
    const shmem_config_payload c = get_shmem_config();
    const std::uint64_t page = qomem::detail::host_page_size();
    for (std::size_t id = 0; id < max_shmem_regions; ++id) {
        const std::uint64_t size = c.memory_sizes[id];
        if (size == 0) continue;
        if (size % page != 0)
            throw shmem_error(
                shmem_reason::bad_size,
                fmt::format("the back-end's shared memory region {} has size {:#x}, not a multiple "
                            "of the page size {:#x}; no region was declared",
                            id, size, page));
        if (dev_->shmem(static_cast<std::uint8_t>(id)))
            throw shmem_error(
                shmem_reason::duplicate_shmid,
                fmt::format(
                    "the back-end's shared memory region {} is already declared on {} '{}'; "
                    "no region was declared",
                    id, dev_->type().name, dev_->name()));
    }
    std::vector<virtio_shmem*> made;
    try {
        for (std::size_t id = 0; id < max_shmem_regions; ++id)
            if (c.memory_sizes[id] != 0)
                made.push_back(
                    &dev_->declare_shmem(static_cast<std::uint8_t>(id), c.memory_sizes[id]));
    } catch (...) {
        for (virtio_shmem* s : made) unparent(*s);
        throw;
    }
    return made.size();
}

inline void frontend::start_vring(unsigned index, const vring_layout& l) {
    check_usable();
    QOMEM_ASSERT(!queue_num_ || index < *queue_num_,
                 "virtqueue {} is beyond the back-end's {} queues", index, queue_num_.value_or(0));
    QOMEM_ASSERT(!vrings_.count(index), "virtqueue {} is already started", index);
    const std::uint64_t desc =
        user_address(l.desc, 16 * std::uint64_t(l.size), "the descriptor table");
    const std::uint64_t avail =
        user_address(l.avail, 6 + 2 * std::uint64_t(l.size), "the driver area");
    const std::uint64_t used =
        user_address(l.used, 6 + 8 * std::uint64_t(l.size), "the device area");
    vring v;
    v.size = l.size;
    v.kick.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    v.call.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (!v.kick || !v.call)
        throw protocol_error(protocol_reason::io,
                             fmt::format("eventfd failed: {}", std::strerror(errno)));
    const auto i = static_cast<std::uint32_t>(index);
    send_acked(frontend_request::set_vring_num, [&](bool nr) {
        return encode_vring_state(frontend_request::set_vring_num, {i, l.size}, nr);
    });
    send_acked(frontend_request::set_vring_base, [&](bool nr) {
        return encode_vring_state(frontend_request::set_vring_base, {i, 0}, nr);
    });
    send_acked(frontend_request::set_vring_addr, [&](bool nr) {
        return encode_vring_addr({i, 0, desc, used, avail, 0}, nr);
    });
    const std::array<int, 1> call{v.call.get()};
    send_acked(
        frontend_request::set_vring_call,
        [&](bool nr) { return encode_u64_request(frontend_request::set_vring_call, i, nr); }, call);
    const std::array<int, 1> kick{v.kick.get()};
    send_acked(
        frontend_request::set_vring_kick,
        [&](bool nr) { return encode_u64_request(frontend_request::set_vring_kick, i, nr); }, kick);
    if (allowed(frontend_request::set_vring_enable))
        send_acked(frontend_request::set_vring_enable, [&](bool nr) {
            return encode_vring_state(frontend_request::set_vring_enable, {i, 1}, nr);
        });
    barrier();
    vrings_.emplace(index, std::move(v));
}

inline std::uint32_t frontend::stop_vring(unsigned index) {
    started(index);
    constexpr auto r = frontend_request::get_vring_base;
    send(r, encode_vring_state(r, {static_cast<std::uint32_t>(index), 0}));
    const raw_message m = await_reply(r, sizeof(vring_state_payload));
    const std::span<const std::byte> p = decode_reply(m.bytes, static_cast<std::uint32_t>(r));
    if (p.size() != sizeof(vring_state_payload))
        fail_with(
            protocol_reason::bad_payload,
            fmt::format("the reply to GET_VRING_BASE has {} payload bytes, expected 8", p.size()));
    vrings_.erase(index);
    return detail::get_le<std::uint32_t>(p.data() + 4);
}

inline void frontend::kick(unsigned index) {
    const vring& v = started(index);
    const std::uint64_t one = 1;
    if (::write(v.kick.get(), &one, sizeof one) != sizeof one)
        throw protocol_error(protocol_reason::io,
                             fmt::format("kicking queue {}: {}", index, std::strerror(errno)));
}

inline bool frontend::wait_call(unsigned index, std::chrono::milliseconds timeout) {
    using clock = std::chrono::steady_clock;
    const int call = started(index).call.get();
    const auto deadline = clock::now() + timeout;
    for (;;) {
        check_usable();
        std::uint64_t count = 0;
        if (::read(call, &count, sizeof count) == sizeof count) return true;
        const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - clock::now());
        if (left.count() <= 0) return false;
        std::array<pollfd, 2> p{pollfd{call, POLLIN, 0},
                                pollfd{backend_ch_ ? backend_ch_->fd() : -1, POLLIN, 0}};
        int n;
        do n = ::poll(p.data(), p.size(), static_cast<int>(left.count()));
        while (n < 0 && errno == EINTR);
        if (n > 0 && p[1].revents) serve_one_backend_request();
    }
}

} // namespace qomem::vhost_user
