"""MNIST-1D as a LightningDataModule: a small 10-class benchmark on which feature learning beats kernels.

Greydanus & Kobak, "Scaling down deep learning with MNIST-1D" (ICML 2024): each example is one of ten
fixed 1-D templates (a "digit"), padded, dilated, scaled, translated by up to 48 of 72 positions, sheared,
with correlated and i.i.d. noise, resampled to 40 points. Because the class is a shape at an unknown
position, translation-invariant features matter: the authors report about 94 % test accuracy for a small
CNN against about 68 % for an MLP. With the package's default arguments there are 5 000 examples, split
4 000 train / 1 000 test.

The data is *generated*, never downloaded: :func:`make_mnist1d` calls the ``mnist1d`` package's
``make_dataset`` (a few seconds on a CPU) with its default arguments, except the seed and the number of
examples, and writes the result once as a ``.npz`` file in ``data_dir``; later runs read that file. The
package standardizes the signals with one mean and one standard deviation over the whole set (its
published training code feeds them to the network as they are); this module does the same.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_lazy.data._checks import check_loader_options

# The arguments of mnist1d.data.get_dataset_args() this module lets one change; all others keep the defaults.
DEFAULT_NUM_SAMPLES = 5000
DEFAULT_SEED = 42
SIGNAL_LENGTH = 40
NUM_CLASSES = 10
MIN_SAMPLES = 10 * NUM_CLASSES
CACHE_FORMAT = 1  # bump when the file's contents change meaning


def _dataset_args(num_samples: int, seed: int) -> Any:
    """``mnist1d.data.get_dataset_args()`` (the published defaults) with ``num_samples`` and ``seed`` set."""
    from mnist1d.data import get_dataset_args

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    return args


def make_mnist1d(num_samples: int = DEFAULT_NUM_SAMPLES, seed: int = DEFAULT_SEED) -> dict[str, np.ndarray]:
    """Generate MNIST-1D locally: ``{"x": [n_train, 40] float32, "y": [n_train] int64, "x_test", "y_test"}``.

    Calls ``mnist1d.data.make_dataset`` with the package's default arguments (``train_split`` 0.8, final
    length 40, ...) but ``num_samples`` and ``seed``: ``num_samples // 10`` examples per class, the first
    80 % (after the package's shuffle) for training. The signals come standardized as in the package (one
    mean and one standard deviation over all examples). ``make_dataset`` seeds Python's and NumPy's global
    random generators; their states are restored afterwards, so generating data does not change the
    random numbers of the caller. Never downloads (``get_dataset`` would; it is not used).

    Raises ``ValueError`` when ``num_samples`` gives fewer than one training and one test example per class.
    """
    if not isinstance(num_samples, int) or num_samples < MIN_SAMPLES:
        raise ValueError(
            f"num_samples must be an integer >= {MIN_SAMPLES} (10 per class), got {num_samples!r}; the published "
            f"data set has {DEFAULT_NUM_SAMPLES}"
        )
    try:
        from mnist1d.data import make_dataset
    except ImportError as err:
        raise ImportError(
            "MNIST-1D needs the `mnist1d` package (a dependency of lightning-lazy): pip install mnist1d"
        ) from err
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(_dataset_args(num_samples, seed))
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {
        "x": np.asarray(data["x"], dtype=np.float32),
        "y": np.asarray(data["y"], dtype=np.int64),
        "x_test": np.asarray(data["x_test"], dtype=np.float32),
        "y_test": np.asarray(data["y_test"], dtype=np.int64),
    }


class MNIST1DDataModule(pl.LightningDataModule):
    """MNIST-1D (Greydanus & Kobak 2024): batches ``(x [B, 40] float32, y [B] int64)``, 10 classes.

    Args:
        data_dir: folder of the cached file ``mnist1d_n{num_samples}_seed{seed}.npz`` (made on first use).
        num_samples: examples generated in all, 80 % train / 20 % test (5 000 in the paper: 4 000 / 1 000).
            Fewer make a quick test set; the distribution of each example does not change.
        seed: seed of the generator (42 in the ``mnist1d`` package: the published data set).
        val_size: training examples held out for validation (a seeded random subset). 0 validates on the
            test set, as the CIFAR-10 module does.
        batch_size: training batch size (100 in the MNIST-1D paper's code).
        eval_batch_size: batch size for validation, test and predict.
        split_seed: seed of the validation split.
        num_workers: DataLoader worker processes; 0 (default) loads in the training process, which is
            fastest for 40-float examples held in memory.
        shuffle: draw the training batches in a new random order every epoch (default). False keeps the
            stored order, batch after batch, as the MNIST-1D training code does (``notebooks/train.py``
            takes examples ``[100 s, 100 s + 100)`` mod 4 000 at step ``s``).
        permute_positions: shuffle the *spatial* dimension, as the "shuffled" row of the MNIST-1D table (after
            Zhang et al. 2017): one fixed permutation of the ``length`` positions, applied to every signal of
            every split, drawn by NumPy's legacy generator ``RandomState(permute_positions).permutation``
            (42: the permutation of the MNIST-1D benchmark notebook). None (default): signals as generated.

    The data never leaves the CPU memory of the process (``5 000 × 40`` floats: 0.8 MB).
    """

    num_classes = NUM_CLASSES

    def __init__(
        self,
        data_dir: str = "data",
        num_samples: int = DEFAULT_NUM_SAMPLES,
        seed: int = DEFAULT_SEED,
        val_size: int = 0,
        batch_size: int = 100,
        eval_batch_size: int = 1000,
        split_seed: int = 0,
        num_workers: int = 0,
        shuffle: bool = True,
        permute_positions: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(shuffle, bool):
            raise ValueError(f"shuffle must be true or false, got {shuffle!r}")
        if permute_positions is not None and (isinstance(permute_positions, bool)
                                              or not isinstance(permute_positions, int) or permute_positions < 0):
            raise ValueError(f"permute_positions must be a non-negative integer seed or null, got {permute_positions!r}")
        check_loader_options(batch_size, eval_batch_size, val_size)
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
        if not isinstance(num_samples, int) or num_samples < MIN_SAMPLES:
            raise ValueError(
                f"num_samples must be an integer >= {MIN_SAMPLES} (10 per class), got {num_samples!r}; the "
                f"published data set has {DEFAULT_NUM_SAMPLES}"
            )
        self.data_dir = Path(os.path.expanduser(str(data_dir)))
        self.num_samples, self.seed, self.val_size = num_samples, seed, val_size
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.split_seed, self.num_workers = split_seed, num_workers
        self.shuffle, self.permute_positions = shuffle, permute_positions
        self._splits: dict[str, tuple[Tensor, Tensor]] = {}

    # -- data

    @property
    def cache_path(self) -> Path:
        """The ``.npz`` file this module's data is kept in."""
        return self.data_dir / f"mnist1d_n{self.num_samples}_seed{self.seed}.npz"

    def prepare_data(self) -> None:
        """Generate the data and write :attr:`cache_path` if it is not there (one process per node)."""
        path = self.cache_path
        if path.is_file():
            return
        data = make_mnist1d(self.num_samples, self.seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write under a temporary name, then rename: a run stopped mid-write leaves no truncated cache.
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, format=np.int64(CACHE_FORMAT), num_samples=np.int64(self.num_samples),
                 seed=np.int64(self.seed), **data)
        os.replace(tmp, path)

    def _load(self) -> dict[str, np.ndarray]:
        path = self.cache_path
        if not path.is_file():
            self.prepare_data()  # setup() called by hand, without prepare_data()
        try:
            with np.load(path, allow_pickle=False) as f:
                data = {k: f[k] for k in f.files}
        except (OSError, ValueError) as err:
            raise ValueError(f"MNIST-1D cache {path} is unreadable ({err}); delete it and run again") from err
        expected = (CACHE_FORMAT, self.num_samples, self.seed)
        found = tuple(int(data.get(k, -1)) for k in ("format", "num_samples", "seed"))
        if found != expected or not {"x", "y", "x_test", "y_test"} <= data.keys():
            raise ValueError(
                f"MNIST-1D cache {path} holds (format, num_samples, seed) = {found}, not {expected}; delete it "
                "and run again"
            )
        return data

    def setup(self, stage: str | None = None) -> None:
        """Load (or make) the data once; the validation split is a seeded permutation of the training set."""
        if self._splits:
            return
        data = self._load()
        if self.permute_positions is not None:
            order = np.random.RandomState(self.permute_positions).permutation(data["x"].shape[1])
            data["x"], data["x_test"] = data["x"][:, order], data["x_test"][:, order]
        x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
        if self.val_size >= x.shape[0]:
            raise ValueError(
                f"val_size={self.val_size} leaves no training examples out of {x.shape[0]}; use a smaller "
                "val_size (0 validates on the test set)"
            )
        test = (torch.from_numpy(data["x_test"]), torch.from_numpy(data["y_test"]))
        if self.val_size:
            order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(self.split_seed))
            held, kept = order[: self.val_size], order[self.val_size :]
            self._splits["val"] = (x[held], y[held])
            x, y = x[kept], y[kept]
        else:
            self._splits["val"] = test
        self._splits["train"] = (x, y)
        self._splits["test"] = test

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        """``(x [N, 40] float32, y [N] int64)`` of ``"train"``, ``"val"`` or ``"test"``."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {name!r}")
        self.setup()
        return self._splits[name]

    # -- loaders

    def _loader(self, name: str, train: bool) -> DataLoader:
        return DataLoader(
            TensorDataset(*self.split(name)),
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train and self.shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
