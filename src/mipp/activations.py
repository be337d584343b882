"""Capture the activation of every prunable unit on a calibration set, in one forward pass.

A unit's activation is what the next layer reads: forward pre-hooks on each group's readers take their input
(after batch norm and nonlinearity). A conv channel is pooled to its spatial mean, or to a small grid (`pool=2`
gives 2x2 = 4 features per channel). When a group is read at several points (a residual stream is read by every
block), the unit's features from each point are concatenated: removing the unit removes all of them.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mipp import distributed
from mipp.progress import Progress
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
    """Yield input batches totalling at most n_samples from a tensor, a (inputs, labels) pair, a Dataset or a loader.

    Every batch is checked on the way (`check_batch`): finite values, and the per-sample shape of the first batch, so
    that a NaN or a stray shape deep in a streamed data set stops every user (capture, reconstruction, batch-norm
    recalibration, ThiNet) with the sample it is in rather than pruning on garbage or failing inside a layer."""
    shape = None
    for batch, where in _raw_batches(data, n_samples, batch_size, seed):
        shape = check_batch(batch, where, shape)
        yield batch


def calibration_size(data, n_samples: int) -> int:
    """How many samples `calibration_batches` yields: n_samples, or fewer where the data hold fewer (a loader's
    data set's length; n_samples where the length is unknown)."""
    if isinstance(data, (tuple, list)) and data and isinstance(data[0], torch.Tensor):
        data = data[0]
    data = getattr(data, "dataset", data) if isinstance(data, torch.utils.data.DataLoader) else data
    try:
        return min(n_samples, len(data))
    except TypeError:
        return n_samples


def _raw_batches(data, n_samples: int, batch_size: int, seed: int, wanted=None):
    """(batch, where) pairs; `where(i)` names the i-th sample of the batch for error messages. `wanted(j)` False:
    batch j comes as (None, its size), not loaded where that can be avoided (another rank's share)."""
    wanted = wanted or (lambda number: True)
    if isinstance(data, (tuple, list)) and data and isinstance(data[0], torch.Tensor):
        data = data[0]
    if isinstance(data, torch.Tensor):
        for number, start in enumerate(range(0, min(n_samples, len(data)), batch_size)):
            stop = min(start + batch_size, n_samples, len(data))
            if not wanted(number):
                yield None, stop - start
                continue
            yield data[start:min(start + batch_size, n_samples)], lambda i, s=start: f"input {s + i}"
        return
    if isinstance(data, torch.utils.data.DataLoader):
        taken = 0
        for number, batch in enumerate(data):
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            inputs = inputs[: n_samples - taken]
            if wanted(number):
                yield inputs, lambda i, b=number: f"sample {i} of the loader's batch {b}"
            else:
                yield None, len(inputs)
            taken += len(inputs)
            if taken >= n_samples:
                return
        return
    if isinstance(data, torch.utils.data.Dataset):
        images = getattr(data, "images", None)
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(data), generator=generator)[:n_samples]
        for number, start in enumerate(range(0, len(order), batch_size)):
            idx = order[start:start + batch_size]
            if not wanted(number):
                yield None, len(idx)
                continue
            where = lambda i, idx=idx: f"item {int(idx[i])} of the data set"  # noqa: E731
            if images is not None:
                yield images[idx], where
            else:
                yield torch.stack([data[int(i)][0] for i in idx]), where
        return
    raise TypeError(
        f"calibration data of type {type(data).__name__} is not supported: pass a tensor of inputs, an "
        "(inputs, labels) pair, a torch Dataset or a DataLoader"
    )


def sharded_batches(data, n_samples: int, batch_size: int = 256, seed: int = 0):
    """Every calibration batch as (batch, size), in the order one process reads them: under torchrun, batch j is
    this rank's when j % world == rank (`mipp.distributed.owns_batch`) and the others' come as (None, size),
    unread; one process gets every batch. Each batch is exactly the one a single process computes on, so per-sample
    results are the single process's and only the order of sums across ranks differs."""
    shape = None
    for batch, where in _raw_batches(data, n_samples, batch_size, seed, wanted=distributed.owns_batch):
        if batch is None:
            yield None, where
            continue
        shape = check_batch(batch, where, shape)
        yield batch, len(batch)


