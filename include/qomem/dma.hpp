// qomem/dma.hpp — a DMA mapping (QEMU's address_space_map result): a host
// pointer to guest memory that holds the region it points into.
//
//     qomem::dma_mapping m = as.map(0x2000, 4096, /*is_write=*/true);
//     if (m) std::memset(m.data(), 0, m.size());      // size() may be less
//     as.unmap(m, m.size());                          // or let m go out of scope
//
// A mapping holds the region: memory_region_ref on a region with an owner (so
// an unplugged device's RAM stays valid until the DMA ends); on an ownerless
// region, a count that makes freeing the region while it is mapped a reported
// misuse. A mapping of RAM is direct (a pointer into it); anything else goes
// through a bounce buffer of the address space's budget, written back at the
// unmap. Created by address_space::map; the functions that end a mapping are
// defined in address_space.hpp.
#pragma once

#include <cstddef>
#include <utility>

#include <qomem/fwd.hpp>
#include <qomem/memory_ops.hpp>
#include <qomem/types.hpp>

namespace qomem {

/// A DMA mapping. Move-only. Release it with address_space::unmap; a mapping
/// destroyed (or assigned to) while still mapped is unmapped as if all of it
/// had been accessed.
class dma_mapping {
public:
    dma_mapping() noexcept = default;
    dma_mapping(dma_mapping&& o) noexcept { take(o); }
    /// Ends this mapping first (see the class comment), then takes `o`'s.
    /// Not noexcept: ending the old mapping may write a bounce buffer back
    /// through MMIO, which may throw.
    dma_mapping& operator=(dma_mapping&& o); // NOLINT(performance-noexcept-move-constructor)
    ~dma_mapping();

    std::byte* data() const noexcept { return ptr_; }
    /// The number of bytes mapped: may be less than asked; 0 when refused.
    hwaddr size() const noexcept { return len_; }
    explicit operator bool() const noexcept { return ptr_ != nullptr; }
    /// The region the mapping points into (held until unmapped).
    memory_region* region() const noexcept { return mr_; }
    /// True when the data goes through a bounce buffer (MMIO).
    bool bounced() const noexcept { return bounce_; }

private:
    friend class address_space;
    void take(dma_mapping& o) noexcept {
        as_ = std::exchange(o.as_, nullptr);
        ptr_ = std::exchange(o.ptr_, nullptr);
        len_ = std::exchange(o.len_, 0);
        mr_ = std::exchange(o.mr_, nullptr);
        offset_ = o.offset_;
        addr_ = o.addr_;
        attrs_ = o.attrs_;
        is_write_ = o.is_write_;
        bounce_ = o.bounce_;
    }
    /// Ends a mapping as if all of it had been accessed (written, for a write mapping).
    void end();

    address_space* as_ = nullptr; // bounce mappings only: their budget and write-back
    std::byte* ptr_ = nullptr;
    hwaddr len_ = 0;
    memory_region* mr_ = nullptr;
    hwaddr offset_ = 0; // in mr_, for dirty marking
    hwaddr addr_ = 0;   // guest address, for the bounce write-back
    mem_attrs attrs_{};
    bool is_write_ = false;
    bool bounce_ = false;
};

} // namespace qomem
