"""SynFlow (Tanaka et al. 2020, "Pruning neural networks without any data by iteratively conserving synaptic flow").

Data-free: the network is linearised (every parameter and batch-norm statistic replaced by its absolute value,
eval mode, float64), fed an all-ones input, and R = sum of the outputs; a weight's synaptic saliency is
w * dR/dw (non-negative). Scores are re-computed over `rounds` (100) rounds with the removed units masked, on an
exponential schedule, so no layer is cut off by the one-shot ranking (layer collapse).

Made structured as in the MIPP paper: a unit's score is the L1 norm of the saliencies of its own weights (its
producers' output slices and its norm layer's parameters; reduction="l1"); since saliencies are non-negative this
equals their sum (reduction="sum" is accepted for symmetry with GraSP). include_readers=True adds the readers'
input slices. For a bias-free network, the synaptic flow into a unit equals the flow out of it (conservation).
"""
from __future__ import annotations

import torch

from mipp.methods.base import Budget, PruneContext
from mipp.methods.gradients import named_params, scoring_copy, unit_reduction, zero_removed_units
from mipp.methods.iterative import prune_progressively
from mipp.methods.registry import register
from mipp.units import UnitGraph


@torch.no_grad()
def linearise(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every floating parameter and buffer by its absolute value (in place)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            tensor.abs_()
    return model


def synaptic_saliency(model: torch.nn.Module, example_input: torch.Tensor) -> dict[str, torch.Tensor]:
    """w * dR/dw with R the summed output of the (already linearised) model on an all-ones input."""
    params = named_params(model)
    first = next(iter(params.values()))
    ones = torch.ones((1,) + tuple(example_input.shape[1:]), dtype=first.dtype, device=first.device)
    flow = model(ones).sum()
    grads = torch.autograd.grad(flow, list(params.values()), allow_unused=True)
    return {name: (p.detach() * g) if g is not None else torch.zeros_like(p)
            for (name, p), g in zip(params.items(), grads)}


def synflow_scores(model: torch.nn.Module, units: UnitGraph, example_input: torch.Tensor, reduction: str = "l1",
                   include_readers: bool = False) -> dict[str, torch.Tensor]:
    return unit_reduction(units, synaptic_saliency(model, example_input), reduction, include_readers=include_readers)


@register("synflow", regimes=("init",),
          summary="SynFlow (Tanaka et al. 2020): data-free synaptic flow, 100 masked rounds, L1 per unit")
def select_synflow(ctx: PruneContext, budget: Budget, rounds: int = 100, reduction: str = "l1",
                   include_readers: bool = False):
    model = linearise(scoring_copy(ctx.model, ctx.device, dtype=torch.float64))

    def score(removed, round_index):  # data-free: every round sees the same all-ones input
        zero_removed_units(model, ctx.units, removed)
        return synflow_scores(model, ctx.units, ctx.example_input, reduction, include_readers)

    return prune_progressively(ctx, budget, score, rounds=rounds, method="synflow",
                               settings={"reduction": reduction, "include_readers": include_readers})
