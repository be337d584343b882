"""mipp: structured pruning that preserves mutual information between adjacent layers.

Method: Westphal, Hailes & Musolesi, "Mutual Information Preserving Neural Network Pruning" (arXiv 2411.00147).
"""
from mipp.version import __version__
from mipp.api import prune, select_plan
from mipp.export import export_onnx, export_torchscript
from mipp.methods import Budget, get_method, method_names
from mipp.plan import Plan
from mipp.recalibrate import recalibrate_batch_norm
from mipp.reconstruct import reconstruction_statistics, refit_readers, refit_sequentially
from mipp.surgery import SurgeryError, apply_plan
from mipp.units import find_units

__all__ = ["Budget", "Plan", "SurgeryError", "apply_plan", "export_onnx", "export_torchscript", "find_units",
           "get_method", "method_names", "prune", "recalibrate_batch_norm", "reconstruction_statistics",
           "refit_readers", "refit_sequentially", "select_plan", "__version__"]
