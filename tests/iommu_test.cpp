// tests/iommu_test.cpp — IOMMU memory regions (iommu.hpp): accesses through
// an address space whose root holds an IOMMU region are translated page by
// page into a target address space (read, write, typed accessors, set, map,
// translate, access_valid, a region cache, a CPU TLB); faults are
// memtx_result errors; notifiers see exactly the events of their range and
// flags; replay; nested IOMMUs; a translation loop ends in an error.
//
// The model IOMMU keeps its page table in guest RAM, as a real one does: a
// one-level table of 8-byte entries, one per 4 KiB IOVA page, each
// `physical page | W << 1 | R`, read with the guest's own accessors at every
// translation. Its map/unmap helpers play the guest driver (write the entry)
// and the IOMMU's invalidation (notify).

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <qomem/address_space.hpp>
#include <qomem/device.hpp>
#include <qomem/iommu.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/memory_region_cache.hpp>
#include <qomem/mtree.hpp>
#include <qomem/object.hpp>
#include <qomem/pci.hpp>
#include <qomem/tlb.hpp>

#include "test_support.hpp"

namespace {

using qomem::hwaddr;
using qomem::iommu_access;
using qomem::iommu_memory_region;
using qomem::iommu_notifier;
using qomem::iommu_tlb_entry;
using qomem::iommu_tlb_event;
using qomem_test::live_count;

constexpr hwaddr page = 0x1000;
constexpr hwaddr table_base = 0x80000; // in guest RAM

/// The model IOMMU: a table of `pages` entries at `table` of `table_as`,
/// translating into `target`. Entries have the page size `1 << page_bits`.
struct table_iommu : qomem::iommu_ops {
    qomem::address_space* table_as = nullptr;
    hwaddr table = table_base;
    qomem::address_space* target = nullptr;
    std::uint64_t pages = 64;
    unsigned page_bits = 12;
    std::vector<std::string> flag_changes;
    bool refuse_flags = false;
    int translations = 0;

    hwaddr mask() const { return (hwaddr(1) << page_bits) - 1; }

    iommu_tlb_entry translate(iommu_memory_region&, hwaddr iova, iommu_access,
                              int /*iommu_idx*/) override {
        ++translations;
        iommu_tlb_entry e{target, iova & ~mask(), 0, mask(), iommu_access::none};
        const hwaddr index = iova >> page_bits;
        if (index >= pages) return e;
        std::uint64_t pte = 0;
        if (table_as->ldq_le(table + 8 * index, pte) != qomem::memtx_ok) return e;
        e.translated_addr = pte & ~mask();
        e.perm = static_cast<iommu_access>(pte & 3);
        return e;
    }
    void notify_flag_changed(iommu_memory_region&, qomem::iommu_notifier_flags old_flags,
                             qomem::iommu_notifier_flags new_flags) override {
        if (refuse_flags) throw qomem::region_error("this IOMMU sends no notifications");
        flag_changes.push_back(std::to_string(old_flags) + "->" + std::to_string(new_flags));
    }

    /// The guest maps `iova` to `pa`; the IOMMU announces it.
    void map(iommu_memory_region& mr, hwaddr iova, hwaddr pa, iommu_access perm) {
        REQUIRE(table_as->stq_le(table + 8 * (iova >> page_bits),
                                 pa | static_cast<std::uint64_t>(perm)) == qomem::memtx_ok);
        mr.notify(0, {qomem::iommu_notifier_map, {target, iova, pa, mask(), perm}});
    }
    /// The guest unmaps `iova`; the IOMMU invalidates it.
    void unmap(iommu_memory_region& mr, hwaddr iova) {
        REQUIRE(table_as->stq_le(table + 8 * (iova >> page_bits), 0) == qomem::memtx_ok);
        mr.notify(0, {qomem::iommu_notifier_unmap, {target, iova, 0, mask(), iommu_access::none}});
    }
};

/// Guest memory ("memory": 1 MiB of RAM at 0, the page table in it) and a
/// device's DMA address space ("dev-dma") whose root holds the IOMMU region
/// "dmar" (64 pages) at 0, translating into "memory".
struct rig {
    table_iommu unit; // outlives the region (declared first)
    qomem_test::board b;
    qomem::ref_ptr<qomem::memory_region> ram = qomem::make_ram(*b.dev, "ram", 0x100000);
    qomem::ref_ptr<qomem::memory_region> dev_root =
        qomem::make_container(nullptr, "dev-root", qomem::u128_2_64);
    qomem::ref_ptr<iommu_memory_region> dmar = qomem::make_iommu(*b.dev, "dmar", 64 * page, unit);
    std::optional<qomem::address_space> memory;
    std::optional<qomem::address_space> dma;

