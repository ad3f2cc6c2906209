"""The channel-factored per-example Jacobians of the structured NTK (a layer followed by global average pooling)
against explicit Jacobians, float64.

A layer whose cotangent rows over the K outputs are multiples of one row per example and channel (global average
pooling then a linear head) takes the form J_ik = diag(c_ik)·A_i; every other layer keeps its form. Each model is
checked on the whole kernel, x2 ≠ x1, the traced kernel, per-layer blocks, chunks of examples and a budget that
forces blocks, and the test says which layers took the factored form.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lazy import diagnostics as D
from lightning_lazy.diagnostics.ntk import structured

from helpers_core import explicit_jacobian, with_batchnorm_statistics


class _TokenMean(nn.Module):
    """Dense layer on tokens [n, T, d], ReLU, mean over the tokens, linear head: a dense layer with S = T > 1."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.embed(x.reshape(x.shape[0], 5, 4))).mean(1))


class _Gated(nn.Module):
    """Global average pooling plus, on examples whose first pixel is positive, a read-out of one position: the last
    convolution's cotangent factors on some examples only (mixed forms across chunks and between x1 and x2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head, self.read = nn.Conv2d(2, 4, 3, padding=1), nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        gate = (x[:, 0, 0, 0] > 0).to(x.dtype).unsqueeze(1)
        return self.head(h.mean((2, 3))) + gate * self.read(h[:, :, 1, 1])


def _gap(*convs: nn.Module, out: int = 3, pool: nn.Module | None = None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for conv in convs:
        layers += [conv, nn.ReLU()] if not isinstance(conv, nn.modules.batchnorm._BatchNorm) else [conv]
    channels = [m for m in convs if isinstance(m, nn.modules.conv._ConvNd)][-1].out_channels
    return nn.Sequential(*layers, pool or nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, out))


def _models() -> dict[str, tuple[nn.Module, tuple[int, ...], bool]]:
    """name -> (model, input shape, whether some layer takes the factored form on the 6 examples of the test)."""
    torch.manual_seed(0)
    return {
        "gap_cnn": (_gap(nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 5, 3, padding=1)), (2, 8, 8), True),
        "gap_cnn_no_bias": (
            _gap(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.Conv2d(4, 5, 3, padding=1, bias=False)), (2, 8, 8), True
        ),
        "gap_strided_padded_dilated": (
            _gap(nn.Conv2d(2, 4, 3, stride=2, padding=2), nn.Conv2d(4, 5, (2, 3), padding="same"),
                 nn.Conv2d(5, 4, 3, stride=(1, 2), padding=1, dilation=2)),
            (2, 9, 10), True,
        ),
        "gap_batchnorm": (
            nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(5, 3)),
            (2, 6, 6), True,
        ),
        "conv1d_gap": (
            nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv1d(4, 5, 3, stride=2), nn.ReLU(),
                          nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(5, 3)),
            (2, 11), True,
        ),
        "no_gap": (
            nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(27, 3)),
            (2, 8, 8), False,
        ),
        "token_mean": (_TokenMean(), (20,), True),
        "gated": (_Gated(), (2, 6, 6), False),  # not on all 6 examples at once; on chunks, see below
    }


def _prepared(model: nn.Module) -> nn.Module:
    return with_batchnorm_statistics(model).eval()


def _explicit(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor, owner: str | None = None) -> torch.Tensor:
    """J(x1) J(x2)ᵀ from full Jacobians, restricted to the parameters of module ``owner`` (None: all)."""
    j1, j2 = explicit_jacobian(model, x1), explicit_jacobian(model, x2)
    if owner is not None:
        keep = torch.cat([torch.full((p.numel(),), D.owning_module(name) == owner)
                          for name, p in model.named_parameters()])
        j1, j2 = j1[:, keep], j2[:, keep]
    return j1 @ j2.T


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12 * float(expected.abs().max()))


@pytest.fixture
def factored(monkeypatch):
    """Records, for every call of the factor check, the cotangent's shape and whether it factored."""
    seen: list[tuple[tuple[int, ...], bool]] = []
    check = structured._channel_factors

    def spy(g, *args, **kwargs):
        result = check(g, *args, **kwargs)
        seen.append((tuple(g.shape), result is not None))
        return result

    monkeypatch.setattr(structured, "_channel_factors", spy)
    return seen


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("name", list(_models()))
def test_factored_kernel_equals_explicit_jacobians(name, factored):
    model, shape, factors = _models()[name]
    model = _prepared(model)
    generator = torch.Generator().manual_seed(1)
    x1 = torch.randn(6, *shape, generator=generator, dtype=torch.float64)
    x2 = torch.randn(4, *shape, generator=generator, dtype=torch.float64)
    if name == "gated":  # both gates on both sides
        x1[::2, 0, 0, 0], x1[1::2, 0, 0, 0] = 1.0, -1.0
        x2[:2, 0, 0, 0], x2[2:, 0, 0, 0] = 1.0, -1.0
    full = _explicit(model, x1, x1)
    _close(D.empirical_ntk(model, x1), full)
    assert any(ok for _, ok in factored) == factors, factored
    cross = _explicit(model, x1, x2)
    _close(D.empirical_ntk(model, x1, x2), cross)
    k_out = cross.shape[0] // len(x1)
    traced = cross.reshape(len(x1), k_out, len(x2), k_out).diagonal(dim1=1, dim2=3).sum(-1)
    _close(D.empirical_ntk(model, x1, x2, trace=True), traced)
    _close(D.empirical_ntk(model, x1, chunk_size=2), full)  # chunks of examples, concatenated (gated: mixed forms)
    _close(D.empirical_ntk(model, x1, x2, memory_budget=400), cross)  # features in blocks of x1
    _close(D.empirical_ntk(model, x1, x2, memory_budget=400, trace=True), traced)
    blocks = D.empirical_ntk(model, x1, x2, per_layer=True)
    owners = list(dict.fromkeys(D.owning_module(k) for k, _ in model.named_parameters()))
    assert list(blocks) == owners
    for owner, block in blocks.items():
        _close(block, _explicit(model, x1, x2, owner))


