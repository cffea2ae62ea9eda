// tests/memory_region_test.cpp — memory regions: who holds whom, in which
// order things are finalized, what misuse is caught, and how a region tree
// flattens (each expected view worked out by hand from the rules in
// tests/conformance/README.md).
//
// Every scenario starts with a qomem_test::leak_check, so it ends by requiring
// that no qomem object is left alive.

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <qomem/address_space.hpp>
#include <qomem/assert.hpp>
#include <qomem/device.hpp>
#include <qomem/machine.hpp>
#include <qomem/error.hpp>
#include <qomem/flat_view.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/mtree.hpp>
#include <qomem/object.hpp>

#include "test_support.hpp"

namespace {

using qomem::hwaddr;
using qomem::u128;
using strings = std::vector<std::string>;

constexpr hwaddr max_addr = ~hwaddr{0};

/// A flat view as one short line per range: "start-last name[ @offset][ ro][ nv]".
strings ranges_of(const qomem::flat_view& v) {
    strings out;
    for (const qomem::flat_range& r : v.ranges()) {
        std::string s = fmt::format("{:x}-{:x} {}", r.start, r.last(), r.mr->region_name());
        if (r.offset_in_region) s += fmt::format(" @{:x}", r.offset_in_region);
        if (r.readonly) s += " ro";
        if (r.nonvolatile) s += " nv";
        if (!r.romd_mode) s += " !romd";
        out.push_back(std::move(s));
    }
    return out;
}
strings ranges_of(const qomem::address_space& as) { return ranges_of(*as.view()); }

/// `info mtree -f` restricted to the given address spaces, in that order.
std::string flat_text(std::vector<const qomem::address_space*> spaces) {
    return qomem::info_mtree(spaces, {.flatview = true});
}
/// `info mtree` (the tree) restricted to the given address spaces.
std::string tree_text(std::vector<const qomem::address_space*> spaces) {
    return qomem::info_mtree(spaces, {});
}

/// Names of the subregions of `c`, in list (= render) order.
strings subregion_names(const qomem::memory_region& c) {
    strings out;
    c.for_each_subregion([&](const qomem::memory_region& s) { out.push_back(s.region_name()); });
    return out;
}

std::size_t live_regions() {
    const auto live = qomem::live_objects();
    const auto it = live.find("memory-region");
    return it == live.end() ? 0 : it->second;
}

qomem::memory_region* region_child(const qomem::object& owner, std::string_view name) {
    return qomem::dynamic_cast_to<qomem::memory_region>(owner.child(name));
}

/// Runs `f`, requires it to throw qomem::region_error, and returns its message.
template <class F>
std::string region_error_message(F&& f) {
    try {
        f();
    } catch (const qomem::region_error& e) {
        return e.what();
    }
    FAIL("expected a qomem::region_error");
    return {};
}

// ---- test devices ------------------------------------------------------------

/// A device that notes in the test's log when its destructor runs, i.e. after
/// it was finalized and every property released, with how many memory
/// regions were still alive at that moment.
class probe_device : public qomem::device {
    QOMEM_OBJECT(probe_device, "probe-device", qomem::device)
public:
    probe_device(qomem_test::event_log& log, std::string tag) : log_(&log), tag_(std::move(tag)) {}
    ~probe_device() override {
        log_->add(fmt::format("destroyed {} ({} regions alive)", tag_, live_regions()));
    }

private:
    qomem_test::event_log* log_;
    std::string tag_;
};

/// A device with its own DMA address space, rooted at a region it owns
/// (QEMU's PCI bus-master address space, in miniature). It destroys the
/// address space in its unrealize step, as address_space.hpp asks.
class dma_engine : public probe_device {
    QOMEM_OBJECT(dma_engine, "dma-engine", probe_device)
public:
    using probe_device::probe_device;
    const qomem::address_space* dma_as() const { return as_ ? &*as_ : nullptr; }

protected:
    void do_realize() override {
        auto root = qomem::make_container(*this, "dma-root", 0x10000);
        auto buf = qomem::make_ram(*this, "dma-buf", 0x1000);
        auto regs = qomem::make_reservation(*this, "dma-regs", 0x100);
        root->add_subregion(0, *buf);
        root->add_subregion(0x1000, *regs);
        as_.emplace(*root, "dma");
    }
    void do_unrealize() noexcept override { as_.reset(); }

private:
    std::optional<qomem::address_space> as_;
};

/// A device that maps a buffer of its own into the system memory while
/// realized, and DMA-maps whatever an address space shows at an address:
/// either by taking a region_ref to the region found through the flat view,
/// or through address_space::map (which takes the same kind of reference).
class bus_master : public probe_device {
    QOMEM_OBJECT(bus_master, "bus-master", probe_device)
public:
    bus_master(qomem_test::event_log& log, std::string tag, qomem::memory_region& sys)
        : probe_device(log, std::move(tag)), sys_(&sys) {}

    qomem::memory_region* dma_ref(const qomem::address_space& as, hwaddr addr) {
        const qomem::flat_range* r = as.view()->lookup(addr);
        if (!r) return nullptr;
        ref_ = qomem::region_ref(*r->mr);
        return ref_.get();
    }
    qomem::memory_region* dma_map(qomem::address_space& as, hwaddr addr, hwaddr len) {
        as_ = &as;
        mapping_ = as.map(addr, len, /*is_write=*/true);
        return mapping_.region();
    }
    /// The DMA completes: drops the mapping, which may finalize this device.
    /// Touch nothing of it afterwards.
    void dma_complete() {
        if (mapping_)
            as_->unmap(mapping_, mapping_.size()); // its last step may free *this
        else
            ref_.reset();
    }

protected:
    void do_realize() override {
        auto buf = qomem::make_ram(*this, "bm-buf", 0x1000);
        sys_->add_subregion(0x4000, *buf);
        buf_ = buf.get();
    }
    void do_unrealize() noexcept override { sys_->del_subregion(*buf_); }

private:
    qomem::memory_region* sys_;
    qomem::memory_region* buf_ = nullptr;
    qomem::region_ref ref_;
    qomem::address_space* as_ = nullptr;
    qomem::dma_mapping mapping_;
};

/// A NIC whose RAM and MMIO are mapped into the system memory while realized.
/// It unmaps its MMIO on unrealize, and its RAM only if told to.
class nic_device : public probe_device {
    QOMEM_OBJECT(nic_device, "nic-device", probe_device)
public:
    nic_device(qomem_test::event_log& log, qomem::memory_region& sys, bool unmap_ram)
        : probe_device(log, "nic"), sys_(&sys), unmap_ram_(unmap_ram) {}

protected:
    void do_realize() override {
        auto ram = qomem::make_ram(*this, "nic-ram", 0x1000);
        auto mmio = qomem::make_reservation(*this, "nic-mmio", 0x100);
        sys_->add_subregion(0x10000, *ram);
        sys_->add_subregion(0x20000, *mmio);
        ram_ = ram.get();
        mmio_ = mmio.get();
    }
    void do_unrealize() noexcept override {
        sys_->del_subregion(*mmio_);
        if (unmap_ram_) sys_->del_subregion(*ram_);
    }

private:
    qomem::memory_region* sys_;
    bool unmap_ram_;
    qomem::memory_region* ram_ = nullptr;
    qomem::memory_region* mmio_ = nullptr;
};

} // namespace

// ============================================================================
// References and the lifetime model
// ============================================================================

