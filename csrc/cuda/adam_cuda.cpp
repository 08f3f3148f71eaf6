// CUDA implementation of mixprec::adam_step_: argument checks, grouping by dtype, the launches.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "../adam_args.h"
#include "adam_kernel.h"

namespace mixprec {
namespace {

const float* ptr_or_null(const std::optional<at::Tensor>& t) { return t ? t->data_ptr<float>() : nullptr; }

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList steps, at::TensorList max_exp_avg_sqs, at::TensorList master_params,
                    at::TensorList param_remainders, at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales,
                    const at::Tensor& lr, double beta1, double beta2, double eps, double weight_decay, bool decoupled,
                    bool maximize, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& clip_coef,
                    int64_t sr_seed) {
  if (params.empty()) return;
  const at::Device device = params[0].device();
  const AdamArgs args =
      check_adam_args(params, grads, exp_avgs, exp_avg_sqs, steps, max_exp_avg_sqs, master_params, param_remainders,
                      exp_avg_scales, exp_avg_sq_scales, lr, beta1, beta2, eps, grad_scale, found_inf, clip_coef,
                      sr_seed, device);
  // One group per dtype, one launch each; the lists hold addresses (unused lists stay empty).
  struct Group {
    std::vector<void*> params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, scales_m, scales_v, steps;
    std::vector<int64_t> numels;
    std::vector<int32_t> index;
  };
  std::array<Group, 3> groups;
  std::vector<void*> all_steps;
  for (size_t t = 0; t < params.size(); ++t) {
    all_steps.push_back(steps[t].data_ptr());
    if (params[t].numel() == 0) continue;
    Group& g = groups[static_cast<int>(args.dtypes[t])];
    g.params.push_back(params[t].data_ptr());
    g.grads.push_back(grads[t].data_ptr());
    g.exp_avgs.push_back(exp_avgs[t].data_ptr());
    g.exp_avg_sqs.push_back(exp_avg_sqs[t].data_ptr());
    if (args.amsgrad) g.max_exp_avg_sqs.push_back(max_exp_avg_sqs[t].data_ptr());
    if (args.master == MasterKind::Fp32) g.masters.push_back(master_params[t].data_ptr());
    if (args.master == MasterKind::Remainder) g.masters.push_back(param_remainders[t].data_ptr());
    if (args.state == StateKind::Int8) {
      g.scales_m.push_back(exp_avg_scales[t].data_ptr());
      g.scales_v.push_back(exp_avg_sq_scales[t].data_ptr());
    }
    g.steps.push_back(steps[t].data_ptr());
    g.numels.push_back(params[t].numel());
    g.index.push_back(static_cast<int32_t>(t));
  }

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  cudaError_t err = cudaSuccess;
  for (int d = 0; d < 3; ++d) {
    const Group& g = groups[d];
    if (g.params.empty()) continue;
    const DType dtype = static_cast<DType>(d);
    const cuda::AdamGroup group{static_cast<int64_t>(g.params.size()),
                                g.params.data(),
                                g.grads.data(),
                                g.exp_avgs.data(),
                                g.exp_avg_sqs.data(),
                                g.max_exp_avg_sqs.data(),
                                g.masters.data(),
                                g.scales_m.data(),
                                g.scales_v.data(),
                                g.steps.data(),
                                g.numels.data(),
                                g.index.data()};
    const cuda::AdamLaunch cfg{dtype,
                               args.master,
                               args.state,
                               args.amsgrad,
                               decoupled,
                               args.stochastic && dtype == DType::BFloat16,
                               args.seed,
                               AdamHyper{beta1, beta2, eps, weight_decay, maximize},
                               AdamFlags{maximize, weight_decay != 0.0},
                               lr.data_ptr<float>(),
                               ptr_or_null(grad_scale),
                               ptr_or_null(found_inf),
                               ptr_or_null(clip_coef)};
    cuda::launch_adam(group, cfg, stream, &err);
    C10_CUDA_CHECK(err);
  }
  // after every group has read the steps
  cuda::launch_adam_count_steps(static_cast<int64_t>(all_steps.size()), all_steps.data(), ptr_or_null(found_inf),
                                stream, &err);
  C10_CUDA_CHECK(err);
}

}  // namespace

TORCH_LIBRARY_IMPL(mixprec, CUDA, m) { m.impl("adam_step_", &adam_step_cuda); }

}  // namespace mixprec
