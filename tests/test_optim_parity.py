"""FusedAdam/W as a drop-in for torch.optim.Adam/AdamW beyond the update itself: copies and pickles, state-dict
hooks, old and torch checkpoints (torch.save and torch.distributed.checkpoint), torch's keyword arguments, odd
layouts, what p.grad holds after a GradScaler step, and the inputs that must be refused clearly."""
import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

from mixprec.optim import FusedAdam, FusedAdamW
from tests.helpers import assert_bitwise_equal
from tests.test_optim import _save_load, assert_tracks, feed, make_params

TORCH_GROUP_KEYS = {"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
                    "differentiable", "fused", "decoupled_weight_decay", "params"}


def _clones(params):
    return [nn.Parameter(p.detach().clone()) for p in params]


def _steps(pairs, n, seed, dtype=None):
    """n steps of every (params, optimizer) pair on the same random grads."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        feed([ps for ps, _ in pairs], gen, dtype)
        for _, opt in pairs:
            opt.step()


def _assert_same_run(a_params, a_opt, b_params, b_opt, what):
    """Params and every state tensor bit for bit."""
    for i, (x, y) in enumerate(zip(a_params, b_params)):
        assert_bitwise_equal(x.detach(), y.detach(), f"{what}: param {i}")
        assert set(a_opt.state[x]) == set(b_opt.state[y]), what
        for key, value in b_opt.state[y].items():
            assert_bitwise_equal(a_opt.state[x][key], value, f"{what}: param {i} state {key}")


# ---- 1. copies and pickles ----

@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_step_like_the_original(how):
    params = make_params(torch.float16, shapes=[(33,), (4, 5)])
    opt = FusedAdamW(params, lr=1e-2, amsgrad=True, max_grad_norm=0.5, unscale_grads=True)
    _steps([(params, opt)], 3, seed=1)
    if how == "deepcopy":
        opt2 = copy.deepcopy(opt)
        params2 = [p for g in opt2.param_groups for p in g["params"]]
    else:
        params2, opt2 = pickle.loads(pickle.dumps((params, opt)))
    assert opt2.max_grad_norm == 0.5 and opt2.unscale_grads is True
    assert all(q is not p for p, q in zip(params, params2))
    _steps([(params, opt), (params2, opt2)], 4, seed=2)
    _assert_same_run(params2, opt2, params, opt, f"{how} copy")


@pytest.mark.parametrize("ours, theirs", [(FusedAdam, torch.optim.Adam), (FusedAdamW, torch.optim.AdamW)])
def test_state_dict_groups_have_exactly_torchs_keys(ours, theirs):
    """What torch.distributed.checkpoint's default planner needs both ways (it matches keys one by one)."""
    for cls in (ours, theirs):
        sd = cls(make_params(shapes=[(2,)])).state_dict()
        assert set(sd["param_groups"][0]) == TORCH_GROUP_KEYS, cls.__name__


def test_rebuilt_from_defaults_is_the_same_optimizer():
    """type(opt)(params, **opt.defaults) (what ZeroRedundancyOptimizer-style wrappers do) gives the same run."""
    for cls in (FusedAdam, FusedAdamW):
        a = make_params(shapes=[(20,)])
        b = _clones(a)
        opt_a = cls(a, lr=3e-2, betas=(0.8, 0.9), weight_decay=0.1, amsgrad=True, max_grad_norm=1.0)
        opt_b = cls(b, **opt_a.defaults)
        _steps([(a, opt_a), (b, opt_b)], 3, seed=3)
        _assert_same_run(a, opt_a, b, opt_b, f"{cls.__name__} rebuilt from defaults")


# ---- 2. hooks ----

