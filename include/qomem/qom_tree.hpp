// qomem/qom_tree.hpp — the composition tree as text, like QEMU's HMP
// `info qom-tree`, optionally with each object's reference count.
//
// One line per object. The first names the object the dump starts from: its
// canonical path when it has one; otherwise it is spelt the way QEMU spells
// every node, "/" followed by its child-property name, which is just "/" for
// an object that is no one's child (a root, or an object that has left the
// tree but is still held by someone). Each child follows on its own line as
// "/name (type)", indented two more spaces per level, children sorted by
// name in byte order (QEMU sorts with strcmp too, so "dev[10]" comes before
// "dev[2]"). Every line ends with '\n'.
//
//     auto root = qomem::container::make_root();
//     qomem::machine& m = qomem::add_machine(*root);
//     fmt::print("{}", qomem::qom_tree(m));
//     // /machine (machine)
//     //   /peripheral (container)
//     //   /peripheral-anon (container)
//     //   /unattached (container)
//     fmt::print("{}", qomem::qom_tree(*root, {.show_refs = true}));
//     // / (container) refs=1
//     //   /machine (machine) refs=1
//     //     /peripheral (container) refs=1
//     //     ...
//
// With show_refs every line gains " refs=N", the object's reference count at
// the moment it is printed: for a teaching dump, compare N with the holders
// you can see (the parent's child<> property, strong links, handles).
//
// Formatting with fmt is opt-in here too: `fmt::format("{}", qomem::qom_tree_of(obj))`.
//
// The printer only reads the tree (for_each_child, name(), type(),
// canonical_path(), ref_count()); it takes and drops no references and may be
// called from a lifetime_observer, including on an object being finalized.
#pragma once

#include <algorithm>
#include <cstddef>
#include <iterator>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>

#include <qomem/object.hpp>

namespace qomem {

/// What qom_tree prints besides the path and type of each object.
struct qom_tree_options {
    /// Append " refs=N" (the current reference count) to every line.
    bool show_refs = false;
};

namespace detail {

inline void qom_tree_line(std::string& out, const object& obj, std::string_view path,
                          std::size_t indent, const qom_tree_options& opts) {
    out.append(indent, ' ');
    out += path;
    out += " (";
    out += obj.type().name;
    out += ')';
    if (opts.show_refs) fmt::format_to(std::back_inserter(out), " refs={}", obj.ref_count());
    out += '\n';
}

inline void qom_tree_children(std::string& out, const object& obj, std::size_t indent,
                              const qom_tree_options& opts) {
    std::vector<const object*> children;
    obj.for_each_child([&](const object& c) { children.push_back(&c); });
    std::sort(children.begin(), children.end(),
              [](const object* a, const object* b) { return a->name() < b->name(); });
    for (const object* c : children) {
        qom_tree_line(out, *c, fmt::format("/{}", c->name()), indent, opts);
        qom_tree_children(out, *c, indent + 2, opts);
    }
}

} // namespace detail

/// The composition tree below `obj` (included), one object per line; see the
/// header overview for the format.
/// Complexity: O(n log n) for n objects in the subtree; recursion depth is
/// the height of the subtree.
/// Throws: std::bad_alloc only.
inline std::string qom_tree(const object& obj, qom_tree_options opts = {}) {
    std::string out;
    std::optional<std::string> path = obj.canonical_path();
    if (!path) path = fmt::format("/{}", obj.name());
    detail::qom_tree_line(out, obj, *path, 0, opts);
    detail::qom_tree_children(out, obj, 2, opts);
    return out;
}

/// A reference to an object's tree, for fmt: `fmt::print("{}", qom_tree_of(obj))`
/// prints exactly what qom_tree(obj, opts) returns. The object must outlive it.
struct qom_tree_view {
    const object* obj;
    qom_tree_options opts;
};

inline qom_tree_view qom_tree_of(const object& obj, qom_tree_options opts = {}) noexcept {
    return {&obj, opts};
}

} // namespace qomem

template <>
struct fmt::formatter<qomem::qom_tree_view> : fmt::formatter<std::string_view> {
    template <class FormatContext>
    auto format(const qomem::qom_tree_view& v, FormatContext& ctx) const {
        return fmt::formatter<std::string_view>::format(qomem::qom_tree(*v.obj, v.opts), ctx);
    }
};
