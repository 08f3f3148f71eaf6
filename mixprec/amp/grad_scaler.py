"""mixprec.amp.GradScaler: dynamic loss scaling whose unscale, overflow check and gradient norm are one pass.

A drop-in for torch.amp.GradScaler, and a subclass of it (same methods and private entry points, same
state_dict keys, the same scale trajectory with default arguments down to 2**-126, where torch's goes on to a
scale whose reciprocal overflows) that also

- unscales every gradient of an optimizer, whatever the dtype mix (fp16 gradients of pure-fp16 models
  included, which torch refuses), with ONE call of mixprec.ops.unscale_and_check_, which also sums the
  squares of the unscaled gradients, so clipping needs no second pass (grad_norm, clip_grad_norm_);
- backs off only after `hysteresis` overflowing steps and keeps the scale within [min_scale, max_scale], as
  DeepSpeed's and Megatron's scalers do, still on the device and without a host sync;
- keeps overflow diagnostics on the device (the last `history` (scale, overflow) pairs, the number of skipped
  steps, opt-in per-tensor overflow counts) and reads them only when asked (history(), skipped_steps(),
  overflow_report()), warning once when the scale is stuck at its floor (mixprec.amp.diagnostics);
- checks everything it is given (constructor, load_state_dict, update(new_scale)), and unscales each distinct
  gradient once, any strided layout;
- all-reduces found_inf (MAX) when torch.distributed is initialized, so all ranks skip the same steps;
- takes FSDP2's sharded (DTensor) gradients: the pass runs on each rank's shards, and the sum of squares is
  summed over the ranks the gradients are sharded on, so grad_norm() and clipping see the global norm
  (mixprec.distributed).
"""
from __future__ import annotations

import inspect
import math
import numbers
import warnings
from collections import abc, defaultdict
from typing import Any

import torch
from torch.amp.grad_scaler import OptState

from mixprec import _grad_norm, distributed
from mixprec.amp.diagnostics import OverflowMonitor, OverflowReport
from mixprec.ops._validate import FLOAT_DTYPES

# Keys of torch.amp.GradScaler.state_dict(); mixprec adds its own keys beside them (torch ignores unknown keys).
_TORCH_STATE_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")

# note: the scale's range. Below 2**-126 (the smallest normal float32) the scale is subnormal, and below ~2.9e-39
# its reciprocal overflows float32, so unscale_ would multiply every grad by inf: 144 overflowing steps in a row
# take the default scale (2**16, backoff 0.5) to 2**-128, and the next clean step writes inf into every weight
# (torch's scaler does). The update never goes below the floor (nor past float32's largest value, which torch
# already ensures), and every scale given to the scaler is checked against the same range.
_SCALE_FLOOR = torch.finfo(torch.float32).tiny  # 2**-126: its reciprocal, 2**126, is finite
_SCALE_MAX = torch.finfo(torch.float32).max


class _StateError(RuntimeError, AssertionError):
    """A call out of order (before scale(), update() or step() without inf checks, pickling mid-iteration): a
    RuntimeError, and also the AssertionError torch's scaler raises there, so code written for either catches it."""


def _fresh_optimizer_state() -> dict[str, Any]:
    # The keys torch uses ("stage", "found_inf_per_device") are kept: some training libraries read them.
    return {"stage": OptState.READY, "found_inf_per_device": {}, "norm_sq": None, "grads": None, "optimizer": None}


