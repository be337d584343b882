"""Known properties of every baseline's score, checked on tiny hand-built networks.

Each test recomputes a method's unit score independently (closed-form gradients, explicit Hessians and Jacobians,
brute-force masking) and compares it with what the method module computes.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mipp.api import make_context, select_plan
from mipp.methods import Budget, get_method
from mipp.methods.gradients import (gauss_newton_vector_product, hessian_vector_product, labelled_batches,
                                    scoring_copy, zero_removed_units)
from mipp.methods.iterative import exponential_schedule, prune_progressively
from mipp.methods.prospr import masked_weights, meta_gradient
from mipp.methods.random_magnitude import weight_norms
from mipp.methods.saliency import grasp_scores, sosp_h_scores, taylor_scores
from mipp.methods.synflow import linearise, synaptic_saliency
from mipp.methods.thinet import greedy_removal_order, thinet_orders, unit_contributions
from mipp.units import find_units


def tiny_mlp(seed=0, bias=True, dtype=torch.float32):
    """4 -> 5 -> 3: one prunable group "0" of 5 hidden units, read by "2"."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5, bias=bias), nn.ReLU(), nn.Linear(5, 3, bias=bias)).to(dtype).eval()


def tiny_data(n=12, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=generator).to(dtype), torch.randint(0, 3, (n,), generator=generator)


def flat_loss(model, x, y, temperature=1.0):
    """The mean cross-entropy as a function of one flat parameter vector (for explicit Hessians / Jacobians)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]

    def unflatten(flat):
        out, start = {}, 0
        for name, shape in zip(names, shapes):
            size = shape.numel()
            out[name] = flat[start:start + size].view(shape)
            start += size
        return out

    def loss(flat):
        return F.cross_entropy(torch.func.functional_call(model, unflatten(flat), (x,)) / temperature, y)

    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    return loss, flat, unflatten


def per_unit(model, param_scores):
    """Sum of a parameter-level score over each hidden unit's own weights: row j of layer 0 and its bias."""
    return param_scores["0.weight"].sum(1) + (param_scores["0.bias"] if "0.bias" in param_scores else 0)


# ------------------------------------------------------------------------------------------------ random, magnitude


def test_random_is_seeded():
    model, data = tiny_mlp(), tiny_data()
    plans = [select_plan(model, data, method="random", budget=0.4, seed=s, example_input=data[0]) for s in (0, 0, 1)]
    assert plans[0].kept == plans[1].kept
    assert [d.score for d in plans[0].decisions["0"]] != [d.score for d in plans[2].decisions["0"]]


def test_magnitude_scores_are_row_norms_and_the_smallest_go_first():
    model = tiny_mlp()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1., -1, 0, 0], [3, 0, 0, 0], [0.1, 0, 0, 0.1], [-2, 2, 2, 0], [0, 0, .5, 0]]))
    x, y = tiny_data()
    units = find_units(model, x)
    l1 = weight_norms(model, units, p=1)["0"]
    l2 = weight_norms(model, units, p=2)["0"]
    torch.testing.assert_close(l1, torch.tensor([2., 3, 0.2, 6, 0.5], dtype=torch.float64))
    torch.testing.assert_close(l2, torch.tensor([2 ** .5, 3, 0.02 ** .5, 12 ** .5, 0.5], dtype=torch.float64))
    plan = select_plan(model, (x, y), method="magnitude-l1", budget=0.4, example_input=x)
    assert plan.removed("0") == [2, 4]  # the two smallest L1 norms
    with_readers = weight_norms(model, units, p=1, include_readers=True)["0"]
    torch.testing.assert_close(with_readers - l1, model[2].weight.detach().abs().sum(0).double())


# ------------------------------------------------------------------------------------------------ SNIP


