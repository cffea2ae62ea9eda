// qomem/device.hpp — devices, buses and machines (QEMU's qdev), and the
// hotplug protocol that joins them (hotplug.hpp has the handler interface and
// the event channel).
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
// or, with the hotplug protocol (QEMU's device_add / device_del):
//
//     qomem::device_add(m, *disk, hba->child_bus("scsi.0"), "disk0");
//     qomem::device_del(m, "disk0");   // the bus's handler asks the guest ...
//     // ... DEVICE_DELETED {"disk0", "/machine/peripheral/disk0"} in
//     // m.events() once the disk is finalized
//
// A device places its regions in the guest's view with map_region (QEMU's
// sysbus_mmio_map, a PCI BAR's registration); unrealize takes them out, so an
// unplugged device is a hole for the guest at once, while DMA mappings taken
// before keep their regions — and through them the device — until they end.
//
// Unparenting a device (its unparent hook) unrealizes it, unparents its child
// buses (which unparent the devices on them), leaves its parent bus and then
// unparents the children that follow their device out of the tree (memory
// regions: see memory_region.hpp). Each of those steps drops references and
// may finalize objects; the device itself is finalized when its last
// reference goes, which is never before the objects it owned. Every step runs
// even if an earlier one throws (the first exception is rethrown at the end).
//
// Every device has the class properties "realized" (bool: setting it
// realizes or unrealizes) and "hotpluggable" (read-only, from its class).
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <qomem/hotplug.hpp>
#include <qomem/machine.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/memory_system.hpp>
#include <qomem/object.hpp>

namespace qomem {

class bus;
class machine;

class device : public object {
    QOMEM_OBJECT(device, "device", object)
public:
    /// The device class (QEMU's DeviceClass): subtypes that declare their
    /// own class_type derive it from this one.
    struct class_type : object_class {
        /// device_del refuses a device whose class says false.
        bool hotpluggable = true;
    };
    static void class_init(class_type& k, type_tag<device>);

    device() noexcept = default;

    bool realized() const noexcept { return realized_; }

    /// The user-given id (QEMU's `-device ...,id=`), "" if none.
    const std::string& id() const noexcept { return id_; }
    void set_id(std::string id) { id_ = std::move(id); }

    /// Realizes the device (QEMU's realize): the hotplug handler's pre_plug,
    /// do_realize(), its child buses marked realized, the handler's plug.
    /// An orphan device on a bus of a machine tree is then attached as
    /// /machine/unattached/device[N] (that container takes a reference);
    /// unlike QEMU the attachment comes last, so a refused realize leaves
    /// nothing to undo. A device realized in a machine's tree will announce
    /// DEVICE_DELETED on the machine's events when it is finalized after
    /// being unrealized.
    /// Requires (asserted): not realized.
    /// Throws: what pre_plug or do_realize throws (nothing changed); what
    /// plug throws (the device is unrealized again, do_unrealize having run).
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

    /// The machine whose tree holds this device, or holds its bus when the
    /// device has no parent yet; null if none.
    machine* machine_of() const noexcept;

    /// Who handles this device's hotplug (QEMU's qdev_get_hotplug_handler):
    /// its machine if the machine claims it, else its bus's handler; null if
    /// neither.
    qomem::hotplug_handler* hotplug_handler_of() const noexcept;

    /// True between device_del and the completion of the unplug.
    bool unplug_pending() const noexcept { return unplug_pending_; }

    // ---- the device's regions in the guest's view ---------------------------

    /// Places `r`, one of this device's regions, in `container` at `addr`
    /// (QEMU's sysbus_mmio_map, or a PCI BAR's registration), and takes it
    /// out again when the device is unrealized — so after an unplug the guest
    /// sees a hole at once, while DMA mappings taken before keep their
    /// region (and through it the device) until they end.
    /// Requires (asserted): `r` is a child of this device and owned by it, and
    /// in no container. Effects: as container.add_subregion (the container
    /// takes memory_region_ref on `r`). Throws: as add_subregion (nothing
    /// recorded then). Complexity: that of add_subregion.
    void map_region(memory_region& container, hwaddr addr, memory_region& r,
                    std::int32_t priority = 0);

    /// Takes `r` out of its container now (before unrealize).
    /// Requires (asserted): `r` was placed by map_region and is still there.
    /// Effects: as del_subregion (the container's reference is dropped; `r`
    /// stays this device's child).
    void unmap_region(memory_region& r);

