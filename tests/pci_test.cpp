// The minimal PCI model (qomem/pci.hpp), driven as a guest's firmware and
// drivers drive it: every configuration access goes through the ECAM window
// in the machine's address space, every BAR is found at the address the
// guest wrote, and the BARs' memory is read and written there.
#include <array>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include <catch2/catch.hpp>

#include <qomem/address_space.hpp>
#include <qomem/pci.hpp>

#include "test_support.hpp"

using qomem::hwaddr;
using qomem_test::ecam_driver;
using qomem_test::virtio_machine;
namespace cfg = qomem::pci_config;

namespace {

/// A function with a 4 KiB MMIO BAR 0 (32-bit), 64 KiB of RAM in BAR 2
/// (64-bit, prefetchable), BAR 1 and 4-5 unimplemented, and the capabilities
/// it is given.
class test_function : public qomem::pci_device {
    QOMEM_OBJECT(test_function, "test-pci-function", qomem::pci_device)
public:
    static constexpr qomem::pci_ids ids{0x1234, 0x5678, 3, 0x020000, 0x1af4, 0x1100};

    explicit test_function(std::vector<qomem::pci_capability> caps = {}) : caps_(std::move(caps)) {
        mmio = qomem::make_io(*this, "fn-mmio", 0x1000, regs).get(); // our children hold them
        ram = qomem::make_ram(*this, "fn-ram", 0x10000).get();
    }

    qomem_test::recording_regs<qomem::access_limits{.min_access_size = 1, .max_access_size = 4}> regs;
    qomem::memory_region* mmio = nullptr;
    qomem::memory_region* ram = nullptr;

    using pci_device::register_bar; // for the misuse checks
    using pci_device::set_capabilities;

protected:
    void do_realize() override {
        pci_device::do_realize();
        set_ids(ids);
        register_bar(0, *mmio, qomem::pci_bar_type::mem32);
        register_bar(2, *ram, qomem::pci_bar_type::mem64_prefetch);
        set_capabilities(caps_);
    }

private:
    std::vector<qomem::pci_capability> caps_;
};

/// A realized test function plugged into the machine's bus as `name`.
test_function& plug_function(virtio_machine& r, const std::string& name, std::optional<std::uint8_t> devfn = {},
                             std::vector<qomem::pci_capability> caps = {}) {
    auto fn = qomem::make<test_function>(std::move(caps));
    if (devfn) fn->set_devfn(*devfn);
    fn->plug_into(r.host->bus());
    r.add(name, fn);
    fn->realize();
    return *fn;
}

std::vector<std::uint8_t> bytes_at(qomem::address_space& as, hwaddr a, std::size_t n, qomem::memtx_result& res) {
    std::vector<std::uint8_t> b(n);
    res = as.read(a, b.data(), n);
    return b;
}

} // namespace

TEST_CASE("through ECAM the guest reads a function's identity and header type, and its writes to read-only "
          "fields change nothing",
          "[pci]") {
    qomem_test::leak_check leaks;
    virtio_machine r;
    test_function& fn = plug_function(r, "fn");
    REQUIRE(fn.devfn() == std::optional<std::uint8_t>(0));
    ecam_driver pci(*r.as, r.ecam_base);
    CHECK(pci.read(0, cfg::vendor_id, 2) == 0x1234);
    CHECK(pci.read(0, cfg::device_id, 2) == 0x5678);
    CHECK(pci.read(0, cfg::vendor_id) == 0x56781234);
    CHECK(pci.read(0, cfg::revision_id) == 0x02000003); // revision 3, class 02 00 00
    CHECK(pci.read(0, cfg::header_type, 1) == 0);
    CHECK(pci.read(0, cfg::subsystem_vendor_id) == 0x11001af4);
    CHECK(pci.read(0, cfg::status, 2) == 0); // no capabilities
    pci.write(0, cfg::vendor_id, 0);
    pci.write(0, cfg::revision_id, 0xffffffff);
    pci.write(0, cfg::status, 0xffff, 2);
    CHECK(pci.read(0, cfg::vendor_id) == 0x56781234);
    CHECK(pci.read(0, cfg::revision_id) == 0x02000003);
    CHECK(pci.read(0, cfg::status, 2) == 0);
    // QEMU's writable bits: command (I/O, memory, master, INTx disable),
    // cache line size, interrupt line.
    pci.write(0, cfg::command, 0xffff, 2);
    CHECK(pci.read(0, cfg::command, 2) == 0x0407);
    pci.write(0, cfg::cache_line_size, 0x10, 1);
    pci.write(0, cfg::interrupt_line, 0x0b, 1);
    CHECK(pci.read(0, cfg::cache_line_size, 1) == 0x10);
    CHECK(pci.read(0, cfg::interrupt_line, 1) == 0x0b);
}

