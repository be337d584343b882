"""Prunable units: groups of coupled channels, who produces and who reads them, in output-to-input order.

torch-pruning's DependencyGraph finds which channels must be removed together (a conv's filters, its batch norm,
the next layer's input channels, every partner of a residual addition). Each such group is one set of units for
MIPP and for every baseline; a unit is one index of the group (one neuron or one channel across all its couplings).
Groups whose channels reach the network's output unread are the outputs and are never pruned.

Groups that cannot be pruned safely are excluded, with a warning naming them, and recorded (`UnitGraph.excluded`,
copied into every Plan): a group coupled with a module whose channel coupling mipp does not model (attention,
recurrent layers, layer or group norm over the channels, a bare parameter such as a class token), found from the
trace; and a group whose physical removal does not compute what zeroing its units at their readers computes, found
by a trial on the example input (`_trial_exclusions`): channel shuffles, reshapes into heads and any other
coupling hidden in plain tensor code. Some couplings are recognised from the graph before any trial (`_unprunable`:
additions onto the input, grouped convolutions, reshapes between layers of different extent, concatenations
flattened or holding a channel twice).
"""
from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch_pruning as tp

WEIGHTED_READERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Modules with parameters whose channels mipp knows how to remove: anything else coupled to a group excludes it.
MODELLED_COUPLINGS = WEIGHTED_READERS + (nn.modules.batchnorm._BatchNorm, nn.PReLU)
# A trial's pruned output must match the masked original to this share of the output's largest magnitude (relative
# only: a model whose activations are tiny, e.g. from an initialisation for training, is judged on their scale).
TRIAL_TOLERANCE = 1e-3


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
                per_channel = score.detach().double().transpose(0, dim).reshape(score.shape[dim], -1).sum(1).cpu()
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
    excluded: dict[str, str] = field(default_factory=dict)  # root module of a group left unpruned -> why
    # conv / linear module -> its output values per channel for one sample (a conv's positions, a Linear's tokens)
    module_extent: dict[str, int] = field(default_factory=dict)

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
    """An example batch on the model's device: the one given, else one built from the model's mipp_config."""
    device = next((p.device for p in model.parameters()), None)
    if example_input is not None:
        return example_input if device is None else example_input.to(device)
    config = getattr(model, "mipp_config", None)
    if not config:
        raise ValueError(
            "need an example input to trace the model: pass example_input=torch.randn(2, C, H, W) (or any batch "
            "of your data); models from mipp.models carry their input shape and need none"
        )
    size = config["input_size"]
    return torch.zeros(2, config["in_channels"], size, size, device=device)


