"""mixprec on DTensors: FSDP2 (torch.distributed.fsdp.fully_shard), HSDP, and torch.distributed.checkpoint.

All of mixprec's DTensor and process-group logic lives here; mixprec.optim and mixprec.amp call it.

Why: mixprec's kernels are custom ops (torch.ops.mixprec.*), and DTensor refuses an op without a sharding rule.
Every one of them is element-wise over params, grads and state (or a sum of squares over the grads), so none
needs one: mixprec runs its kernels on the local tensors (``to_local()``: the shard itself, no copy), once per
param group as without sharding, and adds the one cross-rank step each result needs:

- the optimizer update: nothing (each rank updates its own shard of params, masters and moments);
- the overflow flag (found_inf): MAX over every rank of the mesh, so that all ranks skip the same step;
- the sum of squares of the grads (clipping): SUM over the mesh dimensions the grads are SHARDED on (not the
  replicated ones, whose ranks hold the same values), added by the same fused pass that unscales and checks.
Each is one all-reduce of one fp32 number (found_inf: one more per extra mesh dimension when the mesh is not the
whole world), queued on the device without a host sync (gloo on the CPU waits, as every gloo collective does).

Optimizer state of a DTensor param is made of DTensors with the param's mesh, placements, shape and strides,
whose local tensors are laid out like the param's local tensor (new_state): the kernel runs on the local tensors
directly, torch.distributed.checkpoint saves and reshards the state as it does torch.optim.AdamW's, and a state
tensor loaded from a full (unsharded) tensor is cut to this rank's shard (copy_into).

Placements mixprec handles (check_placements): FSDP2's, Shard(0) on at most one mesh dimension and Replicate() on
the others: (Shard(0),) for fully_shard on a 1-D mesh, (Replicate(), Shard(0)) for HSDP on a 2-D mesh,
(Replicate(),) for a replicated DTensor. Refused with a ValueError naming the param and the placement: Partial
(an unreduced sum: updating its pieces element-wise is wrong), Shard on another dim, _StridedShard and Shard on
two mesh dims (tensor parallel combined with FSDP), and a grad whose placements differ from its param's.
"""
from __future__ import annotations

import dataclasses

import torch

from mixprec import ops

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # torch built without distributed
    dist = DTensor = Replicate = Shard = None

__all__ = ["is_dtensor", "local", "check_placements", "check_grad", "check_no_main_grad", "new_state",
           "copy_into", "unscale_and_check_", "all_reduce_found_inf_", "found_inf_groups",
           "norm_sq_groups", "shard_blocks"]

_F32 = torch.float32


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t):
    """The local tensor of a DTensor (this rank's shard, sharing its memory: in-place writes reach the DTensor);
    anything else as it is."""
    if not is_dtensor(t):
        return t
    if torch.is_grad_enabled():
        with torch.no_grad():  # to_local is differentiable; the kernels need the storage itself
            return t.to_local()
    return t.to_local()


# ---------------------------------------------------------------------------------------------- placements

def _placement_problem(placements) -> str | None:
    """Why mixprec cannot handle a DTensor with these placements, or None."""
    shard_dims = 0
    for pl in placements:
        if type(pl) is Replicate:
            continue
        if type(pl) is Shard and pl.dim == 0:
            shard_dims += 1
            continue
        if pl.is_partial():
            return ("Partial is an unreduced sum over ranks: an element-wise update of its pieces is wrong "
                    "(redistribute it to Shard(0) or Replicate() first)")
        if type(pl) is Shard:
            return (f"Shard(dim={pl.dim}): mixprec's sharded optimizer state and checkpoints follow FSDP2's row "
                    "sharding (fully_shard's default shard_placement_fn, Shard(0))")
        return (f"{pl} is tensor-parallel sharding combined with FSDP (2-D sharding), which mixprec does not "
                "support")
    if shard_dims > 1:
        return ("Shard(0) on two mesh dimensions is 2-D sharding (FSDP x tensor parallel), which mixprec does not "
                "support")
    return None


def check_placements(name: str, t) -> None:
    """ValueError naming `name` and the placement when t is a DTensor mixprec cannot handle (module docstring)."""
    if not is_dtensor(t):
        return
    why = _placement_problem(t.placements)
    if why is not None:
        raise ValueError(f"{name} is a DTensor with placements {tuple(t.placements)} on a {t.device_mesh.ndim}-D "
                         f"mesh: {why}. mixprec handles FSDP2's placements: Shard(0) on at most one mesh dimension "
                         "and Replicate() on the others ((Shard(0),) for fully_shard, (Replicate(), Shard(0)) for "
                         "HSDP)")


