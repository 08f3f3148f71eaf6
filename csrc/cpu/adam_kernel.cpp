// note: GCC contracts a*b+c into an FMA inside avx2/fma functions even in ISO mode; the shared element math
// spells out each rounding (mixprec/adam_math.h), so contraction is turned off for this whole file (before
// any include, so that every function here is compiled with the same options and inlines freely).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "adam_kernel.h"

#include <algorithm>
#include <cstdint>

#include "mixprec/adam_dispatch.h"
#include "simd_avx2.h"

namespace mixprec::cpu {
namespace {

// The variant as compile-time constants.
template <DType T, MasterKind M, StateKind S, bool kAmsgrad, bool kDecoupled, bool kStochastic>
struct Kind {
  static constexpr DType kDType = T;
  static constexpr MasterKind kMaster = M;
  static constexpr StateKind kState = S;
  static constexpr bool kAms = kAmsgrad, kDec = kDecoupled, kSR = kStochastic;
  // the storage type of fp32 / bf16 states (int8 codes are read apart)
  static constexpr DType kStateDType = S == StateKind::BFloat16 ? DType::BFloat16 : DType::Float32;
  // with fp32 masters a half param is only written: the AVX2 kernel may store it without reading it first
  static constexpr bool kWriteOnlyParam = M == MasterKind::Fp32 && T != DType::Float32;
};

// The loads and stores of one step of the kernel loop, for kWidth consecutive elements: one (the portable
// kernel, and the AVX2 kernel's tails) or 8 (AVX2). F holds fp32 values, I uint32 lanes (bit patterns, codes);
// the element math of mixprec/adam_math.h is instantiated for both. Integer loads widen (zero- or
// sign-extending) to 32-bit lanes, integer stores keep each lane's low bits.
struct ScalarLanes {
  static constexpr int kWidth = 1;
  using F = float;
  using I = uint32_t;
  static F broadcast(float x) { return x; }
  template <DType T>
  static F load(const void* p, int64_t i) { return load_as_float<T>(p, i); }
  template <DType T>
  static void store(void* p, int64_t i, F v) { store_from_float<T>(p, i, v); }
  template <DType T>
  static void store_streaming(void* p, int64_t i, F v) { store_from_float<T>(p, i, v); }
  static I load_u16(const void* p, int64_t i) { return static_cast<const uint16_t*>(p)[i]; }
  static I load_i16(const void* p, int64_t i) {
    return static_cast<uint32_t>(static_cast<int32_t>(static_cast<const int16_t*>(p)[i]));
  }
  static I load_u8(const void* p, int64_t i) { return static_cast<const uint8_t*>(p)[i]; }
  static I load_i8(const void* p, int64_t i) {
    return static_cast<uint32_t>(static_cast<int32_t>(static_cast<const int8_t*>(p)[i]));
  }
  static void store_u16(void* p, int64_t i, I v) { static_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(v); }
  static void store_u8(void* p, int64_t i, I v) { static_cast<uint8_t*>(p)[i] = static_cast<uint8_t>(v); }
  static I lane_index(uint32_t first) { return first; }  // the low words of the lanes' element indices
  static uint32_t hmax(I v) { return v; }
  static void fence() {}
};

struct Avx2Lanes {
  static constexpr int kWidth = 8;
  using F = avx2::Vec8;
  using I = avx2::Vec8i;
  template <class P>
  MIXPREC_AVX2 static P* at(P* p, int64_t i, int size) {
    return reinterpret_cast<P*>(reinterpret_cast<uintptr_t>(p) + i * size);
  }
  MIXPREC_AVX2 static F broadcast(float x) { return avx2::broadcast8(x); }
  template <DType T>
  MIXPREC_AVX2 static F load(const void* p, int64_t i) { return {avx2::load8<T>(at(p, i, T == DType::Float32 ? 4 : 2))}; }
  template <DType T>
  MIXPREC_AVX2 static void store(void* p, int64_t i, F v) { avx2::store8<T>(at(p, i, T == DType::Float32 ? 4 : 2), v.v); }
  // note: a non-temporal store writes the param's cache lines without reading them first (read-for-ownership):
  // 2 bytes per param less on a write-only stream (16-byte aligned base, 8-element steps)
  template <DType T>
  MIXPREC_AVX2 static void store_streaming(void* p, int64_t i, F v) {
    _mm_stream_si128(static_cast<__m128i*>(at(p, i, 2)), avx2::pack_half8<T>(v.v));
  }
  MIXPREC_AVX2 static I load_u16(const void* p, int64_t i) {
    return {_mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(at(p, i, 2))))};
  }
  MIXPREC_AVX2 static I load_i16(const void* p, int64_t i) {
    return {_mm256_cvtepi16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(at(p, i, 2))))};
  }
  MIXPREC_AVX2 static I load_u8(const void* p, int64_t i) {
    return {_mm256_cvtepu8_epi32(_mm_loadl_epi64(static_cast<const __m128i*>(at(p, i, 1))))};
  }
  MIXPREC_AVX2 static I load_i8(const void* p, int64_t i) {
    return {_mm256_cvtepi8_epi32(_mm_loadl_epi64(static_cast<const __m128i*>(at(p, i, 1))))};
  }
  MIXPREC_AVX2 static void store_u16(void* p, int64_t i, I v) { avx2::store_low16(at(p, i, 2), v); }
  MIXPREC_AVX2 static void store_u8(void* p, int64_t i, I v) { avx2::store_low8(at(p, i, 1), v); }
  MIXPREC_AVX2 static I lane_index(uint32_t first) {
    return {_mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(first)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))};
  }
  MIXPREC_AVX2 static uint32_t hmax(I v) { return avx2::hmax_u32(v); }
  MIXPREC_AVX2 static void fence() { _mm_sfence(); }  // non-temporal stores are weakly ordered: publish them
};

