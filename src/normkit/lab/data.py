"""Offline data for the lab: MNIST-1D generated locally, sklearn's bundled digits, user images.

Nothing here downloads. Each loader returns a :class:`Split` of float32 tensors and is memoised
per process, so the many short runs of a study pay for data generation once per worker.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Split:
    """Train and test tensors of one classification dataset; images keep their (C, H, W) shape."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    def subset(self, n_train: int | None, n_test: int | None = None) -> Split:
        """The first ``n_train`` / ``n_test`` examples (the data are already shuffled)."""
        return Split(self.x_train[:n_train], self.y_train[:n_train], self.x_test[:n_test], self.y_test[:n_test], self.num_classes)


def _standardize(train: np.ndarray, test: np.ndarray) -> tuple[Tensor, Tensor]:
    mean, std = train.mean(), train.std()
    return torch.tensor((train - mean) / std, dtype=torch.float32), torch.tensor((test - mean) / std, dtype=torch.float32)


@functools.lru_cache(maxsize=1)
def mnist1d() -> Split:
    """MNIST-1D (Greydanus 2020): 4000/1000 signals of length 40, 10 classes, built from templates in code."""
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    x_train, x_test = _standardize(np.asarray(data["x"]), np.asarray(data["x_test"]))
    y_train = torch.tensor(np.asarray(data["y"]), dtype=torch.long)
    y_test = torch.tensor(np.asarray(data["y_test"]), dtype=torch.long)
    return Split(x_train.unsqueeze(1), y_train, x_test.unsqueeze(1), y_test, 10)


@functools.lru_cache(maxsize=1)
def digits() -> Split:
    """scikit-learn's bundled 8x8 digits (1797 images), a fixed stratified 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(bunch.images, bunch.target, test_size=0.25, random_state=0, stratify=bunch.target)
    x_train, x_test = _standardize(x_tr, x_te)
    return Split(
        x_train.unsqueeze(1), torch.tensor(y_tr, dtype=torch.long), x_test.unsqueeze(1), torch.tensor(y_te, dtype=torch.long), 10
    )


class DataUnavailable(RuntimeError):
    """User image data was asked for but cannot be read (torchvision missing or files absent)."""


@functools.lru_cache(maxsize=2)
def user_images(name: str, data_dir: str, size: int = 32, limit: int = 10000) -> Split:
    """CIFAR-10 (``cifar10``) or an ``ImageFolder`` tree (``train/`` and ``test/``) from ``data_dir``; never downloads."""
    try:
        import torchvision
    except ImportError as err:
        raise DataUnavailable(
            "--data needs torchvision, which is not installed; install a torchvision build matching your torch, "
            "or run the lab without --data to use the built-in datasets"
        ) from err
    from pathlib import Path

    root = Path(data_dir)
    if not root.is_dir():
        raise DataUnavailable(f"--data-dir {data_dir!r} is not a directory")
    tf = torchvision.transforms
    transform = tf.Compose([tf.Resize(size), tf.CenterCrop(size), tf.ToTensor()])
    try:
        if name == "cifar10":
            train = torchvision.datasets.CIFAR10(str(root), train=True, download=False, transform=transform)
            test = torchvision.datasets.CIFAR10(str(root), train=False, download=False, transform=transform)
        else:
            train = torchvision.datasets.ImageFolder(str(root / "train"), transform=transform)
            test = torchvision.datasets.ImageFolder(str(root / "test"), transform=transform)
    except (RuntimeError, FileNotFoundError) as err:
        raise DataUnavailable(f"cannot read {name} under {data_dir!r}: {err}") from err

    def stack(dataset, n: int) -> tuple[Tensor, Tensor]:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:n]
        xs, ys = zip(*(dataset[int(i)] for i in order))
        return torch.stack(xs), torch.tensor(ys, dtype=torch.long)

    x_train, y_train = stack(train, limit)
    x_test, y_test = stack(test, limit // 5)
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = x_train.std(dim=(0, 2, 3), keepdim=True)
    return Split((x_train - mean) / std, y_train, (x_test - mean) / std, y_test, len(train.classes))


def image_dataset(data: str, data_dir: str | None) -> Split:
    """The image-classification data a study uses: bundled digits by default, user data on request."""
    if data == "digits":
        return digits()
    if data_dir is None:
        raise DataUnavailable(f"--data {data} needs --data-dir PATH pointing at files already on disk")
    return user_images(data, data_dir)


def synthetic_channels(task: str, n: int, seed: int, channels: int = 4, length: int = 32) -> tuple[Tensor, Tensor]:
    """Signals (n, channels, length) whose binary label lives in per-instance statistics or cross-channel relations.

    ``brightness``: all channels share an offset of +-0.5 (the label) under per-example random gain -- the label
    is a per-instance mean. ``amplitude``: channel 0 vs channel 1, which has the larger amplitude -- a relation
    between features that normalizing each channel on its own erases. ``shape``: sparse spikes pointing up vs
    down in every channel -- the skew of each channel's values, which survives per-channel normalization (the control).
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    noise = torch.randn(n, channels, length, generator=g)
    sign = (2 * y - 1).float().view(n, 1, 1)
    if task == "brightness":
        x = noise + 0.5 * sign
    elif task == "amplitude":
        ratio = torch.exp(0.4 * sign.view(n))
        x = noise.clone()
        x[:, 0] *= ratio.view(n, 1)
        x[:, 1] /= ratio.view(n, 1)
    elif task == "shape":
        spikes = (torch.rand(n, channels, length, generator=g) < 0.1).float()
        x = noise + 3.0 * sign * spikes
    else:
        raise ValueError(f"unknown synthetic task {task!r}")
    gain = torch.exp(0.3 * torch.randn(n, 1, 1, generator=g))
    return x * gain, y


def token_sequences(n: int, seed: int, vocab: int = 12, min_len: int = 4, max_len: int = 32) -> tuple[Tensor, Tensor, Tensor]:
    """Variable-length token sequences padded with 0; label = which of tokens 1..4 occurs most (ties to the lowest).

    Returns (tokens (n, max_len), lengths (n,), labels (n,)). Padding positions hold token 0 and must be masked.
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g)
    tokens = torch.randint(1, vocab, (n, max_len), generator=g)
    positions = torch.arange(max_len).view(1, -1)
    tokens = torch.where(positions < lengths.view(-1, 1), tokens, torch.zeros_like(tokens))
    counts = torch.stack([(tokens == t).sum(dim=1) for t in range(1, 5)], dim=1)
    labels = counts.argmax(dim=1)
    return tokens, lengths, labels


def classification(name: str) -> Split:
    """A bundled classification dataset by name: ``digits`` (8x8 images) or ``mnist1d`` (length-40 signals)."""
    return {"digits": digits, "mnist1d": mnist1d}[name]()


DATA_LABELS = {"digits": "sklearn digits (1347 train / 450 test, 8x8 images)", "mnist1d": "MNIST-1D (4000 train / 1000 test signals of length 40)"}
