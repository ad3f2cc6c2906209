"""CIFAR ResNet-18 with a width factor; the paper's variant has no BatchNorm and 1×1-convolution shortcuts.

A 3×3 stem, four stages of two basic blocks (widths ``base_width · width · (1, 2, 4, 8)``, stride 2 at
the start of stages 2–4), global average pooling and one linear layer. Where a block changes the
resolution or the number of channels its shortcut is a 1×1 convolution (with bias when there is no
BatchNorm), as in the authors' no-BN ResNet; otherwise it is the identity.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_lazy.models.init import check_gain, check_width, xavier_normal_init


def _conv3x3(cin: int, cout: int, stride: int, batchnorm: bool) -> list[nn.Module]:
    conv = nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=not batchnorm)
    return [conv, nn.BatchNorm2d(cout)] if batchnorm else [conv]


class BasicBlock(nn.Module):
    """``relu(F(x) + S(x))`` with ``F = conv3x3 → [BN] → relu → conv3x3 → [BN]`` and S identity or 1×1 conv."""

    def __init__(self, cin: int, cout: int, stride: int = 1, batchnorm: bool = False) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            *_conv3x3(cin, cout, stride, batchnorm), nn.ReLU(), *_conv3x3(cout, cout, 1, batchnorm)
        )
        if stride != 1 or cin != cout:
            shortcut: list[nn.Module] = [nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=not batchnorm)]
            if batchnorm:
                shortcut.append(nn.BatchNorm2d(cout))
            self.shortcut: nn.Module = nn.Sequential(*shortcut)
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.branch(x) + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18: ``[N, in_channels, H, W] -> [N, num_classes]`` (H, W ≥ 8; 32 for CIFAR-10).

    Args:
        width: integer channel multiplier k (the paper's "wide" factor).
        num_classes: number of outputs.
        batchnorm: BatchNorm after each convolution. Off by default, as in the paper.
        gain: Xavier-normal gain of every weight; biases start at zero.
        base_width: channels of the first stage at ``width=1`` (64 in ResNet-18); lower it for tiny models.
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
        c = base_width * self.width
        self.stem = nn.Sequential(*_conv3x3(in_channels, c, 1, self.batchnorm), nn.ReLU())
        blocks: list[nn.Module] = []
        cin = c
        for stage, mult in enumerate((1, 2, 4, 8)):
            cout = c * mult
            for i in range(2):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(cin, cout, stride, self.batchnorm))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)
        self.num_classes = num_classes
        xavier_normal_init(self, gain=self.gain)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or min(x.shape[-2:]) < 8:
            raise ValueError(
                f"ResNet18 expects images of shape [N, C, H, W] with H, W >= 8 (three stride-2 stages), "
                f"got {tuple(x.shape)}"
            )
        return self.classifier(self.pool(self.blocks(self.stem(x))).flatten(1))
