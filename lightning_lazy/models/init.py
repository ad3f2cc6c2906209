"""Initialization shared by the CIFAR models: Xavier-normal weights with a gain, zero biases.

Chizat, Oyallon & Bach (2019), section 4: "the biases are initialized with 0 and all other weights are
initialized with normal Xavier initialization". The gain multiplies the standard deviation; it sets the
scale of the network's output at initialization, which the lazy-training analysis cares about.
"""

from __future__ import annotations

import math

from torch import nn

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def check_gain(gain: float) -> float:
    """``gain`` as a float, or a ``ValueError`` saying what a valid gain is."""
    try:
        value = float(gain)
    except (TypeError, ValueError):
        raise ValueError(f"init gain must be a positive finite number, got {gain!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"init gain must be a positive finite number, got {gain!r}")
    return value


def xavier_normal_init(module: nn.Module, gain: float = 1.0) -> nn.Module:
    """Re-initialize every convolution and linear layer of ``module`` in place; return ``module``.

    Weights ~ N(0, gain² · 2 / (fan_in + fan_out)) (``torch.nn.init.xavier_normal_``), biases = 0.
    Normalization layers get weight 1 and bias 0 (their usual start), so a BatchNorm variant starts as
    the plain network's standardised counterpart.
    """
    gain = check_gain(gain)
    for m in module.modules():
        if isinstance(m, _WEIGHTED):
            nn.init.xavier_normal_(m.weight, gain=gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, _NORMS) and getattr(m, "weight", None) is not None:
            nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def check_width(width: int, name: str = "width") -> int:
    """A positive integer width factor, or a ``ValueError`` that says so."""
    if isinstance(width, bool) or not isinstance(width, int) and not (isinstance(width, float) and width.is_integer()):
        raise ValueError(f"{name} must be a positive integer channel multiplier, got {width!r}")
    width = int(width)
    if width < 1:
        raise ValueError(f"{name} must be a positive integer channel multiplier, got {width!r}")
    return width
