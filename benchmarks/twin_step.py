"""What a training step of the linearized twin costs next to a plain training step.

Variants, each one full SGD training step on the same batch (½ squared error on one-hot targets, fp32):

  (a) plain      forward, loss, backward, SGD step of the network itself;
  (b) naive      the tangent model by ``torch.func.jvp`` (primal w0, tangent w − w0), autograd back
                 through the jvp, SGD step;
  (c) linearized a :class:`lightning_lazy.LinearizedModel` training step (forward, loss, backward, SGD);
  (d) jax twin   the same tangent-model step in JAX under one ``jax.jit``: f(w0) + jvp(f, w0, w − w0)
                 (what neural-tangents' ``linearize`` gives), ``jax.value_and_grad`` of the loss, SGD
                 update, parameters donated so XLA updates them in place;
  (e) jax plain  the plain step in JAX under ``jit`` (context: what JAX itself takes for a plain step).

``--compile`` adds (a), (b), (c) with their loss-and-gradient computation wrapped in ``torch.compile``
(mode "reduce-overhead" on CUDA, the default mode on CPU; the SGD update stays eager); a compiled variant's
ratio is to the compiled plain step. JAX is optional: without it (d) and (e) are skipped, with the reason.

Isolation and fairness. The JAX variants run in a worker process of their own, so that neither
framework's thread pool, allocator state or memory counts leak into the other's numbers (on a quiet
machine in-process interleaving timed the same; under outside load it was erratic, each framework's idle
threads competing with the other's work). Each variant owns its own copy of the network, built from
the same seed in both processes (so all start from the same w0, on the same batch). After warm-up the
variants are interleaved in rounds, the order rotating every round; in a round a variant runs one untimed
step (its process's threads wake up) and then ``--block`` timed steps, each ending with a device
synchronization. The table gives the median step; ``CPU ms`` (CPU runs) is the median CPU time of the
variant's process per step, all threads together, which other processes on the machine disturb less.

Memory (column ``step MiB``): the peak memory *one step* needs above what was resident just before it
(activations, gradients, temporaries; parameters, w0 and optimizer state are resident and not counted).

  - CUDA, torch: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
    ``memory_allocated()`` before the step. Under CUDA graphs ("reduce-overhead") the graph's memory pool
    is allocated once, during warm-up, so the step adds ~0; ``resident_after_warmup_mib`` in the JSON is
    what the warm-up (compilation, graph capture) left allocated.
  - CUDA, JAX: XLA's plan for the jitted step (``compiled.memory_analysis()``: temporaries plus outputs
    not aliased to donated inputs).
  - CPU (torch and JAX alike): the peak resident set size of the variant's process during one step,
    above the resident size just before it. Measured after all timing, with glibc told to serve every
    allocation of 64 KiB or more by mmap (so a freed tensor leaves the resident set) and the kernel's
    peak-RSS mark reset before the step (``/proc/self/clear_refs``). It counts pages actually touched,
    from every allocator (torch, XLA, oneDNN scratch); allocations under 64 KiB come from the heap and may
    be undercounted. Median of five steps. During timing both processes use glibc's steady-state policy
    (mmap from 32 MiB up, trim above 64 MiB), fixed from the start so every model sees the same one.

Run ``python benchmarks/twin_step.py --help`` for the flags; ``benchmarks/README.md`` has results.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# JAX must not take most of the GPU's memory at import: torch's process shares the device.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.func import functional_call  # noqa: E402

from lightning_lazy import LinearizedModel  # noqa: E402
from lightning_lazy.models.init import xavier_normal_init  # noqa: E402
from lightning_lazy.models.vgg import VGG11  # noqa: E402
from lightning_lazy.scaling import half_squared_error  # noqa: E402

MiB = 2**20
NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)

VARIANT_LABELS = {
    "a": "(a) plain step",
    "b": "(b) naive torch.func.jvp twin",
    "c": "(c) LinearizedModel twin",
    "d": "(d) JAX jit twin (jax.jvp)",
    "e": "(e) JAX jit plain step",
}


# --------------------------------------------------------------------------------------------- problem


def build_mlp(hidden: int) -> nn.Sequential:
    """MLP 3072-hidden-hidden-10 on CIFAR-shaped images, Xavier-normal weights, zero biases."""
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(IMAGE_SHAPE), hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, NUM_CLASSES),
    )
    return xavier_normal_init(model)


def make_problem(model_name: str, width: int, args: argparse.Namespace) -> tuple[nn.Module, Tensor, Tensor]:
    """The network at w0 and one batch, on CPU; deterministic, so both processes build the same."""
    torch.manual_seed(args.seed)
    if model_name == "mlp":
        model: nn.Module = build_mlp(args.mlp_hidden)
    elif model_name == "vgg11":
        model = VGG11(width=width, num_classes=NUM_CLASSES, batchnorm=False, base_width=args.vgg_base_width)
    else:
        raise ValueError(f"unknown model {model_name!r}: use mlp or vgg11")
    generator = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch_size, *IMAGE_SHAPE, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=generator)
    # One-hot float targets: half_squared_error then runs no class-index checks, whose data-dependent
    # branches would make torch.compile break its graph and force a GPU sync every step.
    y = torch.nn.functional.one_hot(labels, NUM_CLASSES).float()
    return model, x, y


def layer_sequence(model: nn.Module) -> list[nn.Module]:
    """The benchmark's networks as the flat list of layers their forward applies, in order."""
    if isinstance(model, VGG11):
        return [*model.features, nn.Flatten(), model.classifier]
    if isinstance(model, nn.Sequential):
        return list(model)
    raise TypeError(f"no layer sequence for {type(model).__name__}")


