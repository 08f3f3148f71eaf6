"""mixprec.amp.GradScaler side by side with torch.amp.GradScaler where libraries lean on torch's scaler: its private
entry points (TransformerEngine's FusedAdam, torch's fused optimizers, subclasses overriding its hooks), its error
types, non-dense and shared gradients; and where torch's scaler breaks (a scale that reaches a subnormal, state
that loads unchecked), what mixprec does instead."""
import math
import pickle
import warnings

import pytest
import torch

from mixprec.amp import GradScaler
from tests.helpers import assert_bitwise_equal

INF, NAN = float("inf"), float("nan")
FLOOR = 2.0**-126  # the scale's floor: float32's smallest normal number


def _both(**kwargs):
    return GradScaler("cpu", **kwargs), torch.amp.GradScaler("cpu", **kwargs)


def _params(seed, shapes=((3, 4), (5,), (2, 2, 2))):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _scaled_grads(params, seed, scale, bad=None):
    """Fresh random grads (times `scale`, as a scaled loss gives), one value of param `bad` set to inf."""
    g = torch.Generator().manual_seed(seed)
    for i, p in enumerate(params):
        p.grad = torch.randn(p.shape, generator=g) * scale
        if i == bad:
            p.grad.view(-1)[0] = INF


# ------------------------------------------------------------------------------------ the class itself
def test_is_a_torch_grad_scaler_and_overrides_every_method():
    """isinstance holds (libraries type-check scalers), and no method of torch's runs on mixprec's state: each one
    torch defines is mixprec's own (torch's would take the unfused path, or miss the hysteresis)."""
    scaler = GradScaler("cpu")
    assert isinstance(scaler, torch.amp.GradScaler)
    torch_methods = {n for n, v in vars(torch.amp.GradScaler).items() if callable(v) and n not in ("__init__",)}
    inherited = sorted(n for n in torch_methods if n not in vars(GradScaler))
    assert not inherited, f"torch.amp.GradScaler methods not overridden: {inherited}"


# ------------------------------------------------------------------------------ private entry points
@pytest.mark.parametrize("inv_shape, found_shape", [((), ()), ((1,), (1,))])
def test_unscale_grads_matches_torch(inv_shape, found_shape):
    """torch's own test scenario (test_grad_scaling_unscale): _unscale_grads_(optimizer, inv_scale, found_inf,
    allow_fp16) on grads with an inf planted in each in turn; the result is {device: flag}, found_inf itself is
    left as it is, and the grads are torch's bit for bit."""
    inv_scale = torch.full(inv_shape, 1 / 3)
    for bad in (None, 0, 1, 2):
        results = []
        for scaler in _both():
            params = _params(0)
            _scaled_grads(params, 1, 1024.0, bad)
            found_inf = torch.zeros(found_shape)
            out = scaler._unscale_grads_(torch.optim.SGD(params, lr=0.1), inv_scale, found_inf, True)
            assert found_inf.tolist() == torch.zeros(found_shape).tolist()
            assert isinstance(out, dict) and list(out) == [torch.device("cpu")]
            results.append((out[torch.device("cpu")], [p.grad for p in params]))
        (ours, our_grads), (theirs, their_grads) = results
        assert ours.shape == theirs.shape and ours.item() == theirs.item() == (0.0 if bad is None else 1.0)
        for a, b in zip(our_grads, their_grads):
            assert_bitwise_equal(a, b, f"inf in grad {bad}")


def test_unscale_grads_allow_fp16_and_no_grads_as_torch():
    for scaler in _both():
        p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))
        p.grad = torch.ones(3, dtype=torch.float16)
        opt = torch.optim.SGD([p], lr=0.1)
        with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients."):
            scaler._unscale_grads_(opt, torch.tensor(0.5), torch.zeros(()), False)
        assert p.grad.tolist() == [1.0] * 3  # refused: nothing written
        assert scaler._unscale_grads_(opt, torch.tensor(0.5), torch.zeros(()), True)[p.device].item() == 0.0
        assert p.grad.tolist() == [0.5] * 3
        q = torch.nn.Parameter(torch.zeros(2))  # no grad: no device, no flag
        assert scaler._unscale_grads_(torch.optim.SGD([q], lr=0.1), torch.tensor(0.5), torch.zeros(()), True) == {}


