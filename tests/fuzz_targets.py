"""Fuzz targets of mixprec's public API, shared by tests/test_fuzz.py (a few dozen examples per target, in CI) and
tools/fuzz.py (the long run, each target in its own process).

A target is a hypothesis strategy of *cases* (plain dicts of numbers, strings and tuples: a case printed is its
reproducer, ``tools/fuzz.py --replay TARGET 'CASE'`` runs it again) and a function that builds the inputs of one
call from a case, makes the call and classifies what happened:

- "clear": refused with ValueError, TypeError, RuntimeError or a LookupError (IndexError; KeyError naming the
  missing key, as torch's own load_state_dict raises it) whose message names the offending argument: one of the
  names of the arguments the case made hostile (``grads``, ``lr``, ``state_dict['scale']``, ``--timeout``, ...;
  a few words torch itself uses count too: "learning rate" for lr, "epsilon" for eps, "beta" for betas), matched
  as a whole identifier. An argument a case made hostile may still be valid (a transposed grad, a NaN
  inv_scale): ``names`` lists them all, ``invalid`` those the documentation says are refused.
- "ok": returned, and the result agrees with an independent oracle where there is one (torch's own unscale,
  an fp64 GEMM with the fp32 summation bound, mixprec.reference bit for bit for the kernels, torch.optim.AdamW
  and torch.amp.GradScaler for the torch-parity paths; tolerances are derived next to each oracle). The
  outcome's detail says "checked" or "unchecked" (an input either outcome was acceptable for, or no oracle).
- "wrong" (silent wrong answer): returned, but the oracle disagrees, or an input the documentation says is
  refused was accepted.
- "crash": any other exception type, an error that names none of the hostile arguments, a refusal of an input
  the documentation says is valid; in tools/fuzz.py also a segfault, abort or hang of the worker process.
- "lost" (data lost): refused, yet something the call may write (every tensor's whole storage, optimizer and
  scaler state, files) changed.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import math
import os
import re
import tempfile
import traceback
import warnings

import torch
from hypothesis import strategies as st

import mixprec
from mixprec import ops, reference
from mixprec.testing import special_values

KINDS = ("ok", "clear", "crash", "wrong", "lost")
LABELS = {"ok": "ok", "clear": "clear errors", "crash": "crashes", "wrong": "silent wrong answers",
          "lost": "data lost"}
CLEAR_TYPES = (ValueError, TypeError, RuntimeError, IndexError, KeyError)
FAST_BACKENDS = ("cpu", "reference")
LONG_BACKENDS = ("cpu", "reference", "triton")
U32 = 2.0 ** -24  # fp32 unit roundoff
# words torch's own messages use for an argument, beside its name
ALIASES = {"lr": ("learning rate",), "eps": ("epsilon",), "beta1": ("beta",), "beta2": ("beta",),
           "betas": ("beta",), "weight_decay": ("weight decay", "weight_decay value")}


@dataclasses.dataclass
class Outcome:
    kind: str
    detail: str = ""


@dataclasses.dataclass
class Call:
    """One built call: run() makes it; names: the hostile arguments; invalid: why the documentation says it must be
    refused (empty: it must be accepted, unless `unsure`); watched: what the call may write, checked after a
    refusal; check(result) -> None or what is wrong, after an accepted call."""

    run: object
    names: list
    invalid: list
    unsure: list = dataclasses.field(default_factory=list)
    watched: list = dataclasses.field(default_factory=list)
    check: object = None


def mentions(message: str, names) -> bool:
    for name in names:
        for word in (name, *ALIASES.get(name, ())):
            if re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", message):
                return True
    return False


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    f = frames[-1]
    return f"{os.path.relpath(f.filename) if f.filename.startswith(os.getcwd()) else f.filename}:{f.lineno}"


def judge(call: Call) -> Outcome:
    """Runs the call and classifies it (see the module docstring)."""
    before = Snapshot(call.watched)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = call.run()
    except Exception as exc:  # noqa: BLE001  (classifying every exception is the point)
        if isinstance(exc, Lost):
            return Outcome("lost", str(exc))
        text = f"{type(exc).__name__}: {_short(str(exc))}"
        changed = before.changed()
        if changed:
            return Outcome("lost", f"{text}; yet {changed} changed")
        if not call.invalid and not call.unsure:
            return Outcome("crash", f"refused a valid input: {text} at {_where(exc)}")
        if not isinstance(exc, CLEAR_TYPES):
            return Outcome("crash", f"{text} (not a clear error type) at {_where(exc)}")
        if not mentions(str(exc), call.names):
            return Outcome("crash", f"{text} (names none of {call.names}) at {_where(exc)}")
        return Outcome("clear", text)
    if call.invalid:
        return Outcome("wrong", f"accepted: {'; '.join(call.invalid)}")
    if call.check is None:
        return Outcome("ok", "unchecked")  # no oracle for this input (either outcome was acceptable)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        problem = call.check(result)
    if problem:
        return Outcome("wrong", problem)
    return Outcome("ok", "checked")


def _short(text: str, n: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


# ---------------------------------------------------------------- snapshots (for "data lost")

def _storage_bytes(t: torch.Tensor):
    if t.device.type == "meta" or t.layout != torch.strided:
        return None
    with torch.no_grad():
        return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage()).clone()


def _freeze(x):
    """A comparable copy of x: tensors by their whole storage's bytes (and shape/strides/offset), containers
    recursively, other values deep-copied."""
    if isinstance(x, torch.Tensor):
        if x.layout != torch.strided:
            return ("sparse", x.detach().clone())
        return ("tensor", tuple(x.shape), x.stride(), x.storage_offset(), x.dtype, _storage_bytes(x))
    if isinstance(x, dict):
        return ("dict", [(_freeze_key(k), _freeze(v)) for k, v in x.items()])
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, [_freeze(v) for v in x])
    if isinstance(x, (int, float, str, bool, type(None), torch.dtype, torch.device)):
        return ("value", x)
    try:
        return ("value", copy.deepcopy(x))
    except Exception:  # noqa: BLE001
        return ("id", id(x))


def _freeze_key(k):
    return ("tensor-key", id(k)) if isinstance(k, torch.Tensor) else k


def _same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool((a.reshape(-1).view(torch.uint8)
                                                                   == b.reshape(-1).view(torch.uint8)).all()) \
            if a.layout == torch.strided else bool(torch.equal(a.to_dense(), b.to_dense()))
    if isinstance(a, tuple) and a and a[0] == "value":
        x, y = a[1], b[1]
        if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
            return True
        try:
            return bool(x == y)
        except Exception:  # noqa: BLE001
            return x is y
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


class Snapshot:
    """What `watched` holds now: [(label, object or zero-argument callable)]."""

    def __init__(self, watched):
        self.watched = watched
        self.frozen = [(label, _freeze(_get(obj))) for label, obj in watched]

    def changed(self) -> str:
        names = [label for (label, obj), (_, before) in zip(self.watched, self.frozen)
                 if not _same(before, _freeze(_get(obj)))]
        return ", ".join(names)


def _get(obj):
    return obj() if callable(obj) and not isinstance(obj, torch.Tensor) else obj


# ---------------------------------------------------------------- tensors from specs

DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
      "int32": torch.int32, "int64": torch.int64, "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16,
      "bool": torch.bool, "complex64": torch.complex64}
FLOATS = ("float32", "float16", "bfloat16")
SHAPES = [(), (0,), (1,), (7,), (3, 5), (5, 1), (1, 1), (2, 3, 4), (0, 3), (2, 1, 3, 2), (129,), (3, 0, 2),
          (17, 9)]
LAYOUTS = ["contiguous"] * 4 + ["transposed", "permuted", "channels_last", "gappy", "offset", "expanded",
                                 "overlapping"]
VALUES = ["normal"] * 4 + ["specials", "specials", "subnormal", "large", "zeros", "nan", "inf"]
SELF_OVERLAPPING = ("expanded", "overlapping")


def tensor_spec(*, dtypes=FLOATS, shapes=SHAPES, layouts=LAYOUTS, values=VALUES, flags=True):
    """A strategy of tensor specs: shape, dtype, layout (how it is stored), values, seed, and hostile flags."""
    flag = st.sampled_from([None] * 12 + ["requires_grad", "inference", "meta"]) if flags else st.just(None)
    return st.fixed_dictionaries({
        "shape": st.sampled_from(shapes), "dtype": st.sampled_from(dtypes), "layout": st.sampled_from(layouts),
        "values": st.sampled_from(values), "seed": st.integers(0, 2**16), "flag": flag})


def numel(shape) -> int:
    return math.prod(shape)


def effective_layout(spec) -> str:
    """The layout the spec gets (a layout that does not apply to its shape falls back to contiguous)."""
    shape, layout = tuple(spec["shape"]), spec["layout"]
    big = [d for d, n in enumerate(shape) if n > 1]
    if layout == "transposed" and (len(shape) < 2 or shape[-1] == shape[-2] == 1):
        return "contiguous"
    if layout == "permuted" and len(big) < 2:
        return "contiguous"
    if layout == "channels_last" and (len(shape) != 4 or shape[1] == 1 or shape[2] * shape[3] == 1):
        return "contiguous"
    if layout == "gappy" and (len(shape) == 0 or numel(shape) == 0):
        return "contiguous"
    if layout in SELF_OVERLAPPING and (not big or numel(shape) == 0):
        return "contiguous"
    if layout == "overlapping" and not any(shape[d] > 1 for d in big[:-1]) and len(big) < 2:
        return "expanded"
    return layout


def fill_values(n: int, dtype: torch.dtype, kind: str, gen: torch.Generator) -> torch.Tensor:
    """n values of `dtype` of the given kind (normal values span binades; specials plants inf/NaN/max/subnormal)."""
    if dtype == torch.bool:
        return torch.rand(n, generator=gen) > 0.5
    if not dtype.is_floating_point and not dtype.is_complex:
        return torch.randint(-5, 6, (n,), generator=gen).to(dtype)
    if dtype.is_complex:
        return torch.randn(n, generator=gen).to(dtype)
    fi = torch.finfo(dtype)
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    x = x * torch.exp2(torch.randint(-8, 8, (n,), generator=gen).double())
    if kind == "subnormal":
        x = torch.rand(n, generator=gen, dtype=torch.float64) * fi.smallest_normal * torch.sign(x)
    elif kind == "large":
        x = (0.5 + torch.rand(n, generator=gen, dtype=torch.float64) / 2) * fi.max * torch.sign(x)
    elif kind == "zeros":
        x = torch.zeros(n, dtype=torch.float64)
    elif kind == "nan":
        x = torch.full((n,), math.nan, dtype=torch.float64)
    elif kind == "inf":
        x = torch.where(torch.rand(n, generator=gen) < 0.3, math.inf * torch.sign(x), x)
    t = x.to(dtype)
    if kind == "specials" and n > 0:
        vals = special_values(dtype)
        idx = torch.randint(0, n, (min(n, len(vals)),), generator=gen)
        for k, i in enumerate(idx.tolist()):
            t[i] = vals[k]
    return t


def _contiguous_strides(shape) -> list:
    return list(torch.empty(shape, device="meta").stride())


def make_tensor(spec) -> torch.Tensor:
    """The tensor a spec describes (deterministic: two builds of one spec are equal, bit for bit). Views with gaps
    or an offset live in a larger storage filled with other values, so that a write past the view shows."""
    shape, dtype = tuple(spec["shape"]), DT[spec["dtype"]]
    gen = torch.Generator().manual_seed(spec["seed"])
    layout = effective_layout(spec)
    n = numel(shape)
    flag = spec.get("flag")
    if flag == "meta":
        return torch.empty(shape, dtype=dtype, device="meta")
    ctx = torch.inference_mode() if flag == "inference" else contextlib.nullcontext()
    with ctx:
        vals = fill_values(n, dtype, spec["values"], gen)
        if layout == "transposed":
            t = torch.empty(*shape[:-2], shape[-1], shape[-2], dtype=dtype).transpose(-1, -2)
        elif layout == "permuted":
            t = torch.empty(shape[::-1], dtype=dtype).permute(*range(len(shape) - 1, -1, -1))
        elif layout == "channels_last":
            t = torch.empty(shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
        elif layout == "gappy":
            base = fill_values(numel(shape) * 2, dtype, "normal", gen).view(*shape[:-1], 2 * shape[-1])
            t = base[..., 1::2]
        elif layout == "offset":
            base = fill_values(n + 3, dtype, "normal", gen)
            t = base[2:2 + n].view(shape)
        elif layout == "expanded":
            d = max(i for i, s in enumerate(shape) if s > 1)
            small = list(shape)
            small[d] = 1
            t = fill_values(numel(small), dtype, spec["values"], gen).view(small).expand(shape)
            vals = None
        elif layout == "overlapping":
            strides = _contiguous_strides(shape)
            d = next(i for i, s in enumerate(shape) if s > 1 and strides[i] >= 2) if any(
                s > 1 and strides[i] >= 2 for i, s in enumerate(shape)) else None
            if d is None:
                t = fill_values(1, dtype, spec["values"], gen).expand(shape)
            else:
                strides[d] -= 1  # rows overlap their neighbours by one element
                size = sum((s - 1) * st_ for s, st_ in zip(shape, strides)) + 1
                t = fill_values(size, dtype, spec["values"], gen).as_strided(shape, strides)
            vals = None
        else:
            t = torch.empty(shape, dtype=dtype)
        if vals is not None:
            t.copy_(vals.view(shape))
    if flag == "requires_grad" and (dtype.is_floating_point or dtype.is_complex):
        t = t.detach().requires_grad_()
    return t


def spec_problem(spec, *, written: bool, dtypes=FLOATS) -> str | None:
    """Why the documentation says a tensor of this spec is refused (None: accepted) as an op's tensor argument."""
    if spec["dtype"] not in dtypes:
        return f"dtype {spec['dtype']}"
    if spec.get("flag") == "meta":
        return None  # judged by the device checks of each target
    if written and effective_layout(spec) in SELF_OVERLAPPING:
        return f"{effective_layout(spec)} layout (elements share memory)"
    if written and spec.get("flag") == "inference":
        return "an inference tensor"
    return None


def is_hostile(spec) -> bool:
    return (spec["dtype"] not in FLOATS or spec.get("flag") is not None or effective_layout(spec) != "contiguous")


def to_plain(x):
    """JSON-able form of a case (tuples become lists)."""
    return json.loads(json.dumps(x))


# ---------------------------------------------------------------- comparisons

def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bits, any NaN matching any NaN."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.numel() == 0:
        return True
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    x, y = a.detach().reshape(-1), b.detach().reshape(-1)
    same = x.view(ints) == y.view(ints)
    if a.dtype.is_floating_point:
        same |= torch.isnan(x) & torch.isnan(y)
    return bool(same.all())


def first_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"shape/dtype {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
    x, y = a.detach().reshape(-1), b.detach().reshape(-1)
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    bad = x.view(ints) != y.view(ints)
    if a.dtype.is_floating_point:
        bad &= ~(torch.isnan(x) & torch.isnan(y))
    i = int(bad.nonzero()[0]) if bad.any() else 0
    return f"{int(bad.sum())} of {x.numel()} differ, first at {i}: {x[i].item()!r} vs {y[i].item()!r}"


def out_of_interval(got: torch.Tensor, exact: torch.Tensor, err: torch.Tensor, uncertain=None) -> str | None:
    """got (any float dtype) must be a value that rounding some real within [exact - err, exact + err] (fp64)
    to got's dtype gives (rounding to nearest is monotone, so: round(lo) <= got <= round(hi)); a NaN exact needs
    a NaN; elements flagged uncertain are skipped."""
    g = got.detach().double().reshape(-1)
    e, r = exact.reshape(-1), err.reshape(-1)
    lo, hi = (e - r).to(got.dtype).double(), (e + r).to(got.dtype).double()
    ok = (g >= lo) & (g <= hi)
    ok |= torch.isnan(e) & torch.isnan(g)
    ok |= ~torch.isnan(e) & torch.isinf(e) & (g == e)
    if uncertain is not None:
        ok |= uncertain.reshape(-1)
    if bool(ok.all()):
        return None
    i = int((~ok).nonzero()[0])
    return (f"{int((~ok).sum())} of {g.numel()} elements outside the bound, first at {i}: got {g[i].item()!r}, "
            f"exact {e[i].item()!r} +- {r[i].item():.3g}")


# ---------------------------------------------------------------- common strategies

HOSTILE_FLOATS = [0.0, -0.0, -1.0, 1e-45, 1e-300, math.inf, -math.inf, math.nan, 1e300, 3.5e38, 2.0, 1.0]


def scalar_spec(values, *, dtypes=("float32",) * 6 + ("float64", "float16", "int32"),
                shapes=((1,),) * 4 + ((), (1, 1), (2,), (0,)), kinds=("tensor",) * 8 + ("float", "none", "meta")):
    """A one-element tensor argument (inv_scale, found_inf, grad_scale...): its kind, value, dtype, shape."""
    return st.fixed_dictionaries({"kind": st.sampled_from(kinds), "value": st.sampled_from(values),
                                  "dtype": st.sampled_from(dtypes), "shape": st.sampled_from(shapes),
                                  "flag": st.sampled_from([None] * 10 + ["requires_grad", "inference"])})


def good_scalar(values, *, optional=False):
    """A valid one-element fp32 tensor argument (any of `values`), or None when optional."""
    return scalar_spec(values, dtypes=("float32",), shapes=((1,), (1,), ()),
                       kinds=("tensor",) * 3 + (("none",) if optional else ())).map(lambda d: {**d, "flag": None})


@st.composite
def mixed(draw, common: dict, hostile: dict):
    """A case whose arguments are drawn from `common` (benign, though still varied: layouts, values, specials),
    except for a few (none for about a quarter of the cases, up to three) drawn from `hostile`: most cases then
    reach the kernels, and a refusal is usually about one argument. A key only `hostile` has is left out of the
    cases that do not draw it."""
    k = draw(st.sampled_from([0, 0, 1, 1, 1, 2, 2, 3]))
    chosen = set(draw(st.permutations(sorted(hostile)))[:k])
    case = {}
    for key in sorted(set(common) | set(hostile)):
        if key in chosen:
            case[key] = draw(hostile[key])
        elif key in common:  # a key only `hostile` has is left out: the call's default
            case[key] = draw(common[key])
    return case


