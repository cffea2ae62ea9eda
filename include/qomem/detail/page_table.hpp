// qomem/detail/page_table.hpp — the O(1) dispatch index of a flat view: a
// persistent radix tree over 4 KiB pages, with skipped levels, whose leaves
// name the flat range of each page.
//
//     detail::page_table<flat_range> t;                  // all holes
//     t.rewrite(0, u128_2_64, ranges.begin(), ranges.end(), entry_of);
//     const flat_range* r = t.lookup(addr);              // a few dependent loads
//     detail::page_table<flat_range> next(t);            // shares every node
//     next.rewrite(lo, hi, ...);                         // copies only the paths it changes
//
// The shape is QEMU's PhysPageMap: 9 bits per level (512 slots of 16 bytes),
// levels at address bits 12, 21, 30, 39, 48 and 57, and a slot that names one
// range for its whole span (a 1 GiB RAM range is one slot of the level-30
// node). What differs:
//
//  * Skipped levels are kept, not compacted after the fact: a slot may point
//    to a node several levels down, and the slot records the span that node
//    covers (its base address and its shift, packed in one word), so a lookup
//    of an address outside it answers "hole" without looking further.
//  * The tree is persistent. Nodes are immutable once a view is published and
//    reference-counted; a new view starts from its predecessor's root and
//    copies only the nodes on the paths it rewrites (copy-on-write), so the
//    commit that changes one window changes one path or a few.
//  * A page shared by several ranges (or by a range and a hole) points to a
//    subpage: the ranges overlapping it, searched by address (QEMU's
//    subpage_t). Every address still dispatches to exactly the range the
//    view has there.
//  * A slot also carries what a fast access needs without reading the range:
//    the host address of guest address 0 for memory read directly (0
//    otherwise), and a bit saying that guest writes store to host memory.
//
// Ranges are owned by the view (its chunks); the table only points into
// them. The owner keeps the invariant that every range a table points to is
// one of its view's own ranges (flat_view::splice rewrites every page that
// points into a chunk it rebuilt), which `check` verifies.
//
// Threads: a table is edited only before it is published, by the writer.
// Published tables are read by any thread inside an RCU read section, and
// released (their nodes' references dropped) on whatever thread frees the
// view; the counts are atomic for that.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <string>
#include <vector>

#include <fmt/core.h>

#include <qomem/types.hpp>

namespace qomem::detail {

inline constexpr unsigned pt_page_bits = 12;
inline constexpr hwaddr pt_page_size = hwaddr(1) << pt_page_bits;
inline constexpr unsigned pt_level_bits = 9;
inline constexpr std::size_t pt_fanout = std::size_t(1) << pt_level_bits;
/// The shift of the top level: the largest 12 + 9k below 64.
inline constexpr unsigned pt_top_shift =
    pt_page_bits + (63 - pt_page_bits) / pt_level_bits * pt_level_bits;
/// The span (log2 bytes) of the root slot: the top node's, past 2^64.
inline constexpr unsigned pt_root_span = pt_top_shift + pt_level_bits;

// A slot's `ref` word: a pointer with a tag in its low bits (ranges are
// 16-byte aligned: they hold 128-bit sizes). 0 is a hole.
inline constexpr std::uintptr_t pt_tag_mask = 3;
inline constexpr std::uintptr_t pt_tag_range = 0;
inline constexpr std::uintptr_t pt_tag_node = 1;
inline constexpr std::uintptr_t pt_tag_subpage = 2;
/// On a range slot: guest writes (without attributes) store to host memory.
inline constexpr std::uintptr_t pt_writable = 4;
inline constexpr std::uintptr_t pt_pointer_mask = ~std::uintptr_t(15);

/// One slot. For a range: `aux` is the host address of guest address 0 of
/// the range's mapping when the range is read directly (0 otherwise). For a
/// node: `aux` is the base address of the span the node covers, with the
/// node's shift in its low 6 bits. For a subpage or a hole: 0.
struct alignas(16) pt_entry {
    std::uintptr_t ref = 0;
    std::uintptr_t aux = 0;

