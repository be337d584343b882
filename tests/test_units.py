"""The one trace of find_units: what it records describes one forward pass, even when torch-pruning traces again."""
import pytest
import torch
import torch_pruning as tp
from torch import nn

from mipp.models import build_model
from mipp.units import _TraceRecorder, find_units


class SharedLayerNet(nn.Module):
    """A conv applied twice in one forward: its MACs count both calls."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(3, 6, 3, padding=1)
        self.shared = nn.Conv2d(6, 6, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = self.shared(torch.relu(self.shared(torch.relu(self.first(x)))))
        return self.head(x.mean((2, 3)))


def test_recorder_notes_one_forward_however_many_run():
    model, x = SharedLayerNet(), torch.randn(2, 3, 8, 8)
    recorder = _TraceRecorder(model)
    try:
        with torch.no_grad():
            model(x)
            once = (dict(recorder.macs), dict(recorder.order), dict(recorder.extent))
            model(x)
            twice = (dict(recorder.macs), dict(recorder.order), dict(recorder.extent))
    finally:
        recorder.close()
    assert once == twice
    assert once[0]["shared"] == 2 * 6 * 6 * 8 * 8  # both calls of the shared layer, in one forward


def test_macs_after_a_retrace_equal_those_of_one_trace(monkeypatch):
    """build_dependency_graph traces again when torch-pruning fails on an index mapping; here the first trace is
    made to fail after its forward pass, and the MACs must not count that pass as well."""
    model = build_model("lenet5", in_channels=1, input_size=28)
    x = torch.randn(2, 1, 28, 28)
    single = find_units(model, x, trial=False).module_macs
    original = tp.DependencyGraph.build_dependency
    calls = []

    def fails_once(self, *args, **kwargs):
        graph = original(self, *args, **kwargs)
        calls.append(getattr(self, "mipp_unmapped_on_error", False))
        if len(calls) == 1:
            raise ZeroDivisionError("integer division or modulo by zero")
        return graph

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", fails_once)
    retraced = find_units(model, x, trial=False).module_macs
    assert calls == [False, True]  # the retrace did happen
    assert retraced == single
