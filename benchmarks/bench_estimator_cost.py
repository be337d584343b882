"""The estimators' relative cost on a small net, measured whole, next to the estimate mipp prints beforehand.

A trained-by-nothing MLP (784-32-16-10: 48 prunable units) on inputs of rank 20 (so that units are redundant),
MIPP in confidence mode on the same captured activations with the Gaussian, KSG and loss-proxy estimators: the
measured selection time, its ratio to the Gaussian one, and the time `mipp.mi.cost` estimated from its timed tiny
case (printed by mipp before a KSG or proxy selection). Numbers swing with the machine's load; the ratios less.

Run: .venv/bin/python benchmarks/bench_estimator_cost.py [--samples 400] [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import torch

from mipp.activations import capture
from mipp.api import make_context
from mipp.methods.mipp import MIPPSettings, select
from mipp.mi import get_estimator
from mipp.mi.cost import calibrate, sweep_seconds
from mipp.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--estimators", default="gaussian,ksg,proxy")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model("mlp", in_channels=1, input_size=28, hidden=(32, 16)).eval()
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(20, 784, generator=generator)
    data = (torch.randn(args.samples, 20, generator=generator) @ basis).reshape(-1, 1, 28, 28) / 20 ** 0.5
    ctx = make_context(model, data, n_samples=args.samples)
    acts = capture(model, ctx.units, data, n_samples=args.samples)
    widths = [g.size for g in ctx.units.groups]
    print(f"MLP 784-32-16-10: {sum(widths)} units in {len(widths)} layers, {args.samples} samples, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"{'estimator':<10} {'measured s':>11} {'x gaussian':>11} {'estimated s':>12} {'removed':>8}")
    reference = None
    for name in args.estimators.split(","):
        estimated = sweep_seconds(calibrate(get_estimator(name, seed=0), args.samples), widths)
        started = time.perf_counter()
        plan = select(ctx, None, MIPPSettings(estimator=name, features="mean"), acts=acts)
        seconds = time.perf_counter() - started
        reference = reference or seconds
        print(f"{name:<10} {seconds:>11.2f} {seconds / reference:>11.0f} {estimated:>12.2f} "
              f"{100 * plan.unit_fraction_removed:>7.0f}%", flush=True)


if __name__ == "__main__":
    main()
