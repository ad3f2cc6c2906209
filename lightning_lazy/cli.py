"""The ``lightning-lazy`` command: it parses the command line and dispatches to LightningCLI (``fit`` /
``validate`` / ``test`` / ``predict``), the sweep (``lightning_lazy.sweep``), ``configs`` and the demo
(``lightning_lazy.demo``).

``lightning-lazy fit --config vgg11_wide_lazy`` trains with a config shipped in
``lightning_lazy/configs/`` (a bare name is looked up there; a path is used as it is). Everything else on
the line is LightningCLI's: ``--trainer.max_epochs 5``, ``--model.alpha 1e3``, ``--print_config``, ...
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_lazy.data.cifar10 import CIFAR10NotFoundError
from lightning_lazy.quiet import quiet_third_party_output

COMMANDS = {
    "fit": "train a model (LightningCLI)",
    "validate": "evaluate on the validation set (LightningCLI)",
    "test": "evaluate on the test set (LightningCLI)",
    "predict": "predict classes (LightningCLI)",
    "sweep": "one fit per alpha (and per learning rate), then a CSV, a figure and a Markdown table",
    "configs": "list the configs shipped with the package",
    "demo": "the small synthetic demonstration of lazy vs non-lazy training",
}
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def _usage() -> str:
    lines = ["usage: lightning-lazy <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, text in COMMANDS.items()]
    lines += [
        "",
        "LightningCLI commands take --config NAME (a shipped config, see `lightning-lazy configs`) or a path, and",
        "any LightningCLI option, e.g.:",
        "  lightning-lazy fit --config vgg11_wide_lazy --trainer.max_epochs 100 --data.data_dir ~/data",
        "  lightning-lazy fit --config resnet18_wide_standard --print_config",
        "  lightning-lazy sweep --config vgg11_wide_lazy --alphas 1 10 100 1e3 1e4 1e5 1e6 1e7 --output sweeps/vgg",
        "Run `lightning-lazy <command> --help` for a command's options.",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ configs


def configs_dir() -> Path:
    """The folder of the configs shipped inside the package."""
    return Path(__file__).resolve().parent / "configs"


def shipped_configs() -> dict[str, Path]:
    """``{name: path}`` of the shipped YAML configs (name = file name without ``.yaml``)."""
    return {p.stem: p for p in sorted(configs_dir().glob("*.yaml"))}


def resolve_config(value: str) -> str:
    """A config path for ``value``: an existing file as given, else a shipped config by (file) name."""
    if Path(value).expanduser().is_file():
        return str(Path(value).expanduser())
    name = value[:-5] if value.endswith(".yaml") else value[:-4] if value.endswith(".yml") else value
    shipped = shipped_configs()
    if "/" not in value and name in shipped:
        return str(shipped[name])
    raise SystemExit(
        f"lightning-lazy: no config file {value!r} and no shipped config of that name. Shipped configs: "
        f"{', '.join(shipped) or '(none found)'}; or give the path of a YAML file."
    )


def resolve_config_args(argv: Sequence[str]) -> list[str]:
    """Replace the value of every ``--config``/``-c`` (also ``--config=X``) by the path it names."""
    out: list[str] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c"):
            if i + 1 >= len(argv):
                raise SystemExit(f"lightning-lazy: {arg} needs a value: a shipped config name or a YAML path")
            out += [arg, resolve_config(argv[i + 1])]
            i += 2
            continue
        if arg.startswith("--config="):
            out.append("--config=" + resolve_config(arg.split("=", 1)[1]))
        else:
            out.append(arg)
        i += 1
    return out


def _describe(path: Path) -> str:
    """The first comment line of a config: its one-line description."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


# ---------------------------------------------------------------------------------------- LightningCLI


def make_lightning_cli(args: list[str], run: bool) -> Any:
    """The package's LightningCLI on ``args`` (config names already resolved); ``run`` as LightningCLI's."""
    import pytorch_lightning as pl
    from pytorch_lightning.cli import LightningCLI

    from lightning_lazy.module import LazyClassifier

    with warnings.catch_warnings():
        # LightningCLI warns when both `args` and sys.argv are non-empty; here `args` *is* the command line.
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        return LightningCLI(
            LazyClassifier,
            pl.LightningDataModule,
            subclass_mode_data=True,  # CIFAR10DataModule, SyntheticCIFAR10DataModule or any other, by class_path
            # Optimizer and scheduler are LazyClassifier arguments (model.optimizer / model.lr_scheduler), so
            # the paper's SGD + 1/(1 + t/3) schedule stays the default; no competing top-level --optimizer.
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )


def run_lightning(argv: Sequence[str]) -> int:
    """``fit`` / ``validate`` / ``test`` / ``predict`` through LightningCLI, with config names resolved."""
    try:
        make_lightning_cli(resolve_config_args(argv), run=True)
    except SystemExit as stop:  # --help, --print_config and argument errors end here
        return _exit_code(stop)
    return 0


def _exit_code(stop: SystemExit) -> int:
    """The status a ``SystemExit`` stands for; a message in place of a status is printed, status 2."""
    if stop.code is None or isinstance(stop.code, int):
        return stop.code or 0
    print(stop.code, file=sys.stderr)
    return 2


# ----------------------------------------------------------------------------------------------- main


def list_configs() -> int:
    """``lightning-lazy configs``: print each shipped config's name and one-line description."""
    for name, path in shipped_configs().items():
        print(f"{name:<28} {_describe(path)}")
    print(f"\n(in {configs_dir()})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-lazy`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command == "configs":
        return list_configs()
    if command not in LIGHTNING_COMMANDS and command not in ("sweep", "demo"):
        print(f"lightning-lazy: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    quiet_third_party_output(demo=command == "demo")
    try:
        if command in LIGHTNING_COMMANDS:
            return run_lightning([command, *rest])
        if command == "sweep":
            from lightning_lazy.sweep import run_sweep

            return run_sweep(rest)
        from lightning_lazy import demo

        return int(demo.main(rest) or 0)
    except SystemExit as stop:  # argument errors of the sweep and the demo: their one-line message
        return _exit_code(stop)
    except CIFAR10NotFoundError as err:
        # The message says what to do; the chained network tracebacks behind it would only hide it.
        print(f"lightning-lazy {command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
