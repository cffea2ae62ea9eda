// examples/nic_unplug.cpp — the story qomem exists for: a NIC with an MMIO
// BAR and a descriptor ring is hot-unplugged while another device still has
// its memory mapped for DMA. Step by step: who holds each reference, why each
// object is finalized exactly when it is, and the same machine under QEMU's
// former rule (a reference to a region is a reference to its owner),
// computed from the real objects' references.
//
// The machine is in examples/nic_unplug_scenario.hpp (tests/nic_unplug_test.cpp
// runs the same one). Each finalization is printed as it happens, by a
// lifetime_observer, with what held the object at the last snapshot.
//
// Run it: build/examples/nic_unplug [DIR]. With DIR, it writes a Graphviz DOT
// picture of each step there (`make demo` renders them to SVG in
// build/demo/nic_unplug/). Exit status: 0 when every region was finalized
// before its device, nothing leaks under qomem's rule, and no object is left
// alive; 1 otherwise.
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/core.h>

#include <qomem/mtree.hpp>
#include <qomem/object.hpp>
#include <qomem/qom_tree.hpp>
#include <qomem/reference_graph.hpp>

#include "nic_unplug_scenario.hpp"

namespace {

using qomem::reference_graph;
using qomem::reference_replay;

void heading(std::string_view text) { fmt::print("\n== {}\n", text); }

/// Prints `text` with each line indented by two spaces.
void say(std::string_view text) {
    while (!text.empty()) {
        const auto nl = text.find('\n');
        fmt::print("  {}\n", text.substr(0, nl));
        text.remove_prefix(nl == std::string_view::npos ? text.size() : nl + 1);
    }
}

void print_indented(std::string_view text, std::string_view indent) {
    while (!text.empty()) {
        const auto nl = text.find('\n');
        fmt::print("{}{}\n", indent, text.substr(0, nl));
        text.remove_prefix(nl == std::string_view::npos ? text.size() : nl + 1);
    }
}

/// "Who holds the N references to X?", from a snapshot.
void print_holders(const reference_graph& g, std::string_view label) {
    const auto n = g.find(label);
    if (!n) return;
    const auto& node = g.nodes()[*n];
    std::vector<std::size_t> counted;
    for (std::size_t e : g.references_to(*n))
        if (g.edges()[e].counted) counted.push_back(e);
    fmt::print("  Who holds the {} reference(s) to {}?\n", node.ref_count, label);
    for (std::size_t e : counted) fmt::print("    - {}\n", g.describe(e));
    if (counted.size() < node.ref_count)
        fmt::print("    - and {} not drawn: the flat views showing it (an address space's rendered\n"
                   "      view holds each region it shows, until a commit replaces the view and no\n"
                   "      reader can still be inside it)\n",
                   node.ref_count - counted.size());
}

/// Writes one DOT picture, if a directory was given.
class pictures {
public:
    explicit pictures(std::optional<std::filesystem::path> dir) : dir_(std::move(dir)) {
        if (dir_) std::filesystem::create_directories(*dir_);
    }
    void write(std::string_view name, const std::string& dot) {
        if (!dir_) return;
        const auto path = *dir_ / fmt::format("{}.dot", name);
        std::ofstream f(path);
        f << dot;
        f.close();
        if (!f) throw std::runtime_error(fmt::format("cannot write {}", path.string()));
        written_.push_back(path.string());
    }
    const std::vector<std::string>& written() const noexcept { return written_; }

private:
    std::optional<std::filesystem::path> dir_;
    std::vector<std::string> written_;
};

/// Prints each unparent and finalization as it happens; for a finalization,
/// what held the object at the last snapshot (all of which the step let go).
class narrator {
public:
    narrator()
        : trace_([this](const nic_demo::event_trace::event& e) { print(e); }) {}
    void set_snapshot(const reference_graph& g) { last_ = g; }
    nic_demo::event_trace& trace() noexcept { return trace_; }

private:
    void print(const nic_demo::event_trace::event& e) {
        if (!e.finalizing) {
            fmt::print("    unparent  {} (from {})\n", e.label, e.parent);
            return;
        }
        fmt::print("    #{} finalized {} ({})\n", ++count_, e.label, e.type);
        if (!last_) return;
        const auto n = e.obj ? last_->find(*e.obj) : std::nullopt;
        if (!n) return;
        std::vector<std::string> held;
        for (std::size_t i : last_->references_to(*n))
            if (last_->edges()[i].counted) held.push_back(last_->nodes()[last_->edges()[i].from].label);
        if (held.empty()) {
            fmt::print("       at the last snapshot nothing drawn held it but flat views\n");
            return;
        }
        std::string list;
        for (const auto& h : held) list += (list.empty() ? "" : ", ") + h;
        fmt::print("       held at the last snapshot by: {}\n", list);
    }

