"""Calibration data that would prune blind is refused with the cause and the fix, for every method."""
import pytest
import torch

from conftest import inputs_for, small_model
from mipp import prune, select_plan


@pytest.mark.parametrize("method", ["mipp", "random", "magnitude-l1", "tp-l1"])
def test_nan_or_infinite_inputs_are_refused(method):
    model = small_model("lenet5")
    data = inputs_for(model, 64)
    data[3, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        select_plan(model, data, method=method, budget=0.5, n_samples=64)
    data[3, 0, 5, 5] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        prune(model, data, method=method, budget=0.5, n_samples=64)


def test_identical_inputs_are_refused_instead_of_gutting_the_network():
    model = small_model("lenet5")
    with pytest.raises(ValueError, match="every calibration input is the same"):
        prune(model, torch.zeros(64, 1, 28, 28), n_samples=64)


def test_wrong_input_shape_names_the_expected_shape():
    model = small_model("lenet5")  # built for 1 x 28 x 28 inputs
    with pytest.raises(ValueError, match=r"shape \(3, 32, 32\) per sample but the model takes \(1, 28, 28\)"):
        prune(model, torch.randn(64, 3, 32, 32), n_samples=64)


def test_an_example_input_the_model_cannot_run_names_its_shape():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"does not run on an example input of shape \(2, 5\)"):
        prune(model, torch.randn(64, 5), example_input=torch.randn(2, 5), n_samples=64)


def test_empty_calibration_data_is_refused():
    model = small_model("mlp")
    with pytest.raises(ValueError, match="empty"):
        prune(model, torch.randn(0, 1, 28, 28), n_samples=64)
