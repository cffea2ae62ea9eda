// Region reference counting: memory_region_ref + memory_region_unref, against
// what an emulator author would write instead.
//
//   refcount/region_owned         a region with an owner device, in its tree
//                                 (counted per thread: detail/region_refcount.hpp)
//   refcount/region_owned_unparented  the same region out of the tree (its
//                                 atomic count: what every owned region paid
//                                 before issue 13)
//   refcount/shared_region/threads:N  N threads on one region in the tree
//   refcount/shared_atomic/threads:N  N threads on one raw atomic pair
//   memory/region_refcount/N      memory of per-thread counting for N regions
//   refcount/region_ownerless     an ownerless region (not counted: one branch)
//   refcount/baseline_atomic_pair std::atomic<uint32_t> fetch_add relaxed + fetch_sub acq_rel
//   refcount/baseline_plain_pair  a plain increment + decrement kept in memory
//   refcount/baseline_shared_ptr  std::shared_ptr copy + destroy
//
// Every body ends each operation with benchmark::ClobberMemory() so the
// compiler neither hoists the ownerless branch nor folds the plain pair.
// Targets (issue 6): ownerless <= 2 x plain pair. Issue 13: owned, in the
// tree <= 2 x plain pair; 2 threads on one region <= 1.2 x 1 thread (per
// pair, CPU time summed over the threads).
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#include <benchmark/benchmark.h>

#include <qomem/device.hpp>
#include <qomem/memory_region.hpp>

#include "bench_support.hpp"

namespace {

void region_owned(benchmark::State& state) {
    auto dev = qomem::make<qomem::device>();
    auto mr = qomem::make_ram(*dev, "ram", 0x1000);
    qomem::memory_region& r = *mr;
    benchmark::DoNotOptimize(&r);
    for (auto _ : state) {
        qomem::memory_region_ref(r);
        benchmark::ClobberMemory();
        qomem::memory_region_unref(r);
        benchmark::ClobberMemory();
    }
    state.counters["ref_count_after"] = r.ref_count(); // 2: handle + owner's child property
    state.SetItemsProcessed(state.iterations());
    // The owner's child property holds the region; the device's finalization frees it.
}

void region_owned_unparented(benchmark::State& state) {
    auto dev = qomem::make<qomem::device>();
    auto mr = qomem::make_ram(*dev, "ram", 0x1000);
    qomem::unparent(*mr);
    qomem::memory_region& r = *mr;
    benchmark::DoNotOptimize(&r);
    for (auto _ : state) {
        qomem::memory_region_ref(r);
        benchmark::ClobberMemory();
        qomem::memory_region_unref(r);
        benchmark::ClobberMemory();
    }
    state.SetItemsProcessed(state.iterations());
}

// One region in the tree (and one raw atomic) shared by the threads of the
// threaded rows; made in main, before any benchmark thread starts.
qomem::memory_region* shared_region = nullptr;
std::atomic<std::uint32_t> shared_count{1};

void shared_region_pairs(benchmark::State& state) {
    qomem::memory_region& r = *shared_region;
    for (auto _ : state) {
        qomem::memory_region_ref(r);
        benchmark::ClobberMemory();
        qomem::memory_region_unref(r);
        benchmark::ClobberMemory();
    }
    state.SetItemsProcessed(state.iterations());
}

void shared_atomic_pairs(benchmark::State& state) {
    for (auto _ : state) {
        shared_count.fetch_add(1, std::memory_order_relaxed);
        benchmark::ClobberMemory();
        shared_count.fetch_sub(1, std::memory_order_acq_rel);
        benchmark::ClobberMemory();
    }
    state.SetItemsProcessed(state.iterations());
}

/// Bytes of this thread's counter array that are resident (mincore).
double resident_counter_bytes() {
    const auto* base = qomem::detail::region_refcount::this_thread.slots;
    if (!base) return 0;
    const std::size_t page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
    const std::size_t bytes = qomem::detail::region_refcount::array_bytes();
    std::vector<unsigned char> vec((bytes + page - 1) / page);
    if (::mincore(const_cast<void*>(static_cast<const void*>(base)), bytes, vec.data()) != 0)
        return 0;
    std::size_t resident = 0;
    for (unsigned char v : vec) resident += v & 1;
    return double(resident * page);
}

// N owned regions in the tree, each ref'd and unref'd once on a fresh
// thread: the resident part of that thread's counter array, per region
// (mincore; a reused array may hold pages from earlier threads too).
// (The region itself holds a 4-byte id word: sizeof(memory_region) in
// memory_bench's rows includes it.)
void region_refcount_memory(benchmark::State& state) {
    const auto n = static_cast<std::size_t>(state.range(0));
    auto dev = qomem::make<qomem::device>();
    std::vector<qomem::ref_ptr<qomem::memory_region>> regions;
    regions.reserve(n);
    for (std::size_t i = 0; i < n; ++i) regions.push_back(qomem::make_ram(*dev, "r" + std::to_string(i), 0x1000));
    double per_thread = 0;
    for (auto _ : state) {
        double resident = 0;
        std::thread t([&] {
            for (auto& r : regions) {
                qomem::memory_region_ref(*r);
                qomem::memory_region_unref(*r);
            }
            resident = resident_counter_bytes();
        });
        t.join();
        per_thread = resident / double(n);
    }
    state.counters["regions"] = double(n);
    state.counters["percpu_thread_bytes_per_region"] = per_thread;
    state.counters["percpu_reserved_bytes_per_thread"] =
        double(qomem::detail::region_refcount::array_bytes());
    state.counters["percpu_id_word_bytes"] = double(sizeof(std::atomic<std::uint32_t>));
    regions.clear();
    qomem::unparent(*dev);
}

// Making an owned region and unparenting it: the unparent switches it to its
// atomic count (a membarrier(2) when another thread has counted regions: one
// such thread, registered and asleep, is kept in main), against the same with
// an ownerless region (never counted per thread).
void make_unparent_owned(benchmark::State& state) {
    auto dev = qomem::make<qomem::device>();
    for (auto _ : state) {
        auto mr = qomem::make_ram(*dev, "r", 0x1000);
        qomem::unparent(*mr);
    }
    state.SetItemsProcessed(state.iterations());
}

void make_unparent_ownerless(benchmark::State& state) {
    auto home = qomem::make<qomem::device>();
    for (auto _ : state) {
        auto mr = qomem::make_ram(qomem::region_owner::ownerless_in(*home), "r", 0x1000);
        qomem::unparent(*mr);
    }
    state.SetItemsProcessed(state.iterations());
}

void region_ownerless(benchmark::State& state) {
    auto mr = qomem::make_ram(nullptr, "ram", 0x1000);
    qomem::memory_region& r = *mr;
    benchmark::DoNotOptimize(&r);
    for (auto _ : state) {
        qomem::memory_region_ref(r);
        benchmark::ClobberMemory();
        qomem::memory_region_unref(r);
        benchmark::ClobberMemory();
    }
    state.SetItemsProcessed(state.iterations());
}

void baseline_atomic_pair(benchmark::State& state) {
    std::atomic<std::uint32_t> count{1};
    benchmark::DoNotOptimize(&count);
    for (auto _ : state) {
        count.fetch_add(1, std::memory_order_relaxed);
        benchmark::ClobberMemory();
        count.fetch_sub(1, std::memory_order_acq_rel);
        benchmark::ClobberMemory();
    }
    state.SetItemsProcessed(state.iterations());
}

void baseline_plain_pair(benchmark::State& state) {
    struct counted {
        std::uint32_t count = 1;
    } c;
    counted* p = &c;
    benchmark::DoNotOptimize(p);
    for (auto _ : state) {
        ++p->count;
        benchmark::ClobberMemory();
        --p->count;
        benchmark::ClobberMemory();
    }
    state.SetItemsProcessed(state.iterations());
}

void baseline_shared_ptr(benchmark::State& state) {
    auto sp = std::make_shared<int>(42);
    for (auto _ : state) {
        std::shared_ptr<int> copy = sp;
        benchmark::DoNotOptimize(copy);
        benchmark::ClobberMemory();
    }
    state.SetItemsProcessed(state.iterations());
}

} // namespace

