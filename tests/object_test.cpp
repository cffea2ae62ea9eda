// Tests for qomem/object.hpp and qomem/type.hpp: class and instance
// initialisation order, reference counts of child<> and link<> properties,
// unparent and finalization order, paths, casts and misuse checks.
#include <cstdint>
#include <cstdlib>
#include <map>
#include <new>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/core.h>

#include <qomem/object.hpp>

#include "test_support.hpp"

using qomem_test::event_log;
using qomem_test::event_recorder;
using qomem_test::leak_check;
using qomem_test::only;
using qomem_test::throwing_assertions;
using strings = std::vector<std::string>;

// ---- observing the free hook ------------------------------------------------
//
// make<T> allocates with the aligned ::operator new and its free hook
// releases the storage with the aligned ::operator delete. Replacing those two
// (and the sized variant, so no allocator is ever mixed) lets a test see the
// moment a given object's storage is freed, relative to its finalizers.

namespace {
const void* watched_storage = nullptr;
event_log* free_log = nullptr;

void note_free(void* p) noexcept {
    if (p && p == watched_storage && free_log) free_log->add("free");
}

/// Records "free" into `log` when the storage at `p` is deallocated.
class watch_free {
public:
    watch_free(const void* p, event_log& log) {
        watched_storage = p;
        free_log = &log;
    }
    ~watch_free() {
        watched_storage = nullptr;
        free_log = nullptr;
    }
    watch_free(const watch_free&) = delete;
    watch_free& operator=(const watch_free&) = delete;
};
} // namespace

// This executable replaces the aligned forms of new and delete (make<T>'s
// allocation) to see the free hook run; GCC cannot tell that the pair matches.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
void* operator new(std::size_t size, std::align_val_t align) {
    std::size_t a = static_cast<std::size_t>(align);
    if (a < sizeof(void*)) a = sizeof(void*);
    const std::size_t rounded = size == 0 ? a : (size + a - 1) / a * a;
    if (void* p = std::aligned_alloc(a, rounded)) return p;
    throw std::bad_alloc();
}
void operator delete(void* p, std::align_val_t) noexcept {
    note_free(p);
    std::free(p);
}
void operator delete(void* p, std::size_t, std::align_val_t) noexcept {
    note_free(p);
    std::free(p);
}
#pragma GCC diagnostic pop

// ---- test types -------------------------------------------------------------

namespace {

// A three-level hierarchy whose constructors and destructors record their
// order (QEMU's instance_init and instance_finalize).
class base_obj : public qomem::object {
    QOMEM_OBJECT(base_obj, "test-base", qomem::object)
public:
    explicit base_obj(event_log& log) : log_(&log) { log_->add("init base"); }
    ~base_obj() override { log_->add("finalize base"); }

protected:
    event_log* log_;
};

class mid_obj : public base_obj {
    QOMEM_OBJECT(mid_obj, "test-mid", base_obj)
public:
    explicit mid_obj(event_log& log) : base_obj(log) { log_->add("init mid"); }
    ~mid_obj() override { log_->add("finalize mid"); }
};

class leaf_obj : public mid_obj {
    QOMEM_OBJECT(leaf_obj, "test-leaf", mid_obj)
public:
    explicit leaf_obj(event_log& log) : mid_obj(log) { log_->add("init leaf"); }
    ~leaf_obj() override { log_->add("finalize leaf"); }

protected:
    // Runs after the storage is released (see object::after_free).
    after_free_action after_free() noexcept override {
        return {[](qomem::object*) {
                    if (after_free_log) after_free_log->add("after free");
                },
                nullptr};
    }

public:
    static inline event_log* after_free_log = nullptr;
};

// An object with another living inside it (QEMU's object_initialize_child).
class owner : public qomem::object {
    QOMEM_OBJECT(owner, "test-owner", qomem::object)
public:
    explicit owner(event_log& l) : log_(&l) {
        leaf_obj& part = part_.init(l);
        add_child("part", part);
        part.unref(); // the parent's reference is now the only one
    }
    ~owner() override { log_->add("finalize owner"); }
    leaf_obj& part() { return part_.get(); }

private:
    event_log* log_;
    qomem::embedded<leaf_obj> part_;
};

// Class objects: each type's class_init appends its name, so the inits
// vector of a class object shows which class_inits ran on it, in order.
std::vector<std::string> class_init_calls;

class klass_base : public qomem::object {
    QOMEM_OBJECT(klass_base, "test-klass-base", qomem::object)
public:
    struct class_type : qomem::object_class {
        std::vector<std::string> inits;
        int answer = 0;
    };
    static void class_init(class_type& k, qomem::type_tag<klass_base>) {
        class_init_calls.push_back("klass-base");
        k.inits.push_back("klass-base");
        k.answer = 41;
    }
};

class klass_mid : public klass_base {
    QOMEM_OBJECT(klass_mid, "test-klass-mid", klass_base)
public:
    struct class_type : klass_base::class_type {
        bool mid_flag = false;
    };
    static void class_init(class_type& k, qomem::type_tag<klass_mid>) {
        class_init_calls.push_back("klass-mid");
        k.inits.push_back("klass-mid");
        k.answer += 1; // overrides what the parent's class_init set
        k.mid_flag = true;
    }
};

// No class_type and no class_init of its own: its class object is a copy of
// klass_mid's with only the type changed.
class klass_leaf : public klass_mid {
    QOMEM_OBJECT(klass_leaf, "test-klass-leaf", klass_mid)
};

// An interface, a type implementing it, and a type inheriting it.
struct blinker {
    QOMEM_INTERFACE(blinker, "test-blinker")
    virtual int blink() = 0;
};

class lamp : public qomem::object, public blinker {
    QOMEM_OBJECT(lamp, "test-lamp", qomem::object, blinker)
public:
    lamp() = default;
    int blink() override { return 7; }
};

class desk_lamp : public lamp {
    QOMEM_OBJECT(desk_lamp, "test-desk-lamp", lamp)
};

// A plain object that records its finalization under a label.
class node : public qomem::object {
    QOMEM_OBJECT(node, "test-node", qomem::object)
public:
    node(event_log& log, std::string label) : log_(&log), label_(std::move(label)) {}
    ~node() override { log_->add("finalize " + label_); }

private:
    event_log* log_;
    std::string label_;
};

qomem::ref_ptr<node> make_node(event_log& log, std::string label) {
    return qomem::make<node>(log, std::move(label));
}

// Adds `child` to `parent` and drops the creation reference: the usual QEMU
// idiom (object_new, add_child, unref) leaving the parent as sole owner.
template <class T>
T& adopt(qomem::object& parent, std::string_view name, qomem::ref_ptr<T> child) {
    parent.add_child(name, *child);
    return *child;
}

} // namespace

