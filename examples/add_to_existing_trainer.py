"""The monitor watching a LightningModule that knows nothing of lightning_lazy.

``DigitClassifier`` below is an ordinary Lightning classifier (an MLP with cross-entropy on scikit-learn's
8×8 digits, which ship inside the package: no download). The only lines that mention lightning_lazy are
the import and the callback in ``Trainer(callbacks=[...])``: the monitor reads batches as ``(x, y)``,
calls ``forward(x)`` for outputs, copies the optimizer and follows the scheduler.

    python examples/add_to_existing_trainer.py [--epochs 10] [--log-dir lightning_logs]

It needs scikit-learn, the package's "examples" extra: ``pip install -e ".[examples]"``.
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lazy import LazyTrainingMonitor

try:
    from sklearn.datasets import load_digits
except ImportError:
    raise SystemExit('this example needs scikit-learn (the digits data): pip install -e ".[examples]"') from None


class DigitClassifier(pl.LightningModule):
    """Somebody else's model: nothing here is specific to lazy training."""

    def __init__(self, width: int = 256, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return [optimizer], [torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.max_epochs)]


def digits_loaders(batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, val = order[:1400], order[1400:]
    return (DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True),
            DataLoader(TensorDataset(x[val], y[val]), batch_size=256))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--log-dir", default="lightning_logs")
    args = parser.parse_args(argv)
    pl.seed_everything(0)
    train, val = digits_loaders()
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=[LazyTrainingMonitor(loss="cross_entropy", kernel_baseline=512)],  # <- the one added line
        logger=TensorBoardLogger(args.log_dir, name="existing_trainer"),
        log_every_n_steps=10,  # an epoch is 22 steps
        enable_model_summary=False,
    )
    trainer.fit(DigitClassifier(), train, val)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print({k: round(v, 4) for k, v in sorted(metrics.items())})
    return metrics


if __name__ == "__main__":
    from lightning_lazy.quiet import quiet_third_party_output

    quiet_third_party_output()  # Lightning's own tips and deprecation notices: nothing this script can act on
    main()
