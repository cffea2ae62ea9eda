// libFuzzer target: the mtree importer on hostile HMP text. Each input is up
// to three texts separated by NUL bytes: `info mtree -D`, `info mtree -f`
// and, when a third part is there, `info mtree -o -D`. Checks:
// - import_mtree either returns a result or throws hmp_error (malformed
//   text) or fixture_error (texts that describe no buildable machine); any
//   other exception, a crash or a sanitizer report is a finding;
// - a result that claims to reproduce QEMU's texts does: the fixture it
//   made, written as JSON, read back and built, prints the input's flat
//   views and tree under the comparison rule (checked here independently of
//   the importer's own check);
// - the search stays bounded (max_evaluations) and nothing is left alive.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <string>
#include <string_view>

#include <qomem/fixture.hpp>
#include <qomem/hmp_import.hpp>
#include <qomem/hmp_text.hpp>
#include <qomem/mtree.hpp>
#include <qomem/testing.hpp>

using namespace qomem;

namespace {

[[noreturn]] void finding(const char* what, const std::string& detail) {
    std::fprintf(stderr, "finding: %s\n%s\n", what, detail.c_str());
    std::abort();
}

void run(std::string_view input) {
    std::string_view parts[3];
    std::size_t n = 0;
    while (n < 3) {
        const auto nul = input.find('\0');
        parts[n++] = input.substr(0, nul);
        if (nul == std::string_view::npos) break;
        input.remove_prefix(nul + 1);
    }
    hmp::import_texts texts{.tree = parts[0], .flat = parts[1]};
    if (n == 3) texts.owners = parts[2];
    hmp::import_result r;
    try {
        r = hmp::import_mtree(texts, {.max_evaluations = 64});
    } catch (const hmp_error&) {
        return;
    } catch (const fixture_error&) {
        return;
    } catch (const std::bad_alloc&) {
        return;
    }
    if (live_object_count() != 0) finding("import_mtree left objects alive", testing::describe_live_objects());
    if (r.evaluations > 64) finding("the search went past max_evaluations", std::to_string(r.evaluations));
    if (!r.reproduces) return;
    const std::string json = r.spec.to_json();
    std::unique_ptr<fixture_machine> m;
    try {
        m = fixture_machine::parse(json, "imported");
    } catch (const fixture_error& e) {
        finding("a reproducing import wrote a fixture that does not load", std::string(e.what()) + "\n" + json);
    }
    const std::string flat = info_mtree(m->spaces(), {.flatview = true});
    if (auto d = hmp::mtree_text_difference(parts[1], flat); !d.empty())
        finding("the imported fixture's flat views differ from the input's", d);
    const std::string tree = info_mtree(m->spaces(), {.disabled = true});
    if (auto d = hmp::mtree_text_difference(parts[0], tree); !d.empty())
        finding("the imported fixture's tree differs from the input's", d);
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    run(std::string_view(reinterpret_cast<const char*>(data), size));
    if (live_object_count() != 0) finding("objects left alive after the import", testing::describe_live_objects());
    return 0;
}