    /// The regions map_region placed that are still in their containers.
    std::vector<memory_region*> mapped_regions() const;

protected:
    /// Announces DEVICE_DELETED if the device was realized and unrealized.
    inline ~device() override;
    /// The device's own realize step; may throw to refuse.
    virtual void do_realize() {}
    /// The device's own unrealize step.
    virtual void do_unrealize() noexcept {}
    /// QEMU's device_unparent; see the header overview. Overriders call it.
    inline void on_unparent() override;

private:
    friend class bus;
    friend void device_del(device& dev);
    friend void complete_unplug(device& dev);
    bool realized_ = false;
    bool unplug_pending_ = false;
    bool deleted_event_due_ = false; // unrealized since the last realize
    bus* parent_bus_ = nullptr;
    std::string bus_link_; // our link name on parent_bus_
    std::string id_;
    std::string path_;                      // canonical path when realized
    std::shared_ptr<device_events> events_; // the machine's, when realized on one
    // Regions map_region placed (not referenced: each is our child while
    // recorded; unparented ones are dropped from the list when seen).
    std::vector<memory_region*> mapped_;
    void unmap_regions() noexcept;
};

class bus : public object {
    QOMEM_OBJECT(bus, "bus", object)
public:
    /// A bus has a weak link "hotplug-handler" (QEMU's), empty at first.
    bus() {
        add_link("hotplug-handler", nullptr, link_strength::weak, hotplug_handler::static_type());
    }

    /// The device that owns this bus (its parent), if any.
    device* owner_device() const noexcept { return dynamic_cast_to<device>(parent()); }
    bool realized() const noexcept { return realized_; }

    /// Makes `handler` (an object implementing hotplug_handler, or null) the
    /// handler of the devices plugged here (QEMU's qbus_set_hotplug_handler).
    /// Throws: property_error if it does not implement hotplug_handler.
    void set_hotplug_handler(object* handler) { set_link("hotplug-handler", handler); }
    /// The handler, or null.
    qomem::hotplug_handler* get_hotplug_handler() const noexcept {
        return dynamic_cast_to<qomem::hotplug_handler>(link("hotplug-handler"));
    }
    /// QEMU's qbus_is_hotpluggable: it has a handler.
    bool hotpluggable() const noexcept { return get_hotplug_handler() != nullptr; }

