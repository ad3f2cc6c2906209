"""Quick variants of the paper-reproduction examples (examples/*.py --quick), checked on what they measure.

Each example is imported from its file and its ``main`` run in-process with ``--quick`` and temporary
output / TensorBoard directories; the tests then read back the numbers, the CSV, the PNG and the
TensorBoard event files.
"""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytest.importorskip("matplotlib")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


pytestmark = pytest.mark.usefixtures("restore_global_state")  # the examples seed and set threads globally


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_quick(name: str, tmp_path: Path, *extra: str):
    module = load_example(name)
    out, logs = tmp_path / "out", tmp_path / "runs"
    result = module.main(["--quick", "--out-dir", str(out), "--log-dir", str(logs), *extra])
    return module, result, out, logs


def assert_png(path: Path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def tensorboard_images(log_dir: Path) -> set[str]:
    """Image tags (figures are logged as images) across every event file under ``log_dir``."""
    tags: set[str] = set()
    for event_file in log_dir.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(event_file), size_guidance={"images": 0})
        accumulator.Reload()
        tags.update(accumulator.Tags()["images"])
    return tags


def tensorboard_scalars(log_dir: Path) -> set[str]:
    tags: set[str] = set()
    for event_file in log_dir.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
        accumulator.Reload()
        tags.update(accumulator.Tags()["scalars"])
    return tags


def test_kappa_scaling_slopes_match_the_predictions(tmp_path):
    module, slopes, out, logs = run_quick("kappa_scaling", tmp_path)
    # κ ∝ 1/α and κ ∝ λ^{-q} are exact at w0 up to the accuracy of the Lanczos / power iterations.
    assert slopes["alpha"] == pytest.approx(-1.0, abs=0.02)
    assert slopes["lambda_q2"] == pytest.approx(-2.0, abs=0.05)
    assert slopes["lambda_q3"] == pytest.approx(-3.0, abs=0.05)
    # κ ≲ m^{-1/2} is statistical: 2 seeds, widths 64…512.
    assert slopes["width_1/sqrt(m)"] == pytest.approx(-0.5, abs=0.15)
    assert_png(out / "kappa_scaling.png")
    rows = read_csv(out / "kappa_scaling.csv")
    assert {r["case"] for r in rows} == set(slopes)
    assert all(float(r["kappa"]) > 0 and math.isfinite(float(r["kappa"])) for r in rows)
    fitted = {r["case"]: float(r["fitted_slope"]) for r in read_csv(out / "kappa_slopes.csv")}
    assert fitted == pytest.approx(slopes, abs=1e-3)
    assert "kappa_scaling/figure" in tensorboard_images(logs)


def test_two_layer_trajectories_small_tau_moves_large_tau_stays(tmp_path):
    module, results, out, logs = run_quick("two_layer_trajectories", tmp_path)
    small, large = results
    assert (small["tau"], large["tau"]) == (0.1, 2.0)
    for res in results:
        assert res["train_loss"] < 1e-2 * res["initial_train_loss"]  # both fit the training points
        assert res["paths"].shape[1:] == (20, 2) and res["paths"].shape[0] >= 3
    # Feature learning vs lazy: relative weight motion and κ(w0) differ by orders of magnitude.
    assert small["displacement"] > 1.0 > 0.2 > large["displacement"]
    assert small["kappa0"] > 1.0 > 0.1 > large["kappa0"]
    assert large["divergence"] < small["divergence"]
    assert_png(out / "two_layer_trajectories.png")
    assert [float(r["tau"]) for r in read_csv(out / "two_layer_trajectories.csv")] == [0.1, 2.0]
    assert "two_layer_trajectories" in tensorboard_images(logs)
    assert "lazy/divergence" in tensorboard_scalars(logs)  # the monitor logged through Lightning
    # The panels name the regime the monitor measured: small τ learns features, large τ is lazy.
    from lightning_lazy.watch.report import FEATURE_LEARNING, LAZY

    assert (small["regime"], large["regime"]) == (FEATURE_LEARNING, LAZY)
    assert module.panel_title(small).startswith("τ = 0.1 (feature learning)")
    assert module.panel_title(large).startswith("τ = 2 (lazy)")
    fig = module.plot(results, torch.tensor([[1.0, 0.0], [0.0, 1.0], [-0.6, -0.8]]), torch.tensor([1.0, -1.0, 1.0]))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert [ax.get_title() for ax in fig.axes] == [module.panel_title(r) for r in results]
    for ax in fig.axes:  # every drawn tick label inside the figure: none cut off at its edges
        for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            for tick in axis.get_major_ticks():
                if lo <= tick.get_loc() <= hi and tick.label1.get_text():  # ticks beyond the limits are not drawn
                    box = tick.label1.get_window_extent(renderer)
                    assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1, tick.label1.get_text()
                    assert fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1, tick.label1.get_text()
    module.plt.close(fig)


