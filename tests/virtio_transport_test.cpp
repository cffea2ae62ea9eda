// The driver's view of VIRTIO Shared Memory Regions through the two
// transports (qomem/virtio_mmio.hpp, qomem/virtio_pci.hpp), each test
// written as a guest finds them: select ids over virtio-mmio, or walk the
// PCI capability list through ECAM after firmware sized and placed the BAR;
// compute the guest address; read and write a file mapping there through the
// machine's address space; see unmapped parts answer a decode error; see a
// region leave the driver's view when its device is unplugged. The device
// models never say where their regions go; regions a vhost-user back-end
// enumerates with GET_SHMEM_CONFIG appear through either transport.
#include <sys/mman.h>
#include <unistd.h>

#include <array>
#include <bit>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/core.h>

#include <qomem/address_space.hpp>
#include <qomem/pci.hpp>
#include <qomem/shmem.hpp>
#include <qomem/vhost_user/frontend.hpp>
#include <qomem/virtio_mmio.hpp>
#include <qomem/virtio_pci.hpp>
#include <qomem/virtio_transport.hpp>

#include "test_support.hpp"

namespace vu = qomem::vhost_user;
using qomem::hwaddr;
using qomem_test::bytes;
using qomem_test::ecam_driver;
using qomem_test::guest_shm_region;
using qomem_test::mmio_driver;
using qomem_test::virtio_machine;
namespace reg = qomem::virtio_mmio_reg;

namespace {

const std::uint64_t page = qomem_test::host_page();
constexpr std::uint64_t gib = std::uint64_t(1) << 30;
constexpr hwaddr mmio_regs = 0x0a000000;
constexpr hwaddr mmio_window = 0x1000000000; // 64 GiB
constexpr std::uint64_t mmio_window_size = 16 * gib;

/// A VIRTIO device model that declares its regions itself (virtiofs' id).
class shm_device : public qomem::virtio_shmem_device {
    QOMEM_OBJECT(shm_device, "test-virtio-shm-device", qomem::virtio_shmem_device)
public:
    shm_device() = default;
    std::uint16_t virtio_id() const noexcept override { return 26; }
};

/// Three regions with a gap in their ids, one larger than 4 GiB, so that
/// both 32-bit halves of lengths and offsets matter.
struct three_regions {
    static constexpr std::array<std::uint8_t, 3> ids{0, 1, 7};
    static std::uint64_t size(std::uint8_t id) { return id == 0 ? 16 * page : id == 1 ? 8 * gib : 4 * page; }
    /// Where the transports lay them out: shmid order, back to back.
    static std::uint64_t offset(std::uint8_t id) { return id == 0 ? 0 : id == 1 ? 16 * page : 16 * page + 8 * gib; }
    static void declare(qomem::virtio_shmem_device& d) {
        for (std::uint8_t id : ids) d.declare_shmem(id, size(id));
    }
};

/// The guest reads `n` bytes at `a`; `res` gets the result.
bytes guest_read(qomem::address_space& as, hwaddr a, std::size_t n, qomem::memtx_result& res) {
    bytes b(n);
    res = as.read(a, b.data(), n);
    return b;
}

/// A virtio-mmio transport with its registers at mmio_regs and its window at
/// mmio_window, realized, as /machine/peripheral/`name`.
qomem::virtio_mmio& add_mmio(virtio_machine& r, const std::string& name,
                             std::uint64_t window_size = mmio_window_size) {
    auto t = qomem::make<qomem::virtio_mmio>(mmio_window, window_size);
    r.add(name, t);
    t->map(*r.sys, mmio_regs);
    t->realize();
    return *t;
}

/// Maps `len` bytes of a pattern memfd (seed `seed`) at `offset` of region
/// `shm`, read-write; returns the fd (the test keeps it to look at the file).
qomem_test::unique_fd map_pattern(qomem::virtio_shmem& shm, std::uint64_t offset, std::uint64_t len, unsigned seed) {
    qomem_test::unique_fd fd = qomem_test::pattern_memfd(len, seed);
    shm.map(fd.get(), 0, offset, len, qomem::shmem_flags::read_write);
    return fd;
}

/// The driver's side of one region: the mapped part reads the file and
/// writes reach it; the parts around it answer a decode error.
void require_guest_sees_mapping(qomem::address_space& as, hwaddr region, std::uint64_t region_len,
                                std::uint64_t map_offset, std::uint64_t map_len, int fd, unsigned seed) {
    INFO("region at 0x" << std::hex << region << ", mapping at +0x" << map_offset);
    qomem::memtx_result res;
    CHECK(guest_read(as, region + map_offset, 64, res) == qomem_test::pattern(seed, 0, 64));
    CHECK(res == qomem::memtx_ok);
    const bytes data = qomem_test::bytes_of("written by the guest through the transport's window");
    REQUIRE(as.write(region + map_offset + map_len - data.size(), data.data(), data.size()) == qomem::memtx_ok);
    CHECK(qomem_test::pread_bytes(fd, map_len - data.size(), data.size()) == data);
    if (map_offset > 0) {
        (void)guest_read(as, region + map_offset - 8, 8, res);
        CHECK(res == qomem::memtx_decode_error);
    }
    if (map_offset + map_len < region_len) {
        (void)guest_read(as, region + map_offset + map_len, 8, res);
        CHECK(res == qomem::memtx_decode_error);
    }
    (void)guest_read(as, region + region_len - 8, 8, res); // the region's last bytes
    CHECK(res == (map_offset + map_len == region_len ? qomem::memtx_ok : qomem::memtx_decode_error));
}

} // namespace

