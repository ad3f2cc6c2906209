"""The monitor's invariants over a zoo of ordinary modules crossed with the ways Lightning trains them.

(a) At learning rate 0 the weights never move, so Δ, the tangent gap, the displacement and the NTK distance
    are exactly 0 and κ does not change, whatever the model (dropout, BatchNorm in train or eval, ...).
(b) For a model linear in its trained parameters the twin is the model: Δ stays at round-off (float64).
(c) The monitor never changes the real run: same seed, bit-identical final weights with and without it.

Every run uses the monitor's measures as they ship (twin, κ, NTK, activation stability all on).
"""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BackboneFinetuning
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers_core import FrozenFeatures, taken

from lightning_lazy import LazyTrainingMonitor

N, D, K, TOKENS, VOCAB = 48, 6, 3, 5, 11


# --------------------------------------------------------------------------------------------- the zoo


class Additive(nn.Module):
    """``backbone(x) + head(φ(x))``: linear in (backbone, head); the backbone is frozen, then unfrozen."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(D, K)
        self.features = FrozenFeatures(D, 16)
        self.head = nn.Linear(16, K)

    def forward(self, x):
        return self.backbone(x) + self.head(self.features(x))


class BNBackboneInEval(nn.Module):
    """A pretrained-style conv + BatchNorm backbone, frozen and kept in eval mode by the user, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten())
        self.backbone.requires_grad_(False)
        self.head = nn.Linear(4 * D, K)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # the usual way to keep a frozen backbone's statistics
        return self

    def forward(self, x):
        return self.head(self.backbone(x.unsqueeze(1)))


class TiedTokens(nn.Module):
    """Token inputs, an Embedding whose weight is tied to the output projection (a tiny language model)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 8)
        self.mix = nn.Linear(8, 8)
        self.out = nn.Linear(8, VOCAB, bias=False)
        self.out.weight = self.embedding.weight

    def forward(self, tokens):
        return self.out(torch.tanh(self.mix(self.embedding(tokens))).mean(1))[:, :K]


class EmbeddingBag(nn.Module):
    """Token inputs: a trainable Embedding, mean-pooled, through a frozen projection (linear in the embedding)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 8)
        self.project = nn.Linear(8, K).requires_grad_(False)

    def forward(self, tokens):
        return self.project(self.embedding(tokens).mean(1))


def _zoo() -> dict[str, tuple]:
    """name -> (network factory, linear in its trained parameters?, token inputs?)."""
    return {
        "mlp": (lambda: nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, K)), False, False),
        "dropout_linear": (lambda: nn.Sequential(FrozenFeatures(D, 16), nn.Dropout(0.3), nn.Linear(16, K)), True, False),
        "bn_cnn": (lambda: nn.Sequential(nn.Unflatten(1, (1, D)), nn.Conv1d(1, 4, 3, padding=1), nn.BatchNorm1d(4),
                                         nn.ReLU(), nn.AdaptiveAvgPool1d(2), nn.Flatten(), nn.Linear(8, K)), False, False),
        "bn_backbone_eval": (BNBackboneInEval, True, False),
        "embedding": (EmbeddingBag, True, True),
        "tied_weights": (TiedTokens, False, True),
        "unfrozen_backbone": (Additive, True, False),
    }


MECHANISMS = ["plain", "rng_in_step", "skip_none", "skip_rest_of_epoch", "accumulate", "clip_value", "clip_norm", "step_scheduler",
              "epoch_scheduler", "adamw", "param_groups", "scaler_skips"]


class SkippingScaler(torch.amp.GradScaler):
    """A GradScaler that finds non-finite gradients on chosen steps and so skips them, as AMP does on overflow."""

    def __init__(self, skip: set[int]) -> None:
        super().__init__("cpu", init_scale=1.0, growth_interval=10**9)
        self.skip, self.calls = skip, 0

    def step(self, optimizer, *args, **kwargs):
        self.calls += 1
        if self.calls in self.skip:
            return None  # optimizer.step() is not called
        return super().step(optimizer, *args, **kwargs)


