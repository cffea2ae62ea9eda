// examples/riscv_machine.cpp — qomem as an emulator's memory: a RISC-V
// (RV32I) CPU thread runs a program from a boot ROM through a CPU TLB, with
// RAM, a UART, a DMA engine and a sensor that the main thread hot-unplugs
// while the CPU is still reading it.
//
// The memory map (address space "memory", root region "system"):
//
//     0x0000_1000  boot-rom  4 KiB   ROM: the program (written by the loader)
//     0x1000_0000  uart      256 B   MMIO: THR (+0, write a byte), LSR (+5)
//     0x1000_1000  dma       256 B   MMIO: SRC, DST, LEN, GO, STATUS (32-bit)
//     0x1000_2000  sensor    256 B   MMIO: VALUE (+0, a counter)
//     0x8000_0000  ram       64 KiB  RAM
//
// What it shows:
//  * a vCPU that fetches, loads and stores through a qomem::cpu_tlb: RAM and
//    ROM inline (a tag compare and a host load), MMIO through the dispatch,
//    inside RCU read sections it leaves every few thousand instructions;
//  * a DMA engine that copies through memory_region_cache (what virtio uses
//    for its rings);
//  * hot-unplug while the CPU runs: the main thread takes the writer role,
//    removes the sensor's region and unparents the device; the commit
//    invalidates the CPU's TLB, so its next access sees the new map: its load
//    fails cleanly with a decode error, which the CPU raises as a load access
//    fault, and the guest's trap handler reports it;
//  * the device finalized only once nothing can reach it, and nothing left
//    alive at the end.
//
// Run it: build/examples/riscv_machine. Exit status 0 when the guest printed
// what it should, took the fault at the sensor's address, and nothing was
// left alive.
#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <fmt/core.h>

#include <qomem/address_space.hpp>
#include <qomem/device.hpp>
#include <qomem/machine.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/memory_region_cache.hpp>
#include <qomem/mtree.hpp>
#include <qomem/object.hpp>
#include <qomem/rcu.hpp>
#include <qomem/tlb.hpp>

#include "rv32i.hpp"

namespace {

using qomem::hwaddr;

constexpr std::uint32_t rom_base = 0x0000'1000;
constexpr std::uint32_t uart_base = 0x1000'0000;
constexpr std::uint32_t dma_base = 0x1000'1000;
constexpr std::uint32_t sensor_base = 0x1000'2000;
constexpr std::uint32_t ram_base = 0x8000'0000;
constexpr std::uint32_t ram_size = 0x1'0000;
constexpr std::uint32_t poll_counter = ram_base + 0xf000; // the guest counts its sensor reads here

// ---- devices ----------------------------------------------------------------------

/// A 16550-like transmitter: a byte written to THR is printed (and kept).
struct uart_registers {
    static constexpr qomem::access_limits valid{.min_access_size = 1, .max_access_size = 4};
    static constexpr qomem::endianness endian = qomem::endianness::little;
    std::string output;
    std::uint64_t read(hwaddr offset, unsigned) { return offset == 5 ? 0x60 : 0; } // LSR: THR empty
    void write(hwaddr offset, std::uint64_t value, unsigned) {
        if (offset != 0) return;
        output += static_cast<char>(value);
        std::fputc(static_cast<int>(value & 0xff), stdout);
        if (value == '\n') std::fflush(stdout);
    }
};

class uart_device : public qomem::device {
    QOMEM_OBJECT(uart_device, "demo-uart", qomem::device)
public:
    uart_device() : mmio_(qomem::make_io(*this, "uart", 0x100, regs_).get()) {}
    qomem::memory_region& mmio() const noexcept { return *mmio_; }
    const std::string& output() const noexcept { return regs_.output; }

private:
    uart_registers regs_; // outlives the region: a device is finalized after its regions
    qomem::memory_region* mmio_;
};

/// A DMA engine: the guest sets SRC, DST, LEN and writes GO; the copy is
/// made at once, through two region caches on the engine's bus.
struct dma_registers {
    static constexpr hwaddr src = 0x0, dst = 0x4, len = 0x8, go = 0xc, status = 0x10;
    static constexpr std::uint32_t status_done = 1, status_error = 2;
    static constexpr qomem::access_limits valid{.min_access_size = 4, .max_access_size = 4};
    static constexpr qomem::endianness endian = qomem::endianness::little;

