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

// bf16 is the top half of an fp32: add half an ulp (minus one when the kept lsb is even) and truncate.
MIXPREC_HD uint16_t float_to_bf16_rne(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN, sign kept
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

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
