"""What share of a fit's wall time the monitor's measurements take, with the default budget (5 %) and without one.

Three small models, which the budget test (``tests/test_budget.py``) takes from here (an MLP, a CNN with BatchNorm,
an attention layer), trained with ``LazyTrainingMonitor`` at its defaults for many short epochs (each ending in a
scheduled measurement), once with ``budget=0.05`` (the default) and once with ``budget=None``. For each: the share
the monitor keeps (``Budget.scheduled_share``: the scheduled measurements' seconds over the run's since the
measurement at w0 began), the share of all of them (``Budget.spent_share``: the whole ones at w0 and at the end
included), and how many scheduled measurements were taken in full, without their costliest parts (which), or left
out. Writes JSON.

    OMP_NUM_THREADS=1 python benchmarks/budget_share.py [--epochs 60] [--budget 0.05]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lazy import LazyTrainingMonitor
from lightning_lazy.watch.schedule import plan_words


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9)


#: The models' names in the table.
LABELS = {"mlp": "MLP 48-128-10", "cnn_bn": "CNN + BatchNorm", "attention": "attention"}


def models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """``{name: (network, input shape)}``, the same networks at every call (seeded)."""
    torch.manual_seed(0)
    return {
        "mlp": (nn.Sequential(nn.Flatten(), nn.Linear(48, 128), nn.ReLU(), nn.Linear(128, 10)), (3, 4, 4)),
        "cnn_bn": (nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(8, 10)), (3, 8, 8)),
        "attention": (nn.Sequential(nn.Flatten(1), nn.Unflatten(1, (6, 8)),
                                    nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
                                    nn.Flatten(), nn.Linear(48, 10)), (6, 8)),
    }


def loader(shape: tuple[int, ...], n: int = 64) -> DataLoader:
    """``n`` random inputs of ``shape`` with random labels of 10 classes (seeded), in batches of 4: 16 steps an epoch
    at the default ``n``."""
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)),
                      batch_size=4)


def fit(name: str, budget: float | None, epochs: int) -> dict:
    net, shape = models()[name]
    monitor = LazyTrainingMonitor(loss="cross_entropy", budget=budget, figure=False)
    started = time.perf_counter()
    pl.Trainer(max_epochs=epochs, callbacks=[monitor], logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(Classifier(net), loader(shape))
    seconds = time.perf_counter() - started
    counts = dict(monitor.core.budget.counts)
    return {"seconds": seconds, "share": monitor.core.budget.spent_share(),
            "scheduled_share": monitor.core.budget.scheduled_share(), "counts": counts,
            "entries": len(monitor.history), "summary_cost": monitor.core.budget.describe()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--budget", type=float, default=0.05)
    parser.add_argument("--json", default="benchmarks/results/budget_share.json")
    args = parser.parse_args()
    rows = {}
    print(f"{args.epochs} epochs x 16 steps, {torch.get_num_threads()} thread(s); share = measurements' wall time "
          "over the run's (w0's measurement included)")
    print(f"| model | budget {args.budget:g}: scheduled share | all measurements' share | scheduled measurements "
          "| fit s | no budget: share | fit s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in models():
        with_budget, without = fit(name, args.budget, args.epochs), fit(name, None, args.epochs)
        rows[name] = {"budget": with_budget, "none": without}
        counts = ", ".join(f"{n} {plan_words(tuple(k.split('+'))) if k not in ('full', 'skip', 'whole') else k}"
                           for k, n in with_budget["counts"].items() if n)
        # Without a budget Budget still times every measurement (its share is None: it thins nothing).
        print(f"| {LABELS[name]} | {100 * with_budget['scheduled_share']:.1f} % | {100 * with_budget['share']:.1f} % | "
              f"{counts} | {with_budget['seconds']:.1f} | {100 * without['share']:.1f} % | {without['seconds']:.1f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "machine": platform.processor() or platform.machine(),
                                           "threads": torch.get_num_threads(), "torch": torch.__version__,
                                           "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
