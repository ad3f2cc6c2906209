"""How far the network has moved: the path divergence Δ, displacement, ReLU activation stability."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from lightning_lazy._params import check_finite
from lightning_lazy.diagnostics._common import (
    ModelLike,
    Params,
    _check_probe,
    _output,
)
from lightning_lazy.scaling import regression_target_and_mask


def path_divergence(output: Tensor, tangent_output: Tensor, target: Tensor, initial_output: Tensor) -> Tensor:
    """Δ = ‖α h(w(t)) − α h̄(w̄(t))‖_F / ‖y* − α h(w0)‖_F on the probe, all arguments ``[N, K]``.

    ``output`` / ``tangent_output``: the trained model and its linearized twin; ``initial_output``: the
    trained model at initialization. ``target`` may be class indices of the output's shape without its last
    dimension (``[N]`` for ``[N, K]``, ``[N, T]`` for token logits ``[N, T, V]``; one-hot encoded); positions whose
    class index is −100 (``scaling.IGNORE_INDEX``, the loss's ``ignore_index``) are left out of both norms.
    """
    for name, tensor in (("output", output), ("tangent_output", tangent_output), ("initial_output", initial_output)):
        if tensor.shape != output.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected the output's {tuple(output.shape)}")
        check_finite(tensor, name)
    target, keep = regression_target_and_mask(output, target)
    check_finite(target, "target")
    if keep is not None:  # the ignored positions are in no norm: as in the loss, they are not trained
        output, tangent_output, initial_output = output * keep, tangent_output * keep, initial_output * keep
    scale = (target - initial_output).norm()
    if float(scale) == 0.0:
        raise ValueError("the target equals the initial output on the probe: the divergence has no scale")
    return (output - tangent_output).norm() / scale


# ----------------------------------------------------------------------------------------------------
# weights and activations


class Displacement(NamedTuple):
    """``total`` = ‖w − w0‖/‖w0‖; ``per_tensor`` = ‖w_p − w0_p‖/‖w0_p‖ for tensors with w0_p ≠ 0;
    ``absolute`` = ‖w_p − w0_p‖ for every tensor (zero-initialized biases have no relative scale)."""

    total: Tensor
    per_tensor: dict[str, Tensor]
    absolute: dict[str, Tensor]


def displacement(params: Params, initial_params: Params) -> Displacement:
    """Relative distance of the weights from initialization, overall and per parameter tensor."""
    if set(params) != set(initial_params):
        missing = sorted(set(params) ^ set(initial_params))
        raise ValueError(f"params and initial_params name different tensors: {missing[:5]}")
    if not params:
        raise ValueError("params is empty")
    absolute: dict[str, Tensor] = {}
    per_tensor: dict[str, Tensor] = {}
    moved_sq = None
    initial_sq = None
    for name, w in params.items():
        w0 = initial_params[name]
        if w.shape != w0.shape:
            raise ValueError(f"{name}: shape {tuple(w.shape)} differs from its initial {tuple(w0.shape)}")
        diff = (w.detach() - w0.detach()).norm()
        scale = w0.detach().norm()
        absolute[name] = diff
        if float(scale) > 0:
            per_tensor[name] = diff / scale
        moved_sq = diff**2 if moved_sq is None else moved_sq + diff**2
        initial_sq = scale**2 if initial_sq is None else initial_sq + scale**2
    if float(initial_sq) == 0.0:
        raise ValueError("all initial parameters are zero: the relative displacement has no scale")
    return Displacement(torch.sqrt(moved_sq / initial_sq), per_tensor, absolute)


_RELU_FUNCTIONS = {
    torch.relu,
    torch.relu_,
    torch.nn.functional.relu,
    torch.nn.functional.relu_,
    Tensor.relu,
    Tensor.relu_,
}


class _ReluRecorder(TorchFunctionMode):
    """Records, for every ReLU call (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``x.relu()``), which units are on."""

    def __init__(self) -> None:
        super().__init__()
        self.states: list[Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch protocol
        if func in _RELU_FUNCTIONS and args and isinstance(args[0], Tensor):
            self.states.append(args[0].detach() > 0)  # before the call: relu_ overwrites its input
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def recording_relu_states() -> Iterator[list[Tensor]]:
    """Within the block, the on/off state (bool) of every ReLU unit any forward computes is appended to the
    list yielded, one tensor per ReLU call in call order. For a forward whose output is needed anyway (the
    divergence's, say): its activation states then cost no forward of their own."""
    recorder = _ReluRecorder()
    with recorder:
        yield recorder.states


def relu_states(model: ModelLike, x: Tensor, params: Params) -> list[Tensor]:
    """On/off state (``pre-activation > 0``, bool) of every ReLU unit on the probe ``x`` at ``params``, one
    tensor per ReLU call in call order (one no-grad forward). Compute it once at w0 and pass it to
    :func:`activation_stability` as ``initial_states``: each later measurement then costs one forward."""
    _check_probe(x)
    with recording_relu_states() as states:
        _output(model, x, params)
    return states


def activation_stability(
    model: ModelLike,
    x: Tensor,
    params: Params,
    initial_params: Params | None = None,
    *,
    initial_states: list[Tensor] | None = None,
) -> Tensor:
    """Share of ReLU units, over all ReLU calls and probe inputs, whose on/off state at ``params``
    equals the one at ``initial_params``: (1/U) Σ_units 1[pre-activation(w) > 0 ⇔ pre-activation(w0) > 0].

    Every ReLU is seen, whether an ``nn.ReLU`` module or a functional ``F.relu`` / ``torch.relu`` /
    ``Tensor.relu`` call (a ``TorchFunctionMode`` records them in call order). Other activations
    (GELU, LeakyReLU, ...) are not counted; a model with no ReLU is an error. ``initial_states`` (from
    :func:`relu_states` at w0) replaces ``initial_params``: one forward of the probe instead of two. Memory:
    one bool per unit and probe example (U numbers), kept at w0.
    """
    _check_probe(x)
    if initial_states is None:
        if initial_params is None:
            raise ValueError("activation_stability needs initial_params or initial_states")
        initial_states = relu_states(model, x, initial_params)
    then = initial_states
    if not then:
        raise ValueError(
            "the model applies no ReLU (nn.ReLU, F.relu, torch.relu or Tensor.relu) on the probe, so "
            "activation stability is undefined"
        )
    now = relu_states(model, x, params)
    if len(now) != len(then) or any(a.shape != b.shape for a, b in zip(now, then)):
        raise ValueError("the model applied a different sequence of ReLUs at params and at initial_params")
    same = sum(int((a == b).sum()) for a, b in zip(now, then))
    total = sum(a.numel() for a in now)
    return torch.tensor(same / total, dtype=x.dtype if x.is_floating_point() else torch.float64)
