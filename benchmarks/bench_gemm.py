"""GEMM benchmark: mixprec.ops.matmul vs torch.matmul.

CPU: the overhead of mixprec's CPU path (fp32 GEMM on widened operands, one rounding) over torch.matmul on the
same half tensors at 1024^3. GPU: TFLOP/s of the CUDA and Triton kernels vs torch.matmul (cuBLAS) on square
sizes and LLM layer shapes, timed with triton.testing.do_bench.
"""
from __future__ import annotations

import torch

import mixprec
from mixprec.benchmarks.timing import measure

SQUARE = [1024, 2048, 4096, 8192]
LLM = [(4096, 4096, 4096), (8192, 12288, 4096), (8192, 4096, 11008), (16, 4096, 4096)]  # (tokens, out, in)


def _row(shape, dtype, backend, device, ms, q25, q75, flops, peers, notes=""):
    return {"op": "matmul", "backend": backend, "device": device, "shape": shape, "dtype": str(dtype).split(".")[-1],
            "median_ms": ms, "q25_ms": q25, "q75_ms": q75, "unit": "TFLOP/s", "value": flops / ms / 1e9,
            "ceiling": None, "peers": peers, "notes": notes}


def _cpu(quick: bool) -> list[dict]:
    rows = []
    n = 1024
    for dtype in (torch.float16, torch.bfloat16):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        ours = measure(lambda i: mixprec.ops.matmul(a, b), repeats=5 if quick else 20)
        peer = measure(lambda i: torch.matmul(a, b), repeats=3 if quick else 10)
        # the same math in plain torch: the overhead of the op layer (dispatch, checks) over it is what we add
        same = measure(lambda i: torch.matmul(a.float(), b.float()).to(dtype), repeats=5 if quick else 20)
        rows.append(_row(f"{n}x{n}x{n}", dtype, "cpu", "cpu", ours.median_ms, ours.q25_ms, ours.q75_ms, 2 * n**3,
                         {"torch.matmul": peer.median_ms, "torch fp32 matmul + cast": same.median_ms},
                         "CPU path = fp32 torch GEMM on widened operands, one rounding; ratio peer/ours > 1 means "
                         "faster than torch's half GEMM"))
    return rows


def _gpu(quick: bool) -> list[dict]:
    import triton.testing

    from mixprec import _ext

    rows = []
    shapes = [(n, n, n) for n in (SQUARE[:3] if quick else SQUARE)] + ([] if quick else LLM)
    for dtype in (torch.float16, torch.bfloat16):
        for m, n, k in shapes:
            a = torch.randn(m, k, device="cuda", dtype=dtype)
            w = torch.randn(n, k, device="cuda", dtype=dtype)  # y = x W^T, as in a linear layer
            peer = triton.testing.do_bench(lambda: torch.matmul(a, w.t()), quantiles=[0.5, 0.25, 0.75])
            backends = ["triton"] + (["cuda"] if _ext.has_cuda_kernels() else [])
            for be in backends:
                ms, q25, q75 = triton.testing.do_bench(lambda: mixprec.ops.matmul(a, w.t(), backend=be),
                                                       quantiles=[0.5, 0.25, 0.75])
                rows.append(_row(f"{m}x{n}x{k}", dtype, be, torch.cuda.get_device_name(), ms, q25, q75, 2 * m * n * k,
                                 {"torch.matmul (cuBLAS)": peer[0]}))
    return rows


def run(quick: bool, device: str) -> list[dict]:
    return _gpu(quick) if device == "cuda" else _cpu(quick)


if __name__ == "__main__":
    for r in run(True, "cuda" if torch.cuda.is_available() else "cpu"):
        print(r)
