// note: GCC contracts a*b+c into an FMA inside avx2/fma functions even in ISO mode; the shared element math
// spells out each rounding (mixprec/adam_math.h), so contraction is turned off for this whole file (before
// any include, so that every function here is compiled with the same options and inlines freely).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "adam_kernel.h"

#include <cstdint>

#include "mixprec/adam_dispatch.h"
#include "simd_avx2.h"

namespace mixprec::cpu {
namespace {

// Elements [begin, end) of the block, one at a time: the portable kernel, and the AVX2 kernel's tail.
template <DType T, bool kMaster, bool kAmsgrad, bool kDecoupled, bool kStochastic>
void adam_scalar(const AdamBlock& b, const AdamCoeffs<float>& c, const AdamFlags& flags, int64_t begin,
                 int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    AdamSlots<float> s;
    if constexpr (kMaster) s.param = b.master[i];
    else s.param = load_as_float<T>(b.param, i);
    s.grad = load_as_float<T>(b.grad, i);
    s.exp_avg = b.exp_avg[i];
    s.exp_avg_sq = b.exp_avg_sq[i];
    if constexpr (kAmsgrad) s.max_exp_avg_sq = b.max_exp_avg_sq[i];
    adam_update<kDecoupled, kAmsgrad>(s, c, flags);
    b.exp_avg[i] = s.exp_avg;
    b.exp_avg_sq[i] = s.exp_avg_sq;
    if constexpr (kAmsgrad) b.max_exp_avg_sq[i] = s.max_exp_avg_sq;
    if constexpr (kMaster) b.master[i] = s.param;
    store_param<T, kStochastic>(b.param, i, s.param, b.sr_key, static_cast<uint64_t>(b.first_index + i));
  }
}

// 8 elements per iteration through the same adam_update, instantiated for avx2::Vec8; flatten inlines the
// generic math and the Vec8 operations into this avx2 function.
template <DType T, bool kMaster, bool kAmsgrad, bool kDecoupled, bool kStochastic>
MIXPREC_AVX2 __attribute__((flatten)) void adam_avx2(const AdamBlock& b, const AdamCoeffs<float>& c,
                                                      const AdamFlags& flags) {
  using avx2::Vec8;
  using avx2::broadcast8;
  constexpr int kSize = T == DType::Float32 ? 4 : 2;
  const AdamCoeffs<Vec8> cv{broadcast8(c.grad_factor), broadcast8(c.weight_decay), broadcast8(c.decay),
                            broadcast8(c.beta1),       broadcast8(c.one_minus_beta1), broadcast8(c.beta2),
                            broadcast8(c.one_minus_beta2), broadcast8(c.inv_bc2_sqrt), broadcast8(c.eps),
                            broadcast8(c.neg_step_size)};
  char* param = static_cast<char*>(b.param);
  const char* grad = static_cast<const char*>(b.grad);
  // note: with masters the half param is a write-only stream. A plain store first reads each line into the
  // cache (read-for-ownership): 2 more bytes per param on top of the 28 the update needs, ~7%. A
  // non-temporal store writes the line without reading it (16-byte-aligned half buffers; the
  // vector stores below are 16 bytes at 8-element steps from the aligned start).
  constexpr bool kHalf = T != DType::Float32;
  const bool stream_param = kMaster && kHalf && reinterpret_cast<uintptr_t>(param) % 16 == 0;
  int64_t i = 0;
  for (; i + 8 <= b.n; i += 8) {
    AdamSlots<Vec8> s;
    if constexpr (kMaster) s.param = {_mm256_loadu_ps(b.master + i)};
    else s.param = {avx2::load8<T>(param + i * kSize)};
    s.grad = {avx2::load8<T>(grad + i * kSize)};
    s.exp_avg = {_mm256_loadu_ps(b.exp_avg + i)};
    s.exp_avg_sq = {_mm256_loadu_ps(b.exp_avg_sq + i)};
    if constexpr (kAmsgrad) s.max_exp_avg_sq = {_mm256_loadu_ps(b.max_exp_avg_sq + i)};
    adam_update<kDecoupled, kAmsgrad>(s, cv, flags);
    _mm256_storeu_ps(b.exp_avg + i, s.exp_avg.v);
    _mm256_storeu_ps(b.exp_avg_sq + i, s.exp_avg_sq.v);
    if constexpr (kAmsgrad) _mm256_storeu_ps(b.max_exp_avg_sq + i, s.max_exp_avg_sq.v);
    if constexpr (kMaster) _mm256_storeu_ps(b.master + i, s.param.v);
    if constexpr (kStochastic) {
      // the random bits are a scalar hash per element (a rarely used variant; not worth a vector hash)
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, s.param.v);
      for (int k = 0; k < 8; ++k) {
        store_param<T, true>(param, i + k, lanes[k], b.sr_key, static_cast<uint64_t>(b.first_index + i + k));
      }
    } else if constexpr (kMaster && kHalf) {
      if (stream_param) {
        _mm_stream_si128(reinterpret_cast<__m128i*>(param + i * kSize), avx2::pack_half8<T>(s.param.v));
      } else {
        avx2::store8<T>(param + i * kSize, s.param.v);
      }
    } else {
      avx2::store8<T>(param + i * kSize, s.param.v);
    }
  }
  if (stream_param) _mm_sfence();  // non-temporal stores are weakly ordered: publish them before returning
  adam_scalar<T, kMaster, kAmsgrad, kDecoupled, kStochastic>(b, c, flags, i, b.n);
}

}  // namespace

void adam_block(const AdamBlock& block, const AdamVariant& v, const AdamCoeffs<float>& coeffs, const AdamFlags& flags,
                bool use_avx2) {
  dispatch_adam_variant(v.dtype, v.master, v.amsgrad, v.decoupled, v.stochastic,
                        [&](auto T, auto master, auto amsgrad, auto decoupled, auto stochastic) {
                          if (use_avx2) {
                            adam_avx2<T, master, amsgrad, decoupled, stochastic>(block, coeffs, flags);
                          } else {
                            adam_scalar<T, master, amsgrad, decoupled, stochastic>(block, coeffs, flags, 0, block.n);
                          }
                        });
}

}  // namespace mixprec::cpu
