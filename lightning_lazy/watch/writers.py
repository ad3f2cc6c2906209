"""Where the monitor's outputs go: TensorBoard, Weights & Biases, MLflow, a CSV file, a folder of files.

The core draws each figure once (:func:`~lightning_lazy.watch.report.figure_to_png`), writes the summary once,
and hands them to the run's writers; each puts them where its backend shows them:

- :class:`TensorBoardWriter`: the figures as images ``lazy/figure`` and ``lazy/layers`` (Images tab), the
  summary as text ``lazy/summary`` (Text tab), HParams, the custom-scalars layout; scalars by ``add_scalar``.
- :class:`WandbWriter`: the figures as ``wandb.Image`` rows (media panels) and as files of the run
  (``laziness.png``, ``layers.png``), the summary as a ``wandb.Html`` row (a ``<pre>`` block) and the file
  ``lazy_summary.txt``; params into the run's config; scalars as ``run.log`` rows.
- :class:`MLflowWriter`: ``laziness.png``, ``layers.png`` and ``lazy_summary.txt`` as artifacts of the run;
  params as params; scalars as metrics with their step.
- :class:`FolderWriter`: the three files in a folder. :class:`CSVWriter`: scalars in ``lazy_metrics.csv``.
- :class:`Writers`: several as one; a writer that fails is dropped with one warning.

Scalars (:meth:`Writer.scalars`) are for adapters whose framework has no logging of its own for them (a plain
loop, the Hugging Face ``Trainer``); the Lightning adapter logs its scalars through ``LightningModule.log``.

Nothing here imports Lightning, transformers, wandb or mlflow at module level: logger objects are recognised by
class name (both ``lightning.pytorch`` and ``pytorch_lightning``), and a backend is imported when a writer
first uses it. Call the functions that build writers on global rank zero only (a logger's ``experiment`` on
another rank is Lightning's dummy, which these functions skip).
"""

from __future__ import annotations

import csv
import html
import io
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

FIGURE_FILE = "laziness.png"
LAYERS_FILE = "layers.png"
SUMMARY_FILE = "lazy_summary.txt"
# Not metrics.csv: a plain loop's log_dir or HF's output_dir may hold the user's own (or a CSVLogger's).
METRICS_FILE = "lazy_metrics.csv"

Params = Mapping[str, "float | str"]


class Writer:
    """One destination of the monitor's outputs. Every method does nothing here: a writer overrides what its
    backend shows.

    Attributes:
        folder: the local folder this writer's files land in, or ``None`` (a remote run, no files).
    """

    folder: str | None = None

    def setup(self) -> None:
        """Before the first output: e.g. TensorBoard's custom-scalars layout, W&B's step metric."""

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Scalar measures at a training step (``{"lazy/divergence": 0.01, ...}``); ``None`` values are skipped."""

    def image(self, tag: str, png: bytes, step: int, file: str) -> None:
        """One figure, a PNG already encoded: shown as ``tag`` at ``step``, saved as ``file`` (``"laziness.png"``)."""

    def text(self, tag: str, text: str, step: int, file: str) -> None:
        """A text (the laziness summary): shown as ``tag`` at ``step``, saved as ``file`` (``"lazy_summary.txt"``)."""

    def hparams(self, params: Params, metrics: Mapping[str, float], step: int) -> None:
        """The run's settings (``params``) and final measures (``metrics``, already logged as scalars) for comparing
        runs: TensorBoard's HParams tab, W&B's config, MLflow's params."""

    def flush(self) -> None:
        """Make what was written visible now."""

    def close(self) -> None:
        """Flush, and release what this writer opened itself (never the user's logger)."""
        self.flush()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.folder!r})" if self.folder else f"{type(self).__name__}()"


def _numbers(values: Mapping[str, Any]) -> dict[str, float]:
    """The values as floats, ``None`` dropped (not measured); NaN and ±inf kept (a measured non-finite value)."""
    return {key: float(value) for key, value in values.items() if value is not None}


