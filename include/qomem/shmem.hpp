// qomem/shmem.hpp — VIRTIO Shared Memory Regions: reserved host ranges into
// which a backend maps file descriptors while the guest runs.
//
// A VIRTIO device (virtiofs' DAX window, virtio-gpu blobs, virtio-media)
// declares shared memory regions, each identified by a `shmid`. Each one is a
// reserved host range (an anonymous PROT_NONE, MAP_NORESERVE mapping: nothing
// unrelated can ever be mapped inside it), exposed as a memory region that a
// transport places anywhere — a PCI BAR, a virtio-mmio window:
//
//     class dax_device : public qomem::virtio_shmem_device { ... };
//     auto dev = qomem::make<dax_device>();
//     qomem::virtio_shmem& shm = dev->declare_shmem(0, 1 << 30);   // 1 GiB window
//     bar->add_subregion(0, shm.region());
//     dev->shmem_map(0, fd, 0, 0x200000, 0x10000, qomem::shmem_flags::read_write);
//     dev->shmem_unmap(0, 0x200000, 0x10000);
//
// Each mapping is an object of its own (a child of the shared memory region's
// memory region in the QOM tree) owning the RAM region the guest sees. Guest
// DMA that mapped part of it holds a reference to that region, so after an
// unmap the guest stops seeing the mapping at once, but the host pages stay
// valid for that DMA until it unmaps; only when the last reference goes does
// the range return to PROT_NONE — in one mmap, never leaving a hole.
//
// Parts of a shared memory region where nothing is mapped are a reservation:
// guest accesses there fail with memtx_decode_error and never touch the
// PROT_NONE pages.
//
// Requests come from a backend, so they are bad input, not misuse: each
// refusal is a shmem_error naming the values, and changes nothing.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
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

#include <qomem/device.hpp>
#include <qomem/error.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/memory_system.hpp>

namespace qomem {

/// Access a backend asks for (vhost-user SHMEM_MAP flags: bit 0 read, bit 1 write).
enum class shmem_flags : std::uint64_t {
    read = 1u << 0,
    write = 1u << 1,
    read_write = (1u << 0) | (1u << 1),
};

/// A refused shared-memory request. `reason()` says which rule it broke.
class shmem_error : public error {
public:
    enum class reason {
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
    shmem_error(reason r, const std::string& what) : error(what), reason_(r) {}
    reason why() const noexcept { return reason_; }
    /// The reason's name ("unknown_shmid", ...), for messages and tests.
    static constexpr std::string_view name(reason r) noexcept {
        constexpr std::string_view names[] = {
            "unknown_shmid", "zero_length", "unaligned",  "overflow",        "out_of_bounds",
            "overlap",       "bad_fd",      "bad_flags",  "too_many_mappings", "mmap_failed",
            "not_mapped",    "duplicate_shmid", "bad_size"};
        const auto i = static_cast<std::size_t>(r);
        return i < std::size(names) ? names[i] : std::string_view("unknown reason");
    }

private:
    reason reason_;
};

class virtio_shmem;

/// One file mapping inside a shared memory region. Alive while the backend
/// has it mapped or anything (guest DMA) still references its memory region.
class shmem_mapping : public object {
    QOMEM_OBJECT(shmem_mapping, "virtio-shmem-mapping", object)
public:
    shmem_mapping(virtio_shmem& shm, std::uint64_t offset, std::uint64_t len, bool writable);

    std::uint64_t offset() const noexcept { return offset_; }
    std::uint64_t length() const noexcept { return len_; }
    bool writable() const noexcept { return writable_; }
    /// False once the backend unmapped it (it may linger for DMA).
    bool active() const noexcept { return active_; }
    memory_region& region() const noexcept { return *region_; }

protected:
    ~shmem_mapping() override;
    void on_unparent() override;
    after_free_action after_free() noexcept override;

private:
    friend class virtio_shmem;
    virtio_shmem* shm_;
    std::uint64_t offset_;
    std::uint64_t len_;
    bool writable_;
    bool active_ = true;
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
    /// The start of the host reservation.
    std::byte* host_base() const noexcept { return base_; }

