"""``lightning-lazy demo``: lazy versus non-lazy training of a small network, watched by the monitor.

A ReLU network learns a teacher with 3 neurons on the sphere (data made on the fly, no download) at several
output scales α, each on the objective R(α h)/α² with the same learning rate in normalized time. The
``LazyTrainingMonitor`` trains the linearized twin beside each run and logs to TensorBoard; the table
printed at the end gives, per α, the predictor κ(w0) and the horizon t̃* it predicts, then what happened:
the divergence Δ from the tangent model, the share of ReLU units still in their initial state, the
alignment of the tangent kernel with its initial value, the test losses of the network and its twin, and the
kernel baseline: the validation loss of the kernel predictor at w0 (the tangent model trained to convergence on
512 training examples), the loss the network must beat to have learned more than its initial kernel.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn

from lightning_lazy import diagnostics
from lightning_lazy.callback import LazyTrainingMonitor
from lightning_lazy.data.teacher import TeacherStudentDataModule
from lightning_lazy.quiet import quiet_third_party_output
from lightning_lazy.watch.report import (  # noqa: F401  (tensorboard_command stays importable from here)
    FEATURE_LEARNING,
    IN_BETWEEN,
    LAZY,
    classify_regime,
    tensorboard_address,
    tensorboard_command,
)
from lightning_lazy.scaling import AlphaScaled

DEPTH = 2
MOMENTUM = 0.9
# SGD with momentum β on a quadratic is stable for lr·λ_max < 2(1 + β); λ_max of the tangent model's loss is
# ‖Dh(w0)‖² in this package's norms, so a larger --step diverges even where training is lazy.
MAX_STEP = 2 * (1 + MOMENTUM)


def relu_mlp(d: int, width: int, depth: int, seed: int) -> nn.Sequential:
    """The demo's network h: ``depth`` ReLU layers of ``width`` units and a linear output, seeded by ``seed``."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    fan_in = d
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
        fan_in = width
    layers.append(nn.Linear(fan_in, 1))
    return nn.Sequential(*layers)


class TeacherStudentRegressor(pl.LightningModule):
    """α·(h(x; w) − h(x; w0)) for a ReLU MLP h, trained by SGD on R(α h)/α² (R: ½ squared error).

    ``step``: when given, the learning rate in normalized time that ``lr`` stands for (lr = step/‖Dh(w0)‖²),
    kept in the hyper-parameters for the record.
    """

    def __init__(self, d: int = 10, width: int = 256, depth: int = DEPTH, alpha: float = 1.0, lr: float = 0.1,
                 momentum: float = MOMENTUM, seed: int = 0, step: float | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = AlphaScaled(relu_mlp(d, width, depth, seed), alpha, loss="mse")

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        loss = self.model.loss(self(x), y)  # R, comparable across α
        self.log(f"{stage}_loss", loss, prog_bar=stage != "test")
        return loss * self.model.loss_scale  # the objective R(α h)/α²

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


DESCRIPTION = (
    "Lazy versus non-lazy training of a small network, watched by the monitor. A ReLU MLP (two hidden layers, "
    "float64) learns a teacher with 3 ReLU neurons on the sphere (data made on the fly, nothing downloaded) at "
    "each output scale alpha, on R(alpha h)/alpha^2 with SGD (momentum 0.9) at one learning rate in normalized "
    "time. After each alpha the monitor prints its laziness summary; at the end a table, one row per alpha, and "
    "the command that opens the TensorBoard logs.")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-lazy demo", description=DESCRIPTION)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 1.0, 10.0, 100.0],
                        help="output scales to train at (default: 0.1 1 10 100)")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the training set per alpha (default 1)")
    parser.add_argument("--d", type=int, default=10, help="input dimension (default 10)")
    parser.add_argument("--width", type=int, default=256, help="units in each of the two hidden layers (default 256)")
    parser.add_argument("--n-train", type=int, default=65536,
                        help="training points, drawn once from the teacher (default 65536)")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch size (default 128)")
    parser.add_argument("--step", type=float, default=0.25,
                        help=f"learning rate in normalized time, in (0, {MAX_STEP:g}): lr = step / ||Dh(w0)||^2 "
                             "(default 0.25)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the network's initialization and of the data (default 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: for models this small, more threads only wait on each "
                             "other, and on a busy machine much longer)")
    parser.add_argument("--log-dir", default="lightning_logs",
                        help="TensorBoard root (default ./lightning_logs); each run of the demo adds demo/version_N/")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, at most 2 epochs (seconds of training), for tests")
    parser.add_argument("--no-progress", action="store_true", help="hide Lightning's progress bar")
    return parser


