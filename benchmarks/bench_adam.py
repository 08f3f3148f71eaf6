"""Adam benchmark: mixprec's fused fp32-master AdamW step against the ways torch users do the same job.

The job: fp16 model params with fp32 master weights, fp16 grads scaled by a loss scale. mixprec does it in
one pass per element, 28 bytes per param (read grad 2, master 4, m 4, v 4; write master 4, m 4, v 4, param 2).
Peers: the torch composition (grads to fp32, torch unscale, torch.optim.AdamW(fused=True) on the masters, copy
back to fp16), torch.optim.AdamW(fused=True) on fp32 params of the same count (also 28 bytes per param), and
DeepSpeed's CPUAdam when importable. The layer list is GPT-2's (768 wide; 2 blocks, 14.2M params): the state
(~230 MB) is far out of the 32 MB L3, so every step streams from memory.

GPU: every mode of the kernel (GPU_MODES: fp32, fp16/bf16 with masters, fp16/bf16 without, bf16 with stochastic
rounding) on the CUDA and Triton backends, against torch.optim.AdamW(fused=True) on fp32 params and apex's FusedAdam
when importable, each row judged against a device copy of the bytes its mode moves.

CPU: GB/s is computed from the 28 bytes per param the job must move, for every row. The ceiling is mixprec's
streaming kernel with Adam's arrays (benchmarks/ceiling.py) at the same working-set size, timed in the same
rounds as ours and the peers.
"""
from __future__ import annotations

import os
import resource

import torch

from mixprec.benchmarks.ceiling import cpu_stream, gbps
from mixprec.benchmarks.rows import row, run_on_device
from mixprec.benchmarks.timing import measure_interleaved, reduced
from mixprec.optim import FusedAdamW

OP = "adam_step_"
BYTES_PER_PARAM = 28  # fp16 params with fp32 masters; also torch fused AdamW on fp32 params
# GPU: every mode of the kernel, by mixprec.testing.VARIANTS name: (param dtype, FusedAdamW arguments, bytes moved
# per param). With masters: read grad 2, master 4, m 4, v 4, write master 4, m 4, v 4, param 2 (28 B); fp32 reads
# param, grad, m, v and writes param, m, v (28 B); half params without masters read param, grad, m, v and write
# param, m, v (22 B).
GPU_MODES = {
    "fp32": (torch.float32, {}, 28),
    "fp16-master": (torch.float16, {}, 28),
    "bf16-master": (torch.bfloat16, {}, 28),
    "fp16": (torch.float16, {"master_weights": False}, 22),
    "bf16": (torch.bfloat16, {"master_weights": False}, 22),
    "bf16-sr": (torch.bfloat16, {"master_weights": False, "stochastic_rounding": True}, 22),
}


def gpt2_shapes(width: int = 768, blocks: int = 2) -> list[tuple[int, ...]]:
    """The params of `blocks` GPT-2 transformer blocks (layer norms, attention, MLP), in model order."""
    w = width
    block = [(w,), (w,), (w, 3 * w), (3 * w,), (w, w), (w,), (w,), (w,), (w, 4 * w), (4 * w,), (4 * w, w), (w,)]
    return block * blocks


