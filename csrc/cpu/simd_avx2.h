// AVX2 load/store of 8 lanes of fp32 / fp16 / bf16, and the vector types that run the shared element math
// (mixprec/adam_math.h, mixprec/rounding.h) on 8 or 16 lanes, used by the CPU kernels.
// Include only from torch-free kernel files; every function carries the avx2 target attribute, so the
// rest of the translation unit stays portable x86-64.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "mixprec/common.h"
#include "mixprec/rounding.h"

#define MIXPREC_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace mixprec::avx2 {

// 8 fp32 lanes as a type of their own, so that element math written once for `float` (the op_* functions of
// mixprec/adam_math.h and mixprec/rounding.h) runs on vectors through overloading (found by argument-dependent
// lookup). Callers instantiate that math inside a MIXPREC_AVX2 __attribute__((flatten)) function, which inlines
// it all there.
struct Vec8 {
  __m256 v;
};
MIXPREC_AVX2 inline Vec8 broadcast8(float x) { return {_mm256_set1_ps(x)}; }
MIXPREC_AVX2 inline Vec8 op_add(Vec8 a, Vec8 b) { return {_mm256_add_ps(a.v, b.v)}; }
MIXPREC_AVX2 inline Vec8 op_mul(Vec8 a, Vec8 b) { return {_mm256_mul_ps(a.v, b.v)}; }
MIXPREC_AVX2 inline Vec8 op_div(Vec8 a, Vec8 b) { return {_mm256_div_ps(a.v, b.v)}; }
MIXPREC_AVX2 inline Vec8 op_sqrt(Vec8 a) { return {_mm256_sqrt_ps(a.v)}; }
MIXPREC_AVX2 inline Vec8 op_neg(Vec8 a) { return {_mm256_xor_ps(a.v, _mm256_set1_ps(-0.f))}; }
// maxps returns its second operand when either is NaN: the scalar op_max's semantics.
MIXPREC_AVX2 inline Vec8 op_max(Vec8 a, Vec8 b) { return {_mm256_max_ps(a.v, b.v)}; }
MIXPREC_AVX2 inline Vec8 op_abs(Vec8 a) { return {_mm256_andnot_ps(_mm256_set1_ps(-0.f), a.v)}; }

// 8 32-bit integer lanes, with the semantics of the scalar uint32_t operations of mixprec/rounding.h (wrapping
// arithmetic, logical shifts, all-ones masks).
struct Vec8i {
  __m256i v;
};
MIXPREC_AVX2 inline Vec8i broadcast8i(uint32_t x) { return {_mm256_set1_epi32(static_cast<int>(x))}; }
MIXPREC_AVX2 inline Vec8i operator+(Vec8i a, Vec8i b) { return {_mm256_add_epi32(a.v, b.v)}; }
MIXPREC_AVX2 inline Vec8i operator-(Vec8i a, Vec8i b) { return {_mm256_sub_epi32(a.v, b.v)}; }
MIXPREC_AVX2 inline Vec8i operator*(Vec8i a, Vec8i b) { return {_mm256_mullo_epi32(a.v, b.v)}; }
MIXPREC_AVX2 inline Vec8i operator&(Vec8i a, Vec8i b) { return {_mm256_and_si256(a.v, b.v)}; }
MIXPREC_AVX2 inline Vec8i operator|(Vec8i a, Vec8i b) { return {_mm256_or_si256(a.v, b.v)}; }
MIXPREC_AVX2 inline Vec8i operator^(Vec8i a, Vec8i b) { return {_mm256_xor_si256(a.v, b.v)}; }
MIXPREC_AVX2 inline Vec8i operator+(Vec8i a, uint32_t b) { return a + broadcast8i(b); }
MIXPREC_AVX2 inline Vec8i operator-(Vec8i a, uint32_t b) { return a - broadcast8i(b); }
MIXPREC_AVX2 inline Vec8i operator*(Vec8i a, uint32_t b) { return a * broadcast8i(b); }
MIXPREC_AVX2 inline Vec8i operator&(Vec8i a, uint32_t b) { return a & broadcast8i(b); }
MIXPREC_AVX2 inline Vec8i operator|(Vec8i a, uint32_t b) { return a | broadcast8i(b); }
MIXPREC_AVX2 inline Vec8i operator^(Vec8i a, uint32_t b) { return a ^ broadcast8i(b); }
// shift counts are constants after inlining (an immediate vpsrld / vpslld / vpsrad)
MIXPREC_AVX2 inline Vec8i operator>>(Vec8i a, int n) { return {_mm256_srli_epi32(a.v, n)}; }
MIXPREC_AVX2 inline Vec8i operator<<(Vec8i a, int n) { return {_mm256_slli_epi32(a.v, n)}; }
MIXPREC_AVX2 inline Vec8i op_sra(Vec8i a, int n) { return {_mm256_srai_epi32(a.v, n)}; }

