"""``tests/gpu/device_check.py``: the device script, end to end with ``--tiny`` (on CPU under the Triton interpreter)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import needs

DEVICE_DIR = Path(__file__).parent / "gpu"
_spec = importlib.util.spec_from_file_location("device_check", DEVICE_DIR / "device_check.py")
gpu = sys.modules["device_check"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up there
_spec.loader.exec_module(gpu)

STEPS = ["pytest", "correctness", "timing", "training"]


def test_tiny_run_passes_every_step(tmp_path):
    needs("triton", "pip install '.[triton]' (nox -s tests installs it)")
    out = tmp_path / "gpu"
    env = {} if torch.cuda.is_available() else {"TRITON_INTERPRET": "1"}
    proc = subprocess.run(["bash", str(DEVICE_DIR / "run.sh"), str(out), "--tiny"], env={**os.environ, **env,
                          "PYTHON": sys.executable}, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / gpu.JSON_NAME).read_text())
    assert report["tiny"] is True and report["status"] == "done" and report["failed_steps"] == []
    assert report["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert report["step_order"] == STEPS and set(report["steps"]) == set(STEPS)
    for name, step in report["steps"].items():
        assert step["status"] == "ok", f"{name}: {step}"

    tests = report["steps"]["pytest"]["result"]
    assert tests["tests"] >= 4 and tests["passed"] == tests["tests"] and not tests["failures"]

    checks = report["steps"]["correctness"]["result"]
    sweep = checks["sweep"]
    assert sweep["checked"] >= 48 and sweep["failed"] == [] and not sweep["skipped_for_deadline"]
    for case in sweep["cases"]:
        assert case["ok"] and max(case["errors"].values()) <= case["tol"], case
    cased = {(c["case"].split("-")[0], c["case"].split("-")[1]) for c in sweep["cases"]}
    assert cased == {(b, d) for b in ("bits2", "bits3", "bits4") for d in ("bfloat16", "float16")}
    assert {f"gpr{g}" for g in (1, 2, 4, 8)} <= {c["case"].split("-")[2] for c in sweep["cases"]}
    assert sweep["refused"] == {}
    assert len(checks["table_sets"]["cases"]) == 6
    assert all(c["ok"] and c["error"] <= c["tol"] for c in checks["table_sets"]["cases"])
    model = checks["model_training"]
    assert model["ok"] and model["tables_changed"] and model["finite"]
    assert all(model["errors_vs_float32_reference"][k] <= model["allowed"][k] for k in model["allowed"])
    if not torch.cuda.is_available():
        assert "not on CUDA" in checks["cuda_graph"]["skipped"]

    timing = report["steps"]["timing"]["result"]
    assert [row["M"] for row in timing["rows"]] == [1, 4] and not timing["errors"]
    assert all(row["lut_us"] > 0 and row["achieved_gbps"] > 0 for row in timing["rows"]) and timing["training"]

    training = report["steps"]["training"]["result"]
    assert training["step_time_ratio_sketched_over_dense"] > 0
    assert training["dense"]["finite"] and training["sketched"]["finite"]


def test_without_cuda_or_interpreter_the_kernel_steps_say_no_cuda(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for tiny in (False, True):
        device, reason = gpu.kernel_device(tiny)
        assert device is None and reason.startswith("no CUDA")


def test_a_failing_step_is_recorded_and_the_next_still_runs():
    report = {"steps": {}}
    budget = gpu.Budget(100, {"a": 1, "b": 1, "c": 2})

    def fails(deadline):
        raise RuntimeError("kernel exploded")

    def skips(deadline):
        raise gpu.StepSkipped("no CUDA here")

    gpu.run_step("a", fails, budget, report, lambda: None, lambda line: None)
    gpu.run_step("b", skips, budget, report, lambda: None, lambda line: None)
    gpu.run_step("c", lambda d: {"ok": True, "given": d.seconds}, budget, report, lambda: None, lambda line: None)
    assert report["steps"]["a"]["status"] == "failed" and "kernel exploded" in report["steps"]["a"]["traceback"]
    assert report["steps"]["b"] == {**report["steps"]["b"], "status": "skipped", "reason": "no CUDA here"}
    assert report["steps"]["c"]["status"] == "ok"
    assert report["steps"]["c"]["result"]["given"] > 99 * 2 / 4  # the time a, b did not use goes to c


def test_the_sweep_covers_every_value_first():
    """A deadline that cuts the sweep short still leaves every bit width, dtype, gpr and M checked."""
    values = [(4, 2), ("bfloat16", "float16"), (4, 1, 2, 8), (1, 3, 77, 300)]
    combos = list(itertools.product(*values))
    ordered = gpu.coverage_first(combos)
    assert sorted(ordered, key=str) == sorted(combos, key=str)
    for position, options in enumerate(values):
        assert {combo[position] for combo in ordered[:4]} == set(options)


def test_the_package_holds_no_device_plumbing():
    """The device check is test plumbing: the wheel neither ships it nor offers it as a command."""
    from spallm_plugins.cli import build_parser

    assert importlib.util.find_spec("spallm_plugins.bench.gpu") is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "gpu", "--tiny"])
