// qomem/reference_graph.hpp — who holds a reference to whom: a snapshot of
// the references the library can see, drawn as Graphviz DOT, and replayed
// under qomem's lifetime rule or QEMU's former one to find what would leak.
//
//     qomem::reference_graph g;
//     g.add_reference(qomem::reference_graph::outside("main(): root handle"), *root);
//     g.add_dma_mapping(*disk, disk->mapping(), "disk0's DMA");  // held by the disk
//     std::string dot = g.to_dot("before the unplug");            // dot -Tsvg ...
//
//     qomem::reference_replay former(g, qomem::lifetime_rule::owner_piggyback);
//     former.unparent(*g.find("nic0"));  // what device_del(nic0) does
//     former.release_outside();           // every handle outside the graph goes
//     fmt::print("{}", former.report());  // each cycle left, and what it keeps alive
//
// What a snapshot holds. Each edge is one reference, from its holder to what
// it holds. From every object added, the graph follows everything the library
// knows about: child<> properties (parent → child) and strong links; a
// container → each subregion and an alias → its target; an unparented region
// → its owner (memory_region::holds_owner). It also follows every object's
// parent, a region's container and owner, and a device's bus, so adding one
// object usually captures its whole machine. What the library cannot attribute, the caller
// names with its holder (an object, for a member of it, or an outside holder
// such as a variable of main()): address spaces (→ their root), DMA mappings
// (→ their region) and any other reference (a ref_ptr or region_ref kept
// somewhere). Weak links hold nothing and are left out; so are the references
// of flat views (caches an address space drops at its next commit once no
// reader uses them) and short-lived ones, so an object's ref_count may exceed
// the references drawn into it (the DOT label shows both). Edges into an
// ownerless region from containers, aliases, address spaces and DMA mappings
// are drawn but marked not counted: memory_region_ref does not count them.
//
// Some references are released by a device's unparent hook, before its
// parent's reference goes; the snapshot marks them with that device
// (edge::released_by): the placements device::map_region made (undone when it
// is unrealized), the strong link of its bus (it leaves the bus), and what the
// caller says the device ends in its unrealize step (held_until::unrealized).
//
// The snapshot copies what it needs (labels, types, counts): it never touches
// the objects again, so it may outlive them.
//
// Replay. reference_replay takes a snapshot and simulates the reference
// counts from there on, under one of two rules (lifetime_rule):
//  * regions_counted — qomem's (and QEMU's after "memory: Stop piggybacking
//    on memory region owners"): a reference to a region counts on the region;
//    a device's unparent hook unparents its regions, each of which then holds
//    its owner until it is freed; an owner whose last reference goes while
//    some of its regions are held beyond it hands them over instead of being
//    finalized (object::last_reference_dropped).
//  * owner_piggyback — QEMU's former rule: a reference to a region is a
//    reference to its owner (memory_region_ref did object_ref(owner)), so
//    every counted edge into a region from anything but its owner is
//    redirected to the owner (edge::redirected_from keeps the region), and
//    regions stay their owner's children until the owner is finalized.
// Under both, unparenting runs the hooks above (a device: what its unrealize
// releases, its child buses, its bus link; a bus: the devices on it), an
// object whose count reaches zero is finalized and releases what it holds,
// newest first, and references the snapshot does not see are taken as gone.
// What is left once every outside holder has let go leaks: cycles() names
// each strongly connected group of what is left, one cycle through it, and
// what else it keeps alive.
//
// The simulated finalization order follows the library's rules but not its
// timing (flat views, grace periods): compare sets, not interleavings, with
// a real run.
//
// Complexity: every operation is O(edges) per reference it drops; graphs are
// machines of a few dozen objects, for teaching and tests.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <iterator>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include <qomem/address_space.hpp>
#include <qomem/assert.hpp>
#include <qomem/device.hpp>
#include <qomem/dma.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/object.hpp>