// ---- virtio-mmio ------------------------------------------------------------------

TEST_CASE("virtio-mmio: a driver selecting ids finds each region's 64-bit length and guest address, all ones for "
          "an id without a region, and reads and writes a file mapping at that address — unmapped parts answer a "
          "decode error",
          "[virtio-mmio][shmem]") {
    qomem_test::leak_check leaks;
    virtio_machine r;
    qomem::virtio_mmio& t = add_mmio(r, "virtio-mmio0");
    auto dev = qomem::make<shm_device>();
    three_regions::declare(*dev); // the device model knows ids and sizes only
    t.plug(*dev);

    mmio_driver drv(*r.as, mmio_regs);
    CHECK(drv.read(reg::magic_value) == 0x74726976);
    CHECK(drv.read(reg::version) == 2);
    CHECK(drv.read(reg::device_id) == 26);
    CHECK(drv.read(reg::vendor_id) == 0x554d4551);

    for (std::uint8_t id : three_regions::ids) {
        INFO("shmid " << unsigned(id));
        CHECK(drv.get_shm_region(id) ==
              std::optional<guest_shm_region>({mmio_window + three_regions::offset(id), three_regions::size(id)}));
    }
    // Region 1 is 8 GiB: its length has a high half; region 7 lies above it.
    drv.write(reg::shm_sel, 1);
    CHECK(drv.read(reg::shm_len_low) == 0);
    CHECK(drv.read(reg::shm_len_high) == 2);
    drv.write(reg::shm_sel, 7);
    CHECK(drv.read(reg::shm_base_high) == ((mmio_window + three_regions::offset(7)) >> 32));
    CHECK(drv.read(reg::shm_base_low) == ((mmio_window + three_regions::offset(7)) & 0xffffffff));

    // No region: length and base both read all ones (VIRTIO 1.2, 4.2.2).
    for (std::uint32_t id : {2u, 6u, 8u, 255u, 256u, 0x10007u, 0xffffffffu}) {
        INFO("shmid " << id);
        CHECK_FALSE(drv.get_shm_region(id));
        CHECK(drv.read(reg::shm_len_low) == 0xffffffff);
        CHECK(drv.read(reg::shm_len_high) == 0xffffffff);
        CHECK(drv.read(reg::shm_base_low) == 0xffffffff);
        CHECK(drv.read(reg::shm_base_high) == 0xffffffff);
    }

    // The back-end maps a file into region 7 at its second page; the driver
    // uses the address it found.
    const std::optional<guest_shm_region> r7 = drv.get_shm_region(7);
    REQUIRE(r7);
    qomem_test::unique_fd fd = map_pattern(*dev->shmem(7), page, 2 * page, 5);
    require_guest_sees_mapping(*r.as, r7->addr, r7->len, page, 2 * page, fd.get(), 5);
    // Region 0 has nothing mapped: all of it is a decode error.
    qomem::memtx_result res;
    (void)guest_read(*r.as, drv.get_shm_region(0)->addr, 8, res);
    CHECK(res == qomem::memtx_decode_error);
}

