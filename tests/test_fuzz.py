"""Fuzzing of the public API in CI: a few dozen derandomized hypothesis cases per target of tests/fuzz_targets.py
(the long run, with crash isolation, is tools/fuzz.py). Every case must end "ok" (checked against its oracle) or
"clear" (refused naming the argument, nothing written); a crash, silent wrong answer or data loss fails the test,
with hypothesis's shrunk case as the reproducer.

KNOWN lists the findings whose fixes have not landed yet, by target: a case matching one is collected instead of
failing, and the test is then marked xfail with those findings as the reason (so it passes, and says so, the day
they are fixed). Anything else fails.
"""
import os
import re
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings

from tests import fuzz_targets as ft

# target -> [(regex on "kind: detail", the finding and the fix it waits for)]
KNOWN: dict[str, list[tuple[str, str]]] = {}

# examples per target: the file stays under a minute on the 2-core machine (the CLI cases write plots)
EXAMPLES = {"bench CLI": 30, "optim.FusedAdamW.load_state_dict": 80, "amp.GradScaler": 80}


@pytest.mark.parametrize("target", list(ft.TARGETS))
def test_fuzz(target):
    known = KNOWN.get(target, [])
    seen_known = set()
    checked = []

    @settings(max_examples=EXAMPLES.get(target, 100), deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(ft.TARGETS[target].cases(ft.FAST_BACKENDS))
    def run(case):
        out = ft.run_case(target, case)
        if out.kind == "ok" and out.detail == "checked":
            checked.append(case)
        if out.kind in ("ok", "clear"):
            return
        text = f"{out.kind}: {out.detail}"
        for pattern, finding in known:
            if re.search(pattern, text):
                seen_known.add(finding)
                return
        raise AssertionError(f"{target}: {text}")

    run()
    # "ok" must mostly mean "agrees with its oracle": a target whose cases never reach one tests only refusals
    assert len(checked) >= 5, f"{target}: only {len(checked)} cases were checked against an oracle"
    if seen_known:
        pytest.xfail("known findings, fixes pending: " + " | ".join(sorted(seen_known)))


def test_judge_classifies():
    """The classification itself: each outcome from a call whose behaviour is known."""
    import torch

    t = torch.ones(3)

    def refuse_naming():
        raise ValueError("lr must be finite")

    def refuse_silently():
        raise TypeError("must be real number, not str")

    def refuse_after_writing():
        t.add_(1)
        raise ValueError("lr must be finite")

    assert ft.judge(ft.Call(refuse_naming, ["lr"], ["lr is inf"])).kind == "clear"
    assert ft.judge(ft.Call(refuse_naming, ["eps"], ["eps is inf"])).kind == "crash"  # names another argument
    assert ft.judge(ft.Call(refuse_silently, ["lr"], ["lr is a str"])).kind == "crash"
    assert ft.judge(ft.Call(lambda: {}["x"], ["lr"], ["lr is a str"])).kind == "crash"  # a KeyError naming nothing
    assert ft.judge(ft.Call(refuse_after_writing, ["lr"], ["lr"], watched=[("t", t)])).kind == "lost"
    assert ft.judge(ft.Call(refuse_naming, ["lr"], [])).kind == "crash"  # a valid input refused
    assert ft.judge(ft.Call(lambda: None, ["lr"], ["lr is inf"])).kind == "wrong"  # an invalid input accepted
    assert ft.judge(ft.Call(lambda: 1, [], [], check=lambda r: "off by one" if r != 2 else None)).kind == "wrong"
    assert ft.judge(ft.Call(lambda: 2, [], [], check=lambda r: "off by one" if r != 2 else None)).kind == "ok"
    assert ft.mentions("Invalid learning rate: inf", ["lr"])  # torch's word for it
    assert ft.mentions("grads[2] and grads[0] share memory", ["grads"])
    assert not ft.mentions("gradsx is bad", ["grads"])


def test_oracles_catch_planted_bugs(monkeypatch):
    """Each oracle fails a backend made slightly wrong (so that "ok" means checked)."""
    import torch

    from mixprec import reference

    original = reference.unscale_and_check_
    monkeypatch.setattr(reference, "unscale_and_check_",
                        lambda g, inv, *a, **kw: original(g, inv * (1 + 2**-10), *a, **kw))
    case = {"backend": "reference", "container": "list", "grad_mode": False, "per_tensor_inf": "none",
            "grads": [{"tensor": {"shape": (7,), "dtype": "float32", "layout": "contiguous", "values": "normal",
                                  "seed": 3, "flag": None}}],
            "inv_scale": {"kind": "tensor", "value": 0.5, "dtype": "float32", "shape": (1,), "flag": None},
            "found_inf": {"kind": "tensor", "value": 0.0, "dtype": "float32", "shape": (1,), "flag": None},
            "norm_sq": {"kind": "none", "value": 0.0, "dtype": "float32", "shape": (1,), "flag": None}}
    assert ft.run_case("ops.unscale_and_check_", case).kind == "wrong"
    monkeypatch.setattr(reference, "unscale_and_check_", original)
    assert ft.run_case("ops.unscale_and_check_", case).kind == "ok"

    matmul = reference.matmul
    monkeypatch.setattr(reference, "matmul", lambda a, b, bias=None, out_dtype=None: matmul(a, b, bias, out_dtype)
                        * (1 + 2**-6))
    spec = {"dtype": "float16", "layout": "contiguous", "values": "normal", "seed": 5, "flag": None}
    case = {"backend": "reference", "backward": False, "grad_mode": False, "out_dtype": None, "bias": None,
            "ops": {"a": {**spec, "shape": (3, 8)}, "b": {**spec, "shape": (8, 5)}, "rank": "ok", "n": 5,
                    "out_shape": (3, 5)}}
    assert ft.run_case("ops.matmul", case).kind == "wrong"
    monkeypatch.setattr(reference, "matmul", matmul)
    assert ft.run_case("ops.matmul", case).kind == "ok"

    adam = reference.adam_step_
    monkeypatch.setattr(reference, "adam_step_", lambda *a, **kw: adam(*a, **{**kw, "eps": kw["eps"] * 1.5}))
    case = {"backend": "reference", "variant": "fp32", "state": "fp32", "amsgrad": False, "seed": 1,
            "params": [{"shape": (3, 5), "layout": "contiguous", "specials": False, "step": 4.0}], "mutations": [],
            "lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-3, "weight_decay": 0.01, "decoupled": True,
            "maximize": False, "sr_seed": "default", "grad_mode": False,
            "grad_scale": {"kind": "none", "value": 1.0, "dtype": "float32", "shape": (1,), "flag": None},
            "found_inf": {"kind": "none", "value": 0.0, "dtype": "float32", "shape": (1,), "flag": None},
            "clip_coef": {"kind": "none", "value": 1.0, "dtype": "float32", "shape": (1,), "flag": None}}
    assert ft.run_case("ops.adam_step_", case).kind == "wrong"  # the torch oracle
    monkeypatch.setattr(reference, "adam_step_", adam)
    assert ft.run_case("ops.adam_step_", case).kind == "ok"
    assert torch.get_default_dtype() == torch.float32


def test_long_run_isolates_crashes(tmp_path):
    """tools/fuzz.py counts a worker that aborts as a crash of the case it was running, and carries on."""
    env = {**os.environ, "MIXPREC_FUZZ_ABORT_AT": "2"}
    out = subprocess.run([sys.executable, "tools/fuzz.py", "--examples", "4", "--target", "ops.matmul",
                          "--backends", "reference", "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, env=env, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    import json

    result = json.loads((tmp_path / "r.json").read_text())
    assert result["total"]["inputs"] == 4, result["total"]
    assert result["total"]["crash"] >= 1
    assert any("SIGABRT" in f["detail"] for f in result["findings"]), result["findings"]
