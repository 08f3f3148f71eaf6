"""mixprec.amp.GradScaler: dynamic loss scaling whose unscale, overflow check and gradient norm are one pass.

A drop-in for torch.amp.GradScaler (same methods, same state_dict keys, the same scale trajectory with default
arguments) that also

- unscales every gradient of an optimizer, whatever the dtype mix (fp16 gradients of pure-fp16 models
  included, which torch refuses), with ONE call of mixprec.ops.unscale_and_check_, which also sums the
  squares of the unscaled gradients, so clipping needs no second pass (grad_norm, clip_grad_norm_);
- backs off only after `hysteresis` overflowing steps and keeps the scale within [min_scale, max_scale], as
  DeepSpeed's and Megatron's scalers do, still on the device and without a host sync;
- keeps overflow diagnostics on the device (the last `history` (scale, overflow) pairs, the number of skipped
  steps, opt-in per-tensor overflow counts) and reads them only when asked (history(), skipped_steps(),
  overflow_report()), warning once when the scale is stuck at min_scale (mixprec.amp.diagnostics);
- all-reduces found_inf (MAX) when torch.distributed is initialized, so all ranks skip the same steps.
"""
from __future__ import annotations

import inspect
import math
import warnings
from collections import abc, defaultdict
from typing import Any

import torch
from torch.amp.grad_scaler import OptState

from mixprec import _grad_norm
from mixprec.amp.diagnostics import OverflowMonitor, OverflowReport
from mixprec.ops import unscale_and_check_
from mixprec.ops._validate import FLOAT_DTYPES, check_dense

# Keys of torch.amp.GradScaler.state_dict(); mixprec adds its own keys beside them (torch ignores unknown keys).
_TORCH_STATE_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")


def _fresh_optimizer_state() -> dict[str, Any]:
    # The keys torch uses ("stage", "found_inf_per_device") are kept: some training libraries read them.
    return {"stage": OptState.READY, "found_inf_per_device": {}, "norm_sq": None, "grads": None, "optimizer": None}


