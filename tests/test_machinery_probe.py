"""The monitor's measures under training machinery it did not write (issue 16, the probe and loop side).

For each kind, on more than one model, the three rules: (1) the monitor never changes the real run (same seed,
bit-identical real weights with and without it); (2) every logged number is right or not logged (a model linear
in its trained parameters, float64: Δ ≤ 1e-10 while the twin follows; learning rate 0: zero distances; where the
twin cannot follow, no twin-based measure); (3) a refusal is one line raised from lightning_lazy.

Kinds: layers whose forward writes into their own weights (``nn.Embedding(max_norm=...)``), pruning that renames
parameters mid-fit (``ModelPruning``), Lightning's tuners run inside fit (``LearningRateFinder``,
``BatchSizeFinder``), activation checkpointing, sparse gradients, ``ddp_spawn``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BatchSizeFinder, LearningRateFinder
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

from helpers_core import FrozenFeatures

from lightning_lazy import LazyTrainingMonitor

N, D, K, TOKENS, VOCAB = 32, 5, 3, 4, 9
DISTANCES = ("divergence", "tangent_gap", "displacement", "ntk_distance")
TWIN_BASED = ("divergence", "tangent_gap")


# --------------------------------------------------------------------------------------------- models


class Bag(nn.Module):
    """Mean-pooled token embeddings through a frozen projection: linear in the embedding (unless ``max_norm``)."""

    def __init__(self, max_norm: float | None = None, sparse: bool = False) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 6, max_norm=max_norm, sparse=sparse)
        self.project = nn.Linear(6, K).requires_grad_(False)

    def forward(self, tokens):
        return self.project(self.embedding(tokens).mean(1))


class TokenMLP(nn.Module):
    """Token embeddings, then a tanh layer: nonlinear in its weights."""

    def __init__(self, max_norm: float | None = None, sparse: bool = False) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 6, max_norm=max_norm, sparse=sparse)
        self.hidden = nn.Linear(6, 8)
        self.out = nn.Linear(8, K)

    def forward(self, tokens):
        return self.out(torch.tanh(self.hidden(self.embedding(tokens).mean(1))))


class Checkpointed(nn.Module):
    """A block run under ``torch.utils.checkpoint`` (``use_reentrant``: True, False; None: not checkpointed)."""

    def __init__(self, linear: bool, use_reentrant: bool | None) -> None:
        super().__init__()
        self.use_reentrant = use_reentrant
        # (Reentrant checkpointing gives no gradient to a block whose input needs none: the nonlinear block gets
        # a trainable stem before it, as in a real network.)
        self.stem = nn.Identity() if linear else nn.Linear(D, 12)
        self.block = FrozenFeatures(D, 12) if linear else nn.Sequential(nn.Tanh(), nn.Linear(12, 12), nn.Tanh())
        self.head = nn.Linear(12, K)

    def forward(self, x):
        h = self.stem(x)
        if self.use_reentrant is not None:
            return self.head(checkpoint(self.block, h, use_reentrant=self.use_reentrant))
        return self.head(self.block(h))


def _lit(base: type = pl.LightningModule) -> type:
    class Lit(base):
        def __init__(self, net: nn.Module, lr: float, optimizer: str = "sgd", batch_size: int = 8,
                     data: tuple | None = None) -> None:
            super().__init__()
            self.net, self.lr, self.optimizer, self.batch_size, self.data = net.double(), lr, optimizer, batch_size, data

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return 0.5 * (self(x) - y).pow(2).sum(1).mean()

        def train_dataloader(self):  # BatchSizeFinder changes self.batch_size and asks again
            return DataLoader(TensorDataset(*self.data), batch_size=self.batch_size)

        def configure_optimizers(self):
            params = [p for p in self.parameters() if p.requires_grad]
            if self.optimizer == "adamw":
                return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.01)
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9)

    return Lit


Lit = _lit()


def _data(tokens: bool, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    if tokens:
        x = torch.randint(0, VOCAB, (N, TOKENS), generator=generator)
    else:
        x = torch.randn(N, D, generator=generator, dtype=torch.float64)
    return x, torch.randn(N, K, generator=generator, dtype=torch.float64)


def _fit(make_net, tokens: bool, lr: float, monitored: bool, tmp_path, *, callbacks=list, optimizer: str = "sgd",
         epochs: int = 3, lit: type = Lit, trainer_cls: type = pl.Trainer, monitor_first: bool = True, **options):
    """(module, monitor, initial state) of one float64 fit; ``callbacks``: a factory of the other callbacks;
    ``options``: more monitor options."""
    x, y = _data(tokens)
    torch.manual_seed(0)
    module = lit(make_net(), lr, optimizer, data=(x, y))
    initial = {name: p.detach().clone() for name, p in module.named_parameters()}
    monitor = (LazyTrainingMonitor("mse", probe=(x[:12], y[:12]), kappa_probe_size=4, ntk_probe_size=4, figure=False,
                                   **options) if monitored else None)
    others = list(callbacks())
    chosen = ([monitor] + others if monitor_first else others + [monitor]) if monitor else others
    trainer_cls(max_epochs=epochs, callbacks=chosen, accelerator="cpu", devices=1, logger=False,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                default_root_dir=str(tmp_path), precision="64-true").fit(module)
    return module, monitor, initial


def _same_run(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), f"{name} differs with the monitor"


def _assert_lr0(monitor: LazyTrainingMonitor, keys=DISTANCES) -> None:
    assert monitor.history
    for entry in monitor.history:
        for key in keys:
            if key in entry:
                assert entry[key] == 0.0, (key, entry)
        assert entry["displacement"] == 0.0
        assert all(math.isfinite(v) for v in entry.values() if isinstance(v, float))


# ------------------------------------------------------------------------------ 1. forwards that write


@pytest.mark.parametrize("net", [Bag, TokenMLP])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_max_norm_embeddings_measured_on_copies(net, optimizer, tmp_path):
    # max_norm=0.5: every row exceeds it at init, so every forward of the network renormalizes rows in place.
    make = lambda: net(max_norm=0.5)  # noqa: E731
    with pytest.warns(UserWarning, match="written"):  # the real forward's renormalization: the twin cannot replay it
        watched, monitor, initial = _fit(make, True, 0.1, True, tmp_path / "with", optimizer=optimizer)
    plain, _, _ = _fit(make, True, 0.1, False, tmp_path / "without", optimizer=optimizer)
    _same_run(watched, plain)  # (1): the monitor's own forwards never renormalized a real weight
    assert monitor.measures._writes  # the probe saw a forward write, and then copies at every call
    for name, w0 in monitor.measures.initial.items():  # w0 is the weights before fit, untouched by any forward
        assert torch.equal(w0, initial[name[len("inner."):]]), name
    # (2) no Δ from a twin that could not follow; the displacement is the real weights' own distance from w0 (the
    # renormalizations included)
    assert all(key not in entry for entry in monitor.history for key in TWIN_BASED)
    names = monitor.core.measured_names()
    moved = sum(float((watched.get_parameter(n[6:]).detach() - initial[n[6:]]).pow(2).sum()) for n in names)
    scale = sum(float(initial[n[6:]].pow(2).sum()) for n in names)
    assert monitor.history[-1]["displacement"] == pytest.approx(math.sqrt(moved / scale), rel=1e-12)


@pytest.mark.parametrize("net", [Bag, TokenMLP])
def test_max_norm_at_lr0_measures_nothing(net, tmp_path):
    # max_norm above every initial row norm: at lr 0 nothing moves, and no measure's forward may move anything.
    _, monitor, initial = _fit(lambda: net(max_norm=50.0), True, 0.0, True, tmp_path)
    _assert_lr0(monitor)
    for name, w0 in monitor.measures.initial.items():
        assert torch.equal(w0, initial[name[len("inner."):]]), name


# ------------------------------------------------------------------------------------- 2. pruning


def _pruning(module, permanent: bool = True) -> callable:
    # Prunes 30 % of each Linear weight at the end of epoch 0: weight becomes weight_orig * weight_mask (and, made
    # permanent at the end of training, weight again, holding the masked values).
    return lambda: [module.ModelPruning("l1_unstructured", amount=0.3, apply_pruning=lambda epoch: epoch == 0,
                                        use_lottery_ticket_hypothesis=False, make_pruning_permanent=permanent,
                                        verbose=0)]


def _lightning_modules() -> list:
    import pytorch_lightning.callbacks as classic

    found = [("pytorch_lightning", pl.Trainer, Lit, classic)]
    if importlib.util.find_spec("lightning") is not None:
        import lightning.pytorch as L
        import lightning.pytorch.callbacks as unified

        found.append(("lightning.pytorch", L.Trainer, _lit(L.LightningModule), unified))
    return found


PACKAGES = _lightning_modules()


@pytest.mark.parametrize("package", PACKAGES, ids=[p[0] for p in PACKAGES])
@pytest.mark.parametrize("linear", [True, False], ids=["linear", "mlp"])
def test_pruning_keeps_w0_and_stops_the_twin(package, linear, tmp_path):
    _, trainer_cls, lit, module = package
    make = lambda: Checkpointed(linear, None)  # noqa: E731  (plain: not checkpointed)
    # The measurements of epoch 0 (before the pruning) are what this is about: no budget that could leave them out.
    run = dict(lit=lit, trainer_cls=trainer_cls, callbacks=_pruning(module, permanent=linear), budget=None)
    with pytest.warns(UserWarning, match="pruning"):
        watched, monitor, initial = _fit(make, False, 0.05, True, tmp_path / "with", **run)
    plain, _, _ = _fit(make, False, 0.05, False, tmp_path / "without", **run)
    _same_run(watched, plain)
    # Epoch 0 (its log-spaced steps and its end) is measured before pruning (the monitor comes first), later ones after.
    before = [entry for entry in monitor.history if entry["epoch"] == 0]
    later = [entry for entry in monitor.history if entry["epoch"] >= 1]
    if linear:
        assert before and all(entry["divergence"] <= 1e-10 for entry in before)
    assert later and all(key not in entry for entry in later for key in TWIN_BASED)
    # The renamed parameter kept its w0 and its name: its displacement is its real distance from w0 (at the last
    # measurement: weight_orig when the pruning is not made permanent after it).
    assert "head.weight" in monitor.core._last_per_tensor  # named as the network names it
    if linear:  # made permanent at the end of training: the same Parameter, named weight again
        assert isinstance(watched.net.head.weight, nn.Parameter) and not hasattr(watched.net.head, "weight_orig")
    else:
        w, w0 = watched.net.head.weight_orig.detach(), initial["net.head.weight"]
        assert monitor.core._last_per_tensor["head.weight"] == pytest.approx(float((w - w0).norm() / w0.norm()),
                                                                            rel=1e-12)
    # (2) at lr 0 the weights never move: every displacement is 0 before and after pruning, and no Δ after it
    with pytest.warns(UserWarning, match="pruning"):
        _, frozen, _ = _fit(make, False, 0.0, True, tmp_path / "lr0", **run)
    before = [entry for entry in frozen.history if entry["epoch"] == 0]
    assert before and all(entry["divergence"] == 0.0 and entry["ntk_distance"] == 0.0 for entry in before)
    _assert_lr0(frozen, keys=("displacement", *TWIN_BASED))
    assert all(key not in entry for entry in frozen.history if entry["epoch"] >= 1 for key in TWIN_BASED)


def test_pruning_before_the_measurement_is_seen_first(tmp_path):
    # ModelPruning listed before the monitor prunes at epoch 0's end before the monitor measures: that
    # measurement already has no Δ (never a divergence from a twin that computes the unpruned network).
    with pytest.warns(UserWarning, match="weight_orig"):
        # The measurement at epoch 0's end is the one this is about: no budget that could leave it out.
        _, monitor, _ = _fit(lambda: Checkpointed(False, None), False, 0.05, True, tmp_path,
                             callbacks=_pruning(pl.callbacks), monitor_first=False, budget=None)
    # Epoch 0's log-spaced steps come before the pruning, its end measurement (the last of epoch 0) after it.
    end_of_first = max(i for i, entry in enumerate(monitor.history) if entry["epoch"] == 0)
    assert all("divergence" in entry for entry in monitor.history[:end_of_first])
    assert all(key not in entry for entry in monitor.history[end_of_first:] for key in TWIN_BASED)
    assert all(entry["displacement"] > 0 for entry in monitor.history)


# ------------------------------------------------------------------------------------- 3. tuners


class MilestoneLR(LearningRateFinder):
    """Lightning's documented fine-tuning use: the learning-rate finder at milestone epochs."""

    def __init__(self, milestones: tuple[int, ...], **kwargs) -> None:
        super().__init__(**kwargs)
        self.milestones = milestones

    def on_fit_start(self, *args, **kwargs):
        return

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch in self.milestones:
            self.lr_find(trainer, pl_module)


