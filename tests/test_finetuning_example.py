"""examples/finetuning_regime.py --quick: pre-training, fine-tuning runs with the monitor, CSV, PNG, TensorBoard."""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetuning_regime.py"


pytestmark = pytest.mark.usefixtures("restore_global_state")  # the example seeds and sets threads globally


def _load():
    spec = importlib.util.spec_from_file_location("example_finetuning_regime", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_marker_tasks_are_what_the_docstring_says():
    example = _load()
    tokens, positions = example.marker_sequences(200, vocab=10, length=8, seed=0)
    for marker, column in zip(example.MARKERS, positions.T):
        assert torch.equal(tokens.gather(1, column[:, None]).squeeze(1), torch.full((200,), marker))
        assert ((tokens == marker).sum(1) == 1).all(), "each marker exactly once"
    pre = example.pretraining_task((tokens, positions)).tensors[1]
    fine = example.finetuning_task((tokens, positions)).tensors[1]
    first = [row.tolist().index(next(t for t in row.tolist() if t in example.MARKERS)) for row in tokens]
    assert fine.tolist() == [int(tokens[i, first[i]]) - 1 for i in range(200)]
    assert pre.tolist() == [int(row.tolist().index(1) < row.tolist().index(2)) for row in tokens]
    assert 0.3 < pre.float().mean() < 0.7 and set(fine.tolist()) == {0, 1, 2}


def test_quick_run_writes_a_row_per_run_with_finite_measures_and_the_figure(tmp_path):
    example = _load()
    out, logs = tmp_path / "out", tmp_path / "runs"
    rows = example.main(["--quick", "--out-dir", str(out), "--log-dir", str(logs)])
    with open(out / "finetuning_regime.csv", newline="") as f:
        written = list(csv.DictReader(f))
    assert [r["run"] for r in written] == list(example.RUNS) == [r["run"] for r in rows]
    for row in written:
        for key in ("divergence", "kernel_alignment", "activation_stability", "val_acc", "tangent_val_acc"):
            assert math.isfinite(float(row[key])), (row["run"], key)
        assert 0 <= float(row["activation_stability"]) <= 1 and 0 <= float(row["tangent_val_acc"]) <= 1
    by_run = {r["run"]: float(r["divergence"]) for r in written}
    # α = 100 at the same learning rate is lazy by construction: far closer to its tangent model.
    assert by_run["alpha"] < 0.1 * by_run["large-lr"], by_run
    png = out / "finetuning_regime.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert {"small-lr", "large-lr", "alpha", "figures", "pretrain"} <= {p.name for p in logs.iterdir()}
    assert list((logs / "alpha").rglob("events.out.tfevents.*")), "TensorBoard logs of each run"
