// AVX2 load/store of 8 lanes of fp32 / fp16 / bf16 and 8-lane vector types for the shared element math, used by
// the CPU kernels.
// Include only from torch-free kernel files; every function carries the avx2 target attribute, so the
// rest of the translation unit stays portable x86-64.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "mixprec/common.h"

#define MIXPREC_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace mixprec::avx2 {

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

// 8 fp32 lanes rounded to nearest even into fp16 / bf16 bits; same bits as mixprec/rounding.h for every
// input (NaN stays a quiet NaN with its sign; F16C's vcvtps2ph is IEEE RNE with subnormal results).
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

// 8 fp32 lanes as a type of their own, so that element math written once for `float` (the op_* functions of
// mixprec/adam_math.h) runs on vectors through overloading (found by argument-dependent lookup). Callers
// instantiate that math inside a MIXPREC_AVX2 __attribute__((flatten)) function, which inlines it all there.
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

// 8 uint32 lanes: the integer side of the element math (bit patterns, codes, hashes), with the semantics of the
// scalar uint32_t operations in mixprec/adam_math.h (wrapping arithmetic, logical shifts, all-ones masks).
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
// shift counts are constants after inlining (an immediate vpsrld / vpslld)
MIXPREC_AVX2 inline Vec8i operator>>(Vec8i a, int n) { return {_mm256_srli_epi32(a.v, n)}; }
MIXPREC_AVX2 inline Vec8i operator<<(Vec8i a, int n) { return {_mm256_slli_epi32(a.v, n)}; }

MIXPREC_AVX2 inline Vec8i op_bits(Vec8 a) { return {_mm256_castps_si256(a.v)}; }
MIXPREC_AVX2 inline Vec8 op_from_bits(Vec8i a) { return {_mm256_castsi256_ps(a.v)}; }
MIXPREC_AVX2 inline Vec8i op_isnan(Vec8 a) { return {_mm256_castps_si256(_mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q))}; }
MIXPREC_AVX2 inline Vec8i op_lt(Vec8 a, float b) {
  return {_mm256_castps_si256(_mm256_cmp_ps(a.v, _mm256_set1_ps(b), _CMP_LT_OQ))};
}
MIXPREC_AVX2 inline Vec8i op_ge(Vec8 a, float b) {
  return {_mm256_castps_si256(_mm256_cmp_ps(a.v, _mm256_set1_ps(b), _CMP_GE_OQ))};
}
MIXPREC_AVX2 inline Vec8 op_abs(Vec8 a) { return {_mm256_andnot_ps(_mm256_set1_ps(-0.f), a.v)}; }
MIXPREC_AVX2 inline Vec8i op_eqz(Vec8i a) { return {_mm256_cmpeq_epi32(a.v, _mm256_setzero_si256())}; }
MIXPREC_AVX2 inline Vec8i op_select(Vec8i mask, Vec8i a, Vec8i b) { return {_mm256_blendv_epi8(b.v, a.v, mask.v)}; }
MIXPREC_AVX2 inline Vec8i op_andnot(Vec8i mask, Vec8i a) { return {_mm256_andnot_si256(mask.v, a.v)}; }
MIXPREC_AVX2 inline Vec8i op_abs_i32(Vec8i a) { return {_mm256_abs_epi32(a.v)}; }
MIXPREC_AVX2 inline Vec8i op_max_i32(Vec8i a, Vec8i b) { return {_mm256_max_epi32(a.v, b.v)}; }
MIXPREC_AVX2 inline Vec8i op_min_i32(Vec8i a, int32_t b) { return {_mm256_min_epi32(a.v, _mm256_set1_epi32(b))}; }
MIXPREC_AVX2 inline Vec8i op_max_u32(Vec8i a, Vec8i b) { return {_mm256_max_epu32(a.v, b.v)}; }

// The largest of the 8 lanes, unsigned.
MIXPREC_AVX2 inline uint32_t hmax_u32(Vec8i a) {
  __m128i m = _mm_max_epu32(_mm256_castsi256_si128(a.v), _mm256_extracti128_si256(a.v, 1));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0b01001110));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0b10110001));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(m));
}

// The low 16 / low 8 bits of each lane, packed (truncation, as a scalar static_cast), stored unaligned.
MIXPREC_AVX2 inline void store_low16(void* p, Vec8i a) {
  const __m256i lo = _mm256_shuffle_epi8(
      a.v, _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1, 0, 1, 4, 5, 8, 9, 12, 13, -1, -1,
                            -1, -1, -1, -1, -1, -1));
  _mm_storeu_si128(static_cast<__m128i*>(p), _mm256_castsi256_si128(_mm256_permute4x64_epi64(lo, 0b1000)));
}
MIXPREC_AVX2 inline void store_low8(void* p, Vec8i a) {
  const __m256i lo = _mm256_shuffle_epi8(
      a.v, _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12, -1, -1, -1, -1, -1,
                            -1, -1, -1, -1, -1, -1, -1));
  const __m256i packed = _mm256_permutevar8x32_epi32(lo, _mm256_setr_epi32(0, 4, 1, 1, 1, 1, 1, 1));
  _mm_storel_epi64(static_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

}  // namespace mixprec::avx2
