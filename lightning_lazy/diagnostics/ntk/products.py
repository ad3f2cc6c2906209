"""Empirical NTK by Jacobian products: column blocks Jᵀ(x2)E by vmapped vjp, then J(x1) by vmapped jvp."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap

from lightning_lazy._params import check_finite
from lightning_lazy.diagnostics._common import (
    ModelLike,
    Params,
    _as_function,
)


def _default_chunk(num_params: int, num_outputs: int, budget: int = 1 << 25) -> int:
    # A chunk of c cotangents holds c full parameter-sized gradients: keep c·P under the budget.
    return max(1, min(num_outputs, budget // max(num_params, 1)))


def _restricted(model: ModelLike, x: Tensor, params: Params, names: list[str]) -> tuple[Callable[[Params], Tensor], Params]:
    """The model on ``x`` as a function of the parameters ``names`` alone (the others held fixed), and their values."""
    fixed = {k: v for k, v in params.items() if k not in names}
    g = _as_function(model, x)

    def f(p: Params) -> Tensor:
        return g({**fixed, **p})

    return f, {k: params[k] for k in names}


def _checked_vjp(f: Callable[[Params], Tensor], subset: Params) -> tuple[Tensor, Callable, int]:
    """``f``'s output at ``subset`` (checked finite), its vjp, and the number of parameters in ``subset``."""
    out, vjp_fn = vjp(f, subset)
    check_finite(out, "the model output on the probe")
    return out, vjp_fn, sum(p.numel() for p in subset.values())


def _traced(kernel: Tensor, k: int) -> Tensor:
    """``[n1·k, n2·k]`` → the output-traced ``[n1, n2]``: Σ_k Θ((i, k), (j, k))."""
    n1, n2 = kernel.shape[0] // k, kernel.shape[1] // k
    return kernel.reshape(n1, k, n2, k).diagonal(dim1=1, dim2=3).sum(-1)


def _ntk_products(
    model: ModelLike, x1: Tensor, x2: Tensor, params: Params, names: list[str], chunk: int | None,
    trace: bool, budget: int,
) -> Tensor:
    """J_S(x1) J_S(x2)ᵀ for the parameters ``names`` (the others held fixed), column block by column block."""
    f1, subset = _restricted(model, x1, params, names)
    f2, _ = _restricted(model, x2, params, names)
    return _columns_kernel(f1, f2, subset, *_checked_vjp(f2, subset), chunk, trace, budget)


def _columns_kernel(
    f1: Callable[[Params], Tensor], f2: Callable[[Params], Tensor], subset: Params, out2: Tensor, vjp_fn: Callable,
    n_params: int, chunk: int | None, trace: bool, budget: int,
) -> Tensor:
    """:func:`_ntk_columns` with its chunk from the budget (a quarter of it for ``chunk`` parameter-sized vectors),
    output-traced when asked."""
    chunk = chunk or _default_chunk(n_params, out2.numel(), max(1, budget // 4))
    kernel = _ntk_columns(f1, f2, subset, out2, vjp_fn, chunk)
    return _traced(kernel, out2.shape[1]) if trace else kernel


def _ntk_products_by_group(
    model: ModelLike, x1: Tensor, x2: Tensor, params: Params, groups: dict[str, str], names: list[str],
    chunk: int | None, trace: bool, budget: int, symmetric: bool = False,
) -> dict[str, Tensor]:
    """:func:`_ntk_products` for each group of the parameters ``names`` separately: ``{group: its block}``.

    With ``symmetric`` (x2 = x1) and several groups, or columns that take few chunks, the blocks come from the
    vjps alone (:func:`_ntk_gram_by_group`) when that takes fewer passes than a vjp and a jvp per group; one group
    otherwise reuses the vjp computed to decide.
    """
    by_group: dict[str, list[str]] = {}
    for name in names:
        by_group.setdefault(groups[name], []).append(name)
    if symmetric:
        f, subset = _restricted(model, x1, params, names)
        out, vjp_fn, n_params = _checked_vjp(f, subset)
        # Two chunks of directions are held at once: each gets half of the quarter the single-chunk route uses.
        pair_chunk = chunk or _default_chunk(n_params, out.numel(), max(1, budget // 8))
        single_chunk = chunk or _default_chunk(n_params, out.numel(), max(1, budget // 4))
        pairs = -(-out.numel() // pair_chunk)
        singles = -(-out.numel() // single_chunk)
        if pairs * (pairs + 1) // 2 < singles * 2 * len(by_group):  # vjp chunks against vjp + jvp chunks per group
            kernels = _ntk_gram_by_group(vjp_fn, out, by_group, pair_chunk)
            return {group: _traced(kernel, out.shape[1]) for group, kernel in kernels.items()} if trace else kernels
        if len(by_group) == 1:
            return {next(iter(by_group)): _columns_kernel(f, f, subset, out, vjp_fn, n_params, chunk, trace, budget)}
    return {group: _ntk_products(model, x1, x2, params, members, chunk, trace, budget)
            for group, members in by_group.items()}


def _ntk_gram_by_group(vjp_fn: Callable, out: Tensor, by_group: dict[str, list[str]], chunk: int) -> dict[str, Tensor]:
    """Θ_g = J_g J_gᵀ for each group g of parameters, from the rows of Jᵀ alone: Θ_g[c, c'] = ⟨J_gᵀe_c, J_gᵀe_c'⟩.

    ``vjp_fn`` is the vjp of the model at the parameters (output ``out``, ``[N, K]``); the unit cotangents e_c are
    taken ``chunk`` at a time, and every pair of chunks (a, b ≥ a) gives the blocks [a, b] and [b, a] = [a, b]ᵀ:
    ``B(B+1)/2`` vmapped vjps for ``B`` chunks, no jvp, whatever the number of groups. Shapes ``[N·K, N·K]``.
    """
    columns = out.numel()
    eye = torch.eye(columns, dtype=out.dtype, device=out.device)
    starts = list(range(0, columns, chunk))

    def directions(start: int) -> dict[str, Tensor]:
        (rows,) = vmap(vjp_fn)(eye[start : start + chunk].reshape(-1, *out.shape))
        return {name: value.reshape(value.shape[0], -1) for name, value in rows.items()}

    kernels = {group: out.new_zeros(columns, columns) for group in by_group}
    for i, a in enumerate(starts):
        rows_a = directions(a)
        for b in starts[i:]:
            rows_b = rows_a if b == a else directions(b)
            for group, members in by_group.items():
                block = sum(rows_a[name] @ rows_b[name].T for name in members)
                kernels[group][a : a + block.shape[0], b : b + block.shape[1]] = block
                kernels[group][b : b + block.shape[1], a : a + block.shape[0]] = block.T
    return kernels


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
