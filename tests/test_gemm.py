"""mixprec.ops.matmul / matmul_accumulate_ against an fp64 reference, on every backend available here.

Error metric: max|out - ref| / max|ref| with ref = the fp64 product of the (exact) half inputs. The output's
one rounding contributes at most half an ulp of the largest element (2^-11 fp16, 2^-8 bf16 relative to
max|ref|) and fp32 accumulation over K <= 1000 adds ~1e-6, so 1e-3 (fp16) and 1e-2 (bf16) bound a correct
kernel with room for the summation order, while a wrong tile, stride or mask gives errors of order 1.
"""
import pytest
import torch

import mixprec
from mixprec import _backend, _ext
from mixprec.testing import GEMM_TOL as TOL  # shared with `python -m mixprec selftest`
from mixprec.testing import max_rel_err as rel_err

BACKENDS = ["triton", "reference"] + (["cpu"] if _ext.available() else [])


def make(shape, dtype, gen, transpose=False):
    if transpose:  # the same values, stored transposed: a view with unit stride along the first dim
        return torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen).to(dtype).transpose(-1, -2)
    return torch.randn(*shape, generator=gen).to(dtype)


CASES = [  # (batch, M, N, K, a transposed, b transposed)
    ((), 1, 7, 127, False, False),
    ((), 7, 1, 129, False, True),
    ((), 127, 129, 65, True, False),
    ((), 129, 127, 31, True, True),
    ((), 1, 33, 1000, False, True),  # big K: the one long k loop
    ((2, 3), 7, 40, 24, False, True),
    ((3,), 129, 9, 16, True, False),  # transposed batch: not foldable into one GEMM
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_matmul_vs_fp64(case, dtype, backend):
    batch, M, N, K, ta, tb = case
    gen = torch.Generator().manual_seed(M * 1000 + N + K)
    a = make((*batch, M, K), dtype, gen, ta)
    b = make((K, N), dtype, gen, tb)
    out = mixprec.ops.matmul(a, b, backend=backend)
    ref = a.double() @ b.double()
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_err(out, ref) <= TOL[dtype], f"rel err {rel_err(out, ref):.2e}"


def fp64_grads(tensors, out, grad):
    """torch.autograd's gradients of out(*fp64 copies of tensors) for the output gradient `grad`."""
    copies = [t.detach().double().requires_grad_() for t in tensors]
    out(*copies).backward(grad.double())
    return [c.grad for c in copies]


# Each gradient is one GEMM (or the bias's sum) of exact half inputs with fp32 accumulation and one rounding, over
# at most 3 * 129 rows here: the forward's error bound, GEMM_TOL, covers it.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_matmul_grads_vs_fp64(case, dtype, backend):
    batch, M, N, K, ta, tb = case
    gen = torch.Generator().manual_seed(M * 1000 + N + K + 1)
    a = make((*batch, M, K), dtype, gen, ta).requires_grad_()
    b = make((K, N), dtype, gen, tb).requires_grad_()
    bias = make((N,), dtype, gen).requires_grad_()
    grad = make((*batch, M, N), dtype, gen)
    mixprec.ops.matmul(a, b, bias=bias, backend=backend).backward(grad)
    refs = fp64_grads((a, b, bias), lambda a, b, bias: a @ b + bias, grad)
    for name, t, ref in zip("a b bias".split(), (a, b, bias), refs):
        assert t.grad.dtype == dtype and t.grad.shape == t.shape, name
        assert rel_err(t.grad, ref) <= TOL[dtype], f"grad {name}: rel err {rel_err(t.grad, ref):.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, "other half"])
def test_grads_of_out_dtype(dtype, out_dtype, backend):
    """A grad of out_dtype is rounded once to the operands' dtype before the GEMMs (which need half operands); the
    fp32 bias's gradient sums the grad as it came."""
    if out_dtype == "other half":
        out_dtype = torch.bfloat16 if dtype == torch.float16 else torch.float16
    gen = torch.Generator().manual_seed(4)
    a, b = make((3, 65, 48), dtype, gen).requires_grad_(), make((48, 70), dtype, gen, True).requires_grad_()
    bias = torch.randn(70, generator=gen, requires_grad=True)
    grad = torch.randn(3, 65, 70, generator=gen).to(out_dtype)
    mixprec.ops.matmul(a, b, bias=bias, out_dtype=out_dtype, backend=backend).backward(grad)
    ref_a, ref_b, _ = fp64_grads((a, b, bias), lambda a, b, bias: a @ b + bias, grad.to(dtype))
    ref_bias = grad.double().sum((0, 1))
    assert a.grad.dtype == b.grad.dtype == dtype and bias.grad.dtype == torch.float32
    assert rel_err(a.grad, ref_a) <= TOL[dtype] and rel_err(b.grad, ref_b) <= TOL[dtype]
    assert rel_err(bias.grad, ref_bias) <= TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wanted", ["a", "b", "bias"])
def test_grads_of_some_inputs(wanted, backend):
    """Only the gradients asked for are computed (the others are None), each right on its own."""
    gen = torch.Generator().manual_seed(6)
    inputs = {"a": make((9, 16), torch.float16, gen), "b": make((16, 5), torch.float16, gen),
              "bias": make((5,), torch.float16, gen)}
    inputs[wanted].requires_grad_()
    grad = make((9, 5), torch.float16, gen)
    out = mixprec.ops.matmul(inputs["a"], inputs["b"], bias=inputs["bias"], backend=backend)
    (got,) = torch.autograd.grad(out, inputs[wanted], grad)
    ref = dict(zip(inputs, fp64_grads(inputs.values(), lambda a, b, bias: a @ b + bias, grad)))[wanted]
    assert got.dtype == torch.float16 and rel_err(got, ref) <= TOL[torch.float16]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])  # the spec makes no layout promise
