import glob
import io
import math

import numpy as np
import pytest
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from lightning_lazy.watch import report
from lightning_lazy.callback import LazyTrainingMonitor

from helpers_core import taken
from lightning_helpers import Regressor, loaders, trainer

EPOCH_TAGS = [
    "lazy/divergence", "lazy/bound", "lazy/kappa", "lazy/jacobian_norm", "lazy/hessian_norm", "lazy/displacement",
    "lazy/tangent_gap", "lazy/ntk_distance", "lazy/kernel_alignment", "lazy/activation_stability",
    "lazy/normalized_time", "lazy/tangent/train_loss", "lazy/tangent/val_loss",
]


def _events(tmp_path) -> EventAccumulator:
    (path,) = glob.glob(str(tmp_path / "runs" / "version_0" / "events.out.tfevents.*"))
    accumulator = EventAccumulator(path, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard_holds_every_tag_with_finite_values(tmp_path):
    train, val = loaders()
    monitor = LazyTrainingMonitor(log_steps=None)  # epoch ends only: at most one value per epoch
    trainer(tmp_path, [monitor], max_epochs=3).fit(Regressor(alpha=10.0), train, val)
    events = _events(tmp_path)
    scalars = set(events.Tags()["scalars"])
    for tag in EPOCH_TAGS:
        assert tag in scalars, tag
        values = [e.value for e in events.Scalars(tag)]
        # The budget may thin the first two epochs' measurements; the last epoch's is always whole.
        assert 1 <= len(values) <= 3 and all(math.isfinite(v) for v in values), (tag, values)
        # The last epoch end's step (the tangent training loss is logged at every epoch end).
        assert events.Scalars(tag)[-1].step == events.Scalars("lazy/tangent/train_loss")[-1].step, tag
    # The laziness figure (an image at fit end, and at epoch ends while drawing stays under 5 % of the time
    # since the last drawing: never in epochs this short), a PNG, and the summary text.
    assert "lazy/figure" in events.Tags()["images"]
    assert len(events.Images("lazy/figure")) == 1
    assert any("lazy/summary" in tag for tag in events.Tags()["tensors"])
    png = tmp_path / "runs" / "version_0" / "laziness.png"
    assert png.stat().st_size > 10_000
    assert "Regime:" in monitor.summary()
    # Divergence grows from 0 as training leaves the tangent path; the bound is t̃²κ(w0).
    divergence = [e.value for e in events.Scalars("lazy/divergence")]
    assert 0 < divergence[0] <= divergence[-1] < 0.5
    time = [e.value for e in events.Scalars("lazy/normalized_time")]
    bound = [e.value for e in events.Scalars("lazy/bound")]
    assert bound[-1] == pytest.approx(time[-1] ** 2 * monitor.initial_kappa, rel=1e-5)
    assert monitor.laziness_horizon == pytest.approx(monitor.initial_kappa ** -0.5)


def test_figure_files_and_tensorboard_images_are_the_same_pictures(tmp_path):
    # Each figure is drawn and encoded once; the PNG in the log folder and the TensorBoard image are those bytes.
    train, val = loaders()
    monitor = LazyTrainingMonitor(log_steps=None)
    trainer(tmp_path, [monitor], max_epochs=2).fit(Regressor(alpha=10.0), train, val)
    events = _events(tmp_path)
    folder = tmp_path / "runs" / "version_0"
    pictures = {}
    for file, tag in (("laziness.png", "lazy/figure"), ("layers.png", "lazy/layers")):
        (image,) = events.Images(tag)
        shown = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))
        pictures[file] = np.asarray(Image.open(folder / file))
        assert shown.shape == (image.height, image.width, 3) and np.array_equal(pictures[file], shown), file
        assert pictures[file].std() > 10, file  # not a blank canvas
    # The heat map is the monitor's layer history drawn as report.layers_figure draws it, pixel for pixel.
    drawn = report.layers_figure(monitor.layer_history, alpha=10.0, regime=report.classify_regime(monitor.history[-1]),
                                 labels=monitor.core._labels)
    assert np.array_equal(pictures["layers.png"], report.figure_to_array(drawn))
    assert [monitor.core._labels[k] for k in ("0", "2", "4")] == ["0 Linear(6→32)", "2 Linear(32→32)", "4 Linear(32→2)"]


