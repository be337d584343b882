"""`mipp.prune`: one call from a model and some data to a physically smaller model and its Plan.

A call traces the model once (`find_units`): the unit graph it returns carries the dependency graph, the module
order, the MACs and the reading points, and is handed to the cost model, the method (capture, criteria),
reconstruction and surgery. After selection, by default, the readers of removed units are re-fitted to the original
outputs (`mipp.reconstruct`, one more pass over the calibration data, before surgery) and batch-norm statistics are
re-estimated on the pruned model (`mipp.recalibrate`), for every method alike. Surgery is checked in between,
on a few calibration samples, before anything re-fits the pruned model (`mipp.surgery.apply_plan`, verify=True).

Device: with `device=` ("cpu", "cuda", "cuda:1", "auto") the model is moved there (`prune`: its copy, which is
returned there; `select_plan`: a copy when the model is elsewhere) and capture, gradient criteria, reconstruction
statistics (float64 accumulators) and recalibration run there; the captured activations go to the host, where the
MI estimators work in float64. Without it, everything runs where the model's parameters are.

Under torchrun (`mipp.distributed`), every rank calls `prune` on the same model and data: the calibration passes of
capture and reconstruction share the batches among the ranks and combine their results, every rank selects on the
same statistics, rank 0's Plan is broadcast, and every rank applies it (the same pruned model everywhere).
"""
from __future__ import annotations

import copy
import time
import warnings

import torch
import torch.nn as nn

from mipp import distributed
from mipp.activations import calibration_batches, check_calibration_data
from mipp.measure import CostModel
from mipp.methods import Budget, PruneContext, get_method
from mipp.methods.gradients import model_device
from mipp.plan import Plan
from mipp.recalibrate import RECALIBRATION_BATCHES, recalibrate_batch_norm
from mipp.reconstruct import reconstruction_mode, reconstruction_statistics, refit_readers, refit_sequentially
from mipp.surgery import apply_plan
from mipp.train import resolve_device
from mipp.units import example_input_for, find_units

VERIFY_SAMPLES = 8  # calibration samples the surgery is checked on (real inputs exercise more weights than zeros)


def make_context(model: nn.Module, data, *, example_input=None, min_units=1, n_samples=2000, seed=0,
                 device=None) -> PruneContext:
    """Trace `model` (the one trace of a prune call) and gather what a method may look at."""
    example_input = example_input_for(model, example_input)  # on the model's device
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
    check_calibration_data(data, ctx.example_input, ctx.n_samples, ctx.seed,
                           expected_from=_shape_source(model, context_options["example_input"]))
    check_finite_model(model)
    plan = info.select(ctx, budget, **options)
    plan = distributed.broadcast_plan(plan)  # under torchrun: rank 0's, so every rank applies the same Plan
    check_plan_scores(plan)
    return plan, ctx


def _shape_source(model: nn.Module, example_input) -> str:
    """Where the input shape the data is checked against comes from, for error messages."""
    config = getattr(model, "mipp_config", None)
    if example_input is None and config:
        return f"its mipp_config: in_channels={config.get('in_channels')}, input_size={config.get('input_size')}"
    return "the shape of its example input"


