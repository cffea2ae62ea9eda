// The vhost-user front-end session (qomem/vhost_user/frontend.hpp) against
// Debian's real back-ends, each started by the test on a Unix socket it made
// and stopped by its pid, every wait bounded:
//  * virtiofsd (/usr/lib/qemu/virtiofsd, QEMU 7.2, libvhost-user): FUSE_INIT,
//    LOOKUP, OPEN and READ of a file the test wrote; RAM is hot-added between
//    two requests (ADD_MEM_REG) and the second request's buffers are placed
//    in the new RAM; then the RAM is removed again (REM_MEM_REG) and the
//    back-end keeps serving from the old RAM.
//  * qemu-storage-daemon's vhost-user-blk export, with CONFIGURE_MEM_SLOTS
//    left out so that the table goes as whole SET_MEM_TABLE messages: the
//    capacity from GET_CONFIG, sectors written, RAM hot-added, the sectors
//    read back into the new RAM and compared (and found in the image file).
//
// virtiofsd needs root for its sandbox: as root (CI) it runs with
// sandbox=chroot; otherwise inside `unshare --user --map-root-user` with
// sandbox=namespace (unprivileged user namespaces).
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/core.h>

#include <qomem/vhost_user/frontend.hpp>
#include <qomem/vhost_user/virtqueue.hpp>

#include "test_support.hpp"

namespace vu = qomem::vhost_user;
using qomem::hwaddr;
using qomem_test::bytes;
using vu::frontend_request;
using vu::protocol_feature;

namespace {

constexpr auto wait_limit = std::chrono::seconds(5);

// ---- little-endian fields in byte buffers ---------------------------------------------

template <class T>
void put(bytes& b, std::size_t at, T v) {
    if (b.size() < at + sizeof(T)) b.resize(at + sizeof(T));
    for (std::size_t i = 0; i < sizeof(T); ++i) b[at + i] = static_cast<std::byte>(std::uint64_t(v) >> (8 * i));
}
template <class T>
T get(const bytes& b, std::size_t at) {
    REQUIRE(b.size() >= at + sizeof(T));
    std::uint64_t v = 0;
    for (std::size_t i = 0; i < sizeof(T); ++i) v |= std::uint64_t(std::to_integer<std::uint8_t>(b[at + i])) << (8 * i);
    return static_cast<T>(v);
}

std::size_t count(const std::vector<frontend_request>& trace, frontend_request r) {
    return static_cast<std::size_t>(std::count(trace.begin(), trace.end(), r));
}

/// Puts `chain` on `q`, kicks queue `index`, waits for the back-end and
/// returns the bytes it reports written.
std::uint32_t submit(vu::frontend& fe, vu::split_virtqueue& q, unsigned index,
                     std::initializer_list<vu::split_virtqueue::buffer> chain) {
    const std::vector<vu::split_virtqueue::buffer> c(chain);
    const std::uint16_t head = q.add(c);
    fe.kick(index);
    std::optional<vu::split_virtqueue::used_element> used;
    const auto deadline = std::chrono::steady_clock::now() + wait_limit;
    while (!(used = q.take_used()) && std::chrono::steady_clock::now() < deadline)
        (void)fe.wait_call(index, std::chrono::milliseconds(200));
    INFO("the back-end did not use the chain within " << wait_limit.count() << " s");
    REQUIRE(used);
    CHECK(used->head == head);
    return used->len;
}

// ---- FUSE, as virtio-fs carries it (linux/fuse.h, protocol 7.36) -------------------------

constexpr std::uint32_t fuse_lookup = 1;
constexpr std::uint32_t fuse_open = 14;
constexpr std::uint32_t fuse_read = 15;
constexpr std::uint32_t fuse_init = 26;
constexpr std::size_t fuse_in_header_size = 40;
constexpr std::size_t fuse_out_header_size = 16;

/// A FUSE request: fuse_in_header {len, opcode, unique, nodeid, uid, gid,
/// pid, total_extlen, padding}, then `args`.
bytes fuse_request(std::uint32_t opcode, std::uint64_t unique, std::uint64_t nodeid, const bytes& args) {
    bytes b;
    put<std::uint32_t>(b, 0, static_cast<std::uint32_t>(fuse_in_header_size + args.size()));
    put<std::uint32_t>(b, 4, opcode);
    put<std::uint64_t>(b, 8, unique);
    put<std::uint64_t>(b, 16, nodeid);
    put<std::uint64_t>(b, 24, 0); // uid, gid
    put<std::uint64_t>(b, 32, 0); // pid, total_extlen, padding
    b.insert(b.end(), args.begin(), args.end());
    return b;
}

/// fuse_out_header {len, error, unique} of a reply.
struct fuse_reply {
    std::uint32_t len;
    std::int32_t error;
    std::uint64_t unique;
};
fuse_reply reply_header(const bytes& b) {
    return {get<std::uint32_t>(b, 0), static_cast<std::int32_t>(get<std::uint32_t>(b, 4)), get<std::uint64_t>(b, 8)};
}

/// virtiofsd, serving `share`.
std::unique_ptr<qomem_test::backend_process> start_virtiofsd(const qomem_test::temp_dir& dir,
                                                              const std::string& share) {
    std::vector<std::string> argv;
    std::string sandbox = "sandbox=chroot";
    if (::geteuid() != 0) {
        argv = {"unshare", "--user", "--map-root-user"};
        sandbox = "sandbox=namespace";
    }
    for (const char* a : {"/usr/lib/qemu/virtiofsd", "--fd={fd}", "-o", "cache=none", "-o"}) argv.emplace_back(a);
    argv.push_back(sandbox);
    argv.emplace_back("-o");
    argv.push_back("source=" + share);
    return std::make_unique<qomem_test::backend_process>(argv, dir / "fs.sock", dir / "virtiofsd.log");
}

} // namespace

