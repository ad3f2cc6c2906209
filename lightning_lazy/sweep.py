"""``lightning-lazy sweep``: one fit per alpha (and per learning rate), then a CSV, a figure and a table.

The paper's figure 3 / table 1 protocol: the same model, initialization (seed) and data trained lazily at
each alpha of a list, plus the standard and the linearized modes; every fit goes through LightningCLI with
a shipped config (or any YAML path) and the sweep's overrides. Writes ``sweep.csv`` (one row per run, with
the monitor's last ``lazy/*`` values), ``sweep.png`` (test accuracy and activation stability against alpha)
and ``table.md`` ("linear vs lazy vs deep").

A fourth mode, ``kernel``, trains nothing: it is the kernel predictor of the network at w0, the tangent
model trained to convergence (infinite time) by gradient flow on the square loss, in closed form
(:func:`kernel_predictor`). Same config, seed (so the same w0) and data as the other rows. Where the config
trains with the default SGD and schedule, the kernel run also gives the same tangent model at the *training
time* of the other rows (``kernel (t)``), so that the table separates laziness (lazy at α vs linear, both at
time t) from under-training (linear at t vs kernel at infinite time).

Several ``--seed`` values repeat every run per seed (the table gives mean ± standard deviation); ``--widths``
repeats them per width of the backbone (``--model.backbone.init_args.width``) and then finds the lazy-rich
crossover α* of each width (:func:`crossover_alpha`) and fits ``α* ∝ h^s`` (:func:`fit_power_law`), written
to ``crossover.md`` and ``crossover.png``.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_lazy.runner import make_lightning_cli, resolve_config

if TYPE_CHECKING:
    from torch import Tensor, nn
from lightning_lazy.data.cifar10 import CIFAR10NotFoundError


@dataclass
class SweepRun:
    """One row of the sweep's CSV."""

    config: str
    model: str
    mode: str
    alpha: float
    lr: float | None
    status: str = "pending"
    train_loss: float = math.nan
    train_acc: float = math.nan
    val_acc: float = math.nan
    test_loss: float = math.nan
    test_acc: float = math.nan
    activation_stability: float = math.nan
    epochs: int = 0
    seconds: float = math.nan
    error: str = ""
    extra: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    width: int | None = None  # the backbone width set by --widths (None: the config's)


# Above this alpha, float32 cannot resolve the O(1/alpha) weight changes of lazy training (eps = 6e-8).
LARGE_ALPHA = 1e4
MODES = ("lazy", "standard", "linearized", "kernel")
# The kernel row's empirical NTK: per-example Jacobians contracted ("jacobian"), with room for all of them.
# On the MNIST-1D CNN (5 210 parameters, 1 000 x 1 000 inputs, one thread) it took 10.3 s against 23.7 s for
# "structured"; for wide CNNs (millions of parameters) --kernel_implementation structured is the one to use.
KERNEL_MEMORY_BUDGET = 1 << 29  # tensor elements: 2 GiB in float32
CSV_FIELDS = ["config", "model", "width", "seed", "mode", "alpha", "lr", "status", "train_loss", "train_acc", "val_acc", "test_loss",
              "test_acc", "activation_stability", "epochs", "seconds", "error"]


def _sweep_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-lazy sweep",
        allow_abbrev=False,  # unknown options go to LightningCLI whole, never matched to a prefix here
        description=(
            "Fit one model per alpha (lazy mode), plus the standard and linearized modes, with the same "
            "initialization (seed) and data; then write sweep.csv, sweep.png (test accuracy and activation "
            "stability against alpha, the paper's figure) and table.md (linear vs lazy vs deep). Options not "
            "listed here are handed to every fit as LightningCLI options, e.g. --trainer.max_epochs 100."
        ),
    )
    parser.add_argument("--config", "-c", nargs="+", required=True,
                        help="shipped config name(s) or YAML path(s); one model per config (its mode is overridden)")
    parser.add_argument("--alphas", nargs="+", type=float, default=[1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7],
                        help="alpha values of the lazy runs (default: 1 ... 1e7, decades)")
    parser.add_argument("--modes", nargs="+", choices=list(MODES),
                        default=["lazy", "standard", "linearized"],
                        help="which modes to run (lazy = once per alpha; the others once). kernel: no training, the "
                             "kernel predictor of the network at w0 (the linearized model trained to convergence by "
                             "gradient flow on the square loss, in closed form), with the empirical NTK")
    parser.add_argument("--kernel_train_size", type=int, default=None,
                        help="kernel mode: fit the kernel predictor on this many training examples (a seeded random "
                             "subset); default: the whole training set (N x N kernel, N^2 memory and time)")
    parser.add_argument("--kernel_diag_reg", type=float, default=0.0,
                        help="kernel mode: ridge added to the kernel, relative to its mean diagonal (default 0: the "
                             "gradient-flow limit itself)")
    parser.add_argument("--kernel_implementation", default="jacobian",
                        choices=["auto", "structured", "jacobian", "products"],
                        help="kernel mode: diagnostics.empirical_ntk's implementation (default jacobian: fastest for "
                             "small CNNs such as MNIST-1D's; structured for wide ones)")
    parser.add_argument("--lrs", nargs="+", type=float, default=None,
                        help="grid of initial learning rates; the best by validation accuracy is reported per point "
                             "(default: the config's model.lr)")
    parser.add_argument("--output", "-o", default="sweep", help="output folder (default: ./sweep)")
    parser.add_argument("--seed", type=int, nargs="+", default=[0],
                        help="seed(s) of the runs: same w0 and batches for all alphas; several seeds repeat every run "
                             "per seed and the table gives mean ± standard deviation (default 0)")
    parser.add_argument("--widths", type=int, nargs="+", default=None,
                        help="repeat every run per backbone width (--model.backbone.init_args.width W), then find the "
                             "lazy-rich crossover alpha* of each width and fit alpha* ~ h^s: crossover.md, "
                             "crossover.png (default: the config's width only)")
    parser.add_argument("--probe_size", type=int, default=500,
                        help="test images on which activation stability is measured (default 500)")
    parser.add_argument("--keep_checkpoints", action="store_true", help="keep Lightning's checkpoints (large)")
    return parser


