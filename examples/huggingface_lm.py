"""A Hugging Face causal language model trained in Lightning, watched by ``LazyTrainingMonitor``: offline, on CPU.

A tiny GPT-2 (``transformers.GPT2LMHeadModel``, random init: 2 layers, width 32, 2 heads) learns, character by
character, the Zen of Python (the text the standard library ships in its module ``this``: nothing is downloaded,
no tokenizer either; the vocabulary is the text's characters, id 0 the padding). Lines longer than ``--length``
are cut; the batches are what a Hugging Face collator makes: ``input_ids``, ``attention_mask`` and ``labels``
padded with -100, in a ``BatchEncoding``. The LightningModule knows nothing of the monitor; the monitor is
the one line added to the ``Trainer``, and reads these batches without a ``batch_to_xy``:

- x = the model inputs as a dict, with which the model is called as ``model(**x)``; its ``ModelOutput`` is read
  as its ``.logits`` ``[N, T, V]``;
- y = the labels, -100 at the padding and past each line's end: those positions are left out of the loss (torch's
  ``ignore_index``) and of every measure that involves targets (Δ's denominator ‖y* − h(w0)‖, κ's residual);
- the empirical NTK is taken of the label tokens' logits (``ntk_outputs="auto"`` → ``"labels"``: at each
  position kept, the logit of the next character, ``[N·T, N·T]`` instead of ``[N·T·V, N·T·V]``), as Malladi et
  al. ("A Kernel-Based View of Language Model Fine-Tuning", ICML 2023) take the kernel of a language model.

The labels are the *next* characters (shifted here, in the collator): the loss ``training_step`` computes and
the monitor's ``"cross_entropy"`` then read logits and labels at the same positions. (A Hugging Face model given
``labels=`` shifts them itself; the monitor is not given the model's own loss.)

Outputs: ``huggingface_lm.csv`` (every measurement of the monitor) in ``--out-dir``; TensorBoard logs with the
``lazy/*`` curves, the summary text and the laziness figure (also ``laziness.png``) in ``--log-dir``.

    HF_HUB_OFFLINE=1 python examples/huggingface_lm.py --out-dir outputs/huggingface_lm --log-dir runs/huggingface_lm
    python examples/huggingface_lm.py --quick      # seconds, for tests
    python examples/huggingface_lm.py --vocab-size 50257 --probe-size 3 --epochs 1   # a real vocabulary's cost
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import csv
import io
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: a random-init model, no tokenizer

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from pytorch_lightning.loggers import TensorBoardLogger  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_lazy import LazyTrainingMonitor  # noqa: E402

IGNORE = -100  # the label of positions the loss ignores (torch's ignore_index, Hugging Face's label padding)
PAD = 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path("outputs/huggingface_lm"), help="the CSV goes here")
    parser.add_argument("--log-dir", type=Path, default=Path("runs/huggingface_lm"), help="TensorBoard logs")
    parser.add_argument("--epochs", type=int, default=40, help="training epochs")
    parser.add_argument("--lr", type=float, default=0.5, help="SGD learning rate (momentum 0.9)")
    parser.add_argument("--length", type=int, default=32, help="characters per sequence at most")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch")
    parser.add_argument("--every", type=int, default=5, help="the monitor measures every n epochs (and at steps 2^k)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialization and the batch order")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny model: 1 is fastest)")
    parser.add_argument("--quick", action="store_true", help="a few epochs (seconds), for tests")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="embedding rows (default: the characters seen, plus padding); e.g. 50257, GPT-2's, to see "
                             "what a real vocabulary costs the monitor (the characters keep the first ids)")
    parser.add_argument("--probe-size", type=int, default=16, help="sequences in the monitor's probe")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.every = 2, 1
    for name in ("epochs", "length", "batch_size", "every", "threads"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.lr <= 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    return args


# ---------------------------------------------------------------------------------------------- data


def zen_of_python() -> str:
    """The Zen of Python, from the standard library (``import this`` prints it: the print is swallowed)."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return codecs.decode(this.s, "rot13")


def encode(text: str, length: int) -> tuple[list[list[int]], list[str]]:
    """Character ids (1 ..; 0 is the padding) of every non-empty line, cut into pieces of at most ``length``."""
    vocabulary = sorted(set(text) - {"\n"})
    ids = {c: i + 1 for i, c in enumerate(vocabulary)}
    pieces = [line[i : i + length] for line in text.splitlines() if line for i in range(0, len(line), length)]
    return [[ids[c] for c in piece] for piece in pieces], vocabulary


