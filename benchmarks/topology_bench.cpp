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
// Targets (issue 6): qomem at 1,000 >= 100 x faster than Unicorn at 1,000;
// qomem at 100,000 <= 50 x qomem at 1,000.
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

#include <qomem/address_space.hpp>
#include <qomem/device.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/rcu.hpp>

namespace {

using qomem::hwaddr;

constexpr hwaddr region_base = 0x1000'0000;
constexpr hwaddr region_stride = 0x2000;
constexpr std::size_t region_size = 0x1000;

hwaddr region_start(std::size_t i) { return region_base + i * region_stride; }
/// In the hole after region n/2: inside the machine, touching no region.
hwaddr probe_addr(std::size_t n) { return region_start(n / 2) + region_size; }

/// N RAM regions owned by a device, in an ownerless root container, one
/// address space; plus the probe region (owned, not yet added).
struct qomem_machine {
    explicit qomem_machine(std::size_t n) {
        qomem::memory_transaction tx; // one render for the whole build
        for (std::size_t i = 0; i < n; ++i) {
            auto r = qomem::make_ram(*dev, fmt::format("ram{}", i), region_size);
            sys->add_subregion(region_start(i), *r); // sys and dev hold it
        }
        probe = qomem::make_ram(*dev, "probe", region_size).get(); // dev holds it
        as.emplace(*sys, "memory");
    }
    /// The address space (it holds the root), the root (dropping its
    /// subregion references), then the device, which frees the regions.
    ~qomem_machine() {
        as.reset();
        sys.reset();
        dev.reset();
    }
    qomem_machine(const qomem_machine&) = delete;
    qomem_machine& operator=(const qomem_machine&) = delete;

    qomem::ref_ptr<qomem::device> dev = qomem::make<qomem::device>();
    qomem::ref_ptr<qomem::memory_region> sys =
        qomem::make_container(nullptr, "system", qomem::u128_2_64);
    qomem::memory_region* probe = nullptr;
    std::optional<qomem::address_space> as;
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

void uc_check(uc_err e, const char* what) {
    if (e != UC_ERR_OK) throw std::runtime_error(fmt::format("{}: {}", what, uc_strerror(e)));
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
    qomem::rcu::synchronize();
    if (const std::size_t n = qomem::live_object_count()) {
        std::fprintf(stderr, "topology_bench: %zu qomem object(s) leaked\n", n);
        return 1;
    }
    return 0;
}
