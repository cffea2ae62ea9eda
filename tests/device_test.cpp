// Tests for qomem/device.hpp: realize and unrealize, buses holding their
// devices, the device unparent hook (hot-unplug) and its finalization order,
// /machine/unattached and the machine's containers.
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <qomem/device.hpp>
#include <qomem/machine.hpp>
#include <qomem/object.hpp>

#include "test_support.hpp"

using qomem_test::event_log;
using qomem_test::event_recorder;
using qomem_test::leak_check;
using qomem_test::only;
using qomem_test::throwing_assertions;
using strings = std::vector<std::string>;

namespace {

// A device that records its realize, unrealize and finalization.
class test_device : public qomem::device {
    QOMEM_OBJECT(test_device, "test-device", qomem::device)
public:
    test_device(event_log& log, std::string label) : log_(&log), label_(std::move(label)) {}
    ~test_device() override { log_->add("finalize " + label_); }

    /// When set, do_realize refuses (throws) without doing anything.
    bool refuse_realize = false;

protected:
    void do_realize() override {
        if (refuse_realize) throw std::runtime_error(label_ + ": realize refused");
        log_->add("realize " + label_);
    }
    void do_unrealize() noexcept override { log_->add("unrealize " + label_); }

    event_log* log_;
    std::string label_;
};

// A controller: a device that owns a child bus "bus0" (QEMU's qbus_new in
// instance_init: the controller's child<> property is the bus's only owner).
class controller : public test_device {
    QOMEM_OBJECT(controller, "test-controller", test_device)
public:
    controller(event_log& log, std::string label) : test_device(log, std::move(label)) {
        auto b = qomem::make<qomem::bus>();
        add_child("bus0", *b);
    }
    qomem::bus& bus0() const { return *child_bus("bus0"); }
};

/// A machine under a root container, with a controller /machine/peripheral/ctrl
/// plugged into /machine/sysbus and a device /machine/peripheral/dev plugged
/// into the controller's bus0. Every object is owned by the tree only.
struct board {
    explicit board(event_log& log)
        : root(qomem::container::make_root()), machine(qomem::add_machine(*root)) {
        auto sb = qomem::make<qomem::bus>();
        machine.add_child("sysbus", *sb);
        sysbus = sb.get();

        auto c = qomem::make<controller>(log, "ctrl");
        c->plug_into(*sysbus);
        machine.peripheral().add_child("ctrl", *c);
        ctrl = c.get();

        auto d = qomem::make<test_device>(log, "dev");
        d->plug_into(ctrl->bus0());
        machine.peripheral().add_child("dev", *d);
        dev = d.get();
        bus0 = &ctrl->bus0();
    }
    void label(event_recorder& events) const {
        events.label(machine.peripheral(), "peripheral");
        events.label(*ctrl, "ctrl");
        events.label(*bus0, "bus0");
        events.label(*dev, "dev");
    }

    qomem::ref_ptr<qomem::container> root;
    qomem::machine& machine;
    qomem::bus* sysbus = nullptr;
    controller* ctrl = nullptr;
    qomem::bus* bus0 = nullptr;
    test_device* dev = nullptr;
};

} // namespace

TEST_CASE("a machine has the unattached, peripheral and peripheral-anon containers",
          "[device][machine]") {
    leak_check leaks;
    auto root = qomem::container::make_root();
    qomem::machine& m = qomem::add_machine(*root);
    CHECK(m.ref_count() == 1); // the root's child<> property is its only owner
    CHECK(m.canonical_path() == "/machine");
    for (const char* path : {"/machine/unattached", "/machine/peripheral", "/machine/peripheral-anon"}) {
        INFO(path);
        qomem::object* c = root->resolve_path(path);
        REQUIRE(c != nullptr);
        CHECK(qomem::dynamic_cast_to<qomem::container>(c) != nullptr);
        CHECK(c->canonical_path() == path);
        CHECK(c->ref_count() == 1);
    }
    CHECK(&m.unattached() == root->resolve_path("/machine/unattached"));
    CHECK(&m.peripheral() == root->resolve_path("/machine/peripheral"));
    CHECK(&m.peripheral_anon() == root->resolve_path("/machine/peripheral-anon"));
    CHECK(qomem::live_object_count() == 6); // and the machine's memory system
}

