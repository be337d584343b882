"""Gradient saliency baselines, scored per unit and ranked globally.

All use the mean cross-entropy over the labelled calibration set on an eval-mode copy of the model (see
`gradients.py`); the parameter-level saliency is summed over each unit's own weights: the output slices of its
producers and its norm layer's weight and bias (`UnitGroup.reduce`). Readers' input slices are left out unless
include_readers=True.

- snip (Lee et al. 2019, "SNIP: single-shot network pruning based on connection sensitivity"): sum over the unit's
  weights of |w * dL/dw|. Init regime.
- itersnip (de Jorge et al. 2021, "Progressive skeletonization", Iter-SNIP): SNIP re-computed on the masked network
  over `rounds` (10) rounds of an exponential schedule; like Iter-SNIP's fresh mini-batch per iteration, each round
  scores on its own share of the calibration samples (samples_per_round, default n_samples / rounds), so the whole
  run reads the calibration set once. Init regime.
- grasp (Wang et al. 2020, "Picking winning tickets before training by preserving gradient flow"): the weight
  saliency is S = -w * (H g), g the loss gradient and H g one Hessian-vector product; GraSP removes the weights of
  largest S. Made structured as in the MIPP paper: a unit's score is the L1 norm of S over its weights
  (reduction="l1", default; larger = keep); reduction="sum" instead ranks by -sum(S) (removes the units whose
  summed S is largest). As in the GraSP reference code, logits are divided by `temperature` (200) and the scores
  use 10 calibration samples per class (samples_per_class; None: every calibration sample). Init regime.
- itergrasp: GraSP re-computed on the masked network over `rounds` (10) rounds, each on a fresh draw of
  samples_per_class samples per class (None: each round on its own share of all samples, as itersnip). Init regime.
- taylor (Molchanov et al. 2017, "Pruning convolutional neural networks for resource efficient inference"):
  |mean over positions of activation * dL/dactivation| per example, averaged over examples; the activation is what
  the unit's readers read (summed over every reader of a residual stream); scores are L2-normalised per group
  (normalize=True, the paper's layer-wise rescaling). Trained regime.
- sosp-h (Nonnenmacher et al. 2022, "SOSP: efficiently capturing global correlations by second-order structured
  pruning"): the second-order change of the loss when the unit's weights theta_s are removed, with the curvature
  term taken against all prunable weights theta at once (one Hessian-vector product captures every correlation):
  |-theta_s . g + 1/2 theta_s . (H theta)|, H the Gauss-Newton matrix (gauss_newton=False: the exact Hessian).
  Trained regime.
"""
from __future__ import annotations

import torch

from mipp.methods.base import Budget, PruneContext, UnitScores
from mipp.methods.gradients import (Batches, batches_per_round, class_balanced, gauss_newton_vector_product,
                                    hessian_vector_product, labelled_batches, loss_gradient, named_params,
                                    own_param_names, reduce_scores, scoring_copy, unit_reduction, zero_removed_units)
from mipp.methods.iterative import prune_progressively
from mipp.methods.registry import register, register_criterion
from mipp.units import UnitGraph

GRASP_TEMPERATURE = 200.0
GRASP_SAMPLES_PER_CLASS = 10


def _batches(ctx: PruneContext, method: str, batch_size: int) -> Batches:
    return labelled_batches(ctx.data, ctx.n_samples, batch_size=batch_size, seed=ctx.seed, method=method)


# ------------------------------------------------------------------------------------------------ SNIP


def snip_saliency(model: torch.nn.Module, batches: Batches) -> dict[str, torch.Tensor]:
    """|w * dL/dw| for every parameter."""
    grads = loss_gradient(model, batches)
    return {name: (p.detach() * grads[name]).abs() for name, p in named_params(model).items()}


def snip_scores(model, units: UnitGraph, batches: Batches, include_readers: bool = False):
    return reduce_scores(units, snip_saliency(model, batches), include_readers=include_readers)


@register_criterion("snip", regimes=("init",),
                    summary="SNIP (Lee et al. 2019): sum of |w * dL/dw| over each unit's weights")
def score_snip(ctx: PruneContext, batch_size: int = 256, include_readers: bool = False) -> UnitScores:
    model = scoring_copy(ctx.model, ctx.device)
    scores = snip_scores(model, ctx.units, _batches(ctx, "snip", batch_size), include_readers)
    return UnitScores(scores, {"include_readers": include_readers})


@register("itersnip", regimes=("init",),
          summary="Iter-SNIP (de Jorge et al. 2021): SNIP re-scored on the masked net, exponential schedule")
