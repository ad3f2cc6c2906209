"""The monitor's options, grouped the way a user thinks of them: what to watch, what to measure, when, where to write.

Every adapter takes the same flat keywords (``loss=``, ``probe_size=``, ``log_steps=``, ...) and, as an alternative,
the four groups (``watch=Watch(...)``, ``measure=Measure(...)``, ``when=When(...)``, ``write=Write(...)``); both
give one :class:`WatchOptions`, validated once, at construction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from lightning_lazy.scaling import LossLike, check_alpha, resolve_loss
from lightning_lazy.watch.batches import BatchToXY
from lightning_lazy.watch.probe import NTK_OUTPUTS, NtkOutputs
from lightning_lazy.watch.twin import OutputSelector


@dataclass
class Watch:
    """What to watch: the objective and the network.

    ``loss``: R, ``"mse"``, ``"cross_entropy"`` or ``callable(output, y, **extra)``; ``alpha``: the scale when the
    model holds no ``AlphaScaled``; ``model``: the sub-module (attribute path) or ``callable(module, x)`` whose
    output the loss reads; ``output``: the part of a non-tensor output that is the model output (a key, an
    attribute, a callable); ``batch_to_xy``: ``batch -> (x, y)`` or ``(x, y, loss_kwargs)``; ``track_tangent``: keep
    the linearized twin (Δ, tangent gap, tangent losses).
    """

    loss: LossLike | None = None
    alpha: float | None = None
    model: str | Callable[..., Any] | None = None
    output: str | OutputSelector | None = None
    batch_to_xy: BatchToXY | None = None
    track_tangent: bool = True


@dataclass
class Measure:
    """What to measure, and on what: the probe, its sizes, the costly measures.

    ``probe``: fixed probe inputs ``x`` or ``(x, y)`` (or a Hugging Face batch, or a ``Dataset`` to draw
    ``probe_size`` examples from); ``kappa_probe_size`` / ``ntk_probe_size`` / ``layer_probe_size``: the first
    examples of the probe used for κ, the NTK, feature movement; ``ntk_outputs``: ``"auto"``, ``"all"``,
    ``"labels"`` or a callable; ``kappa``, ``ntk``, ``per_layer``: switch those measures on or off;
    ``max_layers``: per-layer entries at most; ``kernel_baseline``: examples for the kernel predictor at w0.
    """

    probe: Any = None
    probe_size: int = 256
    kappa_probe_size: int = 16
    ntk_probe_size: int = 16
    ntk_outputs: NtkOutputs = "auto"
    kappa: bool = True
    ntk: bool = True
    per_layer: bool = True
    layer_probe_size: int = 64
    max_layers: int = 32
    kernel_baseline: int | None = None


@dataclass
class When:
    """When to measure: ``log_steps`` (``"log"`` for steps 1, 2, 4, 8, ..., a list, or ``None``) and every
    ``every_n_epochs`` epoch ends (epochs exist where the framework has them); ``budget``: the share of the run's
    wall time the measurements may take (default 5 %; ``None``: no limit, every scheduled measurement in full; see
    :class:`~lightning_lazy.watch.schedule.Budget`)."""

    log_steps: str | Sequence[int] | None = "log"
    every_n_epochs: int = 1
    budget: float | None = 0.05


@dataclass
class Write:
    """Where to write: ``figure`` (the laziness figure, the per-layer heat map and the summary) and, for the plain
    loop, ``log_dir`` (TensorBoard events, ``lazy_metrics.csv``, the PNGs) or explicit ``writers``."""

    figure: bool = True
    log_dir: str | None = None
    writers: Sequence[Any] | None = None


_GROUPS = {"watch": Watch, "measure": Measure, "when": When, "write": Write}
# Flat keyword -> (group, field): the names the monitor has always taken.
_FLAT = {
    "loss": ("watch", "loss"), "alpha": ("watch", "alpha"), "model": ("watch", "model"),
    "output": ("watch", "output"), "batch_to_xy": ("watch", "batch_to_xy"),
    "track_tangent": ("watch", "track_tangent"),
    "probe": ("measure", "probe"), "probe_size": ("measure", "probe_size"),
    "kappa_probe_size": ("measure", "kappa_probe_size"), "ntk_probe_size": ("measure", "ntk_probe_size"),
    "ntk_outputs": ("measure", "ntk_outputs"), "measure_kappa": ("measure", "kappa"),
    "measure_ntk": ("measure", "ntk"), "per_layer": ("measure", "per_layer"),
    "layer_probe_size": ("measure", "layer_probe_size"), "max_layers": ("measure", "max_layers"),
    "kernel_baseline": ("measure", "kernel_baseline"),
    "log_steps": ("when", "log_steps"), "every_n_epochs": ("when", "every_n_epochs"), "budget": ("when", "budget"),
    "figure": ("write", "figure"), "log_dir": ("write", "log_dir"), "writers": ("write", "writers"),
}


@dataclass
class WatchOptions:
    """All options, by group; :meth:`build` takes the flat keywords and/or the groups."""

    watch: Watch = field(default_factory=Watch)
    measure: Measure = field(default_factory=Measure)
    when: When = field(default_factory=When)
    write: Write = field(default_factory=Write)

    @classmethod
    def build(cls, groups: dict[str, Any] | None = None, **flat: Any) -> WatchOptions:
        """Options from the groups given (``{"watch": Watch(...), ...}``, ``None`` entries ignored) and the flat
        keywords that differ from their defaults (a flat keyword and its group's field both set: ``ValueError``).
        Validates every value; raises ``ValueError`` naming the option and what it takes."""
        chosen = {name: (value if value is not None else _GROUPS[name]()) for name, value in (groups or {}).items()}
        for name, value in chosen.items():
            if not isinstance(value, _GROUPS[name]):
                raise ValueError(f"{name}= takes a lightning_lazy.{_GROUPS[name].__name__}, got {type(value).__name__}")
        options = cls(**{name: dataclasses.replace(value) for name, value in chosen.items()})
        for key, value in flat.items():
            if key not in _FLAT:
                raise TypeError(f"unknown option {key!r}")
            group, name = _FLAT[key]
            default = next(f for f in dataclasses.fields(_GROUPS[group]) if f.name == name).default
            if value is default or (value == default and not isinstance(value, Tensor) and not callable(value)):
                continue
            target = getattr(options, group)
            if group in (groups or {}) and groups[group] is not None and getattr(target, name) != default:
                raise ValueError(f"{key}= is given twice: as a keyword and in {group}=; give it once")
            setattr(target, name, value)
        options.validate()
        return options

    def validate(self) -> None:
        """Check every value; ``ValueError`` naming the option otherwise. Resolves ``loss`` and ``alpha``."""
        m, w = self.measure, self.when
        for name, value in (("probe_size", m.probe_size), ("kappa_probe_size", m.kappa_probe_size),
                            ("ntk_probe_size", m.ntk_probe_size), ("every_n_epochs", w.every_n_epochs),
                            ("layer_probe_size", m.layer_probe_size), ("max_layers", m.max_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if w.budget is not None and not (isinstance(w.budget, (int, float)) and 0 < w.budget < 1):
            raise ValueError(f"budget must be None or a share of the run's wall time in (0, 1), got {w.budget!r}")
        if isinstance(w.log_steps, str) and w.log_steps != "log":
            raise ValueError(f"log_steps must be 'log', a list of steps or None, got {w.log_steps!r}")
        if not callable(m.ntk_outputs) and m.ntk_outputs not in NTK_OUTPUTS:
            raise ValueError(f"ntk_outputs must be one of {NTK_OUTPUTS} or a callable(output, y) -> [N, K'], "
                             f"got {m.ntk_outputs!r}")
        model = self.watch.model
        if model is not None and not isinstance(model, str) and not callable(model):
            raise ValueError(f"model must be None, an attribute path or a callable(module, x), got {model!r}")
        if m.kernel_baseline is not None and (not isinstance(m.kernel_baseline, int) or m.kernel_baseline < 1):
            raise ValueError(f"kernel_baseline must be None or a positive number of training examples, "
                             f"got {m.kernel_baseline!r}")
        if self.watch.loss is not None:
            self.watch.loss = resolve_loss(self.watch.loss)
        if self.watch.alpha is not None:
            self.watch.alpha = check_alpha(self.watch.alpha)


__all__ = ["Measure", "Watch", "WatchOptions", "When", "Write"]