class MilestoneBatchSize(BatchSizeFinder):
    """The batch-size finder at fit start (Lightning's default) and at a milestone epoch."""

    def __init__(self, milestones: tuple[int, ...], **kwargs) -> None:
        super().__init__(**kwargs)
        self.milestones = milestones

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch in self.milestones:
            self.scale_batch_size(trainer, pl_module)


TUNERS = {
    # milestones 0 (nothing measured yet when the trial starts) and 1 (an epoch measured and stepped before it)
    "lr_finder": (lambda update: [MilestoneLR((0, 1), min_lr=1e-4, max_lr=0.5, num_training_steps=5,
                                              early_stop_threshold=None, update_attr=update)], True),
    "batch_size_finder": (lambda update: [MilestoneBatchSize((1,), init_val=4, max_trials=2, steps_per_trial=6)], False),
}


@pytest.mark.parametrize("tuner", list(TUNERS))
@pytest.mark.parametrize("linear", [True, False], ids=["linear", "mlp"])
def test_tuner_trial_steps_are_not_taken(tuner, linear, tmp_path):
    make_callbacks, steps_per_epoch = TUNERS[tuner]
    make = lambda: Checkpointed(linear, None)  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watched, monitor, _ = _fit(make, False, 0.05, True, tmp_path / "with", callbacks=lambda: make_callbacks(True))
    # The trial steps, taken with the monitor's hooks swapped out, are not something the twin lost the run over.
    assert not [w for w in caught if "no longer logged" in str(w.message)]
    plain, _, _ = _fit(make, False, 0.05, False, tmp_path / "without", callbacks=lambda: make_callbacks(True))
    _same_run(watched, plain)
    # Only the steps the real run kept (the trainer's count, restored with the checkpoint).
    assert monitor.core.steps == watched.trainer.global_step == plain.trainer.global_step
    if steps_per_epoch:
        assert monitor.core.steps == 3 * N // 8
    last = monitor.history[-1]
    assert last["displacement"] > 0 and [e["epoch"] for e in monitor.history].count(2.0) >= 1
    if linear:
        assert last["divergence"] <= 1e-10 and last["tangent_gap"] <= 1e-7, last
    # (2) at lr 0 (the finder leaves it there: update_attr=False) the trial steps move the real weights, the restore
    # puts them back, and nothing the monitor measures has moved; normalized time counts no trial step.
    _, frozen, _ = _fit(make, False, 0.0, True, tmp_path / "lr0", callbacks=lambda: make_callbacks(False))
    _assert_lr0(frozen)
    assert frozen.history[-1]["normalized_time"] == 0.0


