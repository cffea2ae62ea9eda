// qomem/device.hpp — devices, buses and machines (QEMU's qdev).
//
// A device sits in the composition tree (usually under /machine/peripheral or
// /machine/unattached) and, independently, on a parent bus that holds a
// reference to it. It may own child buses, which are its children in the tree.
//
//     auto root = qomem::container::make_root();
//     qomem::machine& m = qomem::add_machine(*root);      // machine.hpp
//     auto hba = qomem::make<my_controller>();         // creates child bus "scsi.0"
//     m.peripheral().add_child("hba", *hba);
//     auto disk = qomem::make<my_disk>();
//     disk->plug_into(*hba->child_bus("scsi.0"));      // the bus refs the disk
//     m.peripheral().add_child("disk0", *disk);
//     hba->realize(); disk->realize();
//     qomem::unparent(*disk);   // hot-unplug: unrealize, leave bus, drop refs
//
// Unparenting a device (its unparent hook) unrealizes it, unparents its child
// buses (which unparent the devices on them), leaves its parent bus and then
// unparents the children that follow their device out of the tree (memory
// regions: see memory_region.hpp). Each of those steps drops references and
// may finalize objects; the device itself is finalized when its last
// reference goes, which is never before the objects it owned.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include <qomem/object.hpp>

namespace qomem {

class bus;

class device : public object {
    QOMEM_OBJECT(device, "device", object)
public:
    device() noexcept = default;

    bool realized() const noexcept { return realized_; }

    /// The user-given id (QEMU's `-device ...,id=`), "" if none.
    const std::string& id() const noexcept { return id_; }
    void set_id(std::string id) { id_ = std::move(id); }

    /// Realizes the device (QEMU's realize): runs do_realize(), then marks its
    /// child buses realized. An orphan device on a bus of a machine tree is
    /// then attached as /machine/unattached/device[N] (that container takes a
    /// reference). Unlike QEMU the attachment happens after do_realize, so a
    /// refused realize leaves nothing to undo.
    /// Requires (asserted): not realized.
    /// Throws: whatever do_realize() throws; the device then stays unrealized
    /// and unattached, as before the call.
    void realize();

    /// Unrealizes the devices on its child buses (deepest first), then this
    /// device (do_unrealize()). Requires (asserted): realized. References: none.
    void unrealize();

    /// The bus this device is plugged into, or null.
    bus* parent_bus() const noexcept { return parent_bus_; }

    /// Plugs the device into `b`: `b` takes a reference to it (strong link
    /// "child[N]" on the bus). Requires (asserted): not already on a bus.
    void plug_into(bus& b);

    /// Leaves the parent bus, dropping the bus's reference (which may finalize
    /// the device if nothing else holds it). Requires (asserted): on a bus.
    void unplug_from_bus();

    /// The child bus named `name`, or null.
    bus* child_bus(std::string_view name) const noexcept;

protected:
    /// The device's own realize step; may throw to refuse.
    virtual void do_realize() {}
    /// The device's own unrealize step.
    virtual void do_unrealize() noexcept {}
    /// QEMU's device_unparent; see the header overview. Overriders call it.
    void on_unparent() override;

private:
    friend class bus;
    bool realized_ = false;
    bus* parent_bus_ = nullptr;
    std::string bus_link_; // our link name on parent_bus_
    std::string id_;
};

class bus : public object {
    QOMEM_OBJECT(bus, "bus", object)
public:
    bus() noexcept = default;

    /// The device that owns this bus (its parent), if any.
    device* owner_device() const noexcept { return dynamic_cast_to<device>(parent()); }
    bool realized() const noexcept { return realized_; }

    /// Calls f(device&) for each device plugged into the bus, oldest first.
    template <class F>
    void for_each_device(F&& f) const {
        for (device* d : devices()) f(*d);
    }
    std::vector<device*> devices() const {
        std::vector<device*> out;
        for_each_link([&](std::string_view, object* target, link_strength) {
            if (auto* d = dynamic_cast_to<device>(target)) out.push_back(d);
        });
        return out;
    }

protected:
    /// QEMU's bus_unparent: every device on the bus is unparented (and so
    /// leaves the bus) before the bus itself goes.
    void on_unparent() override {
        // Re-read the first device each time, as QEMU's bus_unparent does:
        // unparenting one device may finalize others plugged into this bus
        // (its own children, e.g. the functions of an ISA super I/O chip).
        for (std::vector<device*> ds = devices(); !ds.empty(); ds = devices()) {
            device* d = ds.front();
            if (d->parent())
                unparent(*d);
            else
                d->unplug_from_bus();
        }
        object::on_unparent();
    }

private:
    friend class device;
    bool realized_ = false;
};

// ---- implementation ---------------------------------------------------------

inline bus* device::child_bus(std::string_view name) const noexcept {
    return dynamic_cast_to<bus>(child(name));
}

inline void device::plug_into(bus& b) {
    QOMEM_ASSERT(!parent_bus_, "{} '{}' is already plugged into a bus", type().name, name());
    std::string link_name = "child[0]";
    for (std::size_t i = 1; b.has_property(link_name); ++i) link_name = fmt::format("child[{}]", i);
    b.add_link(link_name, this, link_strength::strong, device::static_type());
    parent_bus_ = &b;
    bus_link_ = std::move(link_name);
}

inline void device::unplug_from_bus() {
    QOMEM_ASSERT(parent_bus_, "{} '{}' is not plugged into a bus", type().name, name());
    bus* b = std::exchange(parent_bus_, nullptr);
    const std::string link_name = std::move(bus_link_);
    bus_link_.clear();
    b->delete_property(link_name); // may finalize this device: touch nothing after
}

inline void device::realize() {
    QOMEM_ASSERT(!realized_, "{} '{}' is already realized", type().name, name());
    do_realize();
    realized_ = true;
    for_each_child([](object& c) {
        if (auto* b = dynamic_cast_to<bus>(&c)) b->realized_ = true;
    });
    if (!parent() && parent_bus_) {
        if (object* un = parent_bus_->resolve_path("/machine/unattached"))
            un->add_child("device[*]", *this);
    }
}

inline void device::unrealize() {
    QOMEM_ASSERT(realized_, "{} '{}' is not realized", type().name, name());
    for_each_child([](object& c) {
        if (auto* b = dynamic_cast_to<bus>(&c)) {
            for (device* d : b->devices())
                if (d->realized()) d->unrealize();
            b->realized_ = false;
        }
    });
    realized_ = false;
    do_unrealize();
}

inline void device::on_unparent() {
    ref(); // hold ourselves while our own references are being dropped
    if (realized_) unrealize();
    std::vector<object*> buses;
    for_each_child([&](object& c) {
        if (dynamic_cast_to<bus>(&c)) buses.push_back(&c);
    });
    for (object* b : buses) unparent(*b);
    if (parent_bus_) unplug_from_bus();
    std::vector<object*> followers;
    for_each_child([&](object& c) {
        if (c.follows_owner_out_of_tree()) followers.push_back(&c);
    });
    for (object* f : followers) unparent(*f);
    object::on_unparent();
    unref();
}

} // namespace qomem