    bool is_hole() const noexcept { return ref == 0; }
    bool is_node() const noexcept { return (ref & pt_tag_mask) == pt_tag_node; }
    bool is_subpage() const noexcept { return (ref & pt_tag_mask) == pt_tag_subpage; }
    bool is_range() const noexcept { return ref != 0 && (ref & pt_tag_mask) == pt_tag_range; }
    friend bool operator==(const pt_entry&, const pt_entry&) = default;
};

/// 512 slots under one node; `used` counts those that are not holes, `kids`
/// those that are counted pointers (nodes and subpages): a node without kids
/// is copied with one memcpy and freed without a walk of its slots.
struct pt_node {
    std::atomic<std::uint32_t> refs{1};
    std::uint16_t used = 0;
    std::uint16_t kids = 0;
    std::uint8_t shift = 0;
    pt_entry slot[pt_fanout];
};

/// 1 if the slot holds a counted pointer (a node or a subpage), else 0.
inline unsigned pt_counted(const pt_entry& e) noexcept {
    return (e.ref & pt_tag_mask) == pt_tag_node || (e.ref & pt_tag_mask) == pt_tag_subpage ? 1 : 0;
}

/// The ranges overlapping one page, sorted: `starts` for the search.
template <class Range>
struct pt_subpage {
    std::atomic<std::uint32_t> refs{1};
    std::vector<hwaddr> starts;
    std::vector<const Range*> ranges;

    const Range* find(hwaddr addr) const noexcept {
        // Few ranges share a page: a linear scan from the back.
        for (std::size_t i = starts.size(); i-- > 0;)
            if (starts[i] <= addr) return ranges[i]->contains(addr) ? ranges[i] : nullptr;
        return nullptr;
    }
};

/// The walk from `root` to the slot holding `addr`: a range, a subpage or a
/// hole (never a node). The hot path of every access.
[[gnu::always_inline]] inline pt_entry pt_find(const pt_entry& root, hwaddr addr) noexcept {
    pt_entry e = root;
    while ((e.ref & pt_tag_mask) == pt_tag_node) {
        const auto shift = static_cast<unsigned>(e.aux & 63);
        // Outside the span of a node reached over skipped levels (the bits
        // above it differ from its base's): a hole. The base's low bits
        // (the shift) go in the shift. Two shifts: shift + 9 is 66 at the top.
        if (((addr ^ e.aux) >> shift) >> pt_level_bits) return {};
        e = reinterpret_cast<const pt_node*>(e.ref - pt_tag_node)
                ->slot[(addr >> shift) & (pt_fanout - 1)];
    }
    return e;
}

/// The range of a slot found for `addr` (null for a hole).
template <class Range>
inline const Range* pt_resolve(pt_entry e, hwaddr addr) noexcept {
    if ((e.ref & pt_tag_mask) == pt_tag_subpage)
        return reinterpret_cast<const pt_subpage<Range>*>(e.ref & pt_pointer_mask)->find(addr);
    return reinterpret_cast<const Range*>(e.ref & pt_pointer_mask);
}

/// A persistent page table over ranges of type Range (flat_range): `start`,
/// `end()`, `contains(addr)`.
template <class Range>
class page_table {
public:
    page_table() noexcept = default;
    /// A table sharing every node of `o` (one reference on its root).
    page_table(const page_table& o) noexcept : root_(o.root_) { retain(root_); }
    page_table& operator=(const page_table&) = delete;
    ~page_table() { release(root_); }

    pt_entry find(hwaddr addr) const noexcept { return pt_find(root_, addr); }
    const Range* lookup(hwaddr addr) const noexcept { return pt_resolve<Range>(find(addr), addr); }
    const pt_entry& root() const noexcept { return root_; }

