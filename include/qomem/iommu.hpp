// qomem/iommu.hpp — IOMMU memory regions: a region whose accesses a device
// (an IOMMU model) translates, page by page, into another address space
// (QEMU's IOMMUMemoryRegion and IOMMUMemoryRegionClass), and the notifiers
// that follow its mappings (QEMU's IOMMUNotifier).
//
//     struct my_iommu : qomem::iommu_ops {             // the device's side
//         qomem::iommu_tlb_entry translate(qomem::iommu_memory_region&, qomem::hwaddr iova,
//                                          qomem::iommu_access, int) override {
//             // walk the guest's page table: target space, page, permission
//             return {&memory, iova & ~0xfffull, pte & ~0xfffull, 0xfff, perm};
//         }
//     };
//     my_iommu unit;                                    // must outlive the region
//     auto dmar = qomem::make_iommu(dev, "dmar", qomem::u128_2_64, unit);
//     dev_root->add_subregion(0, *dmar);                 // the device's DMA space root
//     qomem::address_space dma(*dev_root, "dev-dma");
//     dma.read(iova, buf, n);                            // translated page by page
//
// An IOMMU region is a leaf of the flat view, as MMIO is (`info mtree`
// prints it "i/o", as QEMU 7.2 does). Every access that reaches it through
// an address space (read, write, the typed accessors, set, map, translate,
// access_valid, a region cache, a CPU TLB) asks translate() for the page of
// the address (the offset within the IOMMU region, with access flag RO or
// WO, and the index attrs_to_index gives), and continues in the entry's
// target address space at the translated address, the length clipped to
// the page (addr_mask). The target may hold IOMMU regions too (nested
// translation); a chain deeper than iommu_max_depth (a loop) fails. A page
// the entry does not permit, or an entry without a target address space,
// answers memtx_decode_error (reads give zeros), as QEMU's unassigned
// section does; never a crash. A DMA mapping through an IOMMU maps at most
// the translated page and holds the region it lands in, so an UNMAP
// notification while it is live leaves its host memory valid.
// address_space::find does not translate (QEMU's memory_region_find returns
// the IOMMU region's own section).
//
// Notifiers. A device that shadows the mappings (vhost, VFIO) registers an
// iommu_notifier for a range of IOVAs with the events it wants
// (iommu_notifier_map, _unmap, _deviotlb_unmap); the IOMMU model calls
// notify() when the guest changes its tables, and replay() delivers the
// current mappings to a new notifier.
//
// Threads. translate() is called by accesses on any thread, inside their
// RCU read section, and must be safe there. Registering, unregistering,
// notify() and replay() run one at a time: under the device's lock (QEMU's
// big lock), never from a notifier's own callback.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <qomem/assert.hpp>
#include <qomem/fwd.hpp>
#include <qomem/memory_ops.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/object.hpp>
#include <qomem/types.hpp>

namespace qomem {

class address_space;
class iommu_memory_region;

/// The most IOMMU regions one access may cross (IOMMU -> IOMMU -> ...);
/// one more fails with memtx_decode_error, so a translation loop ends.
inline constexpr unsigned iommu_max_depth = 16;

/// Permissions of an IOMMU page, and the access a translation is asked for
/// (QEMU's IOMMUAccessFlags): bit 0 read, bit 1 write.
enum class iommu_access : std::uint8_t { none = 0, ro = 1, wo = 2, rw = 3 };

/// True when `perm` allows a read (or a write, if `is_write`).
constexpr bool iommu_permits(iommu_access perm, bool is_write) noexcept {
    return (static_cast<unsigned>(perm) & (is_write ? 2u : 1u)) != 0;
}

/// One translated page (QEMU's IOMMUTLBEntry): IOVAs [iova, iova + addr_mask]
/// go to [translated_addr, translated_addr + addr_mask] of `target_as`, with
/// permission `perm`. `addr_mask` is the page size minus one (2^n - 1).
struct iommu_tlb_entry {
    address_space* target_as = nullptr;
    hwaddr iova = 0;
    hwaddr translated_addr = 0;
    hwaddr addr_mask = 0;
    iommu_access perm = iommu_access::none;

