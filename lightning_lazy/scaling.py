"""α-scaling of a model around its initialization and the scaled objective R(αh)/α².

Chizat, Oyallon & Bach (2019), section 2: for a model h with h(w0) = 0, training α·h on the objective
F_α(w) = R(α h(w)) / α² becomes *lazy* as α grows: the weights move by O(1/α) and the model stays close
to its linearization around w0. Centring (subtracting a frozen copy of the initial network) makes
h(w0) = 0 hold for any network.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_lazy._params import FrozenParams, functional_call

LossFn = Callable[[Tensor, Tensor], Tensor]
LossLike = Union[str, LossFn]


#: The target value that marks a position to ignore, as ``torch.nn.functional.cross_entropy``'s default
#: ``ignore_index`` and every Hugging Face data collator's label padding.
IGNORE_INDEX = -100


def half_squared_error(output: Tensor, target: Tensor) -> Tensor:
    """R(y) = (1/N) Σᵢ ½‖yᵢ − yᵢ*‖², output ``[N, ...]``; integer class targets ``output.shape[:-1]`` become one-hot.

    Half the squared Euclidean error per example (summed over every other dimension), averaged over
    examples: the loss whose gradient flow has time scale 1/‖Dh‖² when ‖·‖ is the empirical L² norm on the
    batch (see ``diagnostics``). Class targets equal to :data:`IGNORE_INDEX` (−100) leave their position out of
    the sum (its whole class vector), as cross-entropy's ``ignore_index`` does; the mean stays over the N examples.
    """
    target, keep = regression_target_and_mask(output, target)
    error = output - target
    if keep is not None:
        error = error * keep
    return 0.5 * error.pow(2).flatten(1).sum(1).mean()


def as_regression_target(output: Tensor, target: Tensor) -> Tensor:
    """``target`` in the output's shape and dtype: class indices are one-hot encoded over the last dimension.

    Class indices have the output's shape without its last dimension: ``[N]`` for outputs ``[N, K]``,
    ``[N, T]`` for token logits ``[N, T, V]``. An index equal to :data:`IGNORE_INDEX` (−100) gives a zero class
    vector; :func:`regression_target_and_mask` also says which positions to leave out. Raises ``ValueError`` for
    any other shape or an index out of range.
    """
    return regression_target_and_mask(output, target)[0]


def regression_target_and_mask(output: Tensor, target: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(target, keep)``: :func:`as_regression_target`, and the positions every target-dependent measure keeps.

    ``keep`` is ``None`` when nothing is ignored, else a ``[N, ..., 1]`` tensor of the output's dtype (1 where the
    class index is a class, 0 where it is :data:`IGNORE_INDEX`, −100), broadcasting over the output: the rule the
    losses and the measures share is that a position whose target is −100 is left out of every sum over the
    output (the loss, Δ, κ's residual, kernels on the targets), as ``F.cross_entropy(ignore_index=-100)`` does.
    """
    if not target.is_floating_point() and not target.is_complex():
        num_classes = output.shape[-1]
        ignored = _check_classes(output, target)
        if not bool(ignored.any()):
            return F.one_hot(target.long(), num_classes).to(output.dtype), None
        keep = (~ignored).unsqueeze(-1).to(output.dtype)
        return F.one_hot(target.long().clamp_min(0), num_classes).to(output.dtype) * keep, keep
    if target.shape != output.shape:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match output shape {tuple(output.shape)}; "
            "give targets of the output's shape, or class indices [N] for a classifier"
        )
    return target.to(output.dtype), None


def _check_classes(output: Tensor, target: Tensor) -> Tensor:
    """Raise ``ValueError`` unless ``target`` holds class indices over ``output``'s last dimension (or −100);
    return where it is −100."""
    if output.dim() < 2 or target.shape != output.shape[:-1]:
        raise ValueError(
            f"integer targets of shape {tuple(target.shape)} cannot be matched to outputs of shape "
            f"{tuple(output.shape)}: class-index targets have the output's shape without its last (class) "
            "dimension, e.g. [N] for outputs [N, num_classes]"
        )
    num_classes = output.shape[-1]
    ignored = target == IGNORE_INDEX
    classes = target[~ignored]
    if classes.numel() and (classes.min() < 0 or classes.max() >= num_classes):
        raise ValueError(
            f"class-index targets must lie in [0, {num_classes}) for outputs with {num_classes} classes (or be "
            f"{IGNORE_INDEX}, ignored), got values in [{int(classes.min())}, {int(classes.max())}]"
        )
    return ignored


