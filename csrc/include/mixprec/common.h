// Shared by the CPU kernels, the CUDA kernels and the C++ tests: no torch headers here.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define MIXPREC_HD __host__ __device__ __forceinline__
#else
#define MIXPREC_HD inline
#endif

namespace mixprec {

// The dtypes the kernels handle, passed from the torch-facing .cpp files to the torch-free kernel files.
enum class DType : int32_t { Float32 = 0, Float16 = 1, BFloat16 = 2 };

MIXPREC_HD int dtype_size(DType t) { return t == DType::Float32 ? 4 : 2; }

}  // namespace mixprec