def make_scalar(spec, default_shape=(1,)):
    if spec["kind"] == "none":
        return None
    if spec["kind"] == "float":
        return spec["value"]
    dtype, shape = DT[spec["dtype"]], tuple(spec["shape"])
    device = "meta" if spec["kind"] == "meta" else "cpu"
    ctx = torch.inference_mode() if spec.get("flag") == "inference" else contextlib.nullcontext()
    with ctx:
        v = spec["value"]
        if not dtype.is_floating_point and not math.isfinite(v):
            v = 0
        t = torch.tensor(v, dtype=torch.float64).to(dtype).expand(shape).to(device).clone()
    if spec.get("flag") == "requires_grad" and dtype.is_floating_point:
        t = t.detach().requires_grad_()
    return t


def scalar_problem(spec, *, written: bool, optional: bool) -> str | None:
    """Why a one-element fp32 tensor argument of this spec is refused (None: accepted), by check_scalar's rule."""
    if spec["kind"] == "none":
        return None if optional else "None"
    if spec["kind"] == "float":
        return "a Python float"
    if spec["kind"] == "meta":
        return "on the meta device"
    if numel(spec["shape"]) != 1:
        return f"shape {tuple(spec['shape'])}"
    if spec["dtype"] != "float32":
        return f"dtype {spec['dtype']}"
    if written and spec.get("flag") == "inference":
        return "an inference tensor"
    return None


def scalar_hostile(spec, default_value) -> bool:
    return (spec["kind"] != "tensor" or spec["dtype"] != "float32" or tuple(spec["shape"]) != (1,)
            or spec.get("flag") is not None or not _same(("value", spec["value"]), ("value", default_value)))


# ---------------------------------------------------------------- target: ops.unscale_and_check_

def _unscale_entry():
    return st.one_of(
        tensor_spec(dtypes=FLOATS * 4 + ("float64", "int32", "bool", "complex64")).map(lambda s: {"tensor": s}),
        st.sampled_from([{"none": True}, {"float": 1.5}, {"sparse": True}]),
        st.integers(0, 7).map(lambda j: {"alias": j}),
        st.integers(0, 7).map(lambda j: {"overlap": j}))


def unscale_cases(backends=FAST_BACKENDS):
    inv_values = [0.5, 2.0**-16, 1.0, 1 / 3, 0.0, -1.0, math.inf, math.nan, 1e-40, 3e38]
    good_grad = tensor_spec(layouts=[x for x in LAYOUTS if x not in SELF_OVERLAPPING], flags=False)
    common = {
        "backend": st.sampled_from(backends),
        "grads": st.lists(st.one_of(good_grad.map(lambda s: {"tensor": s}), st.just({"none": True})), max_size=6),
        "container": st.sampled_from(["list", "list", "tuple"]),
        "inv_scale": good_scalar(inv_values),
        "found_inf": good_scalar([0.0] * 5 + [1.0, math.nan]),
        "norm_sq": good_scalar([0.0, 0.0, 2.5, math.inf, math.nan], optional=True),
        "per_tensor_inf": st.sampled_from(["none", "ok"]),
        "grad_mode": st.booleans(),
    }
    hostile = {
        "backend": st.sampled_from(["auto", "bogus"]),
        "grads": st.lists(_unscale_entry(), min_size=1, max_size=6),
        "container": st.sampled_from(["tensor", "generator"]),
        "inv_scale": scalar_spec(inv_values),
        "found_inf": scalar_spec([0.0, 1.0, math.nan], kinds=("tensor",) * 4 + ("none", "float", "meta")),
        "norm_sq": scalar_spec([0.0, 2.5], kinds=("tensor",) * 4 + ("float", "meta")),
        "per_tensor_inf": st.sampled_from(["short", "float64", "meta"]),
    }
    return mixed(common, hostile)


def _build_grads(entries):
    """The grads of a case and, per entry, the index of the grad it shares memory with (None: its own)."""
    grads, shares = [], []
    for i, e in enumerate(entries):
        share = None
        if "tensor" in e:
            g = make_tensor(e["tensor"])
        elif "none" in e:
            g = None
        elif "float" in e:
            g = e["float"]
        elif "sparse" in e:
            g = torch.sparse_coo_tensor([[0, 2]], [1.0, 2.0], (4,), check_invariants=True)
        else:
            j = e.get("alias", e.get("overlap"))
            src = grads[j] if j < i else None
            if not isinstance(src, torch.Tensor) or src.layout != torch.strided or src.device.type == "meta":
                g = make_tensor({"shape": (3,), "dtype": "float32", "layout": "contiguous", "values": "normal",
                                 "seed": j, "flag": None})
            else:
                share = j if src.numel() > 0 else None  # empty tensors share no bytes
                if "overlap" in e and src.numel() > 1 and src.is_contiguous():
                    g = src.detach().reshape(-1)[1:]  # all but the first element of src's
                else:
                    g = src
        grads.append(g)
        shares.append(share)
    return grads, shares


def _entry_problem(e, share) -> tuple[str | None, bool]:
    """(why grads[i] must be refused or None, whether it is hostile at all)."""
    if share is not None:
        return f"shares memory with grads[{share}]", True
    if "tensor" in e:
        spec = e["tensor"]
        return spec_problem(spec, written=True), is_hostile(spec)
    if "none" in e:
        return None, True
    if "float" in e:
        return "a Python float", True
    if "sparse" in e:
        return "a sparse tensor", True
    return None, False  # a fresh tensor in place of an alias of a non-tensor


def build_unscale(case) -> Call:
    entries = case["grads"]
    grads, shares = _build_grads(entries)
    grad_mode = case["grad_mode"]
    names, invalid, unsure = [], [], []
    for i, (e, share) in enumerate(zip(entries, shares)):
        problem, hostile = _entry_problem(e, share)
        if hostile:
            names.append("grads")
        spec = e.get("tensor", {})
        if problem is None and spec.get("flag") == "requires_grad" and grad_mode and spec["dtype"] in FLOATS:
            problem = "a leaf requiring grad, grad mode on"
        if problem:
            invalid.append(f"grads[{i}]: {problem}")
    present = any(g is not None for g in grads)
    container = case["container"]
    if container != "list":
        names.append("grads")
        if container in ("tensor", "generator"):
            invalid.append(f"grads is a {container}")
    args = {}
    for key in ("inv_scale", "found_inf", "norm_sq"):
        spec = case[key]
        args[key] = make_scalar(spec)
        if scalar_hostile(spec, {"inv_scale": 0.5, "found_inf": 0.0, "norm_sq": 0.0}[key]):
            names.append(key)
        problem = scalar_problem(spec, written=key != "inv_scale", optional=key == "norm_sq")
        if problem is None and spec.get("flag") == "requires_grad" and key != "inv_scale" and grad_mode \
                and spec["kind"] == "tensor":
            problem = "a leaf requiring grad, grad mode on"
        if problem and present:  # an empty list is a no-op: nothing else is checked
            invalid.append(f"{key}: {problem}")
    pti = case["per_tensor_inf"]
    n = len(grads)
    args["per_tensor_inf"] = {"none": None, "ok": torch.zeros(n), "short": torch.zeros(n + 1),
                              "float64": torch.zeros(n, dtype=torch.float64),
                              "meta": torch.zeros(n, device="meta")}[pti]
    if pti != "none":
        names.append("per_tensor_inf")
    if pti in ("short", "float64") and present:
        invalid.append(f"per_tensor_inf: {pti}")
    backend = case["backend"]
    if backend not in LONG_BACKENDS:
        names.append("backend")
        if backend == "bogus" and present:
            invalid.append("backend 'bogus'")
    tensors = [t for t in [*grads, *args.values()] if isinstance(t, torch.Tensor)]
    on_meta = [t.device.type == "meta" for t in tensors]
    if any(on_meta) and present:
        names += ["grads", "inv_scale", "found_inf", "norm_sq", "per_tensor_inf", "backend"]
        if all(on_meta) and backend in ("auto", "reference"):
            unsure.append("every tensor on the meta device")
        else:
            invalid.append("tensors on the meta device and on the CPU, or a CPU backend for meta tensors")
    if invalid:
        unsure = []

    def arg_grads():
        if container == "tuple":
            return tuple(grads)
        if container == "tensor":
            return next((g for g in grads if isinstance(g, torch.Tensor)), torch.zeros(0))
        if container == "generator":
            return (g for g in grads)
        return list(grads)

    def run():
        with torch.set_grad_enabled(grad_mode):
            ops.unscale_and_check_(arg_grads(), args["inv_scale"], args["found_inf"], args["norm_sq"],
                                   per_tensor_inf=args["per_tensor_inf"], backend=backend)

    watched = [(f"grads[{i}]", g) for i, g in enumerate(grads) if isinstance(g, torch.Tensor)]
    watched += [(k, v) for k, v in args.items() if isinstance(v, torch.Tensor)]
    oracle = None if invalid or unsure or not present else _unscale_oracle(case, grads, args)
    return Call(run, sorted(set(names)), invalid, unsure, watched, oracle)


def _unscale_oracle(case, grads, args):
    """torch's own unscale (bit for bit) on a second build of the inputs; found_inf and per_tensor_inf as documented
    (a grad is flagged when torch's unscaled values hold inf/NaN: torch's own found_inf misses the finite grads that
    overflow when unscaled);
    norm_sq: the kernels square and add in fp32, so |norm_sq - (init + sum of squares in fp64)| <= (n + 2) * u *
    (|init| + sum) for n squared terms (each square and each addition one rounding; every term is >= 0, so no
    cancellation, whatever the summation order)."""
    fresh, _ = _build_grads(case["grads"])
    inv = args["inv_scale"]
    present = [(i, g) for i, g in enumerate(fresh) if g is not None]
    by_dtype: dict = {}
    for _, g in present:
        by_dtype.setdefault(g.dtype, []).append(g)
    torch_found = torch.zeros(1)
    with torch.no_grad():
        products = [g.detach().float() * inv.reshape(()) for _, g in present]
        for group in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_([g.detach() for g in group], torch_found,
                                                            inv.reshape(1))
        bad = [not bool(torch.isfinite(g.detach()).all()) for _, g in present]  # as written
    total = sum((p.double().square().sum() for p in products), torch.zeros((), dtype=torch.float64))
    terms = sum(p.numel() for p in products)
    found0 = args["found_inf"].clone()
    norm0 = None if args["norm_sq"] is None else args["norm_sq"].clone()
    pti0 = None if args["per_tensor_inf"] is None else args["per_tensor_inf"].clone()

    def check(_):
        for (i, want), got in zip(present, [grads[i] for i, _ in present]):
            if not bits_equal(got, want):
                return f"grads[{i}] differs from torch's unscale: {first_difference(got, want)}"
        expected_found = torch.ones_like(found0) if any(bad) else found0
        if not bits_equal(args["found_inf"], expected_found):
            return f"found_inf {args['found_inf'].tolist()}, expected {expected_found.tolist()}"
        if norm0 is not None:
            exact = norm0.double() + total
            err = (terms + 2) * U32 * (norm0.double().abs() + total)
            huge = exact.abs() * (1 + 4 * (terms + 2) * U32) >= torch.finfo(torch.float32).max
            problem = out_of_interval(args["norm_sq"], exact, err, huge)
            if problem:
                return f"norm_sq: {problem}"
        if pti0 is not None:
            want = pti0.clone()
            for (i, _), b in zip(present, bad):
                if b:
                    want[i] = 1.0
            if not bits_equal(args["per_tensor_inf"], want):
                return f"per_tensor_inf {args['per_tensor_inf'].tolist()}, expected {want.tolist()}"
        return None

    return check


# ---------------------------------------------------------------- targets: ops.matmul, ops.matmul_accumulate_

HALVES = ("float16", "bfloat16")
GEMM_DIMS = [0, 1, 1, 2, 3, 5, 8, 16, 17, 33]
GEMM_BATCH = [(), (), (), (2,), (1, 3), (0,)]
READ_LAYOUTS = ["contiguous"] * 4 + ["transposed", "transposed", "gappy", "offset", "expanded", "permuted",
                                     "overlapping"]
TINY = 2.0 ** -149  # fp32's smallest subnormal: an fp32 operation's absolute error bound below the normal range


@st.composite
def _gemm_operands(draw, hostile=True):
    m, k, n = (draw(st.sampled_from(GEMM_DIMS)) for _ in range(3))
    batch = draw(st.sampled_from(GEMM_BATCH))
    if not hostile:
        dtype = draw(st.sampled_from(HALVES))
        a = draw(tensor_spec(dtypes=(dtype,), shapes=((*batch, m, k),), layouts=READ_LAYOUTS, flags=False))
        b = draw(tensor_spec(dtypes=(dtype,), shapes=((k, n),), layouts=READ_LAYOUTS, flags=False))
        return {"a": a, "b": b, "rank": "ok", "n": n, "out_shape": (*batch, m, n)}
    rank = draw(st.sampled_from(["ok"] * 4 + ["a1d", "b3d", "bK"]))
    a_shape = (*batch, m, k) if rank != "a1d" else (k,)
    b_shape = (k, n) if rank == "ok" or rank == "a1d" else (2, k, n) if rank == "b3d" else (k + 1, n)
    dtype = draw(st.sampled_from(HALVES * 2 + ("float32", "float64", "int8")))
    b_dtype = draw(st.sampled_from([dtype] * 3 + ["float16", "bfloat16", "float32"]))
    flags = st.sampled_from([None] * 3 + ["requires_grad", "inference", "meta"])
    a = draw(tensor_spec(dtypes=(dtype,), shapes=(a_shape,), layouts=READ_LAYOUTS, flags=False))
    b = draw(tensor_spec(dtypes=(b_dtype,), shapes=(b_shape,), layouts=READ_LAYOUTS, flags=False))
    a["flag"], b["flag"] = draw(flags), draw(flags)
    return {"a": a, "b": b, "rank": rank, "n": n, "out_shape": (*batch, m, n) if rank == "ok" else None}


def _bias_case(dtypes, layouts, shapes, flags):
    return st.fixed_dictionaries({"dtype": st.sampled_from(dtypes), "layout": st.sampled_from(layouts),
                                  "shape": st.sampled_from(shapes), "values": st.sampled_from(VALUES),
                                  "seed": st.integers(0, 2**16), "flag": st.sampled_from(flags)})


def matmul_cases(backends=FAST_BACKENDS):
    common = {
        "backend": st.sampled_from(backends),
        "ops": _gemm_operands(hostile=False),
        "bias": st.one_of(st.none(), _bias_case(FLOATS, ["contiguous", "contiguous", "gappy", "offset", "expanded"],
                                                ["N"], [None])),
        "out_dtype": st.sampled_from([None, None, "float16", "bfloat16", "float32"]),
        "backward": st.booleans(),
        "grad_mode": st.booleans(),
    }
    hostile = {
        "backend": st.sampled_from(["auto", "bogus"]),
        "ops": _gemm_operands(),
        "bias": _bias_case(FLOATS + ("float64", "int32"), ["contiguous", "gappy", "offset", "expanded"],
                           ["N", "N+1", "1xN", "scalar"], [None, "requires_grad", "meta"]),
        "out_dtype": st.sampled_from(["float64", "str"]),
    }
    return mixed(common, hostile)


def _bias_spec(case):
    spec = case["bias"]
    if spec is None:
        return None
    n = case["ops"]["n"]
    shape = {"N": (n,), "N+1": (n + 1,), "1xN": (1, n), "scalar": ()}[spec["shape"]]
    return {**spec, "shape": shape}


def _gemm_problems(case, names, invalid, *, accumulate: bool) -> None:
    """The documented refusals of matmul's operands and backend (into invalid), the hostile arguments (names)."""
    o = case["ops"]
    a, b = o["a"], o["b"]
    for key, spec in (("a", a), ("b", b)):
        if spec["dtype"] not in HALVES or effective_layout(spec) != "contiguous" or spec["flag"]:
            names.append(key)
    if a["dtype"] not in HALVES:
        invalid.append(f"a is {a['dtype']}")
    if b["dtype"] not in HALVES:
        invalid.append(f"b is {b['dtype']}")
    if a["dtype"] != b["dtype"]:
        names += ["a", "b"]
        invalid.append("a and b differ in dtype")
    if o["rank"] != "ok":
        names += ["a", "b"]
        invalid.append(f"operand shapes: {o['rank']}")
    backend = case["backend"]
    if backend not in LONG_BACKENDS:
        names.append("backend")
        if backend == "bogus":
            invalid.append("backend 'bogus'")


def _device_rule(case, tensors_specs, names, invalid, unsure) -> None:
    """Every tensor on one device; all on meta: the reference runs shapes only (either outcome)."""
    on_meta = [s["flag"] == "meta" for s in tensors_specs]
    if any(on_meta):
        names += ["a", "b", "bias", "c", "backend"]
        if all(on_meta) and case["backend"] in ("auto", "reference"):
            unsure.append("every tensor on the meta device")
        else:
            invalid.append("tensors on meta and CPU, or a CPU backend for meta tensors")


def _exact_gemm(a: torch.Tensor, b: torch.Tensor, add=None):
    """(exact, err, uncertain) of fp32-accumulated a @ b (+ add, broadcast), in fp64. Products of half inputs are
    exact in fp32 (11 or 8 significant bits each); a sum of K + 1 terms in fp32, in any order, is within
    (K + 1) * u * sum|terms| of the exact sum, plus (K + 2) * 2^-149 below the normal range. Elements whose finite
    terms could overflow fp32 (|terms| summing to fp32's range) are uncertain: whether a partial sum overflows
    depends on the order."""
    A, B = a.detach().double(), b.detach().double()
    exact = A @ B
    absA = torch.where(torch.isfinite(A), A.abs(), torch.zeros_like(A))
    absB = torch.where(torch.isfinite(B), B.abs(), torch.zeros_like(B))
    mag = absA @ absB
    k = a.shape[-1]
    if add is not None:
        C = add.detach().double()
        exact = exact + C
        mag = mag + torch.where(torch.isfinite(C), C.abs(), torch.zeros_like(C))
    err = (k + 1) * U32 * mag + (k + 2) * TINY
    uncertain = mag * (1 + 4 * (k + 2) * U32) >= torch.finfo(torch.float32).max
    return exact, err, uncertain.expand(exact.shape) if uncertain.shape != exact.shape else uncertain


