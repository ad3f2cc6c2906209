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
- *Running statistics* (BatchNorm, InstanceNorm, any layer with ``running_mean`` / ``running_var``). In train
  mode the twin normalizes with the batch statistics of the network at w0 (it is the linearization of the
  train-mode function); its running statistics are the real network's, copied (by module and name) before
  every forward, so in eval mode both normalize alike and at w = w0 the twin *is* the network.
- *Buffers a forward writes* (spectral norm's power-iteration vectors, counters, running averages): state of that
  forward. The twin's training forward starts from the values the real forward of the batch started from (kept by
  the real forward's pre-hook), and what its own forward writes is replaced at the next sync: the twin never
  advances a state the real forward advances.
- *Steps.* Gradients are those of exactly the batches the real optimizer accumulated, transformed as the real
  ones are between backward and step (clipping, through the same routine); a parameter whose real gradient is
  ``None`` at a step gets none in the twin either (optimizers skip such parameters). The optimizer is a deep
  copy of the real one, its groups mirrored before each real step.
- *Compiled networks.* The twin is built from the original modules of what ``torch.compile`` wrapped, and
  runs eagerly; a backward through it never reaches a real gradient (checked at every one).

What the twin cannot replay it detects and reports (:meth:`TangentTwin.check`, ``on_lost``) rather than
follow wrongly: weights written outside the optimizer's step (a write through ``.data`` that keeps every norm
included: the fingerprint is a position-weighted norm), parameters re-registered under other names, gradients
changed between backward and step other than by the clipping it replays, module backward hooks (which may change
gradients inside backward).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import types
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_lazy._forward_ad import forward_ad_safe
from lightning_lazy._inputs import Inputs, call_with
from lightning_lazy._params import RNGState, probe_mode, tensor_fingerprints, tensor_norms
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
        # The measures differentiate the network in ways torch.compile does not trace (forward-mode AD, swapped
        # weights): what it compiled runs eagerly here, so compiled and eager networks measure alike.
        with _eager():
            out = call_with(self.inner, x) if self.call is None else self.call(self.inner, x)
        return select_output(out, self.output)


def _eager() -> contextlib.AbstractContextManager:
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    if set_stance is None or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return set_stance("force_eager")


class TwinError(ValueError):
    """The twin cannot be made for this run, or would change it: the message names the cause and the way out."""


