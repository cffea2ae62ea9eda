// qomem/tlb.hpp — a CPU's TLB over one address space: guest pages translated
// to host pointers with read, write and execute permission, so a vCPU loads,
// stores and fetches RAM inline and sends everything else to the dispatch.
//
//     qomem::cpu_tlb tlb(memory);                      // one per vCPU thread
//     while (running) {
//         qomem::rcu::read_guard g;                     // the vCPU runs inside a
//         for (int i = 0; i < 4096 && running; ++i) {   // read section, and leaves
//             std::uint32_t insn, v;                    // it now and then
//             if (tlb.fetch<std::uint32_t, qomem::endianness::little>(pc, insn) != qomem::memtx_ok)
//                 raise_fetch_fault();
//             if (tlb.ldl_le(addr, v) != qomem::memtx_ok) raise_load_fault();
//             tlb.stl_le(addr, v);                      // ldub ... stq_be: accessors.hpp
//         }
//     }
//
// Entries. Direct-mapped, `entries` (256) for data and as many for
// instruction fetch, by guest page (4 KiB). A data entry holds the page's tag
// for reads and for writes and the addend that turns a guest address into a
// host one; a fetch entry its tag for execution and the addend. A hit is a
// load of the table pointer, an index, a compare of the tag (which keeps the
// access's alignment bits, so an unaligned access misses), and the load or
// store itself. A miss makes the access through the full dispatch (with
// every rule: MMIO ops, ROM writes ignored, holes answering a decode error,
// dirty logging, guarded copies) and fills the entry from the page table
// slot of the page when the page allows it:
//  * read and execute: RAM, ROM, a readonly alias of RAM, a ROM device in
//    ROMD mode, non-volatile RAM (non-volatility changes nothing, as in QEMU);
//  * write: writable plain RAM that logs for no dirty-log client (as the view
//    rendered it: a logged page's stores go through the dispatch, which
//    marks them dirty);
//  * never: MMIO, RAM devices, reservations, IOMMU regions (each access
//    translates through the IOMMU: iommu.hpp), holes, a page shared by several
//    ranges, RAM over a file another process may shrink (its copies are
//    guarded), a ROM device's writes, writes to ROM or through a readonly
//    alias.
//
// Invalidation. A TLB registers with its address space, whose writer, after
// publishing each new view of it (every commit that changes it: dirty
// logging switched on or off too, since ranges record their dirty-log mask),
// points the TLB at a shared table of invalid entries (one atomic store);
// the next access misses, finds the TLB invalidated, empties its own entries
// and fills them again from the current view. So a commit made by another
// thread is seen by the next access ordered after it, and a hit costs no
// more than QEMU's: one load of the table pointer, a compare of the tag, the
// load or store itself.
//
// Memory orders (the C++ model, not x86's). The writer's publish is a
// seq_cst exchange of the view, then (in the same thread, sequenced after)
// the seq_cst store of invalid_tables, then the retire of the old view. A
// miss is a seq_cst exchange of tables_ back to own_, then the seq_cst load
// of the view. All four are seq_cst, so they fall in one total order S:
//  * If the miss's view load reads the old view, it precedes the writer's
//    exchange in S, so the writer's invalidation store follows the miss's
//    exchange in S and in tables_'s modification order: the entries filled
//    from the old view are cut off by it (a later access that reads own_
//    still began in this read section, which the old view's grace period
//    waits for).
//  * If it reads the new view, the entries come from the new view; an
//    invalidation store that lands after the exchange only costs a refill.
// An entry is therefore used only inside a read section that overlapped the
// time its view was current, and the retire of that view (and the unmap of
// any region only it held) waits for the section to end: an entry never
// points to freed memory. Across read sections it is RCU's contract that
// carries this: a section that does not end before the grace period of the
// old view's retire began after that grace period started, so its loads see
// every store the writer made before retiring (the invalidation among
// them), and its first access misses. An access ordered after the publish by
// happens-before (e.g. the writer released a lock the vCPU then took) reads
// invalid_tables or later in tables_'s modification order (read-read
// coherence), so it sees the commit.
//
// Threads and lifetime. A TLB belongs to one thread. Its accesses must be
// made inside an RCU read section on that thread (asserted on every miss):
// an entry is used only while the TLB has not been invalidated, so the view
// it came from was still current inside this section, and no grace period
// can end (no region be unmapped) before the section does. The address
// space must outlive the TLB (asserted when it is destroyed).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <qomem/accessors.hpp>
#include <qomem/address_space.hpp>
#include <qomem/assert.hpp>
#include <qomem/detail/dispatch.hpp>
#include <qomem/detail/page_table.hpp>
#include <qomem/flat_view.hpp>
#include <qomem/memory_ops.hpp>
#include <qomem/memory_system.hpp>
#include <qomem/rcu.hpp>
#include <qomem/types.hpp>

