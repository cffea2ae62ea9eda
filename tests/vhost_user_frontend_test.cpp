// The vhost-user front-end session (qomem/vhost_user/frontend.hpp) against a
// scripted back-end running in a thread of its own, which answers as
// libvhost-user does, records every message and checks each against its own
// model of what the negotiation allows:
//  * whatever the back-end offers, the session sends nothing it did not
//    negotiate (and NEED_REPLY only with REPLY_ACK); a request the session
//    may not send throws before anything is sent;
//  * the table the back-end holds follows the flat view: one entry per
//    writable fd-backed RAM range, MMIO splitting RAM, RAM without an fd, ROM
//    and read-only RAM left out — checked by reading guest memory through the
//    back-end's own copy of the fds;
//  * a back-end that misbehaves (closes, garbles, stalls, refuses) fails the
//    session with a reason, bounded in time; a refusal inside a commit never
//    reaches the memory system;
//  * SET_BACKEND_REQ_FD: SHMEM_MAP, MEM_READ and GET_SHMEM_CONFIG reach the
//    device, also while the session waits for a reply.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
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
using preason = vu::protocol_reason;

namespace {

constexpr std::uint64_t protocol_bit = std::uint64_t(1) << vu::vhost_user_f_protocol_features;
constexpr std::uint64_t version_1 = std::uint64_t(1) << vu::virtio_f_version_1;

template <class T>
T get(std::span<const std::byte> b, std::size_t at) {
    std::uint64_t v = 0;
    for (std::size_t i = 0; i < sizeof(T); ++i) v |= std::uint64_t(std::to_integer<std::uint8_t>(b[at + i])) << (8 * i);
    return static_cast<T>(v);
}

/// A message as the back-end received it.
struct received {
    std::uint32_t request;
    std::uint32_t flags;
    std::size_t fds;
};

/// A back-end in a thread: answers like libvhost-user, keeps the memory
/// table it is given (with its own copies of the fds), records every message
/// and every violation of the negotiation rules it can see.
class fake_backend {
public:
    struct config {
        std::uint64_t features = version_1 | protocol_bit;
        std::uint64_t protocol_features = 0; ///< offered (when bit 30 is)
        std::uint64_t queue_num = 2;
        std::uint64_t max_slots = 32;
        /// Runs first for each message; returns true when it dealt with it.
        std::function<bool(fake_backend&, const vu::raw_message&)> hook = nullptr;
    };

    explicit fake_backend(config c) : config_(std::move(c)) {
        auto [front, back] = vu::channel::socketpair();
        frontend_end_.emplace(std::move(front));
        back_.emplace(std::move(back));
        thread_ = std::thread([this] { run(); });
    }
    ~fake_backend() {
        if (frontend_end_) frontend_end_.reset(); // never connected: end the thread
        join();
    }
    fake_backend(const fake_backend&) = delete;
    fake_backend& operator=(const fake_backend&) = delete;

    /// The front-end's end of the connection (once).
    vu::channel connect() { return std::move(*std::exchange(frontend_end_, std::nullopt)); }
    /// Waits until the front-end closed the connection and the thread ended.
    void join() {
        if (thread_.joinable()) thread_.join();
    }

    std::vector<received> log() const {
        std::lock_guard l(mutex_);
        return log_;
    }
    std::vector<std::string> violations() const {
        std::lock_guard l(mutex_);
        return violations_;
    }
    std::size_t table_size() const {
        std::lock_guard l(mutex_);
        return table_.size();
    }
    /// Reads `n` bytes at guest address `gpa` through the back-end's table
    /// and fds (as a back-end would); nullopt when the table does not cover them.
    std::optional<bytes> read_guest(hwaddr gpa, std::size_t n) const {
        std::lock_guard l(mutex_);
        for (const auto& [at, e] : table_)
            if (gpa >= at && gpa + n <= at + e.region.memory_size) {
                bytes out(n);
                if (::pread(e.fd.get(), out.data(), n, static_cast<off_t>(e.region.mmap_offset + (gpa - at))) !=
                    static_cast<ssize_t>(n))
                    return std::nullopt;
                return out;
            }
        return std::nullopt;
    }

