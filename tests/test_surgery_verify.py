"""Verified surgery: `apply_plan` checks the pruned model against the original with the removed units zeroed at
their reading points, and raises SurgeryError instead of handing back a model that computes something else."""
import copy

import pytest
import torch
import torch.nn as nn

import mipp
import mipp.surgery as surgery
from conftest import inputs_for, small_model
from mipp.surgery import SurgeryError, apply_plan, relative_difference
from mipp.units import find_units
from test_surgery import random_plan


def shifted_batch_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Batch norms with nonzero shifts and statistics: a removed conv channel then is not zero after its norm, so
    only zeroing where the unit is read (after norm, ReLU and residual add) equals removing it."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.weight.data = torch.rand(n, generator=generator) + 0.5
            module.bias.data = torch.randn(n, generator=generator)
            module.running_mean.copy_(torch.randn(n, generator=generator))
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.1)
    return model


def prepared(name: str, seed: int = 0):
    model = shifted_batch_norms(small_model(name, seed), seed)
    x = inputs_for(model, 4, seed=seed)
    units = find_units(model, x)
    return model, x, units, random_plan(units, x, seed=seed, keep=0.4)


@pytest.mark.parametrize("name", ["lenet5", "resnet18", "resnet50"])
def test_exact_surgery_passes_the_check_even_with_shifted_batch_norms_and_residual_adds(name):
    model, x, units, plan = prepared(name)
    reference = surgery.MaskedReference.record(model, plan, units, x)
    surgery.remove_units(model, plan, units)
    assert reference.check(model) < surgery.VERIFY_TOLERANCE / 100  # float rounding only (about 1e-7 measured)


def break_one_kept_weight(monkeypatch, module_name: str):
    """Surgery that slices correctly and then corrupts one weight of a kept channel."""
    removal = surgery.remove_units

    def broken(model, plan, units):
        removal(model, plan, units)
        with torch.no_grad():
            model.get_submodule(module_name).weight.view(-1)[0] += 1.0

    monkeypatch.setattr(surgery, "remove_units", broken)


def test_a_corrupted_weight_raises_and_names_the_layer_where_the_difference_starts(monkeypatch):
    model, x, units, plan = prepared("lenet5")
    break_one_kept_weight(monkeypatch, "features.3")
    with pytest.raises(SurgeryError, match=r"starts at layer 'features.3' \(produces group 'features.3'"):
        apply_plan(model, plan, x, units=units)


def test_removing_the_wrong_units_raises(monkeypatch):
    model, x, units, plan = prepared("resnet18")
    removal = surgery.remove_units

    def off_by_one(model, plan, units):  # removes, in one group, the neighbours of the planned units
        key = next(k for k in plan.kept if plan.removed(k))
        size = plan.sizes[key]
        shifted = {**plan.kept, key: sorted({(i + 1) % size for i in plan.kept[key]})}
        removal(model, mipp.Plan(kept=shifted, sizes=plan.sizes, method="broken"), units)

    monkeypatch.setattr(surgery, "remove_units", off_by_one)
    with pytest.raises(SurgeryError, match="surgery changed what the model computes"):
        apply_plan(model, plan, x, units=units)


def test_verify_false_skips_the_check(monkeypatch):
    model, x, units, plan = prepared("lenet5")
    break_one_kept_weight(monkeypatch, "features.3")
    pruned = apply_plan(model, plan, x, units=units, verify=False)
    assert pruned is model


def test_the_check_costs_one_forward_pass_of_the_example_batch_through_each_model():
    calls = {}
    for verify in (False, True):
        model, x, units, plan = prepared("resnet18")
        calls[verify] = []
        model.register_forward_pre_hook(lambda module, inputs, seen=calls[verify]: seen.append(len(inputs[0])))
        apply_plan(model, plan, x, units=units, verify=verify)
    assert calls == {False: [], True: [len(x), len(x)]}  # the masked original, then the pruned model


def test_the_check_runs_in_eval_mode_and_restores_every_module_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5),
                          nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    shifted_batch_norms(model)
    model.train()
    x = torch.randn(6, 12)
    units = find_units(model, x)
    model[2].eval()  # a frozen norm inside a training model keeps its own mode
    plan = random_plan(units, x, keep=0.5)
    statistics = model[2].running_mean.clone()
    apply_plan(model, plan, x, units=units)  # dropout in train mode would make the two passes differ
    assert model.training and not model[2].training and model[4].training
    kept = torch.tensor(plan.kept["1"])
    torch.testing.assert_close(model[2].running_mean, statistics[kept], rtol=0, atol=0)  # eval: stats untouched


