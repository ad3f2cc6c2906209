"""How far the network has moved: the path divergence Δ, displacement, activation stability (piecewise-linear units)."""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from lightning_lazy._forward_ad import composite_glu, composite_hardsigmoid
from lightning_lazy._params import check_finite
from lightning_lazy.diagnostics._common import (
    ModelLike,
    Params,
    _check_probe,
    _output,
)
from lightning_lazy.diagnostics.ntk import owning_module
from lightning_lazy.scaling import IGNORE_INDEX, _check_classes, squared_distance


def path_divergence(output: Tensor, tangent_output: Tensor, target: Tensor | None, initial_output: Tensor) -> Tensor:
    """Δ = ‖α h(w(t)) − α h̄(w̄(t))‖_F / ‖y* − α h(w0)‖_F on the probe, all arguments ``[N, K]``.

    ``output`` / ``tangent_output``: the trained model and its linearized twin; ``initial_output``: the
    trained model at initialization. ``target`` may be class indices of the output's shape without its last
    dimension (``[N]`` for ``[N, K]``, ``[N, T]`` for token logits ``[N, T, V]``; y* their one-hot encoding, never
    built: :func:`~lightning_lazy.scaling.squared_distance`), or ``None`` (y* = 0); positions whose class index is
    −100 (``scaling.IGNORE_INDEX``, the loss's ``ignore_index``) are left out of both norms. The denominator is
    fixed along training: :func:`divergence_scale` computes it once.
    """
    for name, tensor in (("output", output), ("tangent_output", tangent_output), ("initial_output", initial_output)):
        if tensor.shape != output.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected the output's {tuple(output.shape)}")
        check_finite(tensor, name)
    return divergence_numerator(output, tangent_output, target) / divergence_scale(target, initial_output)


def divergence_scale(target: Tensor | None, initial_output: Tensor) -> Tensor:
    """Δ's denominator ‖y* − α h(w0)‖_F (``target`` and ``initial_output`` as in :func:`path_divergence`), a 0-d
    tensor. Raises ``ValueError`` when it is 0 (the divergence then has no scale) or the targets do not fit."""
    if target is not None:
        check_finite(target, "target")
    scale = squared_distance(initial_output, target).sqrt()
    if float(scale) == 0.0:
        raise ValueError("the target equals the initial output on the probe: the divergence has no scale")
    return scale


def divergence_numerator(output: Tensor, tangent_output: Tensor, target: Tensor | None = None) -> Tensor:
    """Δ's numerator ‖α h(w(t)) − α h̄(w̄(t))‖_F, leaving out the positions whose class ``target`` is −100 (the
    ignored positions are in no norm: as in the loss, they are not trained). One temporary of the output's size."""
    difference = output - tangent_output
    if target is not None and not target.is_floating_point():
        _check_classes(difference, target)
        keep = (target != IGNORE_INDEX).unsqueeze(-1).to(difference.dtype)
        if not bool(keep.all()):
            difference.mul_(keep)
    return difference.norm()


# ----------------------------------------------------------------------------------------------------
# weights and activations


class Displacement(NamedTuple):
    """``total`` = ‖w − w0‖ / scale; ``per_tensor`` = ‖w_p − w0_p‖/‖w0_p‖ for tensors with w0_p ≠ 0;
    ``absolute`` = ‖w_p − w0_p‖ for every tensor (zero-initialized biases have no relative scale); ``relative_to``
    says what ``total`` is relative to: ``"w0"`` (‖w0‖, the usual case), ``"reference"`` (‖reference‖: every initial
    weight is zero, as a LoRA update B·A whose B starts at 0 when only B is trained, and the displacement is relative
    to the weights it adapts) or ``"absolute"`` (no scale anywhere: ‖w − w0‖ itself, in the weights' units)."""

    total: Tensor
    per_tensor: dict[str, Tensor]
    absolute: dict[str, Tensor]
    relative_to: str = "w0"