    /// The most mappings (live or lingering for DMA) allowed at once; a
    /// backend must not be able to exhaust the host's mapping count.
    std::size_t max_mappings() const noexcept { return max_mappings_; }
    void set_max_mappings(std::size_t n) noexcept { max_mappings_ = n; }
    /// Mappings the backend has mapped and not unmapped.
    std::size_t active_mappings() const noexcept;
    /// Mappings still holding host pages (active, or unmapped but referenced).
    std::size_t live_mappings() const noexcept { return mappings_.size(); }

    /// Maps `len` bytes of `fd` from `fd_offset` at `shm_offset` of the region
    /// (MAP_SHARED | MAP_FIXED over the reservation), visible to the guest at
    /// once. Effects: a new shmem_mapping child of region(), owning a RAM
    /// region (read-only unless `flags` has write) added at `shm_offset`.
    /// `fd` is not taken: the caller may close it afterwards.
    /// Throws: shmem_error for a zero length, an offset or length not a
    /// multiple of the page size, an overflowing `shm_offset + len` or
    /// `fd_offset + len`, a range past the end, a range overlapping a mapping
    /// (including one unmapped but still referenced), a bad fd, a range past
    /// the end of a regular file (its pages would fault), unknown or empty
    /// flags, too many mappings, or a failing mmap. Nothing changes.
    shmem_mapping& map(int fd, std::uint64_t fd_offset, std::uint64_t shm_offset,
                       std::uint64_t len, std::uint64_t flags);

    /// Unmaps the mapping that is exactly [shm_offset, shm_offset + len). The
    /// guest stops seeing it at once; the host range returns to PROT_NONE
    /// when the last reference to the mapping goes (at once without DMA).
    /// Throws: shmem_error (not_mapped) if no active mapping is exactly that
    /// range; nothing changes.
    void unmap(std::uint64_t shm_offset, std::uint64_t len);

    /// Unmaps every active mapping (device unplug).
    void unmap_all();

protected:
    ~virtio_shmem() override;
    void on_unparent() override;
    after_free_action after_free() noexcept override;

public:
    bool follows_owner_out_of_tree() const noexcept override { return true; }

private:
    friend class shmem_mapping;
    [[noreturn]] void refuse(shmem_error::reason r, const std::string& what) const {
        throw shmem_error(r, fmt::format("shared memory region {} ('{}'): {}", shmid_, name_, what));
    }

    std::uint8_t shmid_;
    std::uint64_t size_;
    std::string name_;
    std::byte* base_ = nullptr;
    memory_region* region_ = nullptr;
    std::size_t max_mappings_ = 4096;
    std::map<std::uint64_t, shmem_mapping*> mappings_; // by offset; active and lingering
    object* held_owner_ = nullptr; // the device, held once unparented from it
};

/// A VIRTIO device with shared memory regions (transport-independent).
class virtio_shmem_device : public device {
    QOMEM_OBJECT(virtio_shmem_device, "virtio-shmem-device", device)
public:
    virtio_shmem_device() noexcept = default;

    /// Declares shared memory region `shmid` of `size` bytes (a child object
    /// "shm[shmid]" of the device; its memory region is owned by it).
    /// Throws: shmem_error (duplicate_shmid, bad_size).
    virtio_shmem& declare_shmem(std::uint8_t shmid, std::uint64_t size);

    /// The region with this shmid, or null.
    virtio_shmem* shmem(std::uint8_t shmid) const noexcept;

