"""Model inputs as one tensor ``[N, ...]`` or a dict of tensors sharing their first dimension (``input_ids``,
``attention_mask`` of a Hugging Face batch): the few operations the twin, the probe and the monitor need on them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

import torch
from torch import Tensor

Inputs = Union[Tensor, dict[str, Tensor]]


def as_inputs(x: Any, what: str = "the model input x") -> Inputs:
    """``x`` as a tensor, or a mapping (``dict``, ``BatchEncoding``) as a plain ``{name: tensor}`` dict whose tensors
    share their first dimension. Raises ``ValueError`` naming what was wrong otherwise."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, Mapping):
        items = dict(x)
        bad = [k for k, v in items.items() if not isinstance(v, Tensor)]
        if not items or bad:
            raise ValueError(f"{what} is a mapping, which must hold tensors [N, ...] only; "
                             f"{'it is empty' if not items else f'{bad[:3]} are not tensors'}")
        sizes = {k: (v.shape[0] if v.dim() else None) for k, v in items.items()}
        if len(set(sizes.values())) != 1 or None in sizes.values():
            raise ValueError(f"the tensors of {what} must share their first (example) dimension, got sizes {sizes}")
        return items
    raise ValueError(f"{what} must be a tensor [N, ...] or a dict of tensors sharing their first dimension, "
                     f"got a {type(x).__name__}")


def num_examples(x: Inputs) -> int:
    """N, the first dimension of ``x`` (of every tensor of a dict)."""
    return len(x) if isinstance(x, Tensor) else len(next(iter(x.values())))


def take(x: Inputs, index: slice | Tensor) -> Inputs:
    """The examples ``index`` (a slice or an index tensor) of ``x``."""
    return x[index] if isinstance(x, Tensor) else {k: v[index] for k, v in x.items()}


def inputs_device(x: Inputs) -> torch.device:
    return (x if isinstance(x, Tensor) else next(iter(x.values()))).device


def inputs_to(x: Inputs, device: Any, float_dtype: torch.dtype | None = None) -> Inputs:
    """``x`` on ``device``; floating tensors also cast to ``float_dtype`` (integer token ids are left as they are)."""
    def move(t: Tensor) -> Tensor:
        t = t.to(device)
        return t.to(float_dtype) if float_dtype is not None and t.is_floating_point() else t

    return move(x) if isinstance(x, Tensor) else {k: move(v) for k, v in x.items()}


def call_with(module: Any, x: Inputs) -> Any:
    """``module(x)``, or ``module(**x)`` for a dict of named inputs (the Hugging Face convention)."""
    return module(**x) if isinstance(x, Mapping) else module(x)
