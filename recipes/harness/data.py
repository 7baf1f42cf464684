"""Datasets held in memory as tensors, and the batch sampler the training loop uses.

- MNIST-1D (Greydanus, 2020; https://github.com/greydanus/mnist1d): 10 classes of length-40 1-D
  signals, generated offline by the ``mnist1d`` package with its default arguments (5000 samples,
  4000 train / 1000 test, seed 42) and cached as ``.npz`` in :func:`cache_dir`. We call its
  generator ``make_dataset`` and never ``get_dataset`` (which tries a download with no timeout and
  writes a pickle into the working directory); ``make_dataset`` reseeds the global ``random`` and
  ``np.random`` generators, so their state is saved and restored around it.
- CIFAR-10/100 (Krizhevsky, 2009) read with numpy + pickle from the standard python folder
  (``cifar-10-batches-py`` / ``cifar-100-python``) under ``--data-root``; no torchvision needed.
  Images stay ``uint8`` until a batch is drawn; :func:`augment_cifar` applies the usual random crop
  (padding 4) and horizontal flip on the whole batch, on the batch's device.
- :class:`ShardedBatchSampler`: draws each *global* batch from one permutation shared by every
  process (seeded by seed and epoch, as ``DistributedSampler`` is) and gives each rank its slice, so
  ``torchrun`` with any number of processes sees the same global batches as one process. A last
  batch too small to hold two classes (batch statistics need two), or two samples per rank
  (BatchNorm needs two), or below a quarter of a batch, is merged into the previous batch or
  dropped.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CIFAR_MEAN_STD",
    "ShardedBatchSampler",
    "Split",
    "augment_cifar",
    "cache_dir",
    "load_cifar",
    "load_dataset",
    "load_mnist1d",
    "write_random_cifar10",
]

#: Per-channel mean and std of the CIFAR training images, in [0, 1] units.
CIFAR_MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclass
class Split:
    """One split held in memory: ``inputs`` (N, ...) and integer ``targets`` (N,)."""

    inputs: Tensor
    targets: Tensor

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def batch(self, indices: Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
        """Inputs and targets at ``indices`` (on the split's device)."""
        index = torch.as_tensor(indices, dtype=torch.long, device=self.targets.device)
        return self.inputs[index], self.targets[index]

    def to(self, device: torch.device | str) -> Split:
        """The split on ``device``."""
        return Split(self.inputs.to(device), self.targets.to(device))

    def head(self, n: int | None) -> Split:
        """The first ``n`` samples (all when ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        return Split(self.inputs[:n], self.targets[:n])


@dataclass
class Dataset:
    """A train and a test split, the number of classes and a name."""

    name: str
    train: Split
    test: Split
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.inputs.shape[1:])

    def to(self, device: torch.device | str) -> Dataset:
        """Both splits on ``device`` (the datasets here fit in memory, also on a GPU)."""
        return Dataset(self.name, self.train.to(device), self.test.to(device), self.num_classes)

    def preprocess(
        self,
        inputs: Tensor,
        *,
        train: bool,
        generator: torch.Generator | None = None,
        positions: Tensor | None = None,
        batch_size: int | None = None,
    ) -> Tensor:
        """Float inputs for the model: CIFAR is normalised (and augmented when ``train``).

        ``positions`` and ``batch_size`` say which rows of a global batch ``inputs`` are, so
        that the augmentation is drawn for the global batch (see :func:`augment_cifar`).
        """
        if self.name.startswith("cifar"):
            return augment_cifar(
                inputs, self.name, train=train, generator=generator,
                positions=positions, batch_size=batch_size,
            )  # fmt: skip
        return inputs


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """``override``, else ``$TORCHCOLLAPSE_CACHE``, else ``~/.cache/torchcollapse``."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get("TORCHCOLLAPSE_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "torchcollapse"


def _atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)  # type: ignore[arg-type]  # (numpy's stubs: allow_pickle)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _generate_mnist1d(num_samples: int, seed: int) -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002
    return {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}


def load_mnist1d(
    cache: str | os.PathLike[str] | None = None, *, num_samples: int = 5000, seed: int = 42
) -> Dataset:
    """MNIST-1D with the package's defaults (4000 train / 1000 test), cached on first use.

    Inputs are ``float32`` of shape ``(N, 1, 40)`` (one channel), targets ``int64``.
    """
    path = cache_dir(cache) / f"mnist1d-n{num_samples}-seed{seed}.npz"
    if not path.is_file():
        _atomic_save_npz(path, **_generate_mnist1d(num_samples, seed))
    with np.load(path) as arrays:
        train = Split(
            torch.from_numpy(arrays["x"]).float().unsqueeze(1),
            torch.from_numpy(arrays["y"]).long(),
        )
        test = Split(
            torch.from_numpy(arrays["x_test"]).float().unsqueeze(1),
            torch.from_numpy(arrays["y_test"]).long(),
        )
    return Dataset("mnist1d", train, test, num_classes=10)


