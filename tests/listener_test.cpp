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
#include <stdexcept>
#include <string_view>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <qomem/address_space.hpp>
#include <qomem/device.hpp>
#include <qomem/dirty_log.hpp>
#include <qomem/memory_listener.hpp>
#include <qomem/memory_ops.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/object.hpp>

#include "test_support.hpp"

namespace {

using qomem::hwaddr;
using qomem::u128;
using strings = std::vector<std::string>;
using nop_mode = qomem::memory_listener::nop_mode;
using sync_mode = qomem::memory_listener::sync_mode;
using qomem::dirty_client;

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
    explicit recorder(unsigned priority = 0, std::string name = {}, strings* global = nullptr,
                      nop_mode nops = nop_mode::changes_only, sync_mode sync = sync_mode::per_section)
        : memory_listener(options{priority, name, nops, sync}), name_(std::move(name)),
          global_(global) {}

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
    void log_start(const qomem::memory_section& s, std::uint8_t o, std::uint8_t n) override {
        log(fmt::format("log_start {} {}->{}", describe(s), o, n));
    }
    void log_stop(const qomem::memory_section& s, std::uint8_t o, std::uint8_t n) override {
        log(fmt::format("log_stop {} {}->{}", describe(s), o, n));
    }
    void log_sync(const qomem::memory_section& s) override { log("log_sync " + describe(s)); }
    void log_sync_global(bool last_stage) override {
        log(fmt::format("log_sync_global{}", last_stage ? " last" : ""));
    }
    void log_clear(const qomem::memory_section& s) override { log("log_clear " + describe(s)); }
    void log_global_start() override {
        if (refuse_global_start) throw std::runtime_error("cannot log");
        log("log_global_start");
    }
    void log_global_stop() override { log("log_global_stop"); }
    void log_global_after_sync() override { log("log_global_after_sync"); }
    bool refuse_global_start = false;

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

// ---- the whole interface: dirty-log callbacks, nop modes, registration -------

namespace {

/// Stops a memory system's global dirty tracking at the end of a scenario,
/// whatever happened in it.
struct global_logging {
    qomem::memory_system& sys;
    unsigned flags;
    global_logging(qomem::memory_system& s, unsigned f) : sys(s), flags(f) { sys.global_dirty_log_start(f); }
    ~global_logging() {
        if (sys.global_dirty_tracking() & flags) sys.global_dirty_log_stop(sys.global_dirty_tracking() & flags);
    }
    global_logging(const global_logging&) = delete;
    global_logging& operator=(const global_logging&) = delete;
};

constexpr unsigned vga = qomem::dirty_mask_of(dirty_client::vga);
constexpr unsigned migration = qomem::dirty_mask_of(dirty_client::migration);

} // namespace

TEST_CASE("registration replays begin, log_global_start while the system tracks globally, "
          "region_add then log_start for each range that logs, commit, unregistration reports "
          "log_stop before region_del",
          "[listener][dirty]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    null_regs ops;
    board b;
    auto sys = qomem::memory_system::make();
    auto ram = qomem::make_ram(*b.dev, "ram", 0x1000);
    auto rom = qomem::make_rom(*b.dev, "rom", 0x1000);
    auto io = qomem::make_io(*b.dev, "io", 0x100, ops);
    b.sys->add_subregion(0x0, *ram);
    b.sys->add_subregion(0x1000, *rom);
    b.sys->add_subregion(0x2000, *io);
    qomem::address_space as(*sys, *b.sys, "memory");
    ram->set_log(true, dirty_client::vga);
    recorder l(3, "replayed");
    CHECK(l.name() == "replayed");
    CHECK(l.priority() == 3);

    SECTION("not tracking globally: only the region set_log turned on logs") {
        as.add_listener(l);
        CHECK(l.take() == strings{"begin", "add 0-fff ram", fmt::format("log_start 0-fff ram 0->{}", vga),
                                  "add 1000-1fff rom ro", "add 2000-20ff io", "commit"});
        as.remove_listener(l);
        CHECK(l.take() == strings{"begin", fmt::format("log_stop 0-fff ram {}->0", vga), "del 0-fff ram",
                                  "del 1000-1fff rom ro", "del 2000-20ff io", "commit"});
    }
    SECTION("tracking globally: every RAM and ROM range logs for migration too, MMIO never") {
        global_logging on(*sys, qomem::global_dirty::migration);
        as.add_listener(l);
        CHECK(l.take() == strings{"begin", "log_global_start", "add 0-fff ram",
                                  fmt::format("log_start 0-fff ram 0->{}", vga | migration),
                                  "add 1000-1fff rom ro",
                                  fmt::format("log_start 1000-1fff rom ro 0->{}", migration),
                                  "add 2000-20ff io", "commit"});
        as.remove_listener(l);
        CHECK(l.take() == strings{"begin", fmt::format("log_stop 0-fff ram {}->0", vga | migration),
                                  "del 0-fff ram",
                                  fmt::format("log_stop 1000-1fff rom ro {}->0", migration),
                                  "del 1000-1fff rom ro", "del 2000-20ff io", "commit"});
    }
    ram->set_log(false, dirty_client::vga);
}

TEST_CASE("set_log reaches listeners at the commit as region_nop followed by log_start (ascending "
          "priority) or log_stop (descending priority), it is counted per client",
          "[listener][dirty]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    null_regs ops;
    board b;
    auto ram = qomem::make_ram(*b.dev, "ram", 0x1000);
    auto io = qomem::make_io(*b.dev, "io", 0x100, ops);
    b.sys->add_subregion(0x0, *ram);
    b.sys->add_subregion(0x2000, *io);
    strings seq;
    recorder low(1, "low", &seq);
    recorder high(9, "high", &seq);
    qomem::address_space as(*b.sys, "memory");
    listening on_high(as, high);
    listening on_low(as, low);
    seq.clear();

    ram->set_log(true, dirty_client::vga);
    CHECK(seq == strings{"low begin", "high begin", "low nop 0-fff ram", "high nop 0-fff ram",
                         "low log_start 0-fff ram 0->1", "high log_start 0-fff ram 0->1",
                         "low nop 2000-20ff io", "high nop 2000-20ff io", "low commit", "high commit"});
    seq.clear();

    // A second user of the same client changes no mask: nothing to tell.
    ram->set_log(true, dirty_client::vga);
    ram->set_log(false, dirty_client::vga);
    CHECK(seq.empty());
    CHECK(ram->is_logging(dirty_client::vga));

    // Another client joins: old and new masks.
    ram->set_log(true, dirty_client::code);
    CHECK(std::find(seq.begin(), seq.end(), "low log_start 0-fff ram 1->3") != seq.end());
    seq.clear();

    ram->set_log(false, dirty_client::vga);
    CHECK(seq == strings{"low begin", "high begin", "low nop 0-fff ram", "high nop 0-fff ram",
                         "high log_stop 0-fff ram 3->2", "low log_stop 0-fff ram 3->2",
                         "low nop 2000-20ff io", "high nop 2000-20ff io", "low commit", "high commit"});
    seq.clear();
    ram->set_log(false, dirty_client::code);
    CHECK(ram->dirty_log_mask() == 0);
    seq.clear();

    SECTION("more set_log(false) than set_log(true) is misuse, and changes nothing") {
        CHECK_THROWS_AS(ram->set_log(false, dirty_client::vga), qomem::assertion_failure);
        CHECK(seq.empty());
        CHECK(ram->dirty_log_mask() == 0);
    }
    SECTION("a disabled region's mask changes without a view change") {
        ram->set_enabled(false);
        seq.clear();
        ram->set_log(true, dirty_client::vga);
        CHECK(seq.empty());
        CHECK(ram->is_logging(dirty_client::vga));
        ram->set_enabled(true);
        CHECK(std::find(seq.begin(), seq.end(), "low add 0-fff ram") != seq.end());
        ram->set_log(false, dirty_client::vga);
    }
    SECTION("MMIO has no RAM to log: misuse") {
        CHECK_THROWS_AS(io->set_log(true, dirty_client::vga), qomem::assertion_failure);
        CHECK(seq.empty());
    }
}

TEST_CASE("global dirty logging: start tells every listener of the system log_global_start in "
          "priority order, then log_start for every range that logs, stop reports log_stop, then "
          "log_global_stop in reverse order, the reasons are counted",
          "[listener][dirty]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    null_regs ops;
    board b;
    auto sys = qomem::memory_system::make();
    auto ram = qomem::make_ram(*b.dev, "ram", 0x1000);
    auto io = qomem::make_io(*b.dev, "io", 0x100, ops);
    auto other = qomem::make_container(*b.dev, "other", 0x10000);
    auto ram2 = qomem::make_ram(*b.dev, "ram2", 0x1000);
    b.sys->add_subregion(0x0, *ram);
    b.sys->add_subregion(0x2000, *io);
    other->add_subregion(0x4000, *ram2);
    other->add_subregion(0x8000, *qomem::make_ram(*b.dev, "pad", 0x1000)); // keeps `other` the root
    strings seq;
    recorder a(5, "a", &seq);
    recorder c(1, "c", &seq);
    qomem::address_space as(*sys, *b.sys, "memory");
    qomem::address_space as2(*sys, *other, "other");
    listening on_a(as, a);
    listening on_c(as2, c);
    seq.clear();

    sys->global_dirty_log_start(qomem::global_dirty::migration);
    CHECK(sys->global_dirty_tracking() == qomem::global_dirty::migration);
    CHECK(ram->is_logging(dirty_client::migration));
    CHECK_FALSE(io->is_logging(dirty_client::migration));
    CHECK(seq == strings{"c log_global_start", "a log_global_start", "c begin", "a begin",
                         "a nop 0-fff ram", "a log_start 0-fff ram 0->4", "a nop 2000-20ff io",
                         "c nop 4000-4fff ram2", "c log_start 4000-4fff ram2 0->4",
                         "c nop 8000-8fff pad", "c log_start 8000-8fff pad 0->4", "c commit",
                         "a commit"});
    seq.clear();

    // A second reason changes nothing visible; stopping one of two neither.
    sys->global_dirty_log_start(qomem::global_dirty::dirty_rate | qomem::global_dirty::migration);
    sys->global_dirty_log_stop(qomem::global_dirty::migration);
    CHECK(seq.empty());
    CHECK(ram->is_logging(dirty_client::migration));

    sys->global_dirty_log_stop(qomem::global_dirty::dirty_rate);
    CHECK(sys->global_dirty_tracking() == 0);
    CHECK_FALSE(ram->is_logging(dirty_client::migration));
    CHECK(seq == strings{"c begin", "a begin", "a nop 0-fff ram", "a log_stop 0-fff ram 4->0",
                         "a nop 2000-20ff io", "c nop 4000-4fff ram2", "c log_stop 4000-4fff ram2 4->0",
                         "c nop 8000-8fff pad", "c log_stop 8000-8fff pad 4->0", "c commit", "a commit",
                         "a log_global_stop", "c log_global_stop"});
    seq.clear();

    SECTION("stopping a reason that is not active is misuse") {
        CHECK_THROWS_AS(sys->global_dirty_log_stop(qomem::global_dirty::migration), qomem::assertion_failure);
        CHECK_THROWS_AS(sys->global_dirty_log_start(0), qomem::assertion_failure);
        CHECK_THROWS_AS(sys->global_dirty_log_start(1u << 7), qomem::assertion_failure);
        CHECK(seq.empty());
    }
    SECTION("a listener refusing the start: those started are stopped again, nothing else changes") {
        a.refuse_global_start = true;
        CHECK_THROWS_AS(sys->global_dirty_log_start(qomem::global_dirty::migration), std::runtime_error);
        CHECK(seq == strings{"c log_global_start", "c log_global_stop"});
        CHECK(sys->global_dirty_tracking() == 0);
        CHECK_FALSE(ram->is_logging(dirty_client::migration));
        seq.clear();
        ram->set_enabled(false); // the next commit: no log callbacks
        CHECK(std::none_of(seq.begin(), seq.end(), [](const std::string& e) {
            return e.find("log_") != std::string::npos;
        }));
        ram->set_enabled(true);
    }
    SECTION("inside a transaction the log_start callbacks wait for its end") {
        {
            qomem::memory_transaction tx(*sys);
            sys->global_dirty_log_start(qomem::global_dirty::migration);
            CHECK(seq == strings{"c log_global_start", "a log_global_start"});
        }
        CHECK(std::find(seq.begin(), seq.end(), "a log_start 0-fff ram 0->4") != seq.end());
        sys->global_dirty_log_stop(qomem::global_dirty::migration);
    }
}

TEST_CASE("log_sync: a global sync asks each listener, in priority order, for each section that "
          "logs (or once, log_sync_global), snapshot_and_clear_dirty asks only about its region's "
          "sections, then tells log_global_after_sync",
          "[listener][dirty]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    board b;
    auto ram = qomem::make_ram(*b.dev, "ram", 0x2000);
    auto other = qomem::make_ram(*b.dev, "other", 0x1000);
    auto quiet = qomem::make_ram(*b.dev, "quiet", 0x1000);
    auto alias = qomem::make_alias(*b.dev, "hi", *ram, 0x1000, 0x1000);
    b.sys->add_subregion(0x0, *ram);
    b.sys->add_subregion(0x4000, *other);
    b.sys->add_subregion(0x6000, *quiet);
    b.sys->add_subregion(0x10000, *alias);
    ram->set_log(true, dirty_client::vga);
    other->set_log(true, dirty_client::vga);
    strings seq;
    recorder section_wise(2, "s", &seq);
    recorder global(1, "g", &seq, nop_mode::changes_only, sync_mode::global);
    qomem::address_space as(*b.sys, "memory");
    listening on_s(as, section_wise);
    listening on_g(as, global);
    seq.clear();

    as.system().global_dirty_log_sync();
    CHECK(seq == strings{"g log_sync_global", "s log_sync 0-1fff ram", "s log_sync 4000-4fff other",
                         "s log_sync 10000-10fff ram @1000"});
    seq.clear();
    as.system().global_dirty_log_sync(true);
    CHECK(seq.front() == "g log_sync_global last");
    seq.clear();

    const auto snap = ram->snapshot_and_clear_dirty(0, 0x2000, dirty_client::vga);
    CHECK((snap.start() == 0 && snap.end() == 0x2000));
    CHECK(seq == strings{"g log_sync_global", "s log_sync 0-1fff ram", "s log_sync 10000-10fff ram @1000",
                         "g log_global_after_sync", "s log_global_after_sync"});
    seq.clear();

    // log_clear: the part of each logging section of the region inside the range.
    ram->clear_dirty_bitmap(0x800, 0x1000);
    CHECK(seq == strings{"g log_clear 800-17ff ram @800", "g log_clear 10000-107ff ram @1000",
                         "s log_clear 800-17ff ram @800", "s log_clear 10000-107ff ram @1000"});
    seq.clear();
    quiet->clear_dirty_bitmap(0, 0x1000); // does not log: nothing to clear
    CHECK(seq.empty());
    ram->set_log(false, dirty_client::vga);
    other->set_log(false, dirty_client::vga);
}

TEST_CASE("nop_mode::every_range: region_nop reaches every range on every commit, even one that "
          "leaves the view alone, while changes_only listeners keep hearing only around changes",
          "[listener][nop]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    board b;
    // More ranges than one chunk holds, so an incremental diff does not
    // cover them all.
    std::vector<qomem::memory_region*> leaves;
    for (int i = 0; i < 200; ++i) {
        auto r = qomem::make_ram(*b.dev, fmt::format("r{}", i), 0x1000);
        b.sys->add_subregion(static_cast<hwaddr>(i) * 0x2000, *r);
        leaves.push_back(r.get());
    }
    auto under = qomem::make_ram(*b.dev, "under", 0x1000);
    b.sys->add_subregion(0x0, *under, -1); // shadowed by r0
    auto other_root = qomem::make_container(*b.dev, "other", 0x100000);
    other_root->add_subregion(0x0, *qomem::make_ram(*b.dev, "x", 0x1000));
    other_root->add_subregion(0x8000, *qomem::make_ram(*b.dev, "y", 0x1000));
    recorder qemu_like(1, "qemu", nullptr, nop_mode::every_range);
    recorder ours(2, "ours");
    recorder other_qemu(1, "other", nullptr, nop_mode::every_range);
    recorder other_ours(2, "other-ours");
    qomem::address_space as(*b.sys, "memory");
    qomem::address_space as2(*other_root, "other");
    listening on1(as, qemu_like);
    listening on2(as, ours);
    listening on3(as2, other_qemu);
    listening on4(as2, other_ours);
    CHECK(qemu_like.nops() == nop_mode::every_range);
    CHECK(ours.nops() == nop_mode::changes_only);
    qemu_like.take();
    ours.take();
    other_qemu.take();
    other_ours.take();

    leaves[100]->set_address(0x1000'0000);
    {
        const strings q = qemu_like.take();
        check_commit_shape(q);
        CHECK(q.size() == 2 + 1 + 200); // begin, commit, one del, 199 nops and one add
        CHECK(std::count_if(q.begin(), q.end(), [](const std::string& e) { return e.starts_with("nop "); }) == 199);
        CHECK(q[1] == "del c8000-c8fff r100");
        CHECK(q[q.size() - 2] == "add 10000000-10000fff r100");
        const strings o = ours.take();
        check_commit_shape(o);
        CHECK(o.size() < q.size());
        // Everything a changes_only listener hears, the every_range one hears too.
        for (const std::string& e : o) CHECK(std::find(q.begin(), q.end(), e) != q.end());
        // The other address space did not change: the QEMU-like listener
        // there hears a commit of nops all the same, ours nothing.
        CHECK(other_qemu.take() == strings{"begin", "nop 0-fff x", "nop 8000-8fff y", "commit"});
        CHECK(other_ours.events.empty());
    }

    // A change no view shows: QEMU's listeners still hear a commit of nops.
    under->set_enabled(false);
    {
        const strings q = qemu_like.take();
        CHECK(q.size() == 2 + 200);
        CHECK(std::all_of(q.begin() + 1, q.end() - 1, [](const std::string& e) { return e.starts_with("nop "); }));
        CHECK(ours.events.empty());
        CHECK(other_qemu.take().size() == 4);
    }
}

TEST_CASE("a listener that throws while its registration is replayed is left unregistered, and "
          "registering from inside a listener callback is misuse",
          "[listener]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    board b;
    auto ram = qomem::make_ram(*b.dev, "ram", 0x1000);
    b.sys->add_subregion(0x0, *ram);
    qomem::address_space as(*b.sys, "memory");

    struct thrower : qomem::memory_listener {
        void region_add(const qomem::memory_section&) override { throw std::runtime_error("no"); }
    } t;
    CHECK_THROWS_AS(as.add_listener(t), std::runtime_error);
    CHECK(t.registered_to() == nullptr);
    CHECK(as.system().listener_count() == 0);

    struct nested : qomem::memory_listener {
        qomem::address_space* as = nullptr;
        recorder inner;
        bool refused = false;
        void region_add(const qomem::memory_section&) override {
            try {
                as->add_listener(inner);
            } catch (const qomem::assertion_failure&) {
                refused = true;
            }
        }
    } n;
    n.as = &as;
    as.add_listener(n);
    CHECK(n.refused);
    CHECK(n.inner.registered_to() == nullptr);
    as.remove_listener(n);
}

TEST_CASE("listener priorities: QEMU's constants, and every listener of a system in priority order",
          "[listener][priority]") {
    qomem_test::leak_check leaks;
    board b;
    qomem::address_space as(*b.sys, "memory");
    recorder accel(qomem::memory_listener::priority_accel, "accel");
    recorder first(qomem::memory_listener::priority_min, "first");
    recorder backend(qomem::memory_listener::priority_dev_backend, "backend");
    listening l1(as, accel);
    listening l2(as, first);
    listening l3(as, backend);
    strings names;
    as.system().for_each_listener([&](qomem::memory_listener& l) { names.push_back(l.name()); });
    CHECK(names == strings{"first", "accel", "backend"});
}