TEST_CASE("realize marks the device and its child buses realized, unrealize undoes it deepest first",
          "[device][realize]") {
    leak_check leaks;
    throwing_assertions asserts;
    event_log log;
    board b(log);
    log.clear();

    b.ctrl->realize();
    b.dev->realize();
    CHECK(log.take() == strings{"realize ctrl", "realize dev"});
    CHECK(b.ctrl->realized());
    CHECK(b.bus0->realized());
    CHECK(b.dev->realized());
    CHECK_FALSE(b.sysbus->realized()); // a bus is realized by its owner device only

    SECTION("unrealizing the controller unrealizes the devices on its buses first") {
        b.ctrl->unrealize();
        CHECK(log.take() == strings{"unrealize dev", "unrealize ctrl"});
        CHECK_FALSE(b.ctrl->realized());
        CHECK_FALSE(b.bus0->realized());
        CHECK_FALSE(b.dev->realized());
        // No reference changed and nothing left the tree.
        CHECK(b.dev->ref_count() == 2); // peripheral's child<> + bus0's link
        CHECK(b.dev->canonical_path() == "/machine/peripheral/dev");
    }
    SECTION("realize twice and unrealize of an unrealized device are reported") {
        CHECK_THROWS_AS(b.dev->realize(), qomem::assertion_failure);
        b.dev->unrealize();
        CHECK_THROWS_AS(b.dev->unrealize(), qomem::assertion_failure);
        CHECK(log.take() == strings{"unrealize dev"});
        CHECK_FALSE(b.dev->realized());
    }
}

TEST_CASE("a do_realize that throws leaves the device unrealized and unattached", "[device][realize]") {
    leak_check leaks;
    event_log log;
    board b(log);
    auto orphan = qomem::make<test_device>(log, "orphan");
    orphan->plug_into(*b.bus0);
    orphan->refuse_realize = true;

    CHECK_THROWS_AS(orphan->realize(), std::runtime_error);
    CHECK_FALSE(orphan->realized());
    CHECK(orphan->parent() == nullptr); // not attached to /machine/unattached
    CHECK_FALSE(b.machine.unattached().has_property("device[0]"));
    CHECK(orphan->ref_count() == 2); // its handle + bus0's link, as before

    orphan->refuse_realize = false;
    orphan->realize();
    CHECK(orphan->realized());
    CHECK(orphan->canonical_path() == "/machine/unattached/device[0]");
}

TEST_CASE("plug_into makes the bus hold a strong reference to the device", "[device][bus]") {
    leak_check leaks;
    throwing_assertions asserts;
    event_log log;
    auto bus = qomem::make<qomem::bus>();
    auto d0 = qomem::make<test_device>(log, "d0");
    auto d1 = qomem::make<test_device>(log, "d1");

    d0->plug_into(*bus);
    d1->plug_into(*bus);
    CHECK(d0->ref_count() == 2);
    CHECK(d0->parent_bus() == bus.get());
    CHECK(d0->parent() == nullptr); // a bus is not the device's parent
    CHECK(bus->link("child[0]") == d0.get());
    CHECK(bus->link("child[1]") == d1.get());
    CHECK(bus->devices() == std::vector<qomem::device*>{d0.get(), d1.get()});
    CHECK(bus->ref_count() == 1); // the devices hold no reference to their bus

    SECTION("plugging a device twice is reported and changes nothing") {
        auto other = qomem::make<qomem::bus>();
        CHECK_THROWS_AS(d0->plug_into(*other), qomem::assertion_failure);
        CHECK(d0->parent_bus() == bus.get());
        CHECK(d0->ref_count() == 2);
        CHECK(other->devices().empty());
    }
    SECTION("unplug_from_bus drops the bus's reference") {
        d0->unplug_from_bus();
        CHECK(d0->ref_count() == 1);
        CHECK(d0->parent_bus() == nullptr);
        CHECK(bus->devices() == std::vector<qomem::device*>{d1.get()});
        CHECK_THROWS_AS(d0->unplug_from_bus(), qomem::assertion_failure);
        // A freed link name is reused by the next device.
        d0->plug_into(*bus);
        CHECK(bus->link("child[0]") == d0.get());
    }
    SECTION("a device held only by its bus is finalized when it leaves the bus") {
        test_device& raw = *d1;
        d1.reset();
        CHECK(raw.ref_count() == 1);
        log.clear();
        raw.unplug_from_bus();
        CHECK(log.take() == strings{"finalize d1"});
        CHECK(bus->devices() == std::vector<qomem::device*>{d0.get()});
    }
    // The devices leave the bus before it goes (an orphan bus has no
    // unparent hook to do it for them).
    for (qomem::device* d : bus->devices()) d->unplug_from_bus();
}

