import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lazy import AlphaScaled, diagnostics as D

from helpers_core import explicit_hessians, explicit_jacobian, mlp


@pytest.fixture
def probe():
    torch.manual_seed(3)
    return torch.randn(9, 5, dtype=torch.float64)


def test_jacobian_norm_matches_svd(probe):
    net = mlp()
    sigma = torch.linalg.svdvals(explicit_jacobian(net, probe))[0] / math.sqrt(probe.shape[0])
    value = D.jacobian_norm(net, probe)
    assert value.dtype == torch.float64
    assert abs(value.item() / sigma.item() - 1) < 1e-2
    assert abs(value.item() / sigma.item() - 1) < 1e-6, "Lanczos converges far below 1%"


def test_jacobian_norm_with_nearly_equal_top_singular_values():
    # For a linear layer with inputs X, J = X ⊗ I, so σ(J) = σ(X). σ2/σ1 = 0.9925, as on the 4M-parameter MLP
    # where 20 power-iteration steps were 1.2 % low.
    torch.manual_seed(0)
    n, p = 64, 200
    u, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(p, n, dtype=torch.float64))
    singular = torch.cat([torch.tensor([1.0, 0.9925, 0.99, 0.985]), torch.linspace(0.98, 0.1, n - 4)]).double()
    x = u @ torch.diag(singular) @ v.T
    net = nn.Linear(p, 4, bias=False).double()
    value = D.jacobian_norm(net, x)
    assert abs(value.item() * math.sqrt(n) - 1.0) < 1e-3


def test_hessian_norm_between_random_lower_bound_and_explicit_upper_bound(probe):
    net = mlp(width=6)
    hessians = explicit_hessians(net, probe)  # [N*K, P, P]
    n = probe.shape[0]
    upper = torch.sqrt((torch.linalg.matrix_norm(hessians, 2) ** 2).sum()) / math.sqrt(n)
    generator = torch.Generator().manual_seed(0)
    lower = 0.0
    for _ in range(500):
        u = torch.randn(hessians.shape[1], generator=generator, dtype=torch.float64)
        u /= u.norm()
        lower = max(lower, torch.einsum("kpq,p,q->k", hessians, u, u).norm().item() / math.sqrt(n))
    value = D.hessian_norm(net, probe).item()
    assert lower <= value <= upper.item() + 1e-12
    assert value > 2 * lower, "the power iteration finds far better directions than random ones"


def test_hessian_norm_single_output_is_top_absolute_eigenvalue(probe):
    net = mlp(d_out=1)
    hessian = explicit_hessians(net, probe[:1])[0]
    expected = torch.linalg.eigvalsh(hessian).abs().max().item()
    assert D.hessian_norm(net, probe[:1], max_iter=300, tol=1e-10).item() == pytest.approx(expected, rel=1e-4)


def test_kappa_is_consistent_with_its_parts(probe):
    net = mlp()
    target = torch.randn(9, 3, dtype=torch.float64)
    result = D.kappa(net, probe, target)
    residual = (net(probe) - target).norm().item() / 3.0
    assert result.residual_norm.item() == pytest.approx(residual)
    assert result.jacobian_norm.item() == pytest.approx(D.jacobian_norm(net, probe).item())
    assert result.hessian_norm.item() == pytest.approx(D.hessian_norm(net, probe).item())
    assert result.value.item() == pytest.approx(residual * result.hessian_norm.item() / result.jacobian_norm.item() ** 2)


def test_kappa_of_centred_model_falls_like_one_over_alpha(probe):
    target = torch.randn(9, 3, dtype=torch.float64)
    values = [D.kappa(AlphaScaled(mlp(), alpha), probe, target).value.item() for alpha in (1.0, 10.0, 100.0)]
    slope = math.log(values[2] / values[0]) / math.log(100.0)
    assert slope == pytest.approx(-1.0, abs=1e-6)