def test_snip_equals_hand_computed_sum_of_abs_w_times_grad():
    model, (x, y) = tiny_mlp(), tiny_data()
    # closed-form back-propagation of the mean cross-entropy through Linear-ReLU-Linear
    w1, b1, w2 = model[0].weight.detach(), model[0].bias.detach(), model[2].weight.detach()
    hidden = x @ w1.T + b1
    probs = torch.softmax(torch.relu(hidden) @ w2.T + model[2].bias.detach(), 1)
    d_logits = (probs - F.one_hot(y, 3).float()) / len(x)
    d_hidden = (d_logits @ w2) * (hidden > 0).float()
    expected = (w1 * (d_hidden.T @ x)).abs().sum(1) + (b1 * d_hidden.sum(0)).abs()
    plan = select_plan(model, (x, y), method="snip", budget=0.4, example_input=x)
    scores = torch.tensor([d.score for d in plan.decisions["0"]], dtype=torch.float32)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-7)
    assert set(plan.removed("0")) == set(torch.argsort(expected)[:2].tolist())


def test_itersnip_with_one_round_is_snip():
    model, data = tiny_mlp(), tiny_data()
    snip = select_plan(model, data, method="snip", budget=0.4, example_input=data[0])
    one_round = select_plan(model, data, method="itersnip", budget=0.4, rounds=1, example_input=data[0])
    assert snip.kept == one_round.kept


# ------------------------------------------------------------------------------------------------ GraSP


def test_grasp_scores_are_minus_w_times_explicit_hessian_times_gradient():
    model, (x, y) = tiny_mlp(dtype=torch.float64), tiny_data(dtype=torch.float64)
    loss, flat, unflatten = flat_loss(model, x, y, temperature=2.0)
    grad = torch.autograd.functional.jacobian(loss, flat)
    hessian = torch.autograd.functional.hessian(loss, flat)
    saliency = unflatten(-flat * (hessian @ grad))  # GraSP's S = -w * Hg
    units = find_units(model, x)
    batches = labelled_batches((x, y), 12, batch_size=5)  # three batches: accumulation must equal the full loss
    copy = scoring_copy(model)
    torch.testing.assert_close(grasp_scores(copy, units, batches, "l1", temperature=2.0)["0"],
                               per_unit(model, {k: v.abs() for k, v in saliency.items()}))
    torch.testing.assert_close(grasp_scores(copy, units, batches, "sum", temperature=2.0)["0"],
                               -per_unit(model, saliency))


def test_hessian_vector_product_matches_explicit_hessian():
    model, (x, y) = tiny_mlp(dtype=torch.float64), tiny_data(dtype=torch.float64)
    loss, flat, unflatten = flat_loss(model, x, y)
    vector = torch.randn(flat.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = unflatten(torch.autograd.functional.hessian(loss, flat) @ vector)
    got = hessian_vector_product(scoring_copy(model), labelled_batches((x, y), 12, batch_size=7), unflatten(vector))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])


# ------------------------------------------------------------------------------------------------ SynFlow


def test_synflow_conserves_flow_through_every_unit_and_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.ReLU(), nn.Linear(6, 5, bias=False), nn.ReLU(),
                          nn.Linear(5, 3, bias=False)).double().eval()
    x = torch.randn(2, 4, dtype=torch.float64)
    units = find_units(model, x)
    clone = linearise(scoring_copy(model))
    saliency = synaptic_saliency(clone, x)
    flow = clone(torch.ones(1, 4, dtype=torch.float64)).sum()
    for group in units.groups:
        inflow = group.reduce(saliency)
        outflow = group.reduce(saliency, include_readers=True) - inflow
        torch.testing.assert_close(inflow, outflow)  # neuron-wise conservation
        torch.testing.assert_close(inflow.sum(), flow.detach())  # layer-wise: every layer carries all the flow
    assert all(s.min() >= 0 for s in saliency.values())


def test_synflow_masked_units_carry_no_flow():
    model = tiny_mlp(bias=False, dtype=torch.float64)
    x = torch.randn(2, 4, dtype=torch.float64)
    units = find_units(model, x)
    clone = zero_removed_units(linearise(scoring_copy(model)), units, {"0": {1, 3}})
    scores = units["0"].reduce(synaptic_saliency(clone, x))
    assert scores[1] == 0 and scores[3] == 0 and (scores[[0, 2, 4]] > 0).all()


# ------------------------------------------------------------------------------------------------ iterative schedule


