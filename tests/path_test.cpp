// Tests for QOM path resolution (object.hpp), as QEMU's object_resolve_path
// family: absolute paths through children and links, partial paths with the
// ambiguity flag, typed resolution, paths relative to an object, and all of
// it in trees that are not under a root container.
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <qomem/object.hpp>

#include "test_support.hpp"

using qomem_test::leak_check;
using qomem_test::throwing_assertions;

namespace {

class lamp : public qomem::object {
    QOMEM_OBJECT(lamp, "test-path-lamp", qomem::object)
public:
    lamp() = default;
};

template <class T>
T& adopt(qomem::object& parent, std::string_view name, qomem::ref_ptr<T> child) {
    parent.add_child(name, *child);
    return *child;
}

/// /
///   /hall            container
///     /lamp          lamp
///   /kitchen         container, link "light" -> /hall/lamp, link "none" (empty)
///     /shelf         container
///       /lamp        lamp
struct house {
    qomem::ref_ptr<qomem::container> root = qomem::container::make_root();
    qomem::container& hall = adopt(*root, "hall", qomem::make<qomem::container>());
    lamp& hall_lamp = adopt(hall, "lamp", qomem::make<lamp>());
    qomem::container& kitchen = adopt(*root, "kitchen", qomem::make<qomem::container>());
    qomem::container& shelf = adopt(kitchen, "shelf", qomem::make<qomem::container>());
    lamp& shelf_lamp = adopt(shelf, "lamp", qomem::make<lamp>());
    house() {
        kitchen.add_link("light", &hall_lamp, qomem::link_strength::weak, lamp::static_type());
        kitchen.add_link("none", nullptr, qomem::link_strength::weak);
    }
};

} // namespace

TEST_CASE("absolute paths follow children and links from the top of the tree", "[path]") {
    leak_check leaks;
    house h;
    CHECK(qomem::resolve_path(h.shelf_lamp, "/") == h.root.get());
    CHECK(qomem::resolve_path(h.hall, "/kitchen/shelf/lamp") == &h.shelf_lamp);
    CHECK(qomem::resolve_path(h.hall, "/kitchen/light") == &h.hall_lamp); // through a link
    CHECK(qomem::resolve_path(h.hall, "//kitchen///shelf/") == &h.shelf);   // empty parts skipped
    CHECK(qomem::resolve_path(h.hall, "/kitchen/none") == nullptr);        // an empty link
    CHECK(qomem::resolve_path(h.hall, "/kitchen/none/x") == nullptr);
    CHECK(qomem::resolve_path(h.hall, "/attic") == nullptr);
    // The member function takes absolute paths only, with the same rules.
    CHECK(h.hall.resolve_path("/kitchen/light") == &h.hall_lamp);
    CHECK(h.hall.resolve_path("kitchen") == nullptr);

    bool ambiguous = true;
    CHECK(qomem::resolve_path(h.hall, "/hall/lamp", &ambiguous) == &h.hall_lamp);
    CHECK_FALSE(ambiguous);

    SECTION("typed: the object named must be of the type") {
        CHECK(qomem::resolve_path_type<lamp>(h.hall, "/hall/lamp") == &h.hall_lamp);
        CHECK(qomem::resolve_path_type<lamp>(h.hall, "/hall") == nullptr);
        CHECK(qomem::resolve_path_type<qomem::container>(h.hall, "/hall") == &h.hall);
    }
}