    // For hooks, on the back-end's thread.
    vu::channel& main() { return *back_; }
    std::optional<vu::channel>& backend_channel() { return backend_ch_; }
    void reply_u64(std::uint32_t req, std::uint64_t v) { back_->send(vu::encode_u64_reply(req, v)); }

private:
    struct entry {
        vu::mem_region_payload region;
        vu::unique_fd fd;
    };

    void violation(std::string what) {
        std::lock_guard l(mutex_);
        violations_.push_back(std::move(what));
    }
    bool negotiated(protocol_feature f) const { return acked_ & vu::mask(f); }

    void run() {
        try {
            while (std::optional<vu::raw_message> m = back_->receive(1 << 16)) serve(*m);
        } catch (const std::exception& e) {
            violation(fmt::format("the back-end's channel broke: {}", e.what()));
        }
    }

    /// The rules, as this back-end checks them (its own model, independent
    /// of the session's table).
    void check(std::uint32_t req, std::uint32_t flags) {
        const auto need = [&](bool ok, const char* what) {
            if (!ok) violation(fmt::format("request {} without {}", req, what));
        };
        switch (req) {
        case 15:
        case 16: need(config_.features & protocol_bit, "bit 30 offered"); break;
        case 18: need(set_features_ & protocol_bit, "bit 30 in SET_FEATURES"); break;
        case 17: need(negotiated(protocol_feature::mq), "MQ"); break;
        case 21: need(negotiated(protocol_feature::backend_req), "BACKEND_REQ"); break;
        case 24: need(negotiated(protocol_feature::config), "CONFIG"); break;
        case 36:
        case 37:
        case 38: need(negotiated(protocol_feature::configure_mem_slots), "CONFIGURE_MEM_SLOTS"); break;
        case 44: need(negotiated(protocol_feature::shmem), "SHMEM"); break;
        case 1: case 2: case 3: case 5: case 8: case 9: case 10: case 11: case 12: case 13: break;
        default: violation(fmt::format("request {}, which the session never sends", req));
        }
        if ((flags & vu::flag_need_reply) && !negotiated(protocol_feature::reply_ack))
            violation(fmt::format("NEED_REPLY on request {} without REPLY_ACK", req));
    }

    void serve(vu::raw_message& m) {
        const vu::msg_header h = vu::decode_header(m.bytes);
        const std::span<const std::byte> p(m.bytes.data() + vu::header_size, h.size);
        {
            std::lock_guard l(mutex_);
            log_.push_back({h.request, h.flags, m.fds.size()});
        }
        check(h.request, h.flags);
        if (config_.hook && config_.hook(*this, m)) return;
        bool answered = false;
        const auto answer = [&](std::uint64_t v) {
            reply_u64(h.request, v);
            answered = true;
        };
        switch (h.request) {
        case 1: answer(config_.features); break;
        case 15: answer(config_.protocol_features); break;
        case 16: acked_ = get<std::uint64_t>(p, 0); break;
        case 2: set_features_ = get<std::uint64_t>(p, 0); break;
        case 17: answer(config_.queue_num); break;
        case 36: answer(config_.max_slots); break;
        case 21:
            if (m.fds.size() == 1) backend_ch_.emplace(std::move(m.fds[0]));
            break;
        case 5: {
            std::lock_guard l(mutex_);
            table_.clear();
            const auto n = get<std::uint32_t>(p, 0);
            if (n != m.fds.size()) violation("SET_MEM_TABLE with fds not one per region");
            for (std::uint32_t i = 0; i < n && i < m.fds.size(); ++i) {
                const std::size_t at = 8 + 32 * i;
                vu::mem_region_payload r{get<std::uint64_t>(p, at), get<std::uint64_t>(p, at + 8),
                                         get<std::uint64_t>(p, at + 16), get<std::uint64_t>(p, at + 24)};
                table_[r.guest_phys_addr] = entry{r, std::move(m.fds[i])};
            }
            break;
        }
        case 37:
        case 38: {
            const vu::mem_region_payload r{get<std::uint64_t>(p, 8), get<std::uint64_t>(p, 16),
                                           get<std::uint64_t>(p, 24), get<std::uint64_t>(p, 32)};
            std::lock_guard l(mutex_);
            if (h.request == 37) {
                if (m.fds.size() != 1) violation("ADD_MEM_REG without exactly one fd");
                if (!m.fds.empty()) table_[r.guest_phys_addr] = entry{r, std::move(m.fds[0])};
            } else {
                if (!m.fds.empty()) violation("REM_MEM_REG with an fd (upstream recommends none)");
                auto it = table_.find(r.guest_phys_addr);
                if (it == table_.end() || !(it->second.region == r))
                    violation(fmt::format("REM_MEM_REG of 0x{:x}, which the table does not hold", r.guest_phys_addr));
                else
                    table_.erase(it);
            }
            break;
        }
        case 24: {
            const auto size = get<std::uint32_t>(p, 4);
            bytes reply(p.begin(), p.end());
            for (std::uint32_t i = 0; i < size; ++i) reply[12 + i] = static_cast<std::byte>(0xc0 + i);
            std::vector<std::byte> msg = vu::detail::start(h.request, vu::version | vu::flag_reply);
            msg.insert(msg.end(), reply.begin(), reply.end());
            back_->send(vu::detail::finish(std::move(msg)));
            answered = true;
            break;
        }
        case 44: {
            vu::shmem_config_payload c{};
            c.nregions = 1;
            c.memory_sizes[0] = 16 * qomem_test::host_page();
            back_->send(vu::encode_shmem_config_reply(c));
            answered = true;
            break;
        }
        case 11: {
            std::vector<std::byte> msg = vu::detail::start(h.request, vu::version | vu::flag_reply);
            vu::detail::put_le(msg, get<std::uint32_t>(p, 0)); // index
            vu::detail::put_le(msg, std::uint32_t{0});         // the next available index
            back_->send(vu::detail::finish(std::move(msg)));
            answered = true;
            break;
        }
        default: break;
        }
        if (!answered && (h.flags & vu::flag_need_reply)) reply_u64(h.request, 0);
    }

