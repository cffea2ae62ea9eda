// qomem/flat_view.hpp — flat views: a region tree flattened into sorted,
// non-overlapping ranges, exactly as QEMU renders it, and updated by
// splicing re-rendered windows into it instead of re-rendering it.
//
//     qomem::ref_ptr<qomem::flat_view> v = qomem::render_flat_view(root); // flatten.hpp
//     for (const qomem::flat_range& r : v->ranges())
//         fmt::print("{:x}..{:x} -> {} @{:x}\n", r.start, r.last(),
//                    r.mr->region_name(), r.offset_in_region);
//
// The rendering rules are QEMU's (detail/flatten.hpp, and
// tests/conformance/README.md). Every address is decided on its own by those rules, so rendering a window
// of the space gives exactly the full render's ranges inside it. A commit
// therefore re-renders only the windows a change touched and splices them
// into the previous view (`splice`): the ranges live in immutable chunks of
// at most 64, shared between the old and the new view, so a commit costs
// O(changed ranges + number of chunks), not O(ranges).
//
// Dispatch is O(1): each view carries a page table (detail/page_table.hpp) that
// names the range of every 4 KiB page, shared node for node with the view it
// was spliced from, so a commit rewrites only the pages around what it
// changed. `lookup` reads no shared mutable state: any number of threads read
// one view without writing to it.
//
// A flat view holds a reference (memory_region_ref) to its root and, through
// its chunks, to the region of every range, so the regions it points into
// stay valid as long as the view does.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <map>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include <boost/intrusive_ptr.hpp>
#include <boost/smart_ptr/intrusive_ref_counter.hpp>

#include <qomem/detail/page_table.hpp>
#include <qomem/memory_ops.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/types.hpp>

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
    /// Rendered through an unmergeable region: never merged with a neighbour.
    bool unmergeable = false;
    /// The region's dirty_log_mask() when rendered (QEMU's FlatRange
    /// dirty_log_mask): a change shows listeners log_start / log_stop.
    std::uint8_t dirty_log_mask = 0;
    /// For directly readable RAM whose memory is reserved: the host address
    /// of guest address 0 of this range's mapping (host + offset - start,
    /// modulo 2^64: an integer, since as a pointer it would usually point
    /// outside any object), so that a read is one addition; 0 otherwise. Not
    /// part of the range's identity (operator== ignores it).
    std::uintptr_t host_base = 0;

    /// The host address of guest address `a` (inside the range), through
    /// host_base. Requires: host_base != 0.
    std::byte* host_at(hwaddr a) const noexcept {
        // An integer on purpose: host_base is a guest-0 address that may lie
        // outside any object (see above); only the sum is a pointer.
        // NOLINTNEXTLINE(performance-no-int-to-ptr)
        return reinterpret_cast<std::byte*>(host_base + static_cast<std::uintptr_t>(a));
    }
    /// The host address of the region's offset 0 (from host_base), or null.
    std::byte* region_host() const noexcept {
        return host_base ? host_at(start - offset_in_region) : nullptr;
    }

    // The one definition of direct access: which accesses are a memcpy of
    // the region's host memory, as rendered (romd_mode and readonly are the
    // range's, not the region's current flags).

    /// Reads are a memcpy: plain RAM and ROM, and a ROM device in ROMD mode.
    bool reads_direct() const noexcept {
        return mr->is_plain_ram() || (mr->is_rom_device() && romd_mode);
    }
    /// Writes store to host memory: writable plain RAM; with attrs.debug (a
    /// loader, QEMU's write_rom) also ROM and ROMD memory, unless the host
    /// mapping itself is read-only. Other writes to plain RAM are ignored (a
    /// ROM, a read-only alias); to a ROM device they go to its ops.
    bool writes_direct(mem_attrs attrs) const noexcept {
        if (mr->is_plain_ram() && !readonly) return true;
        return attrs.debug && mr->host_writable() && reads_direct();
    }

    u128 end() const noexcept { return u128(start) + size; }
    hwaddr last() const noexcept { return start + (static_cast<hwaddr>(size) - 1); }
    /// 64-bit only: size is never 0, and its low 64 bits minus 1 are the
    /// span even for a 2^64-byte range.
    bool contains(hwaddr a) const noexcept { return a - start <= static_cast<hwaddr>(size) - 1; }
    bool same_attributes(const flat_range& o) const noexcept {
        return mr == o.mr && readonly == o.readonly && nonvolatile == o.nonvolatile &&
               romd_mode == o.romd_mode && unmergeable == o.unmergeable &&
               dirty_log_mask == o.dirty_log_mask;
    }
    /// True when `next` continues this range (QEMU's merge rule): neither is
    /// unmergeable.
    bool can_merge(const flat_range& next) const noexcept {
        return !unmergeable && end() == u128(next.start) && same_attributes(next) &&
               u128(offset_in_region) + size == u128(next.offset_in_region);
    }
    /// The same range in the same place, whatever its dirty-log mask (QEMU's
    /// flatrange_equal): listeners are told region_nop for it, and
    /// log_start / log_stop if the mask changed.
    bool same_place(const flat_range& o) const noexcept {
        return start == o.start && size == o.size && offset_in_region == o.offset_in_region &&
               mr == o.mr && readonly == o.readonly && nonvolatile == o.nonvolatile &&
               romd_mode == o.romd_mode && unmergeable == o.unmergeable;
    }
    friend bool operator==(const flat_range& a, const flat_range& b) noexcept {
        return a.same_place(b) && a.dirty_log_mask == b.dirty_log_mask;
    }
};