template <class L>
AdamCoeffs<typename L::F> broadcast_coeffs(const AdamCoeffs<float>& c) {
  return {L::broadcast(c.grad_factor),     L::broadcast(c.weight_decay), L::broadcast(c.decay),
          L::broadcast(c.beta1),           L::broadcast(c.one_minus_beta1), L::broadcast(c.beta2),
          L::broadcast(c.one_minus_beta2), L::broadcast(c.inv_bc2_sqrt), L::broadcast(c.eps),
          L::broadcast(c.neg_step_size)};
}

// One quantization block of int8 states while it is updated: its stored scales, the new fp32 moments of its
// elements (kept here until the block's absmax is known, then encoded) and their running absmax bits.
struct Int8Segment {
  int64_t begin;            // its first element, in the CPU block
  float scale_m, scale_v;   // the scales the update decodes with
  float* m;                 // m[i - begin]: the new exp_avg of element i
  float* v;
  uint32_t max_m, max_v;    // max of int8_abs_bits over the elements done so far
};

// Elements [begin, end) of the block (end - begin a multiple of L::kWidth): every load, the update, every store,
// for variant K. With int8 states the elements belong to seg's quantization block, and their new moments go to
// seg instead of memory.
template <class K, class L>
void update_elements(const AdamBlock& b, const AdamCoeffs<typename L::F>& c, const AdamFlags& flags, int64_t begin,
                     int64_t end, bool stream_param, Int8Segment* seg) {
  using F = typename L::F;
  using I = typename L::I;
  constexpr DType T = K::kDType;
  constexpr bool kInt8 = K::kState == StateKind::Int8;
  F scale_m{}, scale_v{};
  I max_m{}, max_v{};
  if constexpr (kInt8) {
    scale_m = L::broadcast(seg->scale_m);
    scale_v = L::broadcast(seg->scale_v);
  }
  for (int64_t i = begin; i < end; i += L::kWidth) {
    AdamSlots<F> s;
    if constexpr (K::kMaster == MasterKind::Fp32) s.param = L::template load<DType::Float32>(b.master, i);
    else if constexpr (K::kMaster == MasterKind::Remainder)
      s.param = remainder_join(L::load_u16(b.param, i), L::load_i16(b.remainder, i));
    else s.param = L::template load<T>(b.param, i);
    s.grad = L::template load<T>(b.grad, i);
    if constexpr (kInt8) {
      s.exp_avg = int8_decode_m(L::load_i8(b.exp_avg, i), scale_m);
      s.exp_avg_sq = int8_decode_v(L::load_u8(b.exp_avg_sq, i), scale_v);
    } else {
      s.exp_avg = L::template load<K::kStateDType>(b.exp_avg, i);
      s.exp_avg_sq = L::template load<K::kStateDType>(b.exp_avg_sq, i);
      if constexpr (K::kAms) s.max_exp_avg_sq = L::template load<K::kStateDType>(b.max_exp_avg_sq, i);
    }

    adam_update<K::kDec, K::kAms>(s, c, flags);

    if constexpr (kInt8) {
      L::template store<DType::Float32>(seg->m, i - seg->begin, s.exp_avg);
      L::template store<DType::Float32>(seg->v, i - seg->begin, s.exp_avg_sq);
      max_m = op_max_u32(max_m, int8_abs_bits(s.exp_avg));
      max_v = op_max_u32(max_v, int8_abs_bits(s.exp_avg_sq));
    } else {
      L::template store<K::kStateDType>(b.exp_avg, i, s.exp_avg);
      L::template store<K::kStateDType>(b.exp_avg_sq, i, s.exp_avg_sq);
      if constexpr (K::kAms) L::template store<K::kStateDType>(b.max_exp_avg_sq, i, s.max_exp_avg_sq);
    }
    if constexpr (K::kMaster == MasterKind::Fp32) {
      L::template store<DType::Float32>(b.master, i, s.param);
      if (stream_param) L::template store_streaming<T>(b.param, i, s.param);
      else L::template store<T>(b.param, i, s.param);
    } else if constexpr (K::kMaster == MasterKind::Remainder) {
      const auto split = remainder_split(s.param);
      L::store_u16(b.param, i, split.param);
      L::store_u16(b.remainder, i, split.remainder);
    } else if constexpr (K::kSR) {
      // lanes never straddle a multiple of 2^32: blocks start at multiples of 8, vectors at 8-element steps
      const uint64_t index = static_cast<uint64_t>(b.first_index + i);
      const I random16 = sr_bits(b.sr_key, L::lane_index(static_cast<uint32_t>(index)), static_cast<uint32_t>(index >> 32));
      L::store_u16(b.param, i, bf16_sr_bits(s.param, random16));
    } else {
      L::template store<T>(b.param, i, s.param);
    }
  }
  if constexpr (kInt8) {
    seg->max_m = std::max(seg->max_m, L::hmax(max_m));
    seg->max_v = std::max(seg->max_v, L::hmax(max_v));
  }
}

