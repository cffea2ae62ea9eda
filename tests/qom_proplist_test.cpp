// The behaviours QEMU's own QOM unit tests pin (tests/unit/check-qom-proplist.c
// and check-qom-interface.c), written afresh for qomem: object creation from
// name=value pairs, user-creatable objects under /objects, enum properties,
// property iteration, partial paths, and interfaces with class objects of
// their own. (The "delchild" case is in object_test.cpp, in every order.)
#include <cstdint>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <qomem/object.hpp>
#include <qomem/type_registry.hpp>
#include <qomem/user_creatable.hpp>

#include "test_support.hpp"

using qomem_test::leak_check;
using qomem_test::throwing_assertions;
using names = std::set<std::string>;

namespace {

// QEMU's "qemu-dummy": a class string "sv" and enum "av", an instance bool
// "bv"; user-creatable.
class dummy : public qomem::object, public qomem::user_creatable {
    QOMEM_OBJECT(dummy, "qemu-dummy", qomem::object, qomem::user_creatable)
public:
    enum class animal { frog, alligator, platypus };
    bool bv = false;
    animal av = animal::frog;
    std::string sv;

    dummy() { add_property(qomem::bool_property("bv", &dummy::bv)); }
    static void class_init(class_type& k, qomem::type_tag<dummy>) {
        k.add_property(qomem::string_property("sv", &dummy::sv));
        k.add_property(qomem::enum_property("av", "DummyAnimal", {"frog", "alligator", "platypus"},
                                            &dummy::av));
    }

    // For the tests of complete() and can_be_deleted().
    static inline bool refuse_complete = false;
    bool in_use = false;
    void complete() override {
        if (refuse_complete) throw std::runtime_error("complete refused");
    }
    bool can_be_deleted() const override { return !in_use; }
};
QOMEM_REGISTER_TYPE(dummy)

class not_creatable_by_users : public qomem::object {
    QOMEM_OBJECT(not_creatable_by_users, "test-internal", qomem::object)
public:
    not_creatable_by_users() = default;
};
QOMEM_REGISTER_TYPE(not_creatable_by_users)

names property_names(const qomem::object& o) {
    names out;
    o.for_each_property([&](const qomem::property_info& p) { out.insert(p.name); });
    return out;
}

} // namespace

TEST_CASE("proplist createv: new_with_props makes the object, sets its properties and adds it "
          "under its id",
          "[qom][proplist]") {
    leak_check leaks;
    auto root = qomem::container::make_root();
    qomem::container& parent = qomem::objects_root(*root);
    qomem::object& obj = qomem::new_with_props(
        "qemu-dummy", parent, "dummy0",
        {{"bv", "yes"}, {"sv", "Hiss hiss hiss"}, {"av", "platypus"}});
    auto& d = qomem::cast<dummy>(obj);
    CHECK(d.sv == "Hiss hiss hiss");
    CHECK(d.bv);
    CHECK(d.av == dummy::animal::platypus);
    CHECK(qomem::resolve_path_component(parent, "dummy0") == &obj);
    CHECK(obj.canonical_path() == "/objects/dummy0");
    CHECK(obj.ref_count() == 1); // the parent's only
    qomem::unparent(obj);
    CHECK(qomem::resolve_path_component(parent, "dummy0") == nullptr);
}

TEST_CASE("proplist createcmdline: -object text under /objects; a clashing id is refused; "
          "object-del and create again",
          "[qom][proplist]") {
    leak_check leaks;
    auto root = qomem::container::make_root();
    const auto params = qomem::parse_settings("bv=yes,sv=Hiss hiss hiss,av=platypus");

    qomem::object& first = qomem::user_creatable_add(*root, "qemu-dummy", "dev0", params);
    CHECK(first.canonical_path() == "/objects/dev0");
    CHECK(qomem::cast<dummy>(first).av == dummy::animal::platypus);

    CHECK_THROWS_AS(qomem::user_creatable_add(*root, "qemu-dummy", "dev0", params),
                    qomem::property_error);
    CHECK(qomem::resolve_path_component(qomem::objects_root(*root), "dev0") == &first);
    CHECK(qomem::live_objects()["qemu-dummy"] == 1); // the refused one is gone

    qomem::user_creatable_del(*root, "dev0");
    CHECK(qomem::resolve_path_component(qomem::objects_root(*root), "dev0") == nullptr);

    qomem::object& again = qomem::user_creatable_add(*root, "qemu-dummy", "dev0", params);
    auto& d = qomem::cast<dummy>(again);
    CHECK(d.sv == "Hiss hiss hiss");
    CHECK(d.bv);
    CHECK(d.av == dummy::animal::platypus);
    CHECK(qomem::resolve_path(*root, "/objects/dev0") == &again);
}