static_assert(alignof(flat_range) >= 16, "page-table slots tag range pointers in 4 low bits");

namespace detail {

/// The page-table slot of a range: the range, whether guest writes may
/// store to host memory without the dispatch (writable RAM that logs for no
/// dirty-log client when rendered: a logged range's writes go through the
/// dispatch, which marks them), and the host address of guest address 0 for
/// direct reads (0 for a backing that may shrink: its copies are guarded).
inline pt_entry range_slot(const flat_range& r) noexcept {
    std::uintptr_t ref = reinterpret_cast<std::uintptr_t>(&r) | pt_tag_range;
    if (r.host_base && r.writes_direct(mem_attrs{}) && r.dirty_log_mask == 0) ref |= pt_writable;
    return {ref, r.host_base};
}

struct view_access;

/// An immutable run of at most `chunk_max` ranges, shared between views.
class range_chunk : public boost::intrusive_ref_counter<range_chunk, boost::thread_safe_counter> {
public:
    static constexpr std::size_t chunk_max = 64;

    explicit range_chunk(std::vector<flat_range> ranges) : ranges_(std::move(ranges)) {
        starts_.reserve(ranges_.size());
        for (const flat_range& r : ranges_) {
            starts_.push_back(r.start);
            memory_region_ref(*r.mr);
        }
    }
    ~range_chunk() {
        for (const flat_range& r : ranges_) memory_region_unref(*r.mr);
    }
    range_chunk(const range_chunk&) = delete;
    range_chunk& operator=(const range_chunk&) = delete;

