"""Every baseline on every architecture: budgets of units, parameters and MACs met within 1 percentage point, the
plan applied physically, reachability through `mipp.api.prune`, and the Torch-Pruning adapter against
torch-pruning's own global pruning."""
import copy
import functools
import json

import pytest
import torch
import torch_pruning as tp

from conftest import inputs_for, small_model
from mipp.api import make_context, prune
from mipp.methods import Budget, get_method, method_names
from mipp.methods.gradients import labelled_batches, scoring_copy
from mipp.methods.torch_pruning_criteria import CRITERIA, GRADIENTS
from mipp.plan import Plan
from mipp.surgery import apply_plan

MODELS = ("mlp", "lenet5", "vgg11", "resnet18")
BASELINES = [name for name in method_names() if not name.startswith("mipp")]  # MIPP and its ablations: own tests
NEEDS_BATCH_NORM = {"tp-bn-scale"}
N_SAMPLES = 16
# the iterative methods with few rounds, IMP with a tiny re-training: the properties do not depend on these numbers
FAST_OPTIONS = {"synflow": dict(rounds=5), "itersnip": dict(rounds=3), "itergrasp": dict(rounds=3),
                "thinet": dict(samples_per_input=4), "prospr": dict(batch_size=8),
                "imp": dict(rounds=2, train_options=dict(batch_size=8))}


def labelled(model, n=N_SAMPLES, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return inputs_for(model, n, seed), torch.randint(0, 10, (n,), generator=generator)


@functools.lru_cache(maxsize=None)
def context(model_name):
    model = small_model(model_name)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # distinct batch-norm scales, as after training, so that BN-scale has no ties to break
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.2, 1.5, generator=generator)
    return make_context(model, labelled(model), n_samples=N_SAMPLES)


def applies(method, model_name):
    return not (method in NEEDS_BATCH_NORM and model_name in ("mlp", "lenet5"))


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("method", BASELINES)
def test_budget_met_within_one_point_on_every_metric(method, model_name):
    if not applies(method, model_name):
        pytest.skip(f"{method} needs batch norm, which {model_name} has not")
    ctx = context(model_name)
    info = get_method(method)
    for metric in ("units", "params", "macs"):
        plan = info.select(ctx, Budget(0.4, metric), **FAST_OPTIONS.get(method, {}))
        assert plan.method == method
        assert abs(plan.stats[f"{metric}_removed"] - 0.4) <= 0.01, (metric, plan.stats)
        assert all(len(kept) >= 1 for kept in plan.kept.values())
    pruned = apply_plan(copy.deepcopy(ctx.model), plan)  # the last (MACs) plan, applied physically
    with torch.no_grad():
        out = pruned(ctx.example_input)
    assert out.shape == ctx.model(ctx.example_input).shape and torch.isfinite(out).all()


@pytest.mark.parametrize("method", BASELINES)
def test_every_method_is_reachable_through_api_prune(method):
    model = small_model("vgg11")
    data = labelled(model, 8)
    options = dict(FAST_OPTIONS.get(method, {}))
    pruned, plan = prune(model, data, method=method, budget=0.3, metric="params", n_samples=8, seed=1, **options)
    assert plan.method == method and plan.seed == 1
    assert plan.stats["params_removed"] == pytest.approx(0.3, abs=0.01)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert pruned(data[0][:2]).shape == (2, 10)
    text = json.dumps(plan.to_dict(), allow_nan=False)  # finite scores, JSON-able settings
    assert Plan.from_dict(json.loads(text)).kept == plan.kept


def test_same_seed_same_plan():
    ctx = context("resnet18")
    for method in ("random", "thinet", "prospr"):
        first = get_method(method).select(ctx, Budget(0.5), **FAST_OPTIONS.get(method, {}))
        second = get_method(method).select(ctx, Budget(0.5), **FAST_OPTIONS.get(method, {}))
        assert first.kept == second.kept, method


