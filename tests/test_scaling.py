import math

import pytest
import torch
from torch import nn

from lightning_lazy import AlphaScaled, resolve_loss, scaled_loss
from lightning_lazy.scaling import half_squared_error

from helpers_core import mlp


def test_centred_model_is_zero_at_init_and_scaled_after():
    net = mlp()
    model = AlphaScaled(net, alpha=7.0)
    x = torch.randn(4, 5, dtype=torch.float64)
    assert torch.equal(model(x), torch.zeros(4, 3, dtype=torch.float64))
    before = net(x).detach()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01)
    assert torch.allclose(model(x), 7.0 * (net(x) - before))


def test_uncentred_model_and_loss_scale():
    net = mlp()
    model = AlphaScaled(net, alpha=3.0, center=False)
    x = torch.randn(4, 5, dtype=torch.float64)
    assert torch.allclose(model(x), 3.0 * net(x))
    assert model.loss_scale == pytest.approx(1 / 9)
    assert model.initial is None


def test_initial_copy_is_frozen_buffers_saved_and_moved():
    net = mlp()
    model = AlphaScaled(net, alpha=2.0)
    names = {n for n, _ in model.named_parameters()}
    assert all(n.startswith("module.") for n in names), "w0 must not be a parameter"
    state = model.state_dict()
    assert any(k.startswith("initial.") for k in state)
    model.float()
    assert all(b.dtype == torch.float32 for b in model.initial.as_dict().values())
    x = torch.randn(2, 5)
    assert torch.equal(model(x), torch.zeros(2, 3))


def test_dropout_and_batchnorm_centred_exactly_in_train_mode():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 2))
    model = AlphaScaled(net, alpha=10.0).train()
    running = net[1].running_mean.clone()
    out = model(torch.randn(16, 5))
    assert torch.equal(out, torch.zeros_like(out))
    # The live network updated its statistics once (the pass at w0 works on a copy of them) ...
    assert not torch.equal(net[1].running_mean, running)
    assert net[1].num_batches_tracked.item() == 1
    # ... and in eval mode, on the moved statistics, the centred model is still exactly 0 at w = w0.
    out = model.eval()(torch.randn(16, 5))
    assert torch.equal(out, torch.zeros_like(out))


def test_objective_and_scaled_loss():
    out = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)
    target = torch.tensor([1, 0])
    expected = 0.5 * ((1**2 + 1**2) + (1**2 + 1**2)) / 2  # one-hot targets [0, 1] and [1, 0]
    assert half_squared_error(out, target).item() == pytest.approx(expected)
    model = AlphaScaled(mlp(d_out=2), alpha=4.0, loss="mse")
    assert model.objective(out, target).item() == pytest.approx(expected / 16)
    assert scaled_loss("mse", 4.0)(out, target).item() == pytest.approx(expected / 16)
    logits, classes = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    assert torch.equal(resolve_loss("cross_entropy")(logits, classes), torch.nn.functional.cross_entropy(logits, classes))
    # Token logits [N, T, V] with class indices [N, T]: classes on the last dimension.
    tokens, labels = torch.randn(2, 5, 7, dtype=torch.float64), torch.randint(0, 7, (2, 5))
    expected_tokens = torch.nn.functional.cross_entropy(tokens.reshape(10, 7), labels.reshape(10))
    assert torch.equal(resolve_loss("cross_entropy")(tokens, labels), expected_tokens)
    assert half_squared_error(tokens, labels).item() == pytest.approx(
        0.5 * (tokens - torch.nn.functional.one_hot(labels, 7)).pow(2).sum((1, 2)).mean().item())


@pytest.mark.parametrize("alpha", [0, -1.0, math.nan, math.inf, "big", None])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha must be a positive finite number"):
        AlphaScaled(mlp(), alpha=alpha)


def test_bad_losses_and_targets():
    with pytest.raises(ValueError, match="unknown loss"):
        resolve_loss("hinge")
    with pytest.raises(TypeError):
        resolve_loss(3)
    out = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="does not match output shape"):
        half_squared_error(out, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        half_squared_error(out, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="has no loss"):
        AlphaScaled(mlp(), alpha=1.0).objective(out, out)


def test_checkpoint_with_other_alpha_is_refused():
    saved = AlphaScaled(mlp(), alpha=10.0).state_dict()
    AlphaScaled(mlp(), alpha=10.0).load_state_dict(saved)
    with pytest.raises(ValueError, match="saved with alpha=10"):
        AlphaScaled(mlp(), alpha=100.0).load_state_dict(saved)
