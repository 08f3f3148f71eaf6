"""The training parts mixprec.prepare, the demo and the end-to-end tests use, chosen here and nowhere else:
mixprec.optim.FusedAdamW (fp32 master weights), mixprec.amp.GradScaler and mixprec.nn.Linear.

(While issues 3-5 were open, this module switched between them and torch-based stand-ins; the stand-ins are
gone now that all three are merged and the end-to-end tests pass on them.)
"""
from __future__ import annotations

import torch


def optimizer_class() -> type[torch.optim.Optimizer]:
    from mixprec.optim import FusedAdamW

    return FusedAdamW


def grad_scaler_class() -> type:
    from mixprec.amp import GradScaler

    return GradScaler


def linear_class() -> type[torch.nn.Linear]:
    from mixprec.nn import Linear

    return Linear


def describe() -> dict[str, str]:
    """Which implementation each part is, by qualified name (the demo prints it)."""
    return {name: f"{cls.__module__}.{cls.__qualname__}"
            for name, cls in (("optimizer", optimizer_class()), ("scaler", grad_scaler_class()),
                              ("linear", linear_class()))}