def test_the_layer_before_pooling_factors_and_the_others_do_not(factored):
    model, shape, _ = _models()["gap_cnn"]
    D.empirical_ntk(_prepared(model), torch.randn(3, *shape, dtype=torch.float64))
    # [n, K, O, S] per tapped layer that the plan lets try: the first convolution's rows are not multiples of one
    # another (its cotangent went through the second convolution), the second's are.
    assert (((3, 3, 5, 64), True) in factored) and (((3, 3, 4, 64), False) in factored), factored


def test_gated_model_takes_mixed_forms(factored):
    model, shape, _ = _models()["gated"]
    model = _prepared(model)
    x = torch.randn(4, *shape, dtype=torch.float64)
    x[:2, 0, 0, 0], x[2:, 0, 0, 0] = -1.0, 1.0
    _close(D.empirical_ntk(model, x, chunk_size=2), _explicit(model, x, x))  # chunks in different forms
    assert [ok for _, ok in factored] == [True, False], factored
    x1, x2 = x[:2], x[2:]  # x1's cotangent factors, x2's does not: their Gram in different forms
    _close(D.empirical_ntk(model, x1, x2), _explicit(model, x1, x2))
    _close(D.empirical_ntk(model, x1, x2, trace=True),
           _explicit(model, x1, x2).reshape(2, 3, 2, 3).diagonal(dim1=1, dim2=3).sum(-1))
    assert [ok for _, ok in factored[2:]] == [True, False] * 2, factored  # x1 then x2, twice


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_channel_factors_accepts_exact_structure_and_rejects_rank_two(dtype):
    generator = torch.Generator().manual_seed(0)
    n, k_out, o, s = 5, 4, 3, 7
    c = torch.randn(n, k_out, o, generator=generator, dtype=dtype)
    m = torch.randn(n, o, s, generator=generator, dtype=dtype) * (torch.rand(n, o, s, generator=generator) > 0.3)
    c[1, :, 2] = 0  # a channel with no cotangent, and one output unit with none
    c[2, 1] = 0
    g = c.unsqueeze(3) * m.unsqueeze(1)
    found = structured._channel_factors(g, block=2 * k_out * o * s)
    assert found is not None
    torch.testing.assert_close(found[0].unsqueeze(3) * found[1].unsqueeze(1), g, rtol=0, atol=8 * torch.finfo(dtype).eps)
    scale = 1e-9 if dtype == torch.float64 else 1e-4  # far below 1, far above the tolerance
    for example in (0, 3):  # the first example (checked alone) and one in a later block
        bent = g.clone()
        bent[example, 1, 0, 2] += scale * g[example, 1, 0].norm()
        assert structured._channel_factors(bent, block=2 * k_out * o * s) is None
    cancelling = g.clone()  # rows that sum to zero: m_io vanishes while the rows do not
    cancelling[4, :, 1] = 0
    cancelling[4, 0, 1], cancelling[4, 1, 1] = m[4, 1], -m[4, 1]
    assert structured._channel_factors(cancelling) is None


