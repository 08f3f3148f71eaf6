"""Rounding fp32 values to a storage dtype inside Triton kernels, shared by every kernel in this package.

note: why a bit trick for bf16. On a GPU ``x.to(tl.bfloat16)`` compiles to ``cvt.rn.bf16.f32`` (round to
nearest even), but triton 3.8's interpreter (TRITON_INTERPRET=1, which the tests use on CPU tensors) converts
fp32 -> bf16 by dropping the low 16 bits, i.e. it truncates. Rounding on the integer bits gives the same
result as the hardware instruction for every non-NaN input, in both modes, so the tests check what the GPU
computes. The cost (a handful of integer ops per stored element) only matters in epilogues, where it is
negligible next to the loads. fp16 needs no trick: both the GPU and the interpreter (numpy ``astype``) round
fp32 -> fp16 to nearest even.
"""
import triton
import triton.language as tl


@triton.jit
def fp32_to_bf16_rne(x):
    """Round fp32 ``x`` to bf16, nearest even; NaN stays a (quiet) NaN with its sign, inf stays inf."""
    u = x.to(tl.uint32, bitcast=True)
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    # bf16 is the top half of an fp32: add half an ulp, minus one when the kept lsb is even, and truncate.
    # No overflow: the largest non-NaN pattern, 0xff800000 (-inf), plus 0x8000 stays below 2^32.
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    bits = tl.where(is_nan, (u >> 16) | 0x40, rounded)
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """Round fp32 ``x`` once to ``dtype`` (fp16, bf16 or fp32) with round-to-nearest-even."""
    if dtype == tl.bfloat16:
        return fp32_to_bf16_rne(x)
    else:
        return x.to(dtype)
