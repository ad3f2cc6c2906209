import sys
from pathlib import Path

import torch

# Test helper modules (helpers_core.py, lightning_helpers.py, ...) import as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))

# The suite's models are tiny: one thread avoids OpenMP overhead and oversubscription on a shared 2-core machine.
torch.set_num_threads(1)