class GradScaler:
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
    min_scale, max_scale (float or None, default None): bounds of the scale; None is unbounded, as torch is.
        DeepSpeed users set min_scale=1.0.
    history (int, default 64): how many (scale, overflowed) pairs the device-side ring buffer keeps.
    track_overflow (bool, default False): also count, per tensor and on the device, the steps in which each
        gradient held inf/NaN (a flag written by the same fused pass), for overflow_report().
    min_scale_patience (int, default 3): warn once, with an overflow report, when this many overflowing steps
        have been taken at min_scale (the scale cannot back off any further).
    process_group: all-reduce found_inf (MAX) over this group; by default over the default group whenever
        torch.distributed is initialized. Needed so ranks skip the same steps when gradients differ per rank
        (sharded gradients: FSDP, ZeRO). grad_norm() is this rank's own; all-reduce it yourself (SUM of
        squares) when gradients are sharded.

    All arguments are checked even when disabled (torch checks its factors only when enabled).

    Growth counts as torch's does: the scale grows on the `growth_interval`-th consecutive clean step
    (DeepSpeed's scale_window counts one more). With hysteresis=1 and no bounds the update is
    torch._amp_update_scale_ itself, so the scale trajectory equals torch.amp.GradScaler's.

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
        _check_positive_int("growth_interval", growth_interval)
        _check_positive_int("hysteresis", hysteresis)
        _check_positive_int("history", history)
        _check_positive_int("min_scale_patience", min_scale_patience)
        for name, value, optional in (("init_scale", init_scale, False), ("min_scale", min_scale, True),
                                      ("max_scale", max_scale, True)):
            if value is None and optional:
                continue
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not (math.isfinite(value) and value > 0)):
                raise ValueError(f"{name} must be a finite number > 0{' or None' if optional else ''}, got {value!r}")
        lo = 0.0 if min_scale is None else min_scale
        hi = math.inf if max_scale is None else max_scale
        if not lo <= init_scale <= hi:
            raise ValueError(f"init_scale={init_scale} must lie within [min_scale, max_scale] = [{lo}, {hi}]")

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
            raise RuntimeError(f"GradScaler.{funcname}() called before the scale exists: call "
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
    def _collect_grads(self, optimizer):
        """(all params, positions of those with a grad, those grads as dense tensors, their device), checked."""
        params, present, grads = [], [], []
        device, first = None, None
        for gi, group in enumerate(optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                params.append(p)
                g = p.grad
                if g is None:
                    continue
                name = f"optimizer.param_groups[{gi}]['params'][{pi}].grad"
                if g.is_sparse:
                    # Duplicate indices would be summed by the optimizer: unscale, check and square the sums.
                    if not g.is_coalesced():
                        p.grad = g = g.coalesce()
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
                check_dense(name, g)
                present.append(len(params) - 1)
                grads.append(g)
        return params, present, grads, device

    def _unscale_and_check(self, optimizer, multiplier: torch.Tensor | None) -> dict[torch.device, torch.Tensor]:
        """One fused pass over the optimizer's grads: multiply by `multiplier` (None: leave the grads scaled,
        for optimizers that unscale in their own kernel), flag inf/NaN, sum the squares; then agree on
        found_inf across ranks and publish the unscaled sum of squares.

        With multiplier None the op still writes each grad back (times 1.0, exact): it has no check-only mode.
        The sum is then taken over the scaled grads in fp32 and scaled down after, so it overflows to inf only
        when the scaled grads' sum of squares exceeds fp32's range (~3e38)."""
        params, present, grads, device = self._collect_grads(optimizer)
        device = device if device is not None else self._scale.device
        found_inf = torch.zeros((), dtype=torch.float32, device=device)
        norm_sq = torch.zeros((), dtype=torch.float32, device=device)
        factor = torch.ones((), dtype=torch.float32, device=device) if multiplier is None else (
            multiplier.to(device, non_blocking=True))
        flags = self._diagnostics.per_tensor_flags(optimizer, params, len(grads), device)
        with torch.no_grad():
            unscale_and_check_(grads, factor, found_inf, norm_sq, per_tensor_inf=flags)
            if multiplier is None:
                # Bring the sum to the unscaled grads' (in fp64: 1/scale**2 can underflow fp32 for large scales).
                inv = self._scale.double().reciprocal().to(device, non_blocking=True)
                norm_sq.copy_(norm_sq.double() * inv * inv)
        self._all_reduce_found_inf(found_inf)
        self._diagnostics.fold_flags(optimizer, present, flags)

        state = self._per_optimizer_states[id(optimizer)]
        state.update(found_inf_per_device={device: found_inf}, norm_sq=norm_sq, grads=grads, optimizer=optimizer)
        _grad_norm.publish(optimizer, norm_sq)
        return state["found_inf_per_device"]

    def _all_reduce_found_inf(self, found_inf: torch.Tensor) -> None:
        import torch.distributed as dist

        if self._process_group is None and not (dist.is_available() and dist.is_initialized()):
            return
        dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=self._process_group)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Unscale the optimizer's gradients in place, check them for inf/NaN and sum their squares: one pass.

        At most once per optimizer between update()s, before step(); a no-op when disabled. Afterwards
        grad_norm(optimizer), clip_grad_norm_(optimizer, ...) and ``optimizer._mixprec_grad_norm_sq`` are
        available. Gradients of any float dtype mix are accepted, fp16 included. No host sync.
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
        self._unscale_and_check(optimizer, inv_scale)
        state["stage"] = OptState.UNSCALED

    def _check_inf_per_device(self, optimizer: torch.optim.Optimizer) -> dict[torch.device, torch.Tensor]:
        """Check (and measure) the still-scaled grads of an optimizer that unscales them itself. The name is
        torch's: optimizers taking the deprecated `grad_scaler` argument call it."""
        self._check_scale_growth_tracker("_check_inf_per_device")
        return self._unscale_and_check(optimizer, None)

    def _found_inf_per_device(self, optimizer: torch.optim.Optimizer) -> dict[torch.device, torch.Tensor]:
        return self._per_optimizer_states[id(optimizer)]["found_inf_per_device"]

    def _get_scale_async(self) -> torch.Tensor | None:
        return self._scale

    # ----------------------------------------------------------------------------------------------- step
    def step(self, optimizer: torch.optim.Optimizer, *args, **kwargs):
        """Unscale (unless unscale_ was called) and call optimizer.step(*args, **kwargs) unless a grad held inf/NaN.

        Returns what optimizer.step returns, None when skipped. Optimizers with
        ``_step_supports_amp_scaling`` get ``optimizer.grad_scale`` (None if unscale_ was called) and
        ``optimizer.found_inf`` for the duration of their step() and unscale and skip in their own kernel, as
        with torch's scaler; no sync. A `closure` keyword is refused while enabled, as torch does.
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
        retval = None
        # The one host read of the scaler (torch's does the same): whether to call optimizer.step() at all.
        if not any(bool(found) for found in state["found_inf_per_device"].values()):
            retval = optimizer.step(*args, **kwargs)
        state["stage"] = OptState.STEPPED
        return retval

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
            found = [f.to(self._scale.device, non_blocking=True) for f in state["found_inf_per_device"].values()]
            # After unscale_ the grads are already unscaled: hand over what the user set, normally nothing.
            optimizer.grad_scale = (getattr(optimizer, "grad_scale", None) if state["stage"] is OptState.UNSCALED
                                    else self._scale * getattr(optimizer, "grad_scale", 1))
            optimizer.found_inf = found[0] if len(found) == 1 else torch.stack(found).sum()
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
            by_dtype[g.dtype].append(g)
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
        [min_scale, max_scale], and a growth that would overflow fp32 is dropped, as torch does. The step is
        recorded in the history. new_scale (a float, or a one-element tensor on the scaler's device type) is
        taken as is (no bounds) and records nothing. A no-op when disabled.
        """
        if not self._enabled:
            return
        scale, _ = self._check_scale_growth_tracker("update")
        if new_scale is not None:
            if isinstance(new_scale, (int, float)) and not isinstance(new_scale, bool):
                scale.fill_(new_scale)
            elif isinstance(new_scale, torch.Tensor):
                if new_scale.device.type != self._device or new_scale.numel() != 1 or new_scale.requires_grad:
                    raise ValueError(f"new_scale must be a float or a one-element tensor on {self._device} that "
                                     f"does not require grad, got shape {tuple(new_scale.shape)} on "
                                     f"{new_scale.device}, requires_grad={new_scale.requires_grad}")
                scale.copy_(new_scale.reshape(()))
            else:
                raise TypeError(f"new_scale must be a float or a tensor, got {type(new_scale).__name__}")
        else:
            found_infs = [f.to(scale.device, non_blocking=True) for state in self._per_optimizer_states.values()
                          for f in state["found_inf_per_device"].values()]
            if not found_infs:
                raise RuntimeError("update() found no inf checks: call scaler.step(optimizer) (or unscale_) for "
                                   "each optimizer before scaler.update()")
            found_inf = found_infs[0] if len(found_infs) == 1 else torch.stack(found_infs).sum()
            self._update_scale(found_inf)
            self._diagnostics.watch_min_scale(self._min_scale, self.overflow_report)
        for state in self._per_optimizer_states.values():
            if state["optimizer"] is not None:
                _grad_norm.withdraw(state["optimizer"], state["norm_sq"])
        self._per_optimizer_states = defaultdict(_fresh_optimizer_state)

    def _update_scale(self, found_inf: torch.Tensor) -> None:
        scale, tracker = self._scale, self._growth_tracker
        overflow = found_inf > 0
        # Record first: the history pairs each step's overflow with the scale that step used.
        self._diagnostics.record_step(scale, overflow, self._min_scale)

        if self._hysteresis == 1 and self._min_scale is None and self._max_scale is None:
            # torch's own kernel: the trajectory is torch.amp.GradScaler's by construction.
            torch._amp_update_scale_(scale, tracker, found_inf, self._growth_factor, self._backoff_factor,
                                     self._growth_interval)
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
        if self._min_scale is not None or self._max_scale is not None:
            new = new.clamp(min=self._min_scale, max=self._max_scale)
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
        """Steps whose update() saw an overflow, since the scaler (or its state_dict) began. Syncs."""
        if not self._enabled:
            return 0
        return self._diagnostics.skipped_steps(self._min_scale, self.overflow_report)

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
        """The current scale as a Python float (1.0 when disabled). Syncs, as torch's does."""
        if not self._enabled:
            return 1.0
        return self._init_scale if self._scale is None else self._scale.item()

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
        _check_positive_int("new_interval", new_interval)
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
        A no-op when disabled."""
        if not self._enabled:
            return
        if len(state_dict) == 0:
            raise RuntimeError("The source state dict is empty, possibly because it was saved from a disabled "
                               "instance of GradScaler.")
        missing = [k for k in _TORCH_STATE_KEYS if k not in state_dict]
        if missing:
            raise KeyError(f"state_dict lacks {missing}: not a GradScaler state_dict")
        self._growth_factor = float(state_dict["growth_factor"])
        self._backoff_factor = float(state_dict["backoff_factor"])
        self._growth_interval = int(state_dict["growth_interval"])
        self._hysteresis = int(state_dict.get("hysteresis", self._hysteresis))
        self._consecutive_hysteresis = bool(state_dict.get("consecutive_hysteresis", self._consecutive_hysteresis))
        self._min_scale = state_dict.get("min_scale", self._min_scale)
        self._max_scale = state_dict.get("max_scale", self._max_scale)
        self._diagnostics.load_state_dict(state_dict)
        self._init_scale = float(state_dict["scale"])
        self._init_growth_tracker = int(state_dict["_growth_tracker"])
        self._init_hysteresis_left = int(state_dict.get("_hysteresis_left", self._hysteresis))
        if self._scale is not None:
            self._scale.fill_(self._init_scale)
            self._growth_tracker.fill_(self._init_growth_tracker)
            self._hysteresis_left.fill_(self._init_hysteresis_left)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self._enabled:
            if len(self._per_optimizer_states) != 0:
                raise RuntimeError("A GradScaler instance may only be pickled at the beginning of an iteration, "
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
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value > 1.0 if above_one else 0.0 < value < 1.0)
    if not ok:
        raise ValueError(f"{name} must be a finite number {'> 1' if above_one else 'in (0, 1)'}, got {value!r}")


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
