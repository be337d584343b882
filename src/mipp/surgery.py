"""Apply a Plan: physical removal of units, checked against the masked original.

Removal goes through torch-pruning, which slices every coupled tensor (weights, biases, batch-norm statistics, the
readers' input channels, residual partners). The masked original is the unpruned model with the removed units'
values zeroed where they are read (at the readers' inputs, the units' reading points: after the batch norm,
activation and residual additions that belong to the unit). A unit is all of that, so removing it and zeroing it
there are the same computation, exactly; zeroing a conv's output channel before its batch norm would not be (the
norm's shift makes it nonzero). `apply_plan` checks this by default: one forward pass of the example batch through
the original with the reading points masked (before the removal) and one through the pruned model (after), and
raises `SurgeryError` rather than return a model that computes something else. `mask_model` is the same masking
done on the weights (the readers' input columns), for tests and for comparing methods on the unpruned model.

Where removal and zeroing legitimately differ, the check fails too, on purpose: a norm across channels (LayerNorm,
GroupNorm) after a pruned layer normalises the kept channels by statistics that included the removed ones, so
every decision made on the unpruned model no longer holds; the error names that layer. Input channels of a grouped
convolution (1 < groups < channels) cannot be removed at will and are refused before the model is touched.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from mipp.plan import Plan
from mipp.units import UnitGraph, example_input_for, find_units

VERIFY_TOLERANCE = 1e-4  # largest difference allowed, relative to the largest magnitude of the compared output
VERIFY_SEED = 0  # seeds the example batch drawn when none is given


class SurgeryError(RuntimeError):
    """The physically pruned model does not compute what the original computes with the removed units zeroed."""


def plan_input(model: nn.Module, plan: Plan, example_input: torch.Tensor | None) -> torch.Tensor:
    """The batch to trace `model` with, on its device: the one given, else zeros of the Plan's recorded input
    shape."""
    if example_input is None and plan.example_shape:
        example_input = torch.zeros(*plan.example_shape)
    return example_input_for(model, example_input)


def apply_plan(model: nn.Module, plan: Plan, example_input: torch.Tensor | None = None,
               units: UnitGraph | None = None, *, verify: bool = True) -> nn.Module:
    """Make `model` physically smaller according to `plan` (in place); returns the model.

    `units` is the trace of this very model (`find_units(model, ...)`), reused so that a prune call traces once;
    without it the model is traced here. With `verify` (the default) the pruned model is checked against the
    masked original on `example_input` (or, without one, a seeded Gaussian batch of the traced shape), in eval
    mode, at the cost of one forward pass of that batch through each; a difference raises `SurgeryError`, and the
    model, already changed in place, must then be discarded."""
    if units is None:
        units = find_units(model, plan_input(model, plan, example_input))
    check_plan_matches(plan, units)
    check_trace_is_current(model, units)
    check_plan_supported(model, plan, units)
    check_no_layer_emptied(model, plan, units)
    removes_any = any(plan.removed(key) for key in plan.kept)
    reference = None
    if verify and removes_any:
        reference = MaskedReference.record(model, plan, units, verification_input(model, units, example_input))
    remove_units(model, plan, units)
    if reference is not None:
        reference.check(model)
    return model


def remove_units(model: nn.Module, plan: Plan, units: UnitGraph) -> None:
    """The physical removal (in place), group by group, through torch-pruning's dependency graph."""
    graph = units.dependency_graph
    for key in plan.kept:
        removed = plan.removed(key)
        if not removed:
            continue
        root = model.get_submodule(key)
        prune_out = graph.get_pruner_of_module(root).prune_out_channels
        try:
            graph.get_pruning_group(root, prune_out, removed).prune()
        except (RuntimeError, IndexError, ValueError) as err:
            raise SurgeryError(f"torch-pruning failed to remove units {removed[:8]}{'...' * (len(removed) > 8)} "
                               f"of group {key!r} ({str(err).splitlines()[0]}). {_REPORT}") from err


