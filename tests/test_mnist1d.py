"""MNIST-1D: the data module (generated locally, cached), the CNN, the packaged configs, the sweep's kernel mode."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lightning_lazy import sweep
from lightning_lazy.cli import main
from lightning_lazy.data.mnist1d import MNIST1DDataModule, make_mnist1d
from lightning_lazy.models.cnn1d import CNN1D, conv_output_length
from lightning_lazy.runner import (
    make_lightning_cli,
    resolve_config,
    resolve_config_args,
    shipped_configs,
)

CONFIGS = ["mnist1d_cnn_standard", "mnist1d_cnn_lazy", "mnist1d_cnn_linearized"]
SMALL = 200  # examples generated: 160 train / 40 test



@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt of the mnist1d package to download fails the test."""
    import mnist1d.data
    import requests

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("MNIST-1D must be generated locally, never downloaded")

    monkeypatch.setattr(requests, "get", no_network)
    monkeypatch.setattr(mnist1d.data, "get_dataset", no_network)


def small(tmp_path: Path, num_samples: int = SMALL) -> list[str]:
    """LightningCLI options that shrink a packaged MNIST-1D config to a test: few examples, small probes, the
    monitor measuring after every epoch (the configs: every 5th) since the tests train one or two."""
    return [
        f"--data.data_dir={tmp_path / 'data'}", f"--data.num_samples={num_samples}", "--data.val_size=20",
        "--data.batch_size=20", f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.callbacks.probe_size=16",
        "--trainer.callbacks.kappa_probe_size=4", "--trainer.callbacks.ntk_probe_size=4",
        "--trainer.callbacks.every_n_epochs=1",
    ]


# ------------------------------------------------------------------------------------------------- data


def test_data_is_generated_once_cached_and_standardized(tmp_path: Path, offline: None,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    py_state, np_state = random.getstate(), np.random.get_state()
    dm = MNIST1DDataModule(data_dir=str(tmp_path), num_samples=SMALL, seed=3, val_size=20, batch_size=32)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.cache_path.is_file() and dm.cache_path.parent == tmp_path
    # make_dataset seeds numpy's and Python's global generators: the caller's are given back untouched.
    assert random.getstate() == py_state and np.all(np.random.get_state()[1] == np_state[1])
    x, y = dm.split("train")
    xv, _ = dm.split("val")
    xt, yt = dm.split("test")
    assert x.shape == (140, 40) and xv.shape == (20, 40) and xt.shape == (40, 40)
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and set(y.tolist()) <= set(range(10))
    everything = torch.cat([x, xv, xt])
    # One mean and one standard deviation over the whole set, as the mnist1d package does.
    assert abs(float(everything.mean())) < 1e-5 and abs(float(everything.std()) - 1) < 1e-2
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (32, 40) and yb.shape == (32,)
    # A second module reads the file: generating again would fail here.
    monkeypatch.setattr("mnist1d.data.make_dataset", lambda *a, **k: pytest.fail("regenerated despite the cache"))
    again = MNIST1DDataModule(data_dir=str(tmp_path), num_samples=SMALL, seed=3, val_size=20)
    again.prepare_data()
    assert torch.equal(again.split("train")[0], x) and torch.equal(again.split("test")[1], yt)


def test_generation_is_the_package_default_and_seeded(offline: None) -> None:
    from mnist1d.data import get_dataset_args, make_dataset

    ours = make_mnist1d(SMALL, seed=5)
    args = get_dataset_args()
    args.num_samples, args.seed = SMALL, 5
    theirs = make_dataset(args)
    assert np.allclose(ours["x"], theirs["x"], atol=1e-6) and np.array_equal(ours["y"], theirs["y"])
    assert ours["x"].shape == (160, 40) and ours["x_test"].shape == (40, 40)
    assert not np.allclose(make_mnist1d(SMALL, seed=6)["x"], ours["x"])


def test_data_module_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_samples"):
        MNIST1DDataModule(data_dir=str(tmp_path), num_samples=50)
    with pytest.raises(ValueError, match="val_size"):
        MNIST1DDataModule(data_dir=str(tmp_path), num_samples=SMALL, val_size=160).setup()
    bad = MNIST1DDataModule(data_dir=str(tmp_path), num_samples=SMALL)
    bad.cache_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(bad.cache_path, format=np.int64(1), num_samples=np.int64(999), seed=np.int64(42))
    with pytest.raises(ValueError, match="delete it"):
        bad.setup()


# ------------------------------------------------------------------------------------------------ model


def test_cnn1d_is_the_published_convbase_with_a_width_factor() -> None:
    net = CNN1D()
    assert conv_output_length(40) == 5
    # 25 channels: 1·25·5+25, 2 x (25·25·3+25), 125·10+10 — the MNIST-1D code's ConvBase.
    assert sum(p.numel() for p in net.parameters()) == 150 + 2 * 1900 + 1260
    assert net(torch.randn(3, 40)).shape == (3, 10) and net(torch.randn(3, 1, 40)).shape == (3, 10)
    wide = CNN1D(width=2)
    assert wide.features[0].out_channels == 50 and wide.classifier.in_features == 250
    assert all(float(m.bias.detach().abs().max()) == 0 for m in net.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Linear)))
    with pytest.raises(ValueError, match="length"):
        net(torch.randn(3, 32))


