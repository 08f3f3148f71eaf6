// Torch-free CPU kernel for unscale_and_check_ on one contiguous block.
#pragma once
#include <cstdint>

#include "mixprec/common.h"

namespace mixprec::cpu {

struct UnscaleBlockResult {
  float sum_sq;    // fp32 sum of squares of the unscaled values of the block (check_only: of the values)
  bool nonfinite;  // some unscaled value was inf or NaN (mixprec/unscale_math.h: as stored, or in fp32 if check_only)
};

// g[i] = round(g[i] * inv_scale) for i < n. check_only: nothing is written, sum_sq is of the values as stored
// and nonfinite flags the fp32 products g[i] * inv_scale. use_avx2: from cpu_use_avx2(), asked once per op call.
UnscaleBlockResult unscale_block(void* data, int64_t n, DType dtype, float inv_scale, bool check_only,
                                 bool use_avx2);

}  // namespace mixprec::cpu
