"""TEMPORARY minimal writers (replaced by the writers branch)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any


class Writer:
    folder: str | None = None

    def setup(self) -> None: ...
    def scalars(self, values: Mapping[str, float], step: int) -> None: ...
    def image(self, tag: str, png: bytes, step: int, file: str) -> None: ...
    def text(self, tag: str, text: str, step: int, file: str) -> None: ...
    def hparams(self, params: Mapping[str, Any], metrics: Mapping[str, float], step: int) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class FolderWriter(Writer):
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def image(self, tag: str, png: bytes, step: int, file: str) -> None:
        os.makedirs(self.folder, exist_ok=True)
        with open(os.path.join(self.folder, file), "wb") as f:
            f.write(png)

    def text(self, tag: str, text: str, step: int, file: str) -> None:
        os.makedirs(self.folder, exist_ok=True)
        with open(os.path.join(self.folder, file), "w") as f:
            f.write(text + "\n")


class TensorBoardWriter(Writer):
    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def setup(self) -> None:
        from lightning_lazy.watch.report import custom_scalars_layout

        self.writer.add_custom_scalars(custom_scalars_layout())

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def image(self, tag: str, png: bytes, step: int, file: str) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
        summary = Summary(value=[Summary.Value(tag=tag, image=Summary.Image(
            height=height, width=width, colorspace=3, encoded_image_string=png))])
        self.writer._get_file_writer().add_summary(summary, step)

    def text(self, tag: str, text: str, step: int, file: str) -> None:
        self.writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()), step)

    def hparams(self, params: Mapping[str, Any], metrics: Mapping[str, float], step: int) -> None:
        from torch.utils.tensorboard.summary import hparams

        file_writer = self.writer._get_file_writer()
        for summary in hparams(dict(params), dict(metrics)):
            file_writer.add_summary(summary, step)

    def flush(self) -> None:
        self.writer.flush()


def writers_for_loggers(loggers: Sequence[Any], log_dir: str | None) -> list[Writer]:
    writers: list[Writer] = []
    if log_dir is not None:
        writers.append(FolderWriter(log_dir))
    for logger in loggers:
        if any(cls.__name__ == "TensorBoardLogger" for cls in type(logger).__mro__):
            writers.append(TensorBoardWriter(logger.experiment))
    return writers


def writers_for_folder(log_dir: str, backends: Sequence[str] = ("tensorboard", "csv")) -> list[Writer]:
    from torch.utils.tensorboard import SummaryWriter

    return [FolderWriter(log_dir), TensorBoardWriter(SummaryWriter(log_dir))]


def writers_for_report_to(report_to: Any, logging_dir: str, output_dir: str) -> list[Writer]:
    from torch.utils.tensorboard import SummaryWriter

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    writers: list[Writer] = [FolderWriter(output_dir)]
    if "tensorboard" in names or "all" in names:
        writers.append(TensorBoardWriter(SummaryWriter(logging_dir)))
    return writers