def test_check_inf_found_inf_and_scale_async_match_torch():
    """What TransformerEngine's FusedAdam and torch's fused optimizers read: _get_scale_async() (None before
    scale()), _check_inf_per_device(optimizer) (grads untouched, {device: flag}), _found_inf_per_device(optimizer)
    (the same tensors)."""
    seen = []
    for scaler in _both(init_scale=256.0):
        assert scaler._get_scale_async() is None
        params = _params(2)
        opt = torch.optim.SGD(params, lr=0.1)
        scaler.scale(torch.ones(()))
        scale = scaler._get_scale_async()
        assert isinstance(scale, torch.Tensor) and scale.dtype == torch.float32 and scale.item() == 256.0
        _scaled_grads(params, 3, 256.0, bad=1)
        before = [p.grad.clone() for p in params]
        found = scaler._check_inf_per_device(opt)
        for p, b in zip(params, before):
            assert_bitwise_equal(p.grad, b, "a check leaves the grads scaled")
        assert scaler._found_inf_per_device(opt) == found
        seen.append({d: f.item() for d, f in found.items()})
    assert seen[0] == seen[1] == {torch.device("cpu"): 1.0}


class _CapturableFusedAdamLike(torch.optim.Optimizer):
    """What TransformerEngine's FusedAdam(capturable=True) does with a scaler: step(grad_scaler=...) checks the
    grads of each param group with grad_scaler._check_inf_per_device(self)[device], unscales them itself by
    1 / grad_scaler._get_scale_async() and skips on the device when the flag is set (SGD stands in for Adam)."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})
        self._step_supports_amp_scaling = True

    def step(self, closure=None, grad_scaler=None):
        for group in self.param_groups:
            device = group["params"][0].device
            found_inf = grad_scaler._check_inf_per_device(self)[device]
            inv_scale = grad_scaler._get_scale_async().double().reciprocal().float()
            keep = (found_inf == 0).float()
            for p in group["params"]:
                if p.grad is not None:
                    p.data.add_(p.grad * inv_scale * keep, alpha=-group["lr"])


def test_transformer_engine_style_optimizer_matches_torch():
    runs = []
    for scaler in _both(init_scale=2.0**10, growth_interval=2):
        params = _params(4)
        opt = _CapturableFusedAdamLike([{"params": params[:2]}, {"params": params[2:]}], lr=0.1)
        scales = []
        for step in range(6):
            scaler.scale(torch.ones(()))
            _scaled_grads(params, 10 + step, scaler.get_scale(), bad=2 if step in (1, 4) else None)
            with pytest.warns(FutureWarning, match="stop passing itself"):
                scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        runs.append((scales, [p.detach().clone() for p in params]))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1]):
        assert_bitwise_equal(a, b, "params after the TransformerEngine-style steps")


def test_per_tensor_counts_count_steps_not_checks():
    """A library checking once per param group (as above) runs several passes in one step: each step is counted
    once per tensor."""
    scaler = GradScaler("cpu", init_scale=2.0**10, track_overflow=True)
    params = _params(4)
    opt = _CapturableFusedAdamLike([{"params": params[:2]}, {"params": params[2:]}], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for step in range(3):
            scaler.scale(torch.ones(()))
            _scaled_grads(params, step, 1.0, bad=2 if step else None)
            scaler.step(opt)
            scaler.update()
    [culprit] = scaler.overflow_report().culprits
    assert culprit.name == "param_groups[1]['params'][0]" and culprit.steps == 2 and culprit.in_last_step


def test_flags_written_into_found_inf_per_device_are_honoured():
    """Training loops all-reduce scaler._found_inf_per_device(opt) themselves (MAX over ranks) between unscale_
    and step: a flag set there skips the step and backs the scale off, as with torch's."""
    results = []
    for scaler in _both(init_scale=8.0):
        p = torch.nn.Parameter(torch.ones(2))
        opt = torch.optim.SGD([p], lr=0.5)
        scaler.scale(torch.ones(()))
        p.grad = torch.full((2,), 8.0)
        scaler.unscale_(opt)
        for flag in scaler._found_inf_per_device(opt).values():
            flag.fill_(1.0)  # another rank overflowed
        assert scaler.step(opt) is None
        scaler.update()
        results.append((p.tolist(), scaler.get_scale()))
    assert results[0] == results[1] == ([1.0, 1.0], 4.0)


