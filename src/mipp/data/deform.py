"""Deformed data, for the paper's deformed-data study: images go through fixed random transformations.

``deformed(dataset, seed=0, affine=1.0, permute=0.1, per="class" | "image", transforms=10)``: a transformation is
an affine warp (rotation up to +-45 deg, scale 1 +- 0.25, shear +- 0.3, shift +- 15% of the side, all times
``affine``) followed by a shuffle of a random ``permute`` share of the pixel positions (same positions in every
channel), drawn from a generator seeded by (seed, its index) only, so it is the same for the train and the test
split and for every call.  Warping samples bilinearly and repeats the border pixels outside the image (the
background, for Fashion-MNIST).

- ``per="image"`` (the paper's study): a fixed set of ``transforms`` transformations; each image gets one of them at
  random with equal probability, its choice seeded by (seed, split, image index), so it stays fixed through
  training, pruning and retraining.  The choice is independent of the label.
- ``per="class"`` (the default, kept so that earlier run records still mean what they say): every image of class c
  goes through transformation c.  This gives the label away (an unpruned LeNet-5 reached 99.8% on it against 90.3%
  on clean data), so it does not test what the paper meant; use ``per="image"``.

Why: a deformation changes which input statistics carry the label; a method that prunes the trained network can
use what training learned, while pruning at initialisation sees only the deformed statistics.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mipp.io import derived_seed

from .base import ArrayDataset


def transform(seed: int, index: int, height: int, width: int, affine: float = 1.0,
              permute: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(theta (2, 3) for F.affine_grid, permutation of the H*W pixel positions) of transformation `index` (the
    class, with per="class")."""
    generator = torch.Generator().manual_seed(derived_seed(seed, "deform", int(index)))
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


PER = ("class", "image")


def deformed(dataset, seed: int = 0, *, affine: float = 1.0, permute: float = 0.1, per: str = "class",
             transforms: int = 10) -> ArrayDataset:
    """`dataset` (an in-memory ArrayDataset) with the fixed random transformations applied (see the module)."""
    images, labels = getattr(dataset, "images", None), getattr(dataset, "labels", None)
    if images is None or labels is None or images.ndim != 4:
        raise ValueError("deformed() needs an in-memory data set with .images (N, C, H, W) and .labels, such as "
                         "mipp.data.load_dataset returns (for imagefolder pass in_memory=True)")
    if affine < 0 or not 0 <= permute <= 1:
        raise ValueError(f"affine must be >= 0 and permute in [0, 1], got affine={affine}, permute={permute}")
    if per not in PER or transforms < 1:
        raise ValueError(f"per must be one of {PER} and transforms >= 1, got per={per!r}, transforms={transforms}")
    split = getattr(dataset, "split", "")
    if per == "class":
        choice = labels
    else:
        generator = torch.Generator().manual_seed(derived_seed(seed, "deform-choice", split))
        choice = torch.randint(transforms, (len(labels),), generator=generator)
    out = torch.empty_like(images)
    _, channels, height, width = images.shape
    for index in torch.unique(choice).tolist():
        members = torch.nonzero(choice == index).flatten()
        theta, order = transform(seed, index, height, width, affine, permute)
        x = images[members]
        grid = F.affine_grid(theta.expand(len(members), 2, 3), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        out[members] = x.flatten(2)[:, :, order].view(len(members), channels, height, width)
    return ArrayDataset(out, labels, name=f"{getattr(dataset, 'name', '')}+deform", split=split,
                        classes=getattr(dataset, "classes", None), mean=getattr(dataset, "mean", None),
                        std=getattr(dataset, "std", None))
