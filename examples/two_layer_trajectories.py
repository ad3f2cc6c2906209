"""Neuron paths of a two-layer ReLU student in 2-D: feature learning at τ = 0.1, lazy training at τ = 2.

The cover experiment of Chizat, Oyallon & Bach (2019): a student h(x) = (1/√m) Σ_j b_j relu(a_j · x) with
every weight drawn from N(0, τ²) and the antisymmetric initialization (h(w0) = 0) learns a teacher with
three unit neurons from n points on the unit circle, by full-batch gradient descent on the square loss
until the training loss is near zero. Each neuron is drawn as the path of |b_j(t)| · a_j(t) in the plane,
coloured by the sign of b_j; the unit circle and the teacher's directions are drawn too.

- τ = 0.1 (small init, κ(w0) ≈ 17): the neurons leave the origin and the largest ones gather on the
  teacher's directions — the features are learned.
- τ = 2 (large init, κ(w0) ≈ 0.04): the same training loss is reached with neurons that barely move —
  lazy training, the network stays close to its linearization around w0.

κ(w0) and ‖Dh(w0)‖ come from ``diagnostics.kappa`` on the training points; the LazyTrainingMonitor trains
the linearized twin alongside and logs Δ etc. on held-out points. The learning rate is 1/‖Dh(w0)‖² (the
time unit of the linearized dynamics), capped at ``--lr-max`` for the small init, whose curvature grows
as the neurons grow. Training stops when the training loss falls below ``--tol`` times its initial value
or after ``--max-steps``.

    python examples/two_layer_trajectories.py --out-dir outputs/trajectories --log-dir runs/trajectories
    python examples/two_layer_trajectories.py --quick      # seconds, for tests
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
import numpy as np  # noqa: E402
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
from lightning_lazy.watch.report import FEATURE_LEARNING, IN_BETWEEN, LAZY, classify_regime  # noqa: E402
from lightning_lazy.scaling import AlphaScaled  # noqa: E402

SIGN_COLOURS = {1.0: "tab:red", -1.0: "tab:blue"}
REGIME_LABELS = {LAZY: "lazy", FEATURE_LEARNING: "feature learning", IN_BETWEEN: "in between"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path("outputs/trajectories"), help="PNG and CSV go here")
    parser.add_argument("--log-dir", type=Path, default=Path("runs/trajectories"), help="TensorBoard log directory")
    parser.add_argument("--taus", type=float, nargs="+", default=[0.1, 2.0], help="initialization scales τ")
    parser.add_argument("--m", type=int, default=50, help="student width (even: antisymmetric init)")
    parser.add_argument("--n-train", type=int, default=30, help="training points on the circle")
    parser.add_argument("--max-steps", type=int, default=10000, help="gradient-descent steps at most")
    parser.add_argument("--tol", type=float, default=1e-6, help="stop when train loss < tol × initial loss")
    parser.add_argument("--lr-max", type=float, default=2.0, help="cap on the learning rate 1/‖Dh(w0)‖²")
    parser.add_argument("--record-every", type=int, default=25, help="record neuron positions every k steps")
    parser.add_argument("--seed", type=int, default=0, help="seeds the teacher, the data and the student")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny model: 1 is fastest)")
    parser.add_argument("--quick", action="store_true", help="small and short run (seconds), for tests")
    args = parser.parse_args(argv)
    if args.quick:
        args.m, args.max_steps, args.record_every, args.tol = 20, 1500, 10, 1e-3
    if args.m <= 0 or args.m % 2:
        parser.error(f"--m must be a positive even number (antisymmetric init pairs the neurons), got {args.m}")
    for name in ("n_train", "max_steps", "record_every", "threads"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if any(t <= 0 for t in args.taus) or args.tol <= 0 or args.lr_max <= 0:
        parser.error("--taus, --tol and --lr-max must be positive")
    return args


class StudentRegression(pl.LightningModule):
    """Square-loss regression of a student wrapped in ``AlphaScaled`` (α = 1: the init scale τ plays α's role).

    ``center=False``: the antisymmetric init already gives h(w0) = 0, so no frozen copy is needed.
    """

    def __init__(self, student: TwoLayerReLU, lr: float) -> None:
        super().__init__()
        self.model = AlphaScaled(student, alpha=1.0, center=False, loss="mse")
        self.lr = lr

    @property
    def student(self) -> TwoLayerReLU:
        return self.model.module

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = self.model.objective(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", self.model.objective(self(x), y), batch_size=x.shape[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class NeuronRecorder(pl.Callback):
    """Records ``|b_j| a_j`` and ``sign(b_j)`` every ``every`` steps, and stops at ``tol`` × initial loss."""

    def __init__(self, every: int, tol: float) -> None:
        self.every, self.tol = every, tol
        self.positions: list[Tensor] = []
        self.signs: list[Tensor] = []
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.initial_loss: float | None = None

    def _record(self, pl_module: StudentRegression, step: int) -> None:
        positions, signs = pl_module.student.neuron_positions()
        self.positions.append(positions.cpu())
        self.signs.append(signs.cpu())
        self.steps.append(step)

    def on_train_start(self, trainer: pl.Trainer, pl_module: StudentRegression) -> None:
        self._record(pl_module, 0)

    def on_train_batch_end(  # noqa: ANN001 - Lightning's hook signature
        self, trainer: pl.Trainer, pl_module: StudentRegression, outputs, batch, batch_idx
    ) -> None:
        loss = float(outputs["loss"])  # loss *before* this step's update
        if self.initial_loss is None:
            self.initial_loss = loss
        self.losses.append(loss)
        step = trainer.global_step
        if step % self.every == 0:
            self._record(pl_module, step)
        if not math.isfinite(loss):
            raise FloatingPointError(f"training diverged (loss {loss}) at step {step}; lower --lr-max")
        if loss < self.tol * self.initial_loss:
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: StudentRegression) -> None:
        if self.steps[-1] != trainer.global_step:
            self._record(pl_module, trainer.global_step)


def teacher_mass_fraction(positions: Tensor, signs: Tensor, teacher_dirs: Tensor, teacher_signs: Tensor,
                          degrees: float = 10.0) -> float:
    """Share of the student's total mass Σ_j |b_j|‖a_j‖ carried by neurons within ``degrees`` of a teacher
    neuron of the same sign: ≈ 1 when the features have been learned, small when neurons stayed put."""
    mass = positions.norm(dim=1)
    unit = positions / mass.clamp_min(1e-300).unsqueeze(1)
    cosines = unit @ teacher_dirs.T  # [m, n_teacher]
    same_sign = signs.unsqueeze(1) == teacher_signs.unsqueeze(0)
    near = ((cosines >= math.cos(math.radians(degrees))) & same_sign).any(dim=1)
    return float(mass[near].sum() / mass.sum())


def train_one(args: argparse.Namespace, tau: float, dm: TeacherStudentDataModule) -> dict:
    """Train the student at init scale τ; return its recorded paths and summary numbers."""
    student = TwoLayerReLU(2, args.m, tau=tau, antisymmetric=True, output_scale="1/sqrt(m)", seed=args.seed,
                           dtype=torch.float64)
    x_train, y_train = dm.train_set.tensors
    k0 = diagnostics.kappa(student, x_train, y_train)  # laziness ratio at w0: small ⇒ lazy
    lr = min(args.lr_max, 1.0 / float(k0.jacobian_norm) ** 2)
    model = StudentRegression(student, lr)
    params0 = {k: v.detach().clone() for k, v in student.named_parameters()}
    recorder = NeuronRecorder(args.record_every, args.tol)
    # Probe = the validation points, not the training points: both the network and its tangent model
    # interpolate the training set, so Δ measured there would hide how differently they generalise.
    monitor = LazyTrainingMonitor(probe=dm.val_set.tensors, every_n_epochs=1)
    callbacks: list[pl.Callback] = [recorder, monitor]
    trainer = pl.Trainer(
        max_steps=args.max_steps,
        max_epochs=-1,
        logger=TensorBoardLogger(str(args.log_dir), name=f"tau_{tau:g}", default_hp_metric=False),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, args.record_every),
        check_val_every_n_epoch=1,
        accelerator="cpu",
        precision="64-true",
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    elapsed = time.perf_counter() - start
    x_test, y_test = dm.test_set.tensors
    with torch.no_grad():
        train_loss = float(model.model.objective(model(x_train), y_train))
        test_loss = float(model.model.objective(model(x_test), y_test))
    disp = diagnostics.displacement(dict(student.named_parameters()), params0)
    positions, signs = student.neuron_positions()
    result = {
        "tau": tau,
        "lr": lr,
        "kappa0": float(k0.value),
        "steps": trainer.global_step,
        "seconds": elapsed,
        "initial_train_loss": recorder.initial_loss,
        "train_loss": train_loss,
        "test_loss": test_loss,
        "displacement": float(disp.total),
        "teacher_mass_fraction": teacher_mass_fraction(positions, signs, dm.teacher.input_weights,
                                                       dm.teacher.output_weights),
        "initial_teacher_mass_fraction": teacher_mass_fraction(recorder.positions[0], recorder.signs[0],
                                                               dm.teacher.input_weights, dm.teacher.output_weights),
        "paths": torch.stack(recorder.positions),  # [T, m, 2]
        "signs": recorder.signs[-1],
    }
    for key in ("divergence", "kappa", "activation_stability", "kernel_alignment", "tangent/val_loss"):
        result[key.replace("/", "_")] = float(trainer.callback_metrics[f"lazy/{key}"])
    # Judged from what the monitor measured (Δ, ReLU pattern, kernel), not from τ.
    result["regime"] = classify_regime(result)
    return result


def panel_title(res: dict) -> str:
    """A panel's title: τ, the regime the monitor measured (not a guess from τ), κ(w0) and what moved."""
    return (
        f"τ = {res['tau']:g} ({REGIME_LABELS.get(res['regime'], res['regime'])}): κ(w0) = {res['kappa0']:.2g}, "
        f"{res['steps']} GD steps\n"
        f"train loss {res['initial_train_loss']:.2g} → {res['train_loss']:.2g}, "
        f"‖w−w0‖/‖w0‖ = {res['displacement']:.2g}, Δ = {res['divergence']:.2g}"
    )


def plot(results: list[dict], teacher_dirs: Tensor, teacher_signs: Tensor) -> plt.Figure:
    # Constrained layout: equal-aspect panels under a two-line title keep their tick labels inside the figure
    # (tight_layout did not, with set_aspect("equal")).
    fig, axes = plt.subplots(1, len(results), figsize=(6.2 * len(results), 6.6), squeeze=False, layout="constrained")
    for ax, res in zip(axes[0], results):
        paths, signs = res["paths"], res["signs"]
        radius = 1.15 * max(1.0, float(paths.norm(dim=2).max()))
        # Teacher directions as rays from the origin (the student's |b|a lines up with them when learning).
        for direction, sign in zip(teacher_dirs, teacher_signs):
            ax.plot([0, radius * direction[0]], [0, radius * direction[1]], "--", lw=1.5,
                    color=SIGN_COLOURS[float(sign)], alpha=0.6)
            ax.plot(direction[0], direction[1], "*", ms=14, color=SIGN_COLOURS[float(sign)], mec="k")
        angle = torch.linspace(0, 2 * math.pi, 200)
        ax.plot(torch.cos(angle), torch.sin(angle), ":", color="k", lw=1)
        for j in range(paths.shape[1]):
            colour = SIGN_COLOURS.get(float(signs[j]), "gray")
            ax.plot(paths[:, j, 0], paths[:, j, 1], "-", color=colour, lw=0.8, alpha=0.8)
            ax.plot(paths[0, j, 0], paths[0, j, 1], "o", ms=4, mfc="none", color=colour, alpha=0.8)
            ax.plot(paths[-1, j, 0], paths[-1, j, 1], "o", ms=5, color=colour, mec="k", mew=0.5)
        ax.set_xlim(-radius, radius)
        ax.set_ylim(-radius, radius)
        ax.set_aspect("equal")
        ax.grid(True, alpha=0.2)
        ax.set_title(panel_title(res), fontsize=10)
    axes[0][0].plot([], [], "-", color=SIGN_COLOURS[1.0], label="b_j > 0")
    axes[0][0].plot([], [], "-", color=SIGN_COLOURS[-1.0], label="b_j < 0")
    axes[0][0].plot([], [], "o", mfc="none", color="gray", label="start")
    axes[0][0].plot([], [], "o", color="gray", mec="k", label="end")
    axes[0][0].plot([], [], "*", color="gray", mec="k", label="teacher neurons a*_k")
    axes[0][0].legend(loc="lower left", fontsize=8)
    fig.suptitle("Paths of |b_j| a_j during gradient descent (2-D teacher–student, 3 teacher neurons)")
    return fig


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Train at each τ; write the PNG, a CSV summary and TensorBoard logs; return the per-τ results."""
    args = parse_args(argv)
    quiet_third_party_output()  # Lightning's tips and internal deprecation notices: nothing to act on here
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # main() may be called in-process (tests)


def _run(args: argparse.Namespace) -> list[dict]:
    pl.seed_everything(args.seed, verbose=False)
    # Many GD steps per "epoch": less Lightning per-epoch overhead, and the monitor measures once per epoch.
    steps_per_epoch = min(1000, args.max_steps)
    dm = TeacherStudentDataModule(d=2, n_train=args.n_train, n_val=200, n_test=2000, batch_size=None,
                                  seed=args.seed, steps_per_epoch=steps_per_epoch, dtype="float64")
    dm.setup("fit")
    results = [train_one(args, tau, dm) for tau in args.taus]

    args.out_dir.mkdir(parents=True, exist_ok=True)
    fig = plot(results, dm.teacher.input_weights, dm.teacher.output_weights)
    png = args.out_dir / "two_layer_trajectories.png"
    fig.savefig(png, dpi=120, bbox_inches="tight")
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()  # HWC uint8, for TensorBoard's image tab
    plt.close(fig)
    summary_keys = [k for k in results[0] if k not in ("paths", "signs")]
    with open(args.out_dir / "two_layer_trajectories.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=summary_keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    with SummaryWriter(log_dir=str(args.log_dir / "figures")) as tb:
        tb.add_image("two_layer_trajectories", image, dataformats="HWC")
    for res in results:
        print(
            f"tau={res['tau']:g}: {res['steps']} steps in {res['seconds']:.1f}s (lr {res['lr']:.3g}), train loss "
            f"{res['initial_train_loss']:.3g} -> {res['train_loss']:.3g}, test loss {res['test_loss']:.3g}, "
            f"kappa(w0) {res['kappa0']:.3g}, displacement {res['displacement']:.3g}, "
            f"mass near teacher {res['initial_teacher_mass_fraction']:.2f} "
            f"-> {res['teacher_mass_fraction']:.2f}, divergence {res['divergence']:.3g}, "
            f"tangent model's test loss {res['tangent_val_loss']:.3g}"
        )
    print(f"figure: {png}   TensorBoard: {args.log_dir}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
