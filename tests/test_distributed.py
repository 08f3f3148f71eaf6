"""mixprec under torch.distributed: 2 CPU processes (torch.multiprocessing), gloo.

Reference for every distributed run: ONE process that feeds the same global batch as two micro-batches of
half the loss each, accumulating grads. That is exactly what data parallelism computes: each rank's grads
are those of its shard's mean loss; DDP (and FSDP2's reduce-scatter) divide by the world size and sum. In
the half dtype, g/2 is exact (a power of two) and a sum of two values is one rounding whichever order, so the
parameters must agree BIT FOR BIT, not just within a tolerance, as long as both sides run the same kernels
on the same shapes with one thread each (a thread count changes GEMM blocking, hence rounding). A tolerance
would hide a real bug here, e.g. a rank stepping on unreduced grads or skipping a different step.
"""
from __future__ import annotations

import faulthandler
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import assert_bitwise_equal
from torch import nn

import mixprec
from mixprec import precision

WORLD = 2
STEPS = 6
POISON_STEP = 3  # rank 1 alone gets an inf grad at this step, after the gradient all-reduce
BATCH = 16  # global; each rank gets BATCH // WORLD
WORKER_TIMEOUT_S = 90


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 5))


def _batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 12, generator=g), torch.randint(0, 5, (BATCH,), generator=g)


def _poison(model: nn.Module) -> None:
    grad = next(model.parameters()).grad
    # an FSDP2 grad is a DTensor: write into this rank's shard (indexing the DTensor is a collective)
    local = grad.to_local() if hasattr(grad, "to_local") else grad
    local.view(-1)[0] = float("inf")


def _train(model, optimizer, scaler, rank: int, world: int):
    """Runs STEPS steps on this rank's shard of each global batch; returns (skipped per step, scales).
    In one process (world 1) the two shards are micro-batches with the loss halved."""
    skipped, scales = [], []
    shards = WORLD // world  # micro-batches per process
    per = BATCH // WORLD
    for step in range(STEPS):
        x, y = _batch(step)
        optimizer.zero_grad(set_to_none=True)
        for s in range(shards):
            lo = (rank * shards + s) * per
            loss = F.cross_entropy(model(x[lo:lo + per]), y[lo:lo + per]) / shards
            scaler.scale(loss).backward()
        poison_rank = WORLD - 1 if world == WORLD else 0
        if step == POISON_STEP and rank == poison_rank:
            _poison(model.module if hasattr(model, "module") else model)
        before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        scales.append(scaler.get_scale())
        skipped.append(scales[-1] < before)
    return skipped, scales


def _params(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        p = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2 DTensor shards -> whole tensor
        out[name.removeprefix("module.")] = p.detach().clone()
    return out


def _single_process(dtype) -> dict:
    torch.set_num_threads(1)
    model, optimizer, scaler = mixprec.prepare(_model(), dtype=dtype, optimizer_kwargs=dict(lr=1e-2))
    skipped, scales = _train(model, optimizer, scaler, rank=0, world=1)
    return {"params": _params(model), "skipped": skipped, "scales": scales}


def _worker(rank: int, port: int, kind: str, dtype, out_dir: str) -> None:
    # a rank stuck in a collective the other never joins fails the test instead of hanging CI
    faulthandler.dump_traceback_later(WORKER_TIMEOUT_S, exit=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        result = {}
        if kind == "ddp":
            model, optimizer, scaler = mixprec.prepare(_model(), dtype=dtype, optimizer_kwargs=dict(lr=1e-2))
            model = nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            def shard(m):
                for layer in m:
                    if any(True for _ in layer.parameters()):
                        fully_shard(layer)
                fully_shard(m)

            # DTensor has no sharding rule for mixprec's ops: the public op refuses DTensor grads it is handed (the
            # optimizer and scaler run it on the local shards instead)
            m = _model()
            shard(m)
            try:
                precision.convert(m, dtype)
            except ValueError as exc:
                result["convert_error"] = str(exc)
            m(torch.randn(2, 12)).sum().backward()
            try:
                mixprec.ops.unscale_and_check_([p.grad for p in m.parameters()], torch.ones(1), torch.zeros(1))
            except NotImplementedError as exc:
                result["op_error"] = str(exc)
            model, optimizer, scaler = mixprec.prepare(_model(), dtype=dtype, optimizer_kwargs=dict(lr=1e-2),
                                                       shard=shard)
        result["skipped"], result["scales"] = _train(model, optimizer, scaler, rank, WORLD)
        result["params"] = _params(model)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_distributed(kind: str, dtype, tmp_path) -> list[dict]:
    mp.spawn(_worker, args=(_free_port(), kind, dtype, str(tmp_path)), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _check_against_single_process(ranks: list[dict], dtype) -> None:
    ref = _single_process(dtype)
    assert ref["skipped"][POISON_STEP] and sum(ref["skipped"]) == 1, ref["skipped"]
    for r, res in enumerate(ranks):
        # every rank skipped exactly the poisoned step, though only rank 1 saw the inf
        assert res["skipped"] == ref["skipped"], f"rank {r}: skipped {res['skipped']}, expected {ref['skipped']}"
        assert res["scales"] == ref["scales"], f"rank {r}"
        for name, p in ref["params"].items():
            assert res["params"][name].dtype == p.dtype
            assert_bitwise_equal(res["params"][name], p, f"rank {r} {name} vs single process")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_ddp_matches_single_process_and_ranks_agree_on_overflow(dtype, tmp_path):
    _check_against_single_process(_run_distributed("ddp", dtype, tmp_path), dtype)


def test_fsdp2_matches_single_process_or_names_the_limitation(tmp_path):
    dtype = torch.float16
    ranks = _run_distributed("fsdp2", dtype, tmp_path)
    for res in ranks:
        assert "sharding strategy" in res.get("op_error", ""), res.get("op_error")
        assert "model: its parameters are already DTensors" in res.get("convert_error", "")
    _check_against_single_process(ranks, dtype)  # prepare()'s optimizer and scaler, through FSDP2
