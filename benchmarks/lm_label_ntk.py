"""The label-logit NTK of a GPT-2 with its real vocabulary: from the LM head's input (no ``[N, T, V]`` logits) against
the dense logits gathered (the way before), side by side in one run, and one whole measurement, in plain training
steps of the same model (forward, cross-entropy, backward, SGD step; batch 128 unless ``--batch``).

    OMP_NUM_THREADS=1 python benchmarks/lm_label_ntk.py --output benchmarks/results/lm_label_ntk-cpu.json

The model: ``transformers.GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_embd=64, n_layer=2, n_head=2,
n_positions=32))``, random init, tied embeddings; random token sequences of 32 positions, labels the next token
(−100 at the last). The probe: the largest the memory check allows (``ProbeMemoryError.largest``), at most 256;
the NTK and κ on its first 16 (or fewer) examples, the monitor's defaults otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--positions", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="plain steps timed")
    parser.add_argument("--rounds", type=int, default=2, help="kernels of each kind, alternated")
    parser.add_argument("--dense", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the kernel of the dense logits gathered (the way before; at 32 positions "
                             "and more it can hold over 10 GB)")
    parser.add_argument("--measurement", action=argparse.BooleanOptionalAction, default=True,
                        help="also time one whole measurement at fit start and one after (κ included)")
    parser.add_argument("--output")
    args = parser.parse_args()
    import torch
    import torch.nn.functional as F
    import transformers

    from lightning_lazy.scaling import IGNORE_INDEX
    from lightning_lazy.watch.probe import LazinessProbe, ProbeMemoryError
    from lightning_lazy.watch.twin import Watched

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=args.vocab, n_embd=64, n_layer=2, n_head=2, n_positions=args.positions)
    model = transformers.GPT2LMHeadModel(config)
    generator = torch.Generator().manual_seed(0)

    def batch(n: int) -> tuple[dict, torch.Tensor]:
        ids = torch.randint(0, args.vocab, (n, args.positions), generator=generator)
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, :-1] = ids[:, 1:]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels

    x, y = batch(args.batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits = model(**x).logits
        F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
        optimizer.step()

    def cpu_time(fn, repeats: int) -> float:
        samples = []
        for _ in range(repeats):
            started = time.process_time()
            fn()
            samples.append(time.process_time() - started)
        return statistics.median(samples)

    step()
    unit = cpu_time(step, args.repeats)
    px, py = batch(256)
    try:
        LazinessProbe(Watched(model), px, py)
        size = 256
    except ProbeMemoryError as error:
        size = error.largest
    px, py = {k: v[:size] for k, v in px.items()}, py[:size]
    probe = LazinessProbe(Watched(model), px, py)
    names = [name for name, _ in probe.network.named_parameters()]
    params = probe.params(names)
    head = probe._label_head()
    kernels, seconds = {}, {}
    for label in (("head_input", "dense_logits") if args.dense else ("head_input",)) * args.rounds:  # alternated
        probe._head = head if label == "head_input" else None
        started = time.process_time()
        kernels[label] = probe.kernel(params)
        seconds.setdefault(label, []).append(time.process_time() - started)
    probe._head = head
    difference = float((kernels["head_input"] - kernels["dense_logits"]).norm() / kernels["dense_logits"].norm()) \
        if args.dense else float("nan")
    fit_start = epoch_end = float("nan")
    if args.measurement:
        started = time.process_time()
        probe.measure_initial(names)
        fit_start = time.process_time() - started
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3 * torch.randn_like(p))
        started = time.process_time()
        probe.measure(names, time=1.0)
        epoch_end = time.process_time() - started
    result = {
        "plain_step_cpu_seconds": unit, "batch": args.batch, "probe_size": size, "ntk_probe": probe.ntk_probe_size,
        "kernel_shape": list(kernels["head_input"].shape), "head": type(head).__name__ if head is not None else None,
        "kernel_cpu_seconds": {k: statistics.median(v) for k, v in seconds.items()},
        "kernel_samples": seconds, "relative_difference": difference,
        "measurement_cpu_seconds": {"fit_start": fit_start, "epoch_end": epoch_end},
        "timings_wall": probe.timings,
    }
    result["in_steps"] = {"kernel_" + k: v / unit for k, v in result["kernel_cpu_seconds"].items()}
    result["in_steps"].update({k: v / unit for k, v in result["measurement_cpu_seconds"].items()})
    print(json.dumps({k: result[k] for k in ("plain_step_cpu_seconds", "probe_size", "kernel_shape", "head",
                                             "kernel_cpu_seconds", "relative_difference", "in_steps")}, indent=1))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