    config config_;
    std::optional<vu::channel> frontend_end_;
    std::optional<vu::channel> back_;
    std::optional<vu::channel> backend_ch_;
    std::thread thread_;
    std::uint64_t acked_ = 0;
    std::uint64_t set_features_ = 0;
    mutable std::mutex mutex_;
    std::vector<received> log_;
    std::vector<std::string> violations_;
    std::map<hwaddr, entry> table_;
};

/// A region placed in a container, taken out again when this goes.
class placed {
public:
    placed(qomem::memory_region& container, hwaddr at, qomem::ref_ptr<qomem::memory_region> r)
        : region_(std::move(r)) {
        container.add_subregion(at, *region_);
    }
    ~placed() {
        if (qomem::memory_region* c = region_->container()) c->del_subregion(*region_);
    }
    placed(const placed&) = delete;
    placed& operator=(const placed&) = delete;
    qomem::memory_region& operator*() const { return *region_; }

private:
    qomem::ref_ptr<qomem::memory_region> region_;
};

/// Requires `f` to throw protocol_error for `why` with `needle` in its message.
template <class F>
void require_protocol_error(F&& f, preason why, const std::string& needle) {
    try {
        f();
    } catch (const vu::protocol_error& e) {
        INFO("message: " << e.what());
        CHECK(e.why() == why);
        CHECK_THAT(e.what(), Catch::Matchers::Contains(needle));
        return;
    }
    FAIL("no protocol_error");
}

/// Requires the back-end to see what the guest wrote at each of `addrs`.
void require_shared(qomem_test::vhost_guest& g, const fake_backend& b, std::initializer_list<hwaddr> addrs) {
    unsigned seed = 1;
    for (hwaddr a : addrs) {
        const bytes data = qomem_test::pattern(seed++, a, 64);
        g.write(a, data);
        INFO("guest address 0x" << std::hex << a);
        CHECK(b.read_guest(a, data.size()) == std::optional<bytes>(data));
    }
}

} // namespace

