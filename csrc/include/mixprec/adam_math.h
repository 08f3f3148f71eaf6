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

// ---- stochastic rounding to bf16 ----
//
// note: a counter-based generator (a keyed hash of the element index) rather than a stateful one, so that
// any thread, block or SIMD lane draws the bits of any element directly, and the CPU, CUDA and Triton
// kernels give identical results for the same (seed, stream, step, index). The mixer is Chris Wellons'
// "lowbias32" (a bijection with very low avalanche bias); two rounds decorrelate neighbouring indices.
MIXPREC_HD uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// The key of one tensor's update: seed (from the optimizer), stream (the tensor's position in the list),
// step (so that every update draws fresh bits).
MIXPREC_HD uint32_t sr_key(uint32_t seed, uint32_t stream, uint32_t step) {
  return hash32(hash32(hash32(seed) ^ stream) + step);
}

// 16 random bits for element `index` (its flat position in its tensor).
MIXPREC_HD uint32_t sr_bits(uint32_t key, uint64_t index) {
  const uint32_t lo = static_cast<uint32_t>(index), hi = static_cast<uint32_t>(index >> 32);
  return hash32(hash32(lo ^ key) + hi) & 0xffffu;
}

// bf16 keeps the top 16 bits of an fp32: adding 16 uniform random bits below them and truncating rounds up
// with probability equal to the dropped fraction, so the result is unbiased. Exact values stay exact, inf
// stays inf, NaN stays a quiet NaN; a value within one ulp of the largest bf16 may round up to inf.
MIXPREC_HD uint16_t float_to_bf16_sr(float f, uint32_t random16) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  return static_cast<uint16_t>((u + random16) >> 16);
}

// The model param's store: round to nearest even, or (kStochastic, bf16 only) stochastically with the bits
// of element `index` of the tensor.
template <DType T, bool kStochastic>
MIXPREC_HD void store_param(void* p, int64_t i, float v, uint32_t key, uint64_t index) {
  if constexpr (kStochastic) {
    static_assert(T == DType::BFloat16, "stochastic rounding is implemented for bf16 params only");
    static_cast<uint16_t*>(p)[i] = float_to_bf16_sr(v, sr_bits(key, index));
  } else {
    store_from_float<T>(p, i, v);
  }
}

}  // namespace mixprec