    qomem::address_space* bus = nullptr;
    std::uint32_t src_ = 0, dst_ = 0, len_ = 0, status_ = 0;

    std::uint64_t read(hwaddr offset, unsigned) { return offset == status ? status_ : 0; }
    void write(hwaddr offset, std::uint64_t value, unsigned) {
        const auto v = static_cast<std::uint32_t>(value);
        switch (offset) {
        case src: src_ = v; break;
        case dst: dst_ = v; break;
        case len: len_ = v; break;
        case go: status_ = copy() ? status_done : status_error; break;
        default: break;
        }
    }
    bool copy() {
        std::uint32_t done = 0;
        while (done < len_) {
            // Each cache covers as much as one region holds from its address.
            qomem::memory_region_cache from(*bus, src_ + done, len_ - done, /*is_write=*/false);
            qomem::memory_region_cache to(*bus, dst_ + done, from.size(), /*is_write=*/true);
            const hwaddr n = std::min(from.size(), to.size());
            if (n == 0) return false;
            std::vector<std::uint8_t> buf(n);
            if (from.read(0, buf.data(), n) != qomem::memtx_ok || to.write(0, buf.data(), n) != qomem::memtx_ok)
                return false;
            done += static_cast<std::uint32_t>(n);
        }
        return true;
    }
};

class dma_engine : public qomem::device {
    QOMEM_OBJECT(dma_engine, "demo-dma", qomem::device)
public:
    explicit dma_engine(qomem::address_space& bus) : mmio_(qomem::make_io(*this, "dma", 0x100, regs_).get()) {
        regs_.bus = &bus;
    }
    qomem::memory_region& mmio() const noexcept { return *mmio_; }

private:
    dma_registers regs_;
    qomem::memory_region* mmio_;
};

/// A sensor whose VALUE register counts its reads. Reports its finalization.
struct sensor_registers {
    static constexpr qomem::access_limits valid{.min_access_size = 4, .max_access_size = 4};
    std::atomic<std::uint32_t> reads{0};
    std::uint64_t read(hwaddr, unsigned) { return reads.fetch_add(1, std::memory_order_relaxed) + 1; }
    void write(hwaddr, std::uint64_t, unsigned) {}
};

class sensor_device : public qomem::device {
    QOMEM_OBJECT(sensor_device, "demo-sensor", qomem::device)
public:
    explicit sensor_device(std::atomic<bool>* finalized)
        : finalized_(finalized), mmio_(qomem::make_io(*this, "sensor", 0x100, regs_).get()) {}
    ~sensor_device() override { finalized_->store(true); }
    qomem::memory_region& mmio() const noexcept { return *mmio_; }
    std::uint32_t reads() const noexcept { return regs_.reads.load(); }

private:
    std::atomic<bool>* finalized_;
    sensor_registers regs_;
    qomem::memory_region* mmio_;
};

// ---- the guest ----------------------------------------------------------------------

/// A register offset as an instruction's immediate.
constexpr std::int32_t reg_off(hwaddr offset) { return static_cast<std::int32_t>(offset); }

std::vector<std::uint8_t> firmware(rv32::assembler& a) {
    using namespace rv32;
    a.label("_start");
    a.li(sp, ram_base + ram_size);
    a.la(a0, "hello");
    a.jal(ra, "puts");
    // Copy a line from the ROM to RAM by DMA, then print it from RAM.
    a.li(t0, dma_base);
    a.la(t1, "copied");
    a.sw(t1, reg_off(dma_registers::src), t0);
    a.li(t1, ram_base + 0x100);
    a.sw(t1, reg_off(dma_registers::dst), t0);
    a.li(t1, 64);
    a.sw(t1, reg_off(dma_registers::len), t0);
    a.sw(t1, reg_off(dma_registers::go), t0);
    a.lw(t1, reg_off(dma_registers::status), t0);
    a.li(t2, dma_registers::status_done);
    a.bne(t1, t2, "dma_failed");
    a.li(a0, ram_base + 0x100);
    a.jal(ra, "puts");
    // Poll the sensor until it goes away: its load then faults.
    a.la(t0, "trap");
    a.csrrw(zero, csr_mtvec, t0);
    a.la(a0, "polling");
    a.jal(ra, "puts");
    a.li(s0, sensor_base);
    a.li(s1, poll_counter);
    a.li(s2, 0);
    a.label("poll");
    a.lw(t0, 0, s0);
    a.add(s3, s3, t0);
    a.addi(s2, s2, 1);
    a.sw(s2, 0, s1);
    a.j("poll");

    a.label("trap"); // "trap: mcause 5 at 0x10002000"
    a.la(a0, "trap_msg");
    a.jal(ra, "puts");
    a.csrr(a0, csr_mcause);
    a.jal(ra, "puthex");
    a.la(a0, "at_msg");
    a.jal(ra, "puts");
    a.csrr(a0, csr_mtval);
    a.jal(ra, "puthex");
    a.la(a0, "bye");
    a.jal(ra, "puts");
    a.li(a0, 0);
    a.ecall();

    a.label("dma_failed");
    a.la(a0, "dma_error");
    a.jal(ra, "puts");
    a.li(a0, 1);
    a.ecall();

    a.label("puts"); // a0: a string; writes it to the UART's THR
    a.li(t1, uart_base);
    a.label("puts_loop");
    a.lbu(t2, 0, a0);
    a.beq(t2, zero, "puts_done");
    a.sb(t2, 0, t1);
    a.addi(a0, a0, 1);
    a.j("puts_loop");
    a.label("puts_done");
    a.ret();

    a.label("puthex"); // a0: a value; writes 0x and 8 hex digits
    a.li(t1, uart_base);
    a.li(t2, '0');
    a.sb(t2, 0, t1);
    a.li(t2, 'x');
    a.sb(t2, 0, t1);
    a.li(t3, 28);
    a.li(t4, 10);
    a.label("hex_loop");
    a.srl(t2, a0, t3);
    a.andi(t2, t2, 15);
    a.bltu(t2, t4, "hex_digit");
    a.addi(t2, t2, 'a' - 10 - '0');
    a.label("hex_digit");
    a.addi(t2, t2, '0');
    a.sb(t2, 0, t1);
    a.addi(t3, t3, -4);
    a.bge(t3, zero, "hex_loop");
    a.ret();

    a.label("hello");
    a.string("guest: hello from the boot ROM\n");
    a.label("copied");
    a.string("guest: this line went from ROM to RAM by DMA\n");
    a.label("polling");
    a.string("guest: polling the sensor\n");
    a.label("trap_msg");
    a.string("guest: trap, mcause ");
    a.label("at_msg");
    a.string(" at ");
    a.label("bye");
    a.string(": the sensor is gone\n");
    a.label("dma_error");
    a.string("guest: DMA failed\n");
    return a.finish();
}

struct cpu_result {
    rv32::stop why = rv32::stop::limit;
    std::uint32_t a0 = 0, mcause = 0, mtval = 0;
    std::uint64_t retired = 0, fills = 0, flushes = 0;
};

/// The vCPU thread's loop: slices of 4096 instructions, each inside an RCU
/// read section (a commit never waits for the CPU; freeing what it replaced
/// waits until the CPU leaves its section).
cpu_result run_cpu(qomem::address_space& memory, const std::atomic<bool>& stop_now) {
    qomem::cpu_tlb tlb(memory);
    rv32::tlb_memory mem{tlb};
    rv32::cpu<rv32::tlb_memory> cpu(mem, rom_base);
    cpu_result res;
    while (!stop_now.load() && cpu.retired < 200'000'000) {
        qomem::rcu::read_guard section;
        res.why = cpu.run(4096);
        if (res.why != rv32::stop::limit) break;
    }
    res.a0 = cpu.x[rv32::a0];
    res.mcause = cpu.mcause;
    res.mtval = cpu.mtval;
    res.retired = cpu.retired;
    res.fills = tlb.fills();
    res.flushes = tlb.flushes();
    return res;
}

std::uint32_t guest_polls(qomem::address_space& memory) {
    std::uint32_t n = 0;
    memory.ldl_le(poll_counter, n);
    return n;
}

bool run() {
    std::atomic<bool> sensor_finalized{false}; // outlives the tree, whose teardown may set it
    auto root = qomem::container::make_root();
    qomem::machine& machine = qomem::add_machine(*root);
    auto system = qomem::make_container(qomem::region_owner::ownerless_in(machine.unattached()), "system",
                                        qomem::u128_2_64);
    qomem::address_space memory(machine.memory(), *system, "memory");
    qomem::address_space dma_bus(machine.memory(), *system, "dma"); // shares memory's flat view

    auto rom = qomem::make_rom(machine, "boot-rom", 0x1000);
    auto ram = qomem::make_ram(machine, "ram", ram_size);
    auto uart = qomem::make<uart_device>();
    machine.peripheral().add_child("uart0", *uart);
    auto dma = qomem::make<dma_engine>(dma_bus);
    machine.peripheral().add_child("dma0", *dma);
    auto sensor_handle = qomem::make<sensor_device>(&sensor_finalized);
    machine.peripheral().add_child("sensor0", *sensor_handle);
    sensor_device* sensor = sensor_handle.get();
    sensor_handle.reset(); // the tree holds it now
    {
        qomem::memory_transaction tx(machine.memory());
        system->add_subregion(rom_base, *rom);
        system->add_subregion(ram_base, *ram);
        system->add_subregion(uart_base, uart->mmio());
        system->add_subregion(dma_base, dma->mmio());
        system->add_subregion(sensor_base, sensor->mmio());
    }
    rv32::assembler a(rom_base);
    const std::vector<std::uint8_t> image = firmware(a);
    memory.write_rom(rom_base, image.data(), image.size()); // the loader: ROM takes debug writes

    const std::array<const qomem::address_space*, 2> spaces{&memory, &dma_bus};
    fmt::print("== The machine: info mtree -f\n{}", qomem::info_mtree(spaces, {.flatview = true}));
    fmt::print("== The CPU runs the boot ROM ({} bytes)\n", image.size());
    std::fflush(stdout);

    std::atomic<bool> stop_cpu{false}, cpu_done{false};
    cpu_result res; // written by the CPU thread, read after it is joined
    std::thread vcpu([&] {
        res = run_cpu(memory, stop_cpu);
        cpu_done.store(true);
    });

    // Wait until the guest has read the sensor a while, then unplug it.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (guest_polls(memory) < 1000 && std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    const std::uint32_t polled = guest_polls(memory);
    {
        std::lock_guard writer(machine.memory()); // QEMU's big lock
        system->del_subregion(sensor->mmio());
        qomem::unparent(*sensor);
    }
    fmt::print("== host: the sensor is unplugged (the guest had read it {}+ times)\n", polled);
    std::fflush(stdout);

    // Bounded: the guest stops at its fault; stop it anyway after a while.
    for (int i = 0; i < 1000 && !cpu_done.load(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    stop_cpu.store(true);
    vcpu.join();
    machine.memory().synchronize(); // what the CPU may still have used is freed now

    fmt::print("== The CPU stopped: {} after {} instructions; TLB: {} fills, {} flushes\n",
               res.why == rv32::stop::ecall ? "ecall" : "no ecall", res.retired, res.fills, res.flushes);
    fmt::print("{}", qomem::info_mtree(spaces, {.flatview = true}));
    const bool faulted = res.why == rv32::stop::ecall && res.a0 == 0 && res.mcause == rv32::cause_load_fault &&
                         res.mtval == sensor_base;
    const std::string& out = uart->output();
    const bool printed = out.find("guest: hello from the boot ROM\n") == 0 &&
                         out.find("guest: this line went from ROM to RAM by DMA\n") != std::string::npos &&
                         out.find("guest: trap, mcause 0x00000005 at 0x10002000: the sensor is gone\n") !=
                             std::string::npos;
    fmt::print("== The sensor device was finalized: {}\n", sensor_finalized.load() ? "yes" : "no");
    system->del_subregion(*rom);
    system->del_subregion(*ram);
    system->del_subregion(uart->mmio());
    system->del_subregion(dma->mmio());
    return faulted && printed && sensor_finalized.load();
}

} // namespace

int main() {
    bool ok = false;
    try {
        ok = run();
    } catch (const std::exception& e) {
        fmt::print(stderr, "riscv_machine: {}\n", e.what());
    }
    qomem::rcu::synchronize();
    const std::size_t live = qomem::live_object_count();
    fmt::print("Live objects at exit: {}\n", live);
    for (const auto& [type, count] : qomem::live_objects()) fmt::print("  {} x{}\n", type, count);
    return ok && live == 0 ? 0 : 1;
}
