"""The benchmark row (CONTRIBUTING.md, "Benchmark rows"): one dict per measured kernel, built in one place."""
from __future__ import annotations

from mixprec.benchmarks.timing import Timing


def row(*, op: str, backend: str, device: str, shape: str, dtype: str, timing: Timing, unit: str, work: float,
        ceiling: float | None, peers: dict[str, Timing], notes: str = "") -> dict:
    """work: the bytes (unit "GB/s") or flops (unit "TFLOP/s") the kernel must move or do per call; the
    achieved value is work / median time. Peers' medians go into `peers`, their quartiles into the notes."""
    if unit not in ("GB/s", "TFLOP/s"):
        raise ValueError(f"unit must be 'GB/s' or 'TFLOP/s', got {unit!r}")
    per_ms = 1e6 if unit == "GB/s" else 1e9  # GB/s = bytes / (ms * 1e6); TFLOP/s = flops / (ms * 1e9)
    spreads = [f"{name}: IQR {t.q25_ms:.3g}-{t.q75_ms:.3g} ms" for name, t in peers.items()]
    return {
        "op": op, "backend": backend, "device": device, "shape": shape, "dtype": dtype,
        "median_ms": timing.median_ms, "q25_ms": timing.q25_ms, "q75_ms": timing.q75_ms,
        "unit": unit, "value": work / (timing.median_ms * per_ms), "ceiling": ceiling,
        "peers": {name: t.median_ms for name, t in peers.items()},
        "notes": "; ".join(x for x in [notes, *spreads] if x),
    }


def run_on_device(device: str, quick: bool, *, cpu, cuda) -> list[dict]:
    """A bench script's run(): its CPU or its CUDA part. (Run the scripts with `python -m mixprec bench --op NAME`.)"""
    parts = {"cpu": cpu, "cuda": cuda}
    if device not in parts:
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    return parts[device](quick)
