// examples/rv32i.hpp — a small RISC-V RV32I interpreter (plus the machine-mode
// CSRs, mret and the traps a handler needs) over any memory, and an assembler
// to write its programs. examples/riscv_machine.cpp runs it over an address
// space with a CPU TLB; benchmarks/cpu_bench.cpp runs the same interpreter
// over flat memory, over the plain address-space API and over the TLB.
//
// A memory is any class with (space_memory and tlb_memory, at the end, are
// the ones over qomem)
//     template <class T> qomem::memtx_result load(std::uint32_t addr, T& value);
//     template <class T> qomem::memtx_result store(std::uint32_t addr, T value);
//     qomem::memtx_result fetch(std::uint32_t addr, std::uint32_t& insn);
// (T: uint8_t, uint16_t, uint32_t; little-endian values, as RISC-V's). A
// failed access raises the matching access fault: a trap to mtvec with
// mcause, mepc and mtval set, or, with no handler (mtvec 0), a stop.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <qomem/address_space.hpp>
#include <qomem/memory_ops.hpp>
#include <qomem/tlb.hpp>

namespace rv32 {

/// Why run() returned.
enum class stop {
    limit,   ///< the instruction budget is spent (run again to go on)
    ecall,   ///< ecall: the program asks the host (a0: what, a1: argument)
    ebreak,  ///< ebreak
    fault,   ///< a trap with no handler (mtvec 0): see mcause, mepc, mtval
};

// mcause values (the privileged spec's exception codes).
inline constexpr std::uint32_t cause_fetch_fault = 1, cause_illegal = 2, cause_load_fault = 5,
                               cause_store_fault = 7;

// CSR numbers.
inline constexpr std::uint32_t csr_mstatus = 0x300, csr_mtvec = 0x305, csr_mscratch = 0x340,
                               csr_mepc = 0x341, csr_mcause = 0x342, csr_mtval = 0x343,
                               csr_minstret = 0xb02;

template <class Memory>
class cpu {
public:
    cpu(Memory& mem, std::uint32_t reset_pc) : pc(reset_pc), mem_(&mem) {}

    std::uint32_t x[32] = {};
    std::uint32_t pc;
    std::uint32_t mtvec = 0, mepc = 0, mcause = 0, mtval = 0, mscratch = 0, mstatus = 0;
    std::uint64_t retired = 0;

    /// Runs at most `budget` instructions.
    stop run(std::uint64_t budget) {
        for (; budget > 0; --budget) {
            std::uint32_t insn;
            if (mem_->fetch(pc, insn) != qomem::memtx_ok) {
                if (trap(cause_fetch_fault, pc)) return stop::fault;
                continue;
            }
            const stop s = step(insn);
            x[0] = 0;
            if (s != stop::limit) return s;
        }
        return stop::limit;
    }

private:
    static std::int32_t sext(std::uint32_t v, unsigned bits) {
        const std::uint32_t m = std::uint32_t(1) << (bits - 1);
        return static_cast<std::int32_t>((v ^ m) - m);
    }
    static std::uint32_t rd_of(std::uint32_t i) { return (i >> 7) & 31; }
    static std::uint32_t rs1_of(std::uint32_t i) { return (i >> 15) & 31; }
    static std::uint32_t rs2_of(std::uint32_t i) { return (i >> 20) & 31; }
    static std::uint32_t f3_of(std::uint32_t i) { return (i >> 12) & 7; }
    static std::int32_t imm_i(std::uint32_t i) { return static_cast<std::int32_t>(i) >> 20; }
    static std::int32_t imm_s(std::uint32_t i) {
        return (static_cast<std::int32_t>(i) >> 25 << 5) | static_cast<std::int32_t>((i >> 7) & 31);
    }
    static std::int32_t imm_b(std::uint32_t i) {
        const std::uint32_t v = ((i >> 31) << 12) | (((i >> 7) & 1) << 11) | (((i >> 25) & 63) << 5) |
                                (((i >> 8) & 15) << 1);
        return sext(v, 13);
    }
    static std::int32_t imm_j(std::uint32_t i) {
        const std::uint32_t v = ((i >> 31) << 20) | (((i >> 12) & 255) << 12) | (((i >> 20) & 1) << 11) |
                                (((i >> 21) & 1023) << 1);
        return sext(v, 21);
    }