    const std::vector<flat_range>& ranges() const noexcept { return ranges_; }
    const std::vector<hwaddr>& starts() const noexcept { return starts_; }

private:
    std::vector<flat_range> ranges_;
    std::vector<hwaddr> starts_;
};

using chunk_ptr = boost::intrusive_ptr<range_chunk>;

/// The number of elements of sorted `a[0, n)` that are <= key (std::upper_bound's
/// index), without data-dependent branches: guest addresses are random
/// enough that a branchy search mispredicts at every step.
inline std::size_t upper_index(const hwaddr* a, std::size_t n, hwaddr key) noexcept {
    if (n == 0) return 0;
    const hwaddr* base = a;
    while (n > 1) {
        const std::size_t half = n / 2;
        base += static_cast<std::size_t>(base[half - 1] <= key) * half; // no branch

        n -= half;
    }
    return static_cast<std::size_t>(base - a) + static_cast<std::size_t>(*base <= key);
}

/// Splits sorted ranges into chunks.
inline void append_chunks(std::vector<chunk_ptr>& out, std::vector<flat_range>&& ranges) {
    const std::size_t n = ranges.size();
    if (n == 0) return;
    const std::size_t count = (n + range_chunk::chunk_max - 1) / range_chunk::chunk_max;
    const std::size_t per = (n + count - 1) / count;
    for (std::size_t i = 0; i < n; i += per) {
        const std::size_t e = std::min(n, i + per);
        out.emplace_back(new range_chunk(std::vector<flat_range>(
            std::make_move_iterator(ranges.begin() + static_cast<std::ptrdiff_t>(i)),
            std::make_move_iterator(ranges.begin() + static_cast<std::ptrdiff_t>(e)))));
    }
}

/// Appends `r`, merging it into the previous range when QEMU would.
inline void push_merged(std::vector<flat_range>& out, const flat_range& r) {
    if (!out.empty() && out.back().can_merge(r))
        out.back().size += r.size;
    else
        out.push_back(r);
}

/// The host address of `fr`'s region at offset 0: the cached one, else the
/// region's memory, reserved now if it was not yet (MAP_NORESERVE); null if
/// that fails (a region too large to reserve: accesses report an error).
inline std::byte* range_host(const flat_range& fr) noexcept {
    if (std::byte* h = fr.region_host()) return h;
    try {
        return fr.mr->host_ptr();
    } catch (const region_error&) {
        return nullptr;
    }
}

} // namespace detail

/// An immutable rendered view, shared by every address space that reaches the
/// same flat-view root. Reference-counted (boost::intrusive_ptr).
class flat_view : public boost::intrusive_ref_counter<flat_view, boost::thread_safe_counter> {
public:
    /// All the ranges of a view, in address order (a light view object:
    /// valid while the flat view is).
    class range_list {
    public:
        class iterator {
        public:
            using iterator_category = std::forward_iterator_tag;
            using value_type = flat_range;
            using difference_type = std::ptrdiff_t;
            using pointer = const flat_range*;
            using reference = const flat_range&;
            iterator() noexcept = default;
            iterator(const flat_view* v, std::size_t c, std::size_t i) noexcept
                : v_(v), c_(c), i_(i) {}
            reference operator*() const noexcept { return v_->chunks_[c_]->ranges()[i_]; }
            pointer operator->() const noexcept { return &**this; }
            iterator& operator++() noexcept {
                if (++i_ == v_->chunks_[c_]->ranges().size()) {
                    ++c_;
                    i_ = 0;
                }
                return *this;
            }
            iterator operator++(int) noexcept {
                iterator t = *this;
                ++*this;
                return t;
            }
            friend bool operator==(const iterator& a, const iterator& b) noexcept {
                return a.c_ == b.c_ && a.i_ == b.i_;
            }

        private:
            const flat_view* v_ = nullptr;
            std::size_t c_ = 0, i_ = 0;
        };

        explicit range_list(const flat_view& v) noexcept : v_(&v) {}
        iterator begin() const noexcept { return {v_, 0, 0}; }
        iterator end() const noexcept { return {v_, v_->chunks_.size(), 0}; }
        std::size_t size() const noexcept { return v_->size_; }
        bool empty() const noexcept { return v_->size_ == 0; }
        /// The i-th range. O(log chunks).
        const flat_range& operator[](std::size_t i) const noexcept {
            const auto it = std::upper_bound(v_->prefix_.begin(), v_->prefix_.end(), i);
            const std::size_t c = static_cast<std::size_t>(it - v_->prefix_.begin()) - 1;
            return v_->chunks_[c]->ranges()[i - v_->prefix_[c]];
        }
        const flat_range& front() const noexcept { return (*this)[0]; }
        const flat_range& back() const noexcept { return (*this)[size() - 1]; }
        friend bool operator==(const range_list& a, const range_list& b) noexcept {
            return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
        }

