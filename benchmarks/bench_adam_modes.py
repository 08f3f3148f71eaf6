"""Adam state modes: fewer bytes per parameter, the same one-pass step (`python -m mixprec bench --op adam_modes`).

The job: bf16 model params, bf16 grads, one AdamW step. mixprec's fp32-master step moves 28 bytes per param and
runs at the memory bandwidth, so the other modes can only be faster by moving less. Every mode runs in the same
rounds (load falls on all alike), and its ratio to the fp32-master step is the figure of merit:
- fp32 masters (master_weights=True): read grad 2, master 4, m 4, v 4; write master 4, m 4, v 4, param 2;
- remainder masters (master_weights="remainder"): the fp32 master is the bf16 param plus an int16 remainder;
- + bf16 states (state_dtype=torch.bfloat16), + int8 block-wise states (state_dtype="int8");
- no masters with stochastic rounding (master_weights=False, stochastic_rounding=True).
Peers: torch.optim.AdamW(fused=True) on fp32 params of the same count, and the 8-bit optimizers of bitsandbytes
and torchao on the same bf16 params when they are installed (skipped with a note otherwise, and in the reduced
run, where torchao's compile alone would take longer than the whole run should).

Bytes: each row's dtype names the mode with the bytes per param it stores (measured: opt.state_bytes() plus the
params) and moves per step (counted by mixprec.optim.step_traffic from the tensors the step reads and writes);
the notes of the baseline row repeat them as a table with the peers' measured state. GB/s is each row's own
moved bytes over its time.

Ceiling: for each mode, mixprec's streaming kernel (benchmarks/ceiling.py) over arrays of the same sizes and
in-place pattern as that mode's step (step_traffic(opt, per_array=True): grad read, master, moments and scales read
and written in place, the param written or updated in place), at the same size, timed in the same rounds, on one
set of buffers reused every call as the optimizer reuses its state (no rotation: on a CPU whose last-level cache
holds part of a mode's working set between steps, the smaller modes' 200-300 MB against the 300 MB L3 of the
Emerald Rapids machines, the ceiling gets the same hits as the step).

The layer list is GPT-2's (768 wide, 4 blocks, 28.3M params): 170-450 MB of working set per mode, far out of Zen 3's
32 MB L3 (an Emerald Rapids L3, 300 MB shared, may keep part of it between steps: see Ceiling).

Compute floor: each mode's step on one thread over a param whose arrays stay in cache (0.8-1.6 MB: the L2 of a Xeon
core, the L3 of Zen 3), measured first (best of 15 alternating calls), as ns per param (the slope between two sizes,
so the step's fixed cost drops out), scaled to the row's params and threads. It is the time the step's instructions
take with no memory traffic to wait for: a mode whose floor is near or above its ceiling's time is bound by its
instructions, not its bytes, and moving fewer bytes cannot make it faster. (On the AVX-512 Xeon: int8 states about 1
ns per param, 13.5-14 ms for 28.4M params on 2 threads, against the ~11 ms of its ceiling; bf16 states about 0.67
ns, under theirs.)
"""
from __future__ import annotations

import math
import time

import torch

from mixprec.benchmarks.bench_adam import gpt2_shapes
from mixprec.benchmarks.ceiling import cpu_stream, gbps
from mixprec.benchmarks.rows import row, run_on_device
from mixprec.benchmarks.timing import measure_interleaved, reduced
from mixprec.optim import FusedAdamW, step_traffic

OP = "adam_step_ (state modes)"
BASELINE = "fp32 masters"
# the compute floor: one param of each size, FLOOR_STEPS steps per call (0.2 / 0.8-1.6 MB of arrays: in cache)
FLOOR_SIZES, FLOOR_STEPS = (16384, 98304), 50
TORCH_FP32 = "torch.optim.AdamW(fused=True) fp32 params"
# mode name -> FusedAdamW arguments (bf16 params)
MODES = {
    BASELINE: {"master_weights": True},
    "remainder": {"master_weights": "remainder"},
    "remainder + bf16 states": {"master_weights": "remainder", "state_dtype": torch.bfloat16},
    "remainder + int8 states": {"master_weights": "remainder", "state_dtype": "int8"},
    "no masters + SR": {"master_weights": False, "stochastic_rounding": True},
}


