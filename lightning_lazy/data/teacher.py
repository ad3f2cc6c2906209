"""Teacher–student data on the sphere: the synthetic set-up of Chizat, Oyallon & Bach (2019), Section 3.

A *teacher* is a two-layer ReLU network with a few (default 3) hidden neurons whose input weights
``a_j`` are unit vectors and whose output weights ``b_j`` are ``±1``:

    y(x) = Σ_j b_j · max(a_j · x, 0),          x uniform on the unit sphere S^{d-1}.

A student (e.g. :class:`lightning_lazy.models.shallow.TwoLayerReLU`) learns ``y`` with the square loss,
either from a fixed training set (gradient descent to zero training loss: the over-parameterized set-up)
or from fresh samples at every step (SGD on the population loss: the under-parameterized set-up).

Everything here is seeded through explicit ``torch.Generator`` objects, never the global RNG, so the
same ``seed`` gives the same teacher and the same data on every machine and in every process.

This module is a leaf: it imports torch and Lightning's ``LightningDataModule`` only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    TensorDataset,
    get_worker_info,
)
from torch.utils.data._utils.collate import default_collate

__all__ = [
    "Teacher",
    "FreshTeacherSamples",
    "TeacherStudentDataModule",
    "make_teacher_dataset",
    "resolve_dtype",
    "sample_sphere",
]

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "double": torch.float64,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Turn ``"float32"`` / ``"float64"`` (or a floating ``torch.dtype``) into a ``torch.dtype``.

    Strings are accepted so that the DataModule can be configured from YAML / the command line.
    """
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point type, got {dtype}; use torch.float32 or torch.float64.")
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"unknown dtype {dtype!r}; use 'float32' or 'float64' (or the torch.dtype itself).")


def _check_positive_int(value: object, name: str) -> int:
    # bool is an int subclass; True as a dimension is almost surely a mistake.
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return value


def _generator(seed: int) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}.")
    return torch.Generator().manual_seed(seed)


def sample_sphere(
    n: int,
    d: int,
    generator: torch.Generator | None = None,
    dtype: str | torch.dtype = torch.float32,
) -> Tensor:
    """Draw ``n`` points uniformly on the unit sphere ``S^{d-1} ⊂ R^d``; returns a tensor ``[n, d]``.

    A standard Gaussian vector divided by its norm is uniform on the sphere (rotation invariance).
    Sampling happens on the CPU with ``generator`` (so results do not depend on the device).
    """
    _check_positive_int(n, "n")
    _check_positive_int(d, "d")
    dtype = resolve_dtype(dtype)
    z = torch.randn(n, d, generator=generator, dtype=torch.float64)
    # Redraw the (probability-zero, but possible in float) exact zero vectors instead of dividing by 0.
    norms = z.norm(dim=1, keepdim=True)
    while bool((norms == 0).any()):
        bad = (norms == 0).squeeze(1)
        z[bad] = torch.randn(int(bad.sum()), d, generator=generator, dtype=torch.float64)
        norms = z.norm(dim=1, keepdim=True)
    return (z / norms).to(dtype)