class Zoo(pl.LightningModule):
    def __init__(self, name: str, mechanism: str, lr: float, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = _zoo()[name][0]().double()
        if name == "unfrozen_backbone":
            self.backbone = self.net.backbone  # where BackboneFinetuning looks
        self.mechanism, self.lr = mechanism, lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.mechanism == "skip_none" and batch_idx == 1:
            return None  # Lightning's documented way to skip a batch
        if self.mechanism == "rng_in_step" and torch.rand(()) < 0.0:
            pass  # random numbers drawn before the forward: the twin's dropout masks must still be the forward's
        return 0.5 * (self(x) - y).pow(2).sum(1).mean()

    def on_train_batch_start(self, batch, batch_idx):
        if self.mechanism == "skip_rest_of_epoch" and self.current_epoch == 0 and batch_idx == 2:
            return -1
        return None

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.mechanism == "adamw":
            return torch.optim.AdamW(params, lr=self.lr * 0.1, weight_decay=0.1)
        if self.mechanism == "param_groups":
            first, rest = params[:1], params[1:]
            return torch.optim.SGD([{"params": first, "lr": self.lr * 0.5}, {"params": rest}], lr=self.lr, momentum=0.9)
        optimizer = torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        if self.mechanism == "step_scheduler":
            # StepLR, not LambdaLR: a LambdaLR cannot follow the param group BackboneFinetuning adds (torch raises).
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.7)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        if self.mechanism == "epoch_scheduler":
            return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.3)]
        return optimizer


def _data(tokens: bool, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    if tokens:
        x = torch.randint(0, VOCAB, (N, TOKENS), generator=generator)
    else:
        x = torch.randn(N, D, generator=generator, dtype=torch.float64)
    y = torch.randn(N, K, generator=generator, dtype=torch.float64)
    return x, y


def _fit(name: str, mechanism: str, lr: float, monitored: bool, tmp_path):
    _, _, tokens = _zoo()[name]
    x, y = _data(tokens)
    torch.manual_seed(123)  # the loader shuffles and dropout draws from the global RNG: same seed, same run
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    model = Zoo(name, mechanism, lr)
    callbacks = []
    # figure=False: drawing costs about a second per epoch and has nothing to do with these invariants (the figure
    # is tested in test_callback and test_watch, on every kind of model there); every measure stays on.
    monitor = (LazyTrainingMonitor("mse", probe=(x[:16], y[:16]), kappa_probe_size=8, ntk_probe_size=4, figure=False)
               if monitored else None)
    if monitor is not None:
        callbacks.append(monitor)
    if name == "unfrozen_backbone":
        callbacks.append(BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=0.5))
    options = dict(max_epochs=2, callbacks=callbacks, accelerator="cpu", devices=1, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=str(tmp_path), precision="64-true")
    if mechanism == "accumulate":
        options["accumulate_grad_batches"] = 2
    if mechanism in ("clip_value", "clip_norm"):
        options.update(gradient_clip_val=0.01, gradient_clip_algorithm=mechanism[5:])
    if mechanism == "scaler_skips":
        del options["precision"]
        options["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=SkippingScaler({2, 5}))]
    pl.Trainer(**options).fit(model, loader)
    return model, monitor


CASES = [(name, mechanism) for name in _zoo() for mechanism in MECHANISMS]


@pytest.mark.parametrize("name,mechanism", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_invariants(name, mechanism, tmp_path):
    linear = _zoo()[name][1]
    # (c) the monitor never changes the real run
    watched, monitor = _fit(name, mechanism, 0.05, True, tmp_path / "with")
    plain, _ = _fit(name, mechanism, 0.05, False, tmp_path / "without")
    for (key, a), b in zip(watched.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), f"{key} differs with the monitor"
    last = monitor.history[-1]
    assert last["displacement"] > 0, "the run must train for (b) and (c) to mean anything"
    # Normalized time counts the optimizer steps that moved the weights, no more.
    expected_steps = {"skip_none": 10, "skip_rest_of_epoch": 8, "accumulate": 6, "scaler_skips": 10}.get(mechanism, 12)
    assert monitor.core.steps == expected_steps
    # (b) a model linear in its trained parameters is its own tangent model
    if linear:
        assert last["divergence"] <= 1e-10, last
        assert last["tangent_gap"] <= 1e-7, last
    # (a) at learning rate 0 nothing moves, so nothing measured moves
    _, frozen = _fit(name, mechanism, 0.0, True, tmp_path / "lr0")
    for key, value in taken(frozen.history, "divergence", "tangent_gap", "displacement", "ntk_distance"):
        assert value == 0.0, (key, value)
    assert all(v == pytest.approx(1.0, abs=1e-12) for _, v in taken(frozen.history, "kernel_alignment"))
    assert all(v == pytest.approx(frozen.initial_kappa, rel=1e-6) for _, v in taken(frozen.history, "kappa"))
    assert all(entry["activation_stability"] == 1.0 for entry in frozen.history if "activation_stability" in entry)
    assert all(math.isfinite(v) for v in frozen.history[-1].values())
