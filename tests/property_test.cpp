// Tests for qomem/property.hpp and the typed-property API of object.hpp:
// get/set/parse/print by name for every kind, ranges, defaults,
// descriptions, class and instance properties, iteration with QEMU's type
// names, and QEMU's size syntax.
#include <cstdint>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <qomem/device.hpp>
#include <qomem/object.hpp>
#include <qomem/property.hpp>

#include "test_support.hpp"

using qomem_test::leak_check;
using qomem_test::throwing_assertions;
using strings = std::vector<std::string>;

namespace {

enum class speed { slow, medium, fast };

// Every kind of typed property: class ones from members and from a getter and
// a setter, and instance ones added by the constructor.
class gadget : public qomem::object {
    QOMEM_OBJECT(gadget, "test-gadget", qomem::object)
public:
    bool on = false;
    std::string label;
    std::int8_t trim = 0;
    std::uint16_t port = 0;
    std::int64_t offset = 0;
    std::uint64_t mem = 0;
    speed pace = speed::slow;
    int setter_calls = 0;
    std::uint32_t serial = 0;
    bool armed = false;

    gadget() {
        // One object's own properties (QEMU's object_property_add_*).
        add_property(qomem::int_property("serial", &gadget::serial).with_default(7));
        add_property(qomem::bool_property<gadget>(
            "armed", [](const gadget& g) { return g.armed; },
            [](gadget& g, bool v) {
                ++g.setter_calls;
                g.armed = v;
            }));
    }

    static void class_init(class_type& k, qomem::type_tag<gadget>) {
        k.add_property(qomem::bool_property("on", &gadget::on).describe("power"));
        k.add_property(qomem::string_property("label", &gadget::label).with_default("none"));
        k.add_property(qomem::int_property("trim", &gadget::trim));
        k.add_property(qomem::int_property("port", &gadget::port).with_default(80));
        k.add_property(qomem::int_property("offset", &gadget::offset));
        k.add_property(qomem::size_property("mem", &gadget::mem).with_default(std::uint64_t{1} << 20));
        k.add_property(qomem::enum_property("pace", "GadgetSpeed", {"slow", "medium", "fast"},
                                            &gadget::pace)
                           .with_default(speed::medium));
        // Read-only: a null setter.
        k.add_property(qomem::int_property<gadget>(
            "label-length", [](const gadget& g) { return static_cast<std::uint32_t>(g.label.size()); }));
    }
};

// A subtype inherits the class properties and adds its own.
class big_gadget : public gadget {
    QOMEM_OBJECT(big_gadget, "test-big-gadget", gadget)
public:
    std::string extra;
    static void class_init(class_type& k, qomem::type_tag<big_gadget>) {
        k.add_property(qomem::string_property("extra", &big_gadget::extra));
    }
};

class plain : public qomem::object {
    QOMEM_OBJECT(plain, "test-plain", qomem::object)
public:
    plain() = default;
};

} // namespace

TEST_CASE("class properties' defaults are applied at creation and instance defaults when added",
          "[property][default]") {
    leak_check leaks;
    auto g = qomem::make<gadget>();
    CHECK(g->label == "none");
    CHECK(g->port == 80);
    CHECK(g->mem == 1u << 20);
    CHECK(g->pace == speed::medium);
    CHECK(g->serial == 7);
    CHECK_FALSE(g->on); // no default: the member initializer stands
    CHECK(g->setter_calls == 0);
}

