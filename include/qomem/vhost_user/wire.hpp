// qomem/vhost_user/wire.hpp — the vhost-user wire format: constants, payload
// layouts, encoders, and a decoder that treats every byte from the peer as
// hostile. Needs neither an address space nor a device: a back-end written
// with qomem uses this header and channel.hpp only.
//
//     std::vector<std::byte> msg = vu::encode_shmem_map(
//         vu::make_mmap_payload(0, 0, 0x200000, 0x10000, qomem::shmem_flags::read_write), true);
//     ch.send(msg, std::array{fd});                     // channel.hpp
//     ...
//     vu::backend_message m = vu::decode_backend_message(raw.bytes, std::move(raw.fds));
//
// Every message: a 12-byte header — request (u32), flags (u32: version 0x1
// in bits 0-1, REPLY 0x4, NEED_REPLY 0x8), payload size (u32) — then the
// payload, little-endian (the byte order of every host qomem targets), with
// no padding holes. At most 8 fds per message, in SCM_RIGHTS.
//
// Checked against upstream (QEMU's docs/interop/vhost-user.rst, the SHMEM
// series as posted up to v11, rust-vmm's vhost crate), each choice made here:
//  * Message ids, header flags, REPLY_ACK (a u64, 0 = success), the memory
//    region descriptor (32 bytes), vring state (8) and address (40) payloads:
//    as upstream.
//  * SHMEM_MAP = 9, SHMEM_UNMAP = 10 (back-end requests): VhostUserMMap
//    {u8 shmid; u8 padding[7]; u64 fd_offset; u64 shm_offset; u64 len;
//    u64 flags}, 40 bytes, MAP with exactly one fd. flags: 0 read-only,
//    1 (VHOST_USER_FLAG_MAP_RW) read-write, every other bit refused (as
//    rust-vmm refuses them). Answered only with NEED_REPLY.
//  * VHOST_USER_PROTOCOL_F_SHMEM: bit 22. v11 of the series used 20, which
//    QEMU master gave to GET_VRING_BASE_INFLIGHT; rust-vmm then used 21, and
//    moved to 22 in rust-vmm/vhost#367 (2026-07: the specification gives 21
//    to GPA_ADDRESSES and 22 to SHMEM_MAP). One constant: protocol_feature::shmem.
//  * GET_SHMEM_CONFIG = 44 (front-end request): the reply VhostUserShMemConfig
//    {u32 nregions; u32 padding; u64 memory_sizes[256]}, 2,056 bytes, indexed
//    by shmid (256 = VIRTIO_MAX_SHMEM_REGIONS). As upstream's front-end, the
//    decoder counts the non-zero sizes itself and does not rely on nregions
//    (which it still refuses above 256).
//  * UNMAP frees the range once answered: a MAP of the same range may follow
//    at once (shmem.hpp: the old pages stay valid for DMA that holds them).
//  * MEM_READ = 11, MEM_WRITE = 12 (back-end requests): only in v4 of the
//    series (withdrawn in v5; its QEMU and libvhost-user payloads disagreed).
//    qomem keeps them behind a protocol feature of its own,
//    protocol_feature::qomem_mem_access (bit 63, outside the range upstream
//    allocates from), and uses this layout: {u64 guest_address; u32 size;
//    u8 data[size]} (MEM_READ without the data; a 12-byte fixed part, so the
//    data is unaligned), `size` from 1 to a limit (4096 by default). MEM_READ
//    is always answered: with the same layout carrying the data, or with a
//    u64 errno. A back-end that did not negotiate the feature gets them
//    refused as not negotiated.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include <fmt/core.h>

#include <qomem/error.hpp>
#include <qomem/shmem_flags.hpp>
#include <qomem/vhost_user/unique_fd.hpp>

