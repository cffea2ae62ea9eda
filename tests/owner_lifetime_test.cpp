// The owners' rule on every path (issue 10): an owner — a device or any
// other object, in the tree or not — is finalized after every region of its
// that something beyond the owner still holds, and no region outlives its
// owner while pointing into it. Each scenario records the finalization order
// with a lifetime observer and runs under ASan+UBSan in CI, where a region
// left pointing into a freed owner is a heap-use-after-free.
#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <qomem/address_space.hpp>
#include <qomem/device.hpp>
#include <qomem/log.hpp>
#include <qomem/machine.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/memory_system.hpp>
#include <qomem/mtree.hpp>
#include <qomem/object.hpp>

#include "test_support.hpp"

using namespace qomem;
using qomem_test::event_recorder;
using qomem_test::leak_check;
using qomem_test::live_count;
using qomem_test::only;

namespace {

/// A device whose registers read back a value of its own: a read that
/// reaches a freed device is a use-after-free ASan reports.
class reg_device : public device {
    QOMEM_OBJECT(reg_device, "reg-device", device)
public:
    struct regs {
        std::uint32_t value = 0x5a5a5a5a;
        std::uint64_t read(hwaddr, unsigned) { return value; }
        void write(hwaddr, std::uint64_t v, unsigned) { value = static_cast<std::uint32_t>(v); }
    } ops;
};

/// QEMU's virtio-gpu host-memory blob: a plain object (not a device) that
/// owns the memory behind its RAM region.
class blob : public object {
    QOMEM_OBJECT(blob, "gpu-blob", object)
public:
    std::array<std::uint8_t, 4096> mem{};
};

/// A device whose constructor makes and maps a region, then fails.
class failing_device : public device {
    QOMEM_OBJECT(failing_device, "failing-device", device)
public:
    explicit failing_device(memory_region& sys) {
        auto io = make_io(*this, "failing-io", 0x100, ops);
        sys.add_subregion(0x3000, *io);
        throw std::runtime_error("the device's constructor failed after mapping its region");
    }
    reg_device::regs ops;
};

std::uint32_t read32(address_space& as, hwaddr addr, memtx_result* res = nullptr) {
    std::uint32_t v = 0;
    const memtx_result r = as.read(addr, &v, sizeof v);
    if (res) *res = r;
    return v;
}

} // namespace

TEST_CASE("owners' rule: a device never added to the tree outlives its mapped MMIO region, "
          "and guest reads reach the live device",
          "[lifetime][owner]") {
    leak_check leaks;
    event_recorder rec;
    auto sys = make_container(nullptr, "sys", u128_2_64);
    {
        auto as = memory_system::make();
        address_space space(*as, *sys, "m");
        auto d = make<reg_device>();
        rec.label(*d, "dev");
        auto io = make_io(*d, "io", 0x100, d->ops);
        rec.label(*io, "io");
        memory_region* iop = io.get();
        sys->add_subregion(0x1000, *io);
        io.reset();
        d.reset(); // the device's last outside reference: io is still mapped

        CHECK(live_count("reg-device") == 1);
        CHECK(only(rec.events(), "finalizing ").empty());
        CHECK(iop->parent() == nullptr); // unparented: io now holds the device
        CHECK(read32(space, 0x1000) == 0x5a5a5a5a);

        sys->del_subregion(*iop);
        as->synchronize(); // the views that showed io are released
        CHECK(only(rec.take(), "finalizing ") ==
              std::vector<std::string>{"finalizing io", "finalizing dev"});
        memtx_result r{};
        read32(space, 0x1000, &r);
        CHECK(r == memtx_decode_error);
    }
}