def test_without_an_example_input_a_seeded_gaussian_batch_is_used(monkeypatch):
    model, x, units, plan = prepared("lenet5")
    seen = []
    record = surgery.MaskedReference.record
    monkeypatch.setattr(surgery.MaskedReference, "record",
                        lambda model, plan, units, batch: seen.append(batch) or record(model, plan, units, batch))
    apply_plan(model, plan)  # traced here, checked on a drawn batch
    assert len(seen) == 1 and seen[0].shape == x.shape and seen[0].std() > 0.5
    torch.testing.assert_close(seen[0], surgery.verification_input(model, units, None), rtol=0, atol=0)


class FeaturesAndLogits(nn.Module):
    """Returns its hidden features as well as the logits: the hidden layer is read (by the classifier) and also
    reaches the output, so removing its units changes the output's shape."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(6, 8)
        self.act = nn.ReLU()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        features = self.act(self.hidden(x))
        return self.head(features), features


def test_units_that_also_reach_the_output_raise_instead_of_changing_its_shape():
    torch.manual_seed(0)
    model = FeaturesAndLogits().eval()
    x = torch.randn(4, 6)
    units = find_units(model, x)
    assert [g.key for g in units.groups] == ["hidden"]
    plan = random_plan(units, x, keep=0.5)
    with pytest.raises(SurgeryError, match=r"output has shape.*\(4, 4\).*original's.*\(4, 8\)"):
        apply_plan(model, plan, x, units=units)


def test_prune_checks_surgery_before_reconstruction_and_recalibration(monkeypatch):
    model = shifted_batch_norms(small_model("resnet18"))
    data = inputs_for(model, 64, rank=8)
    pruned, plan = mipp.prune(model, data, method="random", budget=0.5, n_samples=64)  # repaired, and checked
    assert plan.settings["verify"] is True and plan.stats["surgery_seconds"] > 0
    # reconstruction and recalibration then change the pruned model: the check could not have run after them
    masked = surgery.mask_model(copy.deepcopy(model), plan)
    with torch.no_grad():
        assert relative_difference(pruned.eval()(data[:8]), masked(data[:8])) > 1e-3
    break_one_kept_weight(monkeypatch, "layer1.0.conv1")
    with pytest.raises(SurgeryError, match="layer1.0.conv1"):
        mipp.prune(model, data, method="random", budget=0.5, n_samples=64)
    mipp.prune(model, data, method="random", budget=0.5, n_samples=64, verify=False)  # off: no check


def test_surgery_error_is_exported():
    assert mipp.SurgeryError is SurgeryError and issubclass(SurgeryError, RuntimeError)


def test_relative_difference_handles_shapes_and_non_finite_values():
    a = torch.tensor([1.0, float("nan"), float("inf")])
    assert relative_difference(a, a.clone()) == 0.0
    assert relative_difference(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])) == float("inf")
    assert relative_difference(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 0.0])) == float("inf")
    assert relative_difference(torch.tensor([1.0, 4.0]), torch.tensor([1.0, 2.0])) == pytest.approx(0.5)


def test_relative_difference_can_be_taken_against_a_given_scale():
    assert relative_difference(torch.tensor([1e-7]), torch.tensor([1.1e-7]), scale=1e-3) == pytest.approx(1e-5, rel=1e-3)


def test_the_check_compares_in_float64_and_restores_every_dtype_exactly():
    model, x, units, plan = prepared("resnet18")
    model.get_submodule("fc").half()  # a mixed-precision model: each tensor must get its own dtype back
    model.fc.forward = lambda inp, fc=model.fc: nn.functional.linear(inp.to(fc.weight.dtype), fc.weight, fc.bias)
    before = {name: (t.dtype, t.clone()) for name, t in [*model.named_parameters(), *model.named_buffers()]}
    reference = surgery.MaskedReference.record(model, plan, units, x)
    assert reference.float64 and reference.output[0].dtype == torch.float64
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert tensor.dtype == before[name][0] and torch.equal(tensor, before[name][1]), name


class _Float32Only(nn.Module):
    """A layer with a hard-coded float32 tensor in its forward: it does not run in float64."""

    def forward(self, x):
        return x @ torch.eye(x.shape[-1], dtype=torch.float32)


def test_a_model_that_cannot_run_in_float64_is_checked_in_its_own_dtype(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), _Float32Only(), nn.Linear(8, 3)).eval()
    x = torch.randn(5, 6)
    units = find_units(model, x)
    plan = mipp.Plan(kept={"0": [0, 2, 5]}, sizes={"0": 8}, method="test")
    reference = surgery.MaskedReference.record(model, plan, units, x)
    assert not reference.float64 and reference.output[0].dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    apply_plan(model, plan, x, units=units)
    assert model[0].out_features == 3
    model, units = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), _Float32Only(), nn.Linear(8, 3)).eval(), None
    break_one_kept_weight(monkeypatch, "3")
    with pytest.raises(SurgeryError, match="surgery changed what the model computes"):  # the fall-back checks too
        apply_plan(model, plan, x)


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups), nn.BatchNorm2d(cout), nn.ReLU()]


def head(channels: int) -> list[nn.Module]:
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 3)]


class Concatenation(nn.Module):
    """Two branches concatenated along channels, then read by one conv."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Sequential(*conv_bn_relu(3, 8)), nn.Sequential(*conv_bn_relu(3, 6))
        self.c, self.head = nn.Sequential(*conv_bn_relu(14, 10)), nn.Sequential(*head(10))

    def forward(self, x):
        return self.head(self.c(torch.cat([self.a(x), self.b(x)], 1)))


