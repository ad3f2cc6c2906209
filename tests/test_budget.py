"""The measurement budget: LazyTrainingMonitor(budget=0.05) keeps the measurements' share of the fit's wall time
near 5 % by measuring less (the costly parts first), says what it spent and thinned, and logs lazy/cost/share."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import pytorch_lightning as pl

from lightning_lazy import LazyTrainingMonitor
from lightning_lazy.watch.schedule import Budget


# The budget benchmark's models, data and module (benchmarks/budget_share.py), so the test and the benchmark measure
# the same thing.
_spec = importlib.util.spec_from_file_location(
    "budget_share", Path(__file__).resolve().parents[1] / "benchmarks" / "budget_share.py")
budget_share = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(budget_share)
Classifier, _models, _loader = budget_share.Classifier, budget_share.models, budget_share.loader


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "attention"])
def test_the_budget_keeps_the_share_and_says_what_it_thinned(name, tmp_path):
    net, shape = _models()[name]
    monitor = LazyTrainingMonitor(loss="cross_entropy", budget=0.05, probe_size=16, kappa_probe_size=4,
                                  ntk_probe_size=4, figure=False)
    # Many short epochs, each ending in a scheduled measurement: without a budget measuring would dominate.
    pl.Trainer(max_epochs=60, callbacks=[monitor], logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(
        Classifier(net), _loader(shape))
    budget = monitor.core.budget
    scheduled = 60 + 10  # epoch ends and log steps 1, 2, 4, ..., 512 (the last one at fit end is forced)
    assert budget.thinned() > 0, budget.counts
    assert sum(budget.counts.values()) >= scheduled - 6
    # The share the budget keeps: the scheduled measurements' (the whole ones at w0 and at the end come on top).
    assert 0.025 <= budget.scheduled_share() <= 0.075, (budget.scheduled_share(), budget.counts)
    assert budget.spent_share() > budget.scheduled_share() and budget.counts["whole"] >= 2
    assert "Cost: measurements took" in monitor.summary() and "left out" in monitor.summary()
    assert monitor.history[-1]["step"] == 960.0  # the end state, measured whatever the budget


def test_budget_plans():
    budget = Budget(0.5)
    assert budget.plan() == ()  # before the run starts: whole
    budget.start()
    budget.spend(1.0, ())  # a measurement at w0 of 1 s, at once: far over half the time
    leanest = ("kappa", "ntk", "layers")
    assert budget.plan() == leanest  # its cost is not known yet: learned by taking one
    budget.spend(0.5, leanest)
    assert budget.plan() is None  # left out
    with pytest.raises(ValueError, match="budget"):
        Budget(1.5)
    with pytest.raises(ValueError, match="budget"):
        LazyTrainingMonitor(budget=0)


@pytest.mark.parametrize("costliest", ["kappa", "ntk"])
def test_budget_leaves_the_costliest_part_out_first(costliest, monkeypatch):
    """A measurement that would overrun is taken without its costliest part (κ on an MLP, the NTK on a ViT) when the
    rest fits: its cost is the last whole measurement's less that part's, before one is taken; then without the two
    costliest; the summary line counts each."""
    import lightning_lazy.watch.schedule as schedule

    other = "ntk" if costliest == "kappa" else "kappa"
    now = [0.0]
    monkeypatch.setattr(schedule, "perf_counter", lambda: now[0])
    budget = Budget(0.1)
    budget.start()
    budget.spend(1.0, (), {costliest: 0.8, other: 0.1, "layers": 0.05})  # at w0: 1 s, 0.8 s of it the costliest
    assert budget.plans() == [(), (costliest,), (costliest, other), (costliest, other, "layers")]
    assert budget.estimate((costliest,)) == pytest.approx(0.2)
    assert budget.estimate((costliest, other, "layers")) == pytest.approx(0.05)
    now[0] = 15.0  # 1 + 1 > 0.1·16, but 1 + 0.2 <= 0.1·15.2
    assert budget.plan() == (costliest,)
    budget.spend(0.3, (costliest,))
    assert budget.estimate((costliest,)) == 0.3  # learned
    now[0] = 25.0  # 1.3 + 1 <= 0.1·26
    assert budget.plan() == ()
    now[0] = 14.5  # (time only moves forward in a run; here it is set) 1.3 + 0.1 <= 0.1·14.6, 1.3 + 0.3 > 0.1·14.8
    assert budget.plan() == (costliest, other)
    now[0] = 13.6  # only the leanest fits: 1.3 + 0.05 <= 0.1·13.65
    assert budget.plan() == (costliest, other, "layers")
    budget.spend(0.05, (costliest, other, "layers"))
    budget.spend(0.0, None)
    words = {"kappa": "κ", "ntk": "the NTK"}
    assert budget.describe().endswith(f": 1 measured in full, 1 without {words[costliest]}, 1 without κ, the NTK and the "
                                      "per-layer measures, 1 left out"), budget.describe()
    state = budget.state_dict()
    restored = Budget(0.1)
    restored.load_state_dict(state)
    assert restored.counts == budget.counts and restored.estimate((costliest,)) == 0.3
    assert restored.part_seconds == budget.part_seconds and restored.plans() == budget.plans()


def test_the_last_epoch_and_a_monitored_measure_are_measured_in_full(tmp_path):
    """Whatever the budget, the last epoch's measurement is whole (``callback_metrics`` hold the end state after the
    fit), and a measure another callback monitors is there at every epoch end."""
    from pytorch_lightning.callbacks import EarlyStopping

    net, shape = _models()["mlp"]
    for callbacks in ([], [EarlyStopping("lazy/kappa", patience=100, mode="max", check_on_train_epoch_end=True)]):
        monitor = LazyTrainingMonitor(loss="cross_entropy", budget=0.01, probe_size=16, kappa_probe_size=4,
                                      ntk_probe_size=4, figure=False)
        trainer = pl.Trainer(max_epochs=6, callbacks=[monitor, *callbacks], logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(Classifier(net), _loader(shape))
        ends = [entry for entry in monitor.history if entry["step"] % 16 == 0 and entry["step"] > 0]
        if callbacks:
            assert len(ends) == 6 and all("kappa" in entry and "ntk_distance" in entry for entry in ends), ends
        else:
            assert monitor.core.budget.thinned() > 0  # it did thin
        for key in ("lazy/kappa", "lazy/ntk_distance", "lazy/divergence"):
            assert float(trainer.callback_metrics[key]) == pytest.approx(monitor.history[-1][key.split("/", 1)[1]])
        assert monitor.history[-1]["step"] == 96.0


def test_a_resumed_budget_goes_on_from_the_checkpoint_s_time(monkeypatch):
    import lightning_lazy.watch.schedule as schedule

    now = [100.0]
    monkeypatch.setattr(schedule, "perf_counter", lambda: now[0])
    budget = Budget(0.1)
    budget.start()
    budget.spend(1.0, ())
    now[0] = 120.0  # 20 s run, 1 s measured
    state = budget.state_dict()
    now[0] = 5000.0  # another process, another clock
    resumed = Budget(0.1)
    resumed.load_state_dict(state)
    resumed.start()
    assert resumed.spent_share() == pytest.approx(1.0 / 20.0)


def test_an_epoch_end_at_a_measured_step_is_not_counted_again(tmp_path):
    """Log step 8 ends epoch 0 and 16 ends epoch 1: the epoch ends reuse those measurements, which the counts (and the
    summary's Cost line) hold once each, beside the one at w0."""
    net, shape = _models()["mlp"]
    monitor = LazyTrainingMonitor(loss="cross_entropy", budget=None, probe_size=16, kappa_probe_size=4,
                                  ntk_probe_size=4, figure=False)
    pl.Trainer(max_epochs=2, callbacks=[monitor], logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False).fit(Classifier(net), _loader(shape, n=32))
    assert [entry["step"] for entry in monitor.history] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert monitor.core.budget.counts == {"full": 5, "skip": 0, "whole": 1}
    # Without a budget the summary still says what the measurements cost.
    assert "Cost: measurements took" in monitor.summary() and "no budget" in monitor.summary()
