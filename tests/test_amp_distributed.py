"""mixprec.amp.GradScaler under torch.distributed: two CPU processes (gloo), one poisons its gradients; both must
skip the same steps and keep the same scale, with the default group and with an explicit process_group."""
import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mixprec.amp import GradScaler

WORLD = 2
STEPS = 6
POISONED = {1, 4}  # steps at which rank 1 alone gets inf gradients


def _run(scaler, rank):
    """Each rank trains its own copy on its own data (as with sharded gradients); per step: (scale, stepped)."""
    torch.manual_seed(0)  # same initial weights on both ranks
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = []
    for step in range(STEPS):
        opt.zero_grad()
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(10 * step + rank))
        loss = model(x).square().sum()
        if rank == 1 and step in POISONED:
            loss = loss * float("inf")
        before = model.weight.detach().clone()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        out.append((scaler.get_scale(), not torch.equal(before, model.weight)))
    return out


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=30))
    try:
        default_group = GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
        explicit_group = GradScaler("cpu", init_scale=2.0**8, growth_interval=2, hysteresis=2,
                                    process_group=dist.new_group(list(range(WORLD))))
        result = {"default": _run(default_group, rank), "explicit": _run(explicit_group, rank),
                  "skipped": (default_group.skipped_steps(), explicit_group.skipped_steps())}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ranks_skip_the_same_steps(tmp_path):
    ctx = mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 90
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two ranks did not finish in 90 s (a collective mismatch would hang them)")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))

    assert r0 == r1, f"ranks disagree:\nrank 0 {r0}\nrank 1 {r1}"
    for key in ("default", "explicit"):
        stepped = [s for _, s in r0[key]]
        assert stepped == [step not in POISONED for step in range(STEPS)], key
    # default: 256 -> skip, back off -> ... ; hysteresis=2 tolerates the first (non-consecutive) overflows
    assert [s for s, _ in r0["default"]] == [256, 128, 128, 256, 128, 128]
    assert [s for s, _ in r0["explicit"]] == [256, 256, 256, 512, 512, 512]
    assert r0["skipped"] == (2, 2)