def build_matmul(case) -> Call:
    o = case["ops"]
    a_spec, b_spec, bias_spec = o["a"], o["b"], _bias_spec(case)
    names, invalid, unsure = [], [], []
    _gemm_problems(case, names, invalid, accumulate=False)
    a, b = make_tensor(a_spec), make_tensor(b_spec)
    bias = make_tensor(bias_spec) if bias_spec is not None else None
    if bias_spec is not None:
        if bias_spec["dtype"] != "float32" or bias_spec["shape"] != (o["n"],) or bias_spec["layout"] != "contiguous" \
                or bias_spec["flag"]:
            names.append("bias")
        if bias_spec["dtype"] not in FLOATS:
            invalid.append(f"bias is {bias_spec['dtype']}")
        if o["rank"] == "ok" and bias_spec["shape"] != (o["n"],):
            invalid.append(f"bias has shape {bias_spec['shape']}")
    out_dtype = case["out_dtype"]
    if out_dtype is not None:
        names.append("out_dtype")
        if out_dtype not in FLOATS:
            invalid.append(f"out_dtype {out_dtype}")
    _device_rule(case, [a_spec, b_spec] + ([bias_spec] if bias_spec else []), names, invalid, unsure)
    backward = case["backward"] and case["grad_mode"]
    leaves = [t for t in (a, b, bias) if t is not None and t.requires_grad]
    if invalid:
        unsure = []
    out_dt = None if out_dtype in (None, "str") else DT.get(out_dtype, out_dtype)
    if out_dtype == "str":
        out_dt = "float16"

    def run():
        with torch.set_grad_enabled(case["grad_mode"]):
            out = ops.matmul(a, b, bias=bias, out_dtype=out_dt, backend=case["backend"])
            if backward and leaves and out.requires_grad:
                gen = torch.Generator().manual_seed(a_spec["seed"] + 1)
                grad = fill_values(out.numel(), out.dtype, "normal", gen).view(out.shape)
                out.backward(grad)
                return out, grad
        return out, None

    watched = [(k, t) for k, t in (("a", a), ("b", b), ("bias", bias)) if t is not None]
    check = None
    if not invalid and not unsure:
        check = _matmul_oracle(a, b, bias, out_dt, watched)
    return Call(run, sorted(set(names)), invalid, unsure, watched, check)


def _matmul_oracle(a, b, bias, out_dtype, watched):
    before = Snapshot(watched)
    want_dtype = out_dtype or a.dtype

    def check(result):
        out, grad = result
        changed = before.changed()
        if changed:
            return f"an input changed: {changed}"
        shape = (*a.shape[:-1], b.shape[1])
        if tuple(out.shape) != shape or out.dtype != want_dtype:
            return f"out is {tuple(out.shape)} {out.dtype}, expected {shape} {want_dtype}"
        exact, err, uncertain = _exact_gemm(a, b, None if bias is None else bias.float())
        problem = out_of_interval(out, exact, err, uncertain)
        if problem:
            return f"out: {problem}"
        if grad is not None:
            return _matmul_grads_problem(a, b, bias, grad)
        return None

    return check


def _matmul_grads_problem(a, b, bias, grad):
    """The backward's GEMMs take grad rounded to a's dtype (documented), each with the forward's bound."""
    g = grad.to(a.dtype)
    rows = numel(a.shape[:-1])
    flat_a, flat_g = a.detach().reshape(rows, a.shape[-1]), g.reshape(rows, g.shape[-1])
    if a.requires_grad:
        if a.grad is None:
            return "a.grad is None after backward"
        exact, err, unc = _exact_gemm(g, b.detach().t())
        problem = out_of_interval(a.grad, exact, err, unc)
        if problem:
            return f"a.grad: {problem}"
    if b.requires_grad:
        if b.grad is None:
            return "b.grad is None after backward"
        exact, err, unc = _exact_gemm(flat_a.t(), flat_g)
        problem = out_of_interval(b.grad, exact, err, unc)
        if problem:
            return f"b.grad: {problem}"
    if bias is not None and bias.requires_grad:
        if bias.grad is None:
            return "bias.grad is None after backward"
        G = grad.double().reshape(rows, grad.shape[-1])
        exact = G.sum(0)
        fin = torch.where(torch.isfinite(G), G.abs(), torch.zeros_like(G)).sum(0)
        problem = out_of_interval(bias.grad, exact, rows * U32 * fin + rows * TINY,
                                  fin * (1 + 4 * rows * U32) >= torch.finfo(torch.float32).max)
        if problem:
            return f"bias.grad: {problem}"
    return None


def matmul_accumulate_cases(backends=FAST_BACKENDS):
    def c_case(dtypes, layouts, shapes, flags):
        return st.fixed_dictionaries({"dtype": st.sampled_from(dtypes), "layout": st.sampled_from(layouts),
                                      "shape": st.sampled_from(shapes), "values": st.sampled_from(VALUES),
                                      "seed": st.integers(0, 2**16), "flag": st.sampled_from(flags)})

    common = {
        "backend": st.sampled_from(backends),
        "ops": _gemm_operands(hostile=False),
        "c": c_case(["float32"], ["contiguous"] * 3 + ["transposed", "gappy", "offset", "permuted"], ["out"], [None]),
        "grad_mode": st.booleans(),
    }
    hostile = {
        "backend": st.sampled_from(["auto", "bogus"]),
        "ops": _gemm_operands(),
        "c": c_case(["float32", "float16", "float64"], LAYOUTS, ["out", "out+1", "flat"],
                    [None, "requires_grad", "inference", "meta"]),
    }
    return mixed(common, hostile)


def build_matmul_accumulate(case) -> Call:
    o = case["ops"]
    a_spec, b_spec = o["a"], o["b"]
    names, invalid, unsure = [], [], []
    _gemm_problems(case, names, invalid, accumulate=True)
    a, b = make_tensor(a_spec), make_tensor(b_spec)
    c_case = case["c"]
    out_shape = o["out_shape"] or (1,)
    shape = {"out": out_shape, "out+1": (*out_shape[:-1], out_shape[-1] + 1), "flat": (numel(out_shape),)}[
        c_case["shape"]]
    c_spec = {**c_case, "shape": shape}
    c = make_tensor(c_spec)
    if is_hostile(c_spec) or c_spec["dtype"] != "float32" or c_case["shape"] != "out":
        names.append("c")
    if c_spec["dtype"] != "float32":
        invalid.append(f"c is {c_spec['dtype']}")
    if o["rank"] == "ok" and tuple(shape) != tuple(out_shape):
        invalid.append(f"c has shape {shape}")
    if c_spec["flag"] != "meta":
        if effective_layout(c_spec) in SELF_OVERLAPPING and numel(shape) > 1:
            invalid.append(f"c is {effective_layout(c_spec)}")
        if c_spec["flag"] == "inference":
            invalid.append("c is an inference tensor")
        if c_spec["flag"] == "requires_grad" and case["grad_mode"]:
            invalid.append("c is a leaf requiring grad, grad mode on")
    _device_rule(case, [a_spec, b_spec, c_spec], names, invalid, unsure)
    if invalid:
        unsure = []
    c0 = c.detach().clone()
    base0 = _storage_bytes(c)

    def run():
        with torch.set_grad_enabled(case["grad_mode"]):
            ops.matmul_accumulate_(c, a, b, backend=case["backend"])

    watched = [("c", c), ("a", a), ("b", b)]
    check = None
    if not invalid and not unsure:
        reads = Snapshot([("a", a), ("b", b)])

        def check(_):
            changed = reads.changed()
            if changed:
                return f"an input changed: {changed}"
            exact, err, uncertain = _exact_gemm(a, b, c0)
            problem = out_of_interval(c, exact, err, uncertain)
            if problem:
                return f"c: {problem}"
            return _outside_view_problem(c, base0)

    return Call(run, sorted(set(names)), invalid, unsure, watched, check)


def _outside_view_problem(t: torch.Tensor, before_bytes) -> str | None:
    """None when every byte of t's storage outside t's own elements is as it was."""
    if before_bytes is None:
        return None
    after = _storage_bytes(t)
    size = after.numel() // t.element_size()
    mine = torch.zeros(size, dtype=torch.bool)
    if t.numel():
        mine.as_strided(t.shape, t.stride(), t.storage_offset()).fill_(True)
    mask = mine.repeat_interleave(t.element_size())
    outside = (after != before_bytes) & ~mask[:after.numel()]
    if bool(outside.any()):
        return f"{int(outside.sum())} bytes of the storage outside the tensor were written"
    return None


# ---------------------------------------------------------------- target: ops.adam_step_

from mixprec import testing as _testing  # noqa: E402  (the valid states this target mutates)
from mixprec.ops.adam import EXP_AVG_SQ_DTYPES  # noqa: E402

ADAM_LISTS = _testing.ADAM_LISTS
OPTIONAL = ("max_exp_avg_sqs", "master_params", "param_remainders", "exp_avg_scales", "exp_avg_sq_scales")
PER_ELEMENT = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "master_params", "param_remainders")
ADAM_SHAPES = [(), (1,), (7,), (3, 5), (5, 1), (0,), (2, 3, 4), (2, 3, 2, 2), (300,), (0, 3)]
ADAM_LAYOUTS = ["contiguous"] * 5 + ["transposed", "channels_last", "permuted"]
MUTATIONS = ["drop", "extra", "empty", "dtype", "shape", "strides", "gappy", "expanded", "alias", "value", "none",
             "python", "inference", "requires_grad", "container", "meta", "share_step"]
STEP_VALUES = [0.0, 1.0, 4.0, 1e6, -1.0, -0.5, math.inf, math.nan, 2.5, 1e30]
STATE_VALUES = [math.inf, -math.inf, math.nan, -1.0, 1e-40, 3e38, 0.0]


