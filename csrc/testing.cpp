// The `segkernels_testing` library: test-only ops, built only on request
// (SEGKERNELS_BUILD_TESTING=1, which `make test` and CI set) and never in the production
// `segkernels` namespace. Each op's test-only ops live in csrc/<op>/<op>_testing.cpp.
#include <torch/library.h>

#include "common_host.h"

namespace segkernels {
std::atomic<bool>& poison_outputs_flag() {
  static std::atomic<bool> flag{false};
  return flag;
}
}  // namespace segkernels

TORCH_LIBRARY(segkernels_testing, m) {
  // Poison every output the ops allocate from now on (see new_output); returns the old setting.
  m.def("set_poison_outputs(bool enabled) -> bool", [](bool enabled) -> bool {
    return segkernels::poison_outputs_flag().exchange(enabled);
  });
}
