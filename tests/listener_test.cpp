// tests/listener_test.cpp — memory listeners: registration replays the view,
// unregistration deletes it, and each topology commit reports deletions
// before additions, in address order, ordered by listener priority (QEMU
// behaviour rows 25-27). A listener only ever sees sections of views that
// are still alive.
//
// Every scenario starts with a qomem_test::leak_check, so it ends by requiring
// that no qomem object is left alive. Regions are owned by a device; address
// spaces are declared after the regions they render, and listeners are
// unregistered (by a guard declared last) before the address space goes.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <qomem/address_space.hpp>
#include <qomem/device.hpp>
#include <qomem/memory_listener.hpp>
#include <qomem/memory_ops.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/object.hpp>

#include "test_support.hpp"

namespace {

using qomem::hwaddr;
using qomem::u128;
using strings = std::vector<std::string>;

/// "1000-1fff ram @800 ro": a section's place, region, offset and flags.
std::string describe(const qomem::memory_section& s) {
    const auto last = static_cast<hwaddr>(u128(s.offset_within_address_space) + s.size - 1);
    std::string out =
        fmt::format("{:x}-{:x} {}", s.offset_within_address_space, last, s.mr->region_name());
    if (s.offset_within_region) out += fmt::format(" @{:x}", s.offset_within_region);
    if (s.readonly) out += " ro";
    return out;
}

/// Records each callback as "begin", "add 0-fff ram", "del ...", "nop ...",
/// "commit"; optionally also into a shared sequence, prefixed with its name.
class recorder : public qomem::memory_listener {
public:
    explicit recorder(unsigned priority = 0, std::string name = {}, strings* global = nullptr)
        : memory_listener(priority), name_(std::move(name)), global_(global) {}

    strings events;
    /// For region_del: the reference count of the section's region.
    std::vector<std::uint32_t> del_ref_counts;

    strings take() { return std::exchange(events, {}); }

    void begin() override { log("begin"); }
    void region_add(const qomem::memory_section& s) override { log("add " + describe(s)); }
    void region_del(const qomem::memory_section& s) override {
        del_ref_counts.push_back(s.mr->ref_count());
        log("del " + describe(s));
    }
    void region_nop(const qomem::memory_section& s) override { log("nop " + describe(s)); }
    void commit() override { log("commit"); }

private:
    void log(std::string e) {
        if (global_) global_->push_back(name_ + " " + e);
        events.push_back(std::move(e));
    }
    std::string name_;
    strings* global_;
};

/// Registers a listener for its lifetime.
class listening {
public:
    listening(qomem::address_space& as, qomem::memory_listener& l) : as_(as), l_(l) {
        as_.add_listener(l_);
    }
    ~listening() {
        if (l_.registered_to() == &as_) as_.remove_listener(l_);
    }
    listening(const listening&) = delete;
    listening& operator=(const listening&) = delete;

private:
    qomem::address_space& as_;
    qomem::memory_listener& l_;
};

using qomem_test::board;
using qomem_test::null_regs;

/// The start address of the section an event names ("add 1000-1fff x" -> 0x1000).
hwaddr start_of(std::string_view event) {
    const auto sp = event.find(' ');
    const auto dash = event.find('-', sp);
    return std::stoull(std::string(event.substr(sp + 1, dash - sp - 1)), nullptr, 16);
}

/// The shape every commit has: begin; then the deletions, in address order;
/// then additions and nops, in address order; then commit.
void check_commit_shape(const strings& ev) {
    INFO("events: " << fmt::format("{}", fmt::join(ev, " | ")));
    REQUIRE(ev.size() >= 2);
    CHECK(ev.front() == "begin");
    CHECK(ev.back() == "commit");
    bool seen_add_or_nop = false;
    hwaddr last_del = 0, last_add = 0;
    bool any_del = false, any_add = false;
    for (std::size_t i = 1; i + 1 < ev.size(); ++i) {
        const std::string_view e = ev[i];
        if (e.starts_with("del ")) {
            CHECK_FALSE(seen_add_or_nop);
            if (any_del) CHECK(start_of(e) > last_del);
            last_del = start_of(e);
            any_del = true;
        } else {
            CHECK((e.starts_with("add ") || e.starts_with("nop ")));
            seen_add_or_nop = true;
            if (any_add) CHECK(start_of(e) > last_add);
            last_add = start_of(e);
            any_add = true;
        }
    }
}

} // namespace

