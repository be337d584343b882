"""The one-pass re-fit with its ridge chosen by cross-validation (the default) against the fixed ridge 1e-6 (the rule
before 2026-12-05), on the LeNet-5 bases of the protocol (configs/protocol/lenet5-macs.json).

For each chosen method, seed and target of that config (after training): the method's plan, then the pruned net
re-fitted both ways and recalibrated as the sweep does, its test accuracy right after pruning, its largest weight,
and its test accuracy after one fine-tuning epoch with the protocol's settings (seeded by the run's seed, not by the
sweep's derived fine-tuning seed, so a run's number can differ from its record). The base models are those of
results/protocol-lenet5 (trained there first when missing, as the sweep would).

Run: .venv/bin/python benchmarks/bench_refit_ridge.py [--methods thinet,random,mipp,tp-l2] [--seeds 0,1]
"""
from __future__ import annotations

import argparse
import functools

import torch

from mipp.api import select_plan
from mipp.experiments import runner as sweep_runner
from mipp.experiments.config import SweepConfig, expand
from mipp.experiments.runner import Runner, pruned_copy
from mipp.experiments.store import ResultStore
from mipp.reconstruct import RIDGE, refit_readers
from mipp.train import TrainConfig, evaluate, fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="thinet,random,mipp,tp-l2", help="method labels of the config")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--config", default="configs/protocol/lenet5-macs.json")
    parser.add_argument("--store", default="results/protocol-lenet5")
    args = parser.parse_args()
    torch.set_num_threads(1)
    methods, seeds = args.methods.split(","), {int(s) for s in args.seeds.split(",")}
    runner = Runner(ResultStore(args.store), latency=False, progress=False)
    print(f"{'method':<10} {'target':>6} {'seed':>4}  ridge: right after -> after 1 epoch (largest weight)")
    for run in expand(SweepConfig.load(args.config)):
        if run.regime != "trained" or run.labels["method"] not in methods or run.seed not in seeds:
            continue
        splits = runner.splits(run)
        base, _ = runner.base(run, splits)
        plan = select_plan(base, splits.train, method=run.method["name"], budget=runner.budget(run),
                           metric=run.metric, min_units=run.settings["min_units"], n_samples=run.settings["n_samples"],
                           seed=run.seed, example_input=splits.example, **run.method["options"])
        cells = []
        for name, refit in (("chosen", refit_readers), ("fixed", functools.partial(refit_readers, ridge=RIDGE))):
            saved, sweep_runner.refit_readers = sweep_runner.refit_readers, refit
            try:
                model = pruned_copy(run, splits, base, plan)
            finally:
                sweep_runner.refit_readers = saved
            right = evaluate(model, splits.test)["accuracy"]
            largest = max(p.abs().max().item() for n, p in model.named_parameters() if n.endswith("weight"))
            try:
                fit(model, splits.train, TrainConfig.from_dict({**run.settings["finetune"], "epochs": 1,
                                                                "seed": run.seed}), progress=False)
                after = f"{100 * evaluate(model, splits.test)['accuracy']:.1f}"
            except FloatingPointError:
                after = "diverged"
            cells.append(f"{name} {100 * right:.1f} -> {after} ({largest:.3g})")
        print(f"{run.labels['method']:<10} {run.target:>6} {run.seed:>4}  " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
