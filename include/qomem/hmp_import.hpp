// qomem/hmp_import.hpp — a fixture (fixture.hpp) made from QEMU's own text:
// `info mtree -D` (the tree), `info mtree -f` (the flat views), optionally
// `info mtree -o -D` (owners) and `info qom-tree`. Optional: needs
// nlohmann-json, like fixture.hpp.
//
//     qomem::hmp::import_texts in{.tree = tree_text, .flat = flat_text};
//     qomem::hmp::import_result r = qomem::hmp::import_mtree(in);
//     for (const auto& f : r.findings) fmt::print(stderr, "{}\n", f.message);
//     if (r.ok()) fmt::print("{}", r.spec.to_json());
//
// The tree text leaves things open, and each is settled by reasoning:
//  * Which region an alias targets when several share the target's name:
//    every alias target is printed once as a "memory-region:" block, in the
//    order QEMU first met an alias of it while printing, so the blocks and
//    the aliases in text order must agree (a queue walk); the target's type
//    is the alias's printed type; a target cannot contain its alias; and the
//    flat views must come out as QEMU printed them.
//  * Which printed regions are one region: a "memory-region:" block's root
//    is the region printed elsewhere with the same name, place and subtree,
//    when there is exactly one such (with -o, the same owners too).
//  * The order siblings of equal priority were added: at one address the
//    tree prints the most recently added first; where such siblings overlap
//    at different addresses the flat views show which one won.
//  * Container or terminating I/O region (both print "i/o"), 0 or 1 bytes
//    (both print "X-X"), readonly on aliases, containers and I/O regions (not
//    printed): chosen so that the flat views and the tree match QEMU's.
// Every choice starts from a default, the candidate fixture is built with
// this library and printed with its own `info mtree -f` and `-D`, and the
// choices near the lines that differ are changed, one or two at a time,
// while that brings the texts closer (a local search over a distance that
// weighs each piece of address space by what differs there; bounded by
// max_evaluations). readonly is tried on aliases first, and on containers
// and I/O regions only if that is not enough.
//
// What it reports (import_result::findings): errors, when the fixture does
// not reproduce the texts (ok() is then false), and notes, one per kind of
// choice, naming the regions whose choice no text settles — either way the
// texts come out the same, so the fixture reproduces them regardless (with
// `strict`, ok() treats notes as errors).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <iterator>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/core.h>

#include <qomem/fixture.hpp>
#include <qomem/hmp_text.hpp>
#include <qomem/mtree.hpp>

namespace qomem::hmp {

/// The texts to import. `tree` and `flat` are required.
struct import_texts {
    std::string_view tree{};          ///< `info mtree -D`
    std::string tree_source = "tree"; ///< names it in messages
    std::string_view flat{};          ///< `info mtree -f`
    std::string flat_source = "flat";
    std::optional<std::string_view> owners{}; ///< `info mtree -o -D` (or `-o`)
    std::string owners_source = "owners";
    std::optional<std::string_view> qom_tree{}; ///< `info qom-tree`
    std::string qom_source = "qom-tree";
    std::string machine{}; ///< the fixture's description (the command line)
};

struct import_options {
    /// Upper bound on candidate fixtures built and printed (the machines of
    /// tests/conformance need a few hundred).
    std::size_t max_evaluations = 4000;
    /// Notes count as failures in ok().
    bool strict = false;
};

struct import_finding {
    bool error = false; ///< else a note: a choice no text settles
    std::string message;
};

struct import_result {
    fixture_spec spec;
    std::vector<import_finding> findings;
    /// The fixture's `info mtree -f` and `-D` equal QEMU's (under the
    /// comparison rule of tests/conformance/README.md).
    bool reproduces = false;
    bool strict = false;
    std::size_t evaluations = 0;

    bool ok() const {
        if (!reproduces) return false;
        return std::none_of(findings.begin(), findings.end(),
                            [&](const import_finding& f) { return f.error || strict; });
    }
};

/// Imports the texts. Throws: hmp_error for text that is not QEMU's format,
/// or a tree and an owners text that do not describe the same regions.
import_result import_mtree(const import_texts& in, const import_options& opt = {});

namespace detail {

/// A multiset of lines keyed by the block they belong to: what the
/// comparison rule compares (the order of blocks and of their heading lines
/// does not matter).
struct keyed_lines {
    std::map<std::pair<std::string, std::string>, int> count;
    std::map<std::pair<std::string, std::string>, std::string> name; // region named by the line
};

inline std::string block_key(std::vector<std::string> heads, const std::string& extra) {
    std::sort(heads.begin(), heads.end());
    std::string key;
    for (const std::string& h : heads) key += h + "\n";
    return key + extra;
}

/// The flat views keyed by their AS lines: the heading lines (root line,
/// "No rendered FlatView") as keyed lines, and the ranges of each view.
struct keyed_flat {
    keyed_lines heads;
    keyed_lines lines;
    std::map<std::string, std::vector<mtree_flat_range>> ranges;
};

inline keyed_flat key_flat(const mtree_flat& f) {
    keyed_flat out;
    for (const mtree_flat_view& v : f.views) {
        std::vector<std::string> heads;
        for (const mtree_flat_space& s : v.spaces) heads.push_back(s.text);
        std::string key = block_key(heads, "");
        // Views with the same AS lines (possible only for nameless twins) stay apart.
        while (out.ranges.count(key)) key += "\n";
        auto add = [&](keyed_lines& kl, std::string line, const std::string& nm) {
            auto k = std::make_pair(key, std::move(line));
            ++kl.count[k];
            kl.name[k] = nm;
        };
        add(out.heads, " Root memory region: " + v.root, v.root);
        if (v.empty) add(out.heads, "  No rendered FlatView", v.root);
        for (std::size_t i = 0; i < v.ranges.size(); ++i)
            add(out.lines, v.ranges[i], v.parsed[i].name);
        out.ranges[key] = v.parsed;
    }
    return out;
}

/// How far apart two sets of flat views are, byte by byte: both range lists
/// are cut at every boundary of either, and each piece counts its length
/// times a weight for what covers it differently (region, offset, type,
/// priority). Unlike a line comparison this sees a change that fixes part
/// of a merged range, or part of what a range shows.
inline u128 flat_bytes_differing(const keyed_flat& want, const keyed_flat& got,
                                 std::vector<std::string>* names) {
    u128 diff = 0;
    static const std::vector<mtree_flat_range> none;
    std::set<std::string> keys;
    for (const auto& [k, r] : want.ranges) keys.insert(k);
    for (const auto& [k, r] : got.ranges) keys.insert(k);
    for (const std::string& k : keys) {
        auto wi = want.ranges.find(k);
        auto gi = got.ranges.find(k);
        const auto& w = wi == want.ranges.end() ? none : wi->second;
        const auto& g = gi == got.ranges.end() ? none : gi->second;
        std::vector<u128> cuts;
        for (const auto* list : {&w, &g})
            for (const mtree_flat_range& r : *list) {
                cuts.push_back(r.start);
                cuts.push_back(u128(r.end) + 1);
            }
        std::sort(cuts.begin(), cuts.end());
        cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
        std::size_t iw = 0, ig = 0;
        auto at = [](const std::vector<mtree_flat_range>& list, std::size_t& i,
                     u128 a) -> const mtree_flat_range* {
            while (i < list.size() && u128(list[i].end) < a) ++i;
            return i < list.size() && u128(list[i].start) <= a ? &list[i] : nullptr;
        };
        for (std::size_t c = 0; c + 1 < cuts.size(); ++c) {
            const u128 a = cuts[c];
            const mtree_flat_range* x = at(w, iw, a);
            const mtree_flat_range* y = at(g, ig, a);
            if (!x && !y) continue;
            // Weighted by what differs, so that a change getting one thing
            // right (the region shows, in the wrong type) counts as progress.
            unsigned weight = 8;
            if (x && y) {
                weight = 0;
                if (x->name != y->name) weight += 4;
                if (u128(x->offset) + (a - x->start) != u128(y->offset) + (a - y->start))
                    weight += 2;
                if (x->type != y->type) weight += 1;
                if (x->priority != y->priority) weight += 1;
                if (x->nonvolatile != y->nonvolatile) weight += 1;
            }
            if (weight == 0) continue;
            diff += (cuts[c + 1] - a) * weight;
            if (names) {
                if (x) names->push_back(x->name);
                if (y) names->push_back(y->name);
            }
        }
    }
    return diff;
}

inline keyed_lines key_tree(const mtree_tree& t) {
    keyed_lines out;
    for (std::size_t b = 0; b < t.blocks.size(); ++b) {
        const mtree_block& blk = t.blocks[b];
        std::vector<std::string> heads;
        for (const std::string& n : blk.names)
            heads.push_back((blk.address_space ? "address-space: " : "memory-region: ") + n);
        const std::string key = block_key(heads, t.lines[static_cast<std::size_t>(blk.root)].text);
        for (const mtree_line& l : t.lines) {
            if (l.block != b) continue;
            auto k = std::make_pair(key, l.text);
            ++out.count[k];
            out.name[k] = l.name;
        }
    }
    return out;
}

/// The lines in one multiset and not the other (counted), with their names.
inline int keyed_difference(const keyed_lines& expected, const keyed_lines& actual,
                            std::vector<std::string>* names, std::vector<std::string>* missing,
                            std::vector<std::string>* extra) {
    int diff = 0;
    auto walk = [&](const keyed_lines& a, const keyed_lines& b, std::vector<std::string>* out) {
        for (const auto& [k, n] : a.count) {
            auto it = b.count.find(k);
            const int other = it == b.count.end() ? 0 : it->second;
            if (n > other) {
                diff += n - other;
                if (names) names->push_back(a.name.at(k));
                if (out) out->push_back(k.second);
            }
        }
    };
    walk(expected, actual, missing);
    walk(actual, expected, extra);
    return diff;
}

class importer {
public:
    importer(const import_texts& in, const import_options& opt) : in_(in), opt_(opt) {}

