"""mixprec.ops.unscale_and_check_: unscale, overflow check and sum of squares in one pass over the grads."""
from __future__ import annotations

import torch

from mixprec import _backend, _ext, reference
from mixprec.ops._validate import (
    check_distinct,
    check_scalar,
    check_tensor_list,
    check_writable,
    common_device,
    has_self_overlap,
    is_non_overlapping_and_dense,
)


def unscale_and_check_(grads, inv_scale, found_inf, norm_sq=None, *, per_tensor_inf=None, check_only=False,
                       backend="auto"):
    """Unscale gradients in place and look for overflow, in one read and write of each gradient.

    For every grad g (fp32, fp16 or bf16; any mix; any shape, 0-dim included; None entries skipped):
    g = round(float32(g) * inv_scale) in g's dtype, bit for bit what torch._amp_foreach_non_finite_check_and_unscale_
    writes. found_inf (one-element fp32) is set to 1.0 if any unscaled value, as written in g's dtype, is inf or
    NaN, and never reset: the caller zeroes it once per step. norm_sq (optional one-element fp32) gets the sum of
    squares of the unscaled fp32 values added. per_tensor_inf (optional fp32, one element per grad) gets 1.0 at the
    grads flagged. Nothing synchronizes with the device. An empty list is a no-op. With inv_scale == 1.0 the values
    would not change, so the kernels only read them.

    found_inf deliberately differs from torch's there: torch flags the inputs only, so a finite grad that
    overflows when unscaled (a loss scale below 1, inv_scale > 1: at GradScaler's floor 2**-126 any |g| > 4 in
    fp32; fp16 grads past 65504 once unscaled) writes inf while found_inf stays 0, and the optimizer steps on it.
    Here it is flagged. A non-finite input is still flagged, whatever inv_scale (inf * 0 and NaN * x are NaN), so
    with inv_scale == 0 the flags are torch's, and with inv_scale inf or NaN every grad holding a value is flagged
    (its values are written as inf or NaN).

    check_only=True: a check pass for a caller that unscales the grads itself, in fp32 (GradScaler before a fused
    optimizer step, whose kernel divides by the scale): the grads are only read (half the bytes), found_inf and
    per_tensor_inf flag the grads whose fp32 products float32(g) * inv_scale hold inf or NaN (exactly what that
    caller will compute), and norm_sq gets the sum of squares of the grads as they are (not unscaled).

    Layouts: dense grads (contiguous, channels_last, any permutation) go through the kernels as they are. Strided
    views with gaps (``base[:, :5]``) are unscaled through a dense copy written back after the pass (slower:
    two more copies of those grads), bit for bit as torch unscales them. Refused, before anything is written, as
    torch's in-place ops refuse them: grads whose own elements share memory (expanded), two entries sharing
    memory (the same tensor twice: a sequential loop would unscale it twice, the parallel kernels would race),
    inference tensors outside inference mode, and leaves requiring grad while grad mode is on (the flags and
    norm_sq are checked the same way).
    """
    if not isinstance(check_only, bool):
        raise TypeError(f"check_only must be a bool, got {type(check_only).__name__}")
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
    chosen = _backend.select(backend, device)
    compiling = torch.compiler.is_compiling()  # dynamo cannot trace the storage and inference-mode queries
    if not compiling:
        for name, t in (("found_inf", found_inf), ("norm_sq", norm_sq), ("per_tensor_inf", per_tensor_inf)):
            if t is not None:
                check_writable(name, t)
    gappy = []  # positions of the strided views with gaps, to unscale through a dense copy
    for i in present:
        g = grads[i]
        # only a tensor that requires grad or is an inference tensor can be refused: the name is made for those
        if not compiling and (g.requires_grad or g.is_inference()):
            check_writable(f"grads[{i}]", g)
        if not (g.is_contiguous() or is_non_overlapping_and_dense(g)):
            if has_self_overlap(g):
                raise RuntimeError(f"grads[{i}] has elements that share memory (e.g. an expanded tensor, stride "
                                   f"{tuple(g.stride())} for shape {tuple(g.shape)}): it cannot be unscaled in "
                                   "place, as with torch's in-place ops; clone() it first")
            gappy.append(i)
    # note: the extension refuses aliases itself, with the same error (C++, microseconds for a list the Python
    # check takes ~0.3 ms over), but it sees only the present grads and the dense copies of gappy views: such
    # lists, and the other backends, are checked here.
    if not compiling and (chosen not in ("cpu", "cuda") or gappy or len(present) != len(grads)):
        check_distinct("grads", grads)

    originals = {}
    if gappy:
        with torch.no_grad():
            for i in gappy:
                originals[i] = grads[i]
                grads[i] = grads[i].contiguous()  # a copy: `grads` is this function's own list

    if chosen == "reference":
        # the spec broadcasts inv_scale against each grad: a 0-dim view keeps a 0-dim grad 0-dim
        reference.unscale_and_check_(grads, inv_scale.reshape(()), found_inf, norm_sq, per_tensor_inf,
                                     check_only=check_only)
    elif chosen == "triton":
        from mixprec.kernels import unscale as triton_unscale

        triton_unscale.unscale_and_check_(grads, inv_scale, found_inf, norm_sq, per_tensor_inf,
                                          check_only=check_only)
    else:
        dense = [grads[i] for i in present]
        flags = per_tensor_inf
        if per_tensor_inf is not None and len(present) != len(grads):
            flags = torch.zeros(len(present), dtype=torch.float32, device=device)
        torch.ops.mixprec.unscale_and_check_(dense, inv_scale, found_inf, norm_sq, flags, check_only=check_only)
        if flags is not per_tensor_inf and per_tensor_inf is not None:
            index = torch.tensor(present)
            if device.type == "cuda":  # from pinned memory the copy is queued, never waited for
                index = index.pin_memory().to(device, non_blocking=True)
            per_tensor_inf.index_copy_(0, index, torch.maximum(per_tensor_inf[index], flags))

    if originals and not check_only:
        with torch.no_grad():
            for i, g in originals.items():
                g.copy_(grads[i])  # exact: same dtype


if _ext.available():

    @torch.library.register_fake("mixprec::unscale_and_check_")
    def _(grads, inv_scale, found_inf, norm_sq=None, per_tensor_inf=None, *, check_only=False):
        return None
