"""Watch laziness in a Lightning Fabric loop: ``LazinessWatch`` on what ``fabric.setup`` returns.

A small CNN on random images (CIFAR-10's shape, 3×32×32, 10 classes, made here), trained with cross-entropy by
SGD with momentum under Fabric; the watch trains the tangent twin beside it and writes TensorBoard events,
``laziness.png``, ``layers.png`` and ``lazy_summary.txt`` to its log folder.

    python examples/fabric_loop.py                     # about 20 s on one CPU thread
    tensorboard --logdir runs/fabric_loop
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from lightning_fabric import Fabric
from torch import nn

from lightning_lazy import LazinessWatch


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log-dir", default="runs/fabric_loop", help="TensorBoard events, figures and summary")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs")
    parser.add_argument("--quick", action="store_true", help="1 epoch (for the tests)")
    args = parser.parse_args(argv)

    fabric = Fabric(accelerator="cpu", devices=1)
    fabric.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(512, 3, 32, 32, generator=g), torch.randint(0, 10, (512,), generator=g)
    loader = fabric.setup_dataloaders(torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, labels), batch_size=64, shuffle=True))
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, optimizer = fabric.setup(model, optimizer)

    watch = LazinessWatch(model, optimizer, loss="cross_entropy", probe=(images[:128], labels[:128]),
                          log_dir=args.log_dir)
    for _ in range(1 if args.quick else args.epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            fabric.backward(loss)
            watch.batch(x, y, loss=loss)  # after backward, before step
            optimizer.step()
        watch.epoch_end()
    watch.close()
    print(watch.summary())
    return dict(watch.history[-1])


if __name__ == "__main__":
    main()