def test_model_linear_in_parameters_has_zero_divergence_through_the_trainer(tmp_path):
    # Momentum, a StepLR schedule and gradient clipping: the twin follows all of them, so for a model linear
    # in its parameters the two paths coincide.
    train, val = loaders(dtype=torch.float64)
    monitor = LazyTrainingMonitor()
    model = Regressor(alpha=3.0, linear_in_params=True).double()
    trainer(tmp_path, [monitor], max_epochs=4, gradient_clip_val=0.05, precision="64-true").fit(model, train, val)
    metrics = trainer_metrics = {k: float(v) for k, v in monitor.measure(model).items() if k != "displacement_per_tensor"}
    assert trainer_metrics["displacement"] > 1e-3
    assert metrics["divergence"] < 1e-10 and metrics["tangent_gap"] < 1e-8


def _measures_after(tmp_path, name, epochs, ckpt_path=None, max_epochs=None):
    train, val = loaders()
    # Runs compared number for number (the kernel's velocity and κ's warm start follow the measurements taken
    # before): without a wall-time budget, which could thin two runs differently.
    monitor = LazyTrainingMonitor(budget=None)
    run = trainer(tmp_path / name, [monitor], max_epochs=max_epochs or epochs)
    run.fit(Regressor(alpha=10.0), train, val, ckpt_path=ckpt_path)
    return run, monitor


def test_resume_from_checkpoint_logs_the_same_values(tmp_path):
    straight, straight_monitor = _measures_after(tmp_path, "straight", 4)
    first, _ = _measures_after(tmp_path, "first", 2)
    checkpoint = first.checkpoint_callback.best_model_path
    assert checkpoint
    resumed, resumed_monitor = _measures_after(tmp_path, "resumed", 4, ckpt_path=checkpoint)
    for key, value in straight.callback_metrics.items():
        if key.startswith("lazy/"):
            assert float(resumed.callback_metrics[key]) == pytest.approx(float(value), rel=1e-5, abs=1e-7), key
    # w0 came from the checkpoint, not from the resumed weights.
    for name, w0 in straight_monitor.measures.initial.items():
        torch.testing.assert_close(resumed_monitor.measures.initial[name], w0)


def test_a_checkpoint_with_sketched_features_loads_weights_only_and_resumes(tmp_path):
    """Module outputs over the sketch size are kept as CountSketches: the checkpoint holds them as plain tensors, so
    it loads with torch.load(weights_only=True), as Lightning loads it to resume."""
    train, val = loaders()
    first = trainer(tmp_path / "first", [LazyTrainingMonitor()], max_epochs=1)
    first.fit(Regressor(alpha=10.0, width=512), train, val)  # 64 probe rows x 512 units > 16384: sketched
    checkpoint = first.checkpoint_callback.best_model_path
    saved = torch.load(checkpoint, weights_only=True)  # raised UnpicklingError on FeatureSketch before

    def sketches(value) -> int:
        if isinstance(value, dict):
            return int(set(value) == {"sketch", "shape"}) + sum(sketches(v) for v in value.values())
        return sum(sketches(v) for v in value) if isinstance(value, (list, tuple)) else 0

    assert sketches(saved["callbacks"]) > 0  # the case this is about: some outputs were sketched
    monitor = LazyTrainingMonitor()
    resumed = trainer(tmp_path / "resumed", [monitor], max_epochs=2)
    resumed.fit(Regressor(alpha=10.0, width=512), train, val, ckpt_path=checkpoint)
    assert monitor.history[-1]["step"] == 16.0
    assert any(key.endswith("feature_movement") for key in resumed.callback_metrics)


def test_gradient_accumulation_steps_the_twin_with_the_optimizer(tmp_path):
    results = []
    for batch_size, accumulate in ((32, 1), (16, 2)):
        train, val = loaders(batch_size=batch_size, dtype=torch.float64)
        monitor = LazyTrainingMonitor()
        model = Regressor(alpha=10.0, scheduler=False).double()
        trainer(tmp_path / str(accumulate), [monitor], max_epochs=2, accumulate_grad_batches=accumulate,
                precision="64-true").fit(model, train, val)
        results.append((monitor, model))
    (mono, model_a), (acc, model_b) = results
    assert mono.core.steps == acc.core.steps == 8
    twin_a, twin_b = mono.twin.parameters(), acc.twin.parameters()
    for name, a in twin_a.items():
        torch.testing.assert_close(a, twin_b[name], rtol=1e-9, atol=1e-12, msg=name)
    assert not torch.equal(twin_a["inner.model.module.0.weight"], mono.measures.initial["inner.model.module.0.weight"])


