"""Conditional mutual-information estimators for MIPP, behind one interface (`CMIEstimator`, `LayerSession`).

- "gaussian" (default): closed form from streaming covariances; one-shot transfer entropies of a whole layer and
  rank-one downdates on removal; chi-squared likelihood-ratio test. Exact for its model class and fast.
- "ksg": Kraskov / Frenzel-Pompe nearest-neighbour estimates, vectorised and chunked in torch; permutation test.
- "proxy": the paper's estimator, held-out loss increase of a small MLP when a unit is masked; t-test over repeats.

`get_estimator(name, **options)` builds one by name; options are the estimator class's constructor arguments (every
estimator takes `seed`). A new estimator subclasses `CMIEstimator`, decorates itself with `@register_estimator`,
and is imported below.
"""
from __future__ import annotations

from .base import CMIEstimator, GenericLayerSession, LayerSession, TestResult
from .gaussian import GaussianEstimator, GaussianLayerSession, GaussianMoments
from .ksg import KSGEstimator
from .proxy import ProxyEstimator, ProxyLayerSession
from .registry import ESTIMATORS, estimator_class, estimator_names, get_estimator, register_estimator

ESTIMATOR_NAMES = tuple(estimator_names())  # the built-in estimators

__all__ = [
    "CMIEstimator",
    "ESTIMATORS",
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
    "estimator_class",
    "estimator_names",
    "get_estimator",
    "register_estimator",
]
