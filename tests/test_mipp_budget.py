"""MIPP's budget mode (one price for information lost per unit of cost) and its greedy test order."""
import pytest
import torch

from conftest import inputs_for, small_model
from mipp import select_plan
from mipp.activations import capture
from mipp.api import make_context
from mipp.methods.mipp import PriceRule, sweep, sweep_order, unit_costs
from mipp.mi import get_estimator
from mipp.mi.gaussian import GaussianLayerSession
from mipp.models.planted import TRUTH, planted_inputs, planted_network
from mipp.plan import UnitDecision

N_CAL = 512


@pytest.mark.parametrize("name", ["mlp", "lenet5", "resnet18"])
@pytest.mark.parametrize("metric", ["units", "params", "macs"])
def test_budget_is_reached(name, metric):
    """Within the budget's tolerance, although one of LeNet-5's 6 first-layer channels is about 14% of its MACs:
    the search's last step skips costly units while cheaper ones still go."""
    model = small_model(name)
    data = inputs_for(model, N_CAL, rank=8)
    plan = select_plan(model, data, budget=0.5, metric=metric, n_samples=N_CAL)
    assert abs(plan.stats[f"{metric}_removed"] - 0.5) <= 0.005 + 1e-9, plan.stats
    assert set(plan.stats["lost_share"]) == set(plan.kept)
    assert all(0.0 <= share <= 1.0 + 1e-6 for share in plan.stats["lost_share"].values())
    assert plan.stats["price"] >= 0 and plan.stats["bisection_steps"] >= 1


def planted_context():
    model, data = planted_network(), planted_inputs(4000)
    ctx = make_context(model, data, example_input=data[:2], n_samples=4000)
    return ctx, capture(model, ctx.units, data, n_samples=4000)


def test_insignificant_units_go_at_any_price():
    ctx, acts = planted_context()
    costs = unit_costs(ctx, "units")
    estimator = get_estimator("gaussian")
    for price in (0.0, 1e-6):  # a price at which no significant unit is affordable
        removed = set(range(12)) - set(sweep(ctx, acts, estimator, PriceRule(price, costs), 0.99).kept[TRUTH.group])
        assert set(TRUTH.dead) <= removed and not removed & set(TRUTH.unique)
        assert all(len(removed & set(relation)) == 1 for relation in TRUTH.relations)


def test_budget_mode_recovers_the_planted_truth():
    """The planted layer's 5 redundant units are 5 of the net's 28: a budget of exactly that removes them, free."""
    model, data = planted_network(), planted_inputs(4000)
    for order in ("mi", "greedy"):
        plan = select_plan(model, data, budget=5 / 28, n_samples=4000, example_input=data[:2], confidence=0.99,
                           order=order)
        assert TRUTH.recovery(plan.kept)["exact"], (order, plan.kept)
        assert plan.stats["price"] == 0.0 and plan.stats["lost_share"][TRUTH.group] < 1e-6


def test_fewer_removals_than_insignificant_units_price_the_insignificant_ones():
    model, data = planted_network(), planted_inputs(4000)
    plan = select_plan(model, data, budget=2 / 28, n_samples=4000, example_input=data[:2], confidence=0.99)
    assert plan.stats["priced_units"] == "insignificant"
    removed = set(plan.removed(TRUTH.group))
    assert len(removed) == 2 and not removed & set(TRUTH.unique)


def test_greedy_order_tests_the_lowest_current_transfer_entropy_next():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 4, generator=g, dtype=torch.float64)
    units = torch.cat([x, x[:, :2] + 0.3 * torch.randn(2000, 2, generator=g, dtype=torch.float64),
                       torch.randn(2000, 2, generator=g, dtype=torch.float64)], 1)  # 8 units
    y = x @ torch.randn(4, 3, generator=g, dtype=torch.float64) + 0.5 * torch.randn(2000, 3, generator=g,
                                                                                   dtype=torch.float64)
    session = get_estimator("gaussian").session(units, y)
    tested = set()
    for unit in sweep_order(session, session.unit_mi(), "greedy"):
        entropies = session.transfer_entropies()
        candidates = [u for u in session.kept if u not in tested]
        assert unit == min(candidates, key=lambda u: float(entropies[u]))
        tested.add(unit)
        if not session.transfer_entropy(unit).significant:
            session.remove(unit)
    assert tested == set(range(8)) and len(session.kept) < 8  # every unit tested once; some removed


def test_budget_mode_is_deterministic():
    model = small_model("lenet5")
    data = inputs_for(model, N_CAL, rank=8)
    plans = [select_plan(model, data, budget=0.6, metric="macs", n_samples=N_CAL, order="greedy", seed=3)
             for _ in range(2)]
    assert plans[0].kept == plans[1].kept and plans[0].decisions == plans[1].decisions
    assert plans[0].stats["price"] == plans[1].stats["price"]


def test_unknown_order_is_a_clear_error():
    model = small_model("mlp")
    with pytest.raises(ValueError, match="order must be one of"):
        select_plan(model, inputs_for(model, N_CAL), n_samples=N_CAL, order="random")


