// tests/flatten_differential_test.cpp — the flattener against a brute-force
// model, on thousands of random region trees.
//
// The model keeps its own copy of the tree (parents, addresses, priorities,
// the order in which subregions were added, flags) and answers one address at
// a time by walking it, following the rules of tests/conformance/README.md
// and QEMU's render_memory_region:
//   * a disabled region answers nothing, and neither does its subtree;
//   * an address outside the region's range (placed at base + addr) gets
//     nothing from it;
//   * an alias answers what its target answers, with the target's offset 0
//     at alias start - alias_offset (the target's own placement is ignored,
//     its enabled flag is not);
//   * otherwise the first subregion to answer wins, subregions tried from the
//     highest priority down and, among equals, the most recently added first;
//   * if none does, a terminating region answers itself (a container does not);
//   * readonly and nonvolatile are or-ed along the path.
// The library's views (render_flat_view of the root, and the view of an
// address space rooted there) are compared with the model at every boundary
// address — each region's start and end, wherever it is seen, and each flat
// range's, with their neighbours — through the page table (lookup) and the
// binary search alike, and checked for sorted, non-overlapping, fully merged
// ranges and for a page table that names exactly those ranges.
//
// Each run uses the seeds QOMEM_DIFF_SEED (default below), +1, +2, ... for
// QOMEM_DIFF_TREES trees; a failure names the seed of its tree:
//     QOMEM_DIFF_SEED=<seed> QOMEM_DIFF_TREES=1 ./flatten_differential_test

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <random>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <qomem/address_space.hpp>
#include <qomem/assert.hpp>
#include <qomem/device.hpp>
#include <qomem/error.hpp>
#include <qomem/flat_view.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/mtree.hpp>
#include <qomem/object.hpp>

#include "test_support.hpp"

namespace {

using qomem::hwaddr;
using qomem::i128;
using qomem::u128;

constexpr std::uint64_t default_base_seed = 0x5eed'0f'f1a7'7e4eULL;
constexpr std::uint64_t default_trees = 5000;

std::uint64_t env_u64(const char* name, std::uint64_t fallback) {
    const char* v = std::getenv(name);
    if (!v || !*v) return fallback;
    return std::strtoull(v, nullptr, 0);
}

// ---- the model ---------------------------------------------------------------

enum class kind : std::uint8_t {
    container,
    ram,
    rom,
    io,
    rom_device,
    ram_device,
    reservation,
    alias,
};

const char* kind_name(kind k) {
    switch (k) {
    case kind::container: return "container";
    case kind::ram: return "ram";
    case kind::rom: return "rom";
    case kind::io: return "io";
    case kind::rom_device: return "rom-device";
    case kind::ram_device: return "ram-device";
    case kind::reservation: return "reservation";
    case kind::alias: return "alias";
    }
    return "?";
}

struct node {
    std::string name;
    kind k = kind::container;
    u128 size = 0;
    u128 backing = 0;        // RAM-backed kinds cannot grow past their first size
    int parent = -1;         // the container it is a subregion of
    hwaddr addr = 0;         // kept when it leaves its container, as the library does
    std::int32_t prio = 0;
    std::uint64_t seq = 0;   // when it was last (re-)added: later wins among equals
    int target = -1;         // alias target
    hwaddr alias_offset = 0;
    bool enabled = true;
    bool readonly = false;
    bool nonvolatile = false;
    bool romd = true;
    qomem::memory_region* mr = nullptr;

    bool terminates() const { return k != kind::container && k != kind::alias; }
    bool ram_backed() const {
        return k == kind::ram || k == kind::rom || k == kind::ram_device || k == kind::rom_device;
    }
};

/// What answers an address: which region, at which offset in it, with which
/// attributes.
struct hit {
    int node;
    hwaddr offset;
    bool readonly;
    bool nonvolatile;
    bool romd;
    friend bool operator==(const hit&, const hit&) = default;
};

class model {
public:
    std::vector<node> nodes;
    /// Set by lookup when the answer came through an alias (statistics only).
    mutable bool via_alias = false;

