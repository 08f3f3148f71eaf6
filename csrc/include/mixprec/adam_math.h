// The Adam / AdamW element update, written once for the CPU kernels (scalar and AVX2) and the CUDA kernels.
//
// Layout follows PyTorch's fused Adam (fused_adam_utils.cuh, FusedAdamKernel.cpp): the update works on named
// slots in opmath (fp32) registers, apart from the loads and stores; the variants are compile-time flags
// (kDecoupled: AdamW vs Adam's L2 decay; kAmsgrad), the rest are uniform run-time flags.
//
// The formula is torch.optim.Adam/AdamW's (_single_tensor_adam), step by step:
//   g  = grad * grad_factor                      grad_factor = (1 / grad_scale) * clip_coef, in fp32
//   g  = -g                                      if maximize
//   g  = g + param * wd                          Adam (L2), if wd != 0
//   param = param * (1 - lr * wd)                AdamW (decoupled), if wd != 0
//   m  = beta1 * m + (1 - beta1) * g
//   v  = beta2 * v + ((1 - beta2) * g) * g
//   vmax = max(vmax, v); use vmax for v          if amsgrad
//   param = param + (-lr / bc1 * m) / (sqrt(v) * (1 / sqrt(bc2)) + eps),  bc_k = 1 - beta_k^step
// Every operation above is one fp32 rounding: the per-tensor coefficients are computed in double and
// rounded once to fp32, as torch does with its Python-float hyper-parameters.
//
// note: the one departure from torch's order: torch divides sqrt(v) by sqrt(bc2); here it is multiplied by
// the reciprocal (rounded once from double). sqrt and division share one unit on x86 cores (on Zen 3 a
// vsqrtps + two vdivps take ~19 cycles per 8 elements, which made the CPU kernel compute-bound on a core);
// the multiply removes a third of that work, and differs from torch's quotient by at most an ulp or so.
//
// note: rounding is spelled out with op_* functions, never with a*b+c, because compilers contract a*b+c into
// an FMA when the target has one (GCC does so even with -std=c++20 inside an avx2/fma function; nvcc by
// default), which would make the AVX2, scalar and CUDA kernels disagree in the last bit. On the device the
// __f*_rn intrinsics are never contracted; host files that include this header turn contraction off.
#pragma once
#include <cmath>
#include <cstdint>

#include "mixprec/rounding.h"

