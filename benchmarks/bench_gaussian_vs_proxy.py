"""The Gaussian estimator against the paper's loss-proxy estimator on LeNet-5: agreement and selection time.

LeNet-5 on Fashion-MNIST, trained for --epochs (seeded; 0 keeps the initialisation), its activations captured once
on --samples training images; then MIPP in the paper's confidence mode (both estimators decide every unit by
their own significance test, in the same output-to-input sweep) with the closed-form Gaussian estimator and with
the loss proxy (a small network re-trained per test, R repeats). Printed in one run: each selection's time and
their ratio, the units each removed, and the agreement of their decisions (share of units decided alike, and per
layer the Jaccard index of the kept sets). Goal of issue 14: the Gaussian path at least 100x faster with at least
90% of the decisions alike.

The two confidence-mode selections stop at different sparsities (the proxy's t-test over R short re-fits is far
less powerful than the Gaussian's likelihood-ratio test), which bounds their agreement. So the Gaussian path also
selects in budget mode at the proxy's sparsity (the same fraction of units), and that selection is compared with
the proxy's too. Each agreement is printed beside its chance level: the share decided alike expected if, in every
layer, one of the two kept sets were drawn at random with its size (n - a - b + 2ab/n units of a layer of n with a
and b kept).

Run: .venv/bin/python benchmarks/bench_gaussian_vs_proxy.py [--epochs 1] [--samples 1000] [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import torch

from mipp.activations import capture
from mipp.api import make_context
from mipp.data import load_dataset
from mipp.methods.base import Budget
from mipp.methods.mipp import MIPPSettings, select
from mipp.models import build_model
from mipp.train import TrainConfig, evaluate, fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1, help="training epochs of the base (0: initialisation)")
    parser.add_argument("--limit", type=int, default=10000, help="training images (class-stratified subset)")
    parser.add_argument("--samples", type=int, default=1000, help="calibration samples")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train = load_dataset("fashion-mnist", "train", limit=args.limit, seed=args.seed)
    test = load_dataset("fashion-mnist", "test", limit=2000, seed=args.seed)
    torch.manual_seed(args.seed)
    model = build_model("lenet5", in_channels=1, input_size=28, num_classes=10)
    if args.epochs:
        fit(model, train, TrainConfig(epochs=args.epochs, seed=args.seed), progress=False)
    model.eval()
    accuracy = evaluate(model, test)["accuracy"]
    ctx = make_context(model, train, n_samples=args.samples, seed=args.seed)
    acts = capture(model, ctx.units, train, n_samples=args.samples, seed=args.seed)
    sizes = {g.key: g.size for g in ctx.units.groups}
    print(f"LeNet-5, {args.epochs} epoch(s) of training (test accuracy {100 * accuracy:.1f}%), {sum(sizes.values())}"
          f" units, {acts.n_samples} calibration samples, confidence {args.confidence}, "
          f"{torch.get_num_threads()} thread(s)")
    plans, seconds = {}, {}
    for name in ("gaussian", "proxy"):
        started = time.perf_counter()
        plans[name] = select(ctx, None, MIPPSettings(estimator=name, confidence=args.confidence, features="mean"),
                             acts=acts)
        seconds[name] = time.perf_counter() - started
        removed = sum(sizes[k] - len(v) for k, v in plans[name].kept.items())
        print(f"{name:<9} selection {seconds[name]:9.2f} s, {removed} units removed "
              f"({100 * removed / sum(sizes.values()):.1f}%)", flush=True)
    print(f"speed: the Gaussian selection is {seconds['proxy'] / seconds['gaussian']:.0f}x faster (goal >= 100x)")
    agreement("confidence mode, each at its own sparsity", plans["gaussian"], plans["proxy"], sizes)
    removed = sum(sizes[k] - len(v) for k, v in plans["proxy"].kept.items()) / sum(sizes.values())
    if 0.0 < removed < 1.0:
        started = time.perf_counter()
        budgeted = select(ctx, Budget(removed, "units"), MIPPSettings(estimator="gaussian",
                                                                      confidence=args.confidence, features="mean"),
                          acts=acts)
        print(f"gaussian  budget mode at the proxy's {100 * removed:.1f}% of units: "
              f"{time.perf_counter() - started:.2f} s")
        agreement("at equal sparsity (the Gaussian in budget mode)", budgeted, plans["proxy"], sizes)


def agreement(title: str, gaussian, proxy, sizes: dict) -> None:
    """Share of units decided alike (and its chance level), and per layer the kept counts and Jaccard index."""
    alike = chance = 0.0
    for key, n in sizes.items():
        a, b = set(gaussian.kept[key]), set(proxy.kept[key])
        alike += len(a & b) + n - len(a | b)
        chance += n - len(a) - len(b) + 2 * len(a) * len(b) / n
    total = sum(sizes.values())
    print(f"agreement, {title}: {100 * alike / total:.1f}% of the units decided alike (goal >= 90%; chance "
          f"{100 * chance / total:.1f}%)")
    for key, n in sizes.items():
        a, b = set(gaussian.kept[key]), set(proxy.kept[key])
        print(f"  {key:<14} kept: gaussian {len(a):4d}, proxy {len(b):4d} of {n:4d}; "
              f"Jaccard {len(a & b) / max(1, len(a | b)):.2f}")


if __name__ == "__main__":
    main()
