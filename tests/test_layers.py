"""Per-layer laziness: per-module NTK blocks, spectrum, kernel velocity, per-module movement, and the monitor's
per-layer tags, heat map and kernel baseline."""

from __future__ import annotations

import copy
import glob
import math

import pytest
import pytorch_lightning as pl
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader, TensorDataset

from lightning_lazy import diagnostics as D
from lightning_lazy.callback import LazyTrainingMonitor
from lightning_lazy.watch.probe import layer_groups

from lightning_helpers import Regressor, loaders, regression_data, trainer


class _Net(nn.Module):
    """Conv, BatchNorm (eval), a frozen Linear, a trained Linear owning weight and bias, a root-owned scale."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.norm = nn.BatchNorm2d(3)
        self.body = nn.Sequential(nn.Linear(3 * 4 * 4, 5), nn.Tanh(), nn.Linear(5, 3))
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.body[0].requires_grad_(False)  # frozen: no block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.norm(self.conv(x)))
        return self.scale * self.body(h.flatten(1))


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = _Net().double()
    with torch.no_grad():
        net.norm.running_mean.uniform_(-0.2, 0.2)
        net.norm.running_var.uniform_(0.5, 1.5)
    return net.eval()


def _jacobian_blocks(net: nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> dict[str, torch.Tensor]:
    """Θ_l = J_l(x1) J_l(x2)ᵀ from per-module Jacobians by jacrev (the explicit reference)."""
    params = {k: v.detach() for k, v in net.named_parameters() if v.requires_grad}
    blocks: dict[str, torch.Tensor] = {}
    for module in dict.fromkeys(D.owning_module(k) for k in params):
        mine = {k: v for k, v in params.items() if D.owning_module(k) == module}
        others = {k: v for k, v in params.items() if k not in mine}

        def jac(x: torch.Tensor, mine: dict = mine, others: dict = others) -> torch.Tensor:
            j = jacrev(lambda p: functional_call(net, {**others, **p}, (x,)).reshape(-1))(mine)
            return torch.cat([t.reshape(t.shape[0], -1) for t in j.values()], dim=1)

        blocks[module] = jac(x1) @ jac(x2).T
    return blocks


@pytest.mark.parametrize("implementation", ["structured", "jacobian", "products", "auto"])
@pytest.mark.parametrize("trace", [False, True])
def test_per_layer_blocks_are_the_per_module_jacobian_grams(implementation, trace):
    net = _net()
    torch.manual_seed(1)
    x1, x2 = torch.randn(4, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    for a, b in ((x1, None), (x1, x2)):
        blocks = D.empirical_ntk(net, a, b, implementation=implementation, trace=trace, per_layer=True)
        expected = _jacobian_blocks(net, a, a if b is None else b)
        assert list(blocks) == ["", "conv", "norm", "body.2"]  # named_parameters order; the frozen body.0 has none
        whole = D.empirical_ntk(net, a, b, implementation=implementation, trace=trace)
        for name, block in blocks.items():
            reference = expected[name]
            if trace:
                n1, n2 = reference.shape[0] // 3, reference.shape[1] // 3
                reference = reference.reshape(n1, 3, n2, 3).diagonal(dim1=1, dim2=3).sum(-1)
            assert block.shape == whole.shape
            torch.testing.assert_close(block, reference, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(sum(blocks.values()), whole, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 5, 12])
@pytest.mark.parametrize("trace", [False, True])
def test_symmetric_products_by_pairs_of_column_chunks_are_the_jacobian_grams(chunk_size, trace):
    """x2 = x1: the products route takes Gram matrices of the vjp rows over pairs of column chunks (here 12 columns
    in chunks of 1, 5 (uneven) and 12); its blocks are the explicit ones, and so is their sum."""
    net = _net()
    torch.manual_seed(3)
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    expected = _jacobian_blocks(net, x, x)
    for per_layer in (True, False):
        got = D.empirical_ntk(net, x, implementation="products", chunk_size=chunk_size, trace=trace, per_layer=per_layer)
        blocks = got if per_layer else {"": got}
        references = expected if per_layer else {"": sum(expected.values())}
        assert list(blocks) == list(references)
        for name, block in blocks.items():
            reference = references[name]
            if trace:
                reference = reference.reshape(4, 3, 4, 3).diagonal(dim1=1, dim2=3).sum(-1)
            torch.testing.assert_close(block, reference, rtol=1e-9, atol=1e-12)


def test_per_layer_on_a_functional_model_groups_by_name_and_splits_a_bias_of_another_group():
    torch.manual_seed(2)
    params = {"a.w": torch.randn(4, 3, dtype=torch.float64), "b.bias": torch.randn(4, dtype=torch.float64),
              "c.w": torch.randn(2, 4, dtype=torch.float64)}

    def fn(p, x):
        return torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(x, p["a.w"], p["b.bias"])), p["c.w"])

    x = torch.randn(5, 3, dtype=torch.float64)
    blocks = D.empirical_ntk(fn, x, params=params, per_layer=True)
    reference = D.empirical_ntk(fn, x, params=params, implementation="products", per_layer=True)
    assert list(blocks) == ["a", "b", "c"]
    for name in blocks:
        torch.testing.assert_close(blocks[name], reference[name])


def test_spectrum_against_an_explicit_eigendecomposition():
    torch.manual_seed(3)
    a = torch.randn(6, 4, dtype=torch.float64)
    kernel = a @ a.T
    y = torch.randn(6, 2, dtype=torch.float64)
    values, vectors = torch.linalg.eigh(kernel)
    result = D.ntk_spectrum(kernel, y)
    torch.testing.assert_close(result.top_eigenvalue, values[-1])
    torch.testing.assert_close(result.effective_rank, values.clamp_min(0).sum() ** 2 / (values.clamp_min(0) ** 2).sum())
    top = vectors[:, -2:]  # top_k defaults to the 2 target columns
    torch.testing.assert_close(result.target_energy, (top @ top.T @ y).norm() ** 2 / y.norm() ** 2)
    assert float(D.ntk_spectrum(kernel, y, top_k=6).target_energy) == pytest.approx(1.0)
    # Rank one: effective rank 1 and all the energy of a target in its range in the top direction.
    v = torch.randn(6, 1, dtype=torch.float64)
    one = D.ntk_spectrum(v @ v.T, 3 * v, top_k=1)
    assert float(one.effective_rank) == pytest.approx(1.0) and float(one.target_energy) == pytest.approx(1.0)
    assert float(D.ntk_spectrum(torch.eye(5, dtype=torch.float64)).effective_rank) == pytest.approx(5.0)
    # Class labels on a traced kernel are one-hot; a full [N·K, N·K] kernel takes the targets flattened.
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    torch.testing.assert_close(D.ntk_spectrum(kernel, labels).target_energy,
                               D.ntk_spectrum(kernel, torch.nn.functional.one_hot(labels).double()).target_energy)
    full = torch.kron(kernel, torch.eye(2, dtype=torch.float64))
    f = D.ntk_spectrum(full, y, top_k=4)
    torch.testing.assert_close(f.target_energy, result.target_energy)  # Θ ⊗ I: the same directions per output
    with pytest.raises(ValueError, match="fit neither"):
        D.ntk_spectrum(kernel, torch.randn(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="top_k"):
        D.ntk_spectrum(kernel, y, top_k=0)


def test_kernel_velocity():
    k0 = torch.eye(3, dtype=torch.float64)
    k1 = k0 + 0.3 * torch.ones(3, 3, dtype=torch.float64)
    torch.testing.assert_close(D.kernel_velocity(k1, k0, 0.5), (k1 - k0).norm() / k0.norm() / 0.5)
    assert float(D.kernel_velocity(k0, k0, 2.0)) == 0.0
    with pytest.raises(ValueError, match="positive"):
        D.kernel_velocity(k1, k0, 0.0)


def test_layer_displacement_and_feature_movement_against_the_weights_and_the_outputs():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)).double()
    x = torch.randn(7, 3, dtype=torch.float64)
    names = D.parameter_owning_modules(net)
    assert names == ["0", "2"]
    w0 = {k: v.detach().clone() for k, v in net.named_parameters()}
    with torch.no_grad(), D.recording_module_outputs(net, names, rows=5) as before:
        net(x)
    assert before["0"][0].shape == (5, 4)
    expected_first = torch.nn.functional.linear(x[:5], net[0].weight, net[0].bias)
    torch.testing.assert_close(before["0"][0], expected_first)  # kept before the in-place ReLU
    with torch.no_grad():
        net[2].weight.add_(0.1)
    w = {k: v.detach() for k, v in net.named_parameters()}
    moved = D.layer_displacement(w, w0)
    assert float(moved["0"]) == 0.0
    expected = (0.1 * torch.ones(2, 4)).norm() / torch.cat([w0["2.weight"].flatten(), w0["2.bias"]]).norm()
    assert float(moved["2"]) == pytest.approx(float(expected))
    with torch.no_grad(), D.recording_module_outputs(net, names, rows=5) as after:
        net(x)
    features = D.feature_movement(after, before)
    assert float(features["0"]) == 0.0
    out0, out1 = before["2"][0], after["2"][0]
    assert float(features["2"]) == pytest.approx(float((out1 - out0).norm() / out0.norm()))
    grouped = D.feature_movement(after, before, groups={"0": "all", "2": "all"})
    both = torch.sqrt(((out1 - out0) ** 2).sum() / ((out0**2).sum() + (before["0"][0] ** 2).sum()))
    assert float(grouped["all"]) == pytest.approx(float(both))
    with pytest.raises(ValueError, match="no module named"), D.recording_module_outputs(net, ["nope"]):
        pass


# ------------------------------------------------------------------------------------------- the monitor



def _events(tmp_path) -> EventAccumulator:
    (path,) = glob.glob(str(tmp_path / "runs" / "version_0" / "events.out.tfevents.*"))
    accumulator = EventAccumulator(path, size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def _fit(tmp_path, lr: float, **options):
    torch.set_default_dtype(torch.float64)
    try:
        model = Regressor(alpha=None, width=8, lr=lr, scheduler=False)
        w0 = {k: v.detach().clone() for k, v in model.named_parameters()}
        train, val = loaders(n=64, dtype=torch.float64)
        x, y = regression_data(64, dtype=torch.float64)
        monitor = LazyTrainingMonitor(loss="mse", probe=(x[:24], y[:24]), ntk_probe_size=6, measure_kappa=False,
                                      layer_probe_size=10, **options)
        trainer(tmp_path, [monitor], max_epochs=2).fit(model, train, val)
    finally:
        torch.set_default_dtype(torch.float32)
    return model, w0, monitor, x[:24]


def _initial(model, w0) -> nn.Module:
    """The model's network at w0."""
    net = copy.deepcopy(model.model).requires_grad_(False)
    for name, p in net.named_parameters():
        p.copy_(w0[f"model.{name}"])
    return net