# ------------------------------------------------------------------------------------------ variants


@dataclass
class Variant:
    """One training step to time, run in this process."""

    key: str  # "a" .. "e"
    compiled: bool
    step: Callable[[], Any]  # one full training step; returns the loss
    sync: Callable[[], None]
    params: Callable[[], dict[str, Tensor]]  # current parameters, torch names and layout, on CPU
    device_memory: Callable[[], dict[str, Any]] | None = None  # CUDA: one measured step
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.key + ("+compile" if self.compiled else "")

    def run_block(self, steps: int) -> tuple[list[float], list[float]]:
        """One untimed step, then ``steps`` timed ones: (wall seconds, process CPU seconds) per step."""
        self.step()
        self.sync()
        wall, cpu = [], []
        for _ in range(steps):
            start, cpu_start = time.perf_counter(), time.process_time()
            self.step()
            self.sync()
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
        return wall, cpu

    def warm_up(self, steps: int) -> None:
        """``steps`` (at least one) untimed steps; records the first one's seconds (compilation shows there)."""
        start = time.perf_counter()
        self.step()
        self.sync()
        self.info["first_step_s"] = time.perf_counter() - start
        for _ in range(max(0, steps - 1)):
            self.step()
        self.sync()

    def memory(self, host: HostMemory | None) -> dict[str, Any]:
        if host is not None:
            return host.measure(self.step, self.sync)
        return self.device_memory() if self.device_memory is not None else {}

    def final_loss(self) -> float:
        loss = self.step()
        self.sync()
        return float(loss)


