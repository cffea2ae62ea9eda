// Run-time topology changes: add one subregion and delete it again (two
// commits) in a machine of N regions, against Unicorn 2's uc_mem_map +
// uc_mem_unmap of one page with N regions mapped.
//
// The machine: N RAM regions of 4 KiB at 0x10000000 + i * 0x2000, owned by a
// device, in an ownerless system container that is the root of one address
// space (make_ram is lazy: no memory is touched). The probe is one more
// 4 KiB RAM region added in the hole after region N/2 and deleted again.
//
//   topology/add_del/qomem/N      N = 1,000, 10,000 and 100,000
//   topology/add_del/unicorn/N    N = 1,000 (uc_mem_map + uc_mem_unmap)
//
// Targets: qomem at 1,000 >= 100 x faster than Unicorn at 1,000 (issue 6);
// qomem at 100,000 <= 10 x qomem at 1,000 (issue 12: with the page table,
// which each commit updates too).
//
// QOMEM_BENCH_SMOKE=1 (CI) shrinks the larger machines to 2,000 regions.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>

#include <benchmark/benchmark.h>
#include <fmt/format.h>
#include <unicorn/unicorn.h>

#include "bench_support.hpp"

namespace {

using namespace qomem_bench;

/// In the hole after region n/2: inside the machine, touching no region.
hwaddr probe_addr(std::size_t n) { return region_start(n / 2) + region_size; }

/// The machine, plus the probe region (owned, not yet added).
struct qomem_machine : ram_machine {
    explicit qomem_machine(std::size_t n) : ram_machine(n), probe(&spare("probe")) {}
    qomem::memory_region* probe;
};

/// The machine of the last qomem benchmark, kept for the next one (and the
/// repetitions) that wants the same size: building 100,000 regions is not
/// part of what is measured. Only one lives at a time.
std::unique_ptr<qomem_machine>& cached_machine() {
    static std::unique_ptr<qomem_machine> m;
    return m;
}

qomem_machine& machine_of(std::size_t n) {
    auto& m = cached_machine();
    if (!m || m->sys->subregion_count() != n) {
        m.reset();
        m = std::make_unique<qomem_machine>(n);
    }
    return *m;
}

void add_del_qomem(benchmark::State& state) {
    const auto n = static_cast<std::size_t>(state.range(0));
    qomem_machine& m = machine_of(n);
    qomem::memory_region& sys = *m.sys;
    qomem::memory_region& probe = *m.probe;
    const hwaddr at = probe_addr(n);
    {
        sys.add_subregion(at, probe);
        const bool seen = m.as->view()->lookup(at) != nullptr;
        sys.del_subregion(probe);
        if (!seen || m.as->view()->lookup(at)) {
            state.SkipWithError("the probe region did not appear and disappear");
            return;
        }
    }
    for (auto _ : state) {
        sys.add_subregion(at, probe);
        sys.del_subregion(probe);
    }
    state.SetItemsProcessed(state.iterations());
    state.counters["regions"] = static_cast<double>(n);
    state.counters["flat_ranges"] = static_cast<double>(m.as->view()->ranges().size());
}

void add_del_unicorn(benchmark::State& state) {
    const auto n = static_cast<std::size_t>(state.range(0));
    cached_machine().reset(); // not needed here
    struct closer {
        void operator()(uc_engine* u) const noexcept { uc_close(u); }
    };
    std::unique_ptr<uc_engine, closer> uc;
    try {
        uc_engine* raw = nullptr;
        uc_check(uc_open(UC_ARCH_X86, UC_MODE_64, &raw), "uc_open");
        uc.reset(raw);
        for (std::size_t i = 0; i < n; ++i)
            uc_check(uc_mem_map(uc.get(), region_start(i), region_size, UC_PROT_ALL), "uc_mem_map");
    } catch (const std::exception& e) {
        state.SkipWithError(e.what());
        return;
    }
    const hwaddr at = probe_addr(n);
    bool ok = true;
    for (auto _ : state) {
        ok &= uc_mem_map(uc.get(), at, region_size, UC_PROT_ALL) == UC_ERR_OK;
        ok &= uc_mem_unmap(uc.get(), at, region_size) == UC_ERR_OK;
    }
    if (!ok) state.SkipWithError("uc_mem_map/uc_mem_unmap of the probe page failed");
    state.SetItemsProcessed(state.iterations());
    state.counters["regions"] = static_cast<double>(n);
}

} // namespace

int main(int argc, char** argv) {
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    const bool smoke = std::getenv("QOMEM_BENCH_SMOKE") != nullptr;

    const std::int64_t large = smoke ? 2000 : 100000;
    const std::int64_t medium = smoke ? 2000 : 10000;
    benchmark::RegisterBenchmark("topology/add_del/qomem", add_del_qomem)
        ->Arg(1000)->Arg(medium)->Arg(large)->Unit(benchmark::kMicrosecond);
    benchmark::RegisterBenchmark("topology/add_del/unicorn", add_del_unicorn)
        ->Arg(1000)->Unit(benchmark::kMicrosecond);

    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();

    cached_machine().reset();
    return leak_status("topology_bench");
}
