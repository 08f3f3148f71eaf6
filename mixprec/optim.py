"""FusedAdam and FusedAdamW: torch.optim optimizers whose whole update is one mixprec.ops.adam_step_ pass.

Model params may be fp32, fp16 or bf16, mixed in one model. With master_weights="auto" (the default) every
fp16/bf16 param gets an fp32 master copy in its state ("master_param"): the update reads the half-precision
grad, the master, m and v, and writes master, m, v and the param rounded to nearest even -- 28 bytes per
fp16 param, one pass, no temporaries. fp32 params need no master (a plain fused Adam).

State layout is torch.optim.Adam/AdamW's ("step" as a 0-dim fp32 tensor on the param's device, "exp_avg",
"exp_avg_sq", "max_exp_avg_sq" with amsgrad, all fp32) plus "master_param"; state dicts load both ways with
torch.optim.AdamW and with torch.load(weights_only=True).

Loss scaling (the torch.amp.GradScaler contract, `_step_supports_amp_scaling`): the scaler sets
`optimizer.grad_scale` (the scale, or None if it already unscaled the grads) and `optimizer.found_inf` before
calling step(); the kernel divides the grads by grad_scale and, if found_inf is nonzero (read on the device),
writes nothing: params, masters, m, v and the step counts stay as they were.

Clipping (max_grad_norm): the norm is the one mixprec.amp.GradScaler published from its fused unscale pass
(`optimizer._mixprec_grad_norm_sq`; mixprec._grad_norm documents the protocol) when there is one; otherwise
one mixprec.ops.unscale_and_check_ pass computes it (and divides by grad_scale). torch.nn.utils.clip_grad_norm_'s
coefficient is applied inside the kernel. Nothing in step() synchronizes with the device.

Stochastic rounding: bf16 params with master_weights=False, stochastic_rounding=True are updated in fp32
registers and stored with stochastic rounding, reproducibly from `seed`, the param's position and the step.
"""
from __future__ import annotations

import torch

from mixprec import _backend, _grad_norm, ops
from mixprec.ops._validate import is_non_overlapping_and_dense
from mixprec.ops.adam import AdamLists, check_adam_hyper

__all__ = ["FusedAdam", "FusedAdamW"]

# group keys of ours that a torch.optim.Adam/AdamW state dict lacks
_OWN_GROUP_KEYS = ("master_weights", "stochastic_rounding", "seed", "backend")


def _mix_seed(seed: int, group_index: int) -> int:
    """A per-group stochastic-rounding seed (the kernels hash it further with the tensor index and step)."""
    return (seed * 0x9E3779B1 + group_index * 0x85EBCA77 + 1) & 0xFFFFFFFF


