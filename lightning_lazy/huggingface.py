"""LazyTrainingCallback: the Hugging Face ``transformers.Trainer`` adapter of the core (:mod:`lightning_lazy.watch`).

``Trainer(..., callbacks=[LazyTrainingCallback()])`` asks "is this fine-tuning lazy?": it translates the Trainer's
events into calls on :class:`~lightning_lazy.watch.core.LazinessWatch`, which trains the tangent twin in lock-step
and measures. The Trainer hands callbacks no batch, so the training forward's inputs are read by a forward
pre-hook on the model; the Trainer clears gradients with ``model.zero_grad()``, clips them with
``max_grad_norm`` and scales each micro-batch's loss for gradient accumulation: the twin does the same.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import TrainerCallback

from lightning_lazy._params import RNGState
from lightning_lazy.scaling import IGNORE_INDEX, LossLike
from lightning_lazy.watch.batches import WatchError, named_inputs
from lightning_lazy.watch.core import Host, LazinessWatch
from lightning_lazy.watch.options import Measure, Watch, WatchOptions, When, Write


class _TrainerHost(Host):
    """The core's view of a Hugging Face Trainer: one process, the integrations of ``report_to``."""

    who = "LazyTrainingCallback"

    def __init__(self, writers: Sequence[Any], folder: str, loader: Any) -> None:
        super().__init__(writers, folder)
        self.loader = loader

    def probe_source(self) -> Any:
        return self.loader


def default_loss(model: nn.Module) -> LossLike | None:
    """The loss a Hugging Face model computes itself from ``labels``, as R(output, y): cross-entropy for causal LMs
    (their labels shifted, see :func:`~lightning_lazy.watch.batches.is_causal_lm`) and single-label classification,
    mean squared error for a one-output regression head, binary cross-entropy with logits for multi-label
    classification; ``None`` when the model's config says none of these."""
    from lightning_lazy.watch.batches import is_causal_lm

    config = getattr(model, "config", None)
    if is_causal_lm(model):
        return "cross_entropy"
    if config is None or not type(model).__name__.endswith(("ForSequenceClassification", "ForTokenClassification",
                                                             "ForImageClassification")):
        return None
    problem = getattr(config, "problem_type", None)
    if getattr(config, "num_labels", 2) == 1 or problem == "regression":
        return lambda output, y: F.mse_loss(output.squeeze(-1), y.to(output.dtype).squeeze(-1))
    if problem == "multi_label_classification":
        return lambda output, y: F.binary_cross_entropy_with_logits(output, y.to(output.dtype))
    return "cross_entropy"


