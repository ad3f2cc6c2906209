"""Activations other than ReLU: activation stability counts every piecewise-linear unit, smooth activations
are named in the warning, and activations whose derivatives torch lacks get composites under forward AD."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jvp, vjp
from torch.utils.data import DataLoader, TensorDataset

from lightning_lazy import LazyTrainingMonitor, diagnostics
from lightning_lazy._forward_ad import ForwardADError, composite_glu, composite_hardsigmoid, forward_ad_safe


class Gate(nn.Module):
    """Squeeze-excitation as MobileNetV3 has it: x · hardsigmoid(W x), the gate an nn.Hardsigmoid."""

    def __init__(self, width: int, functional: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.gate = None if functional else nn.Hardsigmoid()
        self.functional = functional

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc(x)
        return x * (F.hardsigmoid(z) if self.functional else self.gate(z))


def gated_net(functional: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Hardswish(), Gate(16, functional), nn.Linear(16, 3)).double()


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module, optimizer: str = "sgd") -> None:
        super().__init__()
        self.net, self.optimizer = net, optimizer

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=1e-2)
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)


def fit(net: nn.Module, monitor: LazyTrainingMonitor, epochs: int = 2, optimizer: str = "sgd") -> LazyTrainingMonitor:
    generator = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(64, 5, generator=generator, dtype=torch.float64),
                         torch.randint(0, 3, (64,), generator=generator))
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[monitor], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(Classifier(net, optimizer), DataLoader(data, batch_size=16))
    return monitor


def test_hardsigmoid_and_hardswish_net_through_the_monitor_with_twin_and_kappa() -> None:
    monitor = fit(gated_net(), LazyTrainingMonitor(loss="cross_entropy", probe_size=32))
    last = monitor.history[-1]
    for key in ("divergence", "kappa", "hessian_norm", "ntk_distance", "activation_stability"):
        assert torch.isfinite(torch.tensor(last[key])), key
    assert monitor.initial_kappa > 0 and 0 < last["divergence"]
    assert 0.5 < last["activation_stability"] <= 1.0


def test_torch_lacks_the_second_order_rule_the_composite_supplies() -> None:
    # Why the composite exists: torch 2.14's hardsigmoid rule calls hardsigmoid_backward, which has no derivative.
    x, t = torch.randn(20, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    x = x.requires_grad_()
    with pytest.raises(RuntimeError, match="hardsigmoid_backward"):
        jvp(F.hardsigmoid, (x,), (t,))[1].sum().backward()
    with forward_ad_safe(None):  # a functional model: composites always on
        jvp(F.hardsigmoid, (x,), (t,))[1].sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("name", ["hardsigmoid", "glu"])
def test_composites_against_torch_and_finite_differences(name: str) -> None:
    generator = torch.Generator().manual_seed(0)
    x = 4 * torch.randn(6, 8, generator=generator, dtype=torch.float64)
    if name == "hardsigmoid":
        x = x[(x.abs() - 3).abs() > 0.05].reshape(-1)  # away from the kinks at ±3, where finite differences lie
        torch_fn, composite = F.hardsigmoid, composite_hardsigmoid
    else:
        torch_fn, composite = (lambda a: F.glu(a, -1)), (lambda a: composite_glu(a, -1))
    t = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    assert torch.allclose(composite(x), torch_fn(x), rtol=0, atol=1e-15)
    h = 1e-6
    with forward_ad_safe(None):
        _, tangent = jvp(torch_fn, (x,), (t,))
        # Second order, forward over reverse: d/dε ∇⟨f(x + εt), c⟩ against a central difference of the gradient.
        c = torch.randn(torch_fn(x).shape, generator=generator, dtype=torch.float64)

        def gradient(a: torch.Tensor) -> torch.Tensor:
            return vjp(torch_fn, a)[1](c)[0]

        _, second = jvp(gradient, (x,), (t,))
    assert torch.allclose(tangent, (torch_fn(x + h * t) - torch_fn(x - h * t)) / (2 * h), atol=1e-8)
    with torch.no_grad():
        fd = (vjp(torch_fn, x + h * t)[1](c)[0] - vjp(torch_fn, x - h * t)[1](c)[0]) / (2 * h)
    assert torch.allclose(second, fd, atol=1e-6)


def test_an_op_still_without_a_rule_is_one_line_naming_the_ways_out() -> None:
    # F.hardsigmoid called inside a module of another type is not seen: the twin's backward fails in torch, and
    # the monitor says so in one line, with the options that still work, instead of torch's long traceback.
    with pytest.raises(ForwardADError) as caught:
        fit(gated_net(functional=True), LazyTrainingMonitor(loss="cross_entropy", probe_size=16, measure_kappa=False),
            epochs=1)
    message = str(caught.value)
    assert "\n" not in message and "hardsigmoid_backward" in message
    assert "track_tangent=False" in message and "measure_kappa=False" in message and "edit" not in message
    # Following the advice works: no twin, no second derivatives.
    monitor = fit(gated_net(functional=True), LazyTrainingMonitor(loss="cross_entropy", probe_size=16,
                                                                  measure_kappa=False, track_tangent=False), epochs=1)
    assert "activation_stability" in monitor.history[-1]


def test_gelu_net_warns_naming_the_activation_and_what_to_read() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.GELU(), nn.Linear(16, 16), nn.SiLU(), nn.Linear(16, 3)).double()
    with pytest.warns(UserWarning, match=r"gelu, silu\) are smooth.*lazy/layers/<module>/feature_movement"):
        monitor = fit(net, LazyTrainingMonitor(loss="cross_entropy", probe_size=16, measure_kappa=False), epochs=1)
    assert "activation_stability" not in monitor.history[-1]


class Mixed(nn.Module):
    """ReLU6, LeakyReLU and Hardtanh(-0.5, 0.5) modules and a functional hardswish, with a tanh besides."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3, self.l4 = (nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2))
        self.relu6, self.leaky, self.hardtanh = nn.ReLU6(), nn.LeakyReLU(0.1), nn.Hardtanh(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu6(3 * self.l1(x))
        b = self.leaky(self.l2(a))
        c = self.hardtanh(self.l3(b))
        return self.l4(torch.tanh(F.hardswish(4 * c)))


def pieces(net: Mixed, x: torch.Tensor) -> list[torch.Tensor]:
    """The piece of each unit, counted by hand from the pre-activations."""
    with torch.no_grad():
        p1 = 3 * net.l1(x)
        p2 = net.l2(F.relu6(p1))
        p3 = net.l3(F.leaky_relu(p2, 0.1))
        p4 = 4 * F.hardtanh(p3, -0.5, 0.5)
    return [(p1 > 0).int() + (p1 > 6).int(), (p2 > 0).int(), (p3 > -0.5).int() + (p3 > 0.5).int(),
            (p4 > -3).int() + (p4 > 3).int()]


def test_stability_of_relu6_leaky_relu_hardtanh_and_hardswish_against_an_explicit_count() -> None:
    torch.manual_seed(0)
    net = Mixed().double()
    x = 2 * torch.randn(64, 5, dtype=torch.float64)
    params0 = {k: v.detach().clone() for k, v in net.named_parameters()}
    params = {k: v + 0.3 * torch.randn_like(v) for k, v in params0.items()}
    states = diagnostics.activation_states(net, x, params0)
    assert states.names == ["relu6", "leaky_relu", "hardtanh", "hardswish"] and states.smooth == ["tanh"]
    expected0 = pieces(net, x)
    assert all(torch.equal(a.int(), b) for a, b in zip(states, expected0))
    assert {int(v) for v in expected0[0].unique()} == {0, 1, 2}  # every piece of ReLU6 occurs: the test can tell
    net.load_state_dict(params)
    expected = pieces(net, x)
    same = sum(int((a == b).sum()) for a, b in zip(expected, expected0)) / sum(a.numel() for a in expected0)
    assert 0.5 < same < 1.0
    value = diagnostics.activation_stability(net, x, params, params0)
    assert value.item() == pytest.approx(same, abs=1e-12)
    # The public names of before keep working.
    assert diagnostics.relu_states is diagnostics.activation_states
    with diagnostics.recording_relu_states() as recorded:
        net(x)
    assert len(recorded) == 4