def test_float64_measures_and_track_tangent_off(tmp_path):
    train, val = loaders(dtype=torch.float64)
    monitor = LazyTrainingMonitor(track_tangent=False)
    run = trainer(tmp_path, [monitor], max_epochs=2, precision="64-true")
    model = Regressor(alpha=100.0)
    run.fit(model, train, val)
    assert monitor.twin is None
    assert monitor.measures.x.dtype == torch.float64
    logged = run.callback_metrics
    assert "lazy/divergence" not in logged and "lazy/tangent/val_loss" not in logged
    for key in ("lazy/kappa", "lazy/displacement", "lazy/ntk_distance", "lazy/activation_stability"):
        assert math.isfinite(float(logged[key])), key


def test_log_spaced_steps(tmp_path):
    train, val = loaders()
    # The schedule itself: no budget to thin it (tests/test_budget.py tests the budget).
    trainer(tmp_path, [LazyTrainingMonitor(log_steps="log", measure_kappa=False, budget=None)], max_epochs=2).fit(
        Regressor(alpha=10.0), train, val)
    steps = [e.step for e in _events(tmp_path).Scalars("lazy/divergence")]
    # After 1, 2, 4, 8 optimizer steps, then the two epoch ends (after 8 and 16 steps), on Lightning's axis (k - 1).
    assert steps == [0, 1, 3, 7, 7, 15, 15], steps  # 16 is also on the log schedule


def test_one_measurement_per_optimizer_step_under_accumulation(tmp_path):
    """The micro-batches of an accumulated step, and an epoch that ends at a log step, share their weights: one
    entry each in the history, and the epoch end logs the values measured at that step (‖D²h‖'s search, a lower
    bound, would give another value at the same weights)."""
    train, val = loaders()
    monitor = LazyTrainingMonitor(log_steps="log", budget=None)  # the schedule itself, not thinned by a budget
    trainer(tmp_path, [monitor], max_epochs=2, accumulate_grad_batches=2).fit(Regressor(alpha=10.0), train, val)
    steps = [entry["step"] for entry in monitor.history]
    assert steps == sorted(set(steps)) == [1.0, 2.0, 4.0, 8.0], steps  # 8 batches an epoch: 4 steps; epoch ends at 4, 8
    events = _events(tmp_path)
    kappas = [e.value for e in events.Scalars("lazy/kappa")]
    assert kappas[2] == kappas[3] and kappas[4] == kappas[5], kappas  # log step 4 and epoch end 1; step 8 and end 2


def test_user_probe_and_batch_to_xy(tmp_path):
    x, y = loaders()[0].dataset.tensors
    dict_loader = DataLoader([{"inputs": a, "targets": b} for a, b in zip(x, y)], batch_size=16)
    monitor = LazyTrainingMonitor(probe=(x[:20], y[:20]), batch_to_xy=lambda b: (b["inputs"], b["targets"]))

    class DictRegressor(Regressor):
        def _loss(self, batch):
            return super()._loss((batch["inputs"], batch["targets"]))

    trainer(tmp_path, [monitor], max_epochs=1).fit(DictRegressor(alpha=10.0), dict_loader)
    assert monitor.measures.x.shape == (20, 6)
    assert torch.isfinite(torch.tensor(monitor.measure()["divergence"]))


# ------------------------------------------------------------------------------------------------- errors


def test_batch_that_is_not_xy_is_a_clear_error(tmp_path):
    x, y = loaders()[0].dataset.tensors
    triples = DataLoader(TensorDataset(x, y, y), batch_size=16)

    class Triple(Regressor):
        def _loss(self, batch):
            return super()._loss(batch[:2])

    with pytest.raises(MisconfigurationException, match="reads batches as \\(x, y\\).*batch_to_xy"):
        trainer(tmp_path, [LazyTrainingMonitor()], max_epochs=1).fit(Triple(), triples)


def test_no_loss_known_is_a_clear_error(tmp_path):
    train, _ = loaders()
    with pytest.raises(MisconfigurationException, match="does not know the loss"):
        trainer(tmp_path, [LazyTrainingMonitor()], max_epochs=1).fit(Regressor(alpha=None), train)
    # With the loss named, a plain (unscaled) model is monitored with alpha = 1.
    monitor = LazyTrainingMonitor(loss="mse")
    trainer(tmp_path / "ok", [monitor], max_epochs=1).fit(Regressor(alpha=None), train)
    assert monitor.core.alpha == 1.0


