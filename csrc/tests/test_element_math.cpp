// The shared element math (csrc/include/mixprec) against torch's own conversions, on the CPU: the CUDA
// kernels compile the same functions, so this checks the arithmetic the GPU runs.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdio>
#include <random>

#include "../cpu/cpu_features.h"
#include "../cpu/simd_avx2.h"
#include "../cpu/simd_avx512.h"
#include "mixprec/adam_math.h"
#include "mixprec/rounding.h"
#include "mixprec/unscale_math.h"

namespace {

int failures = 0;

void check(bool ok, const char* what, uint32_t input_bits, uint32_t got, uint32_t want) {
  if (!ok && ++failures <= 10) {
    std::printf("FAIL %s: input %#010x -> got %#06x, want %#06x\n", what, input_bits, got, want);
  }
}

// Rounds one fp32 to fp16 and bf16 both ways and compares (any NaN matches any NaN).
void check_round(float f) {
  const uint32_t in = mixprec::float_bits(f);
  const bool nan = std::isnan(f);
  const uint16_t h = mixprec::float_to_half_rne(f), h_ref = c10::Half(f).x;
  check(nan ? std::isnan(mixprec::half_to_float(h)) : h == h_ref, "float_to_half_rne", in, h, h_ref);
  const uint16_t b = mixprec::float_to_bf16_rne(f), b_ref = c10::BFloat16(f).x;
  check(nan ? std::isnan(mixprec::bf16_to_float(b)) : b == b_ref, "float_to_bf16_rne", in, b, b_ref);
}

// ---- adam_step_'s loads and stores (issue #12): remainder masters, int8 codes, stochastic rounding ----

// Store then load of a remainder master gives the fp32 bits back; the param is the master rounded to nearest even
// except at exact ties, where it is the larger magnitude; a NaN stores a quiet NaN (sign, top bits) and 0.
void check_remainder(uint32_t u) {
  const float w = mixprec::bits_float(u);
  const auto split = mixprec::remainder_split(w);
  const uint32_t param_hi16 = split.param & 0xffff0000u;
  const uint32_t rem = static_cast<uint32_t>(static_cast<int32_t>(static_cast<int16_t>(split.remainder)));
  const uint32_t back = mixprec::float_bits(mixprec::remainder_join(param_hi16, rem));
  const uint16_t param = static_cast<uint16_t>(split.param >> 16);
  if (std::isnan(w)) {
    check(param == static_cast<uint16_t>((u >> 16) | 0x40u) && (split.remainder & 0xffffu) == 0, "remainder_split NaN",
          u, param, (u >> 16) | 0x40u);
    return;
  }
  check(back == u, "remainder join(split(u)) == u", u, back, u);
  const uint16_t rne = c10::BFloat16(w).x;
  const bool tie = (u & 0xffffu) == 0x8000u;
  const uint16_t want = tie ? static_cast<uint16_t>((u >> 16) + 1u) : rne;  // ties away from zero
  check(param == want, "remainder_split param", u, param, want);
  // the fast (NaN-free) store is the same formula
  const auto fast = mixprec::remainder_split<false>(w);
  check(fast.param >> 16 == split.param >> 16 && (fast.remainder & 0xffffu) == (split.remainder & 0xffffu),
        "remainder_split<false>", u, fast.param >> 16, split.param >> 16);
}

// The spec's value map: value(0) = 0, value(k) = float_from_bits((k + bias) << 20).
float int8_value(uint32_t k, uint32_t bias) { return k == 0 ? 0.f : mixprec::bits_float((k + bias) << 20); }

// The code the spec's closed form must give, found by search: the nearest value(k) to x in [0, 1]; between 0
// and value(1) ties go up, elsewhere an exact tie between neighbours takes the one whose r = k + bias is even
// (round half to even on the bit pattern).
uint32_t int8_nearest(float x, uint32_t bias, uint32_t kmax) {
  if (std::isnan(x)) return kmax;
  uint32_t best = 0;
  for (uint32_t k = 1; k <= kmax; ++k) {
    const double d = std::fabs(static_cast<double>(x) - int8_value(k, bias));
    const double db = std::fabs(static_cast<double>(x) - int8_value(best, bias));
    if (d < db || (d == db && (best == 0 || (k + bias) % 2 == 0))) best = k;
  }
  return best;
}

void check_int8_codes(std::mt19937& rng) {
  using mixprec::kInt8BiasM;
  using mixprec::kInt8BiasV;
  // decode: every code, through the bf16-valued form the kernels use
  for (uint32_t c = 0; c < 256; ++c) {
    const int32_t sc = static_cast<int8_t>(c);
    const float vm = mixprec::bits_float(mixprec::int8_value_hi16_m(static_cast<uint32_t>(sc)) << 16);
    const float want_m = (sc < 0 ? -1.f : 1.f) * int8_value(static_cast<uint32_t>(std::abs(sc)), kInt8BiasM);
    check(mixprec::float_bits(vm) == mixprec::float_bits(want_m) || (sc == 0 && vm == 0.f), "int8 value m", c,
          mixprec::float_bits(vm), mixprec::float_bits(want_m));
    const float vv = mixprec::bits_float(mixprec::int8_value_hi16_v(c) << 16);
    check(mixprec::float_bits(vv) == mixprec::float_bits(int8_value(c, kInt8BiasV)), "int8 value v", c,
          mixprec::float_bits(vv), mixprec::float_bits(int8_value(c, kInt8BiasV)));
  }
  check(int8_value(127, kInt8BiasM) == 1.f && int8_value(255, kInt8BiasV) == 1.f, "int8 value(kmax) == 1", 0, 0, 0);
  check(mixprec::int8_half_value1(kInt8BiasM) == 0.5f * int8_value(1, kInt8BiasM) &&
            mixprec::int8_half_value1(kInt8BiasV) == 0.5f * int8_value(1, kInt8BiasV),
        "int8_half_value1", 0, 0, 0);
  // encode: the closed form against the search, on every code value, the midpoints between neighbours and one
  // fp32 ulp either side, and random x in [0, 1]; exact and fast (finite block) forms alike
  auto check_x = [](float x) {
    for (int moment = 0; moment < 2; ++moment) {
      const uint32_t bias = moment == 0 ? kInt8BiasM : kInt8BiasV, kmax = moment == 0 ? 127u : 255u;
      const uint32_t want = int8_nearest(x, bias, kmax);
      const float inv = 1.f;  // x is |value| / scale already
      const uint32_t exact = moment == 0 ? mixprec::int8_encode_m(x, inv) : mixprec::int8_encode_v(x, inv);
      check(exact == want, moment == 0 ? "int8_encode_m" : "int8_encode_v", mixprec::float_bits(x), exact, want);
      if (x <= 1.f + 0x1p-23f) {
        const uint32_t fast = moment == 0 ? mixprec::int8_encode_m<false>(x, inv) : mixprec::int8_encode_v<false>(x, inv);
        check(fast == want, "int8_encode<false>", mixprec::float_bits(x), fast, want);
      }
      if (moment == 0) {  // m's sign: -k for x < 0, and -0.0 gives 0
        const uint32_t neg = mixprec::int8_encode_m(-x, inv), neg_fast = mixprec::int8_encode_m<false>(-x, inv);
        check(neg == 0u - want && neg_fast == 0u - want, "int8_encode_m sign", mixprec::float_bits(-x), neg, 0u - want);
      }
    }
  };
  for (uint32_t k = 0; k <= 255; ++k) {
    for (const uint32_t bias : {kInt8BiasM, kInt8BiasV}) {
      if (bias == kInt8BiasM && k > 127) continue;
      const float a = int8_value(k, bias), b = int8_value(k + 1, bias);
      check_x(a);
      if ((bias == kInt8BiasM && k == 127) || k == 255) continue;
      const float mid = static_cast<float>((static_cast<double>(a) + b) / 2);
      check_x(mid);
      check_x(std::nextafter(mid, 0.f));
      check_x(std::nextafter(mid, 2.f));
    }
  }
  std::uniform_real_distribution<float> unit(0.f, 1.f);
  for (int i = 0; i < 20000; ++i) {
    check_x(unit(rng));
    check_x(std::ldexp(unit(rng), -static_cast<int>(rng() % 40)));  // the small codes, down past value(1)
  }
  check_x(1.f + 0x1p-23f);
  check_x(0.f);
  // non-finite x (from a NaN or inf in the block): the largest code
  check(mixprec::int8_encode_m(NAN, 1.f) == 127u && mixprec::int8_encode_v(NAN, 1.f) == 255u &&
            mixprec::int8_encode_v(INFINITY, 1.f) == 255u,
        "int8 encode NaN/inf", 0, 0, 0);
  // block scale and inverse: the absmax, a canonical NaN, 1 / scale or 0
  check(mixprec::float_bits(mixprec::int8_scale(0x7f800001u)) == 0x7fc00000u && mixprec::int8_scale(0x3f800000u) == 1.f,
        "int8_scale", 0, 0, 0);
  check(mixprec::int8_inverse(0.f) == 0.f && mixprec::int8_inverse(4.f) == 0.25f, "int8_inverse", 0, 0, 0);
  check(!mixprec::int8_finite(INFINITY, 0.f) && !mixprec::int8_finite(1e-40f, mixprec::int8_inverse(1e-40f)) &&
            mixprec::int8_finite(0.f, 0.f),
        "int8_finite", 0, 0, 0);
}

using mixprec::avx2::Pair;
using mixprec::avx2::Vec16w;
using mixprec::avx2::Vec8;
using mixprec::avx2::Vec8i;
MIXPREC_AVX2 Vec8i load(const uint32_t* p) { return {_mm256_load_si256(reinterpret_cast<const __m256i*>(p))}; }
MIXPREC_AVX2 void store(uint32_t* p, Vec8i v) { _mm256_store_si256(reinterpret_cast<__m256i*>(p), v.v); }
MIXPREC_AVX2 Vec8 loadf(const uint32_t* p) { return {_mm256_castsi256_ps(load(p).v)}; }

// The AVX2 lanes against the scalar functions: the same element math on 8 lanes (Vec8/Vec8i), 16 as even/odd
// pairs, and 16-bit lanes (the int8 decode). flatten, as in the CPU kernel: the generic templates must be
// inlined into the avx2 function (out of line, compiled for the baseline ABI, they would pass the 32-byte vectors
// differently from the avx2 functions they call).
MIXPREC_AVX2 __attribute__((flatten)) void check_avx2_lanes(std::mt19937& rng) {
  alignas(32) uint32_t in[16], out[16], out2[16], r16[8];
  const uint32_t key = mixprec::sr_key(1234u, 7u, 3u);
  // the bits themselves, from mixprec.reference's _hash32 (seed 1234, stream 7, step 3)
  check(key == 0x4efedfafu, "sr_key", 0, key, 0x4efedfafu);
  const std::pair<uint64_t, uint32_t> golden[] = {{0, 0xaed9u}, {1, 0x886bu}, {12345, 0xfd8bu}, {(5ull << 32) + 99, 0xc118u}};
  for (const auto& [index, bits] : golden) {
    check(mixprec::sr_bits(key, index) == bits, "sr_bits", static_cast<uint32_t>(index), mixprec::sr_bits(key, index), bits);
  }
  for (int iter = 0; iter < 200000; ++iter) {
    // hash: 8 and 16 consecutive indices from a random start (the kernels' SR bits) and random words
    const uint32_t lo = rng(), hi = rng() % 4;
    const Vec8i lanes{_mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(lo)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))};
    store(out, mixprec::sr_bits(key, lanes, hi));
    const Pair<Vec8i> pair{lanes, lanes + 8u};
    const Pair<Vec8i> pair_bits = mixprec::sr_bits(key, pair, hi);
    store(out2, pair_bits.e);
    store(out2 + 8, pair_bits.o);
    for (int k = 0; k < 8; ++k) {
      const uint32_t want = mixprec::sr_bits(key, lo + k, hi), want2 = mixprec::sr_bits(key, lo + k + 8, hi);
      check(out[k] == want && out2[k] == want && out2[8 + k] == want2, "sr_bits on 8/16 lanes", lo + k, out[k], want);
    }
    // bit-pattern stores and the int8 encode on random fp32 patterns (NaN, inf, subnormal included)
    for (int k = 0; k < 16; ++k) in[k] = rng();
    if (iter % 2) {  // half the time: values in [0, 1] and their negatives, where the codes are not all 0 / kmax
      for (int k = 0; k < 16; ++k) in[k] = mixprec::float_bits(std::ldexp(std::uniform_real_distribution<float>(-1.f, 1.f)(rng), -static_cast<int>(rng() % 24)));
    }
    const Vec8 x = loadf(in);
    const Pair<Vec8> xp{loadf(in), loadf(in + 8)};
    for (int k = 0; k < 8; ++k) r16[k] = in[8 + k] & 0xffffu;
    const auto sp = mixprec::remainder_split(x);
    const auto spp = mixprec::remainder_split(xp);
    const Vec8i rne = mixprec::bf16_rne_bits(x), sr = mixprec::bf16_sr_bits(x, load(r16));
    const Vec8i em = mixprec::int8_encode_m(x, mixprec::avx2::broadcast8(1.f));
    const Vec8i ev = mixprec::int8_encode_v(x, mixprec::avx2::broadcast8(1.f));
    const Pair<Vec8i> emp = mixprec::int8_encode_m(xp, Pair<Vec8>{mixprec::avx2::broadcast8(1.f), mixprec::avx2::broadcast8(1.f)});
    alignas(32) uint32_t got[9][8];
    store(got[0], sp.param);
    store(got[1], sp.remainder);
    store(got[2], rne);
    store(got[3], sr);
    store(got[4], em);
    store(got[5], ev);
    store(got[6], emp.o);
    store(got[7], spp.param.o);
    store(got[8], mixprec::avx2::op_negate_where_negative(Vec8i{em.v}, load(in)));
    for (int k = 0; k < 8; ++k) {
      const float f = mixprec::bits_float(in[k]), f8 = mixprec::bits_float(in[8 + k]);
      const auto ss = mixprec::remainder_split(f);
      check(got[0][k] == ss.param && got[1][k] == ss.remainder, "remainder_split on 8 lanes", in[k], got[0][k], ss.param);
      check(got[7][k] == mixprec::remainder_split(f8).param, "remainder_split on pairs", in[8 + k], got[7][k], 0);
      check(got[2][k] == mixprec::bf16_rne_bits(f), "bf16_rne_bits on 8 lanes", in[k], got[2][k], mixprec::bf16_rne_bits(f));
      check(got[3][k] == mixprec::bf16_sr_bits(f, r16[k]), "bf16_sr_bits on 8 lanes", in[k], got[3][k], 0);
      check(got[4][k] == mixprec::int8_encode_m(f, 1.f), "int8_encode_m on 8 lanes", in[k], got[4][k],
            mixprec::int8_encode_m(f, 1.f));
      check(got[5][k] == mixprec::int8_encode_v(f, 1.f), "int8_encode_v on 8 lanes", in[k], got[5][k],
            mixprec::int8_encode_v(f, 1.f));
      check(got[6][k] == mixprec::int8_encode_m(f8, 1.f), "int8_encode_m on pairs", in[8 + k], got[6][k], 0);
      // (psignd: the same as the scalar function wherever its precondition holds)
      if (in[k] != 0u) {
        check(got[8][k] == mixprec::op_negate_where_negative(got[4][k], in[k]), "op_negate_where_negative on 8 lanes",
              in[k], got[8][k], 0);
      }
    }
  }
  // int8 decode on 8 32-bit lanes and 16 16-bit lanes: every code
  for (uint32_t c0 = 0; c0 < 256; c0 += 16) {
    alignas(32) int16_t codes16[16], hi16[16];
    alignas(32) uint32_t got8[8];
    for (int k = 0; k < 16; ++k) codes16[k] = static_cast<int8_t>(c0 + k);
    const Vec16w w{_mm256_load_si256(reinterpret_cast<const __m256i*>(codes16))};
    _mm256_store_si256(reinterpret_cast<__m256i*>(hi16), mixprec::int8_value_hi16_m(w).v);
    for (int k = 0; k < 16; ++k) {
      const uint32_t want = mixprec::int8_value_hi16_m(static_cast<uint32_t>(static_cast<int32_t>(codes16[k])));
      check(static_cast<uint16_t>(hi16[k]) == want, "int8_value_hi16_m on 16-bit lanes", c0 + k, static_cast<uint16_t>(hi16[k]), want);
    }
    for (int k = 0; k < 16; ++k) codes16[k] = static_cast<int16_t>(c0 + k);  // v codes: 0..255
    _mm256_store_si256(reinterpret_cast<__m256i*>(hi16),
                       mixprec::int8_value_hi16_v(Vec16w{_mm256_load_si256(reinterpret_cast<const __m256i*>(codes16))}).v);
    const Vec8i c8{_mm256_setr_epi32(static_cast<int>(c0), static_cast<int>(c0 + 1), static_cast<int>(c0 + 2),
                                     static_cast<int>(c0 + 3), static_cast<int>(c0 + 4), static_cast<int>(c0 + 5),
                                     static_cast<int>(c0 + 6), static_cast<int>(c0 + 7))};
    store(got8, mixprec::int8_value_hi16_v(c8));
    for (int k = 0; k < 16; ++k) {
      const uint32_t want = mixprec::int8_value_hi16_v(c0 + k);
      check(static_cast<uint16_t>(hi16[k]) == want && (k >= 8 || got8[k] == want), "int8_value_hi16_v on lanes",
            c0 + k, static_cast<uint16_t>(hi16[k]), want);
    }
  }
}