def _write_atomically(path: str, data: bytes) -> None:
    """``data`` into ``path`` through a temporary file beside it and a rename: a viewer never reads half a PNG.
    (``open``, not ``mkstemp``: the file gets the usual permissions, not 0600.)"""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "wb") as f:
            f.write(data)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _text_bytes(text: str) -> bytes:
    return (text if text.endswith("\n") else text + "\n").encode("utf-8")


# ------------------------------------------------------------------------------------------------ TensorBoard


class TensorBoardWriter(Writer):
    """A TensorBoard ``SummaryWriter`` (torch's or tensorboardX's).

    torch's writer gets each PNG as it is, in the image summary ``add_image`` would have built (``add_image``
    takes pixels only and would encode them again); tensorboardX's (its own protobuf classes) gets the decoded
    RGB pixels through its ``add_image``. The summary is an indented block (Markdown code) through ``add_text``;
    :meth:`hparams` writes what ``TensorBoardLogger.log_hyperparams(params, metrics)`` writes, less its logging
    of the metrics again (the HParams tab reads their values from the scalars already logged).

    Args:
        writer: the ``SummaryWriter`` (a ``TensorBoardLogger``'s ``experiment``).
        owned: whether :meth:`close` closes it (a writer this module opened) or only flushes it (a logger's).
    """

    def __init__(self, writer: Any, owned: bool = False) -> None:
        self.writer, self.owned = writer, owned
        folder = getattr(writer, "log_dir", None) or getattr(writer, "logdir", None)
        self.folder = str(folder) if folder is not None else None

    def _is_torchs(self) -> bool:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # no tensorboard package: the writer is tensorboardX's
            return False
        return isinstance(self.writer, SummaryWriter)

    def setup(self) -> None:
        from lightning_lazy.watch.report import custom_scalars_layout

        self.writer.add_custom_scalars(custom_scalars_layout())

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for tag, value in _numbers(values).items():
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, png: bytes, step: int, file: str) -> None:
        if not self._is_torchs():
            import numpy as np
            from PIL import Image

            with Image.open(io.BytesIO(png)) as picture:
                self.writer.add_image(tag, np.asarray(picture.convert("RGB")), step, dataformats="HWC")
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        width, height = png_size(png)
        summary = Summary(value=[Summary.Value(tag=tag, image=Summary.Image(
            height=height, width=width, colorspace=3, encoded_image_string=png))])
        self.writer._get_file_writer().add_summary(summary, step)

    def text(self, tag: str, text: str, step: int, file: str) -> None:
        # Four spaces: TensorBoard renders Markdown, and an indented block keeps the summary's columns.
        self.writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()), step)

    def hparams(self, params: Params, metrics: Mapping[str, float], step: int) -> None:
        metrics = {key: float(value) for key, value in metrics.items() if math.isfinite(float(value))}
        if not metrics:
            return  # the HParams tab lists runs by their metrics: without one the run would not show
        if self._is_torchs():
            from torch.utils.tensorboard.summary import hparams
        else:
            from tensorboardX.summary import hparams
        file_writer = self.writer._get_file_writer()
        for summary in hparams(dict(params), metrics):
            file_writer.add_summary(summary, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        if self.owned:
            self.writer.close()
        else:
            self.writer.flush()


def png_size(png: bytes) -> tuple[int, int]:
    """``(width, height)`` of an encoded PNG, from its header chunk (IHDR: 4 bytes big-endian each, from byte 16).

    Raises:
        ValueError: ``png`` does not start with the PNG signature.
    """
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"not a PNG (starts with {png[:8]!r}): pass the bytes of report.figure_to_png")
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


# --------------------------------------------------------------------------------------------------- W&B


