"""The monitor under training machinery it did not write: the twin's side (issue 16).

For each kind of machinery, the three rules, over more than one model:

1. The monitor never changes the real run: same seed, bit-identical real weights with and without it.
2. Every logged number is right, or it is not logged: where the twin follows, a model linear in its trained
   parameters (float64) keeps Δ ≤ 1e-10 and lr = 0 gives zero distances; where it cannot, one warning names the
   cause and no twin-based measure is logged after it, while the other measures go on.
3. A refusal is one line raised from lightning_lazy.
"""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers_core import FrozenFeatures, taken

from lightning_lazy import LazyTrainingMonitor
from lightning_lazy.watch.twin import TangentTwin, Watched

N, D, K = 32, 6, 3
TWIN_MEASURES = ("divergence", "tangent_gap")


def linear_net() -> nn.Module:
    return nn.Sequential(FrozenFeatures(D, 12), nn.Linear(12, K))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(D, 12), nn.Tanh(), nn.Linear(12, K))


NETS = {"linear": linear_net, "mlp": mlp, "regression": lambda: nn.Sequential(nn.Linear(D, K))}


class Module(pl.LightningModule):
    """A regression module; ``optimizer(params, lr)`` builds its optimizer, ``hooks`` are overrides by name."""

    def __init__(self, net: str | type[nn.Module], lr: float = 0.05, optimizer=None, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = (NETS[net] if isinstance(net, str) else net)().double()
        self.lr = lr
        self.make_optimizer = optimizer or (lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return 0.5 * (self(x) - y).pow(2).sum(1).mean()

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", 0.5 * (self(x) - y).pow(2).sum(1).mean())

    def configure_optimizers(self):
        return self.make_optimizer([p for p in self.parameters() if p.requires_grad], self.lr)


def data(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=generator, dtype=torch.float64)
    return x, torch.randn(N, K, generator=generator, dtype=torch.float64)


def fit(module: pl.LightningModule, monitored: bool, tmp_path, *, epochs: int = 2, compiled: bool = False,
        callbacks: tuple = (), budget: float | None = 0.05, **trainer_options):
    """Fit ``module`` (through ``torch.compile`` if ``compiled``), with or without a monitor (``budget``: its
    measurement budget); returns the monitor and the warnings the fit raised."""
    x, y = data()
    torch.manual_seed(123)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    monitor = (LazyTrainingMonitor("mse", probe=(x[:16], y[:16]), kappa_probe_size=4, ntk_probe_size=4, figure=False,
                                   budget=budget) if monitored else None)
    callbacks = callbacks() if callable(callbacks) else callbacks  # a factory: fresh callbacks for every fit
    options = dict(max_epochs=epochs, callbacks=[*([monitor] if monitor else []), *callbacks], accelerator="cpu",
                   devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=str(tmp_path), precision="64-true")
    options.update(trainer_options)
    val = options.pop("val_dataloaders", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pl.Trainer(**options).fit(torch.compile(module) if compiled else module, loader, val)
    return monitor, [str(w.message) for w in caught if "LazyTrainingMonitor" in str(w.message)]


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_run(make, tmp_path, **options):
    """Rule 1: the same seed gives bit-identical weights with and without the monitor."""
    watched, plain = make(), make()
    monitor, said = fit(watched, True, tmp_path / "with", **options)
    fit(plain, False, tmp_path / "without", **options)
    for (key, a), b in zip(weights(watched).items(), weights(plain).values()):
        assert torch.equal(a, b), f"{key} differs with the monitor"
    return monitor, said


def assert_followed(monitor, said, linear: bool):
    """Rule 2 where the twin follows: no warning, the twin measures logged, Δ at round-off for a linear model."""
    assert not [s for s in said if "no longer logged" in s], said
    last = monitor.history[-1]
    assert last["displacement"] > 0
    if linear:
        assert last["divergence"] <= 1e-10, last
        assert last["tangent_gap"] <= 1e-7, last


def assert_zero_at_lr0(monitor):
    for key, value in taken(monitor.history, "divergence", "tangent_gap", "displacement", "ntk_distance"):
        assert value == 0.0, (key, value)


def assert_reported(monitor, said, cause: str):
    """Rule 2 where the twin cannot follow: one warning naming the cause; no twin measure after it, others go on."""
    lost = [s for s in said if "no longer logged" in s]
    assert len(lost) == 1, said
    assert cause in lost[0], lost[0]
    assert "\n" not in lost[0]
    assert monitor.twin.lost is not None
    after = [entry for entry in monitor.history if entry["step"] >= monitor.twin.lost_at]
    assert after, "the run must measure after the twin was lost"
    for entry in after:
        assert not set(TWIN_MEASURES) & set(entry), entry
        assert "displacement" in entry
    assert "ntk_distance" in after[-1]  # the end state, whole whatever the budget thinned
    assert "stopped following" in monitor.summary()


# ------------------------------------------------------------------------------------------ torch.compile


class Compiled(Module):
    """The network compiled as a sub-module (``self.net = torch.compile(net)``)."""

    def __init__(self, net: str, compile_net: bool, **kwargs) -> None:
        super().__init__(net, **kwargs)
        if compile_net:
            self.net = torch.compile(self.net)


@pytest.mark.parametrize("how,net", [("whole", "linear"), ("sub", "mlp")])
def test_a_compiled_module_gives_the_eager_numbers_and_leaves_the_real_run_untouched(how, net, tmp_path):
    # trainer.fit(torch.compile(module)), as Lightning documents it, and a compiled sub-module, each against the
    # same model run eagerly (one compiled fit each: inductor takes most of the time). The real weights are those
    # of the eager run (to float tolerance: compiled kernels round differently), not those of a run at twice the
    # learning rate; the measures are the eager run's.
    # Compared number for number (κ's warm start follows the measurements taken before): without a wall-time
    # budget, which would thin the slower compiled run differently.
    eager = Compiled(net, False)
    eager_monitor, _ = fit(eager, True, tmp_path / "eager", budget=None)
    module = Compiled(net, how == "sub")
    monitor, said = fit(module, True, tmp_path / how, compiled=how == "whole", budget=None)
    assert_followed(monitor, said, linear=net == "linear")
    for (key, a), b in zip(weights(eager).items(), weights(module).values()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=f"{key} differs from the eager run")
    for key in ("divergence", "tangent_gap", "displacement", "ntk_distance", "kappa"):
        assert monitor.history[-1][key] == pytest.approx(eager_monitor.history[-1][key], rel=1e-6, abs=1e-10), key


def test_compiled_dropout_is_reported():
    # Inductor draws its own random numbers: the twin cannot replay a compiled forward's dropout masks. (Nothing is
    # compiled here: the twin is built and checked, never run.)
    net = torch.compile(nn.Sequential(nn.Linear(D, 8), nn.Dropout(0.2), nn.Linear(8, K)))
    twin = TangentTwin(Watched(net), torch.optim.SGD(net.parameters(), lr=0.1), lambda out, y: out.sum())
    cause, remedy = twin.check()
    assert "compiled OptimizedModule applies Dropout" in cause and "fallback_random" in remedy
    plain = nn.Sequential(nn.Linear(D, 8), nn.Dropout(0.2), nn.Linear(8, K))
    assert TangentTwin(Watched(plain), torch.optim.SGD(plain.parameters(), lr=0.1), lambda out, y: out.sum()).check() is None


class Closure(nn.Module):
    """A network that reaches a layer through a closure as well: a copy of it still calls the original layer."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(D, K)
        head = self.head
        self.apply_head = lambda x: head(x)

    def forward(self, x):
        return self.apply_head(x)


def test_a_twin_whose_backward_would_reach_the_real_gradients_is_refused(tmp_path):
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    module, plain = Module(Closure), Module(Closure)
    before = weights(module)
    with pytest.raises(MisconfigurationException, match="LazyTrainingMonitor: .*shares a tensor with the network") as info:
        fit(module, True, tmp_path)
    assert "\n" not in str(info.value) and "'net.head.weight' (Linear)" in str(info.value)
    # Refused at the first batch, before the real optimizer stepped: the real weights never moved.
    for key, value in before.items():
        assert torch.equal(weights(module)[key], value), key
    fit(plain, False, tmp_path / "without")  # the same model trains without the monitor


class Uncopyable(torch.optim.SGD):
    """An optimizer holding an object that cannot be deep-copied (a lock)."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        import threading

        self.lock = threading.Lock()


def test_an_optimizer_that_cannot_be_copied_is_refused_in_one_line(tmp_path):
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    module = Module("linear", optimizer=lambda params, lr: Uncopyable(params, lr))
    with pytest.raises(MisconfigurationException, match="LazyTrainingMonitor: .*optimizer Uncopyable.*switch the twin off"
                       ) as info:
        fit(module, True, tmp_path)
    assert "\n" not in str(info.value)


# -------------------------------------------------------------------------------------------- optimizers


class NeedsScale(torch.optim.SGD):
    """An optimizer whose constructor has a required argument that is not among its defaults."""

    def __init__(self, params, scale: float, lr: float) -> None:
        super().__init__(params, lr=lr * scale, momentum=0.5)


def _lookahead(params, lr):
    from timm.optim import Lookahead

    return Lookahead(torch.optim.SGD(params, lr=lr, momentum=0.9), alpha=0.5, k=3)


def _schedulefree(kind: str):
    def make(params, lr):
        import schedulefree

        if kind == "sgd":
            return schedulefree.SGDScheduleFree(params, lr=lr, momentum=0.9, warmup_steps=2)
        return schedulefree.AdamWScheduleFree(params, lr=lr * 0.1, warmup_steps=2, weight_decay=0.01)
    return make


OPTIMIZERS = {
    "required_argument": lambda params, lr: NeedsScale(params, 0.5, lr),
    "lookahead": _lookahead,
    "schedulefree_sgd": _schedulefree("sgd"),
    "schedulefree_adamw": _schedulefree("adamw"),
    "adamw_amsgrad": lambda params, lr: torch.optim.AdamW(params, lr=lr * 0.1, amsgrad=True, weight_decay=0.1),
}


class TrainEval(Module):
    """Calls ``optimizer.train()`` / ``eval()`` as schedule-free optimizers require (and others accept)."""

    def _switch(self, mode: str) -> None:
        optimizer = self.optimizers().optimizer
        if hasattr(optimizer, mode):
            getattr(optimizer, mode)()

    def on_train_epoch_start(self):
        self._switch("train")

    def on_train_epoch_end(self):
        self._switch("eval")


@pytest.mark.parametrize("net", ["linear", "mlp"])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_any_optimizer_is_copied_with_its_state_and_groups(optimizer, net, tmp_path):
    # The twin measures run at epoch ends, after optimizer.eval() (schedule-free: the averaged weights).
    make = lambda lr=0.05: TrainEval(net, lr=lr, optimizer=OPTIMIZERS[optimizer])  # noqa: E731
    monitor, said = assert_same_run(make, tmp_path, epochs=3)
    assert_followed(monitor, said, linear=net == "linear")
    assert monitor.core.steps == 12
    if net == "linear":
        frozen, said = fit(make(0.0), True, tmp_path / "lr0")
        assert not [s for s in said if "no longer logged" in s], said
        assert_zero_at_lr0(frozen)


class DeferredSGD(torch.optim.SGD):
    """Applies each step's update at the next zero_grad: the weights move where no step hook sees them."""

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.pending = [(p, -self.param_groups[0]["lr"] * p.grad.clone()) for g in self.param_groups
                        for p in g["params"] if p.grad is not None]
        return loss

    def zero_grad(self, set_to_none: bool = True):
        with torch.no_grad():
            for p, update in getattr(self, "pending", []):
                p.add_(update)
        self.pending = []
        super().zero_grad(set_to_none)


@pytest.mark.parametrize("net", ["linear", "regression"])  # (a weight written before backward breaks others' graph)
def test_an_optimizer_that_moves_weights_outside_its_step_is_reported(net, tmp_path):
    make = lambda: Module(net, optimizer=lambda params, lr: DeferredSGD(params, lr=lr))  # noqa: E731
    monitor, said = assert_same_run(make, tmp_path)
    assert_reported(monitor, said, "was written")
    assert "'net.1.weight' (Linear)" in monitor.twin.lost or "'net.0.weight' (Linear)" in monitor.twin.lost


class StepsTheInnerOptimizer(Module):
    """Steps the base optimizer inside Lookahead itself (an optimizer_step override): no step of the optimizer
    Lightning holds is seen, and the weights move."""

    def __init__(self, net: str, **kwargs) -> None:
        super().__init__(net, optimizer=_lookahead, **kwargs)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        optimizer.optimizer._base_optimizer.step(closure=optimizer_closure)


@pytest.mark.parametrize("net", ["linear", "mlp"])
def test_a_step_that_bypasses_the_optimizer_s_hooks_is_reported(net, tmp_path):
    monitor, said = assert_same_run(lambda: StepsTheInnerOptimizer(net), tmp_path)
    assert_reported(monitor, said, "was written between the optimizer's steps")
    assert "step() whose step hooks did not run" in monitor.twin.lost


# ------------------------------------------------------------------------- gradients between backward and step


class ClipsItself(Module):
    """Overrides configure_gradient_clipping: through Lightning's clip_gradients (replayable), or on its own
    parameters (not replayable)."""

    def __init__(self, net: str, how: str, **kwargs) -> None:
        super().__init__(net, **kwargs)
        self.how = how

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.how == "lightning":
            self.clip_gradients(optimizer, gradient_clip_val=0.02, gradient_clip_algorithm="norm")
        else:
            torch.nn.utils.clip_grad_norm_(self.parameters(), 0.02)


class EditsGradients(Module):
    def __init__(self, net: str, where: str, **kwargs) -> None:
        super().__init__(net, **kwargs)
        self.where = where
        if where == "register_hook":
            self.net[-1].weight.register_hook(lambda grad: grad * 0.5)

    def _halve(self) -> None:
        self.net[-1].weight.grad.mul_(0.5)

    def on_after_backward(self):
        if self.where == "on_after_backward":
            self._halve()
        if self.where == "grad.data":  # through .data: no version counter moves
            self.net[-1].weight.grad.data.mul_(0.5)

    def on_before_optimizer_step(self, optimizer):
        if self.where == "on_before_optimizer_step":
            self._halve()


@pytest.mark.parametrize("net", ["linear", "mlp"])
def test_configure_gradient_clipping_through_clip_gradients_is_followed(net, tmp_path):
    make = lambda lr=0.05: ClipsItself(net, "lightning", lr=lr)  # noqa: E731
    monitor, said = assert_same_run(make, tmp_path)
    assert_followed(monitor, said, linear=net == "linear")
    frozen, said = fit(make(0.0), True, tmp_path / "lr0")
    assert_zero_at_lr0(frozen)


@pytest.mark.parametrize("net", ["linear", "mlp"])
def test_trainer_clipping_with_amp_style_scaling_stays_followed(net, tmp_path):
    make = lambda: Module(net)  # noqa: E731
    monitor, said = assert_same_run(make, tmp_path, gradient_clip_val=0.02, accumulate_grad_batches=2)
    assert_followed(monitor, said, linear=net == "linear")


@pytest.mark.parametrize("where", ["configure_gradient_clipping", "on_after_backward", "on_before_optimizer_step",
                                   "grad.data", "register_hook"])
@pytest.mark.parametrize("net", ["linear", "mlp"])
def test_gradients_changed_between_backward_and_step_are_reported(where, net, tmp_path):
    if where == "configure_gradient_clipping":
        make = lambda: ClipsItself(net, "own_parameters")  # noqa: E731
    else:
        make = lambda: EditsGradients(net, where)  # noqa: E731
    monitor, said = assert_same_run(make, tmp_path)
    assert_reported(monitor, said, "register_hook" if where == "register_hook" else "changed between backward")
    assert monitor.twin.lost_at == 1  # found at the first step: nothing twin-based was ever logged
    if where != "configure_gradient_clipping":  # (clipping by the total norm changes every gradient)
        assert f"'net.{len(monitor.core._watched.inner.net) - 1}.weight' (Linear)" in monitor.twin.lost


# --------------------------------------------------------------------------------- weights written outside


class Shrinks(Module):
    """A hook that shrinks a weight in place after each batch (weight decay written by hand), in place under
    no_grad or through ``.data`` (which moves no version counter)."""

    def __init__(self, net: str, through_data: bool = False, **kwargs) -> None:
        super().__init__(net, **kwargs)
        self.through_data = through_data

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.through_data:
            self.net[-1].weight.data.mul_(0.99)
            return
        with torch.no_grad():
            self.net[-1].weight.mul_(0.99)


@pytest.mark.parametrize("through_data", [False, True], ids=["no_grad", "data"])
@pytest.mark.parametrize("net", ["linear", "mlp"])
def test_weights_written_by_a_hook_are_reported(net, through_data, tmp_path):
    monitor, said = assert_same_run(lambda: Shrinks(net, through_data), tmp_path)
    where = "outside the optimizer's update" if through_data else "was written between the optimizer's steps"
    assert_reported(monitor, said, where)
    assert f"'net.{len(monitor.core._watched.inner.net) - 1}.weight' (Linear)" in monitor.twin.lost
    assert monitor.twin.lost_at == 2  # written after the first step, found during the second


@pytest.mark.parametrize("net", ["linear", "mlp"])
def test_weights_swapped_for_validation_and_back_are_followed(net, tmp_path):
    # Lightning's EMAWeightAveraging swaps the averaged weights in for validation (through .data) and back after:
    # the values the optimizer steps from are its own, so the twin follows.
    from pytorch_lightning.callbacks import EMAWeightAveraging

    x, y = data(2)
    val = DataLoader(TensorDataset(x[:8], y[:8]), batch_size=8)
    options = dict(callbacks=lambda: (EMAWeightAveraging(decay=0.5),), val_dataloaders=val)
    monitor, said = assert_same_run(lambda: Module(net), tmp_path, **options)
    assert_followed(monitor, said, linear=net == "linear")


def test_weights_written_by_the_network_s_own_forward_are_reported():
    # nn.Embedding(max_norm=...) renormalizes rows of its weight inside forward. (The Lightning-free twin: the
    # measures' forwards are the probe's business.)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(10, 4, max_norm=0.5), nn.Flatten(), nn.Linear(8, K)).double()
    real = Watched(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    said = []
    twin = TangentTwin(real, optimizer, lambda out, y: (out - y).pow(2).sum(), on_lost=lambda c, r: said.append(c))
    twin.follow()
    net(torch.randint(0, 10, (5, 2)))
    assert twin.lost is not None and len(said) == 1
    assert "'0.weight' (Embedding)" in said[0] and "network's own forward" in said[0]
    twin.release()


def test_pruning_is_reported_and_pairing_survives_renaming():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, K)).double()
    real = Watched(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    twin = TangentTwin(real, optimizer, lambda out, y: (out - y).pow(2).sum())
    assert twin.check() is None
    torch.nn.utils.prune.l1_unstructured(net[0], "weight", amount=0.5)  # weight -> weight_orig + weight_mask
    cause, remedy = twin.check()
    assert "'0' (Linear) was re-parametrized" in cause and "pruning" in cause and remedy
    # The twin's weights, by the real network's names now: the same Parameter under its new name.
    assert set(twin.parameters()) == {name for name, _ in real.named_parameters()}
    assert "inner.0.weight_orig" in twin.parameters()


def test_buffers_are_paired_by_module_and_name_at_every_sync():
    # StochasticWeightAveraging assigns BatchNorm statistics new tensors: the twin follows the new ones.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D, 4), nn.BatchNorm1d(4), nn.Linear(4, K)).double().eval()
    twin = TangentTwin(Watched(net), torch.optim.SGD(net.parameters(), lr=0.1), lambda out, y: out.sum())
    net[1].running_mean = torch.randn(4, dtype=torch.float64)
    net[1].running_var = torch.rand(4, dtype=torch.float64) + 0.5
    x = torch.randn(5, D, dtype=torch.float64)
    torch.testing.assert_close(twin.eval_output(x), net(x), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------ running statistics by kind


class InstanceNet(nn.Module):
    """Convolution, InstanceNorm that tracks running statistics (and optionally BatchNorm), a linear head."""

    def __init__(self, batchnorm: bool) -> None:
        super().__init__()
        layers = [nn.Unflatten(1, (1, D)), nn.Conv1d(1, 4, 3, padding=1),
                  nn.InstanceNorm1d(4, affine=True, track_running_stats=True), nn.ReLU()]
        if batchnorm:
            layers += [nn.Conv1d(4, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU()]
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(4 * D, K))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("batchnorm", [False, True], ids=["instancenorm", "instancenorm+batchnorm"])
def test_layers_with_running_statistics_are_treated_by_kind(batchnorm, tmp_path):
    net = lambda: InstanceNet(batchnorm)  # noqa: E731
    monitor, said = assert_same_run(lambda: Module(net), tmp_path)
    assert_followed(monitor, said, linear=False)
    frozen, said = fit(Module(net, lr=0.0), True, tmp_path / "lr0")
    assert_zero_at_lr0(frozen)


# ---------------------------------------------------------------------------------------- the mechanism


def test_a_lost_twin_is_saved_and_said_once(tmp_path):
    monitor, said = fit(Shrinks("linear"), True, tmp_path)
    state = monitor.state_dict()
    assert state["twin"]["lost"][0] == monitor.twin.lost
    resumed = LazyTrainingMonitor("mse")
    resumed.load_state_dict(state)
    assert resumed._loaded["twin"]["lost"][1] == monitor.twin.lost_at