TEST_CASE("virtio-mmio registers are 32 bits wide: another size reads 0 and a write of it is ignored, logged as a "
          "guest error — writes to read-only registers are ignored, a read of SHMSel gives 0, the device "
          "configuration space reads 0 — without a device DeviceID is 0 and no id has a region",
          "[virtio-mmio]") {
    qomem_test::leak_check leaks;
    virtio_machine r;
    qomem::virtio_mmio& t = add_mmio(r, "virtio-mmio0");
    mmio_driver drv(*r.as, mmio_regs);
    CHECK(drv.read(reg::magic_value) == 0x74726976);
    CHECK(drv.read(reg::device_id) == 0);
    CHECK_FALSE(drv.get_shm_region(0));

    auto dev = qomem::make<shm_device>();
    dev->declare_shmem(0, 4 * page);
    t.plug(*dev);
    REQUIRE(drv.get_shm_region(0) == std::optional<guest_shm_region>({mmio_window, 4 * page}));

    qomem_test::log_capture log;
    qomem_test::scoped_log_category on(qomem::log_category::guest_errors, true);
    std::uint8_t b[8] = {};
    REQUIRE(r.as->read(mmio_regs + reg::magic_value, b, 2) == qomem::memtx_ok);
    CHECK(b[0] == 0);
    CHECK(b[1] == 0);
    REQUIRE(r.as->read(mmio_regs + reg::magic_value, b, 1) == qomem::memtx_ok);
    CHECK(b[0] == 0);
    const std::uint8_t two[2] = {5, 0};
    REQUIRE(r.as->write(mmio_regs + reg::shm_sel, two, 2) == qomem::memtx_ok); // ignored: 0 stays selected
    CHECK(drv.read(reg::shm_len_low) == 4 * page);
    drv.write(reg::shm_len_low, 0);
    drv.write(reg::device_id, 0);
    CHECK(drv.read(reg::shm_len_low) == 4 * page);
    CHECK(drv.read(reg::device_id) == 26);
    CHECK(drv.read(reg::shm_sel) == 0);
    CHECK(log.lines() ==
          std::vector<std::string>{
              fmt::format("virtio-mmio 'virtio-mmio0': wrong register read size at {:#x}, size 2", reg::magic_value),
              fmt::format("virtio-mmio 'virtio-mmio0': wrong register read size at {:#x}, size 1", reg::magic_value),
              fmt::format("virtio-mmio 'virtio-mmio0': wrong register write size at {:#x}, size 2", reg::shm_sel),
              fmt::format("virtio-mmio 'virtio-mmio0': write to a read-only register at {:#x}, size 4",
                          reg::shm_len_low),
              fmt::format("virtio-mmio 'virtio-mmio0': write to a read-only register at {:#x}, size 4",
                          reg::device_id),
              fmt::format("virtio-mmio 'virtio-mmio0': read of the write-only register SHMSel at {:#x}, size 4",
                          reg::shm_sel)});
    // An 8-byte read is two 32-bit register reads: SHMLenLow and SHMLenHigh.
    REQUIRE(r.as->read(mmio_regs + reg::shm_len_low, b, 8) == qomem::memtx_ok);
    std::uint64_t len = 0;
    std::memcpy(&len, b, 8);
    CHECK(len == 4 * page);
    CHECK(drv.read(reg::config) == 0);
    CHECK(drv.read(0x1fc) == 0);
}

TEST_CASE("virtio-mmio: regions that do not fit the window are refused with transport_error naming them — the "
          "device is unplugged (and unrealized) again and nothing is placed — a device plugged before realize is "
          "placed at realize, or makes realize fail the same way",
          "[virtio-mmio][shmem]") {
    qomem_test::leak_check leaks;
    virtio_machine r;
    qomem::virtio_mmio& t = add_mmio(r, "virtio-mmio0", 16 * page);
    auto dev = qomem::make<shm_device>();
    dev->declare_shmem(0, 8 * page);
    dev->declare_shmem(3, 9 * page);
    try {
        t.plug(*dev);
        FAIL("no transport_error");
    } catch (const qomem::transport_error& e) {
        INFO(e.what());
        CHECK_THAT(e.what(), Catch::Matchers::Contains(fmt::format("need {:#x} bytes", 17 * page)));
        CHECK_THAT(e.what(), Catch::Matchers::Contains(fmt::format("has {:#x}", 16 * page)));
        CHECK_THAT(e.what(), Catch::Matchers::Contains(fmt::format("shmid 3 ({:#x} bytes)", 9 * page)));
    }
    CHECK(t.bus().device() == nullptr);
    CHECK(dev->parent_bus() == nullptr);
    CHECK_FALSE(dev->realized());
    CHECK(t.shm_window().subregion_count() == 0);
    CHECK(dev->shmem(0)->region().container() == nullptr);
    mmio_driver drv(*r.as, mmio_regs);
    CHECK(drv.read(reg::device_id) == 0);

    // Before realize: placed at realize.
    auto t2 = qomem::make<qomem::virtio_mmio>(mmio_window + 16 * page, 16 * page);
    r.add("virtio-mmio1", t2);
    auto small = qomem::make<shm_device>();
    small->declare_shmem(2, 16 * page);
    t2->plug(*small);
    CHECK(small->realized());
    CHECK(t2->shm_window().subregion_count() == 0);
    t2->realize();
    CHECK(qomem::placed_shmem(t2->shm_window()) == std::vector<qomem::shmem_placement>{{2, 0, 16 * page}});

    auto t3 = qomem::make<qomem::virtio_mmio>(mmio_window + 32 * page, 16 * page);
    r.add("virtio-mmio2", t3);
    t3->plug(*dev);
    REQUIRE_THROWS_AS(t3->realize(), qomem::transport_error);
    CHECK_FALSE(t3->realized());
    CHECK(t3->shm_window().subregion_count() == 0);
}

