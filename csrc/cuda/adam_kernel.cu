#include <type_traits>
#include <vector>

#include "adam_kernel.h"
#include "mixprec/adam_dispatch.h"
#include "multi_tensor.cuh"

namespace mixprec::cuda {
namespace {

// note: why 512 threads and 8 elements per thread: one 16-byte load of a half buffer and two of each fp32 one per
// thread and iteration, 96-160 B in flight per thread (by dtype, masters and amsgrad). Little's law wants ~600-800 ns
// x 2.0 TB/s / 108 SMs (A100) = 11-15 KB, x 3.35 TB/s / 132 SMs (H100) = 15-20 KB in flight per SM; the 2 blocks
// that fit at 47-59 registers (50% occupancy) give 1024 threads x 96-160 B = 96-160 KB, several times that, so a
// third block would buy nothing. Above 64 registers it would be 1 block (25%), which the occupancy test in
// tests/test_cli.py catches. __launch_bounds__(kThreads, 2) is not used: it makes ptxas spend its 64-register
// budget (52-62 registers, other SASS) for no gain in occupancy.
constexpr int kThreads = 512;
constexpr int kILP = 8;
static_assert(sizeof(TensorListMeta<7>) <= 4096, "kernel args too large");
static_assert(kChunkSize % kILP == 0, "chunk starts must stay 16-byte aligned");

// Slots of the multi-tensor lists, by variant (unused lists take no slot).
template <bool kMaster, bool kAmsgrad>
struct Lists {
  static constexpr int kParam = 0, kGrad = 1, kExpAvg = 2, kExpAvgSq = 3;
  static constexpr int kMaxExpAvgSq = 4;             // if kAmsgrad
  static constexpr int kMasterIdx = 4 + kAmsgrad;    // if kMaster
  static constexpr int kStep = 4 + kAmsgrad + kMaster;
  static constexpr int kDepth = kStep + 1;
};

// kILP consecutive elements of a buffer of storage type T, moved with 16-byte loads and stores.
template <DType T>
struct Packet {
  static constexpr int kWords = kILP * (T == DType::Float32 ? 4 : 2) / 16;
  uint4 words[kWords];
  __device__ __forceinline__ void load(const void* base, int64_t i) {
    const uint4* src = reinterpret_cast<const uint4*>(static_cast<const char*>(base) + i * dtype_size(T));
#pragma unroll
    for (int w = 0; w < kWords; ++w) words[w] = src[w];
  }
  __device__ __forceinline__ void store(void* base, int64_t i) const {
    uint4* dst = reinterpret_cast<uint4*>(static_cast<char*>(base) + i * dtype_size(T));
#pragma unroll
    for (int w = 0; w < kWords; ++w) dst[w] = words[w];
  }
  __device__ __forceinline__ float get(int k) const { return load_as_float<T>(words, k); }
  __device__ __forceinline__ void set(int k, float v) { store_from_float<T>(words, k, v); }
};

template <DType T, bool kMaster, bool kAmsgrad, bool kDecoupled, bool kStochastic>
__global__ void __launch_bounds__(kThreads)
    adam_kernel(TensorListMeta<Lists<kMaster, kAmsgrad>::kDepth> meta, AdamHyper hyper, AdamFlags flags,
                const float* __restrict__ lr, const float* __restrict__ grad_scale,
                const float* __restrict__ found_inf, const float* __restrict__ clip_coef, uint32_t seed) {
  using L = Lists<kMaster, kAmsgrad>;
  if (found_inf != nullptr && *found_inf != 0.f) return;  // a skipped step writes nothing
  const int slot = meta.block_tensor[blockIdx.x];
  void* param = meta.addr[L::kParam][slot];
  const void* grad = meta.addr[L::kGrad][slot];
  float* exp_avg = static_cast<float*>(meta.addr[L::kExpAvg][slot]);
  float* exp_avg_sq = static_cast<float*>(meta.addr[L::kExpAvgSq][slot]);
  float* max_exp_avg_sq = kAmsgrad ? static_cast<float*>(meta.addr[L::kMaxExpAvgSq][slot]) : nullptr;
  float* master = kMaster ? static_cast<float*>(meta.addr[L::kMasterIdx][slot]) : nullptr;
  const float step = *static_cast<const float*>(meta.addr[L::kStep][slot]) + 1.f;
  const AdamCoeffs<float> c = adam_coeffs(hyper, *lr, step, adam_grad_factor(grad_scale, clip_coef));
  const uint32_t key =
      kStochastic ? sr_key(seed, static_cast<uint32_t>(meta.list_index[slot]), static_cast<uint32_t>(step)) : 0u;

  const int64_t begin = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kChunkSize;
  const int64_t end = min(meta.numel[slot], begin + kChunkSize);

  // One element, for the tail and for buffers that are not 16-byte aligned.
  auto update_one = [&](int64_t i) {
    AdamSlots<float> s;
    s.param = kMaster ? master[i] : load_as_float<T>(param, i);
    s.grad = load_as_float<T>(grad, i);
    s.exp_avg = exp_avg[i];
    s.exp_avg_sq = exp_avg_sq[i];
    if constexpr (kAmsgrad) s.max_exp_avg_sq = max_exp_avg_sq[i];
    adam_update<kDecoupled, kAmsgrad>(s, c, flags);
    exp_avg[i] = s.exp_avg;
    exp_avg_sq[i] = s.exp_avg_sq;
    if constexpr (kAmsgrad) max_exp_avg_sq[i] = s.max_exp_avg_sq;
    if constexpr (kMaster) master[i] = s.param;
    store_param<T, kStochastic>(param, i, s.param, key, static_cast<uint64_t>(i));
  };

  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  bool vectorizable = aligned(param) && aligned(grad) && aligned(exp_avg) && aligned(exp_avg_sq);
  if constexpr (kAmsgrad) vectorizable = vectorizable && aligned(max_exp_avg_sq);
  if constexpr (kMaster) vectorizable = vectorizable && aligned(master);
  int64_t tail = begin;
  if (vectorizable) {
    const int64_t vec_end = begin + (end - begin) / kILP * kILP;
    for (int64_t i = begin + threadIdx.x * kILP; i < vec_end; i += kThreads * kILP) {
      Packet<T> p, g;
      Packet<DType::Float32> m, v, vmax, w;
      if constexpr (kMaster) w.load(master, i);
      else p.load(param, i);
      g.load(grad, i);
      m.load(exp_avg, i);
      v.load(exp_avg_sq, i);
      if constexpr (kAmsgrad) vmax.load(max_exp_avg_sq, i);
#pragma unroll
      for (int k = 0; k < kILP; ++k) {
        AdamSlots<float> s;
        s.param = kMaster ? w.get(k) : p.get(k);
        s.grad = g.get(k);
        s.exp_avg = m.get(k);
        s.exp_avg_sq = v.get(k);
        if constexpr (kAmsgrad) s.max_exp_avg_sq = vmax.get(k);
        adam_update<kDecoupled, kAmsgrad>(s, c, flags);
        m.set(k, s.exp_avg);
        v.set(k, s.exp_avg_sq);
        if constexpr (kAmsgrad) vmax.set(k, s.max_exp_avg_sq);
        if constexpr (kMaster) w.set(k, s.param);
        store_param<T, kStochastic>(p.words, k, s.param, key, static_cast<uint64_t>(i + k));
      }
      m.store(exp_avg, i);
      v.store(exp_avg_sq, i);
      if constexpr (kAmsgrad) vmax.store(max_exp_avg_sq, i);
      if constexpr (kMaster) w.store(master, i);
      p.store(param, i);
    }
    tail = vec_end;
  }
  for (int64_t i = tail + threadIdx.x; i < end; i += kThreads) update_one(i);
}

// note: why one block of 128 threads per launch, a thread per step count: the kernel moves 8 bytes per tensor, so
// it is bound by its launch, not by bandwidth; a block per tensor (the former 32-thread blocks with one thread
// working) put 1 warp per block, at most 50% occupancy (32 blocks per SM), and launched as many blocks as tensors.
// A launch holds at most ListCapacity<1>::tensors (110) tensors of one chunk each; the loop covers any number.
constexpr int kCountThreads = 128;

__global__ void __launch_bounds__(kCountThreads)
    count_steps_kernel(TensorListMeta<1> meta, int n_counts, const float* __restrict__ found_inf) {
  if (found_inf != nullptr && *found_inf != 0.f) return;
  // a step count is one element: one chunk, so chunk b of this launch is tensor slot meta.block_tensor[b]
  for (int b = threadIdx.x; b < n_counts; b += kCountThreads)
    *static_cast<float*>(meta.addr[0][meta.block_tensor[b]]) += 1.f;
}

template <DType T, bool kMaster, bool kAmsgrad, bool kDecoupled, bool kStochastic>
void launch_variant(const AdamGroup& g, const AdamLaunch& cfg, cudaStream_t stream, cudaError_t* err) {
  using L = Lists<kMaster, kAmsgrad>;
  void* const* lists[L::kDepth];
  lists[L::kParam] = g.params;
  lists[L::kGrad] = g.grads;
  lists[L::kExpAvg] = g.exp_avgs;
  lists[L::kExpAvgSq] = g.exp_avg_sqs;
  if constexpr (kAmsgrad) lists[L::kMaxExpAvgSq] = g.max_exp_avg_sqs;
  if constexpr (kMaster) lists[L::kMasterIdx] = g.masters;
  lists[L::kStep] = g.steps;
  multi_tensor_apply<L::kDepth>(
      g.n_tensors, lists, g.numels, g.list_index, 0,
      [&](const TensorListMeta<L::kDepth>& meta, int n_blocks) {
        adam_kernel<T, kMaster, kAmsgrad, kDecoupled, kStochastic><<<n_blocks, kThreads, 0, stream>>>(
            meta, cfg.hyper, cfg.flags, cfg.lr, cfg.grad_scale, cfg.found_inf, cfg.clip_coef, cfg.seed);
      },
      err);
}

}  // namespace

void launch_adam(const AdamGroup& group, const AdamLaunch& cfg, cudaStream_t stream, cudaError_t* err) {
  *err = cudaErrorInvalidValue;  // a combination the op refuses (see csrc/adam_args.h) is never launched
  dispatch_adam_variant(cfg.dtype, cfg.master, cfg.amsgrad, cfg.decoupled, cfg.stochastic,
                        [&](auto T, auto master, auto amsgrad, auto decoupled, auto stochastic) {
                          launch_variant<T, master, amsgrad, decoupled, stochastic>(group, cfg, stream, err);
                        });
}

void launch_adam_count_steps(int64_t n_tensors, void* const* steps, const float* found_inf, cudaStream_t stream,
                             cudaError_t* err) {
  const std::vector<int64_t> ones(n_tensors, 1);
  std::vector<int32_t> index(n_tensors);
  for (int64_t t = 0; t < n_tensors; ++t) index[t] = static_cast<int32_t>(t);
  void* const* lists[1] = {steps};
  *err = cudaSuccess;
  multi_tensor_apply<1>(
      n_tensors, lists, ones.data(), index.data(), 0,
      [&](const TensorListMeta<1>& meta, int n_blocks) {
        count_steps_kernel<<<1, kCountThreads, 0, stream>>>(meta, n_blocks, found_inf);
      },
      err);
}

}  // namespace mixprec::cuda
