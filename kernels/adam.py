"""Triton Adam/AdamW step: the semantics of mixprec.reference.adam_step_ (csrc/include/mixprec/adam_math.h).

One program grid per tensor. Every fp32 operation is spelled as in adam_math.h (div_rn / sqrt_rn for the IEEE
results, launched with enable_fp_fusion=False so that no multiply-add is contracted into an FMA), which makes
the results bitwise those of the CPU and CUDA kernels. The per-tensor coefficients are computed in fp64 from
the device scalars lr and step; beta^step is exp(step * log(beta)) (libdevice.pow is not available under the
interpreter), which can differ from the C pow in the last fp64 bit and so, very rarely, in an fp32 coefficient.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl

from ._rounding import round_to, to_float32

# note: why BLOCK = 512 on 4 warps: 4 elements per thread, so every fp32 stream (m, v, max_v, master: 24 of the 28
# bytes per param that fp16 params with fp32 masters move) is one 16-byte LDG.E.128/STG.E.128 per thread, and the
# fp16/bf16 grad and param are 8-byte LDG.E.64/STG.E.64, which still cover 256 contiguous bytes (whole 32-byte
# sectors) per warp. Little's law: ~600-800 ns latency x 2.0 TB/s / 108 SMs (A100) = 11-15 KB, x 3.35 TB/s / 132
# SMs (H100) = 15-20 KB in flight per SM. At 40-44 registers (48-56 when n is not 16-divisible and the accesses
# are element-wise) 9-12 blocks of 4 warps fit per SM (56-75% occupancy): >= 1152 threads x 4 elements x 12-18 B
# read per element = 55-83 KB of loads in flight per SM, 3-5x H100's figure. 8 elements per thread (the former
# 1024 on 4 warps, which made the half accesses 16 bytes too) took 72 registers vectorized (44%) and 92-151
# element-wise (19-31%): Triton gives the half loads 8 elements per thread and the fp32 stores 4 and converts
# between the two through 4 KB of shared memory; maxnreg=64 spills. Every warp computes the fp64 coefficients
# (~150 fp64 instructions, per 128 elements here) whatever BLOCK is; BLOCK only sets how many programs run, and
# with no reduction in the kernel the results do not depend on it.
BLOCK = 512
NUM_WARPS = 4


@triton.jit
def _hash32(x):
    """mixprec/adam_math.h hash32 (lowbias32) on uint32."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _bf16_stochastic(x, key, index):
    """adam_math.h float_to_bf16_sr(x, sr_bits(key, index)) for fp32 x and int64 index."""
    lo = (index & 0xFFFFFFFF).to(tl.uint32)
    hi = (index >> 32).to(tl.uint32)
    bits = _hash32(_hash32(lo ^ key) + hi) & 0xFFFF
    u = x.to(tl.uint32, bitcast=True)
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    out = tl.where(is_nan, (u >> 16) | 0x40, (u + bits) >> 16)
    return out.to(tl.uint16).to(tl.bfloat16, bitcast=True)


# master kinds (the MASTER constexpr) and the int8 block size of mixprec.reference (INT8_BLOCK); the kernels read
# globals only as tl.constexpr
MASTER_NONE, MASTER_FP32, MASTER_REMAINDER = 0, 1, 2
_FP32, _REMAINDER = tl.constexpr(MASTER_FP32), tl.constexpr(MASTER_REMAINDER)
QBLOCK = tl.constexpr(256)
# the code maps: value(k) = bits((k + bias) << 20) for magnitudes 1..max
_M_BIAS, _M_MAX, _V_BIAS, _V_MAX = tl.constexpr(889), tl.constexpr(127), tl.constexpr(761), tl.constexpr(255)


@triton.jit
def _join_remainder(param, remainder):
    """mixprec.reference.remainder_join: the fp32 master of bf16 param bits and the int16 remainder."""
    p = param.to(tl.uint16, bitcast=True).to(tl.uint32)
    r = remainder.to(tl.uint16, bitcast=True).to(tl.uint32)
    rounded_up = (remainder < 0).to(tl.uint32)
    return ((((p - rounded_up) & 0xFFFF) << 16) | r).to(tl.float32, bitcast=True)


