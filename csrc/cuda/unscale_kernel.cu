#include "multi_tensor.cuh"
#include "mixprec/unscale_math.h"
#include "unscale_kernel.h"

namespace mixprec::cuda {
namespace {

// note: why 512 threads: one 16-byte vector per thread and iteration (the store depends on the load, so a thread
// has one load in flight). Little's law wants ~600-800 ns x 2.0 TB/s / 108 SMs (A100) = 11-15 KB, x 3.35 TB/s / 132
// SMs (H100) = 15-20 KB in flight per SM, of which unscale's reads are half; at 21-40 registers 3-4 blocks fit
// (75-100% occupancy): 1536-2048 threads x 16 B = 24-32 KB of loads in flight, 1.2-2x H100's whole-traffic figure.
// No minimum-blocks bound: __launch_bounds__(kThreads, 2) made ptxas use 32-56 registers (fp32 down to 50%).
constexpr int kThreads = 512;

// Unscale one element in place; returns the square of the value it leaves and raises bad when the unscaled value
// is inf/NaN at `limit` (mixprec/unscale_math.h). write is false for a check pass (check_only, or inv == 1: the
// values would not change), which only reads.
template <DType T>
__device__ __forceinline__ float unscale_one(void* base, int64_t i, float inv, bool write, uint32_t limit, bool& bad) {
  const float g = load_as_float<T>(base, i);
  const float u = unscale_value(g, inv);
  bad |= nonfinite_at(u, limit);
  if (write) store_from_float<T>(base, i, u);
  const float s = write ? u : g;
  return s * s;
}

template <DType T>
__global__ void __launch_bounds__(kThreads) unscale_kernel(TensorListMeta<1> meta, const float* __restrict__ inv_scale,
                                                           float* __restrict__ found_inf, float* __restrict__ partials,
                                                           float* __restrict__ per_tensor_inf, bool check_only) {
  const int slot = meta.block_tensor[blockIdx.x];
  void* base = meta.addr[0][slot];
  const int64_t begin = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kChunkSize;
  const int64_t end = min(meta.numel[slot], begin + kChunkSize);
  const float inv = *inv_scale;
  const bool write = !check_only && inv != 1.f;  // uniform across the grid
  // as stored in T when written; a check pass flags the fp32 products its caller's own unscale will compute
  const uint32_t limit = write ? nonfinite_limit<T>() : kFloat32NonfiniteLimit;
  float acc = 0.f;
  bool bad = false;

  // 16-byte vectors when the tensor is 16-byte aligned (chunk starts then are too: kChunkSize * size % 16 == 0).
  constexpr int kVec = 16 / (T == DType::Float32 ? 4 : 2);
  int64_t i = begin;
  if (reinterpret_cast<uintptr_t>(base) % 16 == 0) {
    const int64_t vec_end = begin + (end - begin) / kVec * kVec;
    for (int64_t v = begin + threadIdx.x * kVec; v < vec_end; v += kThreads * kVec) {
      uint4 packed = *reinterpret_cast<const uint4*>(static_cast<char*>(base) + v * (16 / kVec));
#pragma unroll
      for (int k = 0; k < kVec; ++k) acc += unscale_one<T>(&packed, k, inv, write, limit, bad);
      if (write) *reinterpret_cast<uint4*>(static_cast<char*>(base) + v * (16 / kVec)) = packed;
    }
    i = vec_end;
  }
  for (int64_t j = i + threadIdx.x; j < end; j += kThreads) acc += unscale_one<T>(base, j, inv, write, limit, bad);

  if (partials != nullptr) {
    const float block_total = block_sum<kThreads>(acc);
    if (threadIdx.x == 0) partials[meta.first_block + blockIdx.x] = block_total;
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0) {
    *found_inf = 1.f;  // benign race: every writer writes the same value
    if (per_tensor_inf != nullptr) per_tensor_inf[meta.list_index[slot]] = 1.f;
  }
}

}  // namespace

int64_t launch_unscale(DType dtype, int64_t n_tensors, void* const* addrs, const int64_t* numels,
                       const int32_t* list_index, int64_t first_block, const float* inv_scale, float* found_inf,
                       float* partials, float* per_tensor_inf, bool check_only, cudaStream_t stream,
                       cudaError_t* err) {
  void* const* lists[1] = {addrs};
  auto run = [&](auto kernel) {
    return multi_tensor_apply<1>(
        n_tensors, lists, numels, list_index, first_block,
        [&](const TensorListMeta<1>& meta, int n_blocks) {
          kernel<<<n_blocks, kThreads, 0, stream>>>(meta, inv_scale, found_inf, partials, per_tensor_inf,
                                                    check_only);
        },
        err);
  };
  switch (dtype) {
    case DType::Float32: return run(unscale_kernel<DType::Float32>);
    case DType::Float16: return run(unscale_kernel<DType::Float16>);
    case DType::BFloat16: return run(unscale_kernel<DType::BFloat16>);
  }
  *err = cudaErrorInvalidValue;
  return first_block;
}

}  // namespace mixprec::cuda