TEST_CASE("memory_region_ref refs an owned region itself and leaves its owner's count alone, "
          "and changes nothing on an ownerless region",
          "[memory_region][lifetime]") {
    qomem_test::leak_check leaks;
    auto root = qomem::container::make_root();

    SECTION("a region with an owner") {
        auto dev = qomem::make<qomem::device>();
        root->add_child("dev", *dev);
        auto mr = qomem::make_ram(*dev, "ram", 0x1000);
        REQUIRE(mr->counted());
        REQUIRE(mr->owner() == dev.get());
        const auto dev_refs = dev->ref_count();
        REQUIRE(dev_refs == 2); // our handle + root's child property
        REQUIRE(mr->ref_count() == 2); // our handle + dev's child property

        qomem::memory_region_ref(*mr);
        CHECK(mr->ref_count() == 3);
        CHECK(dev->ref_count() == dev_refs);
        {
            qomem::region_ref held(*mr);
            CHECK(mr->ref_count() == 4);
            CHECK(dev->ref_count() == dev_refs);
        }
        CHECK(mr->ref_count() == 3);
        qomem::memory_region_unref(*mr);
        CHECK(mr->ref_count() == 2);
        CHECK(dev->ref_count() == dev_refs);
    }

    SECTION("an ownerless orphan") {
        auto mr = qomem::make_ram(nullptr, "orphan", 0x1000);
        REQUIRE_FALSE(mr->counted());
        REQUIRE(mr->owner() == nullptr);
        REQUIRE(mr->parent() == nullptr);
        REQUIRE(mr->ref_count() == 1);
        qomem::memory_region_ref(*mr);
        CHECK(mr->ref_count() == 1);
        {
            qomem::region_ref held(*mr);
            CHECK(mr->ref_count() == 1);
        }
        qomem::memory_region_unref(*mr);
        CHECK(mr->ref_count() == 1);
    }

    SECTION("an ownerless region with a home in the tree") {
        auto mr = qomem::make_ram(qomem::region_owner::ownerless_in(*root), "homed", 0x1000);
        REQUIRE_FALSE(mr->counted());
        REQUIRE(mr->owner() == nullptr);
        REQUIRE(mr->parent() == root.get());
        REQUIRE_FALSE(mr->follows_owner_out_of_tree());
        REQUIRE(mr->ref_count() == 2);
        const auto root_refs = root->ref_count();
        qomem::memory_region_ref(*mr);
        CHECK(mr->ref_count() == 2);
        CHECK(root->ref_count() == root_refs);
        qomem::memory_region_unref(*mr);
        CHECK(mr->ref_count() == 2);
    }
}

TEST_CASE("while its owner is in the tree a region is held by the owner's child property, and "
          "unparenting the owner unparents its regions, each of which then holds the owner "
          "until it is freed, so the owner is finalized after its regions",
          "[memory_region][lifetime]") {
    qomem_test::leak_check leaks;
    qomem_test::event_recorder rec;
    auto root = qomem::container::make_root();
    rec.label(*root, "root");

    auto dev = qomem::make<probe_device>(rec.log(), "dev");
    rec.label(*dev, "dev");
    root->add_child("dev", *dev);
    auto mmio = qomem::make_reservation(*dev, "mmio", 0x100);
    auto ram = qomem::make_ram(*dev, "ram", 0x1000);
    rec.label(*mmio, "mmio");
    rec.label(*ram, "ram");

    REQUIRE(dev->child("mmio[0]") == mmio.get());
    REQUIRE(dev->child("ram[0]") == ram.get());
    REQUIRE(ram->parent() == dev.get());
    REQUIRE(ram->owner() == dev.get());
    REQUIRE(ram->follows_owner_out_of_tree());

    probe_device* d = dev.get();
    qomem::memory_region* mmio_p = mmio.get();
    qomem::memory_region* ram_p = ram.get();
    mmio.reset();
    ram.reset();
    dev.reset();
    // The child properties are the only holders; the regions hold nothing.
    REQUIRE(mmio_p->ref_count() == 1);
    REQUIRE(ram_p->ref_count() == 1);
    REQUIRE(d->ref_count() == 1); // root's child property only
    REQUIRE(rec.take().empty());

    SECTION("nothing else holds the regions: all go at the unparent, regions first") {
        qomem::unparent(*d);
        CHECK(rec.take() == strings{
                                "unparenting dev from root",
                                "unparenting mmio from dev",
                                "finalizing mmio",
                                "unparenting ram from dev",
                                "finalizing ram",
                                "finalizing dev",
                                "destroyed dev (0 regions alive)",
                            });
    }

    SECTION("a region still referenced keeps its owner, holding exactly one reference to it") {
        qomem::region_ref held(*ram_p);
        qomem::unparent(*d);
        CHECK(rec.take() == strings{
                                "unparenting dev from root",
                                "unparenting mmio from dev",
                                "finalizing mmio",
                                "unparenting ram from dev",
                            });
        CHECK(d->parent() == nullptr);
        CHECK(d->ref_count() == 1); // held by the unparented ram
        CHECK(ram_p->parent() == nullptr);
        CHECK(ram_p->owner() == d);
        CHECK(ram_p->ref_count() == 1); // `held`

        held.reset();
        CHECK(rec.take() == strings{
                                "finalizing ram",
                                "finalizing dev",
                                "destroyed dev (0 regions alive)",
                            });
    }
}

// ============================================================================
// The cycles that piggybacking on owners used to create
// ============================================================================

TEST_CASE("no cycle: a container and its subregion with the same owner are freed when the owner "
          "is unparented, the container first and the owner last",
          "[memory_region][lifetime][cycle]") {
    qomem_test::leak_check leaks;
    qomem_test::event_recorder rec;
    auto root = qomem::container::make_root();
    auto dev = qomem::make<probe_device>(rec.log(), "dev");
    rec.label(*dev, "dev");
    root->add_child("dev", *dev);

    qomem::ref_ptr<qomem::memory_region> bar, regs, buf;
    strings expected;
    SECTION("container created before its subregions") {
        bar = qomem::make_container(*dev, "bar", 0x2000);
        regs = qomem::make_reservation(*dev, "regs", 0x100);
        buf = qomem::make_ram(*dev, "buf", 0x1000);
        // bar's finalizer only drops its own references; the subregions go
        // when dev unparents them, in creation order.
        expected = {"finalizing bar", "finalizing regs", "finalizing buf", "finalizing dev"};
    }
    SECTION("subregions created before their container") {
        regs = qomem::make_reservation(*dev, "regs", 0x100);
        buf = qomem::make_ram(*dev, "buf", 0x1000);
        bar = qomem::make_container(*dev, "bar", 0x2000);
        // The subregions are unparented first but survive in bar, whose
        // finalizer then releases them in list order (last added first).
        expected = {"finalizing bar", "finalizing buf", "finalizing regs", "finalizing dev"};
    }
    rec.label(*bar, "bar");
    rec.label(*regs, "regs");
    rec.label(*buf, "buf");
    bar->add_subregion(0, *regs);
    bar->add_subregion(0x1000, *buf);
    REQUIRE(regs->ref_count() == 3); // handle, dev's child property, bar
    REQUIRE(dev->ref_count() == 2);  // handle, root: the subregion refs did not touch it

    probe_device* d = dev.get();
    bar.reset();
    regs.reset();
    buf.reset();
    dev.reset();
    qomem::unparent(*d);
    CHECK(qomem_test::only(rec.take(), "finalizing ") == expected);
    CHECK(qomem::live_object_count() == 1); // the root container
}

TEST_CASE("no cycle: a device whose DMA address space is rooted at its own region is freed "
          "after its regions, because it destroys the address space when unrealized",
          "[memory_region][lifetime][cycle]") {
    qomem_test::leak_check leaks;
    qomem_test::event_recorder rec;
    auto root = qomem::container::make_root();
    auto dev = qomem::make<dma_engine>(rec.log(), "dev");
    rec.label(*dev, "dev");
    root->add_child("dev", *dev);
    dev->realize();

    qomem::memory_region* as_root = region_child(*dev, "dma-root[0]");
    REQUIRE(as_root);
    rec.label(*as_root, "dma-root");
    rec.label(*region_child(*dev, "dma-buf[0]"), "dma-buf");
    rec.label(*region_child(*dev, "dma-regs[0]"), "dma-regs");
    REQUIRE(dev->dma_as());
    CHECK(&dev->dma_as()->root() == as_root);
    CHECK(ranges_of(*dev->dma_as()) == strings{"0-fff dma-buf", "1000-10ff dma-regs"});
    // The child property, the address space and its flat view hold the root;
    // none of that reaches the device.
    CHECK(as_root->ref_count() == 3);
    CHECK(dev->ref_count() == 2);

    dma_engine* d = dev.get();
    dev.reset();
    qomem::unparent(*d);
    CHECK(qomem_test::only(rec.take(), "finalizing ") ==
          strings{"finalizing dma-root", "finalizing dma-buf", "finalizing dma-regs",
                  "finalizing dev"});
    CHECK(qomem::live_object_count() == 1); // the root container
}

