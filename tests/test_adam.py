"""mixprec.ops.adam_step_ on every backend against mixprec.reference.adam_step_, bit for bit.

Bitwise is the right tolerance: the reference spells out each fp32 rounding of the update (and computes the
per-tensor coefficients in fp64 exactly as the kernels do), so any difference is a bug, not noise.
"""
import pytest
import torch

import mixprec
from mixprec import reference
from mixprec.testing import VARIANTS, assert_states_equal, hyper, random_state, run_reference
from tests.helpers import assert_bitwise_equal, use_backend

BACKENDS = ["cpu-avx2", "cpu-portable", "triton"]
SIZES = (1, 7, 127, 129, 1000, 65537)
CONFIGS = VARIANTS


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    return use_backend(request.param, monkeypatch)


def make_state(shapes, config, **kwargs):
    return random_state(shapes, config, **kwargs)


def clone(st):
    return {k: [t.clone() for t in v] for k, v in st.items()}


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("n", SIZES)
def test_matches_reference_bitwise(backend, config, n):
    # the flag combinations cycle with the size, so that every size and every combination is covered
    k = SIZES.index(n)
    amsgrad, decoupled, maximize = bool(k & 1), bool(k & 2), k % 3 == 0
    st = make_state([(n,)], config, amsgrad=amsgrad, seed=n)
    expected = clone(st)
    kw = hyper(config, decoupled=decoupled, maximize=maximize)
    mixprec.ops.adam_step_(**st, **kw, backend=backend)
    run_reference(expected, kw)
    assert_states_equal(st, expected, f"{backend} {config} n={n}")
    assert st["steps"][0].item() == 5.0


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_flags_match_reference(backend, config, amsgrad, decoupled, weight_decay):
    st = make_state([(129,), (3, 5)], config, amsgrad=amsgrad, seed=7, step=0.0)
    expected = clone(st)
    kw = hyper(config, decoupled=decoupled, maximize=True, weight_decay=weight_decay, found_inf=None, clip=None)
    mixprec.ops.adam_step_(**st, **kw, backend=backend)
    run_reference(expected, kw)
    assert_states_equal(st, expected, f"{backend} {config}")


@pytest.mark.parametrize("config", ["fp32", "fp16-master", "bf16-sr"])
def test_found_inf_skips_everything(backend, config):
    """inf/NaN in the grads and found_inf = 1: no buffer changes, not even the step count."""
    st = make_state([(1000,), (7,)], config, amsgrad=True, seed=3, specials=True)
    before = clone(st)
    mixprec.ops.adam_step_(**st, **hyper(config, found_inf=1.0), backend=backend)
    assert_states_equal(st, before, f"{backend} {config} skipped step")


@pytest.mark.parametrize("config", ["fp32", "fp16-master", "bf16"])
def test_nonfinite_grads_without_found_inf(backend, config):
    """Without found_inf the update runs and inf/NaN propagate exactly as in the reference."""
    st = make_state([(127,)], config, amsgrad=False, seed=11, specials=True)
    expected = clone(st)
    kw = hyper(config, found_inf=None)
    mixprec.ops.adam_step_(**st, **kw, backend=backend)
    run_reference(expected, kw)
    assert_states_equal(st, expected, f"{backend} {config}")
    assert not torch.isfinite(st["exp_avgs"][0]).all()


