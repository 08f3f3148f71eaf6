"""Measured memory-bandwidth ceilings that the benchmarks compare each kernel against.

CPU: mixprec's own C++ streaming kernel (the private op torch.ops.mixprec._stream_bench_, AVX2, all cores
through at::parallel_for), run with the read/write mix and working-set size of the kernel it judges. A
fixed figure would mislead: on the 2-core Zen 3 build machines the bandwidth moves with the working set
(a plain OpenMP C++ loop measured there ~43 GB/s at 8M fp32 elements read 4x / written 3x, 29 GB/s at 32M)
and with the mix.
GPU: a device-to-device copy (torch), moving the same number of bytes.

    gbps, timing = cpu_stream_gbps(read_bytes, write_bytes)
    fn = cpu_stream(read_bytes, write_bytes)   # to time it in the same rounds as the kernel it judges

The kernel uses every memory technique the kernels it judges use, so none can beat it: reads with software
prefetch (as the unscale kernel), arrays read and written in place with ordinary stores, write-only arrays
with non-temporal stores (as the Adam kernel writes the half param beside fp32 masters: no read-for-ownership,
so such a byte crosses the memory bus once). How the CPU figure compares to that OpenMP loop's: the loop did
fp32 arithmetic with ordinary stores; this kernel moves the same bytes (three arrays read and written back in
place, one read only: Adam's pattern) with one XOR per 32 bytes, so on the same machine it should match or beat
it; if it falls short, the kernels judged against it are being flattered. `cpu_stream_gbps(4 * array,
3 * array, arrays=[(array, array)] * 3 + [(array, 0)])` measures the same point; compare on a quiet machine
(with others compiling on the 2 cores, every figure drops 2-4x).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from mixprec.benchmarks.timing import Timing, measure, measure_gpu, reduced, rotation


class Ceiling(NamedTuple):
    gbps: float  # (read + write bytes) / median time
    timing: Timing


Layout = Sequence[tuple[int, int]]


def default_layout(read_bytes: int, write_bytes: int, arrays: int = 1) -> list[tuple[int, int]]:
    """In place as far as the mix allows, as mixprec's kernels are: min(read, write) bytes read and then
    written back, the rest read-only or write-only; each part split into `arrays` equal arrays (hardware
    prefetchers track a limited number of streams, so the stream count can matter)."""
    if arrays < 1:
        raise ValueError(f"arrays must be >= 1, got {arrays}")
    both = min(read_bytes, write_bytes)
    parts = [(both, both), (read_bytes - both, 0), (0, write_bytes - both)]
    layout = []
    for r, w in parts:
        if r or w:
            layout += [(r // arrays + (i < r % arrays), w // arrays + (i < w % arrays)) for i in range(arrays)]
    return layout


def _check_layout(read_bytes: int, write_bytes: int, layout: Layout) -> None:
    if read_bytes < 0 or write_bytes < 0 or read_bytes + write_bytes == 0:
        raise ValueError(f"read_bytes and write_bytes must be >= 0 and not both 0, got {read_bytes}, {write_bytes}")
    for r, w in layout:
        if r < 0 or w < 0 or (r and w and r != w):
            raise ValueError(f"arrays: each entry is (read_bytes, write_bytes) with equal sizes when an array is "
                             f"both read and written (in place), got {(r, w)}")
    total_r, total_w = sum(r for r, _ in layout), sum(w for _, w in layout)
    if (total_r, total_w) != (read_bytes, write_bytes):
        raise ValueError(f"arrays move {total_r} B read / {total_w} B written, but read_bytes={read_bytes}, "
                         f"write_bytes={write_bytes}")


def _buffers(layout: Layout, device: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    reads, writes = [], []
    for r, w in layout:
        # Filled, not empty: the first touch of each page is not part of what is measured.
        t = torch.ones(max(r, w), dtype=torch.uint8, device=device)
        if r:
            reads.append(t)
        if w:
            writes.append(t)
    return reads, writes


def _repeats(quick: bool) -> tuple[int, float]:
    if reduced():
        return 3, 0.0
    return (10, 0.2) if quick else (30, 1.0)


def cpu_stream(read_bytes: int, write_bytes: int, *, arrays: int | Layout = 1, rotate: int | None = None):
    """The streaming kernel as fn(i), buffers allocated, for callers that time it themselves (interleaved with
    the kernel it judges, see timing.measure_interleaved). Arguments as in cpu_stream_gbps."""
    from mixprec import _ext

    if not _ext.available():
        raise RuntimeError(f"the CPU ceiling needs the mixprec._C extension ({_ext.LOAD_ERROR})")
    layout = default_layout(read_bytes, write_bytes, arrays) if isinstance(arrays, int) else list(arrays)
    _check_layout(read_bytes, write_bytes, layout)
    working_set = sum(max(r, w) for r, w in layout)
    sets = [_buffers(layout, "cpu") for _ in range(rotate or rotation(working_set))]
    return lambda i: torch.ops.mixprec._stream_bench_(*sets[i % len(sets)])


def cpu_stream_gbps(read_bytes: int, write_bytes: int, *, arrays: int | Layout = 1, rotate: int | None = None,
                    quick: bool = False) -> Ceiling:
    """The CPU bandwidth a streaming kernel reaches reading `read_bytes` and writing `write_bytes` per call.

    arrays: an int k spreads the default layout (in place as far as possible, see default_layout) over k
    arrays per part; or an explicit list of (read_bytes, write_bytes) per array, where an array with both
    is read then written in place (equal sizes). rotate: buffer sets cycled through (default: enough to
    leave the last-level cache behind, as the benchmarks do with their own inputs). Returns (GB/s, Timing).
    """
    fn = cpu_stream(read_bytes, write_bytes, arrays=arrays, rotate=rotate)
    repeats, min_time_s = _repeats(quick)
    timing = measure(fn, repeats=repeats, min_time_s=min_time_s)
    return Ceiling(gbps(read_bytes + write_bytes, timing), timing)


def gbps(nbytes: int, timing: Timing) -> float:
    return nbytes / (timing.median_ms * 1e6)


def cuda_copy_gbps(read_bytes: int, write_bytes: int, *, quick: bool = False) -> Ceiling:
    """The bandwidth of a device-to-device copy (torch) moving read_bytes + write_bytes in all. A copy reads
    and writes equal amounts, so an unbalanced mix is judged against the balanced copy of the same total."""
    if not torch.cuda.is_available():
        raise RuntimeError("cuda_copy_gbps needs a CUDA device")
    n = max(1, (read_bytes + write_bytes) // 2)
    src = torch.ones(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    timing = measure_gpu(lambda: dst.copy_(src), quick=quick)
    return Ceiling(gbps(2 * n, timing), timing)
