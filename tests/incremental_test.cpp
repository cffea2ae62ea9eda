// Incremental commits: a commit re-renders only the windows a change touched
// and splices them into the previous view. These tests pin that the result is
// always exactly the full render, on containers large enough to use the
// address index, and that listeners told only about the changed stretches
// can rebuild the view from those reports alone.
#include <cstdint>
#include <map>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <qomem/address_space.hpp>
#include <qomem/device.hpp>
#include <qomem/flat_view.hpp>
#include <qomem/memory_listener.hpp>
#include <qomem/memory_region.hpp>

#include "test_support.hpp"

namespace {

using qomem::hwaddr;
using qomem::u128;

/// Keeps its own copy of a view from region_add / region_del alone.
struct mirror : qomem::memory_listener {
    std::map<hwaddr, qomem::memory_section> ranges;
    std::string error;
    void region_add(const qomem::memory_section& s) override {
        if (!ranges.emplace(s.offset_within_address_space, s).second && error.empty())
            error = fmt::format("add of 0x{:x} over a range the mirror still has", s.offset_within_address_space);
    }
    void region_del(const qomem::memory_section& s) override {
        auto it = ranges.find(s.offset_within_address_space);
        if ((it == ranges.end() || it->second.size != s.size || it->second.mr != s.mr) && error.empty())
            error = fmt::format("del of 0x{:x} that the mirror does not have", s.offset_within_address_space);
        if (it != ranges.end()) ranges.erase(it);
    }
    std::string compare(const qomem::flat_view& v) const {
        if (!error.empty()) return error;
        if (ranges.size() != v.ranges().size())
            return fmt::format("mirror has {} ranges, the view {}", ranges.size(), v.ranges().size());
        auto it = ranges.begin();
        for (const qomem::flat_range& r : v.ranges()) {
            const qomem::memory_section& s = (it++)->second;
            if (s.offset_within_address_space != r.start || s.size != r.size || s.mr != r.mr ||
                s.offset_within_region != r.offset_in_region || s.readonly != r.readonly)
                return fmt::format("mirror differs at 0x{:x}", r.start);
        }
        return {};
    }
};

class incremental_run {
public:
    explicit incremental_run(std::uint64_t seed) : rng_(seed) {}

