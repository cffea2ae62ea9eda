// qomem/testing.hpp, the helpers for users' own tests: the leak check
// reports leaks (throwing by default, through a reporter if given, never a
// second exception while one unwinds), the throwing-assertion scope turns
// misuse into an exception and restores the previous handler, and the event
// recorder records lifetime events in order and restores the previous
// observer. Written against the generic header, not Catch2's adapter, the
// way a user of another framework would use it.
#include <stdexcept>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <qomem/device.hpp>
#include <qomem/object.hpp>
#include <qomem/testing.hpp>

namespace {

/// Makes an object and returns its only handle: dropping the handle
/// finalizes it, keeping it leaks it.
qomem::ref_ptr<qomem::container> fresh() { return qomem::make<qomem::container>(); }

} // namespace

TEST_CASE("leak_check throws check_failure naming the live objects when its scope leaks", "[testing]") {
    qomem::ref_ptr<qomem::container> leaked;
    std::string message;
    try {
        qomem::testing::leak_check leaks;
        leaked = fresh();
    } catch (const qomem::testing::check_failure& e) {
        message = e.what();
    }
    CHECK_THAT(message, Catch::Contains("live qomem objects: ") && Catch::Contains("container=1"));
    leaked.reset();
    qomem::testing::leak_check clean;
    CHECK(clean.clean());
}

TEST_CASE("leak_check passes a scope that frees what it made, and says nothing", "[testing]") {
    std::vector<std::string> reports;
    {
        qomem::testing::leak_check leaks([&](const std::string& m) { reports.push_back(m); });
        auto obj = fresh();
        auto root = qomem::container::make_root();
        qomem::add_machine(*root);
    }
    CHECK(reports.empty());
}

TEST_CASE("leak_check reports through the reporter it was given", "[testing]") {
    std::vector<std::string> reports;
    qomem::ref_ptr<qomem::container> leaked;
    {
        qomem::testing::leak_check leaks([&](const std::string& m) { reports.push_back(m); });
        leaked = fresh();
    }
    REQUIRE(reports.size() == 1);
    CHECK_THAT(reports[0], Catch::Contains("1 at the end, 0 at the start") && Catch::Contains("container=1"));
    leaked.reset();
}

TEST_CASE("leak_check does not throw while another exception leaves the scope", "[testing]") {
    qomem::ref_ptr<qomem::container> leaked;
    try {
        qomem::testing::leak_check leaks;
        leaked = fresh();
        throw std::runtime_error("the test's own failure");
    } catch (const std::runtime_error& e) {
        CHECK(std::string(e.what()) == "the test's own failure"); // not terminate, not check_failure
    }
    leaked.reset();
}

TEST_CASE("throwing_assertions turns misuse into assertion_failure and restores the handler", "[testing]") {
    const qomem::assertion_handler before = qomem::set_assertion_handler(qomem::default_assertion_handler);
    {
        qomem::testing::throwing_assertions asserts;
        auto outer = fresh();
        auto inner = fresh();
        outer->add_child("inner", *inner);
        CHECK_THROWS_AS(inner->add_child("outer", *outer), qomem::assertion_failure); // a cycle: misuse
        CHECK(outer->parent() == nullptr); // checked before anything changed
    }
    CHECK(qomem::set_assertion_handler(before) == qomem::default_assertion_handler);
}

TEST_CASE("event_recorder records finalizations and unparentings with labels, in order", "[testing]") {
    qomem::testing::leak_check leaks;
    qomem::testing::event_log outer_log;
    qomem::testing::event_recorder outer(outer_log);
    {
        qomem::testing::event_recorder events;
        auto root = qomem::container::make_root();
        auto box = fresh();
        root->add_child("box", *box);
        events.label(*root, "root");
        events.label(*box, "box");
        box.reset(); // the root holds it
        qomem::unparent(*root->child("box"));
        root.reset();
        CHECK(events.take() ==
              std::vector<std::string>{"unparenting box from root", "finalizing box", "finalizing root"});
        CHECK(qomem::testing::only({"finalizing a", "unparenting a from b", "finalizing b"}, "finalizing ") ==
              std::vector<std::string>{"finalizing a", "finalizing b"});
    }
    // The inner recorder is gone: the outer one receives events again.
    fresh().reset();
    CHECK(outer.events() == std::vector<std::string>{"finalizing container"});
}