def test_teacher_student_tau_lazy_regime_generalises_worse(tmp_path):
    module, rows, out, logs = run_quick("teacher_student_tau", tmp_path)
    assert len(rows) == 4  # 2 set-ups × 2 τ × 1 seed
    for setup in module.SETUPS:
        small, large = sorted((r for r in rows if r["setup"] == setup), key=lambda r: r["tau"])
        # Lazy (large τ): the network stays on its tangent path and its test loss is the tangent model's,
        # several times that of the feature-learning run (small τ).
        assert large["divergence"] < 0.05 < 0.3 < small["divergence"]
        assert large["kappa_init"] < 0.01 < 1.0 < small["kappa_init"]
        assert large["test_loss"] > 3 * small["test_loss"]
        assert large["val_loss"] == pytest.approx(large["tangent_val_loss"], rel=0.1)
        assert small["tangent_val_loss"] > 3 * small["val_loss"]
    assert rows[0]["steps"] == 300 and rows[-1]["steps"] == 300
    header = read_csv(out / "teacher_student_tau.csv")
    assert len(header) == 4 and list(header[0]) == module.CSV_FIELDS
    assert_png(out / "teacher_student_tau.png")
    assert "teacher_student_tau" in tensorboard_images(logs)
    # --from-csv redraws the figure from the CSV without training.
    redrawn = module.main(["--from-csv", str(out / "teacher_student_tau.csv"), "--out-dir", str(tmp_path / "again"),
                           "--log-dir", str(tmp_path / "again_runs")])
    assert [r["test_loss"] for r in redrawn] == pytest.approx([r["test_loss"] for r in rows], rel=1e-6)
    assert_png(tmp_path / "again" / "teacher_student_tau.png")


def test_digits_alpha_sweep_large_alpha_stays_on_its_tangent_model(tmp_path):
    module, rows, out, logs = run_quick("digits_alpha_sweep", tmp_path)
    small, large = sorted(rows, key=lambda r: r["alpha"])
    assert (small["alpha"], large["alpha"]) == (0.1, 100.0)
    # Large α: close to the tangent model (small Δ), ReLU pattern frozen, same accuracy as the twin.
    assert large["divergence"] < 0.05
    assert large["activation_stability"] > 0.99
    assert large["test_acc"] == pytest.approx(large["tangent_test_acc"], abs=0.02)
    # Small α: the network leaves its linearization.
    assert small["divergence"] > 0.2
    assert small["activation_stability"] < 0.95
    assert small["displacement"] > 100 * large["displacement"]
    for r in rows:
        assert r["test_acc"] > 0.85  # both learn the digits (chance is 0.1)
    assert len(read_csv(out / "digits_alpha_sweep.csv")) == 2
    assert_png(out / "digits_alpha_sweep.png")
    assert "digits_alpha_sweep" in tensorboard_images(logs)


@pytest.mark.parametrize(
    ("name", "argv", "message"),
    [
        ("two_layer_trajectories", ["--m", "5"], "must be a positive even number"),
        ("teacher_student_tau", ["--taus", "0.1", "-1"], "must be positive"),
        ("digits_alpha_sweep", ["--n-test", "1790"], "must leave at least one batch"),
        ("kappa_scaling", ["--max-width", "32"], "at least 64"),
    ],
)
def test_examples_reject_bad_arguments(name, argv, message, capsys):
    module = load_example(name)
    with pytest.raises(SystemExit):
        module.parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name, folder_option", [("plain_pytorch_loop", "--log-dir"), ("fabric_loop", "--log-dir"),
                                                 ("huggingface_trainer", "--output-dir")])
def test_each_way_of_training_has_an_example_that_runs(name, folder_option, tmp_path):
    # One example per adapter: LazinessWatch in a plain loop and under Fabric, LazyTrainingCallback in a Trainer.
    module = load_example(name)
    result = module.main(["--quick", folder_option, str(tmp_path)])
    values = next(iter(result.values())) if name == "plain_pytorch_loop" else result
    assert values["divergence"] > 0 and math.isfinite(values["divergence"])
    for file in ("laziness.png", "layers.png", "lazy_summary.txt"):
        assert list(tmp_path.rglob(file)), file
    assert "lazy/figure" in tensorboard_images(tmp_path)
