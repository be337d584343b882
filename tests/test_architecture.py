"""The shape of the code itself: layered imports without cycles, and one trace of the model per prune call."""
import ast
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from torch import nn

import mipp
from mipp.api import VERIFY_SAMPLES

SRC = Path(__file__).resolve().parents[1] / "src"

# From the bottom up; a module may import modules of its own layer or below, never above (README, Layout).
LAYERS = [
    {"mipp.version", "mipp.io", "mipp.progress"},
    {"mipp.plan", "mipp.models", "mipp.data", "mipp.mi", "mipp.units", "mipp.distributed"},
    {"mipp.measure", "mipp.activations", "mipp.positions", "mipp.surgery", "mipp.reconstruct", "mipp.recalibrate",
     "mipp.checkpoint", "mipp.train", "mipp.export"},
    {"mipp.methods"},
    {"mipp.api"},
    {"mipp.experiments", "mipp.demo"},
    {"mipp.cli", "mipp", "mipp.__main__"},
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "mipp").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every mipp module `name` imports, at the top or inside a function."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.startswith("mipp") and target != name:
                found.add(target)
    return found


def _layer(module: str) -> int:
    for level, members in enumerate(LAYERS):
        if any(module == m or (m != "mipp" and module.startswith(m + ".")) for m in members):
            return level
    raise AssertionError(f"module {module} has no layer: add it to LAYERS here and to the README's Layout")


def test_imports_go_down_the_layers_and_never_in_a_circle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    upward = [f"{a} -> {b}" for a, deps in graph.items() for b in deps if _layer(b) > _layer(a)]
    assert not upward, f"imports from a lower layer to a higher one: {upward}"

    def reachable(start):
        seen, stack = set(), [start]
        while stack:
            for nxt in graph[stack.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return seen

    circles = sorted(name for name in graph if name in reachable(name))
    assert not circles, f"modules in an import circle: {circles}"


def test_nothing_is_imported_by_a_string():
    offenders = [str(path.relative_to(SRC)) for path in (SRC / "mipp").rglob("*.py")
                 if "import_module" in path.read_text() or "pkgutil" in path.read_text()]
    assert not offenders, f"modules loaded by name at run time in {offenders}: import them explicitly"


class CountingMLP(nn.Sequential):
    """An MLP that notes the batch size of every forward pass of the whole network."""

    def __init__(self, batch_norm: bool = False):
        norm = [nn.BatchNorm1d(16)] if batch_norm else []
        super().__init__(nn.Flatten(), nn.Linear(12, 16), *norm, nn.ReLU(), nn.Linear(16, 8), nn.ReLU(),
                         nn.Linear(8, 3))
        self.calls = []

    def forward(self, x):
        self.calls.append(len(x))
        return super().forward(x)


# A prune call's forward passes, in order: the trace (the example batch, once) and the trial removal that checks
# every group can be pruned safely (the example batch again: the masked original; the trial's pruned pass leaves no
# record here because the trial restores every attribute of the model afterwards; see mipp.units); the method's own
# passes over the calibration data (MIPP's capture: the 300 samples in batches of 256; the other methods here run
# none on this model); reconstruction's one pass over the same 300 samples through the unpruned model, gathering the
# re-fitted readers' statistics (only when the plan removes something); the surgery check's one pass of
# VERIFY_SAMPLES calibration samples through the masked original and one through the pruned model (same condition);
# then batch-norm recalibration's batches of 128 (none for a model without batch norm).
CALIBRATION_PASS = [256, 44]
SURGERY_CHECK = [VERIFY_SAMPLES, VERIFY_SAMPLES]
TRACE = [2, 2]  # the trace and the trial's masked pass, on the example batch of 2
SELECTION_PASSES = {"mipp": CALIBRATION_PASS}


@pytest.mark.parametrize("method,budget", [("mipp", None), ("mipp", 0.3), ("random", 0.3), ("magnitude-l1", 0.3),
                                           ("tp-l1", 0.3), ("tp-taylor", 0.3)])
def test_one_prune_call_traces_the_model_once(monkeypatch, method, budget):
    builds = []
    original = tp.DependencyGraph.build_dependency

    def counted(self, *args, **kwargs):
        builds.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", counted)
    torch.manual_seed(0)
    model = CountingMLP()
    data = torch.randn(300, 12)
    example = data[:2]
    labelled = (data, torch.randint(0, 3, (300,)))
    pruned, plan = mipp.prune(model, labelled, method=method, budget=budget, example_input=example, n_samples=300)
    assert model.calls == [], "the caller's model is copied, never run"
    assert len(builds) == 1, "one dependency graph per prune call, shared by costs, capture, reconstruction, surgery"
    removes = plan.units_kept < plan.units_total
    # reconstruction's pass, except after MIPP, whose position moments are its normal equations
    refit_pass = [] if method == "mipp" else CALIBRATION_PASS
    after_selection = refit_pass + SURGERY_CHECK if removes else []
    assert pruned.calls == TRACE + SELECTION_PASSES.get(method, []) + after_selection
    assert pruned[1].out_features == len(plan.kept["1"]) and pruned(example).shape == (2, 3)


def test_recalibration_adds_its_own_batches_and_nothing_else():
    torch.manual_seed(0)
    model = CountingMLP(batch_norm=True).eval()
    data = torch.randn(300, 12)
    pruned, plan = mipp.prune(model, data, method="random", budget=0.3, example_input=data[:2], n_samples=300,
                              recalibration_batches=2)
    assert pruned.calls == TRACE + CALIBRATION_PASS + SURGERY_CHECK + [128, 128], \
        "trace and trial, reconstruction, surgery check, 2 recalibration batches"
    assert plan.stats["recalibration_batches_used"] == 2 and not pruned.training