@triton.jit
def _split_remainder(w):
    """mixprec.reference.remainder_split: (bf16 param rounded to nearest, ties away, int16 remainder) of fp32 w."""
    u = w.to(tl.uint32, bitcast=True)
    hi = u >> 16
    lo = u & 0xFFFF
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    param = tl.where(is_nan, hi | 0x40, (hi + (lo >= 0x8000).to(tl.uint32)) & 0xFFFF)
    remainder = tl.where(is_nan, 0, lo)
    return param.to(tl.uint16).to(tl.bfloat16, bitcast=True), remainder.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _code_value(k, BIAS: tl.constexpr):
    """The map's value of code magnitudes k >= 0 (int32): bits((k + BIAS) << 20), and 0 for k = 0."""
    return tl.where(k == 0, 0.0, ((k + BIAS) << 20).to(tl.float32, bitcast=True))


@triton.jit
def _load_int8(ptr, offs, mask, scale, SIGNED: tl.constexpr, BIAS: tl.constexpr):
    """Moment values of int8 (SIGNED) / uint8 codes: sign(c) * value(|c|) * its row's block scale (one multiply)."""
    c = tl.load(ptr + offs, mask=mask, other=0).to(tl.int32)
    value = _code_value(tl.abs(c), BIAS)
    if SIGNED:
        value = tl.where(c < 0, -value, value)
    return value * scale[:, None]


@triton.jit
def _store_int8(ptr, scale_ptr, offs, mask, blocks, block_mask, x, SIGNED: tl.constexpr, BIAS: tl.constexpr,
                KMAX: tl.constexpr):
    """mixprec.reference.quantize_blockwise of the rows of x (one 256-element block each): the absmax scale and the
    nearest codes."""
    # the absmax as an integer max of the magnitudes' bits: for floats >= 0 the bit order is the value order, and a
    # NaN's bits are above inf's, so a NaN anywhere makes the scale NaN (an fp32 max with NaN propagating)
    magnitude = tl.where(mask, tl.abs(x), 0.0)
    scale = tl.max(magnitude.to(tl.int32, bitcast=True), axis=1).to(tl.float32, bitcast=True)
    inv = tl.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
    y = magnitude * inv[:, None]
    a = y.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
    k = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20).to(tl.int32) - BIAS
    half_value1 = tl.full((), (1 + BIAS) << 20, tl.int32).to(tl.float32, bitcast=True) * 0.5  # exact
    k = tl.where(k < 1, (y >= half_value1).to(tl.int32), k)
    k = tl.where(scale[:, None] == 0.0, 0, tl.minimum(k, KMAX))
    if SIGNED:
        tl.store(ptr + offs, tl.where(x < 0, -k, k).to(tl.int8), mask=mask)
    else:
        tl.store(ptr + offs, k.to(tl.uint8), mask=mask)
    tl.store(scale_ptr + blocks, scale, mask=block_mask)


