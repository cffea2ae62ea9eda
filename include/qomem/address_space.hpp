// qomem/address_space.hpp — address spaces: a name, a root region, the
// current flat view, and the accesses made through it.
//
//     auto sys = qomem::make_container(nullptr, "system", qomem::u128_2_64);
//     qomem::address_space memory(*sys, "memory");    // the default memory system
//     qomem::address_space dma(*sys, "dma");          // shares memory's flat view
//     std::uint64_t v;
//     memory.read(0x1000, &v, 8);                      // -> qomem::memtx_result
//     auto m = dma.map(0x2000, 4096, true);            // host pointer + length
//     std::memset(m.data(), 0, m.size());
//     dma.unmap(m, m.size());
//
// An access reads top-down: the address space loads its current view (RCU),
// the view finds the range (flat_view::lookup), dispatch serves it
// (detail/dispatch.hpp: memcpy, or the region's ops).
//
// References. An address space holds memory_region_ref on its root and one
// reference on its current flat view, which holds the regions it points into.
// Address spaces of one memory system whose roots reduce to the same
// flat-view root (flat_view_root) share one flat view object; those with no
// flat-view root share the system's empty view.
//
// Threads. Any thread may read, write, map and unmap at any time without a
// lock: the flat view is read inside an RCU read section (rcu.hpp), and a
// commit publishes a new view and retires the old one, which is freed only
// once no reader can still hold it. Creating and destroying address spaces
// and registering listeners take the memory system's writer role.
//
// Destroy an address space before (or while) the device using it leaves the
// tree — typically in its unrealize step — when the root belongs to that same
// device: the address space's reference on the root would otherwise keep the
// region, and through it the device, alive.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <boost/intrusive_ptr.hpp>

#include <qomem/accessors.hpp>
#include <qomem/assert.hpp>
#include <qomem/detail/dispatch.hpp>
#include <qomem/detail/page_table.hpp>
#include <qomem/dma.hpp>
#include <qomem/flat_view.hpp>
#include <qomem/iommu.hpp>
#include <qomem/memory_listener.hpp>
#include <qomem/memory_ops.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/memory_system.hpp>
#include <qomem/rcu.hpp>
#include <qomem/types.hpp>

namespace qomem {

/// What find() returns: one section of the view (memory_section's fields)
/// together with a reference to its region, dropped with the object.
class found_section : public memory_section {
public:
    found_section() noexcept = default;
    explicit found_section(const memory_section& s) : memory_section(s), hold_(*s.mr) {}
    found_section(found_section&& o) noexcept
        : memory_section(std::exchange(static_cast<memory_section&>(o), memory_section{})),
          hold_(std::move(o.hold_)) {}
    found_section& operator=(found_section&& o) noexcept {
        static_cast<memory_section&>(*this) =
            std::exchange(static_cast<memory_section&>(o), memory_section{});
        hold_ = std::move(o.hold_);
        return *this;
    }
    explicit operator bool() const noexcept { return mr != nullptr; }
    /// Drops the reference; the section becomes empty.
    void reset() noexcept {
        hold_.reset();
        static_cast<memory_section&>(*this) = memory_section{};
    }

private:
    region_ref hold_;
};

class address_space : public typed_accessors<address_space> {
public:
    /// Creates an address space of `sys` rooted at `root`, and renders its
    /// view (at the outermost commit when a transaction is open).
    /// Requires (asserted): `root` belongs to no other memory system.
    /// Effects: memory_region_ref on `root`; `root` (and everything connected
    /// to it) joins `sys`; the address space holds `sys`.
    address_space(memory_system& sys, memory_region& root, std::string name);
    /// The same in `root`'s memory system, or the default one if `root`
    /// belongs to none yet.
    address_space(memory_region& root, std::string name)
        : address_space(root.system() ? *root.system() : memory_system::default_system(), root,
                        std::move(name)) {}

    /// Unregisters, drops the reference to the root and retires the flat
    /// view (freed, with the region references it holds, once no reader uses
    /// it). Requires (asserted): no listener registered, no bounce mapping
    /// live, no CPU TLB bound (a direct mapping of RAM, and a region cache,
    /// may outlive the address space: they hold their region, and touch
    /// nothing else).
    ~address_space();

    address_space(const address_space&) = delete;
    address_space& operator=(const address_space&) = delete;

    const std::string& name() const noexcept { return name_; }
    memory_region& root() const noexcept { return *slot_.root; }
    memory_system& system() const noexcept { return *sys_; }

