"""What an epoch of the paper's CNN experiment costs: VGG-11 ×k on CIFAR-shaped synthetic data.

Cases, each one Lightning training epoch (``Trainer(max_epochs=1)``, no validation):

* ``data only``   - the data path alone (device-resident tensors, augmentation on the device): how fast
                    batches can be produced, to show an epoch is bound by compute and not loading;
* ``standard``    - LazyClassifier(mode="standard");
* ``standard+twin`` - the same with LazyTrainingMonitor's linearized twin trained in lock-step;
* ``linearized``  - LazyClassifier(mode="linearized"), the exact tangent model.

For each: steady-state images/s (after ``--warmup`` batches), the epoch's wall time (first batch start to
last batch end, so one-off set-up such as the monitor's measures at w0 is excluded) and peak memory (CUDA
allocator peak on a GPU; the process's peak resident set on CPU, which only grows).

On a GPU the defaults are the real sizes (width 4, 50 000 images, batch 128) and everything fits in about
five minutes on a recent card; on CPU the defaults are a toy (smoke test, seconds). Prints a table and writes
JSON under ``benchmarks/results/``.

    python benchmarks/gpu_cifar.py                   # auto: real size on CUDA, toy size on CPU
    python benchmarks/gpu_cifar.py --width 2 --precision 64-true
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from lightning_lazy.data.cifar10 import SyntheticCIFAR10DataModule
from lightning_lazy.models.vgg import VGG11
from lightning_lazy.module import LazyClassifier

CASES = ("data only", "standard", "standard+twin", "linearized")


class EpochTimer(pl.Callback):
    """Times the training batches of one epoch, with device synchronization at the measured points."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.steady_start = self.end = 0.0
        self.batches = 0
        self.images = 0
        self.steady_images = 0

    def _sync(self, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
                             ) -> None:
        if batch_idx == 0 or batch_idx == self.warmup:
            self._sync(pl_module)
            now = time.perf_counter()
            if batch_idx == 0:
                self.start = now
            if batch_idx == self.warmup:
                self.steady_start = now

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        n = batch[0].shape[0]
        self.batches += 1
        self.images += n
        if batch_idx >= self.warmup:
            self.steady_images += n
        if batch_idx == trainer.num_training_batches - 1:
            self._sync(pl_module)
            self.end = time.perf_counter()


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _data_only(dm: SyntheticCIFAR10DataModule, device: torch.device, warmup: int, dtype: torch.dtype
               ) -> dict[str, float]:
    """One pass over the training loader, touching every batch on the device as a model would."""
    dm.setup("fit")
    # No trainer here: put the tensors on the device ourselves, as the trainer-attached module would.
    images, labels = dm.split("train")
    from lightning_lazy.data.cifar10 import DeviceTensorLoader

    loader = DeviceTensorLoader(images.to(device), labels.to(device), batch_size=dm.batch_size, shuffle=True,
                                augment=dm.augment, padding=dm.padding, mean=dm.mean, std=dm.std)
    checksum = torch.zeros((), device=device, dtype=dtype)
    start = steady = time.perf_counter()
    steady_images = total = 0
    for i, (x, _) in enumerate(loader):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            steady = time.perf_counter()
        checksum += x.to(dtype).sum()  # consume the batch so nothing is skipped
        total += x.shape[0]
        steady_images += x.shape[0] if i >= warmup else 0
    checksum.item()
    end = time.perf_counter()
    return {"epoch_s": end - start, "images_per_s": steady_images / max(end - steady, 1e-12), "images": total}