    /// Recomputes each node's subregions in render order.
    void sort_children() {
        kids_.assign(nodes.size(), {});
        for (int i = 0; i < static_cast<int>(nodes.size()); ++i)
            if (nodes[idx(i)].parent >= 0) kids_[idx(nodes[idx(i)].parent)].push_back(i);
        for (auto& k : kids_)
            std::sort(k.begin(), k.end(), [&](int a, int b) {
                const node& x = nodes[idx(a)];
                const node& y = nodes[idx(b)];
                return x.prio != y.prio ? x.prio > y.prio : x.seq > y.seq;
            });
    }

    /// What answers address `a` of region `n`, whose container's offset 0
    /// is at `base`.
    std::optional<hit> lookup(int n, i128 base, hwaddr a, bool ro, bool nv) const {
        const node& m = nodes[idx(n)];
        if (!m.enabled) return std::nullopt;
        base += i128(m.addr);
        ro = ro || m.readonly;
        nv = nv || m.nonvolatile;
        const i128 x = i128(a);
        if (x < base || x >= base + i128(m.size)) return std::nullopt;
        if (m.k == kind::alias) {
            const node& t = nodes[idx(m.target)];
            auto h = lookup(m.target, base - i128(t.addr) - i128(m.alias_offset), a, ro, nv);
            if (h) via_alias = true;
            return h;
        }
        for (int c : kids_[idx(n)])
            if (auto h = lookup(c, base, a, ro, nv)) return h;
        if (m.terminates()) return hit{n, static_cast<hwaddr>(x - base), ro, nv, m.romd};
        return std::nullopt;
    }

    /// Adds the start and end (and their neighbours) of every place where a
    /// region of the subtree of `n` can show, clipped like the renderer.
    void boundaries(int n, i128 base, i128 lo, i128 hi, std::vector<hwaddr>& out,
                    int& budget) const {
        if (--budget < 0) return;
        const node& m = nodes[idx(n)];
        if (!m.enabled) return;
        base += i128(m.addr);
        const i128 s = std::max(base, lo);
        const i128 e = std::min(base + i128(m.size), hi);
        if (s >= e) return;
        for (i128 p : {s - 1, s, e - 1, e})
            if (p >= 0 && p < i128(qomem::u128_2_64)) out.push_back(static_cast<hwaddr>(p));
        if (m.k == kind::alias) {
            const node& t = nodes[idx(m.target)];
            boundaries(m.target, base - i128(t.addr) - i128(m.alias_offset), s, e, out, budget);
            return;
        }
        for (int c : kids_[idx(n)]) boundaries(c, base, s, e, out, budget);
    }

    /// The flat-view root of an address space rooted at `n` (README rule, plus
    /// flat_view.hpp's refusal to step out of a readonly or nonvolatile
    /// region); -1 for none.
    int flat_view_root(int n) const {
        while (n >= 0 && nodes[idx(n)].enabled) {
            const node& m = nodes[idx(n)];
            if (m.readonly || m.nonvolatile) return n;
            if (m.k == kind::alias) {
                if (m.alias_offset == 0 && m.size >= nodes[idx(m.target)].size &&
                    nodes[idx(m.target)].addr == 0) {
                    n = m.target;
                    continue;
                }
                return n;
            }
            if (m.terminates()) return n;
            int only = -1;
            int enabled = 0;
            for (int c : kids_[idx(n)])
                if (nodes[idx(c)].enabled) {
                    ++enabled;
                    only = c;
                }
            if (enabled == 0) return -1;
            if (enabled == 1 && nodes[idx(only)].addr == 0 && nodes[idx(only)].size <= m.size) {
                n = only;
                continue;
            }
            return n;
        }
        return -1;
    }

    /// True if `to` can be reached from `from` through subregions and alias
    /// targets (what makes adding `from` into `to` a cycle).
    bool reaches(int from, int to) const {
        std::vector<int> stack{from};
        std::vector<bool> seen(nodes.size());
        seen[idx(from)] = true;
        while (!stack.empty()) {
            const int n = stack.back();
            stack.pop_back();
            if (n == to) return true;
            auto push = [&](int c) {
                if (!seen[idx(c)]) {
                    seen[idx(c)] = true;
                    stack.push_back(c);
                }
            };
            if (nodes[idx(n)].k == kind::alias) push(nodes[idx(n)].target);
            for (int c = 0; c < static_cast<int>(nodes.size()); ++c)
                if (nodes[idx(c)].parent == n) push(c);
        }
        return false;
    }