TEST_CASE("proplist badenum: an unknown enum value is refused by name and leaves nothing",
          "[qom][proplist]") {
    leak_check leaks;
    auto root = qomem::container::make_root();
    qomem::container& parent = qomem::objects_root(*root);
    CHECK_THROWS_AS(qomem::new_with_props("qemu-dummy", parent, "dummy0",
                                          {{"bv", "yes"}, {"sv", "Hiss hiss hiss"}, {"av", "yeti"}}),
                    qomem::property_value_error);
    CHECK_THROWS_WITH(qomem::new_with_props("qemu-dummy", parent, "dummy0", {{"av", "yeti"}}),
                      Catch::Contains("property 'av' does not accept value 'yeti'"));
    CHECK(qomem::resolve_path_component(parent, "dummy0") == nullptr);
    CHECK(qomem::live_objects().count("qemu-dummy") == 0);
}

TEST_CASE("new_with_props leaves nothing behind on any refusal", "[qom][proplist]") {
    leak_check leaks;
    auto root = qomem::container::make_root();
    qomem::container& parent = qomem::objects_root(*root);
    qomem::new_with_props("qemu-dummy", parent, "taken", {});

    SECTION("an unknown property") {
        CHECK_THROWS_AS(qomem::new_with_props("qemu-dummy", parent, "d", {{"iv", "1"}}),
                        qomem::property_error);
        CHECK_THROWS_WITH(qomem::new_with_props("qemu-dummy", parent, "d", {{"iv", "1"}}),
                          Catch::Contains("'iv'"));
    }
    SECTION("a bad value") {
        CHECK_THROWS_AS(qomem::new_with_props("qemu-dummy", parent, "d", {{"bv", "perhaps"}}),
                        qomem::property_value_error);
    }
    SECTION("an unknown or abstract type") {
        CHECK_THROWS_AS(qomem::new_with_props("no-such-type", parent, "d", {}), qomem::type_error);
        CHECK_THROWS_AS(qomem::new_with_props("object", parent, "d", {}), qomem::type_error);
    }
    SECTION("an id in use") {
        CHECK_THROWS_AS(qomem::new_with_props("qemu-dummy", parent, "taken", {{"bv", "on"}}),
                        qomem::property_error);
    }
    SECTION("a complete() that refuses") {
        dummy::refuse_complete = true;
        CHECK_THROWS_WITH(qomem::new_with_props("qemu-dummy", parent, "d", {}), "complete refused");
        dummy::refuse_complete = false;
    }
    CHECK_FALSE(parent.has_property("d"));
    CHECK(qomem::live_objects()["qemu-dummy"] == 1); // "taken" only
    CHECK_FALSE(qomem::cast<dummy>(*parent.child("taken")).bv);
}

TEST_CASE("object-add refuses types that are not user-creatable, bad ids, and object-del an "
          "object in use",
          "[qom][proplist]") {
    leak_check leaks;
    auto root = qomem::container::make_root();
    CHECK_THROWS_WITH(qomem::user_creatable_add(*root, "test-internal", "x", {}),
                      Catch::Contains("not user-creatable"));
    CHECK_THROWS_AS(qomem::user_creatable_add(*root, "nope", "x", {}), qomem::type_error);
    CHECK_THROWS_AS(qomem::user_creatable_add(*root, "qemu-dummy", "1x", {}),
                    qomem::property_value_error);
    CHECK_THROWS_AS(qomem::user_creatable_del(*root, "x"), qomem::path_error);
    qomem::object& o = qomem::user_creatable_add(*root, "qemu-dummy", "busy", {});
    qomem::cast<dummy>(o).in_use = true;
    CHECK_THROWS_WITH(qomem::user_creatable_del(*root, "busy"), Catch::Contains("in use"));
    CHECK(qomem::resolve_path(*root, "/objects/busy") == &o);
    qomem::cast<dummy>(o).in_use = false;
    qomem::user_creatable_del(*root, "busy");
    CHECK(qomem::live_objects().count("qemu-dummy") == 0);
}

TEST_CASE("proplist getenum: an enum by its type name; another enum type or a missing property "
          "is an error",
          "[qom][proplist]") {
    leak_check leaks;
    auto root = qomem::container::make_root();
    qomem::object& obj =
        qomem::new_with_props("qemu-dummy", qomem::objects_root(*root), "dummy0", {{"av", "platypus"}});
    CHECK(qomem::cast<dummy>(obj).av == dummy::animal::platypus);
    CHECK(obj.get_enum("av", "DummyAnimal") == static_cast<int>(dummy::animal::platypus));
    CHECK_THROWS_AS(obj.get_enum("av", "BadAnimal"), qomem::property_error);
    CHECK_THROWS_AS(obj.get_enum("iv", "DummyAnimal"), qomem::property_error);
    qomem::unparent(obj);
}

TEST_CASE("proplist iterator: an object's properties are its class's and its own",
          "[qom][proplist]") {
    leak_check leaks;
    auto root = qomem::container::make_root();
    qomem::object& obj = qomem::new_with_props(
        "qemu-dummy", qomem::objects_root(*root), "dummy0",
        {{"bv", "yes"}, {"sv", "Hiss hiss hiss"}, {"av", "platypus"}});
    CHECK(property_names(obj) == names{"type", "sv", "av", "bv"});
    qomem::unparent(obj);
}

