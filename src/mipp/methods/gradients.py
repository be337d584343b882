"""What the saliency baselines share: labelled calibration batches, a scoring copy of the model, the loss gradient,
Hessian- and Gauss-Newton-vector products of the loss, and masking of removed units.

Every derivative is taken on a deep copy of the model in eval mode (batch norm uses its running statistics, dropout
is off), so scoring never changes the caller's model, its batch-norm statistics or its gradients, and the same
inputs give the same scores. The loss is the mean cross-entropy over all calibration samples, accumulated batch by
batch (each batch weighted by its share of the samples).
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from mipp.activations import calibration_batches
from mipp.units import UnitGraph

Batches = list[tuple[torch.Tensor, torch.Tensor]]

NEEDS_LABELS = (
    "{method} needs labelled calibration data (it differentiates the classification loss): pass a Dataset whose "
    "items are (input, label), an (inputs, labels) pair of tensors, or a DataLoader yielding (inputs, labels); "
    "unlabelled inputs are enough only for data-free or activation-based methods (random, magnitude, SynFlow, "
    "ThiNet, MIPP)"
)


# ------------------------------------------------------------------------------------------------ calibration data


def labelled_batches(data, n_samples: int, *, batch_size: int = 256, seed: int = 0,
                     method: str = "this method") -> Batches:
    """At most `n_samples` (inputs, labels) pairs in batches, from a labelled Dataset, a pair or a DataLoader.

    A Dataset is subsampled with the same seeded permutation `activations.calibration_batches` uses, so gradient
    methods and activation methods see the same samples.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    inputs, labels = _labelled_tensors(data, n_samples, seed, method)
    if len(inputs) == 0:
        raise ValueError("the calibration data is empty: pass at least a few labelled samples")
    if labels.dtype.is_floating_point or labels.dim() != 1 or len(labels) != len(inputs):
        raise ValueError(
            f"labels must be a 1-D integer tensor with one class index per input, got dtype {labels.dtype} and "
            f"shape {tuple(labels.shape)} for {len(inputs)} inputs"
        )
    labels = labels.long()
    return [(inputs[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, len(inputs), batch_size)]


def _labelled_tensors(data, n_samples: int, seed: int, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(d, torch.Tensor) for d in data):
        return data[0][:n_samples], torch.as_tensor(data[1])[:n_samples]
    if isinstance(data, torch.utils.data.DataLoader):
        xs, ys, taken = [], [], 0
        for batch in data:
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                raise ValueError(NEEDS_LABELS.format(method=method))
            xs.append(batch[0][: n_samples - taken])
            ys.append(torch.as_tensor(batch[1])[: n_samples - taken])
            taken += len(xs[-1])
            if taken >= n_samples:
                break
        return torch.cat(xs), torch.cat(ys)
    if isinstance(data, torch.utils.data.Dataset):
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n_samples]
        images, labels = getattr(data, "images", None), getattr(data, "labels", None)
        if images is not None and labels is not None:
            return torch.as_tensor(images)[order], torch.as_tensor(labels)[order]
        items = [data[int(i)] for i in order]
        if not items or not all(isinstance(item, (tuple, list)) and len(item) >= 2 for item in items):
            raise ValueError(NEEDS_LABELS.format(method=method))
        return torch.stack([torch.as_tensor(item[0]) for item in items]), \
            torch.as_tensor([int(item[1]) for item in items])
    if isinstance(data, torch.Tensor):
        raise ValueError(NEEDS_LABELS.format(method=method))
    raise TypeError(
        f"calibration data of type {type(data).__name__} is not supported: pass a labelled torch Dataset, an "
        "(inputs, labels) pair of tensors or a DataLoader"
    )