def _check(args: argparse.Namespace) -> None:
    """One-line SystemExit for each argument that cannot run."""
    def stop(message: str) -> None:
        raise SystemExit(f"lightning-lazy demo: {message}")

    for name in ("epochs", "d", "width", "n_train", "batch_size", "threads"):
        value = getattr(args, name)
        if value < 1:
            stop(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    names = [f"{a:g}" for a in args.alphas]
    if not all(a > 0 and math.isfinite(a) for a in args.alphas):
        stop(f"every alpha must be positive and finite, got {' '.join(names)}")
    if len(set(names)) < len(names):  # each alpha has its folder alpha_<value:g>
        stop(f"give each alpha once, got {' '.join(names)}")
    if not (0 < args.step < MAX_STEP):
        stop(f"--step must be in (0, {MAX_STEP:g}) (larger steps diverge even for the tangent model), "
             f"got {args.step:g}")
    if Path(args.log_dir).exists() and not Path(args.log_dir).is_dir():
        stop(f"--log-dir {args.log_dir} is a file, not a folder")


def _next_version(root: Path) -> str:
    """``version_N`` with N one more than the largest under ``root`` (0 for the first): a rerun never appends."""
    numbers = [int(p.name[8:]) for p in root.glob("version_*") if p.is_dir() and p.name[8:].isdigit()]
    return f"version_{max(numbers, default=-1) + 1}"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.epochs, args.width = min(args.epochs, 2), min(args.width, 32)
        args.n_train, args.batch_size = min(args.n_train, 256), min(args.batch_size, 64)
    _check(args)
    quiet_third_party_output(demo=True)
    root = Path(args.log_dir) / "demo"
    version = _next_version(root)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float64)  # α up to 1e3 and more: float32 loses h(w) − h(w0)
    try:
        rows = [_run_one(args, alpha, version, i, len(args.alphas)) for i, alpha in enumerate(args.alphas)]
    finally:
        torch.set_default_dtype(torch.float32)
        torch.set_num_threads(threads)  # main() may run in-process (tests)
    print()
    print(format_table(rows))
    print(f"\nTensorBoard: {tensorboard_command(root / version)}\n  then open {tensorboard_address()}\n  (the lazy/ "
          "tags with smoothing 0; untick Settings > 'Ignore outliers in chart scaling' once; the figures under "
          "Images; see the README)")
    return 0


# The demo's own scalars (its table's columns, also HParams metrics): a group that TensorBoard, which orders tag
# groups alphabetically, shows after the monitor's lazy/.
TABLE_PREFIX = "table/"


class DemoLogger(TensorBoardLogger):
    """Lightning's TensorBoardLogger without the ``epoch`` scalar Lightning adds to every logging step.

    A chart of the epoch number tells nothing in a run of one or a few epochs, and ``epoch`` sorts before
    ``lazy`` in TensorBoard, which opens on the first tag group: without it the demo's logs open on ``lazy/``.
    """

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        kept = {key: value for key, value in metrics.items() if key != "epoch"}
        if kept:
            super().log_metrics(kept, step)


def progress_bar(alpha: str) -> pl.Callback:
    """Lightning's default progress bar (Rich when installed, else tqdm) showing ``alpha`` in place of the logger's
    version, which Lightning cuts to its last 4 characters (``version_0/alpha_0.1`` reads ``_0.1``)."""
    from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar
    from pytorch_lightning.utilities.imports import _RICH_AVAILABLE

    base = RichProgressBar if _RICH_AVAILABLE else TQDMProgressBar

    class AlphaProgressBar(base):  # type: ignore[valid-type, misc]
        def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, int | str | float]:
            metrics = super().get_metrics(trainer, pl_module)
            metrics.pop("v_num", None)
            return {"alpha": alpha, **metrics}

    return AlphaProgressBar()


