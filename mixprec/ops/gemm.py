"""mixprec.ops.matmul / matmul_accumulate_: fp16/bf16 GEMM with fp32 accumulation and one rounding; matmul is
differentiable on every backend, its backward GEMMs running on the same kernels."""
from __future__ import annotations

import torch

from mixprec import _backend, _ext, reference
from mixprec.ops._validate import check_tensor, check_writable, has_self_overlap

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

    Differentiable in a, b and bias (formulas at _backward_on): a gradient arriving in another dtype than a's (an
    out_dtype of fp32, say) is rounded to a's dtype before the backward GEMMs, whose operands must be half.
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
        return reference.matmul(a, b, bias, out_dtype)  # plain PyTorch: autograd differentiates it as it stands
    if chosen == "triton":
        return torch.ops.mixprec.matmul_triton(a, b, bias, out_dtype)
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
    check_writable("c", c)
    if has_self_overlap(c):
        raise ValueError(f"c has elements that share memory (shape {tuple(c.shape)}, strides {c.stride()}, e.g. an "
                         "expanded view): each output element needs its own address; pass c.clone() and read the "
                         "result from it")
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


# The Triton kernel as an op of its own, with the extension op's schema, rather than a Python autograd.Function
# around the launcher: torch.compile then sees one opaque node (it never traces the launcher or the import of
# triton), and both ops get their fake and autograd registrations from the one _register below.
@torch.library.custom_op("mixprec::matmul_triton", mutates_args=())
def _matmul_triton(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
                   out_dtype: torch.dtype | None = None) -> torch.Tensor:
    from mixprec.kernels import gemm as triton_gemm

    out = torch.empty(_out_shape(a, b), dtype=out_dtype or a.dtype, device=a.device)
    return triton_gemm.gemm(a, b, out, bias)


def _fake_matmul(a, b, bias=None, out_dtype=None):
    return a.new_empty(_out_shape(a, b), dtype=out_dtype or a.dtype)


def _setup_context(ctx, inputs, output) -> None:
    a, b, bias, _ = inputs
    ctx.save_for_backward(a, b)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _in_layout_of(like, gemm, x, y):
    """x @ y on `gemm`, stored like `like` where that costs nothing: for a 2-D `like` stored transposed (b =
    weight.t() of a linear layer, stride(0) == 1) as (y^T @ x^T)^T, the same fp32 sums, so that the gradient
    reaching a contiguous weight is contiguous and AccumulateGrad has nothing to copy."""
    if like.dim() == 2 and like.stride(0) == 1 and like.stride(1) != 1:
        return gemm(y.t(), x.t()).t()
    return gemm(x, y)


def _backward_on(gemm):
    """The backward of matmul(a, b, bias, out_dtype) with its GEMMs on `gemm`, the op itself: the forward's kernels
    (fp32 accumulation, one rounding), called without the public wrapper's argument checks: the saved inputs
    passed them, and the checks' Tensor.layout is not allowed where torch.compile traces a backward.

    grad_a = grad @ b^T and grad_b = a^T @ grad over all batch rows, in a's dtype; grad_bias = the fp32 sum of
    grad over all but the last dim, rounded once to bias's dtype. The GEMMs take fp16/bf16 operands of one dtype,
    so a grad of another dtype (out_dtype != a's dtype, fp32 say) is first rounded to a's dtype: grad_a and grad_b
    carry that rounding (half an ulp of each grad element) on top of their own; grad_bias sums grad as it came."""

    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        # the dispatcher drops trailing arguments left at their defaults: needs_input_grad may stop after b
        need_a, need_b = ctx.needs_input_grad[:2]
        g = grad.to(a.dtype)
        grad_a = _in_layout_of(a, gemm, g, b.t()) if need_a else None
        grad_b = _in_layout_of(b, gemm, a.reshape(-1, a.shape[-1]).t(), g.reshape(-1, g.shape[-1])) if need_b else None
        grad_bias = None
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = torch.sum(grad, tuple(range(grad.dim() - 1)), dtype=torch.float32).to(ctx.bias_dtype)
        return grad_a, grad_b, grad_bias, None

    return backward


def _register(op) -> None:
    """Shape inference and autograd of an op with the schema of mixprec::matmul."""
    torch.library.register_fake(op, _fake_matmul)
    torch.library.register_autograd(op, _backward_on(op), setup_context=_setup_context)


_register(torch.ops.mixprec.matmul_triton.default)

if _ext.available():
    _register(torch.ops.mixprec.matmul.default)

    @torch.library.register_fake("mixprec::matmul_accumulate_")
    def _(c, a, b):
        return None
