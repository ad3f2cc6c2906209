"""What the command line and the sweep share: the shipped configs, config-name resolution, and the package's
LightningCLI.

``lightning_lazy.cli`` (parsing and dispatch) and ``lightning_lazy.sweep`` (one fit per point of a grid) both
import from here, and nothing here imports either of them: the arrows point down.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------------------------ configs


def configs_dir() -> Path:
    """The folder of the configs shipped inside the package."""
    return Path(__file__).resolve().parent / "configs"


def shipped_configs() -> dict[str, Path]:
    """``{name: path}`` of the shipped YAML configs (name = file name without ``.yaml``)."""
    return {p.stem: p for p in sorted(configs_dir().glob("*.yaml"))}


def resolve_config(value: str) -> str:
    """A config path for ``value``: an existing file as given, else a shipped config by (file) name.

    Raises ``SystemExit`` with a one-line message listing the shipped configs when neither exists.
    """
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


def describe_config(path: Path) -> str:
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
            subclass_mode_data=True,  # CIFAR10DataModule, MNIST1DDataModule or any other, by class_path
            # Optimizer and scheduler are LazyClassifier arguments (model.optimizer / model.lr_scheduler), so
            # the paper's SGD + 1/(1 + t/3) schedule stays the default; no competing top-level --optimizer.
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )


def exit_code(stop: SystemExit) -> int:
    """The status a ``SystemExit`` stands for; a message in place of a status is printed, status 2."""
    if stop.code is None or isinstance(stop.code, int):
        return stop.code or 0
    print(stop.code, file=sys.stderr)
    return 2