TEST_CASE("unparenting a device unrealizes it, unparents its child buses and their devices, "
          "and leaves its bus",
          "[device][unparent]") {
    leak_check leaks;
    event_log log;
    event_recorder events(log);
    board b(log);
    b.label(events);
    b.ctrl->realize();
    b.dev->realize();
    CHECK(b.sysbus->devices() == std::vector<qomem::device*>{b.ctrl});
    CHECK(b.ctrl->ref_count() == 2); // peripheral's child<> + sysbus's link
    CHECK(b.dev->ref_count() == 2);  // peripheral's child<> + bus0's link
    CHECK(b.bus0->ref_count() == 1); // ctrl's child<>
    log.clear();

    qomem::unparent(*b.ctrl);
    CHECK(log.take() == strings{"unparenting ctrl from peripheral",
                                "unrealize dev", "unrealize ctrl",
                                "unparenting bus0 from ctrl",
                                "unparenting dev from peripheral", // bus0's hook
                                "finalizing dev", "finalize dev",
                                "finalizing bus0",
                                "finalizing ctrl", "finalize ctrl"});
    CHECK(b.sysbus->devices().empty());
    CHECK_FALSE(b.machine.peripheral().has_property("ctrl"));
    CHECK_FALSE(b.machine.peripheral().has_property("dev"));
    CHECK(qomem::live_objects() ==
          std::map<std::string, std::size_t, std::less<>>{
                                      {"bus", 1}, {"container", 4}, {"machine", 1}, {"memory-system", 1}});
}

TEST_CASE("hot-unplug of a controller: a device held elsewhere is finalized only when that "
          "last reference goes",
          "[device][unparent]") {
    leak_check leaks;
    event_log log;
    event_recorder events(log);
    board b(log);
    b.label(events);
    b.ctrl->realize();
    b.dev->realize();
    qomem::ref_ptr<test_device> held(b.dev); // e.g. an in-flight request
    CHECK(held->ref_count() == 3);
    log.clear();

    qomem::unparent(*b.ctrl);
    CHECK(only(log.events(), "finalizing ") == strings{"finalizing bus0", "finalizing ctrl"});
    CHECK(held->ref_count() == 1);
    CHECK(held->parent() == nullptr);
    CHECK(held->parent_bus() == nullptr);
    CHECK_FALSE(held->realized());
    CHECK(held->canonical_path() == std::nullopt);
    log.clear();

    held.reset();
    CHECK(log.take() == strings{"finalizing dev", "finalize dev"});
}

TEST_CASE("unparenting a device that is not on a bus and has no buses just drops it",
          "[device][unparent]") {
    leak_check leaks;
    event_log log;
    auto root = qomem::container::make_root();
    qomem::machine& m = qomem::add_machine(*root);
    auto d = qomem::make<test_device>(log, "lone");
    m.peripheral_anon().add_child("device[*]", *d);
    d->realize();
    test_device& raw = *d;
    d.reset();
    log.clear();
    qomem::unparent(raw);
    CHECK(log.take() == strings{"unrealize lone", "finalize lone"});
}

TEST_CASE("unparenting a bus unparents its parented devices and unplugs orphan ones",
          "[device][bus][unparent]") {
    leak_check leaks;
    event_log log;
    board b(log);
    auto orphan = qomem::make<test_device>(log, "orphan");
    orphan->plug_into(*b.bus0);
    CHECK(orphan->ref_count() == 2);
    log.clear();

    qomem::unparent(*b.bus0);
    CHECK(log.take() == strings{"finalize dev"}); // dev's owners were peripheral and bus0
    CHECK(orphan->parent_bus() == nullptr);
    CHECK(orphan->ref_count() == 1);
    CHECK(b.ctrl->child_bus("bus0") == nullptr);
}

