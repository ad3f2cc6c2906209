"""Is fine-tuning a pretrained network lazy? A small Transformer, pre-trained then fine-tuned, watched by the monitor.

Malladi et al. (2023), "A Kernel-Based View of Language Model Fine-Tuning" (ICML), ask whether fine-tuning a
pretrained language model behaves like kernel regression with the network's empirical NTK at the
pretrained weights, i.e. whether it is *lazy* in the sense of Chizat, Oyallon & Bach (2019). This script
asks the same question of a Lightning model, with nothing but ``LazyTrainingMonitor`` added to the fine-tuning
``Trainer``:

1. **Pre-training.** A small Transformer encoder (``torch.nn.TransformerEncoder``, ReLU feed-forward
   layers, token embedding + learned positions, mean pooling, linear head) learns a synthetic sequence task:
   every sequence of ``--length`` tokens holds the three marker tokens 1, 2, 3 once each, at random
   positions, among filler tokens; the label is whether marker 1 comes before marker 2 (binary).
2. **Fine-tuning** on a related task with few examples (``--n-finetune``): which of the three markers comes
   first (3 classes). The pretrained encoder is kept, the head is replaced by a new one (same seed for every
   run, so every run starts from the same w0). Runs (``--runs``), all SGD with momentum 0.9 on the
   cross-entropy, for the same number of epochs:

   - ``small-lr``: learning rate ``--small-lr``;
   - ``large-lr``: learning rate ``--large-lr``;
   - ``alpha``: the centred, scaled model α·(f(w) − f(w0)) (``AlphaScaled``) on R(αh)/α² with α = ``--alpha``
     at the large learning rate: lazy by construction (Chizat et al., section 2), the reference.

The monitor trains the tangent model (the linearization at the pretrained weights) in lock-step and logs,
on a held-out probe: Δ = ``lazy/divergence`` (distance between the network and its tangent model, relative to
the initial error), ``lazy/kernel_alignment`` (of the empirical NTK with the one at w0), ``lazy/activation_stability``
(share of ReLU units in the feed-forward layers whose on/off state is still the one at w0),
``lazy/tangent/val_acc`` (accuracy of the tangent model, i.e. of kernel fine-tuning) beside the network's.

Outputs: ``finetuning_regime.csv`` (one row per run), ``finetuning_regime.png`` (the measures against the epoch
and the two accuracies), TensorBoard logs (one run per fine-tuning, plus the figure).

    python examples/finetuning_regime.py --out-dir outputs/finetuning_regime --log-dir runs/finetuning_regime
    python examples/finetuning_regime.py --quick        # seconds, for tests
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on CI / servers
import matplotlib.pyplot as plt  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pytorch_lightning.callbacks import Callback  # noqa: E402
from pytorch_lightning.loggers import TensorBoardLogger  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from lightning_lazy import AlphaScaled, LazyTrainingMonitor  # noqa: E402
from lightning_lazy.quiet import quiet_third_party_output  # noqa: E402

MARKERS = (1, 2, 3)  # token 0 is unused (kept for padding-free simplicity); fillers are 4 .. vocab-1
RUNS = ("small-lr", "large-lr", "alpha")
CSV_FIELDS = [
    "run", "lr", "alpha", "epochs", "seconds", "pretrain_acc", "divergence", "kernel_alignment",
    "activation_stability", "ntk_distance", "displacement", "kappa", "val_acc", "tangent_val_acc", "val_loss",
    "tangent_val_loss", "head_only_val_acc",
]
HISTORY_KEYS = ("lazy/divergence", "lazy/kernel_alignment", "lazy/activation_stability", "val/acc",
                "lazy/tangent/val_acc")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", "--output", type=Path, default=Path("outputs/finetuning_regime"),
                        help="PNG and CSV go here")
    parser.add_argument("--log-dir", type=Path, default=Path("runs/finetuning_regime"), help="TensorBoard logs")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS), help="fine-tuning runs")
    parser.add_argument("--small-lr", type=float, default=0.01, help="learning rate of the small-lr run")
    parser.add_argument("--large-lr", type=float, default=0.1, help="learning rate of the large-lr and alpha runs")
    parser.add_argument("--alpha", type=float, default=100.0, help="α of the AlphaScaled run")
    parser.add_argument("--vocab", type=int, default=12, help="vocabulary size (3 markers, the rest fillers)")
    parser.add_argument("--length", type=int, default=12, help="tokens per sequence")
    parser.add_argument("--d-model", type=int, default=32, help="Transformer width")
    parser.add_argument("--layers", type=int, default=2, help="encoder layers")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--n-pretrain", type=int, default=8192, help="pre-training sequences")
    parser.add_argument("--pretrain-epochs", type=int, default=8, help="pre-training epochs (Adam)")
    parser.add_argument("--n-finetune", type=int, default=256, help="fine-tuning training sequences")
    parser.add_argument("--n-val", type=int, default=512, help="held-out fine-tuning sequences (also the probe)")
    parser.add_argument("--epochs", type=int, default=20, help="fine-tuning epochs")
    parser.add_argument("--batch-size", type=int, default=32, help="fine-tuning batch size")
    parser.add_argument("--every", type=int, default=2, help="monitor measures every n epochs")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, pre-training and the new head")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (small model: 1 is fastest)")
    parser.add_argument("--quick", action="store_true", help="reduced size (seconds), for tests")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_pretrain, args.pretrain_epochs, args.n_finetune, args.n_val = 1024, 2, 64, 64
        args.epochs, args.every, args.d_model, args.layers = 2, 1, 16, 1
    for name in ("vocab", "length", "d_model", "layers", "heads", "n_pretrain", "pretrain_epochs", "n_finetune",
                 "n_val", "epochs", "batch_size", "every", "threads"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.vocab <= max(MARKERS) + 1:
        parser.error(f"--vocab must leave filler tokens besides the markers {MARKERS}, got {args.vocab}")
    if args.length < len(MARKERS):
        parser.error(f"--length must hold the {len(MARKERS)} markers, got {args.length}")
    if args.d_model % args.heads:
        parser.error(f"--d-model ({args.d_model}) must be a multiple of --heads ({args.heads})")
    if min(args.small_lr, args.large_lr, args.alpha) <= 0:
        parser.error("--small-lr, --large-lr and --alpha must be positive")
    return args


# ---------------------------------------------------------------------------------------------- data


def marker_sequences(n: int, vocab: int, length: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` sequences ``[n, length]`` (long) of filler tokens with the markers 1, 2, 3 once each at random
    positions, and the positions of the markers ``[n, 3]``."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(max(MARKERS) + 1, vocab, (n, length), generator=generator)
    positions = torch.rand(n, length, generator=generator).argsort(dim=1)[:, : len(MARKERS)]
    tokens.scatter_(1, positions, torch.tensor(MARKERS).expand(n, -1))
    return tokens, positions


def pretraining_task(tokens_positions: tuple[Tensor, Tensor]) -> TensorDataset:
    """Label 1 when marker 1 comes before marker 2, else 0."""
    tokens, positions = tokens_positions
    return TensorDataset(tokens, (positions[:, 0] < positions[:, 1]).long())


def finetuning_task(tokens_positions: tuple[Tensor, Tensor]) -> TensorDataset:
    """Label k ∈ {0, 1, 2}: marker k + 1 comes first."""
    tokens, positions = tokens_positions
    return TensorDataset(tokens, positions.argmin(dim=1))


# --------------------------------------------------------------------------------------------- model


class SequenceClassifier(nn.Module):
    """Tokens ``[N, L]`` (long) → logits ``[N, num_classes]``: embedding + learned positions, a
    ``nn.TransformerEncoder`` (batch_first, ReLU feed-forward, no dropout), mean pooling, linear head."""

    def __init__(self, vocab: int, length: int, d_model: int, heads: int, layers: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Parameter(0.1 * torch.randn(length, d_model))
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=2 * d_model, dropout=0.0,
                                           activation="relu", batch_first=True)
        # enable_nested_tensor=False: nested tensors only pay off with padding masks, and PyTorch warns otherwise.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        hidden = self.encoder(self.embed(tokens) + self.position)
        return self.head(hidden.mean(dim=1))

    def new_head(self, num_classes: int, seed: int) -> SequenceClassifier:
        """A copy with a freshly initialized head for ``num_classes`` (seeded: every run gets the same)."""
        model = copy.deepcopy(self)
        torch.manual_seed(seed)
        model.head = nn.Linear(self.head.in_features, num_classes)
        model.num_classes = num_classes
        return model.train()  # the pretrained network may have been left in eval mode by an evaluation


class Classifier(pl.LightningModule):
    """A user's LightningModule: ``forward(x)`` returns logits, trained on the cross-entropy with SGD.

    With ``alpha`` the network is the centred, scaled model α·(f(w) − f(w0)) (``AlphaScaled``) trained on
    R(α h)/α²; the monitor reads α and the loss from it.
    """

    def __init__(self, net: nn.Module, lr: float, alpha: float | None = None, optimizer: str = "sgd") -> None:
        super().__init__()
        self.net = net if alpha is None else AlphaScaled(net, alpha, center=True, loss="cross_entropy")
        self.lr = lr
        self.optimizer_name = optimizer

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def objective(self, logits: Tensor, y: Tensor) -> Tensor:
        return self.net.objective(logits, y) if isinstance(self.net, AlphaScaled) else F.cross_entropy(logits, y)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        self.log("train/loss", F.cross_entropy(logits, y), on_step=False, on_epoch=True)
        return self.objective(logits, y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class History(Callback):
    """Keeps the validation and ``lazy/`` values of every epoch the monitor measured (``every`` n epochs);
    placed after the monitor in the callbacks, so its values of the epoch are in."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.rows: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every:
            return  # callback_metrics would still hold the last measurement
        metrics = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch + 1}
        row.update({k: float(metrics[k]) for k in HISTORY_KEYS if k in metrics})
        self.rows.append(row)


