"""Progressive pruning by masking, shared by IterSNIP, IterGraSP and SynFlow.

Iterative pruning at initialisation (Tanaka et al. 2020, SynFlow; de Jorge et al. 2021, FORCE / Iter-SNIP) removes
units in `rounds` steps instead of one: each round re-scores the network with the units removed so far masked out
(their readers' input weights zeroed), then removes more, following an exponential schedule of the kept fraction,
kept(k) = (1 - budget)^(k / rounds), on the budget's own metric. The last round ranks globally with
`plan_from_scores`, so the final Plan hits the budget exactly like any one-shot method. Units removed in an earlier
round stay below every surviving unit in the ranking (the earlier, the lower).
"""
from __future__ import annotations

from typing import Callable

import torch

from mipp.methods.base import Budget, PruneContext, plan_from_scores
from mipp.plan import Plan

# (units removed so far per group, round index) -> unit scores of the network with those units masked
ScoreFn = Callable[[dict[str, set[int]], int], dict[str, torch.Tensor]]


def exponential_schedule(fraction: float, rounds: int) -> list[float]:
    """Fraction of the metric removed after each round: 1 - (1 - fraction)^(k / rounds), k = 1..rounds."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    return [1.0 - (1.0 - fraction) ** (k / rounds) for k in range(1, rounds + 1)]


def ranking_with_history(scores: dict[str, torch.Tensor], removed_at: dict[str, torch.Tensor], rounds: int
                         ) -> dict[str, torch.Tensor]:
    """Scores where units removed in round r (removed_at >= 0) sit below every live unit, earlier rounds lowest."""
    live = torch.cat([s.double()[removed_at[k] < 0] for k, s in scores.items()])
    if live.numel() and not torch.isfinite(live).all():
        raise ValueError(
            "scores became infinite or NaN during iterative pruning: the model's activations overflow; scale the "
            "inputs or weights down (SynFlow runs in float64 already)"
        )
    floor = float(live.min()) if live.numel() else 0.0
    gap = 1.0 + abs(floor)
    ranked = {}
    for key, score in scores.items():
        score = score.double().clone()
        gone = removed_at[key] >= 0
        score[gone] = floor - gap * (1 + rounds - removed_at[key][gone].double())
        ranked[key] = score
    return ranked


def prune_progressively(ctx: PruneContext, budget: Budget, score: ScoreFn, *, rounds: int, method: str,
                        settings: dict) -> Plan:
    """Run the schedule: score the masked network, remove to the round's target, repeat; the last round decides."""
    removed_at = {g.key: torch.full((g.size,), -1, dtype=torch.long) for g in ctx.units.groups}
    schedule = exponential_schedule(budget.fraction, rounds)
    for k, fraction in enumerate(schedule):
        removed = {key: set(torch.nonzero(r >= 0).flatten().tolist()) for key, r in removed_at.items()}
        ranked = ranking_with_history(score(removed, k), removed_at, rounds)
        if k == rounds - 1:
            return plan_from_scores(ctx, ranked, budget, method, {**settings, "rounds": rounds})
        step = plan_from_scores(ctx, ranked, Budget(fraction, budget.metric), method)
        for key in removed_at:
            newly = [i for i in step.removed(key) if removed_at[key][i] < 0]
            removed_at[key][newly] = k
    raise AssertionError("unreachable: the schedule has at least one round")
