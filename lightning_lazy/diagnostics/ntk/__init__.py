"""The empirical neural tangent kernel: one function, its implementations behind one switch.

One module per implementation (as neural-tangents' ``empirical.py`` with its ``NtkImplementation``):
:mod:`.products` (Jacobian products, the exact reference), :mod:`.structured` (structured derivatives of
dense, convolution and BatchNorm layers, Novak et al. 2022) and :mod:`.jacobian` (per-example Jacobians,
and the driver that combines them with the structured features under a memory budget).
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Callable

from torch import Tensor

from lightning_lazy.diagnostics._common import (
    DEFAULT_MEMORY_BUDGET,
    ModelLike,
    Params,
    _check_probe,
    _evaluating,
    _trainable_params,
)
from lightning_lazy.diagnostics.ntk.jacobian import _ntk_fast
from lightning_lazy.diagnostics.ntk.products import _ntk_products_by_group


class NtkImplementation(str, enum.Enum):
    """Which implementation :func:`empirical_ntk` uses (a ``str``: ``"structured"`` is accepted as well)."""

    AUTO = "auto"
    STRUCTURED = "structured"
    JACOBIAN = "jacobian"
    PRODUCTS = "products"


NTK_IMPLEMENTATIONS = tuple(member.value for member in NtkImplementation)


def _products(model: ModelLike, x1: Tensor, x2: Tensor, symmetric: bool, params: Params, implementation: str,
              chunk_size: int | None, trace: bool, budget: int, groups: dict[str, str]) -> dict[str, Tensor]:
    return _ntk_products_by_group(model, x1, x2, params, groups, list(params), chunk_size, trace, budget, symmetric)


def owning_module(name: str) -> str:
    """The name (as in ``named_modules()``) of the module that owns the parameter ``name`` (as in
    ``named_parameters()``): everything before its last dot; ``""`` (the root module) for a top-level one."""
    return name.rpartition(".")[0]


# The dispatch table: every implementation takes the same arguments and returns {group: kernel block}.
_IMPLEMENTATIONS: dict[NtkImplementation, Callable[..., dict[str, Tensor]]] = {
    NtkImplementation.AUTO: _ntk_fast,
    NtkImplementation.STRUCTURED: _ntk_fast,
    NtkImplementation.JACOBIAN: _ntk_fast,
    NtkImplementation.PRODUCTS: _products,
}


def empirical_ntk(
    model: ModelLike,
    x1: Tensor,
    x2: Tensor | None = None,
    params: Params | None = None,
    *,
    chunk_size: int | None = None,
    implementation: str | NtkImplementation = NtkImplementation.AUTO,
    trace: bool = False,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    per_layer: bool = False,
) -> Tensor | OrderedDict[str, Tensor]:
    """The empirical neural tangent kernel Θ(x1, x2) = J(x1) J(x2)ᵀ, J = ∂h(x; w)/∂w at ``params``.

    Shapes: ``[N1·K, N2·K]`` (rows and columns ordered example-major, entry ((i, k), (j, l)) =
    ⟨∂h_k(x1_i)/∂w, ∂h_l(x2_j)/∂w⟩); with ``trace=True`` the output-traced ``[N1, N2]`` kernel
    Σ_k Θ((i, k), (j, k)) (neural-tangents' ``trace_axes=(-1,)`` up to its convention; no 1/K factor).
    Unnormalized, as neural-tangents' empirical kernel; dtype and device of the output. ``x2=None``
    means x2 = x1 (then only the blocks on and above the diagonal are computed).

    ``implementation`` (as neural-tangents' ``NtkImplementation``):

    - ``"structured"`` — Novak, Sohl-Dickstein & Schoenholz, "Fast Finite Width Neural Tangent Kernel"
      (ICML 2022), structured derivatives. One forward of the probe under a ``TorchFunctionMode`` records,
      for every ``F.linear``, ``torch.addmm(b, x, W)`` (x the rows of a batched tensor, as transformers'
      ``Conv1D``), ``F.conv1d/2d/3d`` (``groups=1``), eval-mode ``F.batch_norm``, ``F.layer_norm`` and
      ``F.embedding`` call whose weight or bias is one of ``params`` (a dense layer or LayerNorm on hidden
      states flattened to rows ``[N·T, D]``, as OPT's, is read per example when the rows are seen to come
      from the batch: a flattening, a layer on such rows, a row-wise activation), the layer input x and, by
      K backward passes (one per output unit), the cotangent g at its output. A dense weight's block is then
      Σ_{s,t} ⟨g_ik,s, g_jl,t⟩⟨x_i,s, x_j,t⟩ (s, t: positions sharing the weight, the im2col patches of a
      convolution) — computed either in that form or through the per-example weight Jacobian
      Σ_s g_ik,s ⊗ x_i,s, whichever costs fewer multiply-adds (the choice neural-tangents makes per
      layer). Where, for every example and channel, the K output units' cotangents over the positions are
      multiples of one row (g_ik,s,o = c_ik,o·m_i,s,o: a layer followed by position-wise ops and global average
      pooling into a linear head), the per-example Jacobian is diag(c_ik)·A_i with A_i = Σ_s m_i,s ⊗ x_i,s, one
      product per example instead of K, and the block Σ_o c_ik,o c_jl,o ⟨A_i,o, A_j,o⟩; this structure is checked
      on the recorded cotangents, to 128 machine epsilons relative, before it is used. Biases and BatchNorm /
      LayerNorm affine parameters go through their (small) per-example Jacobians. An embedding table's block is
      Σ_{s,t} [id_is = id_jt] ⟨g_ik,s, g_jl,t⟩ over the positions of every lookup of that table (a tied table
      looked up by the input and by an LM head's W[y] included, cross terms and all), from the rows each example
      looks up: no [V, D] Jacobian is formed, and a padding_idx row gets no gradient, as in ``F.embedding``. No
      parameter Jacobian of a wide dense layer is ever formed. Every other parameter — embeddings with
      ``max_norm`` (they write their weight) or ``scale_grad_by_freq``, GroupNorm, depthwise convolutions, tied
      weights used in more than one call (embedding lookups aside), layers whose input's first dimension is not
      the examples' (a position table looked up once, ``[1, T]``, and broadcast over the batch, unless its output
      is only added, subtracted or multiplied onto the batch's: then it is expanded to the batch while the
      cotangents are recorded), parameters that reach the output through any other op (e.g. inside
      ``nn.MultiheadAttention``, whose projections are applied by one fused function) — goes through the generic
      path.
    - ``"jacobian"`` — the generic path for every parameter: per-example Jacobians
      ``vmap(jacrev)`` over examples, chunked over examples and over parameter tensors, contracted.
    - ``"products"`` — the reference: column blocks Jᵀ(x2)E (vmapped vjp of unit cotangents) then J(x1)
      applied to them (vmapped jvp). Cost: N2·K backward passes through the whole probe, so quadratic in
      the number of inputs; memory ``chunk_size`` parameter-sized vectors. Exact whatever the model does.
      For x2 = x1 with several parameter groups (``per_layer``), or columns that fit one chunk, the blocks are
      Gram matrices of the rows of Jᵀ alone, Θ_l = (J_lᵀE)ᵀ(J_lᵀE) over pairs of column chunks, when that
      takes fewer passes than a vjp and a jvp per group.
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

    ``per_layer=True``: instead of Θ, the ordered dict {module name: Θ_l} of per-module blocks
    Θ_l = J_l(x1) J_l(x2)ᵀ, J_l the Jacobian with respect to the parameters that module owns directly (a
    parameter named ``a.b.weight`` belongs to module ``a.b``, its name in ``named_modules()``; ``""`` is the
    root module; a functional model's parameters are grouped by the same rule), each block of the kernel's shape
    (``[N1·K, N2·K]``, or ``[N1, N2]`` with ``trace=True``), in the order of ``params``. Θ = Σ_l Θ_l: the kernel
    is a sum over parameters of ⟨∂h/∂w_p, ∂h/∂w_p⟩, and the blocks split that sum by module (Novak et al. 2022
    compute the same per-layer terms, §3). Only the differentiated parameters count (``params``, by default the
    trainable ones): a frozen module has no block. Every implementation supports it at the cost of the whole
    kernel (``"products"`` and the ``"auto"`` fallback with x2 ≠ x1: once per module). Default ``False``:
    the kernel itself, one tensor.

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
    implementation = NtkImplementation(implementation)
    if memory_budget < 1:
        raise ValueError(f"memory_budget is a number of tensor elements and must be positive, got {memory_budget}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    params = _trainable_params(model, params)
    groups = {name: owning_module(name) if per_layer else "" for name in params}
    with _evaluating(model):
        blocks = _IMPLEMENTATIONS[implementation](model, x1, x2, symmetric, params, implementation.value,
                                                  chunk_size, trace, memory_budget, groups)
    if not per_layer:
        return blocks[""]
    return OrderedDict((group, blocks[group]) for group in dict.fromkeys(groups.values()))


__all__ = ["NTK_IMPLEMENTATIONS", "NtkImplementation", "empirical_ntk", "owning_module"]
