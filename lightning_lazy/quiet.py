"""Silence, narrowly, what other libraries print that a user of this package cannot act on.

Used by the ``lightning-lazy`` commands, the demo and the examples; importing ``lightning_lazy`` changes
no warning filter or logger. Each filter names one message of one library, so every other warning,
including the same kind of warning from the user's own code, still shows.
"""

from __future__ import annotations

import logging
import os
import warnings

# Lightning's logger for rank_zero_info (the "GPU available", "Tip" and "`Trainer.fit` stopped" lines), and
# the same logger under the unified ``lightning`` package, which a user's script may import instead.
LIGHTNING_INFO_LOGGER = "pytorch_lightning.utilities.rank_zero"
LIGHTNING_INFO_LOGGERS = (LIGHTNING_INFO_LOGGER, "lightning.pytorch.utilities.rank_zero")
# Lightning 2.6 advertises its cloud products on every Trainer: not about the user's run.
TIP_PREFIXES = ("💡 Tip:",)
# What the demo drops besides: it fixes accelerator="cpu" and max_epochs itself, so Lightning's lines on
# the available accelerators and on reaching max_epochs, repeated for every alpha, tell the user nothing.
DEMO_PREFIXES = ("GPU available:", "TPU available:", "HPU available:", "`Trainer.fit` stopped:")


class _DropPrefixes(logging.Filter):
    """Drops the log records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def _add_filter(prefixes: tuple[str, ...]) -> None:
    for name in LIGHTNING_INFO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefixes) and f.prefixes == prefixes for f in logger.filters):
            logger.addFilter(_DropPrefixes(prefixes))


def quiet_third_party_output(demo: bool = False) -> None:
    """Hide Lightning's advertising tips, its internal deprecation warning on ``LeafSpec``, and its warning on
    the length of the package's teacher-student stream.

    ``demo``: also hide Lightning's accelerator and "max_epochs reached" lines (see ``DEMO_PREFIXES``).
    Idempotent.
    """
    # Lightning's own use of a torch pytree class that recent torch (2.14 here) deprecates: only a Lightning
    # upgrade can fix it.
    lightning = r"(pytorch_lightning|lightning\.pytorch)"
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=lightning + r"\.utilities\._pytree")
    # Lightning warns on any IterableDataset with __len__ that multi-process loading could make the length
    # wrong; the package's teacher-student stream (FreshTeacherSamples) splits its batches among workers
    # itself, so its length is exact, and the commands and examples load no other IterableDataset.
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined",
                            module=lightning + r"\.utilities\.data")
    _add_filter(TIP_PREFIXES)
    if demo:
        _add_filter(DEMO_PREFIXES)


def load_jvp_decompositions_quietly() -> None:
    """Load torch's forward-AD decompositions now, hiding the one warning their loading raises.

    The first forward-mode AD call (``torch.func.jvp``, which this package uses for the tangent model and
    the diagnostics) makes torch script its decompositions with ``torch.jit.script``, which recent torch
    (2.14 here) reports as deprecated: a FutureWarning about torch's internals, once per process. Loading
    them here, under a scoped filter, hides exactly that; a ``torch.jit.script`` in the user's own code
    still warns.
    """
    # Same condition as torch.autograd.forward_ad._maybe_load_decompositions: otherwise torch never loads them.
    if os.environ.get("PYTORCH_JIT", "1") != "1" or not __debug__:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        from torch._decomp import decompositions_for_jvp  # noqa: F401
