// qomem/property.hpp — typed properties (QEMU's ObjectProperty): their kinds
// and type names, descriptors with accessors, defaults and descriptions, and
// the text form of every value (parsing and printing, QEMU's rules).
//
// A property is declared once, either for a whole class (in its class_init:
// QEMU's object_class_property_add_*) or for one object (in its constructor:
// object_property_add_*), from a data member or from a getter and a setter:
//
//     class nic : public qomem::device {
//         QOMEM_OBJECT(nic, "nic", qomem::device)
//     public:
//         enum class mode { off, rx, rxtx };
//         bool promisc = false;
//         std::uint64_t ring_size = 4096;
//         mode m = mode::rx;
//         static void class_init(class_type& k, qomem::type_tag<nic>) {
//             k.add_property(qomem::bool_property("promisc", &nic::promisc)
//                                .describe("receive every frame"));
//             k.add_property(qomem::size_property("ring-size", &nic::ring_size)
//                                .with_default(std::uint64_t{4096}));
//             k.add_property(qomem::enum_property("mode", "NicMode", {"off", "rx", "rxtx"},
//                                                 &nic::m));
//         }
//     };
//     obj.parse_property("ring-size", "64k");        // QEMU's size syntax
//     obj.print_property("mode");                    // "rx"
//
// Objects get, set, parse and print properties by name (object.hpp); this
// header knows nothing of objects beyond a forward declaration.
//
// Type names are QEMU's: "bool", "string", "int8" ... "int64", "uint8" ...
// "uint64", "size", the enum's own type name, and (object.hpp) "child<T>" and
// "link<T>" with T the type name of the child or of the link's target type.
//
// Text forms: a boolean is on/yes/true or off/no/false and prints as
// true/false; integers are decimal, 0x-hexadecimal or 0-octal, checked
// against the property's range; a size is QEMU's qemu_strtosz (see
// parse_size); an enum value is one of its names, exactly.
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include <fmt/core.h>

#include <qomem/assert.hpp>
#include <qomem/error.hpp>

