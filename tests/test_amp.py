"""mixprec.amp.GradScaler against torch.amp.GradScaler (on the CPU, where torch's scaler runs), against a host
model of hysteresis and bounds, and on the fused-op features torch lacks (fp16 grads, grad norm, diagnostics)."""
import collections
import copy
import math
import pickle
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixprec.amp import GradScaler
from mixprec.optim import FusedAdamW

INF, NAN = float("inf"), float("nan")
FLOOR = 2.0**-126  # the scale's floor: float32's smallest normal number


# ------------------------------------------------------------------------------------------------ helpers
def _one_param_loop(scaler, steps, device="cpu"):
    """Drive `scaler` through steps of 'ok' / 'inf' / 'nan' grads on one fp32 param; the scale after each."""
    p = torch.nn.Parameter(torch.zeros(3, device=device))
    opt = torch.optim.SGD([p], lr=0.1)
    scales = []
    for kind in steps:
        scaler.scale(torch.ones((), device=device))  # creates the scale on the first call, as a loss would
        p.grad = torch.full((3,), {"ok": 1.0, "inf": INF, "nan": NAN}[kind], device=device)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return scales


def _model_trajectory(steps, init, growth, backoff, interval, hysteresis=1, consecutive=True, lo=None, hi=None):
    """The documented rule on the host, in float32 with products rounded once from float64 (as torch's kernel)."""
    scale, tracker, left, out = np.float32(init), 0, hysteresis, []
    for kind in steps:
        if kind != "ok":
            tracker = 0
            if left <= 1:
                scale = np.float32(float(scale) * backoff)
            else:
                left -= 1
        else:
            tracker += 1
            if tracker == interval:
                grown = np.float32(float(scale) * growth)
                if math.isfinite(grown):
                    scale = grown
                tracker = 0
                left = hysteresis
            if consecutive:
                left = hysteresis
        scale = np.float32(min(hi if hi is not None else math.inf, max(lo if lo is not None else 0.0, scale)))
        out.append(float(scale))
    return out


def _fp16_mlp(seed=0, dtype=torch.float16):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).to(dtype)


def _batch(step, dtype):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(5, 8, generator=g).to(dtype), torch.randn(5, 4, generator=g)


def _loss(model, step, dtype, poison):
    x, y = _batch(step, dtype)
    loss = torch.nn.functional.mse_loss(model(x).float(), y)
    return loss * 1e30 if step in poison else loss  # 1e30 overflows every fp16 grad


def _assert_same_params(a, b, what):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), f"{what}: parameter {name} differs, max |diff| {(pa - pb).abs().max().item()}"


step_kinds = st.lists(st.sampled_from(["ok", "ok", "ok", "inf", "nan"]), min_size=1, max_size=40)


# ------------------------------------------------------------------------------ scale trajectory vs torch
@settings(max_examples=60, deadline=None)
@given(steps=step_kinds, init=st.floats(1e-3, 1e6), growth=st.floats(1.01, 4.0), backoff=st.floats(0.05, 0.95),
       interval=st.integers(1, 5))
def test_trajectory_equals_torch(steps, init, growth, backoff, interval):
    args = dict(init_scale=init, growth_factor=growth, backoff_factor=backoff, growth_interval=interval)
    expected = _one_param_loop(torch.amp.GradScaler("cpu", **args), steps)
    ours = _one_param_loop(GradScaler("cpu", **args), steps)
    # torch's, wherever torch's stays at or above the floor; the same rule held at the floor otherwise
    assert ours == _model_trajectory(steps, init, growth, backoff, interval, lo=FLOOR)
    if min(expected) >= FLOOR:
        assert ours == expected
    # The general device-op path (taken with bounds or hysteresis) follows the same rule while no bound binds.
    if min(expected) > 0 and max(expected) < 1e38:
        bounded = GradScaler("cpu", **args, min_scale=min(expected + [init]) / 2, max_scale=max(expected + [init]) * 2)
        assert _one_param_loop(bounded, steps) == expected


def test_default_trajectory_equals_torch_long_run():
    # Defaults (growth_interval 2000) over a few growths and backoffs; also checks the growth tracker.
    rng = np.random.default_rng(0)
    steps = ["inf" if rng.random() < 0.0005 else "ok" for _ in range(4500)]
    steps[:3] = ["inf", "nan", "ok"]
    ours, theirs = GradScaler("cpu"), torch.amp.GradScaler("cpu")
    assert _one_param_loop(ours, steps) == _one_param_loop(theirs, steps)
    assert ours._get_growth_tracker() == theirs._get_growth_tracker()
    assert ours.get_scale() != 2.0**16  # the run did move the scale


# ------------------------------------------------------------------------------------ hysteresis, bounds
@pytest.mark.parametrize("consecutive, steps, expected", [
    # 2 overflows tolerated; a clean step refills when consecutive: never backs off here.
    (True, ["inf", "ok", "inf", "ok", "inf"], [8, 8, 8, 8, 8]),
    # without consecutive refill the second overflow backs off, and every further one until a growth.
    (False, ["inf", "ok", "inf", "ok", "inf"], [8, 8, 4, 4, 2]),
    # consecutive overflows: the 2nd backs off, so does the 3rd (the count is spent until a clean step).
    (True, ["inf", "inf", "inf", "ok", "inf"], [8, 4, 2, 2, 2]),
])
def test_hysteresis_by_hand(consecutive, steps, expected):
    scaler = GradScaler("cpu", init_scale=8.0, growth_interval=100, hysteresis=2, consecutive_hysteresis=consecutive)
    assert _one_param_loop(scaler, steps) == expected


