// The fixture loader: what it builds (regions, owners, address spaces), how
// it refuses bad input (an error naming the file, the region and the field,
// nothing left behind), how a test finds regions, and how a device model is
// attached at a region's real place.
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <qomem/fixture.hpp>
#include <qomem/hmp_text.hpp>
#include <qomem/mtree.hpp>

#include "test_support.hpp"

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
        CHECK(std::string(e.what()).rfind("test.json: ", 0) == 0);
    }
    CHECK(qomem::live_object_count() == before);
}

std::string replace(std::string s, const std::string& from, const std::string& to) {
    const auto pos = s.find(from);
    REQUIRE(pos != std::string::npos);
    return s.replace(pos, from.size(), to);
}

std::string read_text(const std::filesystem::path& p) {
    std::ifstream in(p, std::ios::binary);
    std::ostringstream s;
    s << in.rdbuf();
    return s.str();
}

const std::filesystem::path conformance = std::filesystem::path(QOMEM_TEST_DATA_DIR) / "conformance/qemu-7.2";

// A device model for attach_ops: records what reaches it.
struct recording_regs {
    static constexpr qomem::access_limits valid{.min_access_size = 1, .max_access_size = 4};
    static constexpr qomem::access_limits impl{.min_access_size = 1, .max_access_size = 1};
    std::vector<std::string> log;
    std::uint64_t read(qomem::hwaddr offset, unsigned size) {
        log.push_back("read " + std::to_string(offset) + "/" + std::to_string(size));
        return 0x40 + offset;
    }
    void write(qomem::hwaddr offset, std::uint64_t v, unsigned size) {
        log.push_back("write " + std::to_string(offset) + "/" + std::to_string(size) + "=" + std::to_string(v));
    }
};

} // namespace

TEST_CASE("a fixture builds its regions, address spaces and flat views, and leaves nothing behind",
          "[fixture]") {
    qomem_test::leak_check leaks;
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
    // Without owners in the file, one device owns every region.
    CHECK(m->region(2).owner() == m->root().resolve_path("/machine/fixture"));
    CHECK(m->region(2).canonical_path() == "/machine/fixture/ram[0]");
}

TEST_CASE("a fixture lives in its machine's own memory system, also after attach_ops", "[fixture]") {
    qomem_test::leak_check leaks;
    recording_regs regs; // outlives the machines
    auto m = qomem::fixture_machine::parse(small_fixture(), "small.json");
    auto other = qomem::fixture_machine::parse(small_fixture(), "other.json");
    CHECK(&m->memory() != &other->memory());
    CHECK(&m->memory() != &qomem::memory_system::default_system());
    for (const qomem::address_space* as : m->spaces()) CHECK(&as->system() == &m->memory());
    for (std::size_t id = 0; id < m->region_count(); ++id) CHECK(m->region(id).system() == &m->memory());
    // The system holds the fixture's address spaces and no others.
    CHECK(qomem::info_mtree(m->memory(), {.flatview = true}) == qomem::info_mtree(m->spaces(), {.flatview = true}));
    {
        qomem::memory_transaction tx(m->memory());
        m->region(1).set_enabled(false);
        CHECK(m->spaces()[0]->view()->ranges().size() == 1); // not committed yet
    }
    CHECK(m->spaces()[0]->view()->ranges().empty());
    CHECK(other->spaces()[0]->view()->ranges().size() == 1);
    qomem::memory_region& uart = m->attach_ops(m->region(3), regs);
    CHECK(uart.system() == &m->memory());
}

