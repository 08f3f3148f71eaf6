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
// tests/test_cli.py catches: __launch_bounds__(kThreads, 2) holds ptxas to 64. (Without it, the heaviest of the 70
// variants, fp32 amsgrad states and the remainder/int8 ones, took up to 74 on sm_90; with it none spills, 38-64.)
// With int8 states the 8 elements of a lane line up with the quantization blocks: a warp's 32 lanes cover one
// 256-element block (kInt8Block), whose absmax is then a warp reduction (no shared memory, no block barrier).
constexpr int kThreads = 512;
constexpr int kILP = 8;
constexpr int kWarpElements = 32 * kILP;
static_assert(sizeof(TensorListMeta<8>) + sizeof(AdamHyper) + 64 <= 4096, "kernel args too large");
static_assert(kChunkSize % kILP == 0, "chunk starts must stay 16-byte aligned");
static_assert(kWarpElements == kInt8Block && kChunkSize % kInt8Block == 0,
              "a warp step is one quantization block, and chunks hold whole blocks");

// Slots of the multi-tensor lists, by variant (unused lists take no slot).
template <MasterKind M, StateKind S, bool kAmsgrad>
struct Lists {
  static constexpr bool kHasMaster = M != MasterKind::None, kInt8 = S == StateKind::Int8;
  static constexpr int kParam = 0, kGrad = 1, kExpAvg = 2, kExpAvgSq = 3;
  static constexpr int kMaxExpAvgSq = 4;                      // if kAmsgrad
  static constexpr int kMasterIdx = 4 + kAmsgrad;             // fp32 master or int16 remainder, if kHasMaster
  static constexpr int kScaleM = kMasterIdx + kHasMaster;     // if kInt8
  static constexpr int kScaleV = kScaleM + 1;                 // if kInt8
  static constexpr int kStep = kScaleM + 2 * kInt8;
  static constexpr int kDepth = kStep + 1;
};

// Raw element type of a buffer with kBytes-byte elements.
template <int kBytes>
using ElemOf = std::conditional_t<kBytes == 4, uint32_t, std::conditional_t<kBytes == 2, uint16_t, uint8_t>>;

// kILP consecutive elements of one buffer, kBytes each, in registers, moved with 16-byte accesses (8-byte for
// 1-byte elements): the fast path, for whole groups of aligned buffers.
template <int kBytes>
struct Packet {
  static constexpr int kTotal = kILP * kBytes;
  using Word = std::conditional_t<(kTotal >= 16), uint4, uint2>;
  static constexpr int kWords = kTotal / static_cast<int>(sizeof(Word));
  using Elem = ElemOf<kBytes>;
  Word words[kWords];
  __device__ __forceinline__ uint32_t get(int k) const { return reinterpret_cast<const Elem*>(words)[k]; }
  __device__ __forceinline__ void set(int k, uint32_t bits) { reinterpret_cast<Elem*>(words)[k] = static_cast<Elem>(bits); }
  __device__ __forceinline__ void load(const void* base, int i) {
#pragma unroll
    for (int w = 0; w < kWords; ++w) words[w] = reinterpret_cast<const Word*>(static_cast<const Elem*>(base) + i)[w];
  }
  __device__ __forceinline__ void store(void* base, int i) const {
#pragma unroll
    for (int w = 0; w < kWords; ++w) reinterpret_cast<Word*>(static_cast<Elem*>(base) + i)[w] = words[w];
  }
};

// The same accessors straight on memory: element k of a buffer is at[k] (the slow paths: a tensor's partial last
// group, misaligned views), one element access each.
template <int kBytes>
struct Direct {
  ElemOf<kBytes>* at;
  __device__ __forceinline__ uint32_t get(int k) const { return at[k]; }
  __device__ __forceinline__ void set(int k, uint32_t bits) const { at[k] = static_cast<ElemOf<kBytes>>(bits); }
};
template <int kBytes>
__device__ __forceinline__ Direct<kBytes> direct(const void* base, int i) {
  return {const_cast<ElemOf<kBytes>*>(static_cast<const ElemOf<kBytes>*>(base)) + i};
}

// direct(base, i) where the variant has the buffer (kHas), else a stand-in the element code never touches (no
// arithmetic on the null pointer of an absent buffer).
template <bool kHas, int kBytes, class Other>
__device__ __forceinline__ auto direct_if(const void* base, int i, const Other& other) {
  if constexpr (kHas) return direct<kBytes>(base, i);
  else return other;
}

