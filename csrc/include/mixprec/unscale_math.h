// Unscale-and-check of one gradient value, shared by the CPU and CUDA kernels.
#pragma once
#include "mixprec/rounding.h"

namespace mixprec {

// One fp32 multiply, then one rounding to the storage type when stored: bit for bit what
// torch._amp_foreach_non_finite_check_and_unscale_ writes.
MIXPREC_HD float unscale_value(float g, float inv_scale) { return g * inv_scale; }

// note: the overflow check is made on the unscaled value, not on the input as torch makes it. A finite scaled
// grad times inv_scale > 1 (a loss scale below 1, such as GradScaler's floor 2**-126) can overflow, and the step
// would then write inf/NaN into the weights. A non-finite input always gives a non-finite product (inf * 0 and
// NaN * x are NaN, inf * x != 0 is inf), whatever inv_scale, so testing the product alone also covers torch's
// input test: still one compare per element.
//
// The smallest |x| (as fp32 bits) that is non-finite once rounded to nearest even in T: 65520 for fp16 (a tie
// above 65504, whose last mantissa bit is odd, rounds to inf), 0x7f7f8000 for bf16 (the same tie above bf16's
// largest value), inf for fp32. Every value stored in T is below it, so a pass that only reads (inv_scale == 1)
// flags exactly the non-finite inputs with either limit.
template <DType T>
MIXPREC_HD constexpr uint32_t nonfinite_limit() {
  return T == DType::Float16 ? 0x477ff000u : T == DType::BFloat16 ? 0x7f7f8000u : 0x7f800000u;
}
constexpr uint32_t kFloat32NonfiniteLimit = 0x7f800000u;

// True when the fp32 value u is inf or NaN once rounded with the given limit (nonfinite_limit<T>() for a value
// stored in T, kFloat32NonfiniteLimit for one used in fp32).
MIXPREC_HD bool nonfinite_at(float u, uint32_t limit) { return (float_bits(u) & 0x7fffffffu) >= limit; }

}  // namespace mixprec
