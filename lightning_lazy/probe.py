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
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_lazy import diagnostics
from lightning_lazy._forward_ad import forward_ad_safe
from lightning_lazy._params import functional_call, probe_mode
from lightning_lazy.scaling import as_regression_target

# ‖D²h‖ searches: at w0 one start, 2 alternation rounds of 8 Lanczos steps; then warm-started from the last
# direction, which 2 Lanczos steps follow along training. Measured on an MLP 3072-1024-1024-10 with 16 probe
# inputs (one thread, in plain training steps of batch 128): 31 steps for 12.82 where (12, 3, 2) takes 117
# for 13.60 (5.7 % more; the search returns a lower bound); a warm step then 5.8 steps, reaching 13.05.
CAREFUL_HESSIAN = {"max_iter": 8, "max_rounds": 2, "restarts": 1}
WARM_HESSIAN = {"max_iter": 2, "max_rounds": 1, "restarts": 1}


class LazinessProbe:
    """The laziness measures of ``network`` on the probe ``(x, y)``, against its weights now (w0).

    Args:
        network: a module mapping a probe batch ``x`` to one output tensor ``[N, ...]``.
        x: probe inputs ``[N, ...]``.
        y: probe targets, of the output's shape or class indices over its last dimension (one-hot encoded),
            or ``None`` (then y* = 0 and Δ is relative to ‖α h(w0)‖).
        kappa_probe_size / ntk_probe_size: the first examples used for κ and for the empirical NTK.
        measure_kappa / measure_ntk: compute those (the costliest measures) or not.

    Raises ``ValueError`` when the output has not one row per example, the targets do not fit the output,
    or the network has no parameter.
    """

    def __init__(self, network: nn.Module, x: Tensor, y: Tensor | None, *, kappa_probe_size: int = 16,
                 ntk_probe_size: int = 16, measure_kappa: bool = True, measure_ntk: bool = True) -> None:
        self.network = network
        self.kappa_probe_size, self.ntk_probe_size = kappa_probe_size, ntk_probe_size
        self.measure_kappa, self.measure_ntk = measure_kappa, measure_ntk
        self.initial = {name: p.detach().clone() for name, p in network.named_parameters()}
        if not self.initial:
            raise ValueError(f"{type(network).__name__} has no parameter to measure")
        self.x = x
        output = self.output(x, flatten=False)
        if y is None:
            y = torch.zeros_like(output)
        try:
            y = as_regression_target(output, y if not y.is_floating_point() else y.reshape(output.shape))
        except (ValueError, RuntimeError) as error:
            raise ValueError(f"the probe targets {tuple(y.shape)} do not fit the output {tuple(output.shape)}: "
                             f"{error}") from None
        self.y = y.reshape(len(x), -1)
        self.initial_output: Tensor = output.reshape(len(x), -1)
        self.initial_kernel: Tensor | None = None
        self.kernel_names: tuple[str, ...] = ()
        self.initial_kappa: float | None = None
        self.initial_jacobian_norm: float | None = None
        self.initial_kappa_parts: dict[str, float] | None = None
        self.initial_relu: list[Tensor] | None = None
        self.hessian_direction: Tensor | None = None
        self.hessian_names: tuple[str, ...] = ()
        self.timings: dict[str, dict[str, float]] = {}

    # ------------------------------------------------------------------------------------ the network

    def output(self, x: Tensor, flatten: bool = True) -> Tensor:
        """The network on ``x`` as the measures see it, no gradient: ``[N, K]`` (or its own shape)."""
        with torch.no_grad(), probe_mode(self.network), forward_ad_safe(self.network, "LazyTrainingMonitor"):
            output = self.network(x)
        if output.dim() == 0 or output.shape[0] != len(x):
            raise ValueError(f"the measures need one output row per example; the model returned "
                             f"{tuple(output.shape)} for {len(x)} inputs")
        return output.reshape(len(x), -1) if flatten else output

    def function(self) -> Callable[[dict[str, Tensor], Tensor], Tensor]:
        """The network as a functional model ``fn(params, x) -> [N, K]`` for :mod:`diagnostics`."""
        network = self.network

        def fn(params: dict[str, Tensor], x: Tensor) -> Tensor:
            with probe_mode(network), forward_ad_safe(network, "LazyTrainingMonitor"):
                output = functional_call(network, params, (x,))
            return output.reshape(len(x), -1)

        return fn

    def params(self, names: Sequence[str]) -> dict[str, Tensor]:
        """The current weights named ``names`` (detached)."""
        current = dict(self.network.named_parameters())
        return {name: current[name].detach() for name in names}

    def _timed(self, bucket: str, name: str, compute: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        result = compute()
        self.timings.setdefault(bucket, {})[name] = time.perf_counter() - started
        return result

    # ------------------------------------------------------------------------------------- at w0

    def measure_initial(self, names: Sequence[str]) -> None:
        """Measure at w0 what later values are compared with: ReLU states, κ(w0) and ‖Dh(w0)‖, the NTK.
        ``names``: the parameters to differentiate (those trained)."""
        started = time.perf_counter()
        self.timings["initial"] = {}
        self.initial_relu = self._timed("initial", "activation_states", lambda: self._relu_states(self.initial))
        names = tuple(names)
        if not names:
            raise ValueError("the model has no trainable parameter: nothing to measure")
        initial = {name: self.initial[name] for name in names}
        if self.measure_kappa:
            result = self._timed("initial", "kappa", lambda: self._kappa(initial, careful=True))
            self.initial_kappa = result.value.item()
            self.initial_jacobian_norm = result.jacobian_norm.item()
            self.initial_kappa_parts = {"kappa": self.initial_kappa, "jacobian_norm": self.initial_jacobian_norm,
                                        "hessian_norm": result.hessian_norm.item()}
        else:
            n = min(self.kappa_probe_size, len(self.x))
            self.initial_jacobian_norm = self._timed("initial", "jacobian_norm", lambda: diagnostics.jacobian_norm(
                self.function(), self.x[:n], initial, tol=1e-4).item())
        if self.measure_ntk:
            self.initial_kernel = self._timed("initial", "ntk", lambda: self.kernel(initial))
            self.kernel_names = names
        self.timings["initial"]["total"] = time.perf_counter() - started

    @property
    def laziness_horizon(self) -> float:
        """Normalized time at which the bound t̃²·κ(w0) reaches 1 (``inf`` when κ(w0) = 0)."""
        if self.initial_kappa is None:
            raise RuntimeError("the laziness horizon needs kappa(w0): it was not measured (measure_kappa=False)")
        return 1.0 / math.sqrt(self.initial_kappa) if self.initial_kappa > 0 else math.inf

    # ------------------------------------------------------------------------------------- now

    def _relu_states(self, params: dict[str, Tensor]) -> list[Tensor] | None:
        return diagnostics.relu_states(self.function(), self.x, params) or None

    def _kappa(self, params: dict[str, Tensor], careful: bool = False) -> diagnostics.Kappa:
        n = min(self.kappa_probe_size, len(self.x))
        names = tuple(params)
        if careful or self.hessian_direction is None or names != self.hessian_names:
            options = dict(CAREFUL_HESSIAN)
        else:
            options = {**WARM_HESSIAN, "start": self.hessian_direction}
        hessian, self.hessian_direction = diagnostics.hessian_norm(
            self.function(), self.x[:n], params, return_direction=True, **options
        )
        self.hessian_names = names
        return diagnostics.kappa(self.function(), self.x[:n], self.y[:n], params, jacobian_kwargs={"tol": 1e-3},
                                 hessian=hessian)

    def kernel(self, params: dict[str, Tensor]) -> Tensor:
        """The empirical NTK on the first ``ntk_probe_size`` examples. BatchNorm layers that normalize by batch
        statistics do so with the probe's statistics at ``params`` held fixed (the derivative through them is
        left out, as for a kernel taken in eval mode): examples then do not interact, and the kernel costs time
        linear in the probe size (structured derivatives) instead of quadratic. At fixed weights it is as fixed
        as every other measure."""
        x = self.x[: self.ntk_probe_size]
        statistics = self._batch_statistics(params, x)
        if not statistics:
            return diagnostics.empirical_ntk(self.function(), x, params=params)
        network, layers = self.network, [layer for layer, _ in statistics.values()]

        def fn(p: dict[str, Tensor], inputs: Tensor) -> Tensor:
            with probe_mode(network), forward_ad_safe(network, "LazyTrainingMonitor"):
                for layer in layers:
                    layer.training = False  # normalize by the running statistics given below
                tensors = {**p, **{name: value for _, buffers in statistics.values() for name, value in buffers}}
                output = functional_call(network, tensors, (inputs,))
            return output.reshape(len(inputs), -1)

        return diagnostics.empirical_ntk(fn, x, params=params)

    def _batch_statistics(self, params: dict[str, Tensor], x: Tensor) -> dict[str, tuple[nn.Module, list]]:
        """``{layer name: (layer, [(buffer name, batch mean / biased variance of its input on x)])}`` for the
        BatchNorm layers that use batch statistics in :func:`probe_mode` and keep running statistics."""
        layers = {name: m for name, m in self.network.named_modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.running_mean is not None}
        found: dict[str, tuple[nn.Module, list]] = {}

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

    def measure(self, names: Sequence[str], *, time: float = 0.0, twin: Any = None) -> dict[str, Any]:
        """The measures now, as floats, over the parameters ``names``.

        ``time``: Σ of the learning rates of the steps taken, times the objective's 1/α² (so that
        t̃ = time·‖Dh(w0)‖²). ``twin``: a :class:`~lightning_lazy.twin.TangentTwin` of the network, for Δ and
        the tangent gap. ``displacement_per_tensor`` is a dict of floats by tensor name.
        """
        names = tuple(names)
        params = self.params(names)
        initial = {name: self.initial[name] for name in names}
        timed = lambda name, compute: self._timed("last", name, compute)  # noqa: E731
        self.timings["last"] = {}
        normalized_time = time * self.initial_jacobian_norm**2
        values: dict[str, Any] = {"normalized_time": normalized_time}
        if self.initial_kappa is not None:
            values["bound"] = normalized_time**2 * self.initial_kappa
        moved = diagnostics.displacement(params, initial)
        if not math.isfinite(moved.total.item()):
            raise ValueError(
                "training has diverged: the weights hold NaN or inf, so no laziness measure is meaningful. Lower the "
                "learning rate (for AlphaScaled models the step that is stable is about 1/||Dh(w0)||^2 whatever alpha)"
            )
        values["displacement"] = moved.total.item()
        values["displacement_per_tensor"] = {name: float(v) for name, v in moved.per_tensor.items()}
        if twin is not None:
            x = self.x
            output = timed("output", lambda: self.output(x))
            tangent_output = timed("tangent_output", lambda: twin.probe_output(x).reshape(len(x), -1))
            values["divergence"] = diagnostics.path_divergence(output, tangent_output, self.y,
                                                               self.initial_output).item()
            twin_params = twin.parameters()
            gap = torch.sqrt(sum(((params[k] - twin_params[k]) ** 2).sum() for k in params))
            moved_norm = torch.sqrt(sum(v**2 for v in moved.absolute.values()))
            values["tangent_gap"] = (gap / moved_norm).item() if float(moved_norm) > 0 else 0.0
        if self.measure_kappa:
            if moved.total.item() == 0.0 and self.initial_kappa_parts is not None:
                # At w0 itself: the numbers measured there (a warm-started ‖D²h‖ search could refine its lower
                # bound, and κ would seem to move while the weights do not).
                values.update(self.initial_kappa_parts)
            else:
                result = timed("kappa", lambda: self._kappa(params))
                values.update(kappa=result.value.item(), jacobian_norm=result.jacobian_norm.item(),
                              hessian_norm=result.hessian_norm.item())
        if self.measure_ntk and self.initial_kernel is not None:
            if names != self.kernel_names:
                # Parameters were unfrozen: compare kernels over the same parameters, the new set at w0.
                self.initial_kernel, self.kernel_names = self.kernel(initial), names
            kernel = timed("ntk", lambda: self.kernel(params))
            values["ntk_distance"] = diagnostics.ntk_distance(kernel, self.initial_kernel).item()
            values["kernel_alignment"] = diagnostics.kernel_alignment(kernel, self.initial_kernel).item()
        if self.initial_relu is not None:
            now = timed("activation_stability", lambda: self._relu_states(params))
            values["activation_stability"] = _stability(now, self.initial_relu)
        return values

    # ------------------------------------------------------------------------------------- state

    _STATE = ("initial", "x", "y", "initial_output", "initial_kernel", "kernel_names", "initial_kappa",
              "initial_jacobian_norm", "initial_kappa_parts", "initial_relu", "hessian_direction", "hessian_names")

    def state_dict(self) -> dict[str, Any]:
        return {key: _to_device(getattr(self, key), "cpu") for key in self._STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = next(iter(self.initial.values())).device
        for key in self._STATE:
            value = state[key]
            setattr(self, key, tuple(value) if key.endswith("names") else _to_device(value, device))


def _stability(now: list[Tensor] | None, then: list[Tensor]) -> float:
    if now is None or len(now) != len(then) or any(a.shape != b.shape for a, b in zip(now, then)):
        raise ValueError("the model applied a different sequence of ReLUs now and at w0")
    same = sum(int((a == b).sum()) for a, b in zip(now, then))
    return same / sum(a.numel() for a in then)


def _to_device(value: Any, device: Any) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    return value


__all__ = ["LazinessProbe"]