TEST_CASE("no cycle: a device that DMA-maps its own region through an address space is not "
          "finalized while the mapping is held across its unplug, and is finalized after the "
          "region once the mapping is dropped",
          "[memory_region][lifetime][cycle]") {
    qomem_test::leak_check leaks;
    qomem_test::event_recorder rec;
    auto board = qomem::make<qomem::device>();
    auto sys = qomem::make_container(*board, "system", qomem::u128_2_64);
    qomem::address_space as(*sys, "memory");
    auto root = qomem::container::make_root();

    auto dev = qomem::make<bus_master>(rec.log(), "bm", *sys);
    rec.label(*dev, "bm");
    root->add_child("bm", *dev);
    dev->realize();
    qomem::memory_region* buf = region_child(*dev, "bm-buf[0]");
    REQUIRE(buf);
    rec.label(*buf, "bm-buf");
    REQUIRE(ranges_of(as) == strings{"4000-4fff bm-buf"});

    const bool through_map = GENERATE(false, true);
    CAPTURE(through_map);
    if (through_map) {
        REQUIRE(dev->dma_map(as, 0x4000, 0x100) == buf);
    } else {
        REQUIRE(dev->dma_ref(as, 0x4010) == buf);
    }
    std::memset(buf->host_ptr(), 0x5a, 16);

    bus_master* d = dev.get();
    dev.reset();
    qomem::unparent(*d);
    // Unrealize unmapped the buffer from the system memory ...
    CHECK(as.view()->lookup(0x4010) == nullptr);
    CHECK(ranges_of(as).empty());
    // ... but the DMA mapping keeps it, and it keeps the device.
    CHECK(qomem_test::only(rec.take(), "finalizing ").empty());
    CHECK(d->ref_count() == 1);
    CHECK(buf->parent() == nullptr);
    CHECK(buf->owner() == d);
    CHECK(buf->ref_count() == 1);
    CHECK(std::to_integer<int>(buf->host_ptr()[15]) == 0x5a);

    d->dma_complete();
    CHECK(rec.take() == strings{"finalizing bm-buf", "finalizing bm",
                                "destroyed bm (1 regions alive)"}); // 1: the board's system
}

TEST_CASE("hot-unplug: a device removed while its region is still referenced is finalized only "
          "after that reference goes, regions first, and the region keeps working until then",
          "[memory_region][lifetime]") {
    qomem_test::leak_check leaks;
    qomem_test::event_recorder rec;
    auto board = qomem::make<qomem::device>();
    auto sys = qomem::make_container(*board, "system", qomem::u128_2_64);
    rec.label(*sys, "system");
    qomem::address_space as(*sys, "memory");
    auto root = qomem::container::make_root();
    qomem::machine& m = qomem::add_machine(*root);

    const bool still_mapped = GENERATE(true, false);
    CAPTURE(still_mapped);
    auto dev = qomem::make<nic_device>(rec.log(), *sys, /*unmap_ram=*/!still_mapped);
    rec.label(*dev, "nic");
    m.peripheral().add_child("nic0", *dev);
    dev->realize();
    qomem::memory_region* ram = region_child(*dev, "nic-ram[0]");
    qomem::memory_region* mmio = region_child(*dev, "nic-mmio[0]");
    REQUIRE(ram);
    REQUIRE(mmio);
    rec.label(*ram, "nic-ram");
    rec.label(*mmio, "nic-mmio");
    REQUIRE(ranges_of(as) == strings{"10000-10fff nic-ram", "20000-200ff nic-mmio"});
    std::memcpy(ram->host_ptr(), "frame", 6);

    nic_device* d = dev.get();
    dev.reset();

    if (still_mapped) {
        // The board's container still holds the RAM, e.g. a BAR the device
        // did not unmap: the region stays in the flat view and usable.
        qomem::unparent(*d);
        CHECK(qomem_test::only(rec.take(), "finalizing ") == strings{"finalizing nic-mmio"});
        CHECK(d->ref_count() == 1);
        CHECK(ram->container() == sys.get());
        CHECK(ranges_of(as) == strings{"10000-10fff nic-ram"});
        const qomem::flat_range* r = as.view()->lookup(0x10002);
        REQUIRE(r);
        CHECK(r->mr == ram);
        CHECK(std::string(reinterpret_cast<const char*>(ram->host_ptr())) == "frame");

        sys->del_subregion(*ram);
    } else {
        // Someone (a DMA in flight, a backend) holds a reference of its own.
        qomem::region_ref held(*ram);
        qomem::unparent(*d);
        CHECK(qomem_test::only(rec.take(), "finalizing ") == strings{"finalizing nic-mmio"});
        CHECK(d->ref_count() == 1);
        CHECK(ranges_of(as).empty());
        CHECK(std::string(reinterpret_cast<const char*>(ram->host_ptr())) == "frame");
        std::memcpy(ram->host_ptr(), "reply", 6);
        CHECK(std::string(reinterpret_cast<const char*>(ram->host_ptr())) == "reply");

        held.reset();
    }
    CHECK(rec.take() == strings{"finalizing nic-ram", "finalizing nic",
                                "destroyed nic (1 regions alive)"}); // 1: system
}

// ============================================================================
// Misuse, caught through the assertion handler, with the state unchanged
// ============================================================================

TEST_CASE("misuse of the region topology is reported through the assertion handler and changes "
          "nothing",
          "[memory_region][misuse]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    auto dev = qomem::make<qomem::device>();
    auto sys = qomem::make_container(*dev, "system", qomem::u128_2_64);
    auto c1 = qomem::make_container(*dev, "c1", 0x10000);
    auto c2 = qomem::make_container(*dev, "c2", 0x10000);
    auto ram = qomem::make_ram(*dev, "ram", 0x1000);
    sys->add_subregion(0, *c1);
    sys->add_subregion(0x10000, *c2);
    c1->add_subregion(0x100, *ram);
    qomem::address_space as(*sys, "memory");
    const qomem::flat_view* view = as.view().get();
    const strings ranges = ranges_of(as);
    REQUIRE(ranges == strings{"100-10ff ram"});
    const auto ram_refs = ram->ref_count();

    SECTION("adding a region that is already a subregion elsewhere") {
        REQUIRE_THROWS_AS(c2->add_subregion(0, *ram), qomem::assertion_failure);
        REQUIRE_THROWS_AS(c1->add_subregion(0x200, *ram), qomem::assertion_failure);
        CHECK(ram->container() == c1.get());
        CHECK(ram->addr() == 0x100);
        CHECK(c2->subregion_count() == 0);
        CHECK(subregion_names(*c1) == strings{"ram"});
    }
    SECTION("adding a subregion to an alias") {
        auto alias = qomem::make_alias(*dev, "alias", *c2, 0, 0x1000);
        auto other = qomem::make_ram(*dev, "other", 0x1000);
        const auto other_refs = other->ref_count();
        REQUIRE_THROWS_AS(alias->add_subregion(0, *other), qomem::assertion_failure);
        CHECK(alias->subregion_count() == 0);
        CHECK(other->container() == nullptr);
        CHECK(other->ref_count() == other_refs);
    }
    SECTION("deleting a region that is not a subregion of that container") {
        REQUIRE_THROWS_AS(c2->del_subregion(*ram), qomem::assertion_failure);
        auto loose = qomem::make_ram(*dev, "loose", 0x1000);
        REQUIRE_THROWS_AS(c1->del_subregion(*loose), qomem::assertion_failure);
        CHECK(ram->container() == c1.get());
        CHECK(subregion_names(*c1) == strings{"ram"});
        CHECK(loose->container() == nullptr);
    }
    SECTION("set_romd on a region that is not a ROM device") {
        REQUIRE_THROWS_AS(ram->set_romd(false), qomem::assertion_failure);
        CHECK(ram->romd_mode());
    }
    SECTION("set_alias_offset on a region that is not an alias") {
        REQUIRE_THROWS_AS(ram->set_alias_offset(0x10), qomem::assertion_failure);
    }
    SECTION("committing a transaction that was never opened") {
        REQUIRE_THROWS_AS(qomem::memory_region_transaction_commit(), qomem::assertion_failure);
        // The depth did not move: a balanced pair works, and one more commit
        // is refused again.
        qomem::memory_region_transaction_begin();
        REQUIRE_NOTHROW(qomem::memory_region_transaction_commit());
        REQUIRE_THROWS_AS(qomem::memory_region_transaction_commit(), qomem::assertion_failure);
    }

    // No render happened: the very same view, showing the same ranges.
    CHECK(as.view().get() == view);
    CHECK(ranges_of(as) == ranges);
    CHECK(ram->ref_count() == ram_refs);
}

