"""Against published numbers: the MNIST-1D baselines and their configs, seeds and widths in the sweep, the lazy-rich
crossover, the kernel row at the training time, and the neural-tangents lock-step benchmark (its torch side)."""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lightning_lazy import sweep
from lightning_lazy.cli import main
from lightning_lazy.data.mnist1d import MNIST1DDataModule
from lightning_lazy.models import CNN1D, GRU1D, MLP1D, Logistic1D
from lightning_lazy.runner import make_lightning_cli, resolve_config
from lightning_lazy.sweep import SweepRun

ROOT = Path(__file__).resolve().parents[1]
PAPER = ["mnist1d_logreg_paper", "mnist1d_mlp_paper", "mnist1d_cnn_paper", "mnist1d_gru_paper"]
SMALL = 200  # examples generated: 160 train / 40 test


# ------------------------------------------------------------------------------------------------ models


def test_baselines_have_the_published_parameter_counts_and_shapes() -> None:
    # The counts the MNIST-1D benchmark notebook prints for LinearBase, MLPBase, GRUBase and ConvBase.
    expected = {Logistic1D(): 410, MLP1D(): 15_210, GRU1D(): 5_134, CNN1D(init="pytorch"): 5_210}
    x = torch.randn(3, 40)
    for model, count in expected.items():
        assert sum(p.numel() for p in model.parameters()) == count, type(model).__name__
        assert model(x).shape == (3, 10) and model(x.unsqueeze(1)).shape == (3, 10)
        with pytest.raises(ValueError, match=r"expects signals \[N, 40\]"):
            model(torch.randn(3, 41))
    assert MLP1D(hidden=1, width=16).hidden == 16  # --widths sets the hidden width through `width`


def test_mlp_is_residual_and_inits_differ() -> None:
    torch.manual_seed(0)
    mlp = MLP1D(hidden=8)
    x = torch.randn(5, 40)
    z1 = torch.relu(mlp.linear1(x))
    assert torch.allclose(mlp(x), mlp.linear3(z1 + torch.relu(mlp.linear2(z1))))
    xavier = MLP1D(hidden=8, init="xavier_normal")
    assert all(float(b.abs().max()) == 0 for n, b in xavier.named_parameters() if n.endswith("bias"))
    assert float(mlp.linear1.bias.abs().max()) > 0  # PyTorch's default init draws the biases
    with pytest.raises(ValueError, match="init must be one of"):
        MLP1D(init="he")
    with pytest.raises(ValueError, match="length must be a positive integer"):
        GRU1D(length=0)


def test_gru_reads_the_signal_as_a_sequence() -> None:
    torch.manual_seed(0)
    gru = GRU1D(hidden=3)
    x = torch.randn(2, 40)
    outputs, _ = gru.gru(x.unsqueeze(-1))
    assert outputs.shape == (2, 40, 6)
    assert torch.allclose(gru(x), gru.classifier(outputs.flatten(1)))
    # Position matters: reversing the signal changes the scores (a bag of values would not).
    assert not torch.allclose(gru(x), gru(x.flip(1)))


# -------------------------------------------------------------------------------------------------- data


def test_stored_order_and_position_permutation(tmp_path: Path) -> None:
    plain = MNIST1DDataModule(data_dir=str(tmp_path), num_samples=SMALL, batch_size=20, shuffle=False)
    x, y = plain.split("train")
    first = next(iter(plain.train_dataloader()))
    # shuffle=False: batch after batch in the stored order, as notebooks/train.py takes them.
    assert torch.equal(first[0], x[:20]) and torch.equal(first[1], y[:20])
    again = [b[0] for b in plain.train_dataloader()]
    assert torch.equal(torch.cat(again), x)
    permuted = MNIST1DDataModule(data_dir=str(tmp_path), num_samples=SMALL, permute_positions=42)
    order = np.random.RandomState(42).permutation(40)
    for split in ("train", "test"):
        assert torch.equal(permuted.split(split)[0], plain.split(split)[0][:, order])
        assert torch.equal(permuted.split(split)[1], plain.split(split)[1])
    for bad in (dict(permute_positions=-1), dict(permute_positions=True), dict(shuffle="no")):
        with pytest.raises(ValueError, match="permute_positions|shuffle"):
            MNIST1DDataModule(data_dir=str(tmp_path), **bad)