class Teacher(nn.Module):
    """Two-layer ReLU teacher ``y(x) = Σ_j b_j relu(a_j · x)`` with unit-norm ``a_j`` and ``b_j = ±1``.

    Args:
        d: input dimension.
        n_neurons: number of hidden neurons (the paper uses 3).
        seed: seeds the random directions ``a_j`` (uniform on the sphere).
        signs: the output weights ``b_j``; default alternates ``+1, -1, +1, …`` so that the teacher has
            neurons of both signs (random signs would make all three equal one time in four, which turns
            the 2-D trajectory picture into a one-colour one). Each entry must be ``+1`` or ``-1``.
        directions: optional ``[n_neurons, d]`` input weights to use instead of random ones; rows are
            normalised to unit norm.
        dtype: ``"float32"`` or ``"float64"``.

    The weights are buffers, not parameters: a teacher is never trained, and an optimizer built from
    ``teacher.parameters()`` should find nothing. Outputs have shape ``[N, 1]``.
    """

    def __init__(
        self,
        d: int,
        n_neurons: int = 3,
        seed: int = 0,
        signs: Sequence[float] | Tensor | None = None,
        directions: Tensor | None = None,
        dtype: str | torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.d = _check_positive_int(d, "d")
        self.n_neurons = _check_positive_int(n_neurons, "n_neurons")
        dtype = resolve_dtype(dtype)
        if directions is None:
            a = sample_sphere(n_neurons, d, _generator(seed), dtype=torch.float64)
        else:
            a = torch.as_tensor(directions, dtype=torch.float64)
            if a.shape != (n_neurons, d):
                raise ValueError(
                    f"directions must have shape [n_neurons, d] = [{n_neurons}, {d}], got {list(a.shape)}."
                )
            norms = a.norm(dim=1, keepdim=True)
            if bool((norms == 0).any()):
                raise ValueError("directions contains a zero row; every teacher neuron needs a nonzero direction.")
            a = a / norms
        if signs is None:
            b = torch.tensor([(-1.0) ** j for j in range(n_neurons)], dtype=torch.float64)
        else:
            b = torch.as_tensor(signs, dtype=torch.float64).flatten()
            if b.numel() != n_neurons or not bool(((b == 1) | (b == -1)).all()):
                raise ValueError(f"signs must hold n_neurons={n_neurons} values, each +1 or -1; got {b.tolist()}.")
        self.register_buffer("input_weights", a.to(dtype))
        self.register_buffer("output_weights", b.to(dtype))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ValueError(f"Teacher expects inputs of shape [N, {self.d}], got {list(x.shape)}.")
        x = x.to(self.input_weights.dtype)
        return torch.relu(x @ self.input_weights.T) @ self.output_weights.unsqueeze(1)

    def extra_repr(self) -> str:
        return f"d={self.d}, n_neurons={self.n_neurons}"


def make_teacher_dataset(
    teacher: Teacher,
    n: int,
    seed: int,
    dtype: str | torch.dtype | None = None,
) -> TensorDataset:
    """A fixed data set of ``n`` pairs ``(x, teacher(x))``, ``x`` uniform on the sphere; ``(x [n, d], y [n, 1])``.

    ``dtype`` defaults to the teacher's dtype.
    """
    dtype = teacher.input_weights.dtype if dtype is None else resolve_dtype(dtype)
    x = sample_sphere(n, teacher.d, _generator(seed), dtype=dtype)
    with torch.no_grad():
        y = teacher(x).to(dtype)
    return TensorDataset(x, y)


class FreshTeacherSamples(IterableDataset):
    """An endless-in-spirit stream of fresh teacher samples: every batch is newly drawn.

    SGD on this stream minimises the *population* loss (each sample is seen once), the paper's
    under-parameterized set-up. It yields whole batches ``(x [batch_size, d], y [batch_size, 1])``, so
    wrap it in ``DataLoader(stream, batch_size=None)``. One pass ("epoch") holds ``steps_per_epoch``
    batches, so Lightning's epoch-based logging and the monitor's ``every_n_epochs`` keep working.

    Reproducibility: in the main process the k-th pass is seeded with ``(seed, k)``, so two runs with the
    same seed see the same samples and successive epochs never repeat. Inside DataLoader workers each
    worker draws from its own seed (derived from the worker's ``torch.initial_seed()``, which the
    DataLoader sets differently per worker and per epoch) and produces its share of the batches.
    """

    def __init__(
        self,
        teacher: Teacher,
        batch_size: int,
        steps_per_epoch: int,
        seed: int = 0,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.teacher = teacher
        self.batch_size = _check_positive_int(batch_size, "batch_size")
        self.steps_per_epoch = _check_positive_int(steps_per_epoch, "steps_per_epoch")
        self.seed = seed
        self.dtype = teacher.input_weights.dtype if dtype is None else resolve_dtype(dtype)
        self._epoch = 0

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        worker = get_worker_info()
        if worker is None:
            # 1_000_003 is prime: (seed, epoch) pairs map to distinct generator seeds for any realistic run.
            generator = _generator(self.seed * 1_000_003 + self._epoch)
            steps = self.steps_per_epoch
            self._epoch += 1
        else:
            generator = _generator(torch.initial_seed() % (2**63))
            # Split the epoch's batches among workers so that an epoch has the same length either way.
            steps = self.steps_per_epoch // worker.num_workers
            steps += int(worker.id < self.steps_per_epoch % worker.num_workers)
        for _ in range(steps):
            x = sample_sphere(self.batch_size, self.teacher.d, generator, dtype=self.dtype)
            with torch.no_grad():
                y = self.teacher(x).to(self.dtype)
            yield x, y


def collate_batch(data: tuple[Tensor, ...] | list) -> tuple[Tensor, ...] | list:
    """Collate for :func:`_batched_loader`: a batch fetched whole is passed through; a list of samples
    (e.g. a probe drawn by index, as the LazyTrainingMonitor does) is stacked as usual."""
    if isinstance(data, tuple) and all(isinstance(t, Tensor) for t in data):
        return data
    return default_collate(data)


def _batched_loader(dataset: TensorDataset, sampler: Sampler, batch_size: int, num_workers: int) -> DataLoader:
    # TensorDataset indexes with a list of indices in one call: fetching a whole batch at once is ~10x
    # faster than collating it sample by sample (which dominated full-batch GD steps on small models).
    return DataLoader(
        dataset,
        sampler=BatchSampler(sampler, batch_size, drop_last=False),
        batch_size=None,
        collate_fn=collate_batch,
        num_workers=num_workers,
    )


class TeacherStudentDataModule(pl.LightningDataModule):
    """Teacher–student regression on the sphere ``S^{d-1}`` as a LightningDataModule.

    Batches are ``(x [B, d], y [B, 1])``; train with the square loss.

    Args:
        d: input dimension.
        n_train: size of the fixed training set. With ``fresh=True`` no fixed set is drawn; ``n_train``
            then only sets the default epoch length (``ceil(n_train / batch_size)`` fresh batches).
        n_val: size of the fixed validation set (0: no validation; the loader is then an empty list,
            which Lightning skips).
        n_test: size of the fixed test set (0 for none, as for validation).
        batch_size: training batch size; ``None`` means full batch (``n_train``), i.e. gradient descent.
        fresh: ``False``: sample a fixed training set once (over-parameterized set-up, GD/SGD on it);
            ``True``: draw new samples at every step (under-parameterized set-up, SGD on the population).
        seed: seeds the teacher and every data split (each split has its own derived seed).
        n_neurons: teacher's number of hidden neurons (3 in the paper).
        steps_per_epoch: training steps per epoch. Default: one pass over the training set. Larger
            values (e.g. 200 full-batch GD steps per "epoch") cut Lightning's per-epoch overhead when
            running thousands of GD steps.
        eval_batch_size: batch size of the validation/test loaders (default: the whole split at once).
        num_workers: DataLoader workers (the data are generated on the fly and cheap; 0 is usually best).
        dtype: ``"float32"`` or ``"float64"``; data and teacher use it.

    Example::

        dm = TeacherStudentDataModule(d=100, n_train=200, n_val=256, n_test=2000, batch_size=None)
        trainer.fit(model, datamodule=dm)
    """

    def __init__(
        self,
        d: int = 100,
        n_train: int = 1000,
        n_val: int = 256,
        n_test: int = 2000,
        batch_size: int | None = 64,
        fresh: bool = False,
        seed: int = 0,
        n_neurons: int = 3,
        steps_per_epoch: int | None = None,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        dtype: str | torch.dtype = "float32",
    ) -> None:
        super().__init__()
        self.d = _check_positive_int(d, "d")
        self.n_train = _check_positive_int(n_train, "n_train")
        for value, name in ((n_val, "n_val"), (n_test, "n_test"), (num_workers, "num_workers")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
        self.n_val, self.n_test, self.num_workers = n_val, n_test, num_workers
        self.batch_size = n_train if batch_size is None else _check_positive_int(batch_size, "batch_size")
        if not fresh and self.batch_size > n_train:
            raise ValueError(
                f"batch_size={self.batch_size} exceeds n_train={n_train}; use batch_size=None for full-batch "
                "gradient descent, or a smaller batch."
            )
        self.fresh = bool(fresh)
        self.seed = seed
        self.steps_per_epoch = (
            math.ceil(n_train / self.batch_size)
            if steps_per_epoch is None
            else _check_positive_int(steps_per_epoch, "steps_per_epoch")
        )
        self.eval_batch_size = (
            None if eval_batch_size is None else _check_positive_int(eval_batch_size, "eval_batch_size")
        )
        self.dtype = resolve_dtype(dtype)
        # Teacher built eagerly (cheap, deterministic) so that users can read it before fit().
        self.teacher = Teacher(d, n_neurons=n_neurons, seed=seed, dtype=self.dtype)
        self.save_hyperparameters()
        self.train_set: TensorDataset | FreshTeacherSamples | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        # Distinct, fixed offsets keep the splits independent of each other and of the teacher's seed.
        if self.train_set is None:
            if self.fresh:
                self.train_set = FreshTeacherSamples(
                    self.teacher, self.batch_size, self.steps_per_epoch, seed=self.seed + 1, dtype=self.dtype
                )
            else:
                self.train_set = make_teacher_dataset(self.teacher, self.n_train, seed=self.seed + 1)
        if self.val_set is None and self.n_val > 0:
            self.val_set = make_teacher_dataset(self.teacher, self.n_val, seed=self.seed + 2)
        if self.test_set is None and self.n_test > 0:
            self.test_set = make_teacher_dataset(self.teacher, self.n_test, seed=self.seed + 3)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        if self.fresh:
            return DataLoader(self.train_set, batch_size=None, num_workers=self.num_workers)
        # A seeded sampler of steps_per_epoch * batch_size indices: it concatenates random permutations,
        # so with batch_size == n_train every batch is the whole set (exact gradient descent).
        sampler = RandomSampler(
            self.train_set,
            num_samples=self.steps_per_epoch * self.batch_size,
            generator=_generator(self.seed + 4),
        )
        return _batched_loader(self.train_set, sampler, self.batch_size, self.num_workers)

    def _eval_loader(self, dataset: TensorDataset | None, split: str) -> DataLoader | list:
        if dataset is None:
            # Lightning skips a loop whose loaders are an empty list, so n_val=0 means "no validation".
            return []
        batch_size = self.eval_batch_size or len(dataset)
        return _batched_loader(dataset, SequentialSampler(dataset), batch_size, self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        return self._eval_loader(self.val_set, "val")

    def test_dataloader(self) -> DataLoader | list:
        self.setup("test")
        return self._eval_loader(self.test_set, "test")
