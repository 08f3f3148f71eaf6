"""The bench, inspect and selftest commands in CI-sized runs: they work and their output is well-formed."""
import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from mixprec import _ext
from mixprec.benchmarks.ceiling import cpu_stream_gbps, default_layout
from mixprec.tools import bench, selftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(*args, env_drop=(), timeout=600, **env):
    environment = {k: v for k, v in os.environ.items() if k not in env_drop}
    environment.update(env)
    return subprocess.run([sys.executable, "-m", "mixprec", *args], capture_output=True, text=True, cwd=ROOT,
                          env=environment, timeout=timeout)


def _positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


# ------------------------------------------------------------------------------------------------ ceiling

needs_ext = pytest.mark.skipif(not _ext.available(), reason="mixprec._C is not built")


@needs_ext
def test_stream_op_reads_all_and_writes_all():
    reads = [torch.arange(1000, dtype=torch.int64).to(torch.uint8), torch.full((333,), 7, dtype=torch.uint8)]
    writes = [torch.zeros(777, dtype=torch.uint8), torch.zeros(100_003, dtype=torch.uint8)]
    torch.ops.mixprec._stream_bench_(reads, writes)
    # every byte written, with a value that depends on the reads (all-zero reads would give zeros)
    assert all(bool((w != 0).any()) for w in writes)
    assert not any(bool((w[-64:] == 0).all()) for w in writes), "the tail of a write array was not written"


@needs_ext
def test_stream_op_rejects_bad_arrays():
    with pytest.raises(RuntimeError, match=r"reads\[0\] must be contiguous"):
        torch.ops.mixprec._stream_bench_([torch.zeros(8, 8, dtype=torch.uint8).t()], [])


@needs_ext
def test_cpu_stream_gbps_measures_the_mix():
    gbps, timing = cpu_stream_gbps(1 << 20, 1 << 20, arrays=2, quick=True)
    assert _positive_finite(gbps) and timing.q25_ms <= timing.median_ms <= timing.q75_ms
    with pytest.raises(ValueError, match="read_bytes"):
        cpu_stream_gbps(100, 100, arrays=[(100, 0)])
    with pytest.raises(ValueError, match="equal sizes"):
        cpu_stream_gbps(100, 50, arrays=[(100, 50)])


def test_default_layout_is_in_place_where_possible():
    assert default_layout(14, 14) == [(14, 14)]
    assert default_layout(16, 12) == [(12, 12), (4, 0)]
    assert default_layout(8, 10, arrays=2) == [(4, 4), (4, 4), (0, 1), (0, 1)]


# ------------------------------------------------------------------------------------------------ bench

def test_row_problems_names_what_is_wrong():
    good = {"op": "x", "backend": "cpu", "device": "cpu", "shape": "1", "dtype": "float16", "median_ms": 1.0,
            "q25_ms": 0.9, "q75_ms": 1.1, "unit": "GB/s", "value": 3.0, "ceiling": None, "peers": {"t": 2.0},
            "notes": ""}
    assert bench.row_problems(good) == []
    assert "missing 'value'" in bench.row_problems({k: v for k, v in good.items() if k != "value"})
    assert any("positive finite" in p for p in bench.row_problems({**good, "peers": {"t": float("nan")}}))
    assert any("unit" in p for p in bench.row_problems({**good, "unit": "ms"}))


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    md = out / "BENCHMARKS.md"
    # every benchmark script, each in its CI-sized mode
    proc = _python("bench", "--reduced", "--device", "cpu", "--output", str(out), "--update-benchmarks-md", str(md))
    return proc, out, md