namespace qomem {

class object;
struct type_info;

/// What a property holds.
enum class property_kind : std::uint8_t {
    boolean,
    string,
    signed_integer,
    unsigned_integer,
    size, ///< an unsigned 64-bit byte count, parsed with unit suffixes
    enumeration,
    link,  ///< link<T>: a reference to another object (object.hpp)
    child, ///< child<T>: the composition tree (object.hpp)
};

/// A value in typed form: bool for booleans, std::int64_t for signed
/// integers and enums (the index of the value's name), std::uint64_t for
/// unsigned integers and sizes, std::string for strings.
using property_value = std::variant<bool, std::int64_t, std::uint64_t, std::string>;

/// What iterating an object's properties reports for each one.
struct property_info {
    std::string name;
    std::string type;        ///< "bool", "size", "child<container>", "link<device>", ...
    std::string description; ///< "" if none was given
    property_kind kind = property_kind::boolean;
    bool class_property = false; ///< declared by the class, not added to the object
    bool writable = true;
    std::optional<std::string> default_value; ///< in text form, if it has one
};

/// One `name=value` pair of QEMU's object_new_with_props / -object text.
struct property_setting {
    std::string name;
    std::string value;
};

// ---- text forms ------------------------------------------------------------------

namespace detail {

__extension__ typedef unsigned __int128 uwide; // one more decimal digit never wraps it

inline bool is_space(char c) noexcept {
    return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r';
}

inline int digit_value(char c, unsigned base) noexcept {
    int d = -1;
    if (c >= '0' && c <= '9')
        d = c - '0';
    else if (c >= 'a' && c <= 'f')
        d = c - 'a' + 10;
    else if (c >= 'A' && c <= 'F')
        d = c - 'A' + 10;
    return d >= 0 && static_cast<unsigned>(d) < base ? d : -1;
}

/// Unsigned digits in `base`, all of `s`; false (with `why`) on an empty,
/// malformed or too large number.
inline bool parse_digits(std::string_view s, unsigned base, std::uint64_t& out, std::string& why) {
    if (s.empty()) {
        why = "no digits";
        return false;
    }
    uwide v = 0;
    for (char c : s) {
        const int d = digit_value(c, base);
        if (d < 0) {
            why = fmt::format("'{}' is not a base-{} digit", c, base);
            return false;
        }
        v = v * base + static_cast<unsigned>(d);
        if (v > std::numeric_limits<std::uint64_t>::max()) {
            why = "larger than 2^64-1";
            return false;
        }
    }
    out = static_cast<std::uint64_t>(v);
    return true;
}

/// C's strtoull rules with base 0, on the whole string: "0x" hexadecimal,
/// a leading 0 octal, otherwise decimal; an optional sign.
inline bool parse_integer(std::string_view s, bool& negative, std::uint64_t& magnitude,
                          std::string& why) {
    negative = false;
    if (!s.empty() && (s.front() == '+' || s.front() == '-')) {
        negative = s.front() == '-';
        s.remove_prefix(1);
    }
    unsigned base = 10;
    if (s.size() > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s.remove_prefix(2);
    } else if (s.size() > 1 && s[0] == '0') {
        base = 8;
        s.remove_prefix(1);
    }
    return parse_digits(s, base, magnitude, why);
}

/// QEMU's qemu_strtosz with the default unit of bytes, on the whole string.
inline std::optional<std::uint64_t> parse_size(std::string_view s, std::string& why) {
    std::size_t i = 0;
    while (i < s.size() && is_space(s[i])) ++i;
    if (i < s.size() && s[i] == '+') {
        ++i;
    } else if (i < s.size() && s[i] == '-') {
        why = "a size cannot be negative";
        return std::nullopt;
    }
    const std::string_view rest = s.substr(i);
    // Hexadecimal: whole numbers of bytes only, no fraction, no unit.
    if (rest.size() > 2 && rest[0] == '0' && (rest[1] == 'x' || rest[1] == 'X') &&
        digit_value(rest[2], 16) >= 0) {
        std::size_t end = 2;
        while (end < rest.size() && digit_value(rest[end], 16) >= 0) ++end;
        if (end != rest.size()) {
            why = rest[end] == '.' ? "a hexadecimal size takes no fraction"
                                   : "a hexadecimal size takes no unit suffix";
            return std::nullopt;
        }
        std::uint64_t v = 0;
        if (!parse_digits(rest.substr(2), 16, v, why)) return std::nullopt;
        return v;
    }
    std::size_t p = 0;
    while (p < rest.size() && rest[p] >= '0' && rest[p] <= '9') ++p;
    const std::string_view whole = rest.substr(0, p);
    std::string_view fraction;
    if (p < rest.size() && rest[p] == '.') {
        const std::size_t start = ++p;
        while (p < rest.size() && rest[p] >= '0' && rest[p] <= '9') ++p;
        fraction = rest.substr(start, p - start);
    }
    if (whole.empty() && fraction.empty()) {
        why = "no digits";
        return std::nullopt;
    }
    unsigned shift = 0;
    if (p < rest.size()) {
        switch (rest[p]) {
        case 'b':
        case 'B':
            shift = 0;
            break;
        case 'k':
        case 'K':
            shift = 10;
            break;
        case 'm':
        case 'M':
            shift = 20;
            break;
        case 'g':
        case 'G':
            shift = 30;
            break;
        case 't':
        case 'T':
            shift = 40;
            break;
        case 'p':
        case 'P':
            shift = 50;
            break;
        case 'e':
        case 'E':
            shift = 60;
            break;
        default:
            why = fmt::format("unknown unit '{}' (B, K, M, G, T, P or E)", rest[p]);
            return std::nullopt;
        }
        ++p;
    }
    if (p != rest.size()) {
        why = fmt::format("unexpected '{}' after the unit", rest.substr(p));
        return std::nullopt;
    }
    const bool fraction_nonzero = fraction.find_first_not_of('0') != std::string_view::npos;
    if (fraction_nonzero && shift == 0) {
        why = "a fraction needs a unit above bytes (K, M, G, T, P or E)";
        return std::nullopt;
    }
    std::uint64_t w = 0;
    if (!whole.empty() && !parse_digits(whole, 10, w, why)) return std::nullopt;
    // The fraction, to 19 digits (10^19 * 2^60 < 2^128), rounded to the
    // nearest byte: enough for every value that fits in 64 bits.
    uwide num = 0, den = 1;
    for (std::size_t k = 0; k < fraction.size() && k < 19; ++k) {
        num = num * 10 + static_cast<unsigned>(fraction[k] - '0');
        den *= 10;
    }
    const uwide mult = uwide(1) << shift;
    const uwide frac_bytes = (num * mult * 2 + den) / (2 * den);
    const uwide total = uwide(w) * mult + frac_bytes;
    if (total > std::numeric_limits<std::uint64_t>::max()) {
        why = "larger than 2^64-1 bytes";
        return std::nullopt;
    }
    return static_cast<std::uint64_t>(total);
}

} // namespace detail

/// QEMU's size syntax (qemu_strtosz, default unit bytes): optional leading
/// white space and '+'; a decimal number with an optional fraction ("1.5",
/// ".5", "1."), then an optional unit B, K, M, G, T, P or E (either case,
/// powers of 1024), rounded to the nearest byte; or a 0x-hexadecimal number
/// with neither fraction nor unit. A nonzero fraction needs a unit above
/// bytes. Nothing may follow.
/// Throws: property_value_error naming the text and the reason (negative,
/// no digits, unknown unit, trailing text, above 2^64-1).
inline std::uint64_t parse_size(std::string_view text) {
    std::string why;
    if (auto v = detail::parse_size(text, why)) return *v;
    throw property_value_error(fmt::format("invalid size '{}': {}", text, why));
}

/// "on", "yes", "true" or "off", "no", "false".
/// Throws: property_value_error for anything else.
inline bool parse_bool(std::string_view text) {
    if (text == "on" || text == "yes" || text == "true") return true;
    if (text == "off" || text == "no" || text == "false") return false;
    throw property_value_error(
        fmt::format("invalid boolean '{}': use on/yes/true or off/no/false", text));
}

/// Splits QEMU's `name=value,name=value` text (as -object and keyval take
/// it): a ",," stands for a comma inside a value; an empty text is no pair.
/// Throws: property_value_error for a part without '=' or with an empty name.
inline std::vector<property_setting> parse_settings(std::string_view text) {
    std::vector<property_setting> out;
    std::size_t i = 0;
    while (i < text.size()) {
        const std::size_t eq = text.find('=', i);
        const std::size_t comma = text.find(',', i);
        if (eq == std::string_view::npos || (comma != std::string_view::npos && comma < eq))
            throw property_value_error(fmt::format("expected name=value at '{}' in '{}'",
                                                   text.substr(i, comma - i), text));
        property_setting s;
        s.name = std::string(text.substr(i, eq - i));
        if (s.name.empty())
            throw property_value_error(fmt::format("empty property name in '{}'", text));
        std::size_t j = eq + 1;
        for (; j < text.size(); ++j) {
            if (text[j] != ',') {
                s.value += text[j];
            } else if (j + 1 < text.size() && text[j + 1] == ',') {
                s.value += ',';
                ++j;
            } else {
                break;
            }
        }
        out.push_back(std::move(s));
        i = j + 1;
    }
    return out;
}

// ---- descriptors -------------------------------------------------------------------

namespace detail {

class property_access {
public:
    virtual ~property_access() = default;
    virtual property_value get(const object& o) const = 0;
    virtual void set(object& o, const property_value& v) const = 0;
    virtual bool writable() const noexcept = 0;
};

template <class V>
property_value to_value(const V& v) {
    if constexpr (std::is_same_v<V, bool>)
        return v;
    else if constexpr (std::is_enum_v<V>)
        return static_cast<std::int64_t>(v);
    else if constexpr (std::is_integral_v<V> && std::is_signed_v<V>)
        return static_cast<std::int64_t>(v);
    else if constexpr (std::is_integral_v<V>)
        return static_cast<std::uint64_t>(v);
    else
        return std::string(v);
}

template <class V>
V from_value(const property_value& v) {
    if constexpr (std::is_same_v<V, bool>)
        return std::get<bool>(v);
    else if constexpr (std::is_enum_v<V>)
        return static_cast<V>(std::get<std::int64_t>(v));
    else if constexpr (std::is_integral_v<V> && std::is_signed_v<V>)
        return static_cast<V>(std::get<std::int64_t>(v));
    else if constexpr (std::is_integral_v<V>)
        return static_cast<V>(std::get<std::uint64_t>(v));
    else
        return std::get<std::string>(v);
}

// `T` is the object type whose instances the accessors are called on; the
// object layer has checked that (object::add_property, class properties
// being inherited only by subtypes), so the downcast is a static_cast.
template <class T, class V, class Get, class Set>
class callable_access final : public property_access {
public:
    callable_access(Get g, Set s) : get_(std::move(g)), set_(std::move(s)) {}
    property_value get(const object& o) const override {
        return to_value<V>(V(get_(static_cast<const T&>(o))));
    }
    void set(object& o, const property_value& v) const override {
        if constexpr (!std::is_same_v<Set, std::nullptr_t>)
            set_(static_cast<T&>(o), from_value<V>(v));
    }
    bool writable() const noexcept override { return !std::is_same_v<Set, std::nullptr_t>; }

private:
    Get get_;
    Set set_;
};

struct property_builder;

template <class M>
constexpr std::string_view integer_type_name() noexcept {
    constexpr bool s = std::is_signed_v<M>;
    switch (sizeof(M)) {
    case 1:
        return s ? "int8" : "uint8";
    case 2:
        return s ? "int16" : "uint16";
    case 4:
        return s ? "int32" : "uint32";
    default:
        return s ? "int64" : "uint64";
    }
}

} // namespace detail

/// A property descriptor: name, type, description, default and accessors.
/// Made by the factories below and handed to object_class::add_property (a
/// class property) or object::add_property (a property of one object).
/// Copies share the accessors.
class property_def {
public:
    const std::string& name() const noexcept { return name_; }
    /// QEMU's type name: "bool", "string", "int32", "size", the enum's name...
    const std::string& type_name() const noexcept { return type_; }
    const std::string& description() const noexcept { return description_; }
    property_kind kind() const noexcept { return kind_; }
    bool writable() const noexcept { return access_->writable(); }
    const std::optional<property_value>& default_value() const noexcept { return default_; }
    /// The names of an enumeration's values, by index (empty otherwise).
    std::span<const std::string> enum_values() const noexcept { return enum_names_; }
    /// The object type whose instances the accessors work on.
    const type_info& owner_type() const noexcept { return *owner_; }

