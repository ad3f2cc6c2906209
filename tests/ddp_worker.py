"""Run by test_ddp.py as a script: fit with the monitor on `devices` CPU processes and save what each rank holds.

Usage: python ddp_worker.py OUT_DIR DEVICES BATCH_SIZE [bn]
"""

import os
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).parent))

from lightning_lazy.callback import LazyTrainingMonitor  # noqa: E402

from lightning_helpers import Regressor, loaders  # noqa: E402


class BNRegressor(Regressor):
    """The Regressor with BatchNorm: running statistics differ between ranks, the measures must not."""

    def __init__(self) -> None:
        super().__init__(alpha=None, loss=None)
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                                         torch.nn.Linear(32, 2))


class Saver(pl.Callback):
    def __init__(self, out: Path, monitor: LazyTrainingMonitor) -> None:
        self.out, self.monitor = out, monitor

    def on_train_end(self, trainer, pl_module):
        measures = {k: v for k, v in self.monitor.measure(pl_module).items() if k != "displacement_per_tensor"}
        torch.save(
            {"twin": {k: v.cpu() for k, v in self.monitor.twin.parameters().items()},
             "real": {k: v.detach().cpu() for k, v in pl_module.named_parameters()},
             "measures": measures,
             "logged": {k: float(v) for k, v in trainer.callback_metrics.items()}},
            self.out / f"rank{trainer.global_rank}.pt",
        )


def main() -> None:
    out, devices, batch_size = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    batchnorm = len(sys.argv) > 4 and sys.argv[4] == "bn"
    torch.set_num_threads(1)
    train, val = loaders(batch_size=batch_size, n=64, dtype=torch.float64)
    if devices > 1:
        # Lightning's own DistributedSampler shuffles; in order, rank r takes examples r, r + 2, ... so that the
        # two ranks' batches together are the one-process batch.
        rank = int(os.environ.get("LOCAL_RANK", 0))
        sampler = DistributedSampler(train.dataset, num_replicas=devices, rank=rank, shuffle=False)
        train = DataLoader(train.dataset, batch_size=batch_size, sampler=sampler)
    monitor = LazyTrainingMonitor("mse" if batchnorm else None, kappa_probe_size=16, ntk_probe_size=8)
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
        precision="64-true", use_distributed_sampler=False, callbacks=[monitor, Saver(out, monitor)], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit((BNRegressor() if batchnorm else Regressor(alpha=10.0)).double(), train, val)


if __name__ == "__main__":
    main()