using mixprec::avx512::Vec16;
using mixprec::avx512::Vec16i;
MIXPREC_AVX512 Vec16i load16(const uint32_t* p) { return {_mm512_loadu_si512(p)}; }
MIXPREC_AVX512 void store16(uint32_t* p, Vec16i v) { _mm512_storeu_si512(p, v.v); }
MIXPREC_AVX512 Vec16 load16f(const uint32_t* p) { return {_mm512_castsi512_ps(load16(p).v)}; }

// The AVX-512 lanes (16 fp32 lanes, comparisons into mask registers) against the scalar functions, on random bit
// patterns (NaN, inf, subnormals) and on values in [-1, 1], where the int8 codes are not all 0 / kmax; flatten, as
// in the CPU kernel.
MIXPREC_AVX512 __attribute__((flatten)) void check_avx512_lanes(std::mt19937& rng) {
  alignas(64) uint32_t in[16], r16[16], got[10][16];
  const uint32_t key = mixprec::sr_key(1234u, 7u, 3u);
  const Vec16 one = mixprec::avx512::broadcast16(1.f);
  for (int iter = 0; iter < 200000; ++iter) {
    for (int k = 0; k < 16; ++k) in[k] = rng();
    if (iter % 2) {
      for (int k = 0; k < 16; ++k) {
        in[k] = mixprec::float_bits(std::ldexp(std::uniform_real_distribution<float>(-1.f, 1.f)(rng), -static_cast<int>(rng() % 24)));
      }
    }
    for (int k = 0; k < 16; ++k) r16[k] = rng() & 0xffffu;
    const uint32_t lo = rng(), hi = rng() % 4;
    const Vec16i lanes{_mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(lo)),
                                        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15))};
    const Vec16 x = load16f(in);
    const auto split = mixprec::remainder_split(x);
    store16(got[0], split.param);
    store16(got[1], split.remainder);
    store16(got[2], mixprec::bf16_rne_bits(x));
    store16(got[3], mixprec::bf16_sr_bits(x, load16(r16)));
    store16(got[4], mixprec::int8_encode_m(x, one));
    store16(got[5], mixprec::int8_encode_v(x, one));
    store16(got[6], mixprec::sr_bits(key, lanes, hi));
    // the fast encoder where its precondition holds: |x| * inv in [0, 1] (the scale is the absmax)
    store16(got[7], mixprec::int8_encode_m<false>(x, one));
    store16(got[8], mixprec::int8_encode_v<false>(mixprec::avx512::op_abs(x), one));
    // bytes 0..255 read as non-negative (outside the m codes): still the scalar function
    store16(got[9], mixprec::int8_value_hi16_m(load16(r16) & 0xffu));
    for (int k = 0; k < 16; ++k) {
      const float f = mixprec::bits_float(in[k]);
      const auto ss = mixprec::remainder_split(f);
      check(got[0][k] == ss.param && got[1][k] == ss.remainder, "remainder_split on 16 lanes", in[k], got[0][k], ss.param);
      check(got[2][k] == mixprec::bf16_rne_bits(f), "bf16_rne_bits on 16 lanes", in[k], got[2][k], mixprec::bf16_rne_bits(f));
      check(got[3][k] == mixprec::bf16_sr_bits(f, r16[k]), "bf16_sr_bits on 16 lanes", in[k], got[3][k], 0);
      check(got[4][k] == mixprec::int8_encode_m(f, 1.f), "int8_encode_m on 16 lanes", in[k], got[4][k],
            mixprec::int8_encode_m(f, 1.f));
      check(got[5][k] == mixprec::int8_encode_v(f, 1.f), "int8_encode_v on 16 lanes", in[k], got[5][k],
            mixprec::int8_encode_v(f, 1.f));
      check(got[6][k] == mixprec::sr_bits(key, lo + k, hi), "sr_bits on 16 lanes", lo + k, got[6][k], 0);
      if (iter % 2) {
        check(got[7][k] == mixprec::int8_encode_m(f, 1.f), "int8_encode_m<false> on 16 lanes", in[k], got[7][k],
              mixprec::int8_encode_m(f, 1.f));
        check(got[8][k] == mixprec::int8_encode_v(std::fabs(f), 1.f), "int8_encode_v<false> on 16 lanes", in[k],
              got[8][k], mixprec::int8_encode_v(std::fabs(f), 1.f));
      }
      const uint32_t code = r16[k] & 0xffu;
      check(got[9][k] == mixprec::int8_value_hi16_m(code), "int8_value_hi16_m on 16 lanes", code, got[9][k], 0);
    }
  }
  // the decodes of every code, m's sign-extended (int8) and v's zero-extended (uint8)
  alignas(64) uint32_t codes[16];
  for (uint32_t c0 = 0; c0 < 256; c0 += 16) {
    for (int k = 0; k < 16; ++k) codes[k] = static_cast<uint32_t>(static_cast<int32_t>(static_cast<int8_t>(c0 + k)));
    store16(got[0], mixprec::int8_value_hi16_m(load16(codes)));
    for (int k = 0; k < 16; ++k) codes[k] = c0 + k;
    store16(got[1], mixprec::int8_value_hi16_v(load16(codes)));
    for (int k = 0; k < 16; ++k) {
      const uint32_t m = static_cast<uint32_t>(static_cast<int32_t>(static_cast<int8_t>(c0 + k)));
      check(got[0][k] == mixprec::int8_value_hi16_m(m), "int8_value_hi16_m on 16 lanes", c0 + k, got[0][k], 0);
      check(got[1][k] == mixprec::int8_value_hi16_v(c0 + k), "int8_value_hi16_v on 16 lanes", c0 + k, got[1][k], 0);
    }
  }
  // the same on 32 16-bit lanes (the AVX-512 pair lanes' decode): m's codes sign-extended, v's zero-extended
  alignas(64) int16_t words[32], hi16[32];
  for (uint32_t c0 = 0; c0 < 256; c0 += 32) {
    for (int k = 0; k < 32; ++k) words[k] = static_cast<int8_t>(c0 + k);
    _mm512_store_si512(hi16, mixprec::int8_value_hi16_m(mixprec::avx512::Vec32w{_mm512_load_si512(words)}).v);
    for (int k = 0; k < 32; ++k) {
      const uint32_t want = mixprec::int8_value_hi16_m(static_cast<uint32_t>(static_cast<int32_t>(words[k])));
      check(static_cast<uint16_t>(hi16[k]) == want, "int8_value_hi16_m on 32 16-bit lanes", c0 + k,
            static_cast<uint16_t>(hi16[k]), want);
    }
    for (int k = 0; k < 32; ++k) words[k] = static_cast<int16_t>(c0 + k);
    _mm512_store_si512(hi16, mixprec::int8_value_hi16_v(mixprec::avx512::Vec32w{_mm512_load_si512(words)}).v);
    for (int k = 0; k < 32; ++k) {
      const uint32_t want = mixprec::int8_value_hi16_v(c0 + k);
      check(static_cast<uint16_t>(hi16[k]) == want, "int8_value_hi16_v on 32 16-bit lanes", c0 + k,
            static_cast<uint16_t>(hi16[k]), want);
    }
  }
}

}  // namespace

