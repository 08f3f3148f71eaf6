// Argument checks of matmul / matmul_accumulate_, shared by their CPU and CUDA implementations.
#pragma once
#include <ATen/MemoryOverlap.h>

#include <optional>

#include "torch_utils.h"

namespace mixprec {

// a [..., M, K] and b [K, N], both fp16 or both bf16, on one device; any strides.
inline void check_matmul_operands(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.layout() == at::kStrided, "a must be a dense (strided) tensor, got layout ", a.layout());
  TORCH_CHECK(b.layout() == at::kStrided, "b must be a dense (strided) tensor, got layout ", b.layout());
  TORCH_CHECK(a.dim() >= 2, "a must have shape [..., M, K], got ", a.sizes());
  TORCH_CHECK(b.dim() == 2, "b must have shape [K, N], got ", b.sizes());
  TORCH_CHECK(a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16,
              "a must be float16 or bfloat16, got ", a.scalar_type());
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), "b must have a's dtype ", a.scalar_type(), ", got ",
              b.scalar_type());
  TORCH_CHECK(b.device() == a.device(), "b must be on a's device ", a.device(), ", got ", b.device());
  TORCH_CHECK(a.size(-1) == b.size(0), "b must have shape [K, N] with K = a.shape[-1] = ", a.size(-1), ", got ",
              b.sizes());
}

// Output shape a.shape[:-1] + [N].
inline std::vector<int64_t> matmul_out_shape(const at::Tensor& a, const at::Tensor& b) {
  std::vector<int64_t> shape(a.sizes().begin(), a.sizes().end());
  shape.back() = b.size(1);
  return shape;
}

inline at::ScalarType check_matmul_args(const at::Tensor& a, const at::Tensor& b,
                                        const std::optional<at::Tensor>& bias,
                                        std::optional<at::ScalarType> out_dtype) {
  check_matmul_operands(a, b);
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == b.size(1), "bias must have shape [N] = [", b.size(1),
                "], got ", bias->sizes());
    to_dtype(bias->scalar_type(), "bias");
    TORCH_CHECK(bias->device() == a.device(), "bias must be on a's device ", a.device(), ", got ", bias->device());
  }
  const at::ScalarType out = out_dtype.value_or(a.scalar_type());
  to_dtype(out, "out_dtype");
  return out;
}

inline void check_accumulate_args(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b) {
  check_matmul_operands(a, b);
  TORCH_CHECK(c.scalar_type() == at::kFloat, "c must be float32 (the accumulator), got ", c.scalar_type());
  TORCH_CHECK(c.device() == a.device(), "c must be on a's device ", a.device(), ", got ", c.device());
  TORCH_CHECK(c.sizes() == at::IntArrayRef(matmul_out_shape(a, b)), "c must have shape a.shape[:-1] + [N] = ",
              at::IntArrayRef(matmul_out_shape(a, b)), ", got ", c.sizes());
  // the Python op decides every layout exactly (mixprec/ops/gemm.py); a direct torch.ops call gets at least
  // the certain cases (an expanded c): several products would be added into one element
  TORCH_CHECK(at::has_internal_overlap(c) != at::MemOverlap::Yes, "c has elements that share memory (shape ",
              c.sizes(), ", strides ", c.strides(), ", e.g. an expanded view): each output element needs its own "
              "address; pass c.clone() and read the result from it");
}

}  // namespace mixprec
