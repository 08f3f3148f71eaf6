"""Checkpoints: plain torch.save / torch.load(weights_only=True) of model, optimizer (with fp32 master weights)
and scaler; bit-for-bit resume; atomic writes that survive a crash; clear errors on damaged files."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import assert_bitwise_equal

import mixprec
from mixprec import checkpoint
from mixprec.tools.cli import load_train_example

train = load_train_example()


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _small_digits(steps: int) -> train.Task:
    task = train.digits_task(quick=True)
    task.steps = steps
    return task


def _poison_steps(*steps):
    """A poison hook putting inf into the first grad at the given steps (exercises the scaler's state)."""
    def poison(step, model):
        if step in steps:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
    return poison


@pytest.mark.parametrize("mode", ["fp16", "bf16"])
def test_resume_reaches_the_uninterrupted_params_bit_for_bit(mode, tmp_path):
    task, k = _small_digits(40), 17
    poison = _poison_steps(5, 9)  # before k: the scale at the checkpoint differs from its initial value
    full = train.train(task, mode, poison=poison)
    path = tmp_path / "ck.pt"
    first = train.train(task, mode, poison=poison, save_at=k, save_path=str(path))
    assert len(first.losses) == k
    resumed = train.train(task, mode, poison=poison, resume_from=str(path))

    assert resumed.skipped == full.skipped == 2
    assert resumed.scales == full.scales and resumed.losses == full.losses
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert_bitwise_equal(q.detach(), p.detach(), f"{mode} param {name}")
    for p_full, p_res in zip(full.model.parameters(), resumed.model.parameters()):
        s_full, s_res = full.optimizer.state[p_full], resumed.optimizer.state[p_res]
        assert s_full.keys() == s_res.keys()
        for key in s_full:
            assert_bitwise_equal(torch.as_tensor(s_res[key]), torch.as_tensor(s_full[key]), f"state {key}")


def test_state_dicts_load_with_weights_only_and_keep_fp32_masters(tmp_path):
    res = train.train(_small_digits(5), "fp16")
    state = {"model": res.model.state_dict(), "optimizer": res.optimizer.state_dict(),
             "scaler": res.scaler.state_dict()}
    path = tmp_path / "ck.pt"
    checkpoint.save(state, path)
    raw = torch.load(path, weights_only=True)  # a plain torch file: readable without mixprec
    assert raw["format"] == checkpoint.FORMAT

    loaded = checkpoint.load(path)
    masters = [s for s in loaded["optimizer"]["state"].values() if "master_param" in s]
    assert masters and all(s["master_param"].dtype == torch.float32 for s in masters)

    model, optimizer, scaler = mixprec.prepare(train.digits_mlp(), dtype=torch.float16)
    model.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    scaler.load_state_dict(loaded["scaler"])
    assert scaler.get_scale() == res.scaler.get_scale()
    for p_new, p_old in zip(model.parameters(), res.model.parameters()):
        for key, value in res.optimizer.state[p_old].items():
            # torch.optim.Optimizer.load_state_dict casts state to the param's dtype; fp32 must survive
            assert_bitwise_equal(torch.as_tensor(optimizer.state[p_new][key]), torch.as_tensor(value), key)


def _tensor_state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(1000, generator=g), "h": torch.randn(7, generator=g).to(torch.bfloat16),
            "step": seed, "nested": [torch.arange(3), {"lr": 0.5, "name": "x", "none": None}]}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    assert_bitwise_equal(a["w"], b["w"], "w")
    assert_bitwise_equal(a["h"], b["h"], "h")
    assert a["step"] == b["step"] and a["nested"][1] == b["nested"][1]


CRASH_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from mixprec import checkpoint

    real_save = torch.save

    def crashing_save(obj, f):  # writes half of the real bytes, then the process dies (no cleanup runs)
        import io
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        os._exit(137)

    checkpoint.torch.save = crashing_save
    checkpoint.save({"w": torch.zeros(1000)}, sys.argv[1])
""")


def test_crash_mid_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ck.pt"
    checkpoint.save(_tensor_state(1), path)
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(path)], capture_output=True, text=True)
    assert proc.returncode == 137, proc.stderr
    leftovers = [p for p in os.listdir(tmp_path) if p != "ck.pt"]
    assert leftovers and all(".tmp-" in p for p in leftovers)  # the crash hit mid-write, as intended
    _assert_same(checkpoint.load(path), _tensor_state(1))


def test_failed_save_keeps_the_previous_checkpoint_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    checkpoint.save(_tensor_state(1), path)

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(_tensor_state(2), path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ck.pt"]
    _assert_same(checkpoint.load(path), _tensor_state(1))


@pytest.mark.parametrize("damage", ["truncated", "empty", "flipped_byte_in_tensor_data"])
def test_damaged_checkpoint_gives_a_clear_error(damage, tmp_path):
    path = tmp_path / "ck.pt"
    state = _tensor_state(3)
    checkpoint.save(state, path)
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) * 2 // 3]
    elif damage == "empty":
        data = bytearray()
    else:
        # torch.load itself does not notice this one: only the digest does
        i = data.find(state["w"][500:502].numpy().tobytes())
        assert i > 0
        data[i] ^= 0x40
        path.write_bytes(bytes(data))
        torch.load(path, weights_only=True)
    path.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match=f"checkpoint '{path}' is (truncated or )?corrupt"):
        checkpoint.load(path)


def test_foreign_file_and_unsupported_state_are_named(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(checkpoint.CheckpointError, match="not written by mixprec.checkpoint.save"):
        checkpoint.load(path)
    with pytest.raises(TypeError, match=r"state\['opt'\]: cannot checkpoint a object"):
        checkpoint.save({"opt": object()}, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()
