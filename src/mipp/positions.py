"""What each reader sees at sampled positions: a unit's input patch and the reader's own output, as samples.

A convolution reads a channel at every spatial position through its k x k kernel, and its output at a position is
a linear function of the input patches there. Summarising a channel by its spatial mean (the default features of
`mipp.activations`) averages that relation away. Here every (image, output position) pair is one sample: a unit's
features are its channel's k x k input patch at that position (f = k*k, channel-major as `weight.reshape(out, -1)`
lays them out) and the target is the reader's output (its pre-activation) at the same position. A Linear reader's
sample is the image itself: a unit's features are the input features that belong to it (after a Flatten, all
positions of a channel).

`capture_reader_moments` runs the calibration data once and accumulates, per group and per distinct reader, the
joint Gaussian moments of [unit features (unit-major), reader output] in float64 (bounded memory: never the samples
themselves), plus what an effective sample size needs. Where a convolution reads this group and nothing else (the
common case), its output is exactly W x + b of the features, so only the features' moments are accumulated (each
batch's centred products in float32, about twice as fast, merged in float64) and the output's are derived from the
reader's weights in float64 whenever they are needed (`ReaderMoments.joint`): the relation is then exact in the
moments, as in the network, and the output's columns cost nothing in the pass nor in memory. Linear readers, a
convolution that also reads other groups (a concatenation) and grouped convolutions have features and measured
output accumulated in float64.

Positions of one image are correlated, so they are not independent samples: the chi-squared test uses
n_eff = N P / (1 + (P - 1) rho), Kish's design effect for clusters of P positions, with rho the intra-image
correlation of the reader's outputs (the one-way ANOVA estimate, averaged over output channels, clipped to [0, 1]).
rho = 0 gives N P samples; rho = 1 gives N, what the spatial mean had.
The same moments hold every block reconstruction needs (Gram of kept patches, cross-product with the output).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from mipp import distributed
from mipp.activations import calibration_batches, calibration_pass
from mipp.mi.gaussian import GaussianMoments
from mipp.units import Coupling, UnitGraph


class UnsupportedReader(ValueError):
    """A reader whose input position features cannot describe (not a Linear or Conv, or unequal inputs per unit)."""


POSITION_READERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # the layers whose inputs position features describe

# Output positions sampled per image for a convolution reader (all of them when its map is smaller).
POSITIONS_PER_IMAGE = 16


@dataclass
class ReaderMoments:
    """Joint moments of one reader's [unit features, output] samples for one group of units."""

    group: str
    reader: str
    n_units: int
    f: int  # features per unit
    n_outputs: int
    columns: torch.Tensor | None = None  # the reader's input column (channel / feature) of each unit-major slot
    kernel: int = 1  # features per input column (a conv's kernel area)
    moments: GaussianMoments = field(default_factory=GaussianMoments)
    images: int = 0
    positions: int = 1  # samples per image (P)
    # for the intra-image correlation of the outputs: per channel, sum over images of P * (image mean)^2
    between: torch.Tensor | None = None
    # (weight, bias) in float64 when the output is exactly weight @ features + bias (the reader reads this group
    # and nothing else): only the features' moments are accumulated and held, the output's derived (`joint`)
    linear: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def intra_image_correlation(self) -> float:
        """One-way ANOVA estimate of rho, averaged over output channels, in [0, 1] (0 with one sample per image)."""
        if self.positions <= 1 or self.images < 2 or self.between is None:
            return 0.0
        n, p = self.images, self.positions
        output_mean, ss_total = self._output_mean_and_spread()
        grand = self.moments.count * output_mean ** 2
        ss_between = self.between - grand
        ms_between = ss_between / (n - 1)
        ms_within = (ss_total - ss_between).clamp_min(0) / (n * (p - 1))
        denominator = ms_between + (p - 1) * ms_within
        rho = torch.where(denominator > 0, (ms_between - ms_within) / denominator.clamp_min(1e-300),
                          torch.ones_like(denominator))
        return float(rho.clamp(0.0, 1.0).mean())

    def _output_mean_and_spread(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per output channel, its mean and its scatter (n x variance) over the samples, float64."""
        width, moments = self.n_units * self.f, self.moments
        if self.linear is None:
            return moments.mean[width:], moments.scatter.diagonal()[width:]
        weight, bias = self.linear
        return weight @ moments.mean + bias, ((weight @ moments.scatter) * weight).sum(1)

    @property
    def effective_samples(self) -> int:
        """n_eff = N P / (1 + (P - 1) rho): the samples' worth for the significance test (computed once per count)."""
        cached = getattr(self, "_effective", None)
        if cached is None or cached[0] != self.images:
            total = self.images * self.positions
            n_eff = max(self.images, int(round(total / (1.0 + (self.positions - 1) * self.intra_image_correlation))))
            self._effective = cached = (self.images, n_eff)
        return cached[1]

    @property
    def constant_units(self) -> bool:
        """Every unit's features took one value over the calibration samples (a dead layer, seen by this reader)."""
        width, count = self.n_units * self.f, self.moments.count
        if count == 0:
            return False
        spread = self.moments.scatter.diagonal()[:width]  # n x variance; a constant's is 0 up to the mean's rounding
        return bool((spread <= count * (1e-12 * self.moments.mean[:width]) ** 2).all())

    def feature_index(self, inputs: torch.Tensor) -> torch.Tensor | None:
        """Feature columns of the reader's input columns `inputs` (each with its kernel offsets, in that order), or
        None when some of them are not among this group's (the reader also reads other groups)."""
        slot = {int(c): k for k, c in enumerate(self.columns.tolist())}
        if any(int(c) not in slot for c in inputs.tolist()):
            return None
        slots = torch.tensor([slot[int(c)] for c in inputs.tolist()], dtype=torch.long)
        return (slots[:, None] * self.kernel + torch.arange(self.kernel)).reshape(-1)

    @property
    def captured_dim(self) -> int:
        """Columns of the accumulated moments: features, plus outputs unless `joint` derives them."""
        return self.n_units * self.f + (0 if self.linear is not None else self.n_outputs)

    def add(self, features: torch.Tensor, outputs: torch.Tensor, per_image: int) -> None:
        """One batch: (n * per_image, n_units * f) features and (n * per_image, n_outputs) outputs."""
        if self.linear is not None:  # the batch's centred products in float32, merged in float64 (see module doc)
            self.moments.update(features, precision=torch.float32)
        else:  # float64: float32 products would blur a measured output's exact linear relation to the features
            self.moments.update(features, outputs)
        n = features.shape[0] // per_image
        means = outputs.double().reshape(n, per_image, -1).mean(1)
        added = per_image * (means ** 2).sum(0)
        self.between = added if self.between is None else self.between + added
        self.images += n
        self.positions = per_image

    def joint(self, outputs: torch.Tensor | list[int] | None = None) -> GaussianMoments:
        """The moments of [every unit feature, the reader's outputs `outputs` (ascending; default all)], in float64.

        Where the output is exactly W x + b of the features (`linear`), its moments are derived here from the
        features' (mean W m + b, cross scatter S W^T, output scatter W S W^T) rather than held: a reader with many
        outputs (ResNet-50's expanding 1 x 1 convolutions: 512 features, 2,048 outputs) would hold an output block
        several times the size of its features' for the whole selection. The output is then an exact linear
        function of the features in these moments, as it is in the network."""
        moments, width = self.moments, self.n_units * self.f
        if moments.count == 0:
            return moments
        chosen = (torch.arange(self.n_outputs) if outputs is None
                  else torch.as_tensor(outputs, dtype=torch.long).reshape(-1))
        if self.linear is None:
            if outputs is None:
                return moments
            index = torch.cat([torch.arange(width), width + chosen])
            return GaussianMoments._from_parts(moments.count, moments.mean[index], moments.scatter[index][:, index])
        weight, bias = self.linear[0][chosen], self.linear[1][chosen]
        cross = moments.scatter @ weight.T
        joint = torch.empty(width + len(chosen), width + len(chosen), dtype=moments.scatter.dtype)
        joint[:width, :width] = moments.scatter
        joint[:width, width:] = cross
        joint[width:, :width] = cross.T
        output = weight @ cross
        joint[width:, width:] = 0.5 * (output + output.T)
        return GaussianMoments._from_parts(moments.count, torch.cat([moments.mean, weight @ moments.mean + bias]),
                                           joint)

def linear_map(module: nn.Module, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(W, b) with the reader's output = W @ [features of `columns`, unit-major as the samples lay them out] + b,
    in float64, when the reader is a convolution and those columns are all it reads (one group, not grouped); else
    None. Linear readers keep float64 products: their features are few (the products cost little) and a fully
    connected net's exact redundancies (the planted network) are only removed losslessly with them."""
    if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or module.groups != 1:
        return None
    width = module.in_channels
    if len(columns) != width or set(columns.tolist()) != set(range(width)):
        return None
    weight = module.weight.detach().to("cpu", torch.float64)[:, columns].reshape(module.weight.shape[0], -1)
    bias = (module.bias.detach().to("cpu", torch.float64) if module.bias is not None
            else torch.zeros(weight.shape[0], dtype=torch.float64))
    return weight, bias


class OutputRange:
    """Per output, the smallest and largest value the model's output took over the calibration pass: a constant
    output carries no information to preserve (MIPP refuses it, on position features as on spatial means)."""

    def __init__(self):
        self.low: torch.Tensor | None = None
        self.high: torch.Tensor | None = None

    def hook(self, module, inputs, output) -> None:
        if not isinstance(output, torch.Tensor) or output.dim() == 0:
            return  # a model returning several tensors (auxiliary heads) is not judged by this check
        y = output.detach().reshape(output.shape[0], -1).float()
        low, high = y.amin(0).cpu(), y.amax(0).cpu()
        self.low = low if self.low is None else torch.minimum(self.low, low)
        self.high = high if self.high is None else torch.maximum(self.high, high)

    def combine_ranks(self) -> None:
        """Every rank's range joined (ranks without batches contribute nothing)."""
        for low, high in distributed.all_gather_objects((self.low, self.high)):
            if low is not None:
                self.low = low if self.low is None else torch.minimum(self.low, low)
                self.high = high if self.high is None else torch.maximum(self.high, high)

    @property
    def constant(self) -> bool:
        return self.low is not None and bool((self.low == self.high).all())


def unit_columns(coupling: Coupling, n_units: int) -> tuple[torch.Tensor, int]:
    """The reader's input columns of a group in unit-major order, and the number per unit; every unit must have
    the same number (one channel each, or the same positions each after a Flatten)."""
    counts = torch.bincount(coupling.unit, minlength=n_units)
    if not bool((counts == counts[0]).all()) or int(counts[0]) == 0:
        raise UnsupportedReader(
            f"reader {coupling.module_name!r} reads the units of one group through unequal numbers of inputs; "
            "position features need the same number per unit: use features='mean' for this model"
        )
    order = torch.argsort(coupling.unit, stable=True)
    return coupling.index[order], int(counts[0])


def capture_reader_moments(model: nn.Module, units: UnitGraph, data, *, n_samples: int = 2000,
                           positions_per_image: int = POSITIONS_PER_IMAGE, batch_size: int = 256, seed: int = 0,
                           device: str | torch.device | None = None, output_range: OutputRange | None = None,
                           groups: set[str] | None = None) -> dict[str, list[ReaderMoments]]:
    """Per group (of `groups`, default every one), the moments of each distinct reader (one per reading point) on
    the calibration data; given an `OutputRange`, the range of the model's output is recorded in the same pass."""
    device = torch.device(device or next(model.parameters()).device)
    handles, on_skip, finish = reader_moment_hooks(model, units, data, positions_per_image=positions_per_image,
                                                   seed=seed, device=device, output_range=output_range,
                                                   groups=groups)
    calibration_pass(model, data, handles, "capture (positions)", units.example_shape, n_samples=n_samples,
                     batch_size=batch_size, seed=seed, device=device, shard=True, on_skip=on_skip)
    return finish()


def reader_moment_hooks(model: nn.Module, units: UnitGraph, data, *, positions_per_image: int = POSITIONS_PER_IMAGE,
                        seed: int = 0, device: torch.device, output_range: OutputRange | None = None,
                        groups: set[str] | None = None):
    """What `capture_reader_moments` does, split so that another collector can share its pass over the data:
    (the hooks, the `on_skip` a sharded `calibration_pass` needs, `finish()` returning the moments after the pass).
    Refuses an unsupported reader or moments beyond the memory before registering anything; under torchrun it runs
    one forward pass of its own first (`skipped_draws`), so call it before registering other hooks."""
    generator = torch.Generator().manual_seed(seed)
    on_skip = None
    if distributed.active():  # another rank's batch: draw its positions anyway, so that the next batch draws as
        readers = [c.module_name for g in units.groups if groups is None or g.key in groups  # one process would
                   for c in units.reading_points[g.key]]
        on_skip = skipped_draws(model, readers, generator, data, seed, device)  # (before the hooks below exist)
    collected: dict[str, list[ReaderMoments]] = {}
    for group in units.groups:
        if groups is not None and group.key not in groups:
            continue
        collected[group.key] = []
        for coupling in units.reading_points[group.key]:
            module = model.get_submodule(coupling.module_name)
            if not isinstance(module, POSITION_READERS):
                raise UnsupportedReader(f"reader {coupling.module_name!r} of group {group.key!r} is a "
                                        f"{type(module).__name__}; position features need Linear or Conv readers")
            columns, f = unit_columns(coupling, group.size)
            kernel = 1 if isinstance(module, nn.Linear) else math.prod(module.kernel_size)
            stats = ReaderMoments(group.key, coupling.module_name, group.size, f * kernel, module.weight.shape[0],
                                  columns, kernel, linear=linear_map(module, columns))
            collected[group.key].append(stats)
    every = [s for readers in collected.values() for s in readers]
    check_moments_memory(every)
    handles = [model.get_submodule(s.reader).register_forward_hook(
        _accumulate(s, s.columns, generator, positions_per_image)) for s in every]
    if output_range is not None:
        handles.append(model.register_forward_hook(output_range.hook))

    def finish() -> dict[str, list[ReaderMoments]]:
        if distributed.active():
            _combine_ranks(every)
            if output_range is not None:
                output_range.combine_ranks()
        for stats in every:
            if stats.images == 0:
                raise ValueError(f"reader {stats.reader!r} never ran on the calibration data: check that the data "
                                 "reaches it")
            if not bool(torch.isfinite(stats.moments.scatter).all()):
                raise ValueError(f"the inputs of reader {stats.reader!r} (group {stats.group!r}) are not finite on "
                                 "the calibration data: check the data and the model's weights for NaN or inf")
        return collected
    return handles, on_skip, finish


# features="auto": a group gets position features only where each of its readers has at most this many features
# (a session costs O(features^2) per removal and its moments hold features^2 numbers: ViT's MLP readers of 3,072
# features took over 25 minutes, ResNet-50's 3x3 readers of 4,608 over 14 GB) and at least as many sampled rows as
# features (fewer rows determine no more than the spatial mean does, whose session works in the samples' space).
AUTO_MAX_FEATURES = 2048


def automatic_groups(model: nn.Module, units: UnitGraph, images: int, positions: int,
                     max_features: int | None = None) -> tuple[set[str], dict[str, str]]:
    """What features="auto" gives position features: the groups whose every reader is a Linear or Conv layer that
    reads each unit through the same number of inputs, has at most `max_features` features (default
    `AUTO_MAX_FEATURES`) and sees at least as many rows as features (`images` times its rows per image: a
    convolution's output positions, at most `positions`, or a Linear's tokens, from the trace); and, for every
    other group, why not."""
    max_features = AUTO_MAX_FEATURES if max_features is None else max_features
    readers = [c.module_name for g in units.groups for c in units.reading_points[g.key]]
    supported = {name for name in readers if isinstance(model.get_submodule(name), POSITION_READERS)}
    rows = {name: units.module_extent.get(name, 0) if isinstance(model.get_submodule(name), nn.Linear)
            else min(positions, units.module_extent.get(name, 0)) for name in supported}
    chosen, reasons = set(), {}
    for group in units.groups:
        for coupling in units.reading_points[group.key]:
            name = coupling.module_name
            if name not in supported:
                reasons[group.key] = f"reader {name!r} is a {type(model.get_submodule(name)).__name__}"
                break
            try:
                _, per_unit = unit_columns(coupling, group.size)
            except UnsupportedReader:
                reasons[group.key] = f"reader {name!r} reads its units through unequal numbers of inputs"
                break
            module = model.get_submodule(name)
            width = group.size * per_unit * (1 if isinstance(module, nn.Linear) else math.prod(module.kernel_size))
            samples = images * rows.get(name, 0)
            if width > max_features:
                reasons[group.key] = f"reader {name!r} has {width} features (more than {max_features})"
                break
            if samples < width:
                reasons[group.key] = f"reader {name!r} sees {samples} rows for {width} features"
                break
        else:
            chosen.add(group.key)
    return chosen, reasons


# The selection holds each reader's (features + outputs)^2 float64 moments and, per session, a few matrices of that
# size (the covariance, its equilibrated copy, the inverse): at least this many times the moments themselves
# (ResNet-50 at 64x64: estimated 5.9 GB; a run was seen past 11 GB).
SESSION_COPIES = 4


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_moments_memory(readers: list[ReaderMoments], available: int | None = None) -> int:
    """Refuse, before any pass over the data, position moments the machine cannot hold: their float64 matrices
    (each reader's unit features and outputs squared) times SESSION_COPIES against the available memory. Wide
    convolutions read at many points (ResNet-50) need tens of GB this way, where features="mean" needs far less.
    Returns the estimate in bytes."""
    sizes = sorted(((s.n_units * s.f + s.n_outputs) ** 2 * 8, s.reader) for s in readers)
    needed = SESSION_COPIES * sum(size for size, _ in sizes)
    available = available_memory_bytes() if available is None else available
    if available is not None and needed > available:
        widest = ", ".join(f"{reader} ({size / 2 ** 20:.0f} MB)" for size, reader in sizes[-3:][::-1])
        raise MemoryError(
            f"features='patches' needs at least {needed / 2 ** 30:.1f} GB for its position moments and sessions, "
            f"and {available / 2 ** 30:.1f} GB are available (widest readers: {widest}); use features='mean' "
            "(`mipp prune --features mean`: a channel's spatial mean) for this model, or a machine with more memory")
    return needed


def skipped_draws(model: nn.Module, readers: list[str], generator: torch.Generator, data, seed: int, device):
    """A function `skip(n)` that draws from `generator` what the sampling hooks on `readers` (one per name, in the
    order they were registered) draw for a batch of n images, without running the batch: under torchrun a rank
    skips the other ranks' batches, and its next batch must draw the positions one process would draw there.

    The draws per convolution call (`draw_positions`: n x its output positions) are found by one forward pass of
    a single calibration sample with hooks registered in the same order, so they fire in the same order."""
    totals: list[int] = []

    def record(module, inputs, output):
        if not isinstance(module, nn.Linear):
            totals.append(math.prod(output.shape[2:]))

    handles = [model.get_submodule(name).register_forward_hook(record) for name in readers]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(next(iter(calibration_batches(data, 1, 1, seed))).to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    def skip(n: int) -> None:
        for total in totals:
            draw_positions(generator, n, total)
    return skip


def draw_positions(generator: torch.Generator, n: int, total: int) -> torch.Tensor:
    """(n, total) uniform numbers from `generator`: one draw per image and output position, whose order sorts the
    positions into a random sample without replacement."""
    return torch.rand(n, total, generator=generator)


def _combine_ranks(readers: list[ReaderMoments]) -> None:
    """Replace each rank's moments by those of every rank's samples, the same on every rank: counts and sums
    all-reduced, then each rank's scatter taken about the global mean (its own scatter plus n (mean - global
    mean)^2, Chan's pairwise formula) and all-reduced, in float64; so no large mean is subtracted from a raw sum of
    squares, and one reader's matrix is reduced at a time (bounded memory)."""
    counts = torch.tensor([[r.moments.count, r.images, r.positions if r.images else 0] for r in readers],
                          dtype=torch.int64)
    positions = torch.zeros(len(readers), distributed.world_size(), dtype=torch.int64)
    positions[:, distributed.rank()] = counts[:, 2]
    distributed.all_reduce_sum(positions)  # every rank's samples per image (0: a rank without batches)
    distributed.all_reduce_sum(counts[:, :2])
    for k, stats in enumerate(readers):
        own, dim = stats.moments, stats.captured_dim
        count = int(counts[k, 0])
        total = own.mean * own.count if own.count else torch.zeros(dim, dtype=torch.float64)
        mean = distributed.all_reduce_sum(total.clone()) / max(count, 1)
        if own.count:
            shift = own.mean - mean
            scatter = own.scatter + own.count * torch.outer(shift, shift)
        else:
            scatter = torch.zeros(dim, dim, dtype=torch.float64)
        scatter = distributed.all_reduce_sum(scatter)
        between = stats.between if stats.between is not None else torch.zeros(stats.n_outputs, dtype=torch.float64)
        stats.between = distributed.all_reduce_sum(between.clone())
        stats.moments = GaussianMoments._from_parts(count, mean, scatter) if count else GaussianMoments()
        stats.images = int(counts[k, 1])
        stats.positions = max(1, int(positions[k].max()))


def _accumulate(stats: ReaderMoments, columns: torch.Tensor, generator: torch.Generator, positions: int):
    def hook(module, inputs, output):
        x, y = inputs[0].detach().float(), output.detach().float()
        if isinstance(module, nn.Linear):
            n = x.shape[0]
            per_image = math.prod(x.shape[1:-1])  # tokens of a sequence input; 1 for a flat one
            features = x.reshape(-1, x.shape[-1])[:, columns.to(x.device)]
            targets = y.reshape(-1, y.shape[-1])
        else:
            features, targets = sample_patches(module, x, y, columns, generator, positions)
            n = x.shape[0]
            per_image = features.shape[0] // n
        stats.add(features.cpu(), targets.cpu(), per_image)
    return hook  # returns None: the output is left alone


def sample_patches(conv: nn.Module, x: torch.Tensor, y: torch.Tensor, channels: torch.Tensor,
                   generator: torch.Generator, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input patches of `channels` (in that order), (rows, len(channels) * kernel) channel-major, and the conv's
    output (rows, out) at `positions` output positions per image drawn without replacement (all when the map is
    smaller). Stride, padding (and its mode) and dilation are the conv's own."""
    n, spatial = x.shape[0], y.shape[2:]
    total = math.prod(spatial)
    count = min(positions, total)
    flat = draw_positions(generator, n, total).argsort(1)[:, :count].to(x.device)  # (n, count)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    padded = nn.functional.pad(x[:, channels.to(x.device)], conv._reversed_padding_repeated_twice, mode=mode)
    d = len(spatial)
    index = [torch.arange(n, device=x.device).view(n, 1, *[1] * d)]
    remaining = flat
    coordinates = []
    for size in reversed(spatial):  # unravel the flat position, last dimension first
        coordinates.insert(0, remaining % size)
        remaining = remaining // size
    for axis, (coordinate, kernel, stride, dilation) in enumerate(zip(coordinates, conv.kernel_size, conv.stride,
                                                                       conv.dilation)):
        offsets = torch.arange(kernel, device=x.device) * dilation
        shape = [1] * d
        shape[axis] = kernel
        index.append(coordinate.view(n, count, *[1] * d) * stride + offsets.view(1, 1, *shape))
    patches = padded[(index[0], slice(None), *index[1:])]  # (n, count, *kernel, channels): advanced indices first
    patches = patches.movedim(-1, 2).reshape(n * count, -1)
    targets = torch.gather(y.flatten(2), 2, flat.unsqueeze(1).expand(n, y.shape[1], count))
    return patches, targets.transpose(1, 2).reshape(n * count, y.shape[1])