class SqueezeExcite(nn.Module):
    """Channels scaled by a gate computed from their own means."""

    def __init__(self):
        super().__init__()
        self.a, self.fc1, self.fc2 = nn.Sequential(*conv_bn_relu(3, 12)), nn.Linear(12, 4), nn.Linear(4, 12)
        self.c, self.head = nn.Sequential(*conv_bn_relu(12, 8)), nn.Sequential(*head(8))

    def forward(self, x):
        y = self.a(x)
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3))))))
        return self.head(self.c(y * gate[:, :, None, None]))


LAYER_ZOO = {
    "depthwise": lambda: nn.Sequential(*conv_bn_relu(3, 16), *conv_bn_relu(16, 16, 3, 16), *conv_bn_relu(16, 24, 1),
                                       *head(24)),
    "concatenation": Concatenation,
    "squeeze-excite": SqueezeExcite,
    "prelu": lambda: nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.PReLU(12), nn.Conv2d(12, 8, 3, padding=1),
                                   nn.ReLU(), *head(8)),
    "conv1d": lambda: nn.Sequential(nn.Conv1d(3, 12, 5, padding=2), nn.BatchNorm1d(12), nn.ReLU(),
                                    nn.Conv1d(12, 10, 3), nn.BatchNorm1d(10), nn.ReLU(), nn.Flatten(),
                                    nn.Linear(140, 4)),
}


def random_layers(build, shape, seed=0):
    torch.manual_seed(seed)
    model = build()
    for parameter in model.parameters():
        parameter.data.normal_(0, 0.5)
    model = shifted_batch_norms(model, seed).eval()
    x = torch.randn(*shape)
    units = find_units(model, x)
    return model, x, units, random_plan(units, x, keep=0.5)


@pytest.mark.parametrize("name", sorted(LAYER_ZOO))
def test_surgery_is_exact_on_depthwise_concatenated_gated_prelu_and_1d_layers(name):
    shape = (4, 3, 16) if name == "conv1d" else (4, 3, 16, 16)
    model, x, units, plan = random_layers(LAYER_ZOO[name], shape)
    masked = surgery.mask_model(copy.deepcopy(model), plan, units)
    pruned = apply_plan(model, plan, x, units=units)  # checked inside
    with torch.no_grad():
        assert relative_difference(pruned(x), masked(x)) < 1e-5  # mask_model's weight masking agrees


def test_a_grouped_convolution_reader_leaves_its_group_unpruned():
    """find_units excludes a group read by a grouped convolution (each output reads only its own group of inputs),
    before any plan can remove part of it; with nothing else to prune, it says so and names the groups."""
    torch.manual_seed(0)
    model = nn.Sequential(*conv_bn_relu(3, 16), *conv_bn_relu(16, 32, 3, 4), *head(32)).eval()
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"groups it leaves unpruned \(0, 3\)"):
        find_units(model, torch.randn(4, 3, 16, 16))


def test_a_norm_across_channels_leaves_its_group_unpruned():
    """A LayerNorm over the units normalises the kept ones with statistics that included the removed ones: removal
    would differ from zeroing, so the group is excluded up front (named), and the rest prunes exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
                          nn.Linear(12, 3)).eval()
    x = torch.randn(4, 10)
    with pytest.warns(UserWarning, match=r"unpruned.*: 0 \(coupled with LayerNorm '1'"):
        units = find_units(model, x)
    assert "0" in units.excluded and "0" not in {g.key for g in units.groups}
    plan = random_plan(units, x, keep=0.5)
    apply_plan(model, plan, x, units=units)  # checked inside against the masked original
