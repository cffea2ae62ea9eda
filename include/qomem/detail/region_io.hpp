// qomem/detail/region_io.hpp — a region's I/O hooks as the access paths
// read them: its ioeventfds, its coalesced ranges and its flush_coalesced
// flag, in one immutable snapshot.
//
// The writer (the memory system's writer role) replaces a region's
// snapshot as a whole and retires the old one through RCU (rcu.hpp); an
// access loads it inside a read section. A region without hooks has none
// (null): its accesses pay one atomic load.
#pragma once

#include <algorithm>
#include <atomic>
#include <vector>

#include <qomem/coalesced_mmio.hpp>
#include <qomem/detail/topology_log.hpp>
#include <qomem/ioeventfd.hpp>
#include <qomem/types.hpp>

namespace qomem::detail {

struct region_io {
    std::vector<ioeventfd> eventfds;        ///< sorted (QEMU's order)
    std::vector<coalesced_range> coalesced; ///< in the order they were added
    bool flush_coalesced = false;

    bool empty() const noexcept {
        return eventfds.empty() && coalesced.empty() && !flush_coalesced;
    }

    /// The first ioeventfd a write of `len` bytes of `value` at `offset`
    /// matches, or null.
    const ioeventfd* match(hwaddr offset, unsigned len, std::uint64_t value) const noexcept {
        for (const ioeventfd& e : eventfds)
            if (e.matches(offset, len, value)) return &e;
        return nullptr;
    }
    /// True when [offset, offset + len) lies inside one coalesced range.
    bool coalesces(hwaddr offset, unsigned len) const noexcept {
        return std::any_of(coalesced.begin(), coalesced.end(), [&](const coalesced_range& c) {
            return offset >= c.offset && u128(offset) + len <= u128(c.offset) + c.size;
        });
    }
};

/// What the access paths and the commit engine read of a region's hooks
/// (memory_region befriends it; templates, so that this header needs no
/// complete region type).
struct region_io_access {
    /// The published snapshot (null: none). Inside an RCU read section, or
    /// on the writer.
    template <class Region>
    static const region_io* snapshot(const Region& mr) noexcept {
        return mr.io_.ptr.load(std::memory_order_acquire);
    }
    /// A cheap test before entering a read section: false when the region
    /// has no hooks.
    /// The region's memory system (its log), or null. Any thread.
    template <class Region>
    static const topology_log* log(const Region& mr) noexcept {
        return mr.system_log();
    }
    template <class Region>
    static bool maybe(const Region& mr) noexcept {
        return mr.io_.ptr.load(std::memory_order_relaxed) != nullptr;
    }
};

/// The member of a region that owns its snapshot (freed with the region:
/// no reader can then be inside an access to it).
struct region_io_slot {
    std::atomic<const region_io*> ptr{nullptr};
    region_io_slot() = default;
    region_io_slot(const region_io_slot&) = delete;
    region_io_slot& operator=(const region_io_slot&) = delete;
    ~region_io_slot() { delete ptr.load(std::memory_order_relaxed); }
};

} // namespace qomem::detail
