"""neural-tangents' lock-step example (``examples/weight_space.py``) beside lightning_lazy's tangent twin.

neural-tangents' example trains a one-hidden-layer network (``Dense(512, W_std=1, b_std=0.05)``, ``Erf``,
``Dense(10, 1, 0.05)``, NTK parametrization) and its linearization ``nt.linearize(f, params0)`` side by side:
the same initial weights, the same minibatches (batch 128), momentum 0.9 at learning rate 1.0, on the loss
``-mean(log_softmax(f(x)) * y_onehot)`` (mean over examples *and* classes), and prints both losses per epoch.

Here the same network, initial weights and batches are trained twice:

* by neural-tangents 0.6.5 in its own virtual environment (``--nt-python`` or ``$LIGHTNING_LAZY_NT_PYTHON``):
  ``f`` from ``stax.serial``, its linearization from ``nt.linearize``, ``jax.example_libraries.optimizers.momentum``,
  in float32, as in the example (w0 and the batch are passed to the jitted gradient as arguments, not captured:
  see ``PEERS.md``);
* by PyTorch: the same network as an ``nn.Module``, ``torch.optim.SGD(lr=1, momentum=0.9)`` (the same update:
  ``v ← 0.9 v + g``, ``w ← w − lr v``), and :class:`lightning_lazy.watch.twin.TangentTwin` following it in
  lock-step (the twin's tangent model ``f(w0) + Df(w0)(w − w0)``, by forward-mode AD).

Data: the example uses MNIST, downloaded by TensorFlow Datasets; this machine downloads nothing, so the inputs
are MNIST-1D's 4 000 training signals (40 features, generated locally by the ``mnist1d`` package), which changes
the input width (40, not 784) and nothing else. Each epoch is a fresh permutation (seeded) in 31 full batches.

Reported per epoch: the mean over the epoch's batches of each model's loss on its batch before the update (the
example prints the loss of one batch), from both libraries, and the largest relative difference between the two
libraries' numbers, which should be float32 round-off (≈ 1e-6 – 1e-5 after hundreds of steps).

    LIGHTNING_LAZY_NT_PYTHON=/path/to/nt-venv/bin/python \\
        python benchmarks/weight_space_vs_nt.py --output benchmarks/results/weight_space_vs_nt.json
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

HIDDEN, CLASSES, W_STD, B_STD = 512, 10, 1.0, 0.05
LEARNING_RATE, MOMENTUM, BATCH = 1.0, 0.9, 128


# ------------------------------------------------------------------------------------ neural-tangents side


def nt_worker(folder: str) -> None:
    """Runs in the neural-tangents environment: train f and nt.linearize(f, w0) on the given batches."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import neural_tangents as nt
    from jax import grad, jit
    from jax.example_libraries import optimizers
    from jax.nn import log_softmax
    from neural_tangents import stax

    data = np.load(Path(folder) / "inputs.npz")
    _, f, _ = stax.serial(stax.Dense(HIDDEN, W_STD, B_STD), stax.Erf(), stax.Dense(CLASSES, W_STD, B_STD))
    params0 = [(jnp.asarray(data["w1"]), jnp.asarray(data["b1"])), (),
               (jnp.asarray(data["w2"]), jnp.asarray(data["b2"]))]
    x_all, y_all, order = jnp.asarray(data["x"]), jnp.asarray(data["y"]), data["order"]

    def loss(fx, y_hat):
        return -jnp.mean(log_softmax(fx) * y_hat)

    def loss_net(params, x, y):
        return loss(f(params, x), y)

    def loss_lin(params, p0, x, y):
        return loss(nt.linearize(f, p0)(params, x), y)

    grad_net, value_net = jit(grad(loss_net)), jit(loss_net)
    grad_lin, value_lin = jit(grad(loss_lin)), jit(loss_lin)
    opt_init, opt_apply, get_params = optimizers.momentum(LEARNING_RATE, MOMENTUM)
    opt_apply = jit(opt_apply)
    state, state_lin = opt_init(params0), opt_init(params0)
    losses, losses_lin = [], []
    for i, index in enumerate(order):
        x, y = x_all[index], y_all[index]
        params, params_lin = get_params(state), get_params(state_lin)
        losses.append(float(value_net(params, x, y)))
        losses_lin.append(float(value_lin(params_lin, params0, x, y)))
        state = opt_apply(i, grad_net(params, x, y), state)
        state_lin = opt_apply(i, grad_lin(params_lin, params0, x, y), state_lin)
    np.savez(Path(folder) / "nt.npz", loss=np.array(losses), loss_lin=np.array(losses_lin))
    versions = {"neural_tangents": nt.__version__ if hasattr(nt, "__version__") else "", "jax": jax.__version__}
    (Path(folder) / "versions.json").write_text(json.dumps(versions))


