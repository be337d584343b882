"""Data-free reference baselines: random units and weight magnitude.

- random: every unit gets a uniform random score (seeded by ctx.seed); the floor any criterion must beat.
- magnitude (Li et al. 2017, "Pruning Filters for Efficient ConvNets"): a unit's score is the L1 (`magnitude-l1`,
  `magnitude`) or L2 (`magnitude-l2`) norm of its own weights: the output slices of every conv / linear layer that
  produces it (all partners of a residual addition), without biases or batch-norm parameters. Readers' input
  slices are left out by default (include_readers=True adds them, as Torch-Pruning's group norm does).

Both are score-based criteria, ranked globally, and apply in either regime.
"""
from __future__ import annotations

import torch

from mipp.methods.base import PruneContext, UnitScores
from mipp.methods.registry import register_criterion
from mipp.units import UnitGraph


@register_criterion("random", summary="uniform random unit scores (seeded)")
def score_random(ctx: PruneContext) -> UnitScores:
    generator = torch.Generator().manual_seed(ctx.seed)
    return UnitScores({g.key: torch.rand(g.size, generator=generator, dtype=torch.float64) for g in ctx.units.groups})


def weight_norms(model: torch.nn.Module, units: UnitGraph, p: int = 1, *, include_readers: bool = False
                 ) -> dict[str, torch.Tensor]:
    """Per group, the Lp norm of each unit's producer weights (and readers' input slices if asked)."""
    if p not in (1, 2):
        raise ValueError(f"magnitude norm p must be 1 or 2, got {p!r}")
    norms = {}
    for group in units.groups:
        names = group.producers + (group.readers if include_readers else [])
        # only conv / linear weights enter: biases and norm parameters are absent, so reduce skips them
        powered = {f"{name}.weight": model.get_submodule(name).weight.detach().cpu().abs().pow(p)
                   for name in names}
        norms[group.key] = group.reduce(powered, include_readers=include_readers).pow(1.0 / p)
    return norms


@register_criterion("magnitude", summary="L1 norm of each unit's weights (Li et al. 2017); option p=2 for L2")
def score_magnitude(ctx: PruneContext, p: int = 1, include_readers: bool = False) -> UnitScores:
    return UnitScores(weight_norms(ctx.model, ctx.units, p, include_readers=include_readers),
                      {"p": p, "include_readers": include_readers})


@register_criterion("magnitude-l1", summary="L1 norm of each unit's weights (Li et al. 2017)")
def score_magnitude_l1(ctx: PruneContext, include_readers: bool = False) -> UnitScores:
    return score_magnitude(ctx, 1, include_readers)


@register_criterion("magnitude-l2", summary="L2 norm of each unit's weights")
def score_magnitude_l2(ctx: PruneContext, include_readers: bool = False) -> UnitScores:
    return score_magnitude(ctx, 2, include_readers)
