"""The method registry: every pruning method by name, as `select(ctx, budget, **options) -> Plan`.

Two ways in:
- `register(name)` decorates a full `select(ctx, budget, **options) -> Plan`, for methods that are not
  score-then-rank (MIPP's sweep, IMP's re-training, the iterative methods that re-score between rounds);
- `register_criterion(name)` decorates a scoring function `score(ctx, **options) -> UnitScores` (one score per
  unit, higher = more important); its `select` is the shared global ranking, `plan_from_scores`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from mipp.methods.base import Budget, PruneContext, plan_from_scores
from mipp.plan import Plan


@dataclass(frozen=True)
class MethodInfo:
    name: str
    select: Callable  # (ctx, budget, **options) -> Plan
    regimes: tuple[str, ...]  # "init" (at initialisation), "trained" (after training)
    needs_budget: bool  # False: the method can decide how much to prune by itself (MIPP's confidence mode)
    summary: str
    score: Callable | None = None  # score-based criteria: (ctx, **options) -> UnitScores; None for full selects


METHODS: dict[str, MethodInfo] = {}


def register(name: str, *, regimes=("init", "trained"), needs_budget=True, summary=""):
    """Decorator: register a full `select(ctx, budget, **options) -> Plan` as method `name`."""
    def decorate(select):
        METHODS[name] = MethodInfo(name, select, tuple(regimes), needs_budget, summary)
        return select
    return decorate


def register_criterion(name: str, *, regimes=("init", "trained"), summary=""):
    """Decorator: register `score(ctx, **options) -> UnitScores` as method `name`, ranked globally into a Plan."""
    def decorate(score):
        def select(ctx: PruneContext, budget: Budget, **options) -> Plan:
            result = score(ctx, **options)
            return plan_from_scores(ctx, result.scores, budget, name, result.settings, ranks=result.ranks)

        METHODS[name] = MethodInfo(name, select, tuple(regimes), True, summary, score)
        return score
    return decorate


def get_method(name: str) -> MethodInfo:
    if name not in METHODS:
        raise ValueError(f"unknown pruning method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


def method_names() -> list[str]:
    return sorted(METHODS)
