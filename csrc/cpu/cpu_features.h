// Runtime choice between the AVX2 and the portable kernels (no -march=native in distributed builds).
#pragma once
#include <cstdlib>

namespace mixprec {

inline bool cpu_supports_avx2() {
  static const bool supported =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return supported;
}

// MIXPREC_CPU_SIMD=0 forces the portable kernels, so that the tests check both on one machine.
// Read on every call (a getenv per op call is noise next to the kernel), so tests can flip it.
inline bool cpu_use_avx2() {
  const char* env = std::getenv("MIXPREC_CPU_SIMD");
  if (env != nullptr && env[0] == '0') return false;
  return cpu_supports_avx2();
}

}  // namespace mixprec