def lenet5_at_full_width():
    """(context, per-unit MACs costs, kept units, decisions) of LeNet-5 with every unit kept."""
    model = small_model("lenet5")
    ctx = make_context(model, inputs_for(model, N_CAL, rank=8), n_samples=N_CAL)
    kept = {g.key: list(range(g.size)) for g in ctx.units.groups}
    decisions = {g.key: [UnitDecision(unit=i, kept=True) for i in range(g.size)] for g in ctx.units.groups}
    return ctx, unit_costs(ctx, "macs"), kept, decisions


def test_a_search_left_short_is_topped_up_with_the_cheapest_information():
    """Where the removed fraction jumps past the budget between two nearly equal prices, the closest sweep that
    falls short gets the kept units with the least variance share per cost removed until the budget is met."""
    from mipp.methods.base import Budget
    from mipp.methods.mipp import SweepResult, _top_up

    ctx, costs, kept, decisions = lenet5_at_full_width()
    shares = {g.key: [(i, 0.01 * (i + 1)) for i in range(g.size)] for g in ctx.units.groups}
    result = SweepResult(kept, decisions, {}, shares)
    budget = Budget(0.3, "macs")
    added = _top_up(ctx, result, costs, budget)
    reached = ctx.cost.fractions_removed(result.kept)["macs"]
    assert abs(reached - 0.3) <= budget.tolerance and added == sum(not d.kept for ds in decisions.values() for d in ds)
    # the cheapest per cost went first: within each group, the lowest shares (first units) are the ones removed
    for key, units in result.kept.items():
        removed = sorted(set(range(len(decisions[key]))) - set(units))
        assert removed == list(range(len(removed)))


def test_a_search_left_past_the_budget_gives_back_the_most_informative_units():
    """Where the closest sweep removed more than the budget (one coarse channel weighs several % of the MACs),
    removed units with the most variance share per cost are restored until the budget is met."""
    from mipp.methods.base import Budget
    from mipp.methods.mipp import SweepResult, _give_back

    ctx, costs, kept, decisions = lenet5_at_full_width()
    shares = {g.key: {} for g in ctx.units.groups}

    def remove(key, unit):
        kept[key].remove(unit)
        decisions[key][unit].kept = False
        shares[key][unit] = 0.01 * (unit + 1)

    for key, count in (("features.0", 2), ("features.3", 6)):  # coarse channels, several % of the MACs each
        for unit in range(count):
            remove(key, unit)
    while ctx.cost.fractions_removed(kept)["macs"] < 0.56:  # past the budget by some fine units' worth
        remove("classifier.0", kept["classifier.0"][0])  # a fully connected unit weighs about 0.1% of the MACs
    result = SweepResult(kept, decisions, {k: sum(v.values()) for k, v in shares.items()}, {}, shares)
    removed_before = {k: set(v) for k, v in shares.items()}
    budget = Budget(0.5, "macs")
    assert ctx.cost.fractions_removed(result.kept)["macs"] > 0.5 + budget.tolerance
    restored = _give_back(ctx, result, costs, budget)
    reached = ctx.cost.fractions_removed(result.kept)["macs"]
    assert abs(reached - 0.5) <= budget.tolerance and restored > 0
    back = {key: removed_before[key] & set(units) for key, units in result.kept.items()}
    assert restored == sum(len(b) for b in back.values())
    for key, units in result.kept.items():
        assert units == sorted(units) and [u for u, d in enumerate(decisions[key]) if d.kept] == units
        # within a group, the highest shares among the removed units are the ones restored
        assert all(u > v for u in back[key] for v in removed_before[key] - back[key])


def test_a_cached_sweep_replays_its_tests_and_decides_as_a_fresh_one(monkeypatch):
    """Budget mode's cache replays the tests of an earlier sweep from the same fresh session while the rule decides
    as it did then: a sweep at the same price computes no test again, and sweeps at other prices equal sweeps
    without a cache, decision for decision."""
    model = small_model("resnet18")
    data = inputs_for(model, 256, rank=8)
    ctx = make_context(model, data, n_samples=256)
    acts = capture(model, ctx.units, data, n_samples=256)
    estimator = get_estimator("gaussian")
    costs = unit_costs(ctx, "macs")
    cache = {}
    sweep(ctx, acts, estimator, PriceRule(1e-3, costs), 0.95, cache=cache)
    tests = []
    original = GaussianLayerSession.transfer_entropy
    monkeypatch.setattr(GaussianLayerSession, "transfer_entropy",
                        lambda self, i: tests.append(i) or original(self, i))
    again = sweep(ctx, acts, estimator, PriceRule(1e-3, costs), 0.95, cache=cache)
    assert tests == []
    for price in (1e-2, 1e-4, 1e-3):
        cached = sweep(ctx, acts, estimator, PriceRule(price, costs), 0.95, cache=cache)
        fresh = sweep(ctx, acts, estimator, PriceRule(price, costs), 0.95)
        assert cached.kept == fresh.kept and cached.lost_share == fresh.lost_share
        assert [[vars(d) for d in v] for v in cached.decisions.values()] == \
               [[vars(d) for d in v] for v in fresh.decisions.values()]
    assert again.kept == cached.kept


