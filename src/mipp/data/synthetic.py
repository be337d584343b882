"""A synthetic, learnable image-classification task made from a seed (no files needed).

Each class has one fixed random smooth template per channel: Gaussian noise on a coarse k x k grid,
bilinearly upsampled to input_size x input_size, then shifted/scaled to zero mean and unit std. A sample
of class c is `a * template[c] + noise * eps` with amplitude a ~ U(0.5, 1.5) and eps ~ N(0, 1) per pixel.
Classes are balanced (labels cycle through the classes, then are shuffled).

The templates come from numpy.random.default_rng([seed, 0]); the train samples from [seed, 1] and the
test samples from [seed, 2], so both splits share the task but never a sample, and everything is
deterministic given `seed` and the options. Images are divided by the analytic standard deviation
sqrt(E[a^2] + noise^2) = sqrt(13/12 + noise^2), so every channel has about zero mean and unit std
whatever the split size (no statistics pass needed).

With the defaults (1x16x16, 4 classes, noise 1.0) a small MLP or CNN reaches >95% test accuracy within
a few epochs; raise `noise` to make the task harder.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .base import ArrayDataset, DatasetInfo, check_split, subset_indices

DEFAULT_N = {"train": 2000, "test": 500}
SPLIT_STREAM = {"train": 1, "test": 2}


def _interp_matrix(size: int, k: int) -> np.ndarray:
    """(size, k) matrix of linear-interpolation weights from a k-point grid to a size-point grid."""
    if k == 1:
        return np.ones((size, 1))
    pos = np.linspace(0.0, k - 1, size)
    lo = np.clip(np.floor(pos).astype(int), 0, k - 2)
    frac = pos - lo
    m = np.zeros((size, k))
    m[np.arange(size), lo] = 1.0 - frac
    m[np.arange(size), lo + 1] += frac
    return m


def make_templates(seed: int, num_classes: int, in_channels: int, input_size: int) -> np.ndarray:
    """(num_classes, in_channels, S, S) float64 smooth templates, each channel zero mean / unit std."""
    rng = np.random.default_rng([seed, 0])
    k = min(input_size, max(4, math.isqrt(max(num_classes - 1, 0)) + 2))
    coarse = rng.standard_normal((num_classes, in_channels, k, k))
    m = _interp_matrix(input_size, k)
    t = m @ coarse @ m.T  # broadcasts over (class, channel)
    t = t - t.mean(axis=(2, 3), keepdims=True)
    sd = t.std(axis=(2, 3), keepdims=True)
    return t / np.where(sd > 1e-12, sd, 1.0)


def _check_positive(name: str, value) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def load_synthetic(
    split: str = "train",
    *,
    root=None,
    limit: Optional[int] = None,
    seed: int = 0,
    n: Optional[int] = None,
    in_channels: int = 1,
    input_size: int = 16,
    num_classes: int = 4,
    noise: float = 1.0,
    normalize: bool = True,
) -> ArrayDataset:
    """Synthetic split as an ArrayDataset. `n` (default 2000 train / 500 test) samples; `root` is ignored."""
    check_split(split)
    n = DEFAULT_N[split] if n is None else _check_positive("n", n)
    in_channels = _check_positive("in_channels", in_channels)
    input_size = _check_positive("input_size", input_size)
    num_classes = _check_positive("num_classes", num_classes)
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    templates = make_templates(seed, num_classes, in_channels, input_size)
    rng = np.random.default_rng([seed, SPLIT_STREAM[split]])
    labels = rng.permutation(np.arange(n) % num_classes)
    amp = rng.uniform(0.5, 1.5, size=n)
    eps = rng.standard_normal((n, in_channels, input_size, input_size))
    x = amp[:, None, None, None] * templates[labels] + noise * eps
    if normalize:
        x = x / math.sqrt(13.0 / 12.0 + noise * noise)
    keep = subset_indices(labels, limit, seed)
    classes = tuple(f"class_{i}" for i in range(num_classes))
    return ArrayDataset(
        x[keep].astype(np.float32), labels[keep].astype(np.int64), name="synthetic", split=split,
        classes=classes,
        mean=(0.0,) * in_channels if normalize else None,
        std=(1.0,) * in_channels if normalize else None,
    )


def synthetic_info(
    root=None,
    n: Optional[int] = None,
    in_channels: int = 1,
    input_size: int = 16,
    num_classes: int = 4,
    noise: float = 1.0,
    normalize: bool = True,
) -> DatasetInfo:
    """DatasetInfo for the synthetic task (n, when given, is the size of either split)."""
    n = None if n is None else _check_positive("n", n)
    in_channels = _check_positive("in_channels", in_channels)
    input_size = _check_positive("input_size", input_size)
    num_classes = _check_positive("num_classes", num_classes)
    return DatasetInfo(
        name="synthetic", in_channels=in_channels, input_size=input_size, num_classes=num_classes,
        num_train=DEFAULT_N["train"] if n is None else n,
        num_test=DEFAULT_N["test"] if n is None else n,
        classes=tuple(f"class_{i}" for i in range(num_classes)),
        mean=(0.0,) * in_channels if normalize else None,
        std=(1.0,) * in_channels if normalize else None,
    )
