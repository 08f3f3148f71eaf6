"""mixprec: fused kernels for mixed precision training in PyTorch."""
__version__ = "0.1.0"

from mixprec import _ext, amp, functional, nn, ops, optim, reference  # noqa: E402,F401  (loading _ext registers torch.ops.mixprec)
from mixprec.precision import prepare  # noqa: E402,F401


def info() -> dict:
    """Versions, what the extension was built with, devices and the backend each device gets, as a dict (what
    `python -m mixprec info` prints)."""
    from mixprec.tools.info import info as collect

    return collect()
