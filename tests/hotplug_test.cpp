// Tests for the hotplug protocol (qomem/hotplug.hpp, qomem/device.hpp):
// device_add with pre_plug/plug, device_del with and without a guest
// handshake, DEVICE_DELETED only at finalization (after the last DMA
// mapping of the device's memory is gone), machine and bus handlers, the
// "realized" property, and the README's property-and-hotplug example.
#include <cstdint>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include <qomem/qomem.hpp>
#include <qomem/type_registry.hpp>

#include "test_support.hpp"

using qomem_test::event_log;
using qomem_test::event_recorder;
using qomem_test::leak_check;
using qomem_test::only;
using qomem_test::throwing_assertions;
using strings = std::vector<std::string>;
using events_t = std::vector<qomem::device_deleted>;

// ---- the README's example, as written there -------------------------------------------

namespace readme {

class nic : public qomem::device {
    QOMEM_OBJECT(nic, "nic", qomem::device)
public:
    std::string mac = "52:54:00:12:34:56";
    std::uint64_t ring = 0;
    static void class_init(class_type& k, qomem::type_tag<nic>) {
        k.add_property(qomem::string_property("mac", &nic::mac).describe("MAC address"));
        k.add_property(qomem::size_property("ring-size", &nic::ring)
                           .with_default(std::uint64_t{4096}));
    }
};
QOMEM_REGISTER_TYPE(nic)

/// A hot-plug slot: asks the guest before a device goes (PCIe's attention
/// button); the guest answers by writing an eject register, here a call.
class slot_ctrl : public qomem::device, public qomem::hotplug_handler {
    QOMEM_OBJECT(slot_ctrl, "slot-ctrl", qomem::device, qomem::hotplug_handler)
public:
    slot_ctrl() {
        auto b = qomem::make<qomem::bus>();
        add_child("slot.0", *b);
        b->set_hotplug_handler(this);
    }
    bool unplug_request(qomem::device& d) override {
        pending = &d; // tell the guest, and wait
        return true;
    }
    void guest_writes_eject() { qomem::complete_unplug(*std::exchange(pending, nullptr)); }
    qomem::device* pending = nullptr;
};

} // namespace readme

TEST_CASE("the README's property and hotplug example runs as written", "[hotplug][readme]") {
    leak_check leaks;
    using namespace readme;
    std::vector<std::string> listing;
    events_t ev;
    {
        auto root = qomem::container::make_root();
        qomem::machine& m = qomem::add_machine(*root);
        auto ctrl = qomem::make<slot_ctrl>();
        qomem::device_add(m, *ctrl, nullptr, "slot");

        auto n = qomem::make_by_name("nic");                 // registered: made by name
        n->parse_property("ring-size", "64k");              // QEMU's size syntax
        n->parse_property("mac", "52:54:00:ab:cd:ef");
        qomem::device_add(m, qomem::cast<qomem::device>(*n), ctrl->child_bus("slot.0"), "nic0");
        n.reset();                                           // the tree and the bus hold it
        qomem::object& nic0 = *m.peripheral().child("nic0");
        nic0.for_each_property([&](const qomem::property_info& p) {
            listing.push_back(fmt::format("{} ({}) = {}", p.name, p.type, nic0.print_property(p.name)));
        });

        qomem::device_del(m, "nic0");  // asks the guest: nic0 stays until it answers
        CHECK(m.peripheral().child("nic0") != nullptr);
        ctrl->guest_writes_eject();    // unplugged, and finalized: nothing else holds it
        ev = m.events().take();        // DEVICE_DELETED
        CHECK(m.peripheral().child("nic0") == nullptr);
    }
    CHECK(listing == strings{"type (string) = nic", "realized (bool) = true",
                             "hotpluggable (bool) = true", "mac (string) = 52:54:00:ab:cd:ef",
                             "ring-size (size) = 65536"});
    CHECK(ev == events_t{{"nic0", "/machine/peripheral/nic0"}});
}

// ---- a machine with memory: a slot controller with an eject register, a NIC with RAM ----