    std::string run() {
        owner_ = qomem::make<qomem::device>();
        root_ = qomem::make_container(*owner_, "root", qomem::u128_2_64).get();
        bus_ = qomem::make_container(*owner_, "bus", u128(1) << 32).get();
        auto* ram = qomem::make_ram(*owner_, "ram", 0x100000).get();
        {
            qomem::memory_transaction tx;
            root_->add_subregion(0x1'0000'0000, *bus_, 1);
            root_->add_subregion(0, *ram);
            // Many small regions in one container: the address index is used.
            const int n = 40 + static_cast<int>(below(260));
            for (int i = 0; i < n; ++i) add_leaf(fmt::format("leaf{}", i));
            // Aliases into the bus and into RAM, so changes reach the views
            // through several paths.
            aliases_.push_back(qomem::make_alias(*owner_, "bus-window", *bus_, below(16) * 0x10000,
                                                 0x80000)
                                   .get());
            root_->add_subregion(0x8000'0000, *aliases_.back(), 2);
            aliases_.push_back(qomem::make_alias(*owner_, "ram-hi", *ram, 0x8000, 0x8000).get());
            bus_->add_subregion(0x40000, *aliases_.back(), -1);
        }
        as_.emplace(*root_, "memory");
        window_as_.emplace(*aliases_.front(), "window"); // a view rooted at an alias
        as_->add_listener(mirror_);
        if (auto e = check("after building"); !e.empty()) return e;

        for (int step = 0; step < 150; ++step) {
            const bool batch = chance(25);
            std::optional<qomem::memory_transaction> tx;
            if (batch) tx.emplace();
            const int changes = batch ? 1 + static_cast<int>(below(6)) : 1;
            for (int c = 0; c < changes; ++c) mutate();
            tx.reset();
            if (auto e = check(fmt::format("after step {}", step)); !e.empty()) return e;
        }
        as_->remove_listener(mirror_);
        window_as_.reset();
        as_.reset();
        qomem::device* d = owner_.get();
        (void)d;
        owner_.reset(); // the owner's properties were the regions' last holders
        if (qomem::live_object_count() != 0)
            return "objects left alive: " + qomem_test::leak_check::describe_live();
        return {};
    }

private:
    std::uint64_t below(std::uint64_t n) { return std::uniform_int_distribution<std::uint64_t>(0, n - 1)(rng_); }
    bool chance(int percent) { return below(100) < static_cast<std::uint64_t>(percent); }

    void add_leaf(const std::string& name) {
        const u128 size = (1 + below(8)) * 0x1000;
        auto r = chance(70) ? qomem::make_ram(*owner_, name, size) : qomem::make_reservation(*owner_, name, size);
        leaves_.push_back(r.get());
        bus_->add_subregion(below(0x400) * 0x1000, *r, static_cast<std::int32_t>(below(3)) - 1);
    }

    void mutate() {
        qomem::memory_region& r = *leaves_[below(leaves_.size())];
        switch (below(8)) {
        case 0:
            if (r.container()) r.set_address(below(0x400) * 0x1000);
            break;
        case 1:
            r.set_enabled(!r.enabled());
            break;
        case 2:
            if (r.container())
                bus_->del_subregion(r);
            else
                bus_->add_subregion(below(0x400) * 0x1000, r, static_cast<std::int32_t>(below(3)) - 1);
            break;
        case 3:
            if (!r.is_ram()) r.set_size((1 + below(8)) * 0x1000); // RAM cannot grow
            break;
        case 4:
            r.set_readonly(!r.readonly());
            break;
        case 5:
            aliases_[below(aliases_.size())]->set_alias_offset(below(16) * 0x8000);
            break;
        case 6:
            add_leaf(fmt::format("extra{}", leaves_.size()));
            break;
        default:
            if (chance(20)) bus_->set_enabled(!bus_->enabled());
            break;
        }
    }

    std::string check(const std::string& when) {
        for (qomem::address_space* as : {&*as_, &*window_as_}) {
            const auto want = qomem::render_flat_view(qomem::flat_view_root(&as->root()));
            const auto got = as->view();
            if (!(want->ranges() == got->ranges()))
                return fmt::format("{}: view of '{}' ({} ranges) differs from a full render ({} ranges)", when,
                                   as->name(), got->ranges().size(), want->ranges().size());
            if (auto e = got->check_page_table(); !e.empty())
                return fmt::format("{}: page table of '{}': {}", when, as->name(), e);
            // Every page start, end and middle of every range, and the holes
            // between: the page table answers what the binary search does.
            for (const qomem::flat_range& r : got->ranges())
                for (hwaddr a : {r.start, r.last(), r.start + (r.last() - r.start) / 2, r.start - 1,
                                 r.last() + 1})
                    if (got->lookup(a) != got->lookup_by_search(a))
                        return fmt::format("{}: '{}' at {:#x}: the page table and the search disagree", when,
                                           as->name(), a);
        }
        if (auto e = mirror_.compare(*as_->view()); !e.empty()) return when + ": listener mirror: " + e;
        return {};
    }

    std::mt19937_64 rng_;
    qomem::ref_ptr<qomem::device> owner_;
    qomem::memory_region* root_ = nullptr;
    qomem::memory_region* bus_ = nullptr;
    std::vector<qomem::memory_region*> leaves_;
    std::vector<qomem::memory_region*> aliases_;
    mirror mirror_;
    std::optional<qomem::address_space> as_;
    std::optional<qomem::address_space> window_as_;
};

} // namespace

TEST_CASE("incremental commits on large containers always equal a full render, and listeners "
          "can rebuild the view from the changes they are told",
          "[flat_view][incremental]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    qomem_test::verify_incremental verify; // also checks each splice inside the commit
    const char* env = std::getenv("QOMEM_INCREMENTAL_SEED");
    const std::uint64_t base = env ? std::strtoull(env, nullptr, 0) : 0x1ce'beef;
    for (std::uint64_t i = 0; i < 60; ++i) {
        const std::uint64_t seed = base + i;
        std::string failure;
        {
            incremental_run run(seed);
            failure = run.run();
        }
        if (!failure.empty())
            FAIL(fmt::format("seed {:#x} (QOMEM_INCREMENTAL_SEED={:#x}): {}", seed, seed, failure));
    }
}

TEST_CASE("a commit that changes nothing visible keeps the same view object", "[flat_view][incremental]") {
    qomem_test::leak_check leaks;
    auto owner = qomem::make<qomem::device>();
    auto root = qomem::make_container(*owner, "root", qomem::u128_2_64);
    auto a = qomem::make_ram(*owner, "a", 0x1000);
    auto b = qomem::make_ram(*owner, "b", 0x1000);
    auto hidden = qomem::make_ram(*owner, "hidden", 0x1000);
    root->add_subregion(0, *a, 1);
    root->add_subregion(0x4000, *b);
    root->add_subregion(0, *hidden, 0); // fully under `a`
    {
        qomem::address_space as(*root, "memory");
        const qomem::flat_view* before = as.view().get();
        hidden->set_enabled(false);
        CHECK(as.view().get() == before);
        b->set_enabled(false);
        CHECK(as.view().get() != before);
    }
    root->del_subregion(*a);
    root->del_subregion(*b);
    root->del_subregion(*hidden);
}

TEST_CASE("a commit on a large view shares the chunks it did not touch", "[flat_view][incremental]") {
    qomem_test::leak_check leaks;
    auto owner = qomem::make<qomem::device>();
    auto root = qomem::make_container(*owner, "root", qomem::u128_2_64);
    {
        qomem::memory_transaction tx;
        for (int i = 0; i < 2000; ++i)
            root->add_subregion(static_cast<hwaddr>(i) * 0x2000,
                                *qomem::make_ram(*owner, fmt::format("r{}", i), 0x1000));
    }
    qomem::address_space as(*root, "memory");
    const auto before = as.view();
    REQUIRE(before->ranges().size() == 2000);
    auto extra = qomem::make_ram(*owner, "extra", 0x1000);
    root->add_subregion(0x1001000, *extra);
    const auto after = as.view();
    REQUIRE(after->ranges().size() == 2001);
    // Same contents except the one range; most chunks are shared, so the
    // ranges outside the touched chunk are the very same objects.
    CHECK(&before->ranges()[0] == &after->ranges()[0]);
    CHECK(&before->ranges()[1000] == &after->ranges()[1000]);
    CHECK(after->chunk_count() <= before->chunk_count() + 1);
    root->del_subregion(*extra);
}

TEST_CASE("a listener that throws during a commit does not leave the view stale: the next commit "
          "renders everything",
          "[flat_view][incremental][listener]") {
    qomem_test::leak_check leaks;
    struct thrower : qomem::memory_listener {
        bool armed = false;
        void region_add(const qomem::memory_section&) override {
            if (armed) {
                armed = false;
                throw std::runtime_error("listener failed");
            }
        }
    };
    auto owner = qomem::make<qomem::device>();
    auto root = qomem::make_container(*owner, "root", qomem::u128_2_64);
    auto a = qomem::make_ram(*owner, "a", 0x1000);
    auto b = qomem::make_ram(*owner, "b", 0x1000);
    root->add_subregion(0, *qomem::make_ram(*owner, "z", 0x1000));
    {
        qomem::address_space as(*root, "as");
        thrower l;
        as.add_listener(l);
        l.armed = true;
        CHECK_THROWS_AS(root->add_subregion(0x1000, *a), std::runtime_error);
        root->add_subregion(0x5000, *b); // an unrelated change, committed later
        const auto want = qomem::render_flat_view(qomem::flat_view_root(root.get()));
        CHECK(as.view()->ranges() == want->ranges());
        std::uint32_t v = 0x12345678;
        CHECK(as.write(0x1000, &v, 4) == qomem::memtx_ok); // `a` is visible
        as.remove_listener(l);
    }
}

TEST_CASE("del_subregion whose commit throws still drops the container's reference", "[incremental][lifetime]") {
    qomem_test::leak_check leaks;
    struct thrower : qomem::memory_listener {
        bool armed = false;
        void region_del(const qomem::memory_section&) override {
            if (armed) {
                armed = false;
                throw std::runtime_error("listener failed");
            }
        }
    };
    auto sysdev = qomem::make<qomem::device>();
    auto root = qomem::make_container(*sysdev, "root", qomem::u128_2_64);
    root->add_subregion(0, *qomem::make_ram(*sysdev, "z", 0x1000));
    auto dev = qomem::make<qomem::device>();
    auto ram = qomem::make_ram(*dev, "ram", 0x1000);
    root->add_subregion(0x1000, *ram);
    {
        qomem::address_space as(*root, "as");
        thrower l;
        as.add_listener(l);
        l.armed = true;
        CHECK_THROWS_AS(root->del_subregion(*ram), std::runtime_error);
        as.remove_listener(l);
    }
    qomem::memory_synchronize();
    CHECK(ram->container() == nullptr);
    CHECK(ram->ref_count() == 2); // the handle and the owner's child property
}
