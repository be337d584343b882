"""Data-free reference baselines: random units and weight magnitude.

- random: every unit gets a uniform random score (seeded by ctx.seed); the floor any criterion must beat.
- magnitude (Li et al. 2017, "Pruning Filters for Efficient ConvNets"): a unit's score is the L1 (`magnitude-l1`,
  `magnitude`) or L2 (`magnitude-l2`) norm of its own weights: the output slices of every conv / linear layer that
  produces it (all partners of a residual addition), without biases or batch-norm parameters. Readers' input
  slices are left out by default (include_readers=True adds them, as Torch-Pruning's group norm does).

Both rank globally (`plan_from_scores`) and apply in either regime.
"""
from __future__ import annotations

import torch

from mipp.methods import register
from mipp.methods.base import Budget, PruneContext, plan_from_scores
from mipp.units import UnitGraph


@register("random", summary="uniform random unit scores (seeded)")
def select_random(ctx: PruneContext, budget: Budget, **options):
    _no_options("random", options)
    generator = torch.Generator().manual_seed(ctx.seed)
    scores = {g.key: torch.rand(g.size, generator=generator, dtype=torch.float64) for g in ctx.units.groups}
    return plan_from_scores(ctx, scores, budget, "random")


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


def _select_magnitude(ctx: PruneContext, budget: Budget, p: int, name: str, include_readers: bool = False,
                      **options):
    _no_options(name, options)
    scores = weight_norms(ctx.model, ctx.units, p, include_readers=include_readers)
    return plan_from_scores(ctx, scores, budget, name, {"p": p, "include_readers": include_readers})


@register("magnitude", summary="L1 norm of each unit's weights (Li et al. 2017); option p=2 for L2")
def select_magnitude(ctx: PruneContext, budget: Budget, p: int = 1, include_readers: bool = False, **options):
    return _select_magnitude(ctx, budget, p, "magnitude", include_readers, **options)


@register("magnitude-l1", summary="L1 norm of each unit's weights (Li et al. 2017)")
def select_magnitude_l1(ctx: PruneContext, budget: Budget, include_readers: bool = False, **options):
    return _select_magnitude(ctx, budget, 1, "magnitude-l1", include_readers, **options)


@register("magnitude-l2", summary="L2 norm of each unit's weights")
def select_magnitude_l2(ctx: PruneContext, budget: Budget, include_readers: bool = False, **options):
    return _select_magnitude(ctx, budget, 2, "magnitude-l2", include_readers, **options)


def _no_options(method: str, options: dict) -> None:
    if options:
        raise TypeError(f"method {method!r} got unknown option(s) {sorted(options)}")
