// Launcher of the tensor-core GEMM: c[b] = a[b] @ b_ (+ bias), or c[b] += a[b] @ b_ with fp32 c.
// No torch headers: included by gemm_kernel.cu (nvcc) and gemm_cuda.cpp (host compiler).
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

#include "mixprec/common.h"

namespace mixprec {
namespace cuda {

struct GemmParams {
  DType ab_dtype;     // Float16 or BFloat16: the dtype of a and b
  const void* a;      // [batch, M, K], element (i, m, k) at a + i*a_batch_stride + m*a_stride_m + k*a_stride_k
  const void* b;      // [K, N], shared by every batch
  void* c;            // [batch, M, N]
  const float* bias;  // [N] contiguous fp32 (callers widen a half bias once; it is tiny), or nullptr
  DType c_dtype;      // output dtype; must be Float32 when accumulate
  bool accumulate;    // c += a @ b instead of c = a @ b + bias (bias must be nullptr)
  int64_t batch, M, N, K;
  int64_t a_batch_stride, a_stride_m, a_stride_k;  // strides in elements, any value (including 0 or negative)
  int64_t b_stride_k, b_stride_n;
  int64_t c_batch_stride, c_stride_m;  // c is unit-stride along N (the caller stages other layouts)
};

// Enqueues the GEMM on `stream` and returns cudaGetLastError() after the launch. Picks the 16-byte cp.async
// path when a and b each have a unit stride along M/N or K with the other stride, the extents along the
// contiguous dimension and the base pointers suited to 16-byte chunks; a slower element-wise path otherwise.
cudaError_t launch_gemm(const GemmParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace mixprec
