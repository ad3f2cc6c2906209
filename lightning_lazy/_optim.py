"""Which optimizers the laziness bound speaks of: gradient descent (plain, or SGD with momentum), not adaptive ones.

The bound Δ ≲ t̃²·κ(w0) of Chizat, Oyallon & Bach (2019, Theorem 2.3) is proved for gradient flow, whose
discretization is gradient descent; its time t̃ = (Σ learning rates)·‖Dh(w0)‖² counts the steps of size lr
along −∇F. SGD with momentum follows the same flow with an effective step lr/(1 − momentum), within a
constant factor of t̃. An adaptive optimizer (Adam, AdamW, RMSprop, Adagrad, ...) divides each coordinate's
step by a running estimate of its gradient's size: its steps are no longer lr·∇F, t̃ is no longer the time of
the flow, and the theorem says nothing about it. The monitor still measures (Δ, stability, kernel, ...) and
still logs t̃ = Σ lr·‖Dh(w0)‖² as an x-axis, but states neither the bound nor its horizon.

Lightning-free.
"""

from __future__ import annotations

import torch

# Hyper-parameters only an adaptive (per-coordinate) step has: Adam / AdamW / NAdam / RAdam / Adamax /
# SparseAdam ("betas", "eps"), RMSprop ("eps", "centered"), Adagrad ("lr_decay", "initial_accumulator_value"),
# Adadelta ("rho"), Rprop ("etas"), Adafactor ("beta2_decay"), LBFGS ("history_size"); and ASGD ("t0"), whose
# step size decays inside the optimizer, so that Σ lr is not its time either. torch.optim.SGD has none.
ADAPTIVE_KEYS = frozenset({"betas", "eps", "centered", "lr_decay", "initial_accumulator_value", "rho", "etas",
                           "beta2_decay", "history_size", "t0"})


def adaptive_optimizer(optimizer: torch.optim.Optimizer) -> str | None:
    """The optimizer's class name when the bound does not hold for it, ``None`` when it does.

    The bound holds for ``torch.optim.SGD`` (any momentum, dampening, Nesterov, weight decay) and for any
    other optimizer whose parameter groups carry none of :data:`ADAPTIVE_KEYS`; an optimizer with one of them
    (Adam, AdamW, RMSprop, Adagrad, Adadelta, Rprop, Adafactor, LBFGS, ASGD, and third-party ones that name their
    hyper-parameters the same way) is adaptive: ``None`` is never returned for it.
    """
    if isinstance(optimizer, torch.optim.SGD):
        return None
    keys = {key for group in optimizer.param_groups for key in group}
    return type(optimizer).__name__ if keys & ADAPTIVE_KEYS else None


# Group entries (when true) of optimizers that size their steps themselves, whatever "lr" holds: Hugging Face's
# Adafactor (relative_step: lr = min(1e-2, 1/√t); scale_parameter: times RMS(w)), D-Adaptation / Prodigy ("d", the
# distance estimate the step is multiplied by), torch.optim.Adafactor ("d": its steps are min(lr, 1/√t)·RMS(w)).
SELF_SIZED_KEYS = frozenset({"relative_step", "scale_parameter", "d"})


def step_size(optimizer: torch.optim.Optimizer) -> float | None:
    """The learning rate of the optimizer's steps as one float, or ``None`` when its step size is not one.

    Normalized time t̃ = Σ lr · ‖Dh(w0)‖² (Chizat et al. 2019, Theorem 2.3) adds this number at every step; with
    ``None`` t̃ is not claimed. A float (or a one-number tensor, as ``torch.optim.Adam(lr=torch.tensor(...))``
    takes it) shared by every parameter group that holds parameters gives that float. ``None`` when a group has
    no ``lr``, or ``lr`` is ``None`` (Hugging Face's ``Adafactor(lr=None, relative_step=True)``) or not a number,
    the groups' learning rates differ (no one step size), or the optimizer sizes its steps itself
    (:data:`SELF_SIZED_KEYS` true in a group: relative steps, steps scaled by the weights' RMS, D-Adaptation's d;
    ``torch.optim.Adafactor``). Reads the groups as they are now (after a scheduler's change, say). Never raises.
    """
    if isinstance(optimizer, getattr(torch.optim, "Adafactor", ())):
        return None
    rates = set()
    for group in optimizer.param_groups:
        if not group.get("params"):
            continue
        if any(group.get(key) for key in SELF_SIZED_KEYS):
            return None
        lr = group.get("lr")
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1:
                return None
            lr = lr.item()
        if isinstance(lr, bool) or not isinstance(lr, (int, float)):
            return None
        rates.add(float(lr))
    return rates.pop() if len(rates) == 1 else None


__all__ = ["ADAPTIVE_KEYS", "SELF_SIZED_KEYS", "adaptive_optimizer", "step_size"]
