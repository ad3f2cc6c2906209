"""Kernel–target alignment and the kernel predictor, against explicit formulas and a trained tangent model."""

from __future__ import annotations

import pytest
import torch

from lightning_lazy import LinearizedModel, diagnostics as D

from helpers_core import explicit_jacobian, mlp


def _explicit_alignment(kernel: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    n = kernel.shape[0]
    h = torch.eye(n, dtype=kernel.dtype) - torch.ones(n, n, dtype=kernel.dtype) / n
    kc, tc = h @ kernel @ h, h @ (y @ y.T) @ h
    return (kc * tc).sum() / (kc.norm() * tc.norm())


def test_target_alignment_is_the_centred_formula():
    torch.manual_seed(0)
    a = torch.randn(12, 5, dtype=torch.float64)
    kernel = a @ a.T
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    one_hot = torch.nn.functional.one_hot(labels).double()
    expected = _explicit_alignment(kernel, one_hot)
    torch.testing.assert_close(D.target_alignment(kernel, labels), expected)
    torch.testing.assert_close(D.target_alignment(kernel, one_hot), expected)
    values = torch.randn(12, 2, dtype=torch.float64)
    torch.testing.assert_close(D.target_alignment(kernel, values), _explicit_alignment(kernel, values))
    # The targets' own Gram matrix is perfectly aligned, whatever is added to every entry (centring).
    torch.testing.assert_close(D.target_alignment(one_hot @ one_hot.T + 3.0, labels), torch.tensor(1.0, dtype=torch.float64))
    assert D.target_alignment(kernel.float(), labels).dtype == torch.float32


def test_target_alignment_errors():
    kernel = torch.eye(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="square"):
        D.target_alignment(torch.ones(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="N = 4"):
        D.target_alignment(kernel, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="constant"):
        D.target_alignment(kernel, torch.zeros(4, dtype=torch.long))


def _problem(seed: int = 0):
    torch.manual_seed(seed)
    model = mlp(d_in=4, width=8, d_out=3)
    x, x_test = torch.randn(6, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    y = torch.randn(6, 3, dtype=torch.float64)
    j, j_test = explicit_jacobian(model, x), explicit_jacobian(model, x_test)
    with torch.no_grad():
        return model, x, x_test, y, j @ j.T, j_test @ j.T, model(x), model(x_test)


def test_gradient_descent_mse_is_the_closed_form_of_gradient_flow():
    _, _, _, y, k, k_test, f0, f0_test = _problem()
    n, t, lr = y.numel(), 37.0, 0.5
    flow = torch.linalg.matrix_exp(-k * t * lr / n)
    residual = (f0 - y).reshape(-1)
    expected_train = y.reshape(-1) + flow @ residual
    expected_test = f0_test.reshape(-1) + k_test @ torch.linalg.solve(k, (flow - torch.eye(len(k), dtype=k.dtype)) @ residual)
    predict = D.gradient_descent_mse(k, y, learning_rate=lr)
    train, test = predict(t, f0, f0_test, k_test)
    torch.testing.assert_close(train.reshape(-1), expected_train)
    torch.testing.assert_close(test.reshape(-1), expected_test)
    assert torch.equal(predict(0.0, f0), f0) or torch.allclose(predict(0.0, f0), f0, atol=1e-12)
    # Infinite time: the training targets, and the kernel regression on the test inputs.
    train_inf, test_inf = predict(None, f0, f0_test, k_test)
    torch.testing.assert_close(train_inf, y)
    torch.testing.assert_close(test_inf.reshape(-1),
                               f0_test.reshape(-1) + k_test @ torch.linalg.solve(k, (y - f0).reshape(-1)))
    torch.testing.assert_close(predict(1e9, f0, f0_test, k_test)[1], test_inf, rtol=1e-6, atol=1e-6)
    # Only test predictions, with fx_train_0=None (zero initial outputs on the training set).
    torch.testing.assert_close(predict(None, None, f0_test, k_test),
                               f0_test + (k_test @ torch.linalg.solve(k, y.reshape(-1))).reshape(f0_test.shape))


def test_gradient_descent_mse_traced_kernel_acts_on_each_output():
    torch.manual_seed(1)
    a = torch.randn(6, 4, dtype=torch.float64)
    k = a @ a.T + 0.1 * torch.eye(6, dtype=torch.float64)
    y = torch.randn(6, 3, dtype=torch.float64)
    full = torch.kron(k, torch.eye(3, dtype=torch.float64))  # Θ ⊗ I, example-major
    traced, expanded = D.gradient_descent_mse(k, y), D.gradient_descent_mse(full, y)
    torch.testing.assert_close(traced(5.0, 0.0), expanded(5.0, 0.0))
    # The relative diagonal regularizer adds diag_reg · mean diagonal.
    reg = D.gradient_descent_mse(k, y, diag_reg=0.5)
    plain = D.gradient_descent_mse(k + 0.5 * k.diagonal().mean() * torch.eye(6, dtype=k.dtype), y)
    torch.testing.assert_close(reg(3.0, 0.0), plain(3.0, 0.0))
    with pytest.raises(ValueError, match="k_test_train"):
        traced(None, 0.0, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="square"):
        D.gradient_descent_mse(torch.ones(6, 5), y)


def test_gradient_descent_mse_predicts_a_trained_linearized_model():
    """Full-batch gradient descent on ½·mean((h̄ − y)²) of the tangent model, small steps: its outputs follow
    the closed form at t = number of steps (time in units of the learning rate) to O(learning rate)."""
    model, x, x_test, y, _, _, f0, f0_test = _problem()
    k = D.empirical_ntk(model, x)  # [N·K, N·K], example-major
    k_test = D.empirical_ntk(model, x_test, x)
    tangent = LinearizedModel(model)
    lr, steps = 0.05, 400
    optimizer = torch.optim.SGD(tangent.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * ((tangent(x) - y) ** 2).mean()).backward()
        optimizer.step()
    predict = D.gradient_descent_mse(k, y, learning_rate=lr)
    train, test = predict(float(steps), f0, f0_test, k_test)
    with torch.no_grad():
        moved = (tangent(x) - f0).norm()
        assert moved > 0.1, "the tangent model must have moved for the comparison to mean anything"
        assert (tangent(x) - train).norm() / moved < 1e-3
        assert (tangent(x_test) - test).norm() / (tangent(x_test) - f0_test).norm() < 1e-3