class _TwoLayer(nn.Module):
    """(1/√m) Σⱼ bⱼ tanh(aⱼ·x), antisymmetric so h(w0) = 0."""

    def __init__(self, d: int, m: int) -> None:
        super().__init__()
        a = torch.randn(m // 2, d, dtype=torch.float64)
        b = torch.randn(m // 2, dtype=torch.float64)
        self.a = nn.Parameter(torch.cat([a, a]))
        self.b = nn.Parameter(torch.cat([b, -b]))
        self.m = m

    def forward(self, x):
        return (torch.tanh(x @ self.a.T) @ self.b / math.sqrt(self.m)).unsqueeze(1)


def test_kappa_of_two_layer_net_falls_with_width():
    torch.manual_seed(0)
    x = torch.randn(32, 3, dtype=torch.float64)
    target = torch.randn(32, 1, dtype=torch.float64)
    widths = [32, 512, 8192]
    values = []
    for m in widths:
        torch.manual_seed(m)
        result = D.kappa(_TwoLayer(3, m), x, target, hessian_kwargs={"max_iter": 20})
        values.append(result.value.item())
    assert all(b < a for a, b in zip(values, values[1:])), values
    slope = math.log(values[-1] / values[0]) / math.log(widths[-1] / widths[0])
    # κ ≲ m^(-1/2): the sup in ‖D²h‖ picks the most extreme of m neurons, which adds a slowly growing factor.
    assert -0.8 < slope < -0.25, f"fitted slope {slope:.2f}"


def test_empirical_ntk_matches_explicit_gram(probe):
    net = mlp()
    jacobian = explicit_jacobian(net, probe)
    torch.testing.assert_close(D.empirical_ntk(net, probe), jacobian @ jacobian.T)
    torch.testing.assert_close(D.empirical_ntk(net, probe, chunk_size=4), jacobian @ jacobian.T)
    torch.testing.assert_close(D.empirical_ntk(net, probe, probe[:2]), jacobian @ jacobian[:6].T)


def test_ntk_distance_and_alignment(probe):
    net = mlp()
    k0 = D.empirical_ntk(net, probe)
    assert D.ntk_distance(k0, k0).item() == 0.0
    assert D.kernel_alignment(3.0 * k0, k0).item() == pytest.approx(1.0)
    params = {k: v.detach() + 0.2 * torch.randn_like(v) for k, v in net.named_parameters()}
    kt = D.empirical_ntk(net, probe, params=params)
    assert D.ntk_distance(kt, k0).item() == pytest.approx(((kt - k0).norm() / k0.norm()).item())
    assert 0 < D.kernel_alignment(kt, k0).item() < 1
    with pytest.raises(ValueError, match="kernel shapes differ"):
        D.ntk_distance(kt[:3], k0)


def test_displacement():
    w0 = {"w": torch.ones(2, 2, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.float64)}
    w = {"w": w0["w"] + 1.0, "b": w0["b"] + 3.0}
    result = D.displacement(w, w0)
    assert result.total.item() == pytest.approx(math.sqrt(4 + 18) / 2)
    assert result.per_tensor == {"w": pytest.approx(1.0)} or result.per_tensor["w"].item() == pytest.approx(1.0)
    assert "b" not in result.per_tensor, "zero-initialized tensors have no relative scale"
    assert result.absolute["b"].item() == pytest.approx(math.sqrt(18))
    with pytest.raises(ValueError, match="different tensors"):
        D.displacement({"w": w["w"]}, w0)


class _FunctionalRelu(nn.Module):
    def __init__(self, net: nn.Sequential) -> None:
        super().__init__()
        self.first, self.second = net[0], net[2]

    def forward(self, x):
        return self.second(F.relu(self.first(x)))


def test_activation_stability_counts_module_and_functional_relus(probe):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 64), nn.ReLU(), nn.Linear(64, 2)).double()
    params0 = {k: v.detach().clone() for k, v in net.named_parameters()}
    params = {k: v + 0.3 * torch.randn_like(v) for k, v in params0.items()}
    assert D.activation_stability(net, probe, params0, params0).item() == 1.0
    value = D.activation_stability(net, probe, params, params0)
    pre0 = probe @ params0["0.weight"].T + params0["0.bias"]
    pre = probe @ params["0.weight"].T + params["0.bias"]
    assert value.item() == pytest.approx(((pre > 0) == (pre0 > 0)).double().mean().item())
    assert 0.5 < value.item() < 1.0
    functional = _FunctionalRelu(net)
    renamed = lambda p: {k.replace("0.", "first.").replace("2.", "second."): v for k, v in p.items()}  # noqa: E731
    assert D.activation_stability(functional, probe, renamed(params), renamed(params0)).item() == value.item()
    with pytest.raises(ValueError, match="no piecewise-linear activation.*smooth tanh"):
        tanh_net = mlp()
        p = dict(tanh_net.named_parameters())
        D.activation_stability(tanh_net, probe, p, p)