TEST_CASE("whatever the back-end offers, the session sends only what was negotiated, and a request it may "
          "not send throws before anything goes out",
          "[vhost-user][frontend]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    struct offer {
        const char* name;
        std::uint64_t features;
        std::uint64_t protocol;
    };
    const std::uint64_t all = vu::frontend::supported_protocol_features | vu::mask(protocol_feature::status) |
                              vu::mask(protocol_feature::gpa_addresses);
    const offer o = GENERATE_COPY(values<offer>({
        {"no protocol features at all (no bit 30)", version_1, 0},
        {"bit 30, no protocol feature", version_1 | protocol_bit, 0},
        {"REPLY_ACK only", version_1 | protocol_bit, vu::mask(protocol_feature::reply_ack)},
        {"CONFIGURE_MEM_SLOTS without REPLY_ACK", version_1 | protocol_bit,
         vu::mask(protocol_feature::configure_mem_slots)},
        {"MQ, CONFIG and BACKEND_REQ", version_1 | protocol_bit,
         vu::mask({protocol_feature::mq, protocol_feature::config, protocol_feature::backend_req})},
        {"everything, and bits the session does not know", version_1 | protocol_bit, all},
    }));
    INFO("the back-end offers: " << o.name);
    std::vector<std::string> violations;
    std::vector<received> log;
    {
        qomem_test::vhost_guest g;
        fake_backend b({.features = o.features, .protocol_features = o.protocol});
        {
            vu::frontend fe(b.connect(), *g.as);
            CHECK(fe.protocol_features() == (o.features & protocol_bit ? o.protocol & vu::frontend::supported_protocol_features
                                                                        & ~vu::mask(protocol_feature::shmem)
                                                                       : 0));
            CHECK(fe.features() == o.features);
            require_shared(g, b, {0x0, 0x80000, 0x100000 + qomem_test::host_page()});

            // Hot-add and hot-remove RAM; the back-end's table follows.
            qomem::memory_region& more = g.add_ram(0x40000000, 1 << 20, "more");
            require_shared(g, b, {0x40000000, 0x400ff000});
            CHECK(b.table_size() == 3);
            g.remove_ram(more);
            CHECK(b.table_size() == 2);
            require_shared(g, b, {0x1000});

            // A queue: SET_VRING_ENABLE only with bit 30 negotiated.
            vu::split_virtqueue q(*g.as, 0x10000, 16);
            fe.start_vring(0, q.layout());
            CHECK(fe.stop_vring(0) == 0);

            // What was not negotiated throws, and nothing is sent.
            const std::size_t sent = fe.requests_sent().size();
            if (!fe.has(protocol_feature::config))
                require_protocol_error([&] { (void)fe.get_config(0, 8); }, preason::not_negotiated,
                                       "GET_CONFIG needs a feature");
            else
                CHECK(fe.get_config(0, 4) == bytes{std::byte{0xc0}, std::byte{0xc1}, std::byte{0xc2}, std::byte{0xc3}});
            require_protocol_error([&] { (void)fe.get_shmem_config(); }, preason::not_negotiated,
                                   "GET_SHMEM_CONFIG needs a feature");
            CHECK(fe.requests_sent().size() == sent + (fe.has(protocol_feature::config) ? 1 : 0));
            CHECK(fe.failure().empty()); // refusing to send does not fail the session
        }
        b.join();
        violations = b.violations();
        log = b.log();
    }
    CHECK(violations == std::vector<std::string>{});
    // The trace starts as the handshake prescribes.
    REQUIRE(!log.empty());
    CHECK(log.front().request == 1);
    const bool slots = (o.features & protocol_bit) && (o.protocol & vu::mask(protocol_feature::configure_mem_slots));
    const auto sent = [&](std::uint32_t req) {
        return std::any_of(log.begin(), log.end(), [&](const received& r) { return r.request == req; });
    };
    CHECK(sent(5) == !slots);  // SET_MEM_TABLE
    CHECK(sent(37) == slots);  // ADD_MEM_REG
    CHECK(sent(38) == slots);  // REM_MEM_REG
    CHECK(sent(18) == bool(o.features & protocol_bit));
}

