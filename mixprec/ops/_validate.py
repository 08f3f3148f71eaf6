"""Argument checks shared by the public ops: each error names the argument."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor_list(name: str, tensors, *, dtypes=FLOAT_DTYPES, allow_none: bool = False) -> list:
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(tensors).__name__}")
    for i, t in enumerate(tensors):
        if t is None and allow_none:
            continue
        # the name is formatted only for a tensor that fails (a list of hundreds is checked every step)
        if not (isinstance(t, torch.Tensor) and t.layout == torch.strided and t.dtype in dtypes):
            check_tensor(f"{name}[{i}]", t, dtypes=dtypes)
    return list(tensors)


def check_tensor(name: str, t, *, dtypes=FLOAT_DTYPES) -> None:
    """A dense (strided) tensor of one of `dtypes`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense tensor, got layout {t.layout} (sparse tensors are not supported)")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def common_device(name: str, tensors) -> torch.device | None:
    """The one device all tensors are on (None for an empty list); a clear error otherwise."""
    device = None
    for i, t in enumerate(tensors):
        if t is None:
            continue
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"{name}[{i}] is on {t.device}, but {name}[0] is on {device}: all must share one device")
    return device


def check_scalar(name: str, t, device: torch.device, dtype=torch.float32) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a one-element {dtype} tensor, got {type(t).__name__}")
    if t.numel() != 1:
        raise ValueError(f"{name} must have exactly one element, got shape {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} (the tensors' device), got {t.device}")


def check_dense(name: str, t: torch.Tensor) -> None:
    """Element-wise kernels walk storage linearly: any non-overlapping dense layout works (channels_last too)."""
    if not t.is_contiguous() and not is_non_overlapping_and_dense(t):
        raise ValueError(f"{name} must be non-overlapping and dense (e.g. contiguous); call .contiguous() first")


def is_non_overlapping_and_dense(t: torch.Tensor) -> bool:
    """Its elements fill a contiguous range of storage exactly once, in some dimension order."""
    if t.numel() == 0:
        return True
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(t.shape, t.stride()) if s != 1), key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def has_self_overlap(t: torch.Tensor) -> bool:
    """Whether two elements of t share one address (an expanded view, stride 0, or as_strided rows that overlap):
    a kernel that writes each element once from one thread or program would give such aliases one of several
    results, or race. Exact: dimensions sorted by stride that each step past everything the smaller ones reach
    cannot overlap (one pass over the dims); a layout whose strides do not nest (sizes (2, 3), strides (3, 2)) may
    still write each element once, and is decided from its offsets (one integer per element, for a rare layout)."""
    dims = sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1)
    reach = 0  # the largest offset the dims of smaller stride reach
    for stride, size in dims:
        if stride == 0:
            return True
        if stride <= reach:
            offsets = sum(torch.arange(sz).mul_(st).view([-1 if d == i else 1 for d in range(len(dims))])
                          for i, (st, sz) in enumerate(dims))
            return torch.unique(offsets).numel() != offsets.numel()
        reach += (size - 1) * stride
    return False


def check_writable(name: str, t: torch.Tensor) -> None:
    """The checks torch's own in-place ops make before writing into `t`, so that every backend (the extension,
    Triton, the reference) refuses the same inputs with torch's error types: an inference tensor outside
    inference mode, and a leaf that requires grad while grad mode is on."""
    if t.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(f"{name} is an inference tensor: an in-place update to it outside InferenceMode is not "
                           "allowed (clone it, or run under torch.inference_mode())")
    if t.requires_grad and t.is_leaf and torch.is_grad_enabled():
        raise RuntimeError(f"{name} is a leaf tensor that requires grad: it cannot be written in place while grad "
                           "mode is on (run under torch.no_grad())")


def check_distinct(name: str, tensors) -> None:
    """No two entries of a list the op writes share memory: kernels update each entry once, on several threads,
    so an alias would race (and a repeated tensor would be updated once, not twice).

    note: the byte spans are sorted by start and each is compared with the furthest end seen so far (O(n log n),
    ~100 us for 150 tensors); two spans that intersect share memory for sure when both views are dense, and are
    tested element by element otherwise (interleaved views such as base[:, :5] and base[:, 5:] share no element)."""
    spans = []
    for i, t in enumerate(tensors):
        if t is None or t.numel() == 0:
            continue
        lo = t.data_ptr()
        spans.append((lo, lo + (t.numel() * t.element_size() if t.is_contiguous() else _byte_extent(t)), i, t))
    spans.sort(key=lambda s: s[0])
    reach = None  # the span reaching furthest so far: (end, index, tensor)
    for lo, hi, i, t in spans:
        if reach is not None and lo < reach[0] and t.device == reach[2].device and _share_elements(reach[2], t):
            j, k = sorted((reach[1], i))
            raise ValueError(f"{name}[{j}] and {name}[{k}] share memory (the same tensor twice, or overlapping "
                             "views): each tensor may appear once")
        if reach is None or hi > reach[0]:
            reach = (hi, i, t)


def _byte_extent(t: torch.Tensor) -> int:
    """Bytes from t's first element to the end of its last one."""
    return (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()


def _share_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two views whose byte spans intersect (same storage) have an element in common."""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return True  # different storages whose memory intersects: treat as shared
    if is_non_overlapping_and_dense(a) and is_non_overlapping_and_dense(b) and a.dtype == b.dtype:
        return True
    return bool(torch.isin(_byte_offsets(a), _byte_offsets(b)).any())


def _byte_offsets(t: torch.Tensor) -> torch.Tensor:
    """The byte offset in storage of every byte of every element of t (a slow exact test, for rare layouts)."""
    size = t.element_size()
    offsets = torch.tensor([t.storage_offset() * size], dtype=torch.int64)
    for n, st in zip(t.shape, t.stride()):
        offsets = (offsets.unsqueeze(-1) + torch.arange(n, dtype=torch.int64) * st * size).reshape(-1)
    return (offsets.unsqueeze(-1) + torch.arange(size, dtype=torch.int64)).reshape(-1)
