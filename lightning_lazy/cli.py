"""The ``lightning-lazy`` command: it parses the command line and dispatches to LightningCLI (``fit`` /
``validate`` / ``test`` / ``predict``), the sweep (``lightning_lazy.sweep``), ``configs`` and the demo
(``lightning_lazy.demo``).

``lightning-lazy fit --config vgg11_wide_lazy`` trains with a config shipped in
``lightning_lazy/configs/`` (a bare name is looked up there; a path is used as it is). Everything else on
the line is LightningCLI's: ``--trainer.max_epochs 5``, ``--model.alpha 1e3``, ``--print_config``, ...
"""

from __future__ import annotations

import sys
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


def run_lightning(argv: Sequence[str]) -> int:
    """``fit`` / ``validate`` / ``test`` / ``predict`` through LightningCLI, with config names resolved."""
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


if __name__ == "__main__":
    sys.exit(main())
