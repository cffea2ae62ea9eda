# Entry points for developers and CI. CMake does the real work; see CMakeLists.txt.
.NOTPARALLEL:
.PHONY: deps build demo test test-asan test-tsan test-aarch64 test-qemu recapture lint fuzz bench bench-smoke clean

JOBS := 2
# Debug information in the test, example and tool builds (OFF: -g0, about a
# third less compile and link time; CI sets it, and sanitizer reports then
# name functions without source lines).
DEBUG_INFO ?= ON
# The captures from a real QEMU (ctest label qemu): AUTO runs them when QEMU is
# installed; CI passes ON, which fails the configuration when it is not.
QEMU_TESTS ?= AUTO
# Repetitions of each benchmark in `make bench`; the report takes their medians.
BENCH_REPS ?= 5

# Installs the Debian packages if any is missing (apt-get, with sudo when not root).
deps:
	.ci/install-deps

build:
	cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DQOMEM_QEMU_TESTS=$(QEMU_TESTS) \
	  -DQOMEM_DEBUG_INFO=$(DEBUG_INFO)
	cmake --build build -j$(JOBS)

# The SVGs are build outputs: the example writes a DOT picture of each step
# under build/demo/nic_unplug/, and Graphviz's dot renders them there.
demo: deps build
	build/examples/hotplug
	rm -rf build/demo/nic_unplug
	build/examples/nic_unplug build/demo/nic_unplug
	for f in build/demo/nic_unplug/*.dot; do dot -Tsvg "$$f" -o "$${f%.dot}.svg" || exit 1; done
	build/tools/mtree/mtree tests/conformance/qemu-7.2/pc/fixture.json
	build/examples/dma_machine
	build/examples/virtiofs_dax
	build/examples/virtiofs_read
	build/examples/riscv_machine

# The build includes all_verify_interface_header_sets: every header compiles on its own.
test: deps build
	ctest --test-dir build --output-on-failure -j$(JOBS)

# The environment also covers the build, which runs each test executable to list its tests.
# Left to the plain run: the header checks, the benchmarks and the install
# tree (its consumer test builds nothing of ours under ASan).
test-asan: export ASAN_OPTIONS := detect_leaks=1:abort_on_error=1
test-asan: export UBSAN_OPTIONS := print_stacktrace=1:halt_on_error=1
test-asan: deps
	cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DQOMEM_SANITIZE=address,undefined \
	  -DQOMEM_VERIFY_HEADERS=OFF -DQOMEM_BUILD_BENCHMARKS=OFF -DQOMEM_INSTALL=OFF \
	  -DQOMEM_QEMU_TESTS=$(QEMU_TESTS) -DQOMEM_DEBUG_INFO=$(DEBUG_INFO)
	cmake --build build-asan -j$(JOBS)
	ctest --test-dir build-asan --output-on-failure -j$(JOBS)

# Only the captures from a real QEMU: each machine state of
# tests/conformance/qemu-machines.txt, captured and round-tripped.
test-qemu: deps build
	ctest --test-dir build --output-on-failure -j$(JOBS) -L qemu

# Captures the machines marked "committed" in tests/conformance/qemu-machines.txt
# again, into tests/conformance/qemu-7.2/NAME (review the diff before committing).
recapture: deps build
	grep -v '^#' tests/conformance/qemu-machines.txt | while IFS='|' read -r name seconds kept command; do \
	  name=$$(echo $$name); seconds=$$(echo $$seconds); kept=$$(echo $$kept); \
	  [ "$$kept" = committed ] || continue; \
	  echo "== $$name"; \
	  build/tools/mtree/mtree capture --out tests/conformance/qemu-7.2/$$name --run $$seconds -- $$command \
	    || exit 1; \
	done

# ThreadSanitizer over the tests that run threads (tests/concurrency_test.cpp,
# tests/memory_system_test.cpp, tests/rcu_test.cpp, tests/unplug_vcpu_test.cpp,
# tests/region_refcount_test.cpp), and only those: only
# those targets are built, and -R keeps ctest off the others (an unbuilt
# Catch2 target would show up as a failing *_NOT_BUILT test). Under TSan,
# qomem/rcu.hpp compiles its membarrier(2) path out: readers take the fenced
# path (README, "Threads"); -Wno-tsan: GCC 12 warns (-Werror: fails) that
# TSan does not model that path's std::atomic_thread_fence. Left out: the test
# that forks children while other threads start and exit (TSan's runtime can
# hang in such a child: seen once in ten children on a loaded machine; it runs
# in the plain and ASan builds).
test-tsan: export TSAN_OPTIONS := halt_on_error=1 second_deadlock_stack=1
test-tsan: deps
	cmake -S . -B build-tsan -DCMAKE_BUILD_TYPE=Debug -DQOMEM_SANITIZE=thread -DCMAKE_CXX_FLAGS=-Wno-tsan \
	  -DQOMEM_VERIFY_HEADERS=OFF -DQOMEM_BUILD_BENCHMARKS=OFF -DQOMEM_DEBUG_INFO=$(DEBUG_INFO)
	cmake --build build-tsan -j$(JOBS) --target concurrency_test memory_system_test rcu_test unplug_vcpu_test \
	  region_refcount_test
	ctest --test-dir build-tsan --output-on-failure -R '^(concurrency|memory_system|rcu|unplug_vcpu|region_refcount)_test\.' \
	  -E 'children forked while other threads'

# The tests that run threads, cross-built for AArch64 (Debian's
# g++-aarch64-linux-gnu, cmake/aarch64-linux-gnu.cmake) and run under
# qemu-user. Only those targets are built, and not the header checks (CI
# time: the host build compiles every header on its own). Left out under
# qemu-user: the seccomp test (qemu-user has no seccomp(2)), and the test
# that forks while other threads are being created (Debian 12's
# qemu-aarch64 7.2 aborts in the child: a qemu-user bug, reproduced without
# qomem). membarrier(2) works under qemu-user: the light path is the one run.
test-aarch64: deps
	cmake -S . -B build-aarch64 -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake \
	  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DQOMEM_BUILD_BENCHMARKS=OFF -DQOMEM_BUILD_EXAMPLES=OFF -DQOMEM_INSTALL=OFF \
	  -DQOMEM_VERIFY_HEADERS=OFF -DQOMEM_DEBUG_INFO=$(DEBUG_INFO)
	cmake --build build-aarch64 -j$(JOBS) --target concurrency_test memory_system_test rcu_test
	ctest --test-dir build-aarch64 --output-on-failure -j$(JOBS) -R '^(concurrency|memory_system|rcu)_test\.' \
	  -E 'membarrier starts failing|children forked while other threads'

# Optimised as the issue asks: -O2 -DNDEBUG (CMAKE_CXX_FLAGS_RELEASE, so
# Release's own -O3 does not win). Each program writes JSON to
# build-bench/results; report.py prints the bar from it. The repetitions of
# a program's benchmarks run interleaved in random order, so a change in the
# machine's load during the run weighs on ours and on the baselines alike.
bench: deps
	cmake -S . -B build-bench -DCMAKE_BUILD_TYPE=Release "-DCMAKE_CXX_FLAGS_RELEASE=-O2 -DNDEBUG" \
	  -DQOMEM_BUILD_TESTS=OFF -DQOMEM_BUILD_EXAMPLES=OFF -DQOMEM_INSTALL=OFF
	cmake --build build-bench -j$(JOBS)
	rm -rf build-bench/results && mkdir -p build-bench/results
	for b in $$(find build-bench/benchmarks -maxdepth 1 -type f -executable -name '*_bench' | sort); do \
	  echo "== $$b"; \
	  "$$b" --benchmark_repetitions=$(BENCH_REPS) --benchmark_enable_random_interleaving=true \
	    --benchmark_display_aggregates_only=true \
	    --benchmark_out=build-bench/results/$$(basename $$b).json --benchmark_out_format=json \
	    || exit 1; \
	done
	python3 benchmarks/compile_cost.py $(CXX) include build-bench/results/compile_cost.json --runs $(BENCH_REPS)
	python3 benchmarks/report.py build-bench/results

# CI: every benchmark built (by `build`) and run once, very briefly, with the
# large machines shrunk; checks that they run and clean up, never timings.
bench-smoke: export QOMEM_BENCH_SMOKE := 1
bench-smoke: deps build
	@test -n "$$(find build/benchmarks -maxdepth 1 -type f -executable -name '*_bench')" \
	  || { echo "bench-smoke: no benchmark was built"; exit 1; }
	for b in $$(find build/benchmarks -maxdepth 1 -type f -executable -name '*_bench' | sort); do \
	  echo "== $$b"; "$$b" --benchmark_min_time=0.001 || exit 1; \
	done

# The house layout (.clang-format) and clang-tidy's bug-class checks
# (.clang-tidy) over every public header, from Debian's clang 14. Tidy parses
# one translation unit that includes them all.
HEADERS := $(sort $(wildcard include/qomem/*.hpp include/qomem/*/*.hpp))
lint: deps
	clang-format-14 --style=file --dry-run --Werror $(HEADERS)
	mkdir -p build-lint
	printf '#include <%s>\n' $(patsubst include/%,%,$(HEADERS)) > build-lint/all_headers.cpp
	clang-tidy-14 --config-file=.clang-tidy --quiet build-lint/all_headers.cpp -- -std=c++20 -Iinclude

