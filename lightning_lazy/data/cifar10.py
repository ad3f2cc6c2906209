"""CIFAR-10 for the paper's CNN experiments, as a LightningDataModule, plus a synthetic stand-in.

Both modules keep the images as one ``uint8`` tensor ``[N, 3, 32, 32]`` (150 MB for CIFAR-10's 50 000
training images) and build batches from it with vectorised augmentation, the paper's recipe: random
32×32 crop of the image zero-padded by 4 pixels, random horizontal flip, then per-channel
normalization. Batches come out as ready ``(float images, int64 labels)`` pairs, so anything that pulls a
batch from a loader (the monitor's probe set, a user's script) sees what the model sees.

Two loading paths:

* the default: a ``torch.utils.data.DataLoader`` over the tensors, augmenting in its worker processes
  (Lightning adds its distributed sampler as usual);
* ``device_tensors=True`` (the default on a CUDA device): the whole data set is copied once to the
  accelerator, and shuffling, cropping, flipping and normalization run there, one batch at a time, so a
  training epoch of a wide VGG-11 is bound by compute and not by host-side loading.

The CIFAR-10 files are read by torchvision's own ``CIFAR10`` class (its on-disk pickle format and its
checksums). Without network, :class:`CIFAR10DataModule` says where to put the files.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_lazy.data._checks import check_loader_options

# Per-channel mean and standard deviation used by the paper's code (the common "kuangliu" values).
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2023, 0.1994, 0.2010)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta")


class CIFAR10NotFoundError(RuntimeError):
    """CIFAR-10 is not on disk (or is corrupted) and could not be downloaded."""


# ----------------------------------------------------------------------------------------------- batches


def random_crop_flip(images: Tensor, padding: int = 4, flip: bool = True, generator: torch.Generator | None = None
                     ) -> Tensor:
    """Random crop of each image, zero-padded by ``padding`` on every side, and a random horizontal flip.

    ``images``: ``[N, C, H, W]`` of any dtype, on any device; returns the same shape, dtype and device.
    Matches torchvision's ``RandomCrop(H, padding=padding)`` + ``RandomHorizontalFlip()`` per image, but for
    a whole batch at once (one gather instead of N small copies). ``generator`` must live on ``images``'
    device; ``None`` uses the global RNG (seeded by ``seed_everything``).
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    n, _, h, w = images.shape
    device = images.device
    out = images
    if padding > 0:
        padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=device, generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=device, generator=generator)
        rows = dy + torch.arange(h, device=device).view(1, h, 1)  # [N, H, 1]
        cols = dx + torch.arange(w, device=device).view(1, 1, w)  # [N, 1, W]
        batch = torch.arange(n, device=device).view(n, 1, 1)
        # Advanced indices on dims 0, 2, 3 around a slice: the result is [N, H, W, C].
        out = padded[batch, :, rows, cols].permute(0, 3, 1, 2)
    if flip:
        mask = torch.rand(n, device=device, generator=generator) < 0.5
        out = torch.where(mask.view(n, 1, 1, 1), out.flip(3), out)
    return out.contiguous()


def normalize_images(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """``uint8`` images ``[N, C, H, W]`` → ``(x / 255 − mean) / std`` per channel, in ``dtype``."""
    if len(mean) != images.shape[1] or len(std) != images.shape[1]:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} entries for {images.shape[1]} channels")
    m = torch.tensor(mean, dtype=dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=dtype, device=images.device).view(1, -1, 1, 1)
    return (images.to(dtype) / 255.0 - m) / s


