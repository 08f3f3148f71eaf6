"""The long fuzzing run of mixprec's public API: the targets of tests/fuzz_targets.py (which tests/test_fuzz.py runs
briefly in CI), each in worker processes of its own, so that a segfault, an abort or a hang is counted as a crash
of the input that caused it instead of ending the run.

    python tools/fuzz.py --examples 1000                    # every target, 1000 inputs each
    python tools/fuzz.py --examples 300 --target ops.matmul --backends cpu,reference,triton
    python tools/fuzz.py --replay ops.matmul "{'backend': 'cpu', ...}"   # one case again, in this process

Prints the tally per target and in total (inputs tried, ok and how many of those an oracle checked, clear errors,
crashes, silent wrong answers, data lost; the classification is in tests/fuzz_targets.py's docstring) and, per
finding (same target, outcome and message up to numbers), how often it occurred and its shortest case as a
reproducer. --json FILE writes all of it.
Triton runs under TRITON_INTERPRET=1 on CPU tensors (the targets' sizes are small), when --backends names it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("ok", "clear", "crash", "wrong", "lost")
COLUMNS = [("inputs", "inputs tried"), ("ok", "ok"), ("checked", "of which checked"), ("clear", "clear errors"),
           ("crash", "crashes"),
           ("wrong", "silent wrong answers"), ("lost", "data lost")]


def _targets():
    sys.path.insert(0, ROOT)
    from tests import fuzz_targets

    return fuzz_targets


# ---------------------------------------------------------------- the worker (one process per target, restarted)

def worker(target: str, examples: int, seed: int, backends: tuple, log_path: str) -> int:
    """Runs `examples` hypothesis cases of a target, logging a line before each case and one with its outcome:
    the parent learns which case was running when the process died or hung."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    ft = _targets()
    log = open(log_path, "a", buffering=1)
    # a self-test of the crash isolation (tests/test_fuzz.py): abort at the start of the K-th case
    abort_at = int(os.environ.get("MIXPREC_FUZZ_ABORT_AT", "0"))
    count = [0]

    @hseed(seed)
    @settings(max_examples=examples, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(ft.TARGETS[target].cases(backends))
    def run(case):
        log.write(json.dumps({"begin": repr(case)}) + "\n")
        count[0] += 1
        if count[0] == abort_at:
            os.abort()
        try:
            out = ft.run_case(target, case)
            kind, detail = out.kind, out.detail
        except Exception as exc:  # noqa: BLE001  (a fault of the harness, not of mixprec: counted apart)
            kind, detail = "harness", f"{type(exc).__name__}: {exc}"
        log.write(json.dumps({"end": kind, "detail": detail}) + "\n")

    run()
    log.write(json.dumps({"done": True}) + "\n")
    log.close()
    return 0


# ---------------------------------------------------------------- the parent

def run_target(target: str, examples: int, seed: int, backends: tuple, timeout: float, verbose: bool) -> dict:
    """Runs a target's cases in worker processes until `examples` cases ran (or hypothesis ran out of new ones); a
    worker that dies or hangs costs the case it was running (a crash) and is restarted with another seed."""
    records = []  # (kind, detail, case repr)
    restarts = 0
    env = dict(os.environ)
    if "triton" in backends:
        env["TRITON_INTERPRET"] = "1"
    while len(records) < examples:
        if restarts:
            env.pop("MIXPREC_FUZZ_ABORT_AT", None)  # the self-test aborts the first worker only
        with tempfile.NamedTemporaryFile("w+", suffix=".jsonl", delete=False) as f:
            log_path = f.name
        # the worker's stderr goes to a file, not a pipe: a pipe read only after the worker exits fills up (~64 KB
        # of warnings) and blocks the worker, a false hang mid-case or a run that never ends between cases
        err_file = tempfile.TemporaryFile("w+")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", target, "--examples",
               str(examples - len(records)), "--seed", str(seed + 1000003 * restarts), "--backends",
               ",".join(backends), "--log", log_path]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err_file, text=True)
        pos, pending, last, done = 0, None, time.monotonic(), False
        hung = False
        while True:
            rc = proc.poll()
            with open(log_path) as f:
                f.seek(pos)
                chunk = f.read()
            lines = chunk.split("\n")
            pos += len(chunk) - len(lines[-1])  # keep a partial last line for the next read
            for line in lines[:-1]:
                entry = json.loads(line)
                if "begin" in entry:
                    pending, last = entry["begin"], time.monotonic()
                elif "end" in entry:
                    records.append((entry["end"], entry["detail"], pending))
                    pending = None
                    if verbose and len(records) % 100 == 0:
                        print(f"  {target}: {len(records)} inputs", file=sys.stderr)
                elif "done" in entry:
                    done = True
            if rc is not None:
                break
            if pending is not None and time.monotonic() - last > timeout:
                proc.kill()
                proc.wait()
                hung = True
                break
            time.sleep(0.05)
        err_file.seek(0)
        stderr = err_file.read()
        err_file.close()
        os.unlink(log_path)
        if pending is not None:  # the case the worker was running when it died or hung
            why = f"hang: no result after {timeout:.0f} s" if hung else _death(proc.returncode, stderr)
            records.append(("crash", why, pending))
            restarts += 1
            continue
        if proc.returncode != 0 and not done:
            records.append(("harness", f"worker failed between cases: {_death(proc.returncode, stderr)}", None))
            restarts += 1
            if restarts > 20:
                break
            continue
        break  # hypothesis generated all the cases it would
    return {"target": target, "records": records, "restarts": restarts}


