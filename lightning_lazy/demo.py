"""``lightning-lazy demo``: lazy versus non-lazy training of a small network, watched by the monitor.

A ReLU network learns a teacher with 3 neurons on the sphere (data made on the fly, no download) at several
output scales α, each on the objective R(α h)/α² with the same learning rate in normalized time. The
``LazyTrainingMonitor`` trains the linearized twin beside each run and logs to TensorBoard; the table
printed at the end shows how the divergence Δ from the tangent path and κ fall as α grows, and what that
does to the test loss.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn

from lightning_lazy import diagnostics
from lightning_lazy.callback import LazyTrainingMonitor
from lightning_lazy.data.teacher import TeacherStudentDataModule
from lightning_lazy.scaling import AlphaScaled


class TeacherStudentRegressor(pl.LightningModule):
    """α·(h(x; w) − h(x; w0)) for a ReLU MLP h, trained by SGD on R(α h)/α² (R: ½ squared error)."""

    def __init__(self, d: int = 10, width: int = 256, depth: int = 2, alpha: float = 1.0, lr: float = 0.1,
                 momentum: float = 0.9, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        fan_in = d
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width), nn.ReLU()]
            fan_in = width
        layers.append(nn.Linear(fan_in, 1))
        self.model = AlphaScaled(nn.Sequential(*layers), alpha, loss="mse")

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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-lazy demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 1.0, 10.0, 100.0],
                        help="output scales to train at (default: 0.1 1 10 100)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--d", type=int, default=10, help="input dimension")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--n-train", type=int, default=65536)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--step", type=float, default=0.25,
                        help="learning rate in normalized time: lr = step / ||Dh(w0)||^2 (default 0.25)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", default="lightning_logs", help="TensorBoard root (default ./lightning_logs)")
    parser.add_argument("--quick", action="store_true", help="a few seconds: tiny sizes, for tests")
    parser.add_argument("--no-progress", action="store_true", help="hide Lightning's progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.epochs, args.width = min(args.epochs, 2), min(args.width, 32)
        args.n_train, args.batch_size = min(args.n_train, 256), min(args.batch_size, 64)
    for value, name in ((args.epochs, "--epochs"), (args.width, "--width"), (args.n_train, "--n-train")):
        if value < 1:
            raise SystemExit(f"lightning-lazy demo: {name} must be positive, got {value}")
    if any(not (a > 0 and math.isfinite(a)) for a in args.alphas):
        raise SystemExit(f"lightning-lazy demo: every alpha must be positive and finite, got {args.alphas}")
    torch.set_default_dtype(torch.float64)  # α up to 1e3 and more: float32 loses h(w) − h(w0)
    try:
        rows = [_run_one(args, alpha, i, len(args.alphas)) for i, alpha in enumerate(args.alphas)]
    finally:
        torch.set_default_dtype(torch.float32)
    print(format_table(rows))
    print(f"\nTensorBoard logs: tensorboard --logdir {args.log_dir}  (tags under lazy/; see the README)")
    return 0


def _run_one(args: argparse.Namespace, alpha: float, index: int, total: int) -> dict[str, float]:
    print(f"\n[{index + 1}/{total}] alpha = {alpha:g}")
    data = TeacherStudentDataModule(d=args.d, n_train=args.n_train, n_val=256, n_test=1024,
                                    batch_size=args.batch_size, seed=args.seed, dtype="float64")
    model = TeacherStudentRegressor(d=args.d, width=args.width, alpha=alpha, seed=args.seed)
    # One learning rate in normalized time for every α: the gradient flow of R(α h)/α² has time scale 1/‖Dh‖².
    data.setup("fit")
    x, _ = next(iter(data.train_dataloader()))
    model.hparams.lr = args.step / diagnostics.jacobian_norm(model.model.module, x, tol=1e-4).item() ** 2
    # Measured at every epoch end and after steps 1, 2, 4, 8, ...: log-spaced points show the early phase.
    monitor = LazyTrainingMonitor(log_steps="log")
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, callbacks=[monitor],
        logger=TensorBoardLogger(args.log_dir, name="demo", version=f"alpha_{alpha:g}"),
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=not args.no_progress,
        log_every_n_steps=50, precision="64-true",
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    metrics = dict(trainer.callback_metrics)  # trainer.test replaces them
    seconds = time.perf_counter() - start
    tested = trainer.test(model, datamodule=data, verbose=False)[0]
    return {
        "alpha": alpha,
        "divergence": float(metrics["lazy/divergence"]),
        "kappa": float(metrics["lazy/kappa"]),
        "displacement": float(metrics["lazy/displacement"]),
        "test_loss": tested["test_loss"],
        "tangent_test_loss": tested["lazy/tangent/test_loss"],
        "seconds": seconds,
    }


def format_table(rows: list[dict[str, float]]) -> str:
    header = f"{'alpha':>8} | {'divergence':>10} | {'kappa':>9} | {'displacement':>12} | {'test loss':>9} | {'tangent test loss':>17} | {'time':>6}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['alpha']:>8g} | {r['divergence']:>10.3g} | {r['kappa']:>9.3g} | {r['displacement']:>12.3g} | "
            f"{r['test_loss']:>9.3g} | {r['tangent_test_loss']:>17.3g} | {r['seconds']:>5.1f}s"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
