// qomem/detail/subregion_index.hpp — the subregions of one container: their
// render order, and an address index for containers with many of them.
//
// Render order is QEMU's list order: descending priority, and among equal
// priorities the most recently added first (a newcomer goes before the first
// sibling whose priority it equals or beats, so the last added wins). The
// address index answers "which subregions may intersect [lo, hi)" without
// walking every sibling: small subregions by address in a multimap, the few
// huge ones (above 4 GiB) in a list of their own, so a lookup scans back at
// most the largest small size.
//
// `Node` (memory_region) befriends this template and provides: a member
// `sub_hook_` (a Boost.Intrusive list hook), `sub_seq_` (the add stamp), and
// the accessors addr(), size() and priority().
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <vector>

#include <boost/intrusive/list.hpp>

#include <qomem/types.hpp>

namespace qomem::detail {

/// The hook a node carries to be in a subregion_index. normal_link: the
/// library checks membership itself (a region being freed while it is still
/// a subregion is a QOMEM_ASSERT), so Boost's own checks, which -DNDEBUG
/// would compile out, are not relied on.
using subregion_hook =
    boost::intrusive::list_member_hook<boost::intrusive::link_mode<boost::intrusive::normal_link>>;

template <class Node>
class subregion_index {
public:
    /// Containers with more subregions than this answer range queries from
    /// the address index instead of walking the list.
    static constexpr std::size_t index_threshold = 16;

    subregion_index() = default;
    subregion_index(const subregion_index&) = delete;
    subregion_index& operator=(const subregion_index&) = delete;

    std::size_t size() const noexcept { return list_.size(); }
    bool empty() const noexcept { return list_.empty(); }
    Node& front() noexcept { return list_.front(); }

    /// Inserts `n` (its addr, size and priority already set) as the most
    /// recently added. Complexity: O(subregions) for the sorted insert,
    /// O(log subregions) for the index.
    void insert(Node& n) {
        n.sub_seq_ = ++next_seq_;
        auto it = list_.begin();
        while (it != list_.end() && it->priority() > n.priority()) ++it;
        list_.insert(it, n);
        index_insert(n);
    }

    /// Removes `n`. Requires: `n` is in this index. Complexity: O(log n).
    void erase(Node& n) noexcept {
        list_.erase(list_.iterator_to(n));
        index_erase(n);
    }

    /// Re-files `n` after its size changed (`old_size` is what was indexed).
    void resized(Node& n, u128 old_size) {
        index_erase(n, old_size);
        index_insert(n);
    }

    /// Calls f(Node&) for each node in render order.
    template <class F>
    void for_each(F&& f) const {
        for (const Node& n : list_) f(const_cast<Node&>(n));
    }

    /// Calls f(Node&) in render order until it returns true; returns whether it did.
    template <class F>
    bool any(F&& f) const {
        for (const Node& n : list_)
            if (f(const_cast<Node&>(n))) return true;
        return false;
    }

    /// Calls f(Node&) in render order for each node that may intersect
    /// [lo, hi) (a superset: callers still clip).
    template <class F>
    void for_each_in(i128 lo, i128 hi, F&& f) const {
        if (list_.size() <= index_threshold) {
            for_each(f);
            return;
        }
        std::vector<Node*> found(huge_.begin(), huge_.end());
        if (hi > 0 && lo < i128(u128_2_64)) {
            const i128 from = lo - i128(max_small_);
            auto it =
                from <= 0 ? by_addr_.begin() : by_addr_.lower_bound(static_cast<hwaddr>(from));
            for (; it != by_addr_.end() && i128(it->first) < hi; ++it)
                if (i128(it->first) + i128(it->second->size()) > lo) found.push_back(it->second);
        }
        std::sort(found.begin(), found.end(), [](const Node* a, const Node* b) {
            return a->priority() != b->priority() ? a->priority() > b->priority()
                                                  : a->sub_seq_ > b->sub_seq_;
        });
        for (Node* n : found) f(*n);
    }

    /// Unlinks every node, calling f(Node&) on each (the index is then empty).
    template <class F>
    void clear_and_dispose(F&& f) {
        by_addr_.clear();
        huge_.clear();
        max_small_ = 0;
        list_.clear_and_dispose([&](Node* n) { f(*n); });
    }

private:
    static constexpr u128 huge_size = u128(1) << 32;
    using list_t = boost::intrusive::list<
        Node, boost::intrusive::member_hook<Node, subregion_hook, &Node::sub_hook_>>;

    void index_insert(Node& n) {
        if (n.size() > huge_size) {
            huge_.push_back(&n);
        } else {
            by_addr_.emplace(n.addr(), &n);
            max_small_ = std::max(max_small_, n.size());
        }
    }
    void index_erase(Node& n) noexcept { index_erase(n, n.size()); }
    void index_erase(Node& n, u128 indexed_size) noexcept {
        if (indexed_size > huge_size) {
            std::erase(huge_, &n);
            return;
        }
        auto [b, e] = by_addr_.equal_range(n.addr());
        for (auto it = b; it != e; ++it)
            if (it->second == &n) {
                by_addr_.erase(it);
                return;
            }
    }

    list_t list_;
    std::multimap<hwaddr, Node*> by_addr_;
    std::vector<Node*> huge_;
    u128 max_small_ = 0; ///< never shrinks: a bound for the backward scan
    std::uint64_t next_seq_ = 0;
};

} // namespace qomem::detail
