"""How MIPP opens a layer session: from spatial-mean activations (the paper's reading) or from position samples.

`MeanFeatures`: a unit's features are its activation at the next layer's input (a conv channel's spatial mean),
the target Y is the kept activations of every layer that reads the group (the logits for the last hidden layer).

`PositionFeatures` (`MIPPSettings(features="patches")`): every (image, position) is a sample, a unit's features
are its k x k input patch at a reader's output position and Y is the reader's own output (pre-activation) there,
on the output channels the already pruned next layer kept (`mipp.positions`). Sessions come from moments captured
once, so a sweep only slices covariances; a reader with no more sampled positions than unit features gets the
estimator's shrinkage of the units' correlations (`rank_deficient_ridge`), as a session on activations does. A
group read at several points (a residual stream) gets one Gaussian session per reader, joined by `JointSession`: a
unit's transfer entropy is the sum over readers, it is significant when it is for some reader (Bonferroni over
readers), its variance share lost is the sum of the readers' shares (each reader's output loses its share; the
mean, the rule before, priced a stream read at four points like a channel read at one), and a removal is applied
to every reader. A reader whose output goes straight into a batch norm counts each output channel by its variance
after that norm (`normalised_output_weights`), since the norm scales a channel's error by gain / deviation.
The test uses each reader's effective sample size (intra-image correlation, see `mipp.positions`).

`MeanFeatures` opens a Gaussian session on many features (a residual stream read at many points, or a wide
target) in the form that never builds their joint covariance (`mipp.mi.gaussian_wide`).
"""
from __future__ import annotations

import torch

from mipp.activations import Activations
from mipp.mi.base import LayerSession, TestResult, decide
from mipp.mi.gaussian import GaussianEstimator, GaussianLayerSession, rank_deficient_ridge, regularise
from mipp.mi.gaussian_wide import open_session
from mipp.positions import ReaderMoments
from mipp.units import UnitGraph, UnitGroup


class MeanFeatures:
    """Sessions on captured activations (one feature block per unit and reading point)."""

    def __init__(self, units: UnitGraph, acts: Activations):
        self.acts, self.producer_of = acts, units.producer_group()
        self.units_cache: dict = {}  # group -> the units' side of a wide Gaussian session (same for every target)

    def signature(self, group: UnitGroup, kept: dict[str, list[int]]):
        return self._target(group, kept)[1]

    def open(self, group: UnitGroup, kept: dict[str, list[int]], estimator, confidence: float) -> LayerSession:
        """The estimator's session; a Gaussian one on many features (a residual stream read at many points, or
        its wide target) in the form that never builds their joint covariance (`mipp.mi.gaussian_wide`: the same
        quantities, computed in the units' or the samples' space)."""
        units, target = self.acts.units[group.key], self._target(group, kept)[0]
        if isinstance(estimator, GaussianEstimator):
            return open_session(estimator, units, target, confidence, self.units_cache, group.key)
        return estimator.session(units, target, confidence)

    def _target(self, group, kept):
        return target_of(group, self.acts, kept, self.producer_of)

    def effective_samples(self) -> dict[str, int]:
        return {}


def target_of(group: UnitGroup, acts: Activations, kept: dict[str, list[int]], producer_of: dict[str, str]):
    """Y for a group: the kept activations of every layer that reads it (the logits for the last hidden layer).

    Returns Y and a signature of what it is made of (which sources, which of their units), for caching."""
    parts, signature = [], []
    for reader in group.readers:
        source = producer_of.get(reader)
        if source is not None and source != group.key and source not in {s for s, _ in signature}:
            signature.append((source, tuple(kept[source])))
            parts.append(acts.units[source][:, kept[source]].flatten(1))
        elif source is None and reader in acts.outputs and reader not in {s for s, _ in signature}:
            signature.append((reader, ()))
            parts.append(acts.outputs[reader])
    if not parts:
        raise ValueError(f"group {group.key!r} has no captured reader to serve as its target")
    return torch.cat(parts, 1), (group.key, tuple(signature))


