// qomem/shmem.hpp — VIRTIO Shared Memory Regions: reserved host ranges into
// which a back-end maps file descriptors while the guest runs.
//
// A VIRTIO device (virtiofs' DAX window, virtio-gpu blobs, virtio-media)
// declares shared memory regions, each identified by a `shmid`. Each one is a
// reserved host range (an anonymous PROT_NONE, MAP_NORESERVE mapping: nothing
// unrelated can ever be mapped inside it), exposed as a memory region that a
// transport places anywhere — a PCI BAR, a virtio-mmio window:
//
//     auto dev = qomem::make<qomem::virtio_shmem_device>();
//     qomem::virtio_shmem& shm = dev->declare_shmem(0, 1 << 30);   // a 1 GiB window
//     auto bar = qomem::make_container(*dev, "bar2", 1 << 30);     // the transport's BAR
//     bar->add_subregion(0, shm.region());
//     dev->shmem_map(0, fd, 0, 0x200000, 0x10000, qomem::shmem_flags::read_write);
//     dev->shmem_unmap(0, 0x200000, 0x10000);
//
// Each mapping is an object of its own (a child of the shared memory region's
// memory region in the QOM tree) owning the RAM region the guest sees, and
// has two host views of the file:
//  * its slot in the reservation (`virtio_shmem::host_base() + offset`): the
//    window a hypervisor maps into the guest as one piece (one KVM memory
//    slot, as QEMU does). It follows the back-end's requests at once: an
//    unmap puts PROT_NONE back over the slot, in one mmap, never a hole.
//  * a view of its own (`shmem_mapping::host()`), which the mapping's RAM
//    region points to: what the library's accesses and guest DMA use. Guest
//    DMA that mapped part of it holds a reference to that region, so after an
//    unmap the guest stops seeing the mapping at once and the range is free
//    for a new mapping at once, while the DMA keeps reading and writing the
//    old pages until it unmaps; the view goes with the last reference.
// (Upstream's UNMAP frees the range when acknowledged; a front-end keeping
// only the slot would have to refuse a new MAP there while DMA holds the old
// pages, or pull the pages from under the DMA.)
//
// Parts of a shared memory region where nothing is mapped are a reservation:
// guest accesses there fail with memtx_decode_error and never touch the
// PROT_NONE pages.
//
// A back-end can shrink the file it mapped. Pages past the new end raise
// SIGBUS when touched: the library's own accesses to a mapping (address-space
// reads and writes, MEM_READ / MEM_WRITE, bounce buffers) copy under a SIGBUS
// guard (detail/fault_guard.hpp) and fail with memtx_error instead. A raw
// pointer from a direct dma_mapping is not guarded: touching such a page
// through it raises SIGBUS.
//
// Mappings cost the process kernel mappings (vm.max_map_count, 65,530 by
// default), which every other mmap and malloc of the program needs too: the
// mappings of every shared memory region of the process count against one
// limit, shmem_mapping_limit(), by default a sixth of vm.max_map_count (a
// mapping takes up to three kernel mappings: its own view and the split of
// the reservation around its slot), so shared memory never holds more than
// half of them. Each region may also set a lower limit of its own.
//
// Requests come from a back-end, so they are bad input, not misuse: each
// refusal is a shmem_error naming the values, and changes nothing.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/core.h>

#include <qomem/detail/fault_guard.hpp>
#include <qomem/device.hpp>
#include <qomem/error.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/memory_system.hpp>
#include <qomem/shmem_flags.hpp>

namespace qomem {

/// Why a shared-memory request was refused.
enum class shmem_reason {
    unknown_shmid,
    zero_length,
    unaligned,
    overflow,
    out_of_bounds,
    overlap,
    bad_fd,
    bad_flags,
    too_many_mappings,
    mmap_failed,
    not_mapped,
    duplicate_shmid,
    bad_size,
};

template <>
struct reason_names<shmem_reason> {
    static constexpr std::string_view names[] = {
        "unknown_shmid", "zero_length",     "unaligned", "overflow",          "out_of_bounds",
        "overlap",       "bad_fd",          "bad_flags", "too_many_mappings", "mmap_failed",
        "not_mapped",    "duplicate_shmid", "bad_size"};
};

/// A refused shared-memory request; `why()` says which rule it broke.
class shmem_error : public reasoned_error<shmem_reason> {
public:
    using reasoned_error::reasoned_error;
};

/// Mappings of every shared memory region of the process, active or kept
/// alive by DMA.
std::size_t shmem_mappings_in_process() noexcept;
/// The most mappings the process allows at once (see the header comment).
std::size_t shmem_mapping_limit() noexcept;
/// Sets the process-wide limit. Effects: later maps are refused once the
/// count reaches `n`; existing mappings stay. Complexity: O(1). Throws: nothing.
void set_shmem_mapping_limit(std::size_t n) noexcept;

class virtio_shmem;

/// One file mapping inside a shared memory region. Alive while the back-end
/// has it mapped or anything (guest DMA) still references its memory region.
class shmem_mapping : public object {
    QOMEM_OBJECT(shmem_mapping, "virtio-shmem-mapping", object)
public:
    /// Made by virtio_shmem::map only. Takes over `view` (munmapped when the
    /// mapping goes) and one unit of the process-wide mapping count.
    shmem_mapping(virtio_shmem& shm, std::uint64_t offset, std::uint64_t len, bool writable,
                  std::byte* view);

