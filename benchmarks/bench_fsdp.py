"""FSDP2 optimizer step: mixprec's FusedAdamW on sharded (DTensor) params against torch.optim.AdamW(fused=True) on
the same DTensors, 2 ranks (`python -m mixprec bench --op fsdp`).

The job: one AdamW step of a GPT-2-like model (bench_adam.gpt2_shapes, 768 wide) whose params are sharded over 2
CPU ranks (gloo) as FSDP2 shards them, DTensors with placements (Shard(0),), grads alike. mixprec runs its kernel
once per param group on the local shards; torch's fused AdamW runs on the DTensors, which dispatch each of its
foreach ops through DTensor's sharding propagation. Rows, each timed in the same rounds as its peer, each call
started on both ranks at once (one core each) and counted as its slower rank took:
- fp32 shards (FSDP2 with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) hands the optimizer these):
  FusedAdamW vs torch.optim.AdamW(fused=True), both 28 B per param moved;
- the same with global-norm clipping to 1.0: FusedAdamW(max_grad_norm=1.0) (the norm from one read-only pass and
  one all-reduce of one number, the clip coefficient applied in the kernel) vs torch.nn.utils.clip_grad_norm_ on
  the DTensor grads followed by the fused step;
- bf16 shards with fp32 masters (the model cast before fully_shard: half the all-gather bytes): FusedAdamW, 28 B
  per param moved, against torch's fused AdamW on fp32 shards (the same bytes: torch's own way to this job);
- bf16 shards with remainder masters and int8 moments (the smallest mode with exact masters): its own
  bytes moved (step_traffic), same peer.
GB/s: the bytes of this rank's shard that the step moves (mixprec.optim.step_traffic) over the median time; each
row's ceiling is mixprec's streaming kernel over arrays of the sizes and in-place pattern of that row's step on this
rank (step_traffic(per_array=True)), timed in the same rounds (benchmarks/ceiling.py). The notes give the
bytes each rank holds per param of the model (its params and optimizer state; not the grads, which FSDP2 frees
or keeps alike for both). CUDA: no rows (the 2-rank run here is gloo on the CPU).
"""
from __future__ import annotations

import datetime
import json
import os
import statistics
import tempfile
import time

import torch

from mixprec.benchmarks.rows import row, run_on_device

OP = "FSDP2 AdamW step (2 ranks)"
WORLD = 2
TORCH = "torch.optim.AdamW(fused=True) on the DTensors"


def _sizes(quick: bool) -> tuple[int, int, int]:
    """(width, blocks, repeats)."""
    from mixprec.benchmarks.timing import reduced

    if reduced():
        return 64, 2, 3
    return (768, 2, 10) if quick else (768, 4, 30)


def _shards(shapes, mesh, dtype, seed: int = 0):
    """Params sharded as FSDP2 shards them (Shard(0) DTensors), with DTensor grads of the same placements."""
    from torch.distributed.tensor import Shard, distribute_tensor

    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(distribute_tensor(torch.randn(shape, generator=gen).to(dtype), mesh, [Shard(0)]))
        p.grad = distribute_tensor((torch.randn(shape, generator=gen) * 1e-2).to(dtype), mesh, [Shard(0)])
        params.append(p)
    return params


