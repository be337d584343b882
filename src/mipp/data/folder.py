"""Image-folder reader (ImageNet style): root/<split>/<class_name>/*.jpg|jpeg|png.

Too large to hold in memory in general, so the data set is lazy: each item opens its file with PIL,
converts it to RGB, resizes the shorter side to `resize_size` (default: `input_size`), centre-crops an
`input_size` square and normalises with the ImageNet mean/std. `in_memory=True` decodes everything once
into an ArrayDataset (for small trees, so the training loop can slice `.images`).

Classes are the sorted sub-folder names of the train split (when it exists, so every split shares one
label numbering), else of the requested split. Split "test" falls back to a "val" folder and "val" to a
"test" folder. The root comes from the argument, else $MIPP_IMAGEFOLDER.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import (
    ArrayDataset,
    CorruptDataError,
    DataNotFoundError,
    DatasetInfo,
    PathLike,
    resolve_root,
    subset_indices,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
ENV_VAR = "MIPP_IMAGEFOLDER"
SPLIT_DIRS = {"train": ("train",), "test": ("test", "val"), "val": ("val", "test")}
HOWTO = (
    "arrange the images as ROOT/train/<class>/*.jpg and ROOT/val/<class>/*.jpg (or test/), "
    f"then pass root=ROOT or set {ENV_VAR}"
)


def _root(root: Optional[PathLike]) -> Path:
    folder, source = resolve_root(root, ENV_VAR, None)
    if folder is None:
        raise DataNotFoundError(f"imagefolder needs a root: none given and {ENV_VAR} is not set; {HOWTO}.")
    if not folder.is_dir():
        raise DataNotFoundError(f"image folder not found: {folder} (from {source}); {HOWTO}.")
    return folder


def _split_dir(root: Path, split: str) -> Path:
    if split not in SPLIT_DIRS:
        raise ValueError(f"split must be one of {tuple(SPLIT_DIRS)}, got {split!r}")
    for d in SPLIT_DIRS[split]:
        if (root / d).is_dir():
            return root / d
    tried = " or ".join(str(root / d) for d in SPLIT_DIRS[split])
    raise DataNotFoundError(f"image folder split not found: {tried}; {HOWTO}.")


def _class_dirs(folder: Path) -> List[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def find_classes(root: Path, split: str) -> Tuple[str, ...]:
    """Sorted class-folder names of the train split if present, else of `split`."""
    base = root / "train" if (root / "train").is_dir() else _split_dir(root, split)
    return tuple(_class_dirs(base))


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def make_samples(split_dir: Path, classes: Sequence[str]) -> List[Tuple[str, int]]:
    """(path, label) for every image under split_dir/<class>/ (recursively), sorted by class then path."""
    index = {c: i for i, c in enumerate(classes)}
    samples: List[Tuple[str, int]] = []
    for cname in _class_dirs(split_dir):
        files = []
        for dirpath, dirnames, filenames in os.walk(split_dir / cname, followlinks=True):
            dirnames.sort()
            files.extend(os.path.join(dirpath, f) for f in filenames if _is_image(f))
        if not files:
            continue
        if cname not in index:
            raise CorruptDataError(
                f"{split_dir / cname}: class folder not present in the train split ({len(classes)} classes)"
            )
        samples.extend((f, index[cname]) for f in sorted(files))
    return samples


def load_image(path: str, input_size: int, resize_size: int) -> torch.Tensor:
    """One image as float32 (3, input_size, input_size): RGB, shorter side resized, centre crop, [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = resize_size / min(w, h)
            nw, nh = max(input_size, round(w * scale)), max(input_size, round(h * scale))
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - input_size) // 2, (nh - input_size) // 2
            im = im.crop((left, top, left + input_size, top + input_size))
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        if isinstance(e, FileNotFoundError):
            raise DataNotFoundError(f"image file not found: {path}") from e
        raise CorruptDataError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)