TEST_CASE("an orphan device on a machine's bus is attached to /machine/unattached/device[N] "
          "on realize",
          "[device][realize]") {
    leak_check leaks;
    event_log log;
    board b(log);
    auto first = qomem::make<test_device>(log, "first");
    auto second = qomem::make<test_device>(log, "second");
    first->plug_into(*b.bus0);
    second->plug_into(*b.bus0);

    first->realize();
    second->realize();
    CHECK(first->canonical_path() == "/machine/unattached/device[0]");
    CHECK(second->canonical_path() == "/machine/unattached/device[1]");
    CHECK(first->ref_count() == 3); // handle + bus0's link + unattached's child<>

    SECTION("a device that already has a parent stays where it is") {
        b.dev->realize();
        CHECK(b.dev->canonical_path() == "/machine/peripheral/dev");
        CHECK_FALSE(b.machine.unattached().has_property("device[2]"));
    }
    SECTION("a device on a bus outside any machine stays an orphan") {
        auto lone_bus = qomem::make<qomem::bus>();
        auto lone = qomem::make<test_device>(log, "lone");
        lone->plug_into(*lone_bus);
        lone->realize();
        CHECK(lone->realized());
        CHECK(lone->parent() == nullptr);
        lone->unplug_from_bus();
    }
    SECTION("an attached device leaves /machine/unattached when unparented") {
        qomem::unparent(*first);
        CHECK(first->parent() == nullptr);
        CHECK(first->parent_bus() == nullptr);
        CHECK_FALSE(first->realized());
        CHECK(first->ref_count() == 1);
        // The freed index is taken again.
        auto third = qomem::make<test_device>(log, "third");
        third->plug_into(*b.bus0);
        third->realize();
        CHECK(third->canonical_path() == "/machine/unattached/device[0]");
    }
}

namespace {
// A device whose unparent hook throws: before running the device hook (so
// it never leaves its bus by itself) or after it.
class throwing_device : public test_device {
    QOMEM_OBJECT(throwing_device, "test-throwing-device", test_device)
public:
    throwing_device(event_log& log, std::string label, bool before)
        : test_device(log, std::move(label)), before_(before) {}

protected:
    void on_unparent() override {
        if (!before_) device::on_unparent();
        throw std::runtime_error(label_ + ": unparent hook failed");
    }

private:
    bool before_;
};

std::vector<std::string> device_finalization_errors;
void record_device_finalization_error(const qomem::finalization_error& e) noexcept {
    try {
        std::rethrow_exception(e.error);
    } catch (const std::exception& x) {
        device_finalization_errors.push_back(std::string(e.type) + ": " + x.what());
    }
}
} // namespace

TEST_CASE("a device on a bus whose unparent hook throws leaks nothing: its controller, bus "
          "and siblings all go, and the error reaches the caller or the handler",
          "[device][unparent][finalize]") {
    leak_check leaks;
    event_log log;
    event_recorder events(log);
    device_finalization_errors.clear();
    qomem::scoped_finalization_error_handler handler{&record_device_finalization_error};
    const bool before = GENERATE(true, false);
    INFO((before ? "throws before the device hook" : "throws after the device hook"));
    std::optional<board> b(std::in_place, log);
    b->label(events);
    auto bad = qomem::make<throwing_device>(log, "bad", before);
    bad->plug_into(*b->bus0);
    b->machine.peripheral().add_child("bad", *bad);
    events.label(*bad, "bad");
    bad.reset();
    b->ctrl->realize();
    b->dev->realize();
    log.clear();

    SECTION("hot-unplug of the controller: every step runs, then the error is rethrown") {
        CHECK_THROWS_WITH(qomem::unparent(*b->ctrl), "bad: unparent hook failed");
        CHECK(only(log.events(), "finalizing ") ==
              strings{"finalizing dev", "finalizing bad", "finalizing bus0", "finalizing ctrl"});
        CHECK(b->sysbus->devices().empty());
        CHECK_FALSE(b->machine.peripheral().has_property("ctrl"));
        CHECK_FALSE(b->machine.peripheral().has_property("bad"));
        CHECK(qomem::live_objects() == std::map<std::string, std::size_t, std::less<>>{
                                           {"bus", 1}, {"container", 4}, {"machine", 1},
                                           {"memory-system", 1}}); // the machine's own
        CHECK(device_finalization_errors.empty());
    }
    SECTION("finalizing the whole machine: nothing escapes a destructor, nothing is left") {
        b.reset(); // drops the root handle: the tree is finalized
        CHECK(qomem::live_object_count() == 0);
        // Reported once, by the finalization that caught it: the machine's,
        // releasing its newest child, the system bus, whose hook unparented
        // the controller, whose hook unparented bus0, whose hook unparented
        // bad; each finished its work and rethrew.
        CHECK(device_finalization_errors == strings{"machine: bad: unparent hook failed"});
    }
}
