// CPU implementation of mixprec::matmul and matmul_accumulate_: no hand-written GEMM, torch's (oneDNN / MKL)
// fp32 GEMM on widened operands.
//
// note: why widen to fp32. The products of two fp16 or bf16 values are exact in fp32, so an fp32 GEMM on the
// widened operands is exactly "half inputs, fp32 accumulation"; the result is then rounded once (RNE) to the
// output dtype after the fp32 bias add. torch's own half GEMMs on the CPU do not promise fp32 accumulation, and
// on this AVX2 class of CPU the fp32 GEMM is also the fast one.
#include <ATen/ops/matmul.h>
#include <torch/library.h>

#include "../gemm_args.h"

namespace mixprec {
namespace {

at::Tensor matmul_cpu(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias,
                      std::optional<at::ScalarType> out_dtype) {
  const at::ScalarType out = check_matmul_args(a, b, bias, out_dtype);
  at::Tensor acc = at::matmul(a.to(at::kFloat), b.to(at::kFloat));
  if (bias) acc.add_(bias->to(at::kFloat));
  return acc.to(out);
}

void matmul_accumulate_cpu(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b) {
  check_accumulate_args(c, a, b);
  if (a.dim() == 2) {
    c.addmm_(a.to(at::kFloat), b.to(at::kFloat));  // c += a @ b in one pass
  } else {
    c.add_(at::matmul(a.to(at::kFloat), b.to(at::kFloat)));
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(mixprec, CPU, m) {
  m.impl("matmul", &matmul_cpu);
  m.impl("matmul_accumulate_", &matmul_accumulate_cpu);
}

}  // namespace mixprec