TEST_CASE("dropping the last reference of an ownerless region that is still in use is reported "
          "and leaves the region alive",
          "[memory_region][misuse]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    auto dev = qomem::make<qomem::device>();
    auto box = qomem::make_container(*dev, "box", 0x10000);
    qomem::ref_ptr<qomem::memory_region> orphan = qomem::make_ram(nullptr, "orphan", 0x1000);
    REQUIRE_FALSE(orphan->counted());

    // Drop the handle's reference by hand: an assertion must never be thrown
    // out of ref_ptr's destructor. Take the reference out of the handle first,
    // so that the handle can never drop it a second time.
    auto drop_by_hand = [&](qomem::ref_ptr<qomem::memory_region>& handle) {
        qomem::memory_region* raw = handle.detach();
        REQUIRE_THROWS_AS(raw->unref(), qomem::assertion_failure);
        // Refused before anything changed: the reference is still ours;
        // give it back to the handle.
        handle = qomem::ref_ptr<qomem::memory_region>(raw, /*add_ref=*/false);
        CHECK(handle->ref_count() == 1);
    };

    SECTION("still a subregion") {
        box->add_subregion(0x1000, *orphan);
        REQUIRE(orphan->ref_count() == 1); // the container's use is not counted
        drop_by_hand(orphan);
        CHECK(orphan->container() == box.get());
        CHECK(subregion_names(*box) == strings{"orphan"});
        // Stop using it, then the last reference may go.
        box->del_subregion(*orphan);
        orphan.detach()->unref();
    }
    SECTION("still an alias target") {
        auto alias = qomem::make_alias(*dev, "alias", *orphan, 0, 0x1000);
        drop_by_hand(orphan);
        CHECK(alias->alias() == orphan.get());
        // Stop using it: the alias goes (it is dev's child, so delete that).
        alias.reset();
        dev->delete_property("alias[0]");
    }
    SECTION("still the root of an address space") {
        {
            qomem::address_space as(*orphan, "orphan-as");
            drop_by_hand(orphan);
            CHECK(&as.root() == orphan.get());
        }
    }
    CHECK(live_regions() == (orphan ? 2u : 1u)); // box, and orphan unless dropped
}

TEST_CASE("adding a region into a container it already leads back to throws region_error naming "
          "both, and changes nothing",
          "[memory_region][misuse][alias]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    auto dev = qomem::make<qomem::device>();
    auto outer = qomem::make_container(*dev, "outer-box", 0x100000);
    auto inner = qomem::make_container(*dev, "inner-box", 0x10000);
    auto ram = qomem::make_ram(*dev, "ram", 0x1000);
    outer->add_subregion(0, *ram);
    outer->add_subregion(0x10000, *inner);
    qomem::address_space as(*outer, "memory");
    const qomem::flat_view* view = as.view().get();
    REQUIRE(ranges_of(as) == strings{"0-fff ram"});

    SECTION("an alias of the container itself") {
        auto loop = qomem::make_alias(*dev, "loop-alias", *outer, 0, 0x1000);
        const auto refs = loop->ref_count();
        const std::string msg = region_error_message([&] { outer->add_subregion(0x8000, *loop); });
        CHECK_THAT(msg, Catch::Contains("'loop-alias'") && Catch::Contains("'outer-box'"));
        CHECK(loop->container() == nullptr);
        CHECK(loop->ref_count() == refs);
        CHECK(subregion_names(*outer) == strings{"inner-box", "ram"});
    }
    SECTION("an alias of the outer container added into the nested one") {
        auto loop = qomem::make_alias(*dev, "loop-alias", *outer, 0, 0x1000);
        const std::string msg = region_error_message([&] { inner->add_subregion(0, *loop); });
        CHECK_THAT(msg, Catch::Contains("'loop-alias'") && Catch::Contains("'inner-box'"));
        CHECK(loop->container() == nullptr);
        CHECK(inner->subregion_count() == 0);
    }
    SECTION("a chain of aliases leading back") {
        auto first = qomem::make_alias(*dev, "first-alias", *inner, 0, 0x1000);
        auto second = qomem::make_alias(*dev, "second-alias", *first, 0, 0x1000);
        const std::string msg = region_error_message([&] { inner->add_subregion(0, *second); });
        CHECK_THAT(msg, Catch::Contains("'second-alias'") && Catch::Contains("'inner-box'"));
        CHECK(inner->subregion_count() == 0);
        // Added elsewhere, the same alias is fine and shows inner's (empty) contents.
        outer->add_subregion(0x20000, *second);
        CHECK(second->container() == outer.get());
    }
    SECTION("a container into itself") {
        auto lone = qomem::make_container(*dev, "lone-box", 0x1000);
        const std::string msg = region_error_message([&] { lone->add_subregion(0, *lone); });
        CHECK_THAT(msg, Catch::Contains("'lone-box'"));
        CHECK(lone->subregion_count() == 0);
        CHECK(lone->container() == nullptr);
    }
    SECTION("a container into one of its own descendants") {
        auto deep = qomem::make_container(*dev, "deep-box", 0x1000);
        inner->add_subregion(0, *deep);
        view = as.view().get();
        const std::string msg = region_error_message([&] { deep->add_subregion(0, *outer); });
        CHECK_THAT(msg, Catch::Contains("'outer-box'") && Catch::Contains("'deep-box'"));
        CHECK(outer->container() == nullptr);
        CHECK(deep->subregion_count() == 0);
    }
    CHECK(as.view().get() == view);
    CHECK(ranges_of(as) == strings{"0-fff ram"});
}

// ============================================================================
// Flattening: each expected view below is worked out by hand from the rules
// ============================================================================

TEST_CASE("flat view: a higher priority wins where siblings overlap, among equal priorities the "
          "last added wins, and a negative priority makes a background",
          "[flat_view]") {
    qomem_test::leak_check leaks;
    auto dev = qomem::make<qomem::device>();
    auto sys = qomem::make_container(*dev, "system", qomem::u128_2_64);
    auto low = qomem::make_reservation(*dev, "low", 0x3000);   // [0, 0x3000) prio -1
    auto a = qomem::make_ram(*dev, "a", 0x1000);               // [0x1000, 0x2000)
    auto b = qomem::make_ram(*dev, "b", 0x1000);               // [0x1800, 0x2800)
    auto hi = qomem::make_reservation(*dev, "hi", 0x800);      // [0x2400, 0x2c00) prio 5
    qomem::address_space as(*sys, "memory");

    SECTION("b added after a: b wins their overlap") {
        sys->add_subregion(0, *low, -1);
        sys->add_subregion(0x1000, *a);
        sys->add_subregion(0x1800, *b);
        sys->add_subregion(0x2400, *hi, 5);
        CHECK(subregion_names(*sys) == strings{"hi", "b", "a", "low"});
        CHECK(flat_text({&as}) ==
              "FlatView #0\n"
              " AS \"memory\", root: system\n"
              " Root memory region: system\n"
              "  0000000000000000-0000000000000fff (prio -1, i/o): low\n"
              "  0000000000001000-00000000000017ff (prio 0, ram): a\n"
              "  0000000000001800-00000000000023ff (prio 0, ram): b\n"
              "  0000000000002400-0000000000002bff (prio 5, i/o): hi\n"
              "  0000000000002c00-0000000000002fff (prio -1, i/o): low @0000000000002c00\n"
              "\n");
    }
    SECTION("a added after b: a wins their overlap") {
        sys->add_subregion(0, *low, -1);
        sys->add_subregion(0x1800, *b);
        sys->add_subregion(0x1000, *a);
        sys->add_subregion(0x2400, *hi, 5);
        CHECK(subregion_names(*sys) == strings{"hi", "a", "b", "low"});
        CHECK(ranges_of(as) == strings{"0-fff low", "1000-1fff a", "2000-23ff b @800",
                                       "2400-2bff hi", "2c00-2fff low @2c00"});
    }
    SECTION("priorities are only compared between siblings") {
        auto lowbox = qomem::make_container(*dev, "lowbox", 0x2000);
        auto deep = qomem::make_ram(*dev, "deep", 0x2000);
        lowbox->add_subregion(0, *deep, 100);
        sys->add_subregion(0, *lowbox, -1);
        sys->add_subregion(0x1000, *a);
        CHECK(ranges_of(as) == strings{"0-fff deep", "1000-1fff a"});
    }
}

