// qomem/type.hpp — QOM types modelled with templates: type information, a
// parent chain, interfaces, and one class object per type.
//
// QEMU describes a type with a TypeInfo (name, parent, interfaces, class and
// instance hooks) and checks casts against it at run time. qomem derives the
// same information from C++ classes. A type names itself, its parent and the
// interfaces it implements with QOMEM_OBJECT:
//
//     struct serial_port {                     // an interface
//         QOMEM_INTERFACE(serial_port, "serial-port")
//         virtual void put(char c) = 0;
//     };
//     class uart : public qomem::device, public serial_port {
//         QOMEM_OBJECT(uart, "uart", qomem::device, serial_port)
//     public:
//         void put(char c) override;
//     };
//
// (no semicolon after either macro) and then `qomem::dynamic_cast_to<uart>(obj)` / `dynamic_cast_to<serial_port>(obj)`
// return null on mismatch, while `qomem::cast<uart>(obj)` reports a mismatch
// as misuse. Instance initialisation is the chain of C++ constructors (root to
// leaf) and finalization the chain of destructors (leaf to root).
//
// Class objects. A type may declare `struct class_type : parent::class_type {...}`
// and `static void class_init(class_type&, qomem::type_tag<Self>)`. The class
// object of a type is made once, on first use, by copying its parent's class
// object (which is therefore made first) and then running the type's own
// class_init: parent-first, as in QEMU.
#pragma once

#include <array>
#include <cstddef>
#include <span>
#include <string_view>
#include <type_traits>

namespace qomem {

class object;
struct type_info;

/// A tag naming a type; used to select a type's own class_init.
template <class T>
struct type_tag {};

/// How an object type reaches an interface it implements.
struct interface_entry {
    const type_info* type;
    void* (*cast)(object*) noexcept; ///< object* -> interface* (as void*)
};

/// Run-time description of a QOM type (QEMU's TypeImpl).
struct type_info {
    std::string_view name;
    const type_info* parent;                    ///< null for "object" and interfaces
    std::span<const interface_entry> interfaces; ///< declared by this type itself
    bool is_interface;

    /// True when this type is `t` or derives from it.
    constexpr bool is_a(const type_info& t) const noexcept {
        for (const type_info* p = this; p; p = p->parent)
            if (p == &t) return true;
        return false;
    }

    /// The entry through which this type (or an ancestor) implements `iface`.
    constexpr const interface_entry* find_interface(const type_info& iface) const noexcept {
        for (const type_info* p = this; p; p = p->parent)
            for (const interface_entry& e : p->interfaces)
                if (e.type == &iface) return &e;
        return nullptr;
    }
};

/// The class object every type shares (QEMU's ObjectClass). Types extend it by
/// deriving their own class_type from their parent's.
struct object_class {
    const type_info* type = nullptr;
};

namespace detail {

template <class T>
concept has_static_type = requires { { T::static_type() } -> std::same_as<const type_info&>; };

template <class T, class I>
void* interface_cast(object* o) noexcept {
    return static_cast<I*>(static_cast<T*>(o));
}

template <class... Is>
struct type_list {};

template <class T, class List>
struct interface_table;

template <class T, class... Is>
struct interface_table<T, type_list<Is...>> {
    static constexpr std::array<interface_entry, sizeof...(Is)> value{
        interface_entry{&Is::static_type(), &interface_cast<T, Is>}...};
};

template <class T>
struct type_holder {
    static constexpr const type_info* parent_info() noexcept {
        if constexpr (std::is_void_v<typename T::parent_type>)
            return nullptr;
        else
            return &type_holder<typename T::parent_type>::info;
    }
    static constexpr type_info info{
        T::type_name, parent_info(),
        std::span<const interface_entry>(interface_table<T, typename T::interface_types>::value),
        false};
};

template <class I>
struct interface_holder {
    static constexpr type_info info{I::type_name, nullptr, {}, true};
};

template <class T>
concept has_own_class_init =
    requires(typename T::class_type& k) { T::class_init(k, type_tag<T>{}); };

} // namespace detail

/// The class object of T, made on first use: a copy of the parent's class
/// object (made first) followed by T's own class_init, if it declares one.
/// Thread-safe (function-local static).
template <class T>
const typename T::class_type& class_of() {
    static const typename T::class_type k = [] {
        typename T::class_type c{};
        if constexpr (!std::is_void_v<typename T::parent_type>) {
            using parent_class = typename T::parent_type::class_type;
            static_assert(std::is_base_of_v<parent_class, typename T::class_type> ||
                              std::is_same_v<parent_class, typename T::class_type>,
                          "a type's class_type must derive from its parent's class_type");
            static_cast<parent_class&>(c) = class_of<typename T::parent_type>();
        }
        c.type = &T::static_type();
        if constexpr (detail::has_own_class_init<T>) T::class_init(c, type_tag<T>{});
        return c;
    }();
    return k;
}

} // namespace qomem

/// Declares a QOM object type inside its class body: its name, its parent type
/// and the interfaces it implements (zero or more). Leaves the access at private.
#define QOMEM_OBJECT(Self, Name, Parent, ...)                                                      \
public:                                                                                            \
    using parent_type = Parent;                                                                    \
    using interface_types = ::qomem::detail::type_list<__VA_ARGS__>;                               \
    static constexpr ::std::string_view type_name = Name;                                          \
    static constexpr const ::qomem::type_info& static_type() noexcept {                            \
        return ::qomem::detail::type_holder<Self>::info;                                           \
    }                                                                                              \
    const ::qomem::type_info& type() const noexcept override { return static_type(); }             \
                                                                                                   \
private:

/// Declares a QOM interface type (a class with pure virtual functions that
/// object types implement by deriving from it).
#define QOMEM_INTERFACE(Self, Name)                                                                \
public:                                                                                            \
    static constexpr ::std::string_view type_name = Name;                                          \
    static constexpr const ::qomem::type_info& static_type() noexcept {                            \
        return ::qomem::detail::interface_holder<Self>::info;                                      \
    }                                                                                              \
                                                                                                   \
protected:                                                                                         \
    Self() = default;                                                                              \
    Self(const Self&) = default;                                                                   \
    Self& operator=(const Self&) = default;                                                        \
    ~Self() = default;                                                                             \
                                                                                                   \
public:
