"""Every pruning method, MIPP and the baselines, by name: `get_method(name).select(ctx, budget, **options) -> Plan`.

The registry lives in `mipp.methods.registry`; the built-in method modules are imported below, which registers
them.

Adding a score-based criterion is one function in one module, plus its test. The function gets the context
(model, unit groups, calibration data, seed) and its options, and returns one score per unit of every group
(higher = more important); the shared global ranking (`plan_from_scores`) turns the scores and the budget into a
Plan, with the method's name and the returned settings recorded:

    from mipp.methods.base import PruneContext, UnitScores
    from mipp.methods.registry import register_criterion

    @register_criterion("squared-weights", summary="sum of the squares of each unit's own weights")
    def score_squared_weights(ctx: PruneContext, include_readers: bool = False) -> UnitScores:
        squared = {name: p.detach().cpu().pow(2) for name, p in ctx.model.named_parameters()}
        scores = {group.key: group.reduce(squared, include_readers=include_readers) for group in ctx.units.groups}
        return UnitScores(scores, settings={"include_readers": include_readers})

Put it in an existing module, or in a new one listed in the imports below. Its test calls
`get_method("squared-weights").score(ctx)` and checks the scores (see tests/test_criteria_registry.py). Methods
that are not score-then-rank register a full `select(ctx, budget, **options) -> Plan` with `register` instead.
"""
from __future__ import annotations

from mipp.methods.base import BUDGET_METRICS, Budget, PruneContext, UnitScores, plan_from_scores
from mipp.methods.registry import METHODS, MethodInfo, get_method, method_names, register, register_criterion

# the built-in methods, registered on import
from mipp.methods import (ablations, imp, mipp, prospr, random_magnitude, saliency, synflow, thinet,  # noqa: E402, F401
                          torch_pruning_criteria)

__all__ = ["BUDGET_METRICS", "Budget", "METHODS", "MethodInfo", "PruneContext", "UnitScores", "get_method",
           "method_names", "plan_from_scores", "register", "register_criterion"]
