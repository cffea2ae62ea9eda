// The conformance-fixture loader: what it builds, and how it refuses bad input
// (an error naming the region id and the field, nothing left behind).
#include <string>

#include <catch2/catch.hpp>

#include <qomem/fixture.hpp>
#include <qomem/mtree.hpp>

namespace {

// A small valid fixture: a system container with RAM below an alias and a
// disabled MMIO region, and two address spaces sharing one root.
std::string small_fixture(const std::string& extra_region = "") {
    return R"({
  "machine": "test",
  "regions": [
    {"id": 0, "name": "system", "kind": "container", "size": "0x10000000000000000"},
    {"id": 1, "name": "ram-alias", "kind": "alias", "size": "0x1000", "parent": 0,
     "addr": "0x2000", "priority": 1, "alias": 2, "alias_offset": "0x1000"},
    {"id": 2, "name": "ram", "kind": "ram", "size": "0x4000"},
    {"id": 3, "name": "uart", "kind": "io", "size": "0x100", "parent": 0, "addr": "0x9000",
     "enabled": false})" +
           extra_region + R"(
  ],
  "address_spaces": [{"name": "memory", "root": 0}, {"name": "dma", "root": 0}]
})";
}

void require_refused(const std::string& json, const std::string& fragment) {
    const auto before = qomem::live_object_count();
    try {
        qomem::fixture_machine::parse(json, "test.json");
        FAIL("fixture accepted; expected an error containing: " << fragment);
    } catch (const qomem::fixture_error& e) {
        INFO("message: " << e.what());
        CHECK(std::string(e.what()).find(fragment) != std::string::npos);
    }
    CHECK(qomem::live_object_count() == before);
}

std::string replace(std::string s, const std::string& from, const std::string& to) {
    const auto pos = s.find(from);
    REQUIRE(pos != std::string::npos);
    return s.replace(pos, from.size(), to);
}

} // namespace

TEST_CASE("a fixture builds its regions, address spaces and flat views, and leaves nothing behind",
          "[fixture]") {
    const auto before = qomem::live_object_count();
    {
        auto m = qomem::fixture_machine::parse(small_fixture(), "small.json");
        CHECK(m->description() == "test");
        REQUIRE(m->region_count() == 4);
        REQUIRE(m->spaces().size() == 2);
        CHECK(m->spaces()[0]->view() == m->spaces()[1]->view());
        const auto& ranges = m->spaces()[0]->view()->ranges();
        REQUIRE(ranges.size() == 1);
        CHECK(ranges[0].start == 0x2000);
        CHECK(ranges[0].size == 0x1000);
        CHECK(ranges[0].mr == &m->region(2));
        CHECK(ranges[0].offset_in_region == 0x1000);
        CHECK(m->region(1).priority() == 1);
        CHECK_FALSE(m->region(3).enabled());
        // Every region is owned by the fixture's board device.
        CHECK(m->region(2).owner() == m->root().resolve_path("/machine/fixture"));
        CHECK(m->region(2).canonical_path() == "/machine/fixture/ram[0]");
    }
    CHECK(qomem::live_object_count() == before);
}

TEST_CASE("fixture regions may be listed before the alias targets and containers they use",
          "[fixture]") {
    // Region 0 is an alias of region 2 and a subregion of region 1, both later.
    const std::string json = R"({"regions": [
      {"id": 0, "name": "a", "kind": "alias", "size": "0x10", "parent": 1, "addr": "0x100",
       "alias": 2, "alias_offset": "0x0"},
      {"id": 1, "name": "root", "kind": "container", "size": "0x1000"},
      {"id": 2, "name": "r", "kind": "ram", "size": "0x10"}],
      "address_spaces": [{"name": "as", "root": 1}]})";
    auto m = qomem::fixture_machine::parse(json);
    const auto& ranges = m->spaces()[0]->view()->ranges();
    REQUIRE(ranges.size() == 1);
    CHECK(ranges[0].start == 0x100);
    CHECK(ranges[0].mr == &m->region(2));
}

