"""LazyTrainingMonitor: watch, in any Lightning Trainer, how far training is from its linearization.

The Lightning glue around two Lightning-free pieces: :class:`~lightning_lazy.watch.twin.TangentTwin` (the
linearized twin trained in lock-step with the real network) and :class:`~lightning_lazy.watch.probe.LazinessProbe`
(the measures on a fixed probe, against w0). This file wires Lightning's hooks to them, in lifecycle order,
and owns logging.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_lazy.watch.cost import MeasurementCost
from lightning_lazy._forward_ad import as_forward_ad_error
from lightning_lazy._inputs import as_inputs, inputs_to, num_examples, take
from lightning_lazy._optim import adaptive_optimizer
from lightning_lazy._params import tensor_norms
from lightning_lazy.watch.objective import WatchLike, resolve_objective, resolve_watched
from lightning_lazy.watch.probe import NTK_OUTPUTS, LazinessProbe, NtkOutputs, ProbeMemoryError
from lightning_lazy.scaling import IGNORE_INDEX, LossLike, check_alpha, resolve_loss
from lightning_lazy.watch.twin import OutputSelector, TangentTwin, TwinError, Watched

BatchToXY = Callable[[Any], tuple]

_PREFIX = "inner."  # parameter names of the watched network inside its ``Watched`` wrapper


def default_batch_to_xy(batch: Any) -> tuple[Any, Tensor]:
    """Reads a batch as ``(x, y)``: a tuple, a list, a dict with keys ``"x"`` and ``"y"``, or a Hugging Face batch.

    A Hugging Face batch is a mapping (``dict``, ``BatchEncoding``) with ``"labels"``: y is the labels (−100 at the
    positions the loss ignores, which every measure then ignores too) and x the dict of the other model inputs
    (``input_ids``, ``attention_mask``, ...), with which the watched model is called as ``model(**x)``. The labels
    are read as the targets of the logits at the same positions: a causal LM's labels shifted by one (the next
    tokens), as the loss the monitor is given sees them (Hugging Face models shift them inside their own loss).
    """
    if isinstance(batch, Mapping) and "x" in batch and "y" in batch:
        return batch["x"], batch["y"]
    if isinstance(batch, Mapping) and "labels" in batch and isinstance(batch["labels"], Tensor):
        return _named_inputs(batch), batch["labels"]
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, Tensor) for t in batch):
        return batch[0], batch[1]
    described = type(batch).__name__ + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    raise MisconfigurationException(
        f"LazyTrainingMonitor reads batches as (x, y), but got a {described}. Pass "
        "batch_to_xy=lambda batch: (inputs, targets) (or (inputs, targets, loss_kwargs)) to LazyTrainingMonitor."
    )


def causal_lm_batch_to_xy(batch: Mapping[str, Any]) -> tuple[dict[str, Any], Tensor]:
    """Reads a Hugging Face causal-LM batch whose ``labels`` are the input tokens themselves (as
    ``DataCollatorForLanguageModeling(mlm=False)`` makes them; the model shifts them inside its own loss): x = the
    other model inputs, y = the labels shifted by one, ``y[:, t] = labels[:, t + 1]``, −100 at the last position.
    Cross-entropy of the logits against y at every position is then the loss the model computes itself, so
    ``LazyTrainingMonitor(loss="cross_entropy", batch_to_xy=causal_lm_batch_to_xy)`` watches the objective you
    train. Raises ``MisconfigurationException`` for a batch without ``labels`` of shape ``[N, T]``."""
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if not isinstance(labels, Tensor) or labels.dim() != 2:
        raise MisconfigurationException(
            "causal_lm_batch_to_xy reads a Hugging Face batch with labels [N, T] (the input tokens); got "
            f"{type(batch).__name__}{'' if labels is None else f' with labels of shape {tuple(labels.shape)}'}"
        )
    shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
    return _named_inputs(batch), shifted


def _named_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """A Hugging Face batch's model inputs: everything but its ``labels``."""
    return {k: v for k, v in batch.items() if k != "labels"}


def _tensorboard(trainer: pl.Trainer) -> Any | None:
    """The SummaryWriter of the trainer's TensorBoard logger, from ``lightning`` or ``pytorch_lightning``."""
    for logger in trainer.loggers:
        if any(cls.__name__ == "TensorBoardLogger" for cls in type(logger).__mro__):
            return logger.experiment
    return None