@triton.jit
def _adam_kernel(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, w_ptr, r_ptr, m_scale_ptr, v_scale_ptr, step_ptr, lr_ptr,
                 scale_ptr, found_ptr, clip_ptr, hyper_ptr, n, beta1_f, one_minus_beta1_f, beta2_f, one_minus_beta2_f,
                 eps_f, wd_f, seed, stream,
                 MASTER: tl.constexpr, INT8: tl.constexpr, AMSGRAD: tl.constexpr, DECOUPLED: tl.constexpr,
                 MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND: tl.constexpr,
                 HAS_CLIP: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
    """One BLOCK of one tensor. MASTER: MASTER_NONE / MASTER_FP32 (w_ptr) / MASTER_REMAINDER (r_ptr); the fp32 and
    bf16 state kinds differ only in m_ptr's element type (loads widen, stores round to nearest even); INT8: int8 /
    uint8 codes with block scales, the elements laid out as [BLOCK // 256, 256] so that each row is one
    quantization block and its absmax a reduction along the row."""
    if HAS_FOUND:
        if tl.load(found_ptr) != 0.0:
            return  # a skipped step writes nothing
    pid = tl.program_id(0).to(tl.int64)
    if INT8:
        tl.static_assert(BLOCK // QBLOCK * QBLOCK == BLOCK, "BLOCK must be a multiple of the 256-element block")
        blocks = pid * (BLOCK // QBLOCK) + tl.arange(0, BLOCK // QBLOCK)
        offs = blocks[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
        block_mask = blocks * QBLOCK < n
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n

    # per-tensor coefficients: fp64, each rounded once to fp32 (adam_math.h adam_coeffs)
    step32 = tl.load(step_ptr) + 1.0
    step = step32.to(tl.float64)
    lr = tl.load(lr_ptr).to(tl.float64)
    beta1 = tl.load(hyper_ptr)
    beta2 = tl.load(hyper_ptr + 1)
    wd = tl.load(hyper_ptr + 2)
    bc1 = 1.0 - tl.exp(step * tl.log(beta1))
    bc2 = 1.0 - tl.exp(step * tl.log(beta2))
    neg_step_size = (-(lr / bc1)).to(tl.float32)
    inv_bc2_sqrt = (1.0 / tl.sqrt(bc2)).to(tl.float32)  # fp64 sqrt and division are IEEE
    decay = (1.0 - lr * wd).to(tl.float32)
    factor = tl.full((), 1.0, tl.float32)
    if HAS_SCALE:
        factor = tl.div_rn(factor, tl.load(scale_ptr))
    if HAS_CLIP:
        factor = factor * tl.load(clip_ptr)

    # loads to fp32
    if MASTER == _FP32:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    elif MASTER == _REMAINDER:
        w = _join_remainder(tl.load(p_ptr + offs, mask=mask, other=0.0), tl.load(r_ptr + offs, mask=mask, other=0))
    else:
        w = to_float32(tl.load(p_ptr + offs, mask=mask, other=0.0))
    if INT8:
        m_old = _load_int8(m_ptr, offs, mask, tl.load(m_scale_ptr + blocks, mask=block_mask, other=0.0), True,
                           _M_BIAS)
        v_old = _load_int8(v_ptr, offs, mask, tl.load(v_scale_ptr + blocks, mask=block_mask, other=0.0), False,
                           _V_BIAS)
    else:
        m_old = to_float32(tl.load(m_ptr + offs, mask=mask, other=0.0))
        v_old = to_float32(tl.load(v_ptr + offs, mask=mask, other=0.0))

    # the element update (adam_math.h adam_update)
    g = to_float32(tl.load(g_ptr + offs, mask=mask, other=0.0)) * factor
    if MAXIMIZE:
        g = -g
    if HAS_WD:
        if DECOUPLED:
            w = w * decay
        else:
            g = g + w * wd_f
    m = beta1_f * m_old + one_minus_beta1_f * g
    v = beta2_f * v_old + (one_minus_beta2_f * g) * g
    second = v
    if AMSGRAD:  # fp32 or bf16 states (refused with int8)
        vmax = to_float32(tl.load(vmax_ptr + offs, mask=mask, other=0.0))
        second = tl.where(vmax > v, vmax, v)
        tl.store(vmax_ptr + offs, round_to(second, vmax_ptr.dtype.element_ty), mask=mask)
    denom = tl.sqrt_rn(second) * inv_bc2_sqrt + eps_f
    w = w + tl.div_rn(neg_step_size * m, denom)

    # stores: the moments (the update above used their fp32 values), the master, the param
    if INT8:
        _store_int8(m_ptr, m_scale_ptr, offs, mask, blocks, block_mask, m, True, _M_BIAS, _M_MAX)
        _store_int8(v_ptr, v_scale_ptr, offs, mask, blocks, block_mask, v, False, _V_BIAS, _V_MAX)
    else:
        tl.store(m_ptr + offs, round_to(m, m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + offs, round_to(v, v_ptr.dtype.element_ty), mask=mask)
    if MASTER == _REMAINDER:
        param, remainder = _split_remainder(w)
        tl.store(p_ptr + offs, param, mask=mask)
        tl.store(r_ptr + offs, remainder, mask=mask)
    else:
        if MASTER == _FP32:
            tl.store(w_ptr + offs, w, mask=mask)
        if STOCHASTIC:
            key = _hash32(_hash32(_hash32(seed.to(tl.uint32)) ^ stream.to(tl.uint32)) + step32.to(tl.uint32))
            tl.store(p_ptr + offs, _bf16_stochastic(w, key, offs), mask=mask)
        else:
            tl.store(p_ptr + offs, round_to(w, p_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _hyper(device: torch.device, beta1: float, beta2: float, weight_decay: float) -> torch.Tensor:
    """The fp64 hyper-parameters (Triton passes Python floats as fp32), made once per value and device."""
    return torch.tensor([beta1, beta2, weight_decay], dtype=torch.float64, device=device)


def _f32(x: float) -> float:
    """x rounded once to fp32 (the scalar arguments Triton receives as fp32 are then exact)."""
    return float(np.float32(x))


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A dense (possibly permuted) tensor walked over its storage: as_strided keeps the same memory."""
    return t if t.is_contiguous() else t.as_strided((t.numel(),), (1,))


def adam_step_(params, grads, exp_avgs, exp_avg_sqs, steps, *, max_exp_avg_sqs, master_params, param_remainders=(),
               exp_avg_scales=(), exp_avg_sq_scales=(), lr, beta1, beta2, eps, weight_decay, decoupled, maximize=False,
               grad_scale=None, found_inf=None, clip_coef=None, sr_seed=-1):
    """Arguments as mixprec.reference.adam_step_, validated by mixprec.ops."""
    if not params:
        return
    device = params[0].device
    amsgrad, int8 = len(max_exp_avg_sqs) > 0, len(exp_avg_scales) > 0
    master = MASTER_FP32 if master_params else MASTER_REMAINDER if param_remainders else MASTER_NONE
    hyper = _hyper(device, float(beta1), float(beta2), float(weight_decay))
    dummy = steps[0]  # stands for the absent optional pointers (never read: the flags are constexpr)

    def optional(tensors, i):
        return _flat(tensors[i]) if tensors else dummy

    for i, p in enumerate(params):
        n = p.numel()
        if n > 0:
            stochastic = sr_seed >= 0 and p.dtype == torch.bfloat16 and master == MASTER_NONE
            _adam_kernel[(triton.cdiv(n, BLOCK),)](
                _flat(p), _flat(grads[i]), _flat(exp_avgs[i]), _flat(exp_avg_sqs[i]), optional(max_exp_avg_sqs, i),
                optional(master_params, i), optional(param_remainders, i), optional(exp_avg_scales, i),
                optional(exp_avg_sq_scales, i), steps[i], lr, grad_scale if grad_scale is not None else dummy,
                found_inf if found_inf is not None else dummy, clip_coef if clip_coef is not None else dummy,
                hyper, n, _f32(beta1), _f32(1 - beta1), _f32(beta2), _f32(1 - beta2), _f32(eps), _f32(weight_decay),
                max(sr_seed, 0), i,
                MASTER=master, INT8=int8, AMSGRAD=amsgrad, DECOUPLED=bool(decoupled), MAXIMIZE=bool(maximize),
                HAS_WD=weight_decay != 0, HAS_SCALE=grad_scale is not None, HAS_FOUND=found_inf is not None,
                HAS_CLIP=clip_coef is not None, STOCHASTIC=stochastic, BLOCK=BLOCK, num_warps=NUM_WARPS,
                enable_fp_fusion=False)
    # the step counts, after every tensor has read its own; kept on the device (no sync)
    if found_inf is None:
        torch._foreach_add_(steps, 1.0)
    else:
        torch._foreach_add_(steps, (found_inf == 0).to(torch.float32).reshape(()))
