"""Empirical NTK by structured derivatives (Novak, Sohl-Dickstein & Schoenholz, ICML 2022): layer inputs and output cotangents."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from lightning_lazy._params import check_finite
from lightning_lazy.diagnostics._common import (
    ModelLike,
    Params,
    _as_function,
)

_CONV_DIMS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}


class _LayerCall:
    """One recorded ``F.linear`` / ``F.conv*d`` / ``F.batch_norm`` call on a batched input."""

    __slots__ = ("kind", "weight", "bias", "input", "options", "in_shape", "out_shape")

    def __init__(self, kind: str, weight: str | None, bias: str | None, input: Tensor, options: dict) -> None:
        self.kind, self.weight, self.bias, self.input, self.options = kind, weight, bias, input, options
        self.in_shape = tuple(input.shape[1:])
        self.out_shape: tuple[int, ...] = ()


def _arguments(args: tuple, kwargs: dict, names: tuple[str, ...], defaults: dict) -> dict:
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


def _parse_layer_call(func: Callable, args: tuple, kwargs: dict, ids: dict[int, str]) -> _LayerCall | None:
    """The call as a structured-layer record, or None (not a layer op, unbatched, grouped, training-mode BN)."""

    def name(t: object) -> str | None:
        return ids.get(id(t)) if isinstance(t, Tensor) else None

    if func is F.linear:
        a = _arguments(args, kwargs, ("input", "weight", "bias"), {"bias": None})
        if not isinstance(a["input"], Tensor) or a["input"].dim() < 2 or name(a["input"]):
            return None
        return _LayerCall("linear", name(a["weight"]), name(a["bias"]), a["input"], {})
    if func in _CONV_DIMS:
        dims = _CONV_DIMS[func]
        a = _arguments(
            args, kwargs, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
            {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1},
        )
        x, w = a["input"], a["weight"]
        if not isinstance(x, Tensor) or x.dim() != dims + 2 or a["groups"] != 1 or name(x):
            return None
        options = {"kernel": tuple(w.shape[2:]), "stride": _tuple(a["stride"], dims), "dilation": _tuple(a["dilation"], dims)}
        options["padding"] = _padding(a["padding"], options["kernel"], options["dilation"])
        return _LayerCall("conv", name(w), name(a["bias"]), x, options)
    if func is F.batch_norm:
        a = _arguments(
            args, kwargs, ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
            {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5},
        )
        if a["training"] or a["running_mean"] is None or not isinstance(a["input"], Tensor) or name(a["input"]):
            return None
        options = {"mean": a["running_mean"].detach(), "var": a["running_var"].detach(), "eps": a["eps"]}
        return _LayerCall("batch_norm", name(a["weight"]), name(a["bias"]), a["input"], options)
    return None


def _tuple(value: int | tuple[int, ...], dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * dims


def _padding(padding: object, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """(before, after) zero padding per spatial dimension, as ``F.conv*d`` applies it."""
    if padding == "valid":
        return tuple((0, 0) for _ in kernel)
    if padding == "same":  # torch puts the odd pixel after
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return tuple((t // 2, t - t // 2) for t in totals)
    return tuple((p, p) for p in _tuple(padding, len(kernel)))


def _patches(x: Tensor, options: dict) -> Tensor:
    """im2col of ``x [n, C, *spatial]``: ``[n, S, C·Π kernel]``, S the output positions (any of 1-3 dims).

    For 2-D convolutions a transposed view of ``F.unfold``'s ``[n, C·Π kernel, S]`` (its im2col kernel is
    about twice as fast as the strided copy below, and matrix products take the transposed view as it is)."""
    kernel, stride, dilation, padding = options["kernel"], options["stride"], options["dilation"], options["padding"]
    pad = [p for pair in reversed(padding) for p in pair]
    dims = len(kernel)
    if dims == 2:
        symmetric = all(before == after for before, after in padding)
        if not symmetric:  # "same" with an even kernel: F.unfold pads both sides alike
            x = F.pad(x, pad)
        return F.unfold(x, kernel, dilation=dilation, padding=tuple(p[0] for p in padding) if symmetric else 0,
                        stride=stride).transpose(1, 2)
    if any(pad):
        x = F.pad(x, pad)
    for d in range(dims):  # each unfold appends the window dimension at the end
        x = x.unfold(2 + d, dilation[d] * (kernel[d] - 1) + 1, stride[d])
        if dilation[d] > 1:
            x = x[..., :: dilation[d]]
    n, channels = x.shape[:2]
    positions = math.prod(x.shape[2 : 2 + dims])
    order = (0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims))
    return x.permute(order).reshape(n, positions, channels * math.prod(kernel))


def _holds_tensor(value: object) -> bool:
    return any(isinstance(leaf, Tensor) for leaf in tree_leaves(value))


class _LayerRecorder(TorchFunctionMode):
    """Records the structured-layer calls of one forward, and which parameters reach other ops.

    With ``taps`` (indexes of calls), the output of each of those calls gets a zero tap added, whose
    gradient is the cotangent at that output (taken before any in-place op that follows), and its input is
    kept.
    """

    def __init__(self, params: Params, taps: set[int] | None = None) -> None:
        super().__init__()
        self.ids = {id(t): name for name, t in params.items()}
        self.taps_wanted = taps or set()
        self.calls: list[_LayerCall] = []
        self.other_uses: set[str] = set()
        self.mixes_examples = False
        self.inputs: dict[int, Tensor] = {}
        self.taps: dict[int, Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch protocol
        kwargs = kwargs or {}
        if func is F.batch_norm and (args[5] if len(args) > 5 else kwargs.get("training", False)):
            self.mixes_examples = True  # batch statistics: each output row depends on the whole batch
        call = _parse_layer_call(func, args, kwargs, self.ids)
        if call is None:
            out = func(*args, **kwargs)
            if self.ids and _holds_tensor(out):
                for leaf in tree_leaves((args, kwargs)):
                    if isinstance(leaf, Tensor) and id(leaf) in self.ids:
                        self.other_uses.add(self.ids[id(leaf)])
            return out
        index = len(self.calls)
        self.calls.append(call)
        out = func(*args, **kwargs)
        call.out_shape = tuple(out.shape[1:])
        known = {call.weight, call.bias}
        for leaf in tree_leaves((args, kwargs)):  # e.g. a parameter used as running statistics
            if isinstance(leaf, Tensor) and id(leaf) in self.ids and self.ids[id(leaf)] not in known:
                self.other_uses.add(self.ids[id(leaf)])
        if index in self.taps_wanted:
            self.inputs[index] = call.input.detach()
            tap = torch.zeros((), dtype=out.dtype, device=out.device, requires_grad=True).expand(out.shape)
            self.taps[index] = tap
            out = out + tap
        call.input = None  # not kept beyond the call unless tapped
        return out


class _Plan(NamedTuple):
    """What the structured pass computes: per tapped call, which of its parameters and in which form."""

    taps: dict[int, tuple[str | None, str | None, str]]  # call index -> (weight, bias, "struct" | "jac")
    calls: list[_LayerCall]
    per_example_features: int
    per_example_transient: int
    # Call indexes whose weight takes the channel-factored form (see _channel_factors) when the cotangent allows:
    # fewer multiply-adds than the planned form, and no more numbers per example.
    factor: frozenset[int] = frozenset()


def _plan_structured(
    recorder: _LayerRecorder, params: Params, n_outputs: int, n1: int, n2: int, trace: bool, feature_budget: int,
    groups: dict[str, str] | None = None,
) -> _Plan:
    counts: dict[str, int] = {}
    for call in recorder.calls:
        for name in (call.weight, call.bias):
            if name is not None:
                counts[name] = counts.get(name, 0) + 1
    eligible = {k for k, c in counts.items() if c == 1 and k not in recorder.other_uses}
    k_out = n_outputs
    pairs = k_out if trace else k_out * k_out
    taps: dict[int, tuple[str | None, str | None, str]] = {}
    factor: set[int] = set()
    features = 0
    transient = 0
    for index, call in enumerate(recorder.calls):
        weight = call.weight if call.weight in eligible else None
        bias = call.bias if call.bias in eligible else None
        if groups is not None and weight is not None and bias is not None and groups[weight] != groups[bias]:
            bias = None  # kernel blocks by group: a bias of another group than its weight goes the generic path
        transient += math.prod(call.out_shape)  # every call's output is an activation of the pass
        if weight is None and bias is None:
            continue
        out_numel = math.prod(call.out_shape)
        transient += (k_out + 1) * out_numel + math.prod(call.in_shape)
        form = "jac"
        if call.kind == "batch_norm":
            features += k_out * call.out_shape[0] * ((weight is not None) + (bias is not None))
        else:
            if call.kind == "linear":
                o = call.out_shape[-1]
                s = out_numel // o
                p = call.in_shape[-1] + (bias is not None)
            else:
                o = call.out_shape[0]
                s = out_numel // o
                p = params[call.weight].numel() // o + (bias is not None) if call.weight else 0
                transient += s * p  # im2col
            if weight is not None:
                cost_jac = (n1 + n2) * s * k_out * o * p + n1 * n2 * pairs * o * p
                cost_struct = n1 * n2 * s * s * (p + k_out * o) + n1 * n2 * s * pairs * o
                size_jac, size_struct = k_out * o * p, s * (p + k_out * o)
                form = "struct" if cost_struct <= cost_jac or size_jac > feature_budget // 2 else "jac"
                features += size_struct if form == "struct" else size_jac
                # Channel-factored (if the cotangent is): A_i = Σ_s m_i,s ⊗ x_i,s, the check, Σ_p A_i A_j, then Σ_o c c.
                cost_factor = (n1 + n2) * s * o * (p + 3 * k_out) + n1 * n2 * o * (p + pairs)
                cost_form, size_form = (cost_struct, size_struct) if form == "struct" else (cost_jac, size_jac)
                if cost_factor < cost_form and o * (p + k_out) <= size_form:
                    factor.add(index)
            if bias is not None and weight is None:
                features += k_out * o
        taps[index] = (weight, bias, form)
    return _Plan(taps, recorder.calls, features, transient, frozenset(factor))


# ("jac", J [n, K, M]), ("struct", X [n, S, P], G [n, K, S, O]) or ("factored", A [n, O, P], c [n, K, O]): the
# per-example Jacobian J_ik = diag(c_ik)·A_i, i.e. J[i, k, (o, p)] = c[i, k, o]·A[i, o, p] (see _channel_factors).
_Feature = tuple


def _structured_features(
    model: ModelLike, x: Tensor, params: Params, plan: _Plan, chunk: int
) -> list[list[_Feature]]:
    """Per tapped call, its features on the examples ``x`` (recorded ``chunk`` examples at a time)."""
    pieces: list[list[list[_Feature]]] = []
    for start in range(0, x.shape[0], chunk):
        xc = x[start : start + chunk]
        recorder = _LayerRecorder(params, set(plan.taps))
        with torch.enable_grad(), recorder:
            out = _as_function(model, xc)(params)
        check_finite(out, "the model output on the probe")
        if [c.kind for c in recorder.calls] != [c.kind for c in plan.calls]:
            raise RuntimeError(
                "the model applied a different sequence of layers on another chunk of the probe; use "
                "implementation='products'"
            )
        indexes = list(plan.taps)
        taps = [recorder.taps[i] for i in indexes]
        n, k_out = out.shape
        cotangents = _output_cotangents(out, taps)
        del out, taps, recorder.taps
        chunk_features: list[list[_Feature]] = []
        for slot, index in enumerate(indexes):
            weight, bias, form = plan.taps[index]
            g, cotangents[slot] = cotangents[slot], None
            chunk_features.append(_call_features(plan.calls[index], recorder.inputs.pop(index), g, weight, bias, form,
                                                 index in plan.factor))
        pieces.append(chunk_features)
    if len(pieces) == 1:
        return pieces[0]
    return [[_concat([p[slot][e] for p in pieces]) for e in range(len(pieces[0][slot]))] for slot in range(len(plan.taps))]


def _concat(parts: list[_Feature]) -> _Feature:
    """One feature of the examples of ``parts`` (chunks of examples, in order); as per-example Jacobians where the
    chunks took different forms (a cotangent that factors on some examples only)."""
    if len({part[0] for part in parts}) > 1:
        parts = [("jac", _as_jacobian(part)) for part in parts]
    return tuple([parts[0][0], *(torch.cat([part[i] for part in parts]) for i in range(1, len(parts[0])))])


def _as_jacobian(feature: _Feature) -> Tensor:
    """The per-example Jacobian ``[n, K, M]`` a feature stands for (M ordered (o, p) as a weight ``[O, P]``)."""
    kind, first, second = (feature + (None,))[:3]
    if kind == "jac":
        return first
    if kind == "factored":  # J[i, k, o, p] = c[i, k, o]·A[i, o, p]
        return (second.unsqueeze(3) * first.unsqueeze(1)).flatten(2)
    return torch.einsum("nkso,nsp->nkop", second, first).flatten(2)  # struct: Σ_s g_s ⊗ x_s


def _output_cotangents(out: Tensor, taps: list[Tensor]) -> list[Tensor]:
    """For each tap, ∂h_k(x_i)/∂tap_i for every output unit k: ``[n, K, *tap.shape[1:]]``.

    One backward per output unit, batched over the K units (``is_grads_batched``, a vmap over the backward
    graph: one wide matrix product per layer instead of K narrow ones); K plain backward passes where an op
    has no batching rule. Rows are independent examples, so the cotangent e_k on every row at once gives
    each example's own derivative.
    """
    n, k_out = out.shape
    eye = torch.eye(k_out, dtype=out.dtype, device=out.device)
    try:
        grads = torch.autograd.grad(
            out, taps, eye[:, None, :].expand(k_out, n, k_out), retain_graph=True, allow_unused=True,
            is_grads_batched=True,
        )
        result = [g.transpose(0, 1) if g is not None else None for g in grads]
    except RuntimeError:  # no batching rule for some op of the backward graph
        per_output: list[list[Tensor]] = [[] for _ in taps]
        for k in range(k_out):
            grads = torch.autograd.grad(out[:, k].sum(), taps, retain_graph=True, allow_unused=True)
            for slot, g in enumerate(grads):
                per_output[slot].append(g)
        result = [None if parts[0] is None else torch.stack(parts, dim=1) for parts in per_output]
    return [
        torch.zeros((n, k_out, *tap.shape[1:]), dtype=out.dtype, device=out.device) if g is None else g
        for g, tap in zip(result, taps)
    ]


def _call_features(
    call: _LayerCall, x: Tensor, g: Tensor, weight: str | None, bias: str | None, form: str, factor: bool = False,
) -> list[_Feature]:
    n, k_out = g.shape[:2]
    features: list[_Feature] = []
    if call.kind == "batch_norm":
        channels = x.shape[1]
        shape = (1, channels) + (1,) * (x.dim() - 2)
        normalized = (x - call.options["mean"].reshape(shape)) / torch.sqrt(call.options["var"].reshape(shape) + call.options["eps"])
        g = g.reshape(n, k_out, channels, -1)
        if weight is not None:
            features.append(("jac", torch.einsum("nkcs,ncs->nkc", g, normalized.reshape(n, channels, -1))))
        if bias is not None:
            features.append(("jac", g.sum(-1)))
        return features
    native = None  # a convolution's cotangent as recorded, [n, K, O, S] (contiguous)
    if call.kind == "linear":
        o = g.shape[-1]
        g = g.reshape(n, k_out, -1, o)  # [n, K, S, O]
        patches = x.reshape(n, -1, x.shape[-1]) if weight is not None else None
    else:
        o = g.shape[2]
        native = g.reshape(n, k_out, o, -1)
        g = native.transpose(2, 3)
        patches = None
    factors = _channel_factors(g.transpose(2, 3)) if weight is not None and factor else None
    if factors is not None:
        # J_ik = Σ_s g_ik,s ⊗ x_i,s = diag(c_ik)·A_i with A_i = Σ_s m_i,s ⊗ x_i,s: one product per example, not K.
        c, m = factors
        a = torch.bmm(m, patches) if call.kind == "linear" else _example_weight_gradients(m, x, call)  # [n, O, P]
        if bias is not None and form == "struct":  # the planned form's feature carries the bias: so does this one
            a = torch.cat([a, m.sum(2, keepdim=True)], dim=2)
        features.append(("factored", a, c))
        if bias is not None and form == "jac":
            features.append(("jac", c * m.sum(2).unsqueeze(1)))
        return features
    if call.kind == "conv" and weight is not None:
        patches = _patches(x, call.options)
    if weight is not None and form == "struct":
        if bias is not None:
            # A column of ones appended to the inputs carries the bias: Σ_s g_s ⊗ [x_s, 1] = [J_W, J_b].
            patches = torch.cat([patches, patches.new_ones(patches.shape[:2] + (1,))], dim=2)
        features.append(("struct", patches, g))
        return features
    if weight is not None:
        # J_W = Σ_s g_s ⊗ x_s: for a convolution one batched product of the cotangent as recorded, [n, K·O, S] @
        # [n, S, P] (no transposed copy of it); the bias's J_b = Σ_s g_s is a feature of its own (appending a column
        # of ones to the patches copied all of them).
        if native is not None:
            jacobian = torch.bmm(native.reshape(n, k_out * o, -1), patches)
        else:
            jacobian = torch.einsum("nkso,nsp->nkop", g, patches)
        features.append(("jac", jacobian.reshape(n, k_out, -1)))
    if bias is not None:
        features.append(("jac", g.sum(2)))
    return features


# How far (in units of the dtype's machine epsilon, relative to each cotangent row) a cotangent may be from its
# channel-factored form and still be taken in it: rounding of the factors only (a few units), never a real rank > 1.
_FACTOR_TOLERANCE = 128


def _channel_factors(g: Tensor, block: int = 1 << 22) -> tuple[Tensor, Tensor] | None:
    """``g [n, K, O, S]`` (cotangents of K output units at O channels, S positions) as g[i, k, o, s] =
    c[i, k, o]·m[i, o, s], ``c [n, K, O]``, ``m [n, O, S]``, when for every example and channel the K rows over the
    positions are multiples of one row; else None.

    This is the structure of a layer followed by position-wise ops and a pooling over positions, as global average
    pooling then a linear head: g_ik = ReLU'(z_i)·W[k, o]/S. m_io = Σ_k g_iko (a multiple of every row when the rows
    are multiples of one another), c_iko = g_iko,s/m_io,s at the position s of largest |m_io,s|. The factors are
    taken when every row is within ``_FACTOR_TOLERANCE`` machine epsilons of c_iko·m_io, relative to |c_iko|·‖m_io‖
    (Frobenius over S; a row that is not a multiple of m_io, or rows that cancel in m_io, fail it) — checked on one
    example first, then on blocks of about ``block`` numbers (a temporary of that size). Three passes over g."""
    n, k_out, o, s = g.shape
    tolerance = _FACTOR_TOLERANCE * torch.finfo(g.dtype).eps
    rows = max(1, block // max(1, k_out * o * s))
    cs, ms = [], []
    for start, stop in [(0, 1)] + [(i, min(n, i + rows)) for i in range(1, n, rows)]:
        gb = g[start:stop]
        m = gb.sum(1)  # [b, O, S]
        peak = m.abs().argmax(dim=2, keepdim=True)  # [b, O, 1]
        pivot = m.gather(2, peak).mT  # [b, 1, O]
        at_peak = gb.gather(3, peak.unsqueeze(1).expand(-1, k_out, -1, -1)).squeeze(3)  # [b, K, O]
        c = torch.where(pivot != 0, at_peak / torch.where(pivot != 0, pivot, 1), 0)
        residual = torch.linalg.vector_norm(torch.addcmul(gb, c.unsqueeze(3), m.unsqueeze(1), value=-1), dim=3)
        if not bool((residual <= tolerance * c.abs() * torch.linalg.vector_norm(m, dim=2).unsqueeze(1)).all()):
            return None
        cs.append(c)
        ms.append(m)
    return torch.cat(cs), torch.cat(ms)


def _example_weight_gradients(m: Tensor, x: Tensor, call: _LayerCall) -> Tensor:
    """Σ_s m_i,s ⊗ x_i,s over the im2col patches of a convolution, ``[n, O, C·Π kernel]`` for ``m [n, O, S]``: each
    example's weight gradient for the cotangent m_i, as one convolution weight-gradient with the examples as groups
    (no im2col copy of the input; with it, the same numbers)."""
    options = call.options
    n, channels = x.shape[:2]
    out_channels, dims = m.shape[1], len(options["kernel"])
    padding = options["padding"]
    if any(before != after for before, after in padding):  # "same" with an even kernel: pad before, as F.conv*d
        x = F.pad(x, [p for pair in reversed(padding) for p in pair])
        padding = tuple((0, 0) for _ in padding)
    weight = x.new_empty(n * out_channels, channels, *options["kernel"])  # only its shape is read
    _, grads, _ = torch.ops.aten.convolution_backward(
        m.reshape(1, n * out_channels, *call.out_shape[1:]), x.reshape(1, n * channels, *x.shape[2:]),
        weight, None, list(options["stride"]),
        [before for before, _ in padding], list(options["dilation"]), False, [0] * dims, n, [False, True, False],
    )
    return grads.reshape(n, out_channels, -1)


def _feature_groups(plan: _Plan, groups: dict[str, str]) -> list[str]:
    """The group of each feature :func:`_structured_features` returns, in its order (see :func:`_call_features`)."""
    owners: list[str] = []
    for index, (weight, bias, form) in plan.taps.items():
        if plan.calls[index].kind == "batch_norm" or form == "jac":  # a feature per parameter
            owners += [groups[name] for name in (weight, bias) if name is not None]
        else:  # "struct": the weight's feature carries its bias
            owners.append(groups[weight if weight is not None else bias])
    return owners


def _gram(f1: list[_Feature], f2: list[_Feature], trace: bool, budget: int,
          owners: list[str] | None = None) -> dict[str, Tensor]:
    """Σ over features of ⟨J1, J2⟩ by group (``owners[i]``: the group of feature i; default one group ``""``):
    ``{group: [a, K, b, K]}`` (or ``[a, b]`` traced)."""
    totals: dict[str, Tensor] = {}
    for e1, e2, owner in zip(f1, f2, owners or [""] * len(f1)):
        if e1[0] != e2[0]:  # forms that differ between x1 and x2 (a cotangent factored on one side only)
            e1, e2 = ("jac", _as_jacobian(e1)), ("jac", _as_jacobian(e2))
        if e1[0] == "factored":
            part = _factored_gram(e1[1], e1[2], e2[1], e2[2], trace, budget)
        elif e1[0] == "jac":
            j1, j2 = e1[1], e2[1]
            a, k_out, m = j1.shape
            b = j2.shape[0]
            if trace:
                part = torch.einsum("akm,bkm->ab", j1, j2)
            elif j1 is j2:
                part = _symmetric_product(j1.reshape(a * k_out, m)).reshape(a, k_out, b, k_out)
            else:
                part = (j1.reshape(a * k_out, m) @ j2.reshape(b * k_out, m).T).reshape(a, k_out, b, k_out)
        else:
            part = _struct_gram(e1[1], e1[2], e2[1], e2[2], trace, budget)
        totals[owner] = part if owner not in totals else totals[owner] + part
    return totals


def _symmetric_product(j: Tensor, blocks: int = 4) -> Tensor:
    """j jᵀ for ``j [r, m]`` from the blocks of rows on and above the diagonal (``blocks``·(``blocks`` + 1)/2 of
    ``blocks``² products; the rest mirrored): about 30 % faster than one product for r in the hundreds."""
    rows = j.shape[0]
    if rows < 64 * blocks:
        return j @ j.T
    step = -(-rows // blocks)
    out = j.new_empty(rows, rows)
    for start in range(0, rows, step):
        part = j[start : start + step] @ j[start:].T
        out[start : start + step, start:] = part
        out[start + step :, start : start + step] = part[:, step:].T
    return out


def _struct_gram(x1: Tensor, g1: Tensor, x2: Tensor, g2: Tensor, trace: bool, budget: int) -> Tensor:
    """Σ_{s,t} ⟨g1_ak,s, g2_bl,t⟩ ⟨x1_a,s, x2_b,t⟩ for x ``[n, S, P]``, g ``[n, K, S, O]``."""
    a, s1 = x1.shape[:2]
    b, s2 = x2.shape[:2]
    k_out, o = g1.shape[1], g1.shape[3]
    if s1 == 1 and s2 == 1:
        inner = x1[:, 0] @ x2[:, 0].T  # [a, b]
        if trace:
            return torch.einsum("ako,bko->ab", g1[:, :, 0], g2[:, :, 0]) * inner
        cot = (g1[:, :, 0].reshape(a * k_out, o) @ g2[:, :, 0].reshape(b * k_out, o).T).reshape(a, k_out, b, k_out)
        return cot * inner[:, None, :, None]
    # Blocks of rows a: [b, (A s), t] @ [b, t, (o l)] then a broadcast product over b. Laid out so that no
    # large intermediate is permuted (3x faster than a plain einsum on VGG's 4x4 maps); a block's
    # intermediate, b·A·S1·O·K numbers, is kept small for the cache (and under the budget).
    per_row = max(1, b * s1 * o * k_out)
    rows = max(1, min(budget, 1 << 22) // per_row)
    g2t = g2.permute(0, 2, 3, 1).reshape(b, s2, o * k_out)  # [b, t, (o l)]
    blocks = []
    for start in range(0, a, rows):
        xa, ga = x1[start : start + rows], g1[start : start + rows]
        n_a = xa.shape[0]
        inner = torch.einsum("asp,btp->bast", xa, x2).reshape(b, n_a * s1, s2)
        mixed = torch.bmm(inner, g2t).reshape(b, n_a, s1 * o, k_out)  # [b, A, (s o), l]
        ga = ga.reshape(n_a, k_out, s1 * o)
        if trace:
            blocks.append(torch.einsum("bAqk,Akq->Ab", mixed, ga))
        else:
            blocks.append(torch.matmul(ga.unsqueeze(0), mixed).permute(1, 2, 0, 3))  # [A, k, b, l]
    return torch.cat(blocks)


def _factored_gram(a1: Tensor, c1: Tensor, a2: Tensor, c2: Tensor, trace: bool, budget: int) -> Tensor:
    """⟨diag(c1_ik)·A1_i, diag(c2_jl)·A2_j⟩ = Σ_o c1[i,k,o]·c2[j,l,o]·C[o,i,j], C[o,i,j] = Σ_p A1[i,o,p]·A2[j,o,p],
    for A ``[n, O, P]``, c ``[n, K, O]``: ``[a, K, b, K]`` (``[a, b]`` traced). Multiply-adds a·b·O·(P + K²)
    instead of the Jacobians' a·b·K²·O·P. By blocks of rows i, so that C and the intermediates (O·rows·b·K
    numbers) stay under ``budget`` and 2^22."""
    a, k_out, o = c1.shape
    b = c2.shape[0]
    rows = max(1, min(budget, 1 << 22) // max(1, o * b * (1 if trace else k_out)))
    a2t = a2.permute(1, 2, 0)  # [O, P, b]
    c2t = c2.permute(2, 0, 1) if not trace else c2.permute(2, 1, 0)  # [O, b, K] ([O, K, b] traced)
    blocks = []
    for start in range(0, a, rows):
        channel = torch.bmm(a1[start : start + rows].transpose(0, 1), a2t)  # C [O, A, b]
        c1b = c1[start : start + rows]
        if trace:
            blocks.append((torch.bmm(c1b.permute(2, 0, 1), c2t) * channel).sum(0))  # Σ_o (Σ_k c1 c2)·C
        else:  # E[i, o, j, l] = C[o, i, j]·c2[j, l, o], then [K, O] @ [O, (j l)] per i
            mixed = channel.permute(1, 0, 2).unsqueeze(3) * c2t  # [A, O, b, K]
            blocks.append(torch.bmm(c1b, mixed.flatten(2)).reshape(-1, k_out, b, k_out))
    return torch.cat(blocks)
