"""End to end: mixprec.prepare, fault injection on a real model, and the demo (quick mode, and the accuracy
claim of the full digits run)."""
from __future__ import annotations

import difflib
import random
import subprocess
import sys

import pytest
import torch
from helpers import assert_bitwise_equal
from torch import nn

import mixprec
from mixprec import precision
from mixprec.tools.cli import load_train_example

train = load_train_example()


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


HALF = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.block = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.GroupNorm(4, 16))
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.out = nn.Linear(16, 3)
        self.register_buffer("offset", torch.ones(16))

    def forward(self, ids, x):
        h = self.bn(self.fc1(self.emb(ids) + x)) + self.offset
        h = self.block(h)
        h = h + self.attn(h[:, None], h[:, None], h[:, None], need_weights=False)[0][:, 0]
        return self.out(h)


@pytest.mark.parametrize("dtype", HALF)
def test_prepare_keeps_norm_layers_fp32_and_casts_at_their_borders(dtype):
    # fp16: a small scale, as this test needs its one step taken, not skipped for overflow (bf16 starts at 1.0)
    scaler_kwargs = {"init_scale": 8.0} if dtype == torch.float16 else None
    model, optimizer, scaler = mixprec.prepare(_Net(), dtype=dtype, scaler_kwargs=scaler_kwargs)
    initial_scale = scaler.get_scale()
    norms = (model.bn, model.block[1], model.block[2])
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not t.is_floating_point():
            continue
        in_norm = any(t is u for m in norms for u in list(m.parameters()) + list(m.buffers()))
        assert t.dtype == (torch.float32 if in_norm else dtype), name

    seen = {}
    for name in ("fc1", "bn", "block"):
        getattr(model, name).register_forward_hook(
            lambda m, a, o, name=name: seen.update({name: (a[0].dtype, o.dtype)}))
    out = model(torch.randint(0, 10, (4,)), torch.randn(4, 8))  # int ids pass, fp32 x is cast
    assert seen["fc1"] == (dtype, dtype)
    assert seen["bn"] == (torch.float32, dtype)  # runs on fp32 input (and fp32 params), hands back dtype
    assert seen["block"][1] == dtype  # what the next layer gets back
    assert out.dtype == torch.float32  # the loss is computed in fp32

    scaler.scale(out.mean()).backward()
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == initial_scale  # not skipped
    for p in model.parameters():
        master = optimizer.state[p].get("master_param")
        if p.dtype == dtype:
            assert master is not None and master.dtype == torch.float32
            assert_bitwise_equal(p.detach(), master.to(dtype), "param = master rounded")
        else:
            assert master is None  # fp32 params are their own masters


def test_prepare_swaps_exactly_nn_linear_sharing_parameters(monkeypatch):
    class FakeMixprecLinear(nn.Linear):
        @classmethod
        def from_linear(cls, linear):
            new = cls.__new__(cls)
            nn.Module.__init__(new)
            new.in_features, new.out_features, new.weight, new.bias = (linear.in_features, linear.out_features,
                                                                        linear.weight, linear.bias)
            return new

    monkeypatch.setattr(precision, "Linear", FakeMixprecLinear)
    net = _Net()
    before = {name: p for name, p in net.named_parameters()}
    model, _, _ = mixprec.prepare(net, dtype=torch.float16)
    assert type(model.fc1) is FakeMixprecLinear and type(model.block[0]) is FakeMixprecLinear
    assert type(model.attn.out_proj) is not FakeMixprecLinear  # MHA calls F.linear on it directly
    assert all(p is before[name] for name, p in model.named_parameters())
    model(torch.randint(0, 10, (4,)), torch.randn(4, 8))

    root, _, _ = mixprec.prepare(nn.Linear(3, 2), dtype=torch.float16)
    assert type(root) is FakeMixprecLinear


def test_scaler_policy_per_dtype():
    _, _, fp16 = mixprec.prepare(_Net(), dtype=torch.float16)
    assert fp16.get_scale() == 2.0**16 and fp16.get_growth_interval() == 2000
    _, _, bf16 = mixprec.prepare(_Net(), dtype=torch.bfloat16)
    assert bf16.get_scale() == 1.0 and bf16.state_dict()["max_scale"] == 1.0  # never above 1: no growth
    _, _, off = mixprec.prepare(_Net(), dtype=torch.bfloat16, scaler_kwargs={"enabled": False})
    assert not off.is_enabled()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(dtype=torch.float32), ValueError, "dtype must be torch.float16 or torch.bfloat16"),
    (dict(keep_fp32=("LayerNorm",)), TypeError, "keep_fp32 must hold nn.Module subclasses"),
    (dict(optimizer_class=torch.optim.AdamW([torch.zeros(1, requires_grad=True)])), TypeError, "optimizer_class"),
    (dict(output_dtype=torch.int64), ValueError, "output_dtype must be a floating torch.dtype"),
])
def test_prepare_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        mixprec.prepare(_Net(), **kwargs)


def test_prepare_refuses_a_non_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
        mixprec.prepare({}, dtype=torch.float16)


def test_prepare_builds_mixprecs_own_parts():
    model, optimizer, scaler = mixprec.prepare(_Net(), dtype=torch.float16)
    assert type(optimizer) is mixprec.optim.FusedAdamW and type(scaler) is mixprec.amp.GradScaler
    assert type(model.fc1) is mixprec.nn.Linear


