"""The README's main command at toy size, its table, its arguments, and the drop-in example."""

import importlib.util
import logging
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_lazy import diagnostics
from lightning_lazy.cli import main as cli_main
from lightning_lazy.demo import (
    COLUMNS,
    DemoLogger,
    TeacherStudentRegressor,
    _parser,
    format_table,
    progress_bar,
    relu_mlp,
    tensorboard_address,
    tensorboard_command,
)
from lightning_lazy.quiet import LIGHTNING_INFO_LOGGERS

ROOT = Path(__file__).resolve().parents[1]
HEADERS = ["alpha", "kappa(w0)", "horizon t~*", "divergence", "act. stability", "kernel alignment", "test loss",
           "tangent test loss", "kernel val loss", "time", "regime"]


def table_rows(out: str) -> list[dict[str, str]]:
    lines = out[out.index("alpha | kappa(w0)"):].splitlines()
    header = [h.strip() for h in lines[0].split("|")]
    rows = []
    for line in lines[2:]:
        if "|" not in line:
            break
        rows.append(dict(zip(header, (c.strip() for c in line.split("|")))))
    return rows


class Lines(logging.Handler):
    """Collects what Lightning's info logger lets through (its filters run before any handler)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_demo_quick_table_logs_hparams_and_new_versions(tmp_path, capsys):
    argv = ["demo", "--quick", "--no-progress", "--alphas", "0.1", "100", "--log-dir", str(tmp_path)]
    # rank_zero_info writes to the logger of whichever Lightning package was imported last (both are, in the suite).
    lightning_logs, lines = [logging.getLogger(name) for name in LIGHTNING_INFO_LOGGERS], Lines()
    for log in lightning_logs:
        log.addHandler(lines)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert cli_main(argv) == 0
    finally:
        for log in lightning_logs:
            log.removeHandler(lines)
    out, err = capsys.readouterr()
    rows = table_rows(out)
    assert [r["alpha"] for r in rows] == ["0.1", "100"]
    assert list(rows[0]) == HEADERS
    small, large = ({k: float(v.rstrip("s")) for k, v in r.items() if k != "regime"} for r in rows)
    for row in (small, large):
        assert all(math.isfinite(v) for v in row.values()), row
    # κ(w0) ∝ 1/α exactly at w0, the horizon 1/√κ(w0) ∝ √α; Δ and the kernel's motion fall as α grows.
    assert small["kappa(w0)"] == pytest.approx(1000 * large["kappa(w0)"], rel=0.01)
    assert large["horizon t~*"] == pytest.approx(math.sqrt(1000) * small["horizon t~*"], rel=0.01)
    assert large["divergence"] < small["divergence"]
    assert small["act. stability"] < large["act. stability"] <= 1
    assert small["kernel alignment"] < large["kernel alignment"] <= 1
    assert rows[1]["regime"] == "lazy"
    # The kernel baseline does not depend on α (a centred model's kernel scales by α², its predictor does not).
    assert small["kernel val loss"] == pytest.approx(large["kernel val loss"], rel=1e-6)
    # A quiet terminal: no warning the user cannot act on, none of Lightning's tips or accelerator lines;
    # the monitor's own lines (the horizon, the laziness summary) still go through.
    assert [str(w.message)[:80] for w in caught] == []
    assert not any(line.startswith(("💡 Tip", "GPU available", "`Trainer.fit` stopped")) for line in lines.lines)
    assert "Laziness summary" in out + err + "\n".join(lines.lines)
    # The printed TensorBoard command runs from here: a program that exists, or this Python with -m; then the
    # address that opens on the lazy/ tags with smoothing 0.
    command, address = out[out.index("TensorBoard: ") + len("TensorBoard: "):].splitlines()[:2]
    assert address.strip() == f"then open {tensorboard_address()}" and "smoothing=0" in address
    program = command.split(" --logdir ")[0]
    assert Path(program.split(" -m ")[0]).exists() or program == "tensorboard"
    assert command.endswith(str(tmp_path / "demo" / "version_0"))

    run = tmp_path / "demo" / "version_0" / "alpha_0.1"
    assert list(run.glob("events.out.tfevents.*"))
    hparams = yaml.safe_load((run / "hparams.yaml").read_text())
    # The learning rate really used: 0.25 / ||Dh(w0)||^2 of the very network trained, not the default 0.1.
    torch.set_default_dtype(torch.float64)
    try:
        from lightning_lazy.data.teacher import TeacherStudentDataModule

        data = TeacherStudentDataModule(d=10, n_train=256, n_val=256, n_test=1024, batch_size=64, seed=0,
                                        dtype="float64")
        data.setup("fit")
        x, _ = next(iter(data.train_dataloader()))
        expected = 0.25 / diagnostics.jacobian_norm(relu_mlp(10, 32, 2, 0), x, tol=1e-4).item() ** 2
    finally:
        torch.set_default_dtype(torch.float32)
    assert hparams["lr"] == pytest.approx(expected, rel=1e-3) and hparams["step"] == 0.25 and hparams["alpha"] == 0.1
    accumulator = EventAccumulator(str(run), size_guidance={"scalars": 0})
    accumulator.Reload()
    scalars = set(accumulator.Tags()["scalars"])
    assert "hp_metric" not in scalars and "lazy/divergence" in scalars
    assert "table/divergence" in scalars  # the HParams tab's metrics: what the run measured
    # TensorBoard orders tag groups alphabetically and opens on the first: the monitor's lazy/ is it (no epoch
    # scalar, the demo's own values under table/).
    assert "epoch" not in scalars and min(tag.split("/")[0] for tag in scalars) == "lazy"
    # Layers as the demo's network names them: nn.Sequential's 0, 2, 4, not the wrapper's model.module.0.
    assert {tag.split("/")[2] for tag in scalars if tag.startswith("lazy/layers/")} == {"0", "2", "4"}

    # A second run of the demo starts version_1; version_0 is left as it was.
    before = sorted(p.name for p in run.iterdir())
    assert cli_main(argv[:3] + ["--epochs", "1", "--alphas", "100", "--log-dir", str(tmp_path)]) == 0
    assert (tmp_path / "demo" / "version_1" / "alpha_100").is_dir()
    assert sorted(p.name for p in run.iterdir()) == before
    assert "version_1" in capsys.readouterr().out


def test_the_module_trains_the_network_whose_lr_was_computed():
    model = TeacherStudentRegressor(d=5, width=8, alpha=3.0, lr=0.01, seed=7, step=0.25)
    reference = relu_mlp(5, 8, 2, 7)
    for (name, p), q in zip(model.model.module.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name
    assert model.hparams.lr == 0.01 and model.hparams.step == 0.25


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--step", "-1"], "--step must be in (0, 3.8)"),
        (["--step", "0"], "--step must be in (0, 3.8)"),
        (["--step", "nan"], "--step must be in (0, 3.8)"),
        (["--step", "inf"], "--step must be in (0, 3.8)"),
        (["--step", "4"], "larger steps diverge"),
        (["--alphas", "1", "0"], "every alpha must be positive and finite, got 1 0"),
        (["--alphas", "inf"], "every alpha must be positive and finite"),
        (["--alphas", "1", "10", "1.0"], "give each alpha once, got 1 10 1"),
        (["--epochs", "0"], "--epochs must be a positive integer, got 0"),
        (["--width", "-3"], "--width must be a positive integer"),
        (["--n-train", "0"], "--n-train must be a positive integer"),
        (["--batch-size", "0"], "--batch-size must be a positive integer"),
        (["--d", "0"], "--d must be a positive integer"),
        (["--threads", "0"], "--threads must be a positive integer"),
    ],
)
def test_demo_rejects_bad_arguments_in_one_line(argv, message, tmp_path, capsys):
    assert cli_main(["demo", "--log-dir", str(tmp_path / "logs"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lightning-lazy demo: ") and message in err and "\n" not in err
    assert not (tmp_path / "logs").exists()  # nothing trained, nothing written


def test_demo_rejects_a_log_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert cli_main(["demo", "--log-dir", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_format_table():
    table = format_table([{"alpha": 10.0, "kappa0": 0.0424, "horizon": 4.86, "divergence": 0.01,
                           "activation_stability": 0.99123, "kernel_alignment": math.nan, "test_loss": 0.1,
                           "tangent_test_loss": 0.2, "kernel_val_loss": 0.3, "seconds": 1.5,
                           "regime": "lazy (kernel regime)"}])
    header, rule, row = table.splitlines()
    assert [h.strip() for h in header.split("|")] == [h for _, h, _ in COLUMNS] == HEADERS
    cells = [c.strip() for c in row.split("|")]
    assert cells == ["10", "0.0424", "4.86", "0.01", "0.9912", "n/a", "0.1", "0.2", "0.3", "1.5s", "lazy"]
    assert len(rule) == len(header)


def test_tensorboard_command_without_the_environment_on_path(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    command = tensorboard_command("logs/demo/version_0")
    program = command.removesuffix(" --logdir logs/demo/version_0")
    beside = Path(sys.executable).parent / "tensorboard"
    assert program in (str(beside), str(beside.relative_to(Path.cwd())) if beside.is_relative_to(Path.cwd()) else "",
                       f"{sys.executable} -m tensorboard.main")


def test_add_to_existing_trainer_example(tmp_path):
    spec = importlib.util.spec_from_file_location("add_example", ROOT / "examples" / "add_to_existing_trainer.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    metrics = example.main(["--epochs", "1", "--log-dir", str(tmp_path)])
    for tag in ("lazy/divergence", "lazy/kappa", "lazy/tangent/val_acc", "lazy/ntk_distance"):
        assert math.isfinite(metrics[tag]), tag
    assert 0.0 <= metrics["lazy/tangent/val_acc"] <= 1.0


def test_add_to_existing_trainer_example_says_what_to_install(monkeypatch, capsys):
    # Without scikit-learn (the "examples" extra), one line saying what to install, not a traceback.
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    spec = importlib.util.spec_from_file_location("add_example_no_sklearn",
                                                  ROOT / "examples" / "add_to_existing_trainer.py")
    example = importlib.util.module_from_spec(spec)
    with pytest.raises(SystemExit) as stop:
        spec.loader.exec_module(example)
    message = str(stop.value.code)
    assert "scikit-learn" in message and 'pip install -e ".[examples]"' in message and "\n" not in message


def test_demo_help_has_text_for_every_option_and_no_markup(capsys):
    parser = _parser()
    assert all(action.help for action in parser._actions), [a.dest for a in parser._actions if not a.help]
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "``" not in out and ":class:" not in out


def test_the_progress_bar_shows_alpha_not_a_cut_version(tmp_path):
    import pytorch_lightning as pl

    logger = DemoLogger(str(tmp_path), name="demo", version="version_0/alpha_0.1")
    bar = progress_bar("0.1")
    trainer = pl.Trainer(logger=logger, callbacks=[bar], max_epochs=1, enable_checkpointing=False,
                         enable_model_summary=False)
    metrics = bar.get_metrics(trainer, TeacherStudentRegressor(width=4))
    assert metrics.get("alpha") == "0.1" and "v_num" not in metrics
