// qomem/detail/io_update.hpp — what an address space shows of its regions'
// I/O hooks, in guest-physical terms, and the difference between two
// commits (QEMU's address_space_update_ioeventfds and the coalesced parts
// of its topology passes), for the listeners.
//
// For each range of a view whose region has hooks: each ioeventfd whose
// bytes (one byte for a size-0 one) meet the range shows at the guest
// address the range gives its offset; each coalesced range shows where it
// meets the range (one image per range it meets). An ioeventfd shown twice
// at one address (a region split in two ranges around it) counts once.
// Walks every range: the commit engine calls it only for systems that
// have used hooks (memory_system.hpp, "I/O hooks").
#pragma once

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <tuple>
#include <utility>
#include <vector>

#include <qomem/detail/region_io.hpp>
#include <qomem/detail/view_update.hpp>
#include <qomem/flat_view.hpp>
#include <qomem/memory_listener.hpp>
#include <qomem/types.hpp>

namespace qomem::detail {

/// An ioeventfd as an address space shows it: the section is the eventfd's
/// own bytes (offset_within_address_space: its guest address; size: its
/// size, 0 for any size; mr and offset_within_region: its region and offset).
struct as_ioeventfd {
    memory_section section;
    bool match_data = false;
    std::uint64_t data = 0;
    int fd = -1;

    /// QEMU's order (guest address, size, match_data, data, eventfd); the
    /// region is not part of an ioeventfd's identity, as in QEMU.
    auto key() const noexcept {
        return std::tuple(section.offset_within_address_space, section.size, match_data,
                          match_data ? data : 0, fd);
    }
};

/// A coalesced range as an address space shows it: the flat range's
/// section, and [addr, addr + len) of the address space inside it.
struct as_coalesced {
    memory_section section;
    hwaddr addr = 0;
    hwaddr len = 0;

    auto key() const noexcept {
        return std::tuple(section.offset_within_address_space, section.size,
                          reinterpret_cast<std::uintptr_t>(section.mr),
                          section.offset_within_region, section.readonly, section.nonvolatile,
                          section.unmergeable, addr, len);
    }
};

/// Everything one address space shows of the hooks.
struct io_images {
    std::vector<as_ioeventfd> eventfds;  ///< sorted by key
    std::vector<as_coalesced> coalesced; ///< sorted by key
    bool empty() const noexcept { return eventfds.empty() && coalesced.empty(); }
};

/// The images of the hooks in view `v`. Writer only (reads the regions'
/// current hooks). Complexity: O(ranges + hooks shown x log).
inline io_images io_images_of(const flat_view& v) {
    io_images out;
    for (const flat_range& r : v.ranges()) {
        const region_io* io = region_io_access::snapshot(*r.mr);
        if (!io) continue;
        const u128 r_lo = r.offset_in_region, r_hi = u128(r.offset_in_region) + r.size;
        // Guest address of region offset `o` through this range (mod 2^64).
        const auto guest = [&](u128 o) { return static_cast<hwaddr>(r.start + (o - r_lo)); };
        for (const ioeventfd& e : io->eventfds) {
            const u128 lo = e.offset, hi = u128(e.offset) + std::max(e.size, 1u);
            if (hi <= r_lo || lo >= r_hi) continue;
            as_ioeventfd a;
            a.section = section_of(r);
            a.section.offset_within_address_space = guest(lo);
            a.section.offset_within_region = e.offset;
            a.section.size = e.size;
            a.match_data = e.match_data;
            a.data = e.data;
            a.fd = e.fd;
            out.eventfds.push_back(a);
        }
        for (const coalesced_range& c : io->coalesced) {
            const u128 lo = std::max<u128>(c.offset, r_lo);
            const u128 hi = std::min<u128>(u128(c.offset) + c.size, r_hi);
            if (lo >= hi) continue;
            out.coalesced.push_back({section_of(r), guest(lo), static_cast<hwaddr>(hi - lo)});
        }
    }
    const auto by_key = [](const auto& a, const auto& b) { return a.key() < b.key(); };
    const auto same_key = [](const auto& a, const auto& b) { return a.key() == b.key(); };
    std::sort(out.eventfds.begin(), out.eventfds.end(), by_key);
    out.eventfds.erase(std::unique(out.eventfds.begin(), out.eventfds.end(), same_key),
                       out.eventfds.end());
    std::sort(out.coalesced.begin(), out.coalesced.end(), by_key);
    return out;
}

/// What listeners hear between two images.
struct io_diff {
    /// (added?, ioeventfd), in QEMU's order (a merge of the two sorted lists).
    std::vector<std::pair<bool, as_ioeventfd>> eventfds;
    std::vector<as_coalesced> coalesced_dels, coalesced_adds;
    bool empty() const noexcept {
        return eventfds.empty() && coalesced_dels.empty() && coalesced_adds.empty();
    }
};

inline io_diff diff_io(const io_images& old, const io_images& next) {
    io_diff d;
    auto o = old.eventfds.begin(), n = next.eventfds.begin();
    while (o != old.eventfds.end() || n != next.eventfds.end()) {
        if (n == next.eventfds.end() || (o != old.eventfds.end() && o->key() < n->key())) {
            d.eventfds.emplace_back(false, *o++);
        } else if (o == old.eventfds.end() || n->key() < o->key()) {
            d.eventfds.emplace_back(true, *n++);
        } else {
            ++o;
            ++n;
        }
    }
    const auto by_key = [](const as_coalesced& a, const as_coalesced& b) {
        return a.key() < b.key();
    };
    std::set_difference(old.coalesced.begin(), old.coalesced.end(), next.coalesced.begin(),
                        next.coalesced.end(), std::back_inserter(d.coalesced_dels), by_key);
    std::set_difference(next.coalesced.begin(), next.coalesced.end(), old.coalesced.begin(),
                        old.coalesced.end(), std::back_inserter(d.coalesced_adds), by_key);
    return d;
}

} // namespace qomem::detail
