// qomem/vhost_user/backend_requests.hpp — the front-end's handler for
// requests a back-end sends on its channel: SHMEM_MAP / SHMEM_UNMAP applied
// to a device's shared memory regions, MEM_READ / MEM_WRITE performed through
// the device's DMA address space (the fallback for addresses the back-end
// cannot translate, such as another device's shared memory region).
//
//     vu::backend_request_handler handler(dev, dma_as);   // dev: virtio_shmem_device*
//     while (auto msg = backend_channel.receive(handler.max_payload()))
//         if (auto reply = handler.handle(std::move(*msg))) backend_channel.send(*reply);
//
// A frontend session (frontend.hpp) runs one on the channel it gives the
// back-end (SET_BACKEND_REQ_FD).
//
// Replies: with NEED_REPLY set, a u64 — 0 for success, else an errno: ENOENT
// (no region with that shmid), EBADF (a bad fd), EEXIST (overlap), ENOSPC (too
// many mappings: this region's limit or the process's), ENOMEM (mmap failed),
// EFAULT (a MEM_READ / MEM_WRITE the address space refused, including a
// mapping whose file shrank), EINVAL (anything else, and every message that
// does not decode). MEM_READ is always answered, with the data or an errno.
#pragma once

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <fmt/core.h>

#include <qomem/address_space.hpp>
#include <qomem/shmem.hpp>
#include <qomem/vhost_user/wire.hpp>

namespace qomem::vhost_user {

/// The answer to a back-end request that did not decode: a u64 EINVAL under
/// its own request id when its header asked for a reply (or it is a
/// MEM_READ, always answered), else none (also when no header can be read).
inline std::optional<std::vector<std::byte>> refusal_reply(std::span<const std::byte> bytes) {
    if (bytes.size() < header_size) return std::nullopt;
    const auto req = detail::get_le<std::uint32_t>(bytes.data());
    const auto flags = detail::get_le<std::uint32_t>(bytes.data() + 4);
    if ((flags & flag_need_reply) || req == static_cast<std::uint32_t>(backend_request::mem_read))
        return encode_u64_reply(req, EINVAL);
    return std::nullopt;
}

/// Applies a back-end's requests to a device's shared memory regions and to
/// a DMA address space.
class backend_request_handler {
public:
    /// `dev` may be null (a device without shared memory regions: SHMEM
    /// requests are answered ENOENT). `dma` must outlive the handler.
    backend_request_handler(virtio_shmem_device* dev, address_space& dma,
                            backend_channel_options options = {}) noexcept
        : dev_(dev), dma_(&dma), options_(options) {}

    const backend_channel_options& options() const noexcept { return options_; }

    /// The largest payload worth receiving.
    std::size_t max_payload() const noexcept {
        return std::max<std::size_t>(sizeof(mmap_payload),
                                     mem_access_header_size + options_.max_mem_access);
    }

    /// Decodes and applies one message; returns the reply to send, if any.
    /// A message that does not decode is answered by refusal_reply; its fds
    /// are closed either way. `last_error()` tells what went wrong.
    /// Effects: those of apply(). Throws: nothing but std::bad_alloc.
    std::optional<std::vector<std::byte>> handle(raw_message msg) {
        last_error_.clear();
        backend_message m;
        try {
            m = decode_backend_message(msg.bytes, std::move(msg.fds), options_);
        } catch (const protocol_error& e) {
            last_error_ = e.what();
            return refusal_reply(msg.bytes);
        }
        return apply(m);
    }

    /// Applies a decoded request.
    /// Effects: SHMEM_MAP / SHMEM_UNMAP as virtio_shmem_device::shmem_map /
    /// shmem_unmap (the message's fd is closed afterwards: the mapping holds
    /// the pages); MEM_WRITE as address_space::write. A refusal changes nothing.
    /// Throws: nothing but std::bad_alloc.
    std::optional<std::vector<std::byte>> apply(backend_message& m) {
        last_error_.clear();
        const std::uint32_t req = m.header.request;
        std::uint64_t status = 0;
        if (auto* map = std::get_if<shmem_map_request>(&m.body)) {
            status = guarded([&] {
                device().shmem_map(map->map.shmid, map->fd.get(), map->map.fd_offset,
                                   map->map.shm_offset, map->map.len,
                                   static_cast<shmem_flags>(map->map.flags));
            });
        } else if (auto* unmap = std::get_if<shmem_unmap_request>(&m.body)) {
            status = guarded([&] {
                device().shmem_unmap(unmap->map.shmid, unmap->map.shm_offset, unmap->map.len);
            });
        } else if (auto* rd = std::get_if<mem_read_request>(&m.body)) {
            std::vector<std::byte> data(rd->size);
            const memtx_result r = dma_->read(rd->guest_address, data.data(), data.size());
            if (r != memtx_ok) {
                last_error_ = fmt::format("MEM_READ of {} bytes at 0x{:x} failed (result {})",
                                          rd->size, rd->guest_address, static_cast<unsigned>(r));
                return encode_u64_reply(req, EFAULT);
            }
            return encode_mem_read_reply(rd->guest_address, data);
        } else if (auto* wr = std::get_if<mem_write_request>(&m.body)) {
            const memtx_result r = dma_->write(wr->guest_address, wr->data.data(), wr->data.size());
            if (r != memtx_ok) {
                last_error_ =
                    fmt::format("MEM_WRITE of {} bytes at 0x{:x} failed (result {})",
                                wr->data.size(), wr->guest_address, static_cast<unsigned>(r));
                status = EFAULT;
            }
        }
        if (m.need_reply()) return encode_u64_reply(req, status);
        return std::nullopt;
    }

    /// What the last refused message or request was refused for ("" if none).
    const std::string& last_error() const noexcept { return last_error_; }

    /// GET_SHMEM_CONFIG's answer for this device, as a back-end would give
    /// it: each region's size at its shmid, nregions the count of regions.
    shmem_config_payload shmem_config() const {
        shmem_config_payload c{};
        if (dev_)
            dev_->for_each_shmem([&](const virtio_shmem& s) {
                c.memory_sizes[s.shmid()] = s.size();
                ++c.nregions;
            });
        return c;
    }

private:
    virtio_shmem_device& device() const {
        if (!dev_)
            throw shmem_error(shmem_reason::unknown_shmid,
                              "this front-end has no shared memory regions");
        return *dev_;
    }

    template <class F>
    std::uint64_t guarded(F&& f) {
        try {
            f();
            return 0;
        } catch (const shmem_error& e) {
            last_error_ = e.what();
            switch (e.why()) {
            case shmem_reason::unknown_shmid:
                return ENOENT;
            case shmem_reason::bad_fd:
                return EBADF;
            case shmem_reason::too_many_mappings:
                return ENOSPC;
            case shmem_reason::overlap:
                return EEXIST;
            case shmem_reason::mmap_failed:
                return ENOMEM;
            default:
                return EINVAL;
            }
        } catch (const region_error& e) {
            last_error_ = e.what();
            return EINVAL;
        }
    }

    virtio_shmem_device* dev_;
    address_space* dma_;
    backend_channel_options options_;
    std::string last_error_;
};

} // namespace qomem::vhost_user