    /// Backend requests, routed by shmid. Throws: shmem_error (unknown_shmid
    /// or the region's own refusals); nothing changes on a refusal.
    shmem_mapping& shmem_map(std::uint8_t shmid, int fd, std::uint64_t fd_offset,
                             std::uint64_t shm_offset, std::uint64_t len, std::uint64_t flags);
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
} // namespace detail

inline shmem_mapping::shmem_mapping(virtio_shmem& shm, std::uint64_t offset, std::uint64_t len,
                                    bool writable)
    : shm_(&shm), offset_(offset), len_(len), writable_(writable) {
    shm.ref(); // the reservation must outlive every mapping in it
}

inline shmem_mapping::~shmem_mapping() {
    if (!detail::reserve_again(shm_->base_ + offset_, len_))
        std::fprintf(stderr, "qomem: restoring PROT_NONE over a shared memory mapping failed: %s\n",
                     std::strerror(errno));
    shm_->mappings_.erase(offset_);
}

inline void shmem_mapping::on_unparent() {
    // The backend unmapped it (or the device is going): hide it from the
    // guest now; the pages stay until the last reference to the region goes.
    active_ = false;
    memory_region& r = *region_;
    if (r.container()) r.container()->del_subregion(r);
    if (r.parent()) unparent(r); // the region now holds this mapping
    object::on_unparent();
}

inline object::after_free_action shmem_mapping::after_free() noexcept {
    return unref_after_free(shm_);
}

inline virtio_shmem::virtio_shmem(std::uint8_t shmid, std::uint64_t size, std::string name)
    : shmid_(shmid), size_(size), name_(std::move(name)) {
    const std::uint64_t page = detail::host_page_size();
    if (size == 0 || size % page != 0)
        refuse(shmem_error::reason::bad_size,
               fmt::format("size 0x{:x} is not a non-zero multiple of the page size 0x{:x}", size, page));
    void* p = ::mmap(nullptr, static_cast<std::size_t>(size), PROT_NONE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        refuse(shmem_error::reason::bad_size,
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

inline std::size_t virtio_shmem::active_mappings() const noexcept {
    std::size_t n = 0;
    for (const auto& [off, m] : mappings_) n += m->active_ ? 1 : 0;
    return n;
}

inline shmem_mapping& virtio_shmem::map(int fd, std::uint64_t fd_offset, std::uint64_t shm_offset,
                                        std::uint64_t len, std::uint64_t flags) {
    using reason = shmem_error::reason;
    const std::uint64_t page = detail::host_page_size();
    constexpr std::uint64_t known = static_cast<std::uint64_t>(shmem_flags::read_write);
    if (flags & ~known)
        refuse(reason::bad_flags, fmt::format("flags 0x{:x} have unknown bits 0x{:x}", flags, flags & ~known));
    if (flags == 0) refuse(reason::bad_flags, "flags 0x0 ask for no access");
    if (len == 0) refuse(reason::zero_length, fmt::format("map of length 0 at offset 0x{:x}", shm_offset));
    if (shm_offset % page || len % page || fd_offset % page)
        refuse(reason::unaligned,
               fmt::format("shm offset 0x{:x}, fd offset 0x{:x} and length 0x{:x} must be multiples "
                           "of the page size 0x{:x}",
                           shm_offset, fd_offset, len, page));
    if (shm_offset + len < shm_offset)
        refuse(reason::overflow, fmt::format("shm offset 0x{:x} + length 0x{:x} overflows", shm_offset, len));
    if (fd_offset + len < fd_offset ||
        fd_offset + len > static_cast<std::uint64_t>(std::numeric_limits<off_t>::max()))
        refuse(reason::overflow, fmt::format("fd offset 0x{:x} + length 0x{:x} overflows", fd_offset, len));
    if (shm_offset + len > size_)
        refuse(reason::out_of_bounds,
               fmt::format("range 0x{:x}..0x{:x} is past the end of the region (size 0x{:x})",
                           shm_offset, shm_offset + len - 1, size_));
    // The nearest mapping at or before the range, and the first after it.
    auto refuse_overlap = [&](const shmem_mapping& m) {
        refuse(reason::overlap,
               fmt::format("range 0x{:x}..0x{:x} overlaps the mapping at 0x{:x} (length 0x{:x}{})",
                           shm_offset, shm_offset + len - 1, m.offset_, m.len_,
                           m.active_ ? "" : ", unmapped but still referenced"));
    };
    auto next = mappings_.lower_bound(shm_offset);
    if (next != mappings_.end() && next->first < shm_offset + len) refuse_overlap(*next->second);
    if (next != mappings_.begin()) {
        const shmem_mapping& prev = *std::prev(next)->second;
        if (prev.offset_ + prev.len_ > shm_offset) refuse_overlap(prev);
    }
    if (mappings_.size() >= max_mappings_)
        refuse(reason::too_many_mappings,
               fmt::format("already {} mappings, the limit", mappings_.size()));
    // One fstat both checks the fd and tells a regular file's size: a
    // mapping past the end of a file faults (SIGBUS) on access, so refuse it
    // for regular files (memfds included).
    struct stat st {};
    if (fd < 0 || ::fstat(fd, &st) != 0)
        refuse(reason::bad_fd, fmt::format("fd {} is not an open file descriptor", fd));
    if (S_ISREG(st.st_mode) &&
        fd_offset + len > static_cast<std::uint64_t>(st.st_size))
        refuse(reason::out_of_bounds,
               fmt::format("fd {} range 0x{:x}..0x{:x} is past the end of the file (size 0x{:x})", fd,
                           fd_offset, fd_offset + len - 1, static_cast<std::uint64_t>(st.st_size)));

    const bool writable = flags & static_cast<std::uint64_t>(shmem_flags::write);
    const int prot = ((flags & static_cast<std::uint64_t>(shmem_flags::read)) ? PROT_READ : 0) |
                     (writable ? PROT_WRITE : 0);
    std::byte* where = base_ + shm_offset;
    if (::mmap(where, static_cast<std::size_t>(len), prot, MAP_SHARED | MAP_FIXED, fd,
               static_cast<off_t>(fd_offset)) == MAP_FAILED) {
        const int err = errno;
        detail::reserve_again(where, len); // in case the kernel dropped the old range
        refuse(reason::mmap_failed,
               fmt::format("mmap of fd {} at fd offset 0x{:x}, length 0x{:x} failed: {}", fd,
                           fd_offset, len, std::strerror(err)));
    }
    // The bookkeeping below only allocates. Publish the mapping last; if
    // anything throws, unparenting and dropping the mapping undoes it all
    // (its finalization puts PROT_NONE back).
    ref_ptr<shmem_mapping> m;
    try {
        m = make<shmem_mapping>(*this, shm_offset, len, writable);
        memory_region::init_args a{region_owner(*m), fmt::format("{}-map@0x{:x}", name_, shm_offset),
                                   region_kind::ram, len};
        a.host = where;
        m->region_ = make_region(a).get();
        if (!writable) {
            m->region_->set_readonly(true);
            m->region_->set_host_writable(false); // PROT_READ: not even a debug write
        }
        region_->add_child("mapping[*]", *m);
        mappings_.emplace(shm_offset, m.get());
        region_->add_subregion(shm_offset, *m->region_);
        return *m; // region_ holds it as a child
    } catch (...) {
        if (m && m->parent()) unparent(*m);
        if (!m) detail::reserve_again(where, len);
        throw;
    }
}

inline void virtio_shmem::unmap(std::uint64_t shm_offset, std::uint64_t len) {
    auto it = mappings_.find(shm_offset);
    if (it == mappings_.end() || !it->second->active_ || it->second->len_ != len)
        refuse(shmem_error::reason::not_mapped,
               fmt::format("no mapping is exactly 0x{:x}..0x{:x}{}", shm_offset,
                           shm_offset + len - 1,
                           it == mappings_.end() ? ""
                           : !it->second->active_
                               ? " (the one at that offset is already unmapped)"
                               : fmt::format(" (the mapping at that offset has length 0x{:x})",
                                             it->second->len_)));
    unparent(*it->second); // may finalize it, which erases it from mappings_
}

inline void virtio_shmem::unmap_all() {
    std::optional<memory_transaction> tx; // in the region's memory system, if it has one
    if (memory_system* sys = region_->system()) tx.emplace(*sys);
    std::vector<shmem_mapping*> active;
    for (const auto& [off, m] : mappings_)
        if (m->active_) active.push_back(m);
    for (shmem_mapping* m : active) unparent(*m);
}

inline virtio_shmem& virtio_shmem_device::declare_shmem(std::uint8_t shmid, std::uint64_t size) {
    if (shmem(shmid))
        throw shmem_error(shmem_error::reason::duplicate_shmid,
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
        throw shmem_error(shmem_error::reason::unknown_shmid,
                          fmt::format("{}: no shared memory region with shmid {}", type().name, shmid));
    return *s;
}

inline shmem_mapping& virtio_shmem_device::shmem_map(std::uint8_t shmid, int fd, std::uint64_t fd_offset,
                                                     std::uint64_t shm_offset, std::uint64_t len,
                                                     std::uint64_t flags) {
    return checked(shmid).map(fd, fd_offset, shm_offset, len, flags);
}

inline void virtio_shmem_device::shmem_unmap(std::uint8_t shmid, std::uint64_t shm_offset,
                                             std::uint64_t len) {
    checked(shmid).unmap(shm_offset, len);
}

} // namespace qomem
