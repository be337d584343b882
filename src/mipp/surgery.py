"""Apply a Plan: physical removal of units, and the masked equivalent used to check it.

Removal goes through torch-pruning, which slices every coupled tensor (weights, biases, batch-norm statistics, the
readers' input channels, residual partners). Masking zeroes the readers' input weights of removed units: the
masked model computes exactly what the pruned one does, which is how tests check surgery.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from mipp.plan import Plan
from mipp.units import UnitGraph, example_input_for, find_units


def plan_input(model: nn.Module, plan: Plan, example_input: torch.Tensor | None) -> torch.Tensor:
    """The batch to trace `model` with: the one given, else zeros of the Plan's recorded input shape."""
    if example_input is not None:
        return example_input
    if plan.example_shape:
        return torch.zeros(*plan.example_shape)
    return example_input_for(model, None)


def apply_plan(model: nn.Module, plan: Plan, example_input: torch.Tensor | None = None,
               units: UnitGraph | None = None) -> nn.Module:
    """Make `model` physically smaller according to `plan` (in place); returns the model.

    `units` is the trace of this very model (`find_units(model, ...)`), reused so that a prune call traces once;
    without it the model is traced here."""
    if units is None:
        units = find_units(model, plan_input(model, plan, example_input))
    check_plan_matches(plan, units)
    check_trace_is_current(model, units)
    check_no_layer_emptied(model, plan, units)
    graph = units.dependency_graph
    for key in plan.kept:
        removed = plan.removed(key)
        if not removed:
            continue
        root = model.get_submodule(key)
        prune_out = graph.get_pruner_of_module(root).prune_out_channels
        graph.get_pruning_group(root, prune_out, removed).prune()
    return model


def check_no_layer_emptied(model: nn.Module, plan: Plan, units: UnitGraph) -> None:
    """A group may span several layers, each holding some of its units (the branches of a concatenation that a
    residual addition joins): a plan keeping units of the group may still remove every channel of one of them, which
    would leave a zero-width layer. Refused before the model changes."""
    removed: dict[tuple[str, str], set[int]] = {}
    for group in units.groups:
        if group.key not in plan.kept:
            continue
        gone = torch.tensor(plan.removed(group.key), dtype=torch.long)
        for coupling in group.couplings:
            channels = coupling.index[torch.isin(coupling.unit, gone)].tolist()
            removed.setdefault((coupling.module_name, coupling.kind), set()).update(channels)
            module = model.get_submodule(coupling.module_name)
            width = _channels(module, coupling.kind)
            if width is not None and len(removed[coupling.module_name, coupling.kind]) >= width:
                raise ValueError(
                    f"the plan removes every {'output' if coupling.kind == 'out' else 'input'} channel of "
                    f"{coupling.module_name!r} (it holds only some of the units of group {group.key!r}, e.g. one "
                    "branch of a concatenation joined by a residual addition): a layer cannot shrink to zero width; "
                    "lower the budget, or keep at least one of that layer's units"
                )


def _channels(module: nn.Module, kind: str) -> int | None:
    """Output ("out") or input ("in") channels of a conv, linear or batch-norm layer; None for other modules."""
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        weight = module.weight
        return weight.shape[0] if kind == "out" else (weight.shape[1] * getattr(module, "groups", 1))
    if isinstance(module, nn.modules.batchnorm._NormBase) and kind == "out":
        return module.num_features
    return None


def check_trace_is_current(model: nn.Module, units: UnitGraph) -> None:
    """The trace must belong to `model` as it is now: its graph refers to the model's modules and their widths."""
    traced = units.dependency_graph.model if units.dependency_graph is not None else None
    if traced is not model:
        raise ValueError("the unit graph was traced on another model object: pass units=find_units(model, x) of "
                         "the model being pruned (or no units, and it is traced here)")
    for group in units.groups:
        width = model.get_submodule(group.key).weight.shape[0]
        if width != group.size:
            raise ValueError(f"group {group.key!r} has {width} units now but {group.size} when traced: the model "
                             "changed since find_units (was it pruned already?); trace it again")


def mask_model(model: nn.Module, plan: Plan, units: UnitGraph | None = None,
               example_input: torch.Tensor | None = None) -> nn.Module:
    """Zero what the readers take from removed units (in place), so `model` computes what the pruned model does."""
    units = units or find_units(model, plan_input(model, plan, example_input))
    check_plan_matches(plan, units)
    with torch.no_grad():
        for key in plan.kept:
            removed = torch.tensor(plan.removed(key), dtype=torch.long)
            if removed.numel() == 0:
                continue
            for coupling in units[key].coupled("in"):
                module = model.get_submodule(coupling.module_name)
                columns = coupling.index[torch.isin(coupling.unit, removed)]
                module.weight[:, columns] = 0
    return model


def check_plan_matches(plan: Plan, units: UnitGraph) -> None:
    """The plan must name this model's groups with their sizes; otherwise it was made for another model."""
    sizes = {g.key: g.size for g in units.groups}
    for key, size in plan.sizes.items():
        if key not in sizes:
            raise ValueError(
                f"plan refers to group {key!r}, which this model does not have: apply a plan to the architecture "
                f"it was made for (this model's groups: {sorted(sizes)})"
            )
        if sizes[key] != size:
            raise ValueError(
                f"plan says group {key!r} has {size} units but this model's has {sizes[key]}: was the model "
                "already pruned, or built with another width?"
            )