TEST_CASE("fixture regions may be listed before the alias targets and containers they use",
          "[fixture]") {
    qomem_test::leak_check leaks;
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

TEST_CASE("a fixture's owners become QOM objects at their paths, owning their regions", "[fixture]") {
    qomem_test::leak_check leaks;
    const std::string json = R"({"owners": [
        {"path": "/machine/q35", "device": true, "type": "q35-pcihost"},
        {"path": "/machine/q35/mch", "device": true},
        {"path": "/machine/peripheral/br1", "device": true, "id": "br1", "type": "pci-bridge"},
        {"path": "/objects/pc.ram", "device": false}],
      "regions": [
        {"id": 0, "name": "system", "kind": "container", "size": "0x10000000000000000",
         "owner": null, "home": "/machine/unattached"},
        {"id": 1, "name": "pc.ram", "kind": "ram", "size": "0x100000", "owner": "/objects/pc.ram"},
        {"id": 2, "name": "ram", "kind": "alias", "size": "0x100000", "parent": 0, "addr": "0x0",
         "alias": 1, "alias_offset": "0x0", "owner": "/machine/q35/mch"},
        {"id": 3, "name": "win", "kind": "io", "size": "0x1000", "parent": 0, "addr": "0x100000",
         "owner": "/machine/peripheral/br1"},
        {"id": 4, "name": "win", "kind": "io", "size": "0x1000", "parent": 0, "addr": "0x200000",
         "owner": "/machine/peripheral/br1"},
        {"id": 5, "name": "lost", "kind": "ram", "size": "0x1000", "owner": null}],
      "address_spaces": [{"name": "memory", "root": 0}]})";
    auto m = qomem::fixture_machine::parse(json, "owners.json");
    const qomem::object& root = m->root();
    REQUIRE(root.resolve_path("/machine/q35/mch"));
    CHECK(root.resolve_path("/machine/q35")->type().name == "fixture-device");
    CHECK(root.resolve_path("/objects/pc.ram")->type().name == "fixture-object");
    const auto* br1 = qomem::dynamic_cast_to<qomem::device>(root.resolve_path("/machine/peripheral/br1"));
    REQUIRE(br1);
    CHECK(br1->id() == "br1");
    CHECK(root.resolve_path("/machine/fixture") == nullptr); // every region has its owner
    CHECK(m->region(0).owner() == nullptr);
    CHECK(m->region(0).canonical_path() == "/machine/unattached/system[0]");
    CHECK(m->region(1).owner() == root.resolve_path("/objects/pc.ram"));
    CHECK(m->region(3).canonical_path() == "/machine/peripheral/br1/win[0]");
    CHECK(m->region(4).canonical_path() == "/machine/peripheral/br1/win[1]");
    CHECK(m->region(5).canonical_path() == std::nullopt); // an orphan
    // The owners show in `info mtree -o` the way QEMU prints them.
    const std::string text = qomem::info_mtree(m->spaces(), {.owner = true, .disabled = true});
    CHECK(text.find("): system parent:{obj path=/machine/unattached}\n") != std::string::npos);
    CHECK(text.find("): win owner:{dev id=br1}\n") != std::string::npos);
    CHECK(text.find("): alias ram @pc.ram 0000000000000000-00000000000fffff owner:{dev path=/machine/q35/mch}\n") !=
          std::string::npos);
    CHECK(text.find("): pc.ram owner:{obj path=/objects/pc.ram}\n") != std::string::npos);
}