    /// The current flat view, with a reference (shared with every address
    /// space that has the same flat-view root).
    ref_ptr<flat_view> view() const {
        rcu::read_guard g;
        return ref_ptr<flat_view>(const_cast<flat_view*>(current()));
    }
    /// The current flat view without a reference: valid only inside an RCU
    /// read section (rcu::read_guard) on this thread.
    const flat_view* current() const noexcept {
        // Pairs with memory_system::publish's seq_cst exchange: the view's
        // contents, written before it was published, are visible here
        // (acquire would do). Its ordering after the read section's start
        // comes from rcu::read_lock — its acquire load of the epoch, and its
        // fence or the writer's membarrier(2), rcu.hpp "Orderings" (A) and
        // (B) — not from this load. (On ARMv8 a seq_cst load is an LDAR, not
        // a plain load: it does not keep an earlier plain load of the epoch
        // from being satisfied after it; issue 11, item 1.)
        return slot_.current.load(std::memory_order_seq_cst);
    }

    // ---- access (any thread, lock-free) ----------------------------------
    //
    // Every access opens its own RCU read section, loads the current view
    // and finds its range through the view's page table (O(1)); a read or
    // write that stays inside one page of RAM is a memcpy inline, everything
    // else goes out of line to the dispatch (detail/dispatch.hpp). Nothing
    // shared is written by a read: readers on many threads do not slow each
    // other down.

    /// Reads or writes `len` bytes at `addr`: split at flat-range boundaries;
    /// RAM by memcpy (guest writes to ROM are ignored unless attrs.debug);
    /// MMIO through the region's ops with its access rules; holes read as
    /// zero. Returns the OR of every piece's result (memtx_ok = 0).
    memtx_result rw(hwaddr addr, void* buf, std::size_t len, bool is_write, mem_attrs attrs = {}) {
        return is_write ? write(addr, buf, len, attrs) : read(addr, buf, len, attrs);
    }
    memtx_result read(hwaddr addr, void* buf, std::size_t len, mem_attrs attrs = {}) {
        rcu::read_guard g;
        const flat_view& v = *current();
        const detail::pt_entry e = detail::pt_find(detail::view_access::table_root(v), addr);
        // Inside one page of directly readable memory (64-bit arithmetic only).
        if (e.aux != 0 && len <= detail::pt_page_size - (addr & (detail::pt_page_size - 1)) &&
            !attrs.memory) [[likely]] {
            detail::copy_bytes(buf, reinterpret_cast<const std::byte*>(e.aux + addr), len);
            return memtx_ok;
        }
        return access_slow(v, addr, static_cast<std::byte*>(buf), len, false, attrs);
    }
    memtx_result write(hwaddr addr, const void* buf, std::size_t len, mem_attrs attrs = {}) {
        rcu::read_guard g;
        const flat_view& v = *current();
        const detail::pt_entry e = detail::pt_find(detail::view_access::table_root(v), addr);
        // Inside one page of RAM that guest writes store to.
        if ((e.ref & (detail::pt_tag_mask | detail::pt_writable)) == detail::pt_writable &&
            len <= detail::pt_page_size - (addr & (detail::pt_page_size - 1))) [[likely]] {
            detail::copy_bytes(reinterpret_cast<std::byte*>(e.aux + addr), buf, len);
            return memtx_ok;
        }
        return access_slow(v, addr, static_cast<std::byte*>(const_cast<void*>(buf)), len, true,
                           attrs);
    }
    /// Writes even to ROM (QEMU's address_space_write_rom), for loaders.
    memtx_result write_rom(hwaddr addr, const void* buf, std::size_t len) {
        mem_attrs a;
        a.debug = true;
        return write(addr, buf, len, a);
    }
    /// Writes `len` bytes of value `c` from `addr` (QEMU's address_space_set),
    /// with write()'s rules, in pieces of at most 512 bytes for MMIO.
    memtx_result set(hwaddr addr, std::uint8_t c, hwaddr len, mem_attrs attrs = {});

    // ---- typed accessors -----------------------------------------------------
    //
    // ldub, lduw_le, ..., stq_be (accessors.hpp), on `load` and `store`.