# ---------------------------------------------------------------------- 4. checkpointing, sparse gradients


def _measured(monitor):
    return [{k: v for k, v in entry.items() if k not in ("kappa", "hessian_norm", "bound")} for entry in monitor.history]


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("linear", [True, False], ids=["linear", "mlp"])
def test_activation_checkpointing_gives_the_plain_numbers(use_reentrant, linear, tmp_path):
    watched, monitor, _ = _fit(lambda: Checkpointed(linear, use_reentrant), False, 0.05, True, tmp_path / "ckpt")
    _, reference, _ = _fit(lambda: Checkpointed(linear, None), False, 0.05, True, tmp_path / "eager")
    plain, _, _ = _fit(lambda: Checkpointed(linear, use_reentrant), False, 0.05, False, tmp_path / "without")
    _same_run(watched, plain)
    for got, expected in zip(_measured(monitor), _measured(reference), strict=True):
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    if linear:
        assert monitor.history[-1]["divergence"] <= 1e-10
    _, frozen, _ = _fit(lambda: Checkpointed(linear, use_reentrant), False, 0.0, True, tmp_path / "lr0")
    _assert_lr0(frozen)


@pytest.mark.parametrize("net", [Bag, TokenMLP])
def test_sparse_embedding_gradients_give_the_dense_numbers(net, tmp_path):
    sgd = dict(optimizer="sgd")
    watched, monitor, _ = _fit(lambda: net(sparse=True), True, 0.1, True, tmp_path / "sparse", **sgd)
    _, reference, _ = _fit(lambda: net(sparse=False), True, 0.1, True, tmp_path / "dense", **sgd)
    plain, _, _ = _fit(lambda: net(sparse=True), True, 0.1, False, tmp_path / "without", **sgd)
    _same_run(watched, plain)
    assert watched.net.embedding.sparse  # the user's layer is left as it was
    for got, expected in zip(_measured(monitor), _measured(reference), strict=True):
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    if net is Bag:
        assert monitor.history[-1]["divergence"] <= 1e-10
    _, frozen, _ = _fit(lambda: net(sparse=True), True, 0.0, True, tmp_path / "lr0", **sgd)
    _assert_lr0(frozen)


