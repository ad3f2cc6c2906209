"""Reading a training batch as ``(x, y)`` or ``(x, y, loss_kwargs)``: the readers every adapter shares."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_lazy.scaling import IGNORE_INDEX

BatchToXY = Callable[[Any], tuple]


class WatchError(ValueError):
    """A refusal of the core: one line naming the cause and the way out (adapters re-raise it as their framework's
    configuration error)."""


def default_batch_to_xy(batch: Any) -> tuple[Any, Tensor]:
    """Reads a batch as ``(x, y)``: a tuple, a list, a dict with keys ``"x"`` and ``"y"``, or a Hugging Face batch.

    A Hugging Face batch is a mapping (``dict``, ``BatchEncoding``) with ``"labels"``: y is the labels (−100 at the
    positions the loss ignores, which every measure then ignores too) and x the dict of the other model inputs
    (``input_ids``, ``attention_mask``, ...), with which the watched model is called as ``model(**x)``. The labels
    are read as the targets of the logits at the same positions; a causal LM's own tokens as labels are shifted
    as the model shifts them (see :func:`causal_lm_batch_to_xy`) when the monitor watches a causal LM.
    Raises :class:`WatchError` for any other batch.
    """
    if isinstance(batch, Mapping) and "x" in batch and "y" in batch:
        return batch["x"], batch["y"]
    if isinstance(batch, Mapping) and "labels" in batch and isinstance(batch["labels"], Tensor):
        return named_inputs(batch), batch["labels"]
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, Tensor) for t in batch):
        return batch[0], batch[1]
    described = type(batch).__name__ + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    raise WatchError(
        f"the monitor reads batches as (x, y), but got a {described}. Pass "
        "batch_to_xy=lambda batch: (inputs, targets) (or (inputs, targets, loss_kwargs))."
    )


def causal_lm_batch_to_xy(batch: Mapping[str, Any]) -> tuple[dict[str, Any], Tensor]:
    """Reads a Hugging Face causal-LM batch whose ``labels`` are the input tokens themselves (as
    ``DataCollatorForLanguageModeling(mlm=False)`` makes them; the model shifts them inside its own loss): x = the
    other model inputs, y = the labels shifted by one, ``y[:, t] = labels[:, t + 1]``, −100 at the last position.
    Cross-entropy of the logits against y at every position is then the loss the model computes itself. Raises
    :class:`WatchError` for a batch without ``labels`` of shape ``[N, T]``."""
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if not isinstance(labels, Tensor) or labels.dim() != 2:
        raise WatchError(
            "causal_lm_batch_to_xy reads a Hugging Face batch with labels [N, T] (the input tokens); got "
            f"{type(batch).__name__}{'' if labels is None else f' with labels of shape {tuple(labels.shape)}'}"
        )
    return named_inputs(batch), shift_labels(labels)


def shift_labels(labels: Tensor) -> Tensor:
    """``y[:, t] = labels[:, t + 1]``, −100 at the last position: the targets a causal LM's logits at t are scored on."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)


def named_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """A Hugging Face batch's model inputs: everything but its ``labels``."""
    return {k: v for k, v in batch.items() if k != "labels"}


def is_causal_lm(module: Any) -> bool:
    """Whether ``module`` (or the module it wraps) is a Hugging Face causal LM, which shifts its labels inside its own
    loss: by its class (``*ForCausalLM``, ``*LMHeadModel``) and its config (``is_decoder`` or a decoder-only
    ``architectures`` entry)."""
    for sub in (module, getattr(module, "inner", None), getattr(module, "module", None)):
        name = type(sub).__name__ if sub is not None else ""
        if name.endswith(("ForCausalLM", "LMHeadModel")):
            return True
    return False


def self_labelled(x: Any, y: Any) -> bool:
    """``y`` are the tokens of ``x["input_ids"]`` themselves (−100 aside): a causal LM trained on its own text."""
    ids = x.get("input_ids") if isinstance(x, Mapping) else None
    if not isinstance(ids, Tensor) or not isinstance(y, Tensor) or ids.shape != y.shape:
        return False
    kept = y != IGNORE_INDEX
    return bool(kept.any()) and bool((y[kept] == ids[kept]).all())


def read_batch(batch_to_xy: BatchToXY, batch: Any) -> tuple[Any, Any, dict]:
    """``(x, y, loss_kwargs)`` from ``batch_to_xy(batch)``; raises :class:`WatchError` for another return shape."""
    read = batch_to_xy(batch)
    if not isinstance(read, (tuple, list)) or len(read) not in (2, 3):
        raise WatchError(f"batch_to_xy must return (x, y) or (x, y, loss_kwargs), got a {type(read).__name__}")
    x, y, *rest = read
    return x, y, (rest[0] if rest else {})


__all__ = ["BatchToXY", "WatchError", "causal_lm_batch_to_xy", "default_batch_to_xy", "read_batch"]