def test_overridden_hooks_are_honoured():
    """Subclasses override _unscale_grads_ (fairscale, Lightning: allow fp16) and _maybe_opt_step (lazy-tensor
    backends, Megatron): unscale_ and step go through them, with torch's arguments."""
    def subclass(base):
        class Recording(base):
            calls = []

            def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
                self.calls.append(("_unscale_grads_", type(inv_scale), type(found_inf)))
                return super()._unscale_grads_(optimizer, inv_scale, found_inf, True)

            def _maybe_opt_step(self, optimizer, optimizer_state, *args, **kwargs):
                self.calls.append(("_maybe_opt_step", list(optimizer_state["found_inf_per_device"]), args, kwargs))
                return super()._maybe_opt_step(optimizer, optimizer_state, *args, **kwargs)
        return Recording

    seen = []
    for base in (GradScaler, torch.amp.GradScaler):
        scaler = subclass(base)("cpu", init_scale=2.0)
        p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))
        opt = torch.optim.SGD([p], lr=1.0)
        scaler.scale(torch.ones(()))
        p.grad = torch.full((2,), 2.0, dtype=torch.float16)
        scaler.step(opt)
        scaler.update()
        assert p.tolist() == [-1.0, -1.0]
        seen.append(scaler.calls)
    assert seen[0] == seen[1] == [("_unscale_grads_", torch.Tensor, torch.Tensor),
                                  ("_maybe_opt_step", [torch.device("cpu")], (), {})]


# ------------------------------------------------------------------------------------------ error types
def _raises_like_torch(call, error, match):
    """`call(scaler)` raises `error` matching `match` with both scalers."""
    for scaler in _both():
        with pytest.raises(error, match=match):
            call(scaler)


def test_call_order_errors_have_torch_types():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1)
    # torch raises AssertionError before scale() and without inf checks: mixprec's are also RuntimeErrors
    for call in (lambda s: s.unscale_(opt), lambda s: s.step(opt), lambda s: s.update()):
        _raises_like_torch(call, AssertionError, None)
        with pytest.raises(RuntimeError, match="scaler.scale"):
            call(GradScaler("cpu"))

    def no_grads_step(scaler):
        scaler.scale(torch.ones(()))
        scaler.step(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1))
    _raises_like_torch(no_grads_step, AssertionError, "No inf checks were recorded for this optimizer")

    def no_checks_update(scaler):
        scaler.scale(torch.ones(()))
        scaler.update()
    _raises_like_torch(no_checks_update, AssertionError, "No inf checks were recorded prior to update")

    def unscaled(scaler):
        scaler.scale(torch.ones(()))
        p.grad = torch.ones(2)
        scaler.unscale_(opt)
        return scaler
    _raises_like_torch(lambda s: unscaled(s).unscale_(opt), RuntimeError,
                       r"^unscale_\(\) has already been called on this optimizer since the last update\(\)\.$")
    _raises_like_torch(lambda s: unscaled(s).step(opt, closure=lambda: 0), RuntimeError,
                       "^Closure use is not currently supported if GradScaler is enabled.$")
    _raises_like_torch(lambda s: pickle.dumps(unscaled(s)), AssertionError, "may only be pickled")

    def stepped(scaler):
        unscaled(scaler).step(opt)
        return scaler
    _raises_like_torch(lambda s: stepped(s).unscale_(opt), RuntimeError, r"^unscale_\(\) is being called after step")
    _raises_like_torch(lambda s: stepped(s).step(opt), RuntimeError,
                       r"^step\(\) has already been called since the last update\(\)\.$")


# ---------------------------------------------------------------------------- non-dense, shared grads
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_views_with_gaps_are_unscaled_as_torch(dtype):
    """Grads that are views with gaps (g = base[:, :5], ...) are unscaled, not refused: the same steps and grads
    as torch's scaler, bit for bit, the memory between them untouched."""
    runs = []
    for scaler in _both(init_scale=2.0**12, growth_interval=2):
        params = [torch.nn.Parameter(torch.zeros(s, dtype=dtype)) for s in ((4, 5), (3, 2), (6,))]
        opt = torch.optim.SGD(params, lr=0.25)
        out = []
        for step in range(4):
            scaler.scale(torch.ones(()))
            g = torch.Generator().manual_seed(step)
            bases = [torch.randn(4, 9, generator=g), torch.randn(2, 3, 4, generator=g), torch.randn(18, generator=g)]
            bases = [(b * scaler.get_scale()).to(dtype) for b in bases]
            if step == 2:
                bases[1][1, 1, 1] = NAN  # inside the second view: the step is skipped
            views = [bases[0][:, :5], bases[1][:, :, 1].t(), bases[2][::3]]
            for p, v in zip(params, views):
                assert not v.is_contiguous()
                p.grad = v
            scaler.step(opt)
            scaler.update()
            out.append((scaler.get_scale(), [b.clone() for b in bases], [p.detach().clone() for p in params]))
        runs.append(out)
    for (s0, b0, p0), (s1, b1, p1) in zip(*runs):
        assert s0 == s1
        for a, b in zip(b0 + p0, b1 + p1):
            assert_bitwise_equal(a, b, "grads (with the memory around them) and params")