    rig() {
        b.sys->add_subregion(0, *ram);
        dev_root->add_subregion(0, *dmar);
        memory.emplace(*b.sys, "memory");
        dma.emplace(*dev_root, "dev-dma");
        unit.table_as = &*memory;
        unit.target = &*memory;
    }
    ~rig() {
        dma.reset();
        memory.reset();
    }
    std::byte* host(hwaddr pa) const { return ram->host_ptr() + pa; }
};

std::string event_text(const iommu_tlb_event& e) {
    const char* type = e.type == qomem::iommu_notifier_map     ? "map"
                       : e.type == qomem::iommu_notifier_unmap ? "unmap"
                                                               : "deviotlb";
    return fmt::format("{} 0x{:x}+0x{:x}->0x{:x} perm {}", type, e.entry.iova, e.entry.addr_mask,
                       e.entry.translated_addr, static_cast<unsigned>(e.entry.perm));
}

} // namespace

TEST_CASE("reads, writes, typed accesses and set through an IOMMU region land at the "
          "translated pages of the target address space",
          "[iommu][access]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    rig r;
    r.unit.map(*r.dmar, 0x2000, 0x10000, iommu_access::rw);
    r.unit.map(*r.dmar, 0x3000, 0x5000, iommu_access::rw);

    // 16 bytes across the IOVA page boundary: 8 in each physical page.
    std::uint8_t out[16];
    for (int i = 0; i < 16; ++i) out[i] = static_cast<std::uint8_t>(0xa0 + i);
    REQUIRE(r.dma->write(0x2ff8, out, 16) == qomem::memtx_ok);
    CHECK(std::memcmp(r.host(0x10ff8), out, 8) == 0);
    CHECK(std::memcmp(r.host(0x5000), out + 8, 8) == 0);
    std::uint8_t in[16] = {};
    REQUIRE(r.dma->read(0x2ff8, in, 16) == qomem::memtx_ok);
    CHECK(std::memcmp(in, out, 16) == 0);

    // Typed accessors: one access inside a page, bytes split across pages.
    REQUIRE(r.dma->stl_le(0x2010, 0x11223344u) == qomem::memtx_ok);
    std::uint32_t v = 0;
    REQUIRE(r.memory->ldl_le(0x10010, v) == qomem::memtx_ok);
    CHECK(v == 0x11223344u);
    REQUIRE(r.dma->stq_be(0x2ffc, 0x0102030405060708ull) == qomem::memtx_ok);
    std::uint64_t q = 0;
    REQUIRE(r.dma->ldq_be(0x2ffc, q) == qomem::memtx_ok);
    CHECK(q == 0x0102030405060708ull);
    CHECK(static_cast<std::uint8_t>(*r.host(0x10ffc)) == 0x01);
    CHECK(static_cast<std::uint8_t>(*r.host(0x5003)) == 0x08);

    // set() goes through write().
    REQUIRE(r.dma->set(0x3100, 0x5a, 0x10) == qomem::memtx_ok);
    CHECK(static_cast<std::uint8_t>(*r.host(0x5100)) == 0x5a);
    CHECK(static_cast<std::uint8_t>(*r.host(0x510f)) == 0x5a);
    CHECK(static_cast<std::uint8_t>(*r.host(0x5110)) == 0x00);

    // The guest remaps: the next access follows the table (nothing cached).
    r.unit.map(*r.dmar, 0x2000, 0x20000, iommu_access::rw);
    REQUIRE(r.dma->stl_le(0x2010, 0xcafef00du) == qomem::memtx_ok);
    REQUIRE(r.memory->ldl_le(0x20010, v) == qomem::memtx_ok);
    CHECK(v == 0xcafef00du);
    REQUIRE(r.memory->ldl_le(0x10010, v) == qomem::memtx_ok);
    CHECK(v == 0x11223344u);
}

