// Argument checks of unscale_and_check_, shared by its CPU and CUDA implementations.
#pragma once
#include <optional>
#include <string>
#include <vector>

#include "torch_utils.h"

namespace mixprec {

// Checks every argument and returns the kernels' dtype of each grad.
inline std::vector<DType> check_unscale_args(at::TensorList grads, const at::Tensor& inv_scale,
                                             const at::Tensor& found_inf, const std::optional<at::Tensor>& norm_sq,
                                             const std::optional<at::Tensor>& per_tensor_inf, const at::Device& device) {
  check_scalar_f32(inv_scale, "inv_scale", device);
  check_scalar_f32(found_inf, "found_inf", device);
  if (norm_sq) check_scalar_f32(*norm_sq, "norm_sq", device);
  if (per_tensor_inf) {
    TORCH_CHECK(per_tensor_inf->scalar_type() == at::kFloat && per_tensor_inf->is_contiguous() &&
                    per_tensor_inf->numel() == static_cast<int64_t>(grads.size()) && per_tensor_inf->device() == device,
                "per_tensor_inf must be a contiguous float32 tensor with one element per grad on ", device);
  }
  std::vector<DType> dtypes;
  dtypes.reserve(grads.size());
  for (size_t t = 0; t < grads.size(); ++t) {
    const std::string arg = "grads[" + std::to_string(t) + "]";
    check_dense(grads[t], arg, device);
    dtypes.push_back(to_dtype(grads[t].scalar_type(), arg.c_str()));
  }
  return dtypes;
}

}  // namespace mixprec