# ----------------------------------------------------------------------------------------------- configs


def test_paper_configs_state_the_recipe(tmp_path: Path) -> None:
    for name in PAPER:
        config = yaml.safe_load(Path(resolve_config(name)).read_text())
        assert config["trainer"]["max_steps"] == 8000 and config["data"]["init_args"]["batch_size"] == 100
        assert config["data"]["init_args"]["shuffle"] is False and config["data"]["init_args"]["val_size"] == 0
        assert config["model"]["optimizer"] == {"class_path": "torch.optim.Adam",
                                                "init_args": {"lr": 0.01, "weight_decay": 0.0}}
        assert config["model"]["loss"] == "cross_entropy" and config["model"]["lr_decay"] == 0.0
        assert config["model"]["backbone"]["init_args"]["init"] == "pytorch"
        cli = make_lightning_cli(["--config", resolve_config(name), f"--data.data_dir={tmp_path}",
                                  f"--data.num_samples={SMALL}"], run=False)
        assert isinstance(cli.model.configure_optimizers()["optimizer"], torch.optim.Adam)


def test_paper_configs_sweep_over_seeds(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    rc = main(["sweep", "--config", "mnist1d_logreg_paper", "mnist1d_mlp_paper", "--modes", "standard",
               "--seed", "0", "1", "--output", str(out), "--probe_size", "8", "--trainer.max_steps=4",
               f"--data.data_dir={tmp_path / 'data'}", f"--data.num_samples={SMALL}", "--data.batch_size=20",
               f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}", "--trainer.enable_progress_bar=false",
               "--trainer.enable_model_summary=false"])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [(r["config"], r["seed"]) for r in rows] == [("mnist1d_logreg_paper", "0"), ("mnist1d_logreg_paper", "1"),
                                                        ("mnist1d_mlp_paper", "0"), ("mnist1d_mlp_paper", "1")]
    # The logistic regression has no ReLU: stable activations are not measured rather than a failed run.
    assert rows[0]["activation_stability"] == "nan" and float(rows[2]["activation_stability"]) > 0
    # Different seeds, different initial weights: different test losses.
    assert rows[2]["test_loss"] != rows[3]["test_loss"]
    table = (out / "table.md").read_text()
    assert "Mean ± sample standard deviation over seeds 0, 1" in table
    assert "| MLP1D x1 | deep | 1 | 0.01 | " in table and " ± " in table


# ---------------------------------------------------------------------------------- seeds, widths, crossover


def test_table_gives_mean_and_sample_sd_over_seeds(tmp_path: Path) -> None:
    runs = [SweepRun("c", "M", "standard", 1.0, 0.1, "ok", train_acc=t, val_acc=t, test_acc=t,
                     activation_stability=0.5, seed=s) for s, t in enumerate([0.80, 0.90, 1.0])]
    sweep.write_table(runs, tmp_path / "t.md")
    # mean 90.0, sample standard deviation 10.0
    assert "| M | deep | 1 | 0.1 | 90.0 ± 10.0 | 90.0 ± 10.0 | 50.0 ± 0.0 |" in (tmp_path / "t.md").read_text()


def test_crossover_alpha_interpolates_in_log_alpha() -> None:
    # Rich 0.9, lazy 0.5: midpoint 0.7, crossed between alpha 10 (0.8) and 100 (0.6), halfway: sqrt(10 * 100).
    star = sweep.crossover_alpha([1, 10, 100, 1000], [0.9, 0.8, 0.6, 0.5], rich=0.9, lazy=0.5)
    assert star == pytest.approx(math.sqrt(1000))
    assert sweep.crossover_alpha([1, 10], [0.9, 0.7], 0.9, 0.5) == 10  # exactly on the midpoint
    assert math.isnan(sweep.crossover_alpha([1, 10], [0.9, 0.85], 0.9, 0.5))  # never crossed in the grid
    assert math.isnan(sweep.crossover_alpha([1, 10], [0.9, 0.5], 0.7, 0.7))  # no gap between the plateaus
    # A lazy plateau above the rich one (possible on other data) is crossed the other way.
    assert sweep.crossover_alpha([1, 100], [0.5, 0.9], rich=0.5, lazy=0.9) == pytest.approx(10)


