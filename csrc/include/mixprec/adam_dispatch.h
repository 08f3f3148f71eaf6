// The Adam kernel variants, from run-time flags to template arguments, shared by the CPU kernels and the CUDA
// launchers (host code only).
#pragma once
#include <type_traits>

#include "mixprec/adam_math.h"
#include "mixprec/static_dispatch.h"

namespace mixprec {

// Which (param dtype, master kind, state kind, amsgrad, stochastic) combinations exist: fp32 masters are for half
// params, remainders for bf16 params; stochastic rounding for bf16 params without masters; amsgrad for fp32 or
// bf16 states (the op's argument checks, csrc/adam_args.h, refuse the rest). Also the CUDA kernel count the
// static test expects.
constexpr bool adam_variant_exists(DType t, MasterKind master, StateKind state, bool amsgrad, bool stochastic) {
  const bool master_ok = master == MasterKind::None || (master == MasterKind::Fp32 && t != DType::Float32) ||
                         (master == MasterKind::Remainder && t == DType::BFloat16);
  const bool sr_ok = !stochastic || (t == DType::BFloat16 && master == MasterKind::None);
  return master_ok && sr_ok && !(amsgrad && state == StateKind::Int8);
}

// fn(std::integral_constant<E, v>{}) for the one of kValues that v equals (nothing if none does).
template <auto... kValues, class E, class Fn>
void dispatch_value(E v, Fn&& fn) {
  static_cast<void>(((v == kValues ? (fn(std::integral_constant<E, kValues>{}), true) : false) || ...));
}

// Calls fn(T, master, state, amsgrad, decoupled, stochastic), each a std::integral_constant, for the variant the
// flags name; only the variants that exist are instantiated (nothing is called for the others).
template <class Fn>
void dispatch_adam_variant(DType dtype, MasterKind master, StateKind state, bool amsgrad, bool decoupled,
                           bool stochastic, Fn&& fn) {
  dispatch_dtype(dtype, [&](auto T) {
    dispatch_value<MasterKind::None, MasterKind::Fp32, MasterKind::Remainder>(master, [&](auto M) {
      dispatch_value<StateKind::Fp32, StateKind::BFloat16, StateKind::Int8>(state, [&](auto S) {
        dispatch_bool(stochastic, [&](auto sr) {
          dispatch_bool(amsgrad, [&](auto ams) {
            if constexpr (adam_variant_exists(T, M, S, ams, sr)) {
              dispatch_bool(decoupled, [&](auto dec) { fn(T, M, S, ams, dec, sr); });
            }
          });
        });
      });
    });
  });
}

}  // namespace mixprec
