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


def selftest_cases(device: str) -> list:
    """`python -m mixprec selftest` checks of this op: every backend on `device`, against torch's unscale (bit
    for bit), the found_inf flag, and the reference's fp64 norm."""
    import functools

    from mixprec.selftest import Case, backends
    from mixprec.testing import DTYPES

    # (label, dtypes, shapes, specials): odd sizes, a 2-D tensor, planted inf/NaN, and one mixed list with an
    # empty tensor, because the kernels group by dtype and skip empty tensors.
    problems = [(str(dt).removeprefix("torch."), (dt,), [shape], specials)
                for dt in DTYPES for shape, specials in (((129,), False), ((1000, 7), False), ((1000, 7), True))]
    problems.append(("mixed", DTYPES + (torch.float16,), [(300,), (1, 77), (5000,), (0,)], False))
    cases = []
    for b in backends(device):
        for seed, (label, dtypes, shapes, specials) in enumerate(problems):
            shape = ", ".join(str(s) for s in shapes) + (" +inf/nan" if specials else "")
            check = functools.partial(_selftest_check, b.name, dtypes, shapes, specials, device, seed)
            cases.append(Case("unscale_and_check_", b.label, label, shape, check, b.env))
    return cases


def _selftest_check(backend, dtypes, shapes, specials, device, seed) -> str:
    import math

    from mixprec.testing import assert_bitwise_equal, random_grad

    gen = torch.Generator().manual_seed(seed)
    grads = [random_grad(math.prod(s), dt, generator=gen, specials=specials).reshape(s).to(device)
             for dt, s in zip(dtypes, shapes)]
    inv_scale = torch.tensor([1 / 3], device=device)  # not a power of two: every product is rounded
    expected = [g.clone() for g in grads]
    expected_inf = torch.zeros(1, device=device)
    for dt in set(dtypes):  # torch's CPU kernel takes one dtype per call
        torch._amp_foreach_non_finite_check_and_unscale_([e for e in expected if e.dtype == dt], expected_inf, inv_scale)
    ref_norm = torch.zeros(1, device=device)
    reference.unscale_and_check_([g.clone() for g in grads], inv_scale, torch.zeros(1, device=device), ref_norm)

    found_inf, norm_sq = torch.zeros(1, device=device), torch.zeros(1, device=device)
    unscale_and_check_(grads, inv_scale, found_inf, norm_sq, backend=backend)
    for i, (g, e) in enumerate(zip(grads, expected)):
        assert_bitwise_equal(g, e, f"grads[{i}] ({g.dtype}, {tuple(g.shape)}) vs torch's unscale")
    assert found_inf.item() == expected_inf.item(), f"found_inf {found_inf.item()}, torch says {expected_inf.item()}"
    got, want = norm_sq.item(), ref_norm.item()
    if not math.isfinite(want):
        assert not math.isfinite(got), f"norm_sq {got} is finite, the reference's is {want}"
        return f"bitwise equal to torch; found_inf {found_inf.item():g}; norm_sq non-finite as expected"
    rel = abs(got - want) / abs(want) if want else abs(got)
    # fp32 partial sums over a few thousand terms, then a fixed tree: 1e-5 is far above that bound
    assert rel <= 1e-5, f"norm_sq {got!r} vs reference {want!r}: relative error {rel:.2e} > 1e-5"
    return f"bitwise equal to torch; found_inf {found_inf.item():g}; norm_sq rel. error {rel:.1e}"
