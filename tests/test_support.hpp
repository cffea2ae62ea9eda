// tests/test_support.hpp — helpers shared by the qomem tests.
//
// Every test scenario ends by checking that it left no live object behind and
// runs with a throwing assertion handler, so that misuse checks can be
// asserted with REQUIRE_THROWS_AS:
//
//     TEST_CASE("unparent of an orphan is reported") {
//         qomem_test::leak_check leaks;           // first: checked last
//         qomem_test::throwing_assertions asserts;
//         qomem_test::event_recorder events;      // optional: lifetime order
//         auto obj = qomem::make<qomem::container>();
//         events.label(*obj, "obj");
//         REQUIRE_THROWS_AS(qomem::unparent(*obj), qomem::assertion_failure);
//     }   // obj released here, then leak_check requires zero live objects
//
// Declare leak_check before any ref_ptr of the scenario: locals are destroyed
// in reverse order, so the check runs after every handle has been dropped.
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/core.h>

#include <qomem/assert.hpp>
#include <qomem/device.hpp>
#include <qomem/memory_ops.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/memory_system.hpp>
#include <qomem/object.hpp>

namespace qomem_test {

/// Requires, when it goes out of scope, that the number of live qomem objects
/// is back to what it was when it was made (zero, unless an earlier test
/// leaked: that test has already failed, and this one is not blamed for it).
/// Declare it first in a scenario so that it is checked last.
class leak_check {
public:
    leak_check() : start_(qomem::live_object_count()), unwinding_(std::uncaught_exceptions()) {
        CHECK(start_ == 0);
    }
    leak_check(const leak_check&) = delete;
    leak_check& operator=(const leak_check&) = delete;

    // A failed REQUIRE throws; that is only allowed when no other exception
    // is already unwinding the scenario, so fall back to CHECK then.
    ~leak_check() noexcept(false) {
        const std::size_t now = qomem::live_object_count();
        INFO("live objects by type at the end of the scenario: " << describe_live());
        if (std::uncaught_exceptions() > unwinding_)
            CHECK(now == start_);
        else
            REQUIRE(now == start_);
    }

    static std::string describe_live() {
        std::string out;
        for (const auto& [type, count] : qomem::live_objects())
            out += type + "=" + std::to_string(count) + " ";
        return out.empty() ? "none" : out;
    }

private:
    std::size_t start_;
    int unwinding_;
};

/// Installs qomem::throwing_assertion_handler for its lifetime, so a failed
/// QOMEM_ASSERT throws qomem::assertion_failure instead of aborting.
/// Never let such a failure escape a destructor (a finalizer, ref_ptr's
/// destructor): that terminates. Catch it inside and record it instead.
class throwing_assertions {
public:
    throwing_assertions() = default;

private:
    qomem::scoped_assertion_handler guard_{qomem::throwing_assertion_handler};
};

/// An ordered list of events, e.g. "ctor base", "finalizing dev", "free".
class event_log {
public:
    void add(std::string event) { events_.push_back(std::move(event)); }
    const std::vector<std::string>& events() const noexcept { return events_; }
    /// Returns the events recorded so far and starts a fresh list.
    std::vector<std::string> take() { return std::exchange(events_, {}); }
    void clear() noexcept { events_.clear(); }

private:
    std::vector<std::string> events_;
};

/// A lifetime_observer that records "finalizing <label>" and
/// "unparenting <child label> from <parent label>" into a log, for the
/// objects given a label (others are recorded by type name). Installed for
/// its lifetime; restores the previous observer afterwards.
class event_recorder : public qomem::lifetime_observer {
public:
    explicit event_recorder(event_log& log) : log_(&log), previous_(qomem::set_lifetime_observer(this)) {}
    event_recorder() : event_recorder(own_log_) {}
    ~event_recorder() { qomem::set_lifetime_observer(previous_); }
    event_recorder(const event_recorder&) = delete;
    event_recorder& operator=(const event_recorder&) = delete;

    /// Names `obj` in the log. Labels are kept after `obj` dies (a parent
    /// being finalized still appears in its children's unparenting events),
    /// so an object made later at the same address and of the same type
    /// would inherit the label: label such objects too.
    void label(const qomem::object& obj, std::string name) {
        labels_[&obj] = {&obj.type(), std::move(name)};
    }

    void finalizing(const qomem::object& obj) noexcept override {
        log_->add("finalizing " + label_of(obj));
    }
    void unparenting(const qomem::object& child, const qomem::object& parent) noexcept override {
        log_->add("unparenting " + label_of(child) + " from " + label_of(parent));
    }

