// examples/virtiofs_dax.cpp — virtiofs with DAX: a back-end process maps
// file windows into the guest at run time, over vhost-user.
//
// virtiofs' DAX window is a VIRTIO Shared Memory Region: the device exposes a
// range of guest-physical memory (here through a PCI BAR) into which the
// vhost-user back-end (virtiofsd, a separate process) maps windows of host
// files with SHMEM_MAP, so that the guest reads file pages without copying.
// This program plays the guest and QEMU's front-end; a forked child plays the
// back-end:
//
//     guest (this process)                      back-end (child process)
//     --------------------                      ------------------------
//                                      <------  SHMEM_MAP README.txt  -> 0x0000
//     reads README.txt through memory,
//     starts a DMA from it
//                                      <------  SHMEM_MAP data.csv[p1] -> 0x4000
//                                      <------  SHMEM_UNMAP 0x0000
//     the guest no longer sees README.txt, the DMA still does
//                                      <------  SHMEM_MAP notes.txt   -> 0x0000
//     the range was free at once: the guest reads notes.txt there, the DMA
//     still reads README.txt's pages; the DMA ends
//                                      <------  MEM_WRITE into the GPU's blob
//                                      <------  MEM_READ  of the GPU's blob
//
// The last two are the fallback for an address the back-end cannot translate
// (it lies in another device's shared memory region): the front-end performs
// the access through the device's DMA address space and replies.
//
// After each step the program prints what the guest reads and the flat view
// (`info mtree -f`). At the end both devices are unplugged, every object must
// have been finalized and the back-end must have exited cleanly: the exit
// status is 0 only then.
//
//     build/examples/virtiofs_dax
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include <fmt/core.h>

#include <qomem/address_space.hpp>
#include <qomem/device.hpp>
#include <qomem/machine.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/mtree.hpp>
#include <qomem/object.hpp>
#include <qomem/shmem.hpp>
#include <qomem/vhost_user/backend_requests.hpp>
#include <qomem/vhost_user/channel.hpp>
#include <qomem/vhost_user/wire.hpp>

namespace {

namespace vu = qomem::vhost_user;

const std::uint64_t page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));

constexpr qomem::hwaddr dax_bar = 0xfe000000; // where firmware put the virtiofs BAR
constexpr qomem::hwaddr gpu_bar = 0xfd000000; // and the GPU's
constexpr std::uint8_t dax_shmid = 0;         // virtiofs' cache window is shmid 0
constexpr std::uint8_t gpu_shmid = 1;         // virtio-gpu's host-visible region is shmid 1

// ---- the devices ------------------------------------------------------------------

/// A PCI-like VIRTIO device whose shared memory region sits at offset 0 of a
/// BAR of its own. The transport (the BAR) is the device's business: the
/// shared memory region itself knows nothing about PCI.
class pci_shmem_device : public qomem::virtio_shmem_device {
    QOMEM_OBJECT(pci_shmem_device, "pci-shmem-device", qomem::virtio_shmem_device)
public:
    pci_shmem_device(std::uint8_t shmid, std::uint64_t size, const char* bar_name)
        : shmid_(shmid), size_(size), bar_name_(bar_name) {}

    /// Firmware assigns the BAR an address in the system address space.
    /// Requires: realized.
    void map_bar(qomem::memory_region& system, qomem::hwaddr addr) { system.add_subregion(addr, *bar_); }

    qomem::virtio_shmem& window() const { return *shmem(shmid_); }

protected:
    /// Realize declares the shared memory region (a PROT_NONE reservation,
    /// child "shm[N]" of the device) and puts it at offset 0 of the BAR, a
    /// container region owned by the device.
    void do_realize() override {
        qomem::virtio_shmem& shm = declare_shmem(shmid_, size_);
        bar_ = qomem::make_container(*this, bar_name_, size_).get(); // our child holds it
        bar_->add_subregion(0, shm.region());
    }
    /// Unrealize (on unplug) takes the BAR out of the guest's memory map,
    /// dropping the system container's reference to it. The shared memory
    /// region then unmaps everything as the device leaves the tree.
    void do_unrealize() noexcept override {
        if (bar_->container()) bar_->container()->del_subregion(*bar_);
    }

private:
    std::uint8_t shmid_;
    std::uint64_t size_;
    const char* bar_name_;
    qomem::memory_region* bar_ = nullptr;
};

