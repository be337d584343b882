"""The one small interface every conditional-mutual-information estimator of mipp implements.

MIPP asks two things of an estimator: the conditional mutual information I(X;Y|Z) of sample matrices, with a test
of whether it is greater than zero at a given confidence (`CMIEstimator.cmi` / `.test`), and a `LayerSession`: the
state of the sweep over one layer, which scores the transfer entropy I(X_i ; Y | X_{S\\i}) of its units while units
are removed from the kept set S one at a time. Estimators that can share work across those queries (the Gaussian one
downdates its matrices) override the session; the others inherit `GenericLayerSession`, which calls `test` per unit.

Shared input checks live here too, so every estimator rejects bad input with the same clear messages.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TestResult:
    """Outcome of a significance test of I(X;Y|Z) > 0."""

    __test__ = False  # not a pytest test class

    estimate: float  # nats
    p_value: float
    significant: bool  # p_value < 1 - confidence


def decide(estimate: float, p_value: float, confidence: float) -> TestResult:
    """Package an estimate and its p-value; significant when p < 1 - confidence."""
    p_value = float(min(max(p_value, 0.0), 1.0))
    return TestResult(float(estimate), p_value, bool(p_value < 1.0 - confidence))


# ----------------------------------------------------------------------------------------------------- input checks
def as_matrix(a, name: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Tensor or array -> (n, d) tensor of `dtype` (a 1-D input is one column; trailing dims are flattened).

    Raises ValueError for an empty input or one with NaN / inf values.
    """
    if isinstance(a, np.ndarray):
        a = torch.from_numpy(np.ascontiguousarray(a))
    elif not isinstance(a, torch.Tensor):
        a = torch.as_tensor(np.asarray(a))
    a = a.detach()
    if a.dim() == 0:
        raise ValueError(f"{name} is a scalar; pass a matrix of samples, shape (n_samples, n_features)")
    if a.dim() == 1:
        a = a[:, None]
    a = a.reshape(a.shape[0], -1).to(device="cpu", dtype=dtype)
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(a.shape)}); pass at least one sample and one feature")
    if not torch.isfinite(a).all():
        bad = int((~torch.isfinite(a)).sum())
        raise ValueError(
            f"{name} has {bad} NaN or infinite values; remove those samples or impute them before estimating MI"
        )
    return a


def check_same_n(**arrays: torch.Tensor | None) -> int:
    """Every given array has the same number of rows; returns it."""
    sizes = {k: v.shape[0] for k, v in arrays.items() if v is not None}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{k}: {n}" for k, n in sizes.items())
        raise ValueError(f"inputs have different numbers of samples ({listed}); pass one row per sample in each")
    return next(iter(sizes.values()))


def as_units(units, target) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a session's inputs: units (n, n_units, f) (a 2-D input means f = 1) and target (n, d_y)."""
    if not isinstance(units, torch.Tensor):
        units = torch.as_tensor(np.asarray(units))
    if units.dim() == 2:
        units = units[:, :, None]
    if units.dim() != 3:
        raise ValueError(
            f"units must have shape (n_samples, n_units, features_per_unit), got {tuple(units.shape)}"
        )
    n, m, f = units.shape
    flat = as_matrix(units.reshape(n, m * f), "units")
    y = as_matrix(target, "target")
    check_same_n(units=flat, target=y)
    return flat.reshape(n, m, f), y


