"""CIFAR VGG-11 and ResNet-18: shapes, layer structure, width factor, BatchNorm switch, initialization."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_lazy.models.init import xavier_normal_init
from lightning_lazy.models.resnet import BasicBlock, ResNet18
from lightning_lazy.models.vgg import VGG11


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("cls", [VGG11, ResNet18])
def test_output_shape_and_dtype(cls: type[nn.Module]) -> None:
    model = cls(width=1, base_width=2, num_classes=7)
    out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 7)
    out64 = model.double()(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert out64.dtype == torch.float64


def test_vgg11_layout() -> None:
    model = VGG11(width=3, base_width=2)
    convs = _convs(model)
    assert len(convs) == 8  # VGG-11 = 8 convolutions + 1 linear layer here
    assert [c.out_channels for c in convs] == [6, 12, 24, 24, 48, 48, 48, 48]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 8
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(c.bias is not None for c in convs)
    assert model.classifier.in_features == 48


def test_vgg11_standard_size() -> None:
    # The usual CIFAR VGG-11 (base width 64, k = 1) has 9 225 610 parameters with 10 classes.
    model = VGG11()
    assert sum(p.numel() for p in model.parameters()) == 9_225_610


def test_resnet18_layout() -> None:
    model = ResNet18(width=2, base_width=2)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 8
    # 1 stem + 2 per block + three 1x1 shortcut convolutions (stages 2-4 change resolution and width).
    convs = _convs(model)
    assert len(convs) == 1 + 16 + 3
    shortcuts = [b.shortcut for b in blocks if not isinstance(b.shortcut, nn.Identity)]
    assert len(shortcuts) == 3
    assert all(s[0].kernel_size == (1, 1) and s[0].bias is not None for s in shortcuts)
    assert model.classifier.in_features == 4 * 8
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_resnet18_standard_size() -> None:
    # The CIFAR ResNet-18 with conv biases and biased 1x1 shortcuts, no BatchNorm, 10 classes.
    model = ResNet18()
    expected = 0
    for conv in _convs(model):
        expected += conv.weight.numel() + conv.bias.numel()
    expected += 512 * 10 + 10
    assert sum(p.numel() for p in model.parameters()) == expected
    assert 11.0e6 < expected < 11.3e6


@pytest.mark.parametrize("cls", [VGG11, ResNet18])
def test_width_factor_scales_channels(cls: type[nn.Module]) -> None:
    narrow, wide = cls(width=1, base_width=2), cls(width=4, base_width=2)
    assert [4 * c.out_channels for c in _convs(narrow)] == [c.out_channels for c in _convs(wide)]


@pytest.mark.parametrize("cls", [VGG11, ResNet18])
def test_batchnorm_option(cls: type[nn.Module]) -> None:
    model = cls(base_width=2, batchnorm=True)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == len(_convs(model))
    assert all(c.bias is None for c in _convs(model))  # BatchNorm's shift replaces the bias
    assert model(torch.randn(4, 3, 32, 32)).shape == (4, 10)


@pytest.mark.parametrize("cls", [VGG11, ResNet18])
@pytest.mark.parametrize("gain", [1.0, 2.0])
def test_xavier_normal_init_with_gain(cls: type[nn.Module], gain: float) -> None:
    torch.manual_seed(0)
    model = cls(width=2, base_width=8, gain=gain)
    for layer in [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]:
        w = layer.weight
        receptive = w[0][0].numel() if w.dim() > 2 else 1
        fan_in, fan_out = w.shape[1] * receptive, w.shape[0] * receptive
        expected = gain * math.sqrt(2.0 / (fan_in + fan_out))
        # Thousands of samples per layer: the empirical std is within a few percent of Xavier's.
        tolerance = 4.0 / math.sqrt(w.numel()) + 0.01
        assert abs(w.std().item() / expected - 1) < tolerance, (layer, w.std().item(), expected)
        assert abs(w.mean().item()) < 4 * expected / math.sqrt(w.numel())
        assert torch.count_nonzero(layer.bias) == 0


def test_init_helper_resets_norm_layers() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(3.0)
    xavier_normal_init(net, gain=1.0)
    assert torch.all(net[1].weight == 1) and torch.all(net[1].bias == 0)
    assert torch.all(net[0].bias == 0) and net[0].weight.std() < 1.0


def test_gain_changes_output_scale() -> None:
    x = torch.randn(16, 3, 32, 32)
    torch.manual_seed(1)
    small = VGG11(base_width=4, gain=1.0)(x).std().item()
    torch.manual_seed(1)
    large = VGG11(base_width=4, gain=2.0)(x).std().item()
    # 9 linear layers, ReLU positively homogeneous, zero biases: the output scales exactly like gain^9.
    assert large / small == pytest.approx(2.0**9, rel=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"width": 0}, "width"), ({"width": 1.5}, "width"), ({"gain": -1.0}, "gain"), ({"base_width": 0}, "base_width"),
     ({"num_classes": 0}, "num_classes")],
)
@pytest.mark.parametrize("cls", [VGG11, ResNet18])
def test_bad_arguments(cls: type[nn.Module], kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_bad_input_shapes() -> None:
    with pytest.raises(ValueError, match="32x32"):
        VGG11(base_width=2)(torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError, match="H, W >= 8"):
        ResNet18(base_width=2)(torch.randn(2, 3, 4, 4))


@pytest.mark.parametrize("cls", [VGG11, ResNet18])
def test_gradients_reach_every_parameter(cls: type[nn.Module]) -> None:
    model = cls(base_width=2)
    model(torch.randn(4, 3, 32, 32)).pow(2).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
