"""LazyTrainingMonitor: watch, in any Lightning Trainer, how far training is from its linearization.

A linearized twin (``LinearizedModel`` of the LightningModule, from the same w0) is trained in lock-step
with the real model — same batches, a copy of the optimizer with its own state, learning rates mirrored
from the real optimizer (so any scheduler is followed), the same gradient accumulation and clipping —
and every ``every_n_epochs`` epochs the paper's measures are computed on a fixed probe set and logged
under ``lazy/`` through ``pl_module.log`` (so every Lightning logger receives them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import Tensor

from lightning_lazy import diagnostics
from lightning_lazy._params import eval_mode
from lightning_lazy.scaling import AlphaScaled, LossLike, as_regression_target, check_alpha, resolve_loss
from lightning_lazy.tangent import LinearizedModel

BatchToXY = Callable[[Any], tuple[Tensor, Tensor]]


def default_batch_to_xy(batch: Any) -> tuple[Tensor, Tensor]:
    """Reads a batch as ``(x, y)`` (a tuple, a list, or a dict with keys ``"x"`` and ``"y"``)."""
    if isinstance(batch, dict) and "x" in batch and "y" in batch:
        return batch["x"], batch["y"]
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, Tensor) for t in batch):
        return batch[0], batch[1]
    described = type(batch).__name__ + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    raise MisconfigurationException(
        f"LazyTrainingMonitor reads batches as (x, y), but got a {described}. Pass "
        "batch_to_xy=lambda batch: (inputs, targets) to LazyTrainingMonitor to say how to read yours."
    )


class LazyTrainingMonitor(Callback):
    r"""Trains a linearized twin in lock-step and logs the laziness measures of Chizat et al. (2019).

    Args:
        loss: the loss R(output, target) of the model's output: ``"mse"`` (½‖·‖², class targets one-hot),
            ``"cross_entropy"`` or a callable. Default: the loss of the ``AlphaScaled`` inside the module.
        alpha: scale of the model when it contains no ``AlphaScaled`` (the twin's objective is then
            R(output)/α², as for an ``AlphaScaled``); needed when the module holds several of them.
        probe: fixed probe inputs ``x`` or ``(x, y)``; default ``probe_size`` examples drawn once, with a
            private generator, from the train set.
        probe_size: examples in the default probe (divergence, activation stability, displacement).
        kappa_probe_size: the first examples of the probe used for κ, ‖Dh‖, ‖D²h‖.
        ntk_probe_size: the first examples of the probe used for the empirical NTK.
        every_n_epochs: measure at the end of every n-th training epoch.
        log_steps: also measure after these global steps: a list, or ``"log"`` for 1, 2, 4, 8, ...
        track_tangent: keep the linearized twin (divergence, tangent gap, tangent losses); ``False`` keeps
            the other measures and costs no training time.
        batch_to_xy: ``batch -> (x, y)`` for batches that are not ``(x, y)``.
        batchnorm: the twin's BatchNorm policy (see ``LinearizedModel``).
        measure_kappa / measure_ntk: switch the two costliest measures off.

    The model output is ``pl_module(x)`` (the LightningModule's forward); it must be ``[N, K]``. Logged:
    ``lazy/divergence``, ``lazy/bound`` (= t̃²·κ(w0)), ``lazy/kappa``, ``lazy/jacobian_norm``,
    ``lazy/hessian_norm``, ``lazy/displacement``, ``lazy/tangent_gap``, ``lazy/ntk_distance``,
    ``lazy/kernel_alignment``, ``lazy/activation_stability``, ``lazy/normalized_time``,
    ``lazy/tangent/train_loss``, ``lazy/tangent/val_loss`` (``test_loss`` under ``trainer.test``) and, for
    integer targets, ``lazy/tangent/val_acc`` / ``test_acc``.
    The losses logged are R (without the 1/α² factor), comparable across α.
    """

    def __init__(
        self,
        loss: LossLike | None = None,
        *,
        alpha: float | None = None,
        probe: Tensor | tuple[Tensor, Tensor] | None = None,
        probe_size: int = 256,
        kappa_probe_size: int = 32,
        ntk_probe_size: int = 16,
        every_n_epochs: int = 1,
        log_steps: str | Sequence[int] | None = None,
        track_tangent: bool = True,
        batch_to_xy: BatchToXY | None = None,
        batchnorm: str = "frozen",
        measure_kappa: bool = True,
        measure_ntk: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("probe_size", probe_size), ("kappa_probe_size", kappa_probe_size),
                            ("ntk_probe_size", ntk_probe_size), ("every_n_epochs", every_n_epochs)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(log_steps, str) and log_steps != "log":
            raise ValueError(f"log_steps must be 'log', a list of steps or None, got {log_steps!r}")
        self.loss = None if loss is None else resolve_loss(loss)
        self.alpha = None if alpha is None else check_alpha(alpha)
        self.probe = probe
        self.probe_size = probe_size
        self.kappa_probe_size = kappa_probe_size
        self.ntk_probe_size = ntk_probe_size
        self.every_n_epochs = every_n_epochs
        self.log_steps = log_steps
        self.track_tangent = track_tangent
        self.batch_to_xy = batch_to_xy or default_batch_to_xy
        self.batchnorm = batchnorm
        self.measure_kappa = measure_kappa
        self.measure_ntk = measure_ntk
        self._loaded: dict[str, Any] | None = None
        self._reset_state()

    def _reset_state(self) -> None:
        self.twin: LinearizedModel | None = None
        self.twin_optimizer: torch.optim.Optimizer | None = None
        self._objective: Callable[[Tensor, Tensor], Tensor] | None = None
        self._loss_scale = 1.0
        self._initial: dict[str, Tensor] = {}
        self._probe_x: Tensor | None = None
        self._probe_y: Tensor | None = None
        self._initial_output: Tensor | None = None
        self._initial_kernel: Tensor | None = None
        self._initial_kappa: float | None = None
        self._initial_jacobian_norm: float | None = None
        self._has_relu = True
        self._hessian_direction: Tensor | None = None
        self._time = 0.0  # Σ learning rates of the steps taken
        self._steps = 0
        self._twin_loss_sum = 0.0
        self._twin_loss_count = 0
        self._eval_loss_sum = 0.0
        self._eval_correct = 0
        self._eval_count = 0
        self._eval_is_classification = False

    # ---------------------------------------------------------------------------------------- lifecycle

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = type(trainer.strategy).__name__
        if "FSDP" in strategy or "DeepSpeed" in strategy:
            raise MisconfigurationException(
                f"LazyTrainingMonitor does not support sharded strategies ({strategy}): its twin and its measures "
                "need the whole parameter vector on every device. Use a single device or DDP."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                "LazyTrainingMonitor follows Lightning's automatic optimization (it steps its twin when the "
                "trainer steps the optimizer); this module uses manual optimization, which it cannot follow."
            )
        if len(trainer.optimizers) != 1:
            raise MisconfigurationException(
                f"LazyTrainingMonitor needs exactly one optimizer to copy for its twin, found {len(trainer.optimizers)}."
            )
        self._objective, self._loss_scale = self._resolve_objective(pl_module)
        loaded, self._loaded = self._loaded, None
        if self.track_tangent:
            self.twin = LinearizedModel(pl_module, batchnorm=self.batchnorm)
            self.twin_optimizer = self._copy_optimizer(trainer.optimizers[0], pl_module)
        if loaded is not None:
            self._restore(loaded, pl_module)
        else:
            self._initial = {
                name: p.detach().clone() for name, p in pl_module.named_parameters() if p.requires_grad
            }

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._probe_x is None:
            self._probe_x, self._probe_y = self._draw_probe(trainer, pl_module)
            self._measure_initial(trainer, pl_module)
        if trainer.logger is not None and trainer.is_global_zero:
            self._write_layout(trainer)
        if self._initial_kappa is not None:
            rank_zero_info(
                f"LazyTrainingMonitor: alpha = {self._loss_scale ** -0.5:g}, ||Dh(w0)|| = "
                f"{self._initial_jacobian_norm:.4g}, kappa(w0) = {self._initial_kappa:.4g}; the bound t~^2 kappa(w0) "
                f"reaches 1 at normalized time t~ = {self.laziness_horizon:.4g}: the predicted laziness horizon."
            )

    @property
    def laziness_horizon(self) -> float:
        """Normalized time at which the bound t̃²·κ(w0) reaches 1 (``inf`` when κ(w0) = 0)."""
        if self._initial_kappa is None:
            raise RuntimeError("the laziness horizon needs kappa(w0): fitting has not started or measure_kappa=False")
        return 1.0 / math.sqrt(self._initial_kappa) if self._initial_kappa > 0 else math.inf

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.twin is None:
            return
        # The trainer converts inputs inside training_step (e.g. to float64 under precision="64-true").
        x, y = self.batch_to_xy(trainer.precision_plugin.convert_input(batch))
        self.twin.train(pl_module.training)
        output = self.twin(x)
        loss = self._objective(output, y)
        (loss / trainer.accumulate_grad_batches).backward()
        self._twin_loss_sum += float(loss.detach()) / self._loss_scale
        self._twin_loss_count += 1

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        lr = float(optimizer.param_groups[0]["lr"])
        self._time += lr
        self._steps += 1
        if self.twin is None:
            return
        for real_group, twin_group in zip(optimizer.param_groups, self.twin_optimizer.param_groups):
            # Mirror every hyper-parameter, so whatever scheduler drives the real optimizer drives the twin.
            twin_group.update({k: v for k, v in real_group.items() if k != "params"})
        self._all_reduce_twin_gradients(trainer)
        self._clip_twin_gradients(trainer)
        self.twin_optimizer.step()
        self.twin_optimizer.zero_grad(set_to_none=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._is_log_step(trainer.global_step):
            self._measure_and_log(trainer, pl_module, on_step=True)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self._evaluate_twin(trainer, batch)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log_twin_evaluation(trainer, pl_module, "val")

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate_twin(trainer, batch)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_twin_evaluation(trainer, pl_module, "test")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._twin_loss_count:
            pl_module.log("lazy/tangent/train_loss", self._twin_loss_sum / self._twin_loss_count, sync_dist=True)
            self._twin_loss_sum, self._twin_loss_count = 0.0, 0
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._measure_and_log(trainer, pl_module, on_step=False)

    # ------------------------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        if self._probe_x is None:
            return {}
        return {
            "initial": {k: v.cpu() for k, v in self._initial.items()},
            "twin": None if self.twin is None else self.twin.state_dict(),
            "twin_optimizer": None if self.twin_optimizer is None else self.twin_optimizer.state_dict(),
            "probe_x": self._probe_x.cpu(),
            "probe_y": self._probe_y.cpu(),
            "initial_output": self._initial_output.cpu(),
            "initial_kernel": None if self._initial_kernel is None else self._initial_kernel.cpu(),
            "initial_kappa": self._initial_kappa,
            "initial_jacobian_norm": self._initial_jacobian_norm,
            "has_relu": self._has_relu,
            "hessian_direction": None if self._hessian_direction is None else self._hessian_direction.cpu(),
            "time": self._time,
            "steps": self._steps,
            "twin_loss": (self._twin_loss_sum, self._twin_loss_count),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied in on_fit_start, once the module, its device and the optimizer exist.
        self._loaded = dict(state_dict) if state_dict else None

    def _restore(self, state: dict[str, Any], pl_module: pl.LightningModule) -> None:
        device = pl_module.device
        self._initial = {k: v.to(device) for k, v in state["initial"].items()}
        if self.twin is not None:
            if state["twin"] is None:
                raise MisconfigurationException(
                    "the checkpoint was written with track_tangent=False, so it holds no twin to resume; "
                    "resume with LazyTrainingMonitor(track_tangent=False) or start a new run"
                )
            self.twin.load_state_dict(state["twin"])
            self.twin_optimizer.load_state_dict(state["twin_optimizer"])
        self._probe_x = state["probe_x"].to(device)
        self._probe_y = state["probe_y"].to(device)
        self._initial_output = state["initial_output"].to(device)
        kernel = state["initial_kernel"]
        self._initial_kernel = None if kernel is None else kernel.to(device)
        self._initial_kappa = state["initial_kappa"]
        self._initial_jacobian_norm = state["initial_jacobian_norm"]
        self._has_relu = state["has_relu"]
        direction = state["hessian_direction"]
        self._hessian_direction = None if direction is None else direction.to(device)
        self._time = state["time"]
        self._steps = state["steps"]
        self._twin_loss_sum, self._twin_loss_count = state["twin_loss"]

    # ------------------------------------------------------------------------------------------ helpers

    def _resolve_objective(self, pl_module: pl.LightningModule) -> tuple[Callable[[Tensor, Tensor], Tensor], float]:
        scaled = [m for m in pl_module.modules() if isinstance(m, AlphaScaled)]
        if len(scaled) > 1 and self.alpha is None:
            raise MisconfigurationException(
                f"the module holds {len(scaled)} AlphaScaled models, so the monitor cannot tell which alpha "
                "scales the output of forward(); pass LazyTrainingMonitor(alpha=...)"
            )
        if scaled and self.alpha is not None and not math.isclose(scaled[0].alpha, self.alpha) and len(scaled) == 1:
            raise MisconfigurationException(
                f"LazyTrainingMonitor(alpha={self.alpha:g}) contradicts the module's AlphaScaled(alpha={scaled[0].alpha:g})"
            )
        alpha = self.alpha if self.alpha is not None else (scaled[0].alpha if scaled else 1.0)
        loss = self.loss or (scaled[0].loss if len(scaled) == 1 else None)
        if loss is None:
            raise MisconfigurationException(
                "LazyTrainingMonitor does not know the loss the model is trained on: pass "
                "LazyTrainingMonitor(loss='mse' | 'cross_entropy' | callable), or give AlphaScaled(..., loss=...)"
            )
        scale = 1.0 / alpha**2

        def objective(output: Tensor, target: Tensor) -> Tensor:
            return loss(output, target) * scale

        return objective, scale

    def _copy_optimizer(self, optimizer: torch.optim.Optimizer, pl_module: pl.LightningModule) -> torch.optim.Optimizer:
        names = {id(p): name for name, p in pl_module.named_parameters()}
        twin_params = dict(self.twin.module.named_parameters())
        groups = []
        for group in optimizer.param_groups:
            try:
                params = [twin_params[names[id(p)]] for p in group["params"]]
            except KeyError:
                raise MisconfigurationException(
                    "the optimizer trains a tensor that is not a parameter of the LightningModule; the twin can only "
                    "copy optimizers over the module's own parameters"
                ) from None
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
        try:
            return type(optimizer)(groups, **optimizer.defaults)
        except TypeError:
            return type(optimizer)(groups)

    def _draw_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[Tensor, Tensor]:
        if self.probe is not None:
            x, y = self.probe if isinstance(self.probe, (tuple, list)) else (self.probe, None)
        else:
            x, y = self._probe_from_train_set(trainer)
        x = x.to(pl_module.device)
        if x.is_floating_point():
            x = x.to(pl_module.dtype)
        if len(x) == 0:
            raise ValueError("the probe set is empty: give probe tensors with at least one example")
        with torch.no_grad():
            output = self._output(pl_module, x)
        if y is None:
            # Without targets (a user probe of inputs only), y* is taken as 0: Δ is then relative to ‖α h(w0)‖.
            y = torch.zeros_like(output)
        y = y.to(pl_module.device)
        as_regression_target(output, y.reshape(len(y), -1) if y.is_floating_point() else y)  # validates shapes
        return trainer.strategy.broadcast((x, y))

    def _probe_from_train_set(self, trainer: pl.Trainer) -> tuple[Tensor, Tensor]:
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise MisconfigurationException(
                "LazyTrainingMonitor draws its probe from the train DataLoader's dataset, which must be indexable; "
                "pass LazyTrainingMonitor(probe=(x, y)) instead"
            )
        generator = torch.Generator().manual_seed(0)
        indices = torch.randperm(len(dataset), generator=generator)[: self.probe_size].tolist()
        # Random transforms draw from the global RNG: fork it, so a run with the monitor trains exactly as one
        # without (the probe is augmented once, then fixed).
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            batch = loader.collate_fn([dataset[i] for i in indices])
        return self.batch_to_xy(batch)

    def _measure_initial(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        x, y = self._probe_x, self._probe_y
        with torch.no_grad():
            self._initial_output = self._output(pl_module, x)
        self._has_relu = self._probe_activation_stability(pl_module, self._initial) is not None
        if not self._has_relu:
            rank_zero_warn("LazyTrainingMonitor: the model applies no ReLU, so lazy/activation_stability is not logged.")
        if self.measure_kappa:
            initial = self._kappa(pl_module, x, y)
            self._initial_kappa = initial.value.item()
            self._initial_jacobian_norm = initial.jacobian_norm.item()
        else:
            n = min(self.kappa_probe_size, len(x))
            self._initial_jacobian_norm = diagnostics.jacobian_norm(pl_module, x[:n], self._initial, tol=1e-4).item()
        if self.measure_ntk:
            self._initial_kernel = self._kernel(pl_module, self._initial)

    def _output(self, pl_module: pl.LightningModule, x: Tensor) -> Tensor:
        with eval_mode(pl_module):  # restores each submodule's own mode afterwards
            output = pl_module(x)
        if not isinstance(output, Tensor) or output.dim() == 0 or output.shape[0] != len(x):
            raise MisconfigurationException(
                "LazyTrainingMonitor needs the LightningModule's forward(x) to return the model output [N, K]; got "
                f"{type(output).__name__}{'' if not isinstance(output, Tensor) else tuple(output.shape)}"
            )
        return output.reshape(len(x), -1)

    def _params(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        return {name: p.detach() for name, p in pl_module.named_parameters() if name in self._initial}

    def _kappa(self, pl_module: pl.LightningModule, x: Tensor, y: Tensor, params: dict | None = None) -> diagnostics.Kappa:
        n = min(self.kappa_probe_size, len(x))
        params = params or self._params(pl_module)
        if self._hessian_direction is None:  # at w0: a careful search
            options = {"max_iter": 12, "max_rounds": 3, "restarts": 2}
        else:  # then warm-started from the last direction: a few Lanczos steps follow it along training
            options = {"max_iter": 4, "max_rounds": 1, "restarts": 1, "start": self._hessian_direction}
        hessian, self._hessian_direction = diagnostics.hessian_norm(
            pl_module, x[:n], params, return_direction=True, **options
        )
        return diagnostics.kappa(pl_module, x[:n], y[:n], params, jacobian_kwargs={"tol": 1e-3}, hessian=hessian)

    def _kernel(self, pl_module: pl.LightningModule, params: dict[str, Tensor]) -> Tensor:
        return diagnostics.empirical_ntk(pl_module, self._probe_x[: self.ntk_probe_size], params=params)

    def _probe_activation_stability(self, pl_module: pl.LightningModule, params: dict[str, Tensor]) -> Tensor | None:
        try:
            return diagnostics.activation_stability(pl_module, self._probe_x, params, self._initial)
        except ValueError as error:
            if "applies no ReLU" in str(error):
                return None
            raise

    def _evaluate_twin(self, trainer: pl.Trainer, batch: Any) -> None:
        """Accumulates the tangent model's loss R and accuracy on an evaluation batch."""
        if self.twin is None:
            return
        x, y = self.batch_to_xy(trainer.precision_plugin.convert_input(batch))
        self.twin.eval()
        with torch.no_grad():
            output = self.twin(x)
            self._eval_loss_sum += float(self._objective(output, y)) / self._loss_scale * len(x)
        self._eval_count += len(x)
        if not y.is_floating_point() and output.dim() == 2:
            self._eval_correct += int((output.argmax(1) == y).sum())
            self._eval_is_classification = True

    def _log_twin_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.twin is None or self._eval_count == 0:
            return
        totals = torch.tensor([self._eval_loss_sum, self._eval_correct, self._eval_count], dtype=torch.float64,
                              device=pl_module.device)
        totals = trainer.strategy.reduce(totals, reduce_op="sum")
        pl_module.log(f"lazy/tangent/{stage}_loss", float(totals[0] / totals[2]))
        if self._eval_is_classification:
            pl_module.log(f"lazy/tangent/{stage}_acc", float(totals[1] / totals[2]))
        self._eval_loss_sum, self._eval_correct, self._eval_count = 0.0, 0, 0

    def _is_log_step(self, step: int) -> bool:
        if self.log_steps is None or step == 0:
            return False
        if self.log_steps == "log":
            return step & (step - 1) == 0
        return step in self.log_steps

    def _measure_and_log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, on_step: bool) -> None:
        values = self.measure(pl_module)
        per_tensor = values.pop("displacement_per_tensor")
        scalars = {f"lazy/{name}": value for name, value in values.items()}
        if on_step:
            # Straight to the loggers: pl_module.log from a batch hook would repeat the value at every step.
            # Lightning writes what is logged after k optimizer steps at step k - 1; so do we.
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics(scalars, step=trainer.global_step - 1)
        else:
            for name, value in scalars.items():
                pl_module.log(name, value)
        logger = trainer.logger
        if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero and per_tensor:
            histogram = torch.stack([v.float().cpu() for v in per_tensor.values()])
            logger.experiment.add_histogram("lazy/displacement_per_tensor", histogram, trainer.global_step)

    @torch.no_grad()
    def _twin_probe_output(self) -> Tensor:
        self.twin.eval()
        return self.twin(self._probe_x).reshape(len(self._probe_x), -1)

    def measure(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The measures now, as floats (``displacement_per_tensor``: a dict of 0-dim tensors)."""
        x, y = self._probe_x, self._probe_y
        params = self._params(pl_module)
        values: dict[str, Any] = {}
        normalized_time = self._time * self._loss_scale * self._initial_jacobian_norm**2
        values["normalized_time"] = normalized_time
        if self._initial_kappa is not None:
            values["bound"] = normalized_time**2 * self._initial_kappa
        moved = diagnostics.displacement(params, self._initial)
        if not math.isfinite(moved.total.item()):
            raise ValueError(
                "training has diverged: the weights hold NaN or inf, so no laziness measure is meaningful. Lower the "
                "learning rate (for AlphaScaled models the step that is stable is about 1/||Dh(w0)||^2 whatever alpha)"
            )
        values["displacement"] = moved.total.item()
        values["displacement_per_tensor"] = moved.per_tensor
        if self.twin is not None:
            with torch.no_grad():
                output = self._output(pl_module, x)
            tangent_output = self._twin_probe_output()
            values["divergence"] = diagnostics.path_divergence(output, tangent_output, y, self._initial_output).item()
            twin_params = {k: v.detach() for k, v in self.twin.module.named_parameters() if k in self._initial}
            gap = torch.sqrt(sum(((params[k] - twin_params[k]) ** 2).sum() for k in params))
            moved_norm = torch.sqrt(sum(v**2 for v in moved.absolute.values()))
            values["tangent_gap"] = (gap / moved_norm).item() if float(moved_norm) > 0 else 0.0
        if self.measure_kappa:
            result = self._kappa(pl_module, x, y, params)
            values.update(kappa=result.value.item(), jacobian_norm=result.jacobian_norm.item(),
                          hessian_norm=result.hessian_norm.item())
        if self.measure_ntk and self._initial_kernel is not None:
            kernel = self._kernel(pl_module, params)
            values["ntk_distance"] = diagnostics.ntk_distance(kernel, self._initial_kernel).item()
            values["kernel_alignment"] = diagnostics.kernel_alignment(kernel, self._initial_kernel).item()
        if self._has_relu:
            values["activation_stability"] = self._probe_activation_stability(pl_module, params).item()
        return values

    def _all_reduce_twin_gradients(self, trainer: pl.Trainer) -> None:
        if trainer.world_size <= 1:
            return
        grads = [p.grad for p in self.twin.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = trainer.strategy.reduce(flat, reduce_op="mean")
        for g, reduced in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(reduced.view_as(g))

    def _clip_twin_gradients(self, trainer: pl.Trainer) -> None:
        clip = trainer.gradient_clip_val
        if not clip:
            return
        params = [p for p in self.twin.parameters() if p.grad is not None]
        if trainer.gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, clip)
        else:
            torch.nn.utils.clip_grad_norm_(params, clip)

    def _write_layout(self, trainer: pl.Trainer) -> None:
        if not isinstance(trainer.logger, TensorBoardLogger):
            return
        trainer.logger.experiment.add_custom_scalars({
            "lazy training": {
                "divergence and its bound t~^2 kappa(w0)": ["Multiline", ["lazy/divergence", "lazy/bound"]],
                "kappa": ["Multiline", ["lazy/kappa"]],
                "weights and kernel": ["Multiline", ["lazy/displacement", "lazy/tangent_gap", "lazy/ntk_distance"]],
                "tangent model losses": ["Multiline", ["lazy/tangent/train_loss", "lazy/tangent/val_loss"]],
            }
        })
