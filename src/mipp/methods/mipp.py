"""MIPP: keep, in every layer, the units whose transfer entropy to the already pruned next layer is significant.

Groups are visited from the output back to the input. Within a group, units are tested least-informative first
(MI ordering) and removed at once when redundant, so each test is conditioned on the units still kept (TERC).
Two stopping rules: confidence mode (the paper's knob x: keep a unit when its transfer entropy is significant with
confidence x) and budget mode (one global share of each layer's information that may be lost, found by bisection
to remove a target fraction of units, parameters or MACs; see InformationShareRule). No group ever falls below its
minimum width.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field

import torch

from mipp.activations import Activations, capture
from mipp.methods.base import Budget, PruneContext, finish_plan
from mipp.methods.registry import register
from mipp.mi import estimator_class, get_estimator
from mipp.mi.base import TestResult
from mipp.plan import Plan, UnitDecision
from mipp.units import UnitGroup


@dataclass
class MIPPSettings:
    estimator: str = "gaussian"
    estimator_options: dict = field(default_factory=dict)
    confidence: float = 0.95  # the paper's x, in (0.5, 1)
    pool: int | None = None  # None: spatial mean per channel; k: k x k grid features per channel
    max_bisection_steps: int = 30

    def __post_init__(self):
        if not 0.5 <= self.confidence < 1.0:
            raise ValueError(f"confidence must be in [0.5, 1), got {self.confidence}; the paper sweeps e.g. 0.9-0.999")


@dataclass
class SweepResult:
    kept: dict[str, list[int]]
    decisions: dict[str, list[UnitDecision]]


def target_of(group: UnitGroup, acts: Activations, kept: dict[str, list[int]], producer_of: dict[str, str]):
    """Y for a group: the kept activations of every layer that reads it (the logits for the last hidden layer).

    Returns Y and a signature of what it is made of (which sources, which of their units), for caching."""
    parts, signature = [], []
    for reader in group.readers:
        source = producer_of.get(reader)
        if source is not None and source != group.key and source not in {s for s, _ in signature}:
            signature.append((source, tuple(kept[source])))
            parts.append(acts.units[source][:, kept[source]].flatten(1))
        elif source is None and reader in acts.outputs and reader not in {s for s, _ in signature}:
            signature.append((reader, ()))
            parts.append(acts.outputs[reader])
    if not parts:
        raise ValueError(f"group {group.key!r} has no captured reader to serve as its target")
    return torch.cat(parts, 1), (group.key, tuple(signature))


class ConfidenceRule:
    """The paper's rule: keep a unit when its transfer entropy is significant at the session's confidence."""

    needs_layer_mi = False

    def start(self, layer_mi: float | None) -> None:
        pass

    def keep(self, result: TestResult) -> bool:
        return result.significant


class InformationShareRule:
    """Budget rule: a layer may lose at most `share` of its mutual information with its target.

    Removing unit i loses exactly its transfer entropy (chain rule: I(X_S;Y) - I(X_S\\i;Y) = I(X_i;Y|X_S\\i)), so
    the sweep removes a unit while the lost information, summed, stays within share * I(X_layer;Y). An absolute
    threshold on each unit's transfer entropy would cascade: every removal lowers the others' transfer entropies,
    and in layers of many similar units one threshold then removes almost nothing or almost everything.
    """

    needs_layer_mi = True

    def __init__(self, share: float):
        self.share = share

    def start(self, layer_mi: float | None) -> None:
        self.allowance, self.spent = self.share * max(0.0, layer_mi), 0.0

    def keep(self, result: TestResult) -> bool:
        loss = max(0.0, float(result.estimate))
        if self.spent + loss <= self.allowance:
            self.spent += loss
            return False
        return True


def sweep(ctx: PruneContext, acts: Activations, estimator, rule, confidence: float,
          cache: dict | None = None) -> SweepResult:
    """One output-to-input pass over every group; `rule` decides from each unit's transfer-entropy test.

    `cache` (budget mode, which sweeps many times) keeps each layer's fresh session, keyed by what its target is
    made of: a layer whose readers kept the same units as in an earlier sweep starts from a copy."""
    producer_of = ctx.units.producer_group()
    kept = {g.key: list(range(g.size)) for g in ctx.units.groups}
    decisions = {}
    for group in ctx.units.groups:  # already ordered from the output to the input
        units = acts.units[group.key]
        target, signature = target_of(group, acts, kept, producer_of)
        if cache is None or signature not in cache:
            session = estimator.session(units, target, confidence)
            layer_mi = float(estimator.cmi(units.flatten(1), target)) if rule.needs_layer_mi else None
            fresh = (session, session.unit_mi(), layer_mi)
            if cache is not None:
                cache[signature] = (copy.deepcopy(session), *fresh[1:])
        else:
            fresh = (copy.deepcopy(cache[signature][0]), *cache[signature][1:])
        session, unit_mi, layer_mi = fresh
        rule.start(layer_mi)
        order = torch.argsort(unit_mi, stable=True).tolist()
        records = {i: UnitDecision(unit=i, kept=True, mi=float(unit_mi[i])) for i in range(group.size)}
        floor = ctx.min_width(group.size)
        for rank, unit in enumerate(order):
            if len(session.kept) <= floor:
                break  # collapse guard: the rest stay untested
            result = session.transfer_entropy(unit)
            record = records[unit]
            record.rank, record.score, record.p_value = rank, float(result.estimate), float(result.p_value)
            if not rule.keep(result):
                session.remove(unit)
                record.kept = False
        kept[group.key] = sorted(session.kept)
        decisions[group.key] = [records[i] for i in range(group.size)]
    return SweepResult(kept, decisions)


def select(ctx: PruneContext, budget: Budget | None = None, settings: MIPPSettings | None = None,
           acts: Activations | None = None) -> Plan:
    """Run MIPP on the context's model and calibration data; returns the Plan."""
    settings = settings or MIPPSettings()
    started = time.perf_counter()
    if acts is None:
        acts = capture(ctx.model, ctx.units, ctx.data, n_samples=ctx.n_samples, pool=settings.pool,
                       seed=ctx.seed, device=ctx.device)
    capture_seconds = time.perf_counter() - started
    _check_samples(acts, settings)
    estimator = get_estimator(settings.estimator, **{"seed": ctx.seed, **settings.estimator_options})
    record = {"estimator": settings.estimator, "estimator_options": settings.estimator_options,
              "pool": settings.pool, "n_samples": acts.n_samples, "min_units": ctx.min_units}
    if budget is None:
        result = sweep(ctx, acts, estimator, ConfidenceRule(), settings.confidence)
        record["confidence"] = settings.confidence
        extra = {}
    else:
        ctx.check_reachable(budget)
        result, threshold, steps = _bisect_threshold(ctx, acts, estimator, budget, settings)
        record["budget"] = {"fraction": budget.fraction, "metric": budget.metric}
        extra = {"information_share": threshold, "bisection_steps": steps}
    stats = {"capture_seconds": capture_seconds, "selection_seconds": time.perf_counter() - started, **extra}
    return finish_plan(ctx, result.kept, "mipp", record, result.decisions, stats)


