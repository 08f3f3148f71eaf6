"""GEMM benchmark: mixprec.ops.matmul against torch.matmul, in TFLOP/s (2*M*N*K flops per call).

CPU (no hand-written CPU GEMM: the op widens fp16/bf16 to fp32, calls torch's fp32 GEMM and rounds once): the
overhead of mixprec.ops.matmul over torch.matmul at 1024^3. The ceiling, and the figure the overhead is taken
against, is torch.matmul on the same operands already widened to fp32 (the GEMM our path calls, with nothing
around it); the peers are that, the same math composed in plain torch (widen, fp32 matmul, round), and torch's
half-precision matmul on the original operands, a different computation reported for comparison only.
GPU: the CUDA and Triton kernels against torch.matmul (cuBLAS) on square sizes and LLM layer shapes, y = x W^T
as in a linear layer; the ceiling is cuBLAS at the same shape (GEMM peak measured, not assumed).
"""
from __future__ import annotations

import torch

import mixprec
from mixprec.benchmarks.rows import row, run_on_device
from mixprec.benchmarks.timing import measure, measure_gpu, measure_interleaved, reduced

OP = "matmul"
DTYPES = (torch.float16, torch.bfloat16)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _cpu(quick: bool) -> list[dict]:
    n = 64 if reduced() else 1024
    # note: no buffer rotation. A GEMM reads each operand element n times from cache whatever the first touch
    # costs (compute bound: 2 GFLOP on 6 MB at 1024^3), and every contender reads the same buffers.
    repeats = 3 if reduced() else 10 if quick else 40
    rows = []
    gen = torch.Generator().manual_seed(0)
    for dtype in DTYPES:
        a, b = torch.randn(n, n, generator=gen).to(dtype), torch.randn(n, n, generator=gen).to(dtype)
        a32, b32 = a.float(), b.float()
        # interleaved rounds: a load change on this shared machine hits ours and the fp32 references alike
        timings = measure_interleaved({
            "ours": lambda i: mixprec.ops.matmul(a, b, backend="cpu"),
            "torch.matmul fp32, pre-widened": lambda i: torch.matmul(a32, b32),
            "torch widen + fp32 matmul + round": lambda i: torch.matmul(a.float(), b.float()).to(dtype),
        }, repeats=repeats)
        ours, fp32 = timings.pop("ours"), timings["torch.matmul fp32, pre-widened"]
        # note: torch's CPU half GEMM takes about 3 s per call at 1024^3 on this AVX2 machine (no native fp16/bf16
        # math): timed apart, once under --quick (it is ~50x slower, so one sample says enough), so that it does
        # not eat the quick budget.
        half_samples = (0, 1) if quick or reduced() else (1, 5)
        half = measure(lambda i: torch.matmul(a, b), warmup=half_samples[0], repeats=half_samples[1])
        name = f"torch.matmul {_dtype_name(dtype)} (half GEMM)"
        same = timings["torch widen + fp32 matmul + round"]
        rows.append(row(
            op=OP, backend="cpu", device="cpu", shape=f"{n}x{n}x{n}", dtype=_dtype_name(dtype), timing=ours,
            unit="TFLOP/s", work=2 * n**3, ceiling=2 * n**3 / (fp32.median_ms * 1e9),
            peers={**timings, name: half},
            notes=f"overhead of mixprec.ops.matmul (widen, fp32 GEMM, round once) over torch.matmul on the same "
                  f"operands pre-widened to fp32 (the ceiling): {100 * (ours.median_ms / fp32.median_ms - 1):+.1f}%; "
                  f"over the same three steps composed in torch: {100 * (ours.median_ms / same.median_ms - 1):+.1f}%"
                  f" (the op layer); the {name} peer is torch's half-precision GEMM on the original operands, "
                  f"{half.repeats} sample(s), a different computation shown for comparison"))
    return rows


def _shapes(quick: bool) -> list[tuple[str, int, int, int]]:
    """GPU shapes: --quick is 4096^3 and the LLM layer shapes (each a few ms on a GPU); a full run adds the other
    squares up to 8192^3."""
    from mixprec.tools.kernel_specs import LLM_SHAPES

    if reduced():
        return [("square 256^3", 256, 256, 256)]
    if quick:
        return list(LLM_SHAPES)
    square = [(f"square {n}^3", n, n, n) for n in (1024, 2048, 4096, 8192)]
    return square + [s for s in LLM_SHAPES if not s[0].startswith("square")]


def _gpu(quick: bool) -> list[dict]:
    from mixprec import _backend, _ext

    gpu = torch.cuda.get_device_name()
    backends = (["cuda"] if _ext.has_cuda_kernels() else []) + (["triton"] if _backend.triton_available() else [])
    rows = []
    for dtype in DTYPES:
        for label, m, n, k in _shapes(quick):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            w = torch.randn(n, k, device="cuda", dtype=dtype)  # y = x W^T, as in a linear layer
            cublas = measure_gpu(lambda: torch.matmul(x, w.t()), quick=quick or reduced())
            for be in backends:
                ours = measure_gpu(lambda: mixprec.ops.matmul(x, w.t(), backend=be), quick=quick or reduced())
                rows.append(row(op=OP, backend=be, device="cuda", shape=f"{label} ({m}x{n}x{k})",
                                dtype=_dtype_name(dtype), timing=ours, unit="TFLOP/s", work=2 * m * n * k,
                                ceiling=2 * m * n * k / (cublas.median_ms * 1e9),
                                peers={"torch.matmul (cuBLAS)": cublas},
                                notes=f"{gpu}; ceiling: cuBLAS (torch.matmul) at the same shape"))
    return rows


def run(quick: bool, device: str) -> list[dict]:
    return run_on_device(device, quick, cpu=_cpu, cuda=_gpu)
