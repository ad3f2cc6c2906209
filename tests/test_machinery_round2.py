"""Never a wrong number, round 2 (issue 25): the kinds that live in the maths and the core.

Each kind over more than one model, through the public API (LazyTrainingMonitor in a tiny Trainer,
LinearizedModel, diagnostics), with the rules of tests/test_machinery_twin.py: the monitor never changes the run;
at lr 0 nothing measured moves; a model linear in its trained parameters keeps Δ at round-off; what the twin
cannot replay is said once and the twin-based measures stop.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from test_machinery_twin import (D, K, Module, assert_followed, assert_reported, assert_same_run, assert_zero_at_lr0,
                                 data, fit)

from lightning_lazy import LazyTrainingMonitor, LinearizedModel, diagnostics
from lightning_lazy._optim import step_size
from lightning_lazy._params import tensor_fingerprints
from lightning_lazy.watch.twin import TangentTwin, Watched

OBJECTIVE_WARNING = "another objective than yours"


# ----------------------------------------------------------------------------- 1. buffers a forward writes


class Counter(nn.Module):
    """Writes a buffer in place in every training forward and uses the value it wrote (a call counter)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        if self.training:
            self.calls += 1
        return x * (1 + 0.1 * torch.tanh(self.calls))


class RunningScale(nn.Module):
    """Divides by a running average of its input's size, updated in place (before use) in training forwards."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(width, dtype=torch.float64))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.scale.mul_(0.5).add_(0.5 * x.detach().abs().mean(0))
        return x / self.scale


def new_spectral(trained: bool = True) -> nn.Module:
    layer = torch.nn.utils.parametrizations.spectral_norm(nn.Linear(D, 12))
    return nn.Sequential(layer.requires_grad_(trained), nn.Tanh(), nn.Linear(12, K))


def old_spectral(trained: bool = True) -> nn.Module:
    layer = torch.nn.utils.spectral_norm(nn.Linear(D, 12))
    return nn.Sequential(layer.requires_grad_(trained), nn.Tanh(), nn.Linear(12, K))


def counter(trained: bool = True) -> nn.Module:
    return nn.Sequential(nn.Linear(D, 12).requires_grad_(trained), Counter(), nn.Tanh(), nn.Linear(12, K))


def running_scale(trained: bool = True) -> nn.Module:
    return nn.Sequential(nn.Linear(D, 12).requires_grad_(trained), RunningScale(12), nn.Tanh(), nn.Linear(12, K))


WRITERS = {"parametrizations.spectral_norm": new_spectral, "spectral_norm (old)": old_spectral, "counter": counter,
           "running_scale": running_scale}


@pytest.mark.parametrize("kind", list(WRITERS))
def test_buffers_a_forward_writes_move_nothing_at_lr0(kind, tmp_path):
    monitor, said = fit(Module(WRITERS[kind], lr=0.0), True, tmp_path)
    assert_zero_at_lr0(monitor)
    assert monitor.layer_history
    for entry in monitor.layer_history:
        for layer in entry["layers"].values():
            assert layer.get("feature_movement", 0.0) == 0.0 and layer.get("ntk_distance", 0.0) == 0.0, entry
    assert not [s for s in said if OBJECTIVE_WARNING in s], said


@pytest.mark.parametrize("kind", list(WRITERS))
def test_buffers_a_forward_writes_are_followed_by_the_twin(kind, tmp_path):
    # The layer that writes (or whose input a writer scales) is frozen and a linear head is trained: the model is
    # linear in its trained parameters, so the twin's path is the real one while the buffer advances every step.
    monitor, said = assert_same_run(lambda: Module(lambda: WRITERS[kind](trained=False)), tmp_path)
    assert_followed(monitor, said, linear=True)
    assert not [s for s in said if OBJECTIVE_WARNING in s], said


# ------------------------------------------------------------------ 2. every unit of every piecewise activation


class Functional(nn.Module):
    """Piecewise-linear activations in functional forms, one a clamp-written ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(D, 8), nn.Linear(8, K)

    def forward(self, x):
        h = self.a(x)
        h = F.hardsigmoid(h) + F.relu6(h) + F.hardtanh(h) + F.leaky_relu(h, 0.1) + h.clamp(min=0)
        return self.b(h)


