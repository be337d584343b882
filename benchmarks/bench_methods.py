"""Selection time of every pruning method (MIPP and all baselines) on VGG-11, in one run, against one forward pass.

VGG-11 at width 0.5 (CIFAR-shaped 32x32x3 random inputs with random labels, 2,000 calibration samples for the
methods that use data), budget 50% of units. Each method is timed through `mipp.api.select_plan`, as a user calls
it (tracing the model's units is included; its cost is printed on its own line). The reference is one forward pass
over the calibration set, measured in the same run: "x forward" is a method's time divided by it. Methods run with
their default settings, except IMP, whose re-training is kept tiny (2 rounds of 1 epoch on 512 samples), so its
time is mostly that of the rounds' bookkeeping, not of a realistic re-training budget.

Run: .venv/bin/python benchmarks/bench_methods.py [--samples 2000] [--width 0.5] [--methods snip,grasp] [--threads 1]
(on a machine shared with other jobs, --threads 1 gives steadier numbers: small kernels on contended cores suffer
from thread synchronisation far more than the forward pass does).
"""
from __future__ import annotations

import argparse
import time

import torch

from mipp.api import make_context, select_plan
from mipp.methods import get_method, method_names
from mipp.models import build_model

# the baselines table's order (experiments.md), then anything else registered
ORDER = ("random", "magnitude", "magnitude-l1", "magnitude-l2", "snip", "itersnip", "grasp", "itergrasp", "synflow",
         "prospr", "thinet", "taylor", "sosp-h", "imp", "tp-l1", "tp-l2", "tp-taylor", "tp-lamp", "tp-fpgm",
         "tp-bn-scale", "tp-hessian", "mipp")
IMP_OPTIONS = dict(rounds=2, epochs_per_round=1, train_options=dict(batch_size=128))
IMP_TRAIN_SAMPLES = 512


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


@torch.no_grad()
def forward_pass(model, inputs, batch_size=256) -> None:
    for start in range(0, len(inputs), batch_size):
        model(inputs[start:start + batch_size])


def method_options(name: str, inputs, labels) -> dict:
    if name == "imp":
        return dict(IMP_OPTIONS, train_set=(inputs[:IMP_TRAIN_SAMPLES], labels[:IMP_TRAIN_SAMPLES]))
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--budget", type=float, default=0.5, help="fraction of units removed")
    parser.add_argument("--methods", default="", help="comma-separated subset (default: every registered method)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_model("vgg11", in_channels=3, input_size=32, width=args.width).eval()
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(args.samples, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (args.samples,), generator=generator)
    data = (inputs, labels)

    forward_pass(model, inputs[:256])  # warm-up
    _, floor = timed(lambda: forward_pass(model, inputs))
    ctx, tracing = timed(lambda: make_context(model, data, n_samples=args.samples))
    print(f"VGG-11 width {args.width}: {ctx.units.total_units} units in {len(ctx.units.groups)} groups, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, {args.samples} calibration samples, "
          f"budget {100 * args.budget:g}% of units, {torch.get_num_threads()} threads")
    print(f"{'method':<13} {'regime':<13} {'seconds':>9} {'x forward':>10} {'removed':>8}")
    print(f"{'(forward)':<13} {'':<13} {floor:>9.3f} {1.0:>10.2f}")
    print(f"{'(tracing)':<13} {'':<13} {tracing:>9.3f} {tracing / floor:>10.2f}   units, DG, cost model: in every row")

    names = [n for n in args.methods.split(",") if n] or \
        [n for n in ORDER if n in method_names()] + [n for n in method_names() if n not in ORDER]
    for name in names:
        info = get_method(name)
        plan, seconds = timed(lambda: select_plan(model, data, method=name, budget=args.budget, n_samples=args.samples,
                                                  seed=0, **method_options(name, inputs, labels)))
        regime = "+".join(info.regimes)
        print(f"{name:<13} {regime:<13} {seconds:>9.3f} {seconds / floor:>10.2f} "
              f"{100 * plan.stats['units_removed']:>7.1f}%", flush=True)


if __name__ == "__main__":
    main()
