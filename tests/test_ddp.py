"""DDP on two CPU processes (gloo): the twins stay identical on both ranks and match a one-process run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "ddp_worker.py"


def _run(out: Path, devices: int, batch_size: int, *extra: str) -> None:
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_"))}
    result = subprocess.run([sys.executable, str(WORKER), str(out), str(devices), str(batch_size), *extra], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_ddp_twins_identical_and_equal_to_single_process(tmp_path):
    # Each of 2 ranks takes 8 examples a step (DistributedSampler interleaves them); one process takes the same
    # 16. Mean-reduced gradients make the two runs the same training.
    _run(tmp_path / "ddp", devices=2, batch_size=8)
    _run(tmp_path / "single", devices=1, batch_size=16)
    rank0, rank1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in (0, 1))
    single = torch.load(tmp_path / "single" / "rank0.pt")
    for name, value in rank0["twin"].items():
        assert torch.equal(value, rank1["twin"][name]), f"twins differ across ranks: {name}"
        torch.testing.assert_close(value, single["twin"][name], rtol=1e-10, atol=1e-12)
    for name, value in rank0["real"].items():
        torch.testing.assert_close(value, single["real"][name], rtol=1e-10, atol=1e-12)
    for key, value in single["measures"].items():
        assert rank0["measures"][key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
        assert rank1["measures"][key] == rank0["measures"][key], key
    assert rank0["measures"]["divergence"] > 0
    for key in ("lazy/tangent/val_loss", "lazy/divergence"):
        assert rank0["logged"][key] == pytest.approx(single["logged"][key], rel=1e-6), key


def test_ddp_batchnorm_measures_agree_across_ranks(tmp_path):
    # Each rank's BatchNorm running statistics follow its own batches; the twin mirrors its rank's, as DDP
    # leaves the real ones, and the measures (which normalize the probe by its own statistics) agree exactly.
    _run(tmp_path / "ddp", 2, 8, "bn")
    rank0, rank1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in (0, 1))
    for name, value in rank0["twin"].items():
        assert torch.equal(value, rank1["twin"][name]), f"twins differ across ranks: {name}"
    for key, value in rank0["measures"].items():
        assert rank1["measures"][key] == value, key
    assert rank0["measures"]["divergence"] > 0
