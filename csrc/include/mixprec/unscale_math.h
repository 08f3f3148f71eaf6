// Unscale-and-check of one gradient value, shared by the CPU and CUDA kernels.
#pragma once
#include "mixprec/rounding.h"

namespace mixprec {

// inf or NaN: all exponent bits set. Checked on the value as stored (before unscaling), as torch does.
MIXPREC_HD bool is_nonfinite(float g) { return (float_bits(g) & 0x7f800000u) == 0x7f800000u; }

// One fp32 multiply, then one rounding to the storage type when stored: bit for bit what
// torch._amp_foreach_non_finite_check_and_unscale_ writes.
MIXPREC_HD float unscale_value(float g, float inv_scale) { return g * inv_scale; }

}  // namespace mixprec
