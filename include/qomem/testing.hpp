// qomem/testing.hpp — checks for the tests of code built on qomem: a leak
// check on live objects, a scope in which failed assertions throw, and a
// recorder of lifetime events. Usable from any test framework; the Catch2
// adapter is qomem/testing_catch2.hpp.
//
//     TEST(uart, unplug_finalizes_the_device) {          // any framework
//         qomem::testing::leak_check leaks;               // first: checked last
//         qomem::testing::throwing_assertions asserts;    // QOMEM_ASSERT throws
//         qomem::testing::event_recorder events;          // lifetime order
//         auto dev = qomem::make<uart>();
//         events.label(*dev, "uart");
//         ...
//         EXPECT_EQ(events.take(), (std::vector<std::string>{"finalizing uart"}));
//     }   // dev released, then leak_check reports any object still alive
//
// How failures are reported. leak_check's destructor calls its reporter with
// a message naming the live objects by type. The default reporter throws
// qomem::testing::check_failure — every framework reports an exception
// escaping a test body as a failure — unless an exception is already
// unwinding the scope, when it writes the message to stderr instead (a
// second exception would terminate the program). Pass your framework's own
// reporter (e.g. one calling ADD_FAILURE) to the constructor instead.
//
// Declare leak_check before any handle of the scenario: locals are destroyed
// in reverse order, so the check runs after every handle has been dropped.
//
// The observer slot and the assertion handler are process-wide: the
// recorder and throwing_assertions restore what was there before when they
// go, so they nest, but two threads must not install them at once.
#pragma once

#include <cstddef>
#include <cstdio>
#include <exception>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <qomem/assert.hpp>
#include <qomem/object.hpp>

namespace qomem::testing {

/// A check of this header failed (thrown by the default reporter).
class check_failure : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

/// Receives the message of a failed check.
using reporter = std::function<void(const std::string& message)>;

/// "device=2 memory-region=5", or "none": the live objects by type.
inline std::string describe_live_objects() {
    std::string out;
    for (const auto& [type, count] : live_objects())
        out += (out.empty() ? "" : " ") + type + "=" + std::to_string(count);
    return out.empty() ? "none" : out;
}

/// Checks, when it goes out of scope, that the number of live qomem objects
/// is back to what it was when it was made.
class leak_check {
public:
    /// Reports through the default reporter (see the header overview).
    leak_check() : leak_check(reporter{}) {}
    /// Reports through `report` (called once, from the destructor, only on
    /// a failure; it may throw unless an exception is already unwinding).
    explicit leak_check(reporter report)
        : report_(std::move(report)), start_(live_object_count()),
          unwinding_(std::uncaught_exceptions()) {}
    leak_check(const leak_check&) = delete;
    leak_check& operator=(const leak_check&) = delete;

    // Throwing is how the default reporter fails a test (never while an
    // exception unwinds the scope): the escape is the point.
    ~leak_check() noexcept(false) { // NOLINT(bugprone-exception-escape)
        if (clean()) return;
        const std::string what = message();
        if (report_) {
            report_(what);
        } else if (std::uncaught_exceptions() > unwinding_) {
            std::fprintf(stderr, "qomem::testing::leak_check: %s\n", what.c_str());
        } else {
            throw check_failure(what);
        }
    }

    /// Live objects when the check was made.
    std::size_t start() const noexcept { return start_; }
    /// True if as many objects are live now as at the start.
    bool clean() const { return live_object_count() == start_; }
    /// What a failure reports: the counts, then the live objects by type.
    std::string message() const {
        return "live qomem objects: " + std::to_string(live_object_count()) + " at the end, " +
               std::to_string(start_) + " at the start; by type: " + describe_live_objects();
    }
    /// True if this scope is being left by an exception that was not in
    /// flight when the check was made (a reporter must not throw then).
    bool unwinding() const noexcept { return std::uncaught_exceptions() > unwinding_; }

private:
    reporter report_;
    std::size_t start_;
    int unwinding_;
};

/// Installs qomem::throwing_assertion_handler for its lifetime, so a failed
/// QOMEM_ASSERT throws qomem::assertion_failure instead of aborting, and a
/// test can expect it. Never let such a failure escape a destructor (a
/// finalizer, ref_ptr's destructor): that terminates. Restores the previous
/// handler when it goes.
class throwing_assertions {
public:
    throwing_assertions() = default;

private:
    scoped_assertion_handler guard_{throwing_assertion_handler};
};

/// An ordered list of events, e.g. "finalizing dev", "unparenting a from b".
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
class event_recorder : public lifetime_observer {
public:
    explicit event_recorder(event_log& log) : log_(&log), previous_(set_lifetime_observer(this)) {}
    event_recorder() : event_recorder(own_log_) {}
    ~event_recorder() { set_lifetime_observer(previous_); }
    event_recorder(const event_recorder&) = delete;
    event_recorder& operator=(const event_recorder&) = delete;

    /// Names `obj` in the log. Labels are kept after `obj` dies (a parent
    /// being finalized still appears in its children's unparenting events),
    /// so an object made later at the same address and of the same type
    /// would inherit the label: label such objects too.
    void label(const object& obj, std::string name) {
        labels_[&obj] = {&obj.type(), std::move(name)};
    }

    void finalizing(const object& obj) noexcept override {
        log_->add("finalizing " + label_of(obj));
    }
    void unparenting(const object& child, const object& parent) noexcept override {
        log_->add("unparenting " + label_of(child) + " from " + label_of(parent));
    }

    event_log& log() noexcept { return *log_; }
    const std::vector<std::string>& events() const noexcept { return log_->events(); }
    std::vector<std::string> take() { return log_->take(); }

private:
    std::string label_of(const object& obj) const {
        auto it = labels_.find(&obj);
        if (it != labels_.end() && it->second.first == &obj.type()) return it->second.second;
        return std::string(obj.type().name);
    }

    event_log own_log_;
    event_log* log_;
    lifetime_observer* previous_;
    std::map<const object*, std::pair<const type_info*, std::string>> labels_;
};

/// The events that start with `prefix`, in order (e.g. only the
/// "finalizing " ones).
inline std::vector<std::string> only(const std::vector<std::string>& events,
                                     std::string_view prefix) {
    std::vector<std::string> out;
    for (const std::string& e : events)
        if (std::string_view(e).substr(0, prefix.size()) == prefix) out.push_back(e);
    return out;
}

} // namespace qomem::testing
