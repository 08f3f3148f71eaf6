"""FusedAdam/W's modes of issue #12 (fewer bytes per parameter): master_weights="remainder", state_dtype=bf16 and
"int8", with stochastic rounding; their state, checkpoints, conversions, accounting, and training end to end.

The kernels' math is tested against mixprec.reference in test_adam.py; here the optimizer is: that it builds, keeps,
converts and hands the right tensors to mixprec.ops.adam_step_ (compared with the reference op driven by hand, bit
for bit), and that every mode trains like fp32 masters. Backends: "reference" and "triton" (the interpreter: small
tensors); "cpu" runs a mode once the extension's schema has issue #12's lists (skipped before the C++ lands)."""
import copy

import pytest
import torch
from torch import nn

import mixprec
from mixprec import _grad_norm, reference
from mixprec.optim import INT8_MIN_NUMEL, FusedAdam, FusedAdamW, _mix_seed, step_traffic
from tests.helpers import assert_bitwise_equal
from tests.test_optim import _save_load

BF16 = torch.bfloat16
# the Triton interpreter computes an all-zero int8 block's 1 / scale (inf) and |m| * inf (NaN) in numpy before the
# zero scale selects codes 0, as the spec says; numpy warns about both
pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]
# mode name -> FusedAdamW arguments (bf16 params)
MODES = {
    "master": dict(master_weights=True),
    "master-bf16": dict(master_weights=True, state_dtype=BF16),
    "master-int8": dict(master_weights=True, state_dtype="int8"),
    "remainder": dict(master_weights="remainder"),
    "remainder-bf16": dict(master_weights="remainder", state_dtype=BF16),
    "remainder-int8": dict(master_weights="remainder", state_dtype="int8"),
    "none-bf16": dict(master_weights=False, state_dtype=BF16),
    "sr": dict(master_weights=False, stochastic_rounding=True, seed=5),
    "sr-int8": dict(master_weights=False, stochastic_rounding=True, seed=5, state_dtype="int8"),
}
# int8 needs INT8_MIN_NUMEL elements: the first two are quantized (17 blocks, the last one partial; 4257
# elements stored transposed in one test), the others keep fp32 moments
SHAPES = [(4100,), (33, 129), (7,), (3, 5)]


