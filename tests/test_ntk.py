"""The empirical NTK's fast implementations against the column-by-column reference ("products"), float64.

Each model is chosen to exercise one path: dense and convolutional layers (structured), pooling, BatchNorm in
eval mode (structured affine parameters), residual sums, attention written by hand and nn.MultiheadAttention
(whose fused projections go through the generic per-example path), LayerNorm (structured), tied weights, frozen
parameters, and a functional model.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_lazy import diagnostics as D
from lightning_lazy.diagnostics.ntk.structured import _LayerRecorder, _plan_structured

from helpers_core import explicit_jacobian, mlp, with_batchnorm_statistics


class _ResBlock(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


class _Attention(nn.Module):
    """Single-head self-attention written out: q, k, v, output projections are F.linear on [N, L, d]."""

    def __init__(self, d: int = 6, length: int = 4) -> None:
        super().__init__()
        self.length, self.d = length, d
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d * length, 3)

    def forward(self, x):
        x = x.reshape(x.shape[0], self.length, self.d)
        h = self.norm(x)
        weights = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) / math.sqrt(self.d), -1)
        return self.out((x + weights @ self.v(h)).flatten(1))


class _TorchAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(6, 2, batch_first=True)
        self.out = nn.Linear(24, 3)

    def forward(self, x):
        x = x.reshape(x.shape[0], 4, 6)
        y, _ = self.attention(x, x, x, need_weights=False)
        return self.out(y.flatten(1))


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared, self.head = nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def _models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    return {
        "mlp": (nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)), (5,)),
        "cnn_pooling": (
            nn.Sequential(
                nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 3, stride=2, padding=1),
                nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
            ),
            (2, 8, 8),
        ),
        "conv1d_same_dilated": (
            nn.Sequential(nn.Conv1d(2, 3, 3, padding="same", dilation=2), nn.Tanh(), nn.Flatten(), nn.Linear(27, 2)),
            (2, 9),
        ),
        "conv3d_strided": (
            nn.Sequential(nn.Conv3d(1, 2, 2, stride=(1, 2, 1)), nn.Tanh(), nn.Flatten(), nn.Linear(36, 2)), (1, 4, 4, 4)
        ),
        "resnet_block_batchnorm": (
            nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), _ResBlock(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)),
            (2, 6, 6),
        ),
        "attention": (_Attention(), (24,)),
        "multihead_attention": (_TorchAttention(), (24,)),
        "tied": (_Tied(), (5,)),
        "batchnorm1d": (nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)), (5,)),
    }


def _prepared(model: nn.Module) -> nn.Module:
    return with_batchnorm_statistics(model).train()  # the NTK is taken in eval mode whatever the module's mode


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.fixture(autouse=True)
def _forward_ad_kernels():
    # The "products" reference uses forward AD; MHA's fused CPU kernels have no forward-AD rule.
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    with sdpa_kernel(SDPBackend.MATH):
        yield
    torch.backends.mha.set_fastpath_enabled(previous)


@pytest.mark.parametrize("name", list(_models()))
def test_fast_implementations_equal_products(name):
    model, shape = _models()[name]
    model = _prepared(model)
    generator = torch.Generator().manual_seed(1)
    x1 = torch.randn(5, *shape, generator=generator, dtype=torch.float64)
    x2 = torch.randn(3, *shape, generator=generator, dtype=torch.float64)
    reference = D.empirical_ntk(model, x1, implementation="products")
    assert reference.shape == (5 * 3 if name not in ("conv1d_same_dilated", "conv3d_strided", "batchnorm1d") else 10,) * 2
    for implementation in ("auto", "structured", "jacobian"):
        assert _relative(D.empirical_ntk(model, x1, implementation=implementation), reference) < 1e-6, implementation
    # Off-diagonal blocks, the traced kernel, a budget that forces chunks of one example and blocks.
    cross = D.empirical_ntk(model, x1, x2, implementation="products")
    assert _relative(D.empirical_ntk(model, x1, x2), cross) < 1e-6
    traced = D.empirical_ntk(model, x1, x2, implementation="products", trace=True)
    k_out = cross.shape[0] // 5
    torch.testing.assert_close(traced, cross.reshape(5, k_out, 3, k_out).diagonal(dim1=1, dim2=3).sum(-1))
    assert _relative(D.empirical_ntk(model, x1, x2, trace=True), traced) < 1e-6
    assert _relative(D.empirical_ntk(model, x1, memory_budget=200), reference) < 1e-6
    assert _relative(D.empirical_ntk(model, x1, x2, memory_budget=300, trace=True), traced) < 1e-6
    assert model.training, "the module's mode is restored"


def _plan(model: nn.Module, x: torch.Tensor, params: dict | None = None) -> set[str]:
    """Names of the parameters the structured path covers (the rest go through the generic path)."""
    params = params or {k: v.detach() for k, v in model.named_parameters()}
    pilot = _LayerRecorder(params)
    with torch.no_grad(), pilot:
        torch.func.functional_call(model.eval(), params, (x,))
    plan = _plan_structured(pilot, params, 3, len(x), len(x), False, 1 << 20)
    return {name for w, b, _ in plan.taps.values() for name in (w, b) if name is not None}


def test_structured_path_covers_layers_and_leaves_the_rest_generic():
    models = _models()
    resnet, _ = models["resnet_block_batchnorm"]
    covered = _plan(_prepared(resnet), torch.randn(2, 2, 6, 6, dtype=torch.float64))
    assert covered == {k for k, _ in resnet.named_parameters()}, "convolutions and eval BatchNorm are structured"
    attention, _ = models["attention"]
    covered = _plan(_prepared(attention), torch.randn(2, 24, dtype=torch.float64))
    assert covered == {k for k, _ in attention.named_parameters()}, "dense layers and LayerNorm are structured"
    tied, _ = models["tied"]
    assert _plan(_prepared(tied), torch.randn(2, 5, dtype=torch.float64)) == {"head.weight", "head.bias"}
    torch_attention, _ = models["multihead_attention"]
    covered = _plan(_prepared(torch_attention), torch.randn(2, 24, dtype=torch.float64))
    assert covered == {"out.weight", "out.bias"}, "MHA's projections are applied inside one fused function"


def test_frozen_parameters_and_functional_model():
    net = mlp(width=6)
    x = torch.randn(6, 5, dtype=torch.float64)
    frozen = {k: v.detach() for k, v in net.named_parameters() if k != "0.weight"}  # 0.weight held fixed
    reference = D.empirical_ntk(net, x, params=frozen, implementation="products")
    jacobian = explicit_jacobian(net, x)
    sizes = [p.numel() for p in net.parameters()]
    keep = torch.cat([torch.full((s,), k != "0.weight") for (k, _), s in zip(net.named_parameters(), sizes)])
    torch.testing.assert_close(reference, jacobian[:, keep] @ jacobian[:, keep].T)
    for implementation in ("auto", "structured", "jacobian"):
        assert _relative(D.empirical_ntk(net, x, params=frozen, implementation=implementation), reference) < 1e-6
    params = {k: v.detach() for k, v in net.named_parameters()}
    fn = lambda p, inputs: torch.func.functional_call(net, p, (inputs,))  # noqa: E731
    assert _relative(D.empirical_ntk(fn, x, params=params), jacobian @ jacobian.T) < 1e-6


def test_training_mode_batchnorm_in_a_functional_model_falls_back_to_products():
    torch.manual_seed(0)
    # Batch statistics without running-statistics updates (an in-place update cannot run under torch.func).
    net = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.Tanh(), nn.Linear(6, 2))
    net = net.double().train()
    params = {k: v.detach() for k, v in net.named_parameters()}
    fn = lambda p, inputs: torch.func.functional_call(net, p, (inputs,))  # noqa: E731 - batch statistics
    x = torch.randn(6, 5, dtype=torch.float64)
    reference = D.empirical_ntk(fn, x, params=params, implementation="products")
    assert _relative(D.empirical_ntk(fn, x, params=params), reference) < 1e-12
    with pytest.raises(ValueError, match="BatchNorm in training mode"):
        D.empirical_ntk(fn, x, params=params, implementation="structured")


def test_structured_is_linear_in_the_inputs_not_quadratic():
    # Count model evaluations: the structured path records a fixed number of forwards (pilot + chunks),
    # whereas the reference needs one backward per column. A count, not a timing.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 2)).double()
    calls = []
    net.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    for n in (8, 32):
        calls.clear()
        D.empirical_ntk(net, torch.randn(n, 5, dtype=torch.float64))
        assert sum(calls) <= n + 2, calls


def test_bad_arguments():
    net = mlp()
    x = torch.randn(3, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="implementation must be one of"):
        D.empirical_ntk(net, x, implementation="fast")
    with pytest.raises(ValueError, match="memory_budget"):
        D.empirical_ntk(net, x, memory_budget=0)
