"""The checks `python -m mixprec selftest` runs, per op: every backend on the device against mixprec.reference (or
torch's own kernel where the contract is bitwise equality with it), on fresh random inputs from mixprec.testing.

Adding an op: add a `<op module>_cases(device) -> list[Case]` here and its entry in CASES; the selftest reports an
op module of mixprec.ops without one. A Case's `check()` raises AssertionError naming what differs, and otherwise
returns a short account of the error it measured.
"""
from __future__ import annotations

import functools
import math

import torch

from mixprec import ops, reference, testing
from mixprec.tools.selftest import Case, backends


def adam_cases(device: str) -> list[Case]:
    """`python -m mixprec selftest` checks of adam_step_: every backend on `device` and every mode (param / master
    variant x state kind: fp32, bf16, int8 block-wise), bit for bit against mixprec.reference (odd sizes, several
    blocks, amsgrad where the state allows it, both decays), then the skipped step. On the CPU the compact modes
    (remainder masters, bf16 and int8 states) skip the largest problem: the Triton interpreter is slow on them, and
    the smaller sizes already cover partial blocks."""

    problems = [((129,), False, False), ((1000, 7), True, True), ((70001,), False, True)]
    cases = []
    for b in backends(device):
        for variant in testing.VARIANTS:
            for state in testing.STATES:
                compact = testing.is_compact_mode(variant, state)
                for seed, (shape, amsgrad, decoupled) in enumerate(problems[:2] if compact and device == "cpu"
                                                                   else problems):
                    amsgrad = amsgrad and state != "int8"
                    check = functools.partial(_check_adam, b.name, variant, state, shape, amsgrad, decoupled, device,
                                              seed)
                    label = f"{shape}{' amsgrad' if amsgrad else ''} {'AdamW' if decoupled else 'Adam'}"
                    name = variant if state == "fp32" else f"{variant}, {state} states"
                    cases.append(Case("adam_step_", b.label, name, label, check, b.env))
    return cases


def _check_adam(backend, variant, state, shape, amsgrad, decoupled, device, seed) -> str:
    st = testing.random_state([shape, (3, 5)], variant, amsgrad=amsgrad, seed=seed, device=device, state=state)
    expected = testing.clone_state(st)
    kw = testing.hyper(variant, device=device, decoupled=decoupled, maximize=bool(seed % 2))
    ops.adam_step_(**st, **kw, backend=backend)
    testing.run_reference(expected, kw)
    testing.assert_states_equal(st, expected, f"{backend} {variant} {state} states")
    skipped = testing.random_state([shape], variant, amsgrad=amsgrad, seed=seed, specials=True, device=device,
                                   state=state)
    before = testing.clone_state(skipped)
    ops.adam_step_(**skipped, **testing.hyper(variant, device=device, found_inf=1.0), backend=backend)
    testing.assert_states_equal(skipped, before, f"{backend} {variant} {state} states, skipped step")
    return "bitwise equal to the reference; a skipped step wrote nothing"


def gemm_cases(device: str) -> list[Case]:
    """`python -m mixprec selftest` checks of matmul and matmul_accumulate_: every backend on `device`, fp16 and
    bf16, odd and transposed shapes, batched inputs, bias and out_dtype, against mixprec.reference (computed on
    the CPU in fp32) within mixprec.testing.GEMM_TOL, the bounds tests/test_gemm.py uses."""

    # (batch, M, N, K, a transposed, b transposed): the shapes of tests/test_gemm.py that reach every edge path
    shapes = [((), 1, 7, 127, False, False), ((), 127, 129, 65, True, False), ((), 129, 127, 31, True, True),
              ((), 1, 33, 1000, False, True), ((2, 3), 7, 40, 24, False, True)]
    if device == "cuda":  # several tiles with ragged edges, and the autotuner's pick (too slow for the interpreter)
        shapes.append(((), 777, 1000, 1029, False, True))
    # (bias dtype or None, out_dtype or None); "same" = the operands' dtype
    epilogues = [("same", None), (torch.float32, torch.float32), (torch.float32, "other half")]
    cases, seen = [], set()
    for b in backends(device):
        # the CPU op calls torch's fp32 GEMM whatever MIXPREC_CPU_SIMD says: one CPU check, not one per SIMD level
        if b.name in seen:
            continue
        seen.add(b.name)
        label = "cpu" if b.name == "cpu" else b.label
        for dtype in (torch.float16, torch.bfloat16):
            name = str(dtype).removeprefix("torch.")
            for seed, (batch, m, n, k, ta, tb) in enumerate(shapes):
                shape = "x".join(map(str, (*batch, m, n, k))) + (" aT" if ta else "") + (" bT" if tb else "")
                check = functools.partial(_check_matmul, b.name, device, dtype, batch, m, n, k, ta, tb, None, None,
                                          seed)
                cases.append(Case("matmul", label, name, f"{shape} (batch x M x N x K)", check, b.env))
            for seed, (bias, out) in enumerate(epilogues, start=len(shapes)):
                other = torch.bfloat16 if dtype == torch.float16 else torch.float16
                bias_dtype = dtype if bias == "same" else bias
                out_dtype = other if out == "other half" else out
                check = functools.partial(_check_matmul, b.name, device, dtype, (), 65, 70, 48, False, True,
                                          bias_dtype, out_dtype, seed)
                what = f"65x70x48 bias {str(bias_dtype).removeprefix('torch.')}"
                what += f", out {str(out_dtype).removeprefix('torch.')}" if out_dtype else ""
                cases.append(Case("matmul", label, name, what, check, b.env))
            check = functools.partial(_check_accumulate, b.name, device, dtype, 99)
            cases.append(Case("matmul_accumulate_", label, name, "129x65x100 aT (dW = dY^T X) into fp32", check,
                              b.env))
    return cases


