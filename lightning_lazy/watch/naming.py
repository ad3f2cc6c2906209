"""Layers named as the user's own network names them, for tags, figures and the summary.

The monitor measures modules by their path in what it watches, which holds wrappers the user did not write:
its own ``Watched`` (``inner``), :class:`~lightning_lazy.scaling.AlphaScaled` and
:class:`~lightning_lazy.tangent.LinearizedModel` (``module``), ``torch.compile`` (``_orig_mod``), DataParallel
(``module``), and the attribute of a LightningModule that holds the network (``model``, ``net``, ...). So the
demo's first layer is ``inner.model.module.0`` where the user wrote ``nn.Sequential(nn.Linear(10, 256), ...)``
and calls it ``0``.

- :func:`layer_names`: the short name, the path with those wrappers left out (``0``, ``features.3``,
  ``transformer.h.0.attn``). It stays a plain dotted path, so it is what tags carry:
  ``lazy/layers/<short name>/feature_movement``.
- :func:`layer_labels`: the short name and the module's type, ``0 Linear(10→256)``, for figures and the
  summary, where a person reads it (not for tags: spaces, arrows and brackets make poor tag filters).
- :func:`parameter_labels`: the same for parameter tensors, ``0.weight Linear(10→256)``.

Pure functions of a module and names; no Lightning import (a LightningModule is recognised by class name).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import nn

# The root's own parameters (a module owning an nn.Parameter directly, at the top of the watched network).
ROOT = "root"


def _wrapper_attribute(module: nn.Module) -> str | None:
    """The attribute through which ``module`` holds the network it wraps, when it is a wrapper the user did not
    write around their network; ``None`` otherwise."""
    from lightning_lazy.scaling import AlphaScaled
    from lightning_lazy.tangent import LinearizedModel
    from lightning_lazy.watch.twin import Watched

    if isinstance(module, Watched):
        return "inner"
    if isinstance(module, (AlphaScaled, LinearizedModel, nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return "module"
    if "_orig_mod" in module._modules:  # torch.compile's OptimizedModule
        return "_orig_mod"
    return None


def _is_lightning_module(module: nn.Module) -> bool:
    return any(cls.__name__ == "LightningModule" for cls in type(module).__mro__)


def _walk(network: nn.Module, name: str) -> tuple[list[str], nn.Module | None]:
    """``(kept, module)``: the components of ``name`` that are not a wrapper's attribute, and the module
    ``name`` names (``None`` when a component names no sub-module: a group label such as
    ``layer1_to_layer3``). The network a wrapper holds is its only child with parameters (``AlphaScaled``'s other
    child holds w0 as buffers), so leaving the wrapper's attribute out makes no two layers' paths equal."""
    kept: list[str] = []
    module: nn.Module | None = network
    for part in name.split(".") if name else []:
        if module is None or _wrapper_attribute(module) != part:
            kept.append(part)
        module = module._modules.get(part) if module is not None else None
    return kept, module


def _top(network: nn.Module) -> nn.Module:
    """The first module, going down from ``network`` through wrappers, that is not a wrapper."""
    module = network
    while (attribute := _wrapper_attribute(module)) is not None and module._modules.get(attribute) is not None:
        module = module._modules[attribute]  # type: ignore[assignment]
    return module


def layer_names(network: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """``{name: short name}``: each module path in ``network`` (as ``network.named_modules()`` gives it, or a
    group label of :func:`lightning_lazy.watch.probe.layer_groups`) as the user's own network names it.

    Left out of each path: the attribute of every wrapper on it (``Watched.inner``, ``AlphaScaled.module``,
    ``LinearizedModel.module``, ``torch.compile``'s ``_orig_mod``, ``DataParallel.module``), then, when
    the network's top is a LightningModule whose layers all sit under one attribute (``self.model``,
    ``self.net``) and it owns no parameter itself, that attribute. The demo's ``inner.model.module.0`` is ``0``;
    the README's ``inner.net.2`` is ``2``; a LightningModule with ``encoder`` and ``head`` keeps both.
    Parameters the top module owns directly (the name of the top itself) are ``root``.

    Short names are plain dotted paths (letters, digits, ``_``, ``.``, as PyTorch names modules), fit for tags.
    When leaving the wrappers out would give two names the same short name, the names are returned with only
    the wrapper attributes removed; if those still collide, as given. The order of ``names`` is kept.
    """
    names = list(dict.fromkeys(names))
    stripped = {name: _walk(network, name)[0] for name in names}
    firsts = {tuple(parts[:1]) for parts in stripped.values()}
    if (_is_lightning_module(_top(network)) and names and len(firsts) == 1
            and all(len(parts) > 1 for parts in stripped.values())):
        candidate = {name: parts[1:] for name, parts in stripped.items()}
    else:
        candidate = stripped
    for attempt in (candidate, stripped):
        short = {name: ".".join(parts) or ROOT for name, parts in attempt.items()}
        if len(set(short.values())) == len(short):
            return short
    return {name: name or ROOT for name in names}


def describe_module(module: nn.Module) -> str:
    """A module's type as a person reads it: ``Linear(10→256)``, ``Conv2d(3→64, 3×3)``, ``Embedding(50257, 32)``,
    ``BatchNorm2d(64)``, ``LayerNorm(256)``, Hugging Face's ``Conv1D(32→96)``; other modules by class name."""
    kind = type(module).__name__
    if isinstance(module, nn.Linear):
        return f"{kind}({module.in_features}→{module.out_features})"
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = "×".join(str(k) for k in module.kernel_size)
        return f"{kind}({module.in_channels}→{module.out_channels}, {kernel})"
    if kind == "Conv1D" and isinstance(getattr(module, "nx", None), int) and isinstance(getattr(module, "nf", None), int):
        return f"{kind}({module.nx}→{module.nf})"  # Hugging Face's GPT-2 projection: a Linear with its weight transposed
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return f"{kind}({module.num_embeddings}, {module.embedding_dim})"
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return f"{kind}({module.num_features})"
    if isinstance(module, nn.LayerNorm):
        return f"{kind}({', '.join(str(n) for n in module.normalized_shape)})"
    if isinstance(module, nn.GroupNorm):
        return f"{kind}({module.num_groups}, {module.num_channels})"
    return kind