    /// Sets the description (QEMU's object_property_set_description).
    property_def& describe(std::string text) & {
        description_ = std::move(text);
        return *this;
    }
    property_def&& describe(std::string text) && { return std::move(describe(std::move(text))); }

    /// Sets the default: applied when an object gets the property (a class
    /// property's after the object's constructors, before instance_post_init;
    /// an object's own at add_property). `v` is a bool, an integer, a string,
    /// or for an enumeration one of its enum values or names.
    /// Requires (asserted): `v` fits the property's kind and range.
    template <class V>
    property_def& with_default(const V& v) & {
        default_ = default_of(v);
        return *this;
    }
    template <class V>
    property_def&& with_default(const V& v) && {
        return std::move(with_default(v));
    }

    /// The value of `text` for this property.
    /// Throws: property_value_error naming the property, the text and why.
    property_value parse(std::string_view text) const {
        std::string why;
        switch (kind_) {
        case property_kind::boolean:
            if (text == "on" || text == "yes" || text == "true") return true;
            if (text == "off" || text == "no" || text == "false") return false;
            why = "use on/yes/true or off/no/false";
            break;
        case property_kind::string:
            return std::string(text);
        case property_kind::signed_integer: {
            bool neg = false;
            std::uint64_t mag = 0;
            if (detail::parse_integer(text, neg, mag, why)) {
                if (!neg && mag > static_cast<std::uint64_t>(max_))
                    why = fmt::format("above the maximum {}", max_);
                else if (neg && mag > static_cast<std::uint64_t>(-(min_ + 1)) + 1)
                    why = fmt::format("below the minimum {}", min_);
                else
                    return neg ? static_cast<std::int64_t>(0 - mag)
                               : static_cast<std::int64_t>(mag);
            }
            break;
        }
        case property_kind::unsigned_integer: {
            bool neg = false;
            std::uint64_t mag = 0;
            if (detail::parse_integer(text, neg, mag, why)) {
                if (neg)
                    why = "negative";
                else if (mag > umax_)
                    why = fmt::format("above the maximum {}", umax_);
                else
                    return mag;
            }
            break;
        }
        case property_kind::size:
            if (auto v = detail::parse_size(text, why)) return *v;
            break;
        case property_kind::enumeration:
            for (std::size_t i = 0; i < enum_names_.size(); ++i)
                if (enum_names_[i] == text) return static_cast<std::int64_t>(i);
            throw property_value_error(fmt::format("property '{}' does not accept value '{}' "
                                                   "(expected one of: {})",
                                                   name_, text, joined_enum_names()));
        case property_kind::link:
        case property_kind::child:
            why = "not a value property";
            break;
        }
        throw property_value_error(fmt::format("property '{}' ({}) does not accept value '{}': {}",
                                               name_, type_, text, why));
    }

