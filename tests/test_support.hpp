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
#include <exception>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include <qomem/assert.hpp>
#include <qomem/object.hpp>
#include <qomem/testing_catch2.hpp>

namespace qomem_test {

/// qomem/testing.hpp's leak check, reporting through Catch2, that also
/// requires zero live objects at the start (unless an earlier test leaked:
/// that test has already failed, and this one is not blamed for it).
/// Declare it first in a scenario so that it is checked last.
class leak_check : public qomem::testing::catch2::leak_check {
public:
    leak_check() { CHECK(start() == 0); }
    /// The live objects by type, e.g. "container=1 memory-region=2", or "none".
    static std::string describe_live() { return qomem::testing::describe_live_objects(); }
};

using qomem::testing::event_log;
using qomem::testing::event_recorder;
using qomem::testing::only;
using qomem::testing::throwing_assertions;

} // namespace qomem_test
