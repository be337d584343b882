#!/usr/bin/env bash
# Every sweep behind docs/results.md, in order of cost, as shard I of N (one process per core):
#   bash scripts/experiments.sh 0 2 &  bash scripts/experiments.sh 1 2 &  wait
#   .venv/bin/mipp report --runs results/* --out docs --name results
# Resumable: rerun the same command after an interruption; finished runs are skipped, never recomputed.
# Results go to results/<sweep>/ (run records are committed; model weights, *.pt, are not).
set -euo pipefail
shard="${1:-0}"; count="${2:-1}"
cd "$(dirname "$0")/.."
for sweep in planted lenet5-fmnist-grid deformed vgg11-fmnist resnet18-fmnist; do
    .venv/bin/mipp sweep --config "configs/$sweep.json" --out "results/$sweep" --shard "$shard/$count" --threads 1
done