TEST_CASE("virtiofsd: handshake, a memory table split by an MMIO hole, FUSE INIT, LOOKUP, OPEN and READ, with "
          "RAM hot-added between two requests carrying the second one's buffers",
          "[vhost-user][backend][virtiofsd]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    qomem_test::temp_dir dir;
    const std::string share = dir / "share";
    REQUIRE(::mkdir(share.c_str(), 0755) == 0);
    const bytes content = qomem_test::pattern(42, 0, 10000);
    {
        std::ofstream f(share + "/hello.txt", std::ios::binary);
        f.write(reinterpret_cast<const char*>(content.data()), static_cast<std::streamsize>(content.size()));
    }
    auto fsd = start_virtiofsd(dir, share);

    qomem_test::vhost_guest g; // 2 MiB at 0, a hole at 0x100000
    const std::uint64_t P = qomem_test::host_page();
    {
        vu::frontend fe(vu::channel::connect(fsd->socket_path()), *g.as);
        // What virtiofsd 7.2 offers and the session uses.
        CHECK(fe.has(protocol_feature::configure_mem_slots));
        CHECK(fe.has(protocol_feature::reply_ack));
        CHECK(fe.has(protocol_feature::mq));
        CHECK(fe.has(protocol_feature::backend_req));
        CHECK(!fe.has(protocol_feature::shmem)); // no device given, and virtiofsd 7.2 has none
        CHECK((fe.features() >> vu::virtio_f_version_1) & 1);
        REQUIRE(fe.queue_num());
        CHECK(*fe.queue_num() >= 2);
        const std::vector<frontend_request> handshake{
            frontend_request::get_features,      frontend_request::get_protocol_features,
            frontend_request::set_protocol_features, frontend_request::get_queue_num,
            frontend_request::get_max_mem_slots, frontend_request::set_backend_req_fd,
            frontend_request::set_owner,         frontend_request::set_features,
            frontend_request::add_mem_reg,       frontend_request::add_mem_reg};
        CHECK(fe.requests_sent() == handshake);

        // The table: RAM on both sides of the hole, one fd, the offsets in it.
        const std::vector<vu::mem_table_entry> table = fe.mem_table();
        REQUIRE(table.size() == 2);
        const auto host = reinterpret_cast<std::uintptr_t>(g.ram0->host_ptr());
        CHECK(table[0].region == vu::mem_region_payload{0, 0x100000, host, 0});
        CHECK(table[1].region ==
              vu::mem_region_payload{0x100000 + P, 0x100000 - P, host + 0x100000 + P, 0x100000 + P});
        // The fd sent is the region's own duplicate of the guest's memfd
        // (make_ram_from_fd keeps one): the same file.
        CHECK(table[0].fd == g.ram0->fd());
        CHECK(table[1].fd == g.ram0->fd());
        struct stat sent {}, guest {};
        REQUIRE(::fstat(table[0].fd, &sent) == 0);
        REQUIRE(::fstat(g.fd_of(*g.ram0), &guest) == 0);
        CHECK((sent.st_dev == guest.st_dev && sent.st_ino == guest.st_ino));
        // Sealed: the back-end cannot shrink the guest's RAM.
        CHECK(::ftruncate(g.fd_of(*g.ram0), 0x1000) == -1);

        // virtio-fs queues: 0 high priority, 1 requests; the rings in RAM below the hole.
        vu::split_virtqueue hiprio(*g.as, 0x10000, 64);
        vu::split_virtqueue requests(*g.as, 0x20000, 64);
        fe.start_vring(0, hiprio.layout());
        fe.start_vring(1, requests.layout());

        // FUSE_INIT: fuse_init_in {major 7, minor 36, max_readahead, flags,
        // flags2, unused[11]}; the reply fuse_init_out (64 bytes).
        bytes init_in;
        put<std::uint32_t>(init_in, 0, 7);
        put<std::uint32_t>(init_in, 4, 36);
        init_in.resize(64);
        g.write(0x30000, fuse_request(fuse_init, 1, 0, init_in));
        std::uint32_t n = submit(fe, requests, 1,
                                 {{0x30000, static_cast<std::uint32_t>(fuse_in_header_size + 64), false},
                                  {0x31000, 0x100, true}});
        bytes out = g.read(0x31000, 0x100);
        CHECK(n == fuse_out_header_size + 64);
        CHECK(reply_header(out).error == 0);
        CHECK(reply_header(out).unique == 1);
        CHECK(get<std::uint32_t>(out, 16) == 7);  // major
        CHECK(get<std::uint32_t>(out, 20) >= 31); // minor

        // LOOKUP "hello.txt" under the root (node 1): fuse_entry_out.
        const std::string name = "hello.txt";
        bytes lookup_args(name.size() + 1);
        std::memcpy(lookup_args.data(), name.c_str(), name.size() + 1);
        const bytes lookup = fuse_request(fuse_lookup, 2, 1, lookup_args);
        g.write(0x32000, lookup);
        n = submit(fe, requests, 1,
                   {{0x32000, static_cast<std::uint32_t>(lookup.size()), false}, {0x33000, 0x200, true}});
        out = g.read(0x33000, 0x200);
        CHECK(n == fuse_out_header_size + 128);
        REQUIRE(reply_header(out).error == 0);
        const auto node = get<std::uint64_t>(out, 16);
        CHECK(node != 0);
        CHECK(get<std::uint64_t>(out, 16 + 40 + 8) == content.size()); // attr.size

        // OPEN it read-only: fuse_open_out {fh, open_flags, padding}.
        bytes open_args(8);
        g.write(0x34000, fuse_request(fuse_open, 3, node, open_args));
        n = submit(fe, requests, 1,
                   {{0x34000, static_cast<std::uint32_t>(fuse_in_header_size + 8), false}, {0x35000, 0x100, true}});
        out = g.read(0x35000, 0x100);
        REQUIRE(reply_header(out).error == 0);
        CHECK(n == fuse_out_header_size + 16);
        const auto fh = get<std::uint64_t>(out, 16);

        // RAM hot-added at 4 GiB: ADD_MEM_REG, acknowledged before the commit returns.
        qomem::memory_region& more = g.add_ram(0x100000000, 1 << 20, "hotplugged");
        CHECK(fe.requests_sent().back() == frontend_request::add_mem_reg);
        CHECK(count(fe.requests_sent(), frontend_request::add_mem_reg) == 3);
        REQUIRE(fe.mem_table().size() == 3);
        CHECK(fe.mem_table()[2].region.guest_phys_addr == 0x100000000);
        CHECK(fe.failure().empty());

        // READ 6000 bytes from offset 1000, request and reply in the new RAM.
        const hwaddr in_at = 0x100000000 + 0x1000, out_at = 0x100000000 + 0x8000;
        bytes read_args;
        put<std::uint64_t>(read_args, 0, fh);
        put<std::uint64_t>(read_args, 8, 1000);  // offset
        put<std::uint32_t>(read_args, 16, 6000); // size
        read_args.resize(40);
        g.write(in_at, fuse_request(fuse_read, 4, node, read_args));
        n = submit(fe, requests, 1,
                   {{in_at, static_cast<std::uint32_t>(fuse_in_header_size + 40), false},
                    {out_at, fuse_out_header_size, true},
                    {out_at + fuse_out_header_size, 6000, true}});
        out = g.read(out_at, fuse_out_header_size + 6000);
        REQUIRE(reply_header(out).error == 0);
        CHECK(n == fuse_out_header_size + 6000);
        CHECK(bytes(out.begin() + fuse_out_header_size, out.end()) ==
              bytes(content.begin() + 1000, content.begin() + 7000));

        // The RAM goes again: REM_MEM_REG; the back-end keeps serving from ram0.
        g.remove_ram(more);
        CHECK(fe.requests_sent().back() == frontend_request::rem_mem_reg);
        CHECK(fe.mem_table().size() == 2);
        put<std::uint64_t>(read_args, 8, 0);
        put<std::uint32_t>(read_args, 16, 100);
        g.write(0x36000, fuse_request(fuse_read, 5, node, read_args));
        n = submit(fe, requests, 1,
                   {{0x36000, static_cast<std::uint32_t>(fuse_in_header_size + 40), false}, {0x37000, 0x100, true}});
        out = g.read(0x37000, fuse_out_header_size + 100);
        REQUIRE(reply_header(out).error == 0);
        CHECK(bytes(out.begin() + fuse_out_header_size, out.end()) == bytes(content.begin(), content.begin() + 100));

        // Nothing the back-end did not negotiate was sent.
        for (frontend_request r : fe.requests_sent()) CHECK(fe.allowed(r));
        CHECK(count(fe.requests_sent(), frontend_request::set_mem_table) == 0);
        CHECK(fe.failure().empty());
        CHECK(fsd->running());
    }
    // The session closed the connection: virtiofsd ends; stopped by its pid otherwise.
    fsd->stop();
}