/// virtiofs: one shared memory region, the DAX window.
class virtiofs_device : public pci_shmem_device {
    QOMEM_OBJECT(virtiofs_device, "vhost-user-fs-pci", pci_shmem_device)
public:
    virtiofs_device() : pci_shmem_device(dax_shmid, 16 * page, "vhost-user-fs-bar2") {}
};

/// A GPU with a host-visible shared memory region (blobs): another device's
/// region, which the virtiofs back-end cannot translate.
class gpu_device : public pci_shmem_device {
    QOMEM_OBJECT(gpu_device, "virtio-gpu-pci", pci_shmem_device)
public:
    gpu_device() : pci_shmem_device(gpu_shmid, 4 * page, "virtio-gpu-bar4") {}
};

// ---- small helpers ----------------------------------------------------------------

/// A memfd standing for a host file: `pages` pages, each starting with a line of text.
int make_file(const char* name, const std::vector<std::string>& page_texts) {
    const int fd = ::memfd_create(name, MFD_CLOEXEC);
    if (fd < 0 || ::ftruncate(fd, static_cast<off_t>(page_texts.size() * page)) != 0) return -1;
    for (std::size_t i = 0; i < page_texts.size(); ++i)
        if (::pwrite(fd, page_texts[i].data(), page_texts[i].size(), static_cast<off_t>(i * page)) < 0)
            return -1;
    return fd;
}

std::span<const std::byte> as_bytes(std::string_view s) {
    return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}

/// The first line of text at `addr` as the guest reads it, or why it cannot.
std::string guest_line(qomem::address_space& as, qomem::hwaddr addr) {
    std::array<char, 80> buf{};
    const qomem::memtx_result r = as.read(addr, buf.data(), buf.size() - 1);
    if (r != qomem::memtx_ok)
        return fmt::format("<memtx_result {}: nothing mapped>", static_cast<unsigned>(r));
    const std::string_view s(buf.data());
    return fmt::format("\"{}\"", s.substr(0, s.find('\n')));
}

void print_flat_view(const qomem::address_space& as) {
    const std::array<const qomem::address_space*, 1> spaces{&as};
    fmt::print("{}", qomem::info_mtree(spaces, {.flatview = true}));
}

/// What the guest sees in the DAX window, page by page (mapped pages only).
void print_window(qomem::address_space& as, const qomem::virtio_shmem& shm) {
    fmt::print("  guest view of the DAX window ({} mapping(s) live, {} active):\n", shm.live_mappings(),
               shm.active_mappings());
    for (std::uint64_t off = 0; off < shm.size(); off += page) {
        std::uint8_t probe;
        if (as.read(dax_bar + off, &probe, 1) == qomem::memtx_ok)
            fmt::print("    {:#010x}: {}\n", dax_bar + off, guest_line(as, dax_bar + off));
    }
}

std::string describe(const vu::backend_message& m) {
    if (auto* map = std::get_if<vu::shmem_map_request>(&m.body))
        return fmt::format("SHMEM_MAP shmid {} fd_offset {:#x} shm_offset {:#x} len {:#x} flags {}",
                           map->map.shmid, map->map.fd_offset, map->map.shm_offset, map->map.len,
                           map->map.flags == 0   ? "read-only"
                           : map->map.flags == 1 ? "read-write"
                                                 : "invalid");
    if (auto* unmap = std::get_if<vu::shmem_unmap_request>(&m.body))
        return fmt::format("SHMEM_UNMAP shmid {} shm_offset {:#x} len {:#x}", unmap->map.shmid,
                           unmap->map.shm_offset, unmap->map.len);
    if (auto* rd = std::get_if<vu::mem_read_request>(&m.body))
        return fmt::format("MEM_READ {} bytes at {:#x}", rd->size, rd->guest_address);
    const auto& wr = std::get<vu::mem_write_request>(m.body);
    return fmt::format("MEM_WRITE {} bytes at {:#x}", wr.data.size(), wr.guest_address);
}

// ---- the back-end (child process) ---------------------------------------------------

/// The u64 of a reply to a need-reply request: 0 = success, else an errno
/// (or EPROTO for something that is not such a reply).
std::uint64_t reply_status(const vu::raw_message& reply) {
    const vu::msg_header h = vu::decode_header(reply.bytes); // throws protocol_error if malformed
    if (!(h.flags & vu::flag_reply) || h.size != 8) return EPROTO;
    std::uint64_t v = 0;
    for (std::size_t i = 8; i-- > 0;)
        v = v << 8 | std::to_integer<std::uint64_t>(reply.bytes[vu::header_size + i]);
    return v;
}

const std::string blob_text = "hello, GPU blob, from the virtiofs back-end";

