// Dispatch: 8-byte RAM reads and DMA map + unmap through an address space,
// against a sorted vector + memcpy and against Unicorn 2's uc_mem_read.
//
// The layout, the same for every implementation: N RAM regions of 4 KiB at
// 0x10000000 + i * 0x2000 (a 4 KiB hole after each), every 8-byte word
// holding (region index << 32 | offset) so each read is checked once in
// setup. Addresses come from one precomputed array (16 Ki entries, fixed
// seed): uniformly random 8-byte-aligned words of uniformly random regions.
//
//   dispatch/read_random/{qomem,baseline_vector,unicorn}/N     N = 16, 1000
//   dispatch/read_repeated/{qomem,baseline_vector,unicorn}/N   one address, over and over
//   dispatch/read_alternating/qomem/N                          two addresses in two regions,
//       in turn (an interpreter's code and data through the plain API: with one
//       most-recently-used entry per view they evicted each other)
//   dispatch/write_random/{qomem,baseline_vector}/N            8-byte writes, random addresses
//   dispatch/read_random_shared/qomem/N                        N = 16, 100000: the same
//       random reads, every region RAM over one of 16 shared 4 KiB host buffers, so both
//       read the same 64 KiB of host memory and the row compares the dispatch alone
//   dispatch/dma_map_unmap/{qomem,baseline_vector}/N           as.map(4 KiB) + as.unmap
//   dispatch/read_threads/no_writer/threads:{1,2}              1 or 2 readers, 16 regions
//   dispatch/read_threads/writer/threads:2                     2 readers and a writer thread
//       toggling an unrelated region's set_enabled every 100 us; reports the commit
//       latency (p50, p99) the writer saw with the readers running
//
// qomem's regions are owned by a device, so DMA takes real (atomic)
// references; the vector baseline's DMA takes an atomic pair on a per-region
// count. Targets (issue 6): see benchmarks/report.py.
//
// QOMEM_BENCH_SMOKE=1 (CI) shrinks the 100,000-region machine to 2,000.
#include <sys/prctl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <typeinfo>
#include <vector>

#include <benchmark/benchmark.h>
#include <fmt/format.h>
#include <unicorn/unicorn.h>

#include "bench_support.hpp"

