"""The spec: plain-PyTorch implementations of every mixprec op.

Every backend (CPU and CUDA extension, Triton) is tested against these. They favour clarity over speed,
compute in fp32 where the op is defined in fp32 (so that rounding matches bit for bit) and in fp64 where a
sum is involved (so that they are closer to the exact value than any fp32 kernel). They run on any device
and never synchronize with it.
"""
from __future__ import annotations

import torch


def _set_flag(flag: torch.Tensor, raised: torch.Tensor) -> None:
    """flag = 1.0 where raised, else unchanged (never reset), without a host sync."""
    flag.copy_(torch.where(raised, torch.ones_like(flag), flag))


def unscale_and_check_(grads, inv_scale, found_inf, norm_sq=None, per_tensor_inf=None):
    """For each grad: g = round(float32(g) * inv_scale) in g's dtype, in place.

    found_inf is set to 1.0 if any input value is inf or NaN (never reset to 0); norm_sq, if given, gets
    the sum of squares of the unscaled fp32 values added (summed here in fp64); per_tensor_inf[i], if
    given, is set to 1.0 when grads[i] held an inf or NaN. None entries are skipped.
    """
    total = torch.zeros((), dtype=torch.float64, device=found_inf.device)
    for i, g in enumerate(grads):
        if g is None or g.numel() == 0:
            continue
        g32 = g.float()
        bad = ~torch.isfinite(g32).all()
        unscaled = g32 * inv_scale.float()
        total = total + unscaled.double().square().sum()
        _set_flag(found_inf, bad.reshape(found_inf.shape))
        if per_tensor_inf is not None:
            _set_flag(per_tensor_inf[i], bad)
        g.copy_(unscaled)  # one rounding, to nearest even
    if norm_sq is not None:
        norm_sq.add_(total.to(norm_sq.dtype))


def matmul(a, b, bias=None, out_dtype=None):
    """a [..., M, K] @ b [K, N] (+ bias [N]) computed in fp32 from the exact products of the half inputs, bias
    added in fp32, rounded once to out_dtype (default a's dtype)."""
    acc = torch.matmul(a.float(), b.float())
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(out_dtype or a.dtype)


def matmul_accumulate_(c, a, b):
    """c (fp32) += a @ b, the product computed in fp32."""
    c.add_(torch.matmul(a.float(), b.float()))


# ---- adam_step_ ------------------------------------------------------------------------------------------

_U32 = 0xFFFFFFFF


