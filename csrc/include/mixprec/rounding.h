// fp32 <-> fp16 / bf16 conversions written once, bit-exact and identical on host and device.
//
// note: round-to-nearest-even everywhere; NaN stays NaN (quiet), inf stays inf, fp16 subnormals are produced
// and read exactly. Conversions are done on bits rather than with compiler intrinsics so that the CPU tests
// exercise the very arithmetic the GPU runs; the CUDA kernels may use the hardware cvt instructions, which
// give the same bits for every non-NaN input (csrc/tests/test_element_math.cpp checks these functions
// against torch's own conversions over all 2^16 half values and a sweep of fp32 inputs).
#pragma once
#include <cstdint>
#include <cstring>

#include "mixprec/common.h"

namespace mixprec {

MIXPREC_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

MIXPREC_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

MIXPREC_HD float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// ---- bit-pattern lanes ----
//
// Conversions and encodings on fp32 bit patterns, written once over F (float, or a vector of floats) and its
// integer lanes I (uint32_t, or a vector of 32-bit lanes): these are the scalar operations; the AVX2 kernels
// overload each of them, and the integer operators, for their vector types (csrc/cpu/simd_avx2.h). Integer lanes
// wrap modulo 2^32 and shift logically, as uint32_t does; "i" operations read them as signed; a mask is all
// ones (true) or zero per lane.
MIXPREC_HD uint32_t op_bits(float f) { return float_bits(f); }
MIXPREC_HD float op_from_bits(uint32_t u) { return bits_float(u); }
MIXPREC_HD uint32_t op_mask(bool b) { return b ? 0xffffffffu : 0u; }
MIXPREC_HD uint32_t op_isnan(float a) { return op_mask((float_bits(a) & 0x7fffffffu) > 0x7f800000u); }
MIXPREC_HD uint32_t op_lt(float a, float b) { return op_mask(a < b); }   // false when either is NaN
MIXPREC_HD uint32_t op_ge(float a, float b) { return op_mask(a >= b); }  // false when either is NaN
MIXPREC_HD float op_abs(float a) { return bits_float(float_bits(a) & 0x7fffffffu); }
MIXPREC_HD uint32_t op_eqz(uint32_t a) { return op_mask(a == 0u); }
MIXPREC_HD uint32_t op_select(uint32_t mask, uint32_t a, uint32_t b) { return mask ? a : b; }
MIXPREC_HD uint32_t op_andnot(uint32_t mask, uint32_t a) { return a & ~mask; }  // a where mask is false, else 0
MIXPREC_HD uint32_t op_iabs(uint32_t a) {
  const int32_t s = static_cast<int32_t>(a);
  return static_cast<uint32_t>(s < 0 ? -s : s);
}
MIXPREC_HD uint32_t op_imax(uint32_t a, uint32_t b) {
  return static_cast<int32_t>(a) > static_cast<int32_t>(b) ? a : b;
}
MIXPREC_HD uint32_t op_imin(uint32_t a, int32_t b) {
  return static_cast<int32_t>(a) < b ? a : static_cast<uint32_t>(b);
}
MIXPREC_HD uint32_t op_umax(uint32_t a, uint32_t b) { return a > b ? a : b; }
MIXPREC_HD uint32_t op_sra(uint32_t a, int n) { return static_cast<uint32_t>(static_cast<int32_t>(a) >> n); }
// a + c + bit n of a (0 or 1): with c = 2^(n-1) - 1, a rounded to nearest even at bit n (then shifted out).
// Written over any integer lanes; the AVX-512 lanes overload it with a bit test into a mask and an add of c or
// c + 1 (three instructions instead of four).
template <class I>
MIXPREC_HD I op_add_with_bit(I a, uint32_t c, int n) {
  return a + c + ((a >> n) & 1u);
}
// a, or 0 where b == 0; for b >= 0 (x86's psignd there: AVX2 does it in one instruction, AVX-512 with a mask)
MIXPREC_HD uint32_t op_zero_where_zero(uint32_t a, uint32_t b) { return b == 0u ? 0u : a; }
// -a where b < 0 (signed), else a; for b == 0 only where a == 0 (psignd's semantics there, as above)
MIXPREC_HD uint32_t op_negate_where_negative(uint32_t a, uint32_t b) {
  return static_cast<int32_t>(b) < 0 ? 0u - a : a;
}

// The fp32 bits of f rounded to nearest even at bit 16, so that bf16(f) is the high half: add half an ulp (minus
// one when the kept lsb is even; inf stays inf, the largest floats round up to it). NaN: a quiet NaN with f's
// sign and top bits. kMayBeNaN = false: the caller knows f is not a NaN (an AVX2 fast path).
template <bool kMayBeNaN = true, class F>
MIXPREC_HD auto bf16_rne_bits(F f) {
  const auto u = op_bits(f);
  const auto rounded = op_add_with_bit(u, 0x7fffu, 16);
  if constexpr (kMayBeNaN) return op_select(op_isnan(f), u | 0x00400000u, rounded);
  else return rounded;
}

MIXPREC_HD uint16_t float_to_bf16_rne(float f) { return static_cast<uint16_t>(bf16_rne_bits(f) >> 16); }

MIXPREC_HD float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) return bits_float(sign | 0x7f800000u | (man << 13));  // inf / NaN (payload kept)
  if (exp != 0) return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
  // zero or subnormal: man * 2^-24 is exact in fp32
  const float mag = static_cast<float>(man) * bits_float(0x33800000u);  // 2^-24
  return bits_float(sign | float_bits(mag));
}

MIXPREC_HD uint16_t float_to_half_rne(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  // NaN, quiet
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (a < 0x38800000u) {
    // result is an fp16 subnormal (or zero): adding 0.5 (2^-1) aligns the mantissa so that the fp32 add
    // itself rounds to nearest even at the fp16 subnormal ulp (2^-24).
    const float r = bits_float(a) + 0.5f;
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(float_bits(r) - 0x3f000000u));
  }
  // normal: rebias the exponent (127 -> 15) and round the 13 dropped bits to nearest even.
  uint32_t v = a - (112u << 23);
  v += 0xfffu + ((v >> 13) & 1u);
  return static_cast<uint16_t>(sign | (v >> 13));
}

// Round an fp32 value to the storage type's precision and back: what a store followed by a load gives.
template <DType T>
MIXPREC_HD float round_trip(float f) {
  if constexpr (T == DType::Float16) return half_to_float(float_to_half_rne(f));
  else if constexpr (T == DType::BFloat16) return bf16_to_float(float_to_bf16_rne(f));
  else return f;
}

}  // namespace mixprec

namespace mixprec {

// Element i of a buffer of storage type T, widened to fp32 / rounded back from fp32.
template <DType T>
MIXPREC_HD float load_as_float(const void* p, int64_t i) {
  if constexpr (T == DType::Float32) return static_cast<const float*>(p)[i];
  else if constexpr (T == DType::Float16) return half_to_float(static_cast<const uint16_t*>(p)[i]);
  else return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
}

template <DType T>
MIXPREC_HD void store_from_float(void* p, int64_t i, float v) {
  if constexpr (T == DType::Float32) static_cast<float*>(p)[i] = v;
  else if constexpr (T == DType::Float16) static_cast<uint16_t*>(p)[i] = float_to_half_rne(v);
  else static_cast<uint16_t*>(p)[i] = float_to_bf16_rne(v);
}

}  // namespace mixprec
