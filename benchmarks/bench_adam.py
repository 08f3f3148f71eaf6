"""Adam benchmark: mixprec's fused fp32-master AdamW step against the ways torch users do the same job.

The job: fp16 model params with fp32 master weights, fp16 grads scaled by a loss scale. mixprec does it in
one pass per element, 28 bytes per param (read grad 2, master 4, m 4, v 4; write master 4, m 4, v 4, param 2).
Peers: the torch composition (grads to fp32, torch unscale, torch.optim.AdamW(fused=True) on the masters, copy
back to fp16), torch.optim.AdamW(fused=True) on fp32 params of the same count (also 28 bytes per param), and
DeepSpeed's CPUAdam when importable. The layer list is GPT-2's (768 wide; 2 blocks, 14.2M params): the state
(~230 MB) is far out of the 32 MB L3, so every step streams from memory.

GB/s is computed from the 28 bytes per param the job must move, for every row. The ceiling is a streaming
kernel with the same read/write mix at the same working-set size
(mixprec.benchmarks.ceiling.cpu_stream_gbps, when that module exists).
"""
from __future__ import annotations

import os
import resource

import torch

import mixprec
from mixprec.benchmarks.timing import measure
from mixprec.optim import FusedAdamW

BYTES_PER_PARAM = 28  # fp16 params with fp32 masters; also torch fused AdamW on fp32 params


def gpt2_shapes(width: int = 768, blocks: int = 2) -> list[tuple[int, ...]]:
    """The params of `blocks` GPT-2 transformer blocks (layer norms, attention, MLP), in model order."""
    w = width
    block = [(w,), (w,), (w, 3 * w), (3 * w,), (w, w), (w,), (w,), (w,), (w, 4 * w), (4 * w,), (4 * w, w), (w,)]
    return block * blocks


