"""What the monitor's measures cost, each separately, in plain training steps of the same model; and the
empirical NTK against nngeometry and neural-tangents.

Models at CIFAR shape (3×32×32, 10 classes): an MLP 3072-1024-1024-10, this package's VGG-11 ×1
(``lightning_lazy.models.vgg.VGG11``) and torchvision's ``resnet18(num_classes=10)``. The unit is one plain
training step (forward, ½ squared error, backward, SGD step) at batch 128, timed in the same run. The
measures are the monitor's own: a ``LazinessProbe`` with its defaults (probe 256, κ and NTK on its first 16,
the careful ‖D²h‖ search at fit start, the warm-started one at an epoch's end) and a ``TangentTwin``, timed
by the probe itself (``LazinessProbe.timings``), as ``lightning_lazy/callback.py`` runs them.

    python benchmarks/monitor_cost.py --output benchmarks/results/monitor_cost-cpu.json
    python benchmarks/monitor_cost.py --quick                      # seconds: tiny models, for the smoke test
    python benchmarks/monitor_cost.py --ntk-only --models mlp,vgg11_8 --products
    OMP_NUM_THREADS=1 python benchmarks/monitor_cost.py --ntk-models '' --repeats 3   # + per-layer cost ratio

The per-layer cost (``per_layer`` in the JSON, on unless ``--no-per-layer``): the probe's measures at fit start
and at an epoch's end with and without the per-layer measures, measured alternately in the same run.

neural-tangents runs, when ``--nt-python`` (default ``$LIGHTNING_LAZY_NT_PYTHON``) exists, in its own process
(its own virtual environment with JAX; see ``benchmarks/README.md``), on the same weights and inputs. This file is also that worker (``--nt-worker``):
it then imports only JAX and neural-tangents.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or imported by a test
from _nt_env import add_nt_python_option, nt_python_missing  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------- JAX


def nt_worker(folder: str, spec_limit_gib: float) -> None:
    """Worker process: read weights and inputs from ``folder/spec.npz``, write kernels and times."""
    import numpy as np
    import jax
    import jax.numpy as jnp
    import neural_tangents as nt
    from jax import lax

    jax.config.update("jax_enable_x64", True)
    spec = dict(np.load(Path(folder) / "spec.npz"))
    kind = str(spec.pop("kind"))
    x = jnp.asarray(spec.pop("x"))
    params = {k: jnp.asarray(v) for k, v in spec.items()}

    def mlp(p, inputs):  # dense weights stored [in, out] (PEERS.md: the layout NT's structured rules like)
        h = inputs.reshape(inputs.shape[0], -1)
        n = len(p) // 2
        for i in range(n):
            h = h @ p[f"w{i}"] + p[f"b{i}"]
            if i < n - 1:
                h = jax.nn.relu(h)
        return h

    def vgg(p, inputs):  # NHWC / HWIO; "M" = 2×2 max-pool after the convolutions listed in pool_after
        h = inputs
        n = len([k for k in p if k.startswith("c")]) // 2
        for i in range(n):
            h = lax.conv_general_dilated(h, p[f"c{i}"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
            h = jax.nn.relu(h + p[f"cb{i}"])
            if i in (0, 1, 3, 5, 7):
                h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        return h.reshape(h.shape[0], -1) @ p["w"] + p["b"]

    fn = mlp if kind == "mlp" else vgg
    results = {}
    jacobian_bytes = x.shape[0] * 10 * sum(v.size for v in params.values()) * x.dtype.itemsize
    for name, impl in (("jacobian_contraction", 1), ("ntk_vector_products", 2), ("structured_derivatives", 3)):
        if impl == 1 and jacobian_bytes > float(spec_limit_gib) * 2**30:
            results[name] = {"error": f"skipped: its Jacobian alone is {jacobian_bytes / 2**30:.1f} GiB "
                                      f"(over --nt-jacobian-limit-gib {spec_limit_gib})"}
            continue
        try:
            kernel_fn = jax.jit(nt.empirical_ntk_fn(fn, trace_axes=(), vmap_axes=0, implementation=impl))
            kernel_fn(x, None, params).block_until_ready()  # compile
            times, cpu = [], []
            for _ in range(3):
                t0, c0 = time.perf_counter(), time.process_time()
                kernel = kernel_fn(x, None, params).block_until_ready()
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            n, k = kernel.shape[0], kernel.shape[2]
            np.save(Path(folder) / f"{name}.npy", np.asarray(kernel).transpose(0, 2, 1, 3).reshape(n * k, n * k))
            results[name] = {"seconds": statistics.median(times), "cpu_seconds": statistics.median(cpu)}
        except Exception as error:  # noqa: BLE001 - reported, not fatal
            results[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    (Path(folder) / "times.json").write_text(json.dumps(results))


# --------------------------------------------------------------------------------------------------- torch


def _median_time(fn, repeats: int) -> tuple[float, object]:
    result = None
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def build_model(name: str, quick: bool):
    import torch
    from torch import nn

    from lightning_lazy.models.vgg import VGG11

    torch.manual_seed(0)
    if name == "mlp":
        width = 64 if quick else 1024
        return nn.Sequential(nn.Flatten(), nn.Linear(3072, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                             nn.Linear(width, 10))
    if name == "vgg11":
        return VGG11(base_width=4 if quick else 64)
    if name == "vgg11_8":
        return VGG11(base_width=2 if quick else 8)
    if name == "resnet18":
        from torchvision.models import resnet18

        if quick:  # the same blocks, one per stage
            from torchvision.models.resnet import BasicBlock, ResNet

            return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)
        model = resnet18(num_classes=10)
        return model
    if name == "vit_tiny":  # timm's ViT-tiny at CIFAR shape: image 32, patches of 4 (65 tokens), random init
        import timm

        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4,
                                 num_classes=10, **({"depth": 2} if quick else {}))
    raise ValueError(f"unknown model {name!r}")


def plain_step_seconds(model, x, y, repeats: int) -> float:
    import torch

    from lightning_lazy.scaling import half_squared_error

    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights stay w0 for the measures
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = half_squared_error(model(x), y)
        loss.backward()
        optimizer.step()
        if x.is_cuda:
            torch.cuda.synchronize()

    step()
    seconds, _ = _median_time(step, repeats)
    cpu = time.process_time()
    for _ in range(repeats):
        step()
    plain_step_seconds.cpu = (time.process_time() - cpu) / repeats  # the same step's CPU time (one thread)
    optimizer.zero_grad(set_to_none=True)
    return seconds


def monitor_measures(model, args, device) -> dict:
    """Each measure of the monitor at fit start and at one epoch's end, in seconds: the monitor's own
    ``LazinessProbe`` (its defaults: κ probe, NTK probe, Hessian searches) with a ``TangentTwin``, as
    ``lightning_lazy/callback.py`` runs them, timed by the probe itself (``LazinessProbe.timings``)."""
    import torch

    from lightning_lazy.watch.probe import LazinessProbe
    from lightning_lazy.scaling import half_squared_error
    from lightning_lazy.watch.twin import TangentTwin

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(args.probe_size, 3, 32, 32, generator=generator).to(device)
    y = torch.randint(0, 10, (args.probe_size,), generator=generator).to(device)
    model.train()  # as during training: the probe sees train-mode BatchNorm on the probe's statistics
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    w0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    twin = TangentTwin(model, torch.optim.SGD(model.parameters(), lr=0.0), half_squared_error)
    cpu = time.process_time()
    probe = LazinessProbe(model, x, y, kappa_probe_size=args.kappa_probe_size, ntk_probe_size=args.ntk_probe_size)
    probe.measure_initial(names)
    cpu_seconds = {"fit_start": time.process_time() - cpu}
    fit_start = {k: v for k, v in probe.timings["initial"].items() if k != "total"}
    # w: a small move away from w0, as after an epoch, for the network and its twin alike
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(1e-3 * p.norm() / max(p.numel(), 1) ** 0.5 * torch.randn_like(p))
        moved = dict(model.named_parameters())
        for name, p in twin.model.module.named_parameters():
            p.copy_(moved[name])
    cpu = time.process_time()
    values = probe.measure(names, time=1.0, twin=twin)
    cpu_seconds["epoch_end"] = time.process_time() - cpu
    epoch_end = {k: v for k, v in probe.timings["last"].items() if k != "total"}
    # The thinned measurements a schedule takes between full ones (LazinessProbe.measure(parts=...)), CPU time.
    for label, parts in (("epoch_end_without_kappa", {"kappa": False}),
                         ("epoch_end_without_kappa_ntk", {"kappa": False, "ntk": False})):
        cpu = time.process_time()
        try:
            probe.measure(names, time=1.0, twin=twin, parts=parts)
        except TypeError:  # a tree before measure(parts=...) (the benchmark is run on it for the before column)
            break
        cpu_seconds[label] = time.process_time() - cpu
    with torch.no_grad():  # back to w0 for the plain step timed after
        for name, p in model.named_parameters():
            p.copy_(w0[name])
    kept = ("kappa", "jacobian_norm", "hessian_norm", "ntk_distance", "activation_stability", "divergence")
    values = {k: values[k] for k in kept if k in values}
    values.update({f"{k}_w0": v for k, v in (probe.initial_kappa_parts or {}).items()})
    return {"seconds": {"fit_start": fit_start, "epoch_end": epoch_end}, "values": values, "cpu_seconds": cpu_seconds}


def per_layer_cost(model, args, device) -> dict:
    """The monitor's measures with and without the per-layer ones (``LazinessProbe(per_layer=...)``: per-module
    displacement, feature movement from the probe forward's hooks, NTK share and distance from the per-module
    kernel blocks), in one run: the two probes are built and measured alternately, ``args.repeats`` times, at fit
    start (``measure_initial``, constructor's forward included) and at moved weights (``measure``, with a twin).
    Seconds are medians of the process's CPU time (one thread: the work done, whatever else the machine runs) and
    of wall time; ``ratio`` = with / without, in CPU time (``wall_ratio`` in wall time)."""
    import torch

    from lightning_lazy.watch.probe import LazinessProbe
    from lightning_lazy.scaling import half_squared_error
    from lightning_lazy.watch.twin import TangentTwin

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(args.probe_size, 3, 32, 32, generator=generator).to(device)
    y = torch.randint(0, 10, (args.probe_size,), generator=generator).to(device)
    model.train()
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    w0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    torch.manual_seed(3)
    moved = {k: v + 1e-3 * v.norm() / max(v.numel(), 1) ** 0.5 * torch.randn_like(v) for k, v in w0.items()}
    twin = TangentTwin(model, torch.optim.SGD(model.parameters(), lr=0.0), half_squared_error)
    with torch.no_grad():
        for name, p in twin.model.module.named_parameters():
            p.copy_(moved[name])

    def set_weights(weights):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(weights[name])

    times = {key: {"without": [], "with": []} for key in ("fit_start", "epoch_end")}
    walls = {key: {"without": [], "with": []} for key in ("fit_start", "epoch_end")}
    options = dict(kappa_probe_size=args.kappa_probe_size, ntk_probe_size=args.ntk_probe_size)
    for repeat in range(max(args.repeats, 1)):
        order = ("without", "with") if repeat % 2 == 0 else ("with", "without")  # alternate who goes first
        for label in order:
            set_weights(w0)
            started, cpu = time.perf_counter(), time.process_time()
            probe = LazinessProbe(model, x, y, per_layer=label == "with", **options)
            probe.measure_initial(names)
            times["fit_start"][label].append(time.process_time() - cpu)
            walls["fit_start"][label].append(time.perf_counter() - started)
            set_weights(moved)
            started, cpu = time.perf_counter(), time.process_time()
            probe.measure(names, time=1.0, twin=twin)
            times["epoch_end"][label].append(time.process_time() - cpu)
            walls["epoch_end"][label].append(time.perf_counter() - started)
    set_weights(w0)
    result = {}
    for key, pair in times.items():
        without, with_ = statistics.median(pair["without"]), statistics.median(pair["with"])
        wall_without, wall_with = statistics.median(walls[key]["without"]), statistics.median(walls[key]["with"])
        result[key] = {"without": without, "with": with_, "ratio": with_ / without, "samples": pair,
                       "wall_without": wall_without, "wall_with": wall_with, "wall_ratio": wall_with / wall_without,
                       "wall_samples": walls[key]}
    return result


def accuracy_study(model, args, device) -> dict:
    """Accuracy against cost of the κ settings on the κ probe. ‖D²h‖ searches: at w0 from a random start (the
    search at fit start), then at moved weights warm-started from the monitor's fit-start direction (the
    search at an epoch's end), each value against a long reference search at the same weights (a lower bound
    too: a setting can beat it). ‖Dh(w0)‖ by Lanczos at several tolerances, against ``tol=1e-8``."""
    import torch

    from lightning_lazy import diagnostics
    from lightning_lazy.watch.probe import CAREFUL_HESSIAN, LazinessProbe

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(args.probe_size, 3, 32, 32, generator=generator).to(device)
    model.train()
    probe = LazinessProbe(model, x, None, kappa_probe_size=args.kappa_probe_size, measure_ntk=False)
    fn, xk = probe.function(), x[: args.kappa_probe_size]
    w0 = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    torch.manual_seed(3)
    w = {k: v + 1e-3 * v.norm() / max(v.numel(), 1) ** 0.5 * torch.randn_like(v) for k, v in w0.items()}
    seconds: dict[str, dict[str, float]] = {"fit_start": {}, "epoch_end": {}}
    values: dict[str, dict[str, float]] = {"fit_start": {}, "epoch_end": {}}
    reference = {"max_iter": 16, "max_rounds": 4, "restarts": 3}

    def run(bucket, label, params, **options):
        started = time.perf_counter()
        value, direction = diagnostics.hessian_norm(fn, xk, params, return_direction=True, **options)
        seconds[bucket][label] = time.perf_counter() - started
        values[bucket][label] = value.item()
        return direction

    if "kappa" not in args.study:
        set_aside = {"seconds": {}, "values": {}}
        set_aside["feature_movement"] = feature_sketch_study(model, x, w0, w)
        return set_aside
    run("fit_start", "reference", w0, **reference)
    for setting in ((4, 2, 1), (6, 2, 1), (8, 2, 1), (12, 2, 1), (4, 3, 1), (6, 3, 1), (8, 3, 1), (4, 4, 1), (6, 4, 1),
                    (12, 3, 2)):
        label = str(setting) + (" (default)" if setting == tuple(CAREFUL_HESSIAN.values()) else "")
        direction = run("fit_start", label, w0, **dict(zip(("max_iter", "max_rounds", "restarts"), setting)))
        if label.endswith("(default)"):
            start = direction
    run("epoch_end", "reference", w, start=start, **reference)
    for iterations in (1, 2, 3, 4, 8):
        run("epoch_end", f"warm ({iterations}, 1, 1)", w, start=start, max_iter=iterations, max_rounds=1, restarts=1)
    # ‖Dh(w0)‖ by Lanczos (what the monitor runs when the NTK is not the network's own kernel on the κ probe)
    seconds["jacobian_norm"], values["jacobian_norm"] = {}, {}
    for tol in (1e-8, 1e-2, 1e-3, 1e-4):
        label = "reference" if tol == 1e-8 else f"Lanczos tol={tol:g}" + (" (monitor)" if tol == 1e-3 else "")
        started = time.perf_counter()
        values["jacobian_norm"][label] = diagnostics.jacobian_norm(fn, xk, w0, tol=tol, max_iter=1000).item()
        seconds["jacobian_norm"][label] = time.perf_counter() - started
    result = {"seconds": seconds, "values": values}
    if "features" in args.study:
        try:
            result["feature_movement"] = feature_sketch_study(model, x, w0, w)
        except TypeError:  # a tree before feature_sketch (the before column)
            pass
    return result


def feature_sketch_study(model, x, w0, w) -> dict:
    """Feature movement from sketches (the default ``feature_sketch``) against whole outputs (``None``), at the
    moved weights ``w``: the relative error of each layer's value, and the CPU time of the probe's forward with each
    (the sketches are made in the forward's hooks)."""
    import torch

    from lightning_lazy import diagnostics
    from lightning_lazy.watch.probe import LazinessProbe

    def set_weights(weights):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in weights:
                    p.copy_(weights[name])

    from lightning_lazy.watch.probe import ProbeMemoryError

    set_weights(w0)
    try:
        LazinessProbe(model, x, None, measure_kappa=False, measure_ntk=False, feature_sketch=None)
    except ProbeMemoryError as error:  # whole outputs refused (the case the sketch is for): compare on what fits
        x = x[: error.largest]
    probes = {label: LazinessProbe(model, x, None, measure_kappa=False, measure_ntk=False, feature_sketch=size)
              for label, size in (("sketch", diagnostics.FEATURE_SKETCH_SIZE), ("exact", None))}
    set_weights(w)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    layers, cpu = {}, {}
    for label, probe in probes.items():
        started = time.process_time()
        probe._output_and_states(probe.x)  # the probe forward, whose hooks record (or sketch) the outputs
        layers[label] = probe.layer_measures(probe.params(names), {k: probe.initial[k] for k in names})
        cpu[label] = time.process_time() - started
    set_weights(w0)
    errors = {name: values["feature_movement"] / layers["exact"][name]["feature_movement"] - 1
              for name, values in layers["sketch"].items() if "feature_movement" in values}
    kept = {label: sum(t.values.numel() if isinstance(t, diagnostics.FeatureSketch) else t.numel()
                       for ts in probe.initial_features.values() for t in ts) for label, probe in probes.items()}
    absolute = sorted(abs(e) for e in errors.values())
    return {"relative_error": errors, "max_abs_relative_error": absolute[-1],
            "median_abs_relative_error": statistics.median(absolute), "numbers_kept_at_w0": kept,
            "forward_and_layers_cpu_seconds": cpu, "sketch_size": diagnostics.FEATURE_SKETCH_SIZE,
            "probe_size": len(x)}


def ntk_comparison(model, args, device) -> dict:
    """The empirical NTK ([N·K, N·K], 10 outputs) here, in nngeometry and in neural-tangents, same weights."""
    import importlib.util

    import torch

    from lightning_lazy import diagnostics

    generator = torch.Generator().manual_seed(2)
    x = torch.randn(args.ntk_inputs, 3, 32, 32, generator=generator).to(device)
    model = model.eval()
    contenders: dict[str, dict] = {}
    kernels: dict[str, torch.Tensor] = {}
    seconds, kernels["lightning_lazy"] = _median_time(lambda: diagnostics.empirical_ntk(model, x), args.repeats)
    contenders["lightning_lazy"] = {"seconds": seconds}
    if args.products:
        seconds, kernels["products"] = _median_time(
            lambda: diagnostics.empirical_ntk(model, x, implementation="products"), 1)
        contenders["products"] = {"seconds": seconds}
    if importlib.util.find_spec("nngeometry") is not None:
        from nngeometry.object import FMatDense
        from nngeometry import gram

        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=len(x))

        def nng():
            data = gram.GramMatrix(model, loader, function=lambda inputs: model(inputs), representation=FMatDense).data
            k = data.shape[0]
            return data.permute(1, 0, 3, 2).reshape(len(x) * k, len(x) * k)

        try:
            seconds, kernels["nngeometry"] = _median_time(nng, args.repeats)
            contenders["nngeometry"] = {"seconds": seconds}
        except Exception as error:  # noqa: BLE001
            contenders["nngeometry"] = {"error": f"{type(error).__name__}: {error}"[:300]}
    else:
        contenders["nngeometry"] = {"error": "skipped: nngeometry is not installed (pip install nngeometry==0.4)"}
    contenders.update(run_neural_tangents(model, x, args, kernels))
    reference = kernels["lightning_lazy"].double().cpu()
    for name, kernel in kernels.items():
        contenders[name]["relative_difference"] = float((kernel.double().cpu() - reference).norm() / reference.norm())
        contenders[name]["ratio_to_lightning_lazy"] = contenders[name]["seconds"] / contenders["lightning_lazy"]["seconds"]
    return contenders