    /// `v` in text form (what parse() reads back).
    std::string print(const property_value& v) const {
        switch (kind_) {
        case property_kind::boolean:
            return std::get<bool>(v) ? "true" : "false";
        case property_kind::signed_integer:
            return fmt::format("{}", std::get<std::int64_t>(v));
        case property_kind::unsigned_integer:
        case property_kind::size:
            return fmt::format("{}", std::get<std::uint64_t>(v));
        case property_kind::enumeration: {
            const auto i = std::get<std::int64_t>(v);
            return i >= 0 && static_cast<std::size_t>(i) < enum_names_.size()
                       ? enum_names_[static_cast<std::size_t>(i)]
                       : fmt::format("{}", i);
        }
        case property_kind::string:
        case property_kind::link:
        case property_kind::child:
            break;
        }
        return std::get<std::string>(v);
    }

    /// Checks `v` against the kind and range (what a typed set does before
    /// calling the setter).
    /// Throws: property_value_error naming the property and the value;
    /// property_error when `v` is of another kind.
    void check(const property_value& v) const {
        const bool ok_kind = [&] {
            switch (kind_) {
            case property_kind::boolean:
                return std::holds_alternative<bool>(v);
            case property_kind::string:
                return std::holds_alternative<std::string>(v);
            case property_kind::signed_integer:
            case property_kind::enumeration:
                return std::holds_alternative<std::int64_t>(v);
            case property_kind::unsigned_integer:
            case property_kind::size:
                return std::holds_alternative<std::uint64_t>(v);
            case property_kind::link:
            case property_kind::child:
                return false;
            }
            return false;
        }();
        if (!ok_kind)
            throw property_error(fmt::format("property '{}' is of type {}", name_, type_));
        if (kind_ == property_kind::signed_integer) {
            const auto x = std::get<std::int64_t>(v);
            if (x < min_ || x > max_)
                throw property_value_error(fmt::format("property '{}' ({}) does not accept {}: "
                                                       "outside [{}, {}]",
                                                       name_, type_, x, min_, max_));
        } else if (kind_ == property_kind::unsigned_integer) {
            const auto x = std::get<std::uint64_t>(v);
            if (x > umax_)
                throw property_value_error(fmt::format(
                    "property '{}' ({}) does not accept {}: above {}", name_, type_, x, umax_));
        } else if (kind_ == property_kind::enumeration) {
            const auto x = std::get<std::int64_t>(v);
            if (x < 0 || static_cast<std::size_t>(x) >= enum_names_.size())
                throw property_value_error(
                    fmt::format("property '{}' ({}) has no value number {}", name_, type_, x));
        }
    }