    friend bool operator==(const iommu_tlb_entry&, const iommu_tlb_entry&) = default;
};

/// The events a notifier wants (QEMU's IOMMUNotifierFlag); they combine with |.
enum iommu_notifier_flags : std::uint8_t {
    iommu_notifier_none = 0,
    iommu_notifier_unmap = 1u << 0,          ///< a mapping was removed (perm none)
    iommu_notifier_map = 1u << 1,            ///< a mapping was added
    iommu_notifier_deviotlb_unmap = 1u << 2, ///< a device-IOTLB entry was invalidated
    iommu_notifier_iotlb_events = iommu_notifier_map | iommu_notifier_unmap,
    iommu_notifier_all = iommu_notifier_iotlb_events | iommu_notifier_deviotlb_unmap,
};
constexpr iommu_notifier_flags operator|(iommu_notifier_flags a, iommu_notifier_flags b) noexcept {
    return static_cast<iommu_notifier_flags>(static_cast<unsigned>(a) | static_cast<unsigned>(b));
}

/// One event an IOMMU model announces (QEMU's IOMMUTLBEvent): `type` is one
/// of map, unmap, deviotlb_unmap.
struct iommu_tlb_event {
    iommu_notifier_flags type = iommu_notifier_none;
    iommu_tlb_entry entry;
};

/// Follows the mappings of one IOMMU region over the IOVAs [start, last]
/// for one IOMMU index (QEMU's IOMMUNotifier). The callback gets the event,
/// cut to the range for a deviotlb_unmap notifier.
/// Requires (asserted at destruction): unregistered before it is destroyed.
class iommu_notifier {
public:
    using callback = std::function<void(iommu_notifier&, const iommu_tlb_event&)>;

    /// Requires (asserted): `flags` names at least one event; start <= last.
    iommu_notifier(callback fn, iommu_notifier_flags flags, hwaddr start, hwaddr last,
                   int iommu_idx = 0)
        : fn_(std::move(fn)), flags_(flags), start_(start), last_(last), iommu_idx_(iommu_idx) {
        QOMEM_ASSERT(flags != iommu_notifier_none, "iommu_notifier: no event asked for");
        QOMEM_ASSERT(start <= last, "iommu_notifier: start 0x{:x} is after last 0x{:x}", start,
                     last);
    }
    ~iommu_notifier() { QOMEM_ASSERT(!region_, "iommu_notifier destroyed while still registered"); }
    iommu_notifier(const iommu_notifier&) = delete;
    iommu_notifier& operator=(const iommu_notifier&) = delete;

    iommu_notifier_flags flags() const noexcept { return flags_; }
    hwaddr start() const noexcept { return start_; }
    hwaddr last() const noexcept { return last_; }
    int iommu_idx() const noexcept { return iommu_idx_; }
    /// The region this notifier is registered with, or null.
    iommu_memory_region* region() const noexcept { return region_; }

private:
    friend class iommu_memory_region;
    callback fn_;
    iommu_notifier_flags flags_;
    hwaddr start_;
    hwaddr last_;
    int iommu_idx_;
    iommu_memory_region* region_ = nullptr;
};

/// What an IOMMU model implements (QEMU's IOMMUMemoryRegionClass). Only
/// translate is required; the others have QEMU's defaults.
class iommu_ops {
public:
    virtual ~iommu_ops() = default;

