// examples/hotplug.cpp — hot-unplug, step by step: who holds each reference,
// and why each object is finalized exactly when it is.
//
// The machine:
//
//     /                                   root container (main() holds it)
//       /machine
//         /peripheral
//           /hba      scsi-hba            on /machine/unattached/sysbus
//             /scsi.0 bus                 the hba's child bus
//           /disk0    scsi-disk           on scsi.0, children blk and led
//           /disk1    scsi-disk           on scsi.0, children blk and led
//         /unattached
//           /sysbus   bus
//
// A "guest driver" holds a reference to disk1 (a request in flight) while
// disk1 is hot-unplugged. The program narrates each step through a
// lifetime_observer: what is unparented, what is finalized, and why then.
// It also writes the object graph before and after the unplug as Graphviz
// DOT (hotplug.dot, or the path given as the first argument):
//
//     build/examples/hotplug /tmp/hotplug.dot && dot -Tsvg /tmp/hotplug.dot -o /tmp/hotplug.svg
//
// Exit status: 0 when every object was finalized at the end, 1 otherwise.
#include <cstddef>
#include <cstdio>
#include <exception>
#include <fstream>
#include <iterator>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/core.h>
#include <fmt/format.h>

#include <qomem/device.hpp>
#include <qomem/machine.hpp>
#include <qomem/object.hpp>
#include <qomem/qom_tree.hpp>

namespace {

using qomem::object;

// ---- the machine's parts ------------------------------------------------------

/// Where an object is: its canonical path, or "<type> (out of the tree)".
std::string where(const object& obj) {
    if (auto path = obj.canonical_path()) return *path;
    return fmt::format("{} (out of the tree)", obj.type().name);
}

/// A device that says when it is unrealized.
class demo_device : public qomem::device {
    QOMEM_OBJECT(demo_device, "demo-device", qomem::device)
protected:
    demo_device() = default;
    void do_unrealize() noexcept override { fmt::print("      unrealize {}\n", where(*this)); }
};

class block_backend : public object {
    QOMEM_OBJECT(block_backend, "block-backend", object)
public:
    block_backend() = default;
};

class activity_led : public object {
    QOMEM_OBJECT(activity_led, "activity-led", object)
public:
    activity_led() = default;
};

/// A SCSI host adapter: owns the bus its disks plug into.
class scsi_hba : public demo_device {
    QOMEM_OBJECT(scsi_hba, "scsi-hba", demo_device)
public:
    scsi_hba() {
        auto b = qomem::make<qomem::bus>();
        add_child("scsi.0", *b); // the child<> property becomes the bus's only owner
    }
    qomem::bus& scsi_bus() const { return *child_bus("scsi.0"); }
};

/// A SCSI disk with two parts of its own: a block backend (which points back
/// at the disk with a weak link) and an activity LED.
class scsi_disk : public demo_device {
    QOMEM_OBJECT(scsi_disk, "scsi-disk", demo_device)
public:
    scsi_disk() {
        auto blk = qomem::make<block_backend>();
        blk->add_link("dev", this, qomem::link_strength::weak, qomem::device::static_type());
        add_child("blk", *blk);
        auto led = qomem::make<activity_led>();
        add_child("led", *led);
    }
};

/// Holds a reference to a disk while a request is in flight, as a guest
/// driver's request (or a DMA in progress) keeps QEMU's device alive.
struct guest_driver {
    qomem::ref_ptr<scsi_disk> in_flight;
};

// ---- who holds what -----------------------------------------------------------

/// A reference held outside the composition tree (a ref_ptr in a variable).
struct outside_holder {
    std::string who;
    const object* target;
};

/// Every object reachable through children and links from `root`, then from
/// the outside holders, each listed once, depth first: the tree's order.
std::vector<const object*> reachable(const object& root, const std::vector<outside_holder>& outside) {
    std::vector<const object*> order;
    std::set<const object*> seen;
    auto visit = [&](auto& self, const object* o) -> void {
        if (!o || !seen.insert(o).second) return;
        order.push_back(o);
        o->for_each_child([&](const object& c) { self(self, &c); });
        o->for_each_link([&](std::string_view, const object* t, qomem::link_strength) { self(self, t); });
    };
    visit(visit, &root);
    for (const outside_holder& h : outside) visit(visit, h.target);
    return order;
}

/// The holders of `target`'s references that can be seen: its parent's
/// child<> property, strong links to it, and references held outside.
std::vector<std::string> holders_of(const object& target, const std::vector<const object*>& graph,
                                    const std::vector<outside_holder>& outside) {
    std::vector<std::string> out;
    if (const object* p = target.parent())
        out.push_back(fmt::format("the child<> property \"{}\" of {}", target.name(), where(*p)));
    for (const object* o : graph)
        o->for_each_link([&](std::string_view name, const object* t, qomem::link_strength s) {
            if (t == &target && s == qomem::link_strength::strong)
                out.push_back(fmt::format("the strong link \"{}\" of {}", name, where(*o)));
        });
    for (const outside_holder& h : outside)
        if (h.target == &target) out.push_back(h.who);
    return out;
}

void print_holders(const object& target, const std::string& label, const object& root,
                   const std::vector<outside_holder>& outside) {
    const auto graph = reachable(root, outside);
    const auto holders = holders_of(target, graph, outside);
    fmt::print("  Who holds the {} reference(s) to {}?\n", target.ref_count(), label);
    for (const std::string& h : holders) fmt::print("    - {}\n", h);
    if (holders.size() != target.ref_count())
        fmt::print("    ({} more that this program cannot see)\n",
                   static_cast<long>(target.ref_count()) - static_cast<long>(holders.size()));
}

// ---- the narrator ---------------------------------------------------------------

/// Prints every unparent and finalization as it happens, with the reason.
/// Objects are named by the canonical path they had when learn_names() last
/// saw them, since an object being finalized has already left the tree.
class narrator final : public qomem::lifetime_observer {
public:
    narrator() : previous_(qomem::set_lifetime_observer(this)) {}
    ~narrator() { qomem::set_lifetime_observer(previous_); }
    narrator(const narrator&) = delete;
    narrator& operator=(const narrator&) = delete;