TEST_CASE("a test finds fixture regions by name, canonical path and owner", "[fixture]") {
    qomem_test::leak_check leaks;
    auto m = qomem::fixture_machine::load(conformance / "q35-bridges/fixture.json");
    SECTION("by name") {
        const auto windows = m->regions_named("pci_bridge_pci");
        CHECK(windows.size() == 5); // rp1, up1, dn1, br1, br2
        for (auto* r : windows) CHECK(r->region_name() == "pci_bridge_pci");
        CHECK(m->unique_region("ioapic").region_name() == "ioapic");
        CHECK_THROWS_WITH(m->unique_region("pci_bridge_pci"),
                          Catch::Contains("5 regions are named \"pci_bridge_pci\"") &&
                              Catch::Contains("/machine/peripheral/br2/pci_bridge_pci["));
        CHECK_THROWS_WITH(m->unique_region("no-such-region"), Catch::Contains("no region is named \"no-such-region\""));
    }
    SECTION("by owner, as a device id or a path") {
        const auto by_id = m->regions_owned_by("br2");
        const auto by_path = m->regions_owned_by("/machine/peripheral/br2");
        CHECK(by_id == by_path);
        CHECK_FALSE(by_id.empty());
        for (auto* r : by_id) CHECK(r->owner() == m->root().resolve_path("/machine/peripheral/br2"));
        CHECK(m->regions_owned_by("nobody").empty());
    }
    SECTION("by canonical path") {
        for (auto* r : m->regions_owned_by("br2")) {
            const auto path = r->canonical_path();
            REQUIRE(path);
            CHECK(m->region_at_path(*path) == r);
        }
        CHECK(m->region_at_path("/machine/peripheral/br2") == nullptr); // a device, not a region
        CHECK(m->region_at_path("/no/such/path") == nullptr);
    }
    SECTION("address spaces by name") {
        CHECK(m->space("I/O").root().region_name() == "io");
        CHECK_THROWS_WITH(m->space("nope"), Catch::Contains("no address space is named \"nope\""));
        // Every PCI device has a "bus master container" space named after its type.
        CHECK_THROWS_WITH(m->space("virtio-rng-pci"), Catch::Contains("2 address spaces are named"));
    }
}

TEST_CASE("attach_ops makes a device model answer at the fixture region's place", "[fixture]") {
    qomem_test::leak_check leaks;
    recording_regs regs;
    auto m = qomem::fixture_machine::load(conformance / "q35-bridges-firmware/fixture.json");
    const std::string flat_before = qomem::info_mtree(m->spaces(), {.flatview = true});
    const std::string tree_before = qomem::info_mtree(m->spaces(), {.disabled = true});

    SECTION("a port of the I/O space") {
        qomem::memory_region& serial = m->unique_region("serial");
        const auto path = serial.canonical_path();
        qomem::memory_region& mine = m->attach_ops(serial, regs);
        CHECK(mine.canonical_path() == path); // same owner, same name, same slot
        CHECK(&m->unique_region("serial") == &mine);
        std::uint8_t b = 0;
        CHECK(m->space("I/O").write(0x3f8 + 1, "\x5a", 1) == qomem::memtx_ok);
        CHECK(m->space("I/O").read(0x3f8 + 5, &b, 1) == qomem::memtx_ok);
        CHECK(b == 0x45);
        // A 2-byte access is split as the model's impl rules say.
        std::uint16_t w = 0;
        CHECK(m->space("I/O").read(0x3f8, &w, 2) == qomem::memtx_ok);
        CHECK(regs.log == std::vector<std::string>{"write 1/1=90", "read 5/1", "read 0/1", "read 1/1"});
    }
    SECTION("a BAR behind two PCI bridges, reached through their windows") {
        // rng2 sits behind br1 and br2: its common-config BAR is seen in the
        // memory space only through both bridges' window aliases.
        qomem::memory_region* bar = nullptr;
        for (auto* r : m->regions_owned_by("rng2"))
            if (r->region_name() == "virtio-pci-common-virtio-rng") bar = r;
        REQUIRE(bar);
        const auto at = qomem::fixture_machine::address_in(m->space("memory"), *bar);
        REQUIRE(at);
        qomem::memory_region& mine = m->attach_ops(*bar, regs);
        CHECK(qomem::fixture_machine::address_in(m->space("memory"), mine) == at);
        std::uint32_t v = 0;
        CHECK(m->space("memory").read(*at + 0x10, &v, 4) == qomem::memtx_ok);
        CHECK(v == 0x53525150); // bytes 0x50..0x53 from four 1-byte reads
        CHECK(regs.log == std::vector<std::string>{"read 16/1", "read 17/1", "read 18/1", "read 19/1"});
    }
    SECTION("a region that is the root of an address space and has subregions") {
        qomem::memory_region& io = m->space("I/O").root();
        REQUIRE(io.kind() == qomem::region_kind::io);
        const std::size_t subs = io.subregion_count();
        qomem::memory_region& mine = m->attach_ops(io, regs);
        CHECK(&m->space("I/O").root() == &mine);
        CHECK(mine.subregion_count() == subs);
        std::uint8_t b = 0;
        CHECK(m->space("I/O").read(0x10, &b, 1) == qomem::memtx_ok); // a gap: the root's own ops
        CHECK(regs.log == std::vector<std::string>{"read 16/1"});
    }
    // What was printed before is printed after: place, rank and flags kept.
    CHECK(qomem::info_mtree(m->spaces(), {.flatview = true}) == flat_before);
    CHECK(qomem::info_mtree(m->spaces(), {.disabled = true}) == tree_before);
}