def displacement(params: Params, initial_params: Params, reference: Params | None = None) -> Displacement:
    """Relative distance of the weights from initialization, overall and per parameter tensor:
    ‖w − w0‖ / ‖w0‖ (norms over all the tensors of ``params``).

    When every initial weight is zero (a LoRA B initialised at 0 and trained alone), ‖w0‖ gives no scale: the total
    is then relative to ‖reference‖ (e.g. the frozen weights the trained ones adapt), or, without a reference of
    nonzero norm, absolute; ``relative_to`` says which. Raises ``ValueError`` when the dicts name different tensors,
    shapes differ, or ``params`` is empty."""
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
    if float(initial_sq) > 0.0:
        return Displacement(torch.sqrt(moved_sq / initial_sq), per_tensor, absolute, "w0")
    scale = _norm(reference.values()) if reference else None
    if scale is not None and float(scale) > 0.0:
        return Displacement(torch.sqrt(moved_sq) / scale.to(moved_sq.dtype), per_tensor, absolute, "reference")
    return Displacement(torch.sqrt(moved_sq), per_tensor, absolute, "absolute")


def _norm(tensors: Iterable[Tensor]) -> Tensor | None:
    """‖·‖ over several tensors (``None`` for none)."""
    squares = [t.detach().double().pow(2).sum() for t in tensors if t.is_floating_point()]
    return torch.sqrt(sum(squares)) if squares else None


_F = torch.nn.functional


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: float) -> float:
    return float(args[index] if len(args) > index else kwargs.get(name, default))


def _kinks(*points: float) -> Callable[[tuple, dict], tuple[float, ...]]:
    return lambda args, kwargs: points


def _hardtanh_kinks(args: tuple, kwargs: dict) -> tuple[float, ...]:
    return _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0)


def _shrink_kinks(args: tuple, kwargs: dict) -> tuple[float, ...]:
    lambd = _arg(args, kwargs, 1, "lambd", 0.5)
    return -lambd, lambd


def _threshold_kinks(args: tuple, kwargs: dict) -> tuple[float, ...]:
    return (_arg(args, kwargs, 1, "threshold", 0.0),)