    /// Loads one value of `T` (1, 2, 4 or 8 bytes) at `addr`, its bytes read
    /// in byte order `Order` (native: the target's). RAM by a load; MMIO as
    /// one access of sizeof(T) bytes, refused as a whole when the ops refuse
    /// that size (QEMU's address_space_ldl and friends); an access that
    /// crosses ranges as read() would. On an error `value` holds what read()
    /// would have read (zeros from holes and refused accesses).
    template <class T, endianness Order = endianness::native>
    memtx_result load(hwaddr addr, T& value, mem_attrs attrs = {}) {
        static_assert(std::is_unsigned_v<T> && sizeof(T) <= 8,
                      "load: an unsigned integer of 1 to 8 bytes");
        rcu::read_guard g;
        const flat_view& v = *current();
        const detail::pt_entry e = detail::pt_find(detail::view_access::table_root(v), addr);
        if (e.aux != 0 && (addr & (detail::pt_page_size - 1)) <= detail::pt_page_size - sizeof(T) &&
            !attrs.memory) [[likely]] {
            value = static_cast<T>(detail::load_ordered(
                reinterpret_cast<const std::byte*>(e.aux + addr), sizeof(T), big<Order>()));
            return memtx_ok;
        }
        std::byte bytes[sizeof(T)];
        const memtx_result r = access_sized(v, addr, bytes, sizeof(T), false, attrs);
        value = static_cast<T>(detail::load_ordered(bytes, sizeof(T), big<Order>()));
        return r;
    }
    /// Stores one value of `T` at `addr` in byte order `Order`, as load().
    template <class T, endianness Order = endianness::native>
    memtx_result store(hwaddr addr, T value, mem_attrs attrs = {}) {
        static_assert(std::is_unsigned_v<T> && sizeof(T) <= 8,
                      "store: an unsigned integer of 1 to 8 bytes");
        std::byte bytes[sizeof(T)];
        detail::store_ordered(bytes, sizeof(T), value, big<Order>());
        rcu::read_guard g;
        const flat_view& v = *current();
        const detail::pt_entry e = detail::pt_find(detail::view_access::table_root(v), addr);
        if ((e.ref & (detail::pt_tag_mask | detail::pt_writable)) == detail::pt_writable &&
            (addr & (detail::pt_page_size - 1)) <= detail::pt_page_size - sizeof(T)) [[likely]] {
            std::memcpy(reinterpret_cast<std::byte*>(e.aux + addr), bytes, sizeof(T));
            return memtx_ok;
        }
        return access_sized(v, addr, bytes, sizeof(T), true, attrs);
    }

    // ---- translation and checks ----------------------------------------------

    /// QEMU's address_space_translate: the range at `addr`, as a section
    /// from `addr` to the end of its range (offset_within_region is the
    /// translated address, "xlat"), holding a reference to its region; and
    /// in `len` (in: the length wanted) what an access at `addr` may use
    /// there: clipped to the section when the access would be direct
    /// (memcpy), left as asked for MMIO, whose registers decode wide
    /// accesses by their address alone (QEMU's rule). A hole gives an empty
    /// section and `len` clipped to the hole. Through an IOMMU region
    /// (iommu.hpp) the section is the one the translation lands in, in the
    /// entry's target address space (offset_within_address_space is the
    /// translated address there), and `len` is clipped to the IOMMU page; a
    /// fault gives an empty section and `len` clipped to the page.
    found_section translate(hwaddr addr, hwaddr& len, bool is_write, mem_attrs attrs = {}) const;

    /// True if an access of `len` bytes at `addr` would be accepted
    /// everywhere (QEMU's address_space_access_valid): no hole, nothing past
    /// 2^64, no MMIO refusing one of the pieces read() or write() would make
    /// (their accepts hooks are asked), no MMIO when attrs.memory. A guest
    /// write to ROM is valid (qomem ignores it with memtx_ok). Through an
    /// IOMMU, page by page: valid if each page permits the access and the
    /// target would accept it.
    bool access_valid(hwaddr addr, hwaddr len, bool is_write, mem_attrs attrs = {}) const {
        return access_valid_at(addr, len, is_write, attrs, 0);
    }

    // ---- DMA (any thread) --------------------------------------------------

    /// Maps up to `len` bytes at `addr` (QEMU's address_space_map). RAM gives
    /// a direct pointer, extended across contiguous ranges of the same
    /// region; anything else gives a bounce buffer from this address space's
    /// budget (pre-read unless `is_write`), truncated to what is left of it.
    /// Through an IOMMU the mapping is clipped to the translated page (of
    /// each IOMMU on the way) and holds the region it lands in; an IOMMU
    /// fault maps nothing.
    /// Effects: the mapping holds its region (dma.hpp). An empty mapping
    /// (null, size 0) means nothing is mapped there, or the bounce budget is
    /// spent: see register_map_client.
    /// Throws: what a region's ops throw during a bounce pre-read (nothing is
    /// then held: no buffer, no budget, no region).
    dma_mapping map(hwaddr addr, hwaddr len, bool is_write, mem_attrs attrs = {});

    /// Ends a mapping: a bounce buffer written to is written back
    /// (`access_len` bytes), RAM written to is marked dirty, and the region
    /// is released (which may finalize it and its owner).
    /// Requires (asserted): `m` is a live mapping of this address space
    /// (bounce), or a live direct mapping; access_len <= m.size().
    /// Throws: what a region's ops throw during the write-back; the mapping
    /// is ended all the same (buffer freed, budget returned, region released).
    void unmap(dma_mapping& m, hwaddr access_len);

    /// The bounce-buffer budget in bytes (default 4096).
    std::size_t max_bounce_buffer_size() const noexcept { return max_bounce_.load(); }
    void set_max_bounce_buffer_size(std::size_t bytes) noexcept { max_bounce_.store(bytes); }
    std::size_t bounce_buffer_in_use() const noexcept { return bounce_used_.load(); }

