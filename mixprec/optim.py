"""FusedAdam and FusedAdamW: torch.optim optimizers whose whole update is one mixprec.ops.adam_step_ pass.

Model params may be fp32, fp16 or bf16, mixed in one model. With master_weights="auto" (the default) every
fp16/bf16 param gets an fp32 master copy in its state ("master_param"): the update reads the half-precision
grad, the master, m and v, and writes master, m, v and the param rounded to nearest even -- 28 bytes per
fp16 param, one pass, no temporaries. fp32 params need no master (a plain fused Adam).

Drop-in for torch.optim.Adam/AdamW: the same positional and keyword arguments (see FusedAdam for what foreach,
fused, capturable and differentiable do here), tensor lr and betas, step/state-dict/load hooks, copy.deepcopy and
pickle (every option lives in ``self.defaults``, which torch's ``__getstate__`` keeps), lr schedulers.

State and checkpoints. The state is torch.optim.Adam/AdamW's ("step" a 0-dim fp32 tensor on the param's device,
"exp_avg", "exp_avg_sq", "max_exp_avg_sq" with amsgrad, all fp32) plus "master_param". ``state_dict()`` param
groups carry exactly torch.optim.AdamW's keys, so state dicts load both ways with torch.optim.AdamW, with
torch.load(weights_only=True) and with torch.distributed.checkpoint. mixprec's own per-group options
(master_weights, stochastic_rounding, seed, backend) and torch's implementation flags (foreach, fused, capturable,
differentiable) say how this optimizer runs, not where training is: ``load_state_dict`` keeps them from the live
optimizer. It also checks every state tensor's shape against its param (ValueError naming the parameter), keeps
the state in fp32 (torch's own loader casts it to the param dtype) and accepts a state dict from an older torch
(missing group keys take torch's defaults, a numeric step becomes a tensor).

- Round trips through torch.optim.AdamW: torch's ``load_state_dict`` casts every state tensor to its param's dtype,
  so over fp16 params torch holds fp16 moments and an fp16 "master_param" (kept as an unknown key, never
  updated by torch). Loading such a state dict back into a FusedAdam/W that still holds fp32 tensors keeps the
  fp32 values wherever they round to the loaded ones: the way back is lossless.
- Masters: from the loaded state when it has fp32 ones, else the live optimizer's, else they are made from the
  params at the next step. At the first step after a load every master element that does not round to its param
  is replaced by the param's value (one pass, no sync): a torch checkpoint or a stale master never overrides the
  loaded weights, and model and optimizer state may be loaded in either order.
- torch.distributed.checkpoint (``get_state_dict`` / ``dcp.save`` / ``dcp.load`` / ``set_state_dict``): a
  torch.optim.AdamW checkpoint of fp32 params loads into FusedAdamW with the default planner, and back. A torch
  checkpoint of fp16/bf16 params has no "master_param", which the default planner reports as a missing key: load
  it with ``DefaultLoadPlanner(allow_partial_load=True)``; the masters are then made from the loaded params.

Loss scaling (the torch.amp.GradScaler contract, `_step_supports_amp_scaling`): the scaler sets
`optimizer.grad_scale` (the scale, or None if it already unscaled the grads) and `optimizer.found_inf` before
calling step(); the kernel divides the grads by grad_scale and, if found_inf is nonzero (read on the device),
writes nothing: params, masters, m, v and the step counts stay as they were. After ``scaler.step(optimizer)`` the
grads are left SCALED: the kernel unscales them in registers and saves the pass that would write them back
(torch's fused AdamW writes them back unscaled). For logging gradients pass ``unscale_grads=True``: step() then
divides them in place by grad_scale (one extra ``torch._foreach_div_`` pass), on skipped steps too, as
GradScaler.unscale_ would have.

Clipping (max_grad_norm): the norm is the one mixprec.amp.GradScaler published from its fused unscale pass
(`optimizer._mixprec_grad_norm_sq`; mixprec._grad_norm documents the protocol) when there is one; otherwise
one mixprec.ops.unscale_and_check_ pass computes it (and divides by grad_scale). torch.nn.utils.clip_grad_norm_'s
coefficient is applied inside the kernel (p.grad itself is not clipped). Nothing in step() synchronizes with the
device (except tensor betas on a GPU, see FusedAdam).

Layouts: params and grads may have any strided layout. When a param, its grad and its state share strides (what
autograd produces for dense params) the kernel runs on them directly. Otherwise step() takes a slower path
for that param: the state is laid out again like the param when the param is dense (after
``model.to(memory_format=torch.channels_last)``, say), a grad of other strides or with gaps is copied into a dense
buffer of the state's layout, and a param with gaps is updated in such a buffer and copied back.
Refused, naming the parameter: complex or non-float params, params whose elements share memory (expand), a
param listed twice, sparse grads, and a param resized after its state was made.

Stochastic rounding: bf16 params with master_weights=False, stochastic_rounding=True are updated in fp32
registers and stored with stochastic rounding, reproducibly from `seed`, the param's position and the step.
"""
from __future__ import annotations