class Modules(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D, 8), nn.Hardsigmoid(), nn.Linear(8, 8), nn.PReLU(), nn.Linear(8, 8),
                                  nn.RReLU(), nn.Linear(8, 8), nn.Hardswish(), nn.Linear(8, K))

    def forward(self, x):
        return self.body(x)


def _mobilenet() -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=K)


ACTIVATIONS = (nn.Hardsigmoid, nn.PReLU, nn.RReLU, nn.Hardswish, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU)


@pytest.mark.parametrize("make,units_per_example", [(Functional, 5 * 8), (Modules, 4 * 8), (_mobilenet, None)])
def test_every_unit_of_every_piecewise_activation_is_counted(make, units_per_example):
    torch.manual_seed(0)
    net = make().eval()
    x = torch.randn(3, 3, 32, 32) if make is _mobilenet else torch.randn(3, D)
    if units_per_example is None:  # every input of an activation module (timm's are torch's or hard_* functions)
        seen = []
        handles = [m.register_forward_hook(lambda m, i, o: seen.append(i[0].numel())) for m in net.modules()
                   if isinstance(m, ACTIVATIONS)]
        with torch.no_grad():
            net(x)
        for handle in handles:
            handle.remove()
        expected = sum(seen)
        assert any(isinstance(m, nn.Hardsigmoid) for m in net.modules())
    else:
        expected = units_per_example * len(x)
    params = dict(net.named_parameters())
    states = diagnostics.activation_states(net, x, params)  # the measures' forward: composites stand in
    assert sum(s.numel() for s in states) == expected
    if any(isinstance(m, nn.Hardsigmoid) for m in net.modules()) or make is Functional:
        assert "hardsigmoid" in states.names


# --------------------------------------------------------------------- 3. LinearizedModel protects its w0


class Clamped(nn.Linear):
    """Clamps its own weight in place in every training forward (a hand-written max-norm)."""

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.weight.clamp_(-0.2, 0.2)
        return super().forward(x)


@pytest.mark.parametrize("make,inputs", [
    (lambda: nn.Embedding(10, 4, max_norm=1.0), lambda: torch.randint(0, 10, (3, 5))),
    (lambda: nn.Sequential(nn.Embedding(10, 4, max_norm=0.5), nn.Flatten(), nn.Linear(20, 2)),
     lambda: torch.randint(0, 10, (3, 5))),
    (lambda: nn.Sequential(Clamped(3, 4), nn.Tanh(), nn.Linear(4, 2)), lambda: torch.randn(5, 3)),
], ids=["embedding", "embedding+head", "clamped"])
def test_linearized_model_keeps_its_w0_from_its_module_s_forward(make, inputs):
    torch.manual_seed(0)
    lin = LinearizedModel(make().double())
    w0 = {name: value.clone() for name, value in lin.initial_params.items()}
    x = inputs()
    x = x.double() if x.is_floating_point() else x
    with torch.no_grad():
        lin.eval()(x)  # (a validation sanity check first: a layer may write in training mode only)
    first = lin.train()(x)
    second = lin(x)
    first.sum().backward()
    for name, value in lin.initial_params.items():
        assert torch.equal(value, w0[name]), f"w0 of {name} was rewritten by the forward"
    torch.testing.assert_close(second, first)


# ---------------------------------------------------------------------- 4. optimizers whose lr is no float


def test_step_size_is_the_lr_when_it_is_one_float():
    w = [nn.Parameter(torch.ones(2))]
    assert step_size(torch.optim.SGD(w, lr=0.1)) == 0.1
    assert step_size(torch.optim.Adam(w, lr=torch.tensor(0.01))) == pytest.approx(0.01)
    two = torch.optim.SGD([{"params": w}, {"params": [nn.Parameter(torch.ones(2))], "lr": 0.5}], lr=0.1)
    assert step_size(two) is None  # two step sizes: no one time
    two.param_groups[1]["lr"] = 0.1
    assert step_size(two) == 0.1
    assert step_size(torch.optim.Adafactor(w, lr=0.01)) is None  # min(lr, 1/√t)·RMS(w): its own step size
    broken = torch.optim.SGD(w, lr=0.1)
    broken.param_groups[0]["lr"] = None
    assert step_size(broken) is None


