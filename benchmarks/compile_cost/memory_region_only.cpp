// A translation unit including only <qomem/memory_region.hpp>
// (benchmarks/compile_cost.py).
#include <qomem/memory_region.hpp>

int main() { return 0; }
