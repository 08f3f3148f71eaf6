"""mixprec.prepare (exported from mixprec): an fp32 model made mixed precision in one call, Apex O2 style.

    model, optimizer, scaler = mixprec.prepare(model, dtype=torch.float16, optimizer_kwargs={"lr": 1e-3})
    ...
    scaler.scale(loss).backward()
    scaler.step(optimizer); scaler.update()

What it does to the model, in place (as model.half() does), before the optimizer is built on its params:
- every floating parameter and persistent floating buffer is cast to `dtype`, except in the modules `keep_fp32`
  selects (normalization layers by default: their statistics and affine parameters need fp32's precision).
  Those run in fp32: a forward pre-hook casts their floating inputs to fp32 and a forward hook casts their
  floating outputs back to `dtype`, so the layers around them see half-precision activations.
- which modules are normalization layers (DEFAULT_KEEP_FP32), whatever library defines them: instances of
  torch's normalization classes (TORCH_NORMS), and any module that looks_like_normalization(): its class or a
  base class is named with the word "Norm" (LayerNorm, RMSNorm, LlamaRMSNorm, T5LayerNorm, FusedRMSNorm,
  RMSNormGated; "Norm" followed by a capital, a digit or nothing, so Normal or Normalize do not count) or
  "Normalization", and none of its submodules holds parameters (a block named PreNorm whose children hold
  weights is not a normalization layer: kept fp32 it would feed fp32 activations to its half children).
- non-persistent buffers (register_buffer(..., persistent=False)) are never cast: they are not model state
  (not in the state_dict, never loaded or optimized) but constants a module derives itself, in the precision
  its author chose, such as a rotary embedding's inv_freq (transformers' LlamaRotaryEmbedding computes its angles
  in fp32 and returns cos/sin in the activations' dtype; an fp16 inv_freq moves the angle at position p by up to
  p * 2^-11 rad, a whole radian at p = 2048). Persistent floating buffers are model state and are cast as
  model.half() casts them.
- the projections get mixprec's GEMM (swap_linear): every torch.nn.Linear (exactly that type; subclasses such
  as MultiheadAttention's out_proj are left alone, their owners call F.linear on the weight directly) becomes
  mixprec.nn.Linear, and every transformers-style Conv1D (GPT-2's projections, weight stored [in, out];
  recognized by mixprec.nn.is_conv1d_like: class name "Conv1D", int nf, weight [nx, nf]) becomes
  mixprec.nn.Conv1D, which runs mixprec.ops.matmul on the weight in its own layout. Both share the original
  parameters, so state_dict keys, shapes and checkpoints are unchanged.
- floating inputs of the model are cast to `dtype` and floating outputs to `output_dtype` (fp32 by default,
  so the loss and softmax run in fp32); integer inputs such as token ids pass unchanged.

The optimizer holds fp32 master weights of the half params (mixprec.optim.FusedAdamW by default).

The GradScaler, by dtype:
- float16: dynamic loss scaling with torch's defaults (init_scale 2**16, growth x2 every 2000 clean steps,
  back-off x0.5 on overflow): fp16 has 5 exponent bits, and small gradients flush to zero unscaled.
- bfloat16: no loss scaling is needed (8 exponent bits, fp32's range), so the scale starts at 1.0 and is
  capped there (max_scale=1.0): it never grows. The scaler stays enabled because it still checks the grads
  for inf/NaN in the same fused pass and skips a poisoned step instead of writing NaN into the fp32 masters;
  such a step halves the scale (harmless in bf16's range), and 2000 clean steps bring it back to 1.0.
  Pass scaler_kwargs={"enabled": False} for a plain loop without the check.
scaler_kwargs override any of these.

Order with torch.distributed: prepare first, then wrap the returned model in DistributedDataParallel (DDP
registers its gradient buckets with the parameter dtypes it sees).

FSDP2 (torch.distributed.fsdp.fully_shard): prepare(..., shard=fn) shards the converted model before the
optimizer is built on the sharded (DTensor) params. The recipe, block by block:

    model, optimizer, scaler = mixprec.prepare(model, dtype=torch.bfloat16, shard=mixprec.distributed.shard_blocks)

casts, keeps the norms fp32, swaps the projections, then fully_shards each normalization layer on its own (FSDP2
needs one dtype per unit), each block (the children of every nn.ModuleList) and the root; the optimizer keeps
fp32 masters per shard. functools.partial(shard_blocks, mesh=...) picks the mesh (a 2-D mesh: HSDP). The other
FSDP2 setup keeps fp32 params and lets FSDP2 cast: swap_projections(model), then
shard_blocks(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)),
then mixprec.optim.FusedAdamW(model.parameters()) (a plain fp32 fused Adam on the shards). Every sharded param's
placement is checked with mixprec.distributed.check_placements (FusedAdam/W and GradScaler run their kernels on
the local shards).
"""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from mixprec import distributed
from mixprec.amp import GradScaler
from mixprec.nn import Conv1D, Linear, is_conv1d_like
from mixprec.optim import FusedAdamW