    /// Asks to be called once, on the thread that frees it, the next time
    /// bounce-buffer space is freed (a failed map may then succeed). Returns
    /// an id for unregister_map_client.
    std::uint64_t register_map_client(std::function<void()> retry);
    void unregister_map_client(std::uint64_t id);

    /// The lowest flat range overlapping [addr, addr + size), clipped to it,
    /// with a reference to its region (QEMU's memory_region_find on an
    /// address space). Empty when nothing overlaps. Like QEMU's, it does not
    /// translate: over an IOMMU region it gives that region's section.
    found_section find(hwaddr addr, u128 size) const;

    // ---- listeners (writer role) ---------------------------------------------

    /// Registers `l` and replays the current view to it as QEMU does: begin,
    /// log_global_start if the system tracks dirty memory globally, then
    /// region_add (and log_start for a range that logs) for each range in
    /// address order, commit (memory_listener.hpp).
    /// Requires (asserted): `l` is not registered; not called from a
    /// listener callback. Effects: takes the writer role for the call.
    /// Throws: what `l` throws while replayed; `l` is then not registered.
    void add_listener(memory_listener& l);
    /// Unregisters `l`, reporting every range of the current view (in
    /// address order, between begin and commit) as log_stop if it logs, then
    /// region_del. Requires (asserted): `l` is registered here; not called
    /// from a listener callback. Effects: `l` is unregistered even if it
    /// throws. Throws: what `l` throws.
    void remove_listener(memory_listener& l);

    /// Calls f(address_space&) for every address space of the default
    /// memory system, oldest first (memory_system::for_each_address_space
    /// for another system).
    template <class F>
    static void for_each(F&& f) {
        memory_system::default_system().for_each_address_space(f);
    }

private:
    friend class dma_mapping;

    friend class cpu_tlb;
    friend class memory_region_cache;

    /// `c` is invalidated at every publish of this space's view, from now on
    /// (until removed). Any thread.
    void add_reader_cache(detail::reader_cache& c) {
        std::lock_guard g(slot_.caches_mutex);
        slot_.caches.push_back(c);
    }
    void remove_reader_cache(detail::reader_cache& c) noexcept {
        std::lock_guard g(slot_.caches_mutex);
        slot_.caches.erase(slot_.caches.iterator_to(c));
    }
    std::size_t reader_caches() {
        std::lock_guard g(slot_.caches_mutex);
        return slot_.caches.size();
    }