TEST_CASE("virtio-mmio: a region leaves the driver's view when its device is unplugged: length and base read all "
          "ones, DeviceID 0, its guest addresses answer a decode error, while a DMA mapping keeps its pages until "
          "it ends — unplugging the transport takes its registers away — everything is finalized",
          "[virtio-mmio][shmem][lifetime]") {
    qomem_test::leak_check leaks;
    virtio_machine r;
    qomem::virtio_mmio& t = add_mmio(r, "virtio-mmio0");
    auto dev = qomem::make<shm_device>();
    r.add("fs0", dev);
    three_regions::declare(*dev);
    t.plug(*dev);
    mmio_driver drv(*r.as, mmio_regs);
    const guest_shm_region r0 = drv.get_shm_region(0).value();
    qomem_test::unique_fd fd = map_pattern(*dev->shmem(0), 0, page, 9);
    std::optional<qomem::dma_mapping> dma(r.as->map(r0.addr, page, false));
    REQUIRE(dma->size() == page);
    dev.reset(); // the tree and the bus hold it

    qomem::unparent(*r.m->peripheral().child("fs0"));
    CHECK(qomem_test::live_count("test-virtio-shm-device") == 1); // held until the DMA ends
    CHECK(drv.read(reg::device_id) == 0);
    for (std::uint8_t id : three_regions::ids) {
        INFO("shmid " << unsigned(id));
        CHECK_FALSE(drv.get_shm_region(id));
        CHECK(drv.read(reg::shm_base_low) == 0xffffffff);
        CHECK(drv.read(reg::shm_base_high) == 0xffffffff);
    }
    qomem::memtx_result res;
    (void)guest_read(*r.as, r0.addr, 8, res);
    CHECK(res == qomem::memtx_decode_error);
    CHECK(t.shm_window().subregion_count() == 0);
    // The DMA still reads the file's pages.
    CHECK(bytes(reinterpret_cast<const std::byte*>(dma->data()), reinterpret_cast<const std::byte*>(dma->data()) + 64) ==
          qomem_test::pattern(9, 0, 64));
    r.as->unmap(*dma, 0);
    dma.reset();
    CHECK(qomem_test::live_count("test-virtio-shm-device") == 0);
    CHECK(qomem_test::live_count("virtio-shmem") == 0);

    qomem::unparent(t);
    (void)guest_read(*r.as, mmio_regs + reg::magic_value, 4, res);
    CHECK(res == qomem::memtx_decode_error);
    CHECK(qomem_test::live_count("virtio-mmio") == 0);
    CHECK(qomem_test::live_count("virtio-bus") == 0);
}

// ---- virtio-pci ---------------------------------------------------------------------

namespace {

/// A virtio-pci proxy with `dev` plugged in, on the machine's PCI bus, realized.
qomem::virtio_pci& add_pci(virtio_machine& r, const std::string& name, qomem::virtio_shmem_device& dev) {
    auto p = qomem::make<qomem::virtio_pci>();
    p->plug(dev);
    p->plug_into(r.host->bus());
    r.add(name, p);
    p->realize();
    return *p;
}

} // namespace

