"""The real `torch-pruning` criteria (Fang et al. 2023, "DepGraph: towards any structural pruning") on mipp's groups.

For each of mipp's unit groups the adapter asks torch-pruning's dependency graph for the pruning group rooted at the
group's key module, `DG.get_pruning_group(root, prune_out_channels, range(size))`, and calls the criterion on it:
the score of unit i is torch-pruning's group importance of root channel i, with the criterion's own defaults (group
reduction "mean" over every coupled layer, readers' input slices included, and the per-group normalisation
"mean" or LAMP's). Global ranking with `plan_from_scores` then matches torch-pruning's global pruning
(`MetaPruner(global_pruning=True)`), which thresholds the same scores network-wide.

Criteria (method names): tp-l1 / tp-l2 (MagnitudeImportance p=1/2), tp-taylor (TaylorImportance: |w * dL/dw|,
gradients of the mean loss over the labelled calibration set), tp-lamp (LAMPImportance), tp-fpgm (FPGMImportance,
distance to the geometric median), tp-bn-scale (BNScaleImportance, network slimming's |gamma|; needs batch norm),
tp-hessian (HessianImportance, OBD's w^2 * diag H with diag H ~ mean squared per-sample gradient). Per-sample
gradients are computed with torch.func and written to .grad, which HessianImportance reads when its own
accumulator is empty (its `accumulate_grad` keys the accumulator by parameter but tests membership by name, so it
keeps only the last sample's gradient).

The criteria run on the dependency graph `find_units` built for this prune call (`ctx.units.dependency_graph`),
whose nodes are the modules of `ctx.model` itself: gradients are computed on a scoring copy (as every saliency
baseline does), written into `ctx.model`'s `.grad` only while the criterion reads them, and the previous `.grad`
values restored afterwards, so the caller's model is left exactly as it was.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
import torch_pruning as tp

from mipp.methods.base import PruneContext, UnitScores
from mipp.methods.gradients import labelled_batches, loss_gradient, model_device, named_params, scoring_copy
from mipp.methods.registry import register_criterion
from mipp.units import UnitGraph

CRITERIA = {
    "tp-l1": lambda: tp.importance.MagnitudeImportance(p=1),
    "tp-l2": lambda: tp.importance.MagnitudeImportance(p=2),
    "tp-taylor": lambda: tp.importance.TaylorImportance(),
    "tp-lamp": lambda: tp.importance.LAMPImportance(),
    "tp-fpgm": lambda: tp.importance.FPGMImportance(),
    "tp-bn-scale": lambda: tp.importance.BNScaleImportance(),
    "tp-hessian": lambda: tp.importance.HessianImportance(),
}


def mean_squared_sample_gradients(model: torch.nn.Module, batches, chunk: int = 32) -> dict[str, torch.Tensor]:
    """(1/N) sum_i (dL_i/dw)^2 over calibration samples i (the empirical Fisher diagonal)."""
    params = {name: p.detach() for name, p in named_params(model).items()}
    device = model_device(model)

    def sample_loss(p, x, y):
        logits = torch.func.functional_call(model, p, (x.unsqueeze(0),))
        return F.cross_entropy(logits, y.unsqueeze(0))

    per_sample = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    count = 0
    for inputs, labels in batches:
        for start in range(0, len(inputs), chunk):
            x, y = inputs[start:start + chunk].to(device), labels[start:start + chunk].to(device)
            for name, g in per_sample(params, x, y).items():
                total[name] += g.pow(2).sum(0)
            count += len(x)
    return {name: t / count for name, t in total.items()}


# what each gradient criterion reads from .grad: the mean loss gradient, or the mean squared per-sample one
GRADIENTS = {"tp-taylor": loss_gradient, "tp-hessian": mean_squared_sample_gradients}


@contextmanager
def gradients_set(model: torch.nn.Module, grads: dict[str, torch.Tensor] | None):
    """Within the block, every parameter's .grad is grads[name] (on the parameter's device; None without grads);
    afterwards each parameter has its previous .grad again."""
    params = named_params(model)
    previous = {name: param.grad for name, param in params.items()}
    try:
        for name, param in params.items():
            param.grad = None if grads is None else grads[name].detach().to(param.device).clone()
        yield model
    finally:
        for name, param in params.items():
            param.grad = previous[name]


def tp_group_scores(model: torch.nn.Module, units: UnitGraph, importance) -> dict[str, torch.Tensor]:
    """Per mipp group, the criterion's score of every unit on torch-pruning's group rooted at the group's key, from
    the dependency graph `units` was found with (built on `model`)."""
    graph = units.dependency_graph
    if graph is None:
        raise ValueError("the unit graph carries no torch-pruning dependency graph: build it with "
                         "mipp.units.find_units(model, example_input)")
    scores = {}
    for group in units.groups:
        root = model.get_submodule(group.key)
        prune_out = graph.get_pruner_of_module(root).prune_out_channels
        tp_group = graph.get_pruning_group(root, prune_out, list(range(group.size)))
        score = importance(tp_group)
        if score is None:
            raise ValueError(
                f"the torch-pruning criterion {type(importance).__name__} has nothing to score in group "
                f"{group.key!r} (e.g. BN-scale needs a batch-norm layer in every group); choose another criterion"
            )
        scores[group.key] = score.detach().double().cpu()
    return scores


def score_tp(ctx: PruneContext, criterion: str, batch_size: int = 256) -> UnitScores:
    """Score mipp's groups with torch-pruning's `criterion` (a CRITERIA key), on ctx.model's dependency graph."""
    grads = None
    if criterion in GRADIENTS:
        batches = labelled_batches(ctx.data, ctx.n_samples, batch_size=batch_size, seed=ctx.seed, method=criterion)
        grads = GRADIENTS[criterion](scoring_copy(ctx.model, ctx.device), batches)
    with gradients_set(ctx.model, grads):
        scores = tp_group_scores(ctx.model, ctx.units, CRITERIA[criterion]())
    return UnitScores(scores, {"torch_pruning": tp.__version__})


def _register(name: str, summary: str):
    @register_criterion(name, summary=f"torch-pruning {summary} on mipp's groups, global ranking")
    def score(ctx: PruneContext, batch_size: int = 256) -> UnitScores:
        return score_tp(ctx, name, batch_size)
    return score


for _name, _summary in [("tp-l1", "MagnitudeImportance(p=1)"), ("tp-l2", "MagnitudeImportance(p=2)"),
                        ("tp-taylor", "TaylorImportance"), ("tp-lamp", "LAMPImportance"),
                        ("tp-fpgm", "FPGMImportance"), ("tp-bn-scale", "BNScaleImportance"),
                        ("tp-hessian", "HessianImportance")]:
    _register(_name, _summary)