TEST_CASE("attach_ops keeps an overlapping sibling of equal priority below it, and aliases of it work",
          "[fixture]") {
    qomem_test::leak_check leaks;
    // "a" (added first) and "b" overlap at equal priority: b, added last, wins
    // 0x1800..0x1fff. An alias in a second space shows a.
    const std::string json = R"({"regions": [
      {"id": 0, "name": "root", "kind": "container", "size": "0x10000"},
      {"id": 1, "name": "a", "kind": "io", "size": "0x1000", "parent": 0, "addr": "0x1000"},
      {"id": 2, "name": "b", "kind": "io", "size": "0x1000", "parent": 0, "addr": "0x1800"},
      {"id": 3, "name": "view", "kind": "container", "size": "0x10000"},
      {"id": 4, "name": "a-alias", "kind": "alias", "size": "0x1000", "parent": 3, "addr": "0x8000",
       "alias": 1, "alias_offset": "0x0", "readonly": true}],
      "address_spaces": [{"name": "mem", "root": 0}, {"name": "other", "root": 3}]})";
    recording_regs regs;
    auto m = qomem::fixture_machine::parse(json, "overlap.json");
    const std::string before = qomem::info_mtree(m->spaces(), {.flatview = true});
    qomem::memory_region& a = m->attach_ops(m->unique_region("a"), regs);
    CHECK(qomem::info_mtree(m->spaces(), {.flatview = true}) == before);
    CHECK(m->unique_region("a-alias").alias() == &a);
    CHECK(m->unique_region("a-alias").readonly());
    std::uint8_t b = 0;
    CHECK(m->space("mem").read(0x1800, &b, 1) == qomem::memtx_decode_error); // still b's (no ops)
    CHECK(m->space("mem").read(0x17ff, &b, 1) == qomem::memtx_ok);
    CHECK(m->space("other").read(0x8004, &b, 1) == qomem::memtx_ok);
    CHECK(regs.log == std::vector<std::string>{"read 2047/1", "read 4/1"});
}

TEST_CASE("attach_ops refuses a region that is not a fixture I/O region", "[fixture]") {
    qomem_test::leak_check leaks;
    qomem_test::throwing_assertions asserts;
    recording_regs regs;
    auto m = qomem::fixture_machine::parse(small_fixture(), "small.json");
    CHECK_THROWS_AS(m->attach_ops(m->region(2), regs), qomem::assertion_failure); // RAM
    auto other = qomem::fixture_machine::parse(small_fixture(), "other.json");
    CHECK_THROWS_AS(m->attach_ops(other->region(3), regs), qomem::assertion_failure); // not m's
    qomem::memory_region& mine = m->attach_ops(m->region(3), regs);
    CHECK_THROWS_AS(m->attach_ops(mine, regs), qomem::assertion_failure); // has ops already
    CHECK_FALSE(mine.enabled()); // flags kept
}

