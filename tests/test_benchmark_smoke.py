"""Smoke test of benchmarks/twin_step.py: it runs at toy size and writes the JSON it promises.

Not a timing test: no number here is compared with a target, only the shape and sanity of the record.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "twin_step.py"
HAS_JAX = importlib.util.find_spec("jax") is not None


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("twin_step_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "twin.json"
    # (e) is left out: every JAX variant costs an XLA compilation, the bulk of this test's time.
    command = [
        sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--models", "mlp,vgg11", "--variants", "abcd",
        "--json", str(out),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(c) LinearizedModel twin" in done.stdout  # the table is printed

    results = json.loads(out.read_text())
    assert results["benchmark"] == "twin_step"
    assert results["settings"]["quick"] is True
    assert results["environment"]["device"] == "cpu"
    assert [(r["model"], r["width"]) for r in results["runs"]] == [("mlp", None), ("vgg11", 1)]
    for record in results["runs"]:
        variants = record["variants"]
        assert {"a", "b", "c"} <= set(variants)
        for name, entry in variants.items():
            assert entry["median_ms"] > 0 and math.isfinite(entry["median_ms"]), name
            assert entry["q1_ms"] <= entry["median_ms"] <= entry["q3_ms"] + 1e-9, name
            assert entry["timed_steps"] >= 1
            assert entry["cpu_ms"] >= 0
            assert math.isfinite(entry["final_loss"]) and not entry["diverged"], name
            # Linux + glibc: the host memory method works; the step needs *some* memory.
            if sys.platform.startswith("linux"):
                assert entry["step_mib"] is not None and entry["step_mib"] >= 0, name
        assert variants["a"]["ratio_to_a"] == pytest.approx(1.0)
        assert variants["c"]["ratio_to_a"] == pytest.approx(variants["c"]["median_ms"] / variants["a"]["median_ms"])
        # (b) trains the same tangent model as (c): after the same warm-up their parameters agree.
        assert record["agreement_with_c"]["b"] < 1e-4
        if HAS_JAX:
            assert "d" in variants, record["skipped"]
            assert variants["d"]["ratio_to_d"] == pytest.approx(1.0)
            assert record["agreement_with_c"]["d"] < 1e-3  # JAX's own float32 rounding, same maths
        else:
            assert record["skipped"]["d"].startswith("skipped")


def test_without_jax_the_jax_variants_are_skipped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bench = _load_benchmark()
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name, *a, **k: None)
    args = bench.parse_args(["--quick", "--models", "mlp", "--variants", "acde", "--no-memory"])
    worker = bench.JaxWorker(args)
    assert worker.error and "not installed" in worker.error
    record = bench.run_model("mlp", 1, args, bench.torch.device("cpu"), worker)
    assert set(record["variants"]) == {"a", "c"}
    assert set(record["skipped"]) == {"d", "e"}
    assert all(reason.startswith("skipped: JAX is not installed") for reason in record["skipped"].values())
    assert record["variants"]["c"]["ratio_to_d"] is None


MONITOR_COST = ROOT / "benchmarks" / "monitor_cost.py"


def test_monitor_cost_quick_run_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "cost.json"
    # neural-tangents is pointed at a missing interpreter: its XLA compilations would dominate the test.
    command = [
        sys.executable, str(MONITOR_COST), "--quick", "--threads", "1", "--models", "mlp", "--ntk-models", "mlp",
        "--nt-python", str(tmp_path / "missing-python"), "--device", "cpu", "--output", str(out),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fit_start: TOTAL" in done.stdout and "empirical NTK" in done.stdout  # the tables are printed

    results = json.loads(out.read_text())
    assert results["benchmark"] == "monitor_cost" and results["environment"]["device"] == "cpu"
    record = results["monitor"]["mlp"]
    assert record["plain_step_seconds"] > 0
    expected = {
        "fit_start": {"output_and_activation_states", "hessian_norm", "kappa_rest", "ntk"},
        "epoch_end": {"output_and_activation_states", "tangent_output", "hessian_norm", "kappa_rest", "ntk",
                      "spectrum", "layers"},
    }
    for bucket, names in expected.items():
        assert set(record["seconds"][bucket]) == names
        for name in names:
            assert record["in_steps"][bucket][name] == pytest.approx(
                record["seconds"][bucket][name] / record["plain_step_seconds"])
        assert record["total_in_steps"][bucket] == pytest.approx(sum(record["in_steps"][bucket].values()))
    for bucket in ("fit_start", "epoch_end"):  # the measures with and without the per-layer ones
        cost = record["per_layer"][bucket]
        assert cost["ratio"] == pytest.approx(cost["with"] / cost["without"]) and cost["with"] > 0
    values = record["values"]
    assert values["kappa_w0"] > 0 and 0 < values["activation_stability"] <= 1 and values["divergence"] > 0
    assert math.isfinite(values["ntk_distance"]) and values["ntk_distance"] > 0  # the weights were moved
    ntk = results["ntk"]["mlp"]
    assert ntk["lightning_lazy"]["relative_difference"] == 0.0
    assert ntk["neural_tangents"]["error"].startswith("skipped")
    if importlib.util.find_spec("nngeometry") is not None:
        assert ntk["nngeometry"]["relative_difference"] < 1e-5  # float32, same weights
    else:
        assert ntk["nngeometry"]["error"].startswith("skipped")


def test_monitor_cost_accuracy_study_quick_run(tmp_path: Path) -> None:
    out = tmp_path / "study.json"
    command = [sys.executable, str(MONITOR_COST), "--quick", "--accuracy-study", "--models", "mlp", "--ntk-models", "",
               "--device", "cpu", "--output", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    from lightning_lazy.watch.probe import CAREFUL_HESSIAN

    assert f"{tuple(CAREFUL_HESSIAN.values())} (default)" in done.stdout and "Lanczos tol=0.001 (monitor)" in done.stdout
    record = json.loads(out.read_text())["monitor"]["mlp"]
    for bucket in ("fit_start", "epoch_end", "jacobian_norm"):
        values = record["values"][bucket]
        assert set(values) == set(record["seconds"][bucket]) and "reference" in values
        assert all(v > 0 and math.isfinite(v) for v in values.values())
    # Lower bounds of the same norm: no search exceeds the true value, which the reference approaches.
    fit_start = record["values"]["fit_start"]
    assert max(fit_start.values()) <= fit_start["reference"] * 1.05
    assert record["values"]["jacobian_norm"]["Lanczos tol=0.0001"] == pytest.approx(
        record["values"]["jacobian_norm"]["reference"], rel=1e-3)


def test_readme_cost_floor_takes_the_twins_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/readme_cost.py's floor (a bare tangent step per batch) is a fair floor: it computes the same
    tangent path as the monitor's twin, run side by side on the README's snippet: their weights agree after an
    epoch in which they moved."""
    spec = importlib.util.spec_from_file_location("readme_cost_under_test", ROOT / "benchmarks" / "readme_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.readme_snippet().replace(module.MONITOR_LINE, "callbacks=[monitor, floor],").replace(
        "max_epochs=10", "max_epochs=1")
    floor = module.BareTangentStep()
    from lightning_lazy import LazyTrainingMonitor

    monitor = LazyTrainingMonitor(loss="cross_entropy", log_steps=None, figure=False, measure_kappa=False,
                                  measure_ntk=False, per_layer=False)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__", "monitor": monitor, "floor": floor})
    twin = monitor.twin.parameters()
    assert monitor.twin.steps == 29
    for name, value in floor.w.items():
        torch.testing.assert_close(value.detach(), twin[f"inner.net.{name}"], rtol=1e-4, atol=1e-6)
    assert max((floor.w[k] - floor.w0[k]).abs().max().item() for k in floor.w) > 1e-3  # it moved
