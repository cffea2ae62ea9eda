// tests/unmergeable_test.cpp — unmergeable regions (QEMU's
// memory_region_set_unmergeable): flat ranges rendered through one never
// merge with their neighbours, the flag is inherited through containers and
// aliases (and never lost by taking a flat-view root below it), listeners
// see one section per region; checked on random maps against the rule and
// against full renders of every incremental commit, dirty-log masks changing
// at the same time.
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <qomem/address_space.hpp>
#include <qomem/device.hpp>
#include <qomem/dirty_log.hpp>
#include <qomem/flat_view.hpp>
#include <qomem/flatten.hpp>
#include <qomem/memory_listener.hpp>
#include <qomem/memory_region.hpp>

#include "test_support.hpp"

namespace {

using qomem::hwaddr;
using qomem::u128;
using qomem_test::board;
using strings = std::vector<std::string>;

/// "0-fff ram @0 U": each range of a view, U when unmergeable.
strings ranges_of(const qomem::address_space& as) {
    strings out;
    for (const qomem::flat_range& r : as.view()->ranges())
        out.push_back(fmt::format("{:x}-{:x} {} @{:x}{}", r.start, r.last(), r.mr->region_name(),
                                  r.offset_in_region, r.unmergeable ? " U" : ""));
    return out;
}

struct section_log : qomem::memory_listener {
    strings events;
    void region_add(const qomem::memory_section& s) override {
        events.push_back(fmt::format("add {:x}+{:x}{}", s.offset_within_address_space,
                                     static_cast<std::uint64_t>(s.size), s.unmergeable ? " U" : ""));
    }
    void region_del(const qomem::memory_section& s) override {
        events.push_back(fmt::format("del {:x}+{:x}", s.offset_within_address_space,
                                     static_cast<std::uint64_t>(s.size)));
    }
};

} // namespace

TEST_CASE("two aliases of one RAM side by side merge into one range, unless one of them or their "
          "container is unmergeable, listeners then see one section per alias",
          "[unmergeable]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    board b;
    auto ram = qomem::make_ram(*b.dev, "ram", 0x2000);
    auto slots = qomem::make_container(*b.dev, "slots", 0x10000);
    auto a1 = qomem::make_alias(*b.dev, "a1", *ram, 0x0, 0x1000);
    auto a2 = qomem::make_alias(*b.dev, "a2", *ram, 0x1000, 0x1000);
    slots->add_subregion(0x0, *a1);
    slots->add_subregion(0x1000, *a2);
    b.sys->add_subregion(0x100000, *slots);
    b.sys->add_subregion(0x0, *qomem::make_ram(*b.dev, "low", 0x1000));
    qomem::address_space as(*b.sys, "memory");
    section_log l;
    as.add_listener(l);
    CHECK(ranges_of(as) == strings{"0-fff low @0", "100000-101fff ram @0"});
    l.events.clear();

    a1->set_unmergeable(true);
    CHECK(a1->unmergeable());
    CHECK(ranges_of(as) == strings{"0-fff low @0", "100000-100fff ram @0 U", "101000-101fff ram @1000"});
    CHECK(l.events == strings{"del 100000+2000", "add 100000+1000 U", "add 101000+1000"});
    l.events.clear();

    a1->set_unmergeable(false);
    CHECK(ranges_of(as) == strings{"0-fff low @0", "100000-101fff ram @0"});
    CHECK(l.events == strings{"del 100000+1000", "del 101000+1000", "add 100000+2000"});

    slots->set_unmergeable(true); // inherited by everything inside
    CHECK(ranges_of(as) == strings{"0-fff low @0", "100000-100fff ram @0 U", "101000-101fff ram @1000 U"});
    const qomem::ref_ptr<qomem::flat_view> full = qomem::render_flat_view(qomem::flat_view_root(b.sys.get()));
    CHECK(full->ranges() == as.view()->ranges());
    as.remove_listener(l);
}