TEST_CASE("each malformed fixture field is refused naming the file, the region and the field",
          "[fixture]") {
    qomem_test::leak_check leaks;
    const std::string good = small_fixture();
    SECTION("not JSON") { require_refused("{", "not valid JSON"); }
    SECTION("top level is not an object") { require_refused("[]", "expected a JSON object"); }
    SECTION("unknown top-level field") {
        require_refused(replace(good, "\"machine\"", "\"machin\""), "unknown field 'machin'");
    }
    SECTION("missing regions") { require_refused(R"({"address_spaces": []})", "field 'regions'"); }
    SECTION("id that is not the index") {
        require_refused(replace(good, "\"id\": 2,", "\"id\": 7,"), "region 2 ('ram') field 'id'");
    }
    SECTION("unknown kind") {
        require_refused(replace(good, "\"kind\": \"ram\"", "\"kind\": \"dram\""),
                        "region 2 ('ram') field 'kind': unknown kind \"dram\"");
    }
    SECTION("name that is not a string") {
        require_refused(replace(good, "\"name\": \"ram\"", "\"name\": 7"), "region 2 field 'name': expected a string");
    }
    SECTION("size that is not hex") {
        require_refused(replace(good, "\"size\": \"0x4000\"", "\"size\": \"4000\""), "region 2 ('ram') field 'size'");
        require_refused(replace(good, "\"size\": \"0x4000\"", "\"size\": \"0x40g0\""),
                        "region 2 ('ram') field 'size': 'g'");
        require_refused(replace(good, "\"size\": \"0x4000\"", "\"size\": 16384"),
                        "region 2 ('ram') field 'size': expected a hex string");
    }
    SECTION("size above 2^64") {
        require_refused(replace(good, "\"size\": \"0x4000\"", "\"size\": \"0x10000000000000001\""),
                        "region 2 ('ram') field 'size': \"0x10000000000000001\" is larger than 2^64");
    }
    SECTION("parent out of range") {
        require_refused(replace(good, "\"parent\": 0,\n     \"addr\": \"0x2000\"", "\"parent\": 9,\n     \"addr\": \"0x2000\""),
                        "region 1 ('ram-alias') field 'parent': expected a region id from 0 to 3, got 9");
    }
    SECTION("parent is itself") {
        require_refused(replace(good, "\"parent\": 0, \"addr\": \"0x9000\"", "\"parent\": 3, \"addr\": \"0x9000\""),
                        "region 3 ('uart') field 'parent': a region cannot contain itself");
    }
    SECTION("parent is an alias") {
        require_refused(replace(good, "\"parent\": 0, \"addr\": \"0x9000\"", "\"parent\": 1, \"addr\": \"0x9000\""),
                        "region 3 ('uart') field 'parent': region 1 is an alias");
    }
    SECTION("parent without addr") {
        require_refused(replace(good, ", \"addr\": \"0x9000\"", ""), "region 3 ('uart') field 'addr': missing");
    }
    SECTION("addr of 2^64") {
        require_refused(replace(good, "\"addr\": \"0x9000\"", "\"addr\": \"0x10000000000000000\""),
                        "region 3 ('uart') field 'addr': 0x10000000000000000 is not a 64-bit address");
    }
    SECTION("priority out of range") {
        require_refused(replace(good, "\"priority\": 1", "\"priority\": 4294967296"),
                        "region 1 ('ram-alias') field 'priority'");
    }
    SECTION("alias without target") {
        require_refused(replace(good, "\"alias\": 2, ", ""), "region 1 ('ram-alias') field 'alias': missing");
    }
    SECTION("alias field on a non-alias") {
        require_refused(small_fixture(R"(,
    {"id": 4, "name": "x", "kind": "ram", "size": "0x10", "alias": 2})"),
                        "region 4 ('x') field 'alias': given for a region of kind ram");
    }
    SECTION("enabled that is not a boolean") {
        require_refused(replace(good, "\"enabled\": false", "\"enabled\": 0"),
                        "region 3 ('uart') field 'enabled': expected true or false");
    }
    SECTION("unknown region field") {
        require_refused(replace(good, "\"enabled\": false", "\"enabld\": false"), "region 3 ('uart'): unknown field 'enabld'");
    }
    SECTION("address space with a bad root") {
        require_refused(replace(good, "{\"name\": \"dma\", \"root\": 0}", "{\"name\": \"dma\", \"root\": 4}"),
                        "address space 1 ('dma') field 'root'");
    }
    SECTION("owner that is not listed") {
        require_refused(replace(good, "\"enabled\": false", "\"enabled\": false, \"owner\": \"/machine/peripheral/x\""),
                        "region 3 ('uart') field 'owner': \"/machine/peripheral/x\" is not the path of an entry of 'owners'");
    }
    SECTION("owner that is not a string") {
        require_refused(replace(good, "\"enabled\": false", "\"enabled\": false, \"owner\": 3"),
                        "region 3 ('uart') field 'owner': expected a string, got 3");
    }
    SECTION("home for a region that has an owner") {
        require_refused(replace(good, "\"enabled\": false", "\"enabled\": false, \"home\": \"/machine\""),
                        "region 3 ('uart') field 'home': given for a region that has an owner");
    }
    SECTION("home that does not exist") {
        require_refused(replace(good, "\"enabled\": false", "\"enabled\": false, \"owner\": null, \"home\": \"/nowhere\""),
                        "region 3 ('uart') field 'home': \"/nowhere\" is neither");
    }
    SECTION("owner entries") {
        auto with_owners = [&](const std::string& owners) {
            return replace(good, "\"machine\": \"test\",", "\"machine\": \"test\", \"owners\": [" + owners + "],");
        };
        require_refused(with_owners(R"({"path": "machine/x"})"), "owner 0 field 'path': \"machine/x\" is not an absolute QOM path");
        require_refused(with_owners(R"({"path": "/machine/x"}, {"path": "/machine/x"})"),
                        "owner 1 ('/machine/x') field 'path': owner 0 has the same path");
        require_refused(with_owners(R"({"path": "/machine/unattached"})"),
                        "owner 0 ('/machine/unattached') field 'path': that path belongs to the machine's own container");
        require_refused(with_owners(R"({"path": "/machine", "device": true})"),
                        "owner 0 ('/machine') field 'device': /machine is the machine object, not a device");
        require_refused(with_owners(R"({"path": "/objects/m", "device": false, "id": "m"})"),
                        "owner 0 ('/objects/m') field 'id': given for an object that is not a device");
        require_refused(with_owners(R"({"path": "/machine/x", "colour": "red"})"), "owner 0: unknown field 'colour'");
        require_refused(with_owners(R"({"path": "/machine/x", "device": "yes"})"),
                        "owner 0 ('/machine/x') field 'device': expected true or false");
    }
}

