"""FusedAdam and FusedAdamW: torch.optim optimizers whose whole update is one mixprec.ops.adam_step_ pass.

Model params may be fp32, fp16 or bf16, mixed in one model. With master_weights="auto" (the default) every
fp16/bf16 param gets an fp32 master copy in its state ("master_param"): the update reads the half-precision
grad, the master, m and v, and writes master, m, v and the param rounded to nearest even -- 28 bytes per
fp16 param, one pass, no temporaries. fp32 params need no master (a plain fused Adam).

Drop-in for torch.optim.Adam/AdamW: the same positional and keyword arguments (see FusedAdam for what foreach,
fused, capturable and differentiable do here), tensor lr and betas, step/state-dict/load hooks, copy.deepcopy and
pickle (every option lives in ``self.defaults``, which torch's ``__getstate__`` keeps), lr schedulers.

State and checkpoints. In the default modes the state is torch.optim.Adam/AdamW's ("step" a 0-dim fp32 tensor on
the param's device, "exp_avg", "exp_avg_sq", "max_exp_avg_sq" with amsgrad, all fp32) plus "master_param" (the
other modes: "Fewer bytes per parameter" below). ``state_dict()`` param groups carry exactly torch.optim.AdamW's
keys, so state dicts load both ways with torch.optim.AdamW, with torch.load(weights_only=True) and with
torch.distributed.checkpoint. mixprec's own per-group options (master_weights, state_dtype, stochastic_rounding,
seed, backend) and torch's implementation flags (foreach, fused, capturable, differentiable) say how this optimizer
runs, not where training is: ``load_state_dict`` keeps them from the live optimizer (and converts the loaded
state into its layout). It also checks every state tensor's shape against its param (ValueError naming the
parameter), keeps the state in the live layout's dtypes (torch's own loader casts it to the param dtype) and
accepts a state dict from an older torch (missing group keys take torch's defaults, a numeric step becomes a
tensor).

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
registers and stored with stochastic rounding, reproducibly from `seed` (mixed with the group's index), the step
and the param's position in its kernel call: among the params of its group (and device) that have a grad at that
step. A param without a grad at some step shifts the positions of the ones after it, so two runs draw the same
bits when the same params have grads.

Fewer bytes per parameter: two options per param group, ``master_weights`` and ``state_dtype``,
combine freely (but "remainder" with stochastic rounding, which is for params without masters, and amsgrad with
"int8"); every combination is one pass of the same kernel, with loss-scale unscaling, overflow skipping and
clipping inside it. Bytes per param, AdamW on bf16 params (fp16 params alike, but "remainder"; steps aside;
amsgrad adds one tensor of v's dtype, read and written):

| master_weights | state_dtype | stored: param + master + m + v | moved per step (read + write) |
|---|---|---|---|
| True / "auto" | float32 | 2 + 4 + 4 + 4 = 14 | 28: read grad 2, master, m, v 4 each; write those and param 2 |
| "remainder" | float32 | 2 + 2 + 4 + 4 = 12 | 26: read and write param 2, remainder 2, m 4, v 4; read grad 2 |
| "remainder" | bfloat16 | 2 + 2 + 2 + 2 = 8 | 18 |
| "remainder" | "int8" | 2 + 2 + 1 + 1 + 8/256 = 6.03 | 14.06 (the block scales: 4 B per 256 elements and moment) |
| True | bfloat16 | 2 + 4 + 2 + 2 = 10 | 20 |
| True | "int8" | 2 + 4 + 1 + 1 + 8/256 = 8.03 | 16.06 |
| False (nearest or SR) | float32 | 2 + 4 + 4 = 10 | 22 |
| False | bfloat16 | 2 + 2 + 2 = 6 | 14 |
| False | "int8" | 2 + 1 + 1 + 8/256 = 4.03 | 10.06 |
| (fp32 params) | float32 | 4 + 4 + 4 = 12 | 28 (fp32 grads) |

``opt.state_bytes()`` measures what is stored, ``step_traffic(opt)`` counts what one step moves, and
``opt.master_param(p)`` gives any param's exact fp32 master.

- master_weights="remainder" (bf16 params; fp16 params are refused naming them, fp32 params need no master in
  any mode): the state keeps "param_remainder", int16 with the param's shape and strides, the low 16 bits of the
  fp32 master, so (param, remainder) IS the fp32 master, bit for bit (mixprec.reference.remainder_split / _join).
  The master trajectory equals master_weights=True's bit for bit on the same grads. The param is the master
  rounded to nearest, ties AWAY from zero (not to even: at an exact tie, lo == 0x8000, the 16 low bits alone
  could not tell which way an even rounding went); everywhere else it is the master rounded to nearest even, as
  with master_weights=True.
- state_dtype=torch.bfloat16: m and v (and max_exp_avg_sq) stored in bf16, rounded to nearest even after each
  update (the update itself runs on the fp32 values it computed).
- state_dtype="int8": block-wise 8-bit moments: blocks of 256 elements in memory order and one fp32 absmax scale
  per block and moment, as in bitsandbytes and torchao, but mixprec's own code map, a closed-form 8-bit float with
  3 mantissa bits (m: int8, signed, 16 binades; v: uint8, 32 binades; mixprec.reference.quantize_blockwise), whose
  codes every backend computes with integer operations (so the codes are not bitsandbytes' dynamic-map codes);
  quantized and dequantized inside the pass. Tensors of fewer than 4096 elements keep fp32 moments (bitsandbytes'
  rule: they are few bytes, and blocks would be a large part of them).
  amsgrad is refused with "int8" at construction.

State keys: "step"; "exp_avg", "exp_avg_sq", "max_exp_avg_sq" in fp32 or bf16 (torch's keys: a bf16 moment is
what torch's own AdamW holds for bf16 params); int8 moments under keys of their own, "exp_avg_codes" (int8) +
"exp_avg_scales" (fp32, ceil(numel / 256)) and "exp_avg_sq_codes" (uint8) + "exp_avg_sq_scales", so that
torch.optim.AdamW never reads codes as moments (given such a state dict it finds no "exp_avg" and fails at its
first step); "master_param" (fp32) or "param_remainder" (int16). Loading converts any of these layouts, and
torch.optim.AdamW's, into the live optimizer's: moments are widened to fp32 and then stored as the live group
keeps them (bf16 rounded to nearest even, int8 quantize_blockwise; a layout that already matches is copied
exactly, so a resume is bit for bit); remainders come from a loaded fp32 master (remainder_split, reconciled with
the param at the first step as masters are above) or are 0 (the master is the param); fp32 masters come from
remainders (remainder_join with the param at the first step) or from the params. ``opt.torch_state_dict()``
exports torch.optim.AdamW's fp32 layout (moments dequantized; fp32 masters under "master_param" on request).

Sharded params (FSDP2's fully_shard, HSDP: DTensors; mixprec.distributed holds the logic). The kernel runs once per
bucket on this rank's local shards (``to_local()``, no copy; no DTensor op per element), exactly as on whole
tensors, so a shard is updated bit for bit as the same rows would be as a param of their own. Every state tensor
shaped like the param (moments, codes, masters, remainders) is a DTensor of the param's mesh and placements whose
shard is laid out like the param's shard; "step" is a plain 0-dim tensor, as torch keeps it; int8 block scales are
plain tensors of the shard's ceil(numel / 256) blocks (blocks of 256 in each shard's storage order; whether a
tensor gets int8 moments is decided by the whole param's numel, so every rank agrees). Clipping uses the global
norm: the scaler's (summed over the ranks in its pass), or this optimizer's own pass, SUM-reduced over the mesh
dimensions the grads are sharded on. Checkpoints: torch.distributed.checkpoint saves and reshards every DTensor
state as it does torch.optim.AdamW's. int8 moments cannot be resharded as codes (their block scales belong to one
shard's storage), so ``state_dict()`` gives a DTensor param's int8 moments dequantized, as fp32 DTensors under
torch's keys exp_avg / exp_avg_sq, and ``load_state_dict`` quantizes them again in the live shards' blocks: bit for
bit when the sharding is the same (the dequantized codes are their own nearest codes and the block absmax is the
scale), one more rounding to the codes when it changed. (A plain, unsharded optimizer's state_dict keeps codes and
scales; a DCP checkpoint therefore moves int8 moments between shardings of DTensor params, 1-rank FSDP2 included,
not between a sharded and an unsharded int8 optimizer, whose keys differ.) Loading a whole (unsharded) state dict
into a sharded optimizer gives each rank its part, int8 codes of a whole tensor included (dequantized, quantized
in the shard's blocks). state_bytes() and step_traffic() count this rank's shards. Refused, naming the param:
placements other than Shard(0) on one mesh dimension with Replicate() on the others (Partial, Shard(1), 2-D
FSDP x TP), a grad whose placements differ from its param's, and a sharded param with a main_grad (FSDP2
reduce-scatters .grad only). Stochastic rounding keys its bits by the element's place in its shard: reproducible
for a given sharding, not across shardings.
"""
from __future__ import annotations

