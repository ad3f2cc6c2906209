"""Is fine-tuning lazy? ``LazyTrainingCallback`` in a Hugging Face ``Trainer``.

A tiny BERT (random init from a config: nothing is downloaded; ``HF_HUB_OFFLINE=1``) is fine-tuned for sequence
classification on a synthetic task (is token 7 in the sequence?). The callback trains the tangent twin beside it
with the model's own loss and the Trainer's clipping and accumulation, logs ``lazy/...`` to the integrations of
``report_to`` and writes ``laziness.png``, ``layers.png`` and ``lazy_summary.txt`` to ``output_dir``.

    python examples/huggingface_trainer.py             # about 20 s on one CPU thread
    tensorboard --logdir runs/huggingface_trainer/runs
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

from lightning_lazy.huggingface import LazyTrainingCallback  # noqa: E402


def dataset(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Sequences of 16 tokens from a vocabulary of 64; label 1 when token 7 occurs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, 16), generator=g)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": int((row == 7).any())} for row in ids]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/huggingface_trainer", help="the Trainer's output_dir")
    parser.add_argument("--epochs", type=float, default=3, help="training epochs")
    parser.add_argument("--quick", action="store_true", help="1 epoch on fewer examples (for the tests)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)
    model = BertForSequenceClassification(config)
    training = TrainingArguments(output_dir=args.output_dir, num_train_epochs=1 if args.quick else args.epochs,
                                 per_device_train_batch_size=16, gradient_accumulation_steps=2, learning_rate=5e-4,
                                 report_to=["tensorboard"], use_cpu=True, save_strategy="no", logging_steps=10,
                                 disable_tqdm=True, seed=0)
    callback = LazyTrainingCallback(probe_size=64)  # the loss: the model's own (cross-entropy on its labels)
    trainer = Trainer(model=model, args=training, train_dataset=dataset(128 if args.quick else 512, 0),
                      callbacks=[callback])
    trainer.train()
    print(callback.summary())
    return dict(callback.history[-1])


if __name__ == "__main__":
    main()
