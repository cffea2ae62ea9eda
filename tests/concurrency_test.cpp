// Tests for the lock-free read side: qomem/rcu.hpp on its own, then reader
// threads reading, finding and DMA-mapping through an address space while one
// writer thread (QEMU's big-lock holder) changes the topology under them.
//
// Catch2 v2 assertions are not thread-safe: threads other than the test's own
// record what they saw (atomics, or a mutex-protected failure_log) and the
// test checks it after joining them.
//
// Built and run under ThreadSanitizer by `make test-tsan`; the stress test
// does fewer topology changes under a sanitizer.
#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <latch>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/core.h>
#include <fmt/format.h>

#include <qomem/address_space.hpp>
#include <qomem/assert.hpp>
#include <qomem/device.hpp>
#include <qomem/machine.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/object.hpp>
#include <qomem/rcu.hpp>
#include <qomem/tlb.hpp>

using qomem::hwaddr;
using namespace std::chrono_literals;

namespace {

// The stress test's writer: how many topology changes, at most how long,
// and the pause after each change that leaves the readers time to read
// (sanitized readers are many times slower).
#if defined(__SANITIZE_THREAD__)
constexpr int topology_changes = 2000;
constexpr auto stress_time_budget = 4s;
constexpr auto writer_pause = 200us;
#elif defined(__SANITIZE_ADDRESS__)
constexpr int topology_changes = 2000;
constexpr auto stress_time_budget = 4s;
constexpr auto writer_pause = 50us;
#else
constexpr int topology_changes = 8000;
constexpr auto stress_time_budget = 2s;
constexpr auto writer_pause = 20us;
#endif

/// The reclaim function of the rcu tests: `p` is a std::atomic<bool> flag.
void set_flag(void* p) { static_cast<std::atomic<bool>*>(p)->store(true); }

/// Joins a thread on every way out of a test, so a failed REQUIRE does not
/// destroy a joinable std::thread (which would terminate).
class joining_thread {
public:
    template <class F>
    explicit joining_thread(F&& f) : t_(std::forward<F>(f)) {}
    ~joining_thread() { join(); }
    joining_thread(const joining_thread&) = delete;
    joining_thread& operator=(const joining_thread&) = delete;
    void join() {
        if (t_.joinable()) t_.join();
    }
    std::thread::id id() const noexcept { return t_.get_id(); }

private:
    std::thread t_;
};

/// What threads other than the test's report: a count and the first few messages.
class failure_log {
public:
    void add(std::string what) {
        std::lock_guard lock(mutex_);
        ++count_;
        if (first_.size() < 8) first_.push_back(std::move(what));
    }
    std::size_t count() const {
        std::lock_guard lock(mutex_);
        return count_;
    }
    std::string describe() const {
        std::lock_guard lock(mutex_);
        std::string out;
        for (const std::string& s : first_) out += s + "\n";
        return out;
    }

private:
    mutable std::mutex mutex_;
    std::size_t count_ = 0;
    std::vector<std::string> first_;
};

/// True if the `n` bytes at `p` are all `value`.
bool all_equal(const std::uint8_t* p, std::size_t n, std::uint8_t value) {
    return std::all_of(p, p + n, [&](std::uint8_t x) { return x == value; });
}

/// xorshift64: cheap, per thread, reproducible from its seed.
class rng {
public:
    explicit rng(std::uint64_t seed) : s_(seed | 1) {}
    std::uint64_t next() noexcept {
        s_ ^= s_ << 13;
        s_ ^= s_ >> 7;
        s_ ^= s_ << 17;
        return s_;
    }
    std::size_t below(std::size_t n) noexcept { return static_cast<std::size_t>(next() % n); }

private:
    std::uint64_t s_;
};

/// A device that reports when it is finalized, and on which thread.
class watched_card : public qomem::device {
    QOMEM_OBJECT(watched_card, "test-watched-card", qomem::device)
public:
    struct watch {
        std::thread::id finalized_on; // written before `finalized` is set
        std::atomic<bool> finalized{false};
    };
    explicit watched_card(watch* w = nullptr) noexcept : watch_(w) {}
    ~watched_card() override {
        if (watch_) {
            watch_->finalized_on = std::this_thread::get_id();
            watch_->finalized.store(true, std::memory_order_release);
        }
    }

private:
    watch* watch_;
};

} // namespace

// ============================================================================
// rcu.hpp
// ============================================================================

TEST_CASE("rcu: an object retired while a reader thread is inside a read section begun before "
          "the retire is not reclaimed until that reader leaves, and is reclaimed once it has",
          "[rcu]") {
    std::atomic<bool> reclaimed{false};
    std::atomic<bool> reclaimed_seen_inside{true};
    std::latch inside{1}, may_leave{1}, left{1}, may_exit{1};

    joining_thread reader([&] {
        {
            qomem::rcu::read_guard g;
            inside.count_down();
            may_leave.wait();
            reclaimed_seen_inside.store(reclaimed.load());
        }
        left.count_down();
        may_exit.wait(); // still registered as a reader, but quiescent
    });
    inside.wait();
    qomem::rcu::retire(&reclaimed, &set_flag); // reclaims what is already safe: not this
    qomem::rcu::reclaim();
    CHECK_FALSE(reclaimed.load());

    may_leave.count_down();
    left.wait();
    qomem::rcu::reclaim(); // one pass: no reader is inside any more
    CHECK(reclaimed.load());
    may_exit.count_down();
    reader.join();
    CHECK_FALSE(reclaimed_seen_inside.load());
}