TEST_CASE("typed getters and setters read and write the members by name", "[property]") {
    leak_check leaks;
    throwing_assertions asserts;
    auto g = qomem::make<gadget>();

    g->set_bool("on", true);
    CHECK(g->on);
    CHECK(g->get_bool("on"));
    g->set_str("label", "lamp");
    CHECK(g->get_str("label") == "lamp");
    g->set_int("trim", -128);
    CHECK(g->get_int("trim") == -128);
    g->set_uint("port", 65535);
    CHECK(g->get_uint("port") == 65535);
    g->set_uint("mem", std::uint64_t{3} << 30);
    CHECK(g->get_uint("mem") == std::uint64_t{3} << 30);
    g->set_str("pace", "fast");
    CHECK(g->pace == speed::fast);
    CHECK(g->get_str("pace") == "fast");
    CHECK(g->get_enum("pace", "GadgetSpeed") == 2);
    g->set_bool("armed", true);
    CHECK(g->setter_calls == 1);
    CHECK(g->get_bool("armed"));
    CHECK(g->get_uint("label-length") == 4);
    CHECK(g->get_str("type") == "test-gadget"); // every object's class property

    SECTION("values out of the member's range are refused and change nothing") {
        CHECK_THROWS_AS(g->set_int("trim", -129), qomem::property_value_error);
        CHECK_THROWS_AS(g->set_int("trim", 128), qomem::property_value_error);
        CHECK_THROWS_AS(g->set_uint("port", 65536), qomem::property_value_error);
        CHECK_THROWS_WITH(g->set_uint("port", 65536),
                          Catch::Contains("port") && Catch::Contains("65536"));
        CHECK(g->trim == -128);
        CHECK(g->port == 65535);
    }
    SECTION("a setter of the wrong kind, an unknown name or a read-only property is refused") {
        CHECK_THROWS_AS(g->set_int("on", 1), qomem::property_error);
        CHECK_THROWS_AS(g->get_bool("label"), qomem::property_error);
        CHECK_THROWS_AS(g->get_int("port"), qomem::property_error); // unsigned: get_uint
        CHECK_THROWS_AS(g->get_enum("pace", "OtherEnum"), qomem::property_error);
        CHECK_THROWS_AS(g->get_enum("label", "GadgetSpeed"), qomem::property_error);
        CHECK_THROWS_AS(g->set_bool("nonexistent", true), qomem::property_error);
        CHECK_THROWS_WITH(g->get_bool("nonexistent"), Catch::Contains("nonexistent"));
        CHECK_THROWS_AS(g->set_uint("label-length", 3), qomem::property_error);
        CHECK_THROWS_WITH(g->set_str("type", "x"), Catch::Contains("read-only"));
        CHECK_THROWS_AS(g->set_str("pace", "warp"), qomem::property_value_error);
        CHECK(g->pace == speed::fast);
        CHECK(g->setter_calls == 1);
    }
}

TEST_CASE("parse_property and print_property use each type's text form", "[property][parse]") {
    leak_check leaks;
    auto g = qomem::make<gadget>();

    for (const char* t : {"on", "yes", "true"}) {
        g->parse_property("on", "off");
        g->parse_property("on", t);
        CHECK(g->on);
    }
    for (const char* f : {"off", "no", "false"}) {
        g->parse_property("on", "on");
        g->parse_property("on", f);
        CHECK_FALSE(g->on);
    }
    CHECK(g->print_property("on") == "false");
    g->parse_property("trim", "-0x10");
    CHECK(g->trim == -16);
    g->parse_property("port", "010"); // C's base 0: octal
    CHECK(g->port == 8);
    g->parse_property("offset", "-9223372036854775808");
    CHECK(g->offset == std::numeric_limits<std::int64_t>::min());
    CHECK(g->print_property("offset") == "-9223372036854775808");
    g->parse_property("mem", "1.5k");
    CHECK(g->mem == 1536);
    CHECK(g->print_property("mem") == "1536");
    g->parse_property("pace", "slow");
    CHECK(g->print_property("pace") == "slow");
    g->parse_property("label", "a,b c");
    CHECK(g->print_property("label") == "a,b c");

    // What print gives, parse takes back.
    for (const char* name : {"on", "trim", "port", "offset", "mem", "pace", "label", "serial"}) {
        INFO(name);
        const std::string text = g->print_property(name);
        g->parse_property(name, text);
        CHECK(g->print_property(name) == text);
    }

    SECTION("bad text is refused with the property, the text and the reason") {
        CHECK_THROWS_AS(g->parse_property("on", "maybe"), qomem::property_value_error);
        CHECK_THROWS_AS(g->parse_property("trim", "128"), qomem::property_value_error);
        CHECK_THROWS_WITH(g->parse_property("trim", "128"),
                          Catch::Contains("trim") && Catch::Contains("128") &&
                              Catch::Contains("maximum 127"));
        CHECK_THROWS_AS(g->parse_property("port", "-1"), qomem::property_value_error);
        CHECK_THROWS_AS(g->parse_property("port", "12ab"), qomem::property_value_error);
        CHECK_THROWS_AS(g->parse_property("port", ""), qomem::property_value_error);
        CHECK_THROWS_AS(g->parse_property("offset", "9223372036854775808"),
                        qomem::property_value_error);
        CHECK_THROWS_AS(g->parse_property("mem", "1.1B"), qomem::property_value_error);
        CHECK_THROWS_WITH(g->parse_property("pace", "warp"),
                          Catch::Contains("'pace'") && Catch::Contains("'warp'") &&
                              Catch::Contains("slow, medium, fast"));
        CHECK_THROWS_AS(g->parse_property("type", "x"), qomem::property_error);
        CHECK(g->print_property("pace") == "slow");
        CHECK(g->mem == 1536);
    }
}

