"""The ``lightning-lazy`` command: help, config names, every shipped config (fast_dev_run), sweep outputs."""

from __future__ import annotations

import csv
import inspect
import math
from pathlib import Path

import pytest
import torch
import yaml

from lightning_lazy import sweep
from lightning_lazy.cli import (
    main,
    resolve_config,
    resolve_config_args,
    shipped_configs,
)
from lightning_lazy.sweep import SweepRun

SHIPPED = [
    "vgg11_wide_standard", "vgg11_wide_lazy", "vgg11_wide_linearized",
    "resnet18_wide_standard", "resnet18_wide_lazy", "resnet18_wide_linearized",
]



def tiny(tmp_path: Path, num_train: int = 8, kappa: bool = False) -> list[str]:
    """LightningCLI options that shrink any shipped config to a CPU test: tiny width, synthetic data.

    The monitor (the configs' last callback) keeps its measures, on a probe of 4 examples; κ (the costliest,
    seconds even here) only where ``kappa`` is set.
    """
    return [
        "--data=lightning_lazy.data.cifar10.SyntheticCIFAR10DataModule",
        f"--data.num_train={num_train}", "--data.num_test=8", "--data.batch_size=4", "--data.eval_batch_size=8",
        "--data.num_workers=0",
        "--model.backbone.init_args.width=1", "--model.backbone.init_args.base_width=2",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.callbacks.probe_size=4", "--trainer.callbacks.kappa_probe_size=4",
        "--trainer.callbacks.ntk_probe_size=2", f"--trainer.callbacks.measure_kappa={str(kappa).lower()}",
    ]


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["--help"]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        for command in ("fit", "validate", "test", "sweep", "demo", "configs"):
            assert f"  {command} " in out


def test_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train"]) == 2
    assert "unknown command 'train'" in capsys.readouterr().err


def test_configs_are_shipped_and_listed(capsys: pytest.CaptureFixture[str]) -> None:
    assert set(SHIPPED) <= set(shipped_configs())
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_contents(name: str) -> None:
    config = yaml.safe_load(shipped_configs()[name].read_text())
    model, trainer = config["model"], config["trainer"]
    arch, _, mode = name.split("_")
    assert model["mode"] == mode and model["loss"] == "mse"
    assert model["backbone"]["class_path"].endswith("VGG11" if arch == "vgg11" else "ResNet18")
    assert model["backbone"]["init_args"]["width"] == 4 and model["backbone"]["init_args"]["batchnorm"] is False
    assert model["momentum"] == 0.9 and model["lr_decay"] == pytest.approx(1 / 3)
    assert config["data"]["init_args"]["batch_size"] == 128
    assert trainer["logger"]["class_path"].endswith("TensorBoardLogger")
    assert any(cb["class_path"].endswith("LazyTrainingMonitor") for cb in trainer["callbacks"])
    if mode == "lazy":
        assert model["alpha"] == 1e7 and trainer["precision"] == "64-true"


def test_config_names_resolve_to_package_files(tmp_path: Path) -> None:
    path = resolve_config("vgg11_wide_lazy")
    assert Path(path) == shipped_configs()["vgg11_wide_lazy"] and Path(path).is_file()
    assert resolve_config("vgg11_wide_lazy.yaml") == path
    own = tmp_path / "mine.yaml"
    own.write_text("model:\n  mode: lazy\n")
    assert resolve_config(str(own)) == str(own)
    assert resolve_config_args(["fit", "-c", "resnet18_wide_standard", "--config=vgg11_wide_lazy", "--x", "1"]) == [
        "fit", "-c", str(shipped_configs()["resnet18_wide_standard"]), f"--config={path}", "--x", "1"]
    with pytest.raises(SystemExit, match="vgg11_wide_standard"):  # the error lists what exists
        resolve_config("vgg11_narrow")


def test_unknown_config_name_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", "--config", "no_such_config"]) == 2
    assert "no shipped config" in capsys.readouterr().err


def test_print_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", "--config", "resnet18_wide_lazy", "--model.alpha", "1e3", "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["backbone"]["class_path"] == "lightning_lazy.models.resnet.ResNet18"
    assert printed["model"]["alpha"] == 1000.0 and printed["model"]["mode"] == "lazy"
    assert printed["data"]["class_path"] == "lightning_lazy.data.cifar10.CIFAR10DataModule"


@pytest.mark.parametrize("name", SHIPPED)
def test_fast_dev_run_every_shipped_config(name: str, tmp_path: Path) -> None:
    # The lazy configs keep alpha = 1e7 and float64: the tiny case of the real setting. The monitor
    # measures κ on the VGG configs (in linearized mode that nests jvp's: see LazyClassifier.forward).
    options = tiny(tmp_path, kappa=name.startswith("vgg11"))
    assert main(["fit", "--config", name, "--trainer.fast_dev_run=1", *options]) == 0


