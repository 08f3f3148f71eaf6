"""The spec: plain-PyTorch implementations of every mixprec op.

Every backend (CPU and CUDA extension, Triton) is tested against these. They favour clarity over speed,
compute in fp32 where the op is defined in fp32 (so that rounding matches bit for bit) and in fp64 where a
sum is involved (so that they are closer to the exact value than any fp32 kernel). They run on any device
and never synchronize with it.
"""
from __future__ import annotations

import torch


def _set_flag(flag: torch.Tensor, raised: torch.Tensor) -> None:
    """flag = 1.0 where raised, else unchanged (never reset), without a host sync."""
    flag.copy_(torch.where(raised, torch.ones_like(flag), flag))


def unscale_and_check_(grads, inv_scale, found_inf, norm_sq=None, per_tensor_inf=None):
    """For each grad: g = round(float32(g) * inv_scale) in g's dtype, in place.

    found_inf is set to 1.0 if any input value is inf or NaN (never reset to 0); norm_sq, if given, gets
    the sum of squares of the unscaled fp32 values added (summed here in fp64); per_tensor_inf[i], if
    given, is set to 1.0 when grads[i] held an inf or NaN. None entries are skipped.
    """
    total = torch.zeros((), dtype=torch.float64, device=found_inf.device)
    for i, g in enumerate(grads):
        if g is None or g.numel() == 0:
            continue
        g32 = g.float()
        bad = ~torch.isfinite(g32).all()
        unscaled = g32 * inv_scale.float()
        total = total + unscaled.double().square().sum()
        _set_flag(found_inf, bad.reshape(found_inf.shape))
        if per_tensor_inf is not None:
            _set_flag(per_tensor_inf[i], bad)
        g.copy_(unscaled)  # one rounding, to nearest even
    if norm_sq is not None:
        norm_sq.add_(total.to(norm_sq.dtype))


def matmul(a, b, bias=None, out_dtype=None):
    """a [..., M, K] @ b [K, N] (+ bias [N]) computed in fp32 from the exact products of the half inputs, bias
    added in fp32, rounded once to out_dtype (default a's dtype)."""
    acc = torch.matmul(a.float(), b.float())
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(out_dtype or a.dtype)


def matmul_accumulate_(c, a, b):
    """c (fp32) += a @ b, the product computed in fp32."""
    c.add_(torch.matmul(a.float(), b.float()))