TEST_CASE("rcu: a read section begun after the retire does not hold back reclamation", "[rcu]") {
    std::atomic<bool> reclaimed{false};
    std::latch old_inside{1}, new_inside{1}, old_may_leave{1}, old_left{1}, new_may_leave{1};

    joining_thread old_reader([&] {
        {
            qomem::rcu::read_guard g;
            old_inside.count_down();
            old_may_leave.wait();
        }
        old_left.count_down();
    });
    old_inside.wait();
    qomem::rcu::retire(&reclaimed, &set_flag);

    joining_thread new_reader([&] {
        qomem::rcu::read_guard g;
        new_inside.count_down();
        new_may_leave.wait();
    });
    new_inside.wait();
    qomem::rcu::reclaim();
    CHECK_FALSE(reclaimed.load()); // the old reader may still see it

    old_may_leave.count_down();
    old_left.wait();
    qomem::rcu::reclaim();
    CHECK(reclaimed.load()); // the new reader began after the retire: it cannot see it
    new_may_leave.count_down();
}

TEST_CASE("rcu: read sections nest, and only the outermost unlock leaves the section", "[rcu]") {
    SECTION("on this thread") {
        CHECK_FALSE(qomem::rcu::in_read_section());
        {
            qomem::rcu::read_guard outer;
            {
                qomem::rcu::read_guard inner;
                CHECK(qomem::rcu::in_read_section());
            }
            CHECK(qomem::rcu::in_read_section());
        }
        CHECK_FALSE(qomem::rcu::in_read_section());
    }
    SECTION("a reader thread that left only its inner section still holds back reclamation") {
        std::atomic<bool> reclaimed{false};
        std::atomic<bool> inside_after_inner{false};
        std::latch inner_left{1}, may_leave{1}, outer_left{1}, may_exit{1};

        joining_thread reader([&] {
            qomem::rcu::read_lock();
            qomem::rcu::read_lock();
            qomem::rcu::read_unlock();
            inside_after_inner.store(qomem::rcu::in_read_section());
            inner_left.count_down();
            may_leave.wait();
            qomem::rcu::read_unlock();
            outer_left.count_down();
            may_exit.wait();
        });
        inner_left.wait();
        qomem::rcu::retire(&reclaimed, &set_flag);
        qomem::rcu::reclaim();
        CHECK_FALSE(reclaimed.load());

        may_leave.count_down();
        outer_left.wait();
        qomem::rcu::reclaim();
        CHECK(reclaimed.load());
        may_exit.count_down();
        reader.join();
        CHECK(inside_after_inner.load());
    }
}

TEST_CASE("rcu: synchronize waits until a reader thread inside a read section has left it",
          "[rcu]") {
    std::atomic<bool> reclaimed{false};
    std::atomic<bool> reader_leaving{false};
    std::latch inside{1};

    joining_thread reader([&] {
        qomem::rcu::read_guard g;
        inside.count_down();
        std::this_thread::sleep_for(50ms); // synchronize is waiting meanwhile
        reader_leaving.store(true);
    });
    inside.wait();
    qomem::rcu::retire(&reclaimed, &set_flag);
    qomem::rcu::synchronize();
    CHECK(reader_leaving.load());
    CHECK(reclaimed.load());
}

TEST_CASE("rcu: synchronize inside a read section, and read_unlock outside one, are reported as "
          "misuse",
          "[rcu][misuse]") {
    qomem::scoped_assertion_handler guard{qomem::throwing_assertion_handler};
    SECTION("synchronize inside a read section would wait for itself") {
        qomem::rcu::read_guard g;
        REQUIRE_THROWS_AS(qomem::rcu::synchronize(), qomem::assertion_failure);
        CHECK(qomem::rcu::in_read_section()); // nothing changed
    }
    SECTION("read_unlock without a read section") {
        REQUIRE_THROWS_AS(qomem::rcu::read_unlock(), qomem::assertion_failure);
        CHECK_FALSE(qomem::rcu::in_read_section());
        qomem::rcu::read_guard g; // still balanced afterwards
        CHECK(qomem::rcu::in_read_section());
    }
    CHECK_FALSE(qomem::rcu::in_read_section());
    qomem::rcu::synchronize();
}

// ============================================================================
// Readers against a writer
// ============================================================================

