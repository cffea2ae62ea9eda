// qomem/type_registry.hpp — QOM types by name: registration, lookup, creation
// by type name (abstract types refused), casts by name and the list of
// types (QEMU's type_register_static, object_class_by_name, object_new,
// object_dynamic_cast and object_class_get_list).
//
// Types are C++ classes, so the compiler knows them all; the registry only
// maps names to them, for what arrives as text (a command line, a machine
// description, QMP). Register a type once, at namespace scope or at startup:
//
//     QOMEM_REGISTER_TYPE(my_nic)                  // its ancestors and interfaces too
//     auto obj = qomem::make_by_name("my-nic");    // ref_ptr<object>
//     qomem::dynamic_cast_by_name(obj.get(), "device");   // obj.get()
//     qomem::make_by_name("device");               // type_error if abstract
//
// The registry is process-wide and thread-safe (a mutex around the name
// table; lookups take it too, they are not on any hot path).
#pragma once

#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include <qomem/object.hpp>

namespace qomem {

namespace detail {
struct type_registry_state {
    std::mutex mutex;
    std::map<std::string, const type_info*, std::less<>> types;
    static type_registry_state& get() {
        static type_registry_state s;
        return s;
    }
};
} // namespace detail

/// Registers `t`, its ancestors and the interfaces they implement under
/// their names (QEMU's type_register_static). Registering a type again is a
/// no-op.
/// Requires (asserted, before anything is registered): no other type is
/// registered under any of those names.
/// Complexity: O((depth + interfaces) · log n).
inline void register_type(const type_info& t) {
    auto& r = detail::type_registry_state::get();
    std::lock_guard lock(r.mutex);
    std::vector<const type_info*> all;
    for (const type_info* p = &t; p; p = p->parent) {
        all.push_back(p);
        for (const interface_entry& e : p->interfaces) all.push_back(e.type);
    }
    for (const type_info* x : all) {
        auto it = r.types.find(x->name);
        QOMEM_ASSERT(it == r.types.end() || it->second == x,
                     "two types are registered as '{}' (a type name must be unique)", x->name);
    }
    for (const type_info* x : all) r.types.emplace(std::string(x->name), x);
}
template <QomType T>
void register_type() {
    register_type(T::static_type());
}

/// The type registered as `name`, or null.
inline const type_info* find_type(std::string_view name) {
    auto& r = detail::type_registry_state::get();
    std::lock_guard lock(r.mutex);
    auto it = r.types.find(name);
    return it == r.types.end() ? nullptr : it->second;
}

/// Every registered type that conforms to `base` (is it, derives from it or
/// implements it; null: every type), abstract ones and interfaces only when
/// `include_abstract`, sorted by name (QEMU's object_class_get_list).
inline std::vector<const type_info*> registered_types(const type_info* base = nullptr,
                                                      bool include_abstract = false) {
    auto& r = detail::type_registry_state::get();
    std::lock_guard lock(r.mutex);
    std::vector<const type_info*> out;
    for (const auto& [name, t] : r.types) {
        if (!include_abstract && (t->is_abstract || t->is_interface)) continue;
        if (base && !t->conforms_to(*base)) continue;
        out.push_back(t);
    }
    return out;
}

/// QEMU's object_new(typename): a new object of the type registered as
/// `name` (constructors, class defaults, post-init hooks, as make<T>).
/// Throws: type_error naming `name` when no type is registered under it, it
/// is an interface or abstract, or it has no public default constructor;
/// what make<T> throws.
inline ref_ptr<object> make_by_name(std::string_view name) {
    const type_info* t = find_type(name);
    if (!t) throw type_error(fmt::format("no type is registered as '{}'", name));
    if (t->is_interface)
        throw type_error(fmt::format("type '{}' is an interface: it has no instances", name));
    if (t->is_abstract) throw type_error(fmt::format("type '{}' is abstract", name));
    if (!t->create)
        throw type_error(fmt::format("type '{}' cannot be made by name: it has no public default "
                                     "constructor",
                                     name));
    return ref_ptr<object>(t->create(), false);
}

/// QEMU's object_dynamic_cast(obj, typename): `obj` when its type is, derives
/// from or implements the type named `name`, else null (also for a null
/// `obj` or an unknown name). The names on obj's own type chain are
/// compared, so `name` need not be registered.
inline object* dynamic_cast_by_name(object* obj, std::string_view name) noexcept {
    if (!obj) return nullptr;
    for (const type_info* p = &obj->type(); p; p = p->parent) {
        if (p->name == name) return obj;
        for (const interface_entry& e : p->interfaces)
            if (e.type->name == name) return obj;
    }
    return nullptr;
}
inline const object* dynamic_cast_by_name(const object* obj, std::string_view name) noexcept {
    return dynamic_cast_by_name(const_cast<object*>(obj), name);
}

/// QEMU's object_dynamic_cast_assert: as dynamic_cast_by_name, a mismatch
/// being misuse reported through the assertion handler.
inline object& cast_by_name(object& obj, std::string_view name) {
    object* r = dynamic_cast_by_name(&obj, name);
    QOMEM_ASSERT(r, "object {} of type {} is not an instance of type {}",
                 static_cast<const void*>(&obj), obj.type().name, name);
    return *r;
}

} // namespace qomem

#define QOMEM_DETAIL_CAT2(a, b) a##b
#define QOMEM_DETAIL_CAT(a, b) QOMEM_DETAIL_CAT2(a, b)

/// At namespace scope: registers T (with its ancestors and interfaces)
/// during static initialisation (QEMU's type_init). No semicolon needed.
#define QOMEM_REGISTER_TYPE(T)                                                                     \
    [[maybe_unused]] static const bool QOMEM_DETAIL_CAT(qomem_type_registered_, __LINE__) =        \
        (::qomem::register_type<T>(), true);
