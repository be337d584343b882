"""Wide Gaussian sessions (unit space and sample space) compute what GaussianLayerSession computes, without the joint
covariance; small problems keep GaussianLayerSession, so plans of models without wide groups stay exactly as they
were, and the sweep cache's bound changes no plan."""
import copy

import pytest
import torch

import mipp.methods.mipp as mipp_method
import mipp.mi.gaussian_wide as wide
from conftest import inputs_for, small_model
from mipp import select_plan
from mipp.mi import GaussianEstimator, GaussianLayerSession
from mipp.mi.gaussian_wide import SampleSpaceSession, UnitSpaceSession, open_session


def layer(n: int, m: int, f: int, d_y: int, seed: int = 0):
    """Units (n, m, f) driven by 12 latent factors plus noise, and a wide target read from some of them."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 12, generator=g, dtype=torch.float64)
    units = latent @ torch.randn(12, m * f, generator=g, dtype=torch.float64)
    units = (units + 0.5 * torch.randn(n, m * f, generator=g, dtype=torch.float64)).reshape(n, m, f)
    read = units.reshape(n, -1)[:, : min(m * f, 10)]
    target = read @ torch.randn(read.shape[1], d_y, generator=g, dtype=torch.float64)
    return units, target + torch.randn(n, d_y, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("n, m, f, d_y, kind", [
    (200, 40, 2, 1200, UnitSpaceSession),  # fewer unit features than samples, a target wider than both
    (100, 60, 3, 1100, SampleSpaceSession),  # more unit features than samples (a stream read at 3 points)
    (100, 150, 1, 1000, SampleSpaceSession),
])
def test_wide_sessions_match_the_joint_covariance_session(monkeypatch, n, m, f, d_y, kind):
    units, target = layer(n, m, f, d_y)
    estimator = GaussianEstimator()
    reference = estimator.session(units, target, 0.95)
    session = open_session(estimator, units, target, 0.95)
    assert type(reference) is GaussianLayerSession and type(session) is kind
    torch.testing.assert_close(session.unit_mi(), reference.unit_mi(), rtol=1e-7, atol=1e-10)
    order = torch.argsort(reference.unit_mi()).tolist()
    for step, unit in enumerate(order[: m - 2]):
        expected, got = reference.transfer_entropy(unit), session.transfer_entropy(unit)
        assert got.estimate == pytest.approx(expected.estimate, rel=1e-6, abs=1e-10)
        assert got.p_value == pytest.approx(expected.p_value, rel=1e-5, abs=1e-12)
        assert got.significant == expected.significant
        share = session.variance_share_lost(unit)
        assert share == pytest.approx(reference.variance_share_lost(unit), rel=1e-6, abs=1e-12)
        if step % 2 == 0:
            reference.remove(unit)
            session.remove(unit)
    assert session.kept == reference.kept
    kept = torch.tensor(reference.kept)
    torch.testing.assert_close(session.transfer_entropies()[kept], reference.transfer_entropies()[kept],
                               rtol=1e-6, atol=1e-10)


def test_a_copy_shares_the_units_side_and_removes_on_its_own():
    units, target = layer(100, 60, 3, 1100)
    session = open_session(GaussianEstimator(), units, target)
    twin = copy.deepcopy(session)
    assert twin.z is session.z and twin.side is session.side
    before = session.transfer_entropy(5).estimate
    twin.remove(3)
    assert 3 in session.kept and 3 not in twin.kept
    assert session.transfer_entropy(5).estimate == before


def test_small_problems_keep_the_joint_covariance_session():
    units, target = layer(300, 20, 1, 30)
    assert type(open_session(GaussianEstimator(), units, target)) is GaussianLayerSession
    units, target = layer(2000, 300, 1, 900)  # wide, but more samples than features
    assert type(open_session(GaussianEstimator(), units, target)) is GaussianLayerSession


@pytest.mark.parametrize("name", ["lenet5", "vgg11"])
@pytest.mark.parametrize("budget", [None, 0.5], ids=["confidence", "budget"])
def test_plans_of_models_without_wide_groups_are_unchanged(monkeypatch, name, budget):
    """The wide path disabled entirely (the previous code) and enabled give the same plan."""
    model = small_model(name)
    data = inputs_for(model, 256, rank=8)
    options = dict(budget=budget, metric="macs", n_samples=256)
    plan = select_plan(model, data, **options)
    monkeypatch.setattr(wide, "WIDE_FEATURES", 10 ** 12)
    assert select_plan(model, data, **options).kept == plan.kept


def test_wide_path_keeps_the_plan_of_a_resnet_read_at_many_points(monkeypatch):
    """ResNet-50 (bottleneck: streams read by every block) with the wide path forced on every group wider than the
    samples: the same units kept as with the joint covariance."""
    model = small_model("resnet50")
    data = inputs_for(model, 64, rank=8)
    options = dict(budget=0.5, metric="macs", n_samples=64)
    monkeypatch.setattr(wide, "WIDE_FEATURES", 10 ** 12)
    reference = select_plan(model, data, **options)
    monkeypatch.setattr(wide, "WIDE_FEATURES", 0)
    assert select_plan(model, data, **options).kept == reference.kept


def test_the_sweep_cache_bound_changes_no_plan(monkeypatch):
    model = small_model("lenet5")
    data = inputs_for(model, 256, rank=8)
    plan = select_plan(model, data, budget=0.5, metric="macs", n_samples=256)
    monkeypatch.setattr(mipp_method, "CACHED_TARGETS_PER_GROUP", 1)
    assert select_plan(model, data, budget=0.5, metric="macs", n_samples=256).kept == plan.kept
    monkeypatch.setattr(mipp_method, "CACHED_SESSION_BYTES", 0)  # every session opened again, trails kept
    opened = []
    open_session = mipp_method.PositionFeatures.open
    monkeypatch.setattr(mipp_method.PositionFeatures, "open",
                        lambda self, *args: opened.append(1) or open_session(self, *args))
    assert select_plan(model, data, budget=0.5, metric="macs", n_samples=256).kept == plan.kept
    assert len(opened) > len(plan.kept)  # sessions were opened again, not copied from the cache


def test_tensor_bytes_counts_each_tensor_once():
    shared = torch.zeros(10, dtype=torch.float64)
    holder = type("Holder", (), {})()
    holder.a, holder.b, holder.parts = shared, [shared, torch.zeros(3, dtype=torch.float32)], {"c": (shared,)}
    assert mipp_method.tensor_bytes(holder) == 80 + 12