def check_grad(name: str, p, g) -> None:
    """The gradient g of a DTensor param p must be a DTensor laid over the same mesh and placements (so that its
    local tensor holds the same elements as p's); `name` names the param."""
    if not is_dtensor(p) and not is_dtensor(g):
        return
    if not (is_dtensor(p) and is_dtensor(g)):
        raise ValueError(f"{name}: the parameter is {'a DTensor' if is_dtensor(p) else 'a plain tensor'} but its "
                         f"gradient is {'a DTensor' if is_dtensor(g) else 'a plain tensor'}: both must be DTensors "
                         "of one mesh and placements")
    if g.device_mesh != p.device_mesh or tuple(g.placements) != tuple(p.placements):
        raise ValueError(f"{name}: the gradient has placements {tuple(g.placements)}, the parameter "
                         f"{tuple(p.placements)} (or another mesh): an unreduced (Partial) or differently sharded "
                         "gradient cannot update this shard; reduce it to the parameter's placements first")
    check_placements(f"{name}'s gradient", g)


def _main_grad_error(name: str) -> RuntimeError:
    return RuntimeError(
            f"{name} is sharded by FSDP2 (a DTensor) and carries a main_grad. mixprec.nn.Linear's fp32 main_grad "
            "accumulation bypasses .grad, and FSDP2 reduce-scatters .grad only: each rank would step on its own "
            "unreduced (or no) gradient. Delete the main_grad attributes and let FSDP2 reduce .grad; for fp32 "
            "gradient accumulation use fully_shard(..., mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))")


def check_no_main_grad(name: str, p) -> None:
    """RuntimeError for an FSDP2-sharded (DTensor) param that carries a `main_grad`: see the message."""
    if is_dtensor(p) and getattr(p, "main_grad", None) is not None:
        raise _main_grad_error(name)


# ------------------------------------------------------------------------------------------------ state

def _wrap_like(local_tensor: torch.Tensor, p) -> DTensor:
    """local_tensor as a DTensor of p's mesh, placements, global shape and strides (no communication)."""
    with torch.no_grad():
        return DTensor.from_local(local_tensor, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                  stride=p.stride())


def new_state(p, dtype: torch.dtype = _F32) -> torch.Tensor:
    """An uninitialized state tensor of p's shape in dtype: p's strides when p is dense (else contiguous); for a
    DTensor p, a DTensor of p's placements whose local tensor is laid out like p's local tensor."""
    if not is_dtensor(p):
        return torch.empty_like(p, dtype=dtype, memory_format=torch.preserve_format)
    lp = local(p)
    return _wrap_like(torch.empty_like(lp, dtype=dtype, memory_format=torch.preserve_format), p)


def local_numel(t) -> int:
    """The number of elements this rank holds of t (t.numel() for a plain tensor)."""
    return local(t).numel()


def on_shards(fn, *args, like, wrap=(0,)):
    """fn(*args) computed on this rank's shards: DTensor arguments are replaced by their local tensors, and the
    results at the positions in `wrap` (of a tuple result; a single result is position 0) are wrapped as DTensors
    of `like`'s placements. For the element-wise helpers that work on bit patterns or on blocks of the storage
    (remainder split/join, int8 block (de)quantization), which must see a shard's own elements, not DTensor ops.
    Without a DTensor `like` this is fn(*args)."""
    if not is_dtensor(like):
        return fn(*args)
    out = fn(*(local(a) for a in args))
    if isinstance(out, tuple):
        return tuple(_wrap_like(o, like) if i in wrap else o for i, o in enumerate(out))
    return _wrap_like(out, like) if 0 in wrap else out


def _local_part(dst: DTensor, full: torch.Tensor) -> torch.Tensor:
    """The elements of a full (global-shape) tensor that dst's local tensor holds on this rank."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(dst.shape, dst.device_mesh, dst.placements)
    part = full
    for d, (n, o) in enumerate(zip(shape, offset)):
        if n != full.shape[d]:
            part = part.narrow(d, o, n)
    return part


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst.copy_(src) for loading state: a DTensor dst takes a DTensor src of its placements shard by shard (other
    placements are redistributed: a collective), and a full plain tensor src (an unsharded state dict) as this
    rank's part of it. Returns dst."""
    if not is_dtensor(dst):
        if is_dtensor(src):
            src = src.full_tensor()  # a collective: an unsharded optimizer loading a sharded state dict
        return dst.copy_(src)
    with torch.no_grad():
        if is_dtensor(src):
            if src.device_mesh != dst.device_mesh or tuple(src.placements) != tuple(dst.placements):
                src = src.redistribute(dst.device_mesh, dst.placements)
            local(dst).copy_(local(src))
        else:
            local(dst).copy_(_local_part(dst, src.to(local(dst).device)))
    return dst


