// Run-time values to compile-time template arguments, without hand-written lists of instantiations:
// dispatch_dtype(t, [&](auto T) { kernel<T.value>(...); }) instantiates the lambda once per DType.
// Host code only (used by the CPU kernels and the CUDA launchers).
#pragma once
#include <type_traits>

#include "mixprec/common.h"

namespace mixprec {

template <class Fn>
void dispatch_bool(bool b, Fn&& fn) {
  if (b) fn(std::true_type{});
  else fn(std::false_type{});
}

template <class Fn>
void dispatch_dtype(DType t, Fn&& fn) {
  switch (t) {
    case DType::Float32: fn(std::integral_constant<DType, DType::Float32>{}); break;
    case DType::Float16: fn(std::integral_constant<DType, DType::Float16>{}); break;
    case DType::BFloat16: fn(std::integral_constant<DType, DType::BFloat16>{}); break;
  }
}

}  // namespace mixprec