class TangentTwin:
    """The tangent model of ``real`` trained in lock-step with it by a copy of ``optimizer``.

    Args:
        real: the network being trained (any ``nn.Module`` taking one input batch ``x``). It is read, never
            written: the twin holds a deep copy linearized around the current weights, which are w0, built from
            the original modules of anything ``torch.compile`` wrapped.
        optimizer: the real optimizer, any ``torch.optim.Optimizer`` (wrappers such as Lookahead included). The
            twin's optimizer is a deep copy of it with the real parameters mapped to the twin's: class,
            hyper-parameters, groups, inner optimizers and state. Its groups' entries are copied from the real
            groups before every real step (so any scheduler, warm-up, manual change, or state an optimizer keeps
            in its groups is followed); ``train()`` / ``eval()`` (schedule-free optimizers) are mirrored.
        objective: ``objective(output, y, **extra) -> scalar``, the loss the twin is trained on (the real
            training loss, including any 1/α² factor).
        clip: ``clip(optimizer)``: what the real run does to the gradients between backward and step (clipping),
            applied to an optimizer's gradients; replayed on the twin's before each step, and used to check that
            the gradients the real optimizer steps with are those backward produced, so transformed.
        reduce_gradients: ``flat_gradients -> mean over processes`` under data parallelism.
        unscale: ``() -> inverse loss scale`` of a gradient scaler (AMP): the real gradients are unscaled before
            the step, the twin's never scaled.
        on_lost: ``on_lost(cause, remedy)``, called when the twin finds that the real run did something it cannot
            follow (default: :meth:`lose`).

    Call :meth:`arm` when a training batch starts, :meth:`accumulate` when its loss is back-propagated,
    :meth:`gradients_produced` right after the real backward, :meth:`zero_grad` when the real gradients are
    cleared; :meth:`follow` hooks the real optimizer's ``step()`` and the real forward; :meth:`release` removes the
    hooks; :meth:`check` reports what the real run did that the twin cannot follow.

    What it cannot follow, and says so (``on_lost``) instead of stepping on: real weights written outside the
    optimizer's step (by a hook, a callback, a layer's own forward, or an optimizer whose ``step()`` torch's step
    hooks do not see); a parameter re-registered under another name (pruning, a parametrization added mid-run);
    gradients changed between backward and step other than by ``clip`` (edits in hooks, ``Tensor.register_hook``
    on a parameter); a module backward hook on the real network (``register_full_backward_hook`` and kin).
    """

    def __init__(self, real: nn.Module, optimizer: Optimizer, objective: Objective, *,
                 clip: Callable[[Optimizer], Any] | None = None,
                 reduce_gradients: Callable[[Tensor], Tensor] | None = None,
                 unscale: Callable[[], Tensor | float] | None = None,
                 on_lost: Callable[[str, str], None] | None = None) -> None:
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ValueError(
                "LBFGS re-evaluates its closure several times per step, so a twin cannot follow its steps with one "
                "backward per batch; use a first-order optimizer (SGD, Adam, ...) or switch the twin off"
            )
        self.real = real
        self.objective = objective
        self.clip = clip
        self.reduce_gradients = reduce_gradients
        self.unscale = unscale
        self.on_lost = on_lost
        copied, twin_of = _eager_copy(real)
        self.model = LinearizedModel(copied, batchnorm="batch")
        # LinearizedModel copied the copy again, structure for structure: follow the second copy too.
        second = {id(a): b for (_, a), (_, b) in zip(copied.named_modules(remove_duplicate=False),
                                                     self.model.module.named_modules(remove_duplicate=False))}
        second.update({id(a): b for (_, a), (_, b) in zip(_named_tensors(copied), _named_tensors(self.model.module))})
        twin_of = {key: second[id(value)] for key, value in twin_of.items() if id(value) in second}
        # Real and twin tensors and modules paired by identity (not by name, not by position): the pairing
        # survives a parameter re-registered under another name (pruning's weight_orig), and buffers are looked
        # up by module and name at every sync (a buffer assigned a new tensor is followed).
        self._param_pairs = [(p, twin_of[id(p)]) for p in real.parameters() if id(p) in twin_of]
        self._module_pairs = [(m, twin_of[id(m)]) for m in real.modules() if id(m) in twin_of]
        self._twin_param_of = {id(p): t for p, t in self._param_pairs}
        self._twin_params = dict(self.model.module.named_parameters())
        self._layout = {id(m): _layout(m) for m, _ in self._module_pairs}
        self._compiled_randomness = _compiled_randomness(real)
        self._real_optimizer = optimizer
        self.optimizer = self._copy_optimizer(optimizer)
        self._rng: RNGState | None = None
        self._armed = False
        self._handles: list[Any] = []
        self._patched: list[tuple[Any, str, Any]] = []  # (object, attribute, previous value or _ABSENT)
        self._versions: list[int] = []
        self._fingerprint: list[float | None] = []
        self._produced: dict[str, Any] | None = None
        # Buffers the real forward writes, by (id(module), name); their values when the real forward of the batch
        # started, by module; the version counters then (see _take_buffers).
        self._written_buffers: set[tuple[int, str]] = set()
        self._buffers_at_forward: dict[int, dict[str, Tensor]] | None = None
        self._buffer_versions: dict[tuple[int, str], tuple[Tensor, int]] | None = None
        self._first_forward = True
        self.steps = 0
        # Why the twin stopped following the real run (None while it follows), and after how many real steps.
        self.lost: str | None = None
        self.lost_at: int | None = None
        self.lost_remedy = ""

    # ------------------------------------------------------------------------------------- the optimizer

    def _copy_optimizer(self, optimizer: Optimizer) -> Optimizer:
        """A deep copy of ``optimizer`` over the twin's parameters: class, hyper-parameters, groups, inner
        optimizers, state. Hooks and the instance-level ``step`` wrappers (LR schedulers', this twin's) are not
        copied: the copy steps only when the twin steps it."""
        memo: dict[int, Any] = {id(p): t for p, t in self._param_pairs}
        try:
            copied = _copy_optimizer(optimizer, memo)
        except Exception as error:  # noqa: BLE001 - any optimizer: say which one could not be copied, and why
            raise TwinError(
                f"the tangent twin needs a copy of the optimizer {type(optimizer).__name__}, and it cannot be deep-copied "
                f"({type(error).__name__}: {error}); use a copyable optimizer or switch the twin off"
            ) from None
        # Parameters the real optimizer trains outside the watched network were copied too (they never get a
        # gradient in the twin); remember every pairing the copy made.
        self._twin_param_of.update({id(p): memo[id(p)] for group in optimizer.param_groups for p in group["params"]
                                    if id(p) in memo})
        return copied

    def _twin_param(self, real: Tensor) -> Tensor:
        twin = self._twin_param_of.get(id(real))
        if twin is None:  # added to the real optimizer later and outside the watched network: no gradient here
            twin = self._twin_param_of[id(real)] = real.detach().clone()
        return twin

    def _mirror_groups(self, optimizer: Optimizer) -> None:
        """Make the twin's parameter groups those of ``optimizer`` (groups added or changed since), and copy
        every other entry of each group (hyper-parameters, and the state some optimizers keep there)."""
        twin_groups = self.optimizer.param_groups
        for index, real_group in enumerate(optimizer.param_groups):
            params = [self._twin_param(p) for p in real_group["params"]]
            entries = {k: _copied(v) for k, v in real_group.items() if k != "params"}
            if index >= len(twin_groups):
                self.optimizer.add_param_group({**entries, "params": params})
                continue
            if [id(p) for p in twin_groups[index]["params"]] != [id(p) for p in params]:
                twin_groups[index]["params"] = params
            twin_groups[index].update(entries)

    # ------------------------------------------------------------------------------------------ hooks

    def follow(self) -> None:
        """Hook the real optimizer's ``step()`` (groups mirrored and gradients checked before it, the twin steps
        after it), its ``train()`` / ``eval()``, and the real forward (random-number state, weights it writes)."""
        self.release()
        optimizer = self._real_optimizer
        if not getattr(type(optimizer).step, "hooked", False) and "step" not in self._instance_patches(optimizer):
            # A wrapper that does not run Optimizer.__init__ (timm's Lookahead): its step() runs no step hooks.
            # Run them around this instance's step(), as torch does for every other optimizer.
            previous = vars(optimizer).get("step", _ABSENT)
            bound = previous if previous is not _ABSENT else types.MethodType(type(optimizer).step, optimizer)
            for key in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks"):
                if not isinstance(getattr(optimizer, key, None), dict):
                    setattr(optimizer, key, OrderedDict())
            hooked = Optimizer.profile_hook_step(lambda _self, *args, **kwargs: bound(*args, **kwargs))
            self._patch(optimizer, "step", functools.partial(hooked, optimizer))
        for mode in ("train", "eval"):
            if callable(getattr(optimizer, mode, None)) and callable(getattr(self.optimizer, mode, None)):
                self._patch(optimizer, mode, self._mirrored_mode(optimizer, mode))
        network = self.real.inner if isinstance(self.real, Watched) else self.real
        self._handles = [
            optimizer.register_step_pre_hook(self._before_real_step),
            optimizer.register_step_post_hook(lambda opt, args, kwargs: self.step(opt)),
            # On the network itself, not its Watched wrapper: training_step calls the network. Run eagerly even
            # inside a compiled training_step: they read version counters and the RNG state, now, every time.
            network.register_forward_pre_hook(torch.compiler.disable(self._before_real_forward)),
            network.register_forward_hook(torch.compiler.disable(self._after_real_forward)),
        ]
        self._record_versions()

    def _instance_patches(self, optimizer: Optimizer) -> set[str]:
        return {attr for obj, attr, _ in self._patched if obj is optimizer}

    def _patch(self, obj: Any, attr: str, value: Any) -> None:
        self._patched.append((obj, attr, vars(obj).get(attr, _ABSENT)))
        setattr(obj, attr, value)

    def _mirrored_mode(self, optimizer: Optimizer, mode: str) -> Callable[..., Any]:
        original = getattr(optimizer, mode)

        def call(*args: Any, **kwargs: Any) -> Any:
            self._check_now("before the optimizer's " + mode + "()")
            result = original(*args, **kwargs)
            if self.lost is None:
                getattr(self.optimizer, mode)(*args, **kwargs)
                self._record_versions()  # the optimizer moved its weights itself, and the twin's alike
            return result

        return call

    def release(self) -> None:
        """Remove the hooks and instance wrappers :meth:`follow` installed."""
        undo(self._handles, self._patched)
        self._handles, self._patched = [], []

    def use_optimizer(self, optimizer: Optimizer) -> None:
        """Follow another real optimizer object (a new fit of the same model): keeps the twin's state."""
        following = bool(self._handles)
        self.release()
        self._real_optimizer = optimizer
        if following:
            self.follow()

    def arm(self) -> None:
        """A training batch starts: remember the RNG state now, replaced by the one at the real forward's start."""
        self._rng = RNGState(self.real)
        self._armed = True

    def _before_real_forward(self, _module: nn.Module, _args: Any) -> None:
        if self.lost is not None or not torch.is_grad_enabled():
            return
        self._check_now(_BETWEEN_STEPS)
        if self._armed:
            self._rng = RNGState(self.real)
            self._armed = False
            self._take_buffers()

    def _after_real_forward(self, _module: nn.Module, _args: Any, _output: Any) -> None:
        if self.lost is None and torch.is_grad_enabled():
            self._check_now("by the network's own forward")
            if self._buffer_versions is not None:
                # Which buffers this forward wrote: their values before it are taken at every later forward.
                self._written_buffers.update(key for key, (buffer, version) in self._buffer_versions.items()
                                             if buffer._version != version)
                self._buffer_versions = None

    def _take_buffers(self) -> None:
        """The real forward starts: keep the values it starts from of the buffers forwards write (all of them the
        first time, when which ones is not known yet), and the version counters to find which it writes."""
        versions: dict[tuple[int, str], tuple[Tensor, int]] = {}
        taken: dict[int, dict[str, Tensor]] = {}
        with torch.no_grad():
            for real, _ in self._module_pairs:
                for name, buffer in real._buffers.items():
                    if buffer is None:
                        continue
                    key = (id(real), name)
                    versions[key] = (buffer, buffer._version)
                    if self._first_forward or key in self._written_buffers:
                        taken.setdefault(id(real), {})[name] = buffer.detach().clone()
        self._first_forward = False
        self._buffer_versions = versions
        self._buffers_at_forward = taken

    def _before_real_step(self, optimizer: Optimizer, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self.lost is not None:
            return None
        # args[0] is the optimizer itself (torch passes step's self through its hooks).
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        # Without a closure the forward and backward have run: compare the weights' values too.
        self._check_now(_BETWEEN_STEPS, values=closure is None)
        if self.lost is not None:
            return None
        self._mirror_groups(optimizer)  # before the step: optimizers that keep state in their groups update it
        if closure is None:
            self._check_gradients()  # the gradients are final (a gradient scaler steps after the closure ran)
            return None

        # Lightning runs forward, backward, on_before_optimizer_step and clipping in the closure, inside step().
        def checked() -> Any:
            result = closure()
            if self.lost is None:
                self._check_now("outside the optimizer's update (in zero_grad, the forward or the backward)", values=True)
            if self.lost is None:
                self._check_gradients()
            return result

        if "closure" in kwargs:
            return args, {**kwargs, "closure": checked}
        return (args[0], checked, *args[2:]), kwargs

    # ------------------------------------------------------------------------------ what it cannot follow

    def _record_versions(self) -> None:
        """Take the real weights now as those the twin follows: their version counters, and a fingerprint of their
        values (writes through ``.data`` do not move version counters)."""
        self._versions = [real._version for real, _ in self._param_pairs]
        self._fingerprint = self._fingerprints()

    def _fingerprints(self) -> list[float | None]:
        """A position-weighted norm of every real parameter (:func:`tensor_fingerprints`): a write
        that changes values changes them, a permutation of rows included; a swap that puts the same values back
        (weight averaging's around validation) does not."""
        return tensor_fingerprints([real if real.is_floating_point() else None for real, _ in self._param_pairs])

    def accept_writes(self) -> None:
        """The real weights as they are now were written by something the twin has followed otherwise (e.g. the
        real run restored a checkpoint and the twin restored its own state alike): take them as the reference for
        :meth:`check`, instead of reporting the writes."""
        self._record_versions()

    def check(self) -> tuple[str, str] | None:
        """``(cause, remedy)`` when the real run did something the twin cannot follow since the last check,
        else ``None``: a real parameter written outside the optimizer's step (its version counter moved), or a
        module's tensors re-registered under other names."""
        if self.lost is not None:
            return None
        return (self._compiled_randomness or self._layout_changed()
                or self._written(_BETWEEN_STEPS, values=True))

    def _check_now(self, where: str, values: bool = False) -> None:
        found = self._compiled_randomness or self._layout_changed() or self._written(where, values)
        if found is not None:
            self._report(*found)

    def _report(self, cause: str, remedy: str) -> None:
        if self.on_lost is not None:
            self.on_lost(cause, remedy)
        self.lose(cause, self.steps, remedy)  # whatever on_lost did, the twin no longer follows

    def _written(self, where: str, values: bool = False) -> tuple[str, str] | None:
        """A real weight whose values changed since the reference (:meth:`_record_versions`). Looked at when a
        version counter moved, and always with ``values`` (a write through ``.data`` moves none); a write that put
        the same values back (a swap for validation and back) is accepted."""
        if not self._versions:
            return None
        moved = any(real._version != version for (real, _), version in zip(self._param_pairs, self._versions))
        if not moved and not values:
            return None
        changed = next((real for (real, _), a, b in zip(self._param_pairs, self._fingerprints(), self._fingerprint)
                        if a != b), None)
        if changed is None:
            self._versions = [real._version for real, _ in self._param_pairs]  # the same values: nothing to follow
            return None
        return (f"the weight {self._describe(changed)} was written {where}, which the tangent twin cannot replay",
                "Write weights only through the optimizer's step() (or optimizer.train()/eval()) while monitoring, "
                "or use an optimizer whose step() runs torch's step hooks.")

    def _layout_changed(self) -> tuple[str, str] | None:
        for real, _ in self._module_pairs:
            now, then = _layout(real), self._layout[id(real)]
            if now != then:
                name = next((n for n, m in self.real.named_modules() if m is real), type(real).__name__)
                return (f"the module '{_display_name(name)}' ({type(real).__name__}) was re-parametrized (its tensors are "
                        f"now {sorted(now[0] + now[1])}, were {sorted(then[0] + then[1])}: pruning or a parametrization "
                        "added during fit), which the tangent twin cannot follow",
                        "Apply pruning or parametrizations before fit, or after monitoring.")
        return None

    def _describe(self, tensor: Tensor) -> str:
        for module_name, module in self.real.named_modules():
            for attr, value in module._parameters.items():
                if value is tensor:
                    full = f"{module_name}.{attr}" if module_name else attr
                    return f"'{_display_name(full)}' ({type(module).__name__})"
        return "of a parameter"

    def gradients_produced(self) -> None:
        """The real backward has just run: remember the gradients it produced (with any accumulated before), to
        compare with those the real optimizer steps with: each tensor's identity, version and norm; and a copy of
        the values when the real run transforms them before the step (clipping, unscaling), to replay that."""
        if self.lost is not None:
            return
        grads = [real.grad for real, _ in self._param_pairs]
        self._produced = {
            "identity": [None if g is None else (id(g), g._version) for g in grads],
            "fingerprints": tensor_fingerprints(grads),
            "values": ([None if g is None else g.detach().clone() for g in grads]
                       if self.clip is not None or self.unscale is not None else None),
        }

    def _check_gradients(self) -> None:
        """The real optimizer is about to step: its gradients must be those backward produced, transformed as the
        twin replays (``unscale``, ``clip``), compared tensor by tensor: untransformed, the same tensors, unwritten
        (version counters) and of the same norm (a write through ``.data``); transformed, of the norm the replay on
        the produced values gives. Gradient hooks on parameters (``Tensor.register_hook``) edit them inside
        backward, where nothing can compare: they are reported as found."""
        for real, _ in self._param_pairs:
            if getattr(real, "_backward_hooks", None):
                self._report(f"the parameter {self._describe(real)} has a gradient hook (Tensor.register_hook), which "
                             "the tangent twin cannot replay",
                             "Remove the hook while monitoring, or clip through Trainer(gradient_clip_val=...).")
                return
        hooked = self._backward_hooked()
        if hooked is not None:
            self._report(f"{hooked} has a backward hook (register_full_backward_hook, register_backward_hook or "
                         "register_full_backward_pre_hook), which may change the gradients flowing through it and "
                         "which the tangent twin cannot replay (its backward runs through the tangent model)",
                         "Remove the hook while monitoring (a hook that only reads gradients can be a "
                         "Tensor.register_hook on an output, or a forward hook), or clip through "
                         "Trainer(gradient_clip_val=...).")
            return
        produced, self._produced = self._produced, None
        if produced is None:
            return  # no backward since the last step (training_step returned None): nothing to compare
        reals = [real for real, _ in self._param_pairs]
        now = [real.grad for real in reals]
        if produced["values"] is None:
            identity = [None if g is None else (id(g), g._version) for g in now]
            changed = [real for real, a, b in zip(reals, identity, produced["identity"]) if a != b]
            changed += [real for real, a, b in zip(reals, tensor_fingerprints(now), produced["fingerprints"]) if a != b]
        else:
            expected = produced["values"]
            kept = [i for i, (a, b) in enumerate(zip(expected, now)) if a is not None and b is not None]
            expected = [expected[i] for i in kept]
            if self.unscale is not None and expected:
                torch._foreach_mul_(expected, self.unscale())
            if self.clip is not None and expected:
                proxies = [torch.zeros_like(grad) for grad in expected]
                for proxy, grad in zip(proxies, expected):
                    proxy.grad = grad
                with self._real_gradients_hidden():
                    self.clip(_ProxyOptimizer(proxies))
                expected = [proxy.grad for proxy in proxies]
            changed = []
            for i, a, b in zip(kept, tensor_norms(expected), tensor_norms([now[i] for i in kept])):
                # The same routine on the same numbers: round-off at most (half precision capped at 1 %).
                tolerance = min(1e3 * torch.finfo(now[i].dtype).eps, 1e-2) if now[i].is_floating_point() else 0.0
                if abs(a - b) > tolerance * max(abs(a), abs(b)) + 1e-30:
                    changed.append(reals[i])
        if changed:
            self._report(f"the gradient of {self._describe(changed[0])} was changed between backward and the optimizer's "
                         "step (an on_after_backward / on_before_optimizer_step edit, a configure_gradient_clipping "
                         "that does not clip through self.clip_gradients, or another callback), which the tangent "
                         "twin cannot replay",
                         "Clip through Trainer(gradient_clip_val=...) or self.clip_gradients(optimizer, ...) in "
                         "configure_gradient_clipping, and leave the gradients as they are otherwise.")

    def _backward_hooked(self) -> str | None:
        """The module of the real network (described) that has a module backward hook, or a global one; ``None``
        when there is none. Such a hook receives and may replace the gradients of the module's inputs (or outputs)
        inside backward, where nothing can compare them with those backward would have produced."""
        import torch.nn.modules.module as module_hooks

        if getattr(module_hooks, "_global_backward_hooks", None) or getattr(module_hooks, "_global_backward_pre_hooks", None):
            return "every module (a global hook, register_module_full_backward_hook)"
        for name, module in self.real.named_modules():
            if module._backward_hooks or getattr(module, "_backward_pre_hooks", None):
                return f"the module '{_display_name(name) or '<root>'}' ({type(module).__name__})"
        return None

    @contextlib.contextmanager
    def _real_gradients_hidden(self) -> Iterator[None]:
        """The real parameters hold no gradient inside: a clipping routine the twin replays, written for the real
        network (``clip_grad_norm_(self.parameters())``), cannot touch them; the same tensors come back after."""
        saved = [(real, real.grad) for real, _ in self._param_pairs]
        for real, _ in saved:
            real.grad = None
        try:
            yield
        finally:
            for real, grad in saved:
                real.grad = grad

    # ------------------------------------------------------------------------------------ lock-step

    def sync(self, buffers: Mapping[int, Mapping[str, Tensor]] | None = None) -> None:
        """Copy train/eval modes, ``requires_grad`` and buffers (running statistics) from the real network; buffers
        are paired by module and name, so a buffer assigned a new tensor (as SWA does) is followed. ``buffers``:
        ``{id(real module): {name: value}}`` to copy instead of the real module's buffer now."""
        for real, twin in self._module_pairs:
            twin.training = real.training
        for real, twin in self._param_pairs:
            if twin.requires_grad != real.requires_grad:
                twin.requires_grad_(real.requires_grad)
        with torch.no_grad():
            for real, twin in self._module_pairs:
                instead = buffers.get(id(real), {}) if buffers else {}
                for name, buffer in real._buffers.items():
                    mine = twin._buffers.get(name)
                    if buffer is None or mine is None:
                        continue
                    buffer = instead.get(name, buffer)
                    if mine.shape == buffer.shape and mine.dtype == buffer.dtype:
                        mine.copy_(buffer)
                    else:
                        twin._buffers[name] = buffer.detach().clone()

    def forward(self, x: Tensor) -> Tensor:
        """The twin's output on ``x`` in the real network's current modes (with grad, as in training).

        Buffers the real forward writes (spectral norm's power-iteration vectors, counters, running averages) are
        state of that forward: the twin's forward starts from the values the real forward of this batch started
        from (taken by the forward pre-hook :meth:`follow` installs), and what its own forward writes into its copies
        is replaced at the next sync, so the twin never advances a state twice."""
        self.sync(self._buffers_at_forward)
        self._buffers_at_forward = None
        with forward_ad_safe(self.model.module, "the tangent twin"):
            return self.model(x)

    def accumulate(self, x: Tensor, y: Any, extra: Mapping[str, Any] | None = None, weight: float = 1.0) -> Tensor:
        """Back-propagate ``weight · objective(twin(x), y, **extra)`` into the twin's gradients; returns the
        (unweighted, detached) objective. The forward replays the real forward's random numbers.

        Raises :class:`TwinError` when that backward reached a real parameter's gradient: the twin would share a
        tensor with the network (a copy it could not make) and change the real run.
        """
        context = self._rng.replay() if self._rng is not None else contextlib.nullcontext()
        before = [_grad_state(real) for real, _ in self._param_pairs]
        with context:
            output = self.forward(x)
        loss = self.objective(output, y, **(extra or {}))
        (loss * weight).backward()
        self._armed = False
        for (real, _), state in zip(self._param_pairs, before):
            if _grad_state(real) != state:
                raise TwinError(
                    f"the tangent twin's backward changed the real gradient of {self._describe(real)}: the twin shares a "
                    "tensor with the network (through an attribute a copy cannot reach, such as a closure), so it would "
                    "change your training; keep such tensors in sub-modules or parameters, or switch the twin off"
                )
        return loss.detach()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, optimizer: Optimizer | None = None) -> None:
        """One step of the twin's optimizer, after the real one (its groups were mirrored before it)."""
        if self.lost is not None:
            return
        optimizer = optimizer or self._real_optimizer
        if not self._handles:
            self._mirror_groups(optimizer)  # driven by hand, not by the hooks
        for real, twin in self._param_pairs:
            if real.grad is None:
                twin.grad = None
            elif twin.grad is None and twin.requires_grad:
                # The real optimizer steps this parameter with a gradient (zeros kept by zero_grad(set_to_none=False),
                # which weight decay and momentum act on): so does the twin's.
                twin.grad = torch.zeros_like(twin)
        grads = [p.grad for p in self._twin_params.values() if p.grad is not None]
        if self.reduce_gradients is not None and grads:
            flat = self.reduce_gradients(torch.cat([g.reshape(-1) for g in grads]))
            for g, reduced in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(reduced.view_as(g))
        if self.clip is not None:
            with self._real_gradients_hidden():
                self.clip(self.optimizer)
        self.optimizer.step()
        self.steps += 1
        self._record_versions()

    # ---------------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def probe_output(self, x: Tensor, buffers: Mapping[str, Tensor] | None = None) -> Tensor:
        """The twin on ``x`` as the measures see networks (:func:`~lightning_lazy._params.probe_mode`); ``buffers``:
        ``{name in the real network: value}`` of buffers to use instead of the real ones now (those the probe holds
        at w0, :meth:`~lightning_lazy.watch.probe.LazinessProbe.held`)."""
        self.sync(self._by_module(buffers) if buffers else None)
        with probe_mode(self.model.module), forward_ad_safe(self.model.module, "the tangent twin"):
            return self.model(x)

    @torch.no_grad()
    def eval_output(self, x: Tensor) -> Tensor:
        """The twin on ``x`` in the real network's current modes (eval during validation)."""
        self.sync()
        with forward_ad_safe(self.model.module, "the tangent twin"):
            return self.model(x)

    def _by_module(self, buffers: Mapping[str, Tensor]) -> dict[int, dict[str, Tensor]]:
        """``{id(real module): {buffer name: value}}`` from ``{name in the real network: value}``."""
        owners = dict(self.real.named_modules(remove_duplicate=False))
        found: dict[int, dict[str, Tensor]] = {}
        for name, value in buffers.items():
            prefix, _, attr = name.rpartition(".")
            owner = owners.get(prefix)
            if owner is not None:
                found.setdefault(id(owner), {})[attr] = value
        return found

    def parameters(self) -> dict[str, Tensor]:
        """The twin's weights w̄, by the real network's parameter names now (a parameter renamed since
        construction, as pruning renames ``weight`` to ``weight_orig``, under its new name)."""
        return {name: self._twin_param_of[id(p)].detach() for name, p in self.real.named_parameters()
                if id(p) in self._twin_param_of}

    # ----------------------------------------------------------------------------------- state

    def lose(self, cause: str, step: int, remedy: str = "") -> None:
        """Stop following: the real run did something after ``step`` real steps that the twin cannot replay
        (``cause`` says what, ``remedy`` what the user can do). The twin's path up to then is kept, and no longer
        advances; its hooks do nothing from now on (removed by :meth:`release`)."""
        if self.lost is None:
            self.lost, self.lost_at, self.lost_remedy = cause, step, remedy

    def state_dict(self) -> dict[str, Any]:
        names = {id(p): name for name, p in self._twin_params.items()}
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "groups": [[names[id(p)] for p in g["params"] if id(p) in names] for g in self.optimizer.param_groups],
            "lost": (self.lost, self.lost_at, self.lost_remedy),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lost, self.lost_at, self.lost_remedy = state.get("lost", (None, None, ""))  # absent from older checkpoints
        self.model.load_state_dict(state["model"])
        # The groups the twin had when saved (a backbone unfrozen later added one), then their state, which
        # carries each group's own hyper-parameters.
        groups = self.optimizer.param_groups
        for index, names in enumerate(state["groups"]):
            params = [self._twin_params[n] for n in names]
            if index < len(groups):
                groups[index]["params"] = params
            else:
                self.optimizer.add_param_group({**{k: v for k, v in groups[-1].items() if k != "params"},
                                                "params": params})
        self.optimizer.load_state_dict(state["optimizer"])
        self._record_versions()