TEST_CASE("sizes follow QEMU's qemu_strtosz", "[property][size]") {
    using qomem::parse_size;
    constexpr std::uint64_t KiB = 1024, MiB = KiB << 10, GiB = MiB << 10, TiB = GiB << 10,
                            PiB = TiB << 10, EiB = PiB << 10;
    // Units, either case; bytes by default.
    CHECK(parse_size("0") == 0);
    CHECK(parse_size("12345") == 12345);
    CHECK(parse_size("1B") == 1);
    CHECK(parse_size("8b") == 8);
    CHECK(parse_size("1K") == KiB);
    CHECK(parse_size("1k") == KiB);
    CHECK(parse_size("2M") == 2 * MiB);
    CHECK(parse_size("1G") == GiB);
    CHECK(parse_size("1T") == TiB);
    CHECK(parse_size("1P") == PiB);
    CHECK(parse_size("1E") == EiB);
    CHECK(parse_size("16777215T") == 16777215 * TiB);
    // Leading white space and '+'.
    CHECK(parse_size(" +12345") == 12345);
    // Hexadecimal: neither fraction nor unit.
    CHECK(parse_size("0xab") == 171);
    CHECK(parse_size(" +0xae") == 174);
    // Fractions, rounded to the nearest byte.
    CHECK(parse_size("1.5k") == 1536);
    CHECK(parse_size("0.5E") == EiB / 2);
    CHECK(parse_size("0.125G") == GiB / 8);
    CHECK(parse_size("1.0B") == 1); // a zero fraction is tolerated on bytes
    CHECK(parse_size("1.k") == KiB);
    CHECK(parse_size(" .5k") == 512);
    CHECK(parse_size("12.345M") == static_cast<std::uint64_t>(12.345 * MiB + 0.5));
    CHECK(parse_size("1.9999k") == 2048);
    CHECK(parse_size("1.9999999999999999999999999999999999999999999999999999k") == 2048);
    CHECK(parse_size("18446744073709551615") == std::numeric_limits<std::uint64_t>::max());

    // Refused, each with a reason.
    for (const char* bad : {"", " \t ", "crap", "k", " M", "1.1B", "1.1", "1.00001B", "0x1.8k",
                            "0x18M", "1.1.k", "1k ", "123xxx", "1kiB", "0x", "0b1000", "-1",
                            " -0", "-2M", "18446744073709551616", "20E",
                            "15.9999999999999999999999999999999999999999999999999999E"}) {
        INFO("'" << bad << "'");
        CHECK_THROWS_AS(parse_size(bad), qomem::property_value_error);
    }
    CHECK_THROWS_WITH(parse_size("1.1B"), Catch::Contains("'1.1B'") && Catch::Contains("fraction"));
    CHECK_THROWS_WITH(parse_size("-1"), Catch::Contains("negative"));
    CHECK_THROWS_WITH(parse_size("20E"), Catch::Contains("2^64"));
    CHECK_THROWS_WITH(parse_size("1x"), Catch::Contains("unit"));
}

TEST_CASE("iteration reports every property with QEMU's type name, class ones first",
          "[property][iterate]") {
    leak_check leaks;
    auto holder = qomem::make<plain>();
    auto g = qomem::make<gadget>();
    auto c = qomem::make<qomem::container>();
    g->add_child("box", *c);
    g->add_link("peer", holder.get(), qomem::link_strength::weak, plain::static_type());
    g->add_link("dev", nullptr, qomem::link_strength::strong, qomem::device::static_type());

    strings seen;
    std::map<std::string, qomem::property_info> by_name;
    g->for_each_property([&](const qomem::property_info& p) {
        seen.push_back(p.name + " " + p.type + (p.class_property ? " class" : "") +
                       (p.writable ? "" : " ro"));
        by_name[p.name] = p;
    });
    CHECK(seen == strings{"type string class ro",
                          "on bool class",
                          "label string class",
                          "trim int8 class",
                          "port uint16 class",
                          "offset int64 class",
                          "mem size class",
                          "pace GadgetSpeed class",
                          "label-length uint32 class ro",
                          "serial uint32",
                          "armed bool",
                          "box child<container> ro",
                          "peer link<test-plain>",
                          "dev link<device>"});
    CHECK(by_name["on"].description == "power");
    CHECK(by_name["on"].kind == qomem::property_kind::boolean);
    CHECK(by_name["mem"].default_value == "1048576");
    CHECK(by_name["pace"].default_value == "medium");
    CHECK(by_name["label"].default_value == "none");
    CHECK_FALSE(by_name["on"].default_value);
    CHECK(by_name["box"].kind == qomem::property_kind::child);
    CHECK(by_name["peer"].kind == qomem::property_kind::link);

    // One property by name, and descriptions set on the object's own ones.
    g->set_property_description("box", "a place for things");
    REQUIRE(g->find_property("box"));
    CHECK(g->find_property("box")->description == "a place for things");
    CHECK(g->find_property("pace")->type == "GadgetSpeed");
    CHECK_FALSE(g->find_property("nonexistent"));
    CHECK_THROWS_AS(g->set_property_description("on", "x"), qomem::property_error); // the class's

    // A subtype's class object holds its parent's class properties and its own.
    auto b = qomem::make<big_gadget>();
    strings names;
    for (const qomem::property_def& d : qomem::class_of<big_gadget>().properties())
        names.push_back(d.name());
    CHECK(names == strings{"type", "on", "label", "trim", "port", "offset", "mem", "pace",
                           "label-length", "extra"});
    CHECK(qomem::class_of<gadget>().find_property("extra") == nullptr);
    CHECK(b->get_str("type") == "test-big-gadget");
    CHECK(b->port == 80); // the inherited default applies
}

