"""mixprec.amp: GradScaler, dynamic loss scaling whose unscale, overflow check and gradient norm are one pass.

The scaler lives in grad_scaler, its overflow diagnostics (and the reports they make) in diagnostics.
"""
from mixprec.amp.diagnostics import OverflowCulprit, OverflowReport
from mixprec.amp.grad_scaler import GradScaler

__all__ = ["GradScaler", "OverflowReport", "OverflowCulprit"]
