"""Gaussian (closed-form) conditional mutual information: streaming moments, one-shot transfer entropies, downdates.

For jointly Gaussian variables every MI is a difference of log-determinants of covariance blocks, so the whole
estimator needs only the covariance of the calibration activations. That makes it exact for its model class, cheap
(no re-fitting per unit), and streamable: `GaussianMoments` accumulates counts, means and scatter matrices over
batches of any size, in float64 whatever the input dtype, and accumulators from several processes add up.

The layer session (method spec 4.1) keeps, for the kept set S of units, P = inverse of the regularised Cov(X_S),
B = Cov(Y, X_S) P and Q = R^{-1} with R = Cov(Y | X_S). The transfer entropy of a unit I (a block of f features) is

    Phi_I = 1/2 log det(I_f + P_II^{-1} B_I^T R^{-1} B_I)        (f = 1: 1/2 log(1 + b_i^T R^{-1} b_i / P_ii))

for all units at once, and removing a unit is a block rank-f downdate of P, B and Q (Schur complement and Woodbury);
nothing is refactorised. Under the null the likelihood-ratio statistic 2 N Phi is chi-squared with d_y * f degrees
of freedom (Wilks), which gives the significance test.

Budget mode prices a removal by `variance_share_lost`: removing block I raises Cov(Y | X_S) by B_I P_II^{-1} B_I^T,
so the share of the target's variance the kept units can no longer explain (after an optimal linear re-fit of the
reader) is the trace of that, in the target's own variance scale (each target feature weighted by its variance,
not by 1 as in the correlation matrix the session works on), divided by trace Cov(Y). Unlike the transfer entropy
it stays finite and ridge-independent when Y is an exact linear function of the units (the logits), does not grow
with the target's width, and adds up along a sequence of removals.

Regularisation. Every unit feature (the sources X and the conditioning set Z) gets `ridge` times its own variance
on the diagonal, and every target feature `target_ridge` times its own variance; a feature's variance counts as at
least 1e-6 of its block's mean variance, and a tiny absolute `floor` is added (ridge_scale="mean" instead uses the
block's mean variance for every feature). Relative to each feature, the estimates do not depend on the units'
scales, as MI does not; the linear algebra runs on the equilibrated (correlation) matrix for the same reason. The
ridge acts like independent noise of that variance on each variable, so constant units, exact or linear copies and
more dimensions than samples give finite, non-negative estimates, never NaN. The target ridge is the target's
resolution: variation of Y below it counts as noise. It keeps transfer entropies finite when Y is an exact linear
function of the units (the logits read from the last hidden layer), where they are infinite in theory, and it is why
an exact copy's statistic stays far below the chi-squared threshold: it scales with ridge / target_ridge.

Wide layers (thousands of unit or target features, e.g. a residual stream read at many points) are not given the
joint covariance: `mipp.mi.gaussian_wide` computes the same session quantities in the units' or the samples' space.
"""
from __future__ import annotations

import math

import torch

from .base import (
    CMIEstimator,
    LayerSession,
    TestResult,
    as_matrix,
    as_units,
    check_confidence,
    check_same_n,
    decide,
    use_for_variance_shares,
)
from .registry import register_estimator

DTYPE = torch.float64


