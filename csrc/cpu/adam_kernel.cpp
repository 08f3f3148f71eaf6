// note: GCC contracts a*b+c into an FMA inside avx2/fma functions even in ISO mode; the shared element math
// spells out each rounding (mixprec/adam_math.h), so contraction is turned off for this whole file (before
// any include, so that every function here is compiled with the same options and inlines freely).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif
// note: GCC 12 warns "'__Y' may be used uninitialized" inside its own AVX-512 intrinsics (_mm512_sqrt_ps and
// others: its bug 105593, fixed in GCC 13); silenced before any intrinsics header is read, for this file only.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ == 12
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "adam_kernel.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "mixprec/adam_dispatch.h"
#include "simd_avx2.h"
#include "simd_avx512.h"

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
  // with fp32 masters a half param is only written: the vector kernels may store it without reading it first
  static constexpr bool kWriteOnlyParam = M == MasterKind::Fp32 && T != DType::Float32;
  // some store rounds to bf16 on the bit pattern (RNE, SR, remainder split), whose NaN case the vector kernels
  // take only for vectors that hold a NaN: the param's (w) if it is bf16, the moments' if they are bf16 (vmax is
  // NaN only where v is: op_max's semantics)
  static constexpr bool kParamBits = T == DType::BFloat16 && M != MasterKind::Fp32;
  static constexpr bool kStateBits = S == StateKind::BFloat16;
  static constexpr bool kBf16Stores = kParamBits || kStateBits;
  // every stream has 16-bit or 8-bit elements: the vector kernels work on 16 (AVX2) or 32 (AVX-512) elements as
  // even/odd halves
  static constexpr bool kPairs = T == DType::BFloat16 && M != MasterKind::Fp32 && S != StateKind::Fp32;
};