namespace {

using namespace qomem_bench;

// ---- the layout (bench_support.hpp), and what each region holds ----------------

constexpr std::size_t address_count = std::size_t(1) << 14; // a power of two
constexpr hwaddr toggle_addr = 0xf000'0000; // the writer's unrelated region

std::uint64_t expected_word(hwaddr a) {
    const hwaddr rel = a - region_base;
    return (std::uint64_t(rel / region_stride) << 32) | (rel % region_stride);
}

void fill_region(std::byte* host, std::size_t index) {
    for (std::size_t off = 0; off < region_size; off += 8) {
        const std::uint64_t w = (std::uint64_t(index) << 32) | off;
        std::memcpy(host + off, &w, 8);
    }
}

/// `address_count` random 8-byte-aligned words, uniformly over `regions`.
std::vector<hwaddr> random_words(std::size_t regions, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::uniform_int_distribution<std::size_t> region(0, regions - 1);
    std::uniform_int_distribution<std::size_t> word(0, region_size / 8 - 1);
    std::vector<hwaddr> out(address_count);
    for (hwaddr& a : out) a = region_start(region(rng)) + word(rng) * 8;
    return out;
}

/// `address_count` random region starts (DMA of whole regions).
std::vector<hwaddr> random_starts(std::size_t regions, std::uint64_t seed) {
    std::vector<hwaddr> out = random_words(regions, seed);
    for (hwaddr& a : out) a = region_start((a - region_base) / region_stride);
    return out;
}

// ---- one live fixture at a time -------------------------------------------------
//
// Fixtures are built once and reused by the consecutive benchmarks (and the
// repetitions) that want the same one. Only one exists at a time: every
// qomem address space alive is re-rendered on every commit, so a leftover
// machine would bias the next one.

class fixture_slot {
public:
    template <class T>
    T& get(std::size_t n, bool extra = false) {
        if (type_ != &typeid(T) || n_ != n || extra_ != extra) {
            clear();
            obj_ = std::make_shared<T>(n, extra);
            type_ = &typeid(T);
            n_ = n;
            extra_ = extra;
        }
        return *static_cast<T*>(obj_.get());
    }
    void clear() {
        obj_.reset();
        type_ = nullptr;
    }

private:
    std::shared_ptr<void> obj_;
    const std::type_info* type_ = nullptr;
    std::size_t n_ = 0;
    bool extra_ = false;
};

fixture_slot& slot() {
    static fixture_slot s;
    return s;
}

/// The layout in qomem; `with_toggle` adds the writer's unrelated region.
struct qomem_machine : ram_machine {
    qomem_machine(std::size_t n, bool with_toggle) : ram_machine(n, fill_region) {
        if (with_toggle) {
            toggle = &spare("toggle");
            sys->add_subregion(toggle_addr, *toggle);
        }
    }
    std::uint64_t read(hwaddr a) {
        std::uint64_t v = 0;
        benchmark::DoNotOptimize(as->read(a, &v, 8));
        return v;
    }
    qomem::memtx_result write(hwaddr a, std::uint64_t v) { return as->write(a, &v, 8); }
    qomem::memory_region* toggle = nullptr;
};

/// The layout with every region RAM over one of 16 shared host buffers
/// (region i over buffer i % 16, filled as region i % 16 would be).
struct shared_machine {
    static constexpr std::size_t buffers = 16;
    shared_machine(std::size_t n, bool) : host(new std::byte[buffers * region_size]) {
        for (std::size_t b = 0; b < buffers; ++b) fill_region(host.get() + b * region_size, b);
        {
            qomem::memory_transaction tx(*memory);
            for (std::size_t i = 0; i < n; ++i) {
                auto r = qomem::make_ram_from_ptr(*dev, fmt::format("ram{}", i), region_size,
                                                  host.get() + (i % buffers) * region_size);
                sys->add_subregion(region_start(i), *r);
            }
        }
        as.emplace(*memory, *sys, "memory");
    }
    ~shared_machine() {
        as.reset();
        sys.reset();
        dev.reset();
        memory->synchronize();
    }
    shared_machine(const shared_machine&) = delete;
    shared_machine& operator=(const shared_machine&) = delete;
    std::uint64_t read(hwaddr a) {
        std::uint64_t v = 0;
        benchmark::DoNotOptimize(as->read(a, &v, 8));
        return v;
    }
    /// What the word at `a` holds: its region's buffer's index, not its own.
    static std::uint64_t expected(hwaddr a) {
        const hwaddr rel = a - region_base;
        return (std::uint64_t(rel / region_stride % buffers) << 32) | (rel % region_stride);
    }

    std::unique_ptr<std::byte[]> host; // outlives the regions (declared first)
    qomem::ref_ptr<qomem::memory_system> memory = qomem::memory_system::make();
    qomem::ref_ptr<qomem::device> dev = qomem::make<qomem::device>();
    qomem::ref_ptr<qomem::memory_region> sys = qomem::make_container(nullptr, "system", qomem::u128_2_64);
    std::optional<qomem::address_space> as;
};

/// The baseline an emulator author writes by hand: a sorted vector of
/// region starts, std::upper_bound, a host pointer per region and a count
/// per region for DMA.
struct vector_machine {
    vector_machine(std::size_t n, bool)
        : host_(new std::byte[n * region_size]), refs(new std::atomic<std::uint32_t>[n]) {
        starts.reserve(n);
        hosts.reserve(n);
        for (std::size_t i = 0; i < n; ++i) {
            starts.push_back(region_start(i));
            hosts.push_back(host_.get() + i * region_size);
            fill_region(hosts.back(), i);
            refs[i].store(1, std::memory_order_relaxed);
        }
    }

    /// The index of the region holding [a, a + len), or npos.
    std::size_t find(hwaddr a, std::size_t len) const {
        const auto it = std::upper_bound(starts.begin(), starts.end(), a);
        if (it == starts.begin()) return npos;
        const auto i = static_cast<std::size_t>(it - starts.begin()) - 1;
        return a - starts[i] + len <= region_size ? i : npos;
    }
    std::uint64_t read(hwaddr a) const {
        std::uint64_t v = 0;
        const std::size_t i = find(a, 8);
        if (i != npos) std::memcpy(&v, hosts[i] + (a - starts[i]), 8);
        return v;
    }
    bool write(hwaddr a, std::uint64_t v) {
        const std::size_t i = find(a, 8);
        if (i == npos) return false;
        std::memcpy(hosts[i] + (a - starts[i]), &v, 8);
        return true;
    }

