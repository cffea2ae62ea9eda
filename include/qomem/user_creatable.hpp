// qomem/user_creatable.hpp — objects made from text: QEMU's
// object_new_with_props (a type name, a parent, an id and name=value
// pairs) and user-creatable objects under /objects (-object, object-add,
// object-del).
//
//     QOMEM_REGISTER_TYPE(rng_random)              // implements user_creatable
//     qomem::object& rng = qomem::user_creatable_add(
//         *root, "rng-random", "rng0", qomem::parse_settings("filename=/dev/urandom"));
//     // rng is /objects/rng0; /objects holds the only reference
//     qomem::user_creatable_del(*root, "rng0");
//
// Each refusal (an unknown type or property, a bad value or enum value, an
// id in use, a complete() that throws) leaves nothing behind: no new object
// alive, no property added.
#pragma once

#include <initializer_list>
#include <span>
#include <string>
#include <string_view>

#include <qomem/object.hpp>
#include <qomem/type_registry.hpp>

namespace qomem {

/// QEMU's user-creatable interface: types that -object / object-add may make.
struct user_creatable {
    QOMEM_INTERFACE(user_creatable, "user-creatable")

    /// QEMU's UserCreatableClass::complete: runs once the properties are set
    /// and the object is in place. Throw to refuse; the object is removed.
    virtual void complete() {}
    /// QEMU's can_be_deleted: false while something uses the object.
    virtual bool can_be_deleted() const { return true; }
};

/// QEMU's object_new_with_props: makes an object of the type registered as
/// `type` (make_by_name), sets each property from text (parse_property, in
/// order), adds it as child `id` of `parent` and, when it is user_creatable,
/// completes it.
/// Effects: `parent` holds the only reference to the returned object.
/// Complexity: one lookup and setter per setting.
/// Throws, leaving nothing behind: type_error (unknown, abstract type);
/// property_error for an unknown or read-only property or an `id` already
/// used in `parent`; property_value_error for a value or enum value the
/// property does not accept; path_error for a link path; what the object's
/// setters or complete() throw.
inline object& new_with_props(std::string_view type, object& parent, std::string_view id,
                              std::span<const property_setting> props) {
    ref_ptr<object> obj = make_by_name(type); // released on any throw below
    for (const property_setting& s : props) obj->parse_property(s.name, s.value);
    parent.add_child(id, *obj);
    if (auto* uc = dynamic_cast_to<user_creatable>(obj.get())) {
        try {
            uc->complete();
        } catch (...) {
            unparent(*obj);
            throw;
        }
    }
    object& result = *obj;
    return result; // obj's reference goes: the parent's is the only one
}
inline object& new_with_props(std::string_view type, object& parent, std::string_view id,
                              std::initializer_list<property_setting> props) {
    return new_with_props(type, parent, id,
                          std::span<const property_setting>(props.begin(), props.size()));
}

/// The "/objects" container of `in_tree`'s tree (QEMU's
/// object_get_objects_root), added to its topmost ancestor on first use.
/// Throws: property_error if that ancestor has a property "objects" that is
/// not a container.
inline container& objects_root(object& in_tree) {
    object& top = in_tree.tree_root();
    if (object* existing = top.child("objects")) {
        if (auto* c = dynamic_cast_to<container>(existing)) return *c;
        throw property_error(fmt::format("'objects' of {} is a {}, not a container",
                                         top.type().name, existing->type().name));
    }
    auto c = make<container>();
    top.add_child("objects", *c);
    return *c;
}

/// QEMU's user_creatable_add_type (-object, object-add): new_with_props
/// under /objects of `in_tree`'s tree, for a user_creatable type.
/// Effects: /objects (made if missing) holds the only reference.
/// Throws, leaving nothing behind: type_error when `type` is unknown, not
/// user_creatable or abstract; property_value_error for a malformed id (a
/// letter, then letters, digits, '-', '.', '_'); property_error for an id in
/// use; as new_with_props otherwise.
inline object& user_creatable_add(object& in_tree, std::string_view type, std::string_view id,
                                  std::span<const property_setting> props) {
    const type_info* t = find_type(type);
    if (!t) throw type_error(fmt::format("invalid object type '{}'", type));
    if (!t->conforms_to(user_creatable::static_type()))
        throw type_error(fmt::format("object type '{}' is not user-creatable", type));
    if (t->is_abstract) throw type_error(fmt::format("object type '{}' is abstract", type));
    if (!detail::id_wellformed(id))
        throw property_value_error(fmt::format("invalid object id '{}': a letter, then letters, "
                                               "digits, '-', '.' or '_'",
                                               id));
    container& objects = objects_root(in_tree);
    if (objects.has_property(id))
        throw property_error(fmt::format("an object with id '{}' already exists", id));
    return new_with_props(type, objects, id, props);
}
inline object& user_creatable_add(object& in_tree, std::string_view type, std::string_view id,
                                  std::initializer_list<property_setting> props) {
    return user_creatable_add(in_tree, type, id,
                              std::span<const property_setting>(props.begin(), props.size()));
}

/// QEMU's user_creatable_del (object-del): unparents /objects/<id>.
/// Effects: drops /objects' reference (finalizing the object unless held
/// elsewhere).
/// Throws: path_error when there is no such object; property_error when it
/// is not user_creatable or its can_be_deleted() says no (nothing changed).
inline void user_creatable_del(object& in_tree, std::string_view id) {
    object* obj = objects_root(in_tree).child(id);
    if (!obj) throw path_error(fmt::format("object '{}' not found in /objects", id));
    auto* uc = dynamic_cast_to<user_creatable>(obj);
    if (!uc) throw property_error(fmt::format("object '{}' is not user-creatable", id));
    if (!uc->can_be_deleted())
        throw property_error(fmt::format("object '{}' is in use and cannot be deleted", id));
    unparent(*obj);
}

} // namespace qomem
