// Torch-free CPU kernel for unscale_and_check_ on one contiguous block.
#pragma once
#include <cstdint>

#include "mixprec/common.h"

namespace mixprec::cpu {

struct UnscaleBlockResult {
  float sum_sq;    // fp32 sum of squares of the unscaled values of the block
  bool nonfinite;  // some input value was inf or NaN
};

// g[i] = round(g[i] * inv_scale) for i < n. use_avx2: from cpu_use_avx2(), asked once per op call.
UnscaleBlockResult unscale_block(void* data, int64_t n, DType dtype, float inv_scale, bool use_avx2);

}  // namespace mixprec::cpu