    /// The page holding `addr` (an offset within `mr`), for an access of
    /// kind `flag` (ro, wo; none from the default replay, which asks for the
    /// mapping whatever it permits) with IOMMU index `iommu_idx`. A missing
    /// translation is perm none. Called from any thread (see the header).
    virtual iommu_tlb_entry translate(iommu_memory_region& mr, hwaddr addr, iommu_access flag,
                                      int iommu_idx) = 0;
    /// The IOMMU index of an access with these attributes (default 0).
    virtual int attrs_to_index(iommu_memory_region& /*mr*/, mem_attrs /*attrs*/) { return 0; }
    /// How many IOMMU indexes there are (default 1).
    virtual int num_indexes(iommu_memory_region& /*mr*/) { return 1; }
    /// The smallest page the model maps (default 4 KiB, QEMU's
    /// TARGET_PAGE_SIZE on most targets); the default replay's step.
    virtual hwaddr min_page_size(iommu_memory_region& /*mr*/) { return 4096; }
    /// The union of the registered notifiers' flags changed from `old_flags`
    /// to `new_flags`. Throw (an error subtype) to refuse a registration the
    /// model cannot serve, as QEMU's returns an error.
    virtual void notify_flag_changed(iommu_memory_region& /*mr*/,
                                     iommu_notifier_flags /*old_flags*/,
                                     iommu_notifier_flags /*new_flags*/) {}
    /// Delivers the current mappings in `n`'s range to `n`; default:
    /// iommu_memory_region::default_replay.
    virtual void replay(iommu_memory_region& mr, iommu_notifier& n);
};

/// Where an access through an IOMMU goes next (iommu_memory_region::hop).
struct iommu_hop {
    address_space* target = nullptr; ///< null: the access faults
    hwaddr addr = 0;                 ///< the translated address in `target`
    u128 page_left = 0;              ///< bytes from addr to the end of its page
    const char* fault = nullptr;     ///< why the access faults, or null
};

/// An IOMMU region (QEMU's IOMMUMemoryRegion). Make with make_iommu.
class iommu_memory_region : public memory_region {
    QOMEM_OBJECT(iommu_memory_region, "iommu-memory-region", memory_region)
public:
    /// Prefer make_iommu. Requires: `a.kind` is region_kind::iommu.
    iommu_memory_region(const init_args& a, iommu_ops& ops) : memory_region(a), ops_(&ops) {
        QOMEM_ASSERT(a.kind == region_kind::iommu, "iommu_memory_region '{}' of another kind",
                     a.name);
    }

    iommu_ops& ops() const noexcept { return *ops_; }

    // ---- the model's functions (QEMU's memory_region_iommu_*) -------------
    iommu_tlb_entry translate(hwaddr addr, iommu_access flag, int iommu_idx) {
        return ops_->translate(*this, addr, flag, iommu_idx);
    }
    int attrs_to_index(mem_attrs attrs) { return ops_->attrs_to_index(*this, attrs); }
    int num_indexes() { return ops_->num_indexes(*this); }
    hwaddr min_page_size() { return ops_->min_page_size(*this); }

    /// Where an access of `addr` (an offset within this region) goes: asks
    /// translate for its page with flag ro or wo and the index of `attrs`.
    /// A fault (permission, no translation, no target) gives a null target
    /// and the reason; page_left is still the rest of the page (at least 1).
    /// Requires (asserted): attrs_to_index gives an index below num_indexes.
    iommu_hop hop(hwaddr addr, bool is_write, mem_attrs attrs) {
        const int idx = attrs_to_index(attrs);
        QOMEM_ASSERT(idx >= 0 && idx < num_indexes(),
                     "IOMMU '{}': attrs_to_index gave {}, not below num_indexes {}", region_name(),
                     idx, num_indexes());
        const iommu_tlb_entry e =
            translate(addr, is_write ? iommu_access::wo : iommu_access::ro, idx);
        iommu_hop h;
        h.page_left = u128(e.addr_mask) - (addr & e.addr_mask) + 1;
        if (!iommu_permits(e.perm, is_write))
            h.fault = e.perm == iommu_access::none ? "no translation" : "permission";
        else if (!e.target_as)
            h.fault = "no target address space";
        else {
            h.target = e.target_as;
            h.addr = (e.translated_addr & ~e.addr_mask) | (addr & e.addr_mask);
        }
        return h;
    }

    // ---- notifiers --------------------------------------------------------