def test_imp_retrains_the_physically_pruned_model_between_rounds(monkeypatch):
    import mipp.train

    trained = []  # unit widths of every model IMP re-trains

    def recording_fit(model, *args, **kwargs):
        trained.append({name: m.out_features if isinstance(m, torch.nn.Linear) else m.out_channels
                        for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))})
        return real_fit(model, *args, **kwargs)

    real_fit = mipp.train.fit
    monkeypatch.setattr(mipp.train, "fit", recording_fit)
    ctx = context("lenet5")
    model_before = copy.deepcopy(ctx.model.state_dict())
    plan = get_method("imp").select(ctx, Budget(0.5), rounds=2, epochs_per_round=1,
                                    train_options=dict(batch_size=8, lr=0.01))
    assert all(torch.equal(v, ctx.model.state_dict()[k]) for k, v in model_before.items())  # original untouched
    assert len(trained) == 1  # after every round but the last
    widths = {key: trained[0][key] for key in plan.kept}
    assert all(len(plan.kept[key]) <= widths[key] <= size for key, size in plan.sizes.items())
    first_round = 1 - 0.5 ** 0.5  # the exponential schedule's first target
    assert 1 - sum(widths.values()) / ctx.units.total_units == pytest.approx(first_round, abs=0.01)
    assert plan.settings["rounds"] == 2 and plan.stats["units_removed"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("model_name", ["lenet5", "vgg11", "resnet18"])
@pytest.mark.parametrize("criterion", sorted(CRITERIA))
def test_torch_pruning_adapter_keeps_what_torch_pruning_keeps(criterion, model_name):
    """Our plan against `tp.pruner.MetaPruner(global_pruning=True)` with the same criterion and ratio of units.

    torch-pruning removes n = total - int(total * (1 - ratio)) channels network-wide (the output layer ignored) by
    thresholding the criterion's scores; we ask for the budget n / total of units, which global ranking of the same
    scores meets exactly, so both must remove the very same units.
    """
    if not applies(criterion, model_name):
        pytest.skip(f"{criterion} needs batch norm")
    ctx = context(model_name)
    total, ratio = ctx.units.total_units, 0.3
    n_removed = total - int(total * (1 - ratio))  # torch-pruning's definition of the ratio
    plan = get_method(criterion).select(ctx, Budget(n_removed / total, "units"))

    direct = scoring_copy(ctx.model)
    if criterion in GRADIENTS:
        gradients = GRADIENTS[criterion](direct, labelled_batches(ctx.data, N_SAMPLES, seed=ctx.seed))
        for name, param in direct.named_parameters():
            param.grad = gradients[name]
    names = {module: name for name, module in direct.named_modules()}
    pruner = tp.pruner.MetaPruner(direct, ctx.example_input, importance=CRITERIA[criterion](), global_pruning=True,
                                  pruning_ratio=ratio,
                                  ignored_layers=[direct.get_submodule(n) for n in ctx.units.output_modules])
    removed_by_tp = {}
    for group in pruner.step(interactive=True):
        idxs = sorted(int(i) for i in group[0].idxs)
        if idxs:
            removed_by_tp[names[group[0].dep.target.module]] = idxs
    ours = {key: plan.removed(key) for key in plan.kept if plan.removed(key)}
    assert sum(map(len, ours.values())) == n_removed
    assert ours == removed_by_tp


def test_a_ranking_that_cannot_be_filled_to_the_budget_gives_units_back_instead(monkeypatch):
    """LeNet-5 at 90% of MACs by Torch-Pruning L1: no prefix of the global ranking lands within the tolerance (a
    first-layer channel is worth 6% of the MACs), and filling from below removed every fully connected unit but one
    per layer and still fell short. Restoring units to the shortest prefix past the target lands within it and
    keeps the classifier; with the give-back disabled the old, collapsed plan comes back."""
    import mipp.methods.base as base
    from mipp.api import make_context
    from mipp.methods import Budget, get_method

    model = small_model("lenet5")
    data = inputs_for(model, 256)
    plan = get_method("tp-l1").select(make_context(model, data, n_samples=256), Budget(0.9, "macs"))
    assert abs(plan.stats["macs_removed"] - 0.9) <= 0.005
    assert len(plan.kept["classifier.0"]) > 1 and len(plan.kept["classifier.2"]) > 1
    monkeypatch.setattr(base, "_give_back_to_budget", lambda ctx, candidates, n, budget, fallback: fallback)
    filled = get_method("tp-l1").select(make_context(model, data, n_samples=256), Budget(0.9, "macs"))
    assert abs(filled.stats["macs_removed"] - 0.9) > 0.005
    assert len(filled.kept["classifier.0"]) == len(filled.kept["classifier.2"]) == 1