TEST_CASE("owners' rule: a device never added to the tree, with an unmapped region, is freed "
          "with it at once",
          "[lifetime][owner]") {
    leak_check leaks;
    event_recorder rec;
    auto d = make<reg_device>();
    rec.label(*d, "dev");
    auto io = make_io(*d, "io", 0x100, d->ops);
    rec.label(*io, "io");
    io.reset();
    d.reset();
    // Nothing beyond the device held io: both go now, the region released
    // by its owner's finalization.
    CHECK(only(rec.take(), "finalizing ") == std::vector<std::string>{"finalizing dev", "finalizing io"});
}

TEST_CASE("owners' rule: a non-device owner (a GPU blob) unparented while its RAM region is "
          "DMA-mapped lives until the unmap; the DMA reads the blob's memory",
          "[lifetime][owner][dma]") {
    leak_check leaks;
    event_recorder rec;
    auto sys = make_container(nullptr, "sys", u128_2_64);
    auto ms = memory_system::make();
    address_space space(*ms, *sys, "m");
    auto gpu = make<device>();
    {
        auto b = make<blob>();
        gpu->add_child("blob[*]", *b);
        rec.label(*b, "blob");
        b->mem[0] = 0xab;
        auto ram = make_ram_from_ptr(*b, "blob-ram", b->mem.size(), b->mem.data());
        rec.label(*ram, "blob-ram");
        sys->add_subregion(0x10000, *ram);
        dma_mapping m = space.map(0x10000, 16, false);
        REQUIRE(m);
        sys->del_subregion(*ram); // the guest unmaps the blob; the DMA goes on
        ram.reset();
        b.reset();
        unparent(*gpu->child("blob[0]")); // the GPU lets the blob go

        CHECK(live_count("gpu-blob") == 1);
        CHECK(std::to_integer<std::uint8_t>(m.data()[0]) == 0xab);
        space.unmap(m, 16);
    }
    ms->synchronize();
    CHECK(only(rec.take(), "finalizing ") ==
          std::vector<std::string>{"finalizing blob-ram", "finalizing blob"});
    CHECK(live_count("gpu-blob") == 0);
}

TEST_CASE("owners' rule: a blob container and its RAM sub-region, both the blob's, mapped in "
          "the system when the blob goes: both regions are finalized before the blob",
          "[lifetime][owner]") {
    leak_check leaks;
    event_recorder rec;
    auto sys = make_container(nullptr, "sys", u128_2_64);
    auto ms = memory_system::make();
    address_space space(*ms, *sys, "m");
    memory_region* cont = nullptr;
    {
        auto b = make<blob>();
        rec.label(*b, "blob");
        b->mem[8] = 0x77;
        auto c = make_container(*b, "blob-container", 0x2000);
        auto ram = make_ram_from_ptr(*b, "blob-ram", b->mem.size(), b->mem.data());
        rec.label(*c, "blob-container");
        rec.label(*ram, "blob-ram");
        c->add_subregion(0x1000, *ram);
        sys->add_subregion(0x40000, *c);
        cont = c.get();
        // The blob's last reference goes: the container is held by sys, the
        // RAM by the published view.
    }
    CHECK(live_count("gpu-blob") == 1);
    std::uint8_t v = 0;
    CHECK(space.read(0x41008, &v, 1) == memtx_ok);
    CHECK(v == 0x77);
    sys->del_subregion(*cont);
    ms->synchronize();
    const auto fin = only(rec.take(), "finalizing ");
    REQUIRE(fin.size() == 3);
    CHECK(fin.back() == "finalizing blob");
}

