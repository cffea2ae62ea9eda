// examples/virtiofs_dax.cpp — virtiofs with DAX: a back-end process maps
// file windows into the guest at run time, over vhost-user; the guest finds
// the window the way its drivers do.
//
// virtiofs' DAX window is a VIRTIO Shared Memory Region: the device exposes a
// range of guest-physical memory into which the vhost-user back-end
// (virtiofsd, a separate process) maps windows of host files with
// SHMEM_MAP, so that the guest reads file pages without copying. The devices
// here only declare their regions (an id and a size); the transports place
// them and tell the guest where:
//  * virtiofs is a virtio-pci function behind a PCI host bridge: firmware
//    scans the bus through ECAM, sizes and places its BAR 2, and the
//    virtio-fs driver walks the capability list for the shared memory
//    capability with id 0 (VIRTIO_PCI_CAP_SHARED_MEMORY_CFG), as Linux's
//    vp_get_shm_region does;
//  * a GPU with a host-visible region (shmid 1) sits on virtio-mmio: its
//    driver writes 1 to SHMSel and reads SHMLen / SHMBase, as Linux's
//    vm_get_shm_region does.
// This program plays the guest and QEMU's front-end; a forked child plays the
// back-end:
//
//     guest (this process)                      back-end (child process)
//     --------------------                      ------------------------
//     firmware, then drivers: where are the regions?
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
// (`info mtree -f`). At the end both devices are unplugged and the drivers
// look again (the regions are gone from their view); every object must have
// been finalized and the back-end must have exited cleanly: the exit status
// is 0 only then.
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
#include <qomem/pci.hpp>
#include <qomem/shmem.hpp>
#include <qomem/vhost_user/backend_requests.hpp>
#include <qomem/vhost_user/channel.hpp>
#include <qomem/vhost_user/wire.hpp>
#include <qomem/virtio_mmio.hpp>
#include <qomem/virtio_pci.hpp>

namespace {

namespace vu = qomem::vhost_user;

const std::uint64_t page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));

// The board: where firmware finds PCI configuration space, the window it
// assigns PCI BARs from, and a virtio-mmio slot (QEMU's virt machine has
// the same kinds of things, at other addresses).
constexpr qomem::hwaddr ecam_base = 0x30000000;
constexpr qomem::hwaddr pci_window = 0xfe000000;
constexpr std::uint64_t pci_window_size = 0x1000000;
constexpr qomem::hwaddr mmio_regs = 0x0a000000;
constexpr qomem::hwaddr mmio_shm_window = 0xfd000000;
constexpr std::uint64_t mmio_shm_window_size = 0x100000;
constexpr std::uint8_t dax_shmid = 0; // virtiofs' cache window is shmid 0
constexpr std::uint8_t gpu_shmid = 1; // virtio-gpu's host-visible region is shmid 1

// ---- the devices ------------------------------------------------------------------

/// virtio-fs: one shared memory region, the DAX window. The model says
/// which region it has and how large; where it goes is the transport's.
class virtiofs_device : public qomem::virtio_shmem_device {
    QOMEM_OBJECT(virtiofs_device, "vhost-user-fs-device", qomem::virtio_shmem_device)
public:
    virtiofs_device() = default;
    std::uint16_t virtio_id() const noexcept override { return 26; }

protected:
    void do_realize() override { declare_shmem(dax_shmid, 16 * page); }
};

/// A GPU with a host-visible shared memory region (blobs): another device's
/// region, which the virtiofs back-end cannot translate.
class gpu_device : public qomem::virtio_shmem_device {
    QOMEM_OBJECT(gpu_device, "virtio-gpu-device", qomem::virtio_shmem_device)
public:
    gpu_device() = default;
    std::uint16_t virtio_id() const noexcept override { return 16; }

protected:
    void do_realize() override { declare_shmem(gpu_shmid, 4 * page); }
};

// ---- the guest's firmware and drivers -----------------------------------------------

