"""GradScaler's overflow diagnostics: kept on the device as steps happen, read on the host only when asked.

OverflowMonitor, owned by the scaler, keeps the last (scale, overflowed) pairs in a ring buffer, counts the
skipped steps and the overflowing steps taken at min_scale, warns once when the scale is stuck at its floor
(min_scale, or 2**-126 without one), remembers each optimizer's params and, with track_overflow, counts per tensor
the steps whose gradient held inf/NaN. OverflowReport and OverflowCulprit are what it materializes.
"""
from __future__ import annotations

import numbers
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mixprec import distributed


@dataclass
class OverflowCulprit:
    """A gradient that held inf or NaN."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    steps: int | None  # overflowing steps counted since tracking began (None: per-tensor tracking is off)
    in_last_step: bool  # it held inf/NaN in the last checked step


@dataclass
class OverflowReport:
    """What scaler.overflow_report() materializes: why the scale is where it is."""

    scale: float
    min_scale: float | None
    steps: int  # update() calls recorded
    skipped_steps: int
    history: list[tuple[float, bool]]  # the last (scale, overflowed) pairs, oldest first
    culprits: list[OverflowCulprit] = field(default_factory=list)
    tracked: bool = False  # culprits come from per-tensor counts (track_overflow=True), not from the current grads

    def __str__(self) -> str:
        bound = "" if self.min_scale is None else f" (min_scale {self.min_scale:g})"
        lines = [f"mixprec GradScaler: scale {self.scale:g}{bound}; {self.skipped_steps} of {self.steps} steps "
                 f"skipped for inf/NaN gradients"]
        if self.history:
            recent = ", ".join(f"{s:g}{'!' if o else ''}" for s, o in self.history[-16:])
            lines.append(f"  last scales (! = overflow): {recent}")
        if self.culprits:
            how = ("overflowing steps per tensor" if self.tracked
                   else "tensors whose current .grad holds inf/NaN")
            lines.append(f"  {how}:")
            for c in self.culprits:
                count = "" if c.steps is None else f"{c.steps} steps, "
                last = "in the last step" if c.in_last_step else "not in the last step"
                lines.append(f"    {c.name} {tuple(c.shape)} {str(c.dtype).replace('torch.', '')}: {count}{last}")
        elif self.tracked:
            lines.append("  no gradient has held inf/NaN since tracking began")
        else:
            lines.append("  no current gradient holds inf/NaN (pass track_overflow=True to count them per tensor "
                         "as they happen)")
        return "\n".join(lines)


class _OptimizerRecord:
    """What the scaler remembers about one optimizer across iterations, for overflow reports."""

    def __init__(self, params: list[torch.Tensor], labels: list[str]):
        self.params = params
        self.labels = labels
        self.counts: torch.Tensor | None = None  # per param: overflowing steps (track_overflow only)
        self.last: torch.Tensor | None = None  # per param: 1.0 where the last checked step held inf/NaN
        self.uncounted = False  # `last` is this iteration's and not yet in `counts`
        self._index: tuple[tuple[int, ...], torch.Tensor] | None = None

    def set_last(self, present: list[int], flags: torch.Tensor) -> None:
        """Take the fused op's per-tensor flags (one per present grad) as this iteration's; a later pass in the
        same iteration (a library checking once per param group) replaces them, so each step counts once."""
        n = len(self.params)
        if self.counts is None:
            self.counts = torch.zeros(n, dtype=torch.float32, device=flags.device)
            self.last = torch.zeros(n, dtype=torch.float32, device=flags.device)
        if len(present) == n:
            self.last.copy_(flags)
        else:
            # The index tensor is cached: building it is a host-to-device copy, which on CUDA waits for the host.
            key = tuple(present)
            if self._index is None or self._index[0] != key:
                self._index = (key, torch.tensor(key, dtype=torch.long, device=flags.device))
            self.last.zero_().index_copy_(0, self._index[1], flags)
        self.uncounted = True

    def count(self) -> None:
        if self.uncounted:
            self.counts.add_(self.last)
            self.uncounted = False


class OverflowMonitor:
    """The scaler's diagnostics state: device counters and ring buffer, per-optimizer records, min-scale watch.

    The floor (the scaler's min_scale, or 2**-126 without one; load_state_dict may change it) is passed in, with
    `explicit` telling which; `report` arguments are the scaler's overflow_report, which the warning prints.
    """

    def __init__(self, history: int, track_overflow: bool, min_scale_patience: int) -> None:
        self.history_size = history
        self.track_overflow = track_overflow
        self.min_scale_patience = min_scale_patience
        self.num_updates = 0  # steps recorded: the host-side index into the ring buffer

        # Host values the device tensors start from, at materialize(); load_state_dict() and unpickling set them.
        self._init_counters = {"skipped": 0, "min_hits": 0}
        self._init_history: torch.Tensor | None = None

        self._skipped: torch.Tensor | None = None  # int64: steps skipped for inf/NaN
        self._min_hits: torch.Tensor | None = None  # int32: overflowing steps taken at min_scale
        self._history_buf: torch.Tensor | None = None  # fp32 (history, 2): (scale, overflowed) ring buffer

        self._records: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._warned_min_scale = False
        self._min_hits_pending: tuple[torch.Tensor, Any] | None = None

    def materialize(self, device: torch.device) -> None:
        """Create the device state on the scaler's device, from the host values."""
        self._skipped = torch.full((), self._init_counters["skipped"], dtype=torch.int64, device=device)
        self._min_hits = torch.full((), self._init_counters["min_hits"], dtype=torch.int32, device=device)
        self._history_buf = torch.zeros(self.history_size, 2, dtype=torch.float32, device=device)
        if self._init_history is not None:
            self._history_buf.copy_(self._init_history)

    def _counters(self) -> dict[str, int]:
        """skipped and min_hits as Python ints, read in one transfer."""
        if self._skipped is None:
            return dict(self._init_counters)
        skipped, hits = torch.stack((self._skipped.double(), self._min_hits.double())).tolist()
        return {"skipped": int(skipped), "min_hits": int(hits)}

    # ------------------------------------------------------------------------------- recording, on the device
    def per_tensor_flags(self, optimizer, params: list[torch.Tensor], count: int,
                         device: torch.device) -> torch.Tensor | None:
        """Remember the optimizer's params; with track_overflow, the zeroed flags (one per grad) the fused pass
        is to fill, for fold_flags."""
        record = self._records.get(optimizer)
        if record is None or len(record.params) != len(params) or any(
                a is not b for a, b in zip(record.params, params)):
            labels = [f"param_groups[{gi}]['params'][{pi}]"
                      for gi, group in enumerate(optimizer.param_groups) for pi in range(len(group["params"]))]
            self._records[optimizer] = _OptimizerRecord(params, labels)
        return torch.zeros(count, dtype=torch.float32, device=device) if self.track_overflow else None

    def fold_flags(self, optimizer, present: list[int], flags: torch.Tensor | None) -> None:
        """Keep the flags from per_tensor_flags, filled for the params at positions `present`, as this
        iteration's; count_flags() adds them to the per-tensor counts once per step."""
        if flags is not None and present:
            self._records[optimizer].set_last(present, flags)

    def count_flags(self) -> None:
        """At update(): add each optimizer's flags of this iteration to its counts."""
        for record in self._records.values():
            record.count()

    def record_step(self, scale: torch.Tensor, overflow: torch.Tensor, min_scale: float | None) -> None:
        """Record one update(): the scale the step used and whether it overflowed (0-dim bool), on the device."""
        row = self.num_updates % self.history_size
        self._history_buf[row].copy_(torch.stack((scale, overflow.to(torch.float32))))
        self._skipped.add_(overflow)
        self.num_updates += 1
        if min_scale is not None:
            self._min_hits.add_(overflow & (scale <= min_scale))

    # -------------------------------------------------------------------------------- min-scale warning
    def watch_min_scale(self, floor: float, explicit: bool, report: Callable[[], OverflowReport]) -> None:
        """At update(), with an explicit min_scale: warn once when the scale is stuck there, without making any
        step wait for the device. (At the default floor, which only a diverged run reaches, nothing is counted or
        read per step: get_scale, skipped_steps and overflow_report, which read the device anyway, warn; see
        check_stuck.)

        On the CPU the counter is read directly. On CUDA each update() copies it to pinned host memory without
        blocking and reads the copy made by an earlier update() once its event shows it has arrived, so the
        warning comes a step or so late. Other devices are checked by skipped_steps().
        """
        if not explicit or self._warned_min_scale:
            return
        device = self._min_hits.device
        if device.type == "cpu":
            self._maybe_warn_min_scale(int(self._min_hits), floor, explicit, report)
        elif device.type == "cuda":
            pending = self._min_hits_pending
            if pending is not None and pending[1].query():
                self._min_hits_pending = None
                self._maybe_warn_min_scale(int(pending[0]), floor, explicit, report)
            if self._min_hits_pending is None and not self._warned_min_scale:
                host = torch.empty((), dtype=torch.int32, pin_memory=True)
                host.copy_(self._min_hits, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                self._min_hits_pending = (host, event)

    def _maybe_warn_min_scale(self, hits: int, floor: float, explicit: bool,
                              report: Callable[[], OverflowReport]) -> None:
        if self._warned_min_scale or hits < self.min_scale_patience:
            return
        self._warned_min_scale = True
        where = (f"min_scale={floor:g}" if explicit else
                 f"the scale's floor {floor:g} (2**-126, the smallest normal float32: below it 1/scale overflows, "
                 "and unscaling would write inf into the weights; the gradients overflow at any scale, look for "
                 "inf/NaN in the loss or the model)")
        # stacklevel 4 points at the user's update(), get_scale() or skipped_steps(): each reaches here in two calls
        # (overflow_report() in three).
        warnings.warn(f"mixprec GradScaler: {hits} overflowing steps were taken at {where}, where the scale cannot "
                      "back off any further; these steps are skipped. Pass model.named_parameters() to "
                      f"scaler.overflow_report() to name the tensors.\n{report()}", RuntimeWarning, stacklevel=4)

    def check_stuck(self, scale: float, floor: float, explicit: bool, report: Callable[[], OverflowReport]) -> None:
        """On a read the user asked for (get_scale, skipped_steps), with the current scale: warn once if the scale
        is at its floor and min_scale_patience overflowing steps were taken there."""
        if not self._warned_min_scale and scale <= floor:
            self._maybe_warn_min_scale(self._stuck_hits(floor, explicit), floor, explicit, report)

    def _stuck_hits(self, floor: float, explicit: bool) -> int:
        """Overflowing steps taken at the floor: with an explicit min_scale the device counter; at the default
        floor they are counted in the history ring buffer (the last `history` steps), which costs the update
        nothing (and is read only when the scale is at the floor)."""
        if explicit:
            return self._counters()["min_hits"]
        return sum(1 for s, overflowed in self.history() if overflowed and s <= floor)

    # ---------------------------------------------------------------------------------- reading, on the host
    def history(self) -> list[tuple[float, bool]]:
        """The last `history` (scale, overflowed) pairs recorded, oldest first. Syncs."""
        # Before materialize() the buffer is still the host copy that load_state_dict or unpickling left.
        buf = self._history_buf if self._history_buf is not None else self._init_history
        if buf is None:
            return []
        n = min(self.num_updates, self.history_size)
        start = self.num_updates - n
        rows = buf[[(start + i) % self.history_size for i in range(n)]].tolist()
        return [(scale, flag > 0) for scale, flag in rows]

    def skipped_steps(self, scale: float, floor: float, explicit: bool, report: Callable[[], OverflowReport]) -> int:
        """Steps recorded as overflowing; warns if the scale is stuck at its floor (`scale`: the current one).
        Syncs."""
        counters = self._counters()
        if not self._warned_min_scale and (explicit or scale <= floor):
            hits = counters["min_hits"] if explicit else self._stuck_hits(floor, explicit)
            self._maybe_warn_min_scale(hits, floor, explicit, report)
        return counters["skipped"]

    def report(self, scale: float, min_scale: float | None, named_params=None) -> OverflowReport:
        """The OverflowReport behind scaler.overflow_report(named_params), for the scale `scale`. Syncs."""
        skipped = self._counters()["skipped"]
        names = {id(p): n for n, p in named_params} if named_params is not None else {}
        report = OverflowReport(scale=scale, min_scale=min_scale, steps=self.num_updates, skipped_steps=skipped,
                                history=self.history(), tracked=self.track_overflow)
        for k, record in enumerate(list(self._records.values())):
            prefix = "" if len(self._records) == 1 else f"optimizer {k}: "
            if self.track_overflow:
                if record.counts is None:
                    continue
                counts, last = torch.stack((record.counts, record.last)).tolist()
            else:
                counts = None
                last = [0.0] * len(record.params)
                with_grad = [i for i, p in enumerate(record.params) if p.grad is not None]
                if with_grad:
                    grads = [_dense(distributed.local(record.params[i].grad)) for i in with_grad]  # own shards
                    bad = torch.stack([~torch.isfinite(g).all() for g in grads])
                    for i, b in zip(with_grad, bad.tolist()):
                        last[i] = float(b)
            for i, p in enumerate(record.params):
                if (counts[i] if counts is not None else last[i]) > 0:
                    report.culprits.append(OverflowCulprit(
                        name=names.get(id(p), prefix + record.labels[i]), shape=tuple(p.shape), dtype=p.dtype,
                        steps=None if counts is None else int(counts[i]), in_last_step=last[i] > 0))
        return report

    # ------------------------------------------------------------------------------------- state, pickling
    def state_dict(self) -> dict[str, Any]:
        """The diagnostics' entries of the scaler's state_dict (keys torch.amp.GradScaler ignores). Syncs."""
        counters = self._counters()
        return {"_skipped_steps": counters["skipped"], "_min_scale_hits": counters["min_hits"],
                "_num_updates": self.num_updates, "_history": self.history()}

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """ValueError naming the first of those entries that load_state_dict could not take."""
        for key in ("_skipped_steps", "_min_scale_hits", "_num_updates"):
            value = state_dict.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"state_dict[{key!r}] must be an int >= 0, got {value!r}")
        if "_history" not in state_dict:
            return
        pairs = state_dict["_history"]
        ok = isinstance(pairs, (list, tuple)) and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], numbers.Real)
            and isinstance(p[1], (bool, numbers.Integral)) for p in pairs)
        if not ok:
            raise ValueError("state_dict['_history'] must be a list of (scale, overflowed) pairs")
        num_updates = state_dict.get("_num_updates", len(pairs))
        if num_updates < len(pairs):
            raise ValueError(f"state_dict['_num_updates']={num_updates} is less than the {len(pairs)} history "
                             "entries")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load those entries (check_state_dict first); what a state_dict lacks (torch's has none of them) keeps
        its current value."""
        if "_history" in state_dict:
            self._load_history(state_dict["_history"], int(state_dict.get("_num_updates", len(state_dict["_history"]))))
        counters = self._counters()
        self._init_counters = {"skipped": int(state_dict.get("_skipped_steps", counters["skipped"])),
                               "min_hits": int(state_dict.get("_min_scale_hits", counters["min_hits"]))}
        if self._skipped is not None:
            self._skipped.fill_(self._init_counters["skipped"])
            self._min_hits.fill_(self._init_counters["min_hits"])

    def _load_history(self, pairs, num_updates: int) -> None:
        """Refill the ring buffer so that history() returns `pairs` (the newest that fit) after num_updates steps."""
        pairs = list(pairs)[-self.history_size:]
        buf = torch.zeros(self.history_size, 2, dtype=torch.float32)
        for i, (scale, overflowed) in enumerate(pairs):
            buf[(num_updates - len(pairs) + i) % self.history_size] = torch.tensor([scale, float(overflowed)])
        self.num_updates = num_updates
        if self._history_buf is None:
            self._init_history = buf
        else:
            self._history_buf.copy_(buf)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # Device tensors are rebuilt at the first materialize() after unpickling, from host values.
        state["_init_counters"] = self._counters()
        # before the first materialize() the history is still the host copy a loaded state_dict left
        state["_init_history"] = self._init_history if self._history_buf is None else self._history_buf.cpu()
        for name in ("_skipped", "_min_hits", "_history_buf"):
            state[name] = None
        # Neither weak references nor CUDA events pickle: reports restart.
        state["_records"] = None
        state["_min_hits_pending"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._records = weakref.WeakKeyDictionary()


def _dense(grad: torch.Tensor) -> torch.Tensor:
    return grad._values() if grad.is_sparse else grad
