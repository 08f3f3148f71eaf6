// The one operator library of mixprec: every schema lives here; kernels register per dispatch key beside
// their sources (cpu/, cuda/), fake implementations in Python (mixprec/ops/).
#include <torch/library.h>

#include <string>

namespace mixprec {
namespace {

// What this binary was built with, for `python -m mixprec info`. MIXPREC_CUDA_ARCHS is set by setup.py / CMake.
std::string build_info() {
  std::string info = "{\"cpu\": true";
#ifdef MIXPREC_WITH_CUDA
  info += ", \"cuda\": true, \"cuda_archs\": \"" MIXPREC_CUDA_ARCHS "\"";
#else
  info += ", \"cuda\": false, \"cuda_archs\": \"\"";
#endif
  return info + "}";
}

}  // namespace

TORCH_LIBRARY(mixprec, m) {
  m.def("build_info() -> str", &build_info);
  // found_inf is only ever set to 1.0, never reset: the caller zeroes it once per step. It flags the unscaled
  // values that are inf/NaN (as stored; check_only: the fp32 products, nothing written), see mixprec/ops/unscale.py.
  m.def(
      "unscale_and_check_(Tensor(a!)[] grads, Tensor inv_scale, Tensor(b!) found_inf, Tensor(c!)? norm_sq=None, "
      "Tensor(d!)? per_tensor_inf=None, *, bool check_only=False) -> ()");
  // fp16/bf16 operands, fp32 accumulation, bias added in fp32, one rounding to out_dtype (default a's dtype).
  m.def("matmul(Tensor a, Tensor b, Tensor? bias=None, ScalarType? out_dtype=None) -> Tensor");
  // c (fp32) += a @ b: weight gradients straight into fp32 main grads.
  m.def("matmul_accumulate_(Tensor(a!) c, Tensor a, Tensor b) -> ()");
  // One fused Adam/AdamW update per element (mixprec/adam_math.h). lists: one tensor per param, except
  // max_exp_avg_sqs (amsgrad), master_params (fp32 masters of half params), param_remainders (int16 low halves
  // of the fp32 masters of bf16 params) and exp_avg_scales / exp_avg_sq_scales (fp32, one per 256 elements, with
  // int8 / uint8 exp_avgs / exp_avg_sqs), which are empty when unused. exp_avgs / exp_avg_sqs are fp32, bf16 or
  // int8 / uint8 block-wise codes (one kind per call). steps[i] (one-element fp32) counts the updates done; the op
  // uses steps[i] + 1 and stores it. lr and the optional grad_scale / found_inf / clip_coef are one-element fp32
  // tensors read on the device; found_inf != 0 skips the step, writing nothing. sr_seed >= 0: bf16 params
  // without masters are stored with stochastic rounding. Everything after the always-present lists is
  // keyword-only (as aten::_fused_adamw_), in the order of mixprec.ops.adam_step_; a schema cannot default a
  // tensor list, so the optional lists are passed, empty when unused.
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] steps, *, Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] master_params, "
      "Tensor(g!)[] param_remainders, Tensor(h!)[] exp_avg_scales, Tensor(i!)[] exp_avg_sq_scales, Tensor lr, "
      "float beta1, float beta2, float eps, float weight_decay, bool decoupled, bool maximize=False, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? clip_coef=None, int sr_seed=-1) -> ()");
  // Private: the CPU memory-bandwidth ceiling of the benchmarks (benchmarks/ceiling.py). Reads every byte of
  // `reads`, then writes every byte of `writes`; a tensor in both lists is streamed in place.
  m.def("_stream_bench_(Tensor[] reads, Tensor(a!)[] writes) -> ()");
}

}  // namespace mixprec

#ifdef MIXPREC_PYTHON_MODULE
// `import mixprec._C` loads this shared library, which runs the registrations above; the module itself is
// empty. The CMake build (a plain C++ library for libtorch users) leaves it out.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif  // MIXPREC_PYTHON_MODULE
