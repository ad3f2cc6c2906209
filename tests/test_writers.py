"""The writers of lightning_lazy.watch.writers, each against its real backend, offline: TensorBoard event files,
an offline W&B run, an MLflow file store, CSV and plain files; and the builders from Lightning loggers (both
packages), from Hugging Face's report_to and for a plain loop's folder."""

from __future__ import annotations

import ast
import csv
import glob
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_lazy.watch import writers as W
from offline_backends import config as wandb_config
from offline_backends import history as wandb_history
from offline_backends import finish_wandb, mlflow_artifacts, mlflow_uri, wandb_offline  # noqa: F401 - fixtures

SUMMARY = "Regime: lazy (Δ = 0.01 < 0.1)\n  κ(w0)   0.02\n  <b>not markup</b> & more"


def _png(seed: int, size=(24, 40)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


FIGURE, LAYERS = _png(0), _png(1, size=(16, 30))


def _write_all(writer: W.Writer, step: int = 7) -> None:
    """What the core writes at the end of a fit, in its order."""
    writer.setup()
    writer.scalars({"lazy/divergence": 0.25, "lazy/kappa": 0.5, "lazy/unmeasured": None}, step)
    writer.image("lazy/figure", FIGURE, step, W.FIGURE_FILE)
    writer.image("lazy/layers", LAYERS, step, W.LAYERS_FILE)
    writer.text("lazy/summary", SUMMARY, step, W.SUMMARY_FILE)
    writer.hparams({"lazy/alpha": 10.0, "lazy/optimizer": "SGD"}, {"lazy/divergence": 0.25}, step)
    writer.close()


def _events(folder) -> EventAccumulator:
    (path,) = glob.glob(os.path.join(str(folder), "events.out.tfevents.*"))
    events = EventAccumulator(path, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def _assert_tensorboard(folder, step: int = 7) -> None:
    events = _events(folder)
    for tag, png in (("lazy/figure", FIGURE), ("lazy/layers", LAYERS)):
        (image,) = events.Images(tag)
        assert image.encoded_image_string == png and image.step == step  # the bytes themselves, not re-encoded
        assert (image.width, image.height) == Image.open(io.BytesIO(png)).size
    (text,) = events.Tensors("lazy/summary/text_summary")
    shown = text.tensor_proto.string_val[0].decode()
    assert shown.splitlines() == ["    " + line for line in SUMMARY.splitlines()]  # an indented (code) block


def test_the_writer_module_imports_no_framework_or_backend_at_module_level():
    tree = ast.parse(Path(W.__file__).read_text())
    top = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    names = {alias.name for node in top if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in top if isinstance(node, ast.ImportFrom)}
    assert not {name.split(".")[0] for name in names if name} & {
        "lightning", "pytorch_lightning", "lightning_fabric", "transformers", "wandb", "mlflow", "torch", "tensorboard"}


def test_tensorboard_writer_round_trip(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = W.TensorBoardWriter(SummaryWriter(str(tmp_path)), owned=True)
    assert writer.folder == str(tmp_path)
    _write_all(writer)
    _assert_tensorboard(tmp_path)
    events = _events(tmp_path)
    assert [e.value for e in events.Scalars("lazy/divergence")] == [0.25]
    assert "lazy/unmeasured" not in events.Tags()["scalars"]
    tensors = events.Tags()["tensors"]
    assert "custom_scalars__config__" in tensors  # setup: the custom-scalars layout
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    hparams = events.PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["lazy/alpha"].number_value == 10.0 and start.hparams["lazy/optimizer"].string_value == "SGD"
    experiment = HParamsPluginData.FromString(hparams["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["lazy/divergence"]  # read from the logged scalar


def test_tensorboard_writer_does_not_close_a_loggers_summary_writer(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    summary = SummaryWriter(str(tmp_path))
    W.TensorBoardWriter(summary).close()
    summary.add_scalar("after", 1.0, 0)  # still open: the logger closes it
    summary.close()
    assert "after" in _events(tmp_path).Tags()["scalars"]


def test_a_writer_other_than_torchs_gets_the_decoded_figure():
    # tensorboardX's SummaryWriter has its own protobuf classes: it gets the pixels through add_image.
    class Pixels:
        def add_image(self, tag, pixels, step, dataformats):
            self.added = (tag, pixels, step, dataformats)

    target = Pixels()
    W.TensorBoardWriter(target).image("lazy/layers", LAYERS, 3, W.LAYERS_FILE)
    tag, pixels, step, dataformats = target.added
    assert (tag, step, dataformats) == ("lazy/layers", 3, "HWC")
    assert np.array_equal(pixels, np.asarray(Image.open(io.BytesIO(LAYERS))))


def test_png_size_reads_the_header_and_refuses_other_bytes():
    assert W.png_size(FIGURE) == (40, 24)
    with pytest.raises(ValueError, match="not a PNG"):
        W.png_size(b"GIF89a" + bytes(30))


def test_folder_writer_writes_the_files(tmp_path):
    folder = tmp_path / "run"
    writer = W.FolderWriter(folder)
    _write_all(writer)
    assert (folder / W.FIGURE_FILE).read_bytes() == FIGURE and (folder / W.LAYERS_FILE).read_bytes() == LAYERS
    assert (folder / W.SUMMARY_FILE).read_text(encoding="utf-8") == SUMMARY + "\n"
    writer.image("lazy/figure", LAYERS, 9, W.FIGURE_FILE)  # a later figure replaces the file, nothing left over
    assert (folder / W.FIGURE_FILE).read_bytes() == LAYERS
    assert sorted(os.listdir(folder)) == sorted([W.FIGURE_FILE, W.LAYERS_FILE, W.SUMMARY_FILE])
    with open(folder / "plain", "wb"):  # the files get the permissions any file made here gets
        pass
    assert {(folder / file).stat().st_mode for file in os.listdir(folder)} == {(folder / "plain").stat().st_mode}


def _csv(path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def test_csv_writer_one_row_per_step_and_growing_columns(tmp_path):
    assert W.METRICS_FILE == "lazy_metrics.csv"  # beside a user's or a CSVLogger's metrics.csv, not over it
    writer = W.CSVWriter(tmp_path)
    writer.scalars({"lazy/divergence": 0.0}, 0)
    writer.scalars({"lazy/kappa": 0.5}, 0)  # same step: the same row
    writer.scalars({"lazy/divergence": 0.125, "lazy/kappa": None}, 4)
    writer.scalars({"lazy/tangent/train_loss": 2.0}, 8)  # a new column: the file is written again whole
    writer.flush()
    columns, rows = _csv(tmp_path / W.METRICS_FILE)
    assert columns == ["step", "lazy/divergence", "lazy/kappa", "lazy/tangent/train_loss"]
    assert rows == [
        {"step": "0", "lazy/divergence": "0.0", "lazy/kappa": "0.5", "lazy/tangent/train_loss": ""},
        {"step": "4", "lazy/divergence": "0.125", "lazy/kappa": "", "lazy/tangent/train_loss": ""},
        {"step": "8", "lazy/divergence": "", "lazy/kappa": "", "lazy/tangent/train_loss": "2.0"},
    ]
    writer.scalars({"lazy/divergence": float("nan")}, 9)  # a measured NaN is written as such
    writer.close()
    assert _csv(tmp_path / W.METRICS_FILE)[1][-1]["lazy/divergence"] == "nan"
    # A resumed run continues the file and keeps its columns.
    again = W.CSVWriter(tmp_path)
    again.scalars({"lazy/kappa": 0.75, "lazy/ntk_distance": 0.1}, 12)
    again.close()
    columns, rows = _csv(tmp_path / W.METRICS_FILE)
    assert columns == ["step", "lazy/divergence", "lazy/kappa", "lazy/tangent/train_loss", "lazy/ntk_distance"]
    assert [row["step"] for row in rows] == ["0", "4", "8", "9", "12"]
    assert rows[-1]["lazy/ntk_distance"] == "0.1" and rows[0]["lazy/kappa"] == "0.5"


def _assert_wandb_run(run_dir: str, step_metric: str, step: int = 7) -> list[dict]:
    files = Path(run_dir)
    assert (files / W.FIGURE_FILE).read_bytes() == FIGURE and (files / W.LAYERS_FILE).read_bytes() == LAYERS
    assert (files / W.SUMMARY_FILE).read_text(encoding="utf-8") == SUMMARY + "\n"
    rows = wandb_history(run_dir)
    for tag, png in (("lazy/figure", FIGURE), ("lazy/layers", LAYERS)):
        (row,) = [row for row in rows if f"{tag}/path" in row]
        assert row[f"{tag}/_type"] == "image-file" and row[step_metric] == step
        assert (files / row[f"{tag}/path"]).read_bytes() == png  # W&B keeps the PNG's own bytes
    (row,) = [row for row in rows if "lazy/summary/path" in row]
    assert row["lazy/summary/_type"] == "html-file" and row[step_metric] == step
    page = (files / row["lazy/summary/path"]).read_text(encoding="utf-8")
    escaped = "Regime: lazy (Δ = 0.01 &lt; 0.1)\n  κ(w0)   0.02\n  &lt;b&gt;not markup&lt;/b&gt; &amp; more"
    assert f"<pre>{escaped}</pre>" in page
    return rows


def test_wandb_writer_on_an_offline_run(wandb_offline, tmp_path):
    run = wandb_offline.init()
    assert run.settings.mode == "offline" and Path(run.dir).is_relative_to(tmp_path)
    writer = W.WandbWriter(run)
    assert writer.folder == run.dir
    _write_all(writer)
    run_dir = run.dir
    finish_wandb()
    rows = _assert_wandb_run(run_dir, "lazy/step")
    (scalars,) = [row for row in rows if "lazy/divergence" in row]
    assert scalars["lazy/divergence"] == 0.25 and scalars["lazy/kappa"] == 0.5 and scalars["lazy/step"] == 7
    assert "lazy/unmeasured" not in scalars
    assert wandb_config(run_dir)["lazy/alpha"] == 10.0
    assert wandb_config(run_dir)["lazy/optimizer"] == "SGD"


def test_wandb_writer_rows_survive_a_run_whose_step_is_ahead(wandb_offline, recwarn):
    # Another logger on the run (Lightning's, HF's) advances W&B's own step with every call: a row logged with
    # step=<global step> below it would be dropped. The writer's rows carry their step as a key instead.
    run = wandb_offline.init()
    for i in range(5):
        run.log({"trainer/global_step": i, "train_loss": 1.0})
    writer = W.WandbWriter(run, step_metric="trainer/global_step", define_step=False)
    writer.scalars({"lazy/divergence": 0.5}, 2)
    writer.image("lazy/figure", FIGURE, 2, W.FIGURE_FILE)
    run_dir = run.dir
    finish_wandb()
    rows = wandb_history(run_dir)
    assert [row["trainer/global_step"] for row in rows if "lazy/divergence" in row] == [2]
    assert [row["trainer/global_step"] for row in rows if "lazy/figure/path" in row] == [2]
    assert not [w for w in recwarn if "step" in str(w.message).lower()]


def test_a_disabled_wandb_run_gets_no_writer_and_no_files(wandb_offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = wandb_offline.init(mode="disabled")
    assert W.wandb_disabled(run)
    with pytest.warns(RuntimeWarning, match=r"'wandb' in backends, but the W&B run is disabled \(mode='disabled'\)"):
        writers = W.writers_for_folder(tmp_path / "loop", backends=("wandb",))
    assert [type(w) for w in writers] == [W.FolderWriter]
    writer = W.WandbWriter(run)  # made by hand: it logs nothing and writes no file
    assert writer.folder is None
    _write_all(writer)
    assert not Path(run.dir).exists()
    assert list(tmp_path.iterdir()) == []


def _assert_mlflow_artifacts(folder: Path) -> None:
    assert (folder / W.FIGURE_FILE).read_bytes() == FIGURE and (folder / W.LAYERS_FILE).read_bytes() == LAYERS
    assert (folder / W.SUMMARY_FILE).read_text(encoding="utf-8") == SUMMARY + "\n"


def test_mlflow_writer_with_a_client_on_a_file_store(mlflow_uri, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    run = client.create_run(client.create_experiment("writers"))
    _write_all(W.MLflowWriter(client, run.info.run_id))
    folder = mlflow_artifacts(client, run.info.run_id)
    assert folder.is_relative_to(tmp_path)
    _assert_mlflow_artifacts(folder)
    history = client.get_metric_history(run.info.run_id, "lazy/divergence")
    assert [(m.value, m.step) for m in history] == [(0.25, 7)]
    assert client.get_run(run.info.run_id).data.params == {"lazy/alpha": "10.0", "lazy/optimizer": "SGD"}


def test_mlflow_writer_with_the_module_and_its_active_run(mlflow_uri, tmp_path):
    import mlflow

    with mlflow.start_run() as run:
        writers = W.writers_for_folder(tmp_path / "loop", backends=("mlflow",))
        assert [type(w) for w in writers] == [W.MLflowWriter, W.FolderWriter]
        for writer in writers:
            _write_all(writer)
    _assert_mlflow_artifacts(mlflow_artifacts(mlflow.MlflowClient(mlflow_uri), run.info.run_id))
    assert (tmp_path / "loop" / W.SUMMARY_FILE).exists()


def test_mlflow_refusing_a_changed_param_warns_and_keeps_the_writer(mlflow_uri):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    run_id = client.create_run(client.create_experiment("refit")).info.run_id
    warned = []
    group = W.Writers([W.MLflowWriter(client, run_id)], warn=warned.append)
    group.hparams({"lazy/alpha": 10.0}, {}, 1)
    group.hparams({"lazy/alpha": 10.0}, {}, 2)  # the same value again: accepted
    assert not warned
    group.hparams({"lazy/alpha": 3.0}, {}, 3)  # a second fit of the run with another alpha: MLflow refuses
    assert len(warned) == 1 and "failed writing the hyperparameters (MlflowException" in warned[0]
    group.image("lazy/figure", FIGURE, 3, W.FIGURE_FILE)
    assert (mlflow_artifacts(client, run_id) / W.FIGURE_FILE).read_bytes() == FIGURE
    assert client.get_run(run_id).data.params == {"lazy/alpha": "10.0"}


def test_mlflow_writer_refuses_what_is_not_mlflow():
    with pytest.raises(TypeError, match="MlflowClient or the mlflow module, got dict"):
        W.MLflowWriter({}, "run")


def test_writers_group_drops_a_failing_writer_with_one_warning(tmp_path):
    class Broken(W.Writer):
        def image(self, tag, png, step, file):
            raise OSError("No space left on device")

    warnings = []
    group = W.Writers([Broken(), W.FolderWriter(tmp_path)], warn=warnings.append)
    group.image("lazy/figure", FIGURE, 1, W.FIGURE_FILE)
    group.image("lazy/layers", LAYERS, 1, W.LAYERS_FILE)
    assert (tmp_path / W.FIGURE_FILE).read_bytes() == FIGURE and (tmp_path / W.LAYERS_FILE).exists()
    assert warnings == ["lightning_lazy: Broken() failed writing laziness.png (OSError: No space left on device); "
                        "nothing more is written there."]
    assert len(group) == 1 and group.folder == str(tmp_path)


def test_writers_group_warns_with_python_warnings_by_default(tmp_path):
    class Broken(W.Writer):
        def text(self, tag, text, step, file):
            raise RuntimeError("run closed")

    with pytest.warns(RuntimeWarning, match="failed writing lazy_summary.txt .RuntimeError: run closed."):
        W.Writers([Broken()]).text("lazy/summary", SUMMARY, 1, W.SUMMARY_FILE)


# ----------------------------------------------------------------------------------------------- builders


@pytest.fixture(params=["pytorch_lightning", "lightning.pytorch"])
def loggers_module(request):
    import importlib

    return importlib.import_module(f"{request.param}.loggers")


def test_writers_for_loggers_of_either_lightning_package(loggers_module, wandb_offline, mlflow_uri, tmp_path):
    uri = mlflow_uri
    tensorboard = loggers_module.TensorBoardLogger(str(tmp_path), name="tb")
    wandb_logger = loggers_module.WandbLogger(offline=True, save_dir=str(tmp_path))
    mlflow_logger = loggers_module.MLFlowLogger(experiment_name="writers", tracking_uri=uri)
    csv_logger = loggers_module.CSVLogger(str(tmp_path), name="csv")
    loggers = [tensorboard, wandb_logger, mlflow_logger, csv_logger]
    writers = W.writers_for_loggers(loggers, tensorboard.log_dir)
    assert [type(w) for w in writers] == [W.TensorBoardWriter, W.FolderWriter, W.WandbWriter, W.MLflowWriter,
                                          W.FolderWriter]
    assert [w.folder for w in writers if isinstance(w, W.FolderWriter)] == [tensorboard.log_dir, csv_logger.log_dir]
    # log_dir is the fallback for loggers that keep no outputs of their own: here it adds nothing.
    assert len(W.writers_for_loggers([csv_logger, wandb_logger], tmp_path / "elsewhere")) == 2
    for writer in writers:
        writer.image("lazy/figure", FIGURE, 7, W.FIGURE_FILE)
        writer.image("lazy/layers", LAYERS, 7, W.LAYERS_FILE)
        writer.text("lazy/summary", SUMMARY, 7, W.SUMMARY_FILE)
        writer.close()
    for logger in loggers:
        logger.finalize("success")
    _assert_tensorboard(tensorboard.log_dir)
    for folder in (tensorboard.log_dir, csv_logger.log_dir):
        assert Path(folder, W.FIGURE_FILE).read_bytes() == FIGURE
        assert Path(folder, W.SUMMARY_FILE).read_text(encoding="utf-8") == SUMMARY + "\n"
    _assert_mlflow_artifacts(mlflow_artifacts(mlflow_logger.experiment, mlflow_logger.run_id))
    run_dir = wandb_logger.experiment.dir
    finish_wandb()
    _assert_wandb_run(run_dir, "trainer/global_step")


def test_writers_for_loggers_skip_other_ranks_and_fall_back_on_log_dir(tmp_path):
    from lightning_fabric.loggers.logger import _DummyExperiment

    class TensorBoardLogger:  # another rank's: Lightning's dummy experiment
        experiment = _DummyExperiment()

    class NeptuneLogger:
        experiment = object()

    # A logger unknown here: the figures and the summary in log_dir (trainer.log_dir: its save_dir).
    writers = W.writers_for_loggers([NeptuneLogger()], tmp_path)
    assert [(type(w), w.folder) for w in writers] == [(W.FolderWriter, str(tmp_path))]
    # Another rank: nothing at all, not even the folder.
    assert W.writers_for_loggers([TensorBoardLogger(), NeptuneLogger()], tmp_path) == []
    assert W.writers_for_loggers([], None) == []


def test_writers_for_report_to(wandb_offline, mlflow_uri, monkeypatch, tmp_path):
    import mlflow

    logging_dir, output_dir = tmp_path / "logs", tmp_path / "out"
    warned = []
    writers = W.writers_for_report_to("none", logging_dir, output_dir, warn=warned.append)
    assert [(type(w), w.folder) for w in writers] == [(W.FolderWriter, str(output_dir))] and not warned
    # Named integrations without their run (HF starts them in on_train_begin): warned, the folder only.
    writers = W.writers_for_report_to(["wandb", "mlflow", "comet_ml"], logging_dir, output_dir, warn=warned.append)
    assert [type(w) for w in writers] == [W.FolderWriter]
    assert len(warned) == 3 and "'comet_ml' gets no laziness figures" in warned[0]
    assert "no W&B run is active" in warned[1] and "no MLflow run is active" in warned[2]
    # With HF's runs active, "all" is each of the three.
    run = wandb_offline.init()
    with mlflow.start_run() as mlflow_run:
        warned.clear()
        writers = W.writers_for_report_to(["all"], logging_dir, output_dir, warn=warned.append)
        assert [type(w) for w in writers] == [W.TensorBoardWriter, W.WandbWriter, W.MLflowWriter, W.FolderWriter]
        assert not warned and writers[0].folder == str(logging_dir) and writers[0].owned
        assert writers[1].step_metric == "train/global_step" and writers[2].run_id == mlflow_run.info.run_id
        for writer in writers:
            _write_all(writer)
    _assert_mlflow_artifacts(mlflow_artifacts(mlflow.MlflowClient(mlflow_uri), mlflow_run.info.run_id))
    _assert_tensorboard(logging_dir)
    assert (output_dir / W.FIGURE_FILE).read_bytes() == FIGURE
    # transformers 5 has no logging_dir: HF's TENSORBOARD_LOGGING_DIR when set, else output_dir/runs/lazy.
    (writer, _), folder = W.writers_for_report_to("tensorboard", None, output_dir), output_dir / "runs" / "lazy"
    assert writer.folder == str(folder)
    writer.close()
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "hf"))
    (writer, _) = W.writers_for_report_to(["tensorboard"], None, output_dir)
    assert writer.folder == str(tmp_path / "hf")
    writer.close()
    run_dir = run.dir
    finish_wandb()
    _assert_wandb_run(run_dir, "train/global_step")


def test_writers_for_folder_default_and_refusal(tmp_path):
    writers = W.writers_for_folder(tmp_path)
    assert [type(w) for w in writers] == [W.TensorBoardWriter, W.CSVWriter, W.FolderWriter]
    assert all(w.folder == str(tmp_path) for w in writers)
    for writer in writers:
        _write_all(writer)
    _assert_tensorboard(tmp_path)
    assert _csv(tmp_path / W.METRICS_FILE)[1] == [{"step": "7", "lazy/divergence": "0.25", "lazy/kappa": "0.5"}]
    assert (tmp_path / W.LAYERS_FILE).read_bytes() == LAYERS
    with pytest.raises(ValueError, match="unknown backend 'neptune' for the monitor's outputs: choose among"):
        W.writers_for_folder(tmp_path, backends=("tensorboard", "neptune"))