// ---- class and instance initialisation ---------------------------------------

TEST_CASE("class init runs parent-first on a copy of the parent's class object", "[object][type]") {
    leak_check leaks;

    // klass_leaf is used first, so its class object makes its parents' first.
    const auto& leaf = qomem::class_of<klass_leaf>();
    CHECK(class_init_calls == strings{"klass-base", "klass-mid"});
    CHECK(leaf.inits == strings{"klass-base", "klass-mid"});
    CHECK(leaf.answer == 42);
    CHECK(leaf.mid_flag);
    CHECK(leaf.type == &klass_leaf::static_type());

    const auto& mid = qomem::class_of<klass_mid>();
    const auto& base = qomem::class_of<klass_base>();
    CHECK(mid.inits == strings{"klass-base", "klass-mid"});
    CHECK(mid.type == &klass_mid::static_type());
    CHECK(base.inits == strings{"klass-base"});
    CHECK(base.answer == 41);
    CHECK(base.type == &klass_base::static_type());

    // Made once: asking again runs no class_init.
    CHECK(&qomem::class_of<klass_leaf>() == &leaf);
    CHECK(class_init_calls == strings{"klass-base", "klass-mid"});
}

TEST_CASE("instance init runs root to leaf and finalize leaf to root", "[object][lifetime]") {
    leak_check leaks;
    event_log log;
    auto obj = qomem::make<leaf_obj>(log);
    CHECK(log.take() == strings{"init base", "init mid", "init leaf"});
    CHECK(obj->ref_count() == 1);
    obj.reset();
    CHECK(log.take() == strings{"finalize leaf", "finalize mid", "finalize base"});
}

TEST_CASE("the free hook runs after the finalizers for make<T> objects only", "[object][lifetime]") {
    leak_check leaks;
    event_log log;
    leaf_obj::after_free_log = &log;

    SECTION("make<T>: finalizers, then the storage is freed, then the after-free action") {
        auto obj = qomem::make<leaf_obj>(log);
        watch_free watch(obj.get(), log);
        log.clear();
        obj.reset();
        CHECK(log.take() == strings{"finalize leaf", "finalize mid", "finalize base", "free",
                                    "after free"});
    }

    SECTION("embedded<T>: finalizers run, the storage is left for its owner") {
        qomem::embedded<leaf_obj> slot;
        CHECK_FALSE(slot.alive());
        leaf_obj& obj = slot.init(log);
        watch_free watch(&obj, log);
        CHECK(slot.alive());
        CHECK(qomem::live_objects()["test-leaf"] == 1);
        log.clear();
        obj.unref();
        CHECK(log.take() == strings{"finalize leaf", "finalize mid", "finalize base", "after free"});
        CHECK_FALSE(slot.alive());
        CHECK(qomem::live_object_count() == 0);

        // The storage is still there: it can hold a new object.
        leaf_obj& again = slot.init(log);
        CHECK(&again == &obj);
        again.unref();
        CHECK_FALSE(slot.alive());
    }

    SECTION("an embedded child is finalized by its owner, whose storage holds it") {
        // QEMU's object_initialize_child: the child lives inside the parent.
        auto o = qomem::make<owner>(log);
        CHECK(o->part().ref_count() == 1);
        CHECK(o->part().parent() == o.get());
        watch_free watch(o.get(), log);
        log.clear();
        o.reset();
        // The part's storage is freed with its owner's, after both finalized.
        CHECK(log.take() == strings{"finalize leaf", "finalize mid", "finalize base",
                                    "after free", "finalize owner", "free"});
    }
    leaf_obj::after_free_log = nullptr;
}

TEST_CASE("finalization releases properties before the finalizers run", "[object][lifetime]") {
    leak_check leaks;
    event_log log;
    event_recorder events(log);
    auto parent = make_node(log, "parent");
    events.label(*parent, "parent");
    node& child = adopt(*parent, "child", make_node(log, "child"));
    events.label(child, "child");
    log.clear();
    parent.reset();
    CHECK(log.take() == strings{"finalizing parent", "unparenting child from parent",
                                "finalizing child", "finalize child", "finalize parent"});
}

// ---- casts --------------------------------------------------------------------

TEST_CASE("dynamic_cast_to returns null on a type or interface mismatch", "[object][type]") {
    leak_check leaks;
    auto l = qomem::make<lamp>();
    auto d = qomem::make<desk_lamp>();
    auto c = qomem::make<qomem::container>();
    qomem::object* lo = l.get();
    qomem::object* dobj = d.get();
    qomem::object* co = c.get();

    CHECK(qomem::dynamic_cast_to<lamp>(lo) == l.get());
    CHECK(qomem::dynamic_cast_to<lamp>(dobj) == d.get()); // a desk_lamp is a lamp
    CHECK(qomem::dynamic_cast_to<qomem::object>(co) == co);
    CHECK(qomem::dynamic_cast_to<desk_lamp>(lo) == nullptr);
    CHECK(qomem::dynamic_cast_to<lamp>(co) == nullptr);
    CHECK(qomem::dynamic_cast_to<lamp>(static_cast<qomem::object*>(nullptr)) == nullptr);

    // Interfaces: implemented by lamp, inherited by desk_lamp, absent on container.
    blinker* b = qomem::dynamic_cast_to<blinker>(lo);
    REQUIRE(b != nullptr);
    CHECK(b == static_cast<blinker*>(l.get()));
    CHECK(b->blink() == 7);
    REQUIRE(qomem::dynamic_cast_to<blinker>(dobj) != nullptr);
    CHECK(qomem::dynamic_cast_to<blinker>(dobj)->blink() == 7);
    CHECK(qomem::dynamic_cast_to<blinker>(co) == nullptr);

    const qomem::object* clo = lo;
    CHECK(qomem::dynamic_cast_to<blinker>(clo) != nullptr);
    CHECK(qomem::dynamic_cast_to<qomem::container>(clo) == nullptr);

    CHECK(lo->type().is_a(qomem::object::static_type()));
    CHECK(dobj->type().is_a(lamp::static_type()));
    CHECK_FALSE(lo->type().is_a(desk_lamp::static_type()));
}

