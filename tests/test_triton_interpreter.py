"""The Triton interpreter as the CPU tests use it: a loop over a run-time bound (kernels/gemm.py's K loop) runs, on
every supported triton (triton 3.6's interpreter needs kernels/_interpreter.py's repair with NumPy >= 2.4)."""
import pytest
import torch

from mixprec import _backend

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
pytestmark = pytest.mark.skipif(not _backend.triton_interpreter_enabled(), reason="needs TRITON_INTERPRET=1")

import mixprec.kernels  # noqa: E402, F401  (applies the repair where the interpreter needs it)


@triton.jit
def _sum_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))


def test_loop_over_a_runtime_bound():
    x = torch.arange(100, dtype=torch.float32)
    out = torch.zeros(1)
    _sum_kernel[(1,)](x, out, x.numel(), BLOCK=16)
    assert out.item() == 4950.0


@triton.jit
def _row_absmax_kernel(x_ptr, codes_ptr, out_ptr, ROWS: tl.constexpr, COLS: tl.constexpr):
    offs = tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    bits = tl.abs(tl.load(x_ptr + offs)).to(tl.int32, bitcast=True)
    tl.store(out_ptr + tl.arange(0, ROWS), tl.max(bits, axis=1).to(tl.float32, bitcast=True))
    tl.store(codes_ptr + offs, tl.load(codes_ptr + offs).to(tl.int32) + 1)  # widen (uint8: zero-extend), narrow


def test_what_the_int8_adam_kernel_relies_on():
    """kernels/adam.py's int8 blocks: a [rows, 256] tile's row absmax as an integer max of the magnitudes' bits (a
    NaN wins, -0.0 counts as 0) and uint8 codes widened without sign extension, under the interpreter."""
    x = torch.randn(2, 256)
    x[1, 7] = float("nan")
    x[0] = -x[0].abs()
    codes = torch.arange(512).to(torch.uint8).reshape(2, 256)
    out = torch.zeros(2)
    _row_absmax_kernel[(1,)](x, codes, out, ROWS=2, COLS=256)
    assert out[0].item() == x[0].abs().max().item() and torch.isnan(out[1])
    assert torch.equal(codes, ((torch.arange(512) + 1) % 256).to(torch.uint8).reshape(2, 256))