@pytest.mark.parametrize("ta,tb", [(False, True), (True, False), (True, True)])
def test_grads_come_in_their_inputs_layout(ta, tb, backend):
    """b = weight.t() (stride(0) == 1) gets a gradient of its own strides, so that the weight's is contiguous and
    AccumulateGrad copies nothing; likewise a transposed 2-D a."""
    gen = torch.Generator().manual_seed(9)
    a = make((33, 40), torch.float16, gen, ta).requires_grad_()
    b = make((40, 17), torch.float16, gen, tb).requires_grad_()
    grad_a, grad_b = torch.autograd.grad(mixprec.ops.matmul(a, b, backend=backend), (a, b),
                                         make((33, 17), torch.float16, gen))
    assert grad_a.stride() == a.stride() and grad_b.stride() == b.stride()


@pytest.mark.skipif(not _ext.available(), reason="mixprec._C not built")
def test_op_is_differentiable():
    a = torch.randn(4, 6).half().requires_grad_()
    out = torch.ops.mixprec.matmul(a, torch.randn(6, 2).half(), None, torch.float32)
    assert out.grad_fn is not None and out.requires_grad
    (grad_a,) = torch.autograd.grad(out.sum(), a)
    assert grad_a.dtype == torch.float16 and grad_a.shape == a.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [None, torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, "same"])