def collate(sequences: list[list[int]]) -> transformers.BatchEncoding:
    """A Hugging Face batch: right-padded ``input_ids`` and ``attention_mask``, ``labels`` = the next character
    (-100 at the padding and at each sequence's last position, where there is no next character)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), PAD, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        labels[row, : len(sequence) - 1] = torch.tensor(sequence[1:])
    attention_mask = (torch.arange(width)[None] < torch.tensor([len(s) for s in sequences])[:, None]).long()
    return transformers.BatchEncoding({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})


# ---------------------------------------------------------------------------------------------- model


class CharacterLM(pl.LightningModule):
    """A random-init GPT-2 trained on the next-character cross-entropy. Knows nothing of lightning_lazy."""

    def __init__(self, vocab_size: int, positions: int, lr: float) -> None:
        super().__init__()
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab_size, n_positions=positions,
                                         bos_token_id=PAD, eos_token_id=PAD, pad_token_id=PAD)
        self.model = transformers.GPT2LMHeadModel(config)
        self.lr = lr

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask)

    def _loss(self, batch: transformers.BatchEncoding) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"]).logits
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)

    def training_step(self, batch: transformers.BatchEncoding, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=len(batch["labels"]))
        return loss

    def validation_step(self, batch: transformers.BatchEncoding, batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch), batch_size=len(batch["labels"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


# ---------------------------------------------------------------------------------------------- run

# The last values printed at the end, beside what the monitor's summary already said: the losses of the model and
# of its twin, and the measures of the verdict. Every value (the per-layer ones of each of GPT-2's modules
# included) is in the CSV and in TensorBoard.
FINAL = (("train/loss", "train loss"), ("lazy/tangent/train_loss", "tangent model's train loss"),
         ("val/loss", "val loss"), ("lazy/tangent/val_loss", "tangent model's val loss"),
         ("lazy/divergence", "divergence"), ("lazy/kernel_alignment", "kernel alignment"))


def final_lines(metrics: dict[str, float], csv_path: Path, log_dir: str | None) -> str:
    """A few lines: the :data:`FINAL` values present in ``metrics``, and where all the others are."""
    from lightning_lazy.watch.report import tensorboard_command

    lines = [f"  {label:<28} {metrics[key]:.4g}" for key, label in FINAL if key in metrics]
    lines.append(f"  every measurement: {csv_path}")
    if log_dir is not None:
        lines.append(f"  TensorBoard: {tensorboard_command(log_dir)}")
    return "\n".join(["Last values:"] + lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # config notes about token ids a random-init model has no use for
    pl.seed_everything(args.seed, verbose=False)
    sequences, vocabulary = encode(zen_of_python(), args.length)
    train, val = sequences[:-4], sequences[-4:]  # the last lines held out
    vocab_size = max(len(vocabulary) + 1, args.vocab_size or 0)
    model = CharacterLM(vocab_size, args.length, args.lr)
    # κ and the NTK on the probe's first 4 sequences: a GPT-2's attention masks defeat vmap, so its kernel is
    # computed by Jacobian products, whose cost grows as the square of the examples.
    monitor = LazyTrainingMonitor(loss="cross_entropy", probe_size=args.probe_size, kappa_probe_size=4, ntk_probe_size=4,
                                  every_n_epochs=args.every, log_steps="log")
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[monitor],
                         logger=TensorBoardLogger(str(args.log_dir), name="gpt2_zen"), log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    started = time.perf_counter()
    trainer.fit(model, DataLoader(train, batch_size=args.batch_size, shuffle=True, collate_fn=collate),
                DataLoader(val, batch_size=args.batch_size, collate_fn=collate))
    seconds = time.perf_counter() - started
    args.out_dir.mkdir(parents=True, exist_ok=True)
    fields = sorted({key for row in monitor.history for key in row})
    with open(args.out_dir / "huggingface_lm.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(monitor.history)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print(f"{len(train)} training sequences, vocabulary {vocab_size}, {args.epochs} epochs in {seconds:.1f} s; "
          f"the NTK on {monitor.measures.ntk_outputs!r} outputs, kernel {tuple(monitor.measures.initial_kernel.shape)}")
    print(final_lines(metrics, args.out_dir / "huggingface_lm.csv", trainer.log_dir))
    return {"history": monitor.history, "metrics": metrics, "seconds": seconds, "monitor": monitor,
            "log_dir": trainer.log_dir}


if __name__ == "__main__":
    from lightning_lazy.quiet import quiet_third_party_output

    quiet_third_party_output()  # Lightning's own tips and deprecation notices: nothing this script can act on
    main()