    import_result run();

private:
    // ---- the region classes --------------------------------------------------------
    struct region_class {
        int rep = -1;                 // representative line (first in text order)
        std::vector<int> occurrences; // lines
        int container = -1;           // class
        std::vector<int> children;    // classes, in printed order
        int mr_block = -1;            // the memory-region block it is the root of
        bool open_kind = false;       // printed "i/o", not an alias: container or io
        bool open_size = false;       // printed "X-X": 0 or 1 byte
        std::vector<int> candidates;  // alias: candidate memory-region blocks
    };

    struct solution {
        std::vector<int> target;                   // per class: chosen mr block (aliases)
        std::vector<char> io;                      // per class: open kind chosen as io
        std::vector<char> one_byte;                // per class: open size chosen as 1
        std::vector<char> readonly;                // per class
        std::map<std::pair<int, int>, char> later; // overlapping pair (a<b): 1 = b added after a
    };

    struct score {
        // Compared in this order: lines of the tree and flat-view headings
        // that differ, bytes of flat views that differ, range lines that differ.
        long structure = 0;
        u128 bytes = 0;
        long lines = 0;
        bool zero() const { return structure == 0 && bytes == 0 && lines == 0; }
        bool operator<(const score& o) const {
            if (structure != o.structure) return structure < o.structure;
            if (bytes != o.bytes) return bytes < o.bytes;
            return lines < o.lines;
        }
        std::vector<std::string> names; // regions named by differing lines
        std::vector<std::string> flat_missing, flat_extra, tree_missing, tree_extra;
        std::string failure; // why the build failed
    };

    enum class choice_kind { target, kind, size, readonly, order };
    struct choice {
        choice_kind what;
        int cls;
        int other = -1; // order: the other class; key (min, max)
    };

    const mtree_line& line(int i) const { return tree_.lines[static_cast<std::size_t>(i)]; }
    const region_class& cls(int c) const { return classes_[static_cast<std::size_t>(c)]; }
    region_class& cls(int c) { return classes_[static_cast<std::size_t>(c)]; }
    int class_of(int l) const { return line_class_[static_cast<std::size_t>(l)]; }
    const mtree_line& rep(int c) const { return line(cls(c).rep); }
    int block_class(int b) const {
        return class_of(tree_.blocks[static_cast<std::size_t>(b)].root);
    }
    std::string where(int c) const {
        return fmt::format("'{}' ({}:{})", rep(c).name, tree_.source, rep(c).line_no);
    }
    std::string block_where(int b) const {
        return fmt::format("{}:{}", tree_.source,
                           tree_.blocks[static_cast<std::size_t>(b)].line_no);
    }

    void read_texts();
    void attach_owners(const mtree_tree& owners);
    void resolve_alias_splits();
    void hash_lines();
    bool same_shape(int a, int b) const;
    void unify();
    void build_classes();
    void find_candidates();
    bool contains(int outer, int inner) const;
    solution default_solution();
    bool assign_targets(solution& sol, const std::vector<int>& preferred, int fixed_class,
                        int fixed_block);
    std::vector<int> add_order(const solution& sol, int container_class, bool& ok) const;
    fixture_spec make_spec(const solution& sol, bool with_owners, bool& ok) const;
    score evaluate(const solution& sol);
    std::vector<choice> all_choices() const;
    std::vector<choice> choices_near(const std::vector<std::string>& names) const;
    std::vector<solution> alternatives(const solution& sol, const choice& c);
    void search(solution& sol, score& best);
    bool merge_change(solution& into, const solution& base, const solution& changed) const;
    void report_unsettled(const solution& sol);
    void report_mismatch(const score& s);
    bool same_address_spaces();
    std::vector<char> visible_classes() const;
    void note(std::string text) { result_.findings.push_back({false, std::move(text)}); }
    void fail(std::string text) { result_.findings.push_back({true, std::move(text)}); }

    const import_texts& in_;
    const import_options& opt_;
    mtree_tree tree_;
    mtree_flat flat_;
    std::optional<qom_tree_text> qom_;
    keyed_flat want_flat_;
    keyed_lines want_tree_;
    std::vector<std::size_t> hash_; // per line: shape hash
    std::vector<int> uf_;           // union-find over lines
    std::vector<int> line_class_;
    std::vector<region_class> classes_;
    std::vector<std::pair<int, int>> overlaps_; // overlapping equal-priority siblings (a<b)
    std::vector<std::string> identity_notes_;
    bool wide_readonly_ = false; // readonly choices on containers and I/O regions too
    import_result result_;

