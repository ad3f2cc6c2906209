"""LazinessProbe.measure(parts=...): a part left out is neither computed nor reported, and the parts taken give the
values a full measurement gives at the same weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_lazy.watch.probe import MEASURE_PARTS, LazinessProbe


def _probe() -> tuple[nn.Module, LazinessProbe, list[str]]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randn(20, 3, dtype=torch.float64)
    probe = LazinessProbe(net, x, y, kappa_probe_size=6, ntk_probe_size=6, layer_probe_size=8)
    names = [name for name, _ in net.named_parameters()]
    probe.measure_initial(names)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net, probe, names


def test_parts_left_out_are_absent_and_the_parts_taken_equal_a_full_measurement():
    _, probe, names = _probe()
    full = probe.measure(names, time=1.0)
    probe.previous_kernel, probe.previous_time = probe.initial_kernel, 0.0  # the same velocity reference again
    no_kappa = probe.measure(names, time=1.0, parts={"kappa": False})
    assert not {"kappa", "jacobian_norm", "hessian_norm"} & set(no_kappa)
    assert "hessian_norm" not in probe.timings["last"] and "kappa_rest" not in probe.timings["last"]
    for key in ("divergence", "displacement", "ntk_distance", "kernel_alignment", "ntk_top_eigenvalue",
                "activation_stability", "kernel_velocity"):
        if key in full:
            assert no_kappa[key] == full[key], key
    assert no_kappa["layers"] == full["layers"]
    no_ntk = probe.measure(names, time=2.0, parts={"ntk": False, "kappa": True})
    assert not {"ntk_distance", "kernel_alignment", "ntk_top_eigenvalue", "kernel_velocity"} & set(no_ntk)
    assert all("ntk_share" not in v and "ntk_distance" not in v for v in no_ntk["layers"].values())
    assert all("feature_movement" in v for v in no_ntk["layers"].values())
    # ‖Dh‖ by Lanczos instead of from the kernel: the same number within Lanczos's tolerance.
    assert no_ntk["jacobian_norm"] == pytest.approx(full["jacobian_norm"], rel=1e-3)
    assert no_ntk["hessian_norm"] > 0
    assert "layers" not in probe.measure(names, parts={"layers": False})
    assert set(MEASURE_PARTS) == {"kappa", "ntk", "layers"}
    with pytest.raises(ValueError, match="unknown measurement part 'hessian'"):
        probe.measure(names, parts={"hessian": False})


def test_at_w0_every_distance_is_exactly_zero_whatever_the_parts():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    x = torch.randn(20, 5, dtype=torch.float64)
    probe = LazinessProbe(net, x, None, kappa_probe_size=6, ntk_probe_size=6, layer_probe_size=8)
    names = [name for name, _ in net.named_parameters()]
    probe.measure_initial(names)
    for parts in ({"kappa": False}, {"ntk": False}, {"kappa": False, "ntk": False}):
        values = probe.measure(names, parts=parts)
        assert values["displacement"] == 0.0
        assert values.get("ntk_distance", 0.0) == 0.0
        assert all(v == 0.0 for layer in values["layers"].values() for v in layer.values() if v != layer.get("ntk_share"))
