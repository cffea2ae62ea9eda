// qomem/memory_region_cache.hpp — a cached translation of one stretch of an
// address space (QEMU's MemoryRegionCache), what a virtio device keeps for
// each ring: translated once, then read and written by offset.
//
//     qomem::memory_region_cache ring;
//     if (ring.init(dma_as, desc_addr, 16 * queue_size, /*is_write=*/false) < 16 * queue_size)
//         return fail();                         // not all of it in one region
//     std::uint64_t addr;
//     ring.ldq_le(16 * i, addr);                 // offsets from desc_addr
//     used.stw_le(2, idx);                       // another cache, initialised for writing
//     ring.destroy();                            // or let it go out of scope
//
// init (QEMU's address_space_cache_init) translates [addr, addr + len) once
// and holds the region it lands in: for memory accessed directly (RAM, and
// ROM for reading) it keeps a host pointer, extended over contiguous ranges
// of that region as DMA map does; otherwise (MMIO, or a file another process
// may shrink, copied under a guard) the range, whose rules every access
// then follows. It returns how much it cached (possibly less than asked:
// the cache never spans two regions, and MMIO never two ranges); accesses
// beyond that answer memtx_decode_error. Over an IOMMU region the cache
// holds that region (up to the end of its range) and every access translates
// through it, so a mapping the IOMMU removes is never used from the cache;
// no UNMAP notification is needed. A cache is a snapshot: the region
// stays cached (and alive) after the map changes, until init or destroy —
// virtio initialises its caches again when the guest moves its rings.
//
// References: a cache holds its region as a DMA mapping does (dma.hpp):
// memory_region_ref on a region with an owner, and on an ownerless one a use
// count that makes freeing it while cached a reported misuse. destroy (and
// the destructor, and init) drop it, which may finalize the region.
//
// Threads: one thread at a time uses a cache; it needs no read section.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include <qomem/accessors.hpp>
#include <qomem/address_space.hpp>
#include <qomem/detail/dispatch.hpp>
#include <qomem/flat_view.hpp>
#include <qomem/memory_ops.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/rcu.hpp>
#include <qomem/types.hpp>

namespace qomem {

class memory_region_cache : public typed_accessors<memory_region_cache> {
public:
    memory_region_cache() noexcept = default;
    /// init() at construction.
    memory_region_cache(address_space& as, hwaddr addr, hwaddr len, bool is_write,
                        mem_attrs attrs = {})
        : memory_region_cache() {
        init(as, addr, len, is_write, attrs);
    }
    memory_region_cache(memory_region_cache&& o) noexcept { take(o); }
    memory_region_cache& operator=(memory_region_cache&& o) noexcept {
        if (this != &o) {
            destroy();
            take(o);
        }
        return *this;
    }
    ~memory_region_cache() { destroy(); }

    /// Caches [addr, addr + len) of `as` for reading (and writing, if
    /// `is_write`), dropping what the cache held before. Returns the length
    /// cached from `addr`: up to `len`, within one region (see the header);
    /// 0 when nothing is mapped at `addr`, and then every access fails.
    /// Effects: holds the region found (see the header's References).
    /// Complexity: one translation (O(1)), plus one per further range of the
    /// same region a direct cache extends over.
    hwaddr init(address_space& as, hwaddr addr, hwaddr len, bool is_write, mem_attrs attrs = {});

    /// QEMU's address_space_cache_invalidate: [offset, offset + access_len)
    /// was written through data(): marks it dirty (when the region is
    /// dirty-logged). Writes through write() and the accessors mark their own.
    void invalidate(hwaddr offset, hwaddr access_len) noexcept {
        if (direct_write_ && offset < len_)
            range_.mr->mark_dirty(range_.offset_in_region + offset,
                                  std::min(access_len, len_ - offset));
    }

    /// Drops the region (which may finalize it); the cache is then empty.
    void destroy() noexcept {
        if (range_.mr) std::exchange(range_.mr, nullptr)->dma_release();
        ptr_ = nullptr;
        len_ = 0;
        direct_read_ = direct_write_ = false;
    }

    /// The length cached (0: empty).
    hwaddr size() const noexcept { return len_; }
    /// The guest address of offset 0.
    hwaddr addr() const noexcept { return range_.start; }
    /// The region cached (held), or null.
    memory_region* region() const noexcept { return range_.mr; }
    /// The host memory of offset 0 when accesses are direct, else null.
    std::byte* data() const noexcept { return ptr_; }

    /// Reads `len` bytes at `offset` (QEMU's address_space_read_cached).
    memtx_result read(hwaddr offset, void* buf, hwaddr len) {
        return access(offset, static_cast<std::byte*>(buf), len, false, false);
    }
    /// Writes `len` bytes at `offset` (QEMU's address_space_write_cached).
    memtx_result write(hwaddr offset, const void* buf, hwaddr len) {
        return access(offset, static_cast<std::byte*>(const_cast<void*>(buf)), len, true, false);
    }

