"""Calibration data (and models) that would prune blind are refused with the cause and the fix, for every method;
what is legitimate but degraded gets a warning that says so. Never a silently gutted network."""
import warnings

import pytest
import torch
import torch.nn as nn

from conftest import inputs_for, small_model
from mipp import method_names, prune, select_plan
from mipp.activations import MIN_DISTINCT_SAMPLES, STREAMED_CHECK, calibration_batches, check_calibration_data

EVERY_METHOD = method_names()


def budget_for(method):
    return None if method == "mipp" else 0.5


def model_for(method):
    """The tiny MLP, or a net with a batch norm in every group for the criterion that scores batch-norm scales."""
    return small_model("resnet18" if method == "tp-bn-scale" else "mlp")


class Items(torch.utils.data.Dataset):
    """A labelled data set read item by item (streamed: only its first samples are checked up front)."""

    def __init__(self, inputs, labels):
        self.inputs, self.labels = inputs, labels

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, i):
        return self.inputs[i], int(self.labels[i])


def labelled(model, n, seed=0):
    return inputs_for(model, n, seed=seed, rank=8), torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["mipp", "random", "magnitude-l1", "tp-l1"])
def test_nan_or_infinite_inputs_are_refused(method):
    model = small_model("lenet5")
    data = inputs_for(model, 64)
    data[3, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinite values \(input 3\)"):
        select_plan(model, data, method=method, budget=0.5, n_samples=64)
    data[3, 0, 5, 5] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        prune(model, data, method=method, budget=0.5, n_samples=64)


@pytest.mark.parametrize("method", EVERY_METHOD)
def test_every_method_refuses_a_nan_anywhere_in_in_memory_data(method):
    model = model_for(method)
    x, y = labelled(model, 300)
    x[290, 0, 1, 1] = float("-inf")  # past the first batch of 256
    with pytest.raises(ValueError, match=r"NaN or infinite values \(input 290\)"):
        prune(model, (x, y), method=method, budget=budget_for(method), n_samples=300)


@pytest.mark.parametrize("method", EVERY_METHOD)
def test_every_method_fails_loudly_on_a_nan_deep_in_streamed_data(method):
    """A data set read item by item is checked in its first samples up front; a NaN further on still stops every
    method (the batches are checked as they are read, NaN scores are refused, IMP's training reports the NaN)."""
    model = model_for(method)
    n = STREAMED_CHECK + 40
    x, y = labelled(model, n)
    late = int(torch.randperm(n, generator=torch.Generator().manual_seed(0))[STREAMED_CHECK + 10])
    x[late, 0, 2, 2] = float("nan")
    with pytest.raises((ValueError, FloatingPointError), match="(?i)NaN"):
        prune(model, Items(x, y), method=method, budget=budget_for(method), n_samples=n)


@pytest.mark.parametrize("method", EVERY_METHOD)
def test_every_method_refuses_all_zero_data_and_data_that_is_mostly_copies(method):
    model = small_model("mlp")
    x, y = labelled(model, 64)
    with pytest.raises(ValueError, match="every calibration input is the same"):
        prune(model, (torch.zeros_like(x), y), method=method, budget=budget_for(method), n_samples=64)
    one_real = torch.zeros_like(x)
    one_real[0] = x[0]  # all zeros but one: MIPP used to cut every layer to one unit
    with pytest.raises(ValueError, match="only 2 distinct calibration inputs among 64.*at most 1 units per layer"):
        prune(model, (one_real, y), method=method, budget=budget_for(method), n_samples=64)
    repeated = x[:4].repeat(16, 1, 1, 1)  # a loader that repeats one small batch
    with pytest.raises(ValueError, match=f"only 4 distinct.*pass at least {MIN_DISTINCT_SAMPLES}"):
        prune(model, (repeated, y), method=method, budget=budget_for(method), n_samples=64)


@pytest.mark.parametrize("method", EVERY_METHOD)
def test_every_method_names_the_expected_input_shape(method):
    model = small_model("mlp")  # built for 1 x 28 x 28 inputs
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    with pytest.raises(ValueError, match=r"shape \(3, 32, 32\) per sample but the model takes \(1, 28, 28\) "
                                         r"\(its mipp_config: in_channels=1, input_size=28\)"):
        prune(model, (x, y), method=method, budget=budget_for(method), n_samples=64)


def test_copies_beyond_the_minimum_warn_with_the_distinct_count():
    model = small_model("mlp")
    x = inputs_for(model, 96)
    data = torch.cat([x[:30], x[:30], x[:30], x[:6]])  # 30 distinct among 96
    with pytest.warns(UserWarning, match="66 of 96 calibration inputs are exact copies of others \\(30 distinct\\)"):
        summary = check_calibration_data(data, x[:2], n_samples=96)
    assert (summary.n_checked, summary.n_distinct, summary.complete) == (96, 30, True)


def test_identical_inputs_are_refused_instead_of_gutting_the_network():
    model = small_model("lenet5")
    with pytest.raises(ValueError, match="every calibration input is the same"):
        prune(model, torch.zeros(64, 1, 28, 28), n_samples=64)


def test_wrong_input_shape_names_the_expected_shape():
    model = small_model("lenet5")  # built for 1 x 28 x 28 inputs
    with pytest.raises(ValueError, match=r"shape \(3, 32, 32\) per sample but the model takes \(1, 28, 28\)"):
        prune(model, torch.randn(64, 3, 32, 32), n_samples=64)


def test_a_foreign_model_names_the_shape_of_the_example_input_it_was_given():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"shape \(4, 3\) per sample but the model takes \(12,\) \(the shape of "
                                         r"its example input\)"):
        prune(model, torch.randn(64, 4, 3), example_input=torch.randn(2, 12), n_samples=64)