class LazyTrainingMonitor(Callback):
    r"""Trains a linearized twin in lock-step and logs the laziness measures of Chizat et al. (2019).

    Args:
        loss: the loss R the model is trained on, of the watched output: ``"mse"`` (½‖·‖² per example,
            class targets one-hot), ``"cross_entropy"`` (classes on the last dimension, or torch's dim 1) or a
            callable ``loss(output, y, **extra)`` (``extra``: the third item ``batch_to_xy`` returns).
            Default: the loss of the ``AlphaScaled`` inside the module. At the first step the monitor checks it
            against the loss ``training_step`` returned and warns if they differ.
        alpha: scale of the model when it contains no ``AlphaScaled`` (the twin's objective is then
            R(output)/α², as for an ``AlphaScaled``); needed when the module holds several of them.
        model: what to watch: ``None`` (the LightningModule's ``forward``), an attribute path of a
            sub-module (``"model"``, ``"net.backbone"``), or ``callable(pl_module, x) -> output``.
        output: which part of the output is the model output, when it is not a tensor: a key, an attribute
            (``"logits"``) or ``callable(output) -> Tensor``; default the output itself, or its ``logits`` (a
            Hugging Face ``ModelOutput``).
        probe: fixed probe inputs ``x`` or ``(x, y)`` (``x`` a tensor or a dict of tensors, ``y`` with −100 at
            positions to ignore), or a Hugging Face batch with ``labels``; default ``probe_size`` examples drawn once,
            with a private generator, from the train set.
        probe_size: examples in the default probe (divergence, activation stability). A probe whose output-sized
            tensors (token logits ``[N, T, V]``: :func:`~lightning_lazy.watch.probe.probe_numbers`) exceed
            ``lightning_lazy.diagnostics.DEFAULT_MEMORY_BUDGET`` is refused at fit start, naming the largest
            ``probe_size`` that fits (never lowered silently: a smaller probe gives other numbers).
        kappa_probe_size: the first examples of the probe used for κ, ‖Dh‖, ‖D²h‖.
        ntk_probe_size: the first examples of the probe used for the empirical NTK.
        ntk_outputs: which outputs the empirical NTK is taken of: ``"auto"`` (default; for token logits
            ``[N, T, V]`` with class targets, ``"labels"``), ``"all"``, ``"labels"`` (each kept position's
            target-class logit, as Malladi et al. 2023) or ``callable(output, y) -> [N, K']``; see
            :class:`~lightning_lazy.watch.probe.LazinessProbe`. A kernel over the memory budget is refused at fit start.
        every_n_epochs: measure at the end of every n-th training epoch.
        log_steps: also measure after these global steps: ``"log"`` (the default) for 1, 2, 4, 8, ..., so the
            early phase, which often already passes the horizon, is seen; a list; or ``None`` (epoch ends only).
        track_tangent: keep the linearized twin (divergence, tangent gap, tangent losses); ``False`` keeps
            the other measures and costs no training time.
        batch_to_xy: ``batch -> (x, y)`` or ``(x, y, extra)`` for batches that are not ``(x, y)``, a dict with
            ``"x"``/``"y"`` or a Hugging Face batch (read by :func:`default_batch_to_xy`: x the named inputs, with
            which the model is called as ``model(**x)``, y the ``labels``).
        measure_kappa / measure_ntk: switch the two costliest measures off.
        figure: draw the laziness figure (a TensorBoard image ``lazy/figure`` and ``laziness.png`` in the log
            folder) at the end of fit and at epoch ends while its cost stays under 5 % of the fit (it takes
            about a second to draw), and log the summary text.
            With ``per_layer``, also the per-layer heat map (image ``lazy/layers``, ``layers.png``).
        per_layer: log the per-layer measures (below): per module displacement, feature movement, share and
            distance of its NTK block.
        layer_probe_size: the first examples of the probe whose module outputs are kept for feature movement.
        max_layers: per-layer entries logged at most: beyond, modules are grouped by the watched network's
            top-level child (then consecutive groups merged), see :func:`lightning_lazy.watch.probe.layer_groups`.
        kernel_baseline: ``None`` (default) or a number of training examples (512 is a good start): at the start
            of fit, fit the kernel predictor at w0 (the tangent model trained to convergence on that many
            training examples, drawn once, in closed form: :meth:`LazinessProbe.kernel_regression`) and log its
            loss R and accuracy on the validation set as ``lazy/kernel/val_loss`` / ``lazy/kernel/val_acc`` (on
            the probe when the fit has no validation data). The number the network must beat to have learned
            anything its initial kernel could not. Cost: the NTK between the subset and every validation example
            (structured derivatives: about K backward passes, K outputs, per validation example, plus the
            subset's once per 4·``kernel_baseline`` validation examples), once per fit.

    Logged under ``lazy/``: ``regime`` (1 lazy, 0.5 in between, 0 feature learning:
    :data:`lightning_lazy.watch.report.REGIME_CODES`), ``divergence`` Δ, ``bound`` (= t̃²·κ(w0); only for gradient
    descent and SGD with momentum, see :mod:`lightning_lazy._optim`), ``kappa``, ``jacobian_norm``,
    ``hessian_norm``, ``displacement``, ``tangent_gap``, ``ntk_distance``, ``kernel_alignment``,
    ``activation_stability``, ``normalized_time``, ``tangent/train_loss``, ``tangent/val_loss``
    (``test_loss`` under ``trainer.test``) and, for integer targets, ``tangent/val_acc`` / ``test_acc``.
    The losses logged are R (without the 1/α² factor), comparable across α. At the end of fit the regime and
    the last measures also go to TensorBoard's HParams tab (the summaries of ``log_hyperparams(params, metrics)``,
    params ``lazy/alpha`` and ``lazy/optimizer``), and one
    line names the log folder and the figure.
    From the NTK: ``target_alignment``, ``ntk_top_eigenvalue``, ``ntk_effective_rank``, ``ntk_target_energy``,
    ``kernel_velocity`` (:meth:`LazinessProbe.kernel_measures`). Per layer ``l`` (a module owning trained
    parameters, named as in the watched network's ``named_modules()``): ``layers/<l>/displacement``,
    ``feature_movement``, ``ntk_share``, ``ntk_distance`` (:meth:`LazinessProbe.layer_measures`), all exactly 0
    while the weights stay at w0.

    What the measures compare: the network and its twin as functions of the weights alone, on the probe,
    with dropout off and each BatchNorm that trains normalizing by the probe's own batch statistics (as in
    training; running statistics, which drift even when the weights do not, do not enter). BatchNorm layers
    kept in eval mode use their running statistics.

    Never a wrong number: where the run does something the twin cannot replay (weights written outside the
    optimizer's step, a module re-parametrized mid-fit, gradients edited between backward and step other than by
    ``configure_gradient_clipping`` through ``self.clip_gradients``, a gradient hook on a parameter, dropout in
    compiled code), the monitor warns once, naming the cause and the way out, stops logging ``divergence``,
    ``tangent_gap`` and ``tangent/*`` from then on, and says so in :meth:`summary`; the other measures go on.
    """

    def __init__(
        self,
        loss: LossLike | None = None,
        *,
        alpha: float | None = None,
        model: WatchLike = None,
        output: str | OutputSelector | None = None,
        probe: Tensor | tuple[Tensor, Tensor] | None = None,
        probe_size: int = 256,
        kappa_probe_size: int = 16,
        ntk_probe_size: int = 16,
        ntk_outputs: NtkOutputs = "auto",
        every_n_epochs: int = 1,
        log_steps: str | Sequence[int] | None = "log",
        track_tangent: bool = True,
        batch_to_xy: BatchToXY | None = None,
        measure_kappa: bool = True,
        measure_ntk: bool = True,
        figure: bool = True,
        per_layer: bool = True,
        layer_probe_size: int = 64,
        max_layers: int = 32,
        kernel_baseline: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("probe_size", probe_size), ("kappa_probe_size", kappa_probe_size),
                            ("ntk_probe_size", ntk_probe_size), ("every_n_epochs", every_n_epochs),
                            ("layer_probe_size", layer_probe_size), ("max_layers", max_layers)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(log_steps, str) and log_steps != "log":
            raise ValueError(f"log_steps must be 'log', a list of steps or None, got {log_steps!r}")
        if not callable(ntk_outputs) and ntk_outputs not in NTK_OUTPUTS:
            raise ValueError(f"ntk_outputs must be one of {NTK_OUTPUTS} or a callable(output, y) -> [N, K'], "
                             f"got {ntk_outputs!r}")
        if model is not None and not isinstance(model, str) and not callable(model):
            raise ValueError(f"model must be None, an attribute path or a callable(pl_module, x), got {model!r}")
        self.loss = None if loss is None else resolve_loss(loss)
        self.alpha = None if alpha is None else check_alpha(alpha)
        self.model = model
        self.output = output
        self.probe = probe
        self.probe_size = probe_size
        self.kappa_probe_size = kappa_probe_size
        self.ntk_probe_size = ntk_probe_size
        self.ntk_outputs = ntk_outputs
        self.every_n_epochs = every_n_epochs
        self.log_steps = log_steps
        self.track_tangent = track_tangent
        self.batch_to_xy = batch_to_xy or default_batch_to_xy
        self.measure_kappa = measure_kappa
        self.measure_ntk = measure_ntk
        self.figure = figure
        self.per_layer = per_layer
        self.layer_probe_size = layer_probe_size
        self.max_layers = max_layers
        if kernel_baseline is not None and (not isinstance(kernel_baseline, int) or kernel_baseline < 1):
            raise ValueError(f"kernel_baseline must be None or a positive number of training examples, got {kernel_baseline!r}")
        self.kernel_baseline = kernel_baseline
        self._loaded: dict[str, Any] | None = None
        self._rewound = False  # on_load_checkpoint took the state that load_state_dict is about to get
        # Where a fit run in processes this one spawned (strategy="ddp_spawn") hands its results back.
        self._origin_pid = os.getpid()
        self._hand_back_path = os.path.join(tempfile.gettempdir(), f"lightning_lazy_{os.getpid()}_{uuid.uuid4().hex}.pt")
        self._reset_state()

    def _reset_state(self) -> None:
        self.twin: TangentTwin | None = None
        self._watched: Watched | None = None
        self._objective: Callable[..., Tensor] | None = None
        self._loss_scale = 1.0
        self._handles: list[Any] = []
        self._names: dict[int, str] = {}
        # What was measured at w0 (the probe object), and the counters: everything state_dict saves.
        self.measures: LazinessProbe | None = None
        self._trained: set[str] = set()  # parameters trainable at some point of the run
        self._time = 0.0  # Σ learning rates of the real optimizer steps taken
        self._steps = 0
        self.history: list[dict[str, float]] = []
        self._drawn = 0  # measurements in the figure last drawn
        self._draw_seconds = 1.0  # what a drawing took (before the first: about a second), and when it ended
        self._drawn_at = time.perf_counter()
        self._adaptive: str | None = None  # the optimizer's class name when the bound does not hold for it
        self._log_folder: str | None = None
        self._last_per_tensor: dict[str, float] = {}
        self._twin_loss_sum = 0.0
        self._real_loss_sum = 0.0
        self._twin_loss_count = 0
        self._last_train_loss: float | None = None  # R of the network and of the twin, last epoch's mean
        self._last_twin_train_loss: float | None = None
        self._eval_loss_sum = 0.0
        self._eval_correct = 0
        self._eval_count = 0
        self._eval_is_classification = False
        self._batch: tuple | None = None
        self._objective_checked = False
        self._warned_no_twin = False
        self._cost = MeasurementCost()  # says once when a measurement costs as much as many training steps
        self._last_scalars: tuple[Any, dict[str, float]] = (None, {})  # (step, weights) and the values last logged
        self.layer_history: list[dict[str, Any]] = []  # per measurement: step, t̃ and {layer: {measure: value}}
        self.kernel_baseline_values: dict[str, float] | None = None  # lazy/kernel/val_{loss,acc}
        self._carried: dict[str, Any] | None = None  # what a fit in spawned processes handed back
        self._rewind_to: tuple[dict[str, Any] | None] | None = None  # (state,) to go back to at the next hook

    # ------------------------------------------------------------------------------------------ results

    @property
    def initial_kappa(self) -> float | None:
        """κ(w0), measured at the start of fit (``None`` before, or with ``measure_kappa=False``)."""
        return None if self.measures is None else self.measures.initial_kappa

    @property
    def initial_jacobian_norm(self) -> float | None:
        """‖Dh(w0)‖ in the empirical L² norm of the probe (sets the unit of normalized time)."""
        return None if self.measures is None else self.measures.initial_jacobian_norm

    @property
    def laziness_horizon(self) -> float:
        """Normalized time at which the bound t̃²·κ(w0) reaches 1 (``inf`` when κ(w0) = 0)."""
        if self.measures is None:
            raise RuntimeError("the laziness horizon needs kappa(w0): fitting has not started")
        return self.measures.laziness_horizon

    @property
    def timings(self) -> dict[str, dict[str, float]]:
        """Seconds each measure took: ``{"initial": {...}, "last": {...}}`` (fit start, last measurement)."""
        return {} if self.measures is None else self.measures.timings

    def measure(self, pl_module: pl.LightningModule | None = None) -> dict[str, Any]:
        """The measures now, as floats (``displacement_per_tensor``: a dict of floats by tensor name; the per-layer
        measures as ``"layers/<layer>/<measure>"``)."""
        if self.measures is None:
            raise RuntimeError("LazyTrainingMonitor.measure needs the probe: fitting has not started")
        self._check_twin()
        try:
            values = self.measures.measure(self._measured_names(), time=self._time * self._loss_scale,
                                           twin=self._following_twin())
        except ValueError as error:  # a parameter replaced, or weights gone to NaN: one line, no traceback
            raise MisconfigurationException(f"LazyTrainingMonitor: {error}") from None
        if self._adaptive is not None:
            values.pop("bound", None)  # the theorem behind it speaks of gradient descent only
        values["displacement_per_tensor"] = {_display(k): v for k, v in values["displacement_per_tensor"].items()}
        for layer, measures in values.pop("layers", {}).items():
            values.update({f"layers/{_layer_name(layer)}/{name}": value for name, value in measures.items()})
        return values

    def summary_values(self) -> dict[str, Any]:
        """The numbers of the fit-end summary (:func:`lightning_lazy.watch.report.laziness_summary`). After a fit run in
        spawned processes (``strategy="ddp_spawn"``), those its rank 0 handed back (and ``history`` is its)."""
        self._collect()
        if self.measures is None and self._carried is not None:
            return dict(self._carried["summary"])
        last = self.history[-1] if self.history else {}
        return {
            "alpha": self._loss_scale ** -0.5,
            "adaptive_optimizer": self._adaptive,
            "kappa0": self.initial_kappa,
            "horizon": self.laziness_horizon if self.initial_kappa is not None and self._adaptive is None else None,
            "normalized_time": last.get("normalized_time"),
            "divergence": last.get("divergence"),
            "activation_stability": last.get("activation_stability"),
            "kernel_alignment": last.get("kernel_alignment"),
            "displacement": last.get("displacement"),
            "loss": self._last_train_loss,
            "tangent_loss": self._last_twin_train_loss,
            "moved_layers": self._moved_layers(),
        }

    def summary(self) -> str:
        """The laziness summary printed and logged at the end of fit."""
        from lightning_lazy.watch.report import laziness_summary

        text = laziness_summary(self.summary_values())
        if self.measures is None and self._carried is not None:
            text += (f"\n(measured by rank 0 of the processes the fit ran in; its values were logged under "
                     f"{self._carried['log_folder'] or 'no log folder: the trainer had no logger'})")
        if self.twin is not None and self.twin.lost is not None:
            text += (f"\n  The tangent twin stopped following the run at step {self.twin.lost_at}: {self.twin.lost}; "
                     "divergence, tangent gap and tangent losses are not measured from then on.")
        return text

    # -------------------------------------------------------------------------- hooks, in lifecycle order

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse sharded strategies; a monitor reused for another fit starts afresh."""
        strategy = type(trainer.strategy).__name__
        if "FSDP" in strategy or "DeepSpeed" in strategy:
            raise MisconfigurationException(
                f"LazyTrainingMonitor does not support sharded strategies ({strategy}): its twin and its measures "
                "need the whole parameter vector on every device. Use a single device or DDP."
            )
        if stage == "fit":
            # A monitor reused for another fit starts afresh; a checkpoint's state (load_state_dict comes after
            # setup) replaces this.
            self._release()
            self._reset_state()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the optimization can be followed, resolve what is watched, build the twin, hook the optimizer."""
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                "LazyTrainingMonitor follows Lightning's automatic optimization (its twin steps when the trainer "
                "steps the optimizer); this module uses manual optimization, which it cannot follow."
            )
        if len(trainer.optimizers) != 1:
            raise MisconfigurationException(
                f"LazyTrainingMonitor needs exactly one optimizer to copy for its twin, found {len(trainer.optimizers)}."
            )
        optimizer = trainer.optimizers[0]
        if isinstance(optimizer, torch.optim.LBFGS) and self.track_tangent:
            raise MisconfigurationException(
                "LazyTrainingMonitor cannot follow LBFGS: it re-evaluates its closure several times per step. Use a "
                "first-order optimizer, or LazyTrainingMonitor(track_tangent=False) to keep the other measures."
            )
        self._adaptive = adaptive_optimizer(optimizer)
        self._build(pl_module, optimizer, clip=self._clipper(trainer, pl_module), reduce_gradients=self._reducer(trainer),
                    unscale=self._unscaler(trainer), on_lost=self._twin_lost)
        self._names = {id(p): name for name, p in self._watched.named_parameters()}
        self._trained |= {self._names[id(p)] for g in optimizer.param_groups for p in g["params"]
                          if p.requires_grad and id(p) in self._names}
        self._hook(optimizer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Find the run folder (on every rank) and give TensorBoard the custom-scalars layout."""
        # On every rank: under DDP trainer.log_dir is a collective call. Without a logger there is no run folder.
        self._log_folder = trainer.log_dir if trainer.loggers else None
        writer = _tensorboard(trainer)
        if writer is not None and trainer.is_global_zero:
            from lightning_lazy.watch.report import custom_scalars_layout

            writer.add_custom_scalars(custom_scalars_layout())

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """Measure at w0 before the first batch; hand the batch to the twin and arm it for the real forward."""
        self._rewind(trainer, pl_module)
        if self.measures is None:
            self._measure_at_w0(trainer, pl_module)
        self._cost.step_started()  # the step's time, the twin's included, not the measurement's
        if self._following_twin() is None:
            return
        # The trainer converts inputs inside training_step (e.g. to float64 under precision="64-true").
        self._batch = self._read_batch(trainer.precision_plugin.convert_input(batch))
        self.twin.arm()

    @override
    def on_before_zero_grad(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        """The real gradients are cleared: so are the twin's."""
        if self.twin is not None:
            self.twin.zero_grad()

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        """Back-propagate the twin's loss on the batch whose real loss is about to be back-propagated."""
        # The real loss of this batch is about to be back-propagated: so is the twin's, and only then (a batch
        # that training_step skips, or that another callback runs forward only, contributes nothing).
        if self._following_twin() is None or self._batch is None:
            return
        x, y, extra = self._batch
        try:
            twin_loss = float(self.twin.accumulate(x, y, extra, weight=1.0 / trainer.accumulate_grad_batches))
        except TwinError as error:  # the twin's backward reached a real gradient: refuse before it changes the run
            raise MisconfigurationException(f"LazyTrainingMonitor: {error} (track_tangent=False)") from None
        except (RuntimeError, NotImplementedError) as error:
            # The twin's backward runs outside forward_ad_safe: a missing rule surfaces here, as one line.
            one_line = as_forward_ad_error(error, "LazyTrainingMonitor, the tangent twin's backward")
            if one_line is None:
                raise
            raise one_line from None
        real_loss = self._real_loss(trainer, loss)
        self._twin_loss_sum += twin_loss / self._loss_scale
        self._real_loss_sum += real_loss / self._loss_scale
        self._twin_loss_count += 1
        if not self._objective_checked and self._steps == 0:
            self._objective_checked = True
            self._check_objective(trainer, real_loss, twin_loss)
        self._batch = None

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remember the gradients backward produced, to compare with those the optimizer steps with."""
        if self._following_twin() is not None:
            self.twin.gradients_produced()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Measure at the requested global steps."""
        self._cost.step_ended()
        if len(self._cost.step_seconds) == 1:  # the measurement at w0 against the first step: say it early
            self._advise_on_cost("initial")
        if self._is_log_step(trainer.global_step):
            self._measure_and_log(trainer, pl_module, on_step=True)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the epoch's tangent training loss; measure every ``every_n_epochs`` epochs."""
        if self._twin_loss_count and self._following_twin() is not None:
            self._last_twin_train_loss = self._twin_loss_sum / self._twin_loss_count
            self._last_train_loss = self._real_loss_sum / self._twin_loss_count
            pl_module.log("lazy/tangent/train_loss", self._last_twin_train_loss, sync_dist=True)
            self._twin_loss_sum, self._real_loss_sum, self._twin_loss_count = 0.0, 0.0, 0
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._measure_and_log(trainer, pl_module, on_step=False)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore the twin from a checkpoint for a validate() run, or say why there is none."""
        self._prepare_evaluation(trainer, pl_module)

    @override
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        """Accumulate the twin's loss and accuracy on the validation batch."""
        if not trainer.sanity_checking:
            self._evaluate_twin(trainer, batch)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the twin's validation loss and accuracy."""
        if not trainer.sanity_checking:
            self._log_twin_evaluation(trainer, pl_module, "val")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Print and log the laziness summary and draw the final figure."""
        self._hand_back(trainer)
        if not self.history:
            return
        text = self.summary()
        if trainer.is_global_zero:
            rank_zero_info(text)
            writer = _tensorboard(trainer)
            if writer is not None and self.figure:
                writer.add_text("lazy/summary", "\n".join("    " + line for line in text.splitlines()),
                                trainer.global_step)
            self._log_hparams(trainer)
            self._draw(trainer)
            if self._log_folder is not None:
                figure = os.path.join(self._log_folder, "laziness.png")
                rank_zero_info(f"LazyTrainingMonitor: logs in {self._log_folder} (tensorboard --logdir "
                               f"{self._log_folder})" + (f", figure {figure}" if os.path.exists(figure) else ""))

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore the twin from a checkpoint for a test() run, or say why there is none."""
        self._prepare_evaluation(trainer, pl_module)

    @override
    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        """Accumulate the twin's loss and accuracy on the test batch."""
        self._evaluate_twin(trainer, batch)

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the twin's test loss and accuracy."""
        self._log_twin_evaluation(trainer, pl_module, "test")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the hooks on the optimizer and the network."""
        self._release()

    @override
    def state_dict(self) -> dict[str, Any]:
        """What was measured at w0, the twin, the counters and the history: all a resumed run needs."""
        if self.measures is None:
            return {}
        return {
            "measures": self.measures.state_dict(),
            "trained": sorted(self._trained),
            "twin": None if self.twin is None else self.twin.state_dict(),
            "time": self._time,
            "steps": self._steps,
            "history": list(self.history),
            "layer_history": list(self.layer_history),
            "twin_loss": (self._twin_loss_sum, self._twin_loss_count),
        }

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """A checkpoint restored inside a running fit (a tuner undoing its trial steps): rewind to what it holds."""
        if trainer.state.fn != "fit" or not self._handles:
            return  # a resume, before on_fit_start: load_state_dict keeps the state for _build
        state = (checkpoint.get("callbacks") or {}).get(self.state_key)
        # Applied at the next hook: the optimizer's state, which the twin's optimizer copies, is restored after this.
        self._rewind_to = (copy.deepcopy(state) if state else None,)
        self._rewound = True

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the state until the module, its device and the optimizer exist (applied in ``_build``)."""
        if self._rewound:  # already applied by on_load_checkpoint, inside a running fit
            self._rewound = False
            return
        # Applied once the module, its device and the optimizer exist: in on_fit_start, or on_validation_start /
        # on_test_start for an evaluation from a checkpoint.
        self._loaded = dict(state_dict) if state_dict else None

    # ------------------------------------------------------------------------------------------ helpers

    def _twin_lost(self, cause: str, remedy: str = "Switch it off while monitoring to keep the divergence.",
                   measuring: bool = False) -> None:
        """The twin cannot follow what the real run did (``cause``: the module, hook or optimizer; ``remedy``: what
        the user can do): warn once, and stop logging the twin-based measures (divergence, tangent gap, tangent
        losses); the others go on. Found while ``measuring`` (after the last step), nothing is logged from this
        step on; found during the run (the twin's hooks), from the step under way.

        Never a wrong number: rather than log a divergence from a path the real run did not take, log none.
        """
        if self.twin is None or self.twin.lost is not None:
            return
        self.twin.lose(cause, self._steps if measuring else self._steps + 1, remedy)
        self._twin_loss_sum, self._real_loss_sum, self._twin_loss_count = 0.0, 0.0, 0
        self._last_twin_train_loss = self._last_train_loss = None  # (both were averaged over the twin's batches)
        self._warn_lost()

    def _warn_lost(self) -> None:
        rank_zero_warn(
            f"LazyTrainingMonitor: {self.twin.lost}; lazy/divergence, lazy/tangent_gap and lazy/tangent/* are no longer "
            f"logged from step {self.twin.lost_at}. {self.twin.lost_remedy}"
        )

    def _following_twin(self) -> TangentTwin | None:
        """The twin while it follows the real run; ``None`` without one or once it has lost the run."""
        return self.twin if self.twin is not None and self.twin.lost is None else None

    def _check_twin(self) -> None:
        """Ask the twin whether the real run did something it cannot follow since the last check."""
        twin = self._following_twin()
        if twin is None:
            return
        found = twin.check()
        if found is not None:
            self._twin_lost(*found, measuring=True)

    def _build(self, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer, **twin_options: Any) -> None:
        """Resolve the objective and the watched network, make the twin, and apply a loaded checkpoint state."""
        self._objective, self._loss_scale = resolve_objective(pl_module, self.loss, self.alpha)
        self._watched = resolve_watched(pl_module, self.model, self.output)
        if self.track_tangent:
            try:
                self.twin = TangentTwin(self._watched, optimizer, self._objective, **twin_options)
            except TwinError as error:  # an optimizer it cannot copy: one line, naming it
                raise MisconfigurationException(f"LazyTrainingMonitor: {error} (track_tangent=False)") from None
        loaded, self._loaded = self._loaded, None
        if loaded is not None:
            self._restore(loaded, pl_module)

    def _hand_back(self, trainer: pl.Trainer) -> None:
        """In a process the fit was spawned into (``strategy="ddp_spawn"``), rank 0 hands the history, the summary's
        numbers and the log folder back to the process that holds this monitor (read by :meth:`summary_values`)."""
        if os.getpid() == self._origin_pid or not trainer.is_global_zero:
            return
        torch.save({"history": list(self.history), "summary": self.summary_values(), "log_folder": self._log_folder},
                   self._hand_back_path)

    def _collect(self) -> None:
        """Read what spawned processes handed back (once), when this process measured nothing itself."""
        if self.measures is not None or self.history or not os.path.exists(self._hand_back_path):
            return
        self._carried = torch.load(self._hand_back_path, weights_only=False)
        os.remove(self._hand_back_path)
        self.history = list(self._carried["history"])
        self._log_folder = self._carried["log_folder"]

    def _rewind(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Go back to the monitor's part of a checkpoint restored in the middle of fit (``None``: nothing measured
        yet), once the trainer has restored the rest. Lightning's tuners (``LearningRateFinder``,
        ``BatchSizeFinder``, ``Tuner``) write a checkpoint, take trial steps on the real model with the callbacks
        swapped out (the optimizer's step hooks still fire), then restore it: the twin, the step count, normalized
        time and the history must forget those steps as the real run does. Everything is rebuilt as at fit start,
        from the restored weights and optimizer and the saved state."""
        if self._rewind_to is None:
            return
        (state,), self._rewind_to = self._rewind_to, None
        log_folder = self._log_folder
        self._release()
        self._reset_state()
        self._log_folder = log_folder
        self._loaded = state
        self.on_fit_start(trainer, pl_module)

    def _measure_at_w0(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Draw the probe and measure at w0, at the first training batch: by then the user's own hooks
        (``on_train_epoch_start`` putting a frozen backbone in eval, say) have set the modes training uses."""
        self.measures = self._make_probe(trainer, pl_module)
        try:
            self.measures.measure_initial(self._measured_names())
        except ValueError as error:
            raise MisconfigurationException(f"LazyTrainingMonitor: {error}") from None
        if self.measures.initial_relu is None:
            self._warn_no_activation_stability()
        if self.kernel_baseline:
            self._fit_kernel_baseline(trainer, pl_module)
        if self.initial_kappa is not None and self._adaptive is not None:
            rank_zero_info(
                f"LazyTrainingMonitor: alpha = {self._loss_scale ** -0.5:g}, kappa(w0) = {self.initial_kappa:.4g}; "
                f"the bound t~^2 kappa(w0) and its horizon hold for gradient descent (SGD, with or without momentum), "
                f"not for {self._adaptive}: neither is stated, the measures are."
            )
        elif self.initial_kappa is not None:
            rank_zero_info(
                f"LazyTrainingMonitor: alpha = {self._loss_scale ** -0.5:g}, ||Dh(w0)|| = "
                f"{self.initial_jacobian_norm:.4g}, kappa(w0) = {self.initial_kappa:.4g}; the bound t~^2 kappa(w0) "
                f"reaches 1 at normalized time t~ = {self.laziness_horizon:.4g}: the predicted laziness horizon."
            )

    def _warn_no_activation_stability(self) -> None:
        """Say why lazy/activation_stability is missing: name the smooth activations found, and what to read."""
        from lightning_lazy.diagnostics import recording_activation_states

        with recording_activation_states() as states:  # one forward of a few probe points, once
            self.measures.output(take(self.measures.x, slice(0, 8)))
        found = (f"its activations ({', '.join(states.smooth)}) are smooth, with no linear pieces for a unit to "
                 "switch between" if states.smooth else "it applies no activation the monitor recognizes")
        rank_zero_warn(
            f"LazyTrainingMonitor: the model has no piecewise-linear unit (ReLU, ReLU6, LeakyReLU, Hardtanh, "
            f"Hardswish, ...): {found}, so lazy/activation_stability is not logged. Read how far each layer's "
            "features moved instead: lazy/layers/<module>/feature_movement (and lazy/kernel_alignment)."
        )

    def _restore(self, state: dict[str, Any], pl_module: pl.LightningModule) -> None:
        self._trained = set(state["trained"])
        if self.twin is not None:
            if state["twin"] is None:
                raise MisconfigurationException(
                    "the checkpoint was written with track_tangent=False, so it holds no twin to resume; "
                    "resume with LazyTrainingMonitor(track_tangent=False) or start a new run"
                )
            self.twin.load_state_dict(state["twin"])
            if self.twin.lost is not None:
                self._warn_lost()
        saved = state["measures"]
        y = saved["y"] if saved.get("labels") is None else saved["labels"]  # class indices keep their -100s
        self.measures = LazinessProbe(self._watched, inputs_to(saved["x"], pl_module.device), y.to(pl_module.device),
                                      kappa_probe_size=self.kappa_probe_size, ntk_probe_size=self.ntk_probe_size,
                                      measure_kappa=self.measure_kappa, measure_ntk=self.measure_ntk,
                                      ntk_outputs=self.ntk_outputs, **self._layer_options())
        self.measures.load_state_dict(saved)  # w0 and what was measured there, not the resumed weights
        self._time = state["time"]
        self._steps = state["steps"]
        self.history = list(state["history"])
        self.layer_history = list(state.get("layer_history", []))  # absent from older checkpoints
        self._twin_loss_sum, self._twin_loss_count = state["twin_loss"]
        self._objective_checked = True

    def _read_batch(self, batch: Any) -> tuple[Tensor, Any, dict]:
        read = self.batch_to_xy(batch)
        if not isinstance(read, (tuple, list)) or len(read) not in (2, 3):
            raise MisconfigurationException(
                f"batch_to_xy must return (x, y) or (x, y, loss_kwargs), got a {type(read).__name__}"
            )
        x, y, *rest = read
        return x, y, (rest[0] if rest else {})

    @staticmethod
    def _real_loss(trainer: pl.Trainer, loss: Tensor) -> float:
        """The loss training_step returned, from the one Lightning back-propagates."""
        real = float(loss.detach()) * trainer.accumulate_grad_batches  # Lightning divides it
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return real / float(scaler.get_scale()) if scaler is not None else real  # and AMP scales it

    def _check_objective(self, trainer: pl.Trainer, real: float, twin: float) -> None:
        """At w0 the twin is the network: its loss on the first batch must be the one training_step returned."""
        if "16" in str(trainer.precision):
            return  # half precision or autocast changes the real loss beyond round-off: nothing to compare
        dtype = self._probe_dtype()
        tolerance = 1e4 * torch.finfo(dtype).eps
        if not math.isclose(real, twin, rel_tol=tolerance, abs_tol=tolerance * 1e-3):
            rank_zero_warn(
                f"LazyTrainingMonitor: at w0 the twin's loss on the first batch is {twin:.6g}, but training_step "
                f"returned {real:.6g}: the monitor trains its twin on another objective than yours, so its divergence "
                "is not meaningful. Pass the loss you train with: LazyTrainingMonitor(loss=callable(output, y)) "
                "(including any 1/alpha^2 factor through alpha=), or the model/output/batch_to_xy your training_step uses."
                + self._causal_lm_hint()
            )

    def _causal_lm_hint(self) -> str:
        """For token batches read by the default ``batch_to_xy``: the causal-LM reader, which shifts self-labels."""
        x = self._batch[0] if self._batch else None
        if self.batch_to_xy is not default_batch_to_xy or not isinstance(x, Mapping) or "input_ids" not in x:
            return ""
        return (" For a causal LM whose labels are its input tokens (the model shifts them inside its own loss), pass "
                "batch_to_xy=lightning_lazy.callback.causal_lm_batch_to_xy.")

    def _probe_dtype(self) -> torch.dtype:
        params = list(self._watched.parameters())
        return params[0].dtype if params and params[0].is_floating_point() else torch.float32

    def _clipper(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Callable[[torch.optim.Optimizer], Any] | None:
        """What Lightning does to the gradients between backward and step, for any optimizer: the module's
        ``configure_gradient_clipping`` (by default the Trainer's clipping), as Lightning calls it."""
        # By name: the module may come from lightning.pytorch or pytorch_lightning.
        overridden = (type(pl_module).configure_gradient_clipping.__qualname__
                      != "LightningModule.configure_gradient_clipping")
        if not trainer.gradient_clip_val and not overridden:
            return None
        return lambda optimizer: pl_module.configure_gradient_clipping(
            optimizer, gradient_clip_val=trainer.gradient_clip_val, gradient_clip_algorithm=trainer.gradient_clip_algorithm)

    def _unscaler(self, trainer: pl.Trainer) -> Callable[[], Tensor] | None:
        """The inverse loss scale a gradient scaler (AMP) unscales the real gradients by before the step."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return None
        return lambda: scaler._scale.double().reciprocal().float()

    def _reducer(self, trainer: pl.Trainer) -> Callable[[Tensor], Tensor] | None:
        if trainer.world_size <= 1:
            return None
        return lambda flat: trainer.strategy.reduce(flat, reduce_op="mean")

    def _hook(self, optimizer: torch.optim.Optimizer) -> None:
        """Count the real optimizer's steps (normalized time), and let the twin follow them."""
        self._release()
        self._handles = [optimizer.register_step_post_hook(self._on_real_step)]
        if self._following_twin() is not None:
            self.twin.follow()

    def _on_real_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        stepped = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not stepped:
            return  # Lightning still calls step() when training_step returned None: no gradient, nothing moved
        self._time += float(optimizer.param_groups[0]["lr"])
        self._steps += 1
        self._trained.update(self._names[id(p)] for p in stepped if id(p) in self._names)

    def _release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.twin is not None:
            self.twin.release()

    def _layer_options(self) -> dict[str, Any]:
        return {"per_layer": self.per_layer, "layer_probe_size": self.layer_probe_size, "max_layers": self.max_layers}

    def _make_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> LazinessProbe:
        """The probe, drawn once (the same on every rank), with the watched network's w0."""
        if isinstance(self.probe, Mapping) and "labels" in self.probe:
            x, y, _ = self._read_batch(self.probe)  # a Hugging Face batch
        elif self.probe is not None:
            x, y = self.probe if isinstance(self.probe, (tuple, list)) else (self.probe, None)
        else:
            x, y, _ = self._probe_from_train_set(trainer)
        try:
            x = as_inputs(x)
        except ValueError as error:
            raise MisconfigurationException(
                f"LazyTrainingMonitor: {error}. For several positional inputs, stack them in batch_to_xy and unpack "
                "them in model=lambda module, x: module(x[:, 0], x[:, 1]); named inputs can be a dict"
            ) from None
        if num_examples(x) == 0:
            raise ValueError("the probe set is empty: give probe tensors with at least one example")
        if y is None:
            rank_zero_warn(
                "LazyTrainingMonitor: the probe has no targets, so the measures take y* = 0 (the divergence is relative "
                "to ||alpha h(w0)||, kappa's residual is ||alpha h||): give probe=(x, y), with -100 at the positions the "
                "loss ignores, to measure against the targets you train on."
            )
        x, y = trainer.strategy.broadcast((x, y))
        x = inputs_to(x, pl_module.device, self._probe_dtype())
        try:
            return LazinessProbe(self._watched, x, None if y is None else y.to(pl_module.device),
                                 kappa_probe_size=self.kappa_probe_size, ntk_probe_size=self.ntk_probe_size,
                                 measure_kappa=self.measure_kappa, measure_ntk=self.measure_ntk,
                                 ntk_outputs=self.ntk_outputs, **self._layer_options())
        except ProbeMemoryError as error:
            raise MisconfigurationException(f"LazyTrainingMonitor: {self._probe_memory_remedy(error)}") from None
        except ValueError as error:
            raise MisconfigurationException(f"LazyTrainingMonitor: {error}") from None

    def _probe_memory_remedy(self, error: ProbeMemoryError) -> str:
        """The one-line refusal of a probe over the memory budget: its cause, and the largest probe that fits (never
        chosen silently: a smaller probe gives other numbers)."""
        if not error.largest:
            return str(error)
        examples = f"{error.largest} example{'s' if error.largest > 1 else ''}"
        way = (f"give a probe= of at most {examples}" if self.probe is not None else
               f"pass probe_size={error.largest} (or a probe= of at most {examples})")
        given = "" if self.probe is not None else f" (probe_size={self.probe_size}, at most the training set)"
        return (f"{error.cause}{given}: {way}, lower kappa_probe_size / layer_probe_size, or raise "
                "lightning_lazy.diagnostics.DEFAULT_MEMORY_BUDGET")

    def _probe_from_train_set(self, trainer: pl.Trainer, size: int | None = None, seed: int = 0) -> tuple[Tensor, Any, dict]:
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise MisconfigurationException(
                "LazyTrainingMonitor draws its probe from the train DataLoader's dataset, which must be indexable; "
                "pass LazyTrainingMonitor(probe=(x, y)) instead"
            )
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randperm(len(dataset), generator=generator)[: size or self.probe_size].tolist()
        # Random transforms draw from the global RNG: fork it, so a run with the monitor trains exactly as one
        # without (the probe is augmented once, then fixed).
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            batch = loader.collate_fn([dataset[i] for i in indices])
        return self._read_batch(batch)

    def _measured_names(self) -> tuple[str, ...]:
        """Parameters the measures differentiate: those trainable now or at any point of the run."""
        trainable = self.measures.trainable_names()  # by identity: a renamed parameter keeps its name at w0
        return tuple(name for name in self.measures.initial if name in trainable | self._trained)

    def _measure_and_log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, on_step: bool) -> None:
        if self.measures is None:
            return  # no training batch has run: nothing was measured at w0
        self._rewind(trainer, pl_module)
        step, weights = trainer.global_step, self._weights_now()
        if self.history and self.history[-1]["step"] == float(step) and self._last_scalars[0] == (step, weights):
            # The network measured last, unchanged (the micro-batches of one accumulated step, or an epoch that ends
            # at a log step): one entry per optimizer step. The ‖D²h‖ search, a lower bound, would give another value.
            if not on_step:
                for name, value in self._last_scalars[1].items():
                    pl_module.log(name, value, sync_dist=True)
            return
        values = self.measure(pl_module)
        self._advise_on_cost("last")
        per_tensor = values.pop("displacement_per_tensor")
        self._last_per_tensor = per_tensor
        scalars = {f"lazy/{name}": value for name, value in values.items()}
        layers: dict[str, dict[str, float]] = {}
        for key in [key for key in values if key.startswith("layers/")]:  # kept apart from the history
            layer, name = key[len("layers/"):].rsplit("/", 1)
            layers.setdefault(layer, {})[name] = values.pop(key)
        self.history.append({"step": float(trainer.global_step), "epoch": float(trainer.current_epoch), **values})
        if layers:
            self.layer_history.append({"step": float(trainer.global_step), "normalized_time": values["normalized_time"],
                                       "layers": layers})

        from lightning_lazy.watch.report import regime_code

        code = regime_code(values)
        if math.isfinite(code):
            scalars["lazy/regime"] = code
        self._last_scalars = ((step, weights), dict(scalars))
        if on_step:
            # Straight to the loggers: pl_module.log from a batch hook would repeat the value at every step.
            # Lightning writes what is logged after k optimizer steps at step k - 1; so do we.
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics(scalars, step=trainer.global_step - 1)
        else:
            for name, value in scalars.items():
                pl_module.log(name, value, sync_dist=True)  # equal on every rank: quiets Lightning's advice
        # Rendering costs a few tenths of a second: at epoch ends (never at log steps) while that stays under 5 % of the
        # time since the last drawing, and at fit end.
        if trainer.is_global_zero and not on_step and time.perf_counter() - self._drawn_at >= 19 * self._draw_seconds:
            self._draw(trainer)

    def _weights_now(self) -> tuple:
        """What identifies the watched network's function between two measurements at one global step: the names
        and version counters of its parameters and buffers (a pruning mask added, an in-place write) and their
        norms (a write through ``.data`` moves no version counter)."""
        params = list(self._watched.named_parameters())
        buffers = [name for name, _ in self._watched.named_buffers()]
        norms = tensor_norms([p if p.is_floating_point() else None for _, p in params])
        return tuple((name, p._version) for name, p in params), tuple(buffers), tuple(norms)

    def _draw(self, trainer: pl.Trainer) -> None:
        """The laziness figure, rendered once: a TensorBoard image and ``laziness.png`` in the log folder."""
        writer = _tensorboard(trainer)
        if not self.figure or not self.history or self._drawn == len(self.history):
            return
        if self._log_folder is None and writer is None:
            return  # no logger: no run folder to save it in
        self._drawn = len(self.history)
        started = time.perf_counter()
        from lightning_lazy.watch.report import figure_to_png, laziness_figure

        horizon = self.summary_values()["horizon"]
        png = figure_to_png(laziness_figure(self.history, horizon=horizon, per_tensor=self._last_per_tensor,
                                            alpha=self._loss_scale ** -0.5))
        self._save_png(png, "laziness.png", writer, "lazy/figure", trainer.global_step)
        self._draw_layers(writer)
        self._drawn_at = time.perf_counter()
        self._draw_seconds = self._drawn_at - started

    def _draw_layers(self, writer: Any) -> None:
        """The per-layer heat map (feature movement and NTK share, layers × measurements): a TensorBoard image
        ``lazy/layers`` and ``layers.png`` in the log folder."""
        if not self.layer_history:
            return
        from lightning_lazy.watch.report import figure_to_png, layers_figure

        png = figure_to_png(layers_figure(self.layer_history))
        self._save_png(png, "layers.png", writer, "lazy/layers", int(self.layer_history[-1]["step"]))

    def _save_png(self, png: bytes, file: str, writer: Any, tag: str, step: int) -> None:
        """One encoded figure, the same bytes twice: ``file`` in the log folder and the TensorBoard image ``tag``.

        torch's ``SummaryWriter`` takes the PNG as it is, in the image summary it would have built
        (``add_image`` takes pixels only and would encode them again); another writer (tensorboardX, with
        its own protobuf classes) gets the decoded pixels through its ``add_image``.
        """
        if self._log_folder is not None:
            os.makedirs(self._log_folder, exist_ok=True)
            with open(os.path.join(self._log_folder, file), "wb") as f:
                f.write(png)
        if writer is None:
            return
        try:
            from tensorboard.compat.proto.summary_pb2 import Summary
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # no tensorboard package: the writer is tensorboardX's
            SummaryWriter = None  # noqa: N806
        if SummaryWriter is None or not isinstance(writer, SummaryWriter):
            import io

            import numpy as np
            from PIL import Image

            with Image.open(io.BytesIO(png)) as image:
                writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
            return
        # A PNG's size is in its header chunk (IHDR): width and height, 4 bytes big-endian each, from byte 16.
        width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
        summary = Summary(value=[Summary.Value(tag=tag, image=Summary.Image(
            height=height, width=width, colorspace=3, encoded_image_string=png))])
        writer._get_file_writer().add_summary(summary, step)

    def _moved_layers(self, count: int = 3) -> list[tuple[str, str, float]]:
        """The ``count`` layers that moved most at the last measurement, by feature movement (else displacement):
        ``[(layer, measure, value)]``."""
        if not self.layer_history:
            return []
        layers = self.layer_history[-1]["layers"]
        measure = "feature_movement" if any("feature_movement" in v for v in layers.values()) else "displacement"
        # A layer that did not move (learning rate 0, a frozen one) is no answer to "which moved most".
        ranked = sorted(((name, v[measure]) for name, v in layers.items() if v.get(measure, 0.0) > 0.0),
                        key=lambda item: -item[1])
        return [(name, measure, value) for name, value in ranked[:count]]

    def _fit_kernel_baseline(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The kernel predictor at w0 on ``kernel_baseline`` training examples, evaluated on the validation
        data (the probe without), logged as ``lazy/kernel/val_loss`` and ``lazy/kernel/val_acc``."""
        x, y, _ = self._probe_from_train_set(trainer, size=self.kernel_baseline, seed=1)
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise MisconfigurationException("LazyTrainingMonitor(kernel_baseline=...) needs batches read as (x, y) tensors")
        x, y = x.to(pl_module.device), y.to(pl_module.device)
        x = x.to(self._probe_dtype()) if x.is_floating_point() else x
        try:
            predict = self.measures.kernel_regression(self._measured_names(), x, y)
        except ValueError as error:
            raise MisconfigurationException(f"LazyTrainingMonitor: {error}") from None
        loaders = trainer.val_dataloaders
        loader = (loaders[0] if isinstance(loaders, (list, tuple)) and loaders else
                  next(iter(loaders.values()), None) if isinstance(loaders, dict) else loaders)
        if loader is not None:
            batches = (self._read_batch(trainer.precision_plugin.convert_input(batch)) for batch in loader)
        elif (targets := self.measures.regression_targets()) is not None and bool(targets.ne(0).any()):
            batches = iter([(self.measures.x, self._probe_targets(), {})])
        else:
            rank_zero_warn("LazyTrainingMonitor: no validation data and a probe without targets: the kernel "
                           "baseline lazy/kernel/* is not logged.")
            return
        sums = [0.0, 0.0, 0]  # loss R · examples, correct predictions, examples
        classes = False
        pending: list[tuple[Tensor, Any, dict]] = []

        def evaluate() -> None:
            # Batches predicted together: the training subset's kernel features are recomputed once per call.
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
                xb = xb.to(pl_module.device)
                xb = xb.to(self._probe_dtype()) if xb.is_floating_point() else xb
                pending.append((xb, yb.to(pl_module.device) if isinstance(yb, Tensor) else yb, extra))
                if sum(len(p[0]) for p in pending) >= 4 * len(x):
                    evaluate()
            if pending:
                evaluate()
        loss_sum, correct, count = sums
        totals = trainer.strategy.reduce(torch.tensor([loss_sum, correct, count], dtype=torch.float64,
                                                      device=pl_module.device), reduce_op="sum")
        values = {"val_loss": float(totals[0] / totals[2])}
        if classes:
            values["val_acc"] = float(totals[1] / totals[2])
        self.kernel_baseline_values = values
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({f"lazy/kernel/{k}": v for k, v in values.items()}, step=trainer.global_step)
        rank_zero_info(f"LazyTrainingMonitor: kernel baseline (the tangent model at w0 trained to convergence on "
                       f"{len(x)} training examples): " + ", ".join(f"{k} = {v:.4g}" for k, v in values.items()))

    def _probe_targets(self) -> Tensor:
        """The probe's targets as given (class indices stay indices), for the kernel baseline without validation data."""
        y = self.probe[1] if isinstance(self.probe, (tuple, list)) else None
        if isinstance(y, Tensor):
            return y.to(self.measures.x.device)
        return self.measures.regression_targets()  # drawn from the train set and one-hot encoded: regression targets

    def _log_hparams(self, trainer: pl.Trainer) -> None:
        """The regime and the last measures as HParams metrics of the TensorBoard loggers: runs compare there."""
        from lightning_lazy.watch.report import regime_code

        last = self.history[-1]
        metrics = {f"lazy/{key}": float(last[key]) for key in ("divergence", "activation_stability", "kernel_alignment")
                   if key in last and math.isfinite(float(last[key]))}
        code = regime_code(last)
        if math.isfinite(code):
            metrics["lazy/regime"] = code
        params = {"lazy/alpha": self._loss_scale ** -0.5, "lazy/optimizer": type(trainer.optimizers[0]).__name__
                  if trainer.optimizers else "none"}
        writer = _tensorboard(trainer)
        if writer is None or not metrics:
            return
        from torch.utils.tensorboard.summary import hparams

        # What TensorBoardLogger.log_hyperparams(params, metrics) writes, less its logging of the metrics again:
        # the HParams tab reads their values from the scalars already logged, which a repeat would duplicate.
        file_writer = writer._get_file_writer()
        for summary in hparams(params, metrics):
            file_writer.add_summary(summary, trainer.global_step)

    def _prepare_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before validate/test: restore the twin from a checkpoint if one was loaded, or say why there is none."""
        if self._loaded is not None and self.track_tangent and trainer.state.fn != "fit":
            # The saved groups replace this optimizer's; validate/test hooks run in inference mode: the twin must not.
            with torch.inference_mode(False):
                self._build(pl_module, torch.optim.SGD(pl_module.parameters(), lr=0.0))
        if self.twin is None and self.track_tangent and not self._warned_no_twin and trainer.state.fn != "fit":
            self._warned_no_twin = True
            rank_zero_warn(
                "LazyTrainingMonitor has no tangent twin to evaluate, so no lazy/tangent/* is logged: run validate/test "
                "after fit with the same monitor, or from a checkpoint written by a fit with the monitor (ckpt_path=...)."
            )

    def _evaluate_twin(self, trainer: pl.Trainer, batch: Any) -> None:
        """Accumulates the tangent model's loss R and accuracy on an evaluation batch."""
        if self._following_twin() is None:
            return
        x, y, extra = self._read_batch(trainer.precision_plugin.convert_input(batch))
        output = self.twin.eval_output(x)
        n = num_examples(x)
        with torch.no_grad():
            self._eval_loss_sum += float(self._objective(output, y, **extra)) / self._loss_scale * n
        self._eval_count += n
        if isinstance(y, Tensor) and not y.is_floating_point() and y.shape == output.shape[:-1]:
            kept = y != IGNORE_INDEX  # accuracy over the positions the loss counts
            if bool(kept.any()):
                self._eval_correct += float((output.argmax(-1) == y)[kept].float().mean()) * n
            self._eval_is_classification = True

    def _log_twin_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._following_twin() is None or self._eval_count == 0:
            return
        totals = torch.tensor([self._eval_loss_sum, self._eval_correct, self._eval_count], dtype=torch.float64,
                              device=pl_module.device)
        totals = trainer.strategy.reduce(totals, reduce_op="sum")
        # Already summed over ranks; sync_dist=True only quiets Lightning's advice to sync epoch-level values.
        pl_module.log(f"lazy/tangent/{stage}_loss", float(totals[0] / totals[2]), sync_dist=True)
        if self._eval_is_classification:
            pl_module.log(f"lazy/tangent/{stage}_acc", float(totals[1] / totals[2]), sync_dist=True)
        self._eval_loss_sum, self._eval_correct, self._eval_count = 0.0, 0, 0

    def _advise_on_cost(self, bucket: str) -> None:
        """Warn once when the measurement ``bucket`` ("initial", "last") cost as much as many training steps."""
        rarer = "every_n_epochs=N" if self.log_steps is None else "log_steps=None / every_n_epochs=N"
        advice = self._cost.advice(self.timings.get(bucket, {}), self._measured_when(), rarer)
        if advice is not None:
            rank_zero_warn(advice)

    def _measured_when(self) -> str:
        """When measurements run, in words (for the cost warning)."""
        if self.log_steps is None:
            steps = ""
        elif self.log_steps == "log":
            steps = "at steps 1, 2, 4, 8, ..."
        else:
            listed = list(self.log_steps)
            steps = f"at steps {', '.join(map(str, listed[:6]))}{', ...' if len(listed) > 6 else ''}"
        epochs = "every epoch end" if self.every_n_epochs == 1 else f"every {self.every_n_epochs} epochs"
        return f"{steps} and {epochs}" if steps else epochs

    def _is_log_step(self, step: int) -> bool:
        if self.log_steps is None or step == 0:
            return False
        if self.log_steps == "log":
            return step & (step - 1) == 0
        return step in self.log_steps


def _display(name: str) -> str:
    return name[len(_PREFIX):] if name.startswith(_PREFIX) else name


def _layer_name(name: str) -> str:
    """A layer's name in the tags: its name in the watched network; ``root`` for parameters it owns itself."""
    return "root" if name == _PREFIX[:-1] else _display(name)


__all__ = ["LazyTrainingMonitor", "causal_lm_batch_to_xy", "default_batch_to_xy"]