def trainer_for(args: argparse.Namespace, epochs: int, logger: Any, callbacks: list[Callback]) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, logger=logger, callbacks=callbacks, accelerator="cpu",
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, log_every_n_steps=5)


def accuracy(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def pretrain(args: argparse.Namespace) -> tuple[SequenceClassifier, float]:
    """The pretrained network and its held-out accuracy on the pre-training task."""
    pl.seed_everything(args.seed, verbose=False)
    train = pretraining_task(marker_sequences(args.n_pretrain, args.vocab, args.length, args.seed + 1))
    val = pretraining_task(marker_sequences(1024, args.vocab, args.length, args.seed + 2))
    net = SequenceClassifier(args.vocab, args.length, args.d_model, args.heads, args.layers, num_classes=2)
    module = Classifier(net, lr=1e-3, optimizer="adam")
    generator = torch.Generator().manual_seed(args.seed)
    logger = TensorBoardLogger(str(args.log_dir), name="pretrain", version="", default_hp_metric=False)
    trainer_for(args, args.pretrain_epochs, logger, []).fit(
        module, DataLoader(train, batch_size=64, shuffle=True, generator=generator),
        DataLoader(val, batch_size=len(val)))
    return net, accuracy(net, val)


def head_only_accuracy(pretrained: SequenceClassifier, train: TensorDataset, val: TensorDataset) -> float:
    """Held-out accuracy of a linear probe (logistic regression on the frozen pooled features): what the
    pretrained features give without moving them."""
    def features(x: Tensor) -> Tensor:
        with torch.no_grad():
            return pretrained.encoder(pretrained.embed(x) + pretrained.position).mean(dim=1)

    pretrained.eval()
    f_train, f_val = features(train.tensors[0]), features(val.tensors[0])
    mean, std = f_train.mean(0), f_train.std(0) + 1e-6
    probe = nn.Linear(f_train.shape[1], 3)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=200)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(probe((f_train - mean) / std), train.tensors[1]) + 1e-3 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float((probe((f_val - mean) / std).argmax(1) == val.tensors[1]).float().mean())


