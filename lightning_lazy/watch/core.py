"""LazinessWatch: the monitor itself, framework-neutral. Adapters translate their framework's events into its calls.

It owns the small objects that hold the state (the :class:`~lightning_lazy.watch.twin.TangentTwin`, the
:class:`~lightning_lazy.watch.probe.LazinessProbe`, the :class:`~lightning_lazy.watch.schedule.Schedule`, the
writers), and decides once, for every adapter, what is measured, when, and where it is written. What a framework
provides (the processes, the loggers, the data) comes through a :class:`Host`; the default is a single process
writing to ``log_dir``, which is what a plain PyTorch loop or Lightning Fabric needs::

    watch = LazinessWatch(model, optimizer, loss="mse", probe=(x_probe, y_probe), log_dir="runs/exp")
    for x, y in loader:
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        watch.batch(x, y)        # once per iteration, after backward, before optimizer.step()
        optimizer.step()         # the twin steps with it; at log steps the watch measures
    watch.measure()
    print(watch.summary())
    watch.close()                # laziness.png, layers.png, lazy_summary.txt in log_dir
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_lazy._forward_ad import as_forward_ad_error
from lightning_lazy._inputs import as_inputs, inputs_to, num_examples, take
from lightning_lazy._optim import adaptive_optimizer, step_size
from lightning_lazy._params import tensor_fingerprints
from lightning_lazy.scaling import IGNORE_INDEX
from lightning_lazy.watch.batches import (WatchError, default_batch_to_xy, is_causal_lm, read_batch, self_labelled,
                                          shift_labels)
from lightning_lazy.watch.cost import MeasurementCost
from lightning_lazy.watch.objective import Objective, resolve_objective, resolve_watched
from lightning_lazy.watch.options import Measure, Watch, WatchOptions, When, Write
from lightning_lazy.watch.probe import MEASURE_PARTS, LazinessProbe, ProbeMemoryError
from lightning_lazy.watch.schedule import FULL, Budget, Schedule
from lightning_lazy.watch.twin import _ABSENT, TangentTwin, TwinError, Watched, undo

_log = logging.getLogger("lightning_lazy")

class Host:
    """What the framework around a :class:`LazinessWatch` provides. This default is one process, no framework:
    messages through :mod:`warnings` and the ``lightning_lazy`` logger, scalars and figures to ``writers``."""

    who = "LazinessWatch"

    def __init__(self, writers: Sequence[Any] = (), log_folder: str | None = None) -> None:
        self.writers = _group(writers, self)
        self.log_folder = log_folder

    @property
    def is_global_zero(self) -> bool:
        return True

    @property
    def world_size(self) -> int:
        return 1

    def reduce_sum(self, tensor: Tensor) -> Tensor:
        """Σ over processes."""
        return tensor

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process."""
        return obj

    def warn(self, message: str) -> None:
        warnings.warn(message, UserWarning, stacklevel=3)

    def info(self, message: str) -> None:
        if not _log.handlers and not logging.getLogger().handlers:
            _log.addHandler(logging.StreamHandler())
            _log.setLevel(logging.INFO)
        _log.info(message)

    def log_scalars(self, scalars: Mapping[str, float], step: int, epoch_end: bool) -> None:
        """Scalars measured after ``step`` optimizer steps (``epoch_end``: at the end of an epoch)."""
        if self.is_global_zero:
            self.writers.scalars(scalars, step)

    def log_again_at_epoch_end(self, scalars: Mapping[str, float], step: int) -> None:
        """An epoch ends at a step already measured (and logged): the writers have these values at this step already;
        a framework that keeps epoch-end values apart (Lightning's ``callback_metrics``) logs them again."""

    def convert(self, batch: Any) -> Any:
        """The batch as the training step sees it (a precision plugin's conversion)."""
        return batch

    def probe_source(self) -> Any:
        """Where to draw the default probe from: a ``DataLoader``, a ``Dataset``, or ``None``."""
        return None

    def validation_batches(self) -> Iterable[Any] | None:
        """The validation data, batch by batch (for the kernel baseline), or ``None``."""
        return None


