"""mipp.data: data sets by name, so experiments say "fashion-mnist" and never deal with files.

    load_dataset(name, split="train", *, root=None, limit=None, seed=0, **opts) -> Dataset
    dataset_info(name, root=None, **opts) -> DatasetInfo

Items are (x float32 (C, H, W), y int64 scalar tensor). In-memory sets (all but a lazy imagefolder) are
ArrayDatasets whose `.images` (N, C, H, W) / `.labels` (N,) tensors can be sliced directly. `limit`
keeps a seeded class-stratified subset (see base.subset_indices). Options per set:

    fashion-mnist, mnist   normalize=True                       (root / $MIPP_FASHION_MNIST / $MIPP_MNIST)
    cifar10, cifar100      normalize=True, label_mode="fine"    (root / $MIPP_CIFAR10 / $MIPP_CIFAR100)
    imagefolder            input_size=224, resize_size=None, normalize=True, in_memory=False
    digits                 normalize=True                       (ships with scikit-learn)
    synthetic              n=None, in_channels=1, input_size=16, num_classes=4, noise=1.0, normalize=True

`deformed(dataset, seed, per="image")` wraps any in-memory set with fixed random transformations (see deform.py).
"""
from __future__ import annotations

import dataclasses
import inspect
from functools import partial
from typing import Callable, Dict, NamedTuple, Optional

from torch.utils.data import Dataset

from .base import (
    ArrayDataset,
    CorruptDataError,
    DataNotFoundError,
    DatasetInfo,
    PathLike,
    subset_indices,
)
from .cifar import cifar_info, load_cifar
from .deform import deformed
from .digits import digits_info, load_digits_dataset
from .folder import ImageFolderDataset, imagefolder_info, load_imagefolder
from .idx import idx_info, load_idx, read_idx
from .synthetic import load_synthetic, synthetic_info

__all__ = [
    "DATASET_NAMES",
    "ArrayDataset",
    "CorruptDataError",
    "DataNotFoundError",
    "DatasetInfo",
    "ImageFolderDataset",
    "canonical_name",
    "dataset_info",
    "deformed",
    "load_dataset",
    "read_idx",
    "subset_indices",
]

DATASET_NAMES = ("fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder", "digits", "synthetic")

_ALIASES = {
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "image-folder": "imagefolder",
}


class _Entry(NamedTuple):
    load: Callable  # (split, *, root, limit, seed, **opts) -> Dataset
    info: Callable  # (root=None, **opts) -> DatasetInfo


_REGISTRY: Dict[str, _Entry] = {
    "fashion-mnist": _Entry(partial(load_idx, "fashion-mnist"), partial(idx_info, "fashion-mnist")),
    "mnist": _Entry(partial(load_idx, "mnist"), partial(idx_info, "mnist")),
    "cifar10": _Entry(partial(load_cifar, "cifar10"), partial(cifar_info, "cifar10")),
    "cifar100": _Entry(partial(load_cifar, "cifar100"), partial(cifar_info, "cifar100")),
    "imagefolder": _Entry(load_imagefolder, imagefolder_info),
    "digits": _Entry(load_digits_dataset, digits_info),
    "synthetic": _Entry(load_synthetic, synthetic_info),
}
_COMMON = {"split", "root", "limit", "seed"}


def canonical_name(name: str) -> str:
    """The registry name for `name` (case and '_' vs '-' ignored; a few aliases); ValueError if unknown."""
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ValueError(f"unknown data set {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    return key


def _valid_opts(fn: Callable) -> set:
    return {
        p.name for p in inspect.signature(fn).parameters.values()
        if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD
    } - _COMMON


def _check_opts(name: str, fn: Callable, opts: dict) -> None:
    bad = set(opts) - _valid_opts(fn)
    if bad:
        valid = ", ".join(sorted(_valid_opts(fn))) or "none"
        raise TypeError(f"data set {name!r} does not take option(s) {', '.join(sorted(bad))}; its options: {valid}")


def load_dataset(
    name: str,
    split: str = "train",
    *,
    root: Optional[PathLike] = None,
    limit: Optional[int] = None,
    seed: int = 0,
    **opts,
) -> Dataset:
    """Load one split of a named data set.

    Returns an ArrayDataset (or a lazy ImageFolderDataset for "imagefolder" unless in_memory=True)
    yielding (x float32 (C, H, W), y int64 scalar tensor). `limit` keeps a seeded class-stratified
    subset of that many samples (same seed -> same subset). Raises ValueError for an unknown name,
    DataNotFoundError for missing files and CorruptDataError for unreadable ones.
    """
    key = canonical_name(name)
    entry = _REGISTRY[key]
    _check_opts(key, entry.load, opts)
    return entry.load(split, root=root, limit=limit, seed=seed, **opts)


def dataset_info(name: str, root: Optional[PathLike] = None, **opts) -> DatasetInfo:
    """Cheap facts (channels, input size, classes, split sizes where known) without loading the data.

    Takes the same options as load_dataset; `limit`, when given, caps the reported split sizes and
    `seed` is accepted and ignored, so one option dict can feed both functions.
    """
    key = canonical_name(name)
    entry = _REGISTRY[key]
    limit = opts.pop("limit", None)
    opts.pop("seed", None)
    opts.pop("split", None)
    _check_opts(key, entry.info, opts)
    info = entry.info(root=root, **opts)
    if limit is not None:
        cap = lambda n: None if n is None else min(n, int(limit))  # noqa: E731
        info = dataclasses.replace(info, num_train=cap(info.num_train), num_test=cap(info.num_test))
    return info
