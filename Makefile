# Entry points for developers and CI. CMake does the real work; see CMakeLists.txt.
.NOTPARALLEL:
.PHONY: deps build demo test test-asan bench clean

JOBS := 2

# Installs the Debian packages if any is missing (apt-get, with sudo when not root).
deps:
	.ci/install-deps

build:
	cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo
	cmake --build build -j$(JOBS)

demo: deps build
	build/examples/hotplug
	build/examples/mtree tests/conformance/qemu-7.2/pc/fixture.json

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

bench: deps
	cmake -S . -B build-bench -DCMAKE_BUILD_TYPE=Release "-DCMAKE_CXX_FLAGS=-O2 -DNDEBUG"
	cmake --build build-bench -j$(JOBS)
	for b in $$(find build-bench/benchmarks -maxdepth 1 -type f -executable -name '*_bench' | sort); do \
	  echo "== $$b"; "$$b" || exit 1; \
	done

clean:
	rm -rf build build-asan build-bench