def test_exponential_schedule_ends_at_the_budget_and_keeps_a_constant_share():
    schedule = exponential_schedule(0.75, 4)
    assert schedule[-1] == pytest.approx(0.75)
    kept = [1.0] + [1 - f for f in schedule]
    ratios = [b / a for a, b in zip(kept, kept[1:])]
    assert ratios == pytest.approx([0.25 ** 0.25] * 4)  # each round keeps the same share of what is left


def test_progressive_pruning_never_revives_a_unit_and_masks_what_it_removed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 40), nn.ReLU(), nn.Linear(40, 3)).eval()
    x = torch.randn(4, 4)
    ctx = make_context(model, None, example_input=x)
    generator = torch.Generator().manual_seed(0)
    history = []

    def adversarial_scores(removed, round_index):  # fresh random scores every round
        history.append(set(removed["0"]))
        return {"0": torch.rand(40, generator=generator)}

    plan = prune_progressively(ctx, Budget(0.6, "units"), adversarial_scores, rounds=4, method="test", settings={})
    assert [len(h) for h in history] == sorted(len(h) for h in history)
    assert all(a <= b for a, b in zip(history, history[1:]))
    assert history[-1] <= set(plan.removed("0")) and len(plan.removed("0")) == 24


# ------------------------------------------------------------------------------------------------ Taylor