def torch_sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def make_torch_variant(
    key: str, base: nn.Module, x: Tensor, y: Tensor, args: argparse.Namespace, device: torch.device, compiled: bool
) -> Variant:
    """(a), (b) or (c), as a closure over its own copy of ``base``."""
    model = copy.deepcopy(base).to(device).train()
    if key == "a":
        trained: nn.Module = model

        def loss_fn(x: Tensor, y: Tensor) -> Tensor:
            return half_squared_error(model(x), y)

    elif key == "b":
        trained = model
        w0 = {name: p.detach().clone() for name, p in model.named_parameters()}

        def loss_fn(x: Tensor, y: Tensor) -> Tensor:
            params = dict(model.named_parameters())
            displacement = {name: params[name] - w0[name] for name in w0}
            out, out_t = torch.func.jvp(lambda p: functional_call(model, p, (x,)), (w0,), (displacement,))
            return half_squared_error(out + out_t, y)

    elif key == "c":
        trained = LinearizedModel(model)

        def loss_fn(x: Tensor, y: Tensor) -> Tensor:
            return half_squared_error(trained(x), y)

    else:
        raise ValueError(f"not a torch variant: {key!r}")

    info: dict[str, Any] = {}
    if compiled:
        mode = "reduce-overhead" if device.type == "cuda" else None
        info["compile_mode"] = mode or "default"
        loss_fn = torch.compile(loss_fn, mode=mode)
    mark_step = compiled and device.type == "cuda"
    optimizer = torch.optim.SGD(list(trained.parameters()), lr=args.lr)

    def step() -> Tensor:
        if mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        loss = loss_fn(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def params() -> dict[str, Tensor]:
        module = trained.module if isinstance(trained, LinearizedModel) else trained
        return {name: p.detach().cpu().clone() for name, p in module.named_parameters()}

    sync = torch_sync(device)
    variant = Variant(key, compiled, step, sync, params, info=info)
    if device.type == "cuda":
        variant.device_memory = lambda: cuda_step_memory(step, sync, device)
    return variant


def cuda_step_memory(step: Callable[[], Any], sync: Callable[[], None], device: torch.device) -> dict[str, Any]:
    sync()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    sync()
    return {"step_mib": (torch.cuda.max_memory_allocated(device) - before) / MiB}


def dynamo_counters() -> tuple[int, dict[str, int]]:
    """TorchDynamo's running totals: graphs compiled, and graph-break reasons (empty where not kept)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"]), dict(counters["graph_break"])
    except Exception:  # noqa: BLE001 - private API; a diagnostic only
        return -1, {}


# ------------------------------------------------------------------------------------------------ JAX


def jax_program(layers: list[nn.Module]) -> tuple[list[tuple[str, int | None]], list[tuple[Any, Any]], bool]:
    """Translate torch layers into (op, parameter index) pairs and numpy parameters in JAX's layout.

    Convolutions run NHWC with HWIO kernels (XLA's preferred layout); linear weights are [in, out].
    Returns ``(program, params, channels_last_input)``.
    """
    program: list[tuple[str, int | None]] = []
    params: list[tuple[Any, Any]] = []
    for layer in layers:
        if isinstance(layer, nn.Linear):
            program.append(("linear", len(params)))
            params.append((layer.weight.detach().numpy().T.copy(), layer.bias.detach().numpy().copy()))
        elif isinstance(layer, nn.Conv2d):
            if layer.kernel_size != (3, 3) or layer.stride != (1, 1) or layer.padding != (1, 1) or layer.groups != 1:
                raise NotImplementedError(f"JAX translation covers 3x3/stride 1/padding 1 convolutions, not {layer}")
            program.append(("conv", len(params)))
            weight = layer.weight.detach().numpy().transpose(2, 3, 1, 0).copy()  # OIHW -> HWIO
            params.append((weight, layer.bias.detach().numpy().copy()))
        elif isinstance(layer, nn.ReLU):
            program.append(("relu", None))
        elif isinstance(layer, nn.MaxPool2d):
            if layer.kernel_size not in (2, (2, 2)) or layer.stride not in (2, (2, 2)):
                raise NotImplementedError(f"the JAX translation covers 2x2, stride 2 max-pooling, not {layer}")
            program.append(("maxpool", None))
        elif isinstance(layer, nn.Flatten):
            program.append(("flatten", None))
        else:
            raise NotImplementedError(f"no JAX translation for {type(layer).__name__}")
    channels_last = bool(program) and program[0][0] == "conv"
    return program, params, channels_last


def make_jax_variants(
    jax: Any, jdev: Any, base: nn.Module, x: Tensor, y: Tensor, args: argparse.Namespace
) -> list[Variant]:
    """(d) and (e) for ``base``, run in this (the worker) process."""
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    program, np_params, channels_last = jax_program(layer_sequence(base))
    names = [name for name, _ in base.named_parameters()]
    lr = args.lr

    def apply(params: list[tuple[Any, Any]], inputs: Any) -> Any:
        h = inputs
        for op, index in program:
            if op == "linear":
                w, b = params[index]
                h = h @ w + b
            elif op == "conv":
                w, b = params[index]
                h = lax.conv_general_dilated(h, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
                h = h + b
            elif op == "relu":
                h = jnp.maximum(h, 0)
            elif op == "maxpool":
                h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
            elif op == "flatten":
                if h.ndim == 4 and channels_last:
                    h = jnp.transpose(h, (0, 3, 1, 2))  # flatten in torch's (C, H, W) order
                h = h.reshape(h.shape[0], -1)
        return h

    def half_squared(out: Any, target: Any) -> Any:
        return 0.5 * jnp.mean(jnp.sum((out - target) ** 2, axis=1))

    def twin_loss(params: Any, params0: Any, inputs: Any, target: Any) -> Any:
        displacement = jax.tree_util.tree_map(lambda w, w0: w - w0, params, params0)
        out0, out_t = jax.jvp(lambda p: apply(p, inputs), (params0,), (displacement,))
        return half_squared(out0 + out_t, target)

    def plain_loss(params: Any, inputs: Any, target: Any) -> Any:
        return half_squared(apply(params, inputs), target)

    def sgd(params: Any, grads: Any) -> Any:
        return jax.tree_util.tree_map(lambda w, g: w - lr * g, params, grads)

    def twin_step(params: Any, params0: Any, inputs: Any, target: Any) -> tuple[Any, Any]:
        loss, grads = jax.value_and_grad(twin_loss)(params, params0, inputs, target)
        return sgd(params, grads), loss

    def plain_step(params: Any, inputs: Any, target: Any) -> tuple[Any, Any]:
        loss, grads = jax.value_and_grad(plain_loss)(params, inputs, target)
        return sgd(params, grads), loss

    def to_torch_layout(params: Any) -> dict[str, Tensor]:
        flat = []
        for (op, _), (w, b) in zip([p for p in program if p[1] is not None], params):
            w = np.asarray(w)
            flat += [w.T if op == "linear" else w.transpose(3, 2, 0, 1), np.asarray(b)]
        return {name: torch.from_numpy(np.array(value)) for name, value in zip(names, flat)}

    x_np = x.numpy()
    if channels_last:
        x_np = x_np.transpose(0, 2, 3, 1).copy()
    inputs = jax.device_put(x_np, jdev)
    target = jax.device_put(y.numpy(), jdev)
    params0 = jax.device_put(np_params, jdev)

    variants = []
    for key, fn, extra in (("d", twin_step, (params0,)), ("e", plain_step, ())):
        if key not in args.variants:
            continue
        # Donating the parameters lets XLA update them in place, as torch's SGD does.
        state = {"params": jax.device_put(np_params, jdev)}
        info: dict[str, Any] = {}
        start = time.perf_counter()
        # Compiled ahead of time (once): the executable is what every step calls.
        jitted = jax.jit(fn, donate_argnums=0).lower(state["params"], *extra, inputs, target).compile()
        info["xla_compile_s"] = time.perf_counter() - start
        try:
            analysis = jitted.memory_analysis()
            info["xla_temp_mib"] = analysis.temp_size_in_bytes / MiB
            info["xla_output_unaliased_mib"] = (analysis.output_size_in_bytes - analysis.alias_size_in_bytes) / MiB
        except Exception as error:  # noqa: BLE001 - optional diagnostic; not every backend reports it
            info["xla_memory_analysis_error"] = f"{type(error).__name__}: {error}"

        def step(jitted: Any = jitted, state: dict = state, extra: tuple = extra) -> Any:
            state["params"], loss = jitted(state["params"], *extra, inputs, target)
            return loss

        def sync(state: dict = state) -> None:
            jax.block_until_ready(state["params"])

        def params(state: dict = state) -> dict[str, Tensor]:
            return to_torch_layout(jax.device_get(state["params"]))

        def device_memory(info: dict = info) -> dict[str, Any]:
            if "xla_temp_mib" not in info:
                return {"step_mib": None, "memory_note": info.get("xla_memory_analysis_error")}
            return {"step_mib": info["xla_temp_mib"] + info["xla_output_unaliased_mib"]}

        variants.append(Variant(key, False, step, sync, params, device_memory, info=info))
    return variants


def _jax_worker(conn: Any, args_dict: dict[str, Any]) -> None:
    """Worker process for (d) and (e): answers ("setup" | "block" | "params" | "memory" | "loss" | "close")."""
    args = argparse.Namespace(**args_dict)
    device = torch.device(args.device)
    if args.threads and device.type == "cpu" and hasattr(os, "sched_setaffinity"):
        # XLA sizes its CPU thread pool from the cores this process may run on: give it --threads of them
        # (set before JAX is imported). torch, in the parent, gets the same number of intra-op threads.
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    try:
        import jax

        if device.type == "cuda":
            jax.config.update("jax_default_matmul_precision", "tensorfloat32" if args.tf32 else "float32")
        jdev = jax.devices("cpu")[0] if device.type == "cpu" else jax.devices("gpu")[device.index or 0]
    except Exception as error:  # noqa: BLE001 - JAX is optional: report why and stop
        conn.send({"error": f"JAX unavailable here ({type(error).__name__}: {str(error).splitlines()[0][:300]})"})
        conn.close()
        return
    if device.type == "cpu":
        glibc_policy("steady")
    conn.send({"jax": jax.__version__, "jax_device": str(jdev), "jax_cores": _cores()})
    variants: dict[str, Variant] = {}
    host = None
    while True:
        command, *rest = conn.recv()
        try:
            if command == "setup":
                model_name, width = rest
                variants.clear()
                base, x, y = make_problem(model_name, width, args)
                for variant in make_jax_variants(jax, jdev, base, x, y, args):
                    variant.warm_up(args.warmup)
                    variants[variant.key] = variant
                conn.send({key: v.info for key, v in variants.items()})
            elif command == "block":
                conn.send(variants[rest[0]].run_block(rest[1]))
            elif command == "params":
                conn.send({k: v.numpy() for k, v in variants[rest[0]].params().items()})
            elif command == "memory":
                if device.type == "cpu" and host is None:
                    host = HostMemory()
                conn.send(variants[rest[0]].memory(host))
            elif command == "loss":
                conn.send(variants[rest[0]].final_loss())
            elif command == "close":
                conn.close()
                return
        except Exception as error:  # noqa: BLE001 - hand the failure to the parent, which reports it
            conn.send({"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"})


def _cores() -> int | None:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


class JaxWorker:
    """The parent's handle on the JAX worker process."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.error: str | None = None
        self.version: str | None = None
        if importlib.util.find_spec("jax") is None:
            self.error = "JAX is not installed (pip install 'lightning-lazy[bench]')"
            return
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_jax_worker, args=(child, vars(args)), daemon=True)
        self.process.start()
        child.close()
        hello = self.conn.recv()
        if "error" in hello:
            self.error = hello["error"]
            self.close()
        else:
            self.version, self.device, self.cores = hello["jax"], hello["jax_device"], hello["jax_cores"]

    def ask(self, *message: Any) -> Any:
        self.conn.send(message)
        answer = self.conn.recv()
        if isinstance(answer, dict) and set(answer) == {"error"}:
            raise RuntimeError(answer["error"])
        return answer

    def close(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError, EOFError):
            self.conn.send(("close",))
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()


@dataclass
class RemoteVariant:
    """A variant that runs in the JAX worker; the same interface as :class:`Variant` for the runner."""

    worker: JaxWorker
    key: str
    info: dict[str, Any]
    compiled: bool = False

    @property
    def name(self) -> str:
        return self.key

    def run_block(self, steps: int) -> tuple[list[float], list[float]]:
        return self.worker.ask("block", self.key, steps)

    def params(self) -> dict[str, Tensor]:
        return {k: torch.from_numpy(v) for k, v in self.worker.ask("params", self.key).items()}

    def memory(self, host: HostMemory | None) -> dict[str, Any]:
        return self.worker.ask("memory", self.key)

    def final_loss(self) -> float:
        return float(self.worker.ask("loss", self.key))


# ------------------------------------------------------------------------------------------ CPU memory


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def glibc_policy(policy: str) -> bool:
    """Fix glibc malloc's thresholds: "steady" (what its dynamic policy settles at) or "measure"."""
    threshold, trim = {"steady": (32 * MiB, 64 * MiB), "measure": (64 * 1024, 64 * 1024)}[policy]
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold) and libc.mallopt(_M_TRIM_THRESHOLD, trim))
    except (OSError, AttributeError):
        return False