    std::string describe() const {
        std::string out;
        for (std::size_t i = 0; i < nodes.size(); ++i) {
            const node& m = nodes[i];
            out += fmt::format("  #{} {} {} size {}", i, m.name, kind_name(m.k),
                               qomem::detail::hex(m.size));
            if (m.k == kind::alias)
                out += fmt::format(" -> #{} @{:#x}", m.target, m.alias_offset);
            if (m.parent >= 0)
                out += fmt::format(" in #{} at {:#x} prio {} seq {}", m.parent, m.addr, m.prio,
                                   m.seq);
            else if (m.addr)
                out += fmt::format(" (unplaced, addr {:#x})", m.addr);
            if (!m.enabled) out += " disabled";
            if (m.readonly) out += " readonly";
            if (m.nonvolatile) out += " nonvolatile";
            if (!m.romd) out += " !romd";
            out += '\n';
        }
        return out;
    }

    static std::size_t idx(int i) { return static_cast<std::size_t>(i); }

private:
    std::vector<std::vector<int>> kids_;
};

// ---- random trees ------------------------------------------------------------

class rng_t {
public:
    explicit rng_t(std::uint64_t seed) : g_(seed) {}
    std::uint64_t below(std::uint64_t n) { return g_() % n; }
    bool chance(unsigned percent) { return below(100) < percent; }
    template <class T, std::size_t N>
    const T& pick(const std::array<T, N>& a) {
        return a[static_cast<std::size_t>(below(N))];
    }

private:
    std::mt19937_64 g_;
};

constexpr hwaddr top_of_space = ~hwaddr{0};

/// A multiple of 0x400 moved by one byte: makes ranges overlap or leave
/// gaps of exactly one byte, where off-by-one errors show.
std::uint64_t off_by_one(rng_t& r, std::uint64_t units) {
    const std::uint64_t v = (r.below(units) + 1) * 0x400;
    return r.chance(50) ? v + 1 : v - 1;
}

u128 pick_size(rng_t& r) {
    const auto p = r.below(100);
    if (p < 50) return u128(r.below(32) + 1) * 0x400;
    if (p < 58) return u128(r.below(0x3000) + 1);
    if (p < 65) return u128(off_by_one(r, 32));
    if (p < 72) return qomem::u128_2_64;
    if (p < 77) return u128(1) << 63;
    if (p < 80) return 0;
    return u128(r.below(8) + 1) * 0x10000;
}

/// An offset in a container of `room` bytes: mostly inside it (aligned or
/// not), sometimes across its end, near the top of the 64-bit space, or 0.
hwaddr pick_addr(rng_t& r, u128 room) {
    const hwaddr span = room > 0x20000 ? 0x20000 : static_cast<hwaddr>(room) + 1;
    const auto p = r.below(100);
    if (p < 45) return (r.below(span) / 0x400) * 0x400;
    if (p < 53) return r.below(span);
    if (p < 62) return std::min<hwaddr>(off_by_one(r, 32), span);
    if (p < 70 && room <= qomem::u128_2_64 && room > 0x400)
        return static_cast<hwaddr>(room - 0x400 * (r.below(4) + 1) + r.below(2) * 0x200);
    if (p < 82) return top_of_space - (r.below(16) * 0x400 + 0x3ff); // near 2^64
    if (p < 86) return hwaddr{1} << 63;
    return 0;
}

hwaddr pick_alias_offset(rng_t& r) {
    const auto p = r.below(100);
    if (p < 45) return 0;
    if (p < 80) return r.below(32) * 0x400;
    if (p < 88) return r.below(0x4000);
    if (p < 95) return top_of_space - (r.below(16) * 0x400 + 0x3ff);
    return hwaddr{1} << 63;
}

std::int32_t pick_prio(rng_t& r) {
    static constexpr std::array<std::int32_t, 8> prios{-2, -1, 0, 0, 0, 0, 1, 2};
    return r.pick(prios);
}

kind pick_kind(rng_t& r) {
    const auto p = r.below(100);
    if (p < 24) return kind::container;
    if (p < 38) return kind::ram;
    if (p < 42) return kind::rom;
    if (p < 54) return kind::io;
    if (p < 59) return kind::rom_device;
    if (p < 62) return kind::ram_device;
    if (p < 66) return kind::reservation;
    return kind::alias;
}

qomem_test::null_regs the_ops;
std::byte ram_device_backing[16];

qomem::ref_ptr<qomem::memory_region> make_region(qomem::object& owner, const model& m,
                                                 const node& n) {
    switch (n.k) {
    case kind::container: return qomem::make_container(owner, n.name, n.size);
    case kind::ram: return qomem::make_ram(owner, n.name, n.size);
    case kind::rom: return qomem::make_rom(owner, n.name, n.size);
    case kind::io: return qomem::make_io(owner, n.name, n.size, the_ops);
    case kind::rom_device: return qomem::make_rom_device(owner, n.name, n.size, the_ops);
    case kind::ram_device: return qomem::make_ram_device(owner, n.name, n.size, ram_device_backing);
    case kind::reservation: return qomem::make_reservation(owner, n.name, n.size);
    case kind::alias:
        return qomem::make_alias(owner, n.name, *m.nodes[model::idx(n.target)].mr, n.alias_offset,
                                 n.size);
    }
    return nullptr;
}

// ---- checking ------------------------------------------------------------------

struct stats {
    std::uint64_t trees = 0;
    std::uint64_t checks = 0;
    std::uint64_t addresses = 0;
    std::uint64_t hits = 0;
    std::uint64_t misses = 0;
    std::uint64_t alias_hits = 0;   // answered through at least one alias
    std::uint64_t high_hits = 0;    // answered at or above 2^63
    std::uint64_t cycles_refused = 0;
    std::uint64_t size_refused = 0;
    std::uint64_t shared_subroot = 0; // the AS's view root was a proper descendant
};

/// Sorted, non-overlapping, non-empty, inside the space, merged where QEMU merges.
std::string check_invariants(const qomem::flat_view& v) {
    const auto& rs = v.ranges();
    for (std::size_t i = 0; i < rs.size(); ++i) {
        const qomem::flat_range& r = rs[i];
        if (r.size == 0) return fmt::format("range #{} is empty", i);
        if (r.end() > qomem::u128_2_64) return fmt::format("range #{} ends past 2^64", i);
        if (!r.mr) return fmt::format("range #{} has no region", i);
        if (i == 0) continue;
        const qomem::flat_range& p = rs[i - 1];
        if (p.end() > u128(r.start))
            return fmt::format("ranges #{} and #{} overlap or are out of order", i - 1, i);
        if (p.end() == u128(r.start) && p.same_attributes(r) &&
            u128(p.offset_in_region) + p.size == u128(r.offset_in_region))
            return fmt::format("ranges #{} and #{} should have been merged", i - 1, i);
    }
    return {};
}

std::string describe_view(const qomem::flat_view& v) {
    std::string out;
    for (const qomem::flat_range& r : v.ranges())
        out += fmt::format("  {:016x}-{:016x} {} @{:#x}{}{}{}\n", r.start, r.last(),
                           r.mr->region_name(), r.offset_in_region, r.readonly ? " ro" : "",
                           r.nonvolatile ? " nv" : "", r.romd_mode ? "" : " !romd");
    return out.empty() ? "  (empty)\n" : out;
}

std::string describe_hit(const model& m, const std::optional<hit>& h) {
    if (!h) return "nothing";
    return fmt::format("{} @{:#x}{}{}{}", m.nodes[model::idx(h->node)].name, h->offset,
                       h->readonly ? " ro" : "", h->nonvolatile ? " nv" : "",
                       h->romd ? "" : " !romd");
}

class tree_checker {
public:
    tree_checker(const model& m, stats& st) : m_(m), st_(st) {
        for (std::size_t i = 0; i < m.nodes.size(); ++i)
            index_[m.nodes[i].mr] = static_cast<int>(i);
    }

