"""What LazyTrainingMonitor costs per epoch of the demo: no monitor vs twin off vs twin on.

Trains the demo's model and data (``lightning_lazy.demo``: ReLU MLP on teacher–student data, float64) for a
few epochs in each configuration, interleaved and repeated so that the ratios come from one run, and
reports the median time of an epoch (fit time, start-up measures included, divided by the epochs) and the
overhead relative to no monitor. Writes JSON.

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


def fit_seconds(config: str, args: argparse.Namespace) -> float:
    data = TeacherStudentDataModule(d=args.d, n_train=args.n_train, n_val=256, n_test=0,
                                    batch_size=args.batch_size, seed=0, dtype="float64")
    model = TeacherStudentRegressor(d=args.d, width=args.width, alpha=args.alpha, seed=0)
    data.setup("fit")
    x, _ = next(iter(data.train_dataloader()))
    model.hparams.lr = 0.25 / diagnostics.jacobian_norm(model.model.module, x, tol=1e-4).item() ** 2
    callbacks = [] if config == "plain" else [LazyTrainingMonitor(track_tangent=config == "twin_on")]
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, callbacks=callbacks, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         precision="64-true", num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    return time.perf_counter() - start


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
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for _ in range(args.repeats):
        for config in CONFIGS:  # interleaved: a slow spell of the machine hits every configuration
            times[config].append(fit_seconds(config, args) / args.epochs)
    medians = {c: statistics.median(v) for c, v in times.items()}
    rows = [(c, medians[c], medians[c] / medians["plain"] - 1.0) for c in CONFIGS]
    print(f"\nmonitor overhead: demo model width {args.width}, {args.n_train // args.batch_size} steps/epoch, "
          f"{args.epochs} epochs, median of {args.repeats}")
    print(f"{'configuration':>14} | {'s / epoch':>9} | {'overhead':>8}")
    for config, seconds, overhead in rows:
        print(f"{config:>14} | {seconds:>9.3f} | {overhead:>+8.1%}")
    result = {
        "args": vars(args), "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "seconds_per_epoch": times, "median": medians,
        "overhead": {c: o for c, _, o in rows},
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