HALF_DTYPES = (torch.float16, torch.bfloat16)

TORCH_NORMS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm,
)

# "Norm" as a CamelCase word (not the start of Normal, Normalize, Normed), or "Normalization"
_NORM_NAME = re.compile(r"Norm(?![a-z])|Normalization")


def looks_like_normalization(module: nn.Module) -> bool:
    """A normalization layer from another library, by the rule in the module docstring: its class or a base
    class is named with the word Norm (or Normalization), and no submodule holds parameters."""
    if not any(_NORM_NAME.search(cls.__name__) for cls in type(module).__mro__):
        return False
    return not any(True for child in module.children() for _ in child.parameters())


# Entries: nn.Module subclasses (isinstance) or predicates module -> bool
DEFAULT_KEEP_FP32: tuple = (*TORCH_NORMS, looks_like_normalization)


def default_scaler_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """The GradScaler arguments prepare() uses for `dtype` (see the module docstring for why)."""
    if dtype == torch.bfloat16:
        return {"init_scale": 1.0, "max_scale": 1.0}
    return {}


def _cast_floating(obj, dtype: torch.dtype):
    """obj with every floating-point tensor in it (through tuples, lists and dicts) cast to dtype."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        cast = [_cast_floating(o, dtype) for o in obj]
        return type(obj)(*cast) if hasattr(obj, "_fields") else type(obj)(cast)  # namedtuples too
    if isinstance(obj, dict):
        return type(obj)((k, _cast_floating(v, dtype)) for k, v in obj.items())
    return obj


def _cast_inputs_hook(dtype: torch.dtype):
    def hook(module, args, kwargs):
        return _cast_floating(args, dtype), _cast_floating(kwargs, dtype)
    return hook


def _cast_output_hook(dtype: torch.dtype):
    def hook(module, args, output):
        return _cast_floating(output, dtype)
    return hook


def _cast_own_tensors(module: nn.Module, dtype: torch.dtype) -> None:
    """Casts the module's own floating parameters and persistent floating buffers (not its children's; not its
    non-persistent buffers, see the module docstring), keeping Parameter identity so hooks and references to the
    parameters survive, as nn.Module.to does."""
    with torch.no_grad():
        for p in module.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in module.named_buffers(recurse=False):
            # _non_persistent_buffers_set: where nn.Module itself records persistent=False (its state_dict reads it)
            if b.is_floating_point() and name not in module._non_persistent_buffers_set:
                setattr(module, name, b.to(dtype))


def _keeps_fp32(module: nn.Module, keep_fp32: tuple) -> bool:
    return any(isinstance(module, k) if isinstance(k, type) else k(module) for k in keep_fp32)


def swap_projections(model: nn.Module) -> nn.Module:
    """nn.Linear (exactly) -> mixprec.nn.Linear and transformers-style Conv1D -> mixprec.nn.Conv1D, in place, with
    nothing cast (convert's swap_linear step on its own, e.g. for fp32 params that FSDP2's MixedPrecisionPolicy
    casts); returns the model, or its replacement when the root itself is swapped."""
    if type(model) is nn.Linear:
        return Linear.from_linear(model)
    if is_conv1d_like(model):
        return Conv1D.from_conv1d(model)
    for name, child in model.named_children():
        new = swap_projections(child)
        if new is not child:
            setattr(model, name, new)
    return model


def convert(model: nn.Module, dtype: torch.dtype, *, keep_fp32=DEFAULT_KEEP_FP32, swap_linear: bool = True,
            output_dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """The model half of prepare(): casts, hooks and swaps in place and returns the model (the root may be
    replaced when it is itself a Linear). No optimizer is built."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if dtype not in HALF_DTYPES:
        raise ValueError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")
    keep_fp32 = tuple(keep_fp32)
    bad = [k for k in keep_fp32 if not (issubclass(k, nn.Module) if isinstance(k, type) else callable(k))]
    if bad:
        raise TypeError(f"keep_fp32 must hold nn.Module subclasses or predicates (module -> bool), got {bad!r}")
    if output_dtype is not None and not (isinstance(output_dtype, torch.dtype) and output_dtype.is_floating_point):
        raise ValueError(f"output_dtype must be a floating torch.dtype or None, got {output_dtype!r}")
    if any(distributed.is_dtensor(p) for p in model.parameters()):
        raise ValueError("model: its parameters are already DTensors (FSDP2 fully_shard or tensor parallel); "
                         "casting them would detach them from the sharding. Pass the unsharded model and the "
                         "sharding as prepare(..., shard=fn)")

    if swap_linear:
        model = swap_projections(model)

    for module in model.modules():
        if _keeps_fp32(module, keep_fp32):
            _cast_own_tensors(module, torch.float32)
            module.register_forward_pre_hook(_cast_inputs_hook(torch.float32), with_kwargs=True)
            module.register_forward_hook(_cast_output_hook(dtype))
        else:
            _cast_own_tensors(module, dtype)
    model.register_forward_pre_hook(_cast_inputs_hook(dtype), with_kwargs=True)
    if output_dtype is not None:
        model.register_forward_hook(_cast_output_hook(output_dtype))
    return model


