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

#include <boost/intrusive_ptr.hpp>

#include <qomem/memory_system.hpp>
#include <qomem/object.hpp>

namespace qomem {

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

private:
    ref_ptr<memory_system> memory_;
};

/// Creates a machine and adds it as child "machine" of `root`, which then holds
/// the only reference to it.
inline machine& add_machine(container& root) {
    auto m = make<machine>();
    root.add_child("machine", *m);
    return *m;
}

} // namespace qomem
