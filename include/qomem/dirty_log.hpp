// qomem/dirty_log.hpp — dirty logging: the clients that log writes to RAM,
// the global-tracking reasons, and the snapshot a display reads.
//
//     ram->set_log(true, qomem::dirty_client::vga);          // one client
//     ...                                                     // guest writes
//     auto snap = ram->snapshot_and_clear_dirty(0, fb_size, qomem::dirty_client::vga);
//     for (hwaddr line = 0; line < fb_size; line += pitch)
//         if (snap.get_dirty(line, pitch)) redraw(line);      // QEMU's snapshot_get_dirty
//
//     sys.global_dirty_log_start(qomem::global_dirty::migration); // every RAM region
//     sys.global_dirty_log_sync();                            // listeners' log_sync
//     ram->reset_dirty(0, len, qomem::dirty_client::migration);
//
// As in QEMU, a region logs for the clients in its dirty-log mask
// (memory_region::dirty_log_mask): those turned on with set_log (a count per
// client), plus `migration` for every RAM region while its memory system
// tracks globally (memory_system::global_dirty_log_start). Each client has
// its own bitmap per region, one bit per dirty_page_size bytes of the
// region, so one client clearing its bits (a display redrawn) never hides a
// write from another (migration). The bitmaps themselves live in
// memory_region.hpp; the listener side (log_start, log_sync, ...) in
// memory_listener.hpp and memory_system.hpp; the shared-memory log a
// vhost-user back-end writes in vhost_log.hpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include <qomem/assert.hpp>
#include <qomem/types.hpp>

namespace qomem {

/// The users of dirty information (QEMU's DIRTY_MEMORY_*): the values are
/// bit indices in a dirty-log mask.
enum class dirty_client : std::uint8_t {
    vga = 0,       ///< a display's framebuffer
    code = 1,      ///< translated code to invalidate (QEMU's TCG)
    migration = 2, ///< live migration, dirty-rate measurement
};
/// How many clients there are (QEMU's DIRTY_MEMORY_NUM).
inline constexpr unsigned dirty_client_count = 3;

/// The bit of `c` in a dirty-log mask.
constexpr std::uint8_t dirty_mask_of(dirty_client c) noexcept {
    return static_cast<std::uint8_t>(1u << static_cast<unsigned>(c));
}
/// Every client (QEMU's DIRTY_CLIENTS_ALL).
inline constexpr std::uint8_t dirty_clients_all = (1u << dirty_client_count) - 1;

/// The granule of dirty tracking: one bit per this many bytes of a region
/// (QEMU's TARGET_PAGE_SIZE on most targets, and vhost-user's VHOST_LOG_PAGE).
inline constexpr hwaddr dirty_page_size = 4096;

/// Why a memory system tracks dirty memory globally (QEMU's GLOBAL_DIRTY_*
/// flags): tracking is on while any reason is.
namespace global_dirty {
inline constexpr unsigned migration = 1u << 0;   ///< live migration
inline constexpr unsigned dirty_rate = 1u << 1;  ///< measuring the dirty rate
inline constexpr unsigned dirty_limit = 1u << 2; ///< throttling dirty vCPUs
inline constexpr unsigned all = migration | dirty_rate | dirty_limit;
} // namespace global_dirty

/// A copy of part of one client's dirty bitmap, taken (and cleared in the
/// region) by memory_region::snapshot_and_clear_dirty (QEMU's
/// DirtyBitmapSnapshot). It covers [start(), end()) of the region: the
/// requested range widened to whole bitmap words (64 pages), as in QEMU, so
/// a display can ask about scanlines that are not page-aligned.
class dirty_bitmap_snapshot {
public:
    dirty_bitmap_snapshot() noexcept = default;
    dirty_bitmap_snapshot(hwaddr start, hwaddr end, std::vector<std::uint64_t> words) noexcept
        : start_(start), end_(end), words_(std::move(words)) {}

    /// The region offsets the snapshot covers.
    hwaddr start() const noexcept { return start_; }
    hwaddr end() const noexcept { return end_; }

    /// True if a page overlapping [offset, offset + size) of the region was
    /// dirty when the snapshot was taken (QEMU's snapshot_get_dirty).
    /// Requires (asserted): the range lies inside [start(), end()).
    bool get_dirty(hwaddr offset, hwaddr size) const {
        QOMEM_ASSERT(offset >= start_ && u128(offset) + size <= end_,
                     "dirty snapshot covers [{:#x}, {:#x}): cannot query [{:#x}, +{:#x})", start_,
                     end_, offset, size);
        if (size == 0) return false;
        const hwaddr first = (offset - start_) / dirty_page_size;
        const hwaddr last = (offset - start_ + size - 1) / dirty_page_size;
        for (hwaddr page = first; page <= last; ++page)
            if (words_[static_cast<std::size_t>(page / 64)] >> (page % 64) & 1) return true;
        return false;
    }
    /// How many pages were dirty.
    std::size_t dirty_pages() const noexcept {
        std::size_t n = 0;
        for (std::uint64_t w : words_) n += static_cast<std::size_t>(__builtin_popcountll(w));
        return n;
    }

private:
    hwaddr start_ = 0;
    hwaddr end_ = 0;
    std::vector<std::uint64_t> words_; // bit i: page start_/page_size + i
};

} // namespace qomem
