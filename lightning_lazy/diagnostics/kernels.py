"""Functions of kernels: distance and alignment between two kernels, kernel–target alignment, and the
kernel predictor (the tangent model trained by gradient flow on the squared error, in closed form)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_lazy._params import check_finite
from lightning_lazy.scaling import IGNORE_INDEX


def _check_kernels(kernel: Tensor, initial_kernel: Tensor) -> None:
    if kernel.shape != initial_kernel.shape:
        raise ValueError(f"kernel shapes differ: {tuple(kernel.shape)} vs {tuple(initial_kernel.shape)}")
    check_finite(kernel, "kernel")
    check_finite(initial_kernel, "initial kernel")
    if float(initial_kernel.norm()) == 0.0:
        raise ValueError("the initial kernel is zero: the distance to it has no scale")


def ntk_distance(kernel: Tensor, initial_kernel: Tensor) -> Tensor:
    """‖Θ_t − Θ_0‖_F / ‖Θ_0‖_F: how far the tangent kernel has moved from initialization."""
    _check_kernels(kernel, initial_kernel)
    return (kernel - initial_kernel).norm() / initial_kernel.norm()


def kernel_alignment(kernel: Tensor, initial_kernel: Tensor) -> Tensor:
    """⟨Θ_t, Θ_0⟩_F / (‖Θ_t‖_F ‖Θ_0‖_F): 1 when the kernel has only been rescaled."""
    _check_kernels(kernel, initial_kernel)
    # Cauchy-Schwarz bounds it by 1; rounding must not take it past (1.00001 was seen in float32).
    return ((kernel * initial_kernel).sum() / (kernel.norm() * initial_kernel.norm())).clamp(-1.0, 1.0)


def target_alignment(kernel: Tensor, targets: Tensor) -> Tensor:
    r"""Centred kernel–target alignment A(K, Y) = ⟨K_c, (YYᵀ)_c⟩_F / (‖K_c‖_F ‖(YYᵀ)_c‖_F).

    K_c = HKH with H = I − 11ᵀ/N (Cortes, Mohri & Rostamizadeh, "Algorithms for Learning Kernels Based on
    Centered Alignment", JMLR 2012; used for the NTK by Kopitkov & Indelman 2020 and Baratin et al. 2021).
    In [−1, 1]: 1 when the kernel is, up to scale and centring, the targets' own Gram matrix.

    Shapes: ``kernel`` ``[N, N]`` (the output-traced kernel); ``targets`` ``[N]`` class indices (one-hot
    encoded over ``int(max) + 1`` classes) or ``[N, K]`` values; examples whose class index is −100
    (``scaling.IGNORE_INDEX``, the loss's ``ignore_index``) are left out (their rows and columns of the kernel
    and their targets) before centring. Computed in the kernel's dtype. Raises
    ``ValueError`` for mismatched shapes, non-finite values, or a kernel or targets constant after centring
    (their alignment has no scale).
    """
    if kernel.dim() != 2 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f"kernel must be a square [N, N] (output-traced) kernel, got shape {tuple(kernel.shape)}")
    n = kernel.shape[0]
    if targets.shape[:1] != (n,) or targets.dim() > 2:
        raise ValueError(f"targets must be [N] class indices or [N, K] values with N = {n}, got {tuple(targets.shape)}")
    check_finite(kernel, "kernel")
    if targets.is_floating_point():
        y = targets.reshape(n, -1).to(kernel.dtype)
    else:
        if targets.dim() == 1 and bool((targets == IGNORE_INDEX).any()):
            kept = targets != IGNORE_INDEX
            return target_alignment(kernel[kept][:, kept], targets[kept])
        if targets.dim() != 1 or (targets.numel() and int(targets.min()) < 0):
            raise ValueError("integer targets must be [N] non-negative class indices")
        y = F.one_hot(targets.long()).to(kernel.dtype)
    check_finite(y, "targets")
    kc = kernel - kernel.mean(0, keepdim=True) - kernel.mean(1, keepdim=True) + kernel.mean()
    yc = y - y.mean(0, keepdim=True)  # H Y; then (YYᵀ)_c = (HY)(HY)ᵀ
    # ⟨K_c, HY(HY)ᵀ⟩ = tr((HY)ᵀ K_c HY) and ‖HY(HY)ᵀ‖_F = ‖(HY)ᵀHY‖_F: no [N, N] target matrix is formed.
    numerator = (yc * (kc @ yc)).sum()
    norms = kc.norm() * (yc.T @ yc).norm()
    if float(norms) == 0.0:
        raise ValueError("the kernel or the targets are constant over the examples after centring: no alignment")
    return (numerator / norms).clamp(-1.0, 1.0)


PredictFn = Callable[..., Union[Tensor, tuple[Tensor, Tensor]]]


def gradient_descent_mse(k_train_train: Tensor, y_train: Tensor, *, learning_rate: float = 1.0,
                         diag_reg: float = 0.0) -> PredictFn:
    r"""The kernel predictor: outputs of the tangent model trained by gradient flow on the squared error.

    For the linearization f̄ of a network around w0 with kernel Θ = J(w0)J(w0)ᵀ and the loss
    L = ½ · mean over the n entries of (f̄(X) − Y)², gradient flow for time τ = learning_rate · t gives
    (Lee et al., "Wide Neural Networks of Any Depth Evolve as Linear Models", NeurIPS 2019, eq. 9–10)::

        f_t(X)  = Y + e^{−Θτ/n} (f_0(X) − Y)
        f_t(x') = f_0(x') − Θ(x', X) Θ⁻¹ (I − e^{−Θτ/n}) (f_0(X) − Y)

    and at infinite time (``t=None``, by a linear solve) f(X) = Y, f(x') = f_0(x') + Θ(x', X)Θ⁻¹(Y − f_0(X)).
    Finite times use the eigendecomposition of Θ (eigenvalues clipped at 0). The same conventions as
    neural-tangents' ``predict.gradient_descent_mse`` (time in units of the learning rate, n = ``y_train.numel()``,
    ``diag_reg`` relative to the mean diagonal: Θ + diag_reg · tr(Θ)/N · I).

    Shapes: ``k_train_train`` ``[N, N]`` (the output-traced kernel, acting alike on every output: Θ ⊗ I_K) or
    ``[N·K, N·K]`` (the full kernel, example-major as :func:`~lightning_lazy.diagnostics.empirical_ntk`
    returns it); ``y_train`` ``[N, K]`` or ``[N]``.

    Returns ``predict(t=None, fx_train_0=0., fx_test_0=None, k_test_train=None)``: ``t`` a number (or
    ``None``); ``fx_train_0`` the outputs at w0 on the training set (``[N, K]`` or a scalar), ``None`` to skip
    them; ``fx_test_0`` ``[M, K]`` and ``k_test_train`` ``[M, N]`` (or ``[M·K, N·K]``) for test predictions.
    It returns ``fx_train_t``, ``fx_test_t``, or both as a tuple when both are asked for. Raises
    ``ValueError`` for shapes that do not fit, or ``fx_test_0`` without ``k_test_train``.
    """
    if k_train_train.dim() != 2 or k_train_train.shape[0] != k_train_train.shape[1]:
        raise ValueError(f"k_train_train must be a square kernel, got shape {tuple(k_train_train.shape)}")
    check_finite(k_train_train, "k_train_train")
    n_examples = y_train.shape[0] if y_train.dim() else 0
    y = y_train.to(k_train_train.dtype).reshape(n_examples, -1)
    full = k_train_train.shape[0] == y.numel() and y.shape[1] > 1
    if not full and k_train_train.shape[0] != n_examples:
        raise ValueError(
            f"k_train_train has shape {tuple(k_train_train.shape)} but y_train {tuple(y_train.shape)}: give the "
            "[N, N] output-traced kernel or the [N·K, N·K] full kernel of the N training examples"
        )
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    size = y.numel()
    kernel = k_train_train
    if diag_reg:
        kernel = kernel + diag_reg * kernel.diagonal().mean() * torch.eye(len(kernel), dtype=kernel.dtype,
                                                                             device=kernel.device)
    as_rows = (lambda v: v.reshape(-1, 1)) if full else (lambda v: v)  # the kernel acts on [N·K, 1] or [N, K]
    eigen: list[tuple[Tensor, Tensor]] = []

    def _eigen() -> tuple[Tensor, Tensor]:
        if not eigen:
            values, vectors = torch.linalg.eigh(kernel)
            eigen.append((values.clamp_min(0.0), vectors))
        return eigen[0]

    def predict(t: float | None = None, fx_train_0: Tensor | float | None = 0.0, fx_test_0: Tensor | None = None,
                k_test_train: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        if fx_test_0 is not None and k_test_train is None:
            raise ValueError("test predictions need k_test_train, the kernel between the test and training inputs")
        start = torch.zeros_like(y) if fx_train_0 is None else torch.broadcast_to(
            torch.as_tensor(fx_train_0, dtype=y.dtype, device=y.device), y.shape)
        residual = as_rows(start - y)  # f_0(X) − Y
        if t is None:
            train = y.clone()
            # Θ⁻¹(f_0 − Y); test: f_0(x') − Θ(x', X) Θ⁻¹ (f_0(X) − Y)
            weights = torch.linalg.solve(kernel, residual) if fx_test_0 is not None else None
        else:
            values, vectors = _eigen()
            decay = torch.expm1(-values * (float(t) * learning_rate) / size)  # e^{−λτ/n} − 1
            projected = vectors.T @ residual
            train = (residual + vectors @ (decay[:, None] * projected)).reshape(y.shape) + y
            if fx_test_0 is not None:
                # Θ⁻¹(e^{−Θτ/n} − I) with λ = 0 directions contributing their limit −τ/n.
                safe = torch.where(values > 0, values, torch.ones_like(values))
                gain = torch.where(values > 0, decay / safe, -torch.full_like(values, float(t) * learning_rate / size))
                weights = -(vectors @ (gain[:, None] * projected))
            else:
                weights = None
        train = train.reshape(y_train.shape) if y_train.dim() == 1 else train
        if fx_test_0 is None:
            return train
        if k_test_train.shape[-1] != kernel.shape[0]:
            raise ValueError(f"k_test_train has {k_test_train.shape[-1]} columns, the training kernel {kernel.shape[0]}")
        test = torch.as_tensor(fx_test_0, dtype=y.dtype, device=y.device)
        test = test - (k_test_train.to(y.dtype) @ weights).reshape(test.shape)
        return test if fx_train_0 is None else (train, test)

    return predict