def run_neural_tangents(model, x, args, kernels) -> dict:
    import numpy as np
    import torch
    from torch import nn

    if missing := nt_python_missing(args.nt_python):
        return {"neural_tangents": {"error": missing}}
    spec: dict[str, np.ndarray] = {"x": x.detach().cpu().double().numpy()}
    if isinstance(model, nn.Sequential):
        spec["kind"] = np.array("mlp")
        for i, layer in enumerate(m for m in model if isinstance(m, nn.Linear)):
            spec[f"w{i}"] = layer.weight.detach().double().T.numpy().copy()
            spec[f"b{i}"] = layer.bias.detach().double().numpy()
    else:
        spec["kind"] = np.array("vgg")
        spec["x"] = spec["x"].transpose(0, 2, 3, 1).copy()
        for i, conv in enumerate(m for m in model.features if isinstance(m, nn.Conv2d)):
            spec[f"c{i}"] = conv.weight.detach().double().permute(2, 3, 1, 0).numpy().copy()
            spec[f"cb{i}"] = conv.bias.detach().double().numpy()
        spec["w"] = model.classifier.weight.detach().double().T.numpy().copy()
        spec["b"] = model.classifier.bias.detach().double().numpy()
    dtype = next(model.parameters()).dtype
    with tempfile.TemporaryDirectory() as folder:
        for k in list(spec):
            if spec[k].dtype == np.float64 and dtype == torch.float32:
                spec[k] = spec[k].astype(np.float32)
        np.savez(Path(folder) / "spec.npz", **spec)
        env = dict(os.environ, XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
                   JAX_PLATFORMS="cpu")
        command = [args.nt_python, str(Path(__file__).resolve()), "--nt-worker", folder,
                   "--nt-jacobian-limit-gib", str(args.nt_jacobian_limit_gib)]
        if args.threads:
            command = ["taskset", "-c", ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[: args.threads])] + command
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
        if done.returncode != 0:
            return {"neural_tangents": {"error": done.stderr[-500:]}}
        times = json.loads((Path(folder) / "times.json").read_text())
        out = {}
        for name, entry in times.items():
            out[f"nt_{name}"] = entry
            if "seconds" in entry:
                kernels[f"nt_{name}"] = torch.from_numpy(np.load(Path(folder) / f"{name}.npy"))
        return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp,vgg11,resnet18", help="for the monitor measures")
    parser.add_argument("--ntk-models", default="mlp,vgg11_8", help="for the NTK comparison ('' for none)")
    parser.add_argument("--ntk-only", action="store_true", help="only the NTK comparison")
    parser.add_argument("--products", action="store_true", help="also time the column-by-column reference NTK")
    parser.add_argument("--ntk-inputs", type=int, default=64)
    parser.add_argument("--probe-size", type=int, default=256)
    parser.add_argument("--kappa-probe-size", type=int, default=16)
    parser.add_argument("--ntk-probe-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads; 0 = torch's default")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    add_nt_python_option(parser)
    parser.add_argument("--nt-jacobian-limit-gib", type=float, default=2.0,
                        help="skip neural-tangents' Jacobian contraction when its Jacobian exceeds this")
    parser.add_argument("--quick", action="store_true", help="tiny models and probes: seconds")
    parser.add_argument("--accuracy-study", action="store_true",
                        help="instead of the monitor's measures: accuracy against cost of the ‖D²h‖ and ‖Dh‖ settings")
    parser.add_argument("--study", default="kappa,features",
                        help="with --accuracy-study: 'kappa' (the ‖D²h‖ and ‖Dh‖ settings), 'features' (feature "
                             "movement from sketches against whole outputs), or both")
    parser.add_argument("--per-layer", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the measures with and without the per-layer ones (default on)")
    parser.add_argument("--output", help="write the results as JSON here")
    parser.add_argument("--nt-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.probe_size, args.kappa_probe_size, args.ntk_probe_size = 16, 4, 4
        args.ntk_inputs, args.repeats = 4, 1
    return args


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.nt_worker:
        nt_worker(args.nt_worker, args.nt_jacobian_limit_gib)
        return {}
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = {
        "benchmark": "monitor_cost",
        "settings": {k: v for k, v in vars(args).items() if k != "nt_worker"},
        "environment": {"device": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
                        "platform": platform.platform(), "processor": platform.processor()},
        "monitor": {}, "ntk": {},
    }
    if not args.ntk_only:
        for name in filter(None, args.models.split(",")):
            model = build_model(name, args.quick).to(device)
            generator = torch.Generator().manual_seed(0)
            batch = torch.randn(128 if not args.quick else 16, 3, 32, 32, generator=generator).to(device)
            target = torch.randint(0, 10, (len(batch),), generator=generator).to(device)
            before = plain_step_seconds(model, batch, target, max(args.repeats, 3))
            record = accuracy_study(model, args, device) if args.accuracy_study else monitor_measures(model, args, device)
            if not args.accuracy_study and args.per_layer:
                record["per_layer"] = per_layer_cost(model, args, device)
            before_cpu = plain_step_seconds.cpu
            after = plain_step_seconds(model, batch, target, max(args.repeats, 3))  # load drift check
            if "cpu_seconds" in record:  # CPU time: the work done, whatever else the machine runs
                step_cpu = (before_cpu + plain_step_seconds.cpu) / 2
                record["plain_step_cpu_seconds"] = step_cpu
                record["cpu_in_steps"] = {k: v / step_cpu for k, v in record["cpu_seconds"].items()}
            # The unit: the mean of the plain step timed just before and just after the measures.
            step = (before + after) / 2
            record.update(plain_step_seconds=step, plain_step_seconds_before=before, plain_step_seconds_after=after)
            record["parameters"] = sum(p.numel() for p in model.parameters())
            record["in_steps"] = {
                bucket: {k: v / step for k, v in times.items()} for bucket, times in record["seconds"].items()
            }
            record["total_in_steps"] = {bucket: sum(v.values()) for bucket, v in record["in_steps"].items()}
            results["monitor"][name] = record
            (print_study if args.accuracy_study else print_monitor)(name, record)
    for name in filter(None, "" if args.quick and args.ntk_models == "mlp,vgg11_8" else args.ntk_models.split(",")):
        model = build_model(name, args.quick).to(device)
        results["ntk"][name] = ntk_comparison(model, args, device)
        print_ntk(name, results["ntk"][name], args)
    if args.quick and args.ntk_models == "mlp,vgg11_8":
        model = build_model("mlp", True).to(device)
        results["ntk"]["mlp"] = ntk_comparison(model, args, device)
        print_ntk("mlp", results["ntk"]["mlp"], args)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=1))
    return results


