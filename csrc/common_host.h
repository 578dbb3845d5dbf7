// Host-only helpers shared by every op's CPU and CUDA entry points.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <limits>

namespace segkernels {

// Debug switch (tests turn it on): fill every freshly allocated op output with NaN (floating)
// or all-ones bits (integer) so that an element a kernel forgets to write cannot pass for a
// plausible value such as 0.
std::atomic<bool>& poison_outputs_flag();

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (poison_outputs_flag().load(std::memory_order_relaxed) && t.numel() > 0) {
    if (at::isFloatingType(t.scalar_type()))
      t.fill_(std::numeric_limits<double>::quiet_NaN());
    else if (t.scalar_type() == at::kByte)
      t.fill_(255);
    else
      t.fill_(-1);
  }
  return t;
}

}  // namespace segkernels