TEST_CASE("cast<> reports a type mismatch through the assertion handler", "[object][type][misuse]") {
    leak_check leaks;
    throwing_assertions asserts;
    auto l = qomem::make<lamp>();
    auto c = qomem::make<qomem::container>();

    CHECK(&qomem::cast<lamp>(*l) == l.get());
    CHECK(qomem::cast<blinker>(*l).blink() == 7);
    CHECK_THROWS_AS(qomem::cast<lamp>(*c), qomem::assertion_failure);
    CHECK_THROWS_AS(qomem::cast<blinker>(*c), qomem::assertion_failure);
    CHECK_THROWS_WITH(qomem::cast<lamp>(static_cast<const qomem::object&>(*c)),
                      Catch::Contains("container") && Catch::Contains("test-lamp"));
    CHECK(c->ref_count() == 1);
}

// ---- child<> and link<> properties -------------------------------------------

TEST_CASE("add_child takes a reference and sets the parent", "[object][child]") {
    leak_check leaks;
    auto root = qomem::container::make_root();
    auto c = qomem::make<qomem::container>();
    CHECK(c->parent() == nullptr);
    CHECK(c->name().empty());

    CHECK(root->add_child("c", *c) == "c");
    CHECK(c->ref_count() == 2); // creator's + parent's
    CHECK(c->parent() == root.get());
    CHECK(c->name() == "c");
    CHECK(root->child("c") == c.get());
    CHECK(root->has_property("c"));
    CHECK(root->link("c") == nullptr); // a child is not a link
    CHECK(root->ref_count() == 1);     // the parent gains nothing

    qomem::object* raw = c.get();
    c.reset();
    CHECK(raw->ref_count() == 1); // the parent's is the only one left
    CHECK(qomem::live_object_count() == 2);
    qomem::unparent(*raw); // drops it: finalized
    CHECK(qomem::live_object_count() == 1);
    CHECK_FALSE(root->has_property("c"));
}

TEST_CASE("a strong link holds a reference to its target and a weak link does not",
          "[object][link]") {
    leak_check leaks;
    event_log log;
    event_recorder events(log);
    auto holder = make_node(log, "holder");
    auto a = make_node(log, "a");
    auto b = make_node(log, "b");
    events.label(*a, "a");
    events.label(*b, "b");
    events.label(*holder, "holder");

    holder->add_link("strong", a.get(), qomem::link_strength::strong);
    holder->add_link("weak", b.get(), qomem::link_strength::weak);
    holder->add_link("empty", nullptr, qomem::link_strength::strong);
    CHECK(a->ref_count() == 2);
    CHECK(b->ref_count() == 1);
    CHECK(holder->link("strong") == a.get());
    CHECK(holder->link("weak") == b.get());
    CHECK(holder->link("empty") == nullptr);
    CHECK(holder->child("strong") == nullptr); // a link is not a child
    CHECK(a->parent() == nullptr);             // and does not parent its target

    strings seen;
    holder->for_each_link([&](std::string_view name, qomem::object* target,
                              qomem::link_strength strength) {
        seen.push_back(fmt::format("{} {} {}", name, target ? "set" : "null",
                                   strength == qomem::link_strength::strong ? "strong" : "weak"));
    });
    CHECK(seen == strings{"strong set strong", "weak set weak", "empty null strong"});

    SECTION("set_link on a strong link moves the reference to the new target") {
        holder->set_link("strong", b.get());
        CHECK(a->ref_count() == 1);
        CHECK(b->ref_count() == 2);
        holder->set_link("strong", nullptr);
        CHECK(b->ref_count() == 1);
        holder->set_link("empty", a.get());
        CHECK(a->ref_count() == 2);
    }

    SECTION("set_link on a weak link changes no count") {
        holder->set_link("weak", a.get());
        CHECK(a->ref_count() == 2); // the strong link's only
        CHECK(b->ref_count() == 1);
    }

    SECTION("moving a strong link away from a target it alone holds finalizes that target") {
        qomem::object* raw_a = a.get();
        a.reset();
        CHECK(raw_a->ref_count() == 1);
        log.clear();
        holder->set_link("strong", b.get());
        CHECK(log.take() == strings{"finalizing a", "finalize a"});
        CHECK(holder->link("strong") == b.get());
    }

    SECTION("finalizing the holder releases its strong links, newest property first") {
        a.reset();
        holder->set_link("empty", b.get()); // b: its handle + the "empty" link
        b.reset();
        log.clear();
        holder.reset();
        // Released newest first: "empty" (b), then "weak" (nothing), then "strong" (a).
        CHECK(log.take() == strings{"finalizing holder", "finalizing b", "finalize b",
                                    "finalizing a", "finalize a", "finalize holder"});
    }
}

