"""The estimator contract and registry: every estimator takes a seed and declares its minimum number of samples,
and MIPP builds and checks estimators through that contract alone (no names compared, nothing guessed)."""
import warnings

import pytest
import torch

import mipp.mi.registry as registry
from conftest import inputs_for, small_model
from mipp import select_plan
from mipp.mi import (ESTIMATOR_NAMES, CMIEstimator, GaussianEstimator, estimator_names, get_estimator,
                     register_estimator)


@pytest.fixture
def scratch_registry(monkeypatch):
    """Estimators registered in a test disappear after it."""
    monkeypatch.setattr(registry, "ESTIMATORS", dict(registry.ESTIMATORS))


def test_builtin_estimators_are_registered_explicitly():
    assert estimator_names() == ["gaussian", "ksg", "proxy"] == list(ESTIMATOR_NAMES)


@pytest.mark.parametrize("name", ["gaussian", "ksg", "proxy"])
def test_every_estimator_keeps_the_contract(name):
    estimator = get_estimator(name, seed=7)
    assert isinstance(estimator, CMIEstimator) and estimator.name == name
    assert isinstance(estimator.min_samples, int) and estimator.min_samples >= 1
    assert isinstance(estimator.ridge_regularised, bool)
    if name != "gaussian":  # the Gaussian estimator draws no random numbers and ignores its seed
        assert estimator.seed == 7


def test_names_are_case_insensitive_and_errors_name_the_choices():
    assert isinstance(get_estimator("KSG"), registry.ESTIMATORS["ksg"])
    with pytest.raises(ValueError, match="unknown MI estimator 'histogram'; choose one of gaussian, ksg, proxy"):
        get_estimator("histogram")
    with pytest.raises(ValueError, match="bad options for the 'ksg' estimator"):
        get_estimator("ksg", bandwidth=2)


def test_only_named_estimators_can_register(scratch_registry):
    with pytest.raises(TypeError, match="CMIEstimator subclass"):
        register_estimator(dict)

    class Nameless(GaussianEstimator):
        name = ""

    with pytest.raises(TypeError, match="with a `name`"):
        register_estimator(Nameless)


def seed_recorder(built: list, min_samples: int = 20, ridge_regularised: bool = False):
    """A registered Gaussian estimator that records the seed it is built with."""

    @register_estimator
    class SeedRecorder(GaussianEstimator):
        name = "seed-recorder"

        def __init__(self, seed: int = 0, **options):
            super().__init__(**options)
            built.append(seed)

    SeedRecorder.min_samples, SeedRecorder.ridge_regularised = min_samples, ridge_regularised
    return SeedRecorder


def test_mipp_gives_the_run_seed_to_any_estimator_unless_its_options_set_one(scratch_registry):
    built = []
    seed_recorder(built)
    model = small_model("mlp")
    data = inputs_for(model, 200, rank=8)
    select_plan(model, data, n_samples=200, seed=5, estimator="seed-recorder")
    select_plan(model, data, n_samples=200, seed=5, estimator="seed-recorder", estimator_options={"seed": 9})
    assert built == [5, 9]


def test_mipp_checks_samples_against_the_estimators_declared_minimum(scratch_registry):
    seed_recorder([], min_samples=500)
    model = small_model("mlp")
    data = inputs_for(model, 200, rank=8)
    with pytest.raises(ValueError, match="200 calibration samples: the seed-recorder estimator needs at least 500"):
        select_plan(model, data, n_samples=200, estimator="seed-recorder")


@pytest.mark.parametrize("ridge_regularised", [True, False])
def test_mipp_warns_of_fewer_samples_than_features_only_for_ridge_regularised_estimators(scratch_registry,
                                                                                           ridge_regularised):
    seed_recorder([], ridge_regularised=ridge_regularised)
    model = small_model("mlp")  # the widest group has 64 units
    data = inputs_for(model, 40, rank=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        select_plan(model, data, n_samples=40, estimator="seed-recorder", confidence=0.9)
    ridge_warnings = [w for w in caught if "covariances are ridge-regularised" in str(w.message)]
    assert len(ridge_warnings) == (1 if ridge_regularised else 0)


def test_the_gaussian_estimator_accepts_and_ignores_a_seed():
    x = torch.randn(100, 2, generator=torch.Generator().manual_seed(0))
    y = x[:, :1] + 0.5 * torch.randn(100, 1, generator=torch.Generator().manual_seed(1))
    assert get_estimator("gaussian", seed=1).cmi(x, y) == get_estimator("gaussian", seed=2).cmi(x, y)
