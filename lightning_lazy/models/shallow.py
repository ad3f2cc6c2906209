"""Two-layer ReLU network with τ-scaled and antisymmetric initialization (Chizat, Oyallon & Bach 2019, §3).

    h(x) = s(m) · Σ_{j=1}^m b_j · max(a_j · x, 0),      a_j ∈ R^d, b_j ∈ R,

with all weights drawn i.i.d. from N(0, τ²) and an output scale ``s(m)`` of ``1/√m`` (NTK
normalisation, the default), ``1/m`` (mean-field normalisation) or 1.

Biases: none by default. The paper's experiments feed inputs on the unit sphere to neurons
``max(a_j · x, 0)`` with ``a_j ∈ R^d`` and no bias; without biases the network is positively
2-homogeneous in its parameters, ``h(λw) = λ² h(w)``, which is what makes the initialization scale τ act
like an output scale α = τ² (κ ∝ τ⁻², see ``examples/kappa_scaling.py``), and it lets the 2-D trajectory
picture show each neuron as the single point ``|b_j| a_j`` of the plane. ``bias=True`` adds a hidden bias
(drawn and mirrored like the other weights), which breaks homogeneity.

Antisymmetric init: with ``antisymmetric=True`` (``m`` even) neurons ``m/2 + j`` copy the input weights
``a_j`` of neurons ``j ≤ m/2`` and take the output weights ``−b_j``, so ``h(w0) = 0`` exactly for every
input while ``Dh(w0)`` stays generic: the model is centred without a frozen copy of the network.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["TwoLayerReLU", "resolve_output_scale"]

_SCALES = {
    "1/m": lambda m: 1.0 / m,
    "1/sqrt(m)": lambda m: 1.0 / math.sqrt(m),
    "1": lambda m: 1.0,
}


def resolve_output_scale(output_scale: str | float, m: int) -> float:
    """The factor ``s(m)``: ``"1/m"``, ``"1/sqrt(m)"``, ``"1"``, or a positive number used as is."""
    if isinstance(output_scale, str):
        key = output_scale.replace(" ", "").replace("√m", "sqrt(m)")
        if key not in _SCALES:
            raise ValueError(
                f"unknown output_scale {output_scale!r}: use '1/m' (mean field), '1/sqrt(m)' (NTK), '1', "
                "or a positive number."
            )
        return _SCALES[key](m)
    if isinstance(output_scale, bool) or not isinstance(output_scale, (int, float)):
        raise ValueError(f"output_scale must be a string or a positive number, got {output_scale!r}.")
    value = float(output_scale)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"output_scale must be a positive finite number, got {output_scale!r}.")
    return value


class TwoLayerReLU(nn.Module):
    """``h(x) = s(m) Σ_j b_j relu(a_j · x)`` with weights ~ N(0, τ²); outputs ``[N, 1]``.

    Args:
        d: input dimension.
        m: number of hidden neurons (even when ``antisymmetric``).
        tau: initialization scale τ > 0: every weight is drawn from N(0, τ²). Small τ → feature learning,
            large τ → lazy training (for the square loss, h is 2-homogeneous, so τ acts as α = τ²).
        antisymmetric: mirror the first half of the neurons with negated output weights so h(w0) = 0.
        output_scale: ``"1/sqrt(m)"`` (default: the NTK / standard-init scaling, for which κ ≲ m^{-1/2}
            so wide nets are lazy at τ = 1), ``"1/m"`` (mean-field scaling: κ stays of order one as m
            grows, and τ alone decides laziness), ``"1"``, or a positive number.
        bias: add a hidden bias c_j (``relu(a_j · x + c_j)``), also drawn from N(0, τ²). Off by default,
            as in the paper (see the module docstring).
        seed: seeds the initialization through a private generator (``None``: the global RNG).
        dtype: parameter dtype, e.g. ``torch.float64`` for high-precision laziness measurements.

    Layers: ``hidden`` (``nn.Linear(d, m)``: rows are the ``a_j``), ``act`` (an ``nn.ReLU`` module, so
    activation-stability hooks find it), ``output`` (``nn.Linear(m, 1, bias=False)``: the ``b_j``).
    """

    def __init__(
        self,
        d: int,
        m: int,
        tau: float = 1.0,
        antisymmetric: bool = True,
        output_scale: str | float = "1/sqrt(m)",
        bias: bool = False,
        seed: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        for value, name in ((d, "d"), (m, "m")):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if antisymmetric and m % 2:
            raise ValueError(
                f"antisymmetric initialization pairs neuron j with neuron j + m/2, so m must be even; got m={m}. "
                "Use an even m or antisymmetric=False."
            )
        tau = float(tau)
        if not math.isfinite(tau) or tau <= 0:
            raise ValueError(f"tau (initialization scale) must be a positive finite number, got {tau!r}.")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point type, got {dtype}.")
        self.d, self.m, self.tau = d, m, tau
        self.antisymmetric = bool(antisymmetric)
        self.output_scale = output_scale
        self.scale = resolve_output_scale(output_scale, m)
        self.hidden = nn.Linear(d, m, bias=bias, dtype=dtype)
        self.act = nn.ReLU()
        self.output = nn.Linear(m, 1, bias=False, dtype=dtype)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Redraw all weights from N(0, τ²), mirroring them when ``antisymmetric``."""
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        dtype = self.hidden.weight.dtype
        # Draw on the CPU (a seeded CPU generator gives the same init on every device), then copy in.
        half = self.m // 2 if self.antisymmetric else self.m

        def draw(*shape: int) -> Tensor:
            return self.tau * torch.randn(*shape, generator=generator, dtype=torch.float64)

        a, b = draw(half, self.d), draw(half)
        c = draw(half) if self.hidden.bias is not None else None
        if self.antisymmetric:
            a, b = torch.cat([a, a]), torch.cat([b, -b])
            c = None if c is None else torch.cat([c, c])
        self.hidden.weight.copy_(a.to(dtype))
        self.output.weight.copy_(b.to(dtype).unsqueeze(0))
        if c is not None:
            self.hidden.bias.copy_(c.to(dtype))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.d:
            raise ValueError(
                f"TwoLayerReLU(d={self.d}) got inputs with last dimension {x.shape[-1]}; expected [N, {self.d}]."
            )
        return self.scale * self.output(self.act(self.hidden(x)))

    @torch.no_grad()
    def neurons(self) -> tuple[Tensor, Tensor]:
        """Detached copies ``(a [m, d], b [m])`` of the input and output weights."""
        return self.hidden.weight.detach().clone(), self.output.weight.detach()[0].clone()

    @torch.no_grad()
    def neuron_positions(self) -> tuple[Tensor, Tensor]:
        """``(|b_j| · a_j [m, d], sign(b_j) [m])``: the points the paper plots for each neuron in 2-D.

        For a bias-free ReLU neuron ``b relu(a · x) = sign(b) · relu((|b| a) · x)``, so ``|b| a`` and the
        sign of ``b`` describe the neuron's whole contribution.
        """
        a, b = self.neurons()
        return b.abs().unsqueeze(1) * a, torch.sign(b)

    def extra_repr(self) -> str:
        return (
            f"d={self.d}, m={self.m}, tau={self.tau:g}, antisymmetric={self.antisymmetric}, "
            f"output_scale={self.output_scale!r}, bias={self.hidden.bias is not None}"
        )
