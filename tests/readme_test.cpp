// The README's usage example, compiled and run, so that it stays true.
#include <cstdint>
#include <string>

#include <catch2/catch.hpp>

#include <qomem/qomem.hpp>

#include "test_support.hpp"

namespace {

std::string uart_output;

class uart : public qomem::device {
    QOMEM_OBJECT(uart, "uart", qomem::device)
public:
    struct regs { // meets qomem::MemoryRegionOps
        static constexpr qomem::access_limits valid{.min_access_size = 1, .max_access_size = 4};
        std::uint64_t read(qomem::hwaddr, unsigned) { return 0x60; }
        void write(qomem::hwaddr, std::uint64_t v, unsigned) { uart_output += static_cast<char>(v); }
    } r;
    qomem::memory_region* mmio = qomem::make_io(*this, "uart", 0x100, r).get();
};

} // namespace

TEST_CASE("the README's usage example runs as written and leaves nothing behind", "[readme]") {
    qomem_test::leak_check leaks;
    uart_output.clear();
    {
        auto root = qomem::container::make_root();
        qomem::machine& m = qomem::add_machine(*root);
        auto sys = qomem::make_container(qomem::region_owner::ownerless_in(m.unattached()), "system",
                                         qomem::u128_2_64);
        auto ram = qomem::make_ram(qomem::region_owner::ownerless_in(m.unattached()), "ram", 1 << 30);
        auto dev = qomem::make<uart>();
        m.peripheral().add_child("uart0", *dev);
        sys->add_subregion(0, *ram);
        sys->add_subregion(0x10000000, *dev->mmio);
        {
            qomem::address_space memory(m.memory(), *sys, "memory"); // sys joins m's memory system

            std::uint64_t v = 0;
            CHECK(memory.write(0x10000000, "A", 1) == qomem::memtx_ok); // -> uart::regs::write
            CHECK(memory.read(0x1000, &v, 8) == qomem::memtx_ok);        // RAM: a memcpy
            auto dma = memory.map(0x2000, 4096, /*is_write=*/true);      // host pointer + region ref
            CHECK(dma.size() == 4096);
            memory.unmap(dma, 4096);
            const std::string text = qomem::info_mtree(m.memory(), {.flatview = true}); // `info mtree -f`
            CHECK(text.find("0000000010000000-00000000100000ff (prio 0, i/o): uart") != std::string::npos);
        }
        CHECK(uart_output == "A");
        // Teardown: ownerless regions leave their containers before their
        // handles go (nothing counts those uses).
        sys->del_subregion(*ram);
        sys->del_subregion(*dev->mmio);
    }
}
