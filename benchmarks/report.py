#!/usr/bin/env python3
"""Prints the performance bar from Google Benchmark JSON results.

    python3 benchmarks/report.py build-bench/results [--time cpu|real]

Reads every *.json in the directory (written by `make bench` with
--benchmark_out), takes the median of each benchmark's repetitions and
prints, as Markdown:

  * the machine (lscpu model name, CPUs, kernel) and the run's context;
  * the bar: each row's ours, baseline, ratio ours / baseline (or ns per op),
    target and whether it is met;
  * the raw figures: every benchmark's repetitions (median, min, max);
  * the memory counters.

Every number comes from the JSON. Single-threaded rows use CPU time by
default (the thread's own time, kernel time included: robust when the
machine is shared); the two-reader rows use throughput (items per second over
wall-clock time), whatever --time says. Exits 0 whether or not targets are met:
it reports, it does not assert.
"""

import argparse
import glob
import json
import os
import platform
import statistics
import subprocess
import sys

NS_PER_UNIT = {"ns": 1.0, "us": 1e3, "ms": 1e6, "s": 1e9}


class Bench:
    """One benchmark's repetitions."""

    def __init__(self, name):
        self.name = name
        self.runs = []  # the JSON entries of run_type "iteration"
        self.error = None

    def values(self, key):
        out = []
        for r in self.runs:
            if key in ("cpu_time", "real_time"):
                # Per iteration, in the benchmark's time unit.
                out.append(r[key] * NS_PER_UNIT[r.get("time_unit", "ns")])
            elif key in r:
                out.append(float(r[key]))
        return out

    def median(self, key):
        v = self.values(key)
        return statistics.median(v) if v else None


def load(results_dir):
    benches, contexts = {}, []
    files = sorted(glob.glob(os.path.join(results_dir, "*.json")))
    if not files:
        sys.exit(f"report.py: no *.json results in {results_dir}")
    for path in files:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        contexts.append((os.path.basename(path), data.get("context", {})))
        for entry in data.get("benchmarks", []):
            if entry.get("run_type", "iteration") != "iteration":
                continue  # aggregates: the medians are computed here
            name = entry.get("run_name", entry["name"])
            b = benches.setdefault(name, Bench(name))
            if entry.get("error_occurred"):
                b.error = entry.get("error_message", "error")
                continue
            b.runs.append(entry)
    return benches, contexts


def fmt_ns(ns):
    if ns is None:
        return "n/a"
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.2f} ns"


def fmt_rate(r):
    return "n/a" if r is None else f"{r / 1e6:.1f} M/s"


def fmt_bytes(b):
    if b is None:
        return "n/a"
    if abs(b) >= 1 << 20:
        return f"{b / (1 << 20):.2f} MiB"
    if abs(b) >= 1 << 10:
        return f"{b / (1 << 10):.1f} KiB"
    return f"{b:.0f} B"


class Row:
    """One line of the bar.

    kind: "le"   ratio ours / baseline (time) must be <= target
          "faster" baseline must be >= target x slower (ratio <= 1 / target)
          "abs"  ours, in ns per op, must be <= target
          "tput" throughput ours / baseline must be >= target
          "info" a counter of ours (named by `target`), reported without a target
    """

    def __init__(self, path, ours, baseline, kind, target, note=""):
        self.path, self.ours, self.baseline = path, ours, baseline
        self.kind, self.target, self.note = kind, target, note


