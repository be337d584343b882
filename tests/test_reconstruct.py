"""Reconstruction and batch-norm recalibration: exact where the removed units are exactly redundant, better than
plain removal elsewhere, and every reader layout (Flatten, residual streams, concatenations, grouped convs)."""
import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mipp
from conftest import inputs_for, small_model
from mipp.models.planted import TRUTH, planted_inputs, planted_network
from mipp.plan import Plan
from mipp.recalibrate import batch_norms
from mipp.reconstruct import ReaderStatistics


def manual_plan(removed: dict[str, list[int]], sizes: dict[str, int]) -> Plan:
    kept = {key: [i for i in range(size) if i not in removed.get(key, [])] for key, size in sizes.items()}
    return Plan(kept=kept, sizes=sizes, method="manual")


def prune_by_hand(model, plan, data, example, reconstruct=True):
    """The select/apply flow a user writes by hand: statistics before surgery, re-fit after."""
    pruned = copy.deepcopy(model)
    units = mipp.find_units(pruned, example)
    statistics = mipp.reconstruction_statistics(pruned, plan, data, units=units, n_samples=len(data))
    mipp.apply_plan(pruned, plan, units=units)
    if reconstruct:
        mipp.refit_readers(pruned, statistics)
    return pruned


def max_error(a, b, x):
    with torch.no_grad():
        return float((a(x) - b(x)).abs().max())


def relative_mse(model, reference, x):
    with torch.no_grad():
        target = reference(x)
        return float(((model(x) - target) ** 2).mean() / target.var())


def test_linear_reader_replaces_an_exactly_redundant_unit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3)).eval()  # linear hidden layer: unit 5 = unit 0 + unit 1
    with torch.no_grad():
        model[0].weight[5] = model[0].weight[0] + model[0].weight[1]
        model[0].bias[5] = model[0].bias[0] + model[0].bias[1]
    data, held_out = torch.randn(500, 6), torch.randn(200, 6)
    plan = manual_plan({"0": [5]}, {"0": 8})
    assert max_error(prune_by_hand(model, plan, data, data[:2]), model, held_out) < 1e-4
    assert max_error(prune_by_hand(model, plan, data, data[:2], reconstruct=False), model, held_out) > 1e-2


