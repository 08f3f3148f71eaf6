"""mixprec.ops.matmul / matmul_accumulate_: fp16/bf16 GEMM with fp32 accumulation and one rounding."""
from __future__ import annotations

import torch

from mixprec import _backend, _ext, reference
from mixprec.ops._validate import check_tensor

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
        return reference.matmul(a, b, bias, out_dtype)
    if chosen == "triton":
        from mixprec.kernels import gemm as triton_gemm

        out = torch.empty(_out_shape(a, b), dtype=out_dtype or a.dtype, device=a.device)
        return triton_gemm.gemm(a, b, out, bias)
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


if _ext.available():

    @torch.library.register_fake("mixprec::matmul")
    def _(a, b, bias=None, out_dtype=None):
        return a.new_empty(_out_shape(a, b), dtype=out_dtype or a.dtype)

    @torch.library.register_fake("mixprec::matmul_accumulate_")
    def _(c, a, b):
        return None


def selftest_cases(device: str) -> list:
    """`python -m mixprec selftest` checks of matmul and matmul_accumulate_: every backend on `device`, fp16 and
    bf16, odd and transposed shapes, batched inputs, bias and out_dtype, against mixprec.reference (computed on
    the CPU in fp32) within mixprec.testing.GEMM_TOL, the bounds tests/test_gemm.py uses."""
    import functools

    from mixprec.selftest import Case, backends

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
        for dtype in HALF_DTYPES:
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


def _selftest_operands(device, dtype, batch, m, n, k, ta, tb, seed):
    gen = torch.Generator().manual_seed(seed)

    def make(rows, cols, transposed, lead=()):
        if transposed:  # the same values stored transposed: a view with unit stride along rows
            return torch.randn(*lead, cols, rows, generator=gen).to(dtype).to(device).transpose(-1, -2)
        return torch.randn(*lead, rows, cols, generator=gen).to(dtype).to(device)

    return make(m, k, ta, batch), make(k, n, tb), gen


def _check_matmul(backend, device, dtype, batch, m, n, k, ta, tb, bias_dtype, out_dtype, seed) -> str:
    from mixprec.testing import GEMM_TOL, assert_max_rel_err

    a, b, gen = _selftest_operands(device, dtype, batch, m, n, k, ta, tb, seed)
    bias = None if bias_dtype is None else torch.randn(n, generator=gen).to(bias_dtype).to(device)
    out = matmul(a, b, bias=bias, out_dtype=out_dtype, backend=backend)
    # the spec, unrounded (fp32 out) and on the CPU, so that a GPU's TF32 setting cannot touch it
    ref = reference.matmul(a.cpu(), b.cpu(), None if bias is None else bias.cpu(), torch.float32)
    want = out_dtype or dtype
    assert out.dtype == want, f"out dtype {out.dtype}, expected {want}"
    assert out.device == a.device, f"out on {out.device}, expected {a.device}"
    err = assert_max_rel_err(out.cpu(), ref, GEMM_TOL[want], f"{backend} matmul vs reference")
    return f"max rel. error {err:.1e} (tol {GEMM_TOL[want]:g})"


def _check_accumulate(backend, device, dtype, seed) -> str:
    from mixprec.testing import GEMM_TOL, assert_max_rel_err

    a, b, gen = _selftest_operands(device, dtype, (), 129, 65, 100, True, False, seed)
    c = torch.randn(129, 65, generator=gen).to(device)
    expected = c.cpu().clone()
    reference.matmul_accumulate_(expected, a.cpu(), b.cpu())
    ptr = c.data_ptr()
    matmul_accumulate_(c, a, b, backend=backend)
    assert c.data_ptr() == ptr and c.dtype == torch.float32, "c was not updated in place"
    err = assert_max_rel_err(c.cpu(), expected, GEMM_TOL[torch.float32], f"{backend} matmul_accumulate_ vs reference")
    return f"max rel. error {err:.1e} (tol {GEMM_TOL[torch.float32]:g})"
