// qomem/mtree.hpp — QEMU's `info mtree` text, byte for byte.
//
//     fmt::print("{}", qomem::info_mtree({.flatview = true}));          // info mtree -f
//     fmt::print("{}", qomem::info_mtree({.disabled = true}));          // info mtree -D
//     fmt::print("{}", qomem::info_mtree(spaces, {.owner = true}));     // only these spaces
//     fmt::print("{}", qomem::info_mtree(m.memory(), {}));              // a machine's system
//
// The formats are QEMU's (HMP `info mtree [-f] [-o] [-D]`): 16-digit hex
// addresses, inclusive ends, "(prio N, [nv-]type): name", " @offset" for flat
// ranges that do not start at offset 0 of their region, and for the tree
// `alias NAME @TARGET START-END`, " [disabled]", alias targets printed after
// the address spaces as "memory-region: NAME" sections.
//
// QEMU lists address-space groups and flat views in hash-table order; qomem
// lists them in the order the address spaces were created (its comparison
// rule, tests/conformance/README.md, ignores that order).
#pragma once

#include <algorithm>
#include <span>
#include <string>
#include <vector>

#include <fmt/format.h>

#include <qomem/address_space.hpp>
#include <qomem/device.hpp>

namespace qomem {

struct mtree_options {
    bool flatview = false; ///< -f: print the flat views instead of the tree
    bool owner = false;    ///< -o: print each region's owner and QOM parent
    bool disabled = false; ///< -D: also print disabled regions (tree only)
};

namespace detail {

inline void mtree_append_owner_part(std::string& out, const char* label, const object& obj) {
    const device* dev = dynamic_cast_to<device>(&obj);
    out += fmt::format(" {}:{{{}", label, dev ? "dev" : "obj");
    if (dev && !dev->id().empty()) {
        out += fmt::format(" id={}", dev->id());
    } else if (auto path = obj.canonical_path()) {
        out += fmt::format(" path={}", *path);
    } else {
        out += fmt::format(" type={}", obj.type().name);
    }
    out += '}';
}

inline void mtree_append_owner(std::string& out, const memory_region& mr) {
    const object* owner = mr.owner();
    const object* parent = mr.parent();
    if (!owner && !parent) {
        out += " orphan";
        return;
    }
    if (owner) mtree_append_owner_part(out, "owner", *owner);
    if (parent && parent != owner) mtree_append_owner_part(out, "parent", *parent);
}

class mtree_tree_printer {
public:
    mtree_tree_printer(std::string& out, const mtree_options& opt) : out_(out), opt_(opt) {}

    void print(const memory_region& mr, unsigned level, hwaddr base) {
        const hwaddr start = base + mr.addr(); // QEMU's 64-bit arithmetic, wrap included
        const hwaddr span = mr.size() ? static_cast<hwaddr>(mr.size() - 1) : 0;
        const hwaddr end = start + span;
        if (start < base || end < start) out_ += "[DETECTED OVERFLOW!] ";
        const bool shown = mr.enabled() || opt_.disabled;
        if (const memory_region* target = mr.alias()) {
            if (std::find(queue_.begin(), queue_.end(), target) == queue_.end())
                queue_.push_back(target);
            if (shown) {
                indent(level);
                out_ += fmt::format(
                    "{:016x}-{:016x} (prio {}, {}{}): alias {} @{} {:016x}-{:016x}{}", start, end,
                    mr.priority(), mr.nonvolatile() ? "nv-" : "", mr.type_string(),
                    mr.region_name(), target->region_name(), mr.alias_offset(),
                    mr.alias_offset() + span, mr.enabled() ? "" : " [disabled]");
                end_line(mr);
            }
        } else if (shown) {
            indent(level);
            out_ += fmt::format("{:016x}-{:016x} (prio {}, {}{}): {}{}", start, end, mr.priority(),
                                mr.nonvolatile() ? "nv-" : "", mr.type_string(), mr.region_name(),
                                mr.enabled() ? "" : " [disabled]");
            end_line(mr);
        }
        // Children by ascending address, higher priority first on ties, and
        // otherwise in list order. A disabled region's children still print.
        std::vector<const memory_region*> subs;
        mr.for_each_subregion([&](const memory_region& s) { subs.push_back(&s); });
        std::stable_sort(subs.begin(), subs.end(),
                         [](const memory_region* a, const memory_region* b) {
                             return a->addr() < b->addr() ||
                                    (a->addr() == b->addr() && a->priority() > b->priority());
                         });
        for (const memory_region* s : subs) print(*s, level + 1, start);
    }

