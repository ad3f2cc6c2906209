"""Tiny models and explicit-derivative references shared by the core tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev


def mlp(d_in: int = 5, width: int = 16, d_out: int = 3, act: type[nn.Module] = nn.Tanh, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, width), act(), nn.Linear(width, width), act(), nn.Linear(width, d_out)).double()


class FrozenFeatures(nn.Module):
    """Random ReLU features that are never trained: a model on top of them is linear in its trained weights."""

    def __init__(self, d_in: int, width: int) -> None:
        super().__init__()
        self.layer = nn.Linear(d_in, width).requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.layer(x))


def with_batchnorm_statistics(model: nn.Module) -> nn.Module:
    """``model`` in float64 with every BatchNorm's running statistics and affine parameters drawn at random (not the
    identity they start as), so a derivative that mishandles them shows."""
    model = model.double()
    for module in model.modules():  # non-trivial running statistics and affine parameters
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_()
                module.bias.normal_()
    return model


def flat_function(model: nn.Module, x: Tensor):
    """(flat parameter vector -> flat output [N*K]) and the flat vector at the current parameters."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    shapes = {k: v.shape for k, v in params.items()}

    def unflatten(vector: Tensor) -> dict[str, Tensor]:
        out, i = {}, 0
        for name, shape in shapes.items():
            out[name] = vector[i : i + shape.numel()].reshape(shape)
            i += shape.numel()
        return out

    flat = torch.cat([p.reshape(-1) for p in params.values()])
    return (lambda v: functional_call(model, unflatten(v), (x,)).reshape(-1)), flat


def explicit_jacobian(model: nn.Module, x: Tensor) -> Tensor:
    f, flat = flat_function(model, x)
    return jacrev(f)(flat)


def explicit_hessians(model: nn.Module, x: Tensor) -> Tensor:
    """[N*K, P, P]: the Hessian of every output coordinate."""
    f, flat = flat_function(model, x)
    return jacrev(jacrev(f))(flat)


def taken(history: list[dict], *keys: str) -> list[tuple[str, float]]:
    """``(key, value)`` for every entry of a monitor's ``history`` that measured ``key``: under the default budget a
    scheduled measurement may be thinned (no κ, NTK or per-layer values) or left out, but the last one, the end
    state's, is whole, so each key must be in it."""
    assert history, "nothing was measured"
    for key in keys:
        assert key in history[-1], (key, history[-1])
    return [(key, entry[key]) for entry in history for key in keys if key in entry]
