"""MIPP's selection time on VGG-11 (width 0.5, 2,000 calibration samples), per estimator, against its floor.

The floor is the forward pass that captures the activations (every method that looks at activations pays it).
The Gaussian path runs the full sweep, in confidence mode and in budget mode (50% of units, bisection included).
KSG and the loss proxy are orders of magnitude slower per unit; they are timed on a full sweep of the last two
groups (the classifier's inputs), and the per-unit cost is printed with them, so nothing is extrapolated silently.

Run: .venv/bin/python benchmarks/bench_mipp.py [--samples 2000] [--width 0.5]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--slow-groups", type=int, default=2, help="groups swept by the KSG and proxy estimators")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = build_model("vgg11", in_channels=3, input_size=32, width=args.width).eval()
    data = torch.randn(args.samples, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ctx = make_context(model, data, n_samples=args.samples)
    acts, floor = timed(lambda: capture(model, ctx.units, data, n_samples=args.samples))
    print(f"VGG-11 width {args.width}: {ctx.units.total_units} units in {len(ctx.units.groups)} groups, "
          f"{args.samples} calibration samples, {torch.get_num_threads()} threads")
    print(f"{'what':<44} {'seconds':>9} {'x floor':>9}")
    print(f"{'capture forward pass (the floor)':<44} {floor:>9.3f} {1.0:>9.2f}")

    rows = []
    plan, t = timed(lambda: select(ctx, None, MIPPSettings(estimator="gaussian"), acts=acts))
    rows.append((f"gaussian, confidence mode ({100 * plan.unit_fraction_removed:.0f}% removed)", t))
    plan, t = timed(lambda: select(ctx, Budget(0.5), MIPPSettings(estimator="gaussian"), acts=acts))
    rows.append((f"gaussian, budget 50% units ({plan.stats['bisection_steps']} sweeps)", t))

    slow_ctx = make_context(model, data, n_samples=args.samples)
    slow_ctx.units.groups = slow_ctx.units.groups[: args.slow_groups]
    n_units = sum(g.size for g in slow_ctx.units.groups)
    for estimator in ("gaussian", "ksg", "proxy"):
        _, t = timed(lambda: select(slow_ctx, None, MIPPSettings(estimator=estimator), acts=acts))
        rows.append((f"{estimator}, last {args.slow_groups} groups ({n_units} units; {1000 * t / n_units:.1f} ms/unit)", t))
    for label, seconds in rows:
        print(f"{label:<44} {seconds:>9.3f} {seconds / floor:>9.2f}")


if __name__ == "__main__":
    main()
