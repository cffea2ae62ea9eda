// Tests for qomem/reference_graph.hpp: the snapshot draws every reference the
// library knows, and the replay finds what leaks under qomem's rule and under
// QEMU's former one (a reference to a region is a reference to its owner).
// Each expected answer is derived in the test's comments from the rules, on
// graphs small enough to reason about by hand; where the library can run the
// same teardown, the replay is checked against it.
#include <algorithm>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <qomem/address_space.hpp>
#include <qomem/device.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/memory_system.hpp>
#include <qomem/object.hpp>
#include <qomem/reference_graph.hpp>

#include "test_support.hpp"

using namespace qomem;
using qomem_test::event_recorder;
using qomem_test::leak_check;
using qomem_test::only;
using strings = std::vector<std::string>;

namespace {

/// A device that can hold, in members, what a device of QEMU's holds: an
/// address space, a DMA mapping, a reference to a region. It ends the first
/// two in its unrealize step (the tests' snapshots say otherwise when they
/// ask "what if it did not").
class rg_device : public device {
    QOMEM_OBJECT(rg_device, "rg-device", device)
public:
    rg_device() = default;
    std::optional<address_space> space;
    address_space* dma_through = nullptr;
    dma_mapping mapping;

protected:
    void do_unrealize() noexcept override {
        if (mapping) dma_through->unmap(mapping, 0);
        space.reset();
    }
};

/// The labels of nodes, in the order given.
strings labels(const reference_graph& g, const std::vector<std::size_t>& nodes) {
    strings out;
    for (std::size_t n : nodes) out.push_back(g.nodes()[n].label);
    return out;
}

/// The labels of the objects a replay finalized, in order.
strings finalized_objects(const reference_replay& r) {
    strings out;
    for (std::size_t n : r.finalization_order())
        if (r.graph().nodes()[n].kind == node_kind::object) out.push_back(r.graph().nodes()[n].label);
    return out;
}

std::size_t node(const reference_graph& g, std::string_view label) {
    const auto n = g.find(label);
    REQUIRE(n);
    return *n;
}

/// The kinds of the references held on `label`, sorted by holder label.
strings references_to(const reference_graph& g, std::string_view label) {
    strings out;
    for (std::size_t e : g.references_to(node(g, label)))
        out.push_back(g.nodes()[g.edges()[e].from].label + " " + std::string(to_string(g.edges()[e].kind)));
    std::sort(out.begin(), out.end());
    return out;
}

} // namespace

TEST_CASE("reference_graph: a snapshot draws one edge per reference the library knows — child<> "
          "properties, strong links, subregions, aliases, an unparented region's owner — and "
          "outside a memory system that is every reference",
          "[reference_graph]") {
    leak_check leaks;
    auto root = container::make_root();
    auto d = make<rg_device>();
    d->set_id("d");
    root->add_child("d", *d);
    auto holder = make<container>();
    holder->add_link("target", d.get(), link_strength::strong);
    root->add_child("holder", *holder);
    auto bar = make_container(*d, "bar", 0x2000);
    auto buf = make_ram(*d, "buf", 0x1000);
    auto alias = make_alias(*d, "buf-alias", *buf, 0, 0x1000);
    auto loose = make_ram(nullptr, "loose", 0x1000); // ownerless: its container does not count it
    bar->add_subregion(0x1000, *buf);
    bar->add_subregion(0, *loose);
    auto extra = make_ram(*d, "extra", 0x1000);
    unparent(*extra); // extra now holds d
    holder.reset();
    bar.reset();
    buf.reset();
    alias.reset();

    reference_graph g;
    g.add_reference(reference_graph::outside("root handle"), *root);
    g.add_reference(reference_graph::outside("loose handle"), *loose);
    g.add_reference(reference_graph::outside("extra handle"), *extra);
    g.add_reference(reference_graph::outside("d handle"), *d);

    CHECK(references_to(g, "d") == strings{"/ child<>", "d handle held", "extra owner", "holder link<>"});
    CHECK(references_to(g, "buf") == strings{"bar subregion", "buf-alias alias", "d child<>"});
    CHECK(references_to(g, "loose") == strings{"bar subregion", "loose handle held"});
    const auto& loose_in_bar = g.edges()[g.references_to(node(g, "loose")).front()];
    CHECK(!loose_in_bar.counted);
    CHECK(g.nodes()[node(g, "buf")].owner == node(g, "d"));
    CHECK(!g.nodes()[node(g, "loose")].owner);
    // Nothing here belongs to a memory system (no flat view holds anything),
    // so every object's count is explained by the counted references drawn.
    for (std::size_t n = 0; n < g.nodes().size(); ++n) {
        const auto& nd = g.nodes()[n];
        if (nd.kind != node_kind::object) continue;
        INFO(nd.label);
        CHECK(g.counted_references_to(n) == nd.ref_count);
    }
    bar = ref_ptr<memory_region>(qomem::dynamic_cast_to<memory_region>(d->child("bar[0]")));
    bar->del_subregion(*loose);
    bar.reset();
}

