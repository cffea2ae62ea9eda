// qomem/flatten.hpp — QEMU's rendering rules: a region tree flattened into
// the sorted, non-overlapping ranges of a flat view.
//
//     qomem::memory_region* physmr = qomem::flat_view_root(&as.root());
//     qomem::ref_ptr<qomem::flat_view> v = qomem::render_flat_view(physmr);
//     auto part = qomem::render_window(*physmr, 0x1000, 0x2000); // [0x1000, 0x2000) only
//
// The rules (QEMU's render_memory_region; tests/conformance/README.md): a
// disabled region and its subtree render nothing; subregions render in list
// order (higher priority first, among equals the last added first), and
// earlier-rendered ranges shadow later ones; an alias renders its target at
// the alias's place (the target's own placement is ignored); a terminating
// region (RAM, ROM, ROM device, MMIO, RAM device) fills the gaps its
// subregions leave, while a container's gaps fall through; readonly,
// nonvolatile and unmergeable are inherited down the path; adjacent ranges of
// the same region with contiguous offsets and equal attributes (dirty-log
// mask included) merge, unless they are unmergeable.
//
// Every address is decided on its own by those rules, so rendering a window
// gives exactly the full render's ranges inside it: the commit engine
// (memory_system.hpp) re-renders only the windows a change touched.
#pragma once

#include <cstddef>
#include <cstdint>
#include <iterator>
#include <map>
#include <vector>

#include <qomem/flat_view.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/types.hpp>

namespace qomem {

namespace detail {

class flat_renderer {
public:
    void render(const memory_region& mr, i128 base, u128 clip_lo, u128 clip_hi, bool readonly,
                bool nonvolatile, bool unmergeable) {
        if (!mr.enabled()) return;
        base += mr.addr();
        readonly |= mr.readonly();
        nonvolatile |= mr.nonvolatile();
        unmergeable |= mr.unmergeable();
        const i128 lo = base > i128(clip_lo) ? base : i128(clip_lo);
        const i128 region_end = base + i128(mr.size());
        const i128 hi = region_end < i128(clip_hi) ? region_end : i128(clip_hi);
        if (lo >= hi) return;
        clip_lo = u128(lo);
        clip_hi = u128(hi);
        if (const memory_region* target = mr.alias()) {
            // The target appears at the alias's place: undo its own placement
            // (added back when it renders) and shift by the alias offset.
            render(*target, base - i128(target->addr()) - i128(mr.alias_offset()), clip_lo, clip_hi,
                   readonly, nonvolatile, unmergeable);
            return;
        }
        mr.for_each_subregion_in(lo - base, hi - base, [&](const memory_region& sub) {
            render(sub, base, clip_lo, clip_hi, readonly, nonvolatile, unmergeable);
        });
        if (!mr.terminates()) return;
        fill_gaps(mr, base, clip_lo, clip_hi, readonly, nonvolatile, unmergeable);
    }

    /// The ranges, sorted, with adjacent compatible ranges merged.
    std::vector<flat_range> finish() {
        std::vector<flat_range> out;
        out.reserve(ranges_.size());
        for (auto& [start, r] : ranges_) push_merged(out, r);
        ranges_.clear();
        return out;
    }

private:
    void fill_gaps(const memory_region& mr, i128 base, u128 lo, u128 hi, bool readonly,
                   bool nonvolatile, bool unmergeable) {
        u128 cursor = lo;
        // First range that ends after the cursor: the one starting at or
        // before it (if it reaches past it), else the next one.
        auto it = ranges_.upper_bound(static_cast<hwaddr>(cursor));
        if (it != ranges_.begin()) {
            auto prev = std::prev(it);
            if (prev->second.end() > cursor) it = prev;
        }
        while (cursor < hi) {
            if (it == ranges_.end() || u128(it->second.start) >= hi) {
                insert(mr, base, cursor, hi, readonly, nonvolatile, unmergeable);
                return;
            }
            const flat_range& next = it->second;
            if (u128(next.start) > cursor)
                insert(mr, base, cursor, next.start, readonly, nonvolatile, unmergeable);
            cursor = next.end();
            ++it;
        }
    }

