// Argument checks of unscale_and_check_, shared by its CPU and CUDA implementations.
#pragma once
#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "torch_utils.h"

namespace mixprec {

// No two grads share memory bytes: the kernels update each grad once, on several threads, so an alias would race
// (and a tensor listed twice would be unscaled once, where a sequential loop unscales it twice). The same refusal,
// and message, as mixprec.ops._validate.check_distinct. Spans sorted by address: if any two overlap, some span
// starts before the furthest end of those that start earlier, so one pass finds it in O(n log n).
inline void check_distinct_grads(at::TensorList grads) {
  std::vector<std::tuple<uintptr_t, uintptr_t, int64_t>> spans;  // [begin, end) in bytes, list position
  spans.reserve(grads.size());
  for (size_t t = 0; t < grads.size(); ++t) {
    const at::Tensor& g = grads[t];
    if (g.numel() == 0) continue;
    int64_t extent = 1;
    for (int64_t d = 0; d < g.dim(); ++d) extent += (g.size(d) - 1) * g.stride(d);
    const auto begin = reinterpret_cast<uintptr_t>(g.data_ptr());
    spans.emplace_back(begin, begin + static_cast<uintptr_t>(extent * g.element_size()), static_cast<int64_t>(t));
  }
  std::sort(spans.begin(), spans.end());
  for (size_t k = 1, furthest = 0; k < spans.size(); ++k) {
    if (std::get<0>(spans[k]) < std::get<1>(spans[furthest])) {
      const int64_t a = std::get<2>(spans[furthest]), b = std::get<2>(spans[k]);
      TORCH_CHECK_VALUE(false, "grads[", std::min(a, b), "] and grads[", std::max(a, b),
                        "] share memory (the same tensor twice, or overlapping views): each tensor may appear once");
    }
    if (std::get<1>(spans[k]) > std::get<1>(spans[furthest])) furthest = k;
  }
}

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
  check_distinct_grads(grads);
  return dtypes;
}

}  // namespace mixprec
