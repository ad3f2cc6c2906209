"""Language models: a tiny GPT-2-shaped causal LM (random init, offline) fed Hugging Face batches.

Dict inputs (``input_ids``, ``attention_mask``) and labels padded with -100, as every Hugging Face collator pads,
read by the default ``batch_to_xy``; -100 honoured by the losses and every target-dependent measure; the NTK on
the label tokens' logits within the memory budget, and a one-line refusal when a kernel cannot fit.
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pl = pytest.importorskip("pytorch_lightning")

from pytorch_lightning.utilities.exceptions import MisconfigurationException  # noqa: E402

from helpers_core import taken

from lightning_lazy import LazyTrainingMonitor, diagnostics  # noqa: E402
from lightning_lazy.callback import causal_lm_batch_to_xy, default_batch_to_xy  # noqa: E402
from lightning_lazy.watch.probe import LazinessProbe  # noqa: E402
from lightning_lazy.scaling import IGNORE_INDEX, cross_entropy, half_squared_error  # noqa: E402
from lightning_lazy.watch.twin import Watched  # noqa: E402

transformers.logging.set_verbosity_error()
T = 8  # positions


def tiny_gpt2(vocab: int = 13, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=vocab, n_positions=T,
                                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.GPT2LMHeadModel(config).to(dtype)


def lm_examples(n: int, vocab: int = 13, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Sequences of random lengths, right-padded with 0; labels = the next token, -100 where there is none."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, T), generator=generator)
    lengths = torch.randint(3, T + 1, (n,), generator=generator)
    attention = (torch.arange(T)[None] < lengths[:, None]).long()
    ids = ids * attention
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = torch.where(attention[:, 1:].bool(), ids[:, 1:], IGNORE_INDEX)
    return [{"input_ids": ids[i], "attention_mask": attention[i], "labels": labels[i]} for i in range(n)]


def collate(examples: list[dict[str, torch.Tensor]]) -> transformers.BatchEncoding:
    return transformers.BatchEncoding({k: torch.stack([e[k] for e in examples]) for k in examples[0]})


class CausalLM(pl.LightningModule):
    """Knows nothing of lightning_lazy: the Hugging Face model, called on the batch's named inputs."""

    def __init__(self, vocab: int = 13, lr: float = 0.2):
        super().__init__()
        self.model = tiny_gpt2(vocab)
        self.lr = lr

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)

    def training_step(self, batch, batch_idx):
        logits = self(batch["input_ids"], batch["attention_mask"]).logits
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())  # ignore_index=-100

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def fit(module: pl.LightningModule, monitor: LazyTrainingMonitor, n: int = 24, epochs: int = 2) -> pl.Trainer:
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[monitor], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, precision="64-true")
    trainer.fit(module, DataLoader(lm_examples(n), batch_size=8, collate_fn=collate))
    return trainer


def probe_batch(n: int = 6) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    batch = collate(lm_examples(n, seed=3))
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, batch["labels"]


# ------------------------------------------------------------------------------------------ the losses


def test_losses_leave_positions_labelled_minus_100_out():
    torch.manual_seed(0)
    logits = torch.randn(3, T, 5, dtype=torch.float64)
    labels = torch.randint(0, 5, (3, T))
    labels[0, 5:] = IGNORE_INDEX
    labels[2, :2] = IGNORE_INDEX
    kept = labels != IGNORE_INDEX
    assert float(cross_entropy(logits, labels)) == pytest.approx(float(F.cross_entropy(logits[kept], labels[kept])),
                                                                 rel=1e-12)
    one_hot = F.one_hot(labels.clamp_min(0), 5).to(logits.dtype)
    explicit = 0.5 * sum(float((logits[i, t] - one_hot[i, t]).pow(2).sum()) for i, t in kept.nonzero().tolist()) / 3
    assert float(half_squared_error(logits, labels)) == pytest.approx(explicit, rel=1e-12)
    with pytest.raises(ValueError, match="-100"):
        half_squared_error(logits, labels.masked_fill(labels == 1, -7))


