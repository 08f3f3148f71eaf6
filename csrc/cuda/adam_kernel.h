// Torch-free launchers of the CUDA adam_step_ kernels.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "mixprec/adam_math.h"

namespace mixprec::cuda {

// One dtype group of the op's lists: element t of each array is the address of tensor t's buffer (unused
// lists may be null). numels[t] elements each; list_index[t] is the tensor's position in the op's whole list
// (its stochastic-rounding stream).
struct AdamGroup {
  int64_t n_tensors;
  void* const* params;
  void* const* grads;
  void* const* exp_avgs;            // fp32, bf16, or int8 codes (by the launch's state kind)
  void* const* exp_avg_sqs;         // fp32, bf16, or uint8 codes
  void* const* max_exp_avg_sqs;     // amsgrad only
  void* const* masters;             // MasterKind::Fp32: fp32 masters; MasterKind::Remainder: int16 remainders
  void* const* exp_avg_scales;      // StateKind::Int8 only: fp32, one per kInt8Block elements
  void* const* exp_avg_sq_scales;   // StateKind::Int8 only
  void* const* steps;               // one fp32 each: the updates done so far
  const int64_t* numels;
  const int32_t* list_index;
};

struct AdamLaunch {
  DType dtype;
  MasterKind master;
  StateKind state;
  bool amsgrad, decoupled, stochastic;
  uint32_t seed;
  AdamHyper hyper;
  AdamFlags flags;
  const float* lr;          // device scalars; all but lr may be null
  const float* grad_scale;
  const float* found_inf;
  const float* clip_coef;
};

// The update of one dtype group, one multi-tensor launch (more only when the list outgrows the argument
// block). Reads steps[t] + 1 as the update's number and does not change the steps.
void launch_adam(const AdamGroup& group, const AdamLaunch& cfg, cudaStream_t stream, cudaError_t* err);

// steps[t] += 1 for every t, unless *found_inf != 0 (found_inf may be null). Launched after every group.
void launch_adam_count_steps(int64_t n_tensors, void* const* steps, const float* found_inf, cudaStream_t stream,
                             cudaError_t* err);

}  // namespace mixprec::cuda
