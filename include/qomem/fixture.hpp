// qomem/fixture.hpp — a machine's memory map loaded from a fixture (the JSON
// format of tests/conformance/README.md), with its owners, its address
// spaces, lookups, and device models attached at their real addresses.
// Optional: needs nlohmann-json, and is not included by <qomem/qomem.hpp>.
//
//     auto m = qomem::fixture_machine::load("tests/conformance/qemu-7.2/q35-bridges/fixture.json");
//     fmt::print("{}", qomem::info_mtree(m->spaces(), {.flatview = true}));
//     my_uart uart;                                     // meets MemoryRegionOps
//     m->attach_ops(m->unique_region("serial"), uart);  // answers at 0x3f8 now
//     m->space("I/O").write(0x3f8, "A", 1);             // -> my_uart::write
//
// Loading is three steps, each usable alone: fixture_spec::read turns the
// JSON into a fixture_spec (every field's type checked), fixture_spec::check
// checks what refers to what (parents, alias targets, owners, cycles), and
// fixture_machine::build makes the objects. Bad input is refused by the
// first two with qomem::fixture_error naming the file, the region (id and
// name) and the field, before anything is made.
//
// What is built: a tree "/" -> "machine" (a qomem::machine, with its own
// memory system: memory(), where every region and address space of the
// fixture lives; two fixtures share nothing) holding the
// fixture's owners at their QOM paths (devices and plain objects; missing
// path components become containers) and, for regions whose fixture names
// no owner, one device "/machine/fixture" owning them. Then the regions, each
// one with a `parent` added to it in array order, all in one transaction,
// and the address spaces in fixture order.
//
// Lifetime: the fixture_machine owns everything it built. Destroying it
// destroys the address spaces, takes every region out of its container,
// frees the regions (aliases before their targets), then the tree.
#pragma once

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include <qomem/address_space.hpp>
#include <qomem/assert.hpp>
#include <qomem/device.hpp>
#include <qomem/error.hpp>
#include <qomem/machine.hpp>
#include <qomem/memory_ops.hpp>
#include <qomem/memory_region.hpp>

namespace qomem {

/// An object of a fixture that owns regions: a device (QEMU's `dev`, e.g.
/// "/machine/peripheral/br1") or another object (`obj`, e.g. a memory
/// backend "/objects/pc.ram").
struct fixture_owner {
    std::string path;   ///< canonical QOM path (absolute, not "/")
    bool device = true; ///< a qomem::device, else a plain object
    std::string id;     ///< the device's id (`-device ...,id=`), "" if none
    std::string type;   ///< QEMU's QOM type name, for information ("" if unknown)
};

/// Who owns a fixture region.
enum class fixture_ownership : std::uint8_t {
    board, ///< the fixture's own device "/machine/fixture" (`owner` absent)
    owner, ///< the fixture_owner at `fixture_region::owner` (`"owner": PATH`)
    none,  ///< nobody (`"owner": null`); its QOM parent is `home` ("" = an orphan)
};

/// One region of a fixture.
struct fixture_region {
    std::string name;
    region_kind kind =
        region_kind::container; ///< container, io, ram, rom, rom_device, ram_device, alias
    u128 size = 0;
    std::optional<std::size_t> parent; ///< the container's id
    hwaddr addr = 0;                   ///< in the parent; for a root, its own address
    std::int32_t priority = 0;
    std::optional<std::size_t> alias; ///< the target's id (kind alias)
    hwaddr alias_offset = 0;
    bool enabled = true;
    bool nonvolatile = false;
    bool readonly = false;
    fixture_ownership ownership = fixture_ownership::board;
    std::string owner; ///< with ownership::owner: the owner's path
    std::string home;  ///< with ownership::none: the QOM parent's path, or ""
};

struct fixture_address_space {
    std::string name;
    std::size_t root = 0; ///< a region id
};

/// The contents of a fixture file. Regions are listed in the order to create
/// them and to add them to their containers.
struct fixture_spec {
    std::string machine; ///< the command line the machine was captured from
    std::vector<fixture_owner> owners;
    std::vector<fixture_region> regions;
    std::vector<fixture_address_space> address_spaces;

    /// Step 1 and 2: parses the JSON text (`source` names it in messages),
    /// checks every field's type and range, then calls check().
    /// Throws: fixture_error.
    static fixture_spec read(std::string_view json_text, const std::string& source);
    /// Step 2: checks what the fields refer to — ids in range, parents that
    /// are not aliases, alias chains that end, owners and homes that exist,
    /// no region contained in itself. Throws: fixture_error naming `source`,
    /// the region and the field.
    void check(const std::string& source) const;
    /// The fixture as JSON text (the format `read` takes; fields at their
    /// default values are left out).
    std::string to_json() const;
};

/// A machine built from a fixture.
class fixture_machine {
public:
    /// Reads, checks and builds `json_text`; `source` names it in error
    /// messages. Throws: fixture_error (nothing is left behind).
    static std::unique_ptr<fixture_machine> parse(std::string_view json_text,
                                                  std::string source = "fixture");
    /// Reads a file and parses it. Throws: fixture_error, also for an
    /// unreadable file.
    static std::unique_ptr<fixture_machine> load(const std::filesystem::path& path);
    /// Step 3: builds a checked spec (check() is run again first).
    /// Throws: fixture_error (nothing is left behind).
    static std::unique_ptr<fixture_machine> build(const fixture_spec& spec,
                                                  std::string source = "fixture");

