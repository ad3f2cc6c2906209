"""Structured rules of the empirical NTK for language models, float64, against the column-by-column reference
("products") and the explicit Jacobian: embedding lookups (a tied table looked up by the input and by the label
rule's W[y], a table looked up twice, padding_idx, max_norm's fallback, a position table broadcast over the
batch, and the fallback when such a table is used other than elementwise), ``torch.addmm`` of a parameter
(transformers' ``Conv1D``) and LayerNorm's affine parameters (over one and two dimensions).

Every model is checked twice: the kernel equals the references, and the parameters the rule is for are indeed
taken by the structured path (so that a fallback to the generic path cannot make the equality trivial).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lazy import diagnostics as D
from lightning_lazy.diagnostics.ntk.structured import _embedding_gram, _LayerRecorder, _plan_structured

from helpers_core import explicit_jacobian

VOCAB, WIDTH, LENGTH = 13, 6, 5


class _Conv1D(nn.Module):
    """transformers' ``Conv1D`` as it is written there: ``addmm(b, x.view(-1, P), W)``, W ``[P, O]``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in**0.5)
        self.bias = nn.Parameter(torch.randn(n_out) / 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.size()[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size)


def _labels(ids: torch.Tensor) -> torch.Tensor:
    """Next-token targets, a fixed function of the ids (so the model is a function of its input), the last
    position ignored (−100) as in a language model's labels."""
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return labels


class _TinyGPT(nn.Module):
    """A GPT-2-like toy: token and position tables, LayerNorm, a causal mixing of positions, Conv1D layers,
    and the label-logit head ⟨h_t, W[y_t]⟩ (W the token table when ``tied``), 0 where the label is ignored."""

    def __init__(self, tied: bool, broadcast_positions: bool = False, reduce_positions: bool = False) -> None:
        super().__init__()
        self.tied, self.broadcast_positions, self.reduce_positions = tied, broadcast_positions, reduce_positions
        self.wte, self.wpe = nn.Embedding(VOCAB, WIDTH), nn.Embedding(LENGTH, WIDTH)
        self.ln_1, self.ln_f = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.c_fc, self.c_proj = _Conv1D(WIDTH, 2 * WIDTH), _Conv1D(2 * WIDTH, WIDTH)
        self.head = None if tied else nn.Parameter(torch.randn(VOCAB, WIDTH))
        self.register_buffer("causal", torch.tril(torch.ones(LENGTH, LENGTH)) / torch.arange(1, LENGTH + 1)[:, None])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
        if not self.broadcast_positions:
            positions = positions.expand(ids.shape[0], -1)
        # [1, T] positions: one lookup broadcast over the batch; summed over its first dimension (of size 1, so the
        # same values), a use through which the lookup expanded to the batch would not give the same
        table = self.wpe(positions).sum(0) if self.reduce_positions else self.wpe(positions)
        h = self.wte(ids) + table
        h = h + self.causal @ self.c_proj(torch.tanh(self.c_fc(self.ln_1(h))))
        h = self.ln_f(h)
        labels = _labels(ids)
        rows = F.embedding(labels.clamp_min(0), self.wte.weight if self.tied else self.head)
        return (h * rows).sum(-1) * (labels != -100)


class _TwiceLooked(nn.Module):
    """nn.Embedding + Linear, the table looked up twice (the ids and their reversal) and padding_idx."""

    def __init__(self, padding_idx: int | None = None, max_norm: float | None = None) -> None:
        super().__init__()
        self.table = nn.Embedding(VOCAB, WIDTH, padding_idx=padding_idx, max_norm=max_norm)
        self.out = nn.Linear(2 * WIDTH, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        a, b = self.table(ids).mean(1), torch.tanh(self.table(ids.flip(1))).sum(1)
        return self.out(torch.cat([a, b], dim=1))


class _NormOverPositions(nn.Module):
    """LayerNorm over the last two dimensions (positions and width), without a bias, between a table and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(VOCAB, WIDTH)
        self.norm = nn.LayerNorm((LENGTH, WIDTH), bias=False)
        self.out = nn.Linear(LENGTH * WIDTH, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.norm(self.table(ids))).flatten(1))


class _FlatRows(nn.Module):
    """Layers on the hidden states flattened to rows [n·T, D] (as OPT's decoder layers): LayerNorm and Linear on
    the rows of a batched tensor, a Linear on their rows through an activation, and one on rows through an op not
    known to keep rows apart (a cumulative sum along each row: left generic)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(VOCAB, WIDTH)
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, 4), nn.Linear(4, WIDTH)
        self.fc3 = nn.Linear(WIDTH, WIDTH)
        self.out = nn.Linear(LENGTH * WIDTH, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.table(ids)
        rows = h.reshape(-1, WIDTH)
        rows = rows + self.fc2(torch.tanh(self.fc1(self.norm(rows))))
        rows = self.fc3(torch.cumsum(rows, dim=1))
        return self.out(torch.tanh(rows.view(ids.shape[0], -1)))


def _ids(n: int, seed: int) -> torch.Tensor:
    # Few ids, so that they repeat within and across sequences (the rule's cross terms are exercised).
    return torch.randint(0, VOCAB, (n, LENGTH), generator=torch.Generator().manual_seed(seed))


def _explicit(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    j1, j2 = explicit_jacobian(model, x1), explicit_jacobian(model, x2)
    return j1.reshape(-1, j1.shape[-1]) @ j2.reshape(-1, j2.shape[-1]).T


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _structured(model: nn.Module, x: torch.Tensor) -> set[str]:
    """Names of the parameters the structured path takes on the examples x (the others go the generic path)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    pilot = _LayerRecorder(params, batch=x.shape[0])
    with torch.no_grad(), pilot:
        out = torch.func.functional_call(model.eval(), params, (x,))
    plan = _plan_structured(pilot, params, out.reshape(len(x), -1).shape[1], len(x), len(x), False, 1 << 20)
    return {name for w, b, _ in plan.taps.values() for name in (w, b) if name is not None}


def _models() -> dict[str, tuple[nn.Module, set[str]]]:
    """{name: (model, the parameters the structured path must take)}"""
    torch.manual_seed(0)
    models: dict[str, tuple[nn.Module, set[str]]] = {}
    for name, model in {"gpt_tied": _TinyGPT(tied=True), "gpt_untied": _TinyGPT(tied=False),
                        "gpt_broadcast_positions": _TinyGPT(tied=True, broadcast_positions=True),
                        "gpt_reduced_positions": _TinyGPT(tied=True, broadcast_positions=True, reduce_positions=True),
                        "embedding_twice": _TwiceLooked(), "padding_idx": _TwiceLooked(padding_idx=2),
                        "layer_norm_over_positions": _NormOverPositions(), "flattened_rows": _FlatRows()}.items():
        model = model.double()
        with torch.no_grad():
            for p in model.parameters():  # LayerNorm's affine parameters away from 1 and 0
                p.add_(0.3 * torch.randn_like(p))
        everything = {k for k, _ in model.named_parameters()}
        # a broadcast lookup used other than elementwise goes the generic path, so do rows not known to be a
        # flattening of the batch
        generic = {"gpt_reduced_positions": {"wpe.weight"}, "flattened_rows": {"fc3.weight", "fc3.bias"}}
        models[name] = (model, everything - generic.get(name, set()))
    return models


@pytest.mark.parametrize("name", list(_models()))
def test_structured_rules_equal_products_and_the_explicit_jacobian(name):
    model, structured = _models()[name]
    x1, x2 = _ids(6, 1), _ids(4, 2)
    x1[1] = x1[0]  # a repeated sequence: every id shared with another example
    assert (x1 == 2).any(), "the padding index is looked up"
    assert _structured(model, x1) == structured
    explicit = _explicit(model, x1, x1)
    fast = D.empirical_ntk(model, x1)
    assert _relative(fast, explicit) < 1e-10
    assert _relative(D.empirical_ntk(model, x1, implementation="products"), explicit) < 1e-10
    # Off-diagonal blocks, traced, per layer, and a budget that forces chunks of one example and blocks of pairs.
    cross = _explicit(model, x1, x2)
    assert _relative(D.empirical_ntk(model, x1, x2), cross) < 1e-10
    k_out = cross.shape[0] // len(x1)
    traced = cross.reshape(len(x1), k_out, len(x2), k_out).diagonal(dim1=1, dim2=3).sum(-1)
    assert _relative(D.empirical_ntk(model, x1, x2, trace=True), traced) < 1e-10
    assert _relative(D.empirical_ntk(model, x1, memory_budget=400), explicit) < 1e-10
    assert _relative(D.empirical_ntk(model, x1, x2, memory_budget=300, trace=True), traced) < 1e-10
    blocks = D.empirical_ntk(model, x1, per_layer=True)
    reference = D.empirical_ntk(model, x1, per_layer=True, implementation="products")
    assert list(blocks) == list(reference)
    for module in blocks:
        assert _relative(blocks[module], reference[module]) < 1e-10, module
    assert _relative(sum(blocks.values()), explicit) < 1e-10


def test_a_tied_table_adds_the_cross_terms_of_its_two_lookups():
    # The kernel of the tied table alone: Θ = (J_in + J_head)(J_in + J_head)ᵀ, whose cross terms J_in J_headᵀ the
    # two lookups' own blocks lack. The same network untied, its head a copy of the table, gives J_in and J_head.
    model, _ = _models()["gpt_tied"]
    x = _ids(5, 3)
    table = {"wte.weight": model.wte.weight.detach()}
    fast = D.empirical_ntk(model, x, params=table)
    untied = _TinyGPT(tied=False).double()
    untied.load_state_dict({**model.state_dict(), "head": model.wte.weight.detach().clone()})
    j = explicit_jacobian(untied, x).reshape(-1, sum(p.numel() for p in untied.parameters()))
    names = [k for k, _ in untied.named_parameters()]
    sizes = [p.numel() for p in untied.parameters()]
    parts = dict(zip(names, j.split(sizes, dim=1)))
    j_in, j_head = parts["wte.weight"], parts["head"]
    tied = (j_in + j_head) @ (j_in + j_head).T
    assert _relative(fast, tied) < 1e-10
    assert _relative(j_in @ j_in.T + j_head @ j_head.T, tied) > 1e-2, "the test would see missing cross terms"


def test_embedding_gram_pairs_rows_by_id():
    # Directly: ids with repeats within and across examples, padding (−1), a zero cotangent, blocks of pairs.
    torch.manual_seed(0)
    ids1 = torch.tensor([[1, 1, 4, -1], [4, 2, 2, 9]])
    ids2 = torch.tensor([[2, 4, 4], [7, 7, 1], [3, 5, 6]])
    g1, g2 = torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.randn(3, 3, 3, 5, dtype=torch.float64)
    g1[1, :, 3] = 0
    match = (ids1[:, None, :, None] == ids2[None, :, None, :]) & (ids1 >= 0)[:, None, :, None]
    expected = torch.einsum("abst,aksd,bltd->akbl", match.double(), g1, g2)
    for budget in (1 << 20, 1):  # one block of pairs; one entry at a time
        assert _relative(_embedding_gram(ids1, g1, ids2, g2, False, budget), expected) < 1e-12
        traced = _embedding_gram(ids1, g1, ids2, g2, True, budget)
        assert _relative(traced, expected.diagonal(dim1=1, dim2=3).sum(-1)) < 1e-12
    no_match = _embedding_gram(ids1, g1, torch.full_like(ids2, 11), g2, False, 1 << 20)
    assert no_match.shape == (2, 3, 3, 3) and not no_match.any()


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap's fallback for embedding_renorm_
def test_max_norm_embedding_falls_back_and_equals_the_reference():
    # max_norm renormalizes the table's rows in place during the forward: not the lookup rule's function, so the
    # table goes the generic path (rows inside the norm bound: the renormalization leaves them as they are).
    torch.manual_seed(0)
    model = _TwiceLooked(max_norm=10.0).double()
    x = _ids(4, 5)
    assert "table.weight" not in _structured(model, x)
    assert _structured(model, x) == {"out.weight", "out.bias"}
    assert _relative(D.empirical_ntk(model, x), _explicit(model, x, x)) < 1e-10


def test_hf_conv1d_and_gpt2_are_structured():
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = nn.Sequential(nn.Flatten(), Conv1D(7, LENGTH * WIDTH), nn.Tanh(), Conv1D(3, 7)).double()
    x = torch.randn(5, LENGTH, WIDTH, dtype=torch.float64)
    assert _structured(layer, x) == {k for k, _ in layer.named_parameters()}
    assert _relative(D.empirical_ntk(layer, x), _explicit(layer, x, x)) < 1e-10
    # A GPT-2 with the label-logit head: every parameter structured, the position table too (looked up by
    # position ids [1, T] broadcast over the batch, then added to the token embeddings).
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=8, n_layer=1, n_head=2, n_positions=LENGTH,
                                     attn_implementation="eager")
    gpt = transformers.GPT2LMHeadModel(config).double()

    class LabelLogits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gpt = gpt

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = self.gpt.transformer(input_ids=ids).last_hidden_state
            labels = _labels(ids)
            rows = F.embedding(labels.clamp_min(0), self.gpt.lm_head.weight)
            return (h * rows).sum(-1) * (labels != -100)

    model = LabelLogits()
    ids = _ids(4, 7)
    covered = _structured(model, ids)
    assert covered == {k for k, _ in model.named_parameters()}
    assert _relative(D.empirical_ntk(model, ids), D.empirical_ntk(model, ids, implementation="products")) < 1e-10
