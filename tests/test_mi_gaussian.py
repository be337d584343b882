"""Gaussian CMI estimator: streaming moments, analytic MI/CMI of correlated Gaussians, the one-shot session formula
and its downdates against log-determinant differences, the chi-squared test, and degenerate inputs."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from mipp.mi import ESTIMATOR_NAMES, GaussianEstimator, GaussianMoments, get_estimator
from mipp.mi.gaussian import gaussian_cmi_logdet, transfer_entropy_logdet


def logdet_np(S, idx):
    return np.linalg.slogdet(S[np.ix_(idx, idx)])[1] if idx else 0.0


def true_cmi(S, x, y, z):
    """Analytic I(X;Y|Z) of a Gaussian with covariance S, from log-determinants (numpy, independent of mipp)."""
    return 0.5 * (logdet_np(S, x + z) + logdet_np(S, y + z) - logdet_np(S, x + y + z) - logdet_np(S, z))


def random_cov(d, strength, seed):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((d, d))
    S = A @ A.T / d * strength + np.eye(d)
    scales = np.exp(rng.uniform(-3, 3, d))  # features on very different scales
    return S * np.outer(scales, scales)


def sample(S, n, seed):
    return np.random.default_rng(seed).standard_normal((n, S.shape[0])) @ np.linalg.cholesky(S).T


def tolerance(n, dof):
    """Allowed |estimate - truth|: about 3 standard deviations plus the plug-in bias; shrinks as n grows."""
    return 3.0 / math.sqrt(n) + dof / n


# ------------------------------------------------------------------------------------------------------ moments
def test_streaming_moments_match_numpy_and_merge_across_processes():
    rng = np.random.default_rng(0)
    data = rng.standard_normal((1000, 6)) * [1, 10, 0.1, 1, 1, 1] + 1e4  # large means: precision matters
    full = GaussianMoments().update(data)
    batches = [GaussianMoments().update(data[i : i + 137]) for i in range(0, 1000, 137)]
    merged = batches[0]
    for b in batches[1:]:
        merged = merged + b
    ref = np.cov(data, rowvar=False)
    for m in (full, merged):
        assert m.count == 1000
        np.testing.assert_allclose(m.covariance().numpy(), ref, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(m.mean.numpy(), data.mean(0), rtol=1e-12)
    count, total, outer = merged.as_sums()
    back = GaussianMoments.from_sums(count, total, outer)
    # raw sums cancel digits when means are large (1e4 here); the pairwise form above does not
    np.testing.assert_allclose(back.covariance().numpy(), ref, rtol=1e-6, atol=1e-7)


def test_moments_accept_float32_and_several_parts():
    rng = np.random.default_rng(1)
    a = torch.tensor(rng.standard_normal((200, 3)), dtype=torch.float32)
    b = torch.tensor(rng.standard_normal((200, 2)), dtype=torch.float32)
    m = GaussianMoments().update(a, b)
    assert m.mean.dtype == torch.float64 and m.dim == 5
    ref = np.cov(np.c_[a.double().numpy(), b.double().numpy()], rowvar=False)
    np.testing.assert_allclose(m.covariance().numpy(), ref, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------- analytic values
@pytest.mark.parametrize("rho", [0.3, 0.6, 0.9])
def test_mi_of_bivariate_gaussian_closed_form(rho):
    truth = -0.5 * math.log(1 - rho**2)
    S = np.array([[1.0, rho], [rho, 1.0]])
    est = GaussianEstimator()
    for n in (2000, 20000, 200000):
        X = sample(S, n, seed=n)
        assert abs(est.cmi(X[:, :1], X[:, 1:]) - truth) < tolerance(n, 1)


@pytest.mark.parametrize(
    "dx, dy, dz, strength",
    [(3, 2, 0, 0.5), (2, 3, 12, 2.0), (1, 4, 20, 1.0), (4, 6, 30, 1.0)],
)
def test_cmi_of_correlated_gaussians_matches_log_dets(dx, dy, dz, strength):
    d = dx + dy + dz
    S = random_cov(d, strength, seed=d)
    x, y, z = list(range(dx)), list(range(dx, dx + dy)), list(range(dx + dy, d))
    truth = true_cmi(S, x, y, z)
    assert truth > 0.005  # a real dependence, not a test of zero
    est = GaussianEstimator()
    errors = []
    for n in (2000, 20000, 200000):
        X = sample(S, n, seed=100 + n)
        value = est.cmi(X[:, x], X[:, y], X[:, z] if dz else None)
        errors.append(abs(value - truth))
        assert errors[-1] < tolerance(n, dx * dy), (n, value, truth)
    assert errors[-1] < tolerance(2000, dx * dy) / 5  # the tolerance really tightens


# ------------------------------------------------------------------------------------------------------- session
def correlated_units(n, m, f, dy, seed):
    g = torch.Generator().manual_seed(seed)
    D = m * f + dy
    A = torch.randn(D, D, generator=g, dtype=torch.float64)
    C = A @ A.T / D + 0.2 * torch.eye(D, dtype=torch.float64)
    data = torch.randn(n, D, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(C).T
    return data[:, : m * f].reshape(n, m, f), data[:, m * f :]


@pytest.mark.parametrize("f", [1, 2, 3])
def test_session_formula_equals_log_det_differences_through_downdates(f):
    m, dy = 14, 5
    units, y = correlated_units(3000, m, f, dy, seed=f)
    session = GaussianEstimator().session(units, y)
    rng = np.random.default_rng(f)
    for step in range(m - 1):
        te = session.transfer_entropies()
        for i in range(m):
            if i in session.kept:
                ref = transfer_entropy_logdet(session.cov, m, f, session.kept, i)
                assert te[i].item() == pytest.approx(ref, rel=1e-7, abs=1e-10)
                assert session.transfer_entropy(i).estimate == pytest.approx(te[i].item(), rel=1e-10, abs=1e-14)
            else:
                assert math.isnan(te[i].item())
        session.remove(int(rng.choice(session.kept)))
    assert len(session.kept) == 1


def test_unit_mi_and_generic_cmi_agree_with_session():
    m, f, dy = 6, 2, 3
    units, y = correlated_units(2000, m, f, dy, seed=7)
    est = GaussianEstimator()
    session = est.session(units, y)
    width = m * f
    y_idx = list(range(width, width + dy))
    for i in range(m):
        ref = gaussian_cmi_logdet(session.cov, list(range(i * f, i * f + f)), y_idx)
        assert session.unit_mi()[i].item() == pytest.approx(ref, rel=1e-8)
    rest = units[:, 1:, :].reshape(2000, -1)
    assert est.cmi(units[:, 0, :], y, rest) == pytest.approx(session.transfer_entropies()[0].item(), rel=1e-8)


def test_session_from_merged_moments_equals_session_on_all_data():
    units, y = correlated_units(1200, 5, 1, 2, seed=3)
    est = GaussianEstimator()
    flat = units.reshape(1200, -1)
    parts = [GaussianMoments().update(flat[i : i + 400], y[i : i + 400]) for i in range(0, 1200, 400)]
    streamed = est.session_from_moments(parts[0] + parts[1] + parts[2], n_units=5)
    direct = est.session(units, y)
    torch.testing.assert_close(streamed.transfer_entropies(), direct.transfer_entropies(), rtol=1e-9, atol=1e-12)
    assert streamed.n_samples == 1200


def test_refresh_gives_same_values_as_downdates():
    units, y = correlated_units(1000, 10, 1, 4, seed=11)
    a = GaussianEstimator().session(units, y)
    b = GaussianEstimator(refresh_every=2).session(units, y)
    for i in (3, 7, 0, 5):
        a.remove(i)
        b.remove(i)
    torch.testing.assert_close(a.transfer_entropies(), b.transfer_entropies(), rtol=1e-8, atol=1e-12, equal_nan=True)


# --------------------------------------------------------------------------------------------------- the chi2 test
def test_chi_squared_test_is_calibrated_under_the_null():
    est = GaussianEstimator()
    g = torch.Generator().manual_seed(0)
    p_values = []
    for _ in range(300):
        data = torch.randn(400, 6, generator=g, dtype=torch.float64)
        x, y, z = data[:, :1], data[:, 1:3], data[:, 3:]
        z = z + 0.5 * y.sum(1, keepdim=True)  # z depends on y, x independent of both
        p_values.append(est.test(x, y, z).p_value)
    p_values = np.array(p_values)
    assert 0.02 <= (p_values < 0.05).mean() <= 0.09
    assert stats.kstest(p_values, "uniform").pvalue > 0.001


def test_dependent_unit_is_significant_with_the_right_degrees_of_freedom():
    units, y = correlated_units(2000, 4, 2, 3, seed=5)
    session = GaussianEstimator().session(units, y, confidence=0.99)
    result = session.transfer_entropy(0)
    expected_p = stats.chi2.sf(2 * 2000 * result.estimate, 3 * 2)
    assert result.p_value == pytest.approx(expected_p, rel=1e-9, abs=1e-300)
    assert result.significant == (result.p_value < 0.01)


# ------------------------------------------------------------------------------------------------ degenerate input
@pytest.mark.parametrize("n", [2000, 20000])
@pytest.mark.parametrize("deterministic", [False, True])
def test_exact_copies_and_constant_units_are_far_below_the_threshold(n, deterministic):
    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, 4, generator=g, dtype=torch.float64)
    weights = torch.randn(4, 3, generator=g, dtype=torch.float64)
    y = a @ weights  # deterministic: y is an exact linear function of the units (logits)
    if not deterministic:
        y = y + 0.5 * torch.randn(n, 3, generator=g, dtype=torch.float64)
    copy, linear, const = a[:, :1].clone(), 3 * a[:, 1:2] - 2, torch.full((n, 1), 7.0, dtype=torch.float64)
    units = torch.cat([a, copy, linear, const], dim=1).float()  # float32 activations
    session = GaussianEstimator().session(units, y)
    threshold = stats.chi2.ppf(0.95, df=3)
    phi = session.transfer_entropies()
    assert torch.isfinite(phi).all()
    for i in (4, 5, 6):  # copy, linear copy, constant
        result = session.transfer_entropy(i)
        assert 2 * n * result.estimate < 0.05 * threshold
        assert not result.significant
    assert session.transfer_entropy(2).significant and session.transfer_entropy(3).significant


def test_more_dimensions_than_samples_stays_finite():
    g = torch.Generator().manual_seed(0)
    units = torch.randn(50, 120, generator=g)
    units[:, 60:] = units[:, :60]  # and exact copies
    units[:, 0] = 0.0
    y = units[:, :10].double() @ torch.randn(10, 8, generator=g, dtype=torch.float64)
    session = GaussianEstimator().session(units, y)
    for values in (session.transfer_entropies(), session.unit_mi()):
        assert torch.isfinite(values).all() and (values >= 0).all()
    for i in range(0, 120, 7):
        session.remove(i)
    assert torch.isfinite(session.transfer_entropies()[session.kept]).all()
    assert math.isfinite(GaussianEstimator().cmi(units[:, :70], y, units[:, 70:]))


def test_low_rank_layer_with_dead_units_and_a_wide_target():
    """Activations of a net fed rank-8 inputs: 768 features from 512 samples, dead units, constant target dims.

    Regression: with features on such different scales (zero next to O(1) variances) the unregularised scales made
    Cov(Y | X_S) lose positive definiteness; the session now works on the equilibrated (correlation) matrix.
    """
    g = torch.Generator().manual_seed(0)
    n, m, dy = 512, 768, 750
    units = torch.relu(torch.randn(n, 8, generator=g) @ torch.randn(8, m, generator=g))
    units[:, :3] = 0.0
    y = torch.relu(units @ torch.randn(m, dy, generator=g) / m**0.5 - 0.5)
    y[:, :5] = 1.0
    session = GaussianEstimator().session(units.reshape(n, 128, 6), y)
    phi = session.transfer_entropies()
    assert torch.isfinite(phi).all() and (phi >= 0).all()
    assert torch.isfinite(session.unit_mi()).all()
    for i in range(0, 128, 2):
        session.remove(i)
    assert torch.isfinite(session.transfer_entropies()[session.kept]).all()


def test_invalid_inputs_raise_clear_errors():
    est = GaussianEstimator()
    x = np.random.default_rng(0).standard_normal((100, 2))
    with pytest.raises(ValueError, match="different numbers of samples"):
        est.cmi(x, x[:50])
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        est.cmi(bad, x)
    with pytest.raises(ValueError, match="confidence"):
        est.test(x[:, :1], x[:, 1:], confidence=1.5)
    session = est.session(x[:, :, None], x[:, :1])
    session.remove(0)
    with pytest.raises(ValueError, match="already removed"):
        session.transfer_entropy(0)


def test_get_estimator_by_name():
    assert ESTIMATOR_NAMES == ("gaussian", "ksg", "proxy")
    assert get_estimator("gaussian").name == "gaussian"
    assert get_estimator("ksg", k=5).k == 5
    assert get_estimator("proxy", repeats=3).repeats == 3
    with pytest.raises(ValueError, match="gaussian, ksg, proxy"):
        get_estimator("histogram")
    with pytest.raises(ValueError, match="bad options"):
        get_estimator("gaussian", bandwidth=2)