def adam_stream_layout(n: int) -> list[tuple[int, int]]:
    """The ceiling's arrays with Adam's pattern per element: master, m, v read and written in place (4 B
    each), the grad read only (2 B), the half param written only (2 B)."""
    return [(4 * n, 4 * n)] * 3 + [(2 * n, 0), (0, 2 * n)]


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _deepspeed_cpu_adam(params32):
    """DeepSpeedCPUAdam's step as fn(i), or None with the reason it is missing."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(params32, lr=1e-3, weight_decay=0.01, adamw_mode=True)
    except Exception as exc:  # not installed, or its op failed to build
        return None, f"DeepSpeedCPUAdam skipped ({type(exc).__name__}: {str(exc)[:80]})"
    return (lambda i: opt.step()), "DeepSpeedCPUAdam on fp32 params"


def _cpu(quick: bool) -> list[dict]:
    shapes = gpt2_shapes(64, 2) if reduced() else gpt2_shapes()
    repeats, min_time_s = (3, 0.0) if reduced() else (10, 0.0) if quick else (30, 2.0)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).half()) for s in shapes]
    n = sum(p.numel() for p in params)
    scale = 1024.0
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3 * scale).half()
    notes = [f"{len(shapes)} tensors (GPT-2 width {shapes[0][0]}, {len(shapes) // 12} blocks)",
             f"threads={torch.get_num_threads()}"]
    # note: no buffer rotation, for the kernel and the ceiling alike (rotate=1): both reuse their buffers on every
    # call, so whatever part of the ~400 MB a large last-level cache keeps between calls (Zen 3: 32 MB; the
    # Emerald Rapids machines: 300 MB, shared) helps both; a rotating ceiling would miss what the kernel hits.

    # ours through the optimizer (what users run), with the torch.amp.GradScaler contract set by hand
    opt = FusedAdamW(params, lr=1e-3)
    opt.grad_scale = torch.tensor([scale])
    opt.found_inf = torch.zeros(1)
    opt.step()  # creates the state
    st = [opt.state[p] for p in params]
    # the kernel alone: the op on prebuilt lists, without the optimizer's bookkeeping
    args = ([p.detach() for p in params], [p.grad for p in params], [s["exp_avg"] for s in st],
            [s["exp_avg_sq"] for s in st], [s["step"] for s in st])
    kwargs = dict(max_exp_avg_sqs=[], master_params=[s["master_param"] for s in st], param_remainders=[],
                  exp_avg_scales=[], exp_avg_sq_scales=[], lr=torch.tensor([1e-3]),
                  beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True, grad_scale=opt.grad_scale,
                  found_inf=opt.found_inf)

    # peer: the torch composition for the same job
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

    # peer: torch fused AdamW on fp32 params of the same count (also 28 bytes per param)
    params32 = [torch.nn.Parameter(p.detach().float()) for p in params]
    for p, q in zip(params32, params):
        p.grad = q.grad.float()
    fused32 = torch.optim.AdamW(params32, lr=1e-3, fused=True)
    fused32.step()

    contenders = {"ours": lambda i: opt.step(), "kernel": lambda i: torch.ops.mixprec.adam_step_(*args, **kwargs),
                  "ceiling": cpu_stream(14 * n, 14 * n, arrays=adam_stream_layout(n), rotate=1),
                  "torch composition (fp32 grads, unscale, AdamW fused, copy back)": composition,
                  "torch.optim.AdamW(fused=True) fp32 params": lambda i: fused32.step()}
    ds, ds_note = _deepspeed_cpu_adam([torch.nn.Parameter(p.detach().clone()) for p in params32])
    if ds is not None:
        contenders["DeepSpeedCPUAdam fp32 params"] = ds
    notes.append(ds_note)
    rss_before = _maxrss_mb()
    # all in the same rounds: a change of load (others compiling on the 2 cores) falls on all alike
    timings = measure_interleaved(contenders, repeats=repeats, min_time_s=min_time_s)
    notes.append(f"peak RSS growth while timing (all contenders): {_maxrss_mb() - rss_before:.1f} MB")
    ours, kernel, ceiling = timings.pop("ours"), timings.pop("kernel"), timings.pop("ceiling")
    work = BYTES_PER_PARAM * n
    notes.append(f"ceiling: stream with Adam's arrays (3 in place, 1 read, 1 written), IQR "
                 f"{ceiling.q25_ms:.3g}-{ceiling.q75_ms:.3g} ms")
    shape = f"GPT-2 blocks: {n / 1e6:.1f}M params"
    common = dict(op=OP, device="cpu", shape=shape, dtype="float16 + fp32 masters", unit="GB/s", work=work,
                  ceiling=gbps(work, ceiling), peers=timings)
    return [row(backend="cpu", timing=ours, notes="; ".join(["FusedAdamW.step()"] + notes), **common),
            row(backend="cpu (kernel alone)", timing=kernel, notes="adam_step_ on prebuilt lists", **common)]


def _gpu(quick: bool) -> list[dict]:
    from mixprec import _backend, _ext
    from mixprec.benchmarks.ceiling import cuda_copy_gbps
    from mixprec.benchmarks.timing import measure_gpu

    shapes = gpt2_shapes(1024, 4 if quick else 24)
    params32 = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
    n = sum(p.numel() for p in params32)
    for p in params32:
        p.grad = torch.randn_like(p)
    fused32 = torch.optim.AdamW(params32, lr=1e-3, fused=True)
    peers = {"torch.optim.AdamW(fused=True) fp32 params": measure_gpu(fused32.step, quick=quick)}
    try:
        from apex.optimizers import FusedAdam as ApexFusedAdam

        apex_opt = ApexFusedAdam(params32, lr=1e-3, adam_w_mode=True)
        peers["apex FusedAdam fp32 params"] = measure_gpu(apex_opt.step, quick=quick)
        note = ""
    except ImportError:
        note = "apex not installed"
    backends = (["cuda"] if _ext.has_cuda_kernels() else []) + (["triton"] if _backend.triton_available() else [])
    rows = []
    for mode, (dtype, kwargs, bytes_per_param) in GPU_MODES.items():
        params = [torch.nn.Parameter(p.detach().to(dtype)) for p in params32]
        for p, p32 in zip(params, params32):
            p.grad = p32.grad.to(dtype)
        work = bytes_per_param * n
        ceiling = cuda_copy_gbps(work // 2, work // 2, quick=quick)
        for backend in backends:
            opt = FusedAdamW(params, lr=1e-3, backend=backend, **kwargs)
            opt.step()
            rows.append(row(op=OP, backend=backend, device="cuda",
                            shape=f"GPT-2 1024-wide blocks: {n / 1e6:.1f}M params", dtype=mode,
                            timing=measure_gpu(opt.step, quick=quick), unit="GB/s", work=work, ceiling=ceiling.gbps,
                            peers=peers, notes="; ".join(x for x in [f"FusedAdamW.step(), {bytes_per_param} B/param; "
                                                                   "ceiling: device copy of the same bytes", note]
                                                           if x)))
        del params
    return rows


def run(quick: bool, device: str) -> list[dict]:
    return run_on_device(device, quick, cpu=_cpu, cuda=_gpu)
