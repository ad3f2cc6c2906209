"""What one measurement of the monitor costs against a training step, to say once when measuring dominates a run.

Lightning-free: the callback reports training steps and measurements to :class:`MeasurementCost`, which keeps
their wall times and returns the one-line advice to warn with.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from time import perf_counter

#: Parts of a measurement (the keys of ``LazinessProbe.timings``): what to call them, and what makes them cheaper.
_PARTS = {
    "ntk": ("the empirical NTK", "measure_ntk=False or a smaller ntk_probe_size"),
    "hessian_norm": ("the ‖D²h‖ search", "measure_kappa=False or a smaller kappa_probe_size"),
    "jacobian_norm": ("‖Dh‖", "measure_kappa=False or a smaller kappa_probe_size"),
    "kappa_rest": ("κ", "measure_kappa=False or a smaller kappa_probe_size"),
    "layers": ("the per-layer measures", "per_layer=False or a smaller layer_probe_size"),
    "output_and_activation_states": ("the probe's forward", "a smaller probe_size"),
    "tangent_output": ("the twin's probe forward", "a smaller probe_size"),
    "spectrum": ("the kernel's spectrum", "a smaller ntk_probe_size"),
}


class MeasurementCost:
    """Wall times of training steps and of measurements; :meth:`advice` once a measurement costs too much.

    A measurement is reported when it takes at least ``seconds`` and as long as ``steps`` training steps (the
    median step, twin included): below either, measuring does not dominate the run. Reported once per fit.
    """

    def __init__(self, seconds: float = 10.0, steps: float = 50.0) -> None:
        self.seconds = seconds
        self.steps = steps
        self.step_seconds: list[float] = []
        self._started: float | None = None
        self.reported = False

    def step_started(self) -> None:
        self._started = perf_counter()

    def step_ended(self) -> None:
        if self._started is not None:
            self.step_seconds.append(perf_counter() - self._started)
            self._started = None

    def advice(self, timing: Mapping[str, float], when: str, rarer: str = "log_steps=None / every_n_epochs=N") -> str | None:
        """The one-line warning, the first time a measurement (``timing``: ``{part: seconds, "total": seconds}``, as
        ``LazinessProbe.timings["initial"]`` or ``["last"]``) takes ``seconds`` and ``steps`` training steps; else ``None``. ``when``
        says when measurements run (e.g. "at steps 1, 2, 4, 8, ... and every epoch end"), ``rarer`` what makes them rarer."""
        if self.reported or not self.step_seconds or "total" not in timing:
            return None
        total, step = timing["total"], statistics.median(self.step_seconds[-100:])
        if total < self.seconds or total < self.steps * step:
            return None
        self.reported = True
        parts = sorted(((seconds, name) for name, seconds in timing.items() if name in _PARTS), reverse=True)[:2]
        named = ", ".join(f"{_PARTS[name][0]} {seconds:.3g} s" for seconds, name in parts)
        ways = list(dict.fromkeys(_PARTS[name][1] for _, name in parts))
        return (f"LazyTrainingMonitor: a measurement took {total:.3g} s ({named}), the time of {total / step:.0f} "
                f"training steps, and measurements run {when}: pass {'; or '.join(ways)} to make them cheaper, or "
                f"{rarer} to measure less often")
