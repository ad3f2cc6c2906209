"""The README's main command at toy size, and the drop-in example."""

import importlib.util
import math
from pathlib import Path

from lightning_lazy.cli import main as cli_main
from lightning_lazy.demo import format_table

ROOT = Path(__file__).resolve().parents[1]


def test_demo_quick_prints_its_table_and_writes_tensorboard_logs(tmp_path, capsys):
    assert cli_main(["demo", "--quick", "--no-progress", "--alphas", "1", "100", "--log-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    header = out.index("alpha | divergence")
    rows = [line for line in out[header:].splitlines()[2:4]]
    assert [float(r.split("|")[0]) for r in rows] == [1.0, 100.0]
    values = [[float(c.strip().rstrip("s")) for c in r.split("|")] for r in rows]
    assert all(math.isfinite(v) for row in values for v in row)
    assert values[1][1] < values[0][1], "divergence falls as alpha grows"
    for alpha in ("1", "100"):
        assert list((tmp_path / "demo" / f"alpha_{alpha}").glob("events.out.tfevents.*"))


def test_format_table():
    table = format_table([{"alpha": 10.0, "divergence": 0.01, "kappa": 0.002, "displacement": 0.003,
                           "test_loss": 0.1, "tangent_test_loss": 0.2, "seconds": 1.5}])
    assert "10 |" in table and "0.1 |" in table and "1.5s" in table


def test_add_to_existing_trainer_example(tmp_path):
    spec = importlib.util.spec_from_file_location("add_example", ROOT / "examples" / "add_to_existing_trainer.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    metrics = example.main(["--epochs", "1", "--log-dir", str(tmp_path)])
    for tag in ("lazy/divergence", "lazy/kappa", "lazy/tangent/val_acc", "lazy/ntk_distance"):
        assert math.isfinite(metrics[tag]), tag
    assert 0.0 <= metrics["lazy/tangent/val_acc"] <= 1.0