def make_params(dtype=BF16, shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def clones(params):
    return [nn.Parameter(p.detach().clone()) for p in params]


def feed(param_lists, gen, scale=1.0):
    """The same random grads (times `scale`, as a loss scale leaves them) to each list's params."""
    for group in zip(*param_lists):
        g = torch.randn(group[0].shape, generator=gen) * 0.1 * scale
        for p in group:
            p.grad = g.to(p.dtype)


def trained(kwargs: dict, steps: int, seed: int, params=None):
    """params (make_params() by default) and a FusedAdamW(lr=1e-2, reference backend, **kwargs) `steps` steps in."""
    params = make_params() if params is None else params
    opt = FusedAdamW(params, lr=1e-2, backend="reference", **kwargs)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        feed([params], gen)
        opt.step()
    return params, opt


def assert_same_state(a_params, a_opt, b_params, b_opt, what):
    """Params and every state tensor bit for bit, with the same keys."""
    for i, (x, y) in enumerate(zip(a_params, b_params)):
        assert_bitwise_equal(x.detach(), y.detach(), f"{what}: param {i}")
        assert set(a_opt.state[x]) == set(b_opt.state[y]), f"{what}: param {i} keys"
        for key, value in b_opt.state[y].items():
            assert_bitwise_equal(a_opt.state[x][key], value, f"{what}: param {i} state {key}")


def _bits(t):
    return t.view(torch.int16).to(torch.int32) & 0xFFFF


# ---- the remainder master is the fp32 master ----

OPTIONS = {
    "adamw": (FusedAdamW, dict(weight_decay=0.05)),
    "adam-l2": (FusedAdam, dict(weight_decay=0.1)),
    "maximize-amsgrad": (FusedAdamW, dict(maximize=True, amsgrad=True)),
    "scaled-clipped": (FusedAdamW, dict(max_grad_norm=0.5)),
}


@pytest.mark.parametrize("state_dtype", [torch.float32, BF16, "int8"])
@pytest.mark.parametrize("backend, options", [*((b, o) for b in ("reference", "cpu") for o in OPTIONS),
                                              ("triton", "scaled-clipped")])  # the interpreter is slow
def test_remainder_master_trajectory_is_the_fp32_master_trajectory(backend, options, state_dtype):
    """On the same grads, (param, remainder) is master_weights=True's fp32 master after every step, bit for bit,
    and so are the moments; the param is the master rounded to nearest (ties away from zero)."""
    cls, kwargs = OPTIONS[options]
    if state_dtype == "int8" and kwargs.get("amsgrad"):
        kwargs = {**kwargs, "amsgrad": False}
    a, b = make_params(), make_params()
    masters = cls(a, lr=1e-2, master_weights=True, state_dtype=state_dtype, backend=backend, **kwargs)
    remainders = cls(b, lr=1e-2, master_weights="remainder", state_dtype=state_dtype, backend=backend, **kwargs)
    gen = torch.Generator().manual_seed(1)
    scaled = options == "scaled-clipped"
    for step in range(4 if backend == "triton" else 6):
        feed([a, b], gen, scale=1024.0 if scaled else 1.0)
        for opt in (masters, remainders):
            if scaled:  # the GradScaler contract, by hand: the kernel unscales
                opt.grad_scale, opt.found_inf = torch.tensor([1024.0]), torch.zeros(1)
            opt.step()
        for i, (p, q) in enumerate(zip(a, b)):
            master = masters.master_param(p)
            what = f"{options} step {step} param {i}"
            assert_bitwise_equal(remainders.master_param(q), master, f"{what}: master")
            assert_bitwise_equal(p.detach(), master.to(BF16), f"{what}: fp32-master param = RNE(master)")
            assert_bitwise_equal(q.detach(), reference.remainder_split(master)[0], f"{what}: ties away")
            for key, value in masters.state[p].items():
                if key != "master_param":
                    assert_bitwise_equal(remainders.state[q][key], value, f"{what}: {key}")
    assert "master_param" not in remainders.state[b[0]]
    assert remainders.state[b[0]]["param_remainder"].dtype == torch.int16


def test_params_at_exact_ties_round_away_from_zero():
    """Masters exactly halfway between two bf16 values (low 16 bits 0x8000): master_weights=True writes the even
    neighbour, "remainder" the one away from zero (the only rounding 16 stored bits can undo); the masters are
    the same. The masters are planted through a loaded FusedAdamW state (fp32 master_param), so this also checks
    that loading splits them exactly and reconciles the params with them."""
    gen = torch.Generator().manual_seed(3)
    master = torch.randn(4096, generator=gen)
    bits = master.view(torch.int32)
    tie = torch.arange(4096) % 2 == 0
    master = torch.where(tie, (bits & ~0xFFFF) | 0x8000, bits).view(torch.float32)
    runs = {}
    for mode in (True, "remainder"):
        p = nn.Parameter(master.to(BF16))
        opt = FusedAdamW([p], lr=0.0, weight_decay=0.0, master_weights=mode, backend="reference")
        opt.load_state_dict({"state": {0: {"step": torch.tensor(0.0), "exp_avg": torch.zeros(4096),
                                           "exp_avg_sq": torch.zeros(4096), "master_param": master.clone()}},
                             "param_groups": [{**opt.state_dict()["param_groups"][0]}]})
        p.grad = torch.randn(4096, generator=gen).to(BF16)
        opt.step()  # lr 0: the master stays, the param is written from it
        assert_bitwise_equal(opt.master_param(p), master, f"master_weights={mode!r}")
        runs[mode] = p.detach()
    even, away = _bits(runs[True]), _bits(runs["remainder"])
    hi, lo = (master.view(torch.int32) >> 16) & 0xFFFF, master.view(torch.int32) & 0xFFFF
    assert torch.equal(away, (hi + (lo >= 0x8000).int()) & 0xFFFF)  # nearest on the bit pattern, ties up
    assert torch.equal(even[~tie], away[~tie])
    assert torch.equal(even[tie], torch.where(hi[tie] % 2 == 0, hi[tie], hi[tie] + 1))
    assert (even != away).sum() > 800  # about half of the 2048 ties have an even lower neighbour
    assert (runs["remainder"].float().abs() >= runs[True].float().abs()).all()


# ---- every mode hands the op the right tensors ----

def _by_hand(params, kwargs, steps, gen_seed, *, weight_decay, decoupled, max_grad_norm, scale):
    """The oracle: mixprec.reference.adam_step_ on state lists built here (zeros, masters from the params or
    remainders 0, int8 codes and scales zeros, fp32 moments below INT8_MIN_NUMEL elements), one call per bucket
    of (master kind, state kind) in param order, the clip coefficient from _grad_norm as the optimizer takes it."""
    master_kind = {True: "fp32", "remainder": "remainder", False: "none"}[kwargs["master_weights"]]
    state_dtype = kwargs.get("state_dtype", torch.float32)
    sr_seed = _mix_seed(kwargs["seed"], 0) if kwargs.get("stochastic_rounding") else -1
    buckets: dict = {}  # state kind -> (param indices, the op's lists)
    for i, p in enumerate(params):
        kind = "int8" if state_dtype == "int8" and p.numel() >= INT8_MIN_NUMEL else (
            "bf16" if state_dtype is BF16 else "fp32")
        indices, lists = buckets.setdefault(kind, ([], {k: [] for k in (
            "params", "grads", "exp_avgs", "exp_avg_sqs", "steps", "max_exp_avg_sqs", "master_params",
            "param_remainders", "exp_avg_scales", "exp_avg_sq_scales")}))
        indices.append(i)
        lists["params"].append(p.detach())
        if kind == "int8":
            lists["exp_avgs"].append(torch.zeros(p.shape, dtype=torch.int8))
            lists["exp_avg_sqs"].append(torch.zeros(p.shape, dtype=torch.uint8))
            for key in ("exp_avg_scales", "exp_avg_sq_scales"):
                lists[key].append(torch.zeros(-(-p.numel() // 256)))
        else:
            for key in ("exp_avgs", "exp_avg_sqs"):
                lists[key].append(torch.zeros(p.shape, dtype=BF16 if kind == "bf16" else torch.float32))
        lists["steps"].append(torch.zeros(()))
        if master_kind == "fp32":
            lists["master_params"].append(p.detach().float())
        elif master_kind == "remainder":
            lists["param_remainders"].append(torch.zeros(p.shape, dtype=torch.int16))
    gen = torch.Generator().manual_seed(gen_seed)
    for _ in range(steps):
        feed([params], gen, scale=scale)
        coef = None
        if max_grad_norm is not None:
            norm = _grad_norm.sum_of_squares([p.grad for p in params], torch.device("cpu")).reshape(1).sqrt()
            coef = _grad_norm.clip_coef(norm / scale, max_grad_norm)
        for indices, lists in buckets.values():
            lists["grads"] = [params[i].grad for i in indices]
            reference.adam_step_(**lists, lr=torch.tensor([1e-2]), beta1=0.9, beta2=0.999, eps=1e-8,
                                 weight_decay=weight_decay, decoupled=decoupled, grad_scale=torch.tensor([scale]),
                                 found_inf=torch.zeros(1), clip_coef=coef, sr_seed=sr_seed)
    return buckets


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["reference", "triton", "cpu"])
def test_every_mode_runs_the_op_on_the_state_it_keeps(backend, mode):
    """Four steps of FusedAdam (L2 decay, clipping, a loss scale) in each mode equal the reference op driven by
    hand on lists built independently, bit for bit: params, steps, moments (codes and scales), masters."""
    kwargs = MODES[mode]
    params, oracle = make_params(), make_params()
    opt = FusedAdam(params, lr=1e-2, weight_decay=0.1, max_grad_norm=0.3, backend=backend, **kwargs)
    gen = torch.Generator().manual_seed(7)
    for _ in range(4):
        feed([params], gen, scale=256.0)
        opt.grad_scale, opt.found_inf = torch.tensor([256.0]), torch.zeros(1)
        opt.step()
    buckets = _by_hand(oracle, kwargs, 4, 7, weight_decay=0.1, decoupled=False, max_grad_norm=0.3, scale=256.0)
    for indices, lists in buckets.values():
        for j, (i, q) in enumerate(zip(indices, lists["params"])):
            state, what = opt.state[params[i]], f"{mode}: param {i}"
            assert_bitwise_equal(params[i].detach(), q, what)
            assert_bitwise_equal(state["step"], lists["steps"][j], f"{what} step")
            int8 = bool(lists["exp_avg_scales"])
            for key, name in (("exp_avg_codes" if int8 else "exp_avg", "exp_avgs"),
                              ("exp_avg_sq_codes" if int8 else "exp_avg_sq", "exp_avg_sqs"),
                              ("exp_avg_scales", "exp_avg_scales"), ("exp_avg_sq_scales", "exp_avg_sq_scales"),
                              ("master_param", "master_params"), ("param_remainder", "param_remainders")):
                if lists[name]:
                    assert_bitwise_equal(state[key], lists[name][j], f"{what} {key}")
                else:
                    assert key not in state, f"{what}: unexpected {key}"


def test_int8_state_keys_dtypes_and_the_size_rule():
    """int8 moments for tensors of INT8_MIN_NUMEL (4096) elements or more, as codes + fp32 block scales under their
    own keys; smaller tensors keep torch's fp32 keys."""
    params = make_params(shapes=[(4095,), (4096,), (4100,), (64, 67)])
    opt = FusedAdamW(params, state_dtype="int8", master_weights="remainder", backend="reference")
    feed([params], torch.Generator().manual_seed(0))
    opt.step()
    small = opt.state[params[0]]
    assert set(small) == {"step", "exp_avg", "exp_avg_sq", "param_remainder"}
    assert small["exp_avg"].dtype == small["exp_avg_sq"].dtype == torch.float32
    for p, blocks in zip(params[1:], (16, 17, 17)):
        state = opt.state[p]
        assert set(state) == {"step", "exp_avg_codes", "exp_avg_scales", "exp_avg_sq_codes", "exp_avg_sq_scales",
                              "param_remainder"}
        assert state["exp_avg_codes"].dtype == torch.int8 and state["exp_avg_sq_codes"].dtype == torch.uint8
        assert state["exp_avg_codes"].shape == p.shape and state["exp_avg_scales"].shape == (blocks,)
        assert state["exp_avg_scales"].dtype == torch.float32 and (state["exp_avg_sq_scales"] > 0).all()


# ---- accounting ----

N = 8192  # 32 int8 blocks
# mode -> (state bytes, step traffic) of one bf16 param of N elements (AdamW; the step count 4 B, read + written)
ACCOUNTS = {
    "master": (12 * N + 4, 28 * N + 8),
    "master-bf16": (8 * N + 4, 20 * N + 8),
    "master-int8": (6 * N + 2 * 4 * 32 + 4, 16 * N + 4 * 4 * 32 + 8),
    "remainder": (10 * N + 4, 26 * N + 8),
    "remainder-bf16": (6 * N + 4, 18 * N + 8),
    "remainder-int8": (4 * N + 2 * 4 * 32 + 4, 14 * N + 4 * 4 * 32 + 8),
    "none-bf16": (4 * N + 4, 14 * N + 8),
    "sr": (8 * N + 4, 22 * N + 8),
    "sr-int8": (2 * N + 2 * 4 * 32 + 4, 10 * N + 4 * 4 * 32 + 8),
}


@pytest.mark.parametrize("mode", MODES)
def test_state_bytes_and_step_traffic_match_the_table(mode):
    """state_bytes() and step_traffic() per mode, against the module docstring's table (bytes per param: e.g.
    remainder + int8 stores 4 + 1/32 B of state and moves 14 + 1/16 B)."""
    p = nn.Parameter(torch.randn(N).to(BF16))
    p.grad = torch.randn(N).to(BF16)
    opt = FusedAdamW([p], backend="reference", **MODES[mode])
    stored, moved = ACCOUNTS[mode]
    assert step_traffic(opt) == moved  # from the layout: before the state exists too
    opt.step()
    assert opt.state_bytes() == stored
    assert step_traffic(opt) == moved
    arrays = step_traffic(opt, per_array=True)
    assert sum(r + w for r, w in arrays) == moved
    assert all(r == w or r == 0 or w == 0 for r, w in arrays)  # in place, read-only or write-only
    p.grad = None
    assert step_traffic(opt) == 0  # step() skips a param without a grad


def test_traffic_of_mixed_dtypes_amsgrad_and_fp32_params():
    fp32, fp16 = nn.Parameter(torch.randn(100)), nn.Parameter(torch.randn(100).half())
    for p in (fp32, fp16):
        p.grad = torch.randn_like(p)
    opt = FusedAdamW([fp32, fp16], amsgrad=True, state_dtype=BF16, backend="reference")
    # fp32: grad 4, param 4+4, m, v, vmax 2+2 each; fp16 with a master: grad 2, param written 2, master 4+4, ...
    assert step_traffic(opt) == 100 * (4 + 8 + 12) + 8 + 100 * (2 + 2 + 8 + 12) + 8
    opt.step()
    assert opt.state_bytes() == 100 * 6 + 4 + 100 * (4 + 6) + 4


# ---- checkpoints ----

@pytest.mark.parametrize("mode", [*MODES, "remainder-bf16-amsgrad"])
def test_checkpoint_resumes_bit_exact(mode):
    """torch.save / torch.load(weights_only=True) of state_dict() into a fresh optimizer: training continues bit
    for bit; the state dict holds the optimizer's own tensors (int8 codes, int16 remainders)."""
    kwargs = {**MODES["remainder-bf16"], "amsgrad": True} if mode.endswith("amsgrad") else MODES[mode]
    params, opt = trained(kwargs, 3, seed=11)
    gen = torch.Generator().manual_seed(99)
    saved = _save_load(opt.state_dict())
    assert {k: v.dtype for k, v in saved["state"][0].items()} == {k: v.dtype for k, v in opt.state[params[0]].items()}
    twin = clones(params)
    twin_opt = FusedAdamW(twin, lr=1e-2, backend="reference", **kwargs)
    twin_opt.load_state_dict(saved)
    assert_same_state(twin, twin_opt, params, opt, f"{mode} loaded")
    for _ in range(3):
        feed([params, twin], gen)
        opt.step()
        twin_opt.step()
    assert_same_state(twin, twin_opt, params, opt, f"{mode} resumed")


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_the_mode_and_step_alike(how):
    import pickle

    params, opt = trained(MODES["remainder-int8"], 2, seed=21)
    if how == "deepcopy":
        opt2 = copy.deepcopy(opt)
        params2 = opt2.param_groups[0]["params"]
    else:
        params2, opt2 = pickle.loads(pickle.dumps((params, opt)))
    assert opt2.defaults["state_dtype"] == "int8" and opt2.param_groups[0]["master_weights"] == "remainder"
    gen = torch.Generator().manual_seed(22)
    for _ in range(2):
        feed([params, params2], gen)
        opt.step()
        opt2.step()
    assert_same_state(params2, opt2, params, opt, how)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("mode", ["remainder-int8", "master-bf16"])
def test_dcp_checkpoint_resumes_bit_exact(mode, tmp_path):
    """torch.distributed.checkpoint (get_state_dict / dcp.save / dcp.load / set_state_dict) of a model whose
    first layer has int8 moments: training resumes bit for bit."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def mlp(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, 80), nn.Tanh(), nn.Linear(80, 3)).to(BF16)  # 5120 weights: int8

    def train(model, opt, steps, seed):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            opt.zero_grad()
            model(torch.randn(8, 64, generator=gen).to(BF16)).float().square().mean().backward()
            opt.step()

    src, dst = mlp(0), mlp(1)
    src_opt, dst_opt = (FusedAdamW(m.parameters(), lr=1e-2, backend="reference", **MODES[mode]) for m in (src, dst))
    train(src, src_opt, 3, seed=23)
    train(dst, dst_opt, 1, seed=24)  # live state that the load must replace
    msd, osd = get_state_dict(src, src_opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp_path)
    msd, osd = get_state_dict(dst, dst_opt)
    loaded = {"model": msd, "optim": osd}
    dcp.load(loaded, checkpoint_id=tmp_path)
    set_state_dict(dst, dst_opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    train(src, src_opt, 2, seed=25)
    train(dst, dst_opt, 2, seed=25)
    assert "exp_avg_codes" in dst_opt.state[dst[0].weight] or mode != "remainder-int8"
    assert_same_state(list(dst.parameters()), dst_opt, list(src.parameters()), src_opt, f"DCP {mode}")


def _trained_torch_adamw(steps=3):
    """torch.optim.AdamW on fp32 params (the masters), a few steps in."""
    full = make_params(torch.float32)
    opt = torch.optim.AdamW(full, lr=1e-2)
    gen = torch.Generator().manual_seed(12)
    for _ in range(steps):
        feed([full], gen)
        opt.step()
    return full, opt


@pytest.mark.parametrize("mode", MODES)
def test_torch_adamw_state_dict_loads_into_every_layout(mode):
    """A torch.optim.AdamW (fp32) state dict: moments quantize_blockwise'd / rounded to bf16, masters from the
    params (remainders 0); the step counts kept."""
    kwargs = MODES[mode]
    full, torch_opt = _trained_torch_adamw()
    params = [nn.Parameter(p.detach().to(BF16)) for p in full]
    opt = FusedAdamW(params, lr=1e-2, backend="reference", **kwargs)
    opt.load_state_dict(_save_load(torch_opt.state_dict()))
    for p, q in zip(params, full):
        theirs, ours = torch_opt.state[q], opt.state[p]
        assert ours["step"].item() == 3
        if "exp_avg_codes" in ours:
            for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
                codes, scales = reference.quantize_blockwise(theirs[key], signed=signed)
                assert_bitwise_equal(ours[f"{key}_codes"], codes, key)
                assert_bitwise_equal(ours[f"{key}_scales"], scales, key)
        else:
            dtype = BF16 if kwargs.get("state_dtype") is BF16 else torch.float32
            for key in ("exp_avg", "exp_avg_sq"):
                assert_bitwise_equal(ours[key], theirs[key].to(dtype), key)
        assert_bitwise_equal(opt.master_param(p), p.detach().float(), "master = param")
        if kwargs["master_weights"] == "remainder":
            assert not ours["param_remainder"].any()
    feed([params], torch.Generator().manual_seed(0))
    opt.step()
    assert opt.state[params[0]]["step"].item() == 4


CONVERSIONS = [("master", "remainder-int8"), ("remainder-int8", "master"), ("remainder", "master-bf16"),
               ("master-int8", "remainder-bf16"), ("sr-int8", "remainder")]


@pytest.mark.parametrize("src_mode, dst_mode", CONVERSIONS)
@pytest.mark.parametrize("order", ["model first", "optimizer first"])
def test_state_dict_of_another_layout_converts(src_mode, dst_mode, order):
    """A FusedAdamW state dict of one mode into a FusedAdamW of another: the fp32 masters carry over exactly
    (remainder_split / remainder_join, reconciled with the params at the first step, whichever is loaded first);
    moments are the source's fp32 values stored in the new layout."""
    src, src_opt = trained(MODES[src_mode], 3, seed=13)
    gen = torch.Generator().manual_seed(99)
    masters = [src_opt.master_param(p) for p in src]
    saved = _save_load(src_opt.state_dict())
    dst = make_params(seed=1)
    dst_opt = FusedAdamW(dst, lr=1e-2, backend="reference", **MODES[dst_mode])
    feed([dst], gen)
    dst_opt.step()  # live state of other weights, which the load must replace
    if order == "model first":
        for p, q in zip(dst, src):
            p.data.copy_(q.detach())
    dst_opt.load_state_dict(saved)
    if order == "optimizer first":
        for p, q in zip(dst, src):
            p.data.copy_(q.detach())
    for i, (p, q) in enumerate(zip(dst, src)):
        assert_bitwise_equal(dst_opt.master_param(p), masters[i], f"param {i} master before the step")
        ours, theirs = dst_opt.state[p], src_opt.state[q]
        for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            value = (reference.dequantize_blockwise(theirs[f"{key}_codes"], theirs[f"{key}_scales"])
                     if f"{key}_codes" in theirs else theirs[key].float())
            if f"{key}_codes" in ours:
                codes, scales = reference.quantize_blockwise(value, signed=signed)
                assert_bitwise_equal(ours[f"{key}_codes"], codes, f"param {i} {key}")
                assert_bitwise_equal(ours[f"{key}_scales"], scales, f"param {i} {key}")
            else:
                assert_bitwise_equal(ours[key].float(), value.to(ours[key].dtype).float(), f"param {i} {key}")
    zero = [torch.zeros_like(p) for p in dst]
    for p, z in zip(dst, zero):
        p.grad = z
    dst_opt.param_groups[0]["lr"] = 0.0
    dst_opt.step()  # lr 0: writes what the step started from
    for i, p in enumerate(dst):
        assert_bitwise_equal(dst_opt.master_param(p), masters[i], f"param {i} master after the first step")


@pytest.mark.parametrize("mode", ["master", "remainder"])
def test_loaded_masters_never_override_other_loaded_params(mode):
    """fp32 masters loaded, then model weights that differ from them in places (another checkpoint, or the model
    loaded after the optimizer): where a master does not round to its param, the param wins (its master is the
    param: remainder 0), elsewhere the master is kept exactly -- for remainders as for fp32 masters."""
    src, src_opt = trained(MODES["master"], 2, seed=20)
    masters = [src_opt.master_param(p) for p in src]
    dst = make_params(seed=2)
    opt = FusedAdamW(dst, backend="reference", **MODES[mode])
    opt.load_state_dict(_save_load(src_opt.state_dict()))
    opt.param_groups[0]["lr"] = 0.0  # (the loaded group's lr is 1e-2): the step writes what it starts from
    for p, q in zip(dst, src):  # the loaded weights: the source's in every other element
        mixed = torch.where(torch.arange(p.numel()).reshape(p.shape) % 2 == 0, q.detach(), p.detach())
        p.data.copy_(mixed)
    for p in dst:
        p.grad = torch.zeros_like(p)
    opt.step()
    for i, (p, m) in enumerate(zip(dst, masters)):
        rounds = (m.to(BF16) == p.detach()) | (reference.remainder_split(m)[0] == p.detach())
        assert rounds.float().mean() < 0.75  # the other weights were not the masters' roundings
        assert_bitwise_equal(opt.master_param(p), torch.where(rounds, m, p.detach().float()), f"param {i}")


def test_int8_state_saved_from_another_memory_order_is_requantized():
    """A checkpoint of a channels_last model loaded into a contiguous one: its int8 blocks are runs of the other
    memory order, so the moments are dequantized with their own scales and quantized again in the new layout."""
    src, dst = nn.Conv2d(32, 16, 3).to(BF16), nn.Conv2d(32, 16, 3).to(BF16)
    src.to(memory_format=torch.channels_last)
    src_opt = FusedAdamW(src.parameters(), backend="reference", state_dtype="int8")
    for p in src.parameters():
        p.grad = torch.empty_like(p).copy_(torch.randn(p.shape))
    src_opt.step()
    dst_opt = FusedAdamW(dst.parameters(), backend="reference", state_dtype="int8")
    dst_opt.load_state_dict(_save_load(src_opt.state_dict()))
    theirs, ours = src_opt.state[src.weight], dst_opt.state[dst.weight]
    assert ours["exp_avg_codes"].is_contiguous() and not theirs["exp_avg_codes"].is_contiguous()
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        value = reference.dequantize_blockwise(theirs[f"{key}_codes"], theirs[f"{key}_scales"]).contiguous()
        codes, scales = reference.quantize_blockwise(value, signed=signed)
        assert_bitwise_equal(ours[f"{key}_codes"], codes, key)
        assert_bitwise_equal(ours[f"{key}_scales"], scales, key)


def test_round_trip_through_torch_adamw_keeps_remainders_and_int8_state():
    """torch.optim.AdamW casts every state tensor to the param's dtype (int16 remainders, codes and fp32 scales
    to bf16, lossy for remainders and scales); loading its state dict back into the optimizer that still holds
    the originals keeps them wherever they round to the loaded values: lossless, training continues bit for bit."""
    params, opt = trained(MODES["remainder-int8"], 3, seed=14)
    gen = torch.Generator().manual_seed(99)
    twin = clones(params)
    twin_opt = FusedAdamW(twin, lr=1e-2, backend="reference", **MODES["remainder-int8"])
    twin_opt.load_state_dict(_save_load(opt.state_dict()))
    torch_opt = torch.optim.AdamW(clones(params), lr=1e-2)
    torch_opt.load_state_dict(_save_load(opt.state_dict()))
    cast = torch_opt.state[torch_opt.param_groups[0]["params"][0]]
    assert cast["param_remainder"].dtype == cast["exp_avg_scales"].dtype == BF16  # what torch does
    opt.load_state_dict(_save_load(torch_opt.state_dict()))
    assert_same_state(params, opt, twin, twin_opt, "after the round trip")
    for _ in range(2):
        feed([params, twin], gen)
        opt.step()
        twin_opt.step()
    assert_same_state(params, opt, twin, twin_opt, "continued")


@pytest.mark.parametrize("mode", ["master", "remainder-int8", "master-bf16", "sr-int8"])
def test_torch_state_dict_exports_torch_adamw_layout(mode):
    """torch_state_dict(): fp32 moments (dequantized), torch's keys only (masters on request), loadable by
    torch.optim.AdamW; torch then continues from the fp32 masters like the fused step."""
    params, opt = trained(MODES[mode], 3, seed=15)
    exported = _save_load(opt.torch_state_dict(master_params=True))
    for i, p in enumerate(params):
        state, held = exported["state"][i], opt.state[p]
        has_master = MODES[mode]["master_weights"] is not False
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"} | ({"master_param"} if has_master else set())
        for key in ("exp_avg", "exp_avg_sq"):
            expected = (reference.dequantize_blockwise(held[f"{key}_codes"], held[f"{key}_scales"])
                        if f"{key}_codes" in held else held[key].float())
            assert_bitwise_equal(state[key], expected, f"param {i} {key}")
        if has_master:
            assert_bitwise_equal(state["master_param"], opt.master_param(p), f"param {i} master")
    assert set(opt.torch_state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    full = [nn.Parameter(opt.master_param(p)) for p in params]
    torch_opt = torch.optim.AdamW(full, lr=1e-2)
    torch_opt.load_state_dict(opt.torch_state_dict())
    assert torch_opt.state[full[0]]["exp_avg"].dtype == torch.float32
    feed([full], torch.Generator().manual_seed(16))
    torch_opt.step()  # runs on the exported state
    assert torch_opt.state[full[0]]["step"].item() == 4


def test_torch_adamw_refuses_int8_state_loudly():
    """An int8 state dict has no "exp_avg": torch.optim.AdamW fails at its first step instead of reading codes
    as moments."""
    params = make_params()
    opt = FusedAdamW(params, backend="reference", state_dtype="int8")
    feed([params], torch.Generator().manual_seed(0))
    opt.step()
    torch_params = clones(params)
    torch_opt = torch.optim.AdamW(torch_params)
    torch_opt.load_state_dict(_save_load(opt.state_dict()))
    feed([torch_params], torch.Generator().manual_seed(1))
    with pytest.raises(KeyError, match="exp_avg"):
        torch_opt.step()


# ---- master_param ----

def test_master_param_is_an_exact_copy_in_every_kind():
    bf16, fp32, fp16 = nn.Parameter(torch.randn(50).to(BF16)), nn.Parameter(torch.randn(5)), nn.Parameter(
        torch.randn(6).half())
    opt = FusedAdamW([{"params": [bf16, fp32], "master_weights": "remainder"},
                      {"params": [fp16], "master_weights": True}], lr=1e-2, backend="reference")
    for p in (bf16, fp32, fp16):  # before the first step: the param widened
        assert_bitwise_equal(opt.master_param(p), p.detach().float(), "before the first step")
    for p in (bf16, fp32, fp16):
        p.grad = torch.randn_like(p)
    opt.step()
    state = opt.state[bf16]
    assert_bitwise_equal(opt.master_param(bf16), reference.remainder_join(bf16.detach(), state["param_remainder"]),
                         "remainder")
    assert_bitwise_equal(opt.master_param(fp16), opt.state[fp16]["master_param"], "fp32 master")
    assert_bitwise_equal(opt.master_param(fp32), fp32.detach(), "fp32 param")
    copy_ = opt.master_param(fp16)
    copy_.zero_()
    assert opt.state[fp16]["master_param"].abs().sum() > 0, "master_param returns a copy"
    assert opt.master_param(fp32) is not fp32
    with pytest.raises(ValueError, match="not one of this optimizer's parameters"):
        opt.master_param(torch.zeros(3))


# ---- training end to end ----

def _mlp(dtype, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 10)).to(dtype)  # 4096 + 1280 weights


def _train(model, opt, scaler, steps, *, poison_at=None):
    """Cross-entropy on a fixed random problem; returns the losses."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=gen)
    y = (x[:, :10] * torch.arange(1, 11)).argmax(1)  # a learnable rule
    dtype = next(model.parameters()).dtype
    losses = []
    for step in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x.to(dtype)).float(), y)
        scaler.scale(loss).backward()
        if step == poison_at:
            next(model.parameters()).grad[0, 0] = float("inf")
            before = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
                      for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        if step == poison_at:  # skipped: nothing written (params, masters, remainders, codes, scales, steps)
            for p, (value, state) in zip(model.parameters(), before):
                assert_bitwise_equal(p.detach(), value, "skipped step: param")
                for key, t in state.items():
                    assert_bitwise_equal(opt.state[p][key], t, f"skipped step: {key}")
        losses.append(loss.item())
    return losses


# fp16 params: every mode but remainder masters and stochastic rounding (bf16 only)
@pytest.mark.parametrize("dtype, mode", [(BF16, m) for m in MODES] + [
    (torch.float16, m) for m, kw in MODES.items() if kw["master_weights"] != "remainder"
    and not kw.get("stochastic_rounding")])
def test_each_mode_trains_like_fp32_masters_with_the_grad_scaler(dtype, mode, one_thread):
    """A small MLP with mixprec.amp.GradScaler, clipping and weight decay, 60 steps of AdamW: the loss falls as
    with fp32 masters, to within 1% of its final value (measured: 0.2% for remainders, bf16 states and SR), or 5%
    for the 8-bit states and for bf16 params rounded to nearest without masters (measured 1.1% and 2.2%: the
    first quantizes the moments, the second loses updates below half an ulp; a remainder lost at each step would
    give the second's 2.2%, beyond the 1%); an overflowing step in the middle writes nothing."""
    kwargs = MODES[mode]
    runs = {}
    for name, options in (("fp32 masters", MODES["master"]), (mode, kwargs)):
        model = _mlp(dtype)
        opt = FusedAdamW(model.parameters(), lr=3e-3, weight_decay=0.01, max_grad_norm=1.0, backend="reference",
                         **options)
        scaler = mixprec.amp.GradScaler("cpu", init_scale=2.0**12)
        runs[name] = _train(model, opt, scaler, 60, poison_at=20)
    base, ours = runs["fp32 masters"], runs[mode]
    assert base[-1] < 0.6 * base[0], f"the problem did not train: {base[0]:.3f} -> {base[-1]:.3f}"
    rtol = 0.05 if "int8" in mode or mode == "none-bf16" else 0.01
    assert abs(ours[-1] - base[-1]) <= rtol * base[-1], f"{mode}: final loss {ours[-1]:.4f}, fp32 {base[-1]:.4f}"


# ---- param groups, mixed dtypes ----

def test_param_groups_of_different_modes_and_dtypes_update_as_alone():
    """One optimizer with a group per mode and mixed dtypes inside groups: each param ends bit for bit as it does
    in an optimizer of its own (the updates are per element; the SR group, first, holds one param so that its
    random bits are alike)."""
    shapes = [(4100,), (7,), (33, 129), (5, 3)]
    groups = [dict(MODES["sr-int8"], dtypes=[BF16]),
              dict(MODES["remainder-int8"], dtypes=[BF16, torch.float32, BF16]),
              dict(master_weights=True, state_dtype=BF16, amsgrad=True, dtypes=[torch.float16, BF16, torch.float32]),
              dict(master_weights=False, state_dtype="int8", dtypes=[torch.float16, torch.float32])]
    gen = torch.Generator().manual_seed(17)
    spec = []
    for k, g in enumerate(groups):
        options = {key: v for key, v in g.items() if key != "dtypes"}
        params = [nn.Parameter(torch.randn(shapes[(k + j) % 4], generator=gen).to(d))
                  for j, d in enumerate(g["dtypes"])]
        spec.append((options, params))
    opt = FusedAdamW([{"params": ps, **o} for o, ps in spec], lr=1e-2, backend="reference")
    alone = [(FusedAdamW([q], lr=1e-2, backend="reference", **o), p, q) for o, ps in spec
             for p, q in zip(ps, clones(ps))]
    for _ in range(3):
        for _, p, q in alone:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            q.grad = p.grad.clone()
        opt.step()
        for single, _, _ in alone:
            single.step()
    for single, p, q in alone:
        assert_same_state([p], opt, [q], single, f"{p.dtype} {tuple(p.shape)}")


# ---- changing the layout of a running optimizer ----

def test_changing_a_groups_mode_converts_its_state():
    """param_groups[i]["master_weights"] / ["state_dtype"] changed between steps: the state is converted at the
    next step (masters exactly), and training goes on as if the run had been in that mode from there."""
    params, twin = make_params(), make_params()
    opt = FusedAdamW(params, lr=1e-2, backend="reference")
    twin_opt = FusedAdamW(twin, lr=1e-2, backend="reference")
    gen = torch.Generator().manual_seed(18)
    for _ in range(2):
        feed([params, twin], gen)
        opt.step()
        twin_opt.step()
    masters = [opt.master_param(p) for p in params]
    opt.param_groups[0]["master_weights"] = "remainder"
    for p, m in zip(params, masters):
        assert_bitwise_equal(opt.master_param(p), m, "master_param before the conversion")
    feed([params, twin], gen)
    opt.step()
    twin_opt.step()
    for p, q in zip(params, twin):
        assert "master_param" not in opt.state[p]
        assert_bitwise_equal(opt.master_param(p), twin_opt.master_param(q), "remainder after the conversion")
    held = [{"param": p.detach().clone(), **{k: v.clone() for k, v in opt.state[p].items()}} for p in params]
    opt.param_groups[0]["state_dtype"] = "int8"
    feed([params], gen)
    opt.step()
    for i, (p, old) in enumerate(zip(params, held)):  # the reference op on the state converted by hand
        lists = {"params": [old["param"]], "grads": [p.grad], "steps": [old["step"]], "max_exp_avg_sqs": [],
                 "master_params": [], "param_remainders": [old["param_remainder"]]}
        if p.numel() >= INT8_MIN_NUMEL:
            for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
                lists[f"{key}s"], lists[f"{key}_scales"] = map(list, zip(reference.quantize_blockwise(old[key],
                                                                                                      signed=signed)))
        else:
            lists.update(exp_avgs=[old["exp_avg"]], exp_avg_sqs=[old["exp_avg_sq"]])
        reference.adam_step_(**lists, lr=torch.tensor([1e-2]), beta1=0.9, beta2=0.999, eps=1e-8,
                             weight_decay=0.01, decoupled=True)
        assert_bitwise_equal(p.detach(), old["param"], f"param {i} after the switch to int8")
        state = opt.state[p]
        for key, name in (("exp_avg_codes", "exp_avgs"), ("exp_avg_scales", "exp_avg_scales"),
                          ("exp_avg", "exp_avgs"), ("param_remainder", "param_remainders")):
            if key in state:
                assert_bitwise_equal(state[key], lists[name][0], f"param {i} {key}")
        assert ("exp_avg_codes" in state) == (p.numel() >= INT8_MIN_NUMEL)


@pytest.mark.parametrize("master", [True, "remainder"])
def test_masters_dropped_while_a_group_has_none_come_back_fresh(master):
    """master_weights True (or "remainder") -> False -> back: while the group has no masters the params are
    updated in place; when masters come back they are made from the params as they are then, not from the master
    held before (which would silently undo the steps in between). A twin that went without masters and then
    switched once tracks it bit for bit."""
    params, twin = make_params(), make_params()
    opt = FusedAdamW(params, lr=1e-2, backend="reference", master_weights=master)
    twin_opt = FusedAdamW(twin, lr=1e-2, backend="reference", master_weights=master)
    gen = torch.Generator().manual_seed(23)
    feed([params, twin], gen)
    opt.step()
    twin_opt.step()
    for o in (opt, twin_opt):
        o.param_groups[0]["master_weights"] = False
    for _ in range(3):
        feed([params, twin], gen)
        opt.step()
        twin_opt.step()
    for p in params:
        assert "master_param" not in opt.state[p] and "param_remainder" not in opt.state[p]
    assert opt.state_bytes() == twin_opt.state_bytes()
    opt.param_groups[0]["master_weights"] = master
    # the twin takes its masters from a state without any: what the switch back must be equal to
    twin_opt.param_groups[0]["master_weights"] = master
    before = [p.detach().clone() for p in params]
    feed([params, twin], gen)
    opt.step()
    twin_opt.step()
    for i, (p, q, b) in enumerate(zip(params, twin, before)):
        assert_bitwise_equal(p.detach(), q.detach(), f"param {i} after masters came back")
        assert not torch.equal(p.detach(), b), f"param {i} did not move"


def test_a_refused_later_group_leaves_every_group_unchanged():
    """A step whose second group cannot run (a grad of another dtype; a NaN lr set by hand) raises naming that
    group's param, before any kernel runs: the first group's params, moments and step counts are untouched, so the
    step can be retried once the cause is fixed."""
    a, b = make_params(seed=1), make_params(seed=2)
    opt = FusedAdamW([{"params": a}, {"params": b}], lr=1e-2, backend="reference")
    gen = torch.Generator().manual_seed(24)
    feed([a], gen)
    feed([b], gen)
    opt.step()
    snapshot = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in a]
    feed([a], gen)
    feed([b], gen)
    b[1].data = b[1].data.float()  # a param cast in place, its bf16 grad left as it was
    with pytest.raises(RuntimeError, match=r"param_groups\[1\]\['params'\]\[1\].*gradient torch.bfloat16"):
        opt.step()
    b[1].grad = None
    opt.param_groups[1]["lr"] = float("nan")
    with pytest.raises(ValueError, match=r"param_groups\[1\]: Invalid learning rate"):
        opt.step()
    for i, (p, (value, state)) in enumerate(zip(a, snapshot)):
        assert_bitwise_equal(p.detach(), value, f"group 0 param {i}")
        for k, v in state.items():
            assert_bitwise_equal(opt.state[p][k], v, f"group 0 param {i} {k}")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_int8_state_follows_a_memory_format_change(backend):
    """model.to(memory_format=torch.channels_last) after int8 state was made: the blocks are runs of memory
    order, so the moments are requantized in the new layout (dequantize, re-lay out, quantize) before the update;
    the result is that of the reference op on the state so converted."""
    conv = nn.Conv2d(32, 16, 3).to(BF16)  # weight 4608 elements: int8
    opt = FusedAdamW(conv.parameters(), lr=1e-2, master_weights="remainder", state_dtype="int8", backend=backend)
    gen = torch.Generator().manual_seed(19)
    for p in conv.parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(BF16)
    opt.step()
    w = conv.weight
    held = {k: v.clone() for k, v in opt.state[w].items()}
    conv.to(memory_format=torch.channels_last)
    assert not w.is_contiguous()
    expected = {"params": [w.detach().clone(memory_format=torch.preserve_format)],
                "param_remainders": [held["param_remainder"].contiguous(memory_format=torch.channels_last)],
                "steps": [held["step"].clone()], "max_exp_avg_sqs": [], "master_params": []}
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        value = reference.dequantize_blockwise(held[f"{key}_codes"], held[f"{key}_scales"])
        codes, scales = reference.quantize_blockwise(value.contiguous(memory_format=torch.channels_last), signed=signed)
        expected[f"{key}s"], expected[f"{key}_scales"] = [codes], [scales]
    for p in conv.parameters():  # laid out like the param, as autograd makes them
        p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen))
    expected["grads"] = [w.grad]
    opt.step()
    reference.adam_step_(**expected, lr=torch.tensor([1e-2]), beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
                         decoupled=True)
    state = opt.state[w]
    assert state["exp_avg_codes"].stride() == w.stride()
    assert_bitwise_equal(w.detach(), expected["params"][0], "param")
    for key, name in (("exp_avg_codes", "exp_avgs"), ("exp_avg_scales", "exp_avg_scales"),
                      ("exp_avg_sq_codes", "exp_avg_sqs"), ("exp_avg_sq_scales", "exp_avg_sq_scales"),
                      ("param_remainder", "param_remainders")):
        assert_bitwise_equal(state[key], expected[name][0], key)


# ---- refusals ----

def test_unsupported_combinations_are_refused_clearly():
    fp16 = nn.Parameter(torch.randn(3).half())
    bf16 = nn.Parameter(torch.randn(3).to(BF16))
    with pytest.raises(ValueError, match=r"parameter 'w'.*float16.*master_weights='remainder'"):
        FusedAdamW([("w", fp16)], master_weights="remainder")
    opt = FusedAdamW([bf16], master_weights="remainder")
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\].*float16"):
        opt.add_param_group({"params": [fp16]})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="amsgrad is not supported with state_dtype='int8'"):
        FusedAdamW([bf16], amsgrad=True, state_dtype="int8")
    with pytest.raises(ValueError, match=r"param_groups\[1\]: amsgrad"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2))], "amsgrad": True, "state_dtype": "int8"})
    for bad in ("bf16", torch.float16, torch.int8, None):
        with pytest.raises(ValueError, match="state_dtype must be"):
            FusedAdamW([bf16], state_dtype=bad)
    with pytest.raises(ValueError, match="master_weights must be"):
        FusedAdamW([bf16], master_weights="remainders")
    with pytest.raises(ValueError, match="stochastic_rounding=True.*master_weights=False"):
        FusedAdamW([bf16], master_weights="remainder", stochastic_rounding=True)


