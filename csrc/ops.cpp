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
  // found_inf is only ever set to 1.0, never reset: the caller zeroes it once per step.
  m.def(
      "unscale_and_check_(Tensor(a!)[] grads, Tensor inv_scale, Tensor(b!) found_inf, Tensor(c!)? norm_sq=None, "
      "Tensor(d!)? per_tensor_inf=None) -> ()");
  // fp16/bf16 operands, fp32 accumulation, bias added in fp32, one rounding to out_dtype (default a's dtype).
  m.def("matmul(Tensor a, Tensor b, Tensor? bias=None, ScalarType? out_dtype=None) -> Tensor");
  // c (fp32) += a @ b: weight gradients straight into fp32 main grads.
  m.def("matmul_accumulate_(Tensor(a!) c, Tensor a, Tensor b) -> ()");
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