namespace {

/// The guest-physical layout of the stress machine. Every RAM region is
/// filled with its own byte, so one byte read tells which region answered;
/// a hole reads as 0. Everything is placed on 4 KiB pages and every read of
/// the readers stays within one page, so a single read must be uniform.
namespace layout {
constexpr hwaddr page = 0x1000;

constexpr hwaddr ram_a = 0x00000; // 64 KiB, 0xa1, always there
constexpr hwaddr ram_b = 0x10000; // 64 KiB, 0xb2, added and deleted
constexpr hwaddr mmio = 0x20000;  // 4 KiB of MMIO reading 0x5a
constexpr hwaddr ram_c = 0x30000; // 16 KiB, page p filled with 0xc0 + p
constexpr hwaddr pair_lo = 0x40000; // 4 KiB, 0xd1 } enabled and disabled
constexpr hwaddr pair_hi = 0x41000; // 4 KiB, 0xd2 } in one transaction
constexpr hwaddr hot = 0x50000;   // 8 KiB, 0xe5, a fresh device plugged and unplugged
constexpr hwaddr scratch = 0x60000; // one page per reader, written by that reader only

/// "win": an alias of one page of ram_c (0xc0..0xc3, by its alias offset),
/// at priority 1, moved between these pages and enabled or disabled.
constexpr std::array<hwaddr, 3> window_at{0x04000, 0x14000, 0x24000};

/// The byte each region is filled with (ram_c: fill_c0 + page index).
constexpr std::uint8_t fill_a = 0xa1, fill_b = 0xb2, fill_io = 0x5a, fill_c0 = 0xc0, fill_lo = 0xd1,
                       fill_hi = 0xd2, fill_hot = 0xe5;

/// The pages the readers probe.
constexpr std::array<hwaddr, 20> probes{0x00000, 0x03000, 0x04000, 0x05000, 0x0f000,
                                        0x10000, 0x14000, 0x1f000, 0x20000, 0x24000,
                                        0x25000, 0x30000, 0x31000, 0x32000, 0x33000,
                                        0x40000, 0x41000, 0x50000, 0x51000, 0x70000};

/// True if `byte` can be read on guest page `p` in some topology the writer
/// makes (0: a hole).
bool legit(hwaddr p, std::uint8_t byte) {
    if (std::find(window_at.begin(), window_at.end(), p) != window_at.end() && byte >= fill_c0 &&
        byte <= fill_c0 + 3)
        return true;
    if (p < ram_b) return byte == fill_a;
    if (p < mmio) return byte == fill_b || byte == 0;
    if (p == mmio) return byte == fill_io;
    if (p >= ram_c && p < ram_c + 4 * page) return byte == fill_c0 + (p - ram_c) / page;
    if (p == pair_lo) return byte == fill_lo || byte == 0;
    if (p == pair_hi) return byte == fill_hi || byte == 0;
    if (p == hot || p == hot + page) return byte == fill_hot || byte == 0;
    return byte == 0;
}
} // namespace layout

/// MMIO that reads 0x5a in every byte, whatever the access size. Thread-safe.
struct constant_regs {
    static constexpr qomem::access_limits valid{.min_access_size = 1, .max_access_size = 8};
    static constexpr qomem::access_limits impl{.min_access_size = 1, .max_access_size = 8};
    std::atomic<std::uint64_t> reads{0};
    std::uint64_t read(hwaddr, unsigned) {
        reads.fetch_add(1, std::memory_order_relaxed);
        return 0x5a5a5a5a5a5a5a5aULL;
    }
    void write(hwaddr, std::uint64_t, unsigned) {}
};

/// The stress machine's fixed hardware: its regions are the board's
/// children (so counted), the ops object is the board's (so it outlives them).
class board_card : public qomem::device {
    QOMEM_OBJECT(board_card, "test-board", qomem::device)
public:
    board_card() = default;
    constant_regs regs;
};

/// What the readers saw of the topology, to check the test did race.
enum observed : unsigned {
    saw_b_present = 1u << 0,
    saw_b_absent = 1u << 1,
    saw_pair_on = 1u << 2,
    saw_pair_off = 1u << 3,
    saw_window = 1u << 4,
    saw_hot_present = 1u << 5,
    saw_hot_absent = 1u << 6,
};

struct reader_stats {
    std::atomic<std::uint64_t> reads{0}, maps{0}, bounced{0}, refused{0}, finds{0}, dma_writes{0},
        tlb_accesses{0}, tlb_fills{0};
    std::atomic<unsigned> observed{0};
};

/// The machine of `layout`. Its member functions are the writer's changes,
/// made on the test's thread; the readers use as() from theirs.
class stress_machine {
public:
    static constexpr unsigned readers = 2;

    stress_machine() {
        auto b = qomem::make<board_card>();
        machine_.peripheral().add_child("board", *b);
        board_ = b.get();
        system_ = qomem::make_container(nullptr, "system", qomem::u128_2_64);

        // Each region is made with a temporary handle and kept as a plain
        // pointer: its child property in the board holds it.
        auto fill = [](qomem::memory_region& mr, std::uint8_t byte) {
            std::memset(mr.host_ptr(), byte, static_cast<std::size_t>(mr.size()));
            return &mr;
        };
        ram_a_ = fill(*qomem::make_ram(*board_, "ram-a", 0x10000), layout::fill_a);
        ram_b_ = fill(*qomem::make_ram(*board_, "ram-b", 0x10000), layout::fill_b);
        ram_c_ = qomem::make_ram(*board_, "ram-c", 4 * layout::page).get();
        for (hwaddr p = 0; p < 4; ++p)
            std::memset(ram_c_->host_ptr() + p * layout::page,
                        static_cast<int>(layout::fill_c0 + p), layout::page);
        mmio_ = qomem::make_io(*board_, "mmio", layout::page, board_->regs).get();
        pair_lo_ = fill(*qomem::make_ram(*board_, "pair-lo", layout::page), layout::fill_lo);
        pair_hi_ = fill(*qomem::make_ram(*board_, "pair-hi", layout::page), layout::fill_hi);
        window_ = qomem::make_alias(*board_, "win", *ram_c_, 0, layout::page).get();
        for (unsigned k = 0; k < readers; ++k) {
            const std::string name = fmt::format("scratch{}", k);
            scratch_[k] = fill(*qomem::make_ram(*board_, name, layout::page), 0);
            scratch_[k]->set_dirty_log(true);
        }

        qomem::memory_transaction tx;
        system_->add_subregion(layout::ram_a, *ram_a_);
        system_->add_subregion(layout::ram_b, *ram_b_);
        system_->add_subregion(layout::mmio, *mmio_);
        system_->add_subregion(layout::ram_c, *ram_c_);
        system_->add_subregion(layout::pair_lo, *pair_lo_);
        system_->add_subregion(layout::pair_hi, *pair_hi_);
        system_->add_subregion(layout::window_at[0], *window_, 1);
        for (unsigned k = 0; k < readers; ++k)
            system_->add_subregion(layout::scratch + k * layout::page, *scratch_[k]);
        as_.emplace(*system_, "memory");
    }

