// qomem/fixture.hpp — loads a machine's memory map from a conformance fixture
// (the JSON format of tests/conformance/README.md). Optional: needs
// nlohmann-json, and is not included by <qomem/qomem.hpp>.
//
//     auto m = qomem::fixture_machine::load("tests/conformance/qemu-7.2/pc/fixture.json");
//     fmt::print("{}", qomem::info_mtree(m->spaces(), {.flatview = true}));
//
// The regions are built, then each one with a `parent` is added to it in array
// order, all in one transaction, and the address spaces are created. All
// regions are owned by one device, "/machine/fixture", so they follow the
// library's lifetime rules: destroying the fixture_machine destroys the
// address spaces, then unparents the device, and everything is finalized
// (regions first, the device last).
//
// Bad input is refused with qomem::fixture_error naming the source, the
// region id and the field, and leaves nothing behind.
#pragma once

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <memory>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include <qomem/address_space.hpp>
#include <qomem/device.hpp>
#include <qomem/error.hpp>
#include <qomem/machine.hpp>
#include <qomem/memory_region.hpp>

namespace qomem {

/// A machine built from a fixture: a tree "/" -> "machine" -> "fixture"
/// (the device owning every region), the regions by id, and the address
/// spaces in fixture order.
class fixture_machine {
public:
    /// Parses `json_text`; `source` names it in error messages.
    /// Throws: fixture_error (nothing is left behind).
    static std::unique_ptr<fixture_machine> parse(std::string_view json_text,
                                                  std::string source = "fixture");
    /// Reads and parses a file. Throws: fixture_error, also for an unreadable file.
    static std::unique_ptr<fixture_machine> load(const std::filesystem::path& path);

    fixture_machine(const fixture_machine&) = delete;
    fixture_machine& operator=(const fixture_machine&) = delete;
    ~fixture_machine();

    /// The command line the machine was captured from.
    const std::string& description() const noexcept { return description_; }
    std::size_t region_count() const noexcept { return regions_.size(); }
    memory_region& region(std::size_t id) const { return *regions_.at(id); }
    /// The address spaces, in fixture order.
    std::span<const address_space* const> spaces() const noexcept { return views_; }
    const object& root() const noexcept { return *root_; }
    /// The memory system of the fixture's machine.
    memory_system& memory() const noexcept { return *memory_; }

private:
    /// The device that owns every region of a fixture.
    class board : public device {
        QOMEM_OBJECT(board, "fixture-board", device)
    public:
        board() noexcept = default;
    };

    fixture_machine() = default;
    void build(const nlohmann::json& doc, const std::string& source);

    std::string description_;
    ref_ptr<container> root_;
    board* board_ = nullptr;
    memory_system* memory_ = nullptr; // the machine's: lives as long as its regions
    std::vector<memory_region*> regions_;
    std::vector<std::unique_ptr<address_space>> spaces_;
    std::vector<const address_space*> views_;
};

namespace detail {

struct fixture_reader {
    const std::string& source;

    [[noreturn]] void fail(std::string_view where, std::string_view what) const {
        throw fixture_error(fmt::format("{}: {}: {}", source, where, what));
    }

    static std::string region_where(std::size_t id, std::string_view field) {
        return fmt::format("region {} field '{}'", id, field);
    }

    u128 hex(const nlohmann::json& v, std::string_view where) const {
        if (!v.is_string()) fail(where, fmt::format("expected a hex string, got {}", v.dump()));
        const std::string& s = v.get_ref<const std::string&>();
        if (s.size() < 3 || s[0] != '0' || (s[1] != 'x' && s[1] != 'X'))
            fail(where, fmt::format("expected a hex string like \"0x1000\", got \"{}\"", s));
        u128 value = 0;
        for (std::size_t i = 2; i < s.size(); ++i) {
            const char c = s[i];
            unsigned digit;
            if (c >= '0' && c <= '9')
                digit = unsigned(c - '0');
            else if (c >= 'a' && c <= 'f')
                digit = unsigned(c - 'a' + 10);
            else if (c >= 'A' && c <= 'F')
                digit = unsigned(c - 'A' + 10);
            else
                fail(where, fmt::format("'{}' in \"{}\" is not a hex digit", c, s));
            value = value * 16 + digit;
            if (value > u128_2_64) fail(where, fmt::format("\"{}\" is larger than 2^64", s));
        }
        return value;
    }

