"""When the monitor measures: one policy, in one place, for every adapter.

Like Lightning's ``WeightAveraging.should_update(step_idx, epoch_idx)``, :meth:`Schedule.is_log_step` and
:meth:`Schedule.is_epoch` say whether a measurement is due; a user can subclass :class:`Schedule` and give it to
the monitor to measure on another plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class Schedule:
    """Measurements after the optimizer steps ``log_steps`` (``"log"``: 1, 2, 4, 8, ...; a list; ``None``: none) and
    at the end of every ``every_n_epochs``-th epoch (where the loop has epochs)."""

    def __init__(self, log_steps: str | Sequence[int] | None = "log", every_n_epochs: int = 1) -> None:
        self.log_steps = log_steps if log_steps is None or isinstance(log_steps, str) else tuple(log_steps)
        self.every_n_epochs = every_n_epochs

    def is_log_step(self, step: int) -> bool:
        """Whether to measure after ``step`` optimizer steps."""
        if self.log_steps is None or step == 0:
            return False
        if self.log_steps == "log":
            return step & (step - 1) == 0
        return step in self.log_steps

    def is_epoch(self, epoch: int) -> bool:
        """Whether to measure at the end of the epoch ``epoch`` (counted from 0)."""
        return (epoch + 1) % self.every_n_epochs == 0

    def describe(self) -> str:
        """When measurements run, in words (for the cost warning)."""
        if self.log_steps is None:
            steps = ""
        elif self.log_steps == "log":
            steps = "at steps 1, 2, 4, 8, ..."
        else:
            listed = list(self.log_steps)
            steps = f"at steps {', '.join(map(str, listed[:6]))}{', ...' if len(listed) > 6 else ''}"
        epochs = "every epoch end" if self.every_n_epochs == 1 else f"every {self.every_n_epochs} epochs"
        return f"{steps} and {epochs}" if steps else epochs

    def state_dict(self) -> dict[str, Any]:
        return {"log_steps": self.log_steps, "every_n_epochs": self.every_n_epochs}


__all__ = ["Schedule"]