    void insert(const memory_region& mr, i128 base, u128 from, u128 to, bool readonly,
                bool nonvolatile, bool unmergeable) {
        flat_range r;
        r.start = static_cast<hwaddr>(from);
        r.size = to - from;
        r.mr = const_cast<memory_region*>(&mr);
        r.offset_in_region = static_cast<hwaddr>(i128(from) - base);
        r.readonly = readonly;
        r.nonvolatile = nonvolatile;
        r.unmergeable = unmergeable;
        r.dirty_log_mask = mr.dirty_log_mask();
        r.romd_mode = mr.romd_mode();
        if (r.reads_direct() && !mr.backing_may_shrink()) {
            // Reserve now (MAP_NORESERVE): a read is then one addition. (Not
            // for a file that may shrink: its reads go through the guard.)
            std::byte* host = range_host(r);
            if (host)
                r.host_base = reinterpret_cast<std::uintptr_t>(host) + r.offset_in_region - r.start;
        }
        ranges_.emplace(r.start, r);
    }

    std::map<hwaddr, flat_range> ranges_;
};

} // namespace detail

/// The region an address space rooted at `root` really renders from (QEMU's
/// flat-view root): starting at `root`, while the region is enabled, step into
/// an alias that covers its whole target from offset 0, or into the only
/// enabled subregion of a container when it sits at offset 0 and fits; a
/// container with no enabled subregion, or a disabled region, gives null (the
/// shared empty view). Address spaces with the same flat-view root share one
/// flat view.
///
/// Deliberate differences from QEMU: a step is not taken out of a region that
/// is readonly, nonvolatile or unmergeable, because QEMU loses that flag when
/// it skips the node (its rendered view then shows the target writable); and a step
/// through an alias is taken only into a target placed at address 0, because
/// rendering from the target adds its address (QEMU's view is then shifted).
/// Captured machines have neither case, so the output is QEMU's there.
inline memory_region* flat_view_root(memory_region* mr) noexcept {
    while (mr && mr->enabled()) {
        if (mr->readonly() || mr->nonvolatile() || mr->unmergeable()) return mr;
        if (memory_region* target = mr->alias()) {
            // Only into a target placed at 0: rendering adds the root's own
            // address, and the alias shows the target at 0 (QEMU does not
            // check this and shifts such a view; qomem does not).
            if (mr->alias_offset() == 0 && mr->size() >= target->size() && target->addr() == 0) {
                mr = target;
                continue;
            }
            return mr;
        }
        if (mr->terminates()) return mr;
        memory_region* only = nullptr;
        unsigned enabled = 0;
        mr->any_subregion([&](memory_region& sub) {
            if (!sub.enabled()) return false;
            only = &sub;
            return ++enabled > 1; // two are enough to know
        });
        if (enabled == 0) return nullptr;
        if (enabled == 1 && only->addr() == 0 && only->size() <= mr->size()) {
            mr = only;
            continue;
        }
        return mr;
    }
    return nullptr;
}

/// Renders [lo, hi) of the flat view of `root` (rendered as given, from base
/// 0): the full render's ranges inside the window, merged.
inline std::vector<flat_range> render_window(const memory_region& root, u128 lo, u128 hi) {
    detail::flat_renderer r;
    r.render(root, 0, lo, hi, false, false, false);
    return r.finish();
}

/// Renders the flat view of `root` (not a flat-view root lookup: `root` is
/// rendered as given, from base 0 over the whole 64-bit space).
inline ref_ptr<flat_view> render_flat_view(memory_region* root) {
    std::vector<flat_range> ranges;
    if (root) ranges = render_window(*root, 0, u128_2_64);
    return ref_ptr<flat_view>(new flat_view(root, std::move(ranges)));
}

} // namespace qomem