def test_each_distinct_grad_is_unscaled_once():
    """A param listed twice (torch warns) or params sharing one grad tensor: torch's scaler divides that grad by
    the scale twice; mixprec's unscales each distinct grad once, as if it were listed once."""
    p = torch.nn.Parameter(torch.zeros(3))
    q, r = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    shared = torch.full((3,), 8.0)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        twice = torch.optim.SGD([p, p, q, r], lr=0.1)
    ours, theirs = _both(init_scale=4.0)
    for scaler, wrong in ((ours, False), (theirs, True)):
        scaler.scale(torch.ones(()))
        p.grad, q.grad, r.grad = torch.full((3,), 8.0), shared.clone(), None
        r.grad = q.grad  # q and r share one grad tensor
        scaler.unscale_(twice)
        assert p.grad.tolist() == q.grad.tolist() == ([0.5] * 3 if wrong else [2.0] * 3)
    assert ours.grad_norm(twice).item() == pytest.approx(math.sqrt(2 * 3 * 2.0**2))


# ------------------------------------------------------------------------------------------ scale range
def _clean_step_after_overflows(scaler, overflows):
    """`overflows` steps whose grads hold inf, then one clean step (true grad 1.0, scaled by the scale); the
    weight after it."""
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([p], lr=0.1)
    for step in range(overflows + 1):
        scaler.scale(torch.ones(()))
        p.grad = torch.full((4,), INF) if step < overflows else torch.ones(4) * scaler._get_scale_async()
        scaler.step(opt)
        scaler.update()
    return p.detach()


def test_144_overflows_in_a_row_leave_the_weights_finite():
    """torch's scaler: 2**16 * 0.5**144 = 2**-128, a subnormal whose reciprocal overflows float32, so the next
    clean step multiplies the grads by inf and writes inf into the weight. mixprec's stops at 2**-126."""
    theirs = torch.amp.GradScaler("cpu")
    weight = _clean_step_after_overflows(theirs, 144)
    assert theirs.get_scale() == 2.0**-128 and not torch.isfinite(weight).any()

    ours = GradScaler("cpu")
    weight = _clean_step_after_overflows(ours, 144)
    assert ours.get_scale() == FLOOR  # the clean step does not grow it (growth_interval 2000)
    assert torch.equal(weight, torch.ones(4).add_(torch.ones(4), alpha=-0.1))  # the true grad, unscaled exactly
    history = ours.history()
    assert min(s for s, _ in history) == FLOOR and history[-1] == (FLOOR, False)
    assert ours.skipped_steps() == 144


@pytest.mark.parametrize("read", ["get_scale", "skipped_steps", "overflow_report"])
def test_warns_once_when_stuck_at_the_floor(read):
    """Without min_scale nothing is read per step; the reads the user makes warn, once, after min_scale_patience
    overflowing steps at the floor (here the 3rd, 4th and 5th steps use it)."""
    scaler = GradScaler("cpu", init_scale=2.0**-124)
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1)
    given = []
    for step in range(6):
        scaler.scale(torch.ones(()))
        p.grad = torch.full((2,), NAN)
        scaler.step(opt)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scaler.update()
            getattr(scaler, read)()
        given += [(step, str(w.message)) for w in caught if "the scale's floor" in str(w.message)]
    assert [step for step, _ in given] == [4]
    assert "3 overflowing steps were taken at the scale's floor 1.17549e-38 (2**-126" in given[0][1]
    assert "look for inf/NaN in the loss" in given[0][1]