namespace mixprec {

// ---- fp32 operations, one rounding each (the AVX2 kernels overload these names for 8-lane vectors) ----
MIXPREC_HD float op_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
MIXPREC_HD float op_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
MIXPREC_HD float op_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
MIXPREC_HD float op_sqrt(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
MIXPREC_HD float op_neg(float a) { return -a; }
// The larger of a and b; b when either is NaN (the semantics of x86 maxps, so the AVX2 kernel agrees).
MIXPREC_HD float op_max(float a, float b) { return a > b ? a : b; }

// ---- per-tensor coefficients ----

// Hyper-parameters as the caller holds them (doubles, like torch's Python floats).
struct AdamHyper {
  double beta1, beta2, eps, weight_decay;
  bool maximize;
};

// Uniform values of one tensor's update; F is float, or a vector type holding the value in every lane.
template <class F>
struct AdamCoeffs {
  F grad_factor;     // (1 / grad_scale) * clip_coef
  F weight_decay;    // Adam (L2): added to the gradient times param
  F decay;           // AdamW: param multiplier, 1 - lr * wd
  F beta1, one_minus_beta1, beta2, one_minus_beta2;
  F inv_bc2_sqrt;    // 1 / sqrt(1 - beta2^step)
  F eps;
  F neg_step_size;   // -lr / (1 - beta1^step)
};

// Run-time flags that are uniform over the whole launch (branches on them cost nothing).
struct AdamFlags {
  bool maximize;
  bool has_weight_decay;
};

// grad_factor from the optional device scalars (nullptr: absent). One fp32 division, one multiply.
MIXPREC_HD float adam_grad_factor(const float* grad_scale, const float* clip_coef) {
  float f = grad_scale != nullptr ? op_div(1.f, *grad_scale) : 1.f;
  if (clip_coef != nullptr) f = op_mul(f, *clip_coef);
  return f;
}

// The coefficients for the update numbered `step` (1 for the first update), computed in double and rounded
// once, as torch computes them from Python floats (bias_correction1 = 1 - beta1 ** step, step_size = lr /
// bias_correction1, bias_correction2_sqrt = bias_correction2 ** 0.5, here its reciprocal; AdamW's
// param.mul_(1 - lr * wd)).
MIXPREC_HD AdamCoeffs<float> adam_coeffs(const AdamHyper& h, double lr, double step, float grad_factor) {
  const double bc1 = 1.0 - pow(h.beta1, step);
  const double bc2 = 1.0 - pow(h.beta2, step);
  AdamCoeffs<float> c;
  c.grad_factor = grad_factor;
  c.weight_decay = static_cast<float>(h.weight_decay);
  c.decay = static_cast<float>(1.0 - lr * h.weight_decay);
  c.beta1 = static_cast<float>(h.beta1);
  c.one_minus_beta1 = static_cast<float>(1.0 - h.beta1);
  c.beta2 = static_cast<float>(h.beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - h.beta2);
  c.inv_bc2_sqrt = static_cast<float>(1.0 / sqrt(bc2));
  c.eps = static_cast<float>(h.eps);
  c.neg_step_size = static_cast<float>(-(lr / bc1));
  return c;
}

// ---- the element update ----

// Named slots, in fp32 registers. `param` is the fp32 master when there is one, else the widened param.
// max_exp_avg_sq is only read and written when kAmsgrad.
template <class F>
struct AdamSlots {
  F param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq;
};

template <bool kDecoupled, bool kAmsgrad, class F>
MIXPREC_HD void adam_update(AdamSlots<F>& s, const AdamCoeffs<F>& c, const AdamFlags& flags) {
  F g = op_mul(s.grad, c.grad_factor);
  if (flags.maximize) g = op_neg(g);
  if (flags.has_weight_decay) {
    if constexpr (kDecoupled) {
      s.param = op_mul(s.param, c.decay);
    } else {
      g = op_add(g, op_mul(s.param, c.weight_decay));
    }
  }
  s.exp_avg = op_add(op_mul(c.beta1, s.exp_avg), op_mul(c.one_minus_beta1, g));
  s.exp_avg_sq = op_add(op_mul(c.beta2, s.exp_avg_sq), op_mul(op_mul(c.one_minus_beta2, g), g));
  F second = s.exp_avg_sq;
  if constexpr (kAmsgrad) {
    s.max_exp_avg_sq = op_max(s.max_exp_avg_sq, s.exp_avg_sq);
    second = s.max_exp_avg_sq;
  }
  const F denom = op_add(op_mul(op_sqrt(second), c.inv_bc2_sqrt), c.eps);
  s.param = op_add(s.param, op_div(op_mul(c.neg_step_size, s.exp_avg), denom));
}

// ---- where w, m and v live: the variants of the loads and stores ----
//
// The loads and stores work on fp32 bit patterns, over F / I lanes (the bit-pattern operations of
// mixprec/rounding.h), so that the CPU kernel runs this very code on 1 or 8 lanes and the CUDA kernel on one.
// 16-bit values travel in 32-bit lanes as the high half ("hi16": a bf16's fp32 bits) or, for the remainders, as the
// low half sign-extended. A store formula takes kMayBeNaN = false only where the caller has checked that no lane
// holds a NaN (the AVX2 kernel's fast path; the NaN cases are then the same formula's other branch).

// Where the fp32 value of the param (w) is kept between steps.
enum class MasterKind : int32_t {
  None = 0,       // the param itself (widened; rounded back on the store)
  Fp32 = 1,       // master_params: an fp32 copy; the half param is only written
  Remainder = 2,  // param_remainders: bf16 param + the low 16 bits of the fp32 master (exact, see below)
};

// How exp_avg and exp_avg_sq (and max_exp_avg_sq) are stored.
enum class StateKind : int32_t {
  Fp32 = 0,
  BFloat16 = 1,  // rounded to nearest even on the store
  Int8 = 2,      // block-wise codes: int8 for m, uint8 for v, one fp32 absmax scale per 256 elements (below)
};

// ---- remainder masters (bf16 params) ----
//
// The fp32 master u is kept as the bf16 param p = round(u) and the int16 remainder r = the low 16 bits of u.
// Rounding is to nearest with ties AWAY from zero on the bit pattern: p = (u + 0x8000) >> 16. Then u is exactly
// (p << 16) + sign_extend(r) modulo 2^32: when the low half was >= 0x8000, p is one more than u's top half
// and r, read as a negative int16, takes that one back. (Round to nearest even would need a 17th bit to undo
// at exact ties, which is why ties go away from zero.) A NaN master stores a quiet NaN param, remainder 0.

// The fp32 master from the param (hi16) and the remainder (sign-extended).
template <class I>
MIXPREC_HD auto remainder_join(I param_hi16, I remainder) {
  return op_from_bits(param_hi16 + remainder);
}

template <class I>
struct RemainderSplit {
  I param;      // the param's bits in the high half of each lane
  I remainder;  // the remainder's bits in the low half
};

template <bool kMayBeNaN = true, class F>
MIXPREC_HD auto remainder_split(F w) {
  const auto u = op_bits(w);
  using I = decltype(u + 0u);  // (not const)
  if constexpr (kMayBeNaN) {
    const auto nan = op_isnan(w);
    return RemainderSplit<I>{op_select(nan, u | 0x00400000u, u + 0x8000u), op_andnot(nan, u)};
  } else {
    return RemainderSplit<I>{u + 0x8000u, u};
  }
}

// ---- int8 block-wise states ----
//
// A code k >= 1 stands for value(k) = the fp32 whose bits are (k + bias) << 20: an 8-bit float with 3 mantissa
// bits, so value(kMax) = 1.0 and each 8 codes down halve the value (m: 127 codes over 16 binades, v: 255 codes
// over 32); code 0 is 0. A block of kInt8Block elements stores codes of |x| / scale, scale = the block's fp32
// absmax: m = sign(c) * value(|c|) * scale, v = value(k) * scale (one fp32 multiply each).
// The encoder rounds on the bit pattern, so every backend picks the same code with integer operations.
inline constexpr int kInt8Block = 256;
inline constexpr uint32_t kInt8BiasM = 889, kInt8MaxM = 127;  // value(127) = 1.0, value(1) = 1.25 * 2^-16
inline constexpr uint32_t kInt8BiasV = 761, kInt8MaxV = 255;  // value(255) = 1.0, value(1) = 1.25 * 2^-32

// The values are bf16 numbers (their low 16 bits are 0): these give the high 16 bits of sign(c) * value(|c|)
// (m: c the int8 code sign-extended) and value(k) (v: k the uint8 code), in lanes of 16 bits or more.
template <class I>
MIXPREC_HD I int8_value_hi16_m(I c) {
  const I k = op_iabs(c);
  return op_zero_where_zero(((k + kInt8BiasM) << 4) | (c & 0x8000u), k);
}
template <class I>
MIXPREC_HD I int8_value_hi16_v(I k) {
  return op_zero_where_zero((k + kInt8BiasV) << 4, k);
}

// The decoded moment from the code's value (int8_value_hi16_*, placed as hi16) and the block's scale.
template <class I, class F>
MIXPREC_HD F int8_decode(I value_hi16, F scale) {
  return op_mul(op_from_bits(value_hi16), scale);
}

// value(1) / 2 as a constant expression (the bits are (1 + bias) << 20, less one in the exponent): a normal
// fp32 2^(e - 127) * (1 + t / 8) with e, t the top fields of those bits; powers of two multiply exactly.
constexpr float int8_half_value1(uint32_t bias) {
  const uint32_t e = ((bias + 1u) >> 3) - 1u, t = (bias + 1u) & 7u;
  float f = 1.f + static_cast<float>(t) / 8.f;
  for (uint32_t i = e; i < 127u; ++i) f *= 0.5f;
  return f;
}

// The code magnitude of x = |value| * inv, inv = int8_inverse(scale): x's bits rounded to nearest even on the 20
// dropped bits give r = the exponent and top 3 mantissa bits, so k = r - bias; below value(1) (k < 1) the nearest
// of 0 and value(1), ties up; at most kMax (x can round a hair above 1; a NaN x has an all-ones exponent: kMax).
// note: max(k, near_one) picks the small-x case without a branch: k >= 1 wins, and for k < 1 the 0/1 does.
// kExact = false: the caller knows the block's scale and inv are finite, so x (a product of non-negative finite
// floats) is in [+0, 1 + 2^-23] and never NaN (|value| <= scale, and scale * RN(1 / scale) <= 1 + 2^-24): then its
// bits need no sign mask, k <= kMax already, and the bias can be taken off before the shift (an arithmetic shift,
// exact: bias << 20 is a multiple of 2^20, and nothing overflows); and below value(1) / 2 the rounded k is < 1 - 7,
// so "x >= value(1) / 2 ? max(k, 1) : 0" is the same code (one masked max on AVX-512).
template <uint32_t kBias, uint32_t kMax, bool kExact, class F>
MIXPREC_HD auto int8_code_magnitude(F x) {
  constexpr float kHalfValue1 = int8_half_value1(kBias);
  if constexpr (kExact) {
    const auto near_one = op_ge(x, kHalfValue1) & 1u;
    const auto a = op_bits(x) & 0x7fffffffu;
    const auto r = op_add_with_bit(a, 0x7ffffu, 20) >> 20;
    return op_imin(op_imax(r - kBias, near_one), static_cast<int32_t>(kMax));
  } else {
    const auto a = op_bits(x);
    return op_ge(x, kHalfValue1) & op_imax(op_sra(op_add_with_bit(a, 0x7ffffu - (kBias << 20), 20), 20), 1);
  }
}

// The int8 code of m in a 32-bit lane (two's complement): -k when m < 0, so -0.0 and NaN get k. (In the
// !kExact case no m is NaN, and -0.0 and +0.0 have k = 0: the sign bit of m decides alike.)
template <bool kExact = true, class F>
MIXPREC_HD auto int8_encode_m(F m, F inv) {
  const auto k = int8_code_magnitude<kInt8BiasM, kInt8MaxM, kExact>(op_mul(op_abs(m), inv));
  if constexpr (kExact) {
    const auto neg = op_lt(m, 0.f);
    return (k ^ neg) - neg;
  } else {
    return op_negate_where_negative(k, op_bits(m));
  }
}

// (In the !kExact case v is not NaN, and v >= +0: a decoded v is a code's value times an absmax, and the update
// adds (1 - beta2) * g * g to beta2 times it, all products of non-negative floats, so |v| is v.)
template <bool kExact = true, class F>
MIXPREC_HD auto int8_encode_v(F v, F inv) {
  if constexpr (kExact) return int8_code_magnitude<kInt8BiasV, kInt8MaxV, true>(op_mul(op_abs(v), inv));
  else return int8_code_magnitude<kInt8BiasV, kInt8MaxV, false>(op_mul(v, inv));
}

// The bits whose maximum over a block is its absmax (|x|'s bits order like |x|; NaN above inf). kNonNegative: x
// is known to be +0 or more, or NaN (the exp_avg_sq of an update: see int8_encode_v), whose own bits then do (a NaN
// with its sign bit set is still above inf's bits, and int8_scale makes any of them one NaN).
template <bool kNonNegative = false, class F>
MIXPREC_HD auto int8_abs_bits(F x) {
  if constexpr (kNonNegative) return op_bits(x);
  else return op_bits(x) & 0x7fffffffu;
}

// The block's scale from the max of int8_abs_bits over it: the fp32 absmax, NaN (one canonical quiet NaN,
// whatever the payloads) when any element is NaN.
MIXPREC_HD float int8_scale(uint32_t max_abs_bits) {
  return bits_float(max_abs_bits > 0x7f800000u ? 0x7fc00000u : max_abs_bits);
}

// 1 / scale, one fp32 division; 0 for an all-zero block, so that every code comes out 0 (x = 0 * 0).
MIXPREC_HD float int8_inverse(float scale) { return scale == 0.f ? 0.f : op_div(1.f, scale); }

// Whether the block may take int8_encode_*<false>: scale and inverse finite.
MIXPREC_HD bool int8_finite(float scale, float inv) {
  return (float_bits(scale) & 0x7f800000u) != 0x7f800000u && (float_bits(inv) & 0x7f800000u) != 0x7f800000u;
}

// ---- stochastic rounding to bf16 ----
//
// note: a counter-based generator (a keyed hash of the element index) rather than a stateful one, so that
// any thread, block or SIMD lane draws the bits of any element directly, and the CPU, CUDA and Triton
// kernels give identical results for the same (seed, stream, step, index). The mixer is Chris Wellons'
// "lowbias32" (a bijection with very low avalanche bias); two rounds decorrelate neighbouring indices.
// Written over integer lanes I, so the AVX2 kernel hashes 8 indices at once (vpmulld) with the same bits.
template <class I>
MIXPREC_HD I hash32(I x) {
  x = x ^ (x >> 16);
  x = x * 0x7feb352du;
  x = x ^ (x >> 15);
  x = x * 0x846ca68bu;
  x = x ^ (x >> 16);
  return x;
}

// The key of one tensor's update: seed (from the optimizer), stream (the tensor's position in the list),
// step (so that every update draws fresh bits).
MIXPREC_HD uint32_t sr_key(uint32_t seed, uint32_t stream, uint32_t step) {
  return hash32(hash32(hash32(seed) ^ stream) + step);
}

// 16 random bits for the element whose index (its position in its tensor's storage order) has low word lo and
// high word hi.
template <class I>
MIXPREC_HD I sr_bits(uint32_t key, I lo, uint32_t hi) {
  return hash32(hash32(lo ^ key) + hi) & 0xffffu;
}

MIXPREC_HD uint32_t sr_bits(uint32_t key, uint64_t index) {
  return sr_bits(key, static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32));
}

// bf16 keeps the top 16 bits of an fp32: adding 16 uniform random bits below them and truncating rounds up
// with probability equal to the dropped fraction, so the result is unbiased. Exact values stay exact, inf
// stays inf, NaN stays a quiet NaN; a value within one ulp of the largest bf16 may round up to inf.
// Returns the bf16 as hi16.
template <bool kMayBeNaN = true, class F, class I>
MIXPREC_HD auto bf16_sr_bits(F f, I random16) {
  const auto u = op_bits(f);
  if constexpr (kMayBeNaN) return op_select(op_isnan(f), u | 0x00400000u, u + random16);
  else return u + random16;
}

MIXPREC_HD uint16_t float_to_bf16_sr(float f, uint32_t random16) {
  return static_cast<uint16_t>(bf16_sr_bits(f, random16) >> 16);
}

}  // namespace mixprec
