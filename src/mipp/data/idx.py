"""IDX reader for MNIST and Fashion-MNIST, written with numpy alone (no torchvision).

The IDX format (LeCun's): two zero bytes, a dtype byte, a byte with the number of dimensions, then one
big-endian uint32 per dimension, then the data in C order, big-endian. Files may be plain or gzip'd.
Every size is checked so that a truncated or foreign file fails with CorruptDataError naming the file,
rather than as a reshape error deep inside numpy.

Normalisation uses the well-known per-channel statistics of each set's train split (hard-coded, so the
test split needs no pass over the train split): Fashion-MNIST mean 0.2860, std 0.3530 (checked against
Debian's copy); MNIST mean 0.1307, std 0.3081.
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Dict, Optional, Tuple

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

# dtype byte -> big-endian numpy dtype
IDX_DTYPES: Dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

FILE_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# name -> (environment variable, default folder, pretty name, how to get it, mean, std, class names)
IDX_SETS = {
    "fashion-mnist": dict(
        env="MIPP_FASHION_MNIST",
        default="/usr/share/datasets/fashion-mnist",
        title="Fashion-MNIST",
        howto=(
            "install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
            "or set MIPP_FASHION_MNIST to a folder with the IDX files"
        ),
        mean=(0.2860,),
        std=(0.3530,),
        classes=(
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ),
        subdirs=("raw", "FashionMNIST/raw"),
    ),
    "mnist": dict(
        env="MIPP_MNIST",
        default="/usr/share/datasets/mnist",
        title="MNIST",
        howto=(
            "put the four MNIST IDX files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
            "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]) in /usr/share/datasets/mnist "
            "or set MIPP_MNIST to a folder with the IDX files"
        ),
        mean=(0.1307,),
        std=(0.3081,),
        classes=tuple(str(i) for i in range(10)),
        subdirs=("raw", "MNIST/raw"),
    ),
}


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _parse_header(head: bytes, path: Path) -> Tuple[np.dtype, Tuple[int, ...], int]:
    """(dtype, dims, header length) from the first bytes of an IDX file."""
    if len(head) < 4:
        raise CorruptDataError(f"{path}: truncated IDX file ({len(head)} bytes, no complete magic number)")
    if head[0] != 0 or head[1] != 0:
        raise CorruptDataError(
            f"{path}: not an IDX file (magic number starts {head[:4].hex()}, expected 0000xxxx)"
        )
    code, ndim = head[2], head[3]
    if code not in IDX_DTYPES:
        raise CorruptDataError(f"{path}: unknown IDX dtype byte 0x{code:02x}")
    if ndim == 0:
        raise CorruptDataError(f"{path}: IDX file declares zero dimensions")
    hlen = 4 + 4 * ndim
    if len(head) < hlen:
        raise CorruptDataError(f"{path}: truncated IDX header (needs {hlen} bytes, has {len(head)})")
    dims = tuple(int(d) for d in np.frombuffer(head, dtype=">u4", count=ndim, offset=4))
    return IDX_DTYPES[code], dims, hlen


def _read_bytes(path: Path, size: Optional[int] = None) -> bytes:
    try:
        with _open(path) as f:
            return f.read() if size is None else f.read(size)
    except (OSError, EOFError, zlib.error) as e:
        if isinstance(e, (FileNotFoundError, PermissionError)):
            raise
        # gzip.BadGzipFile is an OSError; a cut-off gzip stream raises EOFError.
        raise CorruptDataError(f"{path}: cannot decompress/read ({type(e).__name__}: {e})") from e


def read_idx(path: PathLike) -> np.ndarray:
    """Read a whole IDX file (plain or .gz) into a numpy array in native byte order.

    Raises CorruptDataError naming the file when the header is malformed or the data size does not match
    the declared dimensions.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"IDX file not found: {path}")
    raw = _read_bytes(path)
    dtype, dims, hlen = _parse_header(raw[:4 + 4 * 255], path)
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - hlen
    if got < expected:
        raise CorruptDataError(
            f"{path}: truncated IDX file: dims {dims} need {expected} data bytes, found {got}"
        )
    if got > expected:
        raise CorruptDataError(
            f"{path}: IDX file has {got - expected} unexpected trailing bytes after dims {dims}"
        )
    arr = np.frombuffer(raw, dtype=dtype, count=expected // dtype.itemsize, offset=hlen).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)  # writable, native byte order


def read_idx_header(path: PathLike) -> Tuple[np.dtype, Tuple[int, ...]]:
    """(dtype, dims) of an IDX file, reading only its header."""
    path = Path(path)
    head = _read_bytes(path, 4 + 4 * 255)
    dtype, dims, _ = _parse_header(head, path)
    return dtype, dims


def _find_file(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz"):
        p = folder / name
        if p.is_file():
            return p
    return None


def find_idx_folder(name: str, root: Optional[PathLike] = None) -> Path:
    """The folder holding `name`'s IDX files: root, else the environment variable, else the default.

    A torchvision-style layout (root/raw or root/FashionMNIST/raw) is accepted too.
    Raises DataNotFoundError naming the folder, the missing file and how to get the data.
    """
    spec = IDX_SETS[name]
    folder, source = resolve_root(root, spec["env"], spec["default"])
    first = FILE_STEMS["train"][0]
    for cand in (folder, *(folder / s for s in spec["subdirs"])):
        if _find_file(cand, first) is not None or _find_file(cand, FILE_STEMS["test"][0]) is not None:
            return cand
    raise DataNotFoundError(
        f"{spec['title']} not found: no {folder / first}[.gz] (folder from {source}). "
        f"To get it: {spec['howto']}."
    )


def _split_files(name: str, folder: Path, split: str) -> Tuple[Path, Path]:
    spec = IDX_SETS[name]
    out = []
    for stem in FILE_STEMS[split]:
        p = _find_file(folder, stem)
        if p is None:
            raise DataNotFoundError(
                f"{spec['title']} file not found: {folder / stem}[.gz]. To get it: {spec['howto']}."
            )
        out.append(p)
    return out[0], out[1]


def read_idx_split(name: str, split: str, root: Optional[PathLike] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Raw uint8 images (N, 28, 28) and uint8 labels (N,) of one split, sizes cross-checked."""
    folder = find_idx_folder(name, root)
    img_path, lab_path = _split_files(name, folder, split)
    images = read_idx(img_path)
    labels = read_idx(lab_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise CorruptDataError(
            f"{img_path}: expected a 3-d uint8 image array, got {images.ndim}-d {images.dtype}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise CorruptDataError(
            f"{lab_path}: expected a 1-d uint8 label array, got {labels.ndim}-d {labels.dtype}"
        )
    if images.shape[0] != labels.shape[0]:
        raise CorruptDataError(
            f"{img_path} has {images.shape[0]} images but {lab_path} has {labels.shape[0]} labels"
        )
    if labels.size and labels.max() >= len(IDX_SETS[name]["classes"]):
        raise CorruptDataError(f"{lab_path}: label {int(labels.max())} out of range 0..9")
    return images, labels


def load_idx(
    name: str,
    split: str = "train",
    *,
    root: Optional[PathLike] = None,
    limit: Optional[int] = None,
    seed: int = 0,
    normalize: bool = True,
) -> ArrayDataset:
    """MNIST / Fashion-MNIST split as an ArrayDataset of (1, H, W) images, normalised unless normalize=False."""
    check_split(split)
    spec = IDX_SETS[name]
    images, labels = read_idx_split(name, split, root)
    keep = subset_indices(labels, limit, seed)
    if keep.shape[0] != labels.shape[0]:
        images, labels = images[keep], labels[keep]
    x = normalise_uint8(images[:, None, :, :], spec["mean"], spec["std"], normalize)
    return ArrayDataset(
        x, labels.astype(np.int64), name=name, split=split, classes=spec["classes"],
        mean=spec["mean"] if normalize else None, std=spec["std"] if normalize else None,
    )


def idx_info(name: str, root: Optional[PathLike] = None, normalize: bool = True) -> DatasetInfo:
    """DatasetInfo for MNIST / Fashion-MNIST; sample counts read from the image file headers when present."""
    spec = IDX_SETS[name]
    counts = {"train": None, "test": None}
    size = 28
    try:
        folder = find_idx_folder(name, root)
    except DataNotFoundError:
        folder = None
    if folder is not None:
        for split in counts:
            p = _find_file(folder, FILE_STEMS[split][0])
            if p is not None:
                _, dims = read_idx_header(p)
                counts[split] = dims[0]
                if len(dims) == 3:
                    size = dims[1]
    return DatasetInfo(
        name=name, in_channels=1, input_size=size, num_classes=len(spec["classes"]),
        num_train=counts["train"], num_test=counts["test"], classes=spec["classes"],
        mean=spec["mean"] if normalize else None, std=spec["std"] if normalize else None,
    )
