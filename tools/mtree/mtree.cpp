// mtree: QEMU's `info mtree` for fixtures, fixtures from QEMU's text, and
// captures from a live QEMU.
//
//   mtree [--tree] [--owner] FIXTURE.json
//       prints the fixture's flat views (`info mtree -f`), or with --tree its
//       region tree with disabled regions (`info mtree -D`); --owner adds -o.
//
//   mtree import --tree D.txt --flat F.txt [--owners O.txt] [--qom-tree Q.txt]
//                [--machine TEXT] [--strict] > fixture.json
//       makes a fixture from QEMU's `info mtree -D`, `info mtree -f` and
//       optionally `info mtree -o -D` and `info qom-tree` (hmp_import.hpp).
//       What no text settles goes to stderr as notes; what keeps the fixture
//       from reproducing the texts as errors, with exit status 1 (also for
//       notes with --strict).
//
//   mtree capture --out DIR [--run SECONDS] [--timeout SECONDS] -- QEMU ARGS...
//   mtree capture --out DIR --qmp SOCKET [--timeout SECONDS]
//       starts QEMU (stopped at reset with -S; with --run, lets it run that
//       long first), or connects to a running one's QMP socket; asks it for
//       the texts over QMP (human-monitor-command) and writes DIR/cmdline,
//       DIR/mtree-D.txt, DIR/mtree-f.txt, DIR/mtree-oD.txt, DIR/qom-tree.txt
//       and DIR/fixture.json (the layout of tests/conformance).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <fmt/core.h>

#include <qomem/fixture.hpp>
#include <qomem/hmp_import.hpp>
#include <qomem/mtree.hpp>

#include "qemu.hpp"

namespace {

namespace fs = std::filesystem;
using mtree_tool::capture_error;
using mtree_tool::steady;

constexpr std::string_view usage = R"(usage:
  mtree [--tree] [--owner] FIXTURE.json
  mtree import --tree D.txt --flat F.txt [--owners O.txt] [--qom-tree Q.txt] [--machine TEXT] [--strict]
  mtree capture --out DIR [--run SECONDS] [--timeout SECONDS] [--strict] -- QEMU ARGS...
  mtree capture --out DIR --qmp SOCKET [--timeout SECONDS] [--strict]
)";

int usage_error(std::string_view what) {
    fmt::print(stderr, "mtree: {}\n{}", what, usage);
    return 2;
}

std::string read_file(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    if (!in) throw capture_error(fmt::format("{}: cannot open the file", p.string()));
    std::ostringstream s;
    s << in.rdbuf();
    return s.str();
}

void write_file(const fs::path& p, std::string_view text) {
    std::ofstream out(p, std::ios::binary);
    out << text;
    if (!out) throw capture_error(fmt::format("{}: cannot write the file", p.string()));
}

/// Prints the findings; returns the exit status.
int report(const qomem::hmp::import_result& r) {
    for (const auto& f : r.findings) fmt::print(stderr, "mtree import: {}: {}\n", f.error ? "error" : "note", f.message);
    if (!r.reproduces) fmt::print(stderr, "mtree import: the fixture does not reproduce QEMU's text\n");
    fmt::print(stderr, "mtree import: {} candidate fixtures built and printed\n", r.evaluations);
    return r.ok() ? 0 : 1;
}

int print_fixture(int argc, char** argv) {
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
            return usage_error(fmt::format("unexpected argument '{}'", arg));
        }
    }
    if (!path) return usage_error("no fixture given");
    try {
        auto machine = qomem::fixture_machine::load(path);
        fmt::print("{}", qomem::info_mtree(machine->spaces(), opt));
    } catch (const qomem::error& e) {
        fmt::print(stderr, "mtree: {}\n", e.what());
        return 1;
    }
    return 0;
}