@needs_ext
def test_bench_reduced_writes_well_formed_results(bench_run):
    proc, out, md = bench_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((out / "results.json").read_text())
    assert set(result) >= {"command", "machine", "rows", "failures", "started"}
    assert result["machine"]["torch"] == torch.__version__ and result["machine"]["cpu"]
    assert result["failures"] == []
    ops = {r["op"] for r in result["rows"]}
    assert {"unscale_and_check_", "matmul"} <= ops
    for r in result["rows"]:
        assert bench.row_problems(r) == [], r
    unscale = next(r for r in result["rows"] if r["op"] == "unscale_and_check_")
    assert _positive_finite(unscale["ceiling"])
    assert set(unscale["peers"]) == {"torch unscale", "torch unscale+foreach_norm"}
    gemm = [r for r in result["rows"] if r["op"] == "matmul"]
    assert {r["dtype"] for r in gemm} == {"float16", "bfloat16"}
    for r in gemm:  # the overhead figure: against torch's fp32 GEMM on pre-widened operands, the ceiling
        assert r["device"] == "cpu" and r["unit"] == "TFLOP/s" and _positive_finite(r["ceiling"])
        assert set(r["peers"]) == {"torch.matmul fp32, pre-widened", "torch widen + fp32 matmul + round",
                                   f"torch.matmul {r['dtype']} (half GEMM)"}
        assert "overhead of mixprec.ops.matmul" in r["notes"]
    with open(out / "results.csv") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == len(result["rows"]) and all(_positive_finite(float(x["value"])) for x in lines)
    for plot in ("ratios.png", "vs_ceiling.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the table on stdout carries the machine line and one line per row
    assert "machine:" in proc.stdout and "torch unscale+foreach_norm" in proc.stdout
    assert "torch.matmul fp32, pre-widened" in proc.stdout
    text = md.read_text()
    assert "python -m mixprec bench --reduced" in text and "| unscale_and_check_ |" in text and "| matmul |" in text
    # BENCHMARKS.md can be re-rendered from the JSON alone, without running anything
    again = _python("bench", "--from-json", str(out / "results.json"), "--update-benchmarks-md", str(out / "again.md"))
    assert again.returncode == 0 and (out / "again.md").read_text() == text


def test_every_bench_script_has_run():
    import importlib
    import inspect as pyinspect

    scripts = bench.discover()
    assert {"bench_unscale", "bench_gemm"} <= set(scripts)
    for name in scripts:
        run = getattr(importlib.import_module(f"mixprec.benchmarks.{name}"), "run", None)
        assert run is not None and list(pyinspect.signature(run).parameters) == ["quick", "device"], name


def _fake_row(device: str) -> dict:
    return {"op": "fine", "backend": "cpu", "device": device, "shape": "1", "dtype": "float32", "median_ms": 1.0,
            "q25_ms": 1.0, "q75_ms": 1.0, "unit": "GB/s", "value": 1.0, "ceiling": 2.0, "peers": {"torch": 1.5},
            "notes": ""}


@pytest.fixture
def fake_scripts(monkeypatch):
    """bench_broken (fails) and bench_fine (one row) in place of the real scripts; returns the list of the
    scripts run, so that a test can say nothing ran."""
    ran = []
    monkeypatch.setattr(bench, "discover", lambda: ["bench_broken", "bench_fine"])

    def fake_run(script, device, **kw):
        ran.append(script)
        if script == "bench_broken":
            return bench.Outcome(script, device, 0.1, [], "exit code 1\nValueError: boom")
        return bench.Outcome(script, device, 0.1, [_fake_row(device)], None)

    monkeypatch.setattr(bench, "run_script", fake_run)
    return ran


def test_bench_failing_script_is_reported_not_fatal(tmp_path, fake_scripts):
    # a script that raises and one that works: both run, the failure is named, the exit code is non-zero
    parser = __import__("argparse").ArgumentParser()
    bench.add_arguments(parser)
    argv = ["--device", "cpu", "--output", str(tmp_path)]
    assert bench.main(parser.parse_args(argv), argv) == 1
    result = json.loads((tmp_path / "results.json").read_text())
    assert [f["script"] for f in result["failures"]] == ["bench_broken"]
    assert [r["op"] for r in result["rows"]] == ["fine"]


def _cli_usage_error(capsys, *argv) -> str:
    """Runs `python -m mixprec bench ARGV` in this process; asserts an argparse-style refusal (exit code 2, the
    usage line) and returns the error line."""
    from mixprec.tools import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.startswith("usage: python -m mixprec bench") and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def _unusable_outputs(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    return {"a file": (str(a_file), "exists and is not a directory"),
            "below a file": (str(a_file / "sub"), "cannot create the directory"),
            "read-only folder": (str(tmp_path / "read-only"), "cannot write in")}


@pytest.mark.parametrize("kind", ["a file", "below a file", "read-only folder"])
def test_bench_refuses_an_unusable_output_before_running(kind, tmp_path, fake_scripts, capsys, monkeypatch):
    path, message = _unusable_outputs(tmp_path)[kind]
    if kind == "read-only folder":
        os.mkdir(path)
        os.chmod(path, 0o500)
        real_mkstemp = bench.tempfile.mkstemp

        def mkstemp(*args, dir=None, **kw):  # root ignores the mode bits: refuse as a read-only mount would
            if os.path.abspath(dir) == os.path.abspath(path):
                raise PermissionError(13, "Permission denied")
            return real_mkstemp(*args, dir=dir, **kw)

        monkeypatch.setattr(bench.tempfile, "mkstemp", mkstemp)
    line = _cli_usage_error(capsys, "--device", "cpu", "--output", path)
    assert line.startswith("python -m mixprec bench: error: --output") and message in line, line
    assert fake_scripts == [], "a benchmark ran before the output was checked"


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "soon"])
def test_bench_timeout_must_be_a_positive_number(value, fake_scripts, tmp_path, capsys):
    line = _cli_usage_error(capsys, "--timeout", value, "--output", str(tmp_path))
    assert f"argument --timeout: must be a positive number of seconds, got '{value}'" in line


