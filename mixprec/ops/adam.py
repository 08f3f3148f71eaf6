"""mixprec.ops.adam_step_: the fused Adam/AdamW update, one pass over params, grads, state and masters."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

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


@dataclass
class AdamLists:
    """The tensor lists of one adam_step_ call, one entry per param (max_exp_avg_sqs only with amsgrad,
    master_params only for half params with fp32 masters: empty otherwise). Built by mixprec.optim per bucket and
    passed as ``adam_step_(**lists.as_kwargs(), ...)``."""

    params: list = field(default_factory=list)
    grads: list = field(default_factory=list)
    exp_avgs: list = field(default_factory=list)
    exp_avg_sqs: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    max_exp_avg_sqs: list = field(default_factory=list)
    master_params: list = field(default_factory=list)

    def as_kwargs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


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

    Every argument is checked here, once, whichever backend then runs (the extension checks again in C++ for
    callers of torch.ops.mixprec.adam_step_; the Triton and reference backends rely on these checks).
    """
    params = check_tensor_list("params", params)
    n = len(params)
    lists = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "steps": steps,
             "max_exp_avg_sqs": max_exp_avg_sqs, "master_params": master_params}
    for name, lst in lists.items():
        lists[name] = check_tensor_list(name, lst)
        if len(lst) != n and not (name in ("max_exp_avg_sqs", "master_params") and len(lst) == 0):
            raise ValueError(f"{name} must have one tensor per param ({n}), got {len(lst)}")
    check_adam_hyper(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    if n == 0:
        return
    device = common_device("params", params)
    for name in ("grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "master_params"):
        _check_like_params(name, lists[name], params, device, None if name == "grads" else torch.float32)
    for i, (p, step) in enumerate(zip(params, lists["steps"])):
        if not p.is_contiguous():
            check_dense(f"params[{i}]", p)
        if not (step.numel() == 1 and step.dtype == torch.float32 and step.device == device):
            check_scalar(f"steps[{i}]", step, device)
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
    _implementation(_backend.select(backend, device))(
        params, lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"], lists["steps"],
        max_exp_avg_sqs=lists["max_exp_avg_sqs"], master_params=lists["master_params"], lr=lr, beta1=float(beta1),
        beta2=float(beta2), eps=float(eps), weight_decay=float(weight_decay), decoupled=bool(decoupled),
        maximize=bool(maximize), grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef,
        sr_seed=-1 if sr_seed is None else int(sr_seed))


def _check_like_params(name: str, tensors: list, params: list, device: torch.device, dtype) -> None:
    """Each tensors[i] on `device`, dense, with params[i]'s shape and strides, of `dtype` (None: params[i]'s).

    note: the common case (contiguous, everything matching) is tested in one expression and no argument name is
    formatted unless something is wrong: a step over a few hundred tensors pays microseconds, not milliseconds."""
    for i, (t, like) in enumerate(zip(tensors, params)):
        want = like.dtype if dtype is None else dtype
        if (t.device == device and t.dtype == want and t.shape == like.shape and t.is_contiguous()
                and (t.numel() <= 1 or t.stride() == like.stride())):
            continue
        if t.device != device:
            raise ValueError(f"{name}[{i}] is on {t.device}, but params[{i}] is on {device}")
        if t.shape != like.shape or (t.numel() > 1 and t.stride() != like.stride()):
            raise ValueError(f"{name}[{i}] must have the shape and strides of params[{i}] "
                             f"({tuple(like.shape)}, {like.stride()}), got {tuple(t.shape)}, {t.stride()}")
        if t.dtype != want:
            raise TypeError(f"{name}[{i}] must be {want}, got {t.dtype}")
        check_dense(f"{name}[{i}]", t)


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
    def _(params, grads, exp_avgs, exp_avg_sqs, steps, *, max_exp_avg_sqs, master_params, lr, beta1, beta2, eps,
          weight_decay, decoupled, maximize=False, grad_scale=None, found_inf=None, clip_coef=None, sr_seed=-1):
        return None