def test_validate_and_test_commands_from_a_checkpoint(tmp_path: Path) -> None:
    options = tiny(tmp_path)
    assert main(["fit", "--config", "vgg11_wide_lazy", "--model.alpha=100", "--trainer.max_epochs=1",
                 "--trainer.precision=32-true", *options]) == 0
    checkpoints = sorted(tmp_path.rglob("*.ckpt"))
    assert checkpoints, "fit wrote no checkpoint"
    for command in ("validate", "test"):
        assert main([command, "--config", "vgg11_wide_lazy", "--model.alpha=100", "--trainer.precision=32-true",
                     f"--ckpt_path={checkpoints[-1]}", *options]) == 0
    # LightningCLI rebuilds the model from the checkpoint's hyper-parameters: mode and alpha are in them.
    hparams = torch.load(checkpoints[-1], weights_only=False, map_location="cpu")["hyper_parameters"]
    assert hparams["mode"] == "lazy" and hparams["alpha"] == 100.0


def test_optimizer_from_the_command_line(tmp_path: Path) -> None:
    assert main(["fit", "--config", "vgg11_wide_standard", "--trainer.fast_dev_run=1", "--model.optimizer=Adam",
                 "--model.optimizer.lr=0.001", *tiny(tmp_path)]) == 0


def test_sweep_writes_csv_figure_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The shipped config as shipped, monitor and twin included (κ too), at toy size: the linearized runs
    # train the network's tangent model while the monitor's twin and measures run beside it.
    out = tmp_path / "sweep"
    rc = main(["sweep", "--config", "vgg11_wide_lazy", "--alphas", "1", "1e4", "--lrs", "0.05", "1e300",
               "--output", str(out), "--probe_size", "8", "--trainer.max_epochs=1",
               *tiny(tmp_path, num_train=16, kappa=True)])
    captured = capsys.readouterr()
    # lr = 1e300 overflows: those runs are reported and the sweep goes on.
    assert rc == 1
    assert "run 1/8" in captured.out and "run 8/8" in captured.out
    assert "FAILED" in captured.err
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    by_lr = {}
    for row in rows:
        by_lr.setdefault(float(row["lr"]), []).append(row)
    assert all(r["status"] == "failed" for r in by_lr[1e300])
    assert [r["error"] for r in by_lr[0.05] if r["status"] != "ok"] == []
    assert {(r["mode"], float(r["alpha"])) for r in by_lr[0.05]} == {
        ("lazy", 1.0), ("lazy", 1e4), ("standard", 1.0), ("linearized", 1.0)}
    for r in by_lr[0.05]:
        assert 0 <= float(r["test_acc"]) <= 1 and 0 <= float(r["train_acc"]) <= 1
        assert 0.5 <= float(r["activation_stability"]) <= 1
        assert r["model"] == "VGG11 x1"
    stability = {r["mode"] + r["alpha"]: float(r["activation_stability"]) for r in by_lr[0.05]}
    assert stability["linearized1.0"] == 1.0
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "table.md").read_text()
    assert "| VGG11 x1 | deep |" in table and "| VGG11 x1 | lazy | 10000 |" in table
    assert "| VGG11 x1 | linear | inf |" in table
    assert table.count("failed") == 4


def test_sweep_report_picks_the_best_lr_and_survives_failures(tmp_path: Path) -> None:
    runs = [
        SweepRun("c", "M x1", "lazy", 10.0, 0.1, "ok", train_acc=0.9, val_acc=0.5, test_acc=0.5,
                 activation_stability=0.8),
        SweepRun("c", "M x1", "lazy", 10.0, 0.01, "ok", train_acc=0.7, val_acc=0.6, test_acc=0.6,
                 activation_stability=0.9),
        SweepRun("c", "M x1", "lazy", 1e7, 0.1, "failed", error="FloatingPointError: nan"),
        SweepRun("c", "M x1", "standard", 1.0, 0.1, "ok", train_acc=1.0, val_acc=0.8, test_acc=0.8,
                 activation_stability=0.6),
    ]
    sweep.write_table(runs, tmp_path / "t.md")
    table = (tmp_path / "t.md").read_text()
    # Best lr at alpha = 10 by validation accuracy is 0.01; the failed alpha = 1e7 is no "lazy" row.
    assert "| M x1 | lazy | 10 | 0.01 | 70.0 | 60.0 | 90.0 |" in table
    assert "| M x1 | deep | 1 | 0.1 | 100.0 | 80.0 | 60.0 |" in table
    assert "failed: FloatingPointError: nan" in table
    sweep.write_figure(runs, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000
    sweep.write_csv(runs, tmp_path / "r.csv")
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "ok"]
    assert math.isnan(float(rows[2]["test_acc"]))


def test_sweep_argument_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", "--config", "vgg11_wide_lazy", "--alphas", "0", "--output", str(tmp_path)]) == 2
    assert "--alphas" in capsys.readouterr().err
    assert main(["sweep", "--config", "vgg11_wide_lazy", "--model.alpha=3", "--output", str(tmp_path)]) == 2
    assert "--alphas" in capsys.readouterr().err
    assert main(["sweep", "--config", "nope", "--output", str(tmp_path)]) == 2