    /// Calls the getter. The object must be of owner_type() (checked by the
    /// object layer).
    property_value get(const object& o) const { return access_->get(o); }
    /// Calls the setter with a value check() accepted. Throws: what it throws.
    void set(object& o, const property_value& v) const { access_->set(o, v); }

    /// The description iteration reports.
    property_info info(bool class_property) const {
        property_info i;
        i.name = name_;
        i.type = type_;
        i.description = description_;
        i.kind = kind_;
        i.class_property = class_property;
        i.writable = writable();
        if (default_) i.default_value = print(*default_);
        return i;
    }

private:
    friend struct detail::property_builder;

    property_def() = default;

    std::string joined_enum_names() const {
        std::string out;
        for (const std::string& n : enum_names_) out += (out.empty() ? "" : ", ") + n;
        return out;
    }

    template <class V>
    property_value default_of(const V& v) const {
        property_value pv;
        if constexpr (std::is_same_v<V, bool>) {
            pv = v;
        } else if constexpr (std::is_enum_v<V>) {
            pv = static_cast<std::int64_t>(v);
        } else if constexpr (std::is_integral_v<V>) {
            if (kind_ == property_kind::unsigned_integer || kind_ == property_kind::size) {
                QOMEM_ASSERT(!(std::is_signed_v<V> && v < 0),
                             "negative default for property '{}' ({})", name_, type_);
                pv = static_cast<std::uint64_t>(v);
            } else {
                QOMEM_ASSERT(
                    !(std::is_unsigned_v<V> &&
                      static_cast<std::uint64_t>(v) >
                          static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())),
                    "default for property '{}' ({}) out of range", name_, type_);
                pv = static_cast<std::int64_t>(v);
            }
        } else {
            const std::string s(v);
            if (kind_ == property_kind::enumeration) {
                std::int64_t index = -1;
                for (std::size_t i = 0; i < enum_names_.size(); ++i)
                    if (enum_names_[i] == s) index = static_cast<std::int64_t>(i);
                QOMEM_ASSERT(index >= 0, "default '{}' is not a value of enum property '{}' ({})",
                             s, name_, type_);
                pv = index;
            } else {
                pv = s;
            }
        }
        bool fits = true;
        try {
            check(pv);
        } catch (const property_error&) {
            fits = false;
        }
        QOMEM_ASSERT(fits, "default {} does not fit property '{}' ({})", print_any(pv), name_,
                     type_);
        return pv;
    }