def test_growth_refills_hysteresis_without_consecutive():
    scaler = GradScaler("cpu", init_scale=8.0, growth_interval=2, hysteresis=2, consecutive_hysteresis=False)
    # overflow (count 2->1), 2 clean steps grow to 16 and refill, overflow tolerated again, the next backs off
    assert _one_param_loop(scaler, ["inf", "ok", "ok", "inf", "inf"]) == [8, 8, 16, 16, 8]


def test_bounds_by_hand():
    low = GradScaler("cpu", init_scale=4.0, min_scale=1.0)
    assert _one_param_loop(low, ["inf"] * 4) == [2, 1, 1, 1]
    high = GradScaler("cpu", init_scale=4.0, growth_interval=1, max_scale=16.0)
    assert _one_param_loop(high, ["ok"] * 4) == [8, 16, 16, 16]
    # growth past fp32's range is dropped, as torch drops it (the general path, here taken for min_scale)
    top = dict(init_scale=2.0**127, growth_interval=1)
    expected = _one_param_loop(torch.amp.GradScaler("cpu", **top), ["ok", "inf", "ok", "ok"])
    assert expected == [2.0**127, 2.0**126, 2.0**127, 2.0**127]
    assert _one_param_loop(GradScaler("cpu", **top, min_scale=1.0), ["ok", "inf", "ok", "ok"]) == expected


@pytest.mark.filterwarnings("ignore:mixprec GradScaler:RuntimeWarning")  # stuck at min_scale: expected here
@settings(max_examples=60, deadline=None)
@given(steps=step_kinds, interval=st.integers(1, 4), hysteresis=st.integers(1, 4), consecutive=st.booleans(),
       lo_exp=st.integers(-4, 3), span=st.integers(0, 8), backoff=st.sampled_from([0.5, 0.25, 0.7]),
       growth=st.sampled_from([2.0, 1.5, 4.0]))
def test_hysteresis_and_bounds_match_model(steps, interval, hysteresis, consecutive, lo_exp, span, backoff, growth):
    lo, hi = 2.0**lo_exp, 2.0 ** (lo_exp + span)
    args = dict(init_scale=hi, growth_factor=growth, backoff_factor=backoff, growth_interval=interval)
    scaler = GradScaler("cpu", **args, hysteresis=hysteresis, consecutive_hysteresis=consecutive,
                        min_scale=lo, max_scale=hi)
    expected = _model_trajectory(steps, hi, growth, backoff, interval, hysteresis, consecutive, lo, hi)
    assert _one_param_loop(scaler, steps) == expected


# ------------------------------------------------------------------------------------- end to end, models
def test_fp32_model_sgd_bitwise_equals_torch():
    poison = {1, 4, 5}
    ours_model, torch_model = _fp16_mlp(dtype=torch.float32), _fp16_mlp(dtype=torch.float32)
    runs = []
    for model, scaler in ((ours_model, GradScaler("cpu", growth_interval=3)),
                          (torch_model, torch.amp.GradScaler("cpu", growth_interval=3))):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        scales = []
        for step in range(10):
            opt.zero_grad()
            scaler.scale(_loss(model, step, torch.float32, poison)).backward()
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        runs.append(scales)
    assert runs[0] == runs[1]
    _assert_same_params(ours_model, torch_model, "fp32 SGD")


def test_pure_fp16_model_sgd_matches_torch_primitives():
    """torch's scaler refuses fp16 grads; ours must step them exactly as torch's own kernels would."""
    poison, init, interval = {2, 3}, 2.0**10, 2
    model, ref = _fp16_mlp(), _fp16_mlp()
    with pytest.raises(ValueError, match="FP16 gradients"):  # why this scaler exists
        probe = torch.amp.GradScaler("cpu")
        probe.scale(_loss(ref, 0, torch.float16, set())).backward()
        probe.unscale_(torch.optim.SGD(ref.parameters(), lr=0.1))
    ref.zero_grad()

    scaler = GradScaler("cpu", init_scale=init, growth_interval=interval)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    ref_scale, ref_tracker = torch.tensor(init), torch.tensor(0, dtype=torch.int32)
    skipped = 0
    for step in range(8):
        opt.zero_grad()
        scaler.scale(_loss(model, step, torch.float16, poison)).backward()
        scaler.step(opt)
        scaler.update()

        ref_opt.zero_grad()
        (_loss(ref, step, torch.float16, poison) * ref_scale).backward()
        found = torch.zeros(())
        grads = [p.grad for p in ref.parameters()]
        assert all(g.dtype == torch.float16 for g in grads)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, ref_scale.double().reciprocal().float())
        if found.item() == 0:
            ref_opt.step()
        skipped += int(found.item())
        torch._amp_update_scale_(ref_scale, ref_tracker, found, 2.0, 0.5, interval)

        assert scaler.get_scale() == ref_scale.item(), f"step {step}"
        _assert_same_params(model, ref, f"step {step}")
    assert skipped == len(poison) == scaler.skipped_steps()