TEST_CASE("registering a listener replays the current view as begin, region_add for each "
          "range in address order, commit, and unregistering reports every range as region_del",
          "[listener]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    null_regs ops;
    board b;
    auto ram = qomem::make_ram(*b.dev, "ram", 0x1000);
    auto io = qomem::make_io(*b.dev, "io", 0x100, ops);
    auto ro = qomem::make_alias(*b.dev, "ro", *ram, 0x800, 0x800);
    ro->set_readonly(true);
    b.sys->add_subregion(0x2000, *io);
    b.sys->add_subregion(0x0, *ram);
    b.sys->add_subregion(0x10000, *ro);
    recorder l;
    qomem::address_space as(*b.sys, "memory");

    as.add_listener(l);
    CHECK(l.registered_to() == &as);
    CHECK(l.take() == strings{"begin", "add 0-fff ram", "add 2000-20ff io",
                              "add 10000-107ff ram @800 ro", "commit"});

    as.remove_listener(l);
    CHECK(l.registered_to() == nullptr);
    CHECK(l.take() == strings{"begin", "del 0-fff ram", "del 2000-20ff io",
                              "del 10000-107ff ram @800 ro", "commit"});

    // Unregistered: hears nothing more.
    b.sys->del_subregion(*io);
    CHECK(l.events.empty());

    SECTION("registering twice is misuse") {
        as.add_listener(l);
        l.take();
        CHECK_THROWS_AS(as.add_listener(l), qomem::assertion_failure);
        as.remove_listener(l);
        CHECK_THROWS_AS(as.remove_listener(l), qomem::assertion_failure);
    }
}

TEST_CASE("a listener on an empty address space is replayed nothing but begin and commit",
          "[listener]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    board b;
    recorder l;
    qomem::address_space as(*b.sys, "memory");
    listening on(as, l);
    CHECK(l.take() == strings{"begin", "commit"});

    auto ram = qomem::make_ram(*b.dev, "ram", 0x1000);
    b.sys->add_subregion(0x4000, *ram);
    CHECK(l.take() == strings{"begin", "add 4000-4fff ram", "commit"});
    b.sys->del_subregion(*ram);
    CHECK(l.take() == strings{"begin", "del 4000-4fff ram", "commit"});
}

TEST_CASE("topology changes reach listeners as every deletion first, then additions and "
          "nops in address order",
          "[listener]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    null_regs ops;
    board b;
    auto a = qomem::make_ram(*b.dev, "a", 0x1000);
    auto c = qomem::make_ram(*b.dev, "c", 0x1000);
    auto hi = qomem::make_ram(*b.dev, "hi", 0x1000);
    auto io = qomem::make_io(*b.dev, "io", 0x100, ops);
    b.sys->add_subregion(0x0, *a);
    b.sys->add_subregion(0x2000, *io);
    recorder l;
    qomem::address_space as(*b.sys, "memory");
    listening on(as, l);
    l.take();

    // add_subregion: a new range between two unchanged ones.
    b.sys->add_subregion(0x1000, *c);
    CHECK(l.take() ==
          strings{"begin", "nop 0-fff a", "add 1000-1fff c", "nop 2000-20ff io", "commit"});

    // An overlay that splits two ranges: both go, their pieces come back.
    b.sys->add_subregion(0x800, *hi, 1);
    {
        const strings ev = l.take();
        CHECK(ev == strings{"begin", "del 0-fff a", "del 1000-1fff c", "add 0-7ff a",
                            "add 800-17ff hi", "add 1800-1fff c @800", "nop 2000-20ff io",
                            "commit"});
        check_commit_shape(ev);
    }

    // set_address: the moved range is deleted before any nop of lower address.
    io->set_address(0x3000);
    {
        const strings ev = l.take();
        CHECK(ev == strings{"begin", "del 2000-20ff io", "nop 0-7ff a", "nop 800-17ff hi",
                            "nop 1800-1fff c @800", "add 3000-30ff io", "commit"});
        check_commit_shape(ev);
    }

    // A priority change (delete, add again below): the overlay goes under.
    {
        qomem::memory_transaction tx;
        b.sys->del_subregion(*hi);
        b.sys->add_subregion(0x800, *hi, -1);
    }
    {
        const strings ev = l.take();
        CHECK(ev == strings{"begin", "del 0-7ff a", "del 800-17ff hi", "del 1800-1fff c @800",
                            "add 0-fff a", "add 1000-1fff c", "nop 3000-30ff io", "commit"});
        check_commit_shape(ev);
    }

    // del_subregion.
    b.sys->del_subregion(*c);
    {
        const strings ev = l.take();
        CHECK(ev == strings{"begin", "del 1000-1fff c", "nop 0-fff a", "add 1000-17ff hi @800",
                            "nop 3000-30ff io", "commit"});
        check_commit_shape(ev);
    }

    // Disabling and re-enabling.
    a->set_enabled(false);
    {
        const strings ev = l.take();
        CHECK(ev == strings{"begin", "del 0-fff a", "del 1000-17ff hi @800", "add 800-17ff hi",
                            "nop 3000-30ff io", "commit"});
        check_commit_shape(ev);
    }
    a->set_enabled(true);
    {
        const strings ev = l.take();
        CHECK(ev == strings{"begin", "del 800-17ff hi", "add 0-fff a", "add 1000-17ff hi @800",
                            "nop 3000-30ff io", "commit"});
        check_commit_shape(ev);
    }
}