TEST_CASE("the back-end's table is one entry per writable fd-backed RAM range: MMIO splits RAM, anonymous "
          "RAM, ROM and read-only RAM are left out",
          "[vhost-user][frontend]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    qomem_test::vhost_guest g;
    const std::uint64_t P = qomem_test::host_page();
    // Around the fd-backed RAM: anonymous RAM, a ROM, and fd-backed RAM made read-only.
    placed anon(*g.sys, 0x10000000, qomem::make_ram(nullptr, "anonymous", 1 << 20));
    placed rom(*g.sys, 0x20000000, qomem::make_rom(nullptr, "rom", 1 << 16));
    qomem::memory_region& ro = g.add_ram(0x30000000, 1 << 20, "read-only");
    ro.set_readonly(true);
    fake_backend b({.protocol_features = vu::mask({protocol_feature::configure_mem_slots, protocol_feature::reply_ack})});
    {
        vu::frontend fe(b.connect(), *g.as);
        const auto table = fe.mem_table();
        REQUIRE(table.size() == 2);
        CHECK(table[0].region.guest_phys_addr == 0);
        CHECK(table[0].region.memory_size == 0x100000);
        CHECK(table[1].region.guest_phys_addr == 0x100000 + P);
        CHECK(table[1].region.mmap_offset == 0x100000 + P);
        CHECK(table[0].mr == g.ram0);
        CHECK(b.table_size() == 2);
        CHECK(!b.read_guest(0x10000000, 8));
        CHECK(!b.read_guest(0x100000, 8)); // the hole

        // The hole moves: both entries change (REM then ADD), the table stays exact.
        const auto before = fe.requests_sent().size();
        ro.set_readonly(false); // now shared
        CHECK(fe.mem_table().size() == 3);
        CHECK(fe.requests_sent().size() == before + 1);
        CHECK(fe.requests_sent().back() == frontend_request::add_mem_reg);
        require_shared(g, b, {0x30000000, 0x300ff000, 0x0, 0x1ff000});
        g.sys->del_subregion(*anon);
        CHECK(fe.requests_sent().size() == before + 1); // anonymous RAM: nothing to tell
    }
    b.join();
    CHECK(b.violations() == std::vector<std::string>{});
}