def test_path_divergence():
    target = torch.tensor([[3.0, 4.0]])
    out = torch.tensor([[1.0, 1.0]])
    assert D.path_divergence(out, torch.tensor([[1.0, 2.0]]), target, torch.zeros(1, 2)).item() == pytest.approx(0.2)
    with pytest.raises(ValueError, match="tangent_output has shape"):
        D.path_divergence(out, torch.zeros(1, 3), target, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="non-finite"):
        D.path_divergence(torch.tensor([[math.nan, 1.0]]), out, target, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="no scale"):
        D.path_divergence(out, out, target, target)


def test_bad_input_gives_clear_errors(probe):
    net = mlp()
    with pytest.raises(ValueError, match="probe batch is empty"):
        D.jacobian_norm(net, probe[:0])
    with pytest.raises(ValueError, match="probe batch is empty"):
        D.empirical_ntk(net, probe[:0])
    broken = mlp()
    with torch.no_grad():
        broken[0].weight[0, 0] = math.nan
    for measure in (D.jacobian_norm, D.hessian_norm, D.empirical_ntk):
        with pytest.raises(ValueError, match="non-finite"):
            measure(broken, probe)
    with pytest.raises(ValueError, match="does not match output shape"):
        D.kappa(net, probe, torch.zeros(9, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="needs its params"):
        D.jacobian_norm(lambda p, x: x, probe)


def test_dtype_follows_inputs():
    net = mlp().float()
    x = torch.randn(4, 5)
    assert D.jacobian_norm(net, x).dtype == torch.float32
    assert D.hessian_norm(net, x, max_iter=3).dtype == torch.float32
    assert D.empirical_ntk(net, x).dtype == torch.float32


def test_functional_model_and_mode_restored(probe):
    net = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 2)).double().train()
    # Dropout is off while measuring (eval mode), so repeated measures agree, and the mode is restored.
    assert D.jacobian_norm(net, probe).item() == D.jacobian_norm(net, probe).item()
    assert net.training and net[1].training
    params = {k: v.detach() for k, v in net.named_parameters()}
    fn = lambda p, x: torch.func.functional_call(net.eval(), p, (x,))  # noqa: E731
    assert D.jacobian_norm(fn, probe, params).item() == pytest.approx(D.jacobian_norm(net, probe).item())


def test_hessian_norm_warm_start_returns_and_reuses_its_direction(probe):
    net = mlp()
    value, direction = D.hessian_norm(net, probe, return_direction=True)
    assert direction.shape == (sum(p.numel() for p in net.parameters()),)
    assert direction.norm().item() == pytest.approx(1.0)
    # From its own direction one short round already gets the same value.
    again = D.hessian_norm(net, probe, start=direction, max_iter=2, max_rounds=1, restarts=1)
    assert again.item() >= value.item() * (1 - 1e-6)
    with pytest.raises(ValueError, match="flat direction"):
        D.hessian_norm(net, probe, start=direction[:3])


def test_lanczos_with_a_bounded_basis_restarts_and_still_converges():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(60, 60, dtype=torch.float64))
    spectrum = torch.cat([torch.tensor([1.0, 0.97]), torch.linspace(0.9, -0.5, 58)]).double()
    matrix = q @ torch.diag(spectrum) @ q.T
    products = []

    def matvec(v):
        products.append(1)
        return matrix @ v

    start = torch.randn(60, dtype=torch.float64)
    value, vector = D.extreme_eigenpair(matvec, start, max_iter=200, tol=1e-10, max_basis=6)
    assert abs(value.item() - 1.0) < 1e-8
    assert abs(abs(float(vector @ q[:, 0])) - 1.0) < 1e-6
    assert len(products) > 6, "the basis of 6 had to restart"
    full, _ = D.extreme_eigenpair(matrix.__matmul__, start, max_iter=200, tol=1e-10)
    assert abs(full.item() - value.item()) < 1e-8


@pytest.mark.parametrize("max_basis", [None, 6])
def test_three_term_lanczos_finds_the_extreme_eigenpair_of_an_explicit_matrix(max_basis):
    # The recurrence without re-orthogonalization (what the Hessian search runs): ghosts may appear, the extreme
    # pair may not be wrong. The extreme eigenvalue is the negative one here.
    torch.manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(80, 80, dtype=torch.float64))
    spectrum = torch.cat([torch.tensor([-2.0, 1.9]), torch.linspace(1.5, -1.5, 78)]).double()
    matrix = q @ torch.diag(spectrum) @ q.T
    start = torch.randn(80, dtype=torch.float64)
    before = start.clone()
    value, vector = D.extreme_eigenpair(matrix.__matmul__, start, max_iter=300, tol=1e-12, max_basis=max_basis,
                                        full_reorthogonalization=False)
    assert value.item() == pytest.approx(-2.0, abs=1e-9)
    assert abs(float(vector @ q[:, 0])) == pytest.approx(1.0, abs=1e-6)
    assert float(vector.norm()) == pytest.approx(1.0, abs=1e-12)
    assert torch.equal(start, before), "the start vector is the caller's"