import copy
import math
import numbers
from collections import defaultdict

import torch

from mixprec import _backend, _grad_norm, distributed
from mixprec.ops._validate import has_self_overlap, is_non_overlapping_and_dense
from mixprec.ops.adam import AdamLists, adam_step_of_optimizer_, check_adam_hyper
from mixprec.reference import (
    INT8_BLOCK,
    codes_dtype,
    dequantize_blockwise,
    int8_blocks,
    quantize_blockwise,
    remainder_join,
    remainder_split,
)

__all__ = ["FusedAdam", "FusedAdamW", "step_traffic"]

# torch.optim.Adam/AdamW's group keys, with the values torch gives them when a state dict from an older torch
# lacks them (torch.optim.Adam.__setstate__)
_TORCH_GROUP_DEFAULTS = {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                         "differentiable": False, "fused": None, "decoupled_weight_decay": False}
# group keys of ours, absent from state_dict(): with torch's implementation flags they are kept from the live
# optimizer when a state dict is loaded
_OWN_GROUP_DEFAULTS = {"master_weights": "auto", "state_dtype": torch.float32, "stochastic_rounding": False, "seed": 0,
                       "backend": "auto"}
_LIVE_KEYS = ("foreach", "fused", "capturable", "differentiable", *_OWN_GROUP_DEFAULTS)
# options of the whole optimizer: in self.defaults (where torch keeps its own, so copies and pickles keep
# them), in no param group
_GLOBAL_DEFAULTS = {"max_grad_norm": None, "unscale_grads": False}
_F32 = torch.float32
_BF16 = torch.bfloat16
_STRIDED = torch.strided
STATE_DTYPES = (torch.float32, torch.bfloat16, "int8")  # the values of state_dtype
INT8_MIN_NUMEL = 4096  # with state_dtype="int8", smaller tensors keep fp32 moments (bitsandbytes' min_8bit_size)
_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
# int8 moments: key -> (codes key, block-scales key, signed code map)
_INT8_KEYS = {"exp_avg": ("exp_avg_codes", "exp_avg_scales", True),
              "exp_avg_sq": ("exp_avg_sq_codes", "exp_avg_sq_scales", False)}
_MASTER_KEYS = {"fp32": "master_param", "remainder": "param_remainder"}
# state tensors shaped like their param (the block scales are 1-D: one per 256 elements in memory order)
_SHAPED_STATE = (*_MOMENTS, "exp_avg_codes", "exp_avg_sq_codes", "master_param", "param_remainder")
_SCALES = ("exp_avg_scales", "exp_avg_sq_scales")
# per state kind: (exp_avg key, exp_avg_sq key, their dtypes, and the scales keys for int8)
_STATE_KEYS = {"fp32": ("exp_avg", "exp_avg_sq", _F32, _F32, None, None),
               "bf16": ("exp_avg", "exp_avg_sq", _BF16, _BF16, None, None),
               "int8": ("exp_avg_codes", "exp_avg_sq_codes", torch.int8, torch.uint8, "exp_avg_scales",
                        "exp_avg_sq_scales")}


def _kinds(group: dict, p: torch.Tensor) -> tuple[str, str]:
    """(master kind, state kind) of p in its group, as adam_step_ names them: master "none" (fp32 params, or
    master_weights=False), "fp32" or "remainder"; state "fp32", "bf16" or "int8" (int8 only for tensors of
    INT8_MIN_NUMEL elements or more)."""
    mw, sd = group["master_weights"], group["state_dtype"]
    master = "none" if mw is False or p.dtype is _F32 else "remainder" if mw == "remainder" else "fp32"
    if sd is _F32:
        return master, "fp32"
    if sd is _BF16:
        return master, "bf16"
    return master, "int8" if p.numel() >= INT8_MIN_NUMEL else "fp32"


def _mix_seed(seed: int, group_index: int) -> int:
    """A per-group stochastic-rounding seed (the kernels hash it further with the tensor index and step)."""
    return (seed * 0x9E3779B1 + group_index * 0x85EBCA77 + 1) & 0xFFFFFFFF