def squared_distance(output: Tensor, target: Tensor | None) -> Tensor:
    """‖(output − y*)·keep‖²_F, a 0-d tensor in the output's dtype, without building a one-hot y*.

    ``target``: ``None`` (y* = 0), a tensor of the output's shape, or class indices of the output's shape
    without its last dimension (y* their one-hot encoding; positions whose index is :data:`IGNORE_INDEX`, −100,
    are left out, ``keep`` = 0 there, as in :func:`regression_target_and_mask`). For class indices the squared
    errors are (f_j)² off the target class and (f_y − 1)² on it, written into one tensor of the output's size:
    elementwise the very numbers ((f − onehot(y))·keep)² holds, so the sum is the one-hot formula's, while token
    logits ``[N, T, V]`` need no ``[N, T, V]`` one-hot (nor the difference and the product it takes). Raises
    ``ValueError`` as :func:`as_regression_target` does.
    """
    if target is None:
        return output.square().sum()
    if target.is_floating_point() or target.is_complex():
        return (output - as_regression_target(output, target)).square().sum()
    ignored = _check_classes(output, target)
    index = target.long().clamp_min(0).unsqueeze(-1)
    errors = output.square()
    errors.scatter_(-1, index, (output.gather(-1, index) - 1).square())
    if bool(ignored.any()):
        errors.mul_((~ignored).unsqueeze(-1).to(errors.dtype))
    return errors.sum()