TEST_CASE("translate goes through the IOMMU to the target's section, its length clipped to "
          "the page, while find (like QEMU's memory_region_find) does not translate",
          "[iommu][translate]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    rig r;
    r.unit.map(*r.dmar, 0x2000, 0x10000, iommu_access::rw);

    hwaddr len = 0x3000;
    auto s = r.dma->translate(0x2010, len, false);
    REQUIRE(s);
    CHECK(s.mr == r.ram.get());
    CHECK(s.offset_within_region == 0x10010);
    CHECK(s.offset_within_address_space == 0x10010);
    CHECK(len == 0xff0);
    s.reset();

    auto f = r.dma->find(0x2010, 4);
    REQUIRE(f);
    CHECK(f.mr == r.dmar.get());
    CHECK(f.offset_within_region == 0x2010);
    f.reset();

    CHECK(r.dma->access_valid(0x2000, 0x1000, true));
    CHECK_FALSE(r.dma->access_valid(0x2000, 0x1001, false)); // page 3 is not mapped

    // The IOMMU is a leaf of the flat view (one range), shown "i/o" as QEMU 7.2 shows it.
    const auto view = r.dma->view();
    REQUIRE(view->ranges().size() == 1);
    CHECK(view->ranges()[0].mr == r.dmar.get());
    CHECK(std::string(r.dmar->type_string()) == "i/o");
    CHECK(r.dmar->is_iommu());
    CHECK_FALSE(r.ram->is_iommu());
}

TEST_CASE("a permission fault or a missing translation is a decode error and reads zeros, "
          "never a crash, and is logged as a guest error",
          "[iommu][fault]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    qomem_test::log_capture log;
    qomem_test::scoped_log_category errors(qomem::log_category::guest_errors, true);
    rig r;
    r.unit.map(*r.dmar, 0x4000, 0x14000, iommu_access::ro);
    r.unit.map(*r.dmar, 0x5000, 0x15000, iommu_access::wo);
    std::memset(r.host(0x14000), 0x77, 8);
    std::memset(r.host(0x15000), 0x66, 8);

    std::uint32_t v = 0xffffffff;
    const std::uint32_t w = 0x12345678;
    SECTION("write to a read-only page") {
        CHECK(r.dma->write(0x4000, &w, 4) == qomem::memtx_decode_error);
        CHECK(static_cast<std::uint8_t>(*r.host(0x14000)) == 0x77);
        CHECK(r.dma->read(0x4000, &v, 4) == qomem::memtx_ok);
        CHECK(v == 0x77777777);
        CHECK_FALSE(r.dma->access_valid(0x4000, 4, true));
        CHECK(r.dma->access_valid(0x4000, 4, false));
        CHECK_FALSE(r.dma->map(0x4000, 4, true));
        REQUIRE_FALSE(log.lines().empty());
        CHECK(log.lines().back() ==
              "IOMMU fault: write at iova 0x4000, size 4, region 'dmar', reason: permission");
    }
    SECTION("read of a write-only page") {
        CHECK(r.dma->ldl_le(0x5000, v) == qomem::memtx_decode_error);
        CHECK(v == 0);
        CHECK(r.dma->stl_le(0x5000, w) == qomem::memtx_ok);
        CHECK(static_cast<std::uint8_t>(*r.host(0x15000)) == 0x78);
        CHECK_FALSE(r.dma->map(0x5000, 4, false));
    }
    SECTION("an invalid entry, and an IOVA past the table") {
        std::uint8_t buf[8];
        std::memset(buf, 0xee, sizeof buf);
        CHECK(r.dma->read(0x6000, buf, 8) == qomem::memtx_decode_error);
        for (std::uint8_t b : buf) CHECK(b == 0);
        CHECK(r.dma->write(0x6000, &w, 4) == qomem::memtx_decode_error);
        r.unit.pages = 4; // the table ends before page 4
        CHECK(r.dma->read(0x4000, &v, 4) == qomem::memtx_decode_error);
        hwaddr len = 0x3000;
        CHECK_FALSE(r.dma->translate(0x6800, len, false));
        CHECK(len == 0x800);
        REQUIRE_FALSE(log.lines().empty());
        CHECK(log.lines().back() ==
              "IOMMU fault: read at iova 0x4000, size 4, region 'dmar', reason: no translation");
    }
    SECTION("a read across a mapped and an unmapped page reads the first and zeros") {
        r.unit.map(*r.dmar, 0x3000, 0x13000, iommu_access::rw);
        std::memset(r.host(0x13ffc), 0x44, 4);
        std::uint8_t buf[8];
        CHECK(r.dma->read(0x3ffc, buf, 8) == qomem::memtx_ok); // page 4 is readable
        r.unit.unmap(*r.dmar, 0x4000);
        std::memset(buf, 0xee, sizeof buf);
        CHECK(r.dma->read(0x3ffc, buf, 8) == qomem::memtx_decode_error);
        CHECK(buf[0] == 0x44);
        CHECK(buf[3] == 0x44);
        CHECK(buf[4] == 0);
        CHECK(buf[7] == 0);
    }
    SECTION("an entry without a target address space") {
        r.unit.target = nullptr;
        CHECK(r.dma->read(0x4000, &v, 4) == qomem::memtx_decode_error);
        CHECK_FALSE(r.dma->map(0x4000, 4, false));
        REQUIRE_FALSE(log.lines().empty());
        CHECK(log.lines().back().ends_with("reason: no target address space"));
    }
}

