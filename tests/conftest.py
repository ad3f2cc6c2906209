import os
import sys
from pathlib import Path

import pytest
import torch

# Test helper modules (helpers_core.py, lightning_helpers.py, ...) import as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))

# The suite's models are tiny: one thread avoids OpenMP overhead and oversubscription on a shared 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread in every test, whatever a script run before it set: tiny models on a shared 2-core
    machine only contend with intra-op threads (10-100x slowdowns seen)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def restore_global_state():
    """For tests of scripts that seed globally (pl.seed_everything) and set torch threads: put back the global
    seed, RNG state and thread count afterwards, so other tests are unaffected."""
    seed_env, rng, threads = os.environ.get("PL_GLOBAL_SEED"), torch.get_rng_state(), torch.get_num_threads()
    yield
    if seed_env is None:
        os.environ.pop("PL_GLOBAL_SEED", None)
    else:
        os.environ["PL_GLOBAL_SEED"] = seed_env
    torch.set_rng_state(rng)
    torch.set_num_threads(threads)
