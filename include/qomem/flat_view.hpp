// qomem/flat_view.hpp — flattening a region tree into sorted,
// non-overlapping ranges, exactly as QEMU renders it.
//
//     qomem::ref_ptr<qomem::flat_view> v = qomem::render_flat_view(root);
//     for (const qomem::flat_range& r : v->ranges())
//         fmt::print("{:x}..{:x} -> {} @{:x}\n", r.start, r.last(),
//                    r.mr->region_name(), r.offset_in_region);
//
// The rules (QEMU's, see tests/conformance/README.md): a disabled region and
// its subtree render nothing; subregions render in list order (higher
// priority first, among equals the last added first), and earlier-rendered
// ranges shadow later ones; an alias renders its target at the alias's place
// (the target's own placement is ignored); a terminating region (RAM, ROM,
// ROM device, MMIO, RAM device) fills the gaps its subregions leave, while a
// container's gaps fall through; readonly and nonvolatile are inherited down
// the path; adjacent ranges of the same region with contiguous offsets and
// equal attributes merge.
//
// A flat view holds a reference (memory_region_ref) to its root and to the
// region of every range, so the regions it points into stay valid as long as
// the view does.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <iterator>
#include <map>
#include <vector>

#include <boost/intrusive_ptr.hpp>

#include <qomem/detail/int128.hpp>
#include <qomem/memory_region.hpp>

namespace qomem {

/// One range of a flat view: [start, start + size) of the address space is
/// `mr` from `offset_in_region` on.
struct flat_range {
    hwaddr start = 0;
    u128 size = 0; ///< never 0; start + size <= 2^64
    memory_region* mr = nullptr;
    hwaddr offset_in_region = 0;
    bool readonly = false;
    bool nonvolatile = false;
    bool romd_mode = true;

    u128 end() const noexcept { return u128(start) + size; }
    hwaddr last() const noexcept { return static_cast<hwaddr>(end() - 1); }
    bool contains(hwaddr a) const noexcept { return a >= start && u128(a) < end(); }
    bool same_attributes(const flat_range& o) const noexcept {
        return mr == o.mr && readonly == o.readonly && nonvolatile == o.nonvolatile &&
               romd_mode == o.romd_mode;
    }
    friend bool operator==(const flat_range& a, const flat_range& b) noexcept {
        return a.start == b.start && a.size == b.size && a.offset_in_region == b.offset_in_region &&
               a.same_attributes(b);
    }
};

/// An immutable rendered view, shared by every address space that reaches the
/// same flat-view root. Reference-counted (boost::intrusive_ptr).
class flat_view {
public:
    /// Takes memory_region_ref on `root` (if any) and on each range's region.
    flat_view(memory_region* root, std::vector<flat_range> ranges)
        : root_(root), ranges_(std::move(ranges)) {
        starts_.reserve(ranges_.size());
        for (const flat_range& r : ranges_) starts_.push_back(r.start);
        if (root_) memory_region_ref(*root_);
        for (const flat_range& r : ranges_) memory_region_ref(*r.mr);
    }
    ~flat_view() {
        for (const flat_range& r : ranges_) memory_region_unref(*r.mr);
        if (root_) memory_region_unref(*root_);
    }
    flat_view(const flat_view&) = delete;
    flat_view& operator=(const flat_view&) = delete;

    /// The flat-view root it was rendered from (null: the empty view).
    memory_region* root() const noexcept { return root_; }
    const std::vector<flat_range>& ranges() const noexcept { return ranges_; }

    /// The range containing `addr`, or null. O(log n) over a compact array
    /// of start addresses.
    const flat_range* lookup(hwaddr addr) const noexcept {
        const auto it = std::upper_bound(starts_.begin(), starts_.end(), addr);
        if (it == starts_.begin()) return nullptr;
        const flat_range& r = ranges_[static_cast<std::size_t>(it - starts_.begin()) - 1];
        return r.contains(addr) ? &r : nullptr;
    }

    /// lookup() with a most-recently-used entry in front (QEMU's
    /// mru_section), shared by the threads reading this view.
    const flat_range* lookup_cached(hwaddr addr) const noexcept {
        const flat_range* m = mru_.load(std::memory_order_relaxed);
        if (m && m->contains(addr)) [[likely]]
            return m;
        const flat_range* r = lookup(addr);
        if (r) mru_.store(r, std::memory_order_relaxed);
        return r;
    }

    /// The first range starting above `addr` (for skipping a hole), or null.
    const flat_range* next_after(hwaddr addr) const noexcept {
        const auto it = std::upper_bound(starts_.begin(), starts_.end(), addr);
        return it == starts_.end() ? nullptr
                                   : &ranges_[static_cast<std::size_t>(it - starts_.begin())];
    }