def test_per_layer_tags_are_the_trained_weights_and_the_module_outputs_on_the_probe(tmp_path):
    model, w0, monitor, probe = _fit(tmp_path, lr=0.05)
    net = model.model
    layers = monitor.layer_history[-1]["layers"]
    assert list(layers) == ["0", "2", "4"]  # as the Sequential names them, without the module's attribute `model`
    for short, measures in layers.items():
        name = f"model.{short}"
        module = dict(model.named_modules())[name]
        moved = torch.cat([(p.detach() - w0[f"{name}.{k}"]).flatten() for k, p in module.named_parameters()])
        scale = torch.cat([w0[f"{name}.{k}"].flatten() for k, _ in module.named_parameters()])
        assert measures["displacement"] == pytest.approx(float(moved.norm() / scale.norm()), rel=1e-9)
        prefix = net[: int(name.split(".")[1]) + 1]
        now = prefix(probe[:10]).detach()
        then = _initial(model, w0)[: int(name.split(".")[1]) + 1](probe[:10]).detach()
        assert measures["feature_movement"] == pytest.approx(float((now - then).norm() / then.norm()), rel=1e-9)
        assert 0 < measures["feature_movement"] and 0 < measures["ntk_distance"]
    # NTK shares and distances from per-module blocks computed independently (Jacobian products).
    params = {k: v.detach() for k, v in net.named_parameters()}
    now = D.empirical_ntk(net, probe[:6], params=params, implementation="products", per_layer=True)
    then = D.empirical_ntk(net, probe[:6], params={k.removeprefix("model."): v for k, v in w0.items()},
                           implementation="products", per_layer=True)
    total = sum(b.trace() for b in now.values())
    for name in now:
        assert layers[name]["ntk_share"] == pytest.approx(float(now[name].trace() / total), rel=1e-9)
        assert layers[name]["ntk_distance"] == pytest.approx(
            float((now[name] - then[name]).norm() / then[name].norm()), rel=1e-8)
    assert sum(v["ntk_share"] for v in layers.values()) == pytest.approx(1.0)
    last = monitor.history[-1]
    for key in ("target_alignment", "ntk_top_eigenvalue", "ntk_effective_rank", "ntk_target_energy"):
        assert math.isfinite(last[key]), key
    # Logged where t̃ advanced since the previous measurement (not at an epoch end that follows a log step).
    velocities = [entry["kernel_velocity"] for entry in monitor.history if "kernel_velocity" in entry]
    assert velocities and all(math.isfinite(v) and v > 0 for v in velocities)
    events = _events(tmp_path)
    scalars = set(events.Tags()["scalars"])
    for name in layers:
        for measure in ("displacement", "feature_movement", "ntk_share", "ntk_distance"):
            tag = f"lazy/layers/{name}/{measure}"
            assert tag in scalars, tag
            assert events.Scalars(tag)[-1].value == pytest.approx(layers[name][measure], rel=1e-6)
    for tag in ("lazy/target_alignment", "lazy/ntk_effective_rank", "lazy/kernel_velocity"):
        assert tag in scalars
    images = events.Images("lazy/layers")
    # Drawn with the laziness figure (at epoch ends while drawing stays under 5 % of the fit, and at fit end).
    assert len(images) >= 1 and images[-1].width > 100 and images[-1].height > 100
    line = next(line for line in monitor.summary().splitlines() if "layers that moved most (feature movement)" in line)
    top = max(layers, key=lambda name: layers[name]["feature_movement"])
    first = line.split("(feature movement)", 1)[1].split(",")[0].strip()  # "<layer> [<type>]: <value>"
    assert first.rsplit(":", 1)[0].split()[0] == top