    /// Tears down in the order lifetimes need: the address space (which
    /// holds the root), the root, then the tree, whose finalization takes
    /// the board and all its regions.
    ~stress_machine() {
        if (hot_ram_) unplug_hot();
        as_.reset();
        system_.reset();
        root_.reset();
    }
    stress_machine(const stress_machine&) = delete;
    stress_machine& operator=(const stress_machine&) = delete;

    qomem::address_space& as() { return *as_; }
    qomem::memory_region& scratch(unsigned k) { return *scratch_[k]; }
    constant_regs& regs() { return board_->regs; }

    // ---- the writer's changes (each one commits a new flat view) ---------

    void toggle_ram_b() {
        if (ram_b_->container())
            system_->del_subregion(*ram_b_);
        else
            system_->add_subregion(layout::ram_b, *ram_b_);
    }
    void move_window(rng& r) { window_->set_address(layout::window_at[r.below(3)]); }
    void toggle_window() { window_->set_enabled(!window_->enabled()); }
    void shift_window(rng& r) { window_->set_alias_offset(r.below(4) * layout::page); }
    void toggle_pair() {
        qomem::memory_transaction tx; // readers must see both or neither
        const bool on = !pair_lo_->enabled();
        pair_lo_->set_enabled(on);
        pair_hi_->set_enabled(on);
    }
    /// Plugs a fresh device with 8 KiB of RAM at layout::hot, or unplugs the
    /// one there: deletes the subregion, then unparents the device. A reader
    /// may still have that RAM mapped: the RAM and the device are then
    /// finalized after the reader's unmap, by the writer (memory_region_unref
    /// hands a last reference dropped on another thread to the writer).
    void toggle_hot() {
        if (hot_ram_) {
            unplug_hot();
            return;
        }
        auto dev = qomem::make<watched_card>();
        machine_.peripheral().add_child("hot[*]", *dev);
        auto ram = qomem::make_ram(*dev, "hot-ram", 2 * layout::page);
        std::memset(ram->host_ptr(), layout::fill_hot, 2 * layout::page);
        system_->add_subregion(layout::hot, *ram);
        hot_dev_ = dev.get();
        hot_ram_ = ram.get();
    }

private:
    void unplug_hot() {
        system_->del_subregion(*hot_ram_);
        qomem::unparent(*hot_dev_);
        hot_dev_ = nullptr;
        hot_ram_ = nullptr;
    }

    qomem::ref_ptr<qomem::container> root_ = qomem::container::make_root();
    qomem::machine& machine_ = qomem::add_machine(*root_);
    board_card* board_ = nullptr;
    qomem::ref_ptr<qomem::memory_region> system_; // ownerless, like QEMU's system memory
    qomem::memory_region *ram_a_ = nullptr, *ram_b_ = nullptr, *ram_c_ = nullptr,
                         *mmio_ = nullptr, *pair_lo_ = nullptr, *pair_hi_ = nullptr,
                         *window_ = nullptr;
    std::array<qomem::memory_region*, readers> scratch_{};
    watched_card* hot_dev_ = nullptr;
    qomem::memory_region* hot_ram_ = nullptr;
    std::optional<qomem::address_space> as_;
};

/// One reader thread: reads, finds and maps at random probe pages, loads and
/// fetches them through its own CPU TLB, and DMA writes (and TLB stores to)
/// its own scratch page, checking everything it sees.
class stress_reader {
public:
    stress_reader(stress_machine& m, unsigned id, reader_stats& stats, failure_log& failures)
        : as_(m.as()), id_(id), stats_(stats), failures_(failures),
          rng_(0x9e3779b97f4a7c15ULL * (id + 1)), tlb_(m.as()) {}
    ~stress_reader() { stats_.tlb_fills.fetch_add(tlb_.fills(), std::memory_order_relaxed); }
    stress_reader(const stress_reader&) = delete;
    stress_reader& operator=(const stress_reader&) = delete;

    void run(const std::atomic<bool>& stop, std::latch& started) {
        bool first = true;
        while (!stop.load(std::memory_order_acquire)) {
            step();
            if (first) started.count_down();
            first = false;
        }
        if (held_) release_held();
    }

private:
    void fail(std::string what) { failures_.add(fmt::format("reader {}: {}", id_, what)); }
    void observe(unsigned bit) { stats_.observed.fetch_or(bit, std::memory_order_relaxed); }

    void step() {
        if (held_ && --held_for_ == 0) release_held();
        switch (rng_.below(16)) {
        case 0: read_pair(); break;
        case 1: read_hot(); break;
        case 2:
        case 3: map_probe(); break;
        case 4: find_probe(); break;
        case 5: dma_scratch(); break;
        case 6:
        case 7: tlb_probe(); break;
        case 8: tlb_scratch(); break;
        default: read_probe(); break;
        }
    }