TEST_CASE("set_link and add_link refuse a target of the wrong type and change nothing",
          "[object][link]") {
    leak_check leaks;
    auto holder = qomem::make<qomem::container>();
    auto l = qomem::make<lamp>();
    auto c = qomem::make<qomem::container>();

    holder->add_link("lamp", l.get(), qomem::link_strength::strong, lamp::static_type());
    holder->add_link("blinker", nullptr, qomem::link_strength::strong, blinker::static_type());

    CHECK_THROWS_AS(holder->set_link("lamp", c.get()), qomem::property_error);
    CHECK(holder->link("lamp") == l.get());
    CHECK(l->ref_count() == 2);
    CHECK(c->ref_count() == 1);

    CHECK_THROWS_AS(holder->set_link("nonexistent", l.get()), qomem::property_error);
    CHECK_THROWS_AS(holder->add_link("lamp2", c.get(), qomem::link_strength::strong,
                                     lamp::static_type()),
                    qomem::property_error);
    CHECK_FALSE(holder->has_property("lamp2"));
    CHECK(c->ref_count() == 1);

    // A link typed with an interface accepts any implementer.
    holder->set_link("blinker", l.get());
    CHECK(l->ref_count() == 3);
    CHECK_THROWS_AS(holder->set_link("blinker", c.get()), qomem::property_error);
    CHECK(holder->link("blinker") == l.get());
    CHECK(l->ref_count() == 3);
}

TEST_CASE("set_link_path resolves a canonical path and checks the link's type", "[object][link][path]") {
    leak_check leaks;
    auto root = qomem::container::make_root();
    lamp& l = adopt(*root, "lamp0", qomem::make<lamp>());
    auto& shelf = adopt(*root, "shelf", qomem::make<qomem::container>());
    lamp& l1 = adopt(shelf, "lamp1", qomem::make<lamp>());
    auto holder = qomem::make<qomem::container>();
    root->add_child("holder", *holder);
    holder->add_link("light", nullptr, qomem::link_strength::strong, lamp::static_type());

    holder->set_link_path("light", "/lamp0");
    CHECK(holder->link("light") == &l);
    CHECK(l.ref_count() == 2);

    holder->set_link_path("light", "/shelf/lamp1");
    CHECK(holder->link("light") == &l1);
    CHECK(l.ref_count() == 1);
    CHECK(l1.ref_count() == 2);

    SECTION("a path naming an object of the wrong type is a path_error") {
        CHECK_THROWS_AS(holder->set_link_path("light", "/shelf"), qomem::path_error);
        CHECK_THROWS_WITH(holder->set_link_path("light", "/shelf"),
                          Catch::Contains("/shelf") && Catch::Contains("test-lamp"));
    }
    SECTION("a path that does not resolve is a path_error") {
        CHECK_THROWS_AS(holder->set_link_path("light", "/nowhere"), qomem::path_error);
        CHECK_THROWS_AS(holder->set_link_path("light", "nowhere/lamp1"), qomem::path_error);
    }
    SECTION("a partial path names the one lamp it reaches, as QEMU's link setter allows") {
        holder->set_link_path("light", "lamp0");
        CHECK(holder->link("light") == &l);
        holder->set_link_path("light", "shelf/lamp1");
        CHECK(holder->link("light") == &l1);
    }
    SECTION("a partial path that reaches several objects of the link's type is a path_error") {
        lamp& l2 = adopt(shelf, "lamp0", qomem::make<lamp>()); // a second "lamp0"
        CHECK_THROWS_WITH(holder->set_link_path("light", "lamp0"),
                          Catch::Contains("lamp0") && Catch::Contains("uniquely"));
        CHECK(l2.ref_count() == 1);
        qomem::unparent(l2);
    }
    SECTION("a name that is not a link is a property_error") {
        CHECK_THROWS_AS(holder->set_link_path("nolink", "/lamp0"), qomem::property_error);
    }
    // Nothing changed by any refusal.
    CHECK(holder->link("light") == &l1);
    CHECK(l.ref_count() == 1);
    CHECK(l1.ref_count() == 2);

    holder.reset();
    root.reset();
}

TEST_CASE("name[*] takes the first free index and reuses an index after deletion",
          "[object][child]") {
    leak_check leaks;
    auto parent = qomem::make<qomem::container>();
    std::vector<qomem::object*> devs;
    for (int i = 0; i < 3; ++i) {
        auto d = qomem::make<qomem::container>();
        CHECK(parent->add_child("dev[*]", *d) == fmt::format("dev[{}]", i));
        devs.push_back(d.get());
    }
    CHECK(devs[1]->name() == "dev[1]");

    qomem::unparent(*devs[1]);
    CHECK(parent->child("dev[1]") == nullptr);

    auto again = qomem::make<qomem::container>();
    CHECK(parent->add_child("dev[*]", *again) == "dev[1]");
    auto next = qomem::make<qomem::container>();
    CHECK(parent->add_child("dev[*]", *next) == "dev[3]");

    // Deleting the property (rather than unparenting the child) frees the index too.
    parent->delete_property("dev[0]");
    auto third = qomem::make<qomem::container>();
    CHECK(parent->add_child("dev[*]", *third) == "dev[0]");
    // A "[*]" stem is its own namespace.
    auto other = qomem::make<qomem::container>();
    CHECK(parent->add_child("bus[*]", *other) == "bus[0]");
}

TEST_CASE("a property name that is taken is refused with property_error and nothing changes",
          "[object][child][link]") {
    leak_check leaks;
    auto parent = qomem::make<qomem::container>();
    auto first = qomem::make<qomem::container>();
    auto second = qomem::make<qomem::container>();
    parent->add_child("x", *first);
    parent->add_link("l", first.get(), qomem::link_strength::strong);
    CHECK(first->ref_count() == 3);

    SECTION("a child named like an existing child") {
        CHECK_THROWS_AS(parent->add_child("x", *second), qomem::property_error);
    }
    SECTION("a child named like an existing link") {
        CHECK_THROWS_AS(parent->add_child("l", *second), qomem::property_error);
    }
    SECTION("a link named like an existing child") {
        CHECK_THROWS_AS(parent->add_link("x", second.get(), qomem::link_strength::strong),
                        qomem::property_error);
    }
    SECTION("the message names the property") {
        CHECK_THROWS_WITH(parent->add_child("x", *second), Catch::Contains("'x'"));
    }
    CHECK(second->ref_count() == 1);
    CHECK(second->parent() == nullptr);
    CHECK(second->name().empty());
    CHECK(parent->child("x") == first.get());
    CHECK(parent->link("l") == first.get());
    CHECK(first->ref_count() == 3);
    CHECK_THROWS_AS(parent->delete_property("nonexistent"), qomem::property_error);
}

// ---- paths ----------------------------------------------------------------------

