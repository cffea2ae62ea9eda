// Tests for qomem/type_registry.hpp and the type machinery of type.hpp it
// relies on: registration with ancestors and interfaces, lookup, creation
// by name (abstract types, interfaces and types without a default
// constructor refused), casts by name, the type list, and instance_post_init.
#include <stdexcept>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <qomem/device.hpp>
#include <qomem/object.hpp>
#include <qomem/type_registry.hpp>

#include "test_support.hpp"

using qomem_test::event_log;
using qomem_test::leak_check;
using qomem_test::throwing_assertions;
using strings = std::vector<std::string>;

namespace {

struct blinker {
    QOMEM_INTERFACE(blinker, "test-reg-blinker")
    virtual int blink() = 0;
};

// Abstract in QOM's sense (QEMU's TypeInfo.abstract), though a complete C++ class.
class shape : public qomem::object {
    QOMEM_ABSTRACT_OBJECT(shape, "test-shape", qomem::object)
public:
    shape() = default;
};

class square : public shape, public blinker {
    QOMEM_OBJECT(square, "test-square", shape, blinker)
public:
    square() = default;
    int blink() override { return 4; }
};

class needs_args : public qomem::object {
    QOMEM_OBJECT(needs_args, "test-needs-args", qomem::object)
public:
    explicit needs_args(int) {}
};

class lone_device : public qomem::device {
    QOMEM_OBJECT(lone_device, "test-lone-device", qomem::device)
public:
    lone_device() = default;
};

// Same name as test-square, another type.
class impostor : public qomem::object {
    QOMEM_OBJECT(impostor, "test-square", qomem::object)
public:
    impostor() = default;
};

QOMEM_REGISTER_TYPE(square)
QOMEM_REGISTER_TYPE(needs_args)

template <class T>
concept can_make = requires { qomem::make<T>(); };

} // namespace

static_assert(!can_make<shape>, "make<T> refuses an abstract type at compile time");
static_assert(can_make<square>);

TEST_CASE("registering a type registers its ancestors and interfaces under their names",
          "[type][registry]") {
    CHECK(qomem::find_type("test-square") == &square::static_type());
    CHECK(qomem::find_type("test-shape") == &shape::static_type());
    CHECK(qomem::find_type("object") == &qomem::object::static_type());
    CHECK(qomem::find_type("test-reg-blinker") == &blinker::static_type());
    CHECK(qomem::find_type("test-lone-device") == nullptr); // never registered
    qomem::register_type<lone_device>();
    qomem::register_type<lone_device>(); // again: nothing changes
    CHECK(qomem::find_type("test-lone-device") == &lone_device::static_type());
    CHECK(qomem::find_type("device") == &qomem::device::static_type());
    CHECK(shape::static_type().is_abstract);
    CHECK_FALSE(square::static_type().is_abstract);
    CHECK(blinker::static_type().is_interface);
}

TEST_CASE("two types under one name are misuse, reported before anything is registered",
          "[type][registry][misuse]") {
    throwing_assertions asserts;
    CHECK_THROWS_WITH(qomem::register_type<impostor>(), Catch::Contains("'test-square'"));
    CHECK(qomem::find_type("test-square") == &square::static_type());
}

TEST_CASE("make_by_name makes registered concrete types and refuses the rest, naming them",
          "[type][registry]") {
    leak_check leaks;
    auto s = qomem::make_by_name("test-square");
    REQUIRE(s);
    CHECK(&s->type() == &square::static_type());
    CHECK(s->ref_count() == 1);
    CHECK(qomem::dynamic_cast_to<blinker>(s.get())->blink() == 4);

    CHECK_THROWS_AS(qomem::make_by_name("test-shape"), qomem::type_error);
    CHECK_THROWS_WITH(qomem::make_by_name("test-shape"), Catch::Contains("abstract"));
    CHECK_THROWS_WITH(qomem::make_by_name("object"), Catch::Contains("abstract"));
    CHECK_THROWS_WITH(qomem::make_by_name("test-reg-blinker"), Catch::Contains("interface"));
    CHECK_THROWS_WITH(qomem::make_by_name("test-needs-args"),
                      Catch::Contains("test-needs-args") && Catch::Contains("default constructor"));
    CHECK_THROWS_WITH(qomem::make_by_name("no-such-type"), Catch::Contains("'no-such-type'"));
    CHECK(qomem::live_object_count() == 1);
}

