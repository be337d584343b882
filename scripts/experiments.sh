#!/usr/bin/env bash
# The sweeps behind docs/results.md besides the protocol's (scripts/protocol.sh), in order of priority, as shard I of N (one process per core):
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
# every method re-fitted (sequentially) and recalibrated, 50/70/90% of MACs run directly, 3 seeds (issue 13)
sweep lenet5-fmnist-seq lenet5-fmnist-seq
sweep vgg11-fmnist-seq vgg11-fmnist-seq
sweep resnet18-fmnist-seq resnet18-fmnist-seq
