// Argument checks of adam_step_, shared by its CPU and CUDA implementations.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "mixprec/adam_math.h"
#include "torch_utils.h"

namespace mixprec {

struct AdamArgs {
  MasterKind master = MasterKind::None;  // master_params (fp32) or param_remainders given (one per param)
  StateKind state = StateKind::Fp32;     // from the dtypes of exp_avgs and exp_avg_sqs
  bool amsgrad = false;                  // max_exp_avg_sqs given (one per param)
  bool stochastic = false;               // sr_seed >= 0
  uint32_t seed = 0;
  std::vector<DType> dtypes;  // of each param
};

namespace detail {

inline std::string item(const char* list, size_t i) { return std::string(list) + "[" + std::to_string(i) + "]"; }

// A buffer (or the grad) walked in step with params[i]: same shape and strides.
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

// The state kind the dtypes of exp_avgs[0] and exp_avg_sqs[0] name (every other entry must match them).
inline StateKind state_kind(at::ScalarType m, at::ScalarType v) {
  if (m == at::kFloat && v == at::kFloat) return StateKind::Fp32;
  if (m == at::kBFloat16 && v == at::kBFloat16) return StateKind::BFloat16;
  if (m == at::kChar && v == at::kByte) return StateKind::Int8;
  TORCH_CHECK(false,
              "exp_avgs and exp_avg_sqs must be float32 and float32, bfloat16 and bfloat16, or int8 and uint8 "
              "(block-wise codes), got exp_avgs[0] ", m, " and exp_avg_sqs[0] ", v);
}

// The number of int8 quantization blocks of a tensor: one scale each.
inline int64_t int8_blocks(int64_t numel) { return (numel + kInt8Block - 1) / kInt8Block; }

}  // namespace detail

inline AdamArgs check_adam_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                at::TensorList exp_avg_sqs, at::TensorList steps, at::TensorList max_exp_avg_sqs,
                                at::TensorList master_params, at::TensorList param_remainders,
                                at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales, const at::Tensor& lr,
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
  detail::check_list_size(param_remainders, "param_remainders", n, true);
  detail::check_list_size(exp_avg_scales, "exp_avg_scales", n, true);
  detail::check_list_size(exp_avg_sq_scales, "exp_avg_sq_scales", n, true);
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
  args.amsgrad = !max_exp_avg_sqs.empty() && n > 0;
  args.stochastic = sr_seed >= 0;
  args.seed = static_cast<uint32_t>(sr_seed);
  const bool masters = !master_params.empty() && n > 0, remainders = !param_remainders.empty() && n > 0;
  TORCH_CHECK(!(masters && remainders),
              "master_params and param_remainders are two kinds of master weights: pass one of them, the other empty");
  args.master = masters ? MasterKind::Fp32 : remainders ? MasterKind::Remainder : MasterKind::None;
  TORCH_CHECK(!(args.stochastic && masters),
              "sr_seed (stochastic rounding) applies to params without master weights; pass master_params=[]");
  TORCH_CHECK(!(args.stochastic && remainders),
              "sr_seed (stochastic rounding) applies to params without master weights; pass param_remainders=[]");
  if (n == 0) return args;

  args.state = detail::state_kind(exp_avgs[0].scalar_type(), exp_avg_sqs[0].scalar_type());
  const bool int8 = args.state == StateKind::Int8;
  TORCH_CHECK(!(int8 && args.amsgrad), "amsgrad is not supported with int8 states (max_exp_avg_sqs must be empty)");
  for (const auto& [list, name] : {std::pair{exp_avg_scales, "exp_avg_scales"},
                                   std::pair{exp_avg_sq_scales, "exp_avg_sq_scales"}}) {
    TORCH_CHECK(!int8 || !list.empty(), name, " must have one tensor per param (", n,
                ") with int8 states (exp_avgs int8, exp_avg_sqs uint8), got none");
    TORCH_CHECK(int8 || list.empty(), name, " must be empty unless the states are int8 (exp_avgs int8, exp_avg_sqs "
                "uint8); got exp_avgs of ", exp_avgs[0].scalar_type());
  }

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
    // a buffer of `dtype` walked with params[i]; `why` says where the dtype comes from
    auto check_buffer = [&](const at::Tensor& t, const char* list, at::ScalarType want, const char* why) {
      const std::string name = item(list, i);
      TORCH_CHECK(t.scalar_type() == want, name, " must be ", want, why, ", got ", t.scalar_type());
      detail::check_like_param(t, name, p, i, device);
    };
    const char* one_kind = " (one state kind per call, as exp_avgs[0] and exp_avg_sqs[0])";
    check_buffer(exp_avgs[i], "exp_avgs", exp_avgs[0].scalar_type(), one_kind);
    check_buffer(exp_avg_sqs[i], "exp_avg_sqs", exp_avg_sqs[0].scalar_type(), one_kind);
    if (args.amsgrad) {
      check_buffer(max_exp_avg_sqs[i], "max_exp_avg_sqs", exp_avg_sqs[0].scalar_type(), " (the dtype of exp_avg_sqs)");
    }
    if (masters) {
      check_buffer(master_params[i], "master_params", at::kFloat, "");
      TORCH_CHECK(dtype != DType::Float32, "master_params[", i, "]: params[", i,
                  "] is float32 and needs no master; call the op separately for fp32 params");
    }
    if (remainders) {
      TORCH_CHECK(dtype == DType::BFloat16, "param_remainders[", i, "]: params[", i,
                  "] must be bfloat16 (a remainder holds the low 16 bits of an fp32 master under a bf16 param), got ",
                  p.scalar_type());
      check_buffer(param_remainders[i], "param_remainders", at::kShort, "");
    }
    if (int8) {
      const int64_t blocks = detail::int8_blocks(p.numel());
      for (const auto& [list, name] : {std::pair{exp_avg_scales, "exp_avg_scales"},
                                       std::pair{exp_avg_sq_scales, "exp_avg_sq_scales"}}) {
        const at::Tensor& s = list[i];
        const std::string sname = item(name, i);
        TORCH_CHECK(s.scalar_type() == at::kFloat, sname, " must be float32, got ", s.scalar_type());
        TORCH_CHECK(s.device() == device, sname, " must be on ", device, ", got ", s.device());
        TORCH_CHECK(s.layout() == at::kStrided && s.dim() == 1 && s.is_contiguous() && s.numel() == blocks, sname,
                    " must be a contiguous 1-D tensor of ", blocks, " elements (one scale per ", kInt8Block,
                    "-element block of params[", i, "], ", p.numel(), " elements), got shape ", s.sizes(),
                    s.is_contiguous() ? "" : " (not contiguous)");
      }
    }
    TORCH_CHECK(!(args.stochastic && dtype == DType::Float16), "params[", i,
                "] is float16: stochastic rounding (sr_seed) is implemented for bfloat16 params only");
    check_scalar_f32(steps[i], item("steps", i).c_str(), device);
  }
  return args;
}

}  // namespace mixprec
