"""Every model a researcher trains can be watched: attention, RNNs, models without forward(), sequence and dict
outputs, the linearized mode, and a ``lightning.pytorch`` Trainer.

Each zoo model is fitted with the monitor as it ships (twin, κ, NTK, activation stability, figure): every value
logged is finite, and at learning rate 0 Δ is exactly 0.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers_core import taken

from lightning_lazy import LazyClassifier, LazyTrainingMonitor

N, T, VOCAB, DIM = 32, 6, 13, 16


class Encoder(nn.Module):
    """Tokens -> nn.TransformerEncoder (ReLU, batch_first) -> mean -> logits [N, 3]."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        layer = nn.TransformerEncoderLayer(DIM, 2, 32, dropout=0.1, activation="relu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(DIM, 3)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(1))


class SDPA(nn.Module):
    """Hand-written attention through F.scaled_dot_product_attention."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(DIM, 3))

    def forward(self, tokens):
        q, k, v = self.qkv(self.embed(tokens)).chunk(3, -1)
        return self.head(F.scaled_dot_product_attention(q, k, v).mean(1))


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = cell(4, DIM, batch_first=True)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(DIM, 2))

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class TiedLM(nn.Module):
    """A token-level language model: logits [N, T, V], the output projection tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.mix = nn.Sequential(nn.Linear(DIM, DIM), nn.ReLU())
        self.out = nn.Linear(DIM, VOCAB, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens):
        return self.out(self.mix(self.embed(tokens)))


class DictOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, DIM), nn.ReLU(), nn.Linear(DIM, 3))

    def forward(self, x):
        return {"logits": self.net(x), "features": x}