TEST_CASE("canonical_path names the object from the root and resolve_path finds it",
          "[object][path]") {
    leak_check leaks;
    auto root = qomem::container::make_root();
    auto& machine = adopt(*root, "machine", qomem::make<qomem::container>());
    auto& periph = adopt(machine, "peripheral", qomem::make<qomem::container>());
    lamp& l = adopt(periph, "lamp[*]", qomem::make<lamp>());

    CHECK(root->canonical_path() == "/");
    CHECK(machine.canonical_path() == "/machine");
    CHECK(l.canonical_path() == "/machine/peripheral/lamp[0]");
    CHECK(&l.tree_root() == root.get());

    // Resolved from anywhere in the tree, always from its root.
    CHECK(l.resolve_path("/") == root.get());
    CHECK(root->resolve_path("/machine/peripheral/lamp[0]") == &l);
    CHECK(l.resolve_path("/machine/peripheral") == &periph);
    CHECK(root->resolve_path("/machine/nowhere") == nullptr);
    CHECK(root->resolve_path("machine") == nullptr); // not absolute
    CHECK(root->resolve_path("") == nullptr);

    SECTION("a tree whose top is not a root container has no canonical paths") {
        auto top = qomem::make<qomem::container>(); // not make_root()
        auto& inner = adopt(*top, "inner", qomem::make<qomem::container>());
        CHECK(top->canonical_path() == std::nullopt);
        CHECK(inner.canonical_path() == std::nullopt);
        CHECK(inner.resolve_path("/inner") == &inner); // resolved from its top all the same
    }
    SECTION("an object that leaves the tree loses its canonical path") {
        auto keep = qomem::ref_ptr<lamp>(&l);
        qomem::unparent(l);
        CHECK(keep->canonical_path() == std::nullopt);
        CHECK(keep->name().empty());
        CHECK(root->resolve_path("/machine/peripheral/lamp[0]") == nullptr);
    }
}

// ---- unparent and finalization order ---------------------------------------------

TEST_CASE("finalizing a parent unparents its children, newest first", "[object][lifetime]") {
    leak_check leaks;
    event_log log;
    event_recorder events(log);
    auto parent = make_node(log, "parent");
    events.label(*parent, "parent");
    for (const char* name : {"a", "b", "c"}) events.label(adopt(*parent, name, make_node(log, name)), name);

    SECTION("each child is finalized as soon as its parent's reference goes") {
        log.clear();
        parent.reset();
        CHECK(log.take() == strings{"finalizing parent",
                                    "unparenting c from parent", "finalizing c", "finalize c",
                                    "unparenting b from parent", "finalizing b", "finalize b",
                                    "unparenting a from parent", "finalizing a", "finalize a",
                                    "finalize parent"});
    }
    SECTION("a child held elsewhere survives its parent as an orphan") {
        qomem::ref_ptr<qomem::object> keep(parent->child("b"));
        log.clear();
        parent.reset();
        CHECK(only(log.take(), "finalizing ") ==
              strings{"finalizing parent", "finalizing c", "finalizing a"});
        CHECK(keep->parent() == nullptr);
        CHECK(keep->name().empty());
        CHECK(keep->ref_count() == 1);
        keep.reset();
        CHECK(log.take() == strings{"finalizing b", "finalize b"});
    }
}

namespace {
// QEMU's check-qom-proplist "delchild" case, type by type:
// dev has child "bus" (and keeps its creation reference to it), bus has child
// "backend" (keeping its creation reference too), and dev has a weak link
// "backend" to the backend. Unparenting the dev unparents its bus; the bus's
// unparent hook deletes the dev's "backend" link and unparents the backend.
// The dev's finalizer drops its extra reference to the bus, whose finalizer
// drops its extra reference to the backend.
class dummy_backend : public qomem::object {
    QOMEM_OBJECT(dummy_backend, "qemu-dummy-backend", qomem::object)
public:
    explicit dummy_backend(event_log& log) : log_(&log) {}
    ~dummy_backend() override { log_->add("finalize backend"); }

private:
    event_log* log_;
};

class dummy_bus : public qomem::object {
    QOMEM_OBJECT(dummy_bus, "qemu-dummy-bus", qomem::object)
public:
    explicit dummy_bus(event_log& log) : log_(&log) {}
    ~dummy_bus() override {
        log_->add("finalize bus");
        backend->unref(); // the creation reference kept by dummy_dev's init
    }
    dummy_backend* backend = nullptr;

protected:
    void on_unparent() override {
        log_->add("bus unparent hook");
        parent()->delete_property("backend");
        qomem::unparent(*backend);
        object::on_unparent();
    }

private:
    event_log* log_;
};

class dummy_dev : public qomem::object {
    QOMEM_OBJECT(dummy_dev, "qemu-dummy-dev", qomem::object)
public:
    // dev has to be the object the properties are added to: QEMU does this in
    // instance_init, which here is the constructor.
    dummy_dev(event_log& log, bool link_before_bus) : log_(&log) {
        auto b = qomem::make<dummy_bus>(log);
        auto be = qomem::make<dummy_backend>(log);
        if (link_before_bus) add_link("backend", be.get(), qomem::link_strength::weak);
        add_child("bus", *b);
        bus = b.detach(); // keep the creation reference, as QEMU's dev->bus does
        bus->add_child("backend", *be);
        bus->backend = be.detach();
        if (!link_before_bus)
            add_link("backend", bus->backend, qomem::link_strength::weak,
                     dummy_backend::static_type());
    }
    ~dummy_dev() override {
        log_->add("finalize dev");
        bus->unref();
    }
    dummy_bus* bus = nullptr;

protected:
    void on_unparent() override {
        log_->add("dev unparent hook");
        qomem::unparent(*bus);
        object::on_unparent();
    }

private:
    event_log* log_;
};
} // namespace

