"""``empirical_ntk`` of another tree of this project (e.g. main) and of this one, alternated in one process, one thread,
CPU time (medians): a before/after comparison that load on a shared machine moves alike for both.

    git archive main | tar -x -C /tmp/base
    OMP_NUM_THREADS=1 python benchmarks/ntk_two_trees.py --base /tmp/base --model vgg11 --inputs 16

The other tree's ``lightning_lazy`` is copied into a temporary folder under another package name (its absolute
imports renamed), so both can be imported at once. Models (10 outputs, 3×32×32 inputs): ``gap_cnn`` (the CNN of
``ntk_gap_cnn.py``), ``mlp`` (3072-1024-1024-10, as in ``monitor_cost.py``), ``vgg11`` (×1), ``vgg11_8`` (×8) and
``resnet18`` (torchvision).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _import_renamed(tree: Path, folder: Path):
    """The package ``lightning_lazy`` of ``tree`` imported as ``lightning_lazy_base``."""
    target = folder / "lightning_lazy_base"
    shutil.copytree(tree / "lightning_lazy", target)
    for path in target.rglob("*.py"):
        path.write_text(re.sub(r"\blightning_lazy\b", "lightning_lazy_base", path.read_text()))
    sys.path.insert(0, str(folder))
    import lightning_lazy_base.diagnostics

    return lightning_lazy_base.diagnostics


def _model(name: str):
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "gap_cnn":
        c = 64
        return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(c, 10))
    if name == "mlp":  # monitor_cost.py's
        return nn.Sequential(nn.Flatten(), nn.Linear(3072, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                             nn.Linear(1024, 10))
    if name in ("vgg11", "vgg11_8"):
        from lightning_lazy.models.vgg import VGG11

        return VGG11(base_width=64 if name == "vgg11" else 8)
    if name == "resnet18":
        from torchvision.models import resnet18

        return resnet18(num_classes=10)
    raise ValueError(f"unknown model {name!r}: use gap_cnn, mlp, vgg11, vgg11_8 or resnet18")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="root of the other tree (holding lightning_lazy/)")
    parser.add_argument("--model", default="gap_cnn")
    parser.add_argument("--inputs", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    base_root = Path(args.base).resolve()
    if not (base_root / "lightning_lazy").is_dir():
        raise SystemExit(f"--base {args.base}: no lightning_lazy/ there; pass the root of a tree of this project")
    sys.path.insert(0, str(ROOT))
    import torch

    from lightning_lazy import diagnostics

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        base = _import_renamed(base_root, Path(folder))
        model = _model(args.model).eval()
        x = torch.randn(args.inputs, 3, 32, 32, generator=torch.Generator().manual_seed(2))
        contenders = {"base": lambda: base.empirical_ntk(model, x), "this": lambda: diagnostics.empirical_ntk(model, x)}
        for run in contenders.values():  # warm-up
            run()
        samples: dict[str, list[float]] = {k: [] for k in contenders}
        kernels = {}
        for repeat in range(args.repeats):
            for name in contenders if repeat % 2 == 0 else list(reversed(list(contenders))):
                started = time.process_time()
                kernels[name] = contenders[name]()
                samples[name].append(time.process_time() - started)
    median = {k: statistics.median(v) for k, v in samples.items()}
    difference = float((kernels["this"] - kernels["base"]).norm() / kernels["base"].norm())
    print(f"{args.model}, {args.inputs} inputs: base {median['base']:.3f} s, this {median['this']:.3f} s CPU "
          f"(base ÷ this {median['base'] / median['this']:.2f}×; samples "
          f"{ {k: [round(s, 2) for s in v] for k, v in samples.items()} }); relative difference {difference:.1e}")


if __name__ == "__main__":
    main()
