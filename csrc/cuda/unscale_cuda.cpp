// CUDA implementation of mixprec::unscale_and_check_: argument checks and the per-dtype launches.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "../unscale_args.h"
#include "multi_tensor.cuh"
#include "unscale_kernel.h"

namespace mixprec {
namespace {

void unscale_and_check_cuda(at::TensorList grads, const at::Tensor& inv_scale, const at::Tensor& found_inf,
                            const std::optional<at::Tensor>& norm_sq, const std::optional<at::Tensor>& per_tensor_inf,
                            bool check_only) {
  const at::Device device = found_inf.device();
  const std::vector<DType> dtypes = check_unscale_args(grads, inv_scale, found_inf, norm_sq, per_tensor_inf, device);
  // Group by dtype: one launch per group.
  constexpr int kDTypes = 3;
  std::array<std::vector<void*>, kDTypes> addrs;
  std::array<std::vector<int64_t>, kDTypes> numels;
  std::array<std::vector<int32_t>, kDTypes> index;
  int64_t n_total = 0;
  std::vector<int64_t> all_numels;
  for (size_t t = 0; t < grads.size(); ++t) {
    const int g = static_cast<int>(dtypes[t]);
    addrs[g].push_back(grads[t].data_ptr());
    numels[g].push_back(grads[t].numel());
    index[g].push_back(static_cast<int32_t>(t));
    all_numels.push_back(grads[t].numel());
    n_total += grads[t].numel();
  }
  if (n_total == 0) return;

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const int64_t n_chunks = cuda::total_chunks(static_cast<int64_t>(all_numels.size()), all_numels.data());
  at::Tensor partials;
  if (norm_sq) partials = at::empty({n_chunks}, found_inf.options());
  int64_t next_block = 0;
  cudaError_t err = cudaSuccess;
  for (int g = 0; g < kDTypes; ++g) {
    if (addrs[g].empty()) continue;
    next_block = cuda::launch_unscale(static_cast<DType>(g), static_cast<int64_t>(addrs[g].size()), addrs[g].data(),
                                      numels[g].data(), index[g].data(), next_block, inv_scale.data_ptr<float>(),
                                      found_inf.data_ptr<float>(), norm_sq ? partials.data_ptr<float>() : nullptr,
                                      per_tensor_inf ? per_tensor_inf->data_ptr<float>() : nullptr, check_only, stream,
                                      &err);
    C10_CUDA_CHECK(err);
  }
  if (norm_sq) {
    cuda::launch_sum_into(partials.data_ptr<float>(), n_chunks, norm_sq->data_ptr<float>(), stream, &err);
    C10_CUDA_CHECK(err);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(mixprec, CUDA, m) { m.impl("unscale_and_check_", &unscale_and_check_cuda); }

}  // namespace mixprec