class _Collate:
    """DataLoader ``collate_fn``: stack ``uint8`` images, augment (train) and normalize, in the worker."""

    def __init__(self, augment: bool, padding: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.augment, self.padding, self.mean, self.std = augment, padding, mean, std

    def __call__(self, items: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        return self.batch(torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]))

    def batch(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Augment (if training) and normalize a stacked ``uint8`` batch, on whatever device it lives."""
        if self.augment:
            images = random_crop_flip(images, self.padding)
        return normalize_images(images, self.mean, self.std), labels


class DeviceTensorLoader:
    """Batches drawn from image and label tensors that already live on the training device.

    An iterable with ``len``, which Lightning accepts as a dataloader. Each ``iter()`` is one epoch: a fresh
    permutation (seeded by ``seed`` and the epoch count, so that all distributed ranks agree on it), cut
    into ``batch_size`` slices of this rank's share; each slice is augmented and normalized on the device.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        shuffle: bool,
        augment: bool,
        padding: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.augment, self.drop_last = batch_size, shuffle, augment, drop_last
        self.padding, self.mean, self.std = padding, mean, std
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        # The DataLoader interface that tools pulling single examples rely on (e.g. LazyTrainingMonitor's
        # probe): an indexable data set of raw examples and the function that makes a batch of them.
        self.dataset = TensorDataset(images, labels)
        self.collate_fn = _Collate(augment, padding, mean, std)
        # Every rank gets the same number of examples (as DistributedSampler with drop_last=True would).
        self.per_rank = images.shape[0] // world_size if world_size > 1 else images.shape[0]

    def __len__(self) -> int:
        if self.drop_last:
            return self.per_rank // self.batch_size
        return math.ceil(self.per_rank / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = self.images.shape[0]
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        self.epoch += 1
        order = order[self.rank : self.per_rank * self.world_size : self.world_size].to(self.images.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.collate_fn.batch(self.images.index_select(0, idx), self.labels.index_select(0, idx))


# ----------------------------------------------------------------------------------------- data modules


class _InMemoryImageDataModule(pl.LightningDataModule):
    """Shared loader machinery for image classification sets kept as ``uint8`` tensors.

    Subclasses implement :meth:`_load_split` returning ``(images uint8 [N, C, H, W], labels int64 [N])``.
    """

    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD
    num_classes: int = 10

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int = 500,
        augment: bool = True,
        padding: int = 4,
        val_size: int = 0,
        num_workers: int | None = None,
        device_tensors: bool | None = None,
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_loader_options(batch_size, eval_batch_size, val_size)
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding!r}")
        if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 0):
            raise ValueError(
                f"num_workers must be >= 0 (or None: one per free CPU core, at most 4), got {num_workers!r}"
            )
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.augment, self.padding, self.val_size = augment, padding, val_size
        self.num_workers, self.device_tensors, self.drop_last, self.seed = num_workers, device_tensors, drop_last, seed
        self._splits: dict[str, tuple[Tensor, Tensor]] = {}
        self._on_device: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}

    # -- data

    def _load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Load the tensors once; the train / val split is a seeded permutation of the training set."""
        if "train" not in self._splits:
            images, labels = self._load_split(train=True)
            if self.val_size >= images.shape[0]:
                raise ValueError(
                    f"val_size={self.val_size} leaves no training images out of {images.shape[0]}; "
                    "use a smaller val_size (0 validates on the test set)"
                )
            if self.val_size:
                order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(self.seed))
                held, kept = order[: self.val_size], order[self.val_size :]
                self._splits["val"] = (images[held], labels[held])
                images, labels = images[kept], labels[kept]
            self._splits["train"] = (images, labels)
        if "test" not in self._splits:
            self._splits["test"] = self._load_split(train=False)
        if not self.val_size:
            # CIFAR-10 has no validation set; the paper reports test accuracy along training.
            self._splits["val"] = self._splits["test"]

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        """The raw ``(uint8 images, labels)`` of ``"train"``, ``"val"`` or ``"test"`` (after :meth:`setup`)."""
        if name not in self._splits:
            self.setup()
        return self._splits[name]

    # -- loaders

    def _device(self) -> torch.device:
        if self.trainer is not None:
            return self.trainer.strategy.root_device
        return torch.device("cpu")

    def _use_device_tensors(self, device: torch.device) -> bool:
        if self.device_tensors is None:
            return device.type == "cuda"
        return bool(self.device_tensors)

    def _loader(self, name: str, train: bool) -> DataLoader | DeviceTensorLoader:
        images, labels = self.split(name)
        batch_size = self.batch_size if train else self.eval_batch_size
        augment = train and self.augment
        device = self._device()
        if self._use_device_tensors(device):
            key = (name, str(device))
            if key not in self._on_device:  # copy once, reuse every epoch
                self._on_device[key] = (images.to(device), labels.to(device))
            trainer = self.trainer
            rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
            return DeviceTensorLoader(
                *self._on_device[key], batch_size=batch_size, shuffle=train, augment=augment, padding=self.padding,
                mean=self.mean, std=self.std, drop_last=train and self.drop_last, seed=self.seed, rank=rank,
                world_size=world,
            )
        workers = self.num_workers
        if workers is None:
            workers = default_num_workers(self.trainer.num_devices if self.trainer is not None else 1)
        return DataLoader(
            TensorDataset(images, labels),
            batch_size=batch_size,
            shuffle=train,
            drop_last=train and self.drop_last,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=device.type == "cuda",
            collate_fn=_Collate(augment, self.padding, self.mean, self.std),
        )

    def train_dataloader(self) -> DataLoader | DeviceTensorLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader | DeviceTensorLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader | DeviceTensorLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader | DeviceTensorLoader:
        return self._loader("test", train=False)


def default_num_workers(processes_per_machine: int = 1) -> int:
    """DataLoader workers per training process when ``num_workers`` is None: the CPU cores this process may
    use, shared among the training processes of the machine, less one for each main process; at most 4.

    The same bound as Lightning's ``suggested_max_num_workers``, so neither Lightning nor torch warns
    about the worker count (e.g. 1 worker on 2 cores instead of the 4 that used to be configured).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cores // max(1, processes_per_machine) - 1))