// ---- lanes: the loads and stores of one step of the kernel loop ----
//
// kWidth consecutive elements at a time: one (the portable kernel, and the vector kernels' tails), 8 (AVX2), 16
// (AVX2 as even/odd pairs), 16 (AVX-512) or 32 (AVX-512 as even/odd pairs). F holds fp32 values, I 32-bit lanes (bit patterns, codes); the element math of
// mixprec/adam_math.h is instantiated for each. 16-bit elements come and go as the high half of a lane (hi16:
// bf16 params and states, whose fp32 bits they are) or the low half (lo16, remainders; loaded sign-extended).
// int8 codes load as the hi16 of their value before the scale (int8_value_hi16_*). "stash" keeps fp32 values in a
// buffer that only the same lanes read back (the pairs keep their own order there).
struct ScalarLanes {
  static constexpr int kWidth = 1;
  using F = float;
  using I = uint32_t;
  static const uint16_t* u16(const void* p) { return static_cast<const uint16_t*>(p); }
  static F broadcast(float x) { return x; }
  static F load_f32(const void* p, int64_t i) { return static_cast<const float*>(p)[i]; }
  static void store_f32(void* p, int64_t i, F v) { static_cast<float*>(p)[i] = v; }
  static F load_f16(const void* p, int64_t i) { return half_to_float(u16(p)[i]); }
  static void store_f16(void* p, int64_t i, F v) { static_cast<uint16_t*>(p)[i] = float_to_half_rne(v); }
  template <DType T>
  static void store_streaming(void* p, int64_t i, F v) { store_from_float<T>(p, i, v); }
  static I load_hi16(const void* p, int64_t i) { return static_cast<uint32_t>(u16(p)[i]) << 16; }
  static I load_lo16s(const void* p, int64_t i) {
    return static_cast<uint32_t>(static_cast<int32_t>(static_cast<const int16_t*>(p)[i]));
  }
  static void store_hi16(void* p, int64_t i, I t) { static_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(t >> 16); }
  static void store_lo16(void* p, int64_t i, I t) { static_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(t); }
  static I load_value_m(const void* p, int64_t i) {
    return int8_value_hi16_m(static_cast<uint32_t>(static_cast<int32_t>(static_cast<const int8_t*>(p)[i]))) << 16;
  }
  static I load_value_v(const void* p, int64_t i) {
    return int8_value_hi16_v(static_cast<uint32_t>(static_cast<const uint8_t*>(p)[i])) << 16;
  }
  static void store_codes(void* pm, void* pv, int64_t i, I km, I kv) {
    static_cast<uint8_t*>(pm)[i] = static_cast<uint8_t>(km);
    static_cast<uint8_t*>(pv)[i] = static_cast<uint8_t>(kv);
  }
  static void stash(float* p, int64_t i, F v) { p[i] = v; }
  static F unstash(const float* p, int64_t i) { return p[i]; }
  static I lane_index(uint32_t first) { return first; }  // the low words of the lanes' element indices
  static bool any_nan(F) { return true; }  // (never asked: one element takes the exact stores)
  static bool any_nan(F, F, F) { return true; }
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
  MIXPREC_AVX2 static __m128i load128(const void* p, int64_t i, int size) {
    return _mm_loadu_si128(static_cast<const __m128i*>(at(p, i, size)));
  }
  MIXPREC_AVX2 static F broadcast(float x) { return avx2::broadcast8(x); }
  MIXPREC_AVX2 static F load_f32(const void* p, int64_t i) { return {_mm256_loadu_ps(static_cast<const float*>(p) + i)}; }
  MIXPREC_AVX2 static void store_f32(void* p, int64_t i, F v) { _mm256_storeu_ps(static_cast<float*>(p) + i, v.v); }
  MIXPREC_AVX2 static F load_f16(const void* p, int64_t i) { return {_mm256_cvtph_ps(load128(p, i, 2))}; }
  MIXPREC_AVX2 static void store_f16(void* p, int64_t i, F v) {
    _mm_storeu_si128(static_cast<__m128i*>(at(p, i, 2)), avx2::pack_half8<DType::Float16>(v.v));
  }
  // note: a non-temporal store writes the param's cache lines without reading them first (read-for-ownership):
  // 2 bytes per param less on a write-only stream (16-byte aligned base, 8-element steps)
  template <DType T>
  MIXPREC_AVX2 static void store_streaming(void* p, int64_t i, F v) {
    _mm_stream_si128(static_cast<__m128i*>(at(p, i, 2)), avx2::pack_half8<T>(v.v));
  }
  MIXPREC_AVX2 static I load_hi16(const void* p, int64_t i) {
    return {_mm256_slli_epi32(_mm256_cvtepu16_epi32(load128(p, i, 2)), 16)};
  }
  MIXPREC_AVX2 static I load_lo16s(const void* p, int64_t i) { return {_mm256_cvtepi16_epi32(load128(p, i, 2))}; }
  MIXPREC_AVX2 static void store_hi16(void* p, int64_t i, I t) {
    _mm_storeu_si128(static_cast<__m128i*>(at(p, i, 2)), avx2::pack_high16(t));
  }
  MIXPREC_AVX2 static void store_lo16(void* p, int64_t i, I t) {
    _mm_storeu_si128(static_cast<__m128i*>(at(p, i, 2)), avx2::pack_low16(t));
  }
  MIXPREC_AVX2 static __m128i load64(const void* p, int64_t i) {
    return _mm_loadl_epi64(static_cast<const __m128i*>(at(p, i, 1)));
  }
  MIXPREC_AVX2 static I load_value_m(const void* p, int64_t i) {
    return int8_value_hi16_m(I{_mm256_cvtepi8_epi32(load64(p, i))}) << 16;
  }
  MIXPREC_AVX2 static I load_value_v(const void* p, int64_t i) {
    return int8_value_hi16_v(I{_mm256_cvtepu8_epi32(load64(p, i))}) << 16;
  }
  MIXPREC_AVX2 static void store_codes(void* pm, void* pv, int64_t i, I km, I kv) {
    avx2::store_low8(at(pm, i, 1), km);
    avx2::store_low8(at(pv, i, 1), kv);
  }
  MIXPREC_AVX2 static void stash(float* p, int64_t i, F v) { _mm256_storeu_ps(p + i, v.v); }
  MIXPREC_AVX2 static F unstash(const float* p, int64_t i) { return {_mm256_loadu_ps(p + i)}; }
  MIXPREC_AVX2 static I lane_index(uint32_t first) {
    return {_mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(first)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))};
  }
  MIXPREC_AVX2 static bool any_nan(F a, F b, F c) {
    const __m256 nan = _mm256_or_ps(_mm256_cmp_ps(a.v, b.v, _CMP_UNORD_Q), _mm256_cmp_ps(c.v, c.v, _CMP_UNORD_Q));
    return _mm256_movemask_ps(nan) != 0;
  }
  MIXPREC_AVX2 static bool any_nan(F a) { return _mm256_movemask_ps(_mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q)) != 0; }
  MIXPREC_AVX2 static uint32_t hmax(I v) { return avx2::hmax_u32(v); }
  MIXPREC_AVX2 static void fence() { _mm_sfence(); }  // non-temporal stores are weakly ordered: publish them
};