def prepare(model: nn.Module, optimizer_class: type[torch.optim.Optimizer] | None = None,
            dtype: torch.dtype = torch.float16, *, optimizer_kwargs: dict[str, Any] | None = None,
            keep_fp32=DEFAULT_KEEP_FP32, swap_linear: bool = True,
            output_dtype: torch.dtype | None = torch.float32, scaler_kwargs: dict[str, Any] | None = None,
            shard=None):
    """Returns (model, optimizer, scaler) for mixed precision training; see the module docstring.

    model: an fp32 nn.Module on its training device, converted in place (and returned).
    optimizer_class: built as optimizer_class(model.parameters(), **optimizer_kwargs); default
        mixprec.optim.FusedAdamW (fp32 master weights).
    dtype: torch.float16 or torch.bfloat16.
    keep_fp32: modules that stay fp32: nn.Module subclasses (isinstance) and predicates (module -> bool);
        default DEFAULT_KEEP_FP32, the normalization layers of any library (see the module docstring). Extend it
        as (*mixprec.precision.DEFAULT_KEEP_FP32, MyLayer); () keeps nothing in fp32.
    swap_linear: put the projections on mixprec's fp32-accumulating GEMMs: torch.nn.Linear -> mixprec.nn.Linear,
        transformers-style Conv1D -> mixprec.nn.Conv1D (parameters shared, state_dict unchanged).
    output_dtype: dtype of the model's floating outputs (fp32 so the loss is computed in fp32), or None.
    scaler_kwargs: GradScaler arguments over default_scaler_kwargs(dtype).
    shard: optional callable applied to the converted model before the optimizer is built, e.g.
        mixprec.distributed.shard_blocks (FSDP2 block by block, see the module docstring) or
        `lambda m: fully_shard(m)` (it may return the model or None). The sharded params' placements are then
        checked with mixprec.distributed.check_placements (ValueError naming the parameter).
    """
    if optimizer_class is None:
        optimizer_class = FusedAdamW
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise TypeError(f"optimizer_class must be a torch.optim.Optimizer subclass, got {optimizer_class!r}")
    if shard is not None and not callable(shard):
        raise TypeError(f"shard must be a callable (model -> model or None), got {type(shard).__name__}")
    model = convert(model, dtype, keep_fp32=keep_fp32, swap_linear=swap_linear, output_dtype=output_dtype)
    if shard is not None:
        model = shard(model) or model
        for name, p in model.named_parameters():
            distributed.check_placements(f"parameter '{name}'", p)
    params = list(model.parameters())
    devices = {p.device for p in params}
    if len(devices) != 1:
        raise ValueError(f"model must have its parameters on one device, got {sorted(map(str, devices))}")
    optimizer = optimizer_class(params, **(optimizer_kwargs or {}))
    kwargs = {"device": devices.pop().type, **default_scaler_kwargs(dtype), **(scaler_kwargs or {})}
    scaler = GradScaler(**kwargs)
    return model, optimizer, scaler