TEST_CASE("firmware sizes BARs through ECAM: a 64-bit prefetchable BAR reads back ~(size - 1) over both halves, "
          "a 32-bit one its own size, an unimplemented one 0, and each keeps its type bits",
          "[pci]") {
    qomem_test::leak_check leaks;
    virtio_machine r;
    plug_function(r, "fn");
    ecam_driver pci(*r.as, r.ecam_base);
    CHECK(pci.read(0, cfg::bar0) == 0x0);         // 32-bit, not prefetchable, address 0
    CHECK(pci.read(0, cfg::bar0 + 8) == 0xc);     // BAR 2: 64-bit, prefetchable
    pci.write(0, cfg::bar0 + 8, 0xffffffff);
    pci.write(0, cfg::bar0 + 12, 0xffffffff);
    CHECK(pci.read(0, cfg::bar0 + 8) == 0xffff000c); // 64 KiB, type bits kept
    CHECK(pci.read(0, cfg::bar0 + 12) == 0xffffffff);
    pci.write(0, cfg::bar0 + 4, 0xffffffff); // BAR 1: nothing there
    CHECK(pci.read(0, cfg::bar0 + 4) == 0);

    const auto b0 = pci.size_bar(0, 0);
    CHECK(b0.size == 0x1000);
    CHECK_FALSE(b0.is64);
    CHECK_FALSE(b0.prefetch);
    const auto b2 = pci.size_bar(0, 2);
    CHECK(b2.size == 0x10000);
    CHECK(b2.is64);
    CHECK(b2.prefetch);
    CHECK(pci.size_bar(0, 1).size == 0);
    CHECK(pci.size_bar(0, 4).size == 0);
    CHECK(pci.size_bar(0, 5).size == 0);
}

TEST_CASE("a BAR appears in the guest's memory at the address firmware writes once memory decoding is on, moves "
          "when rewritten, and leaves when decoding is turned off — the guest reads and writes the function's "
          "RAM and MMIO there",
          "[pci]") {
    qomem_test::leak_check leaks;
    virtio_machine r;
    test_function& fn = plug_function(r, "fn");
    ecam_driver pci(*r.as, r.ecam_base);
    const hwaddr at = virtio_machine::pci_window + 0x10000000; // above 4 GiB: the high half matters
    pci.write(0, cfg::bar0 + 8, static_cast<std::uint32_t>(at) | 0xc);
    pci.write(0, cfg::bar0 + 12, static_cast<std::uint32_t>(at >> 32));
    qomem::memtx_result res;
    (void)bytes_at(*r.as, at, 4, res);
    CHECK(res == qomem::memtx_decode_error); // decoding still off
    CHECK_FALSE(fn.bar_address(2));

    pci.write(0, cfg::command, cfg::command_memory, 2);
    REQUIRE(fn.bar_address(2) == std::optional<hwaddr>(at));
    const std::array<std::uint8_t, 4> data{0xde, 0xad, 0xbe, 0xef};
    REQUIRE(r.as->write(at + 0x100, data.data(), data.size()) == qomem::memtx_ok);
    CHECK(std::memcmp(fn.ram->host_ptr() + 0x100, data.data(), data.size()) == 0);
    CHECK(bytes_at(*r.as, at + 0x100, 4, res) == std::vector<std::uint8_t>(data.begin(), data.end()));
    CHECK(res == qomem::memtx_ok);

    // Moved: gone from the old place, the same memory at the new one.
    const hwaddr moved = at + 0x100000;
    pci.write(0, cfg::bar0 + 8, static_cast<std::uint32_t>(moved) | 0xc);
    CHECK(fn.bar_address(2) == std::optional<hwaddr>(moved));
    (void)bytes_at(*r.as, at + 0x100, 4, res);
    CHECK(res == qomem::memtx_decode_error);
    CHECK(bytes_at(*r.as, moved + 0x100, 4, res) == std::vector<std::uint8_t>(data.begin(), data.end()));
    CHECK(res == qomem::memtx_ok);

    // The 32-bit MMIO BAR in the low window: the guest's accesses reach the function's ops.
    pci.place_bar(0, 0, virtio_machine::pci_window32 + 0x3000);
    CHECK(fn.bar_address(0) == std::optional<hwaddr>(virtio_machine::pci_window32 + 0x3000));
    qomem_test::guest_write32(*r.as, virtio_machine::pci_window32 + 0x3010, 0x1234);
    CHECK(fn.regs.calls == std::vector<std::string>{"w 0x10/4=0x1234"});

    pci.write(0, cfg::command, 0, 2);
    CHECK_FALSE(fn.bar_address(2));
    CHECK_FALSE(fn.bar_address(0));
    (void)bytes_at(*r.as, moved + 0x100, 4, res);
    CHECK(res == qomem::memtx_decode_error);
}