    /// Enters the trap handler; true when there is none (the CPU stops).
    bool trap(std::uint32_t cause, std::uint32_t tval) {
        mcause = cause;
        mepc = pc;
        mtval = tval;
        if (mtvec == 0) return true;
        pc = mtvec & ~3u;
        return false;
    }
    stop fault(std::uint32_t cause, std::uint32_t tval) { return trap(cause, tval) ? stop::fault : stop::limit; }

    template <class T>
    stop load(std::uint32_t rd, std::uint32_t addr, bool sign) {
        T v = 0;
        if (mem_->template load<T>(addr, v) != qomem::memtx_ok) return fault(cause_load_fault, addr);
        x[rd] = sign ? static_cast<std::uint32_t>(sext(v, 8 * sizeof(T))) : v;
        pc += 4;
        ++retired;
        return stop::limit;
    }
    template <class T>
    stop store(std::uint32_t addr, std::uint32_t v) {
        if (mem_->template store<T>(addr, static_cast<T>(v)) != qomem::memtx_ok)
            return fault(cause_store_fault, addr);
        pc += 4;
        ++retired;
        return stop::limit;
    }

    std::uint32_t* csr(std::uint32_t n) {
        switch (n) {
        case csr_mstatus: return &mstatus;
        case csr_mtvec: return &mtvec;
        case csr_mscratch: return &mscratch;
        case csr_mepc: return &mepc;
        case csr_mcause: return &mcause;
        case csr_mtval: return &mtval;
        default: return nullptr;
        }
    }

    stop step(std::uint32_t i) {
        const std::uint32_t rd = rd_of(i), rs1 = rs1_of(i), rs2 = rs2_of(i), f3 = f3_of(i);
        const std::uint32_t a = x[rs1], b = x[rs2];
        std::uint32_t next = pc + 4;
        switch (i & 0x7f) {
        case 0x37: x[rd] = i & 0xfffff000; break;                                       // lui
        case 0x17: x[rd] = pc + (i & 0xfffff000); break;                                // auipc
        case 0x6f: x[rd] = next; next = pc + static_cast<std::uint32_t>(imm_j(i)); break; // jal
        case 0x67:                                                                       // jalr
            next = (a + static_cast<std::uint32_t>(imm_i(i))) & ~1u;
            x[rd] = pc + 4;
            break;
        case 0x63: { // branches
            bool take;
            switch (f3) {
            case 0: take = a == b; break;
            case 1: take = a != b; break;
            case 4: take = static_cast<std::int32_t>(a) < static_cast<std::int32_t>(b); break;
            case 5: take = static_cast<std::int32_t>(a) >= static_cast<std::int32_t>(b); break;
            case 6: take = a < b; break;
            case 7: take = a >= b; break;
            default: return fault(cause_illegal, i);
            }
            if (take) next = pc + static_cast<std::uint32_t>(imm_b(i));
            break;
        }
        case 0x03: { // loads
            const std::uint32_t addr = a + static_cast<std::uint32_t>(imm_i(i));
            switch (f3) {
            case 0: return load<std::uint8_t>(rd, addr, true);
            case 1: return load<std::uint16_t>(rd, addr, true);
            case 2: return load<std::uint32_t>(rd, addr, false);
            case 4: return load<std::uint8_t>(rd, addr, false);
            case 5: return load<std::uint16_t>(rd, addr, false);
            default: return fault(cause_illegal, i);
            }
        }
        case 0x23: { // stores
            const std::uint32_t addr = a + static_cast<std::uint32_t>(imm_s(i));
            switch (f3) {
            case 0: return store<std::uint8_t>(addr, b);
            case 1: return store<std::uint16_t>(addr, b);
            case 2: return store<std::uint32_t>(addr, b);
            default: return fault(cause_illegal, i);
            }
        }
        case 0x13: { // op-imm
            const auto imm = static_cast<std::uint32_t>(imm_i(i));
            const std::uint32_t sh = rs2;
            switch (f3) {
            case 0: x[rd] = a + imm; break;
            case 2: x[rd] = static_cast<std::int32_t>(a) < static_cast<std::int32_t>(imm); break;
            case 3: x[rd] = a < imm; break;
            case 4: x[rd] = a ^ imm; break;
            case 6: x[rd] = a | imm; break;
            case 7: x[rd] = a & imm; break;
            case 1: x[rd] = a << sh; break;
            case 5:
                x[rd] = (i >> 30) & 1 ? static_cast<std::uint32_t>(static_cast<std::int32_t>(a) >> sh) : a >> sh;
                break;
            }
            break;
        }
        case 0x33: { // op
            const bool alt = (i >> 30) & 1;
            switch (f3) {
            case 0: x[rd] = alt ? a - b : a + b; break;
            case 1: x[rd] = a << (b & 31); break;
            case 2: x[rd] = static_cast<std::int32_t>(a) < static_cast<std::int32_t>(b); break;
            case 3: x[rd] = a < b; break;
            case 4: x[rd] = a ^ b; break;
            case 5:
                x[rd] = alt ? static_cast<std::uint32_t>(static_cast<std::int32_t>(a) >> (b & 31)) : a >> (b & 31);
                break;
            case 6: x[rd] = a | b; break;
            case 7: x[rd] = a & b; break;
            }
            break;
        }
        case 0x0f: break; // fence: nothing to order in one hart
        case 0x73: {      // system
            if (f3 == 0) {
                if (i == 0x00000073) { ++retired; pc = next; return stop::ecall; }
                if (i == 0x00100073) { ++retired; pc = next; return stop::ebreak; }
                if (i == 0x30200073) { ++retired; pc = mepc; return stop::limit; } // mret
                return fault(cause_illegal, i);
            }
            const std::uint32_t n = i >> 20;
            std::uint32_t* c = csr(n);
            std::uint32_t minstret = static_cast<std::uint32_t>(retired);
            if (n == csr_minstret) c = &minstret;
            if (!c) return fault(cause_illegal, i);
            const std::uint32_t src = f3 & 4 ? rs1 : a; // the immediate forms take rs1 as a value
            const std::uint32_t old = *c;
            switch (f3 & 3) {
            case 1: *c = src; break;
            case 2: if (rs1) *c = old | src; break;
            case 3: if (rs1) *c = old & ~src; break;
            default: return fault(cause_illegal, i);
            }
            x[rd] = old;
            break;
        }
        default: return fault(cause_illegal, i);
        }
        pc = next;
        ++retired;
        return stop::limit;
    }