TEST_CASE("each malformed fixture field is refused with the region id and field named",
          "[fixture]") {
    const std::string good = small_fixture();
    SECTION("not JSON") { require_refused("{", "not valid JSON"); }
    SECTION("top level is not an object") { require_refused("[]", "expected a JSON object"); }
    SECTION("unknown top-level field") {
        require_refused(replace(good, "\"machine\"", "\"machin\""), "unknown field 'machin'");
    }
    SECTION("missing regions") {
        require_refused(R"({"address_spaces": []})", "field 'regions'");
    }
    SECTION("id that is not the index") {
        require_refused(replace(good, "\"id\": 2,", "\"id\": 7,"), "region 2 field 'id'");
    }
    SECTION("unknown kind") {
        require_refused(replace(good, "\"kind\": \"ram\"", "\"kind\": \"dram\""),
                        "region 2 field 'kind': unknown kind \"dram\"");
    }
    SECTION("size that is not hex") {
        require_refused(replace(good, "\"size\": \"0x4000\"", "\"size\": \"4000\""),
                        "region 2 field 'size'");
        require_refused(replace(good, "\"size\": \"0x4000\"", "\"size\": \"0x40g0\""),
                        "region 2 field 'size': 'g'");
        require_refused(replace(good, "\"size\": \"0x4000\"", "\"size\": 16384"),
                        "region 2 field 'size': expected a hex string");
    }
    SECTION("size above 2^64") {
        require_refused(replace(good, "\"size\": \"0x4000\"", "\"size\": \"0x10000000000000001\""),
                        "region 2 field 'size': \"0x10000000000000001\" is larger than 2^64");
    }
    SECTION("parent out of range") {
        require_refused(replace(good, "\"parent\": 0,\n     \"addr\": \"0x2000\"",
                                "\"parent\": 9,\n     \"addr\": \"0x2000\""),
                        "region 1 field 'parent': expected a region id from 0 to 3, got 9");
    }
    SECTION("parent is itself") {
        require_refused(replace(good, "\"parent\": 0, \"addr\": \"0x9000\"",
                                "\"parent\": 3, \"addr\": \"0x9000\""),
                        "region 3 field 'parent': a region cannot contain itself");
    }
    SECTION("parent is an alias") {
        require_refused(replace(good, "\"parent\": 0, \"addr\": \"0x9000\"",
                                "\"parent\": 1, \"addr\": \"0x9000\""),
                        "region 3 field 'parent': region 1 is an alias");
    }
    SECTION("parent without addr") {
        require_refused(replace(good, ", \"addr\": \"0x9000\"", ""),
                        "region 3 field 'addr': missing");
    }
    SECTION("addr of 2^64") {
        require_refused(replace(good, "\"addr\": \"0x9000\"", "\"addr\": \"0x10000000000000000\""),
                        "region 3 field 'addr': 0x10000000000000000 is not a 64-bit address");
    }
    SECTION("priority out of range") {
        require_refused(replace(good, "\"priority\": 1", "\"priority\": 4294967296"),
                        "region 1 field 'priority'");
    }
    SECTION("alias without target") {
        require_refused(replace(good, "\"alias\": 2, ", ""), "region 1 field 'alias': missing");
    }
    SECTION("alias field on a non-alias") {
        require_refused(small_fixture(R"(,
    {"id": 4, "name": "x", "kind": "ram", "size": "0x10", "alias": 2})"),
                        "region 4 field 'alias': given for a region of kind ram");
    }
    SECTION("enabled that is not a boolean") {
        require_refused(replace(good, "\"enabled\": false", "\"enabled\": 0"),
                        "region 3 field 'enabled': expected true or false");
    }
    SECTION("unknown region field") {
        require_refused(replace(good, "\"enabled\": false", "\"enabld\": false"),
                        "region 3: unknown field 'enabld'");
    }
    SECTION("address space with a bad root") {
        require_refused(replace(good, "{\"name\": \"dma\", \"root\": 0}", "{\"name\": \"dma\", \"root\": 4}"),
                        "address space 1 field 'root'");
    }
}

TEST_CASE("a fixture with an alias cycle is refused naming the cycle", "[fixture]") {
    const std::string json = R"({"regions": [
      {"id": 0, "name": "a", "kind": "alias", "size": "0x10", "alias": 1},
      {"id": 1, "name": "b", "kind": "alias", "size": "0x10", "alias": 0}],
      "address_spaces": []})";
    require_refused(json, "region 0 field 'alias': alias cycle 0 -> 1 -> 0");
}

TEST_CASE("a fixture whose containment would loop through an alias is refused", "[fixture]") {
    // Region 1 (in container 0) aliases container 0: the graph 0 -> 1 -> 0 is a cycle.
    const std::string json = R"({"regions": [
      {"id": 0, "name": "c", "kind": "container", "size": "0x1000"},
      {"id": 1, "name": "loop", "kind": "alias", "size": "0x10", "parent": 0, "addr": "0x0",
       "alias": 0}],
      "address_spaces": [{"name": "as", "root": 0}]})";
    require_refused(json, "region 1 field 'parent': adding 'loop' as a subregion of 'c' would make a cycle");
}

TEST_CASE("loading a missing file is refused with its path", "[fixture]") {
    CHECK_THROWS_WITH(qomem::fixture_machine::load("/nonexistent/fixture.json"),
                      Catch::Contains("/nonexistent/fixture.json: cannot open the file"));
}

TEST_CASE("the captured QEMU machines load and render without leaking", "[fixture]") {
    const auto before = qomem::live_object_count();
    for (const char* machine : {"pc", "sifive_u", "virt-arm"}) {
        INFO(machine);
        auto m = qomem::fixture_machine::load(std::string(QOMEM_TEST_DATA_DIR) +
                                              "/conformance/qemu-7.2/" + machine + "/fixture.json");
        CHECK(m->spaces().size() >= 2);
        CHECK_FALSE(qomem::info_mtree(m->spaces(), {.flatview = true}).empty());
    }
    CHECK(qomem::live_object_count() == before);
}
