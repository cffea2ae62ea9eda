// A vCPU thread reading a device's MMIO while another thread hot-unplugs the
// device (issue 10, "Unplug must remove the device from the guest's view"):
// it sees the device's values, then decode errors, and never reaches a freed
// device. The device places its region with device::map_region, so the
// unplug's unrealize takes it out of the guest's view; the flat views a
// reader may still be inside hold the region, and the region holds the
// device, until no reader can use them. Run under ThreadSanitizer (make
// test-tsan) and AddressSanitizer (a read of a freed device is a
// heap-use-after-free there; the destroyed flag below catches it elsewhere).
#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>

#include <catch2/catch.hpp>

#include <qomem/address_space.hpp>
#include <qomem/device.hpp>
#include <qomem/machine.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/object.hpp>
#include <qomem/rcu.hpp>

#include "test_support.hpp"

using namespace qomem;

namespace {

constexpr hwaddr dev_base = 0x1000'0000;
constexpr std::uint32_t dev_value = 0xfeedc0de;

/// Set by the device's destructor; a register read after it is a read of a
/// freed device.
std::atomic<bool> device_destroyed{false};
std::atomic<unsigned> reads_after_destroy{0};

class vcpu_test_device : public device {
    QOMEM_OBJECT(vcpu_test_device, "vcpu-test-device", device)
public:
    explicit vcpu_test_device(memory_region& system) : system_(&system) {}
    ~vcpu_test_device() override { device_destroyed.store(true); }

    struct registers {
        static constexpr access_limits valid{.min_access_size = 4, .max_access_size = 4};
        std::uint32_t value = dev_value;
        std::uint64_t read(hwaddr, unsigned) {
            if (device_destroyed.load()) reads_after_destroy.fetch_add(1);
            return value;
        }
        void write(hwaddr, std::uint64_t, unsigned) {}
    } regs;

protected:
    void do_realize() override {
        auto io = make_io(*this, "vcpu-test-mmio", 0x100, regs);
        map_region(*system_, dev_base, *io);
    }

private:
    memory_region* system_;
};

/// Waits (bounded) until `done()`; returns whether it became true.
template <class F>
bool wait_for(F done, std::chrono::seconds limit = std::chrono::seconds(20)) {
    const auto end = std::chrono::steady_clock::now() + limit;
    while (!done()) {
        if (std::chrono::steady_clock::now() > end) return false;
        std::this_thread::yield();
    }
    return true;
}

} // namespace

TEST_CASE("a vCPU reading a device's MMIO while another thread unplugs it sees only the "
          "device's values, then decode errors, and never a freed device",
          "[hotplug][concurrency][lifetime]") {
    qomem_test::leak_check leaks;
    for (int round = 0; round < 20; ++round) {
        CAPTURE(round);
        device_destroyed.store(false);
        reads_after_destroy.store(0);
        auto root = container::make_root();
        machine& m = add_machine(*root);
        auto system = make_container(region_owner::ownerless_in(m.unattached()), "system", u128_2_64);
        std::optional<address_space> memory(std::in_place, m.memory(), *system, "memory");
        {
            auto d = make<vcpu_test_device>(*system);
            m.peripheral().add_child("dev", *d);
            d->realize();
        }

        std::atomic<bool> stop{false};
        std::atomic<unsigned> values{0}, holes{0}, wrong{0}, value_after_hole{0};
        std::thread vcpu([&] {
            bool hole_seen = false;
            while (!stop.load()) {
                // Several reads in one read section: the views it loads stay
                // alive until it ends, whatever the other thread commits.
                rcu::read_guard g;
                for (int i = 0; i < 8; ++i) {
                    std::uint32_t v = 0;
                    const memtx_result r = memory->read(dev_base, &v, sizeof v);
                    if (r == memtx_ok && v == dev_value) {
                        values.fetch_add(1);
                        if (hole_seen) value_after_hole.fetch_add(1);
                    } else if (r == memtx_decode_error) {
                        hole_seen = true;
                        holes.fetch_add(1);
                    } else {
                        wrong.fetch_add(1);
                    }
                }
            }
        });
        REQUIRE(wait_for([&] { return values.load() > 0; }));
        unparent(*m.peripheral().child("dev")); // the hot-unplug, on this thread
        const bool hole = wait_for([&] { return holes.load() > 0; });
        stop.store(true);
        vcpu.join();
        CHECK(hole);
        CHECK(wrong.load() == 0);
        CHECK(value_after_hole.load() == 0);
        CHECK(reads_after_destroy.load() == 0);
        // Once no reader can hold a view showing it, the region goes, and
        // with it the device.
        m.memory().synchronize();
        CHECK(device_destroyed.load());
        memory.reset();
        root.reset();
        rcu::synchronize();
    }
}
