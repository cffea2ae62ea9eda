// The CPU's path: a TLB hit against a raw pointer access, and a whole RV32I
// interpreter (examples/rv32i.hpp) run over flat memory, over the plain
// address-space API and over a CPU TLB.
//
//   cpu/tlb_load/{tlb,raw_pointer}    one 8-byte load: cpu_tlb::load (a hit) or a load
//                                     from host + (addr - base)
//   cpu/tlb_store/{tlb,raw_pointer}   the same for an 8-byte store
//   cpu/rv32/{flat,address_space,tlb} one run of the kernel below (about 1.1 million
//                                     instructions): over a std::vector with a bounds
//                                     check, through address_space::load/store, through
//                                     a cpu_tlb
//
// The loads and stores use 16 Ki precomputed random 8-byte-aligned addresses
// in 64 KiB of RAM (16 pages: every TLB access hits after the first few).
// Each loaded value goes through an empty asm statement (no memory clobber),
// so the compiler neither drops nor vectorises the loads, in both loops.
//
// The kernel: 64 rounds of (fill 1,024 words with xorshift32 values; read
// them back, word and byte, into a checksum), code and data in RAM; about
// 18% of its instructions are loads or stores, and every one is fetched.
// All three runs must end with the same checksum.
//
// Targets (issue 12): TLB-hit load and store <= 1.3x the raw pointer;
// interpreter over the TLB <= 1.15x flat memory, over the plain API <= 2x.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <optional>
#include <random>
#include <vector>

#include <benchmark/benchmark.h>
#include <fmt/format.h>

#include <qomem/address_space.hpp>
#include <qomem/device.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/memory_system.hpp>
#include <qomem/rcu.hpp>
#include <qomem/tlb.hpp>

#include "../examples/rv32i.hpp"
#include "bench_support.hpp"

namespace {

using qomem::hwaddr;

constexpr std::uint32_t ram_base = 0x8000'0000;
constexpr std::uint32_t ram_size = 0x1'0000;
constexpr std::uint32_t data_base = ram_base + 0x8000;
constexpr std::size_t address_count = std::size_t(1) << 14;

/// Keeps `v` alive in a register without telling the compiler memory changed.
template <class T>
inline void keep(T& v) {
    asm volatile("" : "+r"(v));
}

/// 64 KiB of RAM at ram_base, owned by a device, in a memory system of its own.
struct machine {
    qomem::ref_ptr<qomem::memory_system> memory = qomem::memory_system::make(std::endian::little);
    qomem::ref_ptr<qomem::device> dev = qomem::make<qomem::device>();
    qomem::ref_ptr<qomem::memory_region> sys = qomem::make_container(nullptr, "system", qomem::u128_2_64);
    qomem::ref_ptr<qomem::memory_region> ram = qomem::make_ram(*dev, "ram", ram_size);
    std::optional<qomem::address_space> as;