def test_per_layer_distances_are_exactly_zero_at_lr_zero(tmp_path):
    _, _, monitor, _ = _fit(tmp_path, lr=0.0)
    for entry in monitor.layer_history:
        for measures in entry["layers"].values():
            assert measures["displacement"] == 0.0
            assert measures["feature_movement"] == 0.0
            assert measures["ntk_distance"] == 0.0
    assert not any("kernel_velocity" in entry for entry in monitor.history)  # no time passed: no velocity
    assert "layers that moved most" not in monitor.summary()  # none moved: none is named


def test_layer_groups_keep_hundreds_of_modules_readable():
    few = [f"inner.net.{i}" for i in range(5)]
    assert layer_groups(few, 32) == {m: m for m in few}
    deep = [f"inner.layer{b}.{i}.conv" for b in range(1, 5) for i in range(60)] + ["inner.fc"]
    groups = layer_groups(deep, 32)
    assert sorted(set(groups.values())) == ["inner.fc", "inner.layer1", "inner.layer2", "inner.layer3", "inner.layer4"]
    flat = [f"inner.{i}" for i in range(300)]
    merged = layer_groups(flat, 10)
    assert len(set(merged.values())) == 10 and merged["inner.0"] == "inner.0_to_29"


def test_kernel_baseline_is_the_explicit_kernel_regression(tmp_path):
    model, w0, monitor, _ = _fit(tmp_path, lr=0.05, kernel_baseline=20)
    assert monitor.kernel_baseline_values is not None
    net = _initial(model, w0)
    x, y = regression_data(64, dtype=torch.float64)
    index = torch.randperm(64, generator=torch.Generator().manual_seed(1))[:20]
    xt, yt = x[index], y[index]
    params = {k: v.detach() for k, v in net.named_parameters()}

    def jac(inputs):
        j = jacrev(lambda p: functional_call(net, p, (inputs,)))(params)
        return torch.cat([t.reshape(len(inputs), 2, -1) for t in j.values()], dim=2)  # [n, K, P]

    jt, jv = jac(xt), jac(x[:32])
    k_tt = torch.einsum("akp,bkp->ab", jt, jt)  # output-traced
    k_vt = torch.einsum("akp,bkp->ab", jv, jt)
    ridge = k_tt + 1e-6 * k_tt.diagonal().mean() * torch.eye(20, dtype=torch.float64)
    prediction = net(x[:32]) + k_vt @ torch.linalg.solve(ridge, yt - net(xt))
    expected = 0.5 * ((prediction - y[:32]) ** 2).sum(1).mean()
    assert monitor.kernel_baseline_values["val_loss"] == pytest.approx(float(expected), rel=1e-8)
    events = _events(tmp_path)
    assert events.Scalars("lazy/kernel/val_loss")[0].value == pytest.approx(float(expected), rel=1e-6)