def finetune(args: argparse.Namespace, run: str, pretrained: SequenceClassifier, train: TensorDataset,
             val: TensorDataset) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """One fine-tuning run with the monitor on: its CSV row and its per-epoch history."""
    lr = args.small_lr if run == "small-lr" else args.large_lr
    alpha = args.alpha if run == "alpha" else None
    pl.seed_everything(args.seed, verbose=False)
    net = pretrained.new_head(3, seed=args.seed + 10)
    module = Classifier(net, lr=lr, alpha=alpha)
    # The probe is the held-out set: Δ, the kernel and the ReLU states are measured where accuracy is.
    # --quick skips the two costliest extras (κ's Hessian search, the monitor's own figure): Δ, the kernel and
    # the ReLU states stay.
    monitor = LazyTrainingMonitor(loss=None if alpha else "cross_entropy", probe=val.tensors,
                                  every_n_epochs=args.every, kappa_probe_size=16, ntk_probe_size=16,
                                  measure_kappa=not args.quick, figure=not args.quick)
    history = History(args.every)
    logger = TensorBoardLogger(str(args.log_dir), name=run, version="", default_hp_metric=False)
    trainer = trainer_for(args, args.epochs, logger, [monitor, history])
    generator = torch.Generator().manual_seed(args.seed)
    params0 = {k: v.detach().clone() for k, v in net.named_parameters()}
    start = time.perf_counter()
    trainer.fit(module, DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=generator),
                DataLoader(val, batch_size=len(val)))
    seconds = time.perf_counter() - start
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    moved = math.sqrt(sum(float((p.detach() - params0[k]).pow(2).sum()) for k, p in net.named_parameters()))
    scale = math.sqrt(sum(float(v.pow(2).sum()) for v in params0.values()))
    row = {
        "run": run, "lr": lr, "alpha": alpha if alpha is not None else 1.0, "epochs": args.epochs,
        "seconds": round(seconds, 2), "displacement": moved / scale,
        **{key: metrics.get(f"lazy/{key}", math.nan) for key in
           ("divergence", "kernel_alignment", "activation_stability", "ntk_distance", "kappa")},
        "val_acc": metrics["val/acc"], "val_loss": metrics["val/loss"],
        "tangent_val_acc": metrics.get("lazy/tangent/val_acc", math.nan),
        "tangent_val_loss": metrics.get("lazy/tangent/val_loss", math.nan),
    }
    return row, history.rows