def batches_per_round(batches: Batches, rounds: int, samples_per_round: int | None = None,
                      batch_size: int = 256) -> list[Batches]:
    """Split the calibration samples among `rounds`: round k takes the next `samples_per_round` of them (default:
    an equal share, so all rounds together read the calibration set once), wrapping around when they run out."""
    inputs = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    share = samples_per_round or -(-len(inputs) // rounds)
    if share < 1:
        raise ValueError(f"samples_per_round must be >= 1, got {samples_per_round}")
    out = []
    for k in range(rounds):
        idx = torch.arange(k * share, (k + 1) * share) % len(inputs)
        out.append([(inputs[idx[i:i + batch_size]], labels[idx[i:i + batch_size]])
                    for i in range(0, len(idx), batch_size)])
    return out


def class_balanced(batches: Batches, per_class: int, draw: int = 0, batch_size: int = 256) -> Batches:
    """`per_class` samples of every class (GraSP's reference code scores on 10 per class); draw k takes each class's
    k-th block of `per_class`, wrapping around when a class runs out."""
    inputs = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    chosen = []
    for label in torch.unique(labels):
        members = torch.nonzero(labels == label).flatten()
        chosen.append(members[torch.arange(draw * per_class, (draw + 1) * per_class) % len(members)].unique())
    idx = torch.sort(torch.cat(chosen)).values
    return [(inputs[idx[i:i + batch_size]], labels[idx[i:i + batch_size]]) for i in range(0, len(idx), batch_size)]


def input_batches(data, n_samples: int, *, batch_size: int = 256, seed: int = 0) -> list[torch.Tensor]:
    """Unlabelled input batches (labels, if any, are ignored)."""
    batches = list(calibration_batches(data, n_samples, batch_size, seed))
    if not batches:
        raise ValueError("the calibration data is empty: pass at least a few samples")
    return batches


# ------------------------------------------------------------------------------------------------ models


def model_device(model: nn.Module, device=None) -> torch.device:
    if device is not None:
        return torch.device(device)
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def scoring_copy(model: nn.Module, device=None, dtype: torch.dtype | None = None) -> nn.Module:
    """A deep copy in eval mode with every parameter requiring grad, on `device` (default: the model's)."""
    clone = copy.deepcopy(model).to(model_device(model, device))
    if dtype is not None:
        clone = clone.to(dtype)
    clone.eval()
    for param in clone.parameters():
        param.requires_grad_(True)
        param.grad = None
    return clone


def named_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def own_param_names(units: UnitGraph) -> set[str]:
    """Parameters that belong to some unit's own weights: producers' and norms' weights and biases (dim 0 sliced)."""
    names = set()
    for group in units.groups:
        for coupling in group.coupled("out"):
            names.update({f"{coupling.module_name}.weight", f"{coupling.module_name}.bias"})
    return names


# ------------------------------------------------------------------------------------------------ derivatives


def batch_loss(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
               device=None) -> torch.Tensor:
    device = model_device(model, device)
    logits = model(inputs.to(device))
    return F.cross_entropy(logits / temperature, labels.to(device))


def _weights(batches: Batches) -> list[float]:
    total = sum(len(y) for _, y in batches)
    return [len(y) / total for _, y in batches]


def loss_gradient(model: nn.Module, batches: Batches, *, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """Gradient of the mean cross-entropy over every calibration sample, per parameter name."""
    params = named_params(model)
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    for weight, (inputs, labels) in zip(_weights(batches), batches):
        loss = batch_loss(model, inputs, labels, temperature)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for name, grad in zip(params, grads):
            if grad is not None:
                total[name] += weight * grad
    return total


def hessian_vector_product(model: nn.Module, batches: Batches, vector: dict[str, torch.Tensor], *,
                           temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """H v for the Hessian H of the mean loss, by double back-propagation (Pearlmutter's trick)."""
    params = named_params(model)
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    for weight, (inputs, labels) in zip(_weights(batches), batches):
        loss = batch_loss(model, inputs, labels, temperature)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True)
        dot = sum((g * vector[name].detach()).sum() for name, g in zip(params, grads) if g is not None)
        hv = torch.autograd.grad(dot, list(params.values()), allow_unused=True)
        for name, value in zip(params, hv):
            if value is not None:
                total[name] += weight * value
    return total


def gauss_newton_vector_product(model: nn.Module, batches: Batches, vector: dict[str, torch.Tensor]
                                ) -> dict[str, torch.Tensor]:
    """G v for the Gauss-Newton matrix G = J^T (d^2 loss / d logits^2) J of the mean cross-entropy.

    J v is a forward-mode derivative (torch.func.jvp); the softmax cross-entropy's Hessian in the logits is
    diag(p) - p p^T per sample; J^T is one backward pass.
    """
    params = {name: p.detach() for name, p in named_params(model).items()}
    tangents = {name: vector[name].detach().to(p.dtype) for name, p in params.items()}
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    device = model_device(model)
    for weight, (inputs, _) in zip(_weights(batches), batches):
        inputs = inputs.to(device)

        def logits_of(p):
            return torch.func.functional_call(model, p, (inputs,))

        _, jv = torch.func.jvp(logits_of, (params,), (tangents,))
        primal = {name: p.clone().requires_grad_(True) for name, p in params.items()}
        logits = logits_of(primal)
        prob = torch.softmax(logits.detach(), dim=1)
        curvature_jv = prob * jv - prob * (prob * jv).sum(1, keepdim=True)  # (diag(p) - p p^T) J v
        back = torch.autograd.grad(logits, list(primal.values()), curvature_jv / len(inputs), allow_unused=True)
        for name, value in zip(primal, back):
            if value is not None:
                total[name] += weight * value
    return total


# ------------------------------------------------------------------------------------------------ masking


@torch.no_grad()
def zero_removed_units(model: nn.Module, units: UnitGraph, removed: dict[str, Iterable[int]]) -> nn.Module:
    """Zero what every reader takes from the removed units (in place): the masked model computes what the pruned
    one would (same rule as `surgery.mask_model`, without building a Plan)."""
    for group in units.groups:
        gone = torch.as_tensor(sorted(removed.get(group.key, ())), dtype=torch.long)
        if gone.numel() == 0:
            continue
        for coupling in group.coupled("in"):
            module = model.get_submodule(coupling.module_name)
            module.weight[:, coupling.index[torch.isin(coupling.unit, gone)]] = 0
    return model


def reduce_scores(units: UnitGraph, param_scores: dict[str, torch.Tensor], *, include_readers: bool = False
                  ) -> dict[str, torch.Tensor]:
    """Per group, the sum of parameter-level scores over each unit's weights (see `UnitGroup.reduce`), on the CPU."""
    on_cpu = {name: score.detach().cpu() for name, score in param_scores.items()}
    return {g.key: g.reduce(on_cpu, include_readers=include_readers) for g in units.groups}


def unit_reduction(units: UnitGraph, saliency: dict[str, torch.Tensor], reduction: str, *,
                   include_readers: bool = False) -> dict[str, torch.Tensor]:
    """Turn a parameter-level saliency into unit scores: "l1" sums |saliency| (the L1 norm of the unit's saliency
    vector), "sum" sums the signed saliency."""
    if reduction not in ("l1", "sum"):
        raise ValueError(f"reduction must be 'l1' (L1 norm of the unit's saliencies) or 'sum', got {reduction!r}")
    if reduction == "l1":
        saliency = {name: s.abs() for name, s in saliency.items()}
    return reduce_scores(units, saliency, include_readers=include_readers)