def test_mixed_list_and_layouts(backend):
    """fp32/fp16/bf16 in one call, an empty tensor, a 0-dim tensor, a transposed (dense) tensor, several
    chunks: everything matches the reference, each tensor with its own step count."""
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(300, 7, generator=gen).t(), torch.randn(0), torch.randn((), generator=gen).half(),
              torch.randn(70000, generator=gen).bfloat16(), torch.randn(33, generator=gen).half()]
    st = {"params": params,
          "grads": [torch.randn(p.shape, generator=gen).to(p.dtype).as_strided(p.shape, p.stride()) for p in params],
          "exp_avgs": [torch.zeros_like(p, dtype=torch.float32) for p in params],
          "exp_avg_sqs": [torch.zeros_like(p, dtype=torch.float32) for p in params],
          "steps": [torch.tensor(float(i)) for i in range(len(params))],
          "max_exp_avg_sqs": [], "master_params": []}
    expected = clone(st)  # clone keeps the strides of dense tensors
    kw = hyper("fp32", clip=None)
    mixprec.ops.adam_step_(**st, **kw, backend=backend)
    run_reference(expected, kw)
    assert_states_equal(st, expected, f"{backend} mixed list")
    assert [s.item() for s in st["steps"]] == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_stochastic_rounding_is_seeded(backend):
    st = make_state([(1000,)], "bf16-sr", amsgrad=False, seed=1)
    again, other = clone(st), clone(st)
    kw = hyper("bf16-sr")
    mixprec.ops.adam_step_(**st, **kw, backend=backend)
    mixprec.ops.adam_step_(**again, **kw, backend=backend)
    mixprec.ops.adam_step_(**other, **{**kw, "sr_seed": 99}, backend=backend)
    assert_bitwise_equal(st["params"][0], again["params"][0], "same seed")
    assert not torch.equal(st["params"][0], other["params"][0]), "another seed must draw other bits"


def test_stochastic_rounding_is_unbiased():
    """Rounding 1 + 0.3 ulp to bf16 many times: the mean must be 1 + 0.3 ulp (unbiased), where round to
    nearest gives 1. 65536 draws: the standard error of the mean is 0.0018 ulp; 0.01 ulp is > 5 sigma."""
    ulp = 2.0 ** -7
    x = torch.full((65536,), 1.0 + 0.3 * ulp)
    rounded = reference._bf16_stochastic(x, seed=5, stream=0, step=torch.tensor(1.0))
    mean_ulps = ((rounded.float() - 1.0) / ulp).mean().item()
    assert abs(mean_ulps - 0.3) < 0.01, mean_ulps
    assert set(rounded.float().unique().tolist()) == {1.0, 1.0 + ulp}


def test_lr_and_step_are_device_values():
    """lr and the step are read from the tensors (no host copy of them is cached between calls)."""
    st = make_state([(10,)], "fp32", amsgrad=False, seed=2, step=0.0)
    a, b = clone(st), clone(st)
    kw = hyper("fp32")
    lr = torch.tensor([1e-3])
    mixprec.ops.adam_step_(**a, **{**kw, "lr": lr}, backend="cpu")
    lr.fill_(1e-2)
    a2 = clone(st)
    mixprec.ops.adam_step_(**a2, **{**kw, "lr": lr}, backend="cpu")
    run_reference(b, {**kw, "lr": torch.tensor([1e-2])})
    assert_states_equal(a2, b, "lr changed in place")
    assert not torch.equal(a["params"][0], a2["params"][0])


def _args(n=4, dtype=torch.float16, master=True):
    return dict(params=[torch.zeros(n, dtype=dtype)], grads=[torch.zeros(n, dtype=dtype)],
                exp_avgs=[torch.zeros(n)], exp_avg_sqs=[torch.zeros(n)], steps=[torch.zeros(())],
                master_params=[torch.zeros(n)] if master else [], lr=1e-3)


@pytest.mark.parametrize("mutate, error, match", [
    (lambda a: a.update(grads=[torch.zeros(4)]), TypeError, r"grads\[0\] must be torch.float16"),
    (lambda a: a.update(exp_avgs=[torch.zeros(5)]), ValueError, r"exp_avgs\[0\] must have the shape"),
    (lambda a: a.update(exp_avg_sqs=[torch.zeros(4, dtype=torch.float16)]), TypeError, r"exp_avg_sqs\[0\] must be"),
    (lambda a: a.update(steps=[]), ValueError, r"steps must have one tensor per param"),
    (lambda a: a.update(master_params=[torch.zeros(4)] * 2), ValueError, r"master_params must have one tensor"),
    (lambda a: a.update(params=[torch.zeros(4, dtype=torch.complex64)]), TypeError, r"params\[0\] must have dtype"),
    (lambda a: a.update(grads=[torch.zeros(4, dtype=torch.float16).to_sparse()]), TypeError,
     r"grads\[0\] must be a dense tensor.*sparse"),
    (lambda a: a.update(grads=[torch.zeros(4, dtype=torch.float16, device="meta")]), ValueError,
     r"grads\[0\] is on meta"),
    (lambda a: a.update(params=[torch.zeros(4)], grads=[torch.zeros(4)]), ValueError,
     r"params\[0\] is float32 and needs no master"),
    (lambda a: a.update(lr=torch.zeros(2)), ValueError, r"lr must have exactly one element"),
    (lambda a: a.update(beta1=1.0), ValueError, r"beta parameter at index 0"),
    (lambda a: a.update(eps=0.0), ValueError, r"epsilon"),
    (lambda a: a.update(lr=-1.0), ValueError, r"learning rate"),
    (lambda a: a.update(master_params=[], sr_seed=3), ValueError, r"float16: stochastic rounding"),
])
def test_bad_arguments_name_the_argument(mutate, error, match):
    args = _args()
    mutate(args)
    with pytest.raises(error, match=match):
        mixprec.ops.adam_step_(**args, backend="cpu")