TEST_CASE("reference_graph replay: a container and its subregion with the same owner leak under "
          "QEMU's former rule and not under qomem's, which the library confirms",
          "[reference_graph][replay]") {
    leak_check leaks;
    event_recorder rec;
    auto root = container::make_root();
    {
        auto d = make<rg_device>();
        d->set_id("d");
        root->add_child("d", *d);
        rec.label(*d, "d");
        auto bar = make_container(*d, "bar", 0x2000);
        auto sub = make_ram(*d, "sub", 0x1000);
        rec.label(*bar, "bar");
        rec.label(*sub, "sub");
        bar->add_subregion(0, *sub);
    }
    reference_graph g;
    g.add_reference(reference_graph::outside("main"), *root);

    // qomem's rule: main lets go, / is finalized and unparents d; d's hook
    // unparents bar and sub, each then holding d; bar (held by nothing else)
    // is freed and lets go of sub and d; sub is freed and lets go of d; d's
    // last reference, its parent's, goes and d is finalized.
    reference_replay current(g, lifetime_rule::regions_counted);
    current.release_outside();
    CHECK(current.live().empty());
    CHECK(current.report() == "nothing leaks\n");
    CHECK(finalized_objects(current) == strings{"/", "bar", "sub", "d"});

    // The former rule: bar's reference to sub counts on d, so once / lets go
    // d still has that one; bar, a child of d, is released only when d is
    // finalized: d and bar hold each other, and sub (d's child) lives on.
    reference_replay former(g, lifetime_rule::owner_piggyback);
    former.release_outside();
    CHECK(former.live_objects() == 3);
    const auto cycles = former.cycles();
    REQUIRE(cycles.size() == 1);
    CHECK(labels(former.graph(), cycles[0].members) == strings{"d", "bar"});
    CHECK(labels(former.graph(), cycles[0].keeps_alive) == strings{"sub"});
    REQUIRE(cycles[0].path.size() == 2);
    const auto& back = former.graph().edges()[cycles[0].path[1]];
    CHECK(back.kind == reference_kind::subregion);
    CHECK(back.redirected_from == node(g, "sub"));
    CHECK_THAT(former.report(), Catch::Contains("bar → d: subregion at 0x0: a reference to sub, "
                                                "counted on its owner"));

    // The library, which follows qomem's rule, frees all of it, in the
    // replay's order.
    root.reset();
    CHECK(only(rec.take(), "finalizing ") ==
          strings{"finalizing container", "finalizing bar", "finalizing sub", "finalizing d"});
}