    std::uint64_t offset() const noexcept { return offset_; }
    std::uint64_t length() const noexcept { return len_; }
    bool writable() const noexcept { return writable_; }
    /// False once the back-end unmapped it (it may linger for DMA).
    bool active() const noexcept { return state_ == state::active; }
    memory_region& region() const noexcept { return *region_; }
    /// The mapping's own view of the file: what its region, and so guest
    /// accesses and DMA, use. Valid as long as the mapping lives.
    std::byte* host() const noexcept { return view_; }

protected:
    inline ~shmem_mapping() override;
    inline void on_unparent() override;
    inline after_free_action after_free() noexcept override;

private:
    friend class virtio_shmem;
    enum class state : std::uint8_t { pending, active, lingering };
    virtio_shmem* shm_;
    std::uint64_t offset_;
    std::uint64_t len_;
    bool writable_;
    state state_ = state::pending;
    std::byte* view_;
    memory_region* region_ = nullptr;
};

/// One shared memory region of a device (one shmid).
class virtio_shmem : public object {
    QOMEM_OBJECT(virtio_shmem, "virtio-shmem", object)
public:
    /// Reserves `size` bytes of host address space, PROT_NONE.
    /// Throws: shmem_error (bad_size) for a size that is zero, not a multiple
    /// of the page size, or that cannot be reserved.
    virtio_shmem(std::uint8_t shmid, std::uint64_t size, std::string name);

    std::uint8_t shmid() const noexcept { return shmid_; }
    std::uint64_t size() const noexcept { return size_; }
    /// The memory region a transport places in the guest's address space.
    memory_region& region() const noexcept { return *region_; }
    /// The start of the host reservation: the window a hypervisor maps into
    /// the guest, where each active mapping has its slot.
    std::byte* host_base() const noexcept { return base_; }

    /// This region's own limit on its mappings (live or lingering for DMA),
    /// under the process-wide shmem_mapping_limit().
    std::size_t max_mappings() const noexcept { return max_mappings_; }
    /// Effects: later maps of this region are refused once it has `n`
    /// mappings; existing ones stay. Complexity: O(1). Throws: nothing.
    void set_max_mappings(std::size_t n) noexcept { max_mappings_ = n; }
    /// Mappings the back-end has mapped and not unmapped.
    std::size_t active_mappings() const noexcept { return active_.size(); }
    /// Mappings still holding host pages (active, or unmapped but referenced).
    std::size_t live_mappings() const noexcept { return active_.size() + lingering_; }

    /// Maps `len` bytes of `fd` from `fd_offset` at `shm_offset` of the region,
    /// visible to the guest at once (two MAP_SHARED views: the reservation's
    /// slot, with MAP_FIXED, and the mapping's own).
    /// Requires: nothing (every argument comes from the back-end).
    /// Effects: a new shmem_mapping child of region(), owning a RAM region
    /// (read-only unless `flags` is read_write) added at `shm_offset`; one
    /// more mapping counted process-wide. `fd` is not taken: the caller may
    /// close it afterwards.
    /// Complexity: O(log mappings) plus the commit of the new subregion.
    /// Throws: shmem_error for a zero length, an offset or length not a
    /// multiple of the page size, an overflowing `shm_offset + len` or
    /// `fd_offset + len`, a range past the end, a range overlapping an active
    /// mapping, a bad fd, a range past the end of a regular file (its pages
    /// would fault), flags other than read_only / read_write, too many
    /// mappings (this region's limit or the process's), or a failing mmap.
    /// Nothing changes.
    shmem_mapping& map(int fd, std::uint64_t fd_offset, std::uint64_t shm_offset, std::uint64_t len,
                       shmem_flags flags);

