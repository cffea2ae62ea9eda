// qomem/vhost_user/virtqueue.hpp — a split virtqueue (VIRTIO 1.x, 2.7) laid
// out in guest RAM and driven from the driver's side: what a guest driver
// does, for programs and tests that play the guest of a vhost-user back-end.
//
//     qomem::vhost_user::split_virtqueue q(guest, 0x10000, 64);   // rings at 0x10000
//     fe.start_vring(1, q.layout());                              // frontend.hpp
//     const split_virtqueue::buffer chain[] = {{req, 48, false}, {resp, 4096, true}};
//     q.add(chain);
//     fe.kick(1);
//     fe.wait_call(1, std::chrono::seconds(5));
//     if (auto used = q.take_used()) ... used->len bytes written by the device
//
// The rings live in guest memory and are read and written through the
// address space, little-endian, with the barriers the VIRTIO specification
// asks of a driver (the entries before the index that publishes them). The
// queue is used by one thread.
#pragma once

#include <atomic>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include <qomem/address_space.hpp>
#include <qomem/assert.hpp>

namespace qomem::vhost_user {

/// Where a split virtqueue's three parts are, in guest-physical addresses.
struct vring_layout {
    std::uint16_t size = 0; ///< entries: a power of two
    hwaddr desc = 0;        ///< descriptor table, 16-byte aligned
    hwaddr avail = 0;       ///< driver area, 2-byte aligned
    hwaddr used = 0;        ///< device area, 4-byte aligned
};

class split_virtqueue {
public:
    /// One buffer of a descriptor chain.
    struct buffer {
        hwaddr addr;
        std::uint32_t len;
        bool device_writable; ///< written by the device (VIRTQ_DESC_F_WRITE)
    };
    /// A chain the device has used: its head, and the bytes it wrote.
    struct used_element {
        std::uint16_t head;
        std::uint32_t len;
    };

    /// The bytes a queue of `size` entries takes from its base: the
    /// descriptor table, the driver area, and the device area aligned to 4.
    static constexpr hwaddr bytes(std::uint16_t size) noexcept {
        return used_offset(size) + 6 + 8 * hwaddr(size);
    }

    /// Lays out a queue of `size` entries at `base` of `as` and zeroes it.
    /// Requires (asserted): `size` a power of two from 1 to 32768, `base`
    /// 16-byte aligned, the whole range writable RAM of `as`.
    split_virtqueue(address_space& as, hwaddr base, std::uint16_t size)
        : as_(&as), next_(size), chain_len_(size, 0) {
        QOMEM_ASSERT(size != 0 && std::has_single_bit(size) && size <= 32768,
                     "virtqueue size {} is not a power of two from 1 to 32768", size);
        QOMEM_ASSERT(base % 16 == 0, "virtqueue base 0x{:x} is not 16-byte aligned", base);
        layout_ = {size, base, base + 16 * hwaddr(size), base + used_offset(size)};
        const std::vector<std::byte> zeros(static_cast<std::size_t>(bytes(size)));
        QOMEM_ASSERT(as.write(base, zeros.data(), zeros.size()) == memtx_ok,
                     "virtqueue at 0x{:x} (0x{:x} bytes) is not in writable RAM", base,
                     zeros.size());
        free_.reserve(size);
        for (std::uint16_t i = size; i-- > 0;) free_.push_back(i);
    }

    const vring_layout& layout() const noexcept { return layout_; }
    std::uint16_t size() const noexcept { return layout_.size; }
    std::uint16_t free_descriptors() const noexcept {
        return static_cast<std::uint16_t>(free_.size());
    }