class HostMemory:
    """Peak RSS of one step above the RSS just before it (see the module docstring for the method)."""

    def __init__(self) -> None:
        self.error: str | None = None
        try:
            self.libc = ctypes.CDLL("libc.so.6")
            if not glibc_policy("measure"):
                raise OSError("mallopt refused the thresholds")
            self._reset_peak()
            self._status("VmHWM:")
        except (OSError, AttributeError, ValueError) as error:
            self.error = f"host step memory unavailable here ({type(error).__name__}: {error}); needs Linux + glibc"

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        raise ValueError(f"{key} not in /proc/self/status")

    @staticmethod
    def _reset_peak() -> None:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")

    def measure(self, step: Callable[[], Any], sync: Callable[[], None], repeats: int = 5) -> dict[str, Any]:
        if self.error:
            return {"step_mib": None, "memory_note": self.error}
        step()  # settle under the measuring policy
        sync()
        deltas = []
        for _ in range(repeats):
            # Let deferred frees of the previous step land (XLA releases buffers asynchronously).
            time.sleep(0.05)
            self.libc.malloc_trim(0)
            self._reset_peak()
            before = self._status("VmRSS:")
            step()
            sync()
            deltas.append((self._status("VmHWM:") - before) / MiB)
        return {"step_mib": statistics.median(deltas), "step_mib_samples": deltas}

    def close(self) -> None:
        glibc_policy("steady")