class _Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_kernel_baseline_accuracy_on_the_probe_without_validation_data(tmp_path):
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(40, 4, generator=generator, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    model = _Classifier()
    net = _initial_of(model)
    monitor = LazyTrainingMonitor(loss="cross_entropy", probe=(x[:16], y[:16]), kernel_baseline=12,
                                  measure_kappa=False, ntk_probe_size=4)
    trainer(tmp_path, [monitor], max_epochs=1, limit_val_batches=0).fit(
        model, DataLoader(TensorDataset(x, y), batch_size=8))
    index = torch.randperm(40, generator=torch.Generator().manual_seed(1))[:12]
    params = {k: v for k, v in net.named_parameters()}
    k_tt = D.empirical_ntk(net, x[index], params=params, trace=True, implementation="products")
    k_pt = D.empirical_ntk(net, x[:16], x[index], params=params, trace=True, implementation="products")
    ridge = k_tt + 1e-6 * k_tt.diagonal().mean() * torch.eye(12, dtype=torch.float64)
    targets = nn.functional.one_hot(y[index], 3).double()
    with torch.no_grad():
        prediction = net(x[:16]) + k_pt @ torch.linalg.solve(ridge, targets - net(x[index]))
    values = monitor.kernel_baseline_values
    assert values["val_acc"] == pytest.approx(float((prediction.argmax(1) == y[:16]).double().mean()))
    assert values["val_loss"] == pytest.approx(float(nn.functional.cross_entropy(prediction, y[:16])), rel=1e-8)


def _initial_of(model) -> nn.Module:
    return copy.deepcopy(model.net).requires_grad_(False)
