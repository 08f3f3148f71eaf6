"""Timing for the microbenchmarks: warm-up, many repeats, median and quartiles.

fn(i) runs one iteration on buffer set i % rotate (callers keep `rotate` copies of their inputs so that
the cache does not flatter small sizes). On CUDA tensors the GPU is timed with events, on the CPU with
perf_counter around each call.
"""
from __future__ import annotations

import functools
import os
import statistics
import time
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median_ms: float
    q25_ms: float
    q75_ms: float
    repeats: int


def _summary(samples_ms: list[float]) -> Timing:
    q = statistics.quantiles(samples_ms, n=4) if len(samples_ms) > 1 else [samples_ms[0]] * 3
    return Timing(statistics.median(samples_ms), q[0], q[2], len(samples_ms))


# `python -m mixprec bench --reduced` (CI) sets this: each script then runs tiny sizes and few repeats, to check
# that it works and that its rows are well-formed, not to measure anything.
REDUCED_ENV = "MIXPREC_BENCH_REDUCED"


def reduced() -> bool:
    return os.environ.get(REDUCED_ENV, "0") not in ("", "0")


@functools.cache
def llc_bytes() -> int:
    """Size of the CPU's last-level cache (32 MB when the OS does not say)."""
    for index in range(4, -1, -1):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as f:
                text = f.read().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    return 32 << 20


def rotation(working_set_bytes: int, *, limit: int = 16) -> int:
    """How many copies of a working set to cycle through so that each call finds its data out of cache:
    enough to cover twice the last-level cache, at most `limit`."""
    if working_set_bytes <= 0:
        return 1
    return max(1, min(limit, -(-2 * llc_bytes() // working_set_bytes)))


def measure_gpu(fn, *, quick: bool = False) -> Timing:
    """Median and quartiles of fn() on the current CUDA device, timed by triton.testing.do_bench (which
    clears L2 between calls), or by CUDA events when triton is missing."""
    try:
        from triton.testing import do_bench
    except ImportError:
        return measure(lambda i: fn(), device="cuda", warmup=5, repeats=20 if quick else 100)
    median, q25, q75 = do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 200, quantiles=[0.5, 0.25, 0.75])
    return Timing(median, q25, q75, 0)  # do_bench picks the number of repeats from `rep` (ms); 0 = not known


def measure(fn, *, device: str = "cpu", warmup: int = 3, repeats: int = 20, min_time_s: float = 0.0) -> Timing:
    """Median and quartiles of fn(i) over `repeats` calls (more while under min_time_s), after `warmup` calls."""
    for i in range(warmup):
        fn(i)
    samples = []
    start = time.perf_counter()
    i = warmup
    while len(samples) < repeats or time.perf_counter() - start < min_time_s:
        if device == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn(i)
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(i)
            samples.append((time.perf_counter() - t0) * 1e3)
        i += 1
    return _summary(samples)


def measure_interleaved(fns: dict, *, warmup: int = 3, repeats: int = 20, min_time_s: float = 0.0) -> dict[str, Timing]:
    """measure() for several CPU contenders at once, in rounds that call each once (in a rotating order), so
    that a change of load on a shared machine (others compiling) falls on all of them alike, and their ratios
    stay fair when the absolute times do not. fn(i) as in measure()."""
    names = list(fns)
    for i in range(warmup):
        for name in names:
            fns[name](i)
    samples = {name: [] for name in names}
    start = time.perf_counter()
    i = warmup
    while i - warmup < repeats or time.perf_counter() - start < min_time_s:
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            fns[name](i)
            samples[name].append((time.perf_counter() - t0) * 1e3)
        i += 1
    return {name: _summary(s) for name, s in samples.items()}
