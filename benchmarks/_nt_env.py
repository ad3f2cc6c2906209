"""Where the neural-tangents interpreter is: one option and one environment variable for every benchmark.

neural-tangents (JAX) lives in its own virtual environment (its numpy / scipy / jax pins conflict with the
project's; ``benchmarks/README.md`` gives the pins). A benchmark that compares with it takes ``--nt-python PATH``,
whose default is the environment variable ``LIGHTNING_LAZY_NT_PYTHON``; with neither, the comparison is skipped
with a one-line reason. No path is built in.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

NT_PYTHON_ENV = "LIGHTNING_LAZY_NT_PYTHON"


def add_nt_python_option(parser: argparse.ArgumentParser) -> None:
    """``--nt-python``: the python of a neural-tangents virtual environment (default: ``$LIGHTNING_LAZY_NT_PYTHON``)."""
    parser.add_argument("--nt-python", default=os.environ.get(NT_PYTHON_ENV) or None,
                        help=f"python of a neural-tangents virtual environment (default: ${NT_PYTHON_ENV}); without "
                             "one the neural-tangents comparison is skipped")


def nt_python_missing(path: str | None) -> str | None:
    """Why ``path`` cannot run neural-tangents (a one-line reason naming the way out), or None when it exists."""
    if not path:
        return (f"skipped: no neural-tangents interpreter given; pass --nt-python PATH or set {NT_PYTHON_ENV} "
                "(benchmarks/README.md says how to build its virtual environment)")
    if not Path(path).exists():
        return f"skipped: no neural-tangents interpreter at {path} (from --nt-python or {NT_PYTHON_ENV})"
    return None