# ---------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_resolve_by_name(name: str) -> None:
    path = resolve_config(name)
    assert Path(path) == shipped_configs()[name]
    config = yaml.safe_load(Path(path).read_text())
    mode = name.rsplit("_", 1)[1]
    assert config["model"]["mode"] == mode and config["model"]["loss"] == "mse"
    assert config["model"]["backbone"]["class_path"] == "lightning_lazy.models.cnn1d.CNN1D"
    assert config["data"]["class_path"] == "lightning_lazy.data.mnist1d.MNIST1DDataModule"
    assert config["trainer"]["accelerator"] == "cpu"
    assert any(cb["class_path"].endswith("LazyTrainingMonitor") for cb in config["trainer"]["callbacks"])


@pytest.mark.parametrize("name", CONFIGS)
def test_each_config_fits_a_few_steps_with_the_monitor(name: str, tmp_path: Path, offline: None) -> None:
    args = resolve_config_args(["--config", name, *small(tmp_path), "--trainer.max_epochs=1",
                                "--trainer.limit_train_batches=3", "--trainer.enable_checkpointing=false"])
    cli = make_lightning_cli(args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 3
    assert torch.isfinite(metrics["train/loss_epoch"]) and "val/acc" in metrics
    # The monitor measured at the end of the epoch; the twin (all but the linearized config) gave Δ.
    assert 0 < float(metrics["lazy/activation_stability"]) <= 1 and torch.isfinite(metrics["lazy/kappa"])
    if name.endswith("linearized"):
        assert "lazy/divergence" not in metrics
    else:
        assert torch.isfinite(metrics["lazy/divergence"])
    assert (tmp_path / "data" / f"mnist1d_n{SMALL}_seed42.npz").is_file()


def test_fit_through_the_command_line(tmp_path: Path, offline: None) -> None:
    assert main(["fit", "--config", "mnist1d_cnn_lazy", *small(tmp_path), "--trainer.fast_dev_run=2"]) == 0


# --------------------------------------------------------------------------------------------- kernel


def test_kernel_predictor_is_the_explicit_formula() -> None:
    from torch.func import functional_call, jacrev

    torch.manual_seed(0)
    net = CNN1D(base_width=2).double()
    x, xt = torch.randn(12, 40, dtype=torch.float64), torch.randn(5, 40, dtype=torch.float64)
    y = torch.arange(12) % 10
    outputs, info = sweep.kernel_predictor(net, x, y, {"train": x, "test": xt}, 10)
    params = dict(net.named_parameters())

    def jacobian(inputs: torch.Tensor) -> torch.Tensor:  # [N, K, P]
        jac = jacrev(lambda p: functional_call(net, p, (inputs,)))(params)
        return torch.cat([j.reshape(inputs.shape[0], 10, -1) for j in jac.values()], dim=2)

    j, jt = jacobian(x), jacobian(xt)
    traced = torch.einsum("ikp,jkp->ij", j, j)
    expected = torch.einsum("ikp,jkp->ij", jt, j) @ torch.linalg.solve(traced, torch.eye(10, dtype=torch.float64)[y])
    assert torch.allclose(outputs["test"], expected, rtol=1e-6, atol=1e-8)
    assert torch.allclose(outputs["train"], torch.eye(10, dtype=torch.float64)[y], atol=1e-6)  # interpolation
    assert info["train_size"] == 12 and 0 < info["min_eigenvalue"] <= info["max_eigenvalue"]


def test_sweep_with_the_kernel_mode_end_to_end(tmp_path: Path, offline: None,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep"
    rc = main(["sweep", "--config", "mnist1d_cnn_standard", "--modes", "standard", "lazy", "linearized", "kernel",
               "--alphas", "1", "1000", "--output", str(out), "--probe_size", "32", "--trainer.max_epochs=2",
               *small(tmp_path)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    with open(out / "sweep.csv") as f:
        rows = {(r["mode"], float(r["alpha"])): r for r in csv.DictReader(f)}
    assert set(rows) == {("standard", 1.0), ("lazy", 1.0), ("lazy", 1000.0), ("linearized", 1.0), ("kernel", 1.0)}
    assert all(r["status"] == "ok" for r in rows.values())
    kernel = rows["kernel", 1.0]
    # The kernel predictor interpolates its 140 training examples; no training, so no epochs.
    assert float(kernel["train_acc"]) == 1.0 and float(kernel["kernel/train_size"]) == 140
    assert 0 <= float(kernel["test_acc"]) <= 1 and int(kernel["epochs"]) == 0
    # The monitor on every trained row: the lazy and linearized runs stay by their tangent twin, the standard
    # run leaves it.
    delta = {key: float(r["lazy/divergence"]) for key, r in rows.items() if key[0] != "kernel"}
    assert delta["linearized", 1.0] < 1e-4
    assert delta["lazy", 1000.0] < 0.1 * delta["standard", 1.0]
    table = (out / "table.md").read_text()
    for row in ("| CNN1D x1 | deep | 1 |", "| CNN1D x1 | lazy | 1 |", "| CNN1D x1 | lazy | 1000 |",
                "| CNN1D x1 | linear | inf |", "| CNN1D x1 | kernel | inf | - | 100.0 |"):
        assert row in table
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kernel_train_size_takes_a_subset(tmp_path: Path, offline: None) -> None:
    out = tmp_path / "sweep"
    assert main(["sweep", "--config", "mnist1d_cnn_standard", "--modes", "kernel", "--kernel_train_size", "50",
                 "--output", str(out), *small(tmp_path)]) == 0
    with open(out / "sweep.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["kernel/train_size"]) == 50 and float(row["train_acc"]) == 1.0
    assert main(["sweep", "--config", "mnist1d_cnn_standard", "--modes", "kernel", "--kernel_train_size", "0",
                 "--output", str(out)]) == 2
