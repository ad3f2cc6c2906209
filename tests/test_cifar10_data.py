"""CIFAR-10 DataModule on CIFAR-10's own on-disk format, the offline errors, augmentation and loaders.

The tests write a tiny data set exactly as CIFAR-10 ships it (``cifar-10-batches-py/data_batch_1..5``,
``test_batch``, ``batches.meta``: Python pickles of ``uint8 [n, 3072]`` rows and label lists) and read it
through torchvision's real ``CIFAR10`` class. torchvision checks every file's MD5 against the official
archive's; the tests register the MD5 of the files they wrote instead, so that check still runs.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR10

from lightning_lazy.data.cifar10 import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR10DataModule,
    CIFAR10NotFoundError,
    DeviceTensorLoader,
    SyntheticCIFAR10DataModule,
    default_num_workers,
    normalize_images,
    random_crop_flip,
)

PER_BATCH = 4  # images per training file: 5 files -> 20 training images
NUM_TEST = 6



def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_tiny_cifar10(root: Path, seed: int = 0) -> tuple[np.ndarray, list[int], np.ndarray, list[int]]:
    """Write CIFAR-10-format files under ``root/cifar-10-batches-py``; return (train rows, labels, test ...)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    train_rows, train_labels = [], []
    for i in range(1, 6):
        rows = rng.integers(0, 256, size=(PER_BATCH, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=PER_BATCH)]
        entry = {"batch_label": f"training batch {i} of 5", "labels": labels, "data": rows,
                 "filenames": [f"img_{i}_{j}.png" for j in range(PER_BATCH)]}
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(entry, f, protocol=2)
        train_rows.append(rows)
        train_labels += labels
    test_rows = rng.integers(0, 256, size=(NUM_TEST, 3072), dtype=np.uint8)
    test_labels = [int(v) for v in rng.integers(0, 10, size=NUM_TEST)]
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"batch_label": "testing batch 1 of 1", "labels": test_labels, "data": test_rows,
                     "filenames": [f"t_{j}.png" for j in range(NUM_TEST)]}, f, protocol=2)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"num_cases_per_batch": PER_BATCH, "label_names": names, "num_vis": 3072}, f, protocol=2)
    return np.concatenate(train_rows), train_labels, test_rows, test_labels


def register_checksums(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Make torchvision's integrity check accept the tiny files (it still computes and compares MD5s)."""
    folder = root / "cifar-10-batches-py"
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", _md5(folder / f"data_batch_{i}")]
                                                for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", _md5(folder / "test_batch")]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": _md5(folder / "batches.meta")})


@pytest.fixture
def tiny_cifar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, tuple]:
    arrays = write_tiny_cifar10(tmp_path)
    register_checksums(monkeypatch, tmp_path)
    return tmp_path, arrays


