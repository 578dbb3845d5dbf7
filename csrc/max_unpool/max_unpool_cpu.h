// CPU-only helpers that the pooling and the unpooling kernels share: row scheduling and
// branch-free masks.
#pragma once

#include <algorithm>
#include <cstdint>

#include "max_unpool/max_unpool_host.h"

namespace segkernels {
namespace max_unpool {

// Rows of work per parallel task: enough to amortise scheduling, small enough to balance.
inline int64_t row_grain(int64_t row_len) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_len)); }

// (o, z, y) of consecutive rows of an (outer, D, H) row space: decoded once, then stepped.
// A 64-bit division costs tens of cycles, which short rows (deep layers) cannot amortise.
struct RowCursor {
  int64_t o, z, y;
  const int64_t D, H;
  RowCursor(int64_t r, int64_t D_, int64_t H_) : D(D_), H(H_) { decode_row(r, D, H, o, z, y); }
  void next() {
    if (++y == H) {
      y = 0;
      if (++z == D) {
        z = 0;
        ++o;
      }
    }
  }
};

// All ones when keep, else zero: which tap of a window holds the maximum is random, so a
// branch here mispredicts half the time; a mask never does.
template <typename bits_t>
inline bits_t keep_mask(bool keep) {
  return static_cast<bits_t>(bits_t(0) - static_cast<bits_t>(keep));
}

}  // namespace max_unpool
}  // namespace segkernels
