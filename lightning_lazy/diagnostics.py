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
from collections.abc import Callable
from typing import NamedTuple, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp, vmap
from torch.overrides import TorchFunctionMode

from lightning_lazy._params import check_finite, eval_mode
from lightning_lazy.scaling import as_regression_target

Params = dict[str, Tensor]
FunctionalModel = Callable[[Params, Tensor], Tensor]
ModelLike = Union[nn.Module, FunctionalModel]

__all__ = [
    "Displacement",
    "Kappa",
    "activation_stability",
    "displacement",
    "empirical_ntk",
    "hessian_norm",
    "jacobian_norm",
    "kappa",
    "kernel_alignment",
    "ntk_distance",
    "path_divergence",
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


def _evaluating(model: ModelLike) -> contextlib.AbstractContextManager[None]:
    return eval_mode(model) if isinstance(model, nn.Module) else contextlib.nullcontext()


def _random_like(reference: Tensor, seed: int) -> Tensor:
    # Drawn on the CPU from a fixed seed: the measures are reproducible (a resumed run logs the same
    # values) and do not consume the training RNG.
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(reference.shape, generator=generator, dtype=reference.dtype).to(reference.device)


# ----------------------------------------------------------------------------------------------------
# Lanczos


def extreme_eigenpair(
    matvec: Callable[[Tensor], Tensor], start: Tensor, max_iter: int = 100, tol: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """Eigenvalue of largest magnitude of a symmetric operator, and its unit eigenvector, by Lanczos.

    Full re-orthogonalization: the basis (``max_iter`` vectors shaped like ``start``) is kept, which
    also gives the Ritz vector. Stops when the error bound min(r, r²/gap) of the extreme Ritz value θ
    falls below ``tol·|θ|`` (r = β_k |s_k| the Ritz residual, gap the distance to the next Ritz value),
    or when the Krylov space is exhausted. Converges like a Chebyshev polynomial: far faster than power
    iteration when the top two eigenvalues are close.
    """
    basis: list[Tensor] = []
    alphas: list[float] = []
    betas: list[float] = []
    q = start / start.norm()
    for _ in range(min(max_iter, start.numel())):
        basis.append(q)
        w = matvec(q)
        alphas.append(float((q * w).sum()))
        for _ in range(2):  # twice is enough (Kahan, Parlett)
            for b in basis:
                w = w - (b * w).sum() * b
        beta = float(w.norm())
        tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(tridiagonal)
        index = int(evals.abs().argmax())
        theta = evals[index]
        residual = abs(beta * float(evecs[-1, index]))
        others = torch.cat([evals[:index], evals[index + 1 :]])
        gap = float((others - theta).abs().min()) if others.numel() else 0.0
        bound = min(residual, residual**2 / gap) if gap > 0 else residual
        if bound <= tol * abs(float(theta)) or beta <= 1e-12 * max(abs(float(theta)), 1e-300):
            break
        betas.append(beta)
        q = w / beta
    coefficients = evecs[:, index].to(dtype=start.dtype, device=start.device)
    vector = sum(c * b for c, b in zip(coefficients, basis))
    return theta.to(dtype=start.dtype, device=start.device), vector / vector.norm()


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
) -> Tensor:
    """‖Dh(w)‖ = σ_max(J) / √N, J = ∂h(x; w)/∂w the ``[N·K, P]`` probe Jacobian, matrix-free.

    Lanczos on J Jᵀ (``[N·K, N·K]``), each product one vjp (reusing one recorded backward) and one jvp.
    Returns a 0-dim tensor in the output's dtype.
    """
    _check_probe(x)
    params = _trainable_params(model, params)
    with _evaluating(model):
        f = _as_function(model, x)
        out, vjp_fn = vjp(f, params)
        check_finite(out, "the model output on the probe")

        def gram(u: Tensor) -> Tensor:
            (direction,) = vjp_fn(u)
            return jvp(f, (params,), (direction,))[1]

        largest, _ = extreme_eigenpair(gram, _random_like(out, seed), max_iter=max_iter, tol=tol)
    return torch.sqrt(largest.clamp_min(0) / out.shape[0])


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
) -> Tensor | tuple[Tensor, Tensor]:
    """‖D²h(w)‖ = sup_{‖u‖=1} ‖D²h(w)[u, u]‖ / √N, matrix-free (a lower bound that converges to it).

    sup_u ‖D²h[u, u]‖ = sup_{u, c unit} ⟨c, D²h[u, u]⟩ = sup_c |λ|_max(H_c), H_c = Σₖ cₖ Hₖ, so we
    alternate: u ← extreme eigenvector of H_c (Lanczos with Hessian-vector products H_c v, computed
    forward-over-reverse), then c ← D²h[u, u] / ‖D²h[u, u]‖ (forward-over-forward). Each round can only
    increase ‖D²h[u, u]‖; it stops when a round gains less than ``tol`` (relative) or after
    ``max_rounds``. With several outputs the alternation can stop at a local maximum, so it is run from
    ``restarts`` random starts and the largest value is kept. The value returned is ‖D²h[u, u]‖ at a
    unit u, so it never exceeds the true norm. Memory: ``max_iter`` parameter-sized Lanczos vectors.

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
        value, direction = max(
            (_alternate(f, params, second_derivative, unflatten, names, u, max_iter, max_rounds, tol) for u in starts),
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
) -> Tensor:
    """One start of the alternation of :func:`hessian_norm`: the largest ‖D²h[u, u]‖ met (not / √N), and u."""
    u = u / u.norm()
    second = second_derivative(u)
    check_finite(second, "the second derivative of the model on the probe")
    best, best_u = second.norm(), u
    for _ in range(max_rounds):
        if float(best) == 0.0:
            break
        cotangent = second / best

        def weighted_gradient(p: Params, c: Tensor = cotangent) -> Params:
            return vjp(f, p)[1](c)[0]

        def hessian_vector(v: Tensor) -> Tensor:
            product = jvp(weighted_gradient, (params,), (unflatten(v),))[1]
            return torch.cat([product[k].reshape(-1) for k in names])

        _, u = extreme_eigenpair(hessian_vector, u, max_iter=max_iter, tol=tol)
        second = second_derivative(u)
        value = second.norm()
        gained = float(value) > float(best) * (1 + tol)
        if float(value) > float(best):
            best, best_u = value, u
        if not gained:
            break
    return best, best_u


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
) -> Kappa:
    """κ_h(w) = ‖h(w) − y*‖ · ‖D²h(w)‖ / ‖Dh(w)‖², the laziness ratio of the model actually trained.

    ``hessian_kwargs`` go to :func:`hessian_norm`; ``hessian`` is a ‖D²h(w)‖ already computed (for
    instance warm-started along training), used instead.

    ``target`` is ``[N, K]`` like the output, or class indices ``[N]`` (one-hot encoded). Small κ means
    the model reaches the target before its Jacobian changes: training is lazy (Theorem 2.3 of the
    paper). For an α-scaled model pass the scaled model itself (κ of α·h falls like 1/α).
    """
    _check_probe(x)
    params = _trainable_params(model, params)
    with _evaluating(model), torch.no_grad():
        out = _as_function(model, x)(params)
    check_finite(out, "the model output on the probe")
    target = as_regression_target(out, target.reshape(target.shape[0], -1) if target.is_floating_point() else target)
    residual = (out - target).norm() / math.sqrt(out.shape[0])
    jac = jacobian_norm(model, x, params, **(jacobian_kwargs or {}))
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


def _default_chunk(num_params: int, num_outputs: int, budget: int = 1 << 25) -> int:
    # A chunk of c cotangents holds c full parameter-sized gradients: keep c·P under ~32M numbers.
    return max(1, min(num_outputs, budget // max(num_params, 1)))


def empirical_ntk(
    model: ModelLike,
    x1: Tensor,
    x2: Tensor | None = None,
    params: Params | None = None,
    *,
    chunk_size: int | None = None,
) -> Tensor:
    """Θ(x1, x2) = J(x1) J(x2)ᵀ, shape ``[N1·K, N2·K]`` (rows/columns ordered example-major).

    Column block by column block: Jᵀ(x2) E for a chunk of unit cotangents E (vmapped vjp), then J(x1)
    applied to it (vmapped jvp). Memory: ``chunk_size`` parameter-sized vectors, never the Jacobian.
    Unnormalized, as neural-tangents' empirical kernel.
    """
    _check_probe(x1)
    x2 = x1 if x2 is None else x2
    _check_probe(x2)
    params = _trainable_params(model, params)
    with _evaluating(model):
        f1, f2 = _as_function(model, x1), _as_function(model, x2)
        out2, vjp_fn = vjp(f2, params)
        check_finite(out2, "the model output on the probe")
        n_params = sum(p.numel() for p in params.values())
        chunk = chunk_size or _default_chunk(n_params, out2.numel())
        return _ntk_columns(f1, f2, params, out2, vjp_fn, chunk)


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
    return (kernel * initial_kernel).sum() / (kernel.norm() * initial_kernel.norm())


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


def _relu_states(model: ModelLike, x: Tensor, params: Params) -> list[Tensor]:
    recorder = _ReluRecorder()
    with torch.no_grad(), recorder:
        _as_function(model, x)(params)
    return recorder.states


def activation_stability(model: ModelLike, x: Tensor, params: Params, initial_params: Params) -> Tensor:
    """Share of ReLU units, over all ReLU calls and probe inputs, whose on/off state at ``params``
    equals the one at ``initial_params``: (1/U) Σ_units 1[pre-activation(w) > 0 ⇔ pre-activation(w0) > 0].

    Every ReLU is seen, whether an ``nn.ReLU`` module or a functional ``F.relu`` / ``torch.relu`` /
    ``Tensor.relu`` call (a ``TorchFunctionMode`` records them in call order). Other activations
    (GELU, LeakyReLU, ...) are not counted; a model with no ReLU is an error.
    """
    _check_probe(x)
    with _evaluating(model):
        now = _relu_states(model, x, {k: v.detach() for k, v in params.items()})
        then = _relu_states(model, x, {k: v.detach() for k, v in initial_params.items()})
    if not then:
        raise ValueError(
            "the model applies no ReLU (nn.ReLU, F.relu, torch.relu or Tensor.relu) on the probe, so "
            "activation stability is undefined"
        )
    if len(now) != len(then) or any(a.shape != b.shape for a, b in zip(now, then)):
        raise ValueError("the model applied a different sequence of ReLUs at params and at initial_params")
    same = sum(int((a == b).sum()) for a, b in zip(now, then))
    total = sum(a.numel() for a in now)
    return torch.tensor(same / total, dtype=x.dtype if x.is_floating_point() else torch.float64)