def conv_net(seed=0):
    """Conv(1->3) -> Conv(3->2) -> global pool -> Linear(2->3): conv groups "0" (3 units) and "2" (2 units)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3)).eval()


def test_taylor_is_mean_abs_of_spatially_averaged_activation_times_gradient():
    model = conv_net()
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 1, 5, 5, generator=generator), torch.randint(0, 3, (6,), generator=generator)
    acts = {}

    def keep(key):
        def hook(module, inputs, output):
            output.retain_grad()
            acts[key] = output
        return hook

    # what the readers read: the first ReLU's output (conv reader) and the pooled, flattened second one (linear)
    hooks = [model[1].register_forward_hook(keep("0")), model[5].register_forward_hook(keep("2"))]
    F.cross_entropy(model(x), y, reduction="sum").backward()  # summed: each example's gradient of its own loss
    for h in hooks:
        h.remove()
    units = find_units(model, x)
    scores = taylor_scores(scoring_copy(model), units, labelled_batches((x, y), 6, batch_size=4), normalize=False)
    for key, a in acts.items():
        per_example = a * a.grad if a.dim() == 2 else (a * a.grad).mean((2, 3))
        expected = per_example.abs().mean(0).double()
        torch.testing.assert_close(scores[key], expected.detach())
    normalised = taylor_scores(scoring_copy(model), units, labelled_batches((x, y), 6), normalize=True)
    assert normalised["0"].norm() == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ SOSP-H


def test_sosp_h_uses_the_gauss_newton_product_with_all_prunable_weights():
    model, (x, y) = tiny_mlp(dtype=torch.float64), tiny_data(dtype=torch.float64)
    loss, flat, unflatten = flat_loss(model, x, y)
    names = [n for n, _ in model.named_parameters()]
    # explicit Gauss-Newton matrix J^T (diag p - p p^T) J / N of the mean cross-entropy
    logits_of = lambda f: torch.func.functional_call(model, unflatten(f), (x,))  # noqa: E731
    jacobian = torch.autograd.functional.jacobian(logits_of, flat)  # (N, C, P)
    probs = torch.softmax(logits_of(flat), 1)
    curvature = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    gauss_newton = torch.einsum("ncp,ncd,ndq->pq", jacobian, curvature, jacobian) / len(x)
    theta = unflatten(flat.clone())
    for name in names:
        if not name.startswith("0."):
            theta[name] = torch.zeros_like(theta[name])  # only units' own weights are removable
    theta_flat = torch.cat([theta[n].flatten() for n in names])
    batches = labelled_batches((x, y), 12, batch_size=5)
    got = gauss_newton_vector_product(scoring_copy(model), batches, theta)
    expected = unflatten(gauss_newton @ theta_flat)
    for name in names:
        torch.testing.assert_close(got[name], expected[name])
    grad = unflatten(torch.autograd.functional.jacobian(loss, flat))
    first = per_unit(model, {n: theta[n] * grad[n] for n in ("0.weight", "0.bias")})
    second = per_unit(model, {n: theta[n] * expected[n] for n in ("0.weight", "0.bias")})
    scores = sosp_h_scores(scoring_copy(model), find_units(model, x), batches)
    torch.testing.assert_close(scores["0"], (-first + 0.5 * second).abs())


# ------------------------------------------------------------------------------------------------ ProsPr


def test_prospr_without_inner_steps_is_the_mask_gradient_of_the_loss():
    model, (x, y) = tiny_mlp(), tiny_data()
    units = find_units(model, x)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), [model[0].weight, model[0].bias])
    expected = (model[0].weight * grads[0]).sum(1) + model[0].bias * grads[1]  # dL/dc at c = 1
    got = meta_gradient(scoring_copy(model), units, [(x, y)], inner_steps=0, lr=0.1)["0"]
    torch.testing.assert_close(got, expected.detach().double(), rtol=1e-5, atol=1e-7)


def test_prospr_meta_gradient_matches_finite_differences_through_sgd_steps():
    model = tiny_mlp(dtype=torch.float64)
    batches = [tiny_data(6, seed=s, dtype=torch.float64) for s in range(3)]
    units = find_units(model, batches[0][0])
    lr = 0.5

    def loss_after_steps(mask):
        w = masked_weights({n: p.detach() for n, p in model.named_parameters()}, units, {"0": mask})
        for inputs, labels in batches[:2]:
            w = {n: v.requires_grad_(True) if not v.requires_grad else v for n, v in w.items()}
            loss = F.cross_entropy(torch.func.functional_call(model, w, (inputs,)), labels)
            grads = torch.autograd.grad(loss, list(w.values()))
            w = {n: (v - lr * g).detach() for (n, v), g in zip(w.items(), grads)}
        inputs, labels = batches[2]
        return F.cross_entropy(torch.func.functional_call(model, w, (inputs,)), labels)

    got = meta_gradient(scoring_copy(model), units, batches, inner_steps=2, lr=lr)["0"]
    eps = 1e-6
    for unit in range(5):
        up, down = torch.ones(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
        up[unit] += eps
        down[unit] -= eps
        numeric = (loss_after_steps(up) - loss_after_steps(down)) / (2 * eps)
        assert float(got[unit]) == pytest.approx(float(numeric), rel=1e-4, abs=1e-8)


# ------------------------------------------------------------------------------------------------ ThiNet


def test_thinet_greedy_removes_the_units_that_change_the_next_layer_least():
    model, (x, _) = tiny_mlp(seed=3), tiny_data(20)
    with torch.no_grad():
        model[2].weight[:, 1] *= 1e-3  # unit 1 barely reaches the next layer: it must go first
    ctx = make_context(model, x, example_input=x, n_samples=20)
    order = thinet_orders(ctx, samples_per_input=None)["0"]
    assert order[0] == 1
    # brute force: mask candidate sets in the real network and measure the next layer's output change
    reference = model(x).detach()
    removed = []
    for _ in range(4):
        changes = {}
        for unit in set(range(5)) - set(removed):
            masked = zero_removed_units(scoring_copy(model), ctx.units, {"0": set(removed) | {unit}})
            with torch.no_grad():
                changes[unit] = float((masked(x) - reference).pow(2).sum())
        removed.append(min(changes, key=changes.get))
    assert order[:4] == removed


def test_thinet_contributions_add_up_to_the_readers_output():
    model = conv_net()
    x = torch.randn(3, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    units = find_units(model, x)
    group = units["0"]
    reader = model[2]
    inputs = torch.relu(model[0](x)).detach()
    contributions = unit_contributions(reader, inputs, group.coupled("in")[0], group.size, None, torch.Generator())
    expected = (reader(inputs) - reader.bias.view(1, -1, 1, 1)).detach().flatten()  # (N, O, H*W) order
    torch.testing.assert_close(contributions.sum(1).float(), expected, rtol=1e-5, atol=1e-5)


def test_thinet_sampled_outputs_are_outputs():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=2, dilation=2),
                          nn.Flatten(), nn.Linear(2 * 9, 3)).eval()
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    group = find_units(model, x)["0"]
    inputs = torch.relu(model[0](x)).detach()
    coupling = group.coupled("in")[0]
    every = unit_contributions(model[2], inputs, coupling, group.size, None, torch.Generator()).view(2, -1, 4)
    sampled = unit_contributions(model[2], inputs, coupling, group.size, 6, torch.Generator().manual_seed(1))
    for example, rows in enumerate(sampled.view(2, 6, 4)):
        for row in rows:  # each sampled output is one of the example's outputs
            assert torch.isclose(every[example], row, atol=1e-6).all(1).any()


def test_thinet_greedy_prefers_cancelling_pairs():
    # units 0 and 1 cancel exactly; alone each changes the output a lot, together not at all
    a = torch.randn(50, 1, generator=torch.Generator().manual_seed(0))
    contributions = torch.cat([a, -a, 0.6 * a.abs() + 0.1, 2 * a], 1)
    order = greedy_removal_order(contributions.T @ contributions, 3)
    assert order[0] == 2 and set(order[1:3]) == {0, 1}


def test_thinet_meets_budgets_with_a_uniform_ratio():
    from conftest import inputs_for, small_model

    model = small_model("vgg11")
    plan = select_plan(model, inputs_for(model, 8), method="thinet", budget=0.5, n_samples=8)
    fractions = [1 - len(plan.kept[k]) / plan.sizes[k] for k in plan.kept]
    assert max(fractions) - min(fractions) <= 1 / min(plan.sizes.values()) + 1e-9
    assert plan.stats["units_removed"] == pytest.approx(0.5, abs=0.01)


# ------------------------------------------------------------------------------------------------ data checks


@pytest.mark.parametrize("method", ["snip", "itersnip", "grasp", "itergrasp", "taylor", "sosp-h", "prospr",
                                    "tp-taylor", "tp-hessian", "imp"])
def test_gradient_methods_refuse_unlabelled_data(method):
    model, (x, _) = tiny_mlp(), tiny_data()
    with pytest.raises(ValueError, match="labelled"):
        select_plan(model, x, method=method, budget=0.4, example_input=x)


def test_data_free_and_activation_methods_take_unlabelled_data():
    model, (x, _) = tiny_mlp(), tiny_data()
    for method in ("random", "magnitude", "synflow", "thinet", "tp-l1", "tp-lamp", "tp-fpgm"):
        assert select_plan(model, x, method=method, budget=0.4, example_input=x).stats["units_removed"] > 0


def test_labelled_batches_accept_datasets_pairs_and_loaders():
    x, y = tiny_data(10)
    from torch.utils.data import DataLoader, TensorDataset

    for data in ((x, y), TensorDataset(x, y), DataLoader(TensorDataset(x, y), batch_size=3)):
        batches = labelled_batches(data, 7, batch_size=4)
        assert [len(b[0]) for b in batches] == [4, 3] and all(b[1].dtype == torch.long for b in batches)


def test_class_balanced_draws_take_a_fresh_block_of_every_class():
    from mipp.methods.gradients import class_balanced

    labels = torch.tensor([0, 1, 2] * 7 + [0] * 5)
    batches = [(torch.arange(len(labels)).float()[:, None], labels)]
    first, second = class_balanced(batches, 3), class_balanced(batches, 3, draw=1)
    for drawn in (first, second):
        assert torch.bincount(drawn[0][1]).tolist() == [3, 3, 3]
    assert not set(first[0][0].flatten().tolist()) & set(second[0][0].flatten().tolist())


def test_regimes_are_registered_as_the_papers_use_them():
    init = {"snip", "itersnip", "grasp", "itergrasp", "synflow", "prospr"}
    trained = {"thinet", "taylor", "sosp-h", "imp"}
    both = {"random", "magnitude", "magnitude-l1", "magnitude-l2", "tp-l1", "tp-l2", "tp-taylor", "tp-lamp",
            "tp-fpgm", "tp-bn-scale", "tp-hessian"}
    for names, regimes in ((init, ("init",)), (trained, ("trained",)), (both, ("init", "trained"))):
        for name in names:
            assert get_method(name).regimes == regimes, name