TEST_CASE("reference_graph replay: a device outside the tree whose container holds its own "
          "subregion: qomem's rule frees it with its last handle, the former rule leaks it",
          "[reference_graph][replay]") {
    leak_check leaks;
    event_recorder rec;
    auto d = make<rg_device>();
    d->set_id("d");
    auto bar = make_container(*d, "bar", 0x2000);
    auto sub = make_ram(*d, "sub", 0x1000);
    rec.label(*d, "d");
    rec.label(*bar, "bar");
    rec.label(*sub, "sub");
    bar->add_subregion(0, *sub);
    bar.reset();
    sub.reset();
    reference_graph g;
    g.add_reference(reference_graph::outside("main"), *d);

    // qomem's: d's count reaches zero; bar and sub are held only by d and by
    // d's own region (bar → sub): not held beyond d, so d is finalized and
    // releases them (object::last_reference_dropped).
    // d releases its children newest first: sub (still held by bar), then
    // bar, which is freed and lets go of sub.
    reference_replay current(g, lifetime_rule::regions_counted);
    current.release_outside();
    CHECK(current.live().empty());
    CHECK(finalized_objects(current) == strings{"d", "bar", "sub"});
    // The former: bar's reference to sub is one on d: d never reaches zero.
    reference_replay former(g, lifetime_rule::owner_piggyback);
    former.release_outside();
    CHECK(labels(former.graph(), former.live()) == strings{"d", "bar", "sub"});
    d.reset(); // the library: freed, in the replay's order
    CHECK(only(rec.take(), "finalizing ") == strings{"finalizing d", "finalizing bar", "finalizing sub"});
}

TEST_CASE("reference_graph replay: an alias of a region of its own leaks its owner under the "
          "former rule only",
          "[reference_graph][replay]") {
    leak_check leaks;
    auto root = container::make_root();
    {
        auto d = make<rg_device>();
        d->set_id("d");
        root->add_child("d", *d);
        auto ram = make_ram(*d, "ram", 0x1000);
        make_alias(*d, "ram-alias", *ram, 0, 0x1000);
    }
    reference_graph g;
    g.add_reference(reference_graph::outside("main"), *root);
    reference_replay current(g, lifetime_rule::regions_counted);
    current.release_outside();
    CHECK(current.live().empty());
    // The alias's reference to ram counts on d; the alias is d's child.
    reference_replay former(g, lifetime_rule::owner_piggyback);
    former.release_outside();
    const auto cycles = former.cycles();
    REQUIRE(cycles.size() == 1);
    CHECK(labels(former.graph(), cycles[0].members) == strings{"d", "ram-alias"});
    CHECK(labels(former.graph(), cycles[0].keeps_alive) == strings{"ram"});
}