def test_a_reader_with_fewer_rows_than_kept_inputs_keeps_the_weights_the_rows_do_not_determine():
    """20 calibration rows for a reader of 40 kept inputs: the fit pulls towards the original weights (the ridge's
    prior), so the re-fitted reader is still about the original on inputs the rows never spanned, where a pull
    towards zero drops every component outside the rows' span (LeNet-5's classifier got weights of 30 that way)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 41), nn.ReLU(), nn.Linear(41, 3)).eval()
    data, held_out = torch.randn(20, 10), torch.randn(200, 10)
    plan = manual_plan({"0": [40]}, {"0": 41})
    refitted = prune_by_hand(model, plan, data, data[:2])
    original = model[2].weight.detach()[:, :40]
    assert float((refitted[2].weight.detach() - original).norm() / original.norm()) < 0.5
    assert relative_mse(refitted, model, held_out) < relative_mse(prune_by_hand(model, plan, data, data[:2],
                                                                                reconstruct=False), model, held_out)
    pruned = copy.deepcopy(model)
    units = mipp.find_units(pruned, data[:2])
    statistics = mipp.reconstruction_statistics(pruned, plan, data, units=units, n_samples=len(data))
    statistics["2"].prior = None  # the pull towards zero: the part the rows do not determine is lost
    mipp.apply_plan(pruned, plan, units=units)
    mipp.refit_readers(pruned, statistics)
    assert float((pruned[2].weight.detach() - original).norm() / original.norm()) > 0.5


@pytest.mark.parametrize("conv,options", [
    (nn.Conv2d, dict(kernel_size=3, stride=2, padding=2, dilation=2)),
    (nn.Conv1d, dict(kernel_size=3, padding=1, padding_mode="reflect")),
    (nn.Conv3d, dict(kernel_size=2, stride=1)),
], ids=["conv2d-stride-dilation", "conv1d-reflect", "conv3d"])
def test_conv_reader_patches_follow_the_weight_layout(conv, options):
    """A conv reader after a linear conv whose channel 5 = channel 0 + channel 1: re-fitted from its sampled patches,
    it reproduces its output exactly, which only holds if the patches match weight.reshape(out, -1)."""
    torch.manual_seed(0)
    model = nn.Sequential(conv(2, 6, kernel_size=1), conv(6, 4, **options)).eval()
    with torch.no_grad():
        model[0].weight[5] = model[0].weight[0] + model[0].weight[1]
        model[0].bias[5] = model[0].bias[0] + model[0].bias[1]
    spatial = {nn.Conv1d: (12,), nn.Conv2d: (9, 9), nn.Conv3d: (5, 5, 5)}[conv]
    data, held_out = torch.randn(200, 2, *spatial), torch.randn(20, 2, *spatial)
    pruned = prune_by_hand(model, manual_plan({"0": [5]}, {"0": 6}), data, data[:2])
    assert max_error(pruned, model, held_out) < 1e-4


@pytest.mark.parametrize("seed", range(5))
def test_planted_network_is_pruned_losslessly_and_its_truth_recovered(seed):
    model, data = planted_network(seed), planted_inputs(4000, seed=seed)
    pruned, plan = mipp.prune(model, data, example_input=data[:2], n_samples=4000, confidence=0.99)
    assert TRUTH.recovery(plan.kept)["exact"]
    held_out = planted_inputs(1000, seed=100 + seed)
    with torch.no_grad():
        torch.testing.assert_close(pruned(held_out), model(held_out), rtol=1e-5, atol=1e-4)
    assert plan.settings["reconstruct"] and plan.stats["readers_refitted"] == 1


class ConcatNet(nn.Module):
    """Two conv branches concatenated and read by one conv, then a Linear after a Flatten. Branch b's channel 2 is a
    copy of branch a's channel 0."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 5, 3, padding=1)
        self.merge = nn.Conv2d(11, 8, 3, padding=1)
        self.head = nn.Linear(8 * 8 * 8, 4)
        with torch.no_grad():
            self.b.weight[2], self.b.bias[2] = self.a.weight[0], self.a.bias[0]

    def forward(self, x):
        h = torch.relu(torch.cat([self.a(x), self.b(x)], 1))
        return self.head(torch.relu(self.merge(h)).flatten(1))


def test_concatenation_reader_takes_the_right_slice_of_each_group():
    torch.manual_seed(0)
    model = ConcatNet().eval()
    data, held_out = torch.randn(300, 3, 8, 8), torch.randn(50, 3, 8, 8)
    plan = manual_plan({"b": [2]}, {"a": 6, "b": 5, "merge": 8})
    assert max_error(prune_by_hand(model, plan, data, data[:2]), model, held_out) < 1e-4


@pytest.mark.parametrize("name", ["resnet18", "lenet5", "concat"])
def test_reconstruction_reduces_the_error_of_a_random_plan_on_held_out_inputs(name):
    torch.manual_seed(0)
    model = ConcatNet().eval() if name == "concat" else small_model(name)
    make = (lambda n, seed: torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))) \
        if name == "concat" else (lambda n, seed: inputs_for(model, n, seed=seed, rank=16))
    data, held_out = make(512, 0), make(256, 1)
    errors = {}
    for reconstruct in (False, True):
        pruned, plan = mipp.prune(model, data, method="random", budget=0.4, n_samples=512, example_input=data[:2],
                                  reconstruct=reconstruct, recalibrate=False)
        errors[reconstruct] = relative_mse(pruned, model, held_out)
    assert errors[True] < 0.5 * errors[False], errors


