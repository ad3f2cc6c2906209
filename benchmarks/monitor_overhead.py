"""What LazyTrainingMonitor costs per epoch of the demo: no monitor vs twin off vs twin on.

Trains the demo's model and data (``lightning_lazy.demo``: ReLU MLP on teacher–student data, float64) for a
few epochs in each configuration, interleaved and repeated so that the ratios come from one run, and
reports the median time of an epoch (training, validation and the monitor's end-of-epoch measures) and its
overhead relative to no monitor, and the one-time start-up cost (fit time not spent in epochs: the probe,
κ(w0) with a careful search of ‖D²h(w0)‖, the initial NTK). Writes JSON.

    python benchmarks/monitor_overhead.py            # the demo's size
    python benchmarks/monitor_overhead.py --quick    # seconds, for the smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from lightning_lazy import diagnostics
from lightning_lazy.callback import LazyTrainingMonitor
from lightning_lazy.data.teacher import TeacherStudentDataModule
from lightning_lazy.demo import TeacherStudentRegressor

CONFIGS = ("plain", "twin_off", "twin_on")


class EpochTimer(pl.Callback):
    """Placed after the monitor, so an epoch's time includes the monitor's end-of-epoch measures."""

    def __init__(self) -> None:
        self.epochs: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epochs.append(time.perf_counter() - self._start)


def fit_seconds(config: str, args: argparse.Namespace) -> tuple[float, float]:
    """(median epoch time, start-up time) of one fit."""
    data = TeacherStudentDataModule(d=args.d, n_train=args.n_train, n_val=256, n_test=0,
                                    batch_size=args.batch_size, seed=0, dtype="float64")
    model = TeacherStudentRegressor(d=args.d, width=args.width, alpha=args.alpha, seed=0)
    data.setup("fit")
    x, _ = next(iter(data.train_dataloader()))
    model.hparams.lr = 0.25 / diagnostics.jacobian_norm(model.model.module, x, tol=1e-4).item() ** 2
    timer = EpochTimer()
    callbacks = [] if config == "plain" else [LazyTrainingMonitor(track_tangent=config == "twin_on")]
    callbacks.append(timer)
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, callbacks=callbacks, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         precision="64-true", num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    total = time.perf_counter() - start
    return statistics.median(timer.epochs), total - sum(timer.epochs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=10.0)
    parser.add_argument("--d", type=int, default=10)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--n-train", type=int, default=65536)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--json", default="benchmarks/results/monitor_overhead.json")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.repeats, args.width, args.n_train, args.batch_size = 1, 1, 16, 256, 64
    torch.set_default_dtype(torch.float64)
    epochs: dict[str, list[float]] = {c: [] for c in CONFIGS}
    startup: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for _ in range(args.repeats):
        for config in CONFIGS:  # interleaved: a slow spell of the machine hits every configuration
            epoch, start = fit_seconds(config, args)
            epochs[config].append(epoch)
            startup[config].append(start)
    medians = {c: statistics.median(v) for c, v in epochs.items()}
    startups = {c: statistics.median(v) for c, v in startup.items()}
    rows = [(c, medians[c], medians[c] / medians["plain"] - 1.0, startups[c] - startups["plain"]) for c in CONFIGS]
    print(f"\nmonitor overhead: demo model width {args.width}, {args.n_train // args.batch_size} steps/epoch, "
          f"{args.epochs} epochs, median of {args.repeats}, {torch.get_num_threads()} thread(s)")
    print(f"{'configuration':>14} | {'s / epoch':>9} | {'overhead':>8} | {'extra start-up (s)':>18}")
    for config, seconds, overhead, extra in rows:
        print(f"{config:>14} | {seconds:>9.3f} | {overhead:>+8.1%} | {extra:>18.2f}")
    result = {
        "args": vars(args), "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "seconds_per_epoch": epochs, "startup_seconds": startup,
        "median_epoch": medians, "epoch_overhead": {c: o for c, _, o, _ in rows},
        "extra_startup_seconds": {c: e for c, _, _, e in rows},
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