    static std::string print_any(const property_value& v) {
        return std::visit(
            [](const auto& x) -> std::string {
                if constexpr (std::is_same_v<std::decay_t<decltype(x)>, std::string>)
                    return "'" + x + "'";
                else
                    return fmt::format("{}", x);
            },
            v);
    }

    std::string name_;
    std::string type_;
    std::string description_;
    property_kind kind_ = property_kind::boolean;
    std::int64_t min_ = 0;   // signed integers
    std::int64_t max_ = 0;   // signed integers
    std::uint64_t umax_ = 0; // unsigned integers and sizes
    std::vector<std::string> enum_names_;
    std::optional<property_value> default_;
    const type_info* owner_ = nullptr;
    std::shared_ptr<const detail::property_access> access_;
};

namespace detail {

struct property_builder {
    template <class T, class V, class Get, class Set>
    static property_def make(std::string name, std::string type, property_kind kind, Get get,
                             Set set) {
        property_def d;
        d.name_ = std::move(name);
        d.type_ = std::move(type);
        d.kind_ = kind;
        d.owner_ = &T::static_type();
        d.access_ =
            std::make_shared<const callable_access<T, V, Get, Set>>(std::move(get), std::move(set));
        if constexpr (std::is_integral_v<V> && !std::is_same_v<V, bool>) {
            if constexpr (std::is_signed_v<V>) {
                d.min_ = std::numeric_limits<V>::min();
                d.max_ = std::numeric_limits<V>::max();
            } else {
                d.umax_ = std::numeric_limits<V>::max();
            }
        }
        return d;
    }
    static void set_enum_names(property_def& d, std::initializer_list<std::string_view> names) {
        QOMEM_ASSERT(names.size() > 0, "enum property '{}' ({}) has no values", d.name_, d.type_);
        for (std::string_view n : names) d.enum_names_.emplace_back(n);
    }
};

template <class T, class M>
auto member_getter(M T::*m) {
    return [m](const T& t) { return t.*m; };
}
template <class T, class M>
auto member_setter(M T::*m) {
    return [m](T& t, M v) { t.*m = std::move(v); };
}

template <class F>
concept not_member_pointer = !std::is_member_pointer_v<F>;

} // namespace detail

// ---- factories ---------------------------------------------------------------------
//
// Each makes a descriptor for objects of type T, either from a data member
// (`&T::field`, read-write) or from a getter `V(const T&)` and a setter
// `void(T&, V)`, the setter being `nullptr` for a read-only property (QEMU's
// NULL setter). Chain .describe(text) and .with_default(v) as needed.

