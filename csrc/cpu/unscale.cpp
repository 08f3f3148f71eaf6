// CPU implementation of mixprec::unscale_and_check_.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../unscale_args.h"
#include "cpu_features.h"
#include "unscale_kernel.h"

namespace mixprec {
namespace {

// note: blocks of 32K elements (64-128 KB) are large enough to amortize scheduling and small enough to
// balance across cores; the block grid depends only on the tensor sizes, so norm_sq is the same bits
// whatever the thread count.
constexpr int64_t kBlock = 32768;

float pairwise_sum(const float* x, int64_t n) {
  if (n <= 8) {
    float s = 0.f;
    for (int64_t i = 0; i < n; ++i) s += x[i];
    return s;
  }
  const int64_t half = n / 2;
  return pairwise_sum(x, half) + pairwise_sum(x + half, n - half);
}

struct Block {
  int64_t tensor, begin, size;
};

void unscale_and_check_cpu(at::TensorList grads, const at::Tensor& inv_scale, const at::Tensor& found_inf,
                           const std::optional<at::Tensor>& norm_sq, const std::optional<at::Tensor>& per_tensor_inf,
                           bool check_only) {
  const std::vector<DType> dtypes =
      check_unscale_args(grads, inv_scale, found_inf, norm_sq, per_tensor_inf, at::Device(at::kCPU));
  std::vector<Block> blocks;
  for (size_t t = 0; t < grads.size(); ++t) {
    for (int64_t b = 0; b < grads[t].numel(); b += kBlock) {
      blocks.push_back({static_cast<int64_t>(t), b, std::min(kBlock, grads[t].numel() - b)});
    }
  }
  const float inv = inv_scale.item<float>();
  const bool use_avx2 = cpu_use_avx2();
  std::vector<float> partial(blocks.size());
  std::vector<uint8_t> block_bad(blocks.size());
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const Block& b = blocks[i];
      char* base = static_cast<char*>(grads[b.tensor].data_ptr()) + b.begin * dtype_size(dtypes[b.tensor]);
      const auto r = cpu::unscale_block(base, b.size, dtypes[b.tensor], inv, check_only, use_avx2);
      partial[i] = r.sum_sq;
      block_bad[i] = r.nonfinite;
    }
  });
  // Second level, a fixed pairwise tree over the blocks: deterministic, and its rounding error grows with
  // log2(blocks) rather than with their count.
  const float sum_sq = pairwise_sum(partial.data(), static_cast<int64_t>(partial.size()));
  bool any_bad = false;
  float* tensor_flags = per_tensor_inf ? per_tensor_inf->data_ptr<float>() : nullptr;
  for (size_t i = 0; i < blocks.size(); ++i) {
    if (block_bad[i]) {
      any_bad = true;
      if (tensor_flags) tensor_flags[blocks[i].tensor] = 1.f;
    }
  }
  if (any_bad) found_inf.fill_(1.f);
  if (norm_sq) norm_sq->add_(sum_sq);
}

}  // namespace

TORCH_LIBRARY_IMPL(mixprec, CPU, m) { m.impl("unscale_and_check_", &unscale_and_check_cpu); }

}  // namespace mixprec
