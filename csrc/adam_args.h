// Argument checks of adam_step_, shared by its CPU and CUDA implementations.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "torch_utils.h"

namespace mixprec {

struct AdamArgs {
  bool master = false;      // master_params given (one per param)
  bool amsgrad = false;     // max_exp_avg_sqs given (one per param)
  bool stochastic = false;  // sr_seed >= 0
  uint32_t seed = 0;
  std::vector<DType> dtypes;  // of each param
};

namespace detail {

inline std::string item(const char* list, size_t i) { return std::string(list) + "[" + std::to_string(i) + "]"; }

// An fp32 buffer (or the grad) walked in step with params[i]: same shape and strides.
inline void check_like_param(const at::Tensor& t, const std::string& arg, const at::Tensor& param, size_t i,
                             const at::Device& device) {
  check_dense(t, arg, device);
  TORCH_CHECK(t.sizes() == param.sizes() && t.strides() == param.strides(), arg,
              " must have the shape and strides of params[", i, "] (", param.sizes(), ", ", param.strides(), "), got ",
              t.sizes(), ", ", t.strides());
}

inline void check_list_size(at::TensorList list, const char* name, size_t n, bool may_be_empty) {
  TORCH_CHECK(list.size() == n || (may_be_empty && list.empty()), name, " must have one tensor per param (", n,
              may_be_empty ? ") or be empty" : ")", ", got ", list.size());
}

}  // namespace detail

inline AdamArgs check_adam_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                at::TensorList exp_avg_sqs, at::TensorList steps, at::TensorList max_exp_avg_sqs,
                                at::TensorList master_params, const at::Tensor& lr,
                                double beta1, double beta2, double eps,
                                const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                                const std::optional<at::Tensor>& clip_coef, int64_t sr_seed, const at::Device& device) {
  using detail::item;
  const size_t n = params.size();
  detail::check_list_size(grads, "grads", n, false);
  detail::check_list_size(exp_avgs, "exp_avgs", n, false);
  detail::check_list_size(exp_avg_sqs, "exp_avg_sqs", n, false);
  detail::check_list_size(steps, "steps", n, false);
  detail::check_list_size(max_exp_avg_sqs, "max_exp_avg_sqs", n, true);
  detail::check_list_size(master_params, "master_params", n, true);
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0, "beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK(beta2 >= 0.0 && beta2 < 1.0, "beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK(eps > 0.0, "eps must be > 0, got ", eps);
  TORCH_CHECK(sr_seed >= -1 && sr_seed <= 0xffffffffLL, "sr_seed must be -1 (round to nearest) or in [0, 2^32), got ",
              sr_seed);
  check_scalar_f32(lr, "lr", device);
  if (grad_scale) check_scalar_f32(*grad_scale, "grad_scale", device);
  if (found_inf) check_scalar_f32(*found_inf, "found_inf", device);
  if (clip_coef) check_scalar_f32(*clip_coef, "clip_coef", device);

  AdamArgs args;
  args.master = !master_params.empty() && n > 0;
  args.amsgrad = !max_exp_avg_sqs.empty() && n > 0;
  args.stochastic = sr_seed >= 0;
  args.seed = static_cast<uint32_t>(sr_seed);
  TORCH_CHECK(!(args.stochastic && args.master),
              "sr_seed (stochastic rounding) applies to params without master weights; pass master_params=[]");
  args.dtypes.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const std::string arg = item("params", i);
    check_dense(p, arg, device);
    const DType dtype = to_dtype(p.scalar_type(), arg.c_str());
    args.dtypes.push_back(dtype);
    detail::check_like_param(grads[i], item("grads", i), p, i, device);
    TORCH_CHECK(grads[i].scalar_type() == p.scalar_type(), "grads[", i, "] must have the dtype of params[", i, "] (",
                p.scalar_type(), "), got ", grads[i].scalar_type());
    auto check_state = [&](const at::Tensor& t, const char* list) {
      const std::string name = item(list, i);
      TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
      detail::check_like_param(t, name, p, i, device);
    };
    check_state(exp_avgs[i], "exp_avgs");
    check_state(exp_avg_sqs[i], "exp_avg_sqs");
    if (args.amsgrad) check_state(max_exp_avg_sqs[i], "max_exp_avg_sqs");
    if (args.master) {
      check_state(master_params[i], "master_params");
      TORCH_CHECK(dtype != DType::Float32, "master_params[", i, "]: params[", i,
                  "] is float32 and needs no master; call the op separately for fp32 params");
    }
    TORCH_CHECK(!(args.stochastic && dtype == DType::Float16), "params[", i,
                "] is float16: stochastic rounding (sr_seed) is implemented for bfloat16 params only");
    check_scalar_f32(steps[i], item("steps", i).c_str(), device);
  }
  return args;
}

}  // namespace mixprec