TEST_CASE("delchild: unparent hooks that delete properties of the object being released work "
          "in every order of the properties, unparented or finalized directly",
          "[object][lifetime]") {
    leak_check leaks;
    throwing_assertions asserts; // any misuse fails the test instead of aborting
    event_log log;
    event_recorder events(log);
    auto root = qomem::container::make_root();
    // QEMU's order is the child "bus" first, then the link "backend". Either
    // way, one of the two properties is released before the other, and the
    // bus's hook deletes the link: released already, or not yet.
    const bool link_first = GENERATE(false, true);
    INFO((link_first ? "link \"backend\" added before child \"bus\""
                     : "child \"bus\" added before link \"backend\" (QEMU's order)"));
    auto made = qomem::make<dummy_dev>(log, link_first);
    dummy_dev& dev = *made;
    dummy_bus& bus = *dev.bus;
    dummy_backend& backend = *bus.backend;
    events.label(dev, "dev");
    events.label(bus, "bus");
    events.label(backend, "backend");
    CHECK(bus.ref_count() == 2);     // dev's child<> + dev's own
    CHECK(backend.ref_count() == 2); // bus's child<> + bus's own
    CHECK(dev.link("backend") == &backend);
    const strings tail{// the bus's and backend's child<> references are gone;
                       // each survives on the reference its owner kept
                       "finalizing dev", "finalize dev",   // dev drops bus
                       "finalizing bus", "finalize bus",   // bus drops backend
                       "finalizing backend", "finalize backend"};

    SECTION("unparenting the dev from the objects root (check-qom-proplist delchild)") {
        root->add_child("dev0", dev);
        made.reset();
        CHECK(dev.ref_count() == 1); // the root's
        CHECK(backend.canonical_path() == "/dev0/bus/backend");
        log.clear();

        REQUIRE_NOTHROW(qomem::unparent(dev));
        strings expected{"unparenting dev from container", "dev unparent hook",
                         "unparenting bus from dev",       "bus unparent hook",
                         "unparenting backend from bus"};
        expected.insert(expected.end(), tail.begin(), tail.end());
        CHECK(log.take() == expected);
        CHECK_FALSE(root->has_property("dev0"));
    }
    SECTION("finalizing the orphan dev directly: its properties are released newest first") {
        log.clear();
        REQUIRE_NOTHROW(made.reset());
        // Only the child's release is visible: the weak link holds nothing.
        // When the link was released first, the bus's hook deleting it again
        // is a no-op; when not, the hook releases it.
        strings expected{"finalizing dev", "unparenting bus from dev", "bus unparent hook",
                         "unparenting backend from bus"};
        expected.insert(expected.end(), tail.begin() + 1, tail.end());
        CHECK(log.take() == expected);
    }
    root.reset();
    CHECK(qomem::live_object_count() == 0);
}

// ---- misuse, caught by the assertion handler with the state unchanged ------------

namespace {
// A child whose unparent hook misuses its parent, which at that moment is
// being finalized (count 0).
class rogue_child : public qomem::object {
    QOMEM_OBJECT(rogue_child, "test-rogue-child", qomem::object)
public:
    enum class misuse { unref_parent, ref_parent };
    explicit rogue_child(misuse m) : misuse_(m) {}

    bool reported = false;
    std::uint32_t parent_count_after = 99;

protected:
    void on_unparent() override {
        // The failure is caught here: letting it escape would unwind out of
        // the parent's finalization (and out of a ref_ptr's destructor).
        try {
            if (misuse_ == misuse::unref_parent)
                parent()->unref();
            else
                parent()->ref();
        } catch (const qomem::assertion_failure&) {
            reported = true;
        }
        parent_count_after = parent()->ref_count();
        object::on_unparent();
    }

private:
    misuse misuse_;
};

// An object whose finalizer drops a reference to itself.
class self_unref : public qomem::object {
    QOMEM_OBJECT(self_unref, "test-self-unref", qomem::object)
public:
    explicit self_unref(bool& reported) : reported_(&reported) {}
    ~self_unref() override {
        try {
            unref();
        } catch (const qomem::assertion_failure&) {
            *reported_ = true;
        }
    }

private:
    bool* reported_;
};
} // namespace

TEST_CASE("unref or ref of a dead object is reported and changes nothing", "[object][misuse]") {
    leak_check leaks;
    throwing_assertions asserts;

    SECTION("unref from the unparent hook of a child of an object being finalized") {
        auto parent = qomem::make<qomem::container>();
        auto child = qomem::make<rogue_child>(rogue_child::misuse::unref_parent);
        parent->add_child("rogue", *child);
        parent.reset(); // finalizes the parent, which unparents the child
        CHECK(child->reported);
        CHECK(child->parent_count_after == 0);
        CHECK(child->parent() == nullptr);
        CHECK(child->ref_count() == 1);
        CHECK(qomem::live_objects() == std::map<std::string, std::size_t, std::less<>>{
                                           {"test-rogue-child", 1}});
    }
    SECTION("ref (resurrection) from the same hook") {
        auto parent = qomem::make<qomem::container>();
        auto child = qomem::make<rogue_child>(rogue_child::misuse::ref_parent);
        parent->add_child("rogue", *child);
        parent.reset();
        CHECK(child->reported);
        CHECK(child->parent_count_after == 0);
        CHECK(qomem::live_object_count() == 1);
    }
    SECTION("unref of itself from a finalizer") {
        bool reported = false;
        qomem::make<self_unref>(reported).reset();
        CHECK(reported);
    }
}

TEST_CASE("unparent of an object without a parent does nothing, as QEMU's object_unparent",
          "[object][unparent]") {
    leak_check leaks;
    throwing_assertions asserts; // a misuse report would throw: none is made
    event_log log;
    auto orphan = make_node(log, "orphan");
    REQUIRE_NOTHROW(qomem::unparent(*orphan));
    CHECK(orphan->ref_count() == 1);
    CHECK(orphan->parent() == nullptr);
    CHECK(log.events().empty());

    SECTION("including a second unparent of a child held elsewhere (QEMU error paths do it)") {
        auto parent = qomem::make<qomem::container>();
        parent->add_child("c", *orphan);
        qomem::unparent(*orphan);
        CHECK(orphan->ref_count() == 1);
        REQUIRE_NOTHROW(qomem::unparent(*orphan));
        CHECK(orphan->ref_count() == 1);
        CHECK_FALSE(parent->has_property("c"));
    }
}