    /// Index of the first range whose end is above `addr` (ranges_.size() if none).
    std::size_t first_ending_after(hwaddr addr) const noexcept {
        auto it = std::upper_bound(starts_.begin(), starts_.end(), addr);
        std::size_t i = static_cast<std::size_t>(it - starts_.begin());
        if (i > 0 && ranges_[i - 1].end() > addr) --i;
        return i;
    }

    friend void intrusive_ptr_add_ref(const flat_view* v) noexcept {
        v->refs_.fetch_add(1, std::memory_order_relaxed);
    }
    friend void intrusive_ptr_release(const flat_view* v) {
        if (v->refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete v;
    }

private:
    mutable std::atomic<std::uint32_t> refs_{0};
    mutable std::atomic<const flat_range*> mru_{nullptr};
    memory_region* root_;
    std::vector<flat_range> ranges_;
    std::vector<hwaddr> starts_;
};

namespace detail {

class flat_renderer {
public:
    void render(const memory_region& mr, i128 base, u128 clip_lo, u128 clip_hi, bool readonly,
                bool nonvolatile) {
        if (!mr.enabled()) return;
        base += mr.addr();
        readonly |= mr.readonly();
        nonvolatile |= mr.nonvolatile();
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
                   readonly, nonvolatile);
            return;
        }
        mr.for_each_subregion([&](const memory_region& sub) {
            render(sub, base, clip_lo, clip_hi, readonly, nonvolatile);
        });
        if (!mr.terminates()) return;
        fill_gaps(mr, base, clip_lo, clip_hi, readonly, nonvolatile);
    }

    /// The ranges, sorted, with adjacent compatible ranges merged.
    std::vector<flat_range> finish() {
        std::vector<flat_range> out;
        out.reserve(ranges_.size());
        for (auto& [start, r] : ranges_) {
            if (!out.empty()) {
                flat_range& prev = out.back();
                if (prev.end() == u128(r.start) && prev.same_attributes(r) &&
                    u128(prev.offset_in_region) + prev.size == u128(r.offset_in_region)) {
                    prev.size += r.size;
                    continue;
                }
            }
            out.push_back(r);
        }
        return out;
    }

private:
    void fill_gaps(const memory_region& mr, i128 base, u128 lo, u128 hi, bool readonly,
                   bool nonvolatile) {
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
                insert(mr, base, cursor, hi, readonly, nonvolatile);
                return;
            }
            const flat_range& next = it->second;
            if (u128(next.start) > cursor) insert(mr, base, cursor, next.start, readonly, nonvolatile);
            cursor = next.end();
            ++it;
        }
    }

    void insert(const memory_region& mr, i128 base, u128 from, u128 to, bool readonly,
                bool nonvolatile) {
        flat_range r;
        r.start = static_cast<hwaddr>(from);
        r.size = to - from;
        r.mr = const_cast<memory_region*>(&mr);
        r.offset_in_region = static_cast<hwaddr>(i128(from) - base);
        r.readonly = readonly;
        r.nonvolatile = nonvolatile;
        r.romd_mode = mr.romd_mode();
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
/// Deliberate difference from QEMU: a step is not taken out of a region that
/// is readonly or nonvolatile, because QEMU loses that flag when it skips the
/// node (its rendered view then shows the target writable). Captured machines
/// never set those flags on such nodes, so the output is QEMU's there.
inline memory_region* flat_view_root(memory_region* mr) noexcept {
    while (mr && mr->enabled()) {
        if (mr->readonly() || mr->nonvolatile()) return mr;
        if (memory_region* target = mr->alias()) {
            if (mr->alias_offset() == 0 && mr->size() >= target->size()) {
                mr = target;
                continue;
            }
            return mr;
        }
        if (mr->terminates()) return mr;
        memory_region* only = nullptr;
        unsigned enabled = 0;
        mr->for_each_subregion([&](memory_region& sub) {
            if (!sub.enabled()) return;
            ++enabled;
            only = &sub;
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

/// Renders the flat view of `root` (not a flat-view root lookup: `root` is
/// rendered as given, from base 0 over the whole 64-bit space).
inline ref_ptr<flat_view> render_flat_view(memory_region* root) {
    std::vector<flat_range> ranges;
    if (root) {
        detail::flat_renderer r;
        r.render(*root, 0, 0, u128_2_64, false, false);
        ranges = r.finish();
    }
    return ref_ptr<flat_view>(new flat_view(root, std::move(ranges)));
}

} // namespace qomem