    /// Checks that [data, data + len), read at guest address `addr`, is on
    /// each page one legitimate byte throughout.
    bool check_pages(hwaddr addr, const std::uint8_t* data, std::size_t len, const char* how) {
        std::size_t i = 0;
        while (i < len) {
            const hwaddr page = (addr + i) & ~(layout::page - 1);
            const std::size_t n = std::min<std::size_t>(len - i, page + layout::page - (addr + i));
            const std::uint8_t first = data[i];
            if (!layout::legit(page, first)) {
                fail(fmt::format("{} at {:#x}: byte {:#04x} cannot be on page {:#x}", how, addr + i,
                                 first, page));
                return false;
            }
            for (std::size_t j = i; j < i + n; ++j)
                if (data[j] != first) {
                    fail(fmt::format("{} at {:#x}: torn: {:#04x} at +{:#x} but {:#04x} at +{:#x}",
                                     how, addr, first, i, data[j], j));
                    return false;
                }
            i += n;
        }
        return true;
    }

    void read_probe() {
        const hwaddr page = layout::probes[rng_.below(layout::probes.size())];
        static constexpr std::array<std::size_t, 8> lengths{1, 2, 4, 8, 16, 64, 512, 4096};
        const std::size_t len = lengths[rng_.below(lengths.size())];
        const hwaddr addr = page + rng_.below(layout::page - len + 1);
        const qomem::memtx_result r = as_.read(addr, buf_.data(), len);
        stats_.reads.fetch_add(1, std::memory_order_relaxed);
        if (!check_pages(addr, buf_.data(), len, "read")) return;
        const bool hole = buf_[0] == 0;
        if (r != (hole ? qomem::memtx_decode_error : qomem::memtx_ok))
            fail(fmt::format("read at {:#x}: result {} for byte {:#04x}", addr,
                             static_cast<unsigned>(r), buf_[0]));
        if (page == layout::ram_b) observe(hole ? saw_b_absent : saw_b_present);
        if (buf_[0] >= layout::fill_c0 && buf_[0] <= layout::fill_c0 + 3 && page < layout::ram_c)
            observe(saw_window);
    }

    /// pair-lo and pair-hi change in one transaction: a read across both
    /// sees both or neither.
    void read_pair() {
        const qomem::memtx_result r = as_.read(layout::pair_hi - 8, buf_.data(), 16);
        stats_.reads.fetch_add(1, std::memory_order_relaxed);
        const bool on =
            all_equal(&buf_[0], 8, layout::fill_lo) && all_equal(&buf_[8], 8, layout::fill_hi);
        const bool off = all_equal(&buf_[0], 16, 0);
        if (on ? r != qomem::memtx_ok : off ? r != qomem::memtx_decode_error : true)
            fail(fmt::format("pair read: {:02x} ... {:02x}, result {}: not one transaction",
                             fmt::join(buf_.begin(), buf_.begin() + 8, " "),
                             fmt::join(buf_.begin() + 8, buf_.begin() + 16, " "),
                             static_cast<unsigned>(r)));
        observe(on ? saw_pair_on : saw_pair_off);
    }

    /// The hot device's RAM spans two pages: both or neither.
    void read_hot() {
        const hwaddr addr = layout::hot + layout::page - 8;
        as_.read(addr, buf_.data(), 16);
        stats_.reads.fetch_add(1, std::memory_order_relaxed);
        if (check_pages(addr, buf_.data(), 16, "hot read") && buf_[0] != buf_[15])
            fail(fmt::format("hot read: {:#04x} then {:#04x}", buf_[0], buf_[15]));
        observe(buf_[0] ? saw_hot_present : saw_hot_absent);
    }

    /// Maps up to two pages for reading and holds the mapping for a while,
    /// across topology changes (and perhaps the unplug of its region's
    /// device): its contents must stay what they were when mapped.
    void map_probe() {
        if (held_) return;
        const hwaddr page = layout::probes[rng_.below(layout::probes.size())];
        const hwaddr addr = page + rng_.below(layout::page);
        const hwaddr len = (1 + rng_.below(2)) * layout::page - (addr - page);
        qomem::dma_mapping m = as_.map(addr, len, false);
        stats_.maps.fetch_add(1, std::memory_order_relaxed);
        if (!m) { // a hole, or the bounce budget is in use by the other reader
            stats_.refused.fetch_add(1, std::memory_order_relaxed);
            return;
        }
        if (m.size() > len)
            fail(fmt::format("map at {:#x}: {:#x} bytes for {:#x} asked", addr, m.size(), len));
        if (m.bounced()) stats_.bounced.fetch_add(1, std::memory_order_relaxed);
        const auto* p = reinterpret_cast<const std::uint8_t*>(m.data());
        const auto n = static_cast<std::size_t>(m.size());
        if (!check_pages(addr, p, n, m.bounced() ? "bounced map" : "map")) {
            as_.unmap(m, 0);
            return;
        }
        held_copy_.assign(p, p + n);
        held_addr_ = addr;
        held_ = std::move(m);
        held_for_ = 1 + static_cast<int>(rng_.below(24));
    }

    void release_held() {
        const auto* p = reinterpret_cast<const std::uint8_t*>(held_.data());
        if (std::memcmp(p, held_copy_.data(), held_copy_.size()) != 0)
            fail(fmt::format("mapping at {:#x} changed while held (byte {:#04x} became {:#04x})",
                             held_addr_, held_copy_[0], p[0]));
        as_.unmap(held_, 0);
    }