def check_plan_supported(model: nn.Module, plan: Plan, units: UnitGraph) -> None:
    """Refuse, before the model is touched, removals surgery cannot make: input channels of a grouped convolution
    (1 < groups < channels) must leave every group of it the same width, which arbitrary removals do not."""
    for key in plan.kept:
        if not plan.removed(key):
            continue
        for coupling in units[key].coupled("in"):
            module = model.get_submodule(coupling.module_name)
            if isinstance(module, nn.modules.conv._ConvNd) and 1 < module.groups < module.in_channels:
                raise ValueError(
                    f"group {key!r} is read by the grouped convolution {coupling.module_name!r} (groups="
                    f"{module.groups}): removing some of its input channels would leave its groups unequal, which "
                    f"no convolution can hold; keep every unit of {key!r} (or replace the grouped convolution)")


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
                if coupling.module_name not in units[key].readers:
                    continue  # a per-channel module (its input channel is its output channel): read further on
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


# ------------------------------------------------------------------------------------------------ verification


def verification_input(model: nn.Module, units: UnitGraph, example_input: torch.Tensor | None) -> torch.Tensor:
    """The batch surgery is checked on: the one given, else a seeded Gaussian batch of the traced shape (zeros, the
    traced default, would leave most weights unchecked). On the model's device, in its floating dtype."""
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    if example_input is not None:
        return example_input.to(device)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(VERIFY_SEED)
    return torch.randn(units.example_shape, generator=generator).to(device=device, dtype=dtype)


ACROSS_CHANNEL_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
LAST_DIM_MODULES = (nn.Linear, nn.Bilinear, nn.LayerNorm, nn.Embedding, nn.MultiheadAttention, nn.RNNBase)


def channel_dim(module: nn.Module) -> int:
    """The dimension that holds a module's channels: the last for Linear and the like, else 1 (conv, norms,
    PReLU: (N, C, ...))."""
    return -1 if isinstance(module, LAST_DIM_MODULES) else 1