def tensor_bytes(t) -> int:
    """Bytes of a tensor's data; for a wrapper subclass (torchao's 8-bit state), of the tensors it holds."""
    if not isinstance(t, torch.Tensor):
        return 0
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def held_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in an optimizer's state (any optimizer: for the peers' figures)."""
    return sum(tensor_bytes(v) for s in opt.state.values() if isinstance(s, dict) for v in s.values())


def param_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(p.numel() * p.element_size() for g in opt.param_groups for p in g["params"])


def _eight_bit_peers(make_params) -> tuple[dict, dict, list[str]]:
    """({name: step fn}, {name: optimizer}) for the installed 8-bit peers, and a note for each missing one."""
    peers, optimizers, notes = {}, {}, []
    if reduced():
        return peers, optimizers, ["8-bit peers skipped in the reduced run"]
    try:
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(make_params(), lr=1e-3)
        opt.step()
        name = f"bitsandbytes {bnb.__version__} AdamW8bit"
        peers[name], optimizers[name] = (lambda i, opt=opt: opt.step()), opt
    except Exception as exc:  # not installed, or no CPU support in this build
        notes.append(f"bitsandbytes skipped ({type(exc).__name__}: {str(exc)[:60]})")
    try:
        import torchao
        from torchao.optim import AdamW8bit

        opt = AdamW8bit(make_params(), lr=1e-3)
        opt.step()  # compiles its step on the first call
        name = f"torchao {torchao.__version__} AdamW8bit"
        peers[name], optimizers[name] = (lambda i, opt=opt: opt.step()), opt
    except Exception as exc:
        notes.append(f"torchao skipped ({type(exc).__name__}: {str(exc)[:60]})")
    return peers, optimizers, notes


def _cpu(quick: bool) -> list[dict]:
    shapes = gpt2_shapes(64, 2) if reduced() else gpt2_shapes(768, 4)
    repeats, min_time_s = (3, 0.0) if reduced() else (5, 0.0) if quick else (20, 2.0)
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen).to(torch.bfloat16) for s in shapes]
    grads = [(torch.randn(s, generator=gen) * 1e-3).to(torch.bfloat16) for s in shapes]
    n = sum(t.numel() for t in base)

    def make_params(dtype=torch.bfloat16):
        params = [torch.nn.Parameter(t.to(dtype)) for t in base]
        for p, g in zip(params, grads):
            p.grad = g if dtype == torch.bfloat16 else g.to(dtype)
        return params

    notes = [f"{len(shapes)} tensors (GPT-2 width {shapes[0][0]}, {len(shapes) // 12} blocks)",
             f"threads={torch.get_num_threads()}"]
    optimizers, contenders = {}, {}
    for name, kwargs in MODES.items():
        opt = FusedAdamW(make_params(), lr=1e-3, backend="cpu", **kwargs)
        opt.step()  # creates the state
        optimizers[name] = opt
        contenders[name] = lambda i, opt=opt: opt.step()
        contenders[f"ceiling: {name}"] = cpu_stream(*_read_write(opt), arrays=step_traffic(opt, per_array=True),
                                                    rotate=1)
    fused32 = torch.optim.AdamW(make_params(torch.float32), lr=1e-3, fused=True)
    fused32.step()
    contenders[TORCH_FP32] = lambda i: fused32.step()
    eight_bit, peer_optimizers, peer_notes = _eight_bit_peers(make_params)
    contenders.update(eight_bit)
    peer_optimizers[TORCH_FP32] = fused32

    # (before the big contenders run: measured after them, in the same rounds or apart, the floors came out 30-50%
    # higher, run after run, though a cold cache or a busy second core alone does not raise them)
    floors = {} if reduced() else {name: compute_floor_ns(kwargs) for name, kwargs in MODES.items()}
    timings = measure_interleaved(contenders, repeats=repeats, min_time_s=min_time_s)
    table = [f"{name}: {_stored(opt) / n:.2f} B/param stored (measured), {step_traffic(opt) / n:.2f} moved"
             for name, opt in optimizers.items()]
    table += [f"{name}: {_stored(opt) / n:.2f} B/param stored (measured)" for name, opt in peer_optimizers.items()]
    notes += ["bytes per param: " + "; ".join(table), *peer_notes]
    baseline = timings[BASELINE]
    peers = {k: t for k, t in timings.items() if k not in MODES and not k.startswith("ceiling: ")}
    rows = []
    for name, opt in optimizers.items():
        work, ceiling = step_traffic(opt), timings[f"ceiling: {name}"]
        label = f"bfloat16, {name}: {_stored(opt) / n:.2f} B/param stored, {work / n:.2f} moved"
        row_notes = ["FusedAdamW.step()", f"ceiling: stream over this mode's arrays, IQR {ceiling.q25_ms:.3g}-"
                     f"{ceiling.q75_ms:.3g} ms"]
        if name in floors:
            floor_ms = floors[name] * n / torch.get_num_threads() / 1e6
            row_notes.append(f"compute floor (in cache, one thread): {floors[name]:.2f} ns/param, {floor_ms:.3g} ms "
                             f"here ({floor_ms / ceiling.median_ms:.0%} of the ceiling's time)")
        row_notes += notes if name == BASELINE else []
        rows.append(row(op=OP, backend="cpu", device="cpu", shape=f"GPT-2 blocks: {n / 1e6:.1f}M params",
                        dtype=label, timing=timings[name], unit="GB/s", work=work, ceiling=gbps(work, ceiling),
                        peers={**({} if name == BASELINE else {f"mixprec {BASELINE}": baseline}), **peers},
                        notes="; ".join(row_notes)))
    return rows


def compute_floor_ns(kwargs: dict, reps: int = 15) -> float:
    """ns per param of a FusedAdamW step with `kwargs` (bf16 params) on one thread, its arrays in cache: the slope
    between FLOOR_SIZES of the best of `reps` calls of FLOOR_STEPS steps each, the calls of the two sizes alternating
    (a floor: load from other tenants only ever adds time; the per-step fixed cost, Python and the op's, is the same
    at both sizes and drops out). See the module docstring (Compute floor)."""
    optimizers = []
    for n in FLOOR_SIZES:
        gen = torch.Generator().manual_seed(n)
        p = torch.nn.Parameter(torch.randn(n, generator=gen).to(torch.bfloat16))
        p.grad = (torch.randn(n, generator=gen) * 1e-3).to(torch.bfloat16)
        optimizers.append(FusedAdamW([p], lr=1e-3, backend="cpu", **kwargs))
        optimizers[-1].step()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = [math.inf] * len(FLOOR_SIZES)
        for _ in range(reps):
            for k, opt in enumerate(optimizers):
                t0 = time.perf_counter()
                for _ in range(FLOOR_STEPS):
                    opt.step()
                best[k] = min(best[k], (time.perf_counter() - t0) / FLOOR_STEPS)
    finally:
        torch.set_num_threads(threads)
    return (best[1] - best[0]) / (FLOOR_SIZES[1] - FLOOR_SIZES[0]) * 1e9


def _read_write(opt) -> tuple[int, int]:
    arrays = step_traffic(opt, per_array=True)
    return sum(r for r, _ in arrays), sum(w for _, w in arrays)


def _stored(opt: torch.optim.Optimizer) -> int:
    """What an optimizer's training holds per step besides grads: its state and the params."""
    return (opt.state_bytes() if isinstance(opt, FusedAdamW) else held_bytes(opt)) + param_bytes(opt)


def _gpu(quick: bool) -> list[dict]:
    # the GPU modes table lives in bench_adam (GPU_MODES); this script is the CPU side-by-side of issue #12
    return []


def run(quick: bool, device: str) -> list[dict]:
    return run_on_device(device, quick, cpu=_cpu, cuda=_gpu)
