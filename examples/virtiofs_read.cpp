// examples/virtiofs_read.cpp — reading a host file through Debian's real
// virtiofsd, with qomem as the vhost-user front-end and this program as the
// guest's virtio-fs driver.
//
//     build/examples/virtiofs_read               # shares a directory it writes
//     build/examples/virtiofs_read /usr/include/stdio.h    # a regular file (not a symlink)
//
// What happens:
//  1. virtiofsd (/usr/lib/qemu/virtiofsd) is started on a Unix socket this
//     program listens on (its --fd), sharing the file's directory; as root it
//     sandboxes itself with chroot, otherwise it runs in a user namespace.
//  2. The guest: 4 MiB of RAM from a memfd (a vhost-user back-end maps the
//     guest's RAM through its fd), an address space over it.
//  3. qomem::vhost_user::frontend runs the handshake and gives virtiofsd the
//     memory table; two split virtqueues (hiprio, requests) in guest RAM.
//  4. FUSE over the request queue: INIT, LOOKUP of the file's name, OPEN,
//     READ in 64 KiB pieces into guest RAM, RELEASE. The program prints what
//     it read and compares it with the file read directly.
//  5. virtiofsd is stopped by its pid.
// Exit status 0 only when the bytes read through virtiofsd are the file's.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <fmt/core.h>

#include <qomem/address_space.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/vhost_user.hpp>

extern char** environ;

