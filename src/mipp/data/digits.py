"""scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), shipped inside scikit-learn.

Needs no download, so it is the real-data set the test suite and quick demos can always use.
Split (fixed, independent of `seed`): the first 1437 samples are train, the last 360 test (about 80/20;
the samples are ordered by writer, so the test digits come from writers not seen in training).
Pixels 0..16 are scaled to [0, 1], then normalised with the mean/std of the train split (one channel),
computed once from the data and hard-coded here (0.3053861, 0.3755071) so that dataset_info need not
import scikit-learn; the tests recompute them.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .base import ArrayDataset, DatasetInfo, check_split, subset_indices

NUM_TRAIN = 1437
NUM_TEST = 360
CLASSES = tuple(str(i) for i in range(10))
# Mean / std of the train split's pixels after scaling to [0, 1] (see the module docstring).
TRAIN_MEAN = 0.3053861
TRAIN_STD = 0.3755071


def _load_raw() -> Tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the 'digits' data set needs scikit-learn: pip install mipp[digits]"
        ) from e
    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    labels = np.asarray(bunch.target, dtype=np.int64)
    return images, labels


def load_digits_dataset(
    split: str = "train",
    *,
    root=None,
    limit: Optional[int] = None,
    seed: int = 0,
    normalize: bool = True,
) -> ArrayDataset:
    """Digits split as an ArrayDataset of (1, 8, 8) images. `root` is accepted and ignored (data ships with sklearn)."""
    check_split(split)
    images, labels = _load_raw()
    mean, std = TRAIN_MEAN, TRAIN_STD
    sl = slice(0, NUM_TRAIN) if split == "train" else slice(NUM_TRAIN, NUM_TRAIN + NUM_TEST)
    images, labels = images[sl], labels[sl]
    keep = subset_indices(labels, limit, seed)
    images, labels = images[keep], labels[keep]
    x = images[:, None, :, :]
    if normalize:
        x = (x - mean) / std
    return ArrayDataset(
        x.astype(np.float32), labels, name="digits", split=split, classes=CLASSES,
        mean=(mean,) if normalize else None, std=(std,) if normalize else None,
    )


def digits_info(root=None, normalize: bool = True) -> DatasetInfo:
    """DatasetInfo for digits (static: scikit-learn is not imported)."""
    return DatasetInfo(
        name="digits", in_channels=1, input_size=8, num_classes=10,
        num_train=NUM_TRAIN, num_test=NUM_TEST, classes=CLASSES,
        mean=(TRAIN_MEAN,) if normalize else None, std=(TRAIN_STD,) if normalize else None,
    )