    Memory* mem_;
};

// ---- an assembler ---------------------------------------------------------------

/// Register numbers by ABI name.
enum reg : std::uint32_t {
    zero, ra, sp, gp, tp, t0, t1, t2, s0, s1, a0, a1, a2, a3, a4, a5, a6, a7,
    s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, t3, t4, t5, t6,
};

/// Builds a program placed at `origin`: instructions, data, and labels
/// resolved when the program is finished.
class assembler {
public:
    explicit assembler(std::uint32_t origin) : origin_(origin) {}

    std::uint32_t here() const { return origin_ + static_cast<std::uint32_t>(bytes_.size()); }
    void label(const std::string& name) {
        if (!labels_.emplace(name, here()).second) throw std::logic_error("label defined twice: " + name);
    }

    void lui(reg rd, std::uint32_t imm) { emit((imm & 0xfffff000) | rd << 7 | 0x37); }
    void auipc(reg rd, std::uint32_t imm) { emit((imm & 0xfffff000) | rd << 7 | 0x17); }
    void addi(reg rd, reg rs1, std::int32_t imm) { i_type(0x13, 0, rd, rs1, imm); }
    void xori(reg rd, reg rs1, std::int32_t imm) { i_type(0x13, 4, rd, rs1, imm); }
    void ori(reg rd, reg rs1, std::int32_t imm) { i_type(0x13, 6, rd, rs1, imm); }
    void andi(reg rd, reg rs1, std::int32_t imm) { i_type(0x13, 7, rd, rs1, imm); }
    void slli(reg rd, reg rs1, unsigned sh) { i_type(0x13, 1, rd, rs1, static_cast<std::int32_t>(sh)); }
    void srli(reg rd, reg rs1, unsigned sh) { i_type(0x13, 5, rd, rs1, static_cast<std::int32_t>(sh)); }
    void srl(reg rd, reg rs1, reg rs2) { r_type(0, 5, rd, rs1, rs2); }
    void sll(reg rd, reg rs1, reg rs2) { r_type(0, 1, rd, rs1, rs2); }
    void add(reg rd, reg rs1, reg rs2) { r_type(0, 0, rd, rs1, rs2); }
    void sub(reg rd, reg rs1, reg rs2) { r_type(0x20, 0, rd, rs1, rs2); }
    void xor_(reg rd, reg rs1, reg rs2) { r_type(0, 4, rd, rs1, rs2); }
    void or_(reg rd, reg rs1, reg rs2) { r_type(0, 6, rd, rs1, rs2); }
    void and_(reg rd, reg rs1, reg rs2) { r_type(0, 7, rd, rs1, rs2); }
    void sltu(reg rd, reg rs1, reg rs2) { r_type(0, 3, rd, rs1, rs2); }
    void lb(reg rd, std::int32_t off, reg rs1) { i_type(0x03, 0, rd, rs1, off); }
    void lbu(reg rd, std::int32_t off, reg rs1) { i_type(0x03, 4, rd, rs1, off); }
    void lhu(reg rd, std::int32_t off, reg rs1) { i_type(0x03, 5, rd, rs1, off); }
    void lw(reg rd, std::int32_t off, reg rs1) { i_type(0x03, 2, rd, rs1, off); }
    void sb(reg rs2, std::int32_t off, reg rs1) { s_type(0, rs1, rs2, off); }
    void sh(reg rs2, std::int32_t off, reg rs1) { s_type(1, rs1, rs2, off); }
    void sw(reg rs2, std::int32_t off, reg rs1) { s_type(2, rs1, rs2, off); }
    void beq(reg rs1, reg rs2, const std::string& to) { branch(0, rs1, rs2, to); }
    void bne(reg rs1, reg rs2, const std::string& to) { branch(1, rs1, rs2, to); }
    void blt(reg rs1, reg rs2, const std::string& to) { branch(4, rs1, rs2, to); }
    void bge(reg rs1, reg rs2, const std::string& to) { branch(5, rs1, rs2, to); }
    void bltu(reg rs1, reg rs2, const std::string& to) { branch(6, rs1, rs2, to); }
    void bgeu(reg rs1, reg rs2, const std::string& to) { branch(7, rs1, rs2, to); }
    void jal(reg rd, const std::string& to) {
        fixups_.push_back({offset(), to, 'j'});
        emit(rd << 7 | 0x6f);
    }
    void j(const std::string& to) { jal(zero, to); }
    void jalr(reg rd, reg rs1, std::int32_t off) { i_type(0x67, 0, rd, rs1, off); }
    void ret() { jalr(zero, ra, 0); }
    /// rd = a 32-bit constant (lui + addi).
    void li(reg rd, std::uint32_t v) {
        const std::uint32_t lo = v & 0xfff;
        const std::uint32_t hi = v + (lo & 0x800 ? 0x1000 : 0);
        lui(rd, hi);
        addi(rd, rd, static_cast<std::int32_t>(lo << 20) >> 20);
    }
    /// rd = the address of a label (auipc + addi, resolved at finish).
    void la(reg rd, const std::string& to) {
        fixups_.push_back({offset(), to, 'a'});
        emit(rd << 7 | 0x17);
        emit(rd << 15 | rd << 7 | 0x13);
    }
    void csrrw(reg rd, std::uint32_t csr, reg rs1) { i_type(0x73, 1, rd, rs1, static_cast<std::int32_t>(csr)); }
    void csrr(reg rd, std::uint32_t csr) { i_type(0x73, 2, rd, zero, static_cast<std::int32_t>(csr)); }
    void ecall() { emit(0x00000073); }
    void mret() { emit(0x30200073); }

