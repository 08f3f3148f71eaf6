#include "unscale_kernel.h"

#include "mixprec/unscale_math.h"
#include "simd_avx2.h"

namespace mixprec::cpu {
namespace {

// kWrite is false for a check pass (check_only, or inv_scale == 1: the values would not change): the pass only
// reads, sums the squares of the values as stored and flags the fp32 products that are non-finite. kWrite: the
// squares are of the unscaled fp32 values, and a value is flagged when it is non-finite as stored in T.
template <DType T, bool kWrite>
constexpr uint32_t pass_limit() {
  return kWrite ? nonfinite_limit<T>() : kFloat32NonfiniteLimit;
}

template <DType T, bool kWrite>
UnscaleBlockResult unscale_portable(void* data, int64_t n, float inv_scale) {
  // note: four independent partial sums, combined in a fixed order, so the result does not depend on how
  // the compiler schedules the loop and the loop is not one long dependency chain.
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  bool nonfinite = false;
  for (int64_t i = 0; i < n; ++i) {
    const float g = load_as_float<T>(data, i);
    const float u = unscale_value(g, inv_scale);
    nonfinite |= nonfinite_at(u, pass_limit<T, kWrite>());
    if constexpr (kWrite) store_from_float<T>(data, i, u);
    const float s = kWrite ? u : g;
    acc[i & 3] += s * s;
  }
  return {(acc[0] + acc[1]) + (acc[2] + acc[3]), nonfinite};
}

// All-ones lanes where |v| (as bits) >= limit: nonfinite_at on eight values.
MIXPREC_AVX2 inline __m256 nonfinite_at_mask(__m256 v, __m256i limit_minus_1) {
  const __m256i magnitude = _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7fffffff));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(magnitude, limit_minus_1));
}

template <DType T, bool kWrite>
MIXPREC_AVX2 UnscaleBlockResult unscale_avx2(void* data, int64_t n, float inv_scale) {
  using namespace avx2;
  char* bytes = static_cast<char*>(data);
  constexpr int kSize = T == DType::Float32 ? 4 : 2;
  const __m256 inv = _mm256_set1_ps(inv_scale);
  const __m256i limit_minus_1 = _mm256_set1_epi32(static_cast<int32_t>(pass_limit<T, kWrite>() - 1));
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  __m256 bad = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {  // two vectors per iteration: two independent FMA chains
    // note: a software prefetch 2 KB ahead took this pass from 84-85% to 93-94% of the measured streaming
    // ceiling (GPT-2 small, 124M fp16, `python -m mixprec bench --op unscale`): the hardware prefetcher
    // alone keeps too few lines in flight for two cores. Past the end it is harmless (prefetches never fault).
    _mm_prefetch(bytes + i * kSize + 2048, _MM_HINT_T0);
    const __m256 g0 = load8<T>(bytes + i * kSize);
    const __m256 g1 = load8<T>(bytes + (i + 8) * kSize);
    const __m256 u0 = _mm256_mul_ps(g0, inv);
    const __m256 u1 = _mm256_mul_ps(g1, inv);
    bad = _mm256_or_ps(bad, _mm256_or_ps(nonfinite_at_mask(u0, limit_minus_1),
                                         nonfinite_at_mask(u1, limit_minus_1)));
    if constexpr (kWrite) {
      store8<T>(bytes + i * kSize, u0);
      store8<T>(bytes + (i + 8) * kSize, u1);
      acc0 = _mm256_fmadd_ps(u0, u0, acc0);
      acc1 = _mm256_fmadd_ps(u1, u1, acc1);
    } else {
      acc0 = _mm256_fmadd_ps(g0, g0, acc0);
      acc1 = _mm256_fmadd_ps(g1, g1, acc1);
    }
  }
  UnscaleBlockResult tail = unscale_portable<T, kWrite>(bytes + i * kSize, n - i, inv_scale);
  return {hsum(_mm256_add_ps(acc0, acc1)) + tail.sum_sq, tail.nonfinite || _mm256_movemask_ps(bad) != 0};
}

template <DType T>
UnscaleBlockResult unscale_dispatch(void* data, int64_t n, float inv_scale, bool check_only, bool use_avx2) {
  if (check_only || inv_scale == 1.f) {
    return use_avx2 ? unscale_avx2<T, false>(data, n, inv_scale) : unscale_portable<T, false>(data, n, inv_scale);
  }
  return use_avx2 ? unscale_avx2<T, true>(data, n, inv_scale) : unscale_portable<T, true>(data, n, inv_scale);
}

}  // namespace

UnscaleBlockResult unscale_block(void* data, int64_t n, DType dtype, float inv_scale, bool check_only,
                                 bool use_avx2) {
  switch (dtype) {
    case DType::Float32: return unscale_dispatch<DType::Float32>(data, n, inv_scale, check_only, use_avx2);
    case DType::Float16: return unscale_dispatch<DType::Float16>(data, n, inv_scale, check_only, use_avx2);
    case DType::BFloat16: return unscale_dispatch<DType::BFloat16>(data, n, inv_scale, check_only, use_avx2);
  }
  return {0.f, false};
}

}  // namespace mixprec::cpu