MIXPREC_AVX2 inline Vec8i op_bits(Vec8 a) { return {_mm256_castps_si256(a.v)}; }
MIXPREC_AVX2 inline Vec8 op_from_bits(Vec8i a) { return {_mm256_castsi256_ps(a.v)}; }
MIXPREC_AVX2 inline Vec8i op_isnan(Vec8 a) { return {_mm256_castps_si256(_mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q))}; }
MIXPREC_AVX2 inline Vec8i op_lt(Vec8 a, float b) {
  return {_mm256_castps_si256(_mm256_cmp_ps(a.v, _mm256_set1_ps(b), _CMP_LT_OQ))};
}
MIXPREC_AVX2 inline Vec8i op_ge(Vec8 a, float b) {
  return {_mm256_castps_si256(_mm256_cmp_ps(a.v, _mm256_set1_ps(b), _CMP_GE_OQ))};
}
MIXPREC_AVX2 inline Vec8i op_eqz(Vec8i a) { return {_mm256_cmpeq_epi32(a.v, _mm256_setzero_si256())}; }
MIXPREC_AVX2 inline Vec8i op_select(Vec8i mask, Vec8i a, Vec8i b) { return {_mm256_blendv_epi8(b.v, a.v, mask.v)}; }
MIXPREC_AVX2 inline Vec8i op_andnot(Vec8i mask, Vec8i a) { return {_mm256_andnot_si256(mask.v, a.v)}; }
MIXPREC_AVX2 inline Vec8i op_iabs(Vec8i a) { return {_mm256_abs_epi32(a.v)}; }
MIXPREC_AVX2 inline Vec8i op_imax(Vec8i a, Vec8i b) { return {_mm256_max_epi32(a.v, b.v)}; }
MIXPREC_AVX2 inline Vec8i op_imin(Vec8i a, int32_t b) { return {_mm256_min_epi32(a.v, _mm256_set1_epi32(b))}; }
MIXPREC_AVX2 inline Vec8i op_umax(Vec8i a, Vec8i b) { return {_mm256_max_epu32(a.v, b.v)}; }
MIXPREC_AVX2 inline Vec8i op_imax(Vec8i a, int32_t b) { return {_mm256_max_epi32(a.v, _mm256_set1_epi32(b))}; }
// psignd, under the preconditions of rounding.h's scalar functions
MIXPREC_AVX2 inline Vec8i op_zero_where_zero(Vec8i a, Vec8i b) { return {_mm256_sign_epi32(a.v, b.v)}; }
MIXPREC_AVX2 inline Vec8i op_negate_where_negative(Vec8i a, Vec8i b) { return {_mm256_sign_epi32(a.v, b.v)}; }

// The largest of the 8 lanes, unsigned.
MIXPREC_AVX2 inline uint32_t hmax_u32(Vec8i a) {
  __m128i m = _mm_max_epu32(_mm256_castsi256_si128(a.v), _mm256_extracti128_si256(a.v, 1));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0b01001110));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0b10110001));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(m));
}

// 16 16-bit integer lanes: only what the int8 decode (int8_value_hi16_*) needs, which then runs on 16 codes at once.
struct Vec16w {
  __m256i v;
};
MIXPREC_AVX2 inline Vec16w operator+(Vec16w a, uint32_t b) {
  return {_mm256_add_epi16(a.v, _mm256_set1_epi16(static_cast<int16_t>(b)))};
}
MIXPREC_AVX2 inline Vec16w operator&(Vec16w a, uint32_t b) {
  return {_mm256_and_si256(a.v, _mm256_set1_epi16(static_cast<int16_t>(b)))};
}
MIXPREC_AVX2 inline Vec16w operator|(Vec16w a, Vec16w b) { return {_mm256_or_si256(a.v, b.v)}; }
MIXPREC_AVX2 inline Vec16w operator<<(Vec16w a, int n) { return {_mm256_slli_epi16(a.v, n)}; }
MIXPREC_AVX2 inline Vec16w op_iabs(Vec16w a) { return {_mm256_abs_epi16(a.v)}; }
MIXPREC_AVX2 inline Vec16w op_zero_where_zero(Vec16w a, Vec16w b) { return {_mm256_sign_epi16(a.v, b.v)}; }

