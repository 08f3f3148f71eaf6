"""Layers' functional forms on mixprec's differentiable ops."""
from __future__ import annotations

import torch

from mixprec import ops


class _MainGradTap(torch.autograd.Function):
    """y unchanged, whose backward adds the weight gradient dW = dy^T x of y = x W^T (+ b) into weight.main_grad
    with matmul_accumulate_ (fp32 product added to the fp32 accumulator, no half intermediate) and returns no
    gradient for the weight. dx and db come from the op's own backward, which never sees the weight requiring
    grad (linear gives it weight.detach()), so nothing is computed twice.

    note: torch.compile still breaks the graph at this Function (it traces a Function's backward strictly, and
    matmul_accumulate_'s argument checks read Tensor.layout), so the main_grad path runs eagerly there."""

    @staticmethod
    def forward(ctx, y, x, weight, backend):
        ctx.save_for_backward(x, weight)
        ctx.backend = backend
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        if ctx.needs_input_grad[2]:
            # dy^T is read in place (M-contiguous); x's batch rows fold into the GEMM's K
            ops.matmul_accumulate_(weight.main_grad, grad_y.reshape(-1, grad_y.shape[-1]).t(),
                                   x.reshape(-1, x.shape[-1]), backend=ctx.backend)
        return grad_y, None, None, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           backend: str = "auto") -> torch.Tensor:
    """torch.nn.functional.linear for fp16/bf16 x and weight, with fp32 accumulation in every GEMM (forward, dX,
    dW: all on mixprec.ops.matmul and its backward).

    x [..., in_features], weight [out_features, in_features] of x's dtype, bias [out_features] or None. When the
    weight carries an fp32 `main_grad` tensor (Megatron-LM's convention) at the forward, dW is accumulated straight
    into it with matmul_accumulate_ and no weight gradient is returned, so .grad stays untouched; otherwise dW is
    returned in the weight's dtype and autograd accumulates it into .grad as usual.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [out_features, in_features], got "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must have shape [..., in_features] = [..., {weight.shape[1]}], got "
                         f"{tuple(getattr(x, 'shape', ()))}")
    x2 = x.unsqueeze(0) if x.dim() == 1 else x  # the op wants a [..., M, K]
    # weight.t() is a view: the kernels read W [out, in] as a K-contiguous b without a copy, and the op's backward
    # hands the weight a contiguous gradient
    if getattr(weight, "main_grad", None) is None:
        y = ops.matmul(x2, weight.t(), bias=bias, backend=backend)
    else:
        y = ops.matmul(x2, weight.detach().t(), bias=bias, backend=backend)
        y = _MainGradTap.apply(y, x2.detach(), weight, backend)
    return y.squeeze(0) if x.dim() == 1 else y
