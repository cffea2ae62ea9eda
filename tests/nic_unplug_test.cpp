// The NIC hot-unplug story of examples/nic_unplug.cpp, run from the same
// scenario (examples/nic_unplug_scenario.hpp): the exact order in which its
// objects are finalized, what QEMU's former rule would leak (computed by the
// reference graph from the real objects), and that nothing is left alive.
// The expected orders are derived in the comments from the lifetime rules.
#include <algorithm>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <qomem/object.hpp>
#include <qomem/reference_graph.hpp>

#include "../examples/nic_unplug_scenario.hpp"
#include "test_support.hpp"

using qomem::lifetime_rule;
using qomem::reference_replay;
using strings = std::vector<std::string>;

namespace {

strings labels(const qomem::reference_graph& g, const std::vector<std::size_t>& nodes) {
    strings out;
    for (std::size_t n : nodes) out.push_back(g.nodes()[n].label);
    return out;
}

strings object_labels(const reference_replay& r, std::size_t from = 0) {
    strings out;
    const auto& order = r.finalization_order();
    for (std::size_t i = from; i < order.size(); ++i)
        if (r.graph().nodes()[order[i]].kind == qomem::node_kind::object)
            out.push_back(r.graph().nodes()[order[i]].label);
    return out;
}

} // namespace

TEST_CASE("nic unplug story: regions are finalized in the order the rules give, each before "
          "the NIC, which outlives its unplug exactly as long as disk0's DMA, and nothing is left",
          "[nic_unplug][lifetime][hotplug]") {
    qomem_test::leak_check leaks;
    nic_demo::event_trace trace;
    std::optional<nic_demo::scenario> s(std::in_place);

    // Building finalizes nothing.
    CHECK(trace.take_finalized().empty());

    // Step 1: the guest reaches the NIC's registers and ring through "memory";
    // the NIC reads the descriptor through its own address space.
    CHECK(s->guest_sends("hello") == nic_demo::nic_registers::nic_id);
    CHECK(s->nic0().last_sent() == "hello");
    REQUIRE(s->disk_starts_dma());
    const qomem::reference_graph running = s->snapshot();

    // Step 2: device_del. nic0's unparent hook unrealizes it — the self-DMA
    // mapping ends, nic-dma is destroyed, the BAR's placement is undone —
    // then unparents its regions in the order it made them: nic-bar (held by
    // nothing else: freed, letting go of nic-mmio and nic-ring), nic-mmio
    // (freed), nic-ring (held by disk0's mapping: lives on, holding nic0),
    // nic-dma-root (freed, letting go of nic-ring-alias), nic-ring-alias
    // (freed, letting go of nic-ring). The peripheral container's reference
    // then goes; nic-ring's keeps nic0.
    s->hot_unplug();
    CHECK(trace.take_finalized() == strings{"nic-bar", "nic-mmio", "nic-dma-root", "nic-ring-alias"});
    const auto [value, result] = s->guest_read32(nic_demo::nic_base + nic_demo::nic_registers::id);
    CHECK(result == qomem::memtx_decode_error); // a hole for the guest, at once
    CHECK(value == 0);
    CHECK(s->machine().events().take().empty()); // DEVICE_DELETED waits for the finalization
    const qomem::reference_graph unplugged = s->snapshot();
    const auto n = unplugged.find("nic0");
    REQUIRE(n);
    const auto holders = unplugged.references_to(*n);
    REQUIRE(holders.size() == 1);
    CHECK(unplugged.describe(holders[0]) == "nic-ring → nic0: owner, until the region is freed");

    // Step 3: the DMA completes. The mapping was nic-ring's last holder:
    // nic-ring is freed, then its reference to nic0 goes, the last one.
    CHECK(s->disk_completes_dma() == "hello"); // the ring stayed valid across the unplug
    CHECK(trace.take_finalized() == strings{"nic-ring", "nic0"});
    CHECK(s->machine().events().take() ==
          std::vector<qomem::device_deleted>{{"nic0", "/machine/peripheral/nic0"}});

    // Step 4: shutdown. / is finalized and releases /machine, which
    // releases its containers newest first (it made unattached, peripheral,
    // peripheral-anon); peripheral releases disk0; unattached releases ram
    // (added after system) and then system.
    s.reset();
    CHECK(trace.take_finalized() == strings{"/", "machine", "peripheral-anon", "peripheral", "disk0",
                                            "unattached", "ram", "system"});
    CHECK(trace.regions_before_owners());
    CHECK(qomem::live_object_count() == 0);

    // The replay of qomem's rule, from step 1's references, follows the same
    // steps to the same finalizations: the library does what the rule says.
    reference_replay current(running, lifetime_rule::regions_counted);
    const std::size_t before = current.finalization_order().size();
    current.unparent(*running.find("nic0"));
    CHECK(object_labels(current, before) ==
          strings{"nic-bar", "nic-mmio", "nic-dma-root", "nic-ring-alias"});
    const auto dma = running.find("disk0's DMA from nic-ring");
    REQUIRE(dma);
    const std::size_t mid = current.finalization_order().size();
    current.release(*dma);
    CHECK(object_labels(current, mid) == strings{"nic-ring", "nic0"});
    current.release_outside();
    CHECK(current.live().empty());
}