FP32_LOOP = """
model = make_model()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
for x, y in batches:
    loss = torch.nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
"""

# The README's three lines (the first replaces two).
MIXED_LOOP = """
model, optimizer, scaler = mixprec.prepare(make_model(), dtype=torch.float16, optimizer_kwargs=dict(lr=1e-2))
for x, y in batches:
    loss = torch.nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(optimizer); scaler.update()
"""


def test_an_fp32_loop_becomes_mixed_precision_with_three_changed_lines():
    diff = [line for line in difflib.unified_diff(FP32_LOOP.splitlines(), MIXED_LOOP.splitlines(), lineterm="")
            if line.startswith("+") and not line.startswith("+++")]
    assert len(diff) == 3, diff
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(32, 8, generator=g) for _ in range(60)]
    batches = [(x, x[:, :3].argmax(1)) for x in xs]  # a learnable rule
    losses = {}
    for name, src in (("fp32", FP32_LOOP), ("fp16", MIXED_LOOP)):
        torch.manual_seed(0)
        scope = {"torch": torch, "mixprec": mixprec, "batches": batches,
                 "make_model": lambda: nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 3))}
        exec(src, scope)
        losses[name] = scope["loss"].item()
    assert losses["fp16"] < 0.8 * torch.log(torch.tensor(3.0)).item()  # it learned (chance level is ln 3)
    # measured here: 0.1264 vs 0.1262 (fp16 activations round at 2**-11 relative; the masters are fp32).
    # 0.01 is 8% of the final loss: a loop that lost its masters or its scaling lands far outside
    assert abs(losses["fp16"] - losses["fp32"]) < 0.01, losses


# ---------------------------------------------------------------------------------------- fault injection

def _snapshot(model, optimizer) -> list[torch.Tensor]:
    """Every param and every optimizer state tensor (masters, moments, step counts), cloned."""
    out = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        for value in optimizer.state.get(p, {}).values():
            out.append(torch.as_tensor(value).clone())
    return out


@pytest.mark.parametrize("mode", ["fp16", "bf16"])
def test_poisoned_steps_are_skipped_without_touching_masters_and_training_converges(mode):
    task = train.digits_task(quick=True)
    task.steps = 250
    rng = random.Random(7)
    poisoned = set(rng.sample(range(5, task.steps), 25))  # 10% of the steps, never the first few
    torch.manual_seed(0)
    model, optimizer, scaler = train.build(mode, task.make_model(), task.lr, task.weight_decay)
    params = list(model.parameters())

    for step in range(task.steps):
        for group in optimizer.param_groups:
            group["lr"] = task.lr_at(step)
        x, y = task.batch(step)
        loss = nn.functional.cross_entropy(model(x), y)
        snap = {}

        def poison():
            if step in poisoned:
                snap["state"], snap["scale"] = _snapshot(model, optimizer), scaler.get_scale()
                grad = rng.choice(params).grad.view(-1)
                grad[rng.randrange(grad.numel())] = rng.choice([float("inf"), float("-inf"), float("nan")])

        skipped = train.train_step(loss, optimizer, scaler, poison)
        if step in poisoned:
            assert skipped, f"step {step}: poisoned but not skipped"
            assert scaler.get_scale() == snap["scale"] * 0.5, f"step {step}: scale did not back off"
            for i, (after, before) in enumerate(zip(_snapshot(model, optimizer), snap["state"])):
                assert_bitwise_equal(after, before, f"step {step}: tensor {i} changed by a poisoned step")

    eval_loss, acc = task.evaluate(model)
    # the clean quick run reaches ~97.8% (see the demo); a single NaN reaching the masters gives ~10%
    assert acc >= 95.0, f"{mode}: accuracy {acc:.2f}% after fault injection"


# ------------------------------------------------------------------------------------------------- demo

def test_demo_quick_prints_the_table_and_writes_the_plot(tmp_path):
    png = tmp_path / "demo.png"
    proc = subprocess.run([sys.executable, "-m", "mixprec", "demo", "--quick", "--plot", str(png)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] in (["digits"], ["text"])
            and len(line.split()) == 8]
    assert [(r[0], r[1]) for r in rows] == [(t, m) for t in ("digits", "text") for m in ("fp32", "fp16", "bf16")]
    state_bytes = {r[1]: float(r[7]) for r in rows}
    assert state_bytes["fp32"] == 8.0  # AdamW: m and v
    assert state_bytes["fp16"] == state_bytes["bf16"] == 12.0  # plus the fp32 master
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_full_digits_run_mixed_precision_accuracy_within_half_a_point_of_fp32():
    """The claim of Micikevicius et al. (2018), on the demo's full digits configuration. Seeds 0-2 measured
    here: fp16 and bf16 within 0.19 points of fp32 at a 98.1-98.7% plateau (one test sample = 0.19 points)."""
    task = train.digits_task()
    acc = {mode: train.train(task, mode).accuracy for mode in train.MODES}
    assert acc["fp32"] >= 97.0, acc  # the comparison means something only at a plateau
    for mode in ("fp16", "bf16"):
        assert abs(acc[mode] - acc["fp32"]) <= 0.5, acc
