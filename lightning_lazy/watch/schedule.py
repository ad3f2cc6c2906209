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



#: The parts of a measurement a budget may leave out (:data:`~lightning_lazy.watch.probe.MEASURE_PARTS`), and how
#: the summary names them.
PART_WORDS: dict[str, str] = {"kappa": "κ", "ntk": "the NTK", "layers": "the per-layer measures"}

#: The plan of a whole measurement: nothing left out.
FULL: tuple[str, ...] = ()


def plan_words(plan: tuple[str, ...]) -> str:
    """``()`` → ``"in full"``; ``("kappa", "ntk")`` → ``"without κ and the NTK"``."""
    if not plan:
        return "in full"
    words = [PART_WORDS[part] for part in PART_WORDS if part in plan]
    return "without " + (words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1])


class Budget:
    """The share of the fit's wall time the measurements may take (``share``; ``None``: no limit), kept by measuring
    less: a scheduled measurement leaves out the costliest parts of :data:`PART_WORDS` (κ, the NTK, the per-layer
    measures: by what each took when last measured, the costliest first) as far as needed to keep the spent share
    within it, or is left out, and each is counted. On an MLP that drops κ first; on a ViT, whose NTK is most of a
    measurement, the NTK first. The measurement at w0 and those that must be whole (the end state, one another
    callback monitors) are always taken whole: they count in the share reported (:meth:`spent_share`), not in the
    one the budget keeps (:meth:`scheduled_share`), so that a costly start does not leave out every measurement of
    the early phase. Wall times: the measurements' (with their logging and drawing) against the whole run's since
    the measurement at w0 began; the twin's training steps are not measurement.

    A plan's cost is what its last measurement took; before one was taken, the last whole measurement's less the
    parts it leaves out (the probe's timings of them); with neither known, the leanest plan is taken to learn it."""

    def __init__(self, share: float | None = None) -> None:
        if share is not None and not (isinstance(share, (int, float)) and 0 < share < 1):
            raise ValueError(f"budget must be None or a share of the fit's wall time in (0, 1), got {share!r}")
        self.share = share
        self.started: float | None = None
        self.stopped: float | None = None
        self.spent = 0.0  # every measurement's seconds
        self.scheduled = 0.0  # the scheduled ones' (what the budget keeps)
        self.counts: dict[str, int] = {"full": 0, "skip": 0}  # by plan key (see _key), and "skip"
        self.estimates: dict[str, float] = {}  # by plan key: what its last measurement took
        self.part_seconds: dict[str, float] = {}  # what each part took in the last measurement that took it
        self._elapsed_before = 0.0

    def start(self) -> None:
        if self.started is None:  # a resumed run goes on from the time its checkpoint had run
            self.started = perf_counter() - self._elapsed_before

    def stop(self) -> None:
        """The run ended: its share is what it was then (a summary read later says the same)."""
        if self.started is not None and self.stopped is None:
            self.stopped = perf_counter()

    def _elapsed(self) -> float:
        if self.started is None:
            return self._elapsed_before
        return (self.stopped if self.stopped is not None else perf_counter()) - self.started

    def spent_share(self, pending: float = 0.0) -> float:
        """Measurement seconds (and ``pending`` ones of a measurement under way) over the run's seconds so far (until
        :meth:`stop`)."""
        elapsed = self._elapsed() if self.started is not None else 0.0
        return (self.spent + pending) / elapsed if elapsed > 0 else 0.0

    def scheduled_share(self) -> float:
        """The scheduled measurements' seconds over the run's seconds so far: what the budget keeps."""
        elapsed = self._elapsed() if self.started is not None else 0.0
        return self.scheduled / elapsed if elapsed > 0 else 0.0

    def plans(self) -> list[tuple[str, ...]]:
        """The plans from the richest to the leanest: nothing left out, then the costliest part, then the two
        costliest, then all (parts never timed count as free, in :data:`PART_WORDS`' order)."""
        order = sorted(PART_WORDS, key=lambda part: -self.part_seconds.get(part, 0.0))
        return [tuple(order[:k]) for k in range(len(order) + 1)]

    @staticmethod
    def _key(plan: tuple[str, ...]) -> str:
        return "+".join(sorted(plan)) or "full"

    def estimate(self, plan: tuple[str, ...]) -> float | None:
        """Seconds a measurement of ``plan`` (the parts it leaves out) is expected to take (``None``: not known)."""
        if self._key(plan) in self.estimates:
            return self.estimates[self._key(plan)]
        full = self.estimates.get("full")
        if full is None or any(part not in self.part_seconds for part in plan):
            return None
        return max(full - sum(self.part_seconds[part] for part in plan), 0.0)

    def plan(self) -> tuple[str, ...] | None:
        """The parts the next scheduled measurement leaves out (``()``: whole), or ``None``: leave it out."""
        if self.share is None or self.started is None:
            return FULL
        elapsed = self._elapsed()
        plans = self.plans()
        for plan in plans:
            estimate = self.estimate(plan)
            if estimate is None:
                if plan == plans[-1]:
                    return plan  # its cost is learned by taking one
                continue
            if self.scheduled + estimate <= self.share * (elapsed + estimate):
                return plan
        return None

    def spend(self, seconds: float, plan: tuple[str, ...] | None, parts: dict[str, float] | None = None,
              forced: bool = False) -> None:
        """A measurement leaving out ``plan`` took ``seconds`` (``None``: one was left out); ``parts``: the seconds
        of each part of :data:`PART_WORDS` it took; ``forced``: one that had to be whole (not scheduled)."""
        counted = "whole" if forced else "skip" if plan is None else self._key(plan)
        self.counts[counted] = self.counts.get(counted, 0) + 1
        if plan is not None:
            self.spent += seconds
            self.scheduled += 0.0 if forced else seconds
            self.estimates[self._key(plan)] = seconds  # a whole one tells what a full one costs
            self.part_seconds.update(parts or {})

    def thinned(self) -> int:
        """How many scheduled measurements were thinned or left out."""
        return sum(count for key, count in self.counts.items() if key not in ("full", "whole"))

    def describe(self) -> str:
        """One line for the summary: what was spent, and what was thinned to keep within the budget."""
        if self.share is None:
            return (f"measurements took {100 * self.spent_share():.1f} % of the run's time besides the twin's steps "
                    "(no budget: every scheduled one whole)")
        line = (f"measurements took {100 * self.spent_share():.1f} % of the run's time besides the twin's steps: "
                f"{self.counts.get('whole', 0)} that must be whole (at w0, the end state) and the scheduled ones, "
                f"{100 * self.scheduled_share():.1f} % (budget {100 * self.share:g} %)")
        if self.thinned():
            taken = [f"{self.counts['full']} measured in full"]
            taken += [f"{count} {plan_words(tuple(key.split('+')))}" for key, count in self.counts.items()
                      if key not in ("full", "skip", "whole") and count]
            line += f": {', '.join(taken)}, {self.counts['skip']} left out"
        return line

    def state_dict(self) -> dict[str, Any]:
        return {"share": self.share, "spent": self.spent, "scheduled": self.scheduled, "counts": dict(self.counts),
                "estimates": dict(self.estimates), "part_seconds": dict(self.part_seconds), "elapsed": self._elapsed()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.spent, self.estimates = state["spent"], dict(state["estimates"])
        self.scheduled = state.get("scheduled", self.spent)
        self.counts = {"full": 0, "skip": 0} | dict(state["counts"])
        self.part_seconds = dict(state.get("part_seconds", {}))
        self._elapsed_before, self.started, self.stopped = state.get("elapsed", 0.0), None, None


__all__ = ["FULL", "PART_WORDS", "Budget", "Schedule", "plan_words"]
