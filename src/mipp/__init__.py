"""mipp: structured pruning that preserves mutual information between adjacent layers.

Method: Westphal, Hailes & Musolesi, "Mutual Information Preserving Neural Network Pruning" (arXiv 2411.00147).
"""
__version__ = "0.1.0"

from mipp.api import prune, select_plan  # noqa: E402
from mipp.methods import Budget, get_method, method_names  # noqa: E402
from mipp.plan import Plan  # noqa: E402
from mipp.units import find_units  # noqa: E402

__all__ = ["Budget", "Plan", "find_units", "get_method", "method_names", "prune", "select_plan", "__version__"]