import copy
from collections import defaultdict

import torch

from mixprec import _backend, _grad_norm, ops
from mixprec.ops._validate import is_non_overlapping_and_dense
from mixprec.ops.adam import AdamLists, check_adam_hyper

__all__ = ["FusedAdam", "FusedAdamW"]

# torch.optim.Adam/AdamW's group keys, with the values torch gives them when a state dict from an older torch
# lacks them (torch.optim.Adam.__setstate__)
_TORCH_GROUP_DEFAULTS = {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                         "differentiable": False, "fused": None, "decoupled_weight_decay": False}
# group keys of ours, absent from state_dict(): with torch's implementation flags they are kept from the live
# optimizer when a state dict is loaded
_OWN_GROUP_DEFAULTS = {"master_weights": "auto", "stochastic_rounding": False, "seed": 0, "backend": "auto"}
_LIVE_KEYS = ("foreach", "fused", "capturable", "differentiable", *_OWN_GROUP_DEFAULTS)
# options of the whole optimizer: in self.defaults (where torch keeps its own, so copies and pickles keep
# them), in no param group
_GLOBAL_DEFAULTS = {"max_grad_norm": None, "unscale_grads": False}
# state tensors shaped like their param
_SHAPED_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param")
_F32 = torch.float32
_STRIDED = torch.strided


def _mix_seed(seed: int, group_index: int) -> int:
    """A per-group stochastic-rounding seed (the kernels hash it further with the tensor index and step)."""
    return (seed * 0x9E3779B1 + group_index * 0x85EBCA77 + 1) & 0xFFFFFFFF


def _check_global(key: str, value):
    """The value of an option of the whole optimizer (_GLOBAL_DEFAULTS), checked."""
    if key == "max_grad_norm" and value is not None and not value > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {value}")
    if key == "unscale_grads" and not isinstance(value, bool):
        raise TypeError(f"unscale_grads must be a bool, got {type(value).__name__}")
    return value


def _keep_where_rounds_to(fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """Element-wise: `fine` where it rounds to `coarse` (in coarse's dtype), else coarse's value, in fine's dtype.
    How fp32 state survives a trip through a lower-precision copy of it, and how masters follow their params."""
    coarse = coarse.to(fine.device)
    return torch.where(fine.to(coarse.dtype) == coarse, fine, coarse.to(fine.dtype))


def _contiguous_strides(shape) -> tuple:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


def _laid_out(t: torch.Tensor, strides: tuple) -> tuple[torch.Tensor, bool]:
    """(t with these strides, whether that is a copy): t itself, a view of the same memory when the strides differ
    only on dims of size 1 (which never step), or a copy into a new buffer."""
    if t.stride() == strides:
        return t, False
    if t.numel() <= 1 or all(a == b or n == 1 for n, a, b in zip(t.shape, t.stride(), strides)):
        return t.as_strided(t.shape, strides), False
    return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device).copy_(t), True


