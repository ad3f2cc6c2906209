"""Feature movement from sketches of the module outputs: the CountSketch is the Johnson–Lindenstrauss estimate its
docstring states (unbiased, variance within the bound), feature movement from sketches agrees with the exact value on
small models within that error, is exactly 0 while nothing moves, and the probe keeps a bounded number of values per
module output (a model refused with whole outputs is accepted with the sketch)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_lazy import diagnostics as D
from lightning_lazy.watch.probe import LazinessProbe, ProbeMemoryError


def test_count_sketch_is_an_unbiased_linear_map_within_its_variance_bound():
    torch.manual_seed(0)
    size = 256
    v = torch.randn(40, 100, dtype=torch.float64) * torch.linspace(0.1, 3, 100, dtype=torch.float64)  # uneven energy
    ratios = torch.stack([D.count_sketch(v, size, seed).square().sum() / v.square().sum() for seed in range(400)])
    # Var ‖Sv‖² = (2/M)·Σ_{p≠q in different runs of M} v_p² v_q² = (2/M)·((Σ v²)² − Σ_runs (Σ_run v²)²) ≤ (2/M)‖v‖⁴
    energy = v.reshape(-1).square()
    runs = torch.nn.functional.pad(energy, (0, -len(energy) % size)).reshape(-1, size).sum(1)
    exact_std = math.sqrt(2 / size * (float(energy.sum()) ** 2 - float(runs.square().sum()))) / float(energy.sum())
    bound = math.sqrt(2 / size)
    assert exact_std <= bound
    assert float(ratios.std()) == pytest.approx(exact_std, rel=0.2)  # 400 samples: the sample std within ~5 %
    assert abs(ratios.mean() - 1) < 4 * exact_std / math.sqrt(400)  # E ‖Sv‖² = ‖v‖²
    a, b = torch.randn(3, 1000, dtype=torch.float64), torch.randn(3, 1000, dtype=torch.float64)
    torch.testing.assert_close(D.count_sketch(a, size, 7) - D.count_sketch(b, size, 7), D.count_sketch(a - b, size, 7))
    assert torch.equal(D.count_sketch(a, size, 7), D.count_sketch(a.clone(), size, 7))  # bit-equal: same map
    assert not torch.equal(D.count_sketch(a, size, 7), D.count_sketch(a, size, 8))
    # Numbers of one run of M never share a bucket: a vector of at most M numbers keeps its norm exactly.
    short = torch.randn(size, dtype=torch.float64)
    torch.testing.assert_close(D.count_sketch(short, size, 3).norm(), short.norm())
    with pytest.raises(ValueError, match="sketch size"):
        D.count_sketch(a, 0, 0)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).double()


def test_sketched_feature_movement_agrees_with_the_exact_value_within_the_stated_error():
    net, x = _net(), torch.randn(16, 3, 12, 12, dtype=torch.float64)
    names = ["0", "2", "6"]
    size = 2048  # the convolutions' outputs (16·8·12·12 = 18432 numbers) are sketched, the last layer's kept
    with torch.no_grad(), D.recording_module_outputs(net, names) as exact_then, \
            D.recording_module_outputs(net, names, sketch=size) as then:
        net(x)
    assert isinstance(then["0"][0], D.FeatureSketch) and then["0"][0].values.shape == (size,)
    assert isinstance(then["6"][0], torch.Tensor)  # 64 numbers: kept whole
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with torch.no_grad(), D.recording_module_outputs(net, names) as exact_now, \
            D.recording_module_outputs(net, names, sketch=size) as now:
        net(x)
    exact, sketched = D.feature_movement(exact_now, exact_then), D.feature_movement(now, then)
    bound = math.sqrt(2 / size)  # the relative standard error stated for the ratio
    for name in ("0", "2"):
        assert float(sketched[name]) == pytest.approx(float(exact[name]), rel=3 * bound)
    assert float(sketched["6"]) == pytest.approx(float(exact["6"]), rel=1e-12)
    with pytest.raises(ValueError, match="other shapes"):  # a sketch is never compared with a whole output
        D.feature_movement(exact_now, then)


def test_probe_feature_movement_from_sketches_is_zero_at_w0_and_close_to_the_exact_value_after():
    net, x = _net(), torch.randn(24, 3, 12, 12, dtype=torch.float64)
    y = torch.randint(0, 4, (24,))
    sketched = LazinessProbe(net, x, y, measure_kappa=False, measure_ntk=False, layer_probe_size=20,
                             feature_sketch=1024)
    exact = LazinessProbe(net, x, y, measure_kappa=False, measure_ntk=False, layer_probe_size=20, feature_sketch=None)
    names = [name for name, _ in net.named_parameters()]
    for probe in (sketched, exact):
        probe.measure_initial(names)
    assert all(v["feature_movement"] == 0.0 for v in sketched.measure(names)["layers"].values())
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.1)
    now, then = sketched.measure(names)["layers"], exact.measure(names)["layers"]
    assert isinstance(sketched.initial_features["0"][0], D.FeatureSketch)
    for name, values in then.items():
        assert now[name]["feature_movement"] == pytest.approx(values["feature_movement"], rel=3 * math.sqrt(2 / 1024))


def test_a_probe_refused_for_its_whole_module_outputs_is_accepted_with_their_sketches(monkeypatch):
    net, x = _net(), torch.randn(64, 3, 12, 12, dtype=torch.float64)
    # Whole outputs: 2·64·(2·1152 + 4) numbers for the features alone; the sketch keeps 2·(2·2048 + 64·4).
    monkeypatch.setattr(D, "DEFAULT_MEMORY_BUDGET", 100_000)
    with pytest.raises(ProbeMemoryError):
        LazinessProbe(net, x, None, measure_kappa=False, measure_ntk=False, feature_sketch=None)
    probe = LazinessProbe(net, x, None, measure_kappa=False, measure_ntk=False, feature_sketch=2048)
    kept = sum(t.values.numel() if isinstance(t, D.FeatureSketch) else t.numel()
               for ts in probe.initial_features.values() for t in ts)
    assert kept == 2 * 2048 + 64 * 4
    with pytest.raises(ValueError, match="feature_sketch must be a positive"):
        LazinessProbe(net, x, None, feature_sketch=0)


def test_sketched_features_survive_the_probe_state_dict():
    net, x = _net(), torch.randn(24, 3, 12, 12, dtype=torch.float64)
    probe = LazinessProbe(net, x, None, measure_kappa=False, measure_ntk=False, feature_sketch=1024)
    names = [name for name, _ in net.named_parameters()]
    probe.measure_initial(names)
    state = probe.state_dict()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.1)
    restored = LazinessProbe(net, x, None, measure_kappa=False, measure_ntk=False, feature_sketch=1024)
    restored.load_state_dict(state)
    assert isinstance(restored.initial_features["0"][0], D.FeatureSketch)
    assert restored.measure(names)["layers"] == probe.measure(names)["layers"]
