"""Empirical NTK from per-example Jacobians (vmap(jacrev)), and the driver that blocks features under a memory budget."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import jacrev, vmap

from lightning_lazy._params import check_finite
from lightning_lazy.diagnostics._common import (
    ModelLike,
    Params,
    _as_function,
)
from lightning_lazy.diagnostics.ntk.products import _ntk_products_by_group
from lightning_lazy.diagnostics.ntk.structured import (
    _Feature,
    _gram,
    _LayerRecorder,
    _Plan,
    _feature_groups,
    _plan_structured,
    _structured_features,
)


def _generic_features(
    model: ModelLike, x: Tensor, params: Params, names: list[str], chunk: int, groups: dict[str, str] | None = None,
) -> list[_Feature]:
    """Per-example Jacobians of the outputs w.r.t. ``names``, ``[n, K, Σ sizes]``, by vmap(jacrev) over examples:
    one feature per group of ``groups`` (in the order the groups first appear in ``names``; one in all without)."""
    fixed = {k: v for k, v in params.items() if k not in names}
    subset = {k: params[k] for k in names}

    def single(p: Params, example: Tensor) -> Tensor:
        return _as_function(model, example.unsqueeze(0))({**fixed, **p})[0]

    members: dict[str, list[str]] = {}
    for name in names:
        members.setdefault(groups[name] if groups else "", []).append(name)
    blocks: list[list[Tensor]] = [[] for _ in members]
    for start in range(0, x.shape[0], chunk):
        xc = x[start : start + chunk]
        jac = vmap(jacrev(single), in_dims=(None, 0))(subset, xc)
        n, k_out = xc.shape[0], next(iter(jac.values())).shape[1]
        for slot, group_names in enumerate(members.values()):
            blocks[slot].append(torch.cat([jac[k].reshape(n, k_out, -1) for k in group_names], dim=2))
    features: list[_Feature] = []
    for parts in blocks:
        j = torch.cat(parts)
        check_finite(j, "the per-example Jacobian on the probe")
        features.append(("jac", j))
    return features


def _group_order(names: list[str], groups: dict[str, str]) -> list[str]:
    """The distinct groups of ``names``, in the order they first appear."""
    return list(dict.fromkeys(groups[name] for name in names))


def _ntk_fast(
    model: ModelLike, x1: Tensor, x2: Tensor, symmetric: bool, params: Params, implementation: str,
    chunk_size: int | None, trace: bool, budget: int, groups: dict[str, str],
) -> dict[str, Tensor]:
    """The "structured" / "jacobian" / "auto" implementations of :func:`empirical_ntk`: ``{group: kernel block}``
    (``groups`` maps each parameter name to its group)."""
    # Two examples where there are (x2's second when x1 has one): a layer input whose first dimension is not the
    # number of examples (a lookup broadcast over the batch) shows itself only on more than one.
    sample = x1[:2] if x1.shape[0] > 1 or symmetric else torch.cat([x1[:1], x2[:1]])
    pilot = _LayerRecorder(params, batch=sample.shape[0])
    with torch.no_grad(), pilot:
        out = _as_function(model, sample)(params)
    check_finite(out, "the model output on the probe")
    if pilot.mixes_examples:
        if implementation == "auto":
            return _ntk_products_by_group(model, x1, x2, params, groups, list(params), chunk_size, trace, budget)
        raise ValueError(
            "the model calls BatchNorm in training mode, so each output depends on the whole probe batch; the "
            f"{implementation!r} NTK assumes it does not: use implementation='products' (or BatchNorm in eval mode)"
        )
    k_out = out.shape[1]
    n1, n2 = x1.shape[0], 0 if symmetric else x2.shape[0]
    feature_budget, transient_budget = max(1, budget // 2), max(1, budget // 2)
    # (features of some examples, numbers per example, the group of each feature)
    passes: list[tuple[Callable[[Tensor], list[_Feature]], int, list[str]]] = []
    structured: set[str] = set()
    if implementation != "jacobian":
        plan = _plan_structured(pilot, params, k_out, n1, n2 or n1, trace, feature_budget, groups)
        if plan.taps:
            for weight, bias, _ in plan.taps.values():
                structured.update(name for name in (weight, bias) if name is not None)
            chunk = chunk_size or max(1, transient_budget // max(1, plan.per_example_transient + plan.per_example_features))

            def structured_pass(x: Tensor, plan: _Plan = plan, chunk: int = chunk) -> list[_Feature]:
                return [entry for call in _structured_features(model, x, params, plan, chunk) for entry in call]

            passes.append((structured_pass, plan.per_example_features, _feature_groups(plan, groups)))
    activations = max(1, sum(math.prod(c.out_shape) for c in pilot.calls))
    group: list[str] = []
    group_size = 0
    chunks: list[list[str]] = []
    oversized: list[str] = []
    for name in (k for k in params if k not in structured):
        size = k_out * params[name].numel()
        if size > feature_budget // 2:
            oversized.append(name)
            continue
        if group and group_size + size > feature_budget // 2:
            chunks.append(group)
            group, group_size = [], 0
        group.append(name)
        group_size += size
    if group:
        chunks.append(group)
    for names in chunks:
        per_example = k_out * sum(params[k].numel() for k in names)
        chunk = chunk_size or max(1, transient_budget // (per_example + k_out * activations))

        def generic_pass(x: Tensor, names: list[str] = names, chunk: int = chunk) -> list[_Feature]:
            return _generic_features(model, x, params, names, chunk, groups)

        if implementation == "auto":
            try:  # one example first: a model vmap cannot batch falls back to products for these parameters
                generic_pass(x1[:1])
            except (RuntimeError, NotImplementedError, ValueError) as error:
                if "non-finite" in str(error):
                    raise
                oversized.extend(names)
                continue
        passes.append((generic_pass, per_example, _group_order(names, groups)))
    kernels: dict[str, Tensor] = {}
    parts = [_blocked_kernel(compute, x1, x2, symmetric, per_example, feature_budget, trace, transient_budget, owners)
             for compute, per_example, owners in passes]
    if oversized:
        parts.append(_ntk_products_by_group(model, x1, x2, params, groups, oversized, None, trace, budget, symmetric))
    for part in parts:
        for name, block in part.items():
            kernels[name] = block if name not in kernels else kernels[name] + block.reshape(kernels[name].shape)
    return kernels


def _blocked_kernel(
    compute: Callable[[Tensor], list[_Feature]], x1: Tensor, x2: Tensor, symmetric: bool, per_example: int,
    feature_budget: int, trace: bool, transient_budget: int, owners: list[str],
) -> dict[str, Tensor]:
    """Σ over features of J(x1) J(x2)ᵀ by group (``owners``: the group of each feature ``compute`` returns), from
    ``compute``'s per-example features, keeping at most ``feature_budget`` numbers of features at once (x2's
    recomputed per block of x1 if they do not all fit)."""
    n1, n2 = x1.shape[0], x2.shape[0]
    together = n1 if symmetric else n1 + n2
    if together * per_example <= feature_budget:
        f1 = compute(x1)
        f2 = f1 if symmetric else compute(x2)
        kernels = _gram(f1, f2, trace, transient_budget, owners)
    else:
        block = max(1, feature_budget // max(1, 2 * per_example))
        starts1 = list(range(0, n1, block))
        rows: list[list[dict[str, Tensor] | None]] = []
        for i, s1 in enumerate(starts1):
            f1 = compute(x1[s1 : s1 + block])
            row: list[dict[str, Tensor] | None] = []
            for s2 in range(0, n2, block):
                if symmetric and s2 < s1:
                    row.append(None)  # filled from the transposed block below
                    continue
                f2 = f1 if symmetric and s2 == s1 else compute(x2[s2 : s2 + block])
                row.append(_gram(f1, f2, trace, transient_budget, owners))
            rows.append(row)
        for i in range(len(rows)):
            for j in range(len(rows[i])):
                if rows[i][j] is None:
                    rows[i][j] = {k: t.T if trace else t.permute(2, 3, 0, 1) for k, t in rows[j][i].items()}
        kernels = {k: torch.cat([torch.cat([cell[k] for cell in row], dim=2 if not trace else 1) for row in rows], dim=0)
                   for k in rows[0][0]}
    if trace:
        return kernels
    return {k: kernel.reshape(kernel.shape[0] * kernel.shape[1], -1) for k, kernel in kernels.items()}