def cross_entropy(output: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy of logits ``output`` against class indices or probabilities ``target``.

    :func:`torch.nn.functional.cross_entropy`, which takes classes on dimension 1 (``[N, C, d1, ...]``), also
    for token logits with classes last: ``[N, T, V]`` against indices ``[N, T]``, the language-model layout.
    Targets equal to :data:`IGNORE_INDEX` (−100) are ignored: the mean is over the other positions (torch's
    ``ignore_index``, the label padding of Hugging Face collators). The targets are those of the logits at the
    same position: labels for a causal LM are the *next* tokens (Hugging Face models shift them inside their own
    loss; shift them in the data when the monitor computes the loss).
    ``label_smoothing``: torch's (the targets mixed with the uniform distribution by that weight).
    """
    if output.dim() > 2 and not target.is_floating_point() and target.shape == output.shape[:-1]:
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX,
                               label_smoothing=label_smoothing)
    return F.cross_entropy(output, target, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)


_NAMED_LOSSES: dict[str, LossFn] = {
    "mse": half_squared_error,
    "cross_entropy": cross_entropy,
}


def resolve_loss(loss: LossLike) -> LossFn:
    """Turn ``"mse"``, ``"cross_entropy"`` or a callable ``(output, target) -> scalar`` into a loss function.

    ``"mse"`` is :func:`half_squared_error` (½‖y − y*‖² averaged over examples, one-hot for class targets);
    ``"cross_entropy"`` is :func:`cross_entropy` (torch's, also with classes on the last dimension). Both
    ignore the positions whose class target is −100 (:data:`IGNORE_INDEX`).
    """
    if isinstance(loss, str):
        try:
            return _NAMED_LOSSES[loss]
        except KeyError:
            raise ValueError(
                f"unknown loss {loss!r}: use one of {sorted(_NAMED_LOSSES)} or a callable(output, target)"
            ) from None
    if callable(loss):
        return loss
    raise TypeError(f"loss must be a name or a callable(output, target) -> loss, got {type(loss).__name__}")


def check_alpha(alpha: Any) -> float:
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    return value


def scaled_loss(loss: LossLike, alpha: float) -> LossFn:
    """The scaled objective of section 2: ``(output, target) -> R(output, target) / α²``.

    ``output`` is the output of the α-scaled model (α·h); the 1/α² factor keeps gradient-flow time
    comparable across α, so no learning-rate rescaling is needed on top of it.
    """
    base = resolve_loss(loss)
    scale = 1.0 / check_alpha(alpha) ** 2

    def objective(output: Tensor, target: Tensor) -> Tensor:
        return base(output, target) * scale

    return objective


def _drop_initial_buffers(state_dict: dict, prefix: str, *args: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "initial_buffers.")]:
        del state_dict[key]


class AlphaScaled(nn.Module):
    """``α · (f(x; w) − f(x; w0))`` (``center=True``) or ``α · f(x; w)``, trained on ``R(α h)/α²``.

    ``module`` is the network f whose parameters w are trained (it is kept, not copied). ``w0`` is a
    frozen snapshot of its parameters taken here, at construction: stored as buffers, so it is never
    trained, follows ``.to()``, and is saved in ``state_dict``. The initial output f(x; w0) is computed
    without gradient, in the same train/eval mode, with the network's current buffers (BatchNorm running
    statistics) and the same random numbers (dropout masks) as the live forward, so the centred model is
    exactly zero at w = w0 in train and in eval mode.

    Attributes: ``alpha``, ``center``, ``loss_scale`` (= 1/α²), ``loss`` (resolved, or ``None``).
    """

    def __init__(self, module: nn.Module, alpha: float, center: bool = True, loss: LossLike | None = None) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"AlphaScaled wraps an nn.Module, got {type(module).__name__}")
        self.module = module
        self._alpha = check_alpha(alpha)
        self.center = bool(center)
        self.loss = None if loss is None else resolve_loss(loss)
        # Only the centred model needs w0; the uncentred one would carry a useless copy.
        self.initial = FrozenParams(dict(module.named_parameters())) if self.center else None
        # Checkpoints written before f(x; w0) used the live buffers hold a snapshot of them: drop it.
        self._register_load_state_dict_pre_hook(_drop_initial_buffers)

    @property
    def alpha(self) -> float:
        return self._alpha

    @property
    def loss_scale(self) -> float:
        """1/α², the factor of the scaled objective R(α h)/α²."""
        return 1.0 / self._alpha**2

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        if not self.center:
            return self._alpha * self.module(*args, **kwargs)
        if self.training:
            # fork_rng restores the RNG state on exit, so the live forward draws the same dropout masks.
            devices = sorted({a.device.index or 0 for a in args if isinstance(a, Tensor) and a.is_cuda})
            with torch.random.fork_rng(devices=devices):
                initial = self.initial_output(*args, **kwargs)
        else:
            initial = self.initial_output(*args, **kwargs)
        return self._alpha * (self.module(*args, **kwargs) - initial)

    @torch.no_grad()
    def initial_output(self, *args: Any, **kwargs: Any) -> Tensor:
        """f(x; w0): the network with its initial weights and its *current* buffers (no gradient).

        The current buffers (BatchNorm running statistics), because the centred model is α(f(w) − f(w0)) as a
        function of the weights: with the buffers of w0 it would not be 0 at w = w0 in eval mode once the
        running statistics have moved. They are cloned, so this pass does not update them a second time.
        """
        if self.initial is None:
            raise RuntimeError("initial_output needs center=True: the uncentred model keeps no copy of w0")
        state = {**self.initial.as_dict(), **{k: v.clone() for k, v in self.module.named_buffers()}}
        return functional_call(self.module, state, args, kwargs)

    def objective(self, output: Tensor, target: Tensor) -> Tensor:
        """R(output, target) / α², where ``output`` is this model's (α-scaled) output."""
        if self.loss is None:
            raise ValueError("AlphaScaled has no loss: pass loss='mse', 'cross_entropy' or a callable")
        return self.loss(output, target) * self.loss_scale

    def extra_repr(self) -> str:
        return f"alpha={self._alpha:g}, center={self.center}"

    # alpha and center are saved with the weights: loading them into a model built with another alpha
    # would silently train a different objective.
    def get_extra_state(self) -> dict[str, Any]:
        return {"alpha": self._alpha, "center": self.center}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if not math.isclose(state["alpha"], self._alpha, rel_tol=1e-12) or state["center"] != self.center:
            raise ValueError(
                f"checkpoint was saved with alpha={state['alpha']:g}, center={state['center']} but this "
                f"AlphaScaled has alpha={self._alpha:g}, center={self.center}; build it with the saved values"
            )
