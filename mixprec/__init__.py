"""mixprec: fused kernels for mixed precision training in PyTorch."""
__version__ = "0.1.0"

from mixprec import _ext, amp, functional, nn, ops, optim, reference  # noqa: E402,F401  (loading _ext registers torch.ops.mixprec)
from mixprec.info import info  # noqa: E402,F401
from mixprec.precision import prepare  # noqa: E402,F401
