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
    """Every prunable group of a model, sorted from the output towards the input, and what its one trace saw.

    The dependency graph refers to the traced model's own modules: it is good for one model, until that model
    is pruned."""

    groups: list[UnitGroup]
    output_modules: list[str]
    example_shape: tuple[int, ...]
    module_order: dict[str, int] = field(default_factory=dict)  # leaf module name -> position in the forward pass
    dependency_graph: tp.DependencyGraph | None = field(default=None, repr=False)  # torch-pruning's, for surgery
    module_macs: dict[str, int] = field(default_factory=dict)  # conv / linear module -> MACs for one sample
    reading_points: dict[str, list[Coupling]] = field(default_factory=dict)  # group -> readers of distinct tensors

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


def layer_macs(module: nn.Module, output: torch.Tensor) -> int:
    """Multiply-accumulates of one call of a conv / linear module, for the first sample of its output batch."""
    if isinstance(module, nn.Linear):
        return output[0].numel() * module.in_features
    return output[0].numel() * module.weight[0].numel()  # a conv's kernel: in_channels / groups x kernel area


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


class _TraceRecorder:
    """Forward hooks that note, during the one traced forward pass, what every later stage needs: the order in which
    leaf modules run, the MACs of each conv / linear module, and the input each weighted module reads."""

    def __init__(self, model: nn.Module):
        self.order: dict[str, int] = {}
        self.macs: dict[str, int] = {}
        self.inputs: dict[str, torch.Tensor] = {}
        self.handles = []
        for name, module in model.named_modules():
            if name and not list(module.children()):
                self.handles.append(module.register_forward_hook(self._order_hook(name)))
            if isinstance(module, WEIGHTED_READERS):
                self.handles.append(module.register_forward_pre_hook(self._input_hook(name)))
                self.handles.append(module.register_forward_hook(self._macs_hook(name)))

    def _order_hook(self, name):
        def record(module, inputs, output):
            self.order.setdefault(name, len(self.order))  # returns None: the output is left alone
        return record

    def _input_hook(self, name):
        def record(module, inputs):
            self.inputs.setdefault(name, inputs[0].detach())
        return record

    def _macs_hook(self, name):
        def record(module, inputs, output):
            self.macs[name] = self.macs.get(name, 0) + layer_macs(module, output)
        return record

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def build_dependency_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """torch-pruning's dependency graph, traced in eval mode (the model's mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    finally:
        model.train(was_training)


def find_units(model: nn.Module, example_input: torch.Tensor | None = None) -> UnitGraph:
    """Find the prunable unit groups of `model`, ordered from the output back to the input.

    This is the one trace of a prune call: torch-pruning's forward pass, with hooks that also record the module
    order, the MACs and the reading points, so that costs, capture and surgery never trace again."""
    example_input = example_input_for(model, example_input)
    recorder = _TraceRecorder(model)
    try:
        graph = build_dependency_graph(model, example_input)
    except RuntimeError as err:  # a shape mismatch deep inside the model
        raise ValueError(
            f"the model does not run on an example input of shape {tuple(example_input.shape)} "
            f"({str(err).splitlines()[0]}): pass example_input= a batch of the inputs the model takes"
        ) from err
    finally:
        recorder.close()
    names = {module: name for name, module in model.named_modules()}
    groups, outputs = [], []
    for tp_group in graph.get_all_groups(root_module_types=WEIGHTED_READERS):
        group = _to_unit_group(tp_group, graph, names, recorder.order)
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
    points = {g.key: _distinct_reading_points(g, recorder.inputs) for g in groups}
    return UnitGraph(groups, outputs, tuple(example_input.shape), recorder.order, graph, recorder.macs, points)


def _distinct_reading_points(group: UnitGroup, inputs: dict[str, torch.Tensor]) -> list[Coupling]:
    """The group's reader couplings that read distinct tensors (readers of one tensor, e.g. the parallel convs of a
    block that all read the residual stream, count once)."""
    distinct, tensors = [], []
    for coupling in group.coupled("in"):
        tensor = inputs.get(coupling.module_name)
        if tensor is None or any(_same_tensor(tensor, t) for t in tensors):
            continue
        tensors.append(tensor)
        distinct.append(coupling)
    return distinct


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two views of one tensor (detach() makes new objects over the same storage)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


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
