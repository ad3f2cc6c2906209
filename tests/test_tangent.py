import pytest
import torch
from torch import nn

from lightning_lazy import AlphaScaled, LinearizedModel

from helpers_core import explicit_jacobian, mlp


def _perturb(module: nn.Module, scale: float = 0.1, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.Tanh(), nn.Linear(5, 3)
    ).double()


@pytest.mark.parametrize("make", [mlp, _conv_net])
def test_forward_and_gradient_match_explicit_jacobian(make):
    net = make()
    x = torch.randn(7, 5, dtype=torch.float64) if make is mlp else torch.randn(7, 3, 8, 8, dtype=torch.float64)
    lin = LinearizedModel(net)
    assert torch.equal(lin(x), net(x)), "at w0 the tangent model equals the model"
    _perturb(lin)
    jacobian = explicit_jacobian(net, x)  # [N*K, P]
    w0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    w = torch.cat([p.detach().reshape(-1) for p in lin.parameters()])
    expected = net(x).detach().reshape(-1) + jacobian @ (w - w0)
    out = lin(x)
    torch.testing.assert_close(out.reshape(-1), expected, rtol=1e-12, atol=1e-12)
    cotangent = torch.randn_like(out)
    out.backward(cotangent)
    grad = torch.cat([p.grad.reshape(-1) for p in lin.parameters()])
    torch.testing.assert_close(grad, jacobian.T @ cotangent.reshape(-1), rtol=1e-12, atol=1e-12)


def test_parameters_start_at_w0_and_original_untouched():
    net = mlp()
    lin = LinearizedModel(net)
    for (name, p), (_, q) in zip(lin.module.named_parameters(), net.named_parameters()):
        assert torch.equal(p, q) and p is not q
    assert set(lin.initial_params) == {n for n, _ in net.named_parameters()}
    assert all(k.startswith("module.") for k, _ in lin.named_parameters())
    assert any(k.startswith("initial.") for k in lin.state_dict())
    _perturb(lin)
    assert all(torch.equal(a, b) for a, b in zip(lin.initial_params.values(), net.parameters()))
    lin.float()
    assert all(t.dtype == torch.float32 for t in lin.initial_params.values())


def test_model_linear_in_its_parameters_follows_the_same_sgd_path():
    # Fixed random features then a linear read-out: h is linear in w, so h̄ = h exactly.
    torch.manual_seed(0)
    features = torch.randn(6, 20, dtype=torch.float64)
    net = nn.Sequential(nn.Linear(6, 20, bias=False).requires_grad_(False), nn.Tanh(), nn.Linear(20, 3)).double()
    with torch.no_grad():
        net[0].weight.copy_(features.T)
    lin = LinearizedModel(net)
    real_opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
    twin_opt = torch.optim.SGD(lin.parameters(), lr=0.2, momentum=0.9)
    x, y = torch.randn(64, 6, dtype=torch.float64), torch.randn(64, 3, dtype=torch.float64)
    for step in range(50):
        batch = slice(8 * (step % 8), 8 * (step % 8) + 8)
        for model, opt in ((net, real_opt), (lin, twin_opt)):
            opt.zero_grad()
            (0.5 * (model(x[batch]) - y[batch]).pow(2).sum(1).mean()).backward()
            opt.step()
    for a, b in zip(net.parameters(), lin.parameters()):
        assert (a - b).abs().max() <= 1e-6
    assert (net(x) - lin(x)).abs().max() <= 1e-6
    assert (net[2].weight - lin.initial_params["2.weight"]).abs().max() > 1e-2, "it did train"


def test_linearized_alpha_scaled_is_alpha_times_jacobian_step():
    net = mlp()
    twin = LinearizedModel(AlphaScaled(net, alpha=50.0))
    x = torch.randn(3, 5, dtype=torch.float64)
    assert torch.equal(twin(x), torch.zeros(3, 3, dtype=torch.float64))
    _perturb(twin, 1e-3)
    jacobian = explicit_jacobian(net, x)
    delta = torch.cat([(p - q).detach().reshape(-1) for p, q in zip(twin.parameters(), net.parameters())])
    torch.testing.assert_close(twin(x).reshape(-1), 50.0 * jacobian @ delta, rtol=1e-10, atol=1e-12)


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).double()


