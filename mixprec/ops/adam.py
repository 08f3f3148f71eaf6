"""mixprec.ops.adam_step_: the fused Adam/AdamW update, one pass over params, grads, state and masters."""
from __future__ import annotations

import math

import torch

from mixprec import _backend, _ext, reference
from mixprec.ops._validate import check_dense, check_scalar, check_tensor_list, common_device


def check_adam_hyper(*, lr=None, beta1, beta2, eps, weight_decay) -> None:
    """ValueError for hyper-parameters torch.optim.Adam refuses (lr may be a tensor: checked when a float)."""
    if lr is not None and not isinstance(lr, torch.Tensor) and not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps or not math.isfinite(eps) or eps == 0.0:
        raise ValueError(f"Invalid epsilon value: {eps} (must be > 0)")
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {beta1}")
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {beta2}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def adam_step_(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1=0.9, beta2=0.999, eps=1e-8,
               weight_decay=0.0, decoupled=False, maximize=False, max_exp_avg_sqs=(), master_params=(),
               grad_scale=None, found_inf=None, clip_coef=None, sr_seed=None, backend="auto"):
    """One fused Adam (decoupled=False: L2 weight decay) or AdamW (decoupled=True) update, in place.

    params: fp32, fp16 or bf16 tensors (any mix; grads[i] has params[i]'s dtype, shape and strides);
    exp_avgs, exp_avg_sqs (and max_exp_avg_sqs for amsgrad, master_params for fp32 master weights of half
    params): fp32 tensors shaped like the params, or empty sequences when unused. steps[i]: one-element fp32
    tensor counting the updates done; this update is number steps[i] + 1, which is stored back.
    lr, grad_scale, found_inf, clip_coef: one-element fp32 tensors on the params' device (lr may be a
    Python float), read on the device: nothing synchronizes. Gradients are used as grad / grad_scale *
    clip_coef; if found_inf is nonzero nothing at all is written. sr_seed (int): bf16 params without master
    weights are stored with stochastic rounding, reproducibly from the seed. Semantics: mixprec.reference.
    """
    params = check_tensor_list("params", params)
    n = len(params)
    lists = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "steps": steps,
             "max_exp_avg_sqs": max_exp_avg_sqs, "master_params": master_params}
    for name, lst in lists.items():
        check_tensor_list(name, lst)
        if len(lst) != n and not (name in ("max_exp_avg_sqs", "master_params") and len(lst) == 0):
            raise ValueError(f"{name} must have one tensor per param ({n}), got {len(lst)}")
    check_adam_hyper(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    if n == 0:
        return
    device = common_device("params", params)
    for name in ("grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "master_params"):
        for i, t in enumerate(lists[name]):
            if t.device != device:
                raise ValueError(f"{name}[{i}] is on {t.device}, but params[{i}] is on {device}")
            like = params[i]
            if t.shape != like.shape or (t.numel() > 1 and t.stride() != like.stride()):
                raise ValueError(f"{name}[{i}] must have the shape and strides of params[{i}] "
                                 f"({tuple(like.shape)}, {like.stride()}), got {tuple(t.shape)}, {t.stride()}")
            want = like.dtype if name == "grads" else torch.float32
            if t.dtype != want:
                raise TypeError(f"{name}[{i}] must be {want}, got {t.dtype}")
            check_dense(f"{name}[{i}]", t)
    for i, p in enumerate(params):
        check_dense(f"params[{i}]", p)
        check_scalar(f"steps[{i}]", steps[i], device)
        if master_params and p.dtype == torch.float32:
            raise ValueError(f"master_params[{i}]: params[{i}] is float32 and needs no master weights; "
                             "update fp32 params in a separate call without master_params")
        if sr_seed is not None and p.dtype == torch.float16:
            raise ValueError(f"params[{i}] is float16: stochastic rounding (sr_seed) is for bfloat16 params only")
    if sr_seed is not None and master_params:
        raise ValueError("sr_seed (stochastic rounding) applies to params without master weights")
    if sr_seed is not None and not 0 <= sr_seed < 2**32:
        raise ValueError(f"sr_seed must be in [0, 2**32), got {sr_seed}")
    if not isinstance(lr, torch.Tensor):
        lr = torch.tensor(float(lr), dtype=torch.float32, device=device)
    for name, t in (("lr", lr), ("grad_scale", grad_scale), ("found_inf", found_inf), ("clip_coef", clip_coef)):
        if t is not None:
            check_scalar(name, t, device)
    _run(_backend.select(backend, device), list(params), list(grads), list(exp_avgs), list(exp_avg_sqs),
         list(max_exp_avg_sqs), list(master_params), list(steps), lr, float(beta1), float(beta2), float(eps),
         float(weight_decay), bool(decoupled), bool(maximize), grad_scale, found_inf, clip_coef,
         -1 if sr_seed is None else int(sr_seed))


def _run(chosen, *args):
    """Runs one validated call on a concrete backend (mixprec.optim calls this directly, having built the
    lists itself; the extension re-checks every tensor in C++)."""
    if chosen == "reference":
        reference.adam_step_(*args)
    elif chosen == "triton":
        from mixprec.kernels import adam as triton_adam

        triton_adam.adam_step_(*args)
    else:
        torch.ops.mixprec.adam_step_(*args)


if _ext.available():

    @torch.library.register_fake("mixprec::adam_step_")
    def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, lr, beta1, beta2, eps,
          weight_decay, decoupled, maximize=False, grad_scale=None, found_inf=None, clip_coef=None, sr_seed=-1):
        return None


# ---- checks shared by tests/test_adam.py and `python -m mixprec selftest` ----

# (param dtype, master weights, stochastic rounding): the variants the kernels implement
VARIANTS = {
    "fp32": (torch.float32, False, False),
    "fp16-master": (torch.float16, True, False),
    "bf16-master": (torch.bfloat16, True, False),
    "fp16": (torch.float16, False, False),
    "bf16": (torch.bfloat16, False, False),
    "bf16-sr": (torch.bfloat16, False, True),
}


def random_state(shapes, variant: str, *, amsgrad: bool, seed: int, specials: bool = False, step: float = 4.0,
                 device="cpu") -> dict:
    """The list arguments of adam_step_ for `variant`, as a dict: params near +-2, grads over several binades
    (planted inf/NaN when `specials`), m and v as after a few steps, masters a little off their params (so
    that the param must be written from the master)."""
    from mixprec.testing import random_grad

    dtype, master, _ = VARIANTS[variant]
    gen = torch.Generator().manual_seed(seed)
    st = {k: [] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs", "steps", "max_exp_avg_sqs", "master_params")}
    for shape in shapes:
        w = torch.randn(shape, generator=gen) * 2
        st["params"].append(w.to(dtype))
        st["grads"].append(random_grad(w.numel(), dtype, generator=gen, specials=specials, scale=8.0).reshape(shape))
        st["exp_avgs"].append(torch.randn(shape, generator=gen) * 0.1)
        st["exp_avg_sqs"].append(torch.rand(shape, generator=gen) * 0.01)
        st["steps"].append(torch.tensor(step))
        if amsgrad:
            st["max_exp_avg_sqs"].append(st["exp_avg_sqs"][-1] * torch.rand(shape, generator=gen) * 2)
        if master:
            st["master_params"].append(w + torch.randn(shape, generator=gen) * 1e-3)
    return {k: [t.to(device) for t in v] for k, v in st.items()}


def hyper(variant: str, *, device="cpu", decoupled=True, maximize=False, weight_decay=0.01, found_inf=0.0, clip=0.7,
          scale=1024.0) -> dict:
    """The other keyword arguments of adam_step_ for a check (device scalars; sr_seed for the SR variant)."""
    def scalar(x):
        return None if x is None else torch.tensor([x], device=device)

    return dict(lr=scalar(1e-3), beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=weight_decay, decoupled=decoupled,
                maximize=maximize, grad_scale=scalar(scale), found_inf=scalar(found_inf), clip_coef=scalar(clip),
                sr_seed=1234 if VARIANTS[variant][2] else None)


def run_reference(st: dict, kw: dict) -> None:
    """mixprec.reference.adam_step_ on state `st` with adam_step_'s keyword arguments `kw`."""
    sr = kw["sr_seed"]
    reference.adam_step_(st["params"], st["grads"], st["exp_avgs"], st["exp_avg_sqs"], st["max_exp_avg_sqs"],
                         st["master_params"], st["steps"], kw["lr"], kw["beta1"], kw["beta2"], kw["eps"],
                         kw["weight_decay"], kw["decoupled"], kw["maximize"], kw["grad_scale"], kw["found_inf"],
                         kw["clip_coef"], -1 if sr is None else sr)


def assert_states_equal(actual: dict, expected: dict, what: str) -> None:
    from mixprec.testing import assert_bitwise_equal

    for key in actual:
        for i, (a, e) in enumerate(zip(actual[key], expected[key])):
            assert_bitwise_equal(a, e, f"{what}: {key}[{i}]")


def selftest_cases(device: str) -> list:
    """`python -m mixprec selftest` checks of this op: every backend on `device` and every variant, bit for bit
    against mixprec.reference (odd sizes, several chunks, amsgrad and both decays), then the skipped step."""
    import functools

    from mixprec.selftest import Case, backends

    problems = [((129,), False, False), ((1000, 7), True, True), ((70001,), False, True)]
    cases = []
    for b in backends(device):
        for variant in VARIANTS:
            for seed, (shape, amsgrad, decoupled) in enumerate(problems):
                check = functools.partial(_selftest_check, b.name, variant, shape, amsgrad, decoupled, device, seed)
                label = f"{shape}{' amsgrad' if amsgrad else ''} {'AdamW' if decoupled else 'Adam'}"
                cases.append(Case("adam_step_", b.label, variant, label, check, b.env))
    return cases


def _selftest_check(backend, variant, shape, amsgrad, decoupled, device, seed) -> str:
    st = random_state([shape, (3, 5)], variant, amsgrad=amsgrad, seed=seed, device=device)
    expected = {k: [t.clone() for t in v] for k, v in st.items()}
    kw = hyper(variant, device=device, decoupled=decoupled, maximize=bool(seed % 2))
    adam_step_(**st, **kw, backend=backend)
    run_reference(expected, kw)
    assert_states_equal(st, expected, f"{backend} {variant}")
    skipped = random_state([shape], variant, amsgrad=amsgrad, seed=seed, specials=True, device=device)
    before = {k: [t.clone() for t in v] for k, v in skipped.items()}
    adam_step_(**skipped, **hyper(variant, device=device, found_inf=1.0), backend=backend)
    assert_states_equal(skipped, before, f"{backend} {variant} skipped step")
    return "bitwise equal to the reference; a skipped step wrote nothing"