    static constexpr std::size_t npos = ~std::size_t(0);
    std::unique_ptr<std::byte[]> host_;
    std::vector<hwaddr> starts;
    std::vector<std::byte*> hosts;
    std::unique_ptr<std::atomic<std::uint32_t>[]> refs;
};

/// Unicorn 2 (x86-64) with the same layout, each region a uc_mem_map.
struct unicorn_machine {
    unicorn_machine(std::size_t n, bool) {
        uc_engine* raw = nullptr;
        uc_check(uc_open(UC_ARCH_X86, UC_MODE_64, &raw), "uc_open");
        uc.reset(raw);
        std::vector<std::byte> page(region_size);
        for (std::size_t i = 0; i < n; ++i) {
            uc_check(uc_mem_map(uc.get(), region_start(i), region_size, UC_PROT_ALL), "uc_mem_map");
            fill_region(page.data(), i);
            uc_check(uc_mem_write(uc.get(), region_start(i), page.data(), region_size), "uc_mem_write");
        }
    }
    std::uint64_t read(hwaddr a) const {
        std::uint64_t v = 0;
        benchmark::DoNotOptimize(uc_mem_read(uc.get(), a, &v, 8));
        return v;
    }
    struct closer {
        void operator()(uc_engine* u) const noexcept { uc_close(u); }
    };
    std::unique_ptr<uc_engine, closer> uc;
};

/// Builds (or reuses) a fixture; on failure marks the benchmark skipped.
template <class T>
T* acquire(benchmark::State& state, std::size_t n) {
    try {
        return &slot().get<T>(n);
    } catch (const std::exception& e) {
        state.SkipWithError(e.what());
        return nullptr;
    }
}

template <class M>
std::uint64_t expected_of(hwaddr a) {
    if constexpr (std::is_same_v<M, shared_machine>)
        return shared_machine::expected(a);
    else
        return expected_word(a);
}

/// Every implementation must read what the layout says, or its timing
/// means nothing.
template <class M>
bool verified(benchmark::State& state, M& m, const std::vector<hwaddr>& addrs) {
    for (std::size_t i = 0; i < std::min<std::size_t>(addrs.size(), 256); ++i)
        if (m.read(addrs[i]) != expected_of<M>(addrs[i])) {
            state.SkipWithError(fmt::format("wrong value read at {:#x}", addrs[i]).c_str());
            return false;
        }
    return true;
}

// ---- reads -------------------------------------------------------------------------

enum class pattern { random, repeated, alternating };

std::vector<hwaddr> addresses_for(pattern p, std::size_t n) {
    std::vector<hwaddr> a = random_words(n, 42);
    if (p == pattern::repeated) a.resize(1);
    if (p == pattern::alternating) a = {region_start(0) + 0x40, region_start(n - 1) + 0x80};
    return a;
}

template <class M>
void read_loop(benchmark::State& state, M& m, const std::vector<hwaddr>& addrs) {
    if (!verified(state, m, addrs)) return;
    const hwaddr* a = addrs.data();
    const std::size_t mask = addrs.size() - 1; // a power of two (or 0)
    std::size_t i = 0;
    for (auto _ : state) {
        benchmark::DoNotOptimize(m.read(a[i & mask]));
        ++i;
    }
    state.SetItemsProcessed(state.iterations());
    state.counters["regions"] = static_cast<double>(state.range(0));
}

template <class M>
void read_bench(benchmark::State& state, pattern p) {
    const auto n = static_cast<std::size_t>(state.range(0));
    const std::vector<hwaddr> addrs = addresses_for(p, n);
    if (M* m = acquire<M>(state, n)) read_loop(state, *m, addrs);
}

/// 8-byte writes at random addresses (address_space::write, or the sorted
/// vector's search + memcpy); each writes back the word the layout says is
/// there, so the reads stay verified.
template <class M>
void write_random(benchmark::State& state) {
    const auto n = static_cast<std::size_t>(state.range(0));
    const std::vector<hwaddr> addrs = addresses_for(pattern::random, n);
    std::vector<std::uint64_t> values(addrs.size());
    for (std::size_t i = 0; i < addrs.size(); ++i) values[i] = expected_word(addrs[i]);
    M* m = acquire<M>(state, n);
    if (!m || !verified(state, *m, addrs)) return;
    std::size_t i = 0;
    for (auto _ : state) {
        const std::size_t k = i & (address_count - 1);
        benchmark::DoNotOptimize(m->write(addrs[k], values[k]));
        ++i;
    }
    if (!verified(state, *m, addrs)) return;
    state.SetItemsProcessed(state.iterations());
    state.counters["regions"] = static_cast<double>(n);
}

// ---- DMA -----------------------------------------------------------------------------

void dma_qomem(benchmark::State& state) {
    const auto n = static_cast<std::size_t>(state.range(0));
    const std::vector<hwaddr> addrs = random_starts(n, 7);
    qomem_machine* m = acquire<qomem_machine>(state, n);
    if (!m) return;
    {
        qomem::dma_mapping probe = m->as->map(addrs[0], region_size, false);
        if (probe.size() != region_size || probe.bounced()) {
            state.SkipWithError("map did not give a direct 4 KiB mapping");
            return;
        }
        m->as->unmap(probe, 0);
    }
    qomem::address_space& as = *m->as;
    std::size_t i = 0;
    for (auto _ : state) {
        qomem::dma_mapping mapping = as.map(addrs[i & (address_count - 1)], region_size, false);
        benchmark::DoNotOptimize(mapping.data());
        as.unmap(mapping, 0);
        ++i;
    }
    state.SetItemsProcessed(state.iterations());
    state.counters["regions"] = static_cast<double>(n);
}

void dma_vector(benchmark::State& state) {
    const auto n = static_cast<std::size_t>(state.range(0));
    const std::vector<hwaddr> addrs = random_starts(n, 7);
    vector_machine* m = acquire<vector_machine>(state, n);
    if (!m) return;
    std::size_t i = 0;
    for (auto _ : state) {
        const hwaddr a = addrs[i & (address_count - 1)];
        const std::size_t r = m->find(a, region_size);
        if (r != vector_machine::npos) {
            m->refs[r].fetch_add(1, std::memory_order_relaxed);
            std::byte* p = m->hosts[r] + (a - m->starts[r]);
            benchmark::DoNotOptimize(p);
            m->refs[r].fetch_sub(1, std::memory_order_acq_rel);
        }
        ++i;
    }
    state.SetItemsProcessed(state.iterations());
    state.counters["regions"] = static_cast<double>(n);
}

// ---- reader threads, with and without a writer ----------------------------------------

constexpr std::size_t threaded_regions = 16;
constexpr auto writer_period = std::chrono::microseconds(100);

/// Commits a topology change every `writer_period` (set_enabled of a region
/// no reader touches), sleeping in between, until destroyed; records how
/// long each commit took.
class topology_writer {
public:
    explicit topology_writer(qomem::memory_region& r) : thread_([this, &r] { run(r); }) {}
    ~topology_writer() {
        stop_.store(true, std::memory_order_relaxed);
        thread_.join();
    }
    topology_writer(const topology_writer&) = delete;
    topology_writer& operator=(const topology_writer&) = delete;
    std::uint64_t commits() const noexcept { return commits_.load(std::memory_order_relaxed); }
    /// The commit latencies recorded from index `from` on, sorted.
    std::vector<double> latencies_since(std::size_t from) {
        std::lock_guard lock(mutex_);
        std::vector<double> out(latencies_.begin() + static_cast<std::ptrdiff_t>(std::min(from, latencies_.size())),
                                latencies_.end());
        std::sort(out.begin(), out.end());
        return out;
    }
    std::size_t recorded() {
        std::lock_guard lock(mutex_);
        return latencies_.size();
    }

private:
    void run(qomem::memory_region& r) {
        ::prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL); // wake on time, not 50 us late
        using clock = std::chrono::steady_clock;
        auto next = clock::now();
        bool on = true;
        while (!stop_.load(std::memory_order_relaxed)) {
            next += writer_period;
            if (const auto now = clock::now(); next < now) next = now; // late: no burst
            std::this_thread::sleep_until(next);
            on = !on;
            const auto t0 = clock::now();
            r.set_enabled(on);
            const double ns = std::chrono::duration<double, std::nano>(clock::now() - t0).count();
            {
                std::lock_guard lock(mutex_);
                latencies_.push_back(ns);
            }
            commits_.fetch_add(1, std::memory_order_relaxed);
        }
        if (!on) r.set_enabled(true);
    }

