"""Tests of the model zoo: parameter counts, shapes, config roundtrip, width, errors, pruning."""
import json
import math

import pytest
import torch
import torch_pruning as tp
from torch import nn

from mipp.models import MODEL_NAMES, build_model


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def classifier(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def small_input_shape(name):
    """(channels, size) for the cheap forward passes: MNIST-like for mlp/lenet5, CIFAR-like otherwise."""
    return (1, 28) if name in ("mlp", "lenet5") else (3, 32)


def test_model_names():
    assert MODEL_NAMES == ("mlp", "lenet5", "vgg11", "vgg16", "vgg19",
                           "resnet18", "resnet34", "resnet50", "resnet20", "resnet56")


# Standard counts at width 1. ResNet-20/56 use projection (1x1 conv + BN) shortcuts; with
# zero-padding shortcuts (option A) they would be 269,722 and 853,018 (2,752 fewer each).
PARAM_COUNTS = [
    (dict(name="lenet5", in_channels=1, input_size=28), 61_706),
    (dict(name="mlp", in_channels=1, input_size=28), 266_610),
    (dict(name="resnet18", input_size=224, num_classes=1000), 11_689_512),
    (dict(name="resnet34", input_size=224, num_classes=1000), 21_797_672),
    (dict(name="resnet50", input_size=224, num_classes=1000), 25_557_032),
    (dict(name="resnet18"), 11_173_962),
    (dict(name="resnet20"), 272_474),
    (dict(name="resnet56"), 855_770),
    (dict(name="vgg11"), 9_231_114),
    (dict(name="vgg16"), 14_728_266),
    (dict(name="vgg19"), 20_040_522),
]


@pytest.mark.parametrize("kwargs,expected", PARAM_COUNTS, ids=[f"{k['name']}-{v}" for k, v in PARAM_COUNTS])
def test_param_counts(kwargs, expected):
    assert n_params(build_model(**kwargs)) == expected


@pytest.mark.parametrize("name,option_a", [("resnet20", 269_722), ("resnet56", 853_018)])
def test_cifar_resnets_use_projection_shortcuts(name, option_a):
    """Dropping the two projection shortcuts gives the zero-padding (option A) counts of the literature."""
    model = build_model(name)
    projections = [m for m in model.modules() if isinstance(m, nn.Sequential) and len(m) == 2
                   and isinstance(m[0], nn.Conv2d) and m[0].kernel_size == (1, 1)]
    assert len(projections) == 2
    assert n_params(model) - sum(n_params(m) for m in projections) == option_a
    assert n_params(model) - option_a == 2_752


def test_stem_default_and_imagenet_maxpool():
    m = build_model("resnet18", input_size=224)
    assert m.mipp_config["stem"] == "imagenet"
    assert m.conv1.kernel_size == (7, 7) and isinstance(m.maxpool, nn.MaxPool2d)
    m = build_model("resnet18", input_size=127, width=0.25)
    assert m.mipp_config["stem"] == "cifar"
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert not any(isinstance(x, nn.MaxPool2d) for x in m.modules())
    assert build_model("resnet18", input_size=32, stem="imagenet", width=0.25).mipp_config["stem"] == "imagenet"


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("chan,size", [(1, 28), (3, 32), (3, 8)])
def test_output_shapes(name, chan, size):
    if name == "lenet5" and size < 12:
        pytest.skip("LeNet-5 needs input_size >= 12")
    model = build_model(name, num_classes=7, in_channels=chan, input_size=size, width=0.25).eval()
    with torch.no_grad():
        out = model(torch.randn(2, chan, size, size))
    assert out.shape == (2, 7)


def test_resnet_imagenet_stem_small_input_runs():
    model = build_model("resnet50", input_size=64, stem="imagenet", width=0.125).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_lenet_maps():
    for size in (28, 32):
        m = build_model("lenet5", in_channels=1, input_size=size)
        assert m.classifier[0].in_features == 16 * 5 * 5
    assert build_model("lenet5", input_size=12, width=0.5)(torch.randn(2, 3, 12, 12)).shape == (2, 10)


def test_vgg_state_dict_keys_independent_of_input_size():
    a = build_model("vgg16", input_size=32, width=0.25)
    b = build_model("vgg16", input_size=8, width=0.25)
    assert sum(isinstance(x, nn.MaxPool2d) for x in a.modules()) == 5
    assert sum(isinstance(x, nn.MaxPool2d) for x in b.modules()) == 3
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


ROUNDTRIP_CASES = [dict(name=n, width=0.25) for n in MODEL_NAMES] + [
    dict(name="mlp", hidden=[64, 32, 16], in_channels=1, input_size=8, num_classes=3),
    dict(name="resnet18", stem="imagenet", width=0.25, input_size=64),
    dict(name="resnet50", width=0.25, input_size=224),
    dict(name="vgg11", width=0.5, input_size=28, in_channels=1),
]


@pytest.mark.parametrize("kwargs", ROUNDTRIP_CASES, ids=lambda k: "-".join(map(str, k.values())))
def test_config_roundtrip(kwargs):
    model = build_model(**kwargs)
    cfg = model.mipp_config
    assert {"name", "num_classes", "in_channels", "input_size", "width"} <= set(cfg)
    cfg = json.loads(json.dumps(cfg))  # plain JSON-able
    again = build_model(**cfg)
    assert again.mipp_config == model.mipp_config
    assert [(k, v.shape) for k, v in again.state_dict().items()] == \
           [(k, v.shape) for k, v in model.state_dict().items()]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_width_shrinks_params(name):
    chan, size = small_input_shape(name)
    p = [n_params(build_model(name, in_channels=chan, input_size=size, width=w)) for w in (0.125, 0.25, 0.5)]
    assert p[0] < p[1] < p[2]
    tiny = build_model(name, in_channels=chan, input_size=size, width=1e-6).eval()  # every hidden width -> 1
    assert classifier(tiny).out_features == 10
    with torch.no_grad():
        assert tiny(torch.randn(2, chan, size, size)).shape == (2, 10)


def test_width_rule():
    m = build_model("mlp", in_channels=1, input_size=28, width=0.5)
    assert [l.out_features for l in m.modules() if isinstance(l, nn.Linear)] == [150, 50, 10]
    m = build_model("lenet5", in_channels=1, input_size=28, width=0.5)
    assert [l.out_channels for l in m.features if isinstance(l, nn.Conv2d)] == [3, 8]
    assert [l.out_features for l in m.classifier if isinstance(l, nn.Linear)] == [60, 42, 10]
    assert classifier(build_model("vgg16", width=0.5)).in_features == 256
    m = build_model("resnet50", width=0.5)
    assert m.conv1.out_channels == 32 and m.layer1[0].conv1.out_channels == 32
    assert m.fc.in_features == 1024 and m.fc.out_features == 10
    assert build_model("resnet20", width=0.5).fc.in_features == 32


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_relus_are_distinct_modules_called_once(name):
    chan, size = small_input_shape(name)
    model = build_model(name, in_channels=chan, input_size=size, width=0.125).eval()
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert all(not r.inplace for r in relus)
    calls = {id(r): 0 for r in relus}
    hooks = [r.register_forward_hook(lambda mod, i, o: calls.__setitem__(id(mod), calls[id(mod)] + 1))
             for r in relus]
    with torch.no_grad():
        model(torch.randn(2, chan, size, size))
    for h in hooks:
        h.remove()
    assert set(calls.values()) == {1}
    assert any(isinstance(m, nn.Flatten) for m in model.modules())
    # Every conv/linear except the classifier is followed by its own ReLU (plus one per residual add).
    expected = {"mlp": 2, "lenet5": 4, "vgg11": 8, "vgg16": 13, "vgg19": 16, "resnet18": 1 + 8 * 2,
                "resnet34": 1 + 16 * 2, "resnet50": 1 + 16 * 3, "resnet20": 1 + 9 * 2, "resnet56": 1 + 27 * 2}
    assert len(relus) == expected[name]


@pytest.mark.parametrize("bad", [
    dict(name="resnet101"), dict(name="VGG16"), dict(name=None),
    dict(name="vgg16", width=0), dict(name="vgg16", width=-1.0), dict(name="vgg16", width=math.nan),
    dict(name="vgg16", width="1"), dict(name="vgg16", width=True),
    dict(name="mlp", num_classes=0), dict(name="mlp", num_classes=2.5), dict(name="mlp", in_channels=0),
    dict(name="mlp", input_size=0), dict(name="lenet5", input_size=8),
    dict(name="vgg16", stem="cifar"), dict(name="resnet20", stem="cifar"), dict(name="lenet5", hidden=(10,)),
    dict(name="resnet18", stem="tiny"), dict(name="mlp", hidden=(300, 0)), dict(name="mlp", hidden="300"),
])
def test_bad_arguments_raise_value_error(bad):
    with pytest.raises(ValueError):
        build_model(**bad)


def test_error_messages_name_valid_choices():
    with pytest.raises(ValueError, match="resnet101.*valid names: mlp, lenet5, vgg11"):
        build_model("resnet101")
    with pytest.raises(ValueError, match="'stem'.*valid extra arguments for vgg16: none"):
        build_model("vgg16", stem="cifar")
    with pytest.raises(ValueError, match="valid extra arguments for mlp: hidden"):
        build_model("mlp", depth=3)
    with pytest.raises(ValueError, match="'cifar', 'imagenet'"):
        build_model("resnet50", stem="tiny")
    with pytest.raises(ValueError, match="input_size must be an integer >= 12 for lenet5"):
        build_model("lenet5", input_size=8)


def _prunable_layers(model):
    """Convs and linears other than the final classifier."""
    head = classifier(model)
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m is not head]


