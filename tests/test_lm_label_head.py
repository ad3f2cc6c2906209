"""The label-logit NTK from the LM head's input: the selected logit is ⟨h, W[y]⟩ + b[y], so the kernel's forward and
backward passes never form the [N, T, V] logits; the kernel equals the one of the dense logits gathered (and the
explicit Jacobian's, tests/test_language_models.py), with tied and untied heads; a head whose output is changed
after it (scaled, soft-capped) is not replaced."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from lightning_lazy.scaling import IGNORE_INDEX  # noqa: E402
from lightning_lazy.watch.probe import LazinessProbe  # noqa: E402
from lightning_lazy.watch.twin import Watched  # noqa: E402

transformers.logging.set_verbosity_error()
T, V = 6, 97


def gpt2(tied: bool) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=V, n_positions=T,
                                     tie_word_embeddings=tied)
    return transformers.GPT2LMHeadModel(config).double().eval()


def probe_batch(n: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (n, T), generator=generator)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:]
    labels[0, 3:] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels


@pytest.mark.parametrize("tied", [True, False])
def test_the_label_kernel_from_the_head_input_is_the_dense_one_and_never_forms_the_logits(tied):
    model = gpt2(tied)
    x, labels = probe_batch(4)
    probe = LazinessProbe(Watched(model), x, labels, ntk_probe_size=4, measure_kappa=False, per_layer=False)
    assert probe._label_head() is model.lm_head
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied
    params = probe.params([name for name, _ in probe.network.named_parameters()])
    widths = []
    handle = model.lm_head.register_forward_hook(lambda m, i, o: widths.append(o.shape[-1]))
    try:
        kernel = probe.kernel(params)
    finally:
        handle.remove()
    assert widths and set(widths) == {1}  # the head gave the selected logits only, never [.., V]
    probe._head = None  # the dense logits, gathered (the way before)
    dense = probe.kernel(params)
    assert kernel.shape == (4 * T, 4 * T)
    torch.testing.assert_close(kernel, dense, rtol=1e-10, atol=1e-12)
    assert float(kernel.norm()) > 0


class Scaled(nn.Module):
    """Logits changed after the head: the head's output is not the network's."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        return 30 * torch.tanh(self.inner(**x).logits / 30)


def test_a_head_whose_logits_are_changed_after_it_is_left_as_it_is():
    x, labels = probe_batch(3)
    probe = LazinessProbe(Scaled(gpt2(True)), x, labels, ntk_probe_size=3, measure_kappa=False, per_layer=False)
    assert probe.ntk_outputs == "labels" and probe._label_head() is None
    params = probe.params([name for name, _ in probe.network.named_parameters()])
    assert probe.kernel(params).shape == (3 * T, 3 * T)