namespace qomem {

class cpu_tlb : public typed_accessors<cpu_tlb>, private detail::reader_cache {
public:
    static constexpr unsigned page_bits = 12;
    static constexpr hwaddr page_size = hwaddr(1) << page_bits;
    static constexpr std::size_t entries = 256;

    /// A TLB over `as`, whose accesses carry `attrs`; registers with the
    /// memory system, which invalidates it on every change. Requires: `as`
    /// outlives it (asserted by ~address_space).
    explicit cpu_tlb(address_space& as, mem_attrs attrs = {})
        : as_(&as), attrs_(attrs), target_big_(as.system().target_big_endian()) {
        flush();
        as.add_reader_cache(*this);
    }
    ~cpu_tlb() { as_->remove_reader_cache(*this); }
    cpu_tlb(const cpu_tlb&) = delete;
    cpu_tlb& operator=(const cpu_tlb&) = delete;

    address_space& space() const noexcept { return *as_; }

    /// Loads one value of `T` (1, 2, 4 or 8 bytes) at `addr`, its bytes
    /// read in byte order `Order` (native: the target's); ldub ... ldq_be
    /// (accessors.hpp) call it. On an error `value` holds what a read of the
    /// address space would have read. Requires: inside an RCU read section.
    template <class T, endianness Order = endianness::native>
    [[gnu::always_inline]] memtx_result load(hwaddr addr, T& value) {
        const data_entry& e = current_tables()->data[index(addr)];
        if (e.read == tag<T>(addr)) [[likely]] {
            value = from_host<T, Order>(e.addend + addr);
            return memtx_ok;
        }
        const auto [r, v] = load_slow<T, Order>(addr, false);
        value = v;
        return r;
    }
    /// Stores one value of `T` at `addr` in byte order `Order`, as load().
    template <class T, endianness Order = endianness::native>
    [[gnu::always_inline]] memtx_result store(hwaddr addr, T value) {
        const data_entry& e = current_tables()->data[index(addr)];
        if (e.write == tag<T>(addr)) [[likely]] {
            to_host<T, Order>(e.addend + addr, value);
            return memtx_ok;
        }
        return store_slow<T, Order>(addr, value);
    }
    /// Fetches one value of `T` at `addr` for execution (its own entries).
    template <class T, endianness Order = endianness::native>
    [[gnu::always_inline]] memtx_result fetch(hwaddr addr, T& value) {
        const code_entry& e = current_tables()->code[index(addr)];
        if (e.exec == tag<T>(addr)) [[likely]] {
            value = from_host<T, Order>(e.addend + addr);
            return memtx_ok;
        }
        const auto [r, v] = load_slow<T, Order>(addr, true);
        value = v;
        return r;
    }

    /// Empties every entry (QEMU's tlb_flush). Not needed for correctness:
    /// the memory system invalidates the TLB on every change. Owner's thread.
    void flush() noexcept {
        for (data_entry& e : own_.data) e = {invalid, invalid, 0, 0};
        for (code_entry& e : own_.code) e = {invalid, 0};
        ++flushes_;
    }

    /// Entries filled and whole-TLB flushes so far (statistics, tests).
    std::uint64_t fills() const noexcept { return fills_; }
    std::uint64_t flushes() const noexcept { return flushes_; }

private:
    struct data_entry {
        hwaddr read;
        hwaddr write;
        std::uintptr_t addend; // host address = addend + guest address
        std::uintptr_t unused; // one entry per half cache line
    };
    struct code_entry {
        hwaddr exec;
        std::uintptr_t addend;
    };
    struct tables {
        data_entry data[entries];
        code_entry code[entries];
    };
    /// Bit 11 set: no access's tag has it (tag() clears bits 3 to 11).
    static constexpr hwaddr invalid = hwaddr(1) << 11;
    /// What an invalidated TLB reads: every entry invalid, so every access
    /// misses and the miss finds the TLB invalidated. Shared, never written.
    static constexpr tables make_invalid() noexcept {
        tables t{};
        for (data_entry& e : t.data) e = {invalid, invalid, 0, 0};
        for (code_entry& e : t.code) e = {invalid, 0};
        return t;
    }
    static const tables invalid_tables;

    /// The tables accesses read: own_, or invalid_tables once the writer
    /// invalidated this TLB. (seq_cst: a plain load on x86; ordered after
    /// the read section's start as address_space::current() is.)
    const tables* current_tables() const noexcept {
        return tables_.load(std::memory_order_seq_cst);
    }

    /// reader_cache: called by the writer after it published a new view
    /// and before it retires the old one.
    void invalidate() noexcept override {
        tables_.store(&invalid_tables, std::memory_order_seq_cst);
    }

