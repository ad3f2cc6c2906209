"""The monitor says once, in one line, when one measurement costs as much as many training steps (naming the costly
parts and the options that make them cheaper), and never otherwise; what it logs is the same either way."""

from __future__ import annotations

import warnings

import pytest

from lightning_lazy.watch.cost import MeasurementCost


def _cost(step_seconds: list[float], **thresholds: float) -> MeasurementCost:
    cost = MeasurementCost(**thresholds)
    cost.step_seconds = list(step_seconds)
    return cost


def test_costly_measurement_is_named_once_with_its_ways_out() -> None:
    cost = _cost([0.1, 0.2, 0.1])
    timing = {"ntk": 40.0, "hessian_norm": 6.0, "layers": 1.0, "total": 48.0}
    advice = cost.advice(timing, "at steps 1, 2, 4, 8, ... and every epoch end")
    assert advice is not None and "\n" not in advice
    assert "a measurement took 48 s (the empirical NTK 40 s, the ‖D²h‖ search 6 s)" in advice
    assert "the time of 480 training steps" in advice  # 48 s over the median step of 0.1 s
    assert "measure_ntk=False or a smaller ntk_probe_size; or measure_kappa=False or a smaller kappa_probe_size" in advice
    assert "log_steps=None / every_n_epochs=N" in advice
    assert cost.advice(timing, "every epoch end") is None  # once
    again = _cost([0.1]).advice(timing, "every epoch end", rarer="every_n_epochs=N")
    assert again is not None and again.endswith("or every_n_epochs=N to measure less often")


@pytest.mark.parametrize(("steps", "total"), [([0.1], 9.9), ([1.0], 40.0)])
def test_cheap_measurement_says_nothing(steps: list[float], total: float) -> None:
    # Under 10 s, or under 50 training steps: measuring does not dominate the run.
    assert _cost(steps).advice({"ntk": total, "total": total}, "every epoch end") is None


def test_nothing_before_a_training_step() -> None:
    assert MeasurementCost().advice({"ntk": 100.0, "total": 100.0}, "every epoch end") is None


def test_monitor_warns_when_measuring_dominates(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a real fit: with the thresholds at 0 every measurement dominates, and the warning comes once, naming
    when measurements run; with the default thresholds this tiny model's run gets none; both log the same values."""
    import lightning_lazy.watch.cost as cost_module
    from lightning_helpers import Regressor, loaders, trainer

    from lightning_lazy import LazyTrainingMonitor

    captured, histories = [], []
    for seconds in (0.0, 10.0):
        monkeypatch.setattr(cost_module.MeasurementCost.__init__, "__defaults__", (seconds, seconds))
        monitor = LazyTrainingMonitor(figure=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(tmp_path / str(seconds), [monitor], max_epochs=2).fit(Regressor(), *loaders())
        captured.append([str(w.message) for w in caught if "a measurement took" in str(w.message)])
        histories.append(monitor.history)
    assert len(captured[0]) == 1 and "measurements run at steps 1, 2, 4, 8, ... and every epoch end" in captured[0][0]
    assert captured[1] == []
    assert histories[0] == histories[1]
