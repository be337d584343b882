"""The method registry: every pruning method, MIPP and the baselines, as `select(ctx, budget, **options) -> Plan`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from mipp.methods.base import BUDGET_METRICS, Budget, PruneContext, plan_from_scores


@dataclass(frozen=True)
class MethodInfo:
    name: str
    select: Callable  # (ctx, budget, **options) -> Plan
    regimes: tuple[str, ...]  # "init" (at initialisation), "trained" (after training)
    needs_budget: bool  # False: the method can decide how much to prune by itself (MIPP's confidence mode)
    summary: str


METHODS: dict[str, MethodInfo] = {}


def register(name: str, *, regimes=("init", "trained"), needs_budget=True, summary=""):
    def decorate(select):
        METHODS[name] = MethodInfo(name, select, tuple(regimes), needs_budget, summary)
        return select
    return decorate


def get_method(name: str) -> MethodInfo:
    _load_builtin()
    if name not in METHODS:
        raise ValueError(f"unknown pruning method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


def method_names() -> list[str]:
    _load_builtin()
    return sorted(METHODS)


def _load_builtin() -> None:
    import importlib
    import pkgutil

    import mipp.methods as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name != "base":
            importlib.import_module(f"mipp.methods.{info.name}")


@register("mipp", needs_budget=False,
          summary="Mutual-information preserving pruning (Westphal et al. 2024): output-to-input TERC sweep")
def _mipp(ctx, budget=None, **options):
    from mipp.methods.mipp import MIPPSettings, select

    return select(ctx, budget, MIPPSettings(**options))


__all__ = ["BUDGET_METRICS", "Budget", "MethodInfo", "PruneContext", "get_method", "method_names",
           "plan_from_scores", "register"]