    [[gnu::noinline]] memtx_result access_slow(const flat_view& v, hwaddr addr, std::byte* buf,
                                               std::size_t len, bool is_write,
                                               mem_attrs attrs) const {
        return access_through(v, addr, buf, len, is_write, attrs, 0);
    }
    // The dispatch (detail/dispatch.hpp) with IOMMU regions translated:
    // `depth` IOMMUs were crossed to get here.
    memtx_result access_through(const flat_view& v, hwaddr addr, std::byte* buf, u128 len,
                                bool is_write, mem_attrs attrs, unsigned depth = 0) const;
    // detail::access_view_sized with IOMMU regions translated.
    memtx_result access_sized(const flat_view& v, hwaddr addr, std::byte* bytes, unsigned size,
                              bool is_write, mem_attrs attrs, unsigned depth = 0) const;
    // `len` bytes at `offset` of the IOMMU region of `fr` (len within fr),
    // page by page in the target address spaces; `sized`: one access of
    // `len` bytes (a typed access) where it fits in one page.
    static memtx_result iommu_access(const flat_range& fr, hwaddr offset, std::byte* buf, u128 len,
                                     bool is_write, mem_attrs attrs, unsigned depth, bool sized);
    bool access_valid_at(hwaddr addr, hwaddr len, bool is_write, mem_attrs attrs,
                         unsigned depth) const;
    template <endianness Order>
    bool big() const noexcept {
        if constexpr (Order == endianness::native)
            return sys_->target_big_endian();
        else
            return Order == endianness::big;
    }
    /// map() beyond its inline case: several ranges, MMIO (a bounce
    /// buffer), attributes; fills `m`, or leaves it empty.
    [[gnu::noinline]] void map_slow(dma_mapping& m, const flat_view& v, hwaddr addr, hwaddr len,
                                    bool is_write, mem_attrs attrs) {
        // Through IOMMUs: the range the access lands in, the address there
        // (`at`, in view `fv`), `len` clipped to each IOMMU page on the way.
        const flat_view* fv = &v;
        hwaddr at = addr;
        const flat_range* fr;
        for (unsigned depth = 0;; ++depth) {
            fr = fv->lookup(at);
            if (!fr) return;
            iommu_memory_region* iommu = as_iommu(*fr->mr);
            if (!iommu) break;
            if (depth == iommu_max_depth) return;
            const iommu_hop h = iommu->hop(at - fr->start + fr->offset_in_region, is_write, attrs);
            if (!h.target) return;
            len = static_cast<hwaddr>(
                std::min<u128>(len, std::min<u128>(h.page_left, fr->end() - at)));
            at = h.addr;
            fv = h.target->current();
        }
        memory_region& mr = *fr->mr;
        const hwaddr xlat = at - fr->start + fr->offset_in_region;
        const bool direct = is_write ? fr->writes_direct(attrs) : fr->reads_direct();
        if (!direct && attrs.memory) return; // only RAM may answer
        m.addr_ = addr;
        m.attrs_ = attrs;
        m.is_write_ = is_write;
        if (direct) {
            std::byte* host = detail::range_host(*fr);
            if (!host) return;
            // Extend across following ranges of the same region that continue it.
            u128 done = std::min<u128>(len, fr->end() - at);
            while (done < len && u128(at) + done < u128_2_64) {
                const flat_range* next = fv->lookup(static_cast<hwaddr>(at + done));
                if (!next || next->mr != &mr || next->offset_in_region != xlat + done ||
                    (is_write ? !next->writes_direct(attrs) : !next->reads_direct()))
                    break;
                done += std::min<u128>(len - done, next->end() - next->start);
            }
            mr.dma_hold();
            m.ptr_ = host + xlat;
            m.len_ = static_cast<hwaddr>(done);
            m.mr_ = &mr;
            m.offset_ = xlat;
            return;
        }
        // Bounce: take what is left of the budget, up to `len` and to the end
        // of this range (QEMU clips it there too).
        len = static_cast<hwaddr>(std::min<u128>(len, fr->end() - at));
        std::size_t used = bounce_used_.load(std::memory_order_relaxed);
        std::size_t take;
        for (;;) {
            const std::size_t max = max_bounce_.load(std::memory_order_relaxed);
            const std::size_t left = used < max ? max - used : 0;
            take = static_cast<std::size_t>(std::min<u128>(len, left));
            if (take == 0) return;
            if (bounce_used_.compare_exchange_weak(used, used + take, std::memory_order_acq_rel))
                break;
        }
        // From here the mapping is whole at every step: if the pre-read throws,
        // its destructor gives back the buffer, the budget and the region.
        m.ptr_ = static_cast<std::byte*>(::operator new(take));
        m.len_ = take;
        m.bounce_ = true;
        m.as_ = this;
        bounce_mappings_.fetch_add(1, std::memory_order_relaxed);
        mr.dma_hold();
        m.mr_ = &mr;
        if (!is_write) access_slow(v, addr, m.ptr_, take, false, attrs);
    }
    void notify_map_clients();
    void end_bounce(dma_mapping& m, hwaddr access_len);
    static void end_direct(dma_mapping& m, hwaddr access_len) noexcept;