def _missing_files(root: Path) -> list[str]:
    folder = root / "cifar-10-batches-py"
    return [name for name in CIFAR10_FILES if not (folder / name).is_file()]


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` (or ``path`` itself) that does not exist yet; None if it exists."""
    missing = None
    path = path.absolute()
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def _offline_alternatives() -> str:
    """What runs without CIFAR-10: the data this package ships or makes (no download)."""
    configs = Path(__file__).resolve().parents[1] / "configs"
    mnist1d = ("`lightning-lazy fit --config mnist1d_cnn_standard` (MNIST-1D, shipped), "
               if (configs / "mnist1d_cnn_standard.yaml").exists() else "")
    return (f" Offline, without CIFAR-10: {mnist1d}`lightning-lazy demo` (teacher-student data made on the fly), "
            "or `python examples/add_to_existing_trainer.py` (scikit-learn's digits).")


def _where_to_put_it(root: Path) -> str:
    return (
        f"Download {CIFAR10_URL} on a machine with network access and either extract it so that "
        f"{root / 'cifar-10-batches-py'}/ holds data_batch_1 ... data_batch_5, test_batch and batches.meta, "
        f"or copy the .tar.gz itself into {root}/ and run again with download=True (it is then only "
        "checked and extracted). Or point data_dir (--data.data_dir) at a folder that already has it."
        + _offline_alternatives()
    )


class CIFAR10DataModule(_InMemoryImageDataModule):
    """CIFAR-10 (50 000 train / 10 000 test images, 10 classes) with the paper's augmentation.

    Args:
        data_dir: folder that holds (or will hold) ``cifar-10-batches-py/``.
        download: download the archive when the files are missing; without network this fails with a
            :class:`CIFAR10NotFoundError` that says where to put the files.
        batch_size: training batch size (128 in the paper).
        eval_batch_size: batch size for validation and test.
        augment: random crop (zero padding ``padding``) and horizontal flip on training batches.
        padding: crop padding in pixels (4 in the paper).
        val_size: hold out this many training images for validation; 0 (default) validates on the test
            set, as the paper reports test accuracy during training.
        num_workers: DataLoader worker processes (default path only); ``None`` (default): one per CPU core
            left free by the training processes, at most 4 (:func:`default_num_workers`).
        device_tensors: keep the whole data set on the training device and augment there. ``None``
            (default): on when the trainer runs on a CUDA device.
        drop_last: drop the last incomplete training batch.
        seed: seed of the validation split and of the device-path shuffling.
        download_timeout: seconds before a stalled network connection counts as failed.
    """

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = True,
        batch_size: int = 128,
        eval_batch_size: int = 500,
        augment: bool = True,
        padding: int = 4,
        val_size: int = 0,
        num_workers: int | None = None,
        device_tensors: bool | None = None,
        drop_last: bool = False,
        seed: int = 0,
        download_timeout: float = 60.0,
    ) -> None:
        super().__init__(
            batch_size=batch_size, eval_batch_size=eval_batch_size, augment=augment, padding=padding,
            val_size=val_size, num_workers=num_workers, device_tensors=device_tensors, drop_last=drop_last, seed=seed,
        )
        self.data_dir = Path(os.path.expanduser(str(data_dir)))
        self.download = download
        self.download_timeout = download_timeout

    def prepare_data(self) -> None:
        """Download the archive if the files are missing (Lightning calls this on one process per node)."""
        if not _missing_files(self.data_dir):
            return
        if not self.download:
            raise CIFAR10NotFoundError(
                f"CIFAR-10 not found in {self.data_dir}: missing {', '.join(_missing_files(self.data_dir))} under "
                f"{self.data_dir / 'cifar-10-batches-py'}. Set download=True (--data.download true) to fetch it, "
                "or put the files there by hand. " + _where_to_put_it(self.data_dir)
            )
        from torchvision.datasets import CIFAR10

        # A failed download must leave nothing behind: the folders it made, or a partial archive.
        created = _first_missing(self.data_dir)
        archive = self.data_dir / CIFAR10.filename
        had_archive = archive.exists()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # urllib waits forever on a silently dropped connection; bound it so an offline machine fails fast.
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(self.download_timeout)
        try:
            CIFAR10(str(self.data_dir), train=True, download=True)
        except Exception as err:  # URLError, timeouts, HTTP errors, a bad archive: all mean "not downloaded"
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            elif not had_archive:
                archive.unlink(missing_ok=True)
            raise CIFAR10NotFoundError(
                f"Could not download CIFAR-10 into {self.data_dir} ({type(err).__name__}: {err}); this machine "
                "may have no network access. " + _where_to_put_it(self.data_dir)
            ) from err
        finally:
            socket.setdefaulttimeout(previous)

    def _load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        from torchvision.datasets import CIFAR10

        missing = _missing_files(self.data_dir)
        if missing:
            # setup() without prepare_data() (e.g. a user calling it by hand): same advice as above.
            self.prepare_data()
        try:
            dataset = CIFAR10(str(self.data_dir), train=train, download=False)
        except RuntimeError as err:
            raise CIFAR10NotFoundError(
                f"CIFAR-10 files under {self.data_dir / 'cifar-10-batches-py'} are incomplete or corrupted "
                f"(torchvision: {err}). Delete that folder and download again. " + _where_to_put_it(self.data_dir)
            ) from err
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # HWC -> CHW, uint8
        labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
        return images, labels


class SyntheticCIFAR10DataModule(_InMemoryImageDataModule):
    """CIFAR-shaped stand-in (``uint8 [N, 3, 32, 32]``, 10 classes) for tests and benchmarks, no files needed.

    Each class has a fixed random smooth prototype image; an example is its class prototype blended with
    pixel noise, so the task is learnable (a model can beat chance) yet not trivial. Same loaders and
    augmentation as :class:`CIFAR10DataModule`.
    """

    def __init__(
        self,
        num_train: int = 1024,
        num_test: int = 256,
        num_classes: int = 10,
        noise: float = 0.5,
        batch_size: int = 128,
        eval_batch_size: int = 500,
        augment: bool = True,
        padding: int = 4,
        val_size: int = 0,
        num_workers: int = 0,
        device_tensors: bool | None = None,
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(
            batch_size=batch_size, eval_batch_size=eval_batch_size, augment=augment, padding=padding,
            val_size=val_size, num_workers=num_workers, device_tensors=device_tensors, drop_last=drop_last, seed=seed,
        )
        if num_train < 1 or num_test < 1:
            raise ValueError(f"num_train and num_test must be positive, got {num_train} and {num_test}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise is a blend weight in [0, 1], got {noise}")
        self.num_train, self.num_test, self.num_classes, self.noise = num_train, num_test, num_classes, noise

    def _load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        # Smooth prototypes: 8×8 random colour patterns upsampled to 32×32, shared by both splits.
        protos = torch.nn.functional.interpolate(
            torch.rand(self.num_classes, 3, 8, 8, generator=g), size=(32, 32), mode="bilinear", align_corners=False
        )
        n = self.num_train if train else self.num_test
        g.manual_seed(self.seed + (1 if train else 2))
        labels = torch.randint(0, self.num_classes, (n,), generator=g)
        pixels = (1 - self.noise) * protos[labels] + self.noise * torch.rand(n, 3, 32, 32, generator=g)
        return (pixels * 255).round().clamp(0, 255).to(torch.uint8), labels