    static std::size_t index(hwaddr addr) noexcept {
        return static_cast<std::size_t>(addr >> page_bits) & (entries - 1);
    }
    /// The page of `addr`, with the bits that make an access of T unaligned.
    template <class T>
    static hwaddr tag(hwaddr addr) noexcept {
        return addr & (~(page_size - 1) | (sizeof(T) - 1));
    }
    template <endianness Order>
    bool big() const noexcept {
        if constexpr (Order == endianness::native)
            return target_big_;
        else
            return Order == endianness::big;
    }
    template <class T, endianness Order>
    T from_host(std::uintptr_t p) const noexcept {
        T v;
        std::memcpy(&v, reinterpret_cast<const void*>(p), sizeof(T));
        if constexpr (sizeof(T) > 1)
            if (big<Order>() != detail::host_is_big_endian)
                v = static_cast<T>(detail::bswap_n(v, sizeof(T)));
        return v;
    }
    template <class T, endianness Order>
    void to_host(std::uintptr_t p, T v) const noexcept {
        if constexpr (sizeof(T) > 1)
            if (big<Order>() != detail::host_is_big_endian)
                v = static_cast<T>(detail::bswap_n(v, sizeof(T)));
        std::memcpy(reinterpret_cast<void*>(p), &v, sizeof(T));
    }

    /// On a miss: empties the TLB if the writer invalidated it, and returns
    /// the view to fill from. In a read section only.
    const flat_view& current_view() {
        QOMEM_ASSERT(rcu::in_read_section(),
                     "cpu_tlb: an access outside an RCU read section (a vCPU runs inside one)");
        // Back to our own tables before loading the view: an invalidation
        // after this exchange leaves the next access a miss again, and one
        // before it is seen here, with the view it published.
        bool flushed = false;
        if (tables_.load(std::memory_order_relaxed) != &own_ &&
            tables_.exchange(&own_, std::memory_order_seq_cst) != &own_) {
            flush();
            flushed = true;
        }
        // The writer publishes a view before it invalidates: a miss (every
        // MMIO access is one) may read the new view while the invalidation
        // has not landed. Entries from an older view are dropped then, so
        // once one access of this TLB has seen a view, no later access uses
        // an entry of an older one. (A view freed and its address reused is
        // not confused with a newer one: its retire followed the writer's
        // invalidation, which the exchange above has seen.)
        const flat_view* v = as_->current();
        if (v != seen_view_) {
            if (!flushed && seen_view_ != nullptr) flush();
            seen_view_ = v;
        }
        return *v;
    }
    /// Fills the data or code entry of `addr`'s page from slot `e`.
    void fill(hwaddr addr, const detail::pt_entry& e, bool code) noexcept {
        const auto* fr = reinterpret_cast<const flat_range*>(e.ref & detail::pt_pointer_mask);
        if (e.aux == 0 || (attrs_.memory && !fr->mr->is_ram())) return; // not read directly
        const hwaddr page = addr & ~(page_size - 1);
        ++fills_;
        if (code) {
            own_.code[index(addr)] = {page, e.aux};
            return;
        }
        own_.data[index(addr)] = {page, (e.ref & detail::pt_writable) ? page : invalid, e.aux, 0};
    }

    template <class T>
    struct loaded {
        memtx_result result;
        T value;
    };
    template <class T, endianness Order>
    [[gnu::noinline]] loaded<T> load_slow(hwaddr addr, bool code) {
        static_assert(std::is_unsigned_v<T> && sizeof(T) <= 8,
                      "an unsigned integer of 1 to 8 bytes");
        const flat_view& v = current_view();
        const detail::pt_entry e = detail::pt_find(detail::view_access::table_root(v), addr);
        fill(addr, e, code);
        std::byte bytes[sizeof(T)];
        const memtx_result r = as_->access_sized(v, addr, bytes, sizeof(T), false, attrs_);
        return {r, static_cast<T>(detail::load_ordered(bytes, sizeof(T), big<Order>()))};
    }
    template <class T, endianness Order>
    [[gnu::noinline]] memtx_result store_slow(hwaddr addr, T value) {
        static_assert(std::is_unsigned_v<T> && sizeof(T) <= 8,
                      "an unsigned integer of 1 to 8 bytes");
        const flat_view& v = current_view();
        const detail::pt_entry e = detail::pt_find(detail::view_access::table_root(v), addr);
        fill(addr, e, false);
        std::byte bytes[sizeof(T)];
        detail::store_ordered(bytes, sizeof(T), value, big<Order>());
        return as_->access_sized(v, addr, bytes, sizeof(T), true, attrs_);
    }

    std::atomic<const tables*> tables_{&invalid_tables};
    tables own_;
    const flat_view* seen_view_ = nullptr; // the view the entries came from (owner only)
    address_space* as_;
    mem_attrs attrs_;
    bool target_big_;
    std::uint64_t fills_ = 0;
    std::uint64_t flushes_ = 0;
};

inline constexpr cpu_tlb::tables cpu_tlb::invalid_tables = cpu_tlb::make_invalid();

} // namespace qomem