# ------------------------------------------------------------------------------------------------------ moments
class GaussianMoments:
    """Streaming count, mean and scatter (sum of centred outer products) of d-dimensional samples, in float64.

    `update(batch)` adds a batch (n, d) (several arguments are concatenated along features, so
    `update(units, target)` accumulates their joint moments); `a + b` / `a.merge(b)` combine accumulators built on
    disjoint data, e.g. in several processes. Batches are combined with Chan's pairwise formula, which equals adding
    the raw sums of x and x x^T but keeps precision when means are large; `as_sums()` / `from_sums()` convert to and
    from the raw sums (count, sum x, sum x x^T) for an all-reduce.
    """

    def __init__(self, dim: int | None = None):
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.scatter: torch.Tensor | None = None
        if dim is not None:
            self.mean = torch.zeros(dim, dtype=DTYPE)
            self.scatter = torch.zeros(dim, dim, dtype=DTYPE)

    @property
    def dim(self) -> int | None:
        return None if self.mean is None else self.mean.shape[0]

    def update(self, *parts, precision: torch.dtype | None = None) -> "GaussianMoments":
        """Add one batch. `precision` (e.g. torch.float32): compute the batch's own mean and centred products in
        that dtype, several times faster, and merge them into the float64 running moments; the inputs are then
        not checked for NaN (the caller does)."""
        if precision is not None:
            batch = torch.cat([p.reshape(p.shape[0], -1).to(precision) for p in parts], dim=1)
            mean = batch.mean(0)
            centred = batch - mean
            self._absorb(GaussianMoments._from_parts(batch.shape[0], mean.to(DTYPE), (centred.T @ centred).to(DTYPE)))
            return self
        mats = [as_matrix(p, f"batch part {k}") for k, p in enumerate(parts)]
        if not mats:
            raise ValueError("update() needs at least one batch")
        check_same_n(**{f"part{k}": m for k, m in enumerate(mats)})
        batch = torch.cat(mats, dim=1)
        mean = batch.mean(0)
        centred = batch - mean
        other = GaussianMoments._from_parts(batch.shape[0], mean, centred.T @ centred)
        self._absorb(other)
        return self

    def merge(self, other: "GaussianMoments") -> "GaussianMoments":
        out = self.copy()
        out._absorb(other)
        return out

    def __add__(self, other: "GaussianMoments") -> "GaussianMoments":
        if not isinstance(other, GaussianMoments):
            return NotImplemented
        return self.merge(other)

    def copy(self) -> "GaussianMoments":
        out = GaussianMoments()
        out.count = self.count
        out.mean = None if self.mean is None else self.mean.clone()
        out.scatter = None if self.scatter is None else self.scatter.clone()
        return out

    def as_sums(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(count, sum of x, sum of x x^T), the additive form."""
        self._require_data()
        total = self.mean * self.count
        return self.count, total, self.scatter + self.count * torch.outer(self.mean, self.mean)

    @classmethod
    def from_sums(cls, count: int, total, outer) -> "GaussianMoments":
        count = int(count)
        if count <= 0:
            raise ValueError("from_sums needs a positive count")
        total = torch.as_tensor(total, dtype=DTYPE)
        mean = total / count
        scatter = torch.as_tensor(outer, dtype=DTYPE) - count * torch.outer(mean, mean)
        return cls._from_parts(count, mean, scatter)

    def covariance(self, ridge: float = 0.0, floor: float = 0.0, scale: str = "feature") -> torch.Tensor:
        """Sample covariance (divisor n - 1) plus a ridge on the diagonal (see `regularise`)."""
        self._require_data()
        cov = self.scatter / max(self.count - 1, 1)
        cov = 0.5 * (cov + cov.T)
        return regularise(cov, [(slice(0, cov.shape[0]), ridge)], floor, scale)

    # -- internals
    @classmethod
    def _from_parts(cls, count: int, mean: torch.Tensor, scatter: torch.Tensor) -> "GaussianMoments":
        out = cls()
        out.count, out.mean, out.scatter = int(count), mean, scatter
        return out

    def _absorb(self, other: "GaussianMoments") -> None:
        if other.count == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.scatter = other.count, other.mean.clone(), other.scatter.clone()
            return
        if other.dim != self.dim:
            raise ValueError(f"cannot combine moments of dimension {self.dim} and {other.dim}")
        n = self.count + other.count
        delta = other.mean - self.mean
        # in place, in the same order of operations as (scatter + other) + outer * c: no new matrix per batch
        self.scatter += other.scatter
        self.scatter += torch.outer(delta, delta).mul_(self.count * other.count / n)
        self.mean = self.mean + delta * (other.count / n)
        self.count = n

    def _require_data(self) -> None:
        if self.count == 0:
            raise ValueError("no samples accumulated yet; call update(batch) first")


RIDGE_SCALES = ("feature", "mean")
MIN_RELATIVE_VARIANCE = 1e-6  # "feature" mode: a feature's ridge never scales below this share of the mean variance


def regularise(cov: torch.Tensor, blocks: list[tuple], floor: float, scale: str = "feature") -> torch.Tensor:
    """Add a ridge to the diagonal of each (index, ridge) block of a covariance matrix.

    scale "feature": ridge * max(var_j, 1e-6 * mean variance of the block) + floor on feature j, i.e. a ridge on
    the correlation matrix, so estimates do not depend on the units' scales (MI is invariant to rescaling);
    scale "mean": ridge * mean variance of the block + floor on every feature of the block.
    """
    if scale not in RIDGE_SCALES:
        raise ValueError(f"ridge scale must be one of {RIDGE_SCALES}, got {scale!r}")
    out = cov.clone()
    diag = torch.diagonal(cov)
    for index, ridge in blocks:
        index = torch.arange(cov.shape[0])[index] if isinstance(index, slice) else torch.as_tensor(index).long()
        if index.numel() == 0:
            continue
        var = diag[index].clamp_min(0)
        mean = var.mean()
        base = torch.maximum(var, MIN_RELATIVE_VARIANCE * mean) if scale == "feature" else mean.expand_as(var)
        out[index, index] += float(ridge) * base + float(floor)  # (index[k], index[k]) pairs: the diagonal
    return out


# ------------------------------------------------------------------------------------------------- linear algebra
def cholesky(a: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of a symmetric positive (semi)definite matrix; adds growing jitter if rounding breaks it."""
    if a.shape[-1] == 0:
        return a.clone()
    L, info = torch.linalg.cholesky_ex(a)
    if not bool((info != 0).any()):
        return L
    scale = torch.diagonal(a, dim1=-2, dim2=-1).abs().mean().clamp_min(1e-300)
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    for power in range(-14, 0):
        L, info = torch.linalg.cholesky_ex(a + eye * scale * 10.0**power)
        if not bool((info != 0).any()):
            return L
    # Last resort, rounding beyond any jitter (near-singular statistics): the nearest matrix whose eigenvalues are at
    # least 1e-9 of the largest, so an estimate never fails on numerics alone.
    values, vectors = torch.linalg.eigh(0.5 * (a + a.transpose(-1, -2)))
    values = values.clamp_min(1e-9 * values.abs().amax(-1, keepdim=True).clamp_min(1e-300))
    return torch.linalg.cholesky((vectors * values.unsqueeze(-2)) @ vectors.transpose(-1, -2))


def logdet(a: torch.Tensor) -> torch.Tensor:
    """log det of a symmetric positive definite matrix (batched), via Cholesky."""
    if a.shape[-1] == 0:
        return torch.zeros(a.shape[:-2], dtype=a.dtype)
    L = cholesky(a)
    return 2.0 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)


