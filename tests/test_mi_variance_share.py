"""The price of a removal in MIPP's budget mode: the share of the target's variance the kept units can no longer
explain. Checked against explicit least-squares regressions, for invariance to the ridges and to the target's scale
and width, for additivity along a removal sequence, and for the fallback other estimators use."""
import pytest
import torch

from mipp.mi import get_estimator
from mipp.mi.gaussian import GaussianEstimator


def layer(n=3000, m=6, f=1, d_y=4, seed=0):
    """Correlated units (n, m, f) with very different scales and a noisy linear target (n, d_y)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, m * f, generator=g, dtype=torch.float64) @ torch.randn(m * f, m * f, generator=g,
                                                                             dtype=torch.float64)
    scales = torch.logspace(-2, 2, m * f, dtype=torch.float64)
    y = x @ torch.randn(m * f, d_y, generator=g, dtype=torch.float64)
    x = x * scales
    y = y * torch.linspace(0.5, 3.0, d_y, dtype=torch.float64) + 0.5 * torch.randn(n, d_y, generator=g,
                                                                                   dtype=torch.float64)
    return x.reshape(n, m, f), y


def residual_trace(x, y, units, f):
    """trace of Cov(Y | X_units) from an explicit least-squares regression on the centred data."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    cols = [u * f + a for u in units for a in range(f)]
    if cols:
        beta = torch.linalg.lstsq(xc[:, cols], yc).solution
        yc = yc - xc[:, cols] @ beta
    return float((yc * yc).sum() / (y.shape[0] - 1))


@pytest.mark.parametrize("f", [1, 3])
def test_shares_match_regression_and_add_up_along_removals(f):
    units, y = layer(m=6, f=f)
    n, m, _ = units.shape
    x = units.reshape(n, m * f)
    total = float(y.var(0).sum())
    session = GaussianEstimator().session(units, y)
    kept, summed = list(range(m)), 0.0
    for unit in (4, 0, 2, 5, 1):
        share = session.variance_share_lost(unit)
        rest = [u for u in kept if u != unit]
        direct = (residual_trace(x, y, rest, f) - residual_trace(x, y, kept, f)) / total
        assert share == pytest.approx(direct, rel=2e-3, abs=1e-9)
        session.remove(unit)
        kept, summed = rest, summed + share
        lost_by_set = (residual_trace(x, y, kept, f) - residual_trace(x, y, range(m), f)) / total
        assert summed == pytest.approx(lost_by_set, rel=2e-3)


def test_share_does_not_depend_on_ridges():
    units, y = layer()
    shares = [
        [GaussianEstimator(ridge=ridge, target_ridge=target_ridge).session(units, y).variance_share_lost(i)
         for i in range(units.shape[1])]
        for ridge, target_ridge in ((1e-9, 1e-4), (1e-5, 1e-2))
    ]
    assert torch.allclose(torch.tensor(shares[0]), torch.tensor(shares[1]), rtol=0.03)


def test_share_does_not_depend_on_target_scale_or_width():
    units, y = layer()
    base = GaussianEstimator().session(units, y)
    scaled = GaussianEstimator().session(units, 1e3 * y)
    doubled = GaussianEstimator().session(units, torch.cat([y, y], 1))  # the same target, twice as wide
    for i in range(units.shape[1]):
        expected = base.variance_share_lost(i)
        assert scaled.variance_share_lost(i) == pytest.approx(expected, rel=1e-6)
        assert doubled.variance_share_lost(i) == pytest.approx(expected, rel=1e-3)


def test_target_features_count_with_their_own_variance():
    """A target feature 100x larger weighs 10,000x more: the share is in the target's scale, not per feature."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, 2, generator=g, dtype=torch.float64)
    noise = 0.1 * torch.randn(4000, 2, generator=g, dtype=torch.float64)
    y = torch.stack([100 * x[:, 0], x[:, 1]], 1) + noise * torch.tensor([100.0, 1.0], dtype=torch.float64)
    session = GaussianEstimator().session(x, y)
    assert session.variance_share_lost(0) == pytest.approx(1e4 / (1e4 + 1) / 1.01, rel=0.02)
    assert session.variance_share_lost(1) == pytest.approx(1 / (1e4 + 1) / 1.01, rel=0.05)


def test_other_estimators_measure_the_share_with_a_gaussian_companion():
    units, y = layer(n=400, m=4)
    gaussian = GaussianEstimator().session(units, y)
    ksg = get_estimator("ksg", n_permutations=9, target_components=2).session(units, y)
    for session in (gaussian, ksg):
        session.remove(1)
    for i in (0, 2, 3):  # measured against the full target (not KSG's principal components), after the removal
        assert ksg.variance_share_lost(i) == pytest.approx(gaussian.variance_share_lost(i), rel=1e-9)
    with pytest.raises(ValueError, match="already removed"):
        ksg.variance_share_lost(1)