def print_monitor(name: str, record: dict) -> None:
    step = record["plain_step_seconds"]
    print(f"\n{name}: {record['parameters'] / 1e6:.2f} M parameters, plain training step (batch 128) "
          f"{step * 1e3:.1f} ms (before the measures {record['plain_step_seconds_before'] * 1e3:.1f} ms, after "
          f"{record['plain_step_seconds_after'] * 1e3:.1f} ms)")
    print(f"  {'measure':<42} | {'seconds':>8} | {'plain steps':>11}")
    for bucket in ("fit_start", "epoch_end"):
        for measure, seconds in record["seconds"][bucket].items():
            print(f"  {bucket + ': ' + measure:<42} | {seconds:8.3f} | {seconds / step:11.2f}")
        print(f"  {bucket + ': TOTAL':<42} | {sum(record['seconds'][bucket].values()):8.3f} | "
              f"{record['total_in_steps'][bucket]:11.2f}")
    if "cpu_in_steps" in record:
        print(f"  CPU time, in plain steps of {record['plain_step_cpu_seconds'] * 1e3:.1f} ms CPU: " + ", ".join(
            f"{k} {v:.2f}" for k, v in record["cpu_in_steps"].items()))
    if "per_layer" in record:
        for bucket, cost in record["per_layer"].items():
            print(f"  per-layer measures, {bucket}: CPU {cost['without']:.3f} s without, {cost['with']:.3f} s with: "
                  f"{cost['ratio']:.3f}x (wall {cost['wall_without']:.3f} / {cost['wall_with']:.3f} s: "
                  f"{cost['wall_ratio']:.3f}x)")


