"""CIFAR VGG-11 with a width factor, BatchNorm off by default (the paper's variant).

Eight 3×3 convolutions in five stages, each stage closed by a 2×2 max-pool, so a 32×32 image ends as a
1×1 map; one linear layer maps it to the class scores. Stage widths are ``base_width · width · (1, 2, 4,
8, 8)``: ``base_width=64, width=1`` is the usual CIFAR VGG-11 (9.2 M parameters), ``width=4`` the "wide"
model of the shipped configs (see ``docs/cnn_experiments.md``).
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_lazy.models.init import check_gain, check_width, xavier_normal_init

# Output channels of the eight convolutions in units of base_width; "M" is a 2×2 max-pool.
VGG11_LAYOUT: tuple[int | str, ...] = (1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M")


class VGG11(nn.Module):
    """CIFAR VGG-11: ``[N, in_channels, 32, 32] -> [N, num_classes]``.

    Args:
        width: integer channel multiplier k (the paper's "wide" factor).
        num_classes: number of outputs.
        batchnorm: put a BatchNorm2d after each convolution. Off by default: the paper trains without
            it, because batch statistics make the model depend on the batch and break the tangent-model
            picture.
        gain: Xavier-normal gain of every weight; biases start at zero.
        base_width: channels of the first stage at ``width=1`` (64 in VGG); lower it for tiny test models.
        in_channels: input channels (3 for CIFAR-10).
    """

    def __init__(
        self,
        width: int = 1,
        num_classes: int = 10,
        batchnorm: bool = False,
        gain: float = 1.0,
        base_width: int = 64,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.width = check_width(width)
        base_width = check_width(base_width, "base_width")
        if num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.gain = check_gain(gain)
        self.batchnorm = bool(batchnorm)
        layers: list[nn.Module] = []
        channels = in_channels
        for item in VGG11_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            out = int(item) * base_width * self.width
            # With BatchNorm the convolution's bias would be cancelled by the mean subtraction.
            layers.append(nn.Conv2d(channels, out, kernel_size=3, padding=1, bias=not self.batchnorm))
            if self.batchnorm:
                layers.append(nn.BatchNorm2d(out))
            # Module ReLUs (not in-place) so activation-stability hooks can see every unit.
            layers.append(nn.ReLU())
            channels = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)
        self.num_classes = num_classes
        xavier_normal_init(self, gain=self.gain)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[-2:] != (32, 32):
            raise ValueError(
                f"VGG11 expects images of shape [N, C, 32, 32] (five 2x2 max-pools reduce 32x32 to 1x1), "
                f"got {tuple(x.shape)}; resize or crop inputs to 32x32"
            )
        return self.classifier(self.features(x).flatten(1))