    fixture_machine(const fixture_machine&) = delete;
    fixture_machine& operator=(const fixture_machine&) = delete;
    ~fixture_machine();

    /// The command line the machine was captured from.
    const std::string& description() const noexcept { return spec_.machine; }
    const fixture_spec& spec() const noexcept { return spec_; }
    std::size_t region_count() const noexcept { return regions_.size(); }
    /// The region with fixture id `id`. Requires (asserted): id < region_count().
    memory_region& region(std::size_t id) const;
    /// The fixture id of `mr`, or std::nullopt if it is not this fixture's.
    std::optional<std::size_t> id_of(const memory_region& mr) const;
    /// The address spaces, in fixture order.
    std::span<const address_space* const> spaces() const noexcept { return space_ptrs_; }
    /// The address space at index `i` of spaces(), for accesses.
    /// Requires (asserted): i < spaces().size().
    address_space& space(std::size_t i) const;
    /// The only address space called `name`. Throws: fixture_error if there
    /// is none or more than one (address-space names need not be unique).
    address_space& space(std::string_view name) const;
    /// The root of the QOM tree ("/").
    const object& root() const noexcept { return *root_; }
    /// The memory system of the fixture's machine.
    memory_system& memory() const noexcept { return *memory_; }

    // ---- finding regions ----------------------------------------------------

    /// Every region called `name`, in fixture order.
    std::vector<memory_region*> regions_named(std::string_view name) const;
    /// The only region called `name`. Throws: fixture_error if there is none
    /// or several (the message lists their canonical paths).
    memory_region& unique_region(std::string_view name) const;
    /// The region at QOM path `path` (e.g. "/machine/peripheral/br1/pci_bridge_io[0]"),
    /// or null. The "[N]" indices number the regions of an owner that share
    /// a name in fixture order, which may differ from QEMU's.
    memory_region* region_at_path(std::string_view path) const;
    /// Every region owned by `owner`, given as its canonical path or as a
    /// device id, in fixture order.
    std::vector<memory_region*> regions_owned_by(std::string_view owner) const;
    /// Where offset 0 of `mr` is in `as`: the address of the first flat
    /// range of `mr` in the current flat view, less its offset in `mr`; or
    /// std::nullopt if `mr` shows nowhere in it.
    static std::optional<hwaddr> address_in(const address_space& as, const memory_region& mr);

    // ---- device models ----------------------------------------------------------

    /// Makes `ops` answer the accesses to fixture I/O region `mr`: the region
    /// is replaced by one with the same name, owner, size, flags and place
    /// (its container, address and priority, and its rank among siblings of
    /// equal priority), its subregions move to it, aliases of it are replaced
    /// by aliases of it, and address spaces rooted at it are re-created.
    /// Requires (asserted): `mr` is a region of this fixture of kind io.
    /// Effects: one topology transaction. `mr`, the aliases of it and the
    /// address spaces rooted at it are finalized: references to them become
    /// invalid (region(), the lookups and spaces() return the new ones).
    /// Returns the new region.
    /// Lifetime: `ops` must outlive every use of the region — the
    /// fixture_machine, and any dma_mapping of the region still held.
    /// Complexity: O(siblings + subregions + aliases of it).
    template <MemoryRegionOps Ops>
    memory_region& attach_ops(memory_region& mr, Ops& ops);

private:
    class board : public device {
        QOMEM_OBJECT(board, "fixture-board", device)
    public:
        board() noexcept = default;
    };
    class owner_device : public device {
        QOMEM_OBJECT(owner_device, "fixture-device", device)
    public:
        owner_device() noexcept = default;
    };
    class owner_object : public object {
        QOMEM_OBJECT(owner_object, "fixture-object", object)
    public:
        owner_object() noexcept = default;
    };

    fixture_machine() = default;
    void build_tree();
    void build_regions();
    void build_spaces();
    object& owner_object_at(const std::string& path) const;
    region_owner where(const fixture_region& r) const;
    /// Replaces `old` by `fresh` in old's container, at its rank.
    static void replace_in_container(memory_region& old, memory_region& fresh);
    /// Replaces every alias of `old` by an alias of `fresh`, recursively;
    /// collects the replaced regions in `dead`.
    void retarget_aliases(memory_region& old, memory_region& fresh,
                          std::vector<ref_ptr<memory_region>>& dead);
    void replace_spaces_rooted_at(memory_region& old, memory_region& fresh);
    void detach_from_tree(memory_region& mr);

    fixture_spec spec_;
    ref_ptr<container> root_;
    board* board_ = nullptr;
    memory_system* memory_ = nullptr; // the machine's: lives as long as its regions
    std::vector<memory_region*> regions_;
    std::vector<ref_ptr<memory_region>> orphans_; // ownerless regions without a home
    std::vector<std::unique_ptr<address_space>> spaces_;
    std::vector<const address_space*> space_ptrs_;
    std::string source_;
};

// ---- step 1: reading --------------------------------------------------------------

namespace detail {

struct fixture_reader {
    const std::string& source;

    [[noreturn]] void fail(std::string_view where, std::string_view what) const {
        throw fixture_error(fmt::format("{}: {}: {}", source, where, what));
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
            fail(where,
                 count == 0
                     ? fmt::format("expected a region id, got {} (there are no regions)", v.dump())
                     : fmt::format("expected a region id from 0 to {}, got {}", count - 1,
                                   v.dump()));
        return static_cast<std::size_t>(v.get<std::int64_t>());
    }

