#include "stream_kernel.h"

#include <algorithm>
#include <cstring>

#include "simd_avx2.h"

namespace mixprec::cpu {
namespace {

// note: the ceiling must use every technique the kernels it judges use, or they exceed it, and do no more work
// per byte than they do: the only operation is an integer XOR (one cycle, four independent chains to hide its
// latency); reads prefetch ahead as unscale_kernel.cpp does; an array that is read and written (in place) is
// written with ordinary stores, as the kernels update in place; an array that is only written is written with
// non-temporal stores, as the Adam kernel writes the half param beside fp32 masters (Avx2Lanes::store_streaming):
// they skip the read-for-ownership, so a write-only byte costs one trip to memory instead of two.

uint64_t fold_portable(const uint8_t* p, int64_t n) {
  uint64_t acc[4] = {0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    for (int k = 0; k < 4; ++k) {
      uint64_t v;
      std::memcpy(&v, p + i + 8 * k, 8);
      acc[k] ^= v;
    }
  }
  uint64_t out = acc[0] ^ acc[1] ^ acc[2] ^ acc[3];
  for (; i < n; ++i) out ^= static_cast<uint64_t>(p[i]) << (8 * (i & 7));
  return out;
}

void fill_portable(uint8_t* p, int64_t n, uint64_t value) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) std::memcpy(p + i, &value, 8);
  for (; i < n; ++i) p[i] = static_cast<uint8_t>(value >> (8 * (i & 7)));
}

MIXPREC_AVX2 uint64_t fold_avx2(const uint8_t* p, int64_t n) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 128 <= n; i += 128) {
    // the same software prefetch as the kernels it judges (unscale_kernel.cpp): a ceiling must use every
    // technique they use, or they exceed it
    _mm_prefetch(reinterpret_cast<const char*>(p + i + 2048), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(p + i + 2048 + 64), _MM_HINT_T0);
    a0 = _mm256_xor_si256(a0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
    a1 = _mm256_xor_si256(a1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
    a2 = _mm256_xor_si256(a2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
    a3 = _mm256_xor_si256(a3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
  }
  const __m256i a = _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3));
  const __m128i h = _mm_xor_si128(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
  const uint64_t folded = static_cast<uint64_t>(_mm_extract_epi64(h, 0) ^ _mm_extract_epi64(h, 1));
  return folded ^ fold_portable(p + i, n - i);
}

// kStreaming: non-temporal stores from the first 32-byte boundary on (ordinary stores before it and for the
// tail); the caller fences once after the last one.
template <bool kStreaming>
MIXPREC_AVX2 void fill_avx2(uint8_t* p, int64_t n, uint64_t value) {
  const int64_t head = kStreaming ? std::min<int64_t>(n, (32 - reinterpret_cast<uintptr_t>(p) % 32) % 32) : 0;
  fill_portable(p, head, value);
  const __m256i v = _mm256_set1_epi64x(static_cast<long long>(value));
  int64_t i = head;
  for (; i + 128 <= n; i += 128) {
    for (int k = 0; k < 128; k += 32) {
      __m256i* q = reinterpret_cast<__m256i*>(p + i + k);
      if constexpr (kStreaming) _mm256_stream_si256(q, v);
      else _mm256_storeu_si256(q, v);
    }
  }
  fill_portable(p + i, n - i, value);
}

MIXPREC_AVX2 void fence_avx2() { _mm_sfence(); }

bool is_read(const ByteSpan& w, const ByteSpan* reads, int n_reads) {
  for (int r = 0; r < n_reads; ++r) {
    if (reads[r].data == w.data) return true;
  }
  return false;
}

}  // namespace

uint64_t stream_block(const ByteSpan* reads, int n_reads, const ByteSpan* writes, int n_writes, bool use_avx2) {
  // note: the block goes in kSteps steps, each a 1/kSteps part of every array (1 KB of the largest): the reads of
  // a step, then its writes. So every array streams at once, as in a fused kernel that loads and stores all of
  // them element by element (one array at a time, a whole block each, the Adam kernel measured 111-120% of the
  // ceiling; steps of 2 KB, 100-104%), and an in-place array's lines are still in L1 when written: main memory
  // sees each line read once and written back once, the traffic of a fused in-place kernel.
  constexpr int kSteps = 128;
  const auto part = [](const ByteSpan& a, int step) {
    const int64_t begin = a.size * step / kSteps / 64 * 64;  // cache lines apart, as the blocks are
    const int64_t end = step + 1 == kSteps ? a.size : a.size * (step + 1) / kSteps / 64 * 64;
    return ByteSpan{a.data + begin, end - begin};
  };
  uint64_t acc = 0;
  bool streamed = false;
  for (int step = 0; step < kSteps; ++step) {
    for (int r = 0; r < n_reads; ++r) {
      const ByteSpan p = part(reads[r], step);
      acc ^= use_avx2 ? fold_avx2(p.data, p.size) : fold_portable(p.data, p.size);
    }
    for (int w = 0; w < n_writes; ++w) {
      const ByteSpan p = part(writes[w], step);
      if (!use_avx2) {
        fill_portable(p.data, p.size, acc);
      } else if (is_read(writes[w], reads, n_reads)) {
        fill_avx2<false>(p.data, p.size, acc);
      } else {
        fill_avx2<true>(p.data, p.size, acc);
        streamed = true;
      }
    }
  }
  if (streamed) fence_avx2();
  return acc;
}

}  // namespace mixprec::cpu