@register("mipp", needs_budget=False,
          summary="Mutual-information preserving pruning (Westphal et al. 2024): output-to-input TERC sweep")
def select_mipp(ctx: PruneContext, budget: Budget | None = None, **options) -> Plan:
    """The registered method: `select` with MIPPSettings(**options)."""
    return select(ctx, budget, MIPPSettings(**options))


def _bisect_threshold(ctx, acts, estimator, budget: Budget, settings: MIPPSettings):
    """Find the information share whose sweep removes the budget's fraction (bisection on its logarithm)."""
    cache: dict = {}

    def run(share):
        result = sweep(ctx, acts, estimator, InformationShareRule(share), settings.confidence, cache)
        return result, ctx.cost.fractions_removed(result.kept)[budget.metric]

    low, high = math.log(1e-7), 0.0  # share of each layer's information that may be lost: ~nothing .. all
    best = None
    for step in range(1, settings.max_bisection_steps + 1):
        middle = (low + high) / 2
        result, removed = run(math.exp(middle))
        gap = removed - budget.fraction
        if best is None or abs(gap) < abs(best[2]):
            best = (result, math.exp(middle), gap)
        if abs(gap) <= budget.tolerance or high - low < 1e-4:  # on target, or the share is pinned down
            break
        low, high = (middle, high) if gap < 0 else (low, middle)
    return best[0], best[1], step


def _check_samples(acts: Activations, settings: MIPPSettings) -> None:
    """Enough calibration samples for the estimator (its `min_samples`); a warning when a ridge-regularised one has
    fewer samples than the widest layer has features."""
    estimator_type = estimator_class(settings.estimator)
    n = acts.n_samples
    widest = max(v.shape[1] * v.shape[2] for v in acts.units.values())
    if n < estimator_type.min_samples:
        raise ValueError(
            f"only {n} calibration samples: the {settings.estimator} estimator needs at least "
            f"{estimator_type.min_samples} (a few thousand recommended, e.g. n_samples=2000)"
        )
    if estimator_type.ridge_regularised and n < widest:
        warnings.warn(
            f"{n} calibration samples for a layer of {widest} features: covariances are ridge-regularised, but "
            f"use at least {2 * widest} samples for reliable decisions", stacklevel=3)
