"""lightning_lazy: see and control lazy training (Chizat, Oyallon & Bach, NeurIPS 2019) in PyTorch Lightning."""

from lightning_lazy import diagnostics
from lightning_lazy.callback import LazyTrainingMonitor
from lightning_lazy.module import LazyClassifier
from lightning_lazy.quiet import load_jvp_decompositions_quietly
from lightning_lazy.scaling import AlphaScaled, resolve_loss, scaled_loss
from lightning_lazy.tangent import LinearizedModel
from lightning_lazy.watch.core import LazinessWatch
from lightning_lazy.watch.options import Measure, Watch, When, Write

# The package's forward-mode AD would make torch warn about its own internals on first use; see there.
load_jvp_decompositions_quietly()

__all__ = [
    "AlphaScaled",
    "LazinessWatch",
    "LazyClassifier",
    "LazyTrainingMonitor",
    "LinearizedModel",
    "Measure",
    "Watch",
    "When",
    "Write",
    "diagnostics",
    "resolve_loss",
    "scaled_loss",
]
__version__ = "0.1.0"