    /// Makes the pages of [lo, hi) show the ranges of [first, last) (sorted,
    /// non-overlapping; at least every one overlapping those pages, others
    /// are skipped): a page inside one range gets that range, a page no
    /// range touches a hole, any other page a subpage. `slot_of(range)`
    /// gives a range's slot. Nodes shared with other tables are copied
    /// before they change. Requires: lo and hi page-aligned, hi <= 2^64.
    /// Complexity: O(pages not covered by aligned runs + levels x 512 per
    /// run), in practice a few slots per range.
    template <class It, class SlotOf>
    void rewrite(u128 lo, u128 hi, It first, It last, SlotOf&& slot_of) {
        if (lo < hi) fill(root_, 0, pt_root_span, lo, hi, first, last, slot_of);
    }

    /// Checks the table against the view's ranges: every slot's range is
    /// one of the view's (`is_member(const Range*)`), a range slot lies
    /// inside its range and carries `slot_of(range)`, a hole overlaps no
    /// range (`first_overlapping(lo, hi)` returns the index-ordered ranges
    /// overlapping [lo, hi), as a vector of pointers), a subpage lists
    /// exactly the ranges overlapping its page, node spans nest and their
    /// counts are right. Returns the first difference, or "".
    template <class IsMember, class Overlapping, class SlotOf>
    std::string check(IsMember&& is_member, Overlapping&& overlapping, SlotOf&& slot_of) const {
        std::string err;
        check_slot(root_, 0, pt_root_span, is_member, overlapping, slot_of, err);
        return err;
    }

    /// How many nodes this table holds (tests and statistics).
    std::size_t node_count() const noexcept { return count_nodes(root_); }

private:
    static pt_node* node_of(const pt_entry& e) noexcept {
        return reinterpret_cast<pt_node*>(e.ref - pt_tag_node);
    }
    static pt_subpage<Range>* subpage_of(const pt_entry& e) noexcept {
        return reinterpret_cast<pt_subpage<Range>*>(e.ref & pt_pointer_mask);
    }
    static void retain(const pt_entry& e) noexcept {
        if (e.is_node())
            node_of(e)->refs.fetch_add(1, std::memory_order_relaxed);
        else if (e.is_subpage())
            subpage_of(e)->refs.fetch_add(1, std::memory_order_relaxed);
    }
    static void release(const pt_entry& e) noexcept {
        if (e.is_node()) {
            pt_node* n = node_of(e);
            if (n->refs.fetch_sub(1, std::memory_order_acq_rel) == 1) {
                // Only the counted slots, and only until the last of them.
                for (std::size_t i = 0, left = n->kids; left != 0 && i < pt_fanout; ++i)
                    if (pt_counted(n->slot[i]) != 0) {
                        release(n->slot[i]);
                        --left;
                    }
                delete n;
            }
        } else if (e.is_subpage()) {
            pt_subpage<Range>* s = subpage_of(e);
            if (s->refs.fetch_sub(1, std::memory_order_acq_rel) == 1) delete s;
        }
    }
    static pt_entry node_entry(pt_node* n, u128 base) noexcept {
        return {reinterpret_cast<std::uintptr_t>(n) | pt_tag_node,
                static_cast<std::uintptr_t>(base) | n->shift};
    }
    static u128 node_base(const pt_entry& e) noexcept { return e.aux & ~std::uintptr_t(63); }
    static unsigned node_shift(const pt_entry& e) noexcept {
        return static_cast<unsigned>(e.aux & 63);
    }
    static u128 span_end(u128 base, unsigned span) noexcept {
        const u128 end = base + (u128(1) << span);
        return end < u128_2_64 ? end : u128_2_64;
    }
    /// The lowest level (shift) whose node span holds both a and b, below a
    /// slot of span `span`.
    static unsigned covering_shift(u128 a, u128 b, unsigned span) noexcept {
        unsigned s = pt_page_bits;
        while (s + pt_level_bits < span && (a >> (s + pt_level_bits)) != (b >> (s + pt_level_bits)))
            s += pt_level_bits;
        return s;
    }

