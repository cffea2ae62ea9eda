// examples/dma_machine.cpp — a small machine whose guest uses a DMA engine to
// copy a message from its boot ROM to RAM, and from RAM to a UART.
//
// The memory map (address space "memory", root region "system"):
//
//     0x0000_0000  boot-rom  4 KiB   ROM: the firmware loader writes the message
//     0x0900_0000  uart      4 KiB   MMIO: DATA (+0x0, write one byte), STATUS (+0x4)
//     0x0900_1000  dma       4 KiB   MMIO: SRC, DST, LEN, CTRL, GO, STATUS (64-bit)
//     0x4000_0000  ram       64 KiB  RAM
//
// What it shows:
//  * devices whose registers are a MemoryRegionOps type (uart_registers,
//    dma_registers), in regions the devices own;
//  * a DMA engine reading and writing guest memory through the address space:
//    map/unmap for memory-to-memory copies (direct host pointers into RAM and
//    ROM), plain writes to a device register;
//  * `info mtree -f` before and after the guest moves the UART and hides the
//    boot ROM, and what accesses to the old addresses then do;
//  * a machine that leaves no object alive when it is torn down.
//
// Run it: build/examples/dma_machine. Exit status: 0 when the UART printed
// what the guest sent and no object was left alive, 1 otherwise.
#include <array>
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>
#include <string_view>

#include <fmt/core.h>

#include <qomem/address_space.hpp>
#include <qomem/device.hpp>
#include <qomem/machine.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/mtree.hpp>
#include <qomem/object.hpp>
#include <qomem/rcu.hpp>

namespace {

using qomem::hwaddr;

constexpr hwaddr rom_base = 0x0000'0000;
constexpr hwaddr uart_base = 0x0900'0000;
constexpr hwaddr dma_base = 0x0900'1000;
constexpr hwaddr ram_base = 0x4000'0000;
constexpr hwaddr uart_new_base = 0x0a00'0000; // where the guest moves the UART

// ---- the UART -------------------------------------------------------------------

/// The UART's registers: MMIO callbacks (a qomem::MemoryRegionOps type).
/// Whatever is written to DATA is "transmitted": appended to `output`.
struct uart_registers {
    static constexpr hwaddr data = 0x0;   ///< write: transmit the low byte
    static constexpr hwaddr status = 0x4; ///< read: bit 0 ready, bits 8+ bytes sent
    static constexpr std::uint64_t status_ready = 1;

    // 32-bit registers that also take byte accesses.
    static constexpr qomem::access_limits valid{.min_access_size = 1, .max_access_size = 4};
    static constexpr qomem::access_limits impl{.min_access_size = 1, .max_access_size = 4};
    static constexpr qomem::endianness endian = qomem::endianness::little;

    std::string output;

    std::uint64_t read(hwaddr offset, unsigned /*size*/) {
        if (offset == status) return status_ready | (std::uint64_t{output.size()} << 8);
        return 0;
    }
    void write(hwaddr offset, std::uint64_t value, unsigned /*size*/) {
        if (offset == data) output += static_cast<char>(value & 0xff);
    }
};

class uart_device : public qomem::device {
    QOMEM_OBJECT(uart_device, "demo-uart", qomem::device)
public:
    // The region is our child "uart[0]", which holds it; we keep a plain
    // pointer (a ref_ptr member would be a cycle: an unplugged region holds
    // its owner). Its ops object, regs_, is ours too: the region is always
    // finalized before its owner, so the callbacks outlive it.
    uart_device() : mmio_(qomem::make_io(*this, "uart", 0x1000, regs_).get()) {}

    qomem::memory_region& mmio() const noexcept { return *mmio_; }
    const std::string& output() const noexcept { return regs_.output; }

private:
    uart_registers regs_;
    qomem::memory_region* mmio_;
};

// ---- the DMA engine ---------------------------------------------------------------

/// The DMA engine's registers. The guest sets SRC, DST and LEN, optionally
/// CTRL, then writes GO; the copy is done when the write returns, and STATUS
/// says how it went. (QEMU's devices usually finish a DMA later, from a
/// bottom half; doing it at once keeps the example short.)
struct dma_registers {
    static constexpr hwaddr src = 0x00, dst = 0x08, len = 0x10, ctrl = 0x18, go = 0x20,
                            status = 0x28;
    /// CTRL bit: DST is one device register (a FIFO), written byte after byte.
    static constexpr std::uint64_t ctrl_to_register = 1;
    static constexpr std::uint64_t status_done = 1, status_error = 2;

    // 64-bit registers, 64-bit accesses only.
    static constexpr qomem::access_limits valid{.min_access_size = 8, .max_access_size = 8};
    static constexpr qomem::access_limits impl{.min_access_size = 8, .max_access_size = 8};
    static constexpr qomem::endianness endian = qomem::endianness::little;

    qomem::address_space* bus = nullptr; ///< where the engine's transfers go
    std::uint64_t src_ = 0, dst_ = 0, len_ = 0, ctrl_ = 0, status_ = 0;