def _mul_u32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for uint32 values held in int64, without int64 overflow (split into 16-bit halves)."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _U32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """mixprec/adam_math.h hash32 (lowbias32) on uint32 values held in int64."""
    x = x ^ (x >> 16)
    x = _mul_u32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul_u32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _bf16_stochastic(x: torch.Tensor, seed: int, stream: int, step: torch.Tensor) -> torch.Tensor:
    """fp32 x to bf16 with stochastic rounding: mixprec/adam_math.h float_to_bf16_sr with sr_bits."""
    key = _hash32((_hash32(_hash32(torch.tensor(seed, dtype=torch.int64, device=x.device)) ^ stream)
                   + step.to(torch.int64)) & _U32)
    index = torch.arange(x.numel(), dtype=torch.int64, device=x.device)
    bits = _hash32((_hash32(((index & _U32) ^ key)) + (index >> 32)) & _U32) & 0xFFFF
    u = x.reshape(-1).view(torch.int32).to(torch.int64) & _U32
    rounded = (u + bits) >> 16
    quiet_nan = (u >> 16) | 0x40
    out = torch.where((u & 0x7FFFFFFF) > 0x7F800000, quiet_nan, rounded)
    out = torch.where(out >= 0x8000, out - 0x10000, out)  # as signed int16 bits
    return out.to(torch.int16).view(torch.bfloat16).reshape(x.shape)


def adam_step_(params, grads, exp_avgs, exp_avg_sqs, steps, *, max_exp_avg_sqs, master_params, lr, beta1, beta2, eps,
               weight_decay, decoupled, maximize=False, grad_scale=None, found_inf=None, clip_coef=None, sr_seed=-1):
    """One Adam (decoupled=False, L2 decay) or AdamW (decoupled=True) update of every param, in place (the
    arguments of the mixprec::adam_step_ schema; max_exp_avg_sqs and master_params empty when unused).

    Per tensor i, with s = steps[i] + 1 (this update's number; steps[i] is then set to s):
      coefficients in float64, each rounded once to fp32: bc1 = 1 - beta1^s, bc2 = 1 - beta2^s,
      neg_step_size = -(lr / bc1), inv_bc2_sqrt = 1 / sqrt(bc2), decay = 1 - lr * weight_decay;
      grad factor f = (1 / grad_scale) * clip_coef in fp32 (each factor optional).
    Per element, every operation one fp32 rounding (w: master_params[i] if given, else float(params[i])):
      g = grad * f; g = -g if maximize; Adam: g = g + w * wd / AdamW: w = w * decay (when wd != 0);
      m = beta1 * m + (1 - beta1) * g; v = beta2 * v + ((1 - beta2) * g) * g;
      amsgrad (max_exp_avg_sqs given): vmax = vmax if vmax > v else v, and vmax replaces v below;
      w = w + (neg_step_size * m) / (sqrt(v) * inv_bc2_sqrt + eps);
    (torch divides sqrt(v) by sqrt(bc2); multiplying by the reciprocal spares the kernels a division.)
      master_params[i] = w; params[i] = w rounded to nearest even in its dtype (stochastically for bf16
      params without master when sr_seed >= 0).
    If found_inf is given and nonzero, nothing changes (steps included). Never synchronizes with the device.
    """
    amsgrad, master = len(max_exp_avg_sqs) > 0, len(master_params) > 0
    if not params:
        return
    device = params[0].device
    factor = torch.ones((), dtype=torch.float32, device=device)
    if grad_scale is not None:
        factor = torch.ones_like(grad_scale.reshape(())) / grad_scale.reshape(())
    if clip_coef is not None:
        factor = factor * clip_coef.reshape(())
    skip = None if found_inf is None else found_inf.reshape(()) != 0

    def commit(dst: torch.Tensor, new: torch.Tensor) -> None:
        dst.copy_(new if skip is None else torch.where(skip, dst, new.to(dst.dtype)))

    lr64 = lr.reshape(()).double()
    for i, p in enumerate(params):
        step = steps[i].reshape(()).double() + 1
        bc1 = 1 - torch.pow(beta1, step)
        bc2 = 1 - torch.pow(beta2, step)
        neg_step_size = (-(lr64 / bc1)).float()
        inv_bc2_sqrt = (1 / bc2.sqrt()).float()
        decay = (1 - lr64 * weight_decay).float()

        w = master_params[i] if master else p.float()
        g = grads[i].float() * factor
        if maximize:
            g = -g
        if weight_decay != 0:
            if decoupled:
                w = w * decay
            else:
                g = g + w * weight_decay  # python floats become fp32 scalars: one rounding each
        m = exp_avgs[i] * beta1 + g * (1 - beta1)
        v = exp_avg_sqs[i] * beta2 + (g * (1 - beta2)) * g
        second = v
        if amsgrad:
            vmax = max_exp_avg_sqs[i]
            second = torch.where(vmax > v, vmax, v)
            commit(vmax, second)
        # note: torch's fp32 CPU sqrt is not correctly rounded (torch 2.14 on AVX2: ~15% of values 1 ulp off);
        # the fp64 sqrt rounded to fp32 is (a float's square root is never close enough to a midpoint for the
        # double rounding to matter), and it is what the kernels' IEEE sqrt gives.
        root = second.double().sqrt().float()
        w = w + (neg_step_size * m) / (root * inv_bc2_sqrt + eps)
        commit(exp_avgs[i], m)
        commit(exp_avg_sqs[i], v)
        if master:
            commit(master_params[i], w)
        if sr_seed >= 0 and p.dtype == torch.bfloat16 and not master:
            commit(p, _bf16_stochastic(w, sr_seed, i, step))
        else:
            commit(p, w.to(p.dtype))
        commit(steps[i], step.float().reshape(steps[i].shape))