namespace qomem::vhost_user {

// ---- header ---------------------------------------------------------------------

inline constexpr std::uint32_t version = 0x1;
inline constexpr std::uint32_t version_mask = 0x3;
inline constexpr std::uint32_t flag_reply = 0x4;
inline constexpr std::uint32_t flag_need_reply = 0x8;
inline constexpr std::size_t header_size = 12;
/// The most fds one message carries.
inline constexpr std::size_t max_fds = 8;

// ---- requests and features --------------------------------------------------------

/// Requests from the front-end to the back-end (the ones qomem sends).
enum class frontend_request : std::uint32_t {
    get_features = 1,
    set_features = 2,
    set_owner = 3,
    set_mem_table = 5,
    set_log_base = 6, ///< vhost_log.hpp: the dirty log shared with the back-end
    set_vring_num = 8,
    set_vring_addr = 9,
    set_vring_base = 10,
    get_vring_base = 11,
    set_vring_kick = 12,
    set_vring_call = 13,
    get_protocol_features = 15,
    set_protocol_features = 16,
    get_queue_num = 17,
    set_vring_enable = 18,
    set_backend_req_fd = 21,
    get_config = 24,
    get_max_mem_slots = 36,
    add_mem_reg = 37,
    rem_mem_reg = 38,
    get_shmem_config = 44,
};

/// The request's name in the specification, without VHOST_USER_.
constexpr std::string_view name(frontend_request r) noexcept {
    switch (r) {
    case frontend_request::get_features:
        return "GET_FEATURES";
    case frontend_request::set_features:
        return "SET_FEATURES";
    case frontend_request::set_owner:
        return "SET_OWNER";
    case frontend_request::set_mem_table:
        return "SET_MEM_TABLE";
    case frontend_request::set_log_base:
        return "SET_LOG_BASE";
    case frontend_request::set_vring_num:
        return "SET_VRING_NUM";
    case frontend_request::set_vring_addr:
        return "SET_VRING_ADDR";
    case frontend_request::set_vring_base:
        return "SET_VRING_BASE";
    case frontend_request::get_vring_base:
        return "GET_VRING_BASE";
    case frontend_request::set_vring_kick:
        return "SET_VRING_KICK";
    case frontend_request::set_vring_call:
        return "SET_VRING_CALL";
    case frontend_request::get_protocol_features:
        return "GET_PROTOCOL_FEATURES";
    case frontend_request::set_protocol_features:
        return "SET_PROTOCOL_FEATURES";
    case frontend_request::get_queue_num:
        return "GET_QUEUE_NUM";
    case frontend_request::set_vring_enable:
        return "SET_VRING_ENABLE";
    case frontend_request::set_backend_req_fd:
        return "SET_BACKEND_REQ_FD";
    case frontend_request::get_config:
        return "GET_CONFIG";
    case frontend_request::get_max_mem_slots:
        return "GET_MAX_MEM_SLOTS";
    case frontend_request::add_mem_reg:
        return "ADD_MEM_REG";
    case frontend_request::rem_mem_reg:
        return "REM_MEM_REG";
    case frontend_request::get_shmem_config:
        return "GET_SHMEM_CONFIG";
    }
    return "unknown request";
}

/// Requests from the back-end to the front-end, on the back-end channel.
enum class backend_request : std::uint32_t {
    shmem_map = 9,
    shmem_unmap = 10,
    mem_read = 11,  ///< qomem: behind protocol_feature::qomem_mem_access
    mem_write = 12, ///< qomem: behind protocol_feature::qomem_mem_access
};

/// VIRTIO feature bits the vhost-user layer itself uses.
inline constexpr unsigned virtio_f_version_1 = 32;
/// Reused reserved bit: the back-end speaks GET/SET_PROTOCOL_FEATURES.
inline constexpr unsigned vhost_user_f_protocol_features = 30;

/// Protocol feature bits (VHOST_USER_PROTOCOL_F_*).
enum class protocol_feature : unsigned {
    mq = 0,
    log_shmfd = 1,
    rarp = 2,
    reply_ack = 3,
    mtu = 4,
    backend_req = 5,
    cross_endian = 6,
    crypto_session = 7,
    pagefault = 8,
    config = 9,
    backend_send_fd = 10,
    host_notifier = 11,
    inflight_shmfd = 12,
    reset_device = 13,
    inband_notifications = 14,
    configure_mem_slots = 15,
    status = 16,
    xen_mmap = 17,
    shared_object = 18,
    device_state = 19,
    get_vring_base_inflight = 20,
    gpa_addresses = 21,
    shmem = 22,
    qomem_mem_access = 63, ///< not upstream: MEM_READ / MEM_WRITE (see the header comment)
};

/// The bit of `f` in a 64-bit protocol feature mask.
constexpr std::uint64_t mask(protocol_feature f) noexcept {
    return std::uint64_t(1) << static_cast<unsigned>(f);
}
/// The mask of several features.
constexpr std::uint64_t mask(std::initializer_list<protocol_feature> fs) noexcept {
    std::uint64_t m = 0;
    for (protocol_feature f : fs) m |= mask(f);
    return m;
}

// ---- payload layouts ------------------------------------------------------------------

struct msg_header {
    std::uint32_t request;
    std::uint32_t flags;
    std::uint32_t size;
};
static_assert(sizeof(msg_header) == 12 && std::is_trivially_copyable_v<msg_header>);

/// VhostUserMMap: the payload of SHMEM_MAP and SHMEM_UNMAP.
struct mmap_payload {
    std::uint8_t shmid;
    std::uint8_t padding[7];
    std::uint64_t fd_offset;
    std::uint64_t shm_offset;
    std::uint64_t len;
    std::uint64_t flags; ///< bit 0: read-write; other bits invalid
};
static_assert(sizeof(mmap_payload) == 40 && offsetof(mmap_payload, fd_offset) == 8 &&
                  offsetof(mmap_payload, flags) == 32 && std::is_trivially_copyable_v<mmap_payload>,
              "VhostUserMMap must have no padding holes");

/// A VhostUserMMap with zero padding.
constexpr mmap_payload make_mmap_payload(std::uint8_t shmid, std::uint64_t fd_offset,
                                         std::uint64_t shm_offset, std::uint64_t len,
                                         shmem_flags flags) noexcept {
    return mmap_payload{shmid, {}, fd_offset, shm_offset, len, static_cast<std::uint64_t>(flags)};
}

/// VIRTIO_MAX_SHMEM_REGIONS: the slots of a GET_SHMEM_CONFIG reply.
inline constexpr std::size_t max_shmem_regions = 256;

/// VhostUserShMemConfig: the reply to GET_SHMEM_CONFIG, indexed by shmid.
struct shmem_config_payload {
    std::uint32_t nregions; ///< the regions declared (non-zero sizes)
    std::uint32_t padding;
    std::uint64_t memory_sizes[max_shmem_regions]; ///< 0: no region with that shmid
    /// The regions, counted as upstream's front-end counts them.
    std::size_t count() const noexcept {
        return static_cast<std::size_t>(std::count_if(std::begin(memory_sizes),
                                                      std::end(memory_sizes),
                                                      [](std::uint64_t s) { return s != 0; }));
    }
};
static_assert(sizeof(shmem_config_payload) == 2056 &&
                  offsetof(shmem_config_payload, memory_sizes) == 8,
              "the shmem config reply must have no padding holes");

/// One memory region of the back-end's table (SET_MEM_TABLE entries, and
/// ADD_MEM_REG / REM_MEM_REG after 8 bytes of padding).
struct mem_region_payload {
    std::uint64_t guest_phys_addr;
    std::uint64_t memory_size;
    std::uint64_t userspace_addr; ///< in the front-end's address space
    std::uint64_t mmap_offset;    ///< where the region starts in its fd
    friend bool operator==(const mem_region_payload&, const mem_region_payload&) = default;
};
static_assert(sizeof(mem_region_payload) == 32);
/// SET_MEM_TABLE carries at most this many regions (one fd each).
inline constexpr std::size_t max_mem_table_regions = 8;

/// A vring state description (SET_VRING_NUM / BASE / ENABLE, GET_VRING_BASE).
struct vring_state_payload {
    std::uint32_t index;
    std::uint32_t num;
};
static_assert(sizeof(vring_state_payload) == 8);

/// A vring address description (SET_VRING_ADDR): front-end user addresses.
struct vring_addr_payload {
    std::uint32_t index;
    std::uint32_t flags;
    std::uint64_t desc;
    std::uint64_t used;
    std::uint64_t avail;
    std::uint64_t log;
};
static_assert(sizeof(vring_addr_payload) == 40 && offsetof(vring_addr_payload, desc) == 8);

/// The fixed part of a MEM_READ / MEM_WRITE payload (u64 guest_address,
/// u32 size), followed by the data in MEM_WRITE and the MEM_READ reply.
inline constexpr std::size_t mem_access_header_size = 12;

/// The fixed part of a GET_CONFIG payload (u32 offset, u32 size, u32 flags),
/// followed by `size` bytes of configuration space.
inline constexpr std::size_t config_header_size = 12;

// ---- errors ------------------------------------------------------------------------------

/// Why a message was refused by the decoder, the channel or a session.
enum class protocol_reason {
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
    not_negotiated, ///< a request the peers did not negotiate
    timeout,        ///< the peer did not answer in time
    closed,         ///< the peer closed the connection, or the session failed
    rejected,       ///< the back-end answered a request with a failure
    not_shared,     ///< a guest address outside the memory shared with the back-end
};

} // namespace qomem::vhost_user