    /// Compares `v` with the model's answers for region `root`; "" if equal.
    std::string compare(const qomem::flat_view& v, int root, const char* what) {
        if (auto e = check_invariants(v); !e.empty())
            return fmt::format("{}: {}\nlibrary view:\n{}", what, e, describe_view(v));
        // The page table names exactly the view's ranges, page by page.
        if (auto e = v.check_page_table(); !e.empty())
            return fmt::format("{}: page table: {}\nlibrary view:\n{}", what, e, describe_view(v));
        std::vector<hwaddr> cand;
        int budget = 20000;
        m_.boundaries(root, 0, 0, i128(qomem::u128_2_64), cand, budget);
        for (const qomem::flat_range& r : v.ranges()) {
            cand.push_back(r.start);
            cand.push_back(r.last());
            if (r.start) cand.push_back(r.start - 1);
            if (r.last() != top_of_space) cand.push_back(r.last() + 1);
        }
        cand.push_back(0);
        cand.push_back(top_of_space);
        std::sort(cand.begin(), cand.end());
        cand.erase(std::unique(cand.begin(), cand.end()), cand.end());

        for (hwaddr a : cand) {
            ++st_.addresses;
            m_.via_alias = false;
            const std::optional<hit> want = m_.lookup(root, 0, a, false, false);
            std::optional<hit> got;
            if (v.lookup(a) != v.lookup_by_search(a))
                return fmt::format("{}: at {:#x} the page table and the binary search disagree", what, a);
            if (const qomem::flat_range* r = v.lookup(a)) {
                const auto it = index_.find(r->mr);
                if (it == index_.end())
                    return fmt::format("{}: {:#x} answered by unknown region {}", what, a,
                                       r->mr->region_name());
                got = hit{it->second, r->offset_in_region + (a - r->start), r->readonly,
                          r->nonvolatile, r->romd_mode};
            }
            if (want != got)
                return fmt::format("{}: at {:#x} the model says {}, the library {}\n"
                                   "library view:\n{}",
                                   what, a, describe_hit(m_, want), describe_hit(m_, got),
                                   describe_view(v));
            if (want) {
                ++st_.hits;
                if (m_.via_alias) ++st_.alias_hits;
                if (a >= (hwaddr{1} << 63)) ++st_.high_hits;
            } else {
                ++st_.misses;
            }
        }
        return {};
    }

private:
    const model& m_;
    stats& st_;
    std::unordered_map<const qomem::memory_region*, int> index_;
};


// ---- one tree, from birth to teardown --------------------------------------------

/// Records the order in which objects are finalized.
class finalize_order : public qomem::lifetime_observer {
public:
    finalize_order() : previous_(qomem::set_lifetime_observer(this)) { order_.reserve(256); }
    ~finalize_order() { qomem::set_lifetime_observer(previous_); }
    finalize_order(const finalize_order&) = delete;
    finalize_order& operator=(const finalize_order&) = delete;
    void finalizing(const qomem::object& obj) noexcept override { order_.push_back(&obj); }
    const std::vector<const qomem::object*>& order() const noexcept { return order_; }

private:
    qomem::lifetime_observer* previous_;
    std::vector<const qomem::object*> order_;
};

/// Commits a transaction left open by an early return.
struct open_transaction {
    bool open = false;
    void begin() {
        qomem::memory_region_transaction_begin();
        open = true;
    }
    void commit() {
        open = false;
        qomem::memory_region_transaction_commit();
    }
    ~open_transaction() noexcept(false) {
        if (open) qomem::memory_region_transaction_commit();
    }
};

/// How a tree is torn down. Every region is owned by one device.
enum class teardown : std::uint8_t {
    drop_owner_after_as,  ///< owner never in a tree: destroy the AS, then drop the owner
    drop_owner_before_as, ///< owner never in a tree: drop it while the AS holds the root
    unparent_after_as,    ///< owner in a tree: destroy the AS, then unparent the owner
    unparent_before_as,   ///< owner in a tree: unparent it while the AS holds the root
};

class tree_run {
public:
    tree_run(std::uint64_t seed, stats& st) : r_(seed), st_(st) {}