    /// Registers `n` (QEMU's memory_region_register_iommu_notifier) and tells
    /// the model when the union of flags changes.
    /// Requires (asserted): `n` is not registered; its index is below
    /// num_indexes(); not called from a notifier. Effects: `n` receives the
    /// events notify() delivers from now on; no references are taken (`n`
    /// must be unregistered before it or the region is destroyed).
    /// Complexity: O(notifiers). Throws: what notify_flag_changed throws;
    /// `n` is then not registered.
    void register_notifier(iommu_notifier& n) {
        QOMEM_ASSERT(!n.region_, "iommu_notifier registered twice (region '{}')", region_name());
        QOMEM_ASSERT(!notifying_, "register_notifier from a notifier of '{}'", region_name());
        QOMEM_ASSERT(n.iommu_idx_ >= 0 && n.iommu_idx_ < num_indexes(),
                     "iommu_notifier index {} is not below num_indexes {} of '{}'", n.iommu_idx_,
                     num_indexes(), region_name());
        const iommu_notifier_flags old = notifier_flags();
        notifiers_.push_back(&n);
        n.region_ = this;
        const iommu_notifier_flags now = notifier_flags();
        if (now != old) {
            try {
                ops_->notify_flag_changed(*this, old, now);
            } catch (...) {
                notifiers_.pop_back();
                n.region_ = nullptr;
                throw;
            }
        }
    }
    /// Unregisters `n`. Requires (asserted): `n` is registered here; not
    /// called from a notifier. Effects: tells the model when the union of
    /// flags changes (what it throws is ignored: the notifier is gone).
    /// Complexity: O(notifiers).
    void unregister_notifier(iommu_notifier& n) {
        QOMEM_ASSERT(n.region_ == this, "iommu_notifier is not registered with '{}'",
                     region_name());
        QOMEM_ASSERT(!notifying_, "unregister_notifier from a notifier of '{}'", region_name());
        const iommu_notifier_flags old = notifier_flags();
        std::erase(notifiers_, &n);
        n.region_ = nullptr;
        const iommu_notifier_flags now = notifier_flags();
        if (now != old) {
            try {
                ops_->notify_flag_changed(*this, old, now);
            } catch (...) { // NOLINT(bugprone-empty-catch): see above
            }
        }
    }
    /// The union of the registered notifiers' flags.
    iommu_notifier_flags notifier_flags() const noexcept {
        unsigned f = 0;
        for (const iommu_notifier* n : notifiers_) f |= n->flags_;
        return static_cast<iommu_notifier_flags>(f);
    }
    std::size_t notifiers() const noexcept { return notifiers_.size(); }

    /// Delivers `event` to every notifier of index `iommu_idx` whose range
    /// it overlaps and whose flags include its type (QEMU's
    /// memory_region_notify_iommu); a deviotlb_unmap notifier gets the entry
    /// cut to its range.
    /// Requires (asserted): an unmap event has perm none; an event for a
    /// notifier that wants it and has no deviotlb_unmap flag lies inside its
    /// range, if it overlaps it (as QEMU).
    /// Effects: calls the notifiers, in registration order.
    /// Throws: what a notifier throws (the later ones are not called).
    void notify(int iommu_idx, const iommu_tlb_event& event) {
        QOMEM_ASSERT(!notifying_, "notify from a notifier of '{}'", region_name());
        QOMEM_ASSERT(event.type != iommu_notifier_unmap || event.entry.perm == iommu_access::none,
                     "IOMMU '{}': an unmap event with a permission", region_name());
        notifying_ = true;
        struct done {
            bool* flag;
            ~done() { *flag = false; }
        } d{&notifying_};
        for (iommu_notifier* n : notifiers_)
            if (n->iommu_idx_ == iommu_idx) notify_one(*n, event);
    }