def _bound(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    value = args[index] if len(args) > index else kwargs.get(name)
    return value.detach() if isinstance(value, Tensor) else value


def _clamp_kinks(args: tuple, kwargs: dict) -> tuple[Any, ...]:
    """clamp(x, min, max): its bounds that are given (numbers, or tensors broadcast against x)."""
    return tuple(b for b in (_bound(args, kwargs, 1, "min"), _bound(args, kwargs, 2, "max")) if b is not None)


def _clamp_min_kinks(args: tuple, kwargs: dict) -> tuple[Any, ...]:
    return (_bound(args, kwargs, 1, "min"),)


def _clamp_max_kinks(args: tuple, kwargs: dict) -> tuple[Any, ...]:
    return (_bound(args, kwargs, 1, "max"),)


# Piecewise-linear activations (Hardswish: piecewise quadratic, linear outside [-3, 3]), by the function their
# module calls (nn.ReLU6 is an nn.Hardtanh(0, 6): F.hardtanh), with the kinks that bound their pieces.
_PIECEWISE: dict[Callable, tuple[str, Callable[[tuple, dict], tuple[float, ...]]]] = {}
for _name, _functions, _rule in (
    ("relu", (torch.relu, torch.relu_, _F.relu, Tensor.relu, Tensor.relu_), _kinks(0.0)),
    ("relu6", (_F.relu6,), _kinks(0.0, 6.0)),
    ("hardtanh", (_F.hardtanh, getattr(_F, "hardtanh_", None)), _hardtanh_kinks),
    ("leaky_relu", (_F.leaky_relu, getattr(_F, "leaky_relu_", None)), _kinks(0.0)),
    ("prelu", (_F.prelu, torch.prelu), _kinks(0.0)),
    ("rrelu", (_F.rrelu, getattr(_F, "rrelu_", None)), _kinks(0.0)),
    ("threshold", (_F.threshold, getattr(_F, "threshold_", None)), _threshold_kinks),
    ("hardsigmoid", (_F.hardsigmoid, composite_hardsigmoid), _kinks(-3.0, 3.0)),
    ("hardswish", (_F.hardswish,), _kinks(-3.0, 3.0)),
    ("hardshrink", (_F.hardshrink, torch.hardshrink, Tensor.hardshrink), _shrink_kinks),
    ("softshrink", (_F.softshrink,), _shrink_kinks),
    # A clamp is a piecewise-linear unit too: a ReLU written x.clamp(min=0), a ReLU6 clamp(x, 0, 6), and the
    # composites that stand in for Hardsigmoid elsewhere.
    ("clamp", (torch.clamp, torch.clip, Tensor.clamp, Tensor.clip, Tensor.clamp_, Tensor.clip_, torch.clamp_,
               torch.clip_), _clamp_kinks),
    ("clamp", (torch.clamp_min, Tensor.clamp_min, Tensor.clamp_min_, torch.clamp_min_), _clamp_min_kinks),
    ("clamp", (torch.clamp_max, Tensor.clamp_max, Tensor.clamp_max_, torch.clamp_max_), _clamp_max_kinks),
):
    for _function in _functions:
        if _function is not None:
            _PIECEWISE[_function] = (_name, _rule)

# Smooth activations: no unit ever switches piece, so they have no activation stability; recorded by name so
# that a model made of them can be told what to read instead.
_SMOOTH: dict[Callable, str] = {}
for _name, _functions in (
    ("gelu", (_F.gelu,)), ("glu", (composite_glu,)), ("silu", (_F.silu,)), ("mish", (_F.mish,)), ("elu", (_F.elu,)), ("selu", (_F.selu,)),
    ("celu", (_F.celu,)), ("softplus", (_F.softplus,)), ("glu", (_F.glu,)), ("logsigmoid", (_F.logsigmoid,)),
    ("tanh", (torch.tanh, _F.tanh, Tensor.tanh)), ("sigmoid", (torch.sigmoid, _F.sigmoid, Tensor.sigmoid)),
):
    for _function in _functions:
        _SMOOTH[_function] = _name
del _name, _functions, _rule, _function


class ActivationStates(list):
    """The linear-piece states of one forward: a ``list[Tensor]``, one tensor per piecewise-linear activation
    call in call order, each the input's shape, holding the index of the piece each unit is on (bool for one
    kink: ``pre-activation > kink``; uint8 for several: the number of kinks strictly below the input).
    ``names``: the activation of each entry (``"relu"``, ``"relu6"``, ...); ``smooth``: the smooth activations
    (GELU, SiLU, tanh, ...) the forward applied, by name, in first-call order."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.smooth: list[str] = []


def _piece(x: Tensor, kinks: tuple[float, ...]) -> Tensor:
    if len(kinks) == 1:
        return x > kinks[0]
    index = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for kink in kinks:
        index += x > kink
    return index


class _ActivationRecorder(TorchFunctionMode):
    """Records, for every piecewise-linear activation call (module or functional form), which piece each
    unit is on, and the names of the smooth activations called."""

    def __init__(self) -> None:
        super().__init__()
        self.states = ActivationStates()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch protocol
        kwargs = kwargs or {}
        piecewise = _PIECEWISE.get(func)
        if piecewise is not None and args and isinstance(args[0], Tensor) and args[0].is_floating_point():
            name, rule = piecewise
            kinks = rule(args, kwargs)
            self.states.append(_piece(args[0].detach(), kinks))  # before the call: in-place overwrites
            self.states.names.append("relu6" if name == "hardtanh" and kinks == (0.0, 6.0) else name)  # nn.ReLU6
        elif func in _SMOOTH and _SMOOTH[func] not in self.states.smooth:
            self.states.smooth.append(_SMOOTH[func])
        return func(*args, **kwargs)


_ReluRecorder = _ActivationRecorder  # the name before other piecewise-linear activations were counted


@contextlib.contextmanager
def recording_activation_states() -> Iterator[ActivationStates]:
    """Within the block, the linear-piece state of every piecewise-linear unit any forward computes is
    appended to the :class:`ActivationStates` yielded, one tensor per activation call in call order.

    Counted: ReLU (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``Tensor.relu``, in-place forms), ReLU6, Hardtanh,
    LeakyReLU, PReLU, RReLU, Threshold, Hardsigmoid, Hardswish, Hardshrink, Softshrink, and clamps of floating
    tensors (``torch.clamp`` / ``clip`` / ``clamp_min`` / ``clamp_max``, any form: a ReLU written ``x.clamp(min=0)``),
    module or functional (a ``TorchFunctionMode`` sees both), also while the package computes one of them by a
    composite (Hardsigmoid under :func:`~lightning_lazy._forward_ad.forward_ad_safe`: counted once, as itself);
    the piece index counts the kinks strictly below the pre-activation
    (ReLU6: 0 for x ≤ 0, 1 for 0 < x ≤ 6, 2 above). Smooth activations are named in ``.smooth``. For a
    forward whose output is needed anyway (the divergence's, say): its states then cost no forward of their
    own."""
    recorder = _ActivationRecorder()
    with recorder:
        yield recorder.states


recording_relu_states = recording_activation_states  # the name before other activations were counted


def activation_states(model: ModelLike, x: Tensor, params: Params) -> ActivationStates:
    """Linear-piece state of every piecewise-linear unit on the probe ``x`` at ``params`` (one no-grad
    forward; see :func:`recording_activation_states`), one tensor per activation call in call order. Compute
    it once at w0 and pass it to :func:`activation_stability` as ``initial_states``: each later measurement
    then costs one forward."""
    _check_probe(x)
    with recording_activation_states() as states:
        _output(model, x, params)
    return states


relu_states = activation_states  # the name before other activations were counted


def activation_stability(
    model: ModelLike,
    x: Tensor,
    params: Params,
    initial_params: Params | None = None,
    *,
    initial_states: list[Tensor] | None = None,
) -> Tensor:
    """Share of piecewise-linear units, over all activation calls and probe inputs, whose linear piece at
    ``params`` is the one at ``initial_params``: (1/U) Σ_units 1[piece(pre-activation(w)) = piece(pre-activation(w0))].

    For ReLU the piece is the on/off state, the measure of Chizat et al. (2019), section 4.2 (VGG-11 on
    CIFAR-10); ReLU6, Hardtanh, LeakyReLU, Hardsigmoid, Hardswish ... count the piece between their kinks
    (see :func:`recording_activation_states`), module or functional forms alike, recorded in call order.
    Smooth activations (GELU, SiLU, tanh) have no pieces and are not counted; a model with no piecewise-
    linear unit is an error naming the smooth ones it applies. ``initial_states`` (from
    :func:`activation_states` at w0) replaces ``initial_params``: one forward of the probe instead of two.
    Memory: one byte per unit and probe example (U numbers), kept at w0.
    """
    _check_probe(x)
    if initial_states is None:
        if initial_params is None:
            raise ValueError("activation_stability needs initial_params or initial_states")
        initial_states = activation_states(model, x, initial_params)
    then = initial_states
    if not then:
        smooth = getattr(then, "smooth", [])
        found = f"; it applies the smooth {', '.join(smooth)}, whose units never switch piece" if smooth else ""
        raise ValueError(
            "the model applies no piecewise-linear activation (ReLU, ReLU6, LeakyReLU, Hardtanh, Hardsigmoid, "
            f"Hardswish, ...) on the probe, so activation stability is undefined{found}"
        )
    now = activation_states(model, x, params)
    if len(now) != len(then) or any(a.shape != b.shape for a, b in zip(now, then)):
        raise ValueError("the model applied a different sequence of activations at params and at initial_params")
    same = sum(int((a == b).sum()) for a, b in zip(now, then))
    total = sum(a.numel() for a in now)
    return torch.tensor(same / total, dtype=x.dtype if x.is_floating_point() else torch.float64)


# ----------------------------------------------------------------------------------------------------
# per layer: which modules moved, in weights and in what they compute


def parameter_owning_modules(model: nn.Module) -> list[str]:
    """Names (as in ``named_modules()``) of the modules that own parameters directly (``Linear``, ``Conv2d``,
    norm layers, a custom module's own ``nn.Parameter``): the "layers" the per-layer measures are given for,
    in module order."""
    return [name for name, module in model.named_modules() if next(module.parameters(recurse=False), None) is not None]


def _grouped(names: Iterable[str], groups: Mapping[str, str] | None, default: Callable[[str], str]) -> dict[str, list[str]]:
    members: dict[str, list[str]] = {}
    for name in names:
        members.setdefault(groups[name] if groups is not None else default(name), []).append(name)
    return members


def layer_displacement(params: Params, initial_params: Params,
                       groups: Mapping[str, str] | None = None, reference: Params | None = None) -> dict[str, Tensor]:
    """Relative displacement of each module's weights: ‖w_l − w_l0‖ / ‖w_l0‖, the norms over all the parameters
    module l owns directly (a parameter ``a.b.weight`` belongs to module ``a.b``; ``groups`` maps parameter names
    to other groups, e.g. a top-level child). Only the parameters in ``params`` count (pass the trained ones).
    ``{module name: 0-d tensor}`` in the order of ``params``; a module whose w_l0 is all zero has no relative
    scale and is left out (as in :func:`displacement`'s ``per_tensor``), unless ``reference`` (tensors by name, e.g.
    the frozen weights at w0) holds tensors under the module's nearest enclosing module that has any: its value is
    then ‖w_l − w_l0‖ over their norm (a LoRA ``fc.lora_B`` starting at zero: relative to ``fc.base_layer``, the weight
    it adapts). Dimensionless; exactly 0 at w0. Raises ``ValueError`` when the two dicts name different tensors or
    shapes differ."""
    if set(params) != set(initial_params):
        missing = sorted(set(params) ^ set(initial_params))
        raise ValueError(f"params and initial_params name different tensors: {missing[:5]}")
    result: dict[str, Tensor] = {}
    for module, names in _grouped(params, groups, owning_module).items():
        moved_sq, initial_sq = 0.0, 0.0
        for name in names:
            w, w0 = params[name].detach(), initial_params[name].detach()
            if w.shape != w0.shape:
                raise ValueError(f"{name}: shape {tuple(w.shape)} differs from its initial {tuple(w0.shape)}")
            moved_sq = moved_sq + ((w - w0) ** 2).sum()
            initial_sq = initial_sq + (w0**2).sum()
        if float(initial_sq) > 0:
            result[module] = torch.sqrt(moved_sq / initial_sq)
        elif reference:
            scale = _enclosing_norm(names, reference)
            if scale is not None:
                result[module] = torch.sqrt(moved_sq) / scale.to(torch.as_tensor(moved_sq).dtype)
    return result


def _enclosing_norm(names: list[str], reference: Params) -> Tensor | None:
    """The norm of the ``reference`` tensors under the nearest module enclosing the parameters ``names`` that holds
    any (other than ``names`` themselves), or ``None`` when there is none of nonzero norm."""
    prefix = owning_module(names[0])
    while True:
        under = [t for n, t in reference.items() if n not in names and (not prefix or n.startswith(prefix + "."))]
        scale = _norm(under)
        if scale is not None and float(scale) > 0:
            return scale
        if not prefix:
            return None
        prefix = prefix.rpartition(".")[0]


#: Numbers kept per recorded module output for feature movement (:func:`recording_module_outputs`): an output of
#: more numbers (over the rows kept) is replaced by a CountSketch of this size (:func:`count_sketch`); relative
#: standard error of the feature movement then at most √(2/M) = 1.1 %.
FEATURE_SKETCH_SIZE = 16384


class FeatureSketch(NamedTuple):
    """A module output φ kept as its CountSketch (:func:`count_sketch`): ``values`` ``[M]``, and the ``shape`` of
    the output sketched (rows kept included), so that outputs of other shapes are never compared."""

    values: Tensor
    shape: tuple[int, ...]


def count_sketch(values: Tensor, size: int, seed: int) -> Tensor:
    """S(v): the CountSketch of ``values`` (any shape, flattened to v of L numbers) into ``size`` = M numbers.

    S(v)_b = Σ_{p: h(p) = b} s_p v_p, with signs s_p = ±1 independent and uniform and buckets h(p) = (p + r_c) mod M
    for the position p in the c-th consecutive run of M numbers, r_c uniform on {0..M−1} and independent (two
    numbers of one run never share a bucket, two of different runs do with probability exactly 1/M). All drawn
    from ``seed`` (a :class:`torch.Generator` on the values' device), so the same (``seed``, L, M) always gives the
    same linear map: S(a) − S(b) = S(a − b), and equal inputs give bit-equal sketches (every step deterministic,
    no atomic sums). Johnson–Lindenstrauss for one vector (Charikar, Chen & Farach-Colton 2002; the variance of the
    sparse JL transform): E‖S v‖² = ‖v‖² and Var ‖S v‖² = (4/M)·Σ_{p<q, different runs} v_p² v_q² ≤ (2/M)‖v‖⁴,
    i.e. a relative standard deviation of at most √(2/M) on ‖v‖², about half that on ‖v‖.

    Returns ``[M]`` in the values' dtype. Cost: O(L) (sign bits drawn 8 per byte, one gather, one sum), processed in
    runs of at most 2^22 numbers, so temporaries stay a few times that. Raises ``ValueError`` for ``size`` < 1.
    """
    if size < 1:
        raise ValueError(f"the sketch size must be a positive number of values, got {size}")
    flat = values.reshape(-1)
    total = flat.numel()
    runs = -(-total // size)
    generator = torch.Generator(device=flat.device).manual_seed(seed)
    offsets = torch.randint(0, size, (runs, 1), generator=generator, device=flat.device)
    columns = torch.arange(size, device=flat.device)
    shifts = torch.arange(8, device=flat.device, dtype=torch.uint8)
    sketch = flat.new_zeros(size)
    block = max(1, (1 << 22) // size)  # runs per block
    for first in range(0, runs, block):
        last = min(runs, first + block)
        start, stop = first * size, min(total, last * size)
        bits = torch.randint(0, 256, (-(-(stop - start) // 8),), generator=generator, device=flat.device,
                             dtype=torch.uint8)
        signs = ((bits.unsqueeze(1) >> shifts) & 1).reshape(-1)[: stop - start].to(flat.dtype).mul_(2).sub_(1)
        part = flat.new_zeros((last - first) * size)
        part[: stop - start] = flat[start:stop] * signs
        # out[c, b] = in[c, (b − r_c) mod M]: the number at position p of run c lands in bucket (p + r_c) mod M.
        index = (columns - offsets[first:last]) % size
        sketch += part.reshape(last - first, size).gather(1, index).sum(0)
    return sketch


def _seed(name: str, position: int, shape: tuple[int, ...]) -> int:
    """The sketch's seed for the ``position``-th output recorded of module ``name``, of ``shape``: the same at every
    forward (and in every process: no Python ``hash``)."""
    return zlib.crc32(f"{name}|{position}|{shape}".encode())


class _OutputRecorder:
    """Forward hooks keeping each named module's output (its tensor leaves, the first ``rows`` examples), as a
    :class:`FeatureSketch` of ``sketch`` numbers when it has more than that."""

    def __init__(self, model: nn.Module, names: Iterable[str], rows: int | None, sketch: int | None = None) -> None:
        self.outputs: dict[str, list[Tensor | FeatureSketch]] = {}
        self.rows, self.sketch = rows, sketch
        if sketch is not None and sketch < 1:
            raise ValueError(f"sketch must be a positive number of values per module output or None, got {sketch}")
        modules = dict(model.named_modules())
        wanted = list(names)
        unknown = [name for name in wanted if name not in modules]
        if unknown:
            raise ValueError(f"no module named {unknown[0]!r} in {type(model).__name__}: use names from named_modules()")
        self.handles = [modules[name].register_forward_hook(self._hook(name)) for name in wanted]

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            kept = self.outputs.setdefault(name, [])
            for leaf in tree_leaves(output):
                if isinstance(leaf, Tensor) and leaf.dim() > 0 and leaf.is_floating_point():
                    leaf = (leaf if self.rows is None else leaf[: self.rows]).detach()
                    if self.sketch is not None and leaf.numel() > self.sketch:
                        shape = tuple(leaf.shape)
                        kept.append(FeatureSketch(count_sketch(leaf, self.sketch, _seed(name, len(kept), shape)), shape))
                    else:  # a copy: an in-place op that follows (ReLU(inplace=True)) would overwrite the output
                        kept.append(leaf.clone())
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@contextlib.contextmanager
def recording_module_outputs(model: nn.Module, names: Iterable[str], *, rows: int | None = None,
                             sketch: int | None = None) -> Iterator[dict[str, list[Tensor | FeatureSketch]]]:
    """Within the block, the outputs φ_l of the modules ``names`` (as in ``model.named_modules()``) in every
    forward of ``model`` are appended to the dict yielded, ``{name: [tensor, ...]}`` (each floating tensor leaf of
    the output, detached copies, the first ``rows`` examples of each; one entry per call of a module called several
    times). For a forward run anyway (the probe's): the features cost no forward of their own, only the copies
    (memory: the modules' outputs on ``rows`` examples).

    ``sketch`` = M: an output of more than M numbers (over its ``rows``) is kept as a :class:`FeatureSketch`, its
    CountSketch into M numbers (:func:`count_sketch`, seeded by the module's name, the output's place among its
    outputs and its shape, so the same output is sketched the same way at every forward); memory then at most M
    numbers per output whatever the model. :func:`feature_movement` compares sketches as it compares outputs.
    Raises ``ValueError`` for an unknown module name or ``sketch`` < 1."""
    recorder = _OutputRecorder(model, names, rows, sketch)
    try:
        yield recorder.outputs
    finally:
        recorder.remove()


def feature_movement(outputs: Mapping[str, list[Tensor | FeatureSketch]],
                     initial_outputs: Mapping[str, list[Tensor | FeatureSketch]],
                     groups: Mapping[str, str] | None = None) -> dict[str, Tensor]:
    """How much each module's output has moved: ‖φ_l(w) − φ_l(w0)‖_F / ‖φ_l(w0)‖_F, φ_l the outputs of module l on
    the probe (from :func:`recording_module_outputs`, at w and at w0; the norms over all its tensors and calls).
    Works whatever the activation (unlike :func:`activation_stability`): it measures the change of the features
    the next layers see, the quantity lazy training keeps small (Chizat et al. 2019, §3: the features of the
    linearized model are frozen at w0). ``groups`` maps module names to groups (e.g. a top-level child): then the
    norms run over the group's modules. ``{name: 0-d tensor}``, in the order of ``initial_outputs``; modules whose
    initial output is all zero are left out (no relative scale). Dimensionless; exactly 0 when nothing moved.

    Outputs kept as sketches (:class:`FeatureSketch`, the same map S at w and w0) enter by their sketches:
    ‖S(φ − φ0)‖² = ‖S φ − S φ0‖² and ‖S φ0‖² are unbiased estimates of ‖φ − φ0‖² and ‖φ0‖², each within a relative
    standard deviation √(2/M) (:func:`count_sketch`); the value returned, the square root of the ratio of the
    sums, is then a Johnson–Lindenstrauss estimate of the exact ratio with a relative error of standard deviation
    at most about √(2/M) (1.1 % at M = 16384: half of it from each norm), and exactly 0 when nothing moved.
    Raises ``ValueError`` when a module's outputs differ in number or shape (or in being sketched) between the two."""
    result: dict[str, Tensor] = {}
    for group, names in _grouped(initial_outputs, groups, lambda name: name).items():
        moved_sq, initial_sq = 0.0, 0.0
        for name in names:
            now, then = outputs.get(name, []), initial_outputs[name]
            if len(now) != len(then) or any(_shape(a) != _shape(b) for a, b in zip(now, then)):
                raise ValueError(f"module {name!r} computed outputs of other shapes (or another number of them) "
                                 "now and at w0: feature movement compares the same forward")
            for a, b in zip(now, then):
                a, b = (v.values if isinstance(v, FeatureSketch) else v for v in (a, b))
                moved_sq = moved_sq + ((a - b) ** 2).sum()
                initial_sq = initial_sq + (b**2).sum()
        if float(initial_sq) > 0:
            result[group] = torch.sqrt(moved_sq / initial_sq)
    return result


def _shape(value: Tensor | FeatureSketch) -> tuple:
    return ("sketch", value.shape, value.values.numel()) if isinstance(value, FeatureSketch) else tuple(value.shape)
