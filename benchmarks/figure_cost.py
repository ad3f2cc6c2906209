"""What the monitor's fit-end drawing costs on the README's example, against an earlier revision's route.

Trains the README's "Add it to your trainer" snippet once (benchmarks/readme_cost.py reads it) and keeps the
monitor's measurements; then draws the laziness figure and the per-layer heat map from them ``--repeats`` times,
alternating two routes in this one process:

- old: ``--old`` revision's ``lightning_lazy/report.py`` (read with ``git show``) and the route its monitor took:
  ``figure_to_array`` → ``matplotlib.image.imsave`` (the PNG file) and ``SummaryWriter.add_image`` (which encodes
  the pixels again), for each figure;
- new: this tree's ``report.figure_to_png`` (one draw, one encoding) and ``LazyTrainingMonitor._save_png``, the
  same bytes to the file and to TensorBoard.

Prints wall (perf_counter) and CPU (process_time) medians in ms, and whether both routes draw the same pixels.

    OMP_NUM_THREADS=1 python benchmarks/figure_cost.py [--old fdc956f] [--repeats 10]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from matplotlib.image import imsave
from torch.utils.tensorboard import SummaryWriter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from lightning_lazy.watch import report  # noqa: E402
from lightning_lazy.callback import LazyTrainingMonitor  # noqa: E402
from readme_cost import readme_snippet  # noqa: E402


def trained_monitor() -> LazyTrainingMonitor:
    """The monitor of one run of the README snippet (in a temporary folder, output silenced)."""
    here, scope = os.getcwd(), {"__name__": "__readme__"}
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        os.chdir(folder)
        try:
            exec(compile(readme_snippet(), "README.md", "exec"), scope)
        finally:
            os.chdir(here)
    return next(c for c in scope["trainer"].callbacks if isinstance(c, LazyTrainingMonitor))


def old_report(revision: str):
    """``lightning_lazy/report.py`` as it was at ``revision``, imported as a module of its own."""
    text = subprocess.run(["git", "show", f"{revision}:lightning_lazy/report.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_report.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("old_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", default="fdc956f", help="the revision whose report.py and route are 'old'")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    monitor = trained_monitor()
    old = old_report(args.old)
    laziness = {"horizon": monitor.summary_values()["horizon"], "per_tensor": monitor._last_per_tensor,
                "alpha": monitor._loss_scale ** -0.5}
    folder = tempfile.mkdtemp()
    writer = SummaryWriter(folder)
    monitor._log_folder = folder

    def draw_old() -> None:
        pixels = old.figure_to_array(old.laziness_figure(monitor.history, **laziness))
        imsave(os.path.join(folder, "laziness.png"), pixels)
        writer.add_image("lazy/figure", pixels, 0, dataformats="HWC")
        pixels = old.figure_to_array(old.layers_figure(monitor.layer_history))
        imsave(os.path.join(folder, "layers.png"), pixels)
        writer.add_image("lazy/layers", pixels, 0, dataformats="HWC")

    def draw_new() -> None:
        png = report.figure_to_png(report.laziness_figure(monitor.history, **laziness))
        monitor._save_png(png, "laziness.png", writer, "lazy/figure", 0)
        png = report.figure_to_png(report.layers_figure(monitor.layer_history))
        monitor._save_png(png, "layers.png", writer, "lazy/layers", 0)

    same = (np.array_equal(old.figure_to_array(old.laziness_figure(monitor.history, **laziness)),
                           report.figure_to_array(report.laziness_figure(monitor.history, **laziness)))
            and np.array_equal(old.figure_to_array(old.layers_figure(monitor.layer_history)),
                               report.figure_to_array(report.layers_figure(monitor.layer_history))))
    routes = {"old": draw_old, "new": draw_new}
    wall: dict[str, list[float]] = {name: [] for name in routes}
    cpu: dict[str, list[float]] = {name: [] for name in routes}
    for draw in routes.values():
        draw()  # warm-up: first calls
    for _ in range(args.repeats):  # alternating: a slow spell of the machine hits both routes
        for name, draw in routes.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            draw()
            wall[name].append(time.perf_counter() - start_wall)
            cpu[name].append(time.process_time() - start_cpu)
    print(f"README example ({len(monitor.history)} measurements, {len(monitor.layer_history)} per-layer), both "
          f"figures drawn, saved and logged, medians of {args.repeats} alternated; same pixels: {same}")
    for name in routes:
        print(f"  {name} ({args.old if name == 'old' else 'this tree'}): wall {1000 * statistics.median(wall[name]):.0f} "
              f"ms, CPU {1000 * statistics.median(cpu[name]):.0f} ms")


if __name__ == "__main__":
    main()