def test_refused_loads_name_the_parameter_and_change_nothing():
    params = make_params(shapes=[(4100,)])
    opt = FusedAdamW([("w", params[0])], lr=0.5, state_dtype="int8", backend="reference")
    feed([params], torch.Generator().manual_seed(0))
    opt.step()
    before = {k: v.clone() for k, v in opt.state[params[0]].items()}
    good = opt.state_dict()
    cases = {"codes without scales": ({k: v for k, v in good["state"][0].items() if k != "exp_avg_scales"},
                                      r"parameter 'w'.*'exp_avg_codes' without 'exp_avg_scales'"),
             "scales of another size": ({**good["state"][0], "exp_avg_sq_scales": torch.zeros(16)},
                                        r"parameter 'w'.*'exp_avg_sq_scales' has shape \(16,\).*17 int8 blocks"),
             "codes of another shape": ({**good["state"][0], "exp_avg_codes": torch.zeros(41, 100, dtype=torch.int8)},
                                        r"parameter 'w'.*'exp_avg_codes' has shape \(41, 100\)")}
    for state, match in cases.values():
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict({"state": {0: state}, "param_groups": copy.deepcopy(good["param_groups"])})
    amsgrad = copy.deepcopy(good)
    amsgrad["param_groups"][0]["amsgrad"] = True
    with pytest.raises(ValueError, match=r"^loaded param_groups\[0\]: amsgrad is not supported with state_dtype='int8"):
        opt.load_state_dict(amsgrad)
    assert opt.param_groups[0]["lr"] == 0.5 and not opt.param_groups[0]["amsgrad"]
    for key, value in before.items():
        assert_bitwise_equal(opt.state[params[0]][key], value, f"refused loads left {key}")