def test_bench_from_json_must_be_a_results_file(tmp_path, capsys):
    assert "--from-json" in _cli_usage_error(capsys, "--from-json", str(tmp_path / "missing.json"))
    assert "no such file" in _cli_usage_error(capsys, "--from-json", str(tmp_path / "missing.json"))
    (tmp_path / "text.json").write_text("results: none")
    assert "is not JSON" in _cli_usage_error(capsys, "--from-json", str(tmp_path / "text.json"))
    (tmp_path / "other.json").write_text('{"rows": []}')
    assert "is not a results.json" in _cli_usage_error(capsys, "--from-json", str(tmp_path / "other.json"))
    assert "is a directory" in _cli_usage_error(capsys, "--from-json", str(tmp_path))


def test_bench_refuses_an_unwritable_benchmarks_md_before_running(tmp_path, fake_scripts, capsys):
    out = str(tmp_path / "out")
    line = _cli_usage_error(capsys, "--device", "cpu", "--output", out, "--update-benchmarks-md",
                            str(tmp_path / "no-such-dir" / "BENCHMARKS.md"))
    assert "--update-benchmarks-md" in line and "no such directory" in line
    line = _cli_usage_error(capsys, "--device", "cpu", "--output", out, "--update-benchmarks-md", str(tmp_path))
    assert "is a directory, not a file" in line
    assert fake_scripts == []


