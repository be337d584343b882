"""Loss-proxy estimator (the paper's): its nats-valued loss increase approaches the analytic MI/CMI of linear
Gaussians, cross-entropy targets work, results are deterministic, and the session adopts re-fits on removal."""
import math

import numpy as np
import pytest

from mipp.mi import ProxyEstimator


@pytest.mark.parametrize("rho", [0.5, 0.9])
def test_proxy_mi_approaches_the_gaussian_value(rho):
    n = 1500
    S = np.array([[1.0, rho], [rho, 1.0]])
    X = np.random.default_rng(1).standard_normal((n, 2)) @ np.linalg.cholesky(S).T
    result = ProxyEstimator(repeats=3).test(X[:, :1], X[:, 1:])
    assert result.estimate == pytest.approx(-0.5 * math.log(1 - rho**2), abs=0.1)
    assert result.significant


def test_proxy_cmi_approaches_the_gaussian_value_and_rejects_a_redundant_input():
    rng = np.random.default_rng(2)
    n = 1500
    z = rng.standard_normal((n, 2))
    x = z[:, :1] + rng.standard_normal((n, 1))
    y = x + z[:, 1:] + rng.standard_normal((n, 1))  # Var(y|z) = 2, Var(y|x,z) = 1
    est = ProxyEstimator(repeats=3)
    assert est.cmi(x, y, z) == pytest.approx(0.5 * math.log(2), abs=0.1)
    copy = 2 * x - 1
    assert not est.test(copy, y, np.c_[x, z]).significant


def test_cross_entropy_target():
    rng = np.random.default_rng(3)
    n = 1500
    x = rng.standard_normal((n, 1))
    labels = (x[:, 0] + 0.3 * rng.standard_normal(n) > 0).astype(np.int64)
    est = ProxyEstimator(repeats=3)
    informative = est.test(x, labels)
    assert informative.significant and informative.estimate > 0.3  # H(label) = log 2 = 0.69 nats at most
    assert not est.test(rng.standard_normal((n, 1)), labels).significant


def test_results_are_deterministic_for_a_seed():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((400, 2)), rng.standard_normal((400, 1))
    y = y + x[:, :1]
    a = ProxyEstimator(repeats=2, max_epochs=20, seed=5).test(x[:, :1], y, x[:, 1:])
    b = ProxyEstimator(repeats=2, max_epochs=20, seed=5).test(x[:, :1], y, x[:, 1:])
    assert a == b


def test_session_scores_all_units_and_adopts_refits_on_removal():
    rng = np.random.default_rng(5)
    n = 1000
    units = rng.standard_normal((n, 4, 2))  # 4 units of 2 features each
    y = units[:, 0, :1] + units[:, 1, 1:] - units[:, 0, 1:] + 0.3 * rng.standard_normal((n, 1))
    session = ProxyEstimator(repeats=3).session(units, y)
    te = session.transfer_entropies()
    assert te.shape == (4,) and te[0] > 0.3 and te[1] > 0.3 and abs(te[2]) < 0.15 and abs(te[3]) < 0.15
    mi = session.unit_mi()
    assert mi[0] > 0.2 and mi[1] > 0.1 and abs(mi[2]) < 0.1
    result = session.transfer_entropy(3)
    assert not result.significant
    session.remove(3)
    assert session.kept == [0, 1, 2]
    after = session.transfer_entropies()
    assert math.isnan(after[3].item()) and after[0] > 0.3
    assert session.transfer_entropy(0).significant


def test_invalid_options_and_inputs():
    with pytest.raises(ValueError, match="repeats"):
        ProxyEstimator(repeats=1)
    with pytest.raises(ValueError, match="loss"):
        ProxyEstimator(loss="hinge")
    with pytest.raises(ValueError, match="too few"):
        ProxyEstimator().cmi(np.zeros((4, 1)), np.zeros((4, 1)))
    with pytest.raises(ValueError, match="class labels"):
        ProxyEstimator(loss="ce").cmi(np.zeros((40, 1)), np.linspace(0, 1, 40))
