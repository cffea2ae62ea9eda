// qomem/type.hpp — QOM types modelled with templates: type information, a
// parent chain, interfaces, and one class object per type (with its class
// properties and its interface class objects).
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
// leaf), then the instance_post_init hooks (leaf to root, as QEMU), and
// finalization the chain of destructors (leaf to root).
//
// A class that derives from a QOM type without its own QOMEM_OBJECT would
// silently take its base's name and identity; it is not an ObjectType, and
// every template that takes a QOM type (make, embedded, dynamic_cast_to,
// cast, class_of, register_type, ...) refuses it at compile time.
// QOMEM_ABSTRACT_OBJECT declares a type that cannot be instantiated (QEMU's
// TypeInfo.abstract): make<T> refuses it at compile time, creation by name
// with a type_error.
//
// Class objects. A type may declare `struct class_type : parent::class_type {...}`
// and `static void class_init(class_type&, qomem::type_tag<Self>)`. The class
// object of a type is made once, on first use, by copying its parent's class
// object (which is therefore made first) and then running the type's own
// class_init: parent-first, as in QEMU. It holds the class properties
// (object_class::add_property) and, for each interface the type implements
// (itself or through an ancestor), an interface class object of the
// interface's `interface_class_type` (derived from interface_class; plain
// interface_class if it declares none; initialised by the interface's
// `static void interface_class_init(interface_class_type&)` if it has one),
// copied from the parent's when the parent implements it too; class_init
// reaches it with interface_class_of<I>(k) (QEMU's check-qom-interface
// pattern).
//
// Instance post-init. A type may declare
// `void instance_post_init(qomem::type_tag<Self>)`; after every constructor
// has run (and the class properties' defaults are applied), these run from
// the leaf type to the root, each type's own once.
#pragma once

#include <array>
#include <concepts>
#include <cstddef>
#include <memory>
#include <span>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <qomem/assert.hpp>
#include <qomem/property.hpp>

namespace qomem {

class object;
struct type_info;
class object_class;
struct interface_class;

namespace detail {
template <class T>
struct class_builder;
} // namespace detail

/// A tag naming a type; used to select a type's own class_init and
/// instance_post_init.
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
    const type_info* parent;                     ///< null for "object" and interfaces
    std::span<const interface_entry> interfaces; ///< declared by this type itself
    bool is_interface;
    bool is_abstract; ///< QOMEM_ABSTRACT_OBJECT or a C++ abstract class
    /// The class object (made on first use); null for interfaces.
    const object_class& (*class_fn)();
    /// Makes an instance holding its creation reference; null when the type
    /// cannot be made by name (abstract, an interface, no public default
    /// constructor).
    object* (*create)();

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

    /// QEMU's object_class_dynamic_cast test: this type is `t`, derives from
    /// it, or implements the interface `t`. The one check links, casts and
    /// path resolution use.
    constexpr bool conforms_to(const type_info& t) const noexcept {
        return t.is_interface ? find_interface(t) != nullptr : is_a(t);
    }
};

/// The class object of an interface, one per (object type, interface) pair
/// (QEMU's InterfaceClass). Interfaces extend it with a nested
/// `struct interface_class_type : qomem::interface_class {...}`.
struct interface_class {
    const type_info* type = nullptr;          ///< the interface
    const type_info* concrete_type = nullptr; ///< the object type whose class holds it

    interface_class() = default;
    interface_class(const interface_class&) = default;
    interface_class& operator=(const interface_class&) = default;
    /// Virtual: a class object owns its interfaces' class objects through
    /// this base.
    virtual ~interface_class() = default;
};

/// The class object every type shares (QEMU's ObjectClass). Types extend it by
/// deriving their own class_type from their parent's.
class object_class {
public:
    const type_info* type = nullptr;

    object_class() = default;
    object_class(const object_class& o) : type(o.type), properties_(o.properties_) {
        for (const slot& s : o.interfaces_) interfaces_.push_back(s.copy());
    }
    object_class& operator=(const object_class& o) {
        if (this != &o) {
            object_class tmp(o);
            type = tmp.type;
            properties_ = std::move(tmp.properties_);
            interfaces_ = std::move(tmp.interfaces_);
        }
        return *this;
    }
    object_class(object_class&&) noexcept = default;
    object_class& operator=(object_class&&) noexcept = default;
    ~object_class() = default;