    std::uint64_t read(hwaddr offset, unsigned /*size*/) {
        switch (offset) {
        case src: return src_;
        case dst: return dst_;
        case len: return len_;
        case ctrl: return ctrl_;
        case status: return status_;
        default: return 0;
        }
    }
    void write(hwaddr offset, std::uint64_t value, unsigned /*size*/) {
        switch (offset) {
        case src: src_ = value; break;
        case dst: dst_ = value; break;
        case len: len_ = value; break;
        case ctrl: ctrl_ = value; break;
        case go: status_ = transfer() == qomem::memtx_ok ? status_done : status_error; break;
        default: break;
        }
    }

    /// Copies LEN bytes from SRC to DST through the address space.
    qomem::memtx_result transfer() {
        std::uint64_t done = 0;
        while (done < len_) {
            // A read mapping of the source: a direct pointer into RAM or ROM
            // (a bounce buffer for MMIO). It may cover less than asked; an
            // empty one means nothing is mapped there.
            qomem::dma_mapping from = bus->map(src_ + done, len_ - done, /*is_write=*/false);
            if (!from) return qomem::memtx_decode_error;
            hwaddr n = from.size();
            if (ctrl_ & ctrl_to_register) {
                // Every byte to the same address: a device's data register.
                qomem::memtx_result r = qomem::memtx_ok;
                for (hwaddr i = 0; i < n; ++i) r |= bus->write(dst_, from.data() + i, 1);
                bus->unmap(from, n);
                if (r != qomem::memtx_ok) return r;
            } else {
                qomem::dma_mapping to = bus->map(dst_ + done, n, /*is_write=*/true);
                if (!to) {
                    bus->unmap(from, 0);
                    return qomem::memtx_decode_error;
                }
                n = to.size();
                std::memcpy(to.data(), from.data(), n);
                bus->unmap(to, n); // marks the RAM dirty (or writes the bounce back)
                bus->unmap(from, n);
            }
            done += n;
        }
        return qomem::memtx_ok;
    }
};

class dma_engine : public qomem::device {
    QOMEM_OBJECT(dma_engine, "demo-dma", qomem::device)
public:
    /// `bus` is where the engine's transfers go; it must outlive every GO.
    explicit dma_engine(qomem::address_space& bus)
        : mmio_(qomem::make_io(*this, "dma", 0x1000, regs_).get()) {
        regs_.bus = &bus;
    }
    qomem::memory_region& mmio() const noexcept { return *mmio_; }

private:
    dma_registers regs_;
    qomem::memory_region* mmio_;
};

// ---- the guest --------------------------------------------------------------------

/// The guest's view: loads and stores through the address space, as a vCPU
/// makes them.
class guest {
public:
    explicit guest(qomem::address_space& memory) : memory_(memory) {}

    void write64(hwaddr addr, std::uint64_t value) { memory_.write(addr, &value, 8); }
    std::uint64_t read64(hwaddr addr) {
        std::uint64_t v = 0;
        memory_.read(addr, &v, 8);
        return v;
    }
    std::uint32_t read32(hwaddr addr) {
        std::uint32_t v = 0;
        memory_.read(addr, &v, 4);
        return v;
    }
    std::string read_string(hwaddr addr, std::size_t len) {
        std::string s(len, '\0');
        memory_.read(addr, s.data(), len);
        return s;
    }