def rows():
    out = [
        Row("region ref + unref, region with an owner, 1 thread",
            "refcount/region_owned", "refcount/baseline_atomic_pair", "le", 1.1,
            "raw atomic pair"),
        Row("region ref + unref, ownerless region",
            "refcount/region_ownerless", "refcount/baseline_plain_pair", "le", 2.0,
            "plain pair"),
    ]
    for n, faster in ((16, 5.0), (1000, 10.0)):
        out += [
            Row(f"8-byte RAM read, random addresses, {n} regions",
                f"dispatch/read_random/qomem/{n}", f"dispatch/read_random/unicorn/{n}",
                "faster", faster, "Unicorn uc_mem_read"),
            Row(f"8-byte RAM read, random addresses, {n} regions",
                f"dispatch/read_random/qomem/{n}", f"dispatch/read_random/baseline_vector/{n}",
                "le", 1.5, "sorted vector + memcpy"),
        ]
    out.append(Row("8-byte RAM read, random addresses, 100,000 regions over 64 KiB of shared host memory",
                   "dispatch/read_random_shared/qomem/100000", "dispatch/read_random_shared/qomem/16",
                   "le", 1.5, "the same with 16 regions"))
    for n in (16, 1000):
        out.append(Row(f"8-byte RAM read, repeated address, {n} regions",
                       f"dispatch/read_repeated/qomem/{n}", None, "abs", 3.0))
    out += [
        Row("8-byte RAM reads alternating between two regions (code and data), 16 regions",
            "dispatch/read_alternating/qomem/16", "dispatch/read_repeated/qomem/16", "le", 1.3,
            "one address, repeated"),
    ]
    for n in (16, 1000):
        out.append(Row(f"8-byte RAM write, random addresses, {n} regions",
                       f"dispatch/write_random/qomem/{n}", f"dispatch/write_random/baseline_vector/{n}",
                       "le", 1.5, "sorted vector + memcpy"))
    for n, target in ((16, 1.5), (1000, 2.0)):
        out.append(Row(f"DMA map + unmap of a RAM range (4 KiB), {n} regions",
                       f"dispatch/dma_map_unmap/qomem/{n}",
                       f"dispatch/dma_map_unmap/baseline_vector/{n}", "le", target,
                       "sorted vector + atomic pair"))
    out += [
        Row("add one subregion + delete it (two commits), 1,000 regions",
            "topology/add_del/qomem/1000", "topology/add_del/unicorn/1000", "faster", 100.0,
            "Unicorn uc_mem_map + uc_mem_unmap, 1,000 mapped"),
        Row("same, 100,000 regions",
            "topology/add_del/qomem/100000", "topology/add_del/qomem/1000", "le", 10.0,
            "qomem at 1,000 regions"),
    ]
    for size, label in ((4096, "4 KiB"), (2097152, "2 MiB")):
        out.append(Row(f"shared-memory map + unmap pair, {label}",
                       f"shmem/map_unmap/qomem/{size}", f"shmem/map_unmap/baseline_mmap/{size}",
                       "le", 1.25, "mmap(MAP_FIXED) + PROT_NONE remap"))
    out += [
        Row("compile a TU including <qomem/qomem.hpp> (g++, -O0)",
            "compile/qomem_hpp", "compile/deps_only", "le", 2.5,
            "the dependencies' headers alone (fmt, Boost.Intrusive)"),
        Row("compile a TU including only <qomem/memory_region.hpp>",
            "compile/memory_region_hpp", "compile/deps_only", "le", 1.8,
            "the dependencies' headers alone (fmt, Boost.Intrusive)"),
    ]
    out += [
        Row("8-byte reads, 2 reader threads, no writer",
            "dispatch/read_threads/no_writer/real_time/threads:2",
            "dispatch/read_threads/no_writer/real_time/threads:1", "tput", 1.8,
            "1 reader thread"),
        Row("8-byte reads, 2 reader threads, writer committing every 100 µs",
            "dispatch/read_threads/writer/real_time/threads:2",
            "dispatch/read_threads/no_writer/real_time/threads:2", "tput", 0.8,
            "the same reads without the writer"),
        Row("commit latency with 2 readers running, median",
            "dispatch/read_threads/writer/real_time/threads:2", None, "info", "commit_p50_ns"),
        Row("commit latency with 2 readers running, 99th percentile",
            "dispatch/read_threads/writer/real_time/threads:2", None, "info", "commit_p99_ns"),
    ]
    out += [
        Row("8-byte load, CPU TLB hit", "cpu/tlb_load/tlb", "cpu/tlb_load/raw_pointer", "le", 1.3,
            "raw pointer load"),
        Row("8-byte store, CPU TLB hit", "cpu/tlb_store/tlb", "cpu/tlb_store/raw_pointer", "le", 1.3,
            "raw pointer store"),
        Row("RV32I interpreter over a CPU TLB", "cpu/rv32/tlb", "cpu/rv32/flat", "le", 1.15,
            "the same interpreter over flat memory"),
        Row("RV32I interpreter over the plain address-space API", "cpu/rv32/address_space",
            "cpu/rv32/flat", "le", 2.0, "the same interpreter over flat memory"),
    ]
    return out