// Two vectors processed as one value: 16 elements, e holding the even ones and o the odd ones of 16 consecutive
// elements. A 256-bit load of 16 16-bit values splits into (e, o) with one shift or mask each, no shuffle: this is
// the CPU kernel's layout when every stream of the update has 16-bit (or 8-bit) elements. Every operation
// applies to both halves. The AVX-512 kernel uses the same template on zmm halves (Pair<avx512::Vec16>: 32
// elements; the avx2 attribute here is a subset of the caller's, so the flattened avx512 function inlines it all).
template <class V>
struct Pair {
  V e, o;
};
#define MIXPREC_PAIR_UNARY(name) \
  template <class V>             \
  MIXPREC_AVX2 inline auto name(Pair<V> a) { return Pair<decltype(name(a.e))>{name(a.e), name(a.o)}; }
#define MIXPREC_PAIR_BINARY(name)                                                                   \
  template <class V, class W>                                                                       \
  MIXPREC_AVX2 inline auto name(Pair<V> a, Pair<W> b) {                                             \
    return Pair<decltype(name(a.e, b.e))>{name(a.e, b.e), name(a.o, b.o)};                          \
  }
#define MIXPREC_PAIR_WITH_SCALAR(name, S)                                                           \
  template <class V>                                                                                \
  MIXPREC_AVX2 inline auto name(Pair<V> a, S b) { return Pair<decltype(name(a.e, b))>{name(a.e, b), name(a.o, b)}; }
// (the halves' types may differ: AVX-512 masks are a type of their own, and m & b, a ^ m, a - m mix them with
// integer lanes, see simd_avx512.h)
#define MIXPREC_PAIR_OPERATOR(op)                                                                   \
  template <class V, class W>                                                                       \
  MIXPREC_AVX2 inline auto operator op(Pair<V> a, Pair<W> b) {                                      \
    return Pair<decltype(a.e op b.e)>{a.e op b.e, a.o op b.o};                                      \
  }                                                                                                 \
  template <class V>                                                                                \
  MIXPREC_AVX2 inline auto operator op(Pair<V> a, uint32_t b) {                                     \
    return Pair<decltype(a.e op b)>{a.e op b, a.o op b};                                            \
  }
MIXPREC_PAIR_BINARY(op_add)
MIXPREC_PAIR_BINARY(op_mul)
MIXPREC_PAIR_BINARY(op_div)
MIXPREC_PAIR_UNARY(op_sqrt)
MIXPREC_PAIR_UNARY(op_neg)
MIXPREC_PAIR_BINARY(op_max)
MIXPREC_PAIR_UNARY(op_abs)
MIXPREC_PAIR_UNARY(op_bits)
MIXPREC_PAIR_UNARY(op_from_bits)
MIXPREC_PAIR_UNARY(op_isnan)
MIXPREC_PAIR_WITH_SCALAR(op_lt, float)
MIXPREC_PAIR_WITH_SCALAR(op_ge, float)
MIXPREC_PAIR_UNARY(op_eqz)
MIXPREC_PAIR_BINARY(op_andnot)
MIXPREC_PAIR_UNARY(op_iabs)
MIXPREC_PAIR_BINARY(op_imax)
MIXPREC_PAIR_WITH_SCALAR(op_imin, int32_t)
MIXPREC_PAIR_BINARY(op_umax)
MIXPREC_PAIR_WITH_SCALAR(op_imax, int32_t)
MIXPREC_PAIR_BINARY(op_zero_where_zero)
MIXPREC_PAIR_BINARY(op_negate_where_negative)
MIXPREC_PAIR_WITH_SCALAR(op_sra, int)
template <class V>
MIXPREC_AVX2 inline Pair<V> op_add_with_bit(Pair<V> a, uint32_t c, int n) {
  using mixprec::op_add_with_bit;  // the generic one, for halves that have no overload of their own (Vec8i)
  return {op_add_with_bit(a.e, c, n), op_add_with_bit(a.o, c, n)};
}
MIXPREC_PAIR_OPERATOR(+)
MIXPREC_PAIR_OPERATOR(-)
MIXPREC_PAIR_OPERATOR(*)
MIXPREC_PAIR_OPERATOR(&)
MIXPREC_PAIR_OPERATOR(|)
MIXPREC_PAIR_OPERATOR(^)
#undef MIXPREC_PAIR_UNARY
#undef MIXPREC_PAIR_BINARY
#undef MIXPREC_PAIR_WITH_SCALAR
#undef MIXPREC_PAIR_OPERATOR
template <class V>
MIXPREC_AVX2 inline Pair<V> operator>>(Pair<V> a, int n) { return {a.e >> n, a.o >> n}; }
template <class V>
MIXPREC_AVX2 inline Pair<V> operator<<(Pair<V> a, int n) { return {a.e << n, a.o << n}; }
template <class M, class V>
MIXPREC_AVX2 inline Pair<V> op_select(Pair<M> mask, Pair<V> a, Pair<V> b) {
  return {op_select(mask.e, a.e, b.e), op_select(mask.o, a.o, b.o)};
}