class SparseAdamLit(Lit):
    def configure_optimizers(self):
        return torch.optim.SparseAdam([self.net.embedding.weight], lr=self.lr)


def test_sparse_adam_is_followed(tmp_path):
    # SparseAdam takes only sparse gradients: the twin's copy gets them too (its forward is not densified).
    run = dict(lit=SparseAdamLit)
    watched, monitor, _ = _fit(lambda: Bag(sparse=True), True, 0.1, True, tmp_path / "with", **run)
    plain, _, _ = _fit(lambda: Bag(sparse=True), True, 0.1, False, tmp_path / "without", **run)
    _same_run(watched, plain)
    last = monitor.history[-1]
    assert last["displacement"] > 0 and last["divergence"] <= 1e-10 and last["tangent_gap"] <= 1e-7
    # (lr 0: SparseAdam refuses it; the sparse-gradient test above checks lr 0 with SGD.)


# ------------------------------------------------------------------------------- 6. refusals: one line


class Replacing(pl.Callback):
    """Assigns a new Parameter in place of the head's weight after the first epoch (not the same tensor)."""

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            pl_module.net.head.weight = nn.Parameter(pl_module.net.head.weight.detach().clone())


def test_a_replaced_parameter_is_refused_in_one_line(tmp_path):
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException) as error:  # at the first measurement after it: no value logged
        _fit(lambda: Checkpointed(False, None), False, 0.05, True, tmp_path, callbacks=lambda: [Replacing()],
             monitor_first=False)
    message = str(error.value)
    assert "\n" not in message and "no longer in" in message and "in place" in message
    assert error.value.__cause__ is None and error.value.__suppress_context__


