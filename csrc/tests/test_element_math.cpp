// The shared element math (csrc/include/mixprec) against torch's own conversions, on the CPU: the CUDA
// kernels compile the same functions, so this checks the arithmetic the GPU runs.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdio>
#include <random>

#include "mixprec/rounding.h"
#include "mixprec/unscale_math.h"

namespace {

int failures = 0;

void check(bool ok, const char* what, uint32_t input_bits, uint32_t got, uint32_t want) {
  if (!ok && ++failures <= 10) {
    std::printf("FAIL %s: input %#010x -> got %#06x, want %#06x\n", what, input_bits, got, want);
  }
}

// Rounds one fp32 to fp16 and bf16 both ways and compares (any NaN matches any NaN).
void check_round(float f) {
  const uint32_t in = mixprec::float_bits(f);
  const bool nan = std::isnan(f);
  const uint16_t h = mixprec::float_to_half_rne(f), h_ref = c10::Half(f).x;
  check(nan ? std::isnan(mixprec::half_to_float(h)) : h == h_ref, "float_to_half_rne", in, h, h_ref);
  const uint16_t b = mixprec::float_to_bf16_rne(f), b_ref = c10::BFloat16(f).x;
  check(nan ? std::isnan(mixprec::bf16_to_float(b)) : b == b_ref, "float_to_bf16_rne", in, b, b_ref);
}

}  // namespace

int main() {
  // Every fp16 / bf16 bit pattern widens exactly as torch widens it.
  for (uint32_t x = 0; x < 65536; ++x) {
    c10::Half h;
    h.x = static_cast<uint16_t>(x);
    const float want = static_cast<float>(h), got = mixprec::half_to_float(static_cast<uint16_t>(x));
    check(std::isnan(want) ? std::isnan(got) : mixprec::float_bits(got) == mixprec::float_bits(want), "half_to_float", x,
          mixprec::float_bits(got), mixprec::float_bits(want));
    c10::BFloat16 b;
    b.x = static_cast<uint16_t>(x);
    const float bwant = static_cast<float>(b), bgot = mixprec::bf16_to_float(static_cast<uint16_t>(x));
    check(std::isnan(bwant) ? std::isnan(bgot) : mixprec::float_bits(bgot) == mixprec::float_bits(bwant),
          "bf16_to_float", x, mixprec::float_bits(bgot), mixprec::float_bits(bwant));
  }
  // Rounding: every representable value, every half-way point between neighbours (ties to even) and one fp32
  // ulp either side of it, for both targets; then random bit patterns across the whole fp32 range.
  for (uint32_t x = 0; x < 65536; ++x) {
    for (const float v : {mixprec::half_to_float(static_cast<uint16_t>(x)), mixprec::bf16_to_float(static_cast<uint16_t>(x))}) {
      if (std::isfinite(v)) check_round(v);
    }
    const float h0 = mixprec::half_to_float(static_cast<uint16_t>(x)), h1 = mixprec::half_to_float(static_cast<uint16_t>(x + 1));
    const float b0 = mixprec::bf16_to_float(static_cast<uint16_t>(x)), b1 = mixprec::bf16_to_float(static_cast<uint16_t>(x + 1));
    for (const auto [lo, hi] : {std::pair{h0, h1}, std::pair{b0, b1}}) {
      if (!std::isfinite(lo) || !std::isfinite(hi) || (x & 0x7fff) == 0x7fff) continue;
      const float mid = static_cast<float>((static_cast<double>(lo) + static_cast<double>(hi)) / 2);
      check_round(mid);
      check_round(std::nextafter(mid, -INFINITY));
      check_round(std::nextafter(mid, INFINITY));
    }
  }
  std::mt19937 rng(1234);
  for (int i = 0; i < 4'000'000; ++i) check_round(mixprec::bits_float(rng()));
  for (const float special : {INFINITY, -INFINITY, NAN, -NAN, 65504.f, 65519.99f, 65520.f, 3.4e38f, 1e-45f, -0.f}) {
    check_round(special);
  }

  // Unscale of one value: the fp32 product, and inf/NaN detection on the input.
  for (int i = 0; i < 100'000; ++i) {
    const float g = mixprec::bits_float(rng()), inv = mixprec::bits_float(rng());
    const float got = mixprec::unscale_value(g, inv), want = g * inv;
    check(std::isnan(want) ? std::isnan(got) : got == want, "unscale_value", mixprec::float_bits(g), 0, 0);
    check(mixprec::is_nonfinite(g) == !std::isfinite(g), "is_nonfinite", mixprec::float_bits(g), 0, 0);
  }

  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("element math: all checks passed\n");
  return 0;
}