TEST_CASE("a fixture with an alias cycle is refused naming the cycle", "[fixture]") {
    qomem_test::leak_check leaks;
    const std::string json = R"({"regions": [
      {"id": 0, "name": "a", "kind": "alias", "size": "0x10", "alias": 1},
      {"id": 1, "name": "b", "kind": "alias", "size": "0x10", "alias": 0}],
      "address_spaces": []})";
    require_refused(json, "region 0 ('a') field 'alias': alias cycle 0 -> 1 -> 0");
}

TEST_CASE("a fixture whose containment would loop through an alias is refused", "[fixture]") {
    qomem_test::leak_check leaks;
    // Region 1 (in container 0) aliases container 0: the graph 0 -> 1 -> 0 is a cycle.
    const std::string json = R"({"regions": [
      {"id": 0, "name": "c", "kind": "container", "size": "0x1000"},
      {"id": 1, "name": "loop", "kind": "alias", "size": "0x10", "parent": 0, "addr": "0x0",
       "alias": 0}],
      "address_spaces": [{"name": "as", "root": 0}]})";
    require_refused(json, "region 1 ('loop') field 'parent': adding 'loop' as a subregion of 'c' would make a cycle");
}

TEST_CASE("loading a missing file is refused with its path", "[fixture]") {
    CHECK_THROWS_WITH(qomem::fixture_machine::load("/nonexistent/fixture.json"),
                      Catch::Contains("/nonexistent/fixture.json: cannot open the file"));
}

