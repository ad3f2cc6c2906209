"""Operator norms of the derivatives: ‖Dh‖ (Jacobian), ‖D²h‖ (second derivative) and κ (Chizat et al. 2019, Theorem 2.3)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from torch.func import jvp, vjp

from lightning_lazy._params import check_finite
from lightning_lazy.diagnostics._common import (
    DEFAULT_MEMORY_BUDGET,
    ModelLike,
    Params,
    _as_function,
    _check_probe,
    _evaluating,
    _output,
    _random_like,
    _trainable_params,
)
from lightning_lazy.diagnostics.lanczos import extreme_eigenpair
from lightning_lazy.scaling import IGNORE_INDEX, as_regression_target, squared_distance


def jacobian_norm(
    model: ModelLike,
    x: Tensor,
    params: Params | None = None,
    *,
    max_iter: int = 100,
    tol: float = 1e-6,
    seed: int = 0,
    start: Tensor | None = None,
    return_direction: bool = False,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> Tensor | tuple[Tensor, Tensor]:
    """‖Dh(w)‖ = σ_max(J) / √N, J = ∂h(x; w)/∂w the ``[N·K, P]`` probe Jacobian, matrix-free.

    Lanczos on J Jᵀ (``[N·K, N·K]``), each product one vjp (reusing one recorded backward) and one jvp; the
    Lanczos basis lives in the N·K output space, so its memory is at most min(``max_iter``, max(2,
    ``memory_budget`` // N·K))·N·K numbers whatever the parameter count (beyond, Lanczos restarts from its Ritz
    vector: token logits of 16 sequences of 128 positions over GPT-2's 50257 tokens are 1.0e8 numbers, so 2
    vectors under the default budget instead of up to 100). Returns a 0-dim tensor in the output's dtype. Cost: one forward, then
    one vjp + one jvp per iteration, until the Ritz residual is below ``tol`` (relative, on σ²): 10-40
    iterations on the models of ``benchmarks/monitor_cost.py`` from a random start (the monitor uses
    ``tol=1e-3``). ``start`` (``[N, K]`` or ``[N·K]``, e.g. the direction an earlier call returned with
    ``return_direction=True``: the top left singular vector of J, ``[N, K]``) replaces the random start
    vector (drawn from ``seed``); along training, where J moves little between measurements, Lanczos then
    needs fewer products. With ``return_direction=True`` returns ``(norm, direction)``.
    """
    norm, _, direction = _jacobian_norm_and_output(model, x, params, max_iter=max_iter, tol=tol, seed=seed,
                                                   start=start, memory_budget=memory_budget)
    return (norm, direction) if return_direction else norm


def jacobian_norm_from_ntk(kernel: Tensor, num_inputs: int) -> Tensor:
    """‖Dh(w)‖ = σ_max(J) / √N = √(λ_max(Θ) / N) from the empirical NTK Θ = J Jᵀ (``[N·K, N·K]``, as
    :func:`empirical_ntk` returns it) of the same N probe inputs at the same w.

    Exact (one symmetric eigenvalue problem of size N·K, in float64) and no product with the model: where the
    kernel is computed anyway, the Lanczos iterations of :func:`jacobian_norm` are saved. Returns a 0-dim
    tensor in the kernel's dtype. Raises ``ValueError`` when the kernel is not square over ``num_inputs``
    examples.
    """
    if kernel.dim() != 2 or kernel.shape[0] != kernel.shape[1] or num_inputs < 1 or kernel.shape[0] % num_inputs:
        raise ValueError(f"expected a square [N*K, N*K] kernel over {num_inputs} inputs, got {tuple(kernel.shape)}")
    check_finite(kernel, "the empirical NTK")
    largest = torch.linalg.eigvalsh(kernel.double())[-1].clamp_min(0)
    return torch.sqrt(largest / num_inputs).to(kernel.dtype)


def _jacobian_norm_and_output(
    model: ModelLike, x: Tensor, params: Params | None, *, max_iter: int = 100, tol: float = 1e-6, seed: int = 0,
    start: Tensor | None = None, memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> tuple[Tensor, Tensor, Tensor]:
    _check_probe(x)
    params = _trainable_params(model, params)
    with _evaluating(model):
        f = _as_function(model, x)
        out, vjp_fn = vjp(f, params)
        check_finite(out, "the model output on the probe")

        def gram(u: Tensor) -> Tensor:
            (direction,) = vjp_fn(u)
            return jvp(f, (params,), (direction,))[1]

        if start is None:
            start = _random_like(out, seed)
        elif start.numel() != out.numel():
            raise ValueError(f"start must have one number per output, {tuple(out.shape)}, got {tuple(start.shape)}")
        start = start.reshape(out.shape).to(dtype=out.dtype, device=out.device)
        largest, direction = extreme_eigenpair(gram, start, max_iter=max_iter, tol=tol,
                                               max_basis=max(2, memory_budget // max(1, out.numel())))
    return torch.sqrt(largest.clamp_min(0) / out.shape[0]), out.detach(), direction


def hessian_norm(
    model: ModelLike,
    x: Tensor,
    params: Params | None = None,
    *,
    max_iter: int = 30,
    max_rounds: int = 10,
    restarts: int = 2,
    tol: float = 1e-4,
    seed: int = 1,
    start: Tensor | None = None,
    return_direction: bool = False,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> Tensor | tuple[Tensor, Tensor]:
    """‖D²h(w)‖ = sup_{‖u‖=1} ‖D²h(w)[u, u]‖ / √N, matrix-free (a lower bound that converges to it).

    sup_u ‖D²h[u, u]‖ = sup_{u, c unit} ⟨c, D²h[u, u]⟩ = sup_c |λ|_max(H_c), H_c = Σₖ cₖ Hₖ, so we
    alternate: u ← extreme eigenvector of H_c (Lanczos with Hessian-vector products H_c v, by double backward
    through one recorded gradient Jᵀc), then c ← D²h[u, u] / ‖D²h[u, u]‖ (forward-over-forward). Each round can only
    increase ‖D²h[u, u]‖; it stops when a round gains less than ``tol`` (relative) or after
    ``max_rounds``. With several outputs the alternation can stop at a local maximum, so it is run from
    ``restarts`` random starts and the largest value is kept. The value returned is ‖D²h[u, u]‖ or, after
    the last round, the Ritz value |⟨c, D²h[u, u]⟩| ≤ ‖D²h[u, u]‖ (unit u and c), so it never exceeds the
    true norm.

    Memory: the Lanczos basis holds at most max(2, ``memory_budget`` // P) parameter-sized vectors
    (default budget 2^27 numbers: all ``max_iter`` = 12 up to 11 M parameters, 2 at 67 M+); beyond that
    Lanczos restarts explicitly from its Ritz vector (see :func:`extreme_eigenpair`), so a 100 M+
    parameter model needs about 4 parameter-sized vectors besides autograd's own.

    Cost, in Hessian-vector products (each about two backward passes of the probe): at most
    restarts·max_rounds·max_iter, plus restarts·max_rounds forward-over-forward D²h[u, u] (each about two
    products). The monitor's settings, a careful search at fit start and then a short one warm-started from
    the last direction, are ``CAREFUL_HESSIAN`` and ``WARM_HESSIAN`` in ``lightning_lazy.watch.probe``, with their
    measured cost and accuracy.

    ``start`` (a flat ``[P]`` direction, e.g. the one returned by an earlier call with
    ``return_direction=True``) replaces the first random start: tracking ‖D²h‖ along training then needs
    only a few iterations per measurement. With ``return_direction=True`` returns ``(norm, u)``.
    """
    _check_probe(x)
    if restarts < 1:
        raise ValueError(f"restarts must be at least 1, got {restarts}")
    params = _trainable_params(model, params)
    names = list(params)
    shapes = [params[k].shape for k in names]
    sizes = [s.numel() for s in shapes]

    def unflatten(vector: Tensor) -> Params:
        return {k: v.reshape(s) for k, v, s in zip(names, vector.split(sizes), shapes)}

    flat = torch.cat([params[k].reshape(-1) for k in names])
    with _evaluating(model):
        f = _as_function(model, x)

        def second_derivative(u: Tensor) -> Tensor:
            direction = unflatten(u)

            def directional(p: Params) -> Tensor:
                return jvp(f, (p,), (direction,))[1]

            return jvp(directional, (params,), (direction,))[1]  # D²h[u, u], [N, K]

        starts = [_random_like(flat, seed + 7919 * r) for r in range(restarts)]
        if start is not None:
            if start.shape != flat.shape:
                raise ValueError(f"start must be a flat direction of {flat.numel()} numbers, got {tuple(start.shape)}")
            starts[0] = start.to(dtype=flat.dtype, device=flat.device)
        max_basis = max(2, memory_budget // max(1, flat.numel()))
        value, direction = max(
            (_alternate(f, params, second_derivative, unflatten, names, u, max_iter, max_rounds, tol, max_basis)
             for u in starts),
            key=lambda pair: float(pair[0]),
        )
    norm = value / math.sqrt(x.shape[0])
    return (norm, direction) if return_direction else norm


def _alternate(
    f: Callable[[Params], Tensor],
    params: Params,
    second_derivative: Callable[[Tensor], Tensor],
    unflatten: Callable[[Tensor], Params],
    names: list[str],
    u: Tensor,
    max_iter: int,
    max_rounds: int,
    tol: float,
    max_basis: int | None = None,
) -> Tensor:
    """One start of the alternation of :func:`hessian_norm`: the largest value met (not / √N), and its u.

    After a round's Lanczos the value is its Ritz value |θ| = |uᵀH_c u| = |⟨c, D²h[u, u]⟩| ≤ ‖D²h[u, u]‖, and
    |θ| ≥ the value at the round's start (the Krylov space holds the start). Only a round followed by another
    computes D²h[u, u] (forward-over-forward, about as costly as two Hessian-vector products), for the next
    c and the value ‖D²h[u, u]‖ ≥ |θ|; the last round's would only refine a value already met.

    The rounds' Lanczos runs share one workspace (their basis vectors, parameter-sized): allocated once per start,
    not once per product (fresh parameter-sized tensors cost their page faults, see :func:`extreme_eigenpair`)."""
    u = u / u.norm()
    second = second_derivative(u)
    check_finite(second, "the second derivative of the model on the probe")
    best, best_u = second.norm(), u
    workspace: list[Tensor] = []
    for round_ in range(max_rounds):
        if float(best) == 0.0:
            break
        hessian_vector = _hessian_vector_products(f, params, names, second / second.norm(), unflatten)
        theta, u = extreme_eigenpair(hessian_vector, u, max_iter=max_iter, tol=tol, max_basis=max_basis,
                                     full_reorthogonalization=False, workspace=workspace)
        if round_ == max_rounds - 1:
            value = theta.abs()
        else:
            second = second_derivative(u)
            value = second.norm()
        gained = float(value) > float(best) * (1 + tol)
        if float(value) > float(best):
            # u lives in the workspace, which the next round overwrites: the best direction is kept apart.
            best, best_u = value, (u.clone() if gained and round_ < max_rounds - 1 else u)
        if not gained:
            break
    return best, best_u


def _hessian_vector_products(
    f: Callable[[Params], Tensor], params: Params, names: list[str], cotangent: Tensor,
    unflatten: Callable[[Tensor], Params],
) -> Callable[[Tensor], Tensor]:
    """``v -> H_c v`` (flat), H_c = Σₖ cₖ ∇²hₖ, by double backward (Pearlmutter): the gradient Jᵀc is recorded
    once with its graph, and each product is one backward through it. Measured on a 4 M-parameter MLP, a
    product costs about a tenth of forward-over-reverse ``jvp(vjp)``, which redoes the forward every time."""
    leaves = {k: params[k].detach().requires_grad_(True) for k in names}
    with torch.enable_grad():
        gradient = torch.autograd.grad(f(leaves), [leaves[k] for k in names], cotangent, create_graph=True,
                                       allow_unused=True)
    # A parameter the output is affine in has a constant gradient: its rows of H_c are 0.
    curved = [(i, g) for i, g in enumerate(gradient) if g is not None and g.requires_grad]

    def product(v: Tensor, out: Tensor | None = None) -> Tensor:
        if not curved:
            return torch.zeros_like(v) if out is None else out.zero_()
        direction = unflatten(v)
        with torch.enable_grad():
            parts = torch.autograd.grad([g for _, g in curved], [leaves[k] for k in names],
                                        [direction[names[i]] for i, _ in curved], retain_graph=True, allow_unused=True)
        flat = [(part if part is not None else torch.zeros_like(leaves[k])).reshape(-1) for part, k in zip(parts, names)]
        return torch.cat(flat) if out is None else torch.cat(flat, out=out.reshape(-1)).reshape(out.shape)

    return product


def _ignoring(model: ModelLike, target: Tensor) -> ModelLike:
    """The model with the outputs at positions whose class ``target`` is −100 set to 0 (a functional model, in the
    module's eval mode): the model restricted to the positions trained. The mask is ``[N, ..., 1]``, broadcast over
    the classes of each position (never an output-sized tensor of its own)."""
    keep = (target != IGNORE_INDEX).unsqueeze(-1)

    def restricted(p: Params, inputs: Tensor) -> Tensor:
        with _evaluating(model):
            out = _as_function(model, inputs)(p)
        kept = out.reshape(*keep.shape[:-1], -1) * keep.to(dtype=out.dtype, device=out.device)
        return kept.reshape(out.shape)

    return restricted


def _classes_view(out: Tensor, target: Tensor) -> Tensor:
    """The flattened output ``[N, K]`` as ``[*target.shape, C]``, for class-index targets of the unflattened output's
    shape without its last dimension (C = K / the positions per example)."""
    positions = max(1, target[0].numel()) if target.dim() else 1
    if target.dim() == 0 or target.shape[0] != out.shape[0] or out.shape[1] % positions:
        raise ValueError(
            f"integer targets of shape {tuple(target.shape)} cannot be matched to outputs of {out.shape[1]} numbers "
            f"per example: class-index targets have the output's shape without its last (class) dimension"
        )
    return out.reshape(*target.shape, -1)


class Kappa(NamedTuple):
    """κ and its parts, all in the empirical L² norm of the probe (0-dim tensors)."""

    value: Tensor
    residual_norm: Tensor
    jacobian_norm: Tensor
    hessian_norm: Tensor


def kappa(
    model: ModelLike,
    x: Tensor,
    target: Tensor,
    params: Params | None = None,
    *,
    jacobian_kwargs: dict | None = None,
    hessian_kwargs: dict | None = None,
    hessian: Tensor | None = None,
    jacobian: Tensor | None = None,
) -> Kappa:
    """κ_h(w) = ‖h(w) − y*‖ · ‖D²h(w)‖ / ‖Dh(w)‖², the laziness ratio of the model actually trained.

    ``hessian_kwargs`` go to :func:`hessian_norm`; ``hessian`` is a ‖D²h(w)‖ already computed (for
    instance warm-started along training), used instead. Likewise ``jacobian``, a ‖Dh(w)‖ already computed
    on the same probe (e.g. :func:`jacobian_norm_from_ntk` of a kernel measured anyway); the residual then
    costs one no-grad forward.

    ``target`` is ``[N, K]`` like the output, or class indices ``[N]`` (one-hot encoded); class indices of
    the output's shape without its last dimension (``[N, T]`` for ``[N, T, V]`` token logits) may hold −100
    (``scaling.IGNORE_INDEX``): those positions are left out of h, as the loss leaves them out, so κ is that of
    the model restricted to the positions trained (its residual, ‖Dh‖ and ‖D²h‖ alike). Small κ means
    the model reaches the target before its Jacobian changes: training is lazy (Theorem 2.3 of the
    paper). For an α-scaled model pass the scaled model itself (κ of α·h falls like 1/α).

    Cost: one forward of the probe (the output is the one recorded for the Jacobian's vjp, so the residual
    needs no forward of its own), the Lanczos iterations of :func:`jacobian_norm` (one vjp + one jvp
    each), and :func:`hessian_norm` unless ``hessian`` is given. Measured (``python
    benchmarks/monitor_cost.py --accuracy-study``: MLP 3072-1024-1024-10, VGG-11 ×1, resnet18, probe 16):
    ``jacobian_kwargs={"tol": 1e-3}`` is within 5e-6 of ``tol=1e-8`` for a third to a half of its cost;
    ``tol=1e-2`` within 5e-4.
    """
    _check_probe(x)
    params = _trainable_params(model, params)
    classes = not target.is_floating_point()
    if classes and bool((target == IGNORE_INDEX).any()):
        model = _ignoring(model, target)
    if jacobian is None:
        # One forward: the output the residual needs is the one recorded for the Jacobian's vjp.
        jac, out, _ = _jacobian_norm_and_output(model, x, params, **(jacobian_kwargs or {}))
    else:
        out = _output(model, x, params)
        check_finite(out, "the model output on the probe")
        jac = jacobian
    if classes:  # ‖h − onehot(y)‖ without the one-hot (token logits [N, T, V] would double the output's memory)
        residual = squared_distance(_classes_view(out, target), target).sqrt() / math.sqrt(out.shape[0])
    else:
        residual = (out - as_regression_target(out, target.reshape(target.shape[0], -1))).norm() / math.sqrt(out.shape[0])
    if float(jac) == 0.0:
        raise ValueError("the Jacobian vanishes on the probe: the output does not depend on the parameters there")
    hess = hessian if hessian is not None else hessian_norm(model, x, params, **(hessian_kwargs or {}))
    return Kappa(residual * hess / jac**2, residual, jac, hess)
