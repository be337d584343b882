"""Capture the activation of every prunable unit on a calibration set, in one forward pass.

A unit's activation is what the next layer reads: forward pre-hooks on each group's readers take their input
(after batch norm and nonlinearity). A conv channel is pooled to its spatial mean, or to a small grid (`pool=2`
gives 2x2 = 4 features per channel). When a group is read at several points (a residual stream is read by every
block), the unit's features from each point are concatenated: removing the unit removes all of them.
"""
from __future__ import annotations

import math

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mipp.units import UnitGraph

OUTPUT = "output:"  # prefix of target sources that are the network's own outputs


@dataclass
class Activations:
    """Per group: (n_samples, n_units, features_per_unit); per output module: (n_samples, features)."""

    units: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]

    @property
    def n_samples(self) -> int:
        return next(iter(self.units.values())).shape[0]


def calibration_batches(data, n_samples: int, batch_size: int = 256, seed: int = 0):
    """Yield input batches totalling at most n_samples from a tensor, a (inputs, labels) pair, a Dataset or a loader."""
    if isinstance(data, (tuple, list)) and data and isinstance(data[0], torch.Tensor):
        data = data[0]
    if isinstance(data, torch.Tensor):
        for start in range(0, min(n_samples, len(data)), batch_size):
            yield data[start:min(start + batch_size, n_samples)]
        return
    if isinstance(data, torch.utils.data.DataLoader):
        taken = 0
        for batch in data:
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            yield inputs[: n_samples - taken]
            taken += len(inputs)
            if taken >= n_samples:
                return
        return
    if isinstance(data, torch.utils.data.Dataset):
        images = getattr(data, "images", None)
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(data), generator=generator)[:n_samples]
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if images is not None:
                yield images[idx]
            else:
                yield torch.stack([data[int(i)][0] for i in idx])
        return
    raise TypeError(
        f"calibration data of type {type(data).__name__} is not supported: pass a tensor of inputs, an "
        "(inputs, labels) pair, a torch Dataset or a DataLoader"
    )


def check_calibration_data(data, example_input: torch.Tensor, n_samples: int, seed: int = 0) -> None:
    """Refuse calibration data that would prune blind, with the cause and the fix: inputs of another shape than the
    model takes, NaN or infinite values, or inputs that are all the same (e.g. all zeros), which leave every unit
    constant and would cut every layer to its minimum width. Reads the first batch only."""
    batch = next(iter(calibration_batches(data, min(n_samples, 256), seed=seed)), None)
    if batch is None or len(batch) == 0:
        raise ValueError("the calibration data is empty: pass at least a few hundred samples")
    expected = tuple(example_input.shape[1:])
    if tuple(batch.shape[1:]) != expected:
        raise ValueError(
            f"calibration inputs have shape {tuple(batch.shape[1:])} per sample but the model takes {expected} "
            "(the shape of its example input): pass inputs of that shape, or the example_input your data matches"
        )
    if not torch.isfinite(batch).all():
        raise ValueError("the calibration inputs contain NaN or infinite values: clean or impute them first")
    if len(batch) > 1 and bool((batch == batch[:1]).all()):
        raise ValueError(
            "every calibration input is the same (e.g. all zeros): the units would show no variation and every "
            "layer would be cut to its minimum; pass real samples of the data the model is used on"
        )


def _pool(x: torch.Tensor, pool: int | None) -> torch.Tensor:
    """(N, C, *spatial) -> (N, C, f): spatial mean (pool None) or an adaptive pool x pool grid."""
    if x.dim() == 2:
        return x.unsqueeze(-1)
    if pool is None:
        return x.flatten(2).mean(-1, keepdim=True)
    return F.adaptive_avg_pool2d(x, pool).flatten(2) if x.dim() == 4 else x.flatten(2).mean(-1, keepdim=True)


def _unit_features(x: torch.Tensor, index: torch.Tensor, unit: torch.Tensor, n_units: int, pool) -> torch.Tensor:
    """Features of each unit read by one reader: (N, n_units, f). Linear readers after a flatten average the
    several input features that belong to one unit (the spatial positions of a channel); with a pool grid, a
    channel's positions that form a square map are pooled to the same grid as a conv reader's."""
    x = x.detach().float()
    grid = _flattened_grid(x, index, unit, n_units, pool)
    if grid is not None:
        return grid
    pooled = _pool(x, pool)[:, index]  # (N, k, f)
    counts = torch.bincount(unit, minlength=n_units).clamp_min(1).to(pooled.dtype)
    summed = torch.zeros(pooled.shape[0], n_units, pooled.shape[2], dtype=pooled.dtype, device=pooled.device)
    summed.index_add_(1, unit.to(pooled.device), pooled)
    return summed / counts.view(1, -1, 1)