TEST_CASE("a DMA map through an IOMMU is clipped to the translated page and holds the RAM "
          "region it lands in, and a bounce mapping through it writes back through it",
          "[iommu][map]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    rig r;
    r.unit.map(*r.dmar, 0x2000, 0x10000, iommu_access::rw);
    r.unit.map(*r.dmar, 0x3000, 0x11000, iommu_access::rw); // contiguous, still clipped

    const auto refs = r.ram->ref_count();
    auto m = r.dma->map(0x2100, 0x3000, true);
    REQUIRE(m);
    CHECK(m.data() == r.host(0x10100));
    CHECK(m.size() == 0xf00);
    CHECK(m.region() == r.ram.get());
    CHECK_FALSE(m.bounced());
    CHECK(r.ram->ref_count() == refs + 1);
    r.dma->unmap(m, 0);
    CHECK(r.ram->ref_count() == refs);

    SECTION("through an IOMMU to MMIO: a bounce buffer of the device's address space") {
        qomem_test::recording_regs<> regs;
        auto holder = qomem::make<qomem::device>();
        auto mmio = qomem::make_io(*holder, "regs", 0x1000, regs);
        r.b.sys->add_subregion(0x200000, *mmio);
        r.unit.map(*r.dmar, 0x7000, 0x200000, iommu_access::rw);
        auto bm = r.dma->map(0x7ff0, 0x100, true);
        REQUIRE(bm);
        CHECK(bm.bounced());
        CHECK(bm.size() == 0x10);
        CHECK(r.dma->bounce_buffer_in_use() == 0x10);
        std::memset(bm.data(), 0x3c, 4);
        r.dma->unmap(bm, 4); // written back to 0x200ff0 through the IOMMU
        CHECK(r.dma->bounce_buffer_in_use() == 0);
        CHECK(regs.calls == std::vector<std::string>{"w 0xff0/4=0x3c3c3c3c"});
        r.b.sys->del_subregion(*mmio);
        mmio.reset();
        holder.reset();
    }
}

TEST_CASE("an UNMAP notification while a DMA mapping through the IOMMU is live leaves the "
          "mapping's memory valid, even once the RAM leaves the map and its device goes",
          "[iommu][map][lifetime]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    rig r;
    auto nic = qomem::make<qomem::device>();
    auto ring = qomem::make_ram(*nic, "rx-ring", 0x2000);
    r.b.sys->add_subregion(0x400000, *ring);
    r.unit.map(*r.dmar, 0x2000, 0x401000, iommu_access::rw);

    std::vector<std::string> seen;
    iommu_notifier n(
        [&](iommu_notifier&, const iommu_tlb_event& e) { seen.push_back(event_text(e)); },
        qomem::iommu_notifier_unmap, 0, 64 * page - 1);
    r.dmar->register_notifier(n);

    auto m = r.dma->map(0x2000, 0x1000, true);
    REQUIRE(m);
    CHECK(m.region() == ring.get());
    r.unit.unmap(*r.dmar, 0x2000);
    CHECK(seen == std::vector<std::string>{"unmap 0x2000+0xfff->0x0 perm 0"});
    std::uint32_t v = 0;
    CHECK(r.dma->read(0x2000, &v, 4) == qomem::memtx_decode_error); // new accesses fault

    qomem::memory_region* raw = ring.get();
    r.b.sys->del_subregion(*raw);
    ring.reset();
    nic.reset();
    CHECK(raw->ref_count() == 1);          // only the mapping holds it
    std::memset(m.data(), 0xab, m.size()); // still valid memory (ASan checks)
    r.dma->unmap(m, m.size());             // frees the ring, then the nic
    CHECK(live_count("device") == 1);      // only the board's
    r.dmar->unregister_notifier(n);
}

