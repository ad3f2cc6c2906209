"""``lightning-lazy sweep``: one fit per alpha (and per learning rate), then a CSV, a figure and a table.

The paper's figure 3 / table 1 protocol: the same model, initialization (seed) and data trained lazily at
each alpha of a list, plus the standard and the linearized modes; every fit goes through LightningCLI with
a shipped config (or any YAML path) and the sweep's overrides. Writes ``sweep.csv`` (one row per run, with
the monitor's last ``lazy/*`` values), ``sweep.png`` (test accuracy and activation stability against alpha)
and ``table.md`` ("linear vs lazy vs deep").
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
from typing import Any

from lightning_lazy.runner import make_lightning_cli, resolve_config
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


# Above this alpha, float32 cannot resolve the O(1/alpha) weight changes of lazy training (eps = 6e-8).
LARGE_ALPHA = 1e4
CSV_FIELDS = ["config", "model", "mode", "alpha", "lr", "status", "train_loss", "train_acc", "val_acc", "test_loss",
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
    parser.add_argument("--modes", nargs="+", choices=["lazy", "standard", "linearized"],
                        default=["lazy", "standard", "linearized"],
                        help="which modes to run (lazy = once per alpha; the others once)")
    parser.add_argument("--lrs", nargs="+", type=float, default=None,
                        help="grid of initial learning rates; the best by validation accuracy is reported per point "
                             "(default: the config's model.lr)")
    parser.add_argument("--output", "-o", default="sweep", help="output folder (default: ./sweep)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every run: same w0 and batches for all alphas")
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
    from lightning_lazy.diagnostics import activation_stability

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
        return float(activation_stability(backbone, x, params, params0))
    finally:
        backbone.to(was)


def _fit_one(run: SweepRun, config_path: str, overrides: list[str], args: argparse.Namespace, run_dir: Path) -> None:
    import torch
    import yaml

    cli_args = ["--config", config_path, *overrides, f"--model.mode={run.mode}", f"--model.alpha={run.alpha!r}",
                f"--seed_everything={args.seed}", f"--trainer.default_root_dir={run_dir}"]
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


def _run_label(run: SweepRun) -> str:
    label = f"{run.config}-{run.mode}"
    if run.mode == "lazy":
        label += f"-alpha{run.alpha:g}"
    if run.lr is not None:
        label += f"-lr{run.lr:g}"
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", label)


def _best(runs: list[SweepRun]) -> SweepRun | None:
    """The run of a (config, mode, alpha) point with the best validation accuracy (the lr grid's choice)."""
    ok = [r for r in runs if r.status == "ok"]
    if not ok:
        return None
    return max(ok, key=lambda r: (r.val_acc if math.isfinite(r.val_acc) else -1.0, r.train_acc))


def _points(runs: list[SweepRun]) -> dict[tuple[str, str, float], SweepRun]:
    """``{(config, mode, alpha): best run}``; alpha is 0 for the modes without one."""
    groups: dict[tuple[str, str, float], list[SweepRun]] = {}
    for r in runs:
        groups.setdefault((r.config, r.mode, r.alpha if r.mode == "lazy" else 0.0), []).append(r)
    best = {key: _best(group) for key, group in groups.items()}
    return {k: v for k, v in best.items() if v is not None}


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
    """Test accuracy and activation stability against α (log scale), one line per model."""
    from matplotlib.figure import Figure  # a Figure object, not pyplot: no global backend or figure state

    points = _points(runs)
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_acc, ax_stab = fig.subplots(1, 2)
    for config in dict.fromkeys(r.config for r in runs):
        lazy = sorted((p for (c, m, _), p in points.items() if c == config and m == "lazy"), key=lambda p: p.alpha)
        label = next((p.model for p in points.values() if p.config == config), config)
        if lazy:
            line = ax_acc.plot([p.alpha for p in lazy], [100 * p.test_acc for p in lazy], "o-", label=label)[0]
            ax_stab.plot([p.alpha for p in lazy], [100 * p.activation_stability for p in lazy], "o-", label=label,
                         color=line.get_color())
        for mode, style in (("standard", "--"), ("linearized", ":")):
            point = points.get((config, mode, 0.0))
            if point is not None:
                ax_acc.axhline(100 * point.test_acc, linestyle=style, color="gray",
                               label=f"{label} {mode} ({100 * point.test_acc:.1f} %)")
    for ax, title in ((ax_acc, "test accuracy (%)"), (ax_stab, "stable ReLU activations (%)")):
        ax.set_xscale("log")
        ax.set_xlabel(r"scale $\alpha$")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Lazy training: accuracy and activation stability against the scale alpha")
    fig.savefig(path, dpi=120)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}" if math.isfinite(value) else "n/a"


