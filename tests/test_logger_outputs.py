"""End to end: LazyTrainingMonitor in a Lightning fit sends its figures (laziness.png, layers.png) and its summary
to whatever logger the Trainer has: TensorBoard, W&B (offline), MLflow (file store), CSV, and all four at once.
Real packages, everything under tmp_path."""

from __future__ import annotations

import csv
import glob
import html
import io
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_lazy.callback import LazyTrainingMonitor
from lightning_helpers import Regressor, loaders
from offline_backends import finish_wandb, history, mlflow_artifacts, mlflow_uri, wandb_offline  # noqa: F401

FILES = ("laziness.png", "layers.png")


def _fit(tmp_path, loggers: list) -> tuple[LazyTrainingMonitor, object]:
    import pytorch_lightning as pl

    train, val = loaders()
    monitor = LazyTrainingMonitor(loss="mse")
    trainer = pl.Trainer(logger=loggers, callbacks=[monitor], max_epochs=1, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", devices=1,
                         log_every_n_steps=1, default_root_dir=str(tmp_path))
    trainer.fit(Regressor(alpha=10.0), train, val)
    assert monitor.history and "Regime:" in monitor.summary()
    return monitor, trainer


def _assert_figure(png: bytes) -> None:
    """A drawn figure: a PNG of a real size, not one colour."""
    with Image.open(io.BytesIO(png)) as picture:
        assert picture.format == "PNG" and picture.width > 300 and picture.height > 200
        low, high = picture.convert("L").getextrema()
        assert high - low > 100


def _assert_files(folder: Path, summary: str) -> dict[str, bytes]:
    """laziness.png, layers.png and lazy_summary.txt in ``folder``; the PNGs' bytes."""
    pictures = {file: (folder / file).read_bytes() for file in FILES}
    for png in pictures.values():
        _assert_figure(png)
    assert (folder / "lazy_summary.txt").read_text(encoding="utf-8") == summary + "\n"
    return pictures


def _check_tensorboard(logger, monitor, trainer) -> dict[str, bytes]:
    folder = Path(logger.log_dir)
    (path,) = glob.glob(str(folder / "events.out.tfevents.*"))
    events = EventAccumulator(path, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    pictures = _assert_files(folder, monitor.summary())
    for file, tag in zip(FILES, ("lazy/figure", "lazy/layers")):
        assert events.Images(tag)[-1].encoded_image_string == pictures[file], tag
    text = events.Tensors("lazy/summary/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert text.splitlines() == ["    " + line for line in monitor.summary().splitlines()]
    assert "lazy/divergence" in events.Tags()["scalars"]
    return pictures


def _check_csv(logger, monitor, trainer) -> dict[str, bytes]:
    folder = Path(logger.log_dir)
    with open(folder / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert any(row.get("lazy/divergence") for row in rows)  # the measures, through Lightning's logging
    return _assert_files(folder, monitor.summary())  # the figures and the summary beside metrics.csv


def _check_wandb(logger, monitor, trainer) -> dict[str, bytes]:
    run_dir = Path(logger.experiment.dir)
    finish_wandb()
    rows = history(run_dir)
    pictures = _assert_files(run_dir, monitor.summary())  # the run's Files
    for file, tag in zip(FILES, ("lazy/figure", "lazy/layers")):
        shown = [row for row in rows if row.get(f"{tag}/_type") == "image-file"]
        assert shown, f"no {tag} image in the W&B run's history"
        assert (run_dir / shown[-1][f"{tag}/path"]).read_bytes() == pictures[file]
        assert shown[-1]["trainer/global_step"] == trainer.global_step
    texts = [row for row in rows if row.get("lazy/summary/_type") == "html-file"]
    assert texts, "no lazy/summary text in the W&B run's history"
    page = (run_dir / texts[-1]["lazy/summary/path"]).read_text(encoding="utf-8")
    assert html.escape(monitor.summary()) in page
    assert any("lazy/divergence" in row for row in rows)
    return pictures


def _check_mlflow(logger, monitor, trainer) -> dict[str, bytes]:
    folder = mlflow_artifacts(logger.experiment, logger.run_id)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*FILES, "lazy_summary.txt"])
    assert logger.experiment.get_metric_history(logger.run_id, "lazy/divergence")
    return _assert_files(folder, monitor.summary())


def _logger(kind: str, tmp_path, mlflow_uri):
    import pytorch_lightning.loggers as loggers

    if kind == "tensorboard":
        return loggers.TensorBoardLogger(str(tmp_path), name="tb"), _check_tensorboard
    if kind == "csv":
        return loggers.CSVLogger(str(tmp_path), name="csv"), _check_csv
    if kind == "wandb":
        return loggers.WandbLogger(offline=True, save_dir=str(tmp_path)), _check_wandb
    return loggers.MLFlowLogger(experiment_name="lazy", tracking_uri=mlflow_uri), _check_mlflow


@pytest.mark.parametrize("kind", ["tensorboard", "csv", "wandb", "mlflow"])
def test_figures_and_summary_reach_the_logger(kind, tmp_path, wandb_offline, mlflow_uri):
    logger, check = _logger(kind, tmp_path, mlflow_uri)
    monitor, trainer = _fit(tmp_path, [logger])
    check(logger, monitor, trainer)


def test_figures_and_summary_reach_every_logger_of_the_trainer(tmp_path, wandb_offline, mlflow_uri):
    # Several loggers at once: each gets the same pictures, drawn once.
    kinds = ["csv", "wandb", "mlflow", "tensorboard"]
    made = [_logger(kind, tmp_path, mlflow_uri) for kind in kinds]
    monitor, trainer = _fit(tmp_path, [logger for logger, _ in made])
    pictures = [check(logger, monitor, trainer) for logger, check in made]
    assert all(p == pictures[0] for p in pictures[1:])
