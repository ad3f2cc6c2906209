"""A tiny LightningModule that knows nothing of lightning_lazy but its AlphaScaled, and its data."""

from __future__ import annotations

import torch
import pytorch_lightning as pl
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lazy import AlphaScaled


class Regressor(pl.LightningModule):
    def __init__(self, alpha: float | None = 10.0, width: int = 32, d_in: int = 6, d_out: int = 2, lr: float = 0.05,
                 momentum: float = 0.9, scheduler: bool = True, linear_in_params: bool = False, seed: int = 0,
                 loss: str | None = "mse"):
        super().__init__()
        torch.manual_seed(seed)
        if linear_in_params:
            features = nn.Linear(d_in, width).requires_grad_(False)
            net = nn.Sequential(features, nn.ReLU(), nn.Linear(width, d_out))
        else:
            net = nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, d_out))
        self.model = net if alpha is None else AlphaScaled(net, alpha, loss=loss)
        self.lr, self.momentum, self.scheduler = lr, momentum, scheduler

    def forward(self, x):
        return self.model(x)

    def _loss(self, batch):
        x, y = batch
        out = self(x)
        if isinstance(self.model, AlphaScaled):
            return self.model.objective(out, y)
        return 0.5 * (out - y).pow(2).sum(1).mean()

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        optimizer = torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr, momentum=self.momentum)
        if not self.scheduler:
            return optimizer
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)]


def regression_data(n: int = 128, d_in: int = 6, d_out: int = 2, seed: int = 1, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=generator, dtype=dtype)
    y = torch.stack([torch.sin(2 * x[:, 0]), torch.cos(x[:, 1] * x[:, 2])], 1)[:, :d_out].to(dtype)
    return x, y


def loaders(batch_size: int = 16, n: int = 128, shuffle: bool = False, dtype=torch.float32):
    x, y = regression_data(n, dtype=dtype)
    train = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)
    val = DataLoader(TensorDataset(x[:32], y[:32]), batch_size=16)
    return train, val


def trainer(tmp_path, callbacks, max_epochs: int = 3, **kwargs) -> pl.Trainer:
    from pytorch_lightning.loggers import TensorBoardLogger

    options = dict(max_epochs=max_epochs, callbacks=callbacks, logger=TensorBoardLogger(str(tmp_path), name="runs"),
                   enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                   log_every_n_steps=1, default_root_dir=str(tmp_path))
    options.update(kwargs)
    return pl.Trainer(**options)
