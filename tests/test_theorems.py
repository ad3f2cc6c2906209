"""The finite-horizon theorem of Chizat, Oyallon & Bach (2019), checked numerically in float64.

With h(w0) = 0 (centred) and the objective R(αh)/α², at a fixed normalized time: ‖w − w0‖ = O(1/α),
‖w − w̄‖ = O(1/α²) and the function-space gap Δ = O(1/α): slopes −1, −2, −1 on a log-log plot.
"""

import copy
import math

import pytest
import torch

from lightning_lazy import AlphaScaled, LinearizedModel, diagnostics as D
from lightning_lazy.scaling import half_squared_error

from helpers_core import mlp


def _train(model: torch.nn.Module, x, y, alpha: float, lr: float, steps: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        (half_squared_error(model(x), y) / alpha**2).backward()
        optimizer.step()


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def _slope(alphas, values) -> float:
    logs_a = torch.log(torch.tensor(alphas, dtype=torch.float64))
    logs_v = torch.log(torch.tensor(values, dtype=torch.float64))
    a = logs_a - logs_a.mean()
    return float((a * (logs_v - logs_v.mean())).sum() / (a * a).sum())


def test_divergence_falls_like_one_over_alpha_at_fixed_time():
    torch.manual_seed(0)
    x = torch.randn(16, 5, dtype=torch.float64)
    y = torch.randn(16, 3, dtype=torch.float64)
    base = mlp(d_in=5, width=24, d_out=3)
    # Step size in normalized time: GD on R(αh)/α² has the curvature ‖Dh‖² whatever α.
    lr = 0.5 / D.jacobian_norm(base, x).item() ** 2
    steps = 200
    alphas = [10.0, 100.0, 1000.0]
    divergence, tangent_gap, moved = [], [], []
    for alpha in alphas:
        real = AlphaScaled(copy.deepcopy(base), alpha)
        twin = LinearizedModel(real)
        w0 = _flat(real.module)
        _train(real, x, y, alpha, lr, steps)
        _train(twin, x, y, alpha, lr, steps)
        with torch.no_grad():
            divergence.append(D.path_divergence(real(x), twin(x), y, torch.zeros_like(y)).item())
        tangent_gap.append((_flat(real.module) - _flat(twin.module)).norm().item())
        moved.append((_flat(real.module) - w0).norm().item())
    assert _slope(alphas, divergence) == pytest.approx(-1.0, abs=0.1), divergence
    assert _slope(alphas, tangent_gap) == pytest.approx(-2.0, abs=0.15), tangent_gap
    assert _slope(alphas, moved) == pytest.approx(-1.0, abs=0.05), moved
    # Training did reach the targets: the comparison is at a time where the model has moved.
    final = AlphaScaled(copy.deepcopy(base), 1000.0)
    _train(final, x, y, 1000.0, lr, steps)
    with torch.no_grad():
        assert half_squared_error(final(x), y) < 0.5 * half_squared_error(torch.zeros_like(y), y)


def test_large_alpha_kappa_predicts_laziness():
    torch.manual_seed(1)
    x = torch.randn(16, 5, dtype=torch.float64)
    y = torch.randn(16, 3, dtype=torch.float64)
    base = mlp(d_in=5, width=24, d_out=3)
    kappas = [D.kappa(AlphaScaled(copy.deepcopy(base), a), x, y).value.item() for a in (1.0, 1000.0)]
    assert kappas[1] == pytest.approx(kappas[0] / 1000.0, rel=1e-6)
    assert math.isfinite(kappas[0]) and kappas[1] < 1e-2