TEST_CASE("owners' rule: a GPU unplugged while one of its blobs' regions is DMA-held: the blob "
          "outlives the region, the region's memory stays valid until the unmap",
          "[lifetime][owner][dma][hotplug]") {
    leak_check leaks;
    event_recorder rec;
    auto root = container::make_root();
    machine& mach = add_machine(*root);
    auto sys = make_container(region_owner::ownerless_in(mach.unattached()), "system", u128_2_64);
    address_space space(mach.memory(), *sys, "memory");
    {
        auto gpu = make<reg_device>();
        rec.label(*gpu, "gpu");
        mach.peripheral().add_child("gpu", *gpu);
        auto b = make<blob>();
        rec.label(*b, "blob");
        gpu->add_child("blob[*]", *b);
        b->mem[1] = 0xcd;
        auto ram = make_ram_from_ptr(*b, "blob-ram", b->mem.size(), b->mem.data());
        rec.label(*ram, "blob-ram");
        sys->add_subregion(0x20000, *ram);
        dma_mapping m = space.map(0x20000, 32, true);
        REQUIRE(m);
        sys->del_subregion(*ram);
        ram.reset();
        b.reset();
        gpu.reset();
        unparent(*mach.peripheral().child("gpu")); // the hot-unplug

        CHECK(live_count("gpu-blob") == 1);
        m.data()[1] = std::byte{0xef}; // the DMA writes the blob's memory
        space.unmap(m, 32);
    }
    mach.memory().synchronize();
    const auto fin = only(rec.take(), "finalizing ");
    auto pos = [&](const std::string& e) { return std::find(fin.begin(), fin.end(), e) - fin.begin(); };
    REQUIRE(pos("finalizing blob-ram") < static_cast<std::ptrdiff_t>(fin.size()));
    CHECK(pos("finalizing blob-ram") < pos("finalizing blob"));
    CHECK(live_count("gpu-blob") == 0);
}

TEST_CASE("owners' rule: a constructor that maps its region and throws leaves no region in "
          "the guest's view and none naming the freed object",
          "[lifetime][owner]") {
    leak_check leaks;
    auto sys = make_container(nullptr, "sys", u128_2_64);
    auto ms = memory_system::make();
    address_space space(*ms, *sys, "m");
    CHECK_THROWS_WITH(make<failing_device>(*sys), Catch::Contains("constructor failed"));
    memtx_result r{};
    read32(space, 0x3000, &r);
    CHECK(r == memtx_decode_error);
    mtree_options o;
    o.owner = true;
    const std::string mtree = info_mtree(*ms, o);
    CHECK(mtree.find("failing-io") == std::string::npos);
    CHECK(live_count("failing-device") == 0);
    ms->synchronize();
    CHECK(live_count("memory-region") == 1); // sys
}

TEST_CASE("owners' rule: a region unparented, added back to its owner and unparented again "
          "holds its owner once, and the device is freed",
          "[lifetime][owner]") {
    leak_check leaks;
    event_recorder rec;
    auto root = container::make_root();
    auto d = make<reg_device>();
    rec.label(*d, "dev");
    root->add_child("dev", *d);
    auto io = make_io(*d, "io", 0x100, d->ops);
    rec.label(*io, "io");
    const std::uint32_t before = d->ref_count();
    unparent(*io);
    CHECK(d->ref_count() == before + 1);
    d->add_child("io-again", *io);
    unparent(*io);
    CHECK(d->ref_count() == before + 1); // not a second reference
    d.reset();
    unparent(*root->child("dev"));
    CHECK(live_count("reg-device") == 1); // io holds it
    io.reset();
    CHECK(only(rec.take(), "finalizing ") == std::vector<std::string>{"finalizing io", "finalizing dev"});
}

TEST_CASE("freeing an ownerless region while a DMA mapping holds it is refused as misuse, "
          "naming the region; the mapping keeps working",
          "[lifetime][dma]") {
    leak_check leaks;
    qomem_test::throwing_assertions asserts;
    auto sys = make_container(nullptr, "sys", u128_2_64);
    auto ms = memory_system::make();
    address_space space(*ms, *sys, "m");
    auto ram = make_ram(nullptr, "loose-ram", 0x1000);
    sys->add_subregion(0, *ram);
    dma_mapping m = space.map(0, 8, true);
    REQUIRE(m);
    sys->del_subregion(*ram);
    ms->synchronize();
    memory_region* raw = ram.detach(); // its last reference, dropped by hand below
    try {
        raw->unref();
        FAIL("freeing a DMA-held ownerless region was not refused");
    } catch (const assertion_failure& e) {
        CHECK_THAT(e.what(), Catch::Contains("loose-ram") && Catch::Contains("DMA"));
    }
    // Nothing changed: the region is alive, the mapping writes into it.
    m.data()[0] = std::byte{0x42};
    space.unmap(m, 8);
    ram = ref_ptr<memory_region>(raw, false); // the reference the failed release gave back
}