    void word(std::uint32_t w) { emit(w); }
    void string(const std::string& s) {
        for (char c : s) bytes_.push_back(static_cast<std::uint8_t>(c));
        bytes_.push_back(0);
        while (bytes_.size() % 4) bytes_.push_back(0);
    }
    void zeros(std::size_t n) { bytes_.insert(bytes_.end(), n, 0); }

    /// The program's bytes, every label resolved.
    std::vector<std::uint8_t> finish() {
        for (const fixup& f : fixups_) {
            const auto it = labels_.find(f.label);
            if (it == labels_.end()) throw std::logic_error("undefined label: " + f.label);
            const std::uint32_t at = origin_ + static_cast<std::uint32_t>(f.offset);
            const std::uint32_t d = it->second - at;
            std::uint32_t w = read(f.offset);
            if (f.kind == 'b')
                w |= ((d >> 12) & 1) << 31 | ((d >> 5) & 63) << 25 | ((d >> 1) & 15) << 8 | ((d >> 11) & 1) << 7;
            else if (f.kind == 'j')
                w |= ((d >> 20) & 1) << 31 | ((d >> 1) & 1023) << 21 | ((d >> 11) & 1) << 20 | ((d >> 12) & 255) << 12;
            else { // 'a': auipc + addi
                const std::uint32_t hi = d + (d & 0x800 ? 0x1000 : 0);
                w |= hi & 0xfffff000;
                write(f.offset + 4, read(f.offset + 4) | (d & 0xfff) << 20);
            }
            write(f.offset, w);
        }
        return bytes_;
    }
    std::uint32_t address_of(const std::string& name) const { return labels_.at(name); }

private:
    struct fixup {
        std::size_t offset;
        std::string label;
        char kind;
    };
    std::size_t offset() const { return bytes_.size(); }
    void emit(std::uint32_t w) {
        for (int k = 0; k < 4; ++k) bytes_.push_back(static_cast<std::uint8_t>(w >> (8 * k)));
    }
    std::uint32_t read(std::size_t at) const {
        return std::uint32_t(bytes_[at]) | std::uint32_t(bytes_[at + 1]) << 8 | std::uint32_t(bytes_[at + 2]) << 16 |
               std::uint32_t(bytes_[at + 3]) << 24;
    }
    void write(std::size_t at, std::uint32_t w) {
        for (int k = 0; k < 4; ++k) bytes_[at + static_cast<std::size_t>(k)] = static_cast<std::uint8_t>(w >> (8 * k));
    }
    void i_type(std::uint32_t op, std::uint32_t f3, reg rd, reg rs1, std::int32_t imm) {
        emit(static_cast<std::uint32_t>(imm) << 20 | rs1 << 15 | f3 << 12 | rd << 7 | op);
    }
    void r_type(std::uint32_t f7, std::uint32_t f3, reg rd, reg rs1, reg rs2) {
        emit(f7 << 25 | rs2 << 20 | rs1 << 15 | f3 << 12 | rd << 7 | 0x33);
    }
    void s_type(std::uint32_t f3, reg rs1, reg rs2, std::int32_t imm) {
        const auto u = static_cast<std::uint32_t>(imm);
        emit((u >> 5 & 127) << 25 | rs2 << 20 | rs1 << 15 | f3 << 12 | (u & 31) << 7 | 0x23);
    }
    void branch(std::uint32_t f3, reg rs1, reg rs2, const std::string& to) {
        fixups_.push_back({offset(), to, 'b'});
        emit(rs2 << 20 | rs1 << 15 | f3 << 12 | 0x63);
    }