    /// Remembers the canonical path of every object in `root`'s subtree.
    void learn_names(const object& root) {
        if (auto path = root.canonical_path()) names_[&root] = *path;
        root.for_each_child([&](const object& c) { learn_names(c); });
    }
    std::string name_of(const object& obj) const {
        auto it = names_.find(&obj);
        return it != names_.end() ? it->second : std::string(obj.type().name);
    }

    /// The reason to give if `obj` is finalized during the next step: for a
    /// last reference held outside the tree, which the observer cannot see.
    void expect(const object& obj, std::string why) { expected_[&obj] = std::move(why); }

    void unparenting(const object& child, const object& parent) noexcept override {
        // Why is it being unparented? Told apart by what else is under way.
        const auto* dev = qomem::dynamic_cast_to<qomem::device>(&child);
        const std::string p = name_of(parent);
        std::string because, dropped;
        if (dying_.count(&parent)) {
            because = fmt::format("{} is being finalized: finalization releases all its properties, "
                                  "newest first",
                                  p);
            dropped = fmt::format("released because {} was being finalized", p);
        } else if (dev && dev->parent_bus() && leaving_.count(dev->parent_bus())) {
            const std::string b = name_of(*dev->parent_bus());
            because = fmt::format("its bus {} is being unparented, and a bus's unparent hook "
                                  "unparents every device on it",
                                  b);
            dropped = fmt::format("dropped when its bus {} unparented the devices on it", b);
        } else if (qomem::dynamic_cast_to<qomem::bus>(&child) &&
                   qomem::dynamic_cast_to<qomem::device>(&parent) && leaving_.count(&parent)) {
            because = fmt::format("its owner {} is being unparented, and a device's unparent hook "
                                  "unparents the device's child buses",
                                  p);
            dropped = fmt::format("dropped when the unparent hook of {} unparented its buses", p);
        } else {
            because = "unparent() was called on it";
            dropped = "dropped by unparent()";
        }
        leaving_.insert(&child);
        fmt::print("    unparent  {}\n", name_of(child));
        fmt::print("              because {}\n", because);
        std::string why = fmt::format("its last reference was the child<> property of {}, {}", p, dropped);
        if (dev) {
            // What device::on_unparent is about to do, in its order.
            std::vector<std::string> steps;
            if (dev->realized()) steps.push_back("unrealize it");
            dev->for_each_child([&](const object& c) {
                if (qomem::dynamic_cast_to<qomem::bus>(&c))
                    steps.push_back(fmt::format("unparent its bus {}", c.name()));
            });
            if (const qomem::bus* b = dev->parent_bus()) {
                steps.push_back(fmt::format("leave the bus {} (that drops the bus's reference)",
                                            name_of(*b)));
                why += fmt::format(" (the reference from the bus {} had gone first, when it left "
                                   "the bus)",
                                   name_of(*b));
            }
            if (!steps.empty())
                fmt::print("              its unparent hook will: {}\n", fmt::join(steps, "; "));
        }
        last_reference_[&child] = std::move(why);
    }

