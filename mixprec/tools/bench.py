"""`python -m mixprec bench`: runs every benchmarks/bench_*.py (installed as mixprec.benchmarks) and reports.

Each script runs in its own process (`python -m mixprec.tools.bench --worker ...`): a script that raises, crashes
or hangs is reported and makes the exit code non-zero, and the others still run; each also starts with a
clean heap, so one script's buffers do not squeeze the next one's. Rows follow CONTRIBUTING.md's format and
are checked here. Output: one table on stdout (or the JSON with --json) and, in --output DIR, results.json,
results.csv, ratios.png (ours against each peer) and vs_ceiling.png (achieved against the measured ceiling).
`--update-benchmarks-md` renders BENCHMARKS.md from the run's JSON (or from --from-json FILE without a run).

The arguments are checked before anything runs (an --output that cannot be written, a --from-json file that is
missing or not a results.json, an --update-benchmarks-md path that cannot be written, a --timeout that is not a
positive number): an argparse-style error and exit code 2, not a traceback after minutes of benchmarks. Every
file is written atomically (a temporary file in the same folder, then os.replace), so a full disk or a kill
leaves the previous file whole.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import importlib
import json
import math
import os
import pkgutil
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass

from mixprec.tools.cli import UsageError

REQUIRED = {"op": str, "backend": str, "device": str, "shape": str, "dtype": str, "median_ms": float,
            "q25_ms": float, "q75_ms": float, "unit": str, "value": float, "ceiling": (float, type(None)),
            "peers": dict, "notes": str}
UNITS = ("GB/s", "TFLOP/s")
SCRIPT_PREFIX = "bench_"


# ---------------------------------------------------------------- discovery and the per-script worker

def discover() -> list[str]:
    """Names of the benchmark scripts (bench_*.py) in mixprec.benchmarks, sorted."""
    import mixprec.benchmarks as package

    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if m.name.startswith(SCRIPT_PREFIX))


def row_problems(row) -> list[str]:
    """What is wrong with one row (empty when it is well-formed)."""
    if not isinstance(row, dict):
        return [f"a row must be a dict, got {type(row).__name__}"]
    problems = []
    for key, kind in REQUIRED.items():
        if key not in row:
            problems.append(f"missing {key!r}")
        elif not isinstance(row[key], kind) and not (kind is float and isinstance(row[key], int)):
            problems.append(f"{key!r} has type {type(row[key]).__name__}")
    if problems:
        return problems
    if row["unit"] not in UNITS:
        problems.append(f"unit must be one of {UNITS}, got {row['unit']!r}")
    figures = {k: row[k] for k in ("median_ms", "q25_ms", "q75_ms", "value")}
    figures.update({"ceiling": row["ceiling"]} if row["ceiling"] is not None else {})
    figures.update({f"peers[{k!r}]": v for k, v in row["peers"].items()})
    for name, v in figures.items():
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            problems.append(f"{name} must be a positive finite number, got {v!r}")
    if not problems and not row["q25_ms"] <= row["median_ms"] <= row["q75_ms"]:
        problems.append(f"quartiles out of order: {row['q25_ms']} <= {row['median_ms']} <= {row['q75_ms']} fails")
    return problems


def _worker(argv: list[str]) -> int:
    """Runs one script's run(quick, device) and writes its rows as JSON to `out`."""
    script, device, quick, out = argv
    module = importlib.import_module(f"mixprec.benchmarks.{script}")
    rows = module.run(quick == "1", device)
    if not isinstance(rows, list):
        raise TypeError(f"{script}.run() must return a list of rows, got {type(rows).__name__}")
    for i, r in enumerate(rows):
        if problems := row_problems(r):
            raise ValueError(f"{script}: row {i} is malformed: {'; '.join(problems)}")
    with open(out, "w") as f:
        json.dump(rows, f)
    return 0


# ---------------------------------------------------------------- running, with a progress bar

@dataclass
class Outcome:
    script: str
    device: str
    seconds: float
    rows: list
    error: str | None