def _measure_in_step(contenders: dict, repeats: int, warmup: int = 3) -> dict:
    """{name: Timing} of every contender, each call of which starts on all ranks at once (a barrier, not timed)
    and counts as long as its slowest rank took: what a step costs a sharded job. Rounds call every contender once,
    in a rotating order (as timing.measure_interleaved), the same on every rank, so that their collectives match."""
    import torch.distributed as dist

    from mixprec.benchmarks.timing import Timing

    names = list(contenders)
    samples = {name: [] for name in names}
    for i in range(warmup + repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            dist.barrier()
            t0 = time.perf_counter()
            contenders[name](i)
            if i >= warmup:
                samples[name].append((time.perf_counter() - t0) * 1e3)
    mine = torch.tensor([samples[name] for name in names], dtype=torch.float64)
    dist.all_reduce(mine, op=dist.ReduceOp.MAX)
    out = {}
    for name, row_ms in zip(names, mine.tolist()):
        q = statistics.quantiles(row_ms, n=4) if len(row_ms) > 1 else [row_ms[0]] * 3
        out[name] = Timing(statistics.median(row_ms), q[0], q[2], len(row_ms))
    return out


def _held_bytes(params, optimizer) -> int:
    """This rank's bytes of the params and of the optimizer's state tensors."""
    from mixprec import distributed

    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return sum(distributed.local_numel(t) * t.element_size() for t in [*params, *state])


def _worker(rank: int, init_file: str, out: str, quick: bool) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from mixprec.benchmarks.bench_adam import gpt2_shapes
    from mixprec.benchmarks.ceiling import cpu_stream, gbps
    from mixprec.optim import FusedAdamW, step_traffic

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=600))
    try:
        width, blocks, repeats = _sizes(quick)
        shapes = gpt2_shapes(width, blocks)
        mesh = init_device_mesh("cpu", (WORLD,))
        n = sum(torch.Size(s).numel() for s in shapes)
        ours32, torch32, clip32, torch_clip32 = (_shards(shapes, mesh, torch.float32) for _ in range(4))
        ours16 = _shards(shapes, mesh, torch.bfloat16)
        local_n = sum(p.to_local().numel() for p in ours32)
        opts = {"fp32": FusedAdamW(ours32, lr=1e-3), "torch fp32": torch.optim.AdamW(torch32, lr=1e-3, fused=True),
                "clip": FusedAdamW(clip32, lr=1e-3, max_grad_norm=1.0),
                "torch clip": torch.optim.AdamW(torch_clip32, lr=1e-3, fused=True),
                "bf16": FusedAdamW(ours16, lr=1e-3)}
        ours_small = _shards(shapes, mesh, torch.bfloat16)
        opts["bf16 small"] = FusedAdamW(ours_small, lr=1e-3, master_weights="remainder", state_dtype="int8")

        def torch_clipped(i):
            torch.nn.utils.clip_grad_norm_(torch_clip32, 1.0)
            opts["torch clip"].step()

        contenders = {name: (lambda i, o=o: o.step()) for name, o in opts.items() if name != "torch clip"}
        contenders["torch clip"] = torch_clipped
        for name in ("fp32", "bf16", "bf16 small"):  # (clip moves what fp32 moves, in its kernel pass)
            arrays = step_traffic(opts[name], per_array=True)
            contenders[f"ceiling {name}"] = cpu_stream(sum(r for r, _ in arrays), sum(w for _, w in arrays),
                                                       arrays=arrays)
        timings = _measure_in_step(contenders, repeats)
        held = {name: _held_bytes(params, opts[name]) / n for name, params in
                (("fp32", ours32), ("torch fp32", torch32), ("bf16", ours16),
                 ("bf16 small", ours_small))}
        if rank == 0:
            work = {name: step_traffic(opts[name]) for name in ("fp32", "bf16", "bf16 small")}
            ceiling = {name: gbps(w, timings[f"ceiling {name}"]) for name, w in work.items()}
            shape = f"GPT-2 {width}-wide, {blocks} blocks: {n / 1e6:.1f}M params, {local_n / 1e6:.2f}M per rank"
            ranks = "times: each call's slowest rank (the calls start together on both ranks)"
            held_note = (f"held per rank (params + optimizer state) per param of the model: ours fp32 "
                         f"{held['fp32']:.2f} B, torch fp32 {held['torch fp32']:.2f} B, ours bf16 + fp32 masters "
                         f"{held['bf16']:.2f} B")
            common = dict(op=OP, backend="cpu", device="cpu", shape=shape, unit="GB/s")

            def judged(name: str) -> dict:
                return {"work": work[name], "ceiling": ceiling[name]}

            rows = [
                row(dtype="float32 shards", timing=timings["fp32"], peers={TORCH: timings["torch fp32"]},
                    notes=f"FusedAdamW.step() on DTensor params; {held_note}; {ranks}", **common, **judged("fp32")),
                row(dtype="float32 shards, clip 1.0", timing=timings["clip"],
                    peers={f"clip_grad_norm_ + {TORCH}": timings["torch clip"]},
                    notes="FusedAdamW(max_grad_norm=1.0): global norm from one pass + one all-reduce; GB/s: the "
                          "kernel pass's bytes (the norm pass reads the grads once more)", **common, **judged("fp32")),
                row(dtype="bfloat16 shards + fp32 masters", timing=timings["bf16"],
                    peers={f"{TORCH} (fp32 shards)": timings["torch fp32"]},
                    notes="FusedAdamW.step(): bf16 params, fp32 masters per shard", **common, **judged("bf16")),
                row(dtype="bfloat16 shards, remainder masters + int8 moments", timing=timings["bf16 small"],
                    peers={f"{TORCH} (fp32 shards)": timings["torch fp32"]},
                    notes=f"held per rank per param of the model: {held['bf16 small']:.2f} B", **common,
                    **judged("bf16 small")),
            ]
            for r, name in zip(rows, ("fp32", "fp32", "bf16", "bf16 small")):
                r["notes"] += f"; {work[name] / local_n:.2f} B per param moved"
            with open(out, "w") as f:
                json.dump(rows, f)
        # note: both ranks tear down together: a rank that destroys its process group while the other still holds
        # its gloo connections can die in teardown ("terminate called without an active exception", seen once)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _cpu(quick: bool) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(os.path.join(tmp, "rendezvous"), out, quick), nprocs=WORLD, join=True)
        with open(out) as f:
            return json.load(f)


def run(quick: bool, device: str) -> list[dict]:
    return run_on_device(device, quick, cpu=_cpu, cuda=lambda quick: [])