TEST_CASE("virtio-pci: a driver walking the capability list finds one shared memory capability (vendor, cfg_type "
          "8, cap_len 24) per region, with its shmid, BAR and 64-bit offset and length — firmware sizes and places "
          "the 64-bit BAR — the guest reads and writes a file mapping at BAR + offset — unmapped parts answer a "
          "decode error",
          "[virtio-pci][shmem]") {
    qomem_test::leak_check leaks;
    virtio_machine r;
    auto dev = qomem::make<shm_device>();
    three_regions::declare(*dev);
    qomem::virtio_pci& proxy = add_pci(r, "fs0", *dev);
    REQUIRE(proxy.devfn() == std::optional<std::uint8_t>(0));

    ecam_driver pci(*r.as, r.ecam_base);
    CHECK(pci.read(0, qomem::pci_config::vendor_id, 2) == 0x1af4);
    CHECK(pci.read(0, qomem::pci_config::device_id, 2) == 0x1040 + 26);
    CHECK(pci.read(0, qomem::pci_config::revision_id, 1) == 1);
    CHECK(pci.read(0, qomem::pci_config::subsystem_vendor_id) == 0x11001af4);

    const std::vector<ecam_driver::shm_cap> caps = pci.shm_caps(0);
    REQUIRE(caps.size() == 3);
    for (std::size_t i = 0; i < caps.size(); ++i) {
        const std::uint8_t id = three_regions::ids[i];
        INFO("capability " << i << " at 0x" << std::hex << unsigned(caps[i].pos));
        CHECK(caps[i].cap_len == 24);
        CHECK(caps[i].bar == 2);
        CHECK(caps[i].id == id);
        CHECK(caps[i].offset == three_regions::offset(id));
        CHECK(caps[i].length == three_regions::size(id));
    }
    // The 64-bit form matters: region 7 starts past 8 GiB, region 1 is 8 GiB.
    CHECK(pci.read(0, caps[2].pos + 16u) == 2); // offset_hi
    CHECK(pci.read(0, caps[1].pos + 20u) == 2); // length_hi
    CHECK(pci.read(0, caps[1].pos + 12u) == 0); // length (low)

    const ecam_driver::bar_info bar = pci.size_bar(0, 2);
    CHECK(bar.size == 16 * gib); // the next power of two of 8 GiB + 20 pages
    CHECK(bar.is64);
    CHECK(bar.prefetch);
    CHECK(pci.size_bar(0, 0).size == 0);
    CHECK(pci.size_bar(0, 4).size == 0);
    // Not placed yet: the driver finds the capability but the BAR's memory is not there.
    const hwaddr bar_addr = virtio_machine::pci_window + 16 * gib;
    pci.place_bar(0, 2, bar_addr);
    CHECK(proxy.bar_address(2) == std::optional<hwaddr>(bar_addr));

    for (std::uint8_t id : three_regions::ids) {
        INFO("shmid " << unsigned(id));
        CHECK(pci.get_shm_region(0, id) ==
              std::optional<guest_shm_region>({bar_addr + three_regions::offset(id), three_regions::size(id)}));
    }
    CHECK_FALSE(pci.get_shm_region(0, 2));
    CHECK_FALSE(pci.get_shm_region(0, 255));

    const guest_shm_region r7 = pci.get_shm_region(0, 7).value();
    qomem_test::unique_fd fd = map_pattern(*dev->shmem(7), 2 * page, 2 * page, 11);
    require_guest_sees_mapping(*r.as, r7.addr, r7.len, 2 * page, 2 * page, fd.get(), 11);
    // Past the regions, inside the BAR: nothing there.
    qomem::memtx_result res;
    (void)guest_read(*r.as, bar_addr + 16 * gib - 8, 8, res);
    CHECK(res == qomem::memtx_decode_error);
}

TEST_CASE("virtio-pci: unplugging the function takes it off the bus — every configuration read answers all ones "
          "and the BAR's addresses a decode error — unplugging only the VIRTIO device empties the BAR and the "
          "capability list — everything is finalized",
          "[virtio-pci][shmem][lifetime]") {
    qomem_test::leak_check leaks;
    virtio_machine r;
    auto a = qomem::make<shm_device>();
    three_regions::declare(*a);
    qomem::virtio_pci& pa = add_pci(r, "fs0", *a);
    auto b = qomem::make<shm_device>();
    r.add("fs1-device", b); // in the tree, so that it can be unplugged on its own
    b->declare_shmem(4, 8 * page);
    qomem::virtio_pci& pb = add_pci(r, "fs1", *b);
    REQUIRE(pb.devfn() == std::optional<std::uint8_t>(8));
    a.reset();
    ecam_driver pci(*r.as, r.ecam_base);
    const hwaddr bar_a = virtio_machine::pci_window + 16 * gib;
    const hwaddr bar_b = virtio_machine::pci_window + 0x100000;
    pci.place_bar(0, 2, bar_a);
    pci.place_bar(8, 2, bar_b);
    const guest_shm_region ra = pci.get_shm_region(0, 7).value();
    const guest_shm_region rb = pci.get_shm_region(8, 4).value();
    qomem_test::unique_fd fa = map_pattern(*pa.bus().device()->shmem(7), 0, page, 1);
    qomem_test::unique_fd fb = map_pattern(*b->shmem(4), 0, page, 2);
    qomem::memtx_result res;
    (void)guest_read(*r.as, ra.addr, 8, res);
    REQUIRE(res == qomem::memtx_ok);

    // The usual hot-unplug: the whole function goes.
    qomem::unparent(pa);
    CHECK(pci.read(0, qomem::pci_config::vendor_id) == 0xffffffff);
    CHECK(pci.read(0, qomem::pci_config::capability_list) == 0xffffffff);
    CHECK(pci.shm_caps(0).empty());
    (void)guest_read(*r.as, ra.addr, 8, res);
    CHECK(res == qomem::memtx_decode_error);
    CHECK(qomem_test::live_count("virtio-pci") == 1);
    CHECK(qomem_test::live_count("virtio-shmem") == 1);

    // Only the VIRTIO device goes: the function stays, its BAR is empty, its
    // capability list too.
    CHECK(pci.shm_caps(8).size() == 1);
    qomem::unparent(*b);
    b.reset();
    CHECK(pci.read(8, qomem::pci_config::vendor_id, 2) == 0x1af4);
    CHECK(pci.shm_caps(8).empty());
    CHECK((pci.read(8, qomem::pci_config::status, 2) & qomem::pci_config::status_cap_list) == 0);
    CHECK_FALSE(pci.get_shm_region(8, 4));
    (void)guest_read(*r.as, rb.addr, 8, res);
    CHECK(res == qomem::memtx_decode_error);
    CHECK(pb.shm_bar()->subregion_count() == 0);
    CHECK(qomem_test::live_count("virtio-shmem") == 0);
    CHECK(qomem_test::live_count("test-virtio-shm-device") == 0);
}