namespace {

/// A hot-plug slot controller whose registers the guest reads and writes:
/// offset 0 reads 1 while an unplug waits for the guest; writing 1 at offset
/// 4 ejects the device in the slot. Records the protocol's calls.
class slot_controller : public qomem::device, public qomem::hotplug_handler {
    QOMEM_OBJECT(slot_controller, "test-slot-controller", qomem::device, qomem::hotplug_handler)
public:
    struct regs {
        static constexpr qomem::access_limits valid{.min_access_size = 4, .max_access_size = 4};
        slot_controller* self;
        std::uint64_t read(qomem::hwaddr addr, unsigned) { return addr == 0 && self->pending_ ? 1 : 0; }
        void write(qomem::hwaddr addr, std::uint64_t v, unsigned) {
            if (addr == 4 && v == 1 && self->pending_) {
                self->log_->add("guest ejects");
                qomem::complete_unplug(*std::exchange(self->pending_, nullptr));
            }
        }
    } ops{this};

    slot_controller(event_log& log, qomem::memory_region& sys, bool handshake = true)
        : log_(&log), sys_(&sys), handshake_(handshake) {
        auto b = qomem::make<qomem::bus>();
        add_child("slot.0", *b);
        b->set_hotplug_handler(this);
        mmio_ = qomem::make_io(*this, "slot-ctrl", 0x10, ops).get();
    }
    qomem::bus& slot() const { return *child_bus("slot.0"); }

    /// pre_plug refuses while this is set (a slot already in use, say).
    bool refuse_pre_plug = false;
    bool refuse_plug = false;

    void pre_plug(qomem::device& d) override {
        log_->add("pre_plug " + d.id());
        if (refuse_pre_plug) throw std::runtime_error("slot occupied");
    }
    void plug(qomem::device& d) override {
        log_->add("plug " + d.id());
        if (refuse_plug) throw std::runtime_error("no power to the slot");
    }
    bool unplug_request(qomem::device& d) override {
        log_->add("unplug_request " + d.id());
        if (!handshake_) return false;
        pending_ = &d; // the attention indicator: the guest sees it at offset 0
        return true;
    }
    void unplug(qomem::device& d) override { log_->add("unplug " + d.id()); }

protected:
    void do_realize() override { sys_->add_subregion(0x10000000, *mmio_); }
    void do_unrealize() noexcept override { sys_->del_subregion(*mmio_); }

private:
    event_log* log_;
    qomem::memory_region* sys_;
    bool handshake_;
    qomem::memory_region* mmio_ = nullptr;
    qomem::device* pending_ = nullptr;
};

/// A NIC with a RAM buffer, mapped into the system memory while realized
/// (as a PCI BAR is).
class ram_nic : public qomem::device {
    QOMEM_OBJECT(ram_nic, "test-ram-nic", qomem::device)
public:
    ram_nic(event_log& log, qomem::memory_region& sys) : log_(&log), sys_(&sys) {
        ram_ = qomem::make_ram(*this, "nic.ram", 0x1000).get();
    }
    ~ram_nic() override { log_->add("finalize " + id()); }
    qomem::memory_region& ram() const { return *ram_; }

protected:
    void do_realize() override {
        log_->add("realize " + id());
        sys_->add_subregion(0x20000000, *ram_);
    }
    void do_unrealize() noexcept override {
        log_->add("unrealize " + id());
        sys_->del_subregion(*ram_);
    }

private:
    event_log* log_;
    qomem::memory_region* sys_;
    qomem::memory_region* ram_ = nullptr;
};

/// The system memory, an address space on it, and a machine; torn down in
/// the order that leaves nothing referenced.
struct rig {
    qomem::ref_ptr<qomem::memory_region> sys =
        qomem::make_container(nullptr, "system", qomem::u128_2_64);
    std::optional<qomem::address_space> as;
    qomem::ref_ptr<qomem::container> root = qomem::container::make_root();
    qomem::machine& m = qomem::add_machine(*root);

    rig() { as.emplace(*sys, "memory"); }
    ~rig() {
        root.reset();
        qomem::memory_synchronize();
        as.reset();
    }
    rig(const rig&) = delete;
    rig& operator=(const rig&) = delete;

    std::uint32_t read32(qomem::hwaddr a, qomem::memtx_result* r = nullptr) {
        std::uint32_t v = 0;
        const auto res = as->read(a, &v, 4);
        if (r) *r = res;
        return v;
    }
    qomem::memtx_result write32(qomem::hwaddr a, std::uint32_t v) { return as->write(a, &v, 4); }
};

} // namespace

