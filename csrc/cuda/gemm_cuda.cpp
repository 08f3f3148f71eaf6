// CUDA implementation of mixprec::matmul and matmul_accumulate_: argument checks, layout of the operands as
// [batch, M, K] / [K, N] views, and the launch of the tensor-core kernel in gemm_kernel.cu.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../gemm_args.h"
#include "gemm_kernel.h"

namespace mixprec {
namespace {

// True when the batch of x3 [B, rows, cols] can be read as B*rows rows with one row stride.
bool foldable(const at::Tensor& x3) { return x3.size(0) == 1 || x3.stride(0) == x3.size(1) * x3.stride(1); }

// out [..., M, N] (unit stride along N, viewable as [B, M, N]) = or += a @ b (+ bias, fp32).
void run_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out, const at::Tensor* bias32,
              bool accumulate) {
  const int64_t M = a.size(-2), K = a.size(-1), N = b.size(1);
  at::Tensor a3 = a.reshape({-1, M, K});  // a view unless a's batch dims cannot be merged
  at::Tensor out3 = out.view({-1, M, N});
  int64_t batch = a3.size(0), rows = M;
  int64_t a_bs = a3.stride(0), c_bs = out3.stride(0);
  // One GEMM over batch*M rows keeps the tiles full (a linear layer's [batch, seq, features] input).
  if (batch > 1 && foldable(a3) && foldable(out3)) {
    rows = batch * M;
    batch = 1;
  }
  cuda::GemmParams p{};
  p.ab_dtype = to_dtype(a.scalar_type(), "a");
  p.a = a3.data_ptr();
  p.b = b.data_ptr();
  p.c = out3.data_ptr();
  p.bias = bias32 ? bias32->data_ptr<float>() : nullptr;
  p.c_dtype = to_dtype(out.scalar_type(), "out");
  p.accumulate = accumulate;
  p.batch = batch;
  p.M = rows;
  p.N = N;
  p.K = K;
  p.a_batch_stride = a_bs;
  p.a_stride_m = a3.stride(1);
  p.a_stride_k = a3.stride(2);
  p.b_stride_k = b.stride(0);
  p.b_stride_n = b.stride(1);
  p.c_batch_stride = c_bs;
  p.c_stride_m = out3.stride(1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a.device().index()).stream();
  C10_CUDA_CHECK(cuda::launch_gemm(p, stream));
}

at::Tensor matmul_cuda(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias,
                       std::optional<at::ScalarType> out_dtype) {
  const at::ScalarType out_type = check_matmul_args(a, b, bias, out_dtype);
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = at::empty(matmul_out_shape(a, b), a.options().dtype(out_type));
  if (out.numel() == 0) return out;
  // the kernel reads an fp32 bias: widening the [N] vector here is cheaper than a per-dtype epilogue
  at::Tensor bias32;
  if (bias) bias32 = bias->to(at::kFloat).contiguous();
  run_gemm(a, b, out, bias ? &bias32 : nullptr, /*accumulate=*/false);
  return out;
}

void matmul_accumulate_cuda(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b) {
  check_accumulate_args(c, a, b);
  if (c.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t M = a.size(-2), N = b.size(1);
  // The kernel writes rows of unit stride; any other c (a transposed main_grad, say) goes through a copy.
  const at::Tensor c3 = c.reshape({-1, M, N});
  if (c3.is_alias_of(c) && c3.stride(2) == 1) {
    run_gemm(a, b, c3, nullptr, /*accumulate=*/true);
  } else {
    at::Tensor tmp = c.contiguous();
    run_gemm(a, b, tmp, nullptr, /*accumulate=*/true);
    c.copy_(tmp);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(mixprec, CUDA, m) {
  m.impl("matmul", &matmul_cuda);
  m.impl("matmul_accumulate_", &matmul_accumulate_cuda);
}

}  // namespace mixprec