TEST_CASE("nic unplug story under QEMU's former rule: nic0 and its five regions leak, kept by "
          "the cycle of nic0 and the regions of its that refer to its other regions",
          "[nic_unplug][reference_graph]") {
    qomem_test::leak_check leaks;
    std::optional<nic_demo::scenario> s(std::in_place);
    s->guest_sends("hello");
    REQUIRE(s->disk_starts_dma());
    const qomem::reference_graph running = s->snapshot();
    s.reset();

    // Under the former rule every reference into one of nic0's regions from
    // anything but nic0 counts on nic0. The unplug releases those that
    // unrealize ends (the placement of nic-bar, nic-dma, the self-DMA), the
    // completed DMA releases disk0's, and main() lets go of the rest; what
    // is left are the references nic0's own regions hold on its other
    // regions: nic-bar → nic-mmio and → nic-ring, nic-dma-root →
    // nic-ring-alias, nic-ring-alias → nic-ring. Each counts on nic0 and is
    // released only when the region holding it is finalized, which (a child
    // of nic0) happens only when nic0 is. So nic0, nic-bar, nic-dma-root and
    // nic-ring-alias hold each other; nic-mmio and nic-ring, which hold
    // nothing, are kept alive by them: 6 objects leak.
    reference_replay former(running, lifetime_rule::owner_piggyback);
    former.unparent(*running.find("nic0"));
    former.release(*running.find("disk0's DMA from nic-ring"));
    former.release_outside();
    CHECK(former.live_objects() == 6);
    const auto cycles = former.cycles();
    REQUIRE(cycles.size() == 1);
    strings members = labels(former.graph(), cycles[0].members);
    std::sort(members.begin(), members.end());
    CHECK(members == strings{"nic-bar", "nic-dma-root", "nic-ring-alias", "nic0"});
    strings kept = labels(former.graph(), cycles[0].keeps_alive);
    std::sort(kept.begin(), kept.end());
    CHECK(kept == strings{"nic-mmio", "nic-ring"});

    // Dropping every outside handle at once, without the unplug first, ends
    // the same way (the tree's teardown unparents nic0 too).
    reference_replay at_once(running, lifetime_rule::owner_piggyback);
    at_once.release_outside();
    CHECK(at_once.live_objects() == 6);
    // And under qomem's rule nothing leaks either way.
    reference_replay current(running, lifetime_rule::regions_counted);
    current.release_outside();
    CHECK(current.report() == "nothing leaks\n");
}

TEST_CASE("nic unplug story: had the NIC kept its address space and self-DMA mapping until it "
          "was finalized, qomem's rule would leak it too, through its regions' owner references",
          "[nic_unplug][reference_graph]") {
    qomem_test::leak_check leaks;
    std::optional<nic_demo::scenario> s(std::in_place);
    REQUIRE(s->disk_starts_dma());
    const qomem::reference_graph careless = s->snapshot(/*nic_keeps_until_finalized=*/true);
    s.reset();
    // Once unparented, nic-dma-root and nic-ring hold nic0; nic0 holds
    // nic-dma (→ nic-dma-root) and its mapping (→ nic-ring): cycles. Objects
    // left: nic0, nic-dma-root, nic-ring-alias (nic-dma-root's subregion)
    // and nic-ring.
    reference_replay r(careless, lifetime_rule::regions_counted);
    r.release_outside();
    strings live;
    for (std::size_t n : r.live())
        if (r.graph().nodes()[n].kind == qomem::node_kind::object) live.push_back(r.graph().nodes()[n].label);
    std::sort(live.begin(), live.end());
    CHECK(live == strings{"nic-dma-root", "nic-ring", "nic-ring-alias", "nic0"});
    CHECK_THAT(r.report(), Catch::Contains("nic-ring → nic0: owner"));
}

TEST_CASE("the README's DOT listing is what the NIC story computes for QEMU's former rule",
          "[nic_unplug][readme]") {
    qomem_test::leak_check leaks;
    std::string dot;
    {
        nic_demo::scenario s;
        s.guest_sends("hello");
        REQUIRE(s.disk_starts_dma());
        const qomem::reference_graph running = s.snapshot();
        reference_replay former(running, lifetime_rule::owner_piggyback);
        former.unparent(*running.find("nic0"));
        former.release(*running.find("disk0's DMA from nic-ring"));
        former.release_outside();
        dot = former.to_dot("QEMU's former rule: what leaks", /*live_only=*/true);
    }
    std::ifstream readme(std::string(QOMEM_TEST_DATA_DIR) + "/../README.md");
    REQUIRE(readme);
    std::stringstream text;
    text << readme.rdbuf();
    CHECK_THAT(text.str(), Catch::Contains("```dot\n" + dot + "```\n"));
}