# Coverage-guided fuzzing (libFuzzer, clang 14, ASan+UBSan): each target in
# tests/fuzz/ runs for FUZZ_SECONDS from its committed seed corpus (every
# crash found so far is in it: a regression input) plus what it learns in
# build-fuzz/. Any crash, leak or failed check fails the target. Targets are
# built and run JOBS at a time (each libFuzzer run is one process); a run's
# output goes to build-fuzz/fuzz_NAME.log, printed when it fails.
FUZZ_SECONDS ?= 60
FUZZERS := $(patsubst tests/fuzz/fuzz_%.cpp,%,$(wildcard tests/fuzz/fuzz_*.cpp))
fuzz: deps
	mkdir -p build-fuzz
	printf '%s\n' $(FUZZERS) | xargs -P $(JOBS) -I{} \
	  clang++-14 -std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
	    -Iinclude tests/fuzz/fuzz_{}.cpp -lfmt -o build-fuzz/fuzz_{}
	printf '%s\n' $(FUZZERS) | xargs -P $(JOBS) -I{} sh -c ' \
	  mkdir -p build-fuzz/corpus-{}; \
	  if build-fuzz/fuzz_{} -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 \
	      -artifact_prefix=build-fuzz/{}- build-fuzz/corpus-{} tests/fuzz/corpus/{} \
	      > build-fuzz/fuzz_{}.log 2>&1; \
	  then echo "fuzz_{}: $$(grep -o "Done [0-9]* runs in [0-9]* second(s)" build-fuzz/fuzz_{}.log)"; \
	  else tail -n 60 build-fuzz/fuzz_{}.log; echo "fuzz_{}: FAILED (build-fuzz/fuzz_{}.log)"; exit 1; fi'

clean:
	rm -rf build build-asan build-tsan build-aarch64 build-bench build-lint build-fuzz
