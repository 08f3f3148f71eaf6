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


def unscale_and_check_(grads, inv_scale, found_inf, norm_sq=None, per_tensor_inf=None, check_only=False):
    """For each grad: g = round(float32(g) * inv_scale) in g's dtype, in place.

    found_inf is set to 1.0 if any unscaled value is inf or NaN as stored in g's dtype (never reset to 0): a
    non-finite input, or a finite one whose product overflows (torch checks the inputs only); norm_sq, if given,
    gets the sum of squares of the unscaled fp32 values added (summed here in fp64); per_tensor_inf[i], if given,
    is set to 1.0 when grads[i] was flagged. None entries are skipped.

    check_only: the grads are left as they are, norm_sq gets the sum of squares of their values, and the flags
    are raised where the fp32 product float32(g) * inv_scale is inf or NaN (what a caller that unscales in fp32
    itself, as the fused optimizers do, will compute).
    """
    total = torch.zeros((), dtype=torch.float64, device=found_inf.device)
    for i, g in enumerate(grads):
        if g is None or g.numel() == 0:
            continue
        g32 = g.float()
        unscaled = g32 * inv_scale.float().reshape(())  # any one-element inv_scale, as torch's op
        stored = unscaled if check_only else unscaled.to(g.dtype)  # one rounding, to nearest even
        bad = ~torch.isfinite(stored).all()
        total = total + (g32 if check_only else unscaled).double().square().sum()
        _set_flag(found_inf, bad.reshape(found_inf.shape))
        if per_tensor_inf is not None:
            _set_flag(per_tensor_inf[i], bad)
        if not check_only:
            g.copy_(stored)
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
#
# The compact layouts (remainder masters, int8 moments), as public helpers so that mixprec.optim builds and reads
# its state with the same definitions the kernels are tested against:
#   storage_order(t)                      the elements of a dense tensor in memory order (SR index, int8 blocks)
#   remainder_split(master)               fp32 master -> (bf16 param, int16 remainder), exact
#   remainder_join(param, remainder)      the fp32 master back, bit for bit
#   int8_value(codes)                     the 8-bit code maps (int8: m, signed; uint8: v, unsigned)
#   quantize_blockwise(x, signed=...)     fp32 -> (codes, per-256-block absmax scales)
#   dequantize_blockwise(codes, scales)   the fp32 values back
# Bit patterns are handled as int64 tensors holding the unsigned 16- or 32-bit value (torch has no uint32
# arithmetic on every device), so every shift and mask below reads as in the C++ and Triton kernels.

_U32 = 0xFFFFFFFF
INT8_BLOCK = 256  # elements per int8 quantization block (in storage order), one fp32 absmax scale each
# value(k) = float_from_bits((k + bias) << 20) for code magnitude k >= 1: 3 mantissa bits; value(max code) = 1.0
_M_BIAS, _M_MAX = 889, 127  # m (int8 codes, signed): value(1) = 1.25 * 2^-16, 16 binades
_V_BIAS, _V_MAX = 761, 255  # v (uint8 codes): value(1) = 1.25 * 2^-32, 32 binades


def _bits32(x: torch.Tensor) -> torch.Tensor:
    """The fp32 bit pattern of x as an int64 tensor in [0, 2^32)."""
    return x.view(torch.int32).to(torch.int64) & _U32


def _float_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """fp32 tensor from bit patterns in [0, 2^32) held in int64."""
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