class WandbWriter(Writer):
    """A Weights & Biases run (``wandb.run``, ``WandbLogger.experiment``).

    Every output is a new row of the run's history keyed by ``step_metric`` (never ``run.log(step=...)``: W&B
    drops a row whose step is below its current one, and another logger on the same run advances that step on
    its own). Figures are ``wandb.Image`` rows made from the PNG file itself (W&B stores those bytes, not a
    re-encoding) and the file is kept in the run's Files; the summary is a ``wandb.Html`` row (a ``<pre>``
    block) and ``lazy_summary.txt`` in the run's Files. :meth:`hparams` puts ``params`` into the run's config.

    Args:
        run: the ``wandb`` run.
        step_metric: the history key that carries the step: ``"trainer/global_step"`` under Lightning's
            ``WandbLogger``, ``"train/global_step"`` under the Hugging Face ``Trainer``, ``"lazy/step"`` (the
            default) on a run of your own.
        define_step: declare ``step_metric`` as the x-axis of the ``lazy/*`` keys (on a run whose logger did not
            declare its own); by default, when ``step_metric`` is ``"lazy/step"``.
    """

    def __init__(self, run: Any, step_metric: str = "lazy/step", define_step: bool | None = None) -> None:
        self.run, self.step_metric = run, step_metric
        self.define_step = step_metric == "lazy/step" if define_step is None else define_step
        self._defined = False
        folder = None if wandb_disabled(run) else getattr(run, "dir", None)  # a disabled run's dir is not made
        self.folder = str(folder) if folder else None

    def setup(self) -> None:
        if self.define_step and not self._defined:
            self.run.define_metric(self.step_metric)
            self.run.define_metric("lazy/*", step_metric=self.step_metric)
        self._defined = True

    def _log(self, row: dict[str, Any], step: int) -> None:
        self.setup()
        self.run.log({**row, self.step_metric: step})

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        values = _numbers(values)
        if values:
            self._log(values, step)

    def _keep(self, data: bytes, file: str) -> str | None:
        """``file`` in the run's Files (``run.dir``, uploaded when the run syncs): its path, or ``None`` without one."""
        if self.folder is None:
            return None
        path = os.path.join(self.folder, file)
        _write_atomically(path, data)
        return path

    def image(self, tag: str, png: bytes, step: int, file: str) -> None:
        import wandb

        path = self._keep(png, file)
        if path is None:
            from PIL import Image

            with Image.open(io.BytesIO(png)) as picture:
                self._log({tag: wandb.Image(picture.convert("RGB"))}, step)
            return
        self._log({tag: wandb.Image(path)}, step)

    def text(self, tag: str, text: str, step: int, file: str) -> None:
        import wandb

        self._keep(_text_bytes(text), file)
        self._log({tag: wandb.Html(io.StringIO(f"<pre>{html.escape(text)}</pre>"))}, step)

    def hparams(self, params: Params, metrics: Mapping[str, float], step: int) -> None:
        self.run.config.update(dict(params), allow_val_change=True)


def wandb_disabled(run: Any) -> bool:
    """Whether a W&B run is a disabled one (``mode="disabled"``: it logs nothing, keeps no files)."""
    return type(run).__name__ in ("NoopRun", "RunDisabled") or getattr(run, "disabled", False) is True


# ------------------------------------------------------------------------------------------------- MLflow


# MLflow's rule for metric and param names (mlflow.utils.validation): letters, digits, _ - . space : /
_MLFLOW_UNSAFE = re.compile(r"[^\w\-. :/]")
_MLFLOW_BATCH = 1000  # most metrics one log_batch call accepts


