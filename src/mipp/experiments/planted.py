"""The planted-redundancy network now lives in the model zoo as model "planted" (mipp.models.planted); these names
stay importable from here for code written against the experiments package."""
from mipp.models.planted import TRUTH, planted_inputs, planted_network

__all__ = ["TRUTH", "planted_inputs", "planted_network"]