def evaluate(row, benches, timekey):
    """Returns (ours text, baseline text, ratio text, target text, met text)."""
    ours = benches.get(row.ours)
    base = benches.get(row.baseline) if row.baseline else None
    missing = [n for n, b in ((row.ours, ours), (row.baseline, base)) if n and (b is None or not b.runs)]
    if row.kind == "info":
        v = ours.median(row.target) if ours and ours.runs else None
        return (fmt_ns(v), "—", "—", "—", "—") if v is not None else ("n/a", "—", "—", "—", "? (missing)")
    if row.kind == "tput":
        o = ours.median("items_per_second") if ours else None
        b = base.median("items_per_second") if base else None
        target = f"≥ {row.target:g}×"
        if missing or not o or not b:
            return fmt_rate(o), fmt_rate(b), "n/a", target, "? (missing: " + ", ".join(missing) + ")"
        ratio = o / b
        return fmt_rate(o), fmt_rate(b), f"{ratio:.2f}×", target, "yes" if ratio >= row.target else "**no**"
    o = ours.median(timekey) if ours and ours.runs else None
    if row.kind == "abs":
        target = f"≤ {row.target:g} ns"
        if o is None:
            return "n/a", "—", "—", target, "? (missing)"
        return fmt_ns(o), "—", f"{o:.2f} ns/op", target, "yes" if o <= row.target else "**no**"
    b = base.median(timekey) if base and base.runs else None
    if row.kind == "faster":
        target = f"≤ {1 / row.target:.3g}× (≥ {row.target:g}× faster)"
    else:
        target = f"≤ {row.target:g}×"
    if o is None or b is None:
        return fmt_ns(o), fmt_ns(b), "n/a", target, "? (missing: " + ", ".join(missing) + ")"
    ratio = o / b
    text = f"{ratio:.3g}×" + (f" ({b / o:.1f}× faster)" if row.kind == "faster" else "")
    limit = 1 / row.target if row.kind == "faster" else row.target
    return fmt_ns(o), fmt_ns(b), text, target, "yes" if ratio <= limit else "**no**"