@pytest.mark.parametrize("download", [False, True])
def test_cifar_config_without_the_data_is_one_line_and_leaves_nothing(
    download: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from torchvision.datasets import CIFAR10

    # Nothing listens on the loopback discard port: the download fails at once, as on a machine offline.
    monkeypatch.setattr(CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    monkeypatch.chdir(tmp_path)  # the config's relative folders (runs/, data/) would land here
    rc = main(["fit", "--config", "vgg11_wide_lazy", "--data.data_dir=data/cifar", f"--data.download={download}",
               "--data.download_timeout=5", "--model.backbone.init_args.width=1",
               "--model.backbone.init_args.base_width=2", "--trainer.enable_model_summary=false"])
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert err.startswith("lightning-lazy fit: ") and "\n" not in err and "Traceback" not in err
    assert ("Could not download CIFAR-10" if download else "CIFAR-10 not found") in err
    assert "cifar-10-python.tar.gz" in err  # where to get it
    assert list(tmp_path.iterdir()) == []  # no empty data/ folder, no logs


def test_sweep_module_holds_the_sweep_and_cli_only_dispatches() -> None:
    import inspect

    from lightning_lazy import cli

    source = inspect.getsource(cli)
    assert "def run_sweep" not in source and "class SweepRun" not in source and "def write_table" not in source
    assert callable(sweep.run_sweep) and callable(sweep.write_csv) and callable(sweep.write_figure)


def test_cli_and_sweep_share_the_runner_without_an_import_cycle() -> None:
    import ast
    import inspect

    from lightning_lazy import cli, runner

    def imported(module: object) -> set[str]:
        tree = ast.parse(inspect.getsource(module))
        names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        return names | {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}

    # cli -> sweep -> runner, cli -> runner; nothing points back up.
    assert "lightning_lazy.cli" not in imported(sweep)
    assert not {"lightning_lazy.cli", "lightning_lazy.sweep"} & imported(runner)
    assert "def make_lightning_cli" not in inspect.getsource(cli) and "def resolve_config" not in inspect.getsource(cli)
    assert sweep.make_lightning_cli is runner.make_lightning_cli and cli.resolve_config is runner.resolve_config


def test_demo_is_dispatched(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    seen: list[list[str]] = []
    fake = types.ModuleType("lightning_lazy.demo")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "lightning_lazy.demo", fake)
    monkeypatch.setattr("lightning_lazy.demo", fake, raising=False)
    assert main(["demo", "--steps", "3"]) == 0
    assert seen == [["--steps", "3"]]


def test_gpu_cifar_benchmark_runs_at_toy_size_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util
    import json
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_cifar.py"
    spec = importlib.util.spec_from_file_location("gpu_cifar_under_test", script)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--width", "1", "--base_width", "2", "--num_train", "64",
                       "--batch_size", "16", "--warmup", "1", "--probe_size", "4", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "images/s" in printed and "standard+twin" in printed
    record = json.loads(out.read_text())
    assert set(record["results"]) == {"data only", "standard", "standard+twin", "linearized"}
    for case, result in record["results"].items():
        assert result["images_per_s"] > 0 and result["epoch_s"] > 0 and result["peak_memory_mib"] > 0, case
        assert result["images"] == 64


def test_fit_help_shows_the_packages_options_first(capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_lazy.callback import LazyTrainingMonitor

    assert main(["fit", "--help"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("usage: lightning-lazy fit") and len(lines) < 200  # LightningCLI's is 1,200
    assert "``" not in out and ":class:" not in out  # docstring markup, as a terminal would show it raw
    # The model's options, then every one of the monitor's, with their defaults and their docstring's words.
    assert out.index("--model.alpha (default 1.0)") < out.index("--trainer.callbacks.loss (default None)")
    for name in inspect.signature(LazyTrainingMonitor.__init__).parameters:
        if name != "self":
            assert f"--trainer.callbacks.{name} (default " in out, name
    assert "every_n_epochs (default 1)\n      measure at the end of every n-th training epoch" in out
    assert "lightning-lazy fit --help-all" in out


def test_help_all_is_lightning_clis_help(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def fake(args: list[str], run: bool) -> None:
        seen.append(args)
        raise SystemExit(0)

    monkeypatch.setattr("lightning_lazy.cli.make_lightning_cli", fake)
    assert main(["fit", "--config", "mnist1d_cnn_lazy", "--help-all"]) == 0
    assert seen[0][0] == "fit" and seen[0][-1] == "--help"


def test_a_refusal_during_fit_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The monitor told to watch a sub-module that does not exist refuses at fit start: one line on stderr, no
    # traceback, status 1.
    rc = main(["fit", "--config", "vgg11_wide_lazy", "--trainer.fast_dev_run=1", *tiny(tmp_path),
               "--trainer.callbacks.model=no_such_module"])
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert err.startswith("lightning-lazy fit: LazyTrainingMonitor(model='no_such_module')") and "\n" not in err
