"""mixprec.ops.unscale_and_check_ against torch's own unscale (bitwise) and mixprec.reference (flags, norm)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mixprec
from mixprec import reference
from tests.helpers import DTYPES, assert_bitwise_equal, random_grad, use_backend

BACKENDS = ["cpu-avx2", "cpu-portable", "triton", "reference"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """The backend name to pass; the two CPU variants differ only in MIXPREC_CPU_SIMD."""
    return use_backend(request.param, monkeypatch)


def _scalars(inv=1 / 3):
    # 1/3 is not a power of two: every product is rounded, so bitwise equality checks the rounding mode.
    return torch.tensor([inv], dtype=torch.float32), torch.zeros(1), torch.zeros(1)


def _torch_unscale(grads, inv_scale):
    """torch's kernel, on copies; returns (unscaled copies, found_inf)."""
    copies = [g.clone() for g in grads]
    found = torch.zeros(1)
    by_dtype = {}
    for c in copies:  # torch's op wants one dtype per call on the CPU
        by_dtype.setdefault(c.dtype, []).append(c)
    for group in by_dtype.values():
        torch._amp_foreach_non_finite_check_and_unscale_(group, found, inv_scale)
    return copies, found


def _reference_norm(grads, inv_scale):
    norm = torch.zeros(1)
    reference.unscale_and_check_([g.clone() for g in grads], inv_scale, torch.zeros(1), norm)
    return norm.item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 7, 127, 129, 1000, 65537, 300_001])
@pytest.mark.parametrize("specials", [False, True])
def test_matches_torch_bitwise(backend, dtype, n, specials):
    gen = torch.Generator().manual_seed(n * 7 + DTYPES.index(dtype))
    grads = [random_grad(n, dtype, generator=gen, specials=specials)]
    original = [g.clone() for g in grads]
    inv_scale, found_inf, norm_sq = _scalars()
    expected, expected_found = _torch_unscale(original, inv_scale)
    mixprec.ops.unscale_and_check_(grads, inv_scale, found_inf, norm_sq, backend=backend)
    assert_bitwise_equal(grads[0], expected[0], f"{backend} {dtype} n={n}")
    assert found_inf.item() == expected_found.item() == (1.0 if specials and n > 0 else 0.0)
    ref_norm = _reference_norm(original, inv_scale)
    if specials and n > 0:
        assert not torch.isfinite(norm_sq).item()
    else:
        # fp32 accumulation: partial sums run over at most a few thousand terms, then a fixed tree; 1e-5
        # relative (~170 fp32 ulps) is well above that error bound and far below what any real bug gives.
        assert norm_sq.item() == pytest.approx(ref_norm, rel=1e-5, abs=0.0)


def test_mixed_list_in_one_call(backend):
    gen = torch.Generator().manual_seed(0)
    sizes_dtypes = [(1000, torch.float16), (0, torch.float32), (129, torch.bfloat16), (70000, torch.float32),
                    (7, torch.float16), (65536 * 2 + 3, torch.bfloat16)]
    grads = [random_grad(n, d, generator=gen) for n, d in sizes_dtypes]
    grads.insert(2, None)
    grads[4][5] = float("nan")  # the 70000-element fp32 grad
    original = [None if g is None else g.clone() for g in grads]
    inv_scale, found_inf, norm_sq = _scalars(1 / 1024)
    flags = torch.zeros(len(grads))
    mixprec.ops.unscale_and_check_(grads, inv_scale, found_inf, norm_sq, per_tensor_inf=flags, backend=backend)
    expected, _ = _torch_unscale([g for g in original if g is not None], inv_scale)
    for got, want in zip([g for g in grads if g is not None], expected):
        assert_bitwise_equal(got, want, f"{backend} {got.dtype} n={got.numel()}")
    assert found_inf.item() == 1.0
    assert flags.tolist() == [0, 0, 0, 0, 1, 0, 0]
    assert not torch.isfinite(norm_sq).item()


def test_found_inf_is_never_reset_and_norm_accumulates(backend):
    grads = [torch.randn(100, dtype=torch.float16)]
    inv_scale = torch.tensor([0.5])
    found_inf, norm_sq = torch.ones(1), torch.tensor([10.0])
    expected_norm = 10.0 + float((grads[0].float() * 0.5).double().square().sum())
    mixprec.ops.unscale_and_check_(grads, inv_scale, found_inf, norm_sq, backend=backend)
    assert found_inf.item() == 1.0
    assert norm_sq.item() == pytest.approx(expected_norm, rel=1e-6)