    /// The node of `slot`, copied first if another table shares it.
    static pt_node& own(pt_entry& slot) {
        pt_node* n = node_of(slot);
        // One reference: the table being built (unpublished) holds the only
        // path to it, so no reader can reach it. The count may have just
        // dropped to 1 on another thread releasing a retired table (after
        // its grace period); acquire pairs with that acq_rel decrement, so
        // whatever that thread did with the node happens before it is
        // written here.
        if (n->refs.load(std::memory_order_acquire) == 1) return *n;
        auto* c = new pt_node;
        c->used = n->used;
        c->kids = n->kids;
        c->shift = n->shift;
        std::copy(std::begin(n->slot), std::end(n->slot), std::begin(c->slot));
        for (std::size_t i = 0, left = c->kids; left != 0 && i < pt_fanout; ++i)
            if (pt_counted(c->slot[i]) != 0) {
                retain(c->slot[i]);
                --left;
            }
        const pt_entry old = slot;
        slot = node_entry(c, node_base(old));
        release(old);
        return *c;
    }

    /// Writes what [first, last) shows over [lo, hi) of the slot covering
    /// [slot_lo, slot_lo + 2^span): one walk down the tree, each slot
    /// visited once; `first` moves forward past ranges left behind.
    template <class It, class SlotOf>
    static void fill(pt_entry& slot, u128 slot_lo, unsigned span, u128 lo, u128 hi, It& first,
                     It last, SlotOf& slot_of) {
        const u128 slot_hi = span_end(slot_lo, span);
        if (lo < slot_lo) lo = slot_lo;
        if (hi > slot_hi) hi = slot_hi;
        if (lo >= hi) return;
        while (first != last && first->end() <= lo) ++first;
        // One value over all of [lo, hi): a hole, or one range covering it.
        const bool none = first == last || u128(first->start) >= hi;
        const bool one = !none && u128(first->start) <= lo && first->end() >= hi;
        if (none || one) {
            const pt_entry v = none ? pt_entry{} : slot_of(*first);
            if (lo == slot_lo && hi == slot_hi) {
                replace(slot, v);
                return;
            }
            if (!slot.is_node() && slot == v) return; // already v everywhere
        } else if (span == pt_page_bits) {
            // Several ranges (or a range and a hole) share this page.
            auto* sp = new pt_subpage<Range>;
            for (It j = first; j != last && u128(j->start) < slot_hi; ++j) {
                sp->starts.push_back(j->start);
                sp->ranges.push_back(&*j);
            }
            const pt_entry e{reinterpret_cast<std::uintptr_t>(sp) | pt_tag_subpage, 0};
            replace(slot, e);
            release(e); // the slot holds it now
            return;
        }
        pt_node& n = node_for(slot, slot_lo, span, lo, hi);
        const u128 base = node_base(slot);
        const unsigned s = n.shift;
        const auto i0 = static_cast<std::size_t>((lo - base) >> s);
        const auto i1 = static_cast<std::size_t>((hi - 1 - base) >> s);
        for (std::size_t i = i0; i <= i1;) {
            const u128 clo = base + (u128(i) << s);
            const u128 chi = span_end(clo, s);
            // The common case without a call: a slot wholly inside [lo, hi)
            // and inside one range (or no range), not a node: the same value
            // for it and for the slots after it that the range (or the hole
            // up to the next range) also covers wholly.
            if (!n.slot[i].is_node() && lo <= clo && chi <= hi) {
                while (first != last && first->end() <= clo) ++first;
                const bool gap = first == last || u128(first->start) >= chi;
                if (gap || (u128(first->start) <= clo && first->end() >= chi)) {
                    const u128 run_end = std::min(
                        hi, gap ? (first == last ? hi : u128(first->start)) : first->end());
                    const pt_entry v = gap ? pt_entry{} : slot_of(*first);
                    // v is a range or a hole: nothing to count for it.
                    // The slots wholly inside [clo, run_end): up to jlast.
                    const u128 whole = (run_end - base) >> s; // > i: slot i is inside
                    const std::size_t jlast =
                        static_cast<std::size_t>(std::min<u128>(whole, u128(i1) + 1)) - 1;
                    std::size_t j = i;
                    for (; j <= jlast && !n.slot[j].is_node(); ++j) {
                        pt_entry& e = n.slot[j];
                        if (e == v) continue;
                        n.used = static_cast<std::uint16_t>(n.used + (v.is_hole() ? 0 : 1) -
                                                            (e.is_hole() ? 0 : 1));
                        if (pt_counted(e) != 0) {
                            --n.kids;
                            release(e);
                        }
                        e = v;
                    }
                    i = j;
                    continue;
                }
            }
            const bool was = !n.slot[i].is_hole();
            const unsigned was_counted = pt_counted(n.slot[i]);
            fill(n.slot[i], clo, s, lo, hi, first, last, slot_of);
            n.used =
                static_cast<std::uint16_t>(n.used + (n.slot[i].is_hole() ? 0 : 1) - (was ? 1 : 0));
            n.kids = static_cast<std::uint16_t>(n.kids + pt_counted(n.slot[i]) - was_counted);
            ++i;
        }
        if (n.used == 0) {
            release(slot);
            slot = {};
        } else if (n.used == 1) {
            // One node left under this one: skip this level.
            for (const pt_entry& c : n.slot) {
                if (c.is_hole()) continue;
                if (c.is_node()) {
                    const pt_entry child = c;
                    retain(child);
                    release(slot);
                    slot = child;
                }
                break;
            }
        }
    }