@pytest.mark.parametrize("ours, theirs", [(FusedAdamW, torch.optim.AdamW)])
def test_state_dict_and_load_hooks_behave_as_torchs(ours, theirs):
    runs = {}
    for cls in (ours, theirs):
        params = make_params(shapes=[(12,), (3, 4)])
        opt = cls(params, lr=1e-2)
        _steps([(params, opt)], 2, seed=4)
        seen = {}

        def pre(o, sd):  # returns an edited copy: it is what gets loaded
            sd = copy.deepcopy(sd)
            sd["param_groups"][0]["lr"] = 0.125
            sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"] * 2
            return sd

        def post(o):
            seen["lr"] = o.param_groups[0]["lr"]
            seen["exp_avg"] = o.state[params[0]]["exp_avg"].clone()

        def sd_post(o, sd):
            sd["param_groups"][0]["tag"] = "post"
            return sd

        calls = []
        opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))
        opt.register_state_dict_post_hook(sd_post)
        opt.register_load_state_dict_pre_hook(pre)
        opt.register_load_state_dict_post_hook(post)
        sd = opt.state_dict()
        assert calls == ["sd_pre"] and sd["param_groups"][0]["tag"] == "post"
        doubled = sd["state"][0]["exp_avg"].clone() * 2
        opt.load_state_dict(sd)
        assert seen["lr"] == 0.125 and opt.param_groups[0]["lr"] == 0.125
        assert_bitwise_equal(seen["exp_avg"], doubled, f"{cls.__name__}: post hook sees the pre hook's state")
        assert_bitwise_equal(opt.state[params[0]]["exp_avg"], doubled, f"{cls.__name__}: loaded state")
        _steps([(params, opt)], 2, seed=5)
        runs[cls] = params
    assert_tracks(runs[ours], runs[theirs], "after hooked load")


# ---- 3. old state dicts ----

@pytest.mark.parametrize("ours, theirs", [(FusedAdam, torch.optim.Adam), (FusedAdamW, torch.optim.AdamW)])
def test_state_dict_from_an_older_torch_loads_and_steps(ours, theirs):
    src = make_params(shapes=[(15,), (2, 3)])
    src_opt = theirs(src, lr=1e-2, weight_decay=0.1)
    _steps([(src, src_opt)], 3, seed=6)
    old = _save_load(src_opt.state_dict())
    for group in old["param_groups"]:
        for key in ("maximize", "amsgrad", "foreach", "capturable", "differentiable", "fused",
                    "decoupled_weight_decay"):
            group.pop(key, None)
    for state in old["state"].values():
        state["step"] = float(state["step"])  # torch < 1.12 kept the step as a number
    a, b = _clones(src), _clones(src)
    opt_a, opt_b = ours(a, lr=1e-3), theirs(b, lr=1e-3)
    opt_a.load_state_dict(copy.deepcopy(old))
    opt_b.load_state_dict(copy.deepcopy(old))
    assert opt_a.param_groups[0]["amsgrad"] is False
    assert opt_a.param_groups[0]["decoupled_weight_decay"] is (ours is FusedAdamW)
    _steps([(a, opt_a), (b, opt_b)], 4, seed=7)
    assert_tracks(a, b, f"{ours.__name__} from an old state dict")
    assert opt_a.state[a[0]]["step"].item() == 7


# ---- 4. torch's keyword arguments ----

@pytest.mark.parametrize("kwargs", [dict(foreach=False), dict(foreach=True), dict(fused=True), dict(fused=None),
                                    dict(capturable=True), dict(capturable=False, differentiable=False)])
def test_torch_keyword_arguments_are_accepted(kwargs):
    a, b = make_params(shapes=[(30,)]), make_params(shapes=[(30,)])
    # amsgrad positional, as torch allows
    opt_a = FusedAdamW(a, 1e-2, (0.9, 0.99), 1e-8, 0.1, True, **kwargs)
    theirs = {k: v for k, v in kwargs.items() if k != "capturable"}  # torch's capturable=True wants a GPU
    opt_b = torch.optim.AdamW(b, 1e-2, (0.9, 0.99), 1e-8, 0.1, True, **theirs)
    _steps([(a, opt_a), (b, opt_b)], 5, seed=8)
    assert_tracks(a, b, f"AdamW kwargs {kwargs}")
    sd = opt_a.state_dict()
    for key, value in kwargs.items():
        assert sd["param_groups"][0][key] == value