namespace {
/// A device that keeps a ref_ptr to its own MMIO region: after an unplug the
/// region holds the device and the device the region.
class clinging_device : public device {
    QOMEM_OBJECT(clinging_device, "clinging-device", device)
public:
    reg_device::regs ops;
    ref_ptr<memory_region> keep;
};

std::vector<std::string>& logged() {
    static std::vector<std::string> lines;
    return lines;
}
void log_to_vector(std::string_view line) { logged().emplace_back(line); }
} // namespace

TEST_CASE("a device that keeps a ref_ptr to its own region makes a cycle: the machine's end "
          "reports it by name, and dropping the reference frees both",
          "[lifetime][owner][cycle]") {
    leak_check leaks;
    logged().clear();
    const log_sink previous = set_log_sink(&log_to_vector);
    clinging_device* raw = nullptr;
    {
        auto root = container::make_root();
        machine& m = add_machine(*root);
        auto sys = make_container(region_owner::ownerless_in(m.unattached()), "system", u128_2_64);
        {
            address_space space(m.memory(), *sys, "memory");
            auto d = make<clinging_device>();
            d->keep = make_io(*d, "clinging-mmio", 0x100, d->ops);
            d->map_region(*sys, 0x1000, *d->keep);
            m.peripheral().add_child("nic", *d);
            d->realize();
            CHECK(read32(space, 0x1000) == 0x5a5a5a5a);
            raw = d.get();
            d.reset();
            unparent(*m.peripheral().child("nic")); // the hot-unplug
            memtx_result r{};
            read32(space, 0x1000, &r);
            CHECK(r == memtx_result(memtx_decode_error)); // unmapped at unrealize
            m.memory().synchronize();
            CHECK(m.memory().stranded_regions().size() == 1);
        }
        sys.reset();
        root.reset(); // the machine's end
    }
    set_log_sink(previous);
    REQUIRE(logged().size() == 1);
    CHECK_THAT(logged()[0], Catch::Contains("clinging-mmio") && Catch::Contains("clinging-device") &&
                                Catch::Contains("cycle"));
    CHECK(live_count("clinging-device") == 1); // the cycle, as reported
    raw->keep.reset();                          // broken: both go
    CHECK(live_count("clinging-device") == 0);
}

TEST_CASE("owners' rule: when one region is held beyond its owner, every region of the owner "
          "leaves the tree — one left behind could hold it through another region (a cycle)",
          "[lifetime][owner][fuzz]") {
    // Found by fuzz_region_ops: the device's alias (dropped handle) targets
    // an ownerless alias that targets the device's MMIO (handle kept). Had
    // only the MMIO left the tree, the device would hold its alias, the
    // alias the ownerless alias, that the MMIO, and the MMIO the device.
    leak_check leaks;
    event_recorder rec;
    auto d = make<reg_device>();
    rec.label(*d, "dev");
    auto io = make_io(*d, "io", 0x100, d->ops);
    rec.label(*io, "io");
    auto loose = make_alias(nullptr, "loose", *io, 0, 0x100);
    make_alias(*d, "own-alias", *loose, 0, 0x100); // its handle goes at once
    d.reset();
    CHECK(live_count("reg-device") == 1); // io is held beyond it: io holds it
    loose.reset();                         // own-alias left with the device's other regions
    CHECK(live_count("reg-device") == 1);
    io.reset();
    CHECK(live_count("reg-device") == 0);
    CHECK(only(rec.take(), "finalizing ").back() == "finalizing dev");
}
