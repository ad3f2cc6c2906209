"""Forward-mode AD on stock layers: kernels that have a forward-AD rule, and errors that name the module.

Several fast kernels PyTorch picks by default have no forward-mode AD rule: the fused Transformer encoder
fast path (``aten::_transformer_encoder_layer_fwd``, taken by ``nn.TransformerEncoder`` /
``nn.MultiheadAttention`` in eval mode), the flash / memory-efficient kernels of
``F.scaled_dot_product_attention``, and the oneDNN / cuDNN RNN kernels of ``nn.LSTM`` / ``nn.GRU`` /
``nn.RNN``. Each has a plain composite implementation that does have one and computes the same function.
Some activations have a first-order rule but none of second order, which the twin's backward (reverse over
forward) and ‖D²h‖ (forward over reverse) need: ``hardsigmoid`` (``nn.Hardsigmoid``, the gate of
MobileNetV3's squeeze-excitation in timm and torchvision; its rule calls ``hardsigmoid_backward``, which has
neither) and ``glu``; both are computed by composites of ops that have every rule. Checked on torch 2.14 for
forward, forward-over-reverse and reverse-over-forward AD: ReLU, ReLU6, LeakyReLU, Hardtanh, Hardswish,
SiLU, Mish, GELU (both forms), ELU, SELU, Softplus, Tanh, Sigmoid, layer / group / batch / RMS norm,
adaptive average and max pooling, interpolation (nearest, bilinear, bicubic) and pixel shuffle all have
them.
:func:`forward_ad_safe` selects those while the package differentiates forward-mode (the tangent model,
every measure); the user's own forwards are never affected.

Lightning-free; imported by ``tangent`` and ``diagnostics``.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode, handle_torch_function, has_torch_function_unary

# Phrases of PyTorch's messages for a missing forward-AD rule, and for an autograd.Function that torch.func
# transforms cannot run (no setup_context).
_FORWARD_AD_MARKERS = (
    "forward AD", "forward-mode AD", "forward mode AD", "jvp function", "forward grad", "functorch transforms",
)
# Autograd's message when the backward of an op's forward-AD rule (or of another backward) has no formula:
# "derivative for aten::hardsigmoid_backward is not implemented".
_MISSING_DERIVATIVE = re.compile(r"derivative for (\S+) is not implemented")

# What still works without changing the model, when an op has no rule: each option switches off the
# computations that need it (the other measures need no derivative of the network, or only reverse mode).
WAYS_OUT = (
    "Without changing the model: LazyTrainingMonitor(measure_kappa=False) skips kappa and ||D^2h|| (second "
    "derivatives), track_tangent=False skips the tangent twin (divergence, tangent gap), measure_ntk=False the "
    "NTK; displacement, activation stability and the per-layer measures need no forward-mode derivative"
)


class ForwardADError(RuntimeError):
    """An operation on the path from the parameters to the output has no forward-mode AD rule."""


def is_forward_ad_error(error: BaseException) -> bool:
    """Whether ``error`` is PyTorch saying that an op has no forward-mode AD rule."""
    text = str(error)
    return isinstance(error, (NotImplementedError, RuntimeError)) and (
        any(m in text for m in _FORWARD_AD_MARKERS) or _MISSING_DERIVATIVE.search(text) is not None)


def as_forward_ad_error(error: BaseException, what: str) -> ForwardADError | None:
    """A one-line :class:`ForwardADError` for PyTorch's ``error`` when that says an op has no forward-mode AD
    rule or no derivative of its rule (raised by a backward through a tangent, where no module is running);
    ``None`` for any other error. ``what`` names the computation (e.g. "the tangent twin's backward")."""
    if not is_forward_ad_error(error):
        return None
    said = " ".join(str(error).split("\n")[0].split())
    return ForwardADError(f"{what}: an operation has no forward-mode AD rule (or no derivative of it), so the "
                          f"tangent model cannot be differentiated. PyTorch said: {said} {WAYS_OUT}.")


def _is_checkpoint_error(error: BaseException) -> bool:
    """Whether ``error`` comes from ``torch.utils.checkpoint``'s machinery (saved-tensor hooks, its Function)."""
    text = str(error)
    return (type(error).__name__ == "CheckpointError" or "saved tensor hooks" in text
            or ("CheckpointFunction" in text) or "torch.utils.checkpoint" in text)