TEST_CASE("virtio-pci: more than 8 regions do not fit the capability list and are refused at realize with "
          "transport_error — nothing is placed and no slot is taken — plugging after realize is misuse",
          "[virtio-pci][shmem][misuse]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    virtio_machine r;
    auto dev = qomem::make<shm_device>();
    for (std::uint8_t id = 0; id < 9; ++id) dev->declare_shmem(id, page);
    auto p = qomem::make<qomem::virtio_pci>();
    p->plug(*dev);
    p->plug_into(r.host->bus());
    r.add("fs0", p);
    try {
        p->realize();
        FAIL("no transport_error");
    } catch (const qomem::transport_error& e) {
        CHECK_THAT(e.what(), Catch::Matchers::Contains("has 9 shared memory regions"));
        CHECK_THAT(e.what(), Catch::Matchers::Contains("holds 8 capabilities of 24 bytes"));
    }
    CHECK_FALSE(p->realized());
    CHECK(p->shm_bar() == nullptr);
    CHECK_FALSE(p->devfn());
    CHECK(dev->shmem(0)->region().container() == nullptr);
    ecam_driver pci(*r.as, r.ecam_base);
    CHECK(pci.read(0, qomem::pci_config::vendor_id) == 0xffffffff);

    // Eight fit exactly (0x40 + 8 x 24 = 0x100).
    qomem::unparent(*dev->shmem(8));
    p->realize();
    CHECK(pci.shm_caps(0).size() == 8);
    CHECK(pci.read(0, 0x40 + 7 * 24 + 1, 1) == 0); // the last one ends the list

    auto other = qomem::make<shm_device>();
    REQUIRE_THROWS_AS(p->plug(*other), qomem::assertion_failure);
    CHECK(other->parent_bus() == nullptr);
    CHECK(p->bus().device() == dev.get());
}

TEST_CASE("transport misuse is reported and leaves everything as it was: a second device on a transport, a "
          "device whose region its model placed itself, mapping a virtio-mmio transport twice, realizing a "
          "virtio-pci transport without a device",
          "[virtio-mmio][virtio-pci][misuse]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    virtio_machine r;
    qomem::virtio_mmio& t = add_mmio(r, "virtio-mmio0");
    auto first = qomem::make<shm_device>();
    first->declare_shmem(0, page);
    t.plug(*first);
    auto second = qomem::make<shm_device>();
    second->declare_shmem(0, page);
    REQUIRE_THROWS_AS(t.plug(*second), qomem::assertion_failure);
    CHECK(second->parent_bus() == nullptr);
    CHECK_FALSE(second->realized());
    CHECK(t.bus().device() == first.get());
    REQUIRE_THROWS_AS(t.map(*r.sys, mmio_regs + 0x1000), qomem::assertion_failure);
    CHECK(t.registers().addr() == mmio_regs);

    // A model that placed its own region: the transport refuses it and the
    // device leaves its bus again, realized as it came.
    auto t2 = qomem::make<qomem::virtio_mmio>(mmio_window + 16 * page, 16 * page);
    r.add("virtio-mmio1", t2);
    t2->realize();
    auto own_bar = qomem::make_container(nullptr, "own-bar", 16 * page);
    own_bar->add_subregion(0, second->shmem(0)->region());
    second->realize();
    REQUIRE_THROWS_AS(t2->plug(*second), qomem::assertion_failure);
    CHECK(second->parent_bus() == nullptr);
    CHECK(second->realized());
    CHECK(second->shmem(0)->region().container() == own_bar.get());
    CHECK(t2->shm_window().subregion_count() == 0);
    own_bar->del_subregion(second->shmem(0)->region());

    auto empty = qomem::make<qomem::virtio_pci>();
    empty->plug_into(r.host->bus());
    r.add("empty", empty);
    REQUIRE_THROWS_AS(empty->realize(), qomem::assertion_failure);
    CHECK_FALSE(empty->realized());
    CHECK_FALSE(empty->devfn());
}

// ---- regions enumerated by a vhost-user back-end ------------------------------------------

