# Entry points for developers and CI. CMake does the real work; see CMakeLists.txt.
.NOTPARALLEL:
.PHONY: deps build demo test test-asan test-tsan bench bench-smoke clean

JOBS := 2
# Repetitions of each benchmark in `make bench`; the report takes their medians.
BENCH_REPS ?= 5

# Installs the Debian packages if any is missing (apt-get, with sudo when not root).
deps:
	.ci/install-deps

build:
	cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo
	cmake --build build -j$(JOBS)

demo: deps build
	build/examples/hotplug
	build/examples/mtree tests/conformance/qemu-7.2/pc/fixture.json
	build/examples/dma_machine
	build/examples/virtiofs_dax
	build/examples/virtiofs_read
	build/examples/riscv_machine

# The build includes all_verify_interface_header_sets: every header compiles on its own.
test: deps build
	ctest --test-dir build --output-on-failure -j$(JOBS)

# The environment also covers the build, which runs each test executable to list its tests.
test-asan: export ASAN_OPTIONS := detect_leaks=1:abort_on_error=1
test-asan: export UBSAN_OPTIONS := print_stacktrace=1:halt_on_error=1
test-asan: deps
	cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DQOMEM_SANITIZE=address,undefined
	cmake --build build-asan -j$(JOBS)
	ctest --test-dir build-asan --output-on-failure -j$(JOBS)

# ThreadSanitizer over the tests that run threads (tests/concurrency_test.cpp,
# tests/memory_system_test.cpp), and only those: only those targets are built,
# and -R keeps ctest off the others (an unbuilt Catch2 target would show up as
# a failing *_NOT_BUILT test).
# -Wno-tsan: GCC 12 warns (-Werror: fails) that TSan does not model the
# std::atomic_thread_fence in qomem/rcu.hpp; that fence is only run where
# membarrier(2) is unavailable.
test-tsan: export TSAN_OPTIONS := halt_on_error=1 second_deadlock_stack=1
test-tsan: deps
	cmake -S . -B build-tsan -DCMAKE_BUILD_TYPE=Debug -DQOMEM_SANITIZE=thread -DCMAKE_CXX_FLAGS=-Wno-tsan
	cmake --build build-tsan -j$(JOBS) --target concurrency_test memory_system_test
	ctest --test-dir build-tsan --output-on-failure -R '^(concurrency|memory_system)_test\.'

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

clean:
	rm -rf build build-asan build-tsan build-bench
