"""Ablations that separate where MIPP's advantage comes from: its per-layer widths, or its choice inside a layer.

- `mipp-widths` (option `within="random"` or `"l1"`): MIPP chooses how many units every group keeps (its Plan at the
  budget, with any MIPP option such as `features="patches"`); inside each group the kept units are then chosen by
  random scores (seeded) or by the L1 norm of their weights instead. All units of a group cost the same, so the
  costs equal MIPP's exactly.
- `mipp-uniform`: every group keeps the same share of its units (the share bisected to meet the budget, the
  collapse guard respected), and MIPP chooses which: the output-to-input sweep removes, in each group, units in
  MIPP's test order (least informative first, each test conditioned on the removals before it) until the group is
  at its width.

Where MIPP beats random or L1 at equal cost, the first says how much of that is the widths, the second how much is
the choice inside a layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mipp.methods.base import Budget, PruneContext, finish_plan
from mipp.methods.mipp import MIPPSettings, prepare, sweep
from mipp.methods.mipp import select as select_mipp
from mipp.methods.random_magnitude import weight_norms
from mipp.methods.registry import register
from mipp.plan import Plan, UnitDecision

WITHIN = ("random", "l1")


@register("mipp-widths", summary="ablation: MIPP's per-layer widths, units inside each layer chosen by random or L1")
def select_widths(ctx: PruneContext, budget: Budget, within: str = "random", **options) -> Plan:
    if within not in WITHIN:
        raise ValueError(f"within must be one of {WITHIN}, got {within!r}")
    plan = select_mipp(ctx, budget, MIPPSettings(**options))
    if within == "random":
        generator = torch.Generator().manual_seed(ctx.seed)
        scores = {g.key: torch.rand(g.size, generator=generator, dtype=torch.float64) for g in ctx.units.groups}
    else:
        scores = weight_norms(ctx.model, ctx.units, 1)
    kept, decisions = {}, {}
    for group in ctx.units.groups:
        order = torch.argsort(scores[group.key].double(), descending=True, stable=True).tolist()
        kept[group.key] = sorted(order[: len(plan.kept[group.key])])
        decisions[group.key] = [UnitDecision(unit=i, kept=i in set(kept[group.key]),
                                             score=float(scores[group.key][i])) for i in range(group.size)]
    settings = {**plan.settings, "within": within}
    return finish_plan(ctx, kept, "mipp-widths", settings, decisions,
                       {"mipp_kept": plan.kept, "selection_seconds": plan.stats.get("selection_seconds")})


@dataclass
class WidthRule:
    """Remove units in the sweep's test order until each group is down to its width."""

    widths: dict[str, int]
    left: dict[str, int] = field(default_factory=dict)  # group -> units still to remove
    prices_units = False

    def removes(self, group: str, result, lost_share, unit: int | None = None) -> bool:
        if self.left.get(group, 0) <= 0:
            return False
        self.left[group] -= 1
        return True


def uniform_widths(ctx: PruneContext, budget: Budget, steps: int = 40) -> dict[str, int]:
    """Per group, the width that keeps the same share of every group, the share bisected so that the budget's
    metric is removed as closely as the rounding of widths allows."""
    def widths(share: float) -> dict[str, int]:
        return {g.key: max(ctx.min_width(g.size), min(g.size, round(share * g.size))) for g in ctx.units.groups}

    def removed(share: float) -> float:
        return ctx.cost.fractions_removed({k: list(range(w)) for k, w in widths(share).items()})[budget.metric]

    low, high = 0.0, 1.0  # kept share: removed(low) >= target >= removed(high)
    for _ in range(steps):
        middle = (low + high) / 2
        low, high = (middle, high) if removed(middle) >= budget.fraction else (low, middle)
    best = min((low, high), key=lambda s: abs(removed(s) - budget.fraction))
    return widths(best)


@register("mipp-uniform", summary="ablation: the same share of units kept in every layer, chosen by MIPP's sweep")
def select_uniform(ctx: PruneContext, budget: Budget, **options) -> Plan:
    settings = MIPPSettings(**options)
    ctx.check_reachable(budget)
    widths = uniform_widths(ctx, budget)
    features, estimator, record = prepare(ctx, settings, budget)
    rule = WidthRule(widths, {g.key: g.size - widths[g.key] for g in ctx.units.groups})
    result = sweep(ctx, features, estimator, rule, settings.confidence, settings.order)
    record["budget"] = {"fraction": budget.fraction, "metric": budget.metric}
    return finish_plan(ctx, result.kept, "mipp-uniform", record, result.decisions, {"widths": widths})

