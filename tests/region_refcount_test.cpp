// Region reference counting while a region is in the tree (issue 13): per-
// thread counters (detail/region_refcount.hpp) instead of one atomic count,
// folded into the atomic count when the region leaves its owner's tree.
// The stress cases take refs on one thread and drop them on another, across
// unparent, thread exit and CPU migration; CI runs them under TSan and
// ASan+UBSan, where a lost count is a leak or a use-after-free.
#include <sched.h>

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include <qomem/device.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/object.hpp>

#include "test_support.hpp"

using namespace qomem;
using qomem_test::leak_check;
using qomem_test::live_count;

namespace {

/// Pins the calling thread to one CPU of those it may run on (the i-th,
/// modulo their number). Returns false where affinity cannot be set.
bool pin_to(unsigned i) {
    cpu_set_t allowed;
    CPU_ZERO(&allowed);
    if (::sched_getaffinity(0, sizeof allowed, &allowed) != 0) return false;
    std::vector<int> cpus;
    for (int c = 0; c < CPU_SETSIZE; ++c)
        if (CPU_ISSET(c, &allowed)) cpus.push_back(c);
    if (cpus.empty()) return false;
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpus[i % cpus.size()], &one);
    return ::sched_setaffinity(0, sizeof one, &one) == 0;
}

/// Restores the thread's affinity when the test ends.
class affinity_guard {
public:
    affinity_guard() { ok_ = ::sched_getaffinity(0, sizeof saved_, &saved_) == 0; }
    ~affinity_guard() {
        if (ok_) ::sched_setaffinity(0, sizeof saved_, &saved_);
    }
    affinity_guard(const affinity_guard&) = delete;
    affinity_guard& operator=(const affinity_guard&) = delete;

private:
    cpu_set_t saved_{};
    bool ok_ = false;
};

/// A simple start line for threads (no spinning: a condition wait).
class start_line {
public:
    void wait() {
        std::unique_lock l(m_);
        cv_.wait(l, [&] { return go_; });
    }
    void open() {
        {
            std::lock_guard l(m_);
            go_ = true;
        }
        cv_.notify_all();
    }

private:
    std::mutex m_;
    std::condition_variable cv_;
    bool go_ = false;
};

} // namespace

TEST_CASE("an owned region in its owner's tree counts refs per thread: ref_count sums them, "
          "and unparenting it folds them into its atomic count",
          "[refcount][percpu]") {
    leak_check leaks;
    auto dev = make<device>();
    auto mr = make_ram(*dev, "ram", 0x1000);
    REQUIRE(mr->counted_per_thread());
    REQUIRE(mr->ref_count() == 2); // handle + owner's child property
    memory_region_ref(*mr);
    memory_region_ref(*mr);
    CHECK(mr->ref_count() == 4);
    memory_region_unref(*mr);
    CHECK(mr->ref_count() == 3);

    unparent(*mr);
    CHECK_FALSE(mr->counted_per_thread());
    CHECK(mr->ref_count() == 2); // handle + the one ref left; the child property is gone
    memory_region_unref(*mr);
    CHECK(mr->ref_count() == 1);
    const std::size_t before = live_count("memory-region");
    mr.reset();
    CHECK(live_count("memory-region") == before - 1);
}

TEST_CASE("ownerless regions and regions out of the tree are not counted per thread",
          "[refcount][percpu]") {
    leak_check leaks;
    auto orphan = make_ram(nullptr, "orphan", 0x1000);
    CHECK_FALSE(orphan->counted_per_thread());
    auto dev = make<device>();
    auto mr = make_ram(*dev, "ram", 0x1000);
    unparent(*mr);
    CHECK_FALSE(mr->counted_per_thread());
    // Added back as a child, it keeps its atomic count (per-thread counting
    // is entered once).
    dev->add_child("again", *mr);
    CHECK_FALSE(mr->counted_per_thread());
    memory_region_ref(*mr);
    CHECK(mr->ref_count() == 3);
    memory_region_unref(*mr);
    unparent(*mr);
}

TEST_CASE("a ref taken on one thread and dropped on another balances: the region is freed "
          "when its last reference goes after unparent",
          "[refcount][percpu][threads]") {
    leak_check leaks;
    auto dev = make<device>();
    auto mr = make_ram(*dev, "ram", 0x1000);
    memory_region* r = mr.get();
    mr.reset(); // the child property is the only holder
    constexpr int n = 1000;
    std::thread taker([&] {
        for (int i = 0; i < n; ++i) memory_region_ref(*r);
    });
    taker.join();
    std::thread dropper([&] {
        for (int i = 0; i < n - 1; ++i) memory_region_unref(*r);
    });
    dropper.join();
    CHECK(r->ref_count() == 2); // the child property + one ref left
    unparent(*r);
    CHECK_FALSE(r->counted_per_thread());
    CHECK(r->ref_count() == 1);
    const std::size_t before = live_count("memory-region");
    std::thread last([&] { memory_region_unref(*r); });
    last.join();
    CHECK(live_count("memory-region") == before - 1);
}

