"""Backend choice, in one place, for every public op.

backend="auto" (the default) honours the MIXPREC_BACKEND environment variable, then picks the CUDA
extension for CUDA tensors and the CPU extension for CPU tensors; when the extension (or its CUDA part)
is missing it falls back to the plain-PyTorch reference with a one-time warning. Triton kernels run on
CUDA tensors, and on CPU tensors only under TRITON_INTERPRET=1 (how the tests run them without a GPU).
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

from mixprec import _ext

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _warn_fallback(device_type: str, why: str) -> None:
    warnings.warn(f"mixprec: {why}; using the (slow) reference implementation for {device_type} tensors",
                  RuntimeWarning, stacklevel=4)


def select(backend: str, device: torch.device) -> str:
    """The concrete backend ('cuda', 'triton', 'cpu' or 'reference') that runs an op on `device`."""
    source = "backend"
    if backend == "auto" and os.environ.get("MIXPREC_BACKEND"):
        backend, source = os.environ["MIXPREC_BACKEND"], "MIXPREC_BACKEND"
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            if _ext.has_cuda_kernels():
                return "cuda"
            _warn_fallback("cuda", "mixprec._C was built without its CUDA part")
        elif device.type == "cpu":
            if _ext.available():
                return "cpu"
            _warn_fallback("cpu", f"mixprec._C is not built ({_ext.LOAD_ERROR})")
        return "reference"
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"{source}='cuda' needs CUDA tensors, got tensors on {device}")
        if not _ext.has_cuda_kernels():
            raise RuntimeError(f"{source}='cuda': mixprec._C was built without its CUDA part "
                               "(see `python -m mixprec info`)")
    elif backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"{source}='cpu' needs CPU tensors, got tensors on {device}")
        if not _ext.available():
            raise RuntimeError(f"{source}='cpu': mixprec._C is not built ({_ext.LOAD_ERROR})")
    elif backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{source}='triton' needs the triton package")
        if device.type == "cpu" and not triton_interpreter_enabled():
            raise ValueError(f"{source}='triton' runs CPU tensors only under TRITON_INTERPRET=1")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"{source}='triton' needs CUDA tensors, got tensors on {device}")
    return backend