    static void replace(pt_entry& slot, const pt_entry& v) noexcept {
        if (slot == v) return;
        retain(v);
        release(slot);
        slot = v;
    }

    /// The node under `slot` (of span `span` from slot_lo) that [lo, hi) is
    /// written into, made if needed and owned (copied if shared).
    static pt_node& node_for(pt_entry& slot, u128 slot_lo, unsigned span, u128 lo, u128 hi) {
        if (slot.is_hole()) {
            // A node over skipped levels: large enough for the write, and
            // with slots as large as its alignment allows (an aligned 2 MiB
            // run is one slot of a level-21 node, not 512 pages).
            auto* n = new pt_node;
            unsigned shift = covering_shift(lo, hi - 1, span);
            while (shift + 2 * pt_level_bits <= span &&
                   ((lo | hi) & ((u128(1) << (shift + pt_level_bits)) - 1)) == 0)
                shift += pt_level_bits;
            n->shift = static_cast<std::uint8_t>(shift);
            slot = node_entry(n, lo & ~((u128(1) << (shift + pt_level_bits)) - 1));
        } else if (!slot.is_node()) {
            // One range over the whole span: split it into a full node.
            auto* n = new pt_node;
            n->shift = static_cast<std::uint8_t>(span - pt_level_bits);
            const u128 slot_hi = span_end(slot_lo, span);
            const std::size_t count =
                static_cast<std::size_t>((slot_hi - slot_lo - 1) >> n->shift) + 1;
            for (std::size_t i = 0; i < count; ++i) n->slot[i] = slot; // ranges: nothing to retain
            n->used = static_cast<std::uint16_t>(count);
            slot = node_entry(n, slot_lo);
        } else {
            const u128 nbase = node_base(slot);
            const u128 nend = span_end(nbase, node_shift(slot) + pt_level_bits);
            if (lo < nbase || hi > nend) {
                // The write reaches past a node placed over skipped levels:
                // put a node covering both in between.
                auto* m = new pt_node;
                m->shift = static_cast<std::uint8_t>(
                    covering_shift(lo < nbase ? lo : nbase, (hi > nend ? hi : nend) - 1, span));
                const u128 mbase = nbase & ~((u128(1) << (m->shift + pt_level_bits)) - 1);
                m->slot[static_cast<std::size_t>((nbase - mbase) >> m->shift)] = slot; // moved
                m->used = 1;
                m->kids = 1;
                slot = node_entry(m, mbase);
            }
        }
        return own(slot);
    }