int main(int argc, char** argv) {
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    benchmark::RegisterBenchmark("refcount/region_owned", region_owned);
    benchmark::RegisterBenchmark("refcount/region_owned_unparented", region_owned_unparented);
    benchmark::RegisterBenchmark("refcount/region_ownerless", region_ownerless);
    auto dev = qomem::make<qomem::device>();
    auto shared = qomem::make_ram(*dev, "shared", 0x1000);
    shared_region = shared.get();
    for (int threads : {1, 2}) {
        benchmark::RegisterBenchmark("refcount/shared_region", shared_region_pairs)
            ->Threads(threads);
        benchmark::RegisterBenchmark("refcount/shared_atomic", shared_atomic_pairs)
            ->Threads(threads);
    }
    benchmark::RegisterBenchmark("refcount/make_unparent_owned", make_unparent_owned);
    benchmark::RegisterBenchmark("refcount/make_unparent_ownerless", make_unparent_ownerless);
    // A second thread that has counted a region and sleeps until the end:
    // unparent's membarrier(2) has another thread to fence.
    std::promise<void> finish;
    std::thread sleeper([&, done = finish.get_future()]() mutable {
        qomem::memory_region_ref(*shared_region);
        qomem::memory_region_unref(*shared_region);
        done.wait();
    });
    benchmark::RegisterBenchmark("memory/region_refcount", region_refcount_memory)
        ->Arg(100000)
        ->Iterations(1);
    benchmark::RegisterBenchmark("refcount/baseline_atomic_pair", baseline_atomic_pair);
    benchmark::RegisterBenchmark("refcount/baseline_plain_pair", baseline_plain_pair);
    benchmark::RegisterBenchmark("refcount/baseline_shared_ptr", baseline_shared_ptr);
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    finish.set_value();
    sleeper.join();
    shared.reset();
    qomem::unparent(*dev);
    dev.reset();
    return qomem_bench::leak_status("refcount_bench");
}