    /// One value of T at `offset`, bytes in order `Order` (accessors.hpp).
    template <class T, endianness Order = endianness::native>
    memtx_result load(hwaddr offset, T& value) {
        static_assert(std::is_unsigned_v<T> && sizeof(T) <= 8,
                      "an unsigned integer of 1 to 8 bytes");
        std::byte bytes[sizeof(T)];
        const memtx_result r = access(offset, bytes, sizeof(T), false, true);
        value = static_cast<T>(detail::load_ordered(bytes, sizeof(T), big(Order)));
        return r;
    }
    template <class T, endianness Order = endianness::native>
    memtx_result store(hwaddr offset, T value) {
        static_assert(std::is_unsigned_v<T> && sizeof(T) <= 8,
                      "an unsigned integer of 1 to 8 bytes");
        std::byte bytes[sizeof(T)];
        detail::store_ordered(bytes, sizeof(T), value, big(Order));
        return access(offset, bytes, sizeof(T), true, true);
    }

private:
    void take(memory_region_cache& o) noexcept {
        range_ = o.range_;
        ptr_ = o.ptr_;
        len_ = o.len_;
        attrs_ = o.attrs_;
        target_big_ = o.target_big_;
        direct_read_ = o.direct_read_;
        direct_write_ = o.direct_write_;
        o.range_.mr = nullptr;
        o.destroy();
    }
    bool big(endianness order) const noexcept { return detail::is_big_endian(order, target_big_); }

    memtx_result access(hwaddr offset, std::byte* buf, hwaddr len, bool is_write, bool one_access) {
        if (offset > len_ || len > len_ - offset) {
            if (!is_write) std::memset(buf, 0, static_cast<std::size_t>(len));
            return memtx_decode_error;
        }
        if (is_write ? direct_write_ : direct_read_) {
            if (is_write) {
                std::memcpy(ptr_ + offset, buf, static_cast<std::size_t>(len));
                range_.mr->mark_dirty(range_.offset_in_region + offset, len);
            } else {
                std::memcpy(buf, ptr_ + offset, static_cast<std::size_t>(len));
            }
            return memtx_ok;
        }
        // An IOMMU region: translated at each access (as QEMU's
        // address_space_translate_cached), never cached past its page tables.
        if (range_.mr->is_iommu()) [[unlikely]]
            return address_space::iommu_access(range_, range_.offset_in_region + offset, buf, len,
                                               is_write, attrs_, 0, one_access);
        // MMIO (or ROM written, a ROM device, a RAM device): the range's rules.
        return detail::access_range(range_, range_.offset_in_region + offset, buf, len, is_write,
                                    attrs_, target_big_, one_access);
    }

    flat_range range_; // the cached stretch: start = its guest address, size = len_; mr held
    std::byte* ptr_ = nullptr;
    hwaddr len_ = 0;
    mem_attrs attrs_{};
    bool target_big_ = false;
    bool direct_read_ = false;
    bool direct_write_ = false;
};

inline hwaddr memory_region_cache::init(address_space& as, hwaddr addr, hwaddr len, bool is_write,
                                        mem_attrs attrs) {
    destroy();
    if (len == 0) return 0;
    rcu::read_guard g;
    const flat_view& v = *as.current();
    const flat_range* fr = v.lookup(addr);
    if (!fr) return 0;
    memory_region& mr = *fr->mr;
    const hwaddr xlat = addr - fr->start + fr->offset_in_region;
    const bool memory_ok = !(attrs.memory && !mr.is_ram());
    const bool reads = memory_ok && fr->reads_direct();
    const bool writes = memory_ok && fr->writes_direct(attrs);
    // A file another process may shrink is never accessed through a raw
    // pointer here: access_range copies it under a SIGBUS guard.
    std::byte* host =
        (reads || writes) && !mr.backing_may_shrink() ? detail::range_host(*fr) : nullptr;
    u128 done = std::min<u128>(len, fr->end() - addr);
    if (host && (is_write ? writes : reads)) {
        // Extend across following ranges of the same region that continue it
        // with the same directness (as address_space::map does).
        while (done < len && u128(addr) + done < u128_2_64) {
            const flat_range* next = v.lookup(static_cast<hwaddr>(addr + done));
            if (!next || next->mr != &mr || next->offset_in_region != xlat + done ||
                next->reads_direct() != reads || next->writes_direct(attrs) != writes)
                break;
            done += std::min<u128>(len - done, next->end() - next->start);
        }
    }
    mr.dma_hold();
    range_ = *fr;
    range_.start = addr;
    range_.size = done;
    range_.offset_in_region = xlat;
    len_ = static_cast<hwaddr>(done);
    attrs_ = attrs;
    target_big_ = as.system().target_big_endian();
    direct_read_ = host && reads;
    direct_write_ = host && writes;
    ptr_ = host ? host + xlat : nullptr;
    return len_;
}

} // namespace qomem
