#!/usr/bin/env bash
# Issue 14's evidence protocol (configs/protocol/), in order of priority, as shard I of N (one process per core):
#   bash scripts/protocol.sh 0 2 &  bash scripts/protocol.sh 1 2 &  wait
#   .venv/bin/mipp report --runs results/* --out docs --readme README.md
# Resumable: rerun the same command after an interruption; finished runs are skipped, never recomputed.
# Sized to this machine (2 cores, no GPU): about 33 CPU-hours in all, so about 17 hours with both cores, over
# several sessions (each config's comment gives its share). As first configured (every net on the full training set,
# the Torch-Pruning criteria also at initialisation, ResNet-18 also at equal parameters) it would have taken about
# 400 CPU-hours, ResNet-18's 5-epoch fine-tuning on 60,000 images alone most of it; so VGG-11 and ResNet-18 train
# and fine-tune on a fixed class-stratified 10,000-image subset (all test images), and ResNet-18 runs at equal MACs
# only.
# The LeNet-5 configs share one store (results/protocol-lenet5), so its 5 bases are trained once; shards split
# the runs by base model (seed), so give N a divisor of the seeds (5 for LeNet-5, 3 for VGG-11 and ResNet-18) for
# even shards.
set -euo pipefail
shard="${1:-0}"; count="${2:-1}"
cd "$(dirname "$0")/.."
sweep() {  # config, store
    .venv/bin/mipp sweep --config "configs/protocol/$1.json" --out "results/$2" --shard "$shard/$count" --threads 1
}
sweep lenet5-macs protocol-lenet5
sweep lenet5-ablations protocol-lenet5
sweep lenet5-confidence protocol-lenet5
sweep lenet5-params protocol-lenet5
sweep lenet5-curve protocol-lenet5
sweep lenet5-units protocol-lenet5
sweep lenet5-deformed protocol-lenet5-deformed
sweep vgg11-macs protocol-vgg11
sweep resnet18-macs protocol-resnet18
sweep vgg11-params protocol-vgg11
