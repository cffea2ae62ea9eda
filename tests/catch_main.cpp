// Catch2's main(), compiled once and linked into every test executable.
//
// It refuses, before running anything, a test name CTest cannot carry: CMake
// splits lists at ';', so catch_discover_tests would register a test named
// "a; b" as two tests, "a" and " b", each failing with "No tests ran" (CI
// saw exactly that). Discovery runs this at build time, so the build fails
// naming the test.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdio>
#include <string>

int main(int argc, char* argv[]) {
    int bad = 0;
    for (auto const& test : Catch::getAllTestCasesSorted(Catch::Config{Catch::ConfigData{}})) {
        if (test.name.find(';') != std::string::npos) {
            std::fprintf(stderr, "test name contains ';', which CTest splits: \"%s\" (%s:%zu)\n",
                         test.name.c_str(), test.lineInfo.file, test.lineInfo.line);
            ++bad;
        }
    }
    if (bad != 0) {
        return 2;
    }
    return Catch::Session().run(argc, argv);
}
