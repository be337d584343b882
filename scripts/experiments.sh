#!/usr/bin/env bash
# Every sweep behind docs/results.md, in order of priority, as shard I of N (one process per core):
#   bash scripts/experiments.sh 0 2 &  bash scripts/experiments.sh 1 2 &  wait
#   .venv/bin/mipp report --runs results/* --out docs
# Resumable: rerun the same command after an interruption; finished runs are skipped, never recomputed.
# Results go to results/<store>/ (run records are committed; model weights, *.pt, are not).
set -euo pipefail
shard="${1:-0}"; count="${2:-1}"
cd "$(dirname "$0")/.."
sweep() {  # config, store
    .venv/bin/mipp sweep --config "configs/$1.json" --out "results/$2" --shard "$shard/$count" --threads 1
}
sweep planted planted
sweep lenet5-fmnist-grid lenet5-fmnist
sweep deformed deformed
sweep vgg11-fmnist vgg11-fmnist
sweep resnet18-fmnist resnet18-fmnist
sweep lenet5-fmnist-macs lenet5-fmnist   # the same store: shares the grid's base models; the report also
                                         # compares at equal MACs along the grid's curves
sweep lenet5-fmnist-repair lenet5-fmnist-repair   # every method re-fitted and recalibrated after surgery
sweep lenet5-fmnist-patches lenet5-fmnist-patches   # MIPP with patch features beside every baseline, same bases
sweep vgg11-fmnist-patches vgg11-fmnist-patches   # the same comparison on VGG-11 w0.25, with accuracy without re-fit
sweep resnet18-fmnist-patches resnet18-fmnist-patches   # and on ResNet-18 w0.25