/// `size` bytes of PCI configuration space of bus 0, function `devfn`, read
/// through the ECAM window (absent functions read all ones).
std::uint32_t config_read(qomem::address_space& as, std::uint8_t devfn, std::uint32_t reg, unsigned size = 4) {
    std::array<std::uint8_t, 4> b{};
    (void)as.read(ecam_base + (std::uint64_t(devfn) << 12 | reg), b.data(), size);
    return std::uint32_t(b[0]) | std::uint32_t(b[1]) << 8 | std::uint32_t(b[2]) << 16 | std::uint32_t(b[3]) << 24;
}
void config_write(qomem::address_space& as, std::uint8_t devfn, std::uint32_t reg, std::uint32_t v, unsigned size = 4) {
    const std::array<std::uint8_t, 4> b{static_cast<std::uint8_t>(v), static_cast<std::uint8_t>(v >> 8),
                                        static_cast<std::uint8_t>(v >> 16), static_cast<std::uint8_t>(v >> 24)};
    (void)as.write(ecam_base + (std::uint64_t(devfn) << 12 | reg), b.data(), size);
}

/// Firmware: scans bus 0 and gives every memory BAR an address from the PCI
/// window (sized by writing all ones and reading back), then turns memory
/// decoding on.
void firmware_assign_bars(qomem::address_space& as) {
    namespace cfg = qomem::pci_config;
    qomem::hwaddr next = pci_window;
    for (unsigned slot = 0; slot < 32; ++slot) {
        const auto devfn = static_cast<std::uint8_t>(slot << 3);
        const std::uint32_t id = config_read(as, devfn, cfg::vendor_id);
        if ((id & 0xffff) == 0xffff) continue;
        for (unsigned bar = 0; bar < 6; ++bar) {
            const std::uint32_t at = cfg::bar0 + 4 * bar;
            const std::uint32_t type = config_read(as, devfn, at) & cfg::bar_type_mask;
            const bool is64 = (type & 0x6) == cfg::bar_mem_type_64;
            config_write(as, devfn, at, 0xffffffff);
            std::uint64_t mask = config_read(as, devfn, at) & ~cfg::bar_type_mask;
            if (is64) {
                config_write(as, devfn, at + 4, 0xffffffff);
                mask |= std::uint64_t(config_read(as, devfn, at + 4)) << 32;
            } else {
                mask |= 0xffffffff00000000;
            }
            if (mask == 0xffffffff00000000) continue; // not implemented
            const std::uint64_t size = ~mask + 1;
            next = (next + size - 1) & ~(size - 1);
            config_write(as, devfn, at, static_cast<std::uint32_t>(next) | type);
            if (is64) config_write(as, devfn, at + 4, static_cast<std::uint32_t>(next >> 32));
            fmt::print("  firmware: 00:{:02x}.{} {:04x}:{:04x} BAR {} ({}-bit{}, {:#x} bytes) at {:#x}\n", slot, 0,
                       id & 0xffff, id >> 16, bar, is64 ? 64 : 32, type & cfg::bar_mem_prefetch ? ", prefetchable" : "",
                       size, next);
            next += size;
            if (is64) ++bar;
        }
        config_write(as, devfn, cfg::command, cfg::command_memory, 2);
    }
}

struct shm_region {
    qomem::hwaddr addr;
    std::uint64_t len;
};

/// The virtio-pci driver (Linux's vp_get_shm_region): walks the capability
/// list for a vendor capability of cfg_type 8 with this id and adds its
/// 64-bit offset to the BAR's address.
std::optional<shm_region> pci_find_shm(qomem::address_space& as, std::uint8_t devfn, std::uint8_t shmid) {
    namespace cfg = qomem::pci_config;
    if (!(config_read(as, devfn, cfg::status, 2) & cfg::status_cap_list)) return std::nullopt;
    for (auto pos = static_cast<std::uint8_t>(config_read(as, devfn, cfg::capability_list, 1)); pos >= 0x40;
         pos = static_cast<std::uint8_t>(config_read(as, devfn, pos + 1u, 1))) {
        if (config_read(as, devfn, pos, 1) != cfg::cap_id_vendor || config_read(as, devfn, pos + 3u, 1) != 8 ||
            config_read(as, devfn, pos + 2u, 1) != 24 || config_read(as, devfn, pos + 5u, 1) != shmid)
            continue;
        const std::uint32_t bar = config_read(as, devfn, pos + 4u, 1);
        const std::uint64_t offset =
            config_read(as, devfn, pos + 8u) | std::uint64_t(config_read(as, devfn, pos + 16u)) << 32;
        const std::uint64_t len = config_read(as, devfn, pos + 12u) | std::uint64_t(config_read(as, devfn, pos + 20u)) << 32;
        const std::uint32_t at = cfg::bar0 + 4 * bar;
        const std::uint32_t low = config_read(as, devfn, at);
        std::uint64_t base = low & ~cfg::bar_type_mask;
        if ((low & 0x6) == cfg::bar_mem_type_64) base |= std::uint64_t(config_read(as, devfn, at + 4)) << 32;
        fmt::print("  virtio-pci driver: capability at {:#x}: shared memory region {}, BAR {} + {:#x}, {:#x} bytes\n",
                   pos, shmid, bar, offset, len);
        return shm_region{base + offset, len};
    }
    return std::nullopt;
}