def test_torch_keyword_values_that_cannot_be_honoured_are_refused():
    p = make_params(shapes=[(3,)])
    with pytest.raises(ValueError, match="differentiable"):
        FusedAdamW(p, differentiable=True)
    with pytest.raises(ValueError, match="fused=False"):
        FusedAdamW(p, fused=False)
    with pytest.raises(RuntimeError, match="fused.*foreach"):  # torch's error for the same pair
        FusedAdamW(p, fused=True, foreach=True)
    with pytest.raises(RuntimeError):
        torch.optim.AdamW(p, fused=True, foreach=True)
    with pytest.raises(ValueError, match="decoupled_weight_decay"):
        FusedAdamW(p, decoupled_weight_decay=False)
    with pytest.raises(ValueError, match="both floats or both Tensors"):
        FusedAdamW(p, betas=(torch.tensor(0.9), 0.999))
    with pytest.raises(ValueError, match="capturable"):  # a device tensor beta is read with float(): a sync
        FusedAdamW(p, betas=(torch.tensor(0.9, device="meta"), torch.tensor(0.99, device="meta")), capturable=True)
    with pytest.raises(ValueError, match=r"param_groups\[1\].*master_weights"):
        FusedAdamW([{"params": p}, {"params": make_params(shapes=[(2,)]), "master_weights": "yes"}])
    with pytest.raises(ValueError, match="max_grad_norm.*whole optimizer"):
        FusedAdamW([{"params": p, "max_grad_norm": 1.0}])
    opt = FusedAdamW(p)
    with pytest.raises(ValueError, match=r"param_groups\[1\]: fused=False"):
        opt.add_param_group({"params": make_params(shapes=[(2,)]), "fused": False})
    assert len(opt.param_groups) == 1, "a refused group is not added"


def test_fused_adam_accepts_decoupled_weight_decay_as_torch_adam_does():
    a, b = make_params(shapes=[(25,)]), make_params(shapes=[(25,)])
    opt_a = FusedAdam(a, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)
    opt_b = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1)
    _steps([(a, opt_a), (b, opt_b)], 5, seed=9)
    assert_tracks(a, b, "Adam(decoupled_weight_decay=True) == AdamW")


def test_tensor_lr_and_tensor_betas():
    a, b = make_params(shapes=[(40,), (3, 3)]), make_params(shapes=[(40,), (3, 3)])
    hyper = lambda: dict(lr=torch.tensor(2e-2), betas=(torch.tensor([0.8]), torch.tensor(0.95)))  # noqa: E731
    opt_a, opt_b = FusedAdamW(a, **hyper()), torch.optim.AdamW(b, foreach=False, **hyper())
    _steps([(a, opt_a), (b, opt_b)], 3, seed=10)
    for opt in (opt_a, opt_b):  # changed in place, as a scheduler may
        opt.param_groups[0]["betas"][0].fill_(0.7)
        opt.param_groups[0]["lr"].fill_(5e-3)
    _steps([(a, opt_a), (b, opt_b)], 3, seed=11)
    assert_tracks(a, b, "tensor lr and betas")


# ---- 5. layouts ----

BACKENDS = ["cpu", "triton", "reference"]


def _grad_like(shape, gen, dtype, kind):
    g = torch.randn(shape, generator=gen).to(dtype)
    if kind == "contiguous":
        return g
    if kind == "transposed":  # same values, other strides
        return g.t().contiguous().t() if g.dim() == 2 else g.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    big = torch.zeros(*shape[:-1], shape[-1] * 3, dtype=dtype)  # a view with gaps
    big[..., ::3] = g
    return big[..., ::3]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("param_kind", ["transposed", "permuted", "gappy"])
