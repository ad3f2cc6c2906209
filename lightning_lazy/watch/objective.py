"""What a monitor watches in a training module: the objective the model is trained on and the watched network.

Framework-neutral (errors are :class:`~lightning_lazy.watch.batches.WatchError`, one line each; ``who`` names the
monitor in them). :func:`resolve_objective` finds the loss R and the scale α (the twin's objective is
R(output)/α², as for an :class:`~lightning_lazy.scaling.AlphaScaled`); :func:`resolve_watched` finds the
network whose output the loss reads, as a :class:`~lightning_lazy.watch.twin.Watched` module.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from lightning_lazy.scaling import AlphaScaled, LossLike, cross_entropy
from lightning_lazy.watch.batches import WatchError
from lightning_lazy.watch.twin import OutputSelector, Watched

WatchLike = str | Callable[[nn.Module, Tensor], Any] | None
Objective = Callable[..., Tensor]


def resolve_objective(pl_module: nn.Module, loss: LossLike | None,
                      alpha: float | None, who: str = "LazyTrainingMonitor") -> tuple[Objective, float]:
    """``(objective(output, y, **extra) = R(output, y) / α², 1/α²)``.

    R is ``loss`` (already resolved) or the loss of the one ``AlphaScaled`` inside ``pl_module``; α is ``alpha``
    or that ``AlphaScaled``'s, else 1. Raises ``WatchError`` when several ``AlphaScaled`` leave
    α ambiguous, ``alpha`` contradicts the module's, or no loss is known.
    """
    scaled = [m for m in pl_module.modules() if isinstance(m, AlphaScaled)]
    if len(scaled) > 1 and alpha is None:
        raise WatchError(
            f"the module holds {len(scaled)} AlphaScaled models, so the monitor cannot tell which alpha "
            f"scales the watched output; pass {who}(alpha=...)"
        )
    if scaled and alpha is not None and not math.isclose(scaled[0].alpha, alpha) and len(scaled) == 1:
        raise WatchError(
            f"{who}(alpha={alpha:g}) contradicts the module's AlphaScaled(alpha={scaled[0].alpha:g})"
        )
    alpha = alpha if alpha is not None else (scaled[0].alpha if scaled else 1.0)
    loss = loss or (scaled[0].loss if len(scaled) == 1 else None)
    loss = _with_label_smoothing(pl_module, loss)
    if loss is None:
        raise WatchError(
            f"{who} does not know the loss the model is trained on: pass "
            f"{who}(loss='mse' | 'cross_entropy' | callable), or give AlphaScaled(..., loss=...) (a Hugging "
            "Face causal LM trained on its own tokens: loss='cross_entropy', and its labels are shifted as the model shifts them, "
            "or say so with batch_to_xy=lightning_lazy.watch.batches.causal_lm_batch_to_xy)"
        )
    scale = 1.0 / alpha**2

    def objective(output: Tensor, target: Any, **extra: Any) -> Tensor:
        return loss(output, target, **extra) * scale

    return objective, scale


def _with_label_smoothing(module: nn.Module, loss: Any) -> Any:
    """``loss="cross_entropy"`` for a module that trains with an ``nn.CrossEntropyLoss(label_smoothing=ε)`` of its
    own (one smoothing among its loss modules): the cross-entropy with that smoothing, the objective it trains."""
    if loss is not cross_entropy:
        return loss
    smoothing = {m.label_smoothing for m in module.modules() if isinstance(m, nn.CrossEntropyLoss)}
    if len(smoothing) != 1 or not next(iter(smoothing)):
        return loss
    return functools.partial(cross_entropy, label_smoothing=float(next(iter(smoothing))))


def resolve_watched(pl_module: nn.Module, model: WatchLike,
                    output: str | OutputSelector | None, who: str = "LazyTrainingMonitor") -> Watched:
    """The network the monitor watches: ``pl_module`` itself (``model=None``), the sub-module at the attribute
    path ``model``, or ``model(pl_module, x)``; its output read by ``output``. Raises
    ``WatchError`` for a path that does not exist or names no module, and for a module
    without ``forward()`` when nothing else is named."""
    if callable(model):
        return Watched(pl_module, call=model, output=output)
    module: Any = pl_module
    for part in (model.split(".") if model else []):
        if not hasattr(module, part):
            raise WatchError(
                f"{who}(model={model!r}): {type(module).__name__} has no attribute {part!r}"
                + _children_hint(module)
            )
        module = getattr(module, part)
    if not isinstance(module, nn.Module):
        raise WatchError(
            f"{who}(model={model!r}) names a {type(module).__name__}, not an nn.Module"
        )
    if model is None and type(pl_module).forward.__qualname__ in ("LightningModule.forward",
                                                                 "Module._forward_unimplemented"):
        # LightningModule.forward is nn.Module's: it raises a bare "missing forward" error.
        child = next(iter(dict(pl_module.named_children())), "model")
        raise WatchError(
            f"{type(pl_module).__name__} has no forward(), so {who} cannot call it: say what to "
            f"watch, {who}(model='{child}') for the sub-module training_step calls, or "
            f"model=lambda module, x: module.{child}(x)" + _children_hint(pl_module)
        )
    return Watched(module, output=output)


def _children_hint(module: Any) -> str:
    """``"; its sub-modules: 'a', 'b'"`` for a module with named children, else ``""``."""
    names = list(dict(module.named_children())) if isinstance(module, nn.Module) else []
    return f" (its sub-modules: {', '.join(repr(n) for n in names[:8])}{', ...' if len(names) > 8 else ''})" if names else ""


__all__ = ["Objective", "WatchLike", "resolve_objective", "resolve_watched"]
