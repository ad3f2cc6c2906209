"""The tangent model h̄(w) = h(w0) + Dh(w0)(w − w0), computed by forward-mode AD on every call.

Chizat, Oyallon & Bach (2019), section 1: the linearization of a model around its initialization w0.
Training it from w0 with the optimizer that trains the real model gives the *tangent path* w̄(t), the
reference that lazy training stays close to.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn
# Not torch.func.functional_call: it corrupts modules that reach a sub-module under two names (see _params).
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from lightning_lazy._forward_ad import composite_weight_norm, forward_ad_safe
from lightning_lazy._params import (FrozenParams, RNGState, batchnorm_eval, functional_call, keeps_running_stats,
                                    running_stats_untouched)

BATCHNORM_POLICIES = ("frozen", "batch")

# The old-style hooks (torch.nn.utils.spectral_norm / weight_norm); their modules are shadowed by the
# functions of the same name in torch.nn.utils.
_OldSpectralNorm = importlib.import_module("torch.nn.utils.spectral_norm").SpectralNorm

# Ops whose forward-AD rule materializes a zero tangent for an input that has none (the network's input
# x), and so pays for a matrix product with zeros. For y = op(x, W, b) with x constant, the tangent is
# op(x, dW, db): one product instead of two.
_PARAMETER_LINEAR_OPS = (F.linear, F.conv1d, F.conv2d, F.conv3d)


class _TangentRules(TorchFunctionMode):
    """Forward-AD rules this package supplies where PyTorch's default kernel has none, or wastes work.

    - ``torch._weight_norm`` (both ``weight_norm`` APIs): its fused kernel ``_weight_norm_interface`` has no
      forward-AD rule; the composite ``v · g / ‖v‖`` (norm over every dimension but ``dim``) is the same
      function and has one.
    - ``linear`` / ``conv`` whose input carries no tangent (only under ``torch.autograd.forward_ad``):
      tangent ``op(x, dW, db)``, one product instead of two.
    """

    def __init__(self, constant_input_shortcut: bool) -> None:
        super().__init__()
        self.constant_input_shortcut = constant_input_shortcut

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch protocol
        kwargs = kwargs or {}
        if func is torch._weight_norm:  # also under torch.compile, where forward_ad_safe is not entered
            return composite_weight_norm(args, kwargs)
        # nn.Linear / nn.ConvNd pass (input, weight, bias, ...) positionally; anything else takes the
        # general rule.
        if (self.constant_input_shortcut and func in _PARAMETER_LINEAR_OPS and len(args) >= 3
                and fwAD.unpack_dual(args[0]).tangent is None):
            x, weight, bias, *rest = args
            weight_p, weight_t = fwAD.unpack_dual(weight)
            bias_p, bias_t = fwAD.unpack_dual(bias) if bias is not None else (None, None)
            if weight_t is not None and (bias is None or bias_t is not None):
                primal = func(x, weight_p, bias_p, *rest, **kwargs)
                tangent = func(x, weight_t, bias_t, *rest, **kwargs)
                return fwAD.make_dual(primal, tangent)
        return func(*args, **kwargs)


class LinearizedModel(nn.Module):
    """The exact tangent model ``h̄(x; w) = f(x; w0) + J(w0)(w − w0)`` of ``module``, trainable like any nn.Module.

    Chizat, Oyallon & Bach (2019), section 1. ``module`` is deep-copied: the copy's parameters are this
    model's parameters ``w`` and start at ``w0``; ``w0`` itself, every floating-point parameter of the
    copy (trainable or not), is a frozen snapshot kept as buffers (saved in ``state_dict``, follows
    ``.to()``). Every forward is one pass of dual numbers with primal ``w0`` and tangent ``w − w0``
    (``torch.autograd.forward_ad``, or ``torch.func.jvp`` where that cannot be used); no Jacobian is ever
    formed. Inputs and outputs are those of ``module`` (any pytree; each output tensor is linearized, an
    output the parameters do not reach is returned as it is). The output is linear in ``w``, so its
    gradient is ``J(w0)ᵀ g`` exactly; autograd obtains it by differentiating the tangent computation, at
    the cost of one ordinary backward pass.

    Which parameters get a tangent: those that require grad now, or ever did since construction (they may
    have moved from w0), or were changed in place while frozen (detected by their version counter, then
    compared with w0). A parameter that never required grad and never moved gets none: a frozen backbone
    costs one plain forward through it, and is not differentiated. A parameter frozen at construction and
    unfrozen later starts moving from its w0. The set is saved in ``state_dict``.

    BatchNorm policy (``batchnorm``), for BatchNorm layers in training mode (and, alike, every normalization
    layer that keeps running statistics: InstanceNorm(track_running_stats=True), ...):

    - ``"frozen"`` (default): every BatchNorm layer runs in eval mode, on the running statistics the copy
      holds (those of ``module`` when it was copied, unless you overwrite them); they are never updated.
      The tangent model is then one fixed function of x, linear in w: the linearization of the network
      in eval mode.
    - ``"batch"``: a BatchNorm layer in training mode normalizes with the mean and variance of the batch
      as the network at w0 computes them; the linearization also differentiates through those statistics
      (as the real network's backward does), so the output depends on the batch, as the real network's
      does. The copy's running statistics are updated from those batch statistics at w0 (the tangent of
      the statistics is not used), and eval mode uses them. A layer in eval mode uses its running
      statistics under either policy.

    Either way the module that was passed in is never touched: its running statistics stay its own.

    w0 is never written: a module whose forward writes in place into the tensors it is given
    (``nn.Embedding(max_norm=...)`` renormalizes the rows it looks up) is given copies of w0 at every forward once
    the first forward in that mode (training or eval; always on copies) showed it; a module that starts writing
    only later makes that forward raise ``RuntimeError`` (rebuild the model).

    Weight re-parametrizations: ``torch.nn.utils.parametrizations.weight_norm`` / ``spectral_norm`` and the
    old-style ``torch.nn.utils.weight_norm`` / ``spectral_norm`` are linearized in their parameters
    (``parametrizations.weight.original0/1``, ``weight_g``/``weight_v``, ``weight_orig``...). Weight norm
    is computed by its composite formula (the fused kernel has no forward-AD rule). Spectral norm's power
    iteration (training mode) runs on the weight at w0, never on the tangent: σ and its derivative
    ``uᵀ dW v`` are those at w0.

    A module that holds ``LinearizedModel`` sub-modules: when every parameter with a tangent lives in one
    of them and the module returns that sub-module's output unchanged (e.g. a LightningModule whose
    ``forward`` is ``return self.model(x)``), the module is linear in those parameters and is its own tangent
    model, so it is run as it is. Otherwise (a trainable head on top, several of them...), the nested
    linearizations run inside ``torch.func.jvp``, which nests. Calling a ``LinearizedModel`` inside an
    open ``torch.autograd.forward_ad.dual_level`` is an error (PyTorch cannot nest those levels); it works
    inside ``torch.func`` transforms (``jvp``, ``vjp``, ``vmap``, ``grad``).

    Args:
        module: the network f.
        batchnorm: ``"frozen"`` or ``"batch"`` (above).

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
        ValueError: an unknown ``batchnorm`` policy.
        lightning_lazy._forward_ad.ForwardADError: (at forward) an op on the path from ``w`` to the output
            has no forward-mode AD rule; the message names the module.
        RuntimeError: (at forward) called inside an open ``forward_ad.dual_level``.
    """

    def __init__(self, module: nn.Module, batchnorm: str = "frozen") -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"LinearizedModel wraps an nn.Module, got {type(module).__name__}")
        if batchnorm not in BATCHNORM_POLICIES:
            raise ValueError(f"batchnorm must be one of {BATCHNORM_POLICIES}, got {batchnorm!r}")
        self.batchnorm = batchnorm
        self.module = _deepcopy(module)
        params = dict(self.module.named_parameters())
        self.initial = FrozenParams({name: p for name, p in params.items() if p.is_floating_point()})
        self._ever_trainable = {name for name, p in params.items() if p.requires_grad and p.is_floating_point()}
        self._versions = {name: p._version for name, p in params.items()}
        self._nested = _outermost_linearized(self.module)
        self._spectral = _spectral_norms(self.module)
        # Whether running the module as it is was found exact (None: not tried yet); see _run_plain.
        self._plain: bool | None = None
        # Whether the module's forward writes in place into the tensors it is given (nn.Embedding(max_norm=...)
        # renormalizes rows of its weight), in training and in eval mode (a layer may write in one only): unknown
        # until a forward in that mode, always on copies, shows it; then w0 is given as copies, so that no forward
        # can rewrite it.
        self._writes: dict[bool, bool] = {}

    @property
    def initial_params(self) -> dict[str, Tensor]:
        """w0 as a ``{name: tensor}`` dict of every floating-point parameter (the frozen snapshot, not a copy)."""
        return self.initial.as_dict()

    @property
    def tangent_names(self) -> list[str]:
        """Names of the parameters that get a tangent at the next forward (outside transforms)."""
        return self._tangent_names(dict(self.module.named_parameters()), self.initial.as_dict())

    def get_extra_state(self) -> dict[str, Any]:
        return {"ever_trainable": sorted(self._ever_trainable)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._ever_trainable = set(state["ever_trainable"])
        self._versions = {name: p._version for name, p in self.module.named_parameters()}

    def _tangent_names(self, params: dict[str, Tensor], initial: dict[str, Tensor]) -> list[str]:
        in_transform = torch._C._functorch.maybe_current_level() is not None
        if not in_transform and not torch.compiler.is_compiling():
            for name, p in params.items():
                if name in self._ever_trainable or name not in initial:
                    continue
                if p.requires_grad:
                    self._ever_trainable.add(name)
                elif p._version != self._versions.get(name):
                    # Written in place while frozen (an optimizer, load_state_dict, a manual edit): compared once.
                    if torch.equal(p, initial[name]):
                        self._versions[name] = p._version
                    else:
                        self._ever_trainable.add(name)
        names = [n for n in initial if n in self._ever_trainable or params[n].requires_grad]
        if in_transform:
            # Tensors a torch.func transform substituted (functional_call of an enclosing module) may carry
            # its tangents: the tangent model must be differentiated in them too.
            wrapped = torch._C._functorch.is_functorch_wrapped_tensor
            names += [n for n in initial if n not in names and wrapped(params[n])]
        return names

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``h̄(x; w)``: ``module``'s output at w0 plus its Jacobian at w0 applied to ``w − w0`` (see the class)."""
        if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
            # Forward-mode AD is off under inference mode (Lightning's validate/test run there): without this,
            # the tangent would silently vanish and the output be f(x; w0).
            with torch.inference_mode(False), torch.no_grad():
                return self.forward(*args, **kwargs)
        in_transform = torch._C._functorch.maybe_current_level() is not None
        # (torch.func.jvp opens a forward-AD level of its own, which is fine.)
        if not in_transform and getattr(fwAD, "_current_level", -1) >= 0:
            raise RuntimeError(
                f"LinearizedModel({type(self.module).__name__}) was called inside an open "
                "torch.autograd.forward_ad.dual_level, and PyTorch cannot nest forward-AD levels: differentiate "
                "it with torch.func.jvp instead"
            )
        initial = self.initial.as_dict()
        params = dict(self.module.named_parameters())
        names = self._tangent_names(params, initial)
        if self.training and self._spectral:
            _power_iterations_at_w0(self._spectral, initial, params)
        watch = not torch.compiler.is_compiling() and torch._C._functorch.maybe_current_level() is None
        writes = self._writes.get(self.training)
        if writes is not False and names:
            # w0 itself never enters a forward that may write into it: copies do, whose version counters say
            # whether it does (then copies at every forward).
            initial = {name: value.clone() if name in names else value for name, value in initial.items()}
        versions = {name: initial[name]._version for name in names} if watch else {}
        output = self._linearized(initial, params, names, in_transform, args, kwargs)
        if versions:
            written = next((name for name in names if initial[name]._version != versions[name]), None)
            if writes is None:
                self._writes[self.training] = written is not None
            elif written is not None and not writes:
                self._writes[self.training] = True
                raise RuntimeError(
                    f"LinearizedModel({type(self.module).__name__}): the forward wrote in place into the tensor it was "
                    f"given for {written!r}, which it had not done on its first call, so w0 was rewritten: rebuild the "
                    "LinearizedModel (its forwards now give the module copies of w0)")
        return output

    def _linearized(self, initial: dict[str, Tensor], params: dict[str, Tensor], names: list[str], in_transform: bool,
                    args: tuple, kwargs: dict) -> Any:
        with self._modes_context(), _safe_context(self.module):
            if not names:
                return self.module(*args, **kwargs)  # no tangent anywhere: w = w0 and h̄ = f
            if self._nested:
                plain = self._run_plain(names, args, kwargs)
                if plain is not None:
                    return plain[0]
            # maybe_current_level, not peek_interpreter_stack: the latter always answers "inside" while
            # torch.compile traces, which would send compiled code down the slower branch.
            if in_transform or self._nested:
                # Dual levels cannot nest, inside a torch.func transform or around a nested LinearizedModel:
                # torch.func.jvp composes with both.
                return self._forward_with_jvp(initial, params, names, args, kwargs)
            with fwAD.dual_level(), _TangentRules(constant_input_shortcut=True):
                duals = {name: fwAD.make_dual(initial[name], params[name] - initial[name]) for name in names}
                output = functional_call(self.module, duals, args, kwargs)
                return tree_map(_primal_plus_tangent, output)

    def _forward_with_jvp(self, initial: dict[str, Tensor], params: dict[str, Tensor], names: list[str],
                          args: tuple, kwargs: dict) -> Any:
        primals = {name: initial[name] for name in names}
        tangents = {name: params[name] - initial[name] for name in names}

        def at(p: dict[str, Tensor]) -> Any:
            return functional_call(self.module, p, args, kwargs)

        with _TangentRules(constant_input_shortcut=False), _running_statistics_frozen(self.module):
            primal, tangent = torch.func.jvp(at, (primals,), (tangents,))
        return tree_map(lambda a, b: a + b if isinstance(a, Tensor) and a.is_floating_point() else a, primal, tangent)

    def _run_plain(self, names: list[str], args: tuple, kwargs: dict) -> tuple[Any] | None:
        """``(module(*args),)`` when that is exactly the tangent model, else ``None`` (then nothing is changed).

        Exact when every parameter with a tangent lives in one nested LinearizedModel L, L runs once, and each
        output tensor is one L returned, unmodified: the output is then L(x') with x' independent of L's
        parameters (L owns deep copies of them), affine in w, so its linearization at any point is itself.
        """
        if self._plain is False:
            return None
        owners = [(prefix, sub) for prefix, sub in self._nested
                  if all(prefix == "" or n.startswith(prefix + ".") for n in names)]
        if not owners:
            self._plain = False
            return None
        inner = owners[0][1]
        produced: list[tuple[Tensor, int]] = []

        def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
            produced.extend((t, t._version) for t in tree_leaves(output) if isinstance(t, Tensor))

        rng = RNGState(self.module)
        calls = [0]
        handles = [inner.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)),
                   inner.register_forward_hook(record)]
        try:
            output = self.module(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        returned = [t for t in tree_leaves(output) if isinstance(t, Tensor)]
        unmodified = {id(t) for t, version in produced if t._version == version}
        if calls[0] == 1 and returned and all(id(t) in unmodified for t in returned):
            self._plain = True
            return (output,)
        # The module does more with the nested model's output: remember, and rerun with the same random numbers.
        self._plain = False
        rng.restore()
        return None

    def _modes_context(self) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        if self.batchnorm == "frozen":
            stack.enter_context(batchnorm_eval(self.module))
        if self._spectral:
            stack.enter_context(_no_power_iteration(self._spectral))
        return stack

    def extra_repr(self) -> str:
        return f"batchnorm={self.batchnorm!r}"


@contextlib.contextmanager
def _running_statistics_frozen(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers in training mode normalize with batch statistics but do not update running ones.

    Inside ``torch.func.jvp`` an in-place write to a buffer is an error ("mutate a captured Tensor").
    """
    layers = [m for m in module.modules() if keeps_running_stats(m) and m.training and m.track_running_stats]
    if layers and torch._C._functorch.maybe_current_level() is None:
        warnings.warn(
            f"LinearizedModel({type(module).__name__}): a nested LinearizedModel under a trainable head is computed "
            "with torch.func.jvp, which cannot update BatchNorm running statistics; the BatchNorm layers in training "
            "mode use batch statistics and keep their running statistics as they are",
            stacklevel=4,
        )
    with running_stats_untouched(layers):
        yield


def _safe_context(module: nn.Module) -> contextlib.AbstractContextManager:
    # forward_ad_safe swaps kernels and hooks every module: torch.compile would break its graph on it.
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return forward_ad_safe(module, "LinearizedModel")


def _primal_plus_tangent(value: Any) -> Any:
    if not isinstance(value, Tensor):
        return value
    primal, tangent = fwAD.unpack_dual(value)
    # An output the parameters do not reach (no tangent) is constant: its linearization is itself.
    return primal if tangent is None else primal + tangent


def _deepcopy(module: nn.Module) -> nn.Module:
    """``copy.deepcopy(module)``, also for modules holding a computed (non-leaf) tensor attribute.

    Old-style ``torch.nn.utils.weight_norm`` / ``spectral_norm`` keep ``module.weight`` as such a tensor, which
    deepcopy refuses; their hooks recompute it before every forward, so a detached copy stands in.
    """
    memo: dict[int, Any] = {}
    for sub in module.modules():
        for value in vars(sub).values():
            if isinstance(value, Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(module, memo)


def _outermost_linearized(module: nn.Module) -> list[tuple[str, LinearizedModel]]:
    """``(name, sub-module)`` of the LinearizedModels in ``module`` that no other one in it contains."""
    found: list[tuple[str, LinearizedModel]] = []
    for name, sub in module.named_modules():
        if isinstance(sub, LinearizedModel) and not any(name.startswith(p + ".") or p == "" for p, _ in found):
            found.append((name, sub))
    return found


# ------------------------------------------------------------------------------------ spectral norm

# One spectral-norm computation: (kind, the module to switch to eval, the parametrization or hook, the
# parametrized module, the parametrized module's name, the tensor's name).
_Spectral = tuple[str, nn.Module, Any, nn.Module, str, str]


def _spectral_norms(module: nn.Module) -> list[_Spectral]:
    """The spectral norms ``module`` computes itself (a nested LinearizedModel handles its own)."""
    nested = [prefix for prefix, _ in _outermost_linearized(module)]
    found: list[_Spectral] = []
    for prefix, sub in module.named_modules():
        if any(p == "" or prefix == p or prefix.startswith(p + ".") for p in nested):
            continue
        if parametrize.is_parametrized(sub):
            for tensor_name, plist in sub.parametrizations.items():
                for index, p in enumerate(plist):
                    if isinstance(p, _SpectralNorm):
                        found.append(("new", p, (plist, index), sub, prefix, tensor_name))
        for hook in sub._forward_pre_hooks.values():
            if isinstance(hook, _OldSpectralNorm):
                found.append(("old", sub, hook, sub, prefix, hook.name))
    return found


@contextlib.contextmanager
def _no_power_iteration(spectral: list[_Spectral]) -> Iterator[None]:
    """Spectral norm in eval mode (no power iteration) during the pass that carries tangents."""
    switched = [entry[1] for entry in spectral]
    modes = [m.training for m in switched]
    for m in switched:
        m.training = False
    try:
        yield
    finally:
        for m, training in zip(switched, modes):
            m.training = training


@torch.no_grad()
def _power_iterations_at_w0(spectral: list[_Spectral], initial: dict[str, Tensor], params: dict[str, Tensor]) -> None:
    """What spectral norm's training-mode forward does to its vectors u, v, done on the weight at w0."""
    for kind, switched, what, owner, prefix, tensor_name in spectral:
        if not switched.training:
            continue
        dot = f"{prefix}." if prefix else ""
        if kind == "old":
            name = f"{dot}{tensor_name}_orig"
            weight = initial.get(name, params.get(name))
            weight_mat = what.reshape_weight_to_matrix(weight)
            u, v = getattr(owner, tensor_name + "_u"), getattr(owner, tensor_name + "_v")
            for _ in range(what.n_power_iterations):
                v = F.normalize(torch.mv(weight_mat.t(), u), dim=0, eps=what.eps, out=v)
                u = F.normalize(torch.mv(weight_mat, v), dim=0, eps=what.eps, out=u)
            continue
        plist, index = what
        base = f"{dot}parametrizations.{tensor_name}."
        originals = [k for k, _ in plist.named_parameters(recurse=False)]
        values = [initial.get(base + k, params.get(base + k)) for k in originals]
        weight = plist[0](*values) if index > 0 else values[0]
        for earlier in list(plist)[1:index]:
            weight = earlier(weight)
        if weight.ndim > 1:
            norm = plist[index]
            norm._power_method(norm._reshape_weight_to_matrix(weight), norm.n_power_iterations)