    /// Builds, checks, mutates, checks, tears down; "" if all went well.
    std::string run() {
        const auto how = static_cast<teardown>(r_.below(4));
        const bool in_tree =
            how == teardown::unparent_after_as || how == teardown::unparent_before_as;
        finalize_order fin;
        qomem::ref_ptr<qomem::container> tree;
        owner_ = qomem::make<qomem::device>();
        const qomem::object* owner_id = owner_.get();
        if (in_tree) {
            tree = qomem::container::make_root();
            tree->add_child("owner", *owner_);
        }
        std::string failure = build_and_mutate();
        if (!failure.empty()) return failure;

        // Teardown: the owner's child properties are the regions' only
        // holders besides each other and the address space.
        handles_.clear();
        const bool as_out_first =
            how == teardown::drop_owner_after_as || how == teardown::unparent_after_as;
        if (as_out_first) as_.reset();
        const std::size_t first_event = fin.order().size();
        if (in_tree) {
            qomem::device* d = owner_.get();
            owner_.reset();
            qomem::unparent(*d);
        } else {
            owner_.reset();
        }
        if (!as_out_first) {
            // The regions the address space reaches outlive their owner's
            // departure, and still render the same.
            if (auto e = check("after the owner left"); !e.empty()) return e;
            as_.reset();
        }
        tree.reset();

        if (qomem::live_object_count() != 0)
            return fmt::format("teardown ({}) left objects alive: {}", static_cast<int>(how),
                               qomem_test::leak_check::describe_live());
        if (in_tree) {
            // The owner goes last: each unparented region holds it until freed.
            const auto& o = fin.order();
            std::ptrdiff_t owner_at = -1;
            std::ptrdiff_t last_region_at = -1;
            for (auto i = static_cast<std::ptrdiff_t>(first_event);
                 i < static_cast<std::ptrdiff_t>(o.size()); ++i) {
                const qomem::object* obj = o[static_cast<std::size_t>(i)];
                if (obj == owner_id) owner_at = i;
                else if (region_ids_.count(obj)) last_region_at = i;
            }
            if (owner_at < 0) return "teardown: the owner was never finalized";
            if (owner_at < last_region_at)
                return fmt::format("teardown ({}): a region was finalized after its owner",
                                   static_cast<int>(how));
        }
        return {};
    }

private:
    std::string build_and_mutate() {
        open_transaction tx;
        auto create = [&](node n) {
            n.backing = n.size;
            n.readonly = n.k == kind::rom; // ROM starts read-only
            auto h = make_region(*owner_, m_, n);
            n.mr = h.get();
            region_ids_.emplace(h.get(), 0);
            m_.nodes.push_back(std::move(n));
            handles_.push_back(std::move(h));
        };

        {
            node root;
            root.name = "root";
            root.k = r_.chance(80) ? kind::container : r_.chance(50) ? kind::io : kind::ram;
            root.size = r_.chance(85) ? qomem::u128_2_64 : u128(r_.below(64) + 1) * 0x400;
            create(std::move(root));
        }
        const int count = 1 + static_cast<int>(r_.below(15));
        for (int i = 1; i <= count; ++i) {
            node n;
            n.name = fmt::format("n{}", i);
            n.k = pick_kind(r_);
            n.size = pick_size(r_);
            if (n.k == kind::alias) {
                n.target = static_cast<int>(r_.below(m_.nodes.size()));
                n.alias_offset = pick_alias_offset(r_);
            }
            create(std::move(n));
        }

        const bool as_first = r_.chance(40);
        if (as_first) as_.emplace(*m_.nodes[0].mr, "diff");
        if (r_.chance(50)) tx.begin();
        const qomem::flat_view* before = as_ ? as_->view().get() : nullptr;

        std::vector<int> order;
        for (int i = 1; i <= count; ++i) order.push_back(i);
        for (std::size_t i = order.size(); i > 1; --i)
            std::swap(order[i - 1], order[static_cast<std::size_t>(r_.below(i))]);
        for (int i : order)
            if (r_.chance(88))
                if (auto e = try_add(i); !e.empty()) return e;

        for (std::size_t i = 0; i < m_.nodes.size(); ++i) {
            node& n = m_.nodes[i];
            if (r_.chance(i == 0 ? 3 : 10)) set_enabled(n, false);
            if (r_.chance(7)) set_readonly(n, true);
            if (r_.chance(6)) set_nonvolatile(n, true);
            if (n.k == kind::rom_device && r_.chance(40)) set_romd(n, false);
        }
        if (tx.open) {
            if (as_ && as_->view().get() != before)
                return "the view was re-rendered inside a transaction (building)";
            tx.commit();
        }
        if (!as_) as_.emplace(*m_.nodes[0].mr, "diff");
        if (auto e = check("after building"); !e.empty()) return e;

        const int rounds = static_cast<int>(r_.below(4));
        for (int round = 0; round < rounds; ++round) {
            if (r_.chance(35)) tx.begin();
            const qomem::flat_view* prev = as_->view().get();
            const int steps = 1 + static_cast<int>(r_.below(4));
            for (int k = 0; k < steps; ++k)
                if (auto e = mutate(); !e.empty()) return fmt::format("round {}: {}", round, e);
            if (tx.open) {
                if (as_->view().get() != prev)
                    return fmt::format("round {}: re-rendered inside a transaction", round);
                tx.commit();
            }
            if (auto e = check(fmt::format("after round {}", round)); !e.empty()) return e;
        }
        return {};
    }