    std::atomic<bool> stop_{false};
    std::atomic<std::uint64_t> commits_{0};
    std::mutex mutex_;
    std::vector<double> latencies_;
    std::thread thread_; // last: starts once the counters exist
};

// Set up by the Setup hook, on the main thread, before the reader threads start.
qomem_machine* g_threaded = nullptr;
std::unique_ptr<topology_writer> g_writer;
std::vector<hwaddr> g_thread_addrs[2];

void threaded_setup(const benchmark::State&, bool writer) {
    g_threaded = &slot().get<qomem_machine>(threaded_regions, true);
    for (std::size_t t = 0; t < 2; ++t) g_thread_addrs[t] = random_words(threaded_regions, 100 + t);
    if (writer) g_writer = std::make_unique<topology_writer>(*g_threaded->toggle);
}
void setup_with_writer(const benchmark::State& s) { threaded_setup(s, true); }
void setup_without_writer(const benchmark::State& s) { threaded_setup(s, false); }
void threaded_teardown(const benchmark::State&) { g_writer.reset(); }

void read_threads(benchmark::State& state) {
    qomem_machine& m = *g_threaded;
    const std::vector<hwaddr>& addrs = g_thread_addrs[state.thread_index() & 1];
    const std::uint64_t commits_before = g_writer ? g_writer->commits() : 0;
    const std::size_t recorded_before = g_writer ? g_writer->recorded() : 0;
    const auto t0 = std::chrono::steady_clock::now();
    std::size_t i = 0;
    for (auto _ : state) {
        benchmark::DoNotOptimize(m.read(addrs[i & (address_count - 1)]));
        ++i;
    }
    state.SetItemsProcessed(state.iterations());
    if (state.thread_index() == 0 && g_writer) {
        const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        const std::uint64_t commits = g_writer->commits() - commits_before;
        state.counters["writer_commits_per_s"] = secs > 0 ? static_cast<double>(commits) / secs : 0;
        const std::vector<double> lat = g_writer->latencies_since(recorded_before);
        if (!lat.empty()) {
            state.counters["commit_p50_ns"] = lat[lat.size() / 2];
            state.counters["commit_p99_ns"] = lat[std::min(lat.size() - 1, lat.size() * 99 / 100)];
        }
    }
}

} // namespace