TEST_CASE("MAP, UNMAP and DEVIOTLB_UNMAP notifiers over a range see exactly the events in "
          "their range with their flags, and the model hears of each change of their union",
          "[iommu][notifier]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    rig r;
    std::vector<std::string> maps, unmaps, both, dev;
    const auto into = [](std::vector<std::string>& to) {
        return [&to](iommu_notifier&, const iommu_tlb_event& e) { to.push_back(event_text(e)); };
    };
    iommu_notifier map_n(into(maps), qomem::iommu_notifier_map, 0x2000, 0x5fff);
    iommu_notifier unmap_n(into(unmaps), qomem::iommu_notifier_unmap, 0x3000, 0x3fff);
    iommu_notifier both_n(into(both), qomem::iommu_notifier_iotlb_events, 0, 64 * page - 1);
    iommu_notifier dev_n(into(dev), qomem::iommu_notifier_deviotlb_unmap, 0x2800, 0x37ff);

    r.dmar->register_notifier(map_n);
    r.dmar->register_notifier(unmap_n);
    r.dmar->register_notifier(both_n);
    r.dmar->register_notifier(dev_n);
    CHECK(r.dmar->notifier_flags() == qomem::iommu_notifier_all);
    CHECK(r.unit.flag_changes == std::vector<std::string>{"0->2", "2->3", "3->7"});

    r.unit.map(*r.dmar, 0x1000, 0x11000, iommu_access::ro); // outside map_n
    r.unit.map(*r.dmar, 0x3000, 0x13000, iommu_access::rw);
    r.unit.unmap(*r.dmar, 0x2000);
    r.unit.unmap(*r.dmar, 0x3000);
    r.dmar->notify(0, {qomem::iommu_notifier_deviotlb_unmap,
                       {r.unit.target, 0x2000, 0, 0x1fff, iommu_access::none}});
    r.dmar->notify(1, {qomem::iommu_notifier_map, // another index: nobody here
                       {r.unit.target, 0x3000, 0x13000, 0xfff, iommu_access::rw}});

    CHECK(maps == std::vector<std::string>{"map 0x3000+0xfff->0x13000 perm 3"});
    CHECK(unmaps == std::vector<std::string>{"unmap 0x3000+0xfff->0x0 perm 0"});
    CHECK(both == std::vector<std::string>{
                      "map 0x1000+0xfff->0x11000 perm 1", "map 0x3000+0xfff->0x13000 perm 3",
                      "unmap 0x2000+0xfff->0x0 perm 0", "unmap 0x3000+0xfff->0x0 perm 0"});
    // A device-IOTLB notifier gets the event cut to its range.
    CHECK(dev == std::vector<std::string>{"deviotlb 0x2800+0xfff->0x0 perm 0"});

    SECTION("an event crossing a MAP notifier's range is the IOMMU model's misuse") {
        CHECK_THROWS_AS(
            r.dmar->notify(0, {qomem::iommu_notifier_map,
                               {r.unit.target, 0x5000, 0x15000, 0x1fff, iommu_access::rw}}),
            qomem::assertion_failure);
        CHECK_THROWS_AS(r.dmar->notify(0, {qomem::iommu_notifier_unmap,
                                           {r.unit.target, 0x5000, 0, 0xfff, iommu_access::rw}}),
                        qomem::assertion_failure);
    }

    r.dmar->unregister_notifier(both_n);
    r.dmar->unregister_notifier(dev_n);
    CHECK(r.unit.flag_changes.back() == "7->3");
    r.dmar->unregister_notifier(map_n);
    r.dmar->unregister_notifier(unmap_n);
    CHECK(r.unit.flag_changes ==
          std::vector<std::string>{"0->2", "2->3", "3->7", "7->3", "3->1", "1->0"});
    CHECK(r.dmar->notifiers() == 0);

    SECTION("a model that refuses the flags leaves the notifier unregistered") {
        r.unit.refuse_flags = true;
        CHECK_THROWS_AS(r.dmar->register_notifier(map_n), qomem::region_error);
        CHECK(map_n.region() == nullptr);
        CHECK(r.dmar->notifiers() == 0);
    }
    SECTION("registering twice, and freeing the region with a notifier, are misuse") {
        r.dmar->register_notifier(map_n);
        CHECK_THROWS_AS(r.dmar->register_notifier(map_n), qomem::assertion_failure);
        iommu_notifier idx1(into(maps), qomem::iommu_notifier_map, 0, 0xfff, 1);
        CHECK_THROWS_AS(r.dmar->register_notifier(idx1), qomem::assertion_failure);
        r.dmar->unregister_notifier(map_n);
    }
}

