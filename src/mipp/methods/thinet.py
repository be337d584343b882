"""ThiNet (Luo et al. 2017, "ThiNet: a filter level pruning method for deep neural network compression").

A unit is judged by what the next layer computes from it. For sampled outputs of the group's readers (an example,
an output channel and a position), x_c is the part of that output contributed by unit c (its input slice times the
reader's weights there), so the output is sum_c x_c + bias. ThiNet removes, one at a time, the unit whose removal,
together with those already removed, changes the sampled outputs least: it grows the removed set T by
argmin_c sum_samples (sum_{t in T + c} x_t)^2 (computed from the Gram matrix of the contributions, accumulated batch by
batch). A group read by several layers (a residual stream) pools the samples of every reader. The greedy order is
computed on the unpruned model for every group.

Budget: the paper prunes every layer at one uniform ratio. Each unit gets the pseudo-score 1 - (k + 1/2) / size,
k its position in its group's greedy order, and global ranking of these scores removes the same fraction of every
group (to within one unit) while meeting the whole-network budget of units, parameters or MACs. ThiNet's optional
least-squares rescaling of the remaining weights is not applied (a Plan keeps the original weights).
Trained regime; unlabelled inputs suffice.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mipp.activations import reader_inputs
from mipp.methods.base import PruneContext, UnitScores
from mipp.methods.gradients import input_batches, model_device
from mipp.methods.registry import register_criterion
from mipp.units import Coupling


def unit_contributions(reader: nn.Module, inputs: torch.Tensor, coupling: Coupling, n_units: int,
                       samples_per_input: int | None, generator: torch.Generator) -> torch.Tensor:
    """(samples, n_units): each unit's contribution to sampled outputs of `reader`.

    samples_per_input outputs (an output channel and a position, drawn with replacement) per input example; None
    takes every output value.
    """
    inputs = inputs.detach()
    if isinstance(reader, nn.Linear):
        per_feature = _linear_contributions(reader, inputs, coupling, samples_per_input, generator)
    elif isinstance(reader, nn.Conv2d) and reader.groups == 1:
        per_feature = _conv_contributions(reader, inputs, coupling, samples_per_input, generator)
    else:
        kind = type(reader).__name__ + (f" with groups={reader.groups}" if isinstance(reader, nn.Conv2d) else "")
        raise ValueError(f"ThiNet handles readers that are nn.Linear or nn.Conv2d with groups=1; got {kind}")
    contributions = torch.zeros(per_feature.shape[0], n_units, dtype=torch.float64, device=per_feature.device)
    contributions.index_add_(1, coupling.unit.to(per_feature.device), per_feature.double())
    return contributions.cpu()


def _linear_contributions(linear: nn.Linear, inputs, coupling, samples, generator) -> torch.Tensor:
    """(samples, features read): input feature times the weight of a sampled output neuron."""
    index = coupling.index.to(inputs.device)
    features = inputs[:, index]  # (N, k)
    weight = linear.weight.detach()[:, index]  # (O, k)
    if samples is None:
        return (features[:, None, :] * weight[None]).reshape(-1, len(index))
    rows = torch.randint(linear.out_features, (len(inputs), samples), generator=generator).to(inputs.device)
    return (features[:, None, :] * weight[rows]).reshape(-1, len(index))


def _conv_contributions(conv: nn.Conv2d, inputs, coupling, samples, generator) -> torch.Tensor:
    """(samples, channels read): each read input channel's share of sampled output values (channel, position)."""
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise ValueError(f"ThiNet needs convolutions with numeric zero padding, got padding={conv.padding!r} "
                         f"and padding_mode={conv.padding_mode!r}")
    index = coupling.index.to(inputs.device)
    selected = inputs[:, index]
    weight = conv.weight.detach()[:, index]  # (O, k, kh, kw)
    if samples is None:  # every output value: unfold the whole map
        patches = F.unfold(selected, conv.kernel_size, dilation=conv.dilation, padding=conv.padding,
                           stride=conv.stride)  # (N, k * kh * kw, L)
        patches = patches.view(len(inputs), len(index), -1, patches.shape[-1])
        return torch.einsum("nkpl,okp->nolk", patches, weight.flatten(2)).reshape(-1, len(index))
    return _sampled_conv_contributions(conv, selected, weight, samples, generator)


