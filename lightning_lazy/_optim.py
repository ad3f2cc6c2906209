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


__all__ = ["ADAPTIVE_KEYS", "adaptive_optimizer"]
