"""Test loss at convergence against the initialization scale τ, in 100-D (Chizat, Oyallon & Bach 2019, §3).

A two-layer ReLU student h(x) = (1/√m) Σ_j b_j relu(a_j · x), weights ~ N(0, τ²) with the antisymmetric
initialization (h(w0) = 0), learns a teacher with three unit neurons and ±1 output weights, inputs uniform
on the sphere S^{d−1}, square loss. Two set-ups:

- over-parameterized: m(d + 1) parameters ≫ n training points; full-batch gradient descent on the fixed
  training set until its loss is (near) zero;
- under-parameterized: few neurons, SGD on fresh samples at every step, i.e. on the population loss.

For each τ and seed the script records the test loss (on fresh points), and what the LazyTrainingMonitor
measured at the end of training: the divergence Δ from the linearized twin (on a held-out probe), κ at
the end, κ(w0) (the monitor's laziness horizon is κ(w0)^{−1/2}) and the tangent model's own test loss.
As τ grows, κ(w0) ∝ τ⁻² falls, training turns lazy (Δ → 0) and the test loss climbs to the tangent
model's — the paper's observation that lazy training generalises worse here.

Learning rate: 1/‖Dh(w0)‖² (the time unit of the linearized dynamics, ``diagnostics.jacobian_norm``),
capped at ``--lr-max`` because at small τ the curvature grows as the neurons grow.

    python examples/teacher_student_tau.py --out-dir outputs/teacher_student_tau --log-dir runs/teacher_student_tau
    python examples/teacher_student_tau.py --quick        # small sizes, seconds, for tests
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
from torch import Tensor  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from lightning_lazy import diagnostics  # noqa: E402
from lightning_lazy.callback import LazyTrainingMonitor  # noqa: E402
from lightning_lazy.data.teacher import TeacherStudentDataModule  # noqa: E402
from lightning_lazy.models.shallow import TwoLayerReLU  # noqa: E402
from lightning_lazy.quiet import quiet_third_party_output  # noqa: E402
from lightning_lazy.scaling import AlphaScaled  # noqa: E402

SETUPS = ("overparameterized", "underparameterized")
CSV_FIELDS = [
    "setup", "tau", "seed", "m", "n_train", "batch_size", "steps", "lr", "seconds", "initial_train_loss",
    "train_loss", "test_loss", "val_loss", "tangent_val_loss", "divergence", "kappa_init", "kappa_final",
    "displacement", "activation_stability",
]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path("outputs/teacher_student_tau"), help="PNG and CSV go here")
    parser.add_argument("--log-dir", type=Path, default=Path("runs/teacher_student_tau"),
                        help="TensorBoard log directory")
    parser.add_argument("--d", type=int, default=100, help="input dimension")
    parser.add_argument("--taus", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0, 3.0],
                        help="initialization scales τ")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per τ (teacher, data and student)")
    parser.add_argument("--over-m", type=int, default=100, help="over-parameterized width")
    parser.add_argument("--over-n", type=int, default=1000, help="over-parameterized training-set size")
    parser.add_argument("--over-steps", type=int, default=3000, help="gradient-descent steps at most")
    parser.add_argument("--tol", type=float, default=1e-5, help="GD stops when train loss < tol × initial loss")
    parser.add_argument("--under-m", type=int, default=20, help="under-parameterized width")
    parser.add_argument("--under-batch", type=int, default=100, help="fresh samples per SGD step")
    parser.add_argument("--under-steps", type=int, default=3000, help="SGD steps")
    parser.add_argument("--lr-max", type=float, default=20.0, help="cap on the learning rate 1/‖Dh(w0)‖²")
    parser.add_argument("--n-test", type=int, default=2000, help="fresh test points (population-loss estimate)")
    parser.add_argument("--n-probe", type=int, default=1000, help="held-out probe points for the monitor (Δ)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (small models: 1 is fastest)")
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds), for tests")
    parser.add_argument("--from-csv", type=Path, default=None,
                        help="skip training: redraw the figure from a CSV this script wrote (the CSV does not "
                             "store d: pass --d if it was not 100)")
    args = parser.parse_args(argv)
    if args.quick:
        args.d, args.taus, args.seeds = 20, [0.05, 5.0], 1
        args.over_m, args.over_n, args.over_steps = 40, 200, 300
        args.under_m, args.under_batch, args.under_steps = 10, 50, 300
        args.n_test, args.n_probe = 500, 200
    for name in ("d", "seeds", "over_m", "over_n", "over_steps", "under_m", "under_batch", "under_steps",
                 "n_test", "n_probe", "threads"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.over_m % 2 or args.under_m % 2:
        parser.error("--over-m and --under-m must be even (the antisymmetric init pairs the neurons)")
    if any(t <= 0 for t in args.taus) or args.tol <= 0 or args.lr_max <= 0:
        parser.error("--taus, --tol and --lr-max must be positive")
    return args


class StudentRegression(pl.LightningModule):
    """Square-loss regression of an ``AlphaScaled`` student (α = 1: the init scale τ plays α's role).

    ``center=False``: the antisymmetric init already gives h(w0) = 0. Stops training when the loss of a
    step falls below ``tol`` × the first step's loss (``tol=None``: never).
    """

    def __init__(self, student: TwoLayerReLU, lr: float, tol: float | None) -> None:
        super().__init__()
        self.model = AlphaScaled(student, alpha=1.0, center=False, loss="mse")
        self.lr, self.tol = lr, tol
        self.initial_loss: float | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = self.model.objective(self(x), y)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"training diverged (loss {value}) at step {self.global_step}; lower --lr-max")
        if self.initial_loss is None:
            self.initial_loss = value
        if self.tol is not None and value < self.tol * self.initial_loss:
            self.trainer.should_stop = True
        self.log("train_loss", loss, on_step=True, on_epoch=False, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", self.model.objective(self(x), y), batch_size=x.shape[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def run_one(args: argparse.Namespace, setup: str, tau: float, seed: int) -> dict:
    """Train one student; return the CSV row."""
    over = setup == "overparameterized"
    m = args.over_m if over else args.under_m
    steps = args.over_steps if over else args.under_steps
    batch = None if over else args.under_batch
    n_train = args.over_n if over else args.under_batch * steps  # fresh: n_train = samples seen
    # One epoch = the whole run: the monitor measures at its end (and at w0), Lightning's loop stays lean.
    dm = TeacherStudentDataModule(d=args.d, n_train=args.over_n if over else args.under_batch, n_val=args.n_probe,
                                  n_test=args.n_test, batch_size=batch, fresh=not over, seed=seed,
                                  steps_per_epoch=steps)
    dm.setup("fit")
    student = TwoLayerReLU(args.d, m, tau=tau, antisymmetric=True, output_scale="1/sqrt(m)", seed=seed)
    x_val, y_val = dm.val_set.tensors
    jac = float(diagnostics.jacobian_norm(student, x_val[:256]))
    lr = min(args.lr_max, 1.0 / jac**2)
    model = StudentRegression(student, lr, tol=args.tol if over else None)
    params0 = {k: v.detach().clone() for k, v in student.named_parameters()}
    monitor = LazyTrainingMonitor(probe=(x_val, y_val), every_n_epochs=1)
    trainer = pl.Trainer(
        max_epochs=1,
        logger=TensorBoardLogger(str(args.log_dir), name=setup, version=f"tau_{tau:g}_seed_{seed}",
                                 default_hp_metric=False),
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, steps // 20),
        accelerator="cpu",
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - start
    x_test, y_test = dm.test_set.tensors
    with torch.no_grad():
        test_loss = float(model.model.objective(model(x_test), y_test))
        # Over-parameterized: the loss on the whole training set; fresh samples: the last batches' loss is
        # a population estimate, the test set gives a better one, so report the final step's loss.
        if over:
            x_train, y_train = dm.train_set.tensors
            train_loss = float(model.model.objective(model(x_train), y_train))
        else:
            train_loss = float(trainer.callback_metrics["train_loss"])
    metrics = trainer.callback_metrics
    return {
        "setup": setup,
        "tau": tau,
        "seed": seed,
        "m": m,
        "n_train": n_train if not over else args.over_n,
        "batch_size": batch or args.over_n,
        "steps": trainer.global_step,
        "lr": lr,
        "seconds": seconds,
        "initial_train_loss": model.initial_loss,
        "train_loss": train_loss,
        "test_loss": test_loss,
        # The network and its twin on the same held-out probe (the validation split): like for like.
        "val_loss": float(metrics["val_loss"]),
        "tangent_val_loss": float(metrics["lazy/tangent/val_loss"]),
        "divergence": float(metrics["lazy/divergence"]),
        "kappa_init": monitor.laziness_horizon ** -2,  # the horizon is κ(w0)^(-1/2)
        "kappa_final": float(metrics["lazy/kappa"]),
        "displacement": float(diagnostics.displacement(dict(student.named_parameters()), params0).total),
        "activation_stability": float(metrics["lazy/activation_stability"]),
    }


def summarise(rows: list[dict], setup: str, key: str) -> tuple[list[float], list[float], list[float]]:
    """τ values, mean and std over seeds of ``key`` for one set-up."""
    taus = sorted({r["tau"] for r in rows if r["setup"] == setup})
    means, stds = [], []
    for tau in taus:
        values = torch.tensor([r[key] for r in rows if r["setup"] == setup and r["tau"] == tau], dtype=torch.float64)
        means.append(float(values.mean()))
        stds.append(float(values.std()) if values.numel() > 1 else 0.0)
    return taus, means, stds


def plot(rows: list[dict], args: argparse.Namespace) -> plt.Figure:
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    titles = {
        "overparameterized": f"over-parameterized: GD, n = {args.over_n}, m = {args.over_m}",
        "underparameterized": f"under-parameterized: SGD on fresh samples, m = {args.under_m}",
    }
    for ax, setup in zip(axes[:2], SETUPS):
        taus, mean, std = summarise(rows, setup, "test_loss")
        ax.errorbar(taus, mean, yerr=std, fmt="o-", capsize=3, color="C0", label="network (mean ± std over seeds)")
        taus, t_mean, t_std = summarise(rows, setup, "tangent_val_loss")
        ax.errorbar(taus, t_mean, yerr=t_std, fmt="s--", capsize=3, color="C1", alpha=0.8,
                    label="its tangent model (monitor's twin: same steps and lr)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("initialization scale τ")
        ax.set_ylabel("test loss ½E(h(x) − y(x))²")
        ax.set_title(titles[setup], fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[2]
    for i, setup in enumerate(SETUPS):
        taus, d_mean, d_std = summarise(rows, setup, "divergence")
        colour = ("C2", "C3")[i]  # not C0/C1: those mean network/tangent in the other panels
        ax.errorbar(taus, d_mean, yerr=d_std, fmt="o-", capsize=3, color=colour, label=f"Δ at the end, {setup[:5]}.")
        taus, k_mean, _ = summarise(rows, setup, "kappa_init")
        ax.plot(taus, k_mean, "^:", color=colour, alpha=0.7, label=f"κ(w0), {setup[:5]}.")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("initialization scale τ")
    ax.set_title("laziness: divergence from the tangent path Δ, and κ(w0)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"Teacher–student in d = {args.d} (3 teacher neurons): test loss at convergence against τ")
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    return fig


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run every (set-up, τ, seed); write the CSV, the PNG and TensorBoard logs; return the CSV rows."""
    args = parse_args(argv)
    quiet_third_party_output()  # Lightning's tips and internal deprecation notices: nothing to act on here
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # main() may be called in-process (tests)


def read_rows(path: Path) -> list[dict]:
    """Rows of a CSV written by this script, numbers parsed back."""
    if not path.is_file():
        raise SystemExit(f"--from-csv: no such file {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != CSV_FIELDS:
            raise SystemExit(f"--from-csv: {path} does not have this script's columns {CSV_FIELDS}")
        return [{k: (v if k == "setup" else float(v)) for k, v in row.items()} for row in reader]


def _run(args: argparse.Namespace) -> list[dict]:
    start = time.perf_counter()
    if args.from_csv is not None:
        rows = read_rows(args.from_csv)
        # The figure's titles need the sizes; read them back from the rows.
        over = next(r for r in rows if r["setup"] == SETUPS[0])
        under = next(r for r in rows if r["setup"] == SETUPS[1])
        args.over_n, args.over_m, args.under_m = int(over["n_train"]), int(over["m"]), int(under["m"])
        return _report(args, rows, start)
    rows = []
    for setup in SETUPS:
        for tau in args.taus:
            for seed in range(args.seeds):
                pl.seed_everything(seed, verbose=False)
                row = run_one(args, setup, tau, seed)
                rows.append(row)
                print(f"{setup:18s} tau={tau:<6g} seed={seed}: test {row['test_loss']:.3g}, "
                      f"probe {row['val_loss']:.3g} (tangent {row['tangent_val_loss']:.3g}), "
                      f"train {row['train_loss']:.3g}, Δ {row['divergence']:.3g}, "
                      f"κ(w0) {row['kappa_init']:.3g}, {row['steps']} steps, {row['seconds']:.1f}s", flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.out_dir / "teacher_student_tau.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return _report(args, rows, start)


def _report(args: argparse.Namespace, rows: list[dict], start: float) -> list[dict]:
    """Figure (PNG + TensorBoard) and the printed summary."""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    fig = plot(rows, args)
    png = args.out_dir / "teacher_student_tau.png"
    fig.savefig(png, dpi=120)
    with SummaryWriter(log_dir=str(args.log_dir / "figures")) as tb:
        tb.add_figure("teacher_student_tau", fig)  # closes the figure
    print(f"\nmean test loss over seeds ({time.perf_counter() - start:.0f} s in all):")
    for setup in SETUPS:
        taus, mean, std = summarise(rows, setup, "test_loss")
        _, delta, _ = summarise(rows, setup, "divergence")
        cells = (f"τ={t:g}: {m:.2e}±{s:.1e} (Δ {dl:.2g})" for t, m, s, dl in zip(taus, mean, std, delta))
        print(f"  {setup}: " + ", ".join(cells))
    print(f"figure: {png}   TensorBoard: {args.log_dir}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
