"""Model zoo: every network mipp prunes, built by name.

``build_model(name, num_classes=10, in_channels=3, input_size=32, width=1.0, **extra)`` returns a
plain ``nn.Module`` whose ``mipp_config`` attribute (a JSON-able dict) rebuilds the same
architecture with ``build_model(**model.mipp_config)``. ``mipp_config`` describes the model as
built; it is not updated when the model is later pruned.

Width multiplier: every hidden width c becomes ``max(1, round(c * width))`` (Python's round);
the output layer (num_classes) is never scaled. At width 1 the parameter counts are the standard
ones (e.g. LeNet-5 61,706; ResNet-50 25,557,032).

Conventions kept by every model (pruning and activation capture rely on them): each nonlinearity
is its own ``nn.ReLU()`` module used once per forward, residual adds are out of place, flattening is
an ``nn.Flatten`` module, and the last ``nn.Linear`` in ``model.modules()`` is the classifier.
"""
import math
import numbers
from typing import Any, Dict

from torch import nn

from .lenet import LENET_MIN_INPUT_SIZE, LeNet5
from .mlp import MLP
from .resnet import BasicBlock, Bottleneck, ResNet
from .vgg import VGG, VGG_CONFIGS

__all__ = ["MODEL_NAMES", "build_model", "MLP", "LeNet5", "VGG", "ResNet", "BasicBlock", "Bottleneck"]

MODEL_NAMES = ("mlp", "lenet5", "vgg11", "vgg16", "vgg19", "resnet18", "resnet34", "resnet50", "resnet20", "resnet56")

STEMS = ("cifar", "imagenet")

# name -> (block, blocks per stage, base stage widths, block expansion, base stem width, has "stem" extra)
_RESNETS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), 1, 64, True),
    "resnet34": (BasicBlock, (3, 4, 6, 3), (64, 128, 256, 512), 1, 64, True),
    "resnet50": (Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), 4, 64, True),
    "resnet20": (BasicBlock, (3, 3, 3), (16, 32, 64), 1, 16, False),
    "resnet56": (BasicBlock, (9, 9, 9), (16, 32, 64), 1, 16, False),
}

# Extra keyword arguments each model accepts, with defaults (None: depends on the other arguments).
_EXTRAS: Dict[str, Dict[str, Any]] = {name: {} for name in MODEL_NAMES}
_EXTRAS["mlp"] = {"hidden": (300, 100)}
for _name, _spec in _RESNETS.items():
    if _spec[-1]:
        _EXTRAS[_name] = {"stem": None}


def _scaled(c: int, width: float) -> int:
    return max(1, round(c * width))


def _check_int(arg: str, value: Any, minimum: int, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{arg} must be an integer >= {minimum}{why}; got {value!r}")
    if value < minimum:
        raise ValueError(f"{arg} must be an integer >= {minimum}{why}; got {value}")
    return int(value)


def _check_width(width: Any) -> float:
    if isinstance(width, bool) or not isinstance(width, numbers.Real) or not math.isfinite(width) or width <= 0:
        raise ValueError(f"width must be a finite number > 0 (1.0 is the standard network); got {width!r}")
    return float(width)


def _check_hidden(hidden: Any) -> list:
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, (list, tuple)):
        raise ValueError(f"hidden must be a list or tuple of positive integers, e.g. (300, 100); got {hidden!r}")
    return [_check_int("each entry of hidden", h, 1) for h in hidden]


def build_model(name: str, *, num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
                width: float = 1.0, **extra: Any) -> nn.Module:
    """Build model ``name`` (one of MODEL_NAMES) for square inputs of shape (in_channels, input_size, input_size).

    Extras: mlp takes ``hidden`` (base hidden widths, default (300, 100)); resnet18/34/50 take
    ``stem`` ("cifar" or "imagenet"; default "imagenet" when input_size >= 128, else "cifar").
    Raises ValueError for an unknown name or a bad argument.
    """
    if not isinstance(name, str) or name not in MODEL_NAMES:
        raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    num_classes = _check_int("num_classes", num_classes, 1)
    in_channels = _check_int("in_channels", in_channels, 1)
    min_size = LENET_MIN_INPUT_SIZE if name == "lenet5" else 1
    input_size = _check_int("input_size", input_size, min_size, f" for {name}" if min_size > 1 else "")
    width = _check_width(width)
    allowed = _EXTRAS[name]
    unknown = sorted(set(extra) - set(allowed))
    if unknown:
        valid = ", ".join(allowed) if allowed else "none"
        raise ValueError(f"unknown argument(s) {', '.join(map(repr, unknown))} for model {name!r}; "
                         f"valid extra arguments for {name}: {valid}")
    config: Dict[str, Any] = {"name": name, "num_classes": num_classes, "in_channels": in_channels,
                              "input_size": input_size, "width": width}

    if name == "mlp":
        hidden = _check_hidden(extra.get("hidden", allowed["hidden"]))
        config["hidden"] = hidden
        model = MLP(in_channels * input_size * input_size, [_scaled(h, width) for h in hidden], num_classes)
    elif name == "lenet5":
        model = LeNet5(in_channels=in_channels, input_size=input_size, num_classes=num_classes,
                       widths=[_scaled(c, width) for c in (6, 16, 120, 84)])
    elif name in VGG_CONFIGS:
        cfg = [v if v == "M" else _scaled(v, width) for v in VGG_CONFIGS[name]]
        model = VGG(cfg, in_channels=in_channels, input_size=input_size, num_classes=num_classes)
    else:
        block, blocks, base_widths, expansion, stem_width, has_stem = _RESNETS[name]
        stem = "cifar"
        if has_stem:
            stem = extra.get("stem")
            if stem is None:
                stem = "imagenet" if input_size >= 128 else "cifar"
            if stem not in STEMS:
                raise ValueError(f"stem must be one of {', '.join(map(repr, STEMS))} (or None for the default); "
                                 f"got {stem!r}")
            config["stem"] = stem
        stage_widths = [(_scaled(c, width), _scaled(c * expansion, width)) for c in base_widths]
        model = ResNet(block, blocks, stage_widths, _scaled(stem_width, width), stem=stem,
                       in_channels=in_channels, num_classes=num_classes)
    model.mipp_config = config
    return model