// 16 elements as (even, odd) halves (avx2::Pair), for variants whose streams are all 16-bit or 8-bit: one 256-bit
// load of 16 16-bit values splits into the halves with a shift or a mask, and the halves merge back the same
// way, where the 8-lane kernel spends a shuffle (the one port that does them) on every widening and narrowing.
struct PairLanes {
  static constexpr int kWidth = 16;
  using F = avx2::Pair<avx2::Vec8>;
  using I = avx2::Pair<avx2::Vec8i>;
  MIXPREC_AVX2 static __m256i load256(const void* p, int64_t i, int size) {
    return _mm256_loadu_si256(static_cast<const __m256i*>(Avx2Lanes::at(p, i, size)));
  }
  MIXPREC_AVX2 static void store256(void* p, int64_t i, int size, __m256i v) {
    _mm256_storeu_si256(static_cast<__m256i*>(Avx2Lanes::at(p, i, size)), v);
  }
  // the high halves of each 32-bit lane of x as (even, odd): element 2j is the low 16 bits of lane j
  MIXPREC_AVX2 static I split_hi16(__m256i x) {
    return {{_mm256_slli_epi32(x, 16)}, {_mm256_and_si256(x, _mm256_set1_epi32(static_cast<int>(0xffff0000u)))}};
  }
  MIXPREC_AVX2 static F broadcast(float x) { return {avx2::broadcast8(x), avx2::broadcast8(x)}; }
  MIXPREC_AVX2 static I load_hi16(const void* p, int64_t i) { return split_hi16(load256(p, i, 2)); }
  MIXPREC_AVX2 static I load_lo16s(const void* p, int64_t i) {
    const __m256i x = load256(p, i, 2);
    return {{_mm256_srai_epi32(_mm256_slli_epi32(x, 16), 16)}, {_mm256_srai_epi32(x, 16)}};
  }
  MIXPREC_AVX2 static void store_hi16(void* p, int64_t i, I t) {
    const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
    store256(p, i, 2, _mm256_or_si256(_mm256_srli_epi32(t.e.v, 16), _mm256_and_si256(t.o.v, hi)));
  }
  MIXPREC_AVX2 static void store_lo16(void* p, int64_t i, I t) {
    const __m256i lo = _mm256_set1_epi32(0xffff);
    store256(p, i, 2, _mm256_or_si256(_mm256_and_si256(t.e.v, lo), _mm256_slli_epi32(t.o.v, 16)));
  }
  // 16 codes widened to 16-bit lanes in order, decoded there 16 at a time, then split like hi16 values
  MIXPREC_AVX2 static I load_value_m(const void* p, int64_t i) {
    return split_hi16(int8_value_hi16_m(avx2::Vec16w{_mm256_cvtepi8_epi16(Avx2Lanes::load128(p, i, 1))}).v);
  }
  MIXPREC_AVX2 static I load_value_v(const void* p, int64_t i) {
    return split_hi16(int8_value_hi16_v(avx2::Vec16w{_mm256_cvtepu8_epi16(Avx2Lanes::load128(p, i, 1))}).v);
  }
  // even and odd codes merge into the low 16 bits of each lane (m's masked to their byte: they may be negative),
  // one saturating pack (exact: the values are < 2^16) puts m's and v's 16 bytes in the two 128-bit halves
  MIXPREC_AVX2 static void store_codes(void* pm, void* pv, int64_t i, I km, I kv) {
    const __m256i byte = _mm256_set1_epi32(0xff);
    const __m256i wm = _mm256_or_si256(_mm256_and_si256(km.e.v, byte), _mm256_slli_epi32(_mm256_and_si256(km.o.v, byte), 8));
    const __m256i wv = _mm256_or_si256(kv.e.v, _mm256_slli_epi32(kv.o.v, 8));
    const __m256i both = _mm256_permute4x64_epi64(_mm256_packus_epi32(wm, wv), 0b11011000);
    _mm_storeu_si128(static_cast<__m128i*>(Avx2Lanes::at(pm, i, 1)), _mm256_castsi256_si128(both));
    _mm_storeu_si128(static_cast<__m128i*>(Avx2Lanes::at(pv, i, 1)), _mm256_extracti128_si256(both, 1));
  }
  MIXPREC_AVX2 static void stash(float* p, int64_t i, F v) {
    _mm256_storeu_ps(p + i, v.e.v);
    _mm256_storeu_ps(p + i + 8, v.o.v);
  }
  MIXPREC_AVX2 static F unstash(const float* p, int64_t i) { return {{_mm256_loadu_ps(p + i)}, {_mm256_loadu_ps(p + i + 8)}}; }
  MIXPREC_AVX2 static I lane_index(uint32_t first) {
    const __m256i base = _mm256_set1_epi32(static_cast<int>(first));
    return {{_mm256_add_epi32(base, _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14))},
            {_mm256_add_epi32(base, _mm256_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15))}};
  }
  MIXPREC_AVX2 static bool any_nan(F a, F b, F c) {
    const __m256 ab = _mm256_or_ps(_mm256_cmp_ps(a.e.v, b.e.v, _CMP_UNORD_Q), _mm256_cmp_ps(a.o.v, b.o.v, _CMP_UNORD_Q));
    return _mm256_movemask_ps(_mm256_or_ps(ab, _mm256_cmp_ps(c.e.v, c.o.v, _CMP_UNORD_Q))) != 0;
  }
  MIXPREC_AVX2 static bool any_nan(F a) { return _mm256_movemask_ps(_mm256_cmp_ps(a.e.v, a.o.v, _CMP_UNORD_Q)) != 0; }
  MIXPREC_AVX2 static uint32_t hmax(I v) { return std::max(avx2::hmax_u32(v.e), avx2::hmax_u32(v.o)); }
  MIXPREC_AVX2 static void fence() { _mm_sfence(); }
};