class LazyTrainingCallback(TrainerCallback):
    r"""Watches, in a Hugging Face ``Trainer``, how far fine-tuning is from its linearization (Chizat et al. 2019).

    Takes the options of :class:`~lightning_lazy.watch.core.LazinessWatch` (``loss``, ``alpha``, ``model``,
    ``output``, ``probe``, ``probe_size``, ``kappa_probe_size``, ``ntk_probe_size``, ``ntk_outputs``,
    ``log_steps``, ``every_n_epochs``, ``track_tangent``, ``measure_kappa``, ``measure_ntk``, ``figure``,
    ``per_layer``, ``layer_probe_size``, ``max_layers``), flat or in the four groups.

    Without ``loss``, batches carrying ``labels`` are scored with the model's own loss (:func:`default_loss`:
    cross-entropy for sequence classification and for causal LMs, whose labels are shifted as the model shifts them).
    The probe is ``probe_size`` examples of the training set, drawn once through the Trainer's collator.

    Results: :attr:`history` (one dict per measurement, as ``LazyTrainingMonitor.history``), :meth:`summary`. The
    scalars (``lazy/...``) go to the Trainer's integrations in ``report_to`` (TensorBoard in ``logging_dir``, W&B,
    MLflow); ``laziness.png``, ``layers.png`` and ``lazy_summary.txt`` to ``output_dir``.

    Follows one process (``world_size`` 1), the Trainer's optimizer (any ``torch.optim`` one, or
    ``transformers.optimization.Adafactor``), gradient accumulation and ``max_grad_norm`` clipping. Under several
    processes it refuses in one line.
    """

    def __init__(self, loss: LossLike | None = None, *, watch: Watch | None = None, measure: Measure | None = None,
                 when: When | None = None, write: Write | None = None, **flat: Any) -> None:
        self.options = WatchOptions.build({"watch": watch, "measure": measure, "when": when, "write": write},
                                          loss=loss, **flat)
        self.core: LazinessWatch | None = None
        self._captured: list[dict[str, Any]] = []
        self._handles: list[Any] = []
        self._share: str | None = None  # how the Trainer weighs micro-batches: "mean", "sum", "items" (see _weight)
        self._capturing = True

    # ------------------------------------------------------------------------------------------ results

    @property
    def history(self) -> list[dict[str, float]]:
        """One dict per measurement: ``step``, ``epoch`` and the measures."""
        return [] if self.core is None else self.core.history

    @property
    def layer_history(self) -> list[dict[str, Any]]:
        return [] if self.core is None else self.core.layer_history

    def summary(self) -> str:
        """The laziness summary (also in ``output_dir/lazy_summary.txt`` at the end of training)."""
        if self.core is None:
            raise RuntimeError("LazyTrainingCallback has measured nothing: training has not started")
        return self.core.summary()

    # -------------------------------------------------------------------------- events, in lifecycle order

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       optimizer: Any = None, train_dataloader: Any = None, **kwargs: Any) -> None:
        """Build the core on the Trainer's model and optimizer; read the training forwards' inputs from now on."""
        if getattr(args, "world_size", 1) > 1:
            raise WatchError("LazyTrainingCallback follows a single process; for several, use Lightning's "
                             "LazyTrainingMonitor under DDP, or train on one device")
        from lightning_lazy.watch.writers import writers_for_report_to

        options = self.options
        if options.watch.loss is None and options.watch.model is None:
            loss = default_loss(model)
            if loss is not None:
                options = WatchOptions.build({"watch": options.watch, "measure": options.measure,
                                              "when": options.when, "write": options.write})
                options.watch.loss = loss
                options.validate()
        # TensorBoard: where the Trainer's own events go when it is told (TENSORBOARD_LOGGING_DIR, or an older
        # transformers' logging_dir), else a run of its own beside the Trainer's runs in output_dir/runs.
        logging_dir = (os.getenv("TENSORBOARD_LOGGING_DIR") or getattr(args, "logging_dir", None)
                       or os.path.join(args.output_dir, "runs", "lazy"))
        writers = writers_for_report_to(args.report_to, logging_dir, args.output_dir) if args.output_dir else []
        clip = None
        if args.max_grad_norm and args.max_grad_norm > 0:
            norm = float(args.max_grad_norm)
            clip = lambda opt: torch.nn.utils.clip_grad_norm_(  # noqa: E731 - the Trainer's clipping, on the twin's
                [p for g in opt.param_groups for p in g["params"]], norm)
        self.core = LazinessWatch(model, optimizer, options=options, clip=clip, infer_loss_weight=False,
                                  host=_TrainerHost(writers, args.output_dir, train_dataloader))
        self._clip_norm = float(args.max_grad_norm) if clip is not None else None
        self.core.start()  # also sets the writers up, once
        self._handles = [model.register_forward_pre_hook(self._read_inputs, with_kwargs=True),
                         model.register_forward_hook(self._read_loss, with_kwargs=True)]

    def on_step_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        """Measure at w0 before the first step; the twin's gradients start from zero with the model's."""
        core = self.core
        if core.measures is None:
            training = model.training
            model.train()  # the mode the Trainer trains in (it sets it in each training step)
            self._capturing = False  # the measures' own forwards are not training batches
            try:
                core.start_measuring()
            finally:
                self._capturing = True
                model.train(training)
        core.step_started()
        if core.twin is not None:
            core.twin.zero_grad()
        self._captured = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Back-propagate the twin's loss on the step's micro-batches (weighted as the Trainer weighs them); at the
        first step, compare its gradient with the model's."""
        core = self.core
        captured, self._captured = self._captured, []
        if core.following_twin() is None or not captured:
            return
        k = len(captured)
        for batch in captured:
            core.twin._rng = batch["rng"]  # the random numbers this micro-batch's forward drew (dropout masks)
            share = self._share
            weight = self._weight(batch, k, share or ("items" if batch["items"] is not None else "mean"))
            twin_loss = core.accumulate(batch["x"], batch["y"], {}, weight=weight)
            if share is None and twin_loss is not None:
                # At w0 the twin's loss is the model's: their ratio says how the Trainer weighs micro-batches.
                self._share = self._find_share(batch, twin_loss, k)
                if self._share is None:
                    core.twin_lost("the model's loss on the first batch is not the one the tangent twin computes "
                                   f"({batch['loss']:.6g} against {twin_loss:.6g})",
                                   "Pass LazyTrainingCallback(loss=callable(output, y)) with the loss the model computes.")
                    return
                new = self._weight(batch, k, self._share)
                if new != weight:  # the first micro-batch alone is in the twin's gradients so far
                    with torch.no_grad():
                        for p in core.twin.model.parameters():
                            if p.grad is not None:
                                p.grad.mul_(new / weight)
        if core.following_twin() is not None:
            core.twin.gradients_produced()
            core.check_gradients(clip_norm=self._clip_norm)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.core.step_ended()

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The epoch's tangent training loss; a measurement every ``every_n_epochs`` epochs."""
        core = self.core
        core.epoch = int(round(state.epoch or 0)) - 1
        core.epoch_end(core.epoch)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The final measurement, the summary and the figures; the hooks removed."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.core is not None:
            self.core.close()
            if self.core.history:
                self.core.host.info(f"LazyTrainingCallback: {self.core.summary().splitlines()[0]} Figures and summary "
                                    f"in {os.path.abspath(args.output_dir)}")

    # ------------------------------------------------------------------------------------------ helpers

    def _read_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """A training forward's inputs (``model(**inputs)``), with the random-number state it starts from."""
        if not self._capturing or not module.training or not torch.is_grad_enabled() or self.core is None:
            return
        if self.core.following_twin() is None:
            return
        inputs = dict(kwargs)
        if args:
            inputs.setdefault("input_ids", args[0])
        labels = inputs.get("labels")
        if labels is None:
            self.core.twin_lost("the Trainer's batches carry no labels, so the tangent twin has no targets",
                                "Give the data collator labels, or LazyTrainingCallback(track_tangent=False).")
            return
        items = inputs.get("num_items_in_batch")
        x = {k: v for k, v in named_inputs(inputs).items() if isinstance(v, Tensor) and k != "num_items_in_batch"}
        _, y, _ = (x, labels, {}) if not self.core._causal_lm else self.core.read({**x, "labels": labels})
        self._captured.append({"x": x, "y": y, "rng": RNGState(module), "loss": None,
                               "items": None if items is None else float(items)})

    def _read_loss(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """The loss the model computed on the micro-batch just read (before the Trainer's scaling)."""
        if not self._captured or self._captured[-1]["loss"] is not None or not module.training:
            return
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if isinstance(loss, Tensor) and loss.numel() == 1:
            self._captured[-1]["loss"] = float(loss.detach())

    @staticmethod
    def _weight(batch: dict[str, Any], k: int, share: str) -> float:
        """A micro-batch's weight in the step's loss, as the Trainer back-propagates it: ``"mean"``, its loss / k (the
        Trainer divides); ``"sum"``, its loss (a model taking ``num_items_in_batch`` without using it); ``"items"``,
        its labels' share of the step's ``num_items_in_batch`` (a model whose loss sums over them)."""
        if share == "mean":
            return 1.0 / k
        if share == "sum":
            return 1.0
        y = batch["y"]
        count = float((y != IGNORE_INDEX).sum()) if isinstance(y, Tensor) and not y.is_floating_point() else 0.0
        return count / batch["items"] if batch["items"] else 1.0 / k

    def _find_share(self, batch: dict[str, Any], twin_loss: float, k: int) -> str | None:
        """How the Trainer weighs micro-batches, from the model's loss on the first one against the twin's (at w0 the
        twin is the model); ``None`` when neither weighting explains it."""
        if batch["items"] is None:
            return "mean" if batch["loss"] is None or _close(batch["loss"], twin_loss) else None
        if batch["loss"] is None:
            return None
        candidates = ("sum", "items")
        for share in candidates:
            expected = twin_loss * (1.0 if share == "sum" else self._weight(batch, k, "items"))
            if _close(batch["loss"], expected):
                return share
        return None


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-3 * max(abs(a), abs(b)) + 1e-12


__all__ = ["LazyTrainingCallback", "default_loss"]