TEST_CASE("with decoding on, a BAR at address 0, at all ones (being sized), or a 32-bit BAR reaching 4 GiB - 1 "
          "stays unmapped, as in QEMU",
          "[pci]") {
    qomem_test::leak_check leaks;
    virtio_machine r;
    test_function& fn = plug_function(r, "fn");
    ecam_driver pci(*r.as, r.ecam_base);
    pci.write(0, cfg::command, cfg::command_memory, 2);
    CHECK_FALSE(fn.bar_address(2)); // address 0
    CHECK_FALSE(fn.bar_address(0));
    pci.write(0, cfg::bar0 + 8, 0xffffffff);
    pci.write(0, cfg::bar0 + 12, 0xffffffff); // the last 64 KiB of the space: "being sized"
    CHECK_FALSE(fn.bar_address(2));
    pci.write(0, cfg::bar0 + 12, 0x7fffffff); // the same offset in a lower 4 GiB: mapped
    CHECK(fn.bar_address(2) == std::optional<hwaddr>(0x7fffffffffff0000));
    pci.write(0, cfg::bar0, 0xfffff000); // a 32-bit BAR ending at 0xffffffff
    CHECK_FALSE(fn.bar_address(0));
    pci.write(0, cfg::bar0, 0xffffe000); // one page lower
    CHECK(fn.bar_address(0) == std::optional<hwaddr>(0xffffe000));
}

TEST_CASE("the ECAM window answers all ones for an absent function, for another bus and for registers past 0xff, "
          "and ignores writes there",
          "[pci]") {
    qomem_test::leak_check leaks;
    virtio_machine r(2); // ECAM decodes buses 0 and 1; only bus 0 has functions
    test_function& fn = plug_function(r, "fn");
    ecam_driver pci(*r.as, r.ecam_base);
    CHECK(pci.read(8, cfg::vendor_id) == 0xffffffff); // slot 1: empty
    CHECK(pci.read(8, cfg::vendor_id, 2) == 0xffff);
    CHECK(pci.read(1, cfg::vendor_id, 1) == 0xff); // function 1 of slot 0
    CHECK(pci.read(0, cfg::vendor_id, 4, 1) == 0xffffffff); // bus 1
    CHECK(pci.read(0, 0x100) == 0xffffffff);                // PCIe extended space: not modelled
    CHECK(pci.read(0, 0xffc) == 0xffffffff);
    pci.write(0, 0x104, 0);
    pci.write(0, cfg::command, cfg::command_memory, 2, 1); // bus 1: nobody
    pci.write(8, cfg::command, cfg::command_memory, 2);    // slot 1: nobody
    CHECK(pci.read(0, cfg::command, 2) == 0);
    CHECK(pci.read(0, cfg::vendor_id) == 0x56781234);
    CHECK(fn.regs.calls.empty());
}

TEST_CASE("the capability list: status bit 4, the pointer at 0x34, each capability at a dword boundary and chained "
          "to the next — an empty list clears both",
          "[pci]") {
    qomem_test::leak_check leaks;
    virtio_machine r;
    std::vector<qomem::pci_capability> caps{{0x09, {7, 1, 2, 3, 4}},  // 7 bytes: the next at +8
                                            {0x05, {0xaa, 0xbb}},     // MSI-like: 4 bytes
                                            {0x09, {6, 9, 9, 9}}};    // 6 bytes
    test_function& fn = plug_function(r, "fn", {}, caps);
    ecam_driver pci(*r.as, r.ecam_base);
    CHECK(pci.read(0, cfg::status, 2) == cfg::status_cap_list);
    CHECK(pci.read(0, cfg::capability_list, 1) == 0x40);
    CHECK(pci.find_capabilities(0, 0x09) == std::vector<std::uint8_t>{0x40, 0x4c});
    CHECK(pci.find_capabilities(0, 0x05) == std::vector<std::uint8_t>{0x48});
    CHECK(pci.read(0, 0x40) == 0x01074809); // id 09, next 48, then 7, 1
    CHECK(pci.read(0, 0x48) == 0xbbaa4c05);
    CHECK(pci.read(0, 0x4c) == 0x09060009); // the last: next 0
    CHECK(qomem::pci_device::static_type().name == std::string_view("pci-device"));
    {
        std::lock_guard writer(r.m->memory());
        fn.set_capabilities({});
    }
    CHECK(pci.read(0, cfg::status, 2) == 0);
    CHECK(pci.read(0, cfg::capability_list, 1) == 0);
    CHECK(pci.read(0, 0x40) == 0);
    CHECK(pci.find_capabilities(0, 0x09).empty());
}