    template <class IsMember, class Overlapping, class SlotOf>
    static void check_slot(const pt_entry& e, u128 lo, unsigned span, IsMember& is_member,
                           Overlapping& overlapping, SlotOf& slot_of, std::string& err) {
        if (!err.empty()) return;
        const u128 hi = span_end(lo, span);
        if (e.is_hole()) {
            if (const auto over = overlapping(lo, hi); !over.empty())
                err = fmt::format("hole slot [{}, {}) overlaps the range at {}", hex(lo), hex(hi),
                                  hex(over.front()->start));
            return;
        }
        if (e.is_range()) {
            const auto* r = reinterpret_cast<const Range*>(e.ref & pt_pointer_mask);
            if (!is_member(r))
                err = fmt::format("slot [{}, {}) points to a range that is not the view's", hex(lo),
                                  hex(hi));
            else if (u128(r->start) > lo || r->end() < hi)
                err = fmt::format("slot [{}, {}) names the range [{}, {}), which does not cover it",
                                  hex(lo), hex(hi), hex(r->start), hex(r->end()));
            else if (!(slot_of(*r) == e))
                err =
                    fmt::format("slot [{}, {}) carries stale host or write bits", hex(lo), hex(hi));
            return;
        }
        if (e.is_subpage()) {
            const auto* sp = subpage_of(e);
            if (span != pt_page_bits) {
                err = fmt::format("subpage in a slot of 2^{} bytes at {}", span, hex(lo));
                return;
            }
            const auto over = overlapping(lo, hi);
            if (over != sp->ranges)
                err = fmt::format("subpage at {} lists {} range(s), the view has {} there", hex(lo),
                                  sp->ranges.size(), over.size());
            for (std::size_t i = 0; err.empty() && i < sp->ranges.size(); ++i)
                if (!is_member(sp->ranges[i]) || sp->starts[i] != sp->ranges[i]->start)
                    err = fmt::format("subpage at {} has a stale entry {}", hex(lo), i);
            return;
        }
        const pt_node& n = *node_of(e);
        const u128 base = node_base(e);
        const unsigned s = node_shift(e);
        if (s != n.shift || s + pt_level_bits > span || (s - pt_page_bits) % pt_level_bits != 0 ||
            base < lo || span_end(base, s + pt_level_bits) > hi ||
            (base & ((u128(1) << (s + pt_level_bits)) - 1)) != 0) {
            err = fmt::format("node of shift {} at {} does not nest in the slot [{}, {})", s,
                              hex(base), hex(lo), hex(hi));
            return;
        }
        // The parts of the slot outside a node over skipped levels are holes.
        check_gap(lo, base, overlapping, err);
        const u128 nend = span_end(base, s + pt_level_bits);
        if (nend < hi) check_gap(nend, hi, overlapping, err);
        std::size_t used = 0, kids = 0;
        for (std::size_t i = 0; i < pt_fanout && err.empty(); ++i) {
            const u128 slo = base + (u128(i) << s);
            if (slo >= nend) {
                if (!n.slot[i].is_hole())
                    err = fmt::format("node at {} has a slot past 2^64", hex(base));
                break;
            }
            used += n.slot[i].is_hole() ? 0 : 1;
            kids += pt_counted(n.slot[i]);
            check_slot(n.slot[i], slo, s, is_member, overlapping, slot_of, err);
        }
        if (err.empty() && used != n.used)
            err = fmt::format("node at {} counts {} used slots, has {}", hex(base), n.used, used);
        if (err.empty() && kids != n.kids)
            err = fmt::format("node at {} counts {} nodes and subpages under it, has {}", hex(base),
                              n.kids, kids);
    }
    template <class Overlapping>
    static void check_gap(u128 lo, u128 hi, Overlapping& overlapping, std::string& err) {
        if (!err.empty() || lo >= hi) return;
        if (const auto over = overlapping(lo, hi); !over.empty())
            err = fmt::format("[{}, {}), skipped by a node, overlaps the range at {}", hex(lo),
                              hex(hi), hex(over.front()->start));
    }
    static std::size_t count_nodes(const pt_entry& e) noexcept {
        if (!e.is_node()) return 0;
        std::size_t n = 1;
        for (const pt_entry& s : node_of(e)->slot) n += count_nodes(s);
        return n;
    }

    pt_entry root_;
};

} // namespace qomem::detail