@pytest.mark.parametrize("name", ["resnet18", "lenet5", "concat"])
def test_sequential_reconstruction_compensates_what_earlier_layers_leave(name):
    """Each reader re-fitted from the pruned network's own inputs: the output error of a random plan is below that
    of re-fitting every reader from the original inputs, on held-out inputs, and the caller's model is untouched."""
    torch.manual_seed(0)
    model = ConcatNet().eval() if name == "concat" else small_model(name)
    make = (lambda n, seed: torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))) \
        if name == "concat" else (lambda n, seed: inputs_for(model, n, seed=seed, rank=16))
    data, held_out = make(512, 0), make(256, 1)
    before = copy.deepcopy(model.state_dict())
    errors, plans = {}, {}
    for mode in ("independent", "sequential"):
        pruned, plans[mode] = mipp.prune(model, data, method="random", budget=0.4, n_samples=512,
                                         example_input=data[:2], reconstruct=mode, recalibrate=False)
        errors[mode] = relative_mse(pruned, model, held_out)
    assert plans["sequential"].kept == plans["independent"].kept
    assert plans["sequential"].settings["reconstruct"] == "sequential"
    assert errors["sequential"] < errors["independent"], errors
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sequential_reconstruction_replaces_exactly_redundant_units():
    model, data = planted_network(0), planted_inputs(4000, seed=0)
    pruned, plan = mipp.prune(model, data, example_input=data[:2], n_samples=4000, confidence=0.99,
                              reconstruct="sequential")
    assert TRUTH.recovery(plan.kept)["exact"] and plan.stats["readers_refitted"] == 1
    held_out = planted_inputs(1000, seed=100)
    with torch.no_grad():
        torch.testing.assert_close(pruned(held_out), model(held_out), rtol=1e-5, atol=1e-4)


def _statistics(x, y, prior):
    stats = ReaderStatistics("r", torch.arange(x.shape[1]), torch.arange(y.shape[1]), True,
                             torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64),
                             torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64),
                             torch.zeros(x.shape[1], dtype=torch.float64), torch.zeros(y.shape[1], dtype=torch.float64),
                             prior=prior, output_square=torch.zeros(y.shape[1], dtype=torch.float64))
    stats.add(x.double(), y.double())
    return stats


def test_validated_ridge_keeps_an_exact_fit_exact_and_shrinks_a_noisy_one():
    """Generalised cross-validation: with a target that is an exact linear function of the inputs, the validated
    solution is the plain one; with noise and barely more rows than inputs it shrinks towards the prior, and
    predicts held-out rows better than the plain fit."""
    generator = torch.Generator().manual_seed(0)
    truth, prior = torch.randn(3, 40, generator=generator, dtype=torch.float64), torch.zeros(3, 40,
                                                                                            dtype=torch.float64)
    x = torch.randn(400, 40, generator=generator, dtype=torch.float64)
    exact = _statistics(x, x @ truth.T + 0.5, prior)
    weight, bias = exact.solve_validated()
    torch.testing.assert_close(weight, truth, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias, torch.full((3,), 0.5, dtype=torch.float64), rtol=1e-5, atol=1e-5)

    x, held = x[:50], torch.randn(1000, 40, generator=generator, dtype=torch.float64)
    noisy = _statistics(x, x @ (0.1 * truth.T) + 3 * torch.randn(50, 3, generator=generator, dtype=torch.float64),
                        prior)

    def held_out_error(solution):
        weight, bias = solution
        return float((held @ weight.T + bias - held @ (0.1 * truth.T)).square().mean())

    assert held_out_error(noisy.solve_validated()) < 0.5 * held_out_error(noisy.solve())


