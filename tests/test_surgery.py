"""Units, physical removal and the cost counter, on every architecture family (no estimator involved)."""
import copy

import pytest
import torch

from conftest import inputs_for, small_model
from mipp.measure import CostModel, count_macs, count_params
from mipp.plan import Plan
from mipp.surgery import apply_plan, mask_model
from mipp.units import find_units


def random_plan(units, x, seed=0, keep=0.5):
    generator = torch.Generator().manual_seed(seed)
    kept = {g.key: torch.randperm(g.size, generator=generator)[: max(1, int(g.size * keep))].tolist()
            for g in units.groups}
    return Plan(kept=kept, sizes={g.key: g.size for g in units.groups}, method="test", example_shape=list(x.shape))


def test_units_exclude_outputs_and_are_ordered_from_output(model_name):
    model = small_model(model_name)
    units = find_units(model)
    assert units.output_modules, "the classifier must be recognised as an output"
    for group in units.groups:
        assert group.key not in units.output_modules and group.size >= 1 and group.readers
    positions = [g.position for g in units.groups]
    assert positions == sorted(positions, reverse=True)


def test_pruned_model_equals_masked_original_and_costs_fall_as_predicted(model_name):
    model = small_model(model_name)
    x = inputs_for(model, 4)
    units = find_units(model, x)
    plan = random_plan(units, x)
    cost = CostModel.build(model, units)
    params, macs = cost.predict(plan.kept)
    pruned = apply_plan(copy.deepcopy(model), plan)
    masked = mask_model(copy.deepcopy(model), plan, units)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked(x), rtol=1e-4, atol=1e-5)
    assert count_params(pruned) == params < count_params(model)
    assert count_macs(pruned, x) == macs < count_macs(model, x)
    # every group physically has exactly the kept width
    for group in find_units(pruned, x).groups:
        assert group.size == len(plan.kept[group.key])


def test_masking_changes_outputs_so_the_equivalence_is_not_vacuous():
    model = small_model("lenet5")
    x = inputs_for(model, 4)
    units = find_units(model, x)
    masked = mask_model(copy.deepcopy(model), random_plan(units, x), units)
    with torch.no_grad():
        assert not torch.allclose(model(x), masked(x))


def test_plan_json_round_trip_rebuilds_identical_model(tmp_path):
    model = small_model("resnet18")
    x = inputs_for(model, 2)
    plan = random_plan(find_units(model, x), x, seed=3)
    pruned = apply_plan(copy.deepcopy(model), plan)
    plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded.kept == plan.kept and loaded.sizes == plan.sizes
    rebuilt = apply_plan(small_model("resnet18", seed=99), loaded)  # other weights, same architecture
    rebuilt.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), pruned(x), rtol=0, atol=0)


def test_plan_rejects_empty_groups_and_foreign_models():
    model = small_model("lenet5")
    units = find_units(model)
    sizes = {g.key: g.size for g in units.groups}
    kept = {k: list(range(s)) for k, s in sizes.items()}
    with pytest.raises(ValueError, match="empties group"):
        Plan(kept={**kept, "features.0": []}, sizes=sizes, method="x")
    with pytest.raises(ValueError, match="outside"):
        Plan(kept={**kept, "features.0": [99]}, sizes=sizes, method="x")
    plan = Plan(kept=kept, sizes=sizes, method="x")
    with pytest.raises(ValueError, match="does not have"):
        apply_plan(small_model("mlp"), plan)


def test_reduce_sums_parameter_scores_per_unit():
    model = small_model("lenet5")
    units = find_units(model)
    group = units["features.0"]  # conv 1->6, 5x5, with bias
    conv = model.features[0]
    scores = {"features.0.weight": conv.weight.abs(), "features.0.bias": conv.bias.abs()}
    expected = conv.weight.abs().sum((1, 2, 3)) + conv.bias.abs()
    torch.testing.assert_close(group.reduce(scores).float(), expected.detach())


def test_readers_of_one_tensor_give_one_reading_point():
    model = small_model("resnet18")
    units = find_units(model)
    points = [c.module_name for c in units.reading_points["layer3.0.shortcut.0"]]
    # layer4.0.conv1 and layer4.0.shortcut.0 read the same tensor: its features must be captured once
    assert points == ["layer3.1.conv1", "layer4.0.shortcut.0"]