def _from_bits16(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 16-bit dtype (bfloat16, int16) tensor from bit patterns in [0, 2^16) held in int64."""
    return torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16).view(dtype)


def storage_order(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a dense (non-overlapping and dense, any strides) tensor's elements in storage order: element k
    is the k-th element in memory. This is "element k" for every per-element choice the kernels make (the
    stochastic-rounding bits and the int8 block number), since they walk each tensor's storage linearly; a
    contiguous tensor's is its plain flat index. Writing into the view writes into t."""
    if t.is_contiguous():
        return t.view(-1)
    # dims by decreasing stride (a size-1 dim's stride is arbitrary, and is_contiguous ignores it)
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return t.permute(order).view(-1)  # view, not reshape: a non-dense t raises instead of being copied


def remainder_split(master: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An fp32 master as (bf16 param, int16 remainder), exactly: remainder_join gives the master back bit for bit
    (a NaN: a quiet NaN of the same sign and top bits, remainder 0).

    With u the master's bits, hi = u >> 16, lo = u & 0xFFFF: param = hi + (lo >= 0x8000) (round to nearest on the
    bit pattern, ties AWAY from zero: unlike ties to even, the 16 low bits then say which way it went), remainder
    = lo read as int16. So the param is the master rounded to nearest even except at exact ties (lo == 0x8000),
    where it is the larger magnitude; the largest finite floats round up to inf exactly where RNE does (but at
    the tie). The initial remainder of an existing fp32 master is this split of it; of a bf16 param alone, 0."""
    u = _bits32(master)
    hi, lo = u >> 16, u & 0xFFFF
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    param = torch.where(nan, hi | 0x0040, (hi + (lo >= 0x8000).to(torch.int64)) & 0xFFFF)
    remainder = torch.where(nan, torch.zeros_like(lo), lo)
    return _from_bits16(param, torch.bfloat16), _from_bits16(remainder, torch.int16)


def remainder_join(param: torch.Tensor, remainder: torch.Tensor) -> torch.Tensor:
    """The fp32 master of a bf16 param and its int16 remainder (remainder_split's inverse): a negative
    remainder (lo >= 0x8000) means the param was rounded up, so its bits are stepped back by one."""
    p = param.view(torch.int16).to(torch.int64) & 0xFFFF
    r = remainder.to(torch.int64)
    return _float_from_bits((((p - (r < 0).to(torch.int64)) & 0xFFFF) << 16) | (r & 0xFFFF))


def int8_value(codes: torch.Tensor) -> torch.Tensor:
    """The fp32 value of each 8-bit code, before the block scale: int8 codes c (m, signed): sign(c) *
    value(|c|) with value(k) = float_from_bits((k + 889) << 20); uint8 codes k (v): float_from_bits((k + 761) <<
    20); value(0) = 0. Both maps are 8-bit floats with 3 mantissa bits ending at value(max code) = 1.0."""
    signed = codes.dtype == torch.int8
    k = codes.to(torch.int64).abs()
    magnitude = _float_from_bits((k + (_M_BIAS if signed else _V_BIAS)) << 20)
    value = torch.where(k == 0, torch.zeros_like(magnitude), magnitude)
    return torch.where(codes < 0, -value, value) if signed else value


def codes_dtype(signed: bool) -> torch.dtype:
    """The code dtype of a moment: int8 for m (signed map), uint8 for v (unsigned map)."""
    return torch.int8 if signed else torch.uint8


def _int8_code_magnitude(x: torch.Tensor, signed: bool) -> torch.Tensor:
    """Nearest code magnitude k (int64) of fp32 x >= 0 (in units of the block scale, or NaN)."""
    bias, kmax = (_M_BIAS, _M_MAX) if signed else (_V_BIAS, _V_MAX)
    a = _bits32(x) & 0x7FFFFFFF
    r = (a + 0x7FFFF + ((a >> 20) & 1)) >> 20  # the bits rounded to nearest even above the dropped 20 bits
    k = r - bias
    # below value(1), the nearest of 0 and value(1), ties up (value(1) / 2 is exact in fp32); a NaN x has all
    # exponent bits set, so its k is above the largest code
    half_value1 = 0.625 * 2.0 ** (-16 if signed else -32)
    k = torch.where(k < 1, (x >= half_value1).to(torch.int64), k)
    return k.clamp_max(kmax)


def int8_blocks(numel: int) -> int:
    """The number of int8 quantization blocks (block scales) of a tensor of numel elements: ceil(numel / 256)."""
    return -(-numel // INT8_BLOCK)


def _quantize_flat(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and block scales of a 1-D fp32 tensor (blocks of INT8_BLOCK consecutive elements)."""
    n = x.numel()
    nblocks = int8_blocks(n)
    padded = torch.nn.functional.pad(x, (0, nblocks * INT8_BLOCK - n)).view(nblocks, INT8_BLOCK)
    scales = padded.abs().amax(dim=1)  # an fp32 max (the zero padding cannot raise it); a NaN makes it NaN
    inv = torch.ones_like(scales) / scales  # one fp32 division per block
    per_elem = inv.repeat_interleave(INT8_BLOCK)[:n]
    k = _int8_code_magnitude(x.abs() * per_elem, signed)  # one fp32 multiply per element
    k = torch.where(scales.repeat_interleave(INT8_BLOCK)[:n] == 0, torch.zeros_like(k), k)  # an all-zero block
    codes = torch.where(x < 0, -k, k) if signed else k  # -0.0 encodes as 0
    return codes.to(codes_dtype(signed)), scales


def _dequantize_flat(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 values of 1-D codes: int8_value(code) * its block's scale, one fp32 multiply."""
    return int8_value(codes) * scales.repeat_interleave(INT8_BLOCK)[:codes.numel()]


def quantize_blockwise(x: torch.Tensor, *, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 state of fp32 values x (dense, any strides): codes with x's shape and strides (int8 for m,
    signed=True; uint8 for v, signed=False) and fp32 scales, one per block of 256 elements in storage order
    (ceil(numel / 256), the last block may be partial).

    Per block: scale = max |x| (an fp32 max: NaN if the block holds one); scale 0 gives codes 0; else inv = 1 /
    scale (fp32), and each element's code is the nearest code magnitude of |x| * inv (fp32): its fp32 bits
    rounded to nearest even to 3 mantissa bits ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20, minus the map's bias),
    below value(1) the nearest of 0 and value(1) (ties up), at most the largest code; m's code carries x's sign.
    A block holding an inf or NaN decodes to non-finite values throughout."""
    codes = torch.empty_like(x, dtype=codes_dtype(signed))
    flat_codes, scales = _quantize_flat(storage_order(x.float()), signed)
    storage_order(codes).copy_(flat_codes)
    return codes, scales


def dequantize_blockwise(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The fp32 values of an int8 state (quantize_blockwise's codes and scales), with the codes' shape and
    strides."""
    out = torch.empty_like(codes, dtype=torch.float32)
    storage_order(out).copy_(_dequantize_flat(storage_order(codes), scales))
    return out


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
    """1-D fp32 x (in storage order: element k draws the bits of index k) to bf16 with stochastic rounding:
    mixprec/adam_math.h float_to_bf16_sr with sr_bits."""
    key = _hash32((_hash32(_hash32(torch.tensor(seed, dtype=torch.int64, device=x.device)) ^ stream)
                   + step.to(torch.int64)) & _U32)
    index = torch.arange(x.numel(), dtype=torch.int64, device=x.device)
    bits = _hash32((_hash32(((index & _U32) ^ key)) + (index >> 32)) & _U32) & 0xFFFF
    u = _bits32(x)
    out = torch.where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16) | 0x40, (u + bits) >> 16)
    return _from_bits16(out, torch.bfloat16)


def adam_step_(params, grads, exp_avgs, exp_avg_sqs, steps, *, max_exp_avg_sqs, master_params, param_remainders=(),
               exp_avg_scales=(), exp_avg_sq_scales=(), lr, beta1, beta2, eps, weight_decay, decoupled, maximize=False,
               grad_scale=None, found_inf=None, clip_coef=None, sr_seed=-1):
    """One Adam (decoupled=False, L2 decay) or AdamW (decoupled=True) update of every param, in place (the
    arguments of the mixprec::adam_step_ schema; the optional lists empty when unused).

    Per tensor i, with s = steps[i] + 1 (this update's number; steps[i] is then set to s):
      coefficients in float64, each rounded once to fp32: bc1 = 1 - beta1^s, bc2 = 1 - beta2^s,
      neg_step_size = -(lr / bc1), inv_bc2_sqrt = 1 / sqrt(bc2), decay = 1 - lr * weight_decay;
      grad factor f = (1 / grad_scale) * clip_coef in fp32 (each factor optional).
    Per element, every operation one fp32 rounding:
      g = grad * f; g = -g if maximize; Adam: g = g + w * wd / AdamW: w = w * decay (when wd != 0);
      m = beta1 * m + (1 - beta1) * g; v = beta2 * v + ((1 - beta2) * g) * g;
      amsgrad (max_exp_avg_sqs given): vmax = vmax if vmax > v else v, and vmax replaces v below;
      w = w + (neg_step_size * m) / (sqrt(v) * inv_bc2_sqrt + eps);
    (torch divides sqrt(v) by sqrt(bc2); multiplying by the reciprocal spares the kernels a division.)

    What differs between the modes is only how w, m, v (vmax) are loaded to fp32 and stored:
      master kind, one per call: none (w = float(param); param = RNE(w), or stochastically rounded for bf16
        params when sr_seed >= 0); fp32 master_params (w = master; master = w, param = RNE(w)); int16
        param_remainders of bf16 params (w = remainder_join(param, remainder); (param, remainder) =
        remainder_split(w));
      state kind, from the dtypes, one per call: fp32 (as is); bf16 (widened exactly; stored rounded to nearest
        even); int8 (m: int8 codes, v: uint8 codes, with exp_avg_scales / exp_avg_sq_scales: decoded as
        dequantize_blockwise, stored as quantize_blockwise of the new values). The update always continues
        with the fp32 values it computed, never with the rounded stored ones.
    "Element k" is the k-th element in storage order (storage_order): it keys the stochastic-rounding bits and
    places the element in int8 block k // 256.
    If found_inf is given and nonzero, nothing changes (steps and scales included). Never synchronizes with the
    device.
    """
    if not params:
        return
    master_kind = "fp32" if len(master_params) else "remainder" if len(param_remainders) else "none"
    state_kind = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.int8: "int8"}[exp_avgs[0].dtype]
    amsgrad = len(max_exp_avg_sqs) > 0
    device = params[0].device
    factor = torch.ones((), dtype=torch.float32, device=device)
    if grad_scale is not None:
        factor = torch.ones_like(grad_scale.reshape(())) / grad_scale.reshape(())
    if clip_coef is not None:
        factor = factor * clip_coef.reshape(())
    skip = None if found_inf is None else found_inf.reshape(()) != 0

    def commit(dst: torch.Tensor, new: torch.Tensor) -> None:
        """dst = new (rounded to dst's dtype), unless the step is skipped."""
        dst.copy_(new if skip is None else torch.where(skip, dst, new.to(dst.dtype)))

    def load_moment(i: int, state: list, scales: list) -> torch.Tensor:
        """Moment i as fp32 values in storage order."""
        flat = storage_order(state[i])
        return _dequantize_flat(flat, scales[i]) if state_kind == "int8" else flat.float()

    def store_moment(i: int, state: list, scales: list, value: torch.Tensor, *, signed: bool) -> None:
        """fp32 as is, bf16 rounded to nearest even (torch's cast), int8 quantized with fresh block scales."""
        if state_kind == "int8":
            codes, block_scales = _quantize_flat(value, signed)
            commit(storage_order(state[i]), codes)
            commit(scales[i], block_scales)
        else:
            commit(storage_order(state[i]), value)

    lr64 = lr.reshape(()).double()
    for i, p in enumerate(params):
        step = steps[i].reshape(()).double() + 1
        bc1 = 1 - torch.pow(beta1, step)
        bc2 = 1 - torch.pow(beta2, step)
        neg_step_size = (-(lr64 / bc1)).float()
        inv_bc2_sqrt = (1 / bc2.sqrt()).float()
        decay = (1 - lr64 * weight_decay).float()

        param = storage_order(p)
        if master_kind == "fp32":
            w = storage_order(master_params[i]).clone()
        elif master_kind == "remainder":
            w = remainder_join(param, storage_order(param_remainders[i]))
        else:
            w = param.float()
        g = storage_order(grads[i]).float() * factor
        if maximize:
            g = -g
        if weight_decay != 0:
            if decoupled:
                w = w * decay
            else:
                g = g + w * weight_decay  # python floats become fp32 scalars: one rounding each
        m = load_moment(i, exp_avgs, exp_avg_scales) * beta1 + g * (1 - beta1)
        v = load_moment(i, exp_avg_sqs, exp_avg_sq_scales) * beta2 + (g * (1 - beta2)) * g
        second = v
        if amsgrad:  # fp32 or bf16 states only (refused with int8)
            vmax = storage_order(max_exp_avg_sqs[i])
            old = vmax.float()
            second = torch.where(old > v, old, v)
            commit(vmax, second)
        # note: torch's fp32 CPU sqrt is not correctly rounded (torch 2.14 on AVX2: ~15% of values 1 ulp off);
        # the fp64 sqrt rounded to fp32 is (a float's square root is never close enough to a midpoint for the
        # double rounding to matter), and it is what the kernels' IEEE sqrt gives.
        root = second.double().sqrt().float()
        w = w + (neg_step_size * m) / (root * inv_bc2_sqrt + eps)
        store_moment(i, exp_avgs, exp_avg_scales, m, signed=True)
        store_moment(i, exp_avg_sqs, exp_avg_sq_scales, v, signed=False)
        if master_kind == "fp32":
            commit(storage_order(master_params[i]), w)
            commit(param, w)
        elif master_kind == "remainder":
            new_param, remainder = remainder_split(w)
            commit(param, new_param)
            commit(storage_order(param_remainders[i]), remainder)
        elif sr_seed >= 0 and p.dtype == torch.bfloat16:
            commit(param, _bf16_stochastic(w, sr_seed, i, step))
        else:
            commit(param, w)  # copy_ rounds to nearest even
        commit(steps[i], step.float().reshape(steps[i].shape))