def _has_rnn(module: nn.Module | None) -> bool:
    return module is not None and any(isinstance(m, nn.RNNBase) for m in module.modules())


# Activation modules whose functional form lacks a second-order rule (see the module docstring).
_COMPOSITE_ACTIVATION_MODULES = (nn.Hardsigmoid, nn.GLU)


def _needs_composites(module: nn.Module | None) -> bool:
    """Whether ``module`` holds weight norm, ``nn.Hardsigmoid`` or ``nn.GLU`` (a functional model, whose
    layers cannot be seen: always). The mode that swaps their kernels costs a Python call per op, so it is
    entered only where needed; a functional ``F.hardsigmoid`` inside a module of another type is not seen
    (its error then names the ways out)."""
    if module is None:
        return True
    # parametrizations.weight_norm registers a _WeightNorm module; the old-style hook leaves weight_g / weight_v.
    return any(type(m).__name__ == "_WeightNorm" or hasattr(m, "weight_g") or isinstance(m, _COMPOSITE_ACTIVATION_MODULES)
               for m in module.modules())


def composite_weight_norm(args: tuple, kwargs: dict) -> torch.Tensor:
    """``torch._weight_norm(v, g, dim)`` by its composite formula v · g / ‖v‖ (norm over every dimension but
    ``dim``): the fused kernel ``_weight_norm_interface`` has no forward-AD rule; this is the same function,
    and has one."""
    v, g = args[0], args[1]
    dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
    return v * (g / torch.norm_except_dim(v, 2, dim))