// 16 consecutive elements in the 16 lanes of a zmm register. 16-bit elements narrow with one any-word shuffle
// (vpermw: the high or the low halves of the lanes) and widen in the load (vpmovzxwd / vpmovsxwd); int8 codes
// narrow with vpmovdb.
struct Avx512Lanes {
  static constexpr int kWidth = 16;
  using F = avx512::Vec16;
  using I = avx512::Vec16i;
  MIXPREC_AVX512 static __m256i load256(const void* p, int64_t i, int size) {
    return _mm256_loadu_si256(static_cast<const __m256i*>(Avx2Lanes::at(p, i, size)));
  }
  MIXPREC_AVX512 static void store256(void* p, int64_t i, __m256i v) {
    _mm256_storeu_si256(static_cast<__m256i*>(Avx2Lanes::at(p, i, 2)), v);
  }
  // the 16-bit halves (odd words: high, even words: low) of the 16 lanes, in order, in 256 bits
  MIXPREC_AVX512 static __m256i pack_words(I t, bool high) {
    const __m512i odd = _mm512_setr_epi32(0x00030001, 0x00070005, 0x000b0009, 0x000f000d, 0x00130011, 0x00170015,
                                          0x001b0019, 0x001f001d, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i idx = high ? odd : _mm512_sub_epi16(odd, _mm512_set1_epi16(1));
    return _mm512_castsi512_si256(_mm512_permutexvar_epi16(idx, t.v));
  }
  // the fp16 bits (RNE, F16C's conversion) or the bf16 bits (RNE on the bit pattern) of 16 values
  template <DType T>
  MIXPREC_AVX512 static __m256i pack_half16(F v) {
    if constexpr (T == DType::Float16) return _mm512_cvtps_ph(v.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    else return pack_words(bf16_rne_bits(v), true);
  }
  MIXPREC_AVX512 static F broadcast(float x) { return avx512::broadcast16(x); }
  MIXPREC_AVX512 static F load_f32(const void* p, int64_t i) { return {_mm512_loadu_ps(static_cast<const float*>(p) + i)}; }
  MIXPREC_AVX512 static void store_f32(void* p, int64_t i, F v) { _mm512_storeu_ps(static_cast<float*>(p) + i, v.v); }
  MIXPREC_AVX512 static F load_f16(const void* p, int64_t i) { return {_mm512_cvtph_ps(load256(p, i, 2))}; }
  MIXPREC_AVX512 static void store_f16(void* p, int64_t i, F v) { store256(p, i, pack_half16<DType::Float16>(v)); }
  // as Avx2Lanes::store_streaming (32-byte aligned base, 16-element steps)
  template <DType T>
  MIXPREC_AVX512 static void store_streaming(void* p, int64_t i, F v) {
    _mm256_stream_si256(static_cast<__m256i*>(Avx2Lanes::at(p, i, 2)), pack_half16<T>(v));
  }
  MIXPREC_AVX512 static I load_hi16(const void* p, int64_t i) {
    return {_mm512_slli_epi32(_mm512_cvtepu16_epi32(load256(p, i, 2)), 16)};
  }
  MIXPREC_AVX512 static I load_lo16s(const void* p, int64_t i) { return {_mm512_cvtepi16_epi32(load256(p, i, 2))}; }
  MIXPREC_AVX512 static void store_hi16(void* p, int64_t i, I t) { store256(p, i, pack_words(t, true)); }
  MIXPREC_AVX512 static void store_lo16(void* p, int64_t i, I t) { store256(p, i, pack_words(t, false)); }
  MIXPREC_AVX512 static I load_value_m(const void* p, int64_t i) {
    return int8_value_hi16_m(I{_mm512_cvtepi8_epi32(Avx2Lanes::load128(p, i, 1))}) << 16;
  }
  MIXPREC_AVX512 static I load_value_v(const void* p, int64_t i) {
    return int8_value_hi16_v(I{_mm512_cvtepu8_epi32(Avx2Lanes::load128(p, i, 1))}) << 16;
  }
  MIXPREC_AVX512 static void store_codes(void* pm, void* pv, int64_t i, I km, I kv) {
    _mm_storeu_si128(static_cast<__m128i*>(Avx2Lanes::at(pm, i, 1)), _mm512_cvtepi32_epi8(km.v));
    _mm_storeu_si128(static_cast<__m128i*>(Avx2Lanes::at(pv, i, 1)), _mm512_cvtepi32_epi8(kv.v));
  }
  MIXPREC_AVX512 static void stash(float* p, int64_t i, F v) { _mm512_storeu_ps(p + i, v.v); }
  MIXPREC_AVX512 static F unstash(const float* p, int64_t i) { return {_mm512_loadu_ps(p + i)}; }
  MIXPREC_AVX512 static I lane_index(uint32_t first) {
    return {_mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(first)),
                             _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15))};
  }
  MIXPREC_AVX512 static bool any_nan(F a, F b, F c) {
    return (_mm512_cmp_ps_mask(a.v, b.v, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(c.v, c.v, _CMP_UNORD_Q)) != 0;
  }
  MIXPREC_AVX512 static bool any_nan(F a) { return _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q) != 0; }
  MIXPREC_AVX512 static uint32_t hmax(I v) { return static_cast<uint32_t>(_mm512_reduce_max_epu32(v.v)); }
  MIXPREC_AVX512 static void fence() { _mm_sfence(); }
};