def test_lanczos_does_not_write_into_what_its_product_returns_shared():
    # The recurrence updates the product in place; an operator returning its argument (the identity) is copied.
    start = torch.randn(30, dtype=torch.float64)
    before = start.clone()
    for full in (True, False):
        value, vector = D.extreme_eigenpair(lambda v: v, start, max_iter=5, full_reorthogonalization=full)
        assert value.item() == pytest.approx(1.0, abs=1e-12)
        assert torch.allclose(vector, before / before.norm(), atol=1e-12)
    assert torch.equal(start, before)


def test_hessian_norm_under_a_tiny_memory_budget_matches_the_full_basis(probe):
    net = mlp()
    full = D.hessian_norm(net, probe).item()
    bounded = D.hessian_norm(net, probe, memory_budget=3 * sum(p.numel() for p in net.parameters()), max_iter=60).item()
    assert bounded == pytest.approx(full, rel=1e-3)


def test_activation_stability_from_precomputed_initial_states(probe):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 32), nn.ReLU(), nn.Linear(32, 2)).double()
    params0 = {k: v.detach().clone() for k, v in net.named_parameters()}
    params = {k: v + 0.3 * torch.randn_like(v) for k, v in params0.items()}
    states = D.relu_states(net, probe, params0)
    assert [s.shape for s in states] == [(9, 32)] and states[0].dtype == torch.bool
    expected = D.activation_stability(net, probe, params, params0)
    assert D.activation_stability(net, probe, params, initial_states=states).item() == expected.item() < 1.0
    with pytest.raises(ValueError, match="initial_params or initial_states"):
        D.activation_stability(net, probe, params)


def test_jacobian_norm_from_the_ntk_is_the_top_singular_value(probe):
    net = mlp()
    n = probe.shape[0]
    sigma = torch.linalg.svdvals(explicit_jacobian(net, probe))[0].item() / math.sqrt(n)
    kernel = D.empirical_ntk(net, probe)
    assert D.jacobian_norm_from_ntk(kernel, n).item() == pytest.approx(sigma, rel=1e-12)
    with pytest.raises(ValueError, match="square"):
        D.jacobian_norm_from_ntk(kernel[:, :-1], n)
    with pytest.raises(ValueError, match="over 4 inputs"):
        D.jacobian_norm_from_ntk(kernel, 4)  # 27 rows are not 4 examples' outputs


def test_kappa_with_a_jacobian_norm_given_equals_kappa_computing_it(probe):
    net = mlp()
    target = torch.randn(9, 3, dtype=torch.float64)
    hessian = D.hessian_norm(net, probe)
    computed = D.kappa(net, probe, target, hessian=hessian, jacobian_kwargs={"tol": 1e-12})
    given = D.kappa(net, probe, target, hessian=hessian,
                    jacobian=D.jacobian_norm_from_ntk(D.empirical_ntk(net, probe), probe.shape[0]))
    for a, b in zip(computed, given):
        assert a.item() == pytest.approx(b.item(), rel=1e-9)


def test_relu_states_recorded_during_a_forward_are_those_of_relu_states(probe):
    net = mlp(act=nn.ReLU)
    params = {k: v.detach() for k, v in net.named_parameters()}
    with D.recording_relu_states() as states, torch.no_grad():
        output = net(probe)
    assert len(states) == 2
    for a, b in zip(states, D.relu_states(net, probe, params)):
        assert torch.equal(a, b)
    torch.testing.assert_close(output, net(probe))


def test_jacobian_norm_from_a_given_start_vector(probe):
    net = mlp()
    kernel = D.empirical_ntk(net, probe)
    top = torch.linalg.eigh(kernel).eigenvectors[:, -1]
    expected = D.jacobian_norm_from_ntk(kernel, probe.shape[0]).item()
    # From the top eigenvector itself: converged at once, to the exact value.
    assert D.jacobian_norm(net, probe, start=top.reshape(9, 3), max_iter=2).item() == pytest.approx(expected, rel=1e-9)
    assert D.jacobian_norm(net, probe, start=top + 0.01 * torch.randn_like(top)).item() == pytest.approx(expected,
                                                                                                       rel=1e-9)
    with pytest.raises(ValueError, match="one number per output"):
        D.jacobian_norm(net, probe, start=top[:-1])
