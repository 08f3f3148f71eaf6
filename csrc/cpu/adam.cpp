// CPU implementation of mixprec::adam_step_.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "../adam_args.h"
#include "adam_kernel.h"
#include "cpu_features.h"

namespace mixprec {
namespace {

// note: blocks of 32K elements (~900 KB of traffic for fp16 params with masters) amortize the scheduling and
// balance across cores; each element's update is independent, so results do not depend on the thread count.
// A multiple of the int8 quantization block, so that a thread owns each quantization block whole.
constexpr int64_t kBlock = 32768;
static_assert(kBlock % kInt8Block == 0, "CPU blocks hold whole quantization blocks");

struct Block {
  int64_t tensor, begin, size;
};

template <class T>
T* offset(T* base, int64_t elements, int element_size) {
  return reinterpret_cast<T*>(reinterpret_cast<uintptr_t>(base) + elements * element_size);
}

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList steps, at::TensorList max_exp_avg_sqs, at::TensorList master_params,
                   at::TensorList param_remainders, at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales,
                   const at::Tensor& lr, double beta1, double beta2, double eps, double weight_decay, bool decoupled,
                   bool maximize, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& clip_coef,
                   int64_t sr_seed) {
  const at::Device device(at::kCPU);
  const AdamArgs args =
      check_adam_args(params, grads, exp_avgs, exp_avg_sqs, steps, max_exp_avg_sqs, master_params, param_remainders,
                      exp_avg_scales, exp_avg_sq_scales, lr, beta1, beta2, eps, grad_scale, found_inf, clip_coef,
                      sr_seed, device);
  // A skipped step writes nothing at all, the step counts included.
  if (found_inf && found_inf->data_ptr<float>()[0] != 0.f) return;

  const AdamHyper hyper{beta1, beta2, eps, weight_decay, maximize};
  const AdamFlags flags{maximize, weight_decay != 0.0};
  const float grad_factor = adam_grad_factor(grad_scale ? grad_scale->data_ptr<float>() : nullptr,
                                             clip_coef ? clip_coef->data_ptr<float>() : nullptr);
  const double lr_value = lr.data_ptr<float>()[0];
  const size_t n = params.size();
  std::vector<AdamCoeffs<float>> coeffs(n);
  std::vector<uint32_t> keys(n);
  std::vector<Block> blocks;
  for (size_t t = 0; t < n; ++t) {
    const float step = steps[t].data_ptr<float>()[0] + 1.f;  // this update's number
    coeffs[t] = adam_coeffs(hyper, lr_value, step, grad_factor);
    keys[t] = sr_key(args.seed, static_cast<uint32_t>(t), static_cast<uint32_t>(step));
    for (int64_t b = 0; b < params[t].numel(); b += kBlock) {
      blocks.push_back({static_cast<int64_t>(t), b, std::min(kBlock, params[t].numel() - b)});
    }
  }
  const int state_size = args.state == StateKind::Fp32 ? 4 : args.state == StateKind::BFloat16 ? 2 : 1;
  const CpuSimd simd = cpu_simd();
  // note: blocks are handed out one at a time from a shared counter rather than split statically by
  // at::parallel_for: a core slowed by another process (2 shared cores here) then takes fewer blocks
  // instead of making the whole step wait for its fixed half. Which thread updates a block does not change
  // any result.
  // note: a thread only when it gets >= 4 blocks of work: waking a worker (and, on a loaded machine, waiting
  // for it to be scheduled at all) costs more than a small update (200 tiny tensors took 8 ms on 2 threads
  // with the other core busy, 0.3 ms on one).
  const int64_t n_blocks = static_cast<int64_t>(blocks.size());
  int64_t total = 0;
  for (const Block& b : blocks) total += b.size;
  const int64_t workers = std::clamp<int64_t>(total / (4 * kBlock), 1, at::get_num_threads());
  std::atomic<int64_t> next_block{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t i = next_block.fetch_add(1, std::memory_order_relaxed); i < n_blocks;
         i = next_block.fetch_add(1, std::memory_order_relaxed)) {
      const Block& b = blocks[i];
      const size_t t = static_cast<size_t>(b.tensor);
      const int size = dtype_size(args.dtypes[t]);
      const bool int8 = args.state == StateKind::Int8;
      const int64_t quant_block = b.begin / kInt8Block;
      cpu::AdamBlock block{
          offset(params[t].data_ptr(), b.begin, size),
          offset(static_cast<const void*>(grads[t].data_ptr()), b.begin, size),
          offset(exp_avgs[t].data_ptr(), b.begin, state_size),
          offset(exp_avg_sqs[t].data_ptr(), b.begin, state_size),
          args.amsgrad ? offset(max_exp_avg_sqs[t].data_ptr(), b.begin, state_size) : nullptr,
          args.master == MasterKind::Fp32 ? offset(master_params[t].data_ptr<float>(), b.begin, 4) : nullptr,
          args.master == MasterKind::Remainder ? offset(param_remainders[t].data_ptr<int16_t>(), b.begin, 2) : nullptr,
          int8 ? exp_avg_scales[t].data_ptr<float>() + quant_block : nullptr,
          int8 ? exp_avg_sq_scales[t].data_ptr<float>() + quant_block : nullptr,
          b.size,
          b.begin,
          keys[t]};
      const cpu::AdamVariant variant{args.dtypes[t], args.master, args.state, args.amsgrad, decoupled,
                                     args.stochastic && args.dtypes[t] == DType::BFloat16};
      cpu::adam_block(block, variant, coeffs[t], flags, simd);
    }
  });
  for (size_t t = 0; t < n; ++t) steps[t].data_ptr<float>()[0] += 1.f;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixprec, CPU, m) { m.impl("adam_step_", &adam_step_cpu); }

}  // namespace mixprec
