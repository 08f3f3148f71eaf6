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


def is_conv1d_like(module: torch.nn.Module) -> bool:
    """True for a module that is transformers' Conv1D in all but its import path (transformers is not a
    dependency, so the class cannot be named): a class named exactly "Conv1D" (a subclass of another name may
    have changed the forward), an int attribute nf, a 2-D weight Parameter [nx, nf], a bias Parameter [nf] or
    None, and no child modules. mixprec's own Conv1D does not count (it is already swapped)."""
    if type(module).__name__ != "Conv1D" or isinstance(module, Conv1D) or any(True for _ in module.children()):
        return False
    nf, weight, bias = getattr(module, "nf", None), getattr(module, "weight", None), getattr(module, "bias", None)
    if not (isinstance(nf, int) and isinstance(weight, torch.nn.Parameter) and weight.dim() == 2
            and weight.shape[1] == nf):
        return False
    return bias is None or (isinstance(bias, torch.nn.Parameter) and tuple(bias.shape) == (nf,))


class Conv1D(torch.nn.Module):
    """transformers' Conv1D (GPT-2's attention and MLP projections: a linear layer whose weight is stored
    transposed, [nx, nf] = [in, out], y = addmm(bias, x.view(-1, nx), weight)) whose GEMMs accumulate in fp32 on
    mixprec's kernels when input and weight are fp16 or bf16 of one dtype; any other combination runs the addmm
    unchanged. Same constructor (nf, nx), attributes nf and nx, parameters (weight [nx, nf], bias [nf]) and
    state_dict keys, so Hugging Face checkpoints load as they are. The weight is read in its own layout (no
    transposed copy per call) and its gradient is returned in that layout.

    Not a subclass of transformers' class (transformers is not a dependency): code that checks
    isinstance(m, transformers.pytorch_utils.Conv1D) on a prepared model no longer finds these layers."""

    backend: str = "auto"

    def __init__(self, nf: int, nx: int, *, device=None, dtype=None):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = torch.nn.Parameter(torch.empty(nx, nf, device=device, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(nf, device=device, dtype=dtype))
        torch.nn.init.normal_(self.weight, std=0.02)  # GPT-2's initialisation, as transformers' Conv1D does

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in _HALF and self.weight.dtype == x.dtype and (self.bias is None or self.bias.dtype == x.dtype):
            return functional.linear_in_out(x, self.weight, self.bias, backend=self.backend)
        x2 = x.reshape(-1, x.shape[-1])
        y = x2 @ self.weight if self.bias is None else torch.addmm(self.bias, x2, self.weight)
        return y.view(*x.shape[:-1], self.nf)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, bias={self.bias is not None}"

    @classmethod
    def from_conv1d(cls, conv: torch.nn.Module) -> Conv1D:
        """A mixprec Conv1D sharing `conv`'s parameter objects (optimizers holding them keep working); `conv` must
        pass is_conv1d_like."""
        if not is_conv1d_like(conv):
            raise TypeError(f"conv must be a transformers-style Conv1D (class Conv1D, int nf, weight [nx, nf], bias "
                            f"[nf] or None), got {type(conv).__name__}")
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.nf, new.nx = conv.nf, conv.weight.shape[0]
        new.register_parameter("weight", conv.weight)
        new.register_parameter("bias", conv.bias)
        new.train(conv.training)
        return new