# -------------------------------------------------------------------------------- reductions over ranks

def _shard_dims(t) -> tuple[int, ...]:
    return tuple(i for i, pl in enumerate(t.placements) if pl.is_shard())


def _spans_world(mesh) -> bool:
    return mesh.size() == dist.get_world_size()


def norm_sq_groups(t) -> list:
    """The process groups whose SUM of the local sums of squares of a DTensor gives its own: the groups of the
    mesh dimensions it is sharded on (a replicated dimension holds the same values on each rank). [] for a plain
    tensor or a replicated DTensor."""
    if not is_dtensor(t):
        return []
    dims = _shard_dims(t)
    if dims and len(dims) == t.device_mesh.ndim and _spans_world(t.device_mesh):
        return [dist.group.WORLD]
    return [t.device_mesh.get_group(d) for d in dims]


def found_inf_groups(tensors, process_group=None) -> list:
    """The groups an overflow flag is MAX-reduced over so that every rank that holds a piece of `tensors` agrees:
    `process_group` when given; else, when torch.distributed is initialized, the default group if no tensor is a
    DTensor or a mesh spans the world, otherwise every dimension of each DTensor's mesh (each a small group;
    MAX over them in turn is MAX over the mesh). [] when not distributed."""
    if process_group is not None:
        return [process_group]
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        return []
    meshes = []
    for t in tensors:
        if is_dtensor(t) and t.device_mesh not in meshes:
            meshes.append(t.device_mesh)
    if not meshes or any(_spans_world(m) for m in meshes):
        return [dist.group.WORLD]
    groups = []
    for mesh in meshes:
        for d in range(mesh.ndim):
            group = mesh.get_group(d)
            if group not in groups:
                groups.append(group)
    return groups


def all_reduce_found_inf_(found_inf: torch.Tensor, tensors=(), process_group=None) -> torch.Tensor:
    """MAX-reduce an overflow flag (in place) over found_inf_groups(tensors, process_group); returns it."""
    for group in found_inf_groups(tensors, process_group):
        dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=group)
    return found_inf


def _norm_key(t):
    """Tensors with one key sum their squares over the same groups (None: a plain tensor, summed locally)."""
    return (t.device_mesh, _shard_dims(t)) if is_dtensor(t) else None


def unscale_and_check_(grads, inv_scale, found_inf, norm_sq=None, *, per_tensor_inf=None, check_only=False,
                       backend="auto"):
    """mixprec.ops.unscale_and_check_ over grads of which some may be DTensors: the op runs on the local tensors,
    and norm_sq gets the GLOBAL sum of squares: each rank's sum, SUM-reduced over the groups of the dims the grads
    are sharded on (norm_sq_groups). found_inf is this rank's (all_reduce_found_inf_ makes it global).

    Grads sharded alike (all of FSDP2's) take one op call and one all-reduce. Grads of several kinds (plain tensors
    beside DTensors, several meshes) take one call per kind, each reading its own grads once, since each kind's
    sum is reduced over its own groups. Without DTensors this is the op itself. The all-reduces are collectives:
    every rank passes grads of the same kinds in the same order (FSDP2 gives every rank a grad for every param,
    empty shards included); a plain grad beside DTensors is taken to be the same on every rank (counted once)."""
    keys = [None if g is None else _norm_key(g) for g in grads]
    if all(k is None for k in keys):
        return ops.unscale_and_check_(grads, inv_scale, found_inf, norm_sq, per_tensor_inf=per_tensor_inf,
                                      check_only=check_only, backend=backend)
    locals_ = [None if g is None else local(g) for g in grads]
    kinds = {k: None for k, g in zip(keys, grads) if g is not None}  # ordered, deduplicated
    for kind in kinds:
        part = None if norm_sq is None else torch.zeros((), dtype=_F32, device=norm_sq.device)
        selected = locals_ if len(kinds) == 1 else [g if k == kind else None for g, k in zip(locals_, keys)]
        ops.unscale_and_check_(selected, inv_scale, found_inf, part, per_tensor_inf=per_tensor_inf,
                               check_only=check_only, backend=backend)
        if part is not None:
            if kind is not None:
                g0 = grads[keys.index(kind)]
                for group in norm_sq_groups(g0):
                    dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
            norm_sq.add_(part.reshape(norm_sq.shape))
    return None