def _unpickle(path: Path, label_key: str, hint: str) -> dict[str, object]:
    """One CIFAR python batch: a pickled dict with ``data`` and the labels ``label_key``.

    Raises:
        ValueError: naming the file, when it is not such a batch (truncated, corrupt, another
            file), with where to get the dataset again.
    """
    problem = None
    try:
        with path.open("rb") as handle:
            data = pickle.load(handle, encoding="latin1")
    # a truncated or corrupt pickle fails in any of these ways, depending on where it breaks
    except (
        pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
        IndexError, KeyError, MemoryError,
    ) as error:  # fmt: skip
        problem = f"{type(error).__name__}: {error}"
    else:
        if not isinstance(data, dict) or "data" not in data or label_key not in data:
            problem = f"it holds no dict with 'data' and {label_key!r}"
    if problem is not None:
        raise ValueError(
            f"Expected {path} to be a valid CIFAR python batch (a pickled dict with 'data' and "
            f"{label_key!r}), but it could not be read ({problem}); the file may be truncated or "
            f"corrupt: {hint}."
        )
    batch: dict[str, object] = data
    return batch


def _cifar_split(files: Sequence[Path], label_key: str, hint: str) -> Split:
    images, labels = [], []
    for file in files:
        batch = _unpickle(file, label_key, hint)
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return Split(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))


def load_cifar(
    name: Literal["cifar10", "cifar100"], root: str | os.PathLike[str] | None
) -> Dataset:
    """CIFAR-10 or CIFAR-100 from the python-pickle folder under ``root``.

    ``root`` may be the folder itself (``.../cifar-10-batches-py``) or its parent. Inputs are
    ``uint8`` images ``(N, 3, 32, 32)``; :func:`augment_cifar` turns a batch into normalised floats.

    Raises:
        FileNotFoundError: when the folder or one of its files is missing, with where to get it.
        ValueError: when a file is not a valid CIFAR python batch (truncated or corrupt), naming
            it.
    """
    folder_name = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[name]
    archive = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}[name]
    hint = (
        f"download and extract https://www.cs.toronto.edu/~kriz/{archive} and pass the folder "
        f"that holds {folder_name} as --data-root"
    )
    if root is None:
        raise FileNotFoundError(f"Dataset {name!r} needs --data-root: {hint}.")
    base = Path(root).expanduser()
    folder = base if base.name == folder_name else base / folder_name
    if name == "cifar10":
        train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
        test_files, label_key, num_classes = [folder / "test_batch"], "labels", 10
    else:
        train_files = [folder / "train"]
        test_files, label_key, num_classes = [folder / "test"], "fine_labels", 100
    missing = [str(f) for f in (*train_files, *test_files) if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"Expected {name} files {missing} to exist: {hint}.")
    return Dataset(
        name,
        _cifar_split(train_files, label_key, hint),
        _cifar_split(test_files, label_key, hint),
        num_classes,
    )


def write_random_cifar10(
    root: str | os.PathLike[str], num_train: int, num_test: int, *, seed: int = 0
) -> Path:
    """Random ``uint8`` images in CIFAR-10's python-pickle layout under ``root``; returns its path.

    For benchmarks and tests on machines without the dataset: the cost per image is CIFAR-10's.
    Labels are a shuffled cycle through the ten classes.
    """
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    parts = np.array_split(np.arange(num_train), 5)
    sizes = [(f"data_batch_{i + 1}", len(part)) for i, part in enumerate(parts)]
    for name, n in [*sizes, ("test_batch", num_test)]:
        batch = {
            "data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
            "labels": (rng.permutation(n) % 10).tolist(),
        }
        with (folder / name).open("wb") as handle:
            pickle.dump(batch, handle)
    return folder


def load_dataset(
    name: str,
    *,
    data_root: str | None = None,
    cache: str | None = None,
    train_samples: int | None = None,
    test_samples: int | None = None,
) -> Dataset:
    """Load ``name`` (``mnist1d``, ``cifar10`` or ``cifar100``), optionally keeping the first N."""
    if name == "mnist1d":
        data = load_mnist1d(cache)
    elif name in ("cifar10", "cifar100"):
        data = load_cifar(name, data_root)  # type: ignore[arg-type]
    else:
        raise ValueError(
            "Expected argument `dataset` to be one of mnist1d, cifar10, cifar100, "
            f"but got {name!r}."
        )
    data.train = data.train.head(train_samples)
    data.test = data.test.head(test_samples)
    return data


