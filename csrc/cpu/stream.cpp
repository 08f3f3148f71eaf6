// CPU implementation of mixprec::_stream_bench_, the measured memory-bandwidth ceiling the CPU benchmarks
// compare against (benchmarks/ceiling.py). Private: not part of the public API.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "stream_kernel.h"

namespace mixprec {
namespace {

// note: blocks of 128 KB of the largest array, the size of the Adam kernel's blocks of 32768 elements in its
// largest array (fp32): a thread streams each array that far before it jumps (measured: 32 KB blocks made a
// ceiling 5-15% below the Adam kernel with two threads). Every array is cut into the same number of blocks, each
// covering the same fraction of it, so all arrays are streamed at proportional rates as in a fused kernel.
constexpr int64_t kBlockBytes = 131072;
constexpr int64_t kAlign = 64;  // a cache line: blocks never share one, so no two threads write the same line

std::vector<cpu::ByteSpan> check_arrays(at::TensorList tensors, const char* arg) {
  std::vector<cpu::ByteSpan> spans;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    const std::string name = std::string(arg) + "[" + std::to_string(i) + "]";
    TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
    spans.push_back({static_cast<uint8_t*>(t.data_ptr()), static_cast<int64_t>(t.nbytes())});
  }
  return spans;
}

// The part of an array of `size` bytes that block b of n_blocks covers: [begin(b), begin(b + 1)).
int64_t block_begin(int64_t size, int64_t b, int64_t n_blocks) {
  if (b >= n_blocks) return size;
  return size * b / n_blocks / kAlign * kAlign;  // < 2^63 for any array that fits in memory
}

void stream_bench_cpu(at::TensorList reads, at::TensorList writes) {
  const std::vector<cpu::ByteSpan> read_arrays = check_arrays(reads, "reads");
  const std::vector<cpu::ByteSpan> write_arrays = check_arrays(writes, "writes");
  int64_t largest = 0;
  for (const auto& a : read_arrays) largest = std::max(largest, a.size);
  for (const auto& a : write_arrays) largest = std::max(largest, a.size);
  if (largest == 0) return;
  const int64_t n_blocks = (largest + kBlockBytes - 1) / kBlockBytes;
  const bool use_avx2 = cpu_use_avx2();
  // note: blocks handed out one at a time from a shared counter, as the Adam kernel hands out its blocks (adam.cpp):
  // a core slowed by another process then takes fewer of them, for the ceiling as for the kernel it judges
  std::atomic<int64_t> next_block{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    std::vector<cpu::ByteSpan> r(read_arrays.size()), w(write_arrays.size());
    auto cut = [&](const std::vector<cpu::ByteSpan>& arrays, std::vector<cpu::ByteSpan>& out, int64_t b) {
      for (size_t i = 0; i < arrays.size(); ++i) {
        const int64_t begin = block_begin(arrays[i].size, b, n_blocks);
        out[i] = {arrays[i].data + begin, block_begin(arrays[i].size, b + 1, n_blocks) - begin};
      }
    };
    for (int64_t b = next_block.fetch_add(1, std::memory_order_relaxed); b < n_blocks;
         b = next_block.fetch_add(1, std::memory_order_relaxed)) {
      cut(read_arrays, r, b);
      cut(write_arrays, w, b);
      cpu::stream_block(r.data(), static_cast<int>(r.size()), w.data(), static_cast<int>(w.size()), use_avx2);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mixprec, CPU, m) { m.impl("_stream_bench_", &stream_bench_cpu); }

}  // namespace mixprec