def test_batchnorm_frozen_policy_uses_initial_statistics_and_never_touches_the_module():
    net = _bn_net().train()
    lin = LinearizedModel(net).train()
    real_stats = net[1].running_mean.clone()
    x = torch.randn(16, 4, dtype=torch.float64)
    lin(x).sum().backward()
    assert torch.equal(net[1].running_mean, real_stats)
    assert torch.equal(lin.module[1].running_mean, real_stats), "frozen: statistics of w0 stay"
    assert torch.allclose(lin(x), net.eval()(x))
    assert lin.training and lin.module[1].training, "mode restored after the forward"


def test_batchnorm_batch_policy_trains_in_train_mode():
    net = _bn_net().train()
    lin = LinearizedModel(net, batchnorm="batch").train()
    x = torch.randn(16, 4, dtype=torch.float64)
    out = lin(x)
    assert torch.allclose(out, net(x))  # batch statistics, like the real network in train mode
    out.sum().backward()
    assert all(p.grad is not None for p in lin.parameters())
    assert not torch.equal(lin.module[1].running_mean, torch.zeros(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="batchnorm must be one of"):
        LinearizedModel(net, batchnorm="running")


class _NoJvp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


class _Doubler(nn.Module):
    def forward(self, x):
        return _NoJvp.apply(x)


def test_op_without_forward_ad_rule_names_the_module():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.Tanh(), _Doubler()), nn.Linear(4, 1))
    lin = LinearizedModel(net)
    with pytest.raises(RuntimeError, match=r"module 1\.1 \(_Doubler\).*jvp"):
        lin(torch.randn(2, 3))


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def test_frozen_parameters_stay_at_w0_and_get_no_tangent():
    net = mlp()
    net[0].weight.requires_grad_(False)
    lin = LinearizedModel(net)
    assert set(lin.initial_params) == {n for n, _ in net.named_parameters()}, "w0 covers frozen parameters too"
    assert "0.weight" not in lin.tangent_names and "2.weight" in lin.tangent_names
    x = torch.randn(4, 5, dtype=torch.float64)
    lin(x).sum().backward()
    assert lin.module[0].weight.grad is None and lin.module[2].weight.grad is not None


def test_parameter_unfrozen_later_moves_from_w0_and_keeps_its_tangent():
    net = mlp()
    net[0].requires_grad_(False)
    lin = LinearizedModel(net)
    x = torch.randn(6, 5, dtype=torch.float64)
    lin.module[0].requires_grad_(True)  # unfrozen after construction: starts at its w0
    _perturb(lin)
    jacobian = explicit_jacobian(net, x)
    expected = net(x).detach().reshape(-1) + jacobian @ (_flat(lin.parameters()) - _flat(net.parameters()))
    torch.testing.assert_close(lin(x).reshape(-1), expected, rtol=1e-12, atol=1e-12)
    lin.module[0].requires_grad_(False)  # frozen again after moving: the tangent stays
    assert "0.weight" in lin.tangent_names
    torch.testing.assert_close(lin(x).reshape(-1), expected, rtol=1e-12, atol=1e-12)
    state = lin.state_dict()
    fresh = LinearizedModel(mlp())
    fresh.module[0].requires_grad_(False)
    fresh.load_state_dict(state)
    assert "0.weight" in fresh.tangent_names, "the parameters ever trained are saved with the weights"
    torch.testing.assert_close(fresh(x).reshape(-1), expected, rtol=1e-12, atol=1e-12)