    machine() {
        sys->add_subregion(ram_base, *ram);
        as.emplace(*memory, *sys, "memory");
    }
    ~machine() {
        as.reset();
        sys->del_subregion(*ram);
        ram.reset();
        sys.reset();
        dev.reset();
        memory->synchronize();
    }
    machine(const machine&) = delete;
    machine& operator=(const machine&) = delete;
    std::byte* host() const { return ram->host_ptr(); }
};

std::vector<std::uint32_t> random_addresses() {
    std::mt19937_64 rng(11);
    std::uniform_int_distribution<std::uint32_t> word(0, ram_size / 8 - 1);
    std::vector<std::uint32_t> out(address_count);
    for (auto& a : out) a = ram_base + word(rng) * 8;
    return out;
}

// ---- one load / one store ---------------------------------------------------------

void load_tlb(benchmark::State& state) {
    machine m;
    const std::vector<std::uint32_t> addrs = random_addresses();
    qomem::cpu_tlb tlb(*m.as);
    qomem::rcu::read_guard g;
    std::uint64_t v = 0;
    for (std::uint32_t a : addrs) tlb.load<std::uint64_t, qomem::endianness::little>(a, v); // fill
    const std::uint64_t fills = tlb.fills();
    std::size_t i = 0;
    for (auto _ : state) {
        if (tlb.load<std::uint64_t, qomem::endianness::little>(addrs[i & (address_count - 1)], v) != qomem::memtx_ok)
            state.SkipWithError("a load failed");
        keep(v);
        ++i;
    }
    if (tlb.fills() != fills) state.SkipWithError("a load missed");
    state.SetItemsProcessed(state.iterations());
}

void load_raw(benchmark::State& state) {
    machine m;
    const std::vector<std::uint32_t> addrs = random_addresses();
    const std::byte* host = m.host();
    std::uint64_t v = 0;
    std::size_t i = 0;
    for (auto _ : state) {
        std::memcpy(&v, host + (addrs[i & (address_count - 1)] - ram_base), 8);
        keep(v);
        ++i;
    }
    state.SetItemsProcessed(state.iterations());
}

void store_tlb(benchmark::State& state) {
    machine m;
    const std::vector<std::uint32_t> addrs = random_addresses();
    qomem::cpu_tlb tlb(*m.as);
    qomem::rcu::read_guard g;
    for (std::uint32_t a : addrs) tlb.store<std::uint64_t, qomem::endianness::little>(a, 0); // fill
    const std::uint64_t fills = tlb.fills();
    std::uint64_t i = 0;
    for (auto _ : state) {
        if (tlb.store<std::uint64_t, qomem::endianness::little>(addrs[i & (address_count - 1)], i) != qomem::memtx_ok)
            state.SkipWithError("a store failed");
        ++i;
    }
    if (tlb.fills() != fills) state.SkipWithError("a store missed");
    state.SetItemsProcessed(state.iterations());
}

void store_raw(benchmark::State& state) {
    machine m;
    const std::vector<std::uint32_t> addrs = random_addresses();
    std::byte* host = m.host();
    std::uint64_t i = 0;
    for (auto _ : state) {
        std::memcpy(host + (addrs[i & (address_count - 1)] - ram_base), &i, 8);
        ++i;
    }
    state.SetItemsProcessed(state.iterations());
}

// ---- the interpreter ----------------------------------------------------------------

constexpr std::uint32_t words = 1024;
constexpr std::uint32_t rounds = 64;

std::vector<std::uint8_t> kernel() {
    using namespace rv32;
    assembler a(ram_base);
    a.li(s0, data_base);
    a.li(s1, words);
    a.li(s2, rounds);
    a.li(s3, 0x12345678);
    a.label("outer");
    a.addi(t0, s0, 0);
    a.li(t1, 0);
    a.label("fill"); // xorshift32
    a.slli(t2, s3, 13);
    a.xor_(s3, s3, t2);
    a.srli(t2, s3, 17);
    a.xor_(s3, s3, t2);
    a.slli(t2, s3, 5);
    a.xor_(s3, s3, t2);
    a.sw(s3, 0, t0);
    a.addi(t0, t0, 4);
    a.addi(t1, t1, 1);
    a.bltu(t1, s1, "fill");
    a.addi(t0, s0, 0);
    a.li(t1, 0);
    a.label("sum");
    a.lw(t2, 0, t0);
    a.lbu(t3, 1, t0);
    a.add(a1, a1, t2);
    a.xor_(a1, a1, t3);
    a.addi(t0, t0, 4);
    a.addi(t1, t1, 1);
    a.bltu(t1, s1, "sum");
    a.sw(a1, -4, s0);
    a.addi(s2, s2, -1);
    a.bne(s2, zero, "outer");
    a.addi(a0, a1, 0);
    a.ecall();
    return a.finish();
}

/// Flat memory: one vector of RAM with a bounds check, as a simple
/// emulator has it.
struct flat_memory {
    std::vector<std::uint8_t> bytes = std::vector<std::uint8_t>(ram_size);
    template <class T>
    qomem::memtx_result load(std::uint32_t addr, T& v) {
        const std::uint32_t off = addr - ram_base;
        if (off > ram_size - sizeof(T)) return qomem::memtx_decode_error;
        std::memcpy(&v, bytes.data() + off, sizeof(T));
        return qomem::memtx_ok;
    }
    template <class T>
    qomem::memtx_result store(std::uint32_t addr, T v) {
        const std::uint32_t off = addr - ram_base;
        if (off > ram_size - sizeof(T)) return qomem::memtx_decode_error;
        std::memcpy(bytes.data() + off, &v, sizeof(T));
        return qomem::memtx_ok;
    }
    qomem::memtx_result fetch(std::uint32_t addr, std::uint32_t& insn) { return load(addr, insn); }
};

/// Runs the kernel to its ecall in slices of 4096 instructions, each inside
/// an RCU read section (as a vCPU runs); returns its checksum (a0), or 0
/// with the benchmark marked failed.
template <class Memory>
std::uint32_t run_kernel(benchmark::State& state, Memory& mem, std::uint64_t& instructions) {
    rv32::cpu<Memory> cpu(mem, ram_base);
    for (;;) {
        qomem::rcu::read_guard g;
        const rv32::stop s = cpu.run(4096);
        if (s == rv32::stop::ecall) break;
        if (s != rv32::stop::limit) {
            state.SkipWithError("the kernel faulted");
            return 0;
        }
    }
    instructions = cpu.retired;
    return cpu.x[rv32::a0];
}

/// The checksum every run must end with (from flat memory, computed once).
std::uint32_t expected_checksum() {
    static const std::uint32_t sum = [] {
        flat_memory mem;
        const std::vector<std::uint8_t> code = kernel();
        std::memcpy(mem.bytes.data(), code.data(), code.size());
        rv32::cpu<flat_memory> cpu(mem, ram_base);
        while (cpu.run(4096) == rv32::stop::limit) {
        }
        return cpu.x[rv32::a0];
    }();
    return sum;
}

template <class Memory>
void interpret(benchmark::State& state, Memory& mem) {
    std::uint64_t instructions = 0;
    for (auto _ : state) {
        const std::uint32_t sum = run_kernel(state, mem, instructions);
        if (sum != expected_checksum()) {
            state.SkipWithError(fmt::format("checksum {:#x}, expected {:#x}", sum, expected_checksum()).c_str());
            return;
        }
    }
    state.counters["instructions"] = static_cast<double>(instructions);
    state.counters["ns_per_instruction"] = benchmark::Counter(
        static_cast<double>(instructions) * static_cast<double>(state.iterations()),
        benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

void rv32_flat(benchmark::State& state) {
    flat_memory mem;
    const std::vector<std::uint8_t> code = kernel();
    std::memcpy(mem.bytes.data(), code.data(), code.size());
    interpret(state, mem);
}

void rv32_address_space(benchmark::State& state) {
    machine m;
    const std::vector<std::uint8_t> code = kernel();
    m.as->write(ram_base, code.data(), code.size());
    rv32::space_memory mem{*m.as};
    interpret(state, mem);
}

void rv32_tlb(benchmark::State& state) {
    machine m;
    const std::vector<std::uint8_t> code = kernel();
    m.as->write(ram_base, code.data(), code.size());
    qomem::cpu_tlb tlb(*m.as);
    rv32::tlb_memory mem{tlb};
    interpret(state, mem);
}

} // namespace

int main(int argc, char** argv) {
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    using benchmark::RegisterBenchmark;
    RegisterBenchmark("cpu/tlb_load/tlb", load_tlb);
    RegisterBenchmark("cpu/tlb_load/raw_pointer", load_raw);
    RegisterBenchmark("cpu/tlb_store/tlb", store_tlb);
    RegisterBenchmark("cpu/tlb_store/raw_pointer", store_raw);
    RegisterBenchmark("cpu/rv32/flat", rv32_flat)->Unit(benchmark::kMicrosecond);
    RegisterBenchmark("cpu/rv32/address_space", rv32_address_space)->Unit(benchmark::kMicrosecond);
    RegisterBenchmark("cpu/rv32/tlb", rv32_tlb)->Unit(benchmark::kMicrosecond);
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return qomem_bench::leak_status("cpu_bench");
}
