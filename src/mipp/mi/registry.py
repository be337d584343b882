"""The estimator registry: every `CMIEstimator` by name, so that callers build one from a string in a config or on
the command line (`get_estimator("ksg", k=5)`) without knowing its class.

An estimator registers itself with the `register_estimator` class decorator, under its `name`; `mipp.mi` imports
the built-in estimator modules explicitly, so importing `mipp.mi` (or any of its modules) registers them all.
"""
from __future__ import annotations

from .base import CMIEstimator

ESTIMATORS: dict[str, type[CMIEstimator]] = {}


def register_estimator(cls: type[CMIEstimator]) -> type[CMIEstimator]:
    """Class decorator: make `cls` available as `get_estimator(cls.name)`."""
    if not (isinstance(cls, type) and issubclass(cls, CMIEstimator)) or not getattr(cls, "name", None):
        raise TypeError(f"{cls!r} is not a CMIEstimator subclass with a `name`; only those can be registered")
    ESTIMATORS[cls.name] = cls
    return cls


def estimator_names() -> list[str]:
    """Names of every registered estimator, sorted."""
    return sorted(ESTIMATORS)


def estimator_class(name: str) -> type[CMIEstimator]:
    """The estimator class registered as `name` (case-insensitive)."""
    key = str(name).lower()
    if key not in ESTIMATORS:
        raise ValueError(f"unknown MI estimator {name!r}; choose one of {', '.join(estimator_names())}")
    return ESTIMATORS[key]


def get_estimator(name: str = "gaussian", **options) -> CMIEstimator:
    """The estimator called `name`, built with `options` (its class's constructor arguments, `seed` included)."""
    cls = estimator_class(name)
    try:
        return cls(**options)
    except TypeError as err:
        raise ValueError(f"bad options for the {cls.name!r} estimator: {err}") from err
