// The page table of a flat view (detail/page_table.hpp): O(1) dispatch that
// still answers every byte exactly, shared node for node between a view and
// the view a commit splices from it.
//
// The differential and incremental tests check the table of every view they
// make against its ranges (flat_view::check_page_table) and against the
// binary search; these tests pin the shapes: sub-page ranges, aligned runs
// stored high, skipped levels, the top of the space, and how little a commit
// copies.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <qomem/address_space.hpp>
#include <qomem/detail/page_table.hpp>
#include <qomem/device.hpp>
#include <qomem/flat_view.hpp>
#include <qomem/memory_region.hpp>

#include "test_support.hpp"

namespace {

using qomem::hwaddr;
using qomem::u128;
using qomem_test::board;
using qomem_test::null_regs;

/// Every node reachable from a view's page table.
std::set<const void*> nodes_of(const qomem::flat_view& v) {
    std::set<const void*> out;
    std::vector<qomem::detail::pt_entry> todo{qomem::detail::view_access::table_root(v)};
    while (!todo.empty()) {
        const qomem::detail::pt_entry e = todo.back();
        todo.pop_back();
        if (!e.is_node()) continue;
        const auto* n = reinterpret_cast<const qomem::detail::pt_node*>(e.ref - qomem::detail::pt_tag_node);
        out.insert(n);
        for (const qomem::detail::pt_entry& s : n->slot) todo.push_back(s);
    }
    return out;
}

/// lookup() through the table agrees with the binary search at `a`.
bool agrees(const qomem::flat_view& v, hwaddr a) { return v.lookup(a) == v.lookup_by_search(a); }

} // namespace

TEST_CASE("page table: a page shared by several ranges dispatches every byte to its own range, "
          "and reads through it return each range's bytes",
          "[page_table]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    null_regs ops;
    board b;
    auto ram = qomem::make_ram(*b.dev, "ram", 0x3000);
    std::memset(ram->host_ptr(), 0x11, 0x3000);
    auto small = qomem::make_ram(*b.dev, "small", 0x20); // 32 bytes inside page 1
    std::memset(small->host_ptr(), 0x22, 0x20);
    auto reg = qomem::make_io(*b.dev, "reg", 1, ops); // one byte
    b.sys->add_subregion(0x10000, *ram);
    b.sys->add_subregion(0x11100, *small, 1);
    b.sys->add_subregion(0x117ff, *reg, 1);
    qomem::address_space as(*b.sys, "memory");

    const auto v = as.view();
    CHECK(v->check_page_table().empty());
    for (hwaddr a = 0x10000 - 16; a < 0x13000 + 16; ++a) {
        INFO(fmt::format("at {:#x}", a));
        REQUIRE(agrees(*v, a));
    }
    CHECK(v->lookup(0x110ff)->mr == ram.get());
    CHECK(v->lookup(0x11100)->mr == small.get());
    CHECK(v->lookup(0x1111f)->mr == small.get());
    CHECK(v->lookup(0x11120)->mr == ram.get());
    CHECK(v->lookup(0x117ff)->mr == reg.get());
    CHECK(v->lookup(0x11800)->mr == ram.get());
    CHECK(v->lookup(0x13000) == nullptr);

    // A read of the shared page crosses all three.
    std::uint8_t buf[0x30];
    CHECK(as.read(0x110f8, buf, sizeof buf) == qomem::memtx_ok);
    CHECK(qomem_test::hex_bytes(buf, 10) == "11 11 11 11 11 11 11 11 22 22");
    CHECK(buf[0x28] == 0x11);
    std::uint8_t one = 0xff;
    CHECK(as.read(0x117ff, &one, 1) == qomem::memtx_ok);
    CHECK(one == 0);

    b.sys->del_subregion(*ram);
    b.sys->del_subregion(*small);
    b.sys->del_subregion(*reg);
}