TEST_CASE("replay delivers the current mappings in the notifier's range, by translating at "
          "the minimum page size unless the model replays itself",
          "[iommu][replay]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    rig r;
    r.unit.map(*r.dmar, 0x1000, 0x11000, iommu_access::ro);
    r.unit.map(*r.dmar, 0x2000, 0x12000, iommu_access::rw);
    r.unit.map(*r.dmar, 0x5000, 0x15000, iommu_access::wo);
    r.unit.map(*r.dmar, 0x9000, 0x19000, iommu_access::rw);
    r.unit.unmap(*r.dmar, 0x9000);

    std::vector<std::string> seen;
    iommu_notifier n(
        [&](iommu_notifier&, const iommu_tlb_event& e) { seen.push_back(event_text(e)); },
        qomem::iommu_notifier_map, 0x2000, 0xafff);
    r.dmar->register_notifier(n);
    r.unit.translations = 0;
    r.dmar->replay(n);
    CHECK(seen == std::vector<std::string>{"map 0x2000+0xfff->0x12000 perm 3",
                                           "map 0x5000+0xfff->0x15000 perm 2"});
    CHECK(r.unit.translations == 9); // pages 2 to 10
    r.dmar->unregister_notifier(n);
}

TEST_CASE("nested translation: an IOMMU whose target address space holds another IOMMU",
          "[iommu][nested]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    rig r;
    // Stage 2: 64 KiB pages, its table at 0x90000, into guest memory.
    table_iommu stage2;
    stage2.table_as = &*r.memory;
    stage2.table = 0x90000;
    stage2.target = &*r.memory;
    stage2.page_bits = 16;
    stage2.pages = 16;
    auto mid_root = qomem::make_container(nullptr, "mid-root", qomem::u128_2_64);
    auto s2 = qomem::make_iommu(*r.b.dev, "stage2", 16 * 0x10000, stage2);
    mid_root->add_subregion(0, *s2);
    {
        qomem::address_space mid(*mid_root, "mid");
        r.unit.target = &mid; // stage 1 (4 KiB pages) into the intermediate space

        r.unit.map(*r.dmar, 0x2000, 0x31000, iommu_access::rw); // IPA 0x31000
        stage2.map(*s2, 0x30000, 0xa0000, iommu_access::rw);    // PA 0xa1000
        REQUIRE(r.dma->stl_le(0x2010, 0x5eed5eedu) == qomem::memtx_ok);
        std::uint32_t v = 0;
        REQUIRE(r.memory->ldl_le(0xa1010, v) == qomem::memtx_ok);
        CHECK(v == 0x5eed5eedu);

        hwaddr len = 0x10000;
        auto s = r.dma->translate(0x2010, len, true);
        REQUIRE(s);
        CHECK(s.mr == r.ram.get());
        CHECK(s.offset_within_region == 0xa1010);
        CHECK(len == 0xff0); // the smaller page of the two
        s.reset();
        auto m = r.dma->map(0x2100, 0x10000, false);
        REQUIRE(m);
        CHECK(m.data() == r.host(0xa1100));
        CHECK(m.size() == 0xf00);
        r.dma->unmap(m, 0);

        // A fault at stage 2 is the access's fault.
        stage2.map(*s2, 0x30000, 0xa0000, iommu_access::ro);
        CHECK(r.dma->stl_le(0x2010, 1u) == qomem::memtx_decode_error);
        CHECK(r.dma->ldl_le(0x2010, v) == qomem::memtx_ok);
        CHECK_FALSE(r.dma->access_valid(0x2010, 4, true));
        r.unit.target = &*r.memory;
    }
    mid_root->del_subregion(*s2);
}

TEST_CASE("a translation loop (an IOMMU translating into its own address space) ends with a "
          "decode error after iommu_max_depth IOMMUs",
          "[iommu][loop]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    qomem_test::log_capture log;
    qomem_test::scoped_log_category errors(qomem::log_category::guest_errors, true);
    rig r;
    r.unit.map(*r.dmar, 0x2000, 0x2000, iommu_access::rw); // identity, into...
    r.unit.target = &*r.dma;                               // ...its own space
    r.unit.translations = 0;
    std::uint32_t v = 0xffffffff;
    CHECK(r.dma->read(0x2000, &v, 4) == qomem::memtx_decode_error);
    CHECK(v == 0);
    CHECK(r.unit.translations == static_cast<int>(qomem::iommu_max_depth) + 1);
    REQUIRE_FALSE(log.lines().empty());
    CHECK(log.lines().back().ends_with("reason: too many IOMMUs on the way (a loop?)"));
    CHECK(r.dma->stl_le(0x2000, 1u) == qomem::memtx_decode_error);
    CHECK_FALSE(r.dma->map(0x2000, 4, false));
    hwaddr len = 4;
    CHECK_FALSE(r.dma->translate(0x2000, len, false));
    CHECK_FALSE(r.dma->access_valid(0x2000, 4, false));
    r.unit.target = &*r.memory;
}

