"""mixprec.ops.unscale_and_check_: unscale, overflow check and sum of squares in one pass over the grads."""
from __future__ import annotations

import torch

from mixprec import _backend, _ext, reference
from mixprec.ops._validate import check_dense, check_scalar, check_tensor_list, common_device


def unscale_and_check_(grads, inv_scale, found_inf, norm_sq=None, *, per_tensor_inf=None, backend="auto"):
    """Unscale gradients in place and look for overflow, in one read and write of each gradient.

    For every grad g (fp32, fp16 or bf16; any mix; None entries skipped): g = round(float32(g) * inv_scale)
    in g's dtype, bit for bit what torch._amp_foreach_non_finite_check_and_unscale_ writes.
    found_inf (one-element fp32) is set to 1.0 if any value is inf or NaN, and never reset: the caller zeroes
    it once per step. norm_sq (optional one-element fp32) gets the sum of squares of the unscaled values
    added. per_tensor_inf (optional fp32, one element per grad) gets 1.0 at the grads holding inf or NaN.
    Nothing synchronizes with the device. An empty list is a no-op. With inv_scale == 1.0 the values would not
    change, so the kernels only read them: a check pass (as GradScaler runs before a fused optimizer step)
    moves half the bytes.
    """
    grads = check_tensor_list("grads", grads, allow_none=True)
    present = [i for i, g in enumerate(grads) if g is not None]
    if not present:
        return
    device = common_device("grads", grads)
    check_scalar("inv_scale", inv_scale, device)
    check_scalar("found_inf", found_inf, device)
    if norm_sq is not None:
        check_scalar("norm_sq", norm_sq, device)
    if per_tensor_inf is not None:
        if (not isinstance(per_tensor_inf, torch.Tensor) or per_tensor_inf.dtype != torch.float32
                or per_tensor_inf.shape != (len(grads),) or per_tensor_inf.device != device):
            raise ValueError(f"per_tensor_inf must be a float32 tensor of shape ({len(grads)},) on {device}")
    for i in present:
        check_dense(f"grads[{i}]", grads[i])

    chosen = _backend.select(backend, device)
    if chosen == "reference":
        reference.unscale_and_check_(grads, inv_scale, found_inf, norm_sq, per_tensor_inf)
    elif chosen == "triton":
        from mixprec.kernels import unscale as triton_unscale

        triton_unscale.unscale_and_check_(grads, inv_scale, found_inf, norm_sq, per_tensor_inf)
    else:
        dense = [grads[i] for i in present]
        flags = per_tensor_inf
        if per_tensor_inf is not None and len(present) != len(grads):
            flags = torch.zeros(len(present), dtype=torch.float32, device=device)
        torch.ops.mixprec.unscale_and_check_(dense, inv_scale, found_inf, norm_sq, flags)
        if flags is not per_tensor_inf and per_tensor_inf is not None:
            index = torch.tensor(present)
            if device.type == "cuda":  # from pinned memory the copy is queued, never waited for
                index = index.pin_memory().to(device, non_blocking=True)
            per_tensor_inf.index_copy_(0, index, torch.maximum(per_tensor_inf[index], flags))


if _ext.available():

    @torch.library.register_fake("mixprec::unscale_and_check_")
    def _(grads, inv_scale, found_inf, norm_sq=None, per_tensor_inf=None):
        return None