def test_norm_is_deterministic_across_thread_counts():
    gen = torch.Generator().manual_seed(3)
    base = [random_grad(n, torch.float16, generator=gen) for n in (1_000_000, 333_333, 5)]
    results = []
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2, 1, 2):
            torch.set_num_threads(n_threads)
            inv_scale, found_inf, norm_sq = _scalars(1 / 256)
            mixprec.ops.unscale_and_check_([g.clone() for g in base], inv_scale, found_inf, norm_sq, backend="cpu")
            results.append(norm_sq.view(torch.int32).item())
    finally:
        torch.set_num_threads(threads)
    assert len(set(results)) == 1, results


def test_channels_last_grads_are_dense_enough(backend):
    g = torch.randn(4, 3, 5, 6, dtype=torch.float16).to(memory_format=torch.channels_last)
    expected, _ = _torch_unscale([g.contiguous()], torch.tensor([0.25]))
    inv_scale, found_inf, norm_sq = _scalars(0.25)
    mixprec.ops.unscale_and_check_([g], inv_scale, found_inf, norm_sq, backend=backend)
    assert_bitwise_equal(g.contiguous(), expected[0], "channels_last")


def test_empty_list_and_all_none_are_no_ops():
    inv_scale, found_inf, norm_sq = _scalars()
    mixprec.ops.unscale_and_check_([], inv_scale, found_inf, norm_sq)
    mixprec.ops.unscale_and_check_([None, None], inv_scale, found_inf, norm_sq)
    assert found_inf.item() == 0.0 and norm_sq.item() == 0.0


@pytest.mark.parametrize("bad_call, match", [
    (lambda g, i, f: mixprec.ops.unscale_and_check_([torch.ones(3, dtype=torch.int32)], i, f),
     r"grads\[0\] must have dtype"),
    (lambda g, i, f: mixprec.ops.unscale_and_check_(g[0], i, f), "grads must be a list"),
    (lambda g, i, f: mixprec.ops.unscale_and_check_(g, i.double(), f), "inv_scale must be torch.float32"),
    (lambda g, i, f: mixprec.ops.unscale_and_check_(g, torch.ones(2), f), "inv_scale must have exactly one element"),
    (lambda g, i, f: mixprec.ops.unscale_and_check_(g, i, f.to("meta")), "found_inf must be on cpu"),
    (lambda g, i, f: mixprec.ops.unscale_and_check_(g + [torch.ones(2, device="meta")], i, f),
     r"grads\[1\] is on meta"),
    (lambda g, i, f: mixprec.ops.unscale_and_check_(g + [torch.ones(1).expand(4)], i, f),
     r"grads\[1\] has elements that share memory"),
    (lambda g, i, f: mixprec.ops.unscale_and_check_(g + [g[0][2:5]], i, f), r"grads\[0\] and grads\[1\] share memory"),
    (lambda g, i, f: mixprec.ops.unscale_and_check_([torch.ones(4).to_sparse()], i, f), r"grads\[0\] must be a dense"),
    (lambda g, i, f: mixprec.ops.unscale_and_check_(g, i, f, per_tensor_inf=torch.zeros(3)), "per_tensor_inf must be"),
    (lambda g, i, f: mixprec.ops.unscale_and_check_(g, i, f, backend="gpu"), "backend must be one of"),
    (lambda g, i, f: mixprec.ops.unscale_and_check_(g, i, f, backend="cuda"), "needs CUDA tensors"),
])
def test_bad_input_names_the_argument(bad_call, match):
    grads = [torch.randn(8, dtype=torch.float16)]
    before = grads[0].clone()
    with pytest.raises((TypeError, ValueError, RuntimeError), match=match):
        bad_call(grads, torch.tensor([0.5]), torch.zeros(1))
    assert_bitwise_equal(grads[0], before, "a refused call must not touch the grads")


