"""What the commands and examples hide from the terminal, and what they must not hide."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

from lightning_lazy.quiet import LIGHTNING_INFO_LOGGER, quiet_third_party_output

LEAFSPEC = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and treespec.is_leaf()`"


def test_lightning_leafspec_warning_is_hidden_only_from_lightning() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party_output()
        warnings.warn_explicit(LEAFSPEC, FutureWarning, "_pytree.py", 21, module="pytorch_lightning.utilities._pytree")
        warnings.warn_explicit(LEAFSPEC, FutureWarning, "_pytree.py", 21, module="lightning.pytorch.utilities._pytree")
        warnings.warn_explicit(LEAFSPEC, FutureWarning, "mine.py", 1, module="my_package.trees")
        warnings.warn_explicit("something else", FutureWarning, "_pytree.py", 30,
                               module="pytorch_lightning.utilities._pytree")
    assert [(w.filename, str(w.message)) for w in caught] == [("mine.py", LEAFSPEC), ("_pytree.py", "something else")]


def test_tips_are_dropped_and_other_lightning_lines_kept() -> None:
    quiet_third_party_output()
    logger = logging.getLogger(LIGHTNING_INFO_LOGGER)
    assert logging.getLogger("lightning.pytorch.utilities.rank_zero").filters  # the unified package's logger too

    def passes(message: str) -> bool:
        return bool(logger.filter(logging.LogRecord(LIGHTNING_INFO_LOGGER, logging.INFO, "x.py", 1, message, (), None)))

    assert not passes("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
    assert passes("LazyTrainingMonitor: alpha = 1, ||Dh(w0)|| = 2.5, kappa(w0) = 1.8")
    quiet_third_party_output(demo=True)
    assert not passes("GPU available: False, used: False")
    assert passes("Laziness summary\n  alpha  1")


def test_forward_ad_does_not_warn_about_torch_internals_but_user_jit_still_does() -> None:
    # A fresh interpreter: torch loads its forward-AD decompositions once per process.
    code = (
        "import warnings, torch, lightning_lazy\n"
        "warnings.simplefilter('error', FutureWarning)\n"
        "torch.func.jvp(torch.sin, (torch.ones(2),), (torch.ones(2),))\n"  # the package's kind of call: silent
        "try:\n"
        "    torch.jit.script(torch.nn.Linear(2, 2))\n"
        "except FutureWarning as w:\n"
        "    print('user warned:', w)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert done.returncode == 0, done.stderr
    assert "user warned: `torch.jit.script` is deprecated" in done.stdout
