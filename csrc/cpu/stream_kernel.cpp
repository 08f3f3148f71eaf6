#include "stream_kernel.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "simd_avx2.h"

namespace mixprec::cpu {
namespace {

// note: the ceiling must use every technique the kernels it judges use, or they exceed it, and do no more work
// per byte than they do: the only operation is an integer XOR (one cycle per 32 bytes, below the load rate of a
// core); reads prefetch ahead as the Adam and unscale kernels do; an array that is read and written (in place) is
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

bool is_read(const ByteSpan& w, const ByteSpan* reads, int n_reads) {
  for (int r = 0; r < n_reads; ++r) {
    if (reads[r].data == w.data) return true;
  }
  return false;
}

// 32 bytes at a time: the AVX2 loads and stores (non-temporal for write-only arrays), and the same with 64-bit
// words for any x86-64.
struct Avx2Ops {
  __m256i acc;
  MIXPREC_AVX2 Avx2Ops() : acc(_mm256_setzero_si256()) {}
  MIXPREC_AVX2 void fold(const uint8_t* p) {
    acc = _mm256_xor_si256(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  MIXPREC_AVX2 void fill(uint8_t* p, bool streaming) const {
    if (streaming) _mm256_stream_si256(reinterpret_cast<__m256i*>(p), acc);  // 32-byte aligned: see share()
    else _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), acc);
  }
  MIXPREC_AVX2 uint64_t value() const {
    const __m128i h = _mm_xor_si128(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    return static_cast<uint64_t>(_mm_extract_epi64(h, 0) ^ _mm_extract_epi64(h, 1));
  }
  static void fence() { _mm_sfence(); }
};
struct PortableOps {
  uint64_t acc = 0;
  void fold(const uint8_t* p) { acc ^= fold_portable(p, 32); }
  void fill(uint8_t* p, bool) const { fill_portable(p, 32, acc); }
  uint64_t value() const { return acc; }
  static void fence() {}
};

// One array's walk through the block: `step` bytes (a multiple of 32) per unit of the loop.
struct Walk {
  uint8_t* data;
  int64_t step;
  bool streaming;  // write-only: non-temporal stores
};

// note: every array streams at once, as in a fused kernel that loads and stores all of them element by element:
// one loop over units of 128 bytes of the block's largest array, each unit reading its share of every read array,
// then writing its share of every write array (the shares are whole multiples of 32 bytes for the element sizes
// 4, 2, 1 of mixprec's arrays; the bytes that do not fit, a few per block, and arrays too small to share, the
// int8 block scales and the step counts, go whole before and after). Reads prefetch 2 KB of the largest array
// ahead (the same distance in units for the others), as the Adam kernel does. (Reading one array at a time, a
// whole block each, the Adam kernel measured 111-120% of the ceiling; 1 KB at a time, 110-120%.)
template <class Ops>
uint64_t stream_interleaved(const ByteSpan* reads, int n_reads, const ByteSpan* writes, int n_writes) {
  constexpr int64_t kUnit = 128, kAhead = 2048 / kUnit, kMaxArrays = 16;
  int64_t largest = 0;
  for (int r = 0; r < n_reads; ++r) largest = std::max(largest, reads[r].size);
  for (int w = 0; w < n_writes; ++w) largest = std::max(largest, writes[w].size);
  const int64_t units = largest / kUnit;
  Walk rw[kMaxArrays], ww[kMaxArrays];
  int nr = 0, nw = 0;
  std::vector<int64_t> ww_done(n_writes);  // the bytes of each write array its walk covers
  Ops ops;
  uint64_t rest = 0;  // the fold of the bytes outside the walks
  bool streamed = false;
  const auto share = [units](const ByteSpan& a, bool streaming) {
    // a non-temporal walk starts 32-byte aligned (the blocks start at multiples of 64 bytes of their array)
    const bool aligned = !streaming || reinterpret_cast<uintptr_t>(a.data) % 32 == 0;
    return units > 0 && aligned ? a.size / units / 32 * 32 : 0;
  };
  for (int r = 0; r < n_reads; ++r) {
    const int64_t step = nr < kMaxArrays ? share(reads[r], false) : 0;
    if (step > 0) rw[nr++] = {reads[r].data, step, false};
    rest ^= fold_portable(reads[r].data + step * units, reads[r].size - step * units);
  }
  for (int w = 0; w < n_writes; ++w) {
    const bool streaming = !is_read(writes[w], reads, n_reads);
    const int64_t step = nw < kMaxArrays ? share(writes[w], streaming) : 0;
    ww_done[w] = step * units;
    if (step > 0) ww[nw++] = {writes[w].data, step, streaming};
    streamed = streamed || (step > 0 && streaming);
  }
  for (int u = 0; u < units; ++u) {
    for (int r = 0; r < nr; ++r) {
      const uint8_t* p = rw[r].data + u * rw[r].step;
      for (int64_t k = 0; k < rw[r].step; k += 64) __builtin_prefetch(p + kAhead * rw[r].step + k, 0, 3);
      for (int64_t k = 0; k < rw[r].step; k += 32) ops.fold(p + k);
    }
    for (int w = 0; w < nw; ++w) {
      uint8_t* p = ww[w].data + u * ww[w].step;
      for (int64_t k = 0; k < ww[w].step; k += 32) ops.fill(p + k, ww[w].streaming);
    }
  }
  const uint64_t acc = ops.value() ^ rest;
  for (int w = 0; w < n_writes; ++w) fill_portable(writes[w].data + ww_done[w], writes[w].size - ww_done[w], acc);
  if (streamed) Ops::fence();
  return acc;
}

// flatten inlines the walk and the AVX2 operations into this avx2 function
MIXPREC_AVX2 __attribute__((flatten)) uint64_t stream_avx2(const ByteSpan* reads, int n_reads, const ByteSpan* writes,
                                                            int n_writes) {
  return stream_interleaved<Avx2Ops>(reads, n_reads, writes, n_writes);
}

}  // namespace

uint64_t stream_block(const ByteSpan* reads, int n_reads, const ByteSpan* writes, int n_writes, bool use_avx2) {
  return use_avx2 ? stream_avx2(reads, n_reads, writes, n_writes)
                  : stream_interleaved<PortableOps>(reads, n_reads, writes, n_writes);
}

}  // namespace mixprec::cpu