def test_bias_and_out_dtype(dtype, out_dtype, bias_dtype, backend):
    gen = torch.Generator().manual_seed(3)
    a, b = make((65, 48), dtype, gen), make((48, 70), dtype, gen, True)
    bias = None if bias_dtype is None else make((70,), dtype if bias_dtype == "same" else bias_dtype, gen)
    out = mixprec.ops.matmul(a, b, bias=bias, out_dtype=out_dtype, backend=backend)
    ref = a.double() @ b.double() + (0 if bias is None else bias.double())
    assert out.dtype == (out_dtype or dtype)
    tol = TOL[out_dtype or dtype]
    assert rel_err(out, ref) <= tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rounds_once_to_nearest_even(dtype, backend):
    """Small integers: every product and sum is exact in fp32, so the output must be exactly the fp32 result
    rounded to nearest even; truncation (the interpreter's plain bf16 cast) or double rounding would differ."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randint(-64, 64, (33, 40), generator=gen).to(dtype)
    b = torch.randint(-64, 64, (40, 17), generator=gen).to(dtype)
    bias = torch.randint(-9, 9, (17,), generator=gen).float() + 0.5
    exact = (a.double() @ b.double() + bias.double()).float()
    out = mixprec.ops.matmul(a, b, bias=bias, backend=backend)
    assert torch.equal(out, exact.to(dtype)), (out.float() - exact.to(dtype).float()).abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matmul_accumulate_(dtype, backend):
    gen = torch.Generator().manual_seed(7)
    a, b = make((129, 100), dtype, gen, True), make((100, 65), dtype, gen)  # dW = dY^T X layout
    c = torch.randn(129, 65, generator=gen)
    ref = c.double() + a.double() @ b.double()
    ptr = c.data_ptr()
    assert mixprec.ops.matmul_accumulate_(c, a, b, backend=backend) is None
    assert c.data_ptr() == ptr and c.dtype == torch.float32
    # fp32 result: only the fp32 accumulation error remains
    assert rel_err(c, ref) <= TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_matmul_accumulate_into_strided_c(backend):
    gen = torch.Generator().manual_seed(8)
    a, b = make((2, 9, 16), torch.float16, gen), make((16, 5), torch.float16, gen)
    c = torch.randn(5, 9, 2, generator=gen).permute(2, 1, 0)  # not viewable as [B, M, N] with unit stride
    ref = c.double() + a.double() @ b.double()
    mixprec.ops.matmul_accumulate_(c, a, b, backend=backend)
    assert rel_err(c, ref) <= TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_k0(backend):
    a, b = torch.zeros(4, 0, dtype=torch.float16), torch.zeros(0, 3, dtype=torch.float16)
    bias = torch.tensor([1.0, 2.0, 3.0])
    out = mixprec.ops.matmul(a, b, bias=bias, backend=backend)
    assert torch.equal(out, bias.half().expand(4, 3))
    assert mixprec.ops.matmul(torch.zeros(0, 5, dtype=torch.half), torch.zeros(5, 3, dtype=torch.half),
                              backend=backend).shape == (0, 3)


def test_bad_inputs_name_the_argument():
    h = torch.float16
    with pytest.raises(TypeError, match=r"^a must have dtype in \[.torch.float16., .torch.bfloat16.\]"):
        mixprec.ops.matmul(torch.zeros(2, 3), torch.zeros(3, 4, dtype=h))
    with pytest.raises(TypeError, match="^b must have a's dtype"):
        mixprec.ops.matmul(torch.zeros(2, 3, dtype=h), torch.zeros(3, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"^b must have shape \[K, N\] with K = a.shape\[-1\] = 3"):
        mixprec.ops.matmul(torch.zeros(2, 3, dtype=h), torch.zeros(4, 4, dtype=h))
    with pytest.raises(ValueError, match="^b must be on a's device"):
        mixprec.ops.matmul(torch.zeros(2, 3, dtype=h), torch.zeros(3, 4, dtype=h, device="meta"))
    with pytest.raises(ValueError, match="^bias must have shape"):
        mixprec.ops.matmul(torch.zeros(2, 3, dtype=h), torch.zeros(3, 4, dtype=h), bias=torch.zeros(3))
    with pytest.raises(TypeError, match="^out_dtype must be"):
        mixprec.ops.matmul(torch.zeros(2, 3, dtype=h), torch.zeros(3, 4, dtype=h), out_dtype=torch.int32)
    with pytest.raises(TypeError, match="^c must be a float32 tensor"):
        mixprec.ops.matmul_accumulate_(torch.zeros(2, 4, dtype=h), torch.zeros(2, 3, dtype=h),
                                       torch.zeros(3, 4, dtype=h))
    with pytest.raises(ValueError, match="^c must have shape"):
        mixprec.ops.matmul_accumulate_(torch.zeros(4, 2), torch.zeros(2, 3, dtype=h), torch.zeros(3, 4, dtype=h))


@pytest.mark.skipif(not _ext.available(), reason="mixprec._C not built")
def test_cpu_op_checks_name_the_argument():
    with pytest.raises(RuntimeError, match="b must have shape"):
        torch.ops.mixprec.matmul(torch.zeros(2, 3, dtype=torch.half), torch.zeros(4, 4, dtype=torch.half), None, None)
    with pytest.raises(RuntimeError, match="c must be float32"):
        torch.ops.mixprec.matmul_accumulate_(torch.zeros(2, 4, dtype=torch.half), torch.zeros(2, 3, dtype=torch.half),
                                             torch.zeros(3, 4, dtype=torch.half))


@pytest.mark.skipif(not _ext.available(), reason="mixprec._C not built")
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    """With inputs requiring grad, opcheck's test_autograd_registration needs the op's autograd registration and
    test_aot_dispatch_dynamic traces its backward."""
    a = torch.randn(5, 8).half().requires_grad_(requires_grad)
    b = torch.randn(8, 3).half().requires_grad_(requires_grad)
    bias = torch.randn(3, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.mixprec.matmul.default, (a, b, bias, torch.float32))
    torch.library.opcheck(torch.ops.mixprec.matmul_accumulate_.default, (torch.zeros(5, 3), a, b))


@pytest.mark.skipif(not _backend.triton_interpreter_enabled(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_triton(requires_grad):
    a = torch.randn(2, 5, 8).half().requires_grad_(requires_grad)
    b = torch.randn(3, 8).half().t().requires_grad_(requires_grad)
    bias = torch.randn(3).half().requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.mixprec.matmul_triton.default, (a, b, bias))


@pytest.mark.skipif(not _ext.available(), reason="mixprec._C not built")
def test_torch_compile_fullgraph():
    a, b = torch.randn(5, 8).half(), torch.randn(8, 3).half()
    f = torch.compile(lambda a, b: mixprec.ops.matmul(a, b, out_dtype=torch.float32) * 2, fullgraph=True,
                      backend="eager")
    torch.testing.assert_close(f(a, b), mixprec.reference.matmul(a, b, out_dtype=torch.float32) * 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_backward(backend):
    """aot_eager traces the registered backward (on fake tensors) into the backward graph."""
    gen = torch.Generator().manual_seed(10)
    a, b = make((2, 5, 8), torch.float16, gen).requires_grad_(), make((8, 3), torch.float16, gen, True)
    b.requires_grad_()
    f = torch.compile(lambda a, b: mixprec.ops.matmul(a, b, backend=backend).float().square().sum(), fullgraph=True,
                      backend="aot_eager")
    got = torch.autograd.grad(f(a, b), (a, b))
    want = torch.autograd.grad(mixprec.ops.matmul(a, b, backend=backend).float().square().sum(), (a, b))
    for g, w in zip(got, want):
        assert torch.equal(g, w)


# ------------------------------------------------------------------------------------------------ hardening

def _strided_biases(n, dtype, gen):
    """Biases [n] that are not contiguous: every other element of a longer vector, and one value expanded
    (stride 0), whose storage holds a single element: a kernel reading bias[i] at offset i reads past it."""
    wide = make((2 * n,), dtype, gen)
    one = make((1,), dtype, gen)
    return {"every other": wide[::2], "expanded": one.expand(n)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,bias_dtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("kind", ["every other", "expanded"])
def test_bias_of_any_strides(kind, dtype, bias_dtype, backend):
    """The bias is read through its own stride (a strided or expanded [N] view is a valid bias, as for torch.addmm),
    in the forward and in its gradient."""
    gen = torch.Generator().manual_seed(16)
    a, b = make((2, 37, 24), dtype, gen), make((24, 70), dtype, gen, True)
    bias = _strided_biases(70, bias_dtype, gen)[kind]
    out = mixprec.ops.matmul(a, b, bias=bias, backend=backend)
    ref = a.double() @ b.double() + bias.double()
    assert rel_err(out, ref) <= TOL[dtype], f"rel err {rel_err(out, ref):.2e}"
    # the same through autograd: the grad of a strided bias view reaches its base
    base = bias._base.detach().clone().requires_grad_()
    view = base[::2] if kind == "every other" else base.expand(70)
    grad = make((2, 37, 70), dtype, gen)
    mixprec.ops.matmul(a, b, bias=view, backend=backend).backward(grad)
    want = grad.double().sum((0, 1))
    want = torch.zeros(140, dtype=torch.float64).index_put_((torch.arange(0, 140, 2),), want) if kind == "every other" \
        else want.sum(0, keepdim=True)
    assert rel_err(base.grad, want) <= TOL[bias_dtype]


def _self_overlapping_outputs(shape):
    """fp32 outputs of `shape` in which several elements share one memory location."""
    m, n = shape
    return {
        "rows alias (stride 0)": torch.randn(1, n).expand(m, n),
        "columns alias (stride 0)": torch.randn(m, 1).expand(m, n),
        "rows overlap (stride 1 < N)": torch.randn(m + n).as_strided((m, n), (1, 1)),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["rows alias (stride 0)", "columns alias (stride 0)", "rows overlap (stride 1 < N)"])
def test_accumulate_refuses_self_overlapping_c(kind, backend):
    """c += a @ b into a c whose elements share memory has no defined result (each alias would receive one of
    several sums, or their sum, depending on the tiling): refused on every backend, and nothing is written."""
    gen = torch.Generator().manual_seed(17)
    a, b = make((9, 16), torch.float16, gen), make((16, 5), torch.float16, gen)
    c = _self_overlapping_outputs((9, 5))[kind]
    before = c.clone()
    with pytest.raises(ValueError, match="^c has elements that share memory"):
        mixprec.ops.matmul_accumulate_(c, a, b, backend=backend)
    assert torch.equal(c, before)


@pytest.mark.skipif(not _ext.available(), reason="needs the mixprec._C extension")
@pytest.mark.parametrize("kind", ["rows alias (stride 0)", "columns alias (stride 0)"])
def test_accumulate_op_refuses_expanded_c(kind):
    """The extension's own check, for a direct torch.ops.mixprec.matmul_accumulate_ call (which skips the Python
    checks): an expanded c is refused before anything is written."""
    gen = torch.Generator().manual_seed(17)
    a, b = make((9, 16), torch.float16, gen), make((16, 5), torch.float16, gen)
    c = _self_overlapping_outputs((9, 5))[kind]
    before = c.clone()
    with pytest.raises(RuntimeError, match="c has elements that share memory"):
        torch.ops.mixprec.matmul_accumulate_(c, a, b)
    assert torch.equal(c, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulate_takes_non_overlapping_c_of_unusual_strides(backend):
    """A c whose sorted strides do not nest (sizes (2, 3), strides (3, 2): offsets 0 2 4 3 5 7) still writes each
    element once: accepted, not mistaken for an overlap."""
    gen = torch.Generator().manual_seed(18)
    a, b = make((2, 16), torch.float16, gen), make((16, 3), torch.float16, gen)
    storage = torch.randn(8, generator=gen)
    c = storage.as_strided((2, 3), (3, 2))
    gaps = storage[[1, 6]].clone()
    ref = c.double() + a.double() @ b.double()
    mixprec.ops.matmul_accumulate_(c, a, b, backend=backend)
    assert rel_err(c, ref) <= TOL[torch.float32]
    assert torch.equal(storage[[1, 6]], gaps)  # the two offsets c does not cover stay as they were


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulate_refuses_what_torch_refuses_in_place(backend):
    """c is written in place: an inference tensor (outside inference mode) and a leaf that requires grad (with
    grad mode on) are refused as torch's own in-place ops refuse them, with RuntimeError, and left unwritten."""
    gen = torch.Generator().manual_seed(19)
    a, b = make((9, 16), torch.float16, gen), make((16, 5), torch.float16, gen)
    with torch.inference_mode():
        inference = torch.randn(9, 5)
    leaf = torch.randn(9, 5, requires_grad=True)
    for c, match in ((inference, "^c is an inference tensor"), (leaf, "^c is a leaf tensor that requires grad")):
        before = c.detach().clone()
        with pytest.raises(RuntimeError, match=match):
            mixprec.ops.matmul_accumulate_(c, a, b, backend=backend)
        assert torch.equal(c.detach(), before)
    # where torch allows the write, so does mixprec: inside inference mode, and under no_grad
    ref = leaf.detach().double() + a.double() @ b.double()
    with torch.no_grad():
        mixprec.ops.matmul_accumulate_(leaf, a, b, backend=backend)
    assert rel_err(leaf.detach(), ref) <= TOL[torch.float32]
    with torch.inference_mode():
        ref = inference.double() + a.double() @ b.double()
        mixprec.ops.matmul_accumulate_(inference, a, b, backend=backend)
        assert rel_err(inference, ref) <= TOL[torch.float32]