def spd_inverse(a: torch.Tensor) -> torch.Tensor:
    if a.shape[-1] == 0:
        return a.clone()
    inv = torch.cholesky_inverse(cholesky(a))
    return 0.5 * (inv + inv.transpose(-1, -2))


def half_logdet_eye_plus(base: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """1/2 log det(I + base^{-1} extra) for SPD `base` and PSD `extra` (batched), accurate when it is tiny.

    Computed from the eigenvalues of L^{-1} extra L^{-T} (L L^T = base) with log1p, so an exact copy's ~1e-9
    value is not lost to the cancellation of two large log-determinants.
    """
    L = cholesky(base)
    half = torch.linalg.solve_triangular(L, extra, upper=False)
    sym = torch.linalg.solve_triangular(L, half.transpose(-1, -2), upper=False)
    sym = 0.5 * (sym + sym.transpose(-1, -2))
    eig = torch.linalg.eigvalsh(sym).clamp_min(0.0)
    return 0.5 * torch.log1p(eig).sum(-1)


def equilibrate(cov: torch.Tensor) -> torch.Tensor:
    """D^{-1/2} cov D^{-1/2} with D = diag(cov): unit diagonal, same MI (MI is invariant to rescaling each feature).

    Keeps the linear algebra accurate when features live on very different scales (nearly dead units next to
    large ones): the condition number is then set by the correlations and the ridge, not by the scales.
    """
    d = torch.diagonal(cov).clamp_min(1e-300).sqrt()
    out = cov / torch.outer(d, d)
    if torch.equal(cov, cov.T):  # then out is symmetric bit for bit (d_i d_j == d_j d_i): skip two passes
        return out
    return 0.5 * (out + out.T)


def block_diagonal(a: torch.Tensor, f: int) -> torch.Tensor:
    """The (K, f, f) diagonal blocks of a (K f, K f) matrix."""
    k = a.shape[0] // f
    four = a.reshape(k, f, k, f)
    idx = torch.arange(k)
    return four[idx, :, idx, :]


def columns_of(a: torch.Tensor, f: int) -> torch.Tensor:
    """(d, K f) -> (K, d, f): the column block of each unit."""
    d = a.shape[0]
    return a.reshape(d, -1, f).permute(1, 0, 2)


def gaussian_cmi_from_cov(cov: torch.Tensor, x_idx, y_idx, z_idx=None) -> float:
    """I(X;Y|Z) of a Gaussian with covariance `cov` (index lists select x, y, z).

    Equals 1/2 [log det S_xz + log det S_yz - log det S_xyz - log det S_z], computed as
    1/2 log det(I + Cov(Y|X,Z)^{-1} E) with E = Cov(Y|Z) - Cov(Y|X,Z), which keeps tiny values accurate.
    """
    x_idx, y_idx = list(x_idx), list(y_idx)
    z_idx = list(z_idx) if z_idx is not None else []
    cov = equilibrate(cov)
    xy = x_idx + y_idx
    cond = cov[xy][:, xy]
    if z_idx:
        s_zxy = cov[z_idx][:, xy]
        cond = cond - s_zxy.T @ torch.cholesky_solve(s_zxy, cholesky(cov[z_idx][:, z_idx]))
        cond = 0.5 * (cond + cond.T)
    dx = len(x_idx)
    c_xx, c_xy, c_yy = cond[:dx, :dx], cond[:dx, dx:], cond[dx:, dx:]
    explained = c_xy.T @ torch.cholesky_solve(c_xy, cholesky(c_xx))
    explained = 0.5 * (explained + explained.T)
    return float(half_logdet_eye_plus(c_yy - explained, explained))


def gaussian_cmi_logdet(cov: torch.Tensor, x_idx, y_idx, z_idx=None) -> float:
    """The same quantity as four log-determinants (the textbook form; reference for tests and the benchmark)."""
    x_idx, y_idx = list(x_idx), list(y_idx)
    z_idx = list(z_idx) if z_idx is not None else []

    def ld(idx):
        return float(logdet(cov[idx][:, idx])) if idx else 0.0

    return 0.5 * (ld(x_idx + z_idx) + ld(y_idx + z_idx) - ld(x_idx + y_idx + z_idx) - ld(z_idx))


def transfer_entropy_logdet(cov: torch.Tensor, n_units: int, f: int, kept: list[int], i: int) -> float:
    """Reference (from scratch) transfer entropy of unit i given the other kept units, by log-det differences.

    `cov` is the regularised joint covariance of the unit features (first n_units * f columns) and the target.
    Used to check the session's one-shot formula and downdates, and as the baseline of the benchmark.
    """
    y_idx = list(range(n_units * f, cov.shape[0]))
    x_idx = list(range(i * f, (i + 1) * f))
    z_idx = [j * f + a for j in kept if j != i for a in range(f)]
    return gaussian_cmi_logdet(cov, x_idx, y_idx, z_idx)


# ------------------------------------------------------------------------------------------------------ estimator
@register_estimator
class GaussianEstimator(CMIEstimator):
    """Closed-form CMI of the Gaussian with the data's (regularised) covariance; chi-squared likelihood-ratio test.

    Options: ridge (sources x and z, relative, default 1e-9), target_ridge (y, relative, default 1e-4),
    ridge_scale ("feature", default: relative to each feature's variance, floored at 1e-6 of the block's mean
    variance; "mean": relative to the block's mean variance), floor (absolute, default 1e-12), refresh_every
    (sessions: recompute P, B, Q from the covariance after this many removals; 0 = never, default), seed (accepted
    like every estimator's and ignored: the closed form draws no random numbers).
    """

    name = "gaussian"
    min_samples = 20
    ridge_regularised = True

    def __init__(self, ridge: float = 1e-9, target_ridge: float = 1e-4, floor: float = 1e-12, refresh_every: int = 0,
                 ridge_scale: str = "feature", seed: int = 0):
        if ridge_scale not in RIDGE_SCALES:
            raise ValueError(f"ridge_scale must be one of {RIDGE_SCALES}, got {ridge_scale!r}")
        self.ridge_scale = ridge_scale
        if min(ridge, target_ridge, floor) < 0:
            raise ValueError("ridge, target_ridge and floor must be >= 0")
        if ridge == 0 and target_ridge == 0 and floor == 0:
            raise ValueError("at least one of ridge, target_ridge, floor must be > 0 to keep covariances invertible")
        self.ridge, self.target_ridge, self.floor = float(ridge), float(target_ridge), float(floor)
        self.refresh_every = int(refresh_every)

    # -- generic CMI
    def cmi(self, x, y, z=None) -> float:
        moments, idx = self._joint_moments(x, y, z)
        return self.cmi_from_moments(moments, *idx)

    def test(self, x, y, z=None, confidence: float = 0.95) -> TestResult:
        moments, idx = self._joint_moments(x, y, z)
        return self.test_from_moments(moments, *idx, confidence=confidence)

    def cmi_from_moments(self, moments: GaussianMoments, x_idx, y_idx, z_idx=None) -> float:
        """I(X;Y|Z) from accumulated joint moments, given the column indices of x, y and z."""
        cov = self.joint_covariance(moments, list(x_idx) + list(z_idx or []), list(y_idx))
        return gaussian_cmi_from_cov(cov, x_idx, y_idx, z_idx)

    def test_from_moments(self, moments, x_idx, y_idx, z_idx=None, confidence: float = 0.95) -> TestResult:
        confidence = check_confidence(confidence)
        phi = self.cmi_from_moments(moments, x_idx, y_idx, z_idx)
        return decide(phi, chi2_p_value(phi, moments.count, len(x_idx) * len(y_idx)), confidence)

    def joint_covariance(self, moments: GaussianMoments, source_idx, target_idx) -> torch.Tensor:
        """Sample covariance with the source ridge on `source_idx` and the target ridge on `target_idx`."""
        cov = moments.covariance()
        blocks = [(list(source_idx), self.ridge), (list(target_idx), self.target_ridge)]
        return regularise(cov, blocks, self.floor, self.ridge_scale)

    # -- sessions
    def session(self, units, target, confidence: float = 0.95) -> "GaussianLayerSession":
        units, y = as_units(units, target)
        n, m, f = units.shape
        if n < 2:
            raise ValueError("need at least 2 samples to estimate a covariance")
        moments = GaussianMoments().update(units.reshape(n, m * f), y)
        return self.session_from_moments(moments, m, f, confidence)

    def session_from_moments(
        self, moments: GaussianMoments, n_units: int, features_per_unit: int = 1, confidence: float = 0.95
    ) -> "GaussianLayerSession":
        """A session from joint moments whose first n_units * features_per_unit columns are the units."""
        width = n_units * features_per_unit
        if moments.dim is None or moments.dim <= width:
            raise ValueError(
                f"moments have {moments.dim} columns; expected the {width} unit features followed by the target"
            )
        ridge = rank_deficient_ridge(moments.count, width, self.ridge)
        cov = regularise(moments.covariance(), [(list(range(width)), ridge),
                                                (list(range(width, moments.dim)), self.target_ridge)],
                         self.floor, self.ridge_scale)
        return GaussianLayerSession(cov, n_units, features_per_unit, moments.count, confidence, self.refresh_every)

    def _joint_moments(self, x, y, z):
        x, y = as_matrix(x, "x"), as_matrix(y, "y")
        z = None if z is None else as_matrix(z, "z")
        n = check_same_n(x=x, y=y, z=z)
        if n < 2:
            raise ValueError("need at least 2 samples to estimate a covariance")
        dx, dy = x.shape[1], y.shape[1]
        dz = 0 if z is None else z.shape[1]
        parts = [x, y] if z is None else [x, y, z]
        moments = GaussianMoments().update(*parts)
        x_idx = list(range(dx))
        y_idx = list(range(dx, dx + dy))
        z_idx = list(range(dx + dy, dx + dy + dz)) if z is not None else None
        return moments, (x_idx, y_idx, z_idx)


use_for_variance_shares(GaussianEstimator)


def rank_deficient_ridge(n_samples: int, n_features: int, ridge: float) -> float:
    """The source ridge of a layer session: `ridge`, unless the units have at least as many features as samples.

    Then their covariance is singular (rank at most n - 1), every target is explained exactly in sample, and with a
    tiny ridge the residual covariance is lost to rounding. The estimator shrinks the units' correlation matrix
    towards the identity with the intensity lambda = d / (d + n) instead, i.e. a relative ridge of d / n (d unit
    features, n samples). Effect: the units are treated as more independent than the sample says, so a unit's
    transfer entropy given the others is closer to its plain MI with the target and fewer units look redundant;
    the decisions are those of a regularised model, and `mipp` warns that at least 2 d samples are needed for
    reliable ones."""
    if n_features < n_samples - 1:
        return ridge
    return max(ridge, n_features / n_samples)


def chi2_p_value(phi: float, n_samples: int, dof: int) -> float:
    """P(chi2_dof >= 2 N phi): the likelihood-ratio test of phi = 0."""
    from scipy import special  # imported on first use, so that `import mipp` stays quick (scipy takes ~1 s)

    return float(special.chdtrc(dof, 2.0 * n_samples * max(phi, 0.0)))  # = scipy.stats.chi2.sf, less overhead


# -------------------------------------------------------------------------------------------------------- session
class GaussianLayerSession(LayerSession):
    """MIPP sweep state for one layer under the Gaussian model; removals are block rank-f downdates.

    Holds P = Cov(X_S)^{-1} and B = Cov(Y, X_S) P at full size (the rows and columns of removed units are zero) and
    Q = Cov(Y | X_S)^{-1}. Cost: O((m f)^3 + d_y (m f)^2 + d_y^3) once, O((m f)^2 f + d_y m f^2 + d_y^2 f) per
    removal (three in-place rank-f updates) and O(d_y^2 f) per single transfer entropy, instead of
    log-determinants of the whole set for every query.
    """

    def __init__(self, cov, n_units: int, f: int, n_samples: int, confidence: float = 0.95, refresh_every: int = 0,
                 x_inverse: torch.Tensor | None = None, target_weights: torch.Tensor | None = None):
        """`x_inverse`: the inverse of the units' block of the equilibrated `cov`, when a session on the same units
        (another target) already computed it (`initial_x_inverse`); it saves the one large inversion.
        `target_weights` (d_y,): what a unit of each target feature's variance is worth in `variance_share_lost`
        (1 each when None), e.g. a following batch norm's gain squared over its running variance, so that the share
        is of the normalised output's variance. Transfer entropies do not depend on it."""
        self._x_inverse = x_inverse
        self.cov = equilibrate(cov)  # the regularised covariance as a correlation matrix (same MI, better numerics)
        self.n_units, self.f, self.n_samples = int(n_units), int(f), int(n_samples)
        self.d_y = cov.shape[0] - self.n_units * self.f
        # the target's own (regularised) variances: they turn correlation-scale residuals back into its scale
        self.target_variance = torch.diagonal(cov)[self.n_units * self.f:].clone()
        worth = self.target_variance if target_weights is None else self.target_variance * target_weights.to(DTYPE)
        self._target_sd, self._target_total = worth.sqrt(), float(worth.sum())
        self.confidence = check_confidence(confidence)
        self.refresh_every = int(refresh_every)
        self.kept = list(range(self.n_units))
        self._is_kept = [True] * self.n_units
        self._removals = 0
        self._factor()

    # -- state
    def _feature_columns(self, units: list[int]) -> torch.Tensor:
        f = self.f
        return (torch.tensor(units, dtype=torch.long)[:, None] * f + torch.arange(f)).reshape(-1)

    def _factor(self) -> None:
        """P, B, Q for the current kept set, from the covariance (used at start and by refresh)."""
        width = self.n_units * self.f
        cols = self._feature_columns(self.kept)
        ycols = torch.arange(width, self.cov.shape[0])
        every = len(self.kept) == self.n_units  # every feature, in order: views, and no scatter into zeros
        if every:
            sxx, syx, syy = self.cov[:width, :width], self.cov[width:, :width], self.cov[width:, width:]
        else:
            sxx = self.cov[cols][:, cols]
            syx = self.cov[ycols][:, cols]
            syy = self.cov[ycols][:, ycols]
        shared = every and self._x_inverse is not None  # another session's inverse: removals must not touch it
        P_kept = self._x_inverse if shared else spd_inverse(sxx)
        self._x_inverse = None
        B_kept = syx @ P_kept
        R = syy - B_kept @ syx.T
        self.Q = spd_inverse(0.5 * (R + R.T))
        if every:
            self.P = P_kept.clone() if shared else P_kept
            self.B = B_kept
            return
        self.P = torch.zeros(width, width, dtype=DTYPE)
        self.P[cols[:, None], cols[None, :]] = P_kept
        self.B = torch.zeros(self.d_y, width, dtype=DTYPE)
        self.B[:, cols] = B_kept

    def initial_x_inverse(self) -> torch.Tensor:
        """The inverse of the units' block with every unit kept (call before any removal)."""
        if len(self.kept) != self.n_units:
            raise ValueError("initial_x_inverse is the inverse with every unit kept: ask before removing any")
        return self.P.clone()

    def _slice(self, i: int) -> slice:
        return slice(i * self.f, (i + 1) * self.f)

    # -- queries
    def unit_mi(self) -> torch.Tensor:
        """I(X_i ; Y) = 1/2 log det Cov(X_i) - 1/2 log det Cov(X_i | Y), all units at once."""
        width = self.n_units * self.f
        sxx = block_diagonal(self.cov[:width, :width], self.f)  # (m, f, f)
        syx = self.cov[width:, :width]
        Ly = cholesky(self.cov[width:, width:])
        U = torch.linalg.solve_triangular(Ly, syx, upper=False)  # (d_y, m f)
        Ub = columns_of(U, self.f)  # (m, d_y, f)
        explained = Ub.transpose(1, 2) @ Ub  # (m, f, f): Cov(X_i,Y) Cov(Y)^{-1} Cov(Y,X_i)
        residual = sxx - explained  # Cov(X_i | Y)
        residual = 0.5 * (residual + residual.transpose(1, 2))
        return half_logdet_eye_plus(residual, explained)

    def _phi(self, sl: slice) -> torch.Tensor | float:
        if self.f == 1:  # one feature per unit (spatial means): the same formula in scalars, without eigvalsh
            b = self.B[:, sl.start]
            return 0.5 * math.log1p(max(float(b @ self.Q.mv(b)), 0.0) / float(self.P[sl.start, sl.start]))
        P_ii = self.P[sl, sl]
        B_i = self.B[:, sl]
        M = B_i.T @ self.Q @ B_i
        return half_logdet_eye_plus(P_ii, 0.5 * (M + M.T))

    def transfer_entropy(self, i: int) -> TestResult:
        i = self._check_kept(i)
        phi = float(self._phi(self._slice(i)))
        p = chi2_p_value(phi, self.n_samples, self.d_y * self.f)
        return decide(phi, p, self.confidence)

    def transfer_entropies(self) -> torch.Tensor:
        out = torch.full((self.n_units,), math.nan, dtype=DTYPE)
        if not self.kept:
            return out
        kept = torch.tensor(self.kept, dtype=torch.long)
        P_blocks = block_diagonal(self.P, self.f)[kept]  # (K, f, f)
        Bb = columns_of(self.B, self.f)[kept]  # (K, d_y, f)
        QBb = columns_of(self.Q @ self.B, self.f)[kept]
        M = Bb.transpose(1, 2) @ QBb
        out[kept] = half_logdet_eye_plus(P_blocks, 0.5 * (M + M.transpose(1, 2)))
        return out

    def p_values(self) -> torch.Tensor:
        """(n_units,) chi-squared p-values of the kept units' transfer entropies (nan for removed)."""
        phi = self.transfer_entropies()
        out = torch.full_like(phi, math.nan)
        kept = torch.tensor(self.kept, dtype=torch.long)
        if len(kept):
            from scipy import stats  # imported on first use, as in chi2_p_value

            stat = (2.0 * self.n_samples * phi[kept].clamp_min(0)).numpy()
            out[kept] = torch.as_tensor(stats.chi2.sf(stat, self.d_y * self.f), dtype=DTYPE)
        return out

    def variance_share_lost(self, i: int) -> float:
        """Share of Cov(Y)'s trace that the kept units could no longer explain without unit i (see LayerSession).

        Removing block I raises the residual covariance by B_I P_II^{-1} B_I^T (the Schur complement that `remove`
        applies), so the share is trace(D B_I P_II^{-1} B_I^T D) / trace(D^2) with D^2 = diag(target_variance)
        (times the target weights): the correlation-scale residual weighted back by each target feature's own
        variance. The units' scales
        cancel; the ridges enter only as their tiny relative amounts (the target ridge inflates the denominator by
        a factor 1 + target_ridge).
        """
        sl = self._slice(self._check_kept(i))
        if self.f == 1:  # the same in scalars
            scaled = self.B[:, sl.start] * self._target_sd  # (d_y,): D B_I
            return max(float(scaled @ scaled) / float(self.P[sl.start, sl.start]), 0.0) / self._target_total
        scaled = self.B[:, sl] * self._target_sd[:, None]  # (d_y, f): D B_I
        lost = torch.trace(scaled @ torch.linalg.solve(self.P[sl, sl], scaled.T))
        return float(lost.clamp_min(0.0)) / self._target_total

    # -- removal
    def remove(self, i: int) -> None:
        """Drop unit i: in-place rank-f updates of P (Schur complement), B and Q (Woodbury)."""
        i = self._check_kept(i)
        sl = self._slice(i)
        P_col = self.P[:, sl].clone()  # (m f, f); zero in the rows of removed units
        P_ii = P_col[sl].clone()
        B_i = self.B[:, sl].clone()
        inverse = torch.reciprocal if self.f == 1 else spd_inverse  # a 1 x 1 block's inverse is exact
        C = inverse(P_ii)
        # inverse of Cov(X_{S\i}): P - P[:, i] P_ii^{-1} P[i, :]; coefficients without unit i: B - B_i P_ii^{-1} P[i, :]
        self.P.addmm_(P_col @ C, P_col.T, alpha=-1.0)
        self.B.addmm_(B_i @ C, P_col.T, alpha=-1.0)
        # Woodbury: (R + B_i P_ii^{-1} B_i^T)^{-1} = Q - Q B_i (P_ii + B_i^T Q B_i)^{-1} B_i^T Q
        QB = self.Q @ B_i
        self.Q.addmm_(QB @ inverse(P_ii + B_i.T @ QB), QB.T, alpha=-1.0)
        self.P[sl, :] = 0.0
        self.P[:, sl] = 0.0
        self.B[:, sl] = 0.0
        self.kept.remove(i)
        self._is_kept[i] = False
        self._removals += 1
        if self.refresh_every and self._removals % self.refresh_every == 0:
            self._factor()