def test_kappa_and_target_alignment_leave_ignored_positions_out():
    model = tiny_gpt2().eval()
    x, labels = probe_batch(4)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def fn(p, inputs):
        return torch.func.functional_call(model, p, (inputs,)).logits

    result = diagnostics.kappa(fn, x["input_ids"], labels, params, hessian_kwargs={"max_iter": 2, "max_rounds": 1})
    with torch.no_grad():
        logits = fn(params, x["input_ids"])
    kept = (labels != IGNORE_INDEX).unsqueeze(-1)
    residual = ((logits - F.one_hot(labels.clamp_min(0), logits.shape[-1])) * kept).norm() / math.sqrt(4)
    assert float(result.residual_norm) == pytest.approx(float(residual), rel=1e-10)
    # ‖Dh‖ is that of the outputs kept: the Jacobian of the masked logits, explicitly.
    jac = torch.func.jacrev(lambda p: (fn(p, x["input_ids"]) * kept).reshape(-1))(params)
    matrix = torch.cat([j.reshape(j.shape[0], -1) for j in jac.values()], 1)
    assert float(result.jacobian_norm) == pytest.approx(float(torch.linalg.matrix_norm(matrix, 2)) / 2, rel=1e-4)

    kernel = torch.randn(6, 6, dtype=torch.float64)
    kernel = kernel @ kernel.T
    targets = torch.tensor([0, 1, IGNORE_INDEX, 2, 1, IGNORE_INDEX])
    kept_rows = targets != IGNORE_INDEX
    assert float(diagnostics.target_alignment(kernel, targets)) == pytest.approx(
        float(diagnostics.target_alignment(kernel[kept_rows][:, kept_rows], targets[kept_rows])), rel=1e-12)


# ------------------------------------------------------------------------------------------- dict batches


def test_hugging_face_batches_are_read_as_named_inputs_and_labels():
    batch = collate(lm_examples(4))
    x, y = default_batch_to_xy(batch)
    assert set(x) == {"input_ids", "attention_mask"} and y is batch["labels"]
    watched = Watched(tiny_gpt2().eval())  # model(**x), and a ModelOutput read as its logits
    assert torch.equal(watched(x), watched.inner(**x).logits)
    assert default_batch_to_xy({"x": 1, "y": 2}) == (1, 2)  # the older dict convention still wins