def _check_matmul(backend, device, dtype, batch, m, n, k, ta, tb, bias_dtype, out_dtype, seed) -> str:

    a, b, gen = testing.gemm_operands(device, dtype, batch, m, n, k, ta, tb, seed)
    bias = None if bias_dtype is None else torch.randn(n, generator=gen).to(bias_dtype).to(device)
    out = ops.matmul(a, b, bias=bias, out_dtype=out_dtype, backend=backend)
    # the spec, unrounded (fp32 out) and on the CPU, so that a GPU's TF32 setting cannot touch it
    ref = reference.matmul(a.cpu(), b.cpu(), None if bias is None else bias.cpu(), torch.float32)
    want = out_dtype or dtype
    assert out.dtype == want, f"out dtype {out.dtype}, expected {want}"
    assert out.device == a.device, f"out on {out.device}, expected {a.device}"
    err = testing.assert_max_rel_err(out.cpu(), ref, testing.GEMM_TOL[want], f"{backend} matmul vs reference")
    return f"max rel. error {err:.1e} (tol {testing.GEMM_TOL[want]:g})"


def _check_accumulate(backend, device, dtype, seed) -> str:

    a, b, gen = testing.gemm_operands(device, dtype, (), 129, 65, 100, True, False, seed)
    c = torch.randn(129, 65, generator=gen).to(device)
    expected = c.cpu().clone()
    reference.matmul_accumulate_(expected, a.cpu(), b.cpu())
    ptr = c.data_ptr()
    ops.matmul_accumulate_(c, a, b, backend=backend)
    assert c.data_ptr() == ptr and c.dtype == torch.float32, "c was not updated in place"
    err = testing.assert_max_rel_err(c.cpu(), expected, testing.GEMM_TOL[torch.float32],
                                     f"{backend} matmul_accumulate_ vs reference")
    return f"max rel. error {err:.1e} (tol {testing.GEMM_TOL[torch.float32]:g})"


def unscale_cases(device: str) -> list[Case]:
    """`python -m mixprec selftest` checks of unscale_and_check_: every backend on `device`, against torch's unscale
    (bit for bit), the found_inf flag, and the reference's fp64 norm."""

    # (label, dtypes, shapes, specials): odd sizes, a 2-D tensor, planted inf/NaN, and one mixed list with an
    # empty tensor, because the kernels group by dtype and skip empty tensors.
    single = (((129,), False), ((1000, 7), False), ((1000, 7), True))
    problems = [(str(dt).removeprefix("torch."), (dt,), [shape], specials)
                for dt in testing.DTYPES for shape, specials in single]
    problems.append(("mixed", testing.DTYPES + (torch.float16,), [(300,), (1, 77), (5000,), (0,)], False))
    cases = []
    for b in backends(device):
        for seed, (label, dtypes, shapes, specials) in enumerate(problems):
            shape = ", ".join(str(s) for s in shapes) + (" +inf/nan" if specials else "")
            check = functools.partial(_check_unscale, b.name, dtypes, shapes, specials, device, seed)
            cases.append(Case("unscale_and_check_", b.label, label, shape, check, b.env))
        check = functools.partial(_check_unscale_overflow, b.name, device)
        cases.append(Case("unscale_and_check_", b.label, "overflow when unscaled", "3 dtypes x 4 grads (1000,)", check,
                          b.env))
    return cases