/// virtiofsd's part: open "files", map windows of them into the DAX window,
/// and use the fallback for an address it cannot translate. Returns the
/// process exit status: 0, or the step that failed.
int backend(vu::channel ch) {
    const int readme = make_file(
        "README.txt", {"README.txt: welcome to virtiofs; this page is mapped straight into the guest\n"});
    const int data = make_file("data.csv", {"data.csv page 0: id,name\n", "data.csv page 1: 42,answer\n"});
    const int notes = make_file("notes.txt", {"notes.txt page 0: mapped where README.txt used to be\n",
                                              "notes.txt page 1: a two-page window\n"});
    if (readme < 0 || data < 0 || notes < 0) return 1;

    auto window = [](std::uint64_t fd_offset, std::uint64_t shm_offset, std::uint64_t len, qomem::shmem_flags flags) {
        return vu::make_mmap_payload(dax_shmid, fd_offset, shm_offset, len, flags);
    };
    constexpr auto ro = qomem::shmem_flags::read_only;
    constexpr auto rw = qomem::shmem_flags::read_write;
    const qomem::hwaddr blob = gpu_bar + page; // in the GPU's region: we cannot translate it

    // Each request asks for a reply; the front-end answers a u64, 0 = success.
    struct request {
        std::vector<std::byte> msg;
        int fd; // attached (SCM_RIGHTS) when >= 0
    };
    // clang-format off
    const std::vector<request> script{
        {vu::encode_shmem_map(window(0, 0, page, ro), true), readme},               // README.txt at 0
        {vu::encode_shmem_map(window(page, 4 * page, page, rw), true), data},       // data.csv page 1
        {vu::encode_shmem_unmap(window(0, 0, page, ro), true), -1},                 // README.txt out
        {vu::encode_shmem_map(window(0, 0, 2 * page, rw), true), notes},            // notes.txt at 0
        {vu::encode_mem_write(blob, as_bytes(blob_text), true), -1},                // the fallback
    };
    // clang-format on
    try {
        for (std::size_t i = 0; i < script.size(); ++i) {
            if (script[i].fd >= 0)
                ch.send(script[i].msg, std::array{script[i].fd});
            else
                ch.send(script[i].msg);
            std::optional<vu::raw_message> reply = ch.receive(64);
            if (!reply || reply_status(*reply) != 0) return static_cast<int>(10 + i);
        }
        // MEM_READ is always answered, with the data.
        ch.send(vu::encode_mem_read(blob, static_cast<std::uint32_t>(blob_text.size())));
        std::optional<vu::raw_message> reply = ch.receive(4096 + vu::mem_access_header_size);
        const std::size_t data_at = vu::header_size + vu::mem_access_header_size;
        if (!reply || reply->bytes.size() != data_at + blob_text.size() ||
            std::memcmp(reply->bytes.data() + data_at, blob_text.data(), blob_text.size()) != 0)
            return 20;
    } catch (const std::exception&) {
        return 30;
    }
    // The front-end has its own fds (and the mappings their pages): ours can go.
    ::close(readme);
    ::close(data);
    ::close(notes);
    return 0;
}

} // namespace

