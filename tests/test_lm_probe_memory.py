"""Language models with a real vocabulary: the probe never builds a one-hot of its token targets, and a probe whose
output-sized tensors would not fit the memory budget is refused at fit start in one line naming the probe that fits.
"""

from __future__ import annotations

import math
import os
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pl = pytest.importorskip("pytorch_lightning")

from pytorch_lightning.utilities.exceptions import MisconfigurationException  # noqa: E402

from lightning_lazy import LazyTrainingMonitor, diagnostics  # noqa: E402
from lightning_lazy.watch.probe import LazinessProbe, ProbeMemoryError, probe_numbers  # noqa: E402
from lightning_lazy.scaling import IGNORE_INDEX, squared_distance  # noqa: E402
from lightning_lazy.watch.twin import Watched  # noqa: E402

transformers.logging.set_verbosity_error()
GPT2_VOCABULARY = 50257


def gpt2(vocab: int, positions: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab, n_embd=8, n_layer=1, n_head=2, n_positions=positions)
    return transformers.GPT2LMHeadModel(config)


def examples(n: int, vocab: int, positions: int) -> list[dict[str, torch.Tensor]]:
    """Random token sequences, labels the next token, -100 at the last position (and after a random length)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (n, positions), generator=generator)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:]
    labels[::2, positions // 2:] = IGNORE_INDEX
    return [{"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]), "labels": labels[i]} for i in range(n)]


def collate(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([e[k] for e in batch]) for k in batch[0]}


class CausalLM(pl.LightningModule):
    def __init__(self, vocab: int, positions: int):
        super().__init__()
        self.model = gpt2(vocab, positions)

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)

    def training_step(self, batch, batch_idx):
        logits = self(batch["input_ids"], batch["attention_mask"]).logits
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def fit(monitor: LazyTrainingMonitor, vocab: int, positions: int, n: int) -> None:
    trainer = pl.Trainer(max_epochs=1, callbacks=[monitor], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(CausalLM(vocab, positions), DataLoader(examples(n, vocab, positions), batch_size=2, collate_fn=collate))


def refusal(vocab: int, positions: int, n: int) -> str:
    with pytest.raises(MisconfigurationException) as caught:
        fit(LazyTrainingMonitor("cross_entropy", figure=False), vocab, positions, n)
    return str(caught.value)


# ------------------------------------------------------------------- the one-hot formula, without the one-hot


def one_hot_squared_error(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    keep = (labels != IGNORE_INDEX).unsqueeze(-1).to(output.dtype)
    return ((output - F.one_hot(labels.clamp_min(0), output.shape[-1]).to(output.dtype) * keep) * keep).pow(2).sum()


@pytest.mark.parametrize("shape", [(5, 7), (3, 6, 11)])
def test_squared_distance_is_the_one_hot_formula_with_minus_100_left_out(shape):
    torch.manual_seed(0)
    output = torch.randn(shape, dtype=torch.float64)
    labels = torch.randint(0, shape[-1], shape[:-1])
    labels.view(-1)[::3] = IGNORE_INDEX
    assert float(squared_distance(output, labels)) == float(one_hot_squared_error(output, labels))  # the same terms
    close = F.one_hot(labels.clamp_min(0), shape[-1]).to(torch.float64) + 1e-9 * output  # no cancellation near y*
    assert float(squared_distance(close, labels)) == pytest.approx(float(one_hot_squared_error(close, labels)), rel=1e-12)
    assert float(squared_distance(output, None)) == pytest.approx(float(output.pow(2).sum()), rel=1e-14)
    with pytest.raises(ValueError, match="-100"):
        squared_distance(output, labels.masked_fill(labels == 1, -7))


def test_divergence_and_kappa_residual_on_token_targets_match_the_one_hot_formula():
    torch.manual_seed(0)
    output, tangent, initial = (torch.randn(3, 6, 11, dtype=torch.float64) for _ in range(3))
    labels = torch.randint(0, 11, (3, 6))
    labels[0, 4:] = IGNORE_INDEX
    keep = (labels != IGNORE_INDEX).unsqueeze(-1).to(torch.float64)
    expected = ((output - tangent) * keep).norm() / one_hot_squared_error(initial, labels).sqrt()
    assert float(diagnostics.path_divergence(output, tangent, labels, initial)) == pytest.approx(float(expected), rel=1e-12)

    # κ's residual ‖h − onehot(y)‖/√N for token targets [N, T], with and without -100.
    weight = torch.randn(6 * 11, 5, dtype=torch.float64)
    x = torch.randn(3, 5, dtype=torch.float64)

    def fn(params, inputs):
        return torch.tanh(inputs @ params["w"].T).reshape(len(inputs), 6, 11)

    for targets in (labels, labels.clamp_min(0)):
        result = diagnostics.kappa(fn, x, targets, {"w": weight}, hessian=torch.tensor(1.0, dtype=torch.float64),
                                   jacobian=torch.tensor(1.0, dtype=torch.float64))
        residual = one_hot_squared_error(fn({"w": weight}, x), targets).sqrt() / math.sqrt(3)
        assert float(result.residual_norm) == pytest.approx(float(residual), rel=1e-12)


def test_the_probe_keeps_no_output_sized_tensor_and_its_one_hot_is_built_only_on_request():
    model = Watched(gpt2(97, 8).double().eval())
    batch = collate(examples(4, 97, 8))
    x = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    probe = LazinessProbe(model, x, batch["labels"], measure_kappa=False, measure_ntk=False)
    kept = {key: value for key, value in probe.state_dict().items() if isinstance(value, torch.Tensor)}
    assert max(value.numel() for key, value in kept.items() if key != "x") < 4 * 8 * 97  # no [N, T, V] tensor
    assert probe.y is None and probe.mask.shape == (4, 8, 1)
    with torch.no_grad():
        logits = model(x)
    assert float(probe.initial_distance) ** 2 == pytest.approx(float(one_hot_squared_error(logits, batch["labels"])),
                                                                rel=1e-12)
    keep = (batch["labels"] != IGNORE_INDEX).unsqueeze(-1)
    one_hot = (F.one_hot(batch["labels"].clamp_min(0), 97) * keep).reshape(4, -1).double()
    assert torch.equal(probe.regression_targets(), one_hot)


# ---------------------------------------------------------------------- the budget, at fit start


def test_gpt2_vocabulary_default_probe_is_refused_in_one_line_naming_the_probe_size_that_fits():
    message = refusal(GPT2_VOCABULARY, 32, n=40)  # the default probe: the 40 examples of the train set
    assert "\n" not in message and "output 32x50257 per example, a probe of 40 examples" in message
    assert "probe_size=256" in message and f"{diagnostics.DEFAULT_MEMORY_BUDGET:.3g}" in message
    largest = int(re.search(r"pass probe_size=(\d+)", message).group(1))
    numbers = float(re.search(r"would hold ([0-9.e+]+) numbers", message).group(1))
    assert numbers > diagnostics.DEFAULT_MEMORY_BUDGET
    # The largest probe that fits, by the same count: the sizes per example from the model itself, each module output
    # the probe records for feature movement counted as it is kept (whole, or its sketch of FEATURE_SKETCH_SIZE).
    model = gpt2(GPT2_VOCABULARY, 32)
    one = collate(examples(1, GPT2_VOCABULARY, 32))
    recorded = LazinessProbe(Watched(model), {k: one[k] for k in ("input_ids", "attention_mask")}, one["labels"],
                             measure_kappa=False, measure_ntk=False).layer_modules
    with torch.no_grad(), diagnostics.recording_module_outputs(Watched(model), recorded) as features:
        Watched(model)({k: one[k] for k in ("input_ids", "attention_mask")})
    assert "inner.lm_head" in recorded and features["inner.lm_head"][0].numel() == 32 * GPT2_VOCABULARY
    sizes = {"output_numel": 32 * GPT2_VOCABULARY, "kappa_probe_size": 16, "layer_probe_size": 64,
             "feature_numel": [t.numel() for ts in features.values() for t in ts],
             "feature_sketch": diagnostics.FEATURE_SKETCH_SIZE}
    assert probe_numbers(largest, **sizes) <= diagnostics.DEFAULT_MEMORY_BUDGET < probe_numbers(largest + 1, **sizes)
    # That probe is accepted (its construction: one forward of `largest` sequences).
    batch = collate(examples(largest, GPT2_VOCABULARY, 32))
    probe = LazinessProbe(Watched(model), {k: batch[k] for k in ("input_ids", "attention_mask")}, batch["labels"])
    assert probe.output_numel == 32 * GPT2_VOCABULARY


def test_the_probe_size_named_trains_with_every_measure_finite(monkeypatch):
    vocab, positions = 1000, 8
    # A budget that refuses the default probe here as the real one refuses it for GPT-2 (fast on one thread).
    monkeypatch.setattr(diagnostics, "DEFAULT_MEMORY_BUDGET", 40 * positions * vocab)
    message = refusal(vocab, positions, n=12)
    largest = int(re.search(r"pass probe_size=(\d+)", message).group(1))
    assert 1 <= largest < 12
    monitor = LazyTrainingMonitor("cross_entropy", probe_size=largest, figure=False)
    fit(monitor, vocab, positions, n=4)
    assert monitor.history and num_values(monitor.history[-1]) >= 10
    for entry in monitor.history:
        assert all(math.isfinite(value) for value in entry.values() if isinstance(value, float)), entry
    assert {"divergence", "kappa", "jacobian_norm", "hessian_norm", "ntk_distance"} <= set(monitor.history[-1])


def num_values(entry: dict) -> int:
    return sum(isinstance(value, float) for value in entry.values())


def test_a_probe_given_by_hand_is_refused_naming_probe_and_a_direct_probe_raises_the_error_with_its_size(monkeypatch):
    monkeypatch.setattr(diagnostics, "DEFAULT_MEMORY_BUDGET", 40 * 8 * 1000)
    batch = collate(examples(10, 1000, 8))
    x = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with pytest.raises(ProbeMemoryError) as caught:
        LazinessProbe(Watched(gpt2(1000, 8)), x, batch["labels"])
    assert 1 <= caught.value.largest < 10 and f"at most {caught.value.largest} probe example" in str(caught.value)
    with pytest.raises(MisconfigurationException, match=r"give a probe= of at most \d+ example") as refused:
        fit(LazyTrainingMonitor("cross_entropy", probe=(x, batch["labels"]), figure=False), 1000, 8, n=4)
    assert "\n" not in str(refused.value) and "probe_size=256" not in str(refused.value)


def test_a_checkpoint_of_the_older_format_loads_with_the_same_divergence_scale():
    model = Watched(gpt2(97, 8).double().eval())
    batch = collate(examples(4, 97, 8))
    x = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    probe = LazinessProbe(model, x, batch["labels"], measure_kappa=False, measure_ntk=False)
    state = probe.state_dict()
    with torch.no_grad():
        logits = model(x)
    keep = (batch["labels"] != IGNORE_INDEX).unsqueeze(-1).double()
    old = {k: v for k, v in state.items() if k != "initial_distance"}  # h(w0), one-hot y and mask, all [N, K]
    old.update(initial_output=logits.reshape(4, -1), y=(F.one_hot(batch["labels"].clamp_min(0), 97) * keep).reshape(4, -1),
               mask=keep.expand(logits.shape).reshape(4, -1))
    restored = LazinessProbe(model, x, batch["labels"], measure_kappa=False, measure_ntk=False)
    restored.load_state_dict(old)
    assert float(restored.initial_distance) == pytest.approx(float(probe.initial_distance), rel=1e-12)
    assert restored.y is None and torch.equal(restored.mask, probe.mask)
