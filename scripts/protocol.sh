#!/usr/bin/env bash
# Issue 14's evidence protocol (configs/protocol/), in order of priority. Run it once per core, on the same stores:
#   bash scripts/protocol.sh & bash scripts/protocol.sh & wait
#   .venv/bin/mipp report --runs results/* --out docs --readme README.md
# The processes share the runs: each takes the next run no other process holds (mipp.experiments.claims), and a
# run whose base model another process is training waits for it. Resumable: rerun the same command after an
# interruption; finished runs are skipped, never recomputed. (`bash scripts/protocol.sh I N` runs only fixed shard I
# of N instead, by base model: for machines that do not share the stores' disk. Fixed shards were this script's
# only mode until 2026-12-05; with 3 base models on 2 processes they gave one process twice the other's work.)
# Sized to this machine (2 cores, no GPU): about 33 CPU-hours in all, so about 17 hours with both cores, over
# several sessions (each config's comment gives its share). As first configured (every net on the full training set,
# the Torch-Pruning criteria also at initialisation, ResNet-18 also at equal parameters) it would have taken about
# 400 CPU-hours, ResNet-18's 5-epoch fine-tuning on 60,000 images alone most of it; so VGG-11 and ResNet-18 train
# and fine-tune on a fixed class-stratified 10,000-image subset (all test images), and ResNet-18 runs at equal MACs
# only. The LeNet-5 configs share one store (results/protocol-lenet5), so its 5 bases are trained once.
set -euo pipefail
shard=()
if [ $# -gt 0 ]; then shard=(--shard "$1/${2:?give the shard count too: protocol.sh I N}"); fi
cd "$(dirname "$0")/.."
sweep() {  # config, store
    .venv/bin/mipp sweep --config "configs/protocol/$1.json" --out "results/$2" "${shard[@]}" --threads 1
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
sweep resnet18-params protocol-resnet18
