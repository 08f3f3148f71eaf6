// Multi-tensor apply: one kernel launch walks a whole list of tensors in fixed-size chunks, the tensor
// addresses travelling in the kernel's argument block (as PyTorch's and apex's multi_tensor_apply do).
// Torch-free: the launcher takes raw addresses and sizes.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace mixprec::cuda {

// note: 64K elements per chunk keeps a block busy long enough to hide its start-up cost while giving
// thousands of blocks for a large model; the chunk grid (not the launch count) fixes the reduction order.
constexpr int64_t kChunkSize = 65536;

// Sizes chosen so that the argument block stays under the classic 4 KB kernel-parameter limit.
template <int Depth>
struct ListCapacity;
template <> struct ListCapacity<1> { static constexpr int tensors = 110, blocks = 320; };
template <> struct ListCapacity<2> { static constexpr int tensors = 64, blocks = 320; };
template <> struct ListCapacity<3> { static constexpr int tensors = 48, blocks = 320; };
template <> struct ListCapacity<4> { static constexpr int tensors = 36, blocks = 320; };
template <> struct ListCapacity<5> { static constexpr int tensors = 30, blocks = 320; };
template <> struct ListCapacity<6> { static constexpr int tensors = 24, blocks = 320; };
template <> struct ListCapacity<7> { static constexpr int tensors = 20, blocks = 320; };  // adam: 6 buffers + step
template <> struct ListCapacity<8> { static constexpr int tensors = 20, blocks = 320; };  // adam int8: 7 + step

template <int Depth>
struct TensorListMeta {
  static constexpr int kMaxTensors = ListCapacity<Depth>::tensors;
  static constexpr int kMaxBlocks = ListCapacity<Depth>::blocks;
  void* addr[Depth][kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t list_index[kMaxTensors];    // the tensor's index in the caller's whole list
  uint8_t block_tensor[kMaxBlocks];   // which tensor (slot in this launch) each block works on
  int32_t block_chunk[kMaxBlocks];    // which chunk of that tensor
  int64_t first_block;                // global index of this launch's first block (for per-block outputs)
};
static_assert(sizeof(TensorListMeta<1>) <= 4096 && sizeof(TensorListMeta<8>) <= 4096, "kernel args too large");

// Calls launch(meta, n_blocks) as often as needed to cover every chunk of every tensor.
// addrs[d][t]: address of list d's tensor t; tensors of size 0 are skipped. Blocks are numbered globally
// from first_block upward, in tensor-then-chunk order, whatever the number of launches; returns the next
// free global block index. Stops at the first launch error, which it returns through *err.
template <int Depth, class Launch>
int64_t multi_tensor_apply(int64_t n_tensors, void* const* const* addrs, const int64_t* numels,
                           const int32_t* list_index, int64_t first_block, Launch&& launch, cudaError_t* err) {
  using Meta = TensorListMeta<Depth>;
  Meta meta;
  int n_local = 0, n_blocks = 0;
  meta.first_block = first_block;
  *err = cudaSuccess;
  for (int64_t t = 0; t < n_tensors; ++t) {
    const int64_t n = numels[t];
    if (n == 0) continue;
    for (int d = 0; d < Depth; ++d) meta.addr[d][n_local] = addrs[d][t];
    meta.numel[n_local] = n;
    meta.list_index[n_local] = list_index[t];
    const int64_t chunks = (n + kChunkSize - 1) / kChunkSize;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_tensor[n_blocks] = static_cast<uint8_t>(n_local);
      meta.block_chunk[n_blocks] = static_cast<int32_t>(c);
      ++n_blocks;
      const bool blocks_full = n_blocks == Meta::kMaxBlocks;
      const bool tensors_full = n_local + 1 == Meta::kMaxTensors && c + 1 == chunks;
      if (blocks_full || tensors_full) {
        launch(meta, n_blocks);
        if ((*err = cudaGetLastError()) != cudaSuccess) return first_block;
        first_block += n_blocks;
        meta.first_block = first_block;
        n_blocks = 0;
        if (c + 1 < chunks) {  // the tensor continues in the next launch, in slot 0
          for (int d = 0; d < Depth; ++d) meta.addr[d][0] = meta.addr[d][n_local];
          meta.numel[0] = meta.numel[n_local];
          meta.list_index[0] = meta.list_index[n_local];
          n_local = 0;
        } else {
          n_local = -1;  // the next tensor starts at slot 0
        }
      }
    }
    ++n_local;
  }
  if (n_blocks > 0) {
    launch(meta, n_blocks);
    *err = cudaGetLastError();
    first_block += n_blocks;
  }
  return first_block;
}

// Total number of chunks (blocks) the list needs: the size of a per-block output buffer.
inline int64_t total_chunks(int64_t n_tensors, const int64_t* numels) {
  int64_t total = 0;
  for (int64_t t = 0; t < n_tensors; ++t) total += (numels[t] + kChunkSize - 1) / kChunkSize;
  return total;
}

#if defined(__CUDACC__)
// Deterministic block-wide sum: fixed shuffle tree within warps, fixed order across warps.
// All threads of the block must call it; the result is valid in thread 0.
template <int kThreads>
__device__ __forceinline__ float block_sum(float v) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block size");
  __shared__ float warp_sums[kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  float total = 0.f;
  if (warp == 0) {
    total = lane < kThreads / 32 ? warp_sums[lane] : 0.f;
    for (int offset = 16; offset > 0; offset /= 2) total += __shfl_down_sync(0xffffffffu, total, offset);
  }
  __syncthreads();  // warp_sums may be reused by a second call
  return total;
}

#endif  // __CUDACC__

// *out += sum(values[0..n)), in one block, in a fixed order: the second level of a deterministic reduction.
void launch_sum_into(const float* values, int64_t n, float* out, cudaStream_t stream, cudaError_t* err);

}  // namespace mixprec::cuda