    void find_probe() {
        const hwaddr page = layout::probes[rng_.below(layout::probes.size())];
        const hwaddr addr = page + rng_.below(layout::page);
        const qomem::found_section s = as_.find(addr, 1);
        stats_.finds.fetch_add(1, std::memory_order_relaxed);
        if (!s) {
            if (!layout::legit(page, 0)) fail(fmt::format("find at {:#x}: nothing there", addr));
            return;
        }
        if (const std::byte* host = s.mr->host_ptr_if_mapped()) {
            const auto byte = std::to_integer<std::uint8_t>(host[s.offset_within_region]);
            if (!layout::legit(page, byte))
                fail(fmt::format("find at {:#x}: region '{}' holds {:#04x}", addr,
                                 s.mr->region_name(), byte));
        } else if (page != layout::mmio || !s.mr->callbacks().ops) {
            fail(fmt::format("find at {:#x}: region '{}' has no memory", addr,
                             s.mr->region_name()));
        }
    }

    /// DMA-writes this reader's own scratch page, then reads it back.
    void dma_scratch() {
        const hwaddr addr = layout::scratch + id_ * layout::page;
        const auto value = static_cast<std::uint8_t>(1 + rng_.below(255));
        qomem::dma_mapping m = as_.map(addr, layout::page, true);
        if (!m || m.bounced() || m.size() != layout::page) {
            fail(fmt::format("scratch map at {:#x}: {:#x} bytes{}", addr, m.size(),
                             m.bounced() ? ", bounced" : ""));
            return;
        }
        std::memset(m.data(), value, layout::page);
        as_.unmap(m, layout::page);
        stats_.dma_writes.fetch_add(1, std::memory_order_relaxed);
        const qomem::memtx_result r = as_.read(addr, buf_.data(), layout::page);
        if (r != qomem::memtx_ok || !all_equal(buf_.data(), layout::page, value))
            fail(fmt::format("scratch at {:#x}: wrote {:#04x} by DMA, read back {:#04x}", addr,
                             value, buf_[0]));
    }

    /// A vCPU's loads and fetches through its TLB, in one read section: a
    /// value is uniform (one page, one region) and legitimate, and a hole
    /// answers a decode error and zeros.
    void tlb_probe() {
        qomem::rcu::read_guard section;
        for (int k = 0; k < 16; ++k) {
            const hwaddr page = layout::probes[rng_.below(layout::probes.size())];
            const hwaddr addr = page + rng_.below(layout::page / 8) * 8;
            std::uint64_t v = 0;
            qomem::memtx_result r;
            if (k % 4 == 3) {
                std::uint32_t insn = 0;
                r = tlb_.fetch<std::uint32_t, qomem::endianness::little>(addr, insn);
                v = insn * 0x100000001ULL;
            } else {
                r = tlb_.ldq_le(addr, v);
            }
            stats_.tlb_accesses.fetch_add(1, std::memory_order_relaxed);
            const auto byte = static_cast<std::uint8_t>(v);
            if (v != byte * 0x0101010101010101ULL || !layout::legit(page, byte) ||
                r != (byte == 0 ? qomem::memtx_decode_error : qomem::memtx_ok)) {
                fail(fmt::format("tlb {} at {:#x}: {:#018x}, result {}", k % 4 == 3 ? "fetch" : "load",
                                 addr, v, static_cast<unsigned>(r)));
                return;
            }
            if (page == layout::hot) observe(byte ? saw_hot_present : saw_hot_absent);
        }
    }

    /// Stores through the TLB to this reader's scratch page (dirty-logged:
    /// never a direct store), and reads them back through the address space.
    void tlb_scratch() {
        const hwaddr addr = layout::scratch + id_ * layout::page + rng_.below(layout::page / 8) * 8;
        const std::uint64_t value = rng_.next();
        {
            qomem::rcu::read_guard section;
            if (tlb_.stq_le(addr, value) != qomem::memtx_ok) fail(fmt::format("tlb store at {:#x}", addr));
            std::uint64_t back = 0;
            if (tlb_.ldq_le(addr, back) != qomem::memtx_ok || back != value)
                fail(fmt::format("tlb load at {:#x}: {:#x}, stored {:#x}", addr, back, value));
        }
        std::uint64_t seen = 0;
        if (as_.ldq_le(addr, seen) != qomem::memtx_ok || seen != value)
            fail(fmt::format("scratch at {:#x}: {:#x} after a TLB store of {:#x}", addr, seen, value));
        stats_.tlb_accesses.fetch_add(2, std::memory_order_relaxed);
    }

    qomem::address_space& as_;
    unsigned id_;
    reader_stats& stats_;
    failure_log& failures_;
    rng rng_;
    qomem::cpu_tlb tlb_;
    std::array<std::uint8_t, 2 * layout::page> buf_{};
    qomem::dma_mapping held_;
    std::vector<std::uint8_t> held_copy_;
    hwaddr held_addr_ = 0;
    int held_for_ = 0;
};

} // namespace

