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


def _ntk_products_by_group(
    model: ModelLike, x1: Tensor, x2: Tensor, params: Params, groups: dict[str, str], names: list[str],
    chunk: int | None, trace: bool, budget: int, symmetric: bool = False,
) -> dict[str, Tensor]:
    """:func:`_ntk_products` for each group of the parameters ``names`` separately: ``{group: its block}``.

    With ``symmetric`` (x2 = x1) and several groups, or columns that take few chunks, the blocks come from the
    vjps alone (:func:`_ntk_gram_by_group`) when that takes fewer passes than a vjp and a jvp per group.
    """
    by_group: dict[str, list[str]] = {}
    for name in names:
        by_group.setdefault(groups[name], []).append(name)
    if symmetric:
        subset = {k: params[k] for k in names}
        fixed = {k: v for k, v in params.items() if k not in names}
        g = _as_function(model, x1)

        def f(p: Params) -> Tensor:
            return g({**fixed, **p})

        out, vjp_fn = vjp(f, subset)
        check_finite(out, "the model output on the probe")
        n_params = sum(p.numel() for p in subset.values())
        # Two chunks of directions are held at once: each gets half of the quarter the single-chunk route uses.
        pair_chunk = chunk or _default_chunk(n_params, out.numel(), max(1, budget // 8))
        single_chunk = chunk or _default_chunk(n_params, out.numel(), max(1, budget // 4))
        pairs = -(-out.numel() // pair_chunk)
        singles = -(-out.numel() // single_chunk)
        if pairs * (pairs + 1) // 2 < singles * 2 * len(by_group):  # vjp chunks against vjp + jvp chunks per group
            kernels = _ntk_gram_by_group(vjp_fn, out, by_group, pair_chunk)
            if trace:
                n, k = out.shape[0], out.shape[1]
                kernels = {group: kernel.reshape(n, k, n, k).diagonal(dim1=1, dim2=3).sum(-1)
                           for group, kernel in kernels.items()}
            return kernels
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
