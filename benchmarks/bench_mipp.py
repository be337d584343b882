"""MIPP's selection time on VGG-11 (width 0.5, 2,000 calibration samples), per estimator, against its floor.

The floor is the forward pass that captures the activations (every method that looks at activations pays it).
The Gaussian path runs the full sweep, in confidence mode and in budget mode (50% of units, bisection included).
KSG and the loss proxy are orders of magnitude slower per unit: each estimator is timed on its session set-up and
the first `--tests` transfer-entropy tests of the last group (the classifier's inputs); the line for a whole sweep
scales those two costs to every group and unit, and is marked EXTRAPOLATED (the Gaussian one can be checked against
its measured full sweep above it).

Run: .venv/bin/python benchmarks/bench_mipp.py [--samples 2000] [--width 0.5] [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import torch

from mipp.activations import capture
from mipp.api import make_context
from mipp.methods.base import Budget
from mipp.methods.mipp import MIPPSettings, select
from mipp.models import build_model


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _set_up_and_test_seconds(name: str, units, target, tests: int) -> tuple[float, float]:
    """(session set-up, mean time of one of the first `tests` tests of the least informative units)."""
    from mipp.mi import get_estimator

    estimator = get_estimator(name, seed=0)
    start = time.perf_counter()
    session = estimator.session(units, target, 0.95)
    order = torch.argsort(session.unit_mi())[:tests].tolist()
    set_up = time.perf_counter() - start
    start = time.perf_counter()
    for unit in order:
        session.transfer_entropy(unit)
    return set_up, (time.perf_counter() - start) / tests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine a second thread mostly contends)")
    parser.add_argument("--tests", type=int, default=4, help="transfer-entropy tests timed per estimator")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = build_model("vgg11", in_channels=3, input_size=32, width=args.width).eval()
    data = torch.randn(args.samples, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ctx = make_context(model, data, n_samples=args.samples)
    acts, floor = timed(lambda: capture(model, ctx.units, data, n_samples=args.samples))
    print(f"VGG-11 width {args.width}: {ctx.units.total_units} units in {len(ctx.units.groups)} groups, "
          f"{args.samples} calibration samples, {torch.get_num_threads()} threads")
    print(f"{'what':<62} {'seconds':>10} {'x floor':>9}")
    print(f"{'capture forward pass (the floor)':<62} {floor:>10.3f} {1.0:>9.2f}")

    rows = []
    plan, t = timed(lambda: select(ctx, None, MIPPSettings(estimator="gaussian", features="mean"), acts=acts))
    rows.append((f"gaussian, confidence mode ({100 * plan.unit_fraction_removed:.0f}% removed)", t))
    plan, t = timed(lambda: select(ctx, Budget(0.5), MIPPSettings(estimator="gaussian", features="mean"), acts=acts))
    rows.append((f"gaussian, budget 50% units ({plan.stats['bisection_steps']} sweeps)", t))

    group = ctx.units.groups[0]
    target = acts.outputs[ctx.units.output_modules[0]]
    n_groups, n_units = len(ctx.units.groups), ctx.units.total_units
    for estimator in ("gaussian", "ksg", "proxy"):
        set_up, per_test = _set_up_and_test_seconds(estimator, acts.units[group.key], target, args.tests)
        rows.append((f"{estimator}: session set-up ({group.size}-unit layer)", set_up))
        rows.append((f"{estimator}: one transfer-entropy test", per_test))
        rows.append((f"{estimator}: whole sweep, EXTRAPOLATED ({n_groups} set-ups + {n_units} tests)",
                     n_groups * set_up + n_units * per_test))
    for label, seconds in rows:
        print(f"{label:<62} {seconds:>10.3f} {seconds / floor:>9.2f}")


if __name__ == "__main__":
    main()
