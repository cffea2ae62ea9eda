// qomem/error.hpp — exceptions for bad input from outside the program.
//
// Misuse of the API by the program itself is a QOMEM_ASSERT (assert.hpp).
// Input that the program does not control — a fixture file, a request from a
// vhost-user backend, a guest address — is refused with one of these
// exceptions. Every message names the offending values, and every function
// that throws one leaves the state it was given unchanged.
#pragma once

#include <cstddef>
#include <iterator>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>

namespace qomem {

/// Base of every exception qomem throws for bad input.
class error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

/// A property name that is already taken, or a property that does not exist.
class property_error : public error {
public:
    using error::error;
};

/// A canonical path that does not resolve, or resolves to the wrong type.
class path_error : public error {
public:
    using error::error;
};

/// A memory-region operation refused (alias cycle, bad size, ...).
class region_error : public error {
public:
    using error::error;
};

/// A malformed conformance fixture.
class fixture_error : public error {
public:
    using error::error;
};

/// A value that a typed property does not accept: a malformed boolean,
/// number or size, a number out of the property's range, an unknown enum
/// value, or malformed `name=value,...` text (property.hpp).
class property_value_error : public property_error {
public:
    using property_error::property_error;
};

/// A type name that names no registered type, names an abstract type, or
/// names a type other than the one required (type_registry.hpp).
class type_error : public error {
public:
    using error::error;
};

/// A hotplug request refused (device.hpp, hotplug.hpp): no such device, a
/// device or bus that is not hot-pluggable, an unplug already in progress,
/// or a refusal by the hotplug handler.
class hotplug_error : public error {
public:
    using error::error;
};

/// The names of the enumerators of a reason enum, in declaration order.
/// Specialise it beside the enum, with one name per enumerator:
///
///     enum class widget_reason { too_big, too_small };
///     template <> struct reason_names<widget_reason> {
///         static constexpr std::string_view names[] = {"too_big", "too_small"};
///     };
///     class widget_error : public reasoned_error<widget_reason> {
///     public:
///         using reasoned_error::reasoned_error;
///     };
///     ...
///     catch (const widget_error& e) { if (e.why() == widget_error::reason::too_big) ... }
template <class Reason>
struct reason_names;

/// Bad input refused for one of a fixed set of reasons: `why()` says which,
/// `name(r)` spells it ("unknown_shmid", ...) for messages and tests.
template <class Reason>
class reasoned_error : public error {
    static_assert(std::is_enum_v<Reason>, "a reasoned_error's reason is an enum");

public:
    using reason = Reason;

    reasoned_error(reason r, const std::string& what) : error(what), reason_(r) {}

    reason why() const noexcept { return reason_; }

    /// The enumerator's name, or "unknown reason" for a value outside the enum.
    static constexpr std::string_view name(reason r) noexcept {
        const auto& names = reason_names<Reason>::names;
        const auto i = static_cast<std::size_t>(r);
        return i < std::size(names) ? names[i] : std::string_view("unknown reason");
    }

private:
    reason reason_;
};

} // namespace qomem
