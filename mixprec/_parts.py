"""The training parts mixprec.prepare, the demo and the end-to-end tests use, chosen here and nowhere else.

GradScaler and Linear are mixprec's own (mixprec.amp.GradScaler, mixprec.nn.Linear). The optimizer is
mixprec.optim.FusedAdamW when that module is present; until issue 4 is merged it is a stand-in with the same
contract, `MasterWeightAdamW`: torch's functional AdamW run on fp32 master copies of half-precision params,
honouring `_step_supports_amp_scaling` (unscales inside step(), skips the whole step when `found_inf` is set,
leaving params, masters, moments and step count untouched), state_dict = torch.optim.AdamW's layout plus
`master_param`. MIXPREC_STAND_INS=1 forces the stand-in even when FusedAdamW exists (to compare the two).
`describe()` says which ran; the demo prints it. The stand-in goes away once FusedAdamW is merged and tested.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any

import torch
from torch.optim.adam import adam as functional_adam

_HALF = (torch.float16, torch.bfloat16)


def _own(module: str, attr: str):
    """mixprec's own `module.attr`, or None when it is absent or stand-ins are forced."""
    if os.environ.get("MIXPREC_STAND_INS", "0") not in ("", "0"):
        return None
    if importlib.util.find_spec(module) is None:
        return None
    return getattr(importlib.import_module(module), attr, None)


def optimizer_class() -> type[torch.optim.Optimizer]:
    return _own("mixprec.optim", "FusedAdamW") or MasterWeightAdamW


def grad_scaler_class() -> type:
    from mixprec.amp import GradScaler

    return GradScaler


def linear_class() -> type[torch.nn.Linear]:
    from mixprec.nn import Linear

    return Linear


def describe() -> dict[str, str]:
    """Which implementation each part is, by qualified name."""
    return {name: f"{cls.__module__}.{cls.__qualname__}"
            for name, cls in (("optimizer", optimizer_class()), ("scaler", grad_scaler_class()),
                              ("linear", linear_class()))}


# ----------------------------------------------------------------------------------------------- stand-ins

# State entries kept in fp32 whatever the param's dtype. torch.optim.Optimizer.load_state_dict casts every
# floating state tensor to its param's dtype, which would round the masters to fp16; load_state_dict below
# puts the saved fp32 tensors back.
_FP32_STATE = ("exp_avg", "exp_avg_sq", "master_param")


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW with fp32 master weights for fp16/bf16 params (none for fp32 params), on torch's functional
    AdamW. Stand-in for mixprec.optim.FusedAdamW with the same constructor subset and the same contracts:
    a step skipped for overflow leaves params, masters, moments and the step count untouched."""

    _step_supports_amp_scaling = True  # GradScaler hands us grad_scale and found_inf instead of unscaling
    supports_dtensor = True  # torch ops only: FSDP2's DTensor params and grads work unchanged

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not eps > 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Invalid beta parameters: {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        # A host sync; mixprec's kernel reads the flag on the device instead.
        if found_inf is not None and bool(found_inf.item()):
            return loss
        inv_scale = None if grad_scale is None else grad_scale.double().reciprocal().float()
        for group in self.param_groups:
            params, grads, masters, exp_avgs, exp_avg_sqs, steps = [], [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("MasterWeightAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32,
                                                           memory_format=torch.preserve_format)
                    if p.dtype in _HALF:
                        state["master_param"] = p.detach().float()
                g = p.grad.float()
                if inv_scale is not None:
                    g = g * inv_scale  # out of place: p.grad stays as backward left it
                params.append(p)
                grads.append(g)
                masters.append(state.get("master_param", p))
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if not params:
                continue
            beta1, beta2 = group["betas"]
            functional_adam(masters, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=False,
                            decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2,
                            lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
            for p, m in zip(params, masters):
                if m is not p:
                    p.copy_(m)  # round to nearest even into the model's half dtype
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        if len(saved_ids) != len(params):
            raise ValueError(f"state_dict has {len(saved_ids)} params, this optimizer {len(params)}")
        fp32 = {i: {k: v for k, v in state_dict["state"].get(i, {}).items() if k in _FP32_STATE}
                for i in saved_ids}
        super().load_state_dict(state_dict)
        for i, p in zip(saved_ids, params):
            for k, v in fp32[i].items():
                self.state[p][k] = v.to(device=p.device, dtype=torch.float32, copy=True)
