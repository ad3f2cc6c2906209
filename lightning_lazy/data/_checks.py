"""Checks shared by the data modules."""

from __future__ import annotations


def check_loader_options(batch_size: int, eval_batch_size: int, val_size: int) -> None:
    """The checks every data module here makes of its loader options: positive batch sizes, ``val_size >= 0``.
    Raises ``ValueError`` naming the option and the value."""
    for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(val_size, int) or val_size < 0:
        raise ValueError(f"val_size must be a non-negative integer (0 = validate on the test set), got {val_size!r}")