def test_ambiguous_or_contradicting_alpha_is_a_clear_error(tmp_path):
    from lightning_lazy import AlphaScaled

    train, _ = loaders()
    model = Regressor(alpha=10.0)
    model.extra = AlphaScaled(torch.nn.Linear(2, 2), 5.0)
    with pytest.raises(MisconfigurationException, match="pass LazyTrainingMonitor\\(alpha=...\\)"):
        trainer(tmp_path, [LazyTrainingMonitor()], max_epochs=1).fit(model, train)
    with pytest.raises(MisconfigurationException, match="contradicts"):
        trainer(tmp_path, [LazyTrainingMonitor(alpha=3.0)], max_epochs=1).fit(Regressor(alpha=10.0), train)


def test_several_optimizers_and_manual_optimization_are_refused(tmp_path):
    train, _ = loaders()

    class TwoOptimizers(Regressor):
        def configure_optimizers(self):
            return [torch.optim.SGD(self.parameters(), lr=0.1), torch.optim.SGD(self.parameters(), lr=0.1)]

        def training_step(self, batch, batch_idx):
            return None

    class Manual(Regressor):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(self._loss(batch))
            opt.step()

    # Manual optimization is followed (tests/test_adapters.py checks its numbers); several optimizers have no
    # single tangent path: the twin is refused in one line naming the way out, and without it the fit runs.
    manual = Manual()
    monitor = LazyTrainingMonitor()
    trainer(tmp_path, [monitor], max_epochs=1).fit(manual, train)
    assert monitor.history and "divergence" in monitor.history[-1]
    two = TwoOptimizers()
    two.automatic_optimization = False  # Lightning itself needs manual optimization for several optimizers
    with pytest.raises(MisconfigurationException, match="track_tangent=False"):
        trainer(tmp_path, [LazyTrainingMonitor()], max_epochs=1).fit(two, train)


def test_sharded_strategy_is_refused():
    class FakeFSDPStrategy:
        pass

    class FakeTrainer:
        strategy = FakeFSDPStrategy()

    with pytest.raises(MisconfigurationException, match="sharded strategies"):
        LazyTrainingMonitor().setup(FakeTrainer(), None, "fit")


def test_bad_arguments():
    with pytest.raises(ValueError, match="probe_size"):
        LazyTrainingMonitor(probe_size=0)
    with pytest.raises(ValueError, match="log_steps"):
        LazyTrainingMonitor(log_steps="linear")
    with pytest.raises(ValueError, match="alpha must be"):
        LazyTrainingMonitor(alpha=-1)


def test_float32_batches_under_64_true_precision(tmp_path):
    # The trainer converts inputs to float64 inside training_step; the twin must see them converted too.
    train, val = loaders()  # float32 tensors
    monitor = LazyTrainingMonitor()
    run = trainer(tmp_path, [monitor], max_epochs=1, precision="64-true")
    run.fit(Regressor(alpha=10.0), train, val)
    assert all(p.dtype == torch.float64 for p in monitor.twin.parameters().values())
    assert math.isfinite(float(run.callback_metrics["lazy/tangent/val_loss"]))


# ----------------------------------------------------------------------------------------------- lifecycle


