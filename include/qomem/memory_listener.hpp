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
// Callbacks run on the thread that commits, with the topology lock held (the
// writer's side); they may change the topology, which is then committed again
// after the current commit.
#pragma once

#include <cstdint>

#include <boost/intrusive/list.hpp>

#include <qomem/detail/int128.hpp>

namespace qomem {

class memory_region;
class address_space;

/// One range of a flat view, as listeners and find() see it.
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
    /// Destroying a listener that is still registered is a bug: the hook is a
    /// safe_link hook, which asserts.
    ~memory_listener() = default;

private:
    friend class address_space;
    boost::intrusive::list_member_hook<boost::intrusive::link_mode<boost::intrusive::safe_link>> hook_;
    unsigned priority_;
    address_space* as_ = nullptr;
};

} // namespace qomem