TEST_CASE("a back-end that misbehaves fails the session with its reason, bounded in time, and the guest's "
          "memory map is never affected",
          "[vhost-user][frontend][hostile]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    qomem_test::vhost_guest g;
    vu::frontend_options quick;
    quick.timeout = std::chrono::milliseconds(300);
    const auto on = [](std::uint32_t req, std::function<void(fake_backend&, const vu::raw_message&)> act) {
        return [req, act](fake_backend& b, const vu::raw_message& m) {
            if (vu::detail::get_le<std::uint32_t>(m.bytes.data()) != req) return false;
            act(b, m);
            return true;
        };
    };
    const auto started = std::chrono::steady_clock::now();

    SECTION("it closes the connection during the handshake") {
        fake_backend b({.hook = on(1, [](fake_backend& fb, const vu::raw_message&) { fb.main().close(); })});
        require_protocol_error([&] { vu::frontend fe(b.connect(), *g.as, quick); }, preason::closed,
                               "closed the connection instead of answering GET_FEATURES");
    }
    SECTION("it never answers") {
        fake_backend b({.hook = on(1, [](fake_backend&, const vu::raw_message&) {})});
        require_protocol_error([&] { vu::frontend fe(b.connect(), *g.as, quick); }, preason::timeout,
                               "no reply to GET_FEATURES within 300 ms");
    }
    SECTION("it answers another request") {
        fake_backend b({.hook = on(1, [](fake_backend& fb, const vu::raw_message&) { fb.reply_u64(15, 0); })});
        require_protocol_error([&] { vu::frontend fe(b.connect(), *g.as, quick); }, preason::bad_payload,
                               "expected the reply to request 1, got request 15");
    }
    SECTION("it answers without the reply flag") {
        fake_backend b({.hook = on(1, [](fake_backend& fb, const vu::raw_message&) {
                            fb.main().send(vu::encode_u64_request(frontend_request::get_features, 1));
                        })});
        require_protocol_error([&] { vu::frontend fe(b.connect(), *g.as, quick); }, preason::bad_payload,
                               "flags 0x1");
    }
    SECTION("its u64 has the wrong size") {
        fake_backend b({.hook = on(1, [](fake_backend& fb, const vu::raw_message&) {
                            std::vector<std::byte> msg = vu::detail::start(1, vu::version | vu::flag_reply);
                            vu::detail::put_le(msg, std::uint32_t{7});
                            fb.main().send(vu::detail::finish(std::move(msg)));
                        })});
        require_protocol_error([&] { vu::frontend fe(b.connect(), *g.as, quick); }, preason::bad_payload,
                               "4 payload bytes, expected a u64");
    }
    SECTION("it announces a huge payload") {
        fake_backend b({.hook = on(1, [](fake_backend& fb, const vu::raw_message&) {
                            std::vector<std::byte> msg = vu::detail::start(1, vu::version | vu::flag_reply);
                            msg[8] = std::byte{0xff};
                            msg[9] = std::byte{0xff};
                            msg[10] = std::byte{0xff};
                            fb.main().send(msg);
                        })});
        require_protocol_error([&] { vu::frontend fe(b.connect(), *g.as, quick); }, preason::oversized,
                               "16777215 bytes announced");
    }
    SECTION("it sends fds with a reply: closed, and refused") {
        const std::size_t fds_before = qomem_test::count_open_fds();
        {
            fake_backend b({.hook = on(1, [](fake_backend& fb, const vu::raw_message&) {
                                const std::array<int, 2> fds{0, 1};
                                fb.main().send(vu::encode_u64_reply(1, version_1), fds);
                            })});
            require_protocol_error([&] { vu::frontend fe(b.connect(), *g.as, quick); }, preason::extra_fds,
                                   "came with 2 fd(s)");
        }
        CHECK(qomem_test::count_open_fds() == fds_before);
    }
    SECTION("it refuses a memory update inside a commit: the commit completes, the session fails") {
        fake_backend b({.protocol_features = vu::mask({protocol_feature::reply_ack,
                                                       protocol_feature::configure_mem_slots}),
                        .hook = [](fake_backend& fb, const vu::raw_message& m) {
                            const vu::msg_header h = vu::decode_header(m.bytes);
                            if (h.request != 37 || vu::detail::get_le<std::uint64_t>(m.bytes.data() + 20) != 0x40000000)
                                return false;
                            fb.reply_u64(37, 22);
                            return true;
                        }});
        vu::frontend fe(b.connect(), *g.as, quick);
        qomem::memory_region& more = g.add_ram(0x40000000, 1 << 20, "refused");
        // The guest has its RAM; the session has failed and says why.
        g.write(0x40000000, qomem_test::bytes_of("still RAM"));
        CHECK(g.read(0x40000000, 9) == qomem_test::bytes_of("still RAM"));
        CHECK_THAT(fe.failure(), Catch::Matchers::Contains("the back-end answered ADD_MEM_REG with 22"));
        vu::split_virtqueue q(*g.as, 0x10000, 16);
        require_protocol_error([&] { fe.start_vring(0, q.layout()); }, preason::closed, "failed earlier");
        g.remove_ram(more); // no message: the session is closed
        CHECK(fe.requests_sent().back() == frontend_request::add_mem_reg);
    }
    SECTION("a table larger than the back-end's slots") {
        fake_backend b({.protocol_features = vu::mask(protocol_feature::configure_mem_slots), .max_slots = 2});
        vu::frontend fe(b.connect(), *g.as, quick);
        CHECK(fe.max_mem_slots() == 2);
        g.add_ram(0x40000000, 1 << 20, "one too many");
        CHECK_THAT(fe.failure(), Catch::Matchers::Contains("3 entries, the back-end takes 2"));
    }
    SECTION("a ring outside the shared RAM") {
        fake_backend b({});
        vu::frontend fe(b.connect(), *g.as, quick);
        placed anon(*g.sys, 0x10000000, qomem::make_ram(nullptr, "anonymous", 1 << 20));
        vu::split_virtqueue q(*g.as, 0x10000000, 16);
        require_protocol_error([&] { fe.start_vring(0, q.layout()); }, preason::not_shared,
                               "the descriptor table at 0x10000000");
        CHECK(fe.failure().empty());
    }
    CHECK(std::chrono::steady_clock::now() - started < std::chrono::seconds(3));
}

