// Torch-free CPU kernel of adam_step_ on one contiguous block of one tensor.
#pragma once
#include <cstdint>

#include "mixprec/adam_math.h"

namespace mixprec::cpu {

// Which kernel: fixed for a whole tensor.
struct AdamVariant {
  DType dtype;      // of the param and its grad
  bool master;      // fp32 master weights hold the param (the model param is then only written)
  bool amsgrad;
  bool decoupled;   // AdamW
  bool stochastic;  // bf16 params without master: stochastic rounding on the store
};

// Pointers to the block's first element in each buffer; the fp32 state buffers hold one float per element.
struct AdamBlock {
  void* param;
  const void* grad;
  float* exp_avg;
  float* exp_avg_sq;
  float* max_exp_avg_sq;  // amsgrad only
  float* master;          // master only
  int64_t n;
  int64_t first_index;    // the block's offset in its tensor: stochastic rounding draws by tensor index
  uint32_t sr_key;        // sr_key(seed, tensor position, step), stochastic only
};

// The update of one block. use_avx2: from cpu_use_avx2(), asked once per op call.
void adam_block(const AdamBlock& block, const AdamVariant& variant, const AdamCoeffs<float>& coeffs,
                const AdamFlags& flags, bool use_avx2);

}  // namespace mixprec::cpu