def test_power_law_fit_recovers_a_slope_and_its_error() -> None:
    widths = [16, 32, 64, 128]
    slope, se, scale = sweep.fit_power_law(widths, [3.0 * h ** -0.5 for h in widths])
    assert slope == pytest.approx(-0.5) and se == pytest.approx(0.0, abs=1e-12) and scale == pytest.approx(3.0)
    noisy = [3.0 * h ** -0.5 * f for h, f in zip(widths, [1.1, 0.9, 1.1, 0.9])]
    slope, se, _ = sweep.fit_power_law(widths, noisy)
    assert -0.6 < slope < -0.4 and 0 < se < 0.2
    assert math.isnan(sweep.fit_power_law([1, 2], [1.0, 2.0])[1])  # two points: no error estimate
    with pytest.raises(ValueError, match="at least two distinct widths"):
        sweep.fit_power_law([16, 32], [1.0, math.nan])


def test_write_crossover_per_width(tmp_path: Path) -> None:
    runs = []
    for h, star in ((16, 100.0), (64, 50.0), (256, 25.0)):
        runs.append(SweepRun("c", f"M x{h}", "standard", 1.0, 0.1, "ok", test_acc=0.9, width=h))
        runs.append(SweepRun("c", f"M x{h}", "linearized", 1.0, 0.1, "ok", test_acc=0.5, width=h))
        for alpha in (star / 10, star * 10):  # 0.8 and 0.6 around the midpoint 0.7: alpha* = star
            runs.append(SweepRun("c", f"M x{h}", "lazy", alpha, 0.1, "ok", width=h,
                                 test_acc=0.8 if alpha < star else 0.6))
    results = sweep.write_crossover(runs, tmp_path)
    assert results["c"]["alpha_star"] == pytest.approx([100.0, 50.0, 25.0])
    assert results["c"]["slope"] == pytest.approx(-0.5)
    text = (tmp_path / "crossover.md").read_text()
    assert "| c | 64 | 90.0 | 50.0 | 50 |" in text and "s = -0.500" in text
    assert (tmp_path / "crossover.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_widths_option_sets_the_backbone_width(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    rc = main(["sweep", "--config", "mnist1d_mlp_standard", "--modes", "standard", "linearized", "lazy",
               "--alphas", "100", "--widths", "2", "4", "--output", str(out), "--probe_size", "8",
               "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.callbacks=[]",
               "--model.backbone.init_args.hidden=1", f"--data.data_dir={tmp_path / 'd'}",
               f"--data.num_samples={SMALL}", "--data.val_size=20", "--data.batch_size=40",
               f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}", "--trainer.enable_progress_bar=false",
               "--trainer.enable_model_summary=false"])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert {(r["width"], r["model"]) for r in rows} == {("2", "MLP1D x2"), ("4", "MLP1D x4")}
    assert len(rows) == 6 and (out / "crossover.md").is_file() and (out / "crossover.png").is_file()
    assert main(["sweep", "--config", "mnist1d_mlp_standard", "--widths", "0", "--output", str(out)]) == 2
    assert main(["sweep", "--config", "mnist1d_mlp_standard", "--widths", "2",
                 "--model.backbone.init_args.width=3", "--output", str(out)]) == 2
    assert main(["sweep", "--config", "mnist1d_mlp_standard", "--seed", "1", "1", "--output", str(out)]) == 2


# ----------------------------------------------------------------------------------------- kernel (t)


def test_training_time_sums_the_schedule() -> None:
    # Two epochs of three steps, lr 0.2 then 0.2 / 1.5, momentum 0.9.
    assert sweep.training_time(0.2, 0.5, 0.9, 3, 6) == pytest.approx((3 * 0.2 + 3 * 0.2 / 1.5) / 0.1)
    assert sweep.training_time(0.2, 0.5, 0.9, 3, 4) == pytest.approx((3 * 0.2 + 0.2 / 1.5) / 0.1)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        sweep.training_time(0.2, 0.5, 0.9, 0, 4)