def test_pure_fp16_model_fused_adamw_equals_torch():
    """torch's fused AdamW unscales and skips in its kernel: both scalers hand it grad_scale and found_inf."""
    poison = {1, 2, 6}
    model, ref = _fp16_mlp(), _fp16_mlp()
    scaler, ref_scaler = GradScaler("cpu", init_scale=2.0**12, growth_interval=2), torch.amp.GradScaler(
        "cpu", init_scale=2.0**12, growth_interval=2)
    # eps=1e-3: torch keeps fp16 params' Adam state in fp16, where the default 1e-8 is 0 and updates explode
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-3, fused=True)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, eps=1e-3, fused=True)
    assert opt._step_supports_amp_scaling
    for step in range(8):
        for m, s, o in ((model, scaler, opt), (ref, ref_scaler, ref_opt)):
            o.zero_grad()
            s.scale(_loss(m, step, torch.float16, poison)).backward()
        inv = 1.0 / scaler.get_scale()
        expected_norm = torch.sqrt(sum((p.grad.double() * inv).square().sum() for p in model.parameters()))
        scaler.step(opt)
        ref_scaler.step(ref_opt)
        # The norm of the still-scaled grads, brought to the unscaled grads' (the optimizer unscaled them).
        if step not in poison:
            assert scaler.grad_norm(opt).item() == pytest.approx(expected_norm.item(), rel=1e-5)
        else:
            assert not torch.isfinite(scaler.grad_norm(opt))
        scaler.update()
        ref_scaler.update()
        assert scaler.get_scale() == ref_scaler.get_scale(), f"step {step}"
        _assert_same_params(model, ref, f"step {step}")
    assert scaler.skipped_steps() == len(poison)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fused_adamw_after_unscale_and_clip_matches_torch():
    """unscale_ + clip, then the fused optimizer gets grad_scale=None, as with torch's scaler."""
    poison = {2}
    model, ref = _fp16_mlp(dtype=torch.float32), _fp16_mlp(dtype=torch.float32)
    scaler, ref_scaler = GradScaler("cpu", init_scale=2.0**8), torch.amp.GradScaler("cpu", init_scale=2.0**8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    for step in range(5):
        for m, s, o in ((model, scaler, opt), (ref, ref_scaler, ref_opt)):
            o.zero_grad()
            s.scale(_loss(m, step, torch.float32, poison)).backward()
            s.unscale_(o)
        total = scaler.clip_grad_norm_(opt, 0.1)
        ref_total = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
        if step not in poison:
            assert total.item() == pytest.approx(ref_total.item(), rel=1e-5)
        scaler.step(opt)
        ref_scaler.step(ref_opt)
        scaler.update()
        ref_scaler.update()
        assert scaler.get_scale() == ref_scaler.get_scale()
        for p, q in zip(model.parameters(), ref.parameters()):
            # the clip coefficients differ in the last bits (one norm summed in another order)
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


class _RecordingOptimizer(torch.optim.SGD):
    """Says it unscales in its own step, as torch's fused optimizers do, and records what it was handed."""

    _step_supports_amp_scaling = True

    def __init__(self, params):
        super().__init__(params, lr=0.1)
        self.seen = []

    def step(self, closure=None):
        scale = getattr(self, "grad_scale", "absent")
        found = getattr(self, "found_inf", "absent")
        self.seen.append((scale if not isinstance(scale, torch.Tensor) else scale.item(),
                          found if not isinstance(found, torch.Tensor) else found.item()))
        return "stepped"


@pytest.mark.parametrize("call_unscale", [False, True])
def test_step_supports_amp_scaling_contract_matches_torch(call_unscale):
    seen = []
    for scaler in (GradScaler("cpu", init_scale=8.0), torch.amp.GradScaler("cpu", init_scale=8.0)):
        p = torch.nn.Parameter(torch.zeros(2))
        opt = _RecordingOptimizer([p])
        for grad in (1.0, INF):
            scaler.scale(torch.ones(()))
            p.grad = torch.full((2,), grad)
            if call_unscale:
                scaler.unscale_(opt)
            assert scaler.step(opt) == "stepped"  # the optimizer itself decides to skip
            assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
            scaler.update()
        seen.append(opt.seen)
    assert seen[0] == seen[1]
    expected_scale = None if call_unscale else 8.0
    assert seen[0][0] == (expected_scale, 0.0) and seen[0][1][1] == 1.0


def test_deprecated_grad_scaler_kwarg_contract():
    class TakesScaler(torch.optim.SGD):
        _step_supports_amp_scaling = True

        def step(self, closure=None, grad_scaler=None):
            self.got = grad_scaler
            return grad_scaler._check_inf_per_device(self)

    p = torch.nn.Parameter(torch.zeros(2))
    opt = TakesScaler([p], lr=0.1)
    scaler = GradScaler("cpu")
    scaler.scale(torch.ones(()))
    p.grad = torch.full((2,), NAN)
    with pytest.warns(FutureWarning, match="stop passing itself"):
        found = scaler.step(opt)
    assert opt.got is scaler and not hasattr(opt, "grad_scale")
    assert [f.item() for f in found.values()] == [1.0]
    scaler.update()
    assert scaler.get_scale() == 2.0**15


def test_multiple_optimizers_equal_torch():
    def run(scaler):
        p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, dtype=torch.float32))
        o1, o2 = torch.optim.SGD([p], lr=0.1), torch.optim.SGD([q], lr=0.1)
        out = []
        for step in range(6):
            scaler.scale(torch.ones(()))
            p.grad = torch.full((2,), INF if step == 2 else 1.0)
            q.grad = torch.full((2,), NAN if step in (2, 4) else 1.0)
            scaler.step(o1)
            scaler.step(o2)
            scaler.update()
            out.append((scaler.get_scale(), p.tolist(), q.tolist()))
        return out

    assert run(GradScaler("cpu", growth_interval=2)) == run(torch.amp.GradScaler("cpu", growth_interval=2))


