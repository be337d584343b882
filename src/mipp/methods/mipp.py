"""MIPP: keep, in every layer, the units whose transfer entropy to the already pruned next layer is significant.

Groups are visited from the output back to the input. Within a group, units are tested one at a time and removed at
once when redundant, so each test is conditioned on the units still kept (TERC). Test order (`MIPPSettings.order`):
"mi", the paper's, least single-unit MI first, fixed before the sweep (the default until measurements show the
alternative is better); or "greedy", the untested kept unit with the lowest current transfer entropy next, re-ranked
after every removal. No group ever falls below its minimum width (the collapse guard; hits are reported).

Two stopping rules. Confidence mode (the paper's knob x): remove a unit when its transfer entropy is not significant
with confidence x; sparsity is an output. Budget mode (ours; method spec 5): remove a target fraction of units,
parameters or MACs, priced in one currency for the whole network. A unit's information lost is the share of its
layer target's variance the kept units can no longer explain without it (`LayerSession.variance_share_lost`): it
depends neither on a ridge nor on a layer's width, and adds up along a layer's removals, unlike a transfer entropy,
whose value for the last hidden layer is set by the target ridge. A unit's cost is the share of the budget metric
that removing one unit of its group removes. Insignificant units go first, at no cost; a significant unit goes
when lost share <= price * cost; one global price is bisected (on its logarithm) to reach the budget, so per-layer
widths emerge from where information is cheap. (It replaces a rule that let every layer lose the same share of its
own information: cost-blind, blind to significance, and tied to the ridge.) Where one coarse unit makes the removed
fraction jump past the target between two nearly equal prices, the gap is closed both ways: the closest sweep
that falls short topped up with the kept units that lose the least variance share per cost (`_top_up`), the
closest one past it given back the removed units that lost the most (`_give_back`); a sweep that removes exactly
each candidate's units measures what it loses, and the smaller loss is kept (`_repair`, `plan_loss`).

Features (`MIPPSettings.features`): "patches" takes every sampled (image, output position) as a sample, a unit's
k x k input patch as its features and the reader's own output there as target (`mipp.positions`,
`mipp.methods.mipp_features`), the relation a convolution actually computes. Its test counts an effective sample
size for the correlated positions of one image, and its moments are also the normal equations of the reconstruction,
which then needs no second pass. With patches a reader followed by a batch norm counts its output channels by their
variance after the norm (`target_scale`), and a group read at several points (a residual stream) loses the sum of
its readers' shares (`readers_share`): on ResNet-18 w0.25 the mean (the rule before) priced the last stream's
channels so low that 24 of 128 were kept at 70% of MACs. "mean", the paper's reading, summarises a conv channel by
its spatial mean at the next layer's input and takes the next layer's kept activations as target: several times
cheaper to select, but it averages the convolution's relation away. "auto", the default, is "mean" with KSG and the
loss proxy (they work on samples, not moments) or with `pool`; with the Gaussian estimator it decides per group
(`mipp.positions.automatic_groups`): patches where every reader is a Linear or Conv layer with at most
AUTO_MAX_FEATURES features and at least as many sampled rows, the spatial mean for the other groups in the same
sweep (`MixedFeatures`: both measure a removal as a share of their target's variance, so one price ranks them), and
"mean" everywhere, with a warning, where the chosen groups' moments would not fit in memory. Patches are the default
because they measured better at equal MACs on every model of the experiment stores (LeNet-5, VGG-11 and ResNet-18 at
width 0.25, 3 seeds, 50/70/90% of MACs: never behind a baseline by the paired interval, where the spatial mean was
behind Torch-Pruning's Hessian and L2 on ResNet-18 by 10-12 points at 70%). Both check the calibration data alike
(`_check_samples`, `_check_moments`).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import torch

from mipp.activations import (Activations, calibration_pass, calibration_size, capture, capture_hooks,
                              constant_output_error, warn_dead_layers)
from mipp.methods.mipp_features import MeanFeatures, MixedFeatures, PositionFeatures, normalised_output_weights
from mipp.methods.mipp_features import target_of  # noqa: F401 (API)
from mipp.methods.base import Budget, PruneContext, finish_plan
from mipp.methods.registry import register
from mipp.mi import estimator_class, get_estimator
from mipp.mi.base import LayerSession, TestResult
from mipp.mi.cost import announce_cost
from mipp.plan import Plan, UnitDecision
from mipp.positions import (POSITIONS_PER_IMAGE, OutputRange, UnsupportedReader, automatic_groups,
                            reader_moment_hooks)
from mipp.progress import Progress


ORDERS = ("mi", "greedy")
FEATURES = ("mean", "patches")
TARGET_SCALES = ("normalised", "raw")
READERS_SHARES = ("sum", "mean")


@dataclass
class MIPPSettings:
    estimator: str = "gaussian"
    estimator_options: dict = field(default_factory=dict)
    confidence: float = 0.95  # the paper's x, in (0.5, 1)
    pool: int | None = None  # None: spatial mean per channel; k: k x k grid features per channel
    order: str = "mi"  # "mi": the paper's fixed MI order; "greedy": lowest current transfer entropy next
    features: str = "auto"  # "patches": k x k patches at sampled positions; "mean": a channel's spatial mean;
    # "auto": with the Gaussian estimator (and no pool) patches where a group's readers allow, else mean (module doc)
    positions: int = POSITIONS_PER_IMAGE  # features="patches": output positions sampled per image
    # features="patches", budget mode: a reader's output channel counts in the variance share by its variance after
    # the batch norm that follows the reader ("normalised"), or by its raw variance ("raw")
    target_scale: str = "normalised"
    # features="patches", budget mode: what a group read at several points (a residual stream) loses, the "sum" of
    # its readers' shares (each reader's output loses its share) or their "mean" (the rule before)
    readers_share: str = "sum"
    max_bisection_steps: int = 30
    automatic: bool = field(default=False, init=False)  # features came from "auto" (it may fall back to "mean")

    def __post_init__(self):
        if not 0.5 <= self.confidence < 1.0:
            raise ValueError(f"confidence must be in [0.5, 1), got {self.confidence}; the paper sweeps e.g. 0.9-0.999")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.features not in (*FEATURES, "auto"):
            raise ValueError(f"features must be one of {(*FEATURES, 'auto')}, got {self.features!r}")
        self.automatic = self.features == "auto"
        if self.automatic:
            self.features = "patches" if self.estimator == "gaussian" and self.pool is None else "mean"
        if self.features == "patches" and self.pool is not None:
            raise ValueError("pool applies to features='mean' only; features='patches' samples positions instead")
        if self.positions < 1:
            raise ValueError(f"positions must be >= 1, got {self.positions}")
        if self.readers_share not in READERS_SHARES:
            raise ValueError(f"readers_share must be one of {READERS_SHARES}, got {self.readers_share!r}")
        if self.target_scale not in TARGET_SCALES:
            raise ValueError(f"target_scale must be one of {TARGET_SCALES}, got {self.target_scale!r}")


@dataclass
class SweepResult:
    kept: dict[str, list[int]]
    decisions: dict[str, list[UnitDecision]]
    lost_share: dict[str, float]  # budget mode: per group, the share of its target's variance its removals lost
    # with collect_remaining: per group, (unit, variance share its removal would lose) for every kept unit at the end
    remaining: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    # budget mode: per group, unit -> the variance share its removal lost when it was removed
    removed_share: dict[str, dict[int, float]] = field(default_factory=dict)
    # budget mode: per group, (unit, significant, variance share, removed) of every unit tested, in sweep order
    tested: dict[str, list[tuple[int, bool, float, bool]]] = field(default_factory=dict)


class ConfidenceRule:
    """The paper's rule: remove a unit when its transfer entropy is not significant at the session's confidence."""

    prices_units = False

    def removes(self, group: str, result: TestResult, lost_share: float | None, unit: int | None = None) -> bool:
        return not result.significant


@dataclass
class FixedRule:
    """Removes exactly the units a plan removes (`removed`: group -> units), so that a sweep measures what that plan
    loses: in sweep order each removal's variance share given the removals before it, which per layer add up to the
    share of its target's variance the layer's kept units can no longer explain (`plan_loss`)."""

    removed: dict[str, set[int]]

    prices_units = True

    def removes(self, group: str, result: TestResult, lost_share: float | None, unit: int | None = None) -> bool:
        return unit in self.removed.get(group, ())


@dataclass
class PriceRule:
    """Budget rule: information lost per unit of the budgeted cost, at one price for the whole network.

    A unit's information lost is the share of its layer target's variance that the kept units can no longer explain
    without it (`LayerSession.variance_share_lost`), its cost the share of the budget metric that removing one unit
    of its group removes (`unit_costs`). A unit that is not significant goes at no cost; a significant one goes when
    lost_share <= price * cost. With `insignificant_only` (when the insignificant units alone are more than the
    budget) only insignificant units may go, those with the least lost share per cost first. For the search's last
    steps: `cap` allows at most that many priced removals, the first in sweep order (from the output), so the
    removals withheld are those nearest the input, which change no other layer's target; `fill_price` is a second
    price for the cheap units (cost at most `fill_cost`): where one costly unit (a channel of a narrow convolution)
    makes the removed fraction jump past the target, the costly units stay at the closest price and the cheap ones
    are priced apart to fill the gap.
    """

    price: float
    unit_costs: dict[str, float]
    insignificant_only: bool = False
    fill_price: float | None = None
    fill_cost: float = 0.0
    cap: int | None = None
    priced_removals: int = 0  # counted during the sweep

    prices_units = True

    def removes(self, group: str, result: TestResult, lost_share: float | None, unit: int | None = None) -> bool:
        if result.significant == self.insignificant_only:
            return not result.significant  # insignificant units are free; significant ones kept in that case
        cost = self.unit_costs[group]
        cheap = self.fill_price is not None and cost <= self.fill_cost
        if lost_share > (self.fill_price if cheap else self.price) * cost:
            return False
        if self.cap is not None and self.priced_removals >= self.cap:
            return False
        self.priced_removals += 1
        return True


def sweep_order(session: LayerSession, unit_mi: torch.Tensor, order: str) -> Iterator[int]:
    """The units of a layer in the order the sweep tests them (it stops early at the collapse guard).

    "mi" (the paper's): ascending single-unit MI, fixed before the sweep. "greedy": the untested kept unit whose
    current transfer entropy is lowest, re-ranked at the start and after every removal; a unit tested and kept is
    not tested again."""
    if order == "mi":
        yield from torch.argsort(unit_mi, stable=True).tolist()
        return
    tested: set[int] = set()
    entropies, ranked_width = None, None
    while True:
        if ranked_width != len(session.kept):  # at the start and after a removal
            entropies, ranked_width = session.transfer_entropies(), len(session.kept)
        untested = [u for u in session.kept if u not in tested]
        if not untested:
            return
        unit = min(untested, key=lambda u: (float(entropies[u]), u))
        tested.add(unit)
        yield unit


def sweep(ctx: PruneContext, features, estimator, rule, confidence: float, order: str = "mi",
          cache: dict | None = None, collect_remaining: bool = False) -> SweepResult:
    """One output-to-input pass over every group; `rule` decides from each unit's transfer-entropy test.

    `features` opens each layer's session: captured `Activations` (spatial means; wrapped in `MeanFeatures`) or a
    `PositionFeatures`. `cache` (budget mode, which sweeps many times) keeps each layer's fresh session, keyed by
    what its target is made of: a layer whose readers kept the same units as in an earlier sweep starts from a
    copy, and (order "mi") replays that sweep's tests while the rule decides as it did then (`_sweep_group`)."""
    if isinstance(features, Activations):
        features = MeanFeatures(ctx.units, features)
    kept = {g.key: list(range(g.size)) for g in ctx.units.groups}
    decisions, lost_share, remaining, removed_share, tested = {}, {}, {}, {}, {}
    bar = Progress(sum(g.size for g in ctx.units.groups), "MIPP sweep", "unit", leave=False)
    for group in ctx.units.groups:  # already ordered from the output to the input
        bar.status(f"group {group.key}")
        signature = features.signature(group, kept)
        entry = cache.get(signature) if cache is not None else None
        if entry is None:
            session = features.open(group, kept, estimator, confidence)
            if cache is not None:
                entry = _CacheEntry(copy.deepcopy(session), session.unit_mi(), group.key)
                _remember(cache, signature, entry)
            unit_mi = entry.unit_mi if entry is not None else session.unit_mi()
        else:
            cache[signature] = cache.pop(signature)  # most recently used last
            session = (copy.deepcopy(entry.session) if entry.session is not None
                       else features.open(group, kept, estimator, confidence))  # the same session, opened again
            unit_mi = entry.unit_mi
        records = {i: UnitDecision(unit=i, kept=True, mi=float(unit_mi[i])) for i in range(group.size)}
        floor = ctx.min_width(group.size)
        lost_share[group.key], trail = _sweep_group(session, unit_mi, order, rule, group.key, floor, records,
                                                    entry.trail if entry is not None and order == "mi" else None,
                                                    bar)
        if entry is not None:
            entry.trail = trail
        tested[group.key] = [(unit, bool(result.significant), share, removes) for unit, result, share, removes in trail
                             if share is not None]
        removed_share[group.key] = {unit: share for unit, _, share, removes in tested[group.key] if removes}
        bar.update(sum(r.rank is None for r in records.values()))  # untested: stopped by the collapse guard
        kept[group.key] = sorted(session.kept)
        decisions[group.key] = [records[i] for i in range(group.size)]
        if collect_remaining and len(session.kept) > floor:
            remaining[group.key] = [(u, session.variance_share_lost(u)) for u in session.kept]
    bar.close()
    return SweepResult(kept, decisions, lost_share if rule.prices_units else {}, remaining,
                       removed_share if rule.prices_units else {}, tested if rule.prices_units else {})


def _sweep_group(session: LayerSession, unit_mi: torch.Tensor, order: str, rule, key: str, floor: int,
                 records: dict, known: list | None, bar) -> tuple[float, list]:
    """Test and remove the units of one group in sweep order; returns (variance share lost, the trail: (unit, test
    result, variance share, removed) per step).

    `known`: the trail of an earlier sweep from an identical fresh session, in the fixed "mi" order. While the rule
    decides every step as it did then, the session is in the state it was in then, so that step's result and share
    are taken from the trail instead of computed again (the same numbers: the computation is deterministic), and
    its removals wait; at the first step decided otherwise the waiting removals are applied and the sweep computes
    from there on. The session ends with every removal applied."""
    lost, trail, waiting = 0.0, [], []
    for rank, unit in enumerate(sweep_order(session, unit_mi, order)):
        if len(session.kept) - len(waiting) <= floor:
            break  # collapse guard: the rest stay untested
        step = known[rank] if known is not None and rank < len(known) and known[rank][0] == unit else None
        if step is None:
            known = None
            _apply(session, waiting)
            result = session.transfer_entropy(unit)
            share = session.variance_share_lost(unit) if rule.prices_units else None
        else:
            result, share = step[1], step[2]
        removes = rule.removes(key, result, share, unit)
        if step is not None and removes != step[3]:
            known = None  # the state differs from the next step on
        record = records[unit]
        record.rank, record.score, record.p_value = rank, float(result.estimate), float(result.p_value)
        if removes:
            waiting.append(unit)
            if known is None:
                _apply(session, waiting)
            record.kept = False
            lost += share or 0.0
        trail.append((unit, result, share, removes))
        bar.update(1)
    _apply(session, waiting)
    return lost, trail


def _apply(session: LayerSession, waiting: list[int]) -> None:
    for unit in waiting:
        session.remove(unit)
    waiting.clear()


@dataclass
class _CacheEntry:
    """A budget search's cached layer: its fresh session (None once dropped for memory: it is opened again), the
    units' MI, its group, and the trail of the latest sweep that started from it (see `_sweep_group`)."""

    session: LayerSession | None
    unit_mi: torch.Tensor
    group: str
    trail: list | None = None
    bytes: int = 0

    def __post_init__(self):
        self.bytes = tensor_bytes(self.session)


CACHED_TARGETS_PER_GROUP = 4  # targets a budget search remembers per group (the most recently used ones)
# Fresh sessions the cache holds, in bytes of their matrices: beyond it the least recently used are dropped and
# opened again when needed (ResNet-50's residual streams, read at several points with 2,048 features, held
# several GB in four sessions per group). Copying a large cached session costs about what opening it again does,
# so the bound is small: at 64 MB instead of 512, torchvision's ResNet-50 (512 samples, 50% of MACs) peaked at
# 2.17-2.26 GB instead of 2.51-2.52 GB, its selection 30-37 s against 31-36 s (within this machine's noise), and
# VGG-11 w0.5 with patches at 1.09 GB instead of 1.44 GB, 23.5 s against 27.6 s (the same plans: the bound never
# changes a result).
CACHED_SESSION_BYTES = 64 * 2 ** 20


def _remember(cache: dict, signature, entry: _CacheEntry) -> None:
    """Add a fresh session to the sweep cache, dropping the least recently used entries of the same group beyond
    CACHED_TARGETS_PER_GROUP, and the least recently used sessions (keeping their trails) beyond
    CACHED_SESSION_BYTES. A session from the cache is a copy of what opening it again computes, so neither bound
    changes a result, only how often a session is opened."""
    cache[signature] = entry
    mine = [key for key, value in cache.items() if value.group == entry.group]
    for stale in mine[:-CACHED_TARGETS_PER_GROUP]:
        del cache[stale]
    held = sum(value.bytes for value in cache.values())
    for value in cache.values():  # least recently used first
        if held <= CACHED_SESSION_BYTES or value is entry:
            break
        held -= value.bytes
        value.session, value.bytes = None, 0


def tensor_bytes(obj, seen: set | None = None) -> int:
    """Bytes of the tensors an object holds in its attributes, lists, tuples and dicts (each tensor once)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return tensor_bytes(vars(obj), seen)
    return 0


def prepare(ctx: PruneContext, settings: MIPPSettings, budget: Budget | None = None,
            acts: Activations | None = None):
    """(features, estimator, record): what a sweep needs, from the calibration passes (spatial means, position
    moments with features="patches", or both where "auto" gives some groups each), and what the Plan records."""
    moments, on_means = None, {}
    if settings.features == "patches":
        chosen = None
        if settings.automatic:
            chosen, on_means = automatic_groups(ctx.model, ctx.units, calibration_size(ctx.data, ctx.n_samples),
                                                settings.positions)
        output_range = OutputRange()
        try:
            if chosen is None or chosen:
                moments, means = _capture_positions(ctx, settings, output_range, chosen,
                                                    with_means=bool(on_means) and acts is None)
                acts = acts if means is None else means
        except (MemoryError, UnsupportedReader) as err:
            if not settings.automatic:
                raise
            warnings.warn(f"MIPP falls back to features='mean' (spatial means): {err}", stacklevel=3)
        if moments is None:
            settings = dataclasses.replace(settings, features="mean")
    if moments is not None:
        _check_moments(moments, output_range, settings)
        weights = normalised_output_weights(ctx.model, ctx.units) if settings.target_scale == "normalised" else {}
        features = PositionFeatures(ctx.units, moments, weights, settings.readers_share)
        ctx.reader_moments = moments  # the same sums are every re-fitted reader's normal equations
        n_samples = next(r.images for readers in moments.values() for r in readers)
    if moments is None or on_means:
        if acts is None:
            acts = capture(ctx.model, ctx.units, ctx.data, n_samples=ctx.n_samples, pool=settings.pool,
                           seed=ctx.seed, device=ctx.device)
        _check_samples(acts, settings)
        means = MeanFeatures(ctx.units, acts)
        features = means if moments is None else MixedFeatures(features, means, set(on_means))
        n_samples = acts.n_samples
    estimator = get_estimator(settings.estimator, **{"seed": ctx.seed, **settings.estimator_options})
    announce_cost(settings.estimator, estimator, [g.size for g in ctx.units.groups], n_samples, budget is not None,
                  ctx.seed)
    record = {"estimator": settings.estimator, "estimator_options": settings.estimator_options,
              "pool": settings.pool, "n_samples": n_samples, "min_units": ctx.min_units}
    record["order"] = settings.order
    if settings.features != "mean":  # recorded when not the spatial mean, so plans made with it stay as they were
        record["features"] = {"kind": settings.features, "positions_per_image": settings.positions,
                              "target_scale": settings.target_scale, "readers_share": settings.readers_share,
                              "effective_samples": features.effective_samples()}
        if on_means:  # "auto": these groups were read by their spatial means, and why
            record["features"]["mean_groups"] = on_means
    return features, estimator, record


def _capture_positions(ctx: PruneContext, settings: MIPPSettings, output_range: OutputRange,
                       groups: set[str] | None, with_means: bool) -> tuple[dict, Activations | None]:
    """The position moments of `groups` and, `with_means` (features="auto" with groups on spatial means), the spatial
    means too, in one pass over the calibration data: the same batches feed both collectors, so the result is what
    two passes give, for one forward pass less. Raises (MemoryError, UnsupportedReader) before any pass."""
    device = torch.device(ctx.device or next(ctx.model.parameters()).device)
    handles, on_skip, finish = reader_moment_hooks(ctx.model, ctx.units, ctx.data,
                                                   positions_per_image=settings.positions, seed=ctx.seed,
                                                   device=device, output_range=output_range, groups=groups)
    finish_means = None
    if with_means:  # registered after the moments' hooks: under torchrun those run a forward pass of their own
        mean_handles, finish_means = capture_hooks(ctx.model, ctx.units, settings.pool)
        handles = handles + mean_handles
    n_batches = calibration_pass(ctx.model, ctx.data, handles, "capture (positions and means)" if with_means
                                 else "capture (positions)", ctx.units.example_shape, n_samples=ctx.n_samples,
                                 seed=ctx.seed, device=device, shard=True, on_skip=on_skip)
    return finish(), (finish_means(n_batches) if finish_means is not None else None)


def select(ctx: PruneContext, budget: Budget | None = None, settings: MIPPSettings | None = None,
           acts: Activations | None = None) -> Plan:
    """Run MIPP on the context's model and calibration data; returns the Plan."""
    settings = settings or MIPPSettings()
    started = time.perf_counter()
    features, estimator, record = prepare(ctx, settings, budget, acts)
    capture_seconds = time.perf_counter() - started
    if budget is None:
        result = sweep(ctx, features, estimator, ConfidenceRule(), settings.confidence, settings.order)
        record["confidence"] = settings.confidence
        extra = {}
    else:
        ctx.check_reachable(budget)
        result, extra = _search_price(ctx, features, estimator, budget, settings)
        record["budget"] = {"fraction": budget.fraction, "metric": budget.metric}
        record["confidence"] = settings.confidence  # it decides which units are free
    stats = {"capture_seconds": capture_seconds, "selection_seconds": time.perf_counter() - started, **extra}
    return finish_plan(ctx, result.kept, "mipp", record, result.decisions, stats)


@register("mipp", needs_budget=False,
          summary="Mutual-information preserving pruning (Westphal et al. 2024): output-to-input TERC sweep")
def select_mipp(ctx: PruneContext, budget: Budget | None = None, **options) -> Plan:
    """The registered method: `select` with MIPPSettings(**options)."""
    return select(ctx, budget, MIPPSettings(**options))


# A price search stops after this many sweeps in a row that come no closer to the budget: the removed fraction
# then jumps across it between nearly equal prices (one costly unit), which no price resolves; the partial steps
# and the repair close such gaps.
STALLED_STEPS = 6
LOWEST_PRICE = 1e-15  # lost variance share per share of the metric: below any real unit's price


def unit_costs(ctx: PruneContext, metric: str) -> dict[str, float]:
    """Per group, the share of `metric` that removing one of its units removes, at full width."""
    full = {g.key: list(range(g.size)) for g in ctx.units.groups}
    return {g.key: ctx.cost.fractions_removed({**full, g.key: full[g.key][1:]})[metric] for g in ctx.units.groups}


def _search_price(ctx, features, estimator, budget: Budget, settings: MIPPSettings) -> tuple[SweepResult, dict]:
    """Find the price whose sweep removes the budget's fraction; returns the closest sweep and what to record.

    First the free sweep (price 0: only insignificant units go). Short of the budget, the price of significant units
    is searched on its logarithm; past it (the insignificant units alone are more than the budget), the price of
    insignificant units is, and no significant unit goes. Each sweep's own tests say where the price should go
    (`_log_price_from_sweep`: past the ratios of the units whose costs close the gap), which lands most searches in
    one or two sweeps after the free one; where such a step does not bring the gap a quarter closer, regula falsi on
    the bracket takes one step, and the search stops after STALLED_STEPS sweeps that come no closer. Where the
    removed fraction jumps past the target between two nearly equal prices (one channel of a narrow convolution can
    weigh several % of the MACs, and a removal changes the targets of the layers before it, so several can go at
    once), the last step is taken part of the way: at the price that overshoots, only the first n priced removals
    from the output, n bisected; if that still misses, the costly units keep the closest price and a second price
    for the cheap units (each at most two tolerances of the budget) is bisected."""
    cache: dict = {}
    costs = unit_costs(ctx, budget.metric)

    closest = {}  # "short" / "over": (gap, result, price, fill price, cap) of the sweep nearest the budget that side

    def run(price: float, insignificant_only: bool, fill_price: float | None = None, cap: int | None = None):
        rule = PriceRule(price, costs, insignificant_only, fill_price, fill_cost, cap)
        result = sweep(ctx, features, estimator, rule, settings.confidence, settings.order, cache)
        gap = ctx.cost.fractions_removed(result.kept)[budget.metric] - budget.fraction
        side = "short" if gap < 0 else "over"
        if side not in closest or abs(gap) < abs(closest[side][0]):
            closest[side] = (gap, result, price, fill_price, cap)
        return result, gap, rule.priced_removals

    fill_cost = 2 * budget.tolerance
    result, gap, _ = run(0.0, False)
    free, steps, best = gap + budget.fraction, 1, (gap, result, 0.0, None, None)
    insignificant_only = gap > 0
    low = math.log(LOWEST_PRICE)
    high = math.log(2.0 / min([c for c in costs.values() if c > 0] or [1.0]))  # every affordable unit goes
    over = None  # (price, priced removals) of the lowest price known to overshoot
    # gaps at the bracket's ends (None: not swept; the free sweep is the low end unless only insignificant units
    # are priced), and the end the last sweep moved
    low_gap, high_gap, side = (None if insignificant_only else gap), None, 0
    last = (result, math.inf if insignificant_only else 0.0, gap)  # the free sweep removed every insignificant unit
    stalled, gain = 0, 1.0  # sweeps since the closest gap last shrank; observed / predicted change of a step
    while abs(best[0]) > budget.tolerance and steps <= settings.max_bisection_steps and high - low > 1e-4 \
            and stalled < STALLED_STEPS:
        estimate = _log_price_from_sweep(*last, costs, insignificant_only, gain) if last is not None else None
        estimated = estimate is not None and low < estimate[0] < high
        middle = estimate[0] if estimated else _next_log_price(low, high, low_gap, high_gap)
        result, gap, priced = run(math.exp(middle), insignificant_only)
        steps += 1
        if estimated and (gap - last[2]) / estimate[1] > 0:
            gain = min(max((gap - last[2]) / estimate[1], 0.1), 10.0)
        # the sweep's own estimate again while it pays (brings the gap at least a quarter closer), else one step of
        # regula falsi
        last = (result, math.exp(middle), gap) if not estimated or abs(gap) <= 0.75 * abs(last[2]) else None
        stalled += 1
        if abs(gap) < abs(best[0]):
            best, stalled = (gap, result, math.exp(middle), None, None), 0
        if gap < 0:
            low, low_gap = middle, gap
            if side < 0 and high_gap is not None:
                high_gap /= 2  # Illinois: the same end twice in a row, so the other's weight is halved
            side = -1
        else:
            high, high_gap, over = middle, gap, (math.exp(middle), priced)
            if side > 0 and low_gap is not None:
                low_gap /= 2
            side = 1
    if abs(best[0]) > budget.tolerance and over is not None:
        fewer, more = 0, over[1]  # priced removals allowed: none falls short, all overshoot
        while more - fewer > 1 and abs(best[0]) > budget.tolerance:
            cap = (fewer + more) // 2
            result, gap, _ = run(over[0], insignificant_only, None, cap)
            steps += 1
            if abs(gap) < abs(best[0]):
                best = (gap, result, over[0], None, cap)
            fewer, more = (cap, more) if gap < 0 else (fewer, cap)
    if abs(best[0]) > budget.tolerance and best[4] is None and any(0 < c <= fill_cost for c in costs.values()):
        base = best[2]
        low, high = math.log(LOWEST_PRICE), math.log(2.0 / min(c for c in costs.values() if c > 0))
        stalled = 0
        for _ in range(settings.max_bisection_steps):
            if abs(best[0]) <= budget.tolerance or high - low <= 1e-4 or stalled >= STALLED_STEPS:
                break
            middle = (low + high) / 2
            result, gap, _ = run(base, insignificant_only, math.exp(middle))
            steps += 1
            stalled += 1
            if abs(gap) < abs(best[0]):
                best, stalled = (gap, result, base, math.exp(middle), None), 0
            low, high = (middle, high) if gap < 0 else (low, middle)
    _, result, price, fill_price, cap = best
    topped_up = given_back = 0
    repair = None
    if abs(best[0]) > budget.tolerance:
        result, price, fill_price, cap, topped_up, given_back, repair = _repair(
            ctx, features, estimator, settings, cache, costs, budget, closest, over, insignificant_only, fill_cost)
    return result, {
        "price": price,
        "priced_removals_cap": cap,  # None, or the search's last step taken part of the way (see above)
        "fill_price": fill_price,  # None, or the cheap units' own price in the search's last step (see above)
        "priced_units": "insignificant" if insignificant_only else "significant",
        "insignificant_removed": free,
        "bisection_steps": steps,
        "lost_share": result.lost_share,
        "topped_up": topped_up,  # removals added after the search (see _top_up)
        "given_back": given_back,  # removed units restored after the search (see _give_back)
        "repair": repair,  # None, or the variance share each way of closing the gap loses and the one taken
    }


def _repair(ctx, features, estimator, settings: MIPPSettings, cache: dict, costs: dict, budget: Budget,
            closest: dict, over, insignificant_only: bool, fill_cost: float):
    """Close the gap the price search left (its closest sweep misses the budget by more than its tolerance) in both
    ways the searched sweeps allow, and keep the one that loses less: the closest sweep short of the budget with
    units removed (`_top_up`), and the closest one past it with units restored (`_give_back`). Each candidate's
    loss is measured by one more sweep that removes exactly its units (`plan_loss`), since the shares the repairs
    add up were measured before them: topping up LeNet-5 at 90% of MACs from 87.9% cut both fully connected layers
    to one unit each (their single shares small, their joint loss nearly all of the logits' variance; 18% test
    accuracy), where restoring units to the 93.8% sweep kept them. A candidate within tolerance is preferred; the
    nearest is taken otherwise (the closest sweep itself, when it falls short and cannot be topped up, is one).
    `closest`: the search's sweep nearest the budget on each side ("short", "over"), as (gap, result, price, fill
    price, cap); the nearer of the two is the search's best. Returns (result, price, fill price, cap, topped up,
    given back, what was compared)."""
    candidates = []
    short, past = closest.get("short"), closest.get("over")
    if short is not None and over is not None and not insignificant_only:
        _, _, price, fill_price, cap = short
        rule = PriceRule(price, costs, insignificant_only, fill_price, fill_cost, cap)
        result = sweep(ctx, features, estimator, rule, settings.confidence, settings.order, cache,
                       collect_remaining=True)
        added = _top_up(ctx, result, costs, budget, max_price=TOP_UP_PRICE_FACTOR * over[0])
        if ctx.cost.fractions_removed(result.kept)[budget.metric] < budget.fraction - budget.tolerance:
            added += _top_up(ctx, result, costs, budget)  # still short: uncapped (see _top_up)
        candidates.append(("topped_up", result, price, fill_price, cap, added, 0))
    if past is not None:
        _, result, price, fill_price, cap = past
        candidates.append(("given_back", result, price, fill_price, cap, 0, _give_back(ctx, result, costs, budget)))
    if short is not None and not any(c[0] == "topped_up" for c in candidates):  # nothing could top it up
        _, result, price, fill_price, cap = short
        candidates.insert(0, ("as_searched", result, price, fill_price, cap, 0, 0))

    def miss(candidate) -> float:
        return abs(ctx.cost.fractions_removed(candidate[1].kept)[budget.metric] - budget.fraction)

    within = [c for c in candidates if miss(c) <= budget.tolerance]
    if len(within) < 2:
        chosen = within[0] if within else min(candidates, key=miss)
        return (*chosen[1:], None)
    losses = {c[0]: plan_loss(ctx, features, estimator, settings, cache, c[1].kept) for c in within}
    chosen = min(within, key=lambda c: (losses[c[0]], c[0]))
    return (*chosen[1:], {"lost_share": losses, "chosen": chosen[0]})


def plan_loss(ctx, features, estimator, settings: MIPPSettings, cache: dict, kept: dict[str, list[int]]) -> float:
    """The variance share a plan loses, summed over its layers: one sweep that removes exactly its units
    (`FixedRule`), each layer given the kept units of the layers after it: the currency the price ranks in."""
    removed = {g.key: set(range(g.size)) - set(kept[g.key]) for g in ctx.units.groups}
    result = sweep(ctx, features, estimator, FixedRule(removed), settings.confidence, settings.order, cache)
    return float(sum(result.lost_share.values()))


def _log_price_from_sweep(result: SweepResult, price: float, gap: float, costs: dict[str, float],
                          insignificant_only: bool, gain: float = 1.0) -> tuple[float, float] | None:
    """(log-price, the change of the removed fraction it predicts) that a sweep at `price`, `gap` off the budget,
    points to: each priced unit it tested would go at its own ratio of variance share lost to cost. Short of the
    budget, the price moves past the cheapest ratios of kept units whose costs add up closest to gap / `gain`;
    past it, below the dearest ratios of removed units that do. `gain` is what the removed fraction changed per
    unit of predicted change in the search's last such step: costs do not add exactly (two pruned neighbours
    share MACs) and a removal raises the shares of the units it leaves, so the first step falls short. The search
    keeps its bracket and turns to regula falsi when a step does not pay. None when no move of the price comes
    closer (the gap is under half the cheapest such unit's cost) or no priced unit was tested."""
    ratios = [(max(share / costs[key], LOWEST_PRICE), costs[key]) for key, steps in result.tested.items()
              if costs[key] > 0 for _, significant, share, _ in steps if significant != insignificant_only]
    if gap < 0:  # kept units (ratio above the price) join, cheapest ratio first
        movable = sorted(r for r in ratios if r[0] > price)
    else:  # removed units (ratio at or below the price) stay, dearest first
        movable = sorted((r for r in ratios if r[0] <= price), reverse=True)
    need = abs(gap) / gain
    moved, total, miss, predicted = 0, 0.0, need, 0.0
    for n, (_, cost) in enumerate(movable, 1):
        total += cost
        if abs(total - need) < miss:
            moved, miss, predicted = n, abs(total - need), total
        if total > need:
            break
    if moved == 0:
        return None
    edge = movable[moved - 1][0]  # the last ratio that moves, and the first that does not (or one beyond)
    beyond = movable[moved][0] if moved < len(movable) else (edge * 2 if gap < 0 else LOWEST_PRICE)
    return 0.5 * (math.log(edge) + math.log(beyond)), predicted if gap < 0 else -predicted


def _next_log_price(low: float, high: float, low_gap: float | None, high_gap: float | None) -> float:
    """The next log-price to sweep: where the line through the bracket's two gaps crosses zero (regula falsi with
    the Illinois weights, a few sweeps instead of bisection's ~10, as the removed fraction grows smoothly with the
    log-price over most of the range), kept inside the middle 80% of the bracket; the midpoint while an end has not
    been swept (the upper one starts as a price at which every affordable unit goes)."""
    if low_gap is None or high_gap is None or high_gap <= low_gap:
        return (low + high) / 2
    guess = low + (high - low) * (-low_gap) / (high_gap - low_gap)
    margin = 0.1 * (high - low)
    return min(max(guess, low + margin), high - margin)


TOP_UP_PRICE_FACTOR = 2.0  # the top-up removes units priced at most twice the lowest price that overshot


def _top_up(ctx: PruneContext, result: SweepResult, costs: dict[str, float], budget: Budget,
            max_price: float = math.inf) -> int:
    """Close a gap the price search left short of the budget: remove more kept units, those whose removal loses
    the least variance share per unit of cost first (their shares measured in the final sweep, each layer given
    the kept units of the layers after it), skipping any that would overshoot the budget by more than its
    tolerance, until the budget is within tolerance. Only units priced at most `max_price` are candidates
    (TOP_UP_PRICE_FACTOR times the lowest price the search saw overshoot), so a gap is first closed with
    information priced near what the search itself removed: a cheap unit of a layer already cut to a few units is
    often priced 30x higher and stays. Where that still leaves the budget short by more than its tolerance,
    `_search_price` calls this again without the cap, since the budget is the user's contract (position features
    on the tests' small LeNet-5 at 50% of MACs: 48.7% without, 49.5% with). Where the removed fraction jumps
    between two nearly equal prices (one coarse channel changes the targets of the layers before it), this takes the closest sweep that
    falls short and adds the cheapest information to it, without sweeping again. Records the removals."""
    candidates = sorted(((share / max(costs[key], 1e-15), key, unit, share) for key, units in result.remaining.items()
                         for unit, share in units if share <= max_price * costs[key]),
                        key=lambda c: (c[0], c[1], c[2]))
    kept = {key: list(units) for key, units in result.kept.items()}
    fraction = ctx.cost.fractions_removed(kept)[budget.metric]
    added = 0
    for _, key, unit, share in candidates:
        if fraction >= budget.fraction - budget.tolerance:
            break
        if unit not in kept[key] or len(kept[key]) <= ctx.min_width(len(result.decisions[key])):
            continue  # (removed by an earlier top-up of this result)
        trial = {**kept, key: [u for u in kept[key] if u != unit]}
        reached = ctx.cost.fractions_removed(trial)[budget.metric]
        if reached > budget.fraction + budget.tolerance:
            continue
        kept, fraction, added = trial, reached, added + 1
        result.decisions[key][unit].kept = False
        result.lost_share[key] = result.lost_share.get(key, 0.0) + share
    result.kept.update(kept)
    return added


def _give_back(ctx: PruneContext, result: SweepResult, costs: dict[str, float], budget: Budget) -> int:
    """Close a gap the price search left past the budget: restore removed units, those whose removal lost the most
    variance share per unit of cost first, skipping any whose restoration would fall short of the budget by more
    than its tolerance, until the budget is within tolerance. The mirror of `_top_up`: at 90% of LeNet-5's MACs
    the closest sweep removed 91.2% (its first convolution at one channel, each worth several % of the MACs), and
    restoring a few of the most informative fully connected units per MAC lands within tolerance. Restoring a
    unit only adds information the sweep had given up (the layers before it were pruned for a target that lacked
    it), so no sweep is re-run. Records the restorations in the decisions and the lost shares."""
    candidates = sorted(((-share / max(costs[key], 1e-15), key, unit, share)
                         for key, units in result.removed_share.items() for unit, share in units.items()),
                        key=lambda c: (c[0], c[1], c[2]))
    kept = {key: list(units) for key, units in result.kept.items()}
    fraction = ctx.cost.fractions_removed(kept)[budget.metric]
    restored = 0
    for _, key, unit, share in candidates:
        if fraction <= budget.fraction + budget.tolerance:
            break
        trial = {**kept, key: sorted(kept[key] + [unit])}
        reached = ctx.cost.fractions_removed(trial)[budget.metric]
        if reached < budget.fraction - budget.tolerance:
            continue
        kept, fraction, restored = trial, reached, restored + 1
        result.decisions[key][unit].kept = True
        result.lost_share[key] = result.lost_share.get(key, 0.0) - share
        del result.removed_share[key][unit]
    result.kept.update(kept)
    return restored


def _check_moments(moments: dict, output: OutputRange, settings: MIPPSettings) -> None:
    """Position features: the checks `capture` and `_check_samples` make on spatial means, from the moments: enough
    images for the estimator, an output that varies, dead layers named, and a warning where a reader has fewer
    effective samples than features (its covariance is then shrunk, see `rank_deficient_ridge`)."""
    readers = [r for rs in moments.values() for r in rs]
    n = readers[0].images
    _require_samples(n, settings)
    if output.constant:
        raise constant_output_error(n)
    warn_dead_layers([key for key, rs in moments.items() if rs and all(r.constant_units for r in rs)], n,
                     stacklevel=5)
    short = [r for r in readers if r.effective_samples < r.n_units * r.f]
    if short:
        worst = min(short, key=lambda r: r.effective_samples / (r.n_units * r.f))
        where = "" if worst.positions == 1 else f" (effective, over {worst.positions} positions per image)"
        _warn_few_samples(worst.effective_samples, worst.n_units * worst.f, f"{where}, read by {worst.reader!r}",
                          stacklevel=6)


def _require_samples(n: int, settings: MIPPSettings) -> None:
    minimum = estimator_class(settings.estimator).min_samples
    if n < minimum:
        raise ValueError(f"only {n} calibration samples: the {settings.estimator} estimator needs at least "
                         f"{minimum} (a few thousand recommended, e.g. n_samples=2000)")


def _warn_few_samples(samples: int, width: int, detail: str = "", stacklevel: int = 4) -> None:
    warnings.warn(f"{samples} calibration samples for a layer of {width} features{detail}: covariances are "
                  f"ridge-regularised, but use at least {2 * width} samples for reliable decisions",
                  stacklevel=stacklevel)


def _check_samples(acts: Activations, settings: MIPPSettings) -> None:
    """Enough calibration samples for the estimator (its `min_samples`); a warning when a ridge-regularised one has
    fewer samples than the widest layer has features."""
    _require_samples(acts.n_samples, settings)
    widest = max(v.shape[1] * v.shape[2] for v in acts.units.values())
    if estimator_class(settings.estimator).ridge_regularised and acts.n_samples < widest:
        _warn_few_samples(acts.n_samples, widest)