// 32 elements as (even, odd) zmm halves (avx2::Pair<avx512::Vec16>), for the same variants as PairLanes: one 512-bit
// load of 32 16-bit values splits into the halves with one shift or mask each, and the halves merge back with a
// shift and one vpternlogd, where Avx512Lanes spends a widening load (vpmovzxwd, a shuffle) per 16 elements and a
// vpermw per 16 stored. The compact modes are instruction-throughput bound on AVX-512 (see simd_avx512.h), so these
// shuffles were a large share of their instructions. Measured (GCC 12, AdamW loop per 16 elements, instructions of
// the update loop and, int8, the encode loop; bench adam_modes, 4 runs each, % of the stream ceiling): remainder +
// bf16 states 67 -> 52 instructions, 82-88% -> 86-92%; remainder + int8 states 97 -> 83, 55-57% -> 60-63%.
struct Avx512PairLanes {
  static constexpr int kWidth = 32;
  using F = avx2::Pair<avx512::Vec16>;
  using I = avx2::Pair<avx512::Vec16i>;
  MIXPREC_AVX512 static __m512i load512(const void* p, int64_t i, int size) {
    return _mm512_loadu_si512(Avx2Lanes::at(p, i, size));
  }
  MIXPREC_AVX512 static void store512(void* p, int64_t i, __m512i v) { _mm512_storeu_si512(Avx2Lanes::at(p, i, 2), v); }
  // the high halves of each 32-bit lane of x as (even, odd): element 2j is the low 16 bits of lane j
  MIXPREC_AVX512 static I split_hi16(__m512i x) {
    return {{_mm512_slli_epi32(x, 16)}, {_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xffff0000u)))}};
  }
  // (a | (b & c)), one vpternlogd: 0xf0, 0xcc, 0xaa are the truth tables of a, b, c
  MIXPREC_AVX512 static __m512i or_and(__m512i a, __m512i b, __m512i c) {
    return _mm512_ternarylogic_epi32(a, b, c, 0xf0 | (0xcc & 0xaa));
  }
  MIXPREC_AVX512 static F broadcast(float x) { return {avx512::broadcast16(x), avx512::broadcast16(x)}; }
  MIXPREC_AVX512 static I load_hi16(const void* p, int64_t i) { return split_hi16(load512(p, i, 2)); }
  MIXPREC_AVX512 static I load_lo16s(const void* p, int64_t i) {
    const __m512i x = load512(p, i, 2);
    return {{_mm512_srai_epi32(_mm512_slli_epi32(x, 16), 16)}, {_mm512_srai_epi32(x, 16)}};
  }
  MIXPREC_AVX512 static void store_hi16(void* p, int64_t i, I t) {
    store512(p, i, or_and(_mm512_srli_epi32(t.e.v, 16), t.o.v, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  MIXPREC_AVX512 static void store_lo16(void* p, int64_t i, I t) {
    store512(p, i, or_and(_mm512_slli_epi32(t.o.v, 16), t.e.v, _mm512_set1_epi32(0xffff)));
  }
  // 32 codes widened to 16-bit lanes in order (vpmovsxbw / vpmovzxbw), decoded there 32 at a time, then split like
  // hi16 values
  MIXPREC_AVX512 static I load_value_m(const void* p, int64_t i) {
    return split_hi16(int8_value_hi16_m(avx512::Vec32w{_mm512_cvtepi8_epi16(Avx512Lanes::load256(p, i, 1))}).v);
  }
  MIXPREC_AVX512 static I load_value_v(const void* p, int64_t i) {
    return split_hi16(int8_value_hi16_v(avx512::Vec32w{_mm512_cvtepu8_epi16(Avx512Lanes::load256(p, i, 1))}).v);
  }
  // the even code in the low byte of each lane's low word, the odd one in its high byte (one vpternlogd picks the
  // bits: m's codes may be negative, and a bitwise select drops their sign bits), then vpmovdw keeps the low
  // words: the 32 codes in order
  MIXPREC_AVX512 static __m256i merge_codes(I k) {
    // (a ? b : c bitwise, with a = 0xff: the truth table (0xf0 & 0xcc) | (~0xf0 & 0xaa))
    const __m512i bytes = _mm512_ternarylogic_epi32(_mm512_set1_epi32(0xff), k.e.v, _mm512_slli_epi32(k.o.v, 8), 0xca);
    return _mm512_cvtepi32_epi16(bytes);
  }
  MIXPREC_AVX512 static void store_codes(void* pm, void* pv, int64_t i, I km, I kv) {
    _mm256_storeu_si256(static_cast<__m256i*>(Avx2Lanes::at(pm, i, 1)), merge_codes(km));
    _mm256_storeu_si256(static_cast<__m256i*>(Avx2Lanes::at(pv, i, 1)), merge_codes(kv));
  }
  MIXPREC_AVX512 static void stash(float* p, int64_t i, F v) {
    _mm512_storeu_ps(p + i, v.e.v);
    _mm512_storeu_ps(p + i + 16, v.o.v);
  }
  MIXPREC_AVX512 static F unstash(const float* p, int64_t i) {
    return {{_mm512_loadu_ps(p + i)}, {_mm512_loadu_ps(p + i + 16)}};
  }
  MIXPREC_AVX512 static I lane_index(uint32_t first) {
    const __m512i base = _mm512_set1_epi32(static_cast<int>(first));
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    return {{_mm512_add_epi32(base, even)}, {_mm512_add_epi32(base, _mm512_add_epi32(even, _mm512_set1_epi32(1)))}};
  }
  MIXPREC_AVX512 static bool any_nan(F a, F b, F c) {
    return (_mm512_cmp_ps_mask(a.e.v, b.e.v, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(a.o.v, b.o.v, _CMP_UNORD_Q) |
            _mm512_cmp_ps_mask(c.e.v, c.o.v, _CMP_UNORD_Q)) != 0;
  }
  MIXPREC_AVX512 static bool any_nan(F a) { return _mm512_cmp_ps_mask(a.e.v, a.o.v, _CMP_UNORD_Q) != 0; }
  MIXPREC_AVX512 static uint32_t hmax(I v) {
    return static_cast<uint32_t>(_mm512_reduce_max_epu32(_mm512_max_epu32(v.e.v, v.o.v)));
  }
  MIXPREC_AVX512 static void fence() { _mm_sfence(); }
};

// A value of storage type T: loaded to fp32, stored rounded to nearest even.
template <DType T, class L>
typename L::F load_value(const void* p, int64_t i) {
  if constexpr (T == DType::Float32) return L::load_f32(p, i);
  else if constexpr (T == DType::Float16) return L::load_f16(p, i);
  else return op_from_bits(L::load_hi16(p, i));
}

template <DType T, bool kMayBeNaN, class L>
void store_value(void* p, int64_t i, typename L::F v) {
  if constexpr (T == DType::Float32) L::store_f32(p, i, v);
  else if constexpr (T == DType::Float16) L::store_f16(p, i, v);
  else L::store_hi16(p, i, bf16_rne_bits<kMayBeNaN>(v));
}

template <class L>
AdamCoeffs<typename L::F> broadcast_coeffs(const AdamCoeffs<float>& c) {
  return {L::broadcast(c.grad_factor),     L::broadcast(c.weight_decay), L::broadcast(c.decay),
          L::broadcast(c.beta1),           L::broadcast(c.one_minus_beta1), L::broadcast(c.beta2),
          L::broadcast(c.one_minus_beta2), L::broadcast(c.inv_bc2_sqrt), L::broadcast(c.eps),
          L::broadcast(c.neg_step_size)};
}

// One quantization block of int8 states while it is updated: its stored scales, the new fp32 moments of its
// elements (stashed until the block's absmax is known, then encoded) and their running absmax bits.
struct Int8Segment {
  int64_t begin;            // its first element, in the CPU block
  float scale_m, scale_v;   // the scales the update decodes with
  float* m;                 // the new exp_avg of element i at m[i - begin] (in the lanes' stash order)
  float* v;
  uint32_t max_m, max_v;    // max of int8_abs_bits over the elements done so far
};

// The stores of the param side and of fp32 / bf16 states after the update of elements [i, i + kWidth).
template <class K, class L, bool kMayBeNaN>
void store_outputs(const AdamBlock& b, int64_t i, const AdamSlots<typename L::F>& s, bool stream_param,
                   typename L::I index_lo, uint32_t index_hi) {
  constexpr DType T = K::kDType;
  // the NaN-free forms only for the values the caller checked
  constexpr bool kParamNaN = kMayBeNaN || !K::kParamBits, kStateNaN = kMayBeNaN || !K::kStateBits;
  if constexpr (K::kState != StateKind::Int8) {
    store_value<K::kStateDType, kStateNaN, L>(b.exp_avg, i, s.exp_avg);
    store_value<K::kStateDType, kStateNaN, L>(b.exp_avg_sq, i, s.exp_avg_sq);
    if constexpr (K::kAms) store_value<K::kStateDType, kStateNaN, L>(b.max_exp_avg_sq, i, s.max_exp_avg_sq);
  }
  if constexpr (K::kMaster == MasterKind::Fp32) {
    L::store_f32(b.master, i, s.param);
    if (stream_param) L::template store_streaming<T>(b.param, i, s.param);
    else store_value<T, kParamNaN, L>(b.param, i, s.param);
  } else if constexpr (K::kMaster == MasterKind::Remainder) {
    const auto split = remainder_split<kParamNaN>(s.param);
    L::store_hi16(b.param, i, split.param);
    L::store_lo16(b.remainder, i, split.remainder);
  } else if constexpr (K::kSR) {
    L::store_hi16(b.param, i, bf16_sr_bits<kParamNaN>(s.param, sr_bits(b.sr_key, index_lo, index_hi)));
  } else {
    store_value<T, kParamNaN, L>(b.param, i, s.param);
  }
}

// note: a software prefetch of every stream the update reads, 2 KB ahead in its largest one (the same distance in
// elements for the others), as the unscale kernel does (unscale_kernel.cpp): the hardware prefetcher alone keeps
// too few lines in flight. Measured on one core (CPU time, GPT-2 list): fp32 masters 37 -> 33 ms, no masters + SR
// 34 -> 28 ms, remainder + bf16 states 26 -> 24 ms; 1 KB and 4 KB ahead did no better. Past the end it is
// harmless (prefetches never fault).
constexpr int64_t kPrefetchBytes = 2048;

template <class K>
void prefetch_streams(const AdamBlock& b, int64_t i) {
  constexpr int64_t kSize = K::kDType == DType::Float32 ? 4 : 2;
  constexpr int64_t kState = K::kState == StateKind::Fp32 ? 4 : K::kState == StateKind::BFloat16 ? 2 : 1;
  constexpr int64_t kLargest = K::kMaster == MasterKind::Fp32 ? 4 : std::max(kSize, kState);
  const int64_t j = i + kPrefetchBytes / kLargest;  // elements ahead
  const auto ahead = [j](const void* p, int64_t size) {
    __builtin_prefetch(static_cast<const char*>(p) + j * size, 0, 3);
  };
  if constexpr (!K::kWriteOnlyParam) ahead(b.param, kSize);
  ahead(b.grad, kSize);
  if constexpr (K::kMaster == MasterKind::Fp32) ahead(b.master, 4);
  if constexpr (K::kMaster == MasterKind::Remainder) ahead(b.remainder, 2);
  ahead(b.exp_avg, kState);
  ahead(b.exp_avg_sq, kState);
  if constexpr (K::kAms) ahead(b.max_exp_avg_sq, kState);
}

// Elements [begin, end) of the block (end - begin a multiple of L::kWidth): every load, the update, every store,
// for variant K. With int8 states the elements belong to seg's quantization block, and their new moments go to
// seg instead of memory.
template <class K, class L>
void update_elements(const AdamBlock& block, const AdamCoeffs<typename L::F>& coeffs, const AdamFlags& flags_ref,
                     int64_t begin, int64_t end, bool stream_param, Int8Segment* seg) {
  // note: local copies: the vector stores may alias anything (__m128i_u), which would make the compiler reload
  // every pointer and coefficient from memory after each store
  const AdamBlock b = block;
  const AdamCoeffs<typename L::F> c = coeffs;
  const AdamFlags flags = flags_ref;
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
  // the element indices of the lanes, for stochastic rounding: a block never straddles a multiple of 2^32, so the
  // high word is the block's and the low words count up
  const uint64_t first = static_cast<uint64_t>(b.first_index + begin);
  const uint32_t index_hi = static_cast<uint32_t>(first >> 32);
  I index_lo = L::lane_index(static_cast<uint32_t>(first));
  for (int64_t i = begin; i < end; i += L::kWidth, index_lo = index_lo + static_cast<uint32_t>(L::kWidth)) {
    if constexpr (L::kWidth > 1) prefetch_streams<K>(b, i);
    AdamSlots<F> s;
    if constexpr (K::kMaster == MasterKind::Fp32) s.param = L::load_f32(b.master, i);
    else if constexpr (K::kMaster == MasterKind::Remainder)
      s.param = remainder_join(L::load_hi16(b.param, i), L::load_lo16s(b.remainder, i));
    else s.param = load_value<T, L>(b.param, i);
    s.grad = load_value<T, L>(b.grad, i);
    if constexpr (kInt8) {
      s.exp_avg = int8_decode(L::load_value_m(b.exp_avg, i), scale_m);
      s.exp_avg_sq = int8_decode(L::load_value_v(b.exp_avg_sq, i), scale_v);
    } else {
      s.exp_avg = load_value<K::kStateDType, L>(b.exp_avg, i);
      s.exp_avg_sq = load_value<K::kStateDType, L>(b.exp_avg_sq, i);
      if constexpr (K::kAms) s.max_exp_avg_sq = load_value<K::kStateDType, L>(b.max_exp_avg_sq, i);
    }

    adam_update<K::kDec, K::kAms>(s, c, flags);

    if constexpr (kInt8) {
      L::stash(seg->m, i - seg->begin, s.exp_avg);
      L::stash(seg->v, i - seg->begin, s.exp_avg_sq);
      max_m = op_umax(max_m, int8_abs_bits(s.exp_avg));
      max_v = op_umax(max_v, int8_abs_bits<true>(s.exp_avg_sq));
    }
    // (int8 moments go to the stash, not through these stores: a NaN there makes its block take the exact encoder)
    if constexpr (K::kBf16Stores && L::kWidth > 1) {
      bool nan;
      if constexpr (K::kParamBits && K::kStateBits) nan = L::any_nan(s.param, s.exp_avg, s.exp_avg_sq);
      else if constexpr (K::kParamBits) nan = L::any_nan(s.param);
      else nan = L::any_nan(s.exp_avg, s.exp_avg, s.exp_avg_sq);
      if (nan) [[unlikely]] store_outputs<K, L, true>(b, i, s, stream_param, index_lo, index_hi);
      else store_outputs<K, L, false>(b, i, s, stream_param, index_lo, index_hi);
    } else {
      store_outputs<K, L, true>(b, i, s, stream_param, index_lo, index_hi);
    }
  }
  if constexpr (kInt8) {
    seg->max_m = std::max(seg->max_m, L::hmax(max_m));
    seg->max_v = std::max(seg->max_v, L::hmax(max_v));
  }
}

// Codes of elements [begin, end) of a quantization block (indices from its start) from its stashed moments.
template <class L, bool kExact>
void encode_elements(const Int8Segment& seg, float inv_m, float inv_v, void* codes_m, void* codes_v, int64_t begin,
                     int64_t end) {
  const auto im = L::broadcast(inv_m), iv = L::broadcast(inv_v);
  for (int64_t i = begin; i < end; i += L::kWidth) {
    L::store_codes(codes_m, codes_v, i, int8_encode_m<kExact>(L::unstash(seg.m, i), im),
                   int8_encode_v<kExact>(L::unstash(seg.v, i), iv));
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

// The same split as update_range's, so that each element is read back from the stash by the lanes that put it.
template <class L, bool kExact>
void encode_range(const Int8Segment& seg, float inv_m, float inv_v, void* codes_m, void* codes_v, int64_t n) {
  const int64_t split = n / L::kWidth * L::kWidth;
  encode_elements<L, kExact>(seg, inv_m, inv_v, codes_m, codes_v, 0, split);
  if constexpr (L::kWidth > 1) encode_elements<ScalarLanes, kExact>(seg, inv_m, inv_v, codes_m, codes_v, split, n);
}

// The whole block. With int8 states it goes one quantization block at a time, each whole: decode with the stored
// scales, update (params, masters, remainders written in the same loop), absmax of the new moments, encode.
template <class K, class L>
void adam_block_impl(const AdamBlock& b, const AdamCoeffs<float>& c, const AdamFlags& flags) {
  const AdamCoeffs<typename L::F> cv = broadcast_coeffs<L>(c);
  // (the streaming stores of L::kWidth 16-bit elements need a base aligned to their size)
  const bool stream_param =
      K::kWriteOnlyParam && L::kWidth > 1 && reinterpret_cast<uintptr_t>(b.param) % (2 * L::kWidth) == 0;
  if constexpr (K::kState == StateKind::Int8) {
    for (int64_t q = 0; q < b.n; q += kInt8Block) {
      const int64_t n = std::min<int64_t>(kInt8Block, b.n - q);
      alignas(32) float m[kInt8Block], v[kInt8Block];
      const int64_t block = q / kInt8Block;
      Int8Segment seg{q, b.exp_avg_scale[block], b.exp_avg_sq_scale[block], m, v, 0u, 0u};
      update_range<K, L>(b, cv, c, flags, q, q + n, stream_param, &seg);
      const float scale_m = int8_scale(seg.max_m), scale_v = int8_scale(seg.max_v);
      const float inv_m = int8_inverse(scale_m), inv_v = int8_inverse(scale_v);
      void* codes_m = static_cast<int8_t*>(b.exp_avg) + q;
      void* codes_v = static_cast<uint8_t*>(b.exp_avg_sq) + q;
      if (int8_finite(scale_m, inv_m) && int8_finite(scale_v, inv_v)) [[likely]] {
        encode_range<L, false>(seg, inv_m, inv_v, codes_m, codes_v, n);
      } else {
        encode_range<L, true>(seg, inv_m, inv_v, codes_m, codes_v, n);
      }
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
  adam_block_impl<K, std::conditional_t<K::kPairs, PairLanes, Avx2Lanes>>(b, c, flags);
}

// The same with the AVX-512 lanes (as pairs of zmm halves where every stream is 16-bit or 8-bit).
template <class K>
MIXPREC_AVX512 __attribute__((flatten)) void adam_avx512(const AdamBlock& b, const AdamCoeffs<float>& c,
                                                          const AdamFlags& flags) {
  adam_block_impl<K, std::conditional_t<K::kPairs, Avx512PairLanes, Avx512Lanes>>(b, c, flags);
}

template <class K>
void adam_portable(const AdamBlock& b, const AdamCoeffs<float>& c, const AdamFlags& flags) {
  adam_block_impl<K, ScalarLanes>(b, c, flags);
}

}  // namespace

void adam_block(const AdamBlock& block, const AdamVariant& v, const AdamCoeffs<float>& coeffs, const AdamFlags& flags,
                CpuSimd simd) {
  dispatch_adam_variant(v.dtype, v.master, v.state, v.amsgrad, v.decoupled, v.stochastic,
                        [&](auto T, auto master, auto state, auto amsgrad, auto decoupled, auto stochastic) {
                          using K = Kind<T, master, state, amsgrad, decoupled, stochastic>;
                          if (simd == CpuSimd::Avx512) adam_avx512<K>(block, coeffs, flags);
                          else if (simd == CpuSimd::Avx2) adam_avx2<K>(block, coeffs, flags);
                          else adam_portable<K>(block, coeffs, flags);
                        });
}

}  // namespace mixprec::cpu