TEST_CASE("flat view: a container's gaps fall through to lower-priority siblings, while a "
          "terminating region fills the gaps its subregions leave (memory.rst's example)",
          "[flat_view]") {
    qomem_test::leak_check leaks;
    auto dev = qomem::make<qomem::device>();
    auto A = qomem::make_container(*dev, "A", 0x8000);
    auto C = qomem::make_reservation(*dev, "C", 0x6000);
    auto D = qomem::make_ram(*dev, "D", 0x1000);
    auto E = qomem::make_ram(*dev, "E", 0x1000);
    const bool b_terminates = GENERATE(false, true);
    CAPTURE(b_terminates);
    auto B = b_terminates ? qomem::make_reservation(*dev, "B", 0x4000)
                          : qomem::make_container(*dev, "B", 0x4000);
    B->add_subregion(0, *D);
    B->add_subregion(0x2000, *E);
    A->add_subregion(0, *C, 1);
    A->add_subregion(0x2000, *B, 2);
    qomem::address_space as(*A, "memory");

    const std::string head = "FlatView #0\n"
                             " AS \"memory\", root: A\n"
                             " Root memory region: A\n";
    if (!b_terminates) {
        // [CCCC][DDD][CCC][EEE][CCC]
        CHECK(flat_text({&as}) ==
              head + "  0000000000000000-0000000000001fff (prio 1, i/o): C\n"
                     "  0000000000002000-0000000000002fff (prio 0, ram): D\n"
                     "  0000000000003000-0000000000003fff (prio 1, i/o): C @0000000000003000\n"
                     "  0000000000004000-0000000000004fff (prio 0, ram): E\n"
                     "  0000000000005000-0000000000005fff (prio 1, i/o): C @0000000000005000\n"
                     "\n");
    } else {
        // [CCCC][DDD][BBB][EEE][BBB]
        CHECK(flat_text({&as}) ==
              head + "  0000000000000000-0000000000001fff (prio 1, i/o): C\n"
                     "  0000000000002000-0000000000002fff (prio 0, ram): D\n"
                     "  0000000000003000-0000000000003fff (prio 2, i/o): B @0000000000001000\n"
                     "  0000000000004000-0000000000004fff (prio 0, ram): E\n"
                     "  0000000000005000-0000000000005fff (prio 2, i/o): B @0000000000003000\n"
                     "\n");
    }
}

TEST_CASE("flat view: a subregion is cut at its container's end, and a terminating container "
          "shows itself around its subregions",
          "[flat_view]") {
    qomem_test::leak_check leaks;
    auto dev = qomem::make<qomem::device>();
    auto sys = qomem::make_container(*dev, "system", qomem::u128_2_64);
    auto P = qomem::make_reservation(*dev, "P", 0x1000);
    auto K = qomem::make_ram(*dev, "K", 0x1000);
    auto N = qomem::make_ram(*dev, "N", 0x1000);
    P->add_subregion(0x800, *K); // K's second half lies outside P
    sys->add_subregion(0x10000, *P);
    sys->add_subregion(0x11000, *N, -1);
    qomem::address_space as(*sys, "memory");
    CHECK(ranges_of(as) == strings{"10000-107ff P", "10800-10fff K", "11000-11fff N"});
}

TEST_CASE("flat view: an alias shows its target at the alias's place from alias_offset on, "
          "ignoring the target's own placement, and offsets of chained aliases add up",
          "[flat_view][alias]") {
    qomem_test::leak_check leaks;
    auto dev = qomem::make<qomem::device>();
    auto sys = qomem::make_container(*dev, "system", qomem::u128_2_64);
    auto ram = qomem::make_ram(*dev, "ram", 0x10000);
    auto lo = qomem::make_alias(*dev, "ram-lo", *ram, 0, 0x8000);
    auto hi = qomem::make_alias(*dev, "ram-hi", *ram, 0x8000, 0x8000);
    sys->add_subregion(0, *lo);
    sys->add_subregion(0x100000, *hi);
    qomem::address_space as(*sys, "memory");

    SECTION("as info mtree prints it") {
        CHECK(flat_text({&as}) ==
              "FlatView #0\n"
              " AS \"memory\", root: system\n"
              " Root memory region: system\n"
              "  0000000000000000-0000000000007fff (prio 0, ram): ram\n"
              "  0000000000100000-0000000000107fff (prio 0, ram): ram @0000000000008000\n"
              "\n");
        CHECK(tree_text({&as}) ==
              "address-space: memory\n"
              "  0000000000000000-ffffffffffffffff (prio 0, i/o): system\n"
              "    0000000000000000-0000000000007fff (prio 0, ram): alias ram-lo @ram "
              "0000000000000000-0000000000007fff\n"
              "    0000000000100000-0000000000107fff (prio 0, ram): alias ram-hi @ram "
              "0000000000008000-000000000000ffff\n"
              "\n"
              "memory-region: ram\n"
              "  0000000000000000-000000000000ffff (prio 0, ram): ram\n"
              "\n");
    }
    SECTION("the target's placement is ignored; its priority is what the ranges print") {
        sys->add_subregion(0x200000, *ram, 3);
        CHECK(flat_text({&as}) ==
              "FlatView #0\n"
              " AS \"memory\", root: system\n"
              " Root memory region: system\n"
              "  0000000000000000-0000000000007fff (prio 3, ram): ram\n"
              "  0000000000100000-0000000000107fff (prio 3, ram): ram @0000000000008000\n"
              "  0000000000200000-000000000020ffff (prio 3, ram): ram\n"
              "\n");
        ram->set_address(0x300000);
        CHECK(ranges_of(as) ==
              strings{"0-7fff ram", "100000-107fff ram @8000", "300000-30ffff ram"});
    }
    SECTION("an alias of an alias, and set_alias_offset on the inner one") {
        auto page = qomem::make_alias(*dev, "ram-hi-page", *hi, 0x1000, 0x1000);
        sys->add_subregion(0x400000, *page);
        CHECK(ranges_of(as) ==
              strings{"0-7fff ram", "100000-107fff ram @8000", "400000-400fff ram @9000"});
        hi->set_alias_offset(0x4000);
        CHECK(hi->alias_offset() == 0x4000);
        CHECK(ranges_of(as) ==
              strings{"0-7fff ram", "100000-107fff ram @4000", "400000-400fff ram @5000"});
    }
    SECTION("an alias reaching past its target's end shows only what the target has") {
        auto tail = qomem::make_alias(*dev, "tail", *ram, 0xf000, 0x2000);
        auto none = qomem::make_alias(*dev, "beyond", *ram, 0x20000, 0x1000);
        sys->add_subregion(0x500000, *tail);
        sys->add_subregion(0x600000, *none);
        CHECK(ranges_of(as) ==
              strings{"0-7fff ram", "100000-107fff ram @8000", "500000-500fff ram @f000"});
    }
    SECTION("a disabled target disappears from every alias of it") {
        ram->set_enabled(false);
        CHECK(ranges_of(as).empty());
    }
}