TEST_CASE("device_del with a guest handshake: the device goes when the guest writes the eject "
          "register, and DEVICE_DELETED comes only after the last DMA mapping of its RAM is unmapped",
          "[hotplug][dma]") {
    leak_check leaks;
    throwing_assertions asserts;
    event_log log;
    event_recorder recorder(log);
    rig r;
    r.m.events().set_listener([&](const qomem::device_deleted& e) {
        log.add("DEVICE_DELETED " + e.id + " " + e.path);
    });
    auto ctrl = qomem::make<slot_controller>(log, *r.sys);
    qomem::device_add(r.m, *ctrl, nullptr, "slot");
    auto nic = qomem::make<ram_nic>(log, *r.sys);
    recorder.label(*nic, "nic0");
    recorder.label(nic->ram(), "nic.ram");
    log.clear();

    qomem::device_add(r.m, *nic, &ctrl->slot(), "nic0");
    CHECK(log.take() == strings{"pre_plug nic0", "realize nic0", "plug nic0"});
    CHECK(nic->canonical_path() == "/machine/peripheral/nic0");
    CHECK(nic->realized());
    ram_nic& raw = *nic;
    nic.reset(); // the tree and the bus hold it now

    // The guest uses the NIC's RAM; a DMA engine maps it and keeps the mapping.
    CHECK(r.write32(0x20000010, 0xfeedface) == qomem::memtx_ok);
    qomem::dma_mapping dma = r.as->map(0x20000000, 0x1000, /*is_write=*/true);
    REQUIRE(dma.size() == 0x1000);
    CHECK(dma.region() == &raw.ram());

    // device_del asks the guest; nothing changes until it answers.
    qomem::device_del(r.m, "nic0");
    CHECK(log.take() == strings{"unplug_request nic0"});
    CHECK(raw.unplug_pending());
    CHECK(raw.realized());
    CHECK(r.read32(0x10000000) == 1); // the guest sees the attention indicator
    CHECK_THROWS_WITH(qomem::device_del(r.m, "nic0"), Catch::Contains("already"));

    // The guest acknowledges: unplugged, unrealized, its RAM gone from the
    // guest's view; but the DMA mapping holds the RAM, which holds the NIC.
    CHECK(r.write32(0x10000004, 1) == qomem::memtx_ok);
    CHECK(log.take() == strings{"guest ejects", "unplug nic0", "unparenting nic0 from container",
                                "unrealize nic0", "unparenting nic.ram from nic0"});
    CHECK(r.read32(0x10000000) == 0);
    CHECK_FALSE(raw.realized());
    CHECK_FALSE(raw.unplug_pending());
    CHECK(raw.canonical_path() == std::nullopt);
    CHECK(raw.parent_bus() == nullptr);
    qomem::memtx_result res = qomem::memtx_ok;
    r.read32(0x20000010, &res);
    CHECK(res == qomem::memtx_decode_error); // a hole, at once
    qomem::memory_synchronize();             // no old flat view holds the RAM any more
    CHECK(log.events().empty());             // not finalized: no DEVICE_DELETED yet
    CHECK(r.m.events().take().empty());

    // The DMA goes on into the memory it mapped, then ends.
    std::uint32_t seen = 0;
    std::memcpy(&seen, dma.data() + 0x10, 4);
    CHECK(seen == 0xfeedface);
    std::memset(dma.data(), 0xab, 0x1000);
    r.as->unmap(dma, 0x1000);
    CHECK(log.take() == strings{"finalizing nic.ram", "finalizing nic0", "finalize nic0",
                                "DEVICE_DELETED nic0 /machine/peripheral/nic0"});
    CHECK(r.m.events().take() == events_t{{"nic0", "/machine/peripheral/nic0"}});
}

TEST_CASE("device_del without a guest handshake completes at once", "[hotplug]") {
    leak_check leaks;
    event_log log;
    rig r;
    auto ctrl = qomem::make<slot_controller>(log, *r.sys, /*handshake=*/false);
    qomem::device_add(r.m, *ctrl, nullptr, "slot");
    auto nic = qomem::make<ram_nic>(log, *r.sys);
    qomem::device_add(r.m, *nic, &ctrl->slot(), "nic0");
    nic.reset();
    log.clear();

    qomem::device_del(r.m, "nic0");
    qomem::memory_synchronize(); // the flat view that showed the RAM is reclaimed
    CHECK(log.take() == strings{"unplug_request nic0", "unplug nic0", "unrealize nic0",
                                "finalize nic0"});
    CHECK(r.m.events().take() == events_t{{"nic0", "/machine/peripheral/nic0"}});
}

