"""Score-based criteria: one registered scoring function each, ranked into a Plan by the shared `plan_from_scores`;
the registry lists every built-in method explicitly."""
import pytest
import torch

import mipp.methods.registry as registry
from conftest import inputs_for, small_model
from mipp.api import make_context
from mipp.methods import Budget, PruneContext, UnitScores, get_method, method_names, plan_from_scores
from mipp.methods.registry import register_criterion

BUILTIN = ["grasp", "imp", "itergrasp", "itersnip", "magnitude", "magnitude-l1", "magnitude-l2", "mipp",
           "mipp-uniform", "mipp-widths", "prospr",
           "random", "snip", "sosp-h", "synflow", "taylor", "thinet", "tp-bn-scale", "tp-fpgm", "tp-hessian", "tp-l1",
           "tp-l2", "tp-lamp", "tp-taylor"]
FULL_SELECTS = {"imp", "itergrasp", "itersnip", "mipp", "mipp-uniform", "mipp-widths", "synflow"}  # not score-then-rank


@pytest.fixture
def scratch_registry(monkeypatch):
    """Methods registered in a test disappear after it."""
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))


def lenet_context(n=16):
    model = small_model("lenet5")
    generator = torch.Generator().manual_seed(0)
    return make_context(model, (inputs_for(model, n), torch.randint(0, 10, (n,), generator=generator)), n_samples=n)


def test_every_builtin_method_is_registered():
    assert method_names() == BUILTIN
    assert {name for name in BUILTIN if get_method(name).score is None} == FULL_SELECTS


def test_a_new_criterion_is_one_registered_function(scratch_registry):
    """The example of mipp.methods' docstring, registered and used by name."""

    @register_criterion("squared-weights", summary="sum of the squares of each unit's own weights")
    def score_squared_weights(ctx: PruneContext, include_readers: bool = False) -> UnitScores:
        squared = {name: p.detach().cpu().pow(2) for name, p in ctx.model.named_parameters()}
        scores = {group.key: group.reduce(squared, include_readers=include_readers) for group in ctx.units.groups}
        return UnitScores(scores, settings={"include_readers": include_readers})

    info = get_method("squared-weights")
    assert info.score is score_squared_weights and info.needs_budget and info.regimes == ("init", "trained")
    ctx = lenet_context()
    plan = info.select(ctx, Budget(0.4), include_readers=True)
    assert plan.method == "squared-weights"
    assert plan.settings == {"include_readers": True, "budget": {"fraction": 0.4, "metric": "units"}}
    scores = score_squared_weights(ctx, include_readers=True).scores
    for key, decisions in plan.decisions.items():
        assert [d.score for d in decisions] == scores[key].tolist()
    guarded = {key: int(torch.argmax(s)) for key, s in scores.items()}  # min_units=1: each group's best stays
    removed = [s for key in plan.kept for i, s in enumerate(scores[key].tolist()) if i in plan.removed(key)]
    kept = [s for key in plan.kept for i, s in enumerate(scores[key].tolist())
            if i in plan.kept[key] and i != guarded[key]]
    assert max(removed) <= min(kept)  # the lowest scores go, network-wide
    assert plan.stats["units_removed"] == pytest.approx(0.4, abs=0.01)


@pytest.mark.parametrize("name", [n for n in BUILTIN if n not in FULL_SELECTS and n != "tp-bn-scale"])
def test_every_criterion_scores_every_unit_and_its_plan_is_the_shared_ranking(name):
    ctx = lenet_context()
    result = get_method(name).score(ctx)
    assert set(result.scores) == {g.key for g in ctx.units.groups}
    for group in ctx.units.groups:
        assert result.scores[group.key].shape == (group.size,) and torch.isfinite(result.scores[group.key]).all()
    plan = get_method(name).select(ctx, Budget(0.5, "macs"))
    expected = plan_from_scores(ctx, result.scores, Budget(0.5, "macs"), name, result.settings, ranks=result.ranks)
    assert plan.to_dict() == expected.to_dict()


def test_thinet_records_each_units_position_in_its_greedy_order():
    ctx = lenet_context()
    plan = get_method("thinet").select(ctx, Budget(0.5), samples_per_input=4)
    for key, decisions in plan.decisions.items():
        ranks = [d.rank for d in decisions]
        assert sorted(ranks) == list(range(len(decisions)))
        by_rank = sorted(decisions, key=lambda d: d.rank)  # the greedy order removes first what it ranks first
        assert [d.score for d in by_rank] == sorted((d.score for d in decisions), reverse=True)