class GradScaler(torch.amp.GradScaler):
    """Dynamic loss scaling with mixprec's fused unscale + overflow check + gradient norm.

    Use it exactly as torch.amp.GradScaler::

        scaler = mixprec.amp.GradScaler("cuda")
        for batch in data:
            optimizer.zero_grad()
            scaler.scale(loss_fn(model(batch))).backward()
            scaler.unscale_(optimizer)                  # optional; one pass over the grads
            scaler.clip_grad_norm_(optimizer, 1.0)      # optional; uses the norm from that same pass
            scaler.step(optimizer)                      # skipped when a grad held inf/NaN
            scaler.update()

    Arguments as torch.amp.GradScaler's (device, init_scale, growth_factor, backoff_factor, growth_interval,
    enabled), plus, keyword only:

    hysteresis (int, default 1): back off only on the `hysteresis`-th overflowing step. With
        consecutive_hysteresis=True (default) the count restarts at every clean step, so the scale backs off
        after `hysteresis` consecutive overflows (DeepSpeed's consecutive_hysteresis=True); with False the
        overflows are counted down between growths (DeepSpeed's and Megatron's default). Once the count is
        spent every further overflow backs off until it is refilled. Steps with an overflow are skipped
        either way, and always restart the growth interval.
    min_scale, max_scale (float or None, default None): bounds of the scale. None: float32's normal range,
        [2**-126, float32's largest], where torch is unbounded (see "Scale range"). DeepSpeed users set
        min_scale=1.0.
    history (int, default 64): how many (scale, overflowed) pairs the device-side ring buffer keeps.
    track_overflow (bool, default False): also count, per tensor and on the device, the steps in which each
        gradient held inf/NaN (a flag written by the same fused pass), for overflow_report().
    min_scale_patience (int, default 3): warn once, with an overflow report, when this many overflowing steps
        have been taken at min_scale, or at the floor 2**-126 without one (the scale cannot back off any further).
    process_group: all-reduce found_inf (MAX) over this group. By default, whenever torch.distributed is
        initialized: over the default group, or, for DTensor grads on a mesh that is not the whole world, over
        that mesh (mixprec.distributed.found_inf_groups). Needed so ranks skip the same steps when gradients
        differ per rank (sharded gradients: FSDP, ZeRO). Sharded gradients: DTensor grads (FSDP2, HSDP) are
        unscaled on each rank's shards and their sum of squares is SUM-reduced over the mesh dimensions they are
        sharded on, in the same pass (one all-reduce of one number), so grad_norm() and clip_grad_norm_ are
        global; gradients sharded by hand as plain tensors (ZeRO) give this rank's own norm: all-reduce it
        yourself (SUM of squares).

    All arguments are checked even when disabled (torch checks its factors only when enabled), and so is
    everything load_state_dict and update(new_scale) take: ValueError naming the field.

    Growth counts as torch's does: the scale grows on the `growth_interval`-th consecutive clean step
    (DeepSpeed's scale_window counts one more). With hysteresis=1 and no bounds the update is
    torch._amp_update_scale_ itself, so the scale trajectory equals torch.amp.GradScaler's wherever torch's stays
    at or above 2**-126.

    Scale range: the scale never goes below 2**-126, the smallest normal float32, by itself. Below it 1/scale
    overflows float32 (from ~2.9e-39), so torch's scaler, after 144 overflowing steps in a row from the default
    2**16, multiplies the grads of the next clean step by inf and writes inf/NaN into every weight. Here the
    update clamps the scale to that floor, on the device; steps that still overflow there are skipped, counted,
    and warned about once (after min_scale_patience of them) by get_scale(), skipped_steps() and
    overflow_report(), and by update() itself when min_scale is set. Growth past float32's largest value is
    dropped, as torch drops it. init_scale, min_scale, max_scale, a loaded scale and new_scale must lie in that
    range.

    Overflow when unscaling: with a scale below 1 (chosen, or the floor) a finite scaled grad can overflow once
    unscaled (at 2**-126 any |grad| > 4 in fp32). torch's scaler checks the scaled values only and steps, writing
    inf/NaN into the weights (or, with a fused optimizer, into the weights and moments). Here such a step counts
    as overflowing: skipped, and the scale backs off (the one place the decision, and the trajectory, differ
    from torch's above 2**-126). unscale_ flags every unscaled value that is non-finite as written; the check
    pass before a fused optimizer's step flags grad * (1 / scale) non-finite in fp32, what its kernel computes.

    A subclass of torch.amp.GradScaler (isinstance holds), with torch's private entry points, signatures and
    results: _unscale_grads_, _check_inf_per_device, _found_inf_per_device, _get_scale_async, _maybe_opt_step
    (TransformerEngine's FusedAdam, torch's own fused optimizers and FSDP-style subclasses use them); all of them
    run mixprec's fused pass. Every distinct gradient is unscaled once, even when a param is listed twice or
    params share a grad tensor (torch's scaler unscales such a grad twice). Errors where torch's scaler raises
    AssertionError (calls out of order) are RuntimeErrors that are also AssertionErrors.

    Gradient norm for optimizers: unscale_(optimizer) (or step(optimizer) on an optimizer that unscales in
    its own kernel) hands the sum of squares of the unscaled gradients to the optimizer as
    ``optimizer._mixprec_grad_norm_sq``, which mixprec.optim reads for max_grad_norm, so that clipping costs
    no extra pass; mixprec._grad_norm documents that protocol.

    Host syncs: scale, unscale_, grad_norm, clip_grad_norm_, update, and step for optimizers with
    ``_step_supports_amp_scaling`` (torch's fused Adam/SGD, mixprec.optim) never read a device value on the
    host; step for other optimizers reads found_inf once, as torch's does, to decide whether to call
    optimizer.step(). get_scale, state_dict, history, skipped_steps and overflow_report read on request.
    """

    def __init__(self, device: str = "cuda", init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000, enabled: bool = True, *,
                 hysteresis: int = 1, consecutive_hysteresis: bool = True, min_scale: float | None = None,
                 max_scale: float | None = None, history: int = 64, track_overflow: bool = False,
                 min_scale_patience: int = 3, process_group=None) -> None:
        self._device = device.type if isinstance(device, torch.device) else device
        self._enabled = bool(enabled)
        if self._device == "cuda" and self._enabled and not torch.cuda.is_available():
            warnings.warn("mixprec.amp.GradScaler is enabled, but CUDA is not available. Disabling.", stacklevel=2)
            self._enabled = False
        _check_factor("growth_factor", growth_factor, above_one=True)
        _check_factor("backoff_factor", backoff_factor, above_one=False)
        _check_int("growth_interval", growth_interval, 1)
        _check_int("hysteresis", hysteresis, 1)
        _check_int("history", history, 1)
        _check_int("min_scale_patience", min_scale_patience, 1)
        _check_scale("min_scale", min_scale, optional=True)
        _check_scale("max_scale", max_scale, optional=True)
        _check_scale("init_scale", init_scale, within=(min_scale, max_scale))
        # torch's constructor, for any attribute of its own it sets; everything it sets is set again below.
        super().__init__(self._device, init_scale, growth_factor, backoff_factor, growth_interval, self._enabled)

        self._growth_factor = float(growth_factor)
        self._backoff_factor = float(backoff_factor)
        self._growth_interval = int(growth_interval)
        self._hysteresis = int(hysteresis)
        self._consecutive_hysteresis = bool(consecutive_hysteresis)
        self._min_scale = None if min_scale is None else float(min_scale)
        self._max_scale = None if max_scale is None else float(max_scale)
        self._process_group = process_group
        self._diagnostics = OverflowMonitor(int(history), bool(track_overflow), int(min_scale_patience))

        # Host values the device tensors start from, at the first scale() (torch creates them lazily too, on
        # the device of the first output); load_state_dict() and unpickling set them.
        self._init_scale = float(init_scale)
        self._init_growth_tracker = 0
        self._init_hysteresis_left = self._hysteresis

        self._scale: torch.Tensor | None = None  # fp32, 0-dim (the names of torch's scaler, read by some libraries)
        self._growth_tracker: torch.Tensor | None = None  # int32: consecutive clean steps
        self._hysteresis_left: torch.Tensor | None = None  # int32: overflows still tolerated before backing off

        self._per_optimizer_states: dict[int, dict[str, Any]] = defaultdict(_fresh_optimizer_state)

    # ----------------------------------------------------------------------------------------- device state
    def _lazy_init_scale_growth_tracker(self, dev: torch.device) -> None:
        def full(value, dtype):
            return torch.full((), value, dtype=dtype, device=dev)

        self._scale = full(self._init_scale, torch.float32)
        self._growth_tracker = full(self._init_growth_tracker, torch.int32)
        self._hysteresis_left = full(self._init_hysteresis_left, torch.int32)
        self._diagnostics.materialize(dev)

    def _check_scale_growth_tracker(self, funcname: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self._scale is None:
            raise _StateError(f"GradScaler.{funcname}() called before the scale exists: call "
                              "scaler.scale(loss) earlier in the iteration")
        return self._scale, self._growth_tracker

    def _host_state(self) -> dict[str, float]:
        """The scale and its counters as Python numbers, read in one transfer."""
        if self._scale is None:
            return {"scale": self._init_scale, "growth_tracker": self._init_growth_tracker,
                    "hysteresis_left": self._init_hysteresis_left}
        values = torch.stack([t.double() for t in (self._scale, self._growth_tracker, self._hysteresis_left)])
        scale, tracker, left = values.tolist()
        return {"scale": scale, "growth_tracker": int(tracker), "hysteresis_left": int(left)}

    # ------------------------------------------------------------------------------------------------ scale
    def scale(self, outputs):
        """Multiply a tensor, or the tensors of nested lists, tuples, dicts and other iterables, by the scale.

        Returns the same structure (a lazy map for iterables other than lists, tuples and dicts, as torch
        does; dicts are an addition: torch maps over their keys). A pass-through when disabled.
        """
        if not self._enabled:
            return outputs
        scale_on: dict[torch.device, torch.Tensor] = {}  # one copy of the scale per device, made once

        def apply(val):
            if isinstance(val, torch.Tensor):
                if self._scale is None:
                    self._lazy_init_scale_growth_tracker(val.device)
                if val.device not in scale_on:
                    scale_on[val.device] = self._scale.to(val.device, non_blocking=True)
                return val * scale_on[val.device]
            if isinstance(val, (str, bytes)):  # iterables of themselves: would recurse forever
                raise ValueError(f"outputs must be tensors or iterables of tensors, got {type(val).__name__}")
            if isinstance(val, abc.Mapping):
                if isinstance(val, abc.MutableMapping):
                    out = val.copy() if hasattr(val, "copy") else dict(val)  # keeps OrderedDict, defaultdict
                    for k in val:
                        out[k] = apply(val[k])
                    return out
                return {k: apply(v) for k, v in val.items()}
            if isinstance(val, abc.Iterable):
                scaled = map(apply, val)
                if isinstance(val, tuple) and hasattr(val, "_fields"):  # namedtuple
                    return type(val)(*scaled)
                if isinstance(val, (list, tuple)):
                    return type(val)(scaled)
                return scaled
            raise ValueError(f"outputs must be a Tensor or an iterable of Tensors, got {type(val).__name__}")

        return apply(outputs)

    # -------------------------------------------------------------------------------------- unscale, check
    def _collect_grads(self, optimizer, allow_fp16: bool = True):
        """(all params, positions of those with a grad, those grads, their device), checked.

        Each distinct grad is taken once: a param listed twice, or params sharing one grad tensor, would otherwise
        be unscaled twice (torch's scaler divides such a grad by the scale squared). Strided views with gaps are
        kept as they are (mixprec.ops unscales them through a dense copy)."""
        params, present, grads = [], [], []
        seen: set[int] = set()
        device, first = None, None
        for gi, group in enumerate(optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                params.append(p)
                if p.grad is None:
                    continue
                name = f"optimizer.param_groups[{gi}]['params'][{pi}].grad"
                if not allow_fp16 and p.grad.dtype == torch.float16:
                    raise ValueError("Attempting to unscale FP16 gradients.")  # torch's error, for its flag
                if p.grad.is_sparse and not p.grad.is_coalesced():
                    # Duplicate indices would be summed by the optimizer: unscale, check and square the sums.
                    p.grad = p.grad.coalesce()
                g = p.grad
                if id(g) in seen:
                    continue
                seen.add(id(g))
                if g.is_sparse:
                    g = g._values()
                elif g.layout != torch.strided:
                    raise TypeError(f"{name} has layout {g.layout}; GradScaler handles dense and sparse COO grads")
                if g.dtype not in FLOAT_DTYPES:
                    raise TypeError(f"{name} has dtype {g.dtype}; GradScaler unscales float32, float16 and "
                                    "bfloat16 gradients")
                if device is None:
                    device, first = g.device, name
                elif g.device != device:
                    raise ValueError(f"{name} is on {g.device} but {first} is on {device}: GradScaler needs all "
                                     "gradients of one optimizer on one device (use one optimizer per device)")
                distributed.check_placements(name, g)  # FSDP2's shards; not Partial (unreduced) grads
                present.append(len(params) - 1)
                grads.append(g)
        return params, present, grads, device

    def _distributed(self) -> bool:
        import torch.distributed as dist

        return self._process_group is not None or (dist.is_available() and dist.is_initialized())

    def _unscale_grads_(self, optimizer: torch.optim.Optimizer, inv_scale: torch.Tensor, found_inf: torch.Tensor,
                        allow_fp16: bool) -> dict[torch.device, torch.Tensor]:
        """torch's entry point, with torch's signature and result: multiply the optimizer's grads by inv_scale and
        check them for inf/NaN, in mixprec's one fused pass (which also sums their squares, kept for unscale_).

        Returns {device: flag}, the flag a copy of found_inf (found_inf itself is left as it is, as torch leaves
        it) set to 1.0 when a grad held inf/NaN; {} when the optimizer has no grads, as torch (unless ranks must
        agree: under torch.distributed every rank returns one flag, as torch's ShardedGradScaler does).
        allow_fp16=False refuses fp16 grads with torch's ValueError; unscale_ passes True. Libraries call it, and
        subclasses may override it: unscale_ and _check_inf_per_device go through it, as torch's do.

        The flag is also raised by a finite grad whose unscaled value overflows (a scale below 1; torch's is not:
        mixprec.ops.unscale_and_check_). Called by _check_inf_per_device (torch passes a multiplier of 1.0 there:
        the grads stay scaled), the pass is a check_only pass by the scale's real reciprocal, which that method
        leaves in the optimizer's state for the call ("check_inv_scale"), so the flag sees the overflow of the
        optimizer's own unscale."""
        params, present, grads, device = self._collect_grads(optimizer, allow_fp16)
        state = self._per_optimizer_states[id(optimizer)]
        if device is None and not self._distributed():
            norm_device = self._scale.device if self._scale is not None else found_inf.device
            state.update(norm_sq=torch.zeros((), dtype=torch.float32, device=norm_device), grads=[],
                         optimizer=optimizer)
            return {}
        if device is None:
            device = self._scale.device if self._scale is not None else found_inf.device
        found = found_inf.to(device, copy=True, non_blocking=True)
        norm_sq = torch.zeros((), dtype=torch.float32, device=device)
        flags = self._diagnostics.per_tensor_flags(optimizer, params, len(grads), device)
        check_inv_scale = state.get("check_inv_scale")
        if check_inv_scale is not None:
            inv_scale = check_inv_scale
        with torch.no_grad():
            # DTensor grads (FSDP2): the kernel runs on the local shards, and norm_sq is summed over the ranks
            distributed.unscale_and_check_(grads, inv_scale.to(device, non_blocking=True), found, norm_sq,
                                           per_tensor_inf=flags, check_only=check_inv_scale is not None)
        self._diagnostics.fold_flags(optimizer, present, flags)
        state.update(norm_sq=norm_sq, grads=grads, optimizer=optimizer)
        if self._distributed():
            # every rank returns the one global flag, as torch's does for DTensor grads (its dispatch MAX-reduces
            # found_inf inside the op): over the mesh of sharded grads, else the process group / default group.
            # note: every rank must call this with grads of the same meshes (FSDP2 gives every rank a shard of
            # every param): a rank with none reduces over the default group and would wait for the others
            distributed.all_reduce_found_inf_(found, grads, self._process_group)
        return {device: found}

    def _finish_check(self, optimizer, found_inf_per_device: dict) -> None:
        """After a pass (whose flags _unscale_grads_ has made global): record found_inf, publish the unscaled sum of
        squares."""
        state = self._per_optimizer_states[id(optimizer)]
        state["found_inf_per_device"] = found_inf_per_device
        if state["norm_sq"] is not None:
            _grad_norm.publish(optimizer, state["norm_sq"])

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Unscale the optimizer's gradients in place, check them for inf/NaN and sum their squares: one pass.

        At most once per optimizer between update()s, before step() (RuntimeError otherwise, as torch); a no-op
        when disabled. Afterwards grad_norm(optimizer), clip_grad_norm_(optimizer, ...) and
        ``optimizer._mixprec_grad_norm_sq`` are available. Gradients of any float dtype mix are accepted, fp16
        included, and any strided layout. No host sync.
        """
        if not self._enabled:
            return
        self._check_scale_growth_tracker("unscale_")
        state = self._per_optimizer_states[id(optimizer)]
        if state["stage"] is OptState.UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
        if state["stage"] is OptState.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        # As torch: fp32 division can be imprecise under some compile options, so the reciprocal is taken in fp64.
        inv_scale = self._scale.double().reciprocal().float()
        found_inf = torch.zeros((), dtype=torch.float32, device=self._scale.device)
        state["norm_sq"] = None  # set by the pass (an override of _unscale_grads_ may not make one)
        self._finish_check(optimizer, self._unscale_grads_(optimizer, inv_scale, found_inf, True))
        state["stage"] = OptState.UNSCALED

    def _check_inf_per_device(self, optimizer: torch.optim.Optimizer) -> dict[torch.device, torch.Tensor]:
        """torch's entry point: check (and measure) the still-scaled grads of an optimizer that unscales them
        itself; returns {device: found_inf} (TransformerEngine's FusedAdam indexes it by its params' device).

        The pass only reads the grads (check_only). Its sum of squares is of the scaled grads, in fp32, and is
        brought to the unscaled grads' after (in fp64: 1/scale**2 can underflow fp32), so it overflows to inf only
        when the scaled grads' sum of squares exceeds fp32's range (~3e38). Its flag is raised where grad * (1 /
        scale) in fp32 is inf or NaN: what the fused optimizers' kernels compute (their grad factor is 1 / grad_scale
        in fp32, times a clipping coefficient <= 1), so a finite scaled grad that overflows when unscaled (a scale
        below 1) skips the step instead of writing inf/NaN into the weights and moments. torch's check sees the
        scaled values only."""
        scale, _ = self._check_scale_growth_tracker("_check_inf_per_device")
        state = self._per_optimizer_states[id(optimizer)]
        state["norm_sq"] = None
        ones = torch.ones((), dtype=torch.float32, device=scale.device)
        # The kernels' 1 / grad_scale is one fp32 division: the fp64 reciprocal rounded once is the same bits (a
        # double rounding through fp64 is exact for a division of fp32 values).
        state["check_inv_scale"] = scale.double().reciprocal().float()
        try:
            found = self._unscale_grads_(optimizer, ones, torch.zeros_like(ones), True)
        finally:
            state.pop("check_inv_scale", None)
        norm_sq = state["norm_sq"]
        if norm_sq is not None:
            inv = scale.double().reciprocal().to(norm_sq.device, non_blocking=True)
            norm_sq.copy_(norm_sq.double() * inv * inv)
        self._finish_check(optimizer, found)
        return found

    def _found_inf_per_device(self, optimizer: torch.optim.Optimizer) -> dict[torch.device, torch.Tensor]:
        """torch's entry point: this iteration's {device: found_inf} of the optimizer (after unscale_, step or
        _check_inf_per_device). The tensors are the ones step() and update() read: flags written into them in
        place (an all-reduce, say) are honoured."""
        return self._per_optimizer_states[id(optimizer)]["found_inf_per_device"]

    def _get_scale_async(self) -> torch.Tensor | None:
        """torch's entry point: the scale tensor itself (0-dim fp32 on the device; None before the first scale())."""
        return self._scale

    # ----------------------------------------------------------------------------------------------- step
    def step(self, optimizer: torch.optim.Optimizer, *args, **kwargs):
        """Unscale (unless unscale_ was called) and call optimizer.step(*args, **kwargs) unless a grad held inf/NaN.

        Returns what optimizer.step returns, None when skipped. Optimizers with
        ``_step_supports_amp_scaling`` get ``optimizer.grad_scale`` (None if unscale_ was called) and
        ``optimizer.found_inf`` for the duration of their step() and unscale and skip in their own kernel, as
        with torch's scaler; no sync. A `closure` keyword is refused while enabled, as torch does. An optimizer
        without any grad raises torch's "No inf checks were recorded for this optimizer." (a RuntimeError that is
        also the AssertionError torch raises).
        """
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
        self._check_scale_growth_tracker("step")
        state = self._per_optimizer_states[id(optimizer)]
        if state["stage"] is OptState.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")

        if getattr(optimizer, "_step_supports_amp_scaling", False):
            return self._step_in_optimizer(optimizer, state, args, kwargs)

        if state["stage"] is OptState.READY:
            self.unscale_(optimizer)
        if not state["found_inf_per_device"]:
            raise _StateError("No inf checks were recorded for this optimizer: none of its parameters has a "
                              "gradient (call scaler.step only after a backward pass that reaches them)")
        retval = self._maybe_opt_step(optimizer, state, *args, **kwargs)
        state["stage"] = OptState.STEPPED
        return retval

    def _maybe_opt_step(self, optimizer: torch.optim.Optimizer, optimizer_state: dict[str, Any], *args, **kwargs):
        """torch's hook (some subclasses override it): call optimizer.step unless a found_inf is set. The one host
        read of the scaler, as torch's: whether to call optimizer.step() at all."""
        if not any(bool(found) for found in optimizer_state["found_inf_per_device"].values()):
            return optimizer.step(*args, **kwargs)
        return None

    def _step_in_optimizer(self, optimizer, state, args, kwargs):
        """torch's contract for optimizers that unscale and skip inside their kernel."""
        takes_scaler = "grad_scaler" in inspect.signature(optimizer.step).parameters
        if takes_scaler:
            warnings.warn("GradScaler is going to stop passing itself as a keyword argument to the passed "
                          "optimizer. In the near future GradScaler registers `grad_scale: Tensor` and "
                          "`found_inf: Tensor` to the passed optimizer and let the optimizer use them directly.",
                          FutureWarning, stacklevel=3)
            kwargs = {**kwargs, "grad_scaler": self}
        else:
            if state["stage"] is OptState.READY:
                self._check_inf_per_device(optimizer)
            found = [f.to(self._scale.device, non_blocking=True).reshape(())
                     for f in state["found_inf_per_device"].values()]
            # After unscale_ the grads are already unscaled: hand over what the user set, normally nothing.
            optimizer.grad_scale = (getattr(optimizer, "grad_scale", None) if state["stage"] is OptState.UNSCALED
                                    else self._scale * getattr(optimizer, "grad_scale", 1))
            # No grads: a clean flag (torch hands over the int 0, which torch's fused kernels cannot take).
            optimizer.found_inf = (found[0] if len(found) == 1 else torch.stack(found).sum() if found
                                   else torch.zeros((), dtype=torch.float32, device=self._scale.device))
        try:
            retval = optimizer.step(*args, **kwargs)
        finally:
            if not takes_scaler:
                del optimizer.grad_scale
                del optimizer.found_inf
        state["stage"] = OptState.STEPPED
        return retval

    # ------------------------------------------------------------------------------------- norm, clipping
    def _grads_and_norm_sq(self, optimizer, caller: str) -> tuple[list[torch.Tensor], torch.Tensor]:
        if not self._enabled:
            # Nothing was unscaled: measure the grads as they are.
            _, _, grads, device = self._collect_grads(optimizer)
            return grads, _grad_norm.sum_of_squares(grads, device if device is not None else torch.device("cpu"))
        state = self._per_optimizer_states.get(id(optimizer))
        if state is None or state["norm_sq"] is None:
            raise RuntimeError(f"GradScaler.{caller}(optimizer) needs this iteration's unscaled gradients: call "
                               "scaler.unscale_(optimizer) first")
        return state["grads"], state["norm_sq"]

    def grad_norm(self, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """The 2-norm of the optimizer's unscaled gradients (as clipped, if clip_grad_norm_ clipped them), from
        the unscale_ pass: a 0-dim float32 tensor on the gradients' device, no sync. inf/NaN after an overflow.
        Valid from unscale_ (or step) until update(); when disabled, measured from the gradients on each call.
        """
        return self._grads_and_norm_sq(optimizer, "grad_norm")[1].sqrt()

    def clip_grad_norm_(self, optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_(params, max_norm) for the optimizer's grads, after unscale_, without
        measuring them again: the grads are multiplied by torch's clip coefficient (mixprec._grad_norm.clip_coef),
        one foreach multiply per dtype with the coefficient on the device. Returns the total norm before
        clipping (0-dim fp32, no sync)."""
        if self._enabled:
            state = self._per_optimizer_states.get(id(optimizer))
            if state is None or state["stage"] is not OptState.UNSCALED:
                raise RuntimeError("GradScaler.clip_grad_norm_(optimizer) clips unscaled gradients: call "
                                   "scaler.unscale_(optimizer) before it, and before step()")
        grads, norm_sq = self._grads_and_norm_sq(optimizer, "clip_grad_norm_")
        total = norm_sq.sqrt()
        coef = _grad_norm.clip_coef(total, float(max_norm))
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
        for g in grads:
            by_dtype[g.dtype].append(distributed.local(g))
        with torch.no_grad():
            for same_dtype in by_dtype.values():
                torch._foreach_mul_(same_dtype, coef)
            norm_sq.mul_(coef * coef)  # it is also the published sum: optimizers must see the clipped grads' norm
        return total

    # --------------------------------------------------------------------------------------------- update
    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        """Update the scale on the device from this iteration's overflow checks (no sync), or set it.

        An overflow (in any optimizer) backs the scale off by backoff_factor once the hysteresis is spent;
        growth_interval consecutive clean steps grow it by growth_factor; the result is kept within
        [min_scale, max_scale] (by default float32's normal range: see the class docstring), and a growth that
        would overflow fp32 is dropped, as torch does. The step is recorded in the history.

        new_scale (a number, or a one-element tensor on the scaler's device type) is taken instead and records
        nothing; it must be a finite number within [min_scale, max_scale] (by default [2**-126, float32's
        largest]), else ValueError and the scale is left as it was. A tensor is read on the host to be checked
        (one sync; torch copies it unchecked). A no-op when disabled.
        """
        if not self._enabled:
            return
        scale, _ = self._check_scale_growth_tracker("update")
        if new_scale is not None:
            if isinstance(new_scale, torch.Tensor):
                if new_scale.device.type != self._device or new_scale.numel() != 1 or new_scale.requires_grad:
                    raise ValueError(f"new_scale must be a float or a one-element tensor on {self._device} that "
                                     f"does not require grad, got shape {tuple(new_scale.shape)} on "
                                     f"{new_scale.device}, requires_grad={new_scale.requires_grad}")
                _check_scale("new_scale", new_scale.item(), within=(self._min_scale, self._max_scale))
                scale.copy_(new_scale.reshape(()))
            elif isinstance(new_scale, numbers.Real) and not isinstance(new_scale, bool):
                _check_scale("new_scale", new_scale, within=(self._min_scale, self._max_scale))
                scale.fill_(float(new_scale))
            else:
                raise TypeError(f"new_scale must be a float or a tensor, got {type(new_scale).__name__}")
        else:
            found_infs = [f.to(scale.device, non_blocking=True).reshape(())
                          for state in self._per_optimizer_states.values()
                          for f in state["found_inf_per_device"].values()]
            if not found_infs:
                raise _StateError("No inf checks were recorded prior to update(): call scaler.step(optimizer) "
                                  "(or unscale_) for each optimizer, after a backward pass that reaches its "
                                  "parameters, before scaler.update()")
            found_inf = found_infs[0] if len(found_infs) == 1 else torch.stack(found_infs).sum()
            self._update_scale(found_inf)
        self._diagnostics.count_flags()
        if new_scale is None:
            self._diagnostics.watch_min_scale(self._floor(), self._min_scale is not None, self.overflow_report)
        for state in self._per_optimizer_states.values():
            if state["optimizer"] is not None:
                _grad_norm.withdraw(state["optimizer"], state["norm_sq"])
        self._per_optimizer_states = defaultdict(_fresh_optimizer_state)

    def _floor(self) -> float:
        """The lowest scale the update may reach: min_scale, or float32's smallest normal number."""
        return _SCALE_FLOOR if self._min_scale is None else self._min_scale

    def _update_scale(self, found_inf: torch.Tensor) -> None:
        scale, tracker = self._scale, self._growth_tracker
        overflow = found_inf > 0
        # Record first: the history pairs each step's overflow with the scale that step used.
        self._diagnostics.record_step(scale, overflow, self._min_scale)

        if self._hysteresis == 1 and self._min_scale is None and self._max_scale is None:
            # torch's own kernel: the trajectory is torch.amp.GradScaler's by construction, down to the floor.
            torch._amp_update_scale_(scale, tracker, found_inf, self._growth_factor, self._backoff_factor,
                                     self._growth_interval)
            scale.clamp_min_(_SCALE_FLOOR)
            return

        # The same rule as torch's kernel, with hysteresis and bounds, as device ops (no branches on the host).
        # Products are taken in fp64 and rounded once to fp32, as torch's kernel does (float * double).
        clean = ~overflow
        streak = tracker + 1
        grow = clean & (streak == self._growth_interval)
        back_off = overflow & (self._hysteresis_left <= 1)
        scale64 = scale.double()
        new = torch.where(back_off, scale64 * self._backoff_factor,
                          torch.where(grow, scale64 * self._growth_factor, scale64)).float()
        new = torch.where(torch.isfinite(new), new, scale)  # never grow past fp32 to inf
        new = new.clamp(min=self._floor(), max=self._max_scale)
        refill = clean if self._consecutive_hysteresis else grow
        left = torch.where(overflow, (self._hysteresis_left - 1).clamp(min=1),
                           torch.where(refill, self._hysteresis, self._hysteresis_left))
        scale.copy_(new)
        tracker.copy_(torch.where(clean & ~grow, streak, 0))
        self._hysteresis_left.copy_(left)

    # ---------------------------------------------------------------------------------------- diagnostics
    def history(self) -> list[tuple[float, bool]]:
        """The last `history` (scale, overflowed) pairs recorded by update(), oldest first. Syncs."""
        return self._diagnostics.history() if self._enabled else []

    def skipped_steps(self) -> int:
        """Steps whose update() saw an overflow, since the scaler (or its state_dict) began. Syncs; warns once if
        the scale is stuck at its floor."""
        if not self._enabled:
            return 0
        scale = self._init_scale if self._scale is None else self._scale.item()
        return self._diagnostics.skipped_steps(scale, self._floor(), self._min_scale is not None, self.overflow_report)

    def overflow_report(self, named_params=None) -> OverflowReport:
        """Why the scale is where it is: counters, recent history, and the gradients that held inf/NaN.

        named_params: (name, parameter) pairs, e.g. model.named_parameters(), to name the tensors; others are
        named by their place in the optimizer. With track_overflow=True the culprits are counted per tensor
        over all checked steps; otherwise they are the gradients that hold inf/NaN now (call it before
        zero_grad). Syncs; print() it for a readable summary.
        """
        return self._diagnostics.report(self.get_scale(), self._min_scale, named_params)

    # -------------------------------------------------------------------------------- accessors, state
    def get_scale(self) -> float:
        """The current scale as a Python float (1.0 when disabled). Syncs, as torch's does. When the scale is at
        its floor, also reads the history, to warn once if it is stuck there."""
        if not self._enabled:
            return 1.0
        if self._scale is None:
            return self._init_scale
        scale = self._scale.item()
        self._diagnostics.check_stuck(scale, self._floor(), self._min_scale is not None, self.overflow_report)
        return scale

    def get_growth_factor(self) -> float:
        return self._growth_factor

    def set_growth_factor(self, new_factor: float) -> None:
        _check_factor("new_factor", new_factor, above_one=True)
        self._growth_factor = float(new_factor)

    def get_backoff_factor(self) -> float:
        return self._backoff_factor

    def set_backoff_factor(self, new_factor: float) -> None:
        _check_factor("new_factor", new_factor, above_one=False)
        self._backoff_factor = float(new_factor)

    def get_growth_interval(self) -> int:
        return self._growth_interval

    def set_growth_interval(self, new_interval: int) -> None:
        _check_int("new_interval", new_interval, 1)
        self._growth_interval = int(new_interval)

    def _get_growth_tracker(self) -> int:
        if not self._enabled:
            return 0
        return self._init_growth_tracker if self._growth_tracker is None else int(self._growth_tracker.item())

    def is_enabled(self) -> bool:
        return self._enabled

    def state_dict(self) -> dict[str, Any]:
        """torch.amp.GradScaler's five entries (so torch's scaler can load it), plus mixprec's own settings and
        counters under keys torch ignores. Empty when disabled. Syncs."""
        if not self._enabled:
            return {}
        host = self._host_state()
        return {"scale": host["scale"], "growth_factor": self._growth_factor,
                "backoff_factor": self._backoff_factor, "growth_interval": self._growth_interval,
                "_growth_tracker": host["growth_tracker"],
                "hysteresis": self._hysteresis, "consecutive_hysteresis": self._consecutive_hysteresis,
                "min_scale": self._min_scale, "max_scale": self._max_scale,
                "_hysteresis_left": host["hysteresis_left"], **self._diagnostics.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict of this class or of torch.amp.GradScaler. From torch's, the settings only mixprec
        has keep their current values, the hysteresis count starts full and the diagnostic counters are kept.
        Every entry is checked as the constructor checks its argument (ValueError naming the entry, and nothing
        is loaded): a scale within [min_scale, max_scale] (by default float32's normal range), factors, interval
        and counters in range. The one exception: the scale of a state_dict without bounds (torch's) that lies
        outside this scaler's min_scale/max_scale is clamped into them, with a warning. A no-op when disabled."""
        if not self._enabled:
            return
        if len(state_dict) == 0:
            raise RuntimeError("The source state dict is empty, possibly because it was saved from a disabled "
                               "instance of GradScaler.")
        missing = [k for k in _TORCH_STATE_KEYS if k not in state_dict]
        if missing:
            raise KeyError(f"state_dict lacks {missing}: not a GradScaler state_dict")
        loaded = {"hysteresis": self._hysteresis, "consecutive_hysteresis": self._consecutive_hysteresis,
                  "min_scale": self._min_scale, "max_scale": self._max_scale, **state_dict}
        loaded.setdefault("_hysteresis_left", loaded["hysteresis"])
        field = "state_dict[{!r}]".format
        _check_factor(field("growth_factor"), loaded["growth_factor"], above_one=True)
        _check_factor(field("backoff_factor"), loaded["backoff_factor"], above_one=False)
        _check_int(field("growth_interval"), loaded["growth_interval"], 1)
        _check_int(field("_growth_tracker"), loaded["_growth_tracker"], 0)
        _check_int(field("hysteresis"), loaded["hysteresis"], 1)
        _check_int(field("_hysteresis_left"), loaded["_hysteresis_left"], 1, loaded["hysteresis"])
        if not isinstance(loaded["consecutive_hysteresis"], bool):
            raise ValueError(f"{field('consecutive_hysteresis')} must be a bool, got "
                             f"{loaded['consecutive_hysteresis']!r}")
        _check_scale(field("min_scale"), loaded["min_scale"], optional=True)
        _check_scale(field("max_scale"), loaded["max_scale"], optional=True)
        _check_scale(field("scale"), loaded["scale"])
        lo, hi = loaded["min_scale"], loaded["max_scale"]
        if "min_scale" not in state_dict and "max_scale" not in state_dict:
            # torch's state_dict: the bounds are this scaler's own, which the run that saved it did not know
            clamped = min(max(loaded["scale"], _SCALE_FLOOR if lo is None else lo), _SCALE_MAX if hi is None else hi)
            if clamped != loaded["scale"]:
                warnings.warn(f"GradScaler.load_state_dict: state_dict['scale']={loaded['scale']} lies outside this "
                              f"scaler's [min_scale, max_scale] = [{lo}, {hi}]; loaded as {clamped}",
                              RuntimeWarning, stacklevel=2)
                loaded["scale"] = clamped
        _check_scale(field("scale"), loaded["scale"], within=(lo, hi))
        self._diagnostics.check_state_dict(state_dict)

        self._growth_factor = float(loaded["growth_factor"])
        self._backoff_factor = float(loaded["backoff_factor"])
        self._growth_interval = int(loaded["growth_interval"])
        self._hysteresis = int(loaded["hysteresis"])
        self._consecutive_hysteresis = loaded["consecutive_hysteresis"]
        self._min_scale = None if loaded["min_scale"] is None else float(loaded["min_scale"])
        self._max_scale = None if loaded["max_scale"] is None else float(loaded["max_scale"])
        self._diagnostics.load_state_dict(state_dict)
        self._init_scale = float(loaded["scale"])
        self._init_growth_tracker = int(loaded["_growth_tracker"])
        self._init_hysteresis_left = int(loaded["_hysteresis_left"])
        if self._scale is not None:
            self._scale.fill_(self._init_scale)
            self._growth_tracker.fill_(self._init_growth_tracker)
            self._hysteresis_left.fill_(self._init_hysteresis_left)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self._enabled:
            if len(self._per_optimizer_states) != 0:
                raise _StateError("A GradScaler instance may only be pickled at the beginning of an iteration, "
                                  "or at the end after scaler.update().")
            # Device tensors are rebuilt at the first scale() after unpickling, from host values.
            host = self._host_state()
            state["_init_scale"] = host["scale"]
            state["_init_growth_tracker"] = host["growth_tracker"]
            state["_init_hysteresis_left"] = host["hysteresis_left"]
            for name in ("_scale", "_growth_tracker", "_hysteresis_left"):
                state[name] = None
        # Process groups do not pickle: one must be passed again to the unpickled scaler (by default the default
        # group is used when initialized).
        state["_process_group"] = None
        state["_per_optimizer_states"] = dict(state["_per_optimizer_states"])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._per_optimizer_states = defaultdict(_fresh_optimizer_state, state["_per_optimizer_states"])


def _check_factor(name: str, value, *, above_one: bool) -> None:
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
          and (value > 1.0 if above_one else 0.0 < value < 1.0))
    if not ok:
        raise ValueError(f"{name} must be a finite number {'> 1' if above_one else 'in (0, 1)'}, got {value!r}")


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low
            or (high is not None and value > high)):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an int {bound}, got {value!r}")


def _check_scale(name: str, value, *, optional: bool = False, within: tuple = (None, None)) -> None:
    """A scale (or bound) in float32's normal range [2**-126, float32's largest], and within `within`."""
    if value is None and optional:
        return
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or not _SCALE_FLOOR <= value <= _SCALE_MAX):
        raise ValueError(f"{name} must be a finite number in [2**-126, {_SCALE_MAX:.7g}] (float32's normal range, "
                         f"so that 1/scale is finite too){' or None' if optional else ''}, got {value!r}")
    lo = _SCALE_FLOOR if within[0] is None else within[0]
    hi = _SCALE_MAX if within[1] is None else within[1]
    if not lo <= value <= hi:
        raise ValueError(f"{name}={value} must lie within [min_scale, max_scale] = [{lo}, {hi}]")