PRUNE_CASES = [(n, {}) for n in MODEL_NAMES] + [("resnet18", dict(stem="imagenet", input_size=64))]


@pytest.mark.parametrize("name,extra", PRUNE_CASES, ids=[f"{n}-{'-'.join(map(str, e.values()))}" for n, e in PRUNE_CASES])
def test_torch_pruning_traces_and_prunes(name, extra):
    torch.manual_seed(0)
    chan, size = small_input_shape(name)
    kwargs = dict(in_channels=chan, input_size=size, width=0.25, num_classes=10)
    kwargs.update(extra)
    size = kwargs["input_size"]
    model = build_model(name, **kwargs).eval()
    x = torch.randn(2, chan, size, size)
    before = n_params(model)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    layers = _prunable_layers(model)
    # The first layer (in ResNets: the residual stream of stage 1) and one in the middle.
    for layer in (layers[0], layers[len(layers) // 2]):
        if isinstance(layer, nn.Conv2d):
            n, fn = layer.out_channels, tp.prune_conv_out_channels
        else:
            n, fn = layer.out_features, tp.prune_linear_out_channels
        group = dg.get_pruning_group(layer, fn, idxs=list(range(0, n, 2)))
        assert dg.check_pruning_group(group)
        group.prune()
        assert (layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features) == n - len(range(0, n, 2))
    assert n_params(model) < before
    assert classifier(model).out_features == 10
    with torch.no_grad():
        assert model(x).shape == (2, 10)


def test_planted_network_is_a_registered_model():
    from mipp.models import model_entry, model_names
    from mipp.models.planted import TRUTH, planted_network

    assert "planted" in model_names() and "planted" not in MODEL_NAMES
    assert model_entry("planted").planted is TRUTH and model_entry(MODEL_NAMES[0]).planted is None
    model = build_model("planted", num_classes=4, in_channels=1, input_size=1, seed=3)
    expected = planted_network(3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected.state_dict().values()))
    assert model.mipp_config["seed"] == 3
    again = build_model(**model.mipp_config)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    with pytest.raises(ValueError, match="fixed shape"):
        build_model("planted", num_classes=10)


def test_adding_a_model_is_one_registered_builder(monkeypatch):
    from mipp.models import model_names, register_model, registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # forget the new model after the test

    @register_model("tiny-test-net", extras={"depth": 1})
    def build_tiny(*, num_classes, in_channels, input_size, width, depth):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * input_size ** 2, num_classes)), {"depth": depth}

    assert "tiny-test-net" in model_names()
    model = build_model("tiny-test-net", in_channels=1, input_size=4, num_classes=3)
    assert model.mipp_config == {"name": "tiny-test-net", "num_classes": 3, "in_channels": 1, "input_size": 4,
                                 "width": 1.0, "depth": 1}
    with pytest.raises(ValueError, match="valid extra arguments for tiny-test-net: depth"):
        build_model("tiny-test-net", stem="cifar")
    with pytest.raises(ValueError, match="registered twice"):
        register_model("tiny-test-net")(build_tiny)
