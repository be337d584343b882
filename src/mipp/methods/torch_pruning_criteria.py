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
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch_pruning as tp

from mipp.methods import register
from mipp.methods.base import Budget, PruneContext, plan_from_scores
from mipp.methods.gradients import labelled_batches, loss_gradient, model_device, named_params, scoring_copy
from mipp.units import UnitGraph, build_dependency_graph

CRITERIA = {
    "tp-l1": lambda: tp.importance.MagnitudeImportance(p=1),
    "tp-l2": lambda: tp.importance.MagnitudeImportance(p=2),
    "tp-taylor": lambda: tp.importance.TaylorImportance(),
    "tp-lamp": lambda: tp.importance.LAMPImportance(),
    "tp-fpgm": lambda: tp.importance.FPGMImportance(),
    "tp-bn-scale": lambda: tp.importance.BNScaleImportance(),
    "tp-hessian": lambda: tp.importance.HessianImportance(),
}
GRADIENT_CRITERIA = {"tp-taylor": "gradient", "tp-hessian": "squared per-sample gradient"}


def fill_gradients(model: torch.nn.Module, batches, kind: str) -> None:
    """Write into .grad what the criterion reads: the mean loss gradient, or the mean squared per-sample one."""
    if kind == "gradient":
        grads = loss_gradient(model, batches)
    else:
        grads = mean_squared_sample_gradients(model, batches)
    for name, param in named_params(model).items():
        param.grad = grads[name].detach().clone()


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


def tp_group_scores(model: torch.nn.Module, units: UnitGraph, example_input: torch.Tensor, importance
                    ) -> dict[str, torch.Tensor]:
    """Per mipp group, the criterion's score of every unit on torch-pruning's group rooted at the group's key."""
    graph = build_dependency_graph(model, example_input.to(model_device(model)))
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


def select_tp(ctx: PruneContext, budget: Budget, criterion: str, batch_size: int = 256):
    """Score mipp's groups with torch-pruning's `criterion` (a CRITERIA key) and rank globally."""
    model = scoring_copy(ctx.model, ctx.device)
    if criterion in GRADIENT_CRITERIA:
        batches = labelled_batches(ctx.data, ctx.n_samples, batch_size=batch_size, seed=ctx.seed, method=criterion)
        fill_gradients(model, batches, "gradient" if criterion == "tp-taylor" else "squared")
    scores = tp_group_scores(model, ctx.units, ctx.example_input, CRITERIA[criterion]())
    return plan_from_scores(ctx, scores, budget, criterion, {"torch_pruning": tp.__version__})


def _register(name: str, summary: str):
    @register(name, summary=f"torch-pruning {summary} on mipp's groups, global ranking")
    def select(ctx: PruneContext, budget: Budget, batch_size: int = 256):
        return select_tp(ctx, budget, name, batch_size)
    return select


for _name, _summary in [("tp-l1", "MagnitudeImportance(p=1)"), ("tp-l2", "MagnitudeImportance(p=2)"),
                        ("tp-taylor", "TaylorImportance"), ("tp-lamp", "LAMPImportance"),
                        ("tp-fpgm", "FPGMImportance"), ("tp-bn-scale", "BNScaleImportance"),
                        ("tp-hessian", "HessianImportance")]:
    _register(_name, _summary)