@pytest.mark.parametrize("kwargs", [{}, {"hysteresis": 2}, {"max_scale": 2.0**100}])
def test_scale_stays_in_float32_normal_range(kwargs):
    """Down: a huge backoff from a tiny scale lands on the floor, not on 0 or a subnormal (on torch's kernel path
    and on the general one). Up: growth past float32's largest value is dropped, as torch drops it."""
    low = GradScaler("cpu", init_scale=2.0**-100, backoff_factor=1e-30, **kwargs)
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1)
    scales = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # stuck at the floor: expected
        for _ in range(6):
            low.scale(torch.ones(()))
            p.grad = torch.full((2,), INF)
            low.step(opt)
            low.update()
            scales.append(low.get_scale())
    assert min(scales) == FLOOR and all(s >= FLOOR for s in scales)
    high_start = min(2.0**127, kwargs.get("max_scale", math.inf))
    high = GradScaler("cpu", init_scale=high_start, growth_factor=4.0, growth_interval=1, **kwargs)
    for _ in range(3):
        high.scale(torch.ones(()))
        p.grad = torch.zeros(2)
        high.step(opt)
        high.update()
        assert high.get_scale() == high_start and math.isfinite(1.0 / high.get_scale())


@pytest.mark.parametrize("init_scale", [1e-40, 2.0**-127, 1e39, 0.0, INF, NAN])
def test_constructor_refuses_scales_outside_float32_normal_range(init_scale):
    with pytest.raises(ValueError, match="init_scale must be a finite number in"):
        GradScaler("cpu", init_scale=init_scale)


# ---------------------------------------------------------------------------- state that loads checked
def _good_state():
    """A state_dict with a 2-entry history, hysteresis 2 and max_scale 2**17."""
    scaler = GradScaler("cpu", hysteresis=2, max_scale=2.0**17)
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1)
    for _ in range(2):
        scaler.scale(torch.ones(()))
        p.grad = torch.ones(2)
        scaler.step(opt)
        scaler.update()
    return scaler.state_dict()


@pytest.mark.parametrize("key, value", [
    ("scale", 0.0), ("scale", INF), ("scale", NAN), ("scale", -2.0), ("scale", 1e-40), ("scale", "65536"),
    ("scale", 2.0**20), ("backoff_factor", 2.0), ("backoff_factor", 0.0), ("growth_factor", 1.0),
    ("growth_factor", NAN), ("growth_interval", 0), ("growth_interval", 2.5), ("growth_interval", True),
    ("_growth_tracker", -1), ("hysteresis", 0), ("_hysteresis_left", 0), ("_hysteresis_left", 3),
    ("consecutive_hysteresis", "yes"), ("min_scale", 0.0), ("max_scale", INF), ("_skipped_steps", -1),
    ("_num_updates", 1), ("_history", [(1.0,)]),
])
def test_load_state_dict_checks_every_entry(key, value):
    """torch's scaler loads the entries it has silently (a scale of 0 or NaN, a backoff_factor of 2, ...);
    mixprec's refuses each bad entry with a ValueError naming it, and loads nothing."""
    good = _good_state()
    bad = {**good, key: value}
    scaler = GradScaler("cpu", init_scale=4.0, growth_interval=7)
    scaler.scale(torch.ones(()))
    if key in ("scale", "backoff_factor", "growth_factor", "growth_interval", "_growth_tracker"):
        torch.amp.GradScaler("cpu").load_state_dict(bad)  # torch's: no error
    with pytest.raises(ValueError, match=rf"state_dict\['{key}'\]"):
        scaler.load_state_dict(bad)
    assert (scaler.get_scale(), scaler.get_growth_interval(), scaler._hysteresis) == (4.0, 7, 1)
    scaler.load_state_dict(good)  # and the good one loads
    assert scaler.get_scale() == 2.0**16 and scaler.get_growth_interval() == 2000


@pytest.mark.parametrize("new_scale", [0.0, -1.0, INF, NAN, 1e-40, 1e39, torch.tensor(0.0), torch.tensor([INF]),
                                       torch.tensor(NAN), 2.0**30])
def test_update_new_scale_is_checked(new_scale):
    scaler = GradScaler("cpu", init_scale=8.0, max_scale=2.0**20)
    scaler.scale(torch.ones(()))
    with pytest.raises(ValueError, match="new_scale"):
        scaler.update(new_scale)
    assert scaler.get_scale() == 8.0
    scaler.update(torch.tensor(16.0))
    scaler.update(32)
    assert scaler.get_scale() == 32.0