def _model_name(model: Any) -> str:
    backbone = model.backbone
    width = getattr(backbone, "width", None)
    return f"{type(backbone).__name__} x{width}" if width is not None else type(backbone).__name__


def _scalar(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _probe_batch(datamodule: Any, size: int) -> Any:
    """The first ``size`` test images, as the model sees them (normalized, no augmentation)."""
    import torch

    chunks, total = [], 0
    for batch in datamodule.test_dataloader():
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        chunks.append(x)
        total += x.shape[0]
        if total >= size:
            break
    return torch.cat(chunks)[:size]


def _activation_stability(model: Any, params0: dict | None, datamodule: Any, size: int, device: Any) -> float:
    """Share of the backbone's ReLU units whose on/off state on test images equals the one at w0."""
    from lightning_lazy.diagnostics import activation_stability, activation_states

    if model.mode == "linearized":
        # The tangent model's ReLU pattern is that of w0 by construction (J(w0) is fixed): 100 %.
        return 1.0
    backbone = model.backbone
    was = next(backbone.parameters()).device
    backbone.to(device)
    try:
        dtype = next(backbone.parameters()).dtype
        x = _probe_batch(datamodule, size).to(device=device, dtype=dtype)
        params = {k: v.detach() for k, v in backbone.named_parameters()}
        params0 = {k: v.to(device=device, dtype=dtype) for k, v in params0.items()}
        states0 = activation_states(backbone, x, params0)
        if not states0:  # e.g. logistic regression, a GRU: no unit has pieces to switch between
            print(f"[sweep] stable activations not measured: {type(backbone).__name__} applies no piecewise-linear "
                  "activation (ReLU, ...)", file=sys.stderr, flush=True)
            return math.nan
        return float(activation_stability(backbone, x, params, initial_states=states0))
    finally:
        backbone.to(was)


def _width_args(run: SweepRun) -> list[str]:
    return [] if run.width is None else [f"--model.backbone.init_args.width={run.width}"]


def _fit_one(run: SweepRun, config_path: str, overrides: list[str], args: argparse.Namespace, run_dir: Path) -> None:
    import torch
    import yaml

    cli_args = ["--config", config_path, *overrides, *_width_args(run), f"--model.mode={run.mode}",
                f"--model.alpha={run.alpha!r}", f"--seed_everything={run.seed}", f"--trainer.default_root_dir={run_dir}"]
    if run.lr is not None:
        cli_args.append(f"--model.lr={run.lr!r}")
    if not args.keep_checkpoints:
        cli_args.append("--trainer.enable_checkpointing=false")
    logger = (yaml.safe_load(Path(config_path).read_text()) or {}).get("trainer", {}).get("logger")
    if isinstance(logger, dict) and "init_args" in logger and "save_dir" in logger["init_args"]:
        # One logger folder per run, next to the sweep's outputs.
        cli_args += [f"--trainer.logger.init_args.save_dir={run_dir.parent.parent / 'logs'}",
                     f"--trainer.logger.init_args.name={run.config}",
                     f"--trainer.logger.init_args.version={run_dir.name}"]
    cli = make_lightning_cli(cli_args, run=False)
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    if run.mode == "lazy" and run.alpha > LARGE_ALPHA and not str(trainer.precision).startswith("64"):
        print(f"[sweep] warning: alpha={run.alpha:g} in precision {trainer.precision}: weights move by O(1/alpha), "
              "below float32 resolution; add --trainer.precision 64-true", file=sys.stderr, flush=True)
    run.model = _model_name(model)
    run.lr = _scalar(model.hparams.lr) if run.lr is None else run.lr
    params0 = model.initial_params()
    if params0 is None:  # standard mode keeps no copy of w0: take one before training
        params0 = {k: v.detach().clone() for k, v in model.backbone.named_parameters()}
    trainer.fit(model, datamodule=datamodule)
    fitted = {k: _scalar(v) for k, v in trainer.callback_metrics.items()}
    run.epochs = trainer.current_epoch
    run.train_loss = fitted.get("train/loss_epoch", math.nan)
    run.train_acc = fitted.get("train/acc", math.nan)
    run.val_acc = fitted.get("val/acc", math.nan)
    run.extra = {k: v for k, v in fitted.items() if k.startswith("lazy/")}
    if not math.isfinite(run.train_loss):
        raise FloatingPointError(f"training loss is {run.train_loss} at the end: the run diverged; lower the lr")
    tested = trainer.test(model, datamodule=datamodule, verbose=False)
    run.test_loss = _scalar(tested[0].get("test/loss")) if tested else math.nan
    run.test_acc = _scalar(tested[0].get("test/acc")) if tested else math.nan
    device = trainer.strategy.root_device
    with torch.no_grad():
        run.activation_stability = _activation_stability(model, params0, datamodule, args.probe_size, device)


def _collect(loader: Any, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """``(x, y)`` of the first ``limit`` examples a loader yields (all of them when ``limit`` is None)."""
    import torch

    xs, ys, total = [], [], 0
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError(f"kernel mode needs batches (inputs, labels), got {type(batch).__name__}")
        xs.append(batch[0])
        ys.append(batch[1])
        total += batch[0].shape[0]
        if limit is not None and total >= limit:
            break
    return torch.cat(xs)[:limit], torch.cat(ys)[:limit]


def kernel_predictor(
    network: nn.Module,
    x_train: Tensor,
    y_train: Tensor,
    inputs: dict[str, Tensor],
    num_classes: int,
    *,
    diag_reg: float = 0.0,
    implementation: str = "jacobian",
    at_time: float | None = None,
) -> tuple[dict[str, Tensor], dict[str, float]]:
    r"""Outputs of the kernel predictor of ``network`` at its current weights w0, on each input set.

    The centred tangent model ``h̄(x; w) = Df(x; w0)(w − w0)`` (the ``linearized`` mode, ``h̄(w0) = 0``),
    trained by gradient flow on the square loss to infinite time, predicts (Lee et al. 2019, eq. 10; the
    paper's "linearized" limit α → ∞ run to convergence)::

        h̄_∞(x) = Θ(x, X) Θ(X, X)⁻¹ Y

    with ``Y = onehot(y_train)`` ``[N, K]`` and ``Θ`` the output-traced empirical NTK
    ``Σ_k ⟨∂f_k(x)/∂w, ∂f_k(x')/∂w⟩`` at w0 (:func:`~lightning_lazy.diagnostics.empirical_ntk` with
    ``trace=True``), used alike for every output (``Θ ⊗ I_K``). The full ``[N·K, N·K]`` NTK would give the
    exact limit of the finite network's tangent model; its off-diagonal output blocks are dropped here (as
    neural-tangents does with ``trace_axes``), which keeps the kernel ``N × N``. ``diag_reg`` adds
    ``diag_reg · mean(diag Θ) · I`` to ``Θ(X, X)`` (0: the gradient-flow limit itself). The linear solve is done
    in float64 (:func:`~lightning_lazy.diagnostics.gradient_descent_mse`, ``t=None``).

    Args:
        network: the network f at w0 (evaluated in eval mode; not changed).
        x_train, y_train: training inputs ``[N, ...]`` and integer labels ``[N]``.
        inputs: ``{name: x [M, ...]}`` sets to predict on (e.g. train, val, test).
        num_classes: K.
        implementation: the NTK implementation (``"auto"``, ``"structured"``, ``"jacobian"``, ``"products"``).
        at_time: also predict at this finite gradient-flow time τ
            (:func:`~lightning_lazy.diagnostics.gradient_descent_mse`'s convention with the traced Θ:
            ``f_t(X) = Y + e^{−Θτ/(NK)}(f_0(X) − Y)``); the outputs come as ``"{name}@t"``. :func:`training_time` gives the τ that an SGD run of the package reaches.

    Returns ``({name: outputs [M, K] float64}, info)`` with ``info`` = ``train_size``, ``min_eigenvalue`` and
    ``max_eigenvalue`` of ``Θ(X, X)`` (its conditioning), ``ntk_seconds`` and ``solve_seconds``.
    """
    import torch

    from lightning_lazy import diagnostics

    if x_train.shape[0] != y_train.shape[0]:
        raise ValueError(f"{x_train.shape[0]} training inputs but {y_train.shape[0]} labels")
    targets = torch.nn.functional.one_hot(y_train.long(), num_classes).to(torch.float64)
    start = time.perf_counter()

    def ntk(x1: Tensor, x2: Tensor | None) -> Tensor:
        return diagnostics.empirical_ntk(network, x1, x2, trace=True, implementation=implementation,
                                         memory_budget=KERNEL_MEMORY_BUDGET).to(torch.float64)

    k_train = ntk(x_train, None)
    # The training inputs themselves (the same tensor) reuse Θ(X, X): their outputs show how well it is solved.
    k_inputs = {name: k_train if x is x_train else ntk(x, x_train) for name, x in inputs.items()}
    ntk_seconds = time.perf_counter() - start
    start = time.perf_counter()
    predict = diagnostics.gradient_descent_mse(k_train, targets, diag_reg=diag_reg)
    outputs = {}
    for name, k in k_inputs.items():
        # Centred model: h̄(w0) = 0 on every input, so the outputs at w0 are zeros.
        zeros = torch.zeros(k.shape[0], num_classes, dtype=torch.float64)
        outputs[name] = predict(None, fx_train_0=None, fx_test_0=zeros, k_test_train=k)
        if at_time is not None:
            outputs[f"{name}@t"] = predict(at_time, fx_train_0=None, fx_test_0=zeros, k_test_train=k)
    eigenvalues = torch.linalg.eigvalsh(k_train)
    info = {"train_size": float(x_train.shape[0]), "min_eigenvalue": float(eigenvalues[0]),
            "max_eigenvalue": float(eigenvalues[-1]), "ntk_seconds": ntk_seconds,
            "solve_seconds": time.perf_counter() - start}
    return outputs, info


def training_time(lr: float, lr_decay: float, momentum: float, steps_per_epoch: int, steps: int) -> float:
    r"""The gradient-flow time τ that ``steps`` SGD steps of :class:`~lightning_lazy.module.LazyClassifier` reach.

    The default optimizer (SGD, momentum μ) and schedule ``η_e = η0 / (1 + β e)`` (epoch e) on the square loss
    R = ½ mean over the N examples of ‖f − y‖² move the tangent model, on average over batches and to first
    order in η, as gradient flow ``df/ds = −Θ_b (f − Y)/N`` run for ``s = Σ_k η_k / (1 − μ)`` (heavy-ball's
    effective step is η/(1 − μ)), Θ_b the per-output block of the NTK. :func:`kernel_predictor` uses the
    output-traced kernel ``Θ = Σ_k Θ_kk ≈ K Θ_b`` in :func:`~lightning_lazy.diagnostics.gradient_descent_mse`,
    whose exponent is ``Θ τ / (N K)``: the same flow at ``τ = s``. Under the lazy objective R(αh)/α² this time
    is the same for every α: it measures the rows of a sweep alike.

    Raises ``ValueError`` for ``steps_per_epoch < 1`` or ``steps < 0``.
    """
    if steps_per_epoch < 1 or steps < 0:
        raise ValueError(f"need steps_per_epoch >= 1 and steps >= 0, got {steps_per_epoch} and {steps}")
    total = sum(lr / (1.0 + lr_decay * (k // steps_per_epoch)) for k in range(steps))
    return total / (1.0 - momentum)


def _run_time(cli: Any, datamodule: Any) -> float | None:
    """:func:`training_time` of the config's training run, or None (with a note) where it does not apply."""
    model, trainer = cli.model, cli.trainer
    if model._optimizer_factory is not None or model._scheduler_factory is not None or model.hparams.loss != "mse":
        print("[sweep] kernel (t) skipped: the training time is defined for the default SGD, schedule and square "
              "loss only", file=sys.stderr, flush=True)
        return None
    steps_per_epoch = len(datamodule.train_dataloader())
    epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None
    limits = [n for n in (trainer.max_steps if trainer.max_steps >= 0 else None,
                          None if epochs is None else epochs * steps_per_epoch) if n is not None]
    if not limits:
        print("[sweep] kernel (t) skipped: the config sets neither max_epochs nor max_steps", file=sys.stderr,
              flush=True)
        return None
    hp = model.hparams
    return training_time(hp.lr, hp.lr_decay, hp.momentum, steps_per_epoch, min(limits))


def _kernel_one(run: SweepRun, config_path: str, overrides: list[str], args: argparse.Namespace) -> None:
    """The ``kernel`` row: the network at w0 of the config (same seed: same w0) and its kernel predictor."""
    import torch

    cli_args = ["--config", config_path, *overrides, *_width_args(run), "--model.mode=standard",
                f"--seed_everything={run.seed}"]
    cli = make_lightning_cli(cli_args, run=False)
    model, datamodule = cli.model, cli.datamodule
    run.model = _model_name(model)
    run.lr = math.nan  # nothing is trained
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.setup("test")
    # The training set as the first epoch's loader yields it: shuffled by the seeded global generator, so a
    # --kernel_train_size subset is a seeded random one (for augmented data, one augmentation per example).
    x_train, y_train = _collect(datamodule.train_dataloader(), args.kernel_train_size)
    evaluated = {"val": _collect(datamodule.val_dataloader()), "test": _collect(datamodule.test_dataloader())}
    network = model.backbone
    dtype = next(network.parameters()).dtype
    if str(cli.trainer.precision).startswith("64"):
        network = network.double()
        dtype = torch.float64
    inputs = {"train": x_train, **{k: x for k, (x, _) in evaluated.items()}}
    inputs = {k: x.to(dtype) for k, x in inputs.items()}
    time_t = _run_time(cli, datamodule) if args.lrs is None else None  # an lr grid: no single training time
    outputs, info = kernel_predictor(network, inputs["train"], y_train, inputs, model.num_classes,
                                     diag_reg=args.kernel_diag_reg,
                                     implementation=args.kernel_implementation, at_time=time_t)
    labels = {"train": y_train, **{k: y for k, (_, y) in evaluated.items()}}
    labels.update({f"{k}@t": y for k, y in list(labels.items())})
    accuracy = {k: float((outputs[k].argmax(dim=1) == labels[k]).to(torch.float64).mean()) for k in outputs}
    run.train_acc, run.val_acc, run.test_acc = accuracy["train"], accuracy["val"], accuracy["test"]
    run.train_loss = float(model.risk(outputs["train"], labels["train"]))
    run.test_loss = float(model.risk(outputs["test"], labels["test"]))
    if not math.isfinite(run.test_loss):
        raise FloatingPointError("the kernel predictor's outputs are not finite: the kernel is singular; add "
                                 "--kernel_diag_reg 1e-6")
    # The kernel predictor is the network's tangent model at w0: its ReLU pattern is that of w0.
    run.activation_stability = 1.0
    run.extra = {f"kernel/{k}": v for k, v in info.items()}
    if time_t is not None:
        run.extra.update({"kernel/time": time_t, "kernel/t/train_acc": accuracy["train@t"],
                          "kernel/t/test_acc": accuracy["test@t"],
                          "kernel/t/train_loss": float(model.risk(outputs["train@t"], labels["train"])),
                          "kernel/t/test_loss": float(model.risk(outputs["test@t"], labels["test"]))})


def _run_label(run: SweepRun) -> str:
    label = f"{run.config}-{run.mode}"
    if run.width is not None:
        label += f"-w{run.width}"
    if run.mode == "lazy":
        label += f"-alpha{run.alpha:g}"
    if run.lr is not None and math.isfinite(run.lr):
        label += f"-lr{run.lr:g}"
    label += f"-seed{run.seed}"
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", label)


def _block(run: SweepRun) -> str:
    """The table block a run belongs to: its config, and its width when the sweep sets one."""
    return run.config if run.width is None else f"{run.config} h={run.width}"


def _best(runs: list[SweepRun]) -> SweepRun | None:
    """The run of a (config, mode, alpha, seed) point with the best validation accuracy (the lr grid's choice)."""
    ok = [r for r in runs if r.status == "ok"]
    if not ok:
        return None
    return max(ok, key=lambda r: (r.val_acc if math.isfinite(r.val_acc) else -1.0, r.train_acc))


def _points(runs: list[SweepRun]) -> dict[tuple[str, str, float], list[SweepRun]]:
    """``{(block, mode, alpha): [best run of each seed]}``; alpha is 0 for the modes without one."""
    groups: dict[tuple[str, str, float, int], list[SweepRun]] = {}
    for r in runs:
        groups.setdefault((_block(r), r.mode, r.alpha if r.mode == "lazy" else 0.0, r.seed), []).append(r)
    points: dict[tuple[str, str, float], list[SweepRun]] = {}
    for (block, mode, alpha, _), group in groups.items():
        best = _best(group)
        if best is not None:
            points.setdefault((block, mode, alpha), []).append(best)
    return points


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _sd(values: list[float]) -> float:
    """Sample standard deviation (n − 1) of the finite values; NaN for fewer than two."""
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < 2:
        return math.nan
    m = sum(finite) / len(finite)
    return math.sqrt(sum((v - m) ** 2 for v in finite) / (len(finite) - 1))


def write_csv(runs: list[SweepRun], path: Path) -> None:
    """One row per run: the fields of ``CSV_FIELDS``, then every ``lazy/*`` value the monitor logged last."""
    extra_keys = sorted({k for r in runs for k in r.extra})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS + extra_keys)
        writer.writeheader()
        for r in runs:
            row = {k: v for k, v in asdict(r).items() if k in CSV_FIELDS}
            row.update(r.extra)
            writer.writerow(row)


def write_figure(runs: list[SweepRun], path: Path) -> None:
    """Test accuracy and activation stability against α (log scale), one line per model (mean over seeds)."""
    from matplotlib.figure import Figure  # a Figure object, not pyplot: no global backend or figure state

    points = _points(runs)
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_acc, ax_stab = fig.subplots(1, 2)
    for block in dict.fromkeys(_block(r) for r in runs):
        lazy = sorted(((a, p) for (b, m, a), p in points.items() if b == block and m == "lazy"), key=lambda t: t[0])
        label = next((p[0].model for (b, _, _), p in points.items() if b == block), block)
        if lazy:
            alphas = [a for a, _ in lazy]
            line = ax_acc.plot(alphas, [100 * _mean([r.test_acc for r in p]) for _, p in lazy], "o-", label=label)[0]
            ax_stab.plot(alphas, [100 * _mean([r.activation_stability for r in p]) for _, p in lazy], "o-",
                         label=label, color=line.get_color())
        for mode, style in (("standard", "--"), ("linearized", ":"), ("kernel", "-.")):
            point = points.get((block, mode, 0.0))
            if point is not None:
                acc = 100 * _mean([r.test_acc for r in point])
                ax_acc.axhline(acc, linestyle=style, color="gray", label=f"{label} {mode} ({acc:.1f} %)")
    for ax, title in ((ax_acc, "test accuracy (%)"), (ax_stab, "stable ReLU activations (%)")):
        ax.set_xscale("log")
        ax.set_xlabel(r"scale $\alpha$")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # e.g. a kernel-only sweep draws no stability curve
            ax.legend(fontsize=7)
    fig.suptitle("Lazy training: accuracy and activation stability against the scale alpha")
    fig.savefig(path, dpi=120)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}" if math.isfinite(value) else "n/a"


def _pct_of(values: list[float]) -> str:
    """``mean`` in percent, with ``± sd`` over seeds when there are several."""
    sd = _sd(values)
    return _pct(_mean(values)) + (f" ± {100 * sd:.1f}" if math.isfinite(sd) else "")


def _extra(runs: list[SweepRun], key: str) -> str:
    value = _mean([r.extra.get(key, math.nan) for r in runs])
    return f"{value:.3g}" if math.isfinite(value) else "n/a"


def write_table(runs: list[SweepRun], path: Path) -> None:
    """Markdown: linear vs lazy vs deep (and kernel) per model, then every run.

    Per model: *deep* (standard training), *lazy* at each alpha, *linear* (the tangent model, alpha -> infinity),
    *kernel (t)* (the tangent model's kernel predictor at the training time of the other rows, where the config
    defines it) and *kernel* (trained to convergence): train and test accuracy, the share of stable ReLU units,
    the monitor's last divergence Δ between the run and its tangent twin and NTK distance ‖K_t − K_0‖/‖K_0‖ (the
    laziness it measured), and the run's wall time. With several seeds: mean ± sample standard deviation.
    """
    points = _points(runs)
    seeds = sorted({r.seed for r in runs})
    lines = ["# Linear vs lazy vs deep", "",
             ("Train and test accuracy (%) per model: *deep* = standard training, *lazy* = alpha-scaled training "
              "at each alpha of the sweep, *linear* = the exact tangent model (alpha -> infinity), *kernel (t)* = "
              "the tangent model's kernel predictor at the training time t of the other rows (gradient flow, "
              "closed form), *kernel* = the same at infinite time (no training). Delta = the monitor's last "
              "divergence between the run and its tangent twin, NTK distance = |K_t - K_0| / |K_0| (n/a: not "
              "measured). Where a learning-rate grid was run, each point uses the lr with the best validation "
              "accuracy."
              + (f" Mean ± sample standard deviation over seeds {', '.join(map(str, seeds))}." if len(seeds) > 1
                 else "")), "",
             ("| model | mode | alpha | lr | train acc | test acc | stable activations | Delta | NTK distance "
              "| seconds |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    times = []
    for block in dict.fromkeys(_block(r) for r in runs):
        rows = []
        mine = {(m, a): p for (b, m, a), p in points.items() if b == block}
        if ("standard", 0.0) in mine:
            rows.append(("deep", mine["standard", 0.0], "1"))
        for (mode, alpha), p in sorted(mine.items(), key=lambda item: item[0][1]):
            if mode == "lazy":
                rows.append(("lazy", p, f"{alpha:g}"))
        if ("linearized", 0.0) in mine:
            rows.append(("linear", mine["linearized", 0.0], "inf"))
        if ("kernel", 0.0) in mine:
            kernel = mine["kernel", 0.0]
            if all("kernel/t/test_acc" in r.extra for r in kernel):
                times.append(kernel[0].extra["kernel/time"])
                rows.append(("kernel (t)", kernel, "inf"))
            rows.append(("kernel", kernel, "inf"))
        for name, p, alpha in rows:
            lr = p[0].lr
            lr_text = f"{lr:g}" if lr is not None and math.isfinite(lr) else "-"
            if name == "kernel (t)":
                train, test = [r.extra["kernel/t/train_acc"] for r in p], [r.extra["kernel/t/test_acc"] for r in p]
            else:
                train, test = [r.train_acc for r in p], [r.test_acc for r in p]
            lines.append(f"| {p[0].model} | {name} | {alpha} | {lr_text} | {_pct_of(train)} | {_pct_of(test)} "
                         f"| {_pct_of([r.activation_stability for r in p])} | {_extra(p, 'lazy/divergence')} "
                         f"| {_extra(p, 'lazy/ntk_distance')} | {_mean([r.seconds for r in p]):.0f} |")
    if times:
        lines += ["", (f"Training time t of the trained rows (same for every alpha): t = sum_k lr_k / (1 - momentum) "
                       f"= {times[0]:.4g} over their SGD steps (lightning_lazy.sweep.training_time); "
                       "the kernel (t) row is the tangent model at that time.")]
    lines += ["", "## Every run", "", "| config | width | seed | mode | alpha | lr | status | train acc | val acc "
              "| test acc | stable activations | epochs | seconds |", "| --- | --- | --- | --- | --- | --- | --- | --- "
              "| --- | --- | --- | --- | --- |"]
    for r in runs:
        lr = "config" if r.lr is None else f"{r.lr:g}" if math.isfinite(r.lr) else "-"
        status = r.status if r.status == "ok" else f"{r.status}: {r.error[:80]}"
        width = "config" if r.width is None else str(r.width)
        lines.append(f"| {r.config} | {width} | {r.seed} | {r.mode} | {r.alpha:g} | {lr} | {status} "
                     f"| {_pct(r.train_acc)} | {_pct(r.val_acc)} | {_pct(r.test_acc)} | {_pct(r.activation_stability)} "
                     f"| {r.epochs} | {r.seconds:.1f} |")
    path.write_text("\n".join(lines) + "\n")


def crossover_alpha(alphas: Sequence[float], accuracies: Sequence[float], rich: float, lazy: float) -> float:
    r"""α* of one width: where test accuracy against α crosses the midpoint of its rich and lazy plateaus.

    ``rich`` is the standard run's test accuracy (α = 1, no centring), ``lazy`` the linearized run's (the α → ∞
    plateau, at the same training time); the midpoint is ``m = (rich + lazy)/2``. Going up the sorted
    ``alphas``, α* is the first crossing of m by the lazy runs' accuracy, interpolated linearly in log α
    between the two α that bracket it (an α whose accuracy equals m exactly is α*). Returns NaN when the curve
    does not cross m inside the grid (all on one side), or when the plateaus are within 1e-9 of each other
    (no crossover to find). Shapes: ``alphas`` and ``accuracies`` of equal length, accuracies in [0, 1].
    """
    if len(alphas) != len(accuracies):
        raise ValueError(f"{len(alphas)} alphas but {len(accuracies)} accuracies")
    if not (math.isfinite(rich) and math.isfinite(lazy)) or abs(rich - lazy) < 1e-9:
        return math.nan
    mid = (rich + lazy) / 2
    pairs = sorted((a, acc) for a, acc in zip(alphas, accuracies) if math.isfinite(acc) and a > 0)
    # Sign of (accuracy - m) relative to the rich side: positive = still on the rich side of the midpoint.
    side = [(acc - mid) * (1 if rich > lazy else -1) for _, acc in pairs]
    for (a0, _), (a1, _), s0, s1 in zip(pairs, pairs[1:], side, side[1:]):
        if s0 == 0:
            return a0
        if s0 > 0 > s1 or s1 == 0:
            if s1 == 0:
                return a1
            fraction = s0 / (s0 - s1)
            return math.exp(math.log(a0) + fraction * (math.log(a1) - math.log(a0)))
    return math.nan


def fit_power_law(widths: Sequence[float], values: Sequence[float]) -> tuple[float, float, float]:
    r"""Least-squares fit of ``log v = c + s · log h``: ``(s, standard error of s, exp(c))``.

    The standard error is the usual one of an ordinary least-squares slope, ``sqrt(Σ r² / (n − 2) / Σ (x − x̄)²)``
    with residuals r and ``x = log h``; NaN with only two points. Non-finite or non-positive values are left
    out. Raises ``ValueError`` with fewer than two usable points.
    """
    pts = [(math.log(h), math.log(v)) for h, v in zip(widths, values) if h > 0 and math.isfinite(v) and v > 0]
    if len(pts) < 2 or len({x for x, _ in pts}) < 2:
        raise ValueError(f"a power-law fit needs at least two distinct widths with a finite alpha*, got {len(pts)}")
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx
    intercept = my - slope * mx
    if n < 3:
        return slope, math.nan, math.exp(intercept)
    residuals = sum((y - intercept - slope * x) ** 2 for x, y in pts)
    return slope, math.sqrt(residuals / (n - 2) / sxx), math.exp(intercept)


def write_crossover(runs: list[SweepRun], folder: Path) -> dict[str, Any]:
    """α* per width (:func:`crossover_alpha`, means over seeds) and the fit α* ∝ h^s: ``crossover.md``, ``.png``.

    One line per config. Widths whose lazy curve does not cross the midpoint inside the α grid are listed
    with α* = n/a and left out of the fit. Returns ``{config: {"widths", "alpha_star", "slope", "slope_se"}}``.
    """
    from matplotlib.figure import Figure

    points = _points(runs)
    results: dict[str, Any] = {}
    lines = ["# Lazy-rich crossover against width", "",
             ("alpha* = the alpha at which the lazy runs' test accuracy crosses the midpoint between the standard "
              "run's (rich plateau) and the linearized run's (lazy plateau), interpolated in log alpha; fit "
              "log alpha* = c + s log h by least squares (s +- its standard error)."), "",
             "| config | width h | rich test acc | lazy test acc | alpha* |", "| --- | --- | --- | --- | --- |"]
    for config in dict.fromkeys(r.config for r in runs):
        widths = sorted({r.width for r in runs if r.config == config and r.width is not None})
        stars = []
        for h in widths:
            block = f"{config} h={h}"
            rich = _mean([r.test_acc for r in points.get((block, "standard", 0.0), [])])
            lazy = _mean([r.test_acc for r in points.get((block, "linearized", 0.0), [])])
            curve = sorted((a, _mean([r.test_acc for r in p])) for (b, m, a), p in points.items()
                           if b == block and m == "lazy")
            star = crossover_alpha([a for a, _ in curve], [acc for _, acc in curve], rich, lazy)
            stars.append(star)
            lines.append(f"| {config} | {h} | {_pct(rich)} | {_pct(lazy)} | "
                         f"{f'{star:.3g}' if math.isfinite(star) else 'n/a'} |")
        try:
            slope, se, scale = fit_power_law(widths, stars)
        except ValueError as err:
            slope, se, scale = math.nan, math.nan, math.nan
            lines.append(f"\n{config}: no fit ({err})\n")
        results[config] = {"widths": widths, "alpha_star": stars, "slope": slope, "slope_se": se, "scale": scale}
    lines.append("")
    for config, res in results.items():
        if math.isfinite(res["slope"]):
            lines.append(f"{config}: alpha* ~ {res['scale']:.3g} h^s with s = {res['slope']:.3f} +- "
                         f"{res['slope_se']:.3f} (standard error) over {sum(map(math.isfinite, res['alpha_star']))} "
                         "widths; Geiger et al. (2020) predict s = -1/2 in their parametrization.")
    (folder / "crossover.md").write_text("\n".join(lines) + "\n")
    fig = Figure(figsize=(5, 4), layout="constrained")
    ax = fig.subplots()
    for config, res in results.items():
        finite = [(h, a) for h, a in zip(res["widths"], res["alpha_star"]) if math.isfinite(a)]
        if not finite:
            continue
        line = ax.plot([h for h, _ in finite], [a for _, a in finite], "o", label=config)[0]
        if math.isfinite(res["slope"]):
            hs = [min(h for h, _ in finite), max(h for h, _ in finite)]
            se = f" ± {res['slope_se']:.2f}" if math.isfinite(res["slope_se"]) else ""
            ax.plot(hs, [res["scale"] * h ** res["slope"] for h in hs], "-", color=line.get_color(),
                    label=f"fit: slope {res['slope']:.2f}{se}")
    if finite_any := [a for res in results.values() for a in res["alpha_star"] if math.isfinite(a)]:
        hs = sorted({h for res in results.values() for h in res["widths"]})
        ref = finite_any[0] * (hs[0] ** 0.5)
        ax.plot(hs, [ref * h ** -0.5 for h in hs], ":", color="gray", label="slope -1/2 (Geiger et al.)")
    ax.set_xscale("log", base=2)  # widths are usually powers of two: one labelled tick per width
    ax.set_yscale("log")
    ax.set_xlabel("width h")
    ax.set_ylabel(r"crossover $\alpha^*$")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.savefig(folder / "crossover.png", dpi=120)
    return results


def run_sweep(argv: Sequence[str]) -> int:
    """``lightning-lazy sweep``: see :func:`_sweep_parser`. Returns 0 if every run succeeded, else 1."""
    parser = _sweep_parser()
    args, overrides = parser.parse_known_args(list(argv))
    if any(a <= 0 or not math.isfinite(a) for a in args.alphas):
        parser.error(f"--alphas must be positive finite numbers, got {args.alphas}")
    if args.lrs is not None and any(lr <= 0 for lr in args.lrs):
        parser.error(f"--lrs must be positive, got {args.lrs}")
    if args.probe_size < 1:
        parser.error("--probe_size must be at least 1")
    if args.kernel_train_size is not None and args.kernel_train_size < 1:
        parser.error(f"--kernel_train_size must be a positive number of examples, got {args.kernel_train_size}")
    if not (args.kernel_diag_reg >= 0 and math.isfinite(args.kernel_diag_reg)):
        parser.error(f"--kernel_diag_reg must be a non-negative number, got {args.kernel_diag_reg}")
    bad = [o for o in overrides if o.startswith("--model.mode") or o.startswith("--model.alpha")]
    if bad:
        parser.error(f"{bad[0]} is set by the sweep itself: use --modes and --alphas")
    if args.widths is not None:
        if any(w < 1 for w in args.widths):
            parser.error(f"--widths must be positive integers, got {args.widths}")
        bad = [o for o in overrides if o.startswith("--model.backbone.init_args.width")]
        if bad:
            parser.error(f"{bad[0]} is set by the sweep itself with --widths")
    if len(set(args.seed)) != len(args.seed):
        parser.error(f"--seed values must differ, got {args.seed}")
    configs = [(Path(c).stem if Path(c).expanduser().is_file() else c.removesuffix(".yaml"), resolve_config(c))
               for c in args.config]
    out = Path(args.output)
    plan: list[SweepRun] = []
    for name, _ in configs:
        for width in args.widths or [None]:
            for seed in args.seed:
                for mode in args.modes:
                    for alpha in (sorted(args.alphas) if mode == "lazy" else [1.0]):
                        for lr in (args.lrs or [None]) if mode != "kernel" else [None]:  # the kernel row trains nothing
                            plan.append(SweepRun(config=name, model=name, mode=mode, alpha=alpha, lr=lr, seed=seed,
                                                 width=width))
    paths = dict(configs)
    n = len(plan)
    print(f"[sweep] {n} runs -> {out.resolve()}", flush=True)
    for i, run in enumerate(plan, 1):
        print(f"[sweep] run {i}/{n}: {run.config}" + (f" width={run.width}" if run.width is not None else "")
              + (f" seed={run.seed}" if len(args.seed) > 1 else "") + f" mode={run.mode}"
              + (f" alpha={run.alpha:g}" if run.mode == "lazy" else "")
              + (f" lr={run.lr:g}" if run.lr is not None else ""), flush=True)
        start = time.perf_counter()
        try:
            if run.mode == "kernel":
                _kernel_one(run, paths[run.config], overrides, args)
            else:
                _fit_one(run, paths[run.config], overrides, args, out / "runs" / _run_label(run))
            run.status = "ok"
            print(f"[sweep] run {i}/{n} done in {time.perf_counter() - start:.1f} s: train acc "
                  f"{_pct(run.train_acc)} %, test acc {_pct(run.test_acc)} %, stable activations "
                  f"{_pct(run.activation_stability)} %", flush=True)
        except KeyboardInterrupt:
            raise
        except CIFAR10NotFoundError:
            raise  # the data is missing for this run and the next: stop with the message that says what to do
        # A failed run, even a SystemExit from an option LightningCLI rejects, must not end the sweep.
        except BaseException as err:  # noqa: BLE001
            run.status = "failed"
            run.error = f"{type(err).__name__}: {err}".replace("\n", " ")
            print(f"[sweep] run {i}/{n} FAILED after {time.perf_counter() - start:.1f} s: {run.error}", file=sys.stderr,
                  flush=True)
            if not isinstance(err, (SystemExit, FloatingPointError)):  # those two say all in their message
                traceback.print_exc(file=sys.stderr)
        run.seconds = time.perf_counter() - start
        # Rewrite the results after every run: a long sweep that is stopped keeps what it has.
        out.mkdir(parents=True, exist_ok=True)
        write_csv(plan[:i], out / "sweep.csv")
    write_csv(plan, out / "sweep.csv")
    write_figure(plan, out / "sweep.png")
    write_table(plan, out / "table.md")
    if args.widths is not None and len(args.widths) >= 2:
        write_crossover(plan, out)
        print(f"[sweep] lazy-rich crossover per width: {out / 'crossover.md'}, {out / 'crossover.png'}", flush=True)
    failed = sum(r.status != "ok" for r in plan)
    print(f"[sweep] finished: {n - failed}/{n} runs ok; wrote {out / 'sweep.csv'}, {out / 'sweep.png'}, "
          f"{out / 'table.md'}", flush=True)
    return 1 if failed else 0