/// The virtio-mmio driver (Linux's vm_get_shm_region): select, read the
/// length (all ones: no such region), then the base.
std::optional<shm_region> mmio_find_shm(qomem::address_space& as, std::uint32_t shmid) {
    namespace reg = qomem::virtio_mmio_reg;
    const auto rd = [&](qomem::hwaddr r) {
        std::uint32_t v = 0;
        (void)as.read(mmio_regs + r, &v, 4);
        return v;
    };
    (void)as.write(mmio_regs + reg::shm_sel, &shmid, 4);
    const std::uint64_t len = rd(reg::shm_len_low) | std::uint64_t(rd(reg::shm_len_high)) << 32;
    if (len == ~std::uint64_t(0)) return std::nullopt;
    return shm_region{rd(reg::shm_base_low) | std::uint64_t(rd(reg::shm_base_high)) << 32, len};
}

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

/// What the guest sees in the DAX window at `dax`, page by page (mapped pages only).
void print_window(qomem::address_space& as, qomem::hwaddr dax, const qomem::virtio_shmem& shm) {
    fmt::print("  guest view of the DAX window ({} mapping(s) live, {} active):\n", shm.live_mappings(),
               shm.active_mappings());
    for (std::uint64_t off = 0; off < shm.size(); off += page) {
        std::uint8_t probe;
        if (as.read(dax + off, &probe, 1) == qomem::memtx_ok)
            fmt::print("    {:#010x}: {}\n", dax + off, guest_line(as, dax + off));
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
/// and use the fallback for an address it cannot translate (`blob`, in the
/// GPU's region). Returns the process exit status: 0, or the step that failed.
int backend(vu::channel ch, qomem::hwaddr blob) {
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

        // A PCI host bridge: configuration space through ECAM, and a window
        // of its PCI memory in the system address space for the BARs.
        auto host = qomem::make<qomem::pci_host_bridge>();
        machine.peripheral().add_child("pcie", *host);
        host->realize();
        system->add_subregion(ecam_base, host->ecam());
        auto pci_hole = qomem::make_alias(nullptr, "pci-hole", host->pci_memory(), pci_window, pci_window_size);
        system->add_subregion(pci_window, *pci_hole);

        // virtiofs on virtio-pci: the proxy realizes the device (which declares
        // its DAX window) and lays its regions out in BAR 2.
        auto fs = qomem::make<virtiofs_device>();
        machine.peripheral().add_child("fs0-device", *fs);
        auto fs_pci = qomem::make<qomem::virtio_pci>();
        fs_pci->plug(*fs);
        fs_pci->plug_into(host->bus());
        machine.peripheral().add_child("fs0", *fs_pci);
        fs_pci->realize();
        const std::uint8_t fs_devfn = *fs_pci->devfn();

        // The GPU on virtio-mmio: registers and a shared memory window.
        auto mmio = qomem::make<qomem::virtio_mmio>(mmio_shm_window, mmio_shm_window_size);
        machine.peripheral().add_child("virtio-mmio0", *mmio);
        mmio->map(*system, mmio_regs);
        mmio->realize();
        auto gpu = qomem::make<gpu_device>();
        machine.peripheral().add_child("gpu0", *gpu);
        mmio->plug(*gpu);

        virtiofs_device* fs_dev = fs.get();
        gpu_device* gpu_dev = gpu.get();
        qomem::virtio_pci* fs_proxy = fs_pci.get();
        qomem::virtio_mmio* gpu_mmio = mmio.get();
        fs.reset(); // the tree holds them now
        gpu.reset();
        fs_pci.reset();
        mmio.reset();

        // ---- the guest: firmware, then the drivers ---------------------------------
        fmt::print("== the guest boots: where are the shared memory regions?\n");
        firmware_assign_bars(*memory);
        const std::optional<shm_region> dax_region = pci_find_shm(*memory, fs_devfn, dax_shmid);
        const std::optional<shm_region> gpu_region = mmio_find_shm(*memory, gpu_shmid);
        if (!dax_region || !gpu_region) {
            fmt::print(stderr, "the drivers did not find the shared memory regions\n");
            return 1;
        }
        const qomem::hwaddr dax = dax_region->addr;
        const qomem::hwaddr gpu_blob = gpu_region->addr + page; // where the GPU's back-end maps a blob
        fmt::print("  virtio-fs driver: DAX window (shmid {}) at {:#x}, {:#x} bytes\n", dax_shmid, dax,
                   dax_region->len);
        fmt::print("  virtio-gpu driver (virtio-mmio at {:#x}): shmid {} at {:#x}, {:#x} bytes\n", mmio_regs,
                   gpu_shmid, gpu_region->addr, gpu_region->len);
        fmt::print("  virtio-fs driver: shmid 5 {}\n",
                   pci_find_shm(*memory, fs_devfn, 5) ? "found?!" : "has no capability: no such region");

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
            ::_exit(backend(std::move(back), gpu_blob));
        }
        back.release().reset();

        // ---- the front-end -------------------------------------------------------------
        // QEMU's vhost-user-fs: requests from the back-end apply to the device's
        // shared memory regions; MEM_READ / MEM_WRITE go through its DMA space.
        vu::backend_request_handler fe(fs_dev, *memory);
        qomem::virtio_shmem& window = *fs_dev->shmem(dax_shmid);
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
                    print_window(*memory, dax, window);
                    print_flat_view(*memory);
                    break;
                default:
                    // An address in the GPU's shared memory region: not
                    // in the back-end's memory table, so the front-end did the
                    // access through the device's DMA address space.
                    fmt::print("  done by the front-end through its DMA address space ({}); the GPU blob, as "
                               "the guest reads it:\n    {}\n",
                               reply ? "replied" : "no reply asked", guest_line(*memory, gpu_blob));
                    break;
                }

                if (step == 1) {
                    // The guest starts a DMA out of README.txt: it holds the mapping.
                    dma.emplace(memory->map(dax, page, false));
                    fmt::print("  guest DMA started from {:#x}: {} bytes at host {}\n", dax, dma->size(),
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
                               guest_line(*memory, dax), dax, text);
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
        // The GPU leaves its virtio-mmio slot: its region leaves the window
        // and the driver's view (SHMLen reads all ones).
        qomem::unparent(*gpu_dev);
        fmt::print("\n== after unplugging the GPU\n  virtio-mmio driver: shmid {} {}\n", gpu_shmid,
                   mmio_find_shm(*memory, gpu_shmid) ? "still there?!" : "reads a length of all ones: gone");
        // The virtiofs function is hot-unplugged: unrealize (BAR out), its
        // device unplugged (every mapping unmapped), off the PCI bus.
        qomem::unparent(*fs_proxy);
        fmt::print("\n== after unplugging virtiofs\n  firmware: 00:{:02x}.0 vendor ID reads {:#06x}\n",
                   fs_devfn >> 3, config_read(*memory, fs_devfn, qomem::pci_config::vendor_id, 2));
        qomem::unparent(*gpu_mmio);
        qomem::unparent(*host);
        print_flat_view(*memory);

        memory.reset();
        system.reset();
        pci_hole.reset();
        ram.reset();
    }
    const std::size_t left = qomem::live_object_count();
    fmt::print("\nlive objects at exit: {}\n", left);
    return left == 0 && status == 0 ? 0 : 1;
}
