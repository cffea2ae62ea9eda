// Dirty logging on the write path: what an 8-byte guest write to RAM costs
// with nothing logged, with one client (VGA) logging, and with three (VGA,
// CODE and the migration client of global tracking) — against the same
// writes as bare memcpys into one host buffer, in the same binary.
//
//   dirty/write8/memcpy_baseline   memcpy to the same random offsets of a buffer
//   dirty/write8/off               address_space::write, 16 RAM regions, no logging
//   dirty/write8/vga               the same, every region logging for VGA
//   dirty/write8/three_clients     VGA and CODE on every region, global tracking on
//
// The write path marks pages with one relaxed load when the page's bit is
// already set (a page written again and again is the common case), and a
// fetch_or only the first time: the figures are for writes spread over 16
// regions of one page each, whose bits are set after the first pass.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include <benchmark/benchmark.h>

#include <qomem/address_space.hpp>
#include <qomem/dirty_log.hpp>
#include <qomem/memory_region.hpp>

#include "bench_support.hpp"

namespace {

using qomem::dirty_client;
using qomem::hwaddr;
using qomem_bench::ram_machine;

constexpr std::size_t regions = 16;
constexpr std::size_t addresses = 4096;

/// Random 8-byte-aligned addresses inside the regions (fixed seed).
std::vector<hwaddr> random_addresses() {
    std::mt19937_64 rng(7);
    std::vector<hwaddr> out(addresses);
    for (hwaddr& a : out)
        a = qomem_bench::region_start(rng() % regions) + (rng() % (qomem_bench::region_size / 8)) * 8;
    return out;
}

void memcpy_baseline(benchmark::State& state) {
    const std::vector<hwaddr> addrs = random_addresses();
    std::vector<std::byte> host(regions * qomem_bench::region_stride);
    const std::uint64_t v = 0x1122334455667788;
    std::size_t i = 0;
    for (auto _ : state) {
        std::memcpy(host.data() + (addrs[i] - qomem_bench::region_base), &v, 8);
        benchmark::DoNotOptimize(host.data());
        i = (i + 1) % addresses;
    }
}

enum class logging { off, vga, three };

void write8(benchmark::State& state, logging how) {
    ram_machine m(regions);
    std::vector<qomem::memory_region*> rams;
    m.sys->for_each_subregion([&](qomem::memory_region& r) { rams.push_back(&r); });
    if (how != logging::off)
        for (qomem::memory_region* r : rams) r->set_log(true, dirty_client::vga);
    if (how == logging::three) {
        for (qomem::memory_region* r : rams) r->set_log(true, dirty_client::code);
        m.memory->global_dirty_log_start(qomem::global_dirty::migration);
    }
    const std::vector<hwaddr> addrs = random_addresses();
    const std::uint64_t v = 0x1122334455667788;
    std::size_t i = 0;
    for (auto _ : state) {
        benchmark::DoNotOptimize(m.as->write(addrs[i], &v, 8));
        i = (i + 1) % addresses;
    }
    // Every region written must have been marked by now (checked before
    // logging stops): a benchmark that measured a path not taken would be
    // worthless. Google Benchmark's first run makes one iteration, so only
    // the addresses this run wrote count.
    if (how != logging::off) {
        const auto written = std::min<std::size_t>(addresses, state.iterations());
        for (std::size_t k = 0; k < written; ++k) {
            const auto it = std::find_if(rams.begin(), rams.end(), [&](qomem::memory_region* r) {
                return addrs[k] >= r->addr() && addrs[k] - r->addr() < qomem_bench::region_size;
            });
            if (it == rams.end() ||
                !(*it)->get_dirty(addrs[k] - (*it)->addr(), 8, dirty_client::vga)) {
                state.SkipWithError("a write was not logged");
                break;
            }
        }
    }
    if (how == logging::three) {
        m.memory->global_dirty_log_stop(qomem::global_dirty::migration);
        for (qomem::memory_region* r : rams) r->set_log(false, dirty_client::code);
    }
    if (how != logging::off)
        for (qomem::memory_region* r : rams) r->set_log(false, dirty_client::vga);
}

} // namespace

BENCHMARK(memcpy_baseline)->Name("dirty/write8/memcpy_baseline");
BENCHMARK_CAPTURE(write8, off, logging::off)->Name("dirty/write8/off");
BENCHMARK_CAPTURE(write8, vga, logging::vga)->Name("dirty/write8/vga");
BENCHMARK_CAPTURE(write8, three, logging::three)->Name("dirty/write8/three_clients");

int main(int argc, char** argv) {
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return qomem_bench::leak_status(argv[0]);
}