// Codes of elements [begin, end) of a quantization block (indices from its start) from its new moments.
template <class L>
void encode_elements(const Int8Segment& seg, float inv_m, float inv_v, void* codes_m, void* codes_v, int64_t begin,
                     int64_t end) {
  const auto im = L::broadcast(inv_m), iv = L::broadcast(inv_v);
  for (int64_t i = begin; i < end; i += L::kWidth) {
    L::store_u8(codes_m, i, int8_encode_m(L::template load<DType::Float32>(seg.m, i), im));
    L::store_u8(codes_v, i, int8_encode_v(L::template load<DType::Float32>(seg.v, i), iv));
  }
}

// Elements [begin, end): L's width as far as it goes, then one at a time.
template <class K, class L>
void update_range(const AdamBlock& b, const AdamCoeffs<typename L::F>& cv, const AdamCoeffs<float>& c,
                  const AdamFlags& flags, int64_t begin, int64_t end, bool stream_param, Int8Segment* seg) {
  const int64_t split = begin + (end - begin) / L::kWidth * L::kWidth;
  update_elements<K, L>(b, cv, flags, begin, split, stream_param, seg);
  if constexpr (L::kWidth > 1) update_elements<K, ScalarLanes>(b, c, flags, split, end, false, seg);
}

template <class L>
void encode_range(const Int8Segment& seg, float inv_m, float inv_v, void* codes_m, void* codes_v, int64_t n) {
  const int64_t split = n / L::kWidth * L::kWidth;
  encode_elements<L>(seg, inv_m, inv_v, codes_m, codes_v, 0, split);
  if constexpr (L::kWidth > 1) encode_elements<ScalarLanes>(seg, inv_m, inv_v, codes_m, codes_v, split, n);
}

