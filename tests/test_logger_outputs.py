"""End to end: the monitor sends its figures (laziness.png, layers.png) and its summary where the user's logging
goes: a Lightning fit's logger (TensorBoard, W&B offline, MLflow on a file store, CSV, all four at once), a plain
loop's writers, the Hugging Face Trainer's report_to. Real packages, everything under tmp_path."""

from __future__ import annotations

import csv
import glob
import html
import io
from pathlib import Path

import pytest
import torch
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


# ------------------------------------------------------------------------------ plain loop and Hugging Face


def _scalar_rows(rows: list[dict], key: str) -> list[dict]:
    return [row for row in rows if key in row]


def test_a_plain_loop_writes_to_tensorboard_csv_wandb_and_mlflow(tmp_path, wandb_offline, mlflow_uri):
    import mlflow
    from torch import nn

    from lightning_lazy import LazinessWatch
    from lightning_lazy.watch.writers import writers_for_folder

    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 6, generator=generator), torch.randn(32, 2, generator=generator)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run = wandb_offline.init()
    log_dir = tmp_path / "loop"
    with mlflow.start_run() as mlflow_run:
        watch = LazinessWatch(model, optimizer, loss="mse", probe=(x[:16], y[:16]),
                              writers=writers_for_folder(log_dir, ("tensorboard", "csv", "wandb", "mlflow")))
        for i in range(6):
            optimizer.zero_grad()
            loss = 0.5 * (model(x[i * 4:i * 4 + 8]) - y[i * 4:i * 4 + 8]).pow(2).sum(1).mean()
            loss.backward()
            watch.batch(x[i * 4:i * 4 + 8], y[i * 4:i * 4 + 8])
            optimizer.step()
        watch.measure()
        watch.close()
    summary = watch.summary()  # as written at close (read before it, the Cost line's share would be of that moment)
    pictures = _assert_files(log_dir, summary)
    with open(log_dir / "lazy_metrics.csv", newline="") as f:
        assert any(row.get("lazy/divergence") for row in csv.DictReader(f))
    events = EventAccumulator(glob.glob(str(log_dir / "events.out.tfevents.*"))[0], size_guidance={"images": 0})
    events.Reload()
    assert events.Images("lazy/figure")[-1].encoded_image_string == pictures["laziness.png"]
    assert "lazy/divergence" in events.Tags()["scalars"]
    client = mlflow.MlflowClient(mlflow_uri)
    assert _assert_files(mlflow_artifacts(client, mlflow_run.info.run_id), summary) == pictures
    assert client.get_metric_history(mlflow_run.info.run_id, "lazy/divergence")
    run_dir = Path(run.dir)
    finish_wandb()
    assert _assert_files(run_dir, summary) == pictures
    rows = history(run_dir)
    assert _scalar_rows(rows, "lazy/divergence")
    assert all("lazy/step" in row for row in rows if "lazy/figure/path" in row)


def test_the_huggingface_trainer_writes_to_its_integrations(tmp_path, wandb_offline, mlflow_uri, monkeypatch):
    import mlflow

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))  # HF's events and the monitor's: one run
    monkeypatch.setenv("WANDB_LOG_MODEL", "false")
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    from lightning_lazy.huggingface import LazyTrainingCallback

    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=3)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1, 40, (8,), generator=g), "attention_mask": torch.ones(8, dtype=torch.long),
             "labels": int(torch.randint(0, 3, (1,), generator=g))} for _ in range(32)]
    output_dir = tmp_path / "out"
    args = TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=8, num_train_epochs=1,
                             learning_rate=1e-3, report_to=["tensorboard", "wandb", "mlflow"], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, logging_steps=1)
    callback = LazyTrainingCallback(probe_size=16)
    Trainer(model=BertForSequenceClassification(config), args=args, train_dataset=data, callbacks=[callback]).train()
    summary = callback.summary()
    pictures = _assert_files(output_dir, summary)
    # Two event files in HF's TensorBoard folder, one run there: the Trainer's and the monitor's.
    files = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    loaded = [EventAccumulator(path, size_guidance={"images": 0, "scalars": 0}) for path in files]
    for events in loaded:
        events.Reload()
    assert len(files) == 2 and any("train/loss" in events.Tags()["scalars"] for events in loaded)
    (events,) = [events for events in loaded if "lazy/figure" in events.Tags()["images"]]
    assert events.Images("lazy/figure")[-1].encoded_image_string == pictures["laziness.png"]
    assert "lazy/divergence" in events.Tags()["scalars"]
    client = mlflow.MlflowClient(mlflow_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert _assert_files(mlflow_artifacts(client, run.info.run_id), summary) == pictures
    assert client.get_metric_history(run.info.run_id, "lazy/divergence")
    run_dir = Path(wandb_offline.run.dir)
    finish_wandb()
    assert _assert_files(run_dir, summary) == pictures
    rows = history(run_dir)
    assert _scalar_rows(rows, "lazy/divergence") and _scalar_rows(rows, "train/loss")  # HF's rows and ours
    assert all("train/global_step" in row for row in rows if "lazy/figure/path" in row)
