"""The torchvision model zoo: every classification builder pruned into a working, smaller model (`make test-zoo`).

Marked `zoo` and left out of the default run: it needs torchvision (skipped without it) and takes a while. Each
architecture is built with random weights and 10 classes at a small input size, and pruned four ways on random
calibration images: MIPP in confidence mode and at 50% of MACs, and the baselines "random" and "tp-l1" at 50% of
MACs. Every pruned model must run, give the original's output shape, be as small as its Plan reports, and (without
the re-fit of readers, which changes the kept weights on purpose) compute what the original computes with the
removed units zeroed where they are read. Groups that mipp leaves unpruned must be named in the Plan.
"""
import copy
import warnings

import pytest
import torch

torchvision = pytest.importorskip("torchvision")

import mipp  # noqa: E402
from mipp.api import make_context  # noqa: E402
from mipp.measure import count_macs, count_params  # noqa: E402
from mipp.recalibrate import recalibrate_batch_norm  # noqa: E402
from mipp.methods import Budget  # noqa: E402
from mipp.units import zeroed_units  # noqa: E402

pytestmark = pytest.mark.zoo

N_CALIBRATION = 96
TOLERANCE = 0.02  # of the MACs budget: a coarser target than the default 0.005 shortens MIPP's price search
SIZE = 64  # input side where the architecture allows it
# Architectures whose input cannot be 64x64: their smallest reasonable side (and builder options).
INPUT_SIDE = {"inception_v3": 75, "maxvit_t": 224}
BUILD_OPTIONS = {
    "inception_v3": dict(aux_logits=False, init_weights=True),
    "googlenet": dict(aux_logits=False, init_weights=True),
    "maxvit_t": dict(input_size=(224, 224)),
}
for _name in ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14"):
    INPUT_SIDE[_name] = 28 if _name.endswith("14") else 32  # two patches a side plus the class token
    BUILD_OPTIONS[_name] = dict(image_size=INPUT_SIDE[_name])

ARCHITECTURES = sorted(torchvision.models.list_models(module=torchvision.models))
RUNS = [("mipp", None), ("mipp", 0.5), ("random", 0.5), ("tp-l1", 0.5)]


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """The architecture with seeded random weights and 10 classes, and N_CALIBRATION random images for it."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **BUILD_OPTIONS.get(name, {})).eval()
    _randomise_zero_layers(model)
    side = INPUT_SIDE.get(name, SIZE)
    images = torch.randn(N_CALIBRATION, 3, side, side, generator=torch.Generator().manual_seed(1))
    # batch norms with the statistics of the calibration images, as a trained network has them: with the builders'
    # running statistics (mean 0, variance 1) the random deep nets are chaotic (in float64, a 1e-15 change of
    # EfficientNet-V2-M's input moved its output by 87%), so that no two ways of computing them can agree
    recalibrate_batch_norm(model, images, n_batches=N_CALIBRATION // 32, batch_size=32)
    return model, images


def _randomise_zero_layers(model: torch.nn.Module) -> None:
    """Builders initialise for training, not for this test: GoogLeNet's weights of std 0.01 make its activations
    vanish, ViT's classifier starts at zero and ConvNeXt scales every residual block by 1e-6, so that the output
    hardly depends on what is pruned and the equivalence below would hold for any model. Every Conv / Linear weight
    is drawn again with He's initialisation and layer scales are set to 0.1."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        for name, parameter in model.named_parameters():
            if name.endswith("layer_scale"):
                parameter.fill_(0.1)


def _reachable(context, budget):
    """`budget`, or, where the groups left unpruned hold more than half of the MACs, 90% of what can be removed:
    the refusal must then say so and name them."""
    if budget is None:
        return None
    limit = context.max_removable("macs")
    if budget <= limit:
        return budget
    with pytest.raises(ValueError, match="unreachable.*cannot prune safely"):
        context.check_reachable(Budget(budget, "macs"))
    return round(0.9 * limit, 3)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def architecture(request):
    """(name, model, images, context): the context of one trace of the model, which every run's checks share (a
    trace of Swin-V2 or MaxViT takes minutes; each prune traces once more, as a user's call does)."""
    model, images = build(request.param)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        context = make_context(copy.deepcopy(model), images, example_input=images[:2], n_samples=N_CALIBRATION)
    return request.param, model, images, context


@pytest.mark.parametrize("method,budget", RUNS, ids=[f"{m}-{b or 'confidence'}" for m, b in RUNS])
def test_architecture_prunes_into_a_working_smaller_model(architecture, method, budget):
    name, model, images, context = architecture
    example = images[:2]
    budget = _reachable(context, budget)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned, plan = mipp.prune(model, images, method=method, budget=budget and Budget(budget, "macs", TOLERANCE),
                                  example_input=example, n_samples=N_CALIBRATION, reconstruct=False, recalibrate=False)
    with torch.no_grad():
        expected_shape = model(example).shape
        output = pruned(images[:4])
    assert output.shape == (4, *expected_shape[1:]) and torch.isfinite(output).all()

    assert count_params(pruned) == plan.stats["params_kept"]
    assert count_macs(pruned, example) == plan.stats["macs_kept"]
    if budget is not None:
        assert abs(plan.stats["macs_removed"] - budget) <= 2 * TOLERANCE, plan.stats
    assert plan.stats["params_kept"] <= count_params(model)

    removed = {key: torch.tensor(plan.removed(key), dtype=torch.long) for key in plan.kept}
    groups = [g for g in context.units.groups if g.key in plan.kept]
    # compared in float64: several of these nets are chaotic at random init in float32 (EfficientNet-V2-S's
    # output moves by half its size when its input moves by 1e-7), while in float64 surgery is exact to 1e-9
    model64, pruned64, inputs64 = copy.deepcopy(model).double(), copy.deepcopy(pruned).double(), images[:4].double()
    with torch.no_grad(), zeroed_units(model64, groups, removed):
        masked = model64(inputs64)
    with torch.no_grad():
        output64 = pruned64(inputs64)
    scale = float(masked.abs().max())
    assert float((output64 - masked).abs().max()) <= 1e-3 * scale + 1e-5, "pruned differs from the masked original"
    if plan.units_kept < plan.units_total:  # the removal matters, so the equivalence says something
        with torch.no_grad():
            assert float((model64(inputs64) - masked).abs().max()) > 1e-3 * scale

    if plan.excluded:
        named = " ".join(str(w.message) for w in caught)
        assert all(key in named for key in list(plan.excluded)[:8]), "every exclusion is named in a warning"