def test_bench_usage_errors_have_no_traceback():
    """The same refusal as the in-process tests above, seen from a shell: exit code 2, no traceback."""
    proc = _python("bench", "--from-json", os.path.join(ROOT, "no-such-results.json"), timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "error: --from-json" in proc.stderr and "no such file" in proc.stderr


def _files(folder) -> set:
    return {p.name for p in folder.iterdir()}


def test_bench_full_disk_keeps_the_previous_results(tmp_path, fake_scripts, monkeypatch, capsys):
    """A write that fails part way (ENOSPC) leaves the previous results.json and BENCHMARKS.md whole, no temporary
    file behind, and says so (exit code 1), with the run's table still on stdout."""
    from mixprec.tools import cli

    (tmp_path / "results.json").write_text('{"previous": true}')
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# previous\n")
    real_dump = json.dump

    def dump_then_fill_the_disk(obj, f, **kw):
        f.write('{"rows": [')  # a partial file, as a full disk leaves it
        raise OSError(28, "No space left on device")

    def benchmarks_md_fails(result):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bench.json, "dump", dump_then_fill_the_disk)
    monkeypatch.setattr(bench, "benchmarks_md", benchmarks_md_fails)
    rc = cli.main(["bench", "--device", "cpu", "--output", str(tmp_path), "--update-benchmarks-md", str(md)])
    out, err = capsys.readouterr()
    monkeypatch.setattr(bench.json, "dump", real_dump)
    assert rc == 1
    assert (tmp_path / "results.json").read_text() == '{"previous": true}' and md.read_text() == "# previous\n"
    assert _files(tmp_path) == {"results.json", "BENCHMARKS.md"}, "a temporary file was left behind"
    assert "could not write the results" in err and "No space left on device" in err and "Traceback" not in err
    assert "fine" in out  # the run's table