def check_batch(batch: torch.Tensor, where, shape: tuple | None = None) -> tuple:
    """Refuse a batch with NaN or infinite values, or whose samples differ in shape from `shape` (the first batch's);
    returns the per-sample shape. `where(i)` names sample i of the batch."""
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"calibration inputs must be tensors, got {type(batch).__name__}: convert them, e.g. with "
                        "torch.as_tensor, or use a Dataset whose items are (tensor, label)")
    if shape is not None and tuple(batch.shape[1:]) != shape:
        raise ValueError(f"calibration inputs change shape: {where(0)} has shape {tuple(batch.shape[1:])} but the "
                         f"first ones {shape}; resize or crop every input to the shape the model takes")
    if batch.is_floating_point() or batch.is_complex():
        finite = torch.isfinite(batch.reshape(len(batch), -1)).all(1) if len(batch) else torch.ones(0, dtype=bool)
        if not bool(finite.all()):
            bad = torch.nonzero(~finite).flatten()
            more = f", and {len(bad) - 1} more in its batch" if len(bad) > 1 else ""
            raise ValueError(f"the calibration inputs contain NaN or infinite values ({where(int(bad[0]))}{more}): "
                             "clean or impute them first")
    return tuple(batch.shape[1:])


MIN_DISTINCT_SAMPLES = 20  # fewer distinct samples hidden among copies: refused (the Gaussian estimator's minimum)
DUPLICATE_SHARE_WARNING = 0.1  # a larger share of copies among the calibration samples: a warning
STREAMED_CHECK = 256  # samples checked up front when the data is streamed (a Dataset read item by item, a loader)


@dataclass
class CalibrationSummary:
    """What `check_calibration_data` saw: how many samples it read and how many of them are distinct."""

    n_checked: int
    n_distinct: int
    complete: bool  # True when it read every sample a method will use (in-memory data), not the first batch only


def check_calibration_data(data, example_input: torch.Tensor, n_samples: int, seed: int = 0,
                           expected_from: str = "the shape of its example input") -> CalibrationSummary:
    """Refuse calibration data that would prune blind, with the cause and the fix; every method's data goes through it.

    Errors: no samples; inputs of another shape or dtype than the model takes (`expected_from` says where that shape
    comes from); NaN or infinite values; inputs that are all the same (e.g. all zeros), which leave every unit
    constant and would cut every layer to its minimum width; fewer than MIN_DISTINCT_SAMPLES distinct inputs hidden
    among copies. Warning: more than DUPLICATE_SHARE_WARNING of the samples are copies of others (activation and MI
    methods learn nothing from a copy, and MIPP keeps at most one unit fewer per layer than there are distinct
    samples). In-memory data (a tensor, a pair, a Dataset with an `images` tensor) is checked in full, up to
    n_samples; streamed data (other Datasets, loaders) in its first STREAMED_CHECK samples, and the rest batch by
    batch as methods read it (`calibration_batches`)."""
    complete = _in_memory(data)
    limit = n_samples if complete else min(n_samples, STREAMED_CHECK)
    expected = tuple(example_input.shape[1:])
    seen, n_checked, shape = set(), 0, None
    for batch, where in _raw_batches(data, limit, 256, seed):
        if shape is None:
            _check_shape_and_dtype(batch, example_input, expected, expected_from)
        shape = check_batch(batch, where, shape)
        rows = batch.detach().cpu().reshape(len(batch), -1).contiguous().view(torch.uint8)
        seen.update(row.numpy().tobytes() for row in rows)
        n_checked += len(batch)
    if n_checked == 0:
        raise ValueError("the calibration data is empty: pass at least a few hundred samples")
    n_distinct = len(seen)
    if n_checked > 1 and n_distinct == 1:
        raise ValueError(
            "every calibration input is the same (e.g. all zeros): the units would show no variation and every "
            "layer would be cut to its minimum; pass real samples of the data the model is used on"
        )
    copies = n_checked - n_distinct
    if copies and n_distinct < MIN_DISTINCT_SAMPLES:
        raise ValueError(
            f"only {n_distinct} distinct calibration inputs among {n_checked}: the rest are exact copies (a loader "
            f"that repeats one batch? padding?), so the units vary over {n_distinct} points only and MIPP would "
            f"keep at most {n_distinct - 1} units per layer; pass at least {MIN_DISTINCT_SAMPLES} (better, a few "
            "hundred) distinct samples")
    if copies > DUPLICATE_SHARE_WARNING * n_checked:
        warnings.warn(
            f"{copies} of {n_checked} calibration inputs are exact copies of others ({n_distinct} distinct): copies "
            f"add no information, and MIPP keeps at most {n_distinct - 1} units per layer; pass distinct samples",
            stacklevel=4)
    return CalibrationSummary(n_checked, n_distinct, complete)


