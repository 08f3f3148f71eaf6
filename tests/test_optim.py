"""mixprec.optim.FusedAdam / FusedAdamW against torch.optim.Adam / AdamW, and the optimizer contract."""
import io

import pytest
import torch

from mixprec.optim import FusedAdam, FusedAdamW
from tests.helpers import assert_bitwise_equal, assert_close

PAIRS = [(FusedAdam, torch.optim.Adam), (FusedAdamW, torch.optim.AdamW)]
SHAPES = [(7,), (127, 3), (1000,), (1,)]


def assert_tracks(actual, expected, what):
    """|a - e| <= 1e-6 (|e| + max|e|): 1e-6 relative to the tensor's scale. The fp32 differences from torch are
    rounding flips of the param (torch's CPU sqrt is not correctly rounded, its m update is a lerp), about
    1 ulp of the largest values, which persist as params move; measured over 100 steps they stay below
    0.1e-6 here, as do torch's own fused vs single-tensor differences. A formula error gives ~1e-3."""
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a.detach().float(), e.detach().float(), rtol=1e-6, atol=1e-6 * e.abs().max().item(),
                     what=f"{what} param {i}")


def make_params(dtype=torch.float32, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def feed(params_lists, gen, dtype=None):
    """The same random grad to every list's params, from one fp32 draw rounded to `dtype` when given (so
    that fp32 copies see exactly the half-precision values), then stored in each param's dtype."""
    for group in zip(*params_lists):
        g = torch.randn(group[0].shape, generator=gen)
        if dtype is not None:
            g = g.to(dtype)
        for p in group:
            p.grad = g.to(p.dtype)


@pytest.mark.parametrize("ours, theirs", PAIRS)
@pytest.mark.parametrize("weight_decay, amsgrad, maximize", [(0.0, False, False), (0.1, False, False),
                                                             (0.05, True, False), (0.1, True, True)])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_fp32_matches_torch_over_100_steps(ours, theirs, weight_decay, amsgrad, maximize, backend):
    a, b = make_params(), make_params()
    kw = dict(lr=1e-2, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
    opt_a, opt_b = ours(a, backend=backend, **kw), theirs(b, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(100):
        feed([a, b], gen)
        opt_a.step()
        opt_b.step()
    assert_tracks(a, b, f"{ours.__name__} vs torch")
    assert opt_a.state[a[0]]["step"].item() == 100


def test_fp32_triton_matches_torch():
    a, b = make_params(shapes=[(129,)]), make_params(shapes=[(129,)])
    opt_a, opt_b = FusedAdamW(a, lr=1e-2, amsgrad=True, backend="triton"), torch.optim.AdamW(b, lr=1e-2, amsgrad=True)
    gen = torch.Generator().manual_seed(1)
    for _ in range(30):
        feed([a, b], gen)
        opt_a.step()
        opt_b.step()
    assert_tracks(a, b, "triton vs torch")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ours, theirs", PAIRS)
def test_master_weights_match_torch_on_fp32_copy(dtype, ours, theirs):
    """Half params with fp32 masters: the masters follow torch on an fp32 copy fed the same (half) grads,
    and every model param is its master rounded to nearest even, bit for bit."""
    half = make_params(dtype)
    full = [torch.nn.Parameter(p.detach().float()) for p in half]
    opt_a, opt_b = ours(half, lr=1e-2, weight_decay=0.05), theirs(full, lr=1e-2, weight_decay=0.05)
    gen = torch.Generator().manual_seed(2)
    for _ in range(50):
        feed([half, full], gen, dtype=dtype)  # both see the half-precision grad values
        opt_a.step()
        opt_b.step()
    masters = [opt_a.state[p]["master_param"] for p in half]
    assert_tracks(masters, full, f"{dtype} masters vs torch fp32")
    for p, m in zip(half, masters):
        assert_bitwise_equal(p.detach(), m.to(dtype), "param == master rounded")


def test_mixed_dtypes_in_one_model():
    params = [torch.nn.Parameter(torch.randn(65, dtype=d)) for d in (torch.float16, torch.bfloat16, torch.float32)]
    opt = FusedAdamW(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert "master_param" in opt.state[params[0]] and "master_param" in opt.state[params[1]]
    assert "master_param" not in opt.state[params[2]]
    for p in params[:2]:
        assert_bitwise_equal(p.detach(), opt.state[p]["master_param"].to(p.dtype), "rounded master")


def _train(opt_factory, steps, *, params=None, state=None, seed=3):
    params = params if params is not None else make_params(torch.float16, shapes=[(300,), (5, 7)])
    opt = opt_factory(params)
    if state is not None:
        opt.load_state_dict(state)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        feed([params], gen)
        opt.step()
    return params, opt


def _save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("kwargs", [dict(), dict(amsgrad=True, weight_decay=0.1),
                                    dict(master_weights=False, stochastic_rounding=True, seed=9)])
def test_save_load_resume_is_bit_exact(kwargs):
    dtype = torch.bfloat16 if kwargs.get("stochastic_rounding") else torch.float16
    factory = lambda ps: FusedAdamW(ps, lr=1e-2, **kwargs)  # noqa: E731
    ref_params, _ = _train(factory, 0, params=make_params(dtype, shapes=[(300,), (5, 7)]))
    # uninterrupted: 10 steps with seed 3 then 10 with seed 4
    p_full, o_full = _train(factory, 10, params=ref_params)
    gen = torch.Generator().manual_seed(4)
    for _ in range(10):
        feed([p_full], gen)
        o_full.step()
    # interrupted after 10: save model and optimizer, rebuild both from the saved state, continue
    p_a, o_a = _train(factory, 10, params=make_params(dtype, shapes=[(300,), (5, 7)]))
    saved_params = _save_load([p.detach() for p in p_a])
    saved_opt = _save_load(o_a.state_dict())
    p_b = [torch.nn.Parameter(t.clone()) for t in saved_params]
    _, o_b = _train(factory, 0, params=p_b, state=saved_opt)
    gen = torch.Generator().manual_seed(4)
    for _ in range(10):
        feed([p_b], gen)
        o_b.step()
    for x, y in zip(p_b, p_full):
        assert_bitwise_equal(x.detach(), y.detach(), "resumed param")
    for x, y in zip(p_b, p_full):
        for key, value in o_full.state[y].items():
            assert_bitwise_equal(o_b.state[x][key], value, f"resumed state {key}")


def test_state_dict_has_torch_layout():
    params, opt = _train(lambda ps: FusedAdamW(ps, amsgrad=True), 2)
    ref = make_params(torch.float32, shapes=[(300,), (5, 7)])
    ref_opt = torch.optim.AdamW(ref, amsgrad=True)
    for p in ref:
        p.grad = torch.randn_like(p)
    ref_opt.step()
    ours, theirs = opt.state_dict(), ref_opt.state_dict()
    assert set(ours["state"]) == set(theirs["state"])
    for k in theirs["state"]:
        assert set(ours["state"][k]) == set(theirs["state"][k]) | {"master_param"}
        for key, value in theirs["state"][k].items():
            assert ours["state"][k][key].dtype == value.dtype == torch.float32
            assert ours["state"][k][key].shape == value.shape
    assert set(ours["param_groups"][0]) == set(theirs["param_groups"][0])  # DCP matches keys one by one


def test_torch_adamw_state_loads_and_continues():
    """torch AdamW -> FusedAdamW and FusedAdamW -> torch AdamW: training continues on the same trajectory."""
    gen = torch.Generator().manual_seed(6)
    a = make_params()
    torch_opt = torch.optim.AdamW(a, lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        feed([a], gen)
        torch_opt.step()
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ours = FusedAdamW(b, lr=1e-3)
    ours.load_state_dict(_save_load(torch_opt.state_dict()))
    assert ours.param_groups[0]["lr"] == 1e-2 and ours.param_groups[0]["master_weights"] == "auto"
    c = [torch.nn.Parameter(p.detach().clone()) for p in a]
    back = torch.optim.AdamW(c, lr=1e-3)
    for _ in range(5):
        feed([a, b], gen)
        torch_opt.step()
        ours.step()
    back.load_state_dict(_save_load(ours.state_dict()))
    for p, q in zip(b, c):
        q.data.copy_(p.detach())
    for _ in range(5):
        feed([a, b, c], gen)
        torch_opt.step()
        ours.step()
        back.step()
    assert_tracks(b, a, "FusedAdamW after loading torch state")
    assert_tracks(c, a, "torch AdamW after loading FusedAdamW state")
    assert back.state[c[0]]["step"].item() == 15


def test_half_state_loads_into_torch_adamw_on_fp32_copy():
    half, opt = _train(lambda ps: FusedAdamW(ps, lr=1e-2), 5)
    full = [torch.nn.Parameter(opt.state[p]["master_param"].clone()) for p in half]
    torch_opt = torch.optim.AdamW(full, lr=1e-2)
    torch_opt.load_state_dict(_save_load(opt.state_dict()))  # in memory, torch would share the step tensors
    gen = torch.Generator().manual_seed(8)
    for _ in range(5):
        feed([half, full], gen, dtype=torch.float16)
        opt.step()
        torch_opt.step()
    assert_tracks([opt.state[p]["master_param"] for p in half], full, "masters vs torch after load")


def _scaler_step(opt, params, scaler, grads, scale):
    """What a training loop does: the backward pass leaves scaled grads, then scaler.step and update."""
    for p, g in zip(params, grads):
        p.grad = (g * scale).to(p.dtype)
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize("unscale_first", [False, True])
def test_torch_grad_scaler_contract(unscale_first):
    """torch.amp.GradScaler hands grad_scale / found_inf to the optimizer: the kernel unscales and skips.
    With scaler.unscale_ first (as for clipping) it hands grad_scale=None; torch refuses to unscale fp16
    grads there, so that variant uses bf16 params."""
    dtype = torch.bfloat16 if unscale_first else torch.float16
    params = make_params(dtype, shapes=[(200,), (3, 3)])
    full = [torch.nn.Parameter(p.detach().float()) for p in params]
    opt, ref = FusedAdamW(params, lr=1e-2), torch.optim.AdamW(full, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    gen = torch.Generator().manual_seed(9)
    for step in range(6):
        grads = [torch.randn(p.shape, generator=gen).to(dtype).float() for p in params]
        scaler.scale(torch.ones(()))  # stands for scaler.scale(loss): creates the scale on first use
        scale = scaler.get_scale()
        for p, g in zip(params, grads):
            p.grad = (g * scale).to(dtype)
        if step == 3:
            params[0].grad[5] = float("inf")
            before = {k: v.clone() for k, v in opt.state[params[0]].items()}
            before_params = [p.detach().clone() for p in params]
        if unscale_first:
            scaler.unscale_(opt)
        scaler.step(opt)
        if not unscale_first:  # the contract path: the scaler only checked, the grads are still scaled
            assert torch.equal(params[1].grad, (grads[1] * scale).to(dtype))
        scaler.update()
        assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
        if step == 3:  # skipped: nothing moved, and the scale was halved
            for k, v in before.items():
                assert_bitwise_equal(opt.state[params[0]][k], v, f"skipped step: {k}")
            for p, q in zip(params, before_params):
                assert_bitwise_equal(p.detach(), q, "skipped step: param")
            assert scaler.get_scale() == scale / 2
            continue
        for p, g in zip(full, grads):
            p.grad = g.clone()
        ref.step()
    assert opt.state[params[0]]["step"].item() == 5
    assert_tracks([opt.state[p]["master_param"] for p in params], full, "scaled masters vs torch")


@pytest.mark.parametrize("from_scaler", [False, True])
def test_max_grad_norm_matches_clip_grad_norm(from_scaler):
    a = make_params()
    b = make_params()
    opt_a = FusedAdamW(a, lr=1e-2, max_grad_norm=0.5)
    opt_b = torch.optim.AdamW(b, lr=1e-2)
    gen = torch.Generator().manual_seed(10)
    for _ in range(10):
        feed([a, b], gen)
        if from_scaler:  # what mixprec.amp.GradScaler leaves: the unscaled grads' sum of squares
            opt_a._mixprec_grad_norm_sq = sum((p.grad.double() ** 2).sum() for p in a).float().reshape(1)
        opt_a.step()
        torch.nn.utils.clip_grad_norm_(b, 0.5)
        opt_b.step()
    # clip_grad_norm_ rounds the clipped grads to fp32 before the update, the kernel does not: a few ulps
    # of each grad, well inside the tolerance
    assert_tracks(a, b, "clipped")


def test_optimizer_contract_closure_zero_grad_hooks_groups():
    model = torch.nn.Linear(4, 3)
    opt = FusedAdam(model.parameters(), lr=1e-2)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    x = torch.randn(8, 4)

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and calls == ["pre", "post"]
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()  # no grads: nothing changes
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    extra = torch.nn.Parameter(torch.randn(5, dtype=torch.bfloat16))
    opt.add_param_group({"params": [extra], "lr": 0.1, "weight_decay": 0.0})
    extra.grad = torch.ones_like(extra)
    opt.step()
    assert opt.state[extra]["step"].item() == 1 and "master_param" in opt.state[extra]


def test_lr_schedulers_float_and_tensor_lr():
    for lr in (1e-2, torch.tensor(1e-2)):
        a, b = make_params(shapes=[(50,)]), make_params(shapes=[(50,)])
        opt_a = FusedAdamW(a, lr=lr if isinstance(lr, float) else lr.clone())
        opt_b = torch.optim.AdamW(b, lr=lr if isinstance(lr, float) else lr.clone())
        sched_a = torch.optim.lr_scheduler.OneCycleLR(opt_a, max_lr=0.05, total_steps=20)  # cycles betas too
        sched_b = torch.optim.lr_scheduler.OneCycleLR(opt_b, max_lr=0.05, total_steps=20)
        gen = torch.Generator().manual_seed(11)
        for _ in range(20):
            feed([a, b], gen)
            opt_a.step()
            opt_b.step()
            sched_a.step()
            sched_b.step()
        assert_tracks(a, b, f"OneCycleLR with lr={lr!r}")
    schedulers = torch.optim.lr_scheduler
    for make in (lambda o: schedulers.StepLR(o, 2), lambda o: schedulers.CosineAnnealingLR(o, 5),
                 lambda o: schedulers.LambdaLR(o, lambda s: 0.9 ** s)):
        p = make_params(shapes=[(3,)])
        opt = FusedAdam(p)
        sched = make(opt)
        for _ in range(3):
            p[0].grad = torch.ones(3)
            opt.step()
            sched.step()


def test_stochastic_rounding_tracks_fp32_where_nearest_stalls():
    """Toy problem: pull 4096 bf16 weights from 1.0 towards 1.1 with lr 1e-4. Every update (~1e-4) is below
    half a bf16 ulp at 1.0 (2^-8 = 0.0039), so round-to-nearest bf16 never moves; fp32 moves by ~0.02 in 200
    steps; stochastic rounding moves in expectation like fp32: its mean is within 10% of fp32's progress
    (the mean of 4096 independent roundings has a standard error of ~0.00006 here)."""
    n, steps = 4096, 200
    runs = {}
    for name, dtype, kwargs in [("fp32", torch.float32, {}), ("nearest", torch.bfloat16, dict(master_weights=False)),
                                ("stochastic", torch.bfloat16, dict(master_weights=False, stochastic_rounding=True))]:
        w = torch.nn.Parameter(torch.ones(n, dtype=dtype))
        opt = FusedAdam([w], lr=1e-4, **kwargs)
        for _ in range(steps):
            w.grad = (w.detach().float() - 1.1).to(dtype)
            opt.step()
        runs[name] = w.detach().float().mean().item() - 1.0
    assert runs["nearest"] == 0.0, "round to nearest was expected to stall"
    assert runs["fp32"] > 0.015
    assert abs(runs["stochastic"] - runs["fp32"]) < 0.1 * runs["fp32"], runs


def test_invalid_hyperparameters_raise_value_error():
    p = make_params(shapes=[(2,)])
    # eps=0 is refused (torch accepts it, but then a zero second moment divides by zero)
    for kwargs in (dict(lr=-1.0), dict(betas=(1.0, 0.999)), dict(betas=(0.9, -0.1)), dict(eps=0.0), dict(eps=-1e-8),
                   dict(weight_decay=-0.1), dict(max_grad_norm=0.0), dict(master_weights="yes"),
                   dict(stochastic_rounding=True), dict(lr=torch.tensor([1.0, 2.0]))):
        with pytest.raises(ValueError):
            FusedAdamW(p, **kwargs)
        ctor = {k: v for k, v in kwargs.items() if k in ("lr", "betas", "eps", "weight_decay")}
        if ctor and not isinstance(ctor.get("lr"), torch.Tensor) and ctor.get("eps") != 0.0:
            with pytest.raises(ValueError):  # torch refuses the same values
                torch.optim.AdamW(p, **ctor)


def test_bad_params_and_grads_name_the_parameter():
    with pytest.raises(ValueError, match=r"complex"):
        FusedAdam([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))])
    with pytest.raises(ValueError, match=r"float16; stochastic rounding"):
        FusedAdam([torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))], master_weights=False,
                  stochastic_rounding=True)
    model = torch.nn.Embedding(10, 3, sparse=True)
    opt = FusedAdam(model.named_parameters())
    model(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"parameter 'weight'.*sparse gradient"):
        opt.step()


def test_mixprec_grad_scaler_norm_feeds_clipping(monkeypatch):
    """mixprec.amp.GradScaler: one fused unscale pass gives found_inf and the norm; FusedAdamW clips with that
    norm (no second pass over the grads) and follows torch's clip_grad_norm_ + AdamW on an fp32 copy."""
    from mixprec import optim as mixprec_optim
    from mixprec.amp import GradScaler

    calls = []
    # the optimizer's own pass over the grads, taken when no norm was published (the scaler's pass goes through
    # mixprec.ops.unscale_and_check_ too, so the op itself cannot tell the two apart)
    original = mixprec_optim._grad_norm.sum_of_squares
    monkeypatch.setattr(mixprec_optim._grad_norm, "sum_of_squares",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    dtype = torch.float16
    params = make_params(dtype, shapes=[(200,), (3, 3)])
    full = [torch.nn.Parameter(p.detach().float()) for p in params]
    opt, ref = FusedAdamW(params, lr=1e-2, max_grad_norm=0.5), torch.optim.AdamW(full, lr=1e-2)
    scaler = GradScaler("cpu", init_scale=1024.0)
    gen = torch.Generator().manual_seed(12)
    for step in range(5):
        grads = [torch.randn(p.shape, generator=gen).to(dtype).float() for p in params]
        scaler.scale(torch.ones(()))
        scale = scaler.get_scale()
        for p, g in zip(params, grads):
            p.grad = (g * scale).to(dtype)
        if step == 2:
            params[1].grad[0, 0] = float("nan")
        scaler.step(opt)
        scaler.update()
        if step == 2:
            continue
        for p, g in zip(full, grads):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(full, 0.5)
        ref.step()
    assert calls == [], "the optimizer recomputed a norm the scaler had provided"
    assert opt.state[params[0]]["step"].item() == 4
    assert_tracks([opt.state[p]["master_param"] for p in params], full, "mixprec scaler + clipping")


def test_dense_views_run_on_the_fast_path():
    """A transposed param with autograd's grad layout (its own strides): no staging copies, state laid out like it
    (odd layouts and grads with other strides: tests/test_optim_parity.py)."""
    transposed = torch.nn.Parameter(torch.randn(6, 8).t())  # dense, not contiguous
    assert not transposed.is_contiguous()
    ref = torch.nn.Parameter(transposed.detach().clone())
    opt, torch_opt = FusedAdamW([transposed], lr=1e-2), torch.optim.AdamW([ref], lr=1e-2)
    for _ in range(3):
        g = torch.randn(8, 6)
        transposed.grad = torch.empty_like(transposed).copy_(g)
        ref.grad = g.clone()
        opt.step()
        torch_opt.step()
    assert_tracks([transposed], [ref], "transposed param")
    assert opt.state[transposed]["exp_avg"].stride() == transposed.stride()


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_resized_param_is_refused_on_every_backend(backend):
    """A param resized after its state was made (p.data = bigger tensor) is caught before any backend runs: the
    Triton kernel would otherwise walk the old, smaller state buffers out of bounds."""
    p = torch.nn.Parameter(torch.randn(8, dtype=torch.float16))
    opt = FusedAdamW([p], backend=backend)
    p.grad = torch.randn_like(p)
    opt.step()
    p.data = torch.randn(1000, dtype=torch.float16)
    p.grad = torch.randn_like(p)
    before = [t.clone() for t in (p.detach(), opt.state[p]["exp_avg"], opt.state[p]["master_param"])]
    with pytest.raises(ValueError, match=r"params'\]\[0\] has shape \(1000,\).*'exp_avg' has shape \(8,\).*resized"):
        opt.step()
    for t, b in zip((p.detach(), opt.state[p]["exp_avg"], opt.state[p]["master_param"]), before):
        assert_bitwise_equal(t, b, "nothing written by the refused step")


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_state_replaced_by_hand_is_refused_before_any_write(backend):
    """FusedAdam leaves the per-tensor checks of its own state to the extension's kernels (ops.adam's
    adam_step_of_optimizer_): a state tensor replaced by hand with the wrong layout, dtype or device is still refused
    by name on every backend (the extension's RuntimeError, adam_step_'s own errors on the others), and a tensor on
    the meta device does not turn the step into one that silently writes nothing."""
    replacements = {
        "exp_avg_sq": lambda p: torch.zeros(p.shape[::-1]).t(),  # the param's shape, transposed strides
        "step": lambda p: torch.tensor(1.0, dtype=torch.float64),
        "master_param": lambda p: torch.zeros(p.shape, device="meta"),
    }
    names = {"exp_avg_sq": r"exp_avg_sqs\[0\] must have the shape and strides of params\[0\]",
             "step": r"steps\[0\] must be (torch\.)?float32", "master_param": r"master_params\[0\] is on meta"}
    for key, make in replacements.items():
        p = torch.nn.Parameter(torch.randn(6, 10, dtype=torch.bfloat16))
        p.grad = torch.randn_like(p)
        opt = FusedAdamW([p], backend=backend)
        opt.step()
        opt.state[p][key] = make(p)
        before = [t.clone() for t in (p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])]
        with pytest.raises((RuntimeError, TypeError, ValueError), match=names[key]):
            opt.step()
        for t, b in zip((p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]), before):
            assert_bitwise_equal(t, b, f"nothing written when {key} is refused")