TEST_CASE("reference_graph replay: self-DMA — a device holding a mapping of its own RAM — leaks "
          "under both rules if it keeps the mapping until it is finalized, and under neither "
          "if it ends it when unrealized",
          "[reference_graph][replay][dma]") {
    leak_check leaks;
    auto root = container::make_root();
    auto sys = make_container(nullptr, "sys", u128_2_64);
    auto ms = memory_system::make();
    std::optional<address_space> space(std::in_place, *ms, *sys, "memory");
    auto d = make<rg_device>();
    d->set_id("d");
    root->add_child("d", *d);
    d->realize();
    auto buf = make_ram(*d, "buf", 0x1000);
    d->map_region(*sys, 0x1000, *buf);
    buf.reset();
    d->dma_through = &*space;
    d->mapping = space->map(0x1000, 0x100, false);
    REQUIRE(d->mapping);

    auto snapshot = [&](held_until until) {
        reference_graph g;
        g.add_reference(reference_graph::outside("main"), *root);
        g.add_reference(reference_graph::outside("main"), *sys);
        g.add_address_space(reference_graph::outside("main"), *space);
        g.add_dma_mapping(*d, d->mapping, "self-DMA", until);
        return g;
    };

    SECTION("ended at unrealize: nothing leaks under either rule") {
        // d's unparent hook unrealizes it first: the mapping and the
        // placement go, whichever rule counts them.
        const reference_graph g = snapshot(held_until::unrealized);
        for (lifetime_rule rule : {lifetime_rule::regions_counted, lifetime_rule::owner_piggyback}) {
            reference_replay r(g, rule);
            r.release_outside();
            CHECK(r.report() == "nothing leaks\n");
        }
    }
    SECTION("kept until finalized: both rules leak d and buf") {
        const reference_graph g = snapshot(held_until::finalized);
        // qomem's: d's hook unparents buf, which then holds d; buf is held by
        // the mapping, which d holds: d → mapping → buf → d.
        reference_replay current(g, lifetime_rule::regions_counted);
        current.release_outside();
        auto cycles = current.cycles();
        REQUIRE(cycles.size() == 1);
        CHECK(labels(current.graph(), cycles[0].members) == strings{"d", "buf", "self-DMA"});
        CHECK(current.graph().edges()[cycles[0].path.front()].kind == reference_kind::held);
        CHECK_THAT(current.report(), Catch::Contains("buf → d: owner"));
        // The former: the mapping holds d itself: d → mapping → d; buf is
        // d's child.
        reference_replay former(g, lifetime_rule::owner_piggyback);
        former.release_outside();
        cycles = former.cycles();
        REQUIRE(cycles.size() == 1);
        CHECK(labels(former.graph(), cycles[0].members) == strings{"d", "self-DMA"});
        CHECK(labels(former.graph(), cycles[0].keeps_alive) == strings{"buf"});
        CHECK(former.live_objects() == 2);
    }
    // The library (d ends its mapping when unrealized): all freed.
    root.reset();
    space.reset();
    ms->synchronize();
    d.reset();
}

TEST_CASE("reference_graph replay: an address space rooted in the device's own region leaks "
          "under both rules unless destroyed at unrealize",
          "[reference_graph][replay]") {
    leak_check leaks;
    auto ms = memory_system::make();
    auto root = container::make_root();
    auto d = make<rg_device>();
    d->set_id("d");
    root->add_child("d", *d);
    d->realize();
    {
        auto dma_root = make_container(*d, "dma-root", 0x10000);
        d->space.emplace(*ms, *dma_root, "d-dma");
    }
    auto snapshot = [&](held_until until) {
        reference_graph g;
        g.add_reference(reference_graph::outside("main"), *root);
        g.add_address_space(*d, *d->space, until);
        return g;
    };
    for (lifetime_rule rule : {lifetime_rule::regions_counted, lifetime_rule::owner_piggyback}) {
        CAPTURE(static_cast<int>(rule));
        reference_replay ok(snapshot(held_until::unrealized), rule);
        ok.release_outside();
        CHECK(ok.live().empty());
        // Kept: d → the address space → dma-root, which (qomem's) holds d
        // once unparented, or (the former) is a reference to d.
        reference_replay kept(snapshot(held_until::finalized), rule);
        kept.release_outside();
        CHECK(kept.live_objects() == 2);
        REQUIRE(kept.cycles().size() == 1);
    }
    root.reset();
    d.reset();
}

