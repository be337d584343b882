"""Gaussian layer sessions for wide problems: the same quantities as `GaussianLayerSession`, without the joint
covariance of units and target.

A residual stream read at many points makes a group of thousands of unit features (channels x reading points)
whose target is thousands of features too (every layer that reads it). `GaussianLayerSession` builds their joint
covariance and inverts it: (d_x + d_y)^2 memory and (d_x + d_y)^3 time, e.g. 14,000^2 for ResNet-50's third stage.
Both sessions here use that the regularised, equilibrated covariance the estimator works on has the form

    C = Z^T Z + diag(E)          Z = centred data / sqrt((n - 1) D),   D = regularised variances,   E = ridge / D

(Z is n x d: n samples), so that every block the session needs reduces to n x n or d_x x d_x matrices:

- the target enters only through K0 = (I_n + Z_y E_y^{-1} Z_y^T)^{-1}, because
  Cov(X | Y) = Z_x^T K0 Z_x + E_x (Woodbury), and through G_w = Z_y D_y Z_y^T = Y_c Y_c^T / (n - 1) for the
  variance shares;
- `UnitSpaceSession` (fewer unit features than samples) keeps P = Cov(X_S)^{-1} and P^Y = Cov(X_S | Y)^{-1} for the
  kept set S (d_x x d_x). A unit's transfer entropy is I(X_i; Y | X_{S\\i}) = 1/2 log det(P^Y_ii P_ii^{-1}) (the
  conditional variances of X_i given the other kept units, without and with Y), and a removal is a Schur-complement
  downdate of both;
- `SampleSpaceSession` (at least as many unit features as samples) works in the n-dimensional sample space: with
  z = Z_x E_x^{-1/2} and M1 = I + z_S z_S^T, M2 = M1 + Z_y E_y^{-1} Z_y^T, the transfer entropy is
  1/2 [log det(I - z_i^T M2^{-1} z_i) - log det(I - z_i^T M1^{-1} z_i)] (Sylvester's determinant identity on the
  log-determinant form), and a removal is a rank-f Woodbury update of M1^{-1} and M2^{-1}.

What is computed is exactly what `GaussianLayerSession` computes on the same data and estimator options: the
same regularised Gaussian model, its transfer entropies, chi-squared tests, single-unit MIs and variance shares;
only the algebra differs, so the numbers agree to rounding (checked in tests/test_mi_gaussian_wide.py). Costs: the
unit space O(n d_x^2 + n^2 (d_x + d_y) + d_x^3 + n^3) to open and O(d_x^2 f) per removal; the sample space
O(n^2 (d_x + d_y) + n^3) to open, O(n^2 f) per test and per removal; memory O(n^2 + d_x^2 + n (d_x + d_y)) instead
of O((d_x + d_y)^2). `open_session` picks the cheaper form and keeps `GaussianLayerSession` for small problems.
"""
from __future__ import annotations

import copy
import math

import torch

from .base import LayerSession, TestResult, as_units, check_confidence, decide
from .gaussian import (
    DTYPE,
    MIN_RELATIVE_VARIANCE,
    GaussianEstimator,
    block_diagonal,
    chi2_p_value,
    half_logdet_eye_plus,
    rank_deficient_ridge,
    spd_inverse,
)

# Problems with at most this many unit and target features together, or with more samples than features, keep
# GaussianLayerSession (the joint covariance is small then, and its results stay exactly as they were).
WIDE_FEATURES = 1024
# A ridge share below this (an unregularised feature) has no factor form: such problems keep GaussianLayerSession.
MIN_RIDGE_SHARE = 1e-12


