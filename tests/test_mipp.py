"""MIPP end to end: both stopping rules on every architecture family, planted redundancy, budgets, determinism."""
import copy

import pytest
import torch

from conftest import inputs_for, small_model
from mipp import prune, select_plan
from mipp.measure import count_macs, count_params
from mipp.models.planted import TRUTH, planted_inputs, planted_network
from mipp.plan import Plan
from mipp.surgery import apply_plan, mask_model
from mipp.units import find_units

N_CAL = 512


@pytest.mark.parametrize("budget", [None, 0.5], ids=["confidence", "budget"])
def test_prunes_every_family_to_a_smaller_equivalent_model(model_name, budget):
    model = small_model(model_name)
    data = inputs_for(model, N_CAL, rank=8)
    pruned, plan = prune(model, data, budget=budget, n_samples=N_CAL, confidence=0.95,
                        reconstruct=False, recalibrate=False)  # compared with the masked original
    x = data[:8]
    masked = mask_model(copy.deepcopy(model), plan)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked(x), rtol=1e-4, atol=1e-4)
    assert count_params(pruned) == plan.stats["params_kept"] <= count_params(model)
    assert count_macs(pruned, x) == plan.stats["macs_kept"] <= count_macs(model, x)
    assert all(len(kept) >= 1 for kept in plan.kept.values())
    if budget is not None:  # (confidence mode may keep everything: a random ReLU net need not be redundant)
        assert abs(plan.stats["units_removed"] - budget) <= 0.01
    for key, records in plan.decisions.items():  # the record explains every removal
        removed = set(plan.removed(key))
        assert {r.unit for r in records if not r.kept} == removed
        assert all(r.score is not None for r in records if not r.kept)


def test_planted_redundancy_is_found_exactly():
    model, data = planted_network(), planted_inputs(4000)
    plan = select_plan(model, data, n_samples=4000, example_input=data[:2], confidence=0.99)
    removed = set(plan.removed(TRUTH.group))
    assert set(TRUTH.dead) <= removed
    for relation in TRUTH.relations:
        assert len(removed & set(relation)) == 1, f"exactly one of {relation} must go, removed {sorted(removed)}"
    assert not removed & set(TRUTH.unique)
    assert len(removed) == len(TRUTH.dead) + len(TRUTH.relations)


@pytest.mark.parametrize("metric", ["units", "macs"])
def test_budget_mode_hits_targets_within_one_point(metric):
    model = small_model("vgg11")
    data = inputs_for(model, N_CAL)
    for target in (0.3, 0.5, 0.7, 0.9):
        plan = select_plan(model, data, budget=target, metric=metric, n_samples=N_CAL)
        assert abs(plan.stats[f"{metric}_removed"] - target) <= 0.01, (target, plan.stats)


def test_confidence_knob_orders_sparsity():
    model = small_model("lenet5")
    data = inputs_for(model, N_CAL)
    loose = select_plan(model, data, n_samples=N_CAL, confidence=0.6).units_kept
    strict = select_plan(model, data, n_samples=N_CAL, confidence=0.999).units_kept
    assert strict <= loose


def test_same_seed_same_plan_and_saved_plan_rebuilds_model(tmp_path):
    model = small_model("resnet18")
    data = inputs_for(model, N_CAL)
    pruned, plan = prune(model, data, budget=0.6, n_samples=N_CAL, seed=7)
    _, again = prune(model, data, budget=0.6, n_samples=N_CAL, seed=7)
    assert again.kept == plan.kept and again.decisions == plan.decisions
    plan.save(tmp_path / "plan.json")
    rebuilt = apply_plan(small_model("resnet18", seed=1), Plan.load(tmp_path / "plan.json"))
    rebuilt.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(data[:4]), pruned(data[:4]))


def test_minimum_width_guard_is_reported():
    model = small_model("lenet5")
    data = inputs_for(model, N_CAL)
    plan = select_plan(model, data, budget=0.9, n_samples=N_CAL, min_units=4)  # at most 92.9% reachable
    assert all(len(kept) >= 4 for kept in plan.kept.values())
    assert plan.guard_hits, "at 90% of units something must sit at the guard"


def test_clear_errors_for_bad_input():
    model = small_model("lenet5")
    data = inputs_for(model, N_CAL)
    with pytest.raises(ValueError, match="unreachable"):
        select_plan(model, data, budget=0.99, n_samples=N_CAL, min_units=0.5)
    with pytest.raises(ValueError, match="calibration samples"):
        select_plan(model, data[:10], n_samples=10)
    with pytest.raises(ValueError, match="NaN"):
        select_plan(model, torch.full_like(data, float("nan")), n_samples=N_CAL)
    with pytest.raises(ValueError, match="no prunable layer"):
        find_units(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="unknown pruning method"):
        select_plan(model, data, method="nope", budget=0.5)


def test_pool_grid_reaches_linear_readers_of_flattened_maps():
    """pool=2 gives every conv channel 2x2 grid features, also where a Linear reads the flattened map (LeNet-5's
    last conv, read by classifier.0): the grid equals adaptive pooling of the map the Linear reads."""
    import torch.nn.functional as F

    from mipp.activations import capture
    from mipp.models import build_model

    torch.manual_seed(0)
    model = build_model("lenet5", num_classes=10, in_channels=1, input_size=28).eval()
    x = torch.randn(64, 1, 28, 28)
    units = find_units(model, x[:2])
    mean, grid = (capture(model, units, x, n_samples=64, pool=pool, seed=0) for pool in (None, 2))
    assert grid.units["features.3"].shape == (64, 16, 4) and mean.units["features.3"].shape == (64, 16, 1)
    with torch.no_grad():
        maps = model.features(x)  # (64, 16, 5, 5): what classifier.0 reads, flattened
    assert torch.allclose(grid.units["features.3"], F.adaptive_avg_pool2d(maps, 2).flatten(2), atol=1e-6)
    assert torch.allclose(mean.units["features.3"][..., 0], maps.mean((2, 3)), atol=1e-6)
    assert grid.units["classifier.0"].shape == (64, 120, 1)  # neurons stay single features