def select_itersnip(ctx: PruneContext, budget: Budget, rounds: int = 10, samples_per_round: int | None = None,
                    batch_size: int = 256, include_readers: bool = False):
    model = scoring_copy(ctx.model, ctx.device)
    per_round = batches_per_round(_batches(ctx, "itersnip", batch_size), rounds, samples_per_round, batch_size)

    def score(removed, round_index):
        zero_removed_units(model, ctx.units, removed)
        return snip_scores(model, ctx.units, per_round[round_index], include_readers)

    return prune_progressively(ctx, budget, score, rounds=rounds, method="itersnip",
                               settings={"include_readers": include_readers, "samples_per_round": samples_per_round})


# ------------------------------------------------------------------------------------------------ GraSP


def grasp_saliency(model: torch.nn.Module, batches: Batches, temperature: float = GRASP_TEMPERATURE
                   ) -> dict[str, torch.Tensor]:
    """GraSP's weight score S = -w * (H g); GraSP removes the weights whose S is largest."""
    grads = loss_gradient(model, batches, temperature=temperature)
    hg = hessian_vector_product(model, batches, grads, temperature=temperature)
    return {name: -(p.detach() * hg[name]) for name, p in named_params(model).items()}


def grasp_scores(model, units: UnitGraph, batches: Batches, reduction: str = "l1",
                 temperature: float = GRASP_TEMPERATURE, include_readers: bool = False):
    saliency = grasp_saliency(model, batches, temperature)
    if reduction == "sum":  # keep-score: the units whose summed GraSP score is smallest are kept
        saliency = {name: -s for name, s in saliency.items()}
    return unit_reduction(units, saliency, reduction, include_readers=include_readers)


def _grasp_batches(ctx: PruneContext, method: str, samples_per_class: int | None, batch_size: int, draw: int = 0):
    batches = _batches(ctx, method, batch_size)
    return batches if samples_per_class is None else class_balanced(batches, samples_per_class, draw, batch_size)


@register_criterion("grasp", regimes=("init",),
                    summary="GraSP (Wang et al. 2020): -w * Hg, structured by the L1 norm per unit (MIPP paper)")
def score_grasp(ctx: PruneContext, reduction: str = "l1", temperature: float = GRASP_TEMPERATURE,
                samples_per_class: int | None = GRASP_SAMPLES_PER_CLASS, batch_size: int = 256,
                include_readers: bool = False) -> UnitScores:
    model = scoring_copy(ctx.model, ctx.device)
    batches = _grasp_batches(ctx, "grasp", samples_per_class, batch_size)
    scores = grasp_scores(model, ctx.units, batches, reduction, temperature, include_readers)
    return UnitScores(scores, {"reduction": reduction, "temperature": temperature,
                               "include_readers": include_readers, "samples_per_class": samples_per_class})


@register("itergrasp", regimes=("init",), summary="GraSP re-scored on the masked net, exponential schedule")
def select_itergrasp(ctx: PruneContext, budget: Budget, rounds: int = 10,
                     samples_per_class: int | None = GRASP_SAMPLES_PER_CLASS, reduction: str = "l1",
                     temperature: float = GRASP_TEMPERATURE, batch_size: int = 256, include_readers: bool = False):
    model = scoring_copy(ctx.model, ctx.device)
    if samples_per_class is None:
        per_round = batches_per_round(_batches(ctx, "itergrasp", batch_size), rounds, None, batch_size)
    else:
        per_round = [_grasp_batches(ctx, "itergrasp", samples_per_class, batch_size, draw=k) for k in range(rounds)]

    def score(removed, round_index):
        zero_removed_units(model, ctx.units, removed)
        return grasp_scores(model, ctx.units, per_round[round_index], reduction, temperature, include_readers)

    return prune_progressively(ctx, budget, score, rounds=rounds, method="itergrasp",
                               settings={"reduction": reduction, "temperature": temperature,
                                         "include_readers": include_readers, "samples_per_class": samples_per_class})


# ------------------------------------------------------------------------------------------------ Taylor


