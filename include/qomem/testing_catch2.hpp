// qomem/testing_catch2.hpp — qomem/testing.hpp for Catch2 v2: a leak check
// that fails the test case through Catch2's own assertions.
//
//     #include <qomem/testing_catch2.hpp>
//     TEST_CASE("a bus cannot be plugged under its own device") {
//         qomem::testing::catch2::leak_check leaks;        // first: checked last
//         qomem::testing::throwing_assertions asserts;
//         ...
//         REQUIRE_THROWS_AS(bus->add_child("dev", *dev), qomem::assertion_failure);
//     }
//
// The leak check fails with REQUIRE (ending the test case) when the scope
// ends normally, and with CHECK when it is left by an exception (Catch2
// then reports that exception too). Its message names the live objects by
// type. Needs Catch2 v2 (<catch2/catch.hpp>).
#pragma once

#include <exception>
#include <string>

#include <catch2/catch.hpp>

#include <qomem/testing.hpp>

namespace qomem::testing::catch2 {

/// qomem::testing::leak_check reporting through Catch2.
class leak_check : public qomem::testing::leak_check {
public:
    leak_check() : qomem::testing::leak_check(reporter_for(std::uncaught_exceptions())) {}

private:
    static reporter reporter_for(int unwinding_at_start) {
        return [unwinding_at_start](const std::string& message) {
            if (std::uncaught_exceptions() > unwinding_at_start)
                FAIL_CHECK(message);
            else
                FAIL(message);
        };
    }
};

using qomem::testing::event_log;
using qomem::testing::event_recorder;
using qomem::testing::only;
using qomem::testing::throwing_assertions;

} // namespace qomem::testing::catch2