def test_bench_writes_every_file_whole_with_the_usual_mode(tmp_path, fake_scripts, monkeypatch):
    """Atomic writes go through mkstemp (mode 0600): the files must still get the umask's mode, or keep the one
    the previous file had; the plots are whole PNGs; no temporary files remain."""
    from mixprec.tools import cli

    umask = os.umask(0o022)
    try:
        (tmp_path / "results.csv").write_text("old")
        os.chmod(tmp_path / "results.csv", 0o600)
        md = tmp_path / "BENCHMARKS.md"
        assert cli.main(["bench", "--device", "cpu", "--output", str(tmp_path), "--update-benchmarks-md",
                         str(md)]) == 1  # bench_broken fails
    finally:
        os.umask(umask)
    assert _files(tmp_path) == {"results.json", "results.csv", "ratios.png", "vs_ceiling.png", "BENCHMARKS.md"}
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"results.json": 0o644, "results.csv": 0o600, "ratios.png": 0o644, "vs_ceiling.png": 0o644,
                     "BENCHMARKS.md": 0o644}
    for plot in ("ratios.png", "vs_ceiling.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "results.json").read_text())["rows"][0]["op"] == "fine"
    assert "| fine |" in md.read_text()


def test_bench_worker_reports_a_raising_script():
    outcome = bench.run_script("bench_does_not_exist", "cpu", quick=True, reduced=True, timeout_s=120)
    assert outcome.error is not None and "ModuleNotFoundError" in outcome.error


def test_bench_rejects_unknown_op():
    proc = _python("bench", "--op", "nosuchop", "--reduced")
    assert proc.returncode != 0 and "no benchmark script" in proc.stderr


# ------------------------------------------------------------------------------------------------ inspect

@pytest.fixture(scope="module")
def inspect_json():
    # inspect compiles for real GPUs: the interpreter the test session runs under must be off
    proc = _python("inspect", "--json", env_drop=("TRITON_INTERPRET",))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_inspect_reports_unscale_kernels(inspect_json):
    triton_unscale = [k for k in inspect_json["kernels"] if k["source"] == "triton" and "unscale" in k["kernel"]]
    from mixprec.tools.kernel_specs import aot_specs

    specs = aot_specs("unscale")
    assert {k["arch"] for k in triton_unscale} == {80, 90}
    assert len(triton_unscale) == 12 == 2 * len(specs)  # fp32, fp16, bf16 x (n 16-divisible or not) for two archs
    for k in inspect_json["kernels"]:
        assert not k["spills"] and k["local_bytes"] == 0, f"{k['kernel']} sm_{k['arch']} spills"
    threads = {32 * s["options"]["num_warps"] for s in specs}
    for k in triton_unscale:
        assert 0 < k["regs"] <= 255 and k["smem_bytes"] >= 0 and {k["threads"]} == threads
        assert 0 < k["occupancy"] <= 1
    if _ext.has_cuda_kernels():
        cuda_unscale = [k for k in inspect_json["kernels"] if k["source"] == "cuda" and "unscale" in k["kernel"]]
        assert {k["arch"] for k in cuda_unscale} == {80, 90} and all(k["regs"] > 0 for k in cuda_unscale)
        assert all(k["threads"] and 0 < k["occupancy"] <= 1 for k in cuda_unscale)


def test_inspect_memory_bound_kernels_at_half_occupancy(inspect_json):
    # every kernel but the GEMMs streams memory: each must keep at least half the SM's warp slots filled (enough
    # bytes in flight to cover the latency, see the notes beside the launch constants) without spilling
    from mixprec.tools.kernel_specs import aot_specs, modules

    streaming = [k for k in inspect_json["kernels"] if "gemm" not in k["kernel"]]
    triton = [k for k in streaming if k["source"] == "triton"]
    expected = sorted((s["config"], arch) for m in modules() if m != "gemm" for s in aot_specs(m) for arch in (80, 90))
    assert sorted((k["config"], k["arch"]) for k in triton) == expected
    names = {k["kernel"].split(" (")[0] for k in streaming}
    assert {"_unscale_kernel", "_adam_kernel"} <= names
    if _ext.has_cuda_kernels():
        cuda = [k for k in streaming if k["source"] == "cuda"]
        assert {"unscale_kernel", "adam_kernel", "count_steps_kernel", "sum_into_kernel"} <= names
        assert {k["arch"] for k in cuda} == {80, 90} and len(cuda) == 2 * len({k["kernel"] for k in cuda})
    for k in streaming:
        where = f"{k['source']} {k['kernel']} {k['config']} sm_{k['arch']}"
        assert not k["spills"] and k["local_bytes"] == 0 and k["stack_bytes"] == 0, f"{where} spills"
        assert k["occupancy"] is not None and k["occupancy"] >= 0.5, (
            f"{where}: {k['regs']} registers, {k['threads']} threads: occupancy {k['occupancy']} "
            f"({k['occupancy_limiter']}) below 50%")


def test_inspect_names_cuda_instances_in_words(inspect_json):
    if not _ext.has_cuda_kernels():
        pytest.skip("mixprec._C was built without its CUDA part")
    names = {k["kernel"] for k in inspect_json["kernels"] if k["source"] == "cuda"}
    assert not [n for n in names if "<" in n or "DType" in n], names
    assert {"adam_kernel (fp16, fp32 master, fp32 states, AdamW)",
            "adam_kernel (fp32, no master, fp32 states, amsgrad, Adam)",
            "adam_kernel (bf16, remainder master, int8 states, AdamW)", "unscale_kernel (bf16)",
            "gemm_kernel (fp16, A K-contiguous, B K-contiguous, 16-byte vectors)",
            "gemm_kernel (bf16, A M-contiguous, B N-contiguous, 16-byte vectors)"} <= names, names


def test_inspect_reports_gemm_kernels(inspect_json):
    from mixprec.tools.kernel_specs import aot_specs

    gemm = [k for k in inspect_json["kernels"] if k["source"] == "triton" and k["kernel"] == "_gemm_kernel"]
    assert sorted(k["config"] for k in gemm) == sorted(s["config"] for s in aot_specs("gemm") for _ in (80, 90))
    for k in gemm:  # tensor cores with nothing spilled, every config of both modes
        assert not k["spills"] and k["threads"] in (128, 256) and 0 < k["occupancy"] <= 1, k
        assert (k["hmma"] > 0 and k["hgmma"] == 0) if k["arch"] == 80 else (k["hgmma"] > 0 and k["hmma"] == 0), k
    rows = [r for r in inspect_json["roofline"] if r["op"] == "matmul"]
    square = next(r for r in rows if r["gpu"] == "H100 SXM" and "4096x4096x4096" in r["problem"])
    assert square["flops"] == 2 * 4096**3 and square["bytes"] == 3 * 4096**2 * 2 and square["bound"] == "compute"
    decode = next(r for r in rows if r["gpu"] == "A100" and "16x4096x4096" in r["problem"])
    assert decode["bound"] == "memory"


def test_inspect_roofline_is_a_labelled_prediction(inspect_json):
    rows = [r for r in inspect_json["roofline"] if r["op"] == "unscale_and_check_"]
    assert {r["gpu"] for r in rows} == {"A100", "H100 SXM", "H200"}
    for r in rows:
        assert r["bound"] == "memory" and _positive_finite(r["predicted_ms"])
    a100 = next(r for r in rows if r["gpu"] == "A100")
    assert a100["predicted_gbps"] == pytest.approx(2000)  # memory-bound: exactly the published bandwidth
    h200 = next(r for r in rows if r["gpu"] == "H200")
    assert h200["predicted_gbps"] == pytest.approx(4800)
    assert "prediction" in inspect_json["prediction_note"]


def test_inspect_counts_tensor_core_instructions():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "aot_dot_kernel.py")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    by_arch = json.loads(proc.stdout)
    # 64x64x64 fp16 dot on 4 warps: 128 mma.m16n8k16 per block, 32 per warp; on sm_90 wgmma 64x64x16, 4 of them
    assert by_arch["80"]["hmma"] == 32 and by_arch["80"]["hgmma"] == 0
    assert by_arch["90"]["hgmma"] > 0 and by_arch["90"]["hmma"] == 0
    assert all(not r["spills"] and r["smem_bytes"] > 0 for r in by_arch.values())