def open_session(estimator: GaussianEstimator, units, target, confidence: float = 0.95,
                 units_cache: dict | None = None, key=None) -> LayerSession:
    """The estimator's layer session on units (n, m, f) and target (n, d_y): `GaussianLayerSession` for a small
    problem, else the cheaper of the unit-space and sample-space forms (same quantities, see the module doc).

    `units_cache` (a dict) with `key` (the group): the units' side of the factorisation is kept there and shared
    by every later session on the same units, whatever its target (a budget search opens a group once per sweep)."""
    units, y = as_units(units, target)
    n, m, f = units.shape
    width, d_y = m * f, y.shape[1]
    if width + d_y <= max(n, WIDE_FEATURES) or n < 2:
        return estimator.session(units, y, confidence)
    cache_key = (key, estimator.ridge, estimator.floor, estimator.ridge_scale, n, m, f)
    side = units_cache.get(cache_key) if units_cache is not None and key is not None else None
    if side is None:
        side = UnitsSide(units, estimator)
        if units_cache is not None and key is not None:
            units_cache[cache_key] = side
    t = _factor(y, estimator.target_ridge, estimator)
    if min(float(side.share.min()), float(t.share.min())) < MIN_RIDGE_SHARE:
        return estimator.session(units, y, confidence)
    kind = UnitSpaceSession if side.in_unit_space else SampleSpaceSession
    return kind(side, t, confidence)


class _Factor:
    """C = Z^T Z + diag(share) for one block of features (see the module doc); `variance`: the regularised
    variances D, which weigh target features back into their own scale."""

    def __init__(self, z: torch.Tensor, share: torch.Tensor, variance: torch.Tensor, centred: torch.Tensor):
        self.z, self.share, self.variance, self.centred = z, share, variance, centred


def _factor(data: torch.Tensor, ridge: float, estimator: GaussianEstimator) -> _Factor:
    """The factor form of `regularise` + `equilibrate` applied to the sample covariance of `data` (n, d)."""
    data = data.to(DTYPE)
    n = data.shape[0]
    centred = data - data.mean(0)
    var = (centred * centred).sum(0) / max(n - 1, 1)
    if estimator.ridge_scale == "feature":
        base = torch.maximum(var, MIN_RELATIVE_VARIANCE * var.mean())
    else:
        base = var.mean().expand_as(var)
    added = float(ridge) * base + estimator.floor
    variance = (var + added).clamp_min(1e-300)
    z = centred / (variance * max(n - 1, 1)).sqrt()
    return _Factor(z, added / variance, variance, centred)


class UnitsSide:
    """The part of a session that depends on the units alone, computed once per group: their factor (with the
    estimator's source ridge, `rank_deficient_ridge`), and with every unit kept either Cov(X)^{-1} (unit space,
    fewer features than samples) or (I + z z^T)^{-1} with z = Z_x E_x^{-1/2} (sample space)."""

    def __init__(self, units: torch.Tensor, estimator: GaussianEstimator):
        n, m, f = units.shape
        self.n_samples, self.n_units, self.f = n, m, f
        x = _factor(units.reshape(n, m * f), rank_deficient_ridge(n, m * f, estimator.ridge), estimator)
        self.share = x.share
        self.in_unit_space = m * f < n
        if self.in_unit_space:
            self.z = x.z
            c_xx = x.z.T @ x.z + torch.diag(x.share)
            self.c_xx = 0.5 * (c_xx + c_xx.T)
            self.inverse = spd_inverse(self.c_xx)
        else:
            self.z = x.z / x.share.sqrt()
            M1 = torch.eye(n, dtype=DTYPE) + self.z @ self.z.T
            self.M1 = 0.5 * (M1 + M1.T)
            self.inverse = spd_inverse(self.M1)


