"""Couplings mipp does not model are left unpruned, named in a warning and in the Plan; the rest is pruned safely.

Attention (nn.MultiheadAttention), recurrent layers (nn.LSTM) and channel-mixing tensor code that torch-pruning
cannot see (here a mean over channels) must never give a broken model: the groups they touch are excluded, and
everything else is pruned into a model that computes what the original computes with the removed units zeroed.
"""
import copy
import json

import pytest
import torch
from torch import nn

import mipp
from mipp.plan import Plan
from mipp.units import find_units, zeroed_units


class AttentionNet(nn.Module):
    """Tokens -> MLP -> self-attention (4 heads) -> mean over tokens -> classifier."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(8, 24)
        self.embed = nn.Linear(24, 16)
        self.attention = nn.MultiheadAttention(16, num_heads=4, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.embed(torch.relu(self.hidden(x)))
        x, _ = self.attention(x, x, x, need_weights=False)
        return self.head(x.mean(1))


class RecurrentNet(nn.Module):
    """Tokens -> Linear -> LSTM -> last step -> MLP -> classifier."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(8, 16)
        self.lstm = nn.LSTM(16, 12, batch_first=True)
        self.hidden = nn.Linear(12, 20)
        self.head = nn.Linear(20, 3)

    def forward(self, x):
        out, _ = self.lstm(torch.relu(self.inner(x)))
        return self.head(torch.relu(self.hidden(out[:, -1])))


class ChannelMeanNet(nn.Module):
    """Convs whose middle channels are centred by their mean over channels: a coupling in plain tensor code."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(3, 12, 3, padding=1)
        self.second = nn.Conv2d(12, 10, 3, padding=1)
        self.third = nn.Conv2d(10, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.first(x))
        x = torch.relu(self.second(x))
        x = x - x.mean(1, keepdim=True)  # every channel now depends on every other one
        x = torch.relu(self.third(x))
        return self.head(x.mean((2, 3)))


def tokens(n, seed=0):
    return torch.randn(n, 5, 8, generator=torch.Generator().manual_seed(seed))


def images(n, seed=0):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


CASES = {
    "attention": (AttentionNet, tokens, "embed", "MultiheadAttention 'attention'", "hidden"),
    "lstm": (RecurrentNet, tokens, "inner", "LSTM 'lstm'", "hidden"),
    "channel-mean": (ChannelMeanNet, images, "second", "beyond zeroing them", "first"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_unmodelled_coupling_is_excluded_with_a_warning_that_names_it(case):
    build, data, excluded, culprit, prunable = CASES[case]
    torch.manual_seed(0)
    model = build().eval()
    with pytest.warns(UserWarning, match="unpruned") as caught:
        units = find_units(model, data(2))
    assert excluded in units.excluded and culprit in units.excluded[excluded]
    assert any(excluded in str(w.message) and culprit in str(w.message) for w in caught)
    assert prunable in [g.key for g in units.groups], "the groups around the excluded one are still pruned"


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("method,budget", [("mipp", None), ("mipp", 0.4), ("random", 0.4)])
def test_model_with_unmodelled_coupling_prunes_into_a_working_model(case, method, budget):
    build, data, excluded, _, prunable = CASES[case]
    torch.manual_seed(0)
    model = build().eval()
    x = data(300)
    with pytest.warns(UserWarning, match="unpruned"):
        pruned, plan = mipp.prune(model, x, method=method, budget=budget, example_input=x[:2], n_samples=300,
                                  reconstruct=False, recalibrate=False)
    assert excluded in plan.excluded and excluded not in plan.kept
    assert prunable in plan.kept
    removed = {key: torch.tensor(plan.removed(key), dtype=torch.long) for key in plan.kept}
    with pytest.warns(UserWarning):
        groups = find_units(copy.deepcopy(model), x[:2]).groups
    with torch.no_grad(), zeroed_units(model, groups, removed):
        masked = model(x[:16])
    with torch.no_grad():
        output = pruned(x[:16])
    torch.testing.assert_close(output, masked, rtol=1e-4, atol=1e-5)
    if budget is not None:
        assert plan.units_kept < plan.units_total


def test_default_reconstruction_and_recalibration_work_beside_exclusions():
    torch.manual_seed(0)
    model = AttentionNet().eval()
    x = tokens(300)
    with pytest.warns(UserWarning, match="unpruned"):
        pruned, plan = mipp.prune(model, x, method="random", budget=0.4, example_input=x[:2], n_samples=300)
    assert pruned(x[:4]).shape == (4, 3) and plan.stats["readers_refitted"] >= 1


def test_plan_records_exclusions_and_old_plan_files_load_without_them(tmp_path):
    plan = Plan(kept={"a": [0]}, sizes={"a": 2}, method="test", excluded={"b": "coupled with LSTM 'b'"})
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json").excluded == {"b": "coupled with LSTM 'b'"}
    assert "not pruned: b" in plan.summary()
    old = plan.to_dict()
    del old["excluded"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert Plan.load(tmp_path / "old.json").excluded == {}


def test_trial_leaves_the_model_exactly_as_it_was():
    torch.manual_seed(0)
    model = ChannelMeanNet().eval()
    x = images(4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(x)
    with pytest.warns(UserWarning):
        find_units(model, x[:2])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert (model.first.out_channels, model.second.out_channels, model.third.in_channels) == (12, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


class ConcatNet(nn.Module):
    """Two dense layers: torch-pruning edits its concatenations' sizes in place when the trial removes channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(8)
        self.grow1 = nn.Conv2d(8, 6, 3, padding=1)
        self.norm2 = nn.BatchNorm2d(14)
        self.grow2 = nn.Conv2d(14, 6, 3, padding=1)
        self.norm3 = nn.BatchNorm2d(20)
        self.mix = nn.Conv2d(20, 10, 1)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.grow1(torch.relu(self.norm1(x)))], 1)
        x = torch.cat([x, self.grow2(torch.relu(self.norm2(x)))], 1)
        return self.head(torch.relu(self.mix(torch.relu(self.norm3(x)))).mean((2, 3)))