def test_extension_checks_too():
    """The C++ op refuses what the Python layer would, naming the argument (for callers of torch.ops)."""
    a = _args()
    with pytest.raises(RuntimeError, match=r"exp_avgs\[0\] must have the shape and strides of params\[0\]"):
        torch.ops.mixprec.adam_step_(a["params"], a["grads"], [torch.zeros(5)], a["exp_avg_sqs"], a["steps"],
                                     max_exp_avg_sqs=[], master_params=a["master_params"], lr=torch.tensor([1e-3]),
                                     beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True)
    with pytest.raises(RuntimeError, match=r"params\[0\] is float16: stochastic rounding"):
        torch.ops.mixprec.adam_step_(a["params"], a["grads"], a["exp_avgs"], a["exp_avg_sqs"], a["steps"],
                                     max_exp_avg_sqs=[], master_params=[], lr=torch.tensor([1e-3]), beta1=0.9,
                                     beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True, sr_seed=1)


@pytest.mark.parametrize("config", ["fp32", "fp16-master", "bf16-sr"])
def test_opcheck(config):
    st = make_state([(33,), (4, 4)], config, amsgrad=True, seed=1)
    kw = hyper(config)
    args = (st["params"], st["grads"], st["exp_avgs"], st["exp_avg_sqs"], st["steps"])
    kwargs = dict(max_exp_avg_sqs=st["max_exp_avg_sqs"], master_params=st["master_params"], lr=kw["lr"], beta1=0.9,
                  beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True, maximize=False,
                  grad_scale=kw["grad_scale"], found_inf=kw["found_inf"], clip_coef=kw["clip_coef"],
                  sr_seed=1234 if CONFIGS[config][2] else -1)
    torch.library.opcheck(torch.ops.mixprec.adam_step_.default, args, kwargs)


@pytest.mark.cuda
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("n", SIZES + (3_000_001,))
def test_cuda_matches_reference_bitwise(config, n):
    k = SIZES.index(n) if n in SIZES else 0
    st = make_state([(n,), (5, 3)], config, amsgrad=bool(k & 1), seed=n, device="cuda")
    expected = clone(st)
    kw = hyper(config, device="cuda")
    mixprec.ops.adam_step_(**st, **kw, backend="cuda")
    run_reference(expected, kw)
    assert_states_equal(st, expected, f"cuda {config} n={n}")
    skipped = clone(st)
    mixprec.ops.adam_step_(**skipped, **{**kw, "found_inf": torch.ones(1, device="cuda")}, backend="cuda")
    assert_states_equal(skipped, st, f"cuda {config} skipped")


def test_torch_compile_fullgraph():
    st = make_state([(1000,), (7,)], "fp16-master", amsgrad=False, seed=4)
    eager = clone(st)
    kw = {k: v for k, v in hyper("fp16-master").items() if k != "sr_seed"}

    def step(s):
        mixprec.ops.adam_step_(**s, **kw)
        return s["steps"][0] * 2

    out = torch.compile(step, fullgraph=True, backend="aot_eager")(st)
    expected = step(eager)
    assert_states_equal(st, eager, "compiled")
    assert out.item() == expected.item() == 10.0