# ------------------------------------------------------------------------------------- the FSDP2 recipe

def _default_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The children of every nn.ModuleList (a transformer's repeated blocks: GPT-2's h, Llama's layers); if there
    is none, the root's children that hold parameters (a Sequential's layers)."""
    blocks = [m for lst in model.modules() if isinstance(lst, torch.nn.ModuleList) for m in lst]
    if blocks:
        return [m for m in blocks if any(True for _ in m.parameters())]
    return [m for m in model.children() if any(True for _ in m.parameters())]


def _own_dtypes(module: torch.nn.Module) -> set:
    return {p.dtype for p in module.parameters(recurse=False)}


def shard_blocks(model: torch.nn.Module, *, mesh=None, mp_policy=None, reshard_after_forward: bool = True,
                 blocks=None, keep_fp32=None) -> torch.nn.Module:
    """FSDP2 block by block: fully_shard each normalization layer on its own, then each block, then the root.

    Use it as mixprec.prepare(model, dtype=torch.bfloat16, shard=mixprec.distributed.shard_blocks) (setup b: half
    params sharded, fp32 masters in the optimizer), or on an fp32 model with
    mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) (setup a).

    blocks: the modules to shard as one unit each (default: the children of every nn.ModuleList, else the root's
        children holding parameters). FSDP2 all-gathers one flat buffer per unit and needs one dtype in it, so the
        fp32 modules of a half model (the norms prepare keeps fp32) are units of their own, sharded first: without
        mp_policy and keep_fp32, every module whose own params are all fp32 in a model holding half params (what
        prepare/convert left in fp32, whatever its keep_fp32 was); otherwise the modules keep_fp32 selects (default
        mixprec.precision.DEFAULT_KEEP_FP32, the normalization layers). With an mp_policy, those units run with
        param_dtype=float32 and output_dtype=mp_policy.param_dtype (inputs cast up, outputs cast back, as prepare's
        hooks do), and the root with output_dtype=float32 unless the policy sets one (the loss in fp32).
        mesh (a 2-D mesh: HSDP), reshard_after_forward: fully_shard's.

    Refused: a param with a main_grad (see check_no_main_grad), a unit whose own params have two dtypes. Returns
    the model (sharded in place)."""
    from torch.distributed.fsdp import fully_shard

    from mixprec import precision

    for name, p in model.named_parameters():
        if getattr(p, "main_grad", None) is not None:
            raise _main_grad_error(f"parameter '{name}' (about to be sharded)")
    keep = precision.DEFAULT_KEEP_FP32 if keep_fp32 is None else tuple(keep_fp32)
    if mp_policy is None and keep_fp32 is None:
        # converted by prepare/convert: its fp32 modules among half ones are the kept ones, whatever keep_fp32 said
        half = any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters())
        own_unit = (lambda m: half and _own_dtypes(m) == {_F32})
    else:
        own_unit = (lambda m: precision._keeps_fp32(m, keep) and bool(_own_dtypes(m)))
    units = list(_default_blocks(model) if blocks is None else blocks)
    kwargs = {"reshard_after_forward": reshard_after_forward}
    if mesh is not None:
        kwargs["mesh"] = mesh
    norm_policy = root_policy = mp_policy
    if mp_policy is not None:
        norm_policy = dataclasses.replace(mp_policy, param_dtype=_F32, output_dtype=mp_policy.param_dtype)
        if mp_policy.output_dtype is None:
            root_policy = dataclasses.replace(mp_policy, output_dtype=_F32)
    with_policy = (lambda policy: {} if policy is None else {"mp_policy": policy})
    for module in list(model.modules()):
        if module is not model and own_unit(module):
            fully_shard(module, **kwargs, **with_policy(norm_policy))
    for unit in (*units, model):
        dtypes = {p.dtype for p in unit.parameters() if not is_dtensor(p)}
        if len(dtypes) > 1:
            raise ValueError(f"shard_blocks: {type(unit).__name__} holds parameters of dtypes "
                             f"{sorted(map(str, dtypes))} outside its normalization layers; FSDP2 needs one dtype "
                             "per fully_shard unit (pass keep_fp32= or blocks= to split it)")
        fully_shard(unit, **kwargs, **with_policy(root_policy if unit is model else mp_policy))
    return model