def _adafactor(params, lr):
    transformers = pytest.importorskip("transformers")
    return transformers.optimization.Adafactor(params, lr=None, relative_step=True, scale_parameter=True,
                                               warmup_init=False)


def test_step_size_of_relative_step_adafactor_is_none():
    assert step_size(_adafactor([nn.Parameter(torch.ones(2))], None)) is None


@pytest.mark.parametrize("net", ["linear", "regression"])
def test_the_twin_follows_adafactor_relative_steps(net):
    # The Lightning-free twin, driven as an adapter drives it: its copy of Adafactor takes its own relative steps
    # (from its own weights' RMS and its own step count), which for a model linear in its parameters are the real ones.
    from test_machinery_twin import NETS

    torch.manual_seed(0)
    network = NETS[net]().double()
    real = Watched(network)
    optimizer = _adafactor([p for p in network.parameters() if p.requires_grad], None)
    loss = lambda out, y: 0.5 * (out - y).pow(2).sum(1).mean()  # noqa: E731
    twin = TangentTwin(real, optimizer, loss)
    twin.follow()
    x, y = data()
    for step in range(6):
        batch = slice(8 * (step % 4), 8 * (step % 4) + 8)
        twin.arm()
        out = real(x[batch])
        twin.accumulate(x[batch], y[batch])
        loss(out, y[batch]).backward()
        twin.gradients_produced()
        optimizer.step()
        optimizer.zero_grad()
        twin.zero_grad()
    twin.release()
    assert twin.lost is None and twin.steps == 6
    moved = 0.0
    for name, value in twin.parameters().items():
        real_value = dict(real.named_parameters())[name]
        torch.testing.assert_close(value, real_value.detach(), rtol=1e-10, atol=1e-12)
        moved += float((real_value.detach() - twin.model.initial_params[name]).norm())
    assert moved > 1e-3  # the steps moved the weights: the comparison is not at w0


def test_adafactor_with_relative_steps_runs_under_the_monitor(tmp_path):
    monitor, said = fit(Module("linear", optimizer=_adafactor), True, tmp_path)
    assert_followed(monitor, said, linear=True)


# ------------------------------------------------------------------------------ 5. LoRA starts at zero


class LoRA(nn.Module):
    """W x + B A x with W and A frozen, B initialised at exactly zero and trained alone."""

    def __init__(self, d_in: int, d_out: int, rank: int = 2) -> None:
        super().__init__()
        self.base = nn.Linear(d_in, d_out).requires_grad_(False)
        self.A = nn.Parameter(torch.randn(rank, d_in) / d_in**0.5, requires_grad=False)
        self.B = nn.Parameter(torch.zeros(d_out, rank))

    def forward(self, x):
        return self.base(x) + x @ self.A.T @ self.B.T


def lora_mlp() -> nn.Module:
    return nn.Sequential(LoRA(D, 12), nn.ReLU(), LoRA(12, K))


def lora_head() -> nn.Module:
    return nn.Sequential(nn.Linear(D, 12).requires_grad_(False), nn.Tanh(), LoRA(12, K))


@pytest.mark.parametrize("net", [lora_mlp, lora_head], ids=["mlp", "head"])
def test_lora_from_zero_is_measured_relative_to_the_weights_it_adapts(net, tmp_path):
    monitor, said = assert_same_run(lambda: Module(net), tmp_path)
    assert_followed(monitor, said, linear=net is lora_head)
    assert monitor.measures.displacement_relative_to == "reference"
    layers = monitor.layer_history[-1]["layers"]
    assert all(entry["displacement"] > 0 for entry in layers.values()), layers
    frozen, _ = fit(Module(net, lr=0.0), True, tmp_path / "lr0")
    assert_zero_at_lr0(frozen)


