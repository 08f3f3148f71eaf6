"""What the test suite and `python -m mixprec selftest` share: random inputs with planted special values, the
variant tables of the ops, tolerances, and comparisons that say where and how much.

The selftest runs the same checks on a user's machine, so this lives in the installed package (tests/helpers.py
re-exports it)."""
from __future__ import annotations

from typing import NamedTuple

import torch

from mixprec import reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# MIXPREC_CPU_SIMD for each CPU kernel, and the CPU flags it needs (csrc/cpu/cpu_features.h), best first
CPU_SIMD = {
    "cpu-avx512": ("avx512", {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl"}),
    "cpu-avx2": ("avx2", {"avx2", "fma", "f16c"}),
    "cpu-portable": ("0", set()),
}

def special_values(dtype: torch.dtype) -> list[float]:
    """inf, NaN, the largest finite value, and the smallest subnormal / normal of dtype."""
    fi = torch.finfo(dtype)
    return [float("inf"), float("-inf"), float("nan"), fi.max, -fi.max, fi.smallest_normal,
            fi.smallest_normal / 8, -fi.smallest_normal / 2, 0.0, -0.0]


def random_grad(n: int, dtype: torch.dtype, *, generator: torch.Generator, specials: bool = False,
                scale: float = 1.0) -> torch.Tensor:
    """Normal values spanning several binades (so rounding is exercised), with special values planted at
    random positions when asked."""
    x = torch.randn(n, generator=generator, dtype=torch.float64)
    x = x * torch.exp2(torch.randint(-8, 8, (n,), generator=generator).double()) * scale
    t = x.to(dtype)
    if specials and n > 0:
        vals = special_values(dtype)
        idx = torch.randint(0, n, (min(n, len(vals)),), generator=generator)
        for k, i in enumerate(idx.tolist()):
            t[i] = vals[k]
    return t


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Same bits everywhere, except that any NaN matches any NaN (payloads are not part of the contract)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    a_nan, e_nan = torch.isnan(actual), torch.isnan(expected)
    int_type = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[actual.element_size()]
    a_bits = actual.reshape(-1).view(int_type)
    e_bits = expected.reshape(-1).view(int_type)
    bad = (a_bits != e_bits) & ~(a_nan.reshape(-1) & e_nan.reshape(-1))
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {actual.numel()} elements differ; first at flat index {i}: "
                             f"got {actual.reshape(-1)[i].item()!r} (bits {a_bits[i].item():#x}), "
                             f"expected {expected.reshape(-1)[i].item()!r} (bits {e_bits[i].item():#x})")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float = 0.0, what: str = ""):
    """Elementwise |a - e| <= atol + rtol * |e|, reporting the worst element."""
    a, e = actual.double().reshape(-1), expected.double().reshape(-1)
    err = (a - e).abs()
    bound = atol + rtol * e.abs()
    bad = ~(err <= bound) & ~(torch.isnan(a) & torch.isnan(e)) & ~(a == e)
    if bad.any():
        i = int(torch.argmax(torch.where(bad, err - bound, torch.full_like(err, -1.0))))
        raise AssertionError(f"{what}: {int(bad.sum())} of {a.numel()} elements out of tolerance (rtol={rtol}, "
                             f"atol={atol}); worst at flat index {i}: got {a[i].item()!r}, expected {e[i].item()!r}")


# GEMM error bounds, by output dtype, on max|out - ref| / max|ref| against a reference computed in fp32 or fp64
# from the exact half inputs: the output's one rounding costs at most half an ulp of the largest element (2^-11
# fp16, 2^-8 bf16) and fp32 accumulation over K <= ~1000 about 1e-6, so a correct kernel passes with room for
# the summation order, while a wrong tile, stride or mask gives errors of order 1. Used by tests/test_gemm.py and
# by `python -m mixprec selftest`.
GEMM_TOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max|expected| (in fp64; NaN when any element is NaN)."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()


