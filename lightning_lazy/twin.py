"""The tangent twin: a network's linearization trained in lock-step with it, step for step.

Chizat, Oyallon & Bach (2019), section 1: the *tangent path* w̄(t) is what the optimizer that trains the
network h does when it trains the tangent model h̄(w) = h(w0) + Dh(w0)(w − w0) instead, from the same w0,
on the same batches, with the same hyper-parameters and schedule. :class:`TangentTwin` keeps that path
alongside a real training run, as torch's ``AveragedModel`` keeps an average alongside one. It is
Lightning-free: whatever drives the real optimizer calls :meth:`TangentTwin.accumulate` when the real loss
is back-propagated and :meth:`TangentTwin.zero_grad` when the real gradients are cleared; the twin steps by
itself, from a step hook on the real optimizer, exactly when the real optimizer's ``step()`` runs (a step
that a gradient scaler skips, or that never comes, is not taken).

What makes the two paths comparable (each is needed; each is tested):

- *Randomness.* The twin's forward replays the random-number state the real forward started from, so its
  dropout masks are the real ones, and restores the global state afterwards: the real run is unchanged.
- *Parameters.* w0 covers every parameter; ``requires_grad`` and each sub-module's train/eval mode are
  copied from the real network before every forward, so a frozen backbone stays frozen and an unfrozen one
  starts moving from its w0; parameter groups added to the real optimizer later are added to the twin's.
- *BatchNorm.* In train mode the twin normalizes with the batch statistics of the network at w0 (it is the
  linearization of the train-mode function); its running statistics are the real network's, copied before
  every forward, so in eval mode both normalize alike and at w = w0 the twin *is* the network.
- *Steps.* Gradients are those of exactly the batches the real optimizer accumulated; a parameter whose
  real gradient is ``None`` at a step gets none in the twin either (optimizers skip such parameters).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_lazy._forward_ad import forward_ad_safe
from lightning_lazy._inputs import Inputs, call_with
from lightning_lazy._params import RNGState, probe_mode
from lightning_lazy.tangent import LinearizedModel

OutputSelector = Callable[[Any], Tensor]
Objective = Callable[..., Tensor]


def select_output(output: Any, select: str | OutputSelector | None = None) -> Tensor:
    """The model output as one tensor: ``output`` itself, ``output[select]`` / ``output.select``, or ``select(output)``.

    With ``select=None`` an output that is no tensor but has a tensor ``logits`` (a Hugging Face ``ModelOutput``)
    is read as its ``logits``. Raises ``ValueError`` naming what was returned and what to pass when no tensor results.
    """
    if select is None:
        logits = None if isinstance(output, Tensor) else getattr(output, "logits", None)
        value = logits if isinstance(logits, Tensor) else output
    elif callable(select):
        value = select(output)
    elif isinstance(output, Mapping) and select in output:
        value = output[select]
    elif hasattr(output, select):
        value = getattr(output, select)
    else:
        keys = sorted(output) if isinstance(output, Mapping) else [k for k in dir(output) if not k.startswith("_")]
        raise ValueError(f"the model output ({type(output).__name__}) has no entry {select!r}; it has {keys[:10]}")
    if not isinstance(value, Tensor):
        hint = (f"; its entries are {sorted(value)[:10]}: pass output='<key>'" if isinstance(value, Mapping) else
                ": pass output='<key or attribute>' or output=callable(model_output) -> Tensor")
        raise ValueError(f"the watched model returned a {type(value).__name__}, not a tensor{hint}")
    return value


class Watched(nn.Module):
    """The function a monitor watches, as a module: ``x -> select_output(call(module, x), output)``.

    ``call`` defaults to ``module(x)``, or ``module(**x)`` when ``x`` is a dict of named inputs (``input_ids``,
    ``attention_mask``: the Hugging Face convention); give ``call(module, x)`` for a LightningModule without
    ``forward`` or a model that needs more than ``x``. ``module`` is registered as the sub-module ``inner``, so parameter
    names carry the prefix ``inner.``.
    """

    def __init__(self, module: nn.Module, call: Callable[[nn.Module, Tensor], Any] | None = None,
                 output: str | OutputSelector | None = None) -> None:
        super().__init__()
        self.inner = module
        self.call = call
        self.output = output

    def forward(self, x: Inputs) -> Tensor:
        out = call_with(self.inner, x) if self.call is None else self.call(self.inner, x)
        return select_output(out, self.output)


class TangentTwin:
    """The tangent model of ``real`` trained in lock-step with it by a copy of ``optimizer``.

    Args:
        real: the network being trained (any ``nn.Module`` taking one input batch ``x``). It is read, never
            written: the twin holds a deep copy linearized around the current weights, which are w0.
        optimizer: the real optimizer. A new optimizer of the same class over the twin's parameters is
            built from its parameter groups; its hyper-parameters are copied from the real groups before
            every step (so any scheduler, warm-up or manual change is followed); its state is its own.
        objective: ``objective(output, y, **extra) -> scalar``, the loss the twin is trained on (the real
            training loss, including any 1/α² factor).
        clip: ``clip(parameters)`` applied to the twin's gradients before each step (the real run's clipping).
        reduce_gradients: ``flat_gradients -> mean over processes`` under data parallelism.

    Call :meth:`arm` when a training batch starts, :meth:`accumulate` when its loss is back-propagated,
    :meth:`zero_grad` when the real gradients are cleared; :meth:`follow` hooks the real optimizer's
    ``step()`` and the real forward (for its random-number state); :meth:`release` removes the hooks.
    """

    def __init__(self, real: nn.Module, optimizer: Optimizer, objective: Objective, *,
                 clip: Callable[[list[Tensor]], Any] | None = None,
                 reduce_gradients: Callable[[Tensor], Tensor] | None = None) -> None:
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ValueError(
                "LBFGS re-evaluates its closure several times per step, so a twin cannot follow its steps with one "
                "backward per batch; use a first-order optimizer (SGD, Adam, ...) or switch the twin off"
            )
        self.real = real
        self.model = LinearizedModel(real, batchnorm="batch")
        self.objective = objective
        self.clip = clip
        self.reduce_gradients = reduce_gradients
        self._real_names = {id(p): name for name, p in real.named_parameters()}
        self._twin_params = dict(self.model.module.named_parameters())
        self._param_pairs = [(p, self._twin_params[name]) for name, p in real.named_parameters()]
        self._module_pairs = list(zip(real.modules(), self.model.module.modules()))
        self._buffer_pairs = list(zip(real.buffers(), self.model.module.buffers()))
        self.optimizer = self._new_optimizer(optimizer)
        self._real_optimizer = optimizer
        self._rng: RNGState | None = None
        self._armed = False
        self._handles: list[Any] = []

    # ------------------------------------------------------------------------------------- the optimizer

    def _group_names(self, optimizer: Optimizer) -> list[list[str]]:
        # Tensors the optimizer trains outside the watched network do not reach its output: the twin has none.
        return [[self._real_names[id(p)] for p in g["params"] if id(p) in self._real_names] for g in optimizer.param_groups]

    def _new_optimizer(self, optimizer: Optimizer, names: list[list[str]] | None = None) -> Optimizer:
        """An optimizer of ``optimizer``'s class over the twin's parameters, group for group (``names``: the
        parameter names of each group; default those of ``optimizer``; extra groups repeat its first group's
        hyper-parameters, to be overwritten by a loaded state)."""
        names = names if names is not None else self._group_names(optimizer)
        real_groups = optimizer.param_groups
        groups = [{**{k: v for k, v in real_groups[min(i, len(real_groups) - 1)].items() if k != "params"},
                   "params": [self._twin_params[n] for n in group]} for i, group in enumerate(names)]
        try:
            return type(optimizer)(groups, **optimizer.defaults)
        except TypeError:  # an optimizer whose constructor does not take every key of its defaults
            return type(optimizer)(groups)

    def _mirror_groups(self, optimizer: Optimizer) -> None:
        """Make the twin's parameter groups those of ``optimizer`` (groups added or changed since), and copy
        every hyper-parameter."""
        names = self._group_names(optimizer)
        twin_groups = self.optimizer.param_groups
        for index, (real_group, group_names) in enumerate(zip(optimizer.param_groups, names)):
            params = [self._twin_params[n] for n in group_names]
            hyper = {k: v for k, v in real_group.items() if k != "params"}
            if index >= len(twin_groups):
                self.optimizer.add_param_group({**hyper, "params": params})
                continue
            if [id(p) for p in twin_groups[index]["params"]] != [id(p) for p in params]:
                twin_groups[index]["params"] = params
            twin_groups[index].update(hyper)

    # ------------------------------------------------------------------------------------------ hooks

    def follow(self) -> None:
        """Hook the real optimizer's ``step()`` (the twin steps after it) and the real forward (RNG state)."""
        self.release()
        self._handles = [
            self._real_optimizer.register_step_post_hook(lambda optimizer, args, kwargs: self.step(optimizer)),
            # On the network itself, not its Watched wrapper: training_step calls the network.
            (self.real.inner if isinstance(self.real, Watched) else self.real).register_forward_pre_hook(
                self._capture_rng),
        ]

    def release(self) -> None:
        """Remove the hooks :meth:`follow` installed."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def use_optimizer(self, optimizer: Optimizer) -> None:
        """Follow another real optimizer object (a new fit of the same model): keeps the twin's state."""
        self._real_optimizer = optimizer
        if self._handles:
            self.follow()

    def arm(self) -> None:
        """A training batch starts: remember the RNG state now, replaced by the one at the real forward's start."""
        self._rng = RNGState(self.real)
        self._armed = True

    def _capture_rng(self, _module: nn.Module, _args: Any) -> None:
        if self._armed and torch.is_grad_enabled():
            self._rng = RNGState(self.real)
            self._armed = False

    # ------------------------------------------------------------------------------------ lock-step

    def sync(self) -> None:
        """Copy train/eval modes, ``requires_grad`` and buffers (running statistics) from the real network."""
        for real, twin in self._module_pairs:
            twin.training = real.training
        for real, twin in self._param_pairs:
            if twin.requires_grad != real.requires_grad:
                twin.requires_grad_(real.requires_grad)
        with torch.no_grad():
            for real, twin in self._buffer_pairs:
                twin.copy_(real)

    def forward(self, x: Tensor) -> Tensor:
        """The twin's output on ``x`` in the real network's current modes (with grad, as in training)."""
        self.sync()
        with forward_ad_safe(self.model.module, "the tangent twin"):
            return self.model(x)

    def accumulate(self, x: Tensor, y: Any, extra: Mapping[str, Any] | None = None, weight: float = 1.0) -> Tensor:
        """Back-propagate ``weight · objective(twin(x), y, **extra)`` into the twin's gradients; returns the
        (unweighted, detached) objective. The forward replays the real forward's random numbers."""
        context = self._rng.replay() if self._rng is not None else contextlib.nullcontext()
        with context:
            output = self.forward(x)
        loss = self.objective(output, y, **(extra or {}))
        (loss * weight).backward()
        self._armed = False
        return loss.detach()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, optimizer: Optimizer | None = None) -> None:
        """One step of the twin's optimizer, with the real optimizer's groups and hyper-parameters."""
        optimizer = optimizer or self._real_optimizer
        self._mirror_groups(optimizer)
        for real, twin in self._param_pairs:
            if real.grad is None:
                twin.grad = None
        grads = [p.grad for p in self._twin_params.values() if p.grad is not None]
        if self.reduce_gradients is not None and grads:
            flat = self.reduce_gradients(torch.cat([g.reshape(-1) for g in grads]))
            for g, reduced in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(reduced.view_as(g))
        if self.clip is not None:
            self.clip([p for p in self._twin_params.values() if p.grad is not None])
        self.optimizer.step()

    # ---------------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def probe_output(self, x: Tensor) -> Tensor:
        """The twin on ``x`` as the measures see networks (:func:`~lightning_lazy._params.probe_mode`)."""
        self.sync()
        with probe_mode(self.model.module), forward_ad_safe(self.model.module, "the tangent twin"):
            return self.model(x)

    @torch.no_grad()
    def eval_output(self, x: Tensor) -> Tensor:
        """The twin on ``x`` in the real network's current modes (eval during validation)."""
        self.sync()
        with forward_ad_safe(self.model.module, "the tangent twin"):
            return self.model(x)

    def parameters(self) -> dict[str, Tensor]:
        """The twin's weights w̄, by the real network's parameter names."""
        return {name: p.detach() for name, p in self._twin_params.items()}

    # ----------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        names = {id(p): name for name, p in self._twin_params.items()}
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "groups": [[names[id(p)] for p in g["params"]] for g in self.optimizer.param_groups],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        # The groups the twin had when saved (a backbone unfrozen later added one), then their state, which
        # carries each group's own hyper-parameters.
        self.optimizer = self._new_optimizer(self._real_optimizer, state["groups"])
        self.optimizer.load_state_dict(state["optimizer"])


__all__ = ["TangentTwin", "Watched", "select_output"]