def test_sparse_grads_equal_torch():
    def run(scaler, ids):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(10, 3, sparse=True)
        opt = torch.optim.SGD(emb.parameters(), lr=0.1)
        for step in range(3):
            opt.zero_grad()
            scaler.scale(emb(torch.tensor(ids)).sum() * (1e39 if step == 1 else 1.0)).backward()
            if isinstance(scaler, GradScaler):
                scaler.unscale_(opt)
                norm = scaler.grad_norm(opt)
            scaler.step(opt)
            scaler.update()
        return emb.weight.detach(), scaler.get_scale(), norm if isinstance(scaler, GradScaler) else None

    w, s, _ = run(GradScaler("cpu"), [1, 4, 7])
    w_ref, s_ref, _ = run(torch.amp.GradScaler("cpu"), [1, 4, 7])
    assert s == s_ref and torch.equal(w, w_ref)
    # Duplicate indices are coalesced first, so the norm is that of the summed rows: |(2,2,2)|^2 + 2 * |(1,1,1)|^2
    _, _, norm = run(GradScaler("cpu"), [1, 1, 4, 7])
    assert norm.item() == pytest.approx(math.sqrt(12 + 3 + 3))


# ------------------------------------------------------------------------------------- norm and clipping
def _mixed_params():
    g = torch.Generator().manual_seed(3)
    specs = [((7,), torch.float32), ((33, 5), torch.float16), ((0,), torch.float32), ((129,), torch.bfloat16),
             ((4, 4), torch.float16)]
    params = [torch.nn.Parameter(torch.zeros(shape, dtype=dtype)) for shape, dtype in specs]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * 2.0**10).to(p.dtype)  # scaled by 2**10
    params.append(torch.nn.Parameter(torch.zeros(3)))  # no grad: skipped
    return params


@pytest.mark.parametrize("max_norm", [0.05, 1e6])
def test_grad_norm_and_clip_match_torch(max_norm):
    params = _mixed_params()
    opt = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=0.1)
    scaler = GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(torch.ones(()))
    scaler.unscale_(opt)
    unscaled = [p.grad.clone() for p in params if p.grad is not None]
    copies = [torch.nn.Parameter(torch.zeros_like(g, dtype=torch.float32)) for g in unscaled]
    for c, g in zip(copies, unscaled):
        c.grad = g.float()
    expected_total = torch.nn.utils.clip_grad_norm_(copies, max_norm)

    norm = scaler.grad_norm(opt)
    assert norm.dtype == torch.float32 and norm.device == params[0].grad.device and norm.dim() == 0
    assert norm.item() == pytest.approx(expected_total.item(), rel=1e-5)
    assert opt._mixprec_grad_norm_sq.item() == pytest.approx(expected_total.item() ** 2, rel=1e-5)

    total = scaler.clip_grad_norm_(opt, max_norm)
    assert total.item() == pytest.approx(expected_total.item(), rel=1e-5)
    clipped = [p.grad for p in params if p.grad is not None]
    for got, want, before in zip(clipped, copies, unscaled):
        if max_norm > expected_total.item():
            assert torch.equal(got, before)  # coefficient clamped to 1: untouched
        else:
            ulp = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[got.dtype]
            torch.testing.assert_close(got.float(), want.grad.to(got.dtype).float(), rtol=ulp, atol=1e-7)
    # optimizers reading the attribute see the clipped grads' norm
    assert math.sqrt(opt._mixprec_grad_norm_sq.item()) == pytest.approx(min(max_norm, expected_total.item()), rel=1e-4)
    scaler.step(opt)
    scaler.update()
    assert not hasattr(opt, "_mixprec_grad_norm_sq")


def test_norm_and_clip_need_unscale():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = GradScaler("cpu")
    scaler.scale(torch.ones(()))
    p.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="unscale_"):
        scaler.grad_norm(opt)
    with pytest.raises(RuntimeError, match="unscale_"):
        scaler.clip_grad_norm_(opt, 1.0)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="before step"):
        scaler.clip_grad_norm_(opt, 1.0)
    assert scaler.grad_norm(opt).item() == pytest.approx(math.sqrt(2) / 2.0**16)