    /// Adds a class property (QEMU's object_class_property_add_*), inherited
    /// by every subtype. Call it from class_init.
    /// Requires (asserted): no class property of that name in this class or
    /// its ancestors; `def` works on this class's type (or an ancestor).
    void add_property(property_def def) {
        QOMEM_ASSERT(!find_property(def.name()), "class {} already has a property named '{}'",
                     type ? type->name : std::string_view("?"), def.name());
        QOMEM_ASSERT(!type || type->is_a(def.owner_type()),
                     "property '{}' of {} cannot be a class property of {}", def.name(),
                     def.owner_type().name, type ? type->name : std::string_view("?"));
        properties_.push_back(std::move(def));
    }
    /// The class property named `name`, or null.
    const property_def* find_property(std::string_view name) const noexcept {
        for (const property_def& d : properties_)
            if (d.name() == name) return &d;
        return nullptr;
    }
    /// Every class property, the root type's first, each class's in the
    /// order they were added.
    std::span<const property_def> properties() const noexcept { return properties_; }

    /// The class object of interface `iface` that this class holds, or null
    /// when its type does not implement `iface` (see interface_class_of).
    const interface_class* interface(const type_info& iface) const noexcept;
    interface_class* interface(const type_info& iface) noexcept;

private:
    template <class T>
    friend struct detail::class_builder;

    struct slot {
        const type_info* iface = nullptr;
        std::unique_ptr<interface_class> cls;
        std::unique_ptr<interface_class> (*clone)(const interface_class&) = nullptr;
        slot copy() const { return {iface, clone(*cls), clone}; }
    };

    std::vector<property_def> properties_;
    std::vector<slot> interfaces_;
};

/// The object type T was declared with QOMEM_OBJECT (or QOMEM_ABSTRACT_OBJECT)
/// in its own class body: false for a class that derives from a QOM type
/// without declaring itself, which would otherwise pass for its base.
template <class T>
concept ObjectType = std::is_class_v<T> && std::is_base_of_v<object, T> && requires {
    typename T::qomem_declared_type;
} && std::is_same_v<typename T::qomem_declared_type, T>;

/// T was declared with QOMEM_INTERFACE in its own body.
template <class T>
concept InterfaceType = std::is_class_v<T> && requires {
    typename T::qomem_declared_interface;
} && std::is_same_v<typename T::qomem_declared_interface, T>;

/// An object type or an interface: what casts accept.
template <class T>
concept QomType = ObjectType<T> || InterfaceType<T>;

inline const interface_class* object_class::interface(const type_info& iface) const noexcept {
    for (const slot& s : interfaces_)
        if (s.iface == &iface) return s.cls.get();
    return nullptr;
}
inline interface_class* object_class::interface(const type_info& iface) noexcept {
    return const_cast<interface_class*>(static_cast<const object_class*>(this)->interface(iface));
}

namespace detail {

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
    static_assert((InterfaceType<Is> && ...),
                  "QOMEM_OBJECT: every interface must be declared with QOMEM_INTERFACE");
    static constexpr std::array<interface_entry, sizeof...(Is)> value{
        interface_entry{&Is::static_type(), &interface_cast<T, Is>}...};
};

/// The class type of interface I: its own interface_class_type, or
/// interface_class. (Not `class_type`: an object type implementing I would
/// then inherit two.)
template <class I>
struct interface_class_of_t {
    using type = interface_class;
};
template <class I>
requires requires { typename I::interface_class_type; }
struct interface_class_of_t<I> {
    using type = typename I::interface_class_type;
};

template <class T>
concept creatable = ObjectType<T> && !T::qomem_abstract && !std::is_abstract_v<T> && requires {
    ::new (static_cast<void*>(nullptr)) T();
};

/// Defined in object.hpp (it needs make<T>): makes a T with its creation
/// reference, for creation by name.
template <class T>
object* create_instance();

template <class T>
const object_class& class_base_of();

/// Calls the hooks a type declares (QOMEM_OBJECT makes this a friend, so
/// the hooks may be private).
struct type_hooks {
    template <class T>
    static void class_init(typename T::class_type& k) {
        // Checked here, not in a concept, so that a private hook counts.
        if constexpr (requires { T::class_init(k, type_tag<T>{}); })
            T::class_init(k, type_tag<T>{});
    }
    /// instance_post_init of T, then of each ancestor: leaf to root.
    template <class T>
    static void post_init(T& obj) {
        if constexpr (requires { obj.T::instance_post_init(type_tag<T>{}); })
            obj.T::instance_post_init(type_tag<T>{});
        if constexpr (!std::is_void_v<typename T::parent_type>)
            post_init<typename T::parent_type>(obj);
    }
};

template <class T>
struct type_holder {
    static constexpr const type_info* parent_info() noexcept {
        if constexpr (std::is_void_v<typename T::parent_type>)
            return nullptr;
        else
            return &type_holder<typename T::parent_type>::info;
    }
    static constexpr object* (*create_fn() noexcept)() {
        if constexpr (creatable<T>)
            return &create_instance<T>;
        else
            return nullptr;
    }
    static constexpr type_info info{
        T::type_name,
        parent_info(),
        std::span<const interface_entry>(interface_table<T, typename T::interface_types>::value),
        false,
        T::qomem_abstract || std::is_abstract_v<T>,
        &class_base_of<T>,
        create_fn()};
};