TEST_CASE("flat view: readonly and nonvolatile are inherited down through aliases and "
          "containers, showing readonly as rom and nonvolatile as an nv- prefix",
          "[flat_view][mtree]") {
    qomem_test::leak_check leaks;
    auto dev = qomem::make<qomem::device>();
    auto sys = qomem::make_container(*dev, "system", qomem::u128_2_64);
    auto r1 = qomem::make_ram(*dev, "r1", 0x1000);
    auto r1_ro = qomem::make_alias(*dev, "r1-ro", *r1, 0, 0x1000);
    r1_ro->set_readonly(true);
    auto ro_box = qomem::make_container(*dev, "ro-box", 0x1000);
    ro_box->set_readonly(true);
    auto r2 = qomem::make_ram(*dev, "r2", 0x1000);
    ro_box->add_subregion(0, *r2);
    auto nv_box = qomem::make_container(*dev, "nv-box", 0x2000);
    nv_box->set_nonvolatile(true);
    auto r3 = qomem::make_ram(*dev, "r3", 0x1000);
    auto io3 = qomem::make_reservation(*dev, "io3", 0x1000);
    nv_box->add_subregion(0, *r3);
    nv_box->add_subregion(0x1000, *io3);
    auto boot = qomem::make_rom(*dev, "boot", 0x1000);
    auto r4 = qomem::make_ram(*dev, "r4", 0x1000);
    r4->set_readonly(true);
    r4->set_nonvolatile(true);
    sys->add_subregion(0, *r1_ro);
    sys->add_subregion(0x1000, *ro_box);
    sys->add_subregion(0x2000, *nv_box);
    sys->add_subregion(0x4000, *boot);
    sys->add_subregion(0x5000, *r4);
    qomem::address_space as(*sys, "memory");

    CHECK(ranges_of(as) == strings{"0-fff r1 ro", "1000-1fff r2 ro", "2000-2fff r3 nv",
                                   "3000-3fff io3 nv", "4000-4fff boot ro", "5000-5fff r4 ro nv"});
    CHECK(flat_text({&as}) ==
          "FlatView #0\n"
          " AS \"memory\", root: system\n"
          " Root memory region: system\n"
          "  0000000000000000-0000000000000fff (prio 0, rom): r1\n"
          "  0000000000001000-0000000000001fff (prio 0, rom): r2\n"
          "  0000000000002000-0000000000002fff (prio 0, nv-ram): r3\n"
          "  0000000000003000-0000000000003fff (prio 0, nv-i/o): io3\n"
          "  0000000000004000-0000000000004fff (prio 0, rom): boot\n"
          "  0000000000005000-0000000000005fff (prio 0, nv-rom): r4\n"
          "\n");
    // The tree shows each region's own flags; an alias shows its target's
    // type, so a read-only alias of RAM still says "ram" (as QEMU's does).
    CHECK(tree_text({&as}) ==
          "address-space: memory\n"
          "  0000000000000000-ffffffffffffffff (prio 0, i/o): system\n"
          "    0000000000000000-0000000000000fff (prio 0, ram): alias r1-ro @r1 "
          "0000000000000000-0000000000000fff\n"
          "    0000000000001000-0000000000001fff (prio 0, i/o): ro-box\n"
          "      0000000000001000-0000000000001fff (prio 0, ram): r2\n"
          "    0000000000002000-0000000000003fff (prio 0, nv-i/o): nv-box\n"
          "      0000000000002000-0000000000002fff (prio 0, ram): r3\n"
          "      0000000000003000-0000000000003fff (prio 0, i/o): io3\n"
          "    0000000000004000-0000000000004fff (prio 0, rom): boot\n"
          "    0000000000005000-0000000000005fff (prio 0, nv-rom): r4\n"
          "\n"
          "memory-region: r1\n"
          "  0000000000000000-0000000000000fff (prio 0, ram): r1\n"
          "\n");

    r1_ro->set_readonly(false);
    nv_box->set_nonvolatile(false);
    CHECK(ranges_of(as) == strings{"0-fff r1", "1000-1fff r2 ro", "2000-2fff r3", "3000-3fff io3",
                                   "4000-4fff boot ro", "5000-5fff r4 ro nv"});
}

TEST_CASE("flat view: a ROM device shows as romd in ROMD mode and as i/o otherwise, and the "
          "mode is an attribute of its ranges",
          "[flat_view][mtree]") {
    qomem_test::leak_check leaks;
    struct flash_ops {
        std::uint64_t read(hwaddr, unsigned) { return 0; }
        void write(hwaddr, std::uint64_t, unsigned) {}
    } ops;
    auto dev = qomem::make<qomem::device>();
    auto sys = qomem::make_container(*dev, "system", qomem::u128_2_64);
    auto flash = qomem::make_rom_device(*dev, "flash", 0x2000, ops);
    auto lo = qomem::make_alias(*dev, "flash-lo", *flash, 0, 0x1000);
    auto hi = qomem::make_alias(*dev, "flash-hi", *flash, 0x1000, 0x1000);
    sys->add_subregion(0x10000, *lo);
    sys->add_subregion(0x11000, *hi);
    qomem::address_space as(*sys, "memory");
    const std::string head = "FlatView #0\n"
                             " AS \"memory\", root: system\n"
                             " Root memory region: system\n";
    CHECK(ranges_of(as) == strings{"10000-11fff flash"});
    CHECK(flat_text({&as}) ==
          head + "  0000000000010000-0000000000011fff (prio 0, romd): flash\n\n");
    flash->set_romd(false);
    CHECK_FALSE(flash->romd_mode());
    CHECK(ranges_of(as) == strings{"10000-11fff flash !romd"});
    CHECK(flat_text({&as}) ==
          head + "  0000000000010000-0000000000011fff (prio 0, i/o): flash\n\n");
}

TEST_CASE("flat view: adjacent ranges of one region merge only when their offsets are "
          "contiguous and their attributes equal",
          "[flat_view]") {
    qomem_test::leak_check leaks;
    auto dev = qomem::make<qomem::device>();
    auto sys = qomem::make_container(*dev, "system", qomem::u128_2_64);
    auto m = qomem::make_ram(*dev, "m", 0x3000);
    auto m0 = qomem::make_alias(*dev, "m0", *m, 0, 0x1000);
    auto m1 = qomem::make_alias(*dev, "m1", *m, 0x1000, 0x1000);
    auto m2 = qomem::make_alias(*dev, "m2", *m, 0x2000, 0x1000);
    sys->add_subregion(0x10000, *m0);
    sys->add_subregion(0x11000, *m1);
    sys->add_subregion(0x12000, *m2);
    qomem::address_space as(*sys, "memory");
    REQUIRE(ranges_of(as) == strings{"10000-12fff m"});

    SECTION("different readonly") {
        m1->set_readonly(true);
        CHECK(ranges_of(as) ==
              strings{"10000-10fff m", "11000-11fff m @1000 ro", "12000-12fff m @2000"});
    }
    SECTION("different nonvolatile") {
        m2->set_nonvolatile(true);
        CHECK(ranges_of(as) == strings{"10000-11fff m", "12000-12fff m @2000 nv"});
    }
    SECTION("offsets not contiguous") {
        m2->set_alias_offset(0x1800);
        CHECK(ranges_of(as) == strings{"10000-11fff m", "12000-12fff m @1800"});
    }
    SECTION("addresses not contiguous") {
        m2->set_address(0x12800);
        CHECK(ranges_of(as) == strings{"10000-11fff m", "12800-137ff m @2000"});
    }
    SECTION("another region next to it") {
        auto n = qomem::make_ram(*dev, "n", 0x1000);
        sys->add_subregion(0x13000, *n);
        CHECK(ranges_of(as) == strings{"10000-12fff m", "13000-13fff n"});
    }
}

TEST_CASE("flat view: a disabled region renders nothing, subtree included, and does not "
          "obscure lower-priority siblings",
          "[flat_view][mtree]") {
    qomem_test::leak_check leaks;
    auto dev = qomem::make<qomem::device>();
    auto sys = qomem::make_container(*dev, "system", qomem::u128_2_64);
    auto base = qomem::make_ram(*dev, "base", 0x4000);
    auto cover = qomem::make_reservation(*dev, "cover", 0x1000);
    auto box = qomem::make_container(*dev, "box", 0x1000);
    auto inbox = qomem::make_ram(*dev, "inbox", 0x1000);
    box->add_subregion(0, *inbox);
    sys->add_subregion(0, *base);
    sys->add_subregion(0x1000, *cover, 1);
    sys->add_subregion(0x2000, *box, 2);
    qomem::address_space as(*sys, "memory");
    REQUIRE(ranges_of(as) ==
            strings{"0-fff base", "1000-1fff cover", "2000-2fff inbox", "3000-3fff base @3000"});

    cover->set_enabled(false);
    CHECK_FALSE(cover->enabled());
    CHECK(ranges_of(as) == strings{"0-1fff base", "2000-2fff inbox", "3000-3fff base @3000"});
    box->set_enabled(false);
    CHECK(inbox->enabled());
    CHECK(ranges_of(as) == strings{"0-3fff base"});

    // The tree hides disabled regions unless asked (-D), but still prints
    // their children.
    CHECK(tree_text({&as}) ==
          "address-space: memory\n"
          "  0000000000000000-ffffffffffffffff (prio 0, i/o): system\n"
          "    0000000000000000-0000000000003fff (prio 0, ram): base\n"
          "      0000000000002000-0000000000002fff (prio 0, ram): inbox\n"
          "\n");
    CHECK(qomem::info_mtree(std::vector<const qomem::address_space*>{&as}, {.disabled = true}) ==
          "address-space: memory\n"
          "  0000000000000000-ffffffffffffffff (prio 0, i/o): system\n"
          "    0000000000000000-0000000000003fff (prio 0, ram): base\n"
          "    0000000000001000-0000000000001fff (prio 1, i/o): cover [disabled]\n"
          "    0000000000002000-0000000000002fff (prio 2, i/o): box [disabled]\n"
          "      0000000000002000-0000000000002fff (prio 0, ram): inbox\n"
          "\n");

    cover->set_enabled(true);
    CHECK(ranges_of(as) == strings{"0-fff base", "1000-1fff cover", "2000-3fff base @2000"});
}

