"""The compiled extension mixprec._C: whether it loaded, and what it was built with."""
from __future__ import annotations

import functools
import json

import torch

try:
    from mixprec import _C  # noqa: F401  (loading it registers torch.ops.mixprec.*)

    LOAD_ERROR: Exception | None = None
except ImportError as exc:  # a source checkout without a build, or a broken build
    _C = None
    LOAD_ERROR = exc


def available() -> bool:
    """True when the extension loaded (its CPU kernels are then always present)."""
    return _C is not None


@functools.cache
def build_info() -> dict:
    """{'cpu': bool, 'cuda': bool, 'cuda_archs': ['sm_80', ...]} as compiled into the extension."""
    if not available():
        return {"cpu": False, "cuda": False, "cuda_archs": []}
    info = json.loads(torch.ops.mixprec.build_info())
    info["cuda_archs"] = [a for a in info["cuda_archs"].split(",") if a]
    return info


def has_cuda_kernels() -> bool:
    return build_info()["cuda"]
