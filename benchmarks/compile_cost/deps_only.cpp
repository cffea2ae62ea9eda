// The dependencies' headers that qomem uses, alone: the baseline of the
// compile-cost rows (benchmarks/compile_cost.py).
#include <boost/intrusive/list.hpp>
#include <boost/intrusive_ptr.hpp>
#include <boost/smart_ptr/intrusive_ref_counter.hpp>
#include <fmt/core.h>
#include <fmt/format.h>

int main() { return 0; }