# ------------------------------------------------------------------------------------------ 5. ddp_spawn


def test_a_fit_in_another_process_hands_its_values_back(tmp_path):
    # What ddp_spawn does, in one process: the monitor is pickled into the process that fits (whose pid is not
    # the one the monitor was made in); the original, which measured nothing, reads back rank 0's numbers.
    import pickle

    from pytorch_lightning.loggers import CSVLogger

    from lightning_helpers import Regressor, loaders

    train, _ = loaders(batch_size=8, n=32)
    monitor = LazyTrainingMonitor(probe_size=8, kappa_probe_size=4, ntk_probe_size=4, figure=False)
    assert "nothing" in monitor.summary().lower() or monitor.summary_values()["divergence"] is None
    spawned = pickle.loads(pickle.dumps(monitor))
    spawned._origin_pid = -1  # as seen from the spawned process: made elsewhere
    pl.Trainer(max_epochs=2, callbacks=[spawned], accelerator="cpu", devices=1,
               logger=CSVLogger(str(tmp_path), name="runs"), enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, default_root_dir=str(tmp_path)).fit(Regressor(scheduler=False), train)
    assert monitor.measures is None and not monitor.history
    text = monitor.summary()
    assert str(tmp_path / "runs" / "version_0") in text, text
    assert monitor.history == spawned.history and monitor.summary_values() == spawned.summary_values()
    assert f"{spawned.history[-1]['divergence']:.4g}" in text