# --------------------------------------------------------------------------------------------- running


def agreement(variants: list[Any], w0: dict[str, Tensor]) -> dict[str, float]:
    """After the same warm-up steps, how far each variant's parameters are from (c)'s.

    max |w_v − w_c| / max |w_c − w0|. The twin variants (b), (d) and compiled (c) train the same tangent
    model on the same batch, so for them this is rounding; for (a), which trains the network itself, it
    is the (second-order) gap between the real and the tangent path, shown for contrast.
    """
    reference = next((v for v in variants if v.key == "c" and not v.compiled), None)
    if reference is None:
        return {}
    ref = reference.params()
    scale = max(float((ref[k] - w0[k]).abs().max()) for k in ref) or 1.0
    out = {}
    for variant in variants:
        if variant is not reference and variant.key in "abcd":
            other = variant.params()
            out[variant.name] = max(float((other[k] - ref[k]).abs().max()) for k in ref) / scale
    return out


def run_model(
    model_name: str, width: int, args: argparse.Namespace, device: torch.device, worker: JaxWorker | None
) -> dict[str, Any]:
    base, x_cpu, y_cpu = make_problem(model_name, width, args)
    x, y = x_cpu.to(device), y_cpu.to(device)
    record: dict[str, Any] = {
        "model": model_name,
        "width": width if model_name == "vgg11" else None,
        "parameters": sum(p.numel() for p in base.parameters()),
        "variants": {},
        "skipped": {},
    }
    keys = [k for k in "abc" if k in args.variants]
    plan = [(k, False) for k in keys] + ([(k, True) for k in keys] if args.compile else [])
    variants: list[Any] = []
    for key, compiled in plan:
        name = key + ("+compile" if compiled else "")
        graphs_before, breaks_before = dynamo_counters()
        try:
            variant = make_torch_variant(key, base, x, y, args, device, compiled)
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
            variant.warm_up(args.warmup)
            if before is not None:
                # What compilation / CUDA-graph capture left allocated (graph memory pools live here).
                variant.info["resident_after_warmup_mib"] = (torch.cuda.memory_allocated(device) - before) / MiB
            variants.append(variant)
        except Exception as error:  # noqa: BLE001 - e.g. torch.compile cannot trace it: report and go on
            record["skipped"][name] = f"FAILED: {type(error).__name__}: {str(error).strip().splitlines()[0][:400]}"
            if args.verbose:
                traceback.print_exc()
            continue
        if compiled:
            graphs_after, breaks_after = dynamo_counters()
            variant.info["dynamo_graphs"] = graphs_after - graphs_before
            variant.info["dynamo_graph_break_reasons"] = [
                reason.strip().splitlines()[0][:300]
                for reason, count in breaks_after.items()
                if count > breaks_before.get(reason, 0) and reason.strip()
            ][:5]

    jax_keys = [k for k in "de" if k in args.variants]
    if jax_keys:
        if worker is None or worker.error:
            reason = worker.error if worker is not None else "no JAX worker"
            record["skipped"].update({k: f"skipped: {reason}" for k in jax_keys})
        else:
            try:
                infos = worker.ask("setup", model_name, width)
                variants += [RemoteVariant(worker, key, info) for key, info in infos.items()]
            except RuntimeError as error:
                record["skipped"].update({k: f"FAILED: {error}" for k in jax_keys})

    w0 = {name: p.detach().clone() for name, p in base.named_parameters()}
    record["agreement_with_c"] = agreement(variants, w0)

    # Interleaved timing.
    wall: dict[str, list[float]] = {v.name: [] for v in variants}
    cpu: dict[str, list[float]] = {v.name: [] for v in variants}
    rounds = max(1, math.ceil(args.steps / args.block))
    for r in range(rounds):
        shift = r % max(1, len(variants))
        for variant in variants[shift:] + variants[:shift]:
            times, cpu_times = variant.run_block(args.block)
            wall[variant.name] += times
            cpu[variant.name] += cpu_times

    host = HostMemory() if device.type == "cpu" and not args.no_memory else None
    for variant in variants:
        ms = sorted(t * 1e3 for t in wall[variant.name])
        entry: dict[str, Any] = {
            "label": VARIANT_LABELS[variant.key],
            "compiled": variant.compiled,
            "median_ms": statistics.median(ms),
            "q1_ms": ms[len(ms) // 4],
            "q3_ms": ms[(3 * len(ms)) // 4],
            "min_ms": ms[0],
            "timed_steps": len(ms),
        }
        if device.type == "cpu":
            entry["cpu_ms"] = statistics.median(t * 1e3 for t in cpu[variant.name])
        entry.update(variant.info)
        if not args.no_memory:
            entry.update(variant.memory(host))
        entry["final_loss"] = variant.final_loss()
        # A run that diverged computed on inf/NaN for part of its steps: its timing means nothing.
        entry["diverged"] = not math.isfinite(entry["final_loss"])
        if entry["diverged"]:
            print(f"warning: {model_name} {variant.name} diverged (final loss {entry['final_loss']}); lower --lr",
                  file=sys.stderr)
        record["variants"][variant.name] = entry
    if host is not None:
        host.close()
    add_ratios(record["variants"])
    return record


def add_ratios(entries: dict[str, dict[str, Any]]) -> None:
    """ratio_to_a: over the plain step in the same execution mode; ratio_to_d: over the JAX jit twin."""
    for entry in entries.values():
        plain = entries.get("a+compile" if entry["compiled"] else "a")
        jax_twin = entries.get("d")
        entry["ratio_to_a"] = entry["median_ms"] / plain["median_ms"] if plain else None
        entry["ratio_to_d"] = entry["median_ms"] / jax_twin["median_ms"] if jax_twin else None
        if "cpu_ms" in entry:
            entry["cpu_ratio_to_a"] = entry["cpu_ms"] / plain["cpu_ms"] if plain else None
            entry["cpu_ratio_to_d"] = entry["cpu_ms"] / jax_twin["cpu_ms"] if jax_twin else None


# ---------------------------------------------------------------------------------------------- output


class BackgroundLoad:
    """Share of all CPU time used by processes *outside* this run since construction (Linux; else None).

    This run = this process, its JAX worker, torch.compile's worker pools: every live descendant, plus
    the children it has already reaped.
    """

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _stat(pid: str) -> list[str]:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()

    @classmethod
    def _own_ticks(cls) -> float:
        me = str(os.getpid())
        parents: dict[str, str] = {}
        ticks: dict[str, float] = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError, IndexError, ValueError):
                values = cls._stat(pid)
                parents[pid] = values[1]
                # utime + stime + cutime + cstime (the last two: its children it has reaped)
                ticks[pid] = sum(float(v) for v in values[11:15])
        total = 0.0
        for pid in ticks:
            node = pid
            while node in parents and node != me and node not in ("0", "1"):
                node = parents[node]
            if node == me:
                total += ticks[pid]
        return total

    @classmethod
    def _sample(cls) -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as stat:
                fields = [float(v) for v in stat.readline().split()[1:]]
            busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
            return time.monotonic(), busy, cls._own_ticks()
        except (OSError, IndexError, ValueError):
            return None

    def share(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None or end[0] <= self.start[0]:
            return None
        capacity = (end[0] - self.start[0]) * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
        return min(1.0, max(0.0, ((end[1] - self.start[1]) - (end[2] - self.start[2])) / capacity))


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cores_available": _cores(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def format_table(results: dict[str, Any]) -> str:
    env, settings = results["environment"], results["settings"]
    lines = [
        f"device {env['device']} ({env.get('gpu') or env['cpu']}, {env['cpu_count']} CPUs, torch threads "
        f"{env['torch_threads']}), torch {env['torch']}, jax {env.get('jax')}; batch {settings['batch_size']}, "
        f"fp32{', TF32 allowed' if settings.get('tf32') else ''}",
    ]
    if env.get("background_cpu_share_during") is not None:
        before = env.get("background_cpu_share_before")
        lines.append(
            "other processes' share of all CPU time: "
            + (f"{before:.0%} just before, " if before is not None else "")
            + f"{env['background_cpu_share_during']:.0%} during the run"
        )
    header = (
        f"{'model':<14}{'variant':<40}{'median ms':>11}{'IQR ms':>20}{'x (a)':>7}{'x (d)':>7}"
        f"{'CPU ms':>10}{'step MiB':>9}"
    )
    lines += [header, "-" * len(header)]
    for record in results["runs"]:
        model = record["model"] + (f" x{record['width']}" if record["width"] else "")
        for entry in record["variants"].values():
            label = entry["label"] + (" +compile" if entry["compiled"] else "")
            iqr = f"{entry['q1_ms']:.2f}-{entry['q3_ms']:.2f}"
            ra = "-" if entry["ratio_to_a"] is None else f"{entry['ratio_to_a']:.2f}"
            rd = "-" if entry["ratio_to_d"] is None else f"{entry['ratio_to_d']:.2f}"
            cpu = "-" if entry.get("cpu_ms") is None else f"{entry['cpu_ms']:.1f}"
            mem = "-" if entry.get("step_mib") is None else f"{entry['step_mib']:.1f}"
            lines.append(f"{model:<14}{label:<40}{entry['median_ms']:>11.2f}{iqr:>20}{ra:>7}{rd:>7}{cpu:>10}{mem:>9}")
            if entry.get("diverged"):
                lines.append(f"{'':<16}DIVERGED (final loss {entry['final_loss']}): this timing is not meaningful")
            if entry.get("dynamo_graphs", 1) > 1 or entry.get("dynamo_graph_break_reasons"):
                reasons = "; ".join(entry.get("dynamo_graph_break_reasons", []))[:150]
                why = f": {reasons}" if reasons else ""
                lines.append(f"{'':<16}torch.compile made {entry['dynamo_graphs']} graphs{why}")
        for name, reason in record["skipped"].items():
            label = VARIANT_LABELS[name[0]] + (" +compile" if "+" in name else "")
            lines.append(f"{model:<14}{label:<40}  {reason[:220]}")
        if record.get("agreement_with_c"):
            text = ", ".join(f"{k} {v:.1e}" for k, v in record["agreement_with_c"].items())
            lines.append(f"{'':<16}parameters after warm-up vs (c), max|w-w_c|/max|w_c-w0|: {text}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--models", default="mlp,vgg11", help="comma list of mlp, vgg11")
    parser.add_argument("--width", default="1", help="VGG-11 width factor(s), comma list, e.g. 1,4")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per variant (all rounds together)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant before timing")
    parser.add_argument("--block", type=int, default=5, help="timed steps per variant per interleaving round")
    parser.add_argument("--compile", action="store_true", help="also run (a), (b), (c) under torch.compile")
    parser.add_argument("--variants", default="abcde", help="which of the variants a b c d e to run")
    parser.add_argument("--json", default=None, help="output file (default benchmarks/results/twin_step-<device>.json)")
    parser.add_argument("--quick", action="store_true", help="toy sizes, for a smoke test (seconds on any machine)")
    parser.add_argument("--mlp-hidden", type=int, default=1024, help="hidden width of the MLP")
    parser.add_argument("--vgg-base-width", type=int, default=64, help="VGG-11 first-stage channels at width 1")
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="SGD learning rate (1e-2 makes the MLP's tangent model diverge on one batch)")
    parser.add_argument("--tf32", action="store_true", help="CUDA: allow TF32 in torch and JAX matmuls/convolutions")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads, and the number of cores the JAX worker may use "
                        "(default: both use all cores)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failed variants")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size = min(args.batch_size, 8)
        args.mlp_hidden = min(args.mlp_hidden, 32)
        args.vgg_base_width = min(args.vgg_base_width, 2)
        args.steps = min(args.steps, 2)
        args.warmup = min(args.warmup, 1)
        args.block = min(args.block, 1)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        args.widths = [int(w) for w in str(args.width).split(",") if w.strip()]
    except ValueError:
        parser.error(f"--width takes integers, got {args.width!r}")
    if set(args.variants) - set("abcde"):
        parser.error(f"--variants takes letters from abcde, got {args.variants!r}")
    for name in args.models:
        if name not in ("mlp", "vgg11"):
            parser.error(f"unknown model {name!r}: use mlp, vgg11")
    if args.steps < 1 or args.block < 1 or args.warmup < 0:
        parser.error("--steps and --block must be at least 1, --warmup at least 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    else:
        glibc_policy("steady")
    results: dict[str, Any] = {
        "benchmark": "twin_step",
        "command": " ".join(["python", "benchmarks/twin_step.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": {
            "batch_size": args.batch_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "block": args.block,
            "compile": args.compile,
            "quick": args.quick,
            "lr": args.lr,
            "mlp_hidden": args.mlp_hidden,
            "vgg_base_width": args.vgg_base_width,
            "tf32": args.tf32 if device.type == "cuda" else None,
            "dtype": "float32",
            "loss": "half_squared_error on one-hot targets",
            "optimizer": "SGD, no momentum",
        },
        "environment": environment(device),
        "runs": [],
    }
    if device.type == "cpu" and not args.quick:
        probe = BackgroundLoad()
        time.sleep(1.0)
        results["environment"]["background_cpu_share_before"] = probe.share()
    load = BackgroundLoad()
    worker = JaxWorker(args) if any(k in args.variants for k in "de") else None
    results["environment"]["jax"] = "not requested" if worker is None else worker.version or worker.error
    if worker is not None and worker.error is None and device.type == "cpu":
        results["environment"]["jax_worker_cores"] = worker.cores
    try:
        for model_name in args.models:
            for width in args.widths if model_name == "vgg11" else [1]:
                results["runs"].append(run_model(model_name, width, args, device, worker))
                if args.verbose:
                    print(f"done: {model_name} width {width}", file=sys.stderr)
        # Other processes' share of all cores while this ran (1.0: every core busy with someone else).
        results["environment"]["background_cpu_share_during"] = load.share()
    finally:
        if worker is not None and worker.error is None:
            worker.close()

    print(format_table(results))
    here = os.path.dirname(os.path.abspath(__file__))
    path = args.json or os.path.join(here, "results", f"twin_step-{device.type}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as out:
        json.dump(results, out, indent=2)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