TEST_CASE("a CPU TLB and a region cache over an IOMMU translate every access: a page the "
          "guest remaps or unmaps is never used from them",
          "[iommu][tlb][cache]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    rig r;
    r.unit.map(*r.dmar, 0x2000, 0x10000, iommu_access::rw);
    std::uint32_t v = 0;
    REQUIRE(r.memory->stl_le(0x10020, 0xaaaa5555u) == qomem::memtx_ok);
    REQUIRE(r.memory->stl_le(0x20020, 0x1234abcdu) == qomem::memtx_ok);

    SECTION("TLB") {
        qomem::cpu_tlb tlb(*r.dma);
        qomem::rcu::read_guard g;
        REQUIRE(tlb.ldl_le(0x2020, v) == qomem::memtx_ok);
        CHECK(v == 0xaaaa5555u);
        REQUIRE(tlb.ldl_le(0x2020, v) == qomem::memtx_ok);
        CHECK(tlb.fills() == 0); // never cached through the IOMMU
        r.unit.map(*r.dmar, 0x2000, 0x20000, iommu_access::rw);
        REQUIRE(tlb.ldl_le(0x2020, v) == qomem::memtx_ok);
        CHECK(v == 0x1234abcdu);
        r.unit.unmap(*r.dmar, 0x2000);
        CHECK(tlb.ldl_le(0x2020, v) == qomem::memtx_decode_error);
        CHECK(tlb.stl_le(0x2020, 1u) == qomem::memtx_decode_error);
    }
    SECTION("region cache") {
        qomem::memory_region_cache c;
        CHECK(c.init(*r.dma, 0x2000, 0x100000, false) == 64 * page - 0x2000); // to the range's end
        CHECK(c.region() == r.dmar.get());
        CHECK(c.data() == nullptr);
        REQUIRE(c.ldl_le(0x20, v) == qomem::memtx_ok);
        CHECK(v == 0xaaaa5555u);
        r.unit.map(*r.dmar, 0x2000, 0x20000, iommu_access::ro);
        REQUIRE(c.ldl_le(0x20, v) == qomem::memtx_ok);
        CHECK(v == 0x1234abcdu);
        CHECK(c.stl_le(0x20, 1u) == qomem::memtx_decode_error); // read-only now
        r.unit.unmap(*r.dmar, 0x2000);
        CHECK(c.ldl_le(0x20, v) == qomem::memtx_decode_error);
        c.destroy();
    }
}

TEST_CASE("attrs_to_index picks the IOMMU index of an access, and notifiers follow one index",
          "[iommu][index]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    // Two indexes: secure accesses use a second table.
    struct two_tables : table_iommu {
        int attrs_to_index(iommu_memory_region&, qomem::mem_attrs a) override {
            return a.secure ? 1 : 0;
        }
        int num_indexes(iommu_memory_region&) override { return 2; }
        iommu_tlb_entry translate(iommu_memory_region& mr, hwaddr iova, iommu_access f,
                                  int idx) override {
            table = idx == 1 ? 0x90000 : table_base;
            return table_iommu::translate(mr, iova, f, idx);
        }
    };
    two_tables unit;
    qomem_test::board b;
    auto ram = qomem::make_ram(*b.dev, "ram", 0x100000);
    b.sys->add_subregion(0, *ram);
    auto root = qomem::make_container(nullptr, "dev-root", qomem::u128_2_64);
    auto mr = qomem::make_iommu(*b.dev, "smmu", 64 * page, unit);
    root->add_subregion(0, *mr);
    qomem::address_space memory(*b.sys, "memory");
    qomem::address_space dma(*root, "dev-dma");
    unit.table_as = &memory;
    unit.target = &memory;
    REQUIRE(memory.stq_le(table_base + 8 * 2, 0x10000 | 3) == qomem::memtx_ok);
    REQUIRE(memory.stq_le(0x90000 + 8 * 2, 0x20000 | 3) == qomem::memtx_ok);
    REQUIRE(memory.stl_le(0x10000, 0x0000aaaau) == qomem::memtx_ok);
    REQUIRE(memory.stl_le(0x20000, 0x0000bbbbu) == qomem::memtx_ok);

    std::uint32_t v = 0;
    REQUIRE(dma.ldl_le(0x2000, v) == qomem::memtx_ok);
    CHECK(v == 0xaaaau);
    qomem::mem_attrs secure;
    secure.secure = true;
    REQUIRE(dma.ldl_le(0x2000, v, secure) == qomem::memtx_ok);
    CHECK(v == 0xbbbbu);

    std::vector<std::string> seen;
    iommu_notifier n1(
        [&](iommu_notifier&, const iommu_tlb_event& e) { seen.push_back(event_text(e)); },
        qomem::iommu_notifier_map, 0, 64 * page - 1, 1);
    mr->register_notifier(n1);
    mr->replay(n1);
    CHECK(seen == std::vector<std::string>{"map 0x2000+0xfff->0x20000 perm 3"});
    mr->unregister_notifier(n1);
}

