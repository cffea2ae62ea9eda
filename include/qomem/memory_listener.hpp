// qomem/memory_listener.hpp — following an address space's flat view: QEMU's
// MemoryListener, callback for callback.
//
// An accelerator, a vhost back-end or a display keeps its own copy of the
// memory map, and of its dirty logging, by listening to an address space:
//
//     struct slots : qomem::memory_listener {
//         slots() : memory_listener({.priority = 10, .name = "kvm-slots"}) {}
//         void region_add(const qomem::memory_section& s) override { map(s); }
//         void region_del(const qomem::memory_section& s) override { unmap(s); }
//         void log_start(const qomem::memory_section& s, std::uint8_t, std::uint8_t) override {
//             track(s);
//         }
//         void log_sync(const qomem::memory_section& s) override { pull_dirty_bits(s); }
//     } l;
//     as.add_listener(l);      // replays the current view (see below)
//     ...                      // topology changes arrive as del/add/nop
//     as.remove_listener(l);   // every range reported as region_del
//
// Commits. On each commit that changes the address space's flat view, a
// listener gets begin(), then every region_del (ranges gone or changed),
// then in address order region_add (new or changed ranges) and region_nop
// (ranges in the same place), each nop followed by log_start and/or
// log_stop when the range's dirty-log mask changed, then commit(). Section
// by section every listener is told before the next section: region_del and
// log_stop in descending listener priority, everything else in ascending
// priority; equal priorities keep registration order. begin() and commit()
// of one commit reach every listener that hears it (in all the system's
// address spaces) before / after any address space is updated, as in QEMU.
//
// Which ranges are reported: by default (`nop_mode::changes_only`) a
// listener hears a commit only when its view changed, and then about the
// ranges around the change (the ranges that were rendered again: those
// changed, as del/add, and unchanged neighbours in the same stretch, as
// nop). A listener ported from QEMU that expects region_nop for every range
// on every commit opts in with `nop_mode::every_range`: it then hears every
// commit of its memory system (even one leaving its view alone) with every
// range of its view reported, as QEMU does.
//
// Registration (as QEMU's memory_listener_register): begin(), then
// log_global_start() if the memory system tracks dirty memory globally,
// then for each range in address order region_add and, for a range that
// logs, log_start(section, 0, mask); then commit(). Unregistration: begin(),
// then for each range log_stop(section, mask, 0) if it logs and region_del;
// then commit().
//
// Dirty logging (dirty_log.hpp): log_sync before a region's bitmap is read
// (memory_region::snapshot_and_clear_dirty, memory_system::global_dirty_log_sync),
// for each section that logs — or log_sync_global once, for a listener that
// syncs everything at once (`sync_mode::global`); log_clear when a range of
// a region is cleared (memory_region::clear_dirty_bitmap);
// log_global_start / log_global_stop when the system starts and stops
// tracking globally (throwing from log_global_start refuses the start);
// log_global_after_sync after a bitmap was read.
//
// I/O hooks (ioeventfd.hpp, coalesced_mmio.hpp). The address space keeps
// what it shows of its regions' ioeventfds and coalesced ranges, in guest
// addresses, and a commit that changes them (a hook added or removed, or a
// region with hooks mapped, moved, enabled, disabled, covered or unmapped)
// tells the difference, inside the same begin() / commit() (also when
// only a hook changed: QEMU then calls neither): first coalesced_io_del
// for each coalesced part of a range gone or changed (descending
// priority), then the region_del / region_add / region_nop above, then
// coalesced_io_add for each new coalesced part (ascending priority), then
// eventfd_del and eventfd_add in QEMU's ioeventfd order (ascending
// priority). An eventfd's section is its own bytes: its guest address,
// its size (0: any size), its region and offset. Registration replays
// coalesced_io_add after each range's region_add and eventfd_add for each
// ioeventfd shown, before commit(); unregistration tells eventfd_del first,
// and coalesced_io_del before each range's region_del.
//
// Threads and lifetime. Callbacks run on the thread that holds the memory
// system's writer role (memory_system::lock): the committing thread, or the
// one registering, syncing or starting the log. They may change the
// topology, which is then committed again after the current commit; they
// must not register or unregister listeners. A section handed to a callback
// always belongs to a view that is still alive (the old view is released
// only after the callbacks).
#pragma once

#include <cstdint>
#include <string>
#include <utility>

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
    /// Rendered through an unmergeable region (never merged with neighbours).
    bool unmergeable = false;
};

class memory_listener {
public:
    /// QEMU's MEMORY_LISTENER_PRIORITY_* values.
    static constexpr unsigned priority_min = 0;
    static constexpr unsigned priority_accel = 10;
    static constexpr unsigned priority_dev_backend = 10;

    /// Which ranges a commit reports (see the header overview).
    enum class nop_mode : std::uint8_t {
        changes_only, ///< qomem's default: only commits that change the view, around the change
        every_range,  ///< QEMU's: every commit, region_nop for every unchanged range
    };
    /// Which of log_sync / log_sync_global the listener implements (QEMU
    /// allows one of them).
    enum class sync_mode : std::uint8_t {
        per_section, ///< log_sync for each section that logs
        global,      ///< log_sync_global once per sync
    };

    /// How a listener is made.
    struct options {
        /// Lower priorities hear "add" and "start" callbacks first, and
        /// "del" and "stop" callbacks last.
        unsigned priority = 0;
        /// For diagnostics (QEMU's name).
        std::string name = {};
        nop_mode nops = nop_mode::changes_only;
        sync_mode sync = sync_mode::per_section;
    };