TEST_CASE("a fixture written by to_json reads back as the same fixture", "[fixture]") {
    qomem_test::leak_check leaks;
    const qomem::fixture_spec spec =
        qomem::fixture_spec::read(read_text(conformance / "q35-bridges-firmware/fixture.json"), "q35");
    const std::string again = spec.to_json();
    const qomem::fixture_spec back = qomem::fixture_spec::read(again, "again");
    CHECK(back.to_json() == again);
    REQUIRE(back.regions.size() == spec.regions.size());
    CHECK(back.owners.size() == spec.owners.size());
    auto m1 = qomem::fixture_machine::build(spec);
    auto m2 = qomem::fixture_machine::build(back);
    CHECK(qomem::info_mtree(m1->spaces(), {.owner = true, .disabled = true}) ==
          qomem::info_mtree(m2->spaces(), {.owner = true, .disabled = true}));
}

TEST_CASE("every captured QEMU machine prints QEMU's own flat views and tree, and leaves nothing behind",
          "[fixture]") {
    qomem_test::leak_check leaks;
    std::size_t machines = 0;
    for (const auto& dir : std::filesystem::directory_iterator(conformance)) {
        if (!std::filesystem::exists(dir.path() / "fixture.json")) continue;
        INFO(dir.path().filename().string());
        ++machines;
        auto m = qomem::fixture_machine::load(dir.path() / "fixture.json");
        CHECK(qomem::hmp::mtree_text_difference(read_text(dir.path() / "mtree-f.txt"),
                                                qomem::info_mtree(m->spaces(), {.flatview = true})) == "");
        CHECK(qomem::hmp::mtree_text_difference(read_text(dir.path() / "mtree-D.txt"),
                                                qomem::info_mtree(m->spaces(), {.disabled = true})) == "");
        if (std::filesystem::exists(dir.path() / "mtree-oD.txt"))
            CHECK(qomem::hmp::mtree_text_difference(read_text(dir.path() / "mtree-oD.txt"),
                                                    qomem::info_mtree(m->spaces(), {.owner = true, .disabled = true})) == "");
    }
    CHECK(machines >= 6);
}

TEST_CASE("the comparison rule ignores block order and heading order, nothing else", "[fixture]") {
    const std::string a = "FlatView #0\r\n AS \"x\", root: r\r\n AS \"y\", root: r\r\n Root memory region: r\r\n"
                          "  0000000000000000-0000000000000fff (prio 0, ram): r\r\n\r\n"
                          "FlatView #1\r\n AS \"z\", root: s\r\n Root memory region: (none)\r\n  No rendered FlatView\r\n\r\n";
    const std::string b = "FlatView #0\n AS \"z\", root: s\n Root memory region: (none)\n  No rendered FlatView\n\n"
                          "FlatView #1\n AS \"y\", root: r\n AS \"x\", root: r\n Root memory region: r\n"
                          "  0000000000000000-0000000000000fff (prio 0, ram): r\n\n";
    CHECK(qomem::hmp::mtree_text_difference(a, b) == "");
    const std::string c = replace(b, "(prio 0, ram)", "(prio 0, rom)");
    CHECK_THAT(qomem::hmp::mtree_text_difference(a, c), Catch::Contains("1 block(s) of the expected text are not in"));
    const std::string d = replace(b, " AS \"x\", root: r\n", "");
    CHECK(qomem::hmp::mtree_text_difference(a, d) != "");
}