class ImageFolderDataset(Dataset):
    """Lazy image-folder data set: items are (float32 (3, S, S) normalised image, int64 label tensor).

    Attributes: `.classes` (sorted class names), `.samples` (list of (path, label)), `.targets` (labels
    as a list), `.labels` (int64 tensor), `.input_size`, `.mean`, `.std`.
    """

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        *,
        input_size: int = 224,
        resize_size: Optional[int] = None,
        limit: Optional[int] = None,
        seed: int = 0,
        normalize: bool = True,
    ) -> None:
        if int(input_size) < 1:
            raise ValueError(f"input_size must be positive, got {input_size}")
        self.root = _root(root)
        self.split = split
        self.split_dir = _split_dir(self.root, split)
        self.name = "imagefolder"
        self.input_size = int(input_size)
        self.resize_size = int(resize_size) if resize_size is not None else self.input_size
        if self.resize_size < self.input_size:
            raise ValueError(f"resize_size ({self.resize_size}) must be >= input_size ({self.input_size})")
        self.classes = find_classes(self.root, split)
        samples = make_samples(self.split_dir, self.classes)
        if not samples:
            raise DataNotFoundError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.split_dir}/<class>/; {HOWTO}."
            )
        keep = subset_indices([s[1] for s in samples], limit, seed)
        self.samples = [samples[i] for i in keep]
        self.targets = [s[1] for s in self.samples]
        self.labels = torch.tensor(self.targets, dtype=torch.int64)
        self.normalize = normalize
        self.mean = IMAGENET_MEAN if normalize else None
        self.std = IMAGENET_STD if normalize else None
        self._m = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
        self._s = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        x = load_image(path, self.input_size, self.resize_size)
        if self.normalize:
            x = (x - self._m) / self._s
        return x, torch.tensor(label, dtype=torch.int64)

    def to_array(self) -> ArrayDataset:
        """Decode every image once into an in-memory ArrayDataset."""
        if len(self) == 0:
            images = torch.empty(0, 3, self.input_size, self.input_size)
        else:
            images = torch.stack([self[i][0] for i in range(len(self))])
        return ArrayDataset(
            images, self.labels, name=self.name, split=self.split, classes=self.classes,
            mean=self.mean, std=self.std,
        )

    def __repr__(self) -> str:
        return (
            f"ImageFolderDataset(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, "
            f"classes={len(self.classes)}, input_size={self.input_size})"
        )


def load_imagefolder(
    split: str = "train",
    *,
    root: Optional[PathLike] = None,
    limit: Optional[int] = None,
    seed: int = 0,
    input_size: int = 224,
    resize_size: Optional[int] = None,
    normalize: bool = True,
    in_memory: bool = False,
):
    """ImageFolderDataset for root/<split>/, or its ArrayDataset when in_memory=True."""
    ds = ImageFolderDataset(
        root, split, input_size=input_size, resize_size=resize_size, limit=limit, seed=seed,
        normalize=normalize,
    )
    return ds.to_array() if in_memory else ds


def _count_images(split_dir: Path) -> int:
    n = 0
    for cname in _class_dirs(split_dir):
        for _, dirnames, filenames in os.walk(split_dir / cname, followlinks=True):
            n += sum(1 for f in filenames if _is_image(f))
    return n


def imagefolder_info(
    root: Optional[PathLike] = None,
    input_size: int = 224,
    resize_size: Optional[int] = None,
    normalize: bool = True,
    in_memory: bool = False,
) -> DatasetInfo:
    """DatasetInfo from the folder tree alone (file names are counted, no image is opened)."""
    folder = _root(root)
    counts = {}
    for split in ("train", "test"):
        try:
            counts[split] = _count_images(_split_dir(folder, split))
        except DataNotFoundError:
            counts[split] = None
    if counts["train"] is None and counts["test"] is None:
        _split_dir(folder, "train")  # raises DataNotFoundError naming the folder
    classes = find_classes(folder, "train" if counts["train"] is not None else "test")
    return DatasetInfo(
        name="imagefolder", in_channels=3, input_size=int(input_size), num_classes=len(classes),
        num_train=counts["train"], num_test=counts["test"], classes=classes,
        mean=IMAGENET_MEAN if normalize else None, std=IMAGENET_STD if normalize else None,
    )
