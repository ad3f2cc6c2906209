"""Any objective the twin cannot reproduce at w0, at any precision, is said once and its numbers are not logged;
the common cases are recognised so that no warning is needed (issue: never a wrong number, round 2)."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lazy import LazyTrainingMonitor


class Classifier(pl.LightningModule):
    """``how``: "module" (an nn.CrossEntropyLoss(label_smoothing=0.1) attribute), "functional" (the same smoothing
    passed to F.cross_entropy in training_step), "mixup" (inputs and targets mixed in training_step), "plain"."""

    def __init__(self, net: nn.Module, how: str) -> None:
        super().__init__()
        self.net, self.how = net, how
        self.criterion = nn.CrossEntropyLoss(label_smoothing=0.1 if how == "module" else 0.0)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.how == "functional":
            return F.cross_entropy(self(x), y, label_smoothing=0.1)
        if self.how == "mixup":
            lam, perm = 0.7, torch.arange(len(x)).flip(0)
            out = self(lam * x + (1 - lam) * x[perm])
            return lam * F.cross_entropy(out, y) + (1 - lam) * F.cross_entropy(out, y[perm])
        return self.criterion(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _nets():
    torch.manual_seed(0)
    return {"mlp": nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 5)),
            "cnn": nn.Sequential(nn.Unflatten(1, (3, 2, 2)), nn.Conv2d(3, 8, 2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 5))}


def _fit(how: str, net: nn.Module, precision: str):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 12, generator=g), torch.randint(0, 5, (64,), generator=g))
    monitor = LazyTrainingMonitor(loss="cross_entropy", figure=False, per_layer=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pl.Trainer(max_epochs=2, callbacks=[monitor], logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, precision=precision).fit(
            Classifier(net, how), DataLoader(data, batch_size=16))
    said = [str(w.message) for w in caught if "another objective" in str(w.message)]
    return monitor, said


@pytest.mark.parametrize("net", ["mlp", "cnn"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_an_objective_the_twin_was_not_told_is_said_at_any_precision(net, precision):
    for how in ("functional", "mixup"):
        monitor, said = _fit(how, _nets()[net], precision)
        assert len(said) == 1 and "\n" not in said[0], (how, said)
        assert monitor.history and all("divergence" not in h and "tangent_gap" not in h for h in monitor.history)
        assert "stopped following" in monitor.summary()


@pytest.mark.parametrize("net", ["mlp", "cnn"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_loss_module_with_label_smoothing_is_recognised(net, precision):
    monitor, said = _fit("module", _nets()[net], precision)
    assert not said and monitor.twin.lost is None
    assert all("divergence" in h for h in monitor.history)
