"""Deformed data, for the paper's deformed-data study: every class gets its own fixed random transformation.

``deformed(dataset, seed=0, affine=1.0, permute=0.1)`` returns a new ArrayDataset in which every image of class c
went through the transformation of class c: an affine warp (rotation up to +-45 deg, scale 1 +- 0.25, shear +- 0.3,
shift +- 15% of the side, all times ``affine``) followed by a shuffle of a random ``permute`` share of the pixel
positions (same positions in every channel).  The transformation is drawn from a generator seeded by (seed, class)
only, so it is the same for the train and the test split and for every call.  Warping samples bilinearly and
repeats the border pixels outside the image (the background, for Fashion-MNIST).

Why: a class-dependent deformation changes which input statistics carry the label; a method that prunes the trained
network can use what training learned, while pruning at initialisation sees only the deformed statistics.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mipp.io import derived_seed

from .base import ArrayDataset


def class_transform(seed: int, label: int, height: int, width: int, affine: float = 1.0,
                    permute: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(theta (2, 3) for F.affine_grid, permutation of the H*W pixel positions) of one class."""
    generator = torch.Generator().manual_seed(derived_seed(seed, "deform", int(label)))
    u = torch.rand(6, generator=generator, dtype=torch.float64) * 2 - 1  # uniform in [-1, 1]
    angle = math.radians(45.0) * affine * u[0]
    scale_x, scale_y = 1 + 0.25 * affine * u[1], 1 + 0.25 * affine * u[2]
    shear = 0.3 * affine * u[3]
    shift = 0.3 * affine * u[4:6]  # affine_grid coordinates span [-1, 1]: 0.3 is 15% of the side
    rotation = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]],
                            dtype=torch.float64)
    linear = rotation @ torch.tensor([[1.0, shear], [0.0, 1.0]], dtype=torch.float64) @ torch.diag(
        torch.stack([scale_x, scale_y]))
    theta = torch.cat([linear, shift[:, None]], 1).float()
    n = height * width
    order = torch.arange(n)
    moved = torch.randperm(n, generator=generator)[: round(permute * n)]
    order[moved] = moved[torch.randperm(len(moved), generator=generator)]
    return theta, order


def deformed(dataset, seed: int = 0, *, affine: float = 1.0, permute: float = 0.1) -> ArrayDataset:
    """`dataset` (an in-memory ArrayDataset) with the fixed random transformation of each class applied."""
    images, labels = getattr(dataset, "images", None), getattr(dataset, "labels", None)
    if images is None or labels is None or images.ndim != 4:
        raise ValueError("deformed() needs an in-memory data set with .images (N, C, H, W) and .labels, such as "
                         "mipp.data.load_dataset returns (for imagefolder pass in_memory=True)")
    if affine < 0 or not 0 <= permute <= 1:
        raise ValueError(f"affine must be >= 0 and permute in [0, 1], got affine={affine}, permute={permute}")
    out = torch.empty_like(images)
    _, channels, height, width = images.shape
    for label in torch.unique(labels).tolist():
        index = torch.nonzero(labels == label).flatten()
        theta, order = class_transform(seed, label, height, width, affine, permute)
        x = images[index]
        grid = F.affine_grid(theta.expand(len(index), 2, 3), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        out[index] = x.flatten(2)[:, :, order].view(len(index), channels, height, width)
    return ArrayDataset(out, labels, name=f"{getattr(dataset, 'name', '')}+deform", split=getattr(dataset, "split", ""),
                        classes=getattr(dataset, "classes", None), mean=getattr(dataset, "mean", None),
                        std=getattr(dataset, "std", None))
