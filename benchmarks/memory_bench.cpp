// Memory: bytes per region, per flat range and per address space, and
// 10,000 address spaces whose roots reduce to one flat-view root sharing one
// flat view. Each benchmark runs once per repetition; the figures are
// counters, the time is only the build's.
//
// Heap bytes are counted by this program's global operator new/delete (the
// malloc_usable_size of every live allocation, so the allocator's rounding
// is included), not by mallinfo2(): chunks cached in glibc's tcache count as
// in use there, so a delta taken after earlier frees comes out near zero.
//
//   memory/region/N          N RAM regions (4 KiB, never touched): ownerless,
//                            then owned by a device, then added to a container
//   memory/flat_view/N       one rendered view of N RAM regions
//   memory/shared_view/N     N address spaces, each rooted at its own alias
//                            of one system container (16 RAM regions): all
//                            must share one flat view (checked: skipped if not)
//
// QOMEM_BENCH_SMOKE=1 (CI) uses 500 instead of 10,000.
#include <malloc.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <new>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <benchmark/benchmark.h>
#include <fmt/format.h>

#include <qomem/address_space.hpp>
#include <qomem/device.hpp>
#include <qomem/flat_view.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/rcu.hpp>

#include "bench_support.hpp"

namespace {

using qomem::hwaddr;

std::atomic<std::int64_t> live_heap_bytes{0};

void* counted_alloc(std::size_t n, std::size_t align) {
    void* p = nullptr;
    if (align <= alignof(std::max_align_t))
        p = std::malloc(n ? n : 1);
    else if (::posix_memalign(&p, align, n ? n : 1) != 0)
        p = nullptr;
    if (!p) throw std::bad_alloc();
    live_heap_bytes.fetch_add(static_cast<std::int64_t>(::malloc_usable_size(p)), std::memory_order_relaxed);
    return p;
}

void counted_free(void* p) noexcept {
    if (!p) return;
    live_heap_bytes.fetch_sub(static_cast<std::int64_t>(::malloc_usable_size(p)), std::memory_order_relaxed);
    std::free(p);
}

/// Heap bytes in use now (operator new only).
double heap_in_use() { return static_cast<double>(live_heap_bytes.load(std::memory_order_relaxed)); }

std::string region_name(std::size_t i) { return fmt::format("ram{:05}", i); } // fits in SSO

void regions(benchmark::State& state) {
    const auto n = static_cast<std::size_t>(state.range(0));
    double ownerless = 0, owned = 0, in_container = 0;
    for (auto _ : state) {
        {
            std::vector<qomem::ref_ptr<qomem::memory_region>> handles;
            handles.reserve(n);
            const double before = heap_in_use();
            for (std::size_t i = 0; i < n; ++i)
                handles.push_back(qomem::make_ram(nullptr, region_name(i), 0x1000));
            ownerless = heap_in_use() - before;
        }
        auto dev = qomem::make<qomem::device>();
        auto sys = qomem::make_container(nullptr, "system", qomem::u128_2_64);
        std::vector<qomem::memory_region*> rams;
        rams.reserve(n);
        const double before = heap_in_use();
        for (std::size_t i = 0; i < n; ++i)
            rams.push_back(qomem::make_ram(*dev, region_name(i), 0x1000).get()); // dev holds it
        const double after_make = heap_in_use();
        {
            qomem::memory_transaction tx;
            for (std::size_t i = 0; i < n; ++i)
                sys->add_subregion(0x1000'0000 + hwaddr(i) * 0x2000, *rams[i]);
        }
        const double after_add = heap_in_use();
        owned = after_make - before;
        in_container = after_add - after_make;
        sys.reset(); // drops its subregion references; dev then frees the regions
        dev.reset();
    }
    const auto per = [&](double bytes) { return bytes / static_cast<double>(n); };
    state.counters["sizeof_memory_region"] = sizeof(qomem::memory_region);
    state.counters["ownerless_region_bytes"] = per(ownerless);
    state.counters["owned_region_bytes"] = per(owned);
    state.counters["subregion_link_bytes"] = per(in_container);
    state.counters["regions"] = static_cast<double>(n);
}

void flat_view_bytes(benchmark::State& state) {
    const auto n = static_cast<std::size_t>(state.range(0));
    double bytes = 0;
    std::size_t ranges = 0;
    for (auto _ : state) {
        auto dev = qomem::make<qomem::device>();
        auto sys = qomem::make_container(nullptr, "system", qomem::u128_2_64);
        {
            qomem::memory_transaction tx;
            for (std::size_t i = 0; i < n; ++i)
                sys->add_subregion(0x1000'0000 + hwaddr(i) * 0x2000,
                                   *qomem::make_ram(*dev, region_name(i), 0x1000));
        }
        const double before = heap_in_use();
        qomem::ref_ptr<qomem::flat_view> v = qomem::render_flat_view(sys.get());
        bytes = heap_in_use() - before;
        ranges = v->ranges().size();
        v.reset();
        sys.reset();
        dev.reset();
    }
    state.counters["sizeof_flat_range"] = sizeof(qomem::flat_range);
    state.counters["sizeof_flat_view"] = sizeof(qomem::flat_view);
    state.counters["flat_view_bytes"] = bytes;
    state.counters["flat_range_bytes"] = ranges ? bytes / static_cast<double>(ranges) : 0;
    state.counters["flat_ranges"] = static_cast<double>(ranges);
}

void shared_view(benchmark::State& state) {
    const auto n = static_cast<std::size_t>(state.range(0));
    double alias_bytes = 0, as_bytes = 0, view_bytes = 0;
    std::size_t distinct = 0;
    for (auto _ : state) {
        auto dev = qomem::make<qomem::device>();
        auto sys = qomem::make_container(nullptr, "system", qomem::u128_2_64);
        {
            qomem::memory_transaction tx;
            for (std::size_t i = 0; i < 16; ++i)
                sys->add_subregion(hwaddr(i) * 0x10000, *qomem::make_ram(*dev, region_name(i), 0x10000));
        }
        {
            const double before = heap_in_use();
            auto probe = qomem::render_flat_view(sys.get());
            view_bytes = heap_in_use() - before;
        }
        // Settle the commit machinery (what the build above queued) so the
        // deltas below hold only what the aliases and address spaces take.
        std::make_unique<qomem::address_space>(*sys, "settle").reset();
        qomem::rcu::synchronize();
        std::vector<qomem::ref_ptr<qomem::memory_region>> roots;
        std::vector<std::unique_ptr<qomem::address_space>> spaces; // each counted
        roots.reserve(n);
        spaces.reserve(n);
        double before = heap_in_use();
        for (std::size_t i = 0; i < n; ++i)
            roots.push_back(qomem::make_alias(nullptr, fmt::format("as-root{:05}", i), *sys, 0,
                                              qomem::u128_2_64));
        alias_bytes = heap_in_use() - before;
        before = heap_in_use();
        {
            qomem::memory_transaction tx; // one commit for all of them
            for (std::size_t i = 0; i < n; ++i)
                spaces.push_back(std::make_unique<qomem::address_space>(
                    *roots[i], fmt::format("as{:05}", i)));
        }
        as_bytes = heap_in_use() - before; // includes the one shared view
        std::set<const qomem::flat_view*> views;
        for (const auto& as : spaces) views.insert(as->view().get());
        distinct = views.size();
        spaces.clear(); // address spaces before their roots
        roots.clear();  // the aliases before their target
        sys.reset();
        dev.reset();
        if (distinct != 1) {
            state.SkipWithError(
                fmt::format("{} address spaces use {} flat views, not one", n, distinct).c_str());
            break;
        }
    }
    state.counters["sizeof_address_space"] = sizeof(qomem::address_space);
    state.counters["address_spaces"] = static_cast<double>(n);
    state.counters["distinct_flat_views"] = static_cast<double>(distinct);
    state.counters["flat_view_bytes"] = view_bytes;
    state.counters["address_space_bytes"] = as_bytes / static_cast<double>(n);
    state.counters["alias_root_bytes"] = alias_bytes / static_cast<double>(n);
    state.counters["total_bytes"] = as_bytes + alias_bytes;
    // What one view per address space would have cost on top.
    state.counters["unshared_views_bytes"] = view_bytes * static_cast<double>(n);
}

} // namespace

// The replaceable allocation functions; the nothrow and sized forms of the
// standard library forward to these.
void* operator new(std::size_t n) { return counted_alloc(n, 0); }
void* operator new[](std::size_t n) { return counted_alloc(n, 0); }
void* operator new(std::size_t n, std::align_val_t a) {
    return counted_alloc(n, static_cast<std::size_t>(a));
}
void* operator new[](std::size_t n, std::align_val_t a) {
    return counted_alloc(n, static_cast<std::size_t>(a));
}
void operator delete(void* p) noexcept { counted_free(p); }
void operator delete[](void* p) noexcept { counted_free(p); }
void operator delete(void* p, std::size_t) noexcept { counted_free(p); }
void operator delete[](void* p, std::size_t) noexcept { counted_free(p); }
void operator delete(void* p, std::align_val_t) noexcept { counted_free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { counted_free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { counted_free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { counted_free(p); }

int main(int argc, char** argv) {
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    const std::int64_t n = std::getenv("QOMEM_BENCH_SMOKE") ? 500 : 10000;
    for (auto [name, fn] : {std::pair{"memory/region", &regions},
                            std::pair{"memory/flat_view", &flat_view_bytes},
                            std::pair{"memory/shared_view", &shared_view}})
        benchmark::RegisterBenchmark(name, fn)->Arg(n)->Iterations(1)->Unit(benchmark::kMillisecond);
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return qomem_bench::leak_status("memory_bench");
}