# ------------------------------------------------------------------------------------ PyTorch side


def torch_run(data: dict, order) -> dict:
    """The same training by PyTorch SGD, with lightning_lazy's TangentTwin in lock-step: per-step losses."""
    import torch
    from torch import nn

    from lightning_lazy.watch.twin import TangentTwin

    class ErfMLP(nn.Module):
        """``Dense(512) → erf → Dense(10)`` in the NTK parametrization: ``W_std/√fan_in · x W + b_std · b``."""

        def __init__(self) -> None:
            super().__init__()
            self.w1 = nn.Parameter(torch.from_numpy(data["w1"]).clone())
            self.b1 = nn.Parameter(torch.from_numpy(data["b1"]).clone())
            self.w2 = nn.Parameter(torch.from_numpy(data["w2"]).clone())
            self.b2 = nn.Parameter(torch.from_numpy(data["b2"]).clone())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.erf(W_STD / self.w1.shape[0] ** 0.5 * x @ self.w1 + B_STD * self.b1)
            return W_STD / self.w2.shape[0] ** 0.5 * h @ self.w2 + B_STD * self.b2

    def loss(output: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
        return -(torch.log_softmax(output, dim=1) * y_hat).mean()

    net = ErfMLP()
    optimizer = torch.optim.SGD(net.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    twin = TangentTwin(net, optimizer, loss)
    twin.follow()  # the twin steps from a hook on optimizer.step()
    x_all, y_all = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    losses, losses_lin = [], []
    try:
        for index in order:
            x, y = x_all[torch.from_numpy(index)], y_all[torch.from_numpy(index)]
            twin.arm()
            real = loss(net(x), y)
            real.backward()
            twin.gradients_produced()
            losses_lin.append(float(twin.accumulate(x, y)))  # the twin's loss before its step, as the real one
            losses.append(float(real.detach()))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            twin.zero_grad()
    finally:
        twin.release()
    if twin.lost is not None:
        raise RuntimeError(f"the twin stopped following: {twin.lost}")
    return {"loss": losses, "loss_lin": losses_lin}


# ------------------------------------------------------------------------------------ driver


def make_inputs(epochs: int, seed: int, data_dir: str | None) -> dict:
    """MNIST-1D inputs, one-hot targets, NTK-parametrization weights ~ N(0, 1) and the batch order (float32)."""
    import numpy as np

    from lightning_lazy.data.mnist1d import MNIST1DDataModule, make_mnist1d

    if data_dir is not None:
        dm = MNIST1DDataModule(data_dir=data_dir)
        x = dm.split("train")[0].numpy()
        y = dm.split("train")[1].numpy()
    else:
        generated = make_mnist1d()
        x, y = generated["x"], generated["y"]
    rng = np.random.default_rng(seed)
    per_epoch = x.shape[0] // BATCH
    order = np.stack([rng.permutation(x.shape[0])[: per_epoch * BATCH].reshape(per_epoch, BATCH)
                      for _ in range(epochs)]).reshape(epochs * per_epoch, BATCH)
    weights = {"w1": rng.standard_normal((x.shape[1], HIDDEN)), "b1": rng.standard_normal((1, HIDDEN)),
               "w2": rng.standard_normal((HIDDEN, CLASSES)), "b2": rng.standard_normal((1, CLASSES))}
    return {"x": x.astype(np.float32), "y": np.eye(CLASSES, dtype=np.float32)[y], "order": order,
            "per_epoch": np.int64(per_epoch), **{k: v.astype(np.float32) for k, v in weights.items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_nt_python_option(parser)
    parser.add_argument("--epochs", type=int, default=10, help="epochs (10, as in the example)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and of the batch order")
    parser.add_argument("--data-dir", default=None,
                        help="MNIST-1D cache folder of MNIST1DDataModule (default: generate in memory)")
    parser.add_argument("--output", help="write the results as JSON here")
    parser.add_argument("--nt-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.nt_worker:
        nt_worker(args.nt_worker)
        return {}
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    import numpy as np
    import torch

    torch.set_num_threads(1)
    data = make_inputs(args.epochs, args.seed, args.data_dir)
    per_epoch = int(data["per_epoch"])
    results: dict = {"benchmark": "weight_space_vs_nt", "epochs": args.epochs, "batch": BATCH,
                     "steps_per_epoch": per_epoch, "learning_rate": LEARNING_RATE, "momentum": MOMENTUM,
                     "hidden": HIDDEN, "inputs": "MNIST-1D train (4 000 x 40)", "dtype": "float32",
                     "torch": torch.__version__}
    started = time.perf_counter()
    ours = torch_run(data, data["order"])
    results["torch_seconds"] = time.perf_counter() - started
    missing = nt_python_missing(args.nt_python)
    theirs = None
    if missing:
        results["neural_tangents"] = missing
        print(missing)
    else:
        with tempfile.TemporaryDirectory() as folder:
            np.savez(Path(folder) / "inputs.npz", **data)
            env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
                   "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"}
            started = time.perf_counter()
            subprocess.run([args.nt_python, str(Path(__file__).resolve()), "--nt-worker", folder], check=True, env=env)
            results["nt_seconds"] = time.perf_counter() - started
            theirs = dict(np.load(Path(folder) / "nt.npz"))
            version = subprocess.run([args.nt_python, "-c", "import importlib.metadata as m; "
                                      "print(m.version('neural-tangents'), m.version('jax'))"],
                                     capture_output=True, text=True, check=True).stdout.split()
            results["neural_tangents"], results["jax"] = version
    rows = []
    print("epoch | loss (torch) | loss (nt) | linearized loss (lightning_lazy twin) | linearized loss (nt.linearize)")
    for epoch in range(args.epochs):
        part = slice(epoch * per_epoch, (epoch + 1) * per_epoch)
        row = {"epoch": epoch, "loss_torch": float(np.mean(ours["loss"][part])),
               "loss_lin_twin": float(np.mean(ours["loss_lin"][part]))}
        if theirs is not None:
            row["loss_nt"] = float(np.mean(theirs["loss"][part]))
            row["loss_lin_nt"] = float(np.mean(theirs["loss_lin"][part]))
        rows.append(row)
        print(f"{epoch} | {row['loss_torch']:.7f} | {row.get('loss_nt', float('nan')):.7f} | "
              f"{row['loss_lin_twin']:.7f} | {row.get('loss_lin_nt', float('nan')):.7f}")
    results["per_epoch"] = rows
    if theirs is not None:
        def worst(a, b) -> float:
            a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
            return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))
        results["max_rel_diff_network_per_step"] = worst(ours["loss"], theirs["loss"])
        results["max_rel_diff_linearized_per_step"] = worst(ours["loss_lin"], theirs["loss_lin"])
        results["max_rel_diff_network_per_epoch"] = worst([r["loss_torch"] for r in rows], [r["loss_nt"] for r in rows])
        results["max_rel_diff_linearized_per_epoch"] = worst([r["loss_lin_twin"] for r in rows],
                                                             [r["loss_lin_nt"] for r in rows])
        print(f"largest relative difference, torch vs neural-tangents, over {len(ours['loss'])} steps: network "
              f"{results['max_rel_diff_network_per_step']:.2e}, linearization "
              f"{results['max_rel_diff_linearized_per_step']:.2e} (per-epoch means: "
              f"{results['max_rel_diff_network_per_epoch']:.2e}, {results['max_rel_diff_linearized_per_epoch']:.2e})")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