def test_frozen_parameter_written_in_place_gets_a_tangent():
    net = mlp()
    net[2].requires_grad_(False)
    lin = LinearizedModel(net)
    x = torch.randn(6, 5, dtype=torch.float64)
    with torch.no_grad():
        lin.module[2].weight.add_(0.0)  # written but unchanged: still no tangent
    assert "2.weight" not in lin.tangent_names
    _perturb(lin)  # moves every parameter, the frozen ones too
    assert "2.weight" in lin.tangent_names
    jacobian = explicit_jacobian(net.requires_grad_(True), x)
    expected = net(x).detach().reshape(-1) + jacobian @ (_flat(lin.parameters()) - _flat(net.parameters()))
    torch.testing.assert_close(lin(x).reshape(-1), expected, rtol=1e-12, atol=1e-12)


def test_inference_mode_keeps_the_tangent():
    net = mlp()
    lin = LinearizedModel(net)
    _perturb(lin)
    x = torch.randn(4, 5, dtype=torch.float64)
    expected = lin(x).detach()
    assert not torch.allclose(expected, net(x))
    with torch.inference_mode():
        torch.testing.assert_close(lin(x), expected)


def test_jacobian_inside_torch_func_transforms_is_the_initial_jacobian():
    from lightning_lazy import diagnostics

    net = mlp()
    lin = LinearizedModel(net)
    _perturb(lin)
    x = torch.randn(6, 5, dtype=torch.float64)
    torch.testing.assert_close(diagnostics.jacobian_norm(lin, x), diagnostics.jacobian_norm(net, x))
    assert diagnostics.hessian_norm(lin, x, max_iter=3).item() == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(diagnostics.empirical_ntk(lin, x), diagnostics.empirical_ntk(net, x))


# -------------------------------------------------------------------------- nested LinearizedModels


