"""One core, thin adapters: the plain loop (``LazinessWatch``), Lightning Fabric, Lightning's manual optimization and
the Hugging Face Trainer keep the invariants the Lightning callback keeps.

- same seed => bit-identical real weights with and without the monitor (it never changes the run);
- learning rate 0 => every distance exactly 0;
- a model linear in its trained parameters => Δ at round-off (the twin follows every step), in float64.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers_core import taken

from lightning_lazy import AlphaScaled, LazinessWatch, LazyTrainingMonitor

DISTANCES = ("divergence", "displacement", "tangent_gap", "ntk_distance")


def _data(n: int = 48, d: int = 6, k: int = 3, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, k, generator=g, dtype=dtype)


def _net(d: int = 6, k: int = 3, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, k))


class LinearInParams(nn.Module):
    """f(x; A, B) = x A + tanh(x) B: linear in (A, B), nonlinear in x."""

    def __init__(self, d: int = 6, k: int = 3) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.a = nn.Parameter(torch.randn(d, k) / d**0.5)
        self.b = nn.Parameter(torch.randn(d, k) / d**0.5)

    def forward(self, x):
        return x @ self.a + torch.tanh(x) @ self.b


def _half_mse(out, y):
    return 0.5 * ((out - y) ** 2).sum(-1).mean()


def _plain_loop(model, lr, watch_kwargs=None, steps=12, batch=8, accumulate=1, dtype=torch.float32, momentum=0.9):
    """The issue's loop: zero_grad, forward, backward, watch.batch, step; with ``watch_kwargs=None`` no watch."""
    x, y = _data(dtype=dtype)
    model = model.to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=1e-3)
    watch = None if watch_kwargs is None else LazinessWatch(model, opt, loss="mse", probe=(x[:24], y[:24]),
                                                            **watch_kwargs)
    torch.manual_seed(3)
    for i in range(steps * accumulate):
        xb, yb = x[(i * batch) % 40:(i * batch) % 40 + batch], y[(i * batch) % 40:(i * batch) % 40 + batch]
        if i % accumulate == 0:
            opt.zero_grad(set_to_none=accumulate == 1)
        loss = _half_mse(model(xb), yb) / accumulate
        loss.backward()
        if watch is not None:
            watch.batch(xb, yb)
        if (i + 1) % accumulate == 0:
            opt.step()
    return model, watch


