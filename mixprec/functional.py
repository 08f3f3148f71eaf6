"""Autograd functions whose GEMMs run on mixprec's kernels."""
from __future__ import annotations

import torch

from mixprec import ops


class _Linear(torch.autograd.Function):
    """y = x W^T + b with all three GEMMs (forward, dX, dW) on mixprec.ops.matmul (fp32 accumulation).

    When the weight carries an fp32 `main_grad` tensor (Megatron-LM's convention), dW is accumulated straight
    into it with matmul_accumulate_ and no weight gradient is returned, so .grad stays untouched; otherwise dW
    is returned in the weight's dtype and autograd accumulates it into .grad as usual.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, backend):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.backend = backend
        # weight.t() is a view: the kernels read W [out, in] as a K-contiguous b without a copy
        return ops.matmul(x, weight.t(), bias=bias, backend=backend)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        backend = ctx.backend
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = ops.matmul(grad_out, weight, backend=backend)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dy = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])
            main_grad = getattr(weight, "main_grad", None)
            if main_grad is not None:
                ops.matmul_accumulate_(main_grad, dy.t(), x2, backend=backend)
            else:
                grad_w = ops.matmul(dy.t(), x2, backend=backend)  # dy^T read in place (M-contiguous)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = dy.float().sum(0).to(grad_out.dtype)  # fp32 sum, one rounding
        return grad_x, grad_w, grad_b, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           backend: str = "auto") -> torch.Tensor:
    """torch.nn.functional.linear for fp16/bf16 x and weight, with fp32 accumulation in every GEMM.

    x [..., in_features], weight [out_features, in_features] of x's dtype, bias [out_features] or None.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [out_features, in_features], got "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must have shape [..., in_features] = [..., {weight.shape[1]}], got "
                         f"{tuple(getattr(x, 'shape', ()))}")
    if x.dim() == 1:
        return _Linear.apply(x.unsqueeze(0), weight, bias, backend).squeeze(0)
    return _Linear.apply(x, weight, bias, backend)