TEST_CASE("unplugging a PCI function takes it off the bus: its configuration space reads all ones, its BAR leaves "
          "the guest's memory, and it is finalized",
          "[pci][lifetime]") {
    qomem_test::leak_check leaks;
    virtio_machine r;
    test_function& fn = plug_function(r, "fn");
    ecam_driver pci(*r.as, r.ecam_base);
    const hwaddr at = virtio_machine::pci_window + 0x200000;
    pci.place_bar(0, 2, at);
    qomem::memtx_result res;
    (void)bytes_at(*r.as, at, 8, res);
    REQUIRE(res == qomem::memtx_ok);
    const std::size_t regions_before = qomem_test::live_count("memory-region");

    qomem::unparent(fn);
    CHECK(qomem_test::live_count("test-pci-function") == 0);
    CHECK(qomem_test::live_count("memory-region") == regions_before - 2); // its RAM and MMIO
    CHECK(pci.read(0, cfg::vendor_id) == 0xffffffff);
    CHECK(pci.read(0, cfg::bar0 + 8) == 0xffffffff);
    (void)bytes_at(*r.as, at, 8, res);
    CHECK(res == qomem::memtx_decode_error);
}

TEST_CASE("slots: realize takes the first free slot unless one is set — a taken slot, a realize without a PCI bus, "
          "a BAR that is not a power of two or does not fit, and a config access outside 256 bytes are misuse, "
          "reported before anything changes",
          "[pci][misuse]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    virtio_machine r;
    test_function& a = plug_function(r, "a");
    test_function& b = plug_function(r, "b");
    test_function& c = plug_function(r, "c", 0x1a); // slot 3, function 2
    CHECK(a.devfn() == std::optional<std::uint8_t>(0x00));
    CHECK(b.devfn() == std::optional<std::uint8_t>(0x08));
    CHECK(c.devfn() == std::optional<std::uint8_t>(0x1a));
    ecam_driver pci(*r.as, r.ecam_base);
    CHECK(pci.read(0x1a, cfg::vendor_id, 2) == 0x1234);

    auto d = qomem::make<test_function>();
    d->set_devfn(0x08);
    d->plug_into(r.host->bus());
    r.add("d", d);
    REQUIRE_THROWS_AS(d->realize(), qomem::assertion_failure);
    CHECK_FALSE(d->realized());
    CHECK(r.host->bus().find(0x08) == &b);

    auto orphan = qomem::make<test_function>();
    REQUIRE_THROWS_AS(orphan->realize(), qomem::assertion_failure);
    CHECK_FALSE(orphan->realized());

    auto odd = qomem::make_ram(nullptr, "odd", 0x3000);
    REQUIRE_THROWS_AS(d->register_bar(1, *odd, qomem::pci_bar_type::mem32), qomem::assertion_failure);
    REQUIRE_THROWS_AS(d->register_bar(5, *d->ram, qomem::pci_bar_type::mem64), qomem::assertion_failure);
    CHECK(d->bar_region(1) == nullptr);
    CHECK(d->bar_region(5) == nullptr);
    REQUIRE_THROWS_AS(a.register_bar(4, *a.ram, qomem::pci_bar_type::mem32), qomem::assertion_failure); // realized
    REQUIRE_THROWS_AS(a.config_read(0xfe, 4), qomem::assertion_failure);
    REQUIRE_THROWS_AS(a.config_write(0x100, 0, 1), qomem::assertion_failure);
    REQUIRE_THROWS_AS(a.config_read(0, 3), qomem::assertion_failure);
    REQUIRE_THROWS_AS(a.set_devfn(0x10), qomem::assertion_failure);
    CHECK(a.devfn() == std::optional<std::uint8_t>(0));
}