TEST_CASE("casts by name follow the type chain and the interfaces", "[type][registry][cast]") {
    leak_check leaks;
    throwing_assertions asserts;
    auto s = qomem::make<square>();
    qomem::object* o = s.get();
    for (const char* yes : {"test-square", "test-shape", "object", "test-reg-blinker"}) {
        INFO(yes);
        CHECK(qomem::dynamic_cast_by_name(o, yes) == o);
    }
    CHECK(qomem::dynamic_cast_by_name(o, "container") == nullptr);
    CHECK(qomem::dynamic_cast_by_name(o, "unregistered-name") == nullptr);
    CHECK(qomem::dynamic_cast_by_name(static_cast<qomem::object*>(nullptr), "object") == nullptr);
    CHECK(&qomem::cast_by_name(*o, "test-shape") == o);
    CHECK_THROWS_WITH(qomem::cast_by_name(*o, "device"),
                      Catch::Contains("test-square") && Catch::Contains("device"));
}

TEST_CASE("registered_types lists the types conforming to a base, sorted, concrete by default",
          "[type][registry]") {
    qomem::register_type<lone_device>();
    auto names_of = [](const std::vector<const qomem::type_info*>& ts) {
        strings out;
        for (const auto* t : ts) out.emplace_back(t->name);
        return out;
    };
    CHECK(names_of(qomem::registered_types(&blinker::static_type())) == strings{"test-square"});
    CHECK(names_of(qomem::registered_types(&shape::static_type(), true)) ==
          strings{"test-shape", "test-square"});
    const auto devices = names_of(qomem::registered_types(&qomem::device::static_type()));
    CHECK(devices == strings{"device", "test-lone-device"});
}

// ---- instance_post_init -----------------------------------------------------------

namespace {
event_log* post_log = nullptr;

class post_base : public qomem::object {
    QOMEM_OBJECT(post_base, "test-post-base", qomem::object)
public:
    int level = 0;
    post_base() { post_log->add("init base"); }
    static void class_init(class_type& k, qomem::type_tag<post_base>) {
        k.add_property(qomem::int_property("level", &post_base::level).with_default(5));
    }

private:
    // Private: QOMEM_OBJECT lets the library call it.
    void instance_post_init(qomem::type_tag<post_base>) {
        post_log->add("post_init base (level " + std::to_string(level) + ")");
    }
};

class post_mid : public post_base {
    QOMEM_OBJECT(post_mid, "test-post-mid", post_base)
public:
    post_mid() { post_log->add("init mid"); }
    // No post-init of its own: the base's runs once, not twice.
};

class post_leaf : public post_mid {
    QOMEM_OBJECT(post_leaf, "test-post-leaf", post_mid)
public:
    static inline bool fail = false;
    post_leaf() { post_log->add("init leaf"); }
    ~post_leaf() override { post_log->add("finalize leaf"); }
    void instance_post_init(qomem::type_tag<post_leaf>) {
        post_log->add("post_init leaf");
        if (fail) throw std::runtime_error("post-init failed");
    }
};
QOMEM_REGISTER_TYPE(post_leaf)
} // namespace

TEST_CASE("instance_post_init runs after every constructor and the class defaults, leaf to root",
          "[type][post_init]") {
    leak_check leaks;
    event_log log;
    post_log = &log;
    const std::string how = GENERATE("make", "by name", "embedded");
    INFO(how);
    const strings expected{"init base", "init mid", "init leaf", "post_init leaf",
                           "post_init base (level 5)"};
    if (how == "make") {
        auto o = qomem::make<post_leaf>();
        CHECK(log.take() == expected);
    } else if (how == "by name") {
        auto o = qomem::make_by_name("test-post-leaf");
        CHECK(log.take() == expected);
    } else {
        qomem::embedded<post_leaf> slot;
        post_leaf& o = slot.init();
        CHECK(log.take() == expected);
        o.unref();
        CHECK_FALSE(slot.alive());
    }

    SECTION("a post-init hook that throws: the object is finalized, nothing is left") {
        post_leaf::fail = true;
        log.clear();
        CHECK_THROWS_WITH(qomem::make<post_leaf>(), "post-init failed");
        CHECK(log.take() == strings{"init base", "init mid", "init leaf", "post_init leaf",
                                    "finalize leaf"});
        qomem::embedded<post_leaf> slot;
        CHECK_THROWS_AS(slot.init(), std::runtime_error);
        CHECK_FALSE(slot.alive());
        post_leaf::fail = false;
    }
    post_log = nullptr;
}
