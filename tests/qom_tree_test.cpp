// Tests for qomem/qom_tree.hpp. The expected texts were written by hand from
// the trees the tests build: they are the specification of the format.
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <qomem/device.hpp>
#include <qomem/machine.hpp>
#include <qomem/object.hpp>
#include <qomem/qom_tree.hpp>

#include "test_support.hpp"

using qomem_test::leak_check;

namespace {

class widget : public qomem::object {
    QOMEM_OBJECT(widget, "test-widget", qomem::object)
public:
    widget() = default;
};

template <class T>
T& adopt(qomem::object& parent, std::string_view name, qomem::ref_ptr<T> child) {
    parent.add_child(name, *child);
    return *child;
}

} // namespace

TEST_CASE("qom_tree prints the composition tree sorted by name in byte order", "[qom_tree]") {
    leak_check leaks;
    auto root = qomem::container::make_root();
    qomem::machine& m = qomem::add_machine(*root);
    qomem::container& periph = m.peripheral();
    // Added out of order: the printer sorts by name, byte by byte.
    widget& a2 = adopt(periph, "a[2]", qomem::make<widget>());
    adopt(periph, "a[10]", qomem::make<widget>());
    widget& a = adopt(periph, "a", qomem::make<widget>());
    adopt(periph, "B", qomem::make<widget>());
    qomem::container& y = adopt(a, "y", qomem::make<qomem::container>());
    adopt(a, "x", qomem::make<qomem::container>());
    widget& d0 = adopt(m.unattached(), "device[*]", qomem::make<widget>());
    adopt(m.unattached(), "device[*]", qomem::make<widget>());

    SECTION("from the root") {
        CHECK(qomem::qom_tree(*root) == "/ (container)\n"
                                        "  /machine (machine)\n"
                                        "    /peripheral (container)\n"
                                        "      /B (test-widget)\n"
                                        "      /a (test-widget)\n"
                                        "        /x (container)\n"
                                        "        /y (container)\n"
                                        "      /a[10] (test-widget)\n"
                                        "      /a[2] (test-widget)\n"
                                        "    /peripheral-anon (container)\n"
                                        "    /unattached (container)\n"
                                        "      /device[0] (test-widget)\n"
                                        "      /device[1] (test-widget)\n");
    }
    SECTION("from a subtree, whose first line is its canonical path, with reference counts") {
        qomem::ref_ptr<widget> handle(&a);                            // a: + a handle
        d0.add_link("peer", &a2, qomem::link_strength::strong);       // a[2]: + a strong link
        d0.add_link("weak-peer", &y, qomem::link_strength::weak);     // y: unchanged
        CHECK(qomem::qom_tree(periph, {.show_refs = true}) ==
              "/machine/peripheral (container) refs=1\n"
              "  /B (test-widget) refs=1\n"
              "  /a (test-widget) refs=2\n"
              "    /x (container) refs=1\n"
              "    /y (container) refs=1\n"
              "  /a[10] (test-widget) refs=1\n"
              "  /a[2] (test-widget) refs=2\n");
    }
    SECTION("a leaf is one line") {
        CHECK(qomem::qom_tree(y) == "/machine/peripheral/a/y (container)\n");
    }
    SECTION("an object that left the tree is printed as '/' (it has no name any more)") {
        qomem::ref_ptr<widget> handle(&a);
        qomem::unparent(a);
        CHECK(qomem::qom_tree(a, {.show_refs = true}) == "/ (test-widget) refs=1\n"
                                                         "  /x (container) refs=1\n"
                                                         "  /y (container) refs=1\n");
    }
    SECTION("fmt formats qom_tree_of(obj) exactly as qom_tree(obj)") {
        CHECK(fmt::format("{}", qomem::qom_tree_of(m)) == qomem::qom_tree(m));
        CHECK(fmt::format("{}", qomem::qom_tree_of(a, {.show_refs = true})) ==
              "/machine/peripheral/a (test-widget) refs=1\n"
              "  /x (container) refs=1\n"
              "  /y (container) refs=1\n");
    }
}

TEST_CASE("qom_tree of a tree without a root container starts from '/' or the object's name",
          "[qom_tree]") {
    leak_check leaks;
    auto top = qomem::make<qomem::container>(); // not make_root(): no canonical paths
    qomem::container& k = adopt(*top, "k", qomem::make<qomem::container>());
    adopt(k, "leaf", qomem::make<widget>());

    CHECK(qomem::qom_tree(*top) == "/ (container)\n"
                                   "  /k (container)\n"
                                   "    /leaf (test-widget)\n");
    CHECK(qomem::qom_tree(k) == "/k (container)\n"
                                "  /leaf (test-widget)\n");
}

namespace {
// Prints the tree of every object as it starts being finalized.
class tree_printer : public qomem::lifetime_observer {
public:
    tree_printer() : previous_(qomem::set_lifetime_observer(this)) {}
    ~tree_printer() { qomem::set_lifetime_observer(previous_); }
    tree_printer(const tree_printer&) = delete;
    tree_printer& operator=(const tree_printer&) = delete;

    void finalizing(const qomem::object& obj) noexcept override {
        dumps.push_back(qomem::qom_tree(obj, {.show_refs = true}));
    }
    std::vector<std::string> dumps;

private:
    qomem::lifetime_observer* previous_;
};
} // namespace

TEST_CASE("qom_tree can print an object being finalized, with refs=0 and its children still there",
          "[qom_tree]") {
    leak_check leaks;
    tree_printer printer;
    auto w = qomem::make<widget>();
    adopt(*w, "part", qomem::make<qomem::container>());
    w.reset();
    CHECK(printer.dumps == std::vector<std::string>{"/ (test-widget) refs=0\n"
                                                    "  /part (container) refs=1\n",
                                                    // then the child, released by its parent
                                                    "/ (container) refs=0\n"});
}
