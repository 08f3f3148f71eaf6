// Torch-side helpers shared by the CPU and CUDA op files (the kernel files stay torch-free).
#pragma once
#include <torch/library.h>
#include <ATen/core/Tensor.h>

#include <string>

#include "mixprec/common.h"

namespace mixprec {

inline DType to_dtype(at::ScalarType t, const char* arg) {
  switch (t) {
    case at::kFloat: return DType::Float32;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default: TORCH_CHECK(false, arg, " must be float32, float16 or bfloat16, got ", t);
  }
}

// A one-element fp32 tensor on `device` (scales, flags, norms travel as device tensors, never as host floats).
inline void check_scalar_f32(const at::Tensor& t, const char* arg, const at::Device& device) {
  TORCH_CHECK(t.numel() == 1, arg, " must have exactly one element, got ", t.numel());
  TORCH_CHECK(t.scalar_type() == at::kFloat, arg, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, arg, " must be on ", device, " (the grads' device), got ", t.device());
}

// Element-wise kernels walk storage linearly: any dense layout works (channels_last included), overlapping
// or gappy views do not.
inline void check_dense(const at::Tensor& t, const std::string& arg, const at::Device& device) {
  TORCH_CHECK(t.layout() == at::kStrided, arg, " must be a dense (strided) tensor, got layout ", t.layout());
  TORCH_CHECK(t.device() == device, arg, " must be on ", device, ", got ", t.device());
  TORCH_CHECK(t.is_non_overlapping_and_dense(), arg,
              " must be non-overlapping and dense (e.g. contiguous); call .contiguous() first");
}

}  // namespace mixprec