def check_finite_model(model: nn.Module) -> None:
    """Refuse a model with NaN or infinite parameters or buffers: every method would score garbage."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"the model's {name!r} contains NaN or infinite values: the checkpoint is corrupt or "
                             "its training diverged; load a good checkpoint")


def check_plan_scores(plan: Plan) -> None:
    """A NaN score makes the ranking arbitrary: refuse the plan and name where it came from. Scores all equal (e.g.
    all zero: constant activations, zero gradients) make it arbitrary too: a warning."""
    scores = []
    for key, decisions in plan.decisions.items():
        for decision in decisions:
            for field in ("score", "mi"):
                value = getattr(decision, field)
                if isinstance(value, float) and value != value:
                    raise ValueError(
                        f"method {plan.method!r} scored unit {decision.unit} of group {key!r} NaN: the calibration "
                        "data (beyond the samples checked up front) or the model's computation produce NaN or "
                        "infinite values (e.g. an overflow); clean the data, or check the model on it")
            if isinstance(decision.score, (int, float)):
                scores.append(float(decision.score))
    if len(scores) > 1 and len(set(scores)) == 1:
        warnings.warn(
            f"method {plan.method!r} gave all {len(scores)} units the same score ({scores[0]:g}), so which units it "
            "removed is arbitrary: its criterion cannot tell them apart on this model and data (weights still at "
            "their initial values, dead layers, activations or gradients that do not vary); choose a criterion "
            "that fits the model's state, or check the model and data", stacklevel=4)


def select_plan(model: nn.Module, data, *, method: str = "mipp", budget=None, metric: str = "units",
                min_units=1, n_samples: int = 2000, seed: int = 0, example_input=None, device=None,
                **options) -> Plan:
    """Decide which units to keep, without changing the model (with `device`, a copy of it is moved there)."""
    if device is not None:
        device = resolve_device(device)
        if model_device(model) != device:
            model = copy.deepcopy(model).to(device)
    context = dict(example_input=example_input, min_units=min_units, n_samples=n_samples, seed=seed, device=device)
    return _select(model, data, method, budget, metric, context, options)[0]


def prune(model: nn.Module, data, *, method: str = "mipp", budget=None, metric: str = "units", min_units=1,
          n_samples: int = 2000, seed: int = 0, example_input=None, inplace: bool = False, device=None,
          reconstruct: bool | str = True, recalibrate: bool = True, recalibration_batches: int = RECALIBRATION_BATCHES,
          verify: bool = True, **options) -> tuple[nn.Module, Plan]:
    """Prune `model` with `method` on calibration `data`; returns (smaller model, Plan).

    budget None (MIPP only): confidence mode, the sparsity follows from `confidence` (default 0.95).
    budget 0.5 with metric "units" | "params" | "macs": remove that fraction of the whole network.
    options go to the method (MIPP: estimator="gaussian"|"ksg"|"proxy", confidence, pool, estimator_options).
    reconstruct: re-fit every reader of removed units by ridge least squares on `n_samples` calibration samples so
    that it reproduces the original reader's output from the kept units: True (the default mode), "independent"
    (from the original network's inputs, one pass) or "sequential" (in forward order, from the pruned network's own
    inputs, which also compensates what earlier layers leave; a pass per reader), or False. recalibrate: re-estimate
    batch-norm statistics on `recalibration_batches` batches of 128 calibration samples. Both are recorded in
    `plan.settings`, and what they did (readers re-fitted, batches used, seconds) in `plan.stats`.
    verify: check the surgery, before reconstruction and recalibration change the model, on the first
    `VERIFY_SAMPLES` calibration samples: the physically pruned model must compute what the original computes with
    the removed units zeroed (one forward pass through each); raises `mipp.SurgeryError` otherwise.
    Unless `inplace`, the model is copied first and the copy is traced, scored and pruned: the caller's model is
    left untouched, and the one trace serves the selection, the reconstruction and the surgery.
    device: where the copy (or, `inplace`, the model) is moved and pruned, and returned; None: where it is.
    """
    target = model if inplace else copy.deepcopy(model)
    if device is not None:
        device = resolve_device(device)
        target.to(device)
    context = dict(example_input=example_input, min_units=min_units, n_samples=n_samples, seed=seed, device=device)
    plan, ctx = _select(target, data, method, budget, metric, context, options)
    _apply_with_repair(target, plan, ctx, data, reconstruct, recalibrate, recalibration_batches, verify)
    return target, plan


def _apply_with_repair(target: nn.Module, plan: Plan, ctx: PruneContext, data, reconstruct: bool | str,
                       recalibrate: bool, recalibration_batches: int, verify: bool = True) -> None:
    """Surgery, with the readers' statistics gathered on the unpruned model before it and their re-fit and the
    batch-norm recalibration after it; records settings and what was done in the plan."""
    mode = reconstruction_mode(reconstruct)
    started = time.perf_counter()
    statistics = (reconstruction_statistics(target, plan, data, units=ctx.units, n_samples=ctx.n_samples,
                                            seed=ctx.seed, device=ctx.device, moments=ctx.reader_moments)
                  if mode == "independent" else {})
    original = copy.deepcopy(target) if mode == "sequential" else None  # what every re-fitted reader reproduces
    statistics_seconds = time.perf_counter() - started
    started = time.perf_counter()
    check_batch = next(iter(calibration_batches(data, VERIFY_SAMPLES, seed=ctx.seed))) if verify else None
    apply_plan(target, plan, check_batch, units=ctx.units, verify=verify)
    surgery_seconds = time.perf_counter() - started
    started = time.perf_counter()
    if mode == "sequential":
        refitted = refit_sequentially(original, target, plan, data, units=ctx.units, n_samples=ctx.n_samples,
                                      seed=ctx.seed, device=ctx.device)
    else:
        refitted = refit_readers(target, statistics)
    reconstruction_seconds = statistics_seconds + time.perf_counter() - started
    started = time.perf_counter()
    batches = recalibrate_batch_norm(target, data, n_batches=recalibration_batches, seed=ctx.seed,
                                     device=ctx.device) if recalibrate else 0
    plan.settings.update(reconstruct=mode or False, recalibrate=recalibrate,
                         recalibration_batches=recalibration_batches, verify=verify)
    plan.stats.update(surgery_seconds=surgery_seconds, readers_refitted=len(refitted),
                      reconstruction_seconds=reconstruction_seconds, recalibration_batches_used=batches,
                      recalibration_seconds=time.perf_counter() - started)
