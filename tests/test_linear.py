"""mixprec.functional.linear and mixprec.nn.Linear: outputs and gradients against fp64, main_grad fusion."""
import pytest
import torch

import mixprec
import mixprec.nn  # not imported by mixprec/__init__.py
from mixprec import _ext
from mixprec.functional import linear

BACKENDS = ["triton", "reference"] + (["cpu"] if _ext.available() else [])


def rel_err(out, ref):
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-3), (torch.bfloat16, 1e-2)])
def test_linear_forward_backward(dtype, tol, backend):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 7, 33, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(17, 33, generator=gen).to(dtype).requires_grad_()
    b = torch.randn(17, generator=gen).to(dtype).requires_grad_()
    gy = torch.randn(2, 7, 17, generator=gen).to(dtype)
    y = linear(x, w, b, backend=backend)
    y.backward(gy)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    yd = torch.nn.functional.linear(xd, wd, bd)
    yd.backward(gy.double())
    for name, got, ref in (("y", y, yd), ("dx", x.grad, xd.grad), ("dw", w.grad, wd.grad), ("db", b.grad, bd.grad)):
        assert got.dtype == dtype, name
        assert rel_err(got, ref) <= tol, f"{name}: {rel_err(got, ref):.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_main_grad_accumulates_in_fp32(backend):
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(9, 20, generator=gen).half()
    w = torch.randn(6, 20, generator=gen).half().requires_grad_()
    w.main_grad = torch.randn(6, 20, generator=gen)
    start = w.main_grad.clone()
    for _ in range(2):
        linear(x, w, backend=backend).float().sum().backward()
    ref = start.double() + 2 * torch.ones(9, 6).double().t() @ x.double()
    assert w.grad is None, "dW goes into main_grad, not .grad"
    assert rel_err(w.main_grad, ref) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_main_grad_path_keeps_dx_and_db(backend):
    """With main_grad, dx and db still come from the op's backward (weight detached there), dW only into main_grad."""
    gen = torch.Generator().manual_seed(15)
    x = torch.randn(2, 7, 33, generator=gen).half().requires_grad_()
    w = torch.randn(17, 33, generator=gen).half().requires_grad_()
    b = torch.randn(17, generator=gen).half().requires_grad_()
    w.main_grad = torch.zeros(17, 33)
    gy = torch.randn(2, 7, 17, generator=gen).half()
    linear(x, w, b, backend=backend).backward(gy)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    torch.nn.functional.linear(xd, wd, bd).backward(gy.double())
    assert w.grad is None
    assert rel_err(w.main_grad, wd.grad) <= 1e-6
    assert rel_err(x.grad, xd.grad) <= 1e-3 and rel_err(b.grad, bd.grad) <= 1e-3


def test_nn_linear_swap_keeps_outputs():
    torch.manual_seed(13)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8, bias=False)).half()
    x = torch.randn(5, 32).half()
    expected = model(x).double()
    swapped = torch.nn.Sequential(*[mixprec.nn.Linear.from_linear(m) if isinstance(m, torch.nn.Linear) else m
                                    for m in model])
    assert isinstance(swapped[0], mixprec.nn.Linear) and swapped[0].weight is model[0].weight
    assert swapped.state_dict().keys() == model.state_dict().keys()
    assert swapped[2].bias is None
    assert rel_err(swapped(x), expected) <= 1e-2
    fresh = mixprec.nn.Linear(32, 64, dtype=torch.half)
    fresh.load_state_dict(model[0].state_dict())
    assert rel_err(fresh(x), model[0](x).double()) <= 2e-3


def test_linear_bad_input():
    with pytest.raises(ValueError, match="^x must have shape"):
        linear(torch.zeros(3, 5, dtype=torch.half), torch.zeros(4, 6, dtype=torch.half))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compiled_model_trains(dtype, backend):
    """fullgraph=True fails on any graph break; aot_eager (no code generation, quick on a CPU) still traces each
    layer's backward through the op's registered autograd into the backward graph."""
    torch.manual_seed(14)
    model = torch.nn.Sequential(mixprec.nn.Linear(16, 32), torch.nn.ReLU(), mixprec.nn.Linear(32, 4)).to(dtype)
    for layer in (model[0], model[2]):
        layer.backend = backend
    x = torch.randn(64, 16).to(dtype)
    target = x.float() @ torch.randn(16, 4) / 4
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), model(x))
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = (compiled(x).float() - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad.dtype == dtype for p in model.parameters())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-3), (torch.bfloat16, 1e-2)])
def test_linear_in_out_forward_backward(dtype, tol, backend):
    """y = x @ W + b with W stored [in, out] (transformers' Conv1D): against fp64; dW comes back [in, out] and
    contiguous, in the weight's own layout."""
    gen = torch.Generator().manual_seed(16)
    x = torch.randn(2, 7, 33, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(33, 17, generator=gen).to(dtype).requires_grad_()
    b = torch.randn(17, generator=gen).to(dtype).requires_grad_()
    gy = torch.randn(2, 7, 17, generator=gen).to(dtype)
    y = mixprec.functional.linear_in_out(x, w, b, backend=backend)
    y.backward(gy)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    (xd @ wd + bd).backward(gy.double())
    for name, got, ref in (("y", y, xd @ wd + bd), ("dx", x.grad, xd.grad), ("dw", w.grad, wd.grad),
                           ("db", b.grad, bd.grad)):
        assert got.dtype == dtype and got.shape == ref.shape, name
        assert rel_err(got, ref) <= tol, f"{name}: {rel_err(got, ref):.2e}"
    assert w.grad.is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
def test_main_grad_of_an_in_out_weight(backend):
    """main_grad of a [in, out] weight receives x^T dy (not its transpose), accumulated in fp32 over calls."""
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(3, 9, 20, generator=gen).half()
    w = torch.randn(20, 6, generator=gen).half().requires_grad_()
    w.main_grad = torch.randn(20, 6, generator=gen)
    start = w.main_grad.clone()
    gy = torch.randn(3, 9, 6, generator=gen).half()
    for _ in range(2):
        mixprec.functional.linear_in_out(x, w, backend=backend).backward(gy)
    ref = start.double() + 2 * x.reshape(-1, 20).double().t() @ gy.reshape(-1, 6).double()
    assert w.grad is None
    assert rel_err(w.main_grad, ref) <= 1e-6


def test_linear_in_out_bad_input():
    with pytest.raises(ValueError, match=r"^x must have shape \[..., in_features\] = \[..., 6\]"):
        mixprec.functional.linear_in_out(torch.zeros(3, 5, dtype=torch.half), torch.zeros(6, 4, dtype=torch.half))
    with pytest.raises(ValueError, match=r"^weight must be a 2-D tensor \[in_features, out_features\]"):
        mixprec.functional.linear_in_out(torch.zeros(3, 5, dtype=torch.half), torch.zeros(5, dtype=torch.half))
