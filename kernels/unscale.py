"""Triton unscale + overflow check + sum of squares: the semantics of mixprec.reference.unscale_and_check_."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._rounding import round_to, to_float32

# note: why BLOCK = 2048 on 8 warps: 8 elements per thread, so one 16-byte LDG.E.128/STG.E.128 per thread for
# fp16/bf16 and two for fp32 (Triton vectorizes when n is 16-divisible, as the JIT specializes nearly every gradient).
# Little's law: ~600-800 ns latency x 2.0 TB/s / 108 SMs (A100) = 11-15 KB, x 3.35 TB/s / 132 SMs (H100) = 15-20 KB
# in flight per SM, of which unscale's reads are half. At 27-30 registers 8 blocks fit per SM (100% occupancy):
# 2048 threads x 16 B = 32 KB of fp16/bf16 loads (64 KB fp32) in flight, 1.6-2x H100's whole-traffic figure and
# 3-4x its read share. 4096 on 4 warps (32 elements per thread) took 64-88 registers vectorized (31-50%) and 134-176
# element-wise (12-19%): more work per thread bought bytes in flight only by giving up warps. An n that is not
# 16-divisible compiles element-wise accesses at 38-48 registers: still 62-75%, ~20 KB (fp16) in flight. The
# per-program partial sums are added in a fixed order afterwards, so norm_sq is deterministic for any BLOCK.
BLOCK = 2048
NUM_WARPS = 8


@triton.jit
def _nonfinite_at(x, dtype: tl.constexpr):
    """fp32 x is inf or NaN once rounded to nearest even in `dtype`: |x| (as bits) at or above the smallest value
    that rounds to inf (mixprec/unscale_math.h's nonfinite_limit: 65520 for fp16, 0x7f7f8000 for bf16)."""
    if dtype == tl.float16:
        limit = 0x477FF000
    elif dtype == tl.bfloat16:
        limit = 0x7F7F8000
    else:
        limit = 0x7F800000
    return (x.to(tl.uint32, bitcast=True) & 0x7FFFFFFF) >= limit


@triton.jit
def _unscale_kernel(g_ptr, n, inv_scale_ptr, found_inf_ptr, tensor_flag_ptr, partial_ptr, BLOCK: tl.constexpr,
                    CHECK_ONLY: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = to_float32(tl.load(g_ptr + offs, mask=mask, other=0.0))
    inv = tl.load(inv_scale_ptr)
    unscaled = g * inv
    if CHECK_ONLY:
        # nothing written: the squares of the values as stored, the fp32 products checked (what a caller that
        # unscales in fp32 will compute)
        tl.store(partial_ptr + pid, tl.sum(g * g, axis=0))
        bad = _nonfinite_at(unscaled, tl.float32)
    else:
        if inv != 1.0:  # inv == 1 leaves the values as they are: the pass only reads
            tl.store(g_ptr + offs, round_to(unscaled, g_ptr.dtype.element_ty), mask=mask)
        tl.store(partial_ptr + pid, tl.sum(unscaled * unscaled, axis=0))
        bad = _nonfinite_at(unscaled, g_ptr.dtype.element_ty)  # as stored
    n_bad = tl.sum((bad & mask).to(tl.int32), axis=0)
    if n_bad > 0:
        tl.store(found_inf_ptr, 1.0)
        tl.store(tensor_flag_ptr, 1.0)


def unscale_and_check_(grads, inv_scale, found_inf, norm_sq=None, per_tensor_inf=None, check_only=False):
    """Launches one program grid per tensor; arguments are validated by mixprec.ops."""
    partials = []
    device = found_inf.device
    scratch_flag = torch.zeros(1, dtype=torch.float32, device=device)
    for i, g in enumerate(grads):
        if g is None or g.numel() == 0:
            continue
        n = g.numel()
        n_programs = triton.cdiv(n, BLOCK)
        partial = torch.empty(n_programs, dtype=torch.float32, device=device)
        flag = per_tensor_inf[i:i + 1] if per_tensor_inf is not None else scratch_flag
        # A dense (possibly permuted) tensor is walked over its storage: as_strided keeps the same memory.
        flat = g if g.is_contiguous() else g.as_strided((n,), (1,))
        _unscale_kernel[(n_programs,)](flat, n, inv_scale, found_inf, flag, partial, BLOCK=BLOCK,
                                       CHECK_ONLY=bool(check_only), num_warps=NUM_WARPS)
        partials.append(partial)
    if norm_sq is not None and partials:
        norm_sq.add_(torch.cat(partials).sum())
