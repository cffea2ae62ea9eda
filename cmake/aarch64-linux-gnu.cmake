# Toolchain file: cross-build the tests for AArch64 with Debian's
# g++-aarch64-linux-gnu, and run them under qemu-user (qemu-aarch64, with the
# cross sysroot Debian installs in /usr/aarch64-linux-gnu).
#
#     cmake -S . -B build-aarch64 -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake
#
# The dependencies are header-only here: Boost, Catch2 and nlohmann-json are,
# and fmt is used with FMT_HEADER_ONLY (cmake/aarch64-linux-gnu/fmt-config.cmake),
# so no AArch64 library but the C and C++ runtimes is needed. Debian's cross
# compiler searches the host's /usr/include after its own directories, which
# is where those headers come from. `make test-aarch64` uses this.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)

# ctest and catch_discover_tests run the test programs through this.
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64 -L /usr/aarch64-linux-gnu)

# Libraries and headers of the target: the cross sysroot first.
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
# Headers and CMake packages may come from the host: the packages used are
# header-only (their CMake files live in /usr/lib/cmake and /usr/share/cmake).
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE BOTH)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)

# fmt header-only (the host's libfmt is x86-64).
set(fmt_DIR ${CMAKE_CURRENT_LIST_DIR}/aarch64-linux-gnu CACHE PATH "fmt, header-only")