class LazinessWatch:
    r"""Trains a linearized twin in lock-step with ``model`` and measures how lazy its training is (Chizat, Oyallon
    & Bach 2019), in any training loop.

    Args:
        model: the network (any ``nn.Module``; a Lightning Fabric ``fabric.setup`` module is read through). ``model=``
            among the options picks a sub-module (attribute path) or ``callable(model, x)``.
        optimizer: the optimizer that steps the model (any ``torch.optim.Optimizer``, a Fabric-wrapped one
            included); ``None`` with ``track_tangent=False``.
        loss, alpha, output, batch_to_xy, track_tangent: what to watch (:class:`~lightning_lazy.watch.options.Watch`).
        probe, probe_size, kappa_probe_size, ntk_probe_size, ntk_outputs, measure_kappa, measure_ntk, per_layer,
            layer_probe_size, max_layers, kernel_baseline: what to measure
            (:class:`~lightning_lazy.watch.options.Measure`). ``probe`` is ``(x, y)``, ``x``, a Hugging Face batch, or
            a ``Dataset`` / ``DataLoader`` to draw ``probe_size`` examples from; without one, the first batch
            given to :meth:`batch` is the probe.
        log_steps, every_n_epochs, budget: when (:class:`~lightning_lazy.watch.options.When`): measurements after
            the optimizer steps ``log_steps`` (1, 2, 4, 8, ... by default) and at :meth:`epoch_end` calls, kept to
            ``budget`` (default 0.05) of the run's wall time by leaving out their costliest parts or whole ones
            (:class:`~lightning_lazy.watch.schedule.Budget`; ``None``: all of them, whole), and, whole, at w0, at
            :meth:`measure` and at :meth:`close`.
        figure, log_dir, writers: where (:class:`~lightning_lazy.watch.options.Write`): scalars, the figures and
            the summary to ``writers``, by default a TensorBoard event file and ``lazy_metrics.csv`` in ``log_dir``.
        clip: ``clip(optimizer)``, what the loop does to the gradients between backward and step (e.g.
            ``lambda opt: torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)``),
            replayed on the twin's; a gradient changed otherwise stops the twin (it says so).
        watch, measure, when, write: the four groups of options, instead of the flat keywords.

    Call :meth:`batch` once per iteration, after ``loss.backward()`` and before ``optimizer.step()`` (with gradient
    accumulation: after each backward). The twin steps when the optimizer steps (a hook on its ``step()``) and is
    cleared when the optimizer's ``zero_grad()`` runs. The measurements (:attr:`history`, one dict per
    measurement) are those of :class:`~lightning_lazy.callback.LazyTrainingMonitor`: ``divergence``, ``kappa``,
    ``jacobian_norm``, ``hessian_norm``, ``displacement``, ``tangent_gap``, ``ntk_distance``,
    ``kernel_alignment``, ``activation_stability``, ``normalized_time``, ``bound``, the NTK's spectrum, and per
    layer in :attr:`layer_history`.

    Never a wrong number: at the first batch the twin's gradient at w0 is compared with the model's (they are
    equal when the twin trains on the loss you train with); where they differ, or the loop does something the twin
    cannot replay, it warns once, naming the cause and the way out, and stops reporting Δ, the tangent gap and the
    tangent losses; the other measures go on.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 options: WatchOptions | None = None, host: Host | None = None,
                 clip: Callable[[torch.optim.Optimizer], Any] | None = None,
                 reduce_gradients: Callable[[Tensor], Tensor] | None = None,
                 unscale: Callable[[], Tensor] | None = None, infer_loss_weight: bool = True,
                 watch: Watch | None = None, measure: Measure | None = None, when: When | None = None,
                 write: Write | None = None, **flat: Any) -> None:
        if options is None:
            options = WatchOptions.build({"watch": watch, "measure": measure, "when": when, "write": write}, **flat)
        self.options = options
        self.host = host if host is not None else self._default_host()
        self.who = self.host.who
        self.batch_to_xy = options.watch.batch_to_xy or default_batch_to_xy
        self.schedule = Schedule(options.when.log_steps, options.when.every_n_epochs)
        self.budget = Budget(options.when.budget)
        module = _unwrap_module(model)
        # Every object whose zero_grad() clears the real gradients: the optimizer, its wrappers, the model.
        self._clearers = [o for o in (optimizer, _unwrap_optimizer(optimizer), model, module) if o is not None]
        optimizer = _unwrap_optimizer(optimizer)
        self._objective, self._loss_scale = resolve_objective(module, options.watch.loss, options.watch.alpha,
                                                              self.who)
        self._watched: Watched = resolve_watched(module, options.watch.model, options.watch.output, self.who)
        self._causal_lm = is_causal_lm(self._watched.inner)
        self.optimizer = optimizer
        self.twin: TangentTwin | None = None
        self._adaptive = adaptive_optimizer(optimizer) if optimizer is not None else None
        if options.watch.track_tangent:
            if optimizer is None:
                raise WatchError(f"{self.who} needs the optimizer to train its tangent twin: pass it, or "
                                 "track_tangent=False to keep the other measures")
            if isinstance(optimizer, torch.optim.LBFGS):
                raise WatchError(f"{self.who} cannot follow LBFGS: it re-evaluates its closure several times per "
                                 "step. Use a first-order optimizer, or track_tangent=False to keep the other measures.")
            try:
                self.twin = TangentTwin(self._watched, optimizer, self._objective, clip=clip,
                                        reduce_gradients=reduce_gradients, unscale=unscale, on_lost=self.twin_lost)
            except TwinError as error:
                raise WatchError(f"{self.who}: {error} (track_tangent=False)") from None
        self._infer_loss_weight = infer_loss_weight
        self._names = {id(p): name for name, p in self._watched.named_parameters()}
        self._trained: set[str] = set()
        if optimizer is not None:
            self._trained |= {self._names[id(p)] for g in optimizer.param_groups for p in g["params"]
                              if p.requires_grad and id(p) in self._names}
        self._handles: list[Any] = []
        self._patched: list[tuple[Any, str, Any]] = []
        self.measures: LazinessProbe | None = None
        # Σ learning rates of the real steps taken; None where the step size is not known (no optimizer given).
        self._time: float | None = 0.0 if optimizer is not None else None
        self.steps = 0
        self.epoch = 0
        self.history: list[dict[str, float]] = []
        self.layer_history: list[dict[str, Any]] = []
        self.kernel_baseline_values: dict[str, float] | None = None
        self._last_per_tensor: dict[str, float] = {}
        self._labels: dict[str, str] = {}  # short layer / parameter name -> label with its type, for people
        self._last_scalars: tuple[Any, dict[str, float]] = (None, {})
        self._last_plan: tuple[str, ...] = FULL  # the parts the last measurement left out
        self._drawn = 0
        self._draw_seconds = 1.0
        self._drawn_at = time.perf_counter()
        self._twin_loss_sum = self._real_loss_sum = 0.0
        self._twin_loss_count = 0
        self._last_train_loss: float | None = None
        self._last_twin_train_loss: float | None = None
        self._eval = [0.0, 0.0, 0, False]  # loss R · examples, correct, examples, classification
        self._weight = 1.0  # the twin's loss weight per backward (1/k when the loop divides its loss by k)
        self._checked = False  # the objective at w0, compared once
        self._pending_check = False
        self._cost = MeasurementCost()
        self._closed = False
        self._writers_set_up = False
        self._grads_at_step: list[tuple[Any, int] | None] | None = None
        # A plain loop (no host): the watch counts the network's training forwards and batch() calls between steps
        # (a batch the twin never saw would make its path another), and times the steps (the cost advice).
        self._plain = host is None
        self._forwards = self._batches = 0
        self._measuring = False
        if host is None:  # a plain loop: follow the optimizer from now on, and the first forward's random numbers
            self.start()
            self.arm()

    # ------------------------------------------------------------------------------------------ setup

    def _default_host(self) -> Host:
        from lightning_lazy.watch.writers import writers_for_folder

        write = self.options.write
        if write.writers is not None:
            return Host(list(write.writers), write.log_dir)
        return Host(writers_for_folder(write.log_dir, warn=_warn) if write.log_dir else [], write.log_dir)

    def start(self, extra_zero_grad: Sequence[Any] = ()) -> None:
        """Hook the optimizer: count its steps (normalized time), let the twin follow them, and clear the twin's
        gradients when the optimizer's (or a wrapper's in ``extra_zero_grad``) ``zero_grad()`` runs."""
        self.release()
        twin = self.following_twin()
        if twin is not None:
            twin.follow()  # its step hook first: a measurement after the step sees the twin stepped too
            for obj in {id(o): o for o in (*self._clearers, *extra_zero_grad) if o is not None}.values():
                self._patch_zero_grad(obj)
        if self.optimizer is not None:
            self._handles = [self.optimizer.register_step_post_hook(self._on_real_step)]
        if self._plain and twin is not None:
            self._handles.append(self._watched.inner.register_forward_pre_hook(self._count_forward))
        self._setup_writers()

    def _count_forward(self, module: nn.Module, args: Any) -> None:
        if not self._measuring and module.training and torch.is_grad_enabled():
            self._forwards += 1

    def set_writers(self, writers: Sequence[Any], set_up: bool = False) -> None:
        """Where scalars (for hosts without their own logging), figures and the summary go from now on; ``set_up``:
        they were set up already (the same writers handed to a rebuilt watch), so their layout is not written again."""
        self.host.writers = _group(writers, self.host)
        self._writers_set_up = set_up
        self._setup_writers()

    def _setup_writers(self) -> None:
        """Set the writers up once, on the first process (TensorBoard's custom-scalars layout, W&B's step axis)."""
        if self.host.is_global_zero and not self._writers_set_up:
            self._writers_set_up = True
            self.host.writers.setup()

    def _patch_zero_grad(self, obj: Any) -> None:
        original = obj.zero_grad
        twin = self.twin

        @functools.wraps(original)
        def zero_grad(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            twin.zero_grad()
            self._grads_at_step = None  # cleared where the twin saw it
            return result

        self._patched.append((obj, "zero_grad", vars(obj).get("zero_grad", _ABSENT)))
        obj.zero_grad = zero_grad

    def release(self) -> None:
        """Remove every hook and wrapper on the optimizer and the network (the run goes on untouched)."""
        undo(self._handles, self._patched)
        self._handles, self._patched = [], []
        if self.twin is not None:
            self.twin.release()

    # ------------------------------------------------------------------------------------- the twin

    def following_twin(self) -> TangentTwin | None:
        """The twin while it follows the real run; ``None`` without one or once it has lost the run."""
        return self.twin if self.twin is not None and self.twin.lost is None else None

    def twin_lost(self, cause: str, remedy: str = "Switch it off while monitoring to keep the divergence.",
                  measuring: bool = False) -> None:
        """The twin cannot follow what the real run did (``cause``; ``remedy``: what the user can do): warn once, and
        stop reporting the twin-based measures (Δ, tangent gap, tangent losses); the others go on. Found while
        ``measuring`` (after the last step), nothing is reported from this step on; found during the run, from the
        step under way. Never a wrong number: rather than a divergence from a path the real run did not take, none."""
        if self.twin is None or self.twin.lost is not None:
            return
        if self._plain and "Trainer(" in remedy:  # the twin's advice names Lightning's ways; a plain loop has its own
            remedy = ("Give the loop's clipping as LazinessWatch(clip=lambda opt: ...), call watch.batch(x, y) right "
                      "after backward, and leave the gradients and weights as they are otherwise.")
        self.twin.lose(cause, self.steps if measuring else self.steps + 1, remedy)
        self._twin_loss_sum, self._real_loss_sum, self._twin_loss_count = 0.0, 0.0, 0
        self._last_twin_train_loss = self._last_train_loss = None
        self.warn_lost()

    def warn_lost(self) -> None:
        self.host.warn(
            f"{self.who}: {self.twin.lost}; lazy/divergence, lazy/tangent_gap and lazy/tangent/* are no longer "
            f"logged from step {self.twin.lost_at}. {self.twin.lost_remedy}"
        )

    def agree(self) -> None:
        """Under several processes, the twin is lost on every one as soon as it is on one (a collective: every
        process calls it at the same points), so that all log the same keys."""
        if self.host.world_size <= 1 or self.twin is None:
            return
        lost = torch.tensor([0.0 if self.twin.lost is None else 1.0], dtype=torch.float64,
                            device=next(self._watched.parameters()).device)
        if float(self.host.reduce_sum(lost)) > 0 and self.twin.lost is None:
            self.twin_lost("the tangent twin of another process stopped following its run (that process's warning "
                           "names the cause)", "See the first process's warning for the way out.", measuring=True)

    def check_twin(self) -> None:
        """Ask the twin whether the real run did something it cannot follow since the last check."""
        twin = self.following_twin()
        if twin is not None and (found := twin.check()) is not None:
            self.twin_lost(*found, measuring=True)

    def arm(self) -> None:
        """A training batch is about to run its forward: the twin takes the random-number state it starts from."""
        if self.following_twin() is not None:
            self.twin.arm()

    def read(self, batch: Any) -> tuple[Any, Any, dict]:
        """``(x, y, loss_kwargs)`` of a batch as the training step sees it; a causal LM's own tokens as labels are
        shifted as the model shifts them inside its loss."""
        x, y, extra = read_batch(self.batch_to_xy, self.host.convert(batch))
        if self.batch_to_xy is default_batch_to_xy and self._causal_lm and self_labelled(x, y):
            y = shift_labels(y)
        return x, y, extra

    def accumulate(self, x: Any, y: Any, extra: Mapping[str, Any] | None = None, *, weight: float = 1.0,
                   real_loss: float | None = None, precision: str = "32") -> float | None:
        """Back-propagate the twin's loss on the batch ``(x, y)`` the real loss was (or is about to be)
        back-propagated on, times ``weight`` (1/k under Lightning's accumulation of k batches); ``real_loss``: the
        loss the real step computed on it, unscaled, compared at w0 at the tolerance of ``precision``. Returns the
        twin's loss (unweighted), ``None`` without a following twin."""
        twin = self.following_twin()
        if twin is None:
            return None
        self._last_weight = weight * self._weight
        try:
            twin_loss = float(twin.accumulate(x, y, extra, weight=self._last_weight))
        except TwinError as error:  # the twin's backward reached a real gradient: refuse before it changes the run
            raise WatchError(f"{self.who}: {error} (track_tangent=False)") from None
        except (RuntimeError, NotImplementedError) as error:
            one_line = as_forward_ad_error(error, f"{self.who}, the tangent twin's backward")
            if one_line is None:
                raise
            raise one_line from None
        self._twin_loss_sum += twin_loss / self._loss_scale
        self._twin_loss_count += 1
        if real_loss is not None:
            self._real_loss_sum += real_loss / self._loss_scale
        if not self._checked and self.steps == 0:
            self._checked = True
            self._pending_check = True
            tolerance = _tolerance(precision, self._dtype())
            ratio = real_loss / twin_loss if real_loss is not None and twin_loss else None
            divided = (self._infer_loss_weight and ratio is not None and 0 < ratio < 1
                       and 2 <= round(1 / ratio) <= 4096 and abs(ratio * round(1 / ratio) - 1) <= tolerance)
            if real_loss is not None and not divided and not self._close(real_loss, twin_loss, tolerance):
                shifted = self._shifted_loss(x, y, extra, real_loss, tolerance)
                if shifted is not None:
                    twin_loss = shifted
                else:
                    self._objective_differs(f"its loss on the first batch is {twin_loss:.6g}, the training step's "
                                            f"{real_loss:.6g}", x)
        return twin_loss

    def _shifted_loss(self, x: Any, y: Any, extra: Mapping[str, Any] | None, real_loss: float,
                      tolerance: float) -> float | None:
        """A language model trained on its own tokens, read unshifted: when the shifted labels give the loss the
        training step computed, the twin's batch is taken again with them, and every later batch is shifted
        (the model shifts its labels inside its loss). Returns the twin's loss then, else ``None``."""
        if self.batch_to_xy is not default_batch_to_xy or not self_labelled(x, y):
            return None
        twin, shifted = self.twin, shift_labels(y)
        with torch.no_grad(), (twin._rng.replay() if twin._rng is not None else contextlib.nullcontext()):
            loss = float(self._objective(twin.forward(x), shifted, **(extra or {})))
        if not self._close(real_loss, loss, tolerance):
            return None
        twin.zero_grad()  # the unshifted batch is the only one in the twin's gradients: take it again, shifted
        self._causal_lm = True
        loss = float(twin.accumulate(x, shifted, extra, weight=self._last_weight))
        self._twin_loss_sum = loss / self._loss_scale
        self.host.info(f"{self.who}: the labels are the input tokens, and the training step's loss is the one of the "
                       "next tokens: the monitor shifts them as the model does.")
        return loss

    def check_gradients(self, precision: str = "32", scale: float = 1.0, clip_norm: float | None = None) -> None:
        """Right after the real backward of the first batch (the twin accumulated the same batch): at w0 the twin is
        the network, so their gradients must agree, at the tolerance of ``precision`` (``scale``: the real
        gradients' loss scale, AMP's; ``clip_norm``: the real ones were already clipped to that total norm). Where
        the real gradient is a constant multiple 1/k of the twin's (a loop dividing its loss by k for accumulation)
        and ``infer_loss_weight``, the twin takes that weight."""
        if not self._pending_check:
            return
        self._pending_check = False
        twin = self.following_twin()
        if twin is None or self.host.world_size > 1:  # under DDP the real gradients are averaged before any step
            return
        if twin._backward_hooked() or any(getattr(real, "_backward_hooks", None) for real, _ in twin._param_pairs):
            return  # hooks that edit gradients in backward: the twin reports them, by name, before the step
        reals, mine = [], []
        for real, copy in twin._param_pairs:
            if real.grad is not None and copy.grad is not None and real.grad.shape == copy.grad.shape:
                reals.append(_dense(real.grad).double().reshape(-1) / scale)
                mine.append(_dense(copy.grad).double().reshape(-1))
        if not reals:
            return
        g, t = torch.cat(reals), torch.cat(mine)
        tt = float(t @ t)
        if tt == 0.0 and float(g @ g) == 0.0:
            return
        ratio = float(g @ t) / tt if tt > 0 else math.inf
        residual = float((g - ratio * t).norm()) / max(float(g.norm()), 1e-300) if math.isfinite(ratio) else math.inf
        tolerance = _tolerance(precision, self._dtype())
        expected = 1.0 if clip_norm is None else min(1.0, clip_norm / max(math.sqrt(tt), 1e-300))
        if residual <= tolerance and abs(ratio - expected) <= tolerance * expected:
            return
        k = round(1.0 / ratio) if ratio > 0 and math.isfinite(ratio) else 0
        if self._infer_loss_weight and residual <= tolerance and 2 <= k <= 4096 and abs(ratio * k - 1.0) <= tolerance:
            self._weight = 1.0 / k  # the loop divides its loss by k (accumulation): so does the twin from now on
            with torch.no_grad():
                for _, copy in twin._param_pairs:
                    if copy.grad is not None:
                        copy.grad.mul_(1.0 / k)
            self.host.info(f"{self.who}: the training loss is divided by {k} (gradient accumulation): the tangent "
                           f"twin's is too.")
            return
        what = (f"its gradient at w0 differs from the model's by {residual:.3g} relative" if residual > tolerance else
                f"its gradient at w0 is {1 / ratio:.4g} times the model's")
        self._objective_differs(what, None)

    def _objective_differs(self, what: str, x: Any) -> None:
        hint = ""
        if isinstance(x, Mapping) and "input_ids" in x and self.batch_to_xy is default_batch_to_xy:
            hint = (" For a causal LM whose labels are its input tokens, pass "
                    "batch_to_xy=lightning_lazy.watch.batches.causal_lm_batch_to_xy.")
        self.twin_lost(
            f"the tangent twin trains on another objective than yours ({what}), so its divergence would not be "
            "meaningful",
            "Pass the loss you train with: loss=callable(output, y) (including any 1/alpha^2 factor through alpha=), "
            "or the model/output/batch_to_xy your training step uses." + hint,
        )

    @staticmethod
    def _close(a: float, b: float, tolerance: float) -> bool:
        return math.isclose(a, b, rel_tol=tolerance, abs_tol=tolerance * 1e-3)

    def _dtype(self) -> torch.dtype:
        params = list(self._watched.parameters())
        return params[0].dtype if params and params[0].is_floating_point() else torch.float32

    def _on_real_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        stepped = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not stepped:
            return  # step() with no gradient (a skipped batch): nothing moved
        lr = step_size(optimizer)
        if lr is None and self._time is not None:
            self._time = None
            self.host.warn(f"{self.who}: {type(optimizer).__name__} takes steps of its own size (its learning rate is "
                           f"{optimizer.param_groups[0].get('lr')!r}), so normalized time and the bound are not "
                           "reported; every other measure is.")
        elif self._time is not None:
            self._time += lr
        if self._plain:
            self._check_batches_seen()
            self.step_ended()  # a plain loop's step: from after the last measurement to this step
        self.steps += 1
        self._trained.update(self._names[id(p)] for p in stepped if id(p) in self._names)
        if self.twin is not None:
            # Weak references, not ids: a tensor made after the old one died may reuse its id.
            self._grads_at_step = [None if r.grad is None else (weakref.ref(r.grad), r.grad._version)
                                   for r, _ in self.twin._param_pairs]
        self.on_step_taken()

    def on_step_taken(self) -> None:
        """After each real optimizer step (default: measure at the log steps, then let the twin take the next
        forward's random numbers). Adapters that measure on their own events replace it."""
        if self.measures is not None and self.schedule.is_log_step(self.steps):
            self.measure_and_log(self.steps, on_step=True)
        if self._plain:
            self.step_started()  # the next step's time starts after this measurement
        self.arm()

    def _check_batches_seen(self) -> None:
        """At a real step of a plain loop: the twin must have seen every training forward since the last step through
        :meth:`batch`, else its path is another than the network's (a batch it never trained on)."""
        forwards, batches = self._forwards, self._batches
        self._forwards = self._batches = 0
        if self.following_twin() is not None and forwards > batches:
            self.twin_lost(f"the network ran {forwards} training forward(s) since the last step but batch() was "
                           f"called {batches} time(s), so the tangent twin missed a batch the network trained on",
                           "Call watch.batch(x, y) once after each backward, before optimizer.step().")

    # ------------------------------------------------------------------------------- the plain loop

    def batch(self, x: Any, y: Any = None, loss_kwargs: Mapping[str, Any] | None = None, *,
              loss: Tensor | float | None = None) -> None:
        """The iteration's batch, after ``loss.backward()`` and before ``optimizer.step()`` (after each backward
        under gradient accumulation). ``x`` may also be a whole batch (``batch_to_xy`` reads it) with ``y=None``;
        ``loss``: the loss you back-propagated, compared with the twin's at w0. At the first call, the probe is
        drawn and the network measured at w0 (it has not stepped yet)."""
        if self._closed:
            raise WatchError(f"{self.who} was closed: make a new one to watch another run")
        x, y, extra = self.read(x) if y is None else (x, y, dict(loss_kwargs or {}))
        if self.measures is None:
            self.start_measuring(first_batch=(x, y))
        real = None if loss is None else float(loss.detach() if isinstance(loss, Tensor) else loss)
        self._batches += 1
        self._follow_unseen_clearing()
        self.accumulate(x, y, extra, real_loss=real)
        if self.following_twin() is not None:
            self.twin.gradients_produced()
        self.check_gradients()
        self.arm()

    def _follow_unseen_clearing(self) -> None:
        """The first backward since the last step has run: if the real gradients were cleared by something the twin
        did not see (``p.grad = None``, a wrapper's own ``zero_grad``), clear the twin's too. Seen from the
        gradient tensors: a new one (set to ``None``, then made by backward), or one written twice (zeroed in place,
        then accumulated into) where accumulation alone writes once."""
        recorded, self._grads_at_step = self._grads_at_step, None
        twin = self.following_twin()
        if recorded is None or twin is None:
            return
        for (real, _), then in zip(twin._param_pairs, recorded):
            grad = real.grad
            if then is None or grad is None:
                continue
            if then[0]() is not grad or grad._version - then[1] >= 2:
                twin.zero_grad()
                return

    def epoch_end(self, epoch: int | None = None) -> None:
        """An epoch ended: the epoch's mean tangent training loss; a measurement every ``every_n_epochs``."""
        self.epoch = self.epoch + 1 if epoch is None else epoch + 1
        loss = self.end_epoch_losses()
        if loss is not None:
            self.host.log_scalars({"lazy/tangent/train_loss": loss}, self.steps, epoch_end=True)
        if self.epoch % self.schedule.every_n_epochs == 0:
            self.measure_and_log(self.steps, on_step=False)

    def measure(self) -> dict[str, Any]:
        """A measurement now, logged and added to :attr:`history` (the same as the last one when the network has
        not changed since); returns its values."""
        if self.measures is None:
            raise WatchError(f"{self.who}.measure needs the probe: call batch() once first (it measures at w0)")
        self.measure_and_log(self.steps, on_step=False, forced=True)
        self.arm()
        return dict(self.history[-1]) if self.history else {}

    def measured_whole(self, step: int) -> bool:
        """Whether the last measurement was after ``step`` optimizer steps and in full (not thinned by the budget)."""
        return bool(self.history) and self.history[-1]["step"] == float(step) and self._last_plan == FULL

    def close(self) -> None:
        """The final measurement, the summary and the figures to the writers; the hooks removed (the model and the
        optimizer are left as they are)."""
        if self._closed:
            return
        if self.measures is not None and not self.measured_whole(self.steps):  # the end state, whole
            self.measure_and_log(self.steps, on_step=False, forced=True)
        self.finish(self.steps)
        self.release()
        self.host.writers.close()
        self._closed = True

    def __enter__(self) -> LazinessWatch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------------------------ measuring

    def start_measuring(self, first_batch: tuple[Any, Any] | None = None) -> None:
        """Draw the probe and measure at w0 (before the first step: by then the loop has set the modes it trains in)."""
        self.budget.start()
        started = time.perf_counter()
        self._measuring = True
        try:
            self._start_measuring(first_batch)
        finally:
            self._measuring = False
            self.budget.spend(time.perf_counter() - started, FULL, self._part_seconds("initial"), forced=True)
            if self._plain:
                self.step_started()

    def _start_measuring(self, first_batch: tuple[Any, Any] | None) -> None:
        self.measures = self._make_probe(first_batch)
        try:
            self.measures.measure_initial(self.measured_names())
        except ValueError as error:
            raise WatchError(f"{self.who}: {error}") from None
        if self.measures.initial_relu is None:
            self._warn_no_activation_stability()
        if self.options.measure.kernel_baseline:
            self._fit_kernel_baseline()
        alpha = self._loss_scale ** -0.5
        if self.initial_kappa is not None and self._adaptive is not None:
            self.host.info(
                f"{self.who}: alpha = {alpha:g}, kappa(w0) = {self.initial_kappa:.4g}; the bound t~^2 kappa(w0) and "
                f"its horizon hold for gradient descent (SGD, with or without momentum), not for {self._adaptive}: "
                "neither is stated, the measures are."
            )
        elif self.initial_kappa is not None:
            self.host.info(
                f"{self.who}: alpha = {alpha:g}, ||Dh(w0)|| = {self.initial_jacobian_norm:.4g}, kappa(w0) = "
                f"{self.initial_kappa:.4g}; the bound t~^2 kappa(w0) reaches 1 at normalized time t~ = "
                f"{self.laziness_horizon:.4g}: the predicted laziness horizon."
            )

    def _warn_no_activation_stability(self) -> None:
        from lightning_lazy.diagnostics import recording_activation_states

        with recording_activation_states() as states:  # one forward of a few probe points, once
            self.measures.output(take(self.measures.x, slice(0, 8)))
        found = (f"its activations ({', '.join(states.smooth)}) are smooth, with no linear pieces for a unit to "
                 "switch between" if states.smooth else "it applies no activation the monitor recognizes")
        self.host.warn(
            f"{self.who}: the model has no piecewise-linear unit (ReLU, ReLU6, LeakyReLU, Hardtanh, "
            f"Hardswish, ...): {found}, so lazy/activation_stability is not logged. Read how far each layer's "
            "features moved instead: lazy/layers/<module>/feature_movement (and lazy/kernel_alignment)."
        )

    def measured_names(self) -> tuple[str, ...]:
        """Parameters the measures differentiate: those trainable now or at any point of the run."""
        trainable = self.measures.trainable_names()  # by identity: a renamed parameter keeps its name at w0
        return tuple(name for name in self.measures.initial if name in trainable | self._trained)

    def values(self, plan: tuple[str, ...] = FULL) -> dict[str, Any]:
        """The measures now, as floats (``displacement_per_tensor``: by tensor name; per layer as
        ``"layers/<layer>/<measure>"``), without adding them to the history; ``plan``: the parts left out (of
        :data:`~lightning_lazy.watch.probe.MEASURE_PARTS`; the budget's plan,
        :class:`~lightning_lazy.watch.schedule.Budget`)."""
        if self.measures is None:
            raise WatchError(f"{self.who}.measure needs the probe: training has not started")
        self.check_twin()
        time_ = None if self._time is None else self._time * self._loss_scale
        try:
            parts = {part: False for part in plan}
            values = self.measures.measure(self.measured_names(), time=time_, twin=self.following_twin(),
                                           **({"parts": parts} if parts else {}))
        except ValueError as error:  # a parameter replaced, or weights gone to NaN: one line
            raise WatchError(f"{self.who}: {error}") from None
        if self._adaptive is not None or self._time is None:
            values.pop("bound", None)  # the theorem behind it speaks of gradient descent only
        per_tensor = values["displacement_per_tensor"]
        short = self._short_names(per_tensor)
        values["displacement_per_tensor"] = {short[k]: v for k, v in per_tensor.items()}
        layers = values.pop("layers", {})
        short = self._short_names(layers, modules=True)
        for layer, measures in layers.items():
            values.update({f"layers/{short[layer]}/{name}": value for name, value in measures.items()})
        return values

    def _short_names(self, names: Iterable[str], modules: bool = False) -> dict[str, str]:
        """Module (``modules``) or parameter names in the watched network as the user's network names them
        (:func:`~lightning_lazy.watch.naming.layer_names`: wrappers left out), and each one's label with its type,
        kept for the figures and the summary."""
        from lightning_lazy.watch.naming import layer_labels, layer_names, parameter_labels

        names = list(names)
        if modules:
            short, labels = layer_names(self._watched, names), layer_labels(self._watched, names)
        else:
            owners = {name: name.rpartition(".")[0] for name in names}
            module_short = layer_names(self._watched, owners.values())
            short = {name: (name.rpartition(".")[2] if module_short[owner] == "root" else
                            f"{module_short[owner]}.{name.rpartition('.')[2]}") for name, owner in owners.items()}
            labels = parameter_labels(self._watched, names)
        self._labels.update({short[name]: labels.get(name, short[name]) for name in names})
        return short

    def measure_and_log(self, step: int, on_step: bool, epoch: int | None = None,
                        forced: bool = False) -> dict[str, float] | None:
        """Measure after ``step`` optimizer steps, add to the history, hand the scalars to the host; returns them
        (``None`` before the measurement at w0, or when the budget leaves this one out). The network measured last,
        unchanged, is not measured again. A scheduled measurement (not ``forced``) keeps within the budget."""
        if self.measures is None:
            return None
        self.agree()
        plan = FULL if forced else self.budget.plan()
        if plan is None:
            self.budget.spend(0.0, None)
            return None
        started, last = time.perf_counter(), self._last_scalars
        self._measuring = True
        try:
            return self._measure_and_log(step, on_step, epoch, plan, started)
        finally:
            self._measuring = False
            if self._last_scalars is not last:  # a new measurement (not the last one's values again)
                self.budget.spend(time.perf_counter() - started, plan, self._part_seconds("last"),
                                  forced=forced)

    def _part_seconds(self, bucket: str) -> dict[str, float]:
        """What each part of a measurement took, from the probe's timings of ``bucket`` (``"initial"``, ``"last"``)."""
        timings = self.measures.timings.get(bucket, {}) if self.measures is not None else {}
        return {part: sum(timings[key] for key in keys if key in timings) for part, keys in MEASURE_PARTS.items()
                if any(key in timings for key in keys)}

    def _measure_and_log(self, step: int, on_step: bool, epoch: int | None, plan: tuple[str, ...],
                         started: float) -> dict[str, float] | None:
        weights = self._weights_now()
        same = self.history and self.history[-1]["step"] == float(step) and self._last_scalars[0] == (step, weights)
        if same and set(self._last_plan) <= set(plan):  # the last one left out no more than this one would
            # The same network at the same step (micro-batches of one accumulated step, an epoch ending at a log
            # step): one entry per optimizer step. The ‖D²h‖ search, a lower bound, would give another value.
            if not on_step:
                self.host.log_again_at_epoch_end(self._last_scalars[1], step)
            return self._last_scalars[1]
        if same:  # a richer measurement of the network the budget thinned at this step replaces that entry
            self.history.pop()
            if self.layer_history and self.layer_history[-1]["step"] == float(step):
                self.layer_history.pop()
        values = self.values(plan)
        self._last_plan = plan
        self._advise_on_cost("last")
        self._last_per_tensor = values.pop("displacement_per_tensor")
        scalars = {f"lazy/{name}": value for name, value in values.items()}
        layers: dict[str, dict[str, float]] = {}
        for key in [key for key in values if key.startswith("layers/")]:  # kept apart from the history
            layer, name = key[len("layers/"):].rsplit("/", 1)
            layers.setdefault(layer, {})[name] = values.pop(key)
        self.history.append({"step": float(step), "epoch": float(self.epoch if epoch is None else epoch), **values})
        if layers:
            self.layer_history.append({"step": float(step), "normalized_time": values.get("normalized_time", 0.0),
                                       "layers": layers})
        from lightning_lazy.watch.report import regime_code

        code = regime_code(values)
        if math.isfinite(code):
            scalars["lazy/regime"] = code
        if self.budget.share is not None:  # this measurement's time so far included
            scalars["lazy/cost/share"] = self.budget.spent_share(pending=time.perf_counter() - started)
        self._last_scalars = ((step, weights), dict(scalars))
        self.host.log_scalars(scalars, step, epoch_end=not on_step)
        # Rendering costs a few tenths of a second: at epoch ends (never at log steps) while that stays under 5 % of
        # the time since the last drawing, and at the end.
        if self.host.is_global_zero and not on_step and time.perf_counter() - self._drawn_at >= 19 * self._draw_seconds:
            self.draw(step)
        return scalars

    def _weights_now(self) -> tuple:
        """What identifies the watched network's function between two measurements at one step: names and version
        counters of its parameters, its buffers' names, and the parameters' norms (``.data`` writes)."""
        params = list(self._watched.named_parameters())
        buffers = [name for name, _ in self._watched.named_buffers()]
        norms = tensor_fingerprints([p if p.is_floating_point() else None for _, p in params])
        return tuple((name, p._version) for name, p in params), tuple(buffers), tuple(norms)

    def end_epoch_losses(self) -> float | None:
        """The epoch's mean tangent training loss R (``None`` without a following twin), and the real one."""
        if not self._twin_loss_count or self.following_twin() is None:
            return None
        self._last_twin_train_loss = self._twin_loss_sum / self._twin_loss_count
        self._last_train_loss = self._real_loss_sum / self._twin_loss_count if self._real_loss_sum else None
        self._twin_loss_sum, self._real_loss_sum, self._twin_loss_count = 0.0, 0.0, 0
        return self._last_twin_train_loss

    # ---------------------------------------------------------------------------------- evaluation

    def evaluate(self, x: Any, y: Any, extra: Mapping[str, Any] | None = None) -> None:
        """Accumulate the tangent model's loss R and accuracy on an evaluation batch."""
        if self.following_twin() is None:
            return
        output = self.twin.eval_output(x)
        n = num_examples(x)
        with torch.no_grad():
            self._eval[0] += float(self._objective(output, y, **(extra or {}))) / self._loss_scale * n
        self._eval[2] += n
        if isinstance(y, Tensor) and not y.is_floating_point() and y.shape == output.shape[:-1]:
            kept = y != IGNORE_INDEX  # accuracy over the positions the loss counts
            if bool(kept.any()):
                self._eval[1] += float((output.argmax(-1) == y)[kept].float().mean()) * n
            self._eval[3] = True

    def evaluation(self, device: Any = None) -> dict[str, float] | None:
        """``{"loss": ..., "acc": ...}`` of the tangent model over the evaluation batches since the last call,
        summed over processes; ``None`` when there were none."""
        loss, correct, count, classes = self._eval
        self._eval = [0.0, 0.0, 0, False]
        if self.following_twin() is None or count == 0:
            return None
        totals = self.host.reduce_sum(torch.tensor([loss, correct, count], dtype=torch.float64, device=device))
        values = {"loss": float(totals[0] / totals[2])}
        if classes:
            values["acc"] = float(totals[1] / totals[2])
        return values

    # ------------------------------------------------------------------------------------- results

    @property
    def initial_kappa(self) -> float | None:
        """κ(w0) (``None`` before the first measurement, or with ``measure_kappa=False``)."""
        return None if self.measures is None else self.measures.initial_kappa

    @property
    def initial_jacobian_norm(self) -> float | None:
        """‖Dh(w0)‖ in the empirical L² norm of the probe (sets the unit of normalized time)."""
        return None if self.measures is None else self.measures.initial_jacobian_norm

    @property
    def laziness_horizon(self) -> float:
        """Normalized time at which the bound t̃²·κ(w0) reaches 1 (``inf`` when κ(w0) = 0)."""
        if self.measures is None:
            raise RuntimeError("the laziness horizon needs kappa(w0): training has not started")
        return self.measures.laziness_horizon

    @property
    def timings(self) -> dict[str, dict[str, float]]:
        """Seconds each measure took: ``{"initial": {...}, "last": {...}}``."""
        return {} if self.measures is None else self.measures.timings

    @property
    def alpha(self) -> float:
        return self._loss_scale ** -0.5

    def summary_values(self) -> dict[str, Any]:
        """The numbers of the summary (:func:`lightning_lazy.watch.report.laziness_summary`)."""
        last = self.history[-1] if self.history else {}
        return {
            "alpha": self.alpha,
            "adaptive_optimizer": self._adaptive,
            "kappa0": self.initial_kappa,
            "horizon": (self.laziness_horizon if self.initial_kappa is not None and self._adaptive is None
                        and self._time is not None else None),
            "normalized_time": last.get("normalized_time"),
            "divergence": last.get("divergence"),
            "activation_stability": last.get("activation_stability"),
            "kernel_alignment": last.get("kernel_alignment"),
            "displacement": last.get("displacement"),
            "loss": self._last_train_loss,
            "tangent_loss": self._last_twin_train_loss,
            "moved_layers": self.moved_layers(),
        }

    def summary(self) -> str:
        """The laziness summary: the regime, its evidence, and what was not measured and why."""
        from lightning_lazy.watch.report import laziness_summary

        text = laziness_summary(self.summary_values())
        if self.twin is not None and self.twin.lost is not None:
            text += (f"\n  The tangent twin stopped following the run at step {self.twin.lost_at}: {self.twin.lost}; "
                     "divergence, tangent gap and tangent losses are not measured from then on.")
        if self._time is None:
            text += ("\n  The optimizer takes steps of its own size (no float learning rate): normalized time and the "
                     "bound are not stated.")
        relative = getattr(self.measures, "displacement_relative_to", "w0")
        if relative != "w0":  # every trained weight started at zero (LoRA's B): ‖w − w0‖/‖w0‖ has no meaning
            text += ("\n  Displacement is " + ("relative to the frozen weights the trained ones adapt" if
                                                relative == "reference" else "absolute, ‖w − w0‖") +
                     ": every trained weight started at zero.")
        if self.budget.started is not None:
            text += f"\n  Cost: {self.budget.describe()}."
        return text

    def moved_layers(self, count: int = 3) -> list[tuple[str, str, float]]:
        """The ``count`` layers that moved most at the last measurement: ``[(layer, measure, value)]``."""
        if not self.layer_history:
            return []
        layers = self.layer_history[-1]["layers"]
        measure = "feature_movement" if any("feature_movement" in v for v in layers.values()) else "displacement"
        # A layer that did not move (learning rate 0, a frozen one) is no answer to "which moved most".
        ranked = sorted(((name, v[measure]) for name, v in layers.items() if v.get(measure, 0.0) > 0.0),
                        key=lambda item: -item[1])
        return [(self._labels.get(name, name), measure, value) for name, value in ranked[:count]]

    # -------------------------------------------------------------------------------------- outputs

    def finish(self, step: int, optimizer_name: str | None = None) -> str | None:
        """At the end of training: the summary (returned, and to the writers), the HParams, the figures."""
        if not self.history:
            return None
        self.budget.stop()
        text = self.summary()
        if self.host.is_global_zero:
            self.host.writers.text("lazy/summary", text, step, "lazy_summary.txt")
            self._write_hparams(step, optimizer_name)
            self.draw(step)
        return text

    def _write_hparams(self, step: int, optimizer_name: str | None) -> None:
        from lightning_lazy.watch.report import regime_code

        last = self.history[-1]
        metrics = {f"lazy/{key}": float(last[key]) for key in ("divergence", "activation_stability", "kernel_alignment")
                   if key in last and math.isfinite(float(last[key]))}
        code = regime_code(last)
        if math.isfinite(code):
            metrics["lazy/regime"] = code
        if not metrics:
            return
        name = optimizer_name or (type(self.optimizer).__name__ if self.optimizer is not None else "none")
        self.host.writers.hparams({"lazy/alpha": self.alpha, "lazy/optimizer": name}, metrics, step)

    def draw(self, step: int) -> None:
        """The laziness figure and the per-layer heat map, each rendered once and handed to every writer."""
        if not self.options.write.figure or not self.history or self._drawn == len(self.history):
            return
        if not self.host.writers:
            return  # nowhere to write them
        self._drawn = len(self.history)
        started = time.perf_counter()
        from lightning_lazy.watch.report import classify_regime, figure_to_png, laziness_figure, layers_figure

        png = figure_to_png(laziness_figure(self.history, horizon=self.summary_values()["horizon"],
                                            per_tensor=self._last_per_tensor, alpha=self.alpha, labels=self._labels))
        self.host.writers.image("lazy/figure", png, step, "laziness.png")
        if self.layer_history:
            png = figure_to_png(layers_figure(self.layer_history, alpha=self.alpha, labels=self._labels,
                                              regime=classify_regime(self.history[-1])))
            self.host.writers.image("lazy/layers", png, int(self.layer_history[-1]["step"]), "layers.png")
        self._drawn_at = time.perf_counter()
        self._draw_seconds = self._drawn_at - started

    def _advise_on_cost(self, bucket: str) -> None:
        """Warn once when the measurement ``bucket`` ("initial", "last") cost as much as many training steps."""
        rarer = "every_n_epochs=N" if self.schedule.log_steps is None else "log_steps=None / every_n_epochs=N"
        advice = self._cost.advice(self.timings.get(bucket, {}), self.schedule.describe(), rarer)
        if advice is not None:
            self.host.warn(advice.replace("LazyTrainingMonitor", self.who, 1))

    def step_started(self) -> None:
        """A training step starts (its time, the twin's included, is the unit of the cost advice)."""
        self._cost.step_started()

    def step_ended(self) -> None:
        self._cost.step_ended()
        if len(self._cost.step_seconds) == 1:  # the measurement at w0 against the first step: say it early
            self._advise_on_cost("initial")

    # --------------------------------------------------------------------------------------- probe

    def _make_probe(self, first_batch: tuple[Any, Any] | None = None) -> LazinessProbe:
        """The probe, drawn once (the same on every process), with the watched network's w0."""
        probe, size = self.options.measure.probe, self.options.measure.probe_size
        if isinstance(probe, Mapping) and "labels" in probe:
            x, y, _ = self.read(probe)  # a Hugging Face batch
        elif isinstance(probe, (tuple, list)) or isinstance(probe, (Tensor, Mapping)):
            x, y = probe if isinstance(probe, (tuple, list)) else (probe, None)
        else:
            source = probe if probe is not None else self.host.probe_source()
            if source is not None:
                x, y, _ = self.draw_examples(source, size)
            elif first_batch is not None:
                x, y = first_batch
                self.host.info(f"{self.who}: no probe= given, so the first batch ({num_examples(as_inputs(x))} "
                               "examples) is the probe")
            else:
                raise WatchError(f"{self.who} needs a probe: pass probe=(x, y) or a Dataset to draw it from")
        try:
            x = as_inputs(x)
        except ValueError as error:
            raise WatchError(
                f"{self.who}: {error}. For several positional inputs, stack them in batch_to_xy and unpack them in "
                "model=lambda module, x: module(x[:, 0], x[:, 1]); named inputs can be a dict"
            ) from None
        if num_examples(x) == 0:
            raise WatchError("the probe set is empty: give probe tensors with at least one example")
        if y is None:
            self.host.warn(
                f"{self.who}: the probe has no targets, so the measures take y* = 0 (the divergence is relative to "
                "||alpha h(w0)||, kappa's residual is ||alpha h||): give probe=(x, y), with -100 at the positions the "
                "loss ignores, to measure against the targets you train on."
            )
        x, y = self.host.broadcast((x, y))
        device = next(self._watched.parameters()).device
        x = inputs_to(x, device, self._dtype())
        m = self.options.measure
        try:
            return LazinessProbe(self._watched, x, None if y is None else y.to(device),
                                 kappa_probe_size=m.kappa_probe_size, ntk_probe_size=m.ntk_probe_size,
                                 measure_kappa=m.kappa, measure_ntk=m.ntk, ntk_outputs=m.ntk_outputs,
                                 **self._layer_options())
        except ProbeMemoryError as error:
            raise WatchError(f"{self.who}: {self._probe_memory_remedy(error)}") from None
        except ValueError as error:
            raise WatchError(f"{self.who}: {error}") from None
        except (RuntimeError, TypeError, IndexError, KeyError) as error:  # the model does not take the probe's x
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise WatchError(
                f"{self.who}: calling the watched model on the probe's inputs failed ({type(error).__name__}: {first}): "
                "give probe=(inputs, targets) of what the watched model takes (a generator's noise, say), or "
                "batch_to_xy= / model= for what your training step calls"
            ) from None

    def _layer_options(self) -> dict[str, Any]:
        m = self.options.measure
        return {"per_layer": m.per_layer, "layer_probe_size": m.layer_probe_size, "max_layers": m.max_layers}

    def _probe_memory_remedy(self, error: ProbeMemoryError) -> str:
        """The one-line refusal of a probe over the memory budget: its cause, and the largest probe that fits (never
        chosen silently: a smaller probe gives other numbers)."""
        if not error.largest:
            return str(error)
        given = self.options.measure.probe is not None and not _is_dataset(self.options.measure.probe)
        examples = f"{error.largest} example{'s' if error.largest > 1 else ''}"
        way = (f"give a probe= of at most {examples}" if given else
               f"pass probe_size={error.largest} (or a probe= of at most {examples})")
        size = "" if given else f" (probe_size={self.options.measure.probe_size}, at most the training set)"
        return (f"{error.cause}{size}: {way}, lower kappa_probe_size / layer_probe_size, or raise "
                "lightning_lazy.diagnostics.DEFAULT_MEMORY_BUDGET")

    def draw_examples(self, source: Any, size: int, seed: int = 0) -> tuple[Any, Any, dict]:
        """``size`` examples of a ``DataLoader``'s dataset (collated by its ``collate_fn``) or of a ``Dataset``, drawn
        with a private generator, read as ``(x, y, loss_kwargs)``; the run's random state is left as it was."""
        loader = source if hasattr(source, "dataset") and hasattr(source, "collate_fn") else None
        dataset = loader.dataset if loader is not None else source
        if dataset is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise WatchError(f"{self.who} draws its probe from the training data's dataset, which must be indexable; "
                             "pass probe=(x, y) instead")
        from torch.utils.data import default_collate

        collate = loader.collate_fn if loader is not None else default_collate
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randperm(len(dataset), generator=generator)[:size].tolist()
        # Random transforms draw from the global RNG: fork it, so the run trains exactly as one without the monitor.
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            batch = collate([dataset[i] for i in indices])
        return self.read(batch)

    # ------------------------------------------------------------------------------ kernel baseline

    def _fit_kernel_baseline(self) -> None:
        """The kernel predictor at w0 on ``kernel_baseline`` training examples, evaluated on the validation data
        (the probe without), as ``lazy/kernel/val_loss`` and ``lazy/kernel/val_acc``."""
        source = self.host.probe_source()
        if source is None:
            source = self.options.measure.probe if _is_dataset(self.options.measure.probe) else None
        if source is None:
            self.host.warn(f"{self.who}(kernel_baseline=...) needs training data to draw from (a Dataset as probe=, "
                           "or a framework's train loader): the kernel baseline is not logged.")
            return
        x, y, _ = self.draw_examples(source, self.options.measure.kernel_baseline, seed=1)
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise WatchError(f"{self.who}(kernel_baseline=...) needs batches read as (x, y) tensors")
        device = next(self._watched.parameters()).device
        x, y = x.to(device), y.to(device)
        x = x.to(self._dtype()) if x.is_floating_point() else x
        try:
            predict = self.measures.kernel_regression(self.measured_names(), x, y)
        except ValueError as error:
            raise WatchError(f"{self.who}: {error}") from None
        loader = self.host.validation_batches()
        if loader is not None:
            batches = (self.read(batch) for batch in loader)
        elif (targets := self.measures.regression_targets()) is not None and bool(targets.ne(0).any()):
            batches = iter([(self.measures.x, self._probe_targets(), {})])
        else:
            self.host.warn(f"{self.who}: no validation data and a probe without targets: the kernel baseline "
                           "lazy/kernel/* is not logged.")
            return
        sums = [0.0, 0.0, 0]
        classes = False
        pending: list[tuple[Tensor, Any, dict]] = []

        def evaluate() -> None:
            nonlocal classes
            outputs = predict(torch.cat([xb for xb, _, _ in pending])).split([len(xb) for xb, _, _ in pending])
            for output, (xb, yb, extra) in zip(outputs, pending):
                with torch.no_grad():
                    sums[0] += float(self._objective(output, yb, **extra)) / self._loss_scale * len(xb)
                if isinstance(yb, Tensor) and not yb.is_floating_point() and yb.shape == output.shape[:-1]:
                    sums[1] += float((output.argmax(-1) == yb).float().sum())
                    classes = True
                sums[2] += len(xb)
            pending.clear()

        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):  # random transforms must not move the run's RNG
            for xb, yb, extra in batches:
                xb = xb.to(device)
                xb = xb.to(self._dtype()) if xb.is_floating_point() else xb
                pending.append((xb, yb.to(device) if isinstance(yb, Tensor) else yb, extra))
                if sum(len(p[0]) for p in pending) >= 4 * len(x):
                    evaluate()
            if pending:
                evaluate()
        totals = self.host.reduce_sum(torch.tensor(sums, dtype=torch.float64, device=device))
        values = {"val_loss": float(totals[0] / totals[2])}
        if classes:
            values["val_acc"] = float(totals[1] / totals[2])
        self.kernel_baseline_values = values
        self.host.log_scalars({f"lazy/kernel/{k}": v for k, v in values.items()}, self.steps, epoch_end=False)
        self.host.info(f"{self.who}: kernel baseline (the tangent model at w0 trained to convergence on {len(x)} "
                       "training examples): " + ", ".join(f"{k} = {v:.4g}" for k, v in values.items()))

    def _probe_targets(self) -> Tensor:
        """The probe's targets as given (class indices stay indices), for the kernel baseline without validation."""
        probe = self.options.measure.probe
        y = probe[1] if isinstance(probe, (tuple, list)) else None
        if isinstance(y, Tensor):
            return y.to(self.measures.x.device if isinstance(self.measures.x, Tensor) else y.device)
        return self.measures.regression_targets()

    # ---------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """What was measured at w0, the twin, the counters and the history: all a resumed run needs."""
        if self.measures is None:
            return {}
        return {
            "measures": self.measures.state_dict(),
            "trained": sorted(self._trained),
            "twin": None if self.twin is None else self.twin.state_dict(),
            "time": self._time,
            "steps": self.steps,
            "epoch": self.epoch,
            "history": list(self.history),
            "layer_history": list(self.layer_history),
            "twin_loss": (self._twin_loss_sum, self._twin_loss_count),
            "weight": self._weight,
            "budget": self.budget.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (w0 and what was measured there, not the resumed weights)."""
        self._trained = set(state["trained"])
        if self.twin is not None:
            if state["twin"] is None:
                raise WatchError(
                    "the checkpoint was written with track_tangent=False, so it holds no twin to resume; "
                    "resume with track_tangent=False or start a new run"
                )
            self.twin.load_state_dict(state["twin"])
            if self.twin.lost is not None:
                self.warn_lost()
        saved = state["measures"]
        y = saved["y"] if saved.get("labels") is None else saved["labels"]  # class indices keep their -100s
        device = next(self._watched.parameters()).device
        m = self.options.measure
        self.measures = LazinessProbe(self._watched, inputs_to(saved["x"], device), y.to(device),
                                      kappa_probe_size=m.kappa_probe_size, ntk_probe_size=m.ntk_probe_size,
                                      measure_kappa=m.kappa, measure_ntk=m.ntk, ntk_outputs=m.ntk_outputs,
                                      **self._layer_options())
        self.measures.load_state_dict(saved)
        self._time = state["time"]
        self.steps = state["steps"]
        self.epoch = state.get("epoch", 0)
        self.history = list(state["history"])
        self.layer_history = list(state.get("layer_history", []))  # absent from older checkpoints
        self._twin_loss_sum, self._twin_loss_count = state["twin_loss"]
        self._weight = state.get("weight", 1.0)
        if "budget" in state:
            self.budget.load_state_dict(state["budget"])
        self.budget.start()  # the resumed run keeps within the budget from its first step
        self._checked = True




def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


def _group(writers: Sequence[Any], host: Any) -> Any:
    """The writers as one :class:`~lightning_lazy.watch.writers.Writers`: a backend that fails is dropped with one
    warning and never stops the run."""
    from lightning_lazy.watch.writers import Writers

    if isinstance(writers, Writers):
        return writers
    return Writers(list(writers), warn=lambda message: host.warn(message))


def _dense(grad: Tensor) -> Tensor:
    return (grad.to_dense() if grad.is_sparse else grad).detach()


def _tolerance(precision: str, dtype: torch.dtype) -> float:
    """The relative tolerance of the objective check at w0: round-off of the parameters' dtype, or of the 16-bit
    arithmetic a mixed precision runs the real forward in (bf16 keeps 8 bits of mantissa, fp16 11)."""
    precision = str(precision)
    if "bf16" in precision:
        return 5e-2
    if "16" in precision:
        return 1e-2
    # At least 1e-6: a loop may compute its loss in another dtype than the parameters' (Fabric's "64-true" casts
    # outputs to float32); the objectives this check tells apart differ by far more.
    return max(1e3 * torch.finfo(dtype).eps, 1e-6) if dtype.is_floating_point else 1e-6


def _unwrap_module(model: nn.Module) -> nn.Module:
    """The user's module inside a Lightning Fabric wrapper (``fabric.setup``), else ``model``."""
    if type(model).__name__ == "_FabricModule" and isinstance(getattr(model, "module", None), nn.Module):
        return model.module
    return model


def _unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside a Lightning Fabric or Lightning wrapper, else ``optimizer``."""
    inner = getattr(optimizer, "optimizer", None) if optimizer is not None else None
    if isinstance(inner, torch.optim.Optimizer) and inner is not optimizer:
        return inner
    return optimizer


def _is_dataset(obj: Any) -> bool:
    return obj is not None and not isinstance(obj, (Tensor, tuple, list, Mapping)) and hasattr(obj, "__len__")


__all__ = ["Host", "LazinessWatch"]