namespace qomem {

/// What one reference in a reference_graph is.
enum class reference_kind : std::uint8_t {
    child,       ///< a child<> property: parent → child
    strong_link, ///< a strong link<> property: holder → target
    subregion,   ///< a container → one of its subregions
    alias,       ///< an alias → its target
    root,        ///< an address space → its root region
    owner,       ///< an unparented region → its owner, until the region is freed
    dma,         ///< a DMA mapping → the region it points into
    held,        ///< a reference the caller named: holder → object, address space or mapping
};

/// A short name for `k` ("child<>", "subregion", ...).
constexpr std::string_view to_string(reference_kind k) noexcept {
    switch (k) {
    case reference_kind::child:
        return "child<>";
    case reference_kind::strong_link:
        return "link<>";
    case reference_kind::subregion:
        return "subregion";
    case reference_kind::alias:
        return "alias";
    case reference_kind::root:
        return "root";
    case reference_kind::owner:
        return "owner";
    case reference_kind::dma:
        return "DMA";
    case reference_kind::held:
        return "held";
    }
    return "?";
}

/// What a node of a reference_graph is.
enum class node_kind : std::uint8_t {
    object,        ///< a QOM object (a region, a device, ...)
    address_space, ///< an address space (not an object: its holder is named)
    dma_mapping,   ///< a DMA mapping (its holder is named)
    outside,       ///< a holder outside the graph: a variable, a request in flight
};

/// How long a holder keeps a reference it was named for.
enum class held_until : std::uint8_t {
    finalized,  ///< until the holder is finalized (or destroyed)
    unrealized, ///< the holder, a realized device, ends it in its unrealize step
};

/// The rule a reference_replay counts references by (see the header overview).
enum class lifetime_rule : std::uint8_t {
    regions_counted, ///< qomem's: a reference to a region counts on the region
    owner_piggyback, ///< QEMU's former rule: it counts on the region's owner
};

class reference_replay;

/// A snapshot of who holds a reference to whom (see the header overview).
class reference_graph {
public:
    struct node {
        node_kind kind = node_kind::object;
        /// A region's name, a device's id, an object's property name ("/" for
        /// a root), an address space's or a mapping's description, or the
        /// outside holder's name.
        std::string label;
        std::string type;            ///< the object's type name ("" for other kinds)
        std::string path;            ///< the object's path in its tree (canonical when rooted)
        std::uint32_t ref_count = 0; ///< the object's count at the snapshot (0 for other kinds)
        bool region = false;         ///< a memory region
        bool counted = true;         ///< false for an ownerless region
        bool device = false;
        bool bus = false;
        std::optional<std::size_t> owner; ///< a region's owner, when it has one
    };
    struct edge {
        std::size_t from = 0; ///< the holder
        std::size_t to = 0;   ///< what it holds
        reference_kind kind = reference_kind::held;
        /// The property's name, a subregion's offset ("0x1000"), the
        /// description the caller gave.
        std::string name;
        /// False into an ownerless region (containers, aliases, address
        /// spaces and DMA mappings do not count those).
        bool counted = true;
        /// The device whose unparent hook releases this reference.
        std::optional<std::size_t> released_by;
        /// Under lifetime_rule::owner_piggyback: the region this reference
        /// was to before it was redirected to the region's owner.
        std::optional<std::size_t> redirected_from;
    };

    /// Who holds a reference the library cannot attribute: an object (a
    /// member of it holds it) or an outside holder, by name (outside()).
    class holder {
    public:
        holder(const object& obj) noexcept : obj_(&obj) {}
        const object* object_holder() const noexcept { return obj_; }
        const std::string& name() const noexcept { return name_; }

    private:
        friend class reference_graph;
        holder() = default;
        const object* obj_ = nullptr;
        std::string name_;
    };
    /// An outside holder: references held by a variable, a pending request...
    /// Holders of the same name are one node.
    static holder outside(std::string name) {
        holder h;
        h.name_ = std::move(name);
        return h;
    }

    reference_graph() = default;

    /// Adds a reference `h` holds to `target` (a ref_ptr or region_ref kept
    /// somewhere), and everything `target` leads to.
    /// Requires (asserted): with held_until::unrealized, `h` is a realized
    /// device. Effects: adds nodes and edges to this graph; only reads the
    /// objects (takes and drops no reference, finalizes nothing).
    /// Complexity: O(objects and references reached). Throws: through the
    /// assertion handler before anything is added; std::bad_alloc.
    void add_reference(const holder& h, const object& target, std::string_view what = {},
                       held_until until = held_until::finalized);

    /// Adds address space `as`, held by `h`, and its reference to its root
    /// (and everything the root leads to). Requires, effects, complexity,
    /// throws: as add_reference.
    void add_address_space(const holder& h, const address_space& as,
                           held_until until = held_until::finalized);

    /// Adds DMA mapping `m`, held by `h` and described by `what`, and its
    /// reference to its region. Requires (asserted): `m` is a live mapping;
    /// as add_reference. Effects, complexity, throws: as add_reference.
    void add_dma_mapping(const holder& h, const dma_mapping& m, std::string_view what,
                         held_until until = held_until::finalized);

    const std::vector<node>& nodes() const noexcept { return nodes_; }
    const std::vector<edge>& edges() const noexcept { return edges_; }

    /// The node of `obj`, matched by address and type: ask only about objects
    /// alive since the snapshot (a later object may reuse a freed address).
    std::optional<std::size_t> find(const object& obj) const noexcept;
    /// The first node labelled `label`.
    std::optional<std::size_t> find(std::string_view label) const noexcept;

    /// The references held on node `n` (edge indices, in the order added).
    std::vector<std::size_t> references_to(std::size_t n) const;
    /// The references node `n` holds.
    std::vector<std::size_t> references_from(std::size_t n) const;
    /// The counted references held on `n`.
    std::size_t counted_references_to(std::size_t n) const;

    /// "nic-bar → nic-mmio: subregion at 0x0", for messages.
    std::string describe(std::size_t edge_index) const;

    /// The whole graph in Graphviz's DOT language, with `title` as its label.
    std::string to_dot(std::string_view title = {}) const;

private:
    friend class reference_replay;
    std::size_t visit(const object& obj);
    std::size_t holder_node(const holder& h, held_until until);
    std::size_t add_node(node n) {
        nodes_.push_back(std::move(n));
        return nodes_.size() - 1;
    }
    void add_edge(edge e) { edges_.push_back(std::move(e)); }
    static edge make_edge(std::size_t from, std::size_t to, reference_kind kind, std::string name) {
        edge e;
        e.from = from;
        e.to = to;
        e.kind = kind;
        e.name = std::move(name);
        return e;
    }
    /// DOT of this graph; with a replay, its state: finalized nodes grey,
    /// live ones red, released edges faint (or, `live_only`, only what lives).
    std::string dot(std::string_view title, const reference_replay* replay, bool live_only) const;