    std::uint32_t origin_;
    std::vector<std::uint8_t> bytes_;
    std::map<std::string, std::uint32_t> labels_;
    std::vector<fixup> fixups_;
};

// ---- memories over qomem ---------------------------------------------------

/// RISC-V's little-endian loads and stores through `Via`: an address space
/// (the plain API: address_space::load / store) or a CPU TLB (used inside RCU
/// read sections, as a vCPU runs), whose fetches use its instruction entries.
template <class Via>
struct qomem_memory {
    Via& via;
    template <class T>
    qomem::memtx_result load(std::uint32_t addr, T& v) {
        return via.template load<T, qomem::endianness::little>(addr, v);
    }
    template <class T>
    qomem::memtx_result store(std::uint32_t addr, T v) {
        return via.template store<T, qomem::endianness::little>(addr, v);
    }
    qomem::memtx_result fetch(std::uint32_t addr, std::uint32_t& insn) {
        if constexpr (std::is_same_v<Via, qomem::cpu_tlb>)
            return via.template fetch<std::uint32_t, qomem::endianness::little>(addr, insn);
        else
            return load(addr, insn);
    }
};
using space_memory = qomem_memory<qomem::address_space>;
using tlb_memory = qomem_memory<qomem::cpu_tlb>;

} // namespace rv32
