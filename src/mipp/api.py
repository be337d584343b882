"""`mipp.prune`: one call from a model and some data to a physically smaller model and its Plan.

A call traces the model once (`find_units`): the unit graph it returns carries the dependency graph, the module
order, the MACs and the reading points, and is handed to the cost model, the method (capture, criteria) and surgery.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from mipp.measure import CostModel
from mipp.methods import Budget, PruneContext, get_method
from mipp.plan import Plan
from mipp.surgery import apply_plan
from mipp.units import example_input_for, find_units


def make_context(model: nn.Module, data, *, example_input=None, min_units=1, n_samples=2000, seed=0,
                 device=None) -> PruneContext:
    """Trace `model` (the one trace of a prune call) and gather what a method may look at."""
    example_input = example_input_for(model, example_input)
    units = find_units(model, example_input)
    cost = CostModel.build(model, units)
    return PruneContext(model, units, data, example_input, cost, min_units=min_units, seed=seed,
                        n_samples=n_samples, device=device)


def as_budget(budget, metric: str = "units") -> Budget | None:
    if budget is None or isinstance(budget, Budget):
        return budget
    return Budget(float(budget), metric)


def _select(model: nn.Module, data, method: str, budget, metric: str, context_options: dict,
            options: dict) -> tuple[Plan, PruneContext]:
    info = get_method(method)
    budget = as_budget(budget, metric)
    if budget is None and info.needs_budget:
        raise ValueError(f"method {method!r} needs a budget: pass budget=0.5 (and metric='units'|'params'|'macs')")
    torch.manual_seed(context_options["seed"])
    ctx = make_context(model, data, **context_options)
    return info.select(ctx, budget, **options), ctx


def select_plan(model: nn.Module, data, *, method: str = "mipp", budget=None, metric: str = "units",
                min_units=1, n_samples: int = 2000, seed: int = 0, example_input=None, device=None,
                **options) -> Plan:
    """Decide which units to keep, without changing the model."""
    context = dict(example_input=example_input, min_units=min_units, n_samples=n_samples, seed=seed, device=device)
    return _select(model, data, method, budget, metric, context, options)[0]


def prune(model: nn.Module, data, *, method: str = "mipp", budget=None, metric: str = "units", min_units=1,
          n_samples: int = 2000, seed: int = 0, example_input=None, inplace: bool = False, device=None,
          **options) -> tuple[nn.Module, Plan]:
    """Prune `model` with `method` on calibration `data`; returns (smaller model, Plan).

    budget None (MIPP only): confidence mode, the sparsity follows from `confidence` (default 0.95).
    budget 0.5 with metric "units" | "params" | "macs": remove that fraction of the whole network.
    options go to the method (MIPP: estimator="gaussian"|"ksg"|"proxy", confidence, pool, estimator_options).
    Unless `inplace`, the model is copied first and the copy is traced, scored and pruned: the caller's model is
    left untouched, and the one trace serves both the selection and the surgery.
    """
    target = model if inplace else copy.deepcopy(model)
    context = dict(example_input=example_input, min_units=min_units, n_samples=n_samples, seed=seed, device=device)
    plan, ctx = _select(target, data, method, budget, metric, context, options)
    apply_plan(target, plan, units=ctx.units)
    return target, plan
