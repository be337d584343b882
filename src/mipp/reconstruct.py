"""Reconstruction: re-fit the readers of pruned units so that they still compute what they computed before.

Removing units changes what every reader of them (the next Linear / Conv) receives. Following the spec (section 7,
ThiNet / He et al. 2017 style), each weighted reader whose input channels lose units is re-fitted by ridge least
squares on the calibration data: from its KEPT input channels it should reproduce the ORIGINAL reader's own output
(its pre-activation, before any batch norm), on its kept output rows.

One pass, bounded memory: `reconstruction_statistics` runs the calibration batches once through the unpruned model
with forward hooks on the affected readers and accumulates on the model's device (each batch's products in the
activations' precision, the running sums in float64) only what the normal equations need (the Gram matrix of the kept input features, their cross-product with the kept outputs, both sums and
the row count), never the activations themselves. A Linear reads its input features directly (a Linear after a
Flatten reads several features per unit: the couplings' `index` says which); a convolution's features are its
input patches (channel-major, as `weight.reshape(out, -1)` lays them out) at a seeded random sample of output
positions per image, and its target is its output at those positions. After surgery `refit_readers` solves the
normal equations per reader and writes the solution into the pruned module. The ridge is chosen per reader by
generalised cross-validation (`ReaderStatistics.solve_validated`): where the removed units are linear functions of
the kept ones the target is an exact function of the kept inputs and the smallest ridge wins (the fit stays exact);
where they are not, a fixed tiny ridge chased the rest along directions of tiny variance (ThiNet's choice on a
LeNet-5 protocol base, 50% of MACs: weights up to 43 where the original's were 0.5, and fine-tuning diverged;
with the ridge chosen, 13, though its fine-tuning still fell to chance with one of two data orders).

Two modes (`reconstruct=`). "independent": each reader is fitted on the original network's inputs, all in that one
pass (or none, after MIPP's patch features, whose moments are these sums); errors that earlier layers leave are
not compensated downstream. "sequential" (`refit_sequentially`): after surgery, one reader after the other in
forward order is fitted on the inputs the pruned network, with the readers before it already re-fitted, gives it,
to the original's output, so each layer also absorbs what the layers before it could not reproduce (as He et al.
2017 and later post-training methods do); it costs a pass of both networks up to each reader. Grouped and
depthwise convolutions are skipped with a warning (each of their outputs reads only its own group of inputs; their
kept weights stay as they are).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from mipp import distributed
from mipp.activations import calibration_batches, calibration_size, sharded_batches
from mipp.mi.gaussian import rank_deficient_ridge
from mipp.plan import Plan
from mipp.positions import ReaderMoments, sample_patches, skipped_draws
from mipp.surgery import check_plan_matches, plan_input
from mipp.units import WEIGHTED_READERS, UnitGraph, find_units

# A fixed ridge (`refit_readers(ridge=...)`), relative to the mean variance of a reader's kept input features: small
# enough that an exactly redundant unit is replaced to float tolerance (relative output error ~1e-6), large enough to
# keep the solve well posed when kept features are constant (dead units) or collinear. By default the ridge is
# chosen among VALIDATED_RIDGES instead.
RIDGE = 1e-6
# `reconstruct=` values that re-fit: each reader from the original network's inputs (one pass, or none after MIPP's
# patch features), or from the pruned network's, one reader after the other (`refit_sequentially`).
RECONSTRUCT_MODES = ("independent", "sequential")
DEFAULT_MODE = "independent"
# The candidate ridges (relative, as RIDGE), one chosen per reader by generalised cross-validation
# (`ReaderStatistics.solve_validated`): where a target is not an exact linear function of the kept inputs, RIDGE
# alone chases it along directions of tiny variance (the sequential re-fit of LeNet-5 on rank-16 inputs: 0.014 of
# the output's variance lost in sample, 120x that held out).
VALIDATED_RIDGES = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
# Output positions sampled per image for a convolution's patches, at most (all of them when the map is smaller):
# with 2,000 images that is 64,000 rows, enough for readers of up to a few thousand patch features. Each reader
# takes only as many as give it ROWS_PER_FEATURE rows per patch feature (at least MIN_POSITIONS per image): the
# Gram matrix costs rows x features^2, and the wide readers that dominate it need no more rows than that for a
# well-determined least squares (VGG-11 w0.5, 2,000 samples: the statistics pass 43% shorter after a selection on
# spatial means, 16% after features="auto", the same output error to 3%; `benchmarks/bench_reconstruct.py`).
POSITIONS_PER_IMAGE = 32
ROWS_PER_FEATURE = 8
MIN_POSITIONS = 4


def reconstruction_mode(reconstruct) -> str | None:
    """The re-fit a `reconstruct=` value asks for: None (off), "independent" or "sequential"; True is DEFAULT_MODE."""
    if reconstruct is None or reconstruct is False:
        return None
    if reconstruct is True:
        return DEFAULT_MODE
    if reconstruct not in RECONSTRUCT_MODES:
        raise ValueError(f"reconstruct must be True, False or one of {RECONSTRUCT_MODES}, got {reconstruct!r}")
    return reconstruct


@dataclass
class ReaderStatistics:
    """Sufficient statistics of one reader's least-squares problem, on its kept input columns and output rows."""

    name: str
    kept_inputs: torch.Tensor  # input channels (Conv) or input features (Linear) kept, ascending
    kept_outputs: torch.Tensor  # output rows kept, ascending
    fit_bias: bool
    gram: torch.Tensor  # (k, k) sum of x x^T over rows, float64
    cross: torch.Tensor  # (k, out) sum of x y^T
    input_sum: torch.Tensor  # (k,)
    output_sum: torch.Tensor  # (out,)
    rows: int = 0
    prior: torch.Tensor | None = None  # (out, k) the original kept weights, float64: what the ridge pulls towards
    output_square: torch.Tensor | None = None  # (out,) sum of y^2, for `solve_validated` (kept when not None)

    def add(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        """One batch's products in the activations' own precision, their running sums in float64 (the products
        dominate the cost; a batch has at most a few thousand rows, so float32 sums lose nothing that matters)."""
        self.gram += (features.T @ features).double()
        self.cross += (features.T @ targets).double()
        self.input_sum += features.sum(0, dtype=torch.float64)
        self.output_sum += targets.sum(0, dtype=torch.float64)
        if self.output_square is not None:
            self.output_square += targets.double().square().sum(0)
        self.rows += features.shape[0]

    def all_reduce(self) -> None:
        """Sum the statistics over the ranks of a torchrun group (float64 sums: the order changes them only at the
        level of rounding), so every rank holds those of every rank's rows."""
        for tensor in (self.gram, self.cross, self.input_sum, self.output_sum, self.output_square):
            if tensor is not None:
                distributed.all_reduce_sum(tensor)
        self.rows = distributed.sum_scalar(self.rows)

    def solve(self, ridge: float = RIDGE) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Ridge least-squares weights (out, k) and bias (out,) or None; the bias is not penalised (the problem is
        centred first). The ridge pulls towards the original kept weights (`prior`), not towards zero: with at least
        as many rows as features it is the plain fit (a pull of `ridge` times the features' mean variance), and
        with fewer (a wide Linear on a small calibration set) the rows determine only part of the weights, so the
        rest stay as they were and the pull is the estimator's shrinkage of a rank-deficient covariance, d / n
        (`rank_deficient_ridge`). Towards zero, a LeNet-5 classifier re-fitted on 300 rows for 375 features got
        weights of 30 and its fine-tuning diverged."""
        gram, cross, mean_x, mean_y = self._centred()
        pull = rank_deficient_ridge(self.rows, gram.shape[0], ridge) * (float(gram.diagonal().mean()) or 1.0)
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        weight = torch.linalg.solve(gram + pull * eye, cross + pull * self._prior(cross).T).T
        return weight, (mean_y - weight @ mean_x if self.fit_bias else None)

    def _centred(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gram, cross, mean_x, mean_y) per row, centred when the bias is fitted (zero means otherwise)."""
        if self.rows == 0:
            raise ValueError(f"reader {self.name!r} never ran on the calibration data: check that the data reaches it")
        n = self.rows
        mean_x = self.input_sum / n if self.fit_bias else torch.zeros_like(self.input_sum)
        mean_y = self.output_sum / n if self.fit_bias else torch.zeros_like(self.output_sum)
        return (self.gram / n - torch.outer(mean_x, mean_x), self.cross / n - torch.outer(mean_x, mean_y),
                mean_x, mean_y)

    def _prior(self, cross: torch.Tensor) -> torch.Tensor:
        return self.prior.to(cross.device) if self.prior is not None else torch.zeros_like(cross.T)

    def solve_validated(self, ridges: tuple[float, ...] = VALIDATED_RIDGES) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`solve` with the ridge (relative to the features' mean variance, pulling towards `prior`) that minimises
        the generalised cross-validation error (Golub, Heath & Wahba 1979) over `ridges`: the residual per row over
        (1 - effective parameters / rows)^2, summed over outputs, all from the sufficient statistics and one
        eigendecomposition. Where the target is an exact function of the inputs the smallest ridge wins (the fit
        stays exact); where it is not, the ridge grows as the rows get fewer per input. Needs `output_square`."""
        if self.output_square is None:
            raise ValueError(f"reader {self.name!r}: statistics gathered without output_square")
        gram, cross, mean_x, mean_y = self._centred()
        n, prior = self.rows, self._prior(cross)
        square = self.output_square / n - mean_y.square()
        # the residual target y - prior x: its cross-products and per-output second moment
        cross_d = cross - gram @ prior.T
        square_d = square - 2 * (prior * cross.T).sum(1) + ((prior @ gram) * prior).sum(1)
        values, vectors = _symmetric_eigen(0.5 * (gram + gram.T))
        values = values.clamp_min(0.0)
        projected = vectors.T @ cross_d  # (k, out)
        scale = float(gram.diagonal().mean()) or 1.0
        best = None
        for ridge in ridges:
            lam = ridge * scale
            shrink = (values + 2 * lam) / (values + lam).square()
            residual = float(square_d.sum() - (projected.square().sum(1) * shrink).sum())
            dof = float((values / (values + lam)).sum())
            score = max(residual, 0.0) / max(1.0 - dof / n, 1e-12) ** 2
            if best is None or score < best[0]:
                best = (score, lam)
        lam = best[1]
        weight = prior + (vectors @ (projected / (values + lam)[:, None])).T
        return weight, (mean_y - weight @ mean_x if self.fit_bias else None)


def _symmetric_eigen(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors of a symmetric matrix. LAPACK's divide-and-conquer driver (torch's) sometimes
    fails to converge on Gram matrices of dead or duplicated features (many repeated eigenvalues: 3 of 99 runs of a
    VGG-11 sweep); SciPy's relatively robust representation driver is the fallback."""
    try:
        return torch.linalg.eigh(a)
    except torch.linalg.LinAlgError:
        import scipy.linalg  # imported on the rare failure only

        values, vectors = scipy.linalg.eigh(a.cpu().numpy(), driver="evr")
        return (torch.from_numpy(values).to(a.device, a.dtype), torch.from_numpy(vectors).to(a.device, a.dtype))


def affected_readers(model: nn.Module, plan: Plan, units: UnitGraph) -> tuple[dict[str, tuple], list[str]]:
    """Readers to re-fit, name -> (kept input columns, kept output rows), and the grouped convolutions touched by
    the plan (skipped). Columns and rows come from the couplings' `index`, so a Linear after a Flatten loses every
    feature of a removed unit, and a reader of a concatenation loses the right slice of each group."""
    lost_inputs: dict[str, set[int]] = {}
    lost_outputs: dict[str, set[int]] = {}
    grouped: list[str] = []
    for group in units.groups:
        removed = torch.tensor(plan.removed(group.key) if group.key in plan.kept else [], dtype=torch.long)
        if removed.numel() == 0:
            continue
        for coupling in group.couplings:
            module = model.get_submodule(coupling.module_name)
            if not isinstance(module, WEIGHTED_READERS):
                continue
            if getattr(module, "groups", 1) > 1:
                grouped.append(coupling.module_name)
                continue
            lost = lost_inputs if coupling.kind == "in" else lost_outputs
            columns = coupling.index[torch.isin(coupling.unit, removed)]
            lost.setdefault(coupling.module_name, set()).update(columns.tolist())
    readers = {}
    for name, lost in lost_inputs.items():
        if not lost or name in grouped:
            continue
        module = model.get_submodule(name)
        width_in = module.in_features if isinstance(module, nn.Linear) else module.in_channels
        kept_in = [i for i in range(width_in) if i not in lost]
        kept_out = [i for i in range(module.weight.shape[0]) if i not in lost_outputs.get(name, set())]
        readers[name] = (torch.tensor(kept_in, dtype=torch.long), torch.tensor(kept_out, dtype=torch.long))
    return readers, sorted(set(grouped))


def _readers_to_refit(model: nn.Module, plan: Plan, units: UnitGraph) -> dict[str, tuple]:
    """`affected_readers` of a plan that matches the trace, with a warning naming the grouped convolutions left as
    they are."""
    check_plan_matches(plan, units)
    readers, grouped = affected_readers(model, plan, units)
    for name in grouped:
        warnings.warn(f"reconstruction skips {name!r}: it is a grouped or depthwise convolution, whose outputs each "
                      "read only their own group of inputs; its kept weights stay as they are", stacklevel=3)
    return readers


def reconstruction_statistics(model: nn.Module, plan: Plan, data, *, units: UnitGraph | None = None,
                              example_input: torch.Tensor | None = None, n_samples: int = 2000,
                              batch_size: int = 256, seed: int = 0, positions_per_image: int = POSITIONS_PER_IMAGE,
                              device: str | torch.device | None = None,
                              moments: dict[str, list[ReaderMoments]] | None = None) -> dict[str, ReaderStatistics]:
    """Run the calibration data once through the UNPRUNED `model` (eval mode, no gradients) and accumulate every
    affected reader's least-squares statistics. Call it before `apply_plan`, then `refit_readers` after it.

    `units` is the model's trace (traced here when None). Grouped convolutions touched by the plan are named in a
    warning and skipped. `moments`: position-sampled reader moments the selection already captured on the same
    model and data (MIPP with features="patches"); a reader whose kept inputs they all cover takes its sums from
    them, and the pass runs only for the others (none: no pass)."""
    units = units or find_units(model, plan_input(model, plan, example_input))
    readers = _readers_to_refit(model, plan, units)
    device = torch.device(device or next(model.parameters()).device)
    statistics = {name: _empty_statistics(name, model.get_submodule(name), kept_in, kept_out, device)
                  for name, (kept_in, kept_out) in readers.items()}
    reused = _from_moments(statistics, moments or {})
    pending = {name: stats for name, stats in statistics.items() if name not in reused}
    if not pending:
        return statistics
    generator = torch.Generator().manual_seed(seed)
    sharded = distributed.active()  # under torchrun: this rank's batches, then the sums of all ranks
    skip = skipped_draws(model, list(pending), generator, data, seed, device) if sharded else None
    images = calibration_size(data, n_samples)
    handles = [model.get_submodule(name).register_forward_hook(
        _accumulate(stats, generator, reader_positions(stats, images, positions_per_image)))
        for name, stats in pending.items()]
    was_training = model.training
    model.eval()
    batches = (sharded_batches(data, n_samples, batch_size, seed) if sharded
               else ((batch, None) for batch in calibration_batches(data, n_samples, batch_size, seed)))
    try:
        with torch.no_grad():
            for batch, size in batches:
                if batch is None:
                    skip(size)
                else:
                    model(batch.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if sharded:
        for stats in pending.values():
            stats.all_reduce()
    return statistics


def refit_readers(model: nn.Module, statistics: dict[str, ReaderStatistics], *,
                  ridge: float | None = None) -> list[str]:
    """Write each reader's least-squares solution into the PRUNED `model` (after `apply_plan`); returns their
    names. The ridge is chosen per reader by generalised cross-validation, or fixed at `ridge` (relative, as RIDGE)
    when given."""
    with torch.no_grad():
        for name, stats in statistics.items():
            module = model.get_submodule(name)
            expected = (len(stats.kept_outputs), len(stats.kept_inputs))
            if tuple(module.weight.shape[:2]) != expected:
                raise ValueError(
                    f"reader {name!r} has weight shape {tuple(module.weight.shape)} but the plan leaves it "
                    f"{expected} (outputs, inputs): apply the plan the statistics were collected for, once, before "
                    "refit_readers"
                )
            weight, bias = stats.solve_validated() if ridge is None else stats.solve(ridge)
            module.weight.copy_(weight.reshape(module.weight.shape).to(module.weight.dtype))
            if bias is not None:
                module.bias.copy_(bias.to(module.bias.dtype))
    return list(statistics)


def _from_moments(statistics: dict[str, ReaderStatistics], moments: dict[str, list[ReaderMoments]]) -> set[str]:
    """Fill the statistics of readers whose kept inputs one reader's moments cover, from those moments' raw sums
    (count, sum, sum of outer products); returns their names."""
    filled = set()
    by_reader = {m.reader: m for readers in moments.values() for m in readers}
    for name, stats in statistics.items():
        found = by_reader.get(name)
        index = None if found is None else found.feature_index(stats.kept_inputs)
        if index is None or len(index) != stats.gram.shape[0]:
            continue
        count, total, outer = found.joint(stats.kept_outputs.cpu()).as_sums()
        outputs = found.n_units * found.f + torch.arange(len(stats.kept_outputs))
        device = stats.gram.device
        stats.gram.copy_(outer[index][:, index].to(device))
        stats.cross.copy_(outer[index][:, outputs].to(device))
        stats.input_sum.copy_(total[index].to(device))
        stats.output_sum.copy_(total[outputs].to(device))
        stats.output_square = outer[outputs, outputs].to(device)
        stats.rows = count
        filled.add(name)
    return filled


def reader_positions(stats: ReaderStatistics, images: int, at_most: int) -> int:
    """Positions per image to sample for one reader: enough for ROWS_PER_FEATURE rows per feature over `images`
    images, at least MIN_POSITIONS and at most `at_most`."""
    wanted = math.ceil(ROWS_PER_FEATURE * stats.gram.shape[0] / max(images, 1))
    return min(at_most, max(MIN_POSITIONS, wanted))


def _empty_statistics(name, module, kept_in, kept_out, device) -> ReaderStatistics:
    kernel = 1 if isinstance(module, nn.Linear) else math.prod(module.kernel_size)
    k, out = len(kept_in) * kernel, len(kept_out)

    def zeros(*shape):
        return torch.zeros(*shape, dtype=torch.float64, device=device)

    weight = module.weight.detach()[kept_out.to(module.weight.device)][:, kept_in.to(module.weight.device)]
    return ReaderStatistics(name, kept_in, kept_out, module.bias is not None, zeros(k, k), zeros(k, out), zeros(k),
                            zeros(out), prior=weight.reshape(out, k).to(device=device, dtype=torch.float64),
                            output_square=zeros(out))


def _rows(module: nn.Module, x: torch.Tensor, y: torch.Tensor, inputs: torch.Tensor, kept_outputs: torch.Tensor,
          generator: torch.Generator, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's least-squares rows of one reader: its `inputs` columns (a Linear's features, over any leading
    dimensions such as tokens; a conv's input patches at sampled positions) and its `kept_outputs` channels of `y`
    (the last dimension of a Linear's output, the second of a conv's)."""
    if isinstance(module, nn.Linear):
        features, targets = x.reshape(-1, x.shape[-1])[:, inputs.to(x.device)], y.reshape(-1, y.shape[-1])
    else:
        features, targets = sample_patches(module, x, y, inputs, generator, positions)
    return features, targets[:, kept_outputs.to(y.device)]


def _accumulate(stats: ReaderStatistics, generator: torch.Generator, positions: int):
    def hook(module, inputs, output):
        stats.add(*_rows(module, inputs[0].detach(), output.detach(), stats.kept_inputs, stats.kept_outputs,
                         generator, positions))
    return hook  # returns None: the output is left alone


class _Reached(Exception):
    """Raised by a hook once the reader it watches has run: the rest of the forward pass is not needed."""


def _run_to(model: nn.Module, name: str, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of module `name` on `batch`, running the model only as far as that module."""
    seen = {}

    def hook(module, inputs, output):
        seen["io"] = (inputs[0].detach(), output.detach())
        raise _Reached

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        model(batch)
    except _Reached:
        pass
    finally:
        handle.remove()
    if "io" not in seen:
        raise ValueError(f"reader {name!r} never ran on the calibration data: check that the data reaches it")
    return seen["io"]


def refit_sequentially(original: nn.Module, pruned: nn.Module, plan: Plan, data, *, units: UnitGraph,
                       n_samples: int = 2000, batch_size: int = 256, seed: int = 0,
                       positions_per_image: int = POSITIONS_PER_IMAGE,
                       device: str | torch.device | None = None) -> list[str]:
    """Re-fit the readers of removed units one at a time in forward order, each from the inputs the PRUNED network
    (with the readers before it already re-fitted) gives it, to the ORIGINAL network's output: errors that earlier
    layers leave are compensated where they arrive, instead of accumulating (`reconstruct="sequential"`). Costs a
    calibration pass of both networks up to each reader (stopped there). `units` is the trace of `original`, which
    is left as it is; `pruned` is `original` after `apply_plan`. Returns the names of the re-fitted readers."""
    if distributed.active():
        raise ValueError("sequential reconstruction runs in one process; under torchrun use reconstruct=True")
    readers = _readers_to_refit(original, plan, units)
    device = torch.device(device or next(pruned.parameters()).device)
    images = calibration_size(data, n_samples)
    modes = original.training, pruned.training
    original.eval(), pruned.eval()
    try:
        for name in sorted(readers, key=lambda n: units.module_order.get(n, 0)):
            kept_in, kept_out = readers[name]
            module = pruned.get_submodule(name)
            stats = _empty_statistics(name, original.get_submodule(name), kept_in, kept_out, device)
            every_input = torch.arange(len(kept_in))
            positions = reader_positions(stats, images, positions_per_image)
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for batch in calibration_batches(data, n_samples, batch_size, seed):
                    batch = batch.to(device)
                    target = _run_to(original, name, batch)[1]
                    x = _run_to(pruned, name, batch)[0]
                    stats.add(*_rows(module, x, target, every_input, kept_out, generator, positions))
                weight, bias = stats.solve_validated()
                module.weight.copy_(weight.reshape(module.weight.shape).to(module.weight.dtype))
                if bias is not None:
                    module.bias.copy_(bias.to(module.bias.dtype))
    finally:
        original.train(modes[0]), pruned.train(modes[1])
    return sorted(readers, key=lambda n: units.module_order.get(n, 0))