# -------------------------------------------------------------------------------------------- figure


def plot(rows: list[dict], histories: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> plt.Figure:
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.4))
    labels = {"small-lr": f"lr {args.small_lr:g}", "large-lr": f"lr {args.large_lr:g}",
              "alpha": f"α = {args.alpha:g}, lr {args.large_lr:g}"}
    for ax, key, title, log in ((axes[0], "lazy/divergence", "Δ: network vs tangent model (held-out)", True),
                                (axes[1], "lazy/kernel_alignment", "alignment of the NTK with K(w0)", False),
                                (axes[2], "lazy/activation_stability", "ReLUs in their w0 state", False)):
        for run, history in histories.items():
            points = [(h["epoch"], h[key]) for h in history if key in h]
            if points:
                ax.plot(*zip(*points), "o-", label=labels[run])
        ax.set_title(title)
        ax.set_xlabel("fine-tuning epoch")
        if log:
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[3]
    positions = torch.arange(len(rows), dtype=torch.float64)
    ax.bar(positions - 0.2, [100 * r["val_acc"] for r in rows], 0.4, label="network")
    ax.bar(positions + 0.2, [100 * r["tangent_val_acc"] for r in rows], 0.4, label="tangent model (kernel)")
    ax.axhline(100 * rows[0]["head_only_val_acc"], color="k", ls=":", lw=1, label="linear probe on frozen features")
    ax.set_xticks(positions.tolist(), [labels[r["run"]] for r in rows], fontsize=8)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 125)  # room for the legend above the bars
    ax.set_title("fine-tuned accuracy")
    ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(f"Fine-tuning a pretrained Transformer ({args.layers} layer(s), width {args.d_model}) on "
                 f"{args.n_finetune} examples: which runs stay in the kernel regime? "
                 f"(pre-training accuracy {100 * rows[0]['pretrain_acc']:.1f} %)")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Pre-train, fine-tune every run with the monitor; write the CSV, the PNG and TensorBoard logs; return
    the CSV rows."""
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
    pretrained, pretrain_acc = pretrain(args)
    print(f"pre-training: held-out accuracy {pretrain_acc:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    train = finetuning_task(marker_sequences(args.n_finetune, args.vocab, args.length, args.seed + 3))
    val = finetuning_task(marker_sequences(args.n_val, args.vocab, args.length, args.seed + 4))
    probe_acc = head_only_accuracy(pretrained, train, val)
    rows, histories = [], {}
    for run in args.runs:
        row, histories[run] = finetune(args, run, pretrained, train, val)
        row.update(pretrain_acc=pretrain_acc, head_only_val_acc=probe_acc)
        rows.append(row)
        print(f"{run:>9}: Δ {row['divergence']:.3g}, kernel alignment {row['kernel_alignment']:.3f}, "
              f"ReLUs stable {row['activation_stability']:.3f}, displacement {row['displacement']:.3g}, "
              f"accuracy {row['val_acc']:.3f} (tangent model {row['tangent_val_acc']:.3f}), {row['seconds']:.0f} s",
              flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.out_dir / "finetuning_regime.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    fig = plot(rows, histories, args)
    png = args.out_dir / "finetuning_regime.png"
    fig.savefig(png, dpi=110)
    with SummaryWriter(log_dir=str(args.log_dir / "figures")) as tb:
        tb.add_figure("finetuning_regime", fig)  # closes the figure
    print(f"linear probe on the frozen pretrained features: {probe_acc:.3f}")
    print(f"{time.perf_counter() - start:.0f} s in all; figure: {png}   TensorBoard: {args.log_dir}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
