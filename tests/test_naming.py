"""Layer names as the user's network names them (lightning_lazy.watch.naming)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn

from lightning_lazy import AlphaScaled, LinearizedModel
from lightning_lazy.diagnostics import parameter_owning_modules
from lightning_lazy.watch.naming import describe_module, layer_labels, layer_names, parameter_labels
from lightning_lazy.watch.probe import layer_groups
from lightning_lazy.watch.twin import Watched


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(10, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1))


class Held(pl.LightningModule):
    """The demo's shape: a LightningModule holding ``AlphaScaled(network)`` in one attribute."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.model = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class TwoParts(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)


class OwnParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.body = nn.Sequential(nn.Linear(3, 3))


def layers(network: nn.Module) -> list[str]:
    return parameter_owning_modules(network)


def test_the_demo_layers_are_named_as_the_users_sequential_names_them() -> None:
    watched = Watched(Held(AlphaScaled(mlp(), alpha=100.0)))
    names = layers(watched)
    assert names == ["inner.model.module.0", "inner.model.module.2", "inner.model.module.4"]
    assert list(layer_names(watched, names).values()) == ["0", "2", "4"]
    assert list(layer_labels(watched, names).values()) == ["0 Linear(10→256)", "2 Linear(256→256)", "4 Linear(256→1)"]
    # Without the monitor's wrapper, from the LightningModule's own names: the same.
    assert list(layer_names(Held(AlphaScaled(mlp(), 1.0)), ["model.module.0", "model.module.4"]).values()) == ["0", "4"]


def test_parameters_carry_their_layer_and_type() -> None:
    watched = Watched(Held(AlphaScaled(mlp(), alpha=0.1)))
    labels = parameter_labels(watched, [name for name, _ in watched.named_parameters()])
    assert labels["inner.model.module.0.weight"] == "0.weight Linear(10→256)"
    assert labels["inner.model.module.4.bias"] == "4.bias Linear(256→1)"


def test_linearized_and_compiled_wrappers_are_left_out() -> None:
    net = nn.Sequential()
    net.add_module("features", nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU()))
    net.add_module("classifier", nn.Linear(16, 10))
    linearized = Held(LinearizedModel(AlphaScaled(net, 1.0)))
    names = layers(linearized)
    assert names == ["model.module.module.features.0", "model.module.module.classifier"]
    assert layer_labels(linearized, names) == {"model.module.module.features.0": "features.0 Conv2d(3→16, 3×3)",
                                               "model.module.module.classifier": "classifier Linear(16→10)"}
    compiled = Held(torch.compile(mlp()))  # building the wrapper compiles nothing
    assert list(layer_names(compiled, layers(compiled)).values()) == ["0", "2", "4"]


def test_a_lightning_module_with_several_parts_keeps_their_names() -> None:
    module = TwoParts()
    assert layer_labels(module, layers(module)) == {"encoder": "encoder Linear(4→8)", "head": "head Linear(8→2)"}


def test_a_plain_network_keeps_its_own_single_child() -> None:
    # Only a LightningModule's attribute is a holder; the user's own nn.Module names are theirs.
    net = nn.Sequential()
    net.add_module("body", mlp())
    assert list(layer_names(net, layers(net)).values()) == ["body.0", "body.2", "body.4"]


def test_parameters_of_the_top_module_are_root() -> None:
    watched = Watched(OwnParameter())
    names = layers(watched)
    assert names == ["inner", "inner.body.0"]
    assert layer_labels(watched, names) == {"inner": "root OwnParameter", "inner.body.0": "body.0 Linear(3→3)"}
    assert parameter_labels(watched, ["inner.scale"]) == {"inner.scale": "scale OwnParameter"}


def test_groups_of_layer_groups_keep_readable_names() -> None:
    net = nn.Sequential(*[nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)) for _ in range(6)])
    watched = Watched(Held(AlphaScaled(net, 1.0)))
    groups = layer_groups(layers(watched), max_layers=3)
    names = list(dict.fromkeys(groups.values()))
    assert names == ["inner.model.module.0_to_1", "inner.model.module.2_to_3", "inner.model.module.4_to_5"]
    assert list(layer_names(watched, names).values()) == ["0_to_1", "2_to_3", "4_to_5"]
    assert list(layer_labels(watched, names).values()) == ["0 to 1", "2 to 3", "4 to 5"]
    top_level = list(dict.fromkeys(layer_groups(layers(watched), max_layers=6).values()))
    assert layer_labels(watched, top_level)["inner.model.module.3"] == "3 Sequential"


def test_a_wrapper_inside_the_network_loses_only_its_attribute() -> None:
    net = nn.Sequential(nn.Linear(3, 4), AlphaScaled(nn.Linear(4, 2), alpha=2.0))
    watched = Watched(Held(net))
    assert layer_labels(watched, layers(watched)) == {"inner.model.0": "0 Linear(3→4)",
                                                      "inner.model.1.module": "1 Linear(4→2)"}


def test_a_name_that_is_no_module_is_kept_after_its_wrappers() -> None:
    watched = Watched(Held(AlphaScaled(mlp(), 1.0)))
    assert layer_labels(watched, ["inner.model.module.0", "inner.model.module.extra"]) == {
        "inner.model.module.0": "0 Linear(10→256)", "inner.model.module.extra": "extra"}


def test_descriptions() -> None:
    assert describe_module(nn.Conv1d(1, 25, 5)) == "Conv1d(1→25, 5)"
    assert describe_module(nn.Embedding(50257, 32)) == "Embedding(50257, 32)"
    assert describe_module(nn.BatchNorm2d(64)) == "BatchNorm2d(64)"
    assert describe_module(nn.LayerNorm(256)) == "LayerNorm(256)"
    assert describe_module(nn.GroupNorm(4, 16)) == "GroupNorm(4, 16)"
    assert describe_module(nn.ReLU()) == "ReLU"
    from transformers.pytorch_utils import Conv1D

    assert describe_module(Conv1D(96, 32)) == "Conv1D(32→96)"  # nf = 96 outputs of nx = 32 inputs