class FusedAdam(torch.optim.Optimizer):
    """Adam with L2 weight decay (torch.optim.Adam's semantics), fused into one pass; see the module docstring.

    Arguments are torch.optim.Adam's, plus:

    - master_weights: "auto" (fp32 masters for fp16/bf16 params), True, or False (update half params in place).
    - max_grad_norm: clip the gradients' total 2-norm to this value inside the kernel (None: no clipping).
    - stochastic_rounding, seed: bf16 params without masters are stored with stochastic rounding.
    - backend: "auto", "cuda", "triton", "cpu" or "reference" (mixprec.ops.adam_step_'s).
    - unscale_grads: what p.grad holds after ``scaler.step(optimizer)`` (torch.amp.GradScaler or
      mixprec.amp.GradScaler). False (default): the SCALED gradients -- the kernel unscales them in registers and
      saves the pass that would write them back (torch's fused AdamW writes them back unscaled). True: step()
      divides them in place by the scale afterwards (one extra torch._foreach_div_ pass), on skipped steps too,
      so that logged gradients are the true ones (torch's fused AdamW leaves a skipped step's grads scaled;
      GradScaler.unscale_ does not). Clipping (max_grad_norm) never changes p.grad.

    torch's implementation flags: foreach (None, True, False) picks between torch's implementations, which all
    compute the same update; mixprec always runs its one fused kernel, so every value is honoured. fused=None or
    True is honoured (always fused); fused=False asks for an unfused implementation, which mixprec does not
    have: ValueError (use torch.optim.Adam/AdamW). fused=True with foreach=True is refused as torch refuses it.
    capturable=True and False are both honoured: the step count stays on the param's device and step() never
    synchronizes, which is what CUDA graph capture needs. differentiable=True (autograd through the update) is
    refused with a ValueError. lr may be a one-element tensor (read on the device). betas may be one-element
    tensors: they are read with float() at each step, which for a tensor on a GPU waits for the device (a sync,
    refused with capturable=True); keep tensor betas on the CPU to avoid it.
    """

    _step_supports_amp_scaling = True
    _always_decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False, master_weights="auto", max_grad_norm=None, stochastic_rounding=False,
                 seed=0, backend="auto", unscale_grads=False):
        _check_global("max_grad_norm", max_grad_norm)
        _check_global("unscale_grads", unscale_grads)
        if isinstance(betas, (tuple, list)) and len(betas) == 2:
            # torch's _to_scalar: a one-element tensor beta is kept 0-dim
            betas = tuple(b.reshape(()) if isinstance(b, torch.Tensor) and b.numel() == 1 else b for b in betas)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay, master_weights=master_weights,
                        stochastic_rounding=stochastic_rounding, seed=seed, backend=backend)
        self._check_options(defaults, "")
        self._lr_tensors: dict = {}
        self._masters_to_check: list = []
        super().__init__(params, {**defaults, "max_grad_norm": max_grad_norm, "unscale_grads": unscale_grads})

    # ---- options ----

    @property
    def max_grad_norm(self):
        return self.defaults["max_grad_norm"]

    @max_grad_norm.setter
    def max_grad_norm(self, value) -> None:
        self.defaults["max_grad_norm"] = _check_global("max_grad_norm", value)

    @property
    def unscale_grads(self) -> bool:
        return self.defaults["unscale_grads"]

    @unscale_grads.setter
    def unscale_grads(self, value: bool) -> None:
        self.defaults["unscale_grads"] = _check_global("unscale_grads", value)

    def _check_options(self, group: dict, where: str) -> None:
        """ValueError (torch's type where torch refuses the same) for options that cannot be honoured; `where`
        prefixes the message ("" for the constructor's, "param_groups[i]: " for a group's)."""
        lr, betas = group["lr"], group["betas"]
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1:
                raise ValueError(f"{where}Tensor lr must be 1-element")
            if lr.device.type == "cpu" and not 0.0 <= float(lr):
                raise ValueError(f"{where}Invalid learning rate: {float(lr)}")
        elif not 0.0 <= lr:
            raise ValueError(f"{where}Invalid learning rate: {lr}")
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{where}betas must be a pair, got {betas!r}")
        tensors = [isinstance(b, torch.Tensor) for b in betas]
        if tensors[0] != tensors[1]:
            raise ValueError(f"{where}betas must be either both floats or both Tensors")
        for k, b in enumerate(betas):
            if isinstance(b, torch.Tensor):
                if b.numel() != 1:
                    raise ValueError(f"{where}Tensor betas[{k}] must be 1-element")
                if b.device.type != "cpu" and group["capturable"]:
                    raise ValueError(f"{where}betas[{k}] is a tensor on {b.device}: it is read with float() at "
                                     "each step, a sync that capturable=True rules out; keep it on the CPU")
        beta1, beta2 = (float(b) for b in betas)
        check_adam_hyper(beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
        if group["master_weights"] not in ("auto", True, False):
            raise ValueError(f"{where}master_weights must be 'auto', True or False, got {group['master_weights']!r}")
        if group["stochastic_rounding"] and group["master_weights"] is not False:
            raise ValueError(f"{where}stochastic_rounding=True updates bf16 params without masters: pass "
                             "master_weights=False")
        if group["backend"] not in _backend.BACKENDS:
            raise ValueError(f"{where}backend must be one of {_backend.BACKENDS}, got {group['backend']!r}")
        seed = group["seed"]
        if not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ValueError(f"{where}seed must be an int in [0, 2**32), got {seed!r}")
        if group["foreach"] not in (None, True, False):
            raise ValueError(f"{where}foreach must be None, True or False, got {group['foreach']!r}")
        if group["fused"] is False:
            raise ValueError(f"{where}fused=False asks for an unfused implementation; {type(self).__name__} always "
                             "runs one fused kernel: pass fused=None or True, or use torch.optim.AdamW")
        if group["fused"] not in (None, True):
            raise ValueError(f"{where}fused must be None or True, got {group['fused']!r}")
        if group["fused"] and group["foreach"]:
            raise RuntimeError(f"{where}`fused` and `foreach` cannot be `True` together.")
        if group["capturable"] not in (True, False):
            raise ValueError(f"{where}capturable must be True or False, got {group['capturable']!r}")
        if group["differentiable"] is not False:
            raise ValueError(f"{where}differentiable=True is not supported: the fused update is not differentiable "
                             "(use torch.optim.AdamW(differentiable=True))")
        if self._always_decoupled and group["decoupled_weight_decay"] is not True:
            raise ValueError(f"{where}{type(self).__name__} always decouples weight decay "
                             "(decoupled_weight_decay=True); use FusedAdam for Adam's L2 penalty")

    # ---- groups and state ----

    def add_param_group(self, param_group: dict) -> None:
        if isinstance(param_group, dict):
            for key in _GLOBAL_DEFAULTS:
                if key in param_group:
                    raise ValueError(f"{key} applies to the whole optimizer, not to one param group: pass it to "
                                     f"{type(self).__name__}(...)")
            params = param_group.get("params")
            if isinstance(params, torch.Tensor):  # what torch does, done first so that it can be checked
                param_group["params"] = [params]
            elif params is not None and not isinstance(params, set):
                param_group["params"] = list(params)
            self._check_listed_once(param_group)
        super().add_param_group(param_group)
        gi = len(self.param_groups) - 1
        group = self.param_groups[gi]
        for key in _GLOBAL_DEFAULTS:
            group.pop(key, None)
        try:
            self._check_options(group, f"param_groups[{gi}]: ")
            for i, p in enumerate(group["params"]):
                self._check_param(group, gi, i, p)
        except Exception:
            self.param_groups.pop()  # a refused group is not added
            raise

    def _check_param(self, group: dict, gi: int, i: int, p: torch.Tensor) -> None:
        name = f"{type(self).__name__}: {self._param_name(group, gi, i)}"
        if p.is_complex():
            raise ValueError(f"{name} is complex ({p.dtype}); complex params are not supported (view them as real "
                             "with torch.view_as_real)")
        if p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{name} has dtype {p.dtype}; supported are float32, float16 and bfloat16")
        if any(st == 0 and n > 1 for n, st in zip(p.shape, p.stride())):
            raise ValueError(f"{name} has elements that overlap in memory (strides {p.stride()}, an expanded "
                             "tensor): an in-place update of it is ill-defined; pass a tensor of its own")
        if group["stochastic_rounding"] and p.dtype == torch.float16:
            raise ValueError(f"{name} is float16; stochastic rounding is for bfloat16 params (give fp16 params "
                             "master weights in another param group)")

    def _check_listed_once(self, param_group: dict) -> None:
        """ValueError naming both places when a tensor is listed twice (torch warns within a group and updates it
        twice per step, and refuses it across groups)."""
        entries = param_group.get("params")
        if not isinstance(entries, list):
            return
        seen = {id(p): self._param_name(g, gi, i) for gi, g in enumerate(self.param_groups)
                for i, p in enumerate(g["params"])}
        gi = len(self.param_groups)
        for i, entry in enumerate(entries):
            name, t = entry if isinstance(entry, tuple) and len(entry) == 2 else (None, entry)
            if not isinstance(t, torch.Tensor):
                continue  # torch's own check names what it is
            label = f"param_groups[{gi}]['params'][{i}]"
            label = f"parameter '{name}' ({label})" if name is not None else label
            first = seen.get(id(t))
            if first is not None:
                raise ValueError(f"{type(self).__name__}: {label} is the same tensor as {first}: each parameter may "
                                 "be listed once (torch.optim warns and updates such a parameter twice per step)")
            seen[id(t)] = label

    @staticmethod
    def _param_name(group: dict, group_index: int, i: int) -> str:
        names = group.get("param_names")
        label = f"param_groups[{group_index}]['params'][{i}]"
        return f"parameter '{names[i]}' ({label})" if names else label

    @staticmethod
    def _needs_master(group: dict, p: torch.Tensor) -> bool:
        return group["master_weights"] is not False and p.dtype != torch.float32

    @staticmethod
    def _new_state_tensor(p: torch.Tensor) -> torch.Tensor:
        """An uninitialized fp32 buffer shaped like p: p's strides when p is dense, else contiguous."""
        return torch.empty_like(p, dtype=torch.float32, memory_format=torch.preserve_format)

    def _init_state(self, group: dict, p: torch.Tensor) -> dict:
        """The state of p, with whatever this group's update needs made (zeros, a master copied from p)."""
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key not in state and (key != "max_exp_avg_sq" or group["amsgrad"]):
                state[key] = self._new_state_tensor(p).zero_()
        if self._needs_master(group, p) and "master_param" not in state:
            state["master_param"] = self._new_state_tensor(p).copy_(p.detach())
        return state

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_masters_to_check": self._masters_to_check}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for key, value in _GLOBAL_DEFAULTS.items():
            self.defaults.setdefault(key, value)
        for group in self.param_groups:
            for key, value in _TORCH_GROUP_DEFAULTS.items():
                group.setdefault(key, value)
            for key, value in _OWN_GROUP_DEFAULTS.items():
                group.setdefault(key, self.defaults.get(key, value))
        self._lr_tensors = {}  # a cache: refilled at the next step
        self.__dict__.setdefault("_masters_to_check", [])

    def state_dict(self) -> dict:
        """torch.optim.Optimizer.state_dict's layout and hooks; param groups carry torch.optim.AdamW's keys only
        (mixprec's own options stay with the optimizer, see load_state_dict)."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        index: dict = {}
        groups = []
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params" and k not in _OWN_GROUP_DEFAULTS}
            packed["params"] = [index.setdefault(id(p), len(index)) for p in group["params"]]
            groups.append(packed)
        state = {(index[id(k)] if isinstance(k, torch.Tensor) else k): v for k, v in self.state.items()}
        state_dict = {"state": state, "param_groups": groups}
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a FusedAdam/W or torch.optim.Adam/AdamW state dict (any torch version), with torch's hooks and
        checks; see the module docstring for what is kept from the live optimizer and how masters are restored.
        A refused state dict (ValueError naming the parameter) changes nothing."""
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(self.param_groups, saved_groups)):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                             "optimizer's group")
        groups = []
        for live, saved in zip(self.param_groups, saved_groups):
            group = copy.deepcopy({k: v for k, v in saved.items() if k != "params"})
            for key, value in _TORCH_GROUP_DEFAULTS.items():
                group.setdefault(key, value)
            for key in _LIVE_KEYS:
                group[key] = live[key]
            if self._always_decoupled:
                group["decoupled_weight_decay"] = True
            group["params"] = live["params"]
            if "param_names" in live and "param_names" not in group:
                group["param_names"] = live["param_names"]
            groups.append(group)
        saved_state = state_dict["state"]
        state: defaultdict = defaultdict(dict)
        to_check = []
        mapped = set()
        for gi, (group, saved) in enumerate(zip(groups, saved_groups)):
            for i, (saved_id, p) in enumerate(zip(saved["params"], group["params"])):
                mapped.add(saved_id)
                if saved_id not in saved_state:
                    continue
                state[p] = self._loaded_state(group, gi, i, p, saved_state[saved_id], self.state.get(p) or {})
                if "master_param" in state[p]:
                    to_check.append(p)
        for key, value in saved_state.items():  # state of no param is kept as it is, as torch does
            if key not in mapped:
                state[key] = value
        self.__setstate__({"state": state, "param_groups": groups})
        self._masters_to_check = to_check
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _loaded_state(self, group: dict, gi: int, i: int, p: torch.Tensor, saved, live: dict) -> dict:
        """The state of p made from its saved state (checked against p) and its live state (fp32 values kept
        where the saved ones are their rounding)."""
        name = f"{type(self).__name__}: {self._param_name(group, gi, i)}"
        if not isinstance(saved, dict):
            raise ValueError(f"{name}: the loaded state must be a dict, got {type(saved).__name__}")
        state = {}
        for key, value in saved.items():
            if key == "step":
                step = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(float(value))
                if step.numel() != 1:
                    raise ValueError(f"{name}: the loaded state 'step' must have one element, got shape "
                                     f"{tuple(step.shape)}")
                state[key] = step.to(device=p.device, dtype=torch.float32, copy=True).reshape(())
            elif key in _SHAPED_STATE:
                if not isinstance(value, torch.Tensor):
                    raise ValueError(f"{name}: the loaded state '{key}' must be a tensor, got {type(value).__name__}")
                if value.shape != p.shape:
                    raise ValueError(f"{name}: the loaded state '{key}' has shape {tuple(value.shape)}, but the "
                                     f"parameter has shape {tuple(p.shape)}")
                if key != "master_param":
                    state[key] = self._loaded_fp32(p, value, live.get(key))
            else:
                state[key] = value.to(p.device) if isinstance(value, torch.Tensor) else copy.deepcopy(value)
        if self._needs_master(group, p):
            saved_master, live_master = saved.get("master_param"), live.get("master_param")
            if saved_master is not None and saved_master.dtype == torch.float32:
                state["master_param"] = self._loaded_fp32(p, saved_master, None)
            elif isinstance(live_master, torch.Tensor) and live_master.dtype == _F32 and live_master.shape == p.shape:
                state["master_param"] = live_master  # still at hand: checked against the param at the next step
            # else: made from the param at the next step (_init_state)
        return state

    def _loaded_fp32(self, p: torch.Tensor, value: torch.Tensor, live) -> torch.Tensor:
        out = self._new_state_tensor(p)
        if (value.dtype != torch.float32 and isinstance(live, torch.Tensor) and live.dtype == torch.float32
                and live.shape == value.shape):
            # cast down by torch's loader: the fp32 values at hand are exact wherever they round to it
            value = _keep_where_rounds_to(live, value)
        return out.copy_(value)

    def _check_masters(self) -> None:
        """After a load: every master element that does not round to its param takes the param's value."""
        pending, self._masters_to_check = self._masters_to_check, []
        for p in pending:
            master = self.state.get(p, {}).get("master_param")
            if master is not None and master.shape == p.shape:
                master.copy_(_keep_where_rounds_to(master, p.detach()))

    # ---- the step ----

    def _lr_tensor(self, group_index: int, lr, device: torch.device) -> torch.Tensor:
        """lr as a one-element fp32 tensor on device; a float lr is kept in a cached tensor refilled only
        when the value changes (a kernel fill, no host-device copy, no sync)."""
        if isinstance(lr, torch.Tensor):
            if lr.device == device and lr.dtype == torch.float32:
                return lr
            return lr.to(device, torch.float32, non_blocking=True)
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

    def _fit_layouts(self, group: dict, gi: int, i: int, p: torch.Tensor, g: torch.Tensor, state: dict,
                     copy_back: list) -> tuple:
        """The slower path of one param whose grad or state is not laid out like it (see the module docstring):
        checks, lays the state out again where needed, and returns the (param, grad) the kernel runs on; a
        staged param is added to copy_back as (param, buffer)."""
        name = f"{type(self).__name__}: {self._param_name(group, gi, i)}"
        if g.layout is not _STRIDED:
            raise RuntimeError(f"{name} has a sparse gradient; sparse gradients are not supported (use "
                               "torch.optim.SparseAdam)")
        if g.device != p.device:
            raise RuntimeError(f"{name}: the gradient is on {g.device}, the parameter on {p.device}")
        if g.shape != p.shape:
            raise RuntimeError(f"{name} has shape {tuple(p.shape)}, its gradient {tuple(g.shape)}")
        for key in _SHAPED_STATE:
            t = state.get(key)
            if t is not None and t.shape != p.shape:
                raise ValueError(f"{name} has shape {tuple(p.shape)}, but its optimizer state '{key}' has shape "
                                 f"{tuple(t.shape)}: the parameter was resized after its state was made (give it "
                                 "fresh state with `del optimizer.state[param]`, or load state of its new shape)")
        self._check_param(group, gi, i, p)
        if is_non_overlapping_and_dense(p):
            strides = p.stride()  # the state follows the param, once
        elif is_non_overlapping_and_dense(state["exp_avg"]):
            strides = state["exp_avg"].stride()
        else:
            strides = _contiguous_strides(p.shape)
        for key in _SHAPED_STATE:
            if key in state:
                state[key] = _laid_out(state[key], strides)[0]
        run_p, staged = _laid_out(p.detach(), strides)
        if staged:
            copy_back.append((p, run_p))
        return run_p, _laid_out(g, strides)[0]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._masters_to_check:
            self._check_masters()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if not isinstance(found_inf, torch.Tensor):  # GradScaler sums an empty dict to 0 when no grads
            found_inf = None
        if grad_scale is not None and not isinstance(grad_scale, torch.Tensor):
            raise TypeError(f"optimizer.grad_scale must be a tensor or None, got {type(grad_scale).__name__}")
        clipping = self.defaults["max_grad_norm"] is not None
        unscale = self.defaults["unscale_grads"] and grad_scale is not None

        # buckets: one op call per (group, device, with masters or not)
        # note: the per-param loop is the step's Python cost (a few hundred params a step): the common case --
        # param, grad and state of one layout -- is recognized by one stride/shape comparison, everything else
        # goes to _fit_layouts
        calls = []
        norm_grads: dict = {}
        scaled_grads: dict = {}
        states = self.state
        for gi, group in enumerate(self.param_groups):
            amsgrad = group["amsgrad"]
            masters = group["master_weights"] is not False
            buckets: dict = {}
            copy_backs: dict = {}  # per bucket: the staged params to copy back after its call
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                master = masters and p.dtype != _F32
                state = states.get(p)
                if (not state or "exp_avg" not in state or (amsgrad and "max_exp_avg_sq" not in state)
                        or (master and "master_param" not in state)):
                    state = self._init_state(group, p)
                key = (p.device, master)
                exp_avg = state["exp_avg"]
                strides = p.stride()
                if g.layout is _STRIDED and strides == exp_avg.stride() and g.stride() == strides and \
                        p.shape == exp_avg.shape:
                    run_p, run_g = p, g
                else:
                    run_p, run_g = self._fit_layouts(group, gi, i, p, g, state, copy_backs.setdefault(key, []))
                    exp_avg = state["exp_avg"]
                b = buckets.get(key)
                if b is None:
                    b = buckets[key] = AdamLists()
                b.params.append(run_p)
                b.grads.append(run_g)
                b.exp_avgs.append(exp_avg)
                b.exp_avg_sqs.append(state["exp_avg_sq"])
                b.steps.append(state["step"])
                if amsgrad:
                    b.max_exp_avg_sqs.append(state["max_exp_avg_sq"])
                if master:
                    b.master_params.append(state["master_param"])
                if clipping:
                    norm_grads.setdefault(p.device, []).append(run_g)
                if unscale:
                    scaled_grads.setdefault(p.device, {})[id(g)] = g  # by id: a grad shared by two params once
            for key, lists in buckets.items():
                calls.append((gi, group, key[0], lists, copy_backs.get(key, ())))

        clip = self._clip_coefs(norm_grads, grad_scale) if norm_grads else {}
        found_by_device: dict = {}
        scale_by_device: dict = {}
        for gi, group, device, lists, copy_back in calls:
            if found_inf is not None and device not in found_by_device:
                found_by_device[device] = found_inf.to(device, torch.float32, non_blocking=True).reshape(1)
            if grad_scale is not None and device not in scale_by_device:
                scale_by_device[device] = grad_scale.to(device, torch.float32, non_blocking=True).reshape(1)
            beta1, beta2 = group["betas"]
            if isinstance(beta1, torch.Tensor):
                beta1 = float(beta1)  # note: the op takes Python floats; on a GPU this waits for the device
            if isinstance(beta2, torch.Tensor):
                beta2 = float(beta2)
            ops.adam_step_(
                **lists.as_kwargs(), lr=self._lr_tensor(gi, group["lr"], device), beta1=beta1, beta2=beta2,
                eps=group["eps"], weight_decay=group["weight_decay"], decoupled=group["decoupled_weight_decay"],
                maximize=group["maximize"], grad_scale=scale_by_device.get(device),
                found_inf=found_by_device.get(device), clip_coef=clip.get(device),
                sr_seed=_mix_seed(group["seed"], gi) if group["stochastic_rounding"] else None,
                backend=group["backend"])
            for p, buffer in copy_back:
                p.copy_(buffer)
        for device, grads in scaled_grads.items():
            torch._foreach_div_(list(grads.values()), scale_by_device[device].reshape(()))
        return loss


class FusedAdamW(FusedAdam):
    """AdamW (decoupled weight decay, torch.optim.AdamW's semantics), fused into one pass; arguments as FusedAdam's
    (decoupled_weight_decay is accepted only as True, so that FusedAdamW(params, **opt.defaults) works); see the
    module docstring."""

    _always_decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 decoupled_weight_decay=True, **kwargs):
        if decoupled_weight_decay is not True:
            raise ValueError("FusedAdamW always decouples weight decay (decoupled_weight_decay=True); use FusedAdam "
                             "for Adam's L2 penalty")
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, decoupled_weight_decay=True, **kwargs)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # as torch.optim.AdamW does: whatever an older state dict said
            group["decoupled_weight_decay"] = True
