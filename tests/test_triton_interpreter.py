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
