"""The model registry: one builder registered per model name, and ``build_model`` that checks the common
arguments, calls the builder and stamps ``mipp_config`` on the result.

A builder is ``fn(*, num_classes, in_channels, input_size, width, **extras) -> (model, resolved extras)``; it gets
every extra it declared (given or default) and returns the extras to record in ``mipp_config`` (after resolving
defaults such as ResNet's stem), so that ``build_model(**model.mipp_config)`` rebuilds the same architecture.
Adding a model is one ``@register_model`` builder in its module, imported by ``mipp.models``.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Dict

from torch import nn


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its builder, its extra arguments with defaults (None: depends on the other
    arguments), the smallest input side it takes; and, for a network with planted weights (given, never trained:
    it is pruned as given), the truth planted in it (with `recovery(kept)`, how much of it a plan recovered) and
    its own data, `data(seed, split, n) -> (inputs, labels, class names)`: inputs labelled by the network of that
    seed."""

    name: str
    build: Callable[..., tuple]
    extras: Dict[str, Any] = field(default_factory=dict)
    min_input_size: int = 1
    planted: Any = None  # a PlantedTruth (see planted.py), or None for a network that learns its weights
    data: Callable[..., tuple] | None = None


_REGISTRY: Dict[str, ModelEntry] = {}


def register_model(name: str, *, extras: Dict[str, Any] | None = None, min_input_size: int = 1,
                   planted: Any = None, data: Callable[..., tuple] | None = None) -> Callable:
    """Decorator: register `fn` as the builder of model `name` (see the module docstring for its contract)."""

    def register(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelEntry(name, fn, dict(extras or {}), min_input_size, planted, data)
        return fn

    return register


def model_names() -> tuple:
    """Every registered model name, in registration order."""
    return tuple(_REGISTRY)


def model_entry(name: str) -> ModelEntry:
    """The registered entry of `name`; ValueError naming the valid names if there is none."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def scaled(c: int, width: float) -> int:
    """A hidden width `c` under the width multiplier (Python's round, at least 1)."""
    return max(1, round(c * width))


def check_int(arg: str, value: Any, minimum: int, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{arg} must be an integer >= {minimum}{why}; got {value!r}")
    if value < minimum:
        raise ValueError(f"{arg} must be an integer >= {minimum}{why}; got {value}")
    return int(value)


def check_width(width: Any) -> float:
    if isinstance(width, bool) or not isinstance(width, numbers.Real) or not math.isfinite(width) or width <= 0:
        raise ValueError(f"width must be a finite number > 0 (1.0 is the standard network); got {width!r}")
    return float(width)


def build_model(name: str, *, num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
                width: float = 1.0, **extra: Any) -> nn.Module:
    """Build model ``name`` for square inputs of shape (in_channels, input_size, input_size).

    Extras: mlp takes ``hidden`` (base hidden widths, default (300, 100)); resnet18/34/50 take
    ``stem`` ("cifar" or "imagenet"; default "imagenet" when input_size >= 128, else "cifar");
    planted takes ``seed`` (of its random layers). Raises ValueError for an unknown name or a bad argument.
    """
    entry = model_entry(name)
    num_classes = check_int("num_classes", num_classes, 1)
    in_channels = check_int("in_channels", in_channels, 1)
    min_size = entry.min_input_size
    input_size = check_int("input_size", input_size, min_size, f" for {name}" if min_size > 1 else "")
    width = check_width(width)
    unknown = sorted(set(extra) - set(entry.extras))
    if unknown:
        valid = ", ".join(entry.extras) if entry.extras else "none"
        raise ValueError(f"unknown argument(s) {', '.join(map(repr, unknown))} for model {name!r}; "
                         f"valid extra arguments for {name}: {valid}")
    model, resolved = entry.build(num_classes=num_classes, in_channels=in_channels, input_size=input_size,
                                  width=width, **{**entry.extras, **extra})
    model.mipp_config = {"name": name, "num_classes": num_classes, "in_channels": in_channels,
                         "input_size": input_size, "width": width, **resolved}
    return model