@pytest.mark.skipif(not os.environ.get("LIGHTNING_LAZY_SPAWN_TEST"), reason="two spawned processes take about a "
                    "minute on a shared 2-core machine: set LIGHTNING_LAZY_SPAWN_TEST=1 to run it")
def test_ddp_spawn_hands_the_values_back(tmp_path):
    # The fit runs in two spawned processes; this process's monitor measured nothing itself, and its summary
    # carries rank 0's numbers and says where they were logged.
    from pytorch_lightning.loggers import CSVLogger

    from lightning_helpers import Regressor, loaders

    train, _ = loaders(batch_size=8, n=32)
    monitor = LazyTrainingMonitor(probe_size=8, kappa_probe_size=4, ntk_probe_size=4, figure=False)
    trainer = pl.Trainer(max_epochs=2, callbacks=[monitor], accelerator="cpu", devices=2, strategy="ddp_spawn",
                         logger=CSVLogger(str(tmp_path), name="runs"), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(Regressor(scheduler=False), train)
    assert monitor.measures is None  # nothing was measured in this process
    text = monitor.summary()
    assert "divergence" in text and str(tmp_path / "runs" / "version_0") in text, text
    assert monitor.history and monitor.history[-1]["epoch"] == 1 and monitor.history[-1]["divergence"] > 0
    assert monitor.summary_values()["divergence"] == monitor.history[-1]["divergence"]
    logged = (tmp_path / "runs" / "version_0" / "metrics.csv").read_text()
    assert f"{monitor.history[-1]['divergence']:.6g}"[:6] in logged


def test_checkpointing_that_cannot_run_plainly_is_refused_in_one_line(tmp_path, monkeypatch):
    # Where torch's checkpoint internals could not be swapped for a plain call (another torch version), the
    # monitor refuses in one line that names checkpointing and the way out, instead of torch's traceback.
    import contextlib

    from lightning_lazy import _forward_ad

    monkeypatch.setattr(_forward_ad, "plain_checkpoints", contextlib.nullcontext)
    with pytest.raises(Exception) as error:
        _fit(lambda: Checkpointed(False, False), False, 0.05, True, tmp_path)
    message = str(error.value)
    assert type(error.value).__module__.startswith("lightning_lazy") and "\n" not in message
    assert "checkpointing" in message and "switch checkpointing off while monitoring" in message
