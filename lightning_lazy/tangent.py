"""The tangent model h̄(w) = h(w0) + Dh(w0)(w − w0), computed by forward-mode AD on every call.

Chizat, Oyallon & Bach (2019), section 1: the linearization of a model around its initialization w0.
Training it from w0 with the optimizer that trains the real model gives the *tangent path* w̄(t), the
reference that lazy training stays close to.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from lightning_lazy._params import FrozenParams, batchnorm_eval

BATCHNORM_POLICIES = ("frozen", "batch")

# Ops whose forward-AD rule materializes a zero tangent for an input that has none (the network's input
# x), and so pays for a matrix product with zeros. For y = op(x, W, b) with x constant, the tangent is
# op(x, dW, db): one product instead of two.
_PARAMETER_LINEAR_OPS = (F.linear, F.conv1d, F.conv2d, F.conv3d)


class _ConstantInputTangents(TorchFunctionMode):
    """Computes the tangent of ``linear``/``conv`` layers whose input carries no tangent directly."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch protocol
        kwargs = kwargs or {}
        # nn.Linear / nn.ConvNd pass (input, weight, bias, ...) positionally; anything else takes the
        # general rule.
        if func in _PARAMETER_LINEAR_OPS and len(args) >= 3 and fwAD.unpack_dual(args[0]).tangent is None:
            x, weight, bias, *rest = args
            weight_p, weight_t = fwAD.unpack_dual(weight)
            bias_p, bias_t = fwAD.unpack_dual(bias) if bias is not None else (None, None)
            if weight_t is not None and (bias is None or bias_t is not None):
                primal = func(x, weight_p, bias_p, *rest, **kwargs)
                tangent = func(x, weight_t, bias_t, *rest, **kwargs)
                return fwAD.make_dual(primal, tangent)
        return func(*args, **kwargs)


class LinearizedModel(nn.Module):
    """The exact tangent model ``f(x; w0) + J(w0)(w − w0)`` of ``module``, trainable like any nn.Module.

    ``module`` is deep-copied: the copy's parameters are this model's trainable parameters ``w`` and start
    at ``w0``; ``w0`` itself is a frozen snapshot kept as buffers (saved in ``state_dict``, follows
    ``.to()``). Every forward is one pass of dual numbers (``torch.autograd.forward_ad``) with primal
    ``w0`` and tangent ``w − w0``; no Jacobian is ever formed. The output is linear in ``w``, so its
    gradient is ``J(w0)ᵀ g`` exactly; autograd obtains it by differentiating the tangent computation,
    which costs one ordinary backward pass.

    BatchNorm policy (``batchnorm``):

    - ``"frozen"`` (default): BatchNorm layers always run in eval mode on the running statistics
      the module had when it was copied (those of w0), so the tangent model is one fixed function of x.
    - ``"batch"``: in training mode BatchNorm normalizes with the statistics of the batch, computed by
      the network at w0 (the linearization then depends on the batch, as the real network does); the
      copy's own running statistics are updated from w0's activations and used in eval mode.

    Either way the module that was passed in is never touched: its running statistics stay its own.
    Parameters with ``requires_grad=False`` are held at w0 and get no tangent.
    """

    def __init__(self, module: nn.Module, batchnorm: str = "frozen") -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"LinearizedModel wraps an nn.Module, got {type(module).__name__}")
        if batchnorm not in BATCHNORM_POLICIES:
            raise ValueError(f"batchnorm must be one of {BATCHNORM_POLICIES}, got {batchnorm!r}")
        self.batchnorm = batchnorm
        self.module = copy.deepcopy(module)
        self.initial = FrozenParams(
            {name: p for name, p in self.module.named_parameters() if p.requires_grad}
        )

    @property
    def initial_params(self) -> dict[str, Tensor]:
        """w0 as a ``{name: tensor}`` dict (the frozen snapshot, not a copy)."""
        return self.initial.as_dict()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
            # Forward-mode AD is off under inference mode (Lightning's validate/test run there): without this,
            # the tangent would silently vanish and the output be f(x; w0).
            with torch.inference_mode(False), torch.no_grad():
                return self.forward(*args, **kwargs)
        initial = self.initial.as_dict()
        params = dict(self.module.named_parameters())
        # maybe_current_level, not peek_interpreter_stack: the latter always answers "inside" while
        # torch.compile traces, which would send compiled code down the slower branch.
        if torch._C._functorch.maybe_current_level() is not None:
            # Inside a torch.func transform (the monitor's jvp/vjp): dual levels cannot nest there, so use
            # torch.func.jvp, which composes with the enclosing transform.
            return self._forward_in_transform(initial, params, args, kwargs)
        with self._batchnorm_context(), fwAD.dual_level(), _ConstantInputTangents():
            duals = {name: fwAD.make_dual(w0, params[name] - w0) for name, w0 in initial.items()}
            try:
                output = functional_call(self.module, duals, args, kwargs)
            except (NotImplementedError, RuntimeError) as error:
                if not _is_forward_ad_error(error):
                    raise
                raise _locate_forward_ad_error(self.module, duals, args, kwargs, error) from error
            return tree_map(_primal_plus_tangent, output)

    def _forward_in_transform(self, initial: dict[str, Tensor], params: dict[str, Tensor], args: tuple,
                              kwargs: dict) -> Any:
        tangents = {name: params[name] - w0 for name, w0 in initial.items()}

        def at(p: dict[str, Tensor]) -> Any:
            return functional_call(self.module, p, args, kwargs)

        with self._batchnorm_context():
            primal, tangent = torch.func.jvp(at, (initial,), (tangents,))
        return tree_map(lambda a, b: a + b if isinstance(a, Tensor) else a, primal, tangent)

    def _batchnorm_context(self) -> contextlib.AbstractContextManager:
        return batchnorm_eval(self.module) if self.batchnorm == "frozen" else contextlib.nullcontext()

    def extra_repr(self) -> str:
        return f"batchnorm={self.batchnorm!r}"