// fp32 value of raw element bits of storage type T, and back (round to nearest even).
template <DType T>
__device__ __forceinline__ float widen(uint32_t bits) {
  if constexpr (T == DType::Float32) return bits_float(bits);
  else if constexpr (T == DType::Float16) return half_to_float(static_cast<uint16_t>(bits));
  else return bf16_to_float(static_cast<uint16_t>(bits));
}
template <DType T>
__device__ __forceinline__ uint32_t narrow(float v) {
  if constexpr (T == DType::Float32) return float_bits(v);
  else if constexpr (T == DType::Float16) return float_to_half_rne(v);
  else return float_to_bf16_rne(v);
}

// The variant's loads and stores of one element (k of its accessors: packets or Direct), around adam_update;
// written once for every path of the kernel.
// The storage type of fp32 / bf16 states (int8 codes are read apart).
template <StateKind S>
inline constexpr DType kStateDType = S == StateKind::BFloat16 ? DType::BFloat16 : DType::Float32;

template <DType T, MasterKind M, StateKind S, bool kAmsgrad, bool kDecoupled, bool kStochastic>
struct Element {

  template <class P, class G, class W, class Q>
  __device__ __forceinline__ static AdamSlots<float> load(const P& p, const G& g, const W& w, const Q& m, const Q& v,
                                                          const Q& vmax, int k, float scale_m, float scale_v) {
    AdamSlots<float> s;
    if constexpr (M == MasterKind::Fp32) s.param = bits_float(w.get(k));
    else if constexpr (M == MasterKind::Remainder)
      s.param = remainder_join(p.get(k) << 16, static_cast<uint32_t>(static_cast<int32_t>(static_cast<int16_t>(w.get(k)))));
    else s.param = widen<T>(p.get(k));
    s.grad = widen<T>(g.get(k));
    if constexpr (S == StateKind::Int8) {
      s.exp_avg = int8_decode(int8_value_hi16_m(static_cast<uint32_t>(static_cast<int32_t>(static_cast<int8_t>(m.get(k)))))
                                  << 16, scale_m);
      s.exp_avg_sq = int8_decode(int8_value_hi16_v(v.get(k)) << 16, scale_v);
    } else {
      s.exp_avg = widen<kStateDType<S>>(m.get(k));
      s.exp_avg_sq = widen<kStateDType<S>>(v.get(k));
      if constexpr (kAmsgrad) s.max_exp_avg_sq = widen<kStateDType<S>>(vmax.get(k));
    }
    return s;
  }

  // Everything but int8 codes (stored once the block's scale is known). index: the element's, for SR.
  template <class P, class W, class Q>
  __device__ __forceinline__ static void store(P& p, W& w, Q& m, Q& v, Q& vmax, int k, const AdamSlots<float>& s,
                                               uint32_t key, int64_t index) {
    if constexpr (S != StateKind::Int8) {
      m.set(k, narrow<kStateDType<S>>(s.exp_avg));
      v.set(k, narrow<kStateDType<S>>(s.exp_avg_sq));
      if constexpr (kAmsgrad) vmax.set(k, narrow<kStateDType<S>>(s.max_exp_avg_sq));
    }
    if constexpr (M == MasterKind::Fp32) {
      w.set(k, float_bits(s.param));
      p.set(k, narrow<T>(s.param));
    } else if constexpr (M == MasterKind::Remainder) {
      const auto split = remainder_split(s.param);
      p.set(k, split.param >> 16);
      w.set(k, split.remainder);
    } else if constexpr (kStochastic) {
      p.set(k, bf16_sr_bits(s.param, sr_bits(key, static_cast<uint64_t>(index))) >> 16);
    } else {
      p.set(k, narrow<T>(s.param));
    }
  }
};

// The end of one quantization block's update, in each of the warp's lanes: the block's absmax over the lanes
// (warp reduction of int8_abs_bits: the bits of non-negative floats order like the floats), the new scales
// (stored by lane 0, after the reduction, so after every lane has read the old ones), and each of the lane's
// kILP codes handed to put(k, code_m, code_v). Every lane of the warp must call it.
template <class Put>
__device__ __forceinline__ void int8_encode_block(const float (&new_m)[kILP], const float (&new_v)[kILP], uint32_t max_m,
                                                  uint32_t max_v, int lane, float* scale_m, float* scale_v, Put&& put) {
  const float sm = int8_scale(__reduce_max_sync(0xffffffffu, max_m));
  const float sv = int8_scale(__reduce_max_sync(0xffffffffu, max_v));
  const float inv_m = int8_inverse(sm), inv_v = int8_inverse(sv);
#pragma unroll
  for (int k = 0; k < kILP; ++k) put(k, int8_encode_m(new_m[k], inv_m), int8_encode_v(new_v[k], inv_v));
  if (lane == 0) {
    *scale_m = sm;
    *scale_v = sv;
  }
}