def _run_one(args: argparse.Namespace, alpha: float, version: str, index: int, total: int) -> dict[str, float | str]:
    print(f"\n[{index + 1}/{total}] alpha = {alpha:g}", flush=True)
    data = TeacherStudentDataModule(d=args.d, n_train=args.n_train, n_val=256, n_test=1024,
                                    batch_size=args.batch_size, seed=args.seed, dtype="float64")
    data.setup("fit")
    x, _ = next(iter(data.train_dataloader()))
    # One learning rate in normalized time for every α: the gradient flow of R(α h)/α² has time scale 1/‖Dh‖²
    # (h unscaled: the objective's 1/α² cancels the α² of ‖D(αh)‖²). Same seed, so the network trained below.
    jacobian_norm = diagnostics.jacobian_norm(relu_mlp(args.d, args.width, DEPTH, args.seed), x, tol=1e-4).item()
    model = TeacherStudentRegressor(d=args.d, width=args.width, alpha=alpha, lr=args.step / jacobian_norm**2,
                                    seed=args.seed, step=args.step)
    # Measured at every epoch end and after steps 1, 2, 4, 8, ...: log-spaced points show the early phase. The
    # kernel baseline: the tangent model at w0 trained to convergence on 512 training examples, on the val set.
    # No budget: on a model this small measuring costs more than training, and the demo is there to show every
    # measurement (a real run keeps the default 5 %).
    monitor = LazyTrainingMonitor(log_steps="log", kernel_baseline=512, budget=None)
    # demo/version_N/alpha_A: one folder per run of the demo, all its α side by side in TensorBoard.
    logger = DemoLogger(args.log_dir, name="demo", version=f"{version}/alpha_{alpha:g}", default_hp_metric=False)
    steps_per_epoch = math.ceil(args.n_train / args.batch_size)
    bars = [] if args.no_progress else [progress_bar(f"{alpha:g}")]
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, callbacks=[monitor, *bars], logger=logger,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=not args.no_progress,
        log_every_n_steps=min(50, steps_per_epoch), precision="64-true",
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    tested = trainer.test(model, datamodule=data, verbose=False)[0]
    last = monitor.history[-1] if monitor.history else {}
    kappa0 = monitor.initial_kappa
    row: dict[str, float | str] = {
        "alpha": alpha,
        "kappa0": kappa0 if kappa0 is not None else math.nan,
        "horizon": monitor.laziness_horizon if kappa0 is not None else math.nan,
        "divergence": float(last.get("divergence", math.nan)),
        "activation_stability": float(last.get("activation_stability", math.nan)),
        "kernel_alignment": float(last.get("kernel_alignment", math.nan)),
        "test_loss": float(tested["test_loss"]),
        "tangent_test_loss": float(tested.get("lazy/tangent/test_loss", math.nan)),
        "kernel_val_loss": (monitor.kernel_baseline_values or {}).get("val_loss", math.nan),
        "seconds": seconds,
    }
    row["regime"] = classify_regime(row)
    # The HParams tab: this run's hyper-parameters (the lr really used) against what it measured, the table's
    # columns, under table/ (after lazy/ in TensorBoard's alphabetical order of tag groups).
    logger.log_hyperparams(model.hparams, {f"{TABLE_PREFIX}{k}": v for k, v in row.items()
                                           if k not in ("alpha", "regime") and math.isfinite(v)})
    return row


_REGIME_SHORT = {LAZY: "lazy", FEATURE_LEARNING: "feature learning", IN_BETWEEN: "in between"}
COLUMNS = [  # (key, header, format)
    ("alpha", "alpha", "{:g}"),
    ("kappa0", "kappa(w0)", "{:.3g}"),
    ("horizon", "horizon t~*", "{:.3g}"),
    ("divergence", "divergence", "{:.3g}"),
    ("activation_stability", "act. stability", "{:.4f}"),
    ("kernel_alignment", "kernel alignment", "{:.4f}"),
    ("test_loss", "test loss", "{:.3g}"),
    ("tangent_test_loss", "tangent test loss", "{:.3g}"),
    ("kernel_val_loss", "kernel val loss", "{:.3g}"),
    ("seconds", "time", "{:.1f}s"),
    ("regime", "regime", "{}"),
]


def format_table(rows: list[dict[str, float | str]]) -> str:
    """The demo's table: one row per α, the columns of ``COLUMNS`` (missing or NaN values read ``n/a``)."""
    def cell(row: dict[str, float | str], key: str, form: str) -> str:
        value = row.get(key, math.nan)
        if isinstance(value, str):
            return _REGIME_SHORT.get(value, value)
        return form.format(value) if math.isfinite(value) else "n/a"

    cells = [[cell(row, key, form) for key, _, form in COLUMNS] for row in rows]
    widths = [max([len(header)] + [len(r[i]) for r in cells]) for i, (_, header, _) in enumerate(COLUMNS)]
    header = " | ".join(h.rjust(w) if i < len(COLUMNS) - 1 else h.ljust(w)
                        for i, ((_, h, _), w) in enumerate(zip(COLUMNS, widths)))
    lines = [header.rstrip(), "-" * len(header)]
    for r in cells:
        lines.append(" | ".join(c.rjust(w) if i < len(COLUMNS) - 1 else c.ljust(w)
                                for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