def print_study(name: str, record: dict) -> None:
    if "feature_movement" in record:
        study = record["feature_movement"]
        print(f"\n{name}: feature movement from sketches of {study['sketch_size']} numbers against whole outputs: "
              f"|relative error| median {study['median_abs_relative_error']:.2%}, max "
              f"{study['max_abs_relative_error']:.2%} over {len(study['relative_error'])} layers (probe {study['probe_size']}); "
              f"numbers kept at w0 "
              f"{study['numbers_kept_at_w0']['sketch']:.3g} against {study['numbers_kept_at_w0']['exact']:.3g}; forward "
              f"and per-layer values {study['forward_and_layers_cpu_seconds']['sketch']:.2f} s CPU against "
              f"{study['forward_and_layers_cpu_seconds']['exact']:.2f} s")
    step = record["plain_step_seconds"]
    print(f"\n{name}: ‖D²h‖ and ‖Dh‖ on the κ probe, in plain training steps ({step * 1e3:.1f} ms); "
          f"value relative to the reference search at the same weights")
    print(f"  {'setting (‖D²h‖: max_iter, max_rounds, restarts)':<44} | {'steps':>6} | {'value':>10} | {'vs ref.':>8}")
    for bucket in ("fit_start", "epoch_end", "jacobian_norm"):
        if bucket not in record["values"]:
            continue
        reference = record["values"][bucket]["reference"]
        for setting, seconds in record["seconds"][bucket].items():
            value = record["values"][bucket][setting]
            print(f"  {bucket + ': ' + setting:<44} | {seconds / step:6.1f} | {value:10.5g} | "
                  f"{value / reference - 1:+8.1%}")


def print_ntk(name: str, contenders: dict, args) -> None:
    print(f"\nempirical NTK [N·K, N·K], {name}, {args.ntk_inputs} inputs, 10 outputs")
    print(f"  {'implementation':<34} | {'seconds':>8} | {'× ours':>7} | {'rel. diff':>9}")
    for contender, entry in contenders.items():
        if "seconds" in entry:
            print(f"  {contender:<34} | {entry['seconds']:8.3f} | {entry['ratio_to_lightning_lazy']:7.2f} | "
                  f"{entry['relative_difference']:9.1e}")
        else:
            print(f"  {contender:<34} | {entry['error'][:80]}")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(ROOT))  # this tree's lightning_lazy, whatever is installed
    main()