    void set_enabled(node& n, bool v) {
        n.mr->set_enabled(v);
        n.enabled = v;
    }
    void set_readonly(node& n, bool v) {
        n.mr->set_readonly(v);
        n.readonly = v;
    }
    void set_nonvolatile(node& n, bool v) {
        n.mr->set_nonvolatile(v);
        n.nonvolatile = v;
    }
    void set_romd(node& n, bool v) {
        n.mr->set_romd(v);
        n.romd = v;
    }

    /// Adds node `sub` (in no container) somewhere; a cycle must be refused.
    std::string try_add(int sub) {
        // Mostly into the root or a container, so that most regions show.
        std::vector<int> parents;
        const auto want = r_.below(100);
        for (int j = 0; j < static_cast<int>(m_.nodes.size()); ++j) {
            const node& c = m_.nodes[model::idx(j)];
            if (c.k == kind::alias) continue;
            if (want < 35 ? j == 0 : want < 80 ? c.k == kind::container : true)
                parents.push_back(j);
        }
        if (parents.empty()) parents.push_back(0);
        const int p = parents[static_cast<std::size_t>(r_.below(parents.size()))];
        const hwaddr addr = pick_addr(r_, m_.nodes[model::idx(p)].size);
        const std::int32_t prio = pick_prio(r_);
        const bool cycle = p == sub || m_.reaches(sub, p);
        bool refused = false;
        try {
            m_.nodes[model::idx(p)].mr->add_subregion(addr, *m_.nodes[model::idx(sub)].mr, prio);
        } catch (const qomem::region_error&) {
            refused = true;
        }
        if (refused != cycle)
            return fmt::format("adding #{} into #{}: {}\nmodel:\n{}", sub, p,
                               cycle ? "a cycle was accepted" : "refused, but there is no cycle",
                               m_.describe());
        if (refused) {
            ++st_.cycles_refused;
            return {};
        }
        node& n = m_.nodes[model::idx(sub)];
        n.parent = p;
        n.addr = addr;
        n.prio = prio;
        n.seq = ++seq_;
        return {};
    }