TEST_CASE("the back-end's request channel: SHMEM_MAP reaches the device and GET_SHMEM_CONFIG its regions, "
          "MEM_READ reaches guest memory, and requests are served while the session waits for a reply",
          "[vhost-user][frontend]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    const std::uint64_t P = qomem_test::host_page();
    qomem_test::vhost_guest g;
    auto root = qomem::container::make_root();
    auto dev = qomem::make<qomem_test::shmem_test_device>();
    root->add_child("fs", *dev);
    qomem::virtio_shmem& shm = dev->declare_shmem(0, 16 * P);
    g.sys->add_subregion(0xfe000000, shm.region());
    const bytes file = qomem_test::pattern(3, 0, 2 * P);
    qomem_test::unique_fd window = qomem_test::memfd_with(2 * P, file);
    const std::uint64_t offered =
        vu::mask({protocol_feature::backend_req, protocol_feature::backend_send_fd, protocol_feature::reply_ack,
                  protocol_feature::shmem, protocol_feature::config, protocol_feature::qomem_mem_access});
    {
        // While the session waits for GET_CONFIG's answer, the back-end maps
        // a window and waits for the reply to that first.
        std::atomic<std::uint64_t> map_status{99};
        fake_backend b({.protocol_features = offered,
                        .hook = [&](fake_backend& fb, const vu::raw_message& m) {
                            if (vu::detail::get_le<std::uint32_t>(m.bytes.data()) != 24) return false;
                            vu::channel& ch = *fb.backend_channel();
                            const std::array<int, 1> fd{window.get()};
                            ch.send(vu::encode_shmem_map(
                                        vu::make_mmap_payload(0, 0, 4 * P, 2 * P, qomem::shmem_flags::read_write), true),
                                    fd);
                            const auto reply = ch.receive(64, std::chrono::seconds(2));
                            map_status = reply ? vu::decode_u64_reply(reply->bytes, 9) : 98;
                            return false; // and answer GET_CONFIG as usual
                        }});
        vu::frontend fe(b.connect(), *g.as, {}, dev.get());
        CHECK(fe.has(protocol_feature::shmem));
        CHECK(fe.has(protocol_feature::qomem_mem_access));
        const vu::shmem_config_payload c = fe.get_shmem_config();
        CHECK(c.count() == 1);
        CHECK(c.memory_sizes[0] == 16 * P);

        CHECK(fe.get_config(0, 2).size() == 2);
        CHECK(map_status.load() == 0);
        bytes seen(2 * P);
        CHECK(g.as->read(0xfe000000 + 4 * P, seen.data(), seen.size()) == qomem::memtx_ok);
        CHECK(seen == file);
        CHECK(shm.active_mappings() == 1);
        CHECK(fe.failure().empty());
    }
    {
        // Requests sent while nothing waits: serve_backend_requests.
        fake_backend b({.protocol_features = offered});
        vu::frontend fe(b.connect(), *g.as, {}, dev.get());
        vu::channel& ch = *b.backend_channel(); // set during the handshake
        g.write(0x2000, qomem_test::bytes_of("guest RAM"));
        ch.send(vu::encode_mem_read(0x2000, 9));
        ch.send(vu::encode_shmem_unmap(vu::make_mmap_payload(0, 0, 4 * P, 2 * P, qomem::shmem_flags::read_only), true));
        ch.send(vu::encode_shmem_unmap(vu::make_mmap_payload(0, 0, 4 * P, 2 * P, qomem::shmem_flags::read_only), true));
        CHECK(fe.serve_backend_requests(std::chrono::milliseconds(200)) == 3);
        const auto read = ch.receive(4096, std::chrono::seconds(1));
        REQUIRE(read);
        CHECK(bytes(read->bytes.end() - 9, read->bytes.end()) == qomem_test::bytes_of("guest RAM"));
        CHECK(vu::decode_u64_reply(ch.receive(64, std::chrono::seconds(1))->bytes, 10) == 0);
        CHECK(vu::decode_u64_reply(ch.receive(64, std::chrono::seconds(1))->bytes, 10) == EINVAL); // gone already
        CHECK_THAT(fe.last_backend_error(), Catch::Matchers::Contains("no mapping is exactly"));
        CHECK(shm.active_mappings() == 0);
    }
    {
        // Without qomem's MEM access feature, MEM_READ is not negotiated: refused.
        fake_backend b({.protocol_features = offered & ~vu::mask(protocol_feature::qomem_mem_access)});
        vu::frontend fe(b.connect(), *g.as, {}, dev.get());
        vu::channel& ch = *b.backend_channel();
        ch.send(vu::encode_mem_read(0x2000, 9));
        CHECK(fe.serve_backend_requests(std::chrono::milliseconds(200)) == 1);
        CHECK(vu::decode_u64_reply(ch.receive(64, std::chrono::seconds(1))->bytes, 11) == EINVAL);
        CHECK_THAT(fe.last_backend_error(), Catch::Matchers::Contains("MEM_READ) without its protocol feature"));
    }
    g.sys->del_subregion(shm.region());
    qomem::unparent(*dev);
}
