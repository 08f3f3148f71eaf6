"""Conversions between fp32 and the storage dtypes in Triton, identical compiled and under the interpreter.

note: triton 3.8's interpreter truncates fp32 -> bf16 casts instead of rounding to nearest even, and widens
bf16 subnormals to wrong fp32 values (1e-39 came back as 4.4e-39); so bf16 is converted here on the bits,
the same arithmetic as csrc/include/mixprec/rounding.h (exact, and as cheap as the cast when compiled).
fp16 casts round to nearest even both compiled (cvt.rn) and interpreted (numpy): they use the plain cast.
"""
import triton
import triton.language as tl


@triton.jit
def float_to_bf16_rne(x):
    u = x.to(tl.uint32, bitcast=True)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    bits = tl.where(is_nan, (u >> 16) | 0x40, rounded)  # NaN stays a quiet NaN with its sign
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def to_float32(x):
    """Exact widening of a loaded fp32 / fp16 / bf16 value to fp32."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 x rounded to nearest even in `dtype` (fp32, fp16 or bf16)."""
    if dtype == tl.bfloat16:
        return float_to_bf16_rne(x)
    else:
        return x.to(dtype)