int main(int argc, char** argv) {
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;

    using benchmark::RegisterBenchmark;
    for (const std::int64_t n : {16, 1000}) {
        // Grouped by fixture, so each is built once.
        RegisterBenchmark("dispatch/read_random/qomem", read_bench<qomem_machine>, pattern::random)
            ->Arg(n);
        RegisterBenchmark("dispatch/read_repeated/qomem", read_bench<qomem_machine>, pattern::repeated)
            ->Arg(n);
        RegisterBenchmark("dispatch/read_alternating/qomem", read_bench<qomem_machine>,
                          pattern::alternating)
            ->Arg(n);
        RegisterBenchmark("dispatch/write_random/qomem", write_random<qomem_machine>)->Arg(n);
        RegisterBenchmark("dispatch/dma_map_unmap/qomem", dma_qomem)->Arg(n);
        RegisterBenchmark("dispatch/read_random/baseline_vector", read_bench<vector_machine>,
                          pattern::random)
            ->Arg(n);
        RegisterBenchmark("dispatch/read_repeated/baseline_vector", read_bench<vector_machine>,
                          pattern::repeated)
            ->Arg(n);
        RegisterBenchmark("dispatch/write_random/baseline_vector", write_random<vector_machine>)->Arg(n);
        RegisterBenchmark("dispatch/dma_map_unmap/baseline_vector", dma_vector)->Arg(n);
        RegisterBenchmark("dispatch/read_random/unicorn", read_bench<unicorn_machine>, pattern::random)
            ->Arg(n);
        RegisterBenchmark("dispatch/read_repeated/unicorn", read_bench<unicorn_machine>,
                          pattern::repeated)
            ->Arg(n);
    }
    const bool smoke = std::getenv("QOMEM_BENCH_SMOKE") != nullptr;
    for (const std::int64_t n : {std::int64_t{16}, std::int64_t{smoke ? 2000 : 100000}})
        RegisterBenchmark("dispatch/read_random_shared/qomem", read_bench<shared_machine>, pattern::random)
            ->Arg(n);
    RegisterBenchmark("dispatch/read_threads/no_writer", read_threads)
        ->Setup(setup_without_writer)->Teardown(threaded_teardown)->Threads(1)->Threads(2)->UseRealTime();
    RegisterBenchmark("dispatch/read_threads/writer", read_threads)
        ->Setup(setup_with_writer)->Teardown(threaded_teardown)->Threads(2)->UseRealTime();

    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();

    slot().clear();
    return leak_status("dispatch_bench");
}
