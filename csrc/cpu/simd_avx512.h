// AVX-512 vector types that run the shared element math (mixprec/adam_math.h, mixprec/rounding.h) on 16 fp32 lanes
// of a zmm register: the same op_* overloads as simd_avx2.h, so that the math is instantiated again, not copied.
// Include only from torch-free kernel files; every function carries the avx512 target attribute (chosen at run time
// with mixprec::cpu_supports_avx512(), csrc/cpu/cpu_features.h), so the rest of the translation unit stays portable.
//
// note: on the cores this was measured on (Intel, model 207) a zmm instruction does the work of two ymm ones but
// issues on two vector ports instead of three, and sqrt / div take the same time per element: the gain is fewer
// instructions per element, mostly from what AVX2 lacks: comparisons into mask registers and masked operations
// (no blend), direct narrowing stores (vpmov*), any-word shuffles (vpermw).
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "mixprec/common.h"

#define MIXPREC_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")))

namespace mixprec::avx512 {

struct Vec16 {
  __m512 v;
};
// 16 32-bit integer lanes, with the semantics of the scalar uint32_t operations of mixprec/rounding.h.
struct Vec16i {
  __m512i v;
};
// A per-lane truth value (the result of a comparison): it stands for the all-ones / zero lanes of the scalar
// op_mask, wherever the element math uses one.
struct Mask16 {
  __mmask16 k;
};

MIXPREC_AVX512 inline Vec16 broadcast16(float x) { return {_mm512_set1_ps(x)}; }
MIXPREC_AVX512 inline Vec16i broadcast16i(uint32_t x) { return {_mm512_set1_epi32(static_cast<int>(x))}; }

MIXPREC_AVX512 inline Vec16 op_add(Vec16 a, Vec16 b) { return {_mm512_add_ps(a.v, b.v)}; }
MIXPREC_AVX512 inline Vec16 op_mul(Vec16 a, Vec16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
MIXPREC_AVX512 inline Vec16 op_div(Vec16 a, Vec16 b) { return {_mm512_div_ps(a.v, b.v)}; }
MIXPREC_AVX512 inline Vec16 op_sqrt(Vec16 a) { return {_mm512_sqrt_ps(a.v)}; }
MIXPREC_AVX512 inline Vec16 op_neg(Vec16 a) { return {_mm512_xor_ps(a.v, _mm512_set1_ps(-0.f))}; }
// maxps returns its second operand when either is NaN: the scalar op_max's semantics.
MIXPREC_AVX512 inline Vec16 op_max(Vec16 a, Vec16 b) { return {_mm512_max_ps(a.v, b.v)}; }
MIXPREC_AVX512 inline Vec16 op_abs(Vec16 a) { return {_mm512_abs_ps(a.v)}; }

MIXPREC_AVX512 inline Vec16i operator+(Vec16i a, Vec16i b) { return {_mm512_add_epi32(a.v, b.v)}; }
MIXPREC_AVX512 inline Vec16i operator-(Vec16i a, Vec16i b) { return {_mm512_sub_epi32(a.v, b.v)}; }
MIXPREC_AVX512 inline Vec16i operator*(Vec16i a, Vec16i b) { return {_mm512_mullo_epi32(a.v, b.v)}; }
MIXPREC_AVX512 inline Vec16i operator&(Vec16i a, Vec16i b) { return {_mm512_and_si512(a.v, b.v)}; }
MIXPREC_AVX512 inline Vec16i operator|(Vec16i a, Vec16i b) { return {_mm512_or_si512(a.v, b.v)}; }
MIXPREC_AVX512 inline Vec16i operator^(Vec16i a, Vec16i b) { return {_mm512_xor_si512(a.v, b.v)}; }
MIXPREC_AVX512 inline Vec16i operator+(Vec16i a, uint32_t b) { return a + broadcast16i(b); }
MIXPREC_AVX512 inline Vec16i operator-(Vec16i a, uint32_t b) { return a - broadcast16i(b); }
MIXPREC_AVX512 inline Vec16i operator*(Vec16i a, uint32_t b) { return a * broadcast16i(b); }
MIXPREC_AVX512 inline Vec16i operator&(Vec16i a, uint32_t b) { return a & broadcast16i(b); }
MIXPREC_AVX512 inline Vec16i operator|(Vec16i a, uint32_t b) { return a | broadcast16i(b); }
MIXPREC_AVX512 inline Vec16i operator^(Vec16i a, uint32_t b) { return a ^ broadcast16i(b); }
// shift counts are constants after inlining (an immediate vpsrld / vpslld / vpsrad)
MIXPREC_AVX512 inline Vec16i operator>>(Vec16i a, int n) { return {_mm512_srli_epi32(a.v, n)}; }
MIXPREC_AVX512 inline Vec16i operator<<(Vec16i a, int n) { return {_mm512_slli_epi32(a.v, n)}; }
MIXPREC_AVX512 inline Vec16i op_sra(Vec16i a, int n) { return {_mm512_srai_epi32(a.v, n)}; }
MIXPREC_AVX512 inline Vec16i op_add_with_bit(Vec16i a, uint32_t c, int n) {
  const __mmask16 bit = _mm512_test_epi32_mask(a.v, _mm512_set1_epi32(1 << n));
  const __m512i plus_c = _mm512_add_epi32(a.v, _mm512_set1_epi32(static_cast<int>(c)));
  return {_mm512_mask_add_epi32(plus_c, bit, a.v, _mm512_set1_epi32(static_cast<int>(c + 1u)))};
}

MIXPREC_AVX512 inline Vec16i op_bits(Vec16 a) { return {_mm512_castps_si512(a.v)}; }
MIXPREC_AVX512 inline Vec16 op_from_bits(Vec16i a) { return {_mm512_castsi512_ps(a.v)}; }
MIXPREC_AVX512 inline Mask16 op_isnan(Vec16 a) { return {_mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q)}; }
MIXPREC_AVX512 inline Mask16 op_lt(Vec16 a, float b) { return {_mm512_cmp_ps_mask(a.v, _mm512_set1_ps(b), _CMP_LT_OQ)}; }
MIXPREC_AVX512 inline Mask16 op_ge(Vec16 a, float b) { return {_mm512_cmp_ps_mask(a.v, _mm512_set1_ps(b), _CMP_GE_OQ)}; }
MIXPREC_AVX512 inline Mask16 op_eqz(Vec16i a) { return {_mm512_testn_epi32_mask(a.v, a.v)}; }
MIXPREC_AVX512 inline Vec16i op_select(Mask16 m, Vec16i a, Vec16i b) { return {_mm512_mask_blend_epi32(m.k, b.v, a.v)}; }
MIXPREC_AVX512 inline Vec16i op_andnot(Mask16 m, Vec16i a) {
  return {_mm512_maskz_mov_epi32(static_cast<__mmask16>(~m.k), a.v)};
}
// A mask in integer arithmetic, as its all-ones / zero lanes: m & b is b where m holds, else 0 (one masked
// instruction: the compiler folds the zero-masking into the one that computes b); a ^ m flips the lanes where it
// holds, a - m adds one there.
MIXPREC_AVX512 inline Vec16i operator&(Mask16 m, Vec16i b) { return {_mm512_maskz_mov_epi32(m.k, b.v)}; }
MIXPREC_AVX512 inline Vec16i operator&(Mask16 m, uint32_t b) { return m & broadcast16i(b); }
MIXPREC_AVX512 inline Vec16i operator^(Vec16i a, Mask16 m) {
  return {_mm512_mask_xor_epi32(a.v, m.k, a.v, _mm512_set1_epi32(-1))};
}
MIXPREC_AVX512 inline Vec16i operator-(Vec16i a, Mask16 m) {
  return {_mm512_mask_sub_epi32(a.v, m.k, a.v, _mm512_set1_epi32(-1))};
}
MIXPREC_AVX512 inline Vec16i op_iabs(Vec16i a) { return {_mm512_abs_epi32(a.v)}; }
MIXPREC_AVX512 inline Vec16i op_imax(Vec16i a, Vec16i b) { return {_mm512_max_epi32(a.v, b.v)}; }
MIXPREC_AVX512 inline Vec16i op_imax(Vec16i a, int32_t b) { return {_mm512_max_epi32(a.v, _mm512_set1_epi32(b))}; }
MIXPREC_AVX512 inline Vec16i op_imin(Vec16i a, int32_t b) { return {_mm512_min_epi32(a.v, _mm512_set1_epi32(b))}; }
MIXPREC_AVX512 inline Vec16i op_umax(Vec16i a, Vec16i b) { return {_mm512_max_epu32(a.v, b.v)}; }
// (there is no zmm psignd: a mask from b, and the zero-masking folds into the instruction that computes a)
MIXPREC_AVX512 inline Vec16i op_zero_where_zero(Vec16i a, Vec16i b) {
  return {_mm512_maskz_mov_epi32(_mm512_test_epi32_mask(b.v, b.v), a.v)};
}
MIXPREC_AVX512 inline Vec16i op_negate_where_negative(Vec16i a, Vec16i b) {
  return {_mm512_mask_sub_epi32(a.v, _mm512_movepi32_mask(b.v), _mm512_setzero_si512(), a.v)};
}

// 32 16-bit integer lanes: only what the int8 decode (int8_value_hi16_*) needs, which then runs on 32 codes at once
// (the pair lanes of the AVX-512 kernel, as avx2::Vec16w does for the AVX2 ones).
struct Vec32w {
  __m512i v;
};
MIXPREC_AVX512 inline Vec32w operator+(Vec32w a, uint32_t b) {
  return {_mm512_add_epi16(a.v, _mm512_set1_epi16(static_cast<int16_t>(b)))};
}
MIXPREC_AVX512 inline Vec32w operator&(Vec32w a, uint32_t b) {
  return {_mm512_and_si512(a.v, _mm512_set1_epi16(static_cast<int16_t>(b)))};
}
MIXPREC_AVX512 inline Vec32w operator|(Vec32w a, Vec32w b) { return {_mm512_or_si512(a.v, b.v)}; }
MIXPREC_AVX512 inline Vec32w operator<<(Vec32w a, int n) { return {_mm512_slli_epi16(a.v, n)}; }
MIXPREC_AVX512 inline Vec32w op_iabs(Vec32w a) { return {_mm512_abs_epi16(a.v)}; }
// (no zmm psignw either: as op_zero_where_zero on Vec16i)
MIXPREC_AVX512 inline Vec32w op_zero_where_zero(Vec32w a, Vec32w b) {
  return {_mm512_maskz_mov_epi16(_mm512_test_epi16_mask(b.v, b.v), a.v)};
}

}  // namespace mixprec::avx512
