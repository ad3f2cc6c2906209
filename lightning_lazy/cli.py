"""The ``lightning-lazy`` command: it parses the command line and dispatches to LightningCLI (``fit`` /
``validate`` / ``test`` / ``predict``), the sweep (``lightning_lazy.sweep``), ``configs`` and the demo
(``lightning_lazy.demo``).

``lightning-lazy fit --config vgg11_wide_lazy`` trains with a config shipped in
``lightning_lazy/configs/`` (a bare name is looked up there; a path is used as it is). Everything else on
the line is LightningCLI's: ``--trainer.max_epochs 5``, ``--model.alpha 1e3``, ``--print_config``, ...
"""

from __future__ import annotations

import inspect
import re
import sys
import textwrap
from collections.abc import Sequence

from lightning_lazy.data.cifar10 import CIFAR10NotFoundError
from lightning_lazy.quiet import quiet_third_party_output
from lightning_lazy.runner import (  # noqa: F401  (resolve_config & co. stay importable from here)
    configs_dir,
    describe_config,
    exit_code,
    make_lightning_cli,
    resolve_config,
    resolve_config_args,
    shipped_configs,
)
from lightning_lazy.sweep import run_sweep

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
        "  lightning-lazy sweep --config mnist1d_cnn_standard --modes standard lazy linearized kernel \\",
        "      --alphas 1 10 100 1000 10000 --output mnist1d_sweep       (MNIST-1D on a CPU, data made locally)",
        "Run `lightning-lazy <command> --help` for a command's options.",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ help

FULL_HELP = "--help-all"


def _plain(text: str) -> str:
    """Docstring markup as a terminal shows it: ``x`` -> x, :class:`~a.b.C` -> C, :func:`f` -> f."""
    text = re.sub(r":[a-z]+:`~?(?:[\w.]*\.)?([^`]+)`", r"\1", text)
    return text.replace("``", "")


def _options(cls: type, prefix: str, skip: Sequence[str] = ()) -> list[str]:
    """One entry per argument of ``cls.__init__``: ``--prefix.name (default D)`` and its docstring's words."""
    from docstring_parser import parse  # LightningCLI's own dependency (through jsonargparse)

    docs: dict[str, str] = {}
    for param in parse(cls.__doc__ or "").params:
        for name in param.arg_name.split(" / "):  # "measure_kappa / measure_ntk": one text for both
            docs[name.strip()] = param.description or ""
    lines = []
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or name in skip or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        default = "" if param.default is inspect.Parameter.empty else f" (default {param.default!r})"
        lines.append(f"  {prefix}{name}{default}")
        text = " ".join(_plain(docs.get(name, "")).split())
        lines += textwrap.wrap(text, width=100, initial_indent="      ", subsequent_indent="      ")
    return lines


def lightning_help(command: str) -> str:
    """The short help of a LightningCLI command: the package's options first (the model's and the monitor's),
    the data modules, and where Lightning's own thousand lines are (``--help-all``)."""
    from lightning_lazy.callback import LazyTrainingMonitor
    from lightning_lazy.module import LazyClassifier

    lines = [
        f"usage: lightning-lazy {command} --config NAME|PATH [--model.NAME VALUE] [--data.NAME VALUE] "
        "[--trainer.NAME VALUE] ...",
        "",
        f"lightning-lazy {command}: {COMMANDS[command]}, with the package's LazyClassifier (standard, lazy or",
        "linearized) and a data module; the shipped configs (`lightning-lazy configs`) also attach the monitor.",
        "",
        "  --config NAME|PATH    a shipped config by name, or a YAML file (several: later ones override)",
        "  --print_config        print the resolved config and exit",
        f"  {FULL_HELP:<21} every option, Lightning's Trainer's included (about 1,200 lines)",
        "",
        "The model, LazyClassifier (--model.NAME VALUE):",
        "  --model.backbone CLASS_PATH",
        "      the network, an nn.Module with outputs [N, num_classes]: a class path and its init_args, e.g.",
        "      lightning_lazy.models.VGG11, lightning_lazy.models.ResNet18, lightning_lazy.models.CNN1D",
        *_options(LazyClassifier, "--model.", skip=("backbone",)),
        "",
        "The monitor, LazyTrainingMonitor: the shipped configs list it last in trainer.callbacks, so",
        "--trainer.callbacks.NAME VALUE sets its options (e.g. --trainer.callbacks.every_n_epochs 1); in a config",
        "of your own, add it with --trainer.callbacks+=LazyTrainingMonitor. Its options:",
        *_options(LazyTrainingMonitor, "--trainer.callbacks."),
        "",
        "The data (--data CLASS, then --data.NAME VALUE; `lightning-lazy fit --data.help CLASS` lists a class's",
        "options): lightning_lazy.data.MNIST1DDataModule (made locally), lightning_lazy.data.CIFAR10DataModule,",
        "lightning_lazy.data.TeacherStudentDataModule, or any LightningDataModule.",
        "",
        f"Lightning's own options (--trainer.max_epochs, --trainer.precision, --ckpt_path, ...): lightning-lazy "
        f"{command} {FULL_HELP}",
    ]
    return "\n".join(lines)


def run_lightning(argv: Sequence[str]) -> int:
    """``fit`` / ``validate`` / ``test`` / ``predict`` through LightningCLI, with config names resolved.

    ``-h`` / ``--help`` print :func:`lightning_help` (the package's options); ``--help-all`` LightningCLI's own
    help, every Trainer option included."""
    command, rest = argv[0], list(argv[1:])
    if any(arg in ("-h", "--help") for arg in rest):
        print(lightning_help(command))
        return 0
    if FULL_HELP in rest:
        argv = [command, *(arg if arg != FULL_HELP else "--help" for arg in rest)]
    try:
        make_lightning_cli(resolve_config_args(argv), run=True)
    except SystemExit as stop:  # --help, --print_config and argument errors end here
        return exit_code(stop)
    return 0


# ----------------------------------------------------------------------------------------------- main


def list_configs() -> int:
    """``lightning-lazy configs``: print each shipped config's name and one-line description."""
    for name, path in shipped_configs().items():
        print(f"{name:<28} {describe_config(path)}")
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
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    try:
        if command in LIGHTNING_COMMANDS:
            return run_lightning([command, *rest])
        if command == "sweep":
            return run_sweep(rest)
        from lightning_lazy import demo

        return int(demo.main(rest) or 0)
    except SystemExit as stop:  # argument errors of the sweep and the demo: their one-line message
        return exit_code(stop)
    except CIFAR10NotFoundError as err:
        # The message says what to do; the chained network tracebacks behind it would only hide it.
        print(f"lightning-lazy {command}: {err}", file=sys.stderr)
        return 1
    except MisconfigurationException as err:
        # A refusal of the monitor's or Lightning's (no loss known, a model= path that does not exist, ...): its
        # message names the cause and the way out; the Trainer's frames above it would bury it.
        print(f"lightning-lazy {command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