    std::vector<node> nodes_;
    std::vector<edge> edges_;
    std::map<const object*, std::size_t> index_; // identity only: never dereferenced later
    std::map<std::string, std::size_t, std::less<>> outside_;
};

/// Replays a reference_graph's counts under a lifetime_rule (see the header
/// overview). Works on its own copy of the graph.
class reference_replay {
public:
    /// One group of objects that keep each other alive.
    struct cycle {
        std::vector<std::size_t> members;     ///< the nodes of the group
        std::vector<std::size_t> path;        ///< edges of one cycle through members.front()
        std::vector<std::size_t> keeps_alive; ///< the other live nodes it holds, directly or not
    };

    /// Starts from `g`; under owner_piggyback its references into regions
    /// are redirected to their owners first, and regions a device's hook
    /// unparented are children again. Nodes that nothing in the graph holds
    /// are finalized at once (what held them is not in the snapshot).
    reference_replay(const reference_graph& g, lifetime_rule rule);

    /// What unparent(obj) does to node `n`: its unparent hook, then its
    /// parent's reference dropped. Nothing if it has no parent (any more).
    /// Requires: `n` is a node of the graph (std::out_of_range otherwise).
    /// Effects (on the replay only): drops references, may finalize nodes
    /// and, under regions_counted, adds the owner references of the regions
    /// it unparents. Complexity: O(edges) per reference dropped.
    void unparent(std::size_t n);
    /// Node `n` lets go: an outside holder drops every reference it holds;
    /// an address space is destroyed, a DMA mapping ended (its holder's
    /// reference to it dropped, and with it its reference to its region).
    /// Requires (asserted, before any change): `n` is not an object (objects
    /// are unparented). Effects, complexity: as unparent.
    void release(std::size_t n);
    /// Every outside holder lets go, the most recently added first.
    /// Effects, complexity: as unparent.
    void release_outside();

    lifetime_rule rule() const noexcept { return rule_; }
    /// The graph as the rule sees it (with the owner references made since).
    const reference_graph& graph() const noexcept { return g_; }
    bool alive(std::size_t edge_index) const { return edge_alive_.at(edge_index) != 0; }
    bool finalized(std::size_t n) const { return finalized_.at(n) != 0; }
    std::uint32_t count(std::size_t n) const { return count_.at(n); }
    /// Nodes finalized (objects) or destroyed (address spaces, mappings), in order.
    const std::vector<std::size_t>& finalization_order() const noexcept { return order_; }
    /// The live counted references held on `n`.
    std::vector<std::size_t> holders_of(std::size_t n) const;

    /// Nodes not finalized, outside holders excepted: what leaks once every
    /// outside holder has let go.
    std::vector<std::size_t> live() const;
    /// How many of live() are objects.
    std::size_t live_objects() const;
    /// The groups of live() that hold each other (strongly connected, with
    /// a cycle), in node order.
    std::vector<cycle> cycles() const;
    /// What leaks, in words: each cycle and what it keeps alive; "nothing
    /// leaks" when live() is empty.
    std::string report() const;
    /// The replayed graph as DOT: finalized nodes grey, live ones red,
    /// released references faint; with `live_only`, only what lives.
    std::string to_dot(std::string_view title = {}, bool live_only = false) const {
        return g_.dot(title, this, live_only);
    }

private:
    void drop(std::size_t e);
    void dec(std::size_t n);
    void last_reference(std::size_t n);
    bool hand_over(std::size_t n);
    bool held_beyond_owner(std::size_t r, std::size_t owner) const;
    void finalize(std::size_t n);
    void unparent_hook(std::size_t c, std::size_t parent);
    bool is_child_of(std::size_t c, std::size_t parent) const {
        return parent_edge_[c] && g_.edges_[*parent_edge_[c]].from == parent;
    }
    void add_counted_edge(reference_graph::edge e);

