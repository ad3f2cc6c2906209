"""LazyClassifier: one LightningModule that trains any backbone normally, lazily (α-scaled) or linearized.

The three modes of Chizat, Oyallon & Bach (2019), section 4:

* ``standard``: the network ``f(x; w)`` itself, trained on ``R(f(w))``. It is held as
  ``AlphaScaled(f, α=1, center=False)``, which computes exactly ``f(x; w)``, so that every mode carries its
  α and loss where :class:`~lightning_lazy.callback.LazyTrainingMonitor` looks for them.
* ``lazy``: the centred, α-scaled network ``α (f(x; w) − f(x; w0))`` (:class:`~lightning_lazy.scaling.AlphaScaled`)
  trained on the scaled objective ``R(α h(w)) / α²``. As α grows, training becomes lazy.
* ``linearized``: the exact tangent model of the centred network, ``Df(w0)(w − w0)``
  (:class:`~lightning_lazy.tangent.LinearizedModel` around ``AlphaScaled(f, α=1, center=True)``), trained on
  ``R``. For a model linear in its parameters, α cancels out of the dynamics under ``R(α h)/α²``: with
  ``u = α (w − w0)`` the output ``α Dh(w0)(w − w0) = Dh(w0) u`` follows the same path for every α (SGD with
  momentum is linear in the gradient). So α = 1 *is* the α → ∞ limit of the lazy model; it is used here
  because it is the best-conditioned numerically (weights move by O(1), not O(1/α)).

The default optimizer and schedule are the paper's: SGD with momentum 0.9 and ``η_t = η0 / (1 + β t)``
with ``t`` the epoch and ``β = 1/3``; any other optimizer / scheduler can be given as a callable (from a
LightningCLI config: ``class_path`` + ``init_args``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics.classification import MulticlassAccuracy

from lightning_lazy.scaling import AlphaScaled, check_alpha, resolve_loss
from lightning_lazy.tangent import LinearizedModel

MODES = ("standard", "lazy", "linearized")
CHECK_FINITE_EVERY = 50
OptimizerFactory = Callable[[Iterable], Optimizer]
SchedulerFactory = Callable[[Optimizer], Any]


class InverseTimeLR(LRScheduler):
    """``lr_t = lr_0 / (1 + decay · t)``, ``t`` counting scheduler steps (epochs in LazyClassifier).

    The paper's schedule with ``decay = 1/3`` (its code: ``η0 / (1 + 100 t / 300)``).
    """

    def __init__(self, optimizer: Optimizer, decay: float = 1.0 / 3.0, last_epoch: int = -1) -> None:
        if decay < 0:
            raise ValueError(f"decay must be >= 0 (0 keeps the learning rate constant), got {decay!r}")
        self.decay = float(decay)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        factor = 1.0 / (1.0 + self.decay * max(self.last_epoch, 0))
        return [base * factor for base in self.base_lrs]


class LazyClassifier(pl.LightningModule):
    """Train ``backbone`` (outputs ``[N, num_classes]``) in ``standard``, ``lazy`` or ``linearized`` mode.

    Args:
        backbone: any ``nn.Module`` classifier, e.g. :class:`~lightning_lazy.models.vgg.VGG11`.
        mode: ``"standard"`` | ``"lazy"`` | ``"linearized"`` (see the module docstring).
        alpha: the scale α of ``lazy`` mode (the paper sweeps 10⁻² … 10⁷; use ``precision="64-true"`` above
            about 10³). Ignored, with a warning when not 1, in the other modes.
        loss: ``"mse"`` (½‖y − onehot‖² per example, averaged; the paper's square loss) or
            ``"cross_entropy"``.
        lr: initial learning rate η0 of the default SGD (the paper picks it on a grid).
        momentum: SGD momentum (0.9 in the paper).
        weight_decay: SGD weight decay (0 in the paper; note it does not commute with α in lazy mode).
        lr_decay: β of the default schedule ``η0 / (1 + β · epoch)`` (1/3 in the paper; 0 = constant).
        optimizer: replaces the default SGD: a callable ``params -> Optimizer`` (in a config: ``class_path``
            and ``init_args`` of any ``torch.optim`` class).
        lr_scheduler: replaces the default schedule: a callable ``optimizer -> scheduler`` stepped per epoch.
        num_classes: number of classes; read from ``backbone.num_classes`` when not given.
        batchnorm: ``LinearizedModel``'s BatchNorm policy in ``linearized`` mode: ``"frozen"`` (BatchNorm always
            on the running statistics of the backbone at w0, never updated: one fixed function of x) or
            ``"batch"`` (in training mode, the statistics of each batch as the network at w0 computes them, the
            linearization differentiating through them; running statistics updated from them and used in eval
            mode). See :class:`~lightning_lazy.tangent.LinearizedModel`.

    In ``linearized`` mode the model is linear in its parameters, so it is its own tangent model: a
    :class:`~lightning_lazy.callback.LazyTrainingMonitor` on it trains a twin that follows the same path
    (Δ = 0, ‖D²h‖ = 0), which checks the pipeline rather than measuring anything.
    """

    def __init__(
        self,
        backbone: nn.Module,
        mode: Literal["standard", "lazy", "linearized"] = "standard",
        alpha: float = 1.0,
        loss: Literal["mse", "cross_entropy"] = "mse",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        lr_decay: float = 1.0 / 3.0,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        num_classes: int | None = None,
        batchnorm: Literal["frozen", "batch"] = "frozen",
    ) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        alpha = check_alpha(alpha)
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
        if lr_decay < 0:
            raise ValueError(f"lr_decay must be >= 0, got {lr_decay!r}")
        if num_classes is None:
            num_classes = getattr(backbone, "num_classes", None)
            if not isinstance(num_classes, int):
                raise ValueError(
                    f"cannot tell how many classes {type(backbone).__name__} predicts: pass num_classes=K "
                    "(or give the backbone a num_classes attribute)"
                )
        if mode != "lazy" and alpha != 1.0:
            rank_zero_warn(
                f"alpha={alpha:g} has no effect in mode={mode!r}: only mode='lazy' scales the model "
                "(linearized mode is the alpha -> infinity limit already)."
            )
        # The backbone is a module argument: Lightning saves it with the weights, not in hparams.
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler"])
        self.mode = mode
        self.alpha = alpha if mode == "lazy" else 1.0
        self.num_classes = num_classes
        self.risk = resolve_loss(loss)
        if mode == "standard":
            self.model: nn.Module = AlphaScaled(backbone, alpha=1.0, center=False, loss=loss)
        elif mode == "lazy":
            self.model = AlphaScaled(backbone, alpha=alpha, center=True, loss=loss)
        else:
            self.model = LinearizedModel(AlphaScaled(backbone, alpha=1.0, center=True, loss=loss), batchnorm=batchnorm)
        self._optimizer_factory = optimizer
        self._scheduler_factory = lr_scheduler
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    # -- the model

    @property
    def backbone(self) -> nn.Module:
        """The network f whose parameters are trained (the tangent model's own copy in linearized mode)."""
        if self.mode == "linearized":
            return self.model.module.module
        return self.model.module

    def initial_params(self) -> dict[str, Tensor] | None:
        """w0 of :attr:`backbone` as ``{name: tensor}`` where the model keeps it (lazy, linearized); else None."""
        if self.mode == "lazy":
            return self.model.initial.as_dict()
        if self.mode == "linearized":
            # LinearizedModel names its parameters through the AlphaScaled wrapper ("module.<name>").
            return {k.removeprefix("module."): v for k, v in self.model.initial_params.items()}
        return None

    def forward(self, x: Tensor) -> Tensor:
        """The trained model's output: f(x), α(f(x; w) − f(x; w0)) or the tangent model's output."""
        # LinearizedModel itself handles inference mode and torch.func transforms (the monitor's measures).
        return self.model(x)

    def losses(self, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """``(risk, objective)`` of a batch: ``R(output)`` and what the optimizer minimizes.

        The risk R of the trained model's output is what gets logged as ``loss``: comparable across modes
        and α. The objective equals it except in lazy mode, where it is ``R(α h)/α²``.
        """
        risk = self.risk(output, target)
        objective = self.model.objective(output, target) if self.mode == "lazy" else risk
        return risk, objective

    # -- steps

    def _unpack(self, batch: Any) -> tuple[Tensor, Tensor]:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError(
                f"LazyClassifier expects batches (images, labels), got {type(batch).__name__}; wrap your "
                "dataset so that it yields (x, y) pairs"
            )
        return batch[0], batch[1]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = self._unpack(batch)
        output = self(x)
        risk, objective = self.losses(output, y)
        # Checking finiteness forces a device sync; every CHECK_FINITE_EVERY steps is enough to stop a
        # diverged run (e.g. a too large lr in a sweep) early with a useful message.
        if batch_idx % CHECK_FINITE_EVERY == 0 and not torch.isfinite(objective):
            raise FloatingPointError(
                f"training loss is {objective.item()} at step {self.global_step} (mode={self.mode}, "
                f"alpha={self.alpha:g}): lower lr (now {self.hparams.lr:g}) or, for large alpha, train with "
                "trainer.precision='64-true'"
            )
        self.train_acc(output.detach(), y)
        n = x.shape[0]
        self.log("train/loss", risk.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        if self.mode == "lazy":
            self.log("train/objective", objective.detach(), on_step=False, on_epoch=True, batch_size=n)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)
        return objective

    def _eval_step(self, batch: Any, stage: str, metric: MulticlassAccuracy) -> None:
        x, y = self._unpack(batch)
        output = self(x)
        metric(output, y)
        n = x.shape[0]
        self.log(f"{stage}/loss", self.risk(output, y), on_epoch=True, sync_dist=True, batch_size=n)
        self.log(f"{stage}/acc", metric, on_epoch=True, prog_bar=stage == "val", batch_size=n)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(dim=1)

    # -- optimization

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self._optimizer_factory is not None:
            optimizer = self._optimizer_factory(params)
        else:
            optimizer = torch.optim.SGD(
                params, lr=self.hparams.lr, momentum=self.hparams.momentum, weight_decay=self.hparams.weight_decay
            )
        if self._scheduler_factory is not None:
            scheduler = self._scheduler_factory(optimizer)
        else:
            scheduler = InverseTimeLR(optimizer, decay=self.hparams.lr_decay)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