def test_one_pass_refit_chooses_its_ridge_and_keeps_weights_bounded_where_the_fit_is_not_exact():
    """`refit_readers` solves with the validated ridge by default. The case it guards: the removed unit carries
    signal the kept ones cannot give, and a kept input varies very little (a nearly dead unit), so the fixed tiny
    ridge explains the rest with huge weights on it (ThiNet's choice on a LeNet-5 base: weights up to 43, and
    fine-tuning diverged); the validated ridge keeps them near the prior and predicts held-out rows better."""
    from mipp.reconstruct import RIDGE, refit_readers

    generator = torch.Generator().manual_seed(0)

    def inputs(n):
        kept = torch.randn(n, 3, generator=generator, dtype=torch.float64)
        kept[:, 2] *= 1e-3  # a nearly dead kept unit
        removed = torch.randn(n, 1, generator=generator, dtype=torch.float64)  # independent of the kept ones
        return kept, removed

    kept, removed = inputs(60)
    truth = torch.tensor([[1.0, -1.0, 0.5]], dtype=torch.float64)
    stats = _statistics(kept, kept @ truth.T + removed, truth.clone())
    solutions = {}
    for ridge in (None, RIDGE):
        reader = nn.Linear(3, 1).double()
        refit_readers(reader_model := nn.Sequential(reader), {"0": stats}, ridge=ridge)
        solutions[ridge] = (reader_model[0].weight.detach().clone(), reader_model[0].bias.detach().clone())
    for got, want in zip(solutions[None], stats.solve_validated()):
        torch.testing.assert_close(got, want)
    for got, want in zip(solutions[RIDGE], stats.solve(RIDGE)):
        torch.testing.assert_close(got, want)
    assert solutions[RIDGE][0].abs().max() > 20 * solutions[None][0].abs().max()

    held, held_removed = inputs(2000)
    target = held @ truth.T  # the best the kept units can do: the removed one's signal is unpredictable

    def held_out_error(solution):
        weight, bias = solution
        return float((held @ weight.T + bias - target).square().mean())

    assert held_out_error(solutions[None]) < held_out_error(solutions[RIDGE])