def test_displacement_says_what_it_is_relative_to():
    zero, moved = {"B": torch.zeros(3, 2)}, {"B": torch.full((3, 2), 0.5)}
    frozen = {"W": torch.full((3, 3), 2.0)}
    result = diagnostics.displacement(moved, zero, reference=frozen)
    assert result.relative_to == "reference" and result.total.item() == pytest.approx(6**0.5 * 0.5 / 6)
    result = diagnostics.displacement(moved, zero)
    assert result.relative_to == "absolute" and result.total.item() == pytest.approx(6**0.5 * 0.5)
    assert diagnostics.displacement(moved, moved).relative_to == "w0"
    layers = diagnostics.layer_displacement({"fc.lora_B.weight": moved["B"]}, {"fc.lora_B.weight": zero["B"]},
                                            reference={"fc.base.weight": frozen["W"], "other.weight": torch.ones(9)})
    assert layers["fc.lora_B"].item() == pytest.approx(6**0.5 * 0.5 / 6)


class HFClassifier(Module):
    """A Hugging Face (or PEFT) model called on token ids, cross-entropy on its logits."""

    def __init__(self, make, lr: float = 1e-3) -> None:
        super().__init__(make, lr=lr, optimizer=lambda params, lr: torch.optim.AdamW(params, lr=lr))

    def forward(self, x):
        out = self.net(x)
        return out.logits if hasattr(out, "logits") else out

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)


def _tiny_bert(**options):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=K, **options)
    return transformers.BertForSequenceClassification(config)


def _token_fit(module, tmp_path, **options):
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset
    import warnings

    generator = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 40, (24, 6), generator=generator), torch.randint(0, K, (24,), generator=generator)
    monitor = LazyTrainingMonitor("cross_entropy", probe=(x[:8], y[:8]), kappa_probe_size=2, ntk_probe_size=2,
                                  figure=False, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pl.Trainer(max_epochs=1, callbacks=[monitor], accelerator="cpu", devices=1, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=str(tmp_path)).fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    return monitor, [str(w.message) for w in caught if "LazyTrainingMonitor" in str(w.message)]


class TokenMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc1, self.fc2 = nn.Embedding(40, 8), nn.Linear(8, 16), nn.Linear(16, K)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.embed(x).mean(1))))


@pytest.mark.parametrize("base", ["mlp", "bert"])
def test_peft_lora_runs_at_defaults(base, tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    if base == "mlp":
        net = peft.get_peft_model(TokenMLP(), peft.LoraConfig(target_modules=["fc1", "fc2"], r=4))
    else:
        net = peft.get_peft_model(_tiny_bert(), peft.LoraConfig(task_type="SEQ_CLS", r=4))
    monitor, said = _token_fit(HFClassifier(lambda: net), tmp_path)
    assert not [s for s in said if "no longer logged" in s or OBJECTIVE_WARNING in s], said
    last = monitor.history[-1]
    assert last["displacement"] > 0 and "divergence" in last and last["divergence"] < 0.5
    layers = monitor.layer_history[-1]["layers"]
    lora_b = [name for name in layers if "lora_B" in name]
    assert lora_b and all(layers[name]["displacement"] > 0 for name in lora_b), layers


# ------------------------------------------------------------- 6. Hugging Face gradient checkpointing


class HookedMLP(nn.Module):
    """Activation checkpointing with a forward hook that makes the first layer's output require grad (what
    Hugging Face's enable_input_require_grads does for reentrant checkpointing over frozen embeddings)."""

    def __init__(self, checkpointed: bool) -> None:
        super().__init__()
        self.embed, self.fc1, self.fc2 = nn.Embedding(40, 8), nn.Linear(8, 16), nn.Linear(16, K)
        self.checkpointed = checkpointed
        if checkpointed:
            self.embed.register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))

    def forward(self, x):
        h = self.embed(x).mean(1)
        if self.checkpointed:
            h = torch.utils.checkpoint.checkpoint(lambda t: torch.relu(self.fc1(t)), h, use_reentrant=True)
        else:
            h = torch.relu(self.fc1(h))
        return self.fc2(h)


