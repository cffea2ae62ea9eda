// qomem/detail/topology_log.hpp — what a memory region asks of the memory
// system it belongs to: record a change, open and close a transaction, take
// the writer role, finalize a region on the writer.
//
// memory_region.hpp only needs this interface; the commit engine that
// implements it (memory_system.hpp) renders flat views, which need the whole
// region class. An interface breaks that cycle without a function pointer
// installed at run time: a region is bound to a system only by code that has
// the engine's header (an address space, a transaction on a system, or a
// container already bound), so the engine's definitions are always there.
#pragma once

#include <atomic>
#include <cstdint>

#include <qomem/coalesced_mmio.hpp>
#include <qomem/fwd.hpp>
#include <qomem/types.hpp>

namespace qomem::detail {

class topology_log {
public:
    /// The system implementing this log.
    virtual memory_system& system() noexcept = 0;

    /// Takes the writer role (recursive); blocks while another thread holds it.
    virtual void lock() = 0;
    /// Gives it back once per lock(); the last release finalizes what other
    /// threads handed over meanwhile.
    virtual void unlock() = 0;
    /// True when this thread holds the writer role.
    virtual bool held_here() const noexcept = 0;

    /// Opens / closes a transaction (the writer role is held throughout);
    /// the outermost close commits.
    virtual void begin() = 0;
    virtual void end() = 0;

    /// Records that [lo, hi) of `in`'s own coordinates changed; commits at
    /// once outside a transaction. Writer only.
    virtual void changed(const memory_region& in, i128 lo, i128 hi) = 0;
    /// Records that every view must be rendered anew (a root moved).
    virtual void changed_everything() = 0;
    /// An ownerless region was removed from its container: inside a
    /// transaction the published views show it until the commit. Writer only.
    virtual void shown_until_commit(memory_region& mr) = 0;
    /// An ownerless region's last reference was dropped (its misuse checks
    /// passed, on the dropping thread). True if published views may still
    /// show it: the system then retires it once the commit replaced them.
    /// Any thread.
    virtual bool retire_after_commit(memory_region& mr) = 0;
    /// Forgets the pending windows recorded in `mr`, which is being freed.
    virtual void forget(const memory_region& mr) noexcept = 0;

    /// `mr`'s last reference was dropped on this thread: finalize it here if
    /// this thread may (it holds the writer role, or can take it now), else
    /// hand it to the writer, which finalizes it when it gives the role back.
    virtual void finalize_on_writer(memory_region& mr) = 0;

    /// A region joins (leaves) the system: the system lives as long as one
    /// of its regions does.
    virtual void region_bound(memory_region& mr) noexcept = 0;
    virtual void region_unbound(memory_region& mr) noexcept = 0;

    /// The listeners' dirty-log hooks for `mr` (memory_system.hpp): log_sync
    /// (or log_sync_global) before its bitmap is read, log_clear for
    /// [start, start + len) of it, log_global_after_sync after a read.
    /// Each takes the writer role for its duration.
    virtual void sync_dirty_log(const memory_region& mr) = 0;
    virtual void clear_dirty_log(const memory_region& mr, hwaddr start, hwaddr len) = 0;
    virtual void after_dirty_log_sync() = 0;

    /// The dirty-log clients every migratable RAM region of the system logs
    /// for besides its own (the migration client while the system tracks
    /// dirty memory globally). Written under the writer role; read by
    /// writers of RAM on any thread.
    std::atomic<std::uint8_t> global_log_mask{0};

    /// A region's ioeventfds or coalesced ranges changed: the views'
    /// images of them are updated at the commit (now outside a
    /// transaction). Writer only.
    virtual void io_changed() = 0;
    /// Drains the ring of pending coalesced writes (coalesced_mmio.hpp).
    virtual void flush_coalesced() = 0;
    /// That ring: appended to by guest writes on any thread (mutable: a
    /// synchronized object, reached through a const region).
    mutable coalesced_ring coalesced_mmio;

protected:
    ~topology_log() = default;
};

} // namespace qomem::detail
