"""Shared pieces of the data readers: errors, DatasetInfo, ArrayDataset, seeded subsets, normalisation.

Every reader turns its files into the same two things so the rest of mipp never cares where data came
from: a `DatasetInfo` (cheap facts used to build a model before any data is read) and, for data sets
small enough to hold in memory, an `ArrayDataset` whose `.images` / `.labels` tensors the training loop
indexes directly.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

PathLike = Union[str, "os.PathLike[str]"]


class DataNotFoundError(FileNotFoundError):
    """A data file or folder is missing. The message names the full path and says how to get the data."""


class CorruptDataError(ValueError):
    """A data file exists but cannot be parsed (truncated, wrong magic number, inconsistent sizes...).

    The message names the file.
    """


@dataclass(frozen=True)
class DatasetInfo:
    """Cheap facts about a data set, enough to build a model for it.

    `input_size` is the side of the square input (H == W). `num_train` / `num_test` are None where they
    are not known without reading the whole data. `mean` / `std` are the per-channel statistics used for
    normalisation (None where the images are not normalised that way).
    """

    name: str
    in_channels: int
    input_size: int
    num_classes: int
    num_train: Optional[int] = None
    num_test: Optional[int] = None
    classes: Optional[Tuple[str, ...]] = None
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        """(C, H, W) of one sample."""
        return (self.in_channels, self.input_size, self.input_size)


class ArrayDataset(Dataset):
    """An in-memory data set: `.images` float32 (N, C, H, W), `.labels` int64 (N,).

    Indexing gives `(images[i], labels[i])`, the label as an int64 scalar tensor. The training loop may
    slice `.images` / `.labels` directly (much faster than going through `__getitem__`).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        name: str = "",
        split: str = "",
        classes: Optional[Sequence[str]] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
    ) -> None:
        images = torch.as_tensor(images)
        labels = torch.as_tensor(labels)
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"labels must be (N,) with N == {images.shape[0]}, got shape {tuple(labels.shape)}"
            )
        self.images = images.to(torch.float32).contiguous()
        self.labels = labels.to(torch.int64).contiguous()
        self.name = name
        self.split = split
        self.classes = tuple(classes) if classes is not None else None
        self.mean = tuple(float(m) for m in mean) if mean is not None else None
        self.std = tuple(float(s) for s in std) if std is not None else None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    @property
    def num_classes(self) -> int:
        """Number of classes: len(classes) when known, else max label + 1."""
        if self.classes is not None:
            return len(self.classes)
        return int(self.labels.max().item()) + 1 if len(self) else 0

    def subset(self, indices) -> "ArrayDataset":
        """A new ArrayDataset holding the given samples (same metadata)."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        return ArrayDataset(
            self.images[idx], self.labels[idx], name=self.name, split=self.split,
            classes=self.classes, mean=self.mean, std=self.std,
        )

    def __repr__(self) -> str:
        shape = tuple(self.images.shape[1:])
        return f"ArrayDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, shape={shape})"


def subset_indices(labels, limit: Optional[int], seed: int = 0) -> np.ndarray:
    """Indices of a seeded, class-stratified subset of `limit` samples, in their original order.

    Each class gets a share proportional to its size (largest remainders break the rounding, ties by
    class order); within a class the samples are drawn by a permutation from
    `numpy.random.default_rng(seed)`. Same labels, limit and seed -> same subset. `limit` None or
    >= len(labels) keeps everything.
    """
    labels = np.asarray(labels).reshape(-1)
    n = labels.shape[0]
    if limit is None or limit >= n:
        return np.arange(n)
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (limit / n)
    take = np.floor(exact).astype(np.int64)
    remainder = limit - int(take.sum())
    if remainder > 0:
        # Stable sort on the negated fractional parts: largest first, ties by class order.
        order = np.argsort(-(exact - take), kind="stable")
        take[order[:remainder]] += 1
    chosen = []
    for cls, k in zip(classes, take):
        members = np.flatnonzero(labels == cls)
        perm = rng.permutation(members.shape[0])
        chosen.append(members[perm[:k]])
    return np.sort(np.concatenate(chosen))


def normalise_uint8(
    images: np.ndarray, mean: Sequence[float], std: Sequence[float], normalize: bool = True
) -> torch.Tensor:
    """uint8 (N, C, H, W) in 0..255 -> float32 tensor scaled to [0, 1], then per-channel (x - mean) / std."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0)
    if normalize:
        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        x.sub_(m).div_(s)
    return x


def resolve_root(root: Optional[PathLike], env_var: Optional[str], default: Optional[str]) -> Tuple[Optional[Path], str]:
    """The folder to read from and where it came from: the argument, else the environment variable, else the default."""
    if root is not None:
        return Path(root).expanduser(), "the root argument"
    if env_var and os.environ.get(env_var):
        return Path(os.environ[env_var]).expanduser(), f"${env_var}"
    if default is not None:
        return Path(default), "the default location"
    return None, ""


def check_split(split: str, allowed: Sequence[str] = ("train", "test")) -> str:
    """Validate a split name for a data set that has only the given splits."""
    if split not in allowed:
        raise ValueError(f"split must be one of {tuple(allowed)}, got {split!r}")
    return split