@pytest.mark.parametrize("base", ["mlp", "bert"])
def test_hugging_face_gradient_checkpointing_gives_the_plain_numbers(base, tmp_path):
    def make(checkpointed: bool) -> nn.Module:
        if base == "mlp":
            torch.manual_seed(0)
            return HookedMLP(checkpointed)
        net = _tiny_bert()
        if checkpointed:
            net.gradient_checkpointing_enable()
            net.enable_input_require_grads()
        return net

    # Two runs compared number for number (κ's warm start follows the measurements taken before): without a
    # wall-time budget, which could thin the slower checkpointed run differently.
    plain, _ = _token_fit(HFClassifier(lambda: make(False)), tmp_path / "plain", budget=None)
    checkpointed, said = _token_fit(HFClassifier(lambda: make(True)), tmp_path / "checkpointed", budget=None)
    assert not [s for s in said if "no longer logged" in s or OBJECTIVE_WARNING in s], said
    for key in ("divergence", "tangent_gap", "displacement", "ntk_distance", "kappa"):
        assert checkpointed.history[-1][key] == pytest.approx(plain.history[-1][key], rel=1e-4, abs=1e-8), key


# ----------------------------------------------------------------- 7. what the twin cannot replay, found


class BackwardHooked(Module):
    """A module backward hook on the last layer that halves the gradient flowing into it (or only reads it)."""

    def __init__(self, net: str, kind: str) -> None:
        super().__init__(net)
        layer = self.net[-1]
        if kind == "full":
            layer.register_full_backward_hook(lambda m, grad_in, grad_out: tuple(
                None if g is None else 0.5 * g for g in grad_in))
        else:
            layer.register_full_backward_pre_hook(lambda m, grad_out: tuple(0.5 * g for g in grad_out))


@pytest.mark.parametrize("kind", ["full", "pre"])
@pytest.mark.parametrize("net", ["linear", "mlp"])
def test_module_backward_hooks_are_reported(net, kind, tmp_path):
    monitor, said = assert_same_run(lambda: BackwardHooked(net, kind), tmp_path)
    assert_reported(monitor, said, "backward hook")
    assert f"'net.{len(monitor.core._watched.inner.net) - 1}' (Linear)" in monitor.twin.lost
    assert monitor.twin.lost_at == 1  # found at the first step: nothing twin-based was ever logged


class Permutes(Module):
    """Permutes the rows of a weight through ``.data`` after the first batch: every norm is kept."""

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if batch_idx == 0:
            weight = self.net[-1].weight
            weight.data = weight.data.flip(0).contiguous()


@pytest.mark.parametrize("net", ["linear", "mlp"])
def test_a_data_write_that_keeps_every_norm_is_reported(net, tmp_path):
    monitor, said = assert_same_run(lambda: Permutes(net), tmp_path)
    assert_reported(monitor, said, "was written")
    assert f"'net.{len(monitor.core._watched.inner.net) - 1}.weight' (Linear)" in monitor.twin.lost


def test_fingerprints_see_permutations_and_sign_flips_and_repeat_exactly():
    torch.manual_seed(0)
    for tensor in (torch.randn(5, 3), torch.randn(7), torch.randn(2, 3, 4).double(), torch.randn(4, 4).half()):
        base = tensor_fingerprints([tensor])[0]
        assert tensor_fingerprints([tensor.clone()])[0] == base
        for changed in (tensor.flip(0), -tensor, tensor.flip(-1)):
            assert tensor_fingerprints([changed])[0] != base
    assert tensor_fingerprints([None, torch.ones(2, 2)])[0] is None


def test_a_probe_without_time_claims_no_normalized_time():
    # What the core passes when step_size(optimizer) is None: the measures without t̃, the bound, or the velocity.
    from lightning_lazy.watch.probe import LazinessProbe

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, K)).double()
    x, y = data()
    probe = LazinessProbe(Watched(net), x[:8], y[:8], kappa_probe_size=4, ntk_probe_size=4)
    names = [name for name, _ in probe.network.named_parameters()]
    probe.measure_initial(names)
    with torch.no_grad():
        net[0].weight.add_(0.01)
    values = probe.measure(names, time=None)
    assert not {"normalized_time", "bound", "kernel_velocity"} & set(values)
    assert values["displacement"] > 0 and values["ntk_distance"] > 0
    values = probe.measure(names, time=0.5)
    assert values["normalized_time"] > 0 and "bound" in values
