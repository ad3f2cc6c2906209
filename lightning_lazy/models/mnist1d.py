"""The other MNIST-1D baselines of Greydanus & Kobak's table: logistic regression, a residual MLP and a GRU.

"Scaling down deep learning with MNIST-1D" (ICML 2024) reports test accuracies of 32 % (logistic
regression), 68 % (MLP), 94 % (CNN, :class:`~lightning_lazy.models.cnn1d.CNN1D`) and 91 % (GRU) on the
4 000 / 1 000 split. The architectures below are those their benchmark builds (``notebooks/models.py`` of
the MNIST-1D repository, as the benchmark notebook instantiates them), written here from their description:

* :class:`Logistic1D`: one linear layer, ``40 → 10`` (410 parameters).
* :class:`MLP1D`: ``z1 = relu(W1 x + b1)``, ``z2 = z1 + relu(W2 z1 + b2)`` (a residual hidden layer),
  ``y = W3 z2 + b3``; hidden width 100 (the model's default, which the benchmark uses: 15 210 parameters).
* :class:`GRU1D`: a bidirectional GRU over the 40 positions (one input feature per position, hidden size 6
  per direction, zero initial state); the outputs of every position and direction are flattened
  (``40 · 2 · 6 = 480`` features) and fed to a linear layer (5 134 parameters).

Initialization: ``init="pytorch"`` keeps PyTorch's default initialization of each layer (what the MNIST-1D
code uses); ``init="xavier_normal"`` is the lazy-training paper's (Xavier-normal weights with ``gain``, zero
biases). ReLUs are separate modules, so activation-stability hooks see every unit.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from lightning_lazy.models.init import check_gain, check_width, xavier_normal_init

INITS = ("pytorch", "xavier_normal")
Init = Literal["pytorch", "xavier_normal"]


def apply_init(module: nn.Module, init: str, gain: float = 1.0) -> None:
    """Leave PyTorch's default initialization (``"pytorch"``) or apply :func:`xavier_normal_init` with ``gain``.

    Raises ``ValueError`` naming the valid choices for any other ``init``.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if init == "xavier_normal":
        xavier_normal_init(module, gain=gain)


def _check_signal(x: Tensor, length: int, name: str) -> Tensor:
    """``[N, length]`` signals (a ``[N, 1, length]`` channel axis is dropped), else a ValueError saying so."""
    if x.dim() == 3 and x.shape[1] == 1:
        x = x.squeeze(1)
    if x.dim() != 2 or x.shape[1] != length:
        raise ValueError(f"{name}(length={length}) expects signals [N, {length}] or [N, 1, {length}], got "
                         f"{tuple(x.shape)}; set length= to the signals' length")
    return x


def _check_length(length: int) -> int:
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive integer (40 for MNIST-1D), got {length!r}")
    return length


def _check_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return num_classes


class Logistic1D(nn.Module):
    """Logistic regression on raw signals: ``[N, length] → [N, num_classes]`` scores ``W x + b``.

    Args:
        num_classes: number of outputs (10 for MNIST-1D).
        length: input length (40).
        init: ``"pytorch"`` (default, as in the MNIST-1D code) or ``"xavier_normal"``.
        gain: Xavier gain (``init="xavier_normal"`` only).
    """

    def __init__(self, num_classes: int = 10, length: int = 40, init: Init = "pytorch", gain: float = 1.0) -> None:
        super().__init__()
        self.num_classes = _check_classes(num_classes)
        self.length = _check_length(length)
        self.gain = check_gain(gain)
        self.linear = nn.Linear(self.length, self.num_classes)
        apply_init(self, init, self.gain)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(_check_signal(x, self.length, "Logistic1D"))


class MLP1D(nn.Module):
    """Residual MLP of the MNIST-1D benchmark: ``[N, length] → [N, num_classes]``.

    ``z1 = relu(W1 x + b1)``, ``z2 = z1 + relu(W2 z1 + b2)``, output ``W3 z2 + b3``, hidden width
    ``hidden · width`` (``width`` multiplies it as in the CNNs, for width sweeps).

    Args:
        hidden: hidden units at ``width=1`` (100: the model the MNIST-1D benchmark trains, 15 210 parameters).
        width: integer multiplier of the hidden width.
        num_classes: number of outputs (10).
        length: input length (40).
        init: ``"pytorch"`` (default, as in the MNIST-1D code) or ``"xavier_normal"`` (the lazy-training
            paper's initialization).
        gain: Xavier gain (``init="xavier_normal"`` only).
    """

    def __init__(self, hidden: int = 100, width: int = 1, num_classes: int = 10, length: int = 40,
                 init: Init = "pytorch", gain: float = 1.0) -> None:
        super().__init__()
        self.width = check_width(width)
        self.hidden = check_width(hidden, "hidden") * self.width
        self.num_classes = _check_classes(num_classes)
        self.length = _check_length(length)
        self.gain = check_gain(gain)
        self.linear1 = nn.Linear(self.length, self.hidden)
        self.relu1 = nn.ReLU()
        self.linear2 = nn.Linear(self.hidden, self.hidden)
        self.relu2 = nn.ReLU()
        self.linear3 = nn.Linear(self.hidden, self.num_classes)
        apply_init(self, init, self.gain)

    def forward(self, x: Tensor) -> Tensor:
        z1 = self.relu1(self.linear1(_check_signal(x, self.length, "MLP1D")))
        z2 = z1 + self.relu2(self.linear2(z1))
        return self.linear3(z2)


class GRU1D(nn.Module):
    """Bidirectional GRU of the MNIST-1D benchmark: ``[N, length] → [N, num_classes]``.

    Each position is one time step with one input feature; the hidden states of every step and both
    directions (``[N, length, 2 · hidden]``, zero initial state) are flattened and mapped linearly to the
    scores.

    Args:
        hidden: hidden size per direction (6 in the MNIST-1D benchmark: 5 134 parameters in all).
        num_classes: number of outputs (10).
        length: number of time steps (40).
        bidirectional: both directions (True in the benchmark).
        init: ``"pytorch"`` (default, as in the MNIST-1D code) or ``"xavier_normal"`` (applied to the linear
            layer only; the GRU keeps PyTorch's initialization).
        gain: Xavier gain.
    """

    def __init__(self, hidden: int = 6, num_classes: int = 10, length: int = 40, bidirectional: bool = True,
                 init: Init = "pytorch", gain: float = 1.0) -> None:
        super().__init__()
        self.hidden = check_width(hidden, "hidden")
        self.num_classes = _check_classes(num_classes)
        self.length = _check_length(length)
        self.gain = check_gain(gain)
        directions = 2 if bidirectional else 1
        self.gru = nn.GRU(input_size=1, hidden_size=self.hidden, batch_first=True, bidirectional=bidirectional)
        self.classifier = nn.Linear(directions * self.hidden * self.length, self.num_classes)
        apply_init(self.classifier, init, self.gain)

    def forward(self, x: Tensor) -> Tensor:
        x = _check_signal(x, self.length, "GRU1D").unsqueeze(-1)  # [N, length, 1]: one feature per time step
        outputs, _ = self.gru(x)  # h0 = 0 when not given
        return self.classifier(torch.flatten(outputs, 1))
