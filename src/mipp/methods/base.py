"""What every pruning method shares: the budget, the context it works in, and global ranking into a Plan.

A method is a function (context, budget, settings) -> Plan. Score-based criteria only produce one score per unit
(higher = more important, `UnitScores`); `plan_from_scores` turns those into a Plan that removes the lowest-scored
units across the whole network until the budget is met, never emptying a group.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from mipp.measure import CostModel
from mipp.plan import Plan, UnitDecision
from mipp.units import UnitGraph

BUDGET_METRICS = ("units", "params", "macs")


@dataclass(frozen=True)
class Budget:
    """Remove `fraction` of the network's units, parameters or MACs (counted over the prunable groups' model)."""

    fraction: float
    metric: str = "units"
    tolerance: float = 0.005

    def __post_init__(self):
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"budget fraction must be in (0, 1), got {self.fraction}: e.g. 0.5 removes half")
        if self.metric not in BUDGET_METRICS:
            raise ValueError(f"budget metric {self.metric!r} is unknown; choose one of {BUDGET_METRICS}")

    def __str__(self) -> str:
        return f"{100 * self.fraction:g}% of {self.metric}"


@dataclass
class PruneContext:
    """Everything a method may look at: the model, its units, the calibration data and the cost counter."""

    model: nn.Module
    units: UnitGraph
    data: object
    example_input: torch.Tensor
    cost: CostModel
    min_units: int | float = 1
    seed: int = 0
    n_samples: int = 2000
    device: str | None = None
    # position-sampled reader moments a method captured (MIPP, features="patches"): reconstruction reuses them
    reader_moments: dict | None = field(default=None, repr=False)

    def min_width(self, size: int) -> int:
        """The collapse guard: how many units a group of `size` keeps at least (>= 1 always)."""
        if isinstance(self.min_units, float) and self.min_units < 1:
            return max(1, int(round(self.min_units * size)))
        return max(1, min(int(self.min_units), size))

    def max_removable(self, metric: str) -> float:
        """Largest fraction of `metric` removable when every group sits at its minimum width."""
        kept = {g.key: list(range(self.min_width(g.size))) for g in self.units.groups}
        return self.cost.fractions_removed(kept)[metric]

    def check_reachable(self, budget: Budget) -> None:
        limit = self.max_removable(budget.metric)
        if budget.fraction > limit + 1e-9:
            left = (f" ({len(self.units.excluded)} groups mipp cannot prune safely stay whole: "
                    f"{', '.join(list(self.units.excluded)[:3])}{', ...' if len(self.units.excluded) > 3 else ''})"
                    if self.units.excluded else "")
            raise ValueError(
                f"budget {budget} is unreachable: with every group at its minimum width ({self.min_units}) at most "
                f"{100 * limit:.1f}% of {budget.metric} can be removed{left}; lower the budget or min_units"
            )


@dataclass
class UnitScores:
    """What a score-based criterion computes: per group, one score per unit (higher = more important)."""

    scores: dict[str, torch.Tensor]
    settings: dict = field(default_factory=dict)  # how the scores were made, recorded in the Plan
    ranks: dict[str, list[int]] | None = None  # optional: each unit's position in the criterion's own order


def plan_from_scores(ctx: PruneContext, scores: dict[str, torch.Tensor], budget: Budget, method: str,
                     settings: dict | None = None, ranks: dict[str, list[int]] | None = None) -> Plan:
    """Global ranking: remove the lowest-scored units network-wide until `budget` is met (bisection on the count).

    `ranks`, if given, is recorded in each unit's decision."""
    ctx.check_reachable(budget)
    candidates = []  # (score, group key, unit), the guard's protected units excluded
    for group in ctx.units.groups:
        score = scores[group.key].double()
        protected = set(torch.argsort(score, descending=True, stable=True)[: ctx.min_width(group.size)].tolist())
        candidates += [(float(score[i]), group.key, i) for i in range(group.size) if i not in protected]
    candidates.sort(key=lambda c: (c[0], c[1], c[2]))

    def kept_after(n_removed: int) -> dict[str, list[int]]:
        return _kept_without(ctx, _removed_by(candidates[:n_removed]))

    low, high = 0, len(candidates)
    while low < high:  # smallest number of removals that reaches the budget
        mid = (low + high) // 2
        if ctx.cost.fractions_removed(kept_after(mid))[budget.metric] >= budget.fraction - 1e-12:
            high = mid
        else:
            low = mid + 1
    n_removed = _closest(ctx, kept_after, low, budget)
    kept = kept_after(n_removed)
    if abs(ctx.cost.fractions_removed(kept)[budget.metric] - budget.fraction) > budget.tolerance:
        kept = _fill_to_budget(ctx, candidates, max(low - 1, 0), budget, kept)
        if abs(ctx.cost.fractions_removed(kept)[budget.metric] - budget.fraction) > budget.tolerance:
            kept = _give_back_to_budget(ctx, candidates, low, budget, kept)
    decisions = {
        g.key: [UnitDecision(unit=i, kept=i in set(kept[g.key]), score=float(scores[g.key][i]),
                             rank=None if ranks is None else ranks[g.key][i])
                for i in range(g.size)]
        for g in ctx.units.groups
    }
    return finish_plan(ctx, kept, method, {**(settings or {}), "budget": _budget_dict(budget)}, decisions)


