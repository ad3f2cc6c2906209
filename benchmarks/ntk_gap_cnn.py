"""The empirical NTK ``[N·K, N·K]`` of a small CNN with global average pooling (64 inputs, 10 outputs):
``diagnostics.empirical_ntk`` (``implementation="auto"``, structured derivatives) against per-example
``vmap(jacrev)`` Jacobians contracted (J Jᵀ), alternated in one run, one thread, CPU time (medians).

    OMP_NUM_THREADS=1 python benchmarks/ntk_gap_cnn.py --output benchmarks/results/ntk_gap_cnn-cpu.json

The CNN: Conv(3→C, 3×3, pad 1)-ReLU-Conv(C→C)-ReLU-Conv(C→C)-ReLU-AdaptiveAvgPool2d(1)-Linear(C→10), C = 64
(``--channels``), 3×32×32 inputs (``--size``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this tree's lightning_lazy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--inputs", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output")
    args = parser.parse_args()
    import torch
    from torch import nn
    from torch.func import functional_call, jacrev, vmap

    from lightning_lazy import diagnostics

    torch.set_num_threads(1)
    torch.manual_seed(0)
    c = args.channels
    model = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(c, 10)).eval()
    x = torch.randn(args.inputs, 3, args.size, args.size)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def jacrev_contracted() -> torch.Tensor:
        def single(p, example):
            return functional_call(model, p, (example.unsqueeze(0),))[0]

        jac = vmap(jacrev(single), in_dims=(None, 0))(params, x)
        j = torch.cat([v.reshape(len(x), 10, -1) for v in jac.values()], 2).reshape(len(x) * 10, -1)
        return j @ j.T

    contenders = {"empirical_ntk": lambda: diagnostics.empirical_ntk(model, x), "vmap_jacrev": jacrev_contracted}
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    walls: dict[str, list[float]] = {k: [] for k in contenders}
    kernels = {}
    for repeat in range(args.repeats + 1):  # the first round warms up, not counted
        for name in (contenders if repeat % 2 == 0 else reversed(list(contenders))):
            started, wall = time.process_time(), time.perf_counter()
            kernels[name] = contenders[name]()
            if repeat:
                samples[name].append(time.process_time() - started)
                walls[name].append(time.perf_counter() - wall)
    cpu = {k: statistics.median(v) for k, v in samples.items()}
    result = {"cpu_seconds": cpu, "wall_seconds": {k: statistics.median(v) for k, v in walls.items()},
              "samples": samples, "ratio_vmap_jacrev_over_ours": cpu["vmap_jacrev"] / cpu["empirical_ntk"],
              "relative_difference": float((kernels["empirical_ntk"] - kernels["vmap_jacrev"]).norm()
                                           / kernels["vmap_jacrev"].norm()),
              "parameters": sum(p.numel() for p in params.values()), "settings": vars(args)}
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