TEST_CASE("links and children are properties too: printed and parsed as paths",
          "[property][link]") {
    leak_check leaks;
    throwing_assertions asserts;
    auto root = qomem::container::make_root();
    auto g = qomem::make<gadget>();
    root->add_child("g", *g);
    auto p = qomem::make<plain>();
    root->add_child("p", *p);
    g->add_link("peer", nullptr, qomem::link_strength::strong, plain::static_type());

    CHECK(g->print_property("peer").empty());
    g->parse_property("peer", "/p");
    CHECK(g->link("peer") == p.get());
    CHECK(p->ref_count() == 3); // handle, root's child<>, the strong link
    CHECK(g->print_property("peer") == "/p");
    CHECK(g->get_str("peer") == "/p");
    g->set_str("peer", "");
    CHECK(g->link("peer") == nullptr);
    CHECK(p->ref_count() == 2);

    auto c = qomem::make<qomem::container>();
    g->add_child("box", *c);
    CHECK(g->print_property("box") == "/g/box");
    CHECK_THROWS_AS(g->parse_property("box", "/p"), qomem::property_error); // read-only
    CHECK_THROWS_AS(g->parse_property("peer", "/g"), qomem::path_error);     // wrong type
    CHECK_THROWS_AS(g->get_bool("box"), qomem::property_error);
    CHECK(g->link("peer") == nullptr);
}

TEST_CASE("a property name is taken once, across class and instance properties",
          "[property][misuse]") {
    leak_check leaks;
    throwing_assertions asserts;
    auto g = qomem::make<gadget>();
    auto c = qomem::make<qomem::container>();
    CHECK_THROWS_AS(g->add_child("on", *c), qomem::property_error);      // a class property's name
    CHECK_THROWS_AS(g->add_child("serial", *c), qomem::property_error);  // an instance one's
    CHECK_THROWS_AS(g->add_property(qomem::bool_property("on", &gadget::on)),
                    qomem::property_error);
    CHECK_THROWS_AS(g->delete_property("on"), qomem::property_error); // the class's: not deletable
    CHECK(g->has_property("on"));
    CHECK(c->ref_count() == 1);
    g->delete_property("serial"); // the object's own
    CHECK_FALSE(g->has_property("serial"));

    SECTION("a property for another type's members is misuse") {
        auto other = qomem::make<plain>();
        CHECK_THROWS_AS(other->add_property(qomem::bool_property("on", &gadget::on)),
                        qomem::assertion_failure);
        CHECK_FALSE(other->has_property("on"));
    }
    SECTION("a class property added twice, or a default that does not fit, is misuse") {
        qomem::object_class k;
        k.add_property(qomem::bool_property("x", &gadget::on));
        CHECK_THROWS_AS(k.add_property(qomem::bool_property("x", &gadget::on)),
                        qomem::assertion_failure);
        CHECK_THROWS_AS(qomem::int_property("t", &gadget::trim).with_default(300),
                        qomem::assertion_failure);
        CHECK_THROWS_AS(qomem::enum_property("p", "GadgetSpeed", {"slow", "medium", "fast"},
                                             &gadget::pace)
                            .with_default("warp"),
                        qomem::assertion_failure);
    }
}

TEST_CASE("parse_settings splits name=value text, ',,' escaping a comma", "[property][parse]") {
    using qomem::property_setting;
    auto s = qomem::parse_settings("bv=yes,sv=Hiss hiss,,hiss,av=platypus");
    REQUIRE(s.size() == 3);
    CHECK(s[0].name == "bv");
    CHECK(s[0].value == "yes");
    CHECK(s[1].name == "sv");
    CHECK(s[1].value == "Hiss hiss,hiss");
    CHECK(s[2].value == "platypus");
    CHECK(qomem::parse_settings("").empty());
    CHECK(qomem::parse_settings("a=").at(0).value.empty());
    CHECK_THROWS_AS(qomem::parse_settings("a=1,b"), qomem::property_value_error);
    CHECK_THROWS_AS(qomem::parse_settings("=1"), qomem::property_value_error);
}
