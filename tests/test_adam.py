"""mixprec.ops.adam_step_ on every backend against mixprec.reference.adam_step_, bit for bit, in every mode of
issue #12 (master kind none / fp32 / remainder x state kind fp32 / bf16 / int8), and the reference's own layouts
(remainder split/join, int8 block-wise codes, storage order).

Bitwise is the right tolerance: the reference spells out each fp32 rounding of the update (and computes the
per-tensor coefficients in fp64 exactly as the kernels do), and the int8 codes and remainders are integer
functions of fp32 bit patterns, so any difference is a bug, not noise.
"""
import math

import pytest
import torch

import mixprec
from mixprec import reference
from mixprec.testing import (
    STATES,
    VARIANTS,
    assert_states_equal,
    clone_state,
    hyper,
    random_state,
    relayout,
    run_reference,
)
from tests.helpers import assert_bitwise_equal, special_values, use_backend

BACKENDS = ["cpu-avx512", "cpu-avx2", "cpu-portable", "triton"]
SIZES = (1, 7, 127, 129, 1000, 65537)
CONFIGS = VARIANTS
MODES = [(v, s) for v in VARIANTS for s in STATES]  # every master / param variant with every state kind
MODE_IDS = [f"{v}-{s}state" for v, s in MODES]

@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    return use_backend(request.param, monkeypatch)


def make_state(shapes, config, **kwargs):
    return random_state(shapes, config, **kwargs)


def run_both(st, kw, backend):
    """The op on `st` with `backend` and the reference on a copy; returns the reference's state."""
    expected = clone_state(st)
    mixprec.ops.adam_step_(**st, **kw, backend=backend)
    run_reference(expected, kw)
    return expected


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("n", SIZES)
def test_matches_reference_bitwise(backend, config, n):
    # the flag combinations cycle with the size, so that every size and every combination is covered
    k = SIZES.index(n)
    amsgrad, decoupled, maximize = bool(k & 1), bool(k & 2), k % 3 == 0
    st = make_state([(n,)], config, amsgrad=amsgrad, seed=n)
    expected = run_both(st, hyper(config, decoupled=decoupled, maximize=maximize), backend)
    assert_states_equal(st, expected, f"{backend} {config} n={n}")
    assert st["steps"][0].item() == 5.0


# sizes around the vector steps of the CPU kernels (16 elements with AVX-512 and with the AVX2 pairs, 32 with the
# AVX-512 pairs, 8 with AVX2) and the 256-element int8 block: the vector loop, the scalar tail, a quantization block
# that ends mid-vector
LANE_SIZES = (15, 16, 17, 31, 32, 33, 63, 65, 255, 257, 4111)


