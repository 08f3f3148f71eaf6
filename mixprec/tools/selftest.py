"""`python -m mixprec selftest [--device cuda|cpu]`: every op and backend on this machine against mixprec.reference.

One line per (op, backend, dtype, shape) with the error found; exit code 0 only when every check passed.
Then the quick benchmark table for the device (--no-bench skips it). On the CPU it checks the CPU extension
(AVX2 and portable kernels) and the Triton kernels under the interpreter.

The checks themselves are in mixprec/tools/selftest_cases.py (one entry per mixprec.ops module); a Case's
`check()` runs on fresh random inputs (special values included), raises AssertionError naming what differs, and
otherwise returns a short account of the error it measured.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pkgutil
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Case:
    op: str
    backend: str  # the label shown, e.g. "cpu-avx2"
    dtype: str
    shape: str
    check: Callable[[], str]
    env: dict = field(default_factory=dict)  # environment the check runs under (e.g. MIXPREC_CPU_SIMD)


@dataclass
class Backend:
    label: str  # shown in the report
    name: str  # the backend= argument
    env: dict


def backends(device: str) -> list[Backend]:
    """The backends an op can be checked with on `device` here (every op uses this one list)."""
    from mixprec import _backend, _ext, testing
    from mixprec.tools.info import cpu_flags

    out = []
    if device == "cpu":
        if _ext.available():
            out += [Backend(name, "cpu", {"MIXPREC_CPU_SIMD": env}) for name, (env, flags) in testing.CPU_SIMD.items()
                    if flags <= cpu_flags()]
        if _backend.triton_available() and _backend.triton_interpreter_enabled():
            out.append(Backend("triton-interp", "triton", {}))
    else:
        if _ext.has_cuda_kernels():
            out.append(Backend("cuda", "cuda", {}))
        if _backend.triton_available() and not _backend.triton_interpreter_enabled():
            out.append(Backend("triton", "triton", {}))
    return out


def collect_cases(device: str) -> tuple[list[Case], list[str]]:
    """The cases of every mixprec.ops module, and the op modules that have none (reported, so that a missing
    check is visible rather than silently passing)."""
    import mixprec.ops as ops
    from mixprec.tools.selftest_cases import CASES

    cases, unchecked = [], []
    for m in sorted(pkgutil.iter_modules(ops.__path__), key=lambda m: m.name):
        if m.name.startswith("_"):
            continue
        if m.name in CASES:
            cases += CASES[m.name](device)
        else:
            unchecked.append(m.name)
    return cases, unchecked


@contextlib.contextmanager
def _environment(env: dict):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_cases(cases: list[Case], stream=sys.stdout) -> int:
    """Runs every case, one line each; returns the number that failed."""
    widths = [max([len(getattr(c, a)) for c in cases] + [len(a)]) for a in ("op", "backend", "dtype", "shape")]
    failed = 0
    for c in cases:
        start = time.perf_counter()
        try:
            with _environment(c.env):
                detail, status = c.check(), "ok"
        except AssertionError as exc:
            detail, status = str(exc) or "assertion failed", "FAIL"
        except Exception as exc:  # a crash is a failure of that case, reported with its type
            detail, status = f"{type(exc).__name__}: {exc}", "FAIL"
            if os.environ.get("MIXPREC_SELFTEST_TRACEBACK"):
                traceback.print_exc()
        failed += status != "ok"
        cells = [c.op, c.backend, c.dtype, c.shape]
        line = "  ".join(x.ljust(w) for x, w in zip(cells, widths))
        print(f"{status:<4}  {line}  {detail}  [{time.perf_counter() - start:.2f} s]", file=stream, flush=True)
    return failed


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present, else cpu")
    p.add_argument("--no-bench", action="store_true", help="skip the benchmark table")
    p.add_argument("--op", action="append", help="only the checks of this op (repeatable), e.g. matmul")
    p.add_argument("--backend", action="append", help="only the checks of this backend label (repeatable), e.g. cuda")


def main(args) -> int:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is present", file=sys.stderr)
        return 2
    if device == "cpu" and "mixprec.kernels" not in sys.modules:
        # Triton runs CPU tensors only under its interpreter, which must be on before a kernel is decorated.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    # numpy, under the interpreter, warns about the inf and NaN the checks plant on purpose
    warnings.filterwarnings("ignore", "overflow encountered", RuntimeWarning)
    cases, unchecked = collect_cases(device)
    cases = [c for c in cases if (not args.op or c.op in args.op) and (not args.backend or c.backend in args.backend)]
    if unchecked:
        names = ", ".join(f"mixprec.ops.{u}" for u in unchecked)
        print(f"note: not checked here, no cases in mixprec/tools/selftest_cases.py for: {names}", flush=True)
    if not cases:
        print(f"error: no checks available on {device} (see `python -m mixprec info`)", file=sys.stderr)
        return 1
    print(f"selftest on {device}: {len(cases)} checks against mixprec.reference / torch", flush=True)
    failed = run_cases(cases)
    print(f"{len(cases) - failed} passed, {failed} failed", flush=True)
    bench_rc = 0
    if not args.no_bench:
        from mixprec.tools import bench

        parser = argparse.ArgumentParser()
        bench.add_arguments(parser)
        bench_args = ["--quick", "--device", device]
        print(f"\nbenchmarks (python -m mixprec bench {' '.join(bench_args)}):", flush=True)
        bench_rc = bench.main(parser.parse_args(bench_args), bench_args)
    return 1 if failed or bench_rc else 0