def test_kernel_at_training_time_tracks_the_linearized_run(tmp_path: Path) -> None:
    """The kernel (t) row is the tangent model at the linearized run's time: it fits the training set about as
    much as that run does, and less than the kernel at infinite time."""
    out = tmp_path / "sweep"
    common = ["--output", str(out), "--probe_size", "8", f"--data.data_dir={tmp_path / 'd'}",
              f"--data.num_samples={SMALL}", "--data.val_size=20", "--data.batch_size=20",
              f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false", "--trainer.callbacks.probe_size=8",
              "--trainer.callbacks.kappa_probe_size=4", "--trainer.callbacks.ntk_probe_size=4",
              "--trainer.max_epochs=2", "--model.backbone.init_args.hidden=16", "--trainer.precision=64-true",
              "--model.lr=0.02", "--model.momentum=0.0"]
    assert main(["sweep", "--config", "mnist1d_mlp_standard", "--modes", "linearized", "kernel", *common]) == 0
    rows = {r["mode"]: r for r in csv.DictReader(open(out / "sweep.csv"))}
    kernel, linear = rows["kernel"], rows["linearized"]
    # 160 - 20 held out = 140 examples / batch 20 = 7 steps per epoch, 2 epochs, lr 0.02 / (1 + 0.05 epoch).
    assert float(kernel["kernel/time"]) == pytest.approx(7 * 0.02 * (1 + 1 / 1.05))
    assert float(kernel["train_acc"]) == 1.0 > float(kernel["kernel/t/train_acc"])
    # SGD on batches against gradient flow on the output-traced kernel, both after training: close, not equal.
    # (train_loss of a trained run is its last epoch's mean during training; test_loss is taken at the end.)
    t_loss, run_loss = float(kernel["kernel/t/test_loss"]), float(linear["test_loss"])
    print(f"kernel (t) test loss {t_loss}, linearized run {run_loss}, kernel (inf) {kernel['test_loss']}")
    assert abs(t_loss - run_loss) < 0.05 * run_loss
    assert abs(float(kernel["test_loss"]) - run_loss) > 0.05 * run_loss  # infinite time is another model
    table = (out / "table.md").read_text()
    assert "| kernel (t) | inf |" in table and "Training time t of the trained rows" in table


# ------------------------------------------------------------------------------- neural-tangents benchmark


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nt_python_comes_from_the_option_or_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = _load("_nt_env")
    import argparse

    monkeypatch.delenv(env.NT_PYTHON_ENV, raising=False)
    parser = argparse.ArgumentParser()
    env.add_nt_python_option(parser)
    assert parser.parse_args([]).nt_python is None
    assert "LIGHTNING_LAZY_NT_PYTHON" in env.nt_python_missing(None)
    monkeypatch.setenv(env.NT_PYTHON_ENV, sys.executable)
    parser = argparse.ArgumentParser()
    env.add_nt_python_option(parser)
    assert parser.parse_args([]).nt_python == sys.executable and env.nt_python_missing(sys.executable) is None
    assert parser.parse_args(["--nt-python", "/x"]).nt_python == "/x"
    assert "no neural-tangents interpreter at" in env.nt_python_missing(str(tmp_path / "missing"))
    for script in ("monitor_cost.py", "kernel_predictor_vs_nt.py", "weight_space_vs_nt.py"):
        assert "/work/" not in (ROOT / "benchmarks" / script).read_text()


def test_weight_space_torch_side_trains_network_and_twin_in_lock_step(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _load("weight_space_vs_nt")
    monkeypatch.delenv("LIGHTNING_LAZY_NT_PYTHON", raising=False)
    data = bench.make_inputs(1, 0, str(tmp_path / "d"))
    data["order"] = data["order"][:6]
    ours = bench.torch_run(data, data["order"])
    # Same w0: the network and its tangent model have the same loss on the first batch; then they part, slowly
    # (a 512-unit NTK-parametrized network stays close to its linearization over a few steps).
    assert len(ours["loss"]) == len(ours["loss_lin"]) == 6
    assert ours["loss"][0] == pytest.approx(ours["loss_lin"][0], rel=1e-6)
    assert any(a != b for a, b in zip(ours["loss"][1:], ours["loss_lin"][1:]))
    assert max(abs(a - b) / b for a, b in zip(ours["loss"], ours["loss_lin"])) < 1e-3
    results = bench.main(["--epochs", "1", "--data-dir", str(tmp_path / "d"), "--output", str(tmp_path / "r.json")])
    assert results["neural_tangents"].startswith("skipped") and len(results["per_epoch"]) == 1