namespace {

namespace vu = qomem::vhost_user;
namespace fs = std::filesystem;
using bytes = std::vector<std::byte>;

constexpr std::uint64_t ram_size = 4 << 20;
constexpr std::uint32_t chunk = 64 << 10; // bytes per FUSE_READ

// ---- virtiofsd, as a child process -------------------------------------------------

/// virtiofsd sharing `dir`, listening on the socket at `socket_path` that
/// this program bound (fd 3 in the child), its output in `log`. Stopped by
/// its pid on destruction.
class virtiofsd {
public:
    virtiofsd(const fs::path& dir, const std::string& socket_path, const std::string& log) {
        const int listener = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        sockaddr_un addr{};
        addr.sun_family = AF_UNIX;
        std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", socket_path.c_str());
        if (listener < 0 || ::bind(listener, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0 ||
            ::listen(listener, 1) != 0)
            throw std::runtime_error(fmt::format("cannot listen on {}: {}", socket_path, std::strerror(errno)));
        std::vector<std::string> args;
        std::string sandbox = "sandbox=chroot";
        if (::geteuid() != 0) { // the sandbox needs root: be root in a user namespace
            args = {"unshare", "--user", "--map-root-user"};
            sandbox = "sandbox=namespace";
        }
        for (const char* a : {"/usr/lib/qemu/virtiofsd", "--fd=3", "-o", "cache=none", "-o", "log_level=warn", "-o"})
            args.emplace_back(a);
        args.push_back(sandbox);
        args.emplace_back("-o");
        args.push_back("source=" + dir.string());
        std::vector<char*> argv;
        for (std::string& a : args) argv.push_back(a.data());
        argv.push_back(nullptr);
        posix_spawn_file_actions_t actions;
        posix_spawn_file_actions_init(&actions);
        posix_spawn_file_actions_addopen(&actions, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
        posix_spawn_file_actions_adddup2(&actions, 1, 2);
        posix_spawn_file_actions_adddup2(&actions, listener, 3);
        const int r = ::posix_spawnp(&pid_, argv[0], &actions, nullptr, argv.data(), environ);
        posix_spawn_file_actions_destroy(&actions);
        ::close(listener);
        if (r != 0) throw std::runtime_error(fmt::format("cannot start {}: {}", argv[0], std::strerror(r)));
    }
    ~virtiofsd() {
        int status = 0;
        if (::waitpid(pid_, &status, WNOHANG) != 0) return; // already gone
        ::kill(pid_, SIGTERM);
        for (int i = 0; i < 200 && ::waitpid(pid_, &status, WNOHANG) == 0; ++i)
            std::this_thread::sleep_for(std::chrono::milliseconds(10));
        if (::waitpid(pid_, &status, WNOHANG) == 0) {
            ::kill(pid_, SIGKILL);
            ::waitpid(pid_, &status, 0);
        }
    }
    virtiofsd(const virtiofsd&) = delete;
    virtiofsd& operator=(const virtiofsd&) = delete;
    pid_t pid() const noexcept { return pid_; }

private:
    pid_t pid_ = -1;
};

// ---- FUSE over virtio-fs (linux/fuse.h, protocol 7.36) ------------------------------------

template <class T>
void put(bytes& b, std::size_t at, T v) {
    if (b.size() < at + sizeof(T)) b.resize(at + sizeof(T));
    for (std::size_t i = 0; i < sizeof(T); ++i) b[at + i] = static_cast<std::byte>(std::uint64_t(v) >> (8 * i));
}
template <class T>
T get(const bytes& b, std::size_t at) {
    std::uint64_t v = 0;
    for (std::size_t i = 0; i < sizeof(T) && at + i < b.size(); ++i)
        v |= std::uint64_t(std::to_integer<std::uint8_t>(b[at + i])) << (8 * i);
    return static_cast<T>(v);
}

/// The guest's virtio-fs driver: FUSE requests on the request queue, each
/// request and reply in guest RAM.
class fuse_driver {
public:
    fuse_driver(vu::frontend& fe, qomem::address_space& guest, vu::split_virtqueue& q)
        : fe_(&fe), guest_(&guest), q_(&q) {}

    /// Sends opcode `op` for `node` with `args`; returns the reply's payload.
    /// Throws std::runtime_error for a FUSE error or a back-end that does not answer.
    bytes call(std::uint32_t op, std::uint64_t node, const bytes& args, std::uint32_t reply_room) {
        constexpr qomem::hwaddr in_at = 0x100000, out_at = 0x200000; // request and reply buffers
        bytes req;
        put<std::uint32_t>(req, 0, static_cast<std::uint32_t>(40 + args.size())); // fuse_in_header
        put<std::uint32_t>(req, 4, op);
        put<std::uint64_t>(req, 8, ++unique_);
        put<std::uint64_t>(req, 16, node);
        req.resize(40);
        req.insert(req.end(), args.begin(), args.end());
        guest_->write(in_at, req.data(), req.size());
        const vu::split_virtqueue::buffer chain[] = {{in_at, static_cast<std::uint32_t>(req.size()), false},
                                                     {out_at, 16 + reply_room, true}};
        q_->add(chain);
        fe_->kick(1);
        std::optional<vu::split_virtqueue::used_element> used;
        for (int i = 0; i < 50 && !(used = q_->take_used()); ++i) (void)fe_->wait_call(1, std::chrono::milliseconds(100));
        if (!used) throw std::runtime_error(fmt::format("virtiofsd did not answer FUSE opcode {}", op));
        bytes out(used->len);
        guest_->read(out_at, out.data(), out.size());
        if (const auto error = static_cast<std::int32_t>(get<std::uint32_t>(out, 4)); error != 0)
            throw std::runtime_error(fmt::format("FUSE opcode {}: {}", op, std::strerror(-error)));
        return bytes(out.begin() + 16, out.end()); // after fuse_out_header
    }

private:
    vu::frontend* fe_;
    qomem::address_space* guest_;
    vu::split_virtqueue* q_;
    std::uint64_t unique_ = 0;
};

bytes read_file(const fs::path& file, const fs::path& run);

bytes read_through_virtiofsd(const fs::path& file) {
    const fs::path run = fs::temp_directory_path() / fmt::format("qomem-virtiofs-{}", ::getpid());
    fs::create_directories(run);
    struct cleanup {
        fs::path p;
        ~cleanup() {
            std::error_code ec;
            fs::remove_all(p, ec);
        }
    } remove_run{run};
    const std::string log = (run / "virtiofsd.log").string();
    virtiofsd daemon(file.parent_path(), (run / "fs.sock").string(), log);
    fmt::print("virtiofsd started (pid {}), sharing {}\n", daemon.pid(), file.parent_path().string());
    try {
        return read_file(file, run);
    } catch (...) {
        std::ifstream in(log);
        fmt::print(stderr, "virtiofsd's log:\n{}", std::string(std::istreambuf_iterator<char>(in), {}));
        throw;
    }
}

/// The guest's side: RAM, the session, the queues and FUSE.
bytes read_file(const fs::path& file, const fs::path& run) {

    // The guest: RAM from a memfd (virtiofsd maps it through the fd).
    const int memfd = ::memfd_create("guest-ram", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (memfd < 0 || ::ftruncate(memfd, ram_size) != 0) throw std::runtime_error("memfd_create failed");
    struct fd_closer {
        int fd;
        ~fd_closer() { ::close(fd); }
    } close_memfd{memfd};
    auto ram = qomem::make_ram_from_fd(nullptr, "guest-ram", ram_size, memfd, 0);
    auto system = qomem::make_container(nullptr, "system", qomem::u128_2_64); // goes first, releasing ram
    system->add_subregion(0, *ram);
    qomem::address_space guest(*system, "memory");

    bytes content;
    {
        vu::frontend fe(vu::channel::connect((run / "fs.sock").string()), guest);
        fmt::print("handshake done: features {:#x}, protocol features {:#x}, {} queue(s); memory table:\n",
                   fe.features(), fe.protocol_features(), fe.queue_num().value_or(0));
        for (const vu::mem_table_entry& e : fe.mem_table())
            fmt::print("  guest {:#x}+{:#x} -> fd {} offset {:#x}\n", e.region.guest_phys_addr, e.region.memory_size,
                       e.fd, e.region.mmap_offset);
        vu::split_virtqueue hiprio(guest, 0x10000, 16);
        vu::split_virtqueue requests(guest, 0x20000, 16);
        fe.start_vring(0, hiprio.layout());
        fe.start_vring(1, requests.layout());
        fuse_driver fuse(fe, guest, requests);

        bytes init(64); // fuse_init_in: major, minor, max_readahead, flags, flags2, unused
        put<std::uint32_t>(init, 0, 7);
        put<std::uint32_t>(init, 4, 36);
        const bytes init_out = fuse.call(26, 0, init, 64);
        fmt::print("FUSE_INIT: virtiofsd speaks FUSE {}.{}\n", get<std::uint32_t>(init_out, 0),
                   get<std::uint32_t>(init_out, 4));

        const std::string name = file.filename().string();
        bytes lookup(name.size() + 1);
        std::memcpy(lookup.data(), name.c_str(), name.size());
        const bytes entry = fuse.call(1, 1, lookup, 128); // LOOKUP under the root, node 1
        const auto node = get<std::uint64_t>(entry, 0);
        const auto size = get<std::uint64_t>(entry, 40 + 8); // fuse_attr.size
        fmt::print("FUSE_LOOKUP '{}': node {}, {} bytes\n", name, node, size);

        const bytes opened = fuse.call(14, node, bytes(8), 16); // OPEN, O_RDONLY
        const auto fh = get<std::uint64_t>(opened, 0);
        for (std::uint64_t offset = 0; offset < size;) {
            bytes args;
            put<std::uint64_t>(args, 0, fh);
            put<std::uint64_t>(args, 8, offset);
            put<std::uint32_t>(args, 16, chunk);
            args.resize(40); // fuse_read_in
            const bytes data = fuse.call(15, node, args, chunk);
            if (data.empty()) break;
            content.insert(content.end(), data.begin(), data.end());
            offset += data.size();
        }
        bytes release;
        put<std::uint64_t>(release, 0, fh);
        release.resize(24); // fuse_release_in
        (void)fuse.call(18, node, release, 0);
        fmt::print("FUSE_READ: {} bytes in {} request(s) of at most {} KiB; FUSE_RELEASE\n", content.size(),
                   (content.size() + chunk - 1) / chunk, chunk >> 10);
    } // the session ends: virtiofsd sees the connection close
    return content;
}

} // namespace

int main(int argc, char** argv) {
    try {
        fs::path file;
        std::optional<fs::path> own;
        if (argc > 1) {
            file = fs::absolute(argv[1]);
        } else {
            own = fs::temp_directory_path() / fmt::format("qomem-share-{}", ::getpid());
            fs::create_directories(*own);
            file = *own / "hello.txt";
            std::ofstream(file) << "Hello from the host, read by the guest through virtiofsd and qomem.\n"
                                << "This file was written by examples/virtiofs_read.\n";
        }
        std::ifstream in(file, std::ios::binary);
        const std::string direct((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        const bytes through = read_through_virtiofsd(file);
        if (own) fs::remove_all(*own);

        const std::string text(reinterpret_cast<const char*>(through.data()), through.size());
        fmt::print("---- {} as the guest read it ----\n{}{}---- end ----\n", file.string(),
                   text.substr(0, 2000), text.size() > 2000 ? "\n...\n" : "");
        const bool same = text == direct;
        fmt::print("{} bytes read through virtiofsd; {} the file read directly\n", through.size(),
                   same ? "identical to" : "DIFFERENT FROM");
        return same && qomem::live_object_count() == 0 ? 0 : 1;
    } catch (const std::exception& e) {
        fmt::print(stderr, "virtiofs_read: {}\n", e.what());
        return 1;
    }
}