TEST_CASE("qemu-storage-daemon vhost-user-blk: capacity from GET_CONFIG, sectors written, RAM hot-added "
          "(a new SET_MEM_TABLE without CONFIGURE_MEM_SLOTS), read back into the new RAM and compared",
          "[vhost-user][backend][qsd]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    qomem_test::temp_dir dir;
    const std::string image = dir / "disk.img";
    constexpr std::uint64_t image_size = 1 << 20;
    {
        std::ofstream f(image, std::ios::binary);
        f.seekp(image_size - 1);
        f.put('\0');
    }
    qomem_test::backend_process qsd(
        {"qemu-storage-daemon", "--blockdev", "driver=file,node-name=file0,filename=" + image, "--export",
         "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=fd,addr.str={fd},writable=on"},
        dir / "blk.sock", dir / "qsd.log");

    qomem_test::vhost_guest g;
    {
        vu::frontend_options o;
        o.protocol_features &= ~vu::mask(protocol_feature::configure_mem_slots);
        vu::frontend fe(vu::channel::connect(qsd.socket_path()), *g.as, o);
        CHECK(!fe.has(protocol_feature::configure_mem_slots));
        CHECK(fe.has(protocol_feature::config));
        CHECK(fe.max_mem_slots() == vu::max_mem_table_regions);
        CHECK(count(fe.requests_sent(), frontend_request::set_mem_table) == 1);
        CHECK(fe.mem_table().size() == 2); // split by the hole

        // virtio_blk_config starts with the capacity in 512-byte sectors.
        const bytes config = fe.get_config(0, 8);
        CHECK(get<std::uint64_t>(config, 0) == image_size / 512);

        vu::split_virtqueue q(*g.as, 0x10000, 32);
        fe.start_vring(0, q.layout());

        // OUT (1) to sectors 8..15: virtio_blk_req {type, reserved, sector}, data, status.
        const bytes data = qomem_test::pattern(7, 0, 4096);
        bytes hdr;
        put<std::uint32_t>(hdr, 0, 1);
        put<std::uint32_t>(hdr, 4, 0);
        put<std::uint64_t>(hdr, 8, 8);
        g.write(0x20000, hdr);
        g.write(0x21000, data);
        g.write(0x22000, bytes{std::byte{0xff}});
        submit(fe, q, 0, {{0x20000, 16, false}, {0x21000, 4096, false}, {0x22000, 1, true}});
        CHECK(g.read(0x22000, 1) == bytes{std::byte{0}}); // VIRTIO_BLK_S_OK

        // RAM hot-added: without CONFIGURE_MEM_SLOTS, a whole new SET_MEM_TABLE.
        g.add_ram(0x100000000, 1 << 20, "hotplugged");
        CHECK(count(fe.requests_sent(), frontend_request::set_mem_table) == 2);
        CHECK(count(fe.requests_sent(), frontend_request::add_mem_reg) == 0);
        CHECK(fe.mem_table().size() == 3);

        // IN (0) from sector 8 into the new RAM.
        const hwaddr base = 0x100000000;
        put<std::uint32_t>(hdr, 0, 0);
        g.write(base, hdr);
        g.write(base + 0x2000, bytes{std::byte{0xff}});
        const std::uint32_t n =
            submit(fe, q, 0, {{base, 16, false}, {base + 0x1000, 4096, true}, {base + 0x2000, 1, true}});
        CHECK(n == 4096 + 1);
        CHECK(g.read(base + 0x2000, 1) == bytes{std::byte{0}});
        CHECK(g.read(base + 0x1000, 4096) == data);
        // And the image file has them at 8 * 512.
        std::ifstream f(image, std::ios::binary);
        f.seekg(8 * 512);
        bytes on_disk(4096);
        f.read(reinterpret_cast<char*>(on_disk.data()), 4096);
        CHECK(on_disk == data);

        for (frontend_request r : fe.requests_sent()) CHECK(fe.allowed(r));
        CHECK(fe.failure().empty());
        CHECK(qsd.running());
    }
    qsd.stop();
}
