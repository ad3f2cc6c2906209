"""timm's ViT-tiny at CIFAR shape (``vit_tiny_patch16_224``, image 32, patch 4, 10 classes, random init) under the
monitor's measures at their defaults (probe 256, κ and NTK on 16, per-layer on 64): the fit-start measurement and
one at moved weights, whole and thinned (``LazinessProbe.measure(parts=...)``), in CPU time over the CPU time of one
plain training step (batch 128, ½ squared error, SGD), one thread.

    OMP_NUM_THREADS=1 python benchmarks/vit_monitor_cost.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this tree's lightning_lazy

import time, torch, timm
from lightning_lazy.watch.probe import LazinessProbe
from lightning_lazy.watch.twin import TangentTwin
from lightning_lazy.scaling import half_squared_error
torch.manual_seed(0)
m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=10)
x = torch.randn(128, 3, 32, 32); y = torch.randint(0, 10, (128,))
opt = torch.optim.SGD(m.parameters(), lr=0.0)
def step():
    opt.zero_grad(set_to_none=True); half_squared_error(m(x), y).backward(); opt.step()
step(); c=time.process_time(); [step() for _ in range(2)]; sc=(time.process_time()-c)/2
print(f"plain step {sc:.3f}s cpu", flush=True)
px = torch.randn(256, 3, 32, 32); py = torch.randint(0, 10, (256,))
names = [n for n, p in m.named_parameters()]
c=time.process_time(); probe = LazinessProbe(m, px, py); probe.measure_initial(names); cpu=time.process_time()-c
print(f"fit start {cpu:.1f}s cpu = {cpu/sc:.1f} steps", flush=True)
twin = TangentTwin(m, torch.optim.SGD(m.parameters(), lr=0.0), half_squared_error)
with torch.no_grad():
    for p in m.parameters(): p.add_(1e-3*torch.randn_like(p))
    for (n,p),(n2,q) in zip(m.named_parameters(), twin.model.module.named_parameters()): q.copy_(p)
for parts in ({"kappa": False, "ntk": False}, {"ntk": False}, {"kappa": False}, None):
    c=time.process_time(); probe.measure(names, time=1.0, twin=twin, parts=parts); cpu=time.process_time()-c
    print(f"epoch end parts={parts}: {cpu:.1f}s cpu = {cpu/sc:.1f} steps", {k: round(v,1) for k,v in probe.timings['last'].items()}, flush=True)
