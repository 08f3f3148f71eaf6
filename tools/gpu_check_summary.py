"""The last thing tools/gpu_check.sh prints: per stage pass/fail/time, then per benchmark row the measured time
beside a prediction, and whether $OUT stays within the 8 files the device tool brings back.

Prediction: on a GPU, the roofline of `python -m mixprec inspect` for this GPU (its published peaks, matched by
name: the time the row's bytes or flops take at peak bandwidth or peak tensor-core throughput); on the CPU, the
ceiling the benchmark measured in the same run (inspect models GPUs only).

    python tools/gpu_check_summary.py OUT_DIR --mode gpu|cpu     # exit code 1 when a stage failed
"""
from __future__ import annotations

import argparse
import json
import os
import sys

MAX_FILES = 8  # what the device tool brings back from $OUT


def read_stages(path: str) -> list[dict]:
    stages = []
    with open(path) as f:
        for line in f:
            name, status, seconds, note = (line.rstrip("\n").split("\t") + [""] * 4)[:4]
            stages.append({"stage": name, "status": status, "seconds": int(seconds or 0), "note": note})
    return stages


def gpu_model(device_name: str | None) -> tuple[str, dict] | None:
    """The inspector's GPU entry whose name the device's name contains (longest match), if any."""
    from mixprec.tools.inspector import GPUS

    if not device_name:
        return None
    matches = [(key, spec) for key, spec in GPUS.items() if key.split()[0].lower() in device_name.lower()]
    return max(matches, key=lambda m: len(m[0])) if matches else None


def predicted_ms(row: dict, model: dict | None) -> float | None:
    """The time the row's work takes at the roofline (GPU) or at the measured ceiling (CPU)."""
    work_per_ms = row["value"] * row["median_ms"]  # bytes/1e6 (GB/s) or flops/1e9 (TFLOP/s) per ms, times ms
    if model is not None:
        peak = model["tbps"] * 1e3 if row["unit"] == "GB/s" else model["tflops"]
    else:
        peak = row["ceiling"]
    return work_per_ms / peak if peak else None


def table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *body])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the gpu_check.sh output folder")
    parser.add_argument("--mode", choices=["gpu", "cpu"], required=True)
    args = parser.parse_args(argv)

    stages = read_stages(os.path.join(args.out, "stages.tsv"))
    print(f"\nmixprec gpu_check summary ({args.mode} mode)")
    print(table(["stage", "result", "seconds", "note"],
                [[s["stage"], s["status"], str(s["seconds"]), s["note"]] for s in stages]))

    bench_path = os.path.join(args.out, "bench.json")
    if os.path.exists(bench_path):
        with open(bench_path) as f:
            bench = json.load(f)
        found = gpu_model(bench["machine"].get("cuda_device")) if args.mode == "gpu" else None
        what = f"roofline of {found[1]['name']}" if found else "the ceiling measured in the same run"
        body = []
        for row in bench["rows"]:
            pred = predicted_ms(row, found[1] if found else None)
            body.append([row["op"], row["backend"], row["dtype"], row["shape"], f"{row['median_ms']:.3g}",
                         "-" if pred is None else f"{pred:.3g}",
                         "-" if pred is None else f"{100 * pred / row['median_ms']:.0f}%"])
        print(f"\nmeasured vs predicted ({what}):")
        print(table(["op", "backend", "dtype", "shape", "measured ms", "predicted ms", "of prediction"], body))
        for failure in bench.get("failures", []):
            print(f"bench failure: {failure}")
    else:
        print("\nno bench.json: the bench stage did not finish")

    # summary.txt is this output, being written (or about to be)
    files = sorted({*os.listdir(args.out), "summary.txt"})
    print(f"\n{len(files)} files in {args.out}: {', '.join(files)}")
    problems = [s["stage"] for s in stages if s["status"] != "pass"]
    if len(files) > MAX_FILES or any(os.path.isdir(os.path.join(args.out, f)) for f in files):
        problems.append(f"OUT must hold at most {MAX_FILES} plain files")
    print("ALL STAGES PASSED" if not problems else f"NOT PASSED: {', '.join(problems)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