# --------------------------------------------------------------------------------------------- no sync
def test_no_host_reads_on_the_sync_free_path(monkeypatch):
    """On the CPU nothing is a sync, so instead: no device value is read on the host (item, tolist, bool, float,
    int) by scale, unscale_, grad_norm, clip_grad_norm_, step on a fused optimizer, and update. Those reads are
    what would sync on a GPU."""
    model = _fp16_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-3, fused=True)  # eps: see above
    scaler = GradScaler("cpu", init_scale=2.0**8, hysteresis=2, max_scale=2.0**20, track_overflow=True)
    model[0].bias.requires_grad_(False)  # a param without grad: exercises the per-tensor index path

    def host_read(*args, **kwargs):
        raise AssertionError("a device value was read on the host")

    results = []
    for step in range(4):
        opt.zero_grad()
        loss = _loss(model, step, torch.float16, {2})
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
                m.setattr(torch.Tensor, name, host_read)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            results += [scaler.grad_norm(opt), scaler.clip_grad_norm_(opt, 1.0), opt._mixprec_grad_norm_sq]
            scaler.step(opt)
            scaler.update()
    for t in results:
        assert isinstance(t, torch.Tensor) and t.device == model[0].weight.device and t.dtype == torch.float32
    assert scaler.skipped_steps() == 1


# ----------------------------------------------------------------------------------------- diagnostics
def test_history_ring_buffer_and_skipped_steps():
    scaler = GradScaler("cpu", init_scale=16.0, growth_interval=2, history=4)
    steps = ["ok", "inf", "ok", "ok", "nan", "ok", "inf", "ok", "ok", "ok"]
    before = [16.0] + _one_param_loop(scaler, steps)[:-1]
    expected = [(s, k != "ok") for s, k in zip(before, steps)]
    assert scaler.history() == expected[-4:]
    assert scaler.skipped_steps() == 3
    small = GradScaler("cpu", history=8)
    _one_param_loop(small, ["inf", "ok"])
    assert small.history() == [(2.0**16, True), (2.0**15, False)]


def _three_param_setup():
    named = [(n, torch.nn.Parameter(torch.zeros(4))) for n in ("encoder.w", "decoder.w", "head.b")]
    opt = torch.optim.SGD([p for _, p in named], lr=0.1)
    return named, opt


def _set_grads(named, bad: set, step):
    for name, p in named:
        p.grad = None if (name == "head.b" and step % 2) else torch.ones(4)
        if name in bad:
            p.grad[step % 4] = INF if step % 3 else NAN


def test_overflow_report_tracked_counts_culprits():
    named, opt = _three_param_setup()
    scaler = GradScaler("cpu", track_overflow=True)
    bad_at = {1: {"decoder.w"}, 2: {"decoder.w", "encoder.w"}, 4: {"decoder.w"}}
    for step in range(6):
        scaler.scale(torch.ones(()))
        _set_grads(named, bad_at.get(step, set()), step)
        scaler.step(opt)
        scaler.update()
    report = scaler.overflow_report(named)
    assert report.tracked and report.skipped_steps == 3 and report.steps == 6
    assert {(c.name, c.steps, c.in_last_step) for c in report.culprits} == {("decoder.w", 3, False),
                                                                             ("encoder.w", 1, False)}
    assert "decoder.w" in str(report) and "3 of 6 steps skipped" in str(report)
    unnamed = scaler.overflow_report()
    assert {c.name for c in unnamed.culprits} == {"param_groups[0]['params'][0]", "param_groups[0]['params'][1]"}


def test_overflow_report_untracked_names_current_bad_grads():
    named, opt = _three_param_setup()
    scaler = GradScaler("cpu")
    scaler.scale(torch.ones(()))
    _set_grads(named, {"head.b"}, 0)
    scaler.step(opt)
    scaler.update()
    report = scaler.overflow_report(named)
    assert not report.tracked and [(c.name, c.steps, c.in_last_step) for c in report.culprits] == [
        ("head.b", None, True)]