def test_extension_checks_arguments_too():
    """Direct torch.ops callers bypass the Python checks; the C++ op refuses bad input itself."""
    g = torch.ones(100_000)
    for aliased in ([g, g], [g[:10], torch.ones(3), g[9:20]], [torch.ones(3), g, g[-1:]]):
        with pytest.raises(ValueError, match=r"grads\[\d\] and grads\[\d\] share memory"):
            torch.ops.mixprec.unscale_and_check_(aliased, torch.tensor([0.5]), torch.zeros(1))
    assert torch.equal(g, torch.ones(100_000))
    halves = [g[:50_000], g[50_000:]]  # disjoint views of one buffer (DDP's bucket views) are fine
    torch.ops.mixprec.unscale_and_check_(halves, torch.tensor([0.5]), torch.zeros(1))
    assert torch.equal(g, torch.full((100_000,), 0.5))
    with pytest.raises(RuntimeError, match=r"grads\[0\] must be float32, float16 or bfloat16"):
        torch.ops.mixprec.unscale_and_check_([torch.ones(3, dtype=torch.int64)], torch.ones(1), torch.zeros(1))
    with pytest.raises(RuntimeError, match="norm_sq must be float32"):
        torch.ops.mixprec.unscale_and_check_([torch.ones(3)], torch.ones(1), torch.zeros(1),
                                             torch.zeros(1, dtype=torch.float64))


def test_opcheck():
    grads = [torch.randn(100, dtype=torch.float16), torch.randn(7, dtype=torch.bfloat16), torch.randn(33)]
    args = (grads, torch.tensor([0.5]), torch.zeros(1), torch.zeros(1), torch.zeros(3))
    torch.library.opcheck(torch.ops.mixprec.unscale_and_check_.default, args)
    torch.library.opcheck(torch.ops.mixprec.unscale_and_check_.default, args, {"check_only": True})


def test_torch_compile_fullgraph():
    def step(grads, inv_scale, found_inf, norm_sq):
        mixprec.ops.unscale_and_check_(grads, inv_scale, found_inf, norm_sq)
        return norm_sq.sqrt()

    grads = [torch.randn(1000, dtype=torch.float16), torch.randn(50)]
    eager_grads = [g.clone() for g in grads]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    inv_scale = torch.tensor([0.125])
    out = compiled(grads, inv_scale, torch.zeros(1), torch.zeros(1))
    expected = step(eager_grads, inv_scale, torch.zeros(1), torch.zeros(1))
    for g, e in zip(grads, eager_grads):
        assert_bitwise_equal(g, e, "compiled")
    assert out.item() == expected.item()


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=5),
       dtype_ids=st.lists(st.integers(0, 2), min_size=5, max_size=5),
       log2_scale=st.integers(-24, 24), seed=st.integers(0, 2**31 - 1), poison=st.booleans())
def test_property_cpu_matches_reference(sizes, dtype_ids, log2_scale, seed, poison):
    gen = torch.Generator().manual_seed(seed)
    grads = [random_grad(n, DTYPES[dtype_ids[k]], generator=gen, specials=poison) for k, n in enumerate(sizes)]
    ref = [g.clone() for g in grads]
    inv = torch.tensor([2.0 ** -log2_scale])
    f, n, flags = torch.zeros(1), torch.zeros(1), torch.zeros(len(grads))
    rf, rn, rflags = torch.zeros(1), torch.zeros(1), torch.zeros(len(grads))
    mixprec.ops.unscale_and_check_(grads, inv, f, n, per_tensor_inf=flags, backend="cpu")
    reference.unscale_and_check_(ref, inv, rf, rn, rflags)
    for g, r in zip(grads, ref):
        assert_bitwise_equal(g, r, "cpu vs reference")
    assert f.item() == rf.item() and flags.tolist() == rflags.tolist()
    if torch.isfinite(rn).item() and rn.item() > 0:
        assert n.item() == pytest.approx(rn.item(), rel=1e-5)
    else:
        assert n.item() == rn.item() or (torch.isnan(n).item() and torch.isnan(rn).item())