namespace {
// Calls unparent on itself from its own unparent hook: a no-op (it is
// already leaving), not a second removal.
class self_unparenting : public qomem::object {
    QOMEM_OBJECT(self_unparenting, "test-self-unparenting", qomem::object)
public:
    self_unparenting() = default;
    int hook_runs = 0;

protected:
    void on_unparent() override {
        ++hook_runs;
        qomem::unparent(*this);
        object::on_unparent();
    }
};
} // namespace

TEST_CASE("unparent from an object's own unparent hook does nothing more", "[object][unparent]") {
    leak_check leaks;
    auto parent = qomem::make<qomem::container>();
    auto c = qomem::make<self_unparenting>();
    parent->add_child("c", *c);
    qomem::unparent(*c);
    CHECK(c->hook_runs == 1);
    CHECK(c->parent() == nullptr);
    CHECK(c->ref_count() == 1);
    CHECK_FALSE(parent->has_property("c"));
}

TEST_CASE("adding a child that already has a parent is reported and changes nothing",
          "[object][misuse]") {
    leak_check leaks;
    throwing_assertions asserts;
    auto p1 = qomem::make<qomem::container>();
    auto p2 = qomem::make<qomem::container>();
    auto c = qomem::make<qomem::container>();
    p1->add_child("c", *c);

    CHECK_THROWS_AS(p2->add_child("c", *c), qomem::assertion_failure);
    CHECK_THROWS_AS(p1->add_child("again", *c), qomem::assertion_failure);
    CHECK(c->parent() == p1.get());
    CHECK(c->name() == "c");
    CHECK(c->ref_count() == 2);
    CHECK_FALSE(p2->has_property("c"));
    CHECK_FALSE(p1->has_property("again"));

    SECTION("nor may an object become a child of its own descendant") {
        p2->add_child("p1", *p1);
        CHECK_THROWS_AS(c->add_child("loop", *p2), qomem::assertion_failure);
        CHECK_THROWS_AS(p2->add_child("self", *p2), qomem::assertion_failure);
        CHECK(p2->parent() == nullptr);
        CHECK(p2->ref_count() == 1);
        CHECK_FALSE(c->has_property("loop"));
    }
}

TEST_CASE("dropping the last reference of an object that still has a parent is reported",
          "[object][misuse]") {
    leak_check leaks;
    throwing_assertions asserts;
    event_log log;
    auto parent = qomem::make<qomem::container>();
    node& child = adopt(*parent, "child", make_node(log, "child"));
    REQUIRE(child.ref_count() == 1); // the parent's only

    // Called directly, never through a ref_ptr: a destructor must not throw.
    CHECK_THROWS_AS(child.unref(), qomem::assertion_failure);
    CHECK_THROWS_WITH(child.unref(), Catch::Contains("'child'"));
    CHECK(child.ref_count() == 1);
    CHECK(child.parent() == parent.get());
    CHECK(parent->child("child") == &child);
    CHECK(log.events().empty()); // not finalized

    qomem::unparent(child); // the balanced way
    CHECK(log.take() == strings{"finalize child"});
}

TEST_CASE("live_objects counts live objects per type", "[object]") {
    leak_check leaks;
    using counts = std::map<std::string, std::size_t, std::less<>>;
    CHECK(qomem::live_objects().empty());
    auto l1 = qomem::make<lamp>();
    auto l2 = qomem::make<lamp>();
    auto d = qomem::make<desk_lamp>();
    auto c = qomem::make<qomem::container>();
    c->add_child("l1", *l1);
    CHECK(qomem::live_objects() == counts{{"container", 1}, {"test-desk-lamp", 1}, {"test-lamp", 2}});
    CHECK(qomem::live_object_count() == 4);

    l1.reset(); // still alive: the container holds it
    l2.reset();
    CHECK(qomem::live_objects() == counts{{"container", 1}, {"test-desk-lamp", 1}, {"test-lamp", 1}});
    c.reset();
    CHECK(qomem::live_objects() == counts{{"test-desk-lamp", 1}}); // types with none are omitted
    d.reset();
    CHECK(qomem::live_objects().empty());
    CHECK(qomem::live_object_count() == 0);
}

// ---- finalization always completes ------------------------------------------------

namespace {
// A child whose unparent hook throws.
class throwing_child : public qomem::object {
    QOMEM_OBJECT(throwing_child, "test-throwing-child", qomem::object)
public:
    throwing_child(event_log& log, std::string label) : log_(&log), label_(std::move(label)) {}
    ~throwing_child() override { log_->add("finalize " + label_); }

protected:
    void on_unparent() override {
        log_->add("hook " + label_ + " throws");
        throw std::runtime_error("hook of " + label_ + " failed");
    }

private:
    event_log* log_;
    std::string label_;
};

std::vector<std::string> finalization_errors;
void record_finalization_error(const qomem::finalization_error& e) noexcept {
    try {
        std::rethrow_exception(e.error);
    } catch (const std::exception& x) {
        finalization_errors.push_back(std::string(e.type) + ": " + x.what());
    }
}

/// Records finalization errors into finalization_errors for its lifetime.
class recorded_finalization_errors {
public:
    recorded_finalization_errors() { finalization_errors.clear(); }
    ~recorded_finalization_errors() { finalization_errors.clear(); }

private:
    qomem::scoped_finalization_error_handler guard_{&record_finalization_error};
};
} // namespace

TEST_CASE("a hook that throws while its parent is finalized does not stop the finalization: "
          "everything is released and freed, and the first error is reported afterwards",
          "[object][lifetime][finalize]") {
    leak_check leaks;
    recorded_finalization_errors reported;
    event_log log;
    event_recorder events(log);
    auto parent = make_node(log, "parent");
    events.label(*parent, "parent");
    events.label(adopt(*parent, "a", make_node(log, "a")), "a");
    events.label(adopt(*parent, "b", qomem::make<throwing_child>(log, "b")), "b");
    events.label(adopt(*parent, "c", qomem::make<throwing_child>(log, "c")), "c");
    log.clear();

    // Through a ref_ptr's destructor: before, an exception escaping here was
    // std::terminate (and the parent stayed half-finalized at count 0).
    parent.reset();
    CHECK(log.take() == strings{"finalizing parent",
                                "unparenting c from parent", "hook c throws",
                                "finalizing c", "finalize c",
                                "unparenting b from parent", "hook b throws",
                                "finalizing b", "finalize b",
                                "unparenting a from parent", "finalizing a", "finalize a",
                                "finalize parent"});
    CHECK(finalization_errors == strings{"test-node: hook of c failed"});
    CHECK(qomem::live_object_count() == 0);
}