TEST_CASE("flat view: set_address re-adds the region, which becomes the last added of its "
          "priority, while the same address changes nothing",
          "[flat_view]") {
    qomem_test::leak_check leaks;
    auto dev = qomem::make<qomem::device>();
    auto sys = qomem::make_container(*dev, "system", qomem::u128_2_64);
    auto A = qomem::make_reservation(*dev, "A", 0x2000);
    auto B = qomem::make_reservation(*dev, "B", 0x2000);
    sys->add_subregion(0, *A);
    sys->add_subregion(0x1000, *B);
    qomem::address_space as(*sys, "memory");
    REQUIRE(subregion_names(*sys) == strings{"B", "A"});
    REQUIRE(ranges_of(as) == strings{"0-fff A", "1000-2fff B"});

    SECTION("a new address") {
        A->set_address(0x800);
        CHECK(A->addr() == 0x800);
        CHECK(subregion_names(*sys) == strings{"A", "B"});
        CHECK(ranges_of(as) == strings{"800-27ff A", "2800-2fff B @1800"});
    }
    SECTION("the same address") {
        const qomem::flat_view* view = as.view().get();
        A->set_address(0);
        CHECK(subregion_names(*sys) == strings{"B", "A"});
        CHECK(as.view().get() == view);
    }
}

TEST_CASE("flat view: set_size shrinks or grows a region, but RAM cannot grow past its backing "
          "and no region past 2^64",
          "[flat_view]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    auto dev = qomem::make<qomem::device>();
    auto sys = qomem::make_container(*dev, "system", qomem::u128_2_64);
    auto big = qomem::make_reservation(*dev, "big", 0x2000);
    auto under = qomem::make_ram(*dev, "under", 0x4000);
    sys->add_subregion(0, *big, 1);
    sys->add_subregion(0, *under);
    qomem::address_space as(*sys, "memory");
    REQUIRE(ranges_of(as) == strings{"0-1fff big", "2000-3fff under @2000"});

    big->set_size(0x1000);
    CHECK(ranges_of(as) == strings{"0-fff big", "1000-3fff under @1000"});

    const qomem::flat_view* view = as.view().get();
    CHECK_THROWS_AS(under->set_size(0x8000), qomem::region_error);
    CHECK_THROWS_AS(big->set_size(qomem::u128_2_64 + 1), qomem::region_error);
    CHECK((under->size() == 0x4000));
    CHECK((big->size() == 0x1000));
    CHECK(as.view().get() == view);

    under->set_size(0x3000);
    CHECK(ranges_of(as) == strings{"0-fff big", "1000-2fff under @1000"});
    big->set_size(qomem::u128_2_64);
    CHECK(ranges_of(as) == strings{"0-ffffffffffffffff big"});
}

TEST_CASE("transactions nest, and nothing is rendered until the outermost commit",
          "[flat_view][transaction]") {
    qomem_test::leak_check leaks;
    auto dev = qomem::make<qomem::device>();
    auto sys = qomem::make_container(*dev, "system", qomem::u128_2_64);
    auto a = qomem::make_ram(*dev, "a", 0x1000);
    auto b = qomem::make_ram(*dev, "b", 0x1000);
    auto c = qomem::make_ram(*dev, "c", 0x1000);
    sys->add_subregion(0, *a);
    qomem::address_space as(*sys, "memory");
    // Holding the old view also proves that a view never changes once made.
    const qomem::ref_ptr<qomem::flat_view> before = as.view();
    REQUIRE(ranges_of(*before) == strings{"0-fff a"});

    SECTION("RAII transactions") {
        {
            qomem::memory_transaction outer;
            sys->add_subregion(0x1000, *b);
            CHECK(as.view() == before);
            {
                qomem::memory_transaction inner;
                sys->add_subregion(0x2000, *c);
            }
            CHECK(as.view() == before); // the inner commit rendered nothing
            a->set_enabled(false);
            CHECK(as.view() == before);
        }
        CHECK(as.view() != before);
    }
    SECTION("begin/commit calls") {
        qomem::memory_region_transaction_begin();
        qomem::memory_region_transaction_begin();
        sys->add_subregion(0x1000, *b);
        sys->add_subregion(0x2000, *c);
        qomem::memory_region_transaction_commit();
        CHECK(as.view() == before);
        a->set_enabled(false);
        CHECK(as.view() == before);
        qomem::memory_region_transaction_commit();
        CHECK(as.view() != before);
    }
    CHECK(ranges_of(*before) == strings{"0-fff a"});
    CHECK(ranges_of(as) == strings{"1000-1fff b", "2000-2fff c"});
}

