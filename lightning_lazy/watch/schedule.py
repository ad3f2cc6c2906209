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



#: What a scheduled measurement takes under a budget, from the richest plan to the leanest: the parts of
#: :meth:`LazinessProbe.measure <lightning_lazy.watch.probe.LazinessProbe.measure>` each one leaves out
#: (:data:`~lightning_lazy.watch.probe.MEASURE_PARTS`), and how the summary names what it left out.
PLANS: dict[str, tuple[dict[str, bool], str]] = {
    "full": ({}, ""),
    "no_kappa": ({"kappa": False}, "without κ"),
    "cheap": ({"kappa": False, "ntk": False, "layers": False}, "without κ, the NTK and the per-layer measures"),
}


class Budget:
    """The share of the fit's wall time the measurements may take (``share``; ``None``: no limit), kept by measuring
    less: a scheduled measurement takes the richest plan of :data:`PLANS` whose cost keeps the spent share within
    it (in full; without κ; without κ, the NTK and the per-layer measures), or is left out, and each is counted.
    The measurement at w0 and those asked for (``measure()``, the last one) are always taken whole, and counted as
    spent. Wall times: the measurements' (with their logging and drawing) against the whole run's since the
    measurement at w0 began; the twin's training steps are not measurement.

    A plan's cost is what its last measurement took; before one was taken, the last full measurement's less the
    parts it leaves out (the probe's timings of them), and with neither known the leanest plan is taken to learn
    it."""

    def __init__(self, share: float | None = None) -> None:
        if share is not None and not (isinstance(share, (int, float)) and 0 < share < 1):
            raise ValueError(f"budget must be None or a share of the fit's wall time in (0, 1), got {share!r}")
        self.share = share
        self.started: float | None = None
        self.spent = 0.0
        self.counts = {plan: 0 for plan in PLANS} | {"skip": 0}
        self.estimates: dict[str, float] = {}
        self.part_seconds: dict[str, float] = {}  # what each part took in the last measurement that took it
        self._elapsed_before = 0.0
        self.stopped: float | None = None

    def start(self) -> None:
        if self.started is None:  # a resumed run goes on from the time its checkpoint had run
            self.started = perf_counter() - self._elapsed_before

    def stop(self) -> None:
        """The run ended: its share is what it was then (a summary read later says the same)."""
        if self.started is not None and self.stopped is None:
            self.stopped = perf_counter()

    def spent_share(self) -> float:
        """Measurement seconds over the run's seconds so far (until :meth:`stop`)."""
        if self.started is None:
            return 0.0
        elapsed = (self.stopped if self.stopped is not None else perf_counter()) - self.started
        return self.spent / elapsed if elapsed > 0 else 0.0

    def estimate(self, plan: str) -> float | None:
        """Seconds a measurement of ``plan`` is expected to take (``None``: not known yet)."""
        if plan in self.estimates:
            return self.estimates[plan]
        full = self.estimates.get("full")
        left_out = [part for part, taken in PLANS[plan][0].items() if not taken]
        if full is None or any(part not in self.part_seconds for part in left_out):
            return None
        return max(full - sum(self.part_seconds[part] for part in left_out), 0.0)

    def plan(self) -> str:
        """The plan of :data:`PLANS` for the next scheduled measurement, or ``"skip"``."""
        if self.share is None or self.started is None:
            return "full"
        elapsed = perf_counter() - self.started
        for plan in PLANS:
            estimate = self.estimate(plan)
            if estimate is None:
                if plan == "cheap":
                    return "cheap"  # its cost is learned by taking one
                continue
            if self.spent + estimate <= self.share * (elapsed + estimate):
                return plan
        return "skip"

    def spend(self, seconds: float, plan: str, parts: dict[str, float] | None = None) -> None:
        """A measurement of ``plan`` took ``seconds`` (``"skip"``: one was left out); ``parts``: the seconds of each
        part of :data:`~lightning_lazy.watch.probe.MEASURE_PARTS` it took."""
        self.counts[plan] += 1
        if plan != "skip":
            self.spent += seconds
            self.estimates[plan] = seconds
            self.part_seconds.update(parts or {})

    def describe(self) -> str | None:
        """One line for the summary: what was spent, and what was thinned to keep within the budget."""
        if self.share is None:
            return None
        line = (f"measurements took {100 * self.spent_share():.1f} % of the run's time (budget {100 * self.share:g} %)")
        if any(self.counts[plan] for plan in self.counts if plan != "full"):
            taken = [f"{self.counts['full']} measured in full"]
            taken += [f"{self.counts[plan]} {words}" for plan, (_, words) in PLANS.items()
                      if plan != "full" and self.counts[plan]]
            line += f": {', '.join(taken)}, {self.counts['skip']} left out"
        return line

    def state_dict(self) -> dict[str, Any]:
        elapsed = ((self.stopped if self.stopped is not None else perf_counter()) - self.started
                   if self.started is not None else self._elapsed_before)
        return {"share": self.share, "spent": self.spent, "counts": dict(self.counts), "estimates": dict(self.estimates),
                "part_seconds": dict(self.part_seconds), "elapsed": elapsed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.spent, self.estimates = state["spent"], dict(state["estimates"])
        self.counts.update(state["counts"])
        self.part_seconds = dict(state.get("part_seconds", {}))
        self._elapsed_before, self.started, self.stopped = state.get("elapsed", 0.0), None, None


__all__ = ["PLANS", "Budget", "Schedule"]
