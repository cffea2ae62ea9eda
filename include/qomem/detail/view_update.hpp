// qomem/detail/view_update.hpp — the steps of one commit for one flat view:
// map the recorded change windows up to the view's root, re-render and
// splice them, diff old against new for the listeners. The loop that runs
// these steps over every address space is memory_system::render
// (memory_system.hpp).
#pragma once

#include <algorithm>
#include <cstddef>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <fmt/core.h>

#include <qomem/assert.hpp>
#include <qomem/flat_view.hpp>
#include <qomem/flatten.hpp>
#include <qomem/memory_listener.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/types.hpp>

namespace qomem::detail {

/// A part of the map that changed: [lo, hi) in the local coordinates of
/// region `in` (offsets from its origin, where its subregions are placed).
struct change_window {
    const memory_region* in;
    i128 lo;
    i128 hi;
};

/// A flat range as listeners and find() see it.
inline memory_section section_of(const flat_range& r) noexcept {
    memory_section s;
    s.mr = r.mr;
    s.offset_within_address_space = r.start;
    s.size = r.size;
    s.offset_within_region = r.offset_in_region;
    s.readonly = r.readonly;
    s.nonvolatile = r.nonvolatile;
    s.unmergeable = r.unmergeable;
    return s;
}

/// Ranges of an old and a new view, as listeners are told about them
/// (QEMU's two topology passes): `dels` for ranges gone or changed, and in
/// address order `adds` for new or changed ranges and for ranges in the same
/// place (nops), with the old and new dirty-log masks of those.
struct view_diff {
    struct entry {
        memory_section section;
        bool nop = false;
        std::uint8_t old_mask = 0; ///< nops: the mask before (log_stop / log_start)
        std::uint8_t new_mask = 0; ///< the mask now
        bool log_changed() const noexcept { return nop && old_mask != new_mask; }
    };
    std::vector<memory_section> dels;
    std::vector<entry> adds;

    template <class OldRange, class NewRange>
    void add(const OldRange& old_r, const NewRange& new_r) {
        auto o = old_r.begin(), oe = old_r.end();
        auto n = new_r.begin(), ne = new_r.end();
        while (o != oe || n != ne) {
            if (o != oe && n != ne && o->same_place(*n)) {
                adds.push_back({section_of(*n), true, o->dirty_log_mask, n->dirty_log_mask});
                ++o;
                ++n;
            } else if (o != oe && (n == ne || o->start <= n->start)) {
                dels.push_back(section_of(*o));
                ++o;
            } else {
                adds.push_back({section_of(*n), false, 0, n->dirty_log_mask});
                ++n;
            }
        }
    }
    /// True when a listener has something to hear beyond plain nops.
    bool changes() const noexcept {
        return !dels.empty() || std::any_of(adds.begin(), adds.end(), [](const entry& a) {
            return !a.nop || a.log_changed();
        });
    }
};

/// For each flat-view root, the windows of its coordinates to render again.
using window_map = std::unordered_map<const memory_region*, std::vector<std::pair<u128, u128>>>;

/// Maps a change of [lo, hi) in `x`'s coordinates to the windows it touches
/// in each flat-view root of `out`: up through containers (adding the
/// region's address) and through the aliases that show `x` (subtracting
/// their offset). False when there are too many to track (`budget` steps).
/// The window is clipped to each region it passes through, except the one
/// it was recorded in: that region may just have shrunk, and its old extent
/// must be rendered again too.
inline bool map_change_up(const memory_region* x, i128 lo, i128 hi, window_map& out,
                          std::size_t& budget, bool recorded_here = false) {
    lo = std::max<i128>(lo, 0);
    hi = std::min<i128>(hi, recorded_here ? i128(u128_2_64) : i128(x->size()));
    if (lo >= hi) return true;
    if (budget == 0) return false;
    --budget;
    if (auto it = out.find(x); it != out.end()) {
        const i128 a = std::max<i128>(lo + i128(x->addr()), 0);
        const i128 b = std::min<i128>(hi + i128(x->addr()), i128(u128_2_64));
        if (a < b) it->second.emplace_back(u128(a), u128(b));
    }
    if (const memory_region* c = x->container())
        if (!map_change_up(c, lo + i128(x->addr()), hi + i128(x->addr()), out, budget))
            return false;
    bool ok = true;
    x->for_each_alias_user([&](const memory_region& a) {
        if (ok)
            ok = map_change_up(&a, lo - i128(a.alias_offset()), hi - i128(a.alias_offset()), out,
                               budget);
    });
    return ok;
}

/// Sorts `windows` and merges those that overlap or touch.
inline std::vector<std::pair<u128, u128>>
merge_windows(std::vector<std::pair<u128, u128>> windows) {
    std::sort(windows.begin(), windows.end());
    std::vector<std::pair<u128, u128>> merged;
    for (const auto& x : windows) {
        if (!merged.empty() && x.first <= merged.back().second)
            merged.back().second = std::max(merged.back().second, x.second);
        else
            merged.push_back(x);
    }
    return merged;
}

/// `base` with `windows` (merged) of `physmr` rendered again and spliced in;
/// `diff` receives what changed, for the listeners.
inline ref_ptr<flat_view> update_view(const flat_view& base, const memory_region& physmr,
                                      const std::vector<std::pair<u128, u128>>& windows,
                                      view_diff& diff) {
    std::vector<flat_range> fresh;
    for (const auto& [lo, hi] : windows) {
        std::vector<flat_range> part = render_window(physmr, lo, hi);
        fresh.insert(fresh.end(), part.begin(), part.end());
    }
    return base.splice(windows, fresh,
                       [&](const std::vector<flat_range>& o, const std::vector<flat_range>& n) {
                           diff.add(o, n);
                       });
}

/// Asserts that `incremental` (from `base` through `windows`) equals a full
/// render of `physmr`, and that its page table names exactly its ranges:
/// the check memory_system::set_verify_incremental turns on.
inline void verify_against_full_render(const flat_view& base, const flat_view& incremental,
                                       memory_region& physmr,
                                       const std::vector<std::pair<u128, u128>>& windows) {
    const ref_ptr<flat_view> want = render_flat_view(&physmr);
    const std::string table = incremental.check_page_table();
    QOMEM_ASSERT(table.empty(),
                 "incremental view of '{}': its page table does not match its ranges: {}",
                 physmr.region_name(), table);
    if (want->ranges() == incremental.ranges()) return;
    auto dump = [](const flat_view& v) {
        std::string out;
        for (const flat_range& r : v.ranges())
            out += fmt::format("  {:016x}-{:016x} {} @{:x}{}{}{} log {:#x}\n", r.start, r.last(),
                               r.mr->region_name(), r.offset_in_region, r.readonly ? " ro" : "",
                               r.nonvolatile ? " nv" : "", r.unmergeable ? " unmergeable" : "",
                               r.dirty_log_mask);
        return out;
    };
    std::string wins;
    for (const auto& [lo, hi] : windows) wins += fmt::format(" [{}, {})", hex(lo), hex(hi));
    QOMEM_ASSERT(false,
                 "incremental view of '{}' differs from a full render\nwindows:{}\nbefore:\n{}"
                 "incremental:\n{}full:\n{}",
                 physmr.region_name(), wins, dump(base), dump(incremental), dump(*want));
}

} // namespace qomem::detail