class _ProxyOptimizer(torch.optim.SGD):
    """An optimizer over stand-in tensors, for replaying a clipping routine on gradients that are not the real
    network's; it is never stepped."""

    def __init__(self, params: list[Tensor]) -> None:
        super().__init__(params, lr=0.0)


_ABSENT = object()
_BETWEEN_STEPS = ("between the optimizer's steps (by a hook, a callback, or a step() whose step hooks did not run, "
                  "such as an inner optimizer stepped directly)")


def undo(handles: list[Any], patched: list[tuple[Any, str, Any]]) -> None:
    """Remove hook ``handles`` and put back each ``(object, attribute, previous value or _ABSENT)`` of ``patched``,
    last patched first."""
    for handle in handles:
        handle.remove()
    for obj, attr, previous in reversed(patched):
        if previous is _ABSENT:
            vars(obj).pop(attr, None)
        else:
            setattr(obj, attr, previous)


def _copied(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, (list, dict, set)):
        return copy.deepcopy(value)
    return value


def _grad_state(tensor: Tensor) -> tuple[int, int] | None:
    grad = tensor.grad
    return None if grad is None else (id(grad), grad._version)


def _layout(module: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The names under which ``module`` holds its own parameters and buffers (a slot emptied for a while, as
    :func:`~lightning_lazy._params.probe_mode` empties running statistics, keeps its name)."""
    return tuple(module._parameters), tuple(module._buffers)


def _display_name(name: str) -> str:
    return name[len("inner."):] if name.startswith("inner.") else name


def _named_tensors(module: nn.Module) -> list[tuple[str, Tensor]]:
    return [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]


def _copy_optimizer(optimizer: Optimizer, memo: dict[int, Any]) -> Optimizer:
    """A deep copy of ``optimizer`` attribute by attribute (torch's ``Optimizer.__getstate__`` keeps only defaults,
    state and groups, and would drop a wrapper's inner optimizer), inner optimizers copied alike; hooks and the
    instance-level ``step`` / ``train`` / ``eval`` wrappers (LR schedulers', the twin's) are not copied."""
    if id(optimizer) in memo:
        return memo[id(optimizer)]
    copied = type(optimizer).__new__(type(optimizer))
    memo[id(optimizer)] = copied
    for key, value in vars(optimizer).items():
        if isinstance(value, Optimizer):
            vars(copied)[key] = _copy_optimizer(value, memo)
        elif "hook" in key and isinstance(value, dict):
            vars(copied)[key] = OrderedDict()
        elif key in ("step", "train", "eval") and callable(value):
            continue
        else:
            vars(copied)[key] = copy.deepcopy(value, memo)
    return copied


def _compiled_randomness(module: nn.Module) -> tuple[str, str] | None:
    """``(cause, remedy)`` when ``module`` runs compiled code that draws random numbers (dropout): inductor draws
    its own, so the twin (eager) cannot replay the real forward's masks; ``None`` otherwise."""
    from torch._dynamo.eval_frame import OptimizedModule

    compiled = [m for m in module.modules() if isinstance(m, OptimizedModule) or vars(m).get("_compiler_ctx")]
    dropout = [m for c in compiled for m in c.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
    if not dropout:
        return None
    try:
        from torch._inductor import config
    except ImportError:  # pragma: no cover - inductor ships with torch
        return None
    if config.fallback_random:
        return None  # inductor then draws eager's random numbers
    return (f"the compiled {type(compiled[0]).__name__} applies {type(dropout[0]).__name__}, and compiled code draws "
            "its own random numbers, so the tangent twin cannot replay its masks",
            "Set torch._inductor.config.fallback_random = True before fitting (compiled code then draws eager's "
            "random numbers), or monitor the module uncompiled.")


def _eager_copy(module: nn.Module) -> tuple[nn.Module, dict[int, Any]]:
    """A deep copy of ``module`` that runs eagerly, and ``{id(original tensor or module): its copy}``.

    What ``torch.compile`` wrapped is copied as its original module: an ``OptimizedModule`` becomes the copy of
    its ``_orig_mod`` (its parameter names lose the ``_orig_mod.`` part), and a LightningModule compiled as
    Lightning does it (``trainer.fit(torch.compile(module))``: its ``forward`` and ``*_step`` replaced by compiled
    functions of the original object) gets its own methods back. A copied compiled function would run the
    original network, so the twin's backward would reach the real weights.
    """
    from torch._dynamo.eval_frame import OptimizedModule

    memo: dict[int, Any] = {}
    compiled = [sub for sub in module.modules() if vars(sub).get("_compiler_ctx")]
    for sub in module.modules():
        for value in vars(sub).values():
            if isinstance(value, Tensor) and not value.is_leaf:  # old-style weight_norm / spectral_norm's weight
                memo[id(value)] = value.detach().clone()
        context = vars(sub).get("_compiler_ctx")
        if context:
            memo[id(context)] = None
    for sub in reversed(list(module.modules())):
        if isinstance(sub, OptimizedModule):
            memo[id(sub)] = copy.deepcopy(sub._orig_mod, memo)
    copied = memo[id(module)] if id(module) in memo else copy.deepcopy(module, memo)
    for sub in compiled:
        for name in ("forward", "training_step", "validation_step", "test_step", "predict_step"):
            vars(memo[id(sub)]).pop(name, None)
    return copied, memo


__all__ = ["TangentTwin", "TwinError", "Watched", "select_output"]
