"""Structured iterative magnitude pruning (IMP) with re-training rounds (Han et al. 2015, "Learning both weights and
connections for efficient neural networks", applied to whole units as in Li et al. 2017).

Each of `rounds` rounds ranks the surviving units globally by the L1 norm of their own weights (as `magnitude`),
removes units up to the round's target on an exponential schedule, kept(k) = (1 - budget)^(k / rounds), and, except
after the last round, re-trains the physically smaller network for `epochs_per_round` epochs with
`mipp.train.fit`. The last round ranks with `plan_from_scores` so the Plan meets the budget exactly; units removed
in earlier rounds stay removed (they rank below every survivor). Weights are not rewound. The Plan refers to the
original model.
Trained regime; needs a labelled training set (option train_set, else the calibration data if it is labelled).
"""
from __future__ import annotations

import copy
import dataclasses

import torch

from mipp.methods.base import Budget, PruneContext, plan_from_scores
from mipp.methods.gradients import labelled_batches, model_device
from mipp.methods.iterative import exponential_schedule, ranking_with_history
from mipp.methods.random_magnitude import weight_norms
from mipp.methods.registry import register
from mipp.plan import Plan
from mipp.surgery import apply_plan
from mipp.units import find_units


def training_set(data, seed: int):
    """A labelled data set `mipp.train.fit` accepts: datasets pass through, an (inputs, labels) pair is wrapped."""
    if isinstance(data, torch.utils.data.Dataset):
        return data
    inputs, labels = labelled_batches(data, 10 ** 12, batch_size=10 ** 12, seed=seed, method="imp")[0]
    return torch.utils.data.TensorDataset(inputs, labels)


def train_config(ctx: PruneContext, epochs: int, overrides: dict | None):
    """mipp.train's defaults, seeded by ctx.seed, with the caller's overrides; epochs is epochs_per_round."""
    from mipp.train import TrainConfig

    device = str(ctx.device or model_device(ctx.model))
    return TrainConfig.from_dict({"seed": ctx.seed, "device": device, **(overrides or {}), "epochs": epochs})


def _magnitudes_in_original_indices(model, example_input, alive: dict[str, list[int]], sizes: dict[str, int]
                                    ) -> dict[str, torch.Tensor]:
    """L1 weight norms of the (physically pruned) model's units, written at their original unit indices."""
    current = weight_norms(model, find_units(model, example_input), p=1)
    scores = {}
    for key, size in sizes.items():
        full = torch.zeros(size, dtype=torch.float64)
        full[torch.as_tensor(alive[key], dtype=torch.long)] = current[key].double()
        scores[key] = full
    return scores


@register("imp", regimes=("trained",),
          summary="structured iterative magnitude pruning: L1 ranking + re-training with mipp.train.fit per round")
def select_imp(ctx: PruneContext, budget: Budget, rounds: int = 3, epochs_per_round: int = 1, train_set=None,
               train_options: dict | None = None) -> Plan:
    from mipp.train import fit

    train_set = training_set(train_set if train_set is not None else ctx.data, ctx.seed)
    config = train_config(ctx, epochs_per_round, train_options)
    sizes = {g.key: g.size for g in ctx.units.groups}
    alive = {key: list(range(size)) for key, size in sizes.items()}
    removed_at = {key: torch.full((size,), -1, dtype=torch.long) for key, size in sizes.items()}
    model = copy.deepcopy(ctx.model)
    settings = {"rounds": rounds, "epochs_per_round": epochs_per_round, "train": dataclasses.asdict(config)}
    for k, fraction in enumerate(exponential_schedule(budget.fraction, rounds)):
        scores = _magnitudes_in_original_indices(model, ctx.example_input, alive, sizes)
        ranked = ranking_with_history(scores, removed_at, rounds)
        if k == rounds - 1:
            return plan_from_scores(ctx, ranked, budget, "imp", settings)
        step = plan_from_scores(ctx, ranked, Budget(fraction, budget.metric), "imp")
        kept = {key: [i for i in step.kept[key] if removed_at[key][i] < 0] for key in sizes}
        for key in sizes:
            survivors = set(kept[key])
            removed_at[key][[i for i in alive[key] if i not in survivors]] = k
        model = _prune_to(model, ctx, alive, kept)
        alive = kept
        fit(model, train_set, config, progress=False)
    raise AssertionError("unreachable: the schedule has at least one round")


def _prune_to(model, ctx: PruneContext, alive: dict[str, list[int]], kept: dict[str, list[int]]):
    """Physically remove from `model` (whose units are `alive`, in original indices) every unit not in `kept`."""
    position = {key: {unit: i for i, unit in enumerate(units)} for key, units in alive.items()}
    local = Plan(kept={key: [position[key][u] for u in kept[key] if u in position[key]] for key in kept},
                 sizes={key: len(units) for key, units in alive.items()}, method="imp",
                 example_shape=list(ctx.example_input.shape))
    return apply_plan(model, local, ctx.example_input)