    hwaddr address(const nlohmann::json& v, std::string_view where) const {
        const u128 a = hex(v, where);
        if (a >= u128_2_64)
            fail(where, fmt::format("{} is not a 64-bit address", v.get_ref<const std::string&>()));
        return static_cast<hwaddr>(a);
    }

    std::size_t index(const nlohmann::json& v, std::size_t count, std::string_view where) const {
        if (!v.is_number_integer() || v.get<std::int64_t>() < 0 ||
            static_cast<std::uint64_t>(v.get<std::int64_t>()) >= count)
            fail(where, fmt::format("expected a region id from 0 to {}, got {}", count - 1, v.dump()));
        return static_cast<std::size_t>(v.get<std::int64_t>());
    }

    bool boolean(const nlohmann::json& v, std::string_view where) const {
        if (!v.is_boolean()) fail(where, fmt::format("expected true or false, got {}", v.dump()));
        return v.get<bool>();
    }
};

struct fixture_region_spec {
    std::string name;
    region_kind kind = region_kind::container;
    u128 size = 0;
    bool has_parent = false;
    std::size_t parent = 0;
    hwaddr addr = 0;
    std::int32_t priority = 0;
    bool has_alias = false;
    std::size_t alias = 0;
    hwaddr alias_offset = 0;
    bool enabled = true, nonvolatile = false, readonly = false;
};

} // namespace detail

inline std::unique_ptr<fixture_machine> fixture_machine::load(const std::filesystem::path& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw fixture_error(fmt::format("{}: cannot open the file", path.string()));
    std::ostringstream text;
    text << in.rdbuf();
    return parse(text.str(), path.string());
}

inline std::unique_ptr<fixture_machine> fixture_machine::parse(std::string_view json_text,
                                                               std::string source) {
    nlohmann::json doc = nlohmann::json::parse(json_text, nullptr, false);
    if (doc.is_discarded()) throw fixture_error(fmt::format("{}: not valid JSON", source));
    std::unique_ptr<fixture_machine> m(new fixture_machine);
    m->build(doc, source); // on a throw, ~fixture_machine undoes what was built
    return m;
}

inline void fixture_machine::build(const nlohmann::json& doc, const std::string& source) {
    const detail::fixture_reader rd{source};
    if (!doc.is_object()) rd.fail("top level", "expected a JSON object");
    for (const auto& [key, value] : doc.items())
        if (key != "machine" && key != "regions" && key != "address_spaces")
            rd.fail("top level", fmt::format("unknown field '{}'", key));
    if (doc.contains("machine")) {
        if (!doc["machine"].is_string()) rd.fail("field 'machine'", "expected a string");
        description_ = doc["machine"].get<std::string>();
    }
    if (!doc.contains("regions") || !doc["regions"].is_array())
        rd.fail("field 'regions'", "expected an array of regions");
    if (!doc.contains("address_spaces") || !doc["address_spaces"].is_array())
        rd.fail("field 'address_spaces'", "expected an array of address spaces");
    const nlohmann::json& jregions = doc["regions"];
    const std::size_t n = jregions.size();

    // Read and check every field before building anything.
    std::vector<detail::fixture_region_spec> specs(n);
    for (std::size_t id = 0; id < n; ++id) {
        const nlohmann::json& j = jregions[id];
        auto where = [&](std::string_view field) { return rd.region_where(id, field); };
        if (!j.is_object()) rd.fail(fmt::format("region {}", id), "expected a JSON object");
        for (const auto& [key, value] : j.items()) {
            static constexpr std::string_view known[] = {
                "id",       "name",  "kind",         "size",    "parent",      "addr",
                "priority", "alias", "alias_offset", "enabled", "nonvolatile", "readonly"};
            if (std::find(std::begin(known), std::end(known), key) == std::end(known))
                rd.fail(fmt::format("region {}", id), fmt::format("unknown field '{}'", key));
        }
        auto& s = specs[id];
        if (!j.contains("id") || !j["id"].is_number_integer() || j["id"].get<std::int64_t>() < 0 ||
            static_cast<std::size_t>(j["id"].get<std::int64_t>()) != id)
            rd.fail(where("id"), fmt::format("expected {} (the region's index), got {}", id,
                                             j.contains("id") ? j["id"].dump() : "nothing"));
        if (!j.contains("name") || !j["name"].is_string())
            rd.fail(where("name"), "expected a string");
        s.name = j["name"].get<std::string>();
        if (!j.contains("kind") || !j["kind"].is_string()) rd.fail(where("kind"), "expected a string");
        const std::string kind = j["kind"].get<std::string>();
        if (kind == "container")
            s.kind = region_kind::container;
        else if (kind == "io")
            s.kind = region_kind::io;
        else if (kind == "ram")
            s.kind = region_kind::ram;
        else if (kind == "rom")
            s.kind = region_kind::rom;
        else if (kind == "romd")
            s.kind = region_kind::rom_device;
        else if (kind == "ramd")
            s.kind = region_kind::ram_device;
        else if (kind == "alias")
            s.kind = region_kind::alias;
        else
            rd.fail(where("kind"),
                    fmt::format("unknown kind \"{}\" (expected container, io, ram, rom, romd, "
                                "ramd or alias)",
                                kind));
        if (!j.contains("size")) rd.fail(where("size"), "missing");
        s.size = rd.hex(j["size"], where("size"));
        if (j.contains("parent")) {
            s.has_parent = true;
            s.parent = rd.index(j["parent"], n, where("parent"));
            if (s.parent == id) rd.fail(where("parent"), "a region cannot contain itself");
            if (!j.contains("addr")) rd.fail(where("addr"), "missing (required with 'parent')");
        }
        if (j.contains("addr")) {
            if (!s.has_parent) rd.fail(where("addr"), "given without 'parent'");
            s.addr = rd.address(j["addr"], where("addr"));
        }
        if (j.contains("priority")) {
            const auto& p = j["priority"];
            if (!p.is_number_integer() || p.get<std::int64_t>() < std::numeric_limits<std::int32_t>::min() ||
                p.get<std::int64_t>() > std::numeric_limits<std::int32_t>::max())
                rd.fail(where("priority"), fmt::format("expected a 32-bit signed integer, got {}", p.dump()));
            s.priority = static_cast<std::int32_t>(p.get<std::int64_t>());
        }
        if (s.kind == region_kind::alias) {
            if (!j.contains("alias")) rd.fail(where("alias"), "missing (required for kind alias)");
            s.has_alias = true;
            s.alias = rd.index(j["alias"], n, where("alias"));
            if (j.contains("alias_offset"))
                s.alias_offset = rd.address(j["alias_offset"], where("alias_offset"));
        } else if (j.contains("alias") || j.contains("alias_offset")) {
            rd.fail(where(j.contains("alias") ? "alias" : "alias_offset"),
                    fmt::format("given for a region of kind {}", kind));
        }
        if (j.contains("enabled")) s.enabled = rd.boolean(j["enabled"], where("enabled"));
        if (j.contains("nonvolatile")) s.nonvolatile = rd.boolean(j["nonvolatile"], where("nonvolatile"));
        if (j.contains("readonly")) s.readonly = rd.boolean(j["readonly"], where("readonly"));
    }
    for (std::size_t id = 0; id < n; ++id)
        if (specs[id].has_parent && specs[specs[id].parent].kind == region_kind::alias)
            rd.fail(rd.region_where(id, "parent"),
                    fmt::format("region {} is an alias, and aliases have no subregions",
                                specs[id].parent));
    // Alias chains must end: follow each one, refusing a cycle.
    for (std::size_t id = 0; id < n; ++id) {
        std::vector<std::size_t> chain{id};
        for (std::size_t cur = id; specs[cur].has_alias;) {
            cur = specs[cur].alias;
            if (std::find(chain.begin(), chain.end(), cur) != chain.end()) {
                std::string path;
                for (std::size_t c : chain) path += fmt::format("{} -> ", c);
                rd.fail(rd.region_where(id, "alias"), fmt::format("alias cycle {}{}", path, cur));
            }
            chain.push_back(cur);
        }
    }

    // Build. From here on a failure is undone by the destructor.
    root_ = container::make_root();
    machine& mach = add_machine(*root_);
    memory_ = &mach.memory();
    {
        auto b = make<board>();
        mach.add_child("fixture", *b);
        board_ = b.get();
    }
    regions_.assign(n, nullptr);
    memory_transaction tx(*memory_);
    // Aliases need their targets first: make each region after its chain.
    std::function<void(std::size_t)> create = [&](std::size_t id) {
        if (regions_[id]) return;
        const auto& s = specs[id];
        memory_region::init_args a{region_owner(*board_), s.name, s.kind, s.size};
        if (s.has_alias) {
            create(s.alias);
            a.alias = regions_[s.alias];
            a.alias_offset = s.alias_offset;
        }
        if (!s.has_parent) a.priority = s.priority;
        try {
            regions_[id] = make_region(a).get(); // the board now holds it
        } catch (const region_error& e) {
            rd.fail(rd.region_where(id, "size"), e.what());
        }
    };
    for (std::size_t id = 0; id < n; ++id) create(id);
    for (std::size_t id = 0; id < n; ++id) {
        const auto& s = specs[id];
        memory_region& r = *regions_[id];
        if (!s.enabled) r.set_enabled(false);
        if (s.readonly) r.set_readonly(true);
        if (s.nonvolatile) r.set_nonvolatile(true);
    }
    for (std::size_t id = 0; id < n; ++id) {
        const auto& s = specs[id];
        if (!s.has_parent) continue;
        try {
            regions_[s.parent]->add_subregion(s.addr, *regions_[id], s.priority);
        } catch (const region_error& e) {
            rd.fail(rd.region_where(id, "parent"), e.what());
        }
    }
    for (std::size_t i = 0; i < doc["address_spaces"].size(); ++i) {
        const nlohmann::json& j = doc["address_spaces"][i];
        const std::string where = fmt::format("address space {}", i);
        if (!j.is_object() || !j.contains("name") || !j["name"].is_string() || !j.contains("root"))
            rd.fail(where, "expected an object with 'name' (a string) and 'root' (a region id)");
        for (const auto& [key, value] : j.items())
            if (key != "name" && key != "root")
                rd.fail(where, fmt::format("unknown field '{}'", key));
        const std::size_t root = rd.index(j["root"], n, where + " field 'root'");
        spaces_.push_back(
            std::make_unique<address_space>(*memory_, *regions_[root], j["name"].get<std::string>()));
        views_.push_back(spaces_.back().get());
    }
}

inline fixture_machine::~fixture_machine() {
    if (memory_) {
        memory_transaction tx(*memory_);
        views_.clear();
        while (!spaces_.empty()) spaces_.pop_back();
    }
    // The board's unparent hook unparents its regions; each is finalized when
    // nothing uses it any more, and the board after the last of them.
    if (board_) unparent(*board_);
    root_.reset();
}

} // namespace qomem