def augment_cifar(
    images: Tensor,
    dataset: str,
    *,
    train: bool,
    generator: torch.Generator | None = None,
    positions: Tensor | None = None,
    batch_size: int | None = None,
) -> Tensor:
    """Normalise a ``uint8`` batch ``(B, 3, 32, 32)``; in training also random-crop and flip.

    The crop pads by 4 pixels with zeros and picks one 32x32 window per image; the flip mirrors
    half of the images. Random draws come from ``generator`` (on the batch's device) so runs repeat.

    When ``images`` are the rows ``positions`` of a global batch of ``batch_size`` images (one
    process's slice under ``torchrun``), the crops and flips are drawn for the whole global batch
    and those rows kept: with the same generator, every image is augmented as one process would.
    """
    if (positions is None) != (batch_size is None):
        raise ValueError(
            "Expected arguments `positions` and `batch_size` to be given together, but got "
            f"positions={'None' if positions is None else 'a tensor'} and batch_size={batch_size}."
        )
    mean, std = (
        torch.tensor(v, device=images.device).view(1, 3, 1, 1) for v in CIFAR_MEAN_STD[dataset]
    )
    x = (images.float() / 255.0 - mean) / std
    if not train:
        return x
    b, _, h, w = x.shape
    if positions is not None and batch_size is not None:
        if positions.shape != (b,):
            raise ValueError(
                f"Expected argument `positions` to hold one position per image ({b}), but got "
                f"shape {tuple(positions.shape)}."
            )
        draws, keep = batch_size, positions.to(x.device)
    else:
        draws, keep = b, None
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (draws, 1, 1), device=x.device, generator=generator)
    dx = torch.randint(0, 9, (draws, 1, 1), device=x.device, generator=generator)
    flip = torch.rand(draws, device=x.device, generator=generator) < 0.5
    if keep is not None:
        dy, dx, flip = dy[keep], dx[keep], flip[keep]
    rows = (torch.arange(h, device=x.device).view(1, h, 1) + dy).expand(b, h, w)
    cols = (torch.arange(w, device=x.device).view(1, 1, w) + dx).expand(b, h, w)
    batch = torch.arange(b, device=x.device).view(b, 1, 1).expand(b, h, w)
    cropped = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    return torch.where(flip.view(b, 1, 1, 1), cropped.flip(3), cropped).contiguous()


class ShardedBatchSampler:
    """Global batches from one shared permutation, each rank taking its slice.

    Every process draws the same permutation (``seed + epoch``, like ``DistributedSampler``;
    call :meth:`set_epoch` each epoch), cuts it into global batches of ``batch_size`` and yields
    the indices ``batch[rank::world_size]``. The union over ranks of step ``i`` is exactly step
    ``i`` of a single process, whatever the number of processes.

    The last global batch is merged into the previous one (``last_batch="merge"``) or dropped
    (``"drop"``) when it holds fewer than two classes (batch statistics need two) or fewer than
    ``min_size`` samples; ``"keep"`` keeps it as it is. ``min_size`` defaults to a quarter of the
    batch, and is never below two samples per rank (BatchNorm needs two); since it does not
    depend on the number of processes otherwise, one process and ``torchrun`` agree.

    Args:
        targets: labels of the dataset (to check the classes of the last batch).
        batch_size: global batch size.
        shuffle: draw a new permutation each epoch (else the natural order).
        seed: base seed of the permutation.
        rank: this process's rank.
        world_size: number of processes.
        last_batch: ``"merge"``, ``"drop"`` or ``"keep"``.
        min_size: smallest last batch kept as it is (default ``batch_size // 4``).
    """

    def __init__(
        self,
        targets: Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        last_batch: Literal["merge", "drop", "keep"] = "merge",
        min_size: int | None = None,
    ) -> None:
        if batch_size < 2 * world_size:
            raise ValueError(
                f"Expected argument `batch_size` to be at least 2 per process ({2 * world_size}), "
                f"but got {batch_size}."
            )
        if last_batch not in ("merge", "drop", "keep"):
            raise ValueError(
                "Expected argument `last_batch` to be 'merge', 'drop' or 'keep', "
                f"but got {last_batch!r}."
            )
        self.targets = targets
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.last_batch = last_batch
        self.min_size = max(batch_size // 4 if min_size is None else min_size, 2 * world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the permutation of ``epoch`` (call before iterating, as with DistributedSampler)."""
        self.epoch = epoch

    def global_batches(self) -> list[Tensor]:
        """The global batches of the current epoch (identical on every rank)."""
        n = int(self.targets.shape[0])
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        batches = list(order.split(self.batch_size))
        last = batches[-1] if batches else None
        too_small = last is not None and (
            len(last) < self.min_size or self.targets[last].unique().numel() < 2
        )
        if too_small and self.last_batch != "keep":
            batches.pop()
            if self.last_batch == "merge" and batches:
                batches[-1] = torch.cat([batches[-1], last])  # type: ignore[list-item]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            yield batch[self.rank :: self.world_size].tolist()

    def __len__(self) -> int:
        return len(self.global_batches())