class TokenNet(nn.Module):
    """Linear layers over a token dimension (as in a transformer's MLP); hidden unit 5 is a copy of unit 0."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 6), nn.Linear(6, 3)
        with torch.no_grad():
            self.up.weight[5], self.up.bias[5] = self.up.weight[0], self.up.bias[0]

    def forward(self, x):
        return self.down(torch.relu(self.up(x))).mean(1)


@pytest.mark.parametrize("mode", ["independent", "sequential"])
def test_linear_readers_over_tokens_replace_a_copied_unit_exactly(mode):
    """A Linear reading (batch, tokens, features): its output channels are the last dimension, not the second."""
    torch.manual_seed(0)
    model, data = TokenNet().eval(), torch.randn(256, 5, 8)
    plan = manual_plan({"up": [5]}, {"up": 6})
    pruned = copy.deepcopy(model)
    units = mipp.find_units(pruned, data[:2])
    original = copy.deepcopy(pruned)
    statistics = mipp.reconstruction_statistics(pruned, plan, data, units=units, n_samples=256)
    mipp.apply_plan(pruned, plan, units=units)
    if mode == "sequential":
        mipp.refit_sequentially(original, pruned, plan, data, units=units, n_samples=256)
    else:
        mipp.refit_readers(pruned, statistics)
    assert max_error(pruned, model, torch.randn(64, 5, 8)) < 1e-4


def test_a_bad_reconstruct_value_is_refused():
    with pytest.raises(ValueError, match="reconstruct must be"):
        mipp.prune(small_model("lenet5"), torch.randn(8, 1, 28, 28), method="random", budget=0.3,
                   reconstruct="both")


def test_depthwise_reader_is_skipped_with_a_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                          nn.ReLU(), nn.Conv2d(8, 6, 1), nn.Flatten(), nn.Linear(6 * 4 * 4, 3)).eval()
    data = torch.randn(100, 3, 4, 4)
    with pytest.warns(UserWarning, match="'2'.*depthwise"):
        pruned, plan = mipp.prune(model, data, method="random", budget=0.3, n_samples=100, example_input=data[:2])
    assert pruned(data[:2]).shape == (2, 3)
    assert plan.stats["readers_refitted"] >= 1  # the dense readers are still re-fitted


def test_calibration_data_forms_give_the_same_statistics():
    model = small_model("lenet5")
    x = inputs_for(model, 300)
    plan = manual_plan({"features.0": [0, 3]}, {g.key: g.size for g in mipp.find_units(model).groups})
    forms = [x, (x, torch.zeros(300)), DataLoader(TensorDataset(x, torch.zeros(300)), batch_size=256)]
    found = [mipp.reconstruction_statistics(model, plan, data, n_samples=300)["features.3"] for data in forms]
    for other in found[1:]:
        assert torch.equal(other.gram, found[0].gram) and torch.equal(other.cross, found[0].cross)


def test_recalibrated_statistics_are_the_calibration_batches_own():
    model = small_model("vgg11")
    data = inputs_for(model, 256)
    pruned, plan = mipp.prune(model, data, method="random", budget=0.4, n_samples=256, reconstruct=False,
                              recalibration_batches=2)
    assert plan.stats["recalibration_batches_used"] == 2
    probe = copy.deepcopy(pruned)  # the same pruned net, its batch norms normalising with batch statistics
    norms = batch_norms(probe)
    seen = {norm: [] for norm in norms}
    for norm in norms:
        norm.train()
        norm.register_forward_pre_hook(lambda m, inputs: seen[m].append(inputs[0].transpose(0, 1).flatten(1)))
    with torch.no_grad():
        for batch in data.split(128):
            probe(batch)
    for norm, recalibrated in zip(norms, batch_norms(pruned)):
        mean = torch.stack([x.mean(1) for x in seen[norm]]).mean(0)
        var = torch.stack([x.var(1) for x in seen[norm]]).mean(0)  # unbiased, averaged over batches
        torch.testing.assert_close(recalibrated.running_mean, mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(recalibrated.running_var, var, rtol=1e-4, atol=1e-5)
        assert recalibrated.momentum == 0.1 and not recalibrated.training


def test_recalibration_leaves_a_model_without_batch_norm_alone():
    model = small_model("lenet5")
    before = copy.deepcopy(model.state_dict())
    assert mipp.recalibrate_batch_norm(model, inputs_for(model, 64)) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_validated_solve_falls_back_when_lapack_eigh_does_not_converge(monkeypatch):
    """torch's eigh failed to converge on 3 of 99 Gram matrices of a VGG-11 sweep; SciPy's driver takes over."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=generator, dtype=torch.float64)
    stats = _statistics(x, x @ torch.randn(6, 2, generator=generator, dtype=torch.float64),
                        torch.zeros(2, 6, dtype=torch.float64))
    expected = stats.solve_validated()

    def fails(a):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", fails)
    for got, want in zip(stats.solve_validated(), expected):
        torch.testing.assert_close(got, want)


def test_each_reader_samples_the_positions_its_features_need():
    """A reader takes ROWS_PER_FEATURE rows per patch feature over the calibration images, at least MIN_POSITIONS
    and at most the cap per image: a wide reader's Gram matrix (rows x features^2) is what the pass costs."""
    from mipp.reconstruct import MIN_POSITIONS, ROWS_PER_FEATURE, ReaderStatistics, reader_positions

    def reader(features: int) -> ReaderStatistics:
        zeros = torch.zeros(features, features, dtype=torch.float64)
        return ReaderStatistics("r", torch.arange(1), torch.arange(1), True, zeros, zeros[:, :1], zeros[0],
                                zeros[0, :1])

    assert reader_positions(reader(9), 2000, 32) == MIN_POSITIONS
    assert reader_positions(reader(2304), 2000, 32) == -(-ROWS_PER_FEATURE * 2304 // 2000)  # 10 at 8 rows each
    assert reader_positions(reader(2304), 200, 32) == 32
    assert reader_positions(reader(2304), 2000, 3) == 3  # the cap wins over the minimum too