class Progress:
    """One self-rewriting line on stderr: bar, job count, current job and its elapsed time."""

    def __init__(self, total: int, stream=sys.stderr, width: int = 24):
        self.total, self.done, self.stream, self.width = total, 0, stream, width
        self.label, self.start = "", time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._tick, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        if self.stream.isatty():
            self.stream.write("\n")
        self.stream.flush()

    def begin(self, label: str) -> None:
        with self._lock:
            self.label, self.start = label, time.monotonic()
        self._draw()

    def finish(self, status: str) -> None:
        with self._lock:
            self.done += 1
            elapsed = time.monotonic() - self.start
            erase = f"\r{' ' * 100}\r" if self.stream.isatty() else ""
            self.stream.write(f"{erase}  {status:<4} {self.label} ({elapsed:.1f} s)\n")
        self._draw()

    def _draw(self) -> None:
        if not self.stream.isatty():  # a log file gets the one line per finished script only
            return
        with self._lock:
            filled = self.width * self.done // max(1, self.total)
            now = f" {self.label} {time.monotonic() - self.start:5.1f} s" if self.done < self.total else ""
            self.stream.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total}{now}   ")
            self.stream.flush()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            self._draw()


def run_script(script: str, device: str, *, quick: bool, reduced: bool, timeout_s: float) -> Outcome:
    from mixprec.benchmarks.timing import REDUCED_ENV

    env = dict(os.environ)
    if reduced:
        env[REDUCED_ENV] = "1"
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        out, log = os.path.join(tmp, "rows.json"), os.path.join(tmp, "log.txt")
        cmd = [sys.executable, "-m", "mixprec.tools.bench", "--worker", script, device, "1" if quick else "0", out]
        with open(log, "w") as logf:
            try:
                rc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, timeout=timeout_s).returncode
            except subprocess.TimeoutExpired:
                rc = None
        seconds = time.monotonic() - start
        with open(log) as f:
            tail = f.read()[-3000:]
        if rc is None:
            return Outcome(script, device, seconds, [], f"timed out after {timeout_s:.0f} s\n{tail}")
        if rc != 0:
            return Outcome(script, device, seconds, [], f"exit code {rc}\n{tail}")
        with open(out) as f:
            return Outcome(script, device, seconds, json.load(f), None)


def available_devices() -> list[str]:
    import torch

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def machine() -> dict:
    from mixprec.tools.info import info

    d = info()
    return {"cpu": d["cpu"], "cpu_threads": d["cpu_cores"], "logical_cpus": os.cpu_count(), "torch": d["torch"],
            "triton": d["triton"], "mixprec": d["mixprec"], "cuda_device": d["cuda_device"],
            "python": d["python"]}


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def machine_line(m: dict) -> str:
    gpu = m["cuda_device"] or "no GPU"
    line = (f"{m['cpu']}, {m['logical_cpus']} logical CPUs ({m['cpu_threads']} torch threads), torch {m['torch']}, "
            f"triton {m['triton']}, Python {m['python']}, device: {gpu}")
    if m.get("load_before") is not None:
        line += f"; load average {m['load_before']} before the run, {m['load_after']} after"
    return line


# ---------------------------------------------------------------- reporting

def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def table_cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["op", "backend", "device", "shape", "dtype", "median ms (IQR)", "achieved", "% of ceiling", "vs peers"]
    body = []
    for r in rows:
        share = f"{100 * r['value'] / r['ceiling']:.0f}% of {_fmt(r['ceiling'])}" if r["ceiling"] else "-"
        peers = ", ".join(f"{name} {ms / r['median_ms']:.2f}x" for name, ms in r["peers"].items()) or "-"
        body.append([r["op"], r["backend"], r["device"], r["shape"], r["dtype"],
                     f"{_fmt(r['median_ms'])} ({_fmt(r['q25_ms'])}-{_fmt(r['q75_ms'])})",
                     f"{_fmt(r['value'])} {r['unit']}", share, peers])
    return header, body