class _TraceRecorder:
    """Forward hooks that note, during the one traced forward pass, what every later stage needs: the order in which
    leaf modules run, the MACs of each conv / linear module, and the input each weighted module reads.

    The notes describe the latest whole-model forward only: they are cleared as each one starts (a pre-hook on the
    model), so that a graph traced again after a torch-pruning failure (`build_dependency_graph`) does not count a
    module's MACs twice. Within one forward a module called twice (a shared layer) still counts both calls."""

    def __init__(self, model: nn.Module):
        self.order: dict[str, int] = {}
        self.macs: dict[str, int] = {}
        self.inputs: dict[str, torch.Tensor] = {}
        self.extent: dict[str, int] = {}  # conv / linear module -> output values per channel (positions)
        self.handles = [model.register_forward_pre_hook(self._clear)]
        for name, module in model.named_modules():
            if name and not list(module.children()):
                self.handles.append(module.register_forward_hook(self._order_hook(name)))
            if isinstance(module, WEIGHTED_READERS):
                self.handles.append(module.register_forward_pre_hook(self._input_hook(name)))
                self.handles.append(module.register_forward_hook(self._macs_hook(name)))

    def _clear(self, model, inputs):
        for notes in (self.order, self.macs, self.inputs, self.extent):
            notes.clear()

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
            channels = output.shape[-1] if isinstance(module, nn.Linear) else output.shape[1]
            self.extent.setdefault(name, output[0].numel() // max(channels, 1))
        return record

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def build_dependency_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """torch-pruning's dependency graph, traced in eval mode (the model's mode is restored afterwards).

    torch-pruning 1.6 fails on some index mappings it cannot infer: it divides by zero on a reshape that splits
    the channel dim (ShuffleNet's channel shuffle) and adds None on a concatenation of unknown sizes (Swin's patch
    merging). The graph is then traced again with reshapes left unmapped and every other mapping that fails left
    as the identity (`_guard_index_mapping`); the trial in `find_units` excludes the groups this leaves wrong."""
    was_training = model.training
    model.eval()
    try:
        try:
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
        except (ZeroDivisionError, TypeError, IndexError):
            graph = tp.DependencyGraph()
            graph.mipp_unmapped_on_error = True
            return graph.build_dependency(model, example_inputs=example_input)
    finally:
        model.train(was_training)


def _guard_index_mapping() -> None:
    """Let a graph marked `mipp_unmapped_on_error` skip torch-pruning's reshape index mappings and any other
    mapping that raises, both when it is built and whenever a group is formed (torch-pruning recomputes the
    mappings then). Other graphs are unaffected."""
    mapping = tp.dependency.index_mapping
    original = mapping.update_index_mapping
    if getattr(original, "mipp_guard", False):
        return
    updates = {tp.ops.OPTYPE.CONCAT: mapping.update_concat_index_mapping,
               tp.ops.OPTYPE.SPLIT: mapping.update_split_index_mapping,
               tp.ops.OPTYPE.UNBIND: mapping.update_unbind_index_mapping,
               tp.ops.OPTYPE.EXPAND: mapping.update_expand_index_mapping,
               tp.ops.OPTYPE.SLICE: mapping.update_slice_index_mapping}

    def guarded(graph):
        if not getattr(graph, "mipp_unmapped_on_error", False):
            return original(graph)
        for node in graph.module2node.values():
            update = updates.get(node.type)
            if update is None:
                continue
            try:
                update(graph, node)
            except (ZeroDivisionError, TypeError, IndexError):
                pass

    guarded.mipp_guard = True
    mapping.update_index_mapping = guarded


_guard_index_mapping()

# More indices than this from one channel mapping is no layer's channel mapping (a Linear after a Flatten of a
# 64 x 112 x 112 map reads 802,816), and more than MAX_GROUP_INDICES over a group's layers no group's: torch-
# pruning's reshape mapping on Swin-T compounds a stride of 32 through window partitions into lists of 67 million
# indices (hours of tracing), and MaxViT's groups filled 24 GB with index objects. Beyond either bound the root
# is left unpruned, with the reason.
MAX_MAPPED_INDICES = 2 ** 20
MAX_GROUP_INDICES = 2 ** 22


def _bound_index_mappings() -> None:
    """Make torch-pruning raise, instead of running on, where its reshape (flatten) mapping would map a set of
    channels to more than MAX_MAPPED_INDICES indices or a group being formed would hold more than
    MAX_GROUP_INDICES; `_all_groups` then excludes that root with the reason."""
    mapping, group = tp.dependency.index_mapping._FlattenIndexMapping, tp.dependency.group.Group
    if getattr(mapping.__call__, "mipp_bound", False):
        return
    original_call, original_add = mapping.__call__, group.add_dep

    def bounded_call(self, idxs):
        if not self.reverse and len(idxs) * self._stride > MAX_MAPPED_INDICES:
            raise ValueError(f"a reshape maps {len(idxs)} indices to {len(idxs) * self._stride} (stride "
                             f"{self._stride}), more than any layer has channels")
        return original_call(self, idxs)

    def bounded_add(self, dep, idxs):
        held = getattr(self, "_mipp_indices", 0) + len(idxs)
        if held > MAX_GROUP_INDICES:
            raise ValueError(f"its reshapes map its channels to more than {MAX_GROUP_INDICES} indices over its "
                             "layers, more than any group has channels")
        self._mipp_indices = held
        return original_add(self, dep, idxs)

    bounded_call.mipp_bound = True
    mapping.__call__, group.add_dep = bounded_call, bounded_add


_bound_index_mappings()


def find_units(model: nn.Module, example_input: torch.Tensor | None = None, *, trial: bool = True) -> UnitGraph:
    """Find the prunable unit groups of `model`, ordered from the output back to the input.

    This is the one trace of a prune call: torch-pruning's forward pass, with hooks that also record the module
    order, the MACs and the reading points, so that costs, capture and surgery never trace again. Groups that
    cannot be pruned safely are excluded with a warning (see the module docstring); `trial=False` skips the trial
    removal on the example input, and with it the exclusions only that trial finds."""
    example_input = example_input_for(model, example_input)
    graph, recorder, traced = _trace(model, example_input)
    names = {module: name for name, module in model.named_modules()}
    anchored = _ops_on_the_input(graph, traced)
    duplicating = _duplicating_concats(graph)
    _refuse_grouping_that_never_ends(graph, duplicating, names)
    parameter_names = {param: name for name, param in model.named_parameters()}
    groups, outputs, excluded = [], [], {}
    for root, tp_group in _all_groups(graph):
        if isinstance(tp_group, Exception):
            if root in names:
                excluded[names[root]] = (f"torch-pruning cannot trace what its channels are coupled with "
                                         f"({type(tp_group).__name__}: {str(tp_group).splitlines()[0][:100]})")
                outputs.append(names[root])
            continue
        group = _to_unit_group(tp_group, graph, names, recorder.order)
        if group is None:
            continue
        reason = _unmodelled_coupling(tp_group, names, parameter_names)
        if reason:  # checked first: an LSTM or attention reading a group is a reader mipp cannot see
            excluded[group.key] = reason
            outputs.extend(group.producers)
            continue
        if not group.readers:  # nothing reads these channels: they are the network's output
            outputs.extend(group.producers)
            continue
        reason = _unprunable(tp_group, group, anchored, duplicating, recorder.extent, model)
        if reason:  # its width is tied to something mipp cannot change with it
            excluded[group.key] = reason
            outputs.extend(group.producers)  # kept whole, like an output: its producers still serve as targets
            continue
        groups.append(group)
    groups.sort(key=lambda g: (-g.position, g.key))
    if trial and groups:
        failed = _trial_exclusions(model, graph, groups, example_input, _unique(outputs))
        excluded.update(failed)
        outputs.extend(p for g in groups if g.key in failed for p in g.producers)
        groups = [g for g in groups if g.key not in failed]
    if excluded:
        _warn_excluded(excluded)
    if not groups:
        raise ValueError(
            "found no prunable layer: mipp prunes Conv and Linear layers whose outputs feed another Conv/Linear "
            "layer; this model has none besides its output layer"
            + (f" and the groups it leaves unpruned ({', '.join(sorted(excluded))})" if excluded else "")
        )
    points = {g.key: _distinct_reading_points(g, recorder.inputs) for g in groups}
    return UnitGraph(groups, _unique(outputs), tuple(example_input.shape), recorder.order, graph, recorder.macs,
                     points, excluded, dict(recorder.extent))


def _all_groups(graph: tp.DependencyGraph):
    """(root module, torch-pruning group) for every Conv / Linear root not already in an earlier group, as
    `DependencyGraph.get_all_groups` yields them, except that a root whose group torch-pruning fails to form (its
    index mapping of an unusual split or reshape raises) comes with the exception instead of ending the trace."""
    visited = set()
    for module in list(graph.module2node):
        if not isinstance(module, WEIGHTED_READERS) or module in visited:
            continue
        pruner = graph.get_pruner_of_module(module)
        if pruner is None or pruner.get_out_channels(module) is None:
            continue
        try:
            group = graph.get_pruning_group(module, pruner.prune_out_channels,
                                            list(range(pruner.get_out_channels(module))))
        except (IndexError, ValueError, ZeroDivisionError, RuntimeError) as err:
            visited.add(module)
            yield module, err
            continue
        visited.update(item.dep.target.module for item in group if graph.is_out_channel_pruning_fn(item.dep.handler))
        yield module, group


def _warn_excluded(excluded: dict[str, str]) -> None:
    shown = "; ".join(f"{key} ({reason})" for key, reason in list(excluded.items())[:8])
    more = f"; and {len(excluded) - 8} more" if len(excluded) > 8 else ""
    warnings.warn(f"mipp leaves {len(excluded)} group(s) of coupled channels unpruned, because removing their "
                  f"channels is not safe: {shown}{more}. The Plan records them in `excluded`.", stacklevel=3)


def _unmodelled_coupling(tp_group, names, parameter_names) -> str | None:
    """Why a group cannot be pruned, judged from the modules its channels touch; None when all are modelled."""
    culprits = []
    for item in tp_group:
        module = item.dep.target.module
        if isinstance(module, nn.Parameter):
            culprits.append(f"parameter {parameter_names.get(module, '?')!r} outside any layer")
        elif module in names and _has_params(module) and not isinstance(module, MODELLED_COUPLINGS):
            culprits.append(f"{type(module).__name__} {names[module]!r}")
        elif module in names and _is_grouped(module):
            culprits.append(f"grouped convolution {names[module]!r} (groups={module.groups})")
    if not culprits:
        return None
    culprits = _unique(culprits)
    listed = ", ".join(culprits[:3]) + (f" and {len(culprits) - 3} more" if len(culprits) > 3 else "")
    return f"coupled with {listed}, whose channels mipp does not prune"


def _trace(model: nn.Module, example_input: torch.Tensor):
    """(dependency graph, recorder, the input it was traced with). The input first requires grad, so that the trace
    shows where the input itself enters an operation (see `_ops_on_the_input`); where torch-pruning cannot size such
    operations (a concatenation of a pooled input), the model is traced again as given, and additions onto the
    input then go unseen."""
    tries = [example_input.detach().requires_grad_(True)] if example_input.is_floating_point() else []
    for traced in tries + [example_input]:
        recorder = _TraceRecorder(model)
        try:
            return build_dependency_graph(model, traced), recorder, traced
        except RuntimeError as err:  # a shape mismatch deep inside the model
            raise ValueError(
                f"the model does not run on an example input of shape {tuple(example_input.shape)} "
                f"({str(err).splitlines()[0]}): pass example_input= a batch of the inputs the model takes"
            ) from err
        except (TypeError, ZeroDivisionError, IndexError, KeyError) as err:  # torch-pruning's channel mapping
            failure = err
        finally:
            recorder.close()
    raise ValueError(
        f"torch-pruning could not work out which channels of this model are coupled ({type(failure).__name__}: "
        f"{str(failure).splitlines()[0] if str(failure) else 'no message'}), so mipp cannot prune it as it is"
    ) from failure


def _unprunable(tp_group, group: UnitGroup, anchored: set, duplicating: set, extent: dict[str, int],
                model: nn.Module) -> str | None:
    """Why a group cannot be pruned, or None: it shares channels with the model's input (a residual addition onto
    the input); a grouped convolution produces or reads it (its groups must keep equal widths; a depthwise one,
    each channel its own group, is pruned with the channels it reads); or a reshape joins layers of different
    extent (a conv's output, flattened, added to a Linear's: a channel there is several units here, and
    torch-pruning maps them one to several or only partly); or a concatenation is flattened into a Linear
    (torch-pruning 1.6 maps every branch to the first features of the Linear); or a concatenation holds some of
    its channels twice (see `_duplicating_concats`) and the group has a unit per position of it, so that one
    channel would be two units (a group with a unit per channel, as in cat([y, depthwise(y)]), is fine)."""
    touching = _unique([item.dep.target.name or str(item.dep.target.module) for item in tp_group
                        if item.dep.target in anchored])
    if touching:
        return f"shares channels with the model's input (through {', '.join(touching)}), whose width cannot change"
    for node in {item.dep.target for item in tp_group} & duplicating:
        sizes = node.module.concat_sizes or [None]
        if None in sizes or group.size >= sum(sizes):  # a unit per position: a channel held twice is two units
            return "reaches a concatenation that holds some of its channels twice (e.g. cat([y, y + f(y)]))"
    for coupling in group.couplings:
        module = model.get_submodule(coupling.module_name)
        if _is_grouped(module):
            return f"is coupled with the grouped convolution {coupling.module_name!r} (groups={module.groups})"
    extents = {extent[p] for p in group.producers if p in extent}
    shared = [c.module_name for c in group.couplings if len(set(c.index.tolist())) < len(c.index)]
    if len(extents) > 1 or shared:  # e.g. a conv's output, flattened, added to a Linear's
        return (f"joins layers of different extent ({', '.join(group.producers)}) through a reshape: one channel "
                "of a conv there is several units here, which mipp does not remove one by one")
    flattened = [c.module_name for c in group.coupled("in") if len(c.index) > len(set(c.unit.tolist()))]
    if flattened and any(isinstance(item.dep.target.module, tp.ops._ConcatOp) for item in tp_group):
        return (f"is concatenated and then flattened into {', '.join(_unique(flattened))}: torch-pruning loses the "
                "concatenation's offsets through the flatten")
    return None


def _is_grouped(module) -> bool:
    """A convolution with groups that is not depthwise (each channel its own group): its groups keep equal widths."""
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and not (
        module.groups == module.in_channels == module.out_channels)


def _consumes(module) -> bool:
    """A dense Conv / Linear layer: its output channels are new ones, not those of its input."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1)


def _duplicating_concats(graph: tp.DependencyGraph) -> set:
    """Concatenations that hold some layer's channels twice (cat([y, y + f(y)]), cat([y, bn(y)])): one channel is
    then two units, which torch-pruning maps to only one of them. Found by following each operand back to the dense
    layers (or the input) its channels come from."""
    def sources(node) -> set:
        found, stack, seen = set(), [node], set()
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            if _consumes(current.module) or not current.inputs:
                found.add(current)
            else:
                stack.extend(current.inputs)
        return found

    duplicating = set()
    for node in graph.module2node.values():
        if isinstance(node.module, tp.ops._ConcatOp):
            seen = set()
            for operand in node.inputs:
                mine = sources(operand)
                if mine & seen:
                    duplicating.add(node)
                seen |= mine
    return duplicating


def _refuse_grouping_that_never_ends(graph: tp.DependencyGraph, duplicating: set, names: dict) -> None:
    """torch-pruning 1.6 never finishes grouping a grouped convolution that reads a concatenation holding some
    channels twice (its index lists grow without end): refuse such a model before asking it for groups."""
    for node in graph.module2node.values():
        module = node.module
        if not _is_grouped(module):
            continue
        stack, seen = list(node.inputs), set()
        while stack:
            current = stack.pop()
            if current in seen or _consumes(current.module):
                continue
            seen.add(current)
            if current in duplicating:
                raise ValueError(
                    f"the grouped convolution {names.get(module, '?')!r} (groups={module.groups}) reads a "
                    "concatenation that holds some channels twice; torch-pruning 1.6 does not finish grouping such "
                    "a model, so mipp cannot prune it: make the concatenation's branches distinct layers"
                )
            stack.extend(current.inputs)


def _ops_on_the_input(graph: tp.DependencyGraph, example_input: torch.Tensor) -> set:
    """Nodes of the trace whose channels are the input's own channels: operations on the input (an addition, a
    concatenation, a reshape, a norm or a depthwise convolution of it) and everything such channels flow into
    before a dense Conv / Linear consumes them. A group that reaches one of them cannot change its width. The trace's
    input requires grad, so autograd names it as an operand."""
    def reads_input(node) -> bool:
        functions = getattr(node.grad_fn, "next_functions", ()) if node.grad_fn is not None else ()
        return any(getattr(f, "variable", None) is example_input for f, _ in functions if f is not None)

    stack = [node for node in graph.module2node.values() if not _consumes(node.module) and reads_input(node)]
    tied = set()
    while stack:
        node = stack.pop()
        if node not in tied:
            tied.add(node)
            stack.extend(n for n in node.outputs if not _consumes(n.module))
    return tied


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


def _is_grouped(module: nn.Module) -> bool:
    """A convolution with groups that is not depthwise: its groups must keep equal widths, which mipp does not
    model (a depthwise one, each channel its own group, is pruned with the channels it reads)."""
    if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or module.groups == 1:
        return False
    return not module.groups == module.in_channels == module.out_channels


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


@contextmanager
def zeroed_units(model: nn.Module, groups: list[UnitGroup], removed: dict[str, torch.Tensor]):
    """Within the block, every Conv / Linear reader of a group sees zeros in place of that group's `removed` units
    (forward pre-hooks at the reading points): the model computes what the physically pruned one should."""
    handles = []
    for group in groups:
        units = removed.get(group.key)
        if units is None or len(units) == 0:
            continue
        for coupling in group.coupled("in"):
            module = model.get_submodule(coupling.module_name)
            if not isinstance(module, WEIGHTED_READERS):
                continue
            channels = coupling.index[torch.isin(coupling.unit, torch.as_tensor(units))]
            handles.append(module.register_forward_pre_hook(_zero_channels(channels, isinstance(module, nn.Linear))))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def _zero_channels(channels: torch.Tensor, channels_last: bool):
    def hook(module, inputs):
        x = inputs[0].clone()
        if channels_last:  # a Linear reads its features from the last dim (tokens or positions before it)
            x[..., channels.to(x.device)] = 0
        else:
            x[:, channels.to(x.device)] = 0
        return (x, *inputs[1:])
    return hook


class _ModuleSnapshot:
    """The attributes of every module of a model and of torch-pruning's graph, to undo a trial removal in place.

    torch-pruning removes channels by assigning new tensors and sizes (never by writing into the old tensors), and
    edits some lists in place (a concatenation's sizes), so copies of each module's attribute dict, one level deep
    (its parameter and buffer dicts, lists, sets), bring the model back exactly."""

    def __init__(self, model: nn.Module, graph: tp.DependencyGraph):
        modules = list(model.modules()) + [m for m in graph.module2node if isinstance(m, nn.Module)]
        self.saved = [(m, _one_level_copy(m.__dict__)) for m in modules]
        self.graph, self.history = graph, len(graph._pruning_history)

    def restore(self) -> None:
        for module, attributes in self.saved:
            module.__dict__.clear()
            module.__dict__.update(_one_level_copy(attributes))
        del self.graph._pruning_history[self.history:]


def _one_level_copy(attributes: dict) -> dict:
    return {key: copy.copy(value) if isinstance(value, (list, dict, set)) else value for key, value in attributes.items()}


def _trial_exclusions(model: nn.Module, graph, groups: list[UnitGroup], example_input: torch.Tensor,
                      watched: list[str]) -> dict[str, str]:
    """Groups whose removal breaks the model: half of every group's units (seeded) are removed in place, the
    pruned model's output on the example input, and the inputs of the `watched` modules (the output layers: a
    classifier initialised to zero would hide every difference), are compared with the original's with those units
    zeroed at their readers, and the model is restored. When they differ, halving the set of groups finds the ones
    to blame."""
    generator = torch.Generator().manual_seed(0)
    removed = {g.key: torch.randperm(g.size, generator=generator)[: g.size // 2].sort().values for g in groups}
    was_training = model.training
    model.eval()
    try:
        def breaks(subset: list[UnitGroup]) -> str | None:
            return _trial(model, graph, subset, {g.key: removed[g.key] for g in subset}, example_input, watched)

        failed: dict[str, str] = {}

        def blame(subset: list[UnitGroup], why: str) -> None:
            if len(subset) == 1:
                failed[subset[0].key] = why
                return
            half = len(subset) // 2
            found = len(failed)
            for part in (subset[:half], subset[half:]):
                reason = breaks(part)
                if reason:
                    blame(part, reason)
            if len(failed) == found:  # only the parts together break: leave them all out
                failed.update({g.key: f"{why} (together with others of these groups)" for g in subset})

        reason = breaks(groups)
        if reason:
            blame(groups, reason)
            rest = [g for g in groups if g.key not in failed]
            if rest and (reason := breaks(rest)):
                failed.update({g.key: reason for g in rest})
        return failed
    finally:
        model.train(was_training)


def _trial(model, graph, groups: list[UnitGroup], removed: dict[str, torch.Tensor], x: torch.Tensor,
           watched: list[str]) -> str | None:
    """Remove `removed` in place, run, compare with the masked original, restore; returns what went wrong or None."""
    removed = {key: units for key, units in removed.items() if len(units)}
    if not removed:
        return None
    with torch.no_grad(), zeroed_units(model, groups, removed), _inputs_of(model, watched) as masked_inputs:
        expected = {"the output": _first_tensor(model(x))}
    snapshot = _ModuleSnapshot(model, graph)
    try:
        for key, units in removed.items():
            root = model.get_submodule(key)
            prune_out = graph.get_pruner_of_module(root).prune_out_channels
            graph.get_pruning_group(root, prune_out, units.tolist()).prune()
        with torch.no_grad(), _inputs_of(model, watched) as pruned_inputs:
            got = {"the output": _first_tensor(model(x))}
    except Exception as err:  # any failure of the pruned model is a reason to exclude, not to crash
        return f"the model fails once its channels are removed ({type(err).__name__}: {str(err).splitlines()[0]})"
    finally:
        snapshot.restore()
    for name, value in masked_inputs.items():
        if name in pruned_inputs:
            expected[f"the input of {name!r}"] = _drop_removed(model, name, value, groups, removed)
            got[f"the input of {name!r}"] = pruned_inputs[name]
    for what, reference in expected.items():
        if got[what].shape != reference.shape:
            return f"removing its channels changes the shape of {what} from {tuple(reference.shape)} to " \
                   f"{tuple(got[what].shape)}"
        error, scale = float((got[what] - reference).abs().max()), float(reference.abs().max())
        if not error <= TRIAL_TOLERANCE * scale + 1e-12:
            return (f"removing its channels changes {what} beyond zeroing them (largest difference {error:.3g} for "
                    f"values up to {scale:.3g}): a coupling mipp does not see, such as a reshape or a norm")
    return None


@contextmanager
def _inputs_of(model: nn.Module, names: list[str]):
    """Within the block, the first input each named module receives (name -> tensor, filled as they run)."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        def remember(module, inputs, name=name):
            if isinstance(inputs[0], torch.Tensor):
                seen.setdefault(name, inputs[0].detach().float())
        handles.append(model.get_submodule(name).register_forward_pre_hook(remember))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _drop_removed(model, name: str, value: torch.Tensor, groups, removed) -> torch.Tensor:
    """A masked module input without the channels that the pruned model no longer has."""
    drop = [c.index[torch.isin(c.unit, removed[g.key])] for g in groups if g.key in removed
            for c in g.coupled("in") if c.module_name == name]
    if not drop:
        return value
    dim = value.dim() - 1 if isinstance(model.get_submodule(name), nn.Linear) else 1
    keep = torch.ones(value.shape[dim], dtype=torch.bool)
    keep[torch.cat(drop)] = False
    return value.index_select(dim, keep.nonzero().flatten().to(value.device))


def _first_tensor(output) -> torch.Tensor:
    """The model's output tensor (the first one when a model returns a tuple or a dict of them)."""
    while not isinstance(output, torch.Tensor):
        output = next(iter(output.values())) if isinstance(output, dict) else output[0]
    return output.detach().float()