TEST_CASE("an unmergeable node is never skipped when the flat-view root is chosen, so its flag "
          "is never lost (QEMU loses it there)",
          "[unmergeable][flatten]") {
    qomem_test::leak_check leaks;
    board b;
    auto ram = qomem::make_ram(*b.dev, "ram", 0x2000);
    auto only = qomem::make_container(*b.dev, "only", 0x10000);
    only->add_subregion(0x0, *ram);
    b.sys->add_subregion(0x0, *only);
    CHECK(qomem::flat_view_root(b.sys.get()) == ram.get());
    only->set_unmergeable(true);
    CHECK(qomem::flat_view_root(b.sys.get()) == only.get());
    qomem::address_space as(*b.sys, "memory");
    CHECK(ranges_of(as) == strings{"0-1fff ram @0 U"});
}

TEST_CASE("random maps with unmergeable nodes and changing dirty-log masks: every incremental "
          "commit equals a full render, no two adjacent ranges could merge, and a range is "
          "unmergeable exactly when a node on its path is",
          "[unmergeable][differential]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    std::mt19937_64 rng(GENERATE(1u, 2u, 3u, 4u, 5u, 6u, 7u, 8u));
    auto below = [&](std::uint64_t n) { return std::uniform_int_distribution<std::uint64_t>(0, n - 1)(rng); };
    auto sys = qomem::memory_system::make();
    qomem_test::verify_incremental verify(*sys);
    board b;
    // Two RAM targets; groups (containers) of aliases into them, placed so
    // that neighbours often continue each other (mergeable unless flagged).
    std::vector<qomem::ref_ptr<qomem::memory_region>> targets{qomem::make_ram(*b.dev, "t0", 0x40000),
                                                               qomem::make_ram(*b.dev, "t1", 0x40000)};
    struct alias_info {
        qomem::memory_region* alias;
        qomem::memory_region* group;
        qomem::memory_region* target;
    };
    std::vector<qomem::ref_ptr<qomem::memory_region>> groups;
    std::vector<alias_info> aliases;
    for (int g = 0; g < 4; ++g) {
        groups.push_back(qomem::make_container(*b.dev, fmt::format("g{}", g), 0x40000));
        b.sys->add_subregion(static_cast<hwaddr>(g) * 0x40000, *groups.back());
        for (int i = 0; i < 16; ++i) {
            auto& t = targets[below(2)];
            auto a = qomem::make_alias(*b.dev, fmt::format("a{}.{}", g, i), *t, static_cast<hwaddr>(i) * 0x4000, 0x4000);
            groups.back()->add_subregion(static_cast<hwaddr>(i) * 0x4000, *a);
            aliases.push_back({a.get(), groups.back().get(), t.get()});
        }
    }
    qomem::address_space as(*sys, *b.sys, "memory");
    std::vector<int> log_counts(2);
    for (int step = 0; step < 150; ++step) {
        switch (below(5)) {
        case 0: {
            auto& a = aliases[below(aliases.size())];
            a.alias->set_unmergeable(!a.alias->unmergeable());
            break;
        }
        case 1: {
            auto& g = groups[below(groups.size())];
            g->set_unmergeable(!g->unmergeable());
            break;
        }
        case 2: {
            auto& t = targets[below(2)];
            t->set_unmergeable(!t->unmergeable());
            break;
        }
        case 3: {
            const std::size_t t = below(2);
            const bool on = log_counts[t] == 0 || below(2) == 0;
            targets[t]->set_log(on, qomem::dirty_client::vga);
            log_counts[t] += on ? 1 : -1;
            break;
        }
        case 4: {
            auto& a = aliases[below(aliases.size())];
            a.alias->set_enabled(!a.alias->enabled());
            break;
        }
        }
        const qomem::ref_ptr<qomem::flat_view> v = as.view();
        const auto& rs = v->ranges();
        INFO("step " << step);
        for (std::size_t i = 0; i + 1 < rs.size(); ++i) CHECK_FALSE(rs[i].can_merge(rs[i + 1]));
        for (const qomem::flat_range& r : rs) {
            // The alias covering the range's start.
            const alias_info& a = aliases[static_cast<std::size_t>(r.start / 0x4000)];
            const bool want = a.alias->unmergeable() || a.group->unmergeable() || a.target->unmergeable();
            CHECK(r.unmergeable == want);
            CHECK(r.dirty_log_mask == a.target->dirty_log_mask());
            CHECK(r.mr == a.target);
        }
    }
    for (std::size_t t = 0; t < 2; ++t)
        while (log_counts[t]-- > 0) targets[t]->set_log(false, qomem::dirty_client::vga);
}