@pytest.mark.parametrize("grad_kind", ["contiguous", "transposed", "gappy"])
def test_odd_param_and_grad_layouts_step_like_contiguous_ones(backend, dtype, param_kind, grad_kind):
    """The same values in any layout give the same update bit for bit (element-wise math), and a param that is a
    view with gaps leaves the elements between its own untouched."""
    gen = torch.Generator().manual_seed(12)
    shape = (5, 6) if param_kind != "permuted" else (3, 2, 4)
    values = torch.randn(shape, generator=gen).to(dtype)
    if param_kind == "transposed":
        odd = nn.Parameter(values.t().contiguous().t())
    elif param_kind == "permuted":
        odd = nn.Parameter(values.permute(1, 2, 0).contiguous().permute(2, 0, 1))
    else:
        base = torch.randn(*shape[:-1], shape[-1] * 2, generator=gen).to(dtype)
        base[..., ::2] = values
        odd = nn.Parameter(base[..., ::2])  # shares base's storage
        gaps = base[..., 1::2].clone()
    assert torch.equal(odd.detach(), values) and not odd.is_contiguous()
    plain = nn.Parameter(values.clone())
    opt_odd, opt_plain = FusedAdamW([odd], lr=1e-2, backend=backend), FusedAdamW([plain], lr=1e-2, backend=backend)
    for _ in range(3):
        g = _grad_like(shape, gen, dtype, grad_kind)
        odd.grad, plain.grad = g, g.contiguous()
        opt_odd.step()
        opt_plain.step()
    assert_bitwise_equal(odd.detach().contiguous(), plain.detach(), "param")
    for key, value in opt_plain.state[plain].items():
        assert_bitwise_equal(opt_odd.state[odd][key].contiguous(), value, f"state {key}")
    if param_kind == "gappy":
        assert_bitwise_equal(base[..., 1::2], gaps, "elements between the param's own")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_memory_format_change_after_the_first_step(backend, dtype):
    """model.to(memory_format=torch.channels_last) after the state was made: each moment and master stays paired
    with its own element (the state is laid out again like the param), bit for bit as on an unchanged model."""
    torch.manual_seed(13)
    conv = nn.Conv2d(3, 4, 2).to(dtype)
    twin = copy.deepcopy(conv)
    opt, opt_twin = (FusedAdamW(m.parameters(), lr=1e-2, backend=backend) for m in (conv, twin))
    gen = torch.Generator().manual_seed(14)
    for step in range(4):
        if step == 1:
            conv.to(memory_format=torch.channels_last)
            assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
        for p, q in zip(conv.parameters(), twin.parameters()):
            g = torch.randn(p.shape, generator=gen).to(dtype)
            p.grad, q.grad = torch.empty_like(p).copy_(g), g  # autograd gives grads laid out like the param
        opt.step()
        opt_twin.step()
    _assert_same_run(list(conv.parameters()), opt, list(twin.parameters()), opt_twin, "channels_last")
    assert opt.state[conv.weight]["exp_avg"].stride() == conv.weight.stride()


@pytest.mark.parametrize("backend", BACKENDS)
def test_resized_param_is_refused_naming_it_and_nothing_is_written(backend):
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)).half()
    opt = FusedAdamW(model.named_parameters(), backend=backend)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    model[1].weight.data = torch.randn(4, 2, dtype=torch.float16)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = [t.clone() for p in model.parameters() for t in (p.detach(), *opt.state[p].values())]
    with pytest.raises(ValueError, match=r"parameter '1\.weight'.*\(4, 2\).*exp_avg.*\(2, 2\).*resized"):
        opt.step()
    after = [t for p in model.parameters() for t in (p.detach(), *opt.state[p].values())]
    for i, (x, y) in enumerate(zip(after, before)):
        assert_bitwise_equal(x, y, f"tensor {i} untouched by the refused step")


def test_overlapping_and_complex_params_are_refused_clearly():
    """Params whose elements share memory: expanded (stride 0), and rows that overlap without a zero stride (torch's
    own overlap check calls that layout too hard and lets it through); a non-dense layout that does not overlap
    (sizes (2, 3), strides (3, 2)) is accepted."""
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*overlap"):
        FusedAdamW([nn.Parameter(torch.randn(3).expand(4, 3))])
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*overlap.*\(3, 4\).*\(2, 1\)"):
        FusedAdamW([nn.Parameter(torch.randn(20).as_strided((3, 4), (2, 1)))])
    FusedAdamW([nn.Parameter(torch.randn(8).as_strided((2, 3), (3, 2)))])
    with pytest.raises(ValueError, match="complex"):
        FusedAdamW([nn.Parameter(torch.zeros(2, dtype=torch.complex64))])


# ---- 6. torch.distributed.checkpoint ----