def _ceiling(n_params: int):
    try:
        from mixprec.benchmarks.ceiling import cpu_stream_gbps
    except ImportError:
        return None, "ceiling: mixprec.benchmarks.ceiling not available"
    half = BYTES_PER_PARAM // 2 * n_params
    return cpu_stream_gbps(read_bytes=half, write_bytes=half), "ceiling: stream kernel, same read/write mix and size"


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _deepspeed_cpu_adam(params32, repeats):
    """Median ms of DeepSpeedCPUAdam on fp32 params, or None with the reason."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except Exception as exc:  # not installed, or its op failed to build
        return None, f"DeepSpeedCPUAdam skipped ({type(exc).__name__}: {str(exc)[:80]})"
    opt = DeepSpeedCPUAdam(params32, lr=1e-3, weight_decay=0.01, adamw_mode=True)
    return measure(lambda i: opt.step(), repeats=repeats).median_ms, "DeepSpeedCPUAdam on fp32 params"


def _cpu(quick: bool) -> list[dict]:
    repeats = 10 if quick else 30
    shapes = gpt2_shapes()
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).half()) for s in shapes]
    n = sum(p.numel() for p in params)
    scale = 1024.0
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3 * scale).half()
    notes = [f"{n / 1e6:.1f}M params in {len(shapes)} tensors (GPT-2 width 768, 2 blocks)",
             f"threads={torch.get_num_threads()}", "2 shared cores: other jobs may add noise"]

    # ours through the optimizer (what users run; torch.amp.GradScaler contract attributes set by hand)
    opt = FusedAdamW(params, lr=1e-3)
    opt.grad_scale = torch.tensor([scale])
    opt.found_inf = torch.zeros(1)
    opt.step()  # creates the state
    rss_before = _maxrss_mb()
    ours = measure(lambda i: opt.step(), repeats=repeats)
    rss_growth = _maxrss_mb() - rss_before
    notes.append(f"peak RSS growth during {repeats + 3} steps: {rss_growth:.1f} MB")

    # the kernel alone: the op on prebuilt lists (no optimizer bookkeeping)
    st = [opt.state[p] for p in params]
    args = ([p.detach() for p in params], [p.grad for p in params], [s["exp_avg"] for s in st],
            [s["exp_avg_sq"] for s in st], [], [s["master_param"] for s in st], [s["step"] for s in st],
            torch.tensor([1e-3]), 0.9, 0.999, 1e-8, 0.01, True, False, opt.grad_scale, opt.found_inf, None, -1)
    kernel = measure(lambda i: torch.ops.mixprec.adam_step_(*args), repeats=repeats)

    # peer 1: the torch composition for the same job
    masters = [torch.nn.Parameter(p.detach().float()) for p in params]
    torch_opt = torch.optim.AdamW(masters, lr=1e-3, fused=True)
    found, inv = torch.zeros(1), torch.tensor([1.0 / scale])

    def composition(i):
        grads32 = [p.grad.float() for p in params]
        torch._amp_foreach_non_finite_check_and_unscale_(grads32, found, inv)
        for m, g in zip(masters, grads32):
            m.grad = g
        torch_opt.step()
        torch._foreach_copy_([p.detach() for p in params], masters)

    comp = measure(composition, repeats=max(3, repeats // 3))

    # peer 2: torch fused AdamW on fp32 params of the same count (also 28 bytes per param)
    params32 = [torch.nn.Parameter(p.detach().float()) for p in params]
    for p, q in zip(params32, params):
        p.grad = q.grad.float()
    fused32 = torch.optim.AdamW(params32, lr=1e-3, fused=True)
    fused32.step()
    t32 = measure(lambda i: fused32.step(), repeats=repeats)

    peers = {"torch composition (fp32 grads, unscale, AdamW fused, copy back)": comp.median_ms,
             "torch.optim.AdamW(fused=True) fp32 params": t32.median_ms}
    ds_ms, ds_note = _deepspeed_cpu_adam(params32, repeats)
    if ds_ms is not None:
        peers["DeepSpeedCPUAdam fp32 params"] = ds_ms
    notes.append(ds_note)
    ceiling, ceiling_note = _ceiling(n)
    notes.append(ceiling_note)

    def row(backend, t, extra):
        return {"op": "adam_step_", "backend": backend, "device": "cpu", "shape": f"gpt2-768x2 ({n} params)",
                "dtype": "float16 params, fp32 masters", "median_ms": t.median_ms, "q25_ms": t.q25_ms,
                "q75_ms": t.q75_ms, "unit": "GB/s", "value": BYTES_PER_PARAM * n / t.median_ms / 1e6,
                "ceiling": ceiling, "peers": peers, "notes": "; ".join(notes + extra)}

    return [row("cpu (FusedAdamW.step)", ours, ["whole optimizer step"]),
            row("cpu (adam_step_ kernel alone)", kernel, ["op on prebuilt lists"])]


def _gpu(quick: bool) -> list[dict]:
    import triton.testing

    from mixprec import _ext

    shapes = gpt2_shapes(1024, 4 if quick else 24)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda").half()) for s in shapes]
    n = sum(p.numel() for p in params)
    for p in params:
        p.grad = torch.randn_like(p)
    peers = {}
    params32 = [torch.nn.Parameter(p.detach().float()) for p in params]
    for p in params32:
        p.grad = torch.randn_like(p)
    fused32 = torch.optim.AdamW(params32, lr=1e-3, fused=True)
    peers["torch.optim.AdamW(fused=True) fp32 params"] = triton.testing.do_bench(fused32.step)
    try:
        from apex.optimizers import FusedAdam as ApexFusedAdam

        apex_opt = ApexFusedAdam(params32, lr=1e-3, adam_w_mode=True)
        peers["apex FusedAdam fp32 params"] = triton.testing.do_bench(apex_opt.step)
        apex_note = ""
    except ImportError:
        apex_note = "apex not installed"
    rows = []
    for backend in (["cuda"] if _ext.has_cuda_kernels() else []) + ["triton"]:
        opt = FusedAdamW(params, lr=1e-3, backend=backend)
        opt.step()
        ms, q25, q75 = triton.testing.do_bench(opt.step, quantiles=[0.5, 0.25, 0.75])
        rows.append({"op": "adam_step_", "backend": backend, "device": torch.cuda.get_device_name(),
                     "shape": f"gpt2-1024x{len(shapes) // 12} ({n} params)", "dtype": "float16 params, fp32 masters",
                     "median_ms": ms, "q25_ms": q25, "q75_ms": q75, "unit": "GB/s",
                     "value": BYTES_PER_PARAM * n / ms / 1e6, "ceiling": None, "peers": peers, "notes": apex_note})
    return rows


def run(quick: bool, device: str) -> list[dict]:
    return _gpu(quick) if device == "cuda" else _cpu(quick)


if __name__ == "__main__":
    for r in run(True, "cuda" if torch.cuda.is_available() else "cpu"):
        print(r)
