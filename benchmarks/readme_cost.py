"""What LazyTrainingMonitor costs on the README's own example: wall time of the snippet with and without it.

Runs the code block of the README's "Add it to your trainer" section as it stands (an MLP 64-256-256-10 on
scikit-learn's digits, SGD with momentum, 29 steps per epoch, a TensorBoard logger), in a temporary folder,
once as written (the monitor at its defaults), once with the monitor's line replaced by ``callbacks=[]``,
and once with ``LazyTrainingMonitor(loss="cross_entropy", track_tangent=False)`` (no twin), and once with
``floor``: a bare callback that only takes the exact tangent step any lock-step twin must take at each training
step (one forward-mode pass through the network at w0 with tangent w̄ − w0, its backward, an SGD step), with no
check, measure, log or figure: what following every step exactly costs at least in eager PyTorch on this
example. Alternating ``--repeats`` times after one warm-up run (imports, first calls); the ratios of the medians
are the costs. ``--profile`` prints where the monitored run spends its time (cProfile, cumulative). Writes JSON.

    OMP_NUM_THREADS=1 python benchmarks/readme_cost.py [--repeats 1] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import platform
import pstats
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from pytorch_lightning import Callback

ROOT = Path(__file__).resolve().parents[1]
CPU_SECONDS: list[float] = []
MONITOR_LINE = 'callbacks=[LazyTrainingMonitor(loss="cross_entropy")],'
VARIANTS = {
    "without": "callbacks=[],",
    "with": MONITOR_LINE,
    "without_twin": 'callbacks=[LazyTrainingMonitor(loss="cross_entropy", track_tangent=False)],',
    "floor": "callbacks=[BareTangentStep()],",
}


class BareTangentStep(Callback):
    """The least a lock-step twin computes per training step: w̄ ← w̄ − SGD(∇ℓ(f(w0) + J(w0)(w̄ − w0))).

    The README's optimizer (SGD, lr 0.05, momentum 0.9) on the tangent model of ``pl_module.net``, by
    ``torch.autograd.forward_ad`` (primal w0, tangent w̄ − w0) and one backward; nothing else.
    """

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.w0 = {k: v.detach().clone() for k, v in pl_module.net.named_parameters()}
        self.w = {k: v.detach().clone().requires_grad_() for k, v in pl_module.net.named_parameters()}
        self.optimizer = torch.optim.SGD(self.w.values(), lr=0.05, momentum=0.9)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.optimizer.zero_grad()
        with fwAD.dual_level():
            duals = {k: fwAD.make_dual(self.w0[k], self.w[k] - self.w0[k]) for k in self.w0}
            primal, tangent = fwAD.unpack_dual(torch.func.functional_call(pl_module.net, duals, (x,)))
        F.cross_entropy(primal + tangent, y).backward()
        self.optimizer.step()


def readme_snippet(readme: Path = ROOT / "README.md") -> str:
    """The first ```python block of the README's "Add it to your trainer" section."""
    text = readme.read_text()
    section = text[text.index("## Add it to your trainer"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    if match is None or MONITOR_LINE not in match.group(1):
        raise SystemExit(f"README.md's 'Add it to your trainer' snippet no longer holds {MONITOR_LINE!r}")
    return match.group(1)


def run_seconds(code: str, profile: cProfile.Profile | None = None) -> float:
    """Wall seconds of ``exec(code)`` in a fresh temporary folder (its logs land there), output silenced; the
    process's CPU seconds of it go to ``CPU_SECONDS`` (all threads: on a loaded machine, the work done)."""
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        os.chdir(folder)
        try:
            start, cpu = time.perf_counter(), time.process_time()
            if profile is not None:
                profile.enable()
            exec(compile(code, "README.md", "exec"), {"__name__": "__readme__", "BareTangentStep": BareTangentStep})
            if profile is not None:
                profile.disable()
            CPU_SECONDS.append(time.process_time() - cpu)
            return time.perf_counter() - start
        finally:
            os.chdir(here)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="print the monitored run's cProfile (top 40, cumulative)")
    parser.add_argument("--json", default="benchmarks/results/readme_cost.json")
    args = parser.parse_args()
    snippet = readme_snippet()
    codes = {name: snippet.replace(MONITOR_LINE, line) for name, line in VARIANTS.items()}
    run_seconds(codes["with"])  # warm-up: imports, first calls, sklearn's data
    seconds: dict[str, list[float]] = {name: [] for name in codes}
    cpu: dict[str, list[float]] = {name: [] for name in codes}
    profile = cProfile.Profile() if args.profile else None
    for _ in range(args.repeats):  # alternating: a slow spell of the machine hits every variant
        for name, code in codes.items():
            seconds[name].append(run_seconds(code, profile if name == "with" else None))
            cpu[name].append(CPU_SECONDS[-1])
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpu.items()}
    ratios = {name: medians[name] / medians["without"] for name in codes}
    print(f"README snippet, {torch.get_num_threads()} thread(s), median of {args.repeats}: without the monitor "
          f"{medians['without']:.2f} s; with it {medians['with']:.2f} s ({ratios['with']:.2f}x); with "
          f"track_tangent=False {medians['without_twin']:.2f} s ({ratios['without_twin']:.2f}x); the bare tangent step "
          f"alone (the floor of any exact lock-step twin) {medians['floor']:.2f} s ({ratios['floor']:.2f}x)")
    print("CPU seconds (process, median): " + ", ".join(
        f"{name} {cpu_medians[name]:.2f} ({cpu_medians[name] / cpu_medians['without']:.2f}x, "
        f"{cpu_medians[name] / cpu_medians['floor']:.2f}x the floor)" for name in codes))
    if profile is not None:
        pstats.Stats(profile).sort_stats("cumulative").print_stats(40)
    result = {"args": vars(args), "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "seconds": seconds,
              "median_seconds": medians, "ratio": ratios, "cpu_seconds": cpu, "median_cpu_seconds": cpu_medians}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
