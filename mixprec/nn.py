"""Drop-in modules built on mixprec.functional."""
from __future__ import annotations

import torch

from mixprec import functional

_HALF = (torch.float16, torch.bfloat16)


class Linear(torch.nn.Linear):
    """torch.nn.Linear (same constructor, parameters and state_dict keys) whose GEMMs accumulate in fp32 on
    mixprec's kernels when input and weight are fp16 or bf16 of one dtype. Any other combination (an fp32
    model before conversion, mixed dtypes under autocast) runs torch.nn.functional.linear unchanged."""

    backend: str = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in _HALF and self.weight.dtype == x.dtype and (self.bias is None or self.bias.dtype == x.dtype):
            return functional.linear(x, self.weight, self.bias, backend=self.backend)
        return torch.nn.functional.linear(x, self.weight, self.bias)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> Linear:
        """A mixprec Linear sharing `linear`'s parameter objects (optimizers holding them keep working)."""
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.register_parameter("weight", linear.weight)
        new.register_parameter("bias", linear.bias)  # None registers "no bias", as torch.nn.Linear does
        new.train(linear.training)
        return new