int main() {
  // Every fp16 / bf16 bit pattern widens exactly as torch widens it.
  for (uint32_t x = 0; x < 65536; ++x) {
    c10::Half h;
    h.x = static_cast<uint16_t>(x);
    const float want = static_cast<float>(h), got = mixprec::half_to_float(static_cast<uint16_t>(x));
    check(std::isnan(want) ? std::isnan(got) : mixprec::float_bits(got) == mixprec::float_bits(want), "half_to_float", x,
          mixprec::float_bits(got), mixprec::float_bits(want));
    c10::BFloat16 b;
    b.x = static_cast<uint16_t>(x);
    const float bwant = static_cast<float>(b), bgot = mixprec::bf16_to_float(static_cast<uint16_t>(x));
    check(std::isnan(bwant) ? std::isnan(bgot) : mixprec::float_bits(bgot) == mixprec::float_bits(bwant),
          "bf16_to_float", x, mixprec::float_bits(bgot), mixprec::float_bits(bwant));
  }
  // Rounding: every representable value, every half-way point between neighbours (ties to even) and one fp32
  // ulp either side of it, for both targets; then random bit patterns across the whole fp32 range.
  for (uint32_t x = 0; x < 65536; ++x) {
    for (const float v : {mixprec::half_to_float(static_cast<uint16_t>(x)), mixprec::bf16_to_float(static_cast<uint16_t>(x))}) {
      if (std::isfinite(v)) check_round(v);
    }
    const float h0 = mixprec::half_to_float(static_cast<uint16_t>(x)), h1 = mixprec::half_to_float(static_cast<uint16_t>(x + 1));
    const float b0 = mixprec::bf16_to_float(static_cast<uint16_t>(x)), b1 = mixprec::bf16_to_float(static_cast<uint16_t>(x + 1));
    for (const auto [lo, hi] : {std::pair{h0, h1}, std::pair{b0, b1}}) {
      if (!std::isfinite(lo) || !std::isfinite(hi) || (x & 0x7fff) == 0x7fff) continue;
      const float mid = static_cast<float>((static_cast<double>(lo) + static_cast<double>(hi)) / 2);
      check_round(mid);
      check_round(std::nextafter(mid, -INFINITY));
      check_round(std::nextafter(mid, INFINITY));
    }
  }
  std::mt19937 rng(1234);
  for (int i = 0; i < 4'000'000; ++i) check_round(mixprec::bits_float(rng()));
  for (const float special : {INFINITY, -INFINITY, NAN, -NAN, 65504.f, 65519.99f, 65520.f, 3.4e38f, 1e-45f, -0.f}) {
    check_round(special);
  }

  // Unscale of one value: the fp32 product.
  for (int i = 0; i < 100'000; ++i) {
    const float g = mixprec::bits_float(rng()), inv = mixprec::bits_float(rng());
    const float got = mixprec::unscale_value(g, inv), want = g * inv;
    check(std::isnan(want) ? std::isnan(got) : got == want, "unscale_value", mixprec::float_bits(g), 0, 0);
  }
  // The overflow check on the unscaled value: nonfinite_at(u, nonfinite_limit<T>()) is "u rounded to T (torch's
  // rounding) is inf or NaN", for random values and every value near each limit.
  auto check_limits = [&](float u) {
    const bool half_bad = !std::isfinite(static_cast<float>(c10::Half(u)));
    const bool bf16_bad = !std::isfinite(static_cast<float>(c10::BFloat16(u)));
    const uint32_t bits = mixprec::float_bits(u);
    check(mixprec::nonfinite_at(u, mixprec::nonfinite_limit<mixprec::DType::Float16>()) == half_bad,
          "nonfinite_at fp16", bits, 0, 0);
    check(mixprec::nonfinite_at(u, mixprec::nonfinite_limit<mixprec::DType::BFloat16>()) == bf16_bad,
          "nonfinite_at bf16", bits, 0, 0);
    check(mixprec::nonfinite_at(u, mixprec::nonfinite_limit<mixprec::DType::Float32>()) == !std::isfinite(u),
          "nonfinite_at fp32", bits, 0, 0);
    check(mixprec::nonfinite_at(u, mixprec::kFloat32NonfiniteLimit) == !std::isfinite(u), "nonfinite_at", bits, 0, 0);
  };
  for (int i = 0; i < 1'000'000; ++i) check_limits(mixprec::bits_float(rng()));
  for (const uint32_t limit : {0x477ff000u, 0x7f7f8000u, 0x7f800000u}) {
    for (uint32_t d = 0; d < 4096; ++d) {
      for (const uint32_t sign : {0u, 0x80000000u}) {
        check_limits(mixprec::bits_float(sign | (limit - 2048 + d)));
      }
    }
  }

  // adam_step_'s bit-pattern loads and stores
  for (uint64_t u = 0; u < (1ull << 32); u += 0x10001ull) check_remainder(static_cast<uint32_t>(u));  // 65536 strides
  for (uint32_t lo : {0x0000u, 0x0001u, 0x7fffu, 0x8000u, 0x8001u, 0xffffu}) {  // every top half, the edge low halves
    for (uint32_t hi = 0; hi < 65536; ++hi) check_remainder((hi << 16) | lo);
  }
  for (int i = 0; i < 4'000'000; ++i) check_remainder(rng());
  check_int8_codes(rng);
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    check_avx2_lanes(rng);
  } else {
    std::printf("no AVX2 here: the 8/16-lane checks are skipped\n");
  }
  if (mixprec::cpu_supports_avx512()) {
    check_avx512_lanes(rng);
  } else {
    std::printf("no AVX-512 here: the zmm-lane checks are skipped\n");
  }

  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("element math: all checks passed\n");
  return 0;
}