def test_loads_cifar10_on_disk_format(tiny_cifar: tuple[Path, tuple]) -> None:
    root, (train_rows, train_labels, test_rows, test_labels) = tiny_cifar
    dm = CIFAR10DataModule(data_dir=str(root), download=False, batch_size=8, eval_batch_size=4, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    images, labels = dm.split("train")
    # CIFAR rows are 1024 red, 1024 green, 1024 blue values in row-major order: i.e. [3, 32, 32].
    assert images.dtype == torch.uint8 and images.shape == (5 * PER_BATCH, 3, 32, 32)
    assert torch.equal(images, torch.from_numpy(train_rows.reshape(-1, 3, 32, 32)))
    assert labels.tolist() == train_labels
    test_images, test_y = dm.split("test")
    assert torch.equal(test_images, torch.from_numpy(test_rows.reshape(-1, 3, 32, 32)))
    assert test_y.tolist() == test_labels
    # val_size=0: validation runs on the test set (the paper reports test accuracy along training).
    assert dm.split("val")[0] is test_images

    batches = list(dm.test_dataloader())
    assert [b[0].shape[0] for b in batches] == [4, 2]
    x = torch.cat([b[0] for b in batches])
    assert x.dtype == torch.float32
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    expected = (torch.from_numpy(test_rows.reshape(-1, 3, 32, 32)).float() / 255 - mean) / std
    torch.testing.assert_close(x, expected)
    assert torch.cat([b[1] for b in batches]).tolist() == test_labels

    train_batches = list(dm.train_dataloader())
    assert sum(b[0].shape[0] for b in train_batches) == 5 * PER_BATCH
    assert sorted(torch.cat([b[1] for b in train_batches]).tolist()) == sorted(train_labels)


def test_validation_split_is_held_out(tiny_cifar: tuple[Path, tuple]) -> None:
    root, (train_rows, *_rest) = tiny_cifar
    dm = CIFAR10DataModule(data_dir=str(root), download=False, val_size=5, num_workers=0)
    dm.setup("fit")
    train, val = dm.split("train")[0], dm.split("val")[0]
    assert train.shape[0] == 15 and val.shape[0] == 5
    together = torch.cat([train, val]).flatten(1)
    everything = torch.from_numpy(train_rows)
    # Every original image appears exactly once across the two splits.
    assert sorted(map(bytes, together.numpy())) == sorted(map(bytes, everything.numpy()))
    with pytest.raises(ValueError, match="val_size"):
        CIFAR10DataModule(data_dir=str(root), download=False, val_size=20, num_workers=0).setup("fit")


def test_trainer_reads_on_disk_cifar(tiny_cifar: tuple[Path, tuple]) -> None:
    import pytorch_lightning as pl

    from lightning_lazy.models.vgg import VGG11
    from lightning_lazy.module import LazyClassifier

    root, _ = tiny_cifar
    dm = CIFAR10DataModule(data_dir=str(root), download=False, batch_size=8, num_workers=0)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(LazyClassifier(VGG11(base_width=2), mode="standard"), dm)
    assert trainer.global_step == 3  # ceil(20 / 8) batches
    assert 0.0 <= float(trainer.callback_metrics["val/acc"]) <= 1.0


def test_missing_files_without_download_says_where(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "nowhere"), download=False, num_workers=0)
    with pytest.raises(CIFAR10NotFoundError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in message
    assert "data_batch_1" in message and "download=True" in message
    assert "lightning-lazy demo" in message and "add_to_existing_trainer.py" in message  # what runs offline
    assert "cifar-10-python.tar.gz" in message


def test_offline_download_fails_with_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing listens on the discard port of the loopback interface: the download fails at once, as it
    # would on a machine without network.
    monkeypatch.setattr(CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    dm = CIFAR10DataModule(data_dir=str(tmp_path), download=True, num_workers=0, download_timeout=5)
    with pytest.raises(CIFAR10NotFoundError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert "Could not download CIFAR-10" in message and "no network" in message
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
    # setup() without prepare_data() reports the same problem instead of torchvision's generic error.
    with pytest.raises(CIFAR10NotFoundError):
        dm.setup("fit")


def test_corrupted_files_are_reported(tmp_path: Path) -> None:
    write_tiny_cifar10(tmp_path)  # checksums are not registered: they differ from the official ones
    dm = CIFAR10DataModule(data_dir=str(tmp_path), download=False, num_workers=0)
    with pytest.raises(CIFAR10NotFoundError, match="incomplete or corrupted"):
        dm.setup("fit")


def test_random_crop_flip_takes_windows_of_the_padded_image() -> None:
    torch.manual_seed(0)
    n = 300
    # Every pixel value unique within an image, so a window is identified by its top-left value.
    base = torch.arange(1, 3 * 32 * 32 + 1, dtype=torch.int64).view(1, 3, 32, 32).repeat(n, 1, 1, 1)
    out = random_crop_flip(base, padding=4, flip=True)
    assert out.shape == base.shape and out.dtype == base.dtype
    padded = torch.nn.functional.pad(base[0], (4, 4, 4, 4))
    windows = {(dy, dx): padded[:, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)}
    seen, flips = set(), 0
    for img in out:
        for flipped, candidate in ((False, img), (True, img.flip(2))):
            match = [k for k, w in windows.items() if torch.equal(w, candidate)]
            if match:
                seen.add(match[0])
                flips += flipped
                break
        else:
            raise AssertionError("an augmented image is not a 32x32 window of the zero-padded image")
    assert len(seen) > 60  # 81 offsets, 300 draws: nearly all occur
    assert 100 < flips < 200  # about half are flipped


def test_augmentation_off_and_normalization() -> None:
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    same = random_crop_flip(images, padding=0, flip=False)
    assert torch.equal(same, images)
    x = normalize_images(images, CIFAR10_MEAN, CIFAR10_STD, dtype=torch.float64)
    assert x.dtype == torch.float64
    torch.testing.assert_close(x[:, 1] * CIFAR10_STD[1] + CIFAR10_MEAN[1], images[:, 1].double() / 255)
    with pytest.raises(ValueError, match="channels"):
        normalize_images(images[:, :2], CIFAR10_MEAN, CIFAR10_STD)


def test_device_tensor_loader_epochs_and_shards() -> None:
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 32, 32).contiguous()
    labels = torch.arange(10)
    kwargs = dict(batch_size=3, shuffle=True, augment=False, padding=4, mean=(0.0,) * 3, std=(1 / 255,) * 3)
    loader = DeviceTensorLoader(images, labels, **kwargs)
    assert len(loader) == 4
    epoch1 = [b for b in loader]
    epoch2 = [b for b in loader]
    order1 = torch.cat([y for _, y in epoch1])
    assert sorted(order1.tolist()) == list(range(10))
    assert not torch.equal(order1, torch.cat([y for _, y in epoch2]))  # reshuffled every epoch
    for x, y in epoch1:  # images travel with their labels; normalization (x/255 - 0)/(1/255) = x
        torch.testing.assert_close(x[:, 0, 0, 0], y.float())
    # Two ranks of a distributed run: disjoint halves of the same permutation, equal lengths.
    shards = [DeviceTensorLoader(images, labels, rank=r, world_size=2, **kwargs) for r in (0, 1)]
    parts = [torch.cat([y for _, y in s]) for s in shards]
    assert len(parts[0]) == len(parts[1]) == 5
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    dropped = DeviceTensorLoader(images, labels, drop_last=True, **kwargs)
    assert len(dropped) == 3 and all(x.shape[0] == 3 for x, _ in dropped)


def test_device_tensors_path_in_a_trainer() -> None:
    import pytorch_lightning as pl

    from lightning_lazy.callback import LazyTrainingMonitor
    from lightning_lazy.models.vgg import VGG11
    from lightning_lazy.module import LazyClassifier

    dm = SyntheticCIFAR10DataModule(num_train=24, num_test=8, batch_size=8, device_tensors=True)
    # The monitor draws its probe through the loader's dataset and collate_fn, as from a DataLoader.
    monitor = LazyTrainingMonitor(probe_size=4, kappa_probe_size=2, ntk_probe_size=2, measure_kappa=False)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[monitor])
    trainer.fit(LazyClassifier(VGG11(base_width=2), mode="lazy", alpha=10.0), dm)
    assert isinstance(trainer.train_dataloader, DeviceTensorLoader)
    assert trainer.global_step == 3
    assert 0.0 < float(trainer.callback_metrics["lazy/activation_stability"]) <= 1.0


def test_synthetic_data_is_deterministic_and_learnable() -> None:
    dm = SyntheticCIFAR10DataModule(num_train=400, num_test=200, seed=3)
    dm.setup()
    again = SyntheticCIFAR10DataModule(num_train=400, num_test=200, seed=3)
    again.setup()
    (x, y), (xt, yt) = dm.split("train"), dm.split("test")
    assert torch.equal(x, again.split("train")[0]) and torch.equal(y, again.split("train")[1])
    assert x.shape == (400, 3, 32, 32) and x.dtype == torch.uint8 and 0 <= y.min() and y.max() <= 9
    # Nearest class mean, fitted on the training split, classifies the test split far above chance.
    means = torch.stack([x[y == k].float().mean(0) for k in range(10)])
    pred = torch.cdist(xt.float().flatten(1), means.flatten(1)).argmin(1)
    assert (pred == yt).float().mean() > 0.8


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"batch_size": 0}, "batch_size"), ({"val_size": -1}, "val_size"), ({"num_workers": -2}, "num_workers")],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CIFAR10DataModule(**kwargs)


@pytest.mark.parametrize(("cores", "processes", "workers"), [(1, 1, 0), (2, 1, 1), (4, 1, 3), (16, 1, 4), (8, 2, 3)])
def test_default_num_workers_leaves_a_core_per_training_process(
    cores: int, processes: int, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Lightning warns below min(2, cores - 1) workers and torch above the cores: neither fires on the default.
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert default_num_workers(processes) == workers


def test_loader_uses_the_default_num_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    dm = SyntheticCIFAR10DataModule(num_train=8, num_test=8, batch_size=4, num_workers=None, device_tensors=False)
    assert dm.train_dataloader().num_workers == 1  # 2 cores: one for the training process, one worker
    assert CIFAR10DataModule().num_workers is None  # the default, as in the shipped configs