@pytest.mark.parametrize("probe", ["drawn", "batch"])
def test_the_twin_at_learning_rate_zero_is_the_network_and_delta_is_exactly_zero(probe):
    # The probe drawn from the train set, or given as a Hugging Face batch (labels inside).
    given = collate(lm_examples(8, seed=5)) if probe == "batch" else None
    monitor = LazyTrainingMonitor(loss="cross_entropy", probe=given, probe_size=8, kappa_probe_size=4,
                                  ntk_probe_size=4, figure=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(CausalLM(lr=0.0), monitor)
    # At w0 the twin's loss on the first batch is the one training_step returned (no "another objective" warning).
    assert not [w for w in caught if "another objective" in str(w.message)]
    assert monitor.measures.ntk_outputs == "labels" and monitor.measures.mask is not None
    assert set(monitor.measures.x) == {"input_ids", "attention_mask"}
    for name, value in taken(monitor.history, "divergence", "tangent_gap", "displacement", "ntk_distance"):
        assert value == 0.0, name


def test_divergence_leaves_out_the_positions_labelled_minus_100():
    x, labels = probe_batch(6)
    monitor = LazyTrainingMonitor(loss="cross_entropy", probe=(x, labels), kappa_probe_size=4, ntk_probe_size=4,
                                  figure=False)
    module = CausalLM(lr=0.5)
    initial = tiny_gpt2().eval()  # the same seed: w0
    fit(module, monitor)
    assert (labels == IGNORE_INDEX).any() and monitor.history[-1]["divergence"] > 0
    network = module.model.eval()
    with torch.no_grad():
        kept = (labels != IGNORE_INDEX).unsqueeze(-1)
        now = network(**x).logits
        tangent = monitor.twin.probe_output(x)
        at_w0 = initial(**x).logits
        target = F.one_hot(labels.clamp_min(0), now.shape[-1]).to(now.dtype)
    explicit = float(((now - tangent) * kept).norm() / ((target - at_w0) * kept).norm())
    assert monitor.history[-1]["divergence"] == pytest.approx(explicit, rel=1e-9)
    # Counting the ignored positions (as the probe did before) gives another number: the mask matters here.
    assert float((now - tangent).norm() / (target * kept - at_w0).norm()) != pytest.approx(explicit, rel=1e-3)


def test_a_probe_without_targets_is_said_to_measure_against_zero():
    x, _ = probe_batch(4)
    monitor = LazyTrainingMonitor(loss="cross_entropy", probe=x, measure_kappa=False, measure_ntk=False, figure=False)
    with pytest.warns(UserWarning, match="the probe has no targets, so the measures take y\\* = 0"):
        fit(CausalLM(), monitor, n=8, epochs=1)
    assert monitor.measures.ntk_outputs == "all" and monitor.measures.mask is None  # no labels: every output
    assert monitor.history[-1]["divergence"] > 0


# ---------------------------------------------------------------------------------------------- the NTK


def test_the_label_token_kernel_is_the_explicit_one_and_fits_the_budget():
    model = tiny_gpt2().eval()
    x, labels = probe_batch(3)
    probe = LazinessProbe(Watched(model), x, labels, ntk_probe_size=3, measure_kappa=False)
    assert probe.ntk_outputs == "labels"
    params = probe.params([name for name, _ in probe.network.named_parameters()])
    kernel = probe.kernel(params)
    assert kernel.shape == (3 * T, 3 * T)  # not (3·T·V)²

    def label_logits(p):
        logits = torch.func.functional_call(model, {k[len("inner."):]: v for k, v in p.items()}, (), x).logits
        picked = logits.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return (picked * (labels != IGNORE_INDEX)).reshape(-1)

    jac = torch.func.jacrev(label_logits)(params)
    matrix = torch.cat([j.reshape(j.shape[0], -1) for j in jac.values()], 1)
    torch.testing.assert_close(kernel, matrix @ matrix.T, rtol=1e-8, atol=1e-10)
    ignored = (labels == IGNORE_INDEX).reshape(-1)
    assert ignored.any() and float(kernel[ignored].abs().max()) == 0.0

    # A projection of one's own: the last position's logits, [N, V].
    probe = LazinessProbe(Watched(model), x, labels, ntk_probe_size=3, measure_kappa=False,
                          ntk_outputs=lambda output, y: output[:, -1])
    assert probe.kernel(params).shape == (3 * 13, 3 * 13)


def test_a_kernel_over_the_memory_budget_is_refused_in_one_line_before_any_is_computed():
    vocab = 1000
    module = CausalLM(vocab=vocab)
    x = {"input_ids": torch.randint(1, vocab, (16, T)), "attention_mask": torch.ones(16, T, dtype=torch.long)}
    labels = x["input_ids"].roll(-1, 1)
    monitor = LazyTrainingMonitor(loss="cross_entropy", probe=(x, labels), ntk_outputs="all", figure=False)
    numbers = (16 * T * vocab) ** 2
    assert numbers > diagnostics.DEFAULT_MEMORY_BUDGET
    with pytest.raises(MisconfigurationException, match="memory budget") as error:
        fit(module, monitor, epochs=1)
    message = str(error.value)
    assert "\n" not in message and "ntk_outputs='labels'" in message and f"{numbers:.3g}" in message
    # The label tokens' kernel of the same model and probe fits: 4·8 outputs, not 4·8·1000.
    monitor = LazyTrainingMonitor(loss="cross_entropy", probe=(x, labels), ntk_probe_size=4, figure=False,
                                  measure_kappa=False)
    fit(module, monitor, n=8, epochs=1)
    assert monitor.measures.initial_kernel.shape == (4 * T, 4 * T)


def test_the_probe_of_a_dict_batch_survives_a_checkpoint():
    x, labels = probe_batch(4)
    probe = LazinessProbe(Watched(tiny_gpt2().eval()), x, labels, ntk_probe_size=2, measure_kappa=False)
    state = probe.state_dict()
    restored = LazinessProbe(Watched(tiny_gpt2().eval()), state["x"], state["labels"], ntk_probe_size=2,
                             measure_kappa=False)
    restored.load_state_dict(state)
    assert torch.equal(restored.mask, probe.mask) and restored.ntk_outputs == "labels"
    assert set(restored.x) == {"input_ids", "attention_mask"}


# ------------------------------------------------------------------------------------------ the example


@pytest.mark.usefixtures("restore_global_state")  # the example seeds and sets threads globally
def test_the_hugging_face_example_runs_offline_and_logs_the_measures(tmp_path):
    from test_examples import load_example, read_csv, tensorboard_scalars

    module = load_example("huggingface_lm")
    result = module.main(["--quick", "--out-dir", str(tmp_path / "out"), "--log-dir", str(tmp_path / "runs")])
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    monitor = result["monitor"]
    # The default batch_to_xy read the BatchEncoding: the probe is a dict, its labels hold -100s.
    assert set(monitor.measures.x) == {"input_ids", "attention_mask"} and monitor.measures.mask is not None
    assert monitor.measures.ntk_outputs == "labels" and monitor.measures.initial_kernel.shape == (4 * 32, 4 * 32)
    rows = read_csv(tmp_path / "out" / "huggingface_lm.csv")
    assert len(rows) == len(result["history"]) >= 1  # the budget may thin the log steps; the end state is there
    assert all(math.isfinite(float(r["divergence"])) and float(r["divergence"]) > 0 for r in rows)
    scalars = tensorboard_scalars(tmp_path / "runs")
    assert {"lazy/divergence", "lazy/kappa", "lazy/ntk_distance", "lazy/tangent/val_loss", "val/loss"} <= scalars


class SelfShiftingLM(CausalLM):
    """The usual Hugging Face set-up: labels = the input tokens, the model shifts them inside its own loss (in
    float32, whatever the model's dtype: so is this model)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = self.model.float()

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss


def _self_labelled(examples: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    return [{**e, "labels": torch.where(e["attention_mask"].bool(), e["input_ids"], IGNORE_INDEX)} for e in examples]


def test_causal_lm_labels_shifted_by_the_monitor_match_the_models_own_loss():
    examples = _self_labelled(lm_examples(24))
    x, y = causal_lm_batch_to_xy(collate(examples[:8]))
    assert torch.equal(y[:, :-1], collate(examples[:8])["labels"][:, 1:]) and (y[:, -1] == IGNORE_INDEX).all()
    monitor = LazyTrainingMonitor(loss="cross_entropy", batch_to_xy=causal_lm_batch_to_xy, figure=False,
                                  per_layer=False)
    trainer = pl.Trainer(max_epochs=1, callbacks=[monitor], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(SelfShiftingLM(), DataLoader(examples, batch_size=8, collate_fn=collate))
    assert not [w for w in caught if "another objective" in str(w.message)], [str(w.message)[:300] for w in caught if "another objective" in str(w.message)]
    assert all(math.isfinite(v) for v in (monitor.history[-1]["divergence"], monitor.history[-1]["kappa"]))
    with pytest.raises(ValueError, match="labels"):
        causal_lm_batch_to_xy({"input_ids": x["input_ids"]})


def test_a_self_labelled_causal_lm_read_unshifted_is_shifted_by_the_monitor():
    """A causal LM whose labels are its tokens, read by the default batch_to_xy: at the first batch the training
    step's loss is that of the next tokens, so the monitor shifts them as the model does (no warning; the twin
    follows); a loss left out is refused in one line naming causal_lm_batch_to_xy."""
    examples = _self_labelled(lm_examples(8))
    for monitor, expected in ((LazyTrainingMonitor(loss="cross_entropy", figure=False, per_layer=False), "shifted"),
                              (LazyTrainingMonitor(figure=False), "refusal")):
        trainer = pl.Trainer(max_epochs=1, callbacks=[monitor], logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
        loader = DataLoader(examples, batch_size=8, collate_fn=collate)
        if expected == "refusal":
            with pytest.raises(MisconfigurationException, match="causal_lm_batch_to_xy"):
                trainer.fit(SelfShiftingLM(), loader)
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(SelfShiftingLM(), loader)
        assert not [w for w in caught if "another objective" in str(w.message)]
        assert monitor.twin.lost is None and math.isfinite(monitor.history[-1]["divergence"])