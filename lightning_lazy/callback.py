"""LazyTrainingMonitor: the Lightning adapter of the framework-neutral core (:mod:`lightning_lazy.watch`).

It translates Lightning's events into calls on :class:`~lightning_lazy.watch.core.LazinessWatch`, which owns the
twin, the probe, the schedule, the history and the outputs: hooks in lifecycle order, each one line of intent.
What it knows of Lightning: the trainer's optimizers, precision, strategy (processes, DDP reduction, ddp_spawn's
hand-back), loggers, data loaders, checkpoints and tuners.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_lazy.scaling import LossLike
from lightning_lazy.watch.batches import BatchToXY, WatchError, causal_lm_batch_to_xy, default_batch_to_xy
from lightning_lazy.watch.core import Host, LazinessWatch
from lightning_lazy.watch.objective import WatchLike
from lightning_lazy.watch.options import Measure, Watch, WatchOptions, When, Write
from lightning_lazy.watch.probe import LazinessProbe, NtkOutputs
from lightning_lazy.watch.twin import OutputSelector, TangentTwin


@contextlib.contextmanager
def _refusals() -> Iterator[None]:
    """The core's one-line refusals as Lightning's configuration error, without a chained traceback."""
    try:
        yield
    except WatchError as error:
        raise MisconfigurationException(str(error)) from None


class _LightningHost(Host):
    """The core's view of a Lightning Trainer: its processes, its loggers, its data."""

    who = "LazyTrainingMonitor"

    def __init__(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().__init__()
        self.trainer, self.pl_module = trainer, pl_module

    @property
    def is_global_zero(self) -> bool:
        return self.trainer.is_global_zero

    @property
    def world_size(self) -> int:
        return self.trainer.world_size

    def reduce_sum(self, tensor: Tensor) -> Tensor:
        return self.trainer.strategy.reduce(tensor.to(self.pl_module.device), reduce_op="sum")

    def broadcast(self, obj: Any) -> Any:
        return self.trainer.strategy.broadcast(obj)

    def warn(self, message: str) -> None:
        rank_zero_warn(message)

    def info(self, message: str) -> None:
        rank_zero_info(message)

    def log_scalars(self, scalars: Mapping[str, float], step: int, epoch_end: bool) -> None:
        trainer = self.trainer
        if epoch_end:
            for name, value in scalars.items():
                self.pl_module.log(name, value, sync_dist=True)  # equal on every rank: quiets Lightning's advice
        elif trainer.is_global_zero:
            # Straight to the loggers: pl_module.log from a batch hook would repeat the value at every step.
            # Lightning writes what is logged after k optimizer steps at step k - 1; so do we.
            for logger in trainer.loggers:
                logger.log_metrics(dict(scalars), step=max(trainer.global_step - 1, 0))

    def log_again_at_epoch_end(self, scalars: Mapping[str, float], step: int) -> None:
        self.log_scalars(scalars, step, epoch_end=True)  # callback_metrics hold the epoch's values

    def convert(self, batch: Any) -> Any:
        # The trainer converts inputs inside training_step (e.g. to float64 under precision="64-true").
        return self.trainer.precision_plugin.convert_input(batch)

    def probe_source(self) -> Any:
        return self.trainer.train_dataloader

    def validation_batches(self) -> Iterable[Any] | None:
        loaders = self.trainer.val_dataloaders
        return (loaders[0] if isinstance(loaders, (list, tuple)) and loaders else
                next(iter(loaders.values()), None) if isinstance(loaders, dict) else loaders)


def _last_epoch(trainer: pl.Trainer) -> bool:
    """Whether the epoch ending now is the fit's last: max_epochs or max_steps reached, or a callback stopped it."""
    return bool(trainer.should_stop
                or (trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs)
                or (trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps))


class LazyTrainingMonitor(Callback):
    r"""Trains a linearized twin in lock-step and logs the laziness measures of Chizat et al. (2019).

    The Lightning adapter of :class:`~lightning_lazy.watch.core.LazinessWatch`: it translates Lightning's events
    (batch start, backward, optimizer step, epoch end, validation, checkpoint) into calls on the core, which does
    all the measuring, for automatic and manual optimization (the twin follows the optimizer that steps the watched
    parameters through ``self.manual_backward(loss)`` and ``opt.step()``; several optimizers: ``track_tangent=False``).
    The options can also be given in four groups: ``watch=Watch(...)``, ``measure=Measure(...)``,
    ``when=When(...)``, ``write=Write(...)`` (:mod:`lightning_lazy.watch.options`).

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

        budget: the share of the fit's wall time the measurements may take (default ``0.05``; ``None``: every
            scheduled measurement in full): a scheduled measurement that would exceed it leaves out its costliest
            parts (κ, the NTK, the per-layer measures: the costliest first, by what each took last time), or is
            left out, and the summary says what was spent and thinned
            (:class:`~lightning_lazy.watch.schedule.Budget`); ``lazy/cost/share`` logs the share spent. The
            measurement at w0, the last epoch's (the end state), and every epoch end's when another callback
            monitors a ``lazy/`` key (``ModelCheckpoint``, ``EarlyStopping``) are always taken in full: they count in
            ``lazy/cost/share`` but not against the budget. An experiment that plots every measurement passes
            ``budget=None``.

    Logged under ``lazy/``: ``regime`` (1 lazy, 0.5 in between, 0 feature learning:
    :data:`lightning_lazy.watch.report.REGIME_CODES`), ``divergence`` Δ, ``bound`` (= t̃²·κ(w0); only for gradient
    descent and SGD with momentum, see :mod:`lightning_lazy._optim`), ``kappa``, ``jacobian_norm``,
    ``hessian_norm``, ``displacement``, ``tangent_gap``, ``ntk_distance``, ``kernel_alignment``,
    ``activation_stability``, ``normalized_time``, ``tangent/train_loss``, ``tangent/val_loss``
    (``test_loss`` under ``trainer.test``) and, for integer targets, ``tangent/val_acc`` / ``test_acc``.
    The losses logged are R (without the 1/α² factor), comparable across α. At the end of fit the regime and
    the last measures also go to TensorBoard's HParams tab (the summaries of ``log_hyperparams(params, metrics)``,
    params ``lazy/alpha`` and ``lazy/optimizer``), and one
    line names the log folder and the figure. The figures and the summary go to every logger of the trainer:
    TensorBoard (images, text), W&B (images, text), MLflow (artifacts), CSV (files beside ``metrics.csv``).
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
        budget: float | None = 0.05,
        watch: Watch | None = None,
        measure: Measure | None = None,
        when: When | None = None,
        write: Write | None = None,
    ) -> None:
        super().__init__()
        self.options = WatchOptions.build(
            {"watch": watch, "measure": measure, "when": when, "write": write}, loss=loss, alpha=alpha, model=model,
            output=output, probe=probe, probe_size=probe_size, kappa_probe_size=kappa_probe_size,
            ntk_probe_size=ntk_probe_size, ntk_outputs=ntk_outputs, every_n_epochs=every_n_epochs, log_steps=log_steps,
            track_tangent=track_tangent, batch_to_xy=batch_to_xy, measure_kappa=measure_kappa, measure_ntk=measure_ntk,
            figure=figure, per_layer=per_layer, layer_probe_size=layer_probe_size, max_layers=max_layers,
            kernel_baseline=kernel_baseline, budget=budget)
        self.core: LazinessWatch | None = None
        self._loaded: dict[str, Any] | None = None
        self._rewound = False  # on_load_checkpoint took the state that load_state_dict is about to get
        self._rewind_to: tuple[dict[str, Any] | None] | None = None  # (state,) to go back to at the next hook
        self._batch: tuple | None = None
        self._log_folder: str | None = None
        self._warned_no_twin = False
        self._manual = False
        self._clip_call: tuple | None = None  # manual optimization: the self.clip_gradients call of this step
        self._unpatch: Callable[[], None] | None = None
        # Where a fit run in processes this one spawned (strategy="ddp_spawn") hands its results back.
        self._origin_pid = os.getpid()
        self._hand_back_path = os.path.join(tempfile.gettempdir(), f"lightning_lazy_{os.getpid()}_{uuid.uuid4().hex}.pt")
        self._carried: dict[str, Any] | None = None
        self._monitored: list[str] = []  # lazy/ keys another callback monitors (ModelCheckpoint, EarlyStopping)

    # ------------------------------------------------------------------------------------------ results

    @property
    def history(self) -> list[dict[str, float]]:
        """One dict per measurement: ``step``, ``epoch`` and the measures (after a fit in spawned processes, rank 0's
        once :meth:`summary` has read them back)."""
        if self.core is None:
            return list(self._carried["history"]) if self._carried is not None else []
        return self.core.history

    @property
    def layer_history(self) -> list[dict[str, Any]]:
        """Per measurement: ``step``, ``normalized_time`` and ``layers`` = ``{layer: {measure: value}}``."""
        return [] if self.core is None else self.core.layer_history

    @property
    def measures(self) -> LazinessProbe | None:
        """The probe and what was measured at w0 (``None`` before the first training batch)."""
        return None if self.core is None else self.core.measures

    @property
    def twin(self) -> TangentTwin | None:
        """The tangent twin (``None`` with ``track_tangent=False`` or before fit)."""
        return None if self.core is None else self.core.twin

    @property
    def kernel_baseline_values(self) -> dict[str, float] | None:
        return None if self.core is None else self.core.kernel_baseline_values

    @property
    def initial_kappa(self) -> float | None:
        """κ(w0), measured at the start of fit (``None`` before, or with ``measure_kappa=False``)."""
        return None if self.core is None else self.core.initial_kappa

    @property
    def initial_jacobian_norm(self) -> float | None:
        """‖Dh(w0)‖ in the empirical L² norm of the probe (sets the unit of normalized time)."""
        return None if self.core is None else self.core.initial_jacobian_norm

    @property
    def laziness_horizon(self) -> float:
        """Normalized time at which the bound t̃²·κ(w0) reaches 1 (``inf`` when κ(w0) = 0)."""
        if self.core is None or self.core.measures is None:
            raise RuntimeError("the laziness horizon needs kappa(w0): fitting has not started")
        return self.core.laziness_horizon

    @property
    def timings(self) -> dict[str, dict[str, float]]:
        """Seconds each measure took: ``{"initial": {...}, "last": {...}}`` (fit start, last measurement)."""
        return {} if self.core is None else self.core.timings

    def measure(self, pl_module: pl.LightningModule | None = None) -> dict[str, Any]:
        """The measures now, as floats (``displacement_per_tensor``: a dict of floats by tensor name; the per-layer
        measures as ``"layers/<layer>/<measure>"``), without logging them."""
        if self.core is None or self.core.measures is None:
            raise RuntimeError("LazyTrainingMonitor.measure needs the probe: fitting has not started")
        with _refusals():
            return self.core.values()

    def summary_values(self) -> dict[str, Any]:
        """The numbers of the fit-end summary (:func:`lightning_lazy.watch.report.laziness_summary`). After a fit run
        in spawned processes (``strategy="ddp_spawn"``), those its rank 0 handed back."""
        self._collect()
        if (self.core is None or self.core.measures is None) and self._carried is not None:
            return dict(self._carried["summary"])
        if self.core is None:
            return {key: None for key in ("alpha", "adaptive_optimizer", "kappa0", "horizon", "normalized_time",
                                          "divergence", "activation_stability", "kernel_alignment", "displacement",
                                          "loss", "tangent_loss")} | {"moved_layers": []}
        return self.core.summary_values()

    def summary(self) -> str:
        """The laziness summary printed and logged at the end of fit."""
        from lightning_lazy.watch.report import laziness_summary

        self._collect()
        if (self.core is None or self.core.measures is None) and self._carried is not None:
            return (laziness_summary(self._carried["summary"]) +
                    f"\n(measured by rank 0 of the processes the fit ran in; its values were logged under "
                    f"{self._carried['log_folder'] or 'no log folder: the trainer had no logger'})")
        if self.core is None:
            return "LazyTrainingMonitor has measured nothing: fitting has not started"
        return self.core.summary()

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
            # A checkpoint's state (load_state_dict comes after setup) replaces this.
            self._release()
            self.core, self._batch, self._carried = None, None, None
            # A callback that monitors a measure (ModelCheckpoint, EarlyStopping) needs it at every epoch end: the
            # budget must not leave those out or thin them.
            self._monitored = sorted({m for c in trainer.callbacks if isinstance(m := getattr(c, "monitor", None), str)
                                      and m.startswith("lazy/")})
            if self._monitored and self.options.when.budget is not None:
                rank_zero_info(f"LazyTrainingMonitor: {', '.join(self._monitored)} is monitored by another callback, so "
                               "the measurements at epoch ends are taken in full whatever the budget.")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Find the optimizer that steps the watched network, build the core (twin, objective), hook the optimizer."""
        self._manual = not pl_module.automatic_optimization
        track = self.options.watch.track_tangent
        optimizers = list(trainer.optimizers)
        if track and len(optimizers) != 1:
            raise MisconfigurationException(
                f"LazyTrainingMonitor's tangent twin follows one optimizer, and this fit has {len(optimizers)} (several "
                "optimizers stepping on different objectives, as a GAN's, have no single tangent path): pass "
                "LazyTrainingMonitor(track_tangent=False, model='<the sub-module to watch>') to keep every other measure."
            )
        optimizer = optimizers[0] if len(optimizers) == 1 else None
        if isinstance(optimizer, torch.optim.LBFGS) and track:
            raise MisconfigurationException(
                "LazyTrainingMonitor cannot follow LBFGS: it re-evaluates its closure several times per step. Use a "
                "first-order optimizer, or LazyTrainingMonitor(track_tangent=False) to keep the other measures."
            )
        host = _LightningHost(trainer, pl_module)
        clip = self._manual_clipper(pl_module) if self._manual else self._clipper(trainer, pl_module)
        with _refusals():
            self.core = LazinessWatch(pl_module, optimizer, options=self.options, host=host, clip=clip,
                                      reduce_gradients=self._reducer(trainer), unscale=self._unscaler(trainer),
                                      infer_loss_weight=self._manual)
        self.core.on_step_taken = lambda: None  # measured at on_train_batch_end, by the trainer's global step
        loaded, self._loaded = self._loaded, None
        if loaded is not None:
            with _refusals():
                self.core.load_state_dict(loaded)
        # Manual optimization steps and clears through Lightning's optimizer wrappers: follow their zero_grad too.
        self.core.start(extra_zero_grad=getattr(trainer.strategy, "_lightning_optimizers", []) if self._manual else ())

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Find the run folder (on every rank) and the writers of the trainer's loggers."""
        from lightning_lazy.watch.writers import writers_for_loggers

        # On every rank: under DDP trainer.log_dir is a collective call. Without a logger there is no run folder.
        self._log_folder = trainer.log_dir if trainer.loggers else None
        if trainer.is_global_zero and self.core is not None:
            self.core.set_writers(writers_for_loggers(trainer.loggers, self._log_folder))

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """Measure at w0 before the first batch; hand the batch to the twin and arm it for the real forward."""
        self._rewind(trainer, pl_module)
        core = self.core
        if core.measures is None:
            # By now the user's own hooks (on_train_epoch_start putting a frozen backbone in eval) set the modes.
            with _refusals():
                core.start_measuring()
        core.step_started()  # the step's time, the twin's included, not the measurement's
        self._clip_call = None  # manual optimization: a clipping this batch calls is replayed at its step
        if core.following_twin() is None:
            return
        with _refusals():
            self._batch = core.read(batch)
        core.arm()

    @override
    def on_before_zero_grad(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        """The real gradients are cleared: so are the twin's."""
        if self.twin is not None:
            self.twin.zero_grad()

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        """Back-propagate the twin's loss on the batch whose real loss is about to be back-propagated."""
        # A batch that training_step skips, or that another callback runs forward only, contributes nothing.
        if self.core is None or self.core.following_twin() is None or self._batch is None:
            return
        x, y, extra = self._batch
        self._batch = None
        # Manual optimization: the loop scales its loss as it accumulates; the gradient check at w0 finds the weight.
        weight = 1.0 if self._manual else 1.0 / trainer.accumulate_grad_batches
        real = None if self._manual else self._real_loss(trainer, loss)
        with _refusals():
            self.core.accumulate(x, y, extra, weight=weight, real_loss=real, precision=str(trainer.precision))

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remember the gradients backward produced; at the first, compare them with the twin's (the objective)."""
        if self.core is None or self.core.following_twin() is None:
            return
        self.twin.gradients_produced()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        self.core.check_gradients(str(trainer.precision), scale)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Measure at the requested global steps."""
        self.core.step_ended()
        if self.core.schedule.is_log_step(trainer.global_step):
            self._measure_and_log(trainer, pl_module, on_step=True)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the epoch's tangent training loss; measure every ``every_n_epochs`` epochs."""
        self.core.agree()  # every process logs the same keys
        loss = self.core.end_epoch_losses()
        if loss is not None:
            pl_module.log("lazy/tangent/train_loss", loss, sync_dist=True)
        if self.core.schedule.is_epoch(trainer.current_epoch):
            # The last epoch's measurement is the end state's (callback_metrics hold it after the fit), and one a
            # callback monitors must be there: both are taken in full whatever the budget.
            forced = bool(self._monitored) or _last_epoch(trainer)
            self._measure_and_log(trainer, pl_module, on_step=False, forced=forced)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore the twin from a checkpoint for a validate() run, or say why there is none."""
        self._prepare_evaluation(trainer, pl_module)

    @override
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        """Accumulate the twin's loss and accuracy on the validation batch."""
        if not trainer.sanity_checking:
            self._evaluate_twin(batch)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the twin's validation loss and accuracy."""
        if not trainer.sanity_checking:
            self._log_twin_evaluation(pl_module, "val")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Print the laziness summary; the summary, the HParams and the final figures to every logger."""
        self._hand_back(trainer)
        if self.core is None or not self.core.history:
            return
        if not self.core.measured_whole(trainer.global_step):
            with _refusals():  # the budget left the end state out or thinned it: it is measured all the same
                self.core.measure_and_log(trainer.global_step, on_step=True, epoch=trainer.current_epoch, forced=True)
        optimizer = type(trainer.optimizers[0]).__name__ if trainer.optimizers else "none"
        text = self.core.finish(trainer.global_step, optimizer)
        if trainer.is_global_zero and text is not None:
            rank_zero_info(text)
            if self._log_folder is not None:
                figure = os.path.join(self._log_folder, "laziness.png")
                from lightning_lazy.watch.report import tensorboard_command

                tensorboard = any(cls.__name__ == "TensorBoardLogger" for logger in trainer.loggers
                                  for cls in type(logger).__mro__)
                rank_zero_info(f"LazyTrainingMonitor: logs in {self._log_folder}"
                               + (f" (to see them: {tensorboard_command(self._log_folder)})" if tensorboard else "")
                               + (f", figure {figure}" if os.path.exists(figure) else ""))

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore the twin from a checkpoint for a test() run, or say why there is none."""
        self._prepare_evaluation(trainer, pl_module)

    @override
    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        """Accumulate the twin's loss and accuracy on the test batch."""
        self._evaluate_twin(batch)

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the twin's test loss and accuracy."""
        self._log_twin_evaluation(pl_module, "test")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the hooks on the optimizer and the network."""
        self._release()

    @override
    def state_dict(self) -> dict[str, Any]:
        """What was measured at w0, the twin, the counters and the history: all a resumed run needs."""
        return {} if self.core is None else self.core.state_dict()

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """A checkpoint restored inside a running fit (a tuner undoing its trial steps): rewind to what it holds."""
        if trainer.state.fn != "fit" or self.core is None or not self.core._handles:
            return  # a resume, before on_fit_start: load_state_dict keeps the state for on_fit_start
        state = (checkpoint.get("callbacks") or {}).get(self.state_key)
        # Applied at the next hook: the optimizer's state, which the twin's optimizer copies, is restored after this.
        self._rewind_to = (copy.deepcopy(state) if state else None,)
        self._rewound = True

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the state until the module, its device and the optimizer exist (applied in ``on_fit_start``)."""
        if self._rewound:  # already applied by on_load_checkpoint, inside a running fit
            self._rewound = False
            return
        self._loaded = dict(state_dict) if state_dict else None

    # ------------------------------------------------------------------------------------------ helpers

    def _measure_and_log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, on_step: bool,
                         forced: bool = False) -> None:
        if self.core is None or self.core.measures is None:
            return  # no training batch has run: nothing was measured at w0
        self._rewind(trainer, pl_module)
        with _refusals():
            self.core.measure_and_log(trainer.global_step, on_step=on_step, epoch=trainer.current_epoch, forced=forced)

    def _release(self) -> None:
        if self.core is not None:
            self.core.release()
        if self._unpatch is not None:
            self._unpatch()
            self._unpatch = None

    def _manual_clipper(self, pl_module: pl.LightningModule) -> Callable[[torch.optim.Optimizer], Any]:
        """Manual optimization clips in ``training_step`` through ``self.clip_gradients(opt, val, algorithm)``: record
        each call (per step) and replay it on the twin's optimizer, the same routine on the twin's gradients."""
        original = pl_module.clip_gradients
        monitor = self

        def clip_gradients(optimizer: Any, *args: Any, **kwargs: Any) -> Any:
            monitor._clip_call = (args, kwargs)
            return original(optimizer, *args, **kwargs)

        had = "clip_gradients" in vars(pl_module)
        pl_module.clip_gradients = clip_gradients

        def unpatch() -> None:
            if not had:
                vars(pl_module).pop("clip_gradients", None)

        self._unpatch = unpatch

        def replay(optimizer: torch.optim.Optimizer) -> None:
            if monitor._clip_call is not None:
                args, kwargs = monitor._clip_call
                original(optimizer, *args, **kwargs)

        return replay

    def _hand_back(self, trainer: pl.Trainer) -> None:
        """In a process the fit was spawned into (``strategy="ddp_spawn"``), rank 0 hands the history, the summary's
        numbers and the log folder back to the process that holds this monitor."""
        if os.getpid() == self._origin_pid or not trainer.is_global_zero or self.core is None:
            return
        torch.save({"history": list(self.core.history), "summary": self.core.summary_values(),
                    "log_folder": self._log_folder}, self._hand_back_path)

    def _collect(self) -> None:
        """Read what spawned processes handed back (once), when this process measured nothing itself."""
        if self._carried is not None or (self.core is not None and self.core.history):
            return
        if not os.path.exists(self._hand_back_path):
            return
        self._carried = torch.load(self._hand_back_path, weights_only=False)
        os.remove(self._hand_back_path)
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
        writers = self.core.host.writers if self.core is not None else []
        self._release()
        self._loaded = state
        self.on_fit_start(trainer, pl_module)
        self.core.set_writers(writers, set_up=True)

    @staticmethod
    def _real_loss(trainer: pl.Trainer, loss: Tensor) -> float:
        """The loss the training step computed, from the one Lightning back-propagates (automatic optimization)."""
        real = float(loss.detach()) * trainer.accumulate_grad_batches  # automatic optimization: Lightning divides it
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return real / float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else real  # AMP scales it

    def _clipper(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Callable[[torch.optim.Optimizer], Any] | None:
        """What Lightning does to the gradients between backward and step, for any optimizer: the module's
        ``configure_gradient_clipping`` (by default the Trainer's clipping), as Lightning calls it."""
        if not pl_module.automatic_optimization:
            return None  # manual optimization clips in training_step (self.clip_gradients): the twin's check sees it
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

    def _prepare_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before validate/test: restore the twin from a checkpoint if one was loaded, or say why there is none."""
        track = self.options.watch.track_tangent
        if self._loaded is not None and track and trainer.state.fn != "fit":
            # The saved groups replace this optimizer's; validate/test hooks run in inference mode: the twin must not.
            with torch.inference_mode(False), _refusals():
                self.core = LazinessWatch(pl_module, torch.optim.SGD(pl_module.parameters(), lr=0.0),
                                          options=self.options, host=_LightningHost(trainer, pl_module))
                loaded, self._loaded = self._loaded, None
                self.core.load_state_dict(loaded)
        if self.twin is None and track and not self._warned_no_twin and trainer.state.fn != "fit":
            self._warned_no_twin = True
            rank_zero_warn(
                "LazyTrainingMonitor has no tangent twin to evaluate, so no lazy/tangent/* is logged: run validate/test "
                "after fit with the same monitor, or from a checkpoint written by a fit with the monitor (ckpt_path=...)."
            )
        if self.core is not None and isinstance(self.core.host, _LightningHost):
            self.core.host.trainer, self.core.host.pl_module = trainer, pl_module  # the trainer of this evaluation

    def _evaluate_twin(self, batch: Any) -> None:
        if self.core is None or self.core.following_twin() is None:
            return
        with _refusals():
            x, y, extra = self.core.read(batch)
        self.core.evaluate(x, y, extra)

    def _log_twin_evaluation(self, pl_module: pl.LightningModule, stage: str) -> None:
        if self.core is None:
            return
        values = self.core.evaluation(pl_module.device)
        if values is None:
            return
        # Already summed over ranks; sync_dist=True only quiets Lightning's advice to sync epoch-level values.
        pl_module.log(f"lazy/tangent/{stage}_loss", values["loss"], sync_dist=True)
        if "acc" in values:
            pl_module.log(f"lazy/tangent/{stage}_acc", values["acc"], sync_dist=True)


__all__ = ["LazyTrainingMonitor", "causal_lm_batch_to_xy", "default_batch_to_xy"]