def check_confidence(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    return float(confidence)


# ----------------------------------------------------------------------------------------------------- interface
VARIANCE_MODEL: dict = {"estimator": None}  # the estimator class whose sessions measure variance shares for others


def use_for_variance_shares(estimator_class) -> None:
    """Make `estimator_class` (the Gaussian one, which registers itself here: this module cannot import it without
    an import circle) measure `variance_share_lost` for sessions that do not compute it themselves."""
    VARIANCE_MODEL["estimator"] = estimator_class


class LayerSession(ABC):
    """State of the MIPP sweep over one group of units: the kept set S and its transfer entropies."""

    n_units: int
    kept: list[int]

    @abstractmethod
    def unit_mi(self) -> torch.Tensor:
        """(n_units,) single-unit I(X_i ; Y) in nats, for the MI ordering."""

    @abstractmethod
    def transfer_entropy(self, i: int) -> TestResult:
        """I(X_i ; Y | X_{S\\i}) for the current kept set S, tested at the session's confidence."""

    @abstractmethod
    def transfer_entropies(self) -> torch.Tensor:
        """(n_units,) transfer entropy of every kept unit at once; nan for removed units."""

    @abstractmethod
    def remove(self, i: int) -> None:
        """S = S \\ {i}."""

    def variance_share_lost(self, i: int) -> float:
        """Share of the target's variance that the kept units could no longer explain once unit i is removed.

        trace(Cov(Y | X_{S\\i})) - trace(Cov(Y | X_S)), divided by trace(Cov(Y)), under the linear-Gaussian model
        and in the target's own variance scale (each target feature weighted by its variance; a rescaled or
        duplicated target gives the same share). It depends neither on a ridge nor on how many units the layer has,
        and it is additive: the shares of successive removals add up to the share lost by the removed set. MIPP's
        budget mode prices units with it.

        The Gaussian session computes it from its own matrices. Every other estimator gets it from a Gaussian
        session on the same units and target that mirrors this session's removals, so budget mode works with any
        estimator: its tests decide significance, the linear-Gaussian model measures the cost of a removal.
        """
        i = self._check_kept(i)
        companion = self._variance_companion()
        for j in [j for j in companion.kept if j not in set(self.kept)]:
            companion.remove(j)
        return companion.variance_share_lost(i)

    def _variance_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The units (n, n_units, f) and continuous target (n, d_y) that `variance_share_lost` measures."""
        raise NotImplementedError(
            f"{type(self).__name__} does not provide variance_share_lost; implement it or _variance_inputs "
            "(needed by MIPP's budget mode; confidence mode works without it)"
        )

    def _variance_companion(self) -> "LayerSession":
        if getattr(self, "_companion", None) is None:
            if VARIANCE_MODEL["estimator"] is None:
                raise RuntimeError("no estimator measures variance shares; import mipp.mi (it registers the Gaussian)")
            units, target = self._variance_inputs()
            self._companion = VARIANCE_MODEL["estimator"]().session(units, target)
        return self._companion

    def _check_kept(self, i: int) -> int:
        """`i` as an int, if it is a unit of this session that is still kept. A session that keeps a per-unit flag
        list `_is_kept` (the Gaussian ones, on the sweep's hot path) is checked in O(1), others against `kept`."""
        i = int(i)
        if not 0 <= i < self.n_units:
            raise IndexError(f"unit {i} out of range for a session of {self.n_units} units")
        is_kept = getattr(self, "_is_kept", None)
        if not (is_kept[i] if is_kept is not None else i in self.kept):
            raise ValueError(f"unit {i} was already removed from this session")
        return i


class CMIEstimator(ABC):
    """Estimate I(X;Y|Z) in nats from samples and test whether it exceeds zero.

    The contract every estimator keeps, so that MIPP builds and checks any of them the same way:
    - `name`: the key it is registered under (`mipp.mi.registry.register_estimator`);
    - its constructor takes keyword options only, among them `seed` (an int, default 0) for every random number it
      draws; an estimator that draws none accepts the seed and ignores it;
    - `min_samples`: the fewest samples MIPP accepts for it (below that its estimates and tests mean nothing);
    - `ridge_regularised`: True when it regularises covariances with a ridge, so that fewer samples than features
      still give finite estimates, which MIPP then warns are unreliable.
    """

    name: str
    min_samples: int = 50
    ridge_regularised: bool = False

    @abstractmethod
    def cmi(self, x, y, z=None) -> float:
        """I(X;Y|Z) in nats; x (n, dx), y (n, dy), z (n, dz) or None; tensors or numpy arrays."""

    @abstractmethod
    def test(self, x, y, z=None, confidence: float = 0.95) -> TestResult:
        """Estimate I(X;Y|Z) and test it against zero; significant when p < 1 - confidence."""

    def session(self, units, target, confidence: float = 0.95) -> LayerSession:
        """A sweep over the units (n, n_units, f) of one layer against the target (n, d_y)."""
        return GenericLayerSession(self, units, target, confidence)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class GenericLayerSession(LayerSession):
    """A session that asks its estimator afresh for every query (no shared state beyond the kept set)."""

    def __init__(self, estimator: CMIEstimator, units, target, confidence: float = 0.95, variance_target=None):
        """`variance_target`: the target `variance_share_lost` measures, when the estimator tests against a reduced
        one (KSG's principal components); default `target`."""
        self.estimator = estimator
        self.units, self.target = as_units(units, target)
        self.variance_target = self.target if variance_target is None else as_matrix(variance_target, "target")
        self.n_units = self.units.shape[1]
        self.kept = list(range(self.n_units))
        self.confidence = check_confidence(confidence)

    def _variance_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.units, self.variance_target

    def _split(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        rest = [j for j in self.kept if j != i]
        x = self.units[:, i, :]
        z = self.units[:, rest, :].reshape(self.units.shape[0], -1) if rest else None
        return x, z

    def unit_mi(self) -> torch.Tensor:
        return torch.tensor(
            [self.estimator.cmi(self.units[:, i, :], self.target) for i in range(self.n_units)], dtype=torch.float64
        )

    def transfer_entropy(self, i: int) -> TestResult:
        x, z = self._split(self._check_kept(i))
        return self.estimator.test(x, self.target, z, confidence=self.confidence)

    def transfer_entropies(self) -> torch.Tensor:
        out = torch.full((self.n_units,), math.nan, dtype=torch.float64)
        for i in self.kept:
            x, z = self._split(i)
            out[i] = self.estimator.cmi(x, self.target, z)
        return out

    def remove(self, i: int) -> None:
        self.kept.remove(self._check_kept(i))