def _mutation():
    return st.fixed_dictionaries({
        "op": st.sampled_from(MUTATIONS), "list": st.sampled_from(ADAM_LISTS), "i": st.integers(0, 3),
        "other": st.sampled_from(ADAM_LISTS), "j": st.integers(0, 3),
        "dtype": st.sampled_from(["float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "int32"]),
        "value": st.sampled_from(STATE_VALUES + STEP_VALUES),
        "container": st.sampled_from(["tuple", "tensor", "generator", "dict"])})


def _hyper_values(default, hostile, weight=6):
    return st.sampled_from([default] * weight + hostile)


def adam_step_cases(backends=FAST_BACKENDS):
    params = st.lists(st.fixed_dictionaries({"shape": st.sampled_from(ADAM_SHAPES),
                                             "layout": st.sampled_from(ADAM_LAYOUTS), "specials": st.booleans(),
                                             "step": st.sampled_from([0.0, 0.0, 4.0, 1000.0])}), min_size=1,
                      max_size=4)
    common = {
        "backend": st.sampled_from(backends),
        "variant": st.sampled_from(list(_testing.VARIANTS)),
        "state": st.sampled_from(["fp32", "fp32", "fp32", "bf16", "int8"]),
        "amsgrad": st.booleans(),
        "params": params,
        "seed": st.integers(0, 2**16),
        "mutations": st.just([]),
        "lr": st.sampled_from([1e-3, 1e-3, 0.0, 0.1, "tensor"]),
        "beta1": st.sampled_from([0.9, 0.9, 0.0, 0.5]),
        "beta2": st.sampled_from([0.999, 0.999, 0.0, 0.9]),
        "eps": st.sampled_from([1e-8, 1e-8, 1e-6, 1.0]),
        "weight_decay": st.sampled_from([0.01, 0.0, 0.1]),
        "decoupled": st.booleans(),
        "maximize": st.booleans(),
        "sr_seed": st.just("default"),
        "grad_scale": good_scalar([1024.0, 1.0, 3.0, 2.0**-10], optional=True),
        "found_inf": good_scalar([0.0] * 4 + [1.0], optional=True),
        "clip_coef": good_scalar([0.7, 1.0, 0.0, 1e-3], optional=True),
        "grad_mode": st.booleans(),
    }
    hostile = {
        "backend": st.sampled_from(["auto", "bogus"]),
        "mutations": st.lists(_mutation(), min_size=1, max_size=3),
        "lr": st.sampled_from(HOSTILE_FLOATS + ["0.001", None, "tensor-inf", "tensor-2d", "tensor-f64",
                                                "tensor-meta", "tensor-grad"]),
        "beta1": st.sampled_from([1.0, -0.1, math.nan, math.inf, "0.9", None, 0.999999]),
        "beta2": st.sampled_from([1.0, 1.5, math.nan, "0.999", None]),
        "eps": st.sampled_from([0.0, -1e-8, math.inf, math.nan, 1e-300, 1e-45, "1e-8"]),
        "weight_decay": st.sampled_from([-0.1, math.inf, math.nan, 1e300, "0", 1e6]),
        "decoupled": st.sampled_from(["yes", None, 2]),
        "maximize": st.sampled_from(["no", None]),
        "sr_seed": st.sampled_from([None, 0, 1234, -1, 2**32, "1", 1.5, True]),
        "grad_scale": scalar_spec([1024.0, 0.0, -1.0, math.inf, math.nan, 1e-40, 3e38],
                                  kinds=("tensor",) * 4 + ("float", "meta")),
        "found_inf": scalar_spec([0.0, 1.0, math.nan, -1.0, 0.5], kinds=("tensor",) * 4 + ("float", "meta")),
        "clip_coef": scalar_spec([0.7, -1.0, math.inf, math.nan, 1e-40],
                                 kinds=("tensor",) * 4 + ("float", "meta")),
    }
    return mixed(common, hostile)


def _adam_lists(case) -> dict:
    """The valid lists of the case's variant and state kind (mixprec.testing.random_state, one call per param so
    that each param has its own shape, layout, specials and step count), then the case's mutations."""
    state = case["state"]
    amsgrad = case["amsgrad"] and state != "int8"
    lists = {k: [] for k in ADAM_LISTS}
    for k, p in enumerate(case["params"]):
        layout, dims = p["layout"], len(p["shape"])
        if (layout == "transposed" and dims != 2) or (layout == "channels_last" and dims != 4):
            layout = "contiguous"
        one = _testing.random_state([tuple(p["shape"])], case["variant"], amsgrad=amsgrad, specials=p["specials"],
                                    seed=case["seed"] + 17 * k, state=state, step=p["step"],
                                    layout=layout if layout != "permuted" else "contiguous")
        if layout == "permuted":
            one = {key: [_permuted(t) if key in PER_ELEMENT else t for t in v] for key, v in one.items()}
        for key, v in one.items():
            lists[key] += v
    for m in case["mutations"]:
        _mutate(lists, m)
    return lists


def _permuted(t: torch.Tensor) -> torch.Tensor:
    """t's values stored with its dimensions in reverse order (a dense non-contiguous layout)."""
    if t.dim() < 2:
        return t
    order = list(range(t.dim() - 1, -1, -1))
    return t.permute(order).contiguous().permute(order)  # permute is its own inverse for a reversal


def _mutate(lists: dict, m: dict) -> None:
    op, key = m["op"], m["list"]
    lst = lists[key]
    if op == "container" and isinstance(lst, list):
        lists[key] = {"tuple": tuple(lst), "tensor": lst[0] if lst and isinstance(lst[0], torch.Tensor)
                      else torch.zeros(1), "generator": iter(lst), "dict": dict(enumerate(lst))}[m["container"]]
        return
    if not isinstance(lst, list):
        return
    if op == "drop":
        if lst:
            lst.pop()
        return
    if op == "extra":
        lst.append(lst[-1].clone() if lst and isinstance(lst[-1], torch.Tensor) else torch.zeros(3))
        return
    if op == "empty":
        lst.clear()
        return
    if op == "share_step":
        steps = lists["steps"]
        if isinstance(steps, list) and len(steps) > 1:
            steps[m["i"] % len(steps)] = steps[m["j"] % len(steps)]
        return
    if not lst:
        return
    i = m["i"] % len(lst)
    t = lst[i]
    if not isinstance(t, torch.Tensor):
        return
    with torch.no_grad():
        if op == "dtype":
            lst[i] = t.to(DT[m["dtype"]]) if m["dtype"] not in ("int8", "uint8", "int16", "int32") or \
                not t.dtype.is_floating_point else t.clamp(-100, 100).nan_to_num(0).to(DT[m["dtype"]])
        elif op == "shape":
            lst[i] = t.reshape(-1) if t.dim() != 1 else t.unsqueeze(0)
        elif op == "strides":
            if t.dim() >= 2 and t.shape[-1] > 1 and t.shape[-2] > 1:
                lst[i] = t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.is_contiguous() else t.contiguous()
        elif op == "gappy":
            if t.dim() >= 1 and t.numel():
                base = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
                base[..., ::2] = t
                lst[i] = base[..., ::2]
        elif op == "expanded":
            if t.dim() >= 1 and t.numel() > 1:
                lst[i] = t.reshape(-1)[:1].expand(t.shape)
        elif op == "alias":
            other = lists[m["other"]]
            if isinstance(other, list) and other:
                lst[i] = other[m["j"] % len(other)]
        elif op == "value":
            if t.numel():
                t.view(-1)[0] = m["value"] if t.dtype.is_floating_point else 0
        elif op == "none":
            lst[i] = None
        elif op == "python":
            lst[i] = 1.0
        elif op == "inference":
            with torch.inference_mode():
                lst[i] = t.clone()
        elif op == "requires_grad":
            if t.dtype.is_floating_point:
                lst[i] = t.detach().clone().requires_grad_()
        elif op == "meta":
            lst[i] = t.to("meta")


def _adam_hyper(case, n_params) -> dict:
    """The keyword arguments of the call (lr and the scalars built)."""
    variant = case["variant"]
    kw = {}
    lr = case["lr"]
    if isinstance(lr, str) and lr.startswith("tensor"):
        lr = {"tensor": torch.tensor([1e-3]), "tensor-inf": torch.tensor([math.inf]),
              "tensor-2d": torch.full((2, 1), 1e-3), "tensor-f64": torch.tensor([1e-3], dtype=torch.float64),
              "tensor-meta": torch.tensor([1e-3], device="meta"),
              "tensor-grad": torch.tensor([1e-3], requires_grad=True)}[lr]
    kw["lr"] = lr
    for key in ("beta1", "beta2", "eps", "weight_decay", "decoupled", "maximize"):
        kw[key] = case[key]
    sr = case["sr_seed"]
    kw["sr_seed"] = (1234 if _testing.VARIANTS[variant].stochastic else None) if sr == "default" else sr
    for key in ("grad_scale", "found_inf", "clip_coef"):
        kw[key] = make_scalar(case[key])
    return kw


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, str)


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or mixprec.ops._validate.is_non_overlapping_and_dense(t)


def _storage_key(t):
    return (t.untyped_storage().data_ptr(), t.device) if t.device.type != "meta" else None


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0 or _storage_key(a) is None or _storage_key(a) != _storage_key(b):
        return False
    lo_a, hi_a = mixprec.ops._validate._byte_range(a)
    lo_b, hi_b = mixprec.ops._validate._byte_range(b)
    return lo_a < hi_b and lo_b < hi_a


def adam_problems(lists: dict, kw: dict, grad_mode: bool) -> tuple[list, list, list]:
    """(invalid, unsure, names) of an adam_step_ call, restated from its docstring (independently of its code)."""
    invalid, unsure, names = [], [], []

    def bad(name, why):
        names.append(name)
        invalid.append(f"{name}: {why}")

    # hyper-parameters: checked before anything else
    lr = kw["lr"]
    if isinstance(lr, torch.Tensor):
        names.append("lr")
    elif not _is_real(lr) or isinstance(lr, bool):
        bad("lr", f"{lr!r}")
    elif not 0 <= lr < math.inf:
        bad("lr", f"{lr!r}")
    for key, ok in (("beta1", lambda x: 0 <= x < 1), ("beta2", lambda x: 0 <= x < 1),
                    ("eps", lambda x: 0 < x < math.inf), ("weight_decay", lambda x: 0 <= x < math.inf)):
        x = kw[key]
        if not _is_real(x) or not ok(x):
            bad(key, f"{x!r}")
        elif x != {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}[key]:
            names.append(key)
    if kw["eps"] in (1e-300, 1e-45):
        unsure.append("eps rounds to 0 (or a subnormal) in fp32")
    for key in ("decoupled", "maximize"):
        if not isinstance(kw[key], (bool, int)) or isinstance(kw[key], str):
            bad(key, f"{kw[key]!r}")
        elif not isinstance(kw[key], bool):
            names.append(key)
    sr = kw["sr_seed"]
    if sr is not None:
        names.append("sr_seed")
        if isinstance(sr, bool) or not isinstance(sr, int):
            if not isinstance(sr, bool):
                bad("sr_seed", f"{sr!r}")
            else:
                unsure.append("sr_seed is a bool")
        elif not 0 <= sr < 2**32:
            bad("sr_seed", f"{sr!r}")
    for key in ADAM_LISTS:
        lst = lists[key]
        if not isinstance(lst, (list, tuple)):
            bad(key, f"a {type(lst).__name__}")
    if invalid:
        return invalid, [], names
    params = list(lists["params"])
    n = len(params)
    for key in ADAM_LISTS:
        if len(lists[key]) != n and not (key in OPTIONAL and len(lists[key]) == 0):
            bad(key, f"{len(lists[key])} entries for {n} params")
    if invalid or n == 0:
        return invalid, unsure, names
    # tensors: types, devices, dtypes, shapes, layouts
    ok_params = []
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            bad("params", f"params[{i}] is {type(p).__name__}")
        elif p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            bad("params", f"params[{i}] is {p.dtype}")
        else:
            ok_params.append(p)
    if invalid:
        return invalid, unsure, names
    devices = {t.device for key in ADAM_LISTS for t in lists[key] if isinstance(t, torch.Tensor)}
    devices |= {t.device for t in (kw["lr"], kw["grad_scale"], kw["found_inf"], kw["clip_coef"])
                if isinstance(t, torch.Tensor)}
    if len(devices) > 1:
        names += list(ADAM_LISTS) + ["lr", "grad_scale", "found_inf", "clip_coef"]
        invalid.append("tensors on two devices")
        return invalid, unsure, names
    meta = devices == {torch.device("meta")}
    if meta:
        unsure.append("every tensor on the meta device")
    first = lists["exp_avgs"][0]
    if not isinstance(first, torch.Tensor) or first.dtype not in EXP_AVG_SQ_DTYPES:
        bad("exp_avgs", f"exp_avgs[0] is {getattr(first, 'dtype', type(first).__name__)}")
        return invalid, unsure, names
    state_dtype = first.dtype
    int8 = state_dtype == torch.int8
    masters, remainders = lists["master_params"], lists["param_remainders"]
    if masters and remainders:
        bad("master_params", "with param_remainders")
        names.append("param_remainders")
    if sr is not None and (masters or remainders):
        bad("sr_seed", "with master weights")
    for key in ("exp_avg_scales", "exp_avg_sq_scales"):
        if int8 and not lists[key]:
            bad(key, "missing for int8 states")
        if lists[key] and not int8:
            bad(key, f"given for {state_dtype} states")
    if int8 and lists["max_exp_avg_sqs"]:
        bad("max_exp_avg_sqs", "amsgrad with int8 states")
    for i, p in enumerate(params):
        if masters and p.dtype == torch.float32:
            bad("master_params", f"params[{i}] is float32")
        if remainders and p.dtype != torch.bfloat16:
            bad("param_remainders", f"params[{i}] is {p.dtype}")
        if sr is not None and p.dtype == torch.float16:
            bad("sr_seed", f"params[{i}] is float16")
    want = {"grads": None, "exp_avgs": state_dtype, "exp_avg_sqs": EXP_AVG_SQ_DTYPES[state_dtype],
            "max_exp_avg_sqs": EXP_AVG_SQ_DTYPES[state_dtype], "master_params": torch.float32,
            "param_remainders": torch.int16}
    for i, p in enumerate(params):
        if not meta and not _dense(p):
            bad("params", f"params[{i}] is not dense")
        if not meta and p.is_inference() and not torch.is_inference_mode_enabled():
            bad("params", f"params[{i}] is an inference tensor")
        if p.requires_grad and grad_mode:
            bad("params", f"params[{i}] requires grad")
    for key, dtype in want.items():
        for i, t in enumerate(lists[key]):
            p = params[i]
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                bad(key, f"{key}[{i}] is {type(t).__name__}")
                continue
            if t.dtype != (p.dtype if dtype is None else dtype):
                bad(key, f"{key}[{i}] is {t.dtype}")
            if t.shape != p.shape or (t.numel() > 1 and t.stride() != p.stride()):
                bad(key, f"{key}[{i}] has shape/strides {tuple(t.shape)}/{t.stride()} for {tuple(p.shape)}/"
                         f"{p.stride()}")
            if not meta and not _dense(t):
                bad(key, f"{key}[{i}] is not dense")
            if key != "grads" and not meta:
                if t.is_inference():
                    bad(key, f"{key}[{i}] is an inference tensor")
                if t.requires_grad and grad_mode and t.is_leaf:
                    bad(key, f"{key}[{i}] is a leaf requiring grad")
            elif key == "grads" and (t.is_inference() or t.requires_grad) and not meta:
                names.append("grads")
    for key in ("exp_avg_scales", "exp_avg_sq_scales"):
        for i, t in enumerate(lists[key]):
            blocks = -(-params[i].numel() // reference.INT8_BLOCK)
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.shape != (blocks,) or \
                    (not meta and not t.is_contiguous()):
                bad(key, f"{key}[{i}] is not {blocks} contiguous fp32 scales")
            elif not meta and (t.is_inference() or (t.requires_grad and grad_mode)):
                bad(key, f"{key}[{i}] is not writable")
    for i, t in enumerate(lists["steps"]):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.numel() != 1:
            bad("steps", f"steps[{i}] is not a one-element fp32 tensor")
        elif not meta and (t.is_inference() or (t.requires_grad and grad_mode)):
            bad("steps", f"steps[{i}] is not writable")
    for key in ("lr", "grad_scale", "found_inf", "clip_coef"):
        t = kw[key]
        if isinstance(t, torch.Tensor):
            names.append(key)
            if t.dtype != torch.float32 or t.numel() != 1:
                bad(key, f"{tuple(t.shape)} {t.dtype}")
            if key == "lr" and t.requires_grad:
                unsure.append("lr requires grad")
        elif t is not None and key != "lr":
            bad(key, f"a {type(t).__name__}")
    if invalid:
        return invalid, unsure, names
    # memory: no param twice or overlapping; written tensors of other lists sharing memory have no single answer
    written = [(key, i, t) for key in ADAM_LISTS if key != "grads" for i, t in enumerate(lists[key])]
    for x in range(len(written)):
        for y in range(x):
            (k1, i1, t1), (k2, i2, t2) = written[x], written[y]
            if _overlaps(t1, t2):
                names += [k1, k2]
                if k1 == k2 == "params":
                    invalid.append(f"params[{i2}] and params[{i1}] share memory")
                else:
                    unsure.append(f"{k2}[{i2}] and {k1}[{i1}] share memory")
    for i, g in enumerate(lists["grads"]):
        for key, j, t in written:
            if _overlaps(g, t):
                names += ["grads", key]
                unsure.append(f"grads[{i}] shares memory with {key}[{j}]")
    if invalid or meta:
        return invalid, unsure, names
    # values (CPU tensors, unless found_inf skips the step)
    found = kw["found_inf"]
    if found is None or found.item() == 0:
        for key, positive in (("lr", False), ("grad_scale", True), ("clip_coef", False)):
            t = kw[key]
            if key == "lr" and not isinstance(t, torch.Tensor):  # a float lr is used as an fp32 tensor
                t = torch.tensor(float(t), dtype=torch.float32)
            if isinstance(t, torch.Tensor):
                x = t.item()
                if not ((x > 0 if positive else x >= 0) and x < math.inf):
                    bad(key, f"value {x}")
        for i, t in enumerate(lists["steps"]):
            if not 0 <= t.item() < math.inf:
                bad("steps", f"steps[{i}] = {t.item()}")
    return invalid, unsure, names


def build_adam_step(case) -> Call:
    lists = _adam_lists(case)
    n = len(case["params"])
    kw = _adam_hyper(case, n)
    grad_mode = case["grad_mode"]
    invalid, unsure, names = adam_problems(lists, kw, grad_mode)
    backend = case["backend"]
    if backend not in LONG_BACKENDS:
        names.append("backend")
        if backend == "bogus" and not invalid and isinstance(lists["params"], (list, tuple)) and lists["params"]:
            invalid.append("backend 'bogus'")
    if case["mutations"]:
        names += [m["list"] for m in case["mutations"]] + [m["other"] for m in case["mutations"] if m["op"] == "alias"]
    if invalid:
        unsure = []
    watched = [(f"{key}[{i}]", t) for key in ADAM_LISTS if isinstance(lists[key], (list, tuple))
               for i, t in enumerate(lists[key]) if isinstance(t, torch.Tensor)]
    watched += [(k, kw[k]) for k in ("lr", "grad_scale", "found_inf", "clip_coef") if isinstance(kw[k], torch.Tensor)]
    spec_copy = None
    if not invalid and n and not any("meta" in u or "issue #12" in u for u in unsure):
        spec_copy = copy.deepcopy((lists, kw))  # keeps aliasing: two names of one tensor stay one tensor

    def run():
        with torch.set_grad_enabled(grad_mode):
            ops.adam_step_(**{k: lists[k] for k in ADAM_LISTS}, **kw, backend=backend)

    check = None
    if spec_copy is not None:
        check = _adam_oracle(lists, kw, spec_copy, backend, case, aliased=bool(unsure))
    return Call(run, sorted(set(names)), invalid, unsure, watched, check)


def _normalized_kw(kw: dict) -> dict:
    lr = kw["lr"]
    lr = lr.detach().float().reshape(1) if isinstance(lr, torch.Tensor) else torch.tensor([float(lr)])
    return {**kw, "lr": lr, "beta1": float(kw["beta1"]), "beta2": float(kw["beta2"]), "eps": float(kw["eps"]),
            "weight_decay": float(kw["weight_decay"]), "decoupled": bool(kw["decoupled"]),
            "maximize": bool(kw["maximize"]), "sr_seed": -1 if kw["sr_seed"] is None else int(kw["sr_seed"])}


def _adam_oracle(lists, kw, spec_copy, backend, case, *, aliased: bool):
    """The extension's and Triton's kernels: mixprec.reference bit for bit (on a copy that keeps the inputs'
    aliasing, so a call with two names for one tensor must give the spec's sequential result). The reference
    backend: torch.optim.Adam/AdamW (see _adam_torch_problem)."""
    chosen = mixprec._backend.select(backend, torch.device("cpu")) if backend != "bogus" else "reference"
    if chosen == "reference":
        if aliased:
            return None
        torch_inputs = copy.deepcopy(spec_copy)

        def check_torch(_):
            return _adam_torch_problem(lists, kw, *torch_inputs)

        return check_torch
    ref_lists, ref_kw = spec_copy

    def check(_):
        with torch.no_grad():
            reference.adam_step_(**{k: list(ref_lists[k]) for k in ADAM_LISTS}, **_normalized_kw(ref_kw))
        for key in ADAM_LISTS:
            for i, (got, want) in enumerate(zip(lists[key], ref_lists[key])):
                if not bits_equal(got, want):
                    return f"{key}[{i}] differs from mixprec.reference: {first_difference(got, want)}"
        return None

    return check


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype`'s values at |x| (fp64), its smallest subnormal below the normal range."""
    fi = torch.finfo(dtype)
    mant = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}[dtype]
    e = torch.floor(torch.log2(x.abs().clamp_min(fi.smallest_normal)))
    return torch.exp2(e - mant)


def _adam_torch_problem(lists, kw, ref_lists, ref_kw, g_rel: float = 0.0) -> str | None:
    """The reference backend against torch.optim.Adam/AdamW (foreach=False) run on fp32 copies of the inputs
    (the fp32 master, or the param widened; bf16 or int8 moments as their fp32 values; the grad times the
    documented fp32 factor (1 / grad_scale) * clip_coef, which both then read alike). Stored bf16 and int8
    moments may differ from torch's fp32 ones by their rounding as well (_storage_error).

    Tolerance: a first-order forward error analysis of the update in fp32, in fp64 from the inputs, per element
    (u = 2^-24): g' = g + w*wd (coupled) within 2u(|g| + |w wd|); m within 3u(|b1 m| + |(1 - b1) g'|) plus
    the error of g'; v within 4u(|b2 v| + (1 - b2) g'^2) plus 2(1 - b2)|g'| err(g'); sqrt within
    sqrt(v + err) - sqrt(v) plus 2u (torch's CPU sqrt may be an ulp off); the denominator D within that times
    1/sqrt(bc2) plus 3u D; the step lr/bc1 m/D within lr/bc1 (err(m)/D + |m| err(D) / (D (D - err(D)))) plus
    4u |step|; decoupled decay 2u |w|; the final add u |w1|. torch and mixprec are each within that bound of
    the exact update, so they differ by at most twice it; a further factor 2 covers the second-order terms the
    analysis drops. Elements whose magnitudes reach 1e37 (fp32 overflow depends on the order of operations), whose
    denominator is not known to half its size, or whose amsgrad maximum is NaN (mixprec's documented
    `vmax if vmax > v else v` keeps v where torch.maximum propagates the NaN) are skipped; elements with a
    non-finite input need the same NaN / inf pattern as torch."""
    found = ref_kw["found_inf"]
    if found is not None and found.item() != 0:
        for key in ADAM_LISTS:
            for i, (got, want) in enumerate(zip(lists[key], ref_lists[key])):
                if not bits_equal(got, want):
                    return f"found_inf skips the step, yet {key}[{i}] changed: {first_difference(got, want)}"
        return None
    nk = _normalized_kw(ref_kw)
    lr = float(nk["lr"].item())
    b1, b2, eps, wd = nk["beta1"], nk["beta2"], nk["eps"], nk["weight_decay"]
    decoupled, maximize = nk["decoupled"], nk["maximize"]
    amsgrad = len(ref_lists["max_exp_avg_sqs"]) > 0
    factor = torch.ones((), dtype=torch.float32)
    if ref_kw["grad_scale"] is not None:
        gs = ref_kw["grad_scale"].reshape(())
        factor = torch.ones_like(gs) / gs
    if ref_kw["clip_coef"] is not None:
        factor = factor * ref_kw["clip_coef"].reshape(())
    u = U32
    for i, p0 in enumerate(ref_lists["params"]):
        if p0.numel() == 0:
            continue
        masters, remainders = ref_lists["master_params"], ref_lists["param_remainders"]
        if masters:
            w0 = masters[i].clone()
        elif remainders:
            w0 = reference.remainder_join(p0, remainders[i])
        else:
            w0 = p0.float()
        g = ref_lists["grads"][i].float() * factor
        m0, v0 = _moment(ref_lists, "exp_avgs", "exp_avg_scales", i), _moment(ref_lists, "exp_avg_sqs",
                                                                             "exp_avg_sq_scales", i)
        step0 = ref_lists["steps"][i].reshape(()).item()
        w = w0.clone().requires_grad_(False)
        w.grad = g.clone()
        cls = torch.optim.AdamW if decoupled else torch.optim.Adam
        opt = cls([w], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, amsgrad=amsgrad, maximize=maximize,
                  foreach=False)
        state = {"step": torch.tensor(step0), "exp_avg": m0.clone(), "exp_avg_sq": v0.clone()}
        if amsgrad:
            state["max_exp_avg_sq"] = ref_lists["max_exp_avg_sqs"][i].float()
        opt.state[w] = state
        try:
            opt.step()
        except RuntimeError:  # torch refuses the values (an overflowing decay): no oracle
            return None
        # the bound, in fp64
        W, G, M0, V0 = (t.double() for t in (w0, g, m0, v0))
        if maximize:
            G = -G
        s = step0 + 1
        bc1, bc2 = 1 - b1 ** s, 1 - b2 ** s
        if wd and not decoupled:
            G2, eG = G + W * wd, 2 * u * (G.abs() + (W * wd).abs())
        else:
            G2, eG = G, torch.zeros_like(G)
        eG = eG + g_rel * G.abs()
        M1 = b1 * M0 + (1 - b1) * G2
        eM = 3 * u * ((b1 * M0).abs() + ((1 - b1) * G2).abs()) + (1 - b1) * eG
        V1 = b2 * V0 + (1 - b2) * G2 * G2
        eV = 4 * u * ((b2 * V0).abs() + (1 - b2) * G2 * G2) + 2 * (1 - b2) * G2.abs() * eG + (1 - b2) * eG * eG
        S = V1
        nan_max = torch.zeros_like(W, dtype=torch.bool)
        if amsgrad:
            VM0 = ref_lists["max_exp_avg_sqs"][i].double()
            S = torch.maximum(VM0, V1)
            nan_max = torch.isnan(VM0)
        root = S.clamp_min(0).sqrt()
        e_root = (S.clamp_min(0) + eV).sqrt() - root + 2 * u * root
        ibc = 1 / math.sqrt(bc2)
        D = root * ibc + eps
        eD = e_root * ibc + 3 * u * D
        step = lr / bc1 * M1 / D
        e_step = lr / bc1 * (eM / D + M1.abs() * eD / (D * (D - eD).clamp_min(1e-300))) + 4 * u * step.abs()
        if decoupled and wd:
            Wd = W * (1 - lr * wd)
            eWd = 2 * u * Wd.abs() + u * W.abs()
        else:
            Wd, eWd = W, torch.zeros_like(W)
        W1 = Wd - step
        eW1 = eWd + e_step + u * W1.abs()
        inputs = torch.stack([W, G2, M0, V0] + ([ref_lists["max_exp_avg_sqs"][i].double()] if amsgrad else []))
        finite_in = torch.isfinite(inputs).all(0)
        big = torch.stack([W.abs(), G2.abs(), M0.abs(), V0.abs(), (1 - b2) * G2 * G2, step.abs(), W1.abs()]) \
            .nan_to_num(0, posinf=1e300).amax(0) >= 1e37
        skip = big | (eD >= D / 2) | nan_max | (torch.isfinite(W1).logical_not() & finite_in)
        got_w = _adam_result_master(lists, i)
        want_w = w.detach()
        m_got, v_got = _moment(lists, "exp_avgs", "exp_avg_scales", i), _moment(lists, "exp_avg_sqs",
                                                                               "exp_avg_sq_scales", i)
        m_tol = 4 * eM + 4 * u * M1.abs() + _storage_error(lists, "exp_avgs", "exp_avg_scales", i, M1)
        v_tol = 4 * eV + 4 * u * V1.abs() + _storage_error(lists, "exp_avg_sqs", "exp_avg_sq_scales", i, V1)
        for what, got, want, err in (("param", got_w, want_w, 4 * eW1), ("exp_avg", m_got, state["exp_avg"], m_tol),
                                     ("exp_avg_sq", v_got, state["exp_avg_sq"], v_tol)):
            if got is None:
                continue
            if what != "param" and ref_lists["exp_avgs"][i].dtype == torch.int8 and \
                    not bool(torch.isfinite(want).all()):
                continue  # documented: an int8 block holding inf/NaN decodes to non-finite values throughout
            problem = _close_or_same_class(got, want, err, skip, finite_in, half=p0.dtype if (
                what == "param" and got is lists["params"][i] and p0.dtype != torch.float32) else None)
            if problem:
                return f"{what} of params[{i}] vs torch.optim.{cls.__name__}: {problem}"
        if masters or remainders:
            rounded = _adam_result_master(lists, i)
            if masters and not bits_equal(lists["params"][i], rounded.to(p0.dtype)):
                return f"params[{i}] is not its master rounded to nearest even: " \
                       f"{first_difference(lists['params'][i], rounded.to(p0.dtype))}"
        new_step = lists["steps"][i].reshape(()).item()
        want_step = float(torch.tensor(step0, dtype=torch.float32) + 1)
        if not (new_step == want_step or (math.isnan(new_step) and math.isnan(want_step))):
            return f"steps[{i}] is {new_step}, expected {want_step}"
    return None


def _moment(lists, key, scales_key, i) -> torch.Tensor:
    """A moment's fp32 values: bf16 states widened, int8 states decoded with their block scales."""
    t = lists[key][i]
    if t.dtype in (torch.int8, torch.uint8):
        return reference.dequantize_blockwise(t, lists[scales_key][i])
    return t.float()


def _storage_error(lists, key, scales_key, i, exact) -> torch.Tensor:
    """How far a stored moment may be from the value the update computed: nothing for fp32; half an ulp of bf16
    (a whole one here: the value itself is only known to the tolerance); for int8 codes (3 mantissa bits) 1/16 of
    the value relatively, and below the smallest code (1.25 * 2^-16 of the block's absmax for m, 1.25 * 2^-32 for
    v) that code of the largest block scale."""
    t = lists[key][i]
    if t.dtype == torch.bfloat16:
        return _ulp(exact, torch.bfloat16)
    if t.dtype in (torch.int8, torch.uint8):
        scales = lists[scales_key][i]
        top = float(scales.double().nan_to_num(0, posinf=0).max()) if scales.numel() else 0.0
        return exact.abs() / 16 + top * 1.25 * 2.0 ** (-16 if t.dtype == torch.int8 else -32)
    return torch.zeros_like(exact)


def _adam_result_master(lists, i) -> torch.Tensor:
    """The fp32 weight an adam_step_ call left for param i (its master, its remainder join, or the param)."""
    if lists["master_params"]:
        return lists["master_params"][i]
    if lists["param_remainders"]:
        return reference.remainder_join(lists["params"][i], lists["param_remainders"][i])
    return lists["params"][i]


def _close_or_same_class(got, want, err, skip, finite_in, *, half=None) -> str | None:
    """|got - want| <= err (plus an ulp of `half` for half params stored rounded) where the inputs were finite
    and the element is not skipped; where an input was not finite, the same NaN / inf pattern."""
    g, t = got.detach().double(), want.detach().double()
    tol = err.clone()
    if half is not None:
        tol = tol + _ulp(torch.maximum(g.abs().nan_to_num(0, posinf=0), t.abs().nan_to_num(0, posinf=0)), half)
    near = (g - t).abs() <= tol
    near |= (g == t) | (torch.isnan(g) & torch.isnan(t))
    if half is not None:
        near |= torch.isinf(g) & ((t.abs() + tol) >= torch.finfo(half).max) & (torch.sign(g) == torch.sign(t))
    same_class = (torch.isnan(g) == torch.isnan(t)) & (torch.isposinf(g) == torch.isposinf(t)) & \
        (torch.isneginf(g) == torch.isneginf(t))
    ok = torch.where(finite_in, near, same_class) | skip
    if bool(ok.all()):
        return None
    k = int((~ok).reshape(-1).nonzero()[0])
    return (f"{int((~ok).sum())} of {ok.numel()} elements off, first at flat {k}: got {g.reshape(-1)[k].item()!r}, "
            f"torch {t.reshape(-1)[k].item()!r}, tolerance {tol.reshape(-1)[k].item():.3g}")


# ---------------------------------------------------------------- targets: mixprec.optim.FusedAdam / FusedAdamW

class Lost(Exception):
    """Raised by a multi-step run when a refused step changed what it may write (judge counts it as data lost)."""


def _guarded(steps):
    """Runs the zero-argument callables in `steps` [(label, fn, watched)] in order; a refusal is re-raised as is,
    or as Lost when its step's watched objects changed."""
    results = []
    for label, fn, watched in steps:
        before = Snapshot(watched())
        try:
            results.append(fn())
        except Exception as exc:
            changed = before.changed()
            if changed:
                raise Lost(f"{label}: {type(exc).__name__}: {_short(str(exc))}; yet {changed} changed") from exc
            raise
    return results


OPT_DTYPES = ("float32", "float32", "float16", "bfloat16")
OPT_LAYOUTS = ["contiguous"] * 4 + ["transposed", "permuted", "channels_last", "gappy"]
GRAD_LAYOUTS = ["same"] * 5 + ["contiguous", "transposed", "gappy", "none"]
OPT_SHAPES = [(1,), (7,), (3, 5), (5, 1), (2, 3, 4), (2, 3, 2, 2), (300,), (0,), ()]


def _param_case(dtypes=OPT_DTYPES, layouts=OPT_LAYOUTS, grads=GRAD_LAYOUTS):
    return st.fixed_dictionaries({"shape": st.sampled_from(OPT_SHAPES), "dtype": st.sampled_from(dtypes),
                                  "layout": st.sampled_from(layouts), "grad": st.sampled_from(grads),
                                  "group": st.integers(0, 1), "seed": st.integers(0, 2**16)})


OPT_KWARGS_COMMON = {
    "lr": st.sampled_from([1e-3, 1e-3, 0.1, 0.0, "tensor"]),
    "betas": st.sampled_from([(0.9, 0.999), (0.9, 0.999), (0.0, 0.99), (0.5, 0.5), "tensors"]),
    "eps": st.sampled_from([1e-8, 1e-6, 1.0]),
    "weight_decay": st.sampled_from([0.0, 1e-2, 0.1]),
    "amsgrad": st.booleans(),
    "maximize": st.sampled_from([False, False, True]),
    "foreach": st.sampled_from([None, None, True, False]),
    "fused": st.sampled_from([None, None, True]),
    "capturable": st.booleans(),
    "master_weights": st.sampled_from(["auto", "auto", True, False]),
    "max_grad_norm": st.sampled_from([None, None, 1.0, 1e-3]),
    "stochastic_rounding": st.just(False),
    "unscale_grads": st.booleans(),
}
OPT_KWARGS_HOSTILE = {
    "lr": st.sampled_from([-1.0, math.nan, math.inf, "0.1", None, "tensor-2d"]),
    "betas": st.sampled_from([(1.0, 0.999), (0.9,), "x", (math.nan, 0.999), (0.9, -0.1), "mixed"]),
    "eps": st.sampled_from([0.0, -1.0, math.nan, "1e-8"]),
    "weight_decay": st.sampled_from([-1.0, math.nan, math.inf, "0"]),
    "amsgrad": st.sampled_from(["yes", None]),
    "maximize": st.sampled_from(["no", 2]),
    "foreach": st.sampled_from(["x", 1.5]),
    "fused": st.sampled_from([False, "x"]),
    "capturable": st.sampled_from(["x", None]),
    "differentiable": st.sampled_from([True, "x"]),
    "master_weights": st.sampled_from(["x", None, 2]),
    "max_grad_norm": st.sampled_from([0.0, -1.0, math.nan, "1"]),
    "stochastic_rounding": st.sampled_from([True, "x"]),
    "seed": st.sampled_from([-1, 2**32, "0", 1.5]),
    "backend": st.sampled_from(["bogus", None]),
    "unscale_grads": st.sampled_from([1, "yes"]),
}


def fused_adamw_cases(backends=FAST_BACKENDS):
    common = {"cls": st.sampled_from(["FusedAdamW", "FusedAdamW", "FusedAdam"]),
              "backend": st.sampled_from(backends),
              "params": st.lists(_param_case(), min_size=1, max_size=4),
              "groups": st.sampled_from([1, 1, 2]),
              "steps": st.integers(1, 3),
              "between": st.just("nothing"),
              "duplicate": st.just(None),
              **{f"kw_{k}": v for k, v in OPT_KWARGS_COMMON.items()}}
    hostile = {"params": st.lists(_param_case(OPT_DTYPES + ("float64", "complex64", "int32"),
                                              OPT_LAYOUTS + ["expanded"], GRAD_LAYOUTS + ["sparse"]),
                                  min_size=1, max_size=4),
               "between": st.sampled_from(["channels_last", "resize", "del_state", "zero_grad", "permute",
                                           "grad_strides"]),
               "duplicate": st.sampled_from(["within", "across"]),
               **{f"kw_{k}": v for k, v in OPT_KWARGS_HOSTILE.items()}}
    return mixed(common, hostile)


def _opt_kwargs(case) -> dict:
    kw = {}
    for key in set(OPT_KWARGS_COMMON) | set(OPT_KWARGS_HOSTILE):
        if f"kw_{key}" in case:
            kw[key] = case[f"kw_{key}"]
    if kw.get("lr") == "tensor":
        kw["lr"] = torch.tensor(1e-3)
    elif kw.get("lr") == "tensor-2d":
        kw["lr"] = torch.full((2,), 1e-3)
    if kw.get("betas") == "tensors":
        kw["betas"] = (torch.tensor(0.9), torch.tensor(0.999))
    elif kw.get("betas") == "mixed":
        kw["betas"] = (torch.tensor(0.9), 0.999)
    if kw.get("stochastic_rounding") is True:
        kw["master_weights"] = False
    kw["backend"] = kw.get("backend", case["backend"])
    return kw


def _make_param(pc) -> torch.nn.Parameter:
    spec = {"shape": tuple(pc["shape"]), "dtype": pc["dtype"], "layout": pc["layout"], "values": "normal",
            "seed": pc["seed"], "flag": None}
    if spec["layout"] == "gappy" and (not spec["shape"] or numel(spec["shape"]) == 0):
        spec["layout"] = "contiguous"
    t = make_tensor(spec)
    return torch.nn.Parameter(t, requires_grad=t.dtype.is_floating_point or t.dtype.is_complex)


def _set_grad(p: torch.Tensor, kind: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    if kind == "none":
        p.grad = None
        return
    vals = fill_values(p.numel(), p.dtype if p.dtype.is_floating_point else torch.float32, "normal", gen)
    vals = vals.to(p.dtype).view(p.shape) if p.numel() else torch.zeros(p.shape, dtype=p.dtype)
    if kind == "sparse":
        p.grad = vals.to_sparse() if p.dim() > 0 else vals
        return
    if kind == "same":
        g = torch.empty_like(p)
    elif kind == "transposed" and p.dim() >= 2:
        g = torch.empty(*p.shape[:-2], p.shape[-1], p.shape[-2], dtype=p.dtype).transpose(-1, -2)
    elif kind == "gappy" and p.dim() >= 1 and p.numel():
        g = torch.empty(*p.shape[:-1], 2 * p.shape[-1], dtype=p.dtype)[..., ::2]
    else:
        g = torch.empty(p.shape, dtype=p.dtype)
    p.grad = g.copy_(vals)


def _opt_lists(opt, *, clone: bool, after_load: bool = False) -> list:
    """Per param with a grad, the adam_step_-style lists (one entry each) of the optimizer's state as it is now
    (the state a fresh param gets where it has none yet), for the torch oracle. after_load: the masters as the
    first step after a load uses them (documented: an element that does not round to its param is the param's)."""
    out = []
    c = (lambda t: t.detach().clone()) if clone else (lambda t: t.detach())
    for group in opt.param_groups:
        masters = group["master_weights"] is not False
        for p in group["params"]:
            if p.grad is None or p.grad.layout != torch.strided:
                continue
            state = opt.state.get(p, {})
            zeros = torch.zeros(p.shape, dtype=torch.float32)
            lists = {k: [] for k in ADAM_LISTS}
            lists["params"].append(c(p))
            lists["grads"].append(c(p.grad))
            lists["exp_avgs"].append(c(state["exp_avg"]) if "exp_avg" in state else zeros.clone())
            lists["exp_avg_sqs"].append(c(state["exp_avg_sq"]) if "exp_avg_sq" in state else zeros.clone())
            lists["steps"].append(c(state["step"]) if "step" in state else torch.zeros(()))
            if group["amsgrad"]:
                lists["max_exp_avg_sqs"].append(c(state["max_exp_avg_sq"]) if "max_exp_avg_sq" in state
                                                else zeros.clone())
            if masters and p.dtype != torch.float32:
                master = c(state["master_param"]) if "master_param" in state else p.detach().float()
                if after_load:
                    master = torch.where(master.to(p.dtype) == p.detach(), master, p.detach().float())
                lists["master_params"].append(master)
            out.append((group, p, lists))
    return out


def _step_problem(opt, before: list, max_grad_norm, decoupled_default: bool) -> str | None:
    """One FusedAdam/W step against torch.optim.Adam/AdamW from the same state (the ops target's oracle), with
    torch.nn.utils.clip_grad_norm_'s coefficient, computed here in fp64, as the grad factor: mixprec computes it in
    fp32 from an fp32 sum of squares, so the grads the update uses may differ by (n + 8) u relatively (n terms in
    the sum: its bound, halved by the square root, then the division and the multiply), added to the bound."""
    after = {id(p): lists for _, p, lists in _opt_lists(opt, clone=False)}
    coef = None
    if max_grad_norm is not None:
        grads = list({id(lists["grads"][0]): lists["grads"][0] for _, _, lists in before}.values())
        norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
        coef = min(1.0, max_grad_norm / (norm + 1e-6))
        terms = sum(g.numel() for g in grads)
    for k, (group, p, lists) in enumerate(before):
        if id(p) not in after:
            return f"param {k} has no state after the step"
        lr = group["lr"]
        b1, b2 = (float(b) for b in group["betas"])
        kw = {"lr": float(lr), "beta1": b1, "beta2": b2, "eps": group["eps"], "weight_decay": group["weight_decay"],
              "decoupled": group.get("decoupled_weight_decay", decoupled_default), "maximize": group["maximize"],
              "sr_seed": None, "grad_scale": None, "found_inf": None,
              "clip_coef": None if coef is None else torch.tensor([coef], dtype=torch.float32)}
        problem = _adam_torch_problem(after[id(p)], kw, lists, kw, g_rel=0 if coef is None or coef == 1.0
                                      else (terms + 8) * U32)
        if problem:
            return f"{_label(opt, p)}: {problem}"
    return None


def _label(opt, p) -> str:
    for gi, g in enumerate(opt.param_groups):
        for i, q in enumerate(g["params"]):
            if q is p:
                return f"param_groups[{gi}]['params'][{i}]"
    return "?"


def _opt_problems(case, kw, params) -> tuple[list, list, list]:
    """(invalid, unsure, names) of the constructor and the steps, restated from mixprec.optim's docstrings."""
    invalid, unsure, names = [], [], []
    defaults = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
                "maximize": False, "foreach": None, "fused": None, "capturable": False, "differentiable": False,
                "master_weights": "auto", "max_grad_norm": None, "stochastic_rounding": False, "seed": 0,
                "backend": case["backend"], "unscale_grads": False}
    for key, value in kw.items():
        if not _same(("value", value), ("value", defaults.get(key))) or isinstance(value, torch.Tensor):
            names.append(key)

    def bad(key, why):
        names.append(key)
        invalid.append(f"{key}: {why}")

    lr = kw.get("lr")
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            bad("lr", "a tensor of two elements")
    elif not _is_real(lr) or isinstance(lr, bool) or not 0 <= lr:
        bad("lr", repr(lr))
    elif not math.isfinite(lr):
        unsure.append("non-finite lr (torch accepts it)")
    betas = kw.get("betas")
    if not isinstance(betas, tuple) or len(betas) != 2:
        bad("betas", repr(betas))
    elif isinstance(betas[0], torch.Tensor) != isinstance(betas[1], torch.Tensor):
        bad("betas", "one tensor, one float")
    elif not all(0 <= float(b) < 1 for b in betas):
        bad("betas", repr(betas))
    eps = kw.get("eps")
    if not _is_real(eps) or not 0 < eps < math.inf:
        bad("eps", repr(eps))
    wd = kw.get("weight_decay")
    if not _is_real(wd) or not 0 <= wd < math.inf:
        bad("weight_decay", repr(wd))
    for key in ("amsgrad", "maximize", "capturable"):
        if not isinstance(kw.get(key), bool):
            unsure.append(f"{key}={kw.get(key)!r}")  # torch takes any truthy value
            names.append(key)
    if kw.get("foreach") not in (None, True, False):
        bad("foreach", repr(kw["foreach"]))
    if kw.get("fused") not in (None, True):
        bad("fused", repr(kw["fused"]))
    if kw.get("fused") and kw.get("foreach"):
        bad("fused", "with foreach=True")
        names.append("foreach")
    if kw.get("differentiable", False) is not False:
        bad("differentiable", repr(kw["differentiable"]))
    if kw.get("master_weights") not in ("auto", True, False) or isinstance(kw.get("master_weights"), int) and \
            not isinstance(kw.get("master_weights"), bool):
        bad("master_weights", repr(kw["master_weights"]))
    mgn = kw.get("max_grad_norm")
    if mgn is not None and (not _is_real(mgn) or not mgn > 0):
        bad("max_grad_norm", repr(mgn))
    sr = kw.get("stochastic_rounding", False)
    if sr not in (True, False):
        unsure.append(f"stochastic_rounding={sr!r}")
        names.append("stochastic_rounding")
    seed = kw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        bad("seed", repr(seed))
    if kw.get("backend") not in ("auto", "cpu", "reference", "triton", "cuda"):
        bad("backend", repr(kw["backend"]))
    if not isinstance(kw.get("unscale_grads"), bool):
        bad("unscale_grads", repr(kw["unscale_grads"]))
    for i, (pc, p) in enumerate(zip(case["params"], params)):
        if pc["dtype"] not in FLOATS:
            bad("params", f"param {i} is {pc['dtype']}")
            names.append("param_groups")
        if effective_layout({**pc, "values": "normal", "flag": None}) == "expanded":
            bad("params", f"param {i} is expanded")
            names.append("param_groups")
        if sr is True and pc["dtype"] == "float16":
            bad("stochastic_rounding", f"param {i} is float16")
            names.append("param_groups")
        if pc["grad"] == "sparse" and p.dim() > 0:
            names += ["param_groups", "params", "grad"]
            invalid.append(f"param {i} has a sparse grad")
    if case["duplicate"]:
        names += ["param_groups", "params"]
        invalid.append(f"a param listed twice ({case['duplicate']})")
    return invalid, unsure, names


def build_fused_adamw(case) -> Call:
    kw = _opt_kwargs(case)
    params = [_make_param(pc) for pc in case["params"]]
    invalid, unsure, names = _opt_problems(case, kw, params)
    cls = getattr(mixprec.optim, case["cls"])
    groups = [[p for p, pc in zip(params, case["params"]) if pc["group"] % case["groups"] == g]
              for g in range(case["groups"])]
    groups = [g for g in groups if g] or [params]
    if case["duplicate"] == "within":
        groups[0] = groups[0] + groups[0][:1]
    elif case["duplicate"] == "across":
        groups = groups + [[groups[0][0]]]
    between = case["between"]
    if between == "resize":
        names += ["param_groups", "parameter", "params"]
    if invalid:
        unsure = []
    opt_box = {}
    steps_log = []
    mgn = kw.get("max_grad_norm")
    decoupled = case["cls"] == "FusedAdamW"

    def construct():
        param_groups = [{"params": g} for g in groups] if len(groups) > 1 else groups[0]
        if len(groups) > 1:
            param_groups[1]["lr"] = 0.05  # a group option of its own
        opt_box["opt"] = cls(param_groups, **kw)

    def set_grads(k):
        for pc, p in zip(case["params"], params):
            _set_grad(p, pc["grad"], pc["seed"] + 1000 * (k + 1))

    def one_step(k):
        opt = opt_box["opt"]
        before = _opt_lists(opt, clone=True)
        opt.step()
        steps_log.append(before)

    def between_steps():
        with torch.no_grad():
            for p in params:
                if between == "channels_last" and p.dim() == 4:
                    p.data = p.data.contiguous(memory_format=torch.channels_last)
                elif between == "permute" and p.dim() >= 2:
                    p.data = p.data.transpose(-1, -2).contiguous().transpose(-1, -2)
                elif between == "resize" and p.numel() > 1:
                    p.data = torch.randn(p.numel() + 1, dtype=p.dtype)
                elif between == "del_state":
                    opt_box["opt"].state.pop(p, None)
                elif between == "zero_grad":
                    opt_box["opt"].zero_grad()

    def watch_all():
        opt = opt_box.get("opt")
        if opt is None:
            return [(f"param {i}", p) for i, p in enumerate(params)]
        return [*_step_watch(opt, params), ("param_groups", lambda: [{k: v for k, v in g.items() if k != "params"}
                                                                     for g in opt.param_groups])]

    def run():
        seq = [("constructor", construct, lambda: [(f"param {i}", p) for i, p in enumerate(params)])]
        for k in range(case["steps"]):
            if k == 1 and between != "nothing":
                seq.append(("between steps", between_steps, lambda: []))
            seq.append((f"grads {k + 1}", lambda k=k: set_grads(k), lambda: []))
            seq.append((f"step {k + 1}", lambda k=k: one_step(k), watch_all))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _guarded(seq)

    def check(_):
        # each step against torch, from the state it started from
        opt = opt_box["opt"]
        for k, before in enumerate(steps_log):
            if k < len(steps_log) - 1:
                continue  # only the last step's "after" is at hand; earlier steps are covered by other examples
            problem = _step_problem(opt, before, mgn, decoupled)
            if problem:
                return f"step {k + 1}: {problem}"
        return None

    resized = between == "resize" and case["steps"] > 1 and any(p.numel() > 1 for p in params)
    if resized and not invalid:
        invalid.append("a param resized after its state was made")
    if kw.get("lr") is not None and isinstance(kw.get("lr"), float) and not math.isfinite(kw["lr"]):
        check = None
    return Call(run, sorted(set(names)), invalid, unsure, [], None if invalid or unsure else check)


# how a state dict is mangled before it is loaded (what each must give is judged from the result: _saved_problems)
LOAD_MANGLES = ("old_torch", "step_int", "exp_avg_f16", "exp_avg_f64", "exp_avg_nan", "extra_key", "param_ids",
                "truncate_state", "param_names", "drop_state_key", "drop_groups_key", "wrong_shape", "step_shape",
                "exp_avg_list", "groups_count", "group_len", "group_not_dict", "state_not_dict",
                "state_entry_not_dict", "not_a_dict", "missing_exp_avg", "step_negative", "step_nan", "lr_str",
                "lr_neg", "betas_bad", "wd_none", "meta_tensor", "str_keys")


def fused_adamw_load_cases(backends=FAST_BACKENDS):
    return st.fixed_dictionaries({
        "backend": st.sampled_from(backends),
        "source": st.sampled_from(["mixprec", "mixprec", "torch", "fresh"]),
        "params": st.lists(st.fixed_dictionaries({
            "shape": st.sampled_from([(3, 4), (7,), (2, 3, 2, 2), (1,), ()]),
            "dtype": st.sampled_from(["float32", "float32", "float32", "float16"]),
            "seed": st.integers(0, 2**16)}), min_size=1, max_size=3),
        "amsgrad": st.sampled_from([(False, False), (False, False), (True, True), (True, False), (False, True)]),
        "mangles": st.lists(st.fixed_dictionaries({"op": st.sampled_from(LOAD_MANGLES),
                                                   "i": st.integers(0, 2)}), max_size=3),
    })


def _mangle(sd, m, params):
    op = m["op"]
    state, groups = sd.get("state"), sd.get("param_groups")
    pids = [pid for g in groups if isinstance(g, dict) for pid in g.get("params", ())] \
        if isinstance(groups, list) else []
    pid = pids[m["i"] % len(pids)] if pids else 0
    entry = state.get(pid) if isinstance(state, dict) else None
    p = params[m["i"] % len(params)]
    if op == "old_torch" and isinstance(groups, list):
        for g in groups:
            if isinstance(g, dict):
                for key in ("maximize", "foreach", "capturable", "differentiable", "fused", "amsgrad",
                            "decoupled_weight_decay")[: 3 + m["i"] * 2]:
                    g.pop(key, None)
    elif op == "drop_state_key":
        sd.pop("state", None)
    elif op == "drop_groups_key":
        sd.pop("param_groups", None)
    elif op == "not_a_dict":
        return [sd]
    elif op == "groups_count" and isinstance(groups, list):
        groups.append(copy.deepcopy(groups[0]) if groups else {"params": []})
    elif op == "group_len" and isinstance(groups, list) and groups and isinstance(groups[0], dict):
        groups[0]["params"] = groups[0]["params"][:-1]
    elif op == "group_not_dict" and isinstance(groups, list) and groups:
        groups[0] = list(groups[0].items()) if isinstance(groups[0], dict) else groups[0]
    elif op == "state_not_dict" and isinstance(state, dict):
        sd["state"] = list(state.values())
    elif op == "param_ids" and isinstance(state, dict) and isinstance(groups, list):
        remap = {pid_: pid_ + 100 for pid_ in pids}
        sd["state"] = {remap.get(k, k): v for k, v in state.items()}
        for g in groups:
            if isinstance(g, dict):
                g["params"] = [remap.get(x, x) for x in g["params"]]
    elif op == "truncate_state" and isinstance(state, dict):
        state.pop(pid, None)
    elif op == "param_names" and isinstance(groups, list):
        for g in groups:
            if isinstance(g, dict):
                g["param_names"] = [f"w{x}" for x in g["params"]]
    elif op == "str_keys" and isinstance(state, dict):
        sd["state"] = {str(k): v for k, v in state.items()}
    elif op in ("lr_str", "lr_neg", "betas_bad", "wd_none") and isinstance(groups, list) and groups and \
            isinstance(groups[0], dict):
        key, value = {"lr_str": ("lr", "0.1"), "lr_neg": ("lr", -1.0), "betas_bad": ("betas", (1.0, 0.999)),
                      "wd_none": ("weight_decay", None)}[op]
        groups[0][key] = value
    elif isinstance(entry, dict):
        if op == "wrong_shape" and isinstance(entry.get("exp_avg"), torch.Tensor):
            t = entry["exp_avg"]
            entry["exp_avg"] = torch.randn(t.shape[-1:] if t.dim() > 1 else (t.numel() + 1,))
        elif op == "missing_exp_avg":
            entry.pop("exp_avg", None)
        elif op == "step_int" and "step" in entry and (not isinstance(entry["step"], torch.Tensor)
                                                       or entry["step"].numel() == 1):
            entry["step"] = int(float(entry["step"]))
        elif op == "step_shape":
            entry["step"] = torch.tensor([1.0, 2.0])
        elif op == "step_negative":
            entry["step"] = torch.tensor(-3.0)
        elif op == "step_nan":
            entry["step"] = torch.tensor(math.nan)
        elif op in ("exp_avg_f16", "exp_avg_f64", "exp_avg_nan", "exp_avg_list", "meta_tensor") and \
                isinstance(entry.get("exp_avg"), torch.Tensor):
            t = entry["exp_avg"]
            entry["exp_avg"] = {"exp_avg_f16": lambda: t.half(), "exp_avg_f64": lambda: t.double(),
                                "exp_avg_nan": lambda: torch.full_like(t, math.nan), "exp_avg_list": t.tolist,
                                "meta_tensor": lambda: t.to("meta")}[op]()
        elif op == "extra_key":
            entry["mystery"] = 1
        elif op == "state_entry_not_dict":
            state[pid] = 5
    del p
    return sd


def _saved_problems(sd, params) -> tuple[list, list]:
    """(invalid, unsure) of a state dict to load into a FusedAdamW over `params` (one group), restated from
    mixprec.optim's docstring and torch's load_state_dict: the layout torch's loader needs; each state tensor of a
    param of its shape (ValueError naming the parameter); a state dict from an older torch (group keys missing, a
    numeric step) loads. Group hyper-parameter values and odd steps torch's loader takes unchecked: either."""
    if not isinstance(sd, dict):
        return ["the state dict is not a dict"], []
    groups, state = sd.get("param_groups"), sd.get("state")
    if groups is None or state is None:
        return ["'state' or 'param_groups' missing"], []
    if not isinstance(groups, list) or not all(isinstance(g, dict) and "params" in g for g in groups):
        return ["param_groups is not a list of dicts with params"], []
    if len(groups) != 1 or len(groups[0]["params"]) != len(params):
        return ["param_groups do not match the optimizer's"], []
    if not isinstance(state, dict):
        return ["'state' is not a dict"], []
    invalid, unsure = [], []
    g = groups[0]
    lr, betas, wd = g.get("lr", 1e-3), g.get("betas", (0.9, 0.999)), g.get("weight_decay", 0.01)
    if not (_is_real(lr) and 0 <= lr < math.inf) or not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(
            _is_real(b) and 0 <= b < 1 for b in betas)) or not (_is_real(wd) and 0 <= wd < math.inf):
        unsure.append("a group hyper-parameter torch's loader takes unchecked")
    for pid, p in zip(g["params"], params):
        entry = state.get(pid)
        if entry is None:
            continue
        if not isinstance(entry, dict):
            invalid.append(f"state[{pid}] is not a dict")
            continue
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param"):
            t = entry.get(key)
            if t is None:
                if key in ("exp_avg", "exp_avg_sq") and "step" in entry:
                    unsure.append(f"state[{pid}] lacks '{key}'")
                continue
            if not isinstance(t, torch.Tensor):
                invalid.append(f"state[{pid}]['{key}'] is a {type(t).__name__}")
            elif t.shape != p.shape:
                invalid.append(f"state[{pid}]['{key}'] has shape {tuple(t.shape)} for {tuple(p.shape)}")
            elif t.device.type == "meta":
                unsure.append(f"state[{pid}]['{key}'] is on the meta device")
        step = entry.get("step")
        if isinstance(step, torch.Tensor) and step.numel() != 1:
            invalid.append(f"state[{pid}]['step'] has {step.numel()} elements")
        elif step is not None and not (0 <= float(step) < math.inf):
            unsure.append(f"state[{pid}]['step'] = {float(step)}")
    return invalid, ([] if invalid else unsure)


def build_fused_adamw_load(case) -> Call:
    params = [torch.nn.Parameter(make_tensor({"shape": tuple(pc["shape"]), "dtype": pc["dtype"],
                                              "layout": "contiguous", "values": "normal", "seed": pc["seed"],
                                              "flag": None})) for pc in case["params"]]
    src_ams, dst_ams = case["amsgrad"]
    backend = case["backend"]
    source = case["source"]
    gen_seed = case["params"][0]["seed"]
    # the saved state dict: one step of a FusedAdamW or torch.optim.AdamW on copies of the params
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    if source == "torch":
        src = torch.optim.AdamW(copies, lr=1e-2, amsgrad=src_ams)
    else:
        src = mixprec.optim.FusedAdamW(copies, lr=1e-2, amsgrad=src_ams, backend=backend)
    if source != "fresh":
        for k, p in enumerate(copies):
            _set_grad(p, "same", gen_seed + k)
        src.step()
    sd = src.state_dict()
    if source == "torch" and any(p.dtype == torch.float16 for p in params):
        pass  # torch's own state of fp16 params: fp16 moments (its loader casts them)
    names = ["state_dict", "state", "param_groups", "parameter", "params"]
    for m in case["mangles"]:
        if isinstance(sd, dict):
            sd = _mangle(sd, m, params)
    invalid, unsure = _saved_problems(sd, params)
    for m in case["mangles"]:
        names += {"wrong_shape": ["exp_avg"], "missing_exp_avg": ["exp_avg"], "step_shape": ["step"],
                  "step_negative": ["step", "steps"], "step_nan": ["step", "steps"], "exp_avg_list": ["exp_avg"],
                  "lr_str": ["lr"], "lr_neg": ["lr"], "betas_bad": ["betas", "beta1"], "wd_none": ["weight_decay"],
                  "meta_tensor": ["exp_avg"], "groups_count": ["param_groups"]}.get(m["op"], [])
    if invalid:
        unsure = []
    opt = mixprec.optim.FusedAdamW(params, lr=1e-3, amsgrad=dst_ams, backend=backend)
    for k, p in enumerate(params):  # a live state, so that a refused load has something to lose
        _set_grad(p, "same", gen_seed + 50 + k)
    opt.step()
    saved = copy.deepcopy(sd)
    box = {}

    def watch():
        return [("optimizer state", lambda: [(id(p), dict(s)) for p, s in opt.state.items()]),
                ("param_groups", lambda: [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]),
                *[(f"param {i}", p) for i, p in enumerate(params)]]

    def watch_step():
        return _step_watch(opt, params, masters=False)

    def load():
        opt.load_state_dict(sd)
        for k, p in enumerate(params):  # the step's grads (a load leaves grads alone)
            _set_grad(p, "same", gen_seed + 90 + k)

    def step():
        box["loaded"] = _loaded_content_problem(opt, saved, params)
        box["before"] = _opt_lists(opt, clone=True, after_load=True)
        opt.step()

    def run():
        _guarded([("load_state_dict", load, watch), ("step after the load", step, watch_step)])

    def check(_):
        return box["loaded"] or _step_problem(opt, box["before"], None, True)

    return Call(run, sorted(set(names)), invalid, unsure, [], None if invalid or unsure else check)


def _step_watch(opt, params, *, masters: bool = True) -> list:
    """What a refused step must leave as it was: params, grads, and the state tensors that exist (state a step
    makes for a param that has none, and the masters a first step after a load reconciles with their params, are
    the step's preparation, not data: the next step makes them alike)."""
    keys = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq") + (("master_param",) if masters else ())
    existing = {id(p): [k for k in keys if k in opt.state.get(p, {})] for p in params}
    return [*[(f"param {i}", p) for i, p in enumerate(params)],
            *[(f"grad {i}", lambda p=p: p.grad) for i, p in enumerate(params)],
            *[(f"state[param {i}]['{k}']", lambda p=p, k=k: opt.state.get(p, {}).get(k))
              for i, p in enumerate(params) for k in existing[id(p)]]]


def _loaded_content_problem(opt, saved, params) -> str | None:
    """What load_state_dict must have kept: each saved tensor's values (as fp32; a lower-precision saved tensor may
    come back as live fp32 values that round to it, the documented lossless way back), the step count, and the
    saved hyper-parameters (those torch's loader takes from the state dict)."""
    ids = [pid for g in saved["param_groups"] for pid in g["params"]]
    for gi, (g, sg) in enumerate(zip(opt.param_groups, saved["param_groups"])):
        for key in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"):
            if key in sg and not _same(("value", _plain(g[key])), ("value", _plain(sg[key]))):
                return f"param_groups[{gi}]['{key}'] is {g[key]!r} after loading {sg[key]!r}"
    for p, pid in zip(params, ids):
        s = saved["state"].get(pid)
        if not isinstance(s, dict):
            continue
        live = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            t = s.get(key)
            if not isinstance(t, torch.Tensor) or key not in live:
                continue
            got = live[key]
            if got.dtype != torch.float32:
                return f"state '{key}' of {_label(opt, p)} is {got.dtype} after the load"
            ok = bits_equal(got, t.float()) if t.dtype in (torch.float32, torch.float64) else \
                bits_equal(got.to(t.dtype), t)
            if not ok:
                return f"state '{key}' of {_label(opt, p)} differs from the loaded one: " \
                       f"{first_difference(got, t.float())}"
        if "step" in s and "step" in live and float(live["step"]) != float(s["step"]):
            return f"state 'step' of {_label(opt, p)} is {float(live['step'])}, loaded {float(s['step'])}"
    return None


def _plain(x):
    if isinstance(x, torch.Tensor):
        return float(x)
    if isinstance(x, (tuple, list)):
        return tuple(_plain(v) for v in x)
    return x


# ---------------------------------------------------------------- target: mixprec.amp.GradScaler

SCALE_FLOOR = torch.finfo(torch.float32).tiny
SCALER_COMMON = {
    "init_scale": st.sampled_from([2.0**16, 2.0**16, 1.0, 2.0**-10, 2.0**-124, 3.0e38]),
    "growth_factor": st.sampled_from([2.0, 2.0, 1.5]),
    "backoff_factor": st.sampled_from([0.5, 0.5, 0.25]),
    "growth_interval": st.sampled_from([2000, 1, 2, 3]),
    "enabled": st.sampled_from([True, True, True, False]),
    "hysteresis": st.sampled_from([1, 1, 1, 2]),
    "min_scale": st.sampled_from([None, None, None, 1.0]),
    "max_scale": st.sampled_from([None, None, None, 2.0**20]),
}
SCALER_HOSTILE = {
    "init_scale": st.sampled_from([0.0, -1.0, math.inf, math.nan, 1e-45, "1", None, True]),
    "growth_factor": st.sampled_from([1.0, 0.5, math.inf, math.nan, "2"]),
    "backoff_factor": st.sampled_from([1.0, 2.0, 0.0, -0.5, math.nan]),
    "growth_interval": st.sampled_from([0, -1, 1.5, "10", True]),
    "hysteresis": st.sampled_from([0, 1.5]),
    "min_scale": st.sampled_from([0.0, -1.0, math.inf, 2.0**30]),
    "max_scale": st.sampled_from([0.0, math.nan, 0.5]),
    "history": st.sampled_from([0, -1]),
    "min_scale_patience": st.sampled_from([0]),
    "enabled": st.sampled_from(["yes", 0]),
}
LOAD_STATES = ["none"] * 6 + ["own", "torch"]
LOAD_HOSTILE = ["scale=0", "scale=inf", "scale=nan", "scale=-1", "scale=1e-45", "scale=str", "backoff=2",
                "interval=0", "tracker=-1", "missing", "extra", "empty", "hysteresis_left=9", "consecutive=str"]
NEW_SCALES = [None] * 8 + [1024.0, "tensor"]
NEW_SCALES_HOSTILE = [0.0, math.inf, math.nan, -1.0, "x", 1e-45, "tensor-2", "tensor-grad", 2.0**60]
GRAD_KINDS = ["normal"] * 6 + ["inf", "nan", "huge", "subnormal"]


def _iteration(new_scales):
    return st.fixed_dictionaries({"grads": st.lists(st.sampled_from(GRAD_KINDS), min_size=1, max_size=3),
                                  "unscale": st.booleans(), "clip": st.sampled_from([None, None, 1.0, 1e-3]),
                                  "new_scale": st.sampled_from(new_scales)})


def grad_scaler_cases(backends=FAST_BACKENDS):
    params = st.lists(st.fixed_dictionaries({"shape": st.sampled_from([(3, 4), (7,), (2, 3, 2), ()]),
                                             "dtype": st.sampled_from(["float32", "float32", "bfloat16", "float16"]),
                                             "layout": st.sampled_from(["contiguous"] * 3 + ["gappy", "transposed"]),
                                             "seed": st.integers(0, 2**16)}), min_size=1, max_size=3)
    common = {"backend": st.sampled_from(backends), "params": params,
              "optimizer": st.sampled_from(["record", "record", "fused"]),
              **{f"kw_{k}": v for k, v in SCALER_COMMON.items()},
              "load": st.sampled_from(LOAD_STATES),
              "iterations": st.lists(_iteration(NEW_SCALES), min_size=1, max_size=6)}
    hostile = {**{f"kw_{k}": v for k, v in SCALER_HOSTILE.items()},
               "load": st.sampled_from(LOAD_HOSTILE),
               "iterations": st.lists(_iteration(NEW_SCALES + NEW_SCALES_HOSTILE), min_size=1, max_size=6)}
    return mixed(common, hostile)


class _Recorder(torch.optim.Optimizer):
    """An optimizer whose step records the grads it sees (and changes nothing)."""

    def __init__(self, params):
        super().__init__(params, {})
        self.seen = []

    def step(self, closure=None):
        self.seen.append([None if p.grad is None else p.grad.detach().clone() for g in self.param_groups
                          for p in g["params"]])


def _scaler_grads(params, pcs, kinds, it_seed):
    """Sets each param's grad: values of the iteration's kind (a huge one overflows when scaled: these are the
    scaled grads backward would give), in the param's layout (gappy: a view with gaps, which is not dense)."""
    for k, (p, pc) in enumerate(zip(params, pcs)):
        kind = kinds[k % len(kinds)]
        gen = torch.Generator().manual_seed(pc["seed"] + 7919 * it_seed)
        vals = fill_values(p.numel(), p.dtype, {"normal": "normal", "inf": "inf", "nan": "nan", "huge": "large",
                                                "subnormal": "subnormal"}[kind], gen)
        if kind == "inf" and p.numel():
            vals[0] = math.inf
        layout = pc["layout"]
        if layout == "gappy" and p.dim() >= 1:
            g = torch.zeros(*p.shape[:-1], 2 * p.shape[-1], dtype=p.dtype)[..., ::2]
        elif layout == "transposed" and p.dim() == 2:
            g = torch.zeros(p.shape[1], p.shape[0], dtype=p.dtype).t()
        else:
            g = torch.zeros(p.shape, dtype=p.dtype)
        p.grad = g.copy_(vals.view(p.shape) if p.numel() else g)


def _scaler_kwargs(case) -> dict:
    return {k: case[f"kw_{k}"] for k in set(SCALER_COMMON) | set(SCALER_HOSTILE) if f"kw_{k}" in case}


def _scaler_problems(kw) -> tuple[list, list, list]:
    """(invalid, unsure, names) of the constructor's arguments, restated from GradScaler's docstring: factors and
    intervals in range, scales (init, bounds) in [2**-126, float32's largest] and init within the bounds."""
    invalid, unsure, names = [], [], []

    def bad(key, why=None):
        names.append(key)
        invalid.append(f"{key}={kw[key]!r}" + (f" ({why})" if why else ""))

    def real(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    for key, value in kw.items():
        default = {"init_scale": 2.0**16, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                   "enabled": True, "hysteresis": 1, "min_scale": None, "max_scale": None}.get(key)
        if not _same(("value", value), ("value", default)):
            names.append(key)
    if "enabled" in kw and not isinstance(kw["enabled"], bool):
        unsure.append("enabled is not a bool")
    gf = kw.get("growth_factor", 2.0)
    if not (real(gf) and math.isfinite(gf) and gf > 1):
        bad("growth_factor")
    bf = kw.get("backoff_factor", 0.5)
    if not (real(bf) and 0 < bf < 1):
        bad("backoff_factor")
    for key, low in (("growth_interval", 1), ("hysteresis", 1), ("history", 1), ("min_scale_patience", 1)):
        v = kw.get(key, low)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            bad(key)

    def in_range(x):
        return real(x) and math.isfinite(x) and SCALE_FLOOR <= x <= torch.finfo(torch.float32).max

    lo, hi = kw.get("min_scale"), kw.get("max_scale")
    for key in ("min_scale", "max_scale"):
        if kw.get(key) is not None and not in_range(kw[key]):
            bad(key)
    init = kw.get("init_scale", 2.0**16)
    if not in_range(init):
        bad("init_scale")
    elif (lo is not None and in_range(lo) and init < lo) or (hi is not None and in_range(hi) and init > hi):
        bad("init_scale", "outside [min_scale, max_scale]")
        names += ["min_scale", "max_scale"]
    return invalid, unsure, names


def _bounds(kw, sd) -> tuple:
    """(min_scale, max_scale) after the load: a mixprec state dict brings its own (documented), torch's none."""
    lo, hi = kw.get("min_scale"), kw.get("max_scale")
    if isinstance(sd, dict) and "min_scale" in sd:
        lo, hi = sd.get("min_scale"), sd.get("max_scale")
    return lo, hi


def _load_state(case, kw, scaler_cls) -> tuple[dict | None, list, list]:
    """The state dict to load (None: no load), why it must be refused, and the names its refusal may give."""
    load = case["load"]
    if load == "none":
        return None, [], []
    source = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3) if load == "torch" else \
        scaler_cls("cpu", init_scale=1024.0, growth_interval=3)
    sd = source.state_dict()
    sd["scale"] = 1024.0
    if load in ("own", "torch"):
        return sd, [], ["state_dict"]
    key, _, value = load.partition("=")
    field = {"scale": "scale", "backoff": "backoff_factor", "interval": "growth_interval",
             "tracker": "_growth_tracker", "hysteresis_left": "_hysteresis_left",
             "consecutive": "consecutive_hysteresis"}.get(key, key)
    names = ["state_dict", field, f"state_dict['{field}']", "scale"]
    if load == "missing":
        del sd["backoff_factor"]
        return sd, ["a torch key is missing"], names + ["backoff_factor"]
    if load == "extra":
        sd["unknown"] = 1
        return sd, [], names
    if load == "empty":
        return {}, ["an empty state dict"], names
    parsed = {"0": 0.0, "inf": math.inf, "nan": math.nan, "-1": -1, "1e-45": 1e-45, "str": "x", "2": 2.0,
              "9": 9}[value]
    sd[field] = parsed
    if load == "scale=1e-45" and "min_scale" not in sd:
        return sd, [], names  # a torch-style dict outside this scaler's range: clamped, with a warning (documented)
    return sd, [f"state_dict[{field!r}] = {parsed!r}"], names


def build_grad_scaler(case) -> Call:
    call = _build_grad_scaler(case)
    run = call.run

    def with_backend():  # the scaler's unscale pass runs on the case's backend (its ops take backend="auto")
        old = os.environ.get("MIXPREC_BACKEND")
        os.environ["MIXPREC_BACKEND"] = case["backend"]
        try:
            return run()
        finally:
            if old is None:
                os.environ.pop("MIXPREC_BACKEND", None)
            else:
                os.environ["MIXPREC_BACKEND"] = old

    call.run = with_backend
    return call


def _build_grad_scaler(case) -> Call:
    from mixprec.amp import GradScaler

    kw = _scaler_kwargs(case)
    invalid, unsure, names = _scaler_problems(kw)
    pcs = case["params"]
    params = [torch.nn.Parameter(make_tensor({"shape": tuple(pc["shape"]), "dtype": pc["dtype"],
                                              "layout": "contiguous", "values": "normal", "seed": pc["seed"],
                                              "flag": None})) for pc in pcs]
    sd, load_invalid, load_names = _load_state(case, kw, GradScaler)
    enabled = bool(kw.get("enabled", True))  # the scaler's own rule: any truthy value enables it
    if enabled:
        names += load_names
    if load_invalid and enabled:
        invalid += load_invalid
    iterations = case["iterations"]
    lo, hi = _bounds(kw, sd)
    for it in iterations:
        ns = it["new_scale"]
        if ns is not None:
            names.append("new_scale")
        if ns in NEW_SCALES_HOSTILE and enabled and not (ns == 2.0**60 and hi is None):
            invalid.append(f"update(new_scale={ns!r})")
        if ns == 1024.0 and enabled and ((hi is not None and 1024.0 > hi) or (lo is not None and 1024.0 < lo)):
            invalid.append("update(new_scale=1024) outside the bounds")
    if invalid:
        unsure = []
    box = {}
    fused = case.get("optimizer") == "fused"
    opt = mixprec.optim.FusedAdamW(params, lr=1e-3, backend=case["backend"]) if fused else _Recorder(params)

    def step(k):
        before = [p.detach().clone() for p in params]
        grads = [p.grad.detach().clone() for p in params]
        unscaled = iterations[k]["unscale"]
        scale = box["scaler"]._scale
        factor = torch.ones(()) if unscaled or scale is None or not box["scaler"].is_enabled() else \
            scale.double().reciprocal().float()
        box["scaler"].step(opt)
        if fused:
            true_grads = [g.float() * factor for g in grads]  # what the kernel's update reads
            box.setdefault("fused", []).append((before, [p.detach().clone() for p in params], box["scaled"],
                                                true_grads, grads, [p.grad.detach().clone() for p in params],
                                                unscaled))

    def construct():
        box["scaler"] = GradScaler("cpu", **kw)

    def load():
        box["scaler"].load_state_dict(sd)

    def prepare(k):
        box["scaler"].scale(torch.ones(()))
        _scaler_grads(params, pcs, iterations[k]["grads"], k)
        box["scaled"] = [p.grad.detach().clone() for p in params]  # what the scaler's overflow check sees

    def unscale(k):
        if iterations[k]["unscale"]:
            box["scaler"].unscale_(opt)
            if iterations[k]["clip"] is not None:
                box["scaler"].clip_grad_norm_(opt, iterations[k]["clip"])

    def update(k):
        ns = iterations[k]["new_scale"]
        if isinstance(ns, str):
            ns = {"tensor": torch.tensor(1024.0), "tensor-2": torch.tensor([1.0, 2.0]), "x": "x",
                  "tensor-grad": torch.tensor(1024.0, requires_grad=True)}[ns]
        box["scaler"].update(ns)
        box.setdefault("scales", []).append(box["scaler"].get_scale())

    def watch_scaler():
        s = box.get("scaler")
        if s is None:
            return []
        return [("scaler state", lambda: {k: v for k, v in s.state_dict().items()}),
                *[(f"grad {i}", lambda p=p: p.grad) for i, p in enumerate(params)],
                ("optimizer", (lambda: [(id(p), dict(st_)) for p, st_ in opt.state.items()]) if fused else
                 (lambda: len(opt.seen))), *[(f"param {i}", p) for i, p in enumerate(params)]]

    def run():
        seq = [("constructor", construct, lambda: [])]
        if sd is not None:
            seq.append(("load_state_dict", load, watch_scaler))
        for k in range(len(iterations)):
            seq += [(f"iteration {k + 1}: scale, grads", lambda k=k: prepare(k), lambda: []),
                    (f"iteration {k + 1}: unscale_", lambda k=k: unscale(k), watch_scaler),
                    (f"iteration {k + 1}: step", lambda k=k: step(k), watch_scaler),
                    (f"iteration {k + 1}: update", lambda k=k: update(k), watch_scaler)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _guarded(seq)

    check = None if invalid or unsure else _scaler_oracle(case, kw, sd, pcs, opt, box)
    return Call(run, sorted(set(names)), invalid, unsure, [], check)


def _scaler_oracle(case, kw, sd, pcs, opt, box):
    """torch.amp.GradScaler("cpu") with the same arguments, state dict and grads, where its behaviour is defined:
    no hysteresis or bounds (mixprec's own options), while torch's scale stays >= 2**-126 (below it torch's
    reciprocal overflows: mixprec's documented floor differs), and no update(new_scale) (torch takes it
    unchecked). Each iteration: the same decision to step and the same grads at the step, bit for bit (torch
    refuses fp16 grads: there its unscale kernel is called directly), the same scale after update(). Clipping:
    torch.nn.utils.clip_grad_norm_ on torch's side; both clip with a coefficient computed in fp32 from an fp32
    norm (n terms: within (n + 8) u of each other, relatively; torch computes the coefficient of half grads in
    their dtype, four roundings of 2^-8 (bf16) or 2^-11 (fp16)), and round the clipped grads to their dtype (an
    ulp more). Always: the scale finite, >= 2**-126, within
    [min_scale, max_scale], and an enabled scaler never lets the optimizer step on non-finite grads (found_inf
    must catch grads that overflow when unscaled, as at the 2**-126 floor any |grad| > 4 does). There mixprec's
    decision deliberately differs from torch's: torch's side counts a step as overflowing when torch's unscaled
    grads hold inf/NaN, not only when its found_inf says so (it checks the scaled values)."""
    enabled = bool(kw.get("enabled", True))
    comparable_enabled = isinstance(kw.get("enabled", True), bool)

    def check(_):
        scales = box.get("scales", [])
        lo, hi = _bounds(kw, sd)
        lo, hi = lo or SCALE_FLOOR, hi or torch.finfo(torch.float32).max
        for k, s in enumerate(scales):
            if enabled and not (math.isfinite(s) and lo <= s <= hi):
                return f"iteration {k + 1}: scale {s!r} outside [{lo}, {hi}]"
        if case.get("optimizer") == "fused":
            return _fused_under_scaler_problem(box.get("fused", []), enabled)
        for k, grads in enumerate(opt.seen):
            if enabled and any(g is not None and not bool(torch.isfinite(g).all()) for g in grads):
                return f"step {k + 1}: the optimizer stepped on non-finite (unscaled) grads: found_inf was 0"
        comparable = (kw.get("hysteresis", 1) == 1 and _bounds(kw, sd) == (None, None)
                      and all(it["new_scale"] is None for it in case["iterations"]) and comparable_enabled)
        if not comparable:
            return None
        return _torch_scaler_problem(case, kw, sd, pcs, opt, scales)

    return check


def _fused_under_scaler_problem(log, enabled: bool) -> str | None:
    """FusedAdamW stepped by the scaler (the in-kernel unscale and skip, `_step_supports_amp_scaling`): a step
    whose scaled grads hold inf/NaN changes no param (found_inf skips it in the kernel); a step of finite grads leaves
    finite params finite; p.grad is left as the scaler left it (documented: still scaled unless unscale_ ran, since
    unscale_grads=False)."""
    for k, (before, after, scaled, true_grads, grads, grads_after, unscaled) in enumerate(log):
        bad = any(not bool(torch.isfinite(g).all()) for g in scaled)
        overflow = any(not bool(torch.isfinite(g).all()) for g in true_grads)
        for i, (b, a) in enumerate(zip(before, after)):
            if enabled and bad and not bits_equal(a, b):
                return f"step {k + 1}: the grads held inf/NaN, yet param {i} changed: {first_difference(a, b)}"
            if enabled and not bad and overflow and not bits_equal(a, b):
                return (f"step {k + 1}: the grads overflow fp32 when unscaled, yet the step ran (found_inf looks at "
                        f"the scaled values): param {i} {first_difference(a, b)}")
            if not bad and not overflow and bool(torch.isfinite(b).all()) and not bool(torch.isfinite(a).all()):
                return f"step {k + 1}: finite grads and params gave a non-finite param {i}"
        for i, (g, ga) in enumerate(zip(grads, grads_after)):
            if not bits_equal(g, ga):
                return f"step {k + 1}: step() changed grad {i} ({'unscaled' if unscaled else 'scaled'}), " \
                       f"documented to stay as the scaler left it: {first_difference(ga, g)}"
    return None


def _torch_scaler_problem(case, kw, sd, pcs, opt, scales) -> str | None:
    torch_kw = {k: v for k, v in kw.items() if k in ("init_scale", "growth_factor", "backoff_factor",
                                                     "growth_interval", "enabled")}
    ts = torch.amp.GradScaler("cpu", **torch_kw)
    if sd is not None:
        ts.load_state_dict({k: sd[k] for k in ("scale", "growth_factor", "backoff_factor", "growth_interval",
                                               "_growth_tracker")})
    params = [torch.nn.Parameter(make_tensor({"shape": tuple(pc["shape"]), "dtype": pc["dtype"],
                                              "layout": "contiguous", "values": "normal", "seed": pc["seed"],
                                              "flag": None})) for pc in pcs]
    seen = []
    ts.scale(torch.ones(()))
    for k, it in enumerate(case["iterations"]):
        scale_before = ts.get_scale() if ts.is_enabled() else 1.0
        if scale_before < SCALE_FLOOR:
            return None  # torch's scale left float32's normal range: mixprec's documented floor applies
        _scaler_grads(params, pcs, it["grads"], k)
        grads = [p.grad for p in params]
        if ts.is_enabled():
            inv = ts._scale.double().reciprocal().float()
            found = torch.zeros(1)
            by_dtype: dict = {}
            for g in grads:
                by_dtype.setdefault(g.dtype, []).append(g)
            for group in by_dtype.values():
                torch._amp_foreach_non_finite_check_and_unscale_(group, found, inv.reshape(1))
            if not all(bool(torch.isfinite(g).all()) for g in grads):  # finite grads that overflowed unscaled
                found.fill_(1.0)
            skipped = bool(found.item())
        else:
            skipped = False
        norm_terms = sum(g.numel() for g in grads)
        clip_rel = 0.0
        if it["unscale"] and it["clip"] is not None:
            # torch computes the coefficient of half grads in their dtype (the per-grad norms, the total norm, the
            # + 1e-6 and the division: four roundings), mixprec in fp32
            half = {torch.float16: 4 * 2.0**-11, torch.bfloat16: 4 * 2.0**-8}
            clip_rel = (norm_terms + 8) * U32 + max([half.get(g.dtype, 0.0) for g in grads])
            if any(float(g.double().norm()) > torch.finfo(g.dtype).max for g in grads if g.numel()) or \
                    sum(float(g.double().square().sum()) for g in grads) >= torch.finfo(torch.float32).max:
                # torch's norm of a half grad overflows its dtype (coefficient 0), or mixprec's fp32 sum of
                # squares overflows (so does torch's for fp32 grads, not for half ones): no common answer
                clip_rel = math.inf
            torch.nn.utils.clip_grad_norm_(params, it["clip"])
        if not skipped:
            seen.append([g.clone() for g in grads])
        else:
            seen.append(None)
        if ts.is_enabled():
            ts._scale, ts._growth_tracker = ts._scale.reshape(()), ts._growth_tracker.reshape(())
            torch._amp_update_scale_(ts._scale, ts._growth_tracker, found.reshape(()), ts._growth_factor,
                                     ts._backoff_factor, ts._growth_interval)
        want_scale = ts.get_scale() if ts.is_enabled() else 1.0
        if want_scale >= SCALE_FLOOR and k < len(scales) and scales[k] != want_scale:
            return f"iteration {k + 1}: scale {scales[k]!r}, torch's {want_scale!r}"
        steps_so_far = [s for s in seen if s is not None]
        if len(opt.seen) < len(steps_so_far):
            return f"iteration {k + 1}: the optimizer did not step (torch's scaler steps: the grads were finite)"
        if not skipped:
            got = opt.seen[len(steps_so_far) - 1]
            for i, (a, b) in enumerate(zip(got, seen[-1])):
                if clip_rel == math.inf:
                    continue
                if clip_rel:  # and an ulp of the grad's dtype: the clipped grads are rounded to it
                    bound = clip_rel * b.double().abs() + _ulp(b.double(), b.dtype)
                    near = ((a.double() - b.double()).abs() <= bound) | (torch.isnan(a) & torch.isnan(b)) | (a == b)
                    if not bool(near.all()):
                        return f"iteration {k + 1}: clipped grad {i} differs from torch's: {first_difference(a, b)}"
                elif not bits_equal(a, b):
                    return f"iteration {k + 1}: grad {i} at the step differs from torch's: {first_difference(a, b)}"
    if len(opt.seen) != len([s for s in seen if s is not None]):
        return f"the optimizer stepped {len(opt.seen)} times, torch's scaler {len([s for s in seen if s])}"
    return None


# ---------------------------------------------------------------- target: `python -m mixprec bench` arguments

CLI_OPTIONS = {
    "output": [None] * 4 + ["dir", "nested", "dot"],
    "timeout": [None] * 4 + ["5", "0.5"],
    "from_json": [None] * 4 + ["valid"],
    "update_md": [None] * 4 + ["flag", "path", "existing"],
    "op": [None] * 3 + ["unscale", "bench_gemm", "unscale,gemm"],
    "device": [None] * 3 + ["cpu", "all"],
    "json": [False, False, True],
    "quick": [False, True],
    "junk": [None],
}
CLI_HOSTILE = {
    "output": ["file", "under_file", "proc", "empty"],
    "timeout": ["-1", "0", "nan", "inf", "abc", "1e400", ""],
    "from_json": ["missing", "dir", "empty", "notjson", "list", "truncated", "rows_not_list", "binary",
                  "rows_bad"],
    "update_md": ["missing_dir", "dir"],
    "op": ["nope", ""],
    "device": ["cuda", "tpu"],
    "junk": ["--bogus", "positional", "--timeout"],
}
CLI_FLAG = {"output": "--output", "timeout": "--timeout", "from_json": "--from-json",
            "update_md": "--update-benchmarks-md", "op": "--op", "device": "--device", "junk": ""}


def bench_cli_cases(backends=FAST_BACKENDS):
    common = {k: st.sampled_from(v) for k, v in CLI_OPTIONS.items()}
    hostile = {k: st.sampled_from(v) for k, v in CLI_HOSTILE.items()}
    return mixed(common, hostile)


def _bench_result(rows=None) -> dict:
    row = {"op": "unscale", "backend": "cpu", "device": "cpu", "shape": "n=1000", "dtype": "float32",
           "median_ms": 1.0, "q25_ms": 0.9, "q75_ms": 1.1, "unit": "GB/s", "value": 10.0, "ceiling": 20.0,
           "peers": {"torch": 2.0}, "notes": ""}
    machine = {"cpu": "fuzz CPU", "cpu_threads": 2, "logical_cpus": 2, "torch": torch.__version__,
               "triton": "-", "mixprec": mixprec.__version__, "cuda_device": None, "python": "3",
               "load_before": 1.0, "load_after": 1.0}
    return {"command": "python -m mixprec bench", "machine": machine, "started": "2026-01-01T00:00:00+00:00",
            "quick": True, "reduced": False, "rows": [row] if rows is None else rows, "failures": [],
            "seconds": {"bench_unscale (cpu)": 1.0}}


def _cli_files(tmp: str, choice: str | None, kind: str) -> str | None:
    """The path a choice of option `kind` names, creating what it needs in tmp."""
    if choice is None or choice in ("flag",):
        return None
    join = os.path.join
    if kind == "output":
        paths = {"dir": join(tmp, "out"), "nested": join(tmp, "a", "b", "c"), "dot": ".", "file": join(tmp, "f.txt"),
                 "under_file": join(tmp, "f.txt", "sub"), "proc": "/proc/mixprec-fuzz-output", "empty": ""}
        if choice in ("file", "under_file"):
            with open(join(tmp, "f.txt"), "w") as f:
                f.write("keep me\n")
        return paths[choice]
    if kind == "update_md":
        if choice == "existing":
            with open(join(tmp, "MD.md"), "w") as f:
                f.write("previous\n")
            return join(tmp, "MD.md")
        return {"path": join(tmp, "BM.md"), "missing_dir": join(tmp, "nowhere", "BM.md"), "dir": tmp}[choice]
    # from_json
    path = join(tmp, "results.json")
    good = json.dumps(_bench_result())
    content = {"valid": good, "empty": "", "notjson": "rows: 1\n", "list": "[1, 2]",
               "truncated": good[: len(good) // 2],
               "rows_not_list": json.dumps({**_bench_result(), "rows": {"a": 1}}),
               "rows_bad": json.dumps({**_bench_result(), "rows": [{"op": "x"}]})}
    if choice == "missing":
        return join(tmp, "missing.json")
    if choice == "dir":
        return tmp
    with open(path, "wb") as f:
        f.write(b"\xff\xfe\x00garbage" if choice == "binary" else content[choice].encode())
    return path


def _tree(root: str) -> dict:
    out = {}
    for d, _, files in os.walk(root):
        for name in files:
            p = os.path.join(d, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = (f.read(), os.stat(p).st_mode)
    return out


def build_bench_cli(case) -> Call:
    from mixprec.tools import bench, cli

    names, invalid, unsure = [], [], []
    for key, value in case.items():
        if value in CLI_HOSTILE.get(key, ()):
            names.append(CLI_FLAG[key] or "unrecognized arguments")
            if key == "junk":
                names += ["--timeout", "arguments", "argument"]
    from_json = case["from_json"]
    if from_json is not None:
        names.append("--from-json")

    def hostile(key):
        return case[key] in CLI_HOSTILE[key]

    if hostile("timeout") or hostile("junk") or case["device"] == "tpu":
        invalid.append("argparse refuses the arguments")
        names += ["--timeout", "--device", "argument"]
    if hostile("from_json"):
        if from_json in ("rows_bad", "rows_not_list") and case["json"] and case["update_md"] is None:
            unsure.append("--json prints a malformed results.json back as it is")
        else:
            invalid.append(f"--from-json {from_json}")
    if from_json is None:
        if hostile("output"):
            invalid.append(f"--output {case['output']}")
        if hostile("op"):
            invalid.append(f"--op {case['op']!r}")
        if case["device"] == "cuda" and not torch.cuda.is_available():
            invalid.append("--device cuda without a GPU")
    if hostile("update_md"):
        invalid.append(f"--update-benchmarks-md {case['update_md']}")
    result = _bench_result()
    calls = []

    def fake_run_all(args, argv):  # no real benchmark: what a run would return
        calls.append(argv)
        return copy.deepcopy(result)

    box = {}

    def run():
        with tempfile.TemporaryDirectory(prefix="mixprec-fuzz-") as tmp, contextlib.chdir(tmp):
            argv = ["bench"]
            if case["junk"] is not None:  # first: after an option with an optional value it would be its value
                argv += [case["junk"]] if case["junk"] != "positional" else ["extra"]
            paths = {k: _cli_files(tmp, case[k], k) for k in ("output", "update_md", "from_json")}
            if case["output"] is not None:
                argv += ["--output", paths["output"]]
            if case["timeout"] is not None:
                argv += ["--timeout", case["timeout"]]
            if from_json is not None:
                argv += ["--from-json", paths["from_json"]]
            if case["update_md"] == "flag":
                argv += ["--update-benchmarks-md"]
            elif case["update_md"] is not None:
                argv += ["--update-benchmarks-md", paths["update_md"]]
            if case["op"] is not None:
                for op in case["op"].split(",") if case["op"] else [""]:
                    argv += ["--op", op]
            if case["device"] is not None:
                argv += ["--device", case["device"]]
            argv += [flag for flag, on in (("--json", case["json"]), ("--quick", case["quick"])) if on]
            before = _tree(tmp)
            out, err = io.StringIO(), io.StringIO()
            original = bench.run_all
            bench.run_all = fake_run_all
            try:
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    try:
                        rc = cli.main(argv)
                    except SystemExit as exc:
                        rc = exc.code
            finally:
                bench.run_all = original
            after = _tree(tmp)
            box.update(rc=rc, out=out.getvalue(), err=err.getvalue(), before=before, after=after, paths=paths,
                       argv=argv)
            if rc == 2 or (rc not in (0, None) and not calls):
                changed = [k for k in set(before) | set(after) if before.get(k) != after.get(k)]
                if changed:
                    raise Lost(f"exit code {rc}: {_short(err.getvalue())}; yet {changed} changed")
                raise ValueError(f"exit code {rc}: {err.getvalue().strip().splitlines()[-1] if err.getvalue() else ''}")
            if rc not in (0, None):
                if "could not write" in err.getvalue():
                    raise Lost(f"exit code {rc} after the (stubbed) benchmark run: {_short(err.getvalue())}")
                raise RuntimeError(f"exit code {rc}: {_short(err.getvalue())}")
            return box

    def check(_):
        if from_json is None and len(calls) != 1:
            return f"the benchmarks ran {len(calls)} times"
        if from_json is not None and calls:
            return "--from-json ran the benchmarks"
        if case["json"]:
            try:
                printed = json.loads(box["out"])
            except json.JSONDecodeError:
                return f"--json printed no JSON: {_short(box['out'])}"
            if printed["rows"] != result["rows"]:
                return "--json printed other rows"
        elif "machine:" not in box["out"]:
            return f"no table printed: {_short(box['out'])}"
        after = box["after"]
        if from_json is None:
            found = [k for k in after if k.endswith("results.json") and k not in box["before"]]
            if not found:
                return f"no results.json written (files: {sorted(after)})"
            if json.loads(after[found[0]][0])["rows"] != result["rows"]:
                return "results.json holds other rows"
        if case["update_md"] is not None:
            md = [k for k in after if k.endswith(".md") and after[k] != box["before"].get(k)]
            if not md:
                return "--update-benchmarks-md wrote nothing"
            if after[md[0]][0].decode() != bench.benchmarks_md(json.loads(json.dumps(result))):
                return f"{md[0]} is not benchmarks_md(results)"
        return None

    if invalid:
        unsure = []
    return Call(run, sorted(set(names)), invalid, unsure, [], None if invalid or unsure else check)


# ---------------------------------------------------------------- the registry

@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # as the tally names it
    cases: object  # backends -> hypothesis strategy of cases
    build: object  # case -> Call


TARGETS = {t.name: t for t in (
    Target("ops.unscale_and_check_", unscale_cases, build_unscale),
    Target("ops.matmul", matmul_cases, build_matmul),
    Target("ops.matmul_accumulate_", matmul_accumulate_cases, build_matmul_accumulate),
    Target("ops.adam_step_", adam_step_cases, build_adam_step),
    Target("optim.FusedAdam/W", fused_adamw_cases, build_fused_adamw),
    Target("optim.FusedAdamW.load_state_dict", fused_adamw_load_cases, build_fused_adamw_load),
    Target("amp.GradScaler", grad_scaler_cases, build_grad_scaler),
    Target("bench CLI", bench_cli_cases, build_bench_cli),
)}


def run_case(target: str, case) -> Outcome:
    """Builds and judges one case of a target (what the fast tests and the long run's workers call)."""
    return judge(TARGETS[target].build(case))
