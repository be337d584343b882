"""ProsPr (Alizadeh et al. 2022, "Prospect pruning: finding trainable weights at initialization using
meta-gradients"), structured per unit.

Each unit gets a mask c (all ones) that multiplies its own weights at initialisation (its producers' output slices
and its norm layer's weight and bias): W0 = c * W. The masked network takes `inner_steps` (3) plain SGD steps on
calibration batches (lr 0.05, batch_size 128), W_{k+1} = W_k - lr * dL(W_k)/dW_k, and the loss after them, on a
further batch (so (inner_steps + 1) * batch_size calibration samples are used, at most n_samples), is
differentiated back through all steps to the masks. A unit's score is |dL(W_M)/dc|: how much the loss after a few
steps of training depends on the unit being there. Init regime; needs labelled data.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mipp.methods.base import PruneContext, UnitScores
from mipp.methods.gradients import Batches, labelled_batches, model_device, scoring_copy
from mipp.methods.registry import register_criterion
from mipp.units import UnitGraph


def masked_weights(params: dict[str, torch.Tensor], units: UnitGraph, masks: dict[str, torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    """Parameters with every unit's own slices (dim 0 of producers and norms) multiplied by the unit's mask."""
    factors: dict[str, torch.Tensor] = {}
    for group in units.groups:
        for coupling in group.coupled("out"):
            for suffix in ("weight", "bias"):
                name = f"{coupling.module_name}.{suffix}"
                if name not in params:
                    continue
                current = factors.get(name, torch.ones(params[name].shape[0], dtype=params[name].dtype,
                                                       device=params[name].device))
                mask = masks[group.key].to(current)[coupling.unit.to(current.device)]
                factors[name] = current.index_put((coupling.index.to(current.device),), mask)
    out = {}
    for name, p in params.items():
        factor = factors.get(name)
        out[name] = p if factor is None else p * factor.view(-1, *([1] * (p.dim() - 1)))
    return out


def meta_gradient(model: torch.nn.Module, units: UnitGraph, batches: Batches, inner_steps: int, lr: float
                  ) -> dict[str, torch.Tensor]:
    """dL(W_M)/dc for every unit mask, through `inner_steps` differentiable SGD steps."""
    device = model_device(model)
    masks = {g.key: torch.ones(g.size, dtype=torch.float64, device=device, requires_grad=True)
             for g in units.groups}
    start = {name: p.detach().requires_grad_(True) for name, p in model.named_parameters()}
    weights = masked_weights(start, units, masks)

    def loss_at(w, batch):
        inputs, labels = batch
        logits = torch.func.functional_call(model, w, (inputs.to(device),))
        return F.cross_entropy(logits, labels.to(device))

    for step in range(inner_steps):
        loss = loss_at(weights, batches[step % len(batches)])
        grads = torch.autograd.grad(loss, list(weights.values()), create_graph=True)
        weights = {name: w - lr * g for (name, w), g in zip(weights.items(), grads)}
    final = loss_at(weights, batches[inner_steps % len(batches)])
    grads = torch.autograd.grad(final, list(masks.values()))
    return {key: g.detach().cpu() for key, g in zip(masks, grads)}


@register_criterion("prospr", regimes=("init",),
                    summary="ProsPr (Alizadeh et al. 2022): |meta-gradient| of unit masks through 3 inner SGD steps")
def score_prospr(ctx: PruneContext, inner_steps: int = 3, lr: float = 0.05, batch_size: int = 128) -> UnitScores:
    if inner_steps < 0:
        raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
    n_samples = min(ctx.n_samples, batch_size * (inner_steps + 1))
    batches = labelled_batches(ctx.data, n_samples, batch_size=batch_size, seed=ctx.seed, method="prospr")
    model = scoring_copy(ctx.model, ctx.device)
    scores = {key: g.abs() for key, g in meta_gradient(model, ctx.units, batches, inner_steps, lr).items()}
    return UnitScores(scores, {"inner_steps": inner_steps, "lr": lr, "batch_size": batch_size})