namespace {

/// A vhost-user back-end in a thread that answers the handshake and
/// GET_SHMEM_CONFIG with `sizes` (by shmid), offering only SHMEM; it ends
/// when the front-end closes the connection.
class shmem_backend {
public:
    explicit shmem_backend(std::map<std::uint8_t, std::uint64_t> sizes) : sizes_(std::move(sizes)) {
        auto [front, back] = vu::channel::socketpair();
        front_.emplace(std::move(front));
        thread_ = std::thread([this, ch = std::move(back)]() mutable { run(ch); });
    }
    ~shmem_backend() {
        front_.reset(); // never handed out: the thread ends
        if (thread_.joinable()) thread_.join();
    }
    shmem_backend(const shmem_backend&) = delete;
    shmem_backend& operator=(const shmem_backend&) = delete;

    vu::channel connect() { return std::move(*std::exchange(front_, std::nullopt)); }
    std::vector<std::uint32_t> requests() const {
        std::lock_guard l(mutex_);
        return requests_;
    }

private:
    void run(vu::channel& ch) {
        try {
            // Bounded: a front-end that says nothing for 10 s ends the test's back-end.
            while (std::optional<vu::raw_message> m = ch.receive(1 << 12, std::chrono::seconds(10))) {
                const vu::msg_header h = vu::decode_header(m->bytes);
                {
                    std::lock_guard l(mutex_);
                    requests_.push_back(h.request);
                }
                constexpr std::uint64_t features = std::uint64_t(1) << vu::virtio_f_version_1 |
                                                   std::uint64_t(1) << vu::vhost_user_f_protocol_features;
                if (h.request == static_cast<std::uint32_t>(vu::frontend_request::get_features))
                    ch.send(vu::encode_u64_reply(h.request, features));
                else if (h.request == static_cast<std::uint32_t>(vu::frontend_request::get_protocol_features))
                    ch.send(vu::encode_u64_reply(h.request, vu::mask(vu::protocol_feature::shmem)));
                else if (h.request == static_cast<std::uint32_t>(vu::frontend_request::get_shmem_config)) {
                    vu::shmem_config_payload c{};
                    for (const auto& [id, size] : sizes_) c.memory_sizes[id] = size;
                    c.nregions = static_cast<std::uint32_t>(c.count());
                    ch.send(vu::encode_shmem_config_reply(c));
                }
            }
        } catch (const std::exception&) {
            // The front-end went away mid-message, or was silent: the back-end ends.
        }
    }

    std::map<std::uint8_t, std::uint64_t> sizes_;
    std::optional<vu::channel> front_;
    std::thread thread_;
    mutable std::mutex mutex_;
    std::vector<std::uint32_t> requests_;
};

/// A generic vhost-user device (QEMU's vhost-user-device): at realize it
/// opens a session with its back-end and declares whatever regions the
/// back-end enumerates. It names no shmid and no size.
class vhost_user_device : public qomem::virtio_shmem_device {
    QOMEM_OBJECT(vhost_user_device, "test-vhost-user-device", qomem::virtio_shmem_device)
public:
    vhost_user_device(vu::channel ch, qomem::address_space& guest) : ch_(std::move(ch)), guest_(&guest) {}
    std::uint16_t virtio_id() const noexcept override { return 16; } // a GPU: blobs in shared memory
    const vu::frontend* session() const noexcept { return fe_.get(); }
    /// Asks the back-end again (its regions are declared already).
    std::size_t declare_again() { return fe_->declare_shmem_regions(); }

protected:
    void do_realize() override {
        vu::frontend_options o;
        o.timeout = std::chrono::milliseconds(5000);
        fe_ = std::make_unique<vu::frontend>(std::move(*std::exchange(ch_, std::nullopt)), *guest_, o, this);
        try {
            fe_->declare_shmem_regions();
        } catch (...) {
            fe_.reset(); // a refused realize leaves no session behind
            throw;
        }
    }
    void do_unrealize() noexcept override { fe_.reset(); }

private:
    std::optional<vu::channel> ch_;
    qomem::address_space* guest_;
    // Held by pointer: a frontend's destructor may throw (it unregisters a
    // listener), and an object's destructor may not.
    std::unique_ptr<vu::frontend> fe_;
};

} // namespace