def test_the_issue_snippet_runs_as_written(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x_probe, y_probe = torch.randn(64, 10), torch.randn(64, 1)
    loader = DataLoader(TensorDataset(torch.randn(96, 10), torch.randn(96, 1)), batch_size=16)
    loss_fn = lambda out, y: 0.5 * ((out - y) ** 2).sum(-1).mean()  # noqa: E731 - "mse" is ½‖·‖² per example
    watch = LazinessWatch(model, optimizer, loss="mse", probe=(x_probe, y_probe), log_dir=str(tmp_path / "exp"))
    for x, y in loader:
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        watch.batch(x, y)
        optimizer.step()
    watch.measure()
    text = watch.summary()
    watch.close()
    assert "Regime:" in text
    # Log steps 1, 2, 4 (the default budget may thin or leave them out), then measure() after 6 steps, always whole.
    steps = [h["step"] for h in watch.history]
    assert set(steps) <= {1.0, 2.0, 4.0, 6.0} and steps == sorted(steps) and steps[-1] == 6.0, steps
    assert "kappa" in watch.history[-1] and "ntk_distance" in watch.history[-1]
    assert all(math.isfinite(v) for h in watch.history for v in h.values())
    for name in ("laziness.png", "layers.png", "lazy_summary.txt"):
        assert (tmp_path / "exp" / name).stat().st_size > 0, name
    assert list((tmp_path / "exp").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("accumulate", [1, 3])
def test_plain_loop_linear_model_keeps_divergence_at_round_off(accumulate):
    # Momentum, weight decay, and accumulation with zero_grad(set_to_none=False) and a loss divided by 3: the twin
    # follows all of it (the 1/3 found at w0), so for a model linear in its parameters the two paths coincide.
    _, watch = _plain_loop(LinearInParams(), lr=0.2, watch_kwargs={}, dtype=torch.float64, accumulate=accumulate)
    values = watch.measure()
    assert values["displacement"] > 1e-2
    assert values["divergence"] < 1e-10 and values["tangent_gap"] < 1e-8
    assert watch.twin.lost is None


def test_plain_loop_at_lr_zero_every_distance_is_exactly_zero():
    _, watch = _plain_loop(_net(), lr=0.0, watch_kwargs={})
    watch.measure()  # the end state, whole (the budget may have thinned the scheduled ones)
    assert all(value == 0.0 for _, value in taken(watch.history, *DISTANCES)), watch.history


def test_plain_loop_never_changes_the_run():
    a, _ = _plain_loop(_net(dropout=0.3), lr=0.1, watch_kwargs={})
    b, _ = _plain_loop(_net(dropout=0.3), lr=0.1, watch_kwargs=None)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_plain_loop_with_another_loss_says_so_and_logs_no_divergence():
    x, y = _data()
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = LazinessWatch(model, opt, loss="mse", probe=(x, y))
    with pytest.warns(UserWarning, match="another objective"):
        for i in range(4):
            opt.zero_grad()
            F.l1_loss(model(x[i * 8:(i + 1) * 8]), y[i * 8:(i + 1) * 8]).backward()
            watch.batch(x[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8])
            opt.step()
    assert watch.history and all("divergence" not in h for h in watch.history)
    assert "displacement" in watch.history[-1]
    assert "stopped following" in watch.summary()


def test_plain_loop_clipping_is_replayed_when_given():
    x, y = _data(dtype=torch.float64)
    model = LinearInParams().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    clip = lambda o: torch.nn.utils.clip_grad_norm_([p for g in o.param_groups for p in g["params"]], 0.05)  # noqa
    watch = LazinessWatch(model, opt, loss="mse", probe=(x, y), clip=clip)
    for i in range(5):
        opt.zero_grad()
        _half_mse(model(x[i * 8:(i + 1) * 8]), y[i * 8:(i + 1) * 8]).backward()
        watch.batch(x[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8])
        clip(opt)
        opt.step()
    assert watch.twin.lost is None and watch.measure()["divergence"] < 1e-10


def test_options_in_groups_equal_flat_keywords():
    from lightning_lazy import Measure, When

    x, y = _data()
    model, opt = _net(), None
    grouped = LazinessWatch(model, opt, loss="mse", probe=(x, y), measure=Measure(ntk=False, probe_size=8),
                            when=When(log_steps=None), track_tangent=False)
    flat = LazinessWatch(model, opt, loss="mse", probe=(x, y), measure_ntk=False, probe_size=8, log_steps=None,
                         track_tangent=False)
    assert grouped.options == flat.options
    with pytest.raises(ValueError, match="given twice"):
        LazinessWatch(model, opt, loss="mse", measure=Measure(probe_size=8), probe_size=4, track_tangent=False)


# -------------------------------------------------------------------------------------------------- Fabric


def _fabric_loop(lr, watched: bool, model_fn=_net, dtype=torch.float32):
    from lightning_fabric import Fabric

    # "32-true" leaves a float64 model as it is ("64-true" casts the outputs back to float32, round-off the real run
    # then has and its linearization has not).
    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    x, y = _data(dtype=dtype)
    model = model_fn().to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model, optimizer = fabric.setup(model, optimizer)
    watch = LazinessWatch(model, optimizer, loss="mse", probe=(x[:24], y[:24])) if watched else None
    torch.manual_seed(3)
    for i in range(8):
        xb, yb = x[i * 5:i * 5 + 8], y[i * 5:i * 5 + 8]
        optimizer.zero_grad()
        loss = _half_mse(model(xb), yb)
        fabric.backward(loss)
        if watch is not None:
            watch.batch(xb, yb)
        optimizer.step()
    return model, watch


def test_fabric_keeps_the_invariants():
    a, watch = _fabric_loop(0.1, True, model_fn=lambda: _net(dropout=0.2))
    b, _ = _fabric_loop(0.1, False, model_fn=lambda: _net(dropout=0.2))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert watch.history and watch.twin.lost is None
    _, still = _fabric_loop(0.0, True)
    still.measure()  # the end state, whole (the budget may have thinned the scheduled ones)
    assert all(value == 0.0 for _, value in taken(still.history, *DISTANCES))
    _, linear = _fabric_loop(0.3, True, model_fn=LinearInParams, dtype=torch.float64)
    assert linear.measure()["divergence"] < 1e-10


# ------------------------------------------------------------------------------- Lightning manual optimization


class Manual(pl.LightningModule):
    """Manual optimization with accumulation over 2 batches (loss / 2, zero_grad(set_to_none=False)) and clipping
    through self.clip_gradients."""

    def __init__(self, net: nn.Module, lr: float = 0.2, clip: float | None = 0.5) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net, self.lr, self.clip = net, lr, clip

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = _half_mse(self(x), y) / 2
        self.manual_backward(loss)
        if batch_idx % 2 == 1:
            if self.clip:
                self.clip_gradients(opt, gradient_clip_val=self.clip, gradient_clip_algorithm="norm")
            opt.step()
            opt.zero_grad(set_to_none=False)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-3)


def _manual_fit(tmp_path, net, lr=0.2, monitor=True, dtype=torch.float32, epochs=2):
    x, y = _data(dtype=dtype)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    module = Manual(net.to(dtype), lr=lr)
    callbacks = [LazyTrainingMonitor(loss="mse")] if monitor else []
    pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=callbacks, default_root_dir=str(tmp_path),
               precision="64-true" if dtype == torch.float64 else "32-true").fit(module, loader)
    return module, (callbacks[0] if callbacks else None)