TEST_CASE("with listeners of different priorities, begin, add, nop and commit run in "
          "ascending priority and region_del in descending priority",
          "[listener][priority]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    null_regs ops;
    board b;
    auto io = qomem::make_io(*b.dev, "io", 0x100, ops);
    b.sys->add_subregion(0x2000, *io);
    strings seq;
    recorder high(20, "high", &seq);
    recorder low(1, "low", &seq);
    recorder mid(10, "mid", &seq);
    recorder mid2(10, "mid2", &seq); // mid's priority, registered after it: goes after it
    qomem::address_space as(*b.sys, "memory");
    listening on_high(as, high);
    listening on_low(as, low);
    listening on_mid(as, mid);
    listening on_mid2(as, mid2);
    seq.clear();

    io->set_address(0x3000);
    CHECK(seq == strings{
                     "low begin",
                     "mid begin",
                     "mid2 begin",
                     "high begin",
                     "high del 2000-20ff io",
                     "mid2 del 2000-20ff io",
                     "mid del 2000-20ff io",
                     "low del 2000-20ff io",
                     "low add 3000-30ff io",
                     "mid add 3000-30ff io",
                     "mid2 add 3000-30ff io",
                     "high add 3000-30ff io",
                     "low commit",
                     "mid commit",
                     "mid2 commit",
                     "high commit",
                 });
}

TEST_CASE("with several ranges and listeners, each section reaches the listeners in "
          "priority order, and every listener sees the same commit shape",
          "[listener][priority]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    null_regs ops;
    board b;
    auto a = qomem::make_ram(*b.dev, "a", 0x1000);
    auto c = qomem::make_ram(*b.dev, "c", 0x1000);
    auto hi = qomem::make_ram(*b.dev, "hi", 0x1000);
    auto io = qomem::make_io(*b.dev, "io", 0x100, ops);
    b.sys->add_subregion(0x0, *a);
    b.sys->add_subregion(0x1000, *c);
    b.sys->add_subregion(0x2000, *io);
    strings seq;
    recorder low(1, "low", &seq);
    recorder high(5, "high", &seq);
    qomem::address_space as(*b.sys, "memory");
    listening on_high(as, high);
    listening on_low(as, low);
    low.take();
    high.take();
    seq.clear();

    b.sys->add_subregion(0x800, *hi, 1);

    CHECK(low.events == high.events);
    check_commit_shape(low.events);

    // Phases: all begins, then all dels, then adds/nops, then all commits.
    auto phase = [](std::string_view e) {
        e.remove_prefix(e.find(' ') + 1);
        if (e.starts_with("begin")) return 0;
        if (e.starts_with("del")) return 1;
        if (e.starts_with("commit")) return 3;
        return 2;
    };
    for (std::size_t i = 1; i < seq.size(); ++i) {
        INFO(seq[i - 1] << " then " << seq[i]);
        CHECK(phase(seq[i - 1]) <= phase(seq[i]));
    }
    // For each event, the two listeners' calls: low first, except for del.
    auto position = [&](const std::string& e) {
        for (std::size_t i = 0; i < seq.size(); ++i)
            if (seq[i] == e) return i;
        FAIL("not reported: " << e);
        return seq.size();
    };
    for (const std::string& e : low.events) {
        INFO(e);
        const std::size_t l = position("low " + e);
        const std::size_t h = position("high " + e);
        if (e.starts_with("del "))
            CHECK(h < l);
        else
            CHECK(l < h);
    }
}

