// Runtime choice between the AVX-512, AVX2 and portable kernels (no -march=native in distributed builds).
#pragma once
#include <cstdlib>
#include <cstring>

namespace mixprec {

// The instruction sets a CPU kernel may use, in order.
enum class CpuSimd : int { Portable = 0, Avx2 = 1, Avx512 = 2 };

inline bool cpu_supports_avx2() {
  static const bool supported =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return supported;
}

// What simd_avx512.h's target attribute (MIXPREC_AVX512) names, besides AVX2.
inline bool cpu_supports_avx512() {
  static const bool supported = cpu_supports_avx2() && __builtin_cpu_supports("avx512f") &&
                                __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                                __builtin_cpu_supports("avx512vl");
  return supported;
}

// The best level the CPU has, capped by MIXPREC_CPU_SIMD: "0" forces the portable kernels, "avx2" the AVX2 ones
// (on an AVX-512 CPU), anything else (or unset) leaves the choice to the CPU, so that the tests check every
// kernel on one machine. Read on every call (a getenv per op call is noise next to the kernel), so tests can flip
// it.
inline CpuSimd cpu_simd() {
  const char* env = std::getenv("MIXPREC_CPU_SIMD");
  if (env != nullptr && env[0] == '0') return CpuSimd::Portable;
  if (!cpu_supports_avx2()) return CpuSimd::Portable;
  if (env != nullptr && std::strcmp(env, "avx2") == 0) return CpuSimd::Avx2;
  return cpu_supports_avx512() ? CpuSimd::Avx512 : CpuSimd::Avx2;
}

// For the kernels that have an AVX2 variant only.
inline bool cpu_use_avx2() { return cpu_simd() != CpuSimd::Portable; }

}  // namespace mixprec
