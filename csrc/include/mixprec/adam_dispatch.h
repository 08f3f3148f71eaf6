// The Adam kernel variants, from run-time flags to template arguments, shared by the CPU kernels and the CUDA
// launchers (host code only).
#pragma once
#include "mixprec/static_dispatch.h"

namespace mixprec {

// Calls fn(T, master, amsgrad, decoupled, stochastic), each a std::integral_constant, for the variant the
// flags name. Only the valid variants are instantiated: masters exist for half params only, stochastic
// rounding is for bf16 params without masters (the op's argument checks refuse the rest).
template <class Fn>
void dispatch_adam_variant(DType dtype, bool master, bool amsgrad, bool decoupled, bool stochastic, Fn&& fn) {
  dispatch_dtype(dtype, [&](auto T) {
    dispatch_bool(master, [&](auto m) {
      dispatch_bool(stochastic, [&](auto sr) {
        constexpr bool kValid = (!m || T != DType::Float32) && (!sr || (T == DType::BFloat16 && !m));
        if constexpr (kValid) {
          dispatch_bool(amsgrad, [&](auto ams) {
            dispatch_bool(decoupled, [&](auto dec) { fn(T, m, ams, dec, sr); });
          });
        }
      });
    });
  });
}

}  // namespace mixprec