class _Returns(nn.Module):
    """A wrapper whose forward returns its sub-model's output as it is (like LazyClassifier.forward)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def _head_on_linearized() -> nn.Module:
    inner = LinearizedModel(mlp())
    _perturb(inner, 0.05)  # trained a little before being wrapped: the outer w0 is not the inner one
    torch.manual_seed(2)
    return nn.Sequential(inner, nn.Tanh(), nn.Linear(3, 2)).double()


@pytest.mark.parametrize("make", [lambda: _Returns(LinearizedModel(mlp())), _head_on_linearized])
def test_nested_linearized_model_is_the_tangent_model(make):
    """Linear wrapper (run as it is) and a trainable head on top (torch.func.jvp nests): both exact."""
    net = make()
    x = torch.randn(7, 5, dtype=torch.float64)
    jacobian = explicit_jacobian(net, x)
    f0, w0 = net(x).detach().reshape(-1), _flat(net.parameters())
    lin = LinearizedModel(net)
    torch.testing.assert_close(lin(x).reshape(-1), f0, rtol=0, atol=1e-15)
    _perturb(lin)
    out = lin(x)
    torch.testing.assert_close(out.reshape(-1), f0 + jacobian @ (_flat(lin.parameters()) - w0), rtol=1e-12, atol=1e-12)
    assert lin._plain is isinstance(net, _Returns)
    cotangent = torch.randn_like(out)
    out.backward(cotangent)
    grad = _flat(p.grad for p in lin.parameters())
    torch.testing.assert_close(grad, jacobian.T @ cotangent.reshape(-1), rtol=1e-12, atol=1e-12)
    if isinstance(net, nn.Sequential):
        assert (out - net(x)).abs().max() > 1e-2, "the head is not linear: the plain network is not the answer"


@pytest.mark.parametrize("make", [lambda: _Returns(LinearizedModel(mlp())), _head_on_linearized])
def test_nested_linearized_model_inside_torch_func_transforms(make):
    """jvp / vjp / vmap over functional_call of a module holding nested LinearizedModels: J(w0) of the outer one."""
    from torch.func import functional_call, jvp, vjp, vmap

    net = make()
    x = torch.randn(5, 5, dtype=torch.float64)
    jacobian = explicit_jacobian(net, x)
    lin = LinearizedModel(net)
    _perturb(lin)
    params = {k: v.detach() for k, v in lin.named_parameters()}
    direction = {k: torch.randn_like(v) for k, v in params.items()}

    def f(p):
        return functional_call(lin, p, (x,))

    _, tangent = jvp(f, (params,), (direction,))
    torch.testing.assert_close(tangent.reshape(-1), jacobian @ _flat(direction.values()), rtol=1e-12, atol=1e-12)
    out, pull = vjp(f, params)
    cotangents = torch.randn(3, *out.shape, dtype=torch.float64)
    pulled = vmap(lambda c: _flat_live(pull(c)[0].values()))(cotangents)
    torch.testing.assert_close(pulled, cotangents.reshape(3, -1) @ jacobian, rtol=1e-12, atol=1e-12)


def _flat_live(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def test_linearized_model_inside_an_open_dual_level_is_a_clear_error():
    import torch.autograd.forward_ad as fwAD

    lin = LinearizedModel(mlp())
    message = r"LinearizedModel\(Sequential\).*dual_level.*torch\.func\.jvp"
    with fwAD.dual_level(), pytest.raises(RuntimeError, match=message):
        lin(torch.randn(2, 5, dtype=torch.float64))


# ------------------------------------------------------------------------- weight re-parametrizations


def _reparametrized(kind: str) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.Linear(6, 3)
    wrap = {
        "weight_norm": nn.utils.parametrizations.weight_norm,
        "spectral_norm": nn.utils.parametrizations.spectral_norm,
        "old_weight_norm": nn.utils.weight_norm,
        "old_spectral_norm": nn.utils.spectral_norm,
    }[kind]
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), wrap(layer)).double()


KINDS = ["weight_norm", "spectral_norm", "old_weight_norm", "old_spectral_norm"]


@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm is deprecated")
@pytest.mark.parametrize("kind", KINDS)
def test_weight_and_spectral_norm_are_linearized(kind):
    net = _reparametrized(kind).eval()  # eval: spectral norm's u, v fixed, so jacrev sees one function
    x = torch.randn(7, 5, dtype=torch.float64)
    lin = LinearizedModel(net).eval()
    assert any(("original" in n or n.endswith(("_g", "_v", "_orig"))) for n in lin.tangent_names)
    jacobian = explicit_jacobian(net, x)
    _perturb(lin, 0.05)
    out = lin(x)
    expected = net(x).detach().reshape(-1) + jacobian @ (_flat(lin.parameters()) - _flat(net.parameters()))
    torch.testing.assert_close(out.reshape(-1), expected, rtol=1e-11, atol=1e-12)
    cotangent = torch.randn_like(out)
    out.backward(cotangent)
    torch.testing.assert_close(_flat(p.grad for p in lin.parameters()), jacobian.T @ cotangent.reshape(-1),
                               rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("kind", ["spectral_norm", "old_spectral_norm"])
def test_spectral_norm_power_iteration_runs_at_w0(kind):
    net = _reparametrized(kind).train()
    lin = LinearizedModel(net).train()
    _perturb(lin, 0.3)
    u_name = "2.parametrizations.weight.0._u" if kind == "spectral_norm" else "2.weight_u"
    before = dict(net.named_buffers())[u_name].clone()
    for _ in range(30):
        lin(torch.randn(4, 5, dtype=torch.float64))
    u = dict(lin.module.named_buffers())[u_name]
    name = next(k for k, v in lin.initial_params.items() if k.startswith("2.") and v.dim() == 2)
    w0, w = lin.initial_params[name], dict(lin.module.named_parameters())[name].detach()

    def misalignment(matrix):
        return 1 - torch.dot(u, torch.linalg.svd(matrix).U[:, 0]).abs().item()

    assert misalignment(w0) < 1e-6 and misalignment(w) > 1e-4, "u is the top singular vector of w0, not of w"
    assert torch.equal(dict(net.named_buffers())[u_name], before), "the module passed in is untouched"
