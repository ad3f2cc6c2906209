"""Conventions and plumbing shared by the measures: model-like objects, parameter dicts, probe checks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Union

import torch
from torch import Tensor, nn

from lightning_lazy._forward_ad import forward_ad_safe
from lightning_lazy._params import eval_mode, functional_call

Params = dict[str, Tensor]
FunctionalModel = Callable[[Params, Tensor], Tensor]
ModelLike = Union[nn.Module, FunctionalModel]

#: Default memory budget of :func:`empirical_ntk` and of :func:`hessian_norm`'s Lanczos basis, in numbers
#: (tensor elements): 2^27, i.e. 1 GiB in float64, 512 MiB in float32. Kernels and parameters are not counted.
DEFAULT_MEMORY_BUDGET = 1 << 27

# ----------------------------------------------------------------------------------------------------
# plumbing


def _check_probe(x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"the probe batch must be a tensor [N, ...], got {type(x).__name__}")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(
            f"the probe batch is empty (shape {tuple(x.shape)}): give at least one example, shaped [N, ...]"
        )


def _trainable_params(model: ModelLike, params: Params | None) -> Params:
    if params is not None:
        if not params:
            raise ValueError("params is empty: the measures need at least one parameter tensor")
        return {name: p.detach() for name, p in params.items()}
    if not isinstance(model, nn.Module):
        raise ValueError("a functional model fn(params, x) needs its params passed explicitly")
    found = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if not found:
        raise ValueError(f"{type(model).__name__} has no trainable parameters to differentiate")
    return found


def _as_function(model: ModelLike, x: Tensor) -> Callable[[Params], Tensor]:
    """``params -> model output on x``, flattened to ``[N, K]``."""

    def f(p: Params) -> Tensor:
        out = functional_call(model, p, (x,)) if isinstance(model, nn.Module) else model(p, x)
        if not isinstance(out, Tensor):
            raise TypeError(f"the model must return one tensor [N, K], got {type(out).__name__}")
        if out.dim() == 0 or out.shape[0] != x.shape[0]:
            raise ValueError(
                f"the model returned shape {tuple(out.shape)} for a probe of {x.shape[0]} examples; "
                "the measures need one output row per example, [N, K]"
            )
        return out.reshape(out.shape[0], -1)

    return f


def _output(model: ModelLike, x: Tensor, params: Params) -> Tensor:
    """The model on ``x`` at ``params``, ``[N, K]``: one no-grad forward, as every measure sees the model."""
    with _evaluating(model), torch.no_grad():
        return _as_function(model, x)({k: v.detach() for k, v in params.items()})


def _evaluating(model: ModelLike) -> contextlib.AbstractContextManager[None]:
    """Eval mode for a module, and forward-AD-capable kernels (for functional models too) around every jvp/vjp."""
    stack = contextlib.ExitStack()
    if isinstance(model, nn.Module):
        stack.enter_context(eval_mode(model))
    stack.enter_context(forward_ad_safe(model if isinstance(model, nn.Module) else None))
    return stack


def _random_like(reference: Tensor, seed: int) -> Tensor:
    # Drawn on the CPU from a fixed seed: the measures are reproducible (a resumed run logs the same
    # values) and do not consume the training RNG.
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(reference.shape, generator=generator, dtype=reference.dtype).to(reference.device)
