// qomem/machine.hpp — a machine: the object at /machine, with the containers
// QEMU gives it, and its own memory system.
//
//     auto root = qomem::container::make_root();
//     qomem::machine& m = qomem::add_machine(*root);
//     auto sys = qomem::make_container(qomem::region_owner::ownerless_in(m.unattached()),
//                                      "system", qomem::u128_2_64);
//     qomem::address_space memory(m.memory(), *sys, "memory");   // sys joins m's system
//
// Each machine's memory system is its own (QEMU's model: one memory system
// per machine), so two machines in one process share no transaction, writer
// role, pending change or flat view. The memory system lives as long as the
// machine or anything using it (its regions, its address spaces).
#pragma once

#include <memory>
#include <string>
#include <type_traits>

#include <boost/intrusive_ptr.hpp>

#include <qomem/hotplug.hpp>
#include <qomem/log.hpp>
#include <qomem/memory_system.hpp>
#include <qomem/object.hpp>

namespace qomem {

class device;

/// A machine: the object at /machine, with the containers QEMU gives it, its
/// memory system, and the event channel its devices announce their deletion on.
class machine : public object {
    QOMEM_OBJECT(machine, "machine", object)
public:
    machine() : memory_(memory_system::make()) {
        for (const char* name : {"unattached", "peripheral", "peripheral-anon"}) {
            auto c = make<container>();
            add_child(name, *c);
        }
    }
    container& unattached() const { return cast<container>(*child("unattached")); }
    container& peripheral() const { return cast<container>(*child("peripheral")); }
    container& peripheral_anon() const { return cast<container>(*child("peripheral-anon")); }

    /// This machine's memory system.
    memory_system& memory() const noexcept { return *memory_; }

    /// QEMU's MachineClass::get_hotplug_handler: the handler this machine
    /// provides for `dev` (memory DIMMs, CPUs), or null to leave it to the
    /// device's bus. The default claims nothing.
    virtual qomem::hotplug_handler* get_hotplug_handler(device& dev) {
        (void)dev;
        return nullptr;
    }

    /// The machine's events (DEVICE_DELETED).
    device_events& events() const noexcept { return *events_; }

protected:
    /// Logs (log_category::lifetime) each of its memory system's
    /// stranded_regions(): when a machine is finalized its devices are gone
    /// from the tree, so a region still holding its owner then is most often
    /// half of a reference cycle, reported by name.
    ~machine() override {
        try {
            for (const std::string& line : memory_->stranded_regions())
                log_line(log_category::lifetime, "qomem: at the end of a machine: " + line);
        } catch (...) { // a report must not stop the teardown
        }
    }

private:
    friend class device;
    ref_ptr<memory_system> memory_;
    std::shared_ptr<device_events> events_ = std::make_shared<device_events>();
};

/// Creates a machine of type M and adds it as child "machine" of `root`,
/// which then holds the only reference to it.
template <class M = machine>
requires std::is_base_of_v<machine, M> M& add_machine(container& root) {
    auto m = make<M>();
    root.add_child("machine", *m);
    return *m;
}

} // namespace qomem