    private:
        const flat_view* v_;
    };

    /// A view of sorted, merged `ranges`. Takes memory_region_ref on `root`
    /// (if any) and on each range's region.
    flat_view(memory_region* root, std::vector<flat_range> ranges)
        : root_(root), root_addr_(root ? root->addr() : 0) {
        detail::append_chunks(chunks_, std::move(ranges));
        index();
        table_.rewrite(0, u128_2_64, this->ranges().begin(), this->ranges().end(),
                       detail::range_slot);
        if (root_) memory_region_ref(*root_);
    }
    ~flat_view() {
        chunks_.clear();
        if (root_) memory_region_unref(*root_);
    }
    flat_view(const flat_view&) = delete;
    flat_view& operator=(const flat_view&) = delete;

    /// The flat-view root it was rendered from (null: the empty view).
    memory_region* root() const noexcept { return root_; }
    range_list ranges() const noexcept { return range_list(*this); }
    std::size_t chunk_count() const noexcept { return chunks_.size(); }
    /// The root's address when the view was rendered (rendering adds it, so
    /// a moved root needs a full render).
    hwaddr root_addr() const noexcept { return root_addr_; }

    /// The range containing `addr`, or null. O(1): a walk of the page table
    /// (at most six levels, in practice one to three), then a search among
    /// the ranges of one page when several share it. Writes nothing.
    const flat_range* lookup(hwaddr addr) const noexcept { return table_.lookup(addr); }

    /// lookup() by a binary search of the ranges instead of the page table
    /// (O(log n)); the tests compare the two.
    const flat_range* lookup_by_search(hwaddr addr) const noexcept {
        const std::size_t c = detail::upper_index(chunk_starts_.data(), chunk_starts_.size(), addr);
        if (c == 0) return nullptr;
        const detail::range_chunk& ch = *chunks_[c - 1];
        const auto& st = ch.starts();
        const flat_range& r = ch.ranges()[detail::upper_index(st.data(), st.size(), addr) - 1];
        return r.contains(addr) ? &r : nullptr;
    }

    /// How many page-table nodes this view holds (shared ones included).
    std::size_t page_table_nodes() const noexcept { return table_.node_count(); }

    /// Checks the page table against the ranges (every slot names one of
    /// this view's ranges, exactly the ones there): "" when it is right,
    /// else the first difference. O(slots x log n): for tests.
    std::string check_page_table() const;

    /// The first range starting above `addr` (for skipping a hole), or null.
    const flat_range* next_after(hwaddr addr) const noexcept {
        const std::size_t i = upper_index(addr);
        return i == size_ ? nullptr : &ranges()[i];
    }

    /// Index of the first range whose end is above `addr` (size if none).
    std::size_t first_ending_after(hwaddr addr) const noexcept {
        std::size_t i = upper_index(addr);
        if (i > 0 && ranges()[i - 1].end() > addr) --i;
        return i;
    }

    /// A new view: this one with each window of `windows` (sorted, disjoint,
    /// [lo, hi) pairs) replaced by the matching ranges of `fresh` (sorted,
    /// merged, each inside its window), sharing every chunk the windows do
    /// not touch. For each rebuilt stretch, `on_change(old, new)` receives
    /// the old and the new ranges there (for listeners).
    template <class OnChange>
    ref_ptr<flat_view> splice(const std::vector<std::pair<u128, u128>>& windows,
                              const std::vector<flat_range>& fresh, OnChange&& on_change) const;

private:
    friend struct detail::view_access;