@pytest.mark.parametrize("overflows, warned", [(3, False), (4, True), (12, True)])
def test_warns_once_when_stuck_at_min_scale(overflows, warned):
    named, opt = _three_param_setup()
    scaler = GradScaler("cpu", init_scale=2.0, min_scale=1.0, min_scale_patience=3, track_overflow=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(overflows):  # the first overflow backs off to 1.0; the rest are taken at min_scale
            scaler.scale(torch.ones(()))
            _set_grads(named, {"encoder.w"}, step)
            scaler.step(opt)
            scaler.update()
    hits = [w for w in caught if "min_scale" in str(w.message)]
    assert len(hits) == int(warned)
    if warned:
        assert "param_groups[0]['params'][0]" in str(hits[0].message)
    assert scaler.get_scale() == 1.0


# ------------------------------------------------------------------------------------------ state dicts
def _continue(scaler, steps):
    return _one_param_loop(scaler, steps)


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_state_dict_cross_loads_with_torch(direction):
    first, then = ["inf", "ok", "ok", "ok", "nan", "ok"], ["ok", "ok", "inf", "ok", "ok", "ok", "ok"]
    make = {"ours": lambda: GradScaler("cpu", growth_interval=3),
            "torch": lambda: torch.amp.GradScaler("cpu", growth_interval=3)}
    src_kind, dst_kind = ("torch", "ours") if direction == "torch_to_ours" else ("ours", "torch")
    src = make[src_kind]()
    _continue(src, first)
    state = src.state_dict()
    assert state["_growth_tracker"] == 1 and state["scale"] == 2.0**15
    for lazy in (True, False):
        dst = make[dst_kind]()
        if not lazy:
            dst.scale(torch.ones(()))
        dst.load_state_dict(state)
        ref = copy.deepcopy(src)
        assert _continue(dst, then) == _continue(ref, then)


def test_state_dict_round_trip_keeps_hysteresis_and_counters():
    args = dict(init_scale=64.0, growth_interval=3, hysteresis=3, consecutive_hysteresis=False, min_scale=2.0,
                max_scale=2.0**10, history=5)
    a = GradScaler("cpu", **args)
    _continue(a, ["inf", "ok", "inf", "inf", "ok"])  # 2 overflows tolerated, the 3rd backs off; count spent
    b = GradScaler("cpu", init_scale=1.0, history=3)  # other settings: load_state_dict brings them
    b.load_state_dict(a.state_dict())
    assert b.history() == a.history()[-3:]  # before and after the device buffer is made
    b.scale(torch.ones(()))
    assert b.history() == a.history()[-3:] == [(64.0, True), (64.0, True), (32.0, False)]
    a_state, b_state = a.state_dict(), b.state_dict()
    assert a_state.pop("_history")[-3:] == b_state.pop("_history") and a_state == b_state
    then = ["inf", "ok", "ok", "ok", "inf", "inf"]
    assert _continue(b, then) == _continue(a, then)
    assert b.skipped_steps() == a.skipped_steps() == 6
    assert b.history() == a.history()[-3:]
    # a torch state dict leaves the history and counters alone; its scale is brought within b's bounds
    with pytest.warns(RuntimeWarning, match=r"state_dict\['scale'\]=65536.0 lies outside .* loaded as 1024"):
        b.load_state_dict(torch.amp.GradScaler("cpu").state_dict())
    assert b.history() == a.history()[-3:] and b.skipped_steps() == 6 and b.get_scale() == 2.0**10


def test_pickle_round_trip():
    a = GradScaler("cpu", growth_interval=2, hysteresis=2, history=3)
    _continue(a, ["inf", "ok", "inf"])
    b = pickle.loads(pickle.dumps(a))
    assert b.state_dict() == a.state_dict() and b.history() == a.history()
    then = ["ok", "ok", "inf", "inf"]
    assert _continue(b, then) == _continue(a, then)
    assert b.history() == a.history()
    a.scale(torch.ones(()))
    p = torch.nn.Parameter(torch.zeros(1))
    p.grad = torch.ones(1)
    a.unscale_(torch.optim.SGD([p], lr=0.1))
    with pytest.raises(RuntimeError, match="pickled"):
        pickle.dumps(a)


def test_load_state_dict_errors():
    scaler = GradScaler("cpu")
    with pytest.raises(RuntimeError, match="empty"):
        scaler.load_state_dict({})
    with pytest.raises(KeyError, match="_growth_tracker"):
        scaler.load_state_dict({"scale": 1.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 3})


# ---------------------------------------------------------------------------------------- scale(outputs)
def test_scale_structures_like_torch():
    Pair = collections.namedtuple("Pair", "a b")
    t = torch.tensor([1.0, 2.0])
    ours, theirs = GradScaler("cpu", init_scale=4.0), torch.amp.GradScaler("cpu", init_scale=4.0)
    for outputs in (t, [t, (t, [t])], (t, t)):
        got, want = ours.scale(outputs), theirs.scale(outputs)
        assert type(got) is type(want)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert isinstance(ours.scale(Pair(t, t)), Pair)
    scaled = ours.scale({"x": t, "y": [t]})
    assert torch.equal(scaled["x"], t * 4) and torch.equal(scaled["y"][0], t * 4)
    lazy = ours.scale(x for x in [t])
    assert torch.equal(next(iter(lazy)), t * 4)
    assert ours.scale(t.half()).dtype == torch.float16
    with pytest.raises(ValueError, match="str"):
        ours.scale(["loss"])
    with pytest.raises(ValueError, match="int"):
        ours.scale(3)


# -------------------------------------------------------------------------------------------- bad input
def test_none_grads_are_skipped():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([a, b], lr=0.5)
    scaler = GradScaler("cpu", init_scale=2.0)
    scaler.scale(torch.ones(()))
    a.grad = torch.full((2,), 2.0)  # scaled by 2: unscaled 1.0
    scaler.step(opt)
    scaler.update()
    assert a.tolist() == [0.5, 0.5] and b.grad is None and b.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("dtype", [torch.int64, torch.float64])
def test_unsupported_grad_dtype_names_the_grad(dtype):
    good, bad = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.zeros(2, dtype=dtype),
                                                                   requires_grad=False)
    bad.grad = torch.zeros(2, dtype=dtype)
    good.grad = torch.ones(2)
    opt = torch.optim.SGD([{"params": [good]}, {"params": [bad]}], lr=0.1)
    scaler = GradScaler("cpu")
    scaler.scale(torch.ones(()))
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['params'\]\[0\]\.grad has dtype"):
        scaler.unscale_(opt)


def test_mixed_devices_name_both_grads():
    cpu = torch.nn.Parameter(torch.ones(2))
    meta = torch.nn.Parameter(torch.empty(2, device="meta"))
    cpu.grad, meta.grad = torch.ones(2), torch.empty(2, device="meta")
    scaler = GradScaler("cpu")
    scaler.scale(torch.ones(()))
    with pytest.raises(ValueError, match=r"\['params'\]\[1\]\.grad is on meta but .*\['params'\]\[0\]\.grad is on cpu"):
        scaler.unscale_(torch.optim.SGD([cpu, meta], lr=0.1))