/// "bool".
template <class T>
property_def bool_property(std::string name, bool T::*member) {
    return detail::property_builder::make<T, bool>(std::move(name), "bool", property_kind::boolean,
                                                   detail::member_getter<T>(member),
                                                   detail::member_setter(member));
}
template <class T, detail::not_member_pointer Get, class Set = std::nullptr_t>
property_def bool_property(std::string name, Get get, Set set = nullptr) {
    return detail::property_builder::make<T, bool>(std::move(name), "bool", property_kind::boolean,
                                                   std::move(get), std::move(set));
}

/// "string".
template <class T>
property_def string_property(std::string name, std::string T::*member) {
    return detail::property_builder::make<T, std::string>(
        std::move(name), "string", property_kind::string, detail::member_getter<T>(member),
        detail::member_setter(member));
}
template <class T, detail::not_member_pointer Get, class Set = std::nullptr_t>
property_def string_property(std::string name, Get get, Set set = nullptr) {
    return detail::property_builder::make<T, std::string>(
        std::move(name), "string", property_kind::string, std::move(get), std::move(set));
}

/// "int8" ... "int64", "uint8" ... "uint64", after the member's type, whose
/// range values are checked against.
template <class T, std::integral M>
requires(!std::is_same_v<M, bool>) property_def int_property(std::string name, M T::*member) {
    return detail::property_builder::make<T, M>(
        std::move(name), std::string(detail::integer_type_name<M>()),
        std::is_signed_v<M> ? property_kind::signed_integer : property_kind::unsigned_integer,
        detail::member_getter<T>(member), detail::member_setter(member));
}
template <class T, detail::not_member_pointer Get, class Set = std::nullptr_t,
          class M = std::decay_t<std::invoke_result_t<Get, const T&>>>
requires(std::is_integral_v<M> && !std::is_same_v<M, bool>) property_def
    int_property(std::string name, Get get, Set set = nullptr) {
    return detail::property_builder::make<T, M>(
        std::move(name), std::string(detail::integer_type_name<M>()),
        std::is_signed_v<M> ? property_kind::signed_integer : property_kind::unsigned_integer,
        std::move(get), std::move(set));
}

/// "size": a byte count, parsed with parse_size's units.
template <class T, std::unsigned_integral M>
requires(!std::is_same_v<M, bool>) property_def size_property(std::string name, M T::*member) {
    return detail::property_builder::make<T, M>(std::move(name), "size", property_kind::size,
                                                detail::member_getter<T>(member),
                                                detail::member_setter(member));
}
template <class T, detail::not_member_pointer Get, class Set = std::nullptr_t,
          class M = std::decay_t<std::invoke_result_t<Get, const T&>>>
requires(std::is_unsigned_v<M> && !std::is_same_v<M, bool>) property_def
    size_property(std::string name, Get get, Set set = nullptr) {
    return detail::property_builder::make<T, M>(std::move(name), "size", property_kind::size,
                                                std::move(get), std::move(set));
}

/// An enumeration of type `enum_type` (QEMU's QAPI enum name, e.g.
/// "OnOffAuto") whose values are `names`: the enum value i is named names[i]
/// (E's values must be 0, 1, ... in that order).
template <class T, class E>
requires std::is_enum_v<E> property_def enum_property(std::string name, std::string enum_type,
                                                      std::initializer_list<std::string_view> names,
                                                      E T::*member) {
    auto d = detail::property_builder::make<T, E>(
        std::move(name), std::move(enum_type), property_kind::enumeration,
        detail::member_getter<T>(member), detail::member_setter(member));
    detail::property_builder::set_enum_names(d, names);
    return d;
}
template <class T, detail::not_member_pointer Get, class Set = std::nullptr_t,
          class E = std::decay_t<std::invoke_result_t<Get, const T&>>>
requires std::is_enum_v<E> property_def enum_property(std::string name, std::string enum_type,
                                                      std::initializer_list<std::string_view> names,
                                                      Get get, Set set = nullptr) {
    auto d = detail::property_builder::make<T, E>(std::move(name), std::move(enum_type),
                                                  property_kind::enumeration, std::move(get),
                                                  std::move(set));
    detail::property_builder::set_enum_names(d, names);
    return d;
}

} // namespace qomem