TEST_CASE("a commit that leaves the view unchanged reports nothing", "[listener]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    board b;
    auto under = qomem::make_ram(*b.dev, "under", 0x1000);
    auto over = qomem::make_ram(*b.dev, "over", 0x1000);
    auto extra = qomem::make_ram(*b.dev, "extra", 0x1000);
    auto elsewhere = qomem::make_container(*b.dev, "elsewhere", 0x10000);
    auto detached = qomem::make_ram(*b.dev, "detached", 0x1000);
    auto far = qomem::make_ram(*b.dev, "far", 0x1000);
    b.sys->add_subregion(0x0, *under);
    b.sys->add_subregion(0x0, *over, 1);
    // Keeps `system` the flat-view root whatever happens to `under`.
    b.sys->add_subregion(0x100000, *far);
    recorder l;
    qomem::address_space as(*b.sys, "memory");
    listening on(as, l);
    l.take();

    SECTION("an empty transaction") {
        qomem::memory_transaction tx;
    }
    SECTION("a fully shadowed region is disabled and enabled") {
        under->set_enabled(false);
        under->set_enabled(true);
    }
    SECTION("an add and a delete in one transaction") {
        qomem::memory_transaction tx;
        b.sys->add_subregion(0x8000, *extra);
        b.sys->del_subregion(*extra);
    }
    SECTION("a change in a tree no address space renders") {
        elsewhere->add_subregion(0x0, *detached);
        detached->set_address(0x1000);
        elsewhere->del_subregion(*detached);
    }
    SECTION("a move to the same place") {
        over->set_address(0x0);
    }
    CHECK(l.events.empty());
}

TEST_CASE("a transaction batches several changes into one begin..commit", "[listener]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    null_regs ops;
    board b;
    auto a = qomem::make_ram(*b.dev, "a", 0x1000);
    auto c = qomem::make_ram(*b.dev, "c", 0x1000);
    auto io = qomem::make_io(*b.dev, "io", 0x100, ops);
    b.sys->add_subregion(0x0, *a);
    b.sys->add_subregion(0x2000, *io);
    recorder l;
    qomem::address_space as(*b.sys, "memory");
    listening on(as, l);
    l.take();

    {
        qomem::memory_transaction outer;
        b.sys->add_subregion(0x1000, *c);
        {
            qomem::memory_transaction inner;
            io->set_address(0x4000);
            a->set_enabled(false);
        }
        CHECK(l.events.empty()); // the inner commit is not the outermost
        b.sys->del_subregion(*c);
        b.sys->add_subregion(0x8000, *c);
        CHECK(l.events.empty());
    }
    CHECK(l.take() == strings{"begin", "del 0-fff a", "del 2000-20ff io", "add 4000-40ff io",
                              "add 8000-8fff c", "commit"});
}

TEST_CASE("a listener never sees a range of a view that no longer exists: in region_del the "
          "region is still alive even when nothing else holds it",
          "[listener][lifetime]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    auto count_regions = [] {
        const auto all = qomem::live_objects();
        const auto it = all.find("memory-region");
        return it == all.end() ? std::size_t{0} : it->second;
    };
    board b;
    auto nic = qomem::make<qomem::device>();
    auto ring = qomem::make_ram(*nic, "ring", 0x1000);
    auto keep = qomem::make_ram(*b.dev, "keep", 0x1000);
    b.sys->add_subregion(0x0, *keep);
    b.sys->add_subregion(0x1000, *ring);
    recorder l;
    qomem::address_space as(*b.sys, "memory");
    listening on(as, l);
    l.take();

    // Drop every handle: the device is finalized, the region goes on, held by
    // its container and the current view only.
    qomem::memory_region* raw = ring.get();
    ring.reset();
    nic.reset();
    REQUIRE(raw->ref_count() == 2);
    const std::size_t regions = count_regions();

    SECTION("deleted outside a transaction") {
        b.sys->del_subregion(*raw);
    }
    SECTION("deleted inside a transaction: the container's reference is already gone") {
        qomem::memory_transaction tx;
        b.sys->del_subregion(*raw);
        CHECK(raw->ref_count() == 1); // the published view's
        CHECK(l.events.empty());
    }
    SECTION("deleted while another region takes its place in the same transaction") {
        qomem::memory_transaction tx;
        b.sys->del_subregion(*raw);
        keep->set_address(0x1000);
    }
    // region_del read the name (above, through describe) and the count.
    REQUIRE_FALSE(l.del_ref_counts.empty());
    for (const std::uint32_t c : l.del_ref_counts) CHECK(c > 0);
    CHECK(std::find(l.events.begin(), l.events.end(), "del 1000-1fff ring") != l.events.end());
    // ... and once the commit is over, the region is freed.
    CHECK(count_regions() == regions - 1);
}