def test_call_order_errors():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = GradScaler("cpu")
    for call in (lambda: scaler.unscale_(opt), lambda: scaler.step(opt), lambda: scaler.update()):
        with pytest.raises(RuntimeError, match="scaler.scale"):
            call()
    scaler.scale(torch.ones(()))
    with pytest.raises(RuntimeError, match="No inf checks were recorded prior to update"):
        scaler.update()
    p.grad = torch.ones(2)
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="Closure"):
        scaler.step(opt, closure=lambda: None)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="after step"):
        scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="already been called since the last update"):
        scaler.step(opt)


def test_update_new_scale():
    scaler = GradScaler("cpu")
    scaler.scale(torch.ones(()))
    scaler.update(8.0)
    assert scaler.get_scale() == 8.0
    scaler.update(torch.tensor([3.0]))
    assert scaler.get_scale() == 3.0
    with pytest.raises(ValueError, match="new_scale"):
        scaler.update(torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="new_scale"):
        scaler.update("8")


@pytest.mark.parametrize("kwargs, name", [
    (dict(growth_factor=1.0), "growth_factor"), (dict(backoff_factor=1.0), "backoff_factor"),
    (dict(backoff_factor=0.0), "backoff_factor"), (dict(growth_interval=0), "growth_interval"),
    (dict(hysteresis=0), "hysteresis"), (dict(history=0), "history"), (dict(min_scale=-1.0), "min_scale"),
    (dict(init_scale=float("inf")), "init_scale"), (dict(init_scale=None), "init_scale"),
    (dict(min_scale=4.0, max_scale=2.0), "init_scale"),
    (dict(init_scale=1.0, min_scale=2.0), "init_scale"), (dict(min_scale_patience=0), "min_scale_patience"),
])
def test_bad_constructor_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        GradScaler("cpu", **kwargs)


def test_disabled_is_a_pass_through():
    params = _mixed_params()
    opt = torch.optim.SGD(params, lr=0.1)
    scaler = GradScaler("cpu", enabled=False)
    loss = torch.ones(())
    assert scaler.scale(loss) is loss and not scaler.is_enabled()
    before = [None if p.grad is None else p.grad.clone() for p in params]
    scaler.unscale_(opt)
    assert all(b is None or torch.equal(p.grad, b) for p, b in zip(params, before))
    norm = scaler.grad_norm(opt)  # measured from the grads as they are
    expected = torch.sqrt(sum(b.double().square().sum() for b in before if b is not None))
    assert norm.item() == pytest.approx(expected.item(), rel=1e-5)
    assert scaler.clip_grad_norm_(opt, 1.0).item() == pytest.approx(expected.item(), rel=1e-5)
    assert scaler.step(opt, closure=lambda: 7.0) == 7.0  # closures allowed when disabled, as torch
    scaler.update()
    scaler.load_state_dict({"anything": 1})
    assert scaler.get_scale() == 1.0 and scaler.state_dict() == {} and scaler.history() == []
    assert scaler.skipped_steps() == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_cuda_scaler_without_cuda_disables_itself_like_torch():
    with pytest.warns(UserWarning, match="CUDA is not available"):
        scaler = GradScaler()
    assert not scaler.is_enabled()


def test_getters_setters():
    scaler = GradScaler("cpu")
    scaler.set_growth_factor(3.0)
    scaler.set_backoff_factor(0.25)
    scaler.set_growth_interval(7)
    assert (scaler.get_growth_factor(), scaler.get_backoff_factor(), scaler.get_growth_interval()) == (3.0, 0.25, 7)
    with pytest.raises(ValueError, match="new_factor"):
        scaler.set_backoff_factor(2.0)
    assert scaler.get_scale() == 2.0**16  # before the first scale(): the initial value, as torch


# ------------------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
def test_cuda_trajectory_equals_torch_and_no_sync():
    """On a GPU: the same trajectory as torch's CUDA scaler, and no synchronizing call on the sync-free path
    (torch.cuda.set_sync_debug_mode("error") raises on any)."""
    steps = ["ok", "inf", "ok", "ok", "nan", "ok", "ok"]
    ours = _one_param_loop(GradScaler("cuda", growth_interval=2), steps, "cuda")
    assert ours == _one_param_loop(torch.amp.GradScaler("cuda", growth_interval=2), steps, "cuda")

    model = _fp16_mlp().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-3, fused=True)
    scaler = GradScaler("cuda", init_scale=2.0**8, hysteresis=2, min_scale=1.0, track_overflow=True)
    for step in range(4):  # the first step builds cached index tensors and the scale: not checked
        opt.zero_grad()
        x, y = (t.cuda() for t in _batch(step, torch.float16))
        loss = torch.nn.functional.mse_loss(model(x).float(), y) * (1e30 if step == 2 else 1.0)
        torch.cuda.set_sync_debug_mode("error" if step else "default")
        try:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            norm = scaler.clip_grad_norm_(opt, 1.0)
            scaler.step(opt)
            scaler.update()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert norm.is_cuda and norm.dtype == torch.float32
    assert scaler.skipped_steps() == 1