    reference_graph g_;
    lifetime_rule rule_;
    std::vector<char> edge_alive_;
    std::vector<char> finalized_;
    std::vector<std::uint32_t> count_;
    std::vector<std::optional<std::size_t>> parent_edge_; // the child<> edge into a node
    std::vector<std::size_t> order_;
};

// ---- implementation -----------------------------------------------------------

namespace detail {
inline std::string node_label_of(const object& obj) {
    if (const auto* r = dynamic_cast_to<memory_region>(&obj)) return r->region_name();
    if (const auto* d = dynamic_cast_to<device>(&obj); d && !d->id().empty()) return d->id();
    if (obj.parent()) return std::string(obj.name());
    if (const auto* c = dynamic_cast_to<container>(&obj); c && c->is_root()) return "/";
    return std::string(obj.type().name);
}

inline std::string dot_escape(std::string_view s) {
    std::string out;
    for (char c : s) {
        if (c == '"' || c == '\\') out += '\\';
        out += c;
    }
    return out;
}
} // namespace detail

inline std::size_t reference_graph::visit(const object& obj) {
    if (auto it = index_.find(&obj); it != index_.end()) return it->second;
    node n;
    n.label = detail::node_label_of(obj);
    n.type = std::string(obj.type().name);
    n.path = obj.path_in_tree();
    n.ref_count = obj.ref_count();
    const auto* region = dynamic_cast_to<memory_region>(&obj);
    n.region = region != nullptr;
    n.counted = !region || region->counted();
    n.device = dynamic_cast_to<device>(&obj) != nullptr;
    n.bus = dynamic_cast_to<bus>(&obj) != nullptr;
    const std::size_t self = add_node(std::move(n));
    index_.emplace(&obj, self);

    obj.for_each_child([&](const object& c) {
        const std::size_t to = visit(c);
        add_edge(make_edge(self, to, reference_kind::child, std::string(c.name())));
    });
    obj.for_each_link([&](std::string_view name, const object* target, link_strength s) {
        if (!target || s != link_strength::strong) return;
        const std::size_t to = visit(*target);
        edge e = make_edge(self, to, reference_kind::strong_link, std::string(name));
        // A device leaves its bus in its unparent hook.
        if (const auto* d = dynamic_cast_to<device>(target); d && d->parent_bus() == &obj)
            e.released_by = to;
        add_edge(std::move(e));
    });
    if (region) {
        region->for_each_subregion([&](const memory_region& sub) {
            const std::size_t to = visit(sub);
            edge e =
                make_edge(self, to, reference_kind::subregion, fmt::format("{:#x}", sub.addr()));
            e.counted = sub.counted();
            // A placement device::map_region made is undone at the device's unrealize.
            if (const auto* d = dynamic_cast_to<device>(sub.owner())) {
                const auto placed = d->mapped_regions();
                if (std::find(placed.begin(), placed.end(), &sub) != placed.end())
                    e.released_by = visit(*d);
            }
            add_edge(std::move(e));
        });
        if (const memory_region* target = region->alias()) {
            const std::size_t to = visit(*target);
            edge e = make_edge(self, to, reference_kind::alias,
                               fmt::format("{:#x}", region->alias_offset()));
            e.counted = target->counted();
            add_edge(std::move(e));
        }
        if (const memory_region* c = region->container()) visit(*c); // draws its edge to us
        if (const object* owner = region->owner()) {
            const std::size_t o = visit(*owner);
            nodes_[self].owner = o;
            if (region->holds_owner()) add_edge(make_edge(self, o, reference_kind::owner, "owner"));
        }
    }
    if (const auto* d = dynamic_cast_to<device>(&obj); d && d->parent_bus())
        visit(*d->parent_bus());
    if (obj.parent()) visit(*obj.parent());
    return self;
}

inline std::size_t reference_graph::holder_node(const holder& h, held_until until) {
    if (until == held_until::unrealized) {
        const auto* d = dynamic_cast_to<device>(h.obj_);
        QOMEM_ASSERT(d && d->realized(),
                     "a reference held until its holder is unrealized needs a realized device as "
                     "holder, not {}",
                     h.obj_ ? fmt::format("a {}", h.obj_->type().name)
                            : fmt::format("the outside holder '{}'", h.name_));
    }
    if (h.obj_) return visit(*h.obj_);
    if (auto it = outside_.find(h.name_); it != outside_.end()) return it->second;
    node n;
    n.kind = node_kind::outside;
    n.label = h.name_;
    const std::size_t i = add_node(std::move(n));
    outside_.emplace(h.name_, i);
    return i;
}

inline void reference_graph::add_reference(const holder& h, const object& target,
                                           std::string_view what, held_until until) {
    const std::size_t from = holder_node(h, until);
    const std::size_t to = visit(target);
    edge e = make_edge(from, to, reference_kind::held, std::string(what));
    if (until == held_until::unrealized) e.released_by = from;
    add_edge(std::move(e));
}

inline void reference_graph::add_address_space(const holder& h, const address_space& as,
                                               held_until until) {
    const std::size_t from = holder_node(h, until);
    node n;
    n.kind = node_kind::address_space;
    n.label = fmt::format("address space '{}'", as.name());
    const std::size_t self = add_node(std::move(n));
    edge held = make_edge(from, self, reference_kind::held, {});
    if (until == held_until::unrealized) held.released_by = from;
    add_edge(std::move(held));
    const std::size_t root = visit(as.root());
    edge r = make_edge(self, root, reference_kind::root, "root");
    r.counted = as.root().counted();
    add_edge(std::move(r));
}

inline void reference_graph::add_dma_mapping(const holder& h, const dma_mapping& m,
                                             std::string_view what, held_until until) {
    QOMEM_ASSERT(m && m.region(), "add_dma_mapping '{}': the mapping is not live", what);
    const std::size_t from = holder_node(h, until);
    node n;
    n.kind = node_kind::dma_mapping;
    n.label = std::string(what);
    const std::size_t self = add_node(std::move(n));
    edge held = make_edge(from, self, reference_kind::held, {});
    if (until == held_until::unrealized) held.released_by = from;
    add_edge(std::move(held));
    const std::size_t region = visit(*m.region());
    edge d = make_edge(self, region, reference_kind::dma, fmt::format("{:#x} bytes", m.size()));
    d.counted = m.region()->counted();
    add_edge(std::move(d));
}

inline std::optional<std::size_t> reference_graph::find(const object& obj) const noexcept {
    auto it = index_.find(&obj);
    if (it == index_.end() || nodes_[it->second].type != obj.type().name) return std::nullopt;
    return it->second;
}

inline std::optional<std::size_t> reference_graph::find(std::string_view label) const noexcept {
    for (std::size_t i = 0; i < nodes_.size(); ++i)
        if (nodes_[i].label == label) return i;
    return std::nullopt;
}

inline std::vector<std::size_t> reference_graph::references_to(std::size_t n) const {
    std::vector<std::size_t> out;
    for (std::size_t i = 0; i < edges_.size(); ++i)
        if (edges_[i].to == n) out.push_back(i);
    return out;
}

inline std::vector<std::size_t> reference_graph::references_from(std::size_t n) const {
    std::vector<std::size_t> out;
    for (std::size_t i = 0; i < edges_.size(); ++i)
        if (edges_[i].from == n) out.push_back(i);
    return out;
}

inline std::size_t reference_graph::counted_references_to(std::size_t n) const {
    std::size_t c = 0;
    for (const edge& e : edges_)
        if (e.to == n && e.counted) ++c;
    return c;
}

inline std::string reference_graph::describe(std::size_t edge_index) const {
    const edge& e = edges_.at(edge_index);
    std::string what;
    switch (e.kind) {
    case reference_kind::child:
        what = fmt::format("child<> '{}'", e.name);
        break;
    case reference_kind::strong_link:
        what = fmt::format("link<> '{}'", e.name);
        break;
    case reference_kind::subregion:
        what = fmt::format("subregion at {}", e.name);
        break;
    case reference_kind::alias:
        what = fmt::format("alias at {}", e.name);
        break;
    case reference_kind::root:
        what = "address-space root";
        break;
    case reference_kind::owner:
        what = "owner, until the region is freed";
        break;
    case reference_kind::dma:
        what = fmt::format("DMA mapping of {}", e.name);
        break;
    case reference_kind::held:
        what = e.name.empty() ? "held" : e.name;
        break;
    }
    if (e.redirected_from)
        what += fmt::format(": a reference to {}, counted on its owner",
                            nodes_[*e.redirected_from].label);
    if (!e.counted) what += " (not counted)";
    if (e.released_by)
        what += fmt::format(" (until {} is unparented)", nodes_[*e.released_by].label);
    return fmt::format("{} → {}: {}", nodes_[e.from].label, nodes_[e.to].label, what);
}

inline std::string reference_graph::to_dot(std::string_view title) const {
    return dot(title, nullptr, false);
}

inline std::string reference_graph::dot(std::string_view title, const reference_replay* replay,
                                        bool live_only) const {
    std::string out = "digraph references {\n"
                      "  node [shape=box, fontname=\"Helvetica\", fontsize=11];\n"
                      "  edge [fontname=\"Helvetica\", fontsize=9];\n"
                      "  labelloc=t;\n";
    if (!title.empty())
        fmt::format_to(std::back_inserter(out), "  label=\"{}\";\n", detail::dot_escape(title));
    auto shown = [&](std::size_t n) {
        if (!live_only || !replay) return true;
        if (nodes_[n].kind != node_kind::outside) return !replay->finalized(n);
        for (std::size_t i = 0; i < edges_.size(); ++i)
            if (edges_[i].from == n && replay->alive(i)) return true;
        return false; // an outside holder that let go of everything
    };
    for (std::size_t i = 0; i < nodes_.size(); ++i) {
        if (!shown(i)) continue;
        const node& n = nodes_[i];
        std::string label = detail::dot_escape(n.label);
        std::string attrs;
        switch (n.kind) {
        case node_kind::object: {
            label += "\\n" + detail::dot_escape(n.type);
            const std::size_t drawn = counted_references_to(i);
            if (!replay)
                label += drawn == n.ref_count
                             ? fmt::format("\\nrefs={}", n.ref_count)
                             : fmt::format("\\nrefs={} ({} drawn)", n.ref_count, drawn);
            if (n.region) attrs += ", style=\"rounded\"";
            if (n.device) attrs += ", penwidth=2";
            break;
        }
        case node_kind::address_space:
            attrs += ", shape=ellipse";
            break;
        case node_kind::dma_mapping:
            attrs += ", shape=hexagon";
            break;
        case node_kind::outside:
            attrs += ", shape=note";
            break;
        }
        if (replay && n.kind != node_kind::outside) {
            if (replay->finalized(i))
                attrs += ", color=gray, fontcolor=gray";
            else
                attrs += fmt::format(", color=red, fontcolor=red, xlabel=\"count {}\"",
                                     replay->count(i));
        }
        fmt::format_to(std::back_inserter(out), "  n{} [label=\"{}\"{}];\n", i, label, attrs);
    }
    for (std::size_t i = 0; i < edges_.size(); ++i) {
        const edge& e = edges_[i];
        if (!shown(e.from) || !shown(e.to)) continue;
        if (replay && !replay->alive(i)) {
            // Released: kept faintly (the picture keeps its shape), unless
            // only what lives is shown.
            if (!live_only)
                fmt::format_to(std::back_inserter(out),
                               "  n{} -> n{} [color=gray85, style=dotted];\n", e.from, e.to);
            continue;
        }
        // Each part escaped on its own: "\\n" is DOT's line break.
        std::string label;
        std::string style;
        const std::string name = detail::dot_escape(e.name);
        switch (e.kind) {
        case reference_kind::child:
            label = name;
            break;
        case reference_kind::strong_link:
            label = name;
            style = "dashed,bold";
            break;
        case reference_kind::subregion:
            label = "@" + name;
            style = "solid";
            break;
        case reference_kind::alias:
            label = "alias @" + name;
            style = "dashed";
            break;
        case reference_kind::root:
            label = "root";
            break;
        case reference_kind::owner:
            label = "owner";
            style = "bold";
            break;
        case reference_kind::dma:
            label = "DMA";
            break;
        case reference_kind::held:
            label = name;
            style = "dotted";
            break;
        }
        std::string color = e.kind == reference_kind::owner       ? "red"
                            : e.kind == reference_kind::subregion ? "blue"
                            : e.kind == reference_kind::alias     ? "blue"
                            : e.kind == reference_kind::dma       ? "purple"
                            : e.kind == reference_kind::root      ? "darkgreen"
                                                                  : "black";
        if (e.redirected_from) {
            label += fmt::format("\\n({} → its owner)",
                                 detail::dot_escape(nodes_[*e.redirected_from].label));
            color = "darkorange";
        }
        if (!e.counted) {
            label += "\\n(not counted)";
            style = "dotted";
        }
        if (e.released_by)
            label += fmt::format("\\n(until {} unparented)",
                                 detail::dot_escape(nodes_[*e.released_by].label));
        fmt::format_to(std::back_inserter(out), "  n{} -> n{} [label=\"{}\", color={}{}];\n",
                       e.from, e.to, label, color,
                       style.empty() ? std::string() : fmt::format(", style=\"{}\"", style));
    }
    out += "}\n";
    return out;
}

// ---- the replay -----------------------------------------------------------------

inline reference_replay::reference_replay(const reference_graph& g, lifetime_rule rule)
    : g_(g), rule_(rule) {
    using edge = reference_graph::edge;
    if (rule_ == lifetime_rule::owner_piggyback) {
        for (edge& e : g_.edges_) {
            if (e.kind == reference_kind::owner) {
                // QEMU's device_unparent left a device's regions its children.
                std::swap(e.from, e.to);
                e.kind = reference_kind::child;
                e.name = "(its region)";
                continue;
            }
            const auto& target = g_.nodes_[e.to];
            if (e.counted && target.region && target.owner && e.from != *target.owner) {
                e.redirected_from = e.to;
                e.to = *target.owner;
            }
        }
    }
    edge_alive_.assign(g_.edges_.size(), 1);
    finalized_.assign(g_.nodes_.size(), 0);
    count_.assign(g_.nodes_.size(), 0);
    parent_edge_.assign(g_.nodes_.size(), std::nullopt);
    for (std::size_t i = 0; i < g_.edges_.size(); ++i) {
        const edge& e = g_.edges_[i];
        if (e.counted) ++count_[e.to];
        if (e.kind == reference_kind::child) parent_edge_[e.to] = i;
    }
    for (std::size_t n = 0; n < g_.nodes_.size(); ++n)
        if (g_.nodes_[n].kind != node_kind::outside && count_[n] == 0 && !finalized_[n])
            last_reference(n);
}

inline void reference_replay::add_counted_edge(reference_graph::edge e) {
    ++count_[e.to];
    g_.edges_.push_back(std::move(e));
    edge_alive_.push_back(1);
}

inline void reference_replay::drop(std::size_t i) {
    if (!edge_alive_[i]) return;
    edge_alive_[i] = 0;
    const reference_graph::edge e = g_.edges_[i]; // a copy: hooks may add edges
    if (e.kind == reference_kind::child) {
        unparent_hook(e.to, e.from); // while the parent is still set, as unparent() does
        parent_edge_[e.to].reset();
    }
    if (e.counted) dec(e.to);
}

inline void reference_replay::dec(std::size_t n) {
    QOMEM_ASSERT(count_[n] > 0, "reference_replay: count of '{}' below zero", g_.nodes_[n].label);
    if (--count_[n] == 0) last_reference(n);
}

inline void reference_replay::last_reference(std::size_t n) {
    const auto& nd = g_.nodes_[n];
    if (rule_ == lifetime_rule::regions_counted && nd.kind == node_kind::object && !nd.region &&
        hand_over(n))
        return;
    finalize(n);
}

inline bool reference_replay::held_beyond_owner(std::size_t r, std::size_t owner) const {
    std::uint32_t internal = is_child_of(r, owner) ? 1 : 0;
    for (std::size_t i = 0; i < g_.edges_.size(); ++i) {
        const auto& e = g_.edges_[i];
        if (!edge_alive_[i] || e.to != r || !e.counted) continue;
        if (e.kind != reference_kind::subregion && e.kind != reference_kind::alias) continue;
        const auto& from = g_.nodes_[e.from];
        if (from.region && from.owner == owner && is_child_of(e.from, owner)) ++internal;
    }
    return count_[r] > internal;
}

inline bool reference_replay::hand_over(std::size_t n) {
    // object::hand_over_to_followers: the regions held beyond their owner are
    // unparented and each holds it; the owner lives on.
    std::vector<std::size_t> held;
    for (std::size_t i = 0; i < g_.edges_.size(); ++i) {
        const auto& e = g_.edges_[i];
        if (edge_alive_[i] && e.kind == reference_kind::child && e.from == n &&
            g_.nodes_[e.to].region && g_.nodes_[e.to].owner == n && held_beyond_owner(e.to, n))
            held.push_back(i);
    }
    if (held.empty()) return false;
    count_[n] = 1; // our own, while the regions take theirs
    for (std::size_t i : held) drop(i);
    dec(n);
    return true;
}

inline void reference_replay::finalize(std::size_t n) {
    finalized_[n] = 1;
    order_.push_back(n);
    // Newest first, as finalization releases properties; edges added
    // meanwhile are never ours (they come from our regions).
    for (std::size_t i = g_.edges_.size(); i-- > 0;)
        if (edge_alive_[i] && g_.edges_[i].from == n) drop(i);
}

inline void reference_replay::unparent_hook(std::size_t c, std::size_t parent) {
    const auto& nd = g_.nodes_[c];
    auto each = [&](auto&& pick) {
        // Re-scan after each drop: hooks add and release edges.
        for (bool again = true; again;) {
            again = false;
            for (std::size_t i = 0; i < g_.edges_.size(); ++i)
                if (edge_alive_[i] && pick(g_.edges_[i])) {
                    drop(i);
                    again = true;
                    break;
                }
        }
    };
    if (nd.device) {
        // device::on_unparent: unrealize (what it releases), its child buses,
        // its bus link, then (qomem's rule) its regions.
        each([&](const reference_graph::edge& e) {
            return e.released_by == c && e.kind != reference_kind::strong_link;
        });
        each([&](const reference_graph::edge& e) {
            return e.kind == reference_kind::child && e.from == c && g_.nodes_[e.to].bus;
        });
        each([&](const reference_graph::edge& e) {
            return e.released_by == c && e.kind == reference_kind::strong_link;
        });
        if (rule_ == lifetime_rule::regions_counted)
            each([&](const reference_graph::edge& e) {
                return e.kind == reference_kind::child && e.from == c && g_.nodes_[e.to].region &&
                       g_.nodes_[e.to].owner == c;
            });
    }
    if (nd.bus) {
        // bus::on_unparent: every device on it is unparented (and so leaves it).
        for (bool again = true; again;) {
            again = false;
            for (std::size_t i = 0; i < g_.edges_.size(); ++i) {
                const auto& e = g_.edges_[i];
                if (!edge_alive_[i] || e.from != c || e.kind != reference_kind::strong_link ||
                    e.released_by != e.to)
                    continue;
                const std::size_t d = e.to;
                if (parent_edge_[d]) drop(*parent_edge_[d]);
                drop(i); // if its hook did not
                again = true;
                break;
            }
        }
    }
    if (nd.region && rule_ == lifetime_rule::regions_counted && nd.owner == parent &&
        count_[parent] > 0) {
        // memory_region::on_unparent: the region holds its owner, once.
        bool holds = false;
        for (std::size_t i = 0; i < g_.edges_.size(); ++i)
            if (edge_alive_[i] && g_.edges_[i].from == c &&
                g_.edges_[i].kind == reference_kind::owner)
                holds = true;
        if (!holds)
            add_counted_edge(reference_graph::make_edge(c, parent, reference_kind::owner, "owner"));
    }
}

inline void reference_replay::unparent(std::size_t n) {
    if (parent_edge_.at(n)) drop(*parent_edge_[n]);
}

inline void reference_replay::release(std::size_t n) {
    const auto kind = g_.nodes_.at(n).kind;
    QOMEM_ASSERT(kind != node_kind::object,
                 "reference_replay::release of object '{}': objects are unparented, not released",
                 g_.nodes_[n].label);
    const std::size_t end = g_.edges_.size();
    for (std::size_t i = end; i-- > 0;) {
        const auto& e = g_.edges_[i];
        if (!edge_alive_[i]) continue;
        if (kind == node_kind::outside ? e.from == n : e.to == n) drop(i);
    }
}

inline void reference_replay::release_outside() {
    for (std::size_t n = g_.nodes_.size(); n-- > 0;)
        if (g_.nodes_[n].kind == node_kind::outside) release(n);
}

inline std::vector<std::size_t> reference_replay::holders_of(std::size_t n) const {
    std::vector<std::size_t> out;
    for (std::size_t i = 0; i < g_.edges_.size(); ++i)
        if (edge_alive_[i] && g_.edges_[i].to == n && g_.edges_[i].counted) out.push_back(i);
    return out;
}

inline std::vector<std::size_t> reference_replay::live() const {
    std::vector<std::size_t> out;
    for (std::size_t n = 0; n < g_.nodes_.size(); ++n)
        if (g_.nodes_[n].kind != node_kind::outside && !finalized_[n]) out.push_back(n);
    return out;
}

inline std::size_t reference_replay::live_objects() const {
    std::size_t c = 0;
    for (std::size_t n : live())
        if (g_.nodes_[n].kind == node_kind::object) ++c;
    return c;
}

inline std::vector<reference_replay::cycle> reference_replay::cycles() const {
    const std::size_t count = g_.nodes_.size();
    std::vector<char> is_live(count, 0);
    for (std::size_t n : live()) is_live[n] = 1;
    // The live counted references between live nodes.
    std::vector<std::vector<std::size_t>> out_edges(count);
    for (std::size_t i = 0; i < g_.edges_.size(); ++i) {
        const auto& e = g_.edges_[i];
        if (edge_alive_[i] && e.counted && is_live[e.from] && is_live[e.to])
            out_edges[e.from].push_back(i);
    }
    // Tarjan's strongly connected components.
    constexpr std::size_t unset = static_cast<std::size_t>(-1);
    std::vector<std::size_t> index(count, unset), low(count, 0), comp(count, unset);
    std::vector<char> on_stack(count, 0);
    std::vector<std::size_t> stack;
    std::vector<std::vector<std::size_t>> groups;
    std::size_t next = 0;
    auto strongconnect = [&](auto& self, std::size_t v) -> void {
        index[v] = low[v] = next++;
        stack.push_back(v);
        on_stack[v] = 1;
        for (std::size_t i : out_edges[v]) {
            const std::size_t w = g_.edges_[i].to;
            if (index[w] == unset) {
                self(self, w);
                low[v] = std::min(low[v], low[w]);
            } else if (on_stack[w]) {
                low[v] = std::min(low[v], index[w]);
            }
        }
        if (low[v] == index[v]) {
            std::vector<std::size_t> group;
            std::size_t w;
            do {
                w = stack.back();
                stack.pop_back();
                on_stack[w] = 0;
                comp[w] = groups.size();
                group.push_back(w);
            } while (w != v);
            std::sort(group.begin(), group.end());
            groups.push_back(std::move(group));
        }
    };
    for (std::size_t n = 0; n < count; ++n)
        if (is_live[n] && index[n] == unset) strongconnect(strongconnect, n);

    std::vector<cycle> out;
    for (std::size_t gi = 0; gi < groups.size(); ++gi) {
        const auto& group = groups[gi];
        const std::size_t start = group.front();
        // One cycle through `start`: breadth first inside the group.
        std::vector<std::size_t> via(count, unset); // the edge that reached a node
        std::deque<std::size_t> queue{start};
        std::optional<std::size_t> closing;
        std::vector<char> seen(count, 0);
        seen[start] = 1;
        while (!queue.empty() && !closing) {
            const std::size_t v = queue.front();
            queue.pop_front();
            for (std::size_t i : out_edges[v]) {
                const std::size_t w = g_.edges_[i].to;
                if (comp[w] != gi) continue;
                if (w == start) {
                    closing = i;
                    break;
                }
                if (!seen[w]) {
                    seen[w] = 1;
                    via[w] = i;
                    queue.push_back(w);
                }
            }
        }
        if (!closing) continue; // a single node without a self-reference: no cycle
        cycle c;
        c.members = group;
        for (std::size_t v = g_.edges_[*closing].from; v != start; v = g_.edges_[via[v]].from)
            c.path.push_back(via[v]);
        std::reverse(c.path.begin(), c.path.end());
        c.path.push_back(*closing);
        // What it keeps alive: the live nodes reachable from it, outside it.
        std::vector<char> reached(count, 0);
        std::vector<std::size_t> todo(group.begin(), group.end());
        for (std::size_t v : group) reached[v] = 1;
        while (!todo.empty()) {
            const std::size_t v = todo.back();
            todo.pop_back();
            for (std::size_t i : out_edges[v]) {
                const std::size_t w = g_.edges_[i].to;
                if (!reached[w]) {
                    reached[w] = 1;
                    c.keeps_alive.push_back(w);
                    todo.push_back(w);
                }
            }
        }
        std::sort(c.keeps_alive.begin(), c.keeps_alive.end());
        out.push_back(std::move(c));
    }
    std::sort(out.begin(), out.end(),
              [](const cycle& a, const cycle& b) { return a.members.front() < b.members.front(); });
    return out;
}

inline std::string reference_replay::report() const {
    const auto left = live();
    if (left.empty()) return "nothing leaks\n";
    auto names = [&](const std::vector<std::size_t>& ns) {
        std::string s;
        for (std::size_t n : ns) s += (s.empty() ? "" : ", ") + g_.nodes_[n].label;
        return s;
    };
    std::string out =
        fmt::format("{} leak ({} of them objects): {}\n", left.size(), live_objects(), names(left));
    for (const cycle& c : cycles()) {
        out += fmt::format("  cycle of {}:\n", names(c.members));
        for (std::size_t i : c.path) out += fmt::format("    {}\n", g_.describe(i));
        if (!c.keeps_alive.empty())
            out += fmt::format("    keeps alive: {}\n", names(c.keeps_alive));
    }
    return out;
}

} // namespace qomem