TEST_CASE("proplist class_iterator: the class's properties alone", "[qom][proplist]") {
    const qomem::type_info* t = qomem::find_type("qemu-dummy");
    REQUIRE(t != nullptr);
    names seen;
    for (const qomem::property_def& d : t->class_fn().properties()) seen.insert(d.name());
    CHECK(seen == names{"type", "av", "sv"});
}

TEST_CASE("resolve partial: a unique suffix resolves; several matches are ambiguous",
          "[qom][path]") {
    leak_check leaks;
    auto root = qomem::container::make_root();
    qomem::container& objects = qomem::objects_root(*root);
    auto cont1 = qomem::make<qomem::container>();
    objects.add_child("cont1", *cont1);
    auto obj1 = qomem::make<dummy>();
    auto obj2a = qomem::make<dummy>();
    auto obj2b = qomem::make<dummy>();
    cont1->add_child("obj1", *obj1);
    cont1->add_child("obj2", *obj2a);
    objects.add_child("obj2", *obj2b);

    bool ambiguous = false;
    CHECK(qomem::resolve_path_type(*root, "", dummy::static_type(), &ambiguous) == nullptr);
    CHECK(ambiguous);
    CHECK(qomem::resolve_path_type(*root, "", dummy::static_type()) == nullptr);

    ambiguous = false;
    CHECK(qomem::resolve_path(*root, "obj2", &ambiguous) == nullptr);
    CHECK(ambiguous);
    CHECK(qomem::resolve_path(*root, "obj2") == nullptr);

    ambiguous = true; // cleared on a unique match
    CHECK(qomem::resolve_path(*root, "obj1", &ambiguous) == obj1.get());
    CHECK_FALSE(ambiguous);
    CHECK(qomem::resolve_path(*root, "obj1") == obj1.get());

    qomem::unparent(*obj2b);
    qomem::unparent(*cont1);
}

// ---- check-qom-interface ---------------------------------------------------------------

namespace {
constexpr std::uint32_t pattern = 0xFAFBFCFD;

// An interface with a class object of its own.
struct test_if {
    QOMEM_INTERFACE(test_if, "test-interface")
    struct interface_class_type : qomem::interface_class {
        std::uint32_t test = 0;
    };
};

// Fills in its class's test-interface class object in its class_init.
class direct_impl : public qomem::object, public test_if {
    QOMEM_OBJECT(direct_impl, "direct-impl", qomem::object, test_if)
public:
    direct_impl() = default;
    static void class_init(class_type& k, qomem::type_tag<direct_impl>) {
        // Found by QEMU's TEST_IF_CLASS(oc); null would fail the tests below.
        if (auto* tc = qomem::interface_class_of<test_if>(k)) tc->test = pattern;
    }
};
QOMEM_REGISTER_TYPE(direct_impl)

// Implements the interface through its parent; no class_init of its own.
class intermediate_impl : public direct_impl {
    QOMEM_OBJECT(intermediate_impl, "intermediate-impl", direct_impl)
public:
    intermediate_impl() = default;
};
QOMEM_REGISTER_TYPE(intermediate_impl)

// Changes its copy of the interface class: its parent's stays as it was.
class overriding_impl : public direct_impl {
    QOMEM_OBJECT(overriding_impl, "overriding-impl", direct_impl)
public:
    overriding_impl() = default;
    static void class_init(class_type& k, qomem::type_tag<overriding_impl>) {
        qomem::interface_class_of<test_if>(k)->test = 7;
    }
};
} // namespace

TEST_CASE("interface direct_impl and intermediate_impl: the interface's class object carries "
          "what the implementing type's class_init put there",
          "[qom][interface]") {
    leak_check leaks;
    const char* type = GENERATE("direct-impl", "intermediate-impl");
    INFO(type);
    auto obj = qomem::make_by_name(type);
    test_if* iobj = qomem::dynamic_cast_to<test_if>(obj.get());
    REQUIRE(iobj != nullptr);
    const auto* ioc = qomem::interface_class_of<test_if>(*obj);
    REQUIRE(ioc != nullptr);
    CHECK(ioc->test == pattern);
    CHECK(ioc->type == &test_if::static_type());
    CHECK(ioc->concrete_type == &obj->type()); // one interface class per implementing type
}

TEST_CASE("each type's interface class object is its own copy", "[qom][interface]") {
    const auto* direct = qomem::interface_class_of<test_if>(qomem::class_of<direct_impl>());
    const auto* inter = qomem::interface_class_of<test_if>(qomem::class_of<intermediate_impl>());
    const auto* over = qomem::interface_class_of<test_if>(qomem::class_of<overriding_impl>());
    REQUIRE((direct && inter && over));
    CHECK(direct != inter);
    CHECK(over->test == 7);
    CHECK(direct->test == pattern);
    CHECK(inter->test == pattern);
    CHECK(qomem::interface_class_of<test_if>(qomem::class_of<qomem::container>()) == nullptr);
    CHECK(qomem::interface_class_of<qomem::user_creatable>(qomem::class_of<dummy>()) != nullptr);
}
