"""The ablations of MIPP: its widths with another choice inside each layer, and uniform widths with its choice."""
import pytest
import torch

from conftest import inputs_for, small_model
from mipp import select_plan
from mipp.api import make_context
from mipp.methods.ablations import uniform_widths
from mipp.methods.base import Budget
from mipp.methods.random_magnitude import weight_norms

N_CAL = 256


@pytest.mark.parametrize("within", ["random", "l1"])
def test_mipp_widths_keep_mipps_counts_and_choose_inside_each_layer_otherwise(within):
    model = small_model("lenet5")
    data = inputs_for(model, N_CAL, rank=8)
    mipp = select_plan(model, data, budget=0.6, metric="macs", n_samples=N_CAL)
    plan = select_plan(model, data, method="mipp-widths", budget=0.6, metric="macs", n_samples=N_CAL, within=within)
    assert {k: len(v) for k, v in plan.kept.items()} == {k: len(v) for k, v in mipp.kept.items()}
    assert plan.stats["macs_removed"] == pytest.approx(mipp.stats["macs_removed"])
    assert plan.settings["within"] == within and plan.stats["mipp_kept"] == mipp.kept
    if within == "l1":  # the kept units are each group's largest by L1 norm
        norms = weight_norms(model, make_context(model, data, n_samples=N_CAL).units, 1)
        for key, kept in plan.kept.items():
            largest = torch.argsort(norms[key], descending=True, stable=True)[: len(kept)].tolist()
            assert kept == sorted(largest)
    assert plan.kept != mipp.kept  # a different choice inside the layers (MIPP's is not the same by chance)
    with pytest.raises(ValueError, match="within must be one of"):
        select_plan(model, data, method="mipp-widths", budget=0.6, n_samples=N_CAL, within="taylor")


def test_mipp_uniform_keeps_one_share_everywhere_and_removes_in_mipps_test_order():
    model = small_model("vgg11")
    data = inputs_for(model, N_CAL, rank=8)
    plan = select_plan(model, data, method="mipp-uniform", budget=0.5, metric="macs", n_samples=N_CAL)
    ctx = make_context(model, data, n_samples=N_CAL)
    widths = uniform_widths(ctx, Budget(0.5, "macs"))
    assert {k: len(v) for k, v in plan.kept.items()} == widths == plan.stats["widths"]
    shares = [len(plan.kept[k]) / plan.sizes[k] for k in plan.kept]
    assert max(shares) - min(shares) <= max(1 / size for size in plan.sizes.values()) + 1e-9
    assert abs(plan.stats["macs_removed"] - 0.5) <= 0.02  # as close as whole units at one share allow
    for key, decisions in plan.decisions.items():  # the removed units are the first ones MIPP tested
        removed = [d.rank for d in decisions if not d.kept]
        assert sorted(removed) == list(range(len(removed)))