    bool boolean(const nlohmann::json& v, std::string_view where) const {
        if (!v.is_boolean()) fail(where, fmt::format("expected true or false, got {}", v.dump()));
        return v.get<bool>();
    }

    std::string string(const nlohmann::json& v, std::string_view where) const {
        if (!v.is_string()) fail(where, fmt::format("expected a string, got {}", v.dump()));
        return v.get<std::string>();
    }

    void only_fields(const nlohmann::json& j, std::span<const std::string_view> known,
                     std::string_view where) const {
        for (const auto& [key, value] : j.items())
            if (std::find(known.begin(), known.end(), key) == known.end())
                fail(where, fmt::format("unknown field '{}'", key));
    }
};

/// "region 3 ('uart')", or "region 3" before the name is known.
inline std::string fixture_region_label(std::size_t id, std::string_view name) {
    return name.empty() ? fmt::format("region {}", id) : fmt::format("region {} ('{}')", id, name);
}

struct fixture_kind_name {
    region_kind kind;
    std::string_view name;
};
inline constexpr fixture_kind_name fixture_kinds[] = {
    {region_kind::container, "container"},
    {region_kind::io, "io"},
    {region_kind::ram, "ram"},
    {region_kind::rom, "rom"},
    {region_kind::rom_device, "romd"},
    {region_kind::ram_device, "ramd"},
    {region_kind::alias, "alias"},
};

inline std::string_view fixture_kind_to_string(region_kind k) {
    for (const auto& e : fixture_kinds)
        if (e.kind == k) return e.name;
    return "reservation";
}

inline std::string fixture_hex(u128 v) {
    if (v <= u128(std::numeric_limits<std::uint64_t>::max()))
        return fmt::format("0x{:x}", static_cast<std::uint64_t>(v));
    return fmt::format("0x{:x}{:016x}", static_cast<std::uint64_t>(v >> 64),
                       static_cast<std::uint64_t>(v));
}

/// True for "/a/b": absolute, not "/", no empty component.
inline bool fixture_path_ok(std::string_view p) {
    if (p.size() < 2 || p.front() != '/' || p.back() == '/') return false;
    return p.find("//") == std::string_view::npos;
}

inline fixture_owner read_fixture_owner(const fixture_reader& rd, const nlohmann::json& j,
                                        std::size_t i) {
    const std::string where = fmt::format("owner {}", i);
    if (!j.is_object()) rd.fail(where, "expected a JSON object");
    static constexpr std::string_view known[] = {"path", "device", "id", "type"};
    rd.only_fields(j, known, where);
    fixture_owner o;
    if (!j.contains("path")) rd.fail(where + " field 'path'", "missing");
    o.path = rd.string(j["path"], where + " field 'path'");
    if (!fixture_path_ok(o.path))
        rd.fail(where + " field 'path'",
                fmt::format("\"{}\" is not an absolute QOM path like \"/machine/peripheral/dev0\"",
                            o.path));
    const std::string named = fmt::format("owner {} ('{}')", i, o.path);
    if (j.contains("device")) o.device = rd.boolean(j["device"], named + " field 'device'");
    if (j.contains("id")) o.id = rd.string(j["id"], named + " field 'id'");
    if (j.contains("type")) o.type = rd.string(j["type"], named + " field 'type'");
    if (!o.id.empty() && !o.device)
        rd.fail(named + " field 'id'", "given for an object that is not a device");
    return o;
}

inline fixture_region read_fixture_region(const fixture_reader& rd, const nlohmann::json& j,
                                          std::size_t id, std::size_t n) {
    if (!j.is_object()) rd.fail(fmt::format("region {}", id), "expected a JSON object");
    std::string name;
    if (j.contains("name") && j["name"].is_string()) name = j["name"].get<std::string>();
    const std::string label = fixture_region_label(id, name);
    auto where = [&](std::string_view field) { return fmt::format("{} field '{}'", label, field); };
    static constexpr std::string_view known[] = {
        "id",    "name",         "kind",    "size",        "parent",   "addr",  "priority",
        "alias", "alias_offset", "enabled", "nonvolatile", "readonly", "owner", "home"};
    rd.only_fields(j, known, label);

    fixture_region s;
    if (!j.contains("id") || !j["id"].is_number_integer() || j["id"].get<std::int64_t>() < 0 ||
        static_cast<std::size_t>(j["id"].get<std::int64_t>()) != id)
        rd.fail(where("id"), fmt::format("expected {} (the region's index), got {}", id,
                                         j.contains("id") ? j["id"].dump() : "nothing"));
    if (!j.contains("name")) rd.fail(where("name"), "missing");
    s.name = rd.string(j["name"], where("name"));
    if (!j.contains("kind")) rd.fail(where("kind"), "missing");
    const std::string kind = rd.string(j["kind"], where("kind"));
    const auto* k = std::find_if(std::begin(fixture_kinds), std::end(fixture_kinds),
                                 [&](const fixture_kind_name& e) { return e.name == kind; });
    if (k == std::end(fixture_kinds))
        rd.fail(where("kind"), fmt::format("unknown kind \"{}\" (expected container, io, ram, rom, "
                                           "romd, ramd or alias)",
                                           kind));
    s.kind = k->kind;
    if (!j.contains("size")) rd.fail(where("size"), "missing");
    s.size = rd.hex(j["size"], where("size"));
    if (j.contains("parent")) {
        s.parent = rd.index(j["parent"], n, where("parent"));
        if (!j.contains("addr")) rd.fail(where("addr"), "missing (required with 'parent')");
    }
    if (j.contains("addr")) s.addr = rd.address(j["addr"], where("addr"));
    if (j.contains("priority")) {
        const auto& p = j["priority"];
        if (!p.is_number_integer() ||
            p.get<std::int64_t>() < std::numeric_limits<std::int32_t>::min() ||
            p.get<std::int64_t>() > std::numeric_limits<std::int32_t>::max())
            rd.fail(where("priority"),
                    fmt::format("expected a 32-bit signed integer, got {}", p.dump()));
        s.priority = static_cast<std::int32_t>(p.get<std::int64_t>());
    }
    if (s.kind == region_kind::alias) {
        if (!j.contains("alias")) rd.fail(where("alias"), "missing (required for kind alias)");
        s.alias = rd.index(j["alias"], n, where("alias"));
        if (j.contains("alias_offset"))
            s.alias_offset = rd.address(j["alias_offset"], where("alias_offset"));
    } else if (j.contains("alias") || j.contains("alias_offset")) {
        rd.fail(where(j.contains("alias") ? "alias" : "alias_offset"),
                fmt::format("given for a region of kind {}", kind));
    }
    if (j.contains("enabled")) s.enabled = rd.boolean(j["enabled"], where("enabled"));
    if (j.contains("nonvolatile"))
        s.nonvolatile = rd.boolean(j["nonvolatile"], where("nonvolatile"));
    if (j.contains("readonly")) s.readonly = rd.boolean(j["readonly"], where("readonly"));
    if (j.contains("owner")) {
        if (j["owner"].is_null()) {
            s.ownership = fixture_ownership::none;
        } else {
            s.ownership = fixture_ownership::owner;
            s.owner = rd.string(j["owner"], where("owner"));
        }
    }
    if (j.contains("home")) {
        if (s.ownership != fixture_ownership::none)
            rd.fail(where("home"),
                    "given for a region that has an owner (only \"owner\": null takes a home)");
        s.home = rd.string(j["home"], where("home"));
    }
    return s;
}

} // namespace detail

inline fixture_spec fixture_spec::read(std::string_view json_text, const std::string& source) {
    const nlohmann::json doc = nlohmann::json::parse(json_text, nullptr, false);
    if (doc.is_discarded()) throw fixture_error(fmt::format("{}: not valid JSON", source));
    const detail::fixture_reader rd{source};
    if (!doc.is_object()) rd.fail("top level", "expected a JSON object");
    static constexpr std::string_view known[] = {"machine", "owners", "regions", "address_spaces"};
    rd.only_fields(doc, known, "top level");
    fixture_spec spec;
    if (doc.contains("machine")) spec.machine = rd.string(doc["machine"], "field 'machine'");
    if (!doc.contains("regions") || !doc["regions"].is_array())
        rd.fail("field 'regions'", "expected an array of regions");
    if (!doc.contains("address_spaces") || !doc["address_spaces"].is_array())
        rd.fail("field 'address_spaces'", "expected an array of address spaces");
    if (doc.contains("owners")) {
        if (!doc["owners"].is_array()) rd.fail("field 'owners'", "expected an array of owners");
        for (std::size_t i = 0; i < doc["owners"].size(); ++i)
            spec.owners.push_back(detail::read_fixture_owner(rd, doc["owners"][i], i));
    }
    const nlohmann::json& jregions = doc["regions"];
    const std::size_t n = jregions.size();
    spec.regions.reserve(n);
    for (std::size_t id = 0; id < n; ++id)
        spec.regions.push_back(detail::read_fixture_region(rd, jregions[id], id, n));
    for (std::size_t i = 0; i < doc["address_spaces"].size(); ++i) {
        const nlohmann::json& j = doc["address_spaces"][i];
        const std::string where = fmt::format("address space {}", i);
        if (!j.is_object() || !j.contains("name") || !j["name"].is_string() || !j.contains("root"))
            rd.fail(where, "expected an object with 'name' (a string) and 'root' (a region id)");
        static constexpr std::string_view known_as[] = {"name", "root"};
        rd.only_fields(j, known_as, where);
        spec.address_spaces.push_back({j["name"].get<std::string>(),
                                       rd.index(j["root"], n,
                                                fmt::format("address space {} ('{}') field 'root'",
                                                            i, j["name"].get<std::string>()))});
    }
    spec.check(source);
    return spec;
}

// ---- step 2: checking ---------------------------------------------------------------

inline void fixture_spec::check(const std::string& source) const {
    const detail::fixture_reader rd{source};
    const std::size_t n = regions.size();
    auto where = [&](std::size_t id, std::string_view field) {
        return fmt::format("{} field '{}'", detail::fixture_region_label(id, regions[id].name),
                           field);
    };
    // Owners: distinct, and not where the machine's own objects are.
    for (std::size_t i = 0; i < owners.size(); ++i) {
        const fixture_owner& o = owners[i];
        const std::string label = fmt::format("owner {} ('{}')", i, o.path);
        if (!detail::fixture_path_ok(o.path))
            rd.fail(label + " field 'path'",
                    "not an absolute QOM path like \"/machine/peripheral/dev0\"");
        for (std::size_t k = 0; k < i; ++k)
            if (owners[k].path == o.path)
                rd.fail(label + " field 'path'", fmt::format("owner {} has the same path", k));
        for (std::string_view fixed : {"/machine/unattached", "/machine/peripheral",
                                       "/machine/peripheral-anon", "/machine/fixture"})
            if (o.path == fixed)
                rd.fail(label + " field 'path'",
                        "that path belongs to the machine's own container");
        if (o.path == "/machine" && o.device)
            rd.fail(label + " field 'device'", "/machine is the machine object, not a device");
    }
    auto owner_known = [&](std::string_view p) {
        return std::any_of(owners.begin(), owners.end(),
                           [&](const fixture_owner& o) { return o.path == p; });
    };
    for (std::size_t id = 0; id < n; ++id) {
        const fixture_region& s = regions[id];
        if (s.size > u128_2_64)
            rd.fail(where(id, "size"),
                    fmt::format("{} is larger than 2^64", detail::fixture_hex(s.size)));
        if (s.parent) {
            if (*s.parent >= n)
                rd.fail(where(id, "parent"), fmt::format("no region has id {}", *s.parent));
            if (*s.parent == id) rd.fail(where(id, "parent"), "a region cannot contain itself");
            if (regions[*s.parent].kind == region_kind::alias)
                rd.fail(where(id, "parent"),
                        fmt::format("region {} is an alias, and aliases have no subregions",
                                    *s.parent));
        }
        if (s.kind == region_kind::alias) {
            if (!s.alias) rd.fail(where(id, "alias"), "missing (required for kind alias)");
            if (*s.alias >= n)
                rd.fail(where(id, "alias"), fmt::format("no region has id {}", *s.alias));
        } else if (s.alias) {
            rd.fail(where(id, "alias"), fmt::format("given for a region of kind {}",
                                                    detail::fixture_kind_to_string(s.kind)));
        }
        if (s.ownership == fixture_ownership::owner && !owner_known(s.owner))
            rd.fail(where(id, "owner"),
                    fmt::format("\"{}\" is not the path of an entry of 'owners'", s.owner));
        if (s.ownership == fixture_ownership::none && !s.home.empty() && !owner_known(s.home) &&
            s.home != "/machine" && s.home != "/machine/unattached" &&
            s.home != "/machine/peripheral" && s.home != "/machine/peripheral-anon")
            rd.fail(
                where(id, "home"),
                fmt::format("\"{}\" is neither an owner's path nor one of /machine, "
                            "/machine/unattached, /machine/peripheral, /machine/peripheral-anon",
                            s.home));
    }
    // Alias chains must end: follow each one, refusing a cycle.
    for (std::size_t id = 0; id < n; ++id) {
        std::vector<std::size_t> chain{id};
        for (std::size_t cur = id; regions[cur].alias;) {
            cur = *regions[cur].alias;
            if (std::find(chain.begin(), chain.end(), cur) != chain.end()) {
                std::string path;
                for (std::size_t c : chain) path += fmt::format("{} -> ", c);
                rd.fail(where(id, "alias"), fmt::format("alias cycle {}{}", path, cur));
            }
            chain.push_back(cur);
        }
    }
    // Containment must not loop back through subregions or alias targets:
    // added in array order, the region that closes a loop is the one named.
    {
        std::vector<std::vector<std::size_t>> edges(n); // region -> subregions and alias target
        for (std::size_t id = 0; id < n; ++id)
            if (regions[id].alias) edges[id].push_back(*regions[id].alias);
        auto reaches = [&](std::size_t from, std::size_t to) {
            std::vector<std::size_t> stack{from};
            std::vector<bool> seen(n, false);
            seen[from] = true;
            while (!stack.empty()) {
                const std::size_t x = stack.back();
                stack.pop_back();
                if (x == to) return true;
                for (std::size_t y : edges[x])
                    if (!seen[y]) seen[y] = true, stack.push_back(y);
            }
            return false;
        };
        for (std::size_t id = 0; id < n; ++id) {
            if (!regions[id].parent) continue;
            const std::size_t p = *regions[id].parent;
            if (reaches(id, p))
                rd.fail(where(id, "parent"),
                        fmt::format("adding '{}' as a subregion of '{}' would make a cycle: '{}' "
                                    "already leads back to '{}' through its subregions or alias "
                                    "targets",
                                    regions[id].name, regions[p].name, regions[id].name,
                                    regions[p].name));
            edges[p].push_back(id);
        }
    }
    for (std::size_t i = 0; i < address_spaces.size(); ++i)
        if (address_spaces[i].root >= n)
            rd.fail(fmt::format("address space {} ('{}') field 'root'", i, address_spaces[i].name),
                    fmt::format("no region has id {}", address_spaces[i].root));
}

inline std::string fixture_spec::to_json() const {
    nlohmann::ordered_json doc;
    if (!machine.empty()) doc["machine"] = machine;
    if (!owners.empty()) {
        nlohmann::ordered_json jo = nlohmann::ordered_json::array();
        for (const fixture_owner& o : owners) {
            nlohmann::ordered_json j;
            j["path"] = o.path;
            j["device"] = o.device;
            if (!o.id.empty()) j["id"] = o.id;
            if (!o.type.empty()) j["type"] = o.type;
            jo.push_back(std::move(j));
        }
        doc["owners"] = std::move(jo);
    }
    nlohmann::ordered_json jr = nlohmann::ordered_json::array();
    for (std::size_t id = 0; id < regions.size(); ++id) {
        const fixture_region& s = regions[id];
        nlohmann::ordered_json j;
        j["id"] = id;
        j["name"] = s.name;
        j["kind"] = detail::fixture_kind_to_string(s.kind);
        j["size"] = detail::fixture_hex(s.size);
        if (s.parent) j["parent"] = *s.parent;
        if (s.parent || s.addr) j["addr"] = detail::fixture_hex(s.addr);
        if (s.parent || s.priority) j["priority"] = s.priority;
        if (s.alias) {
            j["alias"] = *s.alias;
            j["alias_offset"] = detail::fixture_hex(s.alias_offset);
        }
        if (!s.enabled) j["enabled"] = false;
        if (s.nonvolatile) j["nonvolatile"] = true;
        if (s.readonly) j["readonly"] = true;
        if (s.ownership == fixture_ownership::owner) j["owner"] = s.owner;
        if (s.ownership == fixture_ownership::none) {
            j["owner"] = nullptr;
            if (!s.home.empty()) j["home"] = s.home;
        }
        jr.push_back(std::move(j));
    }
    doc["regions"] = std::move(jr);
    nlohmann::ordered_json ja = nlohmann::ordered_json::array();
    for (const fixture_address_space& a : address_spaces) {
        nlohmann::ordered_json j;
        j["name"] = a.name;
        j["root"] = a.root;
        ja.push_back(std::move(j));
    }
    doc["address_spaces"] = std::move(ja);
    return doc.dump(1) + "\n";
}

// ---- step 3: building -----------------------------------------------------------------

inline std::unique_ptr<fixture_machine> fixture_machine::load(const std::filesystem::path& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw fixture_error(fmt::format("{}: cannot open the file", path.string()));
    std::ostringstream text;
    text << in.rdbuf();
    return parse(text.str(), path.string());
}

inline std::unique_ptr<fixture_machine> fixture_machine::parse(std::string_view json_text,
                                                               std::string source) {
    const fixture_spec spec = fixture_spec::read(json_text, source);
    return build(spec, std::move(source));
}

inline std::unique_ptr<fixture_machine> fixture_machine::build(const fixture_spec& spec,
                                                               std::string source) {
    spec.check(source);
    std::unique_ptr<fixture_machine> m(new fixture_machine);
    m->spec_ = spec;
    m->source_ = std::move(source);
    // On a throw, ~fixture_machine undoes what was built.
    m->build_tree();
    m->build_regions();
    m->build_spaces();
    return m;
}

inline void fixture_machine::build_tree() {
    root_ = container::make_root();
    machine& mach = add_machine(*root_);
    memory_ = &mach.memory();
    if (std::any_of(spec_.regions.begin(), spec_.regions.end(), [](const fixture_region& r) {
            return r.ownership == fixture_ownership::board;
        })) {
        auto b = make<board>();
        mach.add_child("fixture", *b);
        board_ = b.get();
    }
    // Parents before children: shorter paths first.
    std::vector<const fixture_owner*> order;
    for (const fixture_owner& o : spec_.owners) order.push_back(&o);
    std::stable_sort(order.begin(), order.end(),
                     [](const fixture_owner* a, const fixture_owner* b) {
                         return std::count(a->path.begin(), a->path.end(), '/') <
                                std::count(b->path.begin(), b->path.end(), '/');
                     });
    for (const fixture_owner* o : order) {
        if (o->path == "/machine") continue; // the machine object itself
        object* parent = root_.get();
        std::size_t pos = 1;
        for (;;) {
            const std::size_t slash = o->path.find('/', pos);
            if (slash == std::string::npos) break;
            const std::string_view part = std::string_view(o->path).substr(pos, slash - pos);
            object* next = parent->child(part);
            if (!next) {
                auto c = make<container>();
                parent->add_child(part, *c);
                next = c.get();
            }
            parent = next;
            pos = slash + 1;
        }
        const std::string_view last = std::string_view(o->path).substr(pos);
        if (parent->child(last)) // made earlier as a path component of another owner
            throw fixture_error(fmt::format("{}: owner '{}': the path is taken", source_, o->path));
        if (o->device) {
            auto d = make<owner_device>();
            d->set_id(o->id);
            parent->add_child(last, *d);
        } else {
            auto obj = make<owner_object>();
            parent->add_child(last, *obj);
        }
    }
}

inline object& fixture_machine::owner_object_at(const std::string& path) const {
    object* o = root_->resolve_path(path);
    QOMEM_ASSERT(o, "fixture owner '{}' was not built", path);
    return *o;
}

inline region_owner fixture_machine::where(const fixture_region& r) const {
    switch (r.ownership) {
    case fixture_ownership::board:
        return region_owner(*board_);
    case fixture_ownership::owner:
        return region_owner(owner_object_at(r.owner));
    case fixture_ownership::none:
        break;
    }
    if (r.home.empty()) return region_owner(nullptr);
    return region_owner::ownerless_in(owner_object_at(r.home));
}

inline void fixture_machine::build_regions() {
    const detail::fixture_reader rd{source_};
    const std::size_t n = spec_.regions.size();
    regions_.assign(n, nullptr);
    memory_transaction tx(*memory_);
    // Aliases need their targets first: make each region after its chain.
    std::function<void(std::size_t)> create = [&](std::size_t id) {
        if (regions_[id]) return;
        const fixture_region& s = spec_.regions[id];
        memory_region::init_args a{where(s), s.name, s.kind, s.size};
        if (s.alias) {
            create(*s.alias);
            a.alias = regions_[*s.alias];
            a.alias_offset = s.alias_offset;
        }
        if (!s.parent) a.priority = s.priority;
        ref_ptr<memory_region> made;
        try {
            made = make_region(a); // the owner or home now holds it
        } catch (const region_error& e) {
            rd.fail(fmt::format("{} field 'size'", detail::fixture_region_label(id, s.name)),
                    e.what());
        }
        regions_[id] = made.get();
        if (!a.where.home()) orphans_.push_back(std::move(made));
    };
    for (std::size_t id = 0; id < n; ++id) create(id);
    for (std::size_t id = 0; id < n; ++id) {
        const fixture_region& s = spec_.regions[id];
        memory_region& r = *regions_[id];
        if (!s.enabled) r.set_enabled(false);
        if (s.readonly) r.set_readonly(true);
        if (s.nonvolatile) r.set_nonvolatile(true);
        if (!s.parent && s.addr) r.set_address(s.addr);
    }
    for (std::size_t id = 0; id < n; ++id) {
        const fixture_region& s = spec_.regions[id];
        if (!s.parent) continue;
        try {
            regions_[*s.parent]->add_subregion(s.addr, *regions_[id], s.priority);
        } catch (const region_error& e) {
            rd.fail(fmt::format("{} field 'parent'", detail::fixture_region_label(id, s.name)),
                    e.what());
        }
    }
}

inline void fixture_machine::build_spaces() {
    memory_transaction tx(*memory_);
    for (const fixture_address_space& a : spec_.address_spaces) {
        spaces_.push_back(std::make_unique<address_space>(*memory_, *regions_[a.root], a.name));
        space_ptrs_.push_back(spaces_.back().get());
    }
}

inline void fixture_machine::detach_from_tree(memory_region& mr) {
    if (mr.parent()) {
        unparent(mr); // drops the owner's or home's reference: may finalize mr
    } else {
        auto it = std::find_if(orphans_.begin(), orphans_.end(),
                               [&](const ref_ptr<memory_region>& p) { return p.get() == &mr; });
        if (it != orphans_.end()) orphans_.erase(it);
    }
}

inline fixture_machine::~fixture_machine() {
    if (memory_) {
        memory_transaction tx(*memory_);
        space_ptrs_.clear();
        while (!spaces_.empty()) spaces_.pop_back();
        // Out of their containers: each is then held only by its owner or
        // home (or orphans_), so none is freed here.
        for (auto it = regions_.rbegin(); it != regions_.rend(); ++it)
            if (*it && (*it)->container()) (*it)->container()->del_subregion(**it);
    }
    // Aliases before their targets: an ownerless target must have no alias
    // left when it is freed.
    std::vector<int> users(regions_.size(), 0);
    for (std::size_t id = 0; id < regions_.size(); ++id)
        if (regions_[id] && spec_.regions[id].alias) ++users[*spec_.regions[id].alias];
    std::vector<std::size_t> ready;
    for (std::size_t id = 0; id < regions_.size(); ++id)
        if (users[id] == 0) ready.push_back(id);
    while (!ready.empty()) {
        const std::size_t id = ready.back();
        ready.pop_back();
        if (regions_[id]) {
            detach_from_tree(*regions_[id]);
            regions_[id] = nullptr;
        }
        if (const auto& t = spec_.regions[id].alias; t && --users[*t] == 0) ready.push_back(*t);
    }
    orphans_.clear();
    root_.reset(); // the tree: owners, then the machine
}

// ---- lookups --------------------------------------------------------------------------

inline memory_region& fixture_machine::region(std::size_t id) const {
    QOMEM_ASSERT(id < regions_.size(),
                 "fixture region id {} out of range (the fixture has {} regions)", id,
                 regions_.size());
    return *regions_[id];
}

inline std::optional<std::size_t> fixture_machine::id_of(const memory_region& mr) const {
    for (std::size_t id = 0; id < regions_.size(); ++id)
        if (regions_[id] == &mr) return id;
    return std::nullopt;
}

inline address_space& fixture_machine::space(std::string_view name) const {
    address_space* found = nullptr;
    std::size_t count = 0;
    for (const auto& as : spaces_)
        if (as->name() == name) found = as.get(), ++count;
    if (count == 1) return *found;
    if (count == 0) {
        std::string names;
        for (const auto& as : spaces_)
            names += fmt::format("{}\"{}\"", names.empty() ? "" : ", ", as->name());
        throw fixture_error(fmt::format("{}: no address space is named \"{}\" (there are {})",
                                        source_, name, names));
    }
    throw fixture_error(fmt::format("{}: {} address spaces are named \"{}\"; use space(index)",
                                    source_, count, name));
}

inline address_space& fixture_machine::space(std::size_t i) const {
    QOMEM_ASSERT(i < spaces_.size(), "fixture address space {} out of range (the fixture has {})",
                 i, spaces_.size());
    return *spaces_[i];
}

inline std::vector<memory_region*> fixture_machine::regions_named(std::string_view name) const {
    std::vector<memory_region*> out;
    for (memory_region* r : regions_)
        if (r->region_name() == name) out.push_back(r);
    return out;
}

inline memory_region& fixture_machine::unique_region(std::string_view name) const {
    const std::vector<memory_region*> found = regions_named(name);
    if (found.size() == 1) return *found.front();
    if (found.empty())
        throw fixture_error(fmt::format("{}: no region is named \"{}\"", source_, name));
    std::string paths;
    for (memory_region* r : found)
        paths += fmt::format("{}{}", paths.empty() ? "" : ", ",
                             r->canonical_path().value_or("(orphan)"));
    throw fixture_error(
        fmt::format("{}: {} regions are named \"{}\": {}", source_, found.size(), name, paths));
}

inline memory_region* fixture_machine::region_at_path(std::string_view path) const {
    return dynamic_cast_to<memory_region>(root_->resolve_path(path));
}

inline std::vector<memory_region*> fixture_machine::regions_owned_by(std::string_view owner) const {
    std::vector<memory_region*> out;
    for (memory_region* r : regions_) {
        const object* o = r->owner();
        if (!o) continue;
        const device* d = dynamic_cast_to<device>(o);
        if ((d && !d->id().empty() && d->id() == owner) || o->canonical_path() == owner)
            out.push_back(r);
    }
    return out;
}

inline std::optional<hwaddr> fixture_machine::address_in(const address_space& as,
                                                         const memory_region& mr) {
    const ref_ptr<flat_view> v = as.view();
    for (const flat_range& r : v->ranges())
        if (r.mr == &mr) return r.start - r.offset_in_region;
    return std::nullopt;
}

// ---- device models ----------------------------------------------------------------------

inline void fixture_machine::replace_in_container(memory_region& old, memory_region& fresh) {
    memory_region* c = old.container();
    if (!c) return;
    // Render order is highest priority first and, among equals, the most
    // recently added first: the equals before `old` were added after it.
    std::vector<memory_region*> later;
    bool past = false;
    c->for_each_subregion([&](memory_region& s) {
        if (&s == &old)
            past = true;
        else if (!past && s.priority() == old.priority())
            later.push_back(&s);
    });
    const hwaddr addr = old.addr();
    const std::int32_t prio = old.priority();
    c->del_subregion(old);
    for (memory_region* s : later) {
        c->del_subregion(*s); // its owner or home still holds it
    }
    c->add_subregion(addr, fresh, prio);
    for (auto it = later.rbegin(); it != later.rend(); ++it)
        c->add_subregion((*it)->addr(), **it, prio);
}

inline void fixture_machine::replace_spaces_rooted_at(memory_region& old, memory_region& fresh) {
    for (std::size_t i = 0; i < spaces_.size(); ++i) {
        if (&spaces_[i]->root() != &old) continue;
        std::string name = spaces_[i]->name();
        spaces_[i].reset();
        spaces_[i] = std::make_unique<address_space>(*memory_, fresh, std::move(name));
        space_ptrs_[i] = spaces_[i].get();
    }
}

inline void fixture_machine::retarget_aliases(memory_region& old, memory_region& fresh,
                                              std::vector<ref_ptr<memory_region>>& dead) {
    std::vector<memory_region*> users;
    old.for_each_alias_user([&](memory_region& a) { users.push_back(&a); });
    for (memory_region* a : users) {
        const std::optional<std::size_t> id = id_of(*a);
        QOMEM_ASSERT(id, "alias '{}' of fixture region '{}' is not a fixture region",
                     a->region_name(), old.region_name());
        const fixture_region& s = spec_.regions[*id];
        dead.emplace_back(a); // keeps it alive until the swap is done
        detach_from_tree(*a);
        memory_region::init_args args{where(s), s.name, region_kind::alias, a->size()};
        args.alias = &fresh;
        args.alias_offset = a->alias_offset();
        args.priority = a->priority();
        ref_ptr<memory_region> made = make_region(args);
        memory_region& b = *made;
        if (!args.where.home()) orphans_.push_back(made);
        if (!a->enabled()) b.set_enabled(false);
        if (a->readonly()) b.set_readonly(true);
        if (a->nonvolatile()) b.set_nonvolatile(true);
        if (!a->container() && a->addr()) b.set_address(a->addr());
        replace_in_container(*a, b);
        retarget_aliases(*a, b, dead);
        replace_spaces_rooted_at(*a, b);
        regions_[*id] = &b;
    }
}

template <MemoryRegionOps Ops>
memory_region& fixture_machine::attach_ops(memory_region& mr, Ops& ops) {
    const std::optional<std::size_t> id = id_of(mr);
    QOMEM_ASSERT(id, "attach_ops: region '{}' is not a region of this fixture", mr.region_name());
    QOMEM_ASSERT(mr.kind() == region_kind::io && !mr.callbacks().ops,
                 "attach_ops: region '{}' is not a fixture I/O region (ops go to io regions only)",
                 mr.region_name());
    const fixture_region& s = spec_.regions[*id];
    std::vector<ref_ptr<memory_region>> dead; // the replaced regions, freed last
    {
        memory_transaction tx(*memory_);
        dead.emplace_back(&mr);
        detach_from_tree(mr); // frees its "name[N]" slot for the new region
        ref_ptr<memory_region> made = make_io(where(s), s.name, mr.size(), ops);
        memory_region& fresh = *made;
        if (!where(s).home()) orphans_.push_back(made);
        if (!mr.enabled()) fresh.set_enabled(false);
        if (mr.readonly()) fresh.set_readonly(true);
        if (mr.nonvolatile()) fresh.set_nonvolatile(true);
        if (!mr.container()) {
            if (mr.addr()) fresh.set_address(mr.addr());
        }
        // Subregions move in the order they were added (reverse render order).
        std::vector<memory_region*> subs;
        mr.for_each_subregion([&](memory_region& sub) { subs.push_back(&sub); });
        for (memory_region* sub : subs) mr.del_subregion(*sub);
        for (auto it = subs.rbegin(); it != subs.rend(); ++it)
            fresh.add_subregion((*it)->addr(), **it, (*it)->priority());
        replace_in_container(mr, fresh);
        retarget_aliases(mr, fresh, dead);
        replace_spaces_rooted_at(mr, fresh);
        regions_[*id] = &fresh;
    }
    // Aliases before targets, as at teardown.
    while (!dead.empty()) dead.pop_back();
    return *regions_[*id];
}

} // namespace qomem