    std::optional<reference_graph> last_;
    nic_demo::event_trace trace_;
    int count_ = 0;
};

void print_replay(const reference_replay& r, std::string_view indent) {
    print_indented(r.report(), indent);
}

bool run(pictures& pics) {
    narrator story;
    bool ok = true;

    heading("The machine");
    nic_demo::scenario s;
    story.set_snapshot(s.snapshot());
    say("A root container and a machine; the system memory (ownerless, a child of\n"
        "/machine/unattached) with 64 KiB of RAM, and the address space \"memory\" over it,\n"
        "held by main(). Two devices added with device_add, the machine being their\n"
        "hotplug handler:\n"
        " * nic0 owns five regions: the container nic-bar, with the MMIO registers\n"
        "   nic-mmio and the RAM descriptor ring nic-ring inside it (a container and\n"
        "   its subregions with the same owner), placed in the system memory with\n"
        "   device::map_region; and nic-dma-root, the root of its own address space\n"
        "   nic-dma, with nic-ring-alias showing the ring at address 0 there. It maps\n"
        "   its own ring through nic-dma for as long as it is realized (self-DMA).\n"
        " * disk0 will read a packet out of nic-ring by DMA, peer to peer.");
    fmt::print("\n  info qom-tree (refs = reference count):\n");
    print_indented(qomem::qom_tree(s.root(), {.show_refs = true}), "    ");
    fmt::print("\n  info mtree -f:\n");
    print_indented(qomem::info_mtree(s.machine().memory(), {.flatview = true}), "    ");

    heading("Step 1: the guest sends a packet; disk0 starts a DMA from the NIC's ring");
    const auto id = s.guest_sends("ping from the guest");
    say(fmt::format("The guest read the NIC's ID register: {:#x}; wrote a descriptor into nic-ring\n"
                    "at {:#x} and rang the doorbell. The NIC read the descriptor through its\n"
                    "self-DMA mapping: \"{}\".",
                    id, nic_demo::nic_base + nic_demo::ring_offset, s.nic0().last_sent()));
    if (!s.disk_starts_dma()) {
        fmt::print("  disk0 could not map the ring\n");
        return false;
    }
    say("disk0 mapped 256 bytes of nic-ring for reading; the transfer is in flight.\n");
    const reference_graph running = s.snapshot();
    story.set_snapshot(running);
    for (std::string_view who : {"nic0", "nic-bar", "nic-ring", "nic-dma-root"}) print_holders(running, who);
    say("\nNo reference to a region reaches nic0: nic0 is held by its parent's child<>\n"
        "property alone. Each region is held by nic0's child<> property and by what uses it\n"
        "— the container, an address space, the DMA mappings, the flat views.");
    pics.write("nic_unplug-1-running", running.to_dot("1. running: disk0's DMA in flight"));

    fmt::print("\n  If main() dropped every handle now, replaying these references:\n");
    reference_replay now_current(running, qomem::lifetime_rule::regions_counted);
    now_current.release_outside();
    fmt::print("    under qomem's rule: ");
    print_replay(now_current, "");
    reference_replay now_former(running, qomem::lifetime_rule::owner_piggyback);
    now_former.release_outside();
    fmt::print("    under QEMU's former rule:\n");
    print_replay(now_former, "      ");
    ok &= now_current.live().empty();

    const reference_graph careless = s.snapshot(/*nic_keeps_until_finalized=*/true);
    reference_replay careless_current(careless, qomem::lifetime_rule::regions_counted);
    careless_current.release_outside();
    say("\nWhy nic0 destroys nic-dma and ends its self-DMA in do_unrealize: an address space\n"
        "rooted in one's own region is a reference to one's own region, and so is a\n"
        "mapping of it. Replayed as if nic0 kept them until it was finalized, under qomem's\n"
        "rule:");
    print_replay(careless_current, "    ");
    say("(Once unparented, each region holds its owner: nic0 would hold what holds it.)");
    pics.write("nic_unplug-1b-if-kept-until-finalized",
               careless_current.to_dot("1b. had nic0 kept nic-dma and its self-DMA until finalized: "
                                       "what would leak (red) under qomem's rule"));

    heading("Step 2: hot-unplug nic0 through the machine: device_del(machine, \"nic0\")");
    say("The machine's unplug_request returns false (no guest handshake), so the unplug\n"
        "completes at once: unparent(nic0). Its unparent hook unrealizes it — do_unrealize\n"
        "ends the self-DMA mapping and destroys nic-dma, then map_region's placement is\n"
        "undone (the guest sees a hole at once) — and unparents its regions, each of\n"
        "which from then on holds nic0. Then the peripheral container's reference goes.\n"
        "The flat views retired by the commits are freed by synchronize().");
    const auto before = story.trace().events().size();
    s.hot_unplug();
    const reference_graph unplugged = s.snapshot();
    story.set_snapshot(unplugged);
    const auto [v, r] = s.guest_read32(nic_demo::nic_base + nic_demo::nic_registers::id);
    (void)v;
    say(fmt::format("\n{} event(s). A guest read of the NIC's ID register now: {} (a hole).",
                    story.trace().events().size() - before,
                    r == qomem::memtx_decode_error ? "decode error" : fmt::format("{:#x}", r)));
    say("Each region was finalized as soon as it was unparented, unless something else\n"
        "held it: unrealize had already let go of the placement, the address space and\n"
        "the self-DMA mapping, and a container or an alias of nic0's goes before what it\n"
        "holds. nic-ring is held by disk0's DMA: it lives on, and holds nic0, which is\n"
        "alive, unrealized and out of the tree:");
    print_holders(unplugged, "nic0");
    print_holders(unplugged, "nic-ring");
    const auto events = s.machine().events().take();
    say(fmt::format("DEVICE_DELETED events so far: {} (it comes when nic0 is finalized).", events.size()));
    pics.write("nic_unplug-2-unplugged", unplugged.to_dot("2. after device_del(nic0): disk0's DMA "
                                                         "holds nic-ring, which holds nic0"));

    heading("Step 3: disk0's transfer completes: the DMA mapping is unmapped");
    say("The mapping was nic-ring's last holder: nic-ring is freed, and only after it, nic0\n"
        "(its last reference was nic-ring's, dropped once the region was freed).");
    const std::string got = s.disk_completes_dma();
    say(fmt::format("disk0 read \"{}\" from nic-ring, which stayed valid across the unplug.", got));
    for (const auto& e : s.machine().events().take())
        say(fmt::format("DEVICE_DELETED {{id \"{}\", path \"{}\"}}", e.id, e.path));
    const reference_graph completed = s.snapshot();
    story.set_snapshot(completed);
    pics.write("nic_unplug-3-dma-completed",
               completed.to_dot("3. disk0's DMA completed: nic-ring, then nic0, finalized"));

    heading("The same scenario under QEMU's former rule, replayed from step 1's references");
    say("Replayed from the snapshot taken before the unplug (the last moment at which both\n"
        "rules have the same objects), with every reference into a region from anything\n"
        "but its owner counted on the owner instead, and the regions left nic0's children\n"
        "(QEMU's device_unparent did not unparent them).");
    reference_replay former(running, qomem::lifetime_rule::owner_piggyback);
    reference_replay current(running, qomem::lifetime_rule::regions_counted);
    const std::size_t nic0 = *running.find("nic0");
    auto holders = [](const reference_replay& rp, std::size_t n) {
        std::string out;
        for (std::size_t e : rp.holders_of(n)) out += "\n      - " + rp.graph().describe(e);
        return out.empty() ? std::string(" nothing") : out;
    };
    std::size_t disk_dma = 0;
    for (std::size_t i = 0; i < running.nodes().size(); ++i)
        if (running.nodes()[i].label == "disk0's DMA from nic-ring") disk_dma = i;
    former.unparent(nic0);
    current.unparent(nic0);
    fmt::print("    after device_del(nic0), nic0 is held, under the former rule, by:{}\n", holders(former, nic0));
    fmt::print("    and under qomem's by:{}\n", holders(current, nic0));
    former.release(disk_dma);
    current.release(disk_dma);
    fmt::print("    after disk0's DMA completes, under the former rule, by:{}\n", holders(former, nic0));
    fmt::print("    and under qomem's: {}\n", current.finalized(nic0) ? "finalized" : "still alive");
    former.release_outside();
    current.release_outside();
    fmt::print("    after main() drops everything, under the former rule:\n");
    print_replay(former, "      ");
    fmt::print("    and under qomem's: ");
    print_replay(current, "");
    ok &= current.live().empty();
    pics.write("nic_unplug-4-former-rule",
               former.to_dot("4. the same steps under QEMU's former rule: what leaks (red)"));
    pics.write("nic_unplug-4-former-rule-leak",
               former.to_dot("QEMU's former rule: what leaks", /*live_only=*/true));

    heading("Step 4: shutdown: main() drops its address space and the root");
    s.shutdown();
    const bool ordered = story.trace().regions_before_owners();
    say(fmt::format("\nEvery region finalized before its owner: {}.", ordered ? "yes" : "NO"));
    ok &= ordered;
    return ok;
}

} // namespace

int main(int argc, char** argv) {
    bool ok = false;
    try {
        pictures pics(argc > 1 ? std::optional<std::filesystem::path>(argv[1]) : std::nullopt);
        ok = run(pics);
        if (!pics.written().empty()) {
            fmt::print("\nWrote {} DOT pictures to {} (render with: dot -Tsvg FILE.dot -o FILE.svg)\n",
                       pics.written().size(), argv[1]);
        } else {
            fmt::print("\n(Give a directory to write a DOT picture of each step.)\n");
        }
    } catch (const std::exception& e) {
        fmt::print(stderr, "nic_unplug: {}\n", e.what());
        ok = false;
    }
    const std::size_t live = qomem::live_object_count();
    fmt::print("Live objects at exit: {}\n", live);
    for (const auto& [type, count] : qomem::live_objects()) fmt::print("  {} x{}\n", type, count);
    return ok && live == 0 ? 0 : 1;
}
