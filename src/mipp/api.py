"""`mipp.prune`: one call from a model and some data to a physically smaller model and its Plan."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from mipp.measure import CostModel
from mipp.methods import Budget, PruneContext, get_method
from mipp.plan import Plan
from mipp.units import example_input_for, find_units


def make_context(model: nn.Module, data, *, example_input=None, min_units=1, n_samples=2000, seed=0,
                 device=None) -> PruneContext:
    example_input = example_input_for(model, example_input)
    units = find_units(model, example_input)
    cost = CostModel.build(model, units, example_input)
    return PruneContext(model, units, data, example_input, cost, min_units=min_units, seed=seed,
                        n_samples=n_samples, device=device)


def as_budget(budget, metric: str = "units") -> Budget | None:
    if budget is None or isinstance(budget, Budget):
        return budget
    return Budget(float(budget), metric)


def select_plan(model: nn.Module, data, *, method: str = "mipp", budget=None, metric: str = "units",
                min_units=1, n_samples: int = 2000, seed: int = 0, example_input=None, device=None,
                **options) -> Plan:
    """Decide which units to keep, without changing the model."""
    info = get_method(method)
    budget = as_budget(budget, metric)
    if budget is None and info.needs_budget:
        raise ValueError(f"method {method!r} needs a budget: pass budget=0.5 (and metric='units'|'params'|'macs')")
    torch.manual_seed(seed)
    ctx = make_context(model, data, example_input=example_input, min_units=min_units, n_samples=n_samples,
                       seed=seed, device=device)
    return info.select(ctx, budget, **options)


def prune(model: nn.Module, data, *, method: str = "mipp", budget=None, metric: str = "units", min_units=1,
          n_samples: int = 2000, seed: int = 0, example_input=None, inplace: bool = False, device=None,
          **options) -> tuple[nn.Module, Plan]:
    """Prune `model` with `method` on calibration `data`; returns (smaller model, Plan).

    budget None (MIPP only): confidence mode, the sparsity follows from `confidence` (default 0.95).
    budget 0.5 with metric "units" | "params" | "macs": remove that fraction of the whole network.
    options go to the method (MIPP: estimator="gaussian"|"ksg"|"proxy", confidence, pool, estimator_options).
    """
    plan = select_plan(model, data, method=method, budget=budget, metric=metric, min_units=min_units,
                       n_samples=n_samples, seed=seed, example_input=example_input, device=device, **options)
    pruned = model if inplace else copy.deepcopy(model)
    plan.apply(pruned, example_input)
    return pruned, plan