def _flattened_grid(x, index, unit, n_units: int, pool) -> torch.Tensor | None:
    """(N, n_units, pool*pool) for a Linear reading flattened square maps (each unit s*s positions in row-major
    order, as nn.Flatten lays out (C, s, s)); None when pooling is off or the positions do not form such maps."""
    if pool is None or x.dim() != 2:
        return None
    counts = torch.bincount(unit, minlength=n_units)
    side = math.isqrt(int(counts[0]))
    if side < pool or side * side != int(counts[0]) or not bool((counts == counts[0]).all()):
        return None
    order = torch.argsort(unit, stable=True)  # each unit's positions together, in their flattened order
    maps = x[:, index[order].to(x.device)].reshape(x.shape[0], n_units, side, side)
    return F.adaptive_avg_pool2d(maps, pool).flatten(2)


def reader_inputs(model: nn.Module, reader_names: list[str], batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """Input of every named reader on `batch` (forward pre-hooks, no gradients)."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name in reader_names:
        def remember(module, inputs, name=name):
            seen.setdefault(name, inputs[0].detach())  # returns None: the input is left alone
        handles.append(model.get_submodule(name).register_forward_pre_hook(remember))
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for h in handles:
            h.remove()
    return seen


def capture(model: nn.Module, units: UnitGraph, data, *, n_samples: int = 2000, pool: int | None = None,
            batch_size: int = 256, seed: int = 0, device: str | torch.device | None = None) -> Activations:
    """Run the calibration data through `model` (eval mode) and collect every unit's activations at the reading
    points that `units` recorded when the model was traced."""
    device = torch.device(device or next(model.parameters()).device)
    points = units.reading_points
    collected: dict[str, list[torch.Tensor]] = {}
    outputs: dict[str, list[torch.Tensor]] = {}
    was_training = model.training
    model.eval()
    handles = _register(model, units, points, pool, collected, outputs)
    try:
        n_batches = 0
        for batch in calibration_batches(data, n_samples, batch_size, seed):
            with torch.no_grad():
                model(batch.to(device))
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("the calibration data is empty: pass at least a few hundred samples")
    acts = Activations(
        {key: torch.cat([torch.cat(parts, 2) for parts in _by_batch(v, len(points[key]))], 0)
         for key, v in collected.items()},
        {name: torch.cat(v, 0) for name, v in outputs.items()},
    )
    _check_finite(acts)
    return acts


def _register(model, units, points, pool, collected, outputs):
    handles = []
    for group in units.groups:
        collected[group.key] = []
        for coupling in points[group.key]:
            module = model.get_submodule(coupling.module_name)

            def hook(m, inputs, c=coupling, g=group):
                x = channels_first(m, inputs[0])
                collected[g.key].append(_unit_features(x, c.index, c.unit, g.size, pool).cpu())

            handles.append(module.register_forward_pre_hook(hook))
    for name in units.output_modules:
        def out_hook(m, inputs, output, name=name):
            outputs.setdefault(name, []).append(_pool(channels_first(m, output).detach().float(), None).flatten(1).cpu())

        handles.append(model.get_submodule(name).register_forward_hook(out_hook))
    return handles


def channels_first(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Linear's features are its input's last dim: (N, tokens, C) becomes (N, C, tokens), as a conv's would be."""
    return x.movedim(-1, 1) if isinstance(module, nn.Linear) and x.dim() > 2 else x


def _by_batch(parts: list[torch.Tensor], per_batch: int):
    """Hooks append one tensor per reading point per batch; regroup them batch by batch."""
    return [parts[i:i + per_batch] for i in range(0, len(parts), per_batch)]


def _check_finite(acts: Activations) -> None:
    for key, value in {**acts.units, **acts.outputs}.items():
        if not torch.isfinite(value).all():
            raise ValueError(
                f"activations of {key!r} contain NaN or infinity: check the model's weights and the input "
                "normalisation (a diverged checkpoint or unnormalised data usually causes this)"
            )