TEST_CASE("regions a vhost-user back-end enumerates with GET_SHMEM_CONFIG appear through virtio-mmio and "
          "virtio-pci without the device model naming them, and the guest uses them at the addresses it finds",
          "[virtio-mmio][virtio-pci][vhost-user][shmem]") {
    qomem_test::leak_check leaks;
    const std::map<std::uint8_t, std::uint64_t> sizes{{1, 32 * page}, {5, 8 * page}, {200, 4 * page}};
    shmem_backend for_mmio(sizes);
    shmem_backend for_pci(sizes);
    virtio_machine r;

    qomem::virtio_mmio& t = add_mmio(r, "virtio-mmio0");
    auto gpu0 = qomem::make<vhost_user_device>(for_mmio.connect(), *r.as);
    r.add("gpu0", gpu0);
    t.plug(*gpu0); // realizes it: the session, GET_SHMEM_CONFIG, the regions
    auto gpu1 = qomem::make<vhost_user_device>(for_pci.connect(), *r.as);
    r.add("gpu1", gpu1);
    qomem::virtio_pci& proxy = add_pci(r, "gpu1-pci", *gpu1);

    CHECK(for_mmio.requests().back() == static_cast<std::uint32_t>(vu::frontend_request::get_shmem_config));
    CHECK(gpu0->session()->requests_sent().back() == vu::frontend_request::get_shmem_config);

    mmio_driver mmio(*r.as, mmio_regs);
    CHECK(mmio.read(reg::device_id) == 16);
    ecam_driver pci(*r.as, r.ecam_base);
    CHECK(pci.read(*proxy.devfn(), qomem::pci_config::device_id, 2) == 0x1040 + 16);
    const hwaddr bar = virtio_machine::pci_window + 0x1000000;
    CHECK(pci.size_bar(*proxy.devfn(), 2).size == std::bit_ceil(44 * page));
    pci.place_bar(*proxy.devfn(), 2, bar);

    std::uint64_t offset = 0;
    unsigned seed = 20;
    for (const auto& [id, size] : sizes) {
        INFO("shmid " << unsigned(id));
        const std::optional<guest_shm_region> via_mmio = mmio.get_shm_region(id);
        const std::optional<guest_shm_region> via_pci = pci.get_shm_region(*proxy.devfn(), id);
        CHECK(via_mmio == std::optional<guest_shm_region>({mmio_window + offset, size}));
        CHECK(via_pci == std::optional<guest_shm_region>({bar + offset, size}));
        offset += size;
        // Each back-end maps a file at the start of each of its regions.
        qomem_test::unique_fd f0 = map_pattern(*gpu0->shmem(id), 0, page, seed);
        qomem_test::unique_fd f1 = map_pattern(*gpu1->shmem(id), page, page, seed + 1);
        require_guest_sees_mapping(*r.as, via_mmio->addr, size, 0, page, f0.get(), seed);
        require_guest_sees_mapping(*r.as, via_pci->addr, size, page, page, f1.get(), seed + 1);
        seed += 2;
    }
    CHECK_FALSE(mmio.get_shm_region(0));
    CHECK_FALSE(pci.get_shm_region(*proxy.devfn(), 0));

    // Asked again, the back-end names regions the device already has: refused, nothing changes.
    try {
        gpu0->declare_again();
        FAIL("no shmem_error");
    } catch (const qomem::shmem_error& e) {
        CHECK(e.why() == qomem::shmem_reason::duplicate_shmid);
        CHECK_THAT(e.what(), Catch::Matchers::Contains("region 1 is already declared"));
    }
    CHECK(qomem::placed_shmem(t.shm_window()).size() == 3);
    CHECK(qomem_test::live_count("virtio-shmem") == 6);
}

TEST_CASE("a back-end enumerating a region whose size is not a multiple of the page size, or one the kernel "
          "cannot reserve, is refused: the device declares none of its regions, the transport places nothing, "
          "and the device is unplugged again",
          "[virtio-mmio][vhost-user][shmem]") {
    qomem_test::leak_check leaks;
    shmem_backend unaligned({{0, 8 * page}, {3, page + 512}});
    shmem_backend huge({{0, 8 * page}, {9, std::uint64_t(1) << 62}});
    virtio_machine r;
    qomem::virtio_mmio& t = add_mmio(r, "virtio-mmio0");

    auto d = qomem::make<vhost_user_device>(unaligned.connect(), *r.as);
    try {
        t.plug(*d);
        FAIL("no shmem_error");
    } catch (const qomem::shmem_error& e) {
        CHECK(e.why() == qomem::shmem_reason::bad_size);
        CHECK_THAT(e.what(), Catch::Matchers::Contains(fmt::format("region 3 has size {:#x}", page + 512)));
    }
    CHECK_FALSE(d->realized());
    CHECK(d->parent_bus() == nullptr);
    CHECK(d->shmem(0) == nullptr);
    CHECK(t.shm_window().subregion_count() == 0);

    auto e = qomem::make<vhost_user_device>(huge.connect(), *r.as);
    REQUIRE_THROWS_AS(t.plug(*e), qomem::shmem_error);
    CHECK(e->shmem(0) == nullptr); // declared, then undone
    CHECK(e->shmem(9) == nullptr);
    CHECK(qomem_test::live_count("virtio-shmem") == 0);
    mmio_driver mmio(*r.as, mmio_regs);
    CHECK(mmio.read(reg::device_id) == 0);
    CHECK_FALSE(mmio.get_shm_region(0));
}