def test_one_monitor_reused_for_fits_of_different_models_starts_afresh(tmp_path):
    train, val = loaders()
    # Two runs compared number for number: without a wall-time budget, which could thin them differently.
    monitor = LazyTrainingMonitor(budget=None)
    trainer(tmp_path / "a", [monitor], max_epochs=2).fit(Regressor(alpha=10.0, width=32), train, val)
    first_probe = monitor.measures.x
    fresh = LazyTrainingMonitor(budget=None)
    trainer(tmp_path / "b", [fresh], max_epochs=1).fit(Regressor(alpha=10.0, width=16, seed=3), train, val)
    trainer(tmp_path / "c", [monitor], max_epochs=1).fit(Regressor(alpha=10.0, width=16, seed=3), train, val)
    # The reused monitor measured the second model from its own w0, exactly as a new monitor did.
    assert monitor.initial_kappa == fresh.initial_kappa
    assert len(monitor.history) == len(fresh.history) == 4  # after steps 1, 2, 4, 8 (log_steps="log"); 8 ends the epoch
    for key, value in fresh.history[-1].items():
        assert monitor.history[-1][key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
    assert torch.equal(monitor.measures.x, first_probe)  # same train set, same private generator


def test_validate_from_a_checkpoint_in_a_fresh_trainer_evaluates_the_saved_twin(tmp_path):
    train, val = loaders()
    fitted = trainer(tmp_path / "fit", [LazyTrainingMonitor()], max_epochs=2)
    model = Regressor(alpha=10.0)
    fitted.fit(model, train, val)
    expected = fitted.validate(model, val, verbose=False)[0]["lazy/tangent/val_loss"]
    checkpoint = fitted.checkpoint_callback.best_model_path
    fresh = trainer(tmp_path / "test", [LazyTrainingMonitor()], max_epochs=1)
    result = fresh.validate(Regressor(alpha=10.0), val, ckpt_path=checkpoint, verbose=False)[0]
    assert result["lazy/tangent/val_loss"] == pytest.approx(expected, rel=1e-6)
    # Without a checkpoint there is no twin to evaluate: one warning says why.
    with pytest.warns(UserWarning, match="no tangent twin to evaluate"):
        trainer(tmp_path / "none", [LazyTrainingMonitor()]).validate(Regressor(alpha=10.0), val, verbose=False)


class _MSEModule(Regressor):
    def __init__(self, loss):
        super().__init__(alpha=None)
        self.training_loss = loss

    def _loss(self, batch):
        x, y = batch
        return self.training_loss(self(x), y)


def test_a_monitor_told_another_loss_than_training_step_uses_warns_once(tmp_path):
    train, val = loaders()
    with pytest.warns(UserWarning, match=r"another objective than yours \(its loss on the first batch is .*, the training step's"):
        # torch's summed squared error is not this package's "mse" (half of it, averaged over examples)
        trainer(tmp_path / "a", [LazyTrainingMonitor("mse")], max_epochs=1).fit(
            _MSEModule(lambda out, y: torch.nn.functional.mse_loss(out, y, reduction="sum")), train, val)
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*twin's loss.*")
        trainer(tmp_path / "b", [LazyTrainingMonitor(torch.nn.functional.mse_loss)], max_epochs=1).fit(
            _MSEModule(torch.nn.functional.mse_loss), train, val)


def test_a_loss_with_sample_weights_from_the_batch(tmp_path):
    x, y = loaders()[0].dataset.tensors
    weights = torch.rand(len(x), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(x, y, weights), batch_size=16)

    def weighted(output, target, weight):
        return (weight * 0.5 * (output - target).pow(2).sum(1)).mean()

    class Weighted(Regressor):
        def _loss(self, batch):
            x, y, w = batch
            return weighted(self(x), y, w)

    monitor = LazyTrainingMonitor(weighted, batch_to_xy=lambda b: (b[0], b[1], {"weight": b[2]}))
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*twin's loss.*")
        trainer(tmp_path, [monitor], max_epochs=1).fit(Weighted(alpha=None), loader)
    assert math.isfinite(monitor.history[-1]["divergence"])


def test_backbone_put_in_eval_by_a_hook_at_learning_rate_0_moves_nothing(tmp_path):
    # The usual fine-tuning idiom: the pretrained backbone (BatchNorm with its own statistics) goes to eval in
    # on_train_epoch_start, after the monitor's on_train_start; validation runs every epoch.
    class FineTune(Regressor):
        def __init__(self):
            super().__init__(alpha=None, lr=0.0)
            self.backbone = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU())
            with torch.no_grad():
                self.backbone[1].running_mean.uniform_(-1, 1)
                self.backbone[1].running_var.uniform_(0.5, 2)
            self.backbone.requires_grad_(False)
            self.model = torch.nn.Linear(16, 2)

        def forward(self, x):
            return self.model(self.backbone(x))

        def on_train_epoch_start(self):
            self.backbone.eval()

    train, val = loaders()
    monitor = LazyTrainingMonitor("mse")
    trainer(tmp_path, [monitor], max_epochs=2).fit(FineTune(), train, val)
    assert all(value == 0.0 for _, value in taken(monitor.history, "divergence", "ntk_distance"))
    assert all(entry["activation_stability"] == 1.0 for entry in monitor.history)
    assert all(value == pytest.approx(1.0, abs=1e-6) for _, value in taken(monitor.history, "kernel_alignment"))


def test_several_inputs_as_x_get_a_clear_error(tmp_path):
    x, y = loaders()[0].dataset.tensors
    loader = DataLoader(TensorDataset(x, x, y), batch_size=16)

    class TwoInputs(Regressor):
        def _loss(self, batch):
            return super()._loss((batch[0], batch[2]))

    monitor = LazyTrainingMonitor(batch_to_xy=lambda b: ((b[0], b[1]), b[2]))
    with pytest.raises(MisconfigurationException, match=r"x must be a tensor \[N, ...\] or a dict of tensors.*stack them"):
        trainer(tmp_path, [monitor], max_epochs=1).fit(TwoInputs(alpha=10.0), loader)