    /// A spliced view: `chunks`, and a page table sharing `table`'s nodes,
    /// which the caller then rewrites where the chunks changed.
    flat_view(memory_region* root, hwaddr root_addr, std::vector<detail::chunk_ptr> chunks,
              const detail::page_table<flat_range>& table)
        : root_(root), root_addr_(root_addr), chunks_(std::move(chunks)), table_(table) {
        index();
        if (root_) memory_region_ref(*root_);
    }
    /// Rewrites the page table over [lo, hi) from this view's ranges.
    void rewrite_table(u128 lo, u128 hi) {
        constexpr u128 page = detail::pt_page_size;
        lo &= ~(page - 1);
        hi = (hi + page - 1) & ~(page - 1);
        if (hi > u128_2_64) hi = u128_2_64;
        if (lo >= hi) return;
        table_.rewrite(lo, hi, iterator_at(first_ending_after(static_cast<hwaddr>(lo))),
                       ranges().end(), detail::range_slot);
    }
    range_list::iterator iterator_at(std::size_t i) const noexcept {
        if (i >= size_) return ranges().end();
        const std::size_t c = chunk_of(i);
        return range_list::iterator(this, c, i - prefix_[c]);
    }
    void index() {
        chunk_starts_.clear();
        prefix_.clear();
        size_ = 0;
        for (const auto& c : chunks_) {
            chunk_starts_.push_back(c->starts().front());
            prefix_.push_back(size_);
            size_ += c->ranges().size();
        }
    }
    /// Index of the first range starting above `addr`.
    std::size_t upper_index(hwaddr addr) const noexcept {
        const std::size_t c = detail::upper_index(chunk_starts_.data(), chunk_starts_.size(), addr);
        if (c == 0) return 0;
        const auto& st = chunks_[c - 1]->starts();
        return prefix_[c - 1] + detail::upper_index(st.data(), st.size(), addr);
    }
    std::size_t chunk_of(std::size_t i) const noexcept {
        return static_cast<std::size_t>(std::upper_bound(prefix_.begin(), prefix_.end(), i) -
                                        prefix_.begin()) -
               1;
    }

    memory_region* root_;
    hwaddr root_addr_; // the root's address when rendered: rendering adds it
    std::vector<detail::chunk_ptr> chunks_;
    std::vector<hwaddr> chunk_starts_;
    std::vector<std::size_t> prefix_; // ranges before each chunk
    std::size_t size_ = 0;
    /// Points into chunks_ only (see splice): destroyed before them.
    detail::page_table<flat_range> table_;
};

namespace detail {

/// What the access paths (address_space, cpu_tlb, region caches) read of a
/// view beyond its public interface: the page table's root slot.
struct view_access {
    static const pt_entry& table_root(const flat_view& v) noexcept { return v.table_.root(); }
};

} // namespace detail

