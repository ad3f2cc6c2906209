"""Small shared helpers for the maths files: frozen parameter snapshots and mode switches.

Lightning-free; imported by ``scaling``, ``tangent`` and ``diagnostics`` only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

_BATCHNORM_TYPES = (nn.modules.batchnorm._NormBase,)  # BatchNorm, InstanceNorm, SyncBatchNorm, lazy variants


def keeps_running_stats(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer that can keep running statistics: torch's ``_NormBase``
    (BatchNorm, InstanceNorm, SyncBatchNorm and their lazy variants) or any module holding ``running_mean`` /
    ``running_var`` buffers and a ``track_running_stats`` switch, whether it tracks them now or not.

    Such a layer is treated by kind wherever the package special-cases normalization: in train mode it normalizes
    by the statistics of the batch it sees (and updates its running statistics), in eval mode by its running
    statistics, which drift during training even when no weight moves.
    """
    if isinstance(module, _BATCHNORM_TYPES):
        return True
    return (hasattr(module, "track_running_stats")
            and any(name in module._buffers for name in ("running_mean", "running_var")))


class FrozenParams(nn.Module):
    """A snapshot of a module's parameters (and optionally buffers) kept as buffers.

    Buffers, not parameters: the snapshot is never trained, is skipped by ``module.parameters()`` (so no
    optimizer sees it), follows ``.to()`` / dtype changes and is saved in ``state_dict``. Parameter names
    contain dots, which buffer names may not, so they are stored under a mangled name and read back
    through :meth:`as_dict`.
    """

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        super().__init__()
        self._names = list(tensors)
        for name, tensor in tensors.items():
            self.register_buffer(_mangle(name), tensor.detach().clone())

    def as_dict(self) -> dict[str, Tensor]:
        return {name: getattr(self, _mangle(name)) for name in self._names}


def functional_call(module: nn.Module, tensors: dict[str, Tensor], args: Any = (), kwargs: dict | None = None) -> Any:
    """``module(*args, **kwargs)`` with the parameters / buffers named in ``tensors`` replaced by those tensors.

    What ``torch.func.functional_call`` does, for modules that reach a sub-module under two names (the
    common ``self.backbone = self.net.backbone``) too: there torch's version restores a plain tensor in
    place of the user's ``Parameter`` (torch 2.14), so the optimizer trains an object the module no longer
    holds. Here every slot holding the named tensor (aliases, tied weights) is swapped and then restored
    exactly. Works inside ``torch.func`` transforms. Raises ``KeyError`` for a name the module does not have.
    """
    args = args if isinstance(args, tuple) else (args,)
    by_name: dict[str, Tensor] = {}
    slots: dict[int, dict[tuple[int, str], tuple[dict, str]]] = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for store in (sub._parameters, sub._buffers):
            for attr, value in store.items():
                if value is None:
                    continue
                by_name.setdefault(f"{prefix}.{attr}" if prefix else attr, value)
                slots.setdefault(id(value), {})[(id(store), attr)] = (store, attr)
    saved = []
    try:
        for name, tensor in tensors.items():
            if name not in by_name:
                raise KeyError(f"{type(module).__name__} has no parameter or buffer named {name!r}")
            for store, attr in slots[id(by_name[name])].values():
                saved.append((store, attr, store[attr]))
                store[attr] = tensor
        return module(*args, **(kwargs or {}))
    finally:
        for store, attr, value in reversed(saved):
            store[attr] = value


def _mangle(name: str) -> str:
    return name.replace(".", "__")


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Temporarily put ``module`` in eval mode (dropout off, BatchNorm on running statistics)."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


@contextlib.contextmanager
def batchnorm_eval(module: nn.Module) -> Iterator[None]:
    """Temporarily put only the normalization layers that keep running statistics (:func:`keeps_running_stats`:
    BatchNorm, InstanceNorm, ...) of ``module`` in eval mode."""
    layers = [m for m in module.modules() if keeps_running_stats(m)]
    modes = [m.training for m in layers]
    for m in layers:
        m.training = False
    try:
        yield
    finally:
        for m, training in zip(layers, modes):
            m.training = training


@contextlib.contextmanager
def probe_mode(module: nn.Module) -> Iterator[None]:
    """Temporarily make ``module`` one deterministic function of its weights, as the measures see it.

    Every sub-module goes to eval mode (dropout off), except normalization layers that keep running statistics
    (:func:`keeps_running_stats`: BatchNorm, InstanceNorm(track_running_stats=True), ...) and are in train mode:
    those keep normalizing with the statistics of the batch (or instance) they see (here the probe, at the
    current weights) and update no running statistics. Such layers the user keeps in eval keep their running
    statistics, which then do not move. So while the weights do not move, nothing measured moves, although
    running statistics drift during training even at learning rate 0.
    """
    modes = {m: m.training for m in module.modules()}
    batch_stats = [m for m in module.modules() if keeps_running_stats(m) and m.training]
    module.eval()
    for m in batch_stats:
        m.training = True
    try:
        with running_stats_untouched(batch_stats):
            yield
    finally:
        for m, training in modes.items():
            m.training = training


