"""The MNIST-1D CNN with a width factor: three strided 1-D convolutions and a linear classifier.

Greydanus & Kobak, "Scaling down deep learning with MNIST-1D" (ICML 2024), the ``ConvBase`` model of their
code: ``Conv1d(1, c, 5, stride 2, padding 1)``, two ``Conv1d(c, c, 3, stride 2, padding 1)``, each followed
by a ReLU, then one linear layer on the flattened features; ``c = 25`` channels. A length-40 signal becomes
19, 10, then 5 positions, so the classifier sees ``5 c`` features. Here ``c = base_width · width``
(``base_width=25, width=1`` is the published model, 5 210 parameters), and the initialization is the lazy-
training paper's (Xavier-normal weights with a gain, zero biases, as for the CIFAR models) unless
``init="pytorch"`` keeps PyTorch's default (what the MNIST-1D code trains).
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_lazy.models.init import check_gain, check_width
from lightning_lazy.models.mnist1d import Init, apply_init

# (kernel size, stride, padding) of the three convolutions.
CNN1D_LAYOUT: tuple[tuple[int, int, int], ...] = ((5, 2, 1), (3, 2, 1), (3, 2, 1))


def conv_output_length(length: int) -> int:
    """Positions left after the three convolutions: ``L ↦ ⌊(L + 2p − k)/s⌋ + 1`` each (40 → 19 → 10 → 5)."""
    for kernel, stride, padding in CNN1D_LAYOUT:
        length = (length + 2 * padding - kernel) // stride + 1
    return length


class CNN1D(nn.Module):
    """MNIST-1D CNN: ``[N, length]`` or ``[N, 1, length]`` signals → ``[N, num_classes]`` scores.

    Args:
        width: integer channel multiplier k: every convolution has ``base_width · k`` channels.
        num_classes: number of outputs (10 for MNIST-1D).
        length: input length (40 for MNIST-1D); fixes the classifier's input size ``channels · L'`` with
            ``L'`` = :func:`conv_output_length` (5 at length 40).
        gain: Xavier-normal gain of every weight; biases start at zero.
        base_width: channels at ``width=1`` (25 in the MNIST-1D code); lower it for tiny test models.
        init: ``"xavier_normal"`` (default: the lazy-training paper's, with ``gain``) or ``"pytorch"``
            (PyTorch's default initialization, as in the MNIST-1D code).

    ReLUs are separate modules, so activation-stability hooks see every unit.
    """

    def __init__(
        self,
        width: int = 1,
        num_classes: int = 10,
        length: int = 40,
        gain: float = 1.0,
        base_width: int = 25,
        init: Init = "xavier_normal",
    ) -> None:
        super().__init__()
        self.width = check_width(width)
        base_width = check_width(base_width, "base_width")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if not isinstance(length, int) or conv_output_length(length) < 1:
            raise ValueError(f"length must be an integer >= 4 (three stride-2 convolutions), got {length!r}")
        self.gain = check_gain(gain)
        self.length = length
        channels = base_width * self.width
        layers: list[nn.Module] = []
        inputs = 1
        for kernel, stride, padding in CNN1D_LAYOUT:
            layers += [nn.Conv1d(inputs, channels, kernel, stride=stride, padding=padding), nn.ReLU()]
            inputs = channels
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels * conv_output_length(length), num_classes)
        self.num_classes = num_classes
        apply_init(self, init, self.gain)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        if x.dim() != 3 or x.shape[1] != 1 or x.shape[2] != self.length:
            raise ValueError(
                f"CNN1D(length={self.length}) expects signals [N, {self.length}] or [N, 1, {self.length}], got "
                f"{tuple(x.shape)}; set length= to the signals' length"
            )
        return self.classifier(self.features(x).flatten(1))