    std::string mutate() {
        const int i = static_cast<int>(r_.below(m_.nodes.size()));
        node& n = m_.nodes[model::idx(i)];
        switch (r_.below(9)) {
        case 0:
            // Only within a container: a container-less region's address does
            // not render (the root's would, but is never moved here).
            if (n.parent >= 0) {
                const hwaddr a =
                    r_.chance(20) ? n.addr : pick_addr(r_, m_.nodes[model::idx(n.parent)].size);
                n.mr->set_address(a);
                if (a != n.addr) {
                    n.addr = a;
                    n.seq = ++seq_; // re-added: now the last added
                }
            }
            break;
        case 1:
            set_enabled(n, !n.enabled);
            break;
        case 2:
            if (n.k == kind::alias) {
                const hwaddr off = pick_alias_offset(r_);
                n.mr->set_alias_offset(off);
                n.alias_offset = off;
            }
            break;
        case 3: {
            const u128 size = r_.chance(3) ? qomem::u128_2_64 + 1 : pick_size(r_);
            const bool refuse = size > qomem::u128_2_64 || (n.ram_backed() && size > n.backing);
            bool threw = false;
            try {
                n.mr->set_size(size);
            } catch (const qomem::region_error&) {
                threw = true;
            }
            if (threw != refuse)
                return fmt::format("set_size({}) on #{} {}: {}", qomem::detail::hex(size), i,
                                   kind_name(n.k), threw ? "refused" : "accepted");
            if (threw)
                ++st_.size_refused;
            else
                n.size = size;
            break;
        }
        case 4:
            set_readonly(n, !n.readonly);
            break;
        case 5:
            set_nonvolatile(n, !n.nonvolatile);
            break;
        case 6:
            if (n.k == kind::rom_device) set_romd(n, !n.romd);
            break;
        case 7:
            if (n.parent >= 0) {
                m_.nodes[model::idx(n.parent)].mr->del_subregion(*n.mr);
                n.parent = -1;
            }
            break;
        default:
            if (n.parent < 0 && i != 0) return try_add(i);
            break;
        }
        return {};
    }