template <DType T, MasterKind M, StateKind S, bool kAmsgrad, bool kDecoupled, bool kStochastic>
__global__ void __launch_bounds__(kThreads, 2)
    adam_kernel(TensorListMeta<Lists<M, S, kAmsgrad>::kDepth> meta, AdamHyper hyper, AdamFlags flags,
                const float* __restrict__ lr, const float* __restrict__ grad_scale,
                const float* __restrict__ found_inf, const float* __restrict__ clip_coef, uint32_t seed) {
  using L = Lists<M, S, kAmsgrad>;
  using E = Element<T, M, S, kAmsgrad, kDecoupled, kStochastic>;
  constexpr bool kInt8 = S == StateKind::Int8;
  constexpr int kParamBytes = T == DType::Float32 ? 4 : 2;
  constexpr int kMasterBytes = M == MasterKind::Fp32 ? 4 : 2;  // fp32 master or int16 remainder
  constexpr int kStateBytes = S == StateKind::Fp32 ? 4 : S == StateKind::BFloat16 ? 2 : 1;
  if (found_inf != nullptr && *found_inf != 0.f) return;  // a skipped step writes nothing
  const int slot = meta.block_tensor[blockIdx.x];
  void* param = meta.addr[L::kParam][slot];
  const void* grad = meta.addr[L::kGrad][slot];
  void* exp_avg = meta.addr[L::kExpAvg][slot];
  void* exp_avg_sq = meta.addr[L::kExpAvgSq][slot];
  void* max_exp_avg_sq = kAmsgrad ? meta.addr[L::kMaxExpAvgSq][slot] : nullptr;
  void* master = L::kHasMaster ? meta.addr[L::kMasterIdx][slot] : nullptr;
  float* scale_m = kInt8 ? static_cast<float*>(meta.addr[L::kScaleM][slot]) : nullptr;
  float* scale_v = kInt8 ? static_cast<float*>(meta.addr[L::kScaleV][slot]) : nullptr;
  const float step = *static_cast<const float*>(meta.addr[L::kStep][slot]) + 1.f;
  const AdamCoeffs<float> c = adam_coeffs(hyper, *lr, step, adam_grad_factor(grad_scale, clip_coef));
  const uint32_t key =
      kStochastic ? sr_key(seed, static_cast<uint32_t>(meta.list_index[slot]), static_cast<uint32_t>(step)) : 0u;

  // This block's chunk, from its first element: pointers moved there, 32-bit indices within it (a chunk has
  // kChunkSize elements), which spares registers next to 64-bit ones.
  const int64_t begin = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kChunkSize;
  const int end = static_cast<int>(min(meta.numel[slot] - begin, kChunkSize));
  // (char arithmetic, not through an integer: the compiler then still knows the pointers are global, LDG/STG)
  auto advance = [begin](auto* ptr, int bytes) {
    using Byte = std::conditional_t<std::is_const_v<std::remove_pointer_t<decltype(ptr)>>, const char, char>;
    return reinterpret_cast<decltype(ptr)>(reinterpret_cast<Byte*>(ptr) + begin * bytes);
  };
  param = advance(param, kParamBytes);
  grad = advance(grad, kParamBytes);
  exp_avg = advance(exp_avg, kStateBytes);
  exp_avg_sq = advance(exp_avg_sq, kStateBytes);
  if constexpr (kAmsgrad) max_exp_avg_sq = advance(max_exp_avg_sq, kStateBytes);
  if constexpr (L::kHasMaster) master = advance(master, kMasterBytes);
  if constexpr (kInt8) {
    scale_m += begin / kInt8Block;
    scale_v += begin / kInt8Block;
  }

  auto aligned = [](const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; };
  const int state_align = kStateBytes == 1 ? 8 : 16;
  bool vectorizable = aligned(param, 16) && aligned(grad, 16) && aligned(exp_avg, state_align) &&
                      aligned(exp_avg_sq, state_align);
  if constexpr (kAmsgrad) vectorizable = vectorizable && aligned(max_exp_avg_sq, 16);
  if constexpr (L::kHasMaster) vectorizable = vectorizable && aligned(master, 16);

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  // note: the fast loop (whole groups of kILP elements per lane, 16-byte accesses into registers) and the slow
  // loop after it (element by element from memory: the tensor's tail, or all of a misaligned view) are separate
  // loops: in one, ptxas keeps both access patterns live and the common case needs up to 40 registers more, past
  // the 64 that 2 blocks of 512 threads per SM allow.
  int tail = 0;
  if (vectorizable) {
    if constexpr (kInt8) {
      // a warp takes a whole quantization block per step, kILP elements per lane, and reduces its absmax
      tail = end / kWarpElements * kWarpElements;
      for (int q = warp * kWarpElements; q < tail; q += kThreads * kILP) {
        const int i = q + lane * kILP;
        const float block_scale_m = scale_m[q / kInt8Block], block_scale_v = scale_v[q / kInt8Block];
        Packet<kParamBytes> p, g;
        Packet<kMasterBytes> w;
        Packet<1> m, v;
        if constexpr (M != MasterKind::Fp32) p.load(param, i);
        if constexpr (L::kHasMaster) w.load(master, i);
        g.load(grad, i);
        m.load(exp_avg, i);
        v.load(exp_avg_sq, i);
        float new_m[kILP], new_v[kILP];  // the new moments, until the block's scale is known
        uint32_t max_m = 0u, max_v = 0u;
#pragma unroll
        for (int k = 0; k < kILP; ++k) {
          AdamSlots<float> s = E::load(p, g, w, m, v, v, k, block_scale_m, block_scale_v);
          adam_update<kDecoupled, kAmsgrad>(s, c, flags);
          E::store(p, w, m, v, v, k, s, key, begin + i + k);
          new_m[k] = s.exp_avg;
          new_v[k] = s.exp_avg_sq;
          max_m = op_umax(max_m, int8_abs_bits(s.exp_avg));
          max_v = op_umax(max_v, int8_abs_bits(s.exp_avg_sq));
        }
        p.store(param, i);
        if constexpr (L::kHasMaster) w.store(master, i);
        int8_encode_block(new_m, new_v, max_m, max_v, lane, scale_m + q / kInt8Block, scale_v + q / kInt8Block,
                          [&](int k, uint32_t code_m, uint32_t code_v) {
                            m.set(k, code_m);
                            v.set(k, code_v);
                          });
        m.store(exp_avg, i);
        v.store(exp_avg_sq, i);
      }
    } else {
      tail = end / kILP * kILP;
      for (int i = threadIdx.x * kILP; i < tail; i += kThreads * kILP) {
        Packet<kParamBytes> p, g;
        Packet<kMasterBytes> w;
        Packet<kStateBytes> m, v, vmax;
        if constexpr (M != MasterKind::Fp32) p.load(param, i);
        if constexpr (L::kHasMaster) w.load(master, i);
        g.load(grad, i);
        m.load(exp_avg, i);
        v.load(exp_avg_sq, i);
        if constexpr (kAmsgrad) vmax.load(max_exp_avg_sq, i);
#pragma unroll
        for (int k = 0; k < kILP; ++k) {
          AdamSlots<float> s = E::load(p, g, w, m, v, vmax, k, 0.f, 0.f);
          adam_update<kDecoupled, kAmsgrad>(s, c, flags);
          E::store(p, w, m, v, vmax, k, s, key, begin + i + k);
        }
        m.store(exp_avg, i);
        v.store(exp_avg_sq, i);
        if constexpr (kAmsgrad) vmax.store(max_exp_avg_sq, i);
        if constexpr (L::kHasMaster) w.store(master, i);
        p.store(param, i);
      }
    }
  }
  if constexpr (kInt8) {
    // the rest, a (partial) quantization block per warp step: lane l takes elements q + 32 k + l
    for (int q = tail + warp * kWarpElements; q < end; q += kThreads * kILP) {
      const float block_scale_m = scale_m[q / kInt8Block], block_scale_v = scale_v[q / kInt8Block];
      float new_m[kILP], new_v[kILP];
      uint32_t max_m = 0u, max_v = 0u;
#pragma unroll
      for (int k = 0; k < kILP; ++k) {
        const int e = q + 32 * k + lane;
        new_m[k] = new_v[k] = 0.f;
        if (e < end) {
          const auto dp = direct<kParamBytes>(param, e);
          const auto dw = direct_if<L::kHasMaster, kMasterBytes>(master, e, dp);
          const auto dm = direct<1>(exp_avg, e), dv = direct<1>(exp_avg_sq, e);
          AdamSlots<float> s = E::load(dp, direct<kParamBytes>(grad, e), dw, dm, dv, dv, 0, block_scale_m, block_scale_v);
          adam_update<kDecoupled, kAmsgrad>(s, c, flags);
          E::store(dp, dw, dm, dv, dv, 0, s, key, begin + e);
          new_m[k] = s.exp_avg;
          new_v[k] = s.exp_avg_sq;
          max_m = op_umax(max_m, int8_abs_bits(s.exp_avg));
          max_v = op_umax(max_v, int8_abs_bits(s.exp_avg_sq));
        }
      }
      int8_encode_block(new_m, new_v, max_m, max_v, lane, scale_m + q / kInt8Block, scale_v + q / kInt8Block,
                        [&](int k, uint32_t code_m, uint32_t code_v) {
                          const int e = q + 32 * k + lane;
                          if (e < end) {
                            direct<1>(exp_avg, e).set(0, code_m);
                            direct<1>(exp_avg_sq, e).set(0, code_v);
                          }
                        });
    }
  } else {
    // the rest, one element per thread (coalesced)
    for (int e = tail + threadIdx.x; e < end; e += kThreads) {
      const auto dp = direct<kParamBytes>(param, e);
      const auto dw = direct_if<L::kHasMaster, kMasterBytes>(master, e, dp);
      const auto dm = direct<kStateBytes>(exp_avg, e), dv = direct<kStateBytes>(exp_avg_sq, e);
      const auto dvmax = direct_if<kAmsgrad, kStateBytes>(max_exp_avg_sq, e, dv);
      AdamSlots<float> s = E::load(dp, direct<kParamBytes>(grad, e), dw, dm, dv, dvmax, 0, 0.f, 0.f);
      adam_update<kDecoupled, kAmsgrad>(s, c, flags);
      E::store(dp, dw, dm, dv, dvmax, 0, s, key, begin + e);
    }
  }
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

template <DType T, MasterKind M, StateKind S, bool kAmsgrad, bool kDecoupled, bool kStochastic>
void launch_variant(const AdamGroup& g, const AdamLaunch& cfg, cudaStream_t stream, cudaError_t* err) {
  using L = Lists<M, S, kAmsgrad>;
  void* const* lists[L::kDepth];
  lists[L::kParam] = g.params;
  lists[L::kGrad] = g.grads;
  lists[L::kExpAvg] = g.exp_avgs;
  lists[L::kExpAvgSq] = g.exp_avg_sqs;
  if constexpr (kAmsgrad) lists[L::kMaxExpAvgSq] = g.max_exp_avg_sqs;
  if constexpr (L::kHasMaster) lists[L::kMasterIdx] = g.masters;
  if constexpr (L::kInt8) {
    lists[L::kScaleM] = g.exp_avg_scales;
    lists[L::kScaleV] = g.exp_avg_sq_scales;
  }
  lists[L::kStep] = g.steps;
  multi_tensor_apply<L::kDepth>(
      g.n_tensors, lists, g.numels, g.list_index, 0,
      [&](const TensorListMeta<L::kDepth>& meta, int n_blocks) {
        adam_kernel<T, M, S, kAmsgrad, kDecoupled, kStochastic><<<n_blocks, kThreads, 0, stream>>>(
            meta, cfg.hyper, cfg.flags, cfg.lr, cfg.grad_scale, cfg.found_inf, cfg.clip_coef, cfg.seed);
      },
      err);
}

}  // namespace

void launch_adam(const AdamGroup& group, const AdamLaunch& cfg, cudaStream_t stream, cudaError_t* err) {
  *err = cudaErrorInvalidValue;  // a combination the op refuses (see csrc/adam_args.h) is never launched
  dispatch_adam_variant(cfg.dtype, cfg.master, cfg.state, cfg.amsgrad, cfg.decoupled, cfg.stochastic,
                        [&](auto T, auto master, auto state, auto amsgrad, auto decoupled, auto stochastic) {
                          launch_variant<T, master, state, amsgrad, decoupled, stochastic>(group, cfg, stream, err);
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
