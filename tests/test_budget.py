"""The measurement budget: LazyTrainingMonitor(budget=0.05) keeps the measurements' share of the fit's wall time
near 5 % by measuring less (the costly parts first), says what it spent and thinned, and logs lazy/cost/share."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lazy import LazyTrainingMonitor
from lightning_lazy.watch.schedule import Budget


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9)


def _models():
    torch.manual_seed(0)
    return {
        "mlp": (nn.Sequential(nn.Flatten(), nn.Linear(48, 128), nn.ReLU(), nn.Linear(128, 10)), (3, 4, 4)),
        "cnn_bn": (nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(8, 10)), (3, 8, 8)),
        "attention": (nn.Sequential(nn.Flatten(1), nn.Unflatten(1, (6, 8)),
                                    nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
                                    nn.Flatten(), nn.Linear(48, 10)), (6, 8)),
    }


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "attention"])
def test_the_budget_keeps_the_share_and_says_what_it_thinned(name, tmp_path):
    net, shape = _models()[name]
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, *shape, generator=g), torch.randint(0, 10, (64,), generator=g))
    monitor = LazyTrainingMonitor(loss="cross_entropy", budget=0.05, probe_size=16, kappa_probe_size=4,
                                  ntk_probe_size=4, figure=False)
    # Many short epochs, each ending in a scheduled measurement: without a budget measuring would dominate.
    pl.Trainer(max_epochs=60, callbacks=[monitor], logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(
        Classifier(net), DataLoader(data, batch_size=4))
    budget = monitor.core.budget
    scheduled = 60 + 10  # epoch ends and log steps 1, 2, 4, ..., 512 (the last one at fit end is forced)
    assert budget.counts["cheap"] + budget.counts["skip"] > 0, budget.counts
    assert sum(budget.counts.values()) >= scheduled - 6
    assert 0.025 <= budget.spent_share() <= 0.075, (budget.spent_share(), budget.counts)
    assert "Cost: measurements took" in monitor.summary() and "left out" in monitor.summary()
    assert monitor.history[-1]["step"] == 960.0  # the end state, measured whatever the budget


def test_budget_plans():
    budget = Budget(0.5)
    assert budget.plan() == "full"  # before the run starts
    budget.start()
    budget.spend(1.0, "full")  # a measurement at w0 of 1 s, at once: far over half the time
    assert budget.plan() == "cheap"  # its cost is not known yet: learned by taking one
    budget.spend(0.5, "cheap")
    assert budget.plan() == "skip"
    with pytest.raises(ValueError, match="budget"):
        Budget(1.5)
    with pytest.raises(ValueError, match="budget"):
        LazyTrainingMonitor(budget=0)