    /// Programs the DMA engine at `dma` and starts it; returns its STATUS.
    std::uint64_t dma_copy(hwaddr dma, hwaddr src, hwaddr dst, std::uint64_t len,
                           bool to_register) {
        write64(dma + dma_registers::src, src);
        write64(dma + dma_registers::dst, dst);
        write64(dma + dma_registers::len, len);
        write64(dma + dma_registers::ctrl, to_register ? dma_registers::ctrl_to_register : 0);
        write64(dma + dma_registers::go, 1);
        return read64(dma + dma_registers::status);
    }

private:
    qomem::address_space& memory_;
};

std::string_view status_name(std::uint64_t status) {
    if (status & dma_registers::status_error) return "ERROR";
    if (status & dma_registers::status_done) return "done";
    return "idle";
}

std::string_view result_name(qomem::memtx_result r) {
    if (r == qomem::memtx_ok) return "ok";
    if (r & qomem::memtx_decode_error) return "decode error (nothing there)";
    return "error";
}

void heading(std::string_view text) { fmt::print("\n== {}\n", text); }

/// Builds the machine, runs the guest, tears everything down. Returns true
/// when the UART printed what the guest sent.
bool run() {
    // ---- the machine ----
    // Declared in the order they must go in reverse: the address space holds
    // the system region, and the system region holds the devices' regions.
    auto root = qomem::container::make_root();
    qomem::machine& machine = qomem::add_machine(*root);
    auto system = qomem::make_container(nullptr, "system", qomem::u128_2_64);
    qomem::address_space memory(*system, "memory");

    // Board memory, owned by the machine (each a child of /machine).
    auto rom = qomem::make_rom(machine, "boot-rom", 0x1000);
    auto ram = qomem::make_ram(machine, "ram", 0x10000);

    auto uart_handle = qomem::make<uart_device>();
    machine.peripheral().add_child("uart0", *uart_handle);
    uart_handle->realize();
    auto dma_handle = qomem::make<dma_engine>(memory);
    machine.peripheral().add_child("dma0", *dma_handle);
    dma_handle->realize();
    uart_device& uart = *uart_handle;
    dma_engine& dma = *dma_handle;
    qomem::memory_region& boot_rom = *rom;
    qomem::memory_region& board_ram = *ram;
    // From here on the tree owns the devices and the board memory.
    uart_handle.reset();
    dma_handle.reset();
    rom.reset();
    ram.reset();

    {
        qomem::memory_transaction tx; // one commit for the whole map
        system->add_subregion(rom_base, boot_rom);
        system->add_subregion(ram_base, board_ram);
        system->add_subregion(uart_base, uart.mmio());
        system->add_subregion(dma_base, dma.mmio());
    }
    const std::array<const qomem::address_space*, 1> spaces{&memory};
    heading("The machine: info mtree -f");
    fmt::print("{}", qomem::info_mtree(spaces, {.flatview = true}));

    // ---- boot ----
    heading("The firmware loader writes the message into the boot ROM (write_rom)");
    const std::string message = "Hello from the boot ROM, copied by DMA!\n";
    memory.write_rom(rom_base, message.data(), message.size());
    guest cpu(memory);
    const char x = 'X';
    memory.write(rom_base, &x, 1); // a guest write: ROM ignores it
    fmt::print("  ROM holds \"{}...\"; a guest write of 'X' to it was ignored\n",
               cpu.read_string(rom_base, 5));

    // ---- DMA ----
    heading("The guest copies the message from ROM to RAM by DMA (map/unmap)");
    std::uint64_t st = cpu.dma_copy(dma_base, rom_base, ram_base, message.size(), false);
    fmt::print("  DMA status: {}; RAM now holds \"{}...\"\n", status_name(st),
               cpu.read_string(ram_base, 5));

    heading("The guest sends it from RAM to the UART's DATA register by DMA");
    st = cpu.dma_copy(dma_base, ram_base, uart_base + uart_registers::data, message.size(), true);
    fmt::print("  DMA status: {}; UART STATUS = {:#x} ({} bytes sent)\n", status_name(st),
               cpu.read32(uart_base + uart_registers::status),
               cpu.read32(uart_base + uart_registers::status) >> 8);

    // ---- a new memory map ----
    heading("The guest moves the UART to 0x0a000000 and hides the boot ROM");
    {
        // Both changes in one transaction: readers on other threads see the
        // old map or the new one, never half of it.
        qomem::memory_transaction tx;
        uart.mmio().set_address(uart_new_base); // as when a guest reprograms a PCI BAR
        boot_rom.set_enabled(false);
    }
    fmt::print("{}", qomem::info_mtree(spaces, {.flatview = true}));

    st = cpu.dma_copy(dma_base, rom_base, ram_base, message.size(), false);
    fmt::print("  DMA from the hidden ROM: status {} (nothing is mapped there now)\n",
               status_name(st));
    const char q = '?';
    fmt::print("  a write to the UART's old address: {}\n",
               result_name(memory.write(uart_base + uart_registers::data, &q, 1)));

    const std::string again = "...and again, at the UART's new address.\n";
    memory.write(ram_base + 0x100, again.data(), again.size());
    st = cpu.dma_copy(dma_base, ram_base + 0x100, uart_new_base + uart_registers::data,
                      again.size(), true);
    fmt::print("  DMA from RAM to the UART at its new address: status {}\n", status_name(st));

    heading("The guest shows the boot ROM again");
    boot_rom.set_enabled(true);
    st = cpu.dma_copy(dma_base, rom_base, ram_base, message.size(), false);
    fmt::print("  DMA from the ROM: status {}\n", status_name(st));

    heading("What the UART transmitted");
    fmt::print("{}", uart.output());
    const bool ok = uart.output() == message + again;
    if (!ok) fmt::print("  (expected:)\n{}{}", message, again);

    heading("Shutting down");
    return ok;
    // Going out of scope in reverse order: `memory` (its flat view is freed
    // once no reader can still use it), `system` (it lets go of the regions
    // mapped in it), then `root`, which finalizes the machine, the devices
    // and their regions.
}

} // namespace

int main() {
    bool ok = false;
    try {
        ok = run();
    } catch (const std::exception& e) {
        fmt::print(stderr, "dma_machine: {}\n", e.what());
    }
    qomem::rcu::synchronize(); // anything retired is freed
    const std::size_t live = qomem::live_object_count();
    fmt::print("Live objects at exit: {}\n", live);
    for (const auto& [type, count] : qomem::live_objects()) fmt::print("  {} x{}\n", type, count);
    return ok && live == 0 ? 0 : 1;
}