def _target_grams(t: _Factor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(G_y, K0, G_w): G_y = Z_y E_y^{-1} Z_y^T; K0 = (I + G_y)^{-1}, so that I - K0 = Z_y Cov(Y)^{-1} Z_y^T; and
    G_w = Y_c Y_c^T / (n - 1), so that Cov(X, Y) D_y Cov(Y, X) = Z_x^T G_w Z_x."""
    n = t.z.shape[0]
    scaled = t.z / t.share.sqrt()
    G_y = scaled @ scaled.T
    G_y = 0.5 * (G_y + G_y.T)
    G_w = (t.centred @ t.centred.T) / max(n - 1, 1)
    return G_y, spd_inverse(torch.eye(n, dtype=DTYPE) + G_y), 0.5 * (G_w + G_w.T)


def half_logdet(base: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """`half_logdet_eye_plus`, in closed form for 1 x 1 blocks (most units have one feature)."""
    if base.shape[-1] == 1:
        ratio = (extra[..., 0, 0] / base[..., 0, 0]).clamp_min(0.0)
        return 0.5 * torch.log1p(ratio)
    return half_logdet_eye_plus(base, extra)


class _WideSession(LayerSession):
    """What both forms share: bookkeeping of the kept set, the tests, and copies that share constant data."""

    _shared: tuple[str, ...] = ()  # attributes that never change after opening: copies share them

    def __init__(self, side: UnitsSide, t: _Factor, confidence: float):
        self.side = side
        self.n_units, self.f, self.n_samples, self.d_y = side.n_units, side.f, side.n_samples, t.z.shape[1]
        target_variance = t.variance
        self.target_total = float(target_variance.sum())
        self.confidence = check_confidence(confidence)
        self.kept = list(range(self.n_units))
        self._is_kept = [True] * self.n_units

    def __deepcopy__(self, memo):
        out = copy.copy(self)
        for name, value in self.__dict__.items():
            if name not in self._shared:
                setattr(out, name, copy.deepcopy(value, memo))
        return out

    def _slice(self, i: int) -> slice:
        return slice(i * self.f, (i + 1) * self.f)

    def _phi(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def transfer_entropy(self, i: int) -> TestResult:
        phi = float(self._phi(self._check_kept(i)))
        return decide(phi, chi2_p_value(phi, self.n_samples, self.d_y * self.f), self.confidence)

    def transfer_entropies(self) -> torch.Tensor:
        out = torch.full((self.n_units,), math.nan, dtype=DTYPE)
        for i in self.kept:
            out[i] = self._phi(i)
        return out

    def _mark_removed(self, i: int) -> None:
        self.kept.remove(i)
        self._is_kept[i] = False


class UnitSpaceSession(_WideSession):
    """Fewer unit features than samples: P = Cov(X_S)^{-1} and P^Y = Cov(X_S | Y)^{-1} at full size (rows and
    columns of removed units zero), and C_w = Cov(X, Y) D_y Cov(Y, X) for the variance shares (see module doc)."""

    _shared = ("side", "C_w", "_unit_mi")

    def __init__(self, side: UnitsSide, t: _Factor, confidence: float = 0.95):
        super().__init__(side, t, confidence)
        _, K0, G_w = _target_grams(t)
        c_given_y = side.z.T @ (K0 @ side.z) + torch.diag(side.share)
        c_given_y = 0.5 * (c_given_y + c_given_y.T)
        self.P, self.P_y = side.inverse.clone(), spd_inverse(c_given_y)
        self.C_w = side.z.T @ (G_w @ side.z)
        self._unit_mi = half_logdet(block_diagonal(c_given_y, self.f), block_diagonal(side.c_xx - c_given_y, self.f))

    def unit_mi(self) -> torch.Tensor:
        """I(X_i; Y) = 1/2 log det Cov(X_i) - 1/2 log det Cov(X_i | Y), all units at once."""
        return self._unit_mi.clone()

    def _phi(self, i: int) -> torch.Tensor:
        sl = self._slice(i)
        P_ii, P_y_ii = self.P[sl, sl], self.P_y[sl, sl]
        gap = P_y_ii - P_ii
        return half_logdet(P_ii, 0.5 * (gap + gap.T))

    def transfer_entropies(self) -> torch.Tensor:
        out = torch.full((self.n_units,), math.nan, dtype=DTYPE)
        if self.kept:
            kept = torch.tensor(self.kept, dtype=torch.long)
            P_blocks = block_diagonal(self.P, self.f)[kept]
            gap = block_diagonal(self.P_y, self.f)[kept] - P_blocks
            out[kept] = half_logdet(P_blocks, 0.5 * (gap + gap.transpose(1, 2)))
        return out

    def variance_share_lost(self, i: int) -> float:
        """trace(P_ii^{-1} P_{:,i}^T C_w P_{:,i}) / trace(D_y): the weighted trace of B_i P_ii^{-1} B_i^T."""
        sl = self._slice(self._check_kept(i))
        column = self.P[:, sl]
        lost = torch.trace(torch.linalg.solve(self.P[sl, sl], column.T @ (self.C_w @ column)))
        return float(lost.clamp_min(0.0) / self.target_total)

    def remove(self, i: int) -> None:
        """Schur-complement downdates of P and P^Y."""
        sl = self._slice(self._check_kept(i))
        for inverse in (self.P, self.P_y):
            column = inverse[:, sl].clone()
            inverse.addmm_(column @ spd_inverse(column[sl].clone()), column.T, alpha=-1.0)
            inverse[sl, :] = 0.0
            inverse[:, sl] = 0.0
        self._mark_removed(i)


class SampleSpaceSession(_WideSession):
    """At least as many unit features as samples: K = (K1, K2) with K1 = M1^{-1} and K2 = M2^{-1} (n x n) for the
    kept set, M1 = I + z_S z_S^T and M2 = M1 + Z_y E_y^{-1} Z_y^T, z = Z_x E_x^{-1/2} (see module doc)."""

    _shared = ("side", "z", "G_w", "_unit_mi")

    def __init__(self, side: UnitsSide, t: _Factor, confidence: float = 0.95):
        super().__init__(side, t, confidence)
        G_y, K0, self.G_w = _target_grams(t)
        self.z = side.z
        self.K = torch.stack([side.inverse, spd_inverse(side.M1 + G_y)])  # K1, K2: one product serves both
        # I(X_i; Y) = 1/2 log det(I + z_i^T z_i) - 1/2 log det(I + z_i^T K0 z_i)
        with_target = self._blocks(self.z, K0 @ self.z) + torch.eye(self.f, dtype=DTYPE)
        alone = self._blocks(self.z, self.z) + torch.eye(self.f, dtype=DTYPE)
        self._unit_mi = half_logdet(with_target, alone - with_target)
        self._last = None

    def _blocks(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(m, f, f): a_i^T b_i for every unit i (columns in blocks of f)."""
        n = a.shape[0]
        return torch.einsum("nki,nkj->kij", a.reshape(n, -1, self.f), b.reshape(n, -1, self.f))

    def unit_mi(self) -> torch.Tensor:
        return self._unit_mi.clone()

    def _residuals(self, i: int):
        """(z_i, K1 z_i, K2 z_i, H1, H2) with H = I - z_i^T K z_i: H1 = E_i P_ii (the share of unit i's variance the
        other kept units leave), H2 the same given Y as well. Kept for the unit last asked about, as a sweep asks
        for its test, its variance share and its removal in turn."""
        if self._last is not None and self._last[0] == i:
            return self._last[1]
        z = self.z[:, self._slice(i)]
        v1, v2 = self.K @ z
        eye = torch.eye(self.f, dtype=DTYPE)
        h1, h2 = eye - z.T @ v1, eye - z.T @ v2
        found = z, v1, v2, 0.5 * (h1 + h1.T), 0.5 * (h2 + h2.T)
        self._last = (i, found)
        return found

    def _phi(self, i: int) -> torch.Tensor:
        z, v1, v2, h1, h2 = self._residuals(i)
        gap = z.T @ (v1 - v2)  # H2 - H1, computed without the cancellation
        return half_logdet(h1, 0.5 * (gap + gap.T))

    def variance_share_lost(self, i: int) -> float:
        """trace(H1^{-1} (K1 z_i)^T G_w (K1 z_i)) / trace(D_y): Cov(Y | X_{S\\i}) - Cov(Y | X_S) =
        Z_y^T K1 z_i H1^{-1} z_i^T K1 Z_y, weighted by the target's variances."""
        _, v1, _, h1, _ = self._residuals(self._check_kept(i))
        lost = torch.trace(torch.linalg.solve(h1, v1.T @ (self.G_w @ v1)))
        return float(lost.clamp_min(0.0) / self.target_total)

    def remove(self, i: int) -> None:
        """M minus z_i z_i^T: K + K z_i H^{-1} z_i^T K, for K1 and K2 (Woodbury)."""
        _, v1, v2, h1, h2 = self._residuals(self._check_kept(i))
        v = torch.stack([v1, v2])
        self.K.baddbmm_(v @ spd_inverse(torch.stack([h1, h2])), v.transpose(1, 2))
        self._last = None
        self._mark_removed(i)