@contextlib.contextmanager
def running_stats_untouched(layers: list[nn.Module]) -> Iterator[None]:
    """Normalization layers in training mode normalize by the statistics of their input and update no running
    statistics inside. BatchNorm reads ``track_running_stats`` for that; other kinds (InstanceNorm passes its
    running statistics to ``F.instance_norm``, which updates them whenever it uses input statistics) hold no
    running statistics inside."""
    saved: list[tuple[nn.Module, bool, dict[str, Any]]] = []
    for m in layers:
        held = {} if isinstance(m, nn.modules.batchnorm._BatchNorm) else {
            name: m._buffers[name] for name in ("running_mean", "running_var") if m._buffers.get(name) is not None}
        saved.append((m, m.track_running_stats, held))
        m.track_running_stats = False
        for name in held:
            m._buffers[name] = None
    try:
        yield
    finally:
        for m, track, held in saved:
            m.track_running_stats = track
            m._buffers.update(held)


class RNGState:
    """The global random-number state (CPU, and the CUDA devices ``module``'s parameters are on), taken now,
    to restore it or to replay it later."""

    def __init__(self, module: nn.Module) -> None:
        self.devices = sorted({p.device.index or 0 for p in module.parameters() if p.is_cuda})
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]

    def restore(self) -> None:
        """Set the global state back to this one."""
        torch.set_rng_state(self.cpu)
        for device, state in zip(self.devices, self.cuda):
            torch.cuda.set_rng_state(state, device)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """The global RNG starts from this state inside; the state from before is restored after."""
        with torch.random.fork_rng(devices=self.devices):
            self.restore()
            yield


def tensor_norms(tensors: list[Tensor | None]) -> list[float | None]:
    """The 2-norm of each tensor (``None`` for ``None``), in one fused reduction and one transfer: the fingerprint of
    a set of weights or gradients, which a write that changes values changes (version counters miss ``.data``)."""
    present = [t.detach() for t in tensors if t is not None]
    if not present:
        return [None] * len(tensors)
    with torch.no_grad():
        norms = torch._foreach_norm(present)
        try:  # stack promotes mixed dtypes exactly (a float16 norm is a float32 number)
            values = iter(torch.stack(norms).tolist())
        except RuntimeError:  # tensors on several devices
            values = iter([float(n) for n in norms])
    return [None if t is None else next(values) for t in tensors]


_WEIGHTS: dict[tuple[int, torch.dtype, torch.device, int], Tensor] = {}


def _weights(n: int, dtype: torch.dtype, device: torch.device, seed: int) -> Tensor:
    """``n`` fixed pseudo-random weights in [1, 2) (the same for every call with these arguments), cached."""
    key = (n, dtype, device, seed)
    found = _WEIGHTS.get(key)
    if found is None:
        generator = torch.Generator().manual_seed(1_000_003 * seed + n)
        found = _WEIGHTS[key] = (1 + torch.rand(n, generator=generator, dtype=torch.float64)).to(dtype=dtype, device=device)
    return found


def tensor_fingerprints(tensors: list[Tensor | None]) -> list[float | None]:
    """One number per tensor (``None`` for ``None``) that a write changing its values changes: ‖X b + a‖, X the
    tensor viewed as a matrix ``[rows, columns]`` (first dimension by the rest; a 1-D tensor is one row), b and a
    fixed pseudo-random weights in [1, 2) (:func:`_weights`, the same at every call).

    Unlike the 2-norm (:func:`tensor_norms`) it sees writes that keep every norm: a permutation of rows or of
    columns, a sign flip (``w.data = w.data[perm]``). Both read each tensor once (a matrix-vector product per tensor,
    then two fused reductions over vectors of ``rows`` numbers, and one transfer), so the fingerprint costs what
    the norm did. Exactly reproducible for the same values on the same device; an integer tensor gives its norm, a
    sparse one the fingerprint of the values it holds."""
    # A sparse tensor (a sparse embedding's gradient) by the values it holds.
    present = [_dense_values(t.detach()) for t in tensors if t is not None]
    if not present:
        return [None] * len(tensors)
    with torch.no_grad():
        floating = [t for t in present if t.is_floating_point() and t.numel()]
        vectors = []
        for t in floating:
            rows = t.shape[0] if t.dim() >= 2 else 1
            matrix = t.reshape(rows, t.numel() // rows)
            vectors.append(torch.mv(matrix, _weights(matrix.shape[1], t.dtype, t.device, 1)))
        if vectors:
            torch._foreach_add_(vectors, [_weights(v.shape[0], v.dtype, v.device, 2) for v in vectors])
        weighted = iter(torch._foreach_norm(vectors) if vectors else [])
        others = [t for t in present if not (t.is_floating_point() and t.numel())]
        plain = iter(torch._foreach_norm([t.double() for t in others]) if others else [])
        results = [next(weighted) if t.is_floating_point() and t.numel() else next(plain) for t in present]
        try:  # stack promotes mixed dtypes exactly (a float16 norm is a float32 number)
            values = iter(torch.stack(results).tolist())
        except RuntimeError:  # tensors on several devices
            values = iter([float(v) for v in results])
    return [None if t is None else next(values) for t in tensors]


def _dense_values(tensor: Tensor) -> Tensor:
    return tensor.coalesce().values() if tensor.layout == torch.sparse_coo else tensor


def check_finite(tensor: Tensor, what: str) -> None:
    """Raise ``ValueError`` when ``tensor`` holds NaN or inf: a measure of it would be meaningless."""
    if not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        raise ValueError(
            f"{what} contains {bad} non-finite value(s) (NaN or inf). The model has diverged or its inputs "
            "are bad; lower the learning rate, check the data, or use float64 for large alpha."
        )