def test_inspect_occupancy_estimate():
    from mixprec.tools.inspector import occupancy

    assert occupancy(80, 512, 32, 0) == (1.0, "threads")
    assert occupancy(80, 512, 40, 64) == (0.75, "regs")  # 1280 regs/warp: 51 warps -> 3 blocks of 16
    occ, limiter = occupancy(90, 128, 32, 100 * 1024)  # 2 blocks of 101 KB fit in 228 KB
    assert limiter == "smem" and occ == pytest.approx(2 * 128 / 2048)


# ------------------------------------------------------------------------------------------------ selftest

@needs_ext
def test_selftest_cpu_passes_and_names_each_check():
    proc = _python("selftest", "--device", "cpu", "--no-bench")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    checked = {(line.split()[1], line.split()[2]) for line in lines}
    assert {("unscale_and_check_", "cpu-portable"), ("unscale_and_check_", "triton-interp")} <= checked
    for op in ("matmul", "matmul_accumulate_"):
        assert {(op, "cpu"), (op, "triton-interp")} <= checked
    assert any(op == "adam_step_" for op, _ in checked)
    assert all(line.startswith("ok") for line in lines)
    assert {op for op, _ in checked} == {"unscale_and_check_", "matmul", "matmul_accumulate_", "adam_step_"}
    assert "not checked here" not in proc.stdout
    assert "0 failed" in proc.stdout


def test_selftest_failure_names_the_case():
    def wrong():
        raise AssertionError("grads[0]: 3 of 7 elements differ")

    cases = [selftest.Case("some_op", "cpu-avx2", "float16", "(7,)", lambda: "fine"),
             selftest.Case("some_op", "triton-interp", "bfloat16", "(7,)", wrong)]
    import io

    out = io.StringIO()
    assert selftest.run_cases(cases, out) == 1
    bad = [line for line in out.getvalue().splitlines() if line.startswith("FAIL")]
    assert len(bad) == 1 and all(x in bad[0] for x in ("some_op", "triton-interp", "bfloat16", "(7,)", "3 of 7"))