    event_log& log() noexcept { return *log_; }
    const std::vector<std::string>& events() const noexcept { return log_->events(); }
    std::vector<std::string> take() { return log_->take(); }

private:
    std::string label_of(const qomem::object& obj) const {
        auto it = labels_.find(&obj);
        if (it != labels_.end() && it->second.first == &obj.type()) return it->second.second;
        return std::string(obj.type().name);
    }

    event_log own_log_;
    event_log* log_;
    qomem::lifetime_observer* previous_;
    std::map<const qomem::object*, std::pair<const qomem::type_info*, std::string>> labels_;
};

/// The events of `log` that start with `prefix`, in order (e.g. only the
/// "finalizing " ones).
inline std::vector<std::string> only(const std::vector<std::string>& events,
                                     std::string_view prefix) {
    std::vector<std::string> out;
    for (const std::string& e : events)
        if (std::string_view(e).substr(0, prefix.size()) == prefix) out.push_back(e);
    return out;
}

// ---- memory-map rigs --------------------------------------------------------

/// How many live objects of type `type` ("memory-region", ...) exist now.
inline std::size_t live_count(std::string_view type) {
    const auto all = qomem::live_objects();
    const auto it = all.find(type);
    return it == all.end() ? 0 : it->second;
}

/// "11 22 33 44": bytes as the guest sees them in a buffer.
inline std::string bytes(const void* p, std::size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    std::string out;
    for (std::size_t i = 0; i < n; ++i) {
        if (i) out += ' ';
        out += fmt::format("{:02x}", b[i]);
    }
    return out;
}

/// A register file whose byte at offset k is (k & 0xff), in little-endian
/// order: whatever the access size, the guest's buffer shows the bytes of
/// the offsets it covers.
inline std::uint64_t offset_bytes(qomem::hwaddr offset, unsigned size) {
    std::uint64_t v = 0;
    for (unsigned k = 0; k < size; ++k) v |= ((offset + k) & 0xff) << (8 * k);
    return v;
}

/// The calls an MMIO model received, as "r 0x10/4" and "w 0x10/4=0x1234".
struct mmio_calls {
    std::vector<std::string> calls;
    void note_read(qomem::hwaddr offset, unsigned size) {
        calls.push_back(fmt::format("r {:#x}/{}", offset, size));
    }
    void note_write(qomem::hwaddr offset, std::uint64_t value, unsigned size) {
        calls.push_back(fmt::format("w {:#x}/{}={:#x}", offset, size, value));
    }
};

/// MMIO callbacks that record every call (mmio_calls) and answer reads with
/// `reader` (zero by default). Access rules and byte order are template
/// parameters, because QEMU's (and qomem's) are static.
template <qomem::access_limits Valid = qomem::access_limits{},
          qomem::access_limits Impl = qomem::access_limits{},
          qomem::endianness Endian = qomem::endianness::little>
struct recording_regs : mmio_calls {
    static constexpr qomem::access_limits valid = Valid;
    static constexpr qomem::access_limits impl = Impl;
    static constexpr qomem::endianness endian = Endian;

    std::function<std::uint64_t(qomem::hwaddr, unsigned)> reader = [](qomem::hwaddr, unsigned) {
        return std::uint64_t{0};
    };
    std::uint64_t read(qomem::hwaddr offset, unsigned size) {
        note_read(offset, size);
        return reader(offset, size);
    }
    void write(qomem::hwaddr offset, std::uint64_t value, unsigned size) {
        note_write(offset, value, size);
    }
};

/// MMIO that answers zero and ignores writes.
struct null_regs {
    std::uint64_t read(qomem::hwaddr, unsigned) { return 0; }
    void write(qomem::hwaddr, std::uint64_t, unsigned) {}
};

/// A machine: a device owning every region, and an ownerless root container.
/// The root handle is dropped before the device, which then frees its regions.
struct board {
    qomem::ref_ptr<qomem::device> dev = qomem::make<qomem::device>();
    qomem::ref_ptr<qomem::memory_region> sys =
        qomem::make_container(nullptr, "system", qomem::u128_2_64);
};

/// Turns on memory_system::set_verify_incremental (every incremental commit
/// checked against a full render) for its lifetime, and restores it after,
/// also when a check fails.
class verify_incremental {
public:
    explicit verify_incremental(qomem::memory_system& sys = qomem::memory_system::default_system())
        : sys_(sys), previous_(sys.verify_incremental()) {
        sys_.set_verify_incremental(true);
    }
    ~verify_incremental() { sys_.set_verify_incremental(previous_); }
    verify_incremental(const verify_incremental&) = delete;
    verify_incremental& operator=(const verify_incremental&) = delete;

private:
    qomem::memory_system& sys_;
    bool previous_;
};

} // namespace qomem_test