def run_case(case: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    dm = SyntheticCIFAR10DataModule(num_train=args.num_train, num_test=args.batch_size, batch_size=args.batch_size,
                                    device_tensors=device.type == "cuda", num_workers=0)
    dtype = torch.float64 if args.precision.startswith("64") else torch.float32
    if case == "data only":
        result = _data_only(dm, device, args.warmup, dtype)
        result["peak_memory_mib"] = _peak_memory_mib(device)
        return result
    mode = "linearized" if case == "linearized" else "standard"
    model = LazyClassifier(VGG11(width=args.width, base_width=args.base_width), mode=mode, lr=0.01)
    timer = EpochTimer(args.warmup)
    callbacks: list[pl.Callback] = []
    if case == "standard+twin":
        from lightning_lazy.callback import LazyTrainingMonitor

        # This case prices the twin's lock-step training: the per-epoch measures are made rare, and κ and
        # the NTK (the costly one-off measures at w0) are off; ‖Dh(w0)‖ is still measured once, before timing.
        callbacks.append(LazyTrainingMonitor(every_n_epochs=10**6, probe_size=args.probe_size,
                                             kappa_probe_size=min(64, args.probe_size), track_tangent=True,
                                             measure_kappa=False, measure_ntk=False))
    callbacks.append(timer)  # last: its batch-end hook runs after the twin's step
    trainer = pl.Trainer(
        accelerator=device.type, devices=1, max_epochs=1, precision=args.precision, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, callbacks=callbacks,
    )
    trainer.fit(model, dm)
    steady = timer.end - timer.steady_start
    return {
        "epoch_s": timer.end - timer.start,
        "images_per_s": timer.steady_images / steady if steady > 0 else float("nan"),
        "images": timer.images,
        "peak_memory_mib": _peak_memory_mib(device),
        "parameters": sum(p.numel() for p in model.backbone.parameters()),
    }


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--width", type=int, default=4 if cuda else 1, help="VGG-11 width factor k")
    parser.add_argument("--base_width", type=int, default=64 if cuda else 4, help="first-stage channels at k = 1")
    parser.add_argument("--num_train", type=int, default=50_000 if cuda else 256, help="images per epoch")
    parser.add_argument("--batch_size", type=int, default=128 if cuda else 64)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "64-true"])
    parser.add_argument("--warmup", type=int, default=10 if cuda else 1, help="batches left out of images/s")
    parser.add_argument("--probe_size", type=int, default=128 if cuda else 16, help="monitor probe (twin case)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's); 1 gives stable numbers on a shared machine")
    parser.add_argument("--time_budget", type=float, default=280.0,
                        help="seconds; cases not started before it runs out are skipped (default 280)")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/gpu_cifar_<device>.json)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not cuda:
        parser.error("--device cuda but no CUDA device is available")
    if args.num_train < args.batch_size * (args.warmup + 1):
        parser.error("--num_train must cover at least warmup + 1 batches")
    if device.type == "cuda":
        # TF32 for float32 convolutions and matmuls, as a user would run; float64 is unaffected.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    started = time.perf_counter()
    results: dict[str, Any] = {}
    for case in args.cases:
        if time.perf_counter() - started > args.time_budget:
            results[case] = {"skipped": f"time budget of {args.time_budget:.0f} s spent"}
            continue
        print(f"[gpu_cifar] {case} ...", flush=True)
        try:
            results[case] = run_case(case, args, device)
        except Exception as err:  # a missing piece (e.g. the monitor) must not hide the other numbers
            results[case] = {"error": f"{type(err).__name__}: {err}"}
    total = time.perf_counter() - started

    base = results.get("standard", {}).get("images_per_s")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"\nVGG-11 x{args.width} (base width {args.base_width}), {args.num_train} images, batch {args.batch_size}, "
          f"{args.precision}, {device} ({name})")
    print(f"{'case':<15} {'images/s':>10} {'epoch s':>9} {'peak MiB':>9} {'cost vs standard':>17}")
    for case, r in results.items():
        if "images_per_s" not in r:
            print(f"{case:<15} {r.get('error') or r.get('skipped')}")
            continue
        ratio = f"{base / r['images_per_s']:.2f}x" if base and case != "data only" else "-"
        print(f"{case:<15} {r['images_per_s']:>10.0f} {r['epoch_s']:>9.2f} {r['peak_memory_mib']:>9.0f} {ratio:>17}")
    print(f"total {total:.1f} s")

    out = Path(args.output) if args.output else Path(__file__).parent / "results" / f"gpu_cifar_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": name,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "total_s": total, **vars(args),
    }
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {out}")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