    /// Unmaps the active mapping that is exactly [shm_offset, shm_offset + len).
    /// Effects: the guest stops seeing it and its slot is PROT_NONE again at
    /// once (the range is free for a new map); the mapping is unparented and
    /// finalized when the last reference to its region goes (at once without
    /// DMA), which unmaps its own view.
    /// Complexity: O(log mappings) plus the commit. Throws: shmem_error
    /// (not_mapped) if no active mapping is exactly that range; nothing changes.
    void unmap(std::uint64_t shm_offset, std::uint64_t len);

    /// Unmaps every active mapping (device unplug), in one transaction.
    /// Effects, Complexity: as unmap, for each. Throws: nothing of its own.
    void unmap_all();

protected:
    inline ~virtio_shmem() override;
    inline void on_unparent() override;
    inline after_free_action after_free() noexcept override;

public:
    bool follows_owner_out_of_tree() const noexcept override { return true; }

private:
    friend class shmem_mapping;
    [[noreturn]] void refuse(shmem_reason r, const std::string& what) const {
        throw shmem_error(r,
                          fmt::format("shared memory region {} ('{}'): {}", shmid_, name_, what));
    }

    std::uint8_t shmid_;
    std::uint64_t size_;
    std::string name_;
    std::byte* base_ = nullptr;
    memory_region* region_ = nullptr;
    std::size_t max_mappings_ = 4096;
    std::map<std::uint64_t, shmem_mapping*> active_; // by offset
    std::size_t lingering_ = 0;                      // unmapped, held by DMA
    object* held_owner_ = nullptr;                   // the device, held once unparented from it
};

/// A VIRTIO device with shared memory regions (transport-independent).
class virtio_shmem_device : public device {
    QOMEM_OBJECT(virtio_shmem_device, "virtio-shmem-device", device)
public:
    virtio_shmem_device() noexcept = default;

    /// The VIRTIO device ID (VIRTIO 1.2, 5: 26 for a file system, 16 for a
    /// GPU, ...) that transports report to the driver (virtio-mmio's
    /// DeviceID, virtio-pci's PCI device ID 0x1040 + id). 0, "reserved", by
    /// default: device models override it.
    virtual std::uint16_t virtio_id() const noexcept { return 0; }

    /// Declares shared memory region `shmid` of `size` bytes.
    /// Effects: a child object "shm[shmid]" of the device, whose memory
    /// region it owns. Complexity: O(children). Throws: shmem_error
    /// (duplicate_shmid, bad_size); nothing changes.
    virtio_shmem& declare_shmem(std::uint8_t shmid, std::uint64_t size);

    /// The region with this shmid, or null.
    virtio_shmem* shmem(std::uint8_t shmid) const noexcept;

    /// Back-end requests, routed by shmid: virtio_shmem::map and unmap.
    /// Throws: shmem_error (unknown_shmid or the region's own refusals);
    /// nothing changes on a refusal.
    shmem_mapping& shmem_map(std::uint8_t shmid, int fd, std::uint64_t fd_offset,
                             std::uint64_t shm_offset, std::uint64_t len, shmem_flags flags);
    void shmem_unmap(std::uint8_t shmid, std::uint64_t shm_offset, std::uint64_t len);

    /// Calls f(virtio_shmem&) for each declared region, in shmid order.
    template <class F>
    void for_each_shmem(F&& f) const {
        for (unsigned id = 0; id < 256; ++id)
            if (virtio_shmem* s = shmem(static_cast<std::uint8_t>(id))) f(*s);
    }

private:
    virtio_shmem& checked(std::uint8_t shmid) const;
};

// ---- implementation ---------------------------------------------------------

namespace detail {
/// Puts PROT_NONE back over [p, p+len) in one mmap: never a hole.
inline bool reserve_again(std::byte* p, std::uint64_t len) noexcept {
    return ::mmap(p, static_cast<std::size_t>(len), PROT_NONE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0) != MAP_FAILED;
}

/// The process-wide count of shared-memory mappings and its limit.
struct shmem_budget {
    std::atomic<std::size_t> live{0};
    std::atomic<std::size_t> limit;