def _check_unscale_overflow(backend, device) -> str:
    """A scale below 1 (inv_scale 2**20 * 1.25): grads a few ulps either side of the value that overflows once
    unscaled. The unscale writes torch's bits and flags the grads non-finite as written; check_only writes nothing
    and flags the fp32 products; both as the reference."""
    inv_scale = torch.tensor([2.0**20 * 1.25], device=device)
    grads = []
    for dt in testing.DTYPES:
        int_type = torch.int32 if dt == torch.float32 else torch.int16
        edge = torch.tensor([torch.finfo(dt).max / inv_scale.item()]).to(dt).view(int_type)
        for step in range(-2, 2):  # in the vector loops (517) and in a scalar tail (999)
            g = torch.full((1000,), 0.25, dtype=dt)
            g[[517, 999][step % 2]] = (edge + step).view(dt)
            grads.append(g.to(device))
    flagged = []
    for check_only in (False, True):
        ours, ref = [g.clone() for g in grads], [g.clone() for g in grads]
        flags, ref_flags = (torch.zeros(len(grads), device=device) for _ in range(2))
        found, ref_found = (torch.zeros(1, device=device) for _ in range(2))
        ops.unscale_and_check_(ours, inv_scale, found, per_tensor_inf=flags, check_only=check_only, backend=backend)
        reference.unscale_and_check_(ref, inv_scale, ref_found, None, ref_flags, check_only=check_only)
        for i, (g, r) in enumerate(zip(ours, ref)):
            testing.assert_bitwise_equal(g, r, f"grads[{i}] ({g.dtype}), check_only={check_only}, vs the reference")
        assert flags.tolist() == ref_flags.tolist(), f"check_only={check_only}: per_tensor_inf {flags.tolist()}, " \
                                                     f"the reference's {ref_flags.tolist()}"
        assert found.item() == ref_found.item() == 1.0, f"found_inf {found.item()}, the reference's {ref_found.item()}"
        flagged.append(int(flags.sum().item()))
    return f"flags as the reference: {flagged[0]} of {len(grads)} grads unscaling, {flagged[1]} checking only"


def _check_unscale(backend, dtypes, shapes, specials, device, seed) -> str:

    gen = torch.Generator().manual_seed(seed)
    grads = [testing.random_grad(math.prod(s), dt, generator=gen, specials=specials).reshape(s).to(device)
             for dt, s in zip(dtypes, shapes)]
    inv_scale = torch.tensor([1 / 3], device=device)  # not a power of two: every product is rounded
    expected = [g.clone() for g in grads]
    expected_inf = torch.zeros(1, device=device)
    for dt in set(dtypes):  # torch's CPU kernel takes one dtype per call
        same_dtype = [e for e in expected if e.dtype == dt]
        torch._amp_foreach_non_finite_check_and_unscale_(same_dtype, expected_inf, inv_scale)
    ref_norm = torch.zeros(1, device=device)
    reference.unscale_and_check_([g.clone() for g in grads], inv_scale, torch.zeros(1, device=device), ref_norm)

    found_inf, norm_sq = torch.zeros(1, device=device), torch.zeros(1, device=device)
    ops.unscale_and_check_(grads, inv_scale, found_inf, norm_sq, backend=backend)
    for i, (g, e) in enumerate(zip(grads, expected)):
        testing.assert_bitwise_equal(g, e, f"grads[{i}] ({g.dtype}, {tuple(g.shape)}) vs torch's unscale")
    assert found_inf.item() == expected_inf.item(), f"found_inf {found_inf.item()}, torch says {expected_inf.item()}"
    got, want = norm_sq.item(), ref_norm.item()
    if not math.isfinite(want):
        assert not math.isfinite(got), f"norm_sq {got} is finite, the reference's is {want}"
        return f"bitwise equal to torch; found_inf {found_inf.item():g}; norm_sq non-finite as expected"
    rel = abs(got - want) / abs(want) if want else abs(got)
    # fp32 partial sums over a few thousand terms, then a fixed tree: 1e-5 is far above that bound
    assert rel <= 1e-5, f"norm_sq {got!r} vs reference {want!r}: relative error {rel:.2e} > 1e-5"
    return f"bitwise equal to torch; found_inf {found_inf.item():g}; norm_sq rel. error {rel:.1e}"


# mixprec.ops module -> its cases
CASES = {"adam": adam_cases, "gemm": gemm_cases, "unscale": unscale_cases}