TEST_CASE("partial paths name the one object a suffix reaches, or report ambiguity",
          "[path][partial]") {
    leak_check leaks;
    house h;
    bool ambiguous = false;
    CHECK(qomem::resolve_path(h.hall, "shelf/lamp", &ambiguous) == &h.shelf_lamp);
    CHECK_FALSE(ambiguous);
    CHECK(qomem::resolve_path(h.hall, "hall/lamp", &ambiguous) == &h.hall_lamp);
    CHECK(qomem::resolve_path(h.hall, "shelf", &ambiguous) == &h.shelf);

    // "lamp" is /hall/lamp and /kitchen/shelf/lamp.
    CHECK(qomem::resolve_path(h.hall, "lamp", &ambiguous) == nullptr);
    CHECK(ambiguous);
    // Typed, "" names every object of the type: two lamps, one shelf.
    CHECK(qomem::resolve_path_type<lamp>(h.hall, "", &ambiguous) == nullptr);
    CHECK(ambiguous);
    CHECK(qomem::resolve_path_type(h.hall, "shelf", qomem::container::static_type(), &ambiguous) ==
          &h.shelf);
    CHECK_FALSE(ambiguous);
    // Typed partial paths count only objects of the type.
    CHECK(qomem::resolve_path_type<lamp>(h.hall, "shelf/lamp") == &h.shelf_lamp);
    CHECK(qomem::resolve_path_type<qomem::container>(h.hall, "lamp") == nullptr);
    // Nothing matches: not ambiguous.
    CHECK(qomem::resolve_path(h.hall, "attic", &ambiguous) == nullptr);
    CHECK_FALSE(ambiguous);

    SECTION("one object reached through a child and through a link counts twice (QEMU's rule)") {
        // With a link "shelf" on the hall, the shelf's lamp is reached from
        // the hall through the link and from the kitchen through children.
        h.hall.add_link("shelf", &h.shelf, qomem::link_strength::weak);
        CHECK(qomem::resolve_path(h.hall, "shelf/lamp", &ambiguous) == nullptr);
        CHECK(ambiguous);
        h.hall.delete_property("shelf");
    }
    CHECK(qomem::resolve_path(h.hall, "kitchen/light", &ambiguous) == &h.hall_lamp);
}

TEST_CASE("resolve_path_at follows a path relative to an object, or absolute from its tree",
          "[path][relative]") {
    leak_check leaks;
    house h;
    CHECK(qomem::resolve_path_at(h.kitchen, "shelf/lamp") == &h.shelf_lamp);
    CHECK(qomem::resolve_path_at(h.kitchen, "light") == &h.hall_lamp);
    CHECK(qomem::resolve_path_at(h.kitchen, "") == &h.kitchen);
    CHECK(qomem::resolve_path_at(h.kitchen, "lamp") == nullptr); // no partial matching
    CHECK(qomem::resolve_path_at(h.kitchen, "/hall/lamp") == &h.hall_lamp);
    CHECK(qomem::resolve_path_component(h.kitchen, "shelf") == &h.shelf);
    CHECK(qomem::resolve_path_component(h.kitchen, "light") == &h.hall_lamp);
    CHECK(qomem::resolve_path_component(h.kitchen, "type") == nullptr); // not an object property
}

TEST_CASE("paths resolve, and links are set by path, in a tree that is not under the root",
          "[path][orphan]") {
    leak_check leaks;
    throwing_assertions asserts;
    auto top = qomem::make<qomem::container>(); // not make_root(): no canonical paths
    auto& box = adopt(*top, "box", qomem::make<qomem::container>());
    auto& l = adopt(box, "lamp", qomem::make<lamp>());
    auto holder = qomem::make<qomem::container>();
    top->add_child("holder", *holder);
    holder->add_link("light", nullptr, qomem::link_strength::strong, lamp::static_type());

    CHECK(l.canonical_path() == std::nullopt);
    CHECK(l.path_in_tree() == "/box/lamp");
    CHECK(qomem::resolve_path(*holder, "/box/lamp") == &l);
    CHECK(qomem::resolve_path(*holder, "lamp") == &l);
    holder->set_link_path("light", "/box/lamp");
    CHECK(holder->link("light") == &l);
    CHECK(holder->print_property("light") == "/box/lamp");
    holder->set_link_path("light", "");
    holder->set_link_path("light", "box/lamp");
    CHECK(holder->link("light") == &l);
    CHECK(l.ref_count() == 2); // box's child<> and the strong link

    // An object alone: "/" is itself.
    auto alone = qomem::make<lamp>();
    CHECK(qomem::resolve_path(*alone, "/") == alone.get());
    CHECK(alone->path_in_tree() == "/");
}