TEST_CASE("unparent and delete_property complete the removal when the hook throws, then rethrow",
          "[object][lifetime][finalize]") {
    leak_check leaks;
    recorded_finalization_errors reported;
    event_log log;
    auto parent = make_node(log, "parent");
    auto& child = adopt(*parent, "child", qomem::make<throwing_child>(log, "child"));
    log.clear();

    SECTION("unparent") {
        CHECK_THROWS_WITH(qomem::unparent(child), "hook of child failed");
    }
    SECTION("delete_property") {
        CHECK_THROWS_WITH(parent->delete_property("child"), "hook of child failed");
    }
    CHECK(log.take() == strings{"hook child throws", "finalize child"});
    CHECK_FALSE(parent->has_property("child"));
    CHECK(finalization_errors.empty()); // rethrown to the caller, not reported
    CHECK(qomem::live_object_count() == 1);
}

namespace {
// Exposes the protected hand-off pair, as memory_region does for its writer.
class handed_off : public qomem::object {
    QOMEM_OBJECT(handed_off, "test-handed-off", qomem::object)
public:
    explicit handed_off(event_log& log) : log_(&log) {}
    ~handed_off() override { log_->add("finalize"); }
    using object::drop_ref;
    using object::finalize_dropped;

private:
    event_log* log_;
};

template <class T>
concept can_drop_ref = requires(T& o) { o.drop_ref(); };
template <class T>
concept can_finalize_dropped = requires(T& o) { o.finalize_dropped(); };
} // namespace

// Only types that hand their last reference to another thread (memory
// regions) reach the pair; anyone else uses ref/unref.
static_assert(!can_drop_ref<qomem::object> && !can_finalize_dropped<qomem::object>);
static_assert(!can_drop_ref<qomem::container> && !can_finalize_dropped<qomem::container>);
static_assert(can_drop_ref<handed_off> && can_finalize_dropped<handed_off>);

TEST_CASE("finalize_dropped finalizes only an object whose last reference drop_ref dropped",
          "[object][lifetime][misuse]") {
    leak_check leaks;
    throwing_assertions asserts;
    event_log log;
    auto o = qomem::make<handed_off>(log);
    handed_off& raw = *o;

    SECTION("on a live object it is misuse, and nothing changes") {
        CHECK_THROWS_WITH(raw.finalize_dropped(), Catch::Contains("did not drop"));
        CHECK(raw.ref_count() == 1);
        raw.ref();
        CHECK_FALSE(raw.drop_ref()); // not the last
        CHECK_THROWS_AS(raw.finalize_dropped(), qomem::assertion_failure);
        CHECK(raw.ref_count() == 1);
        CHECK(log.events().empty());
    }
    SECTION("after drop_ref dropped the last reference: finalized, once") {
        o.detach();
        REQUIRE(raw.drop_ref());
        CHECK(raw.ref_count() == 0);
        CHECK(log.events().empty()); // not yet: the caller decides where
        raw.finalize_dropped();
        CHECK(log.take() == strings{"finalize"});
    }
}

// ---- a derived class that forgets QOMEM_OBJECT is refused at compile time ----------

namespace {
class declared_base : public qomem::object {
    QOMEM_OBJECT(declared_base, "test-declared-base", qomem::object)
public:
    declared_base() = default;
};
// Forgot QOMEM_OBJECT: it would pass for a declared_base (same type name,
// and a cast to it would accept any other declared_base).
class forgetful : public declared_base {
public:
    forgetful() = default;
};
class forgetful_interface_user : public qomem::object, public blinker {
    QOMEM_OBJECT(forgetful_interface_user, "test-forgetful-interface-user", qomem::object, blinker)
public:
    int blink() override { return 1; }
};
struct sub_blinker : blinker {}; // an interface-like class without QOMEM_INTERFACE

template <class T>
concept can_make = requires { qomem::make<T>(); };
template <class T>
concept can_dynamic_cast = requires(qomem::object* o) { qomem::dynamic_cast_to<T>(o); };
template <class T>
concept can_cast = requires(qomem::object& o) { qomem::cast<T>(o); };
template <class T>
concept can_embed = requires { typename qomem::embedded<T>; };
template <class T>
concept can_class_of = requires { qomem::class_of<T>(); };
} // namespace

static_assert(qomem::ObjectType<declared_base>);
static_assert(!qomem::ObjectType<forgetful>, "a class without its own QOMEM_OBJECT is no QOM type");
static_assert(can_make<declared_base> && !can_make<forgetful>);
static_assert(can_dynamic_cast<declared_base> && !can_dynamic_cast<forgetful>);
static_assert(can_cast<declared_base> && !can_cast<forgetful>);
static_assert(can_embed<declared_base> && !can_embed<forgetful>);
static_assert(can_class_of<declared_base> && !can_class_of<forgetful>);
static_assert(qomem::InterfaceType<blinker> && !qomem::InterfaceType<sub_blinker>);
static_assert(can_dynamic_cast<blinker> && !can_dynamic_cast<sub_blinker>);
static_assert(qomem::ObjectType<forgetful_interface_user>);

TEST_CASE("the QOM-type traits tell declared types from forgetful subclasses", "[object][type]") {
    // The static_asserts above are the test (a regression fails the build);
    // this case pins the run-time facts they protect.
    leak_check leaks;
    auto b = qomem::make<declared_base>();
    CHECK(b->type().name == "test-declared-base");
    CHECK(qomem::dynamic_cast_to<declared_base>(static_cast<qomem::object*>(b.get())) == b.get());
}
