"""The variance-share weights MIPP builds from a model's batch norms (`normalised_output_weights`)."""
import torch
import torch.nn as nn

from mipp.methods.mipp_features import normalised_output_weights
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