class MaskedReference:
    """What the masked original computes on one batch: its output, and every parametrised layer's output on the
    first sample, restricted to the channels the plan keeps (kept only to name the layer where a difference
    starts when there is one). A layer's difference is taken relative to the largest magnitude of its whole output
    (every channel, `scales`): a layer left with one channel whose value is a near cancellation (e.g. 7e-8 where
    its other channels reach 8e-4) would otherwise turn the rounding of a changed summation order into a
    "difference" of 1e-3."""

    def __init__(self, model: nn.Module, plan: Plan, units: UnitGraph, batch: torch.Tensor, tolerance: float):
        self.batch, self.tolerance = batch, tolerance
        self.roles = _roles(units)
        self.output: list[torch.Tensor] = []
        self.layers: dict[str, torch.Tensor] = {}  # in forward order
        self.scales: dict[str, float] = {}  # per layer, the largest finite magnitude of its whole first output
        self.float64 = True  # both passes in float64 (see `record`)
        self.removed_channels, self.masked_inputs = _removed_channels(plan, units)
        self.across_channels = {name for name, module in model.named_modules()  # norms across channels
                                if isinstance(module, ACROSS_CHANNEL_NORMS)}

    @classmethod
    def record(cls, model: nn.Module, plan: Plan, units: UnitGraph, batch: torch.Tensor,
               tolerance: float | None = None) -> "MaskedReference":
        """Run the unpruned `model` on `batch` with the plan's removed units zeroed at their reading points: in
        float64 where the model runs in it (then the pruned model is checked in float64 too), else in its own
        dtype."""
        reference = cls(model, plan, units, batch, tolerance if tolerance is not None else _tolerance(model))
        for reference.float64 in (True, False):
            reference.layers.clear()
            reference.scales.clear()
            handles = []
            for name, columns in reference.masked_inputs.items():
                module = model.get_submodule(name)
                handles.append(module.register_forward_pre_hook(_zeroing_hook(columns, channel_dim(module))))
            try:
                with in_float64(model, reference.float64):
                    output = _observed_forward(model, _batch_in(batch, reference.float64), reference.layers,
                                               handles, reference._keep)
                break
            except (RuntimeError, TypeError) as err:  # float64 unsupported (a hard-coded dtype, MPS): own dtype
                for handle in handles:
                    handle.remove()
                if not reference.float64:
                    raise ValueError(
                        f"cannot check the surgery: the model does not run on the example batch of shape "
                        f"{tuple(batch.shape)} ({str(err).splitlines()[0]}); pass example_input= a batch it "
                        "takes, or verify=False") from err
        reference.output = _tensors(output)
        return reference

    def _keep(self, name: str, module: nn.Module, output: torch.Tensor) -> torch.Tensor:
        """The first sample of a layer's output, at the channels that survive the removal."""
        first = output[:1]
        finite = first[torch.isfinite(first)]
        self.scales[name] = float(finite.abs().max()) if finite.numel() else 0.0
        removed = self.removed_channels.get(name)
        if removed is None:
            return first
        dim = channel_dim(module) % first.dim()
        kept = torch.ones(first.shape[dim], dtype=torch.bool)
        kept[removed] = False
        return first.index_select(dim, kept.nonzero().flatten().to(first.device))

    def check(self, pruned: nn.Module) -> float:
        """Run the pruned model on the same batch and compare; returns the output's relative difference, raises
        SurgeryError when it or any layer's exceeds the tolerance, or when a shape differs."""
        layers: dict[str, torch.Tensor] = {}
        try:
            with in_float64(pruned, self.float64):
                output = _tensors(_observed_forward(pruned, _batch_in(self.batch, self.float64), layers, [],
                                                    lambda name, module, out: out[:1]))
        except RuntimeError as err:
            raise SurgeryError(
                f"the pruned model no longer runs on the example batch of shape {tuple(self.batch.shape)} "
                f"({str(err).splitlines()[0]}): surgery left inconsistent layer widths. {_REPORT}") from err
        if [t.shape for t in output] != [t.shape for t in self.output]:
            raise SurgeryError(
                f"the pruned model's output has shape(s) {[tuple(t.shape) for t in output]} but the original's "
                f"{[tuple(t.shape) for t in self.output]}: removed units also reach the output directly (e.g. a model "
                f"that returns its features as well as its logits); keep every unit of those groups. {_REPORT}")
        difference = max((relative_difference(a, b) for a, b in zip(output, self.output)), default=0.0)
        per_layer = {name: relative_difference(layers[name], expected, self.scales.get(name, 0.0))
                     if name in layers else float("inf") for name, expected in self.layers.items()}
        failing = [name for name, value in per_layer.items() if value > self.tolerance]
        if difference > self.tolerance or failing:
            raise SurgeryError(self._message(difference, per_layer, failing))
        return difference

    def _message(self, difference: float, per_layer: dict[str, float], failing: list[str]) -> str:
        text = (f"surgery changed what the model computes: the pruned model's output differs from the original's "
                f"with the removed units zeroed by {difference:.3g} (relative to the output's largest magnitude; "
                f"tolerance {self.tolerance:.0e}, eval mode, on the example batch of shape "
                f"{tuple(self.batch.shape)}).")
        if failing:
            largest = max(failing, key=lambda name: per_layer[name])
            text += (f" The difference starts at layer {self._describe(failing[0], per_layer)}; it is largest at "
                     f"{self._describe(largest, per_layer)}.")
            if failing[0] in self.across_channels:
                return (f"{text} That layer normalises across channels: removing some changes the statistics of "
                        "the others, so removal is not zeroing and MIPP's and the baselines' choices (made on the "
                        "unpruned model) do not hold. Keep every unit of its group, or skip the check with "
                        "verify=False if the change is wanted. The model was changed in place and must be "
                        "discarded.")
        return f"{text} {_REPORT}"

    def _describe(self, name: str, per_layer: dict[str, float]) -> str:
        roles = "; ".join(f"{verb} group {key!r}" for verb, key in self.roles.get(name, [])) or "in no group"
        value = per_layer[name]
        amount = "output missing or of another shape" if value == float("inf") else f"{value:.3g}"
        return f"{name!r} ({roles}: {amount})"


_REPORT = ("The model was changed in place and must be discarded. This is a bug in mipp's surgery or a layer type "
           "it does not support: please report it with the model's architecture (apply_plan(..., verify=False) "
           "skips this check).")


def relative_difference(actual: torch.Tensor, expected: torch.Tensor, scale: float = 0.0) -> float:
    """Largest absolute difference over the larger of the two largest magnitudes (and `scale`, a magnitude the
    difference is known to be relative to); inf for another shape or for a NaN on one side only (NaN on both
    sides, and equal infinities, count as equal)."""
    if actual.shape != expected.shape:
        return float("inf")
    a, e = actual.detach().double(), expected.detach().double().to(actual.device)
    same = (a == e) | (torch.isnan(a) & torch.isnan(e))
    gap = torch.where(same, torch.zeros_like(a), (a - e).abs().nan_to_num(nan=float("inf")))
    if gap.numel() == 0 or float(gap.max()) == 0.0:
        return 0.0
    finite = torch.cat([a[torch.isfinite(a)].abs().flatten(), e[torch.isfinite(e)].abs().flatten()])
    scale = max(float(finite.max()) if finite.numel() else 0.0, scale)
    return float(gap.max()) / scale if scale > 0 else float("inf")