    /// Prints the queued alias targets; printing them may queue more.
    void print_alias_targets() {
        for (std::size_t i = 0; i < queue_.size(); ++i) {
            out_ += fmt::format("memory-region: {}\n", queue_[i]->region_name());
            print(*queue_[i], 1, 0);
            out_ += '\n';
        }
    }

private:
    void indent(unsigned level) {
        for (unsigned i = 0; i < level; ++i) out_ += "  ";
    }
    void end_line(const memory_region& mr) {
        if (opt_.owner) mtree_append_owner(out_, mr);
        out_ += '\n';
    }

    std::string& out_;
    const mtree_options& opt_;
    std::vector<const memory_region*> queue_;
};

inline void mtree_print_flat(std::string& out, const flat_view& v,
                             const std::vector<const address_space*>& spaces, std::size_t number,
                             const mtree_options& opt) {
    out += fmt::format("FlatView #{}\n", number);
    for (const address_space* as : spaces) {
        out += fmt::format(" AS \"{}\", root: {}", as->name(), as->root().region_name());
        if (const memory_region* a = as->root().alias())
            out += fmt::format(", alias {}", a->region_name());
        out += '\n';
    }
    out += fmt::format(" Root memory region: {}\n",
                       v.root() ? std::string_view(v.root()->region_name()) : "(none)");
    if (v.ranges().empty()) {
        out += "  No rendered FlatView\n\n";
        return;
    }
    for (const flat_range& r : v.ranges()) {
        out += fmt::format("  {:016x}-{:016x} (prio {}, {}{}): {}", r.start, r.last(),
                           r.mr->priority(), r.nonvolatile ? "nv-" : "",
                           r.readonly ? "rom" : r.mr->type_string(), r.mr->region_name());
        if (r.offset_in_region) out += fmt::format(" @{:016x}", r.offset_in_region);
        if (opt.owner) mtree_append_owner(out, *r.mr);
        out += '\n';
    }
    out += '\n';
}

} // namespace detail

namespace detail {
/// The address spaces grouped by key(as) (a view, or a root), groups in the
/// order their first member comes.
template <class Key>
auto mtree_group(std::span<const address_space* const> spaces, Key key) {
    using K = decltype(key(*spaces.front()));
    std::vector<std::pair<K, std::vector<const address_space*>>> groups;
    for (const address_space* as : spaces) {
        const K k = key(*as);
        auto it =
            std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == k; });
        if (it == groups.end())
            groups.emplace_back(k, std::vector<const address_space*>{as});
        else
            it->second.push_back(as);
    }
    return groups;
}
} // namespace detail

/// `info mtree` over the given address spaces (in the order given).
inline std::string info_mtree(std::span<const address_space* const> spaces,
                              const mtree_options& opt = {}) {
    std::string out;
    if (spaces.empty()) return out;
    if (opt.flatview) {
        // The views stay alive: each address space holds its current one.
        const auto groups = detail::mtree_group(
            spaces, [](const address_space& as) -> const flat_view* { return as.view().get(); });
        for (std::size_t i = 0; i < groups.size(); ++i)
            detail::mtree_print_flat(out, *groups[i].first, groups[i].second, i, opt);
        return out;
    }
    auto groups = detail::mtree_group(
        spaces, [](const address_space& as) -> const memory_region* { return &as.root(); });
    detail::mtree_tree_printer printer(out, opt);
    for (auto& [root, members] : groups) {
        std::stable_sort(
            members.begin(), members.end(),
            [](const address_space* a, const address_space* b) { return a->name() < b->name(); });
        for (const address_space* as : members)
            out += fmt::format("address-space: {}\n", as->name());
        printer.print(*root, 1, 0);
        out += '\n';
    }
    printer.print_alias_targets();
    return out;
}

/// `info mtree` over every address space of `sys`, oldest first. Writer role.
inline std::string info_mtree(const memory_system& sys, const mtree_options& opt = {}) {
    std::vector<const address_space*> spaces;
    sys.for_each_address_space([&](const address_space& as) { spaces.push_back(&as); });
    return info_mtree(spaces, opt);
}

/// `info mtree` over every address space of the default memory system.
inline std::string info_mtree(const mtree_options& opt = {}) {
    return info_mtree(memory_system::default_system(), opt);
}

} // namespace qomem