TEST_CASE("reference_graph replay: another device's DMA of a device's RAM across its unplug "
          "keeps the device alive under both rules — through the region under qomem's, "
          "directly under the former — and nothing leaks once it ends",
          "[reference_graph][replay][dma]") {
    leak_check leaks;
    auto root = container::make_root();
    auto sys = make_container(nullptr, "sys", u128_2_64);
    auto ms = memory_system::make();
    std::optional<address_space> space(std::in_place, *ms, *sys, "memory");
    auto nic = make<rg_device>();
    nic->set_id("nic");
    root->add_child("nic", *nic);
    nic->realize();
    auto ring = make_ram(*nic, "ring", 0x1000);
    nic->map_region(*sys, 0x1000, *ring);
    ring.reset();
    auto disk = make<rg_device>();
    disk->set_id("disk");
    root->add_child("disk", *disk);
    disk->realize();
    disk->dma_through = &*space;
    disk->mapping = space->map(0x1000, 0x100, false);
    REQUIRE(disk->mapping);

    reference_graph g;
    g.add_reference(reference_graph::outside("main"), *root);
    g.add_reference(reference_graph::outside("main"), *sys);
    g.add_address_space(reference_graph::outside("main"), *space);
    g.add_dma_mapping(*disk, disk->mapping, "disk's DMA", held_until::unrealized);
    const std::size_t n = node(g, "nic");
    const std::size_t dma = node(g, "disk's DMA");

    reference_replay current(g, lifetime_rule::regions_counted);
    reference_replay former(g, lifetime_rule::owner_piggyback);
    current.unparent(n);
    former.unparent(n);
    REQUIRE(current.holders_of(n).size() == 1);
    CHECK(current.graph().describe(current.holders_of(n)[0]) == "ring → nic: owner, until the region is freed");
    REQUIRE(former.holders_of(n).size() == 1);
    CHECK(former.graph().edges()[former.holders_of(n)[0]].from == dma);
    current.release(dma);
    former.release(dma);
    CHECK(current.finalized(n));
    CHECK(former.finalized(n));
    CHECK(finalized_objects(current) == strings{"ring", "nic"});

    // The library agrees with qomem's replay.
    event_recorder rec;
    rec.label(*nic, "nic");
    rec.label(*qomem::dynamic_cast_to<memory_region>(nic->child("ring[0]")), "ring");
    rg_device* raw = nic.get();
    nic.reset();
    unparent(*raw);
    ms->synchronize();
    CHECK(only(rec.take(), "finalizing ").empty());
    disk->dma_through->unmap(disk->mapping, 0);
    ms->synchronize();
    CHECK(only(rec.take(), "finalizing ") == strings{"finalizing ring", "finalizing nic"});
    root.reset();
    space.reset();
    disk.reset();
}

TEST_CASE("reference_graph replay: a bus unparents its devices and a device leaves its bus, in "
          "the library's order",
          "[reference_graph][replay]") {
    leak_check leaks;
    event_recorder rec;
    auto root = container::make_root();
    {
        auto c = make<rg_device>();
        c->set_id("c");
        auto b = make<bus>();
        c->add_child("bus0", *b);
        root->add_child("c", *c);
        auto x = make<rg_device>();
        x->set_id("x");
        x->plug_into(*b);
        root->add_child("x", *x);
        auto r = make_ram(*x, "r", 0x1000);
        rec.label(*root, "/");
        rec.label(*c, "c");
        rec.label(*b, "bus0");
        rec.label(*x, "x");
        rec.label(*r, "r");
    }
    reference_graph g;
    g.add_reference(reference_graph::outside("main"), *root);
    // x is held by / and by its bus's link, which x's hook releases.
    const auto link = g.references_to(node(g, "x"));
    CHECK(std::count_if(link.begin(), link.end(), [&](std::size_t e) {
              return g.edges()[e].kind == reference_kind::strong_link &&
                     g.edges()[e].released_by == node(g, "x");
          }) == 1);

    reference_replay current(g, lifetime_rule::regions_counted);
    current.release_outside();
    CHECK(current.live().empty());
    // / releases its newest child first: x (leaves bus0, unparents r, which
    // is freed and lets go of x; then /'s reference goes), then c (its hook
    // unparents bus0).
    const strings expected{"/", "r", "x", "bus0", "c"};
    CHECK(finalized_objects(current) == expected);
    root.reset();
    strings real;
    for (const std::string& e : only(rec.take(), "finalizing ")) real.push_back(e.substr(11));
    CHECK(real == expected);
}

