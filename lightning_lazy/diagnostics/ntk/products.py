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
    chunk: int | None, trace: bool, budget: int,
) -> dict[str, Tensor]:
    """:func:`_ntk_products` for each group of the parameters ``names`` separately: ``{group: its block}``."""
    by_group: dict[str, list[str]] = {}
    for name in names:
        by_group.setdefault(groups[name], []).append(name)
    return {group: _ntk_products(model, x1, x2, params, members, chunk, trace, budget)
            for group, members in by_group.items()}


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