    explicit memory_listener(unsigned priority = 0) noexcept : priority_(priority) {}
    explicit memory_listener(options o) noexcept
        : priority_(o.priority), name_(std::move(o.name)), nops_(o.nops), sync_(o.sync) {}
    memory_listener(const memory_listener&) = delete;
    memory_listener& operator=(const memory_listener&) = delete;

    unsigned priority() const noexcept { return priority_; }
    const std::string& name() const noexcept { return name_; }
    nop_mode nops() const noexcept { return nops_; }
    sync_mode sync() const noexcept { return sync_; }
    /// The address space this listener is registered to, or null.
    address_space* registered_to() const noexcept { return as_; }

    // ---- topology ----------------------------------------------------------

    /// An update of the address space starts (see the header overview).
    virtual void begin() {}
    /// It ends.
    virtual void commit() {}
    /// A range new in the view since the last commit.
    virtual void region_add(const memory_section&) {}
    /// A range that is gone (or changed) since the last commit.
    virtual void region_del(const memory_section&) {}
    /// A range in the same place as at the last commit.
    virtual void region_nop(const memory_section&) {}

    // ---- dirty logging ---------------------------------------------------------

    /// After region_nop of a section whose region now logs for clients it
    /// did not log for before (and after region_add at registration, from
    /// 0): the old and the new mask (bit dirty_client: dirty_log.hpp). A
    /// range added by a commit gets region_add alone, as in QEMU: its
    /// region's mask is memory_region::dirty_log_mask().
    virtual void log_start(const memory_section&, std::uint8_t /*old_mask*/,
                           std::uint8_t /*new_mask*/) {}
    /// After region_nop (or at unregistration) of a section whose region
    /// stopped logging for some clients: the old and the new mask.
    virtual void log_stop(const memory_section&, std::uint8_t /*old_mask*/,
                          std::uint8_t /*new_mask*/) {}
    /// Before the dirty bitmap of the section's region is read: bring what
    /// the listener logged itself (a vhost back-end's log, KVM's) into it,
    /// with memory_region::set_dirty. sync_mode::per_section only.
    virtual void log_sync(const memory_section&) {}
    /// The same for everything at once (sync_mode::global only);
    /// `last_stage`: the final sync of a migration, with the vCPUs stopped.
    virtual void log_sync_global(bool /*last_stage*/) {}
    /// Before the section's part of its region's bitmap is cleared: clear
    /// the listener's own log there.
    virtual void log_clear(const memory_section&) {}
    /// The memory system starts tracking dirty memory globally (the
    /// migration client on every RAM region); also at registration while it
    /// does. Throwing refuses the start: the listeners already started are
    /// told log_global_stop, and the exception reaches the caller of
    /// global_dirty_log_start.
    virtual void log_global_start() {}
    /// Global tracking stops.
    virtual void log_global_stop() {}
    /// A dirty bitmap was read after a sync.
    virtual void log_global_after_sync() {}

    // ---- ioeventfd and coalesced MMIO (see the header overview) -------------

    /// An ioeventfd (`fd`, an eventfd) now shows at the section (its guest
    /// address and size): a write there (of `data`, when `match_data`)
    /// signals it.
    virtual void eventfd_add(const memory_section&, bool /*match_data*/, std::uint64_t /*data*/,
                             int /*fd*/) {}
    /// An ioeventfd no longer shows there (deleted, or its region moved,
    /// disabled or unmapped).
    virtual void eventfd_del(const memory_section&, bool /*match_data*/, std::uint64_t /*data*/,
                             int /*fd*/) {}
    /// Writes to [addr, addr + len) of the address space, inside the
    /// section, may be coalesced.
    virtual void coalesced_io_add(const memory_section&, hwaddr /*addr*/, hwaddr /*len*/) {}
    /// They may no longer be.
    virtual void coalesced_io_del(const memory_section&, hwaddr /*addr*/, hwaddr /*len*/) {}

protected:
    /// Requires (asserted, never compiled out): not registered to an address
    /// space, which would otherwise call into a destroyed object.
    ~memory_listener() noexcept(false) {
        QOMEM_ASSERT(!as_,
                     "memory listener '{}' at {} destroyed while still registered to an "
                     "address space",
                     name_, static_cast<const void*>(this));
    }

private:
    friend class address_space;
    friend class memory_system;
    friend struct detail::view_slot;
    using hook_type = boost::intrusive::list_member_hook<
        boost::intrusive::link_mode<boost::intrusive::normal_link>>;
    hook_type hook_;        // the address space's listeners
    hook_type system_hook_; // every listener of the memory system
    /// The listeners of one address space, in priority order.
    using list_type = boost::intrusive::list<
        memory_listener,
        boost::intrusive::member_hook<memory_listener, hook_type, &memory_listener::hook_>>;
    /// Every listener of one memory system, in priority order.
    using system_list_type = boost::intrusive::list<
        memory_listener,
        boost::intrusive::member_hook<memory_listener, hook_type, &memory_listener::system_hook_>>;
    unsigned priority_;
    std::string name_;
    nop_mode nops_ = nop_mode::changes_only;
    sync_mode sync_ = sync_mode::per_section;
    address_space* as_ = nullptr;
    detail::view_slot* slot_ = nullptr;
    bool told_ = false; // hears the commit being told (writer only)
};

} // namespace qomem
