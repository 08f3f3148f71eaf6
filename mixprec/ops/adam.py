"""mixprec.ops.adam_step_: the fused Adam/AdamW update, one pass over params, grads, state and masters."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields

import torch

from mixprec import _backend, _ext, reference
from mixprec.ops._validate import (
    check_dense,
    check_distinct,
    check_scalar,
    check_tensor,
    check_tensor_list,
    check_writable,
    common_device,
)

# exp_avgs dtype -> the exp_avg_sqs dtype of the same state kind (fp32, bf16, int8 block-wise codes)
EXP_AVG_SQ_DTYPES = {torch.float32: torch.float32, torch.bfloat16: torch.bfloat16, torch.int8: torch.uint8}


def _check_real(name: str, x) -> None:
    if not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(x).__name__}")


def check_adam_hyper(*, lr=None, beta1, beta2, eps, weight_decay) -> None:
    """TypeError for a hyper-parameter that is not a number, ValueError for values torch.optim.Adam refuses and for
    non-finite ones (an inf lr or weight decay turns every param into NaN). lr may be a tensor (its value is checked
    by adam_step_ where that costs no device sync)."""
    for name, x in (("beta1", beta1), ("beta2", beta2), ("eps", eps), ("weight_decay", weight_decay)):
        _check_real(name, x)
    if lr is not None and not isinstance(lr, torch.Tensor):
        if not isinstance(lr, numbers.Real):
            raise TypeError(f"lr must be a float or a one-element tensor, got {type(lr).__name__}")
        if not 0.0 <= lr < math.inf:
            raise ValueError(f"Invalid learning rate: {lr} (must be finite and >= 0)")
    if not 0.0 < eps < math.inf:
        raise ValueError(f"Invalid epsilon value: {eps} (must be finite and > 0)")
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {beta1}")
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {beta2}")
    if not 0.0 <= weight_decay < math.inf:
        raise ValueError(f"Invalid weight_decay value: {weight_decay} (must be finite and >= 0)")


@dataclass
class AdamLists:
    """The tensor lists of one adam_step_ call, one entry per param, or empty when unused: max_exp_avg_sqs only with
    amsgrad; master_params (fp32 masters of half params) or param_remainders (int16 low halves of bf16 params'
    fp32 masters); exp_avg_scales and exp_avg_sq_scales only with int8 states. Built by mixprec.optim per bucket and
    passed as ``adam_step_(**lists.as_kwargs(), ...)``."""

    params: list = field(default_factory=list)
    grads: list = field(default_factory=list)
    exp_avgs: list = field(default_factory=list)
    exp_avg_sqs: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    max_exp_avg_sqs: list = field(default_factory=list)
    master_params: list = field(default_factory=list)
    param_remainders: list = field(default_factory=list)
    exp_avg_scales: list = field(default_factory=list)
    exp_avg_sq_scales: list = field(default_factory=list)

    def as_kwargs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_OPTIONAL_LISTS = ("max_exp_avg_sqs", "master_params", "param_remainders", "exp_avg_scales", "exp_avg_sq_scales")


def adam_step_(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1=0.9, beta2=0.999, eps=1e-8,
               weight_decay=0.0, decoupled=False, maximize=False, max_exp_avg_sqs=(), master_params=(),
               param_remainders=(), exp_avg_scales=(), exp_avg_sq_scales=(), grad_scale=None, found_inf=None,
               clip_coef=None, sr_seed=None, backend="auto"):
    """One fused Adam (decoupled=False: L2 weight decay) or AdamW (decoupled=True) update, in place.

    params: fp32, fp16 or bf16 tensors (any mix the master kind allows; grads[i] has params[i]'s dtype, shape and
    strides; any dense layout). Every state tensor has params[i]'s shape and strides. Master kind, one per call:
    none; master_params (fp32 masters of fp16/bf16 params); or param_remainders (int16, the low 16 bits of the fp32
    masters of bf16 params: (param, remainder) is the master bit for bit, see mixprec.reference.remainder_split).
    State kind, one per call, from the dtypes: exp_avgs and exp_avg_sqs (and max_exp_avg_sqs for amsgrad) fp32, or
    bf16 (stored rounded to nearest even), or int8 block-wise: exp_avgs int8 codes, exp_avg_sqs uint8 codes, and
    exp_avg_scales[i], exp_avg_sq_scales[i] fp32 1-D of ceil(numel / 256) block scales (amsgrad is not supported
    with int8 states). steps[i]: one-element fp32 tensor counting the updates done; this update is number
    steps[i] + 1, which is stored back. Unused lists are empty sequences.
    lr, grad_scale, found_inf, clip_coef: one-element fp32 tensors on the params' device (lr may be a Python
    float), read on the device: nothing synchronizes. Gradients are used as grad / grad_scale * clip_coef; if
    found_inf is nonzero nothing at all is written. sr_seed (int): bf16 params without master weights are stored
    with stochastic rounding, reproducibly from the seed. Semantics: mixprec.reference.adam_step_.

    Every argument is checked here, once, whichever backend then runs (the extension checks again in C++ for
    callers of torch.ops.mixprec.adam_step_; the Triton and reference backends rely on these checks); a refused
    call writes nothing. Values held in tensors are checked where that costs no device sync: on CPU tensors, unless
    found_inf skips the step, lr and clip_coef must be finite and >= 0, grad_scale finite and > 0, steps finite and
    >= 0. On CUDA tensors they
    are used as given (reading them would wait for the device): a zero, negative or non-finite grad_scale, a NaN
    clip_coef, an inf lr or a step <= -1 there make the params non-finite, as with torch's fused Adam.
    """
    _check_flags(lr, beta1, beta2, eps, weight_decay, decoupled, maximize, sr_seed)
    params = check_tensor_list("params", params)
    n = len(params)
    lists = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "steps": steps,
             **dict(zip(_OPTIONAL_LISTS, (max_exp_avg_sqs, master_params, param_remainders, exp_avg_scales,
                                           exp_avg_sq_scales)))}
    for name, lst in lists.items():
        if isinstance(lst, torch.Tensor) or not isinstance(lst, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple of tensors, got {type(lst).__name__}")
        if len(lst) != n and not (name in _OPTIONAL_LISTS and len(lst) == 0):
            raise ValueError(f"{name} must have one tensor per param ({n}), got {len(lst)}")
    if n == 0:
        return
    device = common_device("params", params)
    state_dtype = _state_dtype(lists)
    _check_kinds(lists, params, state_dtype, sr_seed)
    like = _check_params(params, device)
    _check_like_params("grads", lists["grads"], like, None, written=False)
    why = f" (exp_avgs[0] is {state_dtype}: one state kind per call)"
    _check_like_params("exp_avgs", lists["exp_avgs"], like, state_dtype, why=why)
    _check_like_params("exp_avg_sqs", lists["exp_avg_sqs"], like, EXP_AVG_SQ_DTYPES[state_dtype], why=why)
    _check_like_params("max_exp_avg_sqs", lists["max_exp_avg_sqs"], like, EXP_AVG_SQ_DTYPES[state_dtype], why=why)
    _check_like_params("master_params", lists["master_params"], like, torch.float32)
    _check_like_params("param_remainders", lists["param_remainders"], like, torch.int16)
    _, _, _, _, grad_on, inference_on = like
    for name in ("exp_avg_scales", "exp_avg_sq_scales"):
        _check_scales(name, lists[name], params, device, grad_on, inference_on)
    if not isinstance(lr, torch.Tensor):
        lr = torch.tensor(float(lr), dtype=torch.float32, device=device)
    read_values = _check_scalars(device, lr=lr, grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef)
    for i, step in enumerate(lists["steps"]):
        if not (isinstance(step, torch.Tensor) and step.dtype is torch.float32 and step.numel() == 1
                and step.device == device and not (grad_on and step.requires_grad)
                and (inference_on or not step.is_inference())):
            check_scalar(f"steps[{i}]", step, device)
            check_writable(f"steps[{i}]", step)
        if read_values and not 0.0 <= step.item() < math.inf:
            raise ValueError(f"steps[{i}] must be a finite count >= 0, got {step.item()}")
    _run(_backend.select(backend, device), params, lists, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
         weight_decay=weight_decay, decoupled=decoupled, maximize=maximize, grad_scale=grad_scale,
         found_inf=found_inf, clip_coef=clip_coef, sr_seed=sr_seed)


def adam_step_of_optimizer_(lists: AdamLists, *, lr: torch.Tensor, beta1: float, beta2: float, eps: float,
                            weight_decay: float, decoupled: bool, maximize: bool, grad_scale=None, found_inf=None,
                            clip_coef=None, sr_seed=None, backend="auto") -> None:
    """adam_step_ as mixprec.optim.FusedAdam calls it: one bucket of its params (not empty, on one device, of one
    master and state kind), its own state tensors, which it made and keeps in the layout of their params, grads it
    has matched to them, hyper-parameters and lr (a one-element fp32 tensor on the params' device) it has checked.

    note: on the extension's backends the per-tensor checks of the lists are left to the extension
    (csrc/adam_args.h checks the dtype, shape, strides, density and device of every tensor, so a state tensor
    replaced by hand gets a RuntimeError, never a stray write); here only what it does not check: the params dense,
    writable and disjoint, and the values of the scalars. Those per-tensor checks in Python (six lists of a few
    hundred tensors, after a step that streamed the whole model out of the caches) were about a millisecond of a
    GPT-2 step, several percent of its time. The Triton and reference backends rely on adam_step_'s checks, and get
    them."""
    params = lists.params
    device = params[0].device
    chosen = _backend.select(backend, device)
    if chosen not in ("cpu", "cuda"):
        adam_step_(**lists.as_kwargs(), lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                   decoupled=decoupled, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf,
                   clip_coef=clip_coef, sr_seed=sr_seed, backend=backend)
        return
    _check_params(params, device)
    _check_scalars(device, lr=lr, grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef)
    _run(chosen, params, lists.as_kwargs(), lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
         decoupled=decoupled, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef,
         sr_seed=sr_seed)


def _run(chosen: str, params: list, lists, *, lr, beta1, beta2, eps, weight_decay, decoupled, maximize, grad_scale,
         found_inf, clip_coef, sr_seed) -> None:
    """The backend `chosen` on checked arguments, in the mixprec::adam_step_ schema's form (lists: the other lists
    by name; the optional ones may be empty)."""
    _implementation(chosen)(
        params, lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"], lists["steps"],
        **{name: list(lists[name]) for name in _OPTIONAL_LISTS}, lr=lr, beta1=float(beta1), beta2=float(beta2),
        eps=float(eps), weight_decay=float(weight_decay), decoupled=bool(decoupled), maximize=bool(maximize),
        grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef,
        sr_seed=-1 if sr_seed is None else int(sr_seed))


def _check_params(params: list, device: torch.device) -> tuple:
    """Each param dense, writable, and no two sharing memory; returns what _check_like_params compares the other
    lists with: (shapes, contiguous, params, device, grad_on, inference_on)."""
    # note: under torch.compile the tensors are fake: no data pointers, values or inference flags to read (and
    # dynamo cannot trace is_inference): those checks are left to the eager call and to the extension's own
    eager = not torch.compiler.is_compiling()
    grad_on = torch.is_grad_enabled()
    inference_on = torch.is_inference_mode_enabled() if eager else True  # True: nothing to refuse
    # per param, computed once for every list: its shape, and whether it is contiguous (then a tensor of the same
    # shape that is contiguous has its strides, and no stride tuple is built)
    shapes, contiguous, spans = [], [], []
    for i, p in enumerate(params):
        shapes.append(p.shape)
        contiguous.append(c := p.is_contiguous())
        if not c:
            check_dense(f"params[{i}]", p)
        if (grad_on and p.requires_grad) or (not inference_on and p.is_inference()):
            check_writable(f"params[{i}]", p)
        if eager:
            spans.append((p.data_ptr(), p.numel() * p.element_size()))
    _check_disjoint(params, spans)
    return shapes, contiguous, params, device, grad_on, inference_on


def _check_scalars(device: torch.device, **scalars) -> bool:
    """The one-element fp32 tensors lr, grad_scale, found_inf, clip_coef (None: absent) on `device`; on the CPU, in
    an eager call whose found_inf does not skip the step, their values too. Returns whether the values were read
    (the step's counts may then be read too)."""
    for name, t in scalars.items():
        if t is not None:
            check_scalar(name, t, device)
    found_inf = scalars["found_inf"]
    # a skipped step (found_inf nonzero) writes nothing, whatever the values: an overflowing step's clip_coef is NaN
    read_values = (device.type == "cpu" and not torch.compiler.is_compiling()
                   and (found_inf is None or found_inf.item() == 0))
    if read_values:
        for name, positive in (("lr", False), ("grad_scale", True), ("clip_coef", False)):
            t = scalars[name]
            x = math.nan if t is None else t.item()
            if t is not None and not ((0.0 < x if positive else 0.0 <= x) and x < math.inf):
                raise ValueError(f"{name} must be finite and {'> 0' if positive else '>= 0'}, got {x}")
    return read_values


def _check_flags(lr, beta1, beta2, eps, weight_decay, decoupled, maximize, sr_seed) -> None:
    if lr is None:
        raise TypeError("lr must be a float or a one-element tensor, got None")
    check_adam_hyper(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    for name, x in (("decoupled", decoupled), ("maximize", maximize)):
        if not isinstance(x, (bool, int)):
            raise TypeError(f"{name} must be a bool, got {type(x).__name__}")
    if sr_seed is not None:
        if not isinstance(sr_seed, numbers.Integral):
            raise TypeError(f"sr_seed must be an int or None, got {type(sr_seed).__name__}")
        if not 0 <= sr_seed < 2**32:
            raise ValueError(f"sr_seed must be in [0, 2**32), got {sr_seed}")


def _state_dtype(lists: dict) -> torch.dtype:
    """The state kind of the call, as exp_avgs[0]'s dtype (every other state tensor is checked against it)."""
    first = lists["exp_avgs"][0]
    if not (isinstance(first, torch.Tensor) and first.dtype in EXP_AVG_SQ_DTYPES):
        check_tensor("exp_avgs[0]", first, dtypes=tuple(EXP_AVG_SQ_DTYPES))
    return first.dtype


def _check_kinds(lists: dict, params: list, state_dtype: torch.dtype, sr_seed) -> None:
    """One master kind and one state kind per call, and the combinations the kernels implement."""
    masters, remainders = lists["master_params"], lists["param_remainders"]
    if masters and remainders:
        raise ValueError("master_params and param_remainders: give one master kind per call (fp32 masters, or "
                         "the remainders of bf16 params), not both")
    if sr_seed is not None and (masters or remainders):
        raise ValueError("sr_seed (stochastic rounding) applies to params without master weights (got "
                         f"{'master_params' if masters else 'param_remainders'})")
    int8 = state_dtype == torch.int8
    for name in ("exp_avg_scales", "exp_avg_sq_scales"):
        if int8 and not lists[name]:
            raise ValueError(f"{name}: int8 states need one fp32 block-scale tensor per param")
        if lists[name] and not int8:
            raise ValueError(f"{name} is given, but the states are {state_dtype}: block scales belong to int8 states "
                             "only")
    if int8 and lists["max_exp_avg_sqs"]:
        raise ValueError("max_exp_avg_sqs: amsgrad is not supported with int8 states (use fp32 or bf16 states)")
    for i, p in enumerate(params if masters or remainders or sr_seed is not None else ()):
        dtype = p.dtype
        if masters and dtype == torch.float32:
            raise ValueError(f"master_params[{i}]: params[{i}] is float32 and needs no master weights; "
                             "update fp32 params in a separate call without master_params")
        if remainders and dtype != torch.bfloat16:
            raise ValueError(f"param_remainders[{i}]: params[{i}] is {dtype}; remainder masters are for bfloat16 "
                             "params only (use master_params for float16 params)")
        if sr_seed is not None and dtype == torch.float16:
            raise ValueError(f"params[{i}] is float16: stochastic rounding (sr_seed) is for bfloat16 params only")


def _check_disjoint(params: list, spans: list) -> None:
    """No two params share memory (the kernels would race on it): dense tensors each fill the bytes [data_ptr,
    data_ptr + nbytes), so sorted spans must not overlap; check_distinct names the pair when they do."""
    end = 0
    for start, size in sorted(spans):
        if size and start < end:
            check_distinct("params", params)
            return
        end = max(end, start + size)


def _check_like_params(name: str, tensors: list, like: tuple, dtype, *, written: bool = True, why: str = "") -> None:
    """Each tensors[i] a dense tensor on the params' device, with params[i]'s shape and strides, of `dtype` (None:
    params[i]'s), and writable if the op writes it.

    note: the common case (everything matching, param contiguous) is one expression per tensor, and no argument
    name is formatted unless something is wrong: a step over a few hundred tensors pays microseconds, not
    milliseconds."""
    shapes, contiguous, params, device, grad_on, inference_on = like
    grad_on, inference_on = grad_on and written, inference_on or not written  # what may refuse a write
    for i, t in enumerate(tensors):
        want = params[i].dtype if dtype is None else dtype
        if (isinstance(t, torch.Tensor) and t.layout is torch.strided and t.dtype is want and t.shape == shapes[i]
                and contiguous[i] and t.is_contiguous() and t.device == device
                and not (grad_on and t.requires_grad) and (inference_on or not t.is_inference())):
            continue
        where = f"{name}[{i}]"
        _check_strided(where, t, want)
        if t.device != device:
            raise ValueError(f"{where} is on {t.device}, but params[{i}] is on {device}")
        p = params[i]
        if t.shape != p.shape or (t.numel() > 1 and t.stride() != p.stride()):
            raise ValueError(f"{where} must have the shape and strides of params[{i}] "
                             f"({tuple(p.shape)}, {p.stride()}), got {tuple(t.shape)}, {t.stride()}")
        if t.dtype != want:
            raise TypeError(f"{where} must be {want}{why}, got {t.dtype}")
        check_dense(where, t)
        if written:
            check_writable(where, t)


def _check_strided(name: str, t, dtype: torch.dtype) -> None:
    """A tensor with the strided layout (TypeError naming it otherwise); its dtype is checked by the caller."""
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
        check_tensor(name, t, dtypes=(dtype,))


def _check_scales(name: str, tensors: list, params: list, device, grad_on: bool, inference_on: bool) -> None:
    """int8 block scales: fp32, 1-D, contiguous, one per 256-element block of params[i] (storage order)."""
    for i, t in enumerate(tensors):
        blocks = reference.int8_blocks(params[i].numel())
        if (isinstance(t, torch.Tensor) and t.layout is torch.strided and t.dtype is torch.float32
                and t.shape == (blocks,) and t.is_contiguous() and t.device == device
                and not (grad_on and t.requires_grad) and (inference_on or not t.is_inference())):
            continue
        where = f"{name}[{i}]"
        _check_strided(where, t, torch.float32)
        if t.dtype != torch.float32:
            raise TypeError(f"{where} must be torch.float32, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{where} is on {t.device}, but params[{i}] is on {device}")
        if t.shape != (blocks,) or not t.is_contiguous():
            raise ValueError(f"{where} must be a contiguous 1-D tensor of ceil(numel / {reference.INT8_BLOCK}) = "
                             f"{blocks} block scales for params[{i}] of {params[i].numel()} elements, got shape "
                             f"{tuple(t.shape)}, strides {t.stride()}")
        check_writable(where, t)


def _implementation(chosen: str):
    """The function with the mixprec::adam_step_ schema's signature that runs `chosen`."""
    if chosen == "reference":
        return reference.adam_step_
    if chosen == "triton":
        from mixprec.kernels import adam as triton_adam

        return triton_adam.adam_step_
    return torch.ops.mixprec.adam_step_


if _ext.available():

    @torch.library.register_fake("mixprec::adam_step_")
    def _(params, grads, exp_avgs, exp_avg_sqs, steps, *, max_exp_avg_sqs, master_params, param_remainders,
          exp_avg_scales, exp_avg_sq_scales, lr, beta1, beta2, eps, weight_decay, decoupled, maximize=False,
          grad_scale=None, found_inf=None, clip_coef=None, sr_seed=-1):
        # note: also the kernel an eager call reaches when one of its tensors is on the meta device (the dispatcher
        # picks the meta kernel for the whole call): refused here, as the real kernels refuse another device,
        # instead of a step that silently writes nothing
        names = ("params", "grads", "exp_avgs", "exp_avg_sqs", "steps", *_OPTIONAL_LISTS)
        lists = (params, grads, exp_avgs, exp_avg_sqs, steps, max_exp_avg_sqs, master_params, param_remainders,
                 exp_avg_scales, exp_avg_sq_scales)
        device = params[0].device if params else None
        for name, tensors in zip(names, lists, strict=True):
            for i, t in enumerate(tensors):
                if t.device != device:
                    raise ValueError(f"{name}[{i}] is on {t.device}, but params[0] is on {device}")
        return None
