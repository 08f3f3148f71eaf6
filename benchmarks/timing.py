"""Timing for the microbenchmarks: warm-up, many repeats, median and quartiles.

fn(i) runs one iteration on buffer set i % rotate (callers keep `rotate` copies of their inputs so that
the cache does not flatter small sizes). On CUDA tensors the GPU is timed with events, on the CPU with
perf_counter around each call.
"""
from __future__ import annotations

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