    shmem_budget() : limit(default_limit()) {}
    static shmem_budget& get() noexcept {
        static shmem_budget b;
        return b;
    }
    /// A sixth of vm.max_map_count (65,530 when it cannot be read).
    static std::size_t default_limit() noexcept {
        std::size_t max_map_count = 65530;
        if (const int fd = ::open("/proc/sys/vm/max_map_count", O_RDONLY | O_CLOEXEC); fd >= 0) {
            char text[32] = {};
            if (::read(fd, text, sizeof text - 1) > 0) {
                const std::size_t v = std::strtoull(text, nullptr, 10);
                if (v > 0) max_map_count = v;
            }
            ::close(fd);
        }
        return max_map_count / 6;
    }
    /// Takes one unit unless the limit is reached.
    bool take() noexcept {
        std::size_t n = live.load(std::memory_order_relaxed);
        do {
            if (n >= limit.load(std::memory_order_relaxed)) return false;
        } while (!live.compare_exchange_weak(n, n + 1, std::memory_order_relaxed));
        return true;
    }
    void give_back() noexcept { live.fetch_sub(1, std::memory_order_relaxed); }
};
} // namespace detail

inline std::size_t shmem_mappings_in_process() noexcept {
    return detail::shmem_budget::get().live.load(std::memory_order_relaxed);
}
inline std::size_t shmem_mapping_limit() noexcept {
    return detail::shmem_budget::get().limit.load(std::memory_order_relaxed);
}
inline void set_shmem_mapping_limit(std::size_t n) noexcept {
    detail::shmem_budget::get().limit.store(n, std::memory_order_relaxed);
}

inline shmem_mapping::shmem_mapping(virtio_shmem& shm, std::uint64_t offset, std::uint64_t len,
                                    bool writable, std::byte* view)
    : shm_(&shm), offset_(offset), len_(len), writable_(writable), view_(view) {
    shm.ref(); // the reservation must outlive every mapping in it
}

inline shmem_mapping::~shmem_mapping() {
    if (state_ == state::lingering) --shm_->lingering_;
    ::munmap(view_, static_cast<std::size_t>(len_));
    detail::shmem_budget::get().give_back();
}

inline void shmem_mapping::on_unparent() {
    // The back-end unmapped it (or the device is going, or map() failed
    // half-way): hide it from the guest now and free its slot; its own view
    // stays until the last reference to its region goes.
    if (state_ != state::lingering) {
        memory_region& r = *region_;
        if (r.container()) r.container()->del_subregion(r);
        if (state_ == state::active) shm_->active_.erase(offset_);
        if (!detail::reserve_again(shm_->base_ + offset_, len_))
            std::fprintf(stderr,
                         "qomem: restoring PROT_NONE over a shared memory slot failed: %s\n",
                         std::strerror(errno));
        state_ = state::lingering;
        ++shm_->lingering_;
        if (r.parent()) unparent(r); // the region now holds this mapping
    }
    object::on_unparent();
}

inline object::after_free_action shmem_mapping::after_free() noexcept {
    return unref_after_free(shm_);
}

inline virtio_shmem::virtio_shmem(std::uint8_t shmid, std::uint64_t size, std::string name)
    : shmid_(shmid), size_(size), name_(std::move(name)) {
    const std::uint64_t page = detail::host_page_size();
    if (size == 0 || size % page != 0)
        refuse(shmem_reason::bad_size,
               fmt::format("size 0x{:x} is not a non-zero multiple of the page size 0x{:x}", size,
                           page));
    // In place before any mapping exists, so a handler the program installs
    // later finds it and can chain to it.
    detail::install_fault_guard();
    void* p = ::mmap(nullptr, static_cast<std::size_t>(size), PROT_NONE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        refuse(shmem_reason::bad_size,
               fmt::format("cannot reserve 0x{:x} bytes: {}", size, std::strerror(errno)));
    base_ = static_cast<std::byte*>(p);
    memory_region::init_args a{region_owner(*this), name_, region_kind::reservation, size};
    try {
        region_ = make_region(a).get(); // this object holds it as a child
    } catch (...) {
        ::munmap(base_, static_cast<std::size_t>(size_));
        throw;
    }
}

inline virtio_shmem::~virtio_shmem() {
    // Every mapping holds a reference to this object, so none is left.
    ::munmap(base_, static_cast<std::size_t>(size_));
}

inline void virtio_shmem::on_unparent() {
    ref();
    // Like a memory region: once out of the tree it holds its device, so the
    // device is finalized after it (and after any mapping DMA still holds).
    if (object* owner = parent(); owner && owner->ref_count() > 0) {
        owner->ref();
        held_owner_ = owner;
    }
    unmap_all();
    if (region_->container()) region_->container()->del_subregion(*region_);
    if (region_->parent()) unparent(*region_);
    object::on_unparent();
    unref();
}

inline object::after_free_action virtio_shmem::after_free() noexcept {
    if (!held_owner_) return {};
    return unref_after_free(held_owner_);
}

inline shmem_mapping& virtio_shmem::map(int fd, std::uint64_t fd_offset, std::uint64_t shm_offset,
                                        std::uint64_t len, shmem_flags flags) {
    using reason = shmem_reason;
    const std::uint64_t page = detail::host_page_size();
    const auto bits = static_cast<std::uint64_t>(flags);
    constexpr auto known = static_cast<std::uint64_t>(shmem_flags::read_write);
    if (bits & ~known)
        refuse(reason::bad_flags,
               fmt::format("flags 0x{:x} have unknown bits 0x{:x} (0 is read-only, 1 read-write)",
                           bits, bits & ~known));
    if (len == 0)
        refuse(reason::zero_length, fmt::format("map of length 0 at offset 0x{:x}", shm_offset));
    if (shm_offset % page || len % page || fd_offset % page)
        refuse(
            reason::unaligned,
            fmt::format("shm offset 0x{:x}, fd offset 0x{:x} and length 0x{:x} must be multiples "
                        "of the page size 0x{:x}",
                        shm_offset, fd_offset, len, page));
    if (shm_offset + len < shm_offset)
        refuse(reason::overflow,
               fmt::format("shm offset 0x{:x} + length 0x{:x} overflows", shm_offset, len));
    if (fd_offset + len < fd_offset ||
        fd_offset + len > static_cast<std::uint64_t>(std::numeric_limits<off_t>::max()))
        refuse(reason::overflow,
               fmt::format("fd offset 0x{:x} + length 0x{:x} overflows", fd_offset, len));
    if (shm_offset + len > size_)
        refuse(reason::out_of_bounds,
               fmt::format("range 0x{:x}..0x{:x} is past the end of the region (size 0x{:x})",
                           shm_offset, shm_offset + len - 1, size_));
    // The nearest active mapping at or before the range, and the first after it.
    auto refuse_overlap = [&](const shmem_mapping& m) {
        refuse(reason::overlap,
               fmt::format("range 0x{:x}..0x{:x} overlaps the mapping at 0x{:x} (length 0x{:x})",
                           shm_offset, shm_offset + len - 1, m.offset_, m.len_));
    };
    auto next = active_.lower_bound(shm_offset);
    if (next != active_.end() && next->first < shm_offset + len) refuse_overlap(*next->second);
    if (next != active_.begin()) {
        const shmem_mapping& prev = *std::prev(next)->second;
        if (prev.offset_ + prev.len_ > shm_offset) refuse_overlap(prev);
    }
    if (live_mappings() >= max_mappings_)
        refuse(reason::too_many_mappings,
               fmt::format("already {} mappings ({} active), this region's limit", live_mappings(),
                           active_.size()));
    // One fstat both checks the fd and tells a regular file's size: a
    // mapping past the end of a file faults (SIGBUS) on access, so refuse it
    // for regular files (memfds included).
    struct stat st {};
    if (fd < 0 || ::fstat(fd, &st) != 0)
        refuse(reason::bad_fd, fmt::format("fd {} is not an open file descriptor", fd));
    if (S_ISREG(st.st_mode) && fd_offset + len > static_cast<std::uint64_t>(st.st_size))
        refuse(reason::out_of_bounds,
               fmt::format("fd {} range 0x{:x}..0x{:x} is past the end of the file (size 0x{:x})",
                           fd, fd_offset, fd_offset + len - 1,
                           static_cast<std::uint64_t>(st.st_size)));
    // Last of the checks: the process-wide count, taken here and given back
    // by the mapping (or below, if it is never made).
    detail::shmem_budget& budget = detail::shmem_budget::get();
    if (!budget.take())
        refuse(
            reason::too_many_mappings,
            fmt::format("the process already has {} shared-memory mappings, its limit (a sixth of "
                        "vm.max_map_count by default)",
                        budget.live.load()));

    const bool writable = flags == shmem_flags::read_write;
    const int prot = PROT_READ | (writable ? PROT_WRITE : 0);
    const auto n = static_cast<std::size_t>(len);
    void* view = ::mmap(nullptr, n, prot, MAP_SHARED, fd, static_cast<off_t>(fd_offset));
    std::byte* slot = base_ + shm_offset;
    if (view == MAP_FAILED || ::mmap(slot, n, prot, MAP_SHARED | MAP_FIXED, fd,
                                     static_cast<off_t>(fd_offset)) == MAP_FAILED) {
        const int err = errno;
        if (view != MAP_FAILED) {
            ::munmap(view, n);
            detail::reserve_again(slot, len); // in case the kernel dropped the old range
        }
        budget.give_back();
        refuse(reason::mmap_failed,
               fmt::format("mmap of fd {} at fd offset 0x{:x}, length 0x{:x} failed: {}", fd,
                           fd_offset, len, std::strerror(err)));
    }
    // The bookkeeping below only allocates. Publish the mapping last; if
    // anything throws, unparenting and dropping the mapping undoes it all
    // (its on_unparent restores the slot, its finalization the view and the count).
    ref_ptr<shmem_mapping> m;
    try {
        m = make<shmem_mapping>(*this, shm_offset, len, writable, static_cast<std::byte*>(view));
    } catch (...) {
        ::munmap(view, n);
        detail::reserve_again(slot, len);
        budget.give_back();
        throw;
    }
    try {
        memory_region::init_args a{region_owner(*m),
                                   fmt::format("{}-map@0x{:x}", name_, shm_offset),
                                   region_kind::ram, len};
        a.host = view;
        a.backing_may_shrink = true; // the back-end owns the file
        m->region_ = make_region(a).get();
        if (!writable) {
            m->region_->set_readonly(true);
            m->region_->set_host_writable(false); // PROT_READ: not even a debug write
        }
        region_->add_child("mapping[*]", *m);
        active_.emplace(shm_offset, m.get());
        m->state_ = shmem_mapping::state::active;
        region_->add_subregion(shm_offset, *m->region_);
        return *m; // region_ holds it as a child
    } catch (...) {
        if (m->parent())
            unparent(*m);
        else if (m->state_ == shmem_mapping::state::pending)
            detail::reserve_again(slot, len); // never published: the slot is ours to restore
        throw;
    }
}

inline void virtio_shmem::unmap(std::uint64_t shm_offset, std::uint64_t len) {
    auto it = active_.find(shm_offset);
    if (it == active_.end() || it->second->len_ != len)
        refuse(shmem_reason::not_mapped,
               fmt::format("no mapping is exactly 0x{:x}..0x{:x}{}", shm_offset,
                           shm_offset + len - 1,
                           it == active_.end()
                               ? ""
                               : fmt::format(" (the mapping at that offset has length 0x{:x})",
                                             it->second->len_)));
    unparent(*it->second); // may finalize it
}

inline void virtio_shmem::unmap_all() {
    std::optional<memory_transaction> tx; // in the region's memory system, if it has one
    if (memory_system* sys = region_->system()) tx.emplace(*sys);
    std::vector<shmem_mapping*> active;
    for (const auto& [off, m] : active_) active.push_back(m);
    for (shmem_mapping* m : active) unparent(*m);
}

inline virtio_shmem& virtio_shmem_device::declare_shmem(std::uint8_t shmid, std::uint64_t size) {
    if (shmem(shmid))
        throw shmem_error(
            shmem_reason::duplicate_shmid,
            fmt::format("{}: shared memory region {} is already declared", type().name, shmid));
    auto s = make<virtio_shmem>(shmid, size, fmt::format("{}-shm{}", type().name, shmid));
    add_child(fmt::format("shm[{}]", shmid), *s);
    return *s;
}

inline virtio_shmem* virtio_shmem_device::shmem(std::uint8_t shmid) const noexcept {
    return dynamic_cast_to<virtio_shmem>(child(fmt::format("shm[{}]", shmid)));
}

inline virtio_shmem& virtio_shmem_device::checked(std::uint8_t shmid) const {
    virtio_shmem* s = shmem(shmid);
    if (!s)
        throw shmem_error(
            shmem_reason::unknown_shmid,
            fmt::format("{}: no shared memory region with shmid {}", type().name, shmid));
    return *s;
}

inline shmem_mapping& virtio_shmem_device::shmem_map(std::uint8_t shmid, int fd,
                                                     std::uint64_t fd_offset,
                                                     std::uint64_t shm_offset, std::uint64_t len,
                                                     shmem_flags flags) {
    return checked(shmid).map(fd, fd_offset, shm_offset, len, flags);
}

inline void virtio_shmem_device::shmem_unmap(std::uint8_t shmid, std::uint64_t shm_offset,
                                             std::uint64_t len) {
    checked(shmid).unmap(shm_offset, len);
}

} // namespace qomem