def _check_global(key: str, value):
    """The value of an option of the whole optimizer (_GLOBAL_DEFAULTS), checked."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if key == "max_grad_norm" and value is not None and not real:
        raise TypeError(f"max_grad_norm must be a float or None, got {type(value).__name__}")
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


def _same_order(t: torch.Tensor, strides: tuple) -> bool:
    """Whether t laid out with `strides` keeps its elements in the same memory order (strides differing only on
    dims of size 1, which never step); the int8 blocks are runs of that order."""
    return t.numel() <= 1 or all(a == b or n == 1 for n, a, b in zip(t.shape, t.stride(), strides))


def _state_strides(p: torch.Tensor) -> tuple:
    """The strides of the state tensors made for plain tensor p (_new_state_tensor's), without allocating them."""
    return torch.empty_like(p, device="meta", memory_format=torch.preserve_format).stride()


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
    if _same_order(t, strides):
        return t.as_strided(t.shape, strides), False
    return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device).copy_(t), True


class FusedAdam(torch.optim.Optimizer):
    """Adam with L2 weight decay (torch.optim.Adam's semantics), fused into one pass; see the module docstring.

    Arguments are torch.optim.Adam's, plus:

    - master_weights: "auto" (fp32 masters for fp16/bf16 params), True, False (update half params in place), or
      "remainder" (bf16 params: int16 remainders that make each param its exact fp32 master; see the module
      docstring).
    - state_dtype: torch.float32, torch.bfloat16 or "int8" (block-wise; tensors under 4096 elements keep fp32):
      how exp_avg and exp_avg_sq are stored.
    - max_grad_norm: clip the gradients' total 2-norm to this value inside the kernel (None: no clipping).
    - stochastic_rounding, seed: bf16 params without masters are stored with stochastic rounding.
    - backend: "auto", "cuda", "triton", "cpu" or "reference" (mixprec.ops.adam_step_'s).
    - unscale_grads: what p.grad holds after ``scaler.step(optimizer)`` (torch.amp.GradScaler or
      mixprec.amp.GradScaler). False (default): the SCALED gradients -- the kernel unscales them in registers and
      saves the pass that would write them back (torch's fused AdamW writes them back unscaled). True: step()
      divides them in place by the scale afterwards (one extra torch._foreach_div_ pass), on skipped steps too,
      so that logged gradients are the true ones (torch's fused AdamW leaves a skipped step's grads scaled;
      GradScaler.unscale_ does not). Clipping (max_grad_norm) never changes p.grad.

    Beyond torch.optim's methods: master_param(p) (p's exact fp32 master), state_bytes() (what the state holds),
    torch_state_dict() (an export in torch.optim.AdamW's fp32 layout); mixprec.optim.step_traffic(opt) counts the
    bytes a step moves.

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
                 decoupled_weight_decay=False, master_weights="auto", state_dtype=torch.float32, max_grad_norm=None,
                 stochastic_rounding=False, seed=0, backend="auto", unscale_grads=False):
        _check_global("max_grad_norm", max_grad_norm)
        _check_global("unscale_grads", unscale_grads)
        if isinstance(betas, (tuple, list)) and len(betas) == 2:
            # torch's _to_scalar: a one-element tensor beta is kept 0-dim
            betas = tuple(b.reshape(()) if isinstance(b, torch.Tensor) and b.numel() == 1 else b for b in betas)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay, master_weights=master_weights,
                        state_dtype=state_dtype, stochastic_rounding=stochastic_rounding, seed=seed, backend=backend)
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
        else:
            try:
                check_adam_hyper(lr=lr, beta1=0.0, beta2=0.0, eps=1.0, weight_decay=0.0)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{where}{exc}") from None
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
        beta1, beta2 = (float(b) if isinstance(b, torch.Tensor) else b for b in betas)
        try:
            check_adam_hyper(beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{where}{exc}") from None
        master_weights, state_dtype = group["master_weights"], group["state_dtype"]
        if not (master_weights is True or master_weights is False or master_weights in ("auto", "remainder")):
            raise ValueError(f"{where}master_weights must be 'auto', True, False or 'remainder', got "
                             f"{master_weights!r}")
        if not (state_dtype is _F32 or state_dtype is _BF16 or state_dtype == "int8"):
            raise ValueError(f"{where}state_dtype must be torch.float32, torch.bfloat16 or 'int8', got {state_dtype!r}")
        if state_dtype == "int8" and group["amsgrad"]:
            raise ValueError(f"{where}amsgrad is not supported with state_dtype='int8' (its running maximum of v "
                             "has no 8-bit form here): use state_dtype=torch.bfloat16 or torch.float32")
        if group["stochastic_rounding"] and master_weights is not False:
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
        if has_self_overlap(p):
            raise ValueError(f"{name} has elements that overlap in memory (shape {tuple(p.shape)}, strides "
                             f"{p.stride()}, e.g. an expanded tensor): an in-place update of it is ill-defined; pass a "
                             "tensor of its own")
        if group["stochastic_rounding"] and p.dtype == torch.float16:
            raise ValueError(f"{name} is float16; stochastic rounding is for bfloat16 params (give fp16 params "
                             "master weights in another param group)")
        if group["master_weights"] == "remainder" and p.dtype == torch.float16:
            raise ValueError(f"{name} is float16; master_weights='remainder' is for bfloat16 params (an fp16 "
                             "param and 16 more bits are no fp32 master): give it master_weights=True in another "
                             "param group")
        distributed.check_placements(name, p)

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
    def _new_state_tensor(p: torch.Tensor, dtype: torch.dtype = _F32) -> torch.Tensor:
        """An uninitialized buffer shaped like p: p's strides when p is dense, else contiguous; for a DTensor p, a
        DTensor of p's placements laid out like p's shard (mixprec.distributed.new_state)."""
        return distributed.new_state(p, dtype)

    def _init_state(self, group: dict, p: torch.Tensor) -> dict:
        """The state of p in the layout its group gives it: what is missing is made (zeros, a master from p), what
        is held in another layout (the group's master_weights or state_dtype changed) is converted."""
        state = self.state[p]
        self._reconcile_all(self._to_layout(group, p, state, loaded=False))
        return state

    def _to_layout(self, group: dict, p: torch.Tensor, state: dict, *, loaded: bool) -> list:
        """Puts `state` (empty, torch.optim.AdamW's, or any FusedAdam/W layout; tensors shaped like p) into the
        layout of p in `group` (_kinds), replacing its entries. Returns what must still be reconciled with the
        param's value, (p, how, data) entries for _reconciled: load_state_dict leaves them to the first step (the
        model may be loaded after the optimizer), _init_state applies them at once."""
        master, kind = _kinds(group, p)
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=_F32, device=p.device)
        for key in _MOMENTS:
            if key in state or key != "max_exp_avg_sq" or group["amsgrad"]:
                # a kept max_exp_avg_sq of a group without amsgrad is converted too (torch keeps it as well)
                self._moment_to_layout(state, key, kind, p)
        pending = []
        held_master, held_remainder = state.get("master_param"), state.get("param_remainder")
        has_master = isinstance(held_master, torch.Tensor) and held_master.dtype is _F32
        has_remainder = (isinstance(held_remainder, torch.Tensor) and held_remainder.dtype is torch.int16
                         and p.dtype is _BF16)
        if master == "fp32":
            state.pop("param_remainder", None)
            if has_master:
                if loaded:  # e.g. a torch checkpoint's params loaded after a FusedAdamW one: the param wins
                    pending.append((p, "round", None))
            elif has_remainder:  # the master is the param and its remainder, with the param as it is then
                state["master_param"] = self._new_state_tensor(p).copy_(
                    distributed.on_shards(remainder_join, p.detach(), held_remainder, like=p))
                pending.append((p, "join", held_remainder))
            else:
                state["master_param"] = self._new_state_tensor(p).copy_(p.detach())
        elif master == "remainder":
            state.pop("master_param", None)
            if not has_remainder:
                remainder = self._new_state_tensor(p, torch.int16)
                if has_master:  # split, then kept where the master rounds to the param (_reconciled)
                    state["param_remainder"] = remainder.copy_(
                        distributed.on_shards(remainder_split, held_master, like=p, wrap=(1,))[1])
                    pending.append((p, "split", held_master))
                else:  # the master is the param
                    state["param_remainder"] = remainder.zero_()
        else:  # a param without master weights: a held master has no use (and would be stale if kept)
            state.pop("master_param", None)
            state.pop("param_remainder", None)
        return pending

    def _moment_to_layout(self, state: dict, key: str, kind: str, p: torch.Tensor) -> None:
        """state[key] (fp32 or bf16), or its int8 codes and block scales (_INT8_KEYS), stored as `kind` says: kept
        as it is when it already is (bit for bit), else its fp32 values stored anew (bf16: rounded to nearest even;
        int8: quantize_blockwise), or zeros when state holds neither."""
        codes_key, scales_key, signed = _INT8_KEYS.get(key, (None, None, True))
        int8 = kind == "int8" and codes_key is not None  # (max_exp_avg_sq has no int8 form: amsgrad is refused)
        dtype = _BF16 if kind == "bf16" else _F32
        held = state.get(key)
        if int8 and codes_key in state and scales_key in state:
            state.pop(key, None)
            return
        if not int8 and isinstance(held, torch.Tensor) and held.dtype is dtype:
            if codes_key is not None:
                state.pop(codes_key, None)
                state.pop(scales_key, None)
            return
        value = None
        if codes_key is not None and codes_key in state and scales_key in state:
            value = distributed.on_shards(dequantize_blockwise, state[codes_key], state[scales_key], like=p)
        elif isinstance(held, torch.Tensor):
            value = held
        for k in (key, codes_key, scales_key):
            state.pop(k, None)
        if int8:
            if value is None:
                codes = self._new_state_tensor(p, codes_dtype(signed)).zero_()
                scales = torch.zeros(int8_blocks(distributed.local_numel(p)), dtype=_F32, device=p.device)
            else:  # quantized in p's layout: the blocks are runs of p's memory order (of its shard's, for a DTensor)
                dense = distributed.copy_into(self._new_state_tensor(p), value)
                codes, scales = distributed.on_shards(lambda t: quantize_blockwise(t, signed=signed), dense, like=p)
            state[codes_key], state[scales_key] = codes, scales
        else:
            out = self._new_state_tensor(p, dtype)
            # copy_ rounds to nearest even; a full tensor loaded into a DTensor state gives it this rank's part
            state[key] = out.zero_() if value is None else distributed.copy_into(out, value)

    def _reconciled(self, p: torch.Tensor, how: str, data) -> dict:
        """The tensors (state key or "param" -> new values) that reconcile p's master with the param as it is now,
        after a load or a change of layout; nothing is written here (see _reconcile_all).
        - "round": a loaded fp32 master is kept where it rounds to the param, elsewhere it takes the param's value;
        - "join": the fp32 master made from the param and a (loaded) remainder `data`;
        - "split": remainders from a (loaded) fp32 master `data`, where it rounds to the param (to nearest even or
          at a tie away from zero: the param then takes the ties-away value, as this mode writes params);
          elsewhere remainder 0 (the master is the param)."""
        param = p.detach()
        state = self.state.get(p, {})
        if how == "round":
            return {"master_param": _keep_where_rounds_to(state["master_param"], param)}
        if how == "join":
            return {"master_param": distributed.on_shards(remainder_join, param, data.to(param.device), like=p)}
        master = data.to(param.device)
        split_param, remainder = distributed.on_shards(remainder_split, master, like=p, wrap=(0, 1))
        keep = (master.to(param.dtype) == param) | (split_param == param)
        return {"param_remainder": torch.where(keep, remainder, torch.zeros_like(remainder)),
                "param": torch.where(keep, split_param, param)}

    def _pending_valid(self, entry) -> bool:
        p, how, data = entry
        state = self.state.get(p, {})
        key = "param_remainder" if how == "split" else "master_param"
        held = state.get(key)
        return (isinstance(held, torch.Tensor) and held.shape == p.shape
                and (how == "round" or (data.shape == p.shape and p.dtype is _BF16)))

    def _reconcile_all(self, entries) -> None:
        """Writes _reconciled's values for every (p, how, data) entry whose state still fits its param."""
        for entry in entries:
            if isinstance(entry, torch.Tensor):  # pickled by an older mixprec: a master to check
                entry = (entry, "round", None)
            if not self._pending_valid(entry):
                continue
            p = entry[0]
            state = self.state[p]
            for key, value in self._reconciled(*entry).items():
                (p.detach() if key == "param" else state[key]).copy_(value)

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

    def _packed_groups(self) -> tuple[list, dict]:
        """state_dict()'s param groups (torch's keys, params as indices) and {id(param): index}."""
        index: dict = {}
        groups = []
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params" and k not in _OWN_GROUP_DEFAULTS}
            packed["params"] = [index.setdefault(id(p), len(index)) for p in group["params"]]
            groups.append(packed)
        return groups, index

    def state_dict(self) -> dict:
        """torch.optim.Optimizer.state_dict's layout and hooks; param groups carry torch.optim.AdamW's keys only
        (mixprec's own options stay with the optimizer, see load_state_dict). The state is what the optimizer
        holds, in its layout (see the module docstring's state keys); torch.load(weights_only=True) reads it. For
        torch.optim.AdamW's own fp32 layout use torch_state_dict()."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        groups, index = self._packed_groups()
        state = {(index[id(k)] if isinstance(k, torch.Tensor) else k): self._portable(k, v)
                 for k, v in self.state.items()}
        state_dict = {"state": state, "param_groups": groups}
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    @staticmethod
    def _portable(p, held):
        """state_dict()'s entry for p: its state as held, except that a DTensor param's int8 moments are given
        dequantized, as fp32 DTensors under torch's keys (exp_avg, exp_avg_sq): their block scales are blocks of each
        shard's storage, which no other sharding has, so torch.distributed.checkpoint could not reshard them.
        load_state_dict quantizes them again: bit for bit in the same sharding (dequantized codes are the nearest
        codes' values and the block absmax is their scale), anew in another (one more rounding to the codes)."""
        if not (distributed.is_dtensor(p) and isinstance(held, dict) and any(k in held for k in _SCALES)):
            return held
        out = {k: v for k, v in held.items() if k not in _SCALES and k not in ("exp_avg_codes", "exp_avg_sq_codes")}
        for moment, (codes_key, scales_key, _) in _INT8_KEYS.items():
            if codes_key in held:
                out[moment] = distributed.on_shards(dequantize_blockwise, held[codes_key], held[scales_key], like=p)
        return out

    def torch_state_dict(self, *, master_params: bool = False) -> dict:
        """The state as torch.optim.AdamW holds it, for torch.optim.AdamW.load_state_dict (or any reader of its
        layout): "step", "exp_avg", "exp_avg_sq" (and "max_exp_avg_sq") in fp32 -- bf16 moments widened, int8 ones
        dequantized --, with state_dict()'s param groups. master_params=True adds each master's exact fp32 value
        as "master_param" (master_param(p); params without masters get none). Copies throughout; no hooks run
        (this is an export, not state_dict())."""
        groups, index = self._packed_groups()
        params = {id(p): (p, group) for group in self.param_groups for p in group["params"]}
        state: dict = {}
        for key, held in self.state.items():
            if not isinstance(key, torch.Tensor) or id(key) not in params or not isinstance(held, dict):
                state[key] = copy.deepcopy(held)  # state of no param: as state_dict() has it
                continue
            p, group = params[id(key)]
            out = {}
            for name, value in held.items():
                if name in _MOMENTS:
                    out[name] = value.to(_F32, copy=True)
                elif name in _SCALES or name in _MASTER_KEYS.values():
                    continue
                elif name in ("exp_avg_codes", "exp_avg_sq_codes"):
                    moment = name.removesuffix("_codes")
                    out[moment] = distributed.on_shards(dequantize_blockwise, value, held[_INT8_KEYS[moment][1]],
                                                        like=p)
                else:
                    out[name] = value.clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)
            if master_params and _kinds(group, p)[0] != "none":
                out["master_param"] = self.master_param(p)
            state[index[id(key)]] = out
        return {"state": state, "param_groups": groups}

    def _group_of(self, p: torch.Tensor) -> dict:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise ValueError(f"{type(self).__name__}: the tensor given (shape {tuple(p.shape)}) is not one of this "
                         "optimizer's parameters")

    def master_param(self, p: torch.Tensor) -> torch.Tensor:
        """The exact fp32 master weights of param p, as a new tensor laid out like p: a copy of its fp32 master, the
        join of p and its remainder (master_weights="remainder"), or p widened to fp32 when it has no master (fp32
        params, master_weights=False, or before the first step makes one). After a load it is the master that
        the next step will start from (reconciled with p as that step will do; nothing is written here)."""
        group = self._group_of(p)
        master, _ = _kinds(group, p)
        out = self._new_state_tensor(p)
        state = self.state.get(p) or {}
        if master == "none":
            return out.copy_(p.detach())
        pending = [e for e in self._masters_to_check if isinstance(e, tuple) and e[0] is p and self._pending_valid(e)]
        values = self._reconciled(*pending[-1]) if pending else {}
        held = {**state, **values}
        param = values.get("param", p.detach())
        fp32, remainder = held.get("master_param"), held.get("param_remainder")
        fp32 = fp32 if isinstance(fp32, torch.Tensor) and fp32.dtype is _F32 and fp32.shape == p.shape else None
        if not (isinstance(remainder, torch.Tensor) and remainder.dtype is torch.int16 and remainder.shape == p.shape
                and p.dtype is _BF16):
            remainder = None
        if master == "fp32" and fp32 is not None:
            return out.copy_(fp32)
        if master == "remainder" and remainder is None and fp32 is not None:  # converted at the next step
            converted = self._reconciled(p, "split", fp32)
            param, remainder = converted["param"], converted["param_remainder"]
        return out.copy_(param if remainder is None else
                         distributed.on_shards(remainder_join, param, remainder, like=p))

    def state_bytes(self) -> int:
        """The bytes of every tensor the optimizer holds in its state (masters, remainders, moments, int8 block
        scales, step counts), for all params; not the params themselves. DTensor state (FSDP2): the bytes of this
        rank's shards."""
        return sum(distributed.local_numel(t) * t.element_size() for held in self.state.values()
                   if isinstance(held, dict) for t in held.values() if isinstance(t, torch.Tensor))

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
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict) or not isinstance(
                state_dict.get("param_groups"), (list, tuple)):
            raise ValueError("the state dict must be a dict with a dict 'state' and a list 'param_groups' (what "
                             "optimizer.state_dict() returns)")
        saved_groups = state_dict["param_groups"]
        for gi, saved in enumerate(saved_groups):
            if not isinstance(saved, dict) or not isinstance(saved.get("params"), (list, tuple)):
                raise ValueError(f"param_groups[{gi}] of the loaded state dict must be a dict with a 'params' list")
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
            self._check_options(group, f"loaded param_groups[{len(groups)}]: ")
            groups.append(group)
        saved_state = state_dict["state"]
        state: defaultdict = defaultdict(dict)
        to_check: list = []
        mapped = set()
        for gi, (group, saved) in enumerate(zip(groups, saved_groups)):
            for i, (saved_id, p) in enumerate(zip(saved["params"], group["params"])):
                mapped.add(saved_id)
                if saved_id not in saved_state:
                    continue
                state[p] = self._loaded_state(group, gi, i, p, saved_state[saved_id], self.state.get(p) or {},
                                              to_check)
        for key, value in saved_state.items():  # state of no param is kept as it is, as torch does
            if key not in mapped:
                state[key] = value
        self.__setstate__({"state": state, "param_groups": groups})
        self._masters_to_check = to_check
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _loaded_state(self, group: dict, gi: int, i: int, p: torch.Tensor, saved, live: dict, pending: list) -> dict:
        """The state of p made from its saved state (checked against p; any layout, converted into the live
        group's) and its live state (values kept where the saved ones are torch's casts of them); what is left to
        reconcile with the param at the first step is added to `pending`."""
        name = f"{type(self).__name__}: {self._param_name(group, gi, i)}"
        if not isinstance(saved, dict):
            raise ValueError(f"{name}: the loaded state must be a dict, got {type(saved).__name__}")
        state = {}
        for key, value in saved.items():
            if isinstance(value, torch.Tensor) and value.is_meta:
                raise ValueError(f"{name}: the loaded state {key!r} is a meta tensor (it holds no values)")
            if key == "step":
                step = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(float(value))
                if step.numel() != 1:
                    raise ValueError(f"{name}: the loaded state 'step' must have one element, got shape "
                                     f"{tuple(step.shape)}")
                state[key] = step.to(device=p.device, dtype=torch.float32, copy=True).reshape(())
                if not (math.isfinite(float(state[key])) and float(state[key]) >= 0):  # a load may sync
                    raise ValueError(f"{name}: the loaded state 'step' must be a finite count >= 0, got "
                                     f"{float(state[key])}")
            elif key in _SHAPED_STATE or key in _SCALES:
                state[key] = self._loaded_tensor(name, key, p, value, live.get(key))
            else:
                state[key] = value.to(p.device) if isinstance(value, torch.Tensor) else copy.deepcopy(value)
        for key, (codes_key, scales_key, _) in _INT8_KEYS.items():
            if (codes_key in state) != (scales_key in state):
                raise ValueError(f"{name}: the loaded state has '{codes_key if codes_key in state else scales_key}' "
                                 f"without '{scales_key if codes_key in state else codes_key}' (int8 moments are "
                                 "codes and block scales)")
            codes = state.get(codes_key)
            if codes is not None and distributed.is_dtensor(p):
                # int8 codes of a whole tensor (an unsharded checkpoint) loaded into a shard: its blocks are not the
                # shard's; dequantized here, requantized in the shard's blocks by _to_layout
                if distributed.is_dtensor(codes) or distributed.is_dtensor(state[scales_key]):
                    raise ValueError(f"{name}: the loaded state has int8 '{codes_key}' as a DTensor: block scales "
                                     "of shards cannot be resharded (FusedAdam/W's state_dict() gives a DTensor "
                                     "param's int8 moments dequantized)")
                state[key] = dequantize_blockwise(state.pop(codes_key), state.pop(scales_key))
            elif codes is not None and not _same_order(codes, _state_strides(p)):
                # saved from a param of another memory order: its blocks are not p's; requantized in p's layout
                state[key] = dequantize_blockwise(state.pop(codes_key), state.pop(scales_key))
            elif codes is not None:
                state[codes_key] = _laid_out(codes, _state_strides(p))[0]
        master, _ = _kinds(group, p)
        live_master = live.get("master_param")
        if (master == "fp32" and "master_param" not in state and "param_remainder" not in state
                and isinstance(live_master, torch.Tensor) and live_master.dtype is _F32
                and live_master.shape == p.shape):
            # a checkpoint without masters (torch's): the live masters, still at hand, are kept where they round to
            # the param at the first step (remainders are not: they would pass that check whatever they hold)
            state["master_param"] = live_master
        pending += self._to_layout(group, p, state, loaded=True)
        return state

    def _loaded_tensor(self, name: str, key: str, p: torch.Tensor, value, live) -> torch.Tensor:
        """A copy of a loaded state tensor `key` on p's device in its own dtype (moments fp32 or bf16, masters fp32,
        remainders int16, codes int8 / uint8, scales fp32), checked (ValueError naming the parameter). Shaped state
        is laid out like p; int8 codes keep their saved layout (their block scales follow its memory order) until
        _loaded_state has compared it with p's."""
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name}: the loaded state '{key}' must be a tensor, got {type(value).__name__}")
        scales = key in _SCALES
        codes = key in ("exp_avg_codes", "exp_avg_sq_codes")
        if distributed.is_dtensor(p) and not (scales or codes) and value.shape == p.shape:
            # a whole tensor (an unsharded state dict) or a DTensor of another sharding: this rank's shard of it,
            # as a DTensor like p, so that what follows sees the live state's kind of tensor
            value = distributed.copy_into(self._new_state_tensor(p, value.dtype), value)
        if scales and value.shape != (int8_blocks(p.numel()),):
            raise ValueError(f"{name}: the loaded state '{key}' has shape {tuple(value.shape)}, but a parameter of "
                             f"{p.numel()} elements has {int8_blocks(p.numel())} int8 blocks of {INT8_BLOCK}")
        if not scales and value.shape != p.shape:
            raise ValueError(f"{name}: the loaded state '{key}' has shape {tuple(value.shape)}, but the "
                             f"parameter has shape {tuple(p.shape)}")
        if value.is_complex() or value.dtype is torch.bool:
            raise ValueError(f"{name}: the loaded state '{key}' has dtype {value.dtype}")
        if codes:
            if not is_non_overlapping_and_dense(value):
                raise ValueError(f"{name}: the loaded state '{key}' must be a dense tensor (its int8 blocks are runs "
                                 f"of its memory order), got strides {value.stride()}")
            want = codes_dtype(key == "exp_avg_codes")
            # torch's loader casts codes to the param's dtype: small integers, exact in every float dtype
            out = torch.empty_like(value, dtype=want, device=p.device)  # dense: the same strides
            return out.copy_(value.round() if value.is_floating_point() else value)
        if (isinstance(live, torch.Tensor) and live.shape == value.shape and live.dtype != value.dtype
                and value.dtype == p.dtype):
            # torch.optim.Optimizer.load_state_dict casts every state tensor to its param's dtype: the live tensors
            # it was cast from are exact wherever they round to the loaded values
            value = _keep_where_rounds_to(live, value)
        if key == "param_remainder":
            want = torch.int16
            if value.is_floating_point():
                value = value.round().clamp(-2**15, 2**15 - 1)
        elif scales or key == "master_param":
            want = value.dtype if key == "master_param" else _F32  # (a master not in fp32 is made anew)
        else:
            if not value.is_floating_point():
                raise ValueError(f"{name}: the loaded state '{key}' must be a floating-point tensor, got {value.dtype}")
            want = value.dtype if value.dtype in (_F32, _BF16) else _F32
        if scales:
            return torch.empty(value.shape, dtype=want, device=p.device).copy_(value)
        return distributed.copy_into(self._new_state_tensor(p, want), value)

    def _check_masters(self) -> None:
        """At the first step after a load: masters and remainders reconciled with the params (_reconciled)."""
        pending, self._masters_to_check = self._masters_to_check, []
        self._reconcile_all(pending)

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
                part = _grad_norm.sum_of_squares(grads, device)  # DTensor grads: summed over the ranks
                total = part if total is None else total + part.to(total.device)
            norm_sq = total
        norm = norm_sq.reshape(1).float().sqrt()
        if grad_scale is not None and not unscaled:
            norm = norm / grad_scale.reshape(1).to(norm.device)
        coef = _grad_norm.clip_coef(norm, self.max_grad_norm)
        return {device: coef.to(device) for device in grads_by_device}

    def _fit_layouts(self, group: dict, gi: int, i: int, p: torch.Tensor, g: torch.Tensor, state: dict, kind: str,
                     copy_back: list) -> tuple:
        """The slower path of one param whose grad or state is not laid out like it, or whose grad is not like it
        (see the module docstring): checks, lays the state out again where needed, and returns the (param, grad) the
        kernel runs on; a staged param is added to copy_back as (param, buffer). kind: the param's state kind, as
        step() chose it (from the whole param: p may be a DTensor's local shard here)."""
        name = f"{type(self).__name__}: {self._param_name(group, gi, i)}"
        if g.layout is not _STRIDED:
            raise RuntimeError(f"{name} has a sparse gradient; sparse gradients are not supported (use "
                               "torch.optim.SparseAdam)")
        if g.device != p.device:
            raise RuntimeError(f"{name}: the gradient is on {g.device}, the parameter on {p.device}")
        if g.shape != p.shape:
            raise RuntimeError(f"{name} has shape {tuple(p.shape)}, its gradient {tuple(g.shape)}")
        if g.dtype != p.dtype:
            raise RuntimeError(f"{name} is {p.dtype}, its gradient {g.dtype}: they must match (as torch.optim.AdamW "
                               "requires); after a cast of the param (p.data = ...), cast or clear its .grad too")
        self._check_state_shapes(group, gi, i, p, state)
        self._check_param(group, gi, i, p)
        exp_avg = state[_STATE_KEYS[kind][0]]
        if is_non_overlapping_and_dense(p):
            strides = p.stride()  # the state follows the param, once
        elif is_non_overlapping_and_dense(exp_avg):
            strides = exp_avg.stride()
        else:
            strides = _contiguous_strides(p.shape)
        for codes_key, scales_key, signed in _INT8_KEYS.values():
            codes = state.get(codes_key)
            if codes is not None and not _same_order(codes, strides):
                # the blocks are runs of memory order: a new order needs new blocks (one more quantization)
                value = _laid_out(dequantize_blockwise(codes, state[scales_key]), strides)[0]
                state[codes_key], state[scales_key] = quantize_blockwise(value, signed=signed)
        for key in _SHAPED_STATE:
            if key in state:
                state[key] = _laid_out(state[key], strides)[0]
        run_p, staged = _laid_out(p.detach(), strides)
        if staged:
            copy_back.append((p, run_p))
        return run_p, _laid_out(g, strides)[0]

    def _check_state_shapes(self, group: dict, gi: int, i: int, p: torch.Tensor, state: dict) -> None:
        """ValueError naming the parameter when its state was made for another shape."""
        for key in (*_SHAPED_STATE, *_SCALES):
            t = state.get(key)
            want = (int8_blocks(distributed.local_numel(p)),) if key in _SCALES else p.shape
            if t is not None and t.shape != want:
                name = f"{type(self).__name__}: {self._param_name(group, gi, i)}"
                raise ValueError(f"{name} has shape {tuple(p.shape)}, but its optimizer state '{key}' has shape "
                                 f"{tuple(t.shape)}: the parameter was resized after its state was made (give it "
                                 "fresh state with `del optimizer.state[param]`, or load state of its new shape)")

    def _check_sharded(self, group: dict, gi: int, i: int, p, g) -> None:
        """The checks of a DTensor param and its grad, every step, before any state is made for it. The common
        case -- a grad of the param's very mesh and placements (checked when the param's state was made), no
        main_grad -- costs two comparisons; anything else takes the full checks, which name the param."""
        if (type(g) is type(p) and g.device_mesh is p.device_mesh and g.placements == p.placements
                and getattr(p, "main_grad", None) is None):
            return
        name = f"{type(self).__name__}: {self._param_name(group, gi, i)}"
        distributed.check_grad(name, p, g)
        distributed.check_no_main_grad(name, p)

    @staticmethod
    def _local_views(p, g, state: dict) -> tuple:
        """(param, grad, state) of a DTensor param as this rank's local tensors, for the kernel. A DTensor state whose
        shard is not laid out like the param's shard is laid out again first, in the state itself (int8 codes of
        another memory order are quantized anew in the shard's blocks), so that the slower path (_fit_layouts),
        which works on these views, never needs to change the state.
        note: this runs for every sharded param every step (step() is under no_grad, so to_local() is the shard
        itself): the common case, every state shard laid out like the param's, is one stride comparison each."""
        lp = p.to_local()
        views = {k: v.to_local() if isinstance(v, distributed.DTensor) else v for k, v in state.items()}
        strides = lp.stride()
        if all(views[k].stride() == strides for k in _SHAPED_STATE if k in views) or \
                not is_non_overlapping_and_dense(lp):
            return lp, g.to_local(), views
        for codes_key, scales_key, signed in _INT8_KEYS.values():
            codes = state.get(codes_key)
            if codes is not None and not _same_order(views[codes_key], strides):
                value = distributed.on_shards(dequantize_blockwise, codes, state[scales_key], like=p)
                value = distributed.on_shards(lambda t: _laid_out(t, strides)[0], value, like=p)
                state[codes_key], state[scales_key] = distributed.on_shards(
                    lambda t: quantize_blockwise(t, signed=signed), value, like=p)
        for key in _SHAPED_STATE:
            t = state.get(key)
            if t is not None and distributed.local(t).stride() != strides:
                state[key] = distributed.on_shards(lambda x: _laid_out(x, strides)[0], t, like=p)
        return lp, g.to_local(), {k: distributed.local(v) for k, v in state.items()}

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

        # buckets: one op call per (group, device, master kind, state kind)
        # note: the per-param loop is the step's Python cost (a few hundred params a step): the common case --
        # param, grad and state of one layout -- is recognized by one stride/shape comparison, everything else
        # goes to _fit_layouts
        calls = []
        norm_grads: dict = {}
        scaled_grads: dict = {}
        states = self.state
        for gi, group in enumerate(self.param_groups):
            # every group's options again (a scheduler or a user may have set them), all before the first kernel
            # runs: a bad value in a later group refuses the whole step instead of leaving the earlier ones updated
            self._check_options(group, f"param_groups[{gi}]: ")
            amsgrad = group["amsgrad"]
            buckets: dict = {}
            copy_backs: dict = {}  # per bucket: the staged params to copy back after its call
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                master, kind = _kinds(group, p)
                m_key, v_key, m_dtype, _, m_scales_key, v_scales_key = _STATE_KEYS[kind]
                master_key = _MASTER_KEYS.get(master)
                sharded = type(p) is not torch.nn.Parameter and distributed.is_dtensor(p)
                if sharded:  # checked before any state is made for it
                    self._check_sharded(group, gi, i, p, g)
                state = states.get(p)
                exp_avg = state.get(m_key) if state else None
                # (a master held for a param that has none now -- the group's master_weights or the param's dtype
                # changed -- is dropped: kept, it would come back stale if the master kind came back)
                if (exp_avg is None or exp_avg.dtype is not m_dtype or (amsgrad and "max_exp_avg_sq" not in state)
                        or (master_key not in state if master_key is not None
                            else "master_param" in state or "param_remainder" in state)):
                    if state:
                        self._check_state_shapes(group, gi, i, p, state)
                    self._check_param(group, gi, i, p)
                    state = self._init_state(group, p)
                    exp_avg = state[m_key]
                if clipping:
                    norm_grads.setdefault(g.device, []).append(g)  # as it is: a DTensor's norm is summed over ranks
                if sharded:  # the kernel runs on this rank's shards (mixprec.distributed)
                    p, g, state = self._local_views(p, g, state)
                    exp_avg = state[m_key]
                key = (p.device, master, kind)
                strides = p.stride()
                if g.layout is _STRIDED and strides == exp_avg.stride() and g.stride() == strides and \
                        p.shape == exp_avg.shape and g.dtype is p.dtype and g.device == p.device:
                    run_p, run_g = p, g
                else:
                    run_p, run_g = self._fit_layouts(group, gi, i, p, g, state, kind, copy_backs.setdefault(key, []))
                    exp_avg = state[m_key]
                b = buckets.get(key)
                if b is None:
                    b = buckets[key] = AdamLists()
                b.params.append(run_p)
                b.grads.append(run_g)
                b.exp_avgs.append(exp_avg)
                b.exp_avg_sqs.append(state[v_key])
                b.steps.append(state["step"])
                if amsgrad:
                    b.max_exp_avg_sqs.append(state["max_exp_avg_sq"])
                if m_scales_key is not None:
                    b.exp_avg_scales.append(state[m_scales_key])
                    b.exp_avg_sq_scales.append(state[v_scales_key])
                if master == "fp32":
                    b.master_params.append(state["master_param"])
                elif master == "remainder":
                    b.param_remainders.append(state["param_remainder"])
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
            adam_step_of_optimizer_(
                lists, lr=self._lr_tensor(gi, group["lr"], device), beta1=beta1, beta2=beta2,
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
        # (anything but True is refused by _check_options: _always_decoupled)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, decoupled_weight_decay=decoupled_weight_decay,
                         **kwargs)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # as torch.optim.AdamW does: whatever an older state dict said
            group["decoupled_weight_decay"] = True