def composite_hardsigmoid(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """hardsigmoid(x) = clamp(x + 3, 0, 6) / 6, elementwise, any shape (as PyTorch's kernel computes it).

    PyTorch's rule for ``hardsigmoid`` calls ``hardsigmoid_backward``, which has no forward-AD rule and no
    derivative: the twin's backward and ‖D²h‖ fail on it. ``clamp`` has both (derivative 1/6 strictly between
    the kinks −3 and 3, 0 outside). ``inplace`` is ignored: the result is a new tensor (writing it into ``x``
    would change a tensor autograd keeps), which every caller that uses the returned value, as
    ``nn.Hardsigmoid`` does, cannot tell apart.

    Dispatched through ``__torch_function__`` as itself, so a mode that watches activations
    (:func:`~lightning_lazy.diagnostics.recording_activation_states`) sees a Hardsigmoid, not a clamp, whichever
    of the two modes was entered first."""
    if has_torch_function_unary(x):
        return handle_torch_function(composite_hardsigmoid, (x,), x, inplace=inplace)
    del inplace
    return (x + 3).clamp(0, 6) / 6


def composite_glu(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """glu(x) = a · sigmoid(b), with a, b the two halves of ``x`` along ``dim`` (Dauphin et al., 2017).

    ``glu``'s forward-AD rule calls ``glu_jvp``, which has neither rule nor derivative of its own. Dispatched through
    ``__torch_function__`` as itself (see :func:`composite_hardsigmoid`)."""
    if has_torch_function_unary(x):
        return handle_torch_function(composite_glu, (x,), x, dim=dim)
    a, b = x.chunk(2, dim=dim)
    return a * torch.sigmoid(b)


_COMPOSITE_FUNCTIONS = {
    F.hardsigmoid: lambda args, kwargs: composite_hardsigmoid(*args, **kwargs),
    torch._C._nn.hardsigmoid: lambda args, kwargs: composite_hardsigmoid(*args),
    torch._C._nn.hardsigmoid_: lambda args, kwargs: composite_hardsigmoid(*args),
    F.glu: lambda args, kwargs: composite_glu(*args, **kwargs),
    torch._weight_norm: composite_weight_norm,
}


class _Composites(TorchFunctionMode):
    """Every call of ``torch._weight_norm``, ``F.hardsigmoid`` and ``F.glu`` by its composite above."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch protocol
        kwargs = kwargs or {}
        composite = _COMPOSITE_FUNCTIONS.get(func)
        if composite is not None:
            return composite(args, kwargs)
        return func(*args, **kwargs)


def _hook_code(hook: object) -> object:
    function = getattr(hook, "func", hook)  # functools.partial
    return getattr(function, "__code__", None) or getattr(getattr(function, "__call__", None), "__code__", None)


def _hooks_set_requires_grad(module: nn.Module | None) -> bool:
    """Whether a forward hook of ``module``'s modules calls ``requires_grad_`` (Hugging Face's
    ``enable_input_require_grads``, which ``gradient_checkpointing_enable`` relies on, registers
    ``make_inputs_require_grads`` on the input embeddings: ``output.requires_grad_(True)``)."""
    if module is None:
        return False
    for m in module.modules():
        for hook in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()):
            code = _hook_code(hook)
            if code is not None and "requires_grad_" in code.co_names:
                return True
    return False


class _RequiresGradInTransforms(TorchFunctionMode):
    """``Tensor.requires_grad_`` does nothing inside a ``torch.func`` transform, where torch refuses it, and inside
    a forward-AD dual level, where it would make the primal h(w0) of a tangent model require grad (its backward
    then runs through the primal's graph, which forward-mode rules overwrite in place).

    A hook that marks an intermediate tensor as requiring grad (so that reentrant activation checkpointing
    propagates gradients to frozen embeddings) changes no value: the transform or the tangent tracks the
    derivatives, and checkpointing runs as a plain call there (:func:`plain_checkpoints`)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch protocol
        kwargs = kwargs or {}
        if func is torch.Tensor.requires_grad_ and (torch._C._functorch.maybe_current_level() is not None
                                                    or getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0):
            return args[0]
        return func(*args, **kwargs)


@contextlib.contextmanager
def _mha_fastpath_off() -> Iterator[None]:
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


@contextlib.contextmanager
def _rnn_kernels_off() -> Iterator[None]:
    # The private switches, not torch.backends.*.flags(): those also reset TF32/determinism settings and
    # warn about oneDNN TF32 on every entry.
    mkldnn, cudnn = torch._C._get_mkldnn_enabled(), torch._C._get_cudnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    torch._C._set_cudnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(mkldnn)
        torch._C._set_cudnn_enabled(cudnn)


class _PlainCall:
    """``CheckpointFunction`` as a plain call: ``apply(function, preserve_rng_state, *args) = function(*args)``."""

    @staticmethod
    def apply(function, _preserve_rng_state, *args):  # noqa: ANN001, ANN205 - torch's signature
        return function(*args)


def _plain_impl(function, args, kwargs, **_options):  # noqa: ANN001, ANN202 - torch's signature
    return function(*args, **(kwargs or {}))


def _plain_no_reentrant_generator(*_args, **_kwargs) -> Iterator[None]:  # older torch: checkpoint() calls next()
    yield


@contextlib.contextmanager
def plain_checkpoints() -> Iterator[None]:
    """Inside, ``torch.utils.checkpoint.checkpoint(function, *args)`` (reentrant or not, and
    ``checkpoint_sequential``) returns ``function(*args)`` directly.

    Activation checkpointing trades memory for a second forward in the backward pass; its value is that of
    the plain call (the forward runs once, drawing the same random numbers). Its machinery (saved-tensor
    hooks, a custom autograd.Function) has no forward-mode AD rule and cannot run inside ``torch.func``
    transforms; the tangent model and the measures need neither the saved graph nor the recomputation. The
    module's internals that ``checkpoint`` looks up at each call are swapped (process-wide, for the block).
    """
    import torch.utils.checkpoint as module

    replacements = {"_checkpoint_impl": _plain_impl, "CheckpointFunction": _PlainCall,
                    "_checkpoint_without_reentrant_generator": _plain_no_reentrant_generator}
    saved = {name: getattr(module, name) for name in replacements if hasattr(module, name)}
    for name in saved:
        setattr(module, name, replacements[name])
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


class _ModuleStack:
    """Which modules are executing: global forward hooks push and pop; a failing forward never pops."""

    def __init__(self) -> None:
        self.stack: list[nn.Module] = []

    def push(self, module: nn.Module, _inputs: object) -> None:
        self.stack.append(module)

    def pop(self, module: nn.Module, _inputs: object, _output: object) -> None:
        if self.stack and self.stack[-1] is module:
            self.stack.pop()


def _describe(module: nn.Module | None, failing: nn.Module | None) -> str:
    if failing is None:
        return "the model"
    names = {m: name for name, m in module.named_modules()} if module is not None else {}
    name = names.get(failing)
    return f"{name or '<root>'} ({type(failing).__name__})" if name is not None else type(failing).__name__


# ids of the modules a forward_ad_safe block is open for (innermost last).
_SAFE_NOW: list[int] = []


@contextlib.contextmanager
def forward_ad_safe(module: nn.Module | None = None, what: str = "lightning_lazy") -> Iterator[None]:
    """Run forward-mode AD on ``module`` with kernels that have a forward-AD rule, and locate failures.

    Inside: the MHA / Transformer fast path is off, ``scaled_dot_product_attention`` uses its math kernel,
    when ``module`` holds an RNN the oneDNN and cuDNN kernels are off (RNNs then run their composite
    implementation; other layers are unaffected otherwise), and, when ``module`` holds them (or is ``None``),
    weight norm, ``hardsigmoid`` and ``glu`` are computed by their composite formulas; activation checkpointing
    runs the checkpointed function as a plain call (:func:`plain_checkpoints`); when a forward hook calls
    ``requires_grad_`` (Hugging Face's ``gradient_checkpointing_enable`` with ``enable_input_require_grads``), that
    call does nothing inside ``torch.func`` transforms, which refuse it. The same functions are
    computed, a little slower. An op that still has no forward-AD rule raises :class:`ForwardADError`,
    one line naming the innermost module that was running (``what`` says which computation needed it) and
    the monitor's options that still work, chained to nothing.
    """
    if module is not None and id(module) in _SAFE_NOW:
        # Already inside for this module (the twin's forward around LinearizedModel's): the outer block swaps the
        # same kernels and locates failures, and entering again would cost its setup at every step.
        yield
        return
    tracker = _ModuleStack()
    with contextlib.ExitStack() as stack:
        if module is not None:
            _SAFE_NOW.append(id(module))
            stack.callback(_SAFE_NOW.pop)
        stack.enter_context(_mha_fastpath_off())
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        if _has_rnn(module):
            stack.enter_context(_rnn_kernels_off())
        if _needs_composites(module):
            stack.enter_context(_Composites())
        if _hooks_set_requires_grad(module):
            stack.enter_context(_RequiresGradInTransforms())
        stack.enter_context(plain_checkpoints())
        # The module stack below uses global module hooks; a compiled module called inside (run eagerly by the
        # monitor) would warn at every call that such hooks fire twice for it, which only the stack sees.
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message=r".*global hooks on modules.*")
        handles = [
            nn.modules.module.register_module_forward_pre_hook(tracker.push),
            nn.modules.module.register_module_forward_hook(tracker.pop),
        ]
        stack.callback(lambda: [h.remove() for h in handles])
        try:
            yield
        except ForwardADError:
            raise
        except (NotImplementedError, RuntimeError) as error:
            failing = tracker.stack[-1] if tracker.stack else None
            if _is_checkpoint_error(error):
                raise ForwardADError(
                    f"{what}: activation checkpointing (torch.utils.checkpoint) in module {_describe(module, failing)} "
                    "could not be run as a plain call in this torch version, and its machinery cannot run inside "
                    "forward-mode AD; switch checkpointing off while monitoring"
                ) from None
            if not is_forward_ad_error(error):
                raise
            said = " ".join(str(error).split("\n")[0].split())
            raise ForwardADError(
                f"{what}: an operation in module {_describe(module, failing)} has no forward-mode AD rule, so its "
                f"tangent (Jacobian-vector product) cannot be computed. PyTorch said: {said} {WAYS_OUT}; in your own "
                "code, an op with the rule or an autograd.Function with setup_context() and jvp() would do."
            ) from None