class MLflowWriter(Writer):
    """An MLflow run: figures and summary as artifacts (``laziness.png``, ``layers.png``, ``lazy_summary.txt``
    at the artifact root, or under ``artifact_path``; a later figure replaces the earlier file), scalars as
    metrics with their step, :meth:`hparams` as params (MLflow refuses to change a param's value).

    Args:
        client: an ``mlflow.MlflowClient`` (``MLFlowLogger.experiment``) or the ``mlflow`` module (its
            current tracking URI).
        run_id: the run's id (``MLFlowLogger.run_id``, ``mlflow.active_run().info.run_id``).
        artifact_path: a folder inside the run's artifacts, or ``None`` for the root.
    """

    def __init__(self, client: Any, run_id: str, artifact_path: str | None = None) -> None:
        if hasattr(client, "active_run") and hasattr(client, "MlflowClient"):
            client = client.MlflowClient()  # the module: a client on its current tracking URI logs to any run
        if not hasattr(client, "log_batch") or not hasattr(client, "log_artifact"):
            raise TypeError(f"MLflowWriter needs an mlflow.MlflowClient or the mlflow module, got "
                            f"{type(client).__name__}")
        self.client, self.run_id, self.artifact_path = client, str(run_id), artifact_path

    def _artifact(self, data: bytes, file: str) -> None:
        with tempfile.TemporaryDirectory(prefix="lightning-lazy-") as folder:
            path = os.path.join(folder, file)
            with open(path, "wb") as f:
                f.write(data)
            self.client.log_artifact(self.run_id, path, self.artifact_path)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_MLFLOW_UNSAFE.sub("_", key), value, now, int(step))
                   for key, value in _numbers(values).items()]
        for start in range(0, len(metrics), _MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + _MLFLOW_BATCH])

    def image(self, tag: str, png: bytes, step: int, file: str) -> None:
        self._artifact(png, file)

    def text(self, tag: str, text: str, step: int, file: str) -> None:
        self._artifact(_text_bytes(text), file)

    def hparams(self, params: Params, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Param

        if params:
            self.client.log_batch(self.run_id, params=[Param(_MLFLOW_UNSAFE.sub("_", key), str(value))
                                                       for key, value in params.items()])

    def __repr__(self) -> str:
        return f"MLflowWriter(run_id={self.run_id!r})"


# ------------------------------------------------------------------------------------------- files and CSV


class FolderWriter(Writer):
    """The figures as PNG files and the summary as a text file in ``folder`` (Lightning's ``log_dir``, beside a
    ``CSVLogger``'s ``metrics.csv``, a plain loop's ``log_dir``, the Hugging Face ``output_dir``). A later figure
    replaces the file."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = os.fspath(folder)

    def image(self, tag: str, png: bytes, step: int, file: str) -> None:
        _write_atomically(os.path.join(self.folder, file), png)

    def text(self, tag: str, text: str, step: int, file: str) -> None:
        _write_atomically(os.path.join(self.folder, file), _text_bytes(text))


class CSVWriter(Writer):
    """Scalars in ``folder/lazy_metrics.csv`` (or ``file``): a ``step`` column, then one column per tag in the
    order tags first came; one row per step (values given at the same step in several calls share a row); a
    missing value is an empty cell. A file already there is continued (a resumed run), its columns kept.

    A row is written when the next step arrives and at :meth:`flush` / :meth:`close`; when a new tag adds a
    column the file is written again whole, so every row has every column.
    """

    def __init__(self, folder: str | os.PathLike, file: str = METRICS_FILE) -> None:
        self.folder = os.fspath(folder)
        self.path = os.path.join(self.folder, file)
        self._columns: list[str] = ["step"]
        self._rows: list[dict[str, Any]] = []  # written rows, to write the file again when columns grow
        self._written_columns: list[str] | None = None  # the header in the file; None: not read or written yet
        self._pending: dict[str, Any] | None = None

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        values = _numbers(values)
        if not values:
            return
        if self._pending is not None and self._pending["step"] != int(step):
            self._commit()
        if self._pending is None:
            self._pending = {"step": int(step)}
        self._pending.update(values)
        self._columns.extend(key for key in values if key not in self._columns)

    def _load(self) -> None:
        """The rows of a file already there, once."""
        self._written_columns = []
        if not os.path.exists(self.path):
            return
        with open(self.path, newline="") as f:
            reader = csv.DictReader(f)
            self._rows = [dict(row) for row in reader]
            header = list(reader.fieldnames or [])
        self._written_columns = header
        self._columns = header + [key for key in self._columns if key not in header]

    def _commit(self) -> None:
        if self._pending is None:
            return
        if self._written_columns is None:
            self._load()
            self._columns.extend(key for key in self._pending if key not in self._columns)
        row, self._pending = self._pending, None
        self._rows.append(row)
        os.makedirs(self.folder, exist_ok=True)
        if self._columns == self._written_columns:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self._columns).writerow(row)
            return
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, self._columns)
            writer.writeheader()
            writer.writerows(self._rows)
        self._written_columns = list(self._columns)

    def flush(self) -> None:
        self._commit()


# --------------------------------------------------------------------------------------------- the group


class Writers(Writer):
    """Several writers as one: each call goes to each writer in turn.

    A writer that raises is dropped with one warning naming it, what it was writing and the error: a logging
    backend that fails (a full disk, a closed run) never stops the training run or the other writers. A failure
    to write :meth:`hparams` warns and keeps the writer.

    Args:
        writers: the writers.
        warn: how to warn (``warnings.warn`` by default; an adapter passes its framework's rank-zero warning).
    """

    def __init__(self, writers: Iterable[Writer] = (), warn: Callable[[str], Any] | None = None) -> None:
        self.writers = list(writers)
        self._warn = warn

    @property
    def folder(self) -> str | None:  # type: ignore[override]
        """The first folder a writer's files land in (the figures' folder when there is one)."""
        folders = [w.folder for w in self.writers if isinstance(w, FolderWriter)] + \
                  [w.folder for w in self.writers if w.folder]
        return folders[0] if folders else None

    def __iter__(self):
        return iter(self.writers)

    def __len__(self) -> int:
        return len(self.writers)

    def _each(self, what: str, method: str, *args: Any, drop: bool = True) -> None:
        for writer in list(self.writers):
            try:
                getattr(writer, method)(*args)
            except Exception as error:  # noqa: BLE001 - any backend failure: warn, drop the writer, go on
                if drop:
                    self.writers.remove(writer)
                message = (f"lightning_lazy: {writer!r} failed writing {what} ({type(error).__name__}: "
                           f"{str(error).splitlines()[0] if str(error) else ''})"
                           + ("; nothing more is written there." if drop else "."))
                if self._warn is None:
                    import warnings

                    warnings.warn(message, RuntimeWarning, stacklevel=3)
                else:
                    self._warn(message)

    def setup(self) -> None:
        self._each("its setup", "setup")

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self._each(f"scalars at step {step}", "scalars", values, step)

    def image(self, tag: str, png: bytes, step: int, file: str) -> None:
        self._each(f"{file}", "image", tag, png, step, file)

    def text(self, tag: str, text: str, step: int, file: str) -> None:
        self._each(f"{file}", "text", tag, text, step, file)

    def hparams(self, params: Params, metrics: Mapping[str, float], step: int) -> None:
        # Kept on failure: MLflow refuses to change a param (a second fit of one run), the figures still go there.
        self._each("the hyperparameters", "hparams", params, metrics, step, drop=False)

    def flush(self) -> None:
        self._each("(flush)", "flush")

    def close(self) -> None:
        self._each("(close)", "close")

    def __repr__(self) -> str:
        return f"Writers({self.writers!r})"


# ------------------------------------------------------------------------------------------- the builders


def _class_names(obj: Any) -> set[str]:
    return {cls.__name__ for cls in type(obj).__mro__}


def _is_dummy(experiment: Any) -> bool:
    """Lightning's stand-in ``experiment`` on ranks other than zero (``_DummyExperiment``), or none at all."""
    return experiment is None or "DummyExperiment" in type(experiment).__name__


def _active_wandb_run() -> Any | None:
    """``wandb.run`` when wandb was imported and a run is active and not disabled (a run is only ever started
    by wandb's user)."""
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    return None if run is None or wandb_disabled(run) else run


def _same_folder(a: str, b: str) -> bool:
    return os.path.realpath(os.path.abspath(a)) == os.path.realpath(os.path.abspath(b))


def _add_folder(writers: list[Writer], folder: str | os.PathLike | None) -> None:
    """A :class:`FolderWriter` for ``folder`` unless one writes there already."""
    if folder is None:
        return
    folder = os.fspath(folder)
    if not any(isinstance(w, FolderWriter) and _same_folder(w.folder, folder) for w in writers):
        writers.append(FolderWriter(folder))


_LOGGERS = {"TensorBoardLogger", "WandbLogger", "MLFlowLogger", "CSVLogger"}


def writers_for_loggers(loggers: Sequence[Any], log_dir: str | os.PathLike | None) -> list[Writer]:
    """Writers for a Lightning trainer's loggers (``trainer.loggers``), from ``lightning.pytorch``,
    ``pytorch_lightning`` or ``lightning.fabric``, recognised by class name:

    - ``TensorBoardLogger``: :class:`TensorBoardWriter` of its ``experiment``, and a :class:`FolderWriter` of
      its ``log_dir`` (the PNG files and the summary beside the event file);
    - ``WandbLogger``: :class:`WandbWriter` of its run, step key ``"trainer/global_step"`` (the x-axis the
      logger declared); none for a disabled run;
    - ``MLFlowLogger``: :class:`MLflowWriter` of its client and ``run_id``;
    - ``CSVLogger``: :class:`FolderWriter` of its ``log_dir`` (the files beside ``metrics.csv``);
    - another logger: nothing (its API is unknown here). When no logger took the outputs, a
      :class:`FolderWriter` of ``log_dir`` (``trainer.log_dir``: for another logger, its ``save_dir``), if given.

    Each folder gets one writer. Call on global rank zero: a logger's ``experiment`` elsewhere is Lightning's
    dummy, which gets no writer (nor the fallback folder).
    """
    writers: list[Writer] = []
    dummy = False
    for logger in loggers:
        kind = _LOGGERS.intersection(_class_names(logger))
        if not kind:
            continue
        experiment = logger.experiment
        if _is_dummy(experiment):
            dummy = True
        elif "TensorBoardLogger" in kind:
            writers.append(TensorBoardWriter(experiment))
            _add_folder(writers, logger.log_dir)
        elif "WandbLogger" in kind:
            if not wandb_disabled(experiment):
                writers.append(WandbWriter(experiment, step_metric="trainer/global_step", define_step=False))
        elif "MLFlowLogger" in kind:
            if logger.run_id is not None:
                writers.append(MLflowWriter(experiment, logger.run_id))
        else:
            _add_folder(writers, logger.log_dir)
    if not writers and not dummy:
        _add_folder(writers, log_dir)
    return writers


_BACKENDS = ("tensorboard", "wandb", "mlflow", "csv")


def _active_mlflow_run_id() -> str | None:
    mlflow = sys.modules.get("mlflow")
    if mlflow is None:
        return None
    run = mlflow.active_run()
    return run.info.run_id if run is not None else None


def _backend_writers(backends: Sequence[str], tensorboard_dir: str, csv_dir: str | None, who: str,
                     warn: Callable[[str], Any] | None) -> list[Writer]:
    writers: list[Writer] = []
    for backend in backends:
        if backend == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            writers.append(TensorBoardWriter(SummaryWriter(tensorboard_dir), owned=True))
        elif backend == "csv" and csv_dir is not None:
            writers.append(CSVWriter(csv_dir))
        elif backend == "wandb":
            run = _active_wandb_run()
            if run is not None:
                writers.append(WandbWriter(run, step_metric="train/global_step" if who == "report_to" else "lazy/step",
                                           define_step=who != "report_to"))
            elif warn is not None:
                wandb = sys.modules.get("wandb")
                if getattr(wandb, "run", None) is not None:
                    warn(f"lightning_lazy: 'wandb' in {who}, but the W&B run is disabled (mode='disabled'): the "
                         f"figures and summary go to the folder only.")
                else:
                    warn(f"lightning_lazy: 'wandb' in {who}, but no W&B run is active (wandb.run is None): the "
                         f"figures and summary go to the folder only. Call wandb.init() before the monitor starts.")
        elif backend == "mlflow":
            run_id = _active_mlflow_run_id()
            if run_id is not None:
                import mlflow

                writers.append(MLflowWriter(mlflow, run_id))
            elif warn is not None:
                warn(f"lightning_lazy: 'mlflow' in {who}, but no MLflow run is active (mlflow.active_run() is "
                     f"None): the figures and summary go to the folder only. Call mlflow.start_run() first.")
    return writers


def _warner(warn: Callable[[str], Any] | None) -> Callable[[str], Any]:
    if warn is not None:
        return warn
    import warnings

    return lambda message: warnings.warn(message, RuntimeWarning, stacklevel=4)


def writers_for_report_to(report_to: Sequence[str] | str | None, logging_dir: str | os.PathLike | None,
                          output_dir: str | os.PathLike, warn: Callable[[str], Any] | None = None) -> list[Writer]:
    """Writers for the Hugging Face ``Trainer``'s integrations (``TrainingArguments.report_to``):

    - ``"tensorboard"``: a ``SummaryWriter`` of its own on ``logging_dir``; by default (``None``) on
      ``$TENSORBOARD_LOGGING_DIR`` when set (where HF's ``TensorBoardCallback`` writes then: TensorBoard merges
      two event files of one folder into one run), else ``output_dir/runs/lazy`` (HF's own folder,
      ``output_dir/runs/<time>_<host>``, is chosen in its ``on_train_begin`` and not shown to other callbacks;
      transformers 5 has no ``TrainingArguments.logging_dir``);
    - ``"wandb"``: ``wandb.run`` (started by HF's ``WandbCallback`` in ``on_train_begin``), step key
      ``"train/global_step"`` (the x-axis HF declared);
    - ``"mlflow"``: ``mlflow.active_run()`` (started by HF's ``MLflowCallback``);
    - ``"all"``: each of the three that is there; ``"none"`` or ``None``: none; another integration gets
      nothing, with a warning;
    - and a :class:`FolderWriter` for ``output_dir`` (the figures and the summary), always.

    Call it in ``on_train_begin`` after HF's own callbacks (a user's callbacks come after them): before,
    the W&B and MLflow runs do not exist yet. A named W&B/MLflow integration without its run warns.

    Args:
        warn: how to warn (``warnings.warn`` by default).
    """
    if logging_dir is None:
        logging_dir = os.getenv("TENSORBOARD_LOGGING_DIR") or os.path.join(os.fspath(output_dir), "runs", "lazy")
    warn = _warner(warn)
    names = [report_to] if isinstance(report_to, str) or report_to is None else list(report_to)
    names = [str(name).lower() for name in names if name is not None]
    chosen: list[str] = []
    if "all" in names:
        chosen = ["tensorboard"]
        chosen += ["wandb"] if _active_wandb_run() is not None else []
        chosen += ["mlflow"] if _active_mlflow_run_id() is not None else []
    for name in names:
        if name in ("tensorboard", "wandb", "mlflow") and name not in chosen:
            chosen.append(name)
        elif name not in ("all", "none", "tensorboard", "wandb", "mlflow"):
            warn(f"lightning_lazy: report_to '{name}' gets no laziness figures or summary (supported: tensorboard, "
                 f"wandb, mlflow); they are in {os.fspath(output_dir)}.")
    writers = _backend_writers(chosen, os.fspath(logging_dir), None, "report_to", warn)
    _add_folder(writers, output_dir)
    return writers


def writers_for_folder(log_dir: str | os.PathLike, backends: Sequence[str] | str = ("tensorboard", "csv"),
                       warn: Callable[[str], Any] | None = None) -> list[Writer]:
    """Writers for a plain loop's ``log_dir``: by default TensorBoard event files and ``lazy_metrics.csv`` there;
    ``"wandb"`` / ``"mlflow"`` add the active W&B / MLflow run (started by the user); always the figures and
    the summary as files in ``log_dir``.

    Raises:
        ValueError: a backend other than ``"tensorboard"``, ``"csv"``, ``"wandb"``, ``"mlflow"``.
    """
    backends = [backends] if isinstance(backends, str) else list(backends)
    unknown = [b for b in backends if b not in _BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend {unknown[0]!r} for the monitor's outputs: choose among "
                         f"{', '.join(map(repr, _BACKENDS))}")
    log_dir = os.fspath(log_dir)
    writers = _backend_writers(backends, log_dir, log_dir, "backends", _warner(warn))
    _add_folder(writers, log_dir)
    return writers