def test_an_example_input_the_model_cannot_run_names_its_shape():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"does not run on an example input of shape \(2, 5\)"):
        prune(model, torch.randn(64, 5), example_input=torch.randn(2, 5), n_samples=64)


class PairedRows(nn.Module):
    """A foreign model that only runs on an even number of samples (it pairs rows up): the trace and the data check
    pass, and its forward fails inside, on a batch of another size."""

    def __init__(self):
        super().__init__()
        self.front, self.hidden, self.act, self.head = nn.Linear(12, 12), nn.Linear(12, 8), nn.ReLU(), nn.Linear(16, 3)

    def forward(self, x):  # the reshape couples rows, so find_units leaves `hidden` unpruned; `front` is prunable
        return self.head(self.act(self.hidden(self.act(self.front(x)))).reshape(-1, 16))


def test_a_forward_that_fails_inside_the_model_is_re_raised_with_the_shapes():
    with pytest.raises(ValueError, match=r"fails on a calibration batch of shape \(63, 12\).*traced with an "
                                         r"example input of shape \(2, 12\)"):
        prune(PairedRows(), torch.randn(63, 12), example_input=torch.randn(2, 12), n_samples=63)


def test_inputs_of_another_dtype_are_refused_with_the_conversion():
    model = small_model("lenet5")
    x = inputs_for(model, 64)
    with pytest.raises(ValueError, match=r"inputs are float64 but the model takes float32.*x.to\(torch.float32\)"):
        prune(model, x.double(), n_samples=64)
    with pytest.raises(ValueError, match="inputs are uint8 but the model takes float32.*scale 8-bit images"):
        prune(model, (x * 50 + 128).clamp(0, 255).to(torch.uint8), n_samples=64)


def test_a_loader_whose_inputs_change_shape_is_refused():
    model = small_model("lenet5")
    batches = [torch.randn(16, 1, 28, 28), torch.randn(16, 1, 32, 32)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    with pytest.raises(ValueError, match=r"change shape: sample 0 of the loader's batch 1 has shape \(1, 32, 32\)"):
        prune(model, loader, n_samples=32)


def test_empty_calibration_data_is_refused():
    model = small_model("mlp")
    with pytest.raises(ValueError, match="empty"):
        prune(model, torch.randn(0, 1, 28, 28), n_samples=64)


def test_a_model_with_nan_weights_is_refused():
    model = small_model("lenet5")
    with torch.no_grad():
        model.features[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="'features.0.weight' contains NaN.*load a good checkpoint"):
        select_plan(model, inputs_for(model, 64), method="magnitude-l1", budget=0.5, n_samples=64)


def dead(model: nn.Module, conv: nn.Conv2d) -> nn.Module:
    """Every output of `conv` negative: its ReLU never fires and its layer is constant (zero)."""
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.fill_(-1.0) if conv.bias is not None else None
    return model


def test_a_model_whose_output_is_constant_is_refused_by_mipp():
    model = small_model("lenet5")
    dead(model, model.features[0])  # everything after the first layer is constant
    with pytest.raises(ValueError, match="output is the same for all 64 calibration samples"):
        prune(model, inputs_for(model, 64, rank=8), n_samples=64)


def test_a_dead_layer_is_named_in_a_warning_and_methods_that_cannot_rank_say_so():
    model = small_model("resnet18")
    block = model.layer1[0]
    dead(model, block.conv1)
    with torch.no_grad():  # the batch norm after it shifts the zeros below the ReLU's threshold
        block.bn1.bias.fill_(-1.0)
    data = inputs_for(model, 64, rank=8)
    with pytest.warns(UserWarning, match="every unit of 'layer1.0.conv1' is constant"):
        select_plan(model, data, n_samples=64)  # MIPP: the residual stream still carries the input
    model = small_model("resnet18")  # freshly built: every batch-norm scale is 1
    with pytest.warns(UserWarning, match=r"'tp-bn-scale' gave all \d+ units the same score \(1\)"):
        select_plan(model, data, method="tp-bn-scale", budget=0.5, n_samples=64)


def test_fewer_samples_than_a_layer_has_features_warns_for_mipp():
    model = small_model("mlp")  # a hidden layer of 64 units
    with pytest.warns(UserWarning, match="40 calibration samples for a layer of 64 features"):
        select_plan(model, inputs_for(model, 40, rank=8), n_samples=40)


def test_real_data_passes_without_a_warning():
    model = small_model("lenet5")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = check_calibration_data(inputs_for(model, 300), torch.zeros(2, 1, 28, 28), n_samples=300)
    assert (summary.n_checked, summary.n_distinct) == (300, 300)


def test_batches_are_checked_as_they_are_read():
    x = torch.randn(20, 3)
    x[13, 1] = float("nan")
    with pytest.raises(ValueError, match=r"input 13"):
        list(calibration_batches(x, 20, batch_size=8))
    assert len(list(calibration_batches(x, 8, batch_size=8))) == 1  # what is not read is not checked