TEST_CASE("a handler that refuses pre_plug or plug leaves the device as before device_add",
          "[hotplug][realize]") {
    leak_check leaks;
    event_log log;
    rig r;
    auto ctrl = qomem::make<slot_controller>(log, *r.sys);
    qomem::device_add(r.m, *ctrl, nullptr, "slot");
    auto nic = qomem::make<ram_nic>(log, *r.sys);
    log.clear();

    SECTION("pre_plug: the device's own realize never runs") {
        ctrl->refuse_pre_plug = true;
        CHECK_THROWS_WITH(qomem::device_add(r.m, *nic, &ctrl->slot(), "nic0"), "slot occupied");
        CHECK(log.take() == strings{"pre_plug nic0"});
    }
    SECTION("plug: the device is unrealized again") {
        ctrl->refuse_plug = true;
        CHECK_THROWS_WITH(qomem::device_add(r.m, *nic, &ctrl->slot(), "nic0"),
                          "no power to the slot");
        CHECK(log.take() == strings{"pre_plug nic0", "realize nic0", "plug nic0", "unrealize nic0"});
    }
    CHECK_FALSE(nic->realized());
    CHECK(nic->parent() == nullptr);
    CHECK(nic->parent_bus() == nullptr);
    CHECK(nic->ref_count() == 1);
    CHECK(nic->id().empty());
    CHECK_FALSE(r.m.peripheral().has_property("nic0"));
    CHECK(ctrl->slot().devices().empty());
    qomem::memory_synchronize(); // no old flat view holds the NIC's RAM any more
    nic.reset();
    CHECK(r.m.events().take().empty()); // never realized: no DEVICE_DELETED
}

namespace {
class dimm : public qomem::device {
    QOMEM_OBJECT(dimm, "test-dimm", qomem::device)
public:
    dimm() = default;
};

/// A machine that handles the hotplug of its DIMMs itself (QEMU's
/// MachineClass::get_hotplug_handler), whatever bus they sit on.
class dimm_machine : public qomem::machine, public qomem::hotplug_handler {
    QOMEM_OBJECT(dimm_machine, "test-dimm-machine", qomem::machine, qomem::hotplug_handler)
public:
    dimm_machine() = default;
    strings calls;
    qomem::hotplug_handler* get_hotplug_handler(qomem::device& d) override {
        return qomem::dynamic_cast_to<dimm>(&d) ? this : nullptr;
    }
    void pre_plug(qomem::device& d) override { calls.push_back("machine pre_plug " + d.id()); }
    void plug(qomem::device& d) override { calls.push_back("machine plug " + d.id()); }
    void unplug(qomem::device& d) override { calls.push_back("machine unplug " + d.id()); }
};

class unpluggable : public qomem::device {
    QOMEM_OBJECT(unpluggable, "test-unpluggable", qomem::device)
public:
    unpluggable() = default;
    static void class_init(class_type& k, qomem::type_tag<unpluggable>) { k.hotpluggable = false; }
};
} // namespace

TEST_CASE("the machine's handler takes precedence over the bus's for the devices it claims",
          "[hotplug][machine]") {
    leak_check leaks;
    event_log log;
    auto sys = qomem::make_container(nullptr, "system", qomem::u128_2_64);
    auto root = qomem::container::make_root();
    dimm_machine& m = qomem::add_machine<dimm_machine>(*root);
    auto ctrl = qomem::make<slot_controller>(log, *sys, /*handshake=*/false);
    qomem::device_add(m, *ctrl, nullptr, "slot");
    log.clear();

    auto d = qomem::make<dimm>();
    qomem::device_add(m, *d, &ctrl->slot(), "dimm0");
    CHECK(d->hotplug_handler_of() == static_cast<qomem::hotplug_handler*>(&m));
    qomem::device_del(m, "dimm0");
    CHECK(m.calls == strings{"machine pre_plug dimm0", "machine plug dimm0", "machine unplug dimm0"});
    CHECK(log.events().empty()); // the slot controller was never asked
    d.reset();
    CHECK(m.events().take() == events_t{{"dimm0", "/machine/peripheral/dimm0"}});

    // A device the machine does not claim goes to its bus's handler.
    auto other = qomem::make<qomem::device>();
    other->plug_into(ctrl->slot());
    CHECK(other->hotplug_handler_of() == static_cast<qomem::hotplug_handler*>(ctrl.get()));
    other->unplug_from_bus();
    root.reset();
    qomem::memory_synchronize();
}

