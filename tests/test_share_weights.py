"""How MIPP weighs variance shares: by the batch norm after a reader, and summed over a group's readers."""
import pytest
import torch
import torch.nn as nn

import mipp
from conftest import inputs_for, small_model
from mipp.methods.mipp_features import JointSession, normalised_output_weights
from mipp.units import find_units


def test_batch_norm_weights_are_gain_squared_over_running_variance():
    """Only readers (layers that read a prunable group) whose output goes straight into a batch norm get weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).eval()
    gains, variances = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([4.0, 1.0, 0.25])
    with torch.no_grad():
        model[3].weight.copy_(gains)
        model[3].running_var.copy_(variances)
    weights = normalised_output_weights(model, find_units(model, torch.randn(2, 1, 8, 8)))
    assert set(weights) == {"2"}  # the classifier feeds no batch norm
    assert torch.allclose(weights["2"], (gains.square() / (variances + 1e-5)).double())


class _Reader:
    """A stand-in reader session that loses a fixed share per unit."""

    def __init__(self, shares):
        self.shares, self.n_units, self.kept = shares, len(shares), list(range(len(shares)))

    def variance_share_lost(self, i):
        return self.shares[i]


def test_a_group_read_at_several_points_loses_the_sum_of_its_readers_shares():
    readers = [_Reader([0.1, 0.3]), _Reader([0.2, 0.0])]
    assert JointSession(readers, 0.95, summed=True).variance_share_lost(0) == pytest.approx(0.3)
    assert JointSession(readers, 0.95).variance_share_lost(1) == pytest.approx(0.15)  # the mean, on request


def test_readers_share_is_recorded_and_checked():
    model = small_model("resnet18")
    data = inputs_for(model, 64, seed=0, rank=16)
    plans = {share: mipp.select_plan(model, data, budget=0.5, metric="macs", n_samples=64, features="patches",
                                     readers_share=share) for share in ("sum", "mean")}
    assert {s: p.settings["features"]["readers_share"] for s, p in plans.items()} == {"sum": "sum", "mean": "mean"}
    assert plans["sum"].kept != plans["mean"].kept  # the residual streams are priced differently
    with pytest.raises(ValueError, match="readers_share must be one of"):
        mipp.select_plan(model, data, budget=0.5, n_samples=64, readers_share="max")