class _ReaderGates:
    """Multiplies each reader's input by a tensor of ones that requires grad: its gradient is activation * dL/da,
    through that reader only, so summing over readers of one tensor counts its gradient exactly once."""

    def __init__(self, model: torch.nn.Module, units: UnitGraph):
        self.gates: dict[str, torch.Tensor] = {}
        self.handles = []
        readers = {c.module_name for g in units.groups for c in g.coupled("in")}
        for name in sorted(readers):
            self.handles.append(model.get_submodule(name).register_forward_pre_hook(self._hook(name)))

    def _hook(self, name):
        def gate(module, inputs):
            ones = torch.ones_like(inputs[0], requires_grad=True)
            self.gates[name] = ones
            return (inputs[0] * ones,) + tuple(inputs[1:])
        return gate

    def remove(self):
        for handle in self.handles:
            handle.remove()


def taylor_scores(model: torch.nn.Module, units: UnitGraph, batches: Batches, normalize: bool = True
                  ) -> dict[str, torch.Tensor]:
    """Molchanov et al. (2017): E_examples |mean_positions(a * dL/da)| per unit, optionally L2-normalised per group."""
    totals = {g.key: torch.zeros(g.size, dtype=torch.float64) for g in units.groups}
    n_total = sum(len(y) for _, y in batches)
    gates = _ReaderGates(model, units)
    try:
        for inputs, labels in batches:
            gates.gates.clear()
            logits = model(inputs.to(next(model.parameters()).device))
            # summed loss: each example's gradient is that of its own loss (eval mode: examples are independent)
            loss = torch.nn.functional.cross_entropy(logits, labels.to(logits.device), reduction="sum")
            names = list(gates.gates)
            grads = dict(zip(names, torch.autograd.grad(loss, [gates.gates[n] for n in names])))
            for group in units.groups:
                per_example = torch.zeros(len(labels), group.size, dtype=torch.float64)
                for coupling in group.coupled("in"):
                    per_example += _unit_means(grads[coupling.module_name], coupling, group.size)
                totals[group.key] += per_example.abs().sum(0)
    finally:
        gates.remove()
    scores = {key: total / n_total for key, total in totals.items()}
    if normalize:
        scores = {key: s / s.norm().clamp_min(1e-300) for key, s in scores.items()}
    return scores


def _unit_means(a_times_grad: torch.Tensor, coupling, n_units: int) -> torch.Tensor:
    """(N, channels, *spatial) -> (N, n_units): mean over positions, then over the unit's input features."""
    per_channel = a_times_grad.detach().double().flatten(2).mean(2) if a_times_grad.dim() > 2 \
        else a_times_grad.detach().double()
    picked = per_channel[:, coupling.index.to(per_channel.device)].cpu()
    summed = torch.zeros(len(picked), n_units, dtype=torch.float64).index_add_(1, coupling.unit, picked)
    counts = torch.bincount(coupling.unit, minlength=n_units).clamp_min(1).double()
    return summed / counts


@register_criterion("taylor", regimes=("trained",),
                    summary="first-order Taylor (Molchanov et al. 2017): |activation * gradient| per unit")
def score_taylor(ctx: PruneContext, normalize: bool = True, batch_size: int = 256) -> UnitScores:
    model = scoring_copy(ctx.model, ctx.device)
    scores = taylor_scores(model, ctx.units, _batches(ctx, "taylor", batch_size), normalize)
    return UnitScores(scores, {"normalize": normalize})


# ------------------------------------------------------------------------------------------------ SOSP-H


def sosp_h_scores(model: torch.nn.Module, units: UnitGraph, batches: Batches, gauss_newton: bool = True
                  ) -> dict[str, torch.Tensor]:
    """|-theta_s . g + 1/2 theta_s . (H theta)| per unit, theta = every unit's own weights (zero elsewhere)."""
    own = own_param_names(units)
    params = named_params(model)
    theta = {name: p.detach() if name in own else torch.zeros_like(p) for name, p in params.items()}
    grads = loss_gradient(model, batches)
    product = gauss_newton_vector_product if gauss_newton else hessian_vector_product
    h_theta = product(model, batches, theta)
    first = reduce_scores(units, {n: theta[n] * grads[n] for n in params})
    second = reduce_scores(units, {n: theta[n] * h_theta[n] for n in params})
    return {key: (-first[key] + 0.5 * second[key]).abs() for key in first}


@register_criterion("sosp-h", regimes=("trained",),
                    summary="SOSP-H (Nonnenmacher et al. 2022): second-order saliency via one Hessian-vector product")
def score_sosp_h(ctx: PruneContext, gauss_newton: bool = True, batch_size: int = 256) -> UnitScores:
    model = scoring_copy(ctx.model, ctx.device)
    scores = sosp_h_scores(model, ctx.units, _batches(ctx, "sosp-h", batch_size), gauss_newton)
    return UnitScores(scores, {"gauss_newton": gauss_newton})