def format_table(rows: list[dict], *, markdown: bool = False) -> str:
    header, body = table_cells(rows)
    if markdown:
        lines = [header, ["---"] * len(header), *body]
        return "\n".join("| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in lines)
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [header, ["-" * w for w in widths], *body]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def write_atomic(path: str, write, *, binary: bool = False) -> None:
    """Calls write(f) on a temporary file beside `path`, then renames it over `path` (os.replace is atomic
    within a filesystem): a reader never sees a half-written file, and a failure (a full disk, a kill) leaves
    the previous file as it was and no temporary file behind. The new file gets the old one's permission bits,
    or the umask's default for a new file (mkstemp's own 0600 would hide results from other users)."""
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": "", "encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data on disk before the rename makes it visible
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _mode_for(path: str) -> int:
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_csv(rows: list[dict], path: str) -> None:
    peer_names = sorted({name for r in rows for name in r["peers"]})
    fields = [k for k in REQUIRED if k != "peers"] + ["pct_of_ceiling"] + [f"ratio vs {p}" for p in peer_names]

    def write(f):
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            line = {k: r[k] for k in REQUIRED if k != "peers"}
            line["pct_of_ceiling"] = 100 * r["value"] / r["ceiling"] if r["ceiling"] else ""
            line.update({f"ratio vs {p}": ms / r["median_ms"] for p, ms in r["peers"].items()})
            w.writerow(line)

    write_atomic(path, write)


def _label(r: dict) -> str:
    # the shape names the pass (e.g. the check pass) and the dtype the variant: rows of one op differ there
    shape = r["shape"] if len(r["shape"]) <= 60 else r["shape"][:57] + "..."
    return f"{r['op']} [{r['backend']}, {r['device']}, {r['dtype']}, {shape}]"


def write_plots(rows: list[dict], out_dir: str) -> list[str]:
    """ratios.png and vs_ceiling.png; returns the paths written (none when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("note: matplotlib is not installed (pip install mixprec[bench]); no plots written", file=sys.stderr)
        return []
    written = []
    ratios = [(f"{_label(r)} vs {name}", ms / r["median_ms"]) for r in rows for name, ms in r["peers"].items()]
    if ratios:
        fig, ax = plt.subplots(figsize=(13, 0.45 * len(ratios) + 1.5))
        labels, values = zip(*ratios)
        # bars grow from 1x (parity) to the ratio, so slower-than-peer bars point left on the log axis
        ax.barh(range(len(values)), [v - 1 for v in values], left=1,
                color=["tab:green" if v >= 1 else "tab:red" for v in values])
        ax.set_xlim(min(0.5, min(values) / 1.5), max(2.0, max(values) * 3))  # room for the value labels
        ax.set_yticks(range(len(values)), labels, fontsize=8)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("speed-up of mixprec over the peer (peer median / ours; > 1 is faster)")
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.2f}x", va="center", fontsize=8)
        ax.invert_yaxis()
        fig.tight_layout()
        written.append(os.path.join(out_dir, "ratios.png"))
        write_atomic(written[-1], lambda f, fig=fig: fig.savefig(f, format="png", dpi=110), binary=True)
        plt.close(fig)
    judged = [r for r in rows if r["ceiling"]]
    if judged:
        units = sorted({r["unit"] for r in judged})
        fig, axes = plt.subplots(len(units), 1, figsize=(9, sum(0.6 * sum(r["unit"] == u for r in judged) + 1.2
                                                                  for u in units)), squeeze=False)
        for ax, unit in zip(axes[:, 0], units):
            sel = [r for r in judged if r["unit"] == unit]
            y = range(len(sel))
            ax.barh([i + 0.2 for i in y], [r["ceiling"] for r in sel], height=0.4, color="lightgray",
                    label="measured ceiling")
            ax.barh([i - 0.2 for i in y], [r["value"] for r in sel], height=0.4, color="tab:blue", label="achieved")
            for i, r in enumerate(sel):
                ax.text(r["value"], i - 0.2, f" {100 * r['value'] / r['ceiling']:.0f}%", va="center", fontsize=8)
            ax.set_yticks(list(y), [f"{_label(r)}\n{r['shape']}" for r in sel], fontsize=7)
            ax.set_xlabel(unit)
            ax.invert_yaxis()
            ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        written.append(os.path.join(out_dir, "vs_ceiling.png"))
        write_atomic(written[-1], lambda f, fig=fig: fig.savefig(f, format="png", dpi=110), binary=True)
        plt.close(fig)
    return written


def benchmarks_md(result: dict) -> str:
    """BENCHMARKS.md from a run's JSON: generated, never edited by hand."""
    lines = ["# Benchmarks", "",
             "<!-- Generated by `python -m mixprec bench --update-benchmarks-md`; do not edit by hand. -->", "",
             f"Command: `{result['command']}`  ", f"Machine: {machine_line(result['machine'])}  ",
             f"Date: {result['started']}", "",
             "Times are medians with the interquartile range; `vs peers` is peer median / our median (> 1: mixprec "
             "is faster); ceilings are measured in the same run (CPU: mixprec's streaming kernel with the same "
             "read/write mix and working set; GPU: a device-to-device copy).", "",
             format_table(result["rows"], markdown=True), ""]
    if result["failures"]:
        lines += ["Failed scripts: " + ", ".join(f"{f['script']} ({f['device']})" for f in result["failures"]), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- the command

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--op", action="append", metavar="NAME",
                   help="only the scripts bench_NAME.py (repeatable), e.g. --op unscale")
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                   help="where to run (default: every device present)")
    p.add_argument("--quick", action="store_true", help="fewer repeats (under 3 minutes on a 2-core machine)")
    p.add_argument("--reduced", action="store_true",
                   help="tiny sizes and 3 repeats: checks that the scripts work (CI), measures nothing")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    p.add_argument("--output", default="bench-results", metavar="DIR",
                   help="folder for results.json, results.csv and the plots (default: ./bench-results)")
    p.add_argument("--timeout", type=_seconds, default=1200.0, metavar="S", help="limit per script (default 1200 s)")
    p.add_argument("--update-benchmarks-md", nargs="?", const="BENCHMARKS.md", default=None, metavar="PATH",
                   help="also write BENCHMARKS.md (or PATH) from the results")
    p.add_argument("--from-json", metavar="FILE",
                   help="do not run anything: report a previous run's results.json (with --update-benchmarks-md)")


