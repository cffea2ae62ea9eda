// qomem/error.hpp — exceptions for bad input from outside the program.
//
// Misuse of the API by the program itself is a QOMEM_ASSERT (assert.hpp).
// Input that the program does not control — a fixture file, a request from a
// vhost-user backend, a guest address — is refused with one of these
// exceptions. Every message names the offending values, and every function
// that throws one leaves the state it was given unchanged.
#pragma once

#include <stdexcept>
#include <string>

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

} // namespace qomem
