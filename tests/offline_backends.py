"""W&B and MLflow for the tests, real and offline: every file under tmp_path, no network, no process or global
setting left behind; and an offline W&B run's history read back from its transaction log (``run-<id>.wandb``),
which an offline run keeps instead of the server's copy."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """Offline W&B writing under ``tmp_path/wandb``; afterwards the run is finished and wandb's service stopped."""
    root = tmp_path / "wandb-home"
    for name, value in {
        "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true", "WANDB_QUIET": "true",
        "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true", "WANDB_CONSOLE": "off",
        "WANDB_CONFIG_DIR": str(root / "config"), "WANDB_CACHE_DIR": str(root / "cache"),
        "WANDB_DATA_DIR": str(root / "data"), "WANDB_ARTIFACT_DIR": str(root / "artifacts"),
        "WANDB__DISABLE_STATS": "true", "WANDB__DISABLE_MACHINE_INFO": "true", "WANDB_ERROR_REPORTING": "false",
        "WANDB_PROJECT": "lightning-lazy-test",
    }.items():
        monkeypatch.setenv(name, value)
    import wandb

    yield wandb
    finish_wandb()


def finish_wandb() -> None:
    """Finish the active W&B run and stop wandb's service process: only then is the offline run's transaction
    log complete on disk (``run.finish()`` alone returned before its last rows were written, seen here)."""
    import wandb

    if wandb.run is not None:
        wandb.run.finish()
    wandb.teardown()


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    """A ``file:`` tracking URI on ``tmp_path/mlruns``, the default for ``mlflow`` here; afterwards no run is active
    and the URI is unset (Lightning's ``MLFlowLogger`` sets it globally)."""
    # MLflow 3 refuses a file store (in maintenance) unless told; the tests ask for one on tmp_path.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # nothing in ~/.config/mlflow, no network tries
    uri = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def mlflow_artifacts(client, run_id: str) -> Path:
    """The local folder of a run's artifacts on a file store."""
    from urllib.parse import urlparse

    return Path(urlparse(client.get_run(run_id).info.artifact_uri).path)


def _records(path: Path):
    """The records of a W&B transaction log: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks of
    chunks, each ``crc32 (4) | length (2, little-endian) | type (1: full, 2: first, 3: middle, 4: last)``."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def history(run_dir: str | Path) -> list[dict]:
    """The rows ``run.log`` wrote, media as W&B stores them (``key/_type``, ``key/path``, ...)."""
    (log,) = Path(run_dir).parent.glob("run-*.wandb")
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for record in _records(log) if record.WhichOneof("record_type") == "history"]


def config(run_dir: str | Path) -> dict:
    """The run's config as its updates left it."""
    (log,) = Path(run_dir).parent.glob("run-*.wandb")
    values: dict = {}
    for record in _records(log):
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                values[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return values
