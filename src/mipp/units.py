"""Prunable units: groups of coupled channels, who produces and who reads them, in output-to-input order.

torch-pruning's DependencyGraph finds which channels must be removed together (a conv's filters, its batch norm,
the next layer's input channels, every partner of a residual addition). Each such group is one set of units for
MIPP and for every baseline; a unit is one index of the group (one neuron or one channel across all its couplings).
Groups whose channels reach the network's output unread are the outputs and are never pruned.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch_pruning as tp

WEIGHTED_READERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class Coupling:
    """One module touched by a group: which of its channels belong to which unit.

    kind "out": the module produces (or normalises) the units, its dim 0 is sliced; kind "in": it reads them, its
    input dim is sliced. `index[k]` is a channel of the module and `unit[k]` the unit it belongs to (a Linear after a
    Flatten reads several input features per unit).
    """

    module_name: str
    kind: str
    index: torch.Tensor
    unit: torch.Tensor


@dataclass
class UnitGroup:
    """A set of coupled units, pruned together as one layer of the MIPP sweep."""

    key: str  # name of the module whose output channels define the group (its root)
    size: int
    couplings: list[Coupling]
    producers: list[str]  # conv / linear modules whose output channels are these units
    readers: list[str]  # conv / linear modules that read these units
    position: int  # forward-pass order of the latest producer; the sweep goes from high to low

    def coupled(self, kind: str | None = None) -> list[Coupling]:
        return [c for c in self.couplings if kind is None or c.kind == kind]

    def reduce(self, param_scores: dict[str, torch.Tensor], *, include_readers: bool = False) -> torch.Tensor:
        """Sum parameter-level scores (name -> tensor shaped like the parameter) into one score per unit.

        A unit's own weights are the slices of its producers and norms (dim 0); with include_readers, the readers'
        input slices count too (torch-pruning's group importance does this).
        """
        total = torch.zeros(self.size, dtype=torch.float64)
        for coupling in self.couplings:
            if coupling.kind == "in" and not include_readers:
                continue
            dim = 0 if coupling.kind == "out" else 1
            for suffix in ("weight", "bias"):
                score = param_scores.get(f"{coupling.module_name}.{suffix}")
                if score is None or (dim == 1 and score.dim() < 2):
                    continue
                per_channel = score.detach().double().transpose(0, dim).reshape(score.shape[dim], -1).sum(1)
                total.index_add_(0, coupling.unit, per_channel[coupling.index])
        return total


@dataclass
class UnitGraph:
    """Every prunable group of a model, sorted from the output towards the input."""

    groups: list[UnitGroup]
    output_modules: list[str]
    example_shape: tuple[int, ...]
    module_order: dict[str, int] = field(default_factory=dict)
    dependency_graph: tp.DependencyGraph | None = field(default=None, repr=False)  # torch-pruning's, for surgery

    def __getitem__(self, key: str) -> UnitGroup:
        for group in self.groups:
            if group.key == key:
                return group
        raise KeyError(f"no unit group {key!r}; groups are {[g.key for g in self.groups]}")

    @property
    def total_units(self) -> int:
        return sum(g.size for g in self.groups)

    def producer_group(self) -> dict[str, str]:
        """Module name -> key of the group it produces."""
        return {name: g.key for g in self.groups for name in g.producers}


def example_input_for(model: nn.Module, example_input: torch.Tensor | None) -> torch.Tensor:
    """An example batch: the one given, else one built from the model's mipp_config."""
    if example_input is not None:
        return example_input
    config = getattr(model, "mipp_config", None)
    if not config:
        raise ValueError(
            "need an example input to trace the model: pass example_input=torch.randn(2, C, H, W) (or any batch "
            "of your data); models from mipp.models carry their input shape and need none"
        )
    size = config["input_size"]
    return torch.zeros(2, config["in_channels"], size, size)


def forward_order(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Module name -> index of its (first) call in a forward pass."""
    order: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if name and not list(module.children()):
            def record(m, inputs, output, name=name):
                order.setdefault(name, len(order))  # returns None: the output is left alone

            handles.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    return order


def build_dependency_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    was_training = model.training
    model.eval()
    try:
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    finally:
        model.train(was_training)


def find_units(model: nn.Module, example_input: torch.Tensor | None = None) -> UnitGraph:
    """Find the prunable unit groups of `model`, ordered from the output back to the input."""
    example_input = example_input_for(model, example_input)
    order = forward_order(model, example_input)
    graph = build_dependency_graph(model, example_input)
    names = {module: name for name, module in model.named_modules()}
    groups, outputs = [], []
    for tp_group in graph.get_all_groups(root_module_types=WEIGHTED_READERS):
        group = _to_unit_group(tp_group, graph, names, order)
        if group is None:
            continue
        if not group.readers:  # nothing reads these channels: they are the network's output
            outputs.extend(group.producers)
            continue
        groups.append(group)
    if not groups:
        raise ValueError(
            "found no prunable layer: mipp prunes Conv and Linear layers whose outputs feed another Conv/Linear "
            "layer; this model has none besides its output layer"
        )
    groups.sort(key=lambda g: (-g.position, g.key))
    return UnitGraph(groups, outputs, tuple(example_input.shape), order, graph)


def _to_unit_group(tp_group, graph, names, order) -> UnitGroup | None:
    root_module = tp_group[0].dep.target.module
    if root_module not in names:
        return None
    couplings, producers, readers = [], [], []
    for item in tp_group:
        module = item.dep.target.module
        if not isinstance(module, nn.Module) or module not in names or not _has_params(module):
            continue
        kind = "out" if graph.is_out_channel_pruning_fn(item.dep.handler) else "in"
        name = names[module]
        couplings.append(Coupling(name, kind, torch.as_tensor(list(item.idxs), dtype=torch.long),
                                  torch.as_tensor(list(item.root_idxs), dtype=torch.long)))
        if isinstance(module, WEIGHTED_READERS):
            (producers if kind == "out" else readers).append(name)
    size = max(int(c.unit.max()) + 1 for c in couplings)
    position = max((order.get(p, -1) for p in producers), default=-1)
    return UnitGroup(names[root_module], size, couplings, _unique(producers), _unique(readers), position)


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))