TEST_CASE("reference_graph replay: a device keeping a reference to its own region is a cycle "
          "under qomem's rule, named with its references",
          "[reference_graph][replay]") {
    leak_check leaks;
    auto root = container::make_root();
    auto d = make<rg_device>();
    d->set_id("d");
    root->add_child("d", *d);
    auto r = make_ram(*d, "r", 0x1000);
    reference_graph g;
    g.add_reference(reference_graph::outside("main"), *root);
    g.add_reference(*d, *r, "d's ref_ptr to r"); // as if kept in a member
    reference_replay current(g, lifetime_rule::regions_counted);
    current.release_outside();
    const auto cycles = current.cycles();
    REQUIRE(cycles.size() == 1);
    strings path;
    for (std::size_t e : cycles[0].path) path.push_back(current.graph().describe(e));
    CHECK(path == strings{"d → r: d's ref_ptr to r", "r → d: owner, until the region is freed"});
    r.reset();
    root.reset();
    d.reset();
}

TEST_CASE("reference_graph refuses misuse before changing anything: a reference held until "
          "unrealized by something that is not a realized device, releasing an object, "
          "snapshotting an ended mapping",
          "[reference_graph]") {
    leak_check leaks;
    qomem_test::throwing_assertions asserts;
    auto d = make<rg_device>();
    auto r = make_ram(*d, "r", 0x1000);
    reference_graph g;
    REQUIRE_THROWS_AS(g.add_reference(reference_graph::outside("main"), *r, "x", held_until::unrealized),
                      assertion_failure);
    REQUIRE_THROWS_AS(g.add_reference(*d, *r, "x", held_until::unrealized), assertion_failure); // not realized
    CHECK(g.nodes().empty());
    dma_mapping none;
    REQUIRE_THROWS_AS(g.add_dma_mapping(reference_graph::outside("main"), none, "none"), assertion_failure);
    CHECK(g.nodes().empty());
    g.add_reference(reference_graph::outside("main"), *d);
    reference_replay rp(g, lifetime_rule::regions_counted);
    REQUIRE_THROWS_AS(rp.release(node(g, "rg-device")), assertion_failure);
    CHECK(!rp.finalized(node(g, "rg-device")));
    r.reset();
    d.reset();
}

TEST_CASE("reference_graph to_dot: every node and reference, labels escaped, ownerless "
          "references marked not counted",
          "[reference_graph][dot]") {
    leak_check leaks;
    auto d = make<rg_device>();
    d->set_id("d");
    auto c = make_container(nullptr, "say \"hi\"", 0x2000);
    auto r = make_ram(*d, "r", 0x1000);
    auto loose = make_ram(nullptr, "loose", 0x1000);
    c->add_subregion(0, *r);
    c->add_subregion(0x1000, *loose);
    reference_graph g;
    g.add_reference(reference_graph::outside("main"), *c, "handle");
    g.add_reference(reference_graph::outside("main"), *loose, "handle");
    g.add_reference(reference_graph::outside("main"), *d, "handle");
    const std::string dot = g.to_dot("a \"title\"");
    CHECK(dot.rfind("digraph references {\n", 0) == 0);
    CHECK(dot.find("label=\"a \\\"title\\\"\";") != std::string::npos);
    CHECK(dot.find("say \\\"hi\\\"") != std::string::npos);
    const std::string sub = fmt::format("  n{} -> n{} [label=\"@0x0\", color=blue, style=\"solid\"];",
                                        node(g, "say \"hi\""), node(g, "r"));
    CHECK(dot.find(sub) != std::string::npos);
    CHECK(dot.find(fmt::format("  n{} -> n{} [label=\"@0x1000\\n(not counted)\"", node(g, "say \"hi\""),
                               node(g, "loose"))) != std::string::npos);
    // One line per node and per reference.
    const auto lines = static_cast<std::size_t>(std::count(dot.begin(), dot.end(), '\n'));
    CHECK(lines == 5 + g.nodes().size() + g.edges().size() + 1);
    c->del_subregion(*loose);
    c->del_subregion(*r);
    r.reset();
}