int import(int argc, char** argv) {
    std::optional<std::string> tree, flat, owners, qom, machine;
    bool strict = false;
    for (int i = 2; i < argc; ++i) {
        const std::string_view arg = argv[i];
        auto value = [&](std::optional<std::string>& out) {
            if (i + 1 >= argc) return false;
            out = argv[++i];
            return true;
        };
        bool ok = true;
        if (arg == "--tree") ok = value(tree);
        else if (arg == "--flat") ok = value(flat);
        else if (arg == "--owners") ok = value(owners);
        else if (arg == "--qom-tree") ok = value(qom);
        else if (arg == "--machine") ok = value(machine);
        else if (arg == "--strict") strict = true;
        else return usage_error(fmt::format("unexpected argument '{}'", arg));
        if (!ok) return usage_error(fmt::format("{} needs a value", arg));
    }
    if (!tree || !flat) return usage_error("import needs --tree and --flat");
    try {
        const std::string tree_text = read_file(*tree), flat_text = read_file(*flat);
        std::string owners_text, qom_text;
        qomem::hmp::import_texts in{.tree = tree_text, .tree_source = *tree, .flat = flat_text, .flat_source = *flat};
        if (owners) {
            owners_text = read_file(*owners);
            in.owners = owners_text;
            in.owners_source = *owners;
        }
        if (qom) {
            qom_text = read_file(*qom);
            in.qom_tree = qom_text;
            in.qom_source = *qom;
        }
        if (machine) in.machine = *machine;
        const qomem::hmp::import_result r = qomem::hmp::import_mtree(in, {.strict = strict});
        if (r.reproduces) fmt::print("{}", r.spec.to_json());
        return report(r);
    } catch (const std::exception& e) {
        fmt::print(stderr, "mtree import: {}\n", e.what());
        return 1;
    }
}

/// A command line as one shell-quoted line.
std::string shell_line(const std::vector<std::string>& args) {
    std::string out;
    for (const std::string& a : args) {
        if (!out.empty()) out += ' ';
        const bool plain = !a.empty() && a.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                                             "0123456789-_=,./:+@%") == std::string::npos;
        if (plain) {
            out += a;
        } else {
            out += '\'';
            for (char c : a) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
            out += '\'';
        }
    }
    return out;
}

struct captured {
    std::string tree, flat, owners, qom;
};

captured ask(mtree_tool::qmp_client& qmp) {
    captured c;
    c.tree = qmp.hmp("info mtree -D");
    c.flat = qmp.hmp("info mtree -f");
    c.owners = qmp.hmp("info mtree -o -D"); // HMP wants -o before -D
    c.qom = qmp.hmp("info qom-tree");
    for (const std::string* t : {&c.tree, &c.flat, &c.owners})
        if (t->find("address-space") == std::string::npos && t->find("FlatView") == std::string::npos)
            throw capture_error(fmt::format("QEMU answered an `info mtree` with: {}", *t));
    return c;
}