    std::string check(const std::string& stage) {
        m_.sort_children();
        ++st_.checks;
        tree_checker tc(m_, st_);
        auto fail = [&](const std::string& e) {
            return fmt::format("{}: {}\nmodel:\n{}", stage, e, m_.describe());
        };

        const auto direct = qomem::render_flat_view(m_.nodes[0].mr);
        if (auto e = tc.compare(*direct, 0, "render_flat_view(root)"); !e.empty()) return fail(e);

        const int fv = m_.flat_view_root(0);
        const qomem::memory_region* want_root = fv < 0 ? nullptr : m_.nodes[model::idx(fv)].mr;
        const qomem::flat_view& v = *as_->view();
        if (v.root() != want_root)
            return fail(fmt::format("the address space's flat-view root is {}, the model's {}",
                                    v.root() ? v.root()->region_name() : "(none)",
                                    fv < 0 ? "(none)" : m_.nodes[model::idx(fv)].name));
        if (fv > 0) ++st_.shared_subroot;
        if (auto e = tc.compare(v, 0, "the address space's view"); !e.empty()) return fail(e);
        return {};
    }

    rng_t r_;
    stats& st_;
    model m_;
    std::uint64_t seq_ = 0;
    std::unordered_map<const qomem::object*, int> region_ids_;
    qomem::ref_ptr<qomem::device> owner_;
    std::vector<qomem::ref_ptr<qomem::memory_region>> handles_;
    std::optional<qomem::address_space> as_;
};

} // namespace

TEST_CASE("flattening agrees with a brute-force per-address walk on random region trees, and "
          "every tree tears down cleanly through its owner",
          "[flat_view][differential]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    // Every incremental commit is also checked against a full render.
    qomem_test::verify_incremental verify;
    const std::uint64_t base = env_u64("QOMEM_DIFF_SEED", default_base_seed);
    const std::uint64_t trees = env_u64("QOMEM_DIFF_TREES", default_trees);
    stats st;
    for (std::uint64_t i = 0; i < trees; ++i) {
        const std::uint64_t seed = base + i;
        std::string failure;
        {
            tree_run run(seed, st);
            failure = run.run();
        }
        ++st.trees;
        if (failure.empty() && qomem::live_object_count() != 0)
            failure = "objects left alive: " + qomem_test::leak_check::describe_live();
        if (!failure.empty())
            FAIL(fmt::format("tree with seed {:#x} (reproduce: QOMEM_DIFF_SEED={:#x} "
                             "QOMEM_DIFF_TREES=1):\n{}",
                             seed, seed, failure));
    }
    INFO(fmt::format("trees {}, checks {}, addresses {}, hits {} (through aliases {}, at or above "
                     "2^63 {}), misses {}, cycles refused {}, sizes refused {}, views rooted "
                     "below the root {}",
                     st.trees, st.checks, st.addresses, st.hits, st.alias_hits, st.high_hits,
                     st.misses, st.cycles_refused, st.size_refused, st.shared_subroot));
    CHECK(st.trees == trees);
    if (trees >= 500) {
        // The generator reaches what it is meant to exercise.
        CHECK(st.hits > 0);
        CHECK(st.misses > 0);
        CHECK(st.alias_hits > 0);
        CHECK(st.high_hits > 0);
        CHECK(st.cycles_refused > 0);
        CHECK(st.size_refused > 0);
        CHECK(st.shared_subroot > 0);
    }
}