def write_table(runs: list[SweepRun], path: Path) -> None:
    """Markdown: linear vs lazy vs deep (train / test accuracy per model and mode), then every point."""
    points = _points(runs)
    lines = ["# Linear vs lazy vs deep", "",
             "Train and test accuracy (%) per model: *deep* = standard training, *lazy* = the largest alpha of the "
             "sweep, *linear* = the exact tangent model (alpha -> infinity). Where a learning-rate grid was run, "
             "each point uses the lr with the best validation accuracy.", "",
             "| model | mode | alpha | lr | train acc | test acc | stable activations |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for config in dict.fromkeys(r.config for r in runs):
        rows = []
        deep = next((p for (c, m, _), p in points.items() if c == config and m == "standard"), None)
        lazy = [p for (c, m, _), p in points.items() if c == config and m == "lazy"]
        linear = next((p for (c, m, _), p in points.items() if c == config and m == "linearized"), None)
        if deep:
            rows.append(("deep", deep, "1"))
        if lazy:
            top = max(lazy, key=lambda p: p.alpha)
            rows.append(("lazy", top, f"{top.alpha:g}"))
        if linear:
            rows.append(("linear", linear, "inf"))
        for name, p, alpha in rows:
            lines.append(f"| {p.model} | {name} | {alpha} | {p.lr:g} | {_pct(p.train_acc)} | {_pct(p.test_acc)} "
                         f"| {_pct(p.activation_stability)} |")
    lines += ["", "## Every run", "", "| config | mode | alpha | lr | status | train acc | val acc | test acc "
              "| stable activations | epochs | seconds |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- "
              "| --- | --- |"]
    for r in runs:
        lr = f"{r.lr:g}" if r.lr is not None else "config"
        status = r.status if r.status == "ok" else f"{r.status}: {r.error[:80]}"
        lines.append(f"| {r.config} | {r.mode} | {r.alpha:g} | {lr} | {status} | {_pct(r.train_acc)} "
                     f"| {_pct(r.val_acc)} | {_pct(r.test_acc)} | {_pct(r.activation_stability)} | {r.epochs} "
                     f"| {r.seconds:.1f} |")
    path.write_text("\n".join(lines) + "\n")


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
    bad = [o for o in overrides if o.startswith("--model.mode") or o.startswith("--model.alpha")]
    if bad:
        parser.error(f"{bad[0]} is set by the sweep itself: use --modes and --alphas")
    configs = [(Path(c).stem if Path(c).expanduser().is_file() else c.removesuffix(".yaml"), resolve_config(c))
               for c in args.config]
    out = Path(args.output)
    plan: list[SweepRun] = []
    for name, _ in configs:
        for mode in args.modes:
            for alpha in (sorted(args.alphas) if mode == "lazy" else [1.0]):
                for lr in (args.lrs or [None]):
                    plan.append(SweepRun(config=name, model=name, mode=mode, alpha=alpha, lr=lr))
    paths = dict(configs)
    n = len(plan)
    print(f"[sweep] {n} runs -> {out.resolve()}", flush=True)
    for i, run in enumerate(plan, 1):
        print(f"[sweep] run {i}/{n}: {run.config} mode={run.mode}"
              + (f" alpha={run.alpha:g}" if run.mode == "lazy" else "")
              + (f" lr={run.lr:g}" if run.lr is not None else ""), flush=True)
        start = time.perf_counter()
        try:
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
    failed = sum(r.status != "ok" for r in plan)
    print(f"[sweep] finished: {n - failed}/{n} runs ok; wrote {out / 'sweep.csv'}, {out / 'sweep.png'}, "
          f"{out / 'table.md'}", flush=True)
    return 1 if failed else 0