def test_a_plan_applied_after_the_trial_equals_the_masked_original():
    torch.manual_seed(0)
    model = ConcatNet().eval()
    x = images(8)
    units = find_units(model, x[:2])
    assert not units.excluded
    generator = torch.Generator().manual_seed(5)  # another removal than the trial's
    kept = {g.key: torch.randperm(g.size, generator=generator)[: g.size // 2 + 1].tolist() for g in units.groups}
    plan = Plan(kept=kept, sizes={g.key: g.size for g in units.groups}, method="test")
    removed = {key: torch.tensor(plan.removed(key), dtype=torch.long) for key in kept}
    with torch.no_grad(), zeroed_units(model, units.groups, removed):
        masked = model(x)
    pruned = mipp.apply_plan(model, plan, units=units)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked, rtol=1e-4, atol=1e-5)


def test_a_reshape_mapping_that_explodes_leaves_its_root_unpruned_instead_of_running_on(monkeypatch):
    """torch-pruning's flatten mapping compounds strides through Swin-T's window partitions into lists of millions
    of indices (hours of tracing); beyond MAX_MAPPED_INDICES the root it starts from is excluded with the reason.
    Here the bound is lowered below what LeNet-5's Flatten (16 channels of 5 x 5) needs."""
    import mipp.units as units
    from conftest import inputs_for, small_model

    model = small_model("lenet5")
    x = inputs_for(model, 2)
    whole = find_units(model, x)
    monkeypatch.setattr(units, "MAX_MAPPED_INDICES", 100)
    with pytest.warns(UserWarning, match="a reshape maps 16 indices to 400"):
        bounded = find_units(model, x)
    assert "features.3" in bounded.excluded and "features.3" in [g.key for g in whole.groups]
    assert {g.key for g in bounded.groups} == {g.key for g in whole.groups} - {"features.3"}
    monkeypatch.setattr(units, "MAX_MAPPED_INDICES", 10 ** 6)
    monkeypatch.setattr(units, "MAX_GROUP_INDICES", 100)  # the same for the indices a group holds in all
    with pytest.warns(UserWarning, match="more than 100 indices over its layers"):
        bounded = find_units(model, x)
    assert "features.3" in bounded.excluded