    /// Calls f(device&) for each device plugged into the bus, oldest first.
    template <class F>
    void for_each_device(F&& f) const {
        for (device* d : devices()) f(*d);
    }
    std::vector<device*> devices() const {
        std::vector<device*> out;
        for_each_link([&](std::string_view name, object* target, link_strength) {
            auto* d = dynamic_cast_to<device>(target);
            if (d && d->parent_bus_ == this && d->bus_link_ == name) out.push_back(d);
        });
        return out;
    }

protected:
    /// QEMU's bus_unparent: every device on the bus is unparented (and so
    /// leaves the bus) before the bus itself goes, even if one of them throws.
    void on_unparent() override {
        // Re-read the first device each time, as QEMU's bus_unparent does:
        // unparenting one device may finalize others plugged into this bus
        // (its own children, e.g. the functions of an ISA super I/O chip).
        detail::first_error errors;
        for (std::vector<device*> ds = devices(); !ds.empty(); ds = devices()) {
            device* d = ds.front();
            const std::string link_name = d->bus_link_;
            errors.run([&] {
                if (d->parent())
                    unparent(*d);
                else
                    d->unplug_from_bus();
            });
            // A hook that threw before leaving the bus: take it off here, or
            // the loop would never end. (Still linked means still alive.)
            if (link(link_name) == d) errors.run([&] { d->unplug_from_bus(); });
        }
        object::on_unparent();
        errors.rethrow();
    }

private:
    friend class device;
    bool realized_ = false;
};

/// QEMU's qdev_device_add: gives `dev` its id, adds it to
/// /machine/peripheral/<id> (or /machine/peripheral-anon/device[N] without
/// one), plugs it into `b` (if not null) and realizes it.
/// Requires (asserted): `dev` has no parent, is on no bus, is not realized.
/// Effects: the container and the bus each take a reference. On a throw
/// everything is undone (the caller's reference is again the only one).
/// Throws: hotplug_error for a malformed id (letters, digits, '-', '.', '_',
/// starting with a letter) or one in use (nothing changed); what realize
/// throws.
device& device_add(machine& m, device& dev, bus* b, std::string_view id = {});

/// QEMU's device_del (qdev_unplug): asks for `dev` to be removed through its
/// hotplug handler's unplug_request; without a guest handshake the unplug
/// completes at once (complete_unplug). DEVICE_DELETED follows when the
/// device is finalized.
/// Effects: marks `dev` unplug_pending() until complete_unplug; references
/// as complete_unplug when it runs.
/// Throws: hotplug_error when its bus is not hot-pluggable (no handler), its
/// class is not hot-pluggable, an unplug is already pending, or it has no
/// handler; what unplug_request throws (nothing pending then).
void device_del(device& dev);
/// device_del of the device with id `id` in /machine/peripheral, or at the
/// absolute path `id`. Throws: hotplug_error when there is none, or it is
/// not a device; then as device_del.
void device_del(machine& m, std::string_view id);

/// The end of an unplug (QEMU's hotplug_handler_unplug + object_unparent):
/// the handler's unplug(dev), then the device is unparented (unrealized,
/// off its bus, its regions let go). Called by device_del without a guest
/// handshake, or by the handler when the guest acknowledges.
/// Effects: drops the tree's and the bus's references: the device is
/// finalized now, or when the last other reference goes (a DMA mapping of
/// its memory).
/// Throws: what the handler's unplug or the device's unparent hook throws,
/// after every step ran.
void complete_unplug(device& dev);

// ---- implementation ---------------------------------------------------------

inline void device::class_init(class_type& k, type_tag<device>) {
    k.add_property(bool_property<device>(
                       "realized", [](const device& d) { return d.realized(); },
                       [](device& d, bool v) {
                           if (v && !d.realized())
                               d.realize();
                           else if (!v && d.realized())
                               d.unrealize();
                       })
                       .describe("realize or unrealize the device"));
    k.add_property(bool_property<device>("hotpluggable", [](const device& d) {
                       return static_cast<const class_type&>(d.get_class()).hotpluggable;
                   }).describe("whether device_del may remove the device"));
}

inline device::~device() {
    if (deleted_event_due_ && events_) events_->announce({id_, path_});
}

inline bus* device::child_bus(std::string_view name) const noexcept {
    return dynamic_cast_to<bus>(child(name));
}

inline machine* device::machine_of() const noexcept {
    const object* anchor = this;
    if (!parent() && parent_bus_) anchor = parent_bus_;
    const object& top = anchor->tree_root();
    if (auto* m = dynamic_cast_to<machine>(top.child("machine"))) return m;
    return dynamic_cast_to<machine>(const_cast<object*>(&top));
}

inline hotplug_handler* device::hotplug_handler_of() const noexcept {
    if (machine* m = machine_of())
        if (hotplug_handler* h = m->get_hotplug_handler(const_cast<device&>(*this))) return h;
    return parent_bus_ ? parent_bus_->get_hotplug_handler() : nullptr;
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
    hotplug_handler* handler = hotplug_handler_of();
    if (handler) handler->pre_plug(*this);
    try {
        do_realize();
    } catch (...) {
        unmap_regions(); // placements it made before failing
        throw;
    }
    realized_ = true;
    for_each_child([](object& c) {
        if (auto* b = dynamic_cast_to<bus>(&c)) b->realized_ = true;
    });
    if (handler) {
        try {
            handler->plug(*this);
        } catch (...) {
            for_each_child([](object& c) {
                if (auto* b = dynamic_cast_to<bus>(&c)) b->realized_ = false;
            });
            realized_ = false;
            do_unrealize();
            unmap_regions();
            throw;
        }
    }
    if (!parent() && parent_bus_) {
        if (object* un = parent_bus_->resolve_path("/machine/unattached"))
            un->add_child("device[*]", *this);
    }
    deleted_event_due_ = false;
    if (machine* m = machine_of()) {
        events_ = m->events_;
        path_ = canonical_path().value_or(std::string());
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
    unmap_regions();
    deleted_event_due_ = true;
}

inline void device::map_region(memory_region& container, hwaddr addr, memory_region& r,
                               std::int32_t priority) {
    QOMEM_ASSERT(r.owner() == this && r.parent() == this,
                 "map_region: region '{}' is not a region of this {} (owner {}, parent {})",
                 r.region_name(), type().name, static_cast<const void*>(r.owner()),
                 static_cast<const void*>(r.parent()));
    QOMEM_ASSERT(!r.container(), "map_region: region '{}' is already in container '{}'",
                 r.region_name(), r.container() ? r.container()->region_name() : std::string());
    mapped_.reserve(mapped_.size() + 1); // the record cannot fail after the change
    container.add_subregion(addr, r, priority);
    mapped_.push_back(&r);
}

inline void device::unmap_region(memory_region& r) {
    auto it = std::find(mapped_.begin(), mapped_.end(), &r);
    QOMEM_ASSERT(it != mapped_.end() && r.container(),
                 "unmap_region: region '{}' was not placed by map_region of this {}",
                 r.region_name(), type().name);
    r.container()->del_subregion(r);
    mapped_.erase(it);
}

inline std::vector<memory_region*> device::mapped_regions() const {
    std::vector<memory_region*> out;
    for (memory_region* r : mapped_)
        if (r->parent() == this && r->container()) out.push_back(r);
    return out;
}

inline void device::unmap_regions() noexcept {
    // Only regions still our children are known to be alive; one the user
    // unparented by hand stays where it is.
    std::vector<memory_region*> todo;
    for (memory_region* r : std::exchange(mapped_, {}))
        if (r->parent() == this && r->container()) todo.push_back(r);
    if (todo.empty()) return;
    detail::first_error errors;
    errors.run([&] {
        memory_system* sys = todo.front()->system();
        std::optional<memory_transaction> tx;
        if (sys) tx.emplace(*sys); // one commit for all of them
        for (memory_region* r : todo) errors.run([&] { r->container()->del_subregion(*r); });
    });
    errors.report_to_finalization_handler(type().name);
}

inline void device::on_unparent() {
    // No extra reference to ourselves is needed: our parent's child<>
    // reference is dropped only after this hook returns (or throws).
    detail::first_error errors;
    if (realized_) errors.run([&] { unrealize(); });
    std::vector<object*> buses;
    for_each_child([&](object& c) {
        if (dynamic_cast_to<bus>(&c)) buses.push_back(&c);
    });
    for (object* b : buses) errors.run([&] { unparent(*b); });
    if (parent_bus_) errors.run([&] { unplug_from_bus(); });
    std::vector<object*> followers;
    for_each_child([&](object& c) {
        if (c.follows_owner_out_of_tree()) followers.push_back(&c);
    });
    for (object* f : followers) errors.run([&] { unparent(*f); });
    object::on_unparent();
    errors.rethrow();
}

inline device& device_add(machine& m, device& dev, bus* b, std::string_view id) {
    QOMEM_ASSERT(!dev.parent() && !dev.parent_bus() && !dev.realized(),
                 "device_add of a {} that is already in use (parent {}, bus {}, realized {})",
                 dev.type().name, static_cast<const void*>(dev.parent()),
                 static_cast<const void*>(dev.parent_bus()), dev.realized());
    if (!id.empty() && !detail::id_wellformed(id))
        throw hotplug_error(fmt::format("invalid device id '{}': a letter, then letters, digits, "
                                        "'-', '.' or '_'",
                                        id));
    if (!id.empty() && m.peripheral().has_property(id))
        throw hotplug_error(fmt::format("duplicate device id '{}'", id));
    dev.set_id(std::string(id));
    if (id.empty())
        m.peripheral_anon().add_child("device[*]", dev);
    else
        m.peripheral().add_child(id, dev);
    try {
        if (b) dev.plug_into(*b);
        dev.realize();
    } catch (...) {
        try {
            unparent(dev); // leaves the bus too
        } catch (...) {
        }
        dev.set_id({});
        throw;
    }
    return dev;
}

inline void device_del(device& dev) {
    if (bus* b = dev.parent_bus(); b && !b->hotpluggable())
        throw hotplug_error(fmt::format("bus '{}' does not support hotplugging", b->name()));
    if (!static_cast<const device::class_type&>(dev.get_class()).hotpluggable)
        throw hotplug_error(fmt::format("device '{}' ({}) does not support hotplugging", dev.id(),
                                        dev.type().name));
    if (dev.unplug_pending_)
        throw hotplug_error(
            fmt::format("device '{}' is already in the process of unplug", dev.id()));
    hotplug_handler* handler = dev.hotplug_handler_of();
    if (!handler)
        throw hotplug_error(
            fmt::format("device '{}' ({}) has no hotplug handler", dev.id(), dev.type().name));
    dev.unplug_pending_ = true;
    bool asked = false;
    try {
        asked = handler->unplug_request(dev);
    } catch (...) {
        dev.unplug_pending_ = false;
        throw;
    }
    if (!asked) complete_unplug(dev);
}

inline void device_del(machine& m, std::string_view id) {
    object* o = !id.empty() && id.front() == '/' ? m.resolve_path(id)
                                                 : resolve_path_component(m.peripheral(), id);
    if (!o) throw hotplug_error(fmt::format("device '{}' not found", id));
    device* d = dynamic_cast_to<device>(o);
    if (!d) throw hotplug_error(fmt::format("'{}' is not a hotpluggable device", id));
    device_del(*d);
}

inline void complete_unplug(device& dev) {
    ref_ptr<device> hold(&dev); // until every step ran; may be the last
    detail::first_error errors;
    if (hotplug_handler* handler = dev.hotplug_handler_of())
        errors.run([&] { handler->unplug(dev); });
    if (dev.parent()) {
        errors.run([&] { unparent(dev); });
    } else {
        if (dev.realized()) errors.run([&] { dev.unrealize(); });
        if (dev.parent_bus()) errors.run([&] { dev.unplug_from_bus(); });
    }
    dev.unplug_pending_ = false;
    hold.reset(); // may finalize the device: DEVICE_DELETED
    errors.rethrow();
}

} // namespace qomem
