// qomem/memory_listener.hpp — following an address space's flat view.
//
// An accelerator or a vhost backend keeps its own copy of the memory map by
// listening to an address space:
//
//     struct slots : qomem::memory_listener {
//         slots() : memory_listener(10) {}
//         void region_add(const qomem::memory_section& s) override { map(s); }
//         void region_del(const qomem::memory_section& s) override { unmap(s); }
//     } l;
//     as.add_listener(l);      // replays the current view as region_add
//     ...                      // topology changes arrive as del/add/nop
//     as.remove_listener(l);   // every range reported as region_del
//
// On each commit that changes the address space's flat view, a listener gets
// begin(), then every region_del (for ranges that are gone or changed), then
// region_add (new or changed ranges) and region_nop (unchanged ones) in
// address order, then commit(). Deletions run in descending listener
// priority, everything else in ascending priority; equal priorities keep
// registration order. A section handed to a callback always belongs to a view
// that is still alive (the old view is released only after the callbacks).
//
// Callbacks run on the thread that commits, which holds the memory system's
// writer role (memory_system::lock); they may change the topology, which is
// then committed again after the current commit.
#pragma once

#include <cstdint>

#include <boost/intrusive/list.hpp>

#include <qomem/assert.hpp>
#include <qomem/types.hpp>

namespace qomem {

class memory_region;
class address_space;
class memory_system;
namespace detail {
struct view_slot;
}

/// One range of a flat view, as listeners and find() see it (QEMU's
/// MemoryRegionSection). A plain description: it holds no reference (find()
/// returns one together with a reference, see address_space.hpp).
struct memory_section {
    memory_region* mr = nullptr;
    hwaddr offset_within_address_space = 0;
    u128 size = 0;
    hwaddr offset_within_region = 0;
    bool readonly = false;
    bool nonvolatile = false;
};

class memory_listener {
public:
    explicit memory_listener(unsigned priority = 0) noexcept : priority_(priority) {}
    memory_listener(const memory_listener&) = delete;
    memory_listener& operator=(const memory_listener&) = delete;

    unsigned priority() const noexcept { return priority_; }
    /// The address space this listener is registered to, or null.
    address_space* registered_to() const noexcept { return as_; }

    virtual void begin() {}
    virtual void region_add(const memory_section&) {}
    virtual void region_del(const memory_section&) {}
    virtual void region_nop(const memory_section&) {}
    virtual void commit() {}

protected:
    /// Requires (asserted, never compiled out): not registered to an address
    /// space, which would otherwise call into a destroyed object.
    ~memory_listener() noexcept(false) {
        QOMEM_ASSERT(!as_, "memory listener at {} destroyed while still registered to an "
                           "address space",
                     static_cast<const void*>(this));
    }

private:
    friend class address_space;
    friend class memory_system;
    friend struct detail::view_slot;
    using hook_type =
        boost::intrusive::list_member_hook<boost::intrusive::link_mode<boost::intrusive::normal_link>>;
    hook_type hook_;
    /// The listeners of one address space, in priority order.
    using list_type = boost::intrusive::list<
        memory_listener, boost::intrusive::member_hook<memory_listener, hook_type, &memory_listener::hook_>>;
    unsigned priority_;
    address_space* as_ = nullptr;
};

} // namespace qomem