class FusedAdam(torch.optim.Optimizer):
    """Adam with L2 weight decay (torch.optim.Adam's semantics), fused into one pass; see the module docstring."""

    _step_supports_amp_scaling = True
    _default_decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *, amsgrad=False,
                 maximize=False, master_weights="auto", max_grad_norm=None, stochastic_rounding=False, seed=0,
                 backend="auto"):
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
        elif not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not isinstance(betas, (tuple, list)) or len(betas) != 2 or any(isinstance(b, torch.Tensor) for b in betas):
            raise ValueError(f"betas must be a pair of floats, got {betas!r}")
        check_adam_hyper(beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay)
        if master_weights not in ("auto", True, False):
            raise ValueError(f"master_weights must be 'auto', True or False, got {master_weights!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        if stochastic_rounding and master_weights is not False:
            raise ValueError("stochastic_rounding=True updates bf16 params without masters: pass master_weights=False")
        if backend not in _backend.BACKENDS:
            raise ValueError(f"backend must be one of {_backend.BACKENDS}, got {backend!r}")
        if not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, decoupled_weight_decay=self._default_decoupled,
                        master_weights=master_weights, stochastic_rounding=stochastic_rounding, seed=seed,
                        backend=backend)
        self.max_grad_norm = max_grad_norm
        self._lr_tensors: dict = {}
        super().__init__(params, defaults)

    # ---- groups and state ----

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for i, p in enumerate(group["params"]):
            name = self._param_name(group, len(self.param_groups) - 1, i)
            if p.is_complex():
                raise ValueError(f"{type(self).__name__}: {name} is complex ({p.dtype}); complex params are not "
                                 "supported (view them as real with torch.view_as_real)")
            if p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise ValueError(f"{type(self).__name__}: {name} has dtype {p.dtype}; "
                                 "supported are float32, float16 and bfloat16")
            if not is_non_overlapping_and_dense(p):
                raise ValueError(f"{type(self).__name__}: {name} is not dense (a view with gaps or overlaps, strides "
                                 f"{p.stride()}); the fused update walks storage linearly: pass a contiguous param")
            if group["stochastic_rounding"] and p.dtype == torch.float16:
                raise ValueError(f"{type(self).__name__}: {name} is float16; stochastic rounding is for bfloat16 "
                                 "params (give fp16 params master weights in another param group)")

    @staticmethod
    def _param_name(group: dict, group_index: int, i: int) -> str:
        names = group.get("param_names")
        label = f"param_groups[{group_index}]['params'][{i}]"
        return f"parameter '{names[i]}' ({label})" if names else label

    @staticmethod
    def _needs_master(group: dict, p: torch.Tensor) -> bool:
        return group["master_weights"] is not False and p.dtype != torch.float32

    def _init_state(self, group: dict, p: torch.Tensor) -> dict:
        state = self.state[p]
        if len(state) == 0:
            # fp32 buffers with the param's strides (zeros_like keeps a dense layout), step on its device
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        if self._needs_master(group, p) and "master_param" not in state:
            state["master_param"] = torch.empty_like(p, dtype=torch.float32).copy_(p.detach())
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a FusedAdam/W or torch.optim.Adam/AdamW state dict, keeping the state in fp32 (torch's own
        loader casts it to the param dtype) on the params' devices; masters missing from a torch state dict
        are made from the params."""
        own = [{k: g[k] for k in _OWN_GROUP_KEYS} for g in self.param_groups]
        saved_state = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        for group, kept in zip(self.param_groups, own):
            for k, v in kept.items():
                group.setdefault(k, v)
            group.setdefault("decoupled_weight_decay", self._default_decoupled)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for saved_id, p in zip(saved_ids, params):
            if saved_id not in saved_state:
                continue
            saved = saved_state[saved_id]
            group = group_of[id(p)]
            state = {"step": torch.as_tensor(saved["step"], dtype=torch.float32).reshape(()).to(p.device, copy=True)}
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in saved:
                    state[key] = torch.empty_like(p, dtype=torch.float32).copy_(saved[key])
            if self._needs_master(group, p):
                source = saved.get("master_param", p.detach())
                state["master_param"] = torch.empty_like(p, dtype=torch.float32).copy_(source)
            self.state[p] = state

    # ---- the step ----

    def _lr_tensor(self, group_index: int, lr, device: torch.device) -> torch.Tensor:
        """lr as a one-element fp32 tensor on device; a float lr is kept in a cached tensor refilled only
        when the value changes (a kernel fill, no host-device copy, no sync)."""
        if isinstance(lr, torch.Tensor):
            return lr if (lr.device == device and lr.dtype == torch.float32) else lr.to(device, torch.float32)
        key = (group_index, device)
        cached = self._lr_tensors.get(key)
        if cached is None or cached[0] != lr:
            t = cached[1] if cached is not None else torch.empty((), dtype=torch.float32, device=device)
            t.fill_(lr)
            self._lr_tensors[key] = cached = (lr, t)
        return cached[1]

    def _clip_coefs(self, grads_by_device: dict, grad_scale) -> dict:
        """{device: clip coefficient tensor} for max_grad_norm (see the module docstring)."""
        norm_sq = _grad_norm.published(self)
        unscaled = norm_sq is not None
        if norm_sq is None:
            total = None
            for device, grads in grads_by_device.items():
                part = _grad_norm.sum_of_squares(grads, device)
                total = part if total is None else total + part.to(total.device)
            norm_sq = total
        norm = norm_sq.reshape(1).float().sqrt()
        if grad_scale is not None and not unscaled:
            norm = norm / grad_scale.reshape(1).to(norm.device)
        coef = _grad_norm.clip_coef(norm, self.max_grad_norm)
        return {device: coef.to(device) for device in grads_by_device}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if not isinstance(found_inf, torch.Tensor):  # GradScaler sums an empty dict to 0 when no grads
            found_inf = None
        if grad_scale is not None and not isinstance(grad_scale, torch.Tensor):
            raise TypeError(f"optimizer.grad_scale must be a tensor or None, got {type(grad_scale).__name__}")

        # buckets: one op call per (group, device, with masters or not)
        calls = []
        grads_by_device: dict = {}
        for gi, group in enumerate(self.param_groups):
            buckets: dict = {}
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if g.layout is not torch.strided:
                    raise RuntimeError(f"{type(self).__name__}: {self._param_name(group, gi, i)} has a sparse "
                                       "gradient; sparse gradients are not supported (use torch.optim.SparseAdam)")
                if g.device != p.device:
                    raise RuntimeError(f"{type(self).__name__}: the gradient of {self._param_name(group, gi, i)} "
                                       f"is on {g.device}, the parameter on {p.device}")
                if g.stride() != p.stride() and p.numel() > 1:
                    raise RuntimeError(f"{type(self).__name__}: the gradient of {self._param_name(group, gi, i)} "
                                       f"has strides {g.stride()}, the parameter {p.stride()} (autograd's grads "
                                       "match their params; a grad set by hand must too)")
                state = self._init_state(group, p)
                master = "master_param" in state and self._needs_master(group, p)
                b = buckets.setdefault((p.device, master), AdamLists())
                b.params.append(p)
                b.grads.append(g)
                b.exp_avgs.append(state["exp_avg"])
                b.exp_avg_sqs.append(state["exp_avg_sq"])
                b.steps.append(state["step"])
                if group["amsgrad"]:
                    b.max_exp_avg_sqs.append(state["max_exp_avg_sq"])
                if master:
                    b.master_params.append(state["master_param"])
                if self.max_grad_norm is not None:
                    grads_by_device.setdefault(p.device, []).append(g)
            for (device, _), lists in buckets.items():
                calls.append((gi, group, device, lists))

        clip = self._clip_coefs(grads_by_device, grad_scale) if grads_by_device else {}
        found_by_device: dict = {}
        scale_by_device: dict = {}
        for gi, group, device, lists in calls:
            if found_inf is not None and device not in found_by_device:
                found_by_device[device] = found_inf.to(device, torch.float32, non_blocking=True).reshape(1)
            if grad_scale is not None and device not in scale_by_device:
                scale_by_device[device] = grad_scale.to(device, torch.float32, non_blocking=True).reshape(1)
            beta1, beta2 = group["betas"]
            ops.adam_step_(
                **lists.as_kwargs(), lr=self._lr_tensor(gi, group["lr"], device), beta1=beta1, beta2=beta2,
                eps=group["eps"], weight_decay=group["weight_decay"], decoupled=group["decoupled_weight_decay"],
                maximize=group["maximize"], grad_scale=scale_by_device.get(device),
                found_inf=found_by_device.get(device), clip_coef=clip.get(device),
                sr_seed=_mix_seed(group["seed"], gi) if group["stochastic_rounding"] else None,
                backend=group["backend"])
        return loss


class FusedAdamW(FusedAdam):
    """AdamW (decoupled weight decay, torch.optim.AdamW's semantics), fused into one pass; see the module
    docstring."""

    _default_decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, **kwargs)
