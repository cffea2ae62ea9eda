// A translation unit including the umbrella <qomem/qomem.hpp>
// (benchmarks/compile_cost.py).
#include <qomem/qomem.hpp>

int main() { return 0; }