// ---- 8-lane loads and stores ----

template <DType T>
MIXPREC_AVX2 inline __m256 load8(const void* p) {
  if constexpr (T == DType::Float32) {
    return _mm256_loadu_ps(static_cast<const float*>(p));
  } else if constexpr (T == DType::Float16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(static_cast<const __m128i*>(p)));
  } else {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
}

// The high / low 16 bits of each of 8 32-bit lanes, packed and stored unaligned (in-lane byte shuffle, then the
// two 64-bit halves together).
MIXPREC_AVX2 inline __m128i pack_high16(Vec8i a) {
  const __m256i hi = _mm256_shuffle_epi8(
      a.v, _mm256_setr_epi8(2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1, 2, 3, 6, 7, 10, 11, 14, 15, -1,
                            -1, -1, -1, -1, -1, -1, -1));
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(hi, 0b1000));
}
MIXPREC_AVX2 inline __m128i pack_low16(Vec8i a) {
  const __m256i lo = _mm256_shuffle_epi8(
      a.v, _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1, 0, 1, 4, 5, 8, 9, 12, 13, -1, -1,
                            -1, -1, -1, -1, -1, -1));
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(lo, 0b1000));
}
// The low 8 bits of each lane, 8 bytes stored unaligned.
MIXPREC_AVX2 inline void store_low8(void* p, Vec8i a) {
  const __m256i lo = _mm256_shuffle_epi8(
      a.v, _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12, -1, -1, -1, -1, -1,
                            -1, -1, -1, -1, -1, -1, -1));
  const __m256i packed = _mm256_permutevar8x32_epi32(lo, _mm256_setr_epi32(0, 4, 1, 1, 1, 1, 1, 1));
  _mm_storel_epi64(static_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

// 8 fp32 lanes rounded to nearest even into fp16 / bf16 bits; same bits as mixprec/rounding.h for every
// input (NaN stays a quiet NaN with its sign; F16C's vcvtps2ph is IEEE RNE with subnormal results).
// note: spelled in intrinsics, not as bf16_rne_bits on Vec8: the unscale kernel calls this from avx2 functions that
// are not flattened, where a generic template left out of line would pass the vectors in the baseline ABI.
template <DType T>
MIXPREC_AVX2 inline __m128i pack_half8(__m256 v) {
  static_assert(T != DType::Float32, "half types only");
  if constexpr (T == DType::Float16) {
    return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    const __m256i quiet_nan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    const __m256 is_nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    const __m256i bits = _mm256_blendv_epi8(rounded, quiet_nan, _mm256_castps_si256(is_nan));
    // values are < 2^16, so the signed->unsigned saturating pack is exact; it interleaves 128-bit lanes,
    // which the permute undoes.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), 0b1000);
    return _mm256_castsi256_si128(packed);
  }
}

// Round to nearest even into the storage type (see pack_half8).
template <DType T>
MIXPREC_AVX2 inline void store8(void* p, __m256 v) {
  if constexpr (T == DType::Float32) {
    _mm256_storeu_ps(static_cast<float*>(p), v);
  } else {
    _mm_storeu_si128(static_cast<__m128i*>(p), pack_half8<T>(v));
  }
}

// All-ones lanes where the value is inf or NaN.
MIXPREC_AVX2 inline __m256 nonfinite_mask(__m256 v) {
  const __m256i exp_mask = _mm256_set1_epi32(0x7f800000);
  const __m256i e = _mm256_and_si256(_mm256_castps_si256(v), exp_mask);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(e, exp_mask));
}

MIXPREC_AVX2 inline float hsum(__m256 v) {
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

}  // namespace mixprec::avx2
