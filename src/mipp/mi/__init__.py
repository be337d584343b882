"""Conditional mutual-information estimators for MIPP, behind one interface (`CMIEstimator`, `LayerSession`).

- "gaussian" (default): closed form from streaming covariances; one-shot transfer entropies of a whole layer and
  rank-one downdates on removal; chi-squared likelihood-ratio test. Exact for its model class and fast.
- "ksg": Kraskov / Frenzel-Pompe nearest-neighbour estimates, vectorised and chunked in torch; permutation test.
- "proxy": the paper's estimator, held-out loss increase of a small MLP when a unit is masked; t-test over repeats.

`get_estimator(name, **options)` builds one by name; options are the estimator class's constructor arguments.
"""
from __future__ import annotations

from .base import CMIEstimator, GenericLayerSession, LayerSession, TestResult
from .gaussian import GaussianEstimator, GaussianLayerSession, GaussianMoments
from .ksg import KSGEstimator
from .proxy import ProxyEstimator, ProxyLayerSession

ESTIMATOR_NAMES = ("gaussian", "ksg", "proxy")
_CLASSES = {"gaussian": GaussianEstimator, "ksg": KSGEstimator, "proxy": ProxyEstimator}


def get_estimator(name: str = "gaussian", **options) -> CMIEstimator:
    """The estimator called `name` ("gaussian", "ksg" or "proxy"), built with `options`."""
    key = str(name).lower()
    if key not in _CLASSES:
        raise ValueError(f"unknown MI estimator {name!r}; choose one of {', '.join(ESTIMATOR_NAMES)}")
    try:
        return _CLASSES[key](**options)
    except TypeError as err:
        raise ValueError(f"bad options for the {key!r} estimator: {err}") from err


__all__ = [
    "CMIEstimator",
    "ESTIMATOR_NAMES",
    "GaussianEstimator",
    "GaussianLayerSession",
    "GaussianMoments",
    "GenericLayerSession",
    "KSGEstimator",
    "LayerSession",
    "ProxyEstimator",
    "ProxyLayerSession",
    "TestResult",
    "get_estimator",
]