def _label(short: str, module: nn.Module | None) -> str:
    if module is None:  # a group label of layer_groups: consecutive top-level children
        return short.replace("_to_", " to ")
    return f"{short} {describe_module(module)}"


def layer_labels(network: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """``{name: label}``: :func:`layer_names`' short name and the module's type (:func:`describe_module`),
    ``"0 Linear(10→256)"``, for figures and the summary. A group label of
    :func:`~lightning_lazy.watch.probe.layer_groups` that names no module (``layer1_to_layer3``) reads
    ``layer1 to layer3``; the top module's own parameters ``root <its class>``."""
    names = list(dict.fromkeys(names))
    short = layer_names(network, names)
    return {name: _label(short[name], _walk(network, name)[1]) for name in names}


def parameter_labels(network: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """``{parameter name: label}``: a parameter tensor's name (``inner.model.module.0.weight``) as
    ``<short module name>.<attribute> <module type>``, ``"0.weight Linear(10→256)"``; a parameter of the top
    module itself is ``<attribute> <its class>``."""
    names = list(dict.fromkeys(names))
    owners = {name: name.rpartition(".")[0] for name in names}
    short = layer_names(network, owners.values())
    labels = {}
    for name, owner in owners.items():
        attribute = name.rpartition(".")[2]
        module = _walk(network, owner)[1]
        path = attribute if short[owner] == ROOT else f"{short[owner]}.{attribute}"
        labels[name] = path if module is None else f"{path} {describe_module(module)}"
    return labels


def relabel(values: Mapping[str, object], labels: Mapping[str, str]) -> dict[str, object]:
    """``values`` with each key replaced by its label (keys without one kept)."""
    return {labels.get(key, key): value for key, value in values.items()}


__all__ = ["ROOT", "describe_module", "layer_labels", "layer_names", "parameter_labels", "relabel"]
