// mtree: prints QEMU's `info mtree` for a machine described by a conformance
// fixture (tests/conformance/README.md).
//
//   mtree FIXTURE.json            the flat views (`info mtree -f`)
//   mtree --tree FIXTURE.json     the region tree with disabled regions (`info mtree -D`)
//   mtree --owner ...             also print owners (`-o`)
#include <cstdio>
#include <string_view>

#include <fmt/core.h>

#include <qomem/fixture.hpp>
#include <qomem/mtree.hpp>

int main(int argc, char** argv) {
    qomem::mtree_options opt{.flatview = true};
    const char* path = nullptr;
    for (int i = 1; i < argc; ++i) {
        const std::string_view arg = argv[i];
        if (arg == "--tree") {
            opt.flatview = false;
            opt.disabled = true;
        } else if (arg == "--owner") {
            opt.owner = true;
        } else if (!arg.empty() && arg[0] != '-' && !path) {
            path = argv[i];
        } else {
            fmt::print(stderr, "usage: mtree [--tree] [--owner] FIXTURE.json\n");
            return 2;
        }
    }
    if (!path) {
        fmt::print(stderr, "usage: mtree [--tree] [--owner] FIXTURE.json\n");
        return 2;
    }
    try {
        auto machine = qomem::fixture_machine::load(path);
        fmt::print("{}", qomem::info_mtree(machine->spaces(), opt));
    } catch (const qomem::error& e) {
        fmt::print(stderr, "mtree: {}\n", e.what());
        return 1;
    }
    return 0;
}