template <class OnChange>
ref_ptr<flat_view> flat_view::splice(const std::vector<std::pair<u128, u128>>& windows,
                                     const std::vector<flat_range>& fresh,
                                     OnChange&& on_change) const {
    std::vector<detail::chunk_ptr> out;
    out.reserve(chunks_.size() + 4);
    // The stretches of the address space whose chunks are rebuilt: their
    // pages are rewritten in the new page table (every page pointing into a
    // rebuilt chunk lies in one, so the new table points only into the new
    // view's chunks).
    std::vector<std::pair<u128, u128>> rewritten;
    std::size_t next_chunk = 0; // first chunk of this view not yet copied or rebuilt
    std::size_t wi = 0, fi = 0;
    while (wi < windows.size()) {
        // Chunks touching window wi: from the one holding the first range that
        // ends at or after lo (a range ending exactly at lo may merge) to the
        // one holding the last range starting at or before hi.
        auto chunk_span = [&](u128 lo, u128 hi) {
            std::size_t first = size_, last = size_;
            if (size_ > 0) {
                std::size_t i0 = lo == 0 ? 0 : first_ending_after(static_cast<hwaddr>(lo - 1));
                if (i0 == size_) i0 = size_ - 1;
                std::size_t i1 = hi >= u128_2_64 ? size_ : upper_index(static_cast<hwaddr>(hi));
                i1 = i1 == 0 ? 0 : i1 - 1;
                first = chunk_of(std::min(i0, i1));
                last = chunk_of(std::max(i0, i1));
            }
            return std::pair{first, last};
        };
        auto [c0, c1] = chunk_span(windows[wi].first, windows[wi].second);
        std::size_t wend = wi + 1;
        // Windows whose chunks touch or overlap this stretch are rebuilt with it.
        while (wend < windows.size() && size_ > 0) {
            auto [d0, d1] = chunk_span(windows[wend].first, windows[wend].second);
            if (d0 > c1 + 1) break;
            c1 = std::max(c1, d1);
            ++wend;
        }
        if (size_ > 0) c0 = std::max(c0, next_chunk);
        for (; size_ > 0 && next_chunk < c0; ++next_chunk) out.push_back(chunks_[next_chunk]);

        std::vector<flat_range> old_span;
        if (size_ > 0)
            for (std::size_t c = c0; c <= c1; ++c)
                old_span.insert(old_span.end(), chunks_[c]->ranges().begin(),
                                chunks_[c]->ranges().end());
        // The old ranges cut to what lies outside the windows...
        std::vector<flat_range> outside;
        std::size_t w = wi;
        for (const flat_range& r : old_span) {
            while (w < wend && windows[w].second <= r.start) ++w;
            u128 pos = r.start;
            const u128 end = r.end();
            for (std::size_t k = w; pos < end;) {
                if (k < wend && windows[k].first < end) {
                    if (windows[k].first > pos) {
                        flat_range piece = r; // host_base stays valid: same mapping
                        piece.start = static_cast<hwaddr>(pos);
                        piece.size = windows[k].first - pos;
                        piece.offset_in_region =
                            static_cast<hwaddr>(r.offset_in_region + (pos - r.start));
                        outside.push_back(piece);
                    }
                    pos = std::max(pos, windows[k].second);
                    ++k;
                } else {
                    flat_range piece = r;
                    piece.start = static_cast<hwaddr>(pos);
                    piece.size = end - pos;
                    piece.offset_in_region =
                        static_cast<hwaddr>(r.offset_in_region + (pos - r.start));
                    outside.push_back(piece);
                    pos = end;
                }
            }
        }
        // ...and the fresh ranges of these windows, in address order, merged
        // where QEMU merges.
        std::vector<flat_range> new_span;
        new_span.reserve(outside.size() + 8);
        const u128 last_hi = windows[wend - 1].second;
        std::size_t oi = 0;
        while (oi < outside.size() || (fi < fresh.size() && u128(fresh[fi].start) < last_hi)) {
            const bool take_fresh = fi < fresh.size() && u128(fresh[fi].start) < last_hi &&
                                    (oi == outside.size() || fresh[fi].start < outside[oi].start);
            detail::push_merged(new_span, take_fresh ? fresh[fi++] : outside[oi++]);
        }
        on_change(old_span, new_span);
        u128 lo = windows[wi].first, hi = last_hi;
        for (const std::vector<flat_range>* span : {&old_span, &new_span})
            if (!span->empty()) {
                lo = std::min<u128>(lo, span->front().start);
                hi = std::max(hi, span->back().end());
            }
        rewritten.emplace_back(lo, hi);
        detail::append_chunks(out, std::move(new_span));
        if (size_ > 0) next_chunk = c1 + 1;
        wi = wend;
    }
    for (; next_chunk < chunks_.size(); ++next_chunk) out.push_back(chunks_[next_chunk]);
    ref_ptr<flat_view> next(new flat_view(root_, root_addr_, std::move(out), table_));
    for (const auto& [lo, hi] : rewritten) next->rewrite_table(lo, hi);
    return next;
}

inline std::string flat_view::check_page_table() const {
    std::unordered_set<const flat_range*> mine;
    for (const flat_range& r : ranges()) mine.insert(&r);
    auto overlapping = [&](u128 lo, u128 hi) {
        std::vector<const flat_range*> out;
        for (auto it = iterator_at(first_ending_after(static_cast<hwaddr>(lo)));
             it != ranges().end() && u128(it->start) < hi; ++it)
            out.push_back(&*it);
        return out;
    };
    return table_.check([&](const flat_range* r) { return mine.count(r) != 0; }, overlapping,
                        detail::range_slot);
}

} // namespace qomem
