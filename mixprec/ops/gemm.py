"""mixprec.ops.matmul / matmul_accumulate_: fp16/bf16 GEMM with fp32 accumulation and one rounding."""
from __future__ import annotations

import torch

from mixprec import _backend, _ext, reference
from mixprec.ops._validate import check_tensor

HALF_DTYPES = (torch.float16, torch.bfloat16)
OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_operands(a, b) -> None:
    check_tensor("a", a, dtypes=HALF_DTYPES)
    check_tensor("b", b, dtypes=HALF_DTYPES)
    if a.dim() < 2:
        raise ValueError(f"a must have shape [..., M, K], got {tuple(a.shape)}")
    if b.dim() != 2:
        raise ValueError(f"b must have shape [K, N], got {tuple(b.shape)}")
    if b.dtype != a.dtype:
        raise TypeError(f"b must have a's dtype {a.dtype}, got {b.dtype}")
    if b.device != a.device:
        raise ValueError(f"b must be on a's device {a.device}, got {b.device}")
    if b.shape[0] != a.shape[-1]:
        raise ValueError(f"b must have shape [K, N] with K = a.shape[-1] = {a.shape[-1]}, got {tuple(b.shape)}")


def _out_shape(a, b) -> tuple:
    return (*a.shape[:-1], b.shape[1])


def matmul(a: torch.Tensor, b: torch.Tensor, *, bias: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None, backend: str = "auto") -> torch.Tensor:
    """a [..., M, K] @ b [K, N] (+ bias [N]) with fp32 accumulation, rounded once to out_dtype.

    a and b: both fp16 or both bf16, any strides (transposed views are read in place). bias: fp16, bf16 or
    fp32, added in fp32 before the rounding. out_dtype: fp16, bf16 or fp32 (default a's dtype).
    """
    _check_operands(a, b)
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype not in OUT_DTYPES:
            raise TypeError(f"bias must be a float32, float16 or bfloat16 tensor, got "
                            f"{getattr(bias, 'dtype', type(bias).__name__)}")
        if bias.shape != (b.shape[1],):
            raise ValueError(f"bias must have shape [N] = [{b.shape[1]}], got {tuple(bias.shape)}")
        if bias.device != a.device:
            raise ValueError(f"bias must be on a's device {a.device}, got {bias.device}")
    if out_dtype is not None and out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be torch.float16, torch.bfloat16 or torch.float32, got {out_dtype}")
    chosen = _backend.select(backend, a.device)
    if chosen == "reference":
        return reference.matmul(a, b, bias, out_dtype)
    if chosen == "triton":
        from mixprec.kernels import gemm as triton_gemm

        out = torch.empty(_out_shape(a, b), dtype=out_dtype or a.dtype, device=a.device)
        return triton_gemm.gemm(a, b, out, bias)
    return torch.ops.mixprec.matmul(a, b, bias, out_dtype)


def matmul_accumulate_(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, backend: str = "auto") -> None:
    """c += a @ b in place, c fp32 of shape a.shape[:-1] + [N]; the product accumulates in fp32 and is added
    to c without a half-precision intermediate (weight gradients straight into fp32 main grads)."""
    _check_operands(a, b)
    if not isinstance(c, torch.Tensor) or c.dtype != torch.float32:
        raise TypeError(f"c must be a float32 tensor (the accumulator), got {getattr(c, 'dtype', type(c).__name__)}")
    if c.device != a.device:
        raise ValueError(f"c must be on a's device {a.device}, got {c.device}")
    if tuple(c.shape) != _out_shape(a, b):
        raise ValueError(f"c must have shape a.shape[:-1] + [N] = {list(_out_shape(a, b))}, got {list(c.shape)}")
    chosen = _backend.select(backend, a.device)
    if chosen == "reference":
        reference.matmul_accumulate_(c, a, b)
    elif chosen == "triton":
        from mixprec.kernels import gemm as triton_gemm

        try:
            c.view(-1, *c.shape[-2:])  # the kernel writes c through a [B, M, N] view
            target = c
        except RuntimeError:
            target = c.contiguous()
        triton_gemm.gemm(a, b, target, accumulate=True)
        if target is not c:
            c.copy_(target)
    else:
        torch.ops.mixprec.matmul_accumulate_(c, a, b)


if _ext.available():

    @torch.library.register_fake("mixprec::matmul")
    def _(a, b, bias=None, out_dtype=None):
        return a.new_empty(_out_shape(a, b), dtype=out_dtype or a.dtype)

    @torch.library.register_fake("mixprec::matmul_accumulate_")
    def _(c, a, b):
        return None
