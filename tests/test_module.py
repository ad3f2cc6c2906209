"""LazyClassifier: the three modes, its objective, optimizer and schedule, logging, double precision."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from lightning_lazy.data.cifar10 import SyntheticCIFAR10DataModule
from lightning_lazy.models.resnet import ResNet18
from lightning_lazy.models.vgg import VGG11
from lightning_lazy.module import InverseTimeLR, LazyClassifier
from lightning_lazy.scaling import AlphaScaled
from lightning_lazy.tangent import LinearizedModel


def tiny_vgg(seed: int = 0) -> VGG11:
    torch.manual_seed(seed)
    return VGG11(base_width=2)


def quiet_trainer(**kwargs: object) -> pl.Trainer:
    return pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, **kwargs)


def fixed_batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    dm = SyntheticCIFAR10DataModule(num_train=n, num_test=8, augment=False, batch_size=n)
    dm.setup()
    return next(iter(dm.train_dataloader()))


def test_standard_mode_is_the_backbone() -> None:
    backbone = tiny_vgg()
    model = LazyClassifier(backbone, mode="standard")
    x = torch.randn(3, 3, 32, 32)
    assert model.backbone is backbone
    assert isinstance(model.model, AlphaScaled) and model.model.alpha == 1.0 and not model.model.center
    assert torch.equal(model(x), backbone(x))  # 1.0 * f(x) is f(x), bit for bit
    assert model.initial_params() is None


def test_lazy_mode_is_centred_and_scaled() -> None:
    model = LazyClassifier(tiny_vgg(), mode="lazy", alpha=50.0)
    assert isinstance(model.model, AlphaScaled) and model.model.alpha == 50.0 and model.model.center
    x = torch.randn(3, 3, 32, 32)
    assert torch.count_nonzero(model(x)) == 0  # h(w0) = 0 exactly
    with torch.no_grad():
        model.backbone.classifier.bias.add_(0.01)
    torch.testing.assert_close(model(x), torch.full((3, 10), 0.5))  # α · 0.01
    assert set(model.initial_params()) == {n for n, _ in model.backbone.named_parameters()}


def test_linearized_mode_is_the_centred_tangent_model() -> None:
    backbone = tiny_vgg()
    model = LazyClassifier(backbone, mode="linearized")
    assert isinstance(model.model, LinearizedModel)
    assert model.backbone is not backbone  # LinearizedModel trains its own copy
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    model.double()
    assert torch.count_nonzero(model(x)) == 0
    # After a parameter change v, the output is exactly J(w0) v, linear in v: doubling v doubles it.
    direction = {n: 1e-3 * torch.randn_like(p) for n, p in model.backbone.named_parameters()}
    with torch.no_grad():
        for n, p in model.backbone.named_parameters():
            p.add_(direction[n])
    once = model(x)
    with torch.no_grad():
        for n, p in model.backbone.named_parameters():
            p.add_(direction[n])
    torch.testing.assert_close(model(x), 2 * once)
    assert once.abs().max() > 0
    assert set(model.initial_params()) == {n for n, _ in model.backbone.named_parameters()}


@pytest.mark.parametrize(("mode", "alpha", "loss"), [("standard", 1.0, "mse"), ("lazy", 10.0, "mse"),
                                                     ("linearized", 1.0, "mse"), ("lazy", 3.0, "cross_entropy")])
def test_each_mode_trains(mode: str, alpha: float, loss: str) -> None:
    x, y = fixed_batch()
    model = LazyClassifier(tiny_vgg(), mode=mode, alpha=alpha, loss=loss, lr=0.2, lr_decay=0.0)
    optimizer = model.configure_optimizers()["optimizer"]
    risks = []
    for _ in range(15):
        optimizer.zero_grad()
        output = model(x)
        risk, objective = model.losses(output, y)
        objective.backward()
        optimizer.step()
        risks.append(risk.item())
    assert risks[-1] < 0.9 * risks[0], risks


def test_lazy_objective_is_risk_over_alpha_squared() -> None:
    x, y = fixed_batch(8)
    model = LazyClassifier(tiny_vgg(), mode="lazy", alpha=7.0)
    with torch.no_grad():
        model.backbone.classifier.bias.add_(0.1)  # move off w0 so the risk is not the constant 0.5
    risk, objective = model.losses(model(x), y)
    torch.testing.assert_close(risk, model.risk(model(x), y))
    torch.testing.assert_close(objective, risk / 49.0)
    # Every output is α · 0.1 = 0.7: R = ½ (0.3² + 9 · 0.7²) = 2.25 for any one-hot target.
    torch.testing.assert_close(risk.item(), 2.25)


def test_linearized_is_the_large_alpha_limit_of_lazy() -> None:
    """Same batches, same SGD: lazy training approaches the linearized run as α grows (gap O(1/α))."""

    def run(mode: str, alpha: float) -> torch.Tensor:
        pl.seed_everything(0)
        model = LazyClassifier(tiny_vgg(1), mode=mode, alpha=alpha, lr=0.1)
        dm = SyntheticCIFAR10DataModule(num_train=32, num_test=8, batch_size=8, augment=False)
        quiet_trainer(max_steps=4, precision="64-true", num_sanity_val_steps=0, limit_val_batches=0).fit(model, dm)
        probe = torch.randn(8, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            return model.eval()(probe)

    linear = run("linearized", 1.0)
    assert linear.norm() > 0.1
    gaps = {a: ((run("lazy", a) - linear).norm() / linear.norm()).item() for a in (1.0, 30.0, 3000.0)}
    # Measured here: 0.27, 0.053, 5.4e-4. Pre-asymptotically the gap falls more slowly than 1/α; from
    # α = 30 on, a factor 100 in α gives about 100 in the gap.
    assert gaps[1.0] > 0.1, gaps  # at α = 1 the network is far from its linearization
    assert gaps[3000.0] < gaps[30.0] / 30 < gaps[1.0] / 30, gaps
    assert gaps[3000.0] < 2e-3, gaps


def test_default_optimizer_and_schedule_are_the_papers() -> None:
    model = LazyClassifier(tiny_vgg(), lr=0.3)
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["momentum"] == 0.9 and optimizer.param_groups[0]["weight_decay"] == 0.0
    assert scheduler["interval"] == "epoch" and isinstance(scheduler["scheduler"], InverseTimeLR)
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler["scheduler"].step()
    assert lrs == pytest.approx([0.3, 0.3 / (1 + 1 / 3), 0.3 / (1 + 2 / 3), 0.3 / 2])


def test_optimizer_and_scheduler_from_configuration() -> None:
    model = LazyClassifier(
        tiny_vgg(),
        mode="lazy",
        alpha=4.0,
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-3),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2),
    )
    config = model.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.Adam)
    assert isinstance(config["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    # Only w is trained: the frozen copy of w0 is not handed to the optimizer.
    trained = {id(p) for g in config["optimizer"].param_groups for p in g["params"]}
    assert trained == {id(p) for p in model.backbone.parameters()}


def test_fit_logs_losses_and_accuracies_and_decays_lr() -> None:
    pl.seed_everything(0)
    dm = SyntheticCIFAR10DataModule(num_train=32, num_test=16, batch_size=16)
    model = LazyClassifier(ResNet18(base_width=2), mode="lazy", alpha=10.0, lr=0.02)
    trainer = quiet_trainer(max_epochs=3)
    trainer.fit(model, dm)
    metrics = dict(trainer.callback_metrics)
    trainer.test(model, dm, verbose=False)
    metrics.update(trainer.callback_metrics)
    for key in ("train/loss_epoch", "train/acc", "train/objective", "val/loss", "val/acc", "test/loss", "test/acc"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert 0 <= float(metrics["test/acc"]) <= 1
    torch.testing.assert_close(float(metrics["train/objective"]), float(metrics["train/loss_epoch"]) / 100.0,
                               rtol=1e-5, atol=0)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.02 / (1 + 3 / 3))


def test_double_precision_with_alpha_1e7() -> None:
    pl.seed_everything(0)
    dm = SyntheticCIFAR10DataModule(num_train=16, num_test=8, batch_size=8)
    model = LazyClassifier(tiny_vgg(), mode="lazy", alpha=1e7, lr=0.5)
    trainer = quiet_trainer(max_epochs=1, precision="64-true")
    trainer.fit(model, dm)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert all(b.dtype == torch.float64 for b in model.model.initial.as_dict().values())
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss_epoch"]) and torch.isfinite(metrics["val/loss"])
    # The weights moved, by O(1/α): resolvable in float64, lost in float32 (eps 6e-8 relative).
    w = torch.cat([p.flatten() for p in model.backbone.parameters()])
    w0 = torch.cat([p.flatten() for p in model.initial_params().values()])
    moved = ((w - w0).norm() / w0.norm()).item()
    assert 0 < moved < 1e-4
    # The scaled model's output is O(1), not O(α) nor 0: lazy training did fit something.
    x = dm.split("test")[0].double() / 255
    out = model.eval()(x)
    assert 1e-4 < out.abs().max().item() < 10


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mode"):
        LazyClassifier(tiny_vgg(), mode="kernel")
    with pytest.raises(ValueError, match="alpha"):
        LazyClassifier(tiny_vgg(), mode="lazy", alpha=0.0)
    with pytest.raises(ValueError, match="loss"):
        LazyClassifier(tiny_vgg(), loss="hinge")
    with pytest.raises(ValueError, match="num_classes"):
        LazyClassifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3072, 10)))
    with pytest.raises(TypeError, match="nn.Module"):
        LazyClassifier("vgg11")
    with pytest.raises(ValueError, match="lr"):
        LazyClassifier(tiny_vgg(), lr=-1.0)
    with pytest.warns(UserWarning, match="no effect"):
        LazyClassifier(tiny_vgg(), mode="standard", alpha=100.0)


def test_diverging_run_stops_with_advice() -> None:
    x, y = fixed_batch(4)
    model = LazyClassifier(tiny_vgg(), mode="standard")
    with torch.no_grad():
        model.backbone.classifier.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="lower lr"):
        model.training_step((x, y), 0)


def test_linearized_evaluation_matches_its_training_output() -> None:
    """Lightning evaluates under inference mode, where forward-mode AD is off: the tangent must survive."""
    pl.seed_everything(0)
    dm = SyntheticCIFAR10DataModule(num_train=16, num_test=8, batch_size=8, augment=False)
    model = LazyClassifier(tiny_vgg(), mode="linearized", lr=0.2)
    trainer = quiet_trainer(max_epochs=2)
    trainer.fit(model, dm)
    tested = trainer.test(model, dm, verbose=False)[0]
    x, y = dm.split("test")
    from lightning_lazy.data.cifar10 import normalize_images

    with torch.no_grad():
        output = model(normalize_images(x, dm.mean, dm.std))
    assert output.abs().max() > 1e-3  # the trained tangent model is not the zero function
    assert tested["test/loss"] == pytest.approx(model.risk(output, y).item(), rel=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(model(normalize_images(x, dm.mean, dm.std)), output)


def test_linearized_model_under_torch_func_transforms() -> None:
    """The monitor's diagnostics differentiate forward() with torch.func (jvp/vjp): the tangent model must
    allow that, and at w0 its Jacobian is the centred network's, Dh(w0)."""
    from lightning_lazy import diagnostics

    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    linear = LazyClassifier(tiny_vgg(3), mode="linearized").double()
    lazy = LazyClassifier(tiny_vgg(3), mode="lazy", alpha=1.0).double()
    norms = [diagnostics.jacobian_norm(m, x, tol=1e-10).item() for m in (linear, lazy)]
    assert norms[0] > 0
    assert norms[0] == pytest.approx(norms[1], rel=1e-6)
    # Moving w does not change the tangent model's Jacobian (it is J(w0)); it does change the network's.
    with torch.no_grad():
        for m in (linear, lazy):
            for p in m.backbone.parameters():
                p.mul_(1.5)
    moved = [diagnostics.jacobian_norm(m, x, tol=1e-10).item() for m in (linear, lazy)]
    assert moved[0] == pytest.approx(norms[0], rel=1e-6)
    assert abs(moved[1] / norms[1] - 1) > 0.1


def test_linearized_mode_fits_with_the_monitor() -> None:
    """The monitor's twin is the tangent model of a module that is already linear in its parameters (issue 9:
    it used to fail with "Nested forward mode AD is not supported"): the twin is that module, so it follows
    the same path, Δ = 0, and ‖D²h‖ = 0."""
    from lightning_lazy import LazyTrainingMonitor

    pl.seed_everything(0)
    dm = SyntheticCIFAR10DataModule(num_train=32, num_test=16, batch_size=16, augment=False)
    model = LazyClassifier(tiny_vgg(), mode="linearized", lr=0.1)
    monitor = LazyTrainingMonitor(probe_size=16, kappa_probe_size=4, ntk_probe_size=4)
    trainer = quiet_trainer(max_epochs=2, callbacks=[monitor])
    trainer.fit(model, dm)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert metrics["lazy/displacement"] > 1e-3, "it trained"
    assert metrics["lazy/divergence"] < 1e-5
    assert metrics["lazy/hessian_norm"] < 1e-5 * metrics["lazy/jacobian_norm"]
    assert metrics["lazy/tangent/train_loss"] == pytest.approx(metrics["train/loss_epoch"], rel=1e-4)