def _seconds(text: str) -> float:
    """argparse type of --timeout: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _probe_writable(flag: str, directory: str) -> None:
    """A file can be created in `directory` (tried, not guessed from permission bits: root ignores those, and a
    read-only mount or a full quota does not show in them)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".mixprec-bench-probe.")
    except OSError as exc:
        raise UsageError(f"{flag}: cannot write in {directory!r} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(tmp)


def _check_output_dir(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--output {path!r} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--output {path!r}: cannot create the directory ({exc.strerror or exc})") from None
    _probe_writable(f"--output {path!r}", path)


def _check_output_file(flag: str, path: str) -> None:
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a directory, not a file")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path!r}: no such directory {parent!r}")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {path!r} is read-only")
    _probe_writable(f"{flag} {path!r}", parent)


def load_result(path: str) -> dict:
    """A previous run's results.json (--from-json), or a UsageError saying why it cannot be one."""
    try:
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"--from-json {path!r}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"--from-json {path!r} is a directory, not a results.json") from None
    except OSError as exc:
        raise UsageError(f"--from-json {path!r}: cannot read it ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"--from-json {path!r} is not JSON ({exc})") from None
    missing = [k for k in ("command", "machine", "started", "rows", "failures") if not isinstance(result, dict)
               or k not in result]
    if missing:
        raise UsageError(f"--from-json {path!r} is not a results.json of `python -m mixprec bench` (no {missing})")
    if not isinstance(result["rows"], list):
        raise UsageError(f"--from-json {path!r}: 'rows' must be a list of rows")
    for i, r in enumerate(result["rows"]):
        problems = row_problems(r)
        if problems:
            raise UsageError(f"--from-json {path!r}: rows[{i}] is not a benchmark row ({'; '.join(problems)})")
    machine_keys = ("cpu", "logical_cpus", "cpu_threads", "torch", "triton", "python", "cuda_device")
    absent = [k for k in machine_keys if not isinstance(result["machine"], dict) or k not in result["machine"]]
    if absent:
        raise UsageError(f"--from-json {path!r}: 'machine' lacks {absent}")
    return result


def check_arguments(args) -> None:
    """Everything about the arguments that can fail, checked before any benchmark runs (UsageError)."""
    if args.from_json is None:
        _select(args)  # an unknown --op or --device, before the output folder is made
        _check_output_dir(args.output)
    if args.update_benchmarks_md is not None:
        _check_output_file("--update-benchmarks-md", args.update_benchmarks_md)


def _select(args) -> list[tuple[str, str]]:
    scripts = discover()
    if args.op:
        wanted = {SCRIPT_PREFIX + o.removeprefix(SCRIPT_PREFIX) for o in args.op}
        unknown = wanted - set(scripts)
        if unknown:
            raise UsageError(f"--op: no benchmark script {sorted(unknown)}; available: {scripts}")
        scripts = [s for s in scripts if s in wanted]
    present = available_devices()
    if args.device == "all":
        devices = present
    elif args.device not in present:
        raise UsageError(f"--device {args.device}: no such device here (present: {present})")
    else:
        devices = [args.device]
    return [(s, d) for d in devices for s in scripts]


def run_all(args, argv_for_record: list[str]) -> dict:
    jobs = _select(args)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    load_before = _load()
    outcomes = []
    with Progress(len(jobs)) as progress:
        for script, device in jobs:
            progress.begin(f"{script} ({device})")
            outcome = run_script(script, device, quick=args.quick, reduced=args.reduced, timeout_s=args.timeout)
            progress.finish("ok" if outcome.error is None else "FAIL")
            outcomes.append(outcome)
    return {
        "command": "python -m mixprec bench " + shlex.join(argv_for_record),
        # other processes on the machine move every figure: the 1-minute load average says how quiet it was
        "machine": {**machine(), "load_before": load_before, "load_after": _load()},
        "started": started,
        "quick": args.quick, "reduced": args.reduced,
        "rows": [r for o in outcomes for r in o.rows],
        "failures": [{"script": o.script, "device": o.device, "error": o.error} for o in outcomes if o.error],
        "seconds": {f"{o.script} ({o.device})": round(o.seconds, 1) for o in outcomes},
    }


def write_results(result: dict, out_dir: str) -> None:
    """results.json first (the one file the others can be made from), then results.csv and the plots."""
    write_atomic(os.path.join(out_dir, "results.json"), lambda f: json.dump(result, f, indent=2))
    write_csv(result["rows"], os.path.join(out_dir, "results.csv"))
    write_plots(result["rows"], out_dir)


def main(args, argv_for_record: list[str]) -> int:
    """The bench command; raises UsageError (before running anything) for arguments that cannot work."""
    check_arguments(args)
    unwritten = []  # files that could not be written (a full disk, say); the previous ones there stay whole
    if args.from_json:
        result = load_result(args.from_json)
    else:
        result = run_all(args, argv_for_record)
        try:
            write_results(result, args.output)
        except OSError as exc:
            unwritten.append(f"the results in {os.path.abspath(args.output)}: {exc}")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"machine: {machine_line(result['machine'])}")
        print(format_table(result["rows"]) if result["rows"] else "(no rows)")
        if not args.from_json and not unwritten:
            print(f"results: {os.path.abspath(args.output)}", file=sys.stderr)
    for failure in result["failures"]:
        print(f"\nFAILED {failure['script']} ({failure['device']}): {failure['error']}", file=sys.stderr)
    if args.update_benchmarks_md:
        try:
            write_atomic(args.update_benchmarks_md, lambda f: f.write(benchmarks_md(result)))
            print(f"wrote {args.update_benchmarks_md}", file=sys.stderr)
        except OSError as exc:
            unwritten.append(f"{args.update_benchmarks_md}: {exc}")
    for what in unwritten:
        print(f"error: could not write {what} (any previous file there is unchanged)", file=sys.stderr)
    return 1 if result["failures"] or unwritten else 0

if __name__ == "__main__":
    if sys.argv[1:2] != ["--worker"]:
        sys.exit("usage: python -m mixprec bench ... (this module's own entry point is the per-script worker)")
    try:
        sys.exit(_worker(sys.argv[2:]))
    except Exception:  # the parent shows this as the script's failure
        traceback.print_exc()
        sys.exit(1)
