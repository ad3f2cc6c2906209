"""LazinessProbe: the measures of lazy training for one network, on a fixed probe set, against its w0.

Chizat, Oyallon & Bach (2019): Δ (section 3, the distance between the real and the tangent paths), κ and its
parts ‖Dh‖, ‖D²h‖ (Theorem 2.3), the displacement, the empirical NTK's drift and the ReLU activation
stability (section 4's measure of the VGG-11 sweep). :class:`LazinessProbe` owns what was measured at w0
(the reference every later value is compared with) and computes the values now, calling
:mod:`~lightning_lazy.diagnostics`. Lightning-free; the monitor draws the probe and logs the values.

What the measures see: the network as one deterministic function of its weights (:func:`probe_mode`):
dropout off, each BatchNorm that trains normalizing by the probe's own batch statistics, BatchNorm layers
kept in eval mode on their running statistics; and the forward-AD-capable kernels
(:func:`~lightning_lazy._forward_ad.forward_ad_safe`) for the network and its twin alike. So while the
weights do not move nothing measured moves, although BatchNorm running statistics drift during training.

What the measures never touch: the network's own tensors. Every forward a measure runs goes through
:func:`~lightning_lazy._params.functional_call` on fresh copies of the parameters and buffers (and, when the
network was seen writing into the tensors it is given, e.g. ``nn.Embedding(max_norm=...)``, fresh copies at
every call), so nothing a forward writes reaches the real run or w0. Parameters are followed by identity,
not by name: a parameter re-registered under another name (``torch.nn.utils.prune`` turns ``weight`` into
``weight_orig``) keeps its w0; the values are reported under the names they had when w0 was taken. Sparse
embeddings are measured with dense gradients (the same function), activation checkpointing as a plain call.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from time import perf_counter  # not time.perf_counter: measure() has an argument named time
from typing import Any, Union

import torch
from torch import Tensor, nn

from lightning_lazy import diagnostics
from lightning_lazy._forward_ad import forward_ad_safe
from lightning_lazy._params import check_finite, functional_call, keeps_running_stats, probe_mode
from lightning_lazy._inputs import Inputs, inputs_device, num_examples, take
from lightning_lazy.scaling import IGNORE_INDEX, _check_classes, as_regression_target, squared_distance

#: What the empirical NTK is taken of (:class:`LazinessProbe`'s ``ntk_outputs``): a name or
#: ``callable(output, y) -> [n, K']`` (row i a function of output row i and target row i only).
NtkOutputs = Union[str, Callable[[Tensor, Any], Tensor]]
NTK_OUTPUTS = ("auto", "all", "labels")

# ‖D²h‖ searches: at w0 one start, 3 alternation rounds of 4 Lanczos steps; then warm-started from the last
# direction, which 2 Lanczos steps follow along training. Chosen by `python benchmarks/monitor_cost.py
# --accuracy-study` (one thread; cost in plain training steps of batch 128; value against a (16, 4, 3) search
# at the same weights; every search returns a lower bound). On the MLP 3072-1024-1024-10 / VGG-11 ×1 / resnet18
# (train-mode BatchNorm): (4, 3, 1) costs 13 / 5.2 / 7.8 steps for −5.5 / −3.8 / −17 %, the earlier (8, 2, 1)
# 16 / 6.3 / 8.0 for −5.6 / −4.3 / −18 %: rounds (new output directions c) gain more than Lanczos steps.
# (4, 4, 1) reaches −3.1 / +0.3 / −15 % for 21 / 7.0 / 9.1 steps, which took the MLP's whole fit-start
# measurement to 24-27 of its budget of 30 steps. resnet18's search stops at a local maximum from one start;
# (12, 3, 2) reaches −8 % for 31 steps. The warm search: 4.0 / 1.2 / 1.5 steps, −4.8 / −1.5 / −12 %.
CAREFUL_HESSIAN = {"max_iter": 4, "max_rounds": 3, "restarts": 1}
WARM_HESSIAN = {"max_iter": 2, "max_rounds": 1, "restarts": 1}

#: The parts of a measurement that :meth:`LazinessProbe.measure` can leave out (``parts={name: False}``), so that a
#: schedule can take the costly ones less often than the rest, with the entries of ``LazinessProbe.timings`` that each
#: one's cost is recorded under (seconds of wall time at the last measurement that took it). "kappa": κ, ‖Dh‖ and
#: ‖D²h‖ (the ‖D²h‖ search and, when the NTK cannot give ‖Dh‖, its Lanczos); "ntk": the empirical NTK and the
#: values read from it (distance, alignment, spectrum, velocity, per-layer blocks); "layers": the per-layer values.
MEASURE_PARTS: dict[str, tuple[str, ...]] = {"kappa": ("hessian_norm", "kappa_rest"), "ntk": ("ntk", "spectrum"),
                                             "layers": ("layers",)}


class LazinessProbe:
    """The laziness measures of ``network`` on the probe ``(x, y)``, against its weights now (w0).

    Args:
        network: a module mapping a probe batch ``x`` to one output tensor ``[N, ...]``.
        x: probe inputs ``[N, ...]``, or a dict of tensors sharing their first dimension (``input_ids``,
            ``attention_mask``; the network is then called on the dict, see :class:`~lightning_lazy.watch.twin.Watched`).
        y: probe targets, of the output's shape or class indices over its last dimension (one-hot encoded),
            or ``None`` (then y* = 0 and Δ is relative to ‖α h(w0)‖). Class indices equal to −100
            (:data:`~lightning_lazy.scaling.IGNORE_INDEX`, the loss's ``ignore_index`` and Hugging Face's label
            padding) mark positions every target-dependent measure leaves out, as the loss does: the outputs there
            are set to 0 in Δ (numerator and denominator ‖y* − αh(w0)‖), in κ (h is the model restricted to the
            positions kept: its residual ‖h − y*‖, ‖Dh‖ and ‖D²h‖) and in the empirical NTK.
        kappa_probe_size / ntk_probe_size: the first examples used for κ and for the empirical NTK.
        measure_kappa / measure_ntk: compute those (the costliest measures) or not.
        ntk_outputs: which outputs the empirical NTK is taken of. ``"all"``: every output (``[n·K, n·K]``
            numbers). ``"labels"``, for class-index targets: at each position kept, the logit of its target class,
            h'ᵢₜ = hᵢₜ[yᵢₜ] (0 at positions ignored), so ``[n·T, n·T]`` for token logits ``[n, T, V]``: the kernel of
            the label tokens' logits, as Malladi et al. ("A Kernel-Based View of Language Model Fine-Tuning", ICML
            2023, section 4) take the kernel of a language model on its label words' logits, not the vocabulary.
            A callable ``(output [n, ...], y [n, ...] or None) -> [n, K']``: any projection whose row i depends on
            row i only (it is also called on single examples). ``"auto"`` (default): ``"labels"`` when the output
            has a sequence dimension (``[N, T, V]``) and the targets are class indices ``[N, T]``, else ``"all"``.
            A kernel other than ``"all"``'s is not the network's NTK, so ‖Dh‖ is then found by Lanczos.
        per_layer: the per-layer measures (:meth:`layer_measures`): per module displacement, feature movement on
            the first ``layer_probe_size`` examples, and with ``measure_ntk`` the share and the distance of its
            NTK block.
        max_layers: at most this many per-layer entries (see :func:`layer_groups`).
        feature_sketch: M, the numbers kept per module output for feature movement: an output of more numbers (over
            the ``layer_probe_size`` examples) is kept as its CountSketch (:func:`diagnostics.count_sketch`), and its
            feature movement is a Johnson–Lindenstrauss estimate of the exact one, of relative standard error at
            most √(2/M) (1.1 % at the default 16384; :func:`diagnostics.feature_movement`); smaller outputs are kept
            whole (exact). So the features cost at most 2·M numbers per module output whatever the model. ``None``:
            whole outputs always (exact; memory 2·n_l·F, which the memory check may refuse).

    Raises ``ValueError`` when the output has not one row per example, the targets do not fit the output,
    the network has no parameter, or the NTK would hold more than
    :data:`~lightning_lazy.diagnostics.DEFAULT_MEMORY_BUDGET` numbers (before any of it is computed);
    :class:`ProbeMemoryError` (a ``ValueError``) when the output-sized tensors of the measures
    (:func:`probe_numbers`) would, found from one forward of two examples before the probe's own.

    Memory: the probe keeps no tensor of the output's size. Class-index targets stay indices (Δ and κ's residual
    by :func:`~lightning_lazy.scaling.squared_distance`, the mask of −100 positions ``[N, ..., 1]``), and of h(w0)
    only Δ's denominator ‖y* − αh(w0)‖ is kept; targets given as floats are kept as given (``[N, K]``).

    Work shared between measures: the constructor's forward gives h(w0) and the ReLU states at w0; each later
    measurement runs one forward of the probe for both Δ's output and activation stability; ‖Dh‖ is read off
    the empirical NTK (its top eigenvalue) when that kernel is the network's own on the κ probe (the same
    examples, no BatchNorm statistics held), otherwise found by Lanczos.

    Cost with the defaults (probe 256, κ and NTK on its first 16), in plain training steps (forward, ½ squared
    error, backward, SGD step at batch 128) of the same model, one CPU thread, ``python
    benchmarks/monitor_cost.py``: at w0 22 / 7.6 / 12 steps, each later measurement 8.3 / 5.1 / 7.0 steps,
    for an MLP 3072-1024-1024-10 / VGG-11 ×1 / torchvision resnet18 at CIFAR shape; the ‖D²h‖ searches are most
    of it (see :data:`CAREFUL_HESSIAN` for their accuracy). Δ, the NTK and activation stability are exact on
    the probe; ‖Dh‖ is exact from the kernel, within ``tol=1e-3`` (relative Ritz residual on ‖Dh‖²) by Lanczos:
    measured within 5e-6 of ``tol=1e-8`` on those three nets.
    """

    def __init__(self, network: nn.Module, x: Inputs, y: Tensor | None, *, kappa_probe_size: int = 16,
                 ntk_probe_size: int = 16, measure_kappa: bool = True, measure_ntk: bool = True,
                 ntk_outputs: NtkOutputs = "auto", per_layer: bool = True, layer_probe_size: int = 64,
                 max_layers: int = 32, feature_sketch: int | None = diagnostics.FEATURE_SKETCH_SIZE) -> None:
        self.network = network
        self.per_layer, self.layer_probe_size, self.max_layers = per_layer, layer_probe_size, max_layers
        if feature_sketch is not None and feature_sketch < 1:
            raise ValueError(f"feature_sketch must be a positive number of values per module output (or None: whole "
                             f"outputs), got {feature_sketch}")
        self.feature_sketch = feature_sketch
        # The layers: modules owning trainable parameters directly; their outputs on the probe at w0 are kept
        # from the constructor's forward (feature movement), as the ReLU states are.
        modules = dict(network.named_modules())
        self.layer_modules: list[str] = [name for name in diagnostics.parameter_owning_modules(network) if any(
            p.requires_grad for p in modules[name].parameters(recurse=False))] if per_layer else []
        self.initial_features: dict[str, list[Tensor]] | None = None
        self.initial_blocks: dict[str, Tensor] | None = None
        self.previous_kernel: Tensor | None = None  # the NTK at the last measurement, and its t̃ (kernel velocity)
        self.previous_time = 0.0
        self._features: dict[str, list[Tensor]] | None = None
        self._blocks: dict[str, Tensor] | None = None
        # Each parameter by identity under the name it had at w0 (renaming, e.g. pruning's weight -> weight_orig,
        # keeps it), and whether a forward was seen writing into the tensors it was given (then every call gets
        # fresh copies).
        self._objects: dict[str, Tensor] = dict(network.named_parameters())
        self._writes = False
        self.initial = {name: p.detach().clone() for name, p in self._objects.items()}
        # Buffers are state of the forward that writes them (spectral norm's power-iteration vectors, counters,
        # running averages): the measures hold them at their values at w0, by identity, so that they see one
        # function of the weights. A buffer assigned a new tensor since (SWA's statistics, a pruning mask) is
        # read as it is now; running statistics are probe_mode's business (kept_buffers).
        self._buffer_objects: dict[str, Tensor] = held_buffers(network)
        self.initial_buffers = {name: b.detach().clone() for name, b in self._buffer_objects.items()}
        if not self.initial:
            raise ValueError(f"{type(network).__name__} has no parameter to measure")
        if not callable(ntk_outputs) and ntk_outputs not in NTK_OUTPUTS:
            raise ValueError(f"ntk_outputs must be one of {NTK_OUTPUTS} or a callable(output, y) -> [N, K'], "
                             f"got {ntk_outputs!r}")
        self.x = x
        n = num_examples(x)
        self.timings: dict[str, dict[str, float]] = {}
        self.kappa_probe_size, self.ntk_probe_size = kappa_probe_size, ntk_probe_size
        self.measure_kappa, self.measure_ntk = measure_kappa, measure_ntk
        self._check_memory_budget(y)  # before the probe's forward, whose output alone may not fit
        started = perf_counter()
        output, states = self._output_and_states(x, flatten=False)  # one forward: the output and the ReLU states
        self._first_forward_seconds = perf_counter() - started
        self.initial_features = self._features
        # Class indices (with their -100s) are kept as they are, never one-hot encoded: [N, T] for token logits
        # [N, T, V], where the one-hot would be as large as the output. state_dict saves them.
        self.labels: Tensor | None = None if y is None or y.is_floating_point() else y
        self.y: Tensor | None = None  # regression targets given as floats, [N, K]
        try:
            if self.labels is not None:
                ignored = _check_classes(output, self.labels)
            elif y is not None:
                self.y = as_regression_target(output, y.reshape(output.shape)).reshape(n, -1)
        except (ValueError, RuntimeError) as error:
            raise ValueError(f"the probe targets {tuple(y.shape)} do not fit the output {tuple(output.shape)}: "
                             f"{error}") from None
        # [N, ..., 1] (the targets' shape) of 1 (kept) and 0 (target -100), or None: broadcast over the classes, it
        # multiplies every output a target-dependent measure sees.
        self.mask: Tensor | None = _keep(self.labels, output.dtype)
        self.output_numel = output[0].numel()  # K, the outputs per example
        # Δ's denominator ‖y* − αh(w0)‖ (-100 positions left out) is all Δ needs of h(w0): no [N, K] copy is kept.
        self.initial_distance: Tensor = squared_distance(
            output if self.labels is not None else output.reshape(n, -1), self._target(n)).sqrt()
        self.ntk_outputs = self._resolve_ntk_outputs(ntk_outputs, output)
        # Diagnostics see example indices, not x, when x is a dict or the outputs they see depend on the
        # example's targets: fn(params, index) then reads x, the mask and the targets at index (under vmap too).
        self._indexed = isinstance(x, dict) or self.mask is not None or self.ntk_outputs != "all"
        self._index = torch.arange(n, device=inputs_device(x))
        if measure_ntk:
            self._check_ntk_budget(output)
        del output  # the probe keeps no output-sized tensor
        self.initial_kernel: Tensor | None = None
        self.kernel_names: tuple[str, ...] = ()
        self.initial_kappa: float | None = None
        self.initial_jacobian_norm: float | None = None
        self.initial_kappa_parts: dict[str, float] | None = None
        self.initial_relu: list[Tensor] | None = states or None
        self.hessian_direction: Tensor | None = None
        self.hessian_names: tuple[str, ...] = ()
        # What the last displacement was relative to (diagnostics.Displacement.relative_to): "w0", "reference" (the
        # frozen weights, when every trained weight starts at zero) or "absolute".
        self.displacement_relative_to = "w0"
        self.jacobian_direction: Tensor | None = None
        self._head: nn.Module | None | bool = False  # the LM head (_label_head), not looked for yet

    # ------------------------------------------------------------------------------------ the network

    def _resolve_ntk_outputs(self, ntk_outputs: NtkOutputs, output: Tensor) -> NtkOutputs:
        classes = self.labels is not None and self.labels.shape == output.shape[:-1]
        if ntk_outputs == "auto":
            return "labels" if output.dim() >= 3 and classes else "all"
        if ntk_outputs == "labels" and not classes:
            raise ValueError(f"ntk_outputs='labels' needs class-index targets of the output's shape without its last "
                             f"dimension ({tuple(output.shape[:-1])}); give them in the probe, or ntk_outputs='all'")
        return ntk_outputs

    def _project(self, output: Tensor, index: Tensor) -> Tensor:
        """The outputs the NTK is taken of, ``[n, K']``, from the network's ``output`` on the examples ``index``."""
        n = output.shape[0]
        if self.ntk_outputs == "all":
            return (output if self.mask is None else output * self.mask[index]).reshape(n, -1)
        labels = None if self.labels is None else self.labels[index]
        if callable(self.ntk_outputs):
            projected = self.ntk_outputs(output, labels)
            if not isinstance(projected, Tensor) or projected.dim() == 0 or projected.shape[0] != n:
                raise ValueError(f"ntk_outputs(output, y) must return a tensor [N, K'] with N = {n} rows")
            return projected.reshape(n, -1)
        kept = labels != IGNORE_INDEX  # "labels": the logit of each kept position's target class
        picked = output.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return (picked * kept.to(picked.dtype)).reshape(n, -1)

    def _label_head(self) -> nn.Module | None:
        """The LM head, for the label-logit NTK (``ntk_outputs="labels"``): the ``nn.Linear`` whose output *is* the
        network's output (the same tensor: nothing applied after it), found once from a forward of one example;
        ``None`` when there is none (the kernel is then taken of the dense logits, gathered).

        Its selected logit is z_it = ⟨h_it, W[y_it]⟩ + b[y_it] (h_it its input at position t): with the head so
        replaced (:func:`_selected_logits`) the kernel's forward and its K = T backward passes never form the
        ``[n, T, V]`` logits, whose products dominated the kernel of a real vocabulary; W is the head's weight as
        the forward sees it (the embedding's, when tied), so the function differentiated is the same."""
        if self._head is False:
            linears = [m for m in self.network.modules() if type(m) is nn.Linear]
            seen: list[tuple[nn.Module, Tensor]] = []
            handles = [m.register_forward_hook(lambda m, i, o: seen.append((m, o))) for m in linears]
            try:
                with torch.no_grad():
                    output = self._call(self._snapshot(), take(self.x, self._index[:1]))
            finally:
                for handle in handles:
                    handle.remove()
            self._head = next((m for m, o in reversed(seen) if o is output), None)
        return self._head

    def _check_ntk_budget(self, output: Tensor) -> None:
        """Refuse, before computing anything, an NTK over more numbers than ``diagnostics.DEFAULT_MEMORY_BUDGET``."""
        n = min(self.ntk_probe_size, num_examples(self.x))
        with torch.no_grad():
            width = self._project(output[:1], self._index[:1]).shape[1]
        numbers = (n * width) ** 2
        if numbers > diagnostics.DEFAULT_MEMORY_BUDGET:
            raise ValueError(
                f"the empirical NTK on {n} examples x {width} outputs (ntk_outputs={self.ntk_outputs!r}) would hold "
                f"{numbers:.3g} numbers, over the memory budget of {diagnostics.DEFAULT_MEMORY_BUDGET:.3g} "
                "(diagnostics.DEFAULT_MEMORY_BUDGET): lower ntk_probe_size, pass ntk_outputs='labels' (class targets) "
                "or a callable(output, y) -> [N, K'] projection, or measure_ntk=False")

    def _check_memory_budget(self, y: Tensor | None) -> None:
        """Refuse, before the probe's forward, a probe whose output-sized tensors would hold more numbers than
        ``diagnostics.DEFAULT_MEMORY_BUDGET`` (:func:`probe_numbers`), naming the largest probe that fits.

        The sizes per example come from one forward of the first two examples (one, for a probe of one)."""
        n = num_examples(self.x)
        rows = min(n, 2)
        recording = (diagnostics.recording_module_outputs(self.network, self.layer_modules)
                     if self.layer_modules else contextlib.nullcontext())
        with torch.no_grad(), recording as features:
            output = self._call(self._snapshot(), take(self.x, slice(0, rows)))
        if not isinstance(output, Tensor) or output.dim() == 0 or output.shape[0] != rows:
            return  # the probe's forward says what is wrong, in its words
        sizes = {"output_numel": output[0].numel(),
                 "feature_numel": [t.numel() // rows for ts in (features or {}).values() for t in ts],
                 "feature_sketch": self.feature_sketch,
                 "float_targets": y is not None and y.is_floating_point(), "kappa_probe_size": self.kappa_probe_size,
                 "layer_probe_size": self.layer_probe_size if self.layer_modules else 0}
        numbers, budget = probe_numbers(n, **sizes), diagnostics.DEFAULT_MEMORY_BUDGET
        if numbers <= budget:
            return
        largest = next((m for m in range(n - 1, 0, -1) if probe_numbers(m, **sizes) <= budget), 0)
        shape = "x".join(str(d) for d in output.shape[1:])
        cause = (f"the probe's output-sized tensors (output {shape} per example, a probe of {n} examples, "
                 f"layer_probe_size={sizes['layer_probe_size']}, kappa_probe_size={self.kappa_probe_size}) would "
                 f"hold {numbers:.3g} numbers, over the memory budget of {budget:.3g} (diagnostics.DEFAULT_MEMORY_BUDGET)")
        raise ProbeMemoryError(cause, largest)

    def _target(self, rows: int) -> Tensor | None:
        """The targets of the first ``rows`` examples as the diagnostics take them: the class indices (−100 kept),
        the regression targets ``[rows, K]``, or ``None`` (y* = 0)."""
        if self.labels is not None:
            return self.labels[:rows]
        return None if self.y is None else self.y[:rows]

    def regression_targets(self, rows: int | None = None) -> Tensor | None:
        """y* on the first ``rows`` examples (all by default), ``[rows, K]`` in the outputs' dtype: the one-hot
        encoding of class indices, 0 at positions whose index is −100, built here (rows·K numbers; the measures of
        the whole probe never build it), or the regression targets; ``None`` when the probe has no targets."""
        rows = num_examples(self.x) if rows is None else rows
        if self.labels is None:
            return None if self.y is None else self.y[:rows]
        labels = self.labels[:rows]
        classes = self.output_numel // max(1, labels[0].numel()) if labels.dim() else self.output_numel
        one_hot = torch.nn.functional.one_hot(labels.long().clamp_min(0), classes).to(self.initial_distance.dtype)
        if self.mask is not None:
            one_hot = one_hot * self.mask[:rows]
        return one_hot.reshape(len(labels), -1)

    def _divergence_scale(self) -> Tensor:
        if float(self.initial_distance) == 0.0:
            raise ValueError("the target equals the initial output on the probe: the divergence has no scale")
        return self.initial_distance

    def _inputs(self, n: int) -> Tensor:
        """What the diagnostics receive for the first ``n`` examples: ``x[:n]``, or their indices (see ``_indexed``)."""
        return self._index[:n] if self._indexed else self.x[:n]

    def output(self, x: Inputs, flatten: bool = True) -> Tensor:
        """The network on ``x`` as the measures see it, no gradient: ``[N, K]`` (or its own shape)."""
        return self._output_and_states(x, flatten)[0]

    def _output_and_states(self, x: Inputs, flatten: bool = True) -> tuple[Tensor, list[Tensor]]:
        """:meth:`output` and the ReLU states of that same forward (:func:`diagnostics.recording_relu_states`),
        and, when ``x`` is the probe, the layers' outputs (:func:`diagnostics.recording_module_outputs`). The forward
        runs on fresh copies of every parameter and buffer; a copy written during it (a layer that renormalizes its
        weight, say) marks the network as one that writes, for every later measure."""
        recording = (diagnostics.recording_module_outputs(self.network, self.layer_modules, rows=self.layer_probe_size,
                                                          sketch=self.feature_sketch)
                     if self.layer_modules and x is self.x else contextlib.nullcontext())
        tensors = self._snapshot()
        versions = {name: t._version for name, t in tensors.items()}
        with torch.no_grad(), diagnostics.recording_relu_states() as states, recording as features:
            output = self._call(tensors, x)
        self._writes = self._writes or any(t._version != versions[name] for name, t in tensors.items())
        self._features = features  # the layers' outputs when x is the probe (per-layer feature movement)
        n = num_examples(x)
        if output.dim() == 0 or output.shape[0] != n:
            raise ValueError(f"the measures need one output row per example; the model returned "
                             f"{tuple(output.shape)} for {n} inputs")
        return (output.reshape(n, -1) if flatten else output), states

    def function(self, kernel: bool = False) -> Callable[[dict[str, Tensor], Tensor], Tensor]:
        """The network as a functional model ``fn(params, inputs) -> [N, K]`` for :mod:`diagnostics`; ``params`` are
        named as in ``self.network.named_parameters()`` when w0 was taken (under the monitor, the watched wrapper's
        names: ``inner.`` + the watched module's own). ``inputs`` are those :meth:`_inputs` gives: ``x[:n]``, or
        example indices when x is a dict or targets enter (the outputs at positions whose target is −100 are then
        0; ``kernel=True``: the outputs ``ntk_outputs`` selects). Every other parameter and buffer is a copy taken
        now; the network's own tensors never enter a forward. Raises ``ValueError`` when a parameter measured at
        w0 is no longer in the network (replaced by another tensor)."""
        return self._functional(self._forward(), kernel)

    def _forward(self, buffers: dict[str, Tensor] | None = None) -> Callable[[dict[str, Tensor], Inputs], Tensor]:
        """The raw network ``forward(params, x)`` on copies: ``params`` by their names at w0, every other parameter
        and buffer a copy taken now (``buffers``: buffer values to use instead, by their current names), fresh
        copies at every call once a forward was seen writing into its tensors."""
        names = self._names_now()
        base = {**self._snapshot(), **(buffers or {})}
        writes = self._writes

        def forward(params: dict[str, Tensor], x: Inputs) -> Tensor:
            tensors = {**base, **{names[name]: value for name, value in params.items()}}
            if writes:  # a forward that writes into its tensors must not carry over into the next call
                tensors = {name: value.clone() for name, value in tensors.items()}
            return self._call(tensors, x)

        return forward

    def _functional(self, forward: Callable[[dict[str, Tensor], Inputs], Tensor],
                    kernel: bool) -> Callable[[dict[str, Tensor], Tensor], Tensor]:
        """``forward(params, x)`` (the raw network) as the ``fn(params, inputs) -> [n, K]`` the diagnostics call."""
        if not self._indexed:
            return lambda params, x: forward(params, x).reshape(len(x), -1)
        head = self._label_head() if kernel and self.ntk_outputs == "labels" else None

        def fn(params: dict[str, Tensor], index: Tensor) -> Tensor:
            if head is not None:  # the label logits straight from the LM head's input: no [n, T, V] logits
                with _selected_logits(head, self.labels[index]):
                    selected = forward(params, take(self.x, index))
                kept = (self.labels[index] != IGNORE_INDEX).to(selected.dtype)
                return (selected.squeeze(-1) * kept).reshape(selected.shape[0], -1)
            output = forward(params, take(self.x, index))
            if kernel:
                return self._project(output, index)
            if self.mask is not None:
                output = output * self.mask[index]
            return output.reshape(output.shape[0], -1)

        return fn

    def _call(self, tensors: dict[str, Tensor], x: Inputs) -> Tensor:
        """The network on ``x`` with ``tensors`` in place of its own, as the measures see it: :func:`probe_mode`,
        forward-AD-capable kernels, dense embeddings. Buffers that :func:`probe_mode` holds out (running statistics
        of normalization layers that normalize by the probe's own statistics) are left out."""
        with probe_mode(self.network), forward_ad_safe(self.network, "LazyTrainingMonitor"), \
                _dense_embeddings(self.network):
            present = {name for name, _ in self.network.named_parameters()}
            present.update(name for name, _ in self.network.named_buffers())
            return functional_call(self.network, {k: v for k, v in tensors.items() if k in present}, (x,))

    def _names_now(self) -> dict[str, str]:
        """``{name at w0: name now}`` for every parameter measured at w0, found by identity."""
        now = {id(p): name for name, p in self.network.named_parameters()}
        missing = [name for name, p in self._objects.items() if id(p) not in now]
        if missing:
            raise ValueError(
                f"the parameter {missing[0]!r} measured at w0 is no longer in {type(self.network).__name__} (another "
                "tensor was assigned in its place), so its distance from w0 has no meaning: change parameters in "
                "place (param.data.copy_ or torch.nn.utils.parametrize) instead of replacing them while monitoring"
            )
        return {name: now[id(p)] for name, p in self._objects.items()}

    def _snapshot(self) -> dict[str, Tensor]:
        """Fresh copies of every parameter and buffer of the network, by their current names; a buffer held at w0
        (:meth:`held`) at its value then."""
        tensors = {name: p.detach().clone() for name, p in self.network.named_parameters()}
        tensors.update((name, b.detach().clone()) for name, b in self.network.named_buffers())
        tensors.update((name, b.clone()) for name, b in self.held().items())
        return tensors

    def held(self) -> dict[str, Tensor]:
        """``{current name: value at w0}`` of the buffers the measures hold at w0 (every buffer still the tensor it
        was then, running statistics aside: :func:`held_buffers`); the tensors themselves, not copies."""
        if not self._buffer_objects:
            return {}
        now = {id(b): name for name, b in self.network.named_buffers()}
        return {now[id(b)]: self.initial_buffers[name] for name, b in self._buffer_objects.items()
                if id(b) in now and name in self.initial_buffers and self.initial_buffers[name].shape == b.shape}

    def trainable_names(self) -> set[str]:
        """Names (as at w0) of the parameters that require grad now."""
        return {name for name, p in self._objects.items() if p.requires_grad}

    def params(self, names: Sequence[str]) -> dict[str, Tensor]:
        """Copies of the current weights named ``names`` (names as at w0; detached, never the network's own)."""
        self._names_now()  # every one still in the network
        return {name: self._objects[name].detach().clone() for name in names}

    def _timed(self, bucket: str, name: str, compute: Callable[[], Any]) -> Any:
        started = perf_counter()
        result = compute()
        device = inputs_device(self.x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the time of the work, not of its launch
        self.timings.setdefault(bucket, {})[name] = perf_counter() - started
        return result

    # ------------------------------------------------------------------------------------- at w0

    def measure_initial(self, names: Sequence[str]) -> None:
        """Measure at w0 what later values are compared with: κ(w0) and ‖Dh(w0)‖, the NTK (the ReLU states were
        recorded by the constructor's forward). ``names``: the parameters to differentiate (those trained)."""
        started = perf_counter()
        self.timings["initial"] = {"output_and_activation_states": self._first_forward_seconds}
        names = tuple(names)
        if not names:
            raise ValueError("the model has no trainable parameter: nothing to measure")
        initial = {name: self.initial[name].clone() for name in names}  # a measure never holds w0 itself
        exact = False
        if self.measure_ntk:
            self.initial_kernel, exact = self._timed("initial", "ntk", lambda: self._kernel(initial))
            self.kernel_names = names
            self.initial_blocks, self.previous_kernel, self.previous_time = self._blocks, self.initial_kernel, 0.0
        if self.measure_kappa:
            result = self._kappa(initial, "initial", careful=True, kernel=self.initial_kernel, exact=exact)
            self.initial_kappa = result.value.item()
            self.initial_jacobian_norm = result.jacobian_norm.item()
            self.initial_kappa_parts = {"kappa": self.initial_kappa, "jacobian_norm": self.initial_jacobian_norm,
                                        "hessian_norm": result.hessian_norm.item()}
        else:
            self.initial_jacobian_norm = self._timed(
                "initial", "jacobian_norm", lambda: self._jacobian_norm(initial, self.initial_kernel, exact)).item()
        self.timings["initial"]["total"] = perf_counter() - started + self._first_forward_seconds

    @property
    def laziness_horizon(self) -> float:
        """Normalized time at which the bound t̃²·κ(w0) reaches 1 (``inf`` when κ(w0) = 0)."""
        if self.initial_kappa is None:
            raise RuntimeError("the laziness horizon needs kappa(w0): it was not measured (measure_kappa=False)")
        return 1.0 / math.sqrt(self.initial_kappa) if self.initial_kappa > 0 else math.inf

    # ------------------------------------------------------------------------------------- now

    def _jacobian_norm(self, params: dict[str, Tensor], kernel: Tensor | None, exact: bool,
                       careful: bool = True) -> Tensor:
        """‖Dh‖ on the κ probe: exact from ``kernel`` when that is the network's own NTK on the same examples
        (``exact``), at no further cost; otherwise by Lanczos, started from the top singular direction the previous
        measurement found, to ``tol=1e-3`` (relative Ritz residual on ‖Dh‖²) at w0 (``careful``: ‖Dh(w0)‖ sets
        the normalized time) and ``tol=1e-2`` after (within 0.1 % of ``tol=1e-8`` on the MLP, VGG-11 and resnet18
        of ``benchmarks/monitor_cost.py --accuracy-study``; κ's ‖D²h‖, a lower bound, is 3-17 % low). (The top
        eigenvector of a kernel holding BatchNorm statistics fixed is no good start: on resnet18 it took 18
        products where a random start took 12.)"""
        n = min(self.kappa_probe_size, num_examples(self.x))
        if exact and kernel is not None and n == min(self.ntk_probe_size, num_examples(self.x)):  # the same inputs
            return diagnostics.jacobian_norm_from_ntk(kernel, n)
        start = self.jacobian_direction
        if start is not None and start.numel() != n * self.output_numel:
            start = None
        value, self.jacobian_direction = diagnostics.jacobian_norm(
            self.function(), self._inputs(n), params, tol=1e-3 if careful else 1e-2, start=start, return_direction=True)
        return value

    def _kappa(self, params: dict[str, Tensor], bucket: str, careful: bool = False,
               kernel: Tensor | None = None, exact: bool = False) -> diagnostics.Kappa:
        n = min(self.kappa_probe_size, num_examples(self.x))
        names = tuple(params)
        if careful or self.hessian_direction is None or names != self.hessian_names:
            options = dict(CAREFUL_HESSIAN)
        else:
            options = {**WARM_HESSIAN, "start": self.hessian_direction}
        hessian, self.hessian_direction = self._timed(bucket, "hessian_norm", lambda: diagnostics.hessian_norm(
            self.function(), self._inputs(n), params, return_direction=True, **options))
        self.hessian_names = names
        target = self._target(n)
        if target is None:  # y* = 0: a zero of the output's shape that holds one number
            target = torch.zeros((), dtype=self.initial_distance.dtype, device=self._index.device).expand(
                n, self.output_numel)
        return self._timed(bucket, "kappa_rest", lambda: diagnostics.kappa(
            self.function(), self._inputs(n), target, params, hessian=hessian,
            jacobian=self._jacobian_norm(params, kernel, exact, careful=careful)))

    def kernel(self, params: dict[str, Tensor]) -> Tensor:
        """The empirical NTK on the first ``ntk_probe_size`` examples. BatchNorm layers that normalize by batch
        statistics do so with the probe's statistics at ``params`` held fixed (the derivative through them is
        left out, as for a kernel taken in eval mode): examples then do not interact, and the kernel costs time
        linear in the probe size (structured derivatives) instead of quadratic. At fixed weights it is as fixed
        as every other measure."""
        return self._kernel(params)[0]

    def _kernel(self, params: dict[str, Tensor]) -> tuple[Tensor, bool]:
        """:meth:`kernel`, and whether it is the exact NTK of :meth:`function` (no BatchNorm statistics held)."""
        x = self._inputs(self.ntk_probe_size)
        statistics = self._batch_statistics(params, x)
        if not statistics:
            # Only the kernel of every output is the network's own NTK (its top eigenvalue gives ‖Dh‖).
            kernel = diagnostics.empirical_ntk(self.function(kernel=True), x, params=params, per_layer=self.per_layer)
            return self._summed(kernel), self.ntk_outputs == "all"
        return self._summed(diagnostics.empirical_ntk(self._functional(self._held(statistics), kernel=True), x,
                                                      params=params, per_layer=self.per_layer)), False

    def _held(self, statistics: dict[str, tuple[nn.Module, list]]) -> Callable[[dict[str, Tensor], Inputs], Tensor]:
        """:meth:`_forward` with the BatchNorm layers of ``statistics`` (:meth:`_batch_statistics`) normalizing by
        the statistics found there, held fixed for every input."""
        layers = [layer for layer, _ in statistics.values()]
        held = self._forward({name: value for _, buffers in statistics.values() for name, value in buffers})

        def forward(p: dict[str, Tensor], inputs: Inputs) -> Tensor:
            modes = [layer.training for layer in layers]
            for layer in layers:  # in eval mode (probe_mode leaves them there): normalize by the statistics held
                layer.training = False
            try:
                return held(p, inputs)
            finally:
                for layer, mode in zip(layers, modes):
                    layer.training = mode

        return forward

    def _summed(self, kernel: Tensor | dict[str, Tensor]) -> Tensor:
        """The kernel from :func:`diagnostics.empirical_ntk`; its per-module blocks, when asked for, kept in
        ``self._blocks`` (they sum to it: the per-layer NTK costs no second kernel)."""
        if not isinstance(kernel, dict):
            self._blocks = None
            return kernel
        self._blocks = kernel
        return sum(kernel.values())

    def _batch_statistics(self, params: dict[str, Tensor], x: Tensor) -> dict[str, tuple[nn.Module, list]]:
        """``{layer name: (layer, [(buffer name, batch mean / biased variance of its input on x)])}`` for the
        BatchNorm layers that use batch statistics in :func:`probe_mode` and keep running statistics."""
        layers = {name: m for name, m in self.network.named_modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.running_mean is not None}
        found: dict[str, tuple[nn.Module, list]] = {}
        if not layers:
            return found  # no forward needed to find none

        def record(name: str) -> Callable:
            def hook(module: nn.Module, inputs: tuple) -> None:
                value = inputs[0]
                dims = [0] + list(range(2, value.dim()))
                found[name] = (module, [(f"{name}.running_mean", value.mean(dims)),
                                        (f"{name}.running_var", value.var(dims, unbiased=False))])
            return hook

        handles = [m.register_forward_pre_hook(record(name)) for name, m in layers.items()]
        try:
            self.function()(params, x)
        finally:
            for handle in handles:
                handle.remove()
        return found

    def measure(self, names: Sequence[str], *, time: float | None = 0.0, twin: Any = None,
                parts: Mapping[str, bool] | None = None) -> dict[str, Any]:
        """The measures now, as floats, over the parameters ``names``.

        ``parts``: ``{part: False}`` leaves that part of :data:`MEASURE_PARTS` out of this measurement ("kappa",
        "ntk", "layers"; a part not named, or named ``True``, is measured as configured): its values are then absent
        from the result (never carried over from an earlier measurement), and nothing of it is computed. The NTK
        left out, ‖Dh‖ is found by Lanczos; the next kernel's ``kernel_velocity`` is over the time since the last
        kernel taken. Raises ``ValueError`` for a part not in :data:`MEASURE_PARTS`.

        ``time``: Σ of the learning rates of the steps taken, times the objective's 1/α² (so that
        t̃ = time·‖Dh(w0)‖²), or ``None`` when the optimizer's step size is not one float lr
        (:func:`lightning_lazy._optim.step_size`): then ``normalized_time``, ``bound`` and ``kernel_velocity`` are
        left out. ``twin``: a :class:`~lightning_lazy.watch.twin.TangentTwin` of the network, for Δ and
        the tangent gap. ``displacement_per_tensor`` is a dict of floats by tensor name; with the NTK, the
        values of :meth:`kernel_measures`; with ``per_layer``, ``layers`` = :meth:`layer_measures`, a dict by
        layer of dicts of floats.
        """
        started = perf_counter()
        unknown = sorted(set(parts or {}) - set(MEASURE_PARTS))
        if unknown:
            raise ValueError(f"unknown measurement part {unknown[0]!r}: parts are {tuple(MEASURE_PARTS)}")
        taken = {part: bool((parts or {}).get(part, True)) for part in MEASURE_PARTS}
        names = tuple(names)
        params = self.params(names)
        initial = {name: self.initial[name].clone() for name in names}  # a measure never holds w0 itself
        timed = lambda name, compute: self._timed("last", name, compute)  # noqa: E731
        self.timings["last"] = {}
        # time None: the optimizer's step size is not one float (lightning_lazy._optim.step_size), so no normalized
        # time is claimed, nor what is measured against it (the bound, the kernel's velocity).
        normalized_time = None if time is None else time * self.initial_jacobian_norm**2
        values: dict[str, Any] = {} if normalized_time is None else {"normalized_time": normalized_time}
        if self.initial_kappa is not None and normalized_time is not None:
            values["bound"] = normalized_time**2 * self.initial_kappa
        # Frozen weights at w0: the scale of a displacement whose trained weights all start at zero (LoRA's B).
        frozen = {name: value for name, value in self.initial.items() if name not in initial}
        moved = diagnostics.displacement(params, initial, reference=frozen)
        self.displacement_relative_to = moved.relative_to
        if not math.isfinite(moved.total.item()):
            raise ValueError(
                "training has diverged: the weights hold NaN or inf, so no laziness measure is meaningful. Lower the "
                "learning rate (for AlphaScaled models the step that is stable is about 1/||Dh(w0)||^2 whatever alpha)"
            )
        values["displacement"] = moved.total.item()
        values["displacement_per_tensor"] = {name: float(v) for name, v in moved.per_tensor.items()}
        if twin is not None or self.initial_relu is not None or self.initial_features:
            # One forward of the probe gives the divergence its output and activation stability its states.
            output, states = timed("output_and_activation_states", lambda: self._output_and_states(self.x))
        if twin is not None:
            x, n = self.x, num_examples(self.x)
            held = self.held()  # the twin reads the buffers the measures hold, when there are any
            tangent_output = timed("tangent_output", lambda: (twin.probe_output(x, held) if held else
                                                              twin.probe_output(x)).reshape(n, -1))
            if self.labels is not None:  # positions whose target is -100 are in neither norm of Δ
                output, tangent_output = (v.reshape(*self.labels.shape, -1) for v in (output, tangent_output))
            numerator = diagnostics.divergence_numerator(output, tangent_output, self.labels)
            if not math.isfinite(numerator.item()):
                check_finite(output, "output")
                check_finite(tangent_output, "tangent_output")
            values["divergence"] = (numerator / self._divergence_scale()).item()
            del output, tangent_output  # before κ: the two [N, K] outputs are the measurement's largest tensors
            twin_params = twin.parameters()
            gap = torch.sqrt(sum(((params[k] - twin_params[k]) ** 2).sum() for k in params))
            moved_norm = torch.sqrt(sum(v**2 for v in moved.absolute.values()))
            values["tangent_gap"] = (gap / moved_norm).item() if float(moved_norm) > 0 else 0.0
        kernel, exact = None, False
        if self.measure_ntk and self.initial_kernel is not None and taken["ntk"]:
            if names != self.kernel_names:
                # Parameters were unfrozen: compare kernels over the same parameters, the new set at w0.
                self.initial_kernel, self.kernel_names = self.kernel(initial), names
                self.initial_blocks, self.previous_kernel = self._blocks, None
            kernel, exact = timed("ntk", lambda: self._kernel(params))
            values["ntk_distance"] = diagnostics.ntk_distance(kernel, self.initial_kernel).item()
            values["kernel_alignment"] = diagnostics.kernel_alignment(kernel, self.initial_kernel).item()
            values.update(timed("spectrum", lambda: self.kernel_measures(kernel, normalized_time)))
        if self.measure_kappa and taken["kappa"]:
            if moved.total.item() == 0.0 and self.initial_kappa_parts is not None:
                # At w0 itself: the numbers measured there (a warm-started ‖D²h‖ search could refine its lower
                # bound, and κ would seem to move while the weights do not).
                values.update(self.initial_kappa_parts)
            else:
                result = self._kappa(params, "last", kernel=kernel, exact=exact)
                values.update(kappa=result.value.item(), jacobian_norm=result.jacobian_norm.item(),
                              hessian_norm=result.hessian_norm.item())
        if self.initial_relu is not None:
            values["activation_stability"] = _stability(states, self.initial_relu)
        if self.per_layer and taken["layers"]:
            blocks = self._blocks
            if not taken["ntk"]:
                self._blocks = None  # no kernel this time: no per-layer NTK values (never the last kernel's blocks)
            try:
                values["layers"] = timed("layers", lambda: self.layer_measures(params, initial))
            finally:
                self._blocks = blocks
        self.timings["last"]["total"] = perf_counter() - started
        return values

    # ----------------------------------------------------------------------- kernel and per-layer measures

    def kernel_measures(self, kernel: Tensor, normalized_time: float | None) -> dict[str, float]:
        """The NTK's spectrum, its alignment with the targets and its velocity, from the kernel ``kernel`` on the
        NTK probe (``[n·K, n·K]``) measured at normalized time ``normalized_time``.

        ``ntk_top_eigenvalue``, ``ntk_effective_rank`` (participation ratio (Σλ)²/Σλ²) and ``ntk_target_energy``
        (share of the probe targets' energy in the top-K eigenvectors, K outputs) of the output-traced kernel
        Σ_k Θ_kk (:func:`diagnostics.ntk_spectrum`); ``target_alignment`` its centred kernel–target alignment
        (:func:`diagnostics.target_alignment`); the last two only with targets that are not all zero (not
        constant), and only for the kernel of every output (``ntk_outputs="all"``: the targets are the kernel's
        outputs'; positions whose target is −100 are 0 in both). ``kernel_velocity``: NTK distance from the previous measurement's kernel (the one at w0 first)
        per unit of t̃ (:func:`diagnostics.kernel_velocity`), only when t̃ moved since.
        """
        n = min(self.ntk_probe_size, num_examples(self.x))
        k = kernel.shape[0] // n
        traced = kernel.reshape(n, k, n, k).diagonal(dim1=1, dim2=3).sum(-1)
        y = self.regression_targets(n) if self.ntk_outputs == "all" else None  # n·K numbers: the kernel's side
        has_targets = y is not None and bool(y.ne(0).any())
        spectrum = diagnostics.ntk_spectrum(traced, y if has_targets else None)
        values = {"ntk_top_eigenvalue": spectrum.top_eigenvalue.item(), "ntk_effective_rank": spectrum.effective_rank.item()}
        if spectrum.target_energy is not None:
            values["ntk_target_energy"] = spectrum.target_energy.item()
            if bool((y != y[:1]).any()):  # targets constant over the probe have no centred alignment
                values["target_alignment"] = diagnostics.target_alignment(traced, y).item()
        previous = self.previous_kernel
        if normalized_time is None:  # no time: no velocity, now or from this kernel on
            self.previous_kernel = None
            return values
        if previous is not None and previous.shape == kernel.shape and normalized_time > self.previous_time:
            values["kernel_velocity"] = diagnostics.kernel_velocity(kernel, previous,
                                                                    normalized_time - self.previous_time).item()
        self.previous_kernel, self.previous_time = kernel, normalized_time
        return values

    def layer_measures(self, params: dict[str, Tensor], initial: dict[str, Tensor]) -> dict[str, dict[str, float]]:
        """Per layer (module owning trained parameters, or group of them: :func:`layer_groups` with
        ``max_layers``), how far it moved from w0: ``{name: {"displacement", "feature_movement", "ntk_share",
        "ntk_distance"}}`` (as in :meth:`measure`, which calls it after its probe forward and its NTK).

        - ``displacement`` ‖w_l − w_l0‖/‖w_l0‖ over the layer's trained parameters (:func:`diagnostics.layer_displacement`);
        - ``feature_movement`` ‖φ_l(w) − φ_l(w0)‖/‖φ_l(w0)‖, φ_l the layer's outputs on the first ``layer_probe_size``
          probe examples, recorded by forward hooks during the probe forward (:func:`diagnostics.feature_movement`);
        - ``ntk_share`` tr Θ_l / tr Θ (the layer's part of the kernel's trace, summing to 1 over the layers) and
          ``ntk_distance`` ‖Θ_l − Θ_l(w0)‖_F / ‖Θ_l(w0)‖_F, from the per-module blocks of the NTK (with ``measure_ntk``).

        A value without a scale (w_l0, φ_l(w0) or Θ_l(w0) all zero) is left out, as is the feature movement of a
        module that was frozen when the probe was made (its outputs at w0 were not kept). All are exactly 0 while
        the weights stay at w0. Dimensionless. Cost: the copies of the outputs in the probe forward, and norms;
        the NTK blocks come with the kernel (the structured NTK sums per-layer Gram terms anyway).
        """
        modules = list(dict.fromkeys(diagnostics.owning_module(name) for name in params))
        groups = layer_groups(modules, self.max_layers)
        result: dict[str, dict[str, float]] = {group: {} for group in dict.fromkeys(groups.values())}
        by_parameter = {name: groups[diagnostics.owning_module(name)] for name in params}
        frozen = {name: value for name, value in self.initial.items() if name not in initial}
        for group, value in diagnostics.layer_displacement(params, initial, by_parameter, reference=frozen).items():
            result[group]["displacement"] = value.item()
        if self.initial_features and self._features is not None:
            then = {m: self.initial_features[m] for m in modules if m in self.initial_features}
            now = {m: self._features.get(m, []) for m in then}
            for group, value in diagnostics.feature_movement(now, then, {m: groups[m] for m in then}).items():
                result[group]["feature_movement"] = value.item()
        if self._blocks is not None and self.initial_blocks is not None:
            now_blocks, then_blocks = _sum_by_group(self._blocks, groups), _sum_by_group(self.initial_blocks, groups)
            total = sum(block.diagonal().sum() for block in now_blocks.values())
            for group, block in now_blocks.items():
                if float(total) > 0:
                    result[group]["ntk_share"] = (block.diagonal().sum() / total).item()
                then = then_blocks.get(group)
                if then is not None and float(then.norm()) > 0:
                    result[group]["ntk_distance"] = diagnostics.ntk_distance(block, then).item()
        return result

    def kernel_regression(self, names: Sequence[str], x_train: Tensor, y_train: Tensor, *,
                          diag_reg: float = 1e-6) -> Callable[[Tensor], Tensor]:
        """The kernel predictor at w0: the tangent model trained to convergence on ``(x_train, y_train)`` by
        gradient flow on the squared error, f(x) = f0(x) + Θ(x, X)(Θ(X, X) + ε·I)⁻¹(Y − f0(X)) (Lee et al. 2019,
        eq. 10; :func:`diagnostics.gradient_descent_mse` at ``t=None``), Θ the output-traced empirical NTK at w0
        (acting alike on every output, neural-tangents' default ``trace_axes=(-1,)``), over the parameters
        ``names``, ε = ``diag_reg``·tr Θ/N (a rank-deficient kernel still gives the minimal-norm fit). Class
        indices are one-hot targets. BatchNorm layers that normalize by batch statistics use those of ``x_train``,
        held fixed for every input (so a prediction does not depend on its batch). The solve runs in float64.

        Returns ``predict(x)``: the predictions on ``x``, in the network's output shape and dtype.
        Cost: the NTK of ``x_train`` once, then per call the NTK between ``x`` and ``x_train`` (structured
        derivatives: linear in their numbers of examples).
        """
        if self._indexed:
            raise ValueError("the kernel baseline needs tensor inputs, targets without -100 and the kernel of every "
                             "output (ntk_outputs='all'); leave kernel_baseline=None for this model")
        params = {name: self.initial[name].clone() for name in names}  # a measure never holds w0 itself
        # On copies of the network's tensors, as every measure: BatchNorm by the training subset's statistics.
        forward = self._held(self._batch_statistics(params, x_train))

        def fn(p: dict[str, Tensor], inputs: Tensor, flatten: bool = True) -> Tensor:
            output = forward(p, inputs)
            return output.reshape(len(inputs), -1) if flatten else output

        with torch.no_grad():
            raw = fn(params, x_train, flatten=False)
        try:
            targets = as_regression_target(raw, y_train if not y_train.is_floating_point() else y_train.reshape(raw.shape))
        except (ValueError, RuntimeError) as error:
            raise ValueError(f"the kernel baseline's targets {tuple(y_train.shape)} do not fit the output "
                             f"{tuple(raw.shape)}: {error}") from None
        f0 = raw.reshape(len(x_train), -1).double()
        kernel = diagnostics.empirical_ntk(fn, x_train, params=params, trace=True).double()
        predict = diagnostics.gradient_descent_mse(kernel, targets.reshape(len(x_train), -1).double(), diag_reg=diag_reg)

        def predictor(x: Tensor) -> Tensor:
            with torch.no_grad():
                f0_x = fn(params, x)
            k_x = diagnostics.empirical_ntk(fn, x, x_train, params=params, trace=True).double()
            return predict(None, f0, f0_x.double(), k_x)[1].to(f0_x.dtype).reshape(len(x), *raw.shape[1:])

        return predictor

    # ------------------------------------------------------------------------------------- state

    _STATE = ("initial", "x", "y", "labels", "mask", "initial_distance", "initial_kernel", "kernel_names", "initial_kappa",
              "initial_jacobian_norm", "initial_kappa_parts", "initial_relu", "hessian_direction", "hessian_names",
              "jacobian_direction", "initial_features", "initial_blocks", "previous_kernel", "previous_time",
              "initial_buffers")
    _OPTIONAL_STATE = ("jacobian_direction", "labels", "mask", "initial_features", "initial_blocks", "previous_kernel",
                       "previous_time", "initial_buffers")

    def state_dict(self) -> dict[str, Any]:
        """Tensors, numbers, strings and containers of them only: a checkpoint of it loads with
        ``torch.load(weights_only=True)``, Lightning's default (a sketched output is kept as ``{"sketch": values,
        "shape": shape}``)."""
        return {key: _saved(getattr(self, key)) for key in self._STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = next(iter(self.initial.values())).device
        dtype = self.initial_distance.dtype
        if "initial_distance" not in state:
            # Older checkpoints kept h(w0) [N, K], the targets one-hot encoded [N, K] and the mask [N, K]: Δ's
            # denominator from them, the way it was computed then.
            initial = state["initial_output"] if state.get("mask") is None else state["initial_output"] * state["mask"]
            state = {**state, "initial_distance": (state["y"].to(initial.dtype) - initial).norm()}
        if state.get("labels") is not None:  # the class indices are the targets (older checkpoints: also one-hot)
            state = {**state, "y": None, "mask": _keep(state["labels"], dtype)}
        for key in self._STATE:
            # Absent from older checkpoints:
            value = state.get(key, getattr(self, key)) if key in self._OPTIONAL_STATE else state[key]
            setattr(self, key, tuple(value) if key.endswith("names") else _restored(value, device))


#: Output-sized tensors ([N, K]) alive at once at the peak of Δ's part of a measurement, per probe example: the
#: network's output and, inside the tangent twin's forward, its primal, tangent and sum. Measured (CPU, tiny GPT-2
#: of vocabulary 5000, T = 16, probe of 8, peak of allocated bytes by torch.profiler): 4.2 N·K.
OUTPUT_COPIES = 4
#: The same on the κ probe (‖D²h‖'s forward-over-forward products, ‖Dh‖'s Lanczos products beside two basis
#: vectors): measured 11.0 to 13.7 n·K for n = 4 to 1 examples (with the parameter-sized vectors), 12.2 for ‖Dh‖.
KAPPA_COPIES = 12


class ProbeMemoryError(ValueError):
    """The probe's tensors would not fit the memory budget: ``cause`` says why, ``largest`` is the largest number
    of probe examples that fits (0: not even one)."""

    def __init__(self, cause: str, largest: int) -> None:
        self.cause, self.largest = cause, largest
        remedy = (f"give at most {largest} probe example{'s' if largest > 1 else ''}" if largest else
                  "not even one example fits: lower layer_probe_size and kappa_probe_size, or per_layer=False")
        super().__init__(f"{cause}: {remedy}, or raise diagnostics.DEFAULT_MEMORY_BUDGET")


def probe_numbers(size: int, *, output_numel: int, feature_numel: int | Sequence[int] = 0,
                  float_targets: bool = False, kappa_probe_size: int = 16, layer_probe_size: int = 64,
                  feature_sketch: int | None = None) -> int:
    """The numbers (tensor elements) the measures of a probe of ``size`` examples hold at once, at most, in tensors
    whose size grows with the output: per example ``output_numel`` = K outputs and ``feature_numel`` outputs of the
    layers whose feature movement is measured (0 without ``per_layer``): their total F, or the numbers F_o of each
    output recorded (then with ``feature_sketch`` = M an output counts min(n_l·F_o, M), as
    :func:`diagnostics.recording_module_outputs` keeps it).

    ``max(OUTPUT_COPIES·N, KAPPA_COPIES·n_κ)·K + 2·n_l·F (+ N·K for targets given as floats)``, N = ``size``,
    n_κ = min(``kappa_probe_size``, N), n_l = min(``layer_probe_size``, N): Δ's outputs and κ's vectors (one after
    the other), the layers' outputs at w0 and now (2·Σ_o min(n_l·F_o, M) with the sketch). Class-index targets cost no output-sized tensor (Δ and κ's
    residual use :func:`~lightning_lazy.scaling.squared_distance`), nor does h(w0) (Δ keeps its distance to y*).
    Not counted: the empirical NTK and the ‖D²h‖ basis (their own budget checks), autograd's intermediates.
    """
    n_kappa, n_layer = min(kappa_probe_size, size), min(layer_probe_size, size)
    outputs = max(OUTPUT_COPIES * size, KAPPA_COPIES * n_kappa) + (size if float_targets else 0)
    sizes = [feature_numel] if isinstance(feature_numel, int) else list(feature_numel)
    kept = sum(n_layer * f if feature_sketch is None or n_layer * f <= feature_sketch else feature_sketch
               for f in sizes)
    return outputs * output_numel + 2 * kept


def layer_groups(modules: Sequence[str], max_layers: int) -> dict[str, str]:
    """Which entry each layer is reported under: ``{module name: group name}``.

    Up to ``max_layers`` modules, each is its own entry. Beyond, modules are grouped by the top-level child of the
    network they sit in (the first name after the prefix all the names share, e.g. ``layer1`` of a ResNet, whose
    per-layer values then run over all its modules' parameters, outputs and kernel blocks); if there are still more
    than ``max_layers`` groups, consecutive groups are merged into ``max_layers`` runs named ``first_to_last``.
    So a network of hundreds of modules logs a readable handful of per-layer tags.
    """
    if max_layers < 1:
        raise ValueError(f"max_layers must be a positive integer, got {max_layers}")
    if len(modules) <= max_layers:
        return {m: m for m in modules}
    parts = [m.split(".") if m else [] for m in modules]
    depth = 0  # the components every name shares (the monitor's wrapper, say)
    while all(len(p) > depth + 1 for p in parts) and len({p[depth] for p in parts}) == 1:
        depth += 1
    top = {m: ".".join(p[: depth + 1]) for m, p in zip(modules, parts)}
    names = list(dict.fromkeys(top.values()))
    if len(names) <= max_layers:
        return top
    prefix = ".".join(parts[0][:depth]) + "." if depth else ""
    size = math.ceil(len(names) / max_layers)
    merged = {}
    for start in range(0, len(names), size):
        run = names[start : start + size]
        label = run[0] if len(run) == 1 else f"{run[0]}_to_{run[-1][len(prefix):]}"
        merged.update({name: label for name in run})
    return {m: merged[top[m]] for m in modules}


def _sum_by_group(blocks: dict[str, Tensor], groups: dict[str, str]) -> dict[str, Tensor]:
    summed: dict[str, Tensor] = {}
    for name, block in blocks.items():
        group = groups.get(name, name)
        summed[group] = block if group not in summed else summed[group] + block
    return summed


def held_buffers(network: nn.Module) -> dict[str, Tensor]:
    """``{name: buffer}`` of the buffers of ``network`` whose values the measures hold at w0: every buffer but the
    running statistics of normalization layers (:func:`~lightning_lazy._params.keeps_running_stats`), which
    :func:`~lightning_lazy._params.probe_mode` treats by mode (batch statistics in train mode, running ones in eval).

    A forward that writes a buffer (``parametrizations.spectral_norm``'s u and v in every training forward, the
    old-style ``spectral_norm``'s ``weight_u`` / ``weight_v``, a call counter, an average of activations) makes it
    state of that forward, not a function of the weights: held, every measure sees one function of the weights,
    and at lr 0 nothing measured moves."""
    statistics = {id(b) for m in network.modules() if keeps_running_stats(m)
                  for name, b in m._buffers.items() if b is not None}
    return {name: b for name, b in network.named_buffers() if id(b) not in statistics}


@contextlib.contextmanager
def _dense_embeddings(network: nn.Module) -> Iterator[None]:
    """Embeddings with ``sparse=True`` give dense gradients inside: the same function, and the form
    ``torch.func`` transforms and the measures' products need."""
    layers = [m for m in network.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]
    for m in layers:
        m.sparse = False
    try:
        yield
    finally:
        for m in layers:
            m.sparse = True


@contextlib.contextmanager
def _selected_logits(head: nn.Module, labels: Tensor) -> Iterator[None]:
    """Within the block, the ``nn.Linear`` ``head`` returns, instead of its logits ``[..., V]``, the logit of each
    position's class in ``labels`` (class indices of the input's shape without its last dimension; −100 read as
    class 0, left out by the caller): ``[..., 1]``, ⟨h, W[y]⟩ + b[y], from its weight and bias as the forward sees
    them (under ``functional_call``: the parameters given)."""
    classes = labels.clamp_min(0)

    def selected(h: Tensor) -> Tensor:
        rows = torch.nn.functional.embedding(classes, head.weight)  # W[y], [..., d]
        logit = (h * rows).sum(-1, keepdim=True)
        return logit if head.bias is None else logit + head.bias[classes].unsqueeze(-1)

    head.forward = selected  # an instance attribute: hooks and functional_call still apply around it
    try:
        yield
    finally:
        del head.forward


def _stability(now: list[Tensor] | None, then: list[Tensor]) -> float:
    if now is None or len(now) != len(then) or any(a.shape != b.shape for a, b in zip(now, then)):
        raise ValueError("the model applied a different sequence of ReLUs now and at w0")
    same = sum(int((a == b).sum()) for a, b in zip(now, then))
    return same / sum(a.numel() for a in then)


def _keep(labels: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``[*labels.shape, 1]`` of 1 where the class index is a class and 0 where it is −100; ``None`` when nothing
    is ignored (or there are no class indices)."""
    if labels is None:
        return None
    kept = labels != IGNORE_INDEX
    return None if bool(kept.all()) else kept.unsqueeze(-1).to(dtype)


def _saved(value: Any) -> Any:
    """``value`` for a checkpoint: tensors on the CPU, each :class:`~lightning_lazy.diagnostics.FeatureSketch` as a
    plain ``{"sketch": values, "shape": shape}`` (see :func:`_restored`)."""
    if isinstance(value, Tensor):
        return value.to("cpu")
    if isinstance(value, diagnostics.FeatureSketch):
        return {"sketch": value.values.to("cpu"), "shape": tuple(value.shape)}
    if isinstance(value, dict):
        return {k: _saved(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_saved(v) for v in value]
    return value


def _restored(value: Any, device: Any) -> Any:
    """The inverse of :func:`_saved`, tensors on ``device`` (a sketch pickled whole by an older checkpoint too)."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict) and set(value) == {"sketch", "shape"}:
        value = diagnostics.FeatureSketch(value["sketch"], tuple(value["shape"]))
    if isinstance(value, diagnostics.FeatureSketch):
        return diagnostics.FeatureSketch(value.values.to(device), value.shape)
    if isinstance(value, dict):
        return {k: _restored(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_restored(v, device) for v in value]
    return value


__all__ = ["MEASURE_PARTS", "LazinessProbe", "ProbeMemoryError", "held_buffers", "layer_groups", "probe_numbers"]