@pytest.mark.parametrize("cpu", ["cpu-avx512", "cpu-avx2", "cpu-portable"])
@pytest.mark.parametrize("variant, state", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("n", LANE_SIZES)
def test_lane_tails_and_specials(cpu, variant, state, n, monkeypatch):
    """Every CPU kernel and mode on sizes around the vector widths, with NaN and inf in chosen lanes of the grads
    (a NaN in a vector takes its NaN-aware stores; with int8 states a non-finite block takes the exact encoder while
    its neighbours take the fast one) and subnormal / zero / special values in the fp32 value of the params."""
    backend = use_backend(cpu, monkeypatch)
    st = make_state([(n,)], variant, amsgrad=n % 2 == 1 and state != "int8", seed=n + 17, state=state)
    grad = st["grads"][0]
    for i, x in ((n // 2, float("nan")), (min(n - 1, 300), float("inf")), (n - 1, -float("inf"))):
        if n > 20 or i == n // 2:  # the small sizes keep one NaN (the rest of their vector stays finite)
            grad[i] = x
    w = st["master_params"][0] if st["master_params"] else st["params"][0]
    specials = special_values(w.dtype)
    if n > len(specials) + 3:
        w[3:3 + len(specials)] = torch.tensor(specials, dtype=w.dtype)
    if st["param_remainders"]:  # the remainder master: the special values as its param, remainder 0
        st["param_remainders"][0][3:3 + len(specials)] = 0
    expected = run_both(st, hyper(variant), backend)
    assert_states_equal(st, expected, f"{cpu} {variant} {state}state n={n}")


# (amsgrad, decoupled, maximize, weight_decay, grad_scale, clip_coef, found_inf): Adam and AdamW, with and without
# decay, each optional input present and absent; sizes odd, below, at and above the 256-element int8 block and the
# Triton BLOCK (a partial last block everywhere)
FLAG_SETS = [
    (True, False, True, 0.1, 1024.0, 0.7, 0.0),
    (False, True, False, 0.01, 65536.0, None, None),
    (True, True, True, 0.0, None, 0.3, 0.0),
    (False, False, False, 0.0, None, None, None),
]
MODE_SHAPES = [[(1,), (255,)], [(257,), (7, 41)], [(1000,), (3, 5)], [(2049,)]]


@pytest.mark.parametrize("variant, state", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("flags", range(len(FLAG_SETS)))
def test_modes_match_reference(backend, variant, state, flags):
    """Every mode x param dtype x (Adam/AdamW, decay, amsgrad where allowed, maximize, grad_scale, clip_coef)."""
    amsgrad, decoupled, maximize, wd, scale, clip, found = FLAG_SETS[flags]
    amsgrad = amsgrad and state != "int8"
    st = make_state(MODE_SHAPES[flags], variant, amsgrad=amsgrad, seed=100 + flags, state=state)
    kw = hyper(variant, decoupled=decoupled, maximize=maximize, weight_decay=wd, scale=scale, clip=clip,
               found_inf=found)
    expected = run_both(st, kw, backend)
    assert_states_equal(st, expected, f"{backend} {variant} {state} states, flags {FLAG_SETS[flags]}")
    assert [s.item() for s in st["steps"]] == [5.0] * len(st["steps"])


@pytest.mark.parametrize("variant, state", MODES, ids=MODE_IDS)
def test_found_inf_skips_everything(backend, variant, state):
    """inf/NaN in the grads and found_inf = 1: no buffer changes (params, masters, remainders, moments, block
    scales), not even the step count."""
    st = make_state([(1000,), (7,)], variant, amsgrad=state != "int8", seed=3, specials=True, state=state)
    before = clone_state(st)
    mixprec.ops.adam_step_(**st, **hyper(variant, found_inf=1.0), backend=backend)
    assert_states_equal(st, before, f"{backend} {variant} {state} skipped step")


@pytest.mark.parametrize("variant, state", [("fp32", "fp32"), ("fp16-master", "fp32"), ("bf16", "fp32"),
                                            ("bf16-remainder", "bf16"), ("bf16-sr", "int8")])
def test_nonfinite_grads_without_found_inf(backend, variant, state):
    """Without found_inf the update runs and inf/NaN propagate exactly as in the reference (int8: the block of a
    non-finite moment gets a NaN or inf scale)."""
    st = make_state([(127,), (600,)], variant, amsgrad=False, seed=11, specials=True, state=state)
    expected = run_both(st, hyper(variant, found_inf=None), backend)
    assert_states_equal(st, expected, f"{backend} {variant} {state}")
    m = reference.dequantize_blockwise(st["exp_avgs"][0], st["exp_avg_scales"][0]) if state == "int8" else \
        st["exp_avgs"][0]
    assert not torch.isfinite(m.float()).all()


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
          "steps": [torch.tensor(float(i)) for i in range(len(params))], "max_exp_avg_sqs": [], "master_params": []}
    expected = run_both(st, hyper("fp32", clip=None), backend)  # clone_state keeps the strides of dense tensors
    assert_states_equal(st, expected, f"{backend} mixed list")
    assert [s.item() for s in st["steps"]] == [1.0, 2.0, 3.0, 4.0, 5.0]


# (variant, state): stochastic rounding keys its bits by the storage index, int8 its blocks by storage position
LAYOUT_MODES = [("bf16-sr", "fp32"), ("bf16-sr", "int8"), ("bf16-remainder", "int8"), ("bf16-master", "bf16")]


@pytest.mark.parametrize("layout, shapes", [("transposed", [(37, 29), (300, 3)]),
                                            ("channels_last", [(2, 13, 5, 7), (1, 3, 9, 11)])])
@pytest.mark.parametrize("variant, state", LAYOUT_MODES)
def test_permuted_layouts_follow_storage_order(backend, layout, shapes, variant, state):
    """Transposed and channels_last tensors (SR bits and int8 blocks by storage order): the backend matches the
    reference, and both match the same call on the storage viewed as 1-D tensors, which is the definition."""
    st = make_state(shapes, variant, amsgrad=False, seed=21, state=state, layout=layout)
    assert not st["params"][0].is_contiguous()
    kw = hyper(variant)
    flat = {k: [reference.storage_order(t) if t.dim() else t for t in v] for k, v in clone_state(st).items()}
    expected = run_both(st, kw, backend)
    assert_states_equal(st, expected, f"{backend} {variant} {state} {layout}")
    run_reference(flat, kw)
    for key in ("params", "exp_avgs", "exp_avg_sqs", "param_remainders", "master_params"):
        for i, t in enumerate(st[key]):
            assert_bitwise_equal(reference.storage_order(t), flat[key][i], f"{key}[{i}] vs its storage as 1-D")
    for key in ("exp_avg_scales", "exp_avg_sq_scales"):
        for i, t in enumerate(st[key]):
            assert_bitwise_equal(t, flat[key][i], f"{key}[{i}] vs the storage's")


def test_storage_order_is_memory_order():
    t = relayout(torch.arange(24.0).reshape(2, 3, 4, 1).expand(2, 3, 4, 1), "channels_last")
    assert torch.equal(reference.storage_order(t), t.as_strided((24,), (1,)))
    u = relayout(torch.arange(12.0).reshape(3, 4), "transposed")
    assert torch.equal(reference.storage_order(u), u.t().reshape(-1))
    reference.storage_order(u)[0] = -1.0  # a view: writes go to the tensor
    assert u[0, 0] == -1.0
    with pytest.raises(RuntimeError):
        reference.storage_order(torch.zeros(4, 4)[:, :2])  # not dense: refused, never copied


def test_stochastic_rounding_is_seeded(backend):
    st = make_state([(1000,)], "bf16-sr", amsgrad=False, seed=1)
    again, other = clone_state(st), clone_state(st)
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
    a, b = clone_state(st), clone_state(st)
    kw = hyper("fp32")
    lr = torch.tensor([1e-3])
    mixprec.ops.adam_step_(**a, **{**kw, "lr": lr}, backend="cpu")
    lr.fill_(1e-2)
    a2 = clone_state(st)
    mixprec.ops.adam_step_(**a2, **{**kw, "lr": lr}, backend="cpu")
    run_reference(b, {**kw, "lr": torch.tensor([1e-2])})
    assert_states_equal(a2, b, "lr changed in place")
    assert not torch.equal(a["params"][0], a2["params"][0])


# ---- remainder masters ----

def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def _special_masters(n: int, seed: int) -> torch.Tensor:
    """fp32 masters with uniformly random bit patterns (NaN excluded, and -0.0: w + 0 turns it into +0.0), with
    inf, the largest finite, subnormals, the smallest normal, and exact ties (low half 0x8000) planted."""
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2**32, (n,), generator=gen, dtype=torch.int64)
    planted = [0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x00000001, 0x807FFFFF, 0x00800000, 0x3F808000,
               0x3F818000, 0xBF808000, 0x7F7F8000, 0x00008000, 0x00000000, 0x7F7F7FFF, 0x3F80FFFF]
    bits[:len(planted)] = torch.tensor(planted)
    x = reference._float_from_bits(bits)
    keep = ~torch.isnan(x) & (bits != 0x80000000)
    return x[keep]


def test_remainder_split_join_round_trip():
    """join(split(u)) == u bit for bit for every non-NaN u (random patterns, inf, subnormals, max finite, ties);
    NaN: a quiet NaN of the same sign and remainder 0."""
    x = _special_masters(200_000, seed=1)
    param, remainder = reference.remainder_split(x)
    assert param.dtype == torch.bfloat16 and remainder.dtype == torch.int16
    assert_bitwise_equal(reference.remainder_join(param, remainder), x, "join(split(x))")
    assert torch.equal(_bits(reference.remainder_join(param, remainder)), _bits(x))  # -0.0, NaN payloads too
    nan = torch.tensor([float("nan"), -float("nan")])
    p, r = reference.remainder_split(nan)
    back = reference.remainder_join(p, r)
    assert torch.isnan(p.float()).all() and torch.equal(r, torch.zeros(2, dtype=torch.int16))
    assert torch.isnan(back).all() and torch.equal(torch.signbit(back), torch.tensor([False, True]))


def test_remainder_param_is_rne_except_ties_away():
    """The param is the master rounded to nearest even, except at exact ties (low half 0x8000), where it is the
    larger magnitude (ties away from zero), even when the even neighbour is the smaller one."""
    x = _special_masters(200_000, seed=2)
    param, _ = reference.remainder_split(x)
    tie = (_bits(x) & 0xFFFF) == 0x8000
    assert tie.sum() >= 6
    assert_bitwise_equal(param[~tie], x[~tie].to(torch.bfloat16), "param vs RNE(master)")
    away = param[tie].float().abs()
    assert (away > x[tie].abs()).all(), "ties go away from zero"
    even_down = tie & (((_bits(x) >> 16) & 1) == 0)  # where RNE keeps the smaller magnitude
    assert even_down.any() and not torch.equal(param[even_down], x[even_down].to(torch.bfloat16))
    # the largest finite floats round up to inf exactly where RNE does
    big = reference._float_from_bits(torch.tensor([0x7F7FFFFF, 0xFF7FFFFF]))  # fp32's largest finite
    assert torch.isinf(reference.remainder_split(big)[0].float()).all()
    assert torch.isinf(big.to(torch.bfloat16).float()).all()


@pytest.mark.parametrize("backend_name", ["reference", *BACKENDS])
def test_remainder_trajectory_equals_fp32_masters(backend_name, monkeypatch):
    """Several steps on the same grads: the master reconstructed from (param, remainder) equals master_params mode's
    master bit for bit at every step, and the param is its RNE except at exact ties (then ties away)."""
    backend = use_backend(backend_name, monkeypatch)
    shapes = [(777,), (3, 129)]
    masters = random_state(shapes, "bf16-master", amsgrad=True, seed=31, step=0.0)
    rem = random_state(shapes, "bf16-remainder", amsgrad=True, seed=31, step=0.0)
    for key in ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        assert all(torch.equal(a, b) for a, b in zip(masters[key], rem[key]))
    # the same fp32 masters to start from: the split of master mode's masters
    for i, w in enumerate(masters["master_params"]):
        rem["params"][i], rem["param_remainders"][i] = reference.remainder_split(w)
    gen = torch.Generator().manual_seed(32)
    for step in range(4):
        grads = [torch.randn(s, generator=gen).bfloat16() for s in shapes]
        kw = hyper("bf16-master", decoupled=step % 2 == 0, maximize=step == 3, scale=1.0 if step else 8.0)
        mixprec.ops.adam_step_(**{**masters, "grads": grads}, **kw, backend=backend)
        mixprec.ops.adam_step_(**{**rem, "grads": [g.clone() for g in grads]}, **kw, backend=backend)
        for i, w in enumerate(masters["master_params"]):
            joined = reference.remainder_join(rem["params"][i], rem["param_remainders"][i])
            assert_bitwise_equal(joined, w, f"step {step}: master {i} from (param, remainder)")
            tie = (_bits(w) & 0xFFFF) == 0x8000
            assert_bitwise_equal(rem["params"][i][~tie], masters["params"][i][~tie], f"step {step}: param {i}")
        for key in ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"):
            for a, b in zip(masters[key], rem[key]):
                assert_bitwise_equal(a, b, f"step {step}: {key}")


def test_remainder_ties_and_specials_through_the_op(backend):
    """The op's remainder store on exact ties and special masters: with lr = 0 and no decay the update adds a zero,
    so the master must come back bit for bit (inf, max finite, subnormals, random patterns) and every tie param
    must be the larger magnitude (an RNE store would pick the even neighbour)."""
    x = _special_masters(3000, seed=3)
    hi = torch.randint(0x3F00, 0x4100, (64,), generator=torch.Generator().manual_seed(4))
    ties = reference._float_from_bits((hi << 16) | 0x8000)
    master = torch.cat([ties, -ties, x])
    param, remainder = reference.remainder_split(master)
    st = random_state([master.shape], "bf16-remainder", amsgrad=False, seed=5, step=2.0)
    st["params"], st["param_remainders"] = [param], [remainder]
    st["grads"] = [torch.randn(master.shape, generator=torch.Generator().manual_seed(6)).bfloat16()]
    kw = {**hyper("bf16-remainder", weight_decay=0.0), "lr": torch.zeros(1)}
    expected = run_both(st, kw, backend)
    assert_states_equal(st, expected, backend)
    assert torch.equal(_bits(reference.remainder_join(st["params"][0], st["param_remainders"][0])), _bits(master))
    n = ties.numel()
    assert (st["params"][0][:2 * n].float().abs() > master[:2 * n].abs()).all(), "ties away from zero"


# ---- int8 block-wise states ----

def test_int8_code_values():
    """value(127) = value(255) = 1; value(1) = 1.25 * 2^-16 (m) and 1.25 * 2^-32 (v); value(0) = 0; strictly
    increasing; m's map is odd; 3 mantissa bits, so each binade holds 8 codes."""
    m = reference.int8_value(torch.arange(-127, 128, dtype=torch.int8))
    v = reference.int8_value(torch.arange(256).to(torch.uint8))
    assert m.dtype == v.dtype == torch.float32
    assert m[-1].item() == 1.0 and v[-1].item() == 1.0 and m[127].item() == 0.0 and v[0].item() == 0.0
    assert m[128].item() == 1.25 * 2.0 ** -16 and v[1].item() == 1.25 * 2.0 ** -32
    assert (m[1:] > m[:-1]).all() and (v[1:] > v[:-1]).all()
    assert torch.equal(m, -m.flip(0))
    assert v[8 + 7].item() == 2 * v[7].item()  # one binade = 8 codes


def _next32(x: float, toward: float) -> float:
    """The fp32 neighbour of fp32 x in the direction of `toward`."""
    return torch.nextafter(torch.tensor([x]), torch.tensor([toward])).item()


def _encode(x: float, signed: bool) -> int:
    """The code of x in a block whose absmax is 1 (so x is in units of the scale exactly)."""
    codes, scales = reference.quantize_blockwise(torch.tensor([1.0, x]), signed=signed)
    assert scales.item() == 1.0
    return int(codes[1])


@pytest.mark.parametrize("signed", [True, False])
def test_int8_encode_is_nearest_with_ties_to_even(signed):
    """Every value maps to itself; the midpoint of two neighbours goes to the one whose fp32 bits (3 mantissa bits)
    are even, one ulp off the midpoint to the nearer one; below value(1): the nearest of 0 and value(1), ties up;
    -0.0 to code 0; m's codes carry the sign."""
    kmax = 127 if signed else 255
    dtype = torch.int8 if signed else torch.uint8
    values = reference.int8_value(torch.arange(kmax + 1).to(dtype)).tolist()
    for k in range(kmax + 1):
        assert _encode(values[k], signed) == k
        if signed:
            assert _encode(-values[k], signed) == -k
    for k in range(1, kmax):
        mid = (values[k] + values[k + 1]) / 2  # exact: one more mantissa bit
        even = k if (reference._bits32(torch.tensor([values[k]])) >> 20).item() % 2 == 0 else k + 1
        assert _encode(mid, signed) == even, (k, mid)
        assert _encode(_next32(mid, 0), signed) == k
        assert _encode(_next32(mid, 2), signed) == k + 1
    half = values[1] / 2
    assert _encode(half, signed) == 1 and _encode(_next32(half, 0), signed) == 0
    assert _encode(values[1] / 8, signed) == 0 and _encode(-0.0, signed) == 0
    # |m| * (1 / scale) can round to just above 1: still the largest code
    assert reference._int8_code_magnitude(torch.tensor([_next32(1.0, 2)]), signed).item() == kmax


def test_int8_ties_through_the_op(backend):
    """The op's int8 store at exact ties, where random data never lands: with beta1 = beta2 = 0 the new moments are
    m = g and v = g * g exactly, and a block holding 1.0 has scale 1, so the grads place m on every midpoint of
    the map (both tie directions, and half of value(1), which ties up) and v on midpoints 1.5625 * 4^j."""
    values = reference.int8_value(torch.arange(128, dtype=torch.int8))
    mids = (values[1:-1] + values[2:]) / 2  # exact in fp32: one more mantissa bit
    m_block = torch.cat([torch.ones(1), mids, values[1:2] / 2, -mids[::3], torch.zeros(256 - 1 - 126 - 1 - 42)])
    v_block = torch.cat([torch.ones(1), 1.25 * torch.exp2(-torch.arange(1.0, 16.0)), torch.zeros(256 - 16)])
    grads = torch.cat([m_block, v_block, torch.full((3,), 0.5)])
    st = random_state([grads.shape], "fp32", amsgrad=False, seed=41, state="int8")
    st["grads"] = [grads]
    kw = {**hyper("fp32", weight_decay=0.0, scale=None, clip=None, found_inf=None), "beta1": 0.0, "beta2": 0.0}
    expected = run_both(st, kw, backend)
    assert_states_equal(st, expected, f"{backend} int8 ties")
    codes, scales = reference.quantize_blockwise(grads, signed=True)
    assert_bitwise_equal(st["exp_avgs"][0], codes, "m codes = the codes of g")
    assert_bitwise_equal(st["exp_avg_scales"][0], scales, "m scales")
    codes, scales = reference.quantize_blockwise(grads * grads, signed=False)
    assert_bitwise_equal(st["exp_avg_sqs"][0], codes, "v codes = the codes of g * g")


def test_int8_blocks():
    """A zero block: codes and scale 0, decoded to 0. A NaN: its block's scale is NaN and decodes to NaN; an inf:
    the block is non-finite throughout; the other blocks are untouched. Blocks are 256 elements in storage order,
    the last one partial; scales are the blocks' absmax."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1000, generator=gen)
    x[256:512] = 0.0
    x[600] = float("nan")
    x[900] = float("inf")
    for signed in (True, False):
        y = x if signed else x.abs()
        codes, scales = reference.quantize_blockwise(y, signed=signed)
        assert codes.dtype == (torch.int8 if signed else torch.uint8) and scales.shape == (4,)
        assert scales[0].item() == y[:256].abs().max().item() and scales[1].item() == 0.0
        assert torch.isnan(scales[2]) and scales[3].item() == math.inf
        assert (codes[256:512] == 0).all()
        back = reference.dequantize_blockwise(codes, scales)
        assert (back[256:512] == 0).all() and torch.isnan(back[512:768]).all() and not torch.isfinite(back[768:]).any()
        # a finite block: within half a code step (relative 2^-4 above value(1)) of the value
        err = (back[:256] - y[:256]).abs()
        assert (err <= y[:256].abs() * 2.0 ** -4 + scales[0] * 2.0 ** (-16 if signed else -32)).all()
        assert not torch.equal(back[:256], y[:256])
    t = relayout(torch.randn(20, 30, generator=gen), "transposed")  # blocks follow storage, not the logical order
    codes, scales = reference.quantize_blockwise(t, signed=True)
    assert codes.stride() == t.stride()
    assert scales[0].item() == reference.storage_order(t)[:256].abs().max().item()


# ---- arguments ----

def _args(n=4, dtype=torch.float16, master=True):
    return dict(params=[torch.zeros(n, dtype=dtype)], grads=[torch.zeros(n, dtype=dtype)],
                exp_avgs=[torch.zeros(n)], exp_avg_sqs=[torch.zeros(n)], steps=[torch.zeros(())],
                master_params=[torch.zeros(n)] if master else [], lr=1e-3)


def _int8_args(n=300, **kw):
    return dict(params=[torch.randn(n).bfloat16()], grads=[torch.randn(n).bfloat16()],
                exp_avgs=[torch.zeros(n, dtype=torch.int8)], exp_avg_sqs=[torch.zeros(n, dtype=torch.uint8)],
                exp_avg_scales=[torch.zeros(2)], exp_avg_sq_scales=[torch.zeros(2)], steps=[torch.zeros(())],
                lr=1e-3, **kw)


def _inference_zeros(n):
    with torch.inference_mode():
        return torch.zeros(n)


def _twice(a):
    p = torch.zeros(8, dtype=torch.float16)
    a.update(params=[p, p], grads=[torch.zeros(8, dtype=torch.float16)] * 2, exp_avgs=[torch.zeros(8) for _ in "ab"],
             exp_avg_sqs=[torch.zeros(8) for _ in "ab"], steps=[torch.zeros(()) for _ in "ab"],
             master_params=[torch.zeros(8) for _ in "ab"])


def _overlapping(a):
    p = torch.zeros(12, dtype=torch.float16)
    _twice(a)
    a["params"] = [p[:8], p[4:]]


BAD_ARGUMENTS = [
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
    # issue #11: values that turned params into NaN, and types that gave errors naming nothing
    (lambda a: a.update(lr=math.inf), ValueError, r"learning rate: inf"),
    (lambda a: a.update(lr=torch.tensor([math.inf])), ValueError, r"lr must be finite"),
    (lambda a: a.update(weight_decay=math.inf), ValueError, r"weight_decay"),
    (lambda a: a.update(grad_scale=torch.zeros(1)), ValueError, r"grad_scale must be finite and > 0, got 0"),
    (lambda a: a.update(grad_scale=torch.tensor([math.nan])), ValueError, r"grad_scale must be finite"),
    (lambda a: a.update(grad_scale=torch.tensor([-2.0])), ValueError, r"grad_scale must be finite and > 0"),
    (lambda a: a.update(grad_scale=torch.tensor([math.inf])), ValueError, r"grad_scale must be finite"),
    (lambda a: a.update(clip_coef=torch.tensor([math.nan])), ValueError, r"clip_coef must be finite"),
    (lambda a: a.update(clip_coef=torch.tensor([-1.0])), ValueError, r"clip_coef must be finite and >= 0"),
    (lambda a: a.update(steps=[torch.tensor(-1.0)]), ValueError, r"steps\[0\] must be a finite count >= 0"),
    (lambda a: a.update(steps=[torch.tensor(math.nan)]), ValueError, r"steps\[0\] must be a finite count"),
    (lambda a: a.update(lr="1e-3"), TypeError, r"lr must be a float"),
    (lambda a: a.update(beta1="0.9"), TypeError, r"beta1 must be a float"),
    (lambda a: a.update(beta2=None), TypeError, r"beta2 must be a float"),
    (lambda a: a.update(eps="x"), TypeError, r"eps must be a float"),
    (lambda a: a.update(weight_decay="0"), TypeError, r"weight_decay must be a float"),
    (lambda a: a.update(decoupled="no"), TypeError, r"decoupled must be a bool"),
    (lambda a: a.update(maximize=None), TypeError, r"maximize must be a bool"),
    (lambda a: a.update(master_params=[], params=[torch.zeros(4, dtype=torch.bfloat16)],
                        grads=[torch.zeros(4, dtype=torch.bfloat16)], sr_seed="1"), TypeError,
     r"sr_seed must be an int"),
    (lambda a: a.update(steps=[torch.zeros((), requires_grad=True)]), RuntimeError, r"steps\[0\] is a leaf tensor"),
    (lambda a: a.update(exp_avgs=[_inference_zeros(4)]), RuntimeError, r"exp_avgs\[0\] is an inference tensor"),
    (lambda a: a.update(master_params=[torch.zeros(4, requires_grad=True)]), RuntimeError,
     r"master_params\[0\] is a leaf tensor that requires grad"),
    (_twice, ValueError, r"params\[0\] and params\[1\] share memory"),
    (_overlapping, ValueError, r"params\[0\] and params\[1\] share memory"),
    # issue #12's lists
    (lambda a: a.update(param_remainders=[torch.zeros(4, dtype=torch.int16)]), ValueError,
     r"master_params and param_remainders: give one master kind"),
    (lambda a: a.update(master_params=[], param_remainders=[torch.zeros(4, dtype=torch.int16)]), ValueError,
     r"param_remainders\[0\]: params\[0\] is torch.float16; remainder masters are for bfloat16"),
    (lambda a: a.update(exp_avgs=[torch.zeros(4, dtype=torch.bfloat16)]), TypeError,
     r"exp_avg_sqs\[0\] must be torch.bfloat16 \(exp_avgs\[0\] is torch.bfloat16: one state kind per call\)"),
    (lambda a: a.update(exp_avgs=[torch.zeros(4, dtype=torch.float16)]), TypeError, r"exp_avgs\[0\] must have dtype"),
    (lambda a: a.update(exp_avg_scales=[torch.zeros(1)], exp_avg_sq_scales=[torch.zeros(1)]), ValueError,
     r"exp_avg_scales is given, but the states are torch.float32"),
]
INT8_BAD_ARGUMENTS = [
    (lambda a: a.update(exp_avg_scales=[]), ValueError, r"exp_avg_scales: int8 states need one fp32 block-scale"),
    (lambda a: a.update(exp_avg_sq_scales=[torch.zeros(3)]), ValueError,
     r"exp_avg_sq_scales\[0\] must be a contiguous 1-D tensor of ceil\(numel / 256\) = 2 block scales"),
    (lambda a: a.update(exp_avg_scales=[torch.zeros(4)[::2]]), ValueError, r"exp_avg_scales\[0\] must be a contig"),
    (lambda a: a.update(exp_avg_scales=[torch.zeros(2, dtype=torch.float16)]), TypeError,
     r"exp_avg_scales\[0\] must be torch.float32"),
    (lambda a: a.update(exp_avg_scales=[torch.zeros(2, requires_grad=True)]), RuntimeError,
     r"exp_avg_scales\[0\] is a leaf tensor"),
    (lambda a: a.update(exp_avg_sqs=[torch.zeros(300, dtype=torch.int8)]), TypeError,
     r"exp_avg_sqs\[0\] must be torch.uint8"),
    (lambda a: a.update(max_exp_avg_sqs=[torch.zeros(300, dtype=torch.uint8)]), ValueError,
     r"amsgrad is not supported with int8 states"),
    (lambda a: a.update(param_remainders=[torch.zeros(300, dtype=torch.int16)], sr_seed=1), ValueError,
     r"sr_seed \(stochastic rounding\) applies to params without master weights \(got param_remainders\)"),
    (lambda a: a.update(param_remainders=[torch.zeros(300, dtype=torch.int32)]), TypeError,
     r"param_remainders\[0\] must be torch.int16"),
    (lambda a: a.update(param_remainders=[torch.zeros(301, dtype=torch.int16)]), ValueError,
     r"param_remainders\[0\] must have the shape and strides"),
]


@pytest.mark.parametrize("backend_name", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("make, mutate, error, match", [(_args, *b) for b in BAD_ARGUMENTS]
                         + [(_int8_args, *b) for b in INT8_BAD_ARGUMENTS])
def test_bad_arguments_name_the_argument(backend_name, make, mutate, error, match):
    """Refused on every backend, naming the argument, before anything is written."""
    args = make()
    mutate(args)
    before = [t.clone() for t in args["params"] if t.device.type != "meta"]
    with pytest.raises(error, match=match):
        mixprec.ops.adam_step_(**args, backend=backend_name)
    for p, b in zip(args["params"], before):
        assert_bitwise_equal(p, b, "a refused call writes nothing")


def test_skipped_step_takes_any_tensor_values():
    """An overflowing step's clip coefficient is NaN (the norm is), and found_inf skips it: accepted, nothing
    written."""
    st = make_state([(100,)], "fp16-master", amsgrad=False, seed=8)
    before = clone_state(st)
    kw = {**hyper("fp16-master", found_inf=1.0), "clip_coef": torch.tensor([math.nan])}
    mixprec.ops.adam_step_(**st, **kw, backend="reference")
    assert_states_equal(st, before, "skipped")


def test_extension_checks_too():
    """The C++ op refuses what the Python layer would, naming the argument (for callers of torch.ops)."""
    a = _args()
    new = dict(param_remainders=[], exp_avg_scales=[], exp_avg_sq_scales=[])
    with pytest.raises(RuntimeError, match=r"exp_avgs\[0\] must have the shape and strides of params\[0\]"):
        torch.ops.mixprec.adam_step_(a["params"], a["grads"], [torch.zeros(5)], a["exp_avg_sqs"], a["steps"],
                                     max_exp_avg_sqs=[], master_params=a["master_params"], **new,
                                     lr=torch.tensor([1e-3]), beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                                     decoupled=True)
    with pytest.raises(RuntimeError, match=r"params\[0\] is float16: stochastic rounding"):
        torch.ops.mixprec.adam_step_(a["params"], a["grads"], a["exp_avgs"], a["exp_avg_sqs"], a["steps"],
                                     max_exp_avg_sqs=[], master_params=[], **new, lr=torch.tensor([1e-3]), beta1=0.9,
                                     beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True, sr_seed=1)


@pytest.mark.parametrize("variant, state", [("fp32", "fp32"), ("fp16-master", "fp32"), ("bf16-sr", "fp32"),
                                            ("bf16-remainder", "int8"), ("bf16-master", "bf16")])
def test_opcheck(variant, state):
    st = make_state([(33,), (4, 4)], variant, amsgrad=state != "int8", seed=1, state=state)
    kw = hyper(variant)
    args = (st["params"], st["grads"], st["exp_avgs"], st["exp_avg_sqs"], st["steps"])
    lists = ("max_exp_avg_sqs", "master_params", "param_remainders", "exp_avg_scales", "exp_avg_sq_scales")
    kwargs = dict(**{k: st[k] for k in lists}, lr=kw["lr"], beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
                  decoupled=True, maximize=False, grad_scale=kw["grad_scale"], found_inf=kw["found_inf"],
                  clip_coef=kw["clip_coef"], sr_seed=1234 if VARIANTS[variant].stochastic else -1)
    torch.library.opcheck(torch.ops.mixprec.adam_step_.default, args, kwargs)


@pytest.mark.cuda
@pytest.mark.parametrize("variant, state", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("n", SIZES + (3_000_001,))
def test_cuda_matches_reference_bitwise(variant, state, n):
    k = SIZES.index(n) if n in SIZES else 0
    st = make_state([(n,), (5, 3)], variant, amsgrad=bool(k & 1) and state != "int8", seed=n, device="cuda",
                    state=state)
    kw = hyper(variant, device="cuda")
    expected = run_both(st, kw, "cuda")
    assert_states_equal(st, expected, f"cuda {variant} {state} n={n}")
    skipped = clone_state(st)
    mixprec.ops.adam_step_(**skipped, **{**kw, "found_inf": torch.ones(1, device="cuda")}, backend="cuda")
    assert_states_equal(skipped, st, f"cuda {variant} {state} skipped")


def test_torch_compile_fullgraph():
    st = make_state([(1000,), (7,)], "fp16-master", amsgrad=False, seed=4)
    eager = clone_state(st)
    kw = {k: v for k, v in hyper("fp16-master").items() if k != "sr_seed"}

    def step(s):
        mixprec.ops.adam_step_(**s, **kw)
        return s["steps"][0] * 2

    out = torch.compile(step, fullgraph=True, backend="aot_eager")(st)
    expected = step(eager)
    assert_states_equal(st, eager, "compiled")
    assert out.item() == expected.item() == 10.0
