"""An α-sweep on real data that ships with scikit-learn (8×8 digits, no download).

The check of Chizat, Oyallon & Bach (2019), section 4, at laptop scale: a small ReLU network is trained as
the centred, α-scaled model α·(f(x; w) − f(x; w0)) on the scaled objective R(α h)/α² (``LazyClassifier``
in ``lazy`` mode, square loss on one-hot targets, SGD with momentum), with the ``LazyTrainingMonitor``
training its linearized twin on the same batches. For each α the script records the test accuracy of the
network and of its tangent model, the divergence Δ between the two (on the test images), κ, the weight
displacement and the share of ReLUs whose on/off state is still the one at w0.

Expected (the paper's Figure 4 on CIFAR-10 with a VGG): as α grows, Δ falls (≈ 1/α) and the ReLU pattern
freezes — the network is its tangent model — while at small α the network leaves the linearization.

Learning rate: for each α the best of ``--lrs`` by final *training* loss on the first seed (the paper
picks it on a grid; no test data are used), then reused for the other seeds.

    python examples/digits_alpha_sweep.py --out-dir outputs/digits_alpha_sweep --log-dir runs/digits_alpha_sweep
    python examples/digits_alpha_sweep.py --quick        # seconds, for tests
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on CI / servers
import matplotlib.pyplot as plt  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.loggers import TensorBoardLogger  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from lightning_lazy.callback import LazyTrainingMonitor  # noqa: E402
from lightning_lazy.module import LazyClassifier  # noqa: E402
from lightning_lazy.quiet import quiet_third_party_output  # noqa: E402

CSV_FIELDS = [
    "alpha", "seed", "lr", "epochs", "seconds", "train_loss", "test_acc", "test_loss", "tangent_test_acc",
    "tangent_test_loss", "divergence", "kappa", "displacement", "activation_stability", "ntk_distance",
]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path("outputs/digits_alpha_sweep"), help="PNG and CSV go here")
    parser.add_argument("--log-dir", type=Path, default=Path("runs/digits_alpha_sweep"),
                        help="TensorBoard log directory")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.01, 0.1, 1.0, 10.0, 100.0, 1000.0],
                        help="output scales α")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.05, 0.01, 0.002],
                        help="learning-rate grid (the best by training loss is kept per α)")
    parser.add_argument("--seeds", type=int, default=3, help="initializations per α")
    parser.add_argument("--width", type=int, default=256, help="hidden width of the network")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=64, help="SGD batch size")
    parser.add_argument("--n-test", type=int, default=597, help="held-out images (the rest of the 1797 train)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (small model: 1 is fastest)")
    parser.add_argument("--quick", action="store_true", help="reduced size (seconds), for tests")
    args = parser.parse_args(argv)
    if args.quick:
        args.alphas, args.lrs, args.seeds, args.width, args.epochs = [0.1, 100.0], [0.05], 1, 64, 4
    for name in ("seeds", "width", "epochs", "batch_size", "threads"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 < args.n_test < 1797 - args.batch_size:
        parser.error(f"--n-test must leave at least one batch of the 1797 digits for training, got {args.n_test}")
    if any(a <= 0 for a in args.alphas) or any(lr <= 0 for lr in args.lrs):
        parser.error("--alphas and --lrs must be positive")
    return args


def load_digits_split(n_test: int, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 1797 8×8 digits, pixels scaled to [0, 1], float64; a stratified train/test split."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise SystemExit('this example needs scikit-learn: pip install -e ".[examples]"') from error
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=n_test, stratify=y, random_state=seed)

    def as_dataset(features, labels) -> TensorDataset:  # noqa: ANN001 - numpy arrays
        return TensorDataset(torch.tensor(features, dtype=torch.float64), torch.tensor(labels, dtype=torch.long))

    return as_dataset(x_train, y_train), as_dataset(x_test, y_test)


class DigitsMLP(nn.Module):
    """64 → width → 10 with an ``nn.ReLU`` module (so the monitor's activation-stability hook sees it)."""

    num_classes = 10

    def __init__(self, width: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)  # PyTorch's default (Kaiming-uniform) init, seeded
        self.net = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10)).double()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def train_one(args: argparse.Namespace, alpha: float, lr: float, seed: int, train_set: TensorDataset,
              test_set: TensorDataset, log: bool = True) -> dict:
    """Fit one (α, lr, seed); return the CSV row."""
    pl.seed_everything(seed, verbose=False)
    model = LazyClassifier(DigitsMLP(args.width, seed), mode="lazy", alpha=alpha, loss="mse", lr=lr,
                           momentum=0.9, lr_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=generator)
    test_loader = DataLoader(test_set, batch_size=len(test_set))
    x_test, y_test = test_set.tensors
    # Measures on the held-out images, 3 times per run (each costs a κ: a few Lanczos runs).
    # kernel_baseline: the tangent model at w0 trained to convergence on 512 training images (lazy/kernel/val_*).
    monitor = LazyTrainingMonitor(probe=(x_test, y_test), every_n_epochs=max(1, args.epochs // 3), kernel_baseline=512)
    logger = TensorBoardLogger(str(args.log_dir), name=f"alpha_{alpha:g}", version=f"lr_{lr:g}_seed_{seed}",
                               default_hp_metric=False) if log else False
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        precision="64-true",  # large α: the weights move by O(1/α), below float32's resolution at α ≳ 10³
        logger=logger,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        accelerator="cpu",
        check_val_every_n_epoch=max(1, args.epochs // 3),
    )
    params0 = {k: v.detach().clone() for k, v in model.backbone.named_parameters()}
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=train_loader, val_dataloaders=test_loader)
    seconds = time.perf_counter() - start
    metrics = dict(trainer.callback_metrics)
    x_train, y_train = train_set.tensors
    model.eval()
    with torch.no_grad():
        train_loss = float(model.risk(model(x_train), y_train))
    moved = sum(float(((p.detach() - params0[k]) ** 2).sum()) for k, p in model.backbone.named_parameters()) ** 0.5
    scale = sum(float((v**2).sum()) for v in params0.values()) ** 0.5
    return {
        "alpha": alpha,
        "seed": seed,
        "lr": lr,
        "epochs": args.epochs,
        "seconds": seconds,
        "train_loss": train_loss,
        "test_acc": float(metrics["val/acc"]),
        "test_loss": float(metrics["val/loss"]),
        "tangent_test_acc": float(metrics["lazy/tangent/val_acc"]),
        "tangent_test_loss": float(metrics["lazy/tangent/val_loss"]),
        "divergence": float(metrics["lazy/divergence"]),
        "kappa": float(metrics["lazy/kappa"]),
        "displacement": moved / scale,
        "activation_stability": float(metrics["lazy/activation_stability"]),
        "ntk_distance": float(metrics["lazy/ntk_distance"]),
    }


def summarise(rows: list[dict], key: str) -> tuple[list[float], list[float], list[float]]:
    alphas = sorted({r["alpha"] for r in rows})
    means, stds = [], []
    for alpha in alphas:
        values = torch.tensor([r[key] for r in rows if r["alpha"] == alpha], dtype=torch.float64)
        means.append(float(values.mean()))
        stds.append(float(values.std()) if values.numel() > 1 else 0.0)
    return alphas, means, stds


def divergence_slope(rows: list[dict], min_alpha: float = 1.0) -> float | None:
    """Least-squares slope of log Δ against log α over α ≥ ``min_alpha`` (None with fewer than 2 such α)."""
    alphas, means, _ = summarise(rows, "divergence")
    points = [(math.log(a), math.log(d)) for a, d in zip(alphas, means) if a >= min_alpha and d > 0]
    if len(points) < 2:
        return None
    lx = torch.tensor([p[0] for p in points], dtype=torch.float64)
    ly = torch.tensor([p[1] for p in points], dtype=torch.float64)
    lx = lx - lx.mean()
    return float((lx * (ly - ly.mean())).sum() / (lx**2).sum())


def plot(rows: list[dict], args: argparse.Namespace) -> plt.Figure:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    for key, label, style in (("test_acc", "network", "o-"),
                              ("tangent_test_acc", "tangent model (monitor's twin, same lr)", "s--")):
        alphas, mean, std = summarise(rows, key)
        ax.errorbar(alphas, [100 * v for v in mean], yerr=[100 * v for v in std], fmt=style, capsize=3, label=label)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("test accuracy")
    ax.legend(fontsize=8)

    ax = axes[1]
    alphas, mean, std = summarise(rows, "divergence")
    slope = divergence_slope(rows)
    fitted = "" if slope is None else f"; fitted slope for α ≥ 1: {slope:+.2f}"
    ax.errorbar(alphas, mean, yerr=std, fmt="o-", capsize=3,
                label=f"Δ = ‖αh − αh̄‖ / ‖y*‖ (test images){fitted}")
    # Reference slopes through the largest α, drawn over α ≥ 1 where the lazy asymptotics apply:
    # −1 is the theorem's rate for models with a Lipschitz Jacobian; ReLU kinks make the L² gap ≈ α^(-1/2).
    ref = [a for a in alphas if a >= 1.0] or alphas
    for power, style, text in ((1.0, "k:", "slope −1 (smooth models)"), (0.5, "k--", "slope −½")):
        ax.plot(ref, [mean[-1] * (alphas[-1] / a) ** power for a in ref], style, lw=1, label=text)
    ax.set_yscale("log")
    ax.set_title("divergence from the tangent path")
    ax.legend(fontsize=8)

    ax = axes[2]
    alphas, mean, std = summarise(rows, "displacement")
    ax.errorbar(alphas, mean, yerr=std, fmt="s--", capsize=3, color="C1", label="‖w − w0‖ / ‖w0‖ (left)")
    ax.set_yscale("log")
    ax.set_ylabel("relative weight displacement")
    right = ax.twinx()
    alphas, mean, std = summarise(rows, "activation_stability")
    right.errorbar(alphas, [100 * v for v in mean], yerr=[100 * v for v in std], fmt="o-", capsize=3, color="C0",
                   label="ReLUs in their w0 state (right)")
    right.set_ylabel("activation stability (%)")
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="center left")
    ax.set_title("how much the network moved")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("α (output scale of the centred model)")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"8×8 digits, MLP 64-{args.width}-10, square loss, SGD (momentum 0.9), {args.epochs} epochs; "
                 f"mean ± std over {args.seeds} seed(s)")
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    return fig


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the sweep; write the CSV, the PNG and TensorBoard logs; return the CSV rows."""
    args = parse_args(argv)
    quiet_third_party_output()  # Lightning's tips and internal deprecation notices: nothing to act on here
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # main() may be called in-process (tests)


def _run(args: argparse.Namespace) -> list[dict]:
    start = time.perf_counter()
    train_set, test_set = load_digits_split(args.n_test)
    rows: list[dict] = []
    for alpha in args.alphas:
        # Learning rate: best training loss on seed 0 over the grid (a single value needs no search).
        trials = []
        for lr in args.lrs:
            try:
                trials.append(train_one(args, alpha, lr, 0, train_set, test_set))
            except (FloatingPointError, ValueError) as error:  # diverged: LazyClassifier / the monitor say so
                print(f"alpha={alpha:g} lr={lr:g}: diverged ({error}); trying the next learning rate")
        trials = [r for r in trials if math.isfinite(r["train_loss"])]
        if not trials:
            raise SystemExit(f"every learning rate in --lrs {args.lrs} diverged at alpha={alpha:g}; give smaller ones")
        best = min(trials, key=lambda r: r["train_loss"])
        rows.append(best)
        rows += [train_one(args, alpha, best["lr"], seed, train_set, test_set) for seed in range(1, args.seeds)]
        for r in (row for row in rows if row["alpha"] == alpha):
            print(f"alpha={alpha:<7g} seed={r['seed']} lr={r['lr']:g}: test acc {r['test_acc']:.3f} (tangent "
                  f"{r['tangent_test_acc']:.3f}), Δ {r['divergence']:.3g}, "
                  f"ReLUs stable {r['activation_stability']:.3f}, "
                  f"displacement {r['displacement']:.3g}, train loss {r['train_loss']:.3g}, {r['seconds']:.1f}s",
                  flush=True)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.out_dir / "digits_alpha_sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    fig = plot(rows, args)
    png = args.out_dir / "digits_alpha_sweep.png"
    fig.savefig(png, dpi=120)
    with SummaryWriter(log_dir=str(args.log_dir / "figures")) as tb:
        tb.add_figure("digits_alpha_sweep", fig)  # closes the figure
    print(f"\n{len(rows)} runs kept, {time.perf_counter() - start:.0f} s in all")
    alphas, accuracies, _ = summarise(rows, "test_acc")
    _, divergences, _ = summarise(rows, "divergence")
    for alpha, acc, delta in zip(alphas, accuracies, divergences):
        print(f"  alpha={alpha:<7g} test acc {acc:.3f}  Δ {delta:.3g}")
    slope = divergence_slope(rows)
    if slope is not None:
        print(f"  slope of log Δ against log α over α ≥ 1: {slope:+.2f}")
    print(f"figure: {png}   TensorBoard: {args.log_dir}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