class PositionFeatures:
    """Sessions on position-sampled reader moments (`mipp.positions.capture_reader_moments`)."""

    def __init__(self, units: UnitGraph, moments: dict[str, list[ReaderMoments]],
                 output_weights: dict[str, torch.Tensor] | None = None, readers_share: str = "sum"):
        """`output_weights`: reader -> (n_outputs,) worth of each output channel's variance in the variance share
        (`normalised_output_weights`); readers not named count every channel by its own variance.
        `readers_share`: what a group read at several points loses, the "mean" or the "sum" of its readers' shares."""
        self.moments, self.output_weights, self.readers_share = moments, output_weights or {}, readers_share
        self.producer_of = units.producer_group()
        self.output_units: dict[str, tuple[str, torch.Tensor, torch.Tensor]] = {}  # reader -> its output group
        for group in units.groups:
            for coupling in group.coupled("out"):
                if coupling.module_name in self.producer_of and self.producer_of[coupling.module_name] == group.key:
                    self.output_units[coupling.module_name] = (group.key, coupling.index, coupling.unit)
        self._x_inverses: dict[tuple[str, str], torch.Tensor] = {}

    def _kept_outputs(self, reader: ReaderMoments, kept: dict[str, list[int]]) -> tuple[str, tuple[int, ...]]:
        found = self.output_units.get(reader.reader)
        if found is None or found[0] == reader.group:
            return reader.reader, ()  # every output (the logits, or a reader feeding no pruned group)
        source, index, unit = found
        columns = index[torch.isin(unit, torch.tensor(kept[source], dtype=torch.long))]
        return source, tuple(sorted(columns.tolist()))

    def signature(self, group: UnitGroup, kept: dict[str, list[int]]):
        return group.key, tuple(self._kept_outputs(r, kept) for r in self.moments[group.key])

    def open(self, group: UnitGroup, kept: dict[str, list[int]], estimator, confidence: float) -> LayerSession:
        if not isinstance(estimator, GaussianEstimator):
            raise ValueError(
                f"features='patches' needs the gaussian estimator (its moments are what the position samples "
                f"accumulate), not {type(estimator).__name__}: use estimator='gaussian' or features='mean'"
            )
        sessions = []
        for reader in self.moments[group.key]:
            _, columns = self._kept_outputs(reader, kept)
            width = reader.n_units * reader.f
            outputs = list(columns) if columns else list(range(reader.n_outputs))
            # computed at each opening, on the kept outputs only (a division of the scatter, and where the outputs
            # are derived two products, cheap beside the factorisation) rather than held beside the moments
            cov = reader.joint(outputs if columns else None).covariance()
            ridge = rank_deficient_ridge(reader.moments.count, width, estimator.ridge)  # as the estimator's own
            blocks = [(list(range(width)), ridge), (list(range(width, cov.shape[0])), estimator.target_ridge)]
            cov = regularise(cov, blocks, estimator.floor, estimator.ridge_scale)
            key = (reader.group, reader.reader)
            weights = self.output_weights.get(reader.reader)
            session = GaussianLayerSession(cov, reader.n_units, reader.f, reader.effective_samples, confidence,
                                           estimator.refresh_every, x_inverse=self._x_inverses.get(key),
                                           target_weights=None if weights is None else weights[outputs])
            if key not in self._x_inverses:  # the units' block is the same whatever outputs the target keeps
                self._x_inverses[key] = session.initial_x_inverse()
            sessions.append(session)
        if len(sessions) == 1:
            return sessions[0]
        return JointSession(sessions, confidence, summed=self.readers_share == "sum")

    def effective_samples(self) -> dict[str, int]:
        """Per group, the smallest effective sample size of its readers (what the plan records)."""
        return {key: min(r.effective_samples for r in readers) for key, readers in self.moments.items() if readers}


def normalised_output_weights(model: torch.nn.Module, units: UnitGraph) -> dict[str, torch.Tensor]:
    """Reader -> gain^2 / (running variance + eps) per output channel, for every reader whose output goes straight
    into a batch norm (and nowhere else). The norm divides each channel by its running standard deviation, so an
    error of the reader's output matters downstream in proportion to the gain over that deviation, not to the
    channel's raw variance: a channel of small raw variance that the norm scales up counts as much as any other. In
    a trained network a channel's share of the normalised output's variance is close to gain^2 / sum of gains^2."""
    graph = units.dependency_graph
    if graph is None:
        return {}
    weights: dict[str, torch.Tensor] = {}
    readers = {name for group in units.groups for name in group.readers}
    for name in readers:
        module = model.get_submodule(name)
        node = graph.module2node.get(module)
        if node is None or len(node.outputs) != 1:
            continue
        norm = node.outputs[0].module
        if (not isinstance(norm, torch.nn.modules.batchnorm._BatchNorm) or norm.running_var is None
                or norm.num_features != _output_width(module)):
            continue
        gain = norm.weight.detach().double() if norm.affine else torch.ones(norm.num_features, dtype=torch.float64)
        weights[name] = gain.square().cpu() / (norm.running_var.detach().double().cpu() + norm.eps)
    return weights


def _output_width(module: torch.nn.Module) -> int | None:
    return getattr(module, "out_channels", getattr(module, "out_features", None))


class MixedFeatures:
    """features="auto" on a model where some groups get position features and others cannot or should not
    (`mipp.positions.automatic_groups`): each group's session comes from the one that serves it. Both kinds measure
    a removal as a share of their target's variance, so one price ranks them alike."""

    def __init__(self, positions: PositionFeatures, means: MeanFeatures, on_means: set[str]):
        self.positions, self.means, self.on_means = positions, means, on_means

    def _serving(self, group: UnitGroup):
        return self.means if group.key in self.on_means else self.positions

    def signature(self, group: UnitGroup, kept: dict[str, list[int]]):
        return self._serving(group).signature(group, kept)

    def open(self, group: UnitGroup, kept: dict[str, list[int]], estimator, confidence: float) -> LayerSession:
        return self._serving(group).open(group, kept, estimator, confidence)

    def effective_samples(self) -> dict[str, int]:
        return self.positions.effective_samples()


class JointSession(LayerSession):
    """One group read at several points: a Gaussian session per reader, removals applied to all (see module doc)."""

    def __init__(self, sessions: list[LayerSession], confidence: float, summed: bool = False):
        self.sessions, self.confidence, self.summed = sessions, confidence, summed
        self.n_units = sessions[0].n_units
        self.kept = sessions[0].kept  # every session removes the same units; the first one's list is the truth

    def unit_mi(self) -> torch.Tensor:
        return sum(s.unit_mi() for s in self.sessions)

    def transfer_entropy(self, i: int) -> TestResult:
        results = [s.transfer_entropy(i) for s in self.sessions]
        p_value = min(1.0, len(results) * min(r.p_value for r in results))
        return decide(sum(r.estimate for r in results), p_value, self.confidence)

    def transfer_entropies(self) -> torch.Tensor:
        return sum(s.transfer_entropies() for s in self.sessions)

    def variance_share_lost(self, i: int) -> float:
        lost = sum(s.variance_share_lost(i) for s in self.sessions)
        return lost if self.summed else lost / len(self.sessions)

    def remove(self, i: int) -> None:
        for session in self.sessions:
            session.remove(i)