def lscpu():
    info = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            info[k.strip()] = v.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def build_info(results_dir):
    """The build's type, flags and compiler, from the CMake cache next to the results."""
    build = os.path.dirname(os.path.abspath(results_dir.rstrip("/")))
    cache, info = os.path.join(build, "CMakeCache.txt"), {}
    try:
        with open(cache, encoding="utf-8") as f:
            for line in f:
                name, _, value = line.rstrip("\n").partition("=")
                key = name.split(":")[0]
                if key in ("CMAKE_BUILD_TYPE", "CMAKE_CXX_FLAGS", "CMAKE_CXX_FLAGS_RELEASE"):
                    info[key] = value
    except OSError:
        return None
    for path in glob.glob(os.path.join(build, "CMakeFiles", "*", "CMakeCXXCompiler.cmake")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                for key in ("CMAKE_CXX_COMPILER_ID", "CMAKE_CXX_COMPILER_VERSION"):
                    if line.startswith(f"set({key} "):
                        info[key] = line.split('"')[1]
    return info


def print_machine(contexts, build):
    cpu = lscpu()
    print("## Machine\n")
    print(f"- CPU: {cpu.get('Model name', platform.processor() or 'unknown')}, "
          f"{cpu.get('CPU(s)', os.cpu_count())} CPU(s), "
          f"{cpu.get('Core(s) per socket', '?')} core(s) per socket, "
          f"{cpu.get('Thread(s) per core', '?')} thread(s) per core"
          + (f", hypervisor {cpu['Hypervisor vendor']}" if "Hypervisor vendor" in cpu else ""))
    print(f"- Kernel: {platform.system()} {platform.release()}")
    if contexts:
        # compile_cost.json is ours and has no Google Benchmark context.
        ctx = next((c for _, c in contexts if "num_cpus" in c), contexts[0][1])
        print(f"- Google Benchmark context: {ctx.get('num_cpus', '?')} CPUs at "
              f"{ctx.get('mhz_per_cpu', '?')} MHz, library build type "
              f"{ctx.get('library_build_type', '?')}, run {ctx.get('date', '?')}")
        loads = [max(c.get("load_avg", [0]) or [0]) for _, c in contexts]
        if build:
            flags = build.get("CMAKE_CXX_FLAGS", "")
            if build.get("CMAKE_BUILD_TYPE") == "Release":
                flags = (flags + " " + build.get("CMAKE_CXX_FLAGS_RELEASE", "")).strip()
            print(f"- Build: {build.get('CMAKE_CXX_COMPILER_ID', '?')} "
                  f"{build.get('CMAKE_CXX_COMPILER_VERSION', '?')}, "
                  f"CMAKE_BUILD_TYPE={build.get('CMAKE_BUILD_TYPE', '?')}, flags `{flags}` "
                  "(the library build type above is Debian's libbenchmark, not ours)")
        print(f"- Load average seen at the start of each program: "
              + ", ".join(f"{name.removesuffix('.json')} {load:.2f}"
                          for (name, _), load in zip(contexts, loads)))
    print()


def print_bar(benches, timekey):
    print(f"## The bar (medians of the repetitions; {timekey.replace('_', ' ')} per op)\n")
    if timekey == "cpu_time":
        print("Single-threaded rows compare the benchmark thread's CPU time (user + kernel), "
              "which other load on the machine hardly inflates; the reader-thread rows compare "
              "throughput over wall-clock time, and the commit latencies are wall-clock too.\n")
    print("| path | ours | baseline | ratio ours / baseline | target | met |")
    print("| --- | --- | --- | --- | --- | --- |")
    met = total = 0
    for row in rows():
        o, b, ratio, target, ok = evaluate(row, benches, timekey)
        base = f"{b} ({row.note})" if row.note and b not in ("—",) else b
        print(f"| {row.path} | {o} | {base} | {ratio} | {target} | {ok} |")
        if row.kind == "info":
            continue
        total += 1
        met += ok == "yes"
    print(f"\n{met} of {total} targets met.\n")


def print_raw(benches, timekey):
    print("## Raw figures (every benchmark, per op)\n")
    print(f"| benchmark | reps | median {timekey.replace('_', ' ')} | min | max "
          "| median real time | counters (medians) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in sorted(benches):
        b = benches[name]
        if name.startswith("memory/"):
            continue
        if not b.runs:
            print(f"| {name} | 0 | skipped: {b.error or 'no runs'} | | | | |")
            continue
        t = b.values(timekey)
        counters = []
        for key in ("items_per_second", "writer_commits_per_s", "commit_p50_ns", "commit_p99_ns",
                    "flat_ranges", "ns_per_instruction"):
            m = b.median(key)
            if m is not None:
                counters.append(f"{key}={m:,.0f}")
        print(f"| {name} | {len(t)} | {fmt_ns(statistics.median(t))} | {fmt_ns(min(t))} | "
              f"{fmt_ns(max(t))} | {fmt_ns(b.median('real_time'))} | {' '.join(counters)} |")
    print()


MEMORY_ROWS = [
    ("memory/region", "sizeof_memory_region", "sizeof(memory_region)"),
    ("memory/region", "ownerless_region_bytes", "heap per ownerless RAM region (object + name + ...)"),
    ("memory/region", "owned_region_bytes", "heap per RAM region owned by a device (+ its child property)"),
    ("memory/region", "subregion_link_bytes", "heap added per region by add_subregion (container index)"),
    ("memory/flat_view", "sizeof_flat_range", "sizeof(flat_range)"),
    ("memory/flat_view", "flat_range_bytes", "heap per flat range (rendered view of N regions)"),
    ("memory/flat_view", "flat_view_bytes", "heap of that whole view"),
    ("memory/shared_view", "sizeof_address_space", "sizeof(address_space)"),
    ("memory/shared_view", "address_space_bytes", "heap per address space"),
    ("memory/shared_view", "alias_root_bytes", "heap per alias root region"),
    ("memory/shared_view", "distinct_flat_views", "distinct flat views among the address spaces"),
    ("memory/shared_view", "flat_view_bytes", "heap of the one shared view (16 regions)"),
    ("memory/shared_view", "total_bytes", "total: the address spaces, their roots and the view"),
    ("memory/shared_view", "unshared_views_bytes", "what one view per address space would add"),
]


def print_memory(benches):
    by_prefix = {}
    for name, b in benches.items():
        for prefix in {p for p, _, _ in MEMORY_ROWS}:
            if name.startswith(prefix + "/") and b.runs:
                by_prefix[prefix] = b
    if not by_prefix:
        return
    print("## Memory (medians)\n")
    print("| what | N | value |")
    print("| --- | --- | --- |")
    for prefix, key, label in MEMORY_ROWS:
        b = by_prefix.get(prefix)
        v = b.median(key) if b else None
        n = None
        if b:
            n = b.median("regions") or b.median("address_spaces") or b.median("flat_ranges")
        shown = "n/a" if v is None else (f"{v:.0f}" if key == "distinct_flat_views" else fmt_bytes(v))
        print(f"| {label} | {'' if n is None else f'{n:,.0f}'} | {shown} |")
    print()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="directory of Google Benchmark JSON files")
    ap.add_argument("--time", choices=("cpu", "real"), default="cpu",
                    help="time of the single-threaded rows (default: cpu)")
    args = ap.parse_args()
    benches, contexts = load(args.results)
    timekey = f"{args.time}_time"
    print_machine(contexts, build_info(args.results))
    print_bar(benches, timekey)
    print_memory(benches)
    print_raw(benches, timekey)


if __name__ == "__main__":
    main()