namespace qomem {
template <>
struct reason_names<vhost_user::protocol_reason> {
    static constexpr std::string_view names[] = {
        "truncated_header", "size_mismatch", "unknown_request", "bad_version", "bad_flags",
        "missing_fd",       "extra_fds",     "oversized",       "bad_payload", "io",
        "not_negotiated",   "timeout",       "closed",          "rejected",    "not_shared"};
};
} // namespace qomem

namespace qomem::vhost_user {

/// A message refused, or a session that cannot go on; `why()` says which.
class protocol_error : public reasoned_error<protocol_reason> {
public:
    using reasoned_error::reasoned_error;
};

// ---- messages as received ------------------------------------------------------------------

/// Bytes and the fds that came with them.
struct raw_message {
    std::vector<std::byte> bytes;
    std::vector<unique_fd> fds;
};

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

/// What a back-end channel accepts: the requests its protocol features
/// allow, and the largest MEM_READ / MEM_WRITE.
struct backend_channel_options {
    std::uint64_t protocol_features =
        mask({protocol_feature::shmem, protocol_feature::qomem_mem_access});
    std::uint32_t max_mem_access = 4096;
};

// ---- little-endian fields ----------------------------------------------------------------

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
/// A message of `request` with room reserved for its payload; the size
/// field is filled in by finish().
inline std::vector<std::byte> start(std::uint32_t request, std::uint32_t flags) {
    std::vector<std::byte> out;
    put_le(out, request);
    put_le(out, flags);
    put_le(out, std::uint32_t{0});
    return out;
}
inline std::vector<std::byte> finish(std::vector<std::byte> out) {
    const auto size = static_cast<std::uint32_t>(out.size() - header_size);
    for (std::size_t i = 0; i < 4; ++i) out[8 + i] = static_cast<std::byte>(size >> (8 * i));
    return out;
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
inline void put_region(std::vector<std::byte>& out, const mem_region_payload& r) {
    put_le(out, r.guest_phys_addr);
    put_le(out, r.memory_size);
    put_le(out, r.userspace_addr);
    put_le(out, r.mmap_offset);
}
constexpr std::uint32_t flags_for(bool need_reply) noexcept {
    return version | (need_reply ? flag_need_reply : 0);
}
} // namespace detail

// ---- encoding: back-end requests and their replies --------------------------------------------

/// SHMEM_MAP (9) or SHMEM_UNMAP (10) carrying `m`.
inline std::vector<std::byte> encode_mmap(backend_request req, const mmap_payload& m,
                                          bool need_reply) {
    std::vector<std::byte> out =
        detail::start(static_cast<std::uint32_t>(req), detail::flags_for(need_reply));
    out.push_back(static_cast<std::byte>(m.shmid));
    for (std::uint8_t b : m.padding) out.push_back(static_cast<std::byte>(b));
    detail::put_le(out, m.fd_offset);
    detail::put_le(out, m.shm_offset);
    detail::put_le(out, m.len);
    detail::put_le(out, m.flags);
    return detail::finish(std::move(out));
}
inline std::vector<std::byte> encode_shmem_map(const mmap_payload& m, bool need_reply = false) {
    return encode_mmap(backend_request::shmem_map, m, need_reply);
}
inline std::vector<std::byte> encode_shmem_unmap(const mmap_payload& m, bool need_reply = false) {
    return encode_mmap(backend_request::shmem_unmap, m, need_reply);
}

/// The layout MEM_WRITE and the MEM_READ reply share: {u64 guest_address;
/// u32 size; u8 data[size]}.
inline std::vector<std::byte> encode_mem_data(backend_request req, std::uint32_t flags,
                                              std::uint64_t guest_address,
                                              std::span<const std::byte> data) {
    std::vector<std::byte> out = detail::start(static_cast<std::uint32_t>(req), flags);
    detail::put_le(out, guest_address);
    detail::put_le(out, static_cast<std::uint32_t>(data.size()));
    out.insert(out.end(), data.begin(), data.end());
    return detail::finish(std::move(out));
}
inline std::vector<std::byte> encode_mem_write(std::uint64_t guest_address,
                                               std::span<const std::byte> data,
                                               bool need_reply = false) {
    return encode_mem_data(backend_request::mem_write, detail::flags_for(need_reply), guest_address,
                           data);
}
/// The reply to MEM_READ carrying the data read.
inline std::vector<std::byte> encode_mem_read_reply(std::uint64_t guest_address,
                                                    std::span<const std::byte> data) {
    return encode_mem_data(backend_request::mem_read, version | flag_reply, guest_address, data);
}
inline std::vector<std::byte> encode_mem_read(std::uint64_t guest_address, std::uint32_t size,
                                              bool need_reply = true) {
    std::vector<std::byte> out = detail::start(
        static_cast<std::uint32_t>(backend_request::mem_read), detail::flags_for(need_reply));
    detail::put_le(out, guest_address);
    detail::put_le(out, size);
    return detail::finish(std::move(out));
}

/// A reply to request id `req` carrying a u64 (REPLY_ACK: 0 = success,
/// else an errno value; or a GET_* answer).
inline std::vector<std::byte> encode_u64_reply(std::uint32_t req, std::uint64_t value) {
    std::vector<std::byte> out = detail::start(req, version | flag_reply);
    detail::put_le(out, value);
    return detail::finish(std::move(out));
}

// ---- encoding: front-end requests and the back-end's replies ---------------------------------

/// A front-end request with no payload (GET_FEATURES, SET_OWNER, ...).
inline std::vector<std::byte> encode_request(frontend_request req, bool need_reply = false) {
    return detail::finish(
        detail::start(static_cast<std::uint32_t>(req), detail::flags_for(need_reply)));
}
/// A front-end request carrying a u64 (SET_FEATURES, SET_VRING_KICK, ...).
inline std::vector<std::byte> encode_u64_request(frontend_request req, std::uint64_t value,
                                                 bool need_reply = false) {
    std::vector<std::byte> out =
        detail::start(static_cast<std::uint32_t>(req), detail::flags_for(need_reply));
    detail::put_le(out, value);
    return detail::finish(std::move(out));
}
/// A vring state request (SET_VRING_NUM / BASE / ENABLE, GET_VRING_BASE).
inline std::vector<std::byte> encode_vring_state(frontend_request req, vring_state_payload s,
                                                 bool need_reply = false) {
    std::vector<std::byte> out =
        detail::start(static_cast<std::uint32_t>(req), detail::flags_for(need_reply));
    detail::put_le(out, s.index);
    detail::put_le(out, s.num);
    return detail::finish(std::move(out));
}
inline std::vector<std::byte> encode_vring_addr(const vring_addr_payload& a,
                                                bool need_reply = false) {
    std::vector<std::byte> out =
        detail::start(static_cast<std::uint32_t>(frontend_request::set_vring_addr),
                      detail::flags_for(need_reply));
    detail::put_le(out, a.index);
    detail::put_le(out, a.flags);
    detail::put_le(out, a.desc);
    detail::put_le(out, a.used);
    detail::put_le(out, a.avail);
    detail::put_le(out, a.log);
    return detail::finish(std::move(out));
}
/// SET_MEM_TABLE: {u32 nregions; u32 padding; region[nregions]}, one fd per
/// region attached in the same order (QEMU sends only the used entries).
inline std::vector<std::byte> encode_mem_table(std::span<const mem_region_payload> regions,
                                               bool need_reply = false) {
    std::vector<std::byte> out = detail::start(
        static_cast<std::uint32_t>(frontend_request::set_mem_table), detail::flags_for(need_reply));
    detail::put_le(out, static_cast<std::uint32_t>(regions.size()));
    detail::put_le(out, std::uint32_t{0});
    for (const mem_region_payload& r : regions) detail::put_region(out, r);
    return detail::finish(std::move(out));
}
/// ADD_MEM_REG (with the region's fd) or REM_MEM_REG (without: upstream
/// recommends none since 2022): {u64 padding; region}.
inline std::vector<std::byte> encode_mem_reg(frontend_request req, const mem_region_payload& r,
                                             bool need_reply = false) {
    std::vector<std::byte> out =
        detail::start(static_cast<std::uint32_t>(req), detail::flags_for(need_reply));
    detail::put_le(out, std::uint64_t{0});
    detail::put_region(out, r);
    return detail::finish(std::move(out));
}
/// GET_CONFIG asking for `size` bytes from `offset` of the configuration space.
inline std::vector<std::byte> encode_get_config(std::uint32_t offset, std::uint32_t size) {
    std::vector<std::byte> out =
        detail::start(static_cast<std::uint32_t>(frontend_request::get_config), version);
    detail::put_le(out, offset);
    detail::put_le(out, size);
    detail::put_le(out, std::uint32_t{0});
    out.resize(out.size() + size);
    return detail::finish(std::move(out));
}
inline std::vector<std::byte> encode_get_shmem_config() {
    return encode_request(frontend_request::get_shmem_config);
}
inline std::vector<std::byte> encode_shmem_config_reply(const shmem_config_payload& c) {
    std::vector<std::byte> out = detail::start(
        static_cast<std::uint32_t>(frontend_request::get_shmem_config), version | flag_reply);
    detail::put_le(out, c.nregions);
    detail::put_le(out, c.padding);
    for (std::uint64_t s : c.memory_sizes) detail::put_le(out, s);
    return detail::finish(std::move(out));
}

// ---- decoding ------------------------------------------------------------------------------------

/// Reads and checks a header (version, known flag bits, size against the
/// bytes). Throws: protocol_error.
inline msg_header decode_header(std::span<const std::byte> bytes) {
    using reason = protocol_reason;
    if (bytes.size() < header_size)
        throw protocol_error(
            reason::truncated_header,
            fmt::format("truncated header: {} bytes, need {}", bytes.size(), header_size));
    msg_header h{detail::get_le<std::uint32_t>(bytes.data()),
                 detail::get_le<std::uint32_t>(bytes.data() + 4),
                 detail::get_le<std::uint32_t>(bytes.data() + 8)};
    if ((h.flags & version_mask) != version)
        throw protocol_error(reason::bad_version,
                             fmt::format("request {}: version {} in flags 0x{:x}, expected {}",
                                         h.request, h.flags & version_mask, h.flags, version));
    if (h.flags & ~(version_mask | flag_reply | flag_need_reply))
        throw protocol_error(
            reason::bad_flags,
            fmt::format("request {}: unknown bits in flags 0x{:x}", h.request, h.flags));
    if (h.size != bytes.size() - header_size)
        throw protocol_error(reason::size_mismatch,
                             fmt::format("request {}: header says {} payload bytes, {} received",
                                         h.request, h.size, bytes.size() - header_size));
    return h;
}

/// Decodes a back-end request, taking ownership of `fds` (closed if the
/// message is refused, and any the message does not use). Requests whose
/// protocol feature `o` does not list are refused (not_negotiated).
/// Throws: protocol_error naming the values.
inline backend_message decode_backend_message(std::span<const std::byte> bytes,
                                              std::vector<unique_fd> fds,
                                              const backend_channel_options& o = {}) {
    using reason = protocol_reason;
    const msg_header h = decode_header(bytes);
    const std::byte* p = bytes.data() + header_size;
    if (h.flags & flag_reply)
        throw protocol_error(
            reason::bad_flags,
            fmt::format("request {}: the reply flag is set on a request (flags 0x{:x})", h.request,
                        h.flags));
    auto expect_fds = [&](std::size_t n) {
        if (fds.size() < n)
            throw protocol_error(
                reason::missing_fd,
                fmt::format("request {}: {} fd(s) attached, need {}", h.request, fds.size(), n));
        if (fds.size() > n)
            throw protocol_error(reason::extra_fds,
                                 fmt::format("request {}: {} fd(s) attached, need {} (all closed)",
                                             h.request, fds.size(), n));
    };
    auto expect_size = [&](std::size_t n) {
        if (h.size != n)
            throw protocol_error(
                reason::bad_payload,
                fmt::format("request {}: payload of {} bytes, expected {}", h.request, h.size, n));
    };
    auto expect_feature = [&](protocol_feature f, std::string_view what) {
        if (!(o.protocol_features & mask(f)))
            throw protocol_error(
                reason::not_negotiated,
                fmt::format("request {} ({}) without its protocol feature (bit {}) negotiated",
                            h.request, what, static_cast<unsigned>(f)));
    };
    auto mem_size = [&](std::string_view what) {
        const auto size = detail::get_le<std::uint32_t>(p + 8);
        if (size == 0 || size > o.max_mem_access)
            throw protocol_error(reason::oversized, fmt::format("{} of {} bytes (allowed 1 to {})",
                                                                what, size, o.max_mem_access));
        return size;
    };
    backend_message m{h, shmem_unmap_request{}};
    switch (static_cast<backend_request>(h.request)) {
    case backend_request::shmem_map:
        expect_feature(protocol_feature::shmem, "SHMEM_MAP");
        expect_size(sizeof(mmap_payload));
        expect_fds(1);
        m.body = shmem_map_request{detail::get_mmap(p), std::move(fds.front())};
        break;
    case backend_request::shmem_unmap:
        expect_feature(protocol_feature::shmem, "SHMEM_UNMAP");
        expect_size(sizeof(mmap_payload));
        expect_fds(0);
        m.body = shmem_unmap_request{detail::get_mmap(p)};
        break;
    case backend_request::mem_read: {
        expect_feature(protocol_feature::qomem_mem_access, "MEM_READ");
        expect_size(mem_access_header_size);
        expect_fds(0);
        const std::uint32_t size = mem_size("MEM_READ");
        m.body = mem_read_request{detail::get_le<std::uint64_t>(p), size};
        break;
    }
    case backend_request::mem_write: {
        expect_feature(protocol_feature::qomem_mem_access, "MEM_WRITE");
        if (h.size < mem_access_header_size)
            throw protocol_error(reason::bad_payload,
                                 fmt::format("MEM_WRITE payload of {} bytes, need at least {}",
                                             h.size, mem_access_header_size));
        expect_fds(0);
        const std::uint32_t size = mem_size("MEM_WRITE");
        expect_size(mem_access_header_size + size);
        m.body = mem_write_request{
            detail::get_le<std::uint64_t>(p),
            std::vector<std::byte>(p + mem_access_header_size, p + mem_access_header_size + size)};
        break;
    }
    default:
        throw protocol_error(
            reason::unknown_request,
            fmt::format("unknown back-end request {} (flags 0x{:x}, {} payload bytes)", h.request,
                        h.flags, h.size));
    }
    return m;
}

/// Checks that `bytes` is the back-end's reply to `req` and returns its
/// payload. Throws: protocol_error (a malformed header, not a reply, a reply
/// to another request).
inline std::span<const std::byte> decode_reply(std::span<const std::byte> bytes,
                                               std::uint32_t req) {
    const msg_header h = decode_header(bytes);
    if (!(h.flags & flag_reply) || h.request != req)
        throw protocol_error(
            protocol_reason::bad_payload,
            fmt::format("expected the reply to request {}, got request {} with flags 0x{:x}", req,
                        h.request, h.flags));
    return bytes.subspan(header_size);
}

/// The u64 of a reply to `req`. Throws: protocol_error.
inline std::uint64_t decode_u64_reply(std::span<const std::byte> bytes, std::uint32_t req) {
    const std::span<const std::byte> p = decode_reply(bytes, req);
    if (p.size() != 8)
        throw protocol_error(
            protocol_reason::bad_payload,
            fmt::format("reply to request {}: {} payload bytes, expected a u64", req, p.size()));
    return detail::get_le<std::uint64_t>(p.data());
}

/// Decodes the back-end's reply to GET_SHMEM_CONFIG (2,056 bytes).
/// Throws: protocol_error.
inline shmem_config_payload decode_shmem_config_reply(std::span<const std::byte> bytes) {
    constexpr auto req = static_cast<std::uint32_t>(frontend_request::get_shmem_config);
    const std::span<const std::byte> p = decode_reply(bytes, req);
    if (p.size() != sizeof(shmem_config_payload))
        throw protocol_error(protocol_reason::bad_payload,
                             fmt::format("GET_SHMEM_CONFIG reply of {} bytes, expected {}",
                                         p.size(), sizeof(shmem_config_payload)));
    shmem_config_payload c{};
    c.nregions = detail::get_le<std::uint32_t>(p.data());
    c.padding = detail::get_le<std::uint32_t>(p.data() + 4);
    for (std::size_t i = 0; i < max_shmem_regions; ++i)
        c.memory_sizes[i] = detail::get_le<std::uint64_t>(p.data() + 8 + 8 * i);
    if (c.nregions > max_shmem_regions)
        throw protocol_error(protocol_reason::bad_payload,
                             fmt::format("GET_SHMEM_CONFIG reply with {} regions (at most {})",
                                         c.nregions, max_shmem_regions));
    return c;
}

} // namespace qomem::vhost_user