def step_traffic(optimizer: FusedAdam, *, per_array: bool = False):
    """The bytes one ``optimizer.step()`` reads and writes in its fused pass, counted from the tensors it touches
    with the layouts the optimizer gives them (params without a grad are skipped, as step() skips them): the grad
    read; the param read (unless an fp32 master stands in for it) and written; every state tensor read and written
    (masters, remainders, moments, int8 block scales, the step counts). Not counted: the extra passes that some
    options add (unscale_grads=True: the grads read and written; max_grad_norm without a norm from
    mixprec.amp.GradScaler: the grads read) and the copies of the slower path for odd layouts.

    per_array=True: instead of the total, a list of (read_bytes, write_bytes), one per kind of array summed over
    the params (read and written in place: equal sizes; else read-only or write-only), the layout
    mixprec.benchmarks.ceiling.cpu_stream(arrays=...) takes to time a streaming loop with the same pattern."""
    arrays: dict = {}

    def add(role: str, read: int, write: int) -> None:
        r, w = arrays.get(role, (0, 0))
        arrays[role] = (r + read, w + write)

    for group in optimizer.param_groups:
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            n = distributed.local_numel(p)  # this rank's shard of a DTensor param
            master, kind = _kinds(group, p)
            add("grad", n * g.element_size(), 0)
            if master == "fp32":
                add("param (written)", 0, n * p.element_size())
                add("master_param", 4 * n, 4 * n)
            else:
                add("param", n * p.element_size(), n * p.element_size())
            if master == "remainder":
                add("param_remainder", 2 * n, 2 * n)
            m_key, v_key, m_dtype, v_dtype, m_scales, v_scales = _STATE_KEYS[kind]
            for key, dtype in ((m_key, m_dtype), (v_key, v_dtype)) + (
                    (("max_exp_avg_sq", v_dtype),) if group["amsgrad"] else ()):
                size = n * dtype.itemsize
                add(key, size, size)
            if m_scales is not None:
                for key in (m_scales, v_scales):
                    add(key, 4 * int8_blocks(n), 4 * int8_blocks(n))
            add("step", 4, 4)
    if per_array:
        return [rw for rw in arrays.values() if rw != (0, 0)]
    return sum(r + w for r, w in arrays.values())
