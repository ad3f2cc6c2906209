"""LazinessProbe reuses work between its measures without changing a value: ‖Dh‖ from the NTK it computes
anyway when that kernel is the network's own on the κ probe, one forward for the divergence's output and the
activation states."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import jacrev

from lightning_lazy import diagnostics
from lightning_lazy.watch.probe import LazinessProbe


def _explicit_jacobian_norm(probe: LazinessProbe, n: int) -> float:
    """σ_max of the explicit Jacobian of the probe's function on its first n examples, / √n."""
    params = {k: v.detach() for k, v in probe.network.named_parameters()}
    jac = jacrev(lambda p: probe.function()(p, probe.x[:n]))(params)
    matrix = torch.cat([j.reshape(j.shape[0] * j.shape[1], -1) for j in jac.values()], dim=1)
    return torch.linalg.svdvals(matrix)[0].item() / math.sqrt(n)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3)).double()


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3)).double().train()


@pytest.mark.parametrize("make, sizes, tolerance", [
    (_mlp, (6, 6), 1e-10),       # ‖Dh‖ is the NTK's top eigenvalue: exact
    (_mlp, (4, 6), 1e-3),        # other inputs than the kernel's: Lanczos at tol 1e-3
    (_bn_net, (6, 6), 1e-3),     # the kernel holds BatchNorm statistics fixed, κ differentiates through them
])
def test_the_probe_jacobian_norm_is_the_explicit_one(make, sizes, tolerance):
    torch.manual_seed(1)
    x = torch.randn(10, 5, dtype=torch.float64)
    probe = LazinessProbe(make(), x, None, kappa_probe_size=sizes[0], ntk_probe_size=sizes[1])
    probe.measure_initial([name for name, _ in probe.network.named_parameters()])
    expected = _explicit_jacobian_norm(probe, sizes[0])
    assert probe.initial_jacobian_norm == pytest.approx(expected, rel=tolerance)
    if tolerance > 1e-10:
        # The value is the Lanczos one; a kernel-based value would differ here by more than its tolerance.
        assert "kappa_rest" in probe.timings["initial"]


def test_one_forward_gives_the_divergence_its_output_and_activation_stability_its_states():
    net = _mlp()
    twin = _Frozen(net)  # before the hook: its copy of the network is not counted
    calls = []
    net.register_forward_hook(lambda *_: calls.append(1))
    torch.manual_seed(1)
    x = torch.randn(10, 5, dtype=torch.float64)
    probe = LazinessProbe(net, x, None, measure_kappa=False, measure_ntk=False)
    # One forward of two examples sizes the probe's tensors against the memory budget, then one of the probe.
    assert len(calls) == 2 and probe.initial_relu is not None and len(probe.initial_relu) == 2
    names = [name for name, _ in net.named_parameters()]
    probe.measure_initial(names)  # ‖Dh(w0)‖ alone here, by Lanczos
    with torch.no_grad():
        net[0].weight.add_(0.3)
    calls.clear()
    values = probe.measure(names, twin=twin)
    assert len(calls) == 1, "the output for the divergence and the ReLU states come from one forward"
    assert set(probe.timings["last"]) == {"output_and_activation_states", "tangent_output", "layers", "total"}
    expected = diagnostics.activation_stability(probe.function(), x, dict(net.named_parameters()),
                                                initial_states=probe.initial_relu).item()
    assert values["activation_stability"] == pytest.approx(expected) and values["activation_stability"] < 1


class _Frozen:
    """A stand-in for the twin: the real network's output at w0 (its tangent at w0 to order 0)."""

    def __init__(self, net: nn.Module) -> None:
        self.net = copy.deepcopy(net)  # its own module: its forwards are not the real network's
        self.weights = {k: v.detach().clone() for k, v in net.named_parameters()}

    def probe_output(self, x):
        return torch.func.functional_call(self.net, self.weights, (x,))

    def parameters(self):
        return self.weights


def test_the_lanczos_direction_is_kept_for_the_next_measurement_and_saved():
    # BatchNorm in training: ‖Dh‖ by Lanczos, warm-started from the direction found before.
    torch.manual_seed(1)
    x = torch.randn(10, 5, dtype=torch.float64)
    probe = LazinessProbe(_bn_net(), x, None, kappa_probe_size=6, ntk_probe_size=6)
    names = [name for name, _ in probe.network.named_parameters()]
    probe.measure_initial(names)
    direction = probe.jacobian_direction
    assert direction is not None and direction.shape == (6, 3)
    with torch.no_grad():
        probe.network[0].weight.mul_(1.01)
    values = probe.measure(names)
    assert values["jacobian_norm"] == pytest.approx(_explicit_jacobian_norm(probe, 6), rel=1e-3)
    state = probe.state_dict()
    assert torch.equal(state["jacobian_direction"], probe.jacobian_direction)
    older = {k: v for k, v in state.items() if k != "jacobian_direction"}  # a checkpoint from before it was kept
    fresh = LazinessProbe(_bn_net(), x, None, kappa_probe_size=6, ntk_probe_size=6)
    fresh.load_state_dict(older)
    assert fresh.jacobian_direction is None and fresh.initial_jacobian_norm == probe.initial_jacobian_norm
