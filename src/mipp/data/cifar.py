"""CIFAR-10 / CIFAR-100 reader for the official "python version" pickle batches.

CIFAR-10: cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}; CIFAR-100:
cifar-100-python/{train, test, meta}. Each batch is a pickled dict (bytes keys, written by Python 2)
with b"data" a uint8 array (N, 3072) whose rows are 1024 red, then 1024 green, then 1024 blue values,
each a 32x32 image in row-major order, so a row reshapes to (3, 32, 32) directly; labels are
b"labels" (CIFAR-10) or b"fine_labels" / b"coarse_labels" (CIFAR-100). The pickle is the data format
itself; it is read by a restricted unpickler that builds only what that format holds (dicts, lists, bytes, numbers
and numpy arrays) and refuses any other global, so a tampered file cannot run code.

Normalisation uses the well-known per-channel statistics of each train split (hard-coded):
CIFAR-10 mean (0.4914, 0.4822, 0.4465), std (0.2470, 0.2435, 0.2616);
CIFAR-100 mean (0.5071, 0.4865, 0.4409), std (0.2673, 0.2564, 0.2762).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from .base import (
    ArrayDataset,
    CorruptDataError,
    DataNotFoundError,
    DatasetInfo,
    PathLike,
    check_split,
    normalise_uint8,
    resolve_root,
    subset_indices,
)

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

CIFAR_SETS = {
    "cifar10": dict(
        title="CIFAR-10",
        env="MIPP_CIFAR10",
        folder="cifar-10-batches-py",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        files={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        meta="batches.meta",
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),
    "cifar100": dict(
        title="CIFAR-100",
        env="MIPP_CIFAR100",
        folder="cifar-100-python",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        files={"train": ("train",), "test": ("test",)},
        meta="meta",
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    ),
}


def _howto(name: str) -> str:
    spec = CIFAR_SETS[name]
    return (
        f"download {spec['url']}, extract it, and pass root= (the {spec['folder']} folder or its parent) "
        f"or set {spec['env']} to that folder"
    )


def _get(d: dict, key: str):
    """d[key] for a dict pickled with either bytes or str keys (None when absent)."""
    if key.encode() in d:
        return d[key.encode()]
    return d.get(key)


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler for the CIFAR batches: numpy arrays (and bytes written by Python 3 at protocol 2), nothing
    else."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not part of the CIFAR format: refused")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
            IndexError, KeyError) as e:
        raise CorruptDataError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise CorruptDataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def find_cifar_folder(name: str, root: Optional[PathLike] = None) -> Path:
    """The folder holding the batches: root or root/<official folder>, root from the argument or env var."""
    spec = CIFAR_SETS[name]
    folder, source = resolve_root(root, spec["env"], None)
    if folder is None:
        raise DataNotFoundError(
            f"{spec['title']} not found: no root given and {spec['env']} is not set. To get it: {_howto(name)}."
        )
    probe = spec["files"]["test"][0]
    for cand in (folder, folder / spec["folder"]):
        if (cand / probe).is_file() or (cand / spec["files"]["train"][0]).is_file():
            return cand
    raise DataNotFoundError(
        f"{spec['title']} not found: no {folder / probe} nor {folder / spec['folder'] / probe} "
        f"(folder from {source}). To get it: {_howto(name)}."
    )


def _read_batch(path: Path, label_key: str, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    data, labels = _get(d, "data"), _get(d, label_key)
    if data is None or labels is None:
        keys = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in d)
        raise CorruptDataError(f"{path}: missing 'data' or '{label_key}' (keys: {keys})")
    data = np.asarray(data)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise CorruptDataError(f"{path}: 'data' must be (N, 3072), got shape {data.shape}")
    if data.dtype != np.uint8:
        if not np.issubdtype(data.dtype, np.integer) or (data.size and (data.min() < 0 or data.max() > 255)):
            raise CorruptDataError(f"{path}: 'data' must hold bytes 0..255, got dtype {data.dtype}")
        data = data.astype(np.uint8)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if labels.shape[0] != data.shape[0]:
        raise CorruptDataError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise CorruptDataError(f"{path}: labels outside 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def _read_meta(name: str, folder: Path, label_mode: str) -> Tuple[Optional[Tuple[str, ...]], Optional[int]]:
    """(class names, samples per batch) from the meta file, where it is there."""
    spec = CIFAR_SETS[name]
    path = folder / spec["meta"]
    if not path.is_file():
        return (CIFAR10_CLASSES if name == "cifar10" else None), None
    d = _unpickle(path)
    key = "label_names" if name == "cifar10" else f"{label_mode}_label_names"
    names = _get(d, key)
    if names is not None:
        names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    per_batch = _get(d, "num_cases_per_batch")
    return names, (int(per_batch) if per_batch is not None else None)


def _classes_count(name: str, label_mode: str) -> int:
    if name == "cifar10":
        return 10
    if label_mode not in ("fine", "coarse"):
        raise ValueError(f"label_mode must be 'fine' or 'coarse', got {label_mode!r}")
    return 100 if label_mode == "fine" else 20


def load_cifar(
    name: str,
    split: str = "train",
    *,
    root: Optional[PathLike] = None,
    limit: Optional[int] = None,
    seed: int = 0,
    normalize: bool = True,
    label_mode: str = "fine",
) -> ArrayDataset:
    """CIFAR-10 / CIFAR-100 split as an ArrayDataset of (3, 32, 32) images.

    label_mode ("fine" or "coarse") applies to CIFAR-100 only.
    """
    check_split(split)
    spec = CIFAR_SETS[name]
    num_classes = _classes_count(name, label_mode)
    label_key = "labels" if name == "cifar10" else f"{label_mode}_labels"
    folder = find_cifar_folder(name, root)
    parts_x, parts_y = [], []
    for fname in spec["files"][split]:
        path = folder / fname
        if not path.is_file():
            raise DataNotFoundError(f"{spec['title']} file not found: {path}. To get it: {_howto(name)}.")
        x, y = _read_batch(path, label_key, num_classes)
        parts_x.append(x)
        parts_y.append(y)
    images = np.concatenate(parts_x) if len(parts_x) > 1 else parts_x[0]
    labels = np.concatenate(parts_y) if len(parts_y) > 1 else parts_y[0]
    keep = subset_indices(labels, limit, seed)
    if keep.shape[0] != labels.shape[0]:
        images, labels = images[keep], labels[keep]
    classes, _ = _read_meta(name, folder, label_mode)
    if classes is not None and len(classes) != num_classes:
        classes = None
    x = normalise_uint8(images, spec["mean"], spec["std"], normalize)
    return ArrayDataset(
        x, labels, name=name, split=split, classes=classes,
        mean=spec["mean"] if normalize else None, std=spec["std"] if normalize else None,
    )


def cifar_info(
    name: str, root: Optional[PathLike] = None, normalize: bool = True, label_mode: str = "fine"
) -> DatasetInfo:
    """DatasetInfo for CIFAR-10 / CIFAR-100 without reading the image batches.

    Class names come from the meta file when found. Sample counts are known only for CIFAR-10 with its
    batches.meta (num_cases_per_batch x number of batches); otherwise they are None.
    """
    spec = CIFAR_SETS[name]
    num_classes = _classes_count(name, label_mode)
    classes = CIFAR10_CLASSES if name == "cifar10" else None
    num_train = num_test = None
    try:
        folder = find_cifar_folder(name, root)
    except DataNotFoundError:
        folder = None
    if folder is not None:
        names, per_batch = _read_meta(name, folder, label_mode)
        if names is not None and len(names) == num_classes:
            classes = names
        if per_batch is not None:
            num_train = per_batch * len(spec["files"]["train"])
            num_test = per_batch * len(spec["files"]["test"])
    return DatasetInfo(
        name=name, in_channels=3, input_size=32, num_classes=num_classes,
        num_train=num_train, num_test=num_test, classes=classes,
        mean=spec["mean"] if normalize else None, std=spec["std"] if normalize else None,
    )
