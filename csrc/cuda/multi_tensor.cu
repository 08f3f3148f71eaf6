#include "multi_tensor.cuh"

namespace mixprec::cuda {
namespace {

constexpr int kSumThreads = 512;

__global__ void __launch_bounds__(kSumThreads) sum_into_kernel(const float* __restrict__ values, int64_t n, float* __restrict__ out) {
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += kSumThreads) acc += values[i];  // fixed per-thread order
  const float total = block_sum<kSumThreads>(acc);
  if (threadIdx.x == 0) *out += total;
}

}  // namespace

void launch_sum_into(const float* values, int64_t n, float* out, cudaStream_t stream, cudaError_t* err) {
  sum_into_kernel<<<1, kSumThreads, 0, stream>>>(values, n, out);
  *err = cudaGetLastError();
}

}  // namespace mixprec::cuda