    int find(int x) {
        while (uf_[static_cast<std::size_t>(x)] != x) {
            uf_[static_cast<std::size_t>(x)] =
                uf_[static_cast<std::size_t>(uf_[static_cast<std::size_t>(x)])];
            x = uf_[static_cast<std::size_t>(x)];
        }
        return x;
    }
    void unite_lines(int a, int b) {
        a = find(a);
        b = find(b);
        if (a != b) uf_[static_cast<std::size_t>(std::max(a, b))] = std::min(a, b);
    }
};

// ---- reading ----------------------------------------------------------------------------

inline void importer::read_texts() {
    tree_ = read_mtree_tree(in_.tree, in_.tree_source);
    flat_ = read_mtree_flat(in_.flat, in_.flat_source);
    if (in_.owners) attach_owners(read_mtree_tree(*in_.owners, in_.owners_source, true));
    if (in_.qom_tree) qom_ = read_qom_tree(*in_.qom_tree, in_.qom_source);
    want_flat_ = key_flat(flat_);
    want_tree_ = key_tree(tree_);
}

/// Gives each tree line the -o annotation of the same line of the owners
/// text: its blocks are matched by heading, its lines in order (a text
/// without -D lacks the disabled lines, which then keep no owner).
inline void importer::attach_owners(const mtree_tree& o) {
    std::vector<char> used(o.blocks.size(), 0);
    for (std::size_t b = 0; b < tree_.blocks.size(); ++b) {
        const mtree_block& tb = tree_.blocks[b];
        std::size_t ob = o.blocks.size();
        for (std::size_t k = 0; k < o.blocks.size(); ++k)
            if (!used[k] && o.blocks[k].names == tb.names &&
                o.blocks[k].address_space == tb.address_space &&
                o.lines[static_cast<std::size_t>(o.blocks[k].root)].text ==
                    tree_.lines[static_cast<std::size_t>(tb.root)].text) {
                ob = k;
                break;
            }
        if (ob == o.blocks.size())
            throw hmp_error(fmt::format("{}: block \"{}\" at {}:{} is not in the owners text",
                                        o.source, tb.names.front(), tree_.source, tb.line_no));
        used[ob] = 1;
        std::vector<std::size_t> olines;
        for (std::size_t i = 0; i < o.lines.size(); ++i)
            if (o.lines[i].block == ob) olines.push_back(i);
        std::size_t j = 0;
        for (mtree_line& l : tree_.lines) {
            if (l.block != b) continue;
            if (j < olines.size() && o.lines[olines[j]].text == l.text) {
                l.owner = o.lines[olines[j]].owner;
                ++j;
            }
        }
        if (j != olines.size())
            throw hmp_error(fmt::format("{}:{}: line \"{}\" is not in block \"{}\" of {}", o.source,
                                        o.lines[olines[j]].line_no, o.lines[olines[j]].text,
                                        tb.names.front(), tree_.source));
    }
    tree_.with_owners = true;
}

/// An alias line whose names contain " @" reads several ways; the target is
/// the name of a memory-region block.
inline void importer::resolve_alias_splits() {
    std::set<std::string> targets;
    for (const mtree_block& b : tree_.blocks)
        if (!b.address_space) targets.insert(b.names.front());
    for (mtree_line& l : tree_.lines) {
        if (!l.is_alias || l.alias_splits.size() < 2) continue;
        for (const auto& [n, t] : l.alias_splits)
            if (targets.count(t)) {
                l.name = n;
                l.target = t;
                break;
            }
    }
}

// ---- which printed lines are one region ---------------------------------------------------

inline void importer::hash_lines() {
    hash_.assign(tree_.lines.size(), 0);
    for (std::size_t i = tree_.lines.size(); i-- > 0;) {
        const mtree_line& l = tree_.lines[i];
        const hwaddr addr = l.parent < 0
                                ? l.start
                                : l.start - tree_.lines[static_cast<std::size_t>(l.parent)].start;
        std::string owner;
        if (l.owner) {
            if (l.owner->owner)
                owner +=
                    l.owner->owner->id + "|" + l.owner->owner->path + "|" + l.owner->owner->type;
            if (l.owner->parent) owner += "^" + l.owner->parent->path;
            if (l.owner->orphan) owner += "orphan";
        }
        std::string s =
            fmt::format("{}\x1f{}\x1f{}\x1f{}\x1f{}\x1f{}\x1f{}\x1f{:x}\x1f{:x}\x1f{:x}\x1f{}",
                        l.name, l.is_alias, l.target, l.type, l.nonvolatile, l.priority, l.disabled,
                        l.end - l.start, l.alias_start, addr, owner);
        for (int c : l.children) s += fmt::format("\x1e{:x}", hash_[static_cast<std::size_t>(c)]);
        hash_[i] = std::hash<std::string>{}(s);
    }
}

inline bool importer::same_shape(int a, int b) const {
    const mtree_line& x = line(a);
    const mtree_line& y = line(b);
    if (hash_[static_cast<std::size_t>(a)] != hash_[static_cast<std::size_t>(b)]) return false;
    const hwaddr ax = x.parent < 0 ? x.start : x.start - line(x.parent).start;
    const hwaddr ay = y.parent < 0 ? y.start : y.start - line(y.parent).start;
    if (x.name != y.name || x.is_alias != y.is_alias || x.target != y.target || x.type != y.type ||
        x.nonvolatile != y.nonvolatile || x.priority != y.priority || x.disabled != y.disabled ||
        x.end - x.start != y.end - y.start || x.alias_start != y.alias_start || ax != ay ||
        x.owner != y.owner || x.children.size() != y.children.size())
        return false;
    for (std::size_t i = 0; i < x.children.size(); ++i)
        if (!same_shape(x.children[i], y.children[i])) return false;
    return true;
}

/// Each block root is the region printed elsewhere with the same shape when
/// there is one such region; settled ones first, so that a region printed
/// twice (inside a container that is itself printed twice) counts once.
inline void importer::unify() {
    const std::size_t n = tree_.lines.size();
    uf_.resize(n);
    for (std::size_t i = 0; i < n; ++i) uf_[i] = static_cast<int>(i);
    std::map<std::size_t, std::vector<int>> by_hash;
    for (std::size_t i = 0; i < n; ++i) by_hash[hash_[i]].push_back(static_cast<int>(i));
    std::function<void(int, int)> unite_tree = [&](int a, int b) {
        unite_lines(a, b);
        for (std::size_t k = 0; k < line(a).children.size(); ++k)
            unite_tree(line(a).children[k], line(b).children[k]);
    };
    // Distinct blocks of one kind are distinct regions: a class may hold at
    // most one memory-region root and one address-space root.
    auto roots_in = [&](int c, bool as) {
        int count = 0;
        for (const mtree_block& blk : tree_.blocks)
            if (blk.address_space == as && find(blk.root) == find(c)) ++count;
        return count;
    };
    std::vector<char> done(tree_.blocks.size(), 0);
    // One pass over the unsettled blocks; with `settle_one`, the first block
    // with several candidates takes the first of them. True if a block changed.
    auto pass = [&](bool settle_one) {
        bool changed = false;
        for (std::size_t b = 0; b < tree_.blocks.size(); ++b) {
            if (done[b]) continue;
            const mtree_block& blk = tree_.blocks[b];
            const int r = blk.root;
            std::vector<int> cands; // one line per candidate class, in text order
            for (int o : by_hash[hash_[static_cast<std::size_t>(r)]]) {
                if (find(o) == find(r) || !same_shape(o, r)) continue;
                if (roots_in(o, blk.address_space) > 0) continue;
                if (std::none_of(cands.begin(), cands.end(),
                                 [&](int c) { return find(c) == find(o); }))
                    cands.push_back(o);
            }
            if (cands.empty()) {
                done[b] = 1;
                continue;
            }
            if (cands.size() > 1) {
                if (!settle_one) continue;
                std::string lines;
                for (int c : cands)
                    lines += fmt::format("{}{}", lines.empty() ? "" : ", ", line(c).line_no);
                identity_notes_.push_back(fmt::format(
                    "{} block '{}' ({}) looks like {} regions printed elsewhere (lines {}); took "
                    "the one at line {}",
                    blk.address_space ? "address-space" : "memory-region", line(r).name,
                    block_where(static_cast<int>(b)), cands.size(), lines,
                    line(cands.front()).line_no));
            }
            unite_tree(cands.front(), r);
            done[b] = 1;
            changed = true;
            if (settle_one) return true;
        }
        return changed;
    };
    do {
        while (pass(false)) {
        }
    } while (pass(true));
}

inline void importer::build_classes() {
    const std::size_t n = tree_.lines.size();
    std::map<int, int> class_of_root;
    line_class_.assign(n, -1);
    for (std::size_t i = 0; i < n; ++i) {
        const int r = find(static_cast<int>(i));
        auto [it, fresh] = class_of_root.emplace(r, static_cast<int>(classes_.size()));
        if (fresh) classes_.push_back({});
        line_class_[i] = it->second;
        classes_[static_cast<std::size_t>(it->second)].occurrences.push_back(static_cast<int>(i));
    }
    for (std::size_t c = 0; c < classes_.size(); ++c) {
        region_class& k = classes_[c];
        k.rep = k.occurrences.front();
        for (int o : k.occurrences) {
            const mtree_line& l = line(o);
            if (l.parent >= 0) {
                const int pc = class_of(l.parent);
                if (k.container >= 0 && k.container != pc)
                    throw hmp_error(fmt::format(
                        "{}:{}: region '{}' is printed inside '{}' here and inside '{}' at line {}",
                        tree_.source, l.line_no, l.name, rep(pc).name, rep(k.container).name,
                        line(k.occurrences.front()).line_no));
                k.container = pc;
            } else if (!tree_.blocks[l.block].address_space) {
                k.mr_block = static_cast<int>(l.block);
            }
        }
        // Prefer an occurrence inside a container as the representative: its
        // address is relative to the container.
        for (int o : k.occurrences)
            if (line(o).parent >= 0) {
                k.rep = o;
                break;
            }
        const mtree_line& r = line(k.rep);
        for (int ch : r.children) k.children.push_back(class_of(ch));
        k.open_kind = !r.is_alias && r.type == "i/o";
        k.open_size = r.start == r.end;
    }
    // Siblings of equal priority that overlap at different addresses: the
    // flat views must tell which was added last. (An "X-X" region counts as
    // one byte here.)
    for (std::size_t c = 0; c < classes_.size(); ++c) {
        const region_class& k = classes_[c];
        for (std::size_t i = 0; i < k.children.size(); ++i)
            for (std::size_t j = i + 1; j < k.children.size(); ++j) {
                const mtree_line& a = rep(k.children[i]);
                const mtree_line& b = rep(k.children[j]);
                if (a.priority != b.priority || a.start == b.start || a.overflow || b.overflow)
                    continue;
                if (std::max(a.start, b.start) <= std::min(a.end, b.end))
                    overlaps_.emplace_back(std::min(k.children[i], k.children[j]),
                                           std::max(k.children[i], k.children[j]));
            }
    }
}

// ---- alias targets --------------------------------------------------------------------------

/// True if region class `outer` is `inner` or one of its containers.
inline bool importer::contains(int outer, int inner) const {
    for (int x = inner; x >= 0; x = cls(x).container)
        if (x == outer) return true;
    return false;
}

inline void importer::find_candidates() {
    for (std::size_t c = 0; c < classes_.size(); ++c) {
        region_class& k = classes_[c];
        const mtree_line& r = line(k.rep);
        if (!r.is_alias) continue;
        for (std::size_t b = 0; b < tree_.blocks.size(); ++b) {
            const mtree_block& blk = tree_.blocks[b];
            if (blk.address_space || blk.names.front() != r.target) continue;
            if (line(blk.root).type != r.type) continue; // an alias prints its target's type
            k.candidates.push_back(static_cast<int>(b));
        }
        // A target that contains its alias comes last: QEMU allows it (the
        // rendering is clipped), this library refuses a cycle of regions.
        std::stable_partition(k.candidates.begin(), k.candidates.end(), [&](int b) {
            return !contains(block_class(b), static_cast<int>(c));
        });
        if (k.candidates.empty())
            fail(fmt::format("alias {} targets '{}', but no memory-region block of that name has "
                             "type {}",
                             where(static_cast<int>(c)), r.target, r.type));
        else if (contains(block_class(k.candidates.front()), static_cast<int>(c)))
            fail(fmt::format("alias {} targets '{}', which contains it: QEMU renders such an alias "
                             "(clipped), but qomem refuses a cycle of regions, so this machine "
                             "cannot be a fixture",
                             where(static_cast<int>(c)), r.target));
    }
}

/// Chooses a target block for every alias so that QEMU's queue walk prints
/// the memory-region blocks in the text's order. Each alias tries
/// `preferred` first (when set), then a block with the same owner, then the
/// blocks queued already (latest first), then the next block.
/// `fixed_class` (when >= 0) must take `fixed_block`. Returns false when no
/// assignment fits.
inline bool importer::assign_targets(solution& sol, const std::vector<int>& preferred,
                                     int fixed_class, int fixed_block) {
    const int nblocks = static_cast<int>(tree_.blocks.size());
    // Events in text order: the first line of each alias class, and each
    // memory-region block's heading (its block must be queued by then).
    struct event {
        std::size_t line_no;
        int alias_class; // or -1
        int block;       // for a heading
    };
    std::vector<event> events;
    std::vector<char> seen(classes_.size(), 0);
    for (std::size_t i = 0; i < tree_.lines.size(); ++i) {
        const int c = line_class_[i];
        if (!tree_.lines[i].is_alias || seen[static_cast<std::size_t>(c)]) continue;
        seen[static_cast<std::size_t>(c)] = 1;
        events.push_back({tree_.lines[i].line_no, c, -1});
    }
    std::vector<int> mr_order; // memory-region blocks in text order
    for (int b = 0; b < nblocks; ++b)
        if (!tree_.blocks[static_cast<std::size_t>(b)].address_space) {
            events.push_back({tree_.blocks[static_cast<std::size_t>(b)].line_no, -1, b});
            mr_order.push_back(b);
        }
    std::stable_sort(events.begin(), events.end(),
                     [](const event& a, const event& b) { return a.line_no < b.line_no; });
    const int nmr = static_cast<int>(mr_order.size());
    std::vector<int> rank(static_cast<std::size_t>(nblocks), -1); // queue position of each mr block
    for (int i = 0; i < nmr; ++i)
        rank[static_cast<std::size_t>(mr_order[static_cast<std::size_t>(i)])] = i;

    auto options_of = [&](int c) -> const std::vector<int>& { return cls(c).candidates; };
    auto can_take = [&](int c, int qpos) {
        if (c == fixed_class) return rank[static_cast<std::size_t>(fixed_block)] == qpos;
        for (int b : options_of(c))
            if (rank[static_cast<std::size_t>(b)] == qpos) return true;
        return false;
    };
    // Can blocks queued..nmr-1 still be introduced by the events from e on?
    auto feasible = [&](std::size_t e, int queued) {
        int k = queued;
        for (std::size_t i = e; i < events.size(); ++i) {
            const event& ev = events[i];
            if (ev.alias_class >= 0) {
                if (k < nmr && can_take(ev.alias_class, k)) ++k;
            } else if (rank[static_cast<std::size_t>(ev.block)] >= k) {
                return false;
            }
        }
        return k == nmr;
    };
    std::vector<int> chosen(classes_.size(), -1);
    std::size_t steps = 0;
    std::function<bool(std::size_t, int)> dfs = [&](std::size_t e, int queued) -> bool {
        if (++steps > 200000) return false;
        if (e == events.size()) return queued == nmr;
        const event& ev = events[e];
        if (ev.alias_class < 0) {
            if (rank[static_cast<std::size_t>(ev.block)] >= queued) return false;
            return dfs(e + 1, queued);
        }
        const int c = ev.alias_class;
        std::vector<int> opts;
        if (c == fixed_class) {
            opts.push_back(fixed_block);
        } else {
            const std::vector<int>& cand = options_of(c);
            auto push = [&](int b) {
                if (std::find(cand.begin(), cand.end(), b) != cand.end() &&
                    std::find(opts.begin(), opts.end(), b) == opts.end())
                    opts.push_back(b);
            };
            if (!preferred.empty() && preferred[static_cast<std::size_t>(c)] >= 0)
                push(preferred[static_cast<std::size_t>(c)]);
            const mtree_line& al = rep(c);
            if (al.owner && al.owner->owner)
                for (int b : cand)
                    if (rep(block_class(b)).owner &&
                        rep(block_class(b)).owner->owner == al.owner->owner)
                        push(b);
            for (int q = queued - 1; q >= 0; --q) {
                const int b = mr_order[static_cast<std::size_t>(q)];
                if (!contains(block_class(b), c)) push(b);
            }
            if (queued < nmr) push(mr_order[static_cast<std::size_t>(queued)]);
            for (int b : cand) push(b); // what is left: targets containing the alias
        }
        for (int b : opts) {
            const int r = rank[static_cast<std::size_t>(b)];
            if (r > queued) continue; // only the next block can be queued now
            const int q2 = r == queued ? queued + 1 : queued;
            if (!feasible(e + 1, q2)) continue;
            chosen[static_cast<std::size_t>(c)] = b;
            if (dfs(e + 1, q2)) return true;
        }
        chosen[static_cast<std::size_t>(c)] = -1;
        return false;
    };
    if (!dfs(0, 0)) return false;
    for (std::size_t c = 0; c < classes_.size(); ++c)
        if (line(classes_[c].rep).is_alias) sol.target[c] = chosen[c];
    return true;
}

inline importer::solution importer::default_solution() {
    solution s;
    const std::size_t n = classes_.size();
    s.target.assign(n, -1);
    s.io.assign(n, 0);
    s.one_byte.assign(n, 0);
    s.readonly.assign(n, 0);
    // A terminating region shows in the flat views under its own name (unless
    // covered); a container never does. So a region whose name shows starts
    // as I/O, and one that could show but does not as a container. One that
    // cannot show — disabled, unreachable, or covered by subregions that
    // terminate (RAM, or I/O whose names show) — is settled by no text: a
    // childless region inside a container is most often a device's MMIO
    // (which a user may give ops), one with subregions (a virtio-pci BAR
    // full of capabilities) or none around it a container.
    std::set<std::string> shown;
    for (const mtree_flat_view& v : flat_.views)
        for (const mtree_flat_range& fr : v.parsed) shown.insert(fr.name);
    auto terminates = [&](const mtree_line& x) {
        return !x.disabled && !x.is_alias &&
               (x.type == "i/o" ? shown.count(x.name) != 0 : x.type != "container");
    };
    auto covered = [&](const mtree_line& r) {
        std::vector<std::pair<u128, u128>> parts; // [start, end + 1)
        for (int ch : r.children)
            if (terminates(line(ch))) parts.emplace_back(line(ch).start, u128(line(ch).end) + 1);
        std::sort(parts.begin(), parts.end());
        u128 next = r.start; // the first byte not covered yet
        for (const auto& [from, to] : parts) {
            if (from > next) break;
            next = std::max(next, to);
        }
        return next > u128(r.end);
    };
    const std::vector<char> visible = visible_classes();
    for (std::size_t c = 0; c < n; ++c) {
        const region_class& k = classes_[c];
        const mtree_line& r = line(k.rep);
        if (k.open_kind)
            s.io[c] = visible[c] && !covered(r) ? shown.count(r.name) != 0
                                                : k.children.empty() && k.container >= 0;
        // An "X-X" alias is most often an unprogrammed window (0 bytes); an
        // "X-X" I/O region a one-byte port.
        if (k.open_size) s.one_byte[c] = !r.is_alias;
    }
    for (const auto& p : overlaps_) s.later[p] = 0;
    if (!assign_targets(s, {}, -1, -1))
        fail(fmt::format("no choice of alias targets prints the memory-region blocks in the order "
                         "{} has them",
                         tree_.source));
    return s;
}

/// The order to add the subregions of `container_class`: at one address the
/// tree prints the most recently added first; overlapping pairs at different
/// addresses follow the solution; the rest follows reverse printed order.
inline std::vector<int> importer::add_order(const solution& sol, int container_class,
                                            bool& ok) const {
    const std::vector<int>& ch = cls(container_class).children;
    const std::size_t n = ch.size();
    std::vector<std::vector<std::size_t>> after(n); // edges i -> j: i added before j
    std::vector<int> indeg(n, 0);
    auto edge = [&](std::size_t i, std::size_t j) {
        after[i].push_back(j);
        ++indeg[j];
    };
    for (std::size_t i = 0; i + 1 < n; ++i) {
        const mtree_line& a = rep(ch[i]);
        const mtree_line& b = rep(ch[i + 1]);
        if (a.start == b.start && a.priority == b.priority)
            edge(i + 1, i); // printed later: added earlier
    }
    for (std::size_t i = 0; i < n; ++i)
        for (std::size_t j = 0; j < n; ++j) {
            auto it = sol.later.find({ch[i], ch[j]});
            if (it == sol.later.end() || i == j) continue;
            if (it->second)
                edge(i, j); // ch[j] added after ch[i]
            else
                edge(j, i);
        }
    // Kahn's algorithm, preferring reverse printed order.
    std::vector<int> out;
    std::vector<char> done(n, 0);
    for (std::size_t step = 0; step < n; ++step) {
        std::size_t pick = n;
        for (std::size_t i = n; i-- > 0;)
            if (!done[i] && indeg[i] == 0) {
                pick = i;
                break;
            }
        if (pick == n) {
            ok = false;
            return {};
        }
        done[pick] = 1;
        out.push_back(ch[pick]);
        for (std::size_t j : after[pick]) --indeg[j];
    }
    return out;
}

inline fixture_spec importer::make_spec(const solution& sol, bool with_owners, bool& ok) const {
    fixture_spec spec;
    spec.machine = in_.machine;
    const std::size_t n = classes_.size();
    std::vector<int> order;
    std::vector<std::size_t> id(n, 0);
    std::vector<char> placed(n, 0);
    std::function<void(int)> place = [&](int c) {
        placed[static_cast<std::size_t>(c)] = 1;
        id[static_cast<std::size_t>(c)] = order.size();
        order.push_back(c);
        if (cls(c).children.empty()) return;
        for (int ch : add_order(sol, c, ok)) place(ch);
    };
    for (std::size_t i = 0; i < tree_.lines.size(); ++i) {
        const int c = line_class_[i];
        if (cls(c).container < 0 && !placed[static_cast<std::size_t>(c)]) place(c);
    }
    if (!ok) return spec;
    std::map<std::string, fixture_owner> owners;
    auto owner_path = [&](const mtree_object_ref& r) -> std::string {
        if (!r.path.empty()) return r.path;
        if (!r.id.empty()) return "/machine/peripheral/" + r.id;
        return {};
    };
    // The machine's own containers exist already: a region "owned" by one is
    // made ownerless with that container as its home.
    auto fixed = [](const std::string& p) {
        return p == "/machine/unattached" || p == "/machine/peripheral" ||
               p == "/machine/peripheral-anon";
    };
    auto add_owner = [&](const mtree_object_ref& r) -> std::string {
        std::string p = owner_path(r);
        if (p.empty() || fixed(p)) return p;
        fixture_owner& o = owners[p];
        o.path = p;
        o.device = r.device && p != "/machine";
        if (!r.id.empty()) o.id = r.id;
        if (qom_)
            if (auto it = qom_->types.find(p); it != qom_->types.end()) o.type = it->second;
        return p;
    };
    for (int c : order) {
        const region_class& k = cls(c);
        const mtree_line& r = line(k.rep);
        fixture_region s;
        s.name = r.name;
        if (r.is_alias)
            s.kind = region_kind::alias;
        else if (r.type == "ram")
            s.kind = region_kind::ram;
        else if (r.type == "rom")
            s.kind = region_kind::rom;
        else if (r.type == "romd")
            s.kind = region_kind::rom_device;
        else if (r.type == "ramd")
            s.kind = region_kind::ram_device;
        else if (r.type == "container")
            s.kind = region_kind::container;
        else
            s.kind = sol.io[static_cast<std::size_t>(c)] ? region_kind::io : region_kind::container;
        if (k.open_size)
            s.size = sol.one_byte[static_cast<std::size_t>(c)] ? 1 : 0;
        else if (r.end - r.start == ~hwaddr(0))
            s.size = u128_2_64;
        else
            s.size = u128(r.end - r.start) + 1;
        if (k.container >= 0) {
            s.parent = id[static_cast<std::size_t>(k.container)];
            s.addr = r.start - line(r.parent).start;
        } else {
            s.addr = r.start;
        }
        s.priority = r.priority;
        if (r.is_alias) {
            const int b = sol.target[static_cast<std::size_t>(c)];
            if (b < 0) {
                ok = false;
                return spec;
            }
            s.alias = id[static_cast<std::size_t>(block_class(b))];
            s.alias_offset = r.alias_start;
        }
        s.enabled = !r.disabled;
        s.nonvolatile = r.nonvolatile;
        s.readonly = sol.readonly[static_cast<std::size_t>(c)] != 0;
        if (with_owners && r.owner) {
            const mtree_owner_info& oi = *r.owner;
            if (oi.owner && owner_path(*oi.owner) == "/machine/fixture") {
                // printed from a fixture without owners: its board
            } else if (oi.owner && !owner_path(*oi.owner).empty()) {
                const std::string p = add_owner(*oi.owner);
                s.ownership = fixed(p) ? fixture_ownership::none : fixture_ownership::owner;
                (fixed(p) ? s.home : s.owner) = p;
            } else if (!oi.owner && oi.parent) {
                s.ownership = fixture_ownership::none;
                s.home = add_owner(*oi.parent);
            } else if (oi.orphan) {
                s.ownership = fixture_ownership::none;
            }
        }
        spec.regions.push_back(std::move(s));
    }
    for (auto& [p, o] : owners) spec.owners.push_back(std::move(o));
    // Address spaces: in the order the flat views list them (QEMU's creation
    // order within a view), then any others in tree order.
    std::vector<std::pair<std::string, int>> spaces; // name, class
    for (const mtree_block& blk : tree_.blocks)
        if (blk.address_space)
            for (const std::string& nm : blk.names) spaces.emplace_back(nm, class_of(blk.root));
    std::vector<char> taken(spaces.size(), 0);
    for (const mtree_flat_view& v : flat_.views)
        for (const mtree_flat_space& fs : v.spaces)
            for (std::size_t i = 0; i < spaces.size(); ++i)
                if (!taken[i] && spaces[i].first == fs.name &&
                    rep(spaces[i].second).name == fs.root) {
                    taken[i] = 1;
                    spec.address_spaces.push_back(
                        {spaces[i].first, id[static_cast<std::size_t>(spaces[i].second)]});
                    break;
                }
    for (std::size_t i = 0; i < spaces.size(); ++i)
        if (!taken[i])
            spec.address_spaces.push_back(
                {spaces[i].first, id[static_cast<std::size_t>(spaces[i].second)]});
    return spec;
}

// ---- judging a candidate ------------------------------------------------------------------------

inline importer::score importer::evaluate(const solution& sol) {
    ++result_.evaluations;
    score s;
    bool ok = true;
    const fixture_spec spec = make_spec(sol, false, ok);
    if (!ok) {
        s.structure = 1L << 40;
        s.failure = "the choices of add order contradict each other";
        return s;
    }
    std::string flat_text, tree_text;
    try {
        auto m = fixture_machine::build(spec, "import");
        flat_text = info_mtree(m->spaces(), {.flatview = true});
        tree_text = info_mtree(m->spaces(), {.disabled = true});
    } catch (const error& e) {
        s.structure = 1L << 40;
        s.failure = e.what();
        return s;
    }
    const keyed_flat got_flat = key_flat(read_mtree_flat(flat_text, "qomem -f"));
    const keyed_lines got_tree = key_tree(read_mtree_tree(tree_text, "qomem -D"));
    s.structure = keyed_difference(want_flat_.heads, got_flat.heads, &s.names, &s.flat_missing,
                                   &s.flat_extra) +
                  keyed_difference(want_tree_, got_tree, &s.names, &s.tree_missing, &s.tree_extra);
    s.bytes = flat_bytes_differing(want_flat_, got_flat, &s.names);
    s.lines =
        keyed_difference(want_flat_.lines, got_flat.lines, nullptr, &s.flat_missing, &s.flat_extra);
    return s;
}

inline std::vector<importer::choice> importer::all_choices() const {
    std::vector<choice> out;
    for (std::size_t i = 0; i < classes_.size(); ++i) {
        const int c = static_cast<int>(i);
        const region_class& k = classes_[i];
        const mtree_line& r = line(k.rep);
        if (r.is_alias && k.candidates.size() > 1) out.push_back({choice_kind::target, c});
        if (k.open_kind) out.push_back({choice_kind::kind, c});
        if (k.open_size) out.push_back({choice_kind::size, c});
        // readonly: QEMU sets it on aliases (and on RAM, which prints it);
        // on containers and I/O regions only when nothing else will do.
        if (r.is_alias || (wide_readonly_ && r.type != "ram" && r.type != "rom" &&
                           r.type != "ramd" && r.type != "romd"))
            out.push_back({choice_kind::readonly, c});
    }
    for (const auto& [a, b] : overlaps_) out.push_back({choice_kind::order, a, b});
    return out;
}

/// The choices that can change lines naming `names`: those of the regions
/// with these names, of their containers (up to the roots), of aliases that
/// may lead to any of these, and so on.
inline std::vector<importer::choice>
importer::choices_near(const std::vector<std::string>& names) const {
    std::set<std::string> wanted(names.begin(), names.end());
    const std::size_t n = classes_.size();
    std::vector<char> near(n, 0);
    std::vector<int> work;
    for (std::size_t c = 0; c < n; ++c)
        if (wanted.count(line(classes_[c].rep).name))
            near[c] = 1, work.push_back(static_cast<int>(c));
    std::vector<std::vector<int>> users(n); // class -> aliases that may target it
    for (std::size_t c = 0; c < n; ++c)
        for (int b : classes_[c].candidates)
            users[static_cast<std::size_t>(block_class(b))].push_back(static_cast<int>(c));
    // What lies over a named region can hide it: its subregions, theirs, ...,
    // and its siblings (which it may hide in turn).
    for (int c : std::vector<int>(work))
        if (cls(c).container >= 0)
            for (int sib : cls(cls(c).container).children)
                if (!near[static_cast<std::size_t>(sib)])
                    near[static_cast<std::size_t>(sib)] = 1, work.push_back(sib);
    for (std::vector<int> down(work); !down.empty();) {
        const int c = down.back();
        down.pop_back();
        for (int ch : cls(c).children)
            if (!near[static_cast<std::size_t>(ch)])
                near[static_cast<std::size_t>(ch)] = 1, down.push_back(ch);
    }
    while (!work.empty()) {
        const int c = work.back();
        work.pop_back();
        auto visit = [&](int x) {
            if (x >= 0 && !near[static_cast<std::size_t>(x)])
                near[static_cast<std::size_t>(x)] = 1, work.push_back(x);
        };
        visit(cls(c).container);
        for (int u : users[static_cast<std::size_t>(c)]) visit(u);
    }
    std::vector<choice> out;
    for (const choice& ch : all_choices()) {
        if (ch.what == choice_kind::order) {
            if (near[static_cast<std::size_t>(ch.cls)] || near[static_cast<std::size_t>(ch.other)])
                out.push_back(ch);
        } else if (near[static_cast<std::size_t>(ch.cls)]) {
            out.push_back(ch);
        }
    }
    return out;
}

inline std::vector<importer::solution> importer::alternatives(const solution& sol,
                                                              const choice& c) {
    std::vector<solution> out;
    const std::size_t i = static_cast<std::size_t>(c.cls);
    switch (c.what) {
    case choice_kind::target:
        for (int b : cls(c.cls).candidates) {
            if (b == sol.target[i]) continue;
            solution s = sol;
            if (assign_targets(s, sol.target, c.cls, b)) out.push_back(std::move(s));
        }
        break;
    case choice_kind::kind:
        out.push_back(sol);
        out.back().io[i] = !sol.io[i];
        break;
    case choice_kind::size:
        out.push_back(sol);
        out.back().one_byte[i] = !sol.one_byte[i];
        break;
    case choice_kind::readonly:
        out.push_back(sol);
        out.back().readonly[i] = !sol.readonly[i];
        break;
    case choice_kind::order: {
        out.push_back(sol);
        char& v = out.back().later[{c.cls, c.other}];
        v = !v;
        break;
    }
    }
    return out;
}

/// Local search: one choice at a time among those near the differing
/// lines; when none helps, two at a time among those (a region's kind and
/// its rank can matter only together); then one at a time among all. Ends
/// when the texts match, nothing helps, or the budget of evaluations is
/// spent.
inline void importer::search(solution& sol, score& best) {
    auto budget_left = [&] { return result_.evaluations < opt_.max_evaluations; };
    // Every single change is judged from the same state; then the ones that
    // helped are applied together, best first, each kept only if the texts
    // still come closer (many independent fixes, e.g. one readonly alias per
    // PAM segment, cost one pass). Taking the best rather than the first
    // improvement avoids corners that only two changes at once get out of.
    auto try_one = [&](const std::vector<choice>& cand) {
        std::vector<std::pair<score, solution>> better;
        for (const choice& ch : cand)
            for (solution& alt : alternatives(sol, ch)) {
                if (!budget_left()) break;
                score s = evaluate(alt);
                if (s < best) better.emplace_back(std::move(s), std::move(alt));
            }
        if (better.empty()) return false;
        std::stable_sort(better.begin(), better.end(),
                         [](const auto& a, const auto& b) { return a.first < b.first; });
        const solution base = sol;
        sol = std::move(better.front().second);
        best = std::move(better.front().first);
        for (std::size_t k = 1; k < better.size() && budget_left() && !best.zero(); ++k) {
            solution merged = sol;
            if (!merge_change(merged, base, better[k].second)) continue;
            score s = evaluate(merged);
            if (s < best) {
                sol = std::move(merged);
                best = std::move(s);
            }
        }
        return true;
    };
    auto try_two = [&](const std::vector<choice>& cand) {
        for (std::size_t i = 0; i < cand.size(); ++i)
            for (solution& one : alternatives(sol, cand[i]))
                for (std::size_t j = i + 1; j < cand.size(); ++j)
                    for (solution& alt : alternatives(one, cand[j])) {
                        if (!budget_left()) return false;
                        score s = evaluate(alt);
                        if (s < best) {
                            sol = std::move(alt);
                            best = std::move(s);
                            return true;
                        }
                    }
        return false;
    };
    while (!best.zero() && budget_left()) {
        const std::vector<choice> near = choices_near(best.names);
        // Pairs only among a few choices (quadratic).
        if (try_one(near) || (near.size() <= 80 && try_two(near))) continue;
        const std::vector<choice> all = all_choices();
        // Pairs of all choices only for small machines (quadratic).
        if (try_one(all) || (all.size() <= 120 && try_two(all))) continue;
        return;
    }
}

/// Applies to `into` what `changed` changed relative to `base` (the same
/// one choice); false if that choice was an alias target (their queue ties
/// aliases together: not merged).
inline bool importer::merge_change(solution& into, const solution& base,
                                   const solution& changed) const {
    if (changed.target != base.target) return false;
    for (std::size_t i = 0; i < base.io.size(); ++i) {
        if (changed.io[i] != base.io[i]) into.io[i] = changed.io[i];
        if (changed.one_byte[i] != base.one_byte[i]) into.one_byte[i] = changed.one_byte[i];
        if (changed.readonly[i] != base.readonly[i]) into.readonly[i] = changed.readonly[i];
    }
    for (const auto& [k, v] : changed.later)
        if (base.later.at(k) != v) into.later[k] = v;
    return true;
}

/// Regions a flat view can show: reached from an address-space root through
/// enabled regions and aliases (any candidate target).
inline std::vector<char> importer::visible_classes() const {
    std::vector<char> vis(classes_.size(), 0);
    std::vector<int> work;
    for (const mtree_block& b : tree_.blocks)
        if (b.address_space) work.push_back(class_of(b.root));
    while (!work.empty()) {
        const int c = work.back();
        work.pop_back();
        if (vis[static_cast<std::size_t>(c)] || rep(c).disabled) continue;
        vis[static_cast<std::size_t>(c)] = 1;
        for (int ch : cls(c).children) work.push_back(ch);
        if (rep(c).is_alias)
            for (int b : cls(c).candidates) work.push_back(block_class(b));
    }
    return vis;
}

inline void importer::report_unsettled(const solution& sol) {
    const std::vector<char> vis = visible_classes();
    std::map<std::string, std::vector<std::string>> groups; // heading -> items
    for (const choice& ch : all_choices()) {
        const std::size_t i = static_cast<std::size_t>(ch.cls);
        const bool shown =
            vis[i] || (ch.what == choice_kind::order && vis[static_cast<std::size_t>(ch.other)]);

        std::vector<int> equal; // alternatives that print the same texts
        if (shown) {
            for (solution& alt : alternatives(sol, ch)) {
                if (result_.evaluations >= opt_.max_evaluations) break;
                if (evaluate(alt).zero()) {
                    if (ch.what == choice_kind::target)
                        equal.push_back(alt.target[i]);
                    else
                        equal.push_back(1);
                }
            }
            if (equal.empty()) continue; // settled
        }
        const std::string why =
            shown ? "the texts come out the same either way"
                  : "not shown (disabled, or not reachable from an address space)";
        switch (ch.what) {
        case choice_kind::target: {
            std::string others;
            for (int b : equal) others += fmt::format(", {}", block_where(b));
            if (!shown)
                for (int b : cls(ch.cls).candidates)
                    if (b != sol.target[i]) others += fmt::format(", {}", block_where(b));
            groups
                [fmt::format(
                     "which same-named region an alias targets ({}); chose the first block listed",
                     why)]
                    .push_back(fmt::format("{} -> {}{}", where(ch.cls), block_where(sol.target[i]),
                                           others));
            break;
        }
        case choice_kind::kind:
            groups[fmt::format("container or I/O region ({})", why)].push_back(
                fmt::format("{} as {}", where(ch.cls), sol.io[i] ? "io" : "container"));
            break;
        case choice_kind::size:
            groups[fmt::format("0 or 1 byte, printed as X-X ({})", why)].push_back(
                fmt::format("{} as {}", where(ch.cls), sol.one_byte[i] ? 1 : 0));
            break;
        case choice_kind::readonly:
            groups[fmt::format("readonly ({}); assumed {}", why,
                               sol.readonly[i] ? "true" : "false")]
                .push_back(where(ch.cls));
            break;
        case choice_kind::order: {
            auto it = sol.later.find({ch.cls, ch.other});
            const bool b_later = it != sol.later.end() && it->second;
            groups[fmt::format(
                       "which of two overlapping regions of equal priority was added last ({})",
                       why)]
                .push_back(fmt::format("{} or {}: chose {}", where(ch.cls), where(ch.other),
                                       b_later ? where(ch.other) : where(ch.cls)));
            break;
        }
        }
    }
    for (const std::string& s : identity_notes_) note(s);
    for (auto& [heading, items] : groups) {
        std::string list;
        for (const std::string& s : items) list += fmt::format("\n    {}", s);
        note(fmt::format("{} region(s) — {}:{}", items.size(), heading, list));
    }
}

inline void importer::report_mismatch(const score& s) {
    if (!s.failure.empty()) {
        fail(fmt::format("the fixture cannot be built: {}", s.failure));
        return;
    }
    auto show = [](const std::vector<std::string>& lines, std::string_view sign) {
        std::string out;
        for (std::size_t i = 0; i < lines.size() && i < 20; ++i)
            out += fmt::format("\n    {} {}", sign, lines[i]);
        if (lines.size() > 20) out += fmt::format("\n    ... and {} more", lines.size() - 20);
        return out;
    };
    if (!s.flat_missing.empty() || !s.flat_extra.empty())
        fail(fmt::format(
            "no fixture found prints {} exactly: {} line(s) differ (- QEMU's, + the fixture's){}{}",
            flat_.source, s.flat_missing.size() + s.flat_extra.size(), show(s.flat_missing, "-"),
            show(s.flat_extra, "+")));
    if (!s.tree_missing.empty() || !s.tree_extra.empty())
        fail(fmt::format(
            "no fixture found prints {} exactly: {} line(s) differ (- QEMU's, + the fixture's){}{}",
            tree_.source, s.tree_missing.size() + s.tree_extra.size(), show(s.tree_missing, "-"),
            show(s.tree_extra, "+")));
    std::set<std::string> names(s.names.begin(), s.names.end());
    std::string list;
    for (const std::string& nm : names) list += fmt::format("{}'{}'", list.empty() ? "" : ", ", nm);
    fail(fmt::format("regions on the differing lines: {}", list));
}

/// The flat views must name the address spaces (and their roots) that the
/// tree has: no choice changes those, so texts of two machines are told
/// apart here, at once.
inline bool importer::same_address_spaces() {
    std::multiset<std::string> tree_spaces, flat_spaces;
    for (const mtree_block& b : tree_.blocks)
        if (b.address_space)
            for (const std::string& n : b.names)
                tree_spaces.insert(fmt::format(
                    "\"{}\", root: {}", n,
                    line(b.root).is_alias ? line(b.root).name + ", alias " + line(b.root).target
                                          : line(b.root).name));
    for (const mtree_flat_view& v : flat_.views)
        for (const mtree_flat_space& sp : v.spaces)
            flat_spaces.insert(fmt::format(
                "\"{}\", root: {}", sp.name,
                sp.root_alias.empty() ? sp.root : sp.root + ", alias " + sp.root_alias));
    if (tree_spaces == flat_spaces) return true;
    std::vector<std::string> only_tree, only_flat;
    std::set_difference(tree_spaces.begin(), tree_spaces.end(), flat_spaces.begin(),
                        flat_spaces.end(), std::back_inserter(only_tree));
    std::set_difference(flat_spaces.begin(), flat_spaces.end(), tree_spaces.begin(),
                        tree_spaces.end(), std::back_inserter(only_flat));
    auto list = [](const std::vector<std::string>& v) {
        std::string out;
        for (const std::string& x : v) out += fmt::format("\n    {}", x);
        return out.empty() ? std::string("\n    (none)") : out;
    };
    fail(fmt::format("{} and {} do not list the same address spaces (are they of one machine?); "
                     "only in {}:{}\n  only in {}:{}",
                     tree_.source, flat_.source, tree_.source, list(only_tree), flat_.source,
                     list(only_flat)));
    return false;
}

inline import_result importer::run() {
    result_.strict = opt_.strict;
    read_texts();
    resolve_alias_splits();
    hash_lines();
    unify();
    build_classes();
    find_candidates();
    if (std::any_of(result_.findings.begin(), result_.findings.end(),
                    [](const import_finding& f) { return f.error; }))
        return std::move(result_);
    if (!same_address_spaces()) return std::move(result_);
    solution sol = default_solution();
    if (std::any_of(result_.findings.begin(), result_.findings.end(),
                    [](const import_finding& f) { return f.error; }))
        return std::move(result_);
    score best = evaluate(sol);
    search(sol, best);
    if (!best.zero()) {
        wide_readonly_ = true;
        search(sol, best);
    }
    bool ok = true;
    result_.spec = make_spec(sol, true, ok);
    if (best.zero()) {
        // The spec with owners must print the same (owners do not change
        // flat views or the tree; checked rather than assumed).
        try {
            auto m = fixture_machine::build(result_.spec, "import");
            const keyed_flat f =
                key_flat(read_mtree_flat(info_mtree(m->spaces(), {.flatview = true}), "qomem"));
            const keyed_lines t =
                key_tree(read_mtree_tree(info_mtree(m->spaces(), {.disabled = true}), "qomem"));
            if (keyed_difference(want_flat_.heads, f.heads, nullptr, nullptr, nullptr) +
                    keyed_difference(want_flat_.lines, f.lines, nullptr, nullptr, nullptr) +
                    keyed_difference(want_tree_, t, nullptr, nullptr, nullptr) !=
                0)
                fail("the fixture with its owners prints differently from the one without (a bug)");
            else
                result_.reproduces = true;
        } catch (const error& e) {
            fail(fmt::format("the fixture with its owners cannot be built: {}", e.what()));
        }
        report_unsettled(sol);
    } else {
        report_mismatch(best);
    }
    return std::move(result_);
}

} // namespace detail

inline import_result import_mtree(const import_texts& in, const import_options& opt) {
    detail::importer imp(in, opt);
    return imp.run();
}

} // namespace qomem::hmp
