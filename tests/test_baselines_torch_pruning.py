"""The Torch-Pruning criteria score on the dependency graph `find_units` built (`ctx.units.dependency_graph`), not on
a graph of their own, give the scores a fresh graph of a scoring copy gives, and leave the caller's model as it was
(weights, `.grad` included)."""
import functools

import pytest
import torch
import torch_pruning as tp

from conftest import inputs_for, small_model
from mipp.api import make_context
from mipp.methods import get_method
from mipp.methods.gradients import labelled_batches, scoring_copy
from mipp.methods.torch_pruning_criteria import CRITERIA, GRADIENTS
from mipp.units import build_dependency_graph

N_SAMPLES = 16


@functools.lru_cache(maxsize=None)
def context(model_name):
    model = small_model(model_name)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # distinct batch-norm scales, as after training
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.2, 1.5, generator=generator)
    data = inputs_for(model, N_SAMPLES), torch.randint(0, 10, (N_SAMPLES,), generator=generator)
    return make_context(model, data, n_samples=N_SAMPLES)


def scores_on_a_fresh_graph(ctx, criterion):
    """The adapter as it was: gradients in the .grad of a scoring copy, a dependency graph built on that copy."""
    model = scoring_copy(ctx.model)
    if criterion in GRADIENTS:
        batches = labelled_batches(ctx.data, ctx.n_samples, seed=ctx.seed, method=criterion)
        for name, grad in GRADIENTS[criterion](model, batches).items():
            model.get_parameter(name).grad = grad
    graph = build_dependency_graph(model, ctx.example_input)
    importance, scores = CRITERIA[criterion](), {}
    for group in ctx.units.groups:
        root = model.get_submodule(group.key)
        prune_out = graph.get_pruner_of_module(root).prune_out_channels
        scores[group.key] = importance(graph.get_pruning_group(root, prune_out, list(range(group.size))))
    return {key: score.detach().double() for key, score in scores.items()}


@pytest.mark.parametrize("model_name", ["mlp", "lenet5", "resnet18"])
@pytest.mark.parametrize("criterion", ["tp-l1", "tp-lamp", "tp-fpgm", "tp-taylor", "tp-hessian", "tp-bn-scale"])
def test_scores_equal_those_on_a_fresh_graph_of_a_scoring_copy(criterion, model_name, monkeypatch):
    if criterion == "tp-bn-scale" and model_name != "resnet18":
        pytest.skip("BN-scale needs batch norm")
    ctx = context(model_name)
    expected = scores_on_a_fresh_graph(ctx, criterion)

    def no_new_graph(*args, **kwargs):
        raise AssertionError("the criterion built a dependency graph of its own")

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", no_new_graph)
    scores = get_method(criterion).score(ctx).scores
    assert set(scores) == set(expected)
    for key in expected:
        assert torch.allclose(scores[key], expected[key], rtol=0, atol=1e-12), key


@pytest.mark.parametrize("criterion", ["tp-taylor", "tp-hessian", "tp-l2"])
def test_the_callers_model_is_left_exactly_as_it_was(criterion):
    ctx = context("lenet5")
    params = dict(ctx.model.named_parameters())
    names = sorted(params)
    sentinel = {name: torch.full_like(params[name], 7.0) for name in names[::2]}  # some .grad set, the rest None
    for name in names:
        params[name].grad = sentinel.get(name)
    state = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    training = ctx.model.training
    get_method(criterion).score(ctx)
    assert all(torch.equal(v, ctx.model.state_dict()[k]) for k, v in state.items())
    assert ctx.model.training == training
    for name in names:
        assert params[name].grad is sentinel.get(name), name
        params[name].grad = None


def test_gradients_are_restored_when_scoring_fails(monkeypatch):
    ctx = context("mlp")
    first = next(iter(ctx.model.parameters()))
    first.grad = torch.ones_like(first)
    before = first.grad

    def failing(group):
        raise RuntimeError("criterion failed")

    monkeypatch.setitem(CRITERIA, "tp-taylor", lambda: failing)
    with pytest.raises(RuntimeError, match="criterion failed"):
        get_method("tp-taylor").score(ctx)
    assert first.grad is before
    first.grad = None


def test_a_unit_graph_without_its_dependency_graph_is_refused():
    model = small_model("mlp")
    ctx = make_context(model, inputs_for(model, 4), n_samples=4)
    ctx.units.dependency_graph = None
    with pytest.raises(ValueError, match="no torch-pruning dependency graph"):
        get_method("tp-l1").score(ctx)