# ------------------------------------------------------------------- layouts, aliases, what is refused
def _gappy_views(dtype, gen, specials):
    """Strided views with gaps, as torch hands out (slices, steps, transposes of slices), of fresh bases; the last,
    sizes (2, 3) and strides (3, 2) (offsets 0 2 4 3 5 7), has strides that do not nest but no element twice."""
    def base(*shape):
        return random_grad(int(torch.tensor(shape).prod()), dtype, generator=gen, specials=specials).reshape(shape)
    return [base(4, 8)[:, :5], base(9, 7)[::2, 1::3], base(6, 10).t()[2:7], base(3, 4, 5)[:, 1:3, ::2],
            base(2, 600)[:, ::3], base(1, 1)[:, :1], base(5, 3)[:, 1], base(8).as_strided((2, 3), (3, 2))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("specials", [False, True])
def test_strided_views_with_gaps_unscale_as_torch(backend, dtype, specials):
    """Non-dense grads go through a dense copy: bitwise torch's values, the memory around them untouched, in one
    call with a dense grad, a None entry and per-tensor flags."""
    gen = torch.Generator().manual_seed(11 + DTYPES.index(dtype) + 5 * specials)
    views = _gappy_views(dtype, gen, specials)
    dense = random_grad(50, dtype, generator=gen)
    grads = [dense, *views[:3], None, *views[3:]]
    # torch's op on copies of the whole bases, through views of the same strides: it writes only the views
    expected_bases = [v._base.clone() for v in views]
    expected = [dense.clone()] + [b.as_strided(v.shape, v.stride(), v.storage_offset())
                                  for b, v in zip(expected_bases, views)]
    inv_scale, found_inf, norm_sq = _scalars(1 / 3)
    torch_found = torch.zeros(1)
    torch._amp_foreach_non_finite_check_and_unscale_(expected, torch_found, inv_scale)
    # the op sums the squares of the unscaled fp32 values, before rounding to the grads' dtype (as the spec does)
    expected_norm = sum(float((g.float() * inv_scale).double().square().sum()) for g in [dense, *views])

    flags = torch.zeros(len(grads))
    mixprec.ops.unscale_and_check_(grads, inv_scale, found_inf, norm_sq, per_tensor_inf=flags, backend=backend)
    assert_bitwise_equal(dense, expected[0], f"{backend} {dtype} dense grad")
    for k, (v, b) in enumerate(zip(views, expected_bases)):
        assert_bitwise_equal(v._base, b, f"{backend} {dtype} view {k} {tuple(v.shape)}:{v.stride()} and around it")
    assert found_inf.item() == torch_found.item() == (1.0 if specials else 0.0)
    bad = [float(not torch.isfinite(e.float()).all()) for e in expected]
    assert flags.tolist() == bad[:4] + [0.0] + bad[4:]
    if not specials:
        assert norm_sq.item() == pytest.approx(expected_norm, rel=1e-5)


@pytest.mark.parametrize("inv_shape", [(1,), (), (1, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_dim_grads_with_any_one_element_inv_scale(backend, dtype, inv_shape):
    """torch's _amp_foreach_non_finite_check_and_unscale_ takes a 0-dim grad with a (1,)-shaped inv_scale: so does
    every backend, and the grad stays 0-dim."""
    gen = torch.Generator().manual_seed(2)
    grads = [random_grad(1, dtype, generator=gen).reshape(()), random_grad(5, dtype, generator=gen)]
    inv_scale = torch.full(inv_shape, 1 / 3)
    expected, _ = _torch_unscale(grads, inv_scale)
    found_inf, norm_sq = torch.zeros(inv_shape), torch.zeros(inv_shape)
    mixprec.ops.unscale_and_check_(grads, inv_scale, found_inf, norm_sq, backend=backend)
    for g, e in zip(grads, expected):
        assert_bitwise_equal(g, e, f"{backend} {dtype} inv_scale {inv_shape}")
    assert found_inf.shape == inv_shape and found_inf.item() == 0.0


def _inference(t):
    with torch.inference_mode():
        return t.clone()


@pytest.mark.parametrize("case, error, match", [
    ("same tensor twice", ValueError, r"grads\[0\] and grads\[2\] share memory"),
    ("overlapping views", ValueError, r"grads\[1\] and grads\[2\] share memory"),
    ("expanded grad", RuntimeError, r"grads\[2\] has elements that share memory"),
    ("inference grad", RuntimeError, r"grads\[2\] is an inference tensor"),
    ("leaf requiring grad", RuntimeError, r"grads\[2\] is a leaf tensor that requires grad"),
    ("inference found_inf", RuntimeError, r"found_inf is an inference tensor"),
    ("inference norm_sq", RuntimeError, r"norm_sq is an inference tensor"),
])
def test_every_backend_refuses_the_same_and_writes_nothing(backend, case, error, match):
    g0, g1 = torch.randn(300), torch.randn(2, 40).half()
    found_inf, norm_sq = torch.zeros(1), torch.zeros(1)
    third = {"same tensor twice": g0, "overlapping views": g1.view(-1)[30:50], "expanded grad": torch.ones(1).expand(9),
             "inference grad": _inference(torch.randn(4)), "leaf requiring grad": torch.randn(4, requires_grad=True)}
    grads = [g0, g1, third.get(case, torch.randn(6))]
    if case == "inference found_inf":
        found_inf = _inference(found_inf)
    if case == "inference norm_sq":
        norm_sq = _inference(norm_sq)
    before = [g.detach().clone() for g in grads]
    with pytest.raises(error, match=match):
        mixprec.ops.unscale_and_check_(grads, torch.tensor([0.5]), found_inf, norm_sq, backend=backend)
    for g, b in zip(grads, before):
        assert_bitwise_equal(g.detach(), b, f"{backend}: {case} must leave every grad as it was")
    assert found_inf.item() == 0.0 and norm_sq.item() == 0.0


def test_writable_where_torch_allows_it(backend):
    """The refusals are torch's in-place rules: a leaf requiring grad is written under no_grad, an inference
    tensor under inference_mode."""
    leaf = torch.full((4,), 2.0, requires_grad=True)
    with torch.no_grad():
        mixprec.ops.unscale_and_check_([leaf], torch.tensor([0.5]), torch.zeros(1), backend=backend)
    assert leaf.tolist() == [1.0] * 4
    with torch.inference_mode():
        g, found_inf = torch.full((4,), 2.0), torch.zeros(1)
        mixprec.ops.unscale_and_check_([g], torch.tensor([0.5]), found_inf, backend=backend)
    assert g.tolist() == [1.0] * 4


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_torch(dtype):
    gen = torch.Generator().manual_seed(1)
    grads = [random_grad(n, dtype, generator=gen, specials=True).cuda() for n in (1, 1000, 65537, 1_000_003)]
    grads.append(random_grad(5000, dtype, generator=gen).cuda()[1:])  # misaligned start: the scalar path
    original = [g.clone() for g in grads]
    inv_scale = torch.tensor([1 / 3], device="cuda")
    found_inf, norm_sq = torch.zeros(1, device="cuda"), torch.zeros(1, device="cuda")
    mixprec.ops.unscale_and_check_(grads, inv_scale, found_inf, norm_sq, backend="cuda")
    expected = [g.clone() for g in original]
    torch._amp_foreach_non_finite_check_and_unscale_(expected, torch.zeros(1, device="cuda"), inv_scale)
    for g, e in zip(grads, expected):
        assert_bitwise_equal(g, e, f"cuda {dtype}")
    assert found_inf.item() == 1.0
    clean = [random_grad(n, dtype, generator=gen).cuda() for n in (3, 70000, 1_000_000)]
    norms = []
    for _ in range(2):
        n = torch.zeros(1, device="cuda")
        mixprec.ops.unscale_and_check_([c.clone() for c in clean], inv_scale, torch.zeros(1, device="cuda"), n)
        norms.append(n.item())
    assert norms[0] == norms[1]  # deterministic two-level reduction
    ref = torch.zeros(1, device="cuda")
    reference.unscale_and_check_([c.clone() for c in clean], inv_scale, torch.zeros(1, device="cuda"), ref)
    assert norms[0] == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("kernel_backend", ["cpu", "triton"])
def test_inv_scale_one_is_a_read_only_check_pass(kernel_backend):
    """With inv_scale == 1 the kernels must not write: a signalling NaN, which any fp32 multiply-and-store would
    quiet (0x7f800001 -> 0x7fc00001), keeps its bits, while the overflow is still found."""
    g = torch.randn(100_000)
    g.view(torch.int32)[12345] = 0x7F800001
    before = g.view(torch.int32).clone()
    found_inf, norm_sq = torch.zeros(1), torch.zeros(1)
    mixprec.ops.unscale_and_check_([g], torch.ones(1), found_inf, norm_sq, backend=kernel_backend)
    assert torch.equal(g.view(torch.int32), before)
    assert found_inf.item() == 1.0
    # and with any other scale it does write (so the check above can fail)
    mixprec.ops.unscale_and_check_([g], torch.tensor([0.5]), found_inf, norm_sq, backend=kernel_backend)
    assert g.view(torch.int32)[12345].item() != 0x7F800001


# ------------------------------------------------------------------- overflow of the unscaled values
# A loss scale below 1 makes inv_scale > 1: a finite grad can overflow once unscaled. torch writes the inf and
# leaves found_inf at 0 (it checks the inputs); mixprec writes the same bits and flags it.
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
# inv_scale = 1 / scale in fp32 for scales below 1: GradScaler's floor, a power of two, user-chosen ones
_OVERFLOW_INVS = [2.0**126, 2.0**20, 1 / 0.75, 1.0001, 1 + 2.0**-23]


def _near_overflow_grads(dtype, inv, largest=None):
    """Grads of dtype, 1000 values each: small ones (far from overflowing) and one value a few ulps (of dtype)
    either side of `largest` / inv (largest: dtype's largest finite value by default), at an index of the vector
    loops (517) or of the scalar tail (999). None when that value is not a normal number of dtype."""
    largest = torch.finfo(dtype).max if largest is None else largest
    edge = torch.tensor([largest / inv]).to(dtype)  # rounded to dtype: near the boundary
    if not torch.finfo(dtype).tiny <= edge.item() < math.inf:
        return None
    bits = int(edge.view(_INT_VIEW[dtype]))
    grads = []
    for step in range(-3, 4):
        value = torch.tensor([bits + step]).to(_INT_VIEW[dtype]).view(dtype)
        if not torch.isfinite(value.float()).all():  # past dtype's largest value: not a finite grad
            continue
        for pos, sign in ((517, 1), (999, -1)):
            g = (torch.rand(1000, generator=torch.Generator().manual_seed(pos + step)) * edge.float() / 4).to(dtype)
            g[pos] = sign * value
            grads.append(g)
    return grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inv", _OVERFLOW_INVS)
def test_values_that_overflow_when_unscaled_are_found(backend, dtype, inv):
    """Finite grads just below and above dtype's largest value times the scale: the values are torch's, bit for
    bit (inf where the product overflows, as written in dtype), and found_inf and per_tensor_inf flag exactly the
    grads holding a non-finite unscaled value, where torch's found_inf stays 0."""
    grads = _near_overflow_grads(dtype, inv)
    if grads is None:
        pytest.skip(f"every nonzero {dtype} value overflows at inv_scale {inv} (the fp32 cases have the boundary)")
    inv_scale = torch.tensor([inv], dtype=torch.float32)
    expected, torch_found = _torch_unscale(grads, inv_scale)
    want = [float(not torch.isfinite(e.float()).all()) for e in expected]
    top = torch.tensor([torch.finfo(dtype).max], dtype=dtype)
    if not torch.isfinite(_torch_unscale([top], inv_scale)[0][0].float()).all():  # dtype can overflow at inv
        assert 0 < sum(want) < len(want), "the cases must straddle the boundary"
    assert torch_found.item() == 0.0  # torch misses every one of them
    found_inf, norm_sq, flags = torch.zeros(1), torch.zeros(1), torch.zeros(len(grads))
    mixprec.ops.unscale_and_check_(grads, inv_scale, found_inf, norm_sq, per_tensor_inf=flags, backend=backend)
    for k, (g, e) in enumerate(zip(grads, expected)):
        assert_bitwise_equal(g, e, f"{backend} {dtype} inv {inv} grad {k}")
    assert flags.tolist() == want, f"{backend} {dtype} inv {inv}"
    assert found_inf.item() == float(any(want))
    # one clean grad alone is not flagged
    clean = _near_overflow_grads(dtype, inv)[want.index(0.0)]
    f = torch.zeros(1)
    mixprec.ops.unscale_and_check_([clean], inv_scale, f, backend=backend)
    assert f.item() == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inv", _OVERFLOW_INVS)
def test_check_only_flags_the_fp32_products_and_writes_nothing(backend, dtype, inv):
    """check_only (the check GradScaler runs before a fused optimizer, which unscales in fp32 itself): nothing is
    written, found_inf/per_tensor_inf flag the grads whose fp32 product g * inv_scale is inf or NaN (not those
    that would overflow dtype only), norm_sq is the sum of squares of the values as they are."""
    grads = _near_overflow_grads(dtype, inv, largest=torch.finfo(torch.float32).max)  # fp32's boundary
    straddles = grads is not None
    if dtype is not torch.float32:  # and dtype's own: overflowing dtype when unscaled, never fp32
        grads = (grads or []) + (_near_overflow_grads(dtype, inv) or [])
    if not grads:
        pytest.skip(f"no normal {dtype} value near either boundary at inv_scale {inv}")
    before = [g.clone() for g in grads]
    inv_scale = torch.tensor([inv], dtype=torch.float32)
    want = [float(not torch.isfinite(g.float() * inv_scale).all()) for g in grads]
    if straddles:
        assert 0 < sum(want) < len(want), "the cases must straddle the boundary"
    found_inf, norm_sq, flags = torch.zeros(1), torch.zeros(1), torch.zeros(len(grads))
    mixprec.ops.unscale_and_check_(grads, inv_scale, found_inf, norm_sq, per_tensor_inf=flags, check_only=True,
                                   backend=backend)
    for k, (g, b) in enumerate(zip(grads, before)):
        assert_bitwise_equal(g, b, f"{backend} {dtype} inv {inv} grad {k} (check_only writes nothing)")
    assert flags.tolist() == want, f"{backend} {dtype} inv {inv}"
    assert found_inf.item() == float(any(want))
    exact = sum(float(g.double().square().sum()) for g in before)
    if exact < torch.finfo(torch.float32).max / 2:
        assert norm_sq.item() == pytest.approx(exact, rel=1e-5)
    else:
        assert norm_sq.item() == math.inf or norm_sq.item() == pytest.approx(exact, rel=1e-5)


@pytest.mark.parametrize("check_only", [False, True])
def test_check_only_agrees_with_the_reference_on_random_grads(backend, check_only):
    """Both modes on a mixed list of random grads (specials included) at several scales, against the spec."""
    gen = torch.Generator().manual_seed(5 + check_only)
    for log2_inv in (-3, 0, 7, 60, 127):
        grads = [random_grad(n, DTYPES[k % 3], generator=gen, specials=k == 2) for k, n in
                 enumerate((1, 33, 1000, 70_000))]
        ref = [g.clone() for g in grads]
        inv = torch.tensor([2.0**log2_inv * 1.25])
        f, n, flags = torch.zeros(1), torch.zeros(1), torch.zeros(len(grads))
        rf, rn, rflags = torch.zeros(1), torch.zeros(1), torch.zeros(len(grads))
        mixprec.ops.unscale_and_check_(grads, inv, f, n, per_tensor_inf=flags, check_only=check_only,
                                       backend=backend)
        reference.unscale_and_check_(ref, inv, rf, rn, rflags, check_only=check_only)
        for g, r in zip(grads, ref):
            assert_bitwise_equal(g, r, f"{backend} vs reference, check_only={check_only}")
        assert f.item() == rf.item() and flags.tolist() == rflags.tolist(), log2_inv
        if torch.isfinite(rn).item() and rn.item() > 0:
            assert n.item() == pytest.approx(rn.item(), rel=1e-5)
        else:
            assert n.item() == rn.item() or (torch.isnan(n).item() and torch.isnan(rn).item())


@pytest.mark.parametrize("check_only", [False, True])
@pytest.mark.parametrize("inv, want", [(0.0, [1.0, 0.0, 0.0]), (math.inf, [1.0, 1.0, 0.0]),
                                       (math.nan, [1.0, 1.0, 0.0])])
def test_degenerate_inv_scales(backend, check_only, inv, want):
    """inv_scale 0: only non-finite inputs are flagged (inf * 0 is NaN), as torch flags them; inf or NaN: every
    grad holding a value is (its unscaled values are inf or NaN; 0 * inf is NaN), an empty one is not."""
    grads = [torch.tensor([1.0, math.inf, 3.0]), torch.zeros(40, dtype=torch.float16), torch.zeros(0)]
    flags, found_inf = torch.zeros(3), torch.zeros(1)
    mixprec.ops.unscale_and_check_(grads, torch.tensor([inv]), found_inf, per_tensor_inf=flags,
                                   check_only=check_only, backend=backend)
    assert flags.tolist() == want and found_inf.item() == 1.0


def test_check_only_must_be_a_bool():
    with pytest.raises(TypeError, match="check_only must be a bool"):
        mixprec.ops.unscale_and_check_([torch.ones(3)], torch.ones(1), torch.zeros(1), check_only=1)
