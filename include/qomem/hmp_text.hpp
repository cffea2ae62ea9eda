// qomem/hmp_text.hpp — readers of QEMU's HMP texts about memory: `info mtree`
// (the region tree, with -D and -o), `info mtree -f` (the flat views) and
// `info qom-tree`, as QEMU 7.2 prints them (CRLF or LF line ends).
//
//     qomem::hmp::mtree_tree tree = qomem::hmp::read_mtree_tree(text, "mtree-D.txt");
//     for (const auto& b : tree.blocks) ...        // address-space: / memory-region: blocks
//     qomem::hmp::mtree_flat flat = qomem::hmp::read_mtree_flat(text2, "mtree-f.txt");
//
// These only read: what the texts leave open (which same-named region an
// alias targets, ...) is settled by hmp_import.hpp. Malformed text is refused
// with hmp_error naming the source, the line number and the line.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/core.h>

#include <qomem/error.hpp>
#include <qomem/types.hpp>

namespace qomem {

/// Malformed HMP text (`info mtree`, `info qom-tree`).
class hmp_error : public error {
public:
    using error::error;
};

namespace hmp {

/// One side of an `info mtree -o` annotation: `{dev id=X}`, `{dev path=P}`,
/// `{obj path=P}` or `{obj type=T}`.
struct mtree_object_ref {
    bool device = false;
    std::string id, path, type; ///< exactly one is set
    friend bool operator==(const mtree_object_ref&, const mtree_object_ref&) = default;
};

/// The `-o` annotation of a line: " owner:{..}", " parent:{..}", both, or " orphan".
struct mtree_owner_info {
    std::optional<mtree_object_ref> owner;
    std::optional<mtree_object_ref> parent;
    bool orphan = false;
    friend bool operator==(const mtree_owner_info&, const mtree_owner_info&) = default;
};

/// One region line of the tree text.
struct mtree_line {
    std::size_t line_no = 0; ///< 1-based, in its source
    unsigned level = 0;      ///< 1 for a block's root
    bool overflow = false;   ///< "[DETECTED OVERFLOW!] "
    hwaddr start = 0, end = 0;
    std::int32_t priority = 0;
    bool nonvolatile = false;
    std::string type; ///< "ram", "rom", "romd", "ramd", "i/o" (or "container")
    std::string name;
    bool is_alias = false;
    /// For an alias: the ways to read "NAME @TARGET" (more than one only when
    /// a name contains " @"); `name` and `target` hold the first.
    std::vector<std::pair<std::string, std::string>> alias_splits;
    std::string target;
    hwaddr alias_start = 0, alias_end = 0;
    bool disabled = false;
    std::optional<mtree_owner_info> owner;
    /// The line without its -o annotation (what `info mtree -D` prints).
    std::string text;
    int parent = -1; ///< index in mtree_tree::lines, -1 for a block's root
    std::vector<int> children;
    std::size_t block = 0;
};

/// An "address-space: ..." group (one block, the ASes sharing a root) or a
/// "memory-region: NAME" block (an alias target).
struct mtree_block {
    bool address_space = false;
    std::vector<std::string> names; ///< the AS names, or the one region name
    int root = -1;                  ///< index in mtree_tree::lines
    std::size_t line_no = 0;        ///< of the first header line
};

struct mtree_tree {
    std::string source;
    std::vector<mtree_line> lines; ///< in text order (the order QEMU walked them)
    std::vector<mtree_block> blocks;
    bool with_owners = false;
};

/// One line " AS \"NAME\", root: ROOT[, alias TARGET]".
struct mtree_flat_space {
    std::string name, root, root_alias;
    std::string text;
};

/// A range line of a flat view, read.
struct mtree_flat_range {
    hwaddr start = 0, end = 0; ///< inclusive
    std::int32_t priority = 0;
    bool nonvolatile = false;
    std::string type, name;
    hwaddr offset = 0; ///< " @offset", or 0
};

struct mtree_flat_view {
    std::size_t line_no = 0;
    std::vector<mtree_flat_space> spaces;
    std::string root;   ///< "Root memory region: X" (X may be "(none)")
    bool empty = false; ///< "No rendered FlatView"
    /// The range lines as printed (without their -o annotation).
    std::vector<std::string> ranges;
    /// The range lines, read.
    std::vector<mtree_flat_range> parsed;
};

struct mtree_flat {
    std::string source;
    std::vector<mtree_flat_view> views;
};

/// `info qom-tree`: canonical path -> QOM type.
struct qom_tree_text {
    std::string source;
    std::map<std::string, std::string, std::less<>> types;
};

namespace detail {

inline std::vector<std::string_view> split_lines(std::string_view text) {
    std::vector<std::string_view> out;
    std::size_t pos = 0;
    while (pos < text.size()) {
        std::size_t nl = text.find('\n', pos);
        if (nl == std::string_view::npos) nl = text.size();
        std::string_view line = text.substr(pos, nl - pos);
        if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
        out.push_back(line);
        pos = nl + 1;
    }
    return out;
}

[[noreturn]] inline void fail(std::string_view source, std::size_t line_no, std::string_view line,
                              std::string_view what) {
    throw hmp_error(fmt::format("{}:{}: {}: \"{}\"", source, line_no, what, line));
}

/// The offset of the first byte of `s` that is not well-formed UTF-8 (no
/// overlong forms, surrogates or code points past U+10FFFF), or npos.
inline std::size_t invalid_utf8_at(std::string_view s) noexcept {
    std::size_t i = 0;
    while (i < s.size()) {
        const auto b = static_cast<unsigned char>(s[i]);
        std::size_t n = 0;
        unsigned char lo = 0x80, hi = 0xbf; // the second byte's range
        if (b < 0x80) {
            ++i;
            continue;
        }
        if (b >= 0xc2 && b <= 0xdf)
            n = 1;
        else if (b >= 0xe0 && b <= 0xef) {
            n = 2;
            if (b == 0xe0) lo = 0xa0;
            if (b == 0xed) hi = 0x9f;
        } else if (b >= 0xf0 && b <= 0xf4) {
            n = 3;
            if (b == 0xf0) lo = 0x90;
            if (b == 0xf4) hi = 0x8f;
        } else {
            return i;
        }
        if (n >= s.size() - i) return i; // truncated
        for (std::size_t k = 1; k <= n; ++k) {
            const auto c = static_cast<unsigned char>(s[i + k]);
            if (k == 1 ? (c < lo || c > hi) : (c < 0x80 || c > 0xbf)) return i;
        }
        i += n + 1;
    }
    return std::string_view::npos;
}

/// The lines of `text` (split_lines), refusing text that is not UTF-8 as
/// QEMU prints it: a region name is written to the fixture's JSON, which
/// holds only UTF-8. Throws: hmp_error naming the source, the line and the
/// byte (the line is quoted up to that byte).
inline std::vector<std::string_view> read_lines(std::string_view text, std::string_view source) {
    auto lines = split_lines(text);
    for (std::size_t i = 0; i < lines.size(); ++i)
        if (const std::size_t at = invalid_utf8_at(lines[i]); at != std::string_view::npos)
            fail(source, i + 1, lines[i].substr(0, at),
                 fmt::format("not UTF-8 at byte {} of the line", at + 1));
    return lines;
}

inline bool parse_hex16(std::string_view s, hwaddr& out) {
    if (s.size() != 16) return false;
    hwaddr v = 0;
    for (char c : s) {
        unsigned d;
        if (c >= '0' && c <= '9')
            d = unsigned(c - '0');
        else if (c >= 'a' && c <= 'f')
            d = unsigned(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            d = unsigned(c - 'A' + 10);
        else
            return false;
        v = v << 4 | d;
    }
    out = v;
    return true;
}

/// "HEX16-HEX16" at the start of `s`.
inline bool parse_range(std::string_view s, hwaddr& a, hwaddr& b) {
    return s.size() >= 33 && s[16] == '-' && parse_hex16(s.substr(0, 16), a) &&
           parse_hex16(s.substr(17, 16), b);
}

inline bool parse_object_ref(std::string_view s, mtree_object_ref& out) {
    // "{dev id=X}", "{dev path=P}", "{obj path=P}", "{obj type=T}"
    if (s.size() < 7 || s.front() != '{' || s.back() != '}') return false;
    s = s.substr(1, s.size() - 2);
    if (s.substr(0, 4) == "dev ")
        out.device = true;
    else if (s.substr(0, 4) == "obj ")
        out.device = false;
    else
        return false;
    s.remove_prefix(4);
    if (s.substr(0, 3) == "id=")
        out.id = std::string(s.substr(3));
    else if (s.substr(0, 5) == "path=")
        out.path = std::string(s.substr(5));
    else if (s.substr(0, 5) == "type=")
        out.type = std::string(s.substr(5));
    else
        return false;
    return true;
}

/// Splits the -o annotation off `rest`; false if there is none.
inline bool split_owner(std::string_view& rest, mtree_owner_info& info) {
    if (rest.size() >= 7 && rest.substr(rest.size() - 7) == " orphan") {
        rest.remove_suffix(7);
        info.orphan = true;
        return true;
    }
    if (rest.empty() || rest.back() != '}') return false;
    const std::size_t p = rest.rfind(" parent:{");
    const std::size_t o = rest.rfind(" owner:{");
    if (p != std::string_view::npos && (o == std::string_view::npos || p > o)) {
        mtree_object_ref r;
        if (!parse_object_ref(rest.substr(p + 8), r)) return false;
        info.parent = r;
        rest = rest.substr(0, p);
        const std::size_t o2 = rest.rfind(" owner:{");
        if (o2 != std::string_view::npos && !rest.empty() && rest.back() == '}') {
            mtree_object_ref r2;
            if (parse_object_ref(rest.substr(o2 + 7), r2)) {
                info.owner = r2;
                rest = rest.substr(0, o2);
            }
        }
        return true;
    }
    if (o != std::string_view::npos) {
        mtree_object_ref r;
        if (!parse_object_ref(rest.substr(o + 7), r)) return false;
        info.owner = r;
        rest = rest.substr(0, o);
        return true;
    }
    return false;
}

/// "START-END (prio N, [nv-]TYPE): " at the start of `s`; the rest in `rest`.
inline bool parse_head(std::string_view s, hwaddr& start, hwaddr& end, std::int32_t& prio, bool& nv,
                       std::string& type, std::string_view& rest) {
    if (!parse_range(s, start, end)) return false;
    s.remove_prefix(33);
    if (s.substr(0, 7) != " (prio ") return false;
    s.remove_prefix(7);
    const std::size_t comma = s.find(", ");
    if (comma == std::string_view::npos || comma == 0) return false;
    std::int64_t p = 0;
    std::size_t i = 0;
    const bool neg = s[0] == '-';
    if (neg) i = 1;
    if (i == comma) return false;
    for (; i < comma; ++i) {
        if (s[i] < '0' || s[i] > '9') return false;
        p = p * 10 + (s[i] - '0');
        if (p > (std::int64_t(1) << 31)) return false;
    }
    if (neg) p = -p;
    if (p < INT32_MIN || p > INT32_MAX) return false;
    prio = static_cast<std::int32_t>(p);
    s.remove_prefix(comma + 2);
    const std::size_t close = s.find("): ");
    if (close == std::string_view::npos) {
        // "...): " with an empty name would still have the space; refuse otherwise
        return false;
    }
    std::string_view t = s.substr(0, close);
    nv = t.substr(0, 3) == "nv-";
    if (nv) t.remove_prefix(3);
    if (t != "ram" && t != "rom" && t != "romd" && t != "ramd" && t != "i/o" && t != "container")
        return false;
    type = std::string(t);
    rest = s.substr(close + 3);
    return true;
}

} // namespace detail

/// Reads `info mtree` text (with or without -D; with -o when `with_owners`).
/// Throws: hmp_error for a line that is not QEMU's format.
inline mtree_tree read_mtree_tree(std::string_view text, std::string source,
                                  bool with_owners = false) {
    mtree_tree t;
    t.source = std::move(source);
    t.with_owners = with_owners;
    const auto lines = detail::read_lines(text, t.source);
    bool in_headers = false;
    std::vector<int> stack; // open lines by level
    for (std::size_t i = 0; i < lines.size(); ++i) {
        const std::size_t no = i + 1;
        std::string_view line = lines[i];
        if (line.empty()) {
            in_headers = false;
            continue;
        }
        if (line.substr(0, 15) == "address-space: " || line.substr(0, 15) == "memory-region: ") {
            const bool as = line[0] == 'a';
            const std::string name(line.substr(15));
            if (as && in_headers && t.blocks.back().address_space && t.blocks.back().root < 0) {
                t.blocks.back().names.push_back(name);
            } else {
                t.blocks.push_back({as, {name}, -1, no});
            }
            in_headers = true;
            stack.clear();
            continue;
        }
        if (t.blocks.empty())
            detail::fail(t.source, no, line, "a region line before any block header");
        in_headers = false;
        mtree_line l;
        l.line_no = no;
        l.block = t.blocks.size() - 1;
        std::string_view s = line;
        if (s.substr(0, 21) == "[DETECTED OVERFLOW!] ") {
            l.overflow = true;
            s.remove_prefix(21);
        }
        std::size_t spaces = 0;
        while (spaces < s.size() && s[spaces] == ' ') ++spaces;
        if (spaces < 2 || spaces % 2 != 0)
            detail::fail(t.source, no, line, "expected an indentation of 2, 4, 6, ... spaces");
        l.level = static_cast<unsigned>(spaces / 2);
        s.remove_prefix(spaces);
        std::string_view rest;
        if (!detail::parse_head(s, l.start, l.end, l.priority, l.nonvolatile, l.type, rest))
            detail::fail(t.source, no, line,
                         "expected \"START-END (prio N, TYPE): NAME\" with 16-digit hex addresses");
        if (with_owners) {
            mtree_owner_info info;
            if (!detail::split_owner(rest, info))
                detail::fail(t.source, no, line,
                             "expected an -o annotation (\" owner:{...}\", \" parent:{...}\" or \" "
                             "orphan\")");
            l.owner = info;
        }
        const std::string_view disabled = " [disabled]";
        if (rest.size() >= disabled.size() &&
            rest.substr(rest.size() - disabled.size()) == disabled) {
            l.disabled = true;
            rest.remove_suffix(disabled.size());
        }
        // "alias NAME @TARGET START-END"
        if (rest.substr(0, 6) == "alias " && rest.size() >= 6 + 34 &&
            rest[rest.size() - 34] == ' ' &&
            detail::parse_range(rest.substr(rest.size() - 33), l.alias_start, l.alias_end)) {
            const std::string_view both = rest.substr(6, rest.size() - 6 - 34);
            for (std::size_t at = both.find(" @"); at != std::string_view::npos;
                 at = both.find(" @", at + 1))
                l.alias_splits.emplace_back(std::string(both.substr(0, at)),
                                            std::string(both.substr(at + 2)));
            if (!l.alias_splits.empty()) {
                l.is_alias = true;
                l.name = l.alias_splits.front().first;
                l.target = l.alias_splits.front().second;
            }
        }
        if (!l.is_alias) l.name = std::string(rest);
        // The line minus its -o annotation: everything up to the end of the
        // region part (name, alias range, [disabled]).
        {
            const std::size_t region_end = static_cast<std::size_t>(rest.data() - line.data()) +
                                           rest.size() + (l.disabled ? disabled.size() : 0);
            l.text = std::string(line.substr(0, region_end));
        }
        const int idx = static_cast<int>(t.lines.size());
        if (l.level == 1) {
            if (t.blocks.back().root >= 0)
                detail::fail(t.source, no, line, "a second root line in one block");
            t.blocks.back().root = idx;
            stack.assign(1, idx);
        } else {
            if (stack.size() < l.level - 1 || stack.empty())
                detail::fail(t.source, no, line,
                             "indented deeper than one level below the line above");
            stack.resize(l.level - 1);
            l.parent = stack.back();
            t.lines[static_cast<std::size_t>(l.parent)].children.push_back(idx);
            stack.push_back(idx);
        }
        t.lines.push_back(std::move(l));
    }
    for (const mtree_block& b : t.blocks)
        if (b.root < 0)
            throw hmp_error(fmt::format("{}:{}: block \"{}\" has no region line", t.source,
                                        b.line_no, b.names.front()));
    return t;
}

/// Reads `info mtree -f` text (with -o when `with_owners`).
/// Throws: hmp_error for a line that is not QEMU's format.
inline mtree_flat read_mtree_flat(std::string_view text, std::string source,
                                  bool with_owners = false) {
    mtree_flat f;
    f.source = std::move(source);
    const auto lines = detail::read_lines(text, f.source);
    for (std::size_t i = 0; i < lines.size(); ++i) {
        const std::size_t no = i + 1;
        std::string_view line = lines[i];
        if (line.empty()) continue;
        if (line.substr(0, 10) == "FlatView #") {
            f.views.push_back({});
            f.views.back().line_no = no;
            continue;
        }
        if (f.views.empty())
            detail::fail(f.source, no, line, "a line before the first \"FlatView #\"");
        mtree_flat_view& v = f.views.back();
        if (line.substr(0, 5) == " AS \"") {
            const std::size_t q = line.find("\", root: ", 5);
            if (q == std::string_view::npos)
                detail::fail(f.source, no, line, "expected \" AS \\\"NAME\\\", root: ROOT\"");
            mtree_flat_space sp;
            sp.text = std::string(line);
            sp.name = std::string(line.substr(5, q - 5));
            std::string_view root = line.substr(q + 9);
            if (const std::size_t a = root.rfind(", alias "); a != std::string_view::npos) {
                sp.root_alias = std::string(root.substr(a + 8));
                root = root.substr(0, a);
            }
            sp.root = std::string(root);
            v.spaces.push_back(std::move(sp));
        } else if (line.substr(0, 21) == " Root memory region: ") {
            v.root = std::string(line.substr(21));
        } else if (line == "  No rendered FlatView") {
            v.empty = true;
        } else if (line.substr(0, 2) == "  ") {
            hwaddr a, b;
            std::int32_t prio;
            bool nv;
            std::string type;
            std::string_view rest;
            if (!detail::parse_head(line.substr(2), a, b, prio, nv, type, rest))
                detail::fail(f.source, no, line, "expected \"  START-END (prio N, TYPE): NAME\"");
            if (with_owners) {
                mtree_owner_info info;
                if (!detail::split_owner(rest, info))
                    detail::fail(f.source, no, line, "expected an -o annotation");
            }
            std::string_view name = rest;
            hwaddr off = 0;
            if (name.size() > 18 && name[name.size() - 18] == ' ' &&
                name[name.size() - 17] == '@' &&
                detail::parse_hex16(name.substr(name.size() - 16), off))
                name.remove_suffix(18);
            v.ranges.emplace_back(
                line.substr(0, static_cast<std::size_t>(rest.data() - line.data()) + rest.size()));
            v.parsed.push_back({a, b, prio, nv, std::move(type), std::string(name), off});
        } else {
            detail::fail(f.source, no, line, "not a line of `info mtree -f`");
        }
    }
    return f;
}

/// The comparison rule of tests/conformance/README.md for two `info mtree`
/// texts (tree or flat views, with or without -o): QEMU prints blocks in
/// hash-table order, so blocks (separated by blank lines) may come in any
/// order, and so may the heading lines of one block ("address-space: ..."
/// lines, " AS ..." lines); "FlatView #N" lines are ignored; every other
/// character must match (CRLF and LF line ends are the same).
/// Returns "" when the texts are equal under the rule, else a description of
/// the first block of `expected` that `actual` lacks (or the reverse).
inline std::string mtree_text_difference(std::string_view expected, std::string_view actual) {
    auto canonical = [](std::string_view text) {
        std::vector<std::string> blocks;
        std::vector<std::string> heads, body;
        auto flush = [&] {
            std::sort(heads.begin(), heads.end());
            std::string b;
            for (const auto* part : {&heads, &body})
                for (const std::string& l : *part) b += l + "\n";
            if (!b.empty()) blocks.push_back(std::move(b));
            heads.clear();
            body.clear();
        };
        for (std::string_view l : detail::split_lines(text)) {
            if (l.find_first_not_of(' ') == std::string_view::npos) {
                flush();
            } else if (l.substr(0, 10) == "FlatView #") {
            } else if (l.substr(0, 15) == "address-space: " || l.substr(0, 4) == " AS ") {
                heads.emplace_back(l);
            } else {
                body.emplace_back(l);
            }
        }
        flush();
        std::sort(blocks.begin(), blocks.end());
        return blocks;
    };
    const std::vector<std::string> a = canonical(expected), b = canonical(actual);
    if (a == b) return {};
    std::vector<std::string> only_a, only_b;
    std::set_difference(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(only_a));
    std::set_difference(b.begin(), b.end(), a.begin(), a.end(), std::back_inserter(only_b));
    if (!only_a.empty())
        return fmt::format(
            "{} block(s) of the expected text are not in the actual one; the first:\n{}",
            only_a.size(), only_a.front());
    return fmt::format("{} block(s) of the actual text are not in the expected one; the first:\n{}",
                       only_b.size(), only_b.front());
}

/// Reads `info qom-tree` text. Throws: hmp_error.
inline qom_tree_text read_qom_tree(std::string_view text, std::string source) {
    qom_tree_text q;
    q.source = std::move(source);
    std::vector<std::string> stack;
    const auto lines = detail::read_lines(text, q.source);
    for (std::size_t i = 0; i < lines.size(); ++i) {
        std::string_view line = lines[i];
        if (line.empty()) continue;
        std::size_t spaces = 0;
        while (spaces < line.size() && line[spaces] == ' ') ++spaces;
        const std::size_t open = line.rfind(" (");
        if (spaces % 2 != 0 || spaces >= line.size() || line[spaces] != '/' || line.back() != ')' ||
            open == std::string_view::npos || open <= spaces)
            detail::fail(q.source, i + 1, line,
                         "expected \"/NAME (TYPE)\" indented by 2 per level");
        const std::size_t level = spaces / 2;
        if (level > stack.size()) detail::fail(q.source, i + 1, line, "indented too deep");
        stack.resize(level);
        std::string name(line.substr(spaces + 1, open - spaces - 1));
        std::string path;
        for (const std::string& s : stack) path += s;
        path += "/" + name;
        // The root "/" (from `info qom-tree /`) adds no component of its own.
        stack.push_back(name.empty() ? std::string() : "/" + name);
        q.types[path] = std::string(line.substr(open + 2, line.size() - open - 3));
    }
    return q;
}

} // namespace hmp
} // namespace qomem
