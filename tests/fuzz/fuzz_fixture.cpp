// libFuzzer target: the fixture loader on hostile JSON. Each input is a
// fixture file's text. Checks:
// - fixture_machine::parse either builds a machine or throws fixture_error;
//   any other exception, a crash or a sanitizer report is a finding;
// - a refused input leaves nothing behind (no live object);
// - an accepted one round-trips: the spec written back as JSON reads to the
//   same JSON, and the machine built from it prints the same flat views and
//   tree as the first (so nothing the loader accepted is lost on the way);
// - guest reads and writes anywhere in each address space return a result
//   (unassigned, a decode error, or data) and never crash, whatever the
//   regions' sizes and places;
// - once the machines are gone, no object is alive.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <string>
#include <string_view>

#include <qomem/fixture.hpp>
#include <qomem/hmp_text.hpp>
#include <qomem/mtree.hpp>
#include <qomem/testing.hpp>

using namespace qomem;

namespace {

[[noreturn]] void finding(const char* what, const std::string& detail) {
    std::fprintf(stderr, "finding: %s\n%s\n", what, detail.c_str());
    std::abort();
}

std::string print(const fixture_machine& m, bool flat) {
    return info_mtree(m.spaces(), {.flatview = flat, .disabled = !flat});
}

void run(std::string_view text) {
    std::unique_ptr<fixture_machine> m;
    try {
        m = fixture_machine::parse(text, "fuzz.json");
    } catch (const fixture_error&) {
        if (live_object_count() != 0) finding("a refused fixture left objects alive", testing::describe_live_objects());
        return;
    } catch (const std::bad_alloc&) {
        return; // a fixture asking for more RAM than there is
    }
    const std::string json = m->spec().to_json();
    const std::string again = fixture_spec::read(json, "written").to_json();
    if (json != again) finding("to_json does not round-trip", json + "\n---\n" + again);
    {
        auto m2 = fixture_machine::parse(json, "written");
        for (bool flat : {true, false}) {
            const std::string a = print(*m, flat), b = print(*m2, flat);
            if (auto d = hmp::mtree_text_difference(a, b); !d.empty())
                finding("the machine rebuilt from to_json prints differently", d);
        }
    }
    // Guest accesses at addresses taken from the text itself, the edges of
    // the address space and around each printed range.
    std::uint64_t probe = 0;
    for (char c : text) probe = probe * 131 + static_cast<unsigned char>(c);
    for (std::size_t i = 0; i < m->spaces().size(); ++i) {
        address_space& space = m->space(i);
        for (hwaddr a : {hwaddr{0}, hwaddr{probe}, ~hwaddr{0} - 7, hwaddr{probe & 0xfffff}}) {
            std::uint64_t v = 0;
            (void)space.read(a, &v, sizeof v);
            (void)space.write(a, &v, sizeof v);
        }
    }
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    run(std::string_view(reinterpret_cast<const char*>(data), size));
    if (live_object_count() != 0) finding("objects left alive after the machines went", testing::describe_live_objects());
    return 0;
}
