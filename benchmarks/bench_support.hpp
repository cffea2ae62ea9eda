// benchmarks/bench_support.hpp — what the benchmark programs share: the
// layout of N RAM regions, the qomem machine holding them, Unicorn's error
// check, and the end-of-run leak check.
//
// The layout: region i is `region_size` bytes at region_start(i); regions
// are `region_stride` apart, so a hole of the same size follows each one.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string_view>

#include <fmt/format.h>
#include <unicorn/unicorn.h>

#include <qomem/address_space.hpp>
#include <qomem/device.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/memory_system.hpp>

namespace qomem_bench {

using qomem::hwaddr;

constexpr hwaddr region_base = 0x1000'0000;
constexpr hwaddr region_stride = 0x2000;
constexpr std::size_t region_size = 0x1000;

inline hwaddr region_start(std::size_t i) { return region_base + i * region_stride; }

/// N RAM regions owned by a device in an ownerless root container, one
/// address space, in a memory system of its own. `fill(host, i)` fills
/// region i; spare regions (owned, not yet placed) are made with spare().
struct ram_machine {
    explicit ram_machine(std::size_t n,
                         const std::function<void(std::byte*, std::size_t)>& fill = {}) {
        for (std::size_t i = 0; i < n; ++i) {
            auto r = qomem::make_ram(*dev, fmt::format("ram{}", i), region_size);
            if (fill) fill(r->host_ptr(), i);
            sys->add_subregion(region_start(i), *r); // sys and dev hold it
        }
        as.emplace(*memory, *sys, "memory"); // one render for the whole build
    }
    /// The address space (it holds the root), the root (dropping its
    /// subregion references), then the device, which frees the regions.
    ~ram_machine() {
        as.reset();
        sys.reset();
        dev.reset();
        memory->synchronize();
    }
    ram_machine(const ram_machine&) = delete;
    ram_machine& operator=(const ram_machine&) = delete;

    /// A RAM region owned by the device (which holds it), placed nowhere.
    qomem::memory_region& spare(std::string_view name) {
        return *qomem::make_ram(*dev, name, region_size).get();
    }

    qomem::ref_ptr<qomem::memory_system> memory = qomem::memory_system::make();
    qomem::ref_ptr<qomem::device> dev = qomem::make<qomem::device>();
    qomem::ref_ptr<qomem::memory_region> sys =
        qomem::make_container(nullptr, "system", qomem::u128_2_64);
    std::optional<qomem::address_space> as;
};

inline void uc_check(uc_err e, const char* what) {
    if (e != UC_ERR_OK) throw std::runtime_error(fmt::format("{}: {}", what, uc_strerror(e)));
}

/// The exit status of a benchmark program: 1 (with a message) when qomem
/// objects outlive the run.
inline int leak_status(const char* program) {
    qomem::memory_synchronize();
    if (const std::size_t n = qomem::live_object_count()) {
        std::fprintf(stderr, "%s: %zu qomem object(s) leaked\n", program, n);
        return 1;
    }
    return 0;
}

} // namespace qomem_bench