TEST_CASE("address spaces that reach the same flat-view root share one flat view",
          "[flat_view][address_space][mtree]") {
    qomem_test::leak_check leaks;
    auto dev = qomem::make<qomem::device>();
    auto sys = qomem::make_container(*dev, "system", qomem::u128_2_64);
    auto r0 = qomem::make_ram(*dev, "r0", 0x1000);
    auto r1 = qomem::make_ram(*dev, "r1", 0x1000);
    sys->add_subregion(0, *r0);
    sys->add_subregion(0x2000, *r1);
    const std::string system_view = " Root memory region: system\n"
                                    "  0000000000000000-0000000000000fff (prio 0, ram): r0\n"
                                    "  0000000000002000-0000000000002fff (prio 0, ram): r1\n"
                                    "\n";

    SECTION("the same root, or an alias covering the whole root from offset 0") {
        auto whole = qomem::make_alias(*dev, "sys-alias", *sys, 0, qomem::u128_2_64);
        qomem::address_space memory(*sys, "memory");
        qomem::address_space dma(*whole, "dma");
        qomem::address_space io(*sys, "io-view");
        CHECK(dma.view() == memory.view());
        CHECK(io.view() == memory.view());
        CHECK(memory.view()->root() == sys.get());
        CHECK(flat_text({&memory, &dma, &io}) == "FlatView #0\n"
                                                 " AS \"memory\", root: system\n"
                                                 " AS \"dma\", root: sys-alias, alias system\n"
                                                 " AS \"io-view\", root: system\n" +
                                                     system_view);
        // Still one view after a change.
        auto r2 = qomem::make_ram(*dev, "r2", 0x1000);
        sys->add_subregion(0x4000, *r2);
        CHECK(dma.view() == memory.view());
        CHECK(ranges_of(dma) == strings{"0-fff r0", "2000-2fff r1", "4000-4fff r2"});
    }
    SECTION("an alias with an offset renders its own view") {
        auto shifted =
            qomem::make_alias(*dev, "sys-shifted", *sys, 0x1000, qomem::u128_2_64 - 0x1000);
        qomem::address_space memory(*sys, "memory");
        qomem::address_space sh(*shifted, "shifted");
        CHECK(sh.view() != memory.view());
        CHECK(sh.view()->root() == shifted.get());
        CHECK(flat_text({&memory, &sh}) ==
              "FlatView #0\n AS \"memory\", root: system\n" + system_view +
                  "FlatView #1\n"
                  " AS \"shifted\", root: sys-shifted, alias system\n"
                  " Root memory region: sys-shifted\n"
                  "  0000000000001000-0000000000001fff (prio 0, ram): r1\n"
                  "\n");
    }
    SECTION("an alias smaller than its target renders its own view") {
        auto low = qomem::make_alias(*dev, "sys-low", *sys, 0, 0x2000);
        qomem::address_space memory(*sys, "memory");
        qomem::address_space lw(*low, "low");
        CHECK(lw.view() != memory.view());
        CHECK(lw.view()->root() == low.get());
        CHECK(ranges_of(lw) == strings{"0-fff r0"});
    }
    SECTION("a read-only alias is its own root, so that its flag is not lost") {
        // flat_view.hpp's deliberate difference from QEMU, which would share
        // system's view and show it writable.
        auto ro = qomem::make_alias(*dev, "sys-ro", *sys, 0, qomem::u128_2_64);
        ro->set_readonly(true);
        qomem::address_space memory(*sys, "memory");
        qomem::address_space rom_view(*ro, "rom-view");
        CHECK(rom_view.view() != memory.view());
        CHECK(rom_view.view()->root() == ro.get());
        CHECK(ranges_of(rom_view) == strings{"0-fff r0 ro", "2000-2fff r1 ro"});
    }
    SECTION("a container whose only subregion is larger than it is its own root") {
        // Stepping into `wide` would render all of it; the container cuts it.
        auto narrow = qomem::make_container(*dev, "narrow", 0x1000);
        auto wide = qomem::make_ram(*dev, "wide", 0x2000);
        narrow->add_subregion(0, *wide);
        qomem::address_space as(*narrow, "narrow");
        CHECK(as.view()->root() == narrow.get());
        CHECK(ranges_of(as) == strings{"0-fff wide"});
    }
    SECTION("a container whose only subregion is not at 0 is its own root") {
        auto holder = qomem::make_container(*dev, "holder", 0x10000);
        auto inner = qomem::make_ram(*dev, "inner", 0x1000);
        holder->add_subregion(0x1000, *inner);
        qomem::address_space as(*holder, "holder");
        CHECK(as.view()->root() == holder.get());
        CHECK(ranges_of(as) == strings{"1000-1fff inner"});
    }
    SECTION("a container whose only enabled subregion is such an alias, at 0") {
        auto wrapper = qomem::make_container(*dev, "wrapper", qomem::u128_2_64);
        auto w = qomem::make_alias(*dev, "w-alias", *sys, 0, qomem::u128_2_64);
        auto off = qomem::make_reservation(*dev, "off", 0x1000);
        off->set_enabled(false);
        wrapper->add_subregion(0, *w);
        wrapper->add_subregion(0x5000, *off, 1);
        qomem::address_space memory(*sys, "memory");
        qomem::address_space wrapped(*wrapper, "wrapped");
        CHECK(wrapped.view() == memory.view());

        off->set_enabled(true); // two enabled subregions: wrapper is its own root
        CHECK(wrapped.view() != memory.view());
        CHECK(wrapped.view()->root() == wrapper.get());
        CHECK(ranges_of(wrapped) == strings{"0-fff r0", "2000-2fff r1", "5000-5fff off"});
        CHECK(ranges_of(memory) == strings{"0-fff r0", "2000-2fff r1"});
    }
}

TEST_CASE("address spaces with no flat-view root share the single empty view",
          "[flat_view][address_space][mtree]") {
    qomem_test::leak_check leaks;
    auto dev = qomem::make<qomem::device>();
    auto c1 = qomem::make_container(*dev, "c1", 0x10000);
    auto c1_dev = qomem::make_reservation(*dev, "c1-dev", 0x1000);
    c1->add_subregion(0, *c1_dev);
    c1_dev->set_enabled(false); // c1's only subregion, disabled
    auto c2 = qomem::make_container(*dev, "c2", 0x10000); // no subregion at all
    auto off = qomem::make_ram(*dev, "off-ram", 0x1000);
    off->set_enabled(false); // a disabled root
    qomem::address_space a(*c1, "a");
    qomem::address_space b(*c2, "b");
    qomem::address_space c(*off, "c");

    CHECK(a.view() == b.view());
    CHECK(c.view() == a.view());
    CHECK(a.view()->root() == nullptr);
    CHECK(a.view()->ranges().empty());
    CHECK(qomem::info_mtree({.flatview = true}) == "FlatView #0\n"
                                                   " AS \"a\", root: c1\n"
                                                   " AS \"b\", root: c2\n"
                                                   " AS \"c\", root: off-ram\n"
                                                   " Root memory region: (none)\n"
                                                   "  No rendered FlatView\n"
                                                   "\n");

    // Enabled, c1-dev is c1's only subregion, at 0 and no larger: the root.
    c1_dev->set_enabled(true);
    CHECK(a.view()->root() == c1_dev.get());
    CHECK(qomem::info_mtree({.flatview = true}) ==
          "FlatView #0\n"
          " AS \"a\", root: c1\n"
          " Root memory region: c1-dev\n"
          "  0000000000000000-0000000000000fff (prio 0, i/o): c1-dev\n"
          "\n"
          "FlatView #1\n"
          " AS \"b\", root: c2\n"
          " AS \"c\", root: off-ram\n"
          " Root memory region: (none)\n"
          "  No rendered FlatView\n"
          "\n");
}

TEST_CASE("flat view: regions of 2^64 bytes and regions ending exactly at 2^64",
          "[flat_view][int128]") {
    qomem_test::leak_check leaks;
    auto dev = qomem::make<qomem::device>();

    SECTION("a 2^64 region as the root") {
        auto whole = qomem::make_reservation(*dev, "whole", qomem::u128_2_64);
        qomem::address_space as(*whole, "whole");
        REQUIRE(as.view()->ranges().size() == 1);
        const qomem::flat_range& r = as.view()->ranges().front();
        CHECK(r.start == 0);
        CHECK((r.size == qomem::u128_2_64));
        CHECK(r.last() == max_addr);
        CHECK(as.view()->lookup(max_addr) == &r);
        CHECK(flat_text({&as}) == "FlatView #0\n"
                                  " AS \"whole\", root: whole\n"
                                  " Root memory region: whole\n"
                                  "  0000000000000000-ffffffffffffffff (prio 0, i/o): whole\n"
                                  "\n");
    }
    SECTION("regions at the very top of the address space") {
        auto sys = qomem::make_container(*dev, "system", qomem::u128_2_64);
        auto bg = qomem::make_reservation(*dev, "bg", qomem::u128_2_64);
        auto low = qomem::make_ram(*dev, "low", 0x1000);
        auto top = qomem::make_reservation(*dev, "top", 0x1000);
        sys->add_subregion(0, *bg, -1);
        sys->add_subregion(0, *low);
        sys->add_subregion(0xfffffffffffff000, *top);
        qomem::address_space as(*sys, "memory");
        CHECK(ranges_of(as) == strings{"0-fff low", "1000-ffffffffffffefff bg @1000",
                                       "fffffffffffff000-ffffffffffffffff top"});
        const qomem::flat_range* r = as.view()->lookup(max_addr);
        REQUIRE(r);
        CHECK(r->mr == top.get());
        CHECK((r->end() == qomem::u128_2_64));

        // One crossing 2^64 is cut there; the tree flags its wrapped end.
        auto over = qomem::make_reservation(*dev, "over", 0x2000);
        sys->add_subregion(0xfffffffffffff800, *over, 1);
        CHECK(ranges_of(as) ==
              strings{"0-fff low", "1000-ffffffffffffefff bg @1000",
                      "fffffffffffff000-fffffffffffff7ff top",
                      "fffffffffffff800-ffffffffffffffff over"});
        CHECK_THAT(tree_text({&as}),
                   Catch::Contains("\n[DETECTED OVERFLOW!]     "
                                   "fffffffffffff800-00000000000017ff (prio 1, i/o): over\n"));
    }
    SECTION("a 2^64 alias of a 2^64 region, with an offset") {
        auto target = qomem::make_reservation(*dev, "tgt", qomem::u128_2_64);
        auto shift = qomem::make_alias(*dev, "shift", *target, 0x1000, qomem::u128_2_64);
        qomem::address_space as(*shift, "shifted");
        CHECK(as.view()->root() == shift.get());
        CHECK(ranges_of(as) == strings{"0-ffffffffffffefff tgt @1000"});
    }
}
