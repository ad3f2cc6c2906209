"""What a person sees after a run: the verdict first, the regime as a number (scalar and HParams), the
figure on fixed axes, no bound claimed for adaptive optimizers, and the README's snippet running as pasted."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_lazy import LazyTrainingMonitor
from lightning_lazy.watch import report
from lightning_lazy._optim import adaptive_optimizer

from lightning_helpers import Regressor, loaders, trainer
from test_activations import fit, gated_net

ROOT = Path(__file__).resolve().parents[1]


def test_adaptive_optimizers_are_told_apart_by_class_and_group_keys() -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert adaptive_optimizer(torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True)) is None
    for cls in (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.Adadelta):
        assert adaptive_optimizer(cls(params, lr=0.1)) == cls.__name__

    class PlainDescent(torch.optim.Optimizer):  # a third-party gradient descent: only lr
        def __init__(self, params, lr):
            super().__init__(params, {"lr": lr})

    assert adaptive_optimizer(PlainDescent(params, lr=0.1)) is None


def test_adamw_run_summary_states_no_bound_and_logs_none() -> None:
    monitor = fit(gated_net(), LazyTrainingMonitor(loss="cross_entropy", probe_size=16), optimizer="adamw")
    assert all("bound" not in entry for entry in monitor.history)
    values = monitor.summary_values()
    assert values["adaptive_optimizer"] == "AdamW" and values["horizon"] is None
    text = monitor.summary()
    assert text.splitlines()[0].startswith("Regime:")
    assert "AdamW: adaptive" in text and "horizon t~*" not in text and "guarantee" not in text
    assert "not the theorem's time" in text  # t~ is still shown, as an x-axis, not as the theorem's time
    # The same net with SGD states the horizon.
    sgd = fit(gated_net(), LazyTrainingMonitor(loss="cross_entropy", probe_size=16))
    assert "horizon t~*" in sgd.summary() and all("bound" in entry for entry in sgd.history)


def test_regime_scalar_hparams_and_verdict_first(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    train, val = loaders()
    monitor = LazyTrainingMonitor(log_steps=None, measure_kappa=False)
    trainer(tmp_path, [monitor], max_epochs=2).fit(Regressor(alpha=10.0), train, val)
    (path,) = (tmp_path / "runs" / "version_0").glob("events.out.tfevents.*")
    events = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    regime = [e.value for e in events.Scalars("lazy/regime")]
    expected = report.regime_code(monitor.history[-1])
    assert len(regime) == 2 and regime[-1] == expected and set(regime) <= {0.0, 0.5, 1.0}
    assert len(events.Scalars("lazy/divergence")) == 2  # the HParams metrics are not logged a second time
    # The HParams tab: the monitor's experiment declares the regime and the last measures as metrics.
    content = events.PluginTagToContent("hparams")["_hparams_/experiment"]
    declared = {m.name.tag for m in plugin_data_pb2.HParamsPluginData.FromString(content).experiment.metric_infos}
    assert {"lazy/regime", "lazy/divergence", "lazy/activation_stability", "lazy/kernel_alignment"} <= declared
    assert monitor.summary().splitlines()[0] == report.regime(monitor.summary_values())
    # The Text tab's first line is the verdict too.
    text = events.Tensors("lazy/summary/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert text.strip().startswith("Regime:")


def test_regime_codes() -> None:
    assert report.regime_code({"divergence": 0.01, "activation_stability": 0.999}) == 1.0
    assert report.regime_code({"divergence": 0.15}) == 0.5
    assert report.regime_code({"activation_stability": 0.5}) == 0.0
    assert math.isnan(report.regime_code({}))


def _stability_history(low: float) -> list[dict[str, float]]:
    times = [0.5, 1.0, 2.0, 4.0]
    return [{"normalized_time": t, "divergence": 0.01 * t, "activation_stability": 1 - (1 - low) * t / 4,
             "kernel_alignment": 1 - (1 - low) * t / 8, "ntk_distance": 0.1 * t} for t in times]


def test_figure_panels_b_and_c_on_fixed_axes_with_alpha_and_verdict_in_the_title() -> None:
    limits = []
    for alpha, low in ((100.0, 0.999), (0.1, 0.75)):
        fig = report.laziness_figure(_stability_history(low), alpha=alpha)
        fig.canvas.draw()
        b = next(ax for ax in fig.axes if ax.get_title().startswith("(b)"))
        c = next(ax for ax in fig.axes if ax.get_title().startswith("(c)"))
        right = next(ax for ax in fig.axes if ax is not c and ax.bbox.bounds == c.bbox.bounds)
        limits.append((b.get_ylim(), c.get_ylim()))
        assert right.get_ylim()[0] == 0.0 and right.get_ylim()[1] >= 1.0
        verdict = report.classify_regime(_stability_history(low)[-1])
        assert fig._suptitle.get_text() == f"α = {alpha:g} · regime: {verdict}"
    # The same axes whatever the values: 0.999 and 0.75 are told apart at a glance.
    assert limits[0] == limits[1]
    assert np.allclose(limits[0][0], (0.0, 1.02)) and np.allclose(limits[0][1], (0.0, 1.02))


def test_readme_snippet_runs_as_pasted(tmp_path) -> None:
    pytest.importorskip("sklearn")
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Add it to your trainer"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "max_epochs=10" in code
    # As pasted, but 1 epoch and no sampled probe larger than the data needs: seconds, for the suite.
    code = code.replace("max_epochs=10", "max_epochs=1")
    script = tmp_path / "snippet.py"
    script.write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "lightning_logs" / "digits" / "version_0"
    assert (folder / "laziness.png").stat().st_size > 10_000
    assert not (tmp_path / "lightning_logs" / "lightning_logs").exists()
    output = done.stdout + done.stderr
    assert f"logs in lightning_logs{os.sep}digits{os.sep}version_0" in output
    assert f"figure lightning_logs{os.sep}digits{os.sep}version_0{os.sep}laziness.png" in output
    # Seeded: a second run, as users rerun what they paste, measures the same Δ (unseeded: 14.1 one run, 15.7 the next).
    again = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                           env=env)
    assert again.returncode == 0, again.stderr[-3000:]

    def divergence(text: str) -> str:
        return next(line for line in text.splitlines() if line.strip().startswith("divergence Δ from the tangent model"))

    assert divergence(again.stdout + again.stderr) == divergence(output)
