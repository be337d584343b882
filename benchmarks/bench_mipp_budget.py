"""MIPP's budget mode on a briefly trained LeNet-5: per-layer kept widths, MACs removed, accuracy right after pruning.

Trains LeNet-5 for `--epochs` on Fashion-MNIST (the `synthetic` set when Fashion-MNIST is not installed; see
scripts/get-data.sh), seeded, or loads it from `--weights` when that file exists (so that two versions of mipp can
be compared on the same network), then prunes it with MIPP at each MACs budget, once per test order, and evaluates
the pruned net on the test split with no fine-tuning.

Run: PYTHONPATH=src .venv/bin/python benchmarks/bench_mipp_budget.py [--weights /tmp/lenet5.pt] [--orders mi greedy]
(`--orders none` calls MIPP without an order, for versions of mipp that predate the option.)
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from mipp import prune
from mipp.data import DataNotFoundError, load_dataset
from mipp.models import build_model
from mipp.train import TrainConfig, evaluate, fit


def data_sets():
    try:
        return "fashion-mnist", load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    except DataNotFoundError:
        options = dict(in_channels=1, input_size=28, num_classes=10)
        return "synthetic", load_dataset("synthetic", "train", **options), load_dataset("synthetic", "test", **options)


def trained_lenet(train, weights: str | None, epochs: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("lenet5", num_classes=10, in_channels=1, input_size=28)
    if weights and os.path.exists(weights):
        model.load_state_dict(torch.load(weights))
    else:
        fit(model, train, TrainConfig(epochs=epochs, seed=0, device="cpu"), progress=False)
        if weights:
            torch.save(model.state_dict(), weights)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None, help="trained weights: loaded if present, else saved there")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    parser.add_argument("--orders", nargs="+", default=["mi", "greedy"])
    parser.add_argument("--samples", type=int, default=2000, help="calibration samples")
    args = parser.parse_args()
    torch.set_num_threads(1)
    name, train, test = data_sets()
    model = trained_lenet(train, args.weights, args.epochs)
    calibration = train.images[torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(0))
                               [: args.samples]]
    print(f"LeNet-5 on {name}, {args.epochs} epochs: test accuracy {evaluate(model, test)['accuracy']:.4f}; "
          f"{args.samples} calibration samples")
    print(f"{'order':<7} {'budget':>6} {'MACs removed':>12} {'accuracy':>8} {'seconds':>7}  kept widths (input->output)")
    for order in args.orders:
        for budget in args.budgets:
            options = {} if order == "none" else {"order": order}
            start = time.perf_counter()
            pruned, plan = prune(model, calibration, budget=budget, metric="macs", n_samples=args.samples,
                                 **options)
            seconds = time.perf_counter() - start
            widths = {key: len(kept) for key, kept in reversed(plan.kept.items())}
            accuracy = evaluate(pruned, test)["accuracy"]
            print(f"{order:<7} {budget:>6.2f} {plan.stats['macs_removed']:>12.4f} {accuracy:>8.4f} {seconds:>7.1f}  "
                  f"{widths}")


if __name__ == "__main__":
    main()