def _in_memory(data) -> bool:
    if isinstance(data, torch.Tensor) or (isinstance(data, (tuple, list)) and data
                                          and isinstance(data[0], torch.Tensor)):
        return True
    return isinstance(data, torch.utils.data.Dataset) and isinstance(getattr(data, "images", None), torch.Tensor)


def _check_shape_and_dtype(batch, example_input: torch.Tensor, expected: tuple, expected_from: str) -> None:
    if not isinstance(batch, torch.Tensor):
        return  # check_batch names it
    if tuple(batch.shape[1:]) != expected:
        raise ValueError(
            f"calibration inputs have shape {tuple(batch.shape[1:])} per sample but the model takes {expected} "
            f"({expected_from}): pass inputs of that shape, or the example_input your data matches"
        )
    floating = batch.is_floating_point(), example_input.is_floating_point()
    if floating != (False, False) and batch.dtype != example_input.dtype:
        raise ValueError(
            f"calibration inputs are {str(batch.dtype).replace('torch.', '')} but the model takes "
            f"{str(example_input.dtype).replace('torch.', '')} (the dtype of its example input): convert them, "
            f"e.g. x.to({example_input.dtype}) (and scale 8-bit images to the range the model was trained on)"
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
    counts = torch.bincount(unit, minlength=n_units).clamp_min(1).to(pooled.device, pooled.dtype)
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
    handles, finish = capture_hooks(model, units, pool)
    n_batches = calibration_pass(model, data, handles, "capture", units.example_shape, n_samples=n_samples,
                                 batch_size=batch_size, seed=seed, device=device, shard=True)
    return finish(n_batches)


def capture_hooks(model: nn.Module, units: UnitGraph, pool: int | None = None):
    """What `capture` does, split so that another collector can share its pass over the data: (the hooks to pass
    to `calibration_pass`, `finish(n_batches)` that builds and checks the Activations after it)."""
    points = units.reading_points
    collected: dict[str, list[torch.Tensor]] = {}
    outputs: dict[str, list[torch.Tensor]] = {}
    handles = _register(model, units, points, pool, collected, outputs)

    def finish(n_batches: int) -> Activations:
        if n_batches == 0:
            raise ValueError("the calibration data is empty: pass at least a few hundred samples")
        per_batch = {key: [torch.cat(parts, 2) for parts in _by_batch(v, len(points[key]))]
                     for key, v in collected.items()}
        gathered = outputs
        if distributed.active():
            per_batch, gathered = _gather_batches(per_batch, outputs, n_batches)
        acts = Activations(
            {key: torch.cat(v, 0) for key, v in per_batch.items()},
            {name: torch.cat(v, 0) for name, v in gathered.items()},
        )
        _check_finite(acts)
        _check_variation(acts)
        return acts
    return handles, finish


def _gather_batches(units: dict[str, list], outputs: dict[str, list], n_batches: int) -> tuple[dict, dict]:
    """Every rank's per-batch activations (batch j was rank j % world's), put back in the order one process
    captures them, on every rank: the single-process tensors exactly, as each batch was computed as one process
    computes it."""
    shares = distributed.all_gather_objects((units, outputs))
    world = len(shares)

    def in_order(part: int, key: str) -> list:
        return [shares[j % world][part][key][j // world] for j in range(n_batches)]

    names = list(dict.fromkeys(name for share in shares for name in share[1]))
    return {key: in_order(0, key) for key in units}, {name: in_order(1, name) for name in names}


def run_on_batch(model: nn.Module, batch: torch.Tensor, example_shape: tuple | None = None):
    """model(batch), with a RuntimeError from inside the model (a shape or dtype the layers cannot take) re-raised
    as a ValueError that names the batch's shape and dtype next to the example input's the model was traced with."""
    try:
        return model(batch)
    except RuntimeError as err:
        if isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err):
            raise
        traced = f"; it was traced with an example input of shape {tuple(example_shape)}" if example_shape else ""
        raise ValueError(
            f"the model fails on a calibration batch of shape {tuple(batch.shape)}, dtype "
            f"{str(batch.dtype).replace('torch.', '')} ({str(err).splitlines()[0]}){traced}: pass inputs of the "
            "shape and dtype the model takes (the example input's, per sample)") from err


def calibration_pass(model: nn.Module, data, handles: list, description: str, example_shape=None, *,
                     n_samples: int, batch_size: int = 256, seed: int = 0, device=None, shard: bool = False,
                     on_skip=None) -> int:
    """Run the calibration batches through `model` in eval mode without gradients, with a progress bar, so that
    the forward `handles` (hooks) collect what they need; removes the handles and restores the model's mode after,
    whatever happens. Returns the number of batches.

    `shard` (under torchrun): run only this rank's batches (`sharded_batches`) and call `on_skip(size)` for each
    of the others, in their place in the order; the caller then combines what the ranks collected. The count
    returned is still every batch's."""
    was_training = model.training
    model.eval()
    bar = Progress(n_samples, description, "sample", leave=False)
    n_batches = 0
    sharded = shard and distributed.active()
    batches = (sharded_batches(data, n_samples, batch_size, seed) if sharded
               else ((batch, len(batch)) for batch in calibration_batches(data, n_samples, batch_size, seed)))
    try:
        with torch.no_grad():
            for batch, size in batches:
                if batch is None:
                    if on_skip is not None:
                        on_skip(size)
                else:
                    run_on_batch(model, batch.to(device), example_shape)
                n_batches += 1
                bar.update(size)
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return n_batches


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


def _check_variation(acts: Activations) -> None:
    """The network's outputs must vary over the calibration samples (else there is no information to preserve and
    every layer would go to its minimum width): an error. A group whose every unit is constant carries nothing and
    goes to its minimum width: a warning naming it, as that is usually a dead layer or data that never reaches it."""
    if acts.n_samples < 2:
        return
    constant = lambda x: bool((x.amax(0) == x.amin(0)).all())  # noqa: E731
    if acts.outputs and all(constant(v) for v in acts.outputs.values()):
        raise constant_output_error(acts.n_samples)
    warn_dead_layers([key for key, v in acts.units.items() if constant(v)], acts.n_samples, stacklevel=4)


def constant_output_error(n_samples: int) -> ValueError:
    """The error for a model whose output does not vary over the calibration samples (any MIPP features)."""
    return ValueError(
        f"the model's output is the same for all {n_samples} calibration samples: there is no information "
        "to preserve and every layer would be cut to its minimum; check the weights (an untrained or diverged "
        "checkpoint, dead ReLUs) and that the data reaches the model as it was trained (normalisation)")


def warn_dead_layers(dead: list[str], n_samples: int, stacklevel: int = 3) -> None:
    """Name the groups whose every unit is constant over the calibration samples (any MIPP features)."""
    if dead:
        warnings.warn(
            f"every unit of {', '.join(repr(k) for k in dead)} is constant over the {n_samples} calibration "
            "samples (dead ReLUs, or inputs that do not vary where this layer looks): MIPP cuts such a layer to its "
            "minimum width; check the weights and data if that is unexpected", stacklevel=stacklevel)


def _check_finite(acts: Activations) -> None:
    for key, value in {**acts.units, **acts.outputs}.items():
        if not torch.isfinite(value).all():
            raise ValueError(
                f"activations of {key!r} contain NaN or infinity: check the model's weights and the input "
                "normalisation (a diverged checkpoint or unnormalised data usually causes this)"
            )
