import torch
from torch import nn

from lightning_lazy._params import functional_call, probe_mode


class Aliased(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
        self.backbone = self.net[0]  # the BackboneFinetuning idiom: one module, two names
        self.extra = nn.Linear(3, 3)
        self.extra.weight = self.net[0].weight  # and a tied weight

    def forward(self, x):
        return self.net(self.extra(x))


def test_functional_call_keeps_aliased_and_tied_parameters_and_substitutes_them_everywhere():
    torch.manual_seed(0)
    model = Aliased()
    before = {name: p for name, p in model.named_parameters()}
    new = {name: torch.randn_like(p) for name, p in before.items()}
    x = torch.randn(4, 3)
    out = functional_call(model, new, (x,))
    for name, p in model.named_parameters():
        assert p is before[name] and isinstance(p, nn.Parameter), name
    assert model.backbone.weight is model.net[0].weight is model.extra.weight
    reference = Aliased()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(new[name])
    torch.testing.assert_close(out, reference(x))


def test_probe_mode_batch_statistics_without_updating_them_and_restores_modes():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    net.train()
    running = net[1].running_mean.clone()
    x = torch.randn(8, 3)
    with probe_mode(net):
        assert not net[2].training and net[1].training
        first, second = net(x), net(x)
    torch.testing.assert_close(first, second)  # dropout off, nothing drawn
    assert torch.equal(net[1].running_mean, running) and net[1].num_batches_tracked.item() == 0
    assert all(m.training for m in net.modules()) and net[1].track_running_stats


def test_probe_kernel_holds_batchnorm_statistics_and_matches_the_products_kernel():
    from lightning_lazy import diagnostics
    from lightning_lazy.watch.probe import LazinessProbe

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                        nn.Flatten(), nn.Linear(16, 3)).double().train()
    x = torch.randn(12, 3, 6, 6, dtype=torch.float64)
    probe = LazinessProbe(net, x, None, ntk_probe_size=6)
    params = {k: v.detach() for k, v in net.named_parameters()}
    # The reference: the same network in eval mode, its running statistics set to the probe's batch statistics.
    h = net[0](x[:6])
    reference = nn.Sequential(*net)
    with torch.no_grad():
        net[1].running_mean.copy_(h.mean((0, 2, 3)))
        net[1].running_var.copy_(h.var((0, 2, 3), unbiased=False))
    fitted = net[1].num_batches_tracked.item()
    expected = diagnostics.empirical_ntk(reference.eval(), x[:6], params=params, implementation="products")
    net.train()
    torch.testing.assert_close(probe.kernel(params), expected, rtol=1e-10, atol=1e-12)
    assert net[1].num_batches_tracked.item() == fitted and net.training and net[1].training
