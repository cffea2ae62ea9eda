// qomem/coalesced_mmio.hpp — coalesced MMIO: guest writes to parts of a
// region that the device lets wait, held in a ring and made later, in
// order (QEMU's memory_region_add_coalescing with KVM's coalesced MMIO
// ring, which qomem models itself: there is no KVM).
//
//     fb->set_coalescing();              // the whole region; implies flush_coalesced
//     as.write(fb_base, bytes, 4);       // queued in the system's ring, ops not called
//     sys->flush_coalesced();            // the ops get every queued write, in order
//     as.read(fb_base + 0x10, buf, 4);   // a read of fb drains the ring first
//
// The ring. Each memory system has one ring of `coalesced_ring::capacity`
// pending writes (KVM's is one page). A guest write that reaches the ops of
// a region (MMIO that passed its access rules and matched no ioeventfd)
// inside one of the region's coalesced ranges is appended to it instead of
// calling the ops, and succeeds. The ring is drained — each write made, in
// the order they were queued, through the region's ops — by
// memory_system::flush_coalesced(), by any access to a region flagged
// flush_coalesced that is not itself coalesced (QEMU's
// prepare_mmio_access: a read, or a write outside the coalesced ranges),
// by clear_coalescing / clear_flush_coalesced, and by a write that finds
// the ring full (it drains it, then queues itself: never grown without
// bound). A region freed while writes to it are queued loses them. A
// region that belongs to no memory system has no ring: its writes are made
// at once.
//
// Threads. Accesses to regions without coalesced ranges and without
// flush_coalesced never touch the ring (one atomic load of the region's
// I/O hooks, null for them). The coalesced path and the drain take the
// ring's mutex only to append or pop one entry; the drain also holds a
// (recursive) drain lock while it makes the writes, so that two drains
// never reorder entries and an access that must see the ring drained waits
// for a drain in progress on another thread. A region's ops called by a
// drain must therefore not wait for another thread that writes coalesced
// MMIO or drains the ring.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>

#include <qomem/fwd.hpp>
#include <qomem/memory_ops.hpp>
#include <qomem/types.hpp>

namespace qomem {

/// A range of a region whose writes may be coalesced.
struct coalesced_range {
    hwaddr offset = 0; ///< in the region
    u128 size = 0;
    friend bool operator==(const coalesced_range&, const coalesced_range&) = default;
};

namespace detail {

/// One memory system's ring of pending coalesced writes (see the header).
class coalesced_ring {
public:
    static constexpr std::size_t capacity = 128;

    /// A write as the ops would have been given it (the bus bytes loaded in
    /// host order, with the target order that was in force).
    struct entry {
        const memory_region* mr = nullptr;
        hwaddr offset = 0;
        std::uint64_t value = 0;
        unsigned size = 0;
        mem_attrs attrs{};
        bool target_big = false;
    };

    coalesced_ring() = default;
    coalesced_ring(const coalesced_ring&) = delete;
    coalesced_ring& operator=(const coalesced_ring&) = delete;

    /// Writes queued or being made by a drain right now. Any thread.
    std::size_t outstanding() const noexcept {
        return outstanding_.load(std::memory_order_acquire);
    }

    /// Appends `e`; false when the ring is full (the caller drains it).
    bool try_push(const entry& e) {
        std::lock_guard g(mutex_);
        if (!slots_) slots_ = std::make_unique<entry[]>(capacity);
        if (count_ == capacity) return false;
        slots_[(head_ + count_) % capacity] = e;
        ++count_;
        outstanding_.fetch_add(1, std::memory_order_release);
        return true;
    }

    /// The lock a drain holds while it makes the writes it pops.
    std::recursive_mutex& drain_lock() noexcept { return drain_; }

    /// Takes the oldest entry. Requires: drain_lock() held. After making the
    /// write, call done().
    bool pop(entry& out) {
        std::lock_guard g(mutex_);
        if (count_ == 0) return false;
        out = slots_[head_];
        head_ = (head_ + 1) % capacity;
        --count_;
        return true;
    }
    /// A popped write was made.
    void done() noexcept { outstanding_.fetch_sub(1, std::memory_order_acq_rel); }

    /// Drops the queued writes to `mr` (being freed), after any drain in
    /// progress has finished with it.
    void purge(const memory_region& mr) {
        if (outstanding() == 0) return;
        std::lock_guard d(drain_);
        std::lock_guard g(mutex_);
        std::size_t kept = 0;
        for (std::size_t i = 0; i < count_; ++i) {
            const entry e = slots_[(head_ + i) % capacity];
            if (e.mr == &mr) {
                outstanding_.fetch_sub(1, std::memory_order_acq_rel);
                continue;
            }
            slots_[(head_ + kept++) % capacity] = e;
        }
        count_ = kept;
    }

private:
    std::mutex mutex_;               // guards slots_, head_, count_
    std::unique_ptr<entry[]> slots_; // allocated on first use
    std::size_t head_ = 0, count_ = 0;
    std::atomic<std::size_t> outstanding_{0};
    std::recursive_mutex drain_;
};

} // namespace detail
} // namespace qomem