    /// Delivers `event` to `n` alone, with notify()'s rules (QEMU's
    /// memory_region_notify_iommu_one); what replay implementations call.
    /// Throws: what the notifier throws.
    void notify_one(iommu_notifier& n, const iommu_tlb_event& event) {
        const iommu_tlb_entry& e = event.entry;
        const hwaddr entry_last = e.iova + e.addr_mask;
        // (QEMU checks the range before the type; an event the notifier
        // does not want is simply not delivered here, whatever its range.)
        if (!(event.type & n.flags_) || n.start_ > entry_last || n.last_ < e.iova) return;
        iommu_tlb_event cut = event;
        if (n.flags_ & iommu_notifier_deviotlb_unmap) {
            cut.entry.iova = std::max(e.iova, n.start_);
            cut.entry.addr_mask = std::min(entry_last, n.last_) - cut.entry.iova;
        } else {
            QOMEM_ASSERT(e.iova >= n.start_ && entry_last <= n.last_,
                         "IOMMU '{}': event [0x{:x}, 0x{:x}] crosses the notifier's range "
                         "[0x{:x}, 0x{:x}]",
                         region_name(), e.iova, entry_last, n.start_, n.last_);
        }
        n.fn_(n, cut);
    }

    /// Delivers the current mappings to `n` (QEMU's memory_region_iommu_replay):
    /// the model's replay, by default default_replay.
    /// Requires (asserted): `n` is registered here.
    /// Throws: what the model or the notifier throws.
    void replay(iommu_notifier& n) {
        QOMEM_ASSERT(n.region_ == this, "replay of a notifier not registered with '{}'",
                     region_name());
        ops_->replay(*this, n);
    }
    /// QEMU's default replay: translate (flag none) every min_page_size step
    /// of the notifier's range within the region, and notify a map event for
    /// each translation that permits anything. (QEMU walks the whole region;
    /// pages outside the notifier's range would only be dropped by it.)
    /// Requires (asserted): min_page_size is a power of two.
    /// Complexity: one translate per step of the range.
    /// Throws: what translate or the notifier throws.
    void default_replay(iommu_notifier& n) {
        const hwaddr step = min_page_size();
        QOMEM_ASSERT(step != 0 && (step & (step - 1)) == 0,
                     "IOMMU '{}': min_page_size {} is not a power of two", region_name(), step);
        if (size() == 0 || u128(n.start_) >= size()) return;
        const hwaddr last = static_cast<hwaddr>(std::min<u128>(n.last_, size() - 1));
        for (u128 a = n.start_ & ~(step - 1); a <= last; a += step) {
            const iommu_tlb_entry e =
                translate(static_cast<hwaddr>(a), iommu_access::none, n.iommu_idx_);
            if (e.perm != iommu_access::none) notify_one(n, {iommu_notifier_map, e});
        }
    }

protected:
    void check_finalizable() const override {
        memory_region::check_finalizable();
        QOMEM_ASSERT(notifiers_.empty(), "IOMMU region '{}' freed with {} notifier(s) registered",
                     region_name(), notifiers_.size());
    }

private:
    iommu_ops* ops_;
    std::vector<iommu_notifier*> notifiers_;
    bool notifying_ = false;
};

inline void iommu_ops::replay(iommu_memory_region& mr, iommu_notifier& n) { mr.default_replay(n); }

/// Makes an IOMMU region of `size` bytes whose translations `ops` gives
/// (QEMU's memory_region_init_iommu). Effects, references: as the other
/// make_* functions (memory_region.hpp); `ops` must outlive the region.
/// Throws: region_error for a size above 2^64.
inline ref_ptr<iommu_memory_region> make_iommu(region_owner where, std::string_view name, u128 size,
                                               iommu_ops& ops) {
    memory_region::init_args a{where, std::string(name), region_kind::iommu, size};
    auto mr = make<iommu_memory_region>(a, ops);
    detail::add_to_home(*mr, a);
    return mr;
}

/// The IOMMU region `mr` is, or null (QEMU's memory_region_get_iommu,
/// without following aliases: the flat view has resolved them).
inline iommu_memory_region* as_iommu(memory_region& mr) noexcept {
    return mr.is_iommu() ? static_cast<iommu_memory_region*>(&mr) : nullptr;
}
inline const iommu_memory_region* as_iommu(const memory_region& mr) noexcept {
    return mr.is_iommu() ? static_cast<const iommu_memory_region*>(&mr) : nullptr;
}

} // namespace qomem
