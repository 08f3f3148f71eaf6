"""The gradient-norm handoff from mixprec.amp.GradScaler to optimizers, so that clipping costs no second pass.

The scaler's fused unscale pass (mixprec.ops.unscale_and_check_) also sums the squares of the gradients, and
the scaler publishes that sum on the optimizer as ``optimizer._mixprec_grad_norm_sq``:

- set by GradScaler.unscale_(optimizer), or by GradScaler.step(optimizer) for an optimizer that unscales in its
  own kernel (``_step_supports_amp_scaling``), from that same pass;
- a 0-dim float32 tensor on the gradients' device: the sum of squares of the UNSCALED gradients (inf/NaN when
  the step overflowed);
- scaled down in place by GradScaler.clip_grad_norm_ when that clips, so that it stays the norm of the
  gradients the optimizer will see;
- removed by GradScaler.update(), unless it has been replaced in the meantime.

mixprec.optim reads it for max_grad_norm. The attribute name is documented: other optimizers may read it too.
"""
from __future__ import annotations

import torch

from mixprec import distributed

_ATTR = "_mixprec_grad_norm_sq"


def publish(optimizer, norm_sq: torch.Tensor) -> None:
    setattr(optimizer, _ATTR, norm_sq)


def published(optimizer) -> torch.Tensor | None:
    return getattr(optimizer, _ATTR, None)


def withdraw(optimizer, norm_sq: torch.Tensor) -> None:
    """Remove the published sum if it is still norm_sq: one set since (by hand, or by another scaler) stays."""
    if published(optimizer) is norm_sq:
        delattr(optimizer, _ATTR)


def sum_of_squares(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The sum of squares of grads (plain tensors, or DTensors whose local shards are on device) as they are, for
    when nothing was published: a 0-dim fp32 tensor on device, from one pass that multiplies them by 1 (the fused
    op has no measure-only mode; with multiplier 1 its kernels only read); for DTensor grads the local sums are
    all-reduced over the ranks (mixprec.distributed). A tensor listed twice is one gradient, counted once (the op
    refuses aliased lists)."""
    norm_sq = torch.zeros((), dtype=torch.float32, device=device)
    distinct = list({id(g): g for g in grads}.values())
    with torch.no_grad():
        distributed.unscale_and_check_(distinct, torch.ones((), device=device), torch.zeros((), device=device), norm_sq)
    return norm_sq


def clip_coef(norm: torch.Tensor, max_norm) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_'s coefficient for gradients of 2-norm `norm`: min(1, max_norm / (norm + 1e-6))."""
    return (max_norm / (norm + 1e-6)).clamp(max=1.0)
