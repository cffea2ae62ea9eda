// VIRTIO shared memory: a backend's map + unmap pair (virtio_shmem::map +
// unmap of a memfd) against the raw syscall pair it is made of.
//
//   shmem/map_unmap/qomem/LEN           the shared memory region placed in a
//       system address space (16 RAM regions beside it): each map and unmap
//       is also a commit, so the guest sees the change at once
//   shmem/map_unmap/qomem_unplaced/LEN  the region in no address space (the
//       bookkeeping and the syscalls, no commit work)
//   shmem/map_unmap/baseline_mmap/LEN   mmap(MAP_SHARED | MAP_FIXED, fd) over a
//       PROT_NONE reservation, then mmap(PROT_NONE, MAP_FIXED | MAP_ANONYMOUS |
//       MAP_PRIVATE | MAP_NORESERVE) back
//
// LEN = 4 KiB and 2 MiB. Nothing touches the pages and no DMA holds the
// mapping, so an unmap restores PROT_NONE at once (checked).
// Target (issue 6): qomem <= 1.25 x the syscall pair.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>

#include <benchmark/benchmark.h>
#include <fmt/format.h>

#include <qomem/address_space.hpp>
#include <qomem/device.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/rcu.hpp>
#include <qomem/shmem.hpp>

#include "bench_support.hpp"

namespace {

using qomem::hwaddr;

constexpr std::uint64_t window_size = 4 << 20; // room for the 2 MiB mapping
constexpr std::uint64_t file_size = 2 << 20;
constexpr hwaddr window_addr = 0x8000'0000;
constexpr auto rw = qomem::shmem_flags::read_write;

/// A memfd of `file_size` bytes, closed on destruction.
class memfd {
public:
    memfd() : fd_(::memfd_create("qomem-bench", MFD_CLOEXEC)) {
        if (fd_ < 0 || ::ftruncate(fd_, static_cast<off_t>(file_size)) != 0) {
            if (fd_ >= 0) ::close(fd_);
            throw std::runtime_error("memfd_create/ftruncate failed");
        }
    }
    ~memfd() { ::close(fd_); }
    memfd(const memfd&) = delete;
    memfd& operator=(const memfd&) = delete;
    int get() const noexcept { return fd_; }

private:
    int fd_;
};

/// A VIRTIO device with one shared memory region (shmid 0), optionally
/// placed in a system address space beside 16 RAM regions.
struct shmem_machine {
    explicit shmem_machine(bool placed) {
        shm = &dev->declare_shmem(0, window_size);
        if (!placed) return;
        qomem::memory_transaction tx;
        for (std::size_t i = 0; i < 16; ++i) {
            auto r = qomem::make_ram(*dev, fmt::format("ram{}", i), 0x10000);
            sys->add_subregion(hwaddr(i) * 0x10000, *r);
        }
        sys->add_subregion(window_addr, shm->region());
        as.emplace(*sys, "memory");
    }
    /// The address space (it holds the root), the root (dropping its
    /// subregion references), then the device, whose unparenting of its
    /// shared memory region unmaps what is left and frees the regions.
    ~shmem_machine() {
        as.reset();
        sys.reset();
        dev.reset();
    }
    shmem_machine(const shmem_machine&) = delete;
    shmem_machine& operator=(const shmem_machine&) = delete;

    qomem::ref_ptr<qomem::virtio_shmem_device> dev = qomem::make<qomem::virtio_shmem_device>();
    qomem::ref_ptr<qomem::memory_region> sys =
        qomem::make_container(nullptr, "system", qomem::u128_2_64);
    qomem::virtio_shmem* shm = nullptr;
    std::optional<qomem::address_space> as;
};

void map_unmap_qomem(benchmark::State& state, bool placed) {
    const auto len = static_cast<std::uint64_t>(state.range(0));
    std::optional<memfd> fd;
    std::optional<shmem_machine> m;
    try {
        fd.emplace();
        m.emplace(placed);
        // Check once: visible while mapped (when placed), gone and back to
        // PROT_NONE at once after the unmap.
        m->shm->map(fd->get(), 0, 0, len, rw);
        bool visible = !placed;
        if (placed) {
            const qomem::flat_range* fr = m->as->view()->lookup(window_addr);
            visible = fr && fr->mr->is_ram();
        }
        m->shm->unmap(0, len);
        if (!visible || m->shm->live_mappings() != 0)
            throw std::runtime_error("the mapping did not appear, or lingered after its unmap");
    } catch (const std::exception& e) {
        state.SkipWithError(e.what());
        return;
    }
    qomem::virtio_shmem& shm = *m->shm;
    const int f = fd->get();
    for (auto _ : state) {
        shm.map(f, 0, 0, len, rw);
        shm.unmap(0, len);
    }
    state.SetItemsProcessed(state.iterations());
    state.counters["bytes"] = static_cast<double>(len);
}

void map_unmap_baseline(benchmark::State& state) {
    const auto len = static_cast<std::size_t>(state.range(0));
    std::optional<memfd> fd;
    try {
        fd.emplace();
    } catch (const std::exception& e) {
        state.SkipWithError(e.what());
        return;
    }
    void* reserved = ::mmap(nullptr, window_size, PROT_NONE,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (reserved == MAP_FAILED) {
        state.SkipWithError("reserving the window failed");
        return;
    }
    const int f = fd->get();
    bool ok = true;
    for (auto _ : state) {
        ok &= ::mmap(reserved, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, f, 0) != MAP_FAILED;
        ok &= ::mmap(reserved, len, PROT_NONE, MAP_FIXED | MAP_ANONYMOUS | MAP_PRIVATE | MAP_NORESERVE,
                     -1, 0) != MAP_FAILED;
    }
    ::munmap(reserved, window_size);
    if (!ok) state.SkipWithError("an mmap failed");
    state.SetItemsProcessed(state.iterations());
    state.counters["bytes"] = static_cast<double>(len);
}

} // namespace

int main(int argc, char** argv) {
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    for (const std::int64_t len : {std::int64_t(4) << 10, std::int64_t(2) << 20}) {
        benchmark::RegisterBenchmark("shmem/map_unmap/qomem", map_unmap_qomem, true)->Arg(len);
        benchmark::RegisterBenchmark("shmem/map_unmap/qomem_unplaced", map_unmap_qomem, false)->Arg(len);
        benchmark::RegisterBenchmark("shmem/map_unmap/baseline_mmap", map_unmap_baseline)->Arg(len);
    }
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return qomem_bench::leak_status("shmem_bench");
}