def _primal_plus_tangent(value: Any) -> Any:
    if not isinstance(value, Tensor):
        return value
    primal, tangent = fwAD.unpack_dual(value)
    # An output the parameters do not reach (no tangent) is constant: its linearization is itself.
    return primal if tangent is None else primal + tangent


_FORWARD_AD_MARKERS = ("forward AD", "forward-mode AD", "forward mode AD", "jvp function", "forward grad")


def _is_forward_ad_error(error: BaseException) -> bool:
    text = str(error)
    return any(marker in text for marker in _FORWARD_AD_MARKERS)


def _locate_forward_ad_error(
    module: nn.Module, duals: dict[str, Tensor], args: tuple, kwargs: dict, error: BaseException
) -> RuntimeError:
    """Re-run the failing forward with hooks to name the innermost module in which the op failed."""
    stack: list[str] = []
    failed: list[str] = []
    handles = []
    for name, sub in module.named_modules():
        label = f"{name or '<root>'} ({type(sub).__name__})"

        def pre_hook(_m: nn.Module, _inputs: Any, label: str = label) -> None:
            stack.append(label)

        def post_hook(_m: nn.Module, _inputs: Any, _output: Any) -> None:
            stack.pop()

        handles.append(sub.register_forward_pre_hook(pre_hook))
        handles.append(sub.register_forward_hook(post_hook))
    try:
        functional_call(module, duals, args, kwargs)
    except (NotImplementedError, RuntimeError):
        failed = list(stack)
    finally:
        for handle in handles:
            handle.remove()
    where = failed[-1] if failed else "an unknown module"
    return RuntimeError(
        f"LinearizedModel: an operation in module {where} has no forward-mode AD rule, so the tangent model "
        f"cannot be computed. PyTorch said: {error}. Replace that operation with one that supports "
        "forward-mode AD, or give your custom autograd.Function a jvp() staticmethod."
    )
