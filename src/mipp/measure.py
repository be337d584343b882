"""Counting what a model costs: parameters, multiply-accumulates (MACs), and what a Plan would leave.

One counter for every method, so that "50% of MACs removed" means the same thing everywhere. MACs are those of
convolutions and linear layers (the standard convention; norms and activations are negligible).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from mipp.plan import Plan
from mipp.units import WEIGHTED_READERS, UnitGraph, layer_macs


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def module_macs(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """MACs per conv / linear module for ONE sample of the example input's shape."""
    macs: dict[str, int] = {}

    def hook(module, inputs, output, name):
        macs[name] = macs.get(name, 0) + layer_macs(module, output)

    handles = [m.register_forward_hook(lambda m, i, o, n=n: hook(m, i, o, n))
               for n, m in model.named_modules() if isinstance(m, WEIGHTED_READERS)]
    try:
        with torch.no_grad():
            was_training = model.training
            model.eval()
            model(example_input[:1])
            model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return macs


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    return sum(module_macs(model, example_input).values())


@dataclass
class CostModel:
    """Predicts the parameters and MACs left by a Plan without touching the model.

    Each weight shrinks by the kept fraction of its output channels (dim 0) times that of its input channels
    (dim 1), which is exact for dense convolutions and linear layers.
    """

    param_shapes: dict[str, tuple[str, tuple[int, ...]]]  # parameter name -> (module name, shape)
    macs: dict[str, int]
    units: UnitGraph

    @classmethod
    def build(cls, model: nn.Module, units: UnitGraph) -> "CostModel":
        """The cost model of `model`, from the MACs its trace recorded (no further forward pass)."""
        shapes = {}
        for module_name, module in model.named_modules():
            for pname, param in module.named_parameters(recurse=False):
                shapes[f"{module_name}.{pname}" if module_name else pname] = (module_name, tuple(param.shape))
        return cls(shapes, dict(units.module_macs), units)

    def __post_init__(self):
        self._widths = {}  # (module name, dim) -> number of channels along that dim
        for module_name, shape in self.param_shapes.values():
            for dim in range(min(2, len(shape))):
                self._widths.setdefault((module_name, dim), shape[dim])

    @property
    def total_params(self) -> int:
        return sum(_numel(s) for _, s in self.param_shapes.values())

    @property
    def total_macs(self) -> int:
        return sum(self.macs.values())

    def kept_fractions(self, kept: dict[str, list[int]] | dict[str, torch.Tensor]) -> dict[tuple[str, int], float]:
        """(module name, dim) -> fraction of that dim's channels kept, for modules a plan touches."""
        fractions = {}
        for group in self.units.groups:
            if group.key not in kept:
                continue
            keep_mask = torch.zeros(group.size, dtype=torch.bool)
            keep_mask[torch.as_tensor(kept[group.key], dtype=torch.long)] = True
            for coupling in group.couplings:
                dim = 0 if coupling.kind == "out" else 1
                width = self._widths[(coupling.module_name, dim)]
                dropped = (~keep_mask[coupling.unit]).sum().item()
                previous = fractions.get((coupling.module_name, dim), 1.0)
                fractions[(coupling.module_name, dim)] = previous - dropped / width
        return fractions

    def predict(self, kept: dict[str, list[int]]) -> tuple[int, int]:
        """(parameters, MACs) of the model once `kept` is applied."""
        frac = self.kept_fractions(kept)
        params = 0.0
        for module_name, shape in self.param_shapes.values():
            factor = frac.get((module_name, 0), 1.0)
            if len(shape) >= 2:
                factor *= frac.get((module_name, 1), 1.0)
            params += _numel(shape) * factor
        macs = sum(m * frac.get((name, 0), 1.0) * frac.get((name, 1), 1.0) for name, m in self.macs.items())
        return round(params), round(macs)

    def fractions_removed(self, kept: dict[str, list[int]]) -> dict[str, float]:
        params, macs = self.predict(kept)
        units_total = self.units.total_units
        units_kept = sum(len(kept.get(g.key, range(g.size))) for g in self.units.groups)
        return {
            "units": 1 - units_kept / units_total,
            "params": 1 - params / self.total_params,
            "macs": 1 - macs / self.total_macs,
        }

    def plan_stats(self, plan: Plan) -> dict:
        params, macs = self.predict(plan.kept)
        return {
            "units_total": self.units.total_units, "units_kept": plan.units_kept,
            "params_total": self.total_params, "params_kept": params,
            "macs_total": self.total_macs, "macs_kept": macs,
            **{f"{k}_removed": v for k, v in self.fractions_removed(plan.kept).items()},
        }


def latency_ms(model: nn.Module, example_input: torch.Tensor, *, batch_size: int = 1, repeats: int = 20) -> float:
    """Median wall time of one forward pass at `batch_size`, in milliseconds."""
    batch = example_input[:1].expand(batch_size, *example_input.shape[1:]).contiguous()
    model.eval()
    times = []
    with torch.no_grad():
        for i in range(repeats + 3):
            start = time.perf_counter()
            model(batch)
            if i >= 3:
                times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