def _sampled_conv_contributions(conv, selected, weight, samples, generator) -> torch.Tensor:
    """Only the sampled windows are gathered: (N * samples, k)."""
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    padded = F.pad(selected, (pw, pw, ph, ph))
    n, _, height, width = padded.shape
    out_h, out_w = (height - dh * (kh - 1) - 1) // sh + 1, (width - dw * (kw - 1) - 1) // sw + 1
    device = selected.device
    channel = torch.randint(conv.out_channels, (n, samples), generator=generator).to(device)
    row = torch.randint(out_h, (n, samples), generator=generator).to(device)
    col = torch.randint(out_w, (n, samples), generator=generator).to(device)
    rows = (row * sh)[..., None] + dh * torch.arange(kh, device=device)  # (N, S, kh)
    cols = (col * sw)[..., None] + dw * torch.arange(kw, device=device)  # (N, S, kw)
    example = torch.arange(n, device=device)[:, None, None, None]
    windows = padded[example, :, rows[..., :, None], cols[..., None, :]]  # (N, S, kh, kw, k)
    return torch.einsum("nsijk,nskij->nsk", windows, weight[channel]).reshape(-1, weight.shape[1])


def greedy_removal_order(gram: torch.Tensor, n_remove: int) -> list[int]:
    """ThiNet's greedy on the Gram matrix G = X^T X of the contributions X (samples x units).

    Adding unit c to the removed set T raises sum_samples (sum_{t in T} x_t)^2 by 2 sum_{t in T} G[t, c] + G[c, c],
    so each step costs O(units) instead of a pass over every sample.
    """
    gram = gram.double()
    cross = torch.zeros(gram.shape[0], dtype=torch.float64)  # sum over removed t of G[t, c]
    available = torch.ones(gram.shape[0], dtype=torch.bool)
    order = []
    for _ in range(n_remove):
        cost = 2 * cross + gram.diagonal()
        cost[~available] = float("inf")
        choice = int(torch.argmin(cost))
        order.append(choice)
        available[choice] = False
        cross += gram[choice]
    return order


def thinet_orders(ctx: PruneContext, samples_per_input: int | None = 10, batch_size: int = 64
                  ) -> dict[str, list[int]]:
    """Per group, every unit in ThiNet's greedy removal order (the min-width guard's survivors last)."""
    model = ctx.model
    was_training = model.training
    model.eval()
    device = model_device(model, ctx.device)
    generator = torch.Generator().manual_seed(ctx.seed)
    readers = sorted({c.module_name for g in ctx.units.groups for c in g.coupled("in")})
    grams = {g.key: torch.zeros(g.size, g.size, dtype=torch.float64) for g in ctx.units.groups}
    try:
        for batch in input_batches(ctx.data, ctx.n_samples, batch_size=batch_size, seed=ctx.seed):
            seen = reader_inputs(model, readers, batch.to(device))
            for group in ctx.units.groups:
                for coupling in group.coupled("in"):
                    reader = model.get_submodule(coupling.module_name)
                    x = unit_contributions(reader, seen[coupling.module_name], coupling, group.size,
                                           samples_per_input, generator)
                    grams[group.key] += x.T @ x
    finally:
        model.train(was_training)
    orders = {}
    for group in ctx.units.groups:
        order = greedy_removal_order(grams[group.key], group.size - ctx.min_width(group.size))
        orders[group.key] = order + [u for u in range(group.size) if u not in set(order)]
    return orders


@register_criterion("thinet", regimes=("trained",),
                    summary="ThiNet (Luo et al. 2017): greedy per layer, least change of the next layer's output; "
                            "uniform ratio")
def score_thinet(ctx: PruneContext, samples_per_input: int | None = 10, batch_size: int = 64) -> UnitScores:
    """The pseudo-score 1 - (k + 1/2) / size of the unit at position k of its group's greedy order (its rank)."""
    orders = thinet_orders(ctx, samples_per_input, batch_size)
    scores, ranks = {}, {}
    for group in ctx.units.groups:
        position = torch.empty(group.size, dtype=torch.float64)
        position[torch.as_tensor(orders[group.key])] = torch.arange(group.size, dtype=torch.float64)
        scores[group.key] = 1.0 - (position + 0.5) / group.size
        ranks[group.key] = position.long().tolist()
    return UnitScores(scores, {"samples_per_input": samples_per_input, "uniform_ratio": True}, ranks)