def _closest(ctx, kept_after, n: int, budget: Budget) -> int:
    """Of n and n - 1 removals, the one whose fraction is closer to the target."""
    if n == 0:
        return 0
    above = ctx.cost.fractions_removed(kept_after(n))[budget.metric]
    below = ctx.cost.fractions_removed(kept_after(n - 1))[budget.metric]
    return n if abs(above - budget.fraction) <= abs(budget.fraction - below) else n - 1


def _fill_to_budget(ctx, candidates, n_prefix: int, budget: Budget, fallback: dict[str, list[int]]
                    ) -> dict[str, list[int]]:
    """When no prefix of the ranking lands within `budget.tolerance` (one unit can weigh several % of the MACs),
    continue from the last prefix below the target in rank order, skipping any unit whose removal would overshoot
    the target by more than the tolerance. Returns whichever of this and `fallback` is closer to the target."""
    removed = _removed_by(candidates[:n_prefix])
    for _, key, unit in candidates[n_prefix:]:
        if _reached(ctx, removed, budget) >= budget.fraction - budget.tolerance:
            break
        removed.setdefault(key, set()).add(unit)
        if _reached(ctx, removed, budget) > budget.fraction + budget.tolerance:
            removed[key].discard(unit)
    return _closer(ctx, _kept_without(ctx, removed), fallback, budget)


def _give_back_to_budget(ctx, candidates, n_prefix: int, budget: Budget, fallback: dict[str, list[int]]
                         ) -> dict[str, list[int]]:
    """The mirror of `_fill_to_budget`, for when filling still misses the tolerance: start from the shortest prefix
    that reaches the target and restore its removed units from the highest-ranked down, skipping any whose
    restoration would fall short by more than the tolerance. Filling from below can only add units of small
    cost, and on LeNet-5 at 90% of MACs it removed every fully connected unit but one per layer (still 0.6 points
    short; 15% accuracy) where restoring a few of them to the prefix past the target lands within it. Returns
    whichever of this and `fallback` is closer to the target (`fallback` on a tie)."""
    removed = _removed_by(candidates[:n_prefix])
    for _, key, unit in reversed(candidates[:n_prefix]):
        if _reached(ctx, removed, budget) <= budget.fraction + budget.tolerance:
            break
        removed[key].discard(unit)
        if _reached(ctx, removed, budget) < budget.fraction - budget.tolerance:
            removed[key].add(unit)
    return _closer(ctx, _kept_without(ctx, removed), fallback, budget)


def _removed_by(candidates) -> dict[str, set[int]]:
    removed: dict[str, set[int]] = {}
    for _, key, unit in candidates:
        removed.setdefault(key, set()).add(unit)
    return removed


def _kept_without(ctx, removed: dict[str, set[int]]) -> dict[str, list[int]]:
    return {g.key: [i for i in range(g.size) if i not in removed.get(g.key, ())] for g in ctx.units.groups}


def _reached(ctx, removed: dict[str, set[int]], budget: Budget) -> float:
    return ctx.cost.fractions_removed(_kept_without(ctx, removed))[budget.metric]


def _closer(ctx, kept: dict[str, list[int]], fallback: dict[str, list[int]], budget: Budget) -> dict[str, list[int]]:
    """`kept` if it is strictly closer to the budget's target than `fallback`, else `fallback`."""
    def error(plan):
        return abs(ctx.cost.fractions_removed(plan)[budget.metric] - budget.fraction)
    return kept if error(kept) < error(fallback) else fallback


def finish_plan(ctx: PruneContext, kept: dict[str, list[int]], method: str, settings: dict,
                decisions: dict | None = None, stats: dict | None = None) -> Plan:
    guard_hits = [g.key for g in ctx.units.groups if len(kept[g.key]) <= ctx.min_width(g.size) < g.size]
    plan = Plan(
        kept=kept,
        sizes={g.key: g.size for g in ctx.units.groups},
        method=method,
        settings=settings,
        seed=ctx.seed,
        example_shape=list(ctx.example_input.shape),
        decisions=decisions or {},
        guard_hits=guard_hits,
        excluded=dict(ctx.units.excluded),
    )
    plan.stats = {**ctx.cost.plan_stats(plan), **(stats or {})}
    return plan


def _budget_dict(budget: Budget) -> dict:
    return {"fraction": budget.fraction, "metric": budget.metric}