TEST_CASE("page table: a range covering aligned runs is stored in a few high slots, and a lookup "
          "reaches it in one or two levels",
          "[page_table]") {
    qomem_test::leak_check leaks;
    board b;
    // 4 GiB of RAM at 0 (reserved lazily, never touched here), 2 MiB of
    // RAM at 1 TiB, and nothing else.
    auto ram = qomem::make_ram(*b.dev, "ram", u128(4) << 30);
    auto far = qomem::make_ram(*b.dev, "far", 2 << 20);
    b.sys->add_subregion(0, *ram);
    b.sys->add_subregion(hwaddr(1) << 40, *far);
    qomem::address_space as(*b.sys, "memory");
    const auto v = as.view();
    CHECK(v->check_page_table().empty());
    // The RAM is four slots of the level-30 node; the far RAM one slot of a
    // level-21 node reached over skipped levels: a handful of nodes, not
    // the 2,048 leaves per 4 GiB a table of pages would need.
    CHECK(v->page_table_nodes() <= 4);
    for (hwaddr a : {hwaddr(0), hwaddr(0x1234'5678), (hwaddr(4) << 30) - 1, hwaddr(4) << 30,
                     (hwaddr(1) << 40) - 1, hwaddr(1) << 40, (hwaddr(1) << 40) + (2 << 20) - 1,
                     (hwaddr(1) << 40) + (2 << 20), ~hwaddr(0)})
        CHECK(agrees(*v, a));
    CHECK(v->lookup((hwaddr(4) << 30) - 1)->mr == ram.get());
    CHECK(v->lookup(hwaddr(4) << 30) == nullptr);
    CHECK(v->lookup((hwaddr(1) << 40) + 5)->mr == far.get());
    b.sys->del_subregion(*ram);
    b.sys->del_subregion(*far);
}

TEST_CASE("page table: addresses outside a node reached over skipped levels are holes, "
          "including ones whose low bits match a mapped page",
          "[page_table]") {
    qomem_test::leak_check leaks;
    board b;
    auto ram = qomem::make_ram(*b.dev, "ram", 0x4000);
    b.sys->add_subregion(0x1000'0000, *ram);
    qomem::address_space as(*b.sys, "memory");
    const auto v = as.view();
    CHECK(v->page_table_nodes() == 1); // one leaf, straight under the root
    CHECK(v->lookup(0x1000'0000)->mr == ram.get());
    CHECK(v->lookup(0x1000'3fff)->mr == ram.get());
    // Same index bits in the leaf, other high bits: not the RAM.
    for (hwaddr a : {hwaddr(0x0000'0000), hwaddr(0x1020'0000), hwaddr(0x9000'0000),
                     hwaddr(0x1'1000'0000), hwaddr(0x8000'0000'1000'0000)})
        CHECK(v->lookup(a) == nullptr);
    b.sys->del_subregion(*ram);
}

TEST_CASE("page table: regions of 2^64 bytes and regions ending at 2^64 dispatch at both ends of "
          "the space",
          "[page_table]") {
    qomem_test::leak_check leaks;
    null_regs ops;
    board b;
    auto everything = qomem::make_io(*b.dev, "everything", qomem::u128_2_64, ops);
    auto top = qomem::make_io(*b.dev, "top", 0x1800, ops);
    b.sys->add_subregion(0, *everything);
    b.sys->add_subregion(~hwaddr(0) - 0x17ff, *top, 1); // ends exactly at 2^64, mid-page start
    qomem::address_space as(*b.sys, "memory");
    const auto v = as.view();
    CHECK(v->check_page_table().empty());
    CHECK(v->lookup(0)->mr == everything.get());
    CHECK(v->lookup(~hwaddr(0) - 0x1800)->mr == everything.get());
    CHECK(v->lookup(~hwaddr(0) - 0x17ff)->mr == top.get());
    CHECK(v->lookup(~hwaddr(0))->mr == top.get());
    b.sys->del_subregion(*top);
    CHECK(as.view()->lookup(~hwaddr(0))->mr == everything.get());
    CHECK(as.view()->check_page_table().empty());
    b.sys->del_subregion(*everything);
    CHECK(as.view()->lookup(0) == nullptr);
    CHECK(as.view()->page_table_nodes() == 0);
}

TEST_CASE("page table: a commit that adds one region among a thousand copies only the nodes on "
          "its path, shares the rest, and leaves a table naming only the new view's ranges",
          "[page_table][incremental]") {
    qomem_test::leak_check leaks;
    board b;
    std::vector<qomem::ref_ptr<qomem::memory_region>> regions;
    {
        qomem::memory_transaction tx;
        for (int i = 0; i < 1000; ++i) {
            regions.push_back(qomem::make_ram(*b.dev, fmt::format("r{}", i), 0x1000));
            b.sys->add_subregion(0x1000'0000 + hwaddr(i) * 0x2000, *regions.back());
        }
    }
    qomem::address_space as(*b.sys, "memory");
    auto probe = qomem::make_ram(*b.dev, "probe", 0x1000);

    const auto before = as.view();
    const std::set<const void*> old_nodes = nodes_of(*before);
    b.sys->add_subregion(0x1000'0000 + 500 * 0x2000 + 0x1000, *probe); // in a hole
    const auto after = as.view();
    REQUIRE(after.get() != before.get());
    CHECK(after->check_page_table().empty());
    const std::set<const void*> new_nodes = nodes_of(*after);
    std::size_t copied = 0;
    for (const void* n : new_nodes) copied += old_nodes.count(n) ? 0 : 1;
    INFO(fmt::format("{} nodes before, {} after, {} of them new", old_nodes.size(), new_nodes.size(), copied));
    CHECK(old_nodes.size() >= 3);
    CHECK(copied <= 3); // the path from the root to the leaf of the probe's page
    CHECK(copied < new_nodes.size());
    CHECK(after->lookup(0x1000'0000 + 500 * 0x2000 + 0x1000)->mr == probe.get());
    CHECK(before->lookup(0x1000'0000 + 500 * 0x2000 + 0x1000) == nullptr); // the old view is intact

    b.sys->del_subregion(*probe);
    CHECK(as.view()->check_page_table().empty());
    CHECK(as.view()->lookup(0x1000'0000 + 500 * 0x2000 + 0x1000) == nullptr);
    for (auto& r : regions) b.sys->del_subregion(*r);
}