template <class I>
struct interface_holder {
    static constexpr type_info info{I::type_name, nullptr, {}, true, true, nullptr, nullptr};
};

} // namespace detail

/// The class object of interface I held by class object `k` (made for a type
/// implementing I), or null when that type does not implement I. Use it in
/// class_init to fill in the interface's class (QEMU's TEST_IF_CLASS(oc)).
template <class I>
auto* interface_class_of(object_class& k) noexcept {
    static_assert(InterfaceType<I>,
                  "interface_class_of<I>: I must be declared with QOMEM_INTERFACE");
    using C = typename detail::interface_class_of_t<I>::type;
    return static_cast<C*>(k.interface(I::static_type()));
}
template <class I>
const auto* interface_class_of(const object_class& k) noexcept {
    static_assert(InterfaceType<I>,
                  "interface_class_of<I>: I must be declared with QOMEM_INTERFACE");
    using C = typename detail::interface_class_of_t<I>::type;
    return static_cast<const C*>(k.interface(I::static_type()));
}

template <class T>
struct detail::class_builder {
    template <class... Is>
    static void add_interfaces(object_class& c, detail::type_list<Is...>) {
        (add_interface<Is>(c), ...);
    }
    template <class I>
    static void add_interface(object_class& c) {
        if (c.interface(I::static_type())) return; // inherited: keep the parent's copy
        using C = typename detail::interface_class_of_t<I>::type;
        static_assert(
            std::is_base_of_v<interface_class, C>,
            "an interface's interface_class_type must derive from qomem::interface_class");
        auto fresh = std::make_unique<C>();
        fresh->type = &I::static_type();
        if constexpr (requires { I::interface_class_init(*fresh); })
            I::interface_class_init(*fresh);
        c.interfaces_.push_back({&I::static_type(), std::move(fresh), [](const interface_class& x) {
                                     return std::unique_ptr<interface_class>(
                                         std::make_unique<C>(static_cast<const C&>(x)));
                                 }});
    }
    static void set_concrete(object_class& c, const type_info& t) {
        for (auto& s : c.interfaces_) s.cls->concrete_type = &t;
    }
};

/// The class object of T, made on first use: a copy of the parent's class
/// object (made first), T's interface class objects added, then T's own
/// class_init, if it declares one. Thread-safe (function-local static).
template <ObjectType T>
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
        detail::class_builder<T>::add_interfaces(c, typename T::interface_types{});
        detail::class_builder<T>::set_concrete(c, T::static_type());
        detail::type_hooks::class_init<T>(c);
        return c;
    }();
    return k;
}

template <class T>
const object_class& detail::class_base_of() {
    return class_of<T>();
}

} // namespace qomem

/// Declares a QOM object type inside its class body: its name, its parent type
/// and the interfaces it implements (zero or more). Leaves the access at private.
#define QOMEM_OBJECT(Self, Name, Parent, ...)                                                      \
    QOMEM_DETAIL_OBJECT(false, Self, Name, Parent, __VA_ARGS__)

/// As QOMEM_OBJECT, for a type that cannot be instantiated itself, only its
/// subtypes (QEMU's TypeInfo.abstract).
#define QOMEM_ABSTRACT_OBJECT(Self, Name, Parent, ...)                                             \
    QOMEM_DETAIL_OBJECT(true, Self, Name, Parent, __VA_ARGS__)

#define QOMEM_DETAIL_OBJECT(Abstract, Self, Name, Parent, ...)                                     \
public:                                                                                            \
    using qomem_declared_type = Self;                                                              \
    using parent_type = Parent;                                                                    \
    using interface_types = ::qomem::detail::type_list<__VA_ARGS__>;                               \
    static constexpr bool qomem_abstract = Abstract;                                               \
    static constexpr ::std::string_view type_name = Name;                                          \
    static constexpr const ::qomem::type_info& static_type() noexcept {                            \
        return ::qomem::detail::type_holder<Self>::info;                                           \
    }                                                                                              \
    const ::qomem::type_info& type() const noexcept override { return static_type(); }             \
                                                                                                   \
private:                                                                                           \
    friend struct ::qomem::detail::type_hooks;

/// Declares a QOM interface type (a class with pure virtual functions that
/// object types implement by deriving from it).
// Self names a type (Self&, Self()): it cannot be parenthesised.
// NOLINTBEGIN(bugprone-macro-parentheses)
#define QOMEM_INTERFACE(Self, Name)                                                                \
public:                                                                                            \
    using qomem_declared_interface = Self;                                                         \
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
// NOLINTEND(bugprone-macro-parentheses)