TEST_CASE("concurrency: reader threads reading, finding, DMA-mapping and loading through CPU TLBs "
          "see only legitimate, untorn data while the writer changes the topology thousands of "
          "times, and nothing is left alive afterwards",
          "[concurrency][address_space][rcu]") {
    REQUIRE(qomem::live_object_count() == 0);
    reader_stats stats;
    failure_log failures;
    int changes = 0;
    std::uint64_t dirty_seen = 0;
    std::chrono::steady_clock::duration took{};
    {
        stress_machine m;
        std::atomic<bool> stop{false};
        std::latch started{stress_machine::readers};
        std::vector<std::optional<joining_thread>> threads(stress_machine::readers);
        for (unsigned k = 0; k < stress_machine::readers; ++k)
            threads[k].emplace([&, k] {
                stress_reader r(m, k, stats, failures);
                r.run(stop, started);
            });
        struct stopper { // joins the readers on every way out
            std::atomic<bool>& stop;
            std::vector<std::optional<joining_thread>>& threads;
            ~stopper() {
                stop.store(true, std::memory_order_release);
                for (auto& t : threads) t.reset();
            }
        } stop_readers{stop, threads};
        started.wait();

        rng r(42);
        const auto start = std::chrono::steady_clock::now();
        const auto deadline = start + stress_time_budget;
        for (; changes < topology_changes && std::chrono::steady_clock::now() < deadline;
             ++changes) {
            switch (changes % 6) {
            case 0: m.toggle_ram_b(); break;
            case 1: m.move_window(r); break;
            case 2: m.toggle_window(); break;
            case 3: m.shift_window(r); break;
            case 4: m.toggle_pair(); break;
            case 5: m.toggle_hot(); break;
            }
            if (changes % 32 == 0)
                for (unsigned k = 0; k < stress_machine::readers; ++k)
                    dirty_seen += m.scratch(k).test_and_clear_dirty(0, layout::page);
            // Leave both cores to the readers for a moment: they read each
            // topology many times, and also race the next change.
            std::this_thread::sleep_for(writer_pause);
        }
        took = std::chrono::steady_clock::now() - start;
        stop.store(true, std::memory_order_release);
        for (auto& t : threads) t.reset();
        CHECK(m.regs().reads.load() > 0);
    } // the machine goes: address space, root region, tree

    INFO(fmt::format("{} topology changes in {} ms; reads {}, maps {} ({} bounced, {} refused), "
                     "finds {}, DMA writes {}, dirty scratch seen {} times, TLB accesses {} ({} fills)",
                     changes, std::chrono::duration_cast<std::chrono::milliseconds>(took).count(),
                     stats.reads.load(), stats.maps.load(), stats.bounced.load(),
                     stats.refused.load(), stats.finds.load(), stats.dma_writes.load(),
                     dirty_seen, stats.tlb_accesses.load(), stats.tlb_fills.load()));
    INFO("reader failures:\n" << failures.describe());
    CHECK(failures.count() == 0);
    CHECK(changes >= 300);
    // The readers really raced the writer: they saw both sides of each toggle.
    const unsigned seen = stats.observed.load();
    CHECK((seen & saw_b_present) != 0);
    CHECK((seen & saw_b_absent) != 0);
    CHECK((seen & saw_pair_on) != 0);
    CHECK((seen & saw_pair_off) != 0);
    CHECK((seen & saw_window) != 0);
    CHECK((seen & saw_hot_present) != 0);
    CHECK((seen & saw_hot_absent) != 0);
    CHECK(stats.maps.load() > stats.refused.load());
    CHECK(dirty_seen > 0);
    // The TLBs were refilled after commits (every commit empties them).
    CHECK(stats.tlb_fills.load() > 100);

    qomem::memory_synchronize(); // readers' last references are finalized here
    INFO("live objects: " << [] {
        std::string s;
        for (const auto& [type, n] : qomem::live_objects()) s += fmt::format("{}={} ", type, n);
        return s;
    }());
    REQUIRE(qomem::live_object_count() == 0);
}

TEST_CASE("concurrency: a device unplugged by the writer while a reader thread holds a DMA "
          "mapping of its RAM stays alive until the reader unmaps, and is then finalized by the "
          "thread holding the writer role, not on the reader's thread",
          "[concurrency][address_space][lifetime]") {
    REQUIRE(qomem::live_object_count() == 0);
    watched_card::watch watch;
    std::atomic<bool> finalized_while_mapped{true};
    std::atomic<bool> intact_after_unplug{false};
    std::optional<std::thread::id> reader_id;
    {
        auto root = qomem::container::make_root();
        qomem::machine& machine = qomem::add_machine(*root);
        auto system = qomem::make_container(nullptr, "system", qomem::u128_2_64);
        std::optional<qomem::address_space> as;
        as.emplace(machine.memory(), *system, "memory");

        auto card = qomem::make<watched_card>(&watch);
        machine.peripheral().add_child("card", *card);
        auto ram = qomem::make_ram(*card, "card-ram", 0x2000);
        std::memset(ram->host_ptr(), 0x3c, 0x2000);
        system->add_subregion(0x8000, *ram);
        watched_card* dev = card.get();
        qomem::memory_region* mr = ram.get();
        card.reset(); // from here on the tree and the container hold them
        ram.reset();

        std::latch mapped{1}, unplugged{1};
        std::atomic<bool> map_ok{false};
        joining_thread reader([&] {
            qomem::dma_mapping m = as->map(0x8000, 0x2000, false);
            map_ok.store(m && !m.bounced() && m.size() == 0x2000 && m.region() == mr);
            mapped.count_down();
            unplugged.wait();
            if (!m) return;
            // The region is out of the address space and its device out of
            // the tree, but the mapping still points to live memory.
            finalized_while_mapped.store(watch.finalized.load());
            const auto* p = reinterpret_cast<const std::uint8_t*>(m.data());
            intact_after_unplug.store(all_equal(p, static_cast<std::size_t>(m.size()), 0x3c));
            as->unmap(m, 0); // the last reference: finalizes the region, then the device
        });
        reader_id = reader.id();
        mapped.wait();
        REQUIRE(map_ok.load());

        // This thread is the writer: it holds the role (QEMU's big lock).
        std::unique_lock writer(machine.memory());
        system->del_subregion(*mr);
        qomem::unparent(*dev);
        qomem::rcu::synchronize(); // the old flat views are gone, with their references
        CHECK_FALSE(watch.finalized.load());
        CHECK(mr->ref_count() == 1); // the mapping's
        CHECK(mr->parent() == nullptr);
        CHECK(dev->parent() == nullptr);
        std::uint8_t hole = 0xff;
        CHECK(as->read(0x8000, &hole, 1) == qomem::memtx_decode_error);

        unplugged.count_down();
        reader.join();
        // The reader dropped the last reference; finalizing is topology work,
        // so it was handed to the writer, which runs it when it gives the
        // role back.
        CHECK_FALSE(watch.finalized.load(std::memory_order_acquire));
        writer.unlock();
        CHECK(watch.finalized.load(std::memory_order_acquire));
        CHECK(watch.finalized_on == std::this_thread::get_id());
        CHECK(watch.finalized_on != *reader_id);

        as.reset();
        system.reset();
        root.reset();
    }
    CHECK_FALSE(finalized_while_mapped.load());
    CHECK(intact_after_unplug.load());
    qomem::memory_synchronize();
    REQUIRE(qomem::live_object_count() == 0);
}

TEST_CASE("concurrency: a vCPU thread loading a device's RAM and MMIO through its TLB sees the "
          "device unplugged by the writer at its next access: its loads fail cleanly with a "
          "decode error, and the device is finalized once the vCPU left its read section",
          "[concurrency][tlb][lifetime]") {
    REQUIRE(qomem::live_object_count() == 0);
    watched_card::watch watch;
    std::atomic<std::uint64_t> loads_before{0}, loads_after{0};
    std::atomic<int> bad{0};
    {
        auto root = qomem::container::make_root();
        qomem::machine& machine = qomem::add_machine(*root);
        auto system = qomem::make_container(nullptr, "system", qomem::u128_2_64);
        std::optional<qomem::address_space> as;
        as.emplace(machine.memory(), *system, "memory");
        auto card = qomem::make<watched_card>(&watch);
        machine.peripheral().add_child("card", *card);
        constant_regs regs; // outlives the card's regions: declared before the card goes
        auto ram = qomem::make_ram(*card, "card-ram", 0x1000);
        std::memset(ram->host_ptr(), 0x3c, 0x1000);
        auto io = qomem::make_io(*card, "card-io", 0x1000, regs);
        system->add_subregion(0x8000, *ram);
        system->add_subregion(0x9000, *io);
        watched_card* dev = card.get();
        qomem::memory_region* ram_mr = ram.get();
        qomem::memory_region* io_mr = io.get();
        card.reset();
        ram.reset();
        io.reset();

        std::atomic<bool> gone_seen{false};
        joining_thread vcpu([&] {
            qomem::cpu_tlb tlb(*as);
            // Each load is checked on its own: the commit may fall between
            // the RAM load and the MMIO load of one pair. Once one load has
            // seen the device gone, every later load does (the next access
            // after an invalidation reads the new view).
            auto check = [&](qomem::memtx_result r, std::uint64_t v, std::uint64_t present) {
                if (r == qomem::memtx_ok && v == present && !gone_seen.load(std::memory_order_relaxed)) {
                    loads_before.fetch_add(1, std::memory_order_relaxed);
                } else if (r == qomem::memtx_decode_error && v == 0) {
                    loads_after.fetch_add(1, std::memory_order_relaxed);
                    gone_seen.store(true);
                } else {
                    bad.fetch_add(1); // present again after gone, or garbage
                }
            };
            for (int slice = 0; slice < 100000 && !gone_seen.load(); ++slice) {
                qomem::rcu::read_guard section;
                for (int i = 0; i < 64; ++i) {
                    std::uint64_t a = 1, b = 1;
                    const qomem::memtx_result ra = tlb.ldq_le(0x8000 + 8 * (i % 512), a);
                    check(ra, a, 0x3c3c3c3c3c3c3c3cULL);
                    const qomem::memtx_result rb = tlb.ldq_le(0x9000, b);
                    check(rb, b, 0x5a5a5a5a5a5a5a5aULL);
                }
            }
        });
        const auto deadline = std::chrono::steady_clock::now() + 10s;
        while (loads_before.load() < 1000 && !gone_seen.load() && std::chrono::steady_clock::now() < deadline)
            std::this_thread::yield();
        {
            std::lock_guard writer(machine.memory());
            qomem::memory_transaction tx(machine.memory());
            system->del_subregion(*ram_mr);
            system->del_subregion(*io_mr);
            qomem::unparent(*dev);
        }
        vcpu.join();
        CHECK(gone_seen.load());
        machine.memory().synchronize();
        CHECK(watch.finalized.load());
        as.reset();
        system.reset();
        root.reset();
    }
    CHECK(bad.load() == 0);
    CHECK(loads_before.load() >= 1000);
    CHECK(loads_after.load() > 0);
    qomem::memory_synchronize();
    REQUIRE(qomem::live_object_count() == 0);
}