TEST_CASE("device_del refuses what cannot be unplugged, naming it, and changes nothing",
          "[hotplug][error]") {
    leak_check leaks;
    event_log log;
    rig r;
    auto ctrl = qomem::make<slot_controller>(log, *r.sys);
    qomem::device_add(r.m, *ctrl, nullptr, "slot");
    auto plain_bus = qomem::make<qomem::bus>();
    r.m.add_child("plain-bus", *plain_bus);

    SECTION("no such device") {
        CHECK_THROWS_AS(qomem::device_del(r.m, "nope"), qomem::hotplug_error);
        CHECK_THROWS_WITH(qomem::device_del(r.m, "nope"), Catch::Contains("'nope' not found"));
    }
    SECTION("not a device") {
        CHECK_THROWS_WITH(qomem::device_del(r.m, "/machine/unattached"),
                          Catch::Contains("not a hotpluggable device"));
    }
    SECTION("a device on a bus without a hotplug handler") {
        auto d = qomem::make<qomem::device>();
        qomem::device_add(r.m, *d, plain_bus.get(), "d0");
        CHECK_THROWS_WITH(qomem::device_del(r.m, "d0"), Catch::Contains("does not support hotplugging"));
        CHECK(d->realized());
        CHECK(d->canonical_path() == "/machine/peripheral/d0");
    }
    SECTION("a device whose class is not hot-pluggable") {
        auto d = qomem::make<unpluggable>();
        qomem::device_add(r.m, *d, &ctrl->slot(), "u0");
        CHECK_FALSE(d->get_bool("hotpluggable"));
        CHECK_THROWS_WITH(qomem::device_del(*d), Catch::Contains("test-unpluggable") &&
                                                     Catch::Contains("does not support hotplugging"));
        CHECK_FALSE(d->unplug_pending());
        CHECK(log.take() == strings{"pre_plug u0", "plug u0"}); // no unplug_request
    }
    SECTION("a device on no bus that the machine does not claim has no handler") {
        auto d = qomem::make<qomem::device>();
        qomem::device_add(r.m, *d, nullptr, "lone");
        CHECK_THROWS_WITH(qomem::device_del(r.m, "lone"), Catch::Contains("no hotplug handler"));
    }
    SECTION("device_add refuses a malformed or duplicate id before changing anything") {
        auto d = qomem::make<qomem::device>();
        CHECK_THROWS_AS(qomem::device_add(r.m, *d, nullptr, "0bad"), qomem::hotplug_error);
        CHECK_THROWS_WITH(qomem::device_add(r.m, *d, nullptr, "slot"), Catch::Contains("duplicate"));
        CHECK(d->ref_count() == 1);
        CHECK(d->parent() == nullptr);
        CHECK(d->id().empty());
    }
}

TEST_CASE("the realized property realizes and unrealizes, with the hotplug handler's hooks",
          "[hotplug][property]") {
    leak_check leaks;
    event_log log;
    rig r;
    auto ctrl = qomem::make<slot_controller>(log, *r.sys);
    ctrl->set_bool("realized", true);
    CHECK(ctrl->realized());
    auto nic = qomem::make<ram_nic>(log, *r.sys);
    nic->set_id("n");
    nic->plug_into(ctrl->slot());
    r.m.peripheral().add_child("n", *nic);
    log.clear();

    CHECK_FALSE(nic->get_bool("realized"));
    nic->set_bool("realized", true);
    CHECK(nic->get_bool("realized"));
    CHECK(log.take() == strings{"pre_plug n", "realize n", "plug n"});
    nic->set_bool("realized", true); // already: nothing happens (QEMU's setter too)
    CHECK(log.events().empty());
    nic->parse_property("realized", "off");
    CHECK_FALSE(nic->realized());
    CHECK(log.take() == strings{"unrealize n"});
    ctrl->set_bool("realized", false);
    qomem::unparent(*nic);
    qomem::memory_synchronize(); // before the handles go: no old view holds their regions
}

TEST_CASE("a device finalized after its machine still announces DEVICE_DELETED", "[hotplug]") {
    leak_check leaks;
    events_t seen;
    qomem::ref_ptr<qomem::device> survivor;
    {
        auto root = qomem::container::make_root();
        qomem::machine& m = qomem::add_machine(*root);
        m.events().set_listener([&](const qomem::device_deleted& e) { seen.push_back(e); });
        survivor = qomem::make<qomem::device>();
        qomem::device_add(m, *survivor, nullptr, "held");
        // The machine and its tree go; the device is unrealized and
        // unparented with them, but a reference outlives them all.
    }
    CHECK(seen.empty());
    CHECK_FALSE(survivor->realized());
    survivor.reset();
    CHECK(seen == events_t{{"held", "/machine/peripheral/held"}});
}