def test_pickle_before_first_scale_keeps_a_loaded_history():
    """A scaler that loaded a state_dict and is pickled before its first scale() keeps the loaded history."""
    source = GradScaler("cpu", init_scale=4.0)
    p = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.1)
    for _ in range(3):
        p.grad = torch.ones(2)
        source.scale(torch.ones(()))
        source.step(opt)
        source.update()
    saved = source.state_dict()
    loaded = GradScaler("cpu")
    loaded.load_state_dict(saved)
    assert pickle.loads(pickle.dumps(loaded)).history() == saved["_history"] == [(4.0, False)] * 3


def test_sum_of_squares_counts_a_repeated_tensor_once():
    """mixprec._grad_norm.sum_of_squares (the optimizers' fallback norm) takes each distinct tensor once: the
    fused op refuses aliased lists, and a tensor listed twice is one gradient."""
    from mixprec import _grad_norm

    g, h = torch.full((4,), 2.0), torch.full((3,), 1.0, dtype=torch.float16)
    norm_sq = _grad_norm.sum_of_squares([g, h, g], torch.device("cpu"))
    assert norm_sq.item() == 4 * 4.0 + 3 * 1.0
    assert g.tolist() == [2.0] * 4  # measured, not changed


# ------------------------------------------------------------------------ overflow of the unscaled grads
_OPTIMIZERS = {
    "torch AdamW (unscale_ pass)": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    "torch fused AdamW (check pass)": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    "mixprec FusedAdamW (check pass)": lambda ps: FusedAdamW(ps, lr=1e-2),
    "mixprec FusedAdamW, bf16 params": lambda ps: FusedAdamW(ps, lr=1e-2),
}


@pytest.mark.parametrize("name", list(_OPTIMIZERS))
@pytest.mark.parametrize("scale, big", [(2.0**-20, 1e33), (FLOOR, 5.0), (0.75, 3e38)])
@pytest.mark.parametrize("call_unscale", [False, True])
def test_finite_grads_that_overflow_when_unscaled_skip_the_step(name, scale, big, call_unscale):
    """A scale below 1: a finite scaled grad whose unscaled value overflows fp32 (big / scale > 3.4e38). The
    step is skipped (weights and optimizer state as they were, all finite), the scale backs off (floored), and the
    next clean step runs. torch's scaler checks the scaled values only and writes inf/NaN into the weights."""
    dtype = torch.bfloat16 if "bf16" in name else torch.float32
    results = {}
    for scaler_type in (GradScaler, torch.amp.GradScaler):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(64).to(dtype))
        opt = _OPTIMIZERS[name]([p])
        scaler = scaler_type("cpu", init_scale=scale)
        # a first clean step, so that the optimizer has state to keep
        scaler.scale(torch.ones(()))
        p.grad = torch.full((64,), 0.5 * scale, dtype=dtype)
        if call_unscale:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        scale_before = scaler.get_scale()
        before = p.detach().clone()
        state_before = copy.deepcopy(opt.state_dict()["state"])
        scaler.scale(torch.ones(()))
        p.grad = torch.full((64,), 0.25 * scale_before, dtype=dtype)
        p.grad[37] = big  # finite, as scaled: big / scale overflows
        assert torch.isfinite(p.grad).all() and not torch.isfinite(p.grad.float() / scale_before).all()
        if call_unscale:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        results[scaler_type] = (p.detach().clone(), before, scaler.get_scale(), scale_before, opt, state_before)
    after, before, new_scale, scale_before, opt, state_before = results[GradScaler]
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(after.view(bits), before.view(bits)), f"{name}: the step ran on grads that overflow unscaled"
    assert torch.isfinite(after).all()
    for key, value in opt.state_dict()["state"][0].items():
        want = state_before[0][key]
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(want)), f"{name}: state {key} changed"
    assert new_scale == max(scale_before * 0.5, FLOOR)
    # torch's scaler stepped on them (the difference is deliberate): its weights or state are not all finite
    t_after, _, t_scale, *_ = results[torch.amp.GradScaler]
    t_state = results[torch.amp.GradScaler][4].state_dict()["state"][0]
    assert not (torch.isfinite(t_after).all() and torch.isfinite(t_state["exp_avg"]).all())
    assert t_scale == scale_before * 2 or t_scale == scale_before  # torch saw no overflow


def test_fp16_grads_that_overflow_fp16_when_unscaled_skip_the_step():
    """unscale_ writes the unscaled grads in their dtype: an fp16 grad of 40000 at a scale of 0.5 is inf once
    written (fp32 holds 80000 fine), and the step is skipped; 30000 (60000 unscaled) steps."""
    results = []
    for big in (30000.0, 40000.0):
        p = torch.nn.Parameter(torch.zeros(20, dtype=torch.float16))
        opt = torch.optim.SGD([p], lr=1e-6)
        scaler = GradScaler("cpu", init_scale=0.5)
        scaler.scale(torch.ones(()))
        p.grad = torch.full((20,), 1.0, dtype=torch.float16)
        p.grad[19] = big  # the scalar tail of the CPU kernel's vector loop
        stepped = scaler.step(opt) is not None or bool(p.detach().ne(0).any())
        scaler.update()
        results.append((stepped, bool(torch.isfinite(p).all()), scaler.get_scale()))
    assert results == [(True, True, 0.5), (False, True, 0.25)]