    /// Puts `chain` in the descriptor table and makes it available to the
    /// device (the caller then kicks). Returns the chain's head.
    /// Requires (asserted): 1 to free_descriptors() buffers.
    /// Complexity: O(chain). Throws: nothing.
    std::uint16_t add(std::span<const buffer> chain) {
        QOMEM_ASSERT(!chain.empty() && chain.size() <= free_.size(),
                     "a chain of {} buffers with {} descriptors free", chain.size(), free_.size());
        std::vector<std::uint16_t> ids(chain.size());
        for (std::uint16_t& id : ids) {
            id = free_.back();
            free_.pop_back();
        }
        for (std::size_t i = 0; i < chain.size(); ++i) {
            const bool more = i + 1 < chain.size();
            const hwaddr d = layout_.desc + 16 * hwaddr(ids[i]);
            put<std::uint64_t>(d, chain[i].addr);
            put<std::uint32_t>(d + 8, chain[i].len);
            put<std::uint16_t>(
                d + 12, static_cast<std::uint16_t>((more ? desc_f_next : 0) |
                                                   (chain[i].device_writable ? desc_f_write : 0)));
            put<std::uint16_t>(d + 14, more ? ids[i + 1] : 0);
            next_[ids[i]] = more ? ids[i + 1] : 0;
        }
        const std::uint16_t head = ids.front();
        chain_len_[head] = static_cast<std::uint16_t>(chain.size());
        put<std::uint16_t>(layout_.avail + 4 + 2 * hwaddr(avail_idx_ % layout_.size), head);
        std::atomic_thread_fence(std::memory_order_release); // the entry before the index
        ++avail_idx_;
        put<std::uint16_t>(layout_.avail + 2, avail_idx_);
        std::atomic_thread_fence(std::memory_order_seq_cst); // the index before the kick
        return head;
    }

    /// The next chain the device has used, if any; its descriptors are free again.
    std::optional<used_element> take_used() {
        const auto idx = get<std::uint16_t>(layout_.used + 2);
        if (idx == last_used_) return std::nullopt;
        std::atomic_thread_fence(std::memory_order_acquire); // the index before the entry
        const hwaddr e = layout_.used + 4 + 8 * hwaddr(last_used_ % layout_.size);
        const auto id = get<std::uint32_t>(e);
        const auto len = get<std::uint32_t>(e + 4);
        QOMEM_ASSERT(id < layout_.size && chain_len_[id] != 0,
                     "the device used descriptor {}, which is not the head of an available chain",
                     id);
        ++last_used_;
        const auto head = static_cast<std::uint16_t>(id);
        std::uint16_t d = head;
        for (std::uint16_t n = chain_len_[head]; n-- > 0; d = next_[d]) free_.push_back(d);
        chain_len_[head] = 0;
        return used_element{head, len};
    }

private:
    static constexpr std::uint16_t desc_f_next = 1;
    static constexpr std::uint16_t desc_f_write = 2;

    static constexpr hwaddr used_offset(std::uint16_t size) noexcept {
        const hwaddr avail_end = 16 * hwaddr(size) + 6 + 2 * hwaddr(size);
        return (avail_end + 3) & ~hwaddr(3);
    }
    template <class T>
    void put(hwaddr addr, T v) {
        std::byte b[sizeof(T)];
        for (std::size_t i = 0; i < sizeof(T); ++i)
            b[i] = static_cast<std::byte>(std::uint64_t(v) >> (8 * i));
        QOMEM_ASSERT(as_->write(addr, b, sizeof b) == memtx_ok, "virtqueue write at 0x{:x} failed",
                     addr);
    }
    template <class T>
    T get(hwaddr addr) {
        std::byte b[sizeof(T)];
        QOMEM_ASSERT(as_->read(addr, b, sizeof b) == memtx_ok, "virtqueue read at 0x{:x} failed",
                     addr);
        std::uint64_t v = 0;
        for (std::size_t i = 0; i < sizeof(T); ++i)
            v |= std::uint64_t(std::to_integer<std::uint8_t>(b[i])) << (8 * i);
        return static_cast<T>(v);
    }

    address_space* as_;
    vring_layout layout_;
    std::vector<std::uint16_t> free_;
    std::vector<std::uint16_t> next_;      // shadow of each descriptor's next
    std::vector<std::uint16_t> chain_len_; // by head; 0 when not in flight
    std::uint16_t avail_idx_ = 0;
    std::uint16_t last_used_ = 0;
};

} // namespace qomem::vhost_user