def _tolerance(model: nn.Module) -> float:
    """VERIFY_TOLERANCE, widened for low-precision weights (float16, bfloat16), whose rounding alone exceeds it."""
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    eps = torch.finfo(first.dtype).eps if first is not None else 0.0
    return max(VERIFY_TOLERANCE, 16 * eps)


def _removed_channels(plan: Plan, units: UnitGraph) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per module, the output channels the removal takes away (producers, norms and other per-channel modules) and
    the input channels that carry removed units (the readers: where the masked original zeroes them)."""
    outputs: dict[str, list[torch.Tensor]] = {}
    inputs: dict[str, list[torch.Tensor]] = {}
    for key in plan.kept:
        removed = torch.tensor(plan.removed(key), dtype=torch.long)
        if removed.numel() == 0:
            continue
        group = units[key]
        for coupling in group.couplings:
            channels = coupling.index[torch.isin(coupling.unit, removed)]
            reads = coupling.kind == "in" and coupling.module_name in group.readers
            (inputs if reads else outputs).setdefault(coupling.module_name, []).append(channels)
    merge = lambda parts: torch.unique(torch.cat(parts))  # noqa: E731
    return {k: merge(v) for k, v in outputs.items()}, {k: merge(v) for k, v in inputs.items()}


def _roles(units: UnitGraph) -> dict[str, list[tuple[str, str]]]:
    """Module -> how it takes part in each group ("produces" / "reads", group key), for error messages."""
    roles: dict[str, list[tuple[str, str]]] = {}
    for group in units.groups:
        for coupling in group.couplings:
            role = ("produces" if coupling.kind == "out" else "reads", group.key)
            if role not in roles.setdefault(coupling.module_name, []):
                roles[coupling.module_name].append(role)
    return roles


def _zeroing_hook(columns: torch.Tensor, dim: int):
    def zero(module, inputs):
        x = inputs[0].clone()
        x.index_fill_(dim % x.dim(), columns.to(x.device), 0)
        return (x, *inputs[1:])
    return zero


def _observed_forward(model: nn.Module, batch: torch.Tensor, layers: dict, handles: list, keep):
    """One forward pass in eval mode, full float32 precision and without gradients, noting (through `keep`) the
    first output of every module with parameters of its own; every module's mode is restored and the hooks in
    `handles` removed afterwards."""
    def note(name):
        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor) and name not in layers:
                layers[name] = keep(name, module, output.detach()).clone()
        return hook

    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            handles.append(module.register_forward_hook(note(name)))
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), _full_float32():
            return model(batch)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training


@contextlib.contextmanager
def in_float64(model: nn.Module, enabled: bool = True):
    """Every floating parameter and buffer of `model` in float64 while inside, restored to its own dtype after
    (exactly: float32, float16 and bfloat16 values are all float64 values). The compared passes run in float64 so
    that only a real difference counts: in float32, a layer whose output is a near cancellation (an SE squeeze
    left with one unit of 7e-8 from inputs of 1e-3) changes by 1e-3 of itself when the removed inputs' zeros are
    no longer summed, and every layer after it inherits that."""
    saved = []
    try:
        for tensor in [*model.parameters(), *model.buffers()] if enabled else []:
            if tensor.is_floating_point() and tensor.dtype != torch.float64:
                converted = tensor.data.double()  # raises where float64 is unsupported (MPS): restored below
                saved.append((tensor, tensor.dtype))
                tensor.data = converted
        yield
    finally:
        for tensor, dtype in saved:
            tensor.data = tensor.data.to(dtype)


def _batch_in(batch: torch.Tensor, float64: bool) -> torch.Tensor:
    return batch.double() if float64 and batch.is_floating_point() else batch


@contextlib.contextmanager
def _full_float32():
    """TF32 off for the two compared passes: its 10-bit mantissa (the default for convolutions on recent GPUs)
    makes two ways of summing the same products differ by about 1e-3."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _tensors(output) -> list[torch.Tensor]:
    """The tensors of a model's output (a tensor, or tuples, lists and dicts of them), in a fixed order."""
    if isinstance(output, torch.Tensor):
        return [output.detach()]
    if isinstance(output, dict):
        return [t for key in sorted(output, key=str) for t in _tensors(output[key])]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    return []