    void finalizing(const object& obj) noexcept override {
        dying_.insert(&obj);
        std::string why;
        if (auto it = expected_.find(&obj); it != expected_.end())
            why = it->second;
        else if (auto jt = last_reference_.find(&obj); jt != last_reference_.end())
            why = jt->second;
        else
            why = "its last reference was dropped";
        fmt::print("    #{} finalized {} ({})\n", ++finalized_, name_of(obj), obj.type().name);
        fmt::print("       why now: {}\n", why);
        std::vector<std::string> kids;
        obj.for_each_child([&](const object& c) { kids.insert(kids.begin(), std::string(c.name())); });
        if (!kids.empty())
            fmt::print("       first it releases its children, newest first: {}\n", fmt::join(kids, ", "));
    }

    int finalized_count() const noexcept { return finalized_; }

    /// Objects that left the tree and are not finalized (yet).
    std::vector<const object*> survivors() const {
        std::vector<const object*> out;
        for (const object* o : leaving_)
            if (!dying_.count(o)) out.push_back(o);
        return out;
    }

private:
    qomem::lifetime_observer* previous_;
    std::map<const object*, std::string> names_;
    std::map<const object*, std::string> expected_;
    std::map<const object*, std::string> last_reference_;
    std::set<const object*> leaving_; // unparent seen
    std::set<const object*> dying_;   // finalization seen
    int finalized_ = 0;
};

// ---- Graphviz -------------------------------------------------------------------

std::string dot_escape(std::string_view s) {
    std::string out;
    for (char c : s) {
        if (c == '"' || c == '\\') out += '\\';
        out += c;
    }
    return out;
}

/// Appends one snapshot of the object graph as a DOT cluster: nodes show
/// type, name and reference count; child<> edges are solid, links dashed
/// (bold when strong: they hold a reference), references held outside the
/// tree dotted.
void dot_snapshot(std::string& dot, int index, std::string_view title, const object& root,
                  const std::vector<outside_holder>& outside) {
    const auto graph = reachable(root, outside);
    std::map<const object*, std::string> id;
    for (const object* o : graph) id[o] = fmt::format("s{}n{}", index, id.size());

    fmt::format_to(std::back_inserter(dot), "  subgraph cluster_{} {{\n    label=\"{}\";\n", index,
                   dot_escape(title));
    for (const object* o : graph) {
        std::string name = o->parent() ? std::string(o->name()) : (o == &root ? "/" : "(no parent)");
        fmt::format_to(std::back_inserter(dot), "    {} [label=\"{}\\n{}\\nrefs={}\"{}];\n", id[o],
                       dot_escape(o->type().name), dot_escape(name), o->ref_count(),
                       o->parent() || o == &root ? "" : ", color=red");
    }
    for (const object* o : graph) {
        o->for_each_child([&](const object& c) {
            fmt::format_to(std::back_inserter(dot), "    {} -> {};\n", id[o], id[&c]);
        });
        o->for_each_link([&](std::string_view name, const object* t, qomem::link_strength s) {
            if (!t) return;
            fmt::format_to(std::back_inserter(dot), "    {} -> {} [style=\"{}\", label=\"{}\"];\n",
                           id[o], id[t], s == qomem::link_strength::strong ? "dashed,bold" : "dashed",
                           dot_escape(name));
        });
    }
    for (std::size_t i = 0; i < outside.size(); ++i) {
        fmt::format_to(std::back_inserter(dot),
                       "    s{}h{} [label=\"{}\", shape=note, style=dotted];\n"
                       "    s{}h{} -> {} [style=dotted, label=\"ref_ptr\"];\n",
                       index, i, dot_escape(outside[i].who), index, i, id[outside[i].target]);
    }
    dot += "  }\n";
}

// ---- the story ------------------------------------------------------------------

void heading(std::string_view text) { fmt::print("\n== {}\n", text); }

/// Prints `text` with every line indented by four spaces.
void print_lines(std::string_view text) {
    while (!text.empty()) {
        const auto nl = text.find('\n');
        fmt::print("    {}\n", text.substr(0, nl));
        text.remove_prefix(nl == std::string_view::npos ? text.size() : nl + 1);
    }
}

void print_tree(const object& root) {
    fmt::print("\n  info qom-tree (refs = reference count):\n");
    print_lines(qomem::qom_tree(root, {.show_refs = true}));
}

/// Runs the whole story; returns false if the DOT file could not be written.
bool run(const std::string& dot_path) {
    narrator story;
    std::string dot = "digraph qom {\n"
                      "  node [shape=box, fontname=\"Helvetica\"];\n"
                      "  edge [fontname=\"Helvetica\", fontsize=10];\n"
                      "  labelloc=t;\n"
                      "  label=\"solid: child<> property (holds a reference)    "
                      "dashed: link<> (bold = strong, holds a reference)    "
                      "dotted: reference held outside the tree    red: out of the tree\";\n";

    heading("Building the machine");
    auto root = qomem::container::make_root();
    qomem::machine& machine = qomem::add_machine(*root);

    auto sysbus_handle = qomem::make<qomem::bus>();
    machine.unattached().add_child("sysbus", *sysbus_handle);
    qomem::bus& sysbus = *sysbus_handle;
    sysbus_handle.reset(); // the tree owns it now

    auto hba = qomem::make<scsi_hba>();
    hba->plug_into(sysbus);
    machine.peripheral().add_child("hba", *hba);
    auto disk0 = qomem::make<scsi_disk>();
    disk0->plug_into(hba->scsi_bus());
    machine.peripheral().add_child("disk0", *disk0);
    auto disk1 = qomem::make<scsi_disk>();
    disk1->plug_into(hba->scsi_bus());
    machine.peripheral().add_child("disk1", *disk1);
    hba->realize();
    disk0->realize();
    disk1->realize();

    // The guest driver starts a request on disk1 and keeps a reference to it.
    guest_driver driver{disk1};
    scsi_hba& hba_ref = *hba;
    scsi_disk& disk1_ref = *disk1;
    // Our own handles go: from now on the tree, the buses and the driver own everything.
    hba.reset();
    disk0.reset();
    disk1.reset();
    story.learn_names(*root);

    fmt::print("  A root container, a machine, a SCSI adapter (hba) with bus scsi.0 on the system\n"
               "  bus, and two disks on scsi.0. The guest driver has a request in flight on disk1.\n");
    print_tree(*root);
    std::vector<outside_holder> outside{{"main(): root handle", root.get()},
                                        {"guest driver: request in flight", &disk1_ref}};
    fmt::print("\n");
    print_holders(disk1_ref, "/machine/peripheral/disk1", *root, outside);
    dot_snapshot(dot, 0, "1. before the unplug", *root, outside);

    heading("Step 1: hot-unplug disk1 while the guest driver still holds it: unparent(disk1)");
    const int finalized_before = story.finalized_count();
    qomem::unparent(disk1_ref);
    if (story.finalized_count() == finalized_before)
        fmt::print("\n  Nothing was finalized: disk1 left the tree and its bus, yet one reference is\n"
                   "  left. Its children blk and led are still its children: they go when it goes.\n");
    print_tree(*root);
    fmt::print("\n");
    print_holders(disk1_ref, "disk1", *root, outside);
    fmt::print("  disk1 is {}, {}; its own tree (it has no canonical path now):\n",
               disk1_ref.realized() ? "still realized" : "unrealized",
               disk1_ref.parent_bus() ? "still on a bus" : "on no bus");
    print_lines(qomem::qom_tree(disk1_ref, {.show_refs = true}));
    dot_snapshot(dot, 1, "2. after unparent(disk1): the guest driver still holds it", *root, outside);

    heading("Step 2: the guest driver's request completes and it drops its reference");
    story.expect(disk1_ref, "only now, not at the unplug: the guest driver dropped the reference "
                            "it held across the unplug, which was the last one");
    outside.pop_back();
    driver.in_flight.reset();
    fmt::print("\n  disk1 (and with it blk and led) lived on after the unplug for exactly as long as\n"
               "  the guest driver held it: unparent() only drops the tree's references.\n");

    heading("Step 3: hot-unplug the SCSI adapter, with disk0 still on its bus: unparent(hba)");
    qomem::unparent(hba_ref);
    print_tree(*root);

    heading("Step 4: shut down: main() drops the root handle");
    story.expect(*root, "main() dropped its handle, the only reference to the root container");
    outside.clear();
    root.reset();

    const auto left = story.survivors();
    if (!left.empty())
        fmt::print("\n  Objects unparented but never finalized: {}\n", left.size());

    std::ofstream file(dot_path);
    file << dot << "}\n";
    file.close();
    if (!file) {
        fmt::print(stderr, "hotplug: cannot write {}\n", dot_path);
        return false;
    }
    fmt::print("\nWrote the object graph before and after the unplug to {}\n"
               "(render it with: dot -Tsvg {} -o hotplug.svg)\n",
               dot_path, dot_path);
    return true;
}

} // namespace

int main(int argc, char** argv) {
    const std::string dot_path = argc > 1 ? argv[1] : "hotplug.dot";
    bool ok = false;
    try {
        ok = run(dot_path);
    } catch (const std::exception& e) {
        fmt::print(stderr, "hotplug: {}\n", e.what());
    }
    const std::size_t live = qomem::live_object_count();
    fmt::print("\nLive objects at exit: {}\n", live);
    for (const auto& [type, count] : qomem::live_objects()) fmt::print("  {} x{}\n", type, count);
    return ok && live == 0 ? 0 : 1;
}
