// tests/mem_attrs_test.cpp — transaction attributes as QEMU's MemTxAttrs
// (memory_ops.hpp): the fields, the "unspecified" value, and every field
// reaching a device's ops unchanged through reads, writes and bounce
// mappings; attrs.memory keeping MMIO out.
#include <cstdint>
#include <vector>

#include <catch2/catch.hpp>

#include <qomem/address_space.hpp>
#include <qomem/device.hpp>
#include <qomem/memory_ops.hpp>
#include <qomem/memory_region.hpp>

#include "test_support.hpp"

namespace {

/// MMIO that records the attributes of each access.
struct attrs_regs {
    std::vector<qomem::mem_attrs> seen;
    qomem::memtx_result read(qomem::hwaddr, std::uint64_t* data, unsigned, qomem::mem_attrs a) {
        seen.push_back(a);
        *data = 0;
        return qomem::memtx_ok;
    }
    qomem::memtx_result write(qomem::hwaddr, std::uint64_t, unsigned, qomem::mem_attrs a) {
        seen.push_back(a);
        return qomem::memtx_ok;
    }
};

qomem::mem_attrs every_field() {
    qomem::mem_attrs a;
    a.secure = true;
    a.space = qomem::security_space::realm;
    a.user = true;
    a.requester_id = 0xbeef;
    a.pid = 0x5a;
    return a;
}

} // namespace

TEST_CASE("mem_attrs has QEMU's MemTxAttrs fields, all clear by default, in at most 8 bytes, "
          "mem_attrs_unspecified differs from it only in `unspecified`",
          "[attrs]") {
    STATIC_REQUIRE(sizeof(qomem::mem_attrs) <= 8);
    constexpr qomem::mem_attrs none{};
    STATIC_REQUIRE_FALSE(none.unspecified);
    STATIC_REQUIRE_FALSE(none.secure);
    STATIC_REQUIRE(none.space == qomem::security_space::secure); // 0, as QEMU's zeroed struct
    STATIC_REQUIRE_FALSE(none.user);
    STATIC_REQUIRE_FALSE(none.memory);
    STATIC_REQUIRE_FALSE(none.debug);
    STATIC_REQUIRE(none.requester_id == 0);
    STATIC_REQUIRE(none.pid == 0);
    STATIC_REQUIRE(qomem::mem_attrs_unspecified.unspecified);
    STATIC_REQUIRE(qomem::mem_attrs_unspecified != none);
    qomem::mem_attrs u = qomem::mem_attrs_unspecified;
    u.unspecified = false;
    CHECK(u == none);
    CHECK(static_cast<unsigned>(qomem::security_space::non_secure) == 1);
    CHECK(static_cast<unsigned>(qomem::security_space::root) == 2);
    CHECK(static_cast<unsigned>(qomem::security_space::realm) == 3);
    qomem::mem_attrs a = every_field();
    CHECK(a != none);
    a.pid = 0;
    CHECK(a != every_field()); // each field takes part in ==
}

TEST_CASE("every attribute reaches the device's ops unchanged: reads, writes, and a bounce "
          "mapping's pre-read and write-back, attrs.memory refuses MMIO",
          "[attrs][dispatch]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    attrs_regs regs;
    qomem_test::board b;
    auto io = qomem::make_io(*b.dev, "io", 0x100, regs);
    b.sys->add_subregion(0x1000, *io);
    qomem::address_space as(*b.sys, "memory");
    const qomem::mem_attrs want = every_field();

    std::uint32_t v = 0;
    REQUIRE(as.read(0x1000, &v, 4, want) == qomem::memtx_ok);
    REQUIRE(as.write(0x1004, &v, 4, want) == qomem::memtx_ok);
    REQUIRE(as.rw(0x1008, &v, 4, false, qomem::mem_attrs_unspecified) == qomem::memtx_ok);
    {
        auto m = as.map(0x1010, 4, false, want);
        REQUIRE(m.size() == 4);
        as.unmap(m, 0);
        auto w = as.map(0x1010, 4, true, want);
        REQUIRE(w.size() == 4);
        as.unmap(w, 4);
    }
    REQUIRE(regs.seen.size() == 5);
    CHECK(regs.seen[0] == want);
    CHECK(regs.seen[1] == want);
    CHECK(regs.seen[2] == qomem::mem_attrs_unspecified);
    CHECK(regs.seen[3] == want); // the bounce pre-read
    CHECK(regs.seen[4] == want); // the write-back

    qomem::mem_attrs mem = want;
    mem.memory = true;
    regs.seen.clear();
    CHECK(as.read(0x1000, &v, 4, mem) == qomem::memtx_access_error);
    CHECK(regs.seen.empty());
}