// The whole block. With int8 states it goes one quantization block at a time, each whole: decode with the stored
// scales, update (params, masters, remainders written in the same loop), absmax of the new moments, encode.
template <class K, class L>
void adam_block_impl(const AdamBlock& b, const AdamCoeffs<float>& c, const AdamFlags& flags) {
  const AdamCoeffs<typename L::F> cv = broadcast_coeffs<L>(c);
  const bool stream_param = K::kWriteOnlyParam && L::kWidth > 1 && reinterpret_cast<uintptr_t>(b.param) % 16 == 0;
  if constexpr (K::kState == StateKind::Int8) {
    for (int64_t q = 0; q < b.n; q += kInt8Block) {
      const int64_t n = std::min<int64_t>(kInt8Block, b.n - q);
      alignas(32) float m[kInt8Block], v[kInt8Block];
      const int64_t block = q / kInt8Block;
      Int8Segment seg{q, b.exp_avg_scale[block], b.exp_avg_sq_scale[block], m, v, 0u, 0u};
      update_range<K, L>(b, cv, c, flags, q, q + n, stream_param, &seg);
      const float scale_m = int8_scale(seg.max_m), scale_v = int8_scale(seg.max_v);
      encode_range<L>(seg, int8_inverse(scale_m), int8_inverse(scale_v), static_cast<int8_t*>(b.exp_avg) + q,
                      static_cast<uint8_t*>(b.exp_avg_sq) + q, n);
      b.exp_avg_scale[block] = scale_m;
      b.exp_avg_sq_scale[block] = scale_v;
    }
  } else {
    update_range<K, L>(b, cv, c, flags, 0, b.n, stream_param, nullptr);
  }
  if (stream_param) L::fence();
}

// flatten inlines the generic math, the lanes and the vector operations into this avx2 function.
template <class K>
MIXPREC_AVX2 __attribute__((flatten)) void adam_avx2(const AdamBlock& b, const AdamCoeffs<float>& c,
                                                      const AdamFlags& flags) {
  adam_block_impl<K, Avx2Lanes>(b, c, flags);
}

template <class K>
void adam_portable(const AdamBlock& b, const AdamCoeffs<float>& c, const AdamFlags& flags) {
  adam_block_impl<K, ScalarLanes>(b, c, flags);
}

}  // namespace

void adam_block(const AdamBlock& block, const AdamVariant& v, const AdamCoeffs<float>& coeffs, const AdamFlags& flags,
                bool use_avx2) {
  dispatch_adam_variant(v.dtype, v.master, v.state, v.amsgrad, v.decoupled, v.stochastic,
                        [&](auto T, auto master, auto state, auto amsgrad, auto decoupled, auto stochastic) {
                          using K = Kind<T, master, state, amsgrad, decoupled, stochastic>;
                          if (use_avx2) adam_avx2<K>(block, coeffs, flags);
                          else adam_portable<K>(block, coeffs, flags);
                        });
}

}  // namespace mixprec::cpu