def _mlp(dtype, seed=15):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def _train(model, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 6, generator=gen).to(next(model.parameters()).dtype)
        opt.zero_grad()
        model(x).float().square().mean().backward()
        opt.step()


def _dcp_save(model, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)


def _dcp_load(model, opt, path, **planner_kwargs):
    """dcp.load into what get_state_dict gives, then set_state_dict; the default planner unless told."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=path, planner=DefaultLoadPlanner(**planner_kwargs) if planner_kwargs else None)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


dcp_warnings = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@dcp_warnings
@pytest.mark.parametrize("direction", ["torch to mixprec", "mixprec to torch"])
def test_dcp_checkpoint_switches_between_torch_adamw_and_fused_adamw(direction, tmp_path):
    src_cls, dst_cls = (torch.optim.AdamW, FusedAdamW) if direction == "torch to mixprec" else (FusedAdamW,
                                                                                               torch.optim.AdamW)
    src = _mlp(torch.float32)
    src_opt = src_cls(src.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True)
    _train(src, src_opt, 3, seed=16)
    _dcp_save(src, src_opt, tmp_path)
    dst = _mlp(torch.float32, seed=32)  # other weights, another lr
    # amsgrad as in the source: DCP loads the keys the target state dict has (max_exp_avg_sq)
    dst_opt = dst_cls(dst.parameters(), lr=1e-3, amsgrad=True)
    _dcp_load(dst, dst_opt, tmp_path)
    assert dst_opt.param_groups[0]["lr"] == 1e-2 and dst_opt.param_groups[0]["weight_decay"] == 0.1
    _train(src, src_opt, 5, seed=17)
    _train(dst, dst_opt, 5, seed=17)
    assert_tracks(list(dst.parameters()), list(src.parameters()), f"DCP {direction}, continued")
    assert dst_opt.state[dst[0].weight]["step"].item() == 8


@dcp_warnings
def test_dcp_fused_adamw_half_checkpoint_resumes_bit_exact(tmp_path):
    src = _mlp(torch.float16)
    src_opt = FusedAdamW(src.parameters(), lr=1e-2)
    _train(src, src_opt, 3, seed=18)
    _dcp_save(src, src_opt, tmp_path)
    dst = _mlp(torch.float16, seed=31)
    dst_opt = FusedAdamW(dst.parameters(), lr=1e-2)
    _train(dst, dst_opt, 1, seed=99)  # live masters and moments that the load must replace
    _dcp_load(dst, dst_opt, tmp_path)
    _train(src, src_opt, 3, seed=19)
    _train(dst, dst_opt, 3, seed=19)
    _assert_same_run(list(dst.parameters()), dst_opt, list(src.parameters()), src_opt, "DCP half resume")


@dcp_warnings
def test_dcp_torch_checkpoint_of_a_half_model_needs_partial_load_for_masters(tmp_path):
    """A torch checkpoint has no "master_param": the default planner reports the missing key; with
    allow_partial_load=True the masters are made from the loaded params, as load_state_dict does."""
    src = _mlp(torch.float16)
    src_opt = torch.optim.AdamW(src.parameters(), lr=1e-2)
    _train(src, src_opt, 3, seed=20)
    _dcp_save(src, src_opt, tmp_path)
    dst = _mlp(torch.float16, seed=30)
    dst_opt = FusedAdamW(dst.parameters(), lr=1e-3)
    _train(dst, dst_opt, 2, seed=98)  # stale live masters: they must not survive the load
    from torch.distributed.checkpoint.api import CheckpointException

    with pytest.raises(CheckpointException) as refused:
        _dcp_load(dst, dst_opt, tmp_path)
    assert "Missing key in checkpoint state_dict: optim.state.0.weight.master_param" in str(refused.value.failures)
    _dcp_load(dst, dst_opt, tmp_path, allow_partial_load=True)
    ref = _mlp(torch.float16)
    ref.load_state_dict(src.state_dict())
    ref_opt = FusedAdamW(ref.parameters(), lr=1e-3)
    ref_opt.load_state_dict(src_opt.state_dict())
    _train(dst, dst_opt, 3, seed=21)
    _train(ref, ref_opt, 3, seed=21)
    _assert_same_run(list(dst.parameters()), dst_opt, list(ref.parameters()), ref_opt, "partial DCP load")


# ---- 7. p.grad after a GradScaler step ----

def _scaled_step(params, opt, scaler, grads, poison):
    scaler.scale(torch.ones(()))  # stands for scaler.scale(loss)
    scale = scaler.get_scale()
    for p, g in zip(params, grads):
        p.grad = (g * scale).to(p.dtype)
    if poison:
        params[0].grad[1] = float("inf")
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize("scaler_module", ["torch", "mixprec"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unscale_grads_leaves_grads_as_torch_does(scaler_module, dtype):
    """unscale_grads=False (default): p.grad stays scaled after scaler.step (the kernel unscales on the fly).
    unscale_grads=True: p.grad is unscaled as torch's fused AdamW leaves it after a step it takes, and as torch's
    unfused AdamW (GradScaler.unscale_) leaves it after a skipped one (torch's fused AdamW leaves those scaled)."""
    if scaler_module == "torch":
        make_scaler = lambda: torch.amp.GradScaler("cpu", init_scale=1024.0)  # noqa: E731
    else:
        from mixprec.amp import GradScaler

        make_scaler = lambda: GradScaler("cpu", init_scale=1024.0)  # noqa: E731
    shapes = [(20,), (3, 4)]
    runs = {name: make_params(dtype, shapes=shapes) for name in ("scaled", "unscaled", "fused", "unfused")}
    opts = {"scaled": FusedAdamW(runs["scaled"], lr=1e-2), "unscaled": FusedAdamW(runs["unscaled"], lr=1e-2,
                                                                                     unscale_grads=True),
            "fused": torch.optim.AdamW(runs["fused"], lr=1e-2, fused=True),
            "unfused": torch.optim.AdamW(runs["unfused"], lr=1e-2, foreach=False)}
    scalers = {name: (make_scaler() if name in ("scaled", "unscaled") else torch.amp.GradScaler("cpu",
                                                                                               init_scale=1024.0))
               for name in runs}
    gen = torch.Generator().manual_seed(22)
    for step in range(4):
        grads = [torch.randn(s, generator=gen).to(dtype).float() for s in shapes]
        scale = scalers["scaled"].get_scale()
        for name in runs:
            _scaled_step(runs[name], opts[name], scalers[name], grads, poison=step == 2)
        for i in range(len(shapes)):
            expected = (grads[i] * scale).to(dtype)
            if step == 2 and i == 0:
                expected[1] = float("inf")
            assert_bitwise_equal(runs["scaled"][i].grad, expected, f"step {step}: default leaves grads scaled")
            unscaled = runs["unfused" if step == 2 else "fused"][i].grad
            assert_bitwise_equal(runs["unscaled"][i].grad, unscaled, f"step {step}: unscale_grads=True")
            if step == 2:  # what the docstring says of torch's fused AdamW on a skipped step
                assert_bitwise_equal(runs["fused"][i].grad, expected, "torch fused, skipped step")
    if dtype == torch.float32:  # bf16: ours has fp32 masters, torch's updates the bf16 params
        assert_tracks(runs["unscaled"], runs["fused"], "params")


def test_unscale_grads_divides_a_grad_shared_by_two_params_once():
    p, q = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
    opt = FusedAdamW([p, q], unscale_grads=True)
    p.grad = q.grad = torch.full((4,), 8.0)
    opt.grad_scale, opt.found_inf = torch.tensor([4.0]), torch.tensor([0.0])  # what a GradScaler sets
    opt.step()
    assert torch.equal(p.grad, torch.full((4,), 2.0))


# ---- 8. fp16 state through torch.optim.AdamW and back ----

def test_half_state_round_trip_through_torch_adamw_keeps_fp32_state():
    """torch's loader casts every state tensor to the param dtype (fp16 masters and moments); loading that back
    into the FusedAdamW that still holds the fp32 tensors keeps them wherever they round to the loaded values,
    so the round trip is lossless and training continues bit for bit."""
    half = make_params(torch.float16, shapes=[(300,), (5, 7)])
    opt = FusedAdamW(half, lr=1e-2)
    _steps([(half, opt)], 5, seed=23, dtype=torch.float16)
    twin = _clones(half)
    twin_opt = FusedAdamW(twin, lr=1e-2)
    twin_opt.load_state_dict(_save_load(opt.state_dict()))
    torch_opt = torch.optim.AdamW(_clones(half), lr=1e-2)
    torch_opt.load_state_dict(_save_load(opt.state_dict()))
    state = torch_opt.state[torch_opt.param_groups[0]["params"][0]]
    assert state["master_param"].dtype == state["exp_avg_sq"].dtype == torch.float16  # what torch does
    opt.load_state_dict(_save_load(torch_opt.state_dict()))
    _assert_same_run(half, opt, twin, twin_opt, "after the round trip")
    _steps([(half, opt), (twin, twin_opt)], 5, seed=24, dtype=torch.float16)
    _assert_same_run(half, opt, twin, twin_opt, "continued after the round trip")


def test_torch_state_loaded_before_the_model_makes_masters_from_the_loaded_params():
    """Masters missing from a torch state dict come from the params as they are at the next step, so the order
    of model.load_state_dict and optimizer.load_state_dict does not matter, and stale live masters never win."""
    src = make_params(torch.float16, shapes=[(50,), (4, 4)], seed=1)
    src_opt = torch.optim.AdamW(src, lr=1e-2)
    _steps([(src, src_opt)], 3, seed=25)
    weights, torch_sd = [p.detach().clone() for p in src], _save_load(src_opt.state_dict())
    runs = {}
    for order in ("model first", "optimizer first"):
        params = make_params(torch.float16, shapes=[(50,), (4, 4)], seed=2)
        opt = FusedAdamW(params, lr=1e-2)
        _steps([(params, opt)], 2, seed=26)  # live masters of other weights
        if order == "model first":
            for p, w in zip(params, weights):
                p.data.copy_(w)
        opt.load_state_dict(copy.deepcopy(torch_sd))
        if order == "optimizer first":
            for p, w in zip(params, weights):
                p.data.copy_(w)
        _steps([(params, opt)], 3, seed=27)
        runs[order] = (params, opt)
    _assert_same_run(*runs["optimizer first"], *runs["model first"], "load order")
    for p in runs["model first"][0]:
        assert_bitwise_equal(p.detach(), runs["model first"][1].state[p]["master_param"].half(), "param == master")


# ---- 9. shapes at load ----

def test_loaded_state_of_another_shape_is_refused_naming_the_parameter():
    small = [nn.Parameter(torch.randn(4))]
    small_opt = FusedAdamW(small)
    _steps([(small, small_opt)], 1, seed=28)
    big = nn.Parameter(torch.randn(3, 4))
    opt = FusedAdamW([("layer.weight", big)], lr=0.5)
    big.grad = torch.randn_like(big)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[big].items()}
    with pytest.raises(ValueError, match=r"parameter 'layer\.weight'.*exp_avg.*\(4,\).*\(3, 4\)"):
        opt.load_state_dict(small_opt.state_dict())
    assert opt.param_groups[0]["lr"] == 0.5
    for key, value in before.items():
        assert_bitwise_equal(opt.state[big][key], value, f"refused load left {key}")
    bad = opt.state_dict()
    bad["state"][0]["step"] = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match=r"parameter 'layer\.weight'.*step"):
        opt.load_state_dict(bad)


# ---- 10. a param listed twice ----

def test_param_listed_twice_is_refused_naming_both_positions():
    """torch warns and updates such a param twice per step (and will refuse it in future); mixprec refuses."""
    p, q = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.optim.AdamW([p, q, p])
    assert any("duplicate" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[2\].*param_groups\[0\]\['params'\]\[0\]"):
        FusedAdamW([p, q, p])
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\].*param_groups\[0\]\['params'\]\[1\]"):
        FusedAdamW([{"params": [p, q]}, {"params": [q]}])
    with pytest.raises(ValueError, match=r"'b'.*'a'"):
        FusedAdamW([("a", p), ("b", p)])
