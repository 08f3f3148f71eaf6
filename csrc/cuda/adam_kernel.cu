#include <type_traits>
#include <vector>

#include "adam_kernel.h"
#include "mixprec/adam_dispatch.h"
#include "multi_tensor.cuh"

namespace mixprec::cuda {
namespace {

constexpr int kThreads = 512;
// note: 8 elements per thread and iteration: one 16-byte load of a half buffer, two of an fp32 one, and
// enough independent loads in flight per thread to approach the memory bandwidth.
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

constexpr int kCountThreads = 32;

__global__ void __launch_bounds__(kCountThreads)
    count_steps_kernel(TensorListMeta<1> meta, const float* __restrict__ found_inf) {
  if (found_inf != nullptr && *found_inf != 0.f) return;
  if (threadIdx.x == 0) *static_cast<float*>(meta.addr[0][meta.block_tensor[blockIdx.x]]) += 1.f;
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
        count_steps_kernel<<<n_blocks, kCountThreads, 0, stream>>>(meta, found_inf);
      },
      err);
}

}  // namespace mixprec::cuda
