// Torch-free CPU kernel of adam_step_ on one contiguous block of one tensor.
#pragma once
#include <cstdint>

#include "cpu_features.h"
#include "mixprec/adam_math.h"

namespace mixprec::cpu {

// Which kernel: fixed for a whole tensor.
struct AdamVariant {
  DType dtype;        // of the param and its grad
  MasterKind master;  // where the fp32 param lives between steps
  StateKind state;    // how exp_avg, exp_avg_sq (and max_exp_avg_sq) are stored
  bool amsgrad;
  bool decoupled;     // AdamW
  bool stochastic;    // bf16 params without master: stochastic rounding on the store
};

// Pointers to the block's first element in each buffer (states of the variant's state kind: fp32, bf16, or int8
// codes for exp_avg and uint8 codes for exp_avg_sq). With int8 states the block starts at a multiple of
// kInt8Block elements of its tensor and the scale pointers point at its first quantization block's scales.
struct AdamBlock {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;      // amsgrad only
  float* master;             // MasterKind::Fp32 only
  int16_t* remainder;        // MasterKind::Remainder only
  float* exp_avg_scale;      // StateKind::Int8 only
  float* exp_avg_sq_scale;   // StateKind::Int8 only
  int64_t n;
  int64_t first_index;       // the block's offset in its tensor: stochastic rounding draws by it. The block never
                             // straddles a multiple of 2^32 elements (blocks start at multiples of their size)
  uint32_t sr_key;           // sr_key(seed, tensor position, step), stochastic only
};

// The update of one block. simd: from cpu_simd(), asked once per op call.
void adam_block(const AdamBlock& block, const AdamVariant& variant, const AdamCoeffs<float>& coeffs,
                const AdamFlags& flags, CpuSimd simd);

}  // namespace mixprec::cpu