def test_mixed_forms_in_gram_and_concatenation():
    model, shape, _ = _models()["gap_cnn"]
    model = _prepared(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(5, *shape, dtype=torch.float64)
    recorder = structured._LayerRecorder(params)
    with torch.no_grad(), recorder:
        torch.func.functional_call(model, params, (x[:2],))
    plan = structured._plan_structured(recorder, params, 3, 5, 5, False, 1 << 20)
    assert plan.factor, "the plan lets the layer before pooling try the factored form"
    features = [entry for call in structured._structured_features(model, x, params, plan, 5) for entry in call]
    kinds = [entry[0] for entry in features]
    assert "factored" in kinds, kinds
    as_jac = [("jac", structured._as_jacobian(entry)) for entry in features]
    for trace in (False, True):
        expected = structured._gram(as_jac, as_jac, trace, 1 << 20)[""]
        _close(structured._gram(features, as_jac, trace, 1 << 20)[""], expected)
        _close(structured._gram(features, features, trace, 1 << 20)[""], expected)
        _close(structured._gram(features, features, trace, 1)[""], expected)  # the factored Gram by single rows
    for entry in features:  # chunks in different forms are joined as Jacobians
        first = (entry[0], *(t[:3] for t in entry[1:]))
        joined = structured._concat([first, ("jac", structured._as_jacobian(entry)[3:])])
        assert joined[0] == "jac"
        _close(joined[1], structured._as_jacobian(entry))


@pytest.mark.parametrize("dims, options", [
    (2, dict(stride=1, padding=1, dilation=1)),
    (2, dict(stride=(2, 1), padding=(0, 2), dilation=(1, 2))),
    (2, dict(stride=1, padding="same", dilation=1)),  # even kernel: one more pixel after than before
    (1, dict(stride=2, padding=1, dilation=2)),
    (3, dict(stride=(1, 2, 1), padding="same", dilation=1)),
])
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
def test_patches_and_example_weight_gradients_reproduce_the_convolution(dims, options):
    generator = torch.Generator().manual_seed(0)
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    if options["padding"] == "same":
        options = dict(options, stride=1)
    x = torch.randn(3, 2, *(7, 8, 6)[:dims], generator=generator, dtype=torch.float64)
    weight = torch.randn(4, 2, *(2, 3, 2)[:dims], generator=generator, dtype=torch.float64)
    out = conv(x, weight, **options)
    recorder = structured._LayerRecorder({"w": weight})
    with recorder:
        conv(x, weight, **options)
    call = recorder.calls[0]
    patches = structured._patches(x, call.options)  # [n, S, C·Π kernel]
    torch.testing.assert_close((patches @ weight.reshape(4, -1).T).mT.reshape(out.shape), out)
    m = torch.randn(3, 4, patches.shape[1], generator=generator, dtype=torch.float64)
    torch.testing.assert_close(structured._example_weight_gradients(m, x, call), m @ patches)


@pytest.mark.parametrize("rows", [255, 257, 301])
def test_symmetric_product_from_blocks_above_the_diagonal(rows):
    j = torch.randn(rows, 7, generator=torch.Generator().manual_seed(rows), dtype=torch.float64)
    torch.testing.assert_close(structured._symmetric_product(j), j @ j.T, rtol=1e-13, atol=1e-13)


def test_many_examples_symmetric_kernel_equals_explicit_jacobians():
    model, shape, _ = _models()["no_gap"]  # per-example Jacobians of 90·3 rows: the blocked symmetric product
    model = _prepared(model)
    x = torch.randn(90, *shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    _close(D.empirical_ntk(model, x), _explicit(model, x, x))
