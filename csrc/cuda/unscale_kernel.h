// Torch-free launcher of the CUDA unscale_and_check_ kernel.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "mixprec/common.h"

namespace mixprec::cuda {

// One dtype group of the grads list, in one multi-tensor launch (more only when the list outgrows the
// argument block). Block b of the group writes its sum of squares to partials[first_block + b] when
// partials is not null; any unscaled inf/NaN (as stored; check_only: the fp32 product, nothing written) sets
// *found_inf = 1 and, when given, per_tensor_inf[list_index[t]] = 1. Returns the next free global block index.
int64_t launch_unscale(DType dtype, int64_t n_tensors, void* const* addrs, const int64_t* numels,
                       const int32_t* list_index, int64_t first_block, const float* inv_scale, float* found_inf,
                       float* partials, float* per_tensor_inf, bool check_only, cudaStream_t stream,
                       cudaError_t* err);

}  // namespace mixprec::cuda