def test_manual_optimization_is_followed(tmp_path):
    module, monitor = _manual_fit(tmp_path, LinearInParams(), dtype=torch.float64, lr=0.5)
    assert monitor.twin.lost is None
    values = monitor.measure()
    assert values["displacement"] > 1e-2 and values["divergence"] < 1e-10 and values["tangent_gap"] < 1e-8
    assert monitor.core.steps == 6  # 2 epochs of 6 batches, a step every 2


def test_manual_optimization_never_changes_the_run_and_is_still_at_lr_zero(tmp_path):
    a, _ = _manual_fit(tmp_path, _net(dropout=0.2))
    b, _ = _manual_fit(tmp_path, _net(dropout=0.2), monitor=False)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    _, monitor = _manual_fit(tmp_path, _net(), lr=0.0)
    assert all(value == 0.0 for _, value in taken(monitor.history, *DISTANCES))


class GAN(pl.LightningModule):
    """Two optimizers on two objectives (manual optimization, as Lightning's GAN example)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.generator = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 6))
        self.discriminator = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        opt_g, opt_d = self.optimizers()
        z, real = batch
        fake = self.generator(z)
        ones, zeros = torch.ones(len(z), 1), torch.zeros(len(z), 1)
        g_loss = F.binary_cross_entropy_with_logits(self.discriminator(fake), ones)
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        d_loss = (F.binary_cross_entropy_with_logits(self.discriminator(real), ones)
                  + F.binary_cross_entropy_with_logits(self.discriminator(fake.detach()), zeros)) / 2
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()

    def configure_optimizers(self):
        return (torch.optim.Adam(self.generator.parameters(), lr=1e-3),
                torch.optim.Adam(self.discriminator.parameters(), lr=1e-3))


def test_a_gan_refuses_the_twin_in_one_line_and_runs_without_it(tmp_path):
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 6, generator=g)), batch_size=8)
    run = dict(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, default_root_dir=str(tmp_path))
    with pytest.raises(MisconfigurationException, match="track_tangent=False") as refused:
        pl.Trainer(callbacks=[LazyTrainingMonitor(loss="mse", model="generator")], **run).fit(GAN(), loader)
    assert "\n" not in str(refused.value)
    monitor = LazyTrainingMonitor(loss="mse", model="generator", track_tangent=False)
    pl.Trainer(callbacks=[monitor], **run).fit(GAN(), loader)
    last = monitor.history[-1]
    assert "divergence" not in last and last["displacement"] > 0 and "ntk_distance" in last and "kappa" in last


# -------------------------------------------------------------------------------------- Hugging Face Trainer


def _hf_fit(tmp_path, lr, watched=True, accumulate=1, seed=0, model_fn=None):
    pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    from lightning_lazy.huggingface import LazyTrainingCallback

    torch.manual_seed(seed)
    if model_fn is None:
        config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=16, num_labels=3)
        model = BertForSequenceClassification(config)
    else:
        model = model_fn()
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1, 40, (8,), generator=g), "attention_mask": torch.ones(8, dtype=torch.long),
             "labels": int(torch.randint(0, 3, (1,), generator=g))} for _ in range(32)]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_train_epochs=1,
                             learning_rate=lr, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                             gradient_accumulation_steps=accumulate, seed=seed, data_seed=seed)
    callback = LazyTrainingCallback(probe_size=16) if watched else None
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback] if watched else None).train()
    return model, callback


def test_huggingface_trainer_keeps_the_invariants(tmp_path):
    a, callback = _hf_fit(tmp_path / "a", lr=1e-3)
    b, _ = _hf_fit(tmp_path / "b", lr=1e-3, watched=False)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert callback.core.twin.lost is None and callback.history[-1]["divergence"] > 0
    assert (tmp_path / "a" / "out" / "laziness.png").exists() and "Regime:" in callback.summary()
    _, still = _hf_fit(tmp_path / "c", lr=0.0, accumulate=2)
    assert still.core.twin.lost is None
    assert all(value == 0.0 for _, value in taken(still.history, *DISTANCES))


@pytest.mark.parametrize("clear", ["model.zero_grad", "grad = None", "grad.zero_()"])
def test_plain_loop_follows_however_the_gradients_are_cleared(clear):
    x, y = _data(dtype=torch.float64)
    model = LinearInParams().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5)
    watch = LazinessWatch(model, opt, loss="mse", probe=(x, y))
    for i in range(6):
        if clear == "model.zero_grad":
            model.zero_grad()
        for p in model.parameters():
            if p.grad is not None and clear == "grad = None":
                p.grad = None
            elif p.grad is not None and clear == "grad.zero_()":
                p.grad.zero_()
        _half_mse(model(x[i * 6:i * 6 + 8]), y[i * 6:i * 6 + 8]).backward()
        watch.batch(x[i * 6:i * 6 + 8], y[i * 6:i * 6 + 8])
        opt.step()
    assert watch.twin.lost is None and watch.measure()["divergence"] < 1e-10


def test_processes_agree_on_a_lost_twin():
    # Under DDP a twin lost on one process is lost on all at the next measurement or epoch end: every process then
    # logs the same keys. Here the host's all-reduce says another process lost it.
    from lightning_lazy.watch.core import Host

    class TwoProcesses(Host):
        world_size = 2

        def reduce_sum(self, tensor):
            return tensor + 1.0  # the other process lost its twin

    x, y = _data()
    model = _net()
    watch = LazinessWatch(model, torch.optim.SGD(model.parameters(), lr=0.1), loss="mse", probe=(x, y),
                          host=TwoProcesses())
    watch.start()
    watch.start_measuring()
    with pytest.warns(UserWarning, match="another process"):
        watch.agree()
    assert watch.twin.lost is not None and "divergence" not in watch.values()


def test_plain_loop_that_skips_batch_stops_the_twin_with_one_warning():
    # A batch the twin never saw makes its path another than the network's: never a wrong Δ.
    x, y = _data(dtype=torch.float64)
    model = LinearInParams().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    watch = LazinessWatch(model, opt, loss="mse", probe=(x, y))
    with pytest.warns(UserWarning, match=r"batch\(\) was called 0 time"):
        for i in range(6):
            opt.zero_grad()
            _half_mse(model(x[i * 6:i * 6 + 8]), y[i * 6:i * 6 + 8]).backward()
            if i != 3:
                watch.batch(x[i * 6:i * 6 + 8], y[i * 6:i * 6 + 8])
            opt.step()
    assert all("divergence" not in h for h in watch.history if h["step"] >= 4)
    assert all(h["divergence"] < 1e-10 for h in watch.history if h["step"] < 4)


def test_plain_loop_passing_a_loss_divided_for_accumulation_is_followed():
    _, watch = _plain_loop(LinearInParams(), lr=0.2, watch_kwargs={}, dtype=torch.float64, accumulate=2)
    assert watch.twin.lost is None
    x, y = _data(dtype=torch.float64)
    model = LinearInParams().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    watch = LazinessWatch(model, opt, loss="mse", probe=(x, y))
    for i in range(8):
        if i % 2 == 0:
            opt.zero_grad()
        loss = _half_mse(model(x[i * 4:i * 4 + 4]), y[i * 4:i * 4 + 4]) / 2
        loss.backward()
        watch.batch(x[i * 4:i * 4 + 4], y[i * 4:i * 4 + 4], loss=loss)
        if i % 2 == 1:
            opt.step()
    assert watch.twin.lost is None and watch.measure()["divergence"] < 1e-10


def test_without_an_optimizer_no_time_and_no_guarantee_are_claimed():
    x, y = _data()
    watch = LazinessWatch(_net(), None, loss="mse", probe=(x, y), track_tangent=False)
    watch.start_measuring()
    watch.measure()
    assert "normalized_time" not in watch.history[-1]
    assert watch.summary_values()["horizon"] is None and "guarantees" not in watch.summary()


def test_a_plain_loop_is_told_the_plain_way_out():
    # Clipping the twin was not given is reported, with the plain loop's remedy (not Lightning's).
    x, y = _data()
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = LazinessWatch(model, opt, loss="mse", probe=(x, y))
    with pytest.warns(UserWarning, match=r"LazinessWatch\(clip=") as said:
        for i in range(3):
            opt.zero_grad()
            _half_mse(model(x[i * 8:(i + 1) * 8]), y[i * 8:(i + 1) * 8]).backward()
            watch.batch(x[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8])
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
            opt.step()
    assert not any("Trainer(" in str(w.message) for w in said)


def test_a_plain_loop_times_its_steps_for_the_cost_advice():
    # The advice compares a measurement with the loop's steps: a plain loop's steps are timed too (here any
    # measurement counts as costly, so the advice must come once the first step is timed).
    from lightning_lazy.watch.cost import MeasurementCost

    x, y = _data()
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = LazinessWatch(model, opt, loss="mse", probe=(x, y))
    watch._cost = MeasurementCost(seconds=0.0, steps=0.0)
    with pytest.warns(UserWarning, match="a measurement took"):
        for i in range(3):
            opt.zero_grad()
            _half_mse(model(x[i * 8:(i + 1) * 8]), y[i * 8:(i + 1) * 8]).backward()
            watch.batch(x[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8])
            opt.step()
    assert len(watch._cost.step_seconds) == 3