TEST_CASE("PCI functions behind an IOMMU master DMA into per-devfn address spaces, each "
          "translated by its own table (pci_device_iommu_address_space)",
          "[iommu][pci]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    // The model as intel-iommu: one table and one address space per devfn,
    // made on first use.
    struct per_device {
        table_iommu unit; // outlives its region
        qomem::ref_ptr<qomem::memory_region> root;
        qomem::ref_ptr<iommu_memory_region> mr;
        std::optional<qomem::address_space> as;
    };
    std::map<std::uint8_t, std::unique_ptr<per_device>> spaces;
    {
        qomem_test::virtio_machine r;
        auto plug = [&](const std::string& name, std::uint8_t devfn) -> qomem::pci_device& {
            auto fn = qomem::make<qomem::pci_device>();
            fn->set_devfn(devfn);
            fn->plug_into(r.host->bus());
            r.add(name, fn);
            fn->realize();
            return *fn;
        };
        qomem::pci_device& a = plug("fn-a", 0x08);
        qomem::pci_device& b = plug("fn-b", 0x10);
        CHECK(qomem::pci_device_iommu_address_space(a) == nullptr); // no IOMMU yet

        r.host->bus().set_iommu([&](qomem::pci_bus&, std::uint8_t devfn) -> qomem::address_space& {
            auto& e = spaces[devfn];
            if (!e) {
                e = std::make_unique<per_device>();
                e->unit.table_as = &*r.as;
                e->unit.target = &*r.as;
                e->unit.table = table_base + hwaddr(devfn) * page;
                const std::string name = fmt::format("vtd-{:02x}.{}", devfn >> 3, devfn & 7);
                e->root = qomem::make_container(nullptr, name, qomem::u128_2_64);
                e->mr = qomem::make_iommu(nullptr, "dmar", 64 * page, e->unit);
                e->root->add_subregion(0, *e->mr);
                e->as.emplace(*e->root, name);
            }
            return *e->as;
        });
        qomem::address_space* as_a = qomem::pci_device_iommu_address_space(a);
        qomem::address_space* as_b = qomem::pci_device_iommu_address_space(b);
        REQUIRE(as_a);
        REQUIRE(as_b);
        CHECK(as_a != as_b);
        CHECK(qomem::pci_device_iommu_address_space(a) == as_a); // made once
        CHECK(as_a->name() == "vtd-01.0");
        CHECK(as_b->name() == "vtd-02.0");

        // The same IOVA, two tables, two pages of guest memory.
        spaces[0x08]->unit.map(*spaces[0x08]->mr, 0x2000, 0x10000, iommu_access::rw);
        spaces[0x10]->unit.map(*spaces[0x10]->mr, 0x2000, 0x20000, iommu_access::ro);
        REQUIRE(as_a->stl_le(0x2004, 0xaaaa0001u) == qomem::memtx_ok);
        CHECK(as_b->stl_le(0x2004, 0xbbbb0002u) == qomem::memtx_decode_error); // read-only for b
        REQUIRE(r.as->stl_le(0x20004, 0xbbbb0003u) == qomem::memtx_ok);
        std::uint32_t v = 0;
        REQUIRE(r.as->ldl_le(0x10004, v) == qomem::memtx_ok);
        CHECK(v == 0xaaaa0001u);
        REQUIRE(as_b->ldl_le(0x2004, v) == qomem::memtx_ok);
        CHECK(v == 0xbbbb0003u);

        r.host->bus().set_iommu({});
        CHECK_FALSE(r.host->bus().has_iommu());
        CHECK(qomem::pci_device_iommu_address_space(b) == nullptr);
        for (auto& [devfn, e] : spaces) {
            e->as.reset();
            e->root->del_subregion(*e->mr);
        }
        spaces.clear();
    }
}