def _death(rc: int, stderr: str) -> str:
    if rc is not None and rc < 0:
        import signal

        name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
        return f"the process died of {name}; stderr: {_tail(stderr)}"
    return f"the process exited with code {rc}; stderr: {_tail(stderr)}"


def _tail(text: str, n: int = 400) -> str:
    text = " ".join(text.split())
    return text[-n:]


def signature(detail: str) -> str:
    """A finding's message up to numbers, values and positions (so that one cause is one finding)."""
    text = re.sub(r" \(names none of \[[^\]]*\]\)", "", detail)
    text = re.sub(r"0x[0-9a-f]+", "#", text)
    text = re.sub(r"-?\d+(\.\d+)?(e[-+]?\d+)?", "#", text)
    text = re.sub(r"'[^']*'", "'…'", text)
    return text[:160]


def tally(results: list[dict]) -> tuple[list, dict]:
    rows = []
    total = {k: 0 for k, _ in COLUMNS}
    total["harness"] = 0
    for r in results:
        counts = {k: 0 for k, _ in COLUMNS}
        counts["harness"] = 0
        for kind, detail, _ in r["records"]:
            counts[kind] = counts.get(kind, 0) + 1
            if kind == "ok" and detail == "checked":
                counts["checked"] += 1
            if kind != "harness":
                counts["inputs"] += 1
        rows.append((r["target"], counts))
        for k in total:
            total[k] += counts.get(k, 0)
    return rows, total


def findings(results: list[dict]) -> list[dict]:
    groups: dict = {}
    for r in results:
        for kind, detail, case in r["records"]:
            if kind in ("ok", "clear"):
                continue
            key = (r["target"], kind, signature(detail))
            g = groups.setdefault(key, {"target": r["target"], "kind": kind, "count": 0, "detail": detail,
                                        "case": case})
            g["count"] += 1
            if case is not None and (g["case"] is None or len(case) < len(g["case"])):
                g["case"], g["detail"] = case, detail
    return sorted(groups.values(), key=lambda g: (g["target"], g["kind"], -g["count"]))


def format_table(rows, total) -> str:
    header = ["target"] + [label for _, label in COLUMNS]
    body = [[name] + [str(c[k]) for k, _ in COLUMNS] for name, c in rows]
    body.append(["total"] + [str(total[k]) for k, _ in COLUMNS])
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [header, ["-" * w for w in widths], *body]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in lines)


def replay(target: str, text: str) -> int:
    ft = _targets()
    case = eval(text, {"__builtins__": {}}, {"nan": math.nan, "inf": math.inf})  # a case is a plain literal
    out = ft.run_case(target, case)
    print(f"{out.kind}: {out.detail}")
    return 0 if out.kind in ("ok", "clear") else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=500, help="inputs per target (default 500)")
    p.add_argument("--target", action="append", help="a target's name (repeatable; default: all)")
    p.add_argument("--backends", default="cpu,reference,triton",
                   help="comma-separated backends the cases use (default cpu,reference,triton)")
    p.add_argument("--seed", type=int, default=20260111, help="hypothesis seed (a run is reproducible)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds one input may take before it is a hang")
    p.add_argument("--show", type=int, default=40, help="findings to print (default 40)")
    p.add_argument("--json", metavar="FILE", help="also write the tally, findings and every record as JSON")
    p.add_argument("--replay", nargs=2, metavar=("TARGET", "CASE"), help="run one case again, in this process")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--log", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    backends = tuple(b for b in args.backends.split(",") if b)
    if args.worker:
        return worker(args.worker, args.examples, args.seed, backends, args.log)
    if args.replay:
        return replay(*args.replay)
    ft = _targets()
    names = args.target or list(ft.TARGETS)
    unknown = [n for n in names if n not in ft.TARGETS]
    if unknown:
        p.error(f"unknown target(s) {unknown}; targets: {list(ft.TARGETS)}")
    start = time.monotonic()
    results = []
    for name in names:
        t0 = time.monotonic()
        results.append(run_target(name, args.examples, args.seed, backends, args.timeout, verbose=True))
        print(f"  {name}: {len(results[-1]['records'])} inputs in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    wall = time.monotonic() - start
    rows, total = tally(results)
    print(f"python tools/fuzz.py --examples {args.examples} --backends {','.join(backends)} --seed {args.seed}"
          f"{''.join(f' --target {n!r}' for n in args.target or [])}: {wall:.0f} s wall")
    print(format_table(rows, total))
    if total["harness"]:
        print(f"\n{total['harness']} faults of the harness itself (not counted as inputs): see --json")
    found = findings(results)
    if found:
        print(f"\nfindings ({len(found)}; shortest case of each):")
    for g in found[: args.show]:
        print(f"- [{g['target']}] {g['kind']} x{g['count']}: {g['detail']}\n    case: {g['case']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"wall_s": wall, "table": rows, "total": total, "findings": found, "results": results}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
