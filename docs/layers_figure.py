"""Draw ``docs/layers.png``: the per-layer heat maps of two runs of the demo (α = 0.1 and α = 100), from the
``lazy/layers/*`` scalars the monitor logged to TensorBoard.

    .venv/bin/lightning-lazy demo --no-progress --log-dir runs          # writes runs/demo/version_N/alpha_*
    .venv/bin/python docs/layers_figure.py runs/demo/version_N docs/layers.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from matplotlib.image import imsave
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_lazy.demo import TeacherStudentRegressor
from lightning_lazy.diagnostics import parameter_owning_modules
from lightning_lazy.watch.naming import layer_labels, layer_names
from lightning_lazy.watch.report import REGIME_CODES, figure_to_array, layers_figure
from lightning_lazy.watch.twin import Watched


def layer_history(run: Path) -> list[dict]:
    """The monitor's ``layer_history`` of one run, read back from its ``lazy/layers/<layer>/<measure>`` scalars."""
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    times = {e.step: e.value for e in events.Scalars("lazy/normalized_time")}
    entries: dict[int, dict] = {step: {"normalized_time": t, "layers": {}} for step, t in times.items()}
    for tag in events.Tags()["scalars"]:
        if tag.startswith("lazy/layers/"):
            layer, measure = tag[len("lazy/layers/"):].rsplit("/", 1)
            for event in events.Scalars(tag):
                entries[event.step]["layers"].setdefault(layer, {})[measure] = event.value
    return [entries[step] for step in sorted(entries)]


def demo_labels() -> dict[str, str]:
    """``{short name: label}`` of the demo's layers, as the monitor names them (``0`` -> ``0 Linear(10→256)``)."""
    watched = Watched(TeacherStudentRegressor())  # the demo's network at its default sizes
    modules = parameter_owning_modules(watched)
    short, labels = layer_names(watched, modules), layer_labels(watched, modules)
    return {short[m]: labels[m] for m in modules}


def last_regime(run: Path) -> str | None:
    """The run's regime, from the last value of its ``lazy/regime`` scalar."""
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    code = events.Scalars("lazy/regime")[-1].value
    return next((name for name, value in REGIME_CODES.items() if value == code), None)


def main(folder: str, output: str) -> None:
    panels = []
    for alpha in ("0.1", "100"):
        run = Path(folder) / f"alpha_{alpha}"
        figure = layers_figure(layer_history(run), title="demo", alpha=float(alpha), regime=last_regime(run),
                               labels=demo_labels())
        panels.append(figure_to_array(figure))
    width = max(p.shape[1] for p in panels)
    panels = [np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0)), constant_values=255) for p in panels]
    imsave(output, np.concatenate(panels))


if __name__ == "__main__":
    main(*sys.argv[1:3])