    std::string name_;
    ref_ptr<memory_system> sys_;
    detail::view_slot slot_;
    std::atomic<std::size_t> max_bounce_{4096};
    std::atomic<std::size_t> bounce_used_{0};
    std::atomic<std::size_t> bounce_mappings_{0}; // live bounce mappings (they use this object)
    std::mutex clients_mutex_;
    std::vector<std::pair<std::uint64_t, std::function<void()>>> clients_;
    std::uint64_t next_client_ = 1;
};

/// QEMU's memory_region_find: `addr` is relative to `mr`; it is converted to
/// an absolute address through the container chain, whose top must be the
/// root of an address space of `mr`'s memory system (otherwise the result is
/// empty), and looked up in that address space's view.
found_section memory_region_find(memory_region& mr, hwaddr addr, u128 size);

// ---- implementation ---------------------------------------------------------

inline address_space::address_space(memory_system& sys, memory_region& root, std::string name)
    : name_(std::move(name)), sys_(&sys) {
    slot_.owner = this;
    slot_.name = &name_;
    slot_.root = &root;
    sys.add_space(slot_);
}

inline address_space::~address_space() {
    QOMEM_ASSERT(slot_.listeners.empty(),
                 "address space '{}' destroyed with {} listener(s) registered", name_,
                 slot_.listeners.size());
    QOMEM_ASSERT(bounce_mappings_.load() == 0,
                 "address space '{}' destroyed with {} live bounce mapping(s)", name_,
                 bounce_mappings_.load());
    QOMEM_ASSERT(reader_caches() == 0,
                 "address space '{}' destroyed with {} CPU TLB(s) bound to it", name_,
                 reader_caches());
    sys_->remove_space(slot_);
}

inline void address_space::add_listener(memory_listener& l) { sys_->add_listener(slot_, l); }

inline void address_space::remove_listener(memory_listener& l) { sys_->remove_listener(slot_, l); }

inline dma_mapping address_space::map(hwaddr addr, hwaddr len, bool is_write, mem_attrs attrs) {
    dma_mapping m;
    if (len == 0) return m;
    rcu::read_guard g;
    const flat_view& v = *current();
    const detail::pt_entry e = detail::pt_find(detail::view_access::table_root(v), addr);
    // The common case, inline: RAM accessed directly, all of it in one range.
    if (is_write ? (e.ref & (detail::pt_tag_mask | detail::pt_writable)) == detail::pt_writable
                 : e.aux != 0 && !attrs.memory) {
        const auto* fr = reinterpret_cast<const flat_range*>(e.ref & detail::pt_pointer_mask);
        if (len - 1 <= fr->last() - addr) { // 64-bit: fr holds addr
            memory_region& mr = *fr->mr;
            mr.dma_hold();
            m.ptr_ = reinterpret_cast<std::byte*>(e.aux + addr);
            m.len_ = len;
            m.mr_ = &mr;
            m.offset_ = addr - fr->start + fr->offset_in_region;
            m.addr_ = addr;
            m.attrs_ = attrs;
            m.is_write_ = is_write;
            return m;
        }
    }
    map_slow(m, v, addr, len, is_write, attrs);
    return m;
}

inline void address_space::unmap(dma_mapping& m, hwaddr access_len) {
    QOMEM_ASSERT(m.ptr_ && (m.bounce_ ? m.as_ == this : true),
                 "unmap of a mapping that is not a live mapping of '{}'", name_);
    QOMEM_ASSERT(access_len <= m.len_, "unmap access_len {} exceeds the mapped length {}",
                 access_len, m.len_);
    if (m.bounce_)
        end_bounce(m, access_len);
    else
        end_direct(m, access_len);
}

inline void address_space::end_direct(dma_mapping& m, hwaddr access_len) noexcept {
    memory_region* mr = std::exchange(m.mr_, nullptr);
    m.ptr_ = nullptr;
    m.as_ = nullptr;
    if (m.is_write_ && access_len) mr->mark_dirty(m.offset_, access_len);
    m.len_ = 0;
    mr->dma_release();
}

inline void address_space::end_bounce(dma_mapping& m, hwaddr access_len) {
    // Everything the mapping holds is given back even if the write-back
    // throws (an MMIO callback): the buffer, the budget, the region.
    struct release {
        address_space* as;
        std::byte* ptr;
        std::size_t len;
        memory_region* mr;
        ~release() {
            ::operator delete(ptr);
            as->bounce_used_.fetch_sub(len, std::memory_order_acq_rel);
            as->bounce_mappings_.fetch_sub(1, std::memory_order_relaxed);
            mr->dma_release();
        }
    } r{this, std::exchange(m.ptr_, nullptr), static_cast<std::size_t>(std::exchange(m.len_, 0)),
        std::exchange(m.mr_, nullptr)};
    m.as_ = nullptr;
    if (m.is_write_ && access_len) write(m.addr_, r.ptr, access_len, m.attrs_);
    notify_map_clients();
}

inline void dma_mapping::end() {
    if (bounce_)
        as_->end_bounce(*this, is_write_ ? len_ : 0);
    else
        address_space::end_direct(*this, is_write_ ? len_ : 0);
}

// Not noexcept (see dma.hpp): ending the old mapping may write back through MMIO.
// NOLINTNEXTLINE(performance-noexcept-move-constructor)
inline dma_mapping& dma_mapping::operator=(dma_mapping&& o) {
    if (this != &o) {
        if (ptr_) end();
        take(o);
    }
    return *this;
}

inline dma_mapping::~dma_mapping() {
    if (ptr_) end(); // a direct mapping never touches its address space here
}

inline std::uint64_t address_space::register_map_client(std::function<void()> retry) {
    std::lock_guard lock(clients_mutex_);
    const std::uint64_t id = next_client_++;
    clients_.emplace_back(id, std::move(retry));
    return id;
}

inline void address_space::unregister_map_client(std::uint64_t id) {
    std::lock_guard lock(clients_mutex_);
    std::erase_if(clients_, [&](const auto& c) { return c.first == id; });
}

inline void address_space::notify_map_clients() {
    std::vector<std::pair<std::uint64_t, std::function<void()>>> due;
    {
        std::lock_guard lock(clients_mutex_);
        due.swap(clients_);
    }
    for (auto& [id, fn] : due) fn();
}

inline found_section address_space::find(hwaddr addr, u128 size) const {
    if (size == 0) return {};
    rcu::read_guard g;
    const flat_view& v = *current();
    const std::size_t i = v.first_ending_after(addr);
    if (i == v.ranges().size()) return {};
    const flat_range& r = v.ranges()[i];
    const u128 end = std::min<u128>(u128(addr) + size, u128_2_64);
    if (u128(r.start) >= end) return {};
    const hwaddr start = std::max(addr, r.start);
    memory_section s = detail::section_of(r);
    s.offset_within_address_space = start;
    s.offset_within_region = r.offset_in_region + (start - r.start);
    s.size = std::min(end, r.end()) - start;
    return found_section(s);
}

inline memtx_result address_space::set(hwaddr addr, std::uint8_t c, hwaddr len, mem_attrs attrs) {
    std::byte chunk[512];
    std::memset(chunk, c, sizeof chunk);
    memtx_result r = memtx_ok;
    u128 cursor = addr;
    const u128 end = u128(addr) + len;
    while (cursor < end) {
        if (cursor >= u128_2_64) return r | memtx_decode_error; // past the end of the space
        const auto a = static_cast<hwaddr>(cursor);
        // RAM pages are set with memset; anything else in writes of a chunk.
        {
            rcu::read_guard g;
            const flat_view& v = *current();
            const flat_range* fr = v.lookup(a);
            // (Not a file that may shrink: write() copies it under a guard.)
            if (fr && fr->writes_direct(attrs) && (!attrs.memory || fr->mr->is_ram()) &&
                !fr->mr->backing_may_shrink()) {
                if (std::byte* host = detail::range_host(*fr)) {
                    const u128 n = std::min(end, fr->end()) - cursor;
                    const hwaddr off = a - fr->start + fr->offset_in_region;
                    std::memset(host + off, c, static_cast<std::size_t>(n));
                    fr->mr->mark_dirty(off, static_cast<hwaddr>(n));
                    cursor += n;
                    continue;
                }
            }
        }
        const auto n = static_cast<std::size_t>(std::min<u128>(end - cursor, sizeof chunk));
        r |= write(a, chunk, n, attrs);
        cursor += n;
    }
    return r;
}

inline found_section address_space::translate(hwaddr addr, hwaddr& len, bool is_write,
                                              mem_attrs attrs) const {
    rcu::read_guard g;
    const flat_view* fv = current();
    const flat_range* fr = fv->lookup(addr);
    // QEMU's address_space_translate_iommu loop: through each IOMMU to the
    // address it translates to, `len` clipped to its page.
    for (unsigned depth = 0; fr && fr->mr->is_iommu(); ++depth) {
        if (depth == iommu_max_depth) return {};
        const iommu_hop h = static_cast<iommu_memory_region&>(*fr->mr).hop(
            addr - fr->start + fr->offset_in_region, is_write, attrs);
        if (h.page_left < len) len = static_cast<hwaddr>(h.page_left);
        if (!h.target) return {};
        addr = h.addr;
        fv = h.target->current();
        fr = fv->lookup(addr);
    }
    const flat_view& v = *fv;
    if (!fr) {
        const flat_range* next = v.next_after(addr);
        const u128 hole = (next ? u128(next->start) : u128_2_64) - addr;
        if (hole < len) len = static_cast<hwaddr>(hole);
        return {};
    }
    memory_section s = detail::section_of(*fr);
    s.offset_within_address_space = addr;
    s.offset_within_region = fr->offset_in_region + (addr - fr->start);
    s.size = fr->end() - addr;
    const bool direct = !(attrs.memory && !fr->mr->is_ram()) &&
                        (is_write ? fr->writes_direct(attrs) : fr->reads_direct());
    if (direct && s.size < len) len = static_cast<hwaddr>(s.size);
    return found_section(s);
}

inline bool address_space::access_valid_at(hwaddr addr, hwaddr len, bool is_write, mem_attrs attrs,
                                           unsigned depth) const {
    const u128 end = u128(addr) + len;
    if (end > u128_2_64) return false;
    rcu::read_guard g;
    const flat_view& v = *current();
    for (u128 cursor = addr; cursor < end;) {
        const auto a = static_cast<hwaddr>(cursor);
        const flat_range* fr = v.lookup(a);
        if (!fr) return false;
        const u128 n = std::min(end, fr->end()) - cursor;
        if (iommu_memory_region* iommu = as_iommu(*fr->mr)) {
            // Page by page: each must permit the access, and its target accept it.
            if (depth == iommu_max_depth) return false;
            hwaddr off = a - fr->start + fr->offset_in_region;
            for (u128 left = n; left > 0;) {
                const iommu_hop h = iommu->hop(off, is_write, attrs);
                const u128 piece = std::min(left, h.page_left);
                if (!h.target || !h.target->access_valid_at(h.addr, static_cast<hwaddr>(piece),
                                                            is_write, attrs, depth + 1))
                    return false;
                off += static_cast<hwaddr>(piece);
                left -= piece;
            }
            cursor += n;
            continue;
        }
        const memory_region& mr = *fr->mr;
        if (attrs.memory && !mr.is_ram()) return false;
        const bool direct = is_write ? fr->writes_direct(attrs) : fr->reads_direct();
        if (direct || mr.is_ram_device()) {
            if (!(direct ? detail::range_host(*fr) : mr.host_ptr_if_mapped())) return false;
        } else if (!(is_write && mr.is_plain_ram())) { // a ROM ignores writes: valid
            hwaddr off = a - fr->start + fr->offset_in_region;
            for (u128 left = n; left > 0;) {
                const unsigned l = detail::mmio_access_size(mr, off, left);
                if (detail::mmio_refusal(mr, off, l, is_write, attrs)) return false;
                off += l;
                left -= l;
            }
        }
        cursor += n;
    }
    return true;
}

inline memtx_result address_space::access_through(const flat_view& v, hwaddr addr, std::byte* buf,
                                                  u128 len, bool is_write, mem_attrs attrs,
                                                  unsigned depth) const {
    // detail::access_view, but an IOMMU range goes to iommu_access.
    const bool big = sys_->target_big_endian();
    memtx_result r = memtx_ok;
    u128 cursor = addr;
    while (len > 0) {
        if (cursor >= u128_2_64) { // past the end of the 64-bit space
            if (!is_write) std::memset(buf, 0, static_cast<std::size_t>(len));
            return r | memtx_decode_error;
        }
        const auto a = static_cast<hwaddr>(cursor);
        const flat_range* fr = v.lookup(a);
        if (!fr) {
            const flat_range* next = v.next_after(a);
            const u128 n = std::min(len, (next ? u128(next->start) : u128_2_64) - cursor);
            if (!is_write) std::memset(buf, 0, static_cast<std::size_t>(n));
            r |= memtx_decode_error;
            buf += static_cast<std::size_t>(n);
            cursor += n;
            len -= n;
            continue;
        }
        const u128 n = std::min(len, fr->end() - cursor);
        const hwaddr offset = a - fr->start + fr->offset_in_region;
        if (fr->mr->is_iommu()) [[unlikely]]
            r |= iommu_access(*fr, offset, buf, n, is_write, attrs, depth, false);
        else
            r |= detail::access_range(*fr, offset, buf, n, is_write, attrs, big);
        buf += static_cast<std::size_t>(n);
        cursor += n;
        len -= n;
    }
    return r;
}

inline memtx_result address_space::access_sized(const flat_view& v, hwaddr addr, std::byte* bytes,
                                                unsigned size, bool is_write, mem_attrs attrs,
                                                unsigned depth) const {
    const flat_range* fr = v.lookup(addr);
    if (fr && size - 1 <= fr->last() - addr) {
        const hwaddr offset = addr - fr->start + fr->offset_in_region;
        if (fr->mr->is_iommu()) [[unlikely]]
            return iommu_access(*fr, offset, bytes, size, is_write, attrs, depth, true);
        return detail::access_range(*fr, offset, bytes, size, is_write, attrs,
                                    sys_->target_big_endian(), true);
    }
    return access_through(v, addr, bytes, size, is_write, attrs, depth);
}

inline memtx_result address_space::iommu_access(const flat_range& fr, hwaddr offset, std::byte* buf,
                                                u128 len, bool is_write, mem_attrs attrs,
                                                unsigned depth, bool sized) {
    auto& iommu = static_cast<iommu_memory_region&>(*fr.mr);
    memtx_result r = memtx_ok;
    while (len > 0) {
        const iommu_hop h = iommu.hop(offset, is_write, attrs);
        const u128 n = std::min(len, h.page_left);
        const bool one_access = sized && n == len; // a typed access inside one page
        sized = false;
        const char* fault = h.fault;
        if (!fault && depth + 1 > iommu_max_depth) fault = "too many IOMMUs on the way (a loop?)";
        if (fault) {
            if (log_enabled(log_category::guest_errors))
                log_line(log_category::guest_errors,
                         fmt::format("IOMMU fault: {} at iova 0x{:X}, size {}, region '{}', "
                                     "reason: {}",
                                     is_write ? "write" : "read", offset,
                                     static_cast<std::uint64_t>(n), iommu.region_name(), fault));
            if (!is_write) std::memset(buf, 0, static_cast<std::size_t>(n));
            r |= memtx_decode_error;
        } else {
            rcu::read_guard g; // the target's view, for this piece
            const flat_view& tv = *h.target->current();
            r |= one_access
                     ? h.target->access_sized(tv, h.addr, buf, static_cast<unsigned>(n), is_write,
                                              attrs, depth + 1)
                     : h.target->access_through(tv, h.addr, buf, n, is_write, attrs, depth + 1);
        }
        buf += static_cast<std::size_t>(n);
        offset += static_cast<hwaddr>(n);
        len -= n;
    }
    return r;
}

inline found_section memory_region_find(memory_region& mr, hwaddr addr, u128 size) {
    u128 abs = u128(addr) + mr.addr();
    const memory_region* top = &mr;
    while (top->container()) {
        top = top->container();
        abs += top->addr();
    }
    if (abs >= u128_2_64 || !top->system()) return {};
    const address_space* found = nullptr;
    top->system()->for_each_address_space([&](const address_space& as) {
        if (!found && &as.root() == top) found = &as;
    });
    return found ? found->find(static_cast<hwaddr>(abs), size) : found_section{};
}

} // namespace qomem