class Sequence(nn.Module):
    """Regression of a sequence: [N, T, 4] -> [N, T, 2]."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, DIM), nn.ReLU(), nn.Linear(DIM, 2))

    def forward(self, x):
        return self.net(x)


def _tokens(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (N, T), generator=generator)


def _zoo():
    """name -> (network, x, y, loss for the monitor, training loss, monitor options, module calls the network
    as ``self.model`` without a forward of its own)."""
    g = torch.Generator().manual_seed(1)
    classes = torch.randint(0, 3, (N,), generator=g)
    seq = torch.randn(N, T, 4, generator=g)
    return {
        "transformer": (Encoder, _tokens(), classes, "cross_entropy", F.cross_entropy, {}, False),
        "sdpa": (SDPA, _tokens(), classes, "cross_entropy", F.cross_entropy, {}, False),
        "lstm": (lambda: Recurrent(nn.LSTM), seq, torch.randn(N, 2, generator=g), "mse", None, {}, False),
        "gru": (lambda: Recurrent(nn.GRU), seq, torch.randn(N, 2, generator=g), "mse", None, {}, False),
        "no_forward": (lambda: nn.Sequential(nn.Linear(4, DIM), nn.ReLU(), nn.Linear(DIM, 2)),
                       torch.randn(N, 4, generator=g), torch.randn(N, 2, generator=g), "mse", None,
                       {"model": "model"}, True),
        "sequence_regression": (Sequence, seq, torch.randn(N, T, 2, generator=g), "mse", None, {}, False),
        "tied_lm": (TiedLM, _tokens(), _tokens(2), "cross_entropy",
                    lambda out, y: F.cross_entropy(out.reshape(-1, VOCAB), y.reshape(-1)), {}, False),
        "dict_output": (DictOutput, torch.randn(N, 4, generator=g), classes, "cross_entropy", F.cross_entropy,
                        {"output": "logits"}, False),
    }


def _half_mse(out, y):
    return 0.5 * (out - y).pow(2).flatten(1).sum(1).mean()


def _module_classes(base: type) -> tuple[type, type]:
    """The zoo's LightningModule, from ``pytorch_lightning`` or ``lightning.pytorch`` (``base``): without and with
    a ``forward``."""

    class Watchable(base):
        def __init__(self, name: str, lr: float) -> None:
            super().__init__()
            torch.manual_seed(0)
            network, _, _, _, loss, _, no_forward = _zoo()[name]
            self.model = network()
            self.training_loss = loss or _half_mse
            self.lr = lr

        def _out(self, x):
            out = self.model(x)
            return out["logits"] if isinstance(out, dict) else out

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.training_loss(self._out(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", self.training_loss(self._out(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr)

    class WithForward(Watchable):
        def forward(self, x):
            return self.model(x)

    return Watchable, WithForward


Watchable, WithForward = _module_classes(pl.LightningModule)


def _fit(name, lr, tmp_path, trainer_cls=pl.Trainer, logger_cls=None, eval_mode=False, classes=None):
    _, x, y, loss, _, options, no_forward = _zoo()[name]
    without_forward, with_forward = classes or (Watchable, WithForward)
    model = (without_forward if no_forward else with_forward)(name, lr)
    if eval_mode:  # a model trained with dropout off (e.g. a frozen-statistics fine-tune)
        model.model.eval()
        model.model.train = lambda mode=True: model.model  # keep it in eval through Lightning's mode switches
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    monitor = LazyTrainingMonitor(loss, probe=(x[:16], y[:16]), kappa_probe_size=8, ntk_probe_size=4, **options)
    if logger_cls is None:
        from pytorch_lightning.loggers import TensorBoardLogger as logger_cls
    trainer = trainer_cls(max_epochs=2, callbacks=[monitor], accelerator="cpu", devices=1,
                          logger=logger_cls(str(tmp_path), name="runs"), enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(model, loader, DataLoader(TensorDataset(x[:16], y[:16]), batch_size=8))
    return monitor, trainer


@pytest.mark.parametrize("name", list(_zoo()))
def test_zoo_model_is_watched(name, tmp_path):
    monitor, trainer = _fit(name, 0.05, tmp_path / "train")
    last = monitor.history[-1]
    for key in ("divergence", "kappa", "ntk_distance", "kernel_alignment", "displacement", "activation_stability"):
        assert math.isfinite(last[key]), (key, last)
    assert last["displacement"] > 0
    assert math.isfinite(float(trainer.callback_metrics["lazy/tangent/val_loss"]))
    frozen, _ = _fit(name, 0.0, tmp_path / "lr0")
    assert all(value == 0.0 for _, value in taken(frozen.history, "divergence", "ntk_distance"))


def test_transformer_in_eval_mode(tmp_path):
    frozen, _ = _fit("transformer", 0.0, tmp_path, eval_mode=True)
    assert all(entry["divergence"] == 0.0 for entry in frozen.history)


def test_module_without_forward_gets_a_clear_error(tmp_path):
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    _, x, y, *_ = _zoo()["no_forward"]
    trainer = pl.Trainer(max_epochs=1, callbacks=[LazyTrainingMonitor("mse")], logger=False, accelerator="cpu",
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(MisconfigurationException, match=r"has no forward\(\).*model='model'"):
        trainer.fit(Watchable("no_forward", 0.1), DataLoader(TensorDataset(x, y), batch_size=8))


def test_linearized_mode_is_its_own_tangent_model(tmp_path):
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 8, generator=generator, dtype=torch.float64), torch.randint(0, 3, (32,), generator=generator)
    backbone = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    model = LazyClassifier(backbone, mode="linearized", lr=0.1, num_classes=3)
    monitor = LazyTrainingMonitor(probe=(x[:16], y[:16]), kappa_probe_size=8, ntk_probe_size=4)
    pl.Trainer(max_epochs=2, callbacks=[monitor], accelerator="cpu", logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, precision="64-true").fit(
        model, DataLoader(TensorDataset(x, y), batch_size=8))
    last = monitor.history[-1]
    assert last["displacement"] > 0
    assert last["divergence"] <= 1e-10 and last["ntk_distance"] <= 1e-10


@pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="the lightning package is not installed")
def test_lightning_pytorch_trainer_gets_everything(tmp_path):
    import lightning.pytorch as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monitor, _ = _fit("sequence_regression", 0.05, tmp_path, trainer_cls=L.Trainer, logger_cls=TensorBoardLogger,
                      classes=_module_classes(L.LightningModule))
    assert monitor.history
    (path,) = (tmp_path / "runs" / "version_0").glob("events.out.tfevents.*")
    events = EventAccumulator(str(path), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert "lazy/figure" in events.Tags()["images"]
    assert any("custom_scalars" in tag for tag in events.Tags()["tensors"])  # the layout
    assert "lazy/divergence" in events.Tags()["scalars"]


def test_the_errors_on_what_to_watch_name_the_modules_sub_modules():
    """Without forward(), the refusal suggests the module's own sub-module (not a fixed name) and lists them; a
    model= path that does not exist lists what does (the core's one-line WatchError; the callback re-raises it as
    Lightning's MisconfigurationException)."""
    from lightning_lazy.watch.batches import WatchError as MisconfigurationException
    from lightning_lazy.watch.objective import resolve_watched

    class NoForward(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lm = nn.Linear(3, 2)
            self.head = nn.Linear(2, 2)

    with pytest.raises(MisconfigurationException,
                       match=r"model='lm'\) for the sub-module .* module\.lm\(x\) \(its sub-modules: 'lm', 'head'\)"):
        resolve_watched(NoForward(), None, None)
    with pytest.raises(MisconfigurationException, match=r"has no attribute 'model' \(its sub-modules: 'lm', 'head'\)"):
        resolve_watched(NoForward(), "model", None)
    assert isinstance(resolve_watched(NoForward(), "lm", None).inner, nn.Linear)
