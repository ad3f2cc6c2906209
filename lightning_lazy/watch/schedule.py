"""When the monitor measures: one policy, in one place, for every adapter.

Like Lightning's ``WeightAveraging.should_update(step_idx, epoch_idx)``, :meth:`Schedule.is_log_step` and
:meth:`Schedule.is_epoch` say whether a measurement is due; a user can subclass :class:`Schedule` and give it to
the monitor to measure on another plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from time import perf_counter
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



class Budget:
    """The share of the fit's wall time the measurements may take (``share``; ``None``: no limit), kept by measuring
    less: a scheduled measurement that would take the spent share over it is taken without its costly parts (κ,
    the NTK, the per-layer measures), or not at all, and counted. The measurement at w0 and those asked for
    (``measure()``, the last one) are always taken whole. Wall times: the measurements' (with their logging) against
    the whole run's since the measurement at w0 began, the twin's training steps not counted as measurement."""

    def __init__(self, share: float | None = None) -> None:
        if share is not None and not (isinstance(share, (int, float)) and 0 < share < 1):
            raise ValueError(f"budget must be None or a share of the fit's wall time in (0, 1), got {share!r}")
        self.share = share
        self.started: float | None = None
        self.spent = 0.0
        self.counts = {"full": 0, "cheap": 0, "skip": 0}
        self.estimates: dict[str, float] = {}

    def start(self) -> None:
        if self.started is None:
            self.started = perf_counter()

    def spent_share(self) -> float:
        """Measurement seconds over the run's seconds so far."""
        elapsed = perf_counter() - self.started if self.started is not None else 0.0
        return self.spent / elapsed if elapsed > 0 else 0.0

    def plan(self) -> str:
        """``"full"``, ``"cheap"`` (without the costly parts) or ``"skip"`` for the next scheduled measurement."""
        if self.share is None or self.started is None:
            return "full"
        elapsed = perf_counter() - self.started
        for plan in ("full", "cheap"):
            estimate = self.estimates.get(plan)
            if estimate is None:
                if plan == "cheap":
                    return "cheap"  # its cost is learned by taking one
                continue
            if self.spent + estimate <= self.share * (elapsed + estimate):
                return plan
        return "skip"

    def spend(self, seconds: float, plan: str) -> None:
        """A measurement of kind ``plan`` took ``seconds`` (``"skip"``: one was left out)."""
        self.counts[plan] += 1
        if plan != "skip":
            self.spent += seconds
            self.estimates[plan] = seconds

    def describe(self) -> str | None:
        """One line for the summary: what was spent, and what was thinned to keep within the budget."""
        if self.share is None:
            return None
        thinned = self.counts["cheap"] + self.counts["skip"]
        line = (f"measurements took {100 * self.spent_share():.1f} % of the run's time (budget {100 * self.share:g} %)")
        if thinned:
            line += (f": {self.counts['full']} measured in full, {self.counts['cheap']} without κ, the NTK and the "
                     f"per-layer measures, {self.counts['skip']} left out")
        return line

    def state_dict(self) -> dict[str, Any]:
        return {"share": self.share, "spent": self.spent, "counts": dict(self.counts), "estimates": dict(self.estimates)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.spent, self.counts, self.estimates = state["spent"], dict(state["counts"]), dict(state["estimates"])


__all__ = ["Budget", "Schedule"]