TEST_CASE("threads that exit holding refs leave their counts: the region lives until those "
          "refs are dropped, and threads reusing the exited threads' counters add to them",
          "[refcount][percpu][threads]") {
    leak_check leaks;
    auto dev = make<device>();
    auto mr = make_ram(*dev, "ram", 0x1000);
    memory_region* r = mr.get();
    mr.reset();
    constexpr int threads = 8, each = 50;
    for (int round = 0; round < 2; ++round) {
        std::vector<std::thread> ts;
        for (int t = 0; t < threads; ++t)
            ts.emplace_back([&] {
                for (int i = 0; i < each; ++i) memory_region_ref(*r);
            });
        for (auto& t : ts) t.join(); // exited, holding their refs
    }
    CHECK(r->ref_count() == 1 + 2 * threads * each);
    dev.reset(); // the device's last reference: the region is held beyond it
    CHECK(live_count("memory-region") == 1);
    CHECK(live_count("device") == 1); // held by its region
    CHECK_FALSE(r->counted_per_thread());
    // Dropped by new threads (which reuse the exited threads' counters).
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; ++t)
        ts.emplace_back([&] {
            for (int i = 0; i < 2 * each; ++i) memory_region_unref(*r);
        });
    for (auto& t : ts) t.join();
    CHECK(live_count("memory-region") == 0);
    CHECK(live_count("device") == 0);
}

TEST_CASE("refs taken and dropped on other threads while the region is unparented keep the "
          "count exact: the region is freed exactly when the last holder lets go",
          "[refcount][percpu][threads][stress]") {
    leak_check leaks;
    constexpr int rounds = 20, workers = 3, pairs = 2000;
    for (int round = 0; round < rounds; ++round) {
        auto dev = make<device>();
        auto mr = make_ram(*dev, "ram", 0x1000);
        memory_region* r = mr.get();
        mr.reset();
        // Each worker holds one ref (taken here, on this thread), churns
        // ref/unref pairs whose unref happens on its neighbour, and drops
        // its held ref at the end; meanwhile this thread unparents.
        for (int w = 0; w < workers; ++w) memory_region_ref(*r);
        std::atomic<int> handed{0}; // refs taken by one worker for the next to drop
        start_line go;
        std::vector<std::thread> ts;
        for (int w = 0; w < workers; ++w)
            ts.emplace_back([&, w] {
                go.wait();
                for (int i = 0; i < pairs; ++i) {
                    memory_region_ref(*r);
                    if ((i + w) % 2 == 0) {
                        memory_region_unref(*r);
                    } else {
                        handed.fetch_add(1, std::memory_order_release);
                    }
                    // Drop a ref another worker took, when there is one.
                    int h = handed.load(std::memory_order_acquire);
                    while (h > 0 && !handed.compare_exchange_weak(h, h - 1,
                                                                  std::memory_order_acq_rel))
                        ;
                    if (h > 0) memory_region_unref(*r);
                }
                memory_region_unref(*r); // the held one
            });
        go.open();
        dev.reset(); // may catch the region with workers inside ref/unref
        for (auto& t : ts) t.join();
        // What was handed on and not yet dropped is still held.
        const int left = handed.load();
        REQUIRE(live_count("memory-region") == (left > 0 ? 1u : 0u));
        for (int i = 0; i < left; ++i) memory_region_unref(*r);
        REQUIRE(live_count("memory-region") == 0);
        REQUIRE(live_count("device") == 0);
    }
}

TEST_CASE("a thread re-pinned to another CPU between ref and unref keeps the count exact",
          "[refcount][percpu][threads][migration]") {
    leak_check leaks;
    affinity_guard restore;
    auto dev = make<device>();
    auto mr = make_ram(*dev, "ram", 0x1000);
    memory_region* r = mr.get();
    mr.reset();
    constexpr int workers = 2, iterations = 200;
    std::atomic<bool> pinned{true};
    std::vector<std::thread> ts;
    for (int w = 0; w < workers; ++w)
        ts.emplace_back([&, w] {
            for (int i = 0; i < iterations; ++i) {
                if (!pin_to(unsigned(w + i))) pinned.store(false);
                memory_region_ref(*r);
                memory_region_ref(*r);
                if (!pin_to(unsigned(w + i + 1))) pinned.store(false);
                memory_region_unref(*r);
                std::this_thread::yield();
                memory_region_unref(*r);
            }
            // One ref held across a migration and dropped after unparent.
            memory_region_ref(*r);
            pin_to(unsigned(w + 1));
        });
    for (auto& t : ts) t.join();
    CHECK(pinned.load()); // sched_setaffinity worked: the threads did move
    CHECK(r->ref_count() == 1 + workers);
    unparent(*r);
    CHECK(r->ref_count() == workers);
    for (int w = 0; w < workers; ++w) memory_region_unref(*r);
    CHECK(live_count("memory-region") == 0);
}

TEST_CASE("an unbalanced memory_region_unref of a region in the tree is reported when the "
          "region leaves the tree, and the region is still freed once",
          "[refcount][percpu][misuse]") {
    leak_check leaks;
    qomem_test::throwing_assertions asserts;
    auto dev = make<device>();
    auto mr = make_ram(*dev, "ram", 0x1000);
    memory_region* r = mr.get();
    mr.reset();
    memory_region_unref(*r); // the child property's reference, dropped by someone else
    CHECK(live_count("memory-region") == 1); // not detectable here: per-thread counts
    CHECK_THROWS_WITH(unparent(*r), Catch::Contains("unbalanced reference count"));
    CHECK(live_count("memory-region") == 0);
}

TEST_CASE("regions counted per thread use an id each and give it back when they leave the "
          "tree",
          "[refcount][percpu][memory]") {
    leak_check leaks;
    const auto before = detail::region_refcount::current_usage();
    auto dev = make<device>();
    std::vector<ref_ptr<memory_region>> regions;
    for (int i = 0; i < 100; ++i) regions.push_back(make_ram(*dev, "ram", 0x1000));
    CHECK(detail::region_refcount::current_usage().ids_in_use == before.ids_in_use + 100);
    regions.clear();
    dev.reset();
    CHECK(detail::region_refcount::current_usage().ids_in_use == before.ids_in_use);
}
