#include "multi_tensor.cuh"

namespace mixprec::cuda {
namespace {

// note: why one block of 512 threads: the second level of the deterministic norm reduction reads one partial per
// 64K-element chunk (~1.9K floats, 7.6 KB, for 124M gradients): bound by its launch and the block_sum, not by
// bandwidth, so one block of 16 warps, each thread summing its strided share in a fixed order. At 31 registers the
// estimate is 100% (4 such blocks would fit an SM); only one runs.
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
