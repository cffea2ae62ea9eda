#!/usr/bin/env python3
"""Measures what including qomem costs a translation unit, for `make bench`.

    python3 benchmarks/compile_cost.py CXX INCLUDE_DIR OUT.json [--runs N]

Compiles the three files of benchmarks/compile_cost/ (the dependencies'
headers alone, <qomem/memory_region.hpp> alone, the umbrella <qomem/qomem.hpp>)
with `CXX -std=c++20 -O0 -c`, N times each, the three interleaved so that a
change in the machine's load weighs on each alike, and writes the wall-clock
times in Google Benchmark's JSON layout (one "iteration" entry per run), so
that report.py reads them with the other results and prints the ratios.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
UNITS = [
    ("compile/deps_only", "deps_only.cpp"),
    ("compile/memory_region_hpp", "memory_region_only.cpp"),
    ("compile/qomem_hpp", "qomem_all.cpp"),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cxx")
    ap.add_argument("include_dir")
    ap.add_argument("out")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    entries = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.runs):
            for name, source in UNITS:
                cmd = [args.cxx, "-std=c++20", "-O0", "-I", args.include_dir, "-c",
                       os.path.join(HERE, "compile_cost", source), "-o", os.path.join(tmp, "t.o")]
                start = time.perf_counter()
                done = subprocess.run(cmd, capture_output=True, text=True)
                seconds = time.perf_counter() - start
                if done.returncode != 0:
                    sys.exit(f"compile_cost.py: {' '.join(cmd)} failed:\n{done.stderr}")
                entries.append({"name": name, "run_name": name, "run_type": "iteration",
                                "repetition_index": rep, "iterations": 1,
                                "real_time": seconds * 1e3, "cpu_time": seconds * 1e3,
                                "time_unit": "ms"})
    version = subprocess.run([args.cxx, "--version"], capture_output=True, text=True).stdout
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"context": {"date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                               "compiler": version.splitlines()[0] if version else args.cxx,
                               "load_avg": list(os.getloadavg())},
                   "benchmarks": entries}, f, indent=1)


if __name__ == "__main__":
    main()
