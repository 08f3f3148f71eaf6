"""GradScaler's overflow diagnostics: kept on the device as steps happen, read on the host only when asked.

OverflowMonitor, owned by the scaler, keeps the last (scale, overflowed) pairs in a ring buffer, counts the
skipped steps and the overflowing steps taken at min_scale (warning once when the scale is stuck there),
remembers each optimizer's params and, with track_overflow, counts per tensor the steps whose gradient held
inf/NaN. OverflowReport and OverflowCulprit are what it materializes.
"""
from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


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
        self._index: tuple[tuple[int, ...], torch.Tensor] | None = None

    def add_flags(self, present: list[int], flags: torch.Tensor) -> None:
        """Fold the fused op's per-tensor flags (one per present grad) into the per-param counts."""
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
        self.counts.add_(self.last)


class OverflowMonitor:
    """The scaler's diagnostics state: device counters and ring buffer, per-optimizer records, min-scale watch.

    min_scale is the scaler's setting (load_state_dict may change it) and is passed in; `report` arguments are
    the scaler's overflow_report, which the min-scale warning prints.
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
        """Count the flags from per_tensor_flags, filled for the params at positions `present`."""
        if flags is not None and present:
            self._records[optimizer].add_flags(present, flags)

    def record_step(self, scale: torch.Tensor, overflow: torch.Tensor, min_scale: float | None) -> None:
        """Record one update(): the scale the step used and whether it overflowed (0-dim bool), on the device."""
        row = self.num_updates % self.history_size
        self._history_buf[row].copy_(torch.stack((scale, overflow.to(torch.float32))))
        self._skipped.add_(overflow)
        self.num_updates += 1
        if min_scale is not None:
            self._min_hits.add_(overflow & (scale <= min_scale))

    # -------------------------------------------------------------------------------- min-scale warning
    def watch_min_scale(self, min_scale: float | None, report: Callable[[], OverflowReport]) -> None:
        """Warn once when the scale is stuck at min_scale, without making any step wait for the device.

        On the CPU the counter is read directly. On CUDA each update() copies it to pinned host memory without
        blocking and reads the copy made by an earlier update() once its event shows it has arrived, so the
        warning comes a step or so late. Other devices are checked by skipped_steps().
        """
        if min_scale is None or self._warned_min_scale:
            return
        device = self._min_hits.device
        if device.type == "cpu":
            self._maybe_warn_min_scale(int(self._min_hits), min_scale, report)
        elif device.type == "cuda":
            pending = self._min_hits_pending
            if pending is not None and pending[1].query():
                self._min_hits_pending = None
                self._maybe_warn_min_scale(int(pending[0]), min_scale, report)
            if self._min_hits_pending is None and not self._warned_min_scale:
                host = torch.empty((), dtype=torch.int32, pin_memory=True)
                host.copy_(self._min_hits, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                self._min_hits_pending = (host, event)

    def _maybe_warn_min_scale(self, hits: int, min_scale: float | None, report: Callable[[], OverflowReport]) -> None:
        if self._warned_min_scale or min_scale is None or hits < self.min_scale_patience:
            return
        self._warned_min_scale = True
        # stacklevel 4 points at the user's scaler.update() or scaler.skipped_steps(): each reaches here in two calls.
        warnings.warn(f"mixprec GradScaler: {hits} overflowing steps were taken at min_scale={min_scale:g}, "
                      "where the scale cannot back off any further; these steps are skipped. Pass "
                      "model.named_parameters() to scaler.overflow_report() to name the tensors.\n"
                      f"{report()}", RuntimeWarning, stacklevel=4)

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

    def skipped_steps(self, min_scale: float | None, report: Callable[[], OverflowReport]) -> int:
        """Steps recorded as overflowing; warns if the scale is stuck at min_scale. Syncs."""
        counters = self._counters()
        self._maybe_warn_min_scale(counters["min_hits"], min_scale, report)
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
                    bad = torch.stack([~torch.isfinite(_dense(record.params[i].grad)).all() for i in with_grad])
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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load those entries; what a state_dict lacks (torch's has none of them) keeps its current value."""
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
        if num_updates < len(pairs):
            raise ValueError(f"state_dict['_num_updates']={num_updates} is less than the {len(pairs)} history entries")
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
