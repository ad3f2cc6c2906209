"""Watch laziness in a plain PyTorch loop: ``LazinessWatch`` beside your own optimizer, no framework.

A two-layer ReLU network learns a random teacher (``lightning_lazy.data.teacher`` style data, made here) at two
scales α of ``AlphaScaled``: at α = 100 training stays close to its linearization (lazy), at α = 1 it leaves it.
Each run writes TensorBoard events, ``laziness.png``, ``layers.png`` and ``lazy_summary.txt`` to its log folder.

    python examples/plain_pytorch_loop.py                      # about 10 s on one CPU thread
    tensorboard --logdir runs/plain_loop
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from lightning_lazy import AlphaScaled, LazinessWatch


def data(n: int = 512, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs on the sphere and the outputs of a random two-layer ReLU teacher with 4 units."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x = x / x.norm(dim=1, keepdim=True)
    w, a = torch.randn(4, d, generator=g), torch.randn(4, generator=g)
    return x, (torch.relu(x @ w.T) @ a).unsqueeze(1)


def train(alpha: float, log_dir: Path, epochs: int, lr: float = 0.5) -> LazinessWatch:
    torch.manual_seed(0)
    x, y = data()
    net = nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 1))
    model = AlphaScaled(net, alpha=alpha, loss="mse")  # α(f(x; w) − f(x; w0)), trained on R(αh)/α²
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True)

    watch = LazinessWatch(model, optimizer, probe=(x[:128], y[:128]), log_dir=str(log_dir))
    for _ in range(epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = model.objective(model(xb), yb)  # R(αh)/α²: what AlphaScaled trains on
            loss.backward()
            watch.batch(xb, yb, loss=loss)  # after backward, before step: the twin takes the same step
            optimizer.step()
        watch.epoch_end()  # a measurement per epoch, beside those at steps 1, 2, 4, 8, ...
    watch.close()  # the final figures and summary in log_dir
    return watch


def main(argv: list[str] | None = None) -> dict[float, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log-dir", default="runs/plain_loop", help="where each α's run folder goes")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs per run")
    parser.add_argument("--quick", action="store_true", help="3 epochs (for the tests)")
    args = parser.parse_args(argv)
    results = {}
    for alpha in (1.0, 100.0):
        watch = train(alpha, Path(args.log_dir) / f"alpha_{alpha:g}", 3 if args.quick else args.epochs)
        print(f"--- alpha = {alpha:g}\n{watch.summary()}\n")
        results[alpha] = dict(watch.history[-1])
    return results


if __name__ == "__main__":
    main()