int capture(int argc, char** argv) {
    std::optional<std::string> out_dir, qmp_socket;
    double run_seconds = 0, timeout_seconds = 30;
    bool strict = false;
    std::vector<std::string> qemu;
    for (int i = 2; i < argc; ++i) {
        const std::string_view arg = argv[i];
        auto need = [&]() -> const char* { return i + 1 < argc ? argv[++i] : nullptr; };
        if (arg == "--") {
            for (++i; i < argc; ++i) qemu.emplace_back(argv[i]);
            break;
        }
        const char* v = nullptr;
        if (arg == "--out" || arg == "--qmp" || arg == "--run" || arg == "--timeout") {
            v = need();
            if (!v) return usage_error(fmt::format("{} needs a value", arg));
        }
        try {
            if (arg == "--out") out_dir = v;
            else if (arg == "--qmp") qmp_socket = v;
            else if (arg == "--run") run_seconds = std::stod(v);
            else if (arg == "--timeout") timeout_seconds = std::stod(v);
            else if (arg == "--strict") strict = true;
            else return usage_error(fmt::format("unexpected argument '{}'", arg));
        } catch (const std::exception&) {
            return usage_error(fmt::format("{} wants a number of seconds, not '{}'", arg, v));
        }
    }
    if (!out_dir) return usage_error("capture needs --out DIR");
    if (qmp_socket.has_value() == !qemu.empty())
        return usage_error("capture needs either --qmp SOCKET or -- QEMU ARGS...");
    if (run_seconds < 0 || timeout_seconds <= 0) return usage_error("--run and --timeout must be positive");
    if (qmp_socket && run_seconds > 0) return usage_error("--run starts QEMU itself: not with --qmp");

    try {
        captured c;
        std::string cmdline;
        const auto timeout = std::chrono::duration_cast<steady::duration>(std::chrono::duration<double>(timeout_seconds));
        if (qmp_socket) {
            mtree_tool::qmp_client qmp(*qmp_socket, steady::now() + timeout);
            c = ask(qmp);
            cmdline = fmt::format("(a running QEMU, through {})", *qmp_socket);
        } else {
            mtree_tool::temp_dir tmp;
            const fs::path sock = tmp.path() / "qmp.sock";
            std::vector<std::string> args = qemu;
            const bool has_net = std::any_of(qemu.begin(), qemu.end(), [](const std::string& a) {
                return a == "-nic" || a == "-net" || a == "-netdev" || a == "-nodefaults";
            });
            std::vector<std::string> added{"-display", "none", "-S"};
            if (!has_net) added.insert(added.end(), {"-nic", "none"});
            args.insert(args.end(), added.begin(), added.end());
            std::vector<std::string> shown = args;
            args.insert(args.end(), {"-qmp", fmt::format("unix:{},server=on,wait=off", sock.string())});
            mtree_tool::qemu_process proc(args, tmp.path() / "qemu.log");
            try {
                mtree_tool::qmp_client qmp(sock.string(), steady::now() + timeout, [&] { return proc.running(); });
                if (run_seconds > 0) {
                    qmp.command("cont");
                    const auto until = steady::now() + std::chrono::duration_cast<steady::duration>(
                                                           std::chrono::duration<double>(run_seconds));
                    while (steady::now() < until) {
                        if (!proc.running()) throw capture_error("QEMU exited while the firmware ran");
                        std::this_thread::sleep_for(std::chrono::milliseconds(20));
                    }
                    qmp.set_deadline(steady::now() + timeout);
                    qmp.command("stop");
                }
                qmp.set_deadline(steady::now() + timeout);
                c = ask(qmp);
                qmp.quit();
            } catch (const capture_error& e) {
                proc.stop(steady::now());
                throw capture_error(fmt::format("{}\nQEMU's output:\n{}", e.what(), proc.log()));
            }
            if (!proc.stop(steady::now() + std::chrono::seconds(5)))
                fmt::print(stderr, "mtree capture: QEMU (pid {}) did not quit within 5 s: killed\n", proc.pid());
            cmdline = shell_line(shown);
            if (run_seconds > 0)
                cmdline += fmt::format("\n# then `cont`, {} s of firmware, `stop`, before the capture\n", run_seconds);
            else
                cmdline += "\n";
        }
        fs::create_directories(*out_dir);
        const fs::path dir = *out_dir;
        write_file(dir / "cmdline", cmdline);
        write_file(dir / "mtree-D.txt", c.tree);
        write_file(dir / "mtree-f.txt", c.flat);
        write_file(dir / "mtree-oD.txt", c.owners);
        write_file(dir / "qom-tree.txt", c.qom);
        std::string description = cmdline.substr(0, cmdline.find('\n'));
        if (run_seconds > 0) description += fmt::format(" (after {} s of firmware)", run_seconds);
        qomem::hmp::import_texts in{.tree = c.tree, .tree_source = (dir / "mtree-D.txt").string(),
                                    .flat = c.flat, .flat_source = (dir / "mtree-f.txt").string(),
                                    .owners = c.owners, .owners_source = (dir / "mtree-oD.txt").string(),
                                    .qom_tree = c.qom, .qom_source = (dir / "qom-tree.txt").string(),
                                    .machine = description};
        const qomem::hmp::import_result r = qomem::hmp::import_mtree(in, {.strict = strict});
        if (r.reproduces) write_file(dir / "fixture.json", r.spec.to_json());
        return report(r);
    } catch (const std::exception& e) {
        fmt::print(stderr, "mtree capture: {}\n", e.what());
        return 1;
    }
}

} // namespace

int main(int argc, char** argv) {
    if (argc >= 2 && std::string_view(argv[1]) == "import") return import(argc, argv);
    if (argc >= 2 && std::string_view(argv[1]) == "capture") return capture(argc, argv);
    return print_fixture(argc, argv);
}
