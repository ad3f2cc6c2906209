"""``diagnostics.gradient_descent_mse`` against neural-tangents' ``predict.gradient_descent_mse``.

Both are given the same kernels and targets: the empirical NTK (float64) of a small torch MLP on 64 training
and 32 test inputs with 3 outputs, as the output-traced ``[N, N]`` kernel (neural-tangents' default
``trace_axes=(-1,)``) and as the full kernel (``[N·K, N·K]`` example-major here, ``[N, N, K, K]`` with
``trace_axes=()`` there), random targets, the network's outputs at w0 as ``fx_train_0`` / ``fx_test_0``; at
times t = 1, 10, 100 (learning rate 0.5) and t = ∞, with ``diag_reg`` 0 and 1e-3. Reports the largest absolute
difference of the train and test predictions, relative to the largest prediction.

    python benchmarks/kernel_predictor_vs_nt.py --output benchmarks/results/kernel_predictor_vs_nt.json

neural-tangents runs in its own virtual environment (``--nt-python``, default ``$LIGHTNING_LAZY_NT_PYTHON``;
the pins are in the benchmarks README), in a worker process of this same file (``--nt-worker``), which then imports
only numpy, JAX and neural-tangents, in float64 (``jax_enable_x64``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or imported by a test
from _nt_env import add_nt_python_option, nt_python_missing  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIMES = [1.0, 10.0, 100.0, None]
REGS = [0.0, 1e-3]
LEARNING_RATE = 0.5


def nt_worker(folder: str) -> None:
    """Worker: read ``folder/inputs.npz``, write neural-tangents' predictions to ``folder/nt.npz``."""
    import jax
    import numpy as np

    jax.config.update("jax_enable_x64", True)
    import neural_tangents as nt

    data = dict(np.load(Path(folder) / "inputs.npz"))
    out = {}
    for form in ("traced", "full"):
        k_tt, k_vt = data[f"{form}_k_tt"], data[f"{form}_k_vt"]
        axes = (-1,) if form == "traced" else ()
        for r, reg in enumerate(REGS):
            predict = nt.predict.gradient_descent_mse(k_tt, data["y"], learning_rate=LEARNING_RATE, diag_reg=reg,
                                                      trace_axes=axes)
            for i, t in enumerate(TIMES):
                train, test = predict(t, data["fx_train_0"], data["fx_test_0"], k_vt)
                out[f"{form}_{r}_{i}_train"], out[f"{form}_{r}_{i}_test"] = np.asarray(train), np.asarray(test)
    np.savez(Path(folder) / "nt.npz", **out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_nt_python_option(parser)
    parser.add_argument("--output", help="write the results as JSON here")
    parser.add_argument("--nt-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.nt_worker:
        nt_worker(args.nt_worker)
        return {}
    import numpy as np
    import torch
    from torch import nn

    from lightning_lazy import diagnostics as D

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)).double()
    x_train, x_test = torch.randn(64, 5, dtype=torch.float64), torch.randn(32, 5, dtype=torch.float64)
    y = torch.randn(64, 3, dtype=torch.float64)
    with torch.no_grad():
        fx_train_0, fx_test_0 = net(x_train), net(x_test)
    kernels = {
        "traced": (D.empirical_ntk(net, x_train, trace=True), D.empirical_ntk(net, x_test, x_train, trace=True)),
        "full": (D.empirical_ntk(net, x_train), D.empirical_ntk(net, x_test, x_train)),
    }
    inputs = {"y": y.numpy(), "fx_train_0": fx_train_0.numpy(), "fx_test_0": fx_test_0.numpy()}
    for form, (k_tt, k_vt) in kernels.items():
        if form == "full":  # NT's layout for trace_axes=(): [N1, N2, K, K]
            inputs[f"{form}_k_tt"] = k_tt.reshape(64, 3, 64, 3).permute(0, 2, 1, 3).numpy()
            inputs[f"{form}_k_vt"] = k_vt.reshape(32, 3, 64, 3).permute(0, 2, 1, 3).numpy()
        else:
            inputs[f"{form}_k_tt"], inputs[f"{form}_k_vt"] = k_tt.numpy(), k_vt.numpy()
    results: dict = {"benchmark": "kernel_predictor_vs_nt", "learning_rate": LEARNING_RATE, "times": TIMES,
                     "diag_regs": REGS, "cases": []}
    if missing := nt_python_missing(args.nt_python):
        results["skipped"] = missing
        print(results["skipped"])
    else:
        with tempfile.TemporaryDirectory() as folder:
            np.savez(Path(folder) / "inputs.npz", **inputs)
            env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
            started = time.perf_counter()
            subprocess.run([args.nt_python, str(Path(__file__).resolve()), "--nt-worker", folder], check=True, env=env)
            results["nt_seconds"] = time.perf_counter() - started
            theirs = dict(np.load(Path(folder) / "nt.npz"))
            version = subprocess.run([args.nt_python, "-c", "import importlib.metadata as m; print(m.version('neural-tangents'), m.version('jax'))"],
                                     capture_output=True, text=True, check=True).stdout.split()
            results["neural_tangents"], results["jax"] = version
        worst = 0.0
        for form, (k_tt, k_vt) in kernels.items():
            for r, reg in enumerate(REGS):
                predict = D.gradient_descent_mse(k_tt, y, learning_rate=LEARNING_RATE, diag_reg=reg)
                for i, t in enumerate(TIMES):
                    train, test = predict(t, fx_train_0, fx_test_0, k_vt)
                    case = {"kernel": form, "diag_reg": reg, "t": t}
                    for name, ours in (("train", train), ("test", test)):
                        other = theirs[f"{form}_{r}_{i}_{name}"]
                        difference = float(np.abs(ours.numpy() - other).max())
                        scale = float(np.abs(other).max())
                        case[f"{name}_max_abs_difference"] = difference
                        case[f"{name}_relative"] = difference / scale
                        worst = max(worst, difference / scale)
                    results["cases"].append(case)
                    print(f"{form:>6} kernel, diag_reg {reg:g}, t = {t}: max |ours - NT| train "
                          f"{case['train_max_abs_difference']:.2e}, test {case['test_max_abs_difference']:.2e}")
        results["max_relative_difference"] = worst
        print(f"largest difference relative to the largest prediction: {worst:.2e} "
              f"(neural-tangents {results['neural_tangents']}, jax {results['jax']}, float64)")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
