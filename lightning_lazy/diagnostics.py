"""Matrix-free measures of lazy training (Chizat, Oyallon & Bach, 2019), as pure ``torch.func`` functions.

Conventions shared by every function here:

- ``model`` is an ``nn.Module`` (evaluated with ``functional_call``, in eval mode so dropout and
  BatchNorm make it one deterministic function) or a functional model ``fn(params, x) -> Tensor``.
- ``params`` is a ``{name: tensor}`` dict; for a module it defaults to its current trainable parameters.
- ``x`` is a probe batch ``[N, ...]``; outputs are read as ``[N, K]`` (trailing dimensions flattened).
- Function-space norms are the empirical L² norm on the probe, ‖f‖ = (1/√N)·‖f(X)‖_F, the norm in which
  the ½-squared-error loss averaged over examples is ½‖h − y*‖². So ``jacobian_norm`` = σ_max(J)/√N with
  J the ``[N·K, P]`` probe Jacobian, and κ, the divergence, the NTK distance are the same whichever
  normalization one picks.
- Nothing here builds an explicit Jacobian or Hessian of the whole network; dtype and device follow the
  inputs (float64 in, float64 out).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jacrev, jvp, vjp, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from lightning_lazy._forward_ad import forward_ad_safe
from lightning_lazy._params import check_finite, eval_mode, functional_call
from lightning_lazy.scaling import as_regression_target

Params = dict[str, Tensor]
FunctionalModel = Callable[[Params, Tensor], Tensor]
ModelLike = Union[nn.Module, FunctionalModel]

#: Default memory budget of :func:`empirical_ntk` and of :func:`hessian_norm`'s Lanczos basis, in numbers
#: (tensor elements): 2^27, i.e. 1 GiB in float64, 512 MiB in float32. Kernels and parameters are not counted.
DEFAULT_MEMORY_BUDGET = 1 << 27

__all__ = [
    "Displacement",
    "Kappa",
    "activation_stability",
    "displacement",
    "empirical_ntk",
    "hessian_norm",
    "jacobian_norm",
    "jacobian_norm_from_ntk",
    "kappa",
    "kernel_alignment",
    "ntk_distance",
    "path_divergence",
    "recording_relu_states",
    "relu_states",
]


# ----------------------------------------------------------------------------------------------------
# plumbing


def _check_probe(x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"the probe batch must be a tensor [N, ...], got {type(x).__name__}")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(
            f"the probe batch is empty (shape {tuple(x.shape)}): give at least one example, shaped [N, ...]"
        )


def _trainable_params(model: ModelLike, params: Params | None) -> Params:
    if params is not None:
        if not params:
            raise ValueError("params is empty: the measures need at least one parameter tensor")
        return {name: p.detach() for name, p in params.items()}
    if not isinstance(model, nn.Module):
        raise ValueError("a functional model fn(params, x) needs its params passed explicitly")
    found = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if not found:
        raise ValueError(f"{type(model).__name__} has no trainable parameters to differentiate")
    return found


def _as_function(model: ModelLike, x: Tensor) -> Callable[[Params], Tensor]:
    """``params -> model output on x``, flattened to ``[N, K]``."""

    def f(p: Params) -> Tensor:
        out = functional_call(model, p, (x,)) if isinstance(model, nn.Module) else model(p, x)
        if not isinstance(out, Tensor):
            raise TypeError(f"the model must return one tensor [N, K], got {type(out).__name__}")
        if out.dim() == 0 or out.shape[0] != x.shape[0]:
            raise ValueError(
                f"the model returned shape {tuple(out.shape)} for a probe of {x.shape[0]} examples; "
                "the measures need one output row per example, [N, K]"
            )
        return out.reshape(out.shape[0], -1)

    return f


def _output(model: ModelLike, x: Tensor, params: Params) -> Tensor:
    """The model on ``x`` at ``params``, ``[N, K]``: one no-grad forward, as every measure sees the model."""
    with _evaluating(model), torch.no_grad():
        return _as_function(model, x)({k: v.detach() for k, v in params.items()})


def _evaluating(model: ModelLike) -> contextlib.AbstractContextManager[None]:
    """Eval mode for a module, and forward-AD-capable kernels (for functional models too) around every jvp/vjp."""
    stack = contextlib.ExitStack()
    if isinstance(model, nn.Module):
        stack.enter_context(eval_mode(model))
    stack.enter_context(forward_ad_safe(model if isinstance(model, nn.Module) else None))
    return stack


def _random_like(reference: Tensor, seed: int) -> Tensor:
    # Drawn on the CPU from a fixed seed: the measures are reproducible (a resumed run logs the same
    # values) and do not consume the training RNG.
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(reference.shape, generator=generator, dtype=reference.dtype).to(reference.device)


# ----------------------------------------------------------------------------------------------------
# Lanczos


def extreme_eigenpair(
    matvec: Callable[[Tensor], Tensor],
    start: Tensor,
    max_iter: int = 100,
    tol: float = 1e-6,
    *,
    max_basis: int | None = None,
    full_reorthogonalization: bool = True,
) -> tuple[Tensor, Tensor]:
    """Eigenvalue of largest magnitude of a symmetric operator, and its unit eigenvector, by Lanczos.

    Full re-orthogonalization: the basis (vectors shaped like ``start``) is kept, which also gives the Ritz
    vector. Stops when the Ritz residual r = β_k |s_k| of the extreme Ritz value θ falls below ``tol·|θ|``
    (an eigenvalue then lies within r of θ), when the Krylov space is exhausted, or after ``max_iter``
    products. Converges like a Chebyshev polynomial: far faster than power iteration when the top two
    eigenvalues are close.

    Memory: at most ``max_basis`` vectors (default ``max_iter``). When the basis is full and not converged,
    Lanczos restarts explicitly from the current Ritz vector (the extreme Ritz value never decreases in
    magnitude across a restart, but convergence slows towards that of power iteration as ``max_basis``
    shrinks: keep it ≥ 8 where memory allows). Each product counts against ``max_iter``.

    ``full_reorthogonalization=False`` keeps the three-term recurrence only (Paige's form, in place: two
    axpys, a dot product, a norm and a scaling per product): for huge vectors (parameter space, millions of numbers) and cheap
    products, full re-orthogonalization is what costs most (on a 4 M-parameter MLP with a 16-example probe,
    nine tenths of a Hessian search). Lost orthogonality then only repeats converged Ritz values ("ghosts"),
    which leaves the extreme one, the one returned, correct (Paige 1976). ``matvec`` must return a new
    tensor: it is updated in place (one that shares its argument's memory is copied first).
    """
    limit = max(1, min(max_iter, start.numel()))
    capacity = max(2, max_basis) if max_basis is not None else limit
    q = (start / start.norm()).reshape(-1)
    done = 0
    shape = start.shape
    while True:
        # Full re-orthogonalization: rows of one preallocated matrix, so that each pass is two matrix-vector
        # products (one pass over memory each) instead of 4·k elementwise passes. Three-term: a list of vectors,
        # which the allocator can serve from memory already touched (a fresh matrix of several parameter-sized
        # rows is a new mapping, and its page faults cost about two elementwise passes per row).
        rows = min(capacity, limit - done)
        matrix = start.new_empty((rows, start.numel())) if full_reorthogonalization else []
        size = 0
        alphas: list[float] = []
        betas: list[float] = []
        converged = False
        while done < limit and size < rows:
            if full_reorthogonalization:
                matrix[size] = q
            else:
                matrix.append(q)  # q is not written to again
            size += 1
            w = matvec(q.reshape(shape)).reshape(-1)
            if w.untyped_storage().data_ptr() == q.untyped_storage().data_ptr():
                w = w.clone()  # w is updated in place below
            done += 1
            if full_reorthogonalization:
                alphas.append(float(q @ w))
                basis = matrix[:size]
                for _ in range(2):  # classical Gram-Schmidt twice is enough (Kahan, Parlett)
                    w = w - basis.T @ (basis @ w)
            else:
                # Paige's form of the recurrence (the stable one), in place: a new parameter-sized tensor costs
                # its page faults too. w ← Aq − β q_prev, α = ⟨q, w⟩, w ← w − α q.
                if size > 1:
                    w.sub_(matrix[size - 2], alpha=betas[-1])
                alphas.append(float(q @ w))
                w.sub_(q, alpha=alphas[-1])
            beta = float(w.norm())
            tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
            if betas:
                off = torch.tensor(betas, dtype=torch.float64)
                tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
            evals, evecs = torch.linalg.eigh(tridiagonal)
            index = int(evals.abs().argmax())
            theta = evals[index]
            # The Ritz residual: an eigenvalue lies within it of θ. Not the sharper r²/gap: with the gap read
            # from early Ritz values it stopped a Jacobian norm 1 % low, on the second of two close singular values.
            residual = abs(beta * float(evecs[-1, index]))
            if residual <= tol * abs(float(theta)) or beta <= 1e-12 * max(abs(float(theta)), 1e-300):
                converged = True
                break
            betas.append(beta)
            q = w.div_(beta)
        coefficients = evecs[:, index].to(dtype=start.dtype, device=start.device)
        if full_reorthogonalization:
            vector = coefficients @ matrix[:size]  # not matrix.T @ c: a transposed matrix-vector product is slow
        else:
            vector = matrix[0].mul_(coefficients[0])  # the basis is not needed any more
            for coefficient, row in zip(coefficients[1:], matrix[1:]):
                vector.add_(row, alpha=float(coefficient))
        vector = vector.div_(vector.norm())
        if converged or done >= limit:
            return theta.to(dtype=start.dtype, device=start.device), vector.reshape(shape)
        del matrix
        q = vector  # explicit restart from the Ritz vector


# ----------------------------------------------------------------------------------------------------
# operator norms


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
) -> Tensor | tuple[Tensor, Tensor]:
    """‖Dh(w)‖ = σ_max(J) / √N, J = ∂h(x; w)/∂w the ``[N·K, P]`` probe Jacobian, matrix-free.

    Lanczos on J Jᵀ (``[N·K, N·K]``), each product one vjp (reusing one recorded backward) and one jvp; the
    Lanczos basis lives in the N·K output space, so its memory is at most ``max_iter``·N·K numbers
    whatever the parameter count. Returns a 0-dim tensor in the output's dtype. Cost: one forward, then
    one vjp + one jvp per iteration, until the Ritz residual is below ``tol`` (relative, on σ²): 10-40
    iterations on the models of ``benchmarks/monitor_cost.py`` from a random start (the monitor uses
    ``tol=1e-3``). ``start`` (``[N, K]`` or ``[N·K]``, e.g. the direction an earlier call returned with
    ``return_direction=True``: the top left singular vector of J, ``[N, K]``) replaces the random start
    vector (drawn from ``seed``); along training, where J moves little between measurements, Lanczos then
    needs fewer products. With ``return_direction=True`` returns ``(norm, direction)``.
    """
    norm, _, direction = _jacobian_norm_and_output(model, x, params, max_iter=max_iter, tol=tol, seed=seed,
                                                   start=start)
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
    start: Tensor | None = None,
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
        largest, direction = extreme_eigenpair(gram, start, max_iter=max_iter, tol=tol)
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
    the last direction, are ``CAREFUL_HESSIAN`` and ``WARM_HESSIAN`` in ``lightning_lazy.probe``, with their
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
    c and the value ‖D²h[u, u]‖ ≥ |θ|; the last round's would only refine a value already met."""
    u = u / u.norm()
    second = second_derivative(u)
    check_finite(second, "the second derivative of the model on the probe")
    best, best_u = second.norm(), u
    for round_ in range(max_rounds):
        if float(best) == 0.0:
            break
        hessian_vector = _hessian_vector_products(f, params, names, second / second.norm(), unflatten)
        theta, u = extreme_eigenpair(hessian_vector, u, max_iter=max_iter, tol=tol, max_basis=max_basis,
                                     full_reorthogonalization=False)
        if round_ == max_rounds - 1:
            value = theta.abs()
        else:
            second = second_derivative(u)
            value = second.norm()
        gained = float(value) > float(best) * (1 + tol)
        if float(value) > float(best):
            best, best_u = value, u
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

    def product(v: Tensor) -> Tensor:
        if not curved:
            return torch.zeros_like(v)
        direction = unflatten(v)
        with torch.enable_grad():
            parts = torch.autograd.grad([g for _, g in curved], [leaves[k] for k in names],
                                        [direction[names[i]] for i, _ in curved], retain_graph=True, allow_unused=True)
        return torch.cat([(part if part is not None else torch.zeros_like(leaves[k])).reshape(-1)
                          for part, k in zip(parts, names)])

    return product


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

    ``target`` is ``[N, K]`` like the output, or class indices ``[N]`` (one-hot encoded). Small κ means
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
    if jacobian is None:
        # One forward: the output the residual needs is the one recorded for the Jacobian's vjp.
        jac, out, _ = _jacobian_norm_and_output(model, x, params, **(jacobian_kwargs or {}))
    else:
        out = _output(model, x, params)
        check_finite(out, "the model output on the probe")
        jac = jacobian
    target = as_regression_target(out, target.reshape(target.shape[0], -1) if target.is_floating_point() else target)
    residual = (out - target).norm() / math.sqrt(out.shape[0])
    if float(jac) == 0.0:
        raise ValueError("the Jacobian vanishes on the probe: the output does not depend on the parameters there")
    hess = hessian if hessian is not None else hessian_norm(model, x, params, **(hessian_kwargs or {}))
    return Kappa(residual * hess / jac**2, residual, jac, hess)


# ----------------------------------------------------------------------------------------------------
# paths and kernels


def path_divergence(output: Tensor, tangent_output: Tensor, target: Tensor, initial_output: Tensor) -> Tensor:
    """Δ = ‖α h(w(t)) − α h̄(w̄(t))‖_F / ‖y* − α h(w0)‖_F on the probe, all arguments ``[N, K]``.

    ``output`` / ``tangent_output``: the trained model and its linearized twin; ``initial_output``: the
    trained model at initialization. ``target`` may be class indices ``[N]`` (one-hot encoded).
    """
    for name, tensor in (("output", output), ("tangent_output", tangent_output), ("initial_output", initial_output)):
        if tensor.shape != output.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected the output's {tuple(output.shape)}")
        check_finite(tensor, name)
    target = as_regression_target(output, target)
    check_finite(target, "target")
    scale = (target - initial_output).norm()
    if float(scale) == 0.0:
        raise ValueError("the target equals the initial output on the probe: the divergence has no scale")
    return (output - tangent_output).norm() / scale


NTK_IMPLEMENTATIONS = ("auto", "structured", "jacobian", "products")



def _default_chunk(num_params: int, num_outputs: int, budget: int = 1 << 25) -> int:
    # A chunk of c cotangents holds c full parameter-sized gradients: keep c·P under the budget.
    return max(1, min(num_outputs, budget // max(num_params, 1)))


def empirical_ntk(
    model: ModelLike,
    x1: Tensor,
    x2: Tensor | None = None,
    params: Params | None = None,
    *,
    chunk_size: int | None = None,
    implementation: str = "auto",
    trace: bool = False,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> Tensor:
    """The empirical neural tangent kernel Θ(x1, x2) = J(x1) J(x2)ᵀ, J = ∂h(x; w)/∂w at ``params``.

    Shapes: ``[N1·K, N2·K]`` (rows and columns ordered example-major, entry ((i, k), (j, l)) =
    ⟨∂h_k(x1_i)/∂w, ∂h_l(x2_j)/∂w⟩); with ``trace=True`` the output-traced ``[N1, N2]`` kernel
    Σ_k Θ((i, k), (j, k)) (neural-tangents' ``trace_axes=(-1,)`` up to its convention; no 1/K factor).
    Unnormalized, as neural-tangents' empirical kernel; dtype and device of the output. ``x2=None``
    means x2 = x1 (then only the blocks on and above the diagonal are computed).

    ``implementation`` (as neural-tangents' ``NtkImplementation``):

    - ``"structured"`` — Novak, Sohl-Dickstein & Schoenholz, "Fast Finite Width Neural Tangent Kernel"
      (ICML 2022), structured derivatives. One forward of the probe under a ``TorchFunctionMode`` records,
      for every ``F.linear``, ``F.conv1d/2d/3d`` (``groups=1``) and eval-mode ``F.batch_norm`` call whose
      weight or bias is one of ``params``, the layer input x and, by K backward passes (one per output
      unit), the cotangent g at its output. A dense weight's block is then
      Σ_{s,t} ⟨g_ik,s, g_jl,t⟩⟨x_i,s, x_j,t⟩ (s, t: positions sharing the weight, the im2col patches of a
      convolution) — computed either in that form or through the per-example weight Jacobian
      Σ_s g_ik,s ⊗ x_i,s, whichever costs fewer multiply-adds (the choice neural-tangents makes per
      layer); biases and BatchNorm affine parameters through their (small) per-example Jacobians. No
      parameter Jacobian of a wide dense layer is ever formed. Every other parameter — embeddings,
      LayerNorm/GroupNorm, depthwise convolutions, tied weights used in more than one call, parameters
      that reach the output through any other op (e.g. inside ``nn.MultiheadAttention``, whose projections
      are applied by one fused function) — goes through the generic path.
    - ``"jacobian"`` — the generic path for every parameter: per-example Jacobians
      ``vmap(jacrev)`` over examples, chunked over examples and over parameter tensors, contracted.
    - ``"products"`` — the reference: column blocks Jᵀ(x2)E (vmapped vjp of unit cotangents) then J(x1)
      applied to them (vmapped jvp). Cost: N2·K backward passes through the whole probe, so quadratic in
      the number of inputs; memory ``chunk_size`` parameter-sized vectors. Exact whatever the model does.
    - ``"auto"`` (default) — ``"structured"``; ``"products"`` when the examples of the probe interact
      (a ``F.batch_norm`` call in training mode, e.g. a functional model that keeps BatchNorm on batch
      statistics), and for a generic parameter group on which ``vmap`` fails.

    ``"structured"`` and ``"jacobian"`` assume each output row depends on its own input row only (true in
    eval mode; an ``nn.Module`` is always evaluated in eval mode here); they raise ``ValueError`` when a
    training-mode BatchNorm shows otherwise. Their cost is linear in N1 + N2 (K backward passes of the
    probe plus per-layer contractions) as long as the per-example features fit the budget.

    ``memory_budget`` (numbers, i.e. tensor elements; default 2^27 = 1 GiB in float64): the features kept
    for the kernel (layer inputs and cotangents, per-example Jacobians) use at most half of it and the
    recording pass (activations, K cotangents, im2col patches) the other half, by chunking over examples;
    if the features of all inputs do not fit, x2's are recomputed for each block of x1 (cost then grows
    like N1·N2 / block). Estimates are from the shapes seen on the first examples; the kernel itself
    (N1·K·N2·K numbers) and the model's parameters are not counted. For ``"products"`` a quarter of it
    bounds the vjp chunk (``chunk_size`` parameter-sized vectors). A single generic parameter tensor
    whose per-example Jacobian alone exceeds the budget is handled by ``"products"`` for that tensor.

    ``chunk_size``: for ``"products"`` the number of cotangents per vmapped vjp; otherwise the maximal
    number of examples per recording pass. Raises ``ValueError`` on an empty probe, a non-finite output,
    an unknown implementation or a non-positive budget.
    """
    _check_probe(x1)
    symmetric = x2 is None
    x2 = x1 if symmetric else x2
    _check_probe(x2)
    if implementation not in NTK_IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {NTK_IMPLEMENTATIONS}, got {implementation!r}")
    if memory_budget < 1:
        raise ValueError(f"memory_budget is a number of tensor elements and must be positive, got {memory_budget}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    params = _trainable_params(model, params)
    with _evaluating(model):
        if implementation == "products":
            return _ntk_products(model, x1, x2, params, list(params), chunk_size, trace, memory_budget)
        return _ntk_fast(model, x1, x2, symmetric, params, implementation, chunk_size, trace, memory_budget)


def _ntk_products(
    model: ModelLike, x1: Tensor, x2: Tensor, params: Params, names: list[str], chunk: int | None,
    trace: bool, budget: int,
) -> Tensor:
    """J_S(x1) J_S(x2)ᵀ for the parameters ``names`` (the others held fixed), column block by column block."""
    fixed = {k: v for k, v in params.items() if k not in names}
    subset = {k: params[k] for k in names}
    g1, g2 = _as_function(model, x1), _as_function(model, x2)

    def f1(p: Params) -> Tensor:
        return g1({**fixed, **p})

    def f2(p: Params) -> Tensor:
        return g2({**fixed, **p})

    out2, vjp_fn = vjp(f2, subset)
    check_finite(out2, "the model output on the probe")
    n_params = sum(p.numel() for p in subset.values())
    chunk = chunk or _default_chunk(n_params, out2.numel(), max(1, budget // 4))
    kernel = _ntk_columns(f1, f2, subset, out2, vjp_fn, chunk)
    if trace:
        n1, n2, k = kernel.shape[0] // out2.shape[1], out2.shape[0], out2.shape[1]
        kernel = kernel.reshape(n1, k, n2, k).diagonal(dim1=1, dim2=3).sum(-1)
    return kernel


def _ntk_columns(
    f1: Callable[[Params], Tensor], f2: Callable[[Params], Tensor], params: Params, out2: Tensor,
    vjp_fn: Callable, chunk: int,
) -> Tensor:
    """J(x1) J(x2)ᵀ, ``chunk`` columns at a time (``vjp_fn`` is the vjp of ``f2`` at ``params``)."""

    def apply_jacobian(direction: Params) -> Tensor:
        return jvp(f1, (params,), (direction,))[1].reshape(-1)

    columns = out2.numel()
    blocks = []
    eye = torch.eye(columns, dtype=out2.dtype, device=out2.device)
    for start in range(0, columns, chunk):
        cotangents = eye[start : start + chunk].reshape(-1, *out2.shape)
        (directions,) = vmap(vjp_fn)(cotangents)
        blocks.append(vmap(apply_jacobian)(directions))
    return torch.cat(blocks).T.contiguous()


_CONV_DIMS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}


class _LayerCall:
    """One recorded ``F.linear`` / ``F.conv*d`` / ``F.batch_norm`` call on a batched input."""

    __slots__ = ("kind", "weight", "bias", "input", "options", "in_shape", "out_shape")

    def __init__(self, kind: str, weight: str | None, bias: str | None, input: Tensor, options: dict) -> None:
        self.kind, self.weight, self.bias, self.input, self.options = kind, weight, bias, input, options
        self.in_shape = tuple(input.shape[1:])
        self.out_shape: tuple[int, ...] = ()


def _arguments(args: tuple, kwargs: dict, names: tuple[str, ...], defaults: dict) -> dict:
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


def _parse_layer_call(func: Callable, args: tuple, kwargs: dict, ids: dict[int, str]) -> _LayerCall | None:
    """The call as a structured-layer record, or None (not a layer op, unbatched, grouped, training-mode BN)."""

    def name(t: object) -> str | None:
        return ids.get(id(t)) if isinstance(t, Tensor) else None

    if func is F.linear:
        a = _arguments(args, kwargs, ("input", "weight", "bias"), {"bias": None})
        if not isinstance(a["input"], Tensor) or a["input"].dim() < 2 or name(a["input"]):
            return None
        return _LayerCall("linear", name(a["weight"]), name(a["bias"]), a["input"], {})
    if func in _CONV_DIMS:
        dims = _CONV_DIMS[func]
        a = _arguments(
            args, kwargs, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
            {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1},
        )
        x, w = a["input"], a["weight"]
        if not isinstance(x, Tensor) or x.dim() != dims + 2 or a["groups"] != 1 or name(x):
            return None
        options = {"kernel": tuple(w.shape[2:]), "stride": _tuple(a["stride"], dims), "dilation": _tuple(a["dilation"], dims)}
        options["padding"] = _padding(a["padding"], options["kernel"], options["dilation"])
        return _LayerCall("conv", name(w), name(a["bias"]), x, options)
    if func is F.batch_norm:
        a = _arguments(
            args, kwargs, ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
            {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5},
        )
        if a["training"] or a["running_mean"] is None or not isinstance(a["input"], Tensor) or name(a["input"]):
            return None
        options = {"mean": a["running_mean"].detach(), "var": a["running_var"].detach(), "eps": a["eps"]}
        return _LayerCall("batch_norm", name(a["weight"]), name(a["bias"]), a["input"], options)
    return None


def _tuple(value: int | tuple[int, ...], dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * dims


def _padding(padding: object, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """(before, after) zero padding per spatial dimension, as ``F.conv*d`` applies it."""
    if padding == "valid":
        return tuple((0, 0) for _ in kernel)
    if padding == "same":  # torch puts the odd pixel after
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return tuple((t // 2, t - t // 2) for t in totals)
    return tuple((p, p) for p in _tuple(padding, len(kernel)))


def _patches(x: Tensor, options: dict) -> Tensor:
    """im2col of ``x [n, C, *spatial]``: ``[n, S, C·Π kernel]``, S the output positions (any of 1-3 dims)."""
    kernel, stride, dilation, padding = options["kernel"], options["stride"], options["dilation"], options["padding"]
    pad = [p for pair in reversed(padding) for p in pair]
    if any(pad):
        x = F.pad(x, pad)
    dims = len(kernel)
    for d in range(dims):  # each unfold appends the window dimension at the end
        x = x.unfold(2 + d, dilation[d] * (kernel[d] - 1) + 1, stride[d])
        if dilation[d] > 1:
            x = x[..., :: dilation[d]]
    n, channels = x.shape[:2]
    positions = math.prod(x.shape[2 : 2 + dims])
    order = (0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims))
    return x.permute(order).reshape(n, positions, channels * math.prod(kernel))


def _holds_tensor(value: object) -> bool:
    return any(isinstance(leaf, Tensor) for leaf in tree_leaves(value))


class _LayerRecorder(TorchFunctionMode):
    """Records the structured-layer calls of one forward, and which parameters reach other ops.

    With ``taps`` (indexes of calls), the output of each of those calls gets a zero tap added, whose
    gradient is the cotangent at that output (taken before any in-place op that follows), and its input is
    kept.
    """

    def __init__(self, params: Params, taps: set[int] | None = None) -> None:
        super().__init__()
        self.ids = {id(t): name for name, t in params.items()}
        self.taps_wanted = taps or set()
        self.calls: list[_LayerCall] = []
        self.other_uses: set[str] = set()
        self.mixes_examples = False
        self.inputs: dict[int, Tensor] = {}
        self.taps: dict[int, Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch protocol
        kwargs = kwargs or {}
        if func is F.batch_norm and (args[5] if len(args) > 5 else kwargs.get("training", False)):
            self.mixes_examples = True  # batch statistics: each output row depends on the whole batch
        call = _parse_layer_call(func, args, kwargs, self.ids)
        if call is None:
            out = func(*args, **kwargs)
            if self.ids and _holds_tensor(out):
                for leaf in tree_leaves((args, kwargs)):
                    if isinstance(leaf, Tensor) and id(leaf) in self.ids:
                        self.other_uses.add(self.ids[id(leaf)])
            return out
        index = len(self.calls)
        self.calls.append(call)
        out = func(*args, **kwargs)
        call.out_shape = tuple(out.shape[1:])
        known = {call.weight, call.bias}
        for leaf in tree_leaves((args, kwargs)):  # e.g. a parameter used as running statistics
            if isinstance(leaf, Tensor) and id(leaf) in self.ids and self.ids[id(leaf)] not in known:
                self.other_uses.add(self.ids[id(leaf)])
        if index in self.taps_wanted:
            self.inputs[index] = call.input.detach()
            tap = torch.zeros((), dtype=out.dtype, device=out.device, requires_grad=True).expand(out.shape)
            self.taps[index] = tap
            out = out + tap
        call.input = None  # not kept beyond the call unless tapped
        return out


class _Plan(NamedTuple):
    """What the structured pass computes: per tapped call, which of its parameters and in which form."""

    taps: dict[int, tuple[str | None, str | None, str]]  # call index -> (weight, bias, "struct" | "jac")
    calls: list[_LayerCall]
    per_example_features: int
    per_example_transient: int


def _plan_structured(
    recorder: _LayerRecorder, params: Params, n_outputs: int, n1: int, n2: int, trace: bool, feature_budget: int
) -> _Plan:
    counts: dict[str, int] = {}
    for call in recorder.calls:
        for name in (call.weight, call.bias):
            if name is not None:
                counts[name] = counts.get(name, 0) + 1
    eligible = {k for k, c in counts.items() if c == 1 and k not in recorder.other_uses}
    k_out = n_outputs
    pairs = k_out if trace else k_out * k_out
    taps: dict[int, tuple[str | None, str | None, str]] = {}
    features = 0
    transient = 0
    for index, call in enumerate(recorder.calls):
        weight = call.weight if call.weight in eligible else None
        bias = call.bias if call.bias in eligible else None
        transient += math.prod(call.out_shape)  # every call's output is an activation of the pass
        if weight is None and bias is None:
            continue
        out_numel = math.prod(call.out_shape)
        transient += (k_out + 1) * out_numel + math.prod(call.in_shape)
        form = "jac"
        if call.kind == "batch_norm":
            features += k_out * call.out_shape[0] * ((weight is not None) + (bias is not None))
        else:
            if call.kind == "linear":
                o = call.out_shape[-1]
                s = out_numel // o
                p = call.in_shape[-1] + (bias is not None)
            else:
                o = call.out_shape[0]
                s = out_numel // o
                p = params[call.weight].numel() // o + (bias is not None) if call.weight else 0
                transient += s * p  # im2col
            if weight is not None:
                cost_jac = (n1 + n2) * s * k_out * o * p + n1 * n2 * pairs * o * p
                cost_struct = n1 * n2 * s * s * (p + k_out * o) + n1 * n2 * s * pairs * o
                size_jac, size_struct = k_out * o * p, s * (p + k_out * o)
                form = "struct" if cost_struct <= cost_jac or size_jac > feature_budget // 2 else "jac"
                features += size_struct if form == "struct" else size_jac
            if bias is not None and weight is None:
                features += k_out * o
        taps[index] = (weight, bias, form)
    return _Plan(taps, recorder.calls, features, transient)


_Feature = tuple  # ("jac", J [n, K, M]) or ("struct", X [n, S, P], G [n, K, S, O])


def _structured_features(
    model: ModelLike, x: Tensor, params: Params, plan: _Plan, chunk: int
) -> list[list[_Feature]]:
    """Per tapped call, its features on the examples ``x`` (recorded ``chunk`` examples at a time)."""
    pieces: list[list[list[_Feature]]] = []
    for start in range(0, x.shape[0], chunk):
        xc = x[start : start + chunk]
        recorder = _LayerRecorder(params, set(plan.taps))
        with torch.enable_grad(), recorder:
            out = _as_function(model, xc)(params)
        check_finite(out, "the model output on the probe")
        if [c.kind for c in recorder.calls] != [c.kind for c in plan.calls]:
            raise RuntimeError(
                "the model applied a different sequence of layers on another chunk of the probe; use "
                "implementation='products'"
            )
        indexes = list(plan.taps)
        taps = [recorder.taps[i] for i in indexes]
        n, k_out = out.shape
        cotangents = _output_cotangents(out, taps)
        del out, taps, recorder.taps
        chunk_features: list[list[_Feature]] = []
        for slot, index in enumerate(indexes):
            weight, bias, form = plan.taps[index]
            g, cotangents[slot] = cotangents[slot], None
            chunk_features.append(_call_features(plan.calls[index], recorder.inputs.pop(index), g, weight, bias, form))
        pieces.append(chunk_features)
    if len(pieces) == 1:
        return pieces[0]
    return [
        [tuple([entry[0], *(torch.cat([p[slot][e][i] for p in pieces]) for i in range(1, len(entry)))])
         for e, entry in enumerate(pieces[0][slot])]
        for slot in range(len(plan.taps))
    ]


def _output_cotangents(out: Tensor, taps: list[Tensor]) -> list[Tensor]:
    """For each tap, ∂h_k(x_i)/∂tap_i for every output unit k: ``[n, K, *tap.shape[1:]]``.

    One backward per output unit, batched over the K units (``is_grads_batched``, a vmap over the backward
    graph: one wide matrix product per layer instead of K narrow ones); K plain backward passes where an op
    has no batching rule. Rows are independent examples, so the cotangent e_k on every row at once gives
    each example's own derivative.
    """
    n, k_out = out.shape
    eye = torch.eye(k_out, dtype=out.dtype, device=out.device)
    try:
        grads = torch.autograd.grad(
            out, taps, eye[:, None, :].expand(k_out, n, k_out), retain_graph=True, allow_unused=True,
            is_grads_batched=True,
        )
        result = [g.transpose(0, 1) if g is not None else None for g in grads]
    except RuntimeError:  # no batching rule for some op of the backward graph
        per_output: list[list[Tensor]] = [[] for _ in taps]
        for k in range(k_out):
            grads = torch.autograd.grad(out[:, k].sum(), taps, retain_graph=True, allow_unused=True)
            for slot, g in enumerate(grads):
                per_output[slot].append(g)
        result = [None if parts[0] is None else torch.stack(parts, dim=1) for parts in per_output]
    return [
        torch.zeros((n, k_out, *tap.shape[1:]), dtype=out.dtype, device=out.device) if g is None else g
        for g, tap in zip(result, taps)
    ]


def _call_features(
    call: _LayerCall, x: Tensor, g: Tensor, weight: str | None, bias: str | None, form: str
) -> list[_Feature]:
    n, k_out = g.shape[:2]
    features: list[_Feature] = []
    if call.kind == "batch_norm":
        channels = x.shape[1]
        shape = (1, channels) + (1,) * (x.dim() - 2)
        normalized = (x - call.options["mean"].reshape(shape)) / torch.sqrt(call.options["var"].reshape(shape) + call.options["eps"])
        g = g.reshape(n, k_out, channels, -1)
        if weight is not None:
            features.append(("jac", torch.einsum("nkcs,ncs->nkc", g, normalized.reshape(n, channels, -1))))
        if bias is not None:
            features.append(("jac", g.sum(-1)))
        return features
    if call.kind == "linear":
        o = g.shape[-1]
        g = g.reshape(n, k_out, -1, o)  # [n, K, S, O]
        patches = x.reshape(n, -1, x.shape[-1]) if weight is not None else None
    else:
        o = g.shape[2]
        g = g.reshape(n, k_out, o, -1).transpose(2, 3)
        patches = _patches(x, call.options) if weight is not None else None
    if weight is not None and bias is not None:
        # A column of ones appended to the inputs carries the bias: Σ_s g_s ⊗ [x_s, 1] = [J_W, J_b].
        patches = torch.cat([patches, patches.new_ones(patches.shape[:2] + (1,))], dim=2)
    if weight is not None:
        if form == "struct":
            features.append(("struct", patches, g))
        else:
            features.append(("jac", torch.einsum("nkso,nsp->nkop", g, patches).reshape(n, k_out, -1)))
    elif bias is not None:
        features.append(("jac", g.sum(2)))
    return features


def _gram(f1: list[_Feature], f2: list[_Feature], trace: bool, budget: int) -> Tensor:
    """Σ over features of ⟨J1, J2⟩: ``[a, K, b, K]`` (or ``[a, b]`` traced)."""
    total: Tensor | None = None
    for e1, e2 in zip(f1, f2):
        if e1[0] == "jac":
            j1, j2 = e1[1], e2[1]
            a, k_out, m = j1.shape
            b = j2.shape[0]
            if trace:
                part = torch.einsum("akm,bkm->ab", j1, j2)
            else:
                part = (j1.reshape(a * k_out, m) @ j2.reshape(b * k_out, m).T).reshape(a, k_out, b, k_out)
        else:
            part = _struct_gram(e1[1], e1[2], e2[1], e2[2], trace, budget)
        total = part if total is None else total + part
    return total


def _struct_gram(x1: Tensor, g1: Tensor, x2: Tensor, g2: Tensor, trace: bool, budget: int) -> Tensor:
    """Σ_{s,t} ⟨g1_ak,s, g2_bl,t⟩ ⟨x1_a,s, x2_b,t⟩ for x ``[n, S, P]``, g ``[n, K, S, O]``."""
    a, s1 = x1.shape[:2]
    b, s2 = x2.shape[:2]
    k_out, o = g1.shape[1], g1.shape[3]
    if s1 == 1 and s2 == 1:
        inner = x1[:, 0] @ x2[:, 0].T  # [a, b]
        if trace:
            return torch.einsum("ako,bko->ab", g1[:, :, 0], g2[:, :, 0]) * inner
        cot = (g1[:, :, 0].reshape(a * k_out, o) @ g2[:, :, 0].reshape(b * k_out, o).T).reshape(a, k_out, b, k_out)
        return cot * inner[:, None, :, None]
    # Blocks of rows a: [b, (A s), t] @ [b, t, (o l)] then a broadcast product over b. Laid out so that no
    # large intermediate is permuted (3x faster than a plain einsum on VGG's 4x4 maps); a block's
    # intermediate, b·A·S1·O·K numbers, is kept small for the cache (and under the budget).
    per_row = max(1, b * s1 * o * k_out)
    rows = max(1, min(budget, 1 << 22) // per_row)
    g2t = g2.permute(0, 2, 3, 1).reshape(b, s2, o * k_out)  # [b, t, (o l)]
    blocks = []
    for start in range(0, a, rows):
        xa, ga = x1[start : start + rows], g1[start : start + rows]
        n_a = xa.shape[0]
        inner = torch.einsum("asp,btp->bast", xa, x2).reshape(b, n_a * s1, s2)
        mixed = torch.bmm(inner, g2t).reshape(b, n_a, s1 * o, k_out)  # [b, A, (s o), l]
        ga = ga.reshape(n_a, k_out, s1 * o)
        if trace:
            blocks.append(torch.einsum("bAqk,Akq->Ab", mixed, ga))
        else:
            blocks.append(torch.matmul(ga.unsqueeze(0), mixed).permute(1, 2, 0, 3))  # [A, k, b, l]
    return torch.cat(blocks)


def _generic_features(
    model: ModelLike, x: Tensor, params: Params, names: list[str], chunk: int
) -> list[_Feature]:
    """Per-example Jacobians of the outputs w.r.t. ``names``, ``[n, K, Σ sizes]``, by vmap(jacrev) over examples."""
    fixed = {k: v for k, v in params.items() if k not in names}
    subset = {k: params[k] for k in names}

    def single(p: Params, example: Tensor) -> Tensor:
        return _as_function(model, example.unsqueeze(0))({**fixed, **p})[0]

    blocks = []
    for start in range(0, x.shape[0], chunk):
        xc = x[start : start + chunk]
        jac = vmap(jacrev(single), in_dims=(None, 0))(subset, xc)
        n, k_out = xc.shape[0], next(iter(jac.values())).shape[1]
        blocks.append(torch.cat([jac[k].reshape(n, k_out, -1) for k in names], dim=2))
    j = torch.cat(blocks)
    check_finite(j, "the per-example Jacobian on the probe")
    return [("jac", j)]


def _ntk_fast(
    model: ModelLike, x1: Tensor, x2: Tensor, symmetric: bool, params: Params, implementation: str,
    chunk_size: int | None, trace: bool, budget: int,
) -> Tensor:
    """The "structured" / "jacobian" / "auto" implementations of :func:`empirical_ntk`."""
    pilot = _LayerRecorder(params)
    with torch.no_grad(), pilot:
        out = _as_function(model, x1[: min(2, x1.shape[0])])(params)
    check_finite(out, "the model output on the probe")
    if pilot.mixes_examples:
        if implementation == "auto":
            return _ntk_products(model, x1, x2, params, list(params), chunk_size, trace, budget)
        raise ValueError(
            "the model calls BatchNorm in training mode, so each output depends on the whole probe batch; the "
            f"{implementation!r} NTK assumes it does not: use implementation='products' (or BatchNorm in eval mode)"
        )
    k_out = out.shape[1]
    n1, n2 = x1.shape[0], 0 if symmetric else x2.shape[0]
    feature_budget, transient_budget = max(1, budget // 2), max(1, budget // 2)
    passes: list[tuple[Callable[[Tensor], list[_Feature]], int]] = []  # (features of some examples, numbers/example)
    structured: set[str] = set()
    if implementation != "jacobian":
        plan = _plan_structured(pilot, params, k_out, n1, n2 or n1, trace, feature_budget)
        if plan.taps:
            for weight, bias, _ in plan.taps.values():
                structured.update(name for name in (weight, bias) if name is not None)
            chunk = chunk_size or max(1, transient_budget // max(1, plan.per_example_transient + plan.per_example_features))

            def structured_pass(x: Tensor, plan: _Plan = plan, chunk: int = chunk) -> list[_Feature]:
                return [entry for call in _structured_features(model, x, params, plan, chunk) for entry in call]

            passes.append((structured_pass, plan.per_example_features))
    activations = max(1, sum(math.prod(c.out_shape) for c in pilot.calls))
    kernel_parts: list[Tensor] = []
    group: list[str] = []
    group_size = 0
    groups: list[list[str]] = []
    oversized: list[str] = []
    for name in (k for k in params if k not in structured):
        size = k_out * params[name].numel()
        if size > feature_budget // 2:
            oversized.append(name)
            continue
        if group and group_size + size > feature_budget // 2:
            groups.append(group)
            group, group_size = [], 0
        group.append(name)
        group_size += size
    if group:
        groups.append(group)
    for names in groups:
        per_example = k_out * sum(params[k].numel() for k in names)
        chunk = chunk_size or max(1, transient_budget // (per_example + k_out * activations))

        def generic_pass(x: Tensor, names: list[str] = names, chunk: int = chunk) -> list[_Feature]:
            return _generic_features(model, x, params, names, chunk)

        if implementation == "auto":
            try:  # one example first: a model vmap cannot batch falls back to products for these parameters
                generic_pass(x1[:1])
            except (RuntimeError, NotImplementedError, ValueError) as error:
                if "non-finite" in str(error):
                    raise
                oversized.extend(names)
                continue
        passes.append((generic_pass, per_example))
    for compute, per_example in passes:
        kernel_parts.append(_blocked_kernel(compute, x1, x2, symmetric, per_example, feature_budget, trace, transient_budget))
    if oversized:
        kernel_parts.append(_ntk_products(model, x1, x2, params, oversized, None, trace, budget))
    kernel = kernel_parts[0]
    for part in kernel_parts[1:]:
        kernel = kernel + part.reshape(kernel.shape)
    return kernel


def _blocked_kernel(
    compute: Callable[[Tensor], list[_Feature]], x1: Tensor, x2: Tensor, symmetric: bool, per_example: int,
    feature_budget: int, trace: bool, transient_budget: int,
) -> Tensor:
    """Σ over features of J(x1) J(x2)ᵀ, from ``compute``'s per-example features, keeping at most
    ``feature_budget`` numbers of features at once (x2's recomputed per block of x1 if they do not all fit)."""
    n1, n2 = x1.shape[0], x2.shape[0]
    together = n1 if symmetric else n1 + n2
    if together * per_example <= feature_budget:
        f1 = compute(x1)
        f2 = f1 if symmetric else compute(x2)
        kernel = _gram(f1, f2, trace, transient_budget)
    else:
        block = max(1, feature_budget // max(1, 2 * per_example))
        starts1 = list(range(0, n1, block))
        rows = []
        for i, s1 in enumerate(starts1):
            f1 = compute(x1[s1 : s1 + block])
            row = []
            for s2 in range(0, n2, block):
                if symmetric and s2 < s1:
                    row.append(None)  # filled from the transposed block below
                    continue
                f2 = f1 if symmetric and s2 == s1 else compute(x2[s2 : s2 + block])
                row.append(_gram(f1, f2, trace, transient_budget))
            rows.append(row)
        for i in range(len(rows)):
            for j in range(len(rows[i])):
                if rows[i][j] is None:
                    t = rows[j][i]
                    rows[i][j] = t.T if trace else t.permute(2, 3, 0, 1)
        kernel = torch.cat([torch.cat(row, dim=2 if not trace else 1) for row in rows], dim=0)
    if trace:
        return kernel
    a, k_out = kernel.shape[:2]
    return kernel.reshape(a * k_out, -1)


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


# ----------------------------------------------------------------------------------------------------
# weights and activations


class Displacement(NamedTuple):
    """``total`` = ‖w − w0‖/‖w0‖; ``per_tensor`` = ‖w_p − w0_p‖/‖w0_p‖ for tensors with w0_p ≠ 0;
    ``absolute`` = ‖w_p − w0_p‖ for every tensor (zero-initialized biases have no relative scale)."""

    total: Tensor
    per_tensor: dict[str, Tensor]
    absolute: dict[str, Tensor]


def displacement(params: Params, initial_params: Params) -> Displacement:
    """Relative distance of the weights from initialization, overall and per parameter tensor."""
    if set(params) != set(initial_params):
        missing = sorted(set(params) ^ set(initial_params))
        raise ValueError(f"params and initial_params name different tensors: {missing[:5]}")
    if not params:
        raise ValueError("params is empty")
    absolute: dict[str, Tensor] = {}
    per_tensor: dict[str, Tensor] = {}
    moved_sq = None
    initial_sq = None
    for name, w in params.items():
        w0 = initial_params[name]
        if w.shape != w0.shape:
            raise ValueError(f"{name}: shape {tuple(w.shape)} differs from its initial {tuple(w0.shape)}")
        diff = (w.detach() - w0.detach()).norm()
        scale = w0.detach().norm()
        absolute[name] = diff
        if float(scale) > 0:
            per_tensor[name] = diff / scale
        moved_sq = diff**2 if moved_sq is None else moved_sq + diff**2
        initial_sq = scale**2 if initial_sq is None else initial_sq + scale**2
    if float(initial_sq) == 0.0:
        raise ValueError("all initial parameters are zero: the relative displacement has no scale")
    return Displacement(torch.sqrt(moved_sq / initial_sq), per_tensor, absolute)


_RELU_FUNCTIONS = {
    torch.relu,
    torch.relu_,
    torch.nn.functional.relu,
    torch.nn.functional.relu_,
    Tensor.relu,
    Tensor.relu_,
}


class _ReluRecorder(TorchFunctionMode):
    """Records, for every ReLU call (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``x.relu()``), which units are on."""

    def __init__(self) -> None:
        super().__init__()
        self.states: list[Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch protocol
        if func in _RELU_FUNCTIONS and args and isinstance(args[0], Tensor):
            self.states.append(args[0].detach() > 0)  # before the call: relu_ overwrites its input
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def recording_relu_states() -> Iterator[list[Tensor]]:
    """Within the block, the on/off state (bool) of every ReLU unit any forward computes is appended to the
    list yielded, one tensor per ReLU call in call order. For a forward whose output is needed anyway (the
    divergence's, say): its activation states then cost no forward of their own."""
    recorder = _ReluRecorder()
    with recorder:
        yield recorder.states


def relu_states(model: ModelLike, x: Tensor, params: Params) -> list[Tensor]:
    """On/off state (``pre-activation > 0``, bool) of every ReLU unit on the probe ``x`` at ``params``, one
    tensor per ReLU call in call order (one no-grad forward). Compute it once at w0 and pass it to
    :func:`activation_stability` as ``initial_states``: each later measurement then costs one forward."""
    _check_probe(x)
    with recording_relu_states() as states:
        _output(model, x, params)
    return states


def activation_stability(
    model: ModelLike,
    x: Tensor,
    params: Params,
    initial_params: Params | None = None,
    *,
    initial_states: list[Tensor] | None = None,
) -> Tensor:
    """Share of ReLU units, over all ReLU calls and probe inputs, whose on/off state at ``params``
    equals the one at ``initial_params``: (1/U) Σ_units 1[pre-activation(w) > 0 ⇔ pre-activation(w0) > 0].

    Every ReLU is seen, whether an ``nn.ReLU`` module or a functional ``F.relu`` / ``torch.relu`` /
    ``Tensor.relu`` call (a ``TorchFunctionMode`` records them in call order). Other activations
    (GELU, LeakyReLU, ...) are not counted; a model with no ReLU is an error. ``initial_states`` (from
    :func:`relu_states` at w0) replaces ``initial_params``: one forward of the probe instead of two. Memory:
    one bool per unit and probe example (U numbers), kept at w0.
    """
    _check_probe(x)
    if initial_states is None:
        if initial_params is None:
            raise ValueError("activation_stability needs initial_params or initial_states")
        initial_states = relu_states(model, x, initial_params)
    then = initial_states
    if not then:
        raise ValueError(
            "the model applies no ReLU (nn.ReLU, F.relu, torch.relu or Tensor.relu) on the probe, so "
            "activation stability is undefined"
        )
    now = relu_states(model, x, params)
    if len(now) != len(then) or any(a.shape != b.shape for a, b in zip(now, then)):
        raise ValueError("the model applied a different sequence of ReLUs at params and at initial_params")
    same = sum(int((a == b).sum()) for a, b in zip(now, then))
    total = sum(a.numel() for a in now)
    return torch.tensor(same / total, dtype=x.dtype if x.is_floating_point() else torch.float64)