def assert_max_rel_err(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> float:
    """Shapes equal and max_rel_err <= tol, else an AssertionError naming the worst element; returns the error."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    if actual.numel() == 0:
        return 0.0
    err = max_rel_err(actual, expected)
    if not err <= tol:
        diff = (actual.double() - expected.double()).abs().reshape(-1)
        i = int(torch.argmax(torch.nan_to_num(diff, nan=float("inf"))))
        raise AssertionError(f"{what}: max relative error {err:.3g} > {tol:g} (relative to max|expected|); worst at "
                             f"flat index {i}: got {actual.reshape(-1)[i].item()!r}, expected "
                             f"{expected.reshape(-1)[i].item()!r}")
    return err


# ---- Adam: variants, random states, the reference run, state comparison ----

class AdamVariant(NamedTuple):
    dtype: torch.dtype  # the params'
    master: str  # "none", "fp32" (master_params) or "remainder" (param_remainders)
    stochastic: bool  # stochastic rounding of bf16 params (sr_seed)


# the param / master variants the kernels implement, each combinable with every state kind of STATES
VARIANTS = {
    "fp32": AdamVariant(torch.float32, "none", False),
    "fp16-master": AdamVariant(torch.float16, "fp32", False),
    "bf16-master": AdamVariant(torch.bfloat16, "fp32", False),
    "fp16": AdamVariant(torch.float16, "none", False),
    "bf16": AdamVariant(torch.bfloat16, "none", False),
    "bf16-sr": AdamVariant(torch.bfloat16, "none", True),
    "bf16-remainder": AdamVariant(torch.bfloat16, "remainder", False),
}
# state kind -> exp_avgs' dtype (exp_avg_sqs: mixprec.ops.adam.EXP_AVG_SQ_DTYPES); int8 comes with block scales and
# without amsgrad
STATES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
ADAM_LISTS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "steps", "max_exp_avg_sqs", "master_params",
              "param_remainders", "exp_avg_scales", "exp_avg_sq_scales")


def is_compact_mode(variant: str, state: str = "fp32") -> bool:
    """Whether the mode stores fewer bytes than fp32 state: remainder masters, bf16 or int8 states."""
    return VARIANTS[variant].master == "remainder" or state != "fp32"


def relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t's values stored in `layout`: "contiguous"; "transposed" (a 2-D tensor stored column-major);
    "channels_last" (a 4-D tensor). Idempotent, so that every tensor of a state can be passed through it."""
    if layout == "transposed":
        return t.t().contiguous().t()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


def random_state(shapes, variant: str, *, amsgrad: bool, seed: int, specials: bool = False, step: float = 4.0,
                 device="cpu", state: str = "fp32", layout: str = "contiguous") -> dict:
    """The list arguments of adam_step_ for `variant` with `state` moments, as a dict (every list of the schema;
    the unused ones empty): params near +-2, grads over several binades (planted inf/NaN when `specials`), m and v
    as after a few steps (int8: quantized, with their block scales), masters a little off their params (so that
    the param must be written from the master; remainder masters: the split of such a master), every per-element
    tensor stored in `layout`."""
    dtype, master, _ = VARIANTS[variant]
    gen = torch.Generator().manual_seed(seed)
    st = {k: [] for k in ADAM_LISTS}

    def lay(t):
        return relayout(t, layout)

    for shape in shapes:
        w = torch.randn(shape, generator=gen) * 2
        master_w = lay(w + torch.randn(shape, generator=gen) * 1e-3)
        grad = random_grad(w.numel(), dtype, generator=gen, specials=specials, scale=8.0).reshape(shape)
        st["grads"].append(lay(grad))
        m, v = lay(torch.randn(shape, generator=gen) * 0.1), lay(torch.rand(shape, generator=gen) * 0.01)
        if state == "int8":
            for key, scales_key, x, signed in (("exp_avgs", "exp_avg_scales", m, True),
                                               ("exp_avg_sqs", "exp_avg_sq_scales", v, False)):
                codes, scales = reference.quantize_blockwise(x, signed=signed)
                st[key].append(lay(codes))
                st[scales_key].append(scales)
        else:
            st["exp_avgs"].append(lay(m.to(STATES[state])))
            st["exp_avg_sqs"].append(lay(v.to(STATES[state])))
        st["steps"].append(torch.tensor(step))
        if amsgrad:
            st["max_exp_avg_sqs"].append(lay((v * torch.rand(shape, generator=gen) * 2).to(STATES[state])))
        if master == "fp32":
            st["params"].append(lay(w.to(dtype)))
            st["master_params"].append(master_w)
        elif master == "remainder":
            param, remainder = reference.remainder_split(master_w)
            st["params"].append(lay(param))
            st["param_remainders"].append(lay(remainder))
        else:
            st["params"].append(lay(w.to(dtype)))
    return {k: [t.to(device) for t in v] for k, v in st.items()}


def hyper(variant: str, *, device="cpu", decoupled=True, maximize=False, weight_decay=0.01, found_inf=0.0, clip=0.7,
          scale=1024.0) -> dict:
    """The other keyword arguments of adam_step_ for a check (device scalars; sr_seed for the SR variant)."""
    def scalar(x):
        return None if x is None else torch.tensor([x], device=device)

    return dict(lr=scalar(1e-3), beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=weight_decay, decoupled=decoupled,
                maximize=maximize, grad_scale=scalar(scale), found_inf=scalar(found_inf), clip_coef=scalar(clip),
                sr_seed=1234 if VARIANTS[variant].stochastic else None)


def run_reference(st: dict, kw: dict) -> None:
    """mixprec.reference.adam_step_ on state `st` with adam_step_'s keyword arguments `kw`."""
    sr = kw["sr_seed"]
    reference.adam_step_(**st, **{**kw, "sr_seed": -1 if sr is None else sr})


def clone_state(st: dict) -> dict:
    """A copy of every tensor of a state (dense tensors keep their strides)."""
    return {k: [t.clone() for t in v] for k, v in st.items()}


def assert_states_equal(actual: dict, expected: dict, what: str) -> None:
    for key in actual:
        for i, (a, e) in enumerate(zip(actual[key], expected[key])):
            assert_bitwise_equal(a, e, f"{what}: {key}[{i}]")
            assert a.stride() == e.stride() or a.numel() <= 1, f"{what}: {key}[{i}] strides {a.stride()}"


# ---- GEMM operands ----

def gemm_operands(device, dtype, batch, m, n, k, ta, tb, seed):
    """a [*batch, m, k] and b [k, n] of `dtype` from normal values, each stored transposed when ta / tb (a view
    with unit stride along rows), and the generator for further inputs."""
    gen = torch.Generator().manual_seed(seed)

    def make(rows, cols, transposed, lead=()):
        if transposed:  # the same values stored transposed: a view with unit stride along rows
            return torch.randn(*lead, cols, rows, generator=gen).to(dtype).to(device).transpose(-1, -2)
        return torch.randn(*lead, rows, cols, generator=gen).to(dtype).to(device)

    return make(m, k, ta, batch), make(k, n, tb), gen
