"""Layers' functional forms on mixprec's differentiable ops."""
from __future__ import annotations

import torch

from mixprec import ops


class _MainGradTap(torch.autograd.Function):
    """y unchanged, whose backward adds the weight gradient into weight.main_grad with matmul_accumulate_ (fp32
    product added to the fp32 accumulator, no half intermediate) and returns no gradient for the weight. dx and db
    come from the op's own backward, which never sees the weight requiring grad (the caller gives it
    weight.detach()), so nothing is computed twice.

    Weight layouts: [out, in] (nn.Linear, y = x W^T: dW = dy^T x) or, with in_out, [in, out] (transformers'
    Conv1D, y = x W: dW = x^T dy). Either way the product is written straight into main_grad's own layout.

    note: torch.compile still breaks the graph at this Function (it traces a Function's backward strictly, and
    matmul_accumulate_'s argument checks read Tensor.layout), so the main_grad path runs eagerly there."""

    @staticmethod
    def forward(ctx, y, x, weight, in_out, backend):
        ctx.save_for_backward(x, weight)
        ctx.in_out, ctx.backend = in_out, backend
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        if ctx.needs_input_grad[2]:
            # the transposed operand is read in place (a view); x's batch rows fold into the GEMM's K
            x2, g2 = x.reshape(-1, x.shape[-1]), grad_y.reshape(-1, grad_y.shape[-1])
            a, b = (x2.t(), g2) if ctx.in_out else (g2.t(), x2)
            ops.matmul_accumulate_(weight.main_grad, a, b, backend=ctx.backend)
        return grad_y, None, None, None, None


def _project(x: torch.Tensor, weight: torch.Tensor, bias, backend: str, *, in_out: bool) -> torch.Tensor:
    """x @ W^T (weight [out, in]) or, with in_out, x @ W (weight [in, out]) on mixprec.ops.matmul, with the
    weight read in its own layout (a view, never a transposed copy) and the main_grad path of linear()."""
    x2 = x.unsqueeze(0) if x.dim() == 1 else x  # the op wants a [..., M, K]
    as_b = (lambda w: w) if in_out else (lambda w: w.t())
    if getattr(weight, "main_grad", None) is None:
        y = ops.matmul(x2, as_b(weight), bias=bias, backend=backend)
    else:
        y = ops.matmul(x2, as_b(weight.detach()), bias=bias, backend=backend)
        y = _MainGradTap.apply(y, x2.detach(), weight, in_out, backend)
    return y.squeeze(0) if x.dim() == 1 else y


def _check_shapes(x, weight, in_features_dim: int, layout: str) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor {layout}, got {tuple(getattr(weight, 'shape', ()))}")
    in_features = weight.shape[in_features_dim]
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have shape [..., in_features] = [..., {in_features}], got "
                         f"{tuple(getattr(x, 'shape', ()))}")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           backend: str = "auto") -> torch.Tensor:
    """torch.nn.functional.linear for fp16/bf16 x and weight, with fp32 accumulation in every GEMM (forward, dX,
    dW: all on mixprec.ops.matmul and its backward).

    x [..., in_features], weight [out_features, in_features] of x's dtype, bias [out_features] or None. When the
    weight carries an fp32 `main_grad` tensor (Megatron-LM's convention) at the forward, dW is accumulated straight
    into it with matmul_accumulate_ and no weight gradient is returned, so .grad stays untouched; otherwise dW is
    returned in the weight's dtype and autograd accumulates it into .grad as usual.
    """
    _check_shapes(x, weight, 1, "[out_features, in_features]")
    # weight.t() is a view: the kernels read W [out, in] as a K-contiguous b without a copy, and the op's backward
    # hands the weight a contiguous gradient
    return _project(x, weight, bias, backend, in_out=False)


def linear_in_out(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  backend: str = "auto") -> torch.Tensor:
    """x @ weight (+ bias) for a weight stored [in_features, out_features]: the layout of transformers' Conv1D
    (GPT-2's projections), y = addmm(bias, x.view(-1, in), weight). As linear() otherwise: fp16/bf16 x and weight,
    fp32 accumulation in every GEMM, main_grad honoured. The weight is read in its own layout (no transposed
    copy), and its gradient comes back in that layout, so a contiguous weight gets a contiguous gradient."""
    _check_shapes(x, weight, 0, "[in_features, out_features]")
    return _project(x, weight, bias, backend, in_out=True)