def test_a_plans_loss_is_what_its_own_sweep_lost():
    """`plan_loss` re-sweeps removing exactly a plan's units: for a plan the price search reached without repair,
    that is the variance share its sweep recorded as lost, layer by layer summed."""
    from mipp.methods import Budget, get_method
    from mipp.methods.mipp import MIPPSettings, plan_loss, prepare

    model = small_model("lenet5")
    ctx = make_context(model, inputs_for(model, 512), n_samples=512)
    plan = get_method("mipp").select(ctx, Budget(0.5, "macs"))
    assert plan.stats["repair"] is None and plan.stats["topped_up"] == plan.stats["given_back"] == 0
    settings = MIPPSettings()
    features, estimator, _ = prepare(ctx, settings, Budget(0.5, "macs"))
    lost = plan_loss(ctx, features, estimator, settings, {}, plan.kept)
    assert lost == pytest.approx(sum(plan.stats["lost_share"].values()), rel=1e-9, abs=1e-12)
    assert plan_loss(ctx, features, estimator, settings, {}, {k: list(range(len(v))) for k, v in
                                                             plan.decisions.items()}) == 0.0


def test_a_missed_budget_is_closed_the_way_that_loses_less():
    """Where the closest sweep misses the budget by more than its tolerance, the search closes the gap both ways
    (the closest short sweep topped up, the closest past one given back) and keeps the one whose removals lose
    the smaller variance share, measured by a sweep of each; both are recorded."""
    from mipp.methods import Budget, get_method
    from mipp.methods.mipp import MIPPSettings, plan_loss, prepare

    model = small_model("lenet5")
    ctx = make_context(model, inputs_for(model, 512), n_samples=512)
    budget = Budget(0.7, "params", tolerance=0.005)  # no price lands within the tolerance here
    plan = get_method("mipp").select(ctx, budget)
    repair = plan.stats["repair"]
    assert set(repair["lost_share"]) == {"topped_up", "given_back"}
    assert repair["chosen"] == min(repair["lost_share"], key=repair["lost_share"].get)
    assert abs(plan.stats["params_removed"] - 0.7) <= 0.005
    settings = MIPPSettings()
    features, estimator, _ = prepare(ctx, settings, budget)
    assert plan_loss(ctx, features, estimator, settings, {}, plan.kept) == pytest.approx(
        repair["lost_share"][repair["chosen"]], rel=1e-9)


def test_the_price_step_takes_the_units_whose_costs_close_the_gap():
    """After a sweep, the search moves the price past the ratios (variance share lost per cost) of just the units
    whose costs add up closest to the gap: short of the budget, the cheapest-ratio kept units; past it, the
    dearest-ratio removed ones. Units the price does not decide (insignificant ones, which go free) are ignored."""
    import math

    from mipp.methods.mipp import SweepResult, _log_price_from_sweep

    costs = {"a": 0.1, "b": 0.2}
    # (unit, significant, share, removed): ratios a: 0.5, 1, 3, 6; b: 0.25 (removed), 2, 5; one insignificant
    tested = {"a": [(0, True, 0.05, True), (1, True, 0.1, True), (2, True, 0.3, False), (3, True, 0.6, False),
                    (4, False, 0.0, True)],
              "b": [(0, True, 0.05, True), (1, True, 0.4, False), (2, True, 1.0, False)]}
    result = SweepResult({}, {}, {}, tested=tested)
    # price 1.5, short by 0.28: the kept ratios 2 (cost 0.2), 3 (0.1) add up to 0.3, closest: the price goes
    # between 3 and the next, 5
    assert _log_price_from_sweep(result, 1.5, -0.28, costs, False) == pytest.approx((0.5 * math.log(15), 0.3))
    # the same gap, where the last step changed the fraction by 0.6 of what it predicted: costs of 0.28 / 0.6,
    # closest 0.5 (ratios 2, 3, 5), so the price goes between 5 and 6
    assert _log_price_from_sweep(result, 1.5, -0.28, costs, False, gain=0.6)[0] == pytest.approx(0.5 * math.log(30))
    # short by 0.05: even the cheapest kept ratio (cost 0.2) overshoots by more than it closes: no step
    assert _log_price_from_sweep(result, 1.5, -0.05, costs, False) is None
    # past the budget by 0.1: of the removed ratios 1 (0.1), 0.5 (0.1), 0.25 (0.2), keeping the first closes it;
    # the price goes between 1 and 0.5
    assert _log_price_from_sweep(result, 1.5, 0.1, costs, False) == pytest.approx((0.5 * math.log(0.5), -0.1))
    # only insignificant units priced (`insignificant_only`): the one tested (share 0) is the lowest price
    assert _log_price_from_sweep(result, math.inf, 0.1, costs, True)[0] == pytest.approx(math.log(1e-15))