int main() {
    int status = 0;
    {
        // ---- the machine ---------------------------------------------------------------
        auto root = qomem::container::make_root();
        qomem::machine& machine = qomem::add_machine(*root);
        auto system = qomem::make_container(nullptr, "system", qomem::u128_2_64);
        auto ram = qomem::make_ram(nullptr, "pc.ram", 0x100000);
        system->add_subregion(0, *ram);
        std::optional<qomem::address_space> memory(std::in_place, *system, "memory");

        auto fs = qomem::make<virtiofs_device>();
        machine.peripheral().add_child("fs0", *fs);
        auto gpu = qomem::make<gpu_device>();
        machine.peripheral().add_child("gpu0", *gpu);
        fs->realize();
        gpu->realize();
        fs->map_bar(*system, dax_bar);
        gpu->map_bar(*system, gpu_bar);
        virtiofs_device* fs_dev = fs.get();
        gpu_device* gpu_dev = gpu.get();
        fs.reset(); // the tree holds them now
        gpu.reset();

        // The GPU's own back-end has a blob mapped in its region (here, by us).
        const int blob_file = make_file("gpu-blob", {"GPU blob 0: untouched\n"});
        gpu_dev->shmem_map(gpu_shmid, blob_file, 0, page, page, qomem::shmem_flags::read_write);
        ::close(blob_file); // the mapping keeps the pages, not the fd

        fmt::print("== the machine before the back-end connects\n");
        print_flat_view(*memory);

        // ---- the back-end --------------------------------------------------------------
        auto [front, back] = vu::channel::socketpair();
        std::fflush(nullptr);
        const pid_t pid = ::fork();
        if (pid < 0) {
            std::perror("fork");
            return 1;
        }
        if (pid == 0) {
            // The child: drop the front-end's end and speak only through ours.
            front.release().reset();
            ::_exit(backend(std::move(back)));
        }
        back.release().reset();

        // ---- the front-end -------------------------------------------------------------
        // QEMU's vhost-user-fs: requests from the back-end apply to the device's
        // shared memory regions; MEM_READ / MEM_WRITE go through its DMA space.
        vu::backend_request_handler fe(fs_dev, *memory);
        qomem::virtio_shmem& window = fs_dev->window();
        std::optional<qomem::dma_mapping> dma; // a guest DMA from README.txt
        int step = 0;
        try {
            while (std::optional<vu::raw_message> raw = front.receive(fe.max_payload())) {
                ++step;
                // handle() is decode + apply; done in two steps here to narrate.
                vu::backend_message m = vu::decode_backend_message(raw->bytes, std::move(raw->fds));
                fmt::print("\n== step {}: the back-end sends {}\n", step, describe(m));
                std::optional<std::vector<std::byte>> reply = fe.apply(m);
                if (!fe.last_error().empty()) fmt::print("  refused: {}\n", fe.last_error());
                if (reply) front.send(*reply);

                switch (static_cast<vu::backend_request>(m.header.request)) {
                case vu::backend_request::shmem_map:
                case vu::backend_request::shmem_unmap:
                    print_window(*memory, window);
                    print_flat_view(*memory);
                    break;
                default:
                    // An address in virtio-gpu-pci's shared memory region: not
                    // in the back-end's memory table, so the front-end did the
                    // access through the device's DMA address space.
                    fmt::print("  done by the front-end through its DMA address space ({}); the GPU blob, as "
                               "the guest reads it:\n    {}\n",
                               reply ? "replied" : "no reply asked", guest_line(*memory, gpu_bar + page));
                    break;
                }

                if (step == 1) {
                    // The guest starts a DMA out of README.txt: it holds the mapping.
                    dma.emplace(memory->map(dax_bar, page, false));
                    fmt::print("  guest DMA started from {:#x}: {} bytes at host {}\n", dax_bar, dma->size(),
                               static_cast<const void*>(dma->data()));
                }
                if (step == 3 && dma) {
                    // README.txt is gone from the guest's view and its range is
                    // free, but the DMA still reads the file's pages.
                    const std::string_view text(reinterpret_cast<const char*>(dma->data()), 32);
                    fmt::print("  the DMA still reads: \"{}...\"\n", text);
                }
                if (step == 4 && dma) {
                    // notes.txt took the range at once; the DMA is undisturbed.
                    const std::string_view text(reinterpret_cast<const char*>(dma->data()), 32);
                    fmt::print("  the guest reads {} at {:#x}; the DMA still reads: \"{}...\"\n",
                               guest_line(*memory, dax_bar), dax_bar, text);
                    memory->unmap(*dma, 0);
                    dma.reset();
                    fmt::print("  guest DMA ended: {} mapping(s) live; README.txt's pages are gone\n",
                               window.live_mappings());
                }
            }
        } catch (const std::exception& e) {
            fmt::print(stderr, "front-end: {}\n", e.what());
            status = 1;
        }
        if (dma) memory->unmap(*dma, 0);

        int wstatus = 0;
        while (::waitpid(pid, &wstatus, 0) < 0 && errno == EINTR) {
        }
        const bool backend_ok = WIFEXITED(wstatus) && WEXITSTATUS(wstatus) == 0;
        fmt::print("\n== the back-end exited {}\n",
                   backend_ok ? std::string("cleanly")
                              : fmt::format("with status {:#x} (a failed step)", wstatus));
        if (!backend_ok || step != 6) status = 1;

        // ---- unplug ------------------------------------------------------------------
        qomem::unparent(*fs_dev); // unrealize (BAR out), every mapping unmapped
        qomem::unparent(*gpu_dev);
        fmt::print("\n== after unplugging both devices\n");
        print_flat_view(*memory);

        memory.reset();
        system.reset();
        ram.reset();
    }
    const std::size_t left = qomem::live_object_count();
    fmt::print("\nlive objects at exit: {}\n", left);
    return left == 0 && status == 0 ? 0 : 1;
}
